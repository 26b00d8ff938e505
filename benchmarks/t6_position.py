"""T6 — downstream few-shot catheter position classification, from scratch or from foundation weights.

    python benchmarks/t6_position.py --out bench_out/t6 --foundation bench_out/t1 --threads 1   # full
    python benchmarks/t6_position.py --quick --out bench_out/t6_quick --foundation bench_out/t1_quick

The task is ``fedefm synth position`` (4 classes: the catheter tip in the aortic arch, the descending aorta
or a supra-aortic branch, or a looped catheter). Full: K in {4, 16, 64, 256} images per class x 4
initialisations (scratch and the centralized, dpsgd and fedefm_ring pre-trainings of T1, taken from
--foundation as in T3) x 3 seeds, tiny preset, 20 epochs, 2400 images of 64 px (the size T1 pre-trains at;
70% train, 15% validation, 15% test: 360 test images). K = 256 tells whether the task is learnable with
more labels at all. Every run selects its epoch on validation balanced accuracy and scores the test split once.

Result rows (OUT/results.jsonl), besides common.py's table/machine/command/wall_s: ``shots`` (K), ``seed``,
``init``, ``init_weights``, ``epochs``, ``image_size``, ``run``, ``transfer``, ``best_epoch``,
``val_balanced_accuracy`` (of the selected epoch) and ``test`` (evaluate JSON: accuracy, balanced accuracy,
macro F1, per class, confusion). Runs already in the file are skipped.
Table: per initialisation and K, test accuracy, balanced accuracy and macro F1, mean ± std over seeds.
"""

from __future__ import annotations

import time
from pathlib import Path

import common
import torch
from t3_downstream import init_weights

from fedefm.config import FinetuneConfig
from fedefm.demo import synthetic_data
from fedefm.finetune.classify import run as finetune
from fedefm.finetune.evaluate import evaluate_model
from fedefm.results import group, markdown, mean_std, read_results

TABLE = "T6"
INITS = ["scratch", "centralized", "dpsgd", "fedefm_ring"]
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def position_result(cfg: FinetuneConfig, init: str) -> dict:
    """Fine-tune one classifier (epoch selected on validation), score the test split once; the result row."""
    selected = finetune(cfg, progress=False, overwrite=True)  # a run not yet recorded is a leftover
    return {"shots": cfg.shots, "seed": cfg.seed, "init": init, "init_weights": cfg.init, "epochs": cfg.epochs,
            "image_size": cfg.image_size, "run": str(cfg.out), "transfer": selected["transfer"],
            "best_epoch": selected["best_epoch"], "val_balanced_accuracy": selected["val"]["balanced_accuracy"],
            "test": evaluate_model(Path(cfg.out), Path(cfg.data), "test")}


def tables(results: list[dict]) -> str:
    """Test accuracy, balanced accuracy and macro F1 per initialisation and K."""
    lines = [[init, str(shots)] + [mean_std(r["test"][m] for r in runs) for m in METRICS] + [str(len(runs))]
             for (init, shots), runs in group(results, lambda r: (r["init"], r["shots"])).items()]
    return markdown((["init", "K per class", "test accuracy", "balanced accuracy", "macro F1", "seeds"], lines))


def main() -> None:
    parser = common.parser_for(__doc__)
    parser.add_argument("--foundation", type=Path, help="T1 output folder holding runs/NAME_sSEED/global.safetensors")
    parser.add_argument("--inits", nargs="+", default=INITS, help="scratch and/or T1 run names")
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 16, 64, 256], help="K images per class")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=2400, help="synthetic images in all (split over 4 classes)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    if not args.tables:
        if args.quick:
            args.shots, args.seeds, args.images, args.size, args.epochs = [4], [0], 48, 32, 1
        weights = {(init, seed): init_weights(args, init, seed) for init in args.inits for seed in args.seeds}
        torch.set_num_threads(args.threads)
        data = synthetic_data(args.out / "data" / f"position_{args.size}", "position", 1000, n=args.images,
                              size=args.size)
        done = common.recorded(args.out, lambda r: (r["init"], r["shots"], r["seed"]))
        for init in args.inits:
            for shots in args.shots:
                for seed in args.seeds:
                    if (init, shots, seed) in done:
                        print(f"{init} K={shots} seed {seed}: already recorded, skipped", flush=True)
                        continue
                    started = time.perf_counter()
                    cfg = FinetuneConfig(data=data, out=args.out / "runs" / f"{init}_k{shots}_s{seed}",
                                         init=weights[init, seed], task="classify", shots=shots, epochs=args.epochs,
                                         image_size=args.size, seed=seed)
                    row = common.record(args.out, TABLE, position_result(cfg, init), started)
                    print(f"{init:12s} K={shots:3d} seed {seed}: test accuracy {row['test']['accuracy']:.3f} "
                          f"({row['wall_s']:.0f} s)", flush=True)
    print("\n" + tables(read_results(args.out / common.RESULT_FILE)))


if __name__ == "__main__":
    common.run_script(main)
