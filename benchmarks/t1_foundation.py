"""Foundation accuracy at 100% unseen: centralized, FedAvg, D-PSGD, MATCHA and FedEFM on the same silos.

    python benchmarks/pretrain_accuracy.py --out bench_out/pretrain              # 3 seeds, 150 rounds
    python benchmarks/pretrain_accuracy.py --out bench_out/pretrain --tables     # tables of every recorded run
    python benchmarks/pretrain_accuracy.py --quick --out bench_out/pretrain_q    # seconds
    python benchmarks/pretrain_accuracy.py --out bench_out/ablate --algorithms fedefm \\
        --variant literal:update=literal --variant beta05:beta=0.5            # FedEFM readings / ablations

Every run: 6 silos, one data type each (unseen = 1), Gaia ring (star for FedAvg), the same rounds,
local steps, batch and learning rate. Reported per algorithm, mean ± std over seeds: test accuracy
of the final global model (the test split is scored once, at the end), the validation accuracy
smoothed over the last 5 evaluations, the first round whose 3-evaluation moving average of
validation accuracy reaches 95% of centralized's final one, and the cost: gradient steps and bytes
per round, cycle time. A second table gives validation accuracy at equal gradient steps and at equal
bytes, since FedEFM does more work per round.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fedefm.config import PretrainConfig, parse_settings
from fedefm.demo import synthetic_data
from fedefm.federated.simulator import run

DEFAULT_ALGORITHMS = ["centralized", "fedavg", "dpsgd", "matcha", "fedefm"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (1 lets two runs share 2 cores)")
    parser.add_argument("--algorithms", nargs="*", default=DEFAULT_ALGORITHMS, help="none: run only the --variant runs")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:key=value,key=value — an extra FedEFM configuration to run under NAME")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--local-steps", type=int, default=2, help="E, the same for every algorithm")
    parser.add_argument("--silos", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--variant-seeds", nargs="+", type=int, default=[0], help="seeds of the --variant runs")
    parser.add_argument("--tables", action="store_true", help="only print the tables of OUT/results.jsonl")
    parser.add_argument("--quick", action="store_true", help="seconds: 1 seed, 4 rounds, 32 px")
    return parser.parse_args()


def parse_variant(text: str) -> tuple[str, dict]:
    """'beta05:beta=0.5,update=ours' → ("beta05", {"beta": 0.5, "update": "ours"})."""
    name, _, settings = text.partition(":")
    return name, parse_settings([pair for pair in settings.split(",") if pair])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.rounds, args.per_class, args.size = [0], 4, 10, 32
    results_path = args.out / "results.jsonl"
    if args.tables:
        print_tables(read_results(results_path))
        return
    corpus = synthetic_data(args.out / "corpus", "pretrain", 0, per_class=args.per_class, size=args.size)
    runs = [(name, name, {}, args.seeds) for name in args.algorithms]
    runs += [(name, "fedefm", options, args.variant_seeds) for name, options in map(parse_variant, args.variant)]
    for name, algorithm, options, seeds in runs:
        for seed in seeds:
            out = args.out / "runs" / f"{name}_s{seed}"
            cfg = PretrainConfig(data=corpus, out=out, algorithm=algorithm, silos=args.silos, unseen=1.0,
                                 rounds=args.rounds, local_steps=args.local_steps, image_size=args.size, eval_every=5 if not args.quick else 1,
                                 checkpoint_every=args.rounds, options=options, seed=seed,
                                 topology="matcha" if algorithm == "matcha" else None)
            summary = run(cfg, progress=False)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            with open(results_path, "a") as f:
                f.write(json.dumps({"name": name, "seed": seed, "options": options, "summary": summary, "rows": rows}) + "\n")
            print(f"{name:14s} seed {seed}: test {summary['test_acc']:.3f}, val (last 5) {summary['final_val_acc']:.3f}",
                  flush=True)
    print_tables(read_results(results_path))


def read_results(path: Path) -> list[dict]:
    """Every run recorded in OUT/results.jsonl, including those of earlier invocations."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def curve(rows: list[dict], key: str = "grad_steps") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rounds, cumulative key, validation accuracy) at the evaluated rounds."""
    cumulative = np.cumsum([r[key] for r in rows])
    evaluated = [(r["round"], cumulative[i], r["val_acc"]) for i, r in enumerate(rows) if r["val_acc"] is not None]
    return tuple(np.array(column) for column in zip(*evaluated))


def rounds_to_reach(rows: list[dict], target: float) -> int | None:
    """First evaluated round whose 3-evaluation moving average of validation accuracy reaches target."""
    rounds, _, acc = curve(rows)
    smooth = np.convolve(acc, np.ones(3) / 3, mode="valid")
    hits = np.nonzero(smooth >= target)[0]
    return int(rounds[hits[0] + 2]) if hits.size else None


def accuracy_at(rows: list[dict], key: str, budget: float) -> float:
    """Validation accuracy at the last evaluation whose cumulative ``key`` is within ``budget``."""
    _, spent, acc = curve(rows, key)
    within = np.nonzero(spent <= budget)[0]
    return float(acc[within[-1]]) if within.size else float("nan")


def mean_std(values: list[float]) -> str:
    """'mean ± std' (or '-' if nothing is defined)."""
    values = [v for v in values if v is not None and not np.isnan(v)]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"


def print_tables(results: list[dict]) -> None:
    """Markdown tables of the module docstring."""
    names = list(dict.fromkeys(r["name"] for r in results))
    by_name = {name: [r for r in results if r["name"] == name] for name in names}
    reference = by_name.get("centralized")
    target = 0.95 * np.mean([r["summary"]["final_val_acc"] for r in reference]) if reference else None
    print("\n| algorithm | test acc | val acc (last 5 evals) | rounds to 95% of centralized | grad steps/round "
          "| MB/round | cycle time (s) | seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in by_name.items():
        reach = [rounds_to_reach(r["rows"], target) if target else None for r in runs]
        reach_text = ", ".join("never" if x is None else str(x) for x in reach) if target else "-"
        rows = runs[0]["rows"]
        cycle = [r["cycle_time_s"] for r in rows if r["cycle_time_s"] is not None]
        cells = [
            mean_std([r["summary"]["test_acc"] for r in runs]),
            mean_std([r["summary"]["final_val_acc"] for r in runs]),
            reach_text,
            f"{np.mean([r['grad_steps'] for r in rows]):.0f}",
            f"{np.mean([r['bytes_sent'] for r in rows]) / 1e6:.1f}",
            f"{np.median(cycle):.3f}" if cycle else "-",
            str(len(runs)),
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    step_budget = min(r["summary"]["grad_steps"] for r in results)
    byte_runs = [r for r in results if r["summary"]["bytes_sent"] > 0]
    byte_budget = min(r["summary"]["bytes_sent"] for r in byte_runs) if byte_runs else 0
    print(f"\n| algorithm | val acc at {step_budget} gradient steps | val acc at {byte_budget / 1e9:.2f} GB sent |")
    print("|---|---|---|")
    for name, runs in by_name.items():
        at_bytes = mean_std([accuracy_at(r["rows"], "bytes_sent", byte_budget) for r in runs]) if byte_runs and \
            runs[0]["summary"]["bytes_sent"] > 0 else "-"
        print(f"| {name} | {mean_std([accuracy_at(r['rows'], 'grad_steps', step_budget) for r in runs])} | {at_bytes} |")


if __name__ == "__main__":
    main()
