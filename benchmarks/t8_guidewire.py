"""T8 — catheter and guidewire from scratch at 256 px: Dice, clDice and HD95 per domain, K and seed.

    python benchmarks/t8_guidewire.py --out benchmarks/results/t8 --threads 1            # full
    python benchmarks/t8_guidewire.py --quick --out bench_out/t8_quick

Per fluoroscopy domain of the generator (``--domains``), three sets made by their own generator seeds (none
shared with any other table): a pool of 100 training frames, a validation set of 30 and a fixed test set of
60, at ``--size`` (256). Each run draws K frames (``--shots``) from the pool by its seed and fine-tunes the
tiny ``--archs`` from scratch with fedefm's default fine-tuning settings at that size and K (``--epochs``,
``--crop`` and ``--samples-per-epoch`` override them); the epoch is selected on validation and the test set
is scored once.

Result rows (OUT/results.jsonl), besides common.py's table/machine/command/wall_s: ``domain``, ``shots``,
``seed``, ``arch``, ``init``, ``epochs``, ``crop``, ``samples_per_epoch``, ``eval_every`` (absent in rows made
before it existed: 1), ``budget`` (the flags' tag and, when not 1, the epochs between validations),
``image_size``, ``best_epoch``, ``val_dice``, ``train_s`` (the fine-tuning's own seconds) and ``test``
(evaluate JSON: per class Dice, IoU, clDice, HD95). Table: per domain, K, arch and budget (epochs x samples,
crop, validation every N epochs), each device's test Dice, clDice and HD95 (mean ± std over seeds), the selected epoch and the seconds
per run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import numpy as np
import torch

from fedefm.data.labels import DEVICE_LABELS
from fedefm.data.synth import DOMAINS, write_seg_dataset
from fedefm.finetune.config import FinetuneConfig
from fedefm.results import group, markdown, mean_std, read_results

TABLE = "T8"
SPLITS = {"train": (100, 3000), "val": (30, 3001), "test": (60, 3002)}  # frames and generator seed (+ 10 x domain)


def parse_args() -> argparse.Namespace:
    """The flags of this table (common.py's plus its own)."""
    parser = common.parser_for(__doc__)
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 16, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--archs", nargs="+", default=["transunet"], help="segmenters, each from scratch")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=None, help="default: fedefm's budget for the size")
    parser.add_argument("--crop", type=int, default=None, help="default: fedefm's for the size")
    parser.add_argument("--samples-per-epoch", type=int, default=None, help="default: fedefm's for K")
    args = parser.parse_args()
    if args.quick:
        args.domains, args.shots, args.seeds, args.size, args.epochs = args.domains[:1], [4], [0], 64, 2
    return args


def domain_data(args: argparse.Namespace, domain: str) -> Path:
    """ROOT/{train,val,test}/images|masks of one domain, each split from its own generator seed (written once)."""
    root = args.out / "data" / f"{domain}_{args.size}"
    offset = 10 * DOMAINS.index(domain)
    for split, (n, seed) in SPLITS.items():
        if not (root / split / "manifest.json").is_file():
            n = max(8, n // 5) if args.quick else n
            write_seg_dataset(root / split, domain, n, size=args.size, seed=seed + offset)
    return root


def budget(args: argparse.Namespace, eval_every: int) -> str:
    """The budget of this invocation as a run-folder tag, e.g. "e40_n256_c96" or "default_v2" ("default" for none)."""
    parts = [f"{tag}{value}" for tag, value in (("e", args.epochs), ("n", args.samples_per_epoch), ("c", args.crop))
             if value is not None]
    return ("_".join(parts) or "default") + (f"_v{eval_every}" if eval_every != 1 else "")


def budget_of(row: dict) -> str:
    """A row's budget as the table shows it: epochs x samples per epoch, the crop, and validations when not every epoch."""
    every = row.get("eval_every", 1)
    return (f"{row['epochs']} x {row['samples_per_epoch']}" + (f", crop {row['crop']}" if row["crop"] else "")
            + (f", val every {every}" if every != 1 else ""))


def config(args: argparse.Namespace, data: Path, domain: str, shots: int, seed: int, arch: str) -> FinetuneConfig:
    """The resolved fine-tuning config of one (domain, K, seed, arch) run."""
    cfg = FinetuneConfig(data=data, out=args.out / "runs", arch=arch, shots=shots, seed=seed, image_size=args.size,
                         epochs=args.epochs, crop=args.crop, samples_per_epoch=args.samples_per_epoch, device="cpu")
    cfg.validate()
    cfg.out = cfg.out / f"{domain}_{arch}_k{shots}_s{seed}_{budget(args, cfg.eval_every)}"
    return cfg


def run_one(args: argparse.Namespace, cfg: FinetuneConfig, domain: str) -> None:
    """Fine-tune one (domain, K, seed, arch) from scratch, score the test split once, record the row."""
    started = time.perf_counter()
    row = common.downstream_result(cfg, domain, "scratch")
    row |= {"crop": cfg.crop, "samples_per_epoch": cfg.samples_per_epoch, "eval_every": cfg.eval_every,
            "budget": budget(args, cfg.eval_every), "train_s": time.perf_counter() - started}
    row = common.record(args.out, TABLE, row, started)
    scores = row["test"]["per_class"]
    print(f"{domain:10s} {cfg.arch:9s} K={cfg.shots:3d} seed {cfg.seed}: catheter Dice {scores['catheter']['dice']:.3f}, "
          f"guidewire Dice {scores['guidewire']['dice']:.3f} (best epoch {row['best_epoch']}/{row['epochs']}, "
          f"{row['wall_s']:.0f} s)", flush=True)


def run_all(args: argparse.Namespace) -> None:
    """Every (domain, K, seed, arch) not yet recorded, domain by domain, smallest K first."""
    done = common.recorded(args.out, lambda r: (r["domain"], r["shots"], r["seed"], r["arch"], r["budget"]))
    for domain in args.domains:
        data = domain_data(args, domain)
        for shots in args.shots:
            for seed in args.seeds:
                for arch in args.archs:
                    cfg = config(args, data, domain, shots, seed, arch)
                    if (domain, shots, seed, arch, budget(args, cfg.eval_every)) not in done:
                        run_one(args, cfg, domain)


def tables(results: list[dict]) -> str:
    """Per domain, K, arch and budget: each device's test Dice, clDice and HD95, the selected epoch, seconds per run."""
    rows = []
    key = lambda r: (r["domain"], r["shots"], r["arch"], budget_of(r))  # noqa: E731
    for (domain, shots, arch, spent), runs in group(sorted(results, key=key), key).items():
        cells = [mean_std(r["test"]["per_class"][c][metric] for r in runs)
                 for c in DEVICE_LABELS for metric in ("dice", "cldice", "hd95")]
        rows.append([domain, str(shots), arch, spent, *cells, f"{np.mean([r['best_epoch'] for r in runs]):.0f}/"
                     f"{runs[0]['epochs']}", f"{np.mean([r['train_s'] for r in runs]):.0f}", str(len(runs))])
    header = ["domain", "K", "arch", "epochs x samples", *(f"{c} {m}" for c in DEVICE_LABELS for m in ("Dice", "clDice", "HD95")),
              "best epoch", "s / run", "seeds"]
    return markdown((header, rows))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not args.tables:
        run_all(args)
    print("\n" + tables(read_results(args.out / common.RESULT_FILE)))


if __name__ == "__main__":
    common.run_script(main)
