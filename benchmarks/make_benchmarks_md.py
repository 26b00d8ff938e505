"""Write BENCHMARKS.md from the benchmark result files only: no number in it is typed by hand.

    python benchmarks/make_benchmarks_md.py                      # benchmarks/results/t1 ... t8 → BENCHMARKS.md
    python benchmarks/make_benchmarks_md.py --results bench_out --file T3=bench_out/t3_long/results.jsonl

Table Tn is read from RESULTS/tn/results.jsonl (or the file given by --file Tn=PATH). A table whose result file
is missing is an error (exit 1) naming the file and the script that writes it: the page never silently drops
a table. Each table comes with the machine(s) it ran on, the exact command(s), the seeds, the number of runs
and their wall time summed over the runs. The statement of which paper claims the figures support is written by hand in
--claims (default benchmarks/claims.md) and copied in; without that file the page says it is not written yet.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import t1_foundation
import t2_unseen
import t3_downstream
import t4_backbones
import t5_fedefm_ablation
import t6_position
import t7_dense_foundation
import t8_guidewire
from common import RESULT_FILE, run_script

from fedefm.errors import DataError
from fedefm.files import atomic_write
from fedefm.results import read_results

TABLES: dict[str, tuple[str, str, Callable[[list[dict]], str]]] = {
    "T1": ("Foundation accuracy at 100% unseen (CLL, CFL, DFL)", "t1_foundation.py", t1_foundation.tables),
    "T2": ("Unseen-share ablation", "t2_unseen.py", t2_unseen.tables),
    "T3": ("Downstream few-shot segmentation", "t3_downstream.py", t3_downstream.tables),
    "T4": ("Backbones", "t4_backbones.py", t4_backbones.tables),
    "T5": ("FedEFM ablations", "t5_fedefm_ablation.py", t5_fedefm_ablation.tables),
    "T6": ("Few-shot catheter position: mean pooling against the device-anchored models (tip, mask, path) on a fixed "
           "test set",
           "t6_position.py", t6_position.tables),
    "T7": ("Dense foundations and whole-model transfer: few-shot segmentation on a fixed test set",
           "t7_dense_foundation.py", t7_dense_foundation.tables),
    "T8": ("Catheter and guidewire from scratch at 256 px: Dice, clDice and HD95 on a fixed test set",
           "t8_guidewire.py", t8_guidewire.tables),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"), help="folder holding t1/ ... t8/")
    parser.add_argument("--file", action="append", default=[], help="Tn=PATH: read table Tn from PATH instead")
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    parser.add_argument("--claims", type=Path, default=Path("benchmarks/claims.md"), help="hand-written statement")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    return parser.parse_args()


def result_paths(results: Path, overrides: list[str], tables: list[str]) -> dict[str, Path]:
    """Tn → its result file: RESULTS/tn/results.jsonl unless --file Tn=PATH names another."""
    paths = {table: results / table.lower() / RESULT_FILE for table in tables}
    for text in overrides:
        table, sep, path = text.partition("=")
        if not sep or table not in TABLES:
            raise DataError(f"--file {text}: expected Tn=PATH with Tn one of {', '.join(TABLES)}")
        paths[table] = Path(path)
    return paths


def describe_machine(machine: dict) -> str:
    """One line: CPU, cores, platform, software versions, torch threads (and GPU when there was one)."""
    gpu = f", GPU {machine['cuda']}" if machine.get("cuda") else ""
    return (f"{machine['cpu']} ({machine['cores']} cores{gpu}), {machine['platform']}, torch {machine['torch']}, "
            f"Python {machine['python']}, fedefm {machine['fedefm']}, {machine['threads']} torch thread(s)")


def section(table: str, path: Path) -> str:
    """The markdown of one table: provenance lines, then the table the script itself prints."""
    title, _, render = TABLES[table]
    rows = read_results(path)
    machines = sorted({describe_machine(r["machine"]) for r in rows if "machine" in r})
    commands = sorted({r["command"] for r in rows if "command" in r})
    seeds = sorted({r["seed"] for r in rows if "seed" in r})  # T6's first segmenter row predates its seed column
    wall = sum(r.get("wall_s", 0.0) for r in rows)
    lines = [f"## {table} — {title}", "", f"Result file: `{path}` ({len(rows)} runs, {wall / 60:.1f} min of wall "
             f"time, summed over the runs). Seeds: {', '.join(map(str, seeds))}.", ""]
    if any("--quick" in command for command in commands):
        lines += ["**Quick mode (CI-sized): these figures check that the script works; they measure nothing.**", ""]
    lines += ["Machine: " + ("; ".join(machines) or "not recorded (rows written before machines were recorded)"), "",
              "Command(s):", "", "```", *(commands or ["not recorded"]), "```", "", render(rows), ""]
    return "\n".join(lines)


def claims_section(path: Path) -> str:
    """The hand-written statement of which paper claims the figures support, or a note that it is missing."""
    text = path.read_text().strip() if path.is_file() else (
        f"_Not written yet: the statement of which of the paper's claims these figures support and which they do "
        f"not is written by hand, from the tables above, in `{path}`._")
    return "## What the figures say about the paper's claims\n\n" + text + "\n"


def main() -> None:
    args = parse_args()
    paths = result_paths(args.results, args.file, args.tables)
    missing = [f"{table} ({TABLES[table][0]}): result file {path} is missing; run python benchmarks/"
               f"{TABLES[table][1]} --out {path.parent} first (or pass --file {table}=PATH)"
               for table, path in paths.items() if not path.is_file()]
    if missing:
        raise DataError("; ".join(missing))
    sections = [section(table, paths[table]) for table in args.tables]
    page = "\n".join([
        "# Benchmarks", "",
        "Generated by `benchmarks/make_benchmarks_md.py` from the result files named under each table; do not edit "
        "by hand. Every figure is mean ± std over the seeds listed (population std); a difference smaller than "
        "the stds is inside the noise. Model selection uses the validation split only; each run scores the test "
        "split once.", "",
        *sections,
        claims_section(args.claims),
    ])
    with atomic_write(args.out, "w") as f:
        f.write(page)
    print(f"wrote {args.out}: {', '.join(args.tables)}")


if __name__ == "__main__":
    run_script(main)
