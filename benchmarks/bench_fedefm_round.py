"""Cost of one FedEFM round against one D-PSGD round, and the peak memory of a paper-size round.

    python benchmarks/bench_fedefm_round.py --part breakdown   # tiny preset, 6 silos, ring, 64 px
    python benchmarks/bench_fedefm_round.py --part memory      # paper preset, 11 Gaia silos, ring, 256 px

breakdown: wall time of a FedEFM round and of a D-PSGD round on the same silos and batches, with
FedEFM's time split into overseas training, EMD, home training (distillation) and mixing. The phases
are timed by wrapping the functions the in-process executor and ``fedefm.local_update`` call; the rest
is bookkeeping.
memory: peak resident memory (ru_maxrss) of a process that builds 11 silos of the paper preset and
runs one FedEFM round on them (each silo's model, its two experts while they exist, the scratch model).
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fedefm.data.datasets import find_classification_splits
from fedefm.data.synth import write_pretrain_corpus
from fedefm.federated import topology
from fedefm.federated.algorithms import dpsgd, fedefm
from fedefm.federated.algorithms.base import Links, SiloState
from fedefm.federated.silo_data import ImageSource, SiloData
from fedefm.federated.simulator import InProcess
from fedefm.models.heads import Classifier
from fedefm.models.presets import get_preset

PHASES = {"overseas training": "overseas_expert", "EMD": "emd_scores", "mixing": "mix_weights"}


def build_silos(corpus: Path, n_silos: int, size: int, batch_size: int) -> tuple[list[SiloData], int]:
    """One data type per silo (silo k holds class k mod C), decoded at ``size``."""
    splits, classes = find_classification_splits(corpus, seed=0, val_fraction=0.1, test_fraction=0.1)
    silos = []
    for k in range(n_silos):
        items = [item for item in splits["train"] if item.label == k % len(classes)]
        source = ImageSource(items, size, in_memory=True, device=torch.device("cpu"))
        silos.append(SiloData(source, batch_size, torch.Generator().manual_seed(k)))
    return silos, len(classes)


def federation(preset: str, n_silos: int, size: int, per_class: int, batch_size: int):
    """Silos (one data type each), a scratch model of ``preset`` and its initial weights, seeded."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        write_pretrain_corpus(corpus, per_class=per_class, size=size, seed=0)
        silos, n_classes = build_silos(corpus, n_silos, size, batch_size)
    torch.manual_seed(0)
    model = Classifier(get_preset(preset), n_classes)
    return silos, model, {k: v.clone() for k, v in model.state_dict().items()}


def fresh_states(start: dict, n: int) -> list[SiloState]:
    """n silo states holding copies of the same initial weights."""
    return [SiloState(weights={k: v.clone() for k, v in start.items()}, num_examples=1) for _ in range(n)]


def timed_round(module, model, states, silos, links: Links, cfg, timers: dict | None = None) -> float:
    """Seconds of one round of ``module``'s plan in-process (tasks, then mix); with ``timers``, FedEFM's phases
    are accumulated into it."""
    originals = {}
    if timers is not None:
        for phase, name in PHASES.items():
            originals[name] = getattr(fedefm, name)
            setattr(fedefm, name, stopwatch(originals[name], timers, phase))
    try:
        started = time.perf_counter()
        plan = module.round_plan(links, [s.num_examples for s in states], np.random.default_rng(0), cfg)
        executor = InProcess(module, cfg, model, silos)
        updated, _ = executor.train(1, plan.tasks, states)
        executor.mix(plan.mix_at, updated, states, plan.W)
        return time.perf_counter() - started
    finally:
        for name, function in originals.items():
            setattr(fedefm, name, function)


def stopwatch(function, timers: dict, phase: str):
    """``function`` that adds its wall time to ``timers[phase]``."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timers[phase] += time.perf_counter() - started

    return wrapper


def ring(n: int) -> Links:
    """The Gaia ring over n silos; both algorithms send models both ways round it."""
    return Links("ring", topology.build_overlay("ring", topology.get_underlay("gaia"), n, 0.0, 0), None, 2)


def breakdown(repeats: int) -> None:
    """Print FedEFM vs D-PSGD round times on the tiny preset and FedEFM's phase breakdown."""
    silos, model, start = federation("tiny", 6, 64, per_class=40, batch_size=16)
    links = ring(6)
    results = defaultdict(list)
    phase_totals = defaultdict(list)
    for _ in range(repeats):
        states = fresh_states(start, len(silos))
        results["dpsgd"].append(timed_round(dpsgd, model, states, silos, links, dpsgd.Config()))
        timers = defaultdict(float)
        results["fedefm"].append(timed_round(fedefm, model, states, silos, links, fedefm.Config(), timers))
        for phase in PHASES:
            phase_totals[phase].append(timers[phase])
    fedefm_s, dpsgd_s = statistics.median(results["fedefm"]), statistics.median(results["dpsgd"])
    print(f"tiny preset, 6 silos on the Gaia ring, batch 16, 64x64, {torch.get_num_threads()} threads, "
          f"median of {repeats}")
    print(f"  D-PSGD round: {dpsgd_s:.3f} s   FedEFM round: {fedefm_s:.3f} s   ratio {fedefm_s / dpsgd_s:.2f}")
    accounted = 0.0
    for phase in PHASES:
        seconds = statistics.median(phase_totals[phase])
        accounted += seconds
        print(f"  {phase:18s} {seconds:.3f} s  ({seconds / fedefm_s:.1%} of the round)")
    home = fedefm_s - accounted
    print(f"  {'home training':18s} {home:.3f} s  ({home / fedefm_s:.1%}; distillation steps and the rest)")


def memory() -> None:
    """Print the peak RSS of one FedEFM round with 11 paper-preset silos on the Gaia ring."""
    silos, model, start = federation("paper", 11, 256, per_class=8, batch_size=2)
    states = fresh_states(start, len(silos))
    links = ring(11)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    seconds = timed_round(fedefm, model, states, silos, links, fedefm.Config(local_steps=1))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"paper preset ({topology.model_bytes(model) / 1e6:.1f} MB per model), 11 silos, Gaia ring, batch 2, "
          f"1 step each: round {seconds:.0f} s; peak RSS {before:.2f} GiB before the round, {peak:.2f} GiB after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("breakdown", "memory"), default="breakdown")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.part == "breakdown":
        breakdown(args.repeats)
    else:
        memory()


if __name__ == "__main__":
    main()
