"""T6 — few-shot catheter position classification: the global mean-pooling head against the device-anchored models.

    python benchmarks/t6_position.py --out benchmarks/results/t6 --threads 1     # full
    python benchmarks/t6_position.py --quick --out bench_out/t6_quick

The task is ``fedefm synth position`` (4 classes: the catheter tip in the aortic arch, the descending aorta or a
supra-aortic branch, or a looped catheter), 128 px (at 64 px the catheter is under a pixel wide), tiny preset. Fixed
splits from their own generator seeds, shared by every seed and model: a training pool of 400 frames (seed 1000; K
per class drawn from it by the seed), a validation set of 80 (1001) and a test set of 200 (1002, 50 per class:
accuracy is balanced accuracy). Models (``--pooling``): ``mean`` (the plain classifier, mean token → linear),
``tip`` (models/position.py: segment the catheter, pool features at its tip), ``mask`` (a small CNN on the catheter
the segmenter predicts) and ``path`` (a linear head on that catheter's course, entry to tip; ``mask`` and ``path``
hold the segmenter as loaded). Initialisations: ``scratch`` and ``segmenter``, a TransUNet fine-tuned once on
catheter masks of the same kind of frames (seed 0, the training split of 1200 position frames with their masks,
generator seed 1003, disjoint from the splits; 30 epochs of 1000 samples) — ``mean`` takes its encoder, the others
the whole segmenter; ``segmenter_tips``, the same fine-tuned with ``--loss tips`` (more cross-entropy at the
catheter's tip end, which the Dice-CE segmenter loses) and ``segmenter_cldice``, with ``--loss cldice`` (soft
clDice, which rewards an unbroken centreline); ``segmenter_unet``, MONAI's U-Net (T4's) fine-tuned as ``segmenter``
is (Dice-CE), held whole by ``path``, and ``segmenter_unet80`` and ``segmenter_unet160``, the same fine-tuned 80 and
160 epochs (the U-Net takes half the TransUNet's time per epoch), and ``segmenter_unet_n4800``, the 160 epochs'
samples on 4800 frames (the same 1200 and 3600 more: 48 epochs), ``segmenter_unet_tips_n4800``, that
with ``--loss tips``, and ``segmenter_unet_tips3_n4800``, with ``--loss tips --tip-weight 3``; with
``--foundation`` (a T1 output folder) also ``foundation``, the encoder of its ``centralized`` pre-training of the
same seed, for ``mean`` and ``tip``. Arms (``--arms POOLING/INIT``): by default mean/scratch (the baseline),
mean/segmenter, tip/segmenter, mask/segmenter, path/segmenter, path/segmenter_tips, path/segmenter_cldice,
path/segmenter_unet, path/segmenter_unet80, path/segmenter_unet160, path/segmenter_unet_n4800,
path/segmenter_unet_tips_n4800, path/segmenter_unet_tips3_n4800. K in {4, 16}, seeds 0-2, 20 epochs of 64 samples
(the learning rate is finetune's default for the pooling), the epoch selected on validation balanced accuracy, the
test set scored once.
``--segmenter-frames``, ``--segmenter-epochs`` (of every segmenter init that names none) and ``--preset``
change the segmenter inits' budget and every model's preset (for a check of what the segmenter's training buys;
the defaults are T6's), ``--workers`` renders the frames in parallel.

Result rows (OUT/results.jsonl), besides common.py's table/machine/command/wall_s:
* each segmenter (``kind`` "segmenter"): ``init``, ``arch``, ``loss``, ``tip_weight`` (rows before it: 1), ``seed``,
  ``run``, ``val_dice``, ``test`` (evaluate JSON on its own test split);
* position runs (``kind`` "position"): ``pooling``, ``init``, ``shots``, ``seed``, ``init_weights``, ``epochs``,
  ``image_size``, ``run``, ``transfer``, ``best_epoch``, ``val_balanced_accuracy``, ``test`` (evaluate JSON)
  and ``correct`` (0/1 per test image, in the test split's order).
Tables: per model, init and K the validation and test balanced accuracy, mean ± std over seeds; the paired
gain of every model over the baseline (mean pooling, scratch), of tip over mean at the same init and of a
``segmenter_tips``, ``segmenter_cldice`` or U-Net segmenter model over the same pooling from ``segmenter``, on the
same K, seed and test image: mean and a 95% interval from a two-level bootstrap (seeds, then test images).
"""

from __future__ import annotations

import argparse
import functools
import shutil
import time
from pathlib import Path

import common
import numpy as np
import torch
from PIL import Image
from t6_oracles import mask_frame, oracle_tables

from fedefm.data.datasets import find_classification_splits
from fedefm.data.synth import write_position_dataset
from fedefm.data.synth.corpora import each_image
from fedefm.finetune.classify import load_samples, predict_probabilities
from fedefm.finetune.classify import run as finetune_classifier
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.evaluate import evaluate_model
from fedefm.finetune.train import run as finetune_segmenter
from fedefm.models.weights import build_from_weights
from fedefm.results import group, markdown, mean_std, read_results

TABLE = "T6"
# The segmenter inits: the arch, the loss each is fine-tuned with (finetune/train.py segmentation_loss), its epochs
# (None: --segmenter-epochs), its frames (None: --segmenter-frames) and its --tip-weight (the tips loss's). "tips"
# adds cross-entropy at the catheter's tip end, the part a Dice-CE segmenter loses; "cldice" adds soft clDice, which
# rewards covering the catheter's centreline end to end, unbroken; MONAI's U-Net (T4's) trains in half the time, so it
# is also trained 80 and 160 epochs (validation Dice still rises at 30 and at 80), and on four times the frames for
# the 160 epochs' 160,000 samples (an epoch shows every training frame once, 3360 of them, so 48 epochs): trained
# longer, it fits its training frames far better than new ones (a scratch 240-epoch run: Dice 0.85 against 0.72); the
# tips loss, which found more of the TransUNet's tip end, is tried on that U-Net too, with its tip term at weight 1
# and 3.
SEGMENTERS = {"segmenter": ("transunet", "dicece", None, None, 1.0),
              "segmenter_tips": ("transunet", "tips", None, None, 1.0),
              "segmenter_cldice": ("transunet", "cldice", None, None, 1.0),
              "segmenter_unet": ("unet", "dicece", None, None, 1.0),
              "segmenter_unet80": ("unet", "dicece", 80, None, 1.0),
              "segmenter_unet160": ("unet", "dicece", 160, None, 1.0),
              "segmenter_unet_n4800": ("unet", "dicece", 48, 4800, 1.0),
              "segmenter_unet_tips_n4800": ("unet", "tips", 48, 4800, 1.0),
              "segmenter_unet_tips3_n4800": ("unet", "tips", 48, 4800, 3.0)}
# POOLING/INIT: the baseline, the TransUNet segmenter under each head, and path on every segmenter init.
ARMS = ("mean/scratch", "mean/segmenter", "tip/segmenter", "mask/segmenter", *(f"path/{init}" for init in SEGMENTERS))
FOUNDATION_ARMS = ("mean/foundation", "tip/foundation")  # with --foundation; mask and path need a segmentation head
# The segmenter inits' training set and budget: frames are free to generate, so the device prior sees many.
SEGMENTER = {"frames": 1200, "epochs": 30, "samples_per_epoch": 1000, "seed": 1003}
SPLITS = {"train": (400, 1000), "val": (80, 1001), "test": (200, 1002)}  # frames and generator seed per split
BASELINE = ("mean", "scratch")


def parse_args() -> argparse.Namespace:
    """The flags of this table (common.py's plus its own)."""
    parser = common.parser_for(__doc__)
    parser.add_argument("--arms", nargs="+", default=list(ARMS),
                        choices=[*ARMS, "tip/scratch", "mask/segmenter_tips", *FOUNDATION_ARMS],
                        help="POOLING/INIT; the foundation arms need --foundation")
    parser.add_argument("--foundation", type=Path, help="T1 output folder holding runs/centralized_sSEED/; "
                                                        "adds the foundation arms")
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 16], help="K images per class")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--preset", default="tiny", help="model preset of the segmenter and every classifier")
    parser.add_argument("--segmenter-frames", type=int, default=SEGMENTER["frames"],
                        help="position frames with masks the segmenter init trains on")
    parser.add_argument("--segmenter-epochs", type=int, default=SEGMENTER["epochs"],
                        help=f"its epochs of {SEGMENTER['samples_per_epoch']} samples")
    parser.add_argument("--workers", type=int, default=1, help="processes that render the frames")
    args = parser.parse_args()
    if args.quick:
        args.shots, args.seeds, args.epochs, args.size = [2], [0], 1, 64
        args.segmenter_frames, args.segmenter_epochs = 12, 1
    if args.foundation is not None:
        args.arms += [arm for arm in FOUNDATION_ARMS if arm not in args.arms]
    if any(arm.endswith("/foundation") for arm in args.arms) and args.foundation is None:
        parser.error("the foundation arms need --foundation T1_FOLDER")
    return args


def position_data(args: argparse.Namespace) -> Path:
    """The position set, ROOT/{train,val,test}/CLASS, each split from its own generator seed (written once)."""
    root = args.out / "data" / f"position_{args.size}"
    for split, (n, seed) in SPLITS.items():
        if not (root / split / "manifest.json").is_file():
            write_position_dataset(root / split, n if not args.quick else 8, size=args.size, seed=seed,
                                   workers=args.workers)
    return root


def write_mask_frame(folder: Path, size: int, seed: int, i: int) -> None:
    """FOLDER/{images,masks}/img_I.png: position frame ``i`` (t6_oracles.mask_frame) and its device mask."""
    image, mask, _ = mask_frame(size, seed, i)
    Image.fromarray(image).save(folder / "images" / f"img_{i:05d}.png")
    Image.fromarray(mask).save(folder / "masks" / f"img_{i:05d}.png")


def write_position_masks(root: Path, n: int, size: int, seed: int, workers: int = 1) -> None:
    """ROOT/images/NAME.png and ROOT/masks/NAME.png: ``n`` position frames, classes in turn, with their device masks.

    Each frame has its own generator, so the files are the same for any number of ``workers``. Written in
    ROOT.partial and renamed at the end, so a killed run leaves no half set that the next one reuses.
    """
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for folder in ("images", "masks"):
        (partial / folder).mkdir(parents=True)
    each_image(functools.partial(write_mask_frame, partial, size, seed), range(n), workers, "position frames, masks")
    partial.rename(root)


def segmenter(args: argparse.Namespace, init: str) -> Path:
    """Weights of the segmenter a segmenter init (SEGMENTERS) starts from, fine-tuned (and recorded) once."""
    out = args.out / "runs" / init
    arch, loss, epochs, frames, tip_weight = SEGMENTERS[init]
    if ("segmenter", init) in common.recorded(args.out, lambda r: (r.get("kind"), r.get("init"))):
        return out / "model.safetensors"
    started = time.perf_counter()
    frames = args.segmenter_frames if frames is None or args.quick else frames
    data = args.out / "data" / f"position_masks_{args.size}_n{frames}"
    if not data.is_dir():
        write_position_masks(data, frames, args.size, seed=SEGMENTER["seed"], workers=args.workers)
    epochs = args.segmenter_epochs if epochs is None or args.quick else epochs
    cfg = FinetuneConfig(data=data, out=out, arch=arch, epochs=epochs, preset=args.preset,
                         samples_per_epoch=SEGMENTER["samples_per_epoch"] if not args.quick else None,
                         image_size=args.size, loss=loss, tip_weight=tip_weight, seed=0)
    selected = finetune_segmenter(cfg, progress=False, overwrite=True)
    row = {"kind": "segmenter", "init": init, "arch": arch, "loss": loss, "tip_weight": cfg.tip_weight,
           "seed": cfg.seed, "run": str(out), "frames": frames, "epochs": cfg.epochs, "preset": cfg.preset,
           "samples_per_epoch": cfg.samples_per_epoch,
           "best_epoch": selected["best_epoch"], "val_dice": selected["best_val"],
           "test": evaluate_model(out, data, "test")}
    row = common.record(args.out, TABLE, row, started)
    print(f"{init}: test catheter Dice {row['test']['per_class']['catheter']['dice']:.3f} "
          f"({row['wall_s']:.0f} s)", flush=True)
    return out / "model.safetensors"


def test_correct(run: Path, data: Path) -> list[int]:
    """1 where the selected classifier of ``run`` names a test image's class, else 0, in the test split's order."""
    network, metadata = build_from_weights(run / "model.safetensors")
    items = find_classification_splits(data)[0]["test"]
    samples = load_samples(items, int(metadata["image_size"]), multilabel=False)
    predicted = predict_probabilities(network, samples["image"], multilabel=False).argmax(1)
    return (predicted == samples["label"]).int().tolist()


def position_run(args: argparse.Namespace, data: Path, weights: str, pooling: str, init: str, shots: int,
                 seed: int) -> dict:
    """Fine-tune one classifier (epoch selected on validation), score the test split once; the result row."""
    cfg = FinetuneConfig(data=data, out=args.out / "runs" / f"{pooling}_{init}_k{shots}_s{seed}", task="classify",
                         pooling=pooling, init=weights, shots=shots, epochs=args.epochs, image_size=args.size,
                         preset=args.preset, seed=seed)
    selected = finetune_classifier(cfg, progress=False, overwrite=True)  # a run not yet recorded is a leftover
    return {"kind": "position", "pooling": pooling, "init": init, "shots": shots, "seed": seed, "init_weights": weights,
            "epochs": cfg.epochs, "image_size": cfg.image_size, "preset": cfg.preset, "run": str(cfg.out),
            "transfer": selected["transfer"],
            "best_epoch": selected["best_epoch"], "val_balanced_accuracy": selected["val"]["balanced_accuracy"],
            "test": evaluate_model(Path(cfg.out), data, "test"), "correct": test_correct(Path(cfg.out), data)}


def run_all(args: argparse.Namespace) -> None:
    """Every (arm, K, seed) not yet recorded."""
    data = position_data(args)
    arms = [tuple(arm.split("/")) for arm in args.arms]
    fixed = {"scratch": "scratch"}
    for init in sorted({init for _, init in arms if init in SEGMENTERS}):
        fixed[init] = str(segmenter(args, init))

    def weights(init: str, seed: int) -> str:
        if init == "foundation":
            return str(common.foundation_weights(args.foundation, "centralized", seed))
        return fixed[init]

    done = common.recorded(args.out, lambda r: (r.get("pooling"), r.get("init"), r.get("shots"), r.get("seed")))
    for shots in args.shots:
        for seed in args.seeds:
            for pooling, init in arms:
                if (pooling, init, shots, seed) in done:
                    print(f"{pooling} {init} K={shots} seed {seed}: already recorded, skipped", flush=True)
                    continue
                started = time.perf_counter()
                row = position_run(args, data, weights(init, seed), pooling, init, shots, seed)
                row = common.record(args.out, TABLE, row, started)
                print(f"{pooling:4s} {init:10s} K={shots:3d} seed {seed}: val {row['val_balanced_accuracy']:.3f} "
                      f"test balanced accuracy {row['test']['balanced_accuracy']:.3f} ({row['wall_s']:.0f} s)",
                      flush=True)


def gain_cell(runs: list[dict], base: dict[int, dict]) -> str:
    """Paired test-accuracy gain of ``runs`` over ``base`` (by seed), in points, with its 95% interval."""
    seeds = [np.array(r["correct"], float) - np.array(base[r["seed"]]["correct"], float)
             for r in runs if r["seed"] in base]
    mean, low, high, n = common.paired_bootstrap(seeds)
    return "-" if n == 0 else f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def tables(results: list[dict]) -> str:
    """The segmenter's Dice, the per-model table, the paired-gain table (module docstring), then the oracles
    (benchmarks/t6_oracles.py) when the file holds them."""
    out = []
    for r in results:
        if r.get("kind") == "segmenter":
            budget = (f"{r['frames']} frames, {r['epochs']} epochs of {r['samples_per_epoch']} samples or every "
                      f"training frame once if more, best epoch {r['best_epoch']}")
            arch = r.get("arch", "transunet")  # rows written before the U-Net init name no arch: all TransUNets
            weight = f" at tip weight {r['tip_weight']:g}" if r.get("tip_weight", 1.0) != 1.0 else ""
            out.append(f"Segmenter of the `{r['init']}` init ({arch}, {budget}, loss {r['loss']}{weight}): test "
                       f"catheter Dice {r['test']['per_class']['catheter']['dice']:.3f}, clDice "
                       f"{r['test']['per_class']['catheter']['cldice']:.3f} ({r['wall_s']:.0f} s).")
    runs = [r for r in results if r.get("kind") == "position"]
    by_arm = group(runs, lambda r: (r["shots"], r["pooling"], r["init"]))
    rows = [[str(shots), pooling, init, mean_std(r["val_balanced_accuracy"] for r in arm),
             mean_std(r["test"]["balanced_accuracy"] for r in arm), mean_std(r["test"]["macro_f1"] for r in arm),
             f"{np.mean([r['best_epoch'] for r in arm]):.0f}/{arm[0]['epochs']}", str(len(arm))]
            for (shots, pooling, init), arm in sorted(by_arm.items())]
    out.append(markdown((["K per class", "pooling", "init", "val balanced accuracy (selection)",
                          "test balanced accuracy", "test macro F1", "best epoch", "seeds"], rows)))
    seed_rows = {key: {r["seed"]: r for r in arm} for key, arm in by_arm.items()}
    gains = []
    for (shots, pooling, init), arm in sorted(by_arm.items()):
        if (pooling, init) == BASELINE:
            continue
        over_baseline = gain_cell(arm, seed_rows.get((shots, *BASELINE), {}))
        over_mean = gain_cell(arm, seed_rows.get((shots, "mean", init), {})) if pooling != "mean" else "-"
        over_dicece = (gain_cell(arm, seed_rows.get((shots, pooling, "segmenter"), {}))
                       if init in SEGMENTERS and init != "segmenter" else "-")
        gains.append([str(shots), pooling, init, over_baseline, over_mean, over_dicece, str(len(arm))])
    out.append(markdown((["K per class", "pooling", "init", "gain over mean/scratch (points, 95% CI)",
                          "gain over mean, same init", "gain over the `segmenter` init, same pooling", "seeds"],
                         gains)))
    oracles = oracle_tables(results)
    if oracles:
        out += ["What the task allows (benchmarks/t6_oracles.py, validation only): a small CNN from scratch on the "
                "image, on the TRUE catheter mask, or on the catheter the segmenter above predicts.", oracles]
    return "\n\n".join(out)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not args.tables:
        run_all(args)
    print("\n" + tables(read_results(args.out / common.RESULT_FILE)))


if __name__ == "__main__":
    common.run_script(main)
