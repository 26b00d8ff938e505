"""T4 — backbones: U-Net, TransUNet and SwinUNETR, with foundation initialisation where the architecture allows.

    python benchmarks/t4_backbones.py --out bench_out/t4 --foundation bench_out/t1 --threads 1   # full
    python benchmarks/t4_backbones.py --quick --out bench_out/t4_quick --foundation bench_out/t1_quick

Only TransUNet shares the hybrid encoder that pre-training trains, so it runs from scratch and from the
fedefm_ring weights of T1 (--foundation); U-Net and SwinUNETR (MONAI) run from scratch. Full: the clinical
domain, K in {4, 16}, 3 seeds, tiny preset, 64 px, 20 epochs; the same epochs, batch and learning rate for every
backbone.

Result rows: the columns of T3 (t3_downstream.py), with ``arch`` the backbone.
Table: per backbone, initialisation and K, test Dice / IoU / clDice / HD95 (px) per class, mean ± std over seeds.
"""

from __future__ import annotations

import common
from t3_downstream import add_finetune_args, init_weights, quick_finetune, run_finetunings

from fedefm.data.synth import DOMAINS
from fedefm.results import downstream_summary, markdown, read_results

TABLE = "T4"
PLAN = [("unet", "scratch"), ("swinunetr", "scratch"), ("transunet", "scratch"), ("transunet", "fedefm_ring")]


def tables(results: list[dict]) -> str:
    """Test scores per backbone, initialisation and K."""
    return markdown(downstream_summary(results, keys=("arch", "init", "shots")))


def main() -> None:
    parser = common.parser_for(__doc__)
    add_finetune_args(parser, shots=[4, 16])
    parser.add_argument("--domain", default="clinical", choices=list(DOMAINS))
    parser.add_argument("--foundation-run", default="fedefm_ring", help="the T1 run whose weights start TransUNet")
    args = parser.parse_args()
    if not args.tables:
        if args.quick:
            quick_finetune(args)
            args.size = 64  # SwinUNETR's deepest map is 1/32 of the side; instance norm needs more than 1x1
        plan = [(arch, args.foundation_run if init != "scratch" else init) for arch, init in PLAN]
        if args.foundation is None:
            plan = [(arch, init) for arch, init in plan if init == "scratch"]
            print("no --foundation: TransUNet runs from scratch only")
        for _, init in plan:
            for seed in args.seeds:
                init_weights(args, init, seed)
        run_finetunings(args, TABLE, [(args.domain, arch, init) for arch, init in plan])
    print("\n" + tables(read_results(args.out / common.RESULT_FILE)))


if __name__ == "__main__":
    common.run_script(main)
