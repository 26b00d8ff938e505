"""T1 — foundation accuracy at 100% unseen: centralized learning (CLL), client-server (CFL) and decentralised (DFL).

    python benchmarks/t1_foundation.py --out bench_out/t1 --threads 1          # full: 8 runs x 3 seeds, 150 rounds
    python benchmarks/t1_foundation.py --out bench_out/t1 --tables             # tables of every recorded run
    python benchmarks/t1_foundation.py --quick --out bench_out/t1_quick        # seconds
    python benchmarks/t1_foundation.py --out bench_out/t1 --runs fedefm_ring --variant beta09:beta=0.9

Runs: CLL centralized (one silo with the pooled data); CFL fedavg, fedprox, moon and fedefm_star (FedEFM relayed
by a server to 2 other silos a round) over a star; DFL dpsgd (ring), matcha and fedefm_ring. Every run has the
same silos (one data type each, unseen = 1), rounds, local steps E, batch and learning rate; the underlay is Gaia.
The test split is scored once, at the end, on the final global model; nothing is selected on it.

Result rows (OUT/results.jsonl, one per run and seed), besides common.py's table/machine/command/wall_s:
``name``, ``setting`` (CLL/CFL/DFL), ``seed``, ``algorithm``, ``topology``, ``options``, ``unseen``, ``silos``,
``shots``, ``rounds``, ``local_steps``, ``batch_size``, ``image_size``, ``run`` (its folder), ``summary``
(summary.json: test_acc, final_val_acc, rounds, grad_steps, bytes_sent) and ``rows`` (metrics.jsonl).
Runs already in the file are skipped, so an interrupted full run continues where it stopped.

Tables, mean ± std over seeds: test accuracy, validation accuracy over the last 5 evaluations, the first round
whose 3-evaluation moving average of validation accuracy reaches 95% of centralized's, and the cost (gradient
steps, MB sent and modelled cycle time per round); then validation accuracy at equal gradient steps and at
equal bytes sent, since the algorithms spend different amounts of both per round.
"""

from __future__ import annotations

import common

from fedefm.config import parse_settings
from fedefm.results import budget_summary, foundation_summary, markdown, read_results

TABLE = "T1"
PLAN = [
    common.Pretraining("centralized", "centralized", "CLL"),
    common.Pretraining("fedavg", "fedavg", "CFL"),
    common.Pretraining("fedprox", "fedprox", "CFL"),
    common.Pretraining("moon", "moon", "CFL"),
    common.Pretraining("fedefm_star", "fedefm", "CFL", topology="star"),
    common.Pretraining("dpsgd", "dpsgd", "DFL"),
    common.Pretraining("matcha", "matcha", "DFL", topology="matcha"),
    common.Pretraining("fedefm_ring", "fedefm", "DFL", topology="ring"),
]


def parse_variant(text: str) -> common.Pretraining:
    """'beta09:beta=0.9,return_weight=0.5' → FedEFM over the ring with those options, named beta09."""
    name, _, settings = text.partition(":")
    return common.Pretraining(name, "fedefm", "DFL", topology="ring",
                              options=parse_settings([pair for pair in settings.split(",") if pair]))


def tables(results: list[dict]) -> str:
    """The two markdown tables of the module docstring."""
    return markdown(foundation_summary(results)) + "\n\n" + markdown(budget_summary(results))


def main() -> None:
    parser = common.parser_for(__doc__)
    common.add_pretrain_args(parser, rounds=150)
    parser.add_argument("--runs", nargs="*", default=[spec.name for spec in PLAN],
                        help="which of the table's runs (none: only the --variant runs)")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:key=value,key=value — an extra FedEFM (ring) configuration to run under NAME")
    args = parser.parse_args()
    if not args.tables:
        if args.quick:
            common.quick_pretrain(args)
        unknown = sorted(set(args.runs) - {spec.name for spec in PLAN})
        if unknown:
            parser.error(f"--runs {unknown[0]}: known: {', '.join(spec.name for spec in PLAN)}")
        plan = [spec for spec in PLAN if spec.name in args.runs] + [parse_variant(v) for v in args.variant]
        common.run_pretrainings(args, TABLE, plan)
    print("\n" + tables(read_results(args.out / common.RESULT_FILE)))


if __name__ == "__main__":
    common.run_script(main)
