"""Throughput of the synthetic X-ray generator: images per second in one process, per domain and class.

Usage: python benchmarks/bench_synth.py [--size 256] [--images 20] [--repeats 3] [--png] [--workers 1 2]

Reports the median of ``--repeats`` runs of ``--images`` images each; with ``--png`` the time to
encode each image (and mask) as PNG is included, as ``fedefm synth`` does when it writes files.
With ``--workers``, also the whole ``write_seg_dataset`` of ``--writer-images`` clinical frames (PNG files,
manifest, process start-up) in that many processes, once per count.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fedefm.data.synth import DOMAINS, PRETRAIN_CLASSES, render_fluoro, render_pretrain, write_seg_dataset

logger = logging.getLogger(__name__)


def _encode(array: np.ndarray) -> None:
    """PNG-encode a uint8 (H, W) array in memory, as a dataset writer would."""
    Image.fromarray(array).save(io.BytesIO(), format="PNG")


def images_per_second(render, n: int, repeats: int, png: bool) -> float:
    """Median images/s over ``repeats`` runs of ``n`` calls of ``render(rng) -> arrays``."""
    render(np.random.default_rng(10**6))
    rates = []
    for run in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            arrays = render(np.random.default_rng([run, i]))
            if png:
                for array in arrays:
                    _encode(array)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    """Time render_fluoro per domain and render_pretrain per class and log a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--png", action="store_true", help="include PNG encoding of image (and mask)")
    parser.add_argument("--workers", nargs="*", type=int, default=[], help="process counts of the writer to time")
    parser.add_argument("--writer-images", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fedefm").setLevel(logging.WARNING)  # the writer's progress lines
    logger.info("size %d px, median of %d runs x %d images%s", args.size, args.repeats, args.images,
                ", PNG encoding included" if args.png else "")
    logger.info("%-28s %10s", "what", "images/s")
    for domain in DOMAINS:
        rate = images_per_second(lambda rng, d=domain: render_fluoro(d, args.size, rng)[:2], args.images,
                                 args.repeats, args.png)
        logger.info("%-28s %10.1f", f"render_fluoro {domain}", rate)
    for cls in PRETRAIN_CLASSES:
        rate = images_per_second(lambda rng, c=cls: (render_pretrain(c, args.size, rng),), args.images,
                                 args.repeats, args.png)
        logger.info("%-28s %10.1f", f"render_pretrain {cls}", rate)
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_seg_dataset(Path(tmp) / "out", "clinical", args.writer_images, size=args.size, workers=workers)
            rate = args.writer_images / (time.perf_counter() - start)
        logger.info("%-28s %10.1f", f"write_seg_dataset x{workers}", rate)


if __name__ == "__main__":
    main()
