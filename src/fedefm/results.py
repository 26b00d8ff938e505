"""Benchmark result files (``OUT/results.jsonl``) and the summaries that tables, BENCHMARKS.md and the report share.

A summary is ``(header, rows)``: column names and rows of cell text, mean ± std over seeds. The benchmark
scripts print it as markdown, ``fedefm report`` as HTML, so both show the same numbers.

Three kinds of result rows exist (the columns each benchmark script documents):

* foundation rows (T1, T2, T5): ``name``, ``seed``, ``options``, ``summary`` (the run's summary.json),
  ``rows`` (its metrics.jsonl) and the run's settings (``algorithm``, ``topology``, ``unseen``, ...);
* downstream segmentation rows (T3, T4): ``domain``, ``shots``, ``seed``, ``init``, ``arch``, ``test`` (evaluate JSON);
* position rows (T6): ``shots``, ``seed``, ``init``, ``test`` (classification evaluate JSON), tabled by their script.

Every row also records ``table``, ``machine``, ``command`` and ``wall_s``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedefm.data.labels import DEVICE_LABELS
from fedefm.errors import DataError

Summary = tuple[list[str], list[list[str]]]
DOWNSTREAM_METRICS = ("dice", "iou", "cldice", "hd95")


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every row of a results.jsonl file; a missing, empty or broken file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no result file; run the benchmark script that writes it first")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not JSON ({exc}); a run may have been cut off, "
                            "delete the line") from exc
    if not rows:
        raise DataError(f"{path}: holds no results; run the benchmark script that writes it first")
    return rows


def mean_std(values: Iterable[float | None], digits: int = 3) -> str:
    """'mean ± std' of the defined values (population std over seeds), '-' when none is defined."""
    defined = [v for v in values if v is not None and not np.isnan(v)]
    return f"{np.mean(defined):.{digits}f} ± {np.std(defined):.{digits}f}" if defined else "-"


def group(rows: list[dict], key: Callable[[dict], Any]) -> dict[Any, list[dict]]:
    """Rows grouped by ``key(row)``, groups in order of first appearance."""
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def is_foundation(row: dict) -> bool:
    """A pre-training result (it carries the run's summary and metrics rows)."""
    return "summary" in row and "rows" in row


def is_downstream(row: dict) -> bool:
    """A segmentation fine-tuning result (T3, T4: it names its domain and carries the test split's evaluate JSON)."""
    return "domain" in row and "test" in row


def curve(rows: list[dict], key: str = "grad_steps") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rounds, cumulative ``key``, validation accuracy) at the evaluated rounds of a metrics.jsonl."""
    cumulative = np.cumsum([r[key] for r in rows])
    evaluated = [(r["round"], cumulative[i], r["val_acc"]) for i, r in enumerate(rows) if r["val_acc"] is not None]
    if not evaluated:
        return np.array([]), np.array([]), np.array([])
    return tuple(np.array(column) for column in zip(*evaluated))


def rounds_to_reach(rows: list[dict], target: float) -> int | None:
    """First evaluated round whose 3-evaluation moving average of validation accuracy reaches ``target``."""
    rounds, _, acc = curve(rows)
    if acc.size < 3:
        return None
    smooth = np.convolve(acc, np.ones(3) / 3, mode="valid")
    hits = np.nonzero(smooth >= target)[0]
    return int(rounds[hits[0] + 2]) if hits.size else None


def accuracy_at(rows: list[dict], key: str, budget: float) -> float:
    """Validation accuracy at the last evaluation whose cumulative ``key`` is within ``budget`` (NaN if none)."""
    _, spent, acc = curve(rows, key)
    within = np.nonzero(spent <= budget)[0]
    return float(acc[within[-1]]) if within.size else float("nan")


def foundation_summary(results: list[dict], reference: str = "centralized") -> Summary:
    """One line per run name: test and validation accuracy, rounds to 95% of ``reference``, cost per round.

    The cost columns (gradient steps, MB sent, median cycle time per round) come from the runs' metrics
    rows; rounds to 95% is '-' when no ``reference`` run is among the results.
    """
    by_name = group([r for r in results if is_foundation(r)], lambda r: r["name"])
    anchor = by_name.get(reference)
    target = 0.95 * np.mean([r["summary"]["final_val_acc"] for r in anchor]) if anchor else None
    header = ["setting", "run", "test acc", "val acc (last 5 evals)", f"rounds to 95% of {reference}",
              "grad steps/round", "MB/round", "cycle time (s)", "seeds"]
    lines = []
    for name, runs in by_name.items():
        reach = [rounds_to_reach(r["rows"], target) for r in runs] if target else []
        metrics = [m for r in runs for m in r["rows"]]
        cycle = [m["cycle_time_s"] for m in metrics if m["cycle_time_s"] is not None]
        lines.append([
            runs[0].get("setting", "-"),
            name,
            mean_std(r["summary"]["test_acc"] for r in runs),
            mean_std(r["summary"]["final_val_acc"] for r in runs),
            ", ".join("never" if x is None else str(x) for x in reach) if target else "-",
            f"{np.mean([m['grad_steps'] for m in metrics]):.0f}",
            f"{np.mean([m['bytes_sent'] for m in metrics]) / 1e6:.1f}",
            f"{np.median(cycle):.3f}" if cycle else "-",
            str(len(runs)),
        ])
    return header, lines


def budget_summary(results: list[dict]) -> Summary:
    """Validation accuracy at equal gradient steps and at equal bytes sent (the smallest total among the runs)."""
    runs = [r for r in results if is_foundation(r)]
    step_budget = min(r["summary"]["grad_steps"] for r in runs)
    sending = [r for r in runs if r["summary"]["bytes_sent"] > 0]
    byte_budget = min(r["summary"]["bytes_sent"] for r in sending) if sending else 0
    header = ["run", f"val acc at {step_budget} gradient steps", f"val acc at {byte_budget / 1e9:.3f} GB sent"]
    lines = []
    for name, group_runs in group(runs, lambda r: r["name"]).items():
        at_steps = mean_std(accuracy_at(r["rows"], "grad_steps", step_budget) for r in group_runs)
        at_bytes = (mean_std(accuracy_at(r["rows"], "bytes_sent", byte_budget) for r in group_runs)
                    if group_runs[0]["summary"]["bytes_sent"] > 0 else "-")
        lines.append([name, at_steps, at_bytes])
    return header, lines


def downstream_summary(results: list[dict], keys: tuple[str, ...] = ("domain", "shots", "init")) -> Summary:
    """One line per ``keys`` value: test Dice, IoU, clDice and HD95 (px) per device class, mean ± std over seeds."""
    header = list(keys) + [f"{c} {m}" for c in DEVICE_LABELS for m in ("Dice", "IoU", "clDice", "HD95")] + ["seeds"]
    lines = []
    for values, runs in group([r for r in results if is_downstream(r)], lambda r: tuple(r[k] for k in keys)).items():
        cells = [mean_std((r["test"]["per_class"][c][m] for r in runs), digits=1 if m == "hd95" else 3)
                 for c in DEVICE_LABELS for m in DOWNSTREAM_METRICS]
        lines.append([str(v) for v in values] + cells + [str(len(runs))])
    return header, lines


def markdown(summary: Summary) -> str:
    """A summary as a GitHub markdown table."""
    header, lines = summary
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(line) + " |" for line in lines])
