"""What every table script shares: common flags, the machine record, one pre-training or fine-tuning run → one
result row in OUT/results.jsonl.

Each row a script appends holds its own columns (documented in the script) plus:
``table`` (T1..T6), ``machine`` (platform, CPU, cores, torch and python versions, torch threads),
``command`` (the exact command line) and ``wall_s`` (seconds this run took).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedefm import __version__
from fedefm.demo import synthetic_data
from fedefm.errors import DataError, FedefmError
from fedefm.federated.config import PretrainConfig
from fedefm.federated.simulator import run as pretrain
from fedefm.files import append_jsonl
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.evaluate import evaluate_model
from fedefm.finetune.train import run as finetune
from fedefm.results import read_results

RESULT_FILE = "results.jsonl"


def parser_for(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every table script takes: --out, --threads, --quick."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {RESULT_FILE}, runs/ and data")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 lets two runs share 2 cores)")
    parser.add_argument("--quick", action="store_true", help="seconds, for CI: tiny preset, 32 px, 1 seed, few rounds")
    parser.add_argument("--tables", action="store_true", help=f"only print the tables of OUT/{RESULT_FILE}")
    return parser


def cpu_name() -> str:
    """The CPU model as the kernel names it (platform.processor() is often empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where a result was measured: platform, CPU, cores, software versions and torch threads."""
    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fedefm": __version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def command_line() -> str:
    """The command that started this script, as typed at the repository root, quoted for pasting into a shell."""
    script = f"benchmarks/{Path(sys.argv[0]).name}"
    return " ".join(["python", script] + [shlex.quote(arg) for arg in sys.argv[1:]])


def record(out: Path, table: str, row: dict[str, Any], started: float) -> dict[str, Any]:
    """Append ``row`` plus table, machine, command and wall time to OUT/results.jsonl; return the full row."""
    full = row | {"table": table, "machine": machine(), "command": command_line(),
                  "wall_s": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    append_jsonl(out / RESULT_FILE, full)
    return full


def recorded(out: Path, key: Callable[[dict], tuple]) -> set[tuple]:
    """The keys of the runs already in OUT/results.jsonl (none when it does not exist yet)."""
    return {key(r) for r in read_results(out / RESULT_FILE)} if (out / RESULT_FILE).is_file() else set()


def pretrain_corpus(out: Path, per_class: int, size: int) -> Path:
    """The synthetic pre-training corpus (6 data types) under OUT/corpus, reused when it already matches."""
    return synthetic_data(out / "corpus", "pretrain", 0, per_class=per_class, size=size)


def pretrain_result(cfg: PretrainConfig, name: str) -> dict[str, Any]:
    """Run one pre-training; the foundation row: name, seed, options, settings, summary and metrics rows."""
    summary = pretrain(cfg, progress=False, overwrite=True)  # a run not yet recorded is a leftover of a killed one
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "seed": cfg.seed, "options": cfg.options, "algorithm": cfg.algorithm,
            "topology": cfg.topology, "unseen": cfg.unseen, "silos": cfg.silos, "shots": cfg.shots,
            "rounds": cfg.rounds, "local_steps": cfg.local_steps, "batch_size": cfg.batch_size,
            "image_size": cfg.image_size, "run": str(cfg.out), "summary": summary, "rows": rows}


def downstream_result(cfg: FinetuneConfig, domain: str, init_name: str) -> dict[str, Any]:
    """Fine-tune once (epoch selected on validation), score the test split once; the downstream row."""
    selected = finetune(cfg, progress=False, overwrite=True)  # a run not yet recorded is a leftover
    return {"domain": domain, "shots": cfg.shots, "seed": cfg.seed, "init": init_name, "arch": cfg.arch,
            "init_weights": cfg.init, "epochs": cfg.epochs, "image_size": cfg.image_size, "run": str(cfg.out),
            "transfer": selected["transfer"], "best_epoch": selected["best_epoch"], "val_dice": selected["best_val"],
            "test": evaluate_model(Path(cfg.out), Path(cfg.data), "test")}


def segmentation_data(out: Path, domain: str, images: int, size: int) -> Path:
    """The synthetic segmentation set of one domain under OUT/data/DOMAIN (seed 1000: not the corpus's images)."""
    return synthetic_data(out / "data" / domain, "seg", 1000, domain=domain, n=images, size=size)


def foundation_weights(foundation: Path, name: str, seed: int) -> Path:
    """global.safetensors of pre-training NAME in a T1 output folder: the run of the same seed, else seed 0."""
    for candidate in (foundation / "runs" / f"{name}_s{seed}", foundation / "runs" / f"{name}_s0"):
        if (candidate / "global.safetensors").is_file():
            return candidate / "global.safetensors"
    found = sorted(p.parent.name for p in (foundation / "runs").glob("*/global.safetensors"))
    raise DataError(f"{foundation}/runs has no finished pre-training '{name}' (found: {', '.join(found) or 'none'}); "
                    "run benchmarks/t1_foundation.py --out there first, or drop it from --inits")


@dataclass(frozen=True)
class Pretraining:
    """One pre-training configuration of a table, run once per seed under runs/NAME_sSEED."""

    name: str
    algorithm: str
    setting: str = "-"
    topology: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    unseen: float = 1.0
    shots: int = 2


def add_pretrain_args(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The federation flags shared by T1, T2 and T5: the same budget for every run of a table."""
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--local-steps", type=int, default=2, help="E, the same for every algorithm")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--silos", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=200, help="corpus images per data type (all splits)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--eval-every", type=int, default=5)


def quick_pretrain(args: argparse.Namespace) -> None:
    """--quick: 1 seed, 3 silos, 2 rounds of 32 px images, 10 per class, evaluated every round."""
    args.seeds, args.silos, args.rounds, args.per_class, args.size, args.eval_every = [0], 3, 2, 10, 32, 1


def run_pretrainings(args: argparse.Namespace, table: str, plan: list[Pretraining]) -> list[dict[str, Any]]:
    """Run every (configuration, seed) of ``plan`` not yet in OUT/results.jsonl; return the rows it appended."""
    torch.set_num_threads(args.threads)
    corpus = pretrain_corpus(args.out, args.per_class, args.size)
    done = recorded(args.out, lambda r: (r["name"], r["seed"]))
    appended = []
    for spec in plan:
        for seed in args.seeds:
            if (spec.name, seed) in done:
                print(f"{spec.name} seed {seed}: already in {args.out / RESULT_FILE}, skipped", flush=True)
                continue
            started = time.perf_counter()
            cfg = PretrainConfig(data=corpus, out=args.out / "runs" / f"{spec.name}_s{seed}", algorithm=spec.algorithm,
                                 topology=spec.topology, silos=args.silos, unseen=spec.unseen, shots=spec.shots,
                                 rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size,
                                 image_size=args.size, eval_every=args.eval_every, checkpoint_every=args.rounds,
                                 options=spec.options, seed=seed)
            row = record(args.out, table, pretrain_result(cfg, spec.name) | {"setting": spec.setting}, started)
            appended.append(row)
            print(f"{spec.name:16s} seed {seed}: test {row['summary']['test_acc']:.3f}, "
                  f"val (last 5) {row['summary']['final_val_acc']:.3f} ({row['wall_s']:.0f} s)", flush=True)
    return appended


def paired_bootstrap(seeds: list[np.ndarray], draws: int = 2000) -> tuple[float, float, float, int]:
    """Mean of paired differences (one array per seed, one value per test image) and its 95% two-level bootstrap
    interval (seeds, then images); nan and 0 pairs when there are none. Returns (mean, low, high, pairs).
    """
    if not seeds:
        return float("nan"), float("nan"), float("nan"), 0
    rng = np.random.default_rng(0)
    boot = np.empty(draws)
    for k in range(draws):
        picked = rng.integers(len(seeds), size=len(seeds))
        boot[k] = np.mean([rng.choice(seeds[s], size=seeds[s].size).mean() for s in picked])
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(np.mean([s.mean() for s in seeds])), float(low), float(high), sum(s.size for s in seeds)


def run_script(main: Callable[[], None]) -> None:
    """Call a script's main; a FedefmError (bad input, missing result file) exits 1 with its one-line message."""
    try:
        main()
    except FedefmError as exc:
        raise SystemExit(f"error: {exc}") from None
