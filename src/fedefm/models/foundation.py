"""The dense foundation model: the whole TransUNet body with a segmentation head and a reconstruction head.

Dense pre-training objectives (federated/objectives/) train it; ``finetune --init`` then loads every
tensor whose name and shape match into the downstream TransUNet, the decoder included.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fedefm.models.presets import Preset
from fedefm.models.segmenters import TransUNet

PARTS = ("segmentation", "reconstruction", "representation")


class DenseFoundation(TransUNet):
    """TransUNet over the hybrid encoder whose decoder ends in two heads: label logits and the reconstructed image.

    Tensor names are TransUNet's (``encoder.*``, ``decoder.*``, ``segmentation_head.*``) plus
    ``reconstruction_head.*``, so a downstream TransUNet takes the body as it is.
    """

    def __init__(self, preset: Preset, n_classes: int) -> None:
        super().__init__(preset, n_classes)
        self.reconstruction_head = nn.Conv2d(preset.decoder_channels[-1], 1, kernel_size=3, padding=1)

    def forward(self, x: Tensor, parts: Sequence[str] | None = None) -> Tensor | dict[str, Tensor]:
        """Images x (B, 1, H, W) → label logits (B, n_classes, H, W); with ``parts``, those outputs by name.

        "segmentation" (B, n_classes, H, W), "reconstruction" (B, 1, H, W) and "representation" (B, D), the
        mean encoder token, all from one pass through encoder and decoder.
        """
        tokens, grid, skips = self.encoder(x)
        decoded = self.decoder(tokens, grid, skips, x)  # (B, C_last, H, W)
        if parts is None:
            return self.segmentation_head(decoded)
        heads = {"segmentation": self.segmentation_head, "reconstruction": self.reconstruction_head}
        return {name: tokens.mean(dim=1) if name == "representation" else heads[name](decoded) for name in parts}

    def features(self, x: Tensor) -> Tensor:
        """Dense features U of images x (B, 1, H, W) → (B, D, H/16, W/16), the input to FedEFM's EMD weights."""
        return self.encoder.token_map(x)
