"""Masked-image modelling through the whole segmenter body: hide patches, add noise, reconstruct the frame.

Label-free, so every silo learns from every frame it holds. The input hides ``mask_ratio`` of a grid of
``patch``-px squares (filled with mid-grey) and adds Gaussian noise; the loss is the squared error of
the reconstruction, hidden pixels weighing 1 and visible ones ``visible_weight`` (the denoising part,
which trains the decoder's full-resolution path as DDeP does). The masks are drawn from torch's global
generator, like dropout, which every checkpoint saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedefm.errors import ConfigError
from fedefm.federated.objectives.base import Batch, ModelCall, Outputs
from fedefm.models.foundation import DenseFoundation
from fedefm.models.presets import Preset


def corrupt(images: Tensor, mask_ratio: float, patch: int, noise_std: float,
            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Hide patches and add noise: images (B, 1, H, W) → (inputs (B, 1, H, W), hidden (B, 1, H, W) 1 where hidden)."""
    B, _, H, W = images.shape
    grid = (-(-H // patch), -(-W // patch))
    draw = torch.rand((B, 1, *grid), generator=generator, device=generator.device if generator else images.device)
    hidden = F.interpolate((draw < mask_ratio).float(), scale_factor=patch, mode="nearest")[..., :H, :W]
    noise = torch.randn(images.shape, generator=generator, device=draw.device).to(images.device)
    hidden = hidden.to(images.device)
    return images * (1 - hidden) + 0.5 * hidden + noise_std * noise, hidden


def reconstruction_loss(reconstruction: Tensor, images: Tensor, hidden: Tensor, visible_weight: float) -> Tensor:
    """Squared error (B, 1, H, W) weighted 1 on hidden pixels and ``visible_weight`` elsewhere, normalised: ()."""
    weight = hidden + visible_weight * (1 - hidden)
    return (weight * (reconstruction - images) ** 2).sum() / weight.sum()


@dataclass(frozen=True)
class MaskedImageModelling:
    """MIM / denoising reconstruction; validation: PSNR (dB) of the reconstruction of fixed corrupted frames.

    Attributes:
        mask_ratio: share of patches hidden.
        patch: side of a hidden square in px (8: 64 squares on a 64 px frame).
        noise_std: Gaussian noise added to the whole input (images in [0, 1]).
        visible_weight: loss weight of visible pixels.
    """

    mask_ratio: float = 0.4
    patch: int = 8
    noise_std: float = 0.05
    visible_weight: float = 0.25
    name: str = "mim"
    metric: str = "psnr"
    untrained_parts: tuple[str, ...] = ("segmentation_head.",)

    def __post_init__(self) -> None:
        """Check the settings; raise ConfigError naming the one that is off."""
        if not 0 < self.mask_ratio < 1 or self.patch < 1 or self.noise_std < 0 or not 0 <= self.visible_weight <= 1:
            raise ConfigError(f"mim settings {self}: need 0 < mask_ratio < 1, patch >= 1, noise_std >= 0, "
                              "0 <= visible_weight <= 1")

    def build_model(self, preset: Preset, n_classes: int) -> nn.Module:
        """The whole TransUNet body (its segmentation head stays untrained)."""
        return DenseFoundation(preset, n_classes)

    def prepare(self, batch: Batch) -> Batch:
        """Draw the hidden patches and the noise of this batch once."""
        inputs, hidden = corrupt(batch.images, self.mask_ratio, self.patch, self.noise_std)
        return batch._replace(inputs=inputs, hidden=hidden)

    def outputs(self, call: ModelCall, batch: Batch) -> Outputs:
        """{"reconstruction" (B, 1, H, W), "representation" (B, D)} of the corrupted inputs."""
        return call(batch.inputs, ("reconstruction", "representation"))

    def loss(self, outputs: Outputs, batch: Batch) -> Tensor:
        """reconstruction_loss of the reconstruction against the clean images."""
        return reconstruction_loss(outputs["reconstruction"], batch.images, batch.hidden, self.visible_weight)

    def soft(self, student: Outputs, teacher: Outputs, temperature: float) -> tuple[Tensor, float]:
        """Mean squared difference of the two reconstructions (no temperature: they are images)."""
        return F.mse_loss(student["reconstruction"], teacher["reconstruction"].detach()), 1.0

    @torch.no_grad()
    def score(self, model: nn.Module, source, batch_size: int = 32) -> float:
        """PSNR (dB, peak 1) of the reconstruction of every validation frame, corrupted with a fixed seed."""
        model.eval()
        generator = torch.Generator().manual_seed(0)
        squared, pixels = 0.0, 0
        for start in range(0, len(source), batch_size):
            images = source.images(torch.arange(start, min(start + batch_size, len(source))))
            inputs, _ = corrupt(images, self.mask_ratio, self.patch, self.noise_std, generator)
            squared += float(((model(inputs, ("reconstruction",))["reconstruction"] - images) ** 2).sum())
            pixels += images.numel()
        return float(10 * torch.log10(torch.tensor(pixels / max(squared, 1e-12))))
