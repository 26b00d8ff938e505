"""MATCHA (Wang et al., 2019): D-PSGD whose mixing matrix each round comes from randomly activated matchings.

Each round activates every matching of the overlay with probability ``budget``
(``topology.sample_matcha_round``) and gossips over the union; the silo-side work is D-PSGD's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedefm.errors import ConfigError
from fedefm.federated import topology
from fedefm.federated.algorithms.base import Facts, Links, LocalTraining, RoundPlan, gossip_plan
from fedefm.federated.algorithms.fedavg import local_update, mix

__all__ = ["FACTS", "Config", "round_plan", "local_update", "mix"]

FACTS = Facts(topologies=("matcha",))


@dataclass(frozen=True)
class Config(LocalTraining):
    """Attributes: budget: probability that each matching is active in a round (0.5: half the links' traffic)."""

    budget: float = 0.5

    def __post_init__(self) -> None:
        """Check the budget and the shared fields."""
        super().__post_init__()
        if not 0 < self.budget <= 1:
            raise ConfigError(f"--budget {self.budget}: must be in (0, 1]")


def round_plan(links: Links, counts: Sequence[int], rng: np.random.Generator, cfg: Config) -> RoundPlan:
    """Local SGD, then gossip over this round's randomly activated matchings."""
    graph = topology.sample_matcha_round(links.matchings, cfg.budget, rng)
    return gossip_plan(graph, graph)
