"""Few-shot catheter position accuracy: K images per class, from scratch vs from pre-trained foundation weights.

    python benchmarks/position_fewshot.py --out bench_out/position --threads 1   # full: 4 inits, K 4/16/64, 3 seeds
    python benchmarks/position_fewshot.py --quick --out bench_out/position_q      # seconds: scratch, K 4, 1 seed

The task is ``fedefm synth position`` (4 classes: tip in the aortic arch, the descending aorta, a
supra-aortic branch, or a looped catheter), 64 px. A pre-trained init is
WEIGHTS/{INIT}_s{SEED}/global.safetensors, and fine-tuning seed s uses pre-training seed s. Every run
selects its epoch on the validation split and is scored once on the test split. Results go to
OUT/results.jsonl (one row per run) and the table is printed as mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedefm.config import FinetuneConfig
from fedefm.demo import synthetic_data
from fedefm.finetune.classify import run as finetune
from fedefm.finetune.evaluate import evaluate_model

DEFAULT_WEIGHTS = Path("/work/main/bench_out/pretrain/runs")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="folder of INIT_sSEED pre-training runs")
    parser.add_argument("--inits", nargs="+", default=["scratch", "fedefm", "centralized", "dpsgd"])
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 16, 64], help="K images per class")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=480, help="synthetic images in all (split over 4 classes)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="scratch only, K = 4, 1 seed, 1 epoch, 32 px")
    return parser.parse_args()


def init_weights(init: str, seed: int, weights: Path) -> str:
    """'scratch', or the global weights of pre-training run INIT_sSEED."""
    return init if init == "scratch" else str(weights / f"{init}_s{seed}" / "global.safetensors")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.inits, args.shots, args.seeds, args.images, args.size, args.epochs = ["scratch"], [4], [0], 48, 32, 1
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    data = synthetic_data(args.out / "data" / f"position_{args.size}", "position", 1000, n=args.images,
                          size=args.size)
    rows = []
    started_all = time.perf_counter()
    for init in args.inits:
        for shots in args.shots:
            for seed in args.seeds:
                run = args.out / "runs" / f"{init}_k{shots}_s{seed}"
                started = time.perf_counter()
                cfg = FinetuneConfig(data=data, out=run, init=init_weights(init, seed, args.weights), task="classify",
                                     shots=shots, epochs=args.epochs, image_size=args.size, seed=seed)
                selected = finetune(cfg, progress=False)
                test = evaluate_model(run, data, "test")
                row = {"init": init, "shots": shots, "seed": seed, "best_epoch": selected["best_epoch"],
                       "val_balanced_accuracy": selected["val"]["balanced_accuracy"], "test": test,
                       "size": args.size, "epochs": args.epochs, "seconds": time.perf_counter() - started}
                rows.append(row)
                with open(results_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{init:12s} K={shots:3d} seed={seed} test accuracy {test['accuracy']:.3f} "
                      f"({row['seconds']:.0f} s)", flush=True)
    print_table(rows)
    print(f"\n{len(rows)} runs in {time.perf_counter() - started_all:.0f} s")


def mean_std(values: list[float | None]) -> str:
    """'mean ± std' of the defined values, '-' when there are none."""
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"


def print_table(rows: list[dict]) -> None:
    """Markdown tables of test accuracy and macro F1: one line per init, one column per K, mean ± std over seeds."""
    shots = list(dict.fromkeys(r["shots"] for r in rows))
    for metric in ("accuracy", "macro_f1"):
        print("\n| init | " + " | ".join(f"K={k} {metric}" for k in shots) + " | seeds |")
        print("|---|" + "---|" * len(shots) + "---|")
        for init in dict.fromkeys(r["init"] for r in rows):
            cells = [mean_std([r["test"][metric] for r in rows if r["init"] == init and r["shots"] == k])
                     for k in shots]
            seeds = len({r["seed"] for r in rows if r["init"] == init})
            print(f"| {init} | " + " | ".join(cells) + f" | {seeds} |")


if __name__ == "__main__":
    main()
