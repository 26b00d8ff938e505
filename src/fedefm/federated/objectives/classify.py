"""Data-type classification, the paper's pre-training objective: which source (data type) is this image from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedefm.federated.objectives.base import Batch, ModelCall, Outputs
from fedefm.models.heads import Classifier
from fedefm.models.presets import Preset


@dataclass(frozen=True)
class Classify:
    """Cross-entropy of the classifier's logits (B, C) against the data-type labels; validation top-1 accuracy."""

    name: str = "classify"
    metric: str = "acc"
    untrained_parts: tuple[str, ...] = ()

    def build_model(self, preset: Preset, n_classes: int) -> nn.Module:
        """The hybrid encoder with a linear head over ``n_classes`` data types."""
        return Classifier(preset, n_classes=n_classes)

    def prepare(self, batch: Batch) -> Batch:
        """Nothing random to draw."""
        return batch

    def outputs(self, call: ModelCall, batch: Batch) -> Outputs:
        """{"logits" (B, C), "representation" (B, D)} of the images."""
        return call(batch.images, ("logits", "representation"))

    def loss(self, outputs: Outputs, batch: Batch) -> Tensor:
        """L_c of the paper: cross-entropy of the logits against the labels (B,)."""
        return F.cross_entropy(outputs["logits"], batch.labels)

    def soft(self, student: Outputs, teacher: Outputs, temperature: float) -> tuple[Tensor, float]:
        """KL(softmax(z_T/T) ‖ softmax(z_S/T)) averaged over the batch, scaled by T² (Hinton et al.)."""
        return tempered_kl(student["logits"], teacher["logits"], temperature), temperature**2

    @torch.no_grad()
    def score(self, model: nn.Module, source, batch_size: int = 64) -> float:
        """Top-1 accuracy on every image of ``source``, ``batch_size`` images at a time."""
        model.eval()
        correct = 0
        for start in range(0, len(source), batch_size):
            index = torch.arange(start, min(start + batch_size, len(source)))
            logits = model(source.images(index))
            correct += (logits.argmax(1).cpu() == source.labels[index]).sum().item()
        return correct / max(1, len(source))


def tempered_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(z_T/T) ‖ softmax(z_S/T)) of logits (B, C) or (B, C, H, W): summed over C, averaged over positions.

    Raises:
        ValueError: the two shapes differ (student and expert must share the label list).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} differ from the student's "
                         f"{tuple(student_logits.shape)}; student and expert must share the class list")
    n_classes = student_logits.shape[1]
    student_log_soft = F.log_softmax(student_logits / temperature, dim=1).movedim(1, -1).reshape(-1, n_classes)
    teacher_log_soft = F.log_softmax(teacher_logits.detach() / temperature, dim=1).movedim(1, -1).reshape(-1, n_classes)
    return F.kl_div(student_log_soft, teacher_log_soft, reduction="batchmean", log_target=True)
