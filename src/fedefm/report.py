"""``fedefm report``: one self-contained HTML page (figures embedded as PNG) from run folders and benchmark outputs.

The page has six sections, always in this order; a section whose inputs are absent says what it needed:
accuracy vs round, silo × class partition, consensus distance, cycle time and cost, downstream tables,
prediction overlays. Inputs are folders searched recursively for pre-training runs (config.json of command
``pretrain``), fine-tuning runs (command ``finetune``) and benchmark result files (``results.jsonl``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedefm.data.datasets import find_segmentation_splits, read_item_mask  # noqa: E402
from fedefm.data.readers import read_image  # noqa: E402
from fedefm.errors import ConfigError, DataError, FedefmError  # noqa: E402
from fedefm.files import atomic_write  # noqa: E402
from fedefm.finetune.evaluate import split_settings  # noqa: E402
from fedefm.finetune.predict import overlay, segment  # noqa: E402
from fedefm.models.weights import build_from_weights, load_weights  # noqa: E402
from fedefm.results import (  # noqa: E402
    Summary,
    downstream_summary,
    foundation_summary,
    group,
    is_downstream,
    is_foundation,
    mean_std,
    read_results,
)

SECTIONS = ("Accuracy vs round", "Silo × class partition", "Consensus distance", "Cycle time and cost",
            "Downstream tables", "Prediction overlays")
MAX_OVERLAY_RUNS = 8
OVERLAY_IMAGES = 2
DOWNSTREAM_KEYS = {"T3": ("domain", "shots", "init"), "T4": ("arch", "init", "shots"), "T7": ("setting", "shots", "init")}
# The columns of a pre-training metrics row that the report's sections read.
METRICS_COLUMNS = ("round", "val_acc", "grad_steps", "bytes_sent", "cycle_time_s")

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """What was found under the report's input folders."""

    pretrain_runs: list[Path] = field(default_factory=list)
    finetune_runs: list[Path] = field(default_factory=list)
    result_files: list[Path] = field(default_factory=list)


def find_inputs(folders: list[Path]) -> Inputs:
    """Pre-training and fine-tuning run folders and results.jsonl files under ``folders``, sorted by path."""
    found = Inputs()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such folder; pass run folders or benchmark output folders")
        for config in sorted(folder.rglob("config.json")):
            try:
                command = json.loads(config.read_text()).get("command")
            except (json.JSONDecodeError, AttributeError):
                continue
            if command == "pretrain" and (config.parent / "metrics.jsonl").is_file():
                found.pretrain_runs.append(config.parent)
            elif command == "finetune" and (config.parent / "model.safetensors").is_file():
                found.finetune_runs.append(config.parent)
        found.result_files += sorted(folder.rglob("results.jsonl"))
    if not (found.pretrain_runs or found.finetune_runs or found.result_files):
        raise DataError(f"{', '.join(map(str, folders))}: no pre-training or fine-tuning run folder and no "
                        "results.jsonl found; pass the --out folder of fedefm pretrain/finetune or of a benchmark")
    return found


def run_label(run: Path) -> str:
    """A run's name without its seed suffix: runs/fedavg_s1 → fedavg."""
    return re.sub(r"_s\d+$", "", run.name)


def foundation_records(inputs: Inputs) -> list[dict[str, Any]]:
    """Foundation rows of the result files, plus a row built from every pre-training run folder they do not cover."""
    # The foundation sections plot data-type accuracy: dense pre-trainings (val_dice, val_psnr) are T7's table.
    records = [r for path in inputs.result_files for r in read_results(path)
               if is_foundation(r) and "test_acc" in r["summary"]]
    covered = {Path(r["run"]).resolve() for r in records if "run" in r}
    for run in inputs.pretrain_runs:
        summary = run / "summary.json"
        if run.resolve() in covered or not summary.is_file():
            continue
        try:
            seed, summary_json = json.loads((run / "config.json").read_text())["seed"], json.loads(summary.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            log.warning("%s: skipped, its config.json or summary.json is broken (%s)", run, exc)
            continue
        if "test_acc" not in summary_json:
            continue  # a dense pre-training: no data-type accuracy to plot
        records.append({"name": run_label(run), "seed": seed, "run": str(run), "summary": summary_json,
                        "rows": read_metrics(run / "metrics.jsonl")})
    return records


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a pre-training run's metrics.jsonl; a line cut off, not JSON or without a column the report
    reads is skipped with a warning naming the file and line."""
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not all(key in row for key in METRICS_COLUMNS):
            log.warning("%s, line %d: skipped, not a whole metrics row (a run cut off while writing it?)", path, number)
            continue
        rows.append(row)
    return rows


def figure_html(fig: plt.Figure, alt: str) -> str:
    """An <img> holding the figure as a base64 PNG (the page needs no other file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def table_html(summary: Summary, caption: str = "") -> str:
    """A summary's (header, rows) as an HTML table."""
    header, lines = summary
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in lines)
    title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def absent(text: str) -> str:
    """The note a section shows instead of content it has no input for."""
    return f'<p class="absent">Not shown: {html.escape(text)}</p>'


def accuracy_section(records: list[dict]) -> str:
    """Validation accuracy of the global model against the round, one colour per run name, one line per seed."""
    curves = [r for r in records if any(m["val_acc"] is not None for m in r["rows"])]
    if not curves:
        return absent("no pre-training run with validation rows (metrics.jsonl) among the inputs.")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.colormaps["tab20"].colors
    for k, (name, runs) in enumerate(group(curves, lambda r: r["name"]).items()):
        for i, run in enumerate(runs):
            points = [(m["round"], m["val_acc"]) for m in run["rows"] if m["val_acc"] is not None]
            ax.plot(*zip(*points), color=colours[k % len(colours)], alpha=0.85, marker=".",
                    label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})" if i == 0 else None)
    ax.set(xlabel="round", ylabel="validation accuracy (global model)", ylim=(0, 1))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return figure_html(fig, "validation accuracy against round")


def read_partition(path: Path) -> tuple[list[str], np.ndarray]:
    """partition.txt's first table (silo × class; a silo × label-type table may follow) → (class names, counts (S, C))."""
    first = path.read_text().split("\n\n")[0]
    lines = [line.split() for line in first.splitlines() if line.strip()]
    classes = lines[0][1:-1]
    counts = np.array([[int(x) for x in line[1:-1]] for line in lines[1:] if line[0].isdigit()])
    return classes, counts


def partition_section(runs: list[Path]) -> str:
    """A heat map per distinct partition among the runs (runs sharing one are named under it)."""
    with_table = [run for run in runs if (run / "partition.txt").is_file()]
    tables = group(with_table, lambda run: (run / "partition.txt").read_text())
    if not tables:
        return absent("no pre-training run folder with partition.txt among the inputs.")
    parts = []
    for text, sharing in list(tables.items())[:6]:
        classes, counts = read_partition(sharing[0] / "partition.txt")
        fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(classes), 0.8 + 0.45 * len(counts)))
        ax.imshow(counts, cmap="Blues", aspect="auto", vmin=0)
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                    color="white" if value > counts.max() / 2 else "black")
        ax.set(xticks=range(len(classes)), yticks=range(len(counts)), xlabel="class (data type)", ylabel="silo")
        ax.set_xticklabels(classes, rotation=30, ha="right")
        names = ", ".join(sorted({run_label(run) for run in sharing}))
        parts.append(f"<figure>{figure_html(fig, 'silo by class partition')}<figcaption>training images per silo "
                     f"and class; runs: {html.escape(names)}</figcaption></figure>")
    more = len(tables) - 6
    return "".join(parts) + (f"<p>{more} more distinct partitions not drawn.</p>" if more > 0 else "")


def consensus_distance(run: Path) -> float | None:
    """Mean L2 distance of the silo models' weights to their mean, over RUN/silos/*.safetensors (None if < 2)."""
    files = sorted((run / "silos").glob("*.safetensors"))
    if len(files) < 2:
        return None
    vectors = []
    for path in files:
        tensors, _ = load_weights(path)
        floats = [tensors[k].flatten().double() for k in sorted(tensors) if tensors[k].is_floating_point()]
        vectors.append(torch.cat(floats))
    stacked = torch.stack(vectors)
    return float((stacked - stacked.mean(0)).norm(dim=1).mean())


def consensus_section(runs: list[Path], records: list[dict]) -> str:
    """Consensus distance of the final silo models per run name, and per round where metrics.jsonl records it."""
    distances = []
    for run in runs:
        try:
            distances.append((run_label(run), consensus_distance(run)))
        except FedefmError as exc:
            log.warning("%s: left out of the consensus distance (%s)", run, exc)
    distances = [(name, d) for name, d in distances if d is not None]
    if not distances:
        return absent("no pre-training run folder with two or more silos/*.safetensors among the inputs "
                      "(centralized runs have one silo).")
    by_name = group([{"name": n, "d": d} for n, d in distances], lambda r: r["name"])
    summary = (["run", "consensus distance of the final silo models (mean ± std over seeds)", "seeds"],
               [[name, mean_std((r["d"] for r in rows), digits=4), str(len(rows))] for name, rows in by_name.items()])
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(by_name)), 3.5))
    ax.bar(range(len(by_name)), [np.mean([r["d"] for r in rows]) for rows in by_name.values()],
           yerr=[np.std([r["d"] for r in rows]) for rows in by_name.values()], color="#4c72b0", capsize=3)
    ax.set_xticks(range(len(by_name)), list(by_name), rotation=30, ha="right")
    ax.set_ylabel("mean ‖θ_i − θ̄‖₂")
    per_round = [r for r in records if any(m.get("consensus_distance") is not None for m in r["rows"])]
    if per_round:
        fig2, ax2 = plt.subplots(figsize=(8, 3.5))
        for run in per_round:
            points = [(m["round"], m["consensus_distance"]) for m in run["rows"]
                      if m.get("consensus_distance") is not None]
            ax2.plot(*zip(*points), label=f"{run['name']} s{run['seed']}")
        ax2.set(xlabel="round", ylabel="consensus distance")
        ax2.legend(fontsize=8)
        rounds = figure_html(fig2, "consensus distance against round")
    else:
        rounds = absent("per-round consensus distance (metrics.jsonl rows carry no consensus_distance); "
                        "the final silo models are compared above.")
    return (table_html(summary, "mean over silos of the L2 distance between a silo's weights and the silos' mean")
            + figure_html(fig, "consensus distance per run") + rounds)


def cost_section(records: list[dict]) -> str:
    """Accuracy and cost per round (gradient steps, MB sent, modelled cycle time) per run name."""
    if not records:
        return absent("no pre-training run folder or foundation result row among the inputs.")
    return table_html(foundation_summary(records), "cycle time: Marfoq et al.'s max-plus model on the run's underlay, "
                      "median over rounds; rounds to 95% needs a centralized run among the inputs")


def downstream_section(result_files: list[Path]) -> str:
    """The fine-tuning tables of the result files (T3 by domain, K and init; T4 by backbone)."""
    rows = [r for path in result_files for r in read_results(path) if is_downstream(r)]
    if not rows:
        return absent("no downstream result rows (results.jsonl of t3_downstream.py or t4_backbones.py) "
                      "among the inputs.")
    parts = []
    for table, table_rows in group(rows, lambda r: r.get("table", "downstream")).items():
        keys = DOWNSTREAM_KEYS.get(table, ("domain", "arch", "init", "shots"))
        parts.append(table_html(downstream_summary(table_rows, keys), f"{table}: test split, mean ± std over seeds"))
    return "".join(parts)


def overlay_tiles(run: Path) -> list[tuple[str, np.ndarray]]:
    """(title, RGB image) for image, truth and prediction of the first test images of a fine-tuning run."""
    data = Path(json.loads((run / "config.json").read_text())["config"]["data"])
    if not data.is_dir():
        raise DataError(f"{run}: its dataset {data} is gone")
    items = find_segmentation_splits(data, **split_settings(run))["test"][:OVERLAY_IMAGES]
    if not items:
        raise DataError(f"{run}: the test split of {data} is empty")
    model, metadata = build_from_weights(run / "model.safetensors")
    model.eval()
    tiles = []
    for item in items:
        image = read_image(item.image, item.frame)
        truth = read_item_mask(item)
        prediction = segment(model, image, int(metadata["image_size"]))
        grey = np.repeat((image[..., None] * 255).astype(np.uint8), 3, axis=-1)
        tiles += [(item.name, grey), ("truth", overlay(image, truth)), ("prediction", overlay(image, prediction))]
    return tiles


def overlay_section(runs: list[Path]) -> str:
    """A grid: one row per fine-tuning run, image / truth / prediction for its first test images."""
    if not runs:
        return absent("no fine-tuning run folder (config.json + model.safetensors) among the inputs.")
    shown, skipped = [], []
    for run in runs[:MAX_OVERLAY_RUNS]:
        try:
            shown.append((run, overlay_tiles(run)))
        except (FedefmError, OSError) as exc:
            skipped.append(f"{run}: {exc}")
    parts = []
    if shown:
        columns = max(len(tiles) for _, tiles in shown)
        fig, axes = plt.subplots(len(shown), columns, figsize=(2.0 * columns, 2.4 * len(shown)), squeeze=False)
        for row, (run, tiles) in enumerate(shown):
            for col, ax in enumerate(axes[row]):
                ax.axis("off")
                if col < len(tiles):
                    ax.imshow(tiles[col][1])
                    ax.set_title(tiles[col][0], fontsize=7)
            axes[row][0].set_title(f"{run.name}\n{tiles[0][0]}", fontsize=7, loc="left")
        rows = ", ".join(html.escape(str(run)) for run, _ in shown)
        parts.append(figure_html(fig, "prediction overlays") + "<p>catheter orange, guidewire cyan; test images, "
                     f"model selected on validation. Rows: {rows}.</p>")
    if len(runs) > MAX_OVERLAY_RUNS:
        parts.append(f"<p>{len(runs) - MAX_OVERLAY_RUNS} more fine-tuning runs not drawn.</p>")
    parts += [absent(reason) for reason in skipped]
    return "".join(parts)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; white-space: nowrap; }
th { background: #f0f3f7; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-style: italic; padding: .3em 0; }
img { max-width: 100%; } .scroll { overflow-x: auto; } figure { display: inline-block; margin: .5em 1em .5em 0; }
.absent { color: #8a5a00; background: #fff6e0; padding: .5em .8em; border-left: 4px solid #e0a000; }
"""


def build_report(folders: list[Path], out: Path) -> dict[str, bool]:
    """Write the HTML report of the runs and result files under ``folders``; returns {section: had content}."""
    inputs = find_inputs(folders)
    records = foundation_records(inputs)
    bodies = {
        "Accuracy vs round": accuracy_section(records),
        "Silo × class partition": partition_section(inputs.pretrain_runs),
        "Consensus distance": consensus_section(inputs.pretrain_runs, records),
        "Cycle time and cost": cost_section(records),
        "Downstream tables": downstream_section(inputs.result_files),
        "Prediction overlays": overlay_section(inputs.finetune_runs),
    }
    sources = "".join(f"<li>{html.escape(str(folder))}</li>" for folder in folders)
    found = (f"{len(inputs.pretrain_runs)} pre-training runs, {len(inputs.finetune_runs)} fine-tuning runs, "
             f"{len(inputs.result_files)} result files")
    sections = "".join(f'<section id="section-{k}"><h2>{html.escape(title)}</h2>{bodies[title]}</section>'
                       for k, title in enumerate(SECTIONS, start=1))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>fedefm report</title>'
            f"<style>{STYLE}</style></head><body><h1>fedefm report</h1><p>{found} from:</p><ul>{sources}</ul>"
            f"{sections}</body></html>\n")
    with atomic_write(out, "w") as f:
        f.write(page)
    return {title: not body.startswith('<p class="absent">') for title, body in bodies.items()}
