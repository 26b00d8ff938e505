"""FedAvg (McMahan et al., 2017): local SGD at every silo, then the example-weighted average everywhere."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from fedefm.federated.algorithms.base import (
    Batch,
    Facts,
    Links,
    LocalTraining,
    RoundPlan,
    SiloState,
    client_server_plan,
    mix_weights,
    sgd_steps,
)

FACTS = Facts(topologies=("star",))


@dataclass(frozen=True)
class Config(LocalTraining):
    """FedAvg needs only the shared local-training settings."""


def round_plan(links: Links, counts: Sequence[int], rng: np.random.Generator, cfg: Config) -> RoundPlan:
    """Every silo updates its own model; the server averages them (client_server_plan)."""
    return client_server_plan(links, counts)


def local_update(
    model: nn.Module, state: SiloState, batches: Iterator[Batch], cfg: Config, trained: Sequence[SiloState] = ()
) -> SiloState:
    """E steps of SGD on the objective's loss on the silo's own batches (``trained`` is always empty)."""
    weights, loss = sgd_steps(model, state.weights, batches, cfg)
    return replace(state, weights=weights, train_loss=loss, grad_steps=cfg.local_steps)


def mix(states: Sequence[SiloState], W: np.ndarray, cfg: Config) -> list[SiloState]:
    """Server average: every row of W is the normalised example counts, so every silo gets the same model."""
    return mix_weights(states, W)
