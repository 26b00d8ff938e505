"""FedEFM as the authors' released code runs it (reference §2.6): neighbours' models adapted at home.

Every neighbour's model trains at silo i on i's data (an "expert" task whose host and user are i), and
θ_i ← ½ θ_i + Σ_j ½|N(i)|⁻¹ θ_{j adapted at i}, after one local update of θ_i. No EMD, no distillation.
Bytes per round: each model goes to each neighbour once (the adapted models stay at the host).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from fedefm.federated.algorithms.base import (
    Batch,
    Facts,
    Links,
    RoundPlan,
    SiloState,
    Task,
    average_weights,
    sgd_steps,
)
from fedefm.federated.algorithms.fedefm import Overseas, overseas_expert, overseas_plan

__all__ = ["FACTS", "Config", "round_plan", "local_update", "mix", "overseas_expert"]

FACTS = Facts(topologies=("ring", "star", "mst", "complete"), relays_shots=True)


@dataclass(frozen=True)
class Config(Overseas):
    """The released code's settings: the shared local training and ``expert_steps`` of the visiting models."""


def visitor_tasks(neighbours: Sequence[Sequence[int]]) -> list[Task]:
    """For each silo i: its neighbours' models trained at i on i's data, then its own update (in this order)."""
    tasks = []
    for i in range(len(neighbours)):
        tasks += [Task(silo=i, model=j, kind="expert", user=i) for j in range(len(neighbours)) if i in neighbours[j]]
        tasks.append(Task(silo=i, model=i, kind="home", user=i))
    return tasks


def round_plan(links: Links, counts: Sequence[int], rng: np.random.Generator, cfg: Config) -> RoundPlan:
    """Each silo's model visits its neighbours and stays there to be averaged in; nothing else is mixed."""
    return overseas_plan(links, counts, rng, visitor_tasks, "nowhere", transfers_per_link=1)


def local_update(
    model: nn.Module, state: SiloState, batches: Iterator[Batch], cfg: Config, trained: Sequence[SiloState] = ()
) -> SiloState:
    """One local update of θ_i, then the half-and-half average with the visitors ``trained`` at i."""
    weights, loss = sgd_steps(model, state.weights, batches, cfg)
    if trained:
        half = 0.5 / len(trained)
        weights = average_weights([weights, *(v.weights for v in trained)], [0.5, *([half] * len(trained))])
    return replace(state, weights=weights, train_loss=loss,
                   grad_steps=cfg.local_steps + sum(v.grad_steps for v in trained))


def mix(states: Sequence[SiloState], W: np.ndarray, cfg: Config) -> list[SiloState]:
    """Every silo keeps its model as updated."""
    return list(states)
