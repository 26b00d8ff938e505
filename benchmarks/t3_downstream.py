"""Few-shot segmentation curve: test Dice / clDice per class for K labelled images, several seeds.

    python benchmarks/fewshot_curve.py --out bench_out/fewshot            # full: 4 domains, K 4/16/64, 3 seeds
    python benchmarks/fewshot_curve.py --quick --out bench_out/fewshot_q  # seconds: 1 domain, K 4, 1 seed

Every run selects its epoch on the validation split and is scored once on the test split.
Results go to OUT/results.jsonl (one row per run) and the table is printed as mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedefm.config import FinetuneConfig
from fedefm.data.synth import DOMAINS
from fedefm.demo import synthetic_data
from fedefm.finetune.evaluate import evaluate_model
from fedefm.finetune.train import run as finetune


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (1 lets two runs share 2 cores)")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS))
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 16, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=120, help="synthetic images per domain (all splits)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--init", default="scratch")
    parser.add_argument("--arch", default="transunet")
    parser.add_argument("--quick", action="store_true", help="1 domain, K = 4, 1 seed, 2 epochs")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.domains, args.shots, args.seeds, args.images, args.size, args.epochs = ["clinical"], [4], [0], 30, 64, 2
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    rows = []
    for domain in args.domains:
        data = synthetic_data(args.out / "data" / domain, "seg", 1000, domain=domain, n=args.images, size=args.size)
        for shots in args.shots:
            for seed in args.seeds:
                run = args.out / "runs" / f"{domain}_k{shots}_s{seed}"
                started = time.perf_counter()
                cfg = FinetuneConfig(data=data, out=run, init=args.init, arch=args.arch, shots=shots,
                                     epochs=args.epochs, image_size=args.size, seed=seed)
                selected = finetune(cfg, progress=False)
                test = evaluate_model(run, data, "test")
                row = {"domain": domain, "shots": shots, "seed": seed, "init": args.init, "arch": args.arch,
                       "best_epoch": selected["best_epoch"], "val_dice": selected["best_val"], "test": test,
                       "seconds": time.perf_counter() - started}
                rows.append(row)
                with open(results_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{domain:10s} K={shots:3d} seed={seed} test Dice {test['mean']['dice']:.3f} "
                      f"({row['seconds']:.0f} s)", flush=True)
    print_table(rows)


def mean_std(values: list[float | None]) -> str:
    """'mean ± std' of the defined values, '-' when there are none."""
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"


def print_table(rows: list[dict]) -> None:
    """Markdown table: one line per (domain, K), mean ± std over seeds."""
    print("\n| domain | K | catheter Dice | catheter clDice | guidewire Dice | guidewire clDice | mean Dice | seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for domain in dict.fromkeys(r["domain"] for r in rows):
        for shots in dict.fromkeys(r["shots"] for r in rows):
            group = [r["test"] for r in rows if r["domain"] == domain and r["shots"] == shots]
            cells = [mean_std([g["per_class"][c][m] for g in group])
                     for c in ("catheter", "guidewire") for m in ("dice", "cldice")]
            print(f"| {domain} | {shots} | " + " | ".join(cells) +
                  f" | {mean_std([g['mean']['dice'] for g in group])} | {len(group)} |")


if __name__ == "__main__":
    main()
