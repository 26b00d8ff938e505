"""Multishot distillation loss: EMD-weighted knowledge distillation from overseas experts (paper eq. 11, eq. 2).

Eq. (11) sums the soft term over the experts and eq. (2) sums again over them with per-expert EMD
weights. We read the two as one loss (reference §2.3 "Ambiguity", §6 row 8): a per-expert term

    l_j = beta T^2 KL(softmax(z_T_j / T) || softmax(z_S / T)) + (1 - beta) CE(z_S, y)

and the student's loss sum_j w_j l_j, w_j the expert's EMD score after normalisation over the
neighbours. KL differs from eq. (11)'s soft cross-entropy by the teacher's entropy, a constant for the
student, so the gradients agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedefm.errors import ConfigError, choose

NEIGHBOUR_WEIGHTINGS = ("none", "sum", "softmax")


@dataclass(frozen=True)
class DistillConfig:
    """Settings of the multishot distillation loss; the paper gives no values for any of them.

    Attributes:
        beta: share of the soft (expert) term against the hard-label term, in [0, 1]. 0.5 is the
            Hinton et al. default (reference §6 row 3; alternative 0.7 with T = 3).
        temperature: softmax temperature T > 0 for both student and expert. 4.0 is the Hinton
            default: soft enough that an expert's probabilities for classes silo i never sees (the
            unseen data types) are large enough to teach.
        weighting: how EMD scores become expert weights (see neighbour_weights). "sum" (scores
            clipped at 0, then summing to 1) keeps the loss on the scale of one expert's loss
            whatever the neighbour count, and ranks experts by the score as eq. (2) does.
        softmax_temperature: tau for weighting="softmax". Scores lie in [-1, 1]; tau = 0.1 turns
            a 0.1 gap between two experts' scores into a weight ratio of e.
    """

    beta: float = 0.5
    temperature: float = 4.0
    weighting: str = "sum"
    softmax_temperature: float = 0.1

    def __post_init__(self) -> None:
        """Check every field; raise ConfigError naming the option and the fix."""
        _check_beta_temperature(self.beta, self.temperature)
        choose("distillation weighting", self.weighting, NEIGHBOUR_WEIGHTINGS)
        _check_softmax_temperature(self.softmax_temperature)


def distillation_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, beta: float, temperature: float
) -> Tensor:
    """One expert's term of eq. (11): beta T^2 KL(expert || student, softened) + (1 - beta) CE(student, y).

    Args:
        student_logits: (B, C) student scores z_S on silo i's batch.
        teacher_logits: (B, C) expert scores z_T on the same batch; detached, the expert is frozen.
        labels: (B,) int64 class indices y of silo i's batch.
        beta: share of the soft term, in [0, 1].
        temperature: softmax temperature T > 0; T^2 keeps the soft gradients' scale independent of T.

    Returns:
        () loss, KL averaged over the batch ("batchmean") and CE averaged over the batch.

    Raises:
        ConfigError: if beta is outside [0, 1] or temperature <= 0.
        ValueError: if the shapes disagree.
    """
    _check_beta_temperature(beta, temperature)
    _check_logits(student_logits, teacher_logits, labels)
    student_log_soft = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    teacher_log_soft = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)  # (B, C)
    soft = F.kl_div(student_log_soft, teacher_log_soft, reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, labels)
    return beta * temperature**2 * soft + (1.0 - beta) * hard


def neighbour_weights(scores: Tensor, weighting: str, softmax_temperature: float = 0.1) -> Tensor:
    """Expert weights w_j from their EMD scores (eq. 2), detached from the graph.

    The paper does not say whether gradients flow through w into the student; we detach (reference
    §6 row 7): a differentiable w would let the student lower sum_j w_j l_j by moving its features
    away from the experts it disagrees with most, instead of learning from them.

    Args:
        scores: (J,) EMD scores of the J experts, in [-1, 1].
        weighting: "none" uses the scores as they are; "sum" clips them at 0 and divides by their
            sum (uniform when all are <= 0, so the student still learns from every expert);
            "softmax" takes softmax(scores / softmax_temperature).
        softmax_temperature: tau > 0 for "softmax".

    Returns:
        (J,) weights; for "sum" and "softmax" non-negative and summing to 1.

    Raises:
        ConfigError: for an unknown weighting or tau <= 0.
        ValueError: if scores is not a non-empty 1-D tensor of finite values.
    """
    choose("distillation weighting", weighting, NEIGHBOUR_WEIGHTINGS)
    _check_softmax_temperature(softmax_temperature)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores: expected a non-empty (J,) tensor, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"scores: EMD scores must be finite, got {scores.tolist()}")
    scores = scores.detach()
    if weighting == "none":
        return scores
    if weighting == "softmax":
        return torch.softmax(scores / softmax_temperature, dim=0)
    clipped = scores.clamp(min=0.0)
    total = clipped.sum()
    if total == 0:
        return torch.full_like(scores, 1.0 / scores.numel())
    return clipped / total


def multishot_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    labels: Tensor,
    scores: Tensor,
    cfg: DistillConfig,
) -> Tensor:
    """Student loss sum_j w_j l_j over the overseas experts (eq. 2 with eq. 11).

    Args:
        student_logits: (B, C) student scores on silo i's batch.
        teacher_logits: J tensors (B, C), each expert's scores on the same batch, in the order of scores.
        labels: (B,) int64 class indices of silo i's batch.
        scores: (J,) EMD scores of the experts (emd_score_batch); turned into weights by cfg.weighting.
        cfg: beta, temperature and weighting.

    Returns:
        () loss; with weighting "sum" or "softmax" the hard-label term keeps weight 1 - beta.

    Raises:
        ValueError: if there are no experts, their count differs from len(scores), or shapes disagree.
    """
    if len(teacher_logits) == 0:
        raise ValueError(
            "teacher_logits: no overseas experts; a silo without neighbours should train on "
            "plain cross-entropy instead"
        )
    if scores.dim() != 1 or scores.shape[0] != len(teacher_logits):
        raise ValueError(
            f"scores: shape {tuple(scores.shape)} does not match the {len(teacher_logits)} experts "
            f"in teacher_logits; pass one EMD score per expert"
        )
    weights = neighbour_weights(scores, cfg.weighting, cfg.softmax_temperature)  # (J,)
    terms = torch.stack(
        [
            distillation_terms(student_logits, teacher, labels, cfg.beta, cfg.temperature)
            for teacher in teacher_logits
        ]
    )  # (J,)
    return (weights.to(terms) * terms).sum()


def _check_beta_temperature(beta: float, temperature: float) -> None:
    """Raise ConfigError unless 0 <= beta <= 1 and temperature > 0."""
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"distillation beta {beta}: must lie in [0, 1]; try 0.5")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"distillation temperature {temperature}: must be a finite number > 0; try 4.0")


def _check_softmax_temperature(softmax_temperature: float) -> None:
    """Raise ConfigError unless the softmax weighting temperature is > 0."""
    if not (softmax_temperature > 0 and math.isfinite(softmax_temperature)):
        raise ConfigError(
            f"distillation softmax_temperature {softmax_temperature}: must be a finite number > 0; try 0.1"
        )


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> None:
    """Raise ValueError unless student (B, C), teacher (B, C) and labels (B,) agree."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits: expected (B, C), got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits: shape {tuple(teacher_logits.shape)} differs from student_logits "
            f"{tuple(student_logits.shape)}; student and expert must share the class list"
        )
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(
            f"labels: expected shape ({student_logits.shape[0]},) to match student_logits, got {tuple(labels.shape)}"
        )
