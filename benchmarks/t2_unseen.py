"""T2 — the unseen-share ablation: FedAvg, D-PSGD and FedEFM as the share of unseen data grows.

    python benchmarks/t2_unseen.py --out bench_out/t2 --threads 1        # full: 3 algorithms x 5 shares x 3 seeds
    python benchmarks/t2_unseen.py --quick --out bench_out/t2_quick      # seconds

unseen = u means a share u of each data type lives only at its owner silo and the rest is spread over all
silos (data/partition.py, the paper's protocol); u = 0 is IID, u = 1 one data type per silo. Every run has the
same rounds, local steps E, batch and learning rate; FedAvg over a star, D-PSGD and FedEFM over the Gaia ring.

Full mode runs 50 rounds (T1 runs 150) so that its 45 runs fit in about an hour on 2 CPU cores; pass
--rounds to go longer.

Result rows: the columns of T1 (t1_foundation.py), ``name`` being ALGORITHM_uSHARE (e.g. fedavg_u0.25).
Table: test accuracy (mean ± std over seeds) per algorithm and unseen share.
"""

from __future__ import annotations

import common

from fedefm.results import group, markdown, mean_std, read_results

TABLE = "T2"
ALGORITHMS = {"fedavg": ("CFL", "star"), "dpsgd": ("DFL", "ring"), "fedefm": ("DFL", "ring")}
SHARES = [0.0, 0.25, 0.5, 0.75, 1.0]


def plan(algorithms: list[str], shares: list[float]) -> list[common.Pretraining]:
    """One configuration per (algorithm, unseen share)."""
    return [common.Pretraining(f"{name}_u{share:g}", name, ALGORITHMS[name][0], topology=ALGORITHMS[name][1],
                               unseen=share) for name in algorithms for share in shares]


def tables(results: list[dict]) -> str:
    """Test accuracy, one line per algorithm, one column per unseen share."""
    shares = sorted({r["unseen"] for r in results})
    lines = [[algorithm] + [mean_std(r["summary"]["test_acc"] for r in runs if r["unseen"] == share)
                            for share in shares] + [str(len({r["seed"] for r in runs}))]
             for algorithm, runs in group(results, lambda r: r["algorithm"]).items()]
    return markdown((["algorithm"] + [f"test acc, unseen {share:g}" for share in shares] + ["seeds"], lines))


def main() -> None:
    parser = common.parser_for(__doc__)
    common.add_pretrain_args(parser, rounds=50)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--shares", nargs="+", type=float, default=SHARES)
    args = parser.parse_args()
    if not args.tables:
        if args.quick:
            common.quick_pretrain(args)
            args.shares = [0.0, 1.0]
        common.run_pretrainings(args, TABLE, plan(args.algorithms, args.shares))
    print("\n" + tables(read_results(args.out / common.RESULT_FILE)))


if __name__ == "__main__":
    common.run_script(main)
