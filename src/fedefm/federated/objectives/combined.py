"""A weighted sum of objectives, e.g. ``segment+mim``: masks where a silo has them, reconstruction everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fedefm.federated.objectives.base import Batch, ModelCall, Objective, Outputs
from fedefm.models.presets import Preset


@dataclass(frozen=True)
class Combined:
    """Σ_k weight_k · objective_k, each objective on its own input; scored by the first objective's score.

    The parts must build the same model (the dense ones share ``DenseFoundation``) and read different outputs.
    """

    parts: tuple[tuple[Objective, float], ...]

    @property
    def name(self) -> str:
        """'segment+mim', or with weights other than 1 'segment+mim*0.5'."""
        return "+".join(o.name if w == 1 else f"{o.name}*{w:g}" for o, w in self.parts)

    @property
    def metric(self) -> str:
        """The first part's metric: the score runs are compared by."""
        return self.parts[0][0].metric

    @property
    def untrained_parts(self) -> tuple[str, ...]:
        """Tensor prefixes no part trains."""
        return tuple(p for p in self.parts[0][0].untrained_parts if all(p in o.untrained_parts for o, _ in self.parts))

    def build_model(self, preset: Preset, n_classes: int) -> nn.Module:
        """The first part's model."""
        return self.parts[0][0].build_model(preset, n_classes)

    def prepare(self, batch: Batch) -> Batch:
        """Every part draws its own randomness, in order."""
        for objective, _ in self.parts:
            batch = objective.prepare(batch)
        return batch

    def outputs(self, call: ModelCall, batch: Batch) -> Outputs:
        """Every part's outputs; the first part's representation wins."""
        merged: Outputs = {}
        for objective, _ in reversed(self.parts):
            merged |= objective.outputs(call, batch)
        return merged

    def loss(self, outputs: Outputs, batch: Batch) -> Tensor:
        """Σ_k weight_k loss_k."""
        return sum(weight * objective.loss(outputs, batch) for objective, weight in self.parts)

    def soft(self, student: Outputs, teacher: Outputs, temperature: float) -> tuple[Tensor, float]:
        """Σ_k weight_k scale_k soft_k, already scaled."""
        total = 0.0
        for objective, weight in self.parts:
            soft, scale = objective.soft(student, teacher, temperature)
            total = total + weight * scale * soft
        return total, 1.0

    def score(self, model: nn.Module, source) -> float:
        """The first part's score."""
        return self.parts[0][0].score(model, source)
