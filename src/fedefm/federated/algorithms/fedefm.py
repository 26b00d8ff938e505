"""FedEFM (Do et al., ICRA 2025): overseas experts and EMD-weighted multishot distillation.

One round, for every silo i (paper Algorithm 1; read ``run_round`` top to bottom):

1. overseas experts (eq. 1): for each neighbour j of i, a copy of θ_i trains ``expert_steps`` SGD steps
   at silo j on j's data with the objective's loss and comes back as θ̂_{i→j};
2. EMD weights (eq. 3): on a batch of i's data, the dense features of θ_i and of each θ̂_{i→j} are
   compared by EMD with cosine cost; the flow-weighted similarity s_ij becomes w_ij (normalised over j);
3. the update of θ_i, one of three readings (``Config.update``):

   * ``"literal"``: eq. 2 as printed: θ_i takes ``distill_steps`` steps on its own batches of the
     multishot loss Σ_j w_ij [β T² KL(θ̂_{i→j} ‖ θ_i) + (1 − β) CE(θ_i, y_i)] (eq. 11; for a dense
     objective the KL is pixel-wise over the class maps, so labels silo i never annotates arrive). No parameters
     cross silos, so θ_i only learns about other silos' classes through soft labels on its own
     images — which carry almost none (a probe stayed at chance with one class per silo).
   * ``"released"``: what the authors' released code does instead (reference §2.6): every
     neighbour's model trains at i on i's data and θ_i ← ½ θ_i + Σ_j ½|N(i)|⁻¹ θ_{j adapted at i},
     after one local step of θ_i. No EMD, no distillation.
   * ``"ours"`` (default): θ_i trains at home on the same multishot loss (the home model), and the
     experts' knowledge comes back in weight space, weighted by EMD, beside it:
     θ_i ← (1 − γ) θ_home + γ Σ_j w_ij θ̂_{i→j} — every model of the round trained on one silo's data,
     averaged as FedAvg averages, so no silo's own class gets the last word; then a gossip step
     θ_i ← Σ_j W_ij θ_j over the overlay, so knowledge travels more than one hop (an expert alone only
     brings back its host's data).

4. the global model Θ = mean of the silo models (the driver computes it for evaluation).

Bytes per round: literal and ours send each model to every neighbour and back (2 transfers per
link), ours adds the gossip transfer (3); released sends each model once per link (the adapted
neighbour models stay at the host).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from fedefm.errors import ConfigError, choose
from fedefm.federated.algorithms.base import (
    LocalTraining,
    SiloState,
    Task,
    Weights,
    average_weights,
    mix_weights,
    sgd_steps,
)
from fedefm.federated.distill import DistillConfig, multishot_distillation_loss, neighbour_weights
from fedefm.federated.emd import emd_score_batch
from fedefm.federated.health import RoundGuard
from fedefm.federated.objectives import Batch
from fedefm.federated.objectives.base import Outputs, call_with

EXCHANGE = "overseas"
UPDATES = ("ours", "literal", "released")
TRANSFERS_PER_LINK = {"ours": 3, "literal": 2, "released": 1}


@dataclass(frozen=True)
class Config(LocalTraining):
    """FedEFM settings; the paper gives none of these values (reference §6).

    Attributes:
        update: "ours", "literal" or "released" (module docstring).
        expert_steps: SGD steps of an overseas expert at its host (eq. 1); 0 means local_steps.
        distill_steps: distillation steps at the home silo (eq. 2); 0 means local_steps.
        return_weight: γ, the share of the EMD-weighted experts beside the home model ("ours"); 2/3 gives
            the home model and each of a ring's two experts the same share.
        beta: share of the expert (soft) term in eq. 11.
        temperature: distillation temperature T.
        weighting: how EMD scores become w_ij: "none", "sum" or "softmax" (see distill.neighbour_weights).
        softmax_temperature: τ for weighting="softmax".
        emd_grid: the token map is pooled to emd_grid × emd_grid nodes per image.
        emd_solver: "exact" (network simplex) or "sinkhorn".
        emd_weights: node masses, "uniform" or "cross_reference" (DeepEMD).
        emd_images: the EMD score of an expert is averaged over the first emd_images images of the
            home batch (4: the score is one scalar per expert, and the feature passes it needs would
            otherwise cost more than the rest of the EMD step).
        uniform_weights: ablation: ignore the EMD and weigh every expert equally.
    """

    update: str = "ours"
    expert_steps: int = 0
    distill_steps: int = 0
    return_weight: float = 2 / 3
    beta: float = 0.5
    temperature: float = 4.0
    weighting: str = "sum"
    softmax_temperature: float = 0.1
    emd_grid: int = 2
    emd_solver: str = "exact"
    emd_weights: str = "uniform"
    emd_images: int = 4
    uniform_weights: bool = False

    def __post_init__(self) -> None:
        """Check every field; raise ConfigError naming it."""
        super().__post_init__()
        choose("fedefm update", self.update, UPDATES)
        if self.expert_steps < 0 or self.distill_steps < 0:
            raise ConfigError("fedefm expert_steps and distill_steps must be >= 0 (0: use local_steps)")
        if self.emd_images < 1:
            raise ConfigError(f"fedefm emd_images {self.emd_images}: must be at least 1")
        if not 0 <= self.return_weight <= 1:
            raise ConfigError(f"fedefm return_weight {self.return_weight}: must be in [0, 1]")
        self.distillation()

    def distillation(self) -> DistillConfig:
        """The distillation settings as distill.py takes them (validated there)."""
        return DistillConfig(beta=self.beta, temperature=self.temperature, weighting=self.weighting,
                             softmax_temperature=self.softmax_temperature)

    def steps(self, name: str) -> int:
        """expert_steps or distill_steps, with 0 read as local_steps."""
        return getattr(self, name) or self.local_steps


def overseas_expert(model: nn.Module, visitor: SiloState, host_batches: Iterator[Batch], cfg: Config) -> SiloState:
    """θ̂_{i→j}: silo i's model trained at host j on j's batches with the objective's loss (eq. 1: cross-entropy)."""
    steps = cfg.steps("expert_steps")
    weights, loss = sgd_steps(model, visitor.weights, host_batches, cfg, steps=steps)
    return SiloState(weights=weights, train_loss=loss, grad_steps=steps)


@torch.no_grad()
def emd_scores(model: nn.Module, student: Weights, experts: Sequence[SiloState], images: Tensor, cfg: Config) -> Tensor:
    """EMD score s_ij (J,) between the student's and each expert's dense features on images (B, 1, H, W)."""
    model.load_state_dict(student)
    model.eval()
    student_map = model.features(images)  # (B, D, h, w)
    scores = []
    for expert in experts:
        model.load_state_dict(expert.weights)
        scores.append(emd_score_batch(student_map, model.features(images), cfg.emd_grid,
                                      weights=cfg.emd_weights, solver=cfg.emd_solver))
    return torch.stack(scores)


def expert_weights(model: nn.Module, state: SiloState, experts: Sequence[SiloState], batch: Batch, cfg: Config) -> Tensor:
    """w_ij (J,): EMD scores normalised over the neighbours, or uniform for the ablation."""
    if cfg.uniform_weights:
        return torch.full((len(experts),), 1.0 / len(experts))
    scores = emd_scores(model, state.weights, experts, batch.images[: cfg.emd_images], cfg)
    return neighbour_weights(scores, cfg.weighting, cfg.softmax_temperature)


def distillation_loss(expert_outputs_fn, weights: Tensor, cfg: Config):
    """Loss function of eq. 2 with eq. 11 for sgd_steps: experts are frozen and evaluated on the same prepared batch."""
    distill, objective = cfg.distillation(), cfg.objective

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        batch = objective.prepare(batch)
        student = objective.outputs(model, batch)
        return multishot_distillation_loss(student, expert_outputs_fn(batch), batch, weights, distill, objective)

    return loss_fn


def frozen_outputs(model: nn.Module, experts: Sequence[SiloState], cfg: Config):
    """A function batch → [each expert's outputs on it], in eval mode and without gradients."""

    def outputs(batch: Batch) -> list[Outputs]:
        model.eval()
        with torch.no_grad():
            result = [cfg.objective.outputs(call_with(model, expert.weights), batch) for expert in experts]
        model.train()
        return result

    return outputs


def local_update(
    model: nn.Module, state: SiloState, batches: Iterator[Batch], cfg: Config,
    experts: Sequence[SiloState] = (), visitors: Sequence[SiloState] = (),
) -> SiloState:
    """Step 2–3 at silo i: EMD weights of its returned experts, then the update named by cfg.update.

    Args:
        experts: θ̂_{i→j}, silo i's model trained at each neighbour j (eq. 1).
        visitors: θ_j adapted at silo i, each neighbour's model trained on i's data (the released code).
    """
    if cfg.update == "released":
        own, own_loss = sgd_steps(model, state.weights, batches, cfg)
        weights = own
        if visitors:
            half = 0.5 / len(visitors)
            weights = average_weights([own, *(v.weights for v in visitors)], [0.5, *([half] * len(visitors))])
        return replace(state, weights=weights, train_loss=own_loss, grad_steps=cfg.local_steps)

    steps = cfg.steps("distill_steps")
    if not experts:
        # Every expert was dropped this round (federated/health.py): the home model learns from its own labels.
        weights, loss = sgd_steps(model, state.weights, batches, cfg, steps=steps)
        return replace(state, weights=weights, train_loss=loss, grad_steps=steps)
    batch = Batch(*next(batches))
    w = expert_weights(model, state, experts, batch, cfg)
    loss_fn = distillation_loss(frozen_outputs(model, experts, cfg), w, cfg)
    # chain, not a generator with `yield from`: closing that would close the silo's own batch stream.
    weights, loss = sgd_steps(model, state.weights, itertools.chain([batch], batches), cfg, loss_fn, steps=steps)
    if cfg.update == "ours":
        returned = average_weights([e.weights for e in experts], w.tolist())
        weights = average_weights([weights, returned], [1 - cfg.return_weight, cfg.return_weight])
    return replace(state, weights=weights, train_loss=loss, grad_steps=steps)


def mixes_neighbours(cfg: Config) -> bool:
    """Whether ``mix`` combines neighbours' models ("ours": gossip) or keeps each silo's own (literal, released)."""
    return cfg.update == "ours"


def mix(states: Sequence[SiloState], W: np.ndarray, cfg: Config) -> list[SiloState]:
    """"ours": gossip over the overlay; "literal" and "released" keep each silo's model as updated."""
    if mixes_neighbours(cfg):
        return mix_weights(states, W)
    return list(states)


def round_tasks(neighbours: Sequence[Sequence[int]], cfg: Config) -> list[Task]:
    """The round's tasks in the order one process runs them: for each silo i, its experts, then its home update.

    A deployment may run tasks of different silos at once; each silo must run its own tasks in this
    order, because they draw from the same batch stream.
    """
    tasks = []
    for i in range(len(neighbours)):
        if cfg.update == "released":
            tasks += [Task(silo=i, model=j, kind="expert", user=i) for j in range(len(neighbours)) if i in neighbours[j]]
        else:
            tasks += [Task(silo=j, model=i, kind="expert", user=i) for j in neighbours[i]]
        tasks.append(Task(silo=i, model=i, kind="home", user=i))
    return tasks


def home_update(
    model: nn.Module, state: SiloState, batches: Iterator[Batch], cfg: Config, trained: Sequence[SiloState]
) -> SiloState:
    """local_update with the experts trained for this silo this round; grad_steps counts theirs too."""
    if cfg.update == "released":
        new = local_update(model, state, batches, cfg, visitors=trained)
    else:
        new = local_update(model, state, batches, cfg, experts=trained)
    return replace(new, grad_steps=new.grad_steps + sum(e.grad_steps for e in trained))


def run_round(
    model: nn.Module, states: Sequence[SiloState], batches: Sequence[Iterator[Batch]],
    neighbours: Sequence[Sequence[int]], W: np.ndarray, cfg: Config, guard: RoundGuard | None = None,
) -> list[SiloState]:
    """One FedEFM round for every silo (Algorithm 1): the tasks of ``round_tasks`` in order, then ``mix``.

    Each task reads only round-k states, so the result is the parallel round's. An expert lives only
    until its user's home update: memory holds the S states, their updates and |N(i)| experts. ``guard``
    (federated/health.py) drops an expert whose host fails and excludes a silo whose own update fails;
    that silo keeps its previous state.
    """
    guard = guard or RoundGuard.strict(len(states))
    trained: dict[int, list[SiloState]] = {i: [] for i in range(len(states))}
    updated: list[SiloState] = list(states)
    for task in round_tasks(neighbours, cfg):
        visitor = states[task.model]
        if task.kind == "expert":
            expert = guard.call(task.model, visitor.weights, overseas_expert, model, visitor, batches[task.silo], cfg,
                                host=task.silo)
            if expert is not None:
                trained[task.user].append(expert)
        else:
            new = guard.call(task.silo, visitor.weights, home_update, model, visitor, batches[task.silo], cfg,
                             trained.pop(task.silo))
            updated[task.silo] = replace(visitor, grad_steps=0) if new is None else new
    return mix(updated, guard.mixing_matrix(W), cfg)
