"""The same small federation in the simulator and over a real SuperLink + SuperNodes on 127.0.0.1, with and
without the silos' warm workers; per-message breakdown, worker memory, and the ratio to the simulator.

    python benchmarks/bench_flower.py --out benchmarks/results/flower --algorithms fedavg fedefm --rounds 2

For each mode and algorithm: ``fedefm pretrain`` in-process, then at once (under the same load) the Flower
apps over a loopback SuperLink and
one SuperNode per silo (data-layout "corpus": silo k holds the simulator's partition k), both with
dropout 0, the same seed and one torch thread. Each ``--modes`` entry is one federation: ``fresh``
starts bare ``flower-supernode``s (every message's ClientApp process imports torch and fedefm and
decodes the silo's images), ``worker`` starts ``fedefm flower supernode`` (the ClientApp forwards to
the silo's warm worker). One row per (mode, algorithm) goes to OUT/results.jsonl, and a line is printed:
whether metrics and global weights agree with the simulator, the mean wall time per round of each and
their ratio, the bytes per round (the simulator's accounting, the relay's payload, the SuperLink's
count), the per-message breakdown measured at the silos and the relay (relay.message_timing: dispatch,
start-up, compute, socket, return; mean ± sd over the run's messages) and, with workers, each worker's
resident memory (VmRSS, VmHWM). The load average is recorded: on a shared machine, say so.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import record

from fedefm.data.synth import write_pretrain_corpus
from fedefm.federated.config import PretrainConfig
from fedefm.federated.flower import wire
from fedefm.federated.flower.deploy import LoopbackFederation
from fedefm.federated.flower.relay import TIMING_KEYS
from fedefm.federated.simulator import run
from fedefm.models.weights import load_weights

COMPARED = ("round", "train_loss", "grad_steps", "val_acc", "silo_val_acc", "bytes_sent")


def rows(run_folder: Path) -> list[dict]:
    """The metrics rows of a run folder."""
    return [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    """Whether two global.safetensors hold bit-identical tensors."""
    wa, _ = load_weights(a / "global.safetensors")
    wb, _ = load_weights(b / "global.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def worker_memory_mb(federation: LoopbackFederation, silos: int) -> list[dict[str, float]]:
    """Each silo worker's resident memory now and at its peak (MB, /proc/PID/status VmRSS and VmHWM)."""
    memory = []
    for k in range(silos):
        path = wire.worker_socket_path(wire.default_worker_folder(), federation.address, k)
        pid = wire.call(path, {"op": "ping"})[0]["pid"]
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        memory.append({key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")})
    return memory


def message_breakdown(flower_rows: list[dict]) -> dict[str, list[float]]:
    """Mean and sd (over the run's messages, weighting each round by its count) of each message_timing column (s)."""
    counts = np.array([r["message_timing"]["messages"] for r in flower_rows], dtype=float)
    breakdown = {}
    for key in TIMING_KEYS:
        means = np.array([r["message_timing"][key] for r in flower_rows])
        mean = float(np.average(means, weights=counts))
        breakdown[key] = [mean, float(np.sqrt(np.average((means - mean) ** 2, weights=counts)))]
    return breakdown


def main() -> None:
    """Per mode, one federation; per algorithm, the simulator then Flower; one row and one printed line each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.jsonl")
    parser.add_argument("--algorithms", nargs="+", default=["fedavg", "fedefm"])
    parser.add_argument("--modes", nargs="+", default=["fresh", "worker"], choices=["fresh", "worker"])
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the SuperNodes' and workers' torch, as the simulator's here

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        write_pretrain_corpus(corpus, per_class=args.per_class, size=args.image_size, seed=args.seed)
        settings = dict(silos=args.silos, rounds=args.rounds, batch_size=8, image_size=args.image_size, eval_every=1,
                        local_steps=1, dropout=0.0, seed=args.seed)
        for mode in args.modes:
            federation = LoopbackFederation(work / f"federation_{mode}", corpus, silos=args.silos,
                                            env={"OMP_NUM_THREADS": "1"}, worker=mode == "worker")
            try:
                for algorithm in args.algorithms:
                    started, load = time.perf_counter(), os.getloadavg()[0]
                    simulated = work / f"simulator_{mode}_{algorithm}"  # just before its Flower run: the same load
                    run(PretrainConfig(data=corpus, out=simulated, algorithm=algorithm, **settings), progress=False)
                    flower = work / f"flower_{mode}_{algorithm}"
                    flower_record = federation.run({
                        "algorithm": algorithm, "silos": args.silos, "rounds": args.rounds, "batch-size": 8,
                        "image-size": args.image_size, "eval-every": 1, "local-steps": 1, "dropout": 0.0,
                        "seed": args.seed, "data": str(corpus), "out": str(flower), "overwrite": True,
                        "reply-timeout": 600})
                    a, b = rows(simulated), rows(flower)
                    sim_s, flower_s = float(np.mean([r["wall_s"] for r in a])), float(np.mean([r["wall_s"] for r in b]))
                    row = record(args.out, "flower", {
                        "mode": mode, "algorithm": algorithm, "silos": args.silos, "rounds": args.rounds,
                        "image_size": args.image_size, "seed": args.seed,
                        "metrics_identical": [{k: r[k] for k in COMPARED} for r in a]
                        == [{k: r[k] for k in COMPARED} for r in b],
                        "weights_identical": same_weights(simulated, flower),
                        "simulator_round_s": sim_s, "flower_round_s": flower_s, "ratio": flower_s / sim_s,
                        "simulator_bytes_per_round": a[0]["bytes_sent"],
                        "relay_bytes_per_round": float(np.mean([r["relay_bytes"] for r in b])),
                        "superlink_bytes_per_round": flower_record["network-traffic"]["total-bytes"] / args.rounds,
                        "message_s": message_breakdown(b),
                        "worker_memory_mb": worker_memory_mb(federation, args.silos) if mode == "worker" else None,
                        "load_average": [load, os.getloadavg()[0]],
                    }, started)
                    parts = ", ".join(f"{k.removesuffix('_s')} {m:.2f}±{s:.2f}" for k, (m, s) in row["message_s"].items())
                    rss = [m["VmRSS"] for m in row["worker_memory_mb"] or []]
                    memory = f"; worker RSS {', '.join(f'{mb:.0f}' for mb in rss)} MB" if rss else ""
                    print(f"{mode} {algorithm}: metrics {'identical' if row['metrics_identical'] else 'DIFFER'}, "
                          f"weights {'identical' if row['weights_identical'] else 'DIFFER'}; per round simulator "
                          f"{sim_s:.2f} s, Flower {flower_s:.2f} s (x{row['ratio']:.1f}); bytes per round "
                          f"{row['simulator_bytes_per_round'] / 1e6:.2f} / {row['relay_bytes_per_round'] / 1e6:.2f} / "
                          f"{row['superlink_bytes_per_round'] / 1e6:.2f} MB; per message (s): {parts}{memory}; "
                          f"load {load:.1f}", flush=True)
            finally:
                federation.stop()


if __name__ == "__main__":
    main()
