"""Throughput of fine-tuning and prediction.

    python benchmarks/bench_finetune.py [--quick] [--size 256] [--crop 128]

1. Training images/s of the full finetune loop (batch assembly and augmentation included, validation
   excluded, as logged in metrics.jsonl) against bare forward+backward+step of the same model on one
   fixed batch of the training samples' size (``--crop``, else fedefm's default crop for ``--size``,
   else ``--size``; default the tiny preset's). The loop should reach at least 90% of the bare figure.
2. predict images/s at 256×256 (read, resize, forward, write mask and overlay) for the tiny and paper presets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedefm.data.labels import LABEL_NAMES
from fedefm.demo import synthetic_data
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.predict import predict
from fedefm.finetune.train import run as finetune
from fedefm.finetune.train import segmentation_loss
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import build_segmenter
from fedefm.models.weights import model_metadata, save_weights


def bare_images_per_s(data: Path, preset: str, batch_size: int, size: int, steps: int) -> float:
    """Images/s of forward + the finetune loss + backward + clip + AdamW step on one fixed random batch."""
    torch.manual_seed(0)
    model = build_segmenter("transunet", get_preset(preset), n_classes=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = segmentation_loss(FinetuneConfig(data=data, out=data), torch.device("cpu"))
    images = torch.rand(batch_size, 1, size, size)
    masks = torch.randint(0, 3, (batch_size, 1, size, size))
    for _ in range(2):  # warm-up
        loss_fn(model(images), masks).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model(images), masks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch_size / (time.perf_counter() - started)


def loop_images_per_s(data: Path, out: Path, batch_size: int, size: int, crop: int | None, epochs: int) -> float:
    """Median training images/s over the epochs of a real finetune run (first epoch skipped as warm-up)."""
    finetune(FinetuneConfig(data=data, out=out, shots=16, epochs=epochs, batch_size=batch_size, image_size=size,
                            crop=crop, samples_per_epoch=64), progress=False, overwrite=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(row["train_images_per_s"] for row in rows[1:])


def predict_images_per_s(preset: str, images: list[Path], work: Path) -> float:
    """Images/s of ``predict`` with a randomly initialised TransUNet of ``preset`` at 256×256 inputs."""
    model = build_segmenter("transunet", get_preset(preset), n_classes=3)
    weights = work / f"{preset}.safetensors"
    save_weights(weights, model, model_metadata(model) | {"classes": list(LABEL_NAMES)})
    predict(weights, images[:2], work / f"warm_{preset}")
    return predict(weights, images, work / f"pred_{preset}").images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=get_preset("tiny").image_size, help="training image side")
    parser.add_argument("--crop", type=int, default=None,
                        help="train on crops of this side (default: fedefm's for --size)")
    args = parser.parse_args()
    repeats, epochs, steps, n_predict = (1, 2, 3, 4) if args.quick else (args.repeats, 4, 20, 16)
    batch_size, size = 8, args.size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = synthetic_data(work / "data", "seg", 0, domain="clinical", n=60, size=size)
        side = FinetuneConfig(data=data, out=work, image_size=size, crop=args.crop).validate().crop or size
        bare = [bare_images_per_s(data, "tiny", batch_size, side, steps) for _ in range(repeats)]
        loop = [loop_images_per_s(data, work / f"run{r}", batch_size, size, args.crop, epochs) for r in range(repeats)]
        print(f"tiny TransUNet, batch {batch_size}, {size}x{size} images, training samples {side}x{side}, "
              f"torch threads {torch.get_num_threads()}")
        print(f"  bare forward+backward+step: median {statistics.median(bare):.1f} images/s  {[round(b, 1) for b in bare]}")
        print(f"  finetune loop:              median {statistics.median(loop):.1f} images/s  {[round(v, 1) for v in loop]}")
        print(f"  loop / bare: {statistics.median(loop) / statistics.median(bare):.1%}")
        big = synthetic_data(work / "data256", "seg", 0, domain="clinical", n=n_predict, size=256)
        images = sorted((big / "images").glob("*.png"))
        for preset in ("tiny", "paper"):
            rates = [predict_images_per_s(preset, images, work) for _ in range(repeats)]
            print(f"predict {preset:5s} at 256x256: median {statistics.median(rates):.2f} images/s  {[round(r, 2) for r in rates]}")


if __name__ == "__main__":
    main()
