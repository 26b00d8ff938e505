"""FedEFM (Do et al., ICRA 2025): overseas experts and EMD-weighted multishot distillation.

One round, for every silo i (paper Algorithm 1):

1. overseas experts (eq. 1, ``overseas_expert``): for each neighbour j of i, a copy of θ_i trains
   ``expert_steps`` SGD steps at silo j on j's data with the objective's loss and comes back as θ̂_{i→j};
2. EMD weights (eq. 3, ``expert_weights``): on a batch of i's data, the dense features of θ_i and of each
   θ̂_{i→j} are compared by EMD with cosine cost; the flow-weighted similarity s_ij becomes w_ij
   (normalised over j);
3. the update of θ_i (``local_update``): θ_i trains at home on the multishot loss
   Σ_j w_ij [β T² KL(θ̂_{i→j} ‖ θ_i) + (1 − β) CE(θ_i, y_i)] (eq. 2 with eq. 11; for a dense objective the
   KL is pixel-wise over the class maps), and the experts' knowledge also comes back in weight space,
   weighted by EMD, beside it: θ_i ← (1 − γ) θ_home + γ Σ_j w_ij θ̂_{i→j} — every model of the round
   trained on one silo's data, averaged as FedAvg averages, so no silo's own class gets the last word;
4. ``mix``: a gossip step θ_i ← Σ_j W_ij θ_j over the overlay, so knowledge travels more than one hop
   (an expert alone only brings back its host's data). The global model Θ is the mean of the silo
   models (the driver computes it for evaluation).

This is our reading, the default. The paper's other two readings are algorithms of their own, built
from the pieces here: ``fedefm_literal`` (eq. 2 as printed: distillation only, no parameters cross
silos) and ``fedefm_released`` (what the authors' released code does: neighbours' models adapted at
home and averaged, no EMD, no distillation).

Bytes per round: each model goes to every neighbour and back, then the gossip transfer (3 per link).
On a star the server relays each silo's model to ``shots`` other silos and averages (FedEFM client-server).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from fedefm.errors import ConfigError
from fedefm.federated import topology
from fedefm.federated.algorithms.base import (
    Facts,
    Links,
    LocalTraining,
    MixAt,
    RoundPlan,
    SiloState,
    Task,
    Weights,
    average_weights,
    mix_weights,
    sgd_steps,
)
from fedefm.federated.distill import DistillConfig, multishot_distillation_loss, neighbour_weights
from fedefm.federated.emd import emd_score_batch
from fedefm.federated.objectives import Batch
from fedefm.federated.objectives.base import Outputs, call_with

FACTS = Facts(topologies=("ring", "star", "mst", "complete"), relays_shots=True)
TRANSFERS_PER_LINK = 3  # there, back, and the gossip step


@dataclass(frozen=True)
class Overseas(LocalTraining):
    """Settings of an algorithm with overseas experts; the paper gives no values (reference §6).

    Attributes:
        expert_steps: SGD steps of an overseas expert at its host (eq. 1); 0 means local_steps.
    """

    expert_steps: int = 0

    def __post_init__(self) -> None:
        """Check every field; raise ConfigError naming it."""
        super().__post_init__()
        if self.expert_steps < 0:
            raise ConfigError("fedefm expert_steps must be >= 0 (0: use local_steps)")

    def steps(self, name: str) -> int:
        """expert_steps or distill_steps, with 0 read as local_steps."""
        return getattr(self, name) or self.local_steps


@dataclass(frozen=True)
class Distillation(Overseas):
    """Settings of the EMD-weighted multishot distillation (eq. 2, 3 and 11).

    Attributes:
        distill_steps: distillation steps at the home silo (eq. 2); 0 means local_steps.
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

    distill_steps: int = 0
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
        if self.distill_steps < 0:
            raise ConfigError("fedefm distill_steps must be >= 0 (0: use local_steps)")
        if self.emd_images < 1:
            raise ConfigError(f"fedefm emd_images {self.emd_images}: must be at least 1")
        self.distillation()

    def distillation(self) -> DistillConfig:
        """The distillation settings as distill.py takes them (validated there)."""
        return DistillConfig(beta=self.beta, temperature=self.temperature, weighting=self.weighting,
                             softmax_temperature=self.softmax_temperature)


@dataclass(frozen=True)
class Config(Distillation):
    """FedEFM settings (ours).

    Attributes:
        return_weight: γ, the share of the EMD-weighted experts beside the home model; 2/3 gives the home
            model and each of a ring's two experts the same share.
    """

    return_weight: float = 2 / 3

    def __post_init__(self) -> None:
        """Check every field; raise ConfigError naming it."""
        super().__post_init__()
        if not 0 <= self.return_weight <= 1:
            raise ConfigError(f"fedefm return_weight {self.return_weight}: must be in [0, 1]")


def overseas_expert(model: nn.Module, visitor: SiloState, host_batches: Iterator[Batch], cfg: Overseas) -> SiloState:
    """θ̂_{i→j}: silo i's model trained at host j on j's batches with the objective's loss (eq. 1: cross-entropy)."""
    steps = cfg.steps("expert_steps")
    weights, loss = sgd_steps(model, visitor.weights, host_batches, cfg, steps=steps)
    return SiloState(weights=weights, train_loss=loss, grad_steps=steps)


@torch.no_grad()
def emd_scores(model: nn.Module, student: Weights, experts: Sequence[SiloState], images: Tensor,
               cfg: Distillation) -> Tensor:
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


def expert_weights(model: nn.Module, state: SiloState, experts: Sequence[SiloState], batch: Batch,
                   cfg: Distillation) -> Tensor:
    """w_ij (J,): EMD scores normalised over the neighbours, or uniform for the ablation."""
    if cfg.uniform_weights:
        return torch.full((len(experts),), 1.0 / len(experts))
    scores = emd_scores(model, state.weights, experts, batch.images[: cfg.emd_images], cfg)
    return neighbour_weights(scores, cfg.weighting, cfg.softmax_temperature)


def distillation_loss(expert_outputs_fn, weights: Tensor, cfg: Distillation):
    """Loss function of eq. 2 with eq. 11 for sgd_steps: experts are frozen and evaluated on the same prepared batch."""
    distill, objective = cfg.distillation(), cfg.objective

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        batch = objective.prepare(batch)
        student = objective.outputs(model, batch)
        return multishot_distillation_loss(student, expert_outputs_fn(batch), batch, weights, distill, objective)

    return loss_fn


def frozen_outputs(model: nn.Module, experts: Sequence[SiloState], cfg: Distillation):
    """A function batch → [each expert's outputs on it], in eval mode and without gradients."""

    def outputs(batch: Batch) -> list[Outputs]:
        model.eval()
        with torch.no_grad():
            result = [cfg.objective.outputs(call_with(model, expert.weights), batch) for expert in experts]
        model.train()
        return result

    return outputs


def distilled(
    model: nn.Module, state: SiloState, batches: Iterator[Batch], experts: Sequence[SiloState], cfg: Distillation
) -> tuple[Weights, float, Tensor | None]:
    """θ_i after ``distill_steps`` steps of the multishot loss (eq. 2, 11): (weights, mean loss, w_ij (J,) or None).

    With no expert (every one dropped this round, federated/health.py) the home model learns from its
    own labels and w is None.
    """
    steps = cfg.steps("distill_steps")
    if not experts:
        return *sgd_steps(model, state.weights, batches, cfg, steps=steps), None
    batch = Batch(*next(batches))
    w = expert_weights(model, state, experts, batch, cfg)
    loss_fn = distillation_loss(frozen_outputs(model, experts, cfg), w, cfg)
    # chain, not a generator with `yield from`: closing that would close the silo's own batch stream.
    weights, loss = sgd_steps(model, state.weights, itertools.chain([batch], batches), cfg, loss_fn, steps=steps)
    return weights, loss, w


def local_update(
    model: nn.Module, state: SiloState, batches: Iterator[Batch], cfg: Config, trained: Sequence[SiloState] = ()
) -> SiloState:
    """Steps 2–3 at silo i: distil from its returned experts ``trained`` (θ̂_{i→j}), then average them back in.

    grad_steps counts the experts' steps too.
    """
    weights, loss, w = distilled(model, state, batches, trained, cfg)
    if w is not None:
        returned = average_weights([e.weights for e in trained], w.tolist())
        weights = average_weights([weights, returned], [1 - cfg.return_weight, cfg.return_weight])
    return replace(state, weights=weights, train_loss=loss,
                   grad_steps=cfg.steps("distill_steps") + sum(e.grad_steps for e in trained))


def mix(states: Sequence[SiloState], W: np.ndarray, cfg: Config) -> list[SiloState]:
    """Gossip over the overlay (or, on a star, the server's average)."""
    return mix_weights(states, W)


def expert_tasks(neighbours: Sequence[Sequence[int]]) -> list[Task]:
    """The round's tasks in the order one process runs them: for each silo i, its experts, then its home update.

    A deployment may run tasks of different silos at once; each silo must run its own tasks in this
    order, because they draw from the same batch stream.
    """
    tasks = []
    for i in range(len(neighbours)):
        tasks += [Task(silo=j, model=i, kind="expert", user=i) for j in neighbours[i]]
        tasks.append(Task(silo=i, model=i, kind="home", user=i))
    return tasks


def overseas_plan(links: Links, counts: Sequence[int], rng: np.random.Generator, round_tasks, mix_at: MixAt,
                  transfers_per_link: int) -> RoundPlan:
    """A round of overseas trips: this round's neighbours, ``round_tasks(neighbours)`` and the mixing matrix."""
    n = len(counts)
    if links.topology == "star":
        # Client-server FedEFM: the server relays each silo's model to `shots` other silos this round.
        neighbours = [sorted(rng.choice([j for j in range(n) if j != i], links.shots, replace=False).tolist())
                      for i in range(n)]
        # Each transfer is two hops through the server, plus the upload and download of the average.
        transfers = 2 * transfers_per_link * sum(map(len, neighbours)) + 2 * n
        return RoundPlan(round_tasks(neighbours), neighbours, topology.fedavg_matrix(counts), "server",
                         links.overlay, transfers, transfers_per_link)
    # Overseas trips (and gossip) go both ways round a ring, as in the released code (reference §6 row 11).
    undirected = links.overlay.to_undirected()
    neighbours = [topology.neighbours(undirected, i) for i in range(n)]
    return RoundPlan(round_tasks(neighbours), neighbours, topology.mixing_matrix(undirected), mix_at, links.overlay,
                     transfers_per_link * sum(map(len, neighbours)), transfers_per_link)


def round_plan(links: Links, counts: Sequence[int], rng: np.random.Generator, cfg: Config) -> RoundPlan:
    """Each silo's model visits its neighbours, comes home to distil, and the silos gossip (mixed at each silo)."""
    return overseas_plan(links, counts, rng, expert_tasks, "silos", TRANSFERS_PER_LINK)
