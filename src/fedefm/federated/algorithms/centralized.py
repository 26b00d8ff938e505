"""Centralised training on pooled data: the upper bound the federated algorithms are measured against.

The driver gives this algorithm a single silo that holds every training image; it takes the same
E local steps per round as every silo of a federated run, so a round makes as many sequential steps
as a round of FedAvg (whose S silos compute S x E gradients in parallel): compare by round, and by
gradient steps with the benchmarks' second table.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedefm.federated.algorithms.base import LocalTraining
from fedefm.federated.algorithms.fedavg import local_update, mix, run_round

EXCHANGE = "none"

__all__ = ["Config", "EXCHANGE", "local_update", "mix", "run_round"]


@dataclass(frozen=True)
class Config(LocalTraining):
    """Pooled-data training with the shared local-training settings."""
