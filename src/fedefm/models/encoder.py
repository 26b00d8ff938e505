"""Hybrid CNN+ViT encoder: TransUNet's ResNetV2 (StdConv + GroupNorm) then a ViT on stride-16 tokens."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedefm.errors import ConfigError
from fedefm.models.presets import Preset


def group_count(channels: int, most: int = 32) -> int:
    """Largest number of GroupNorm groups, at most ``most``, that divides ``channels``."""
    return next(g for g in range(min(most, channels), 0, -1) if channels % g == 0)


def group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (TransUNet's 32 wherever the width allows it)."""
    return nn.GroupNorm(group_count(channels), channels, eps=eps)


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (zero mean, unit variance per output filter), as in BiT / ResNetV2."""

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x`` (B, C_in, H, W) with the standardised weight; returns (B, C_out, H', W')."""
        variance, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        weight = (self.weight - mean) / torch.sqrt(variance + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Bottleneck(nn.Module):
    """ResNetV2 bottleneck as TransUNet builds it: (conv→GN→ReLU) x3 (1x1, strided 3x3, 1x1), projected residual."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = StdConv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.gn1 = group_norm(mid_channels)
        self.conv2 = StdConv2d(mid_channels, mid_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.gn2 = group_norm(mid_channels)
        self.conv3 = StdConv2d(mid_channels, out_channels, kernel_size=1, bias=False)
        self.gn3 = group_norm(out_channels)
        self.downsample: nn.Module | None = None
        self.gn_proj: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = StdConv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
            # TransUNet normalises the projection per channel (one group per channel).
            self.gn_proj = nn.GroupNorm(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, C_in, H, W) to (B, C_out, H/stride, W/stride)."""
        residual = x if self.downsample is None else self.gn_proj(self.downsample(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


def resnet_stage(in_channels: int, out_channels: int, units: int, stride: int) -> nn.Sequential:
    """One ResNetV2 stage: ``units`` bottlenecks of width out_channels/4, the first one strided."""
    mid = out_channels // 4
    first = Bottleneck(in_channels, out_channels, mid, stride)
    rest = [Bottleneck(out_channels, out_channels, mid) for _ in range(units - 1)]
    return nn.Sequential(OrderedDict((f"unit{i + 1}", unit) for i, unit in enumerate([first, *rest])))


class EncoderOutput(NamedTuple):
    """What the hybrid encoder returns.

    Attributes:
        tokens: (B, L, D) transformer output after the final LayerNorm, L = h·w.
        grid: (h, w) = (H/16, W/16), the token grid.
        skips: CNN feature maps at strides 8, 4, 2: (B, 8·width, H/8, W/8), (B, 4·width, H/4, W/4),
            (B, width, H/2, W/2), width = preset.stem_width (TransUNet's 512, 256, 64 for R50).
    """

    tokens: Tensor
    grid: tuple[int, int]
    skips: list[Tensor]


class HybridEncoder(nn.Module):
    """TransUNet's R50-ViT hybrid encoder, sized by a preset.

    ResNetV2 root (StdConv 7x7/2, GroupNorm, ReLU, maxpool 3x3/2), three stages of bottlenecks (stride 1, 2, 2) to
    a (B, 16·width, H/16, W/16) map, a 1x1 patch embedding to D = preset.hidden, learned position embeddings
    (no CLS token), dropout, and a pre-norm ``nn.TransformerEncoder`` with a final LayerNorm. No BatchNorm, so
    silos with different statistics can be averaged and batch size 1 trains.
    """

    def __init__(self, preset: Preset) -> None:
        super().__init__()
        self.preset = preset
        width = preset.stem_width
        self.root = nn.Sequential(
            OrderedDict(
                conv=StdConv2d(preset.in_channels, width, kernel_size=7, stride=2, padding=3, bias=False),
                gn=group_norm(width),
                relu=nn.ReLU(),
            )
        )
        # Padding 1 keeps every map at exactly H/4, H/8, H/16; TransUNet pads 0 and then zero-fills the skips.
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.body = nn.Sequential(
            OrderedDict(
                block1=resnet_stage(width, 4 * width, preset.block_units[0], stride=1),
                block2=resnet_stage(4 * width, 8 * width, preset.block_units[1], stride=2),
                block3=resnet_stage(8 * width, 16 * width, preset.block_units[2], stride=2),
            )
        )
        self.patch_embed = nn.Conv2d(16 * width, preset.hidden, kernel_size=1)
        self.position_embeddings = nn.Parameter(torch.zeros(1, preset.grid**2, preset.hidden))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        self.dropout = nn.Dropout(preset.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=preset.hidden,
            nhead=preset.heads,
            dim_feedforward=preset.mlp,
            dropout=preset.dropout,
            activation="gelu",
            layer_norm_eps=1e-6,
            batch_first=True,
            norm_first=True,
        )
        # torch uses one dropout rate for attention and residuals; the ViT config keeps attention's separate.
        layer.self_attn.dropout = preset.attention_dropout
        self.transformer = nn.TransformerEncoder(
            layer, preset.layers, norm=nn.LayerNorm(preset.hidden, eps=1e-6), enable_nested_tensor=False
        )

    def position_grid(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings for an (h, w) token grid: (1, h·w, D), bilinearly resized from the preset's grid."""
        side = self.preset.grid
        if grid == (side, side):
            return self.position_embeddings
        square = self.position_embeddings.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        resized = F.interpolate(square, size=grid, mode="bilinear", align_corners=False)  # (1, D, h, w)
        return resized.flatten(2).transpose(1, 2)  # (1, h·w, D)

    def forward(self, x: Tensor) -> EncoderOutput:
        """Encode images x: (B, in_channels, H, W), H and W multiples of 16, into tokens and CNN skips.

        Raises:
            ConfigError: the channel count differs from the preset or H, W are not multiples of 16.
        """
        B, C, H, W = x.shape
        if C != self.preset.in_channels:
            raise ConfigError(
                f"input has {C} channels but preset {self.preset.name!r} expects {self.preset.in_channels}; "
                "convert the images to grey"
            )
        if H % 16 or W % 16:
            raise ConfigError(
                f"input is {H}x{W} but the encoder needs sides that are multiples of 16 (stride 16); "
                f"resize to e.g. {max(16, H // 16 * 16)}x{max(16, W // 16 * 16)}"
            )
        stride2 = self.root(x)  # (B, width, H/2, W/2)
        stride4 = self.body.block1(self.pool(stride2))  # (B, 4·width, H/4, W/4)
        stride8 = self.body.block2(stride4)  # (B, 8·width, H/8, W/8)
        stride16 = self.body.block3(stride8)  # (B, 16·width, H/16, W/16)
        grid = (H // 16, W // 16)
        tokens = self.patch_embed(stride16).flatten(2).transpose(1, 2)  # (B, L, D)
        tokens = self.dropout(tokens + self.position_grid(grid))
        return EncoderOutput(self.transformer(tokens), grid, [stride8, stride4, stride2])

    def token_map(self, x: Tensor) -> Tensor:
        """Dense feature map U of images x: (B, in_channels, H, W) → (B, D, H/16, W/16), the tokens on their grid."""
        tokens, (h, w), _ = self(x)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
