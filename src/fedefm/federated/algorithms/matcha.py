"""MATCHA (Wang et al., 2019): D-PSGD whose mixing matrix each round comes from randomly activated matchings.

The driver draws the round's matchings with ``topology.sample_matcha_round(matchings, budget, rng)``
and passes that round's mixing matrix to ``mix``; the silo-side work is D-PSGD's.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedefm.errors import ConfigError
from fedefm.federated.algorithms.base import LocalTraining
from fedefm.federated.algorithms.fedavg import local_update, mix, run_round

EXCHANGE = "gossip"

__all__ = ["Config", "EXCHANGE", "local_update", "mix", "run_round"]


@dataclass(frozen=True)
class Config(LocalTraining):
    """Attributes: budget: probability that each matching is active in a round (0.5: half the links' traffic)."""

    budget: float = 0.5

    def __post_init__(self) -> None:
        """Check the budget and the shared fields."""
        super().__post_init__()
        if not 0 < self.budget <= 1:
            raise ConfigError(f"--budget {self.budget}: must be in (0, 1]")
