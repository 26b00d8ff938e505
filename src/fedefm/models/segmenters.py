"""Segmenters: TransUNet (hybrid encoder + cascaded upsampler with CNN skips) and MONAI U-Net / SwinUNETR baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedefm.errors import ConfigError, choose
from fedefm.models.encoder import HybridEncoder, group_norm
from fedefm.models.heads import Classifier
from fedefm.models.presets import Preset

ARCHS = ("transunet", "unet", "resunet", "swinunetr")


def conv_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv → GroupNorm → ReLU (TransUNet's Conv2dReLU with GroupNorm in place of BatchNorm)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        group_norm(out_channels),
        nn.ReLU(),
    )


class DecoderBlock(nn.Module):
    """Upsample x2 (to the skip's size when there is one), concatenate the skip, then two conv→GN→ReLU."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.conv1 = conv_gn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_gn_relu(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        """Map (B, C_in, h, w) and skip (B, C_skip, H', W') or None to (B, C_out, H', W'), (2h, 2w) without a skip."""
        size = skip.shape[-2:] if skip is not None else (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


def full_resolution_stem(in_channels: int, channels: int) -> nn.Sequential:
    """Two 3x3 conv→GN→ReLU on the input image at stride 1: (B, in_channels, H, W) → (B, channels, H, W).

    The skip of the decoder's last block: the encoder's first skip is at stride 2, so without it a
    1-2 px guidewire reaches the output only through bilinear upsampling.
    """
    return nn.Sequential(conv_gn_relu(in_channels, channels), conv_gn_relu(channels, channels))


class DecoderCup(nn.Module):
    """TransUNet's cascaded upsampler: token map (stride 16) → 3x3 conv → 4 upsampling blocks → stride 1.

    The encoder's skips arrive at strides 8, 4, 2; TransUNet's last block (stride 2 → 1) has none.
    With ``full_resolution`` (the default) a light stem on the input image gives it one at stride 1.
    """

    def __init__(self, preset: Preset, n_skip: int, full_resolution: bool = True) -> None:
        super().__init__()
        self.n_skip = n_skip
        width = preset.stem_width
        full_channels = preset.decoder_channels[-1]
        self.full_resolution = full_resolution_stem(preset.in_channels, full_channels) if full_resolution else None
        skip_channels = [8 * width, 4 * width, width]
        skip_channels = [c if i < n_skip else 0 for i, c in enumerate(skip_channels)]
        skip_channels.append(full_channels if full_resolution else 0)
        in_channels = [preset.decoder_head_channels, *preset.decoder_channels[:-1]]
        self.conv_more = conv_gn_relu(preset.hidden, preset.decoder_head_channels)
        self.blocks = nn.ModuleList(
            DecoderBlock(c_in, c_out, c_skip)
            for c_in, c_out, c_skip in zip(in_channels, preset.decoder_channels, skip_channels, strict=True)
        )

    def forward(self, tokens: Tensor, grid: tuple[int, int], skips: list[Tensor], image: Tensor) -> Tensor:
        """Decode tokens (B, L, D) on grid (h, w) with skips at strides 8, 4, 2 and image (B, C, H, W) → (B, C_last, H, W)."""
        B, L, D = tokens.shape
        x = self.conv_more(tokens.transpose(1, 2).reshape(B, D, *grid))  # (B, head_channels, h, w)
        stride_1 = self.full_resolution(image) if self.full_resolution is not None else None
        for i, block in enumerate(self.blocks[:-1]):
            x = block(x, skips[i] if i < self.n_skip else None)
        return self.blocks[-1](x, stride_1)


class TransUNet(nn.Module):
    """TransUNet (Chen et al. 2021) over the hybrid encoder: the downstream catheter/guidewire segmenter.

    ``encoder`` is the same ``HybridEncoder`` as the pretraining ``Classifier``'s, so a foundation checkpoint's
    ``encoder.*`` tensors load into it unchanged; a dense foundation (models/foundation.py) also gives it the
    ``decoder`` and the ``segmentation_head`` rows of its labels (``finetune --init-parts``).
    """

    arch = "transunet"

    def __init__(self, preset: Preset, n_classes: int = 3, n_skip: int | None = None, full_resolution: bool = True
                 ) -> None:
        super().__init__()
        n_skip = preset.n_skip if n_skip is None else n_skip
        if not 0 <= n_skip <= 3:
            raise ConfigError(f"--n-skip {n_skip}: must be 0, 1, 2 or 3 (skips exist at strides 8, 4, 2)")
        self.preset = preset
        self.n_classes = n_classes
        self.encoder = HybridEncoder(preset)
        self.decoder = DecoderCup(preset, n_skip, full_resolution)
        self.segmentation_head = nn.Conv2d(preset.decoder_channels[-1], n_classes, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Segment images x: (B, in_channels, H, W); returns logits (B, n_classes, H, W), class 0 background."""
        tokens, grid, skips = self.encoder(x)
        return self.segmentation_head(self.decoder(tokens, grid, skips, x))


def build_classifier(preset: Preset, n_classes: int) -> Classifier:
    """Pretraining model: hybrid encoder + linear head over ``n_classes`` data types."""
    return Classifier(preset, n_classes)


def build_segmenter(arch: str, preset: Preset, n_classes: int = 3) -> nn.Module:
    """Build segmenter ``arch`` (one of ARCHS) sized by ``preset``; input (B, 1, H, W) → logits (B, n_classes, H, W).

    Every model carries ``arch``, ``preset`` and ``n_classes`` attributes, which weights files record. The MONAI
    baselines use instance norm (no BatchNorm); U-Net needs H, W divisible by 2^(levels-1), SwinUNETR by 32.
    ``unet`` is MONAI's UNet with two residual units per level; ``resunet`` is a residual-encoder U-Net in
    the style of nnU-Net's ResEnc presets (MONAI SegResNet: 1, 2, 2, 4 residual blocks down the encoder, one
    per decoder level, ``unet_channels[0]`` filters at full resolution doubling per level; H, W divisible by 8).

    Raises:
        ConfigError: unknown ``arch``.
    """
    if choose("--arch", arch, ARCHS) == "transunet":
        return TransUNet(preset, n_classes)
    # MONAI's networks load in about 2 s; a Flower ClientApp, started afresh for every message, builds TransUNets only.
    from monai.networks.nets import SegResNet, SwinUNETR, UNet

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
    elif arch == "resunet":
        model = SegResNet(
            spatial_dims=2,
            init_filters=preset.unet_channels[0],
            in_channels=preset.in_channels,
            out_channels=n_classes,
            blocks_down=(1, 2, 2, 4),
            blocks_up=(1, 1, 1),
            norm="INSTANCE",
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
