"""What a pre-training objective is: a batch, the model's outputs on it, the local loss, distillation and a score.

Every algorithm (federated/algorithms/) trains through this seam and never looks inside a batch, so a new
objective is one module here plus one line in ``OBJECTIVES``. The five steps, in the order a round uses them:

* ``prepare(batch)``: draw the batch's own randomness once (MIM's patch masks), so a student and the experts
  that teach it see the same input;
* ``outputs(call, batch)``: what the model says on a prepared batch, by name; ``call(images, parts)`` is the
  model as a function (its own weights, or an expert's through ``torch.func.functional_call``);
* ``loss(outputs, batch)``: the supervised local loss, a () tensor that keeps the graph even when the
  batch holds nothing this objective learns from;
* ``soft(student, teacher, temperature)``: the expert term of FedEFM's multishot loss, (() tensor, its scale);
* ``score(model, source)``: the validation score of a model, higher is better; its name is ``metric``
  (metrics rows hold ``val_<metric>``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from torch import Tensor, nn
from torch.func import functional_call

from fedefm.models.presets import Preset

Outputs = dict[str, Tensor]
ModelCall = Callable[[Tensor, Sequence[str]], Outputs]


class Batch(NamedTuple):
    """One silo batch.

    Attributes:
        images: (B, 1, H, W) in [0, 1].
        labels: (B,) int64 data-type index of each image (the classification objective's target).
        masks: (B, H, W) int64 label ids (0: none of the image's annotated labels), or None for a corpus without masks.
        annotated: (B, L) bool, label l is annotated in image b (column 0, background, is always False), or None.
        inputs: (B, 1, H, W) the corrupted images an objective such as MIM reconstructs from, set by ``prepare``.
        hidden: (B, 1, H, W) 1 where ``prepare`` hid the pixel, set with ``inputs``.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor | None = None
    annotated: Tensor | None = None
    inputs: Tensor | None = None
    hidden: Tensor | None = None


class Objective(Protocol):
    """A pre-training objective (module docstring); implementations are frozen dataclasses of their settings."""

    name: str
    metric: str
    untrained_parts: tuple[str, ...]  # tensor-name prefixes it never trains, left out of the saved weights

    def build_model(self, preset: Preset, n_classes: int) -> nn.Module:
        """The model this objective trains; ``n_classes`` data types (classify) or labels (dense)."""

    def prepare(self, batch: Batch) -> Batch:
        """The batch with this objective's random corruption drawn (or the batch itself)."""

    def outputs(self, call: ModelCall, batch: Batch) -> Outputs:
        """The model's outputs on a prepared batch, by name; "representation" (B, D) always among them."""

    def loss(self, outputs: Outputs, batch: Batch) -> Tensor:
        """Local supervised loss, ()."""

    def soft(self, student: Outputs, teacher: Outputs, temperature: float) -> tuple[Tensor, float]:
        """The expert's distillation term () and the factor it is scaled by (T² for tempered softmax)."""

    def score(self, model: nn.Module, source) -> float:
        """Validation score of ``model`` (its weights loaded) on every image of ``source``; higher is better."""


def local_loss(objective: Objective, model: nn.Module, batch: Batch) -> Tensor:
    """The objective's local loss of ``model`` on ``batch`` (prepared here): ()."""
    batch = objective.prepare(batch)
    return objective.loss(objective.outputs(model, batch), batch)


def call_with(model: nn.Module, weights: dict[str, Tensor]) -> ModelCall:
    """``model`` as a function (images, parts) → outputs, with ``weights`` in place of its own (a frozen expert)."""

    def call(images: Tensor, parts: Sequence[str]) -> Outputs:
        return functional_call(model, weights, (images,), {"parts": parts})

    return call
