"""Centralised training on pooled data: the upper bound the federated algorithms are measured against.

The driver gives this algorithm a single silo that holds every training image; it takes the same
E local steps per round as every silo of a federated run, so a round makes as many sequential steps
as a round of FedAvg (whose S silos compute S x E gradients in parallel): compare by round, and by
gradient steps with the benchmarks' second table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedefm.federated.algorithms.base import Facts, Links, LocalTraining, RoundPlan, home_tasks
from fedefm.federated.algorithms.fedavg import local_update, mix

__all__ = ["FACTS", "Config", "round_plan", "local_update", "mix"]

# The overlay is never used (one silo); any but MATCHA's is accepted, as a run's topology is recorded.
FACTS = Facts(topologies=("star", "ring", "mst", "complete"), pooled=True)


@dataclass(frozen=True)
class Config(LocalTraining):
    """Pooled-data training with the shared local-training settings."""


def round_plan(links: Links, counts: Sequence[int], rng: np.random.Generator, cfg: Config) -> RoundPlan:
    """The one silo updates its model; nothing travels."""
    return RoundPlan(home_tasks(1), [[]], np.ones((1, 1)), "server", None, transfers=0)
