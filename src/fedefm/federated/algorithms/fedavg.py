"""FedAvg (McMahan et al., 2017): local SGD at every silo, then the example-weighted average everywhere."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from fedefm.federated.algorithms.base import Batch, LocalTraining, SiloState, local_then_mix, mix_weights, sgd_steps

EXCHANGE = "client_server"


@dataclass(frozen=True)
class Config(LocalTraining):
    """FedAvg needs only the shared local-training settings."""


def local_update(
    model: nn.Module, state: SiloState, batches: Iterator[Batch], cfg: Config, experts: Sequence[SiloState] | None = None
) -> SiloState:
    """E steps of SGD with cross-entropy on the silo's own batches."""
    weights, loss = sgd_steps(model, state.weights, batches, cfg)
    return replace(state, weights=weights, train_loss=loss, grad_steps=cfg.local_steps)


def mix(states: Sequence[SiloState], W: np.ndarray, cfg: Config) -> list[SiloState]:
    """Server average: every row of W is the normalised example counts, so every silo gets the same model."""
    return mix_weights(states, W)


run_round = local_then_mix(local_update, mix)
