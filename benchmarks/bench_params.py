"""Parameter counts of every preset and arch, and forward+backward time of TransUNet on this CPU.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_params.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from fedefm.models.presets import PRESETS, get_preset
from fedefm.models.segmenters import ARCHS, build_classifier, build_segmenter

PRETRAINING_CLASSES = 6


def count(model: nn.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_table() -> None:
    """Print encoder, classifier (6 classes) and 3-class segmenter sizes for every preset."""
    print(f"{'preset':<8}{'encoder':>14}{'classifier':>14}" + "".join(f"{arch:>14}" for arch in ARCHS))
    for name, preset in PRESETS.items():
        classifier = build_classifier(preset, PRETRAINING_CLASSES)
        row = [f"{count(classifier.encoder):,}", f"{count(classifier):,}"]
        row += [f"{count(build_segmenter(arch, preset)):,}" for arch in ARCHS]
        print(f"{name:<8}" + "".join(f"{value:>14}" for value in row))


def step_seconds(model: nn.Module, batch: int, side: int, repeats: int) -> float:
    """Median seconds of one forward + backward of ``model`` on a (batch, 1, side, side) input, after a warm-up."""
    x = torch.randn(batch, 1, side, side)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(x).mean().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main() -> None:
    """Print the parameter table, then TransUNet step times for tiny (batch 8, 128 px) and paper (batch 1, 256 px)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parameter_table()
    print(f"\nTransUNet forward+backward, median of {args.repeats} after a warm-up, {args.threads} threads")
    for name, batch in (("tiny", 8), ("paper", 1)):
        preset = get_preset(name)
        seconds = step_seconds(build_segmenter("transunet", preset), batch, preset.image_size, args.repeats)
        print(f"  {name:<6} batch {batch}, {preset.image_size}x{preset.image_size}: {seconds:.3f} s")


if __name__ == "__main__":
    main()
