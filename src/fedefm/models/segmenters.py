"""Segmenters: TransUNet (hybrid encoder + cascaded upsampler with CNN skips) and MONAI U-Net / SwinUNETR baselines."""

from __future__ import annotations

import torch
from monai.networks.nets import SwinUNETR, UNet
from torch import Tensor, nn

from fedefm.errors import ConfigError, choose
from fedefm.models.encoder import HybridEncoder, group_norm
from fedefm.models.heads import Classifier
from fedefm.models.presets import Preset

ARCHS = ("transunet", "unet", "swinunetr")


def conv_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv → GroupNorm → ReLU (TransUNet's Conv2dReLU with GroupNorm in place of BatchNorm)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        group_norm(out_channels),
        nn.ReLU(),
    )


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip (if any), then two conv→GN→ReLU."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv1 = conv_gn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_gn_relu(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        """Map (B, C_in, h, w) and skip (B, C_skip, 2h, 2w) or None to (B, C_out, 2h, 2w)."""
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class DecoderCup(nn.Module):
    """TransUNet's cascaded upsampler: token map (stride 16) → 3x3 conv → 4 upsampling blocks → stride 1."""

    def __init__(self, preset: Preset, n_skip: int) -> None:
        super().__init__()
        self.n_skip = n_skip
        width = preset.stem_width
        # Skips arrive at strides 8, 4, 2; the last block (stride 2 → 1) has none, as in TransUNet.
        skip_channels = [8 * width, 4 * width, width, 0]
        skip_channels = [c if i < n_skip else 0 for i, c in enumerate(skip_channels)]
        in_channels = [preset.decoder_head_channels, *preset.decoder_channels[:-1]]
        self.conv_more = conv_gn_relu(preset.hidden, preset.decoder_head_channels)
        self.blocks = nn.ModuleList(
            DecoderBlock(c_in, c_out, c_skip)
            for c_in, c_out, c_skip in zip(in_channels, preset.decoder_channels, skip_channels, strict=True)
        )

    def forward(self, tokens: Tensor, grid: tuple[int, int], skips: list[Tensor]) -> Tensor:
        """Decode tokens (B, L, D) on grid (h, w) with skips at strides 8, 4, 2 into (B, C_last, 16h, 16w)."""
        B, L, D = tokens.shape
        x = self.conv_more(tokens.transpose(1, 2).reshape(B, D, *grid))  # (B, head_channels, h, w)
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < self.n_skip else None)
        return x


class TransUNet(nn.Module):
    """TransUNet (Chen et al. 2021) over the hybrid encoder: the downstream catheter/guidewire segmenter.

    ``encoder`` is the same ``HybridEncoder`` as the pretraining ``Classifier``'s, so a foundation checkpoint's
    ``encoder.*`` tensors load into it unchanged; ``decoder`` and ``segmentation_head`` train from scratch.
    """

    arch = "transunet"

    def __init__(self, preset: Preset, n_classes: int = 3, n_skip: int | None = None) -> None:
        super().__init__()
        n_skip = preset.n_skip if n_skip is None else n_skip
        if not 0 <= n_skip <= 3:
            raise ConfigError(f"--n-skip {n_skip}: must be 0, 1, 2 or 3 (skips exist at strides 8, 4, 2)")
        self.preset = preset
        self.n_classes = n_classes
        self.encoder = HybridEncoder(preset)
        self.decoder = DecoderCup(preset, n_skip)
        self.segmentation_head = nn.Conv2d(preset.decoder_channels[-1], n_classes, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Segment images x: (B, in_channels, H, W); returns logits (B, n_classes, H, W), class 0 background."""
        tokens, grid, skips = self.encoder(x)
        return self.segmentation_head(self.decoder(tokens, grid, skips))


def build_classifier(preset: Preset, n_classes: int) -> Classifier:
    """Pretraining model: hybrid encoder + linear head over ``n_classes`` data types."""
    return Classifier(preset, n_classes)


def build_segmenter(arch: str, preset: Preset, n_classes: int = 3) -> nn.Module:
    """Build segmenter ``arch`` (one of ARCHS) sized by ``preset``; input (B, 1, H, W) → logits (B, n_classes, H, W).

    Every model carries ``arch``, ``preset`` and ``n_classes`` attributes, which weights files record. The MONAI
    baselines use instance norm (no BatchNorm); U-Net needs H, W divisible by 2^(levels-1), SwinUNETR by 32.

    Raises:
        ConfigError: unknown ``arch``.
    """
    if choose("--arch", arch, ARCHS) == "transunet":
        return TransUNet(preset, n_classes)
    if arch == "unet":
        model: nn.Module = UNet(
            spatial_dims=2,
            in_channels=preset.in_channels,
            out_channels=n_classes,
            channels=preset.unet_channels,
            strides=(2,) * (len(preset.unet_channels) - 1),
            num_res_units=2,
            norm="instance",
        )
    else:
        model = SwinUNETR(
            in_channels=preset.in_channels,
            out_channels=n_classes,
            feature_size=preset.swin_feature_size,
            spatial_dims=2,
            norm_name="instance",
        )
    model.arch = arch
    model.preset = preset
    model.n_classes = n_classes
    return model
