"""Multishot distillation loss: EMD-weighted knowledge distillation from overseas experts (paper eq. 11, eq. 2).

Eq. (11) sums the soft term over the experts and eq. (2) sums again over them with per-expert EMD
weights. We read the two as one loss (reference §2.3 "Ambiguity", §6 row 8): a per-expert term

    l_j = beta T^2 KL(softmax(z_T_j / T) || softmax(z_S / T)) + (1 - beta) CE(z_S, y)

(for a dense objective the KL is per pixel of the class maps, or the soft term is the squared difference
of two reconstructions; the objective says which, and what the hard term is)

and the student's loss sum_j w_j l_j, w_j the expert's EMD score after normalisation over the
neighbours. KL differs from eq. (11)'s soft cross-entropy by the teacher's entropy, a constant for the
student, so the gradients agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedefm.errors import ConfigError, choose
from fedefm.federated.objectives import Batch, Objective
from fedefm.federated.objectives.base import Outputs

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


def distillation_terms(soft: Tensor, scale: float, hard: Tensor, beta: float) -> Tensor:
    """One expert's term of eq. (11): beta · scale · soft + (1 - beta) · hard, all () tensors.

    Args:
        soft: the expert term (KL of tempered softmax for classify and segment, reconstruction MSE for mim).
        scale: its factor (T² for a tempered softmax: the soft gradients' scale stays independent of T).
        hard: the student's own supervised loss on silo i's batch.
        beta: share of the soft term, in [0, 1].
    """
    return beta * scale * soft + (1.0 - beta) * hard


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
    student: Outputs,
    teachers: Sequence[Outputs],
    batch: Batch,
    scores: Tensor,
    cfg: DistillConfig,
    objective: Objective,
) -> Tensor:
    """Student loss sum_j w_j l_j over the overseas experts (eq. 2 with eq. 11), for any objective.

    Args:
        student: the student's outputs on silo i's prepared batch (``objective.outputs``).
        teachers: J experts' outputs on the same batch, in the order of scores; detached.
        batch: the prepared batch (targets for the hard term).
        scores: (J,) EMD scores of the experts (emd_score_batch); turned into weights by cfg.weighting.
        cfg: beta, temperature and weighting.
        objective: says what the soft and the hard terms are.

    Returns:
        () loss; with weighting "sum" or "softmax" the hard-label term keeps weight 1 - beta.

    Raises:
        ValueError: if there are no experts, their count differs from len(scores), or shapes disagree.
    """
    if len(teachers) == 0:
        raise ValueError("teachers: no overseas experts; a silo without neighbours should train on its own loss instead")
    if scores.dim() != 1 or scores.shape[0] != len(teachers):
        raise ValueError(
            f"scores: shape {tuple(scores.shape)} does not match the {len(teachers)} experts "
            f"in teachers; pass one EMD score per expert"
        )
    weights = neighbour_weights(scores, cfg.weighting, cfg.softmax_temperature)  # (J,)
    # The hard term is built once per expert, as eq. (11) writes it: one graph node per term keeps the
    # gradient's summation order (and so the numbers) of the paper's loss.
    terms = torch.stack(
        [distillation_terms(*objective.soft(student, teacher, cfg.temperature), objective.loss(student, batch), cfg.beta)
         for teacher in teachers]
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
