"""Checkpoint overhead per round: bytes on disk, time to write (atomic, checksummed) and to verify and load.

    python benchmarks/bench_checkpoint.py                       # tiny preset, 6 silos, 64 px, D-PSGD and FedEFM
    python benchmarks/bench_checkpoint.py --preset small --silos 11

The checkpoint is the simulator's own (every silo's weights, RNG states in the metadata, SHA-256 over
all of it, temp file + fsync + rename); the round it is compared with is one D-PSGD and one FedEFM round
(ring, 2 local steps, batch 16) on the same silos, timed with bench_fedefm_round's helpers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_fedefm_round import federation, fresh_states, ring, timed_round

from fedefm.federated.algorithms import dpsgd, fedefm
from fedefm.federated.simulator import Checkpoint


def median_seconds(function, repeats: int) -> float:
    """Median wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--silos", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    silos, model, start = federation(args.preset, args.silos, args.size, per_class=24, batch_size=16)
    links = ring(args.silos)
    states = fresh_states(start, args.silos)
    generators = [silo.generator for silo in silos]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Checkpoint(Path(tmp), generators, rng)
        rounds = iter(range(1, 10**6))
        save_s = median_seconds(lambda: checkpoint.save(next(rounds), states), args.repeats)
        newest = checkpoint.store.paths()[-1]
        size = newest.stat().st_size
        load_s = median_seconds(checkpoint.load_latest, args.repeats)

    cfg = {"dpsgd": dpsgd.Config(local_steps=2), "fedefm": fedefm.Config(local_steps=2)}
    round_s = {name: median_seconds(lambda m=module, c=cfg[name]: timed_round(
        m, model, fresh_states(start, args.silos), silos, links, c), args.repeats)
        for name, module in (("dpsgd", dpsgd), ("fedefm", fedefm))}

    params = sum(v.numel() for v in start.values())
    print(f"{args.preset} preset, {params / 1e6:.2f} M parameters, {args.silos} silos, {args.size} px, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"checkpoint: {size / 2**20:.2f} MiB per checkpoint ({size / args.silos / 2**20:.2f} MiB per silo)")
    print(f"write (serialise + SHA-256 + fsync + rename): {save_s * 1e3:.1f} ms; verify + load: {load_s * 1e3:.1f} ms")
    for name, seconds in round_s.items():
        print(f"one {name} round: {seconds * 1e3:.0f} ms -> checkpointing every round adds "
              f"{100 * save_s / seconds:.1f}% to it")


if __name__ == "__main__":
    main()
