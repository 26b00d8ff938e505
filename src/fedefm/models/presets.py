"""Model sizes: every width, depth and count of the hybrid encoder, its decoder and the baselines, by name."""

from __future__ import annotations

from dataclasses import dataclass

from fedefm.errors import ConfigError, choose


@dataclass(frozen=True)
class Preset:
    """All sizes of one model family, as TransUNet's R50-ViT config holds them.

    Attributes:
        name: key in ``PRESETS``; stored in every weights file so a checkpoint is only loaded into its own size.
        image_size: side the position embeddings are learned for; other multiples of 16 interpolate them.
        in_channels: 1, because our images are grey. The paper repeats grey to 3 channels before its RGB stem;
            a 1-channel stem sees the same information with fewer weights.
        stem_width: channels of the ResNetV2 root (64 in R50); stage s has 4·2^s·stem_width output channels.
        block_units: bottleneck units per ResNetV2 stage; 3 stages take the map to stride 16.
        hidden: transformer width D.
        mlp: transformer feed-forward width.
        heads: attention heads (must divide ``hidden``).
        layers: transformer layers.
        dropout: dropout on embeddings, feed-forward and residual branches.
        attention_dropout: dropout on attention probabilities.
        decoder_head_channels: output of the decoder's first 3x3 conv on the token map (TransUNet's 512).
        decoder_channels: output channels of the 4 upsampling blocks (stride 16 → 1).
        n_skip: how many of the CNN skips (strides 8, 4, 2) the decoder concatenates.
        unet_channels: channels per level of the MONAI U-Net baseline.
        swin_feature_size: ``feature_size`` of the MONAI SwinUNETR baseline (a multiple of 12).
    """

    name: str
    image_size: int
    in_channels: int
    stem_width: int
    block_units: tuple[int, ...]
    hidden: int
    mlp: int
    heads: int
    layers: int
    dropout: float
    attention_dropout: float
    decoder_head_channels: int
    decoder_channels: tuple[int, ...]
    n_skip: int
    unet_channels: tuple[int, ...]
    swin_feature_size: int

    def __post_init__(self) -> None:
        """Refuse sizes the encoder or decoder cannot be built with."""
        problems = []
        if self.image_size % 16:
            problems.append(f"image_size {self.image_size} is not a multiple of 16")
        if len(self.block_units) != 3:
            problems.append(f"block_units {self.block_units} must have 3 stages (stride 16)")
        if self.hidden % self.heads:
            problems.append(f"heads {self.heads} does not divide hidden {self.hidden}")
        if len(self.decoder_channels) != 4:
            problems.append(f"decoder_channels {self.decoder_channels} must have 4 blocks (stride 16 → 1)")
        if not 0 <= self.n_skip <= 3:
            problems.append(f"n_skip {self.n_skip} must be 0, 1, 2 or 3")
        if self.swin_feature_size % 12:
            problems.append(f"swin_feature_size {self.swin_feature_size} is not a multiple of 12")
        if problems:
            raise ConfigError(f"preset {self.name!r}: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        """Side of the token grid at ``image_size`` (stride 16)."""
        return self.image_size // 16


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        # Trains in minutes on two CPU cores; used by tests and quick runs.
        Preset(
            name="tiny",
            image_size=128,
            in_channels=1,
            stem_width=16,
            block_units=(1, 1, 1),
            hidden=96,
            mlp=192,
            heads=4,
            layers=2,
            dropout=0.1,
            attention_dropout=0.0,
            decoder_head_channels=128,
            decoder_channels=(64, 32, 16, 8),
            n_skip=3,
            unet_channels=(16, 32, 64, 128),
            swin_feature_size=12,
        ),
        Preset(
            name="small",
            image_size=256,
            in_channels=1,
            stem_width=32,
            block_units=(2, 2, 2),
            hidden=256,
            mlp=512,
            heads=8,
            layers=4,
            dropout=0.1,
            attention_dropout=0.0,
            decoder_head_channels=256,
            decoder_channels=(128, 64, 32, 16),
            n_skip=3,
            unet_channels=(32, 64, 128, 256, 512),
            swin_feature_size=24,
        ),
        # The released FedEFM model: TransUNet's R50-ViT-B_16 with the authors' edits (MLP 1024, 8 heads,
        # 8 layers). Their downstream code defaults to n_skip 0; we use TransUNet's own 3 skips.
        Preset(
            name="paper",
            image_size=256,
            in_channels=1,
            stem_width=64,
            block_units=(3, 4, 9),
            hidden=768,
            mlp=1024,
            heads=8,
            layers=8,
            dropout=0.1,
            attention_dropout=0.0,
            decoder_head_channels=512,
            decoder_channels=(256, 128, 64, 16),
            n_skip=3,
            unet_channels=(64, 128, 256, 512, 1024),
            swin_feature_size=48,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``; an unknown name raises ConfigError with the closest known name."""
    return PRESETS[choose("--preset", name, PRESETS)]
