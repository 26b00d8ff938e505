"""MOON (Li, He and Song, CVPR 2021): FedAvg plus a model-contrastive loss on the representation.

The representation z is the encoder's mean token (the input of the classifier head). The local loss is
the objective's loss + μ ℓ_con with ℓ_con = −log( e^{sim(z, z_glob)/τ} / (e^{sim(z, z_glob)/τ} + e^{sim(z, z_prev)/τ}) ),
z_glob from the model the silo received this round and z_prev from the silo's own model of last round.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedefm.errors import ConfigError
from fedefm.federated.algorithms.base import Facts, LocalTraining, SiloState, sgd_steps
from fedefm.federated.algorithms.fedavg import mix, round_plan
from fedefm.federated.objectives import Batch, Objective
from fedefm.federated.objectives.base import call_with

FACTS = Facts(topologies=("star",))

__all__ = ["FACTS", "Config", "round_plan", "local_update", "mix"]


@dataclass(frozen=True)
class Config(LocalTraining):
    """Attributes: mu: weight of the contrastive term (1.0, MOON's default for CIFAR-10); tau: temperature (0.5)."""

    mu: float = 1.0
    tau: float = 0.5

    def __post_init__(self) -> None:
        """Check μ, τ and the shared fields."""
        super().__post_init__()
        if self.mu < 0 or self.tau <= 0:
            raise ConfigError(f"moon mu {self.mu} must be >= 0 and tau {self.tau} > 0")


def frozen_representation(model: nn.Module, weights: dict[str, Tensor], batch: Batch, objective: Objective) -> Tensor:
    """z (B, D) of a frozen model (``weights``) on the prepared batch, where the objective reads it."""
    with torch.no_grad():
        return objective.outputs(call_with(model, weights), batch)["representation"]


def contrastive_loss(global_weights: dict[str, Tensor], previous_weights: dict[str, Tensor], cfg: Config):
    """Loss function: the objective's loss + μ ℓ_con (module docstring); the global and previous models are frozen."""
    objective = cfg.objective

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        batch = objective.prepare(batch)
        outputs = objective.outputs(model, batch)
        z = outputs["representation"]  # (B, D)
        positive = F.cosine_similarity(z, frozen_representation(model, global_weights, batch, objective)) / cfg.tau
        negative = F.cosine_similarity(z, frozen_representation(model, previous_weights, batch, objective)) / cfg.tau
        con = -torch.log_softmax(torch.stack([positive, negative], dim=1), dim=1)[:, 0].mean()
        return objective.loss(outputs, batch) + cfg.mu * con

    return loss_fn


def local_update(
    model: nn.Module, state: SiloState, batches: Iterator[Batch], cfg: Config, trained: Sequence[SiloState] = ()
) -> SiloState:
    """E steps of SGD on the objective's loss + μ ℓ_con; remembers the result as next round's previous model."""
    received = {name: tensor.detach() for name, tensor in state.weights.items()}
    previous = state.memory.get("previous", received)
    weights, loss = sgd_steps(model, state.weights, batches, cfg, contrastive_loss(received, previous, cfg))
    return replace(state, weights=weights, memory={"previous": weights}, train_loss=loss, grad_steps=cfg.local_steps)


