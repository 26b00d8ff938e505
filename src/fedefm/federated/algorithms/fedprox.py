"""FedProx (Li et al., 2020): FedAvg whose local loss adds μ/2 ‖θ − θ_global‖² against drift, to any objective."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from torch import Tensor, nn

from fedefm.errors import ConfigError
from fedefm.federated.algorithms.base import Facts, LocalTraining, SiloState, sgd_steps
from fedefm.federated.algorithms.fedavg import mix, round_plan
from fedefm.federated.objectives import Batch, Objective, local_loss

FACTS = Facts(topologies=("star",))

__all__ = ["FACTS", "Config", "round_plan", "local_update", "mix"]


@dataclass(frozen=True)
class Config(LocalTraining):
    """Attributes: mu: proximal strength μ ≥ 0 (0.01, the paper's common choice; μ = 0 is FedAvg)."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        """Check μ and the shared fields."""
        super().__post_init__()
        if self.mu < 0:
            raise ConfigError(f"fedprox mu {self.mu}: must be >= 0")


def proximal_loss(anchor: dict[str, Tensor], mu: float, objective: Objective):
    """Loss function: the objective's loss + μ/2 Σ ‖θ − anchor‖² (squared, as the FedProx paper writes it)."""

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        penalty = sum(((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters())
        return local_loss(objective, model, batch) + 0.5 * mu * penalty

    return loss_fn


def local_update(
    model: nn.Module, state: SiloState, batches: Iterator[Batch], cfg: Config, trained: Sequence[SiloState] = ()
) -> SiloState:
    """E steps of SGD on the objective's loss plus the proximal term, anchored at the model the silo received."""
    anchor = {name: tensor.detach() for name, tensor in state.weights.items()}
    weights, loss = sgd_steps(model, state.weights, batches, cfg, proximal_loss(anchor, cfg.mu, cfg.objective))
    return replace(state, weights=weights, train_loss=loss, grad_steps=cfg.local_steps)


