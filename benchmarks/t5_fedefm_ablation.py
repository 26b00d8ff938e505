"""T5 — FedEFM ablations: what each part of the method is worth, at 100% unseen on the Gaia ring.

    python benchmarks/t5_fedefm_ablation.py --out bench_out/t5 --threads 1     # full: 12 variants x 3 seeds
    python benchmarks/t5_fedefm_ablation.py --out bench_out/t5 --variants emd uniform released kl_only
    python benchmarks/t5_fedefm_ablation.py --quick --out bench_out/t5_quick   # seconds

Variants (FedEFM's Config in federated/algorithms/fedefm.py; every other setting at its default):
emd (the default: EMD-weighted multishot distillation), uniform (every expert weighed equally, no EMD),
released (no distillation: experts averaged, as the authors' released code does), kl_only (β = 1: no
cross-entropy on the home labels), beta0.25 / beta0.75, temp1 / temp8 (distillation temperature T),
sinkhorn (entropic instead of exact EMD), star_shots1 / star_shots4 (client-server, the server relays each
model to 1 or 4 other silos a round) and complete (every silo is a neighbour). Same rounds, local steps E,
batch and learning rate for all.

Result rows: the columns of T1 (t1_foundation.py); ``setting`` holds the variant's settings as text.
Tables: T1's two tables over the variants; rounds to 95% is measured against the default (emd).
"""

from __future__ import annotations

import common

from fedefm.results import budget_summary, foundation_summary, markdown, read_results

TABLE = "T5"
VARIANTS = {
    "emd": {},
    "uniform": {"options": {"uniform_weights": True}},
    "released": {"algorithm": "fedefm_released"},
    "kl_only": {"options": {"beta": 1.0}},
    "beta0.25": {"options": {"beta": 0.25}},
    "beta0.75": {"options": {"beta": 0.75}},
    "temp1": {"options": {"temperature": 1.0}},
    "temp8": {"options": {"temperature": 8.0}},
    "sinkhorn": {"options": {"emd_solver": "sinkhorn"}},
    "star_shots1": {"topology": "star", "shots": 1},
    "star_shots4": {"topology": "star", "shots": 4},
    "complete": {"topology": "complete"},
}
QUICK_VARIANTS = ["emd", "uniform", "released", "kl_only", "sinkhorn", "star_shots1"]


def variant(name: str) -> common.Pretraining:
    """The FedEFM configuration called ``name`` (ring unless the variant says otherwise)."""
    spec = {"algorithm": "fedefm", "topology": "ring", "options": {}, "shots": 2} | VARIANTS[name]
    described = ([f"algorithm={spec['algorithm']}"] if spec["algorithm"] != "fedefm" else []) + [
        f"{k}={v}" for k, v in spec["options"].items()] + [f"topology={spec['topology']}"]
    if spec["topology"] == "star":
        described.append(f"shots={spec['shots']}")
    return common.Pretraining(name, spec["algorithm"], ", ".join(described), topology=spec["topology"],
                              options=spec["options"], shots=spec["shots"])


def tables(results: list[dict]) -> str:
    """T1's tables over the variants, rounds to 95% against the default."""
    return markdown(foundation_summary(results, reference="emd")) + "\n\n" + markdown(budget_summary(results))


def main() -> None:
    parser = common.parser_for(__doc__)
    common.add_pretrain_args(parser, rounds=100)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if not args.tables:
        if args.quick:
            common.quick_pretrain(args)
            args.variants = QUICK_VARIANTS
        common.run_pretrainings(args, TABLE, [variant(name) for name in args.variants])
    print("\n" + tables(read_results(args.out / common.RESULT_FILE)))


if __name__ == "__main__":
    common.run_script(main)
