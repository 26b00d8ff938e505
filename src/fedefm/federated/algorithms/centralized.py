"""Centralised training on pooled data: the upper bound the federated algorithms are measured against.

The driver gives this algorithm a single silo that holds every training image, and S x E gradient
steps per round (S the number of silos of the federated runs it is compared with), so a round costs
the same compute as a round of FedAvg over S silos.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedefm.federated.algorithms.base import LocalTraining
from fedefm.federated.algorithms.fedavg import local_update, mix, run_round

EXCHANGE = "none"

__all__ = ["Config", "EXCHANGE", "local_update", "mix", "run_round"]


@dataclass(frozen=True)
class Config(LocalTraining):
    """Pooled-data training; the driver sets local_steps to S x E (see the module docstring)."""
