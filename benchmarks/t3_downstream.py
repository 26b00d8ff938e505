"""T3 — downstream few-shot segmentation: K labelled images per domain, from scratch or from foundation weights.

    python benchmarks/t3_downstream.py --out bench_out/t3 --foundation bench_out/t1 --threads 1   # full
    python benchmarks/t3_downstream.py --quick --out bench_out/t3_quick --foundation bench_out/t1_quick

Full: 4 synthetic domains (clinical, animal, phantom, simulation) x K in {4, 16, 64} x 5 initialisations
(scratch and the centralized, fedavg, dpsgd and fedefm_ring pre-trainings of T1) x 3 seeds, TransUNet, tiny
preset, 64 px (the size T1 pre-trains at) and 20 epochs, so that the 180 runs take about an hour on 2 CPU
cores. The foundation weights are taken from the T1 output folder given by --foundation
(runs/NAME_sSEED/global.safetensors, the pre-training of the same seed, else seed 0), so pre-training is not
repeated. Every run selects its epoch on the validation split and scores the test split once.

Result rows (OUT/results.jsonl), besides common.py's table/machine/command/wall_s: ``domain``, ``shots`` (K),
``seed``, ``init`` (scratch or the T1 run name), ``init_weights`` (the file), ``arch``, ``epochs``,
``image_size``, ``run``, ``transfer`` (which encoder tensors were loaded, or null), ``best_epoch``,
``val_dice`` (of the selected epoch) and ``test`` (evaluate JSON: per-class and mean Dice, IoU, clDice, HD95).
Runs already in the file are skipped, so an interrupted run continues where it stopped.
Tables: per domain, K and initialisation, test Dice / IoU / clDice / HD95 (px) per class, mean ± std over seeds;
then per K and pre-trained initialisation, its Dice minus scratch's on the same domain and seed (mean ± std over
those pairs), the gain pre-training buys.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import torch

from fedefm.data.labels import DEVICE_LABELS
from fedefm.data.synth import DOMAINS
from fedefm.errors import ConfigError
from fedefm.finetune.config import FinetuneConfig
from fedefm.results import downstream_summary, group, markdown, mean_std, read_results

TABLE = "T3"
INITS = ["scratch", "centralized", "fedavg", "dpsgd", "fedefm_ring"]


def add_finetune_args(parser: argparse.ArgumentParser, shots: list[int]) -> None:
    """Fine-tuning flags shared by T3 and T4."""
    parser.add_argument("--foundation", type=Path, help="T1 output folder holding runs/NAME_sSEED/global.safetensors")
    parser.add_argument("--shots", nargs="+", type=int, default=shots)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=120, help="synthetic images per domain (all splits)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)


def quick_finetune(args: argparse.Namespace) -> None:
    """--quick: 1 seed, K = 4, 24 images of 32 px, 2 epochs."""
    args.shots, args.seeds, args.images, args.size, args.epochs = [4], [0], 24, 32, 2


def init_weights(args: argparse.Namespace, init: str, seed: int) -> str:
    """'scratch', or the foundation weights file of T1 run ``init``."""
    if init == "scratch":
        return init
    if args.foundation is None:
        raise ConfigError(f"--inits {init} needs --foundation, the T1 output folder")
    return str(common.foundation_weights(args.foundation, init, seed))


def run_finetunings(args: argparse.Namespace, table: str, plan: list[tuple[str, str, str]]) -> None:
    """Fine-tune every (domain, arch, init) of ``plan`` for each K and seed; append one row per run."""
    torch.set_num_threads(args.threads)
    done = common.recorded(args.out, lambda r: (r["domain"], r["arch"], r["init"], r["shots"], r["seed"]))
    for domain, arch, init in plan:
        for shots in args.shots:
            for seed in args.seeds:
                if (domain, arch, init, shots, seed) in done:
                    print(f"{domain} {arch} {init} K={shots} seed {seed}: already recorded, skipped", flush=True)
                    continue
                weights = init_weights(args, init, seed)
                data = common.segmentation_data(args.out, domain, args.images, args.size)
                started = time.perf_counter()
                cfg = FinetuneConfig(data=data, out=args.out / "runs" / f"{domain}_{arch}_{init}_k{shots}_s{seed}",
                                     init=weights, arch=arch, shots=shots, epochs=args.epochs,
                                     image_size=args.size, seed=seed)
                row = common.record(args.out, table, common.downstream_result(cfg, domain, init), started)
                print(f"{domain:10s} {arch:9s} {init:12s} K={shots:3d} seed {seed}: test Dice "
                      f"{row['test']['mean']['dice']:.3f} ({row['wall_s']:.0f} s)", flush=True)


def tables(results: list[dict]) -> str:
    """Test scores per domain, K and initialisation, in the order of DOMAINS and INITS whatever order runs ended in."""
    rank = {init: k for k, init in enumerate(INITS)}
    ordered = sorted(results, key=lambda r: (DOMAINS.index(r["domain"]), r["shots"], rank.get(r["init"], len(INITS))))
    return markdown(downstream_summary(ordered, keys=("domain", "shots", "init"))) + "\n\n" + gain_table(ordered)


def gain_table(results: list[dict]) -> str:
    """Catheter and guidewire Dice minus scratch's on the same domain, K and seed: mean ± std over those pairs."""
    scratch = {(r["domain"], r["shots"], r["seed"]): r["test"]["per_class"] for r in results if r["init"] == "scratch"}
    paired = [r for r in results if r["init"] != "scratch" and (r["domain"], r["shots"], r["seed"]) in scratch]
    lines = [[init, str(shots)] + [mean_std(r["test"]["per_class"][c]["dice"]
                                            - scratch[r["domain"], r["shots"], r["seed"]][c]["dice"] for r in runs)
                                   for c in DEVICE_LABELS] + [str(len(runs))]
             for (shots, init), runs in group(sorted(paired, key=lambda r: r["shots"]),
                                              lambda r: (r["shots"], r["init"])).items()]
    return markdown((["init", "K", "catheter Dice − scratch", "guidewire Dice − scratch", "pairs (domain, seed)"],
                     lines))


def main() -> None:
    parser = common.parser_for(__doc__)
    add_finetune_args(parser, shots=[4, 16, 64])
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--inits", nargs="+", default=INITS, help="scratch and/or T1 run names")
    args = parser.parse_args()
    if not args.tables:
        if args.quick:
            quick_finetune(args)
            args.domains = ["clinical"]
        for init in args.inits:  # every weights file is found before the first run starts
            for seed in args.seeds:
                init_weights(args, init, seed)
        run_finetunings(args, TABLE, [(domain, "transunet", init) for domain in args.domains for init in args.inits])
    print("\n" + tables(read_results(args.out / common.RESULT_FILE)))


if __name__ == "__main__":
    common.run_script(main)
