"""D-PSGD (Lian et al., 2017): local SGD, then gossip θ_i ← Σ_j W_ij θ_j with the overlay's mixing matrix."""

from __future__ import annotations

from dataclasses import dataclass

from fedefm.federated.algorithms.base import LocalTraining
from fedefm.federated.algorithms.fedavg import local_update, mix, run_round

EXCHANGE = "gossip"

__all__ = ["Config", "EXCHANGE", "local_update", "mix", "run_round"]


@dataclass(frozen=True)
class Config(LocalTraining):
    """D-PSGD needs only the shared local-training settings; W comes from the overlay (ring by default)."""
