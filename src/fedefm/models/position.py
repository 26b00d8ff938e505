"""Catheter position from where the device is: locate the catheter tip in a predicted mask and pool features there.

The plain classifier (models/heads.py) mean-pools tokens over the whole image, which throws away exactly what a
position class is about: where the tip lies relative to the anatomy. :class:`PositionClassifier` segments the
catheter with TransUNet's decoder, finds the tip (the end of the catheter farthest along it from where it enters
the field), and classifies from the features at and around the tip, the mask-weighted features, the tip's
coordinates and the mean token. :class:`MaskPositionClassifier` classifies the shape and place of the predicted
catheter itself, through a small CNN on its probability map, with the segmenter held as loaded.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from fedefm.models.encoder import HybridEncoder
from fedefm.models.presets import Preset
from fedefm.models.segmenters import DecoderCup

CATHETER = 1  # the catheter's channel of the segmentation head (background, catheter, guidewire)
NEIGHBOURS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def geodesic_distances(rows: np.ndarray, cols: np.ndarray, start: int) -> np.ndarray:
    """Steps (8-connected, breadth first) from pixel ``start`` to every pixel of a component given as rows, cols (N,)."""
    index = {(int(r), int(c)): k for k, (r, c) in enumerate(zip(rows, cols))}
    distance = np.full(rows.size, -1)
    distance[start] = 0
    queue = deque([start])
    while queue:
        k = queue.popleft()
        for dr, dc in NEIGHBOURS:
            j = index.get((int(rows[k]) + dr, int(cols[k]) + dc))
            if j is not None and distance[j] < 0:
                distance[j] = distance[k] + 1
                queue.append(j)
    return distance


def locate_tip(mask: np.ndarray) -> tuple[float, float] | None:
    """The catheter tip (row, col) of a device mask (H, W) bool, None when it is empty.

    In the largest 8-connected component the two ends are the pixels farthest apart along it (the farthest
    pixel from any pixel is one end, the farthest from that the other), so a curved or looped catheter's
    ends are where it stops, not the points farthest apart in a line. The catheter enters the field at one
    end: the end touching the image border when exactly one does, else the lower end (a femoral catheter
    reaches the chest from below; collimator blades often cut it off before the border). The tip is the other.
    """
    components, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())[1:]
    rows, cols = np.nonzero(components == 1 + int(np.argmax(sizes)))
    first = int(np.argmax(geodesic_distances(rows, cols, 0)))
    second = int(np.argmax(geodesic_distances(rows, cols, first)))
    ends = (first, second)
    height, width = mask.shape
    touching = [k for k in ends if min(rows[k], cols[k], height - 1 - rows[k], width - 1 - cols[k]) <= 1]
    entry = touching[0] if len(touching) == 1 else max(ends, key=lambda k: rows[k])
    tip = second if entry == first else first
    return float(rows[tip]), float(cols[tip])


def locate_tips(probability: Tensor, threshold: float = 0.5) -> Tensor:
    """Tip (row, col) in px of each catheter probability map (B, H, W) → (B, 2) float.

    The mask is the pixels at ``probability >= threshold``; an image with none (an untrained or unsure
    segmenter) falls back to its most probable pixel, so every image gets a location.
    """
    maps = probability.detach().cpu().numpy()
    tips = []
    for prob in maps:
        tip = locate_tip(prob >= threshold)
        tips.append(tip if tip is not None else np.unravel_index(int(np.argmax(prob)), prob.shape))
    return torch.tensor(np.asarray(tips, dtype=np.float32), device=probability.device)


def pool_at(features: Tensor, points: Tensor, image_size: Sequence[int], radius: float) -> Tensor:
    """Features (B, C, h, w) sampled bilinearly at points (B, 2) (row, col in px of an image ``image_size``)
    and on a ring of 8 points ``radius`` px around each: (B, 2C), the centre then the ring's mean.
    """
    height, width = image_size
    offsets = torch.tensor([(0.0, 0.0), *NEIGHBOURS], device=points.device) * radius  # (9, 2)
    where = points[:, None, :] + offsets[None]  # (B, 9, 2) row, col
    # grid_sample takes (x, y) in [-1, 1] over the image's extent (align_corners=False: pixel centres at +0.5).
    grid = torch.stack([(where[..., 1] + 0.5) / width, (where[..., 0] + 0.5) / height], dim=-1) * 2 - 1
    sampled = F.grid_sample(features, grid[:, None], mode="bilinear", padding_mode="border", align_corners=False)
    sampled = sampled[:, :, 0]  # (B, C, 9)
    return torch.cat([sampled[..., 0], sampled[..., 1:].mean(-1)], dim=1)


def mask_pool(features: Tensor, weight: Tensor) -> Tensor:
    """Mean of features (B, C, H, W) weighted by a map (B, H, W) ≥ 0: (B, C) — attention pooling guided by the mask."""
    weight = weight / weight.sum(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    return torch.einsum("bchw,bhw->bc", features, weight)


def segment_catheter(model: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, int], Tensor, Tensor]:
    """Run a model's TransUNet parts on images x (B, in_channels, H, W): tokens (B, L, D), the token grid (h, w),
    decoder features (B, C, H, W) and the catheter probability (B, H, W)."""
    tokens, grid, skips = model.encoder(x)
    decoded = model.decoder(tokens, grid, skips, x)  # (B, C, H, W)
    catheter = torch.softmax(model.segmentation_head(decoded), dim=1)[:, CATHETER]  # (B, H, W)
    return tokens, grid, decoded, catheter


def add_segmenter(model: nn.Module, preset: Preset) -> int:
    """Give ``model`` a TransUNet's ``encoder``, ``decoder`` and ``segmentation_head``; returns the decoder's channels C."""
    model.encoder = HybridEncoder(preset)
    model.decoder = DecoderCup(preset, preset.n_skip)
    channels = preset.decoder_channels[-1]
    model.segmentation_head = nn.Conv2d(channels, 3, kernel_size=3, padding=1)
    return channels


class PositionClassifier(nn.Module):
    """TransUNet (encoder, decoder, segmentation head) + a head on what the predicted catheter and its tip show.

    The head reads LayerNorm of [mean token (D), decoder features pooled under the catheter probability (C),
    decoder features at the tip and around it (2C), token features at the tip and around it (2D), the tip's
    coordinates in [-1, 1] (2)]. Its tensors ``encoder.*``, ``decoder.*`` and ``segmentation_head.*`` are a
    TransUNet's, so a fine-tuned segmenter loads whole into it (``finetune --task classify --pooling tip``); the
    tip is where the catheter mask (probability >= 0.5) ends, located without gradient; the segmentation head
    learns on through the mask-weighted pooling.
    """

    arch = "position"
    segmenter_arch = "transunet"  # the architecture whose whole weights it takes

    def __init__(self, preset: Preset, n_classes: int, radius: float = 4.0) -> None:
        super().__init__()
        self.preset = preset
        self.n_classes = n_classes
        self.radius = radius
        channels = add_segmenter(self, preset)
        width = 3 * preset.hidden + 3 * channels + 2
        self.head = nn.Sequential(OrderedDict(norm=nn.LayerNorm(width, eps=1e-6), linear=nn.Linear(width, n_classes)))

    def forward(self, x: Tensor, parts: Sequence[str] | None = None) -> Tensor | dict[str, Tensor]:
        """Classify images x: (B, in_channels, H, W); returns logits (B, n_classes).

        With ``parts`` (a subset of "logits", "tip", "catheter") it returns those by name from one pass:
        "tip" (B, 2) row, col in px of x, "catheter" the catheter probability (B, H, W) it looked at.
        """
        tokens, grid, decoded, catheter = segment_catheter(self, x)
        tips = locate_tips(catheter)
        size = x.shape[-2:]
        token_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        scale = torch.tensor([size[0] - 1, size[1] - 1], device=x.device, dtype=tips.dtype)
        representation = torch.cat([
            tokens.mean(dim=1), mask_pool(decoded, catheter), pool_at(decoded, tips, size, self.radius),
            pool_at(token_map, tips, size, self.radius), tips / scale.clamp_min(1) * 2 - 1,
        ], dim=1)
        logits = self.head(representation)
        if parts is None:
            return logits
        return {name: {"logits": logits, "tip": tips, "catheter": catheter}[name] for name in parts}


def shape_encoder(width: int = 32, blocks: int = 4, grid: int = 4) -> nn.Sequential:
    """A small CNN over a catheter probability map (B, 1, H, W) → (B, width · grid²): ``blocks`` stride-2
    conv, GroupNorm, ReLU blocks, then an average pool to a grid × grid map, flattened so that where the
    catheter's parts lie (not only what they look like) reaches the head."""
    layers: list[nn.Module] = []
    for k in range(blocks):
        layers += [nn.Conv2d(1 if k == 0 else width, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid), nn.Flatten())


class MaskPositionClassifier(nn.Module):
    """TransUNet (encoder, decoder, segmentation head) + a small CNN on the catheter it predicts, then a linear head.

    The position classes are the shape and place of the device: where it runs and where it stops relative to
    the arch. A CNN on the TRUE catheter mask alone reads them from K = 16 frames per class, where image
    features do not (benchmarks/t6_oracles.py), so this model classifies the predicted catheter probability
    (B, 1, H, W) through :func:`shape_encoder` and Dropout→Linear. The segmenter is held as loaded (the
    probability is detached): the class labels of a few frames cannot teach it where the catheter is, and
    would pull it from the masks it was fine-tuned on; only ``shape_encoder`` and the head learn. Its tensors
    ``encoder.*``, ``decoder.*``, ``segmentation_head.*`` are a TransUNet's, so a fine-tuned segmenter loads
    whole (``finetune --task classify --pooling mask``).
    """

    arch = "position_mask"
    segmenter_arch = "transunet"  # the architecture whose whole weights it takes

    def __init__(self, preset: Preset, n_classes: int, width: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        self.preset = preset
        self.n_classes = n_classes
        add_segmenter(self, preset)
        self.shape_encoder = shape_encoder(width)
        self.head = nn.Sequential(OrderedDict(dropout=nn.Dropout(dropout), linear=nn.Linear(width * 16, n_classes)))

    def train(self, mode: bool = True) -> MaskPositionClassifier:
        """Set train or eval mode; the segmenter parts stay in eval (no dropout): they are held as loaded."""
        super().train(mode)
        for part in (self.encoder, self.decoder, self.segmentation_head):
            part.eval()
        return self

    def forward(self, x: Tensor, parts: Sequence[str] | None = None) -> Tensor | dict[str, Tensor]:
        """Classify images x: (B, in_channels, H, W), H and W multiples of 32; returns logits (B, n_classes).

        With ``parts`` (a subset of "logits", "tip", "catheter") it returns those by name from one pass:
        "catheter" the probability (B, H, W) it classified, "tip" (B, 2) row, col in px where that catheter ends.
        """
        with torch.no_grad():
            catheter = segment_catheter(self, x)[3]
        logits = self.head(self.shape_encoder(catheter[:, None]))
        if parts is None:
            return logits
        seen = {"logits": logits, "catheter": catheter}
        return {name: seen[name] if name != "tip" else locate_tips(catheter) for name in parts}
