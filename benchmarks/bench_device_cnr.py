"""Contrast-to-noise of the guidewire and the catheter in synthetic frames, per domain and image size.

Usage: python benchmarks/bench_device_cnr.py [--sizes 64 128 256] [--frames 60] [--seed 0] [--out FILE.json]
                                            [--dose-scale F]

Per frame and device label, on the displayed uint8 frame, with the ring the pixels 2 to 5 px from
the device's label and at least 2 px from any device:

- ring CNR = (mean of the ring - mean of the device's labelled pixels) / std of the ring. The ring
  follows the device across the frame, so its std holds the anatomy's large-scale changes too.
- local CNR: the same with a local background, the ring's Gaussian-weighted mean (sigma 3 px) at
  each pixel, subtracted first: contrast against what lies beside each piece of the device, over
  the fluctuation of the ring about that background (noise and fine anatomy), as an observer sees it.

Positive CNR means the device is darker than its surroundings, as attenuating metal is on a
fluoroscopy monitor. Reports medians over the frames that hold the device, the share of frames
below 1, and (when the generator records it) the guidewire's local CNR per diameter. It only calls
render_fluoro, so it runs against any version of the generator.

``--dose-scale F`` multiplies every frame's quanta by F (1000: practically free of quantum noise), which
tells how much of the device's CNR the quantum noise takes and how much the anatomy around it does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedefm.data.synth import DOMAINS, GENERATOR_VERSION, render_fluoro
from fedefm.data.synth import domains as synth_domains

logger = logging.getLogger(__name__)
_RING = (2, 5)
_LOCAL_SIGMA_PX = 3.0


def device_cnr(image: np.ndarray, mask: np.ndarray, label: int) -> tuple[float, float] | None:
    """Ring and local CNR of label ``label`` of mask (H, W) in image (H, W) (see the module text); None if absent."""
    device = mask == label
    if device.sum() < 3:
        return None
    near_any = ndimage.binary_dilation(mask > 0, iterations=_RING[0])
    ring = ndimage.binary_dilation(device, iterations=_RING[1]) & ~near_any
    if ring.sum() < 10:
        return None
    values = image.astype(np.float64)
    ring_cnr = (values[ring].mean() - values[device].mean()) / max(float(values[ring].std()), 0.5)
    weight = ndimage.gaussian_filter(ring.astype(np.float64), _LOCAL_SIGMA_PX)
    background = ndimage.gaussian_filter(values * ring, _LOCAL_SIGMA_PX) / np.maximum(weight, 1e-9)
    residual = values - background
    local_cnr = -residual[device].mean() / max(float(residual[ring].std()), 0.5)
    return float(ring_cnr), float(local_cnr)


@contextlib.contextmanager
def dose_scaled(scale: float) -> Iterator[None]:
    """Within the block, every frame's detector counts ``scale`` times the quanta it would."""
    draw = synth_domains._detector

    def scaled(*args, **kwargs):
        detector = draw(*args, **kwargs)
        return dataclasses.replace(detector, dose=detector.dose * scale)

    synth_domains._detector = scaled
    try:
        yield
    finally:
        synth_domains._detector = draw


def measure(domain: str, size: int, frames: int, seed: int) -> dict:
    """CNR statistics of ``frames`` frames of ``domain`` at ``size`` px: per label median, share below 1, per wire."""
    cnr: dict[str, list[tuple[float, float]]] = {"guidewire": [], "catheter": []}
    by_diameter: dict[str, list[float]] = {}
    for k in range(frames):
        image, mask, info = render_fluoro(domain, size, np.random.default_rng([seed, DOMAINS.index(domain), k]))
        for label, name in ((2, "guidewire"), (1, "catheter")):
            value = device_cnr(image, mask, label)
            if value is None:
                continue
            cnr[name].append(value)
            if name == "guidewire" and "diameter_inch" in info["guidewire"]:
                by_diameter.setdefault(f"{info['guidewire']['diameter_inch']:.3f}", []).append(value[1])
    row = {"domain": domain, "size": size, "frames": frames}
    for name, pairs in cnr.items():
        row[name] = {"frames_with_device": len(pairs)}
        for k, kind in enumerate(("ring", "local")):
            values = np.array([pair[k] for pair in pairs])
            row[name][kind] = {"median": round(float(np.median(values)), 3) if len(values) else None,
                               "below_1": round(float(np.mean(values < 1)), 3) if len(values) else None}
    row["guidewire_by_diameter_inch"] = {d: round(float(np.median(v)), 3) for d, v in sorted(by_diameter.items())}
    return row


def main() -> None:
    """Measure every domain at every size and log a table; optionally write the rows as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--dose-scale", type=float, default=1.0, help="multiply every frame's quanta (default 1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("generator %s, %d frames per domain and size, dose x %g, CNR median (share of frames below 1)",
                GENERATOR_VERSION, args.frames, args.dose_scale)
    logger.info("%-11s %5s %14s %14s %14s %14s  %s", "domain", "size", "wire ring", "wire local", "cath ring",
                "cath local", "guidewire local by diameter (inch)")
    rows = []
    for domain in DOMAINS:
        for size in args.sizes:
            with dose_scaled(args.dose_scale):
                row = measure(domain, size, args.frames, args.seed)
            rows.append(row)
            cells = [f"{row[n][kind]['median']:.2f} ({row[n][kind]['below_1']:.0%})"
                     if row[n][kind]["median"] is not None else "-"
                     for n in ("guidewire", "catheter") for kind in ("ring", "local")]
            wires = " ".join(f"{d}: {v:.2f}" for d, v in row["guidewire_by_diameter_inch"].items())
            logger.info("%-11s %5d %14s %14s %14s %14s  %s", domain, size, *cells, wires)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"generator_version": GENERATOR_VERSION, "frames": args.frames,
                                        "seed": args.seed, "dose_scale": args.dose_scale, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
