"""D-PSGD (Lian et al., 2017): local SGD, then gossip θ_i ← Σ_j W_ij θ_j with the overlay's mixing matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedefm.federated.algorithms.base import Facts, Links, LocalTraining, RoundPlan, gossip_plan
from fedefm.federated.algorithms.fedavg import local_update, mix

__all__ = ["FACTS", "Config", "round_plan", "local_update", "mix"]

FACTS = Facts(topologies=("ring", "star", "mst", "complete"))


@dataclass(frozen=True)
class Config(LocalTraining):
    """D-PSGD needs only the shared local-training settings; W comes from the overlay (ring by default)."""


def round_plan(links: Links, counts: Sequence[int], rng: np.random.Generator, cfg: Config) -> RoundPlan:
    """Local SGD, then gossip both ways along the overlay's links (a ring's as in the released code)."""
    return gossip_plan(links.overlay.to_undirected(), links.overlay)
