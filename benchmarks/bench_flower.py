"""The same small federation in the simulator and over a real SuperLink + SuperNodes on 127.0.0.1.

    python benchmarks/bench_flower.py --algorithms fedavg fedefm --rounds 3

For each algorithm: ``fedefm pretrain`` in-process, then the Flower apps over a loopback SuperLink
and one SuperNode per silo (data-layout "corpus": silo k holds the simulator's partition k), both
with dropout 0 and the same seed. Prints whether the metrics rows and global weights agree, the mean
wall time per round of each and Flower's overhead, and the bytes per round: the simulator's
peer-to-peer accounting (``bytes_sent``), the payload the relay sent and received (``relay_bytes``),
and the traffic Flower's SuperLink counted for the whole run (query messages included) over rounds.
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

from fedefm.config import PretrainConfig
from fedefm.data.synth import write_pretrain_corpus
from fedefm.federated.flower.deploy import LoopbackFederation
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


def main() -> None:
    """Run both drivers per algorithm and print one comparison line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["fedavg", "fedefm"])
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs and logs here (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        corpus = out / "corpus"
        if not corpus.exists():
            write_pretrain_corpus(corpus, per_class=args.per_class, size=args.image_size, seed=args.seed)
        settings = dict(silos=args.silos, rounds=args.rounds, batch_size=8, image_size=args.image_size, eval_every=1,
                        local_steps=1, dropout=0.0, seed=args.seed)
        federation = LoopbackFederation(out / "federation", corpus, silos=args.silos, env={"OMP_NUM_THREADS": "1"})
        try:
            for algorithm in args.algorithms:
                simulated = out / f"simulator_{algorithm}"
                run(PretrainConfig(data=corpus, out=simulated, algorithm=algorithm, **settings), progress=False,
                    overwrite=True)
                flower = out / f"flower_{algorithm}"
                started = time.perf_counter()
                record = federation.run({
                    "algorithm": algorithm, "silos": args.silos, "rounds": args.rounds, "batch-size": 8,
                    "image-size": args.image_size, "eval-every": 1, "local-steps": 1, "dropout": 0.0,
                    "seed": args.seed, "data": str(corpus), "out": str(flower), "overwrite": True,
                    "reply-timeout": 600,
                })
                total_s = time.perf_counter() - started
                a, b = rows(simulated), rows(flower)
                agree = [{k: r[k] for k in COMPARED} for r in a] == [{k: r[k] for k in COMPARED} for r in b]
                sim_s, flower_s = np.mean([r["wall_s"] for r in a]), np.mean([r["wall_s"] for r in b])
                traffic = record["network-traffic"]["total-bytes"]
                print(f"{algorithm}: metrics {'identical' if agree else 'DIFFER'}, global weights "
                      f"{'identical' if same_weights(simulated, flower) else 'DIFFER'}; "
                      f"wall per round simulator {sim_s:.2f} s, Flower {flower_s:.2f} s "
                      f"(+{flower_s - sim_s:.2f} s, x{flower_s / sim_s:.1f}); whole Flower run {total_s:.0f} s; "
                      f"bytes per round: simulator accounting {a[0]['bytes_sent'] / 1e6:.2f} MB, "
                      f"relay payload {np.mean([r['relay_bytes'] for r in b]) / 1e6:.2f} MB, "
                      f"SuperLink traffic {traffic / args.rounds / 1e6:.2f} MB")
        finally:
            federation.stop()


if __name__ == "__main__":
    main()
