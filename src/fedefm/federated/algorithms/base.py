"""What every federated algorithm shares: the silo state, local SGD, weight mixing, and the round plan.

An algorithm is a module the registry (``algorithms/__init__.py``) reads, as DESIGN.md §2 and STYLE.md §4
describe. It declares:

* ``FACTS``: the overlays it runs on (the first is its default) and whether it pools every image in one silo;
* ``Config``: its frozen settings, a subclass of ``LocalTraining``;
* ``round_plan(links, counts, rng, cfg) -> RoundPlan``: the round as plain data — the tasks (who trains
  which model on whose data, in the order one process runs them), the mixing matrix W and where the mix
  happens, and the model transfers it costs;
* ``local_update(model, state, batches, cfg, trained=()) -> SiloState``: a silo's update of its own model
  on its own data, given the models trained for it this round (``trained``: FedEFM's overseas experts).
  ``model`` is a scratch module of the right architecture: the function loads the state's weights into
  it, trains, and returns new weights; nothing else survives the call;
* ``mix(states, W, cfg) -> list[SiloState]``: the exchange, W the (S, S) row-stochastic mixing matrix;
* ``overseas_expert(model, visitor, host_batches, cfg) -> SiloState``, for an algorithm whose plan has
  "expert" tasks.

A driver runs the plan through an executor (federated/rounds.py): in-process or over Flower, the same
round. What a batch is and what the local loss is belong to the pre-training objective
(``cfg.objective``, federated/objectives/): algorithms wrap the objective's loss, they never compute one
of their own. Nothing here knows whether it runs in-process or over Flower, chooses a device, logs or
touches files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from fedefm.errors import ConfigError, FedefmError
from fedefm.federated import topology
from fedefm.federated.objectives import Batch, Objective, local_loss
from fedefm.federated.objectives.classify import Classify

Weights = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


class NonFiniteLoss(FedefmError, ArithmeticError):
    """A local loss became NaN or infinite; the message names the silo when the driver knows it."""


@dataclass
class SiloState:
    """What one silo keeps between rounds, and the scalars that travel with its weights.

    Attributes:
        weights: the silo's model, name → tensor.
        memory: what the algorithm carries between rounds (MOON's previous model, ...), name → weights.
        num_examples: training images at the silo (FedAvg's weight).
        train_loss: mean local loss of the last update.
        grad_steps: gradient steps taken in the last round (overseas training included).
    """

    weights: Weights
    memory: dict[str, Weights] = field(default_factory=dict)
    num_examples: int = 0
    train_loss: float = math.nan
    grad_steps: int = 0


@dataclass(frozen=True)
class LocalTraining:
    """Local SGD settings every algorithm shares.

    Attributes:
        lr: SGD learning rate (0.05: stable for the tiny preset from scratch with GroupNorm).
        local_steps: gradient steps per silo per round (E).
        momentum: SGD momentum; the optimizer is rebuilt each round, so momentum never crosses rounds.
        weight_decay: L2 penalty of SGD.
        grad_clip: global gradient-norm clip (a single-class silo's first steps can be large).
        objective: the pre-training objective (what a batch is, the local loss, distillation, the score).
    """

    lr: float = 0.05
    local_steps: int = 2
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    objective: Objective = field(default_factory=Classify)

    def __post_init__(self) -> None:
        """Check the shared fields; raise ConfigError naming the option."""
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: must be positive")
        if self.local_steps < 1:
            raise ConfigError(f"--local-steps {self.local_steps}: must be at least 1")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum {self.momentum}: must be in [0, 1)")


def clone_weights(model: nn.Module) -> Weights:
    """A detached copy of the model's parameters and buffers."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def sgd_steps(
    model: nn.Module, weights: Weights, batches: Iterator[Batch], cfg: LocalTraining, loss_fn: LossFn | None = None,
    steps: int | None = None,
) -> tuple[Weights, float]:
    """Train ``weights`` for ``steps`` (default cfg.local_steps) SGD steps; returns (new weights, mean loss).

    ``loss_fn(model, batch)`` defaults to the objective's local loss.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite; the weights passed in are untouched.
    """
    model.load_state_dict(weights)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    losses = []
    for step in range(cfg.local_steps if steps is None else steps):
        batch = Batch(*next(batches))
        loss = local_loss(cfg.objective, model, batch) if loss_fn is None else loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"local loss is {loss.item()} at step {step}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return clone_weights(model), float(np.mean(losses))


def average_weights(weights: Sequence[Weights], coefficients: Sequence[float]) -> Weights:
    """Σ_k c_k θ_k over floating-point tensors; integer buffers (counters) are taken from the first model."""
    if len(weights) != len(coefficients) or not weights:
        raise ValueError(f"{len(weights)} models and {len(coefficients)} coefficients; need one each, at least one")
    first = weights[0]
    if any(w.keys() != first.keys() for w in weights[1:]):
        raise ValueError("models to average hold different tensor names")
    mixed = {}
    for name, tensor in first.items():
        if tensor.is_floating_point():
            mixed[name] = sum(float(c) * w[name] for c, w in zip(coefficients, weights))
        else:
            mixed[name] = tensor.clone()
    return mixed


def mix_weights(states: Sequence[SiloState], W: np.ndarray) -> list[SiloState]:
    """Gossip/aggregation step θ_i ← Σ_j W_ij θ_j for every silo i; W (S, S) row-stochastic."""
    W = np.asarray(W, dtype=np.float64)
    if W.shape != (len(states), len(states)):
        raise ValueError(f"mixing matrix is {W.shape} for {len(states)} silos")
    if not np.allclose(W.sum(axis=1), 1.0) or (W < 0).any():
        raise ValueError("mixing matrix rows must be non-negative and sum to 1")
    mixed = []
    for i, state in enumerate(states):
        senders = [j for j in range(len(states)) if W[i, j] > 0]
        weights = average_weights([states[j].weights for j in senders], [W[i, j] for j in senders])
        mixed.append(replace(state, weights=weights))
    return mixed


def mix_row(mix: Callable, silo: int, received: Mapping[int, SiloState], row: Mapping[int, float], cfg) -> SiloState:
    """Silo ``silo``'s own result of an algorithm's ``mix``, from the models it received (itself included).

    For drivers where every silo mixes its own row: ``received`` and ``row`` hold the silos j with
    W_ij > 0. The other rows of the small matrix keep their model, so ``mix`` sums row ``silo`` over
    the same models in the same order as it does over all S silos.
    """
    senders = sorted(received)
    W = np.eye(len(senders))
    W[senders.index(silo)] = [row[j] for j in senders]
    return mix([received[j] for j in senders], W, cfg)[senders.index(silo)]


def mean_weights(states: Sequence[SiloState]) -> Weights:
    """The global model Θ = (1/S) Σ_i θ_i of the paper's step 4 (uniform over participating silos)."""
    return average_weights([s.weights for s in states], [1.0 / len(states)] * len(states))


def at_silo(silo: int, fn: Callable, *args, **kwargs):
    """Call ``fn``; a NonFiniteLoss it raises is re-raised naming ``silo``."""
    try:
        return fn(*args, **kwargs)
    except NonFiniteLoss as exc:
        raise NonFiniteLoss(f"silo {silo}: {exc}") from exc


@dataclass(frozen=True)
class Task:
    """One piece of a round's work, done at ``silo`` on its data.

    Attributes:
        silo: where the task runs (whose batches it draws).
        model: whose round-start model it trains.
        kind: "home" (the silo's own update of its own model, ``model == silo``) or "expert" (a copy of
            ``model``'s weights trained at ``silo``, FedEFM's eq. 1).
        user: the silo whose home update takes the trained expert: its owner, or the host itself.
    """

    silo: int
    model: int
    kind: str
    user: int


def home_tasks(n_silos: int) -> list[Task]:
    """The tasks of a round without overseas experts: every silo updates its own model."""
    return [Task(silo=i, model=i, kind="home", user=i) for i in range(n_silos)]


@dataclass(frozen=True)
class Facts:
    """What the registry, the config check and the drivers know of an algorithm before it runs.

    Attributes:
        topologies: the overlays it runs on (topology.OVERLAYS); the first is its default.
        pooled: it trains one silo holding every image (centralised learning), so it has no federation.
        relays_shots: on a star, the server relays each silo's model to ``--shots`` other silos.
    """

    topologies: tuple[str, ...]
    pooled: bool = False
    relays_shots: bool = False


@dataclass(frozen=True)
class Links:
    """The run's overlay, built once by the round loop; an algorithm draws each round's links from it.

    Attributes:
        topology: the overlay's name (``--topology``).
        overlay: its directed graph over the silos (topology.build_overlay); None for a single silo.
        matchings: MATCHA's disjoint matchings of the overlay, or None.
        shots: neighbours a star's server relays each FedEFM model to (``--shots``).
    """

    topology: str
    overlay: object | None
    matchings: list | None
    shots: int


MixAt = Literal["server", "silos", "nowhere"]


@dataclass(frozen=True)
class RoundPlan:
    """One round as plain data: tasks in the order one process runs them, then how the states mix.

    Attributes:
        tasks: the round's work; each silo runs its own tasks in this order (they share its batch stream).
        neighbours: silo i's neighbours this round (where its model travels, or whose models it mixes).
        W: (S, S) row-stochastic mixing matrix of ``mix``.
        mix_at: "server" (one place mixes every row), "silos" (each silo mixes its own row from the
            models it receives) or "nowhere" (``mix`` keeps every silo's model).
        graph: the graph the models travel on, for the cycle time; None for a single silo.
        transfers: model copies sent over links this round (bytes sent = transfers x model bytes).
        transfers_per_link: model transfers per (silo, neighbour) pair in the round, for the cycle time.
    """

    tasks: list[Task]
    neighbours: list[list[int]]
    W: np.ndarray
    mix_at: MixAt
    graph: object | None
    transfers: int
    transfers_per_link: int = 1


def client_server_plan(links: Links, counts: Sequence[int]) -> RoundPlan:
    """Every silo trains its own model and a server averages them by example count: S uploads, S downloads."""
    n = len(counts)
    return RoundPlan(home_tasks(n), [[] for _ in range(n)], topology.fedavg_matrix(counts), "server",
                     links.overlay, transfers=2 * n)


def gossip_plan(graph, travelled) -> RoundPlan:
    """Every silo trains its own model, then mixes it with its neighbours' on ``graph`` (undirected) by W.

    ``travelled`` is the graph the models travel on (the directed overlay, or the round's matchings).
    """
    n = graph.number_of_nodes()
    W = topology.mixing_matrix(graph)
    return RoundPlan(home_tasks(n), [topology.neighbours(graph, i) for i in range(n)], W, "silos", travelled,
                     transfers=int((W > 0).sum() - n))
