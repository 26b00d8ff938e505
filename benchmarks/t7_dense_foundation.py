"""T7 — does a federated foundation model lift few-shot catheter segmentation? Dense objectives, whole-model transfer.

    python benchmarks/t7_dense_foundation.py --out benchmarks/results/t7 --threads 1          # full
    python benchmarks/t7_dense_foundation.py --quick --out bench_out/t7_quick

Pre-training (tiny preset, 64 px, one data type per silo = 100% unseen, seed 0) on a synthetic corpus whose
data types carry the masks they realistically would (clinical and animal: devices; phantom: vessels;
simulation: devices and vessels; CT slice: vessels; fundus: none), in two settings:

* ``joined``: the clinical silo joins pre-training with its frames but none of its masks (the realistic hospital);
* ``absent``: no clinical frame in pre-training at all (5 silos).

Every pre-training runs ``--rounds`` rounds of E = ``--local-steps`` SGD steps per silo (the same for every
algorithm; centralized takes E steps a round on the pooled data), batch 8.

Initialisations of the downstream TransUNet: ``scratch``; ``unet_scratch`` (MONAI U-Net, the strong baseline);
``classify_centralized`` (the paper's objective, encoder transfer; ``joined``) and the dense objective
(``--objective``, whole-model transfer) under centralized, fedavg, dpsgd and fedefm (``joined``; ``absent``
runs centralized and fedefm only, for time). The objective itself is compared on validation only: ``joined`` also pre-trains
``mim`` and ``segment+mim`` centrally, fine-tuned at K = 4 (``--compare-objectives``). Fine-tuning: the
synthetic clinical domain, K in {4, 16} images drawn by the seed from a fixed pool of 100, a fixed validation
set of 30 and a fixed test set of 120 frames shared by every seed and initialisation (generator seeds 1000,
1001, 1002: none of them in the corpus); 30 epochs, the epoch selected on validation, the test set scored once.

Result rows (OUT/results.jsonl), besides common.py's table/machine/command/wall_s:
* foundation rows (``kind`` "pretrain"): ``name``, ``setting``, ``objective``, ``algorithm``, the settings,
  ``summary`` and ``rows`` (the run's metrics) — as T1's, plus ``objective``;
* downstream rows (``kind`` "finetune"): ``setting``, ``domain``, ``shots``, ``seed``, ``init``, ``arch``,
  ``init_weights``, ``transfer``, ``best_epoch``, ``epochs``, ``val_dice``, ``test`` (evaluate JSON) and
  ``per_image`` ({catheter, guidewire}: the test Dice of every test image, null where the class is absent
  from prediction and truth).
Tables: the pre-trainings (validation score, seconds and bytes per round); per setting, K and init the test
Dice per class, mean ± std over seeds; and the paired gain over scratch on the same setting, K, seed and test
image: mean and a 95% interval from a two-level bootstrap (seeds, then test images).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import numpy as np
import torch
from monai.metrics import compute_dice

from fedefm.data.datasets import find_segmentation_splits
from fedefm.data.labels import DEVICE_LABELS
from fedefm.data.synth import PRETRAIN_CLASSES, write_pretrain_corpus, write_seg_dataset
from fedefm.federated.config import PretrainConfig
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.evaluate import split_settings, weights_path
from fedefm.finetune.metrics import one_hot
from fedefm.finetune.train import load_samples
from fedefm.models.weights import build_from_weights
from fedefm.results import group, markdown, mean_std, read_results

TABLE = "T7"
SETTINGS = ("joined", "absent")
DENSE_ALGORITHMS = ("centralized", "fedavg", "dpsgd", "fedefm")
COMPARE_SHOTS = 4  # the K the other dense objectives are compared at
SPLITS = {"train": (100, 1000), "val": (30, 1001), "test": (120, 1002)}  # frames and generator seed per split


def parse_args() -> argparse.Namespace:
    """The flags of this table (common.py's plus its own)."""
    parser = common.parser_for(__doc__)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--objective", default="segment", help="the dense objective every algorithm runs")
    parser.add_argument("--compare-objectives", nargs="*", default=["mim", "segment+mim"],
                        help="other dense objectives pre-trained centrally (joined) and compared on validation at K=4")
    parser.add_argument("--inits", nargs="+", default=None,
                        help="a subset of the initialisations, which are also the pre-training names (default: all)")
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=120, help="corpus images per data type (all splits)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--only", choices=("pretrain", "finetune"), help="run one phase (two processes can share)")
    parser.add_argument("--follow", action="store_true",
                        help="fine-tuning: wait for pre-trainings another process is still running")
    parser.add_argument("--reverse", action="store_true",
                        help="fine-tuning: take the plan from its end (a second process shares the work)")
    args = parser.parse_args()
    if args.quick:
        args.shots, args.seeds, args.rounds, args.per_class, args.size, args.epochs = [4], [0], 2, 10, 32, 2
        args.local_steps, args.compare_objectives = 1, args.compare_objectives[:1]
    return args


def pretrainings(args: argparse.Namespace, setting: str) -> list[tuple[str, str, str]]:
    """(name, objective, algorithm) of every pre-training ``setting`` runs."""
    if setting == "absent":
        return [(f"{args.objective}_{algorithm}", args.objective, algorithm) for algorithm in ("centralized", "fedefm")]
    return [("classify_centralized", "classify", "centralized"),
            *((f"{args.objective}_{algorithm}", args.objective, algorithm) for algorithm in DENSE_ALGORITHMS),
            *((f"{objective}_centralized", objective, "centralized") for objective in args.compare_objectives)]


def inits(args: argparse.Namespace, setting: str) -> list[str]:
    """Every initialisation of ``setting``'s downstream runs, or the --inits subset."""
    every = ["scratch", "unet_scratch", *(name for name, _, _ in pretrainings(args, setting))]
    return every if args.inits is None else [init for init in every if init in args.inits]


def shots_of(args: argparse.Namespace, init: str) -> list[int]:
    """The K an init is fine-tuned at: the objective comparison runs at K = 4 only."""
    compared = {f"{objective}_centralized" for objective in args.compare_objectives}
    return [k for k in args.shots if k == COMPARE_SHOTS] if init in compared else args.shots


def corpus(args: argparse.Namespace, setting: str) -> Path:
    """The pre-training corpus of a setting (written once): every data type, or every one but clinical."""
    root = args.out / "corpus" / f"{setting}_{args.per_class}_{args.size}"
    if not (root / "manifest.json").is_file():
        classes = [c for c in PRETRAIN_CLASSES if setting == "joined" or c != "clinical"]
        write_pretrain_corpus(root, args.per_class, size=args.size, seed=0, classes=classes)
    return root


def downstream_data(args: argparse.Namespace) -> Path:
    """The clinical set, ROOT/{train,val,test}/images|masks, each split from its own generator seed."""
    root = args.out / "data" / f"clinical_{args.size}"
    scale = 1 if not args.quick else 0.2
    for split, (n, seed) in SPLITS.items():
        if not (root / split / "manifest.json").is_file():
            write_seg_dataset(root / split, "clinical", max(8, int(n * scale)), size=args.size, seed=seed)
    return root


def pretrain_all(args: argparse.Namespace) -> None:
    """Run every setting's pre-trainings not yet recorded."""
    done = common.recorded(args.out, lambda r: (r.get("kind"), r.get("setting"), r.get("name")))
    for setting in args.settings:
        data = corpus(args, setting)
        silos = 6 if setting == "joined" else 5
        for name, objective, algorithm in pretrainings(args, setting):
            if args.inits is not None and name not in args.inits:
                continue
            if ("pretrain", setting, name) in done:
                print(f"{setting} {name}: already recorded, skipped", flush=True)
                continue
            started = time.perf_counter()
            cfg = PretrainConfig(data=data, out=args.out / "runs" / f"{setting}_{name}", algorithm=algorithm,
                                 objective=objective, images_only=("clinical",) if setting == "joined" else (),
                                 silos=silos if not args.quick else 3, rounds=args.rounds,
                                 local_steps=args.local_steps, batch_size=8, image_size=args.size,
                                 eval_every=5 if not args.quick else 1,
                                 checkpoint_every=args.rounds, seed=0)
            row = common.pretrain_result(cfg, name) | {"kind": "pretrain", "setting": setting, "objective": objective}
            row = common.record(args.out, TABLE, row, started)
            metric = next(k for k in row["summary"] if k.startswith("final_val_"))
            print(f"{setting} {name}: {metric} {row['summary'][metric]:.3f} ({row['wall_s']:.0f} s)", flush=True)


def init_weights(args: argparse.Namespace, pretrained: set[tuple], setting: str, init: str) -> str | None:
    """'scratch', the global weights of pre-training ``init`` of ``setting``, or None while it is not in ``pretrained``
    (the (setting, name) of every recorded pre-training)."""
    if init in ("scratch", "unet_scratch"):
        return "scratch"
    if (setting, init) not in pretrained:
        return None
    return str(args.out / "runs" / f"{setting}_{init}" / "global.safetensors")


@torch.no_grad()
def per_image_dice(run: Path, data: Path) -> dict[str, list[float | None]]:
    """Test Dice of every test image per device class (None where the class is absent from prediction and truth)."""
    network, metadata = build_from_weights(weights_path(run))
    network.eval()
    samples = load_samples(find_segmentation_splits(data, **split_settings(run))["test"], int(metadata["image_size"]))
    dice = []
    for start in range(0, samples["image"].shape[0], 16):
        pred = one_hot(network(samples["image"][start : start + 16]).argmax(1), 3)
        truth = one_hot(samples["mask"][start : start + 16], 3)
        both_absent = ~(pred[:, 1:].flatten(2).any(-1) | truth[:, 1:].flatten(2).any(-1))
        scores = compute_dice(pred, truth, include_background=False, ignore_empty=False)
        dice.append(torch.where(both_absent, torch.nan, scores).numpy())
    values = np.concatenate(dice)
    return {name: [None if np.isnan(v) else float(v) for v in values[:, c]] for c, name in enumerate(DEVICE_LABELS)}


def finetune_all(args: argparse.Namespace) -> None:
    """Fine-tune every (K, seed, setting, init) not yet recorded, smallest K and first seed first.

    Scratch runs once, shared by both settings (setting "any"). An init whose pre-training is not recorded
    yet is waited for with --follow (another process runs the pre-training phase), else left for later.
    """
    data = downstream_data(args)
    plan = [(shots, seed, setting, init) for shots in args.shots for seed in args.seeds for setting in args.settings
            for init in inits(args, setting) if shots in shots_of(args, init)]
    while True:
        rows = read_results(args.out / common.RESULT_FILE) if (args.out / common.RESULT_FILE).is_file() else []
        done = {(r["setting"], r["init"], r["shots"], r["seed"]) for r in rows if r.get("kind") == "finetune"}
        pretrained = {(r["setting"], r["name"]) for r in rows if r.get("kind") == "pretrain"}
        todo = [run for run in plan if (row_setting(*run[2:]), run[3], *run[:2]) not in done]
        # A run folder that exists but is not recorded is being written by another process: leave it to that one.
        ready = [run for run in todo
                 if init_weights(args, pretrained, *run[2:]) is not None and not run_folder(args, *run).exists()]
        ready = ready[::-1] if args.reverse else ready
        if ready:
            finetune_one(args, data, init_weights(args, pretrained, *ready[0][2:]), *ready[0])
        elif todo and args.follow:
            time.sleep(30)  # the pre-training phase, in another process, has not finished those yet
        else:
            if todo:
                print(f"{len(todo)} fine-tunings wait for pre-trainings not recorded yet; run again later", flush=True)
            return


def row_setting(setting: str, init: str) -> str:
    """The setting a downstream row records: "any" for the scratch inits, which no pre-training touches."""
    return "any" if init.endswith("scratch") else setting


def run_folder(args: argparse.Namespace, shots: int, seed: int, setting: str, init: str) -> Path:
    """Where the fine-tuning of (K, seed, setting, init) writes its run."""
    return args.out / "runs" / f"ft_{row_setting(setting, init)}_{init}_k{shots}_s{seed}"


def finetune_one(args: argparse.Namespace, data: Path, weights: str, shots: int, seed: int, setting: str,
                 init: str) -> None:
    """Fine-tune one (K, seed, setting, init) from ``weights`` ('scratch' or a file), score the test split, record."""
    where = row_setting(setting, init)
    started = time.perf_counter()
    cfg = FinetuneConfig(data=data, out=run_folder(args, shots, seed, setting, init),
                         init=weights, arch="unet" if init == "unet_scratch" else "transunet",
                         shots=shots, epochs=args.epochs, image_size=args.size, seed=seed)
    row = common.downstream_result(cfg, "clinical", init)
    row |= {"kind": "finetune", "setting": where, "per_image": per_image_dice(cfg.out, data)}
    row = common.record(args.out, TABLE, row, started)
    print(f"{where:6s} {init:24s} K={shots:3d} seed {seed}: catheter Dice "
          f"{row['test']['per_class']['catheter']['dice']:.3f}, best epoch {row['best_epoch']} "
          f"({row['wall_s']:.0f} s)", flush=True)


def paired_gain(init_rows: list[dict], scratch_rows: dict[int, dict], name: str, draws: int = 2000
                ) -> tuple[float, float, float, int]:
    """Mean paired Dice gain over scratch and its 95% two-level bootstrap interval (seeds, then images); pairs."""
    seeds = []
    for row in init_rows:
        ours, base = row["per_image"][name], scratch_rows[row["seed"]]["per_image"][name]
        pairs = [a - b for a, b in zip(ours, base) if a is not None and b is not None]
        if pairs:
            seeds.append(np.array(pairs))
    return common.paired_bootstrap(seeds, draws)


def tables(results: list[dict]) -> str:
    """The pre-training table, the downstream table and the paired-gain table (module docstring)."""
    pre = [r for r in results if r.get("kind") == "pretrain"]
    first = {}  # a run recorded twice (two processes finished it) counts once
    for r in results:
        if r.get("kind") == "finetune":
            first.setdefault((r["setting"], r["init"], r["shots"], r["seed"]), r)
    fine = list(first.values())
    lines = []
    for r in pre:
        metric = next(k for k in r["summary"] if k.startswith("final_val_"))
        per_round = np.mean([row["wall_s"] for row in r["rows"]])
        lines.append([r["setting"], r["name"], f"{metric.removeprefix('final_val_')} {r['summary'][metric]:.3f}",
                      f"{per_round:.1f}", f"{r['summary']['bytes_sent'] / max(1, r['summary']['rounds']) / 2**20:.1f}"])
    out = [markdown((["setting", "pre-training", "validation (last 5 evaluations)", "s / round", "MiB / round"],
                     lines))]
    order = {init: k for k, init in enumerate(["scratch", "unet_scratch", "classify_centralized"])}
    fine = sorted(fine, key=lambda r: (r["shots"], r["setting"] != "any", r["setting"], order.get(r["init"], 9),
                                       r["init"]))
    rows = [[setting, str(shots), init, mean_std(r["val_dice"] for r in runs),
             *(mean_std(r["test"]["per_class"][c]["dice"] for r in runs) for c in DEVICE_LABELS),
             f"{np.mean([r['best_epoch'] for r in runs]):.0f}/{runs[0]['epochs']}", str(len(runs))]
            for (shots, setting, init), runs in group(fine, lambda r: (r["shots"], r["setting"], r["init"])).items()]
    out.append(markdown((["setting", "K", "init", "val Dice (selection)", "test catheter Dice", "test guidewire Dice",
                          "best epoch", "seeds"], rows)))
    scratch = {(r["shots"], r["seed"]): r for r in fine if r["init"] == "scratch"}
    gains = []
    for (shots, setting, init), runs in group(fine, lambda r: (r["shots"], r["setting"], r["init"])).items():
        if init == "scratch":
            continue
        base = {seed: row for (k, seed), row in scratch.items() if k == shots}
        runs = [r for r in runs if r["seed"] in base]
        cells = []
        for c in DEVICE_LABELS:
            mean, low, high, n = paired_gain(runs, base, c)
            cells.append("-" if n == 0 else f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
        gains.append([setting, str(shots), init, *cells, str(len(runs))])
    out.append(markdown((["setting", "K", "init", "catheter gain (Dice points, 95% CI)", "guidewire gain", "seeds"],
                         gains)))
    return "\n\n".join(out)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not args.tables:
        if args.only != "finetune":
            pretrain_all(args)
        if args.only != "pretrain":
            finetune_all(args)
    print("\n" + tables(read_results(args.out / common.RESULT_FILE)))


if __name__ == "__main__":
    common.run_script(main)
