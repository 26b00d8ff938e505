"""The round, written once, and the round loop every driver shares.

A round: the algorithm's plan (``round_plan``: tasks as data, the mixing matrix and where it mixes),
its tasks through an executor, the health check of federated/health.py, the mix, then one metrics row.
An executor runs a plan's work somewhere: ``simulator.InProcess`` in this process, ``relay.FlowerSilos``
as waves of Flower messages. Both return each silo's state after its home update and the faults of
the silos that failed; everything else about the round happens here, the same for both.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from fedefm.federated import topology
from fedefm.federated.algorithms.base import Links, MixAt, NonFiniteLoss, SiloState, Task, mean_weights
from fedefm.federated.config import PretrainConfig
from fedefm.federated.health import Fault, TooFewHealthySilos, check_quorum, renormalise
from fedefm.federated.objectives import Objective
from fedefm.federated.silo_data import ImageSource
from fedefm.files import append_jsonl
from fedefm.memory import peak_rss_mb

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Where a round's work runs: in this process (simulator.InProcess) or at the silos (relay.FlowerSilos)."""

    def train(self, round_: int, tasks: list[Task], states: list[SiloState]) -> tuple[list[SiloState], list[Fault]]:
        """Run ``tasks`` in order on the round-start ``states``: each silo's state after its home update, and the
        faults (a silo whose own update failed keeps its round-start state with 0 gradient steps)."""

    def mix(self, mix_at: MixAt, updated: list[SiloState], start: list[SiloState], W: np.ndarray
            ) -> tuple[list[SiloState], list[Fault]]:
        """The algorithm's ``mix`` of ``updated`` by W, where ``mix_at`` says; a silo that fails its part keeps
        its round-start state from ``start``."""

    def round_metrics(self) -> dict:
        """What the executor measured in the round just run, for its metrics row (empty in-process)."""


def score(objective: Objective, model: torch.nn.Module, weights: dict[str, torch.Tensor], source: ImageSource) -> float:
    """The objective's validation score (accuracy, Dice, PSNR, ...) of ``weights`` on every item of ``source``."""
    model.load_state_dict(weights)
    return objective.score(model, source)


# Scores the mean of the silos' weights and, when asked (True), each silo's own: (global, per silo or None);
# None where nothing could be scored. The simulator scores here (``scored_here``), a Flower relay may ask the silos.
Evaluate = Callable[[list[SiloState], bool], tuple[float | None, list[float | None] | None]]


def scored_here(objective: Objective, model: torch.nn.Module, source: ImageSource) -> Evaluate:
    """An Evaluate that scores on ``source`` in this process, with ``model``'s architecture."""

    def evaluate(states: list[SiloState], own: bool) -> tuple[float, list[float] | None]:
        global_score = score(objective, model, mean_weights(states), source)
        return global_score, [score(objective, model, s.weights, source) for s in states] if own else None

    return evaluate


def train_rounds(cfg: PretrainConfig, algorithm, algo_cfg, model: torch.nn.Module, states: list[SiloState],
                 executor: Executor, rng: np.random.Generator, val: Evaluate | None, first_round: int = 1,
                 save: Callable[[int, list[SiloState]], None] | None = None, last_good: str = "",
                 progress: bool = True) -> list[SiloState]:
    """Run rounds ``first_round`` … ``cfg.rounds``; each: plan, tasks, health check, mix, checks, metrics row, evaluation.

    Args:
        algorithm: the algorithm's module (federated/algorithms/), whose ``round_plan`` says what a round does.
        executor: runs each round's tasks and mix (simulator.InProcess, or relay.FlowerSilos over Flower).
        val: scores on the validation images (``scored_here`` or at the silos), or None to leave the score null.
        save: writes a checkpoint after a round (every cfg.checkpoint_every rounds and the last).
        last_good: where the last good state is, appended to the message of an error that stops the run.

    Raises:
        TooFewHealthySilos: fewer than ``cfg.min_healthy_silos`` silos came through a round's tasks or mix.
        NonFiniteLoss: a silo's weights became NaN or infinite.
    """
    out = Path(cfg.out)
    n = len(states)
    model_size = topology.model_bytes(model)
    underlay = topology.get_underlay(cfg.underlay)
    overlay = topology.build_overlay(cfg.topology, underlay, max(n, 2), 0.0, model_size) if n > 1 else None
    matchings = topology.matcha_matchings(overlay.to_undirected()) if cfg.topology == "matcha" and overlay else None
    links = Links(cfg.topology, overlay, matchings, cfg.shots)
    objective = algo_cfg.objective
    val_key = f"val_{objective.metric}"
    val_score: float | None = math.nan
    with Progress(TextColumn(f"pretrain {cfg.algorithm} {objective.name}"), BarColumn(),
                  TextColumn("round {task.completed}/{task.total}"), TextColumn("{task.fields[status]}"),
                  TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("rounds", total=cfg.rounds, completed=first_round - 1, status="")
        for round_ in range(first_round, cfg.rounds + 1):
            started = time.perf_counter()
            plan = algorithm.round_plan(links, [s.num_examples for s in states], rng, algo_cfg)
            try:
                updated, faults = executor.train(round_, plan.tasks, states)
                check_quorum(faults, n, cfg.min_healthy_silos, round_)
                excluded = {f.silo for f in faults if f.host is None}
                W = renormalise(plan.W, [i not in excluded for i in range(n)])
                states, mix_faults = executor.mix(plan.mix_at, updated, states, W)
                faults += mix_faults
                check_quorum(faults, n, cfg.min_healthy_silos, round_)
            except TooFewHealthySilos as exc:
                raise TooFewHealthySilos(f"{exc}. {last_good}".rstrip()) from exc
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(f"round {round_}, {exc}. {last_good}".rstrip()) from exc
            for fault in faults:
                log.warning("round %d, silo %d: %s", round_, fault.silo, fault.reason)
            compute_s = (time.perf_counter() - started) / n
            for i, state in enumerate(states):
                if not all(torch.isfinite(t).all() for t in state.weights.values() if t.is_floating_point()):
                    raise NonFiniteLoss(f"round {round_}, silo {i}: non-finite weights; lower --lr. {last_good}".rstrip())
            excluded = {f.silo for f in faults if f.host is None}
            row = {
                "round": round_,
                "train_loss": float(np.mean([s.train_loss for i, s in enumerate(states) if i not in excluded])),
                "grad_steps": int(sum(s.grad_steps for s in states)),
                "bytes_sent": int(plan.transfers * model_size),
                "cycle_time_s": cycle_time(plan.graph, underlay, compute_s, plan.transfers_per_link * model_size),
                "excluded": [f.to_dict() for f in faults if f.host is None],
                "dropped_experts": [f.to_dict() for f in faults if f.host is not None],
                val_key: None,
                f"silo_{val_key}": None,
            } | executor.round_metrics()
            if val is not None and (round_ % cfg.eval_every == 0 or round_ == cfg.rounds):
                val_score, own = val(states, n > 1)
                row[val_key] = val_score
                row[f"silo_{val_key}"] = own if n > 1 else [val_score]
            row["wall_s"] = time.perf_counter() - started
            row["peak_rss_mb"] = peak_rss_mb()
            append_jsonl(out / "metrics.jsonl", row)
            if save is not None and (round_ % cfg.checkpoint_every == 0 or round_ == cfg.rounds):
                save(round_, states)
            shown = "-" if val_score is None else f"{val_score:.3f}"
            bar.update(task, completed=round_, status=f"{val_key.replace('_', ' ')} {shown}")
    return states


def cycle_time(graph, underlay, compute_s: float, transfer_bytes: int) -> float | None:
    """Marfoq's cycle time of this round's graph with the measured compute time (None without links)."""
    if graph is None:
        return None
    server = graph.graph.get("server")
    return topology.cycle_time(topology.delay_graph(graph, underlay, compute_s, transfer_bytes, server=server))
