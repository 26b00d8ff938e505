"""The ``fedefm`` command: every sub-command parses options, calls one library function, prints a summary."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from fedefm import __version__
from fedefm.errors import DataError, FedefmError, choose

app = typer.Typer(help="Federated endovascular foundation model: synthetic data, pre-training, few-shot segmentation.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
synth_app = typer.Typer(help="Write synthetic, physically simulated X-ray datasets.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect and validate datasets.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)


# Modules of optional extras, and how to install them.
EXTRAS = {"flwr": "flower", "cryptography": "flower"}

# What to do about the operating system's refusals, by errno.
OS_ERROR_FIXES = {
    errno.ENOSPC: "free disk space, then run again (pretrain and finetune: with --resume; the last checkpoint is whole)",
    errno.EDQUOT: "free space within your quota, then run again (pretrain and finetune: with --resume)",
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
    errno.EROFS: "the file system is read-only; choose a folder on a writable one",
    errno.EEXIST: "a file is in the way; choose another path",
    errno.ENOTDIR: "a file is in the way of a folder; choose another path",
    errno.EISDIR: "a folder is in the way of a file; choose another path",
    errno.ENOENT: "check the path",
}


def os_error_message(exc: OSError) -> str:
    """One line for an OSError: the path, the errno's meaning and name, and what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    meaning = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    name = f" ({errno.errorcode[exc.errno]})" if exc.errno in errno.errorcode else ""
    fix = OS_ERROR_FIXES.get(exc.errno)
    return f"{where}: {meaning}{name}" + (f"; {fix}" if fix else "")


def user_errors(command):
    """Print a FedefmError, an OSError or a missing optional extra as one red line and exit 1.

    Any other exception is a bug and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FedefmError as exc:
            message = str(exc)
        except OSError as exc:
            message = os_error_message(exc)
        except ModuleNotFoundError as exc:
            module = (exc.name or "").split(".")[0]
            if module not in EXTRAS:
                raise
            message = (f"this command needs the {EXTRAS[module]} extra (module {module} is not installed); "
                       f"install it with: pip install 'fedefm[{EXTRAS[module]}]'")
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"fedefm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Federated endovascular foundation model."""
    # The fedefm logger passes INFO on to the run folders' log.txt; the terminal shows it only with --verbose.
    logging.basicConfig(format="%(message)s", handlers=[
        RichHandler(console=err_console, show_path=False, level=logging.INFO if verbose else logging.WARNING)])
    logging.getLogger("fedefm").setLevel(logging.INFO)
    # pydicom logs a traceback per decoder that fails and warns about odd headers; the DataError fedefm raises
    # names the file and the reasons, so neither reaches the terminal.
    logging.getLogger("pydicom").propagate = False
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


WorkersOption = Annotated[Optional[int], typer.Option(
    help="Processes that render images (default: one per CPU core); the files are the same for any number.")]


def _workers(workers: int | None) -> int:
    """``--workers``, or the CPU cores this process may run on when it is not given."""
    if workers is not None:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@synth_app.command("seg")
@user_errors
def synth_seg(
    out: Annotated[Path, typer.Argument(help="New folder for OUT/images, OUT/masks, OUT/manifest.json.")],
    domain: Annotated[str, typer.Option(help="clinical, animal, phantom or simulation.")] = "clinical",
    n: Annotated[int, typer.Option(help="Number of images.")] = 100,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical files.")] = 0,
    wire_label: Annotated[str, typer.Option(
        help="Guidewire inside the catheter: 'lead' labels only its lead beyond the catheter (catheter wins), "
             "'full' its whole path (guidewire wins).")] = "lead",
    workers: WorkersOption = None,
) -> None:
    """Write a segmentation dataset (labels 0 background, 1 catheter, 2 guidewire)."""
    from fedefm.data.synth import write_seg_dataset

    manifest = write_seg_dataset(out, domain, n, size=size, seed=seed, wire_label=wire_label,
                                 workers=_workers(workers))
    console.print(f"wrote {len(manifest['images'])} {domain} images and masks to {out}")


@synth_app.command("pretrain")
@user_errors
def synth_pretrain(
    out: Annotated[Path, typer.Argument(help="New folder for OUT/CLASS/*.png.")],
    per_class: Annotated[int, typer.Option(help="Images per data-type class.")] = 100,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical files.")] = 0,
    masks: Annotated[bool, typer.Option(help="Also write CLASS/masks/ and labels.json for the data types that carry "
                                             "masks (--no-masks: images only; the images are the same).")] = True,
    workers: WorkersOption = None,
) -> None:
    """Write the pre-training corpus: one folder per data type (the label is the data type), with label masks."""
    from fedefm.data.synth import write_pretrain_corpus

    manifest = write_pretrain_corpus(out, per_class, size=size, seed=seed, masks=masks, workers=_workers(workers))
    console.print(f"wrote {per_class} images for each of {', '.join(manifest['classes'])} to {out}")
    for cls, labels in manifest.get("label_table", {}).get("annotated", {}).items():
        console.print(f"  {cls}: masks of {', '.join(labels)}")


@synth_app.command("position")
@user_errors
def synth_position(
    out: Annotated[Path, typer.Argument(help="New folder for OUT/CLASS/*.png and OUT/manifest.json.")],
    n: Annotated[int, typer.Option(help="Number of images, balanced over the 4 classes.")] = 400,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical files.")] = 0,
    workers: WorkersOption = None,
) -> None:
    """Write the catheter position task: chest frames whose catheter tip lies in one of 4 positions."""
    from fedefm.data.synth import write_position_dataset

    manifest = write_position_dataset(out, n, size=size, seed=seed, workers=_workers(workers))
    counts = ", ".join(f"{cls} {count}" for cls, count in manifest["counts"].items())
    console.print(f"wrote {n} frames ({counts}) to {out}")


@data_app.command("check")
@user_errors
def data_check(
    root: Annotated[Path, typer.Argument(help="Dataset root (segmentation or folder-per-class layout).")],
    seed: Annotated[int, typer.Option(help="Seed of the carved splits.")] = 0,
) -> None:
    """Validate every file of a dataset and print a summary; exit 1 listing every bad file."""
    from fedefm.data.datasets import check_dataset, format_report

    report = check_dataset(root, seed=seed)
    console.print(format_report(report))
    if report.bad_files:
        for path, reason in report.bad_files:
            err_console.print(f"[red]bad file[/] {escape(f'{path}: {reason}')}", highlight=False, soft_wrap=True)
        err_console.print(f"[bold red]error:[/] {len(report.bad_files)} bad file(s) in {escape(str(root))}")
        raise typer.Exit(1)


@data_app.command("partition")
@user_errors
def data_partition(
    root: Annotated[Path, typer.Argument(help="Pre-training corpus, ROOT/CLASS/*.ext.")],
    silos: Annotated[int, typer.Option(help="Number of silos.")] = 6,
    unseen: Annotated[float, typer.Option(help="Share of each class held only by its owner silos (1: disjoint).")] = 1.0,
    alpha: Annotated[Optional[float], typer.Option(help="Use Dirichlet(alpha) label skew instead of --unseen.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of splits and partition.")] = 0,
    images_only: Annotated[Optional[list[str]], typer.Option(help="A class whose masks are left out (its silo "
                                                                  "joins with images only); repeatable.")] = None,
) -> None:
    """Print the silo x class table of the training split, as ``fedefm pretrain`` would partition it, and for a
    dense corpus (ROOT/labels.json) the silo x label-type table."""
    from fedefm.data.datasets import find_classification_splits, read_label_spec
    from fedefm.data.partition import partition_dirichlet, partition_unseen, silo_class_table, silo_label_table

    splits, class_names = find_classification_splits(root, seed=seed, images_only=images_only or ())
    labels = [item.label for item in splits["train"]]
    parts = (partition_dirichlet(labels, silos, alpha, seed) if alpha is not None
             else partition_unseen(labels, silos, unseen, seed))
    console.print(silo_class_table(labels, parts, class_names), highlight=False)
    spec = read_label_spec(root)
    if spec.labels:
        table = silo_label_table([[splits["train"][i] for i in silo] for silo in parts], spec)
        console.print(f"\nmasked images per label type (and images only):\n{table}", highlight=False)


@app.command()
@user_errors
def finetune(
    data: Annotated[Path, typer.Option(help="Dataset root: segmentation layout, class folders, or a multi-label CSV.")],
    out: Annotated[Path, typer.Option(help="Run folder to write.")],
    task: Annotated[str, typer.Option(help="segment (masks) or classify (one class per image).")] = "segment",
    multilabel: Annotated[bool, typer.Option(help="classify: --data is a CSV image,LABEL_1,... of 0/1 columns.")] = False,
    pooling: Annotated[str, typer.Option(help="classify: mean (mean token over the image), tip (segment the "
                                              "catheter, read the features at its tip), mask (a small CNN on the "
                                              "catheter a segmenter given as --init predicts) or path (a linear head "
                                              "on that catheter's course, entry to tip).")] = "mean",
    init: Annotated[str, typer.Option(help="'scratch', a foundation .safetensors file, or (classify --pooling tip, mask "
                                           "or path) a fine-tuned segmenter's (mask, path: of any --arch).")] = "scratch",
    init_parts: Annotated[str, typer.Option(help="What --init gives a segmenter: encoder, all (encoder, decoder, head "
                                                 "by class name) or auto (all when the file holds a decoder).")] = "auto",
    arch: Annotated[str, typer.Option(help="segment: transunet, unet, resunet or swinunetr.")] = "transunet",
    preset: Annotated[str, typer.Option(help="tiny, small or paper.")] = "tiny",
    shots: Annotated[Optional[int], typer.Option(help="K labelled training images; per class for classify (default: all).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of max(training images, --samples-per-epoch) augmented samples each (default: 30 at 128 px, in proportion to the image side; classify 30).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 8,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate (default 1e-2 segment and classify --pooling path, 1e-3 other classify).")] = None,
    samples_per_epoch: Annotated[Optional[int], typer.Option(help="Augmented samples per epoch (at least K; default max(64, 4 K) for segment, 64 for classify).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Training resolution (default: the preset's; classify --pooling mask or path: the --init segmenter's).")] = None,
    loss: Annotated[str, typer.Option(help="segment: dicece (Dice + cross-entropy), cldice (the same + soft clDice), dicecldice (Dice + clDice) or tips (Dice + cross-entropy, plus cross-entropy at each device's tip end).")] = "dicece",
    tip_weight: Annotated[float, typer.Option(help="segment --loss tips: weight of the tip-end cross-entropy against Dice + cross-entropy.")] = 1.0,
    crop: Annotated[Optional[int], typer.Option(help="segment: train on crops of this side (multiple of 32), centred on devices 3 times in 4 (default: 128 above 128 px, else whole images; the image size: whole images).")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Epochs between validations; the last is always validated (default: 1, on crops round((image size / crop)^2 / 2)).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of splits, shots, init and augmentation.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last intact checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the fedefm run already in --out (it is deleted first).")] = False,
) -> None:
    """Fine-tune a segmenter (selected on validation Dice) or a classifier (validation balanced accuracy) on K images."""
    from fedefm.finetune import classify, train
    from fedefm.finetune.config import FinetuneConfig

    cfg = FinetuneConfig(data=data, out=out, task=task, multilabel=multilabel, pooling=pooling, init=init,
                         init_parts=init_parts, arch=arch, preset=preset,
                         shots=shots, epochs=epochs, batch_size=batch_size, lr=lr, samples_per_epoch=samples_per_epoch,
                         image_size=image_size, loss=loss, tip_weight=tip_weight, crop=crop, eval_every=eval_every,
                         device=device, seed=seed)
    result = (train if task == "segment" else classify).run(cfg, resume=resume, overwrite=overwrite)
    if result["transfer"]:
        console.print(f"foundation weights: {result['transfer']}")
    score = (f"val {'macro AUROC' if multilabel else 'balanced accuracy'} {result['best_val'][0]:.4f}"
             if task == "classify" else f"val Dice {result['best_val']:.4f}")
    console.print(f"selected epoch {result['best_epoch']} ({score}); weights in {out / 'model.safetensors'}")


@app.command()
@user_errors
def pretrain(
    data: Annotated[Path, typer.Option(help="Pre-training corpus, ROOT/CLASS/*.ext (the label is the data type).")],
    out: Annotated[Path, typer.Option(help="Run folder to write.")],
    algorithm: Annotated[str, typer.Option(help="centralized, fedavg, fedprox, moon, dpsgd, matcha, fedefm, fedefm_literal or fedefm_released.")] = "fedefm",
    objective: Annotated[str, typer.Option(help="classify (data type), segment (masks each silo holds), mim, or a sum "
                                                "such as segment+mim or segment+mim*0.5.")] = "classify",
    images_only: Annotated[list[str], typer.Option(help="Data-type class whose masks are ignored (a silo with frames "
                                                        "but no annotations); repeatable.")] = [],
    topology: Annotated[Optional[str], typer.Option(help="star, ring, mst, complete or matcha (default: the algorithm's).")] = None,
    underlay: Annotated[str, typer.Option(help="Where silos sit: gaia (11 sites) or aws_na (22).")] = "gaia",
    silos: Annotated[int, typer.Option(help="Number of silos (hospitals).")] = 6,
    unseen: Annotated[float, typer.Option(help="Share of each class held only by its owner silos (1: disjoint).")] = 1.0,
    rounds: Annotated[int, typer.Option(help="Communication rounds.")] = 50,
    local_steps: Annotated[int, typer.Option(help="SGD steps per silo per round.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option(help="SGD learning rate.")] = 0.05,
    preset: Annotated[str, typer.Option(help="tiny, small or paper.")] = "tiny",
    image_size: Annotated[Optional[int], typer.Option(help="Training resolution (default: the preset's).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Replace the preset's dropout (0: no random masks).")] = None,
    eval_every: Annotated[int, typer.Option(help="Rounds between validation evaluations.")] = 5,
    checkpoint_every: Annotated[int, typer.Option(help="Rounds between checkpoints.")] = 10,
    option: Annotated[list[str], typer.Option(help="Algorithm setting NAME=VALUE (e.g. beta=0.9); repeatable.")] = [],
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of partition, init, batches and topology draws.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last intact checkpoint.")] = False,
    min_healthy_silos: Annotated[int, typer.Option(help="Stop when fewer silos come through a round.")] = 2,
    silo_timeout: Annotated[Optional[float], typer.Option(help="Seconds after which a silo's update is late and left out.")] = None,
    data_memory_mb: Annotated[float, typer.Option(help="Decoded images above this read each batch from disk.")] = 4096.0,
    overwrite: Annotated[bool, typer.Option(help="Replace the fedefm run already in --out (it is deleted first).")] = False,
) -> None:
    """Federated pre-training of the foundation model; writes metrics.jsonl, global.safetensors, silos/."""
    from fedefm.config import parse_settings
    from fedefm.federated.config import PretrainConfig
    from fedefm.federated.simulator import run

    cfg = PretrainConfig(data=data, out=out, algorithm=algorithm, objective=objective, images_only=tuple(images_only),
                         topology=topology, underlay=underlay, silos=silos,
                         unseen=unseen, rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr,
                          preset=preset, image_size=image_size, dropout=dropout, eval_every=eval_every,
                          checkpoint_every=checkpoint_every, options=parse_settings(option), device=device, seed=seed,
                          min_healthy_silos=min_healthy_silos, silo_timeout_s=silo_timeout, data_memory_mb=data_memory_mb)
    summary = run(cfg, resume=resume, overwrite=overwrite)
    metric = next(key.removeprefix("test_") for key in summary if key.startswith("test_"))
    console.print(f"test {metric} of the global model {summary[f'test_{metric}']:.4f} (validation, last evaluations: "
                  f"{summary[f'final_val_{metric}']:.4f}); weights in {out / 'global.safetensors'}")


@app.command("topology")
@user_errors
def topology_table(
    underlay: Annotated[str, typer.Option(help="gaia or aws_na.")] = "gaia",
    preset: Annotated[str, typer.Option(help="Model whose size and measured step time set the delays.")] = "paper",
    silos: Annotated[Optional[int], typer.Option(help="Silos (default: every site).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch of the measured local step.")] = 1,
    budget: Annotated[float, typer.Option(help="MATCHA communication budget.")] = 0.5,
) -> None:
    """Cycle time of every overlay (Marfoq et al.'s max-plus model) for the preset's real size and step time."""
    from fedefm.federated.timing import local_step_seconds
    from fedefm.federated.topology import cycle_time_table, get_underlay, model_bytes
    from fedefm.models.heads import Classifier
    from fedefm.models.presets import get_preset

    chosen = get_preset(preset)
    sites = get_underlay(underlay)
    model = Classifier(chosen, n_classes=6)
    compute_s = local_step_seconds(model, batch_size, chosen.image_size)
    size = model_bytes(model)
    table = Table(title=f"{underlay}: {preset} preset, {size / 1e6:.1f} MB per model, local step {compute_s * 1e3:.0f} ms")
    for column in ("overlay", "cycle time (ms)", "transfers/round", "max in-degree"):
        table.add_column(column, justify="left" if column == "overlay" else "right")
    for row in cycle_time_table(sites, silos or len(sites.sites), compute_s, size, budget=budget):
        table.add_row(row["overlay"], f"{row['cycle_time_s'] * 1e3:.1f}", f"{row['edges']:g}", str(row["max_degree"]))
    console.print(table)


def metrics_table(results: dict[str, dict], title: str) -> Table:
    """Rich table of evaluate JSON objects, one row per (run, class)."""
    table = Table(title=title)
    for column in ("run", "class", "Dice", "IoU", "clDice", "HD95 (px)"):
        table.add_column(column, justify="left" if column in ("run", "class") else "right")
    for run, result in results.items():
        for name, scores in list(result["per_class"].items()) + [("mean", result["mean"])]:
            cells = ["-" if scores[m] is None else f"{scores[m]:.3f}" for m in ("dice", "iou", "cldice", "hd95")]
            table.add_row(run, name, *cells)
    return table


@app.command()
@user_errors
def evaluate(
    model: Annotated[Path, typer.Option(help="Finetune run folder or .safetensors file.")],
    data: Annotated[Path, typer.Option(help="Segmentation dataset root.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON object only.")] = False,
) -> None:
    """Segmenter: Dice, IoU, clDice and HD95 per class. Classifier: accuracy, balanced accuracy, F1, confusion."""
    from fedefm.finetune.evaluate import evaluate_model

    result = evaluate_model(model, data, split)
    title = f"{split} split, {result['n_images']} images"
    if as_json:
        typer.echo(json.dumps(result))
    elif "accuracy" in result:
        console.print(classification_table(result, title))
    else:
        console.print(metrics_table({str(model): result}, title))


def classification_table(result: dict, title: str) -> Table:
    """Per-class precision, recall, F1 (and AUROC for multi-label) under the overall scores."""
    multilabel = "macro_auroc" in result
    summary = ", ".join(f"{key.replace('_', ' ')} {result[key]:.3f}" for key in
                        ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc") if result.get(key) is not None)
    table = Table(title=f"{title}: {summary}")
    metrics = ("precision", "recall", "f1", "auroc") if multilabel else ("precision", "recall", "f1")
    for column in ("class", *metrics):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, scores in result["per_class"].items():
        table.add_row(name, *["-" if scores[m] is None else f"{scores[m]:.3f}" for m in metrics])
    return table


@app.command()
@user_errors
def predict(
    model: Annotated[Path, typer.Option(help="Finetune run folder or .safetensors file.")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders (PNG, JPEG, TIFF, NPY, NIfTI, DICOM).")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for NAME_mask.png (or NAME_seg.dcm) and NAME_overlay.png "
                                                     "(classifier: predictions.jsonl, optional).")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable inputs (listed in OUT/skipped.txt).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the predictions already in --out (deleted first).")] = False,
    probabilities: Annotated[bool, typer.Option(help="Segmenter: also NAME_probabilities.npy, float32 (3, H, W) softmax per class.")] = False,
    min_component_px: Annotated[int, typer.Option(help="Segmenter: drop predicted components (8-connected, per class) under this many pixels (0: keep all).")] = 0,
    output_format: Annotated[str, typer.Option("--format", help="Segmenter: png (NAME_mask.png per frame) or dicom-seg (NAME_seg.dcm per DICOM input, for viewers and PACS).")] = "png",
    cine: Annotated[bool, typer.Option(help="Segmenter: the inputs are the frames of one run: one cine_cine.mp4 and cine_frames.csv (a multi-frame DICOM gets them anyway).")] = False,
    fps: Annotated[Optional[float], typer.Option(help="Segmenter: frame rate of the cine overlay (default: the DICOM's CineRate / FrameTime, else 15).")] = None,
) -> None:
    """Segmenter: a label mask (or DICOM SEG) and colour overlay per input, a cine overlay per run. Classifier: one JSON line per input."""
    from fedefm.errors import ConfigError
    from fedefm.finetune.evaluate import holds_classifier
    from fedefm.finetune.predict import classify_images
    from fedefm.finetune.predict import predict as run_predict

    if holds_classifier(model):
        rows, report = classify_images(model, inputs, out, skip_bad=skip_bad, overwrite=overwrite)
        for row in rows:
            typer.echo(json.dumps(row))
        err_console.print(f"{len(rows)} images in {report.seconds:.2f} s")
    elif out is None:
        raise ConfigError(f"--out: {model} is a segmenter; name a folder for its masks and overlays")
    else:
        report = run_predict(model, inputs, out, skip_bad=skip_bad, overwrite=overwrite, probabilities=probabilities,
                             min_component_px=min_component_px, output_format=output_format, cine=cine, fps=fps)
        console.print(f"{len(report.outputs)} images in {report.seconds:.2f} s ({report.images_per_s:.1f} images/s) → {out}")
        for path in (*report.segmentations, *report.cines, *report.tables):
            console.print(f"  {escape(str(path))}", highlight=False)
    for path, reason in report.skipped:
        err_console.print(f"[yellow]skipped[/] {escape(f'{path}: {reason}')}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def export(
    model: Annotated[Path, typer.Argument(help="Finetune run folder or .safetensors file of a segmenter.")],
    output_format: Annotated[str, typer.Option("--format", help="onnx (dynamic batch, ONNX Runtime), torchscript, or bundle (a MONAI Bundle folder).")],
    out: Annotated[Path, typer.Option(help="File (onnx, torchscript) or folder (bundle) to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace --out when it exists.")] = False,
) -> None:
    """Export a segmenter for deployment, checked against torch (max abs logit difference <= 1e-4)."""
    from fedefm.finetune.export import TOLERANCE, export_model

    report = export_model(model, output_format, out, overwrite=overwrite)
    console.print(f"{escape(str(report.path))}: max abs logit difference to torch {report.max_abs_difference:.2e} "
                  f"(tolerance {TOLERANCE:g})", highlight=False)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data and runs.")] = Path("demo_out"),
    seed: Annotated[int, typer.Option(help="Seed of every step.")] = 0,
) -> None:
    """Whole pipeline on embedded synthetic data: synthesise, fine-tune, evaluate, print the table."""
    from fedefm.demo import run_demo

    results = run_demo(out, seed=seed, console=console)
    console.print(metrics_table(results["segment"], "demo: segmentation, test split of the synthetic clinical domain"))
    table = Table(title="demo: catheter tip position (4 classes), test split")
    for column in ("run", "accuracy", "balanced accuracy", "macro F1"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run, result in results["classify"].items():
        table.add_row(run, *[f"{result[key]:.3f}" for key in ("accuracy", "balanced_accuracy", "macro_f1")])
    console.print(table)
    console.print(f"everything the demo wrote is in {out}/")


@app.command()
@user_errors
def report(
    inputs: Annotated[list[Path], typer.Argument(help="Run folders and benchmark output folders (searched recursively).")],
    out: Annotated[Path, typer.Option(help="HTML file to write (self-contained: figures embedded).")] = Path("report.html"),
) -> None:
    """One HTML page: accuracy curves, partition, consensus distance, cycle times, downstream tables, overlays."""
    from fedefm.report import build_report

    sections = build_report(inputs, out)
    missing = [title for title, shown in sections.items() if not shown]
    console.print(f"wrote {out} ({len(sections) - len(missing)} of {len(sections)} sections with content"
                  + (f"; no input for: {', '.join(missing)})" if missing else ")"))


flower_app = typer.Typer(help="Run fedefm across machines with Flower: SuperLink, a SuperNode per hospital, runs.",
                         no_args_is_help=True)
app.add_typer(flower_app, name="flower")


def _run_flower_process(command: list[str]) -> None:
    """Run a Flower server process in the foreground with fedefm's environment; exit with its code."""
    import subprocess

    from fedefm.federated.flower.deploy import flower_environment

    console.print(" ".join(command), highlight=False, soft_wrap=True)
    try:
        code = subprocess.run(command, env=flower_environment()).returncode
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@flower_app.command("superlink")
@user_errors
def flower_superlink(
    port: Annotated[int, typer.Option(help="Port of the SuperLink's HTTP API (Fleet, Control, Runtime).")] = 9092,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    certificates: Annotated[Optional[Path], typer.Option(help="Folder with ca.crt, server.pem, server.key (TLS); "
                                                              "without it the SuperLink runs insecure.")] = None,
    enable_supernode_auth: Annotated[bool, typer.Option(help="Accept only SuperNodes registered with "
                                                             "`fedefm flower register-node`.")] = False,
    database: Annotated[Optional[Path], typer.Option(help="SQLite file for the SuperLink's state (runs, SuperNodes), "
                                                          "so that a restarted SuperLink keeps its SuperNodes; "
                                                          "without it the state is in memory.")] = None,
) -> None:
    """Start the SuperLink (the coordinator); app dependencies are never installed at run time."""
    from fedefm.federated.flower.deploy import superlink_command

    tls = None if certificates is None else (certificates / "ca.crt", certificates / "server.pem",
                                             certificates / "server.key")
    _run_flower_process(superlink_command(port, tls, enable_supernode_auth, host=host, database=database))


@flower_app.command("supernode")
@user_errors
def flower_supernode(
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")],
    silo_id: Annotated[int, typer.Option(min=0, help="This hospital's silo, 0 … S-1 (its place on the overlay).")],
    data: Annotated[Path, typer.Option(help="This hospital's images, ROOT/CLASS/*.png (never leave this machine).")],
    data_layout: Annotated[str, typer.Option(help="silo (DATA is this silo's) or corpus (take partition "
                                                  "--silo-id of a whole corpus, as fedefm pretrain does).")] = "silo",
    port: Annotated[int, typer.Option(help="Local port of this SuperNode's Runtime API.")] = 9094,
    root_certificates: Annotated[Optional[Path], typer.Option(help="CA certificate the SuperLink's TLS "
                                                                   "certificate is checked against.")] = None,
    auth_key: Annotated[Optional[Path], typer.Option(help="Private key registered with the SuperLink "
                                                          "(--enable-supernode-auth).")] = None,
    worker: Annotated[bool, typer.Option(help="Serve the ClientApp from a warm worker that imports torch and "
                                              "decodes DATA once (else every message does).")] = True,
    worker_folder: Annotated[Optional[Path], typer.Option(help="Folder (yours, mode 0700) for the worker's "
                                                               "socket; default $XDG_RUNTIME_DIR/fedefm or "
                                                               "/tmp/fedefm-UID.")] = None,
) -> None:
    """Start a hospital's SuperNode and its warm worker; the ClientApp runs on DATA and sends only weights and metrics."""
    from fedefm.federated.flower import deploy, wire
    from fedefm.federated.flower.messages import DATA_LAYOUTS

    if not data.is_dir():
        raise DataError(f"--data {data}: no such folder; give this hospital's images, ROOT/CLASS/*.png")
    data_layout = choose("--data-layout", data_layout, DATA_LAYOUTS)
    if not worker:
        _run_flower_process(deploy.supernode_command(superlink, silo_id, data, port, data_layout, root_certificates,
                                                     auth_key))
    path = deploy.claim_worker_socket(worker_folder or wire.default_worker_folder(), superlink, silo_id)
    console.print(f"starting silo {silo_id}'s worker at {path} (imports torch and fedefm once)", highlight=False)
    started = time.perf_counter()
    process = deploy.start_worker(path, silo_id, data, data_layout, env=deploy.flower_environment())
    console.print(f"worker pid {process.pid} ready in {time.perf_counter() - started:.1f} s", highlight=False)
    try:
        _run_flower_process(deploy.supernode_command(superlink, silo_id, data, port, data_layout, root_certificates,
                                                     auth_key, worker_socket=path))
    finally:
        process.terminate()
        process.wait(timeout=30)


@flower_app.command("certificates")
@user_errors
def flower_certificates(
    out: Annotated[Path, typer.Argument(help="Folder for ca.crt, server.pem, server.key and node keys.")],
    host: Annotated[list[str], typer.Option(help="Name or address the SuperLink is reached at; repeatable.")] = [],
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to write (node_K, node_K.pub).")] = 0,
) -> None:
    """Write a self-signed CA, a SuperLink certificate and SuperNode keys for a test (production: a real CA)."""
    from fedefm.federated.flower.certificates import write_node_key, write_test_certificates

    written = write_test_certificates(out, tuple(host) or ("127.0.0.1", "localhost"))
    written += tuple(path for k in range(nodes) for path in write_node_key(out, f"node_{k}"))
    console.print("wrote " + ", ".join(str(path) for path in written), highlight=False, soft_wrap=True)


@flower_app.command("register-node")
@user_errors
def flower_register_node(
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")],
    public_key: Annotated[Path, typer.Option(help="The SuperNode's public key (node_K.pub).")],
    root_certificates: Annotated[Optional[Path], typer.Option(help="CA certificate of the SuperLink's TLS.")] = None,
) -> None:
    """Allow a SuperNode's key on a SuperLink started with --enable-supernode-auth."""
    import tempfile

    from fedefm.federated.flower.deploy import register_node, write_connection

    with tempfile.TemporaryDirectory() as home:
        write_connection(Path(home), superlink, root_certificates)
        console.print(f"registered {public_key} as node {register_node(Path(home), public_key)}")


@flower_app.command("app")
@user_errors
def flower_app_folder(
    out: Annotated[Path, typer.Argument(help="Folder for the Flower App's pyproject.toml.")],
) -> None:
    """Write the fedefm Flower App folder, for `flwr run OUT CONNECTION --run-config '...'`."""
    from fedefm.federated.flower.deploy import write_app

    console.print(f"wrote {write_app(out, {}) / 'pyproject.toml'}")


@flower_app.command("run")
@user_errors
def flower_run(
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")],
    out: Annotated[Path, typer.Option(help="Run folder, written on the SuperLink's machine.")],
    data: Annotated[Optional[Path], typer.Option(help="Corpus on the SuperLink's machine whose validation and test "
                                                      "splits score the global model (default: none; each silo "
                                                      "scores on images it holds out).")] = None,
    algorithm: Annotated[str, typer.Option(help="fedavg, fedprox, moon, dpsgd, matcha, fedefm, fedefm_literal or fedefm_released.")] = "fedefm",
    topology: Annotated[Optional[str], typer.Option(help="star, ring, mst, complete or matcha.")] = None,
    silos: Annotated[int, typer.Option(help="SuperNodes to wait for (silo ids 0 … S-1).")] = 3,
    rounds: Annotated[int, typer.Option(help="Communication rounds.")] = 50,
    local_steps: Annotated[int, typer.Option(help="SGD steps per silo per round.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option(help="SGD learning rate.")] = 0.05,
    preset: Annotated[str, typer.Option(help="tiny, small or paper.")] = "tiny",
    image_size: Annotated[Optional[int], typer.Option(help="Training resolution (default: the preset's).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Replace the preset's dropout (0: no random masks).")] = None,
    eval_every: Annotated[int, typer.Option(help="Rounds between validation evaluations.")] = 5,
    option: Annotated[list[str], typer.Option(help="Algorithm setting NAME=VALUE; repeatable.")] = [],
    val_fraction: Annotated[float, typer.Option(help="Share of each class held out for validation (of --data, "
                                                     "or, without it, of each silo's images).")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of each class held out for the test, likewise.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of partition, init, batches and topology draws.")] = 0,
    root_certificates: Annotated[Optional[Path], typer.Option(help="CA certificate of the SuperLink's TLS.")] = None,
    reply_timeout: Annotated[float, typer.Option(help="Seconds to wait for a silo's reply before it is left out "
                                                      "of that round.")] = 600,
    min_healthy_silos: Annotated[int, typer.Option(help="Stop when fewer silos come through a round.")] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the whole run.")] = 24 * 3600,
    overwrite: Annotated[bool, typer.Option(help="Replace the fedefm run already in --out (it is deleted first).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last intact checkpoint.")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Rounds between the relay's checkpoints.")] = 10,
) -> None:
    """Launch a pre-training over the SuperNodes and wait; the SuperLink's machine gets the run folder."""
    from fedefm.federated.flower.deploy import run_federation

    settings = {"algorithm": algorithm, "topology": topology, "silos": silos, "rounds": rounds,
                "local-steps": local_steps, "batch-size": batch_size, "lr": lr, "preset": preset,
                "image-size": image_size, "dropout": dropout, "eval-every": eval_every, "options": " ".join(option),
                "val-fraction": val_fraction, "test-fraction": test_fraction, "seed": seed,
                "data": str(data.resolve()) if data else "", "out": str(out.resolve()), "overwrite": overwrite,
                "resume": resume, "checkpoint-every": checkpoint_every, "reply-timeout": reply_timeout,
                "min-healthy-silos": min_healthy_silos}
    record = run_federation(superlink, {k: v for k, v in settings.items() if v is not None}, root_certificates, timeout)
    traffic = record["network-traffic"]
    console.print(f"Flower run {record['run-id']} {record['status']} in {record['elapsed']:.0f} s, "
                  f"{traffic['total-bytes'] / 1e6:.1f} MB through the SuperLink; run folder {out}")
