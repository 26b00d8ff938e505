"""Classification model for pretraining: the hybrid encoder and a linear head on the mean token."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from fedefm.models.encoder import HybridEncoder
from fedefm.models.presets import Preset


class Classifier(nn.Module):
    """Hybrid encoder + LayerNorm→Linear head on the mean of the tokens (the pretraining task: data type of an image).

    The released FedEFM code reads token 0 (its pool is 'cls' but there is no CLS token, so that is one image
    patch); the mean over tokens sees the whole image and is what we use.
    """

    arch = "classifier"

    def __init__(self, preset: Preset, n_classes: int) -> None:
        super().__init__()
        self.preset = preset
        self.n_classes = n_classes
        self.encoder = HybridEncoder(preset)
        self.head = nn.Sequential(
            OrderedDict(norm=nn.LayerNorm(preset.hidden, eps=1e-6), linear=nn.Linear(preset.hidden, n_classes))
        )

    def forward(self, x: Tensor, parts: Sequence[str] | None = None) -> Tensor | dict[str, Tensor]:
        """Classify images x: (B, in_channels, H, W); returns logits (B, n_classes).

        With ``parts`` (a subset of "logits", "representation") it returns those outputs by name from one
        pass: "representation" is the mean token (B, D) the head reads (MOON's z).
        """
        representation = self.encoder(x).tokens.mean(dim=1)  # (B, D)
        logits = self.head(representation)
        if parts is None:
            return logits
        return {name: {"logits": logits, "representation": representation}[name] for name in parts}

    def features(self, x: Tensor) -> Tensor:
        """Dense features U of images x: (B, in_channels, H, W) → (B, D, H/16, W/16), the input to the EMD weights."""
        return self.encoder.token_map(x)
