"""FedEFM as the paper prints eq. 2: the home model only distils from its returned experts.

The round is FedEFM's (fedefm.py) up to step 3: θ_i takes ``distill_steps`` steps on its own batches of
the multishot loss Σ_j w_ij [β T² KL(θ̂_{i→j} ‖ θ_i) + (1 − β) CE(θ_i, y_i)], and that is its update: no
parameters cross silos and nothing is mixed. So θ_i only learns about other silos' classes through soft
labels on its own images, which carry almost none (a probe stayed at chance with one class per silo).
Bytes per round: each model goes to every neighbour and back (2 transfers per link).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from fedefm.federated.algorithms.base import Batch, Facts, Links, RoundPlan, SiloState
from fedefm.federated.algorithms.fedefm import Distillation, distilled, expert_tasks, overseas_expert, overseas_plan

__all__ = ["FACTS", "Config", "round_plan", "local_update", "mix", "overseas_expert"]

FACTS = Facts(topologies=("ring", "star", "mst", "complete"), relays_shots=True)


@dataclass(frozen=True)
class Config(Distillation):
    """The distillation settings of FedEFM (fedefm.Distillation), without the weight-space return."""


def round_plan(links: Links, counts: Sequence[int], rng: np.random.Generator, cfg: Config) -> RoundPlan:
    """Each silo's model visits its neighbours and comes home to distil; nothing is mixed."""
    return overseas_plan(links, counts, rng, expert_tasks, "nowhere", transfers_per_link=2)


def local_update(
    model: nn.Module, state: SiloState, batches: Iterator[Batch], cfg: Config, trained: Sequence[SiloState] = ()
) -> SiloState:
    """Eq. 2: distil from the returned experts ``trained``; grad_steps counts their steps too."""
    weights, loss, _ = distilled(model, state, batches, trained, cfg)
    return replace(state, weights=weights, train_loss=loss,
                   grad_steps=cfg.steps("distill_steps") + sum(e.grad_steps for e in trained))


def mix(states: Sequence[SiloState], W: np.ndarray, cfg: Config) -> list[SiloState]:
    """Every silo keeps its model as updated."""
    return list(states)
