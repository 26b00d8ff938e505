"""Render a labelled grid of synthetic images: each domain (frame, mask overlay) and each vessel-image class.

Usage: python benchmarks/synth_grid.py --out docs/synth_grid.png [--size 256] [--seed 0] [--columns 4]
       python benchmarks/synth_grid.py --devices --out docs/synth_devices.png [--domain clinical] [--seed 0]

With ``--devices``: one domain's frames at 64, 128 and 256 px, each shown pixel for pixel (nearest
neighbour, the same height on the page) beside its mask overlay, with the devices' sizes in the title,
to judge how visible the wire and the catheter are at each image size.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedefm.data.synth import DOMAINS, PRETRAIN_CLASSES, render_fluoro, render_pretrain  # noqa: E402

logger = logging.getLogger(__name__)

# Catheter red, guidewire cyan: the two labels stay distinguishable on grey.
_LABEL_COLOURS = np.array([[0, 0, 0], [255, 60, 40], [40, 220, 255]], dtype=np.float32)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey image (H, W) with mask labels (H, W) blended in colour -> RGB (H, W, 3) uint8."""
    rgb = np.repeat(image[..., None].astype(np.float32), 3, axis=2)
    labelled = mask > 0
    rgb[labelled] = 0.35 * rgb[labelled] + 0.65 * _LABEL_COLOURS[mask[labelled]]
    return rgb.astype(np.uint8)


def render_grid(out: Path, size: int, seed: int, columns: int) -> None:
    """Write the grid: a row per domain (frame and overlay pairs), a row per other pretrain class."""
    others = [cls for cls in PRETRAIN_CLASSES if cls not in DOMAINS]
    n_cols, n_rows = 2 * columns, len(DOMAINS) + len(others)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols, 1.9 * n_rows))
    for row, domain in enumerate(DOMAINS):
        for k in range(columns):
            image, mask, info = render_fluoro(domain, size, np.random.default_rng([seed, row, k]))
            axes[row, 2 * k].imshow(image, cmap="gray", vmin=0, vmax=255)
            axes[row, 2 * k + 1].imshow(overlay(image, mask))
            axes[row, 2 * k + 1].set_title(f"tip: {info['tip_segment']}", fontsize=7)
        axes[row, 0].set_ylabel(domain, fontsize=10)
    for row, cls in enumerate(others, start=len(DOMAINS)):
        for k in range(n_cols):
            image = render_pretrain(cls, size, np.random.default_rng([seed, row, k]))
            axes[row, k].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[row, 0].set_ylabel(cls, fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("fedefm synthetic X-ray: frames with catheter (red) / guidewire (cyan) masks, and vessel images",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    logger.info("wrote %s (%.0f kB)", out, out.stat().st_size / 1024)


def render_device_grid(out: Path, domain: str, seed: int, columns: int, sizes: tuple[int, ...] = (64, 128, 256)
                       ) -> None:
    """Write a grid of one domain's frames: a row per image size, frame and overlay pairs, nearest-neighbour."""
    fig, axes = plt.subplots(len(sizes), 2 * columns, figsize=(2.6 * 2 * columns, 2.7 * len(sizes)))
    for row, size in enumerate(sizes):
        for k in range(columns):
            image, mask, info = render_fluoro(domain, size, np.random.default_rng([seed, row, k]))
            wire, catheter = info["guidewire"], info["catheter"]
            title = " ".join([f'{wire["diameter_inch"]}" {wire["core"]}' if wire["present"] else "no wire",
                              f'{catheter["french"]} Fr' if catheter["present"] else "no catheter",
                              f'{info["kev"]:.0f} keV'])
            axes[row, 2 * k].imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axes[row, 2 * k].set_title(title, fontsize=8)
            axes[row, 2 * k + 1].imshow(overlay(image, mask), interpolation="nearest")
        axes[row, 0].set_ylabel(f"{size} px", fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"fedefm synthetic {domain} fluoroscopy at 64, 128 and 256 px: frame, catheter (red) / guidewire "
                 "(cyan) mask", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    logger.info("wrote %s (%.0f kB)", out, out.stat().st_size / 1024)


def main() -> None:
    """Parse arguments and render the grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/synth_grid.png"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", type=int, default=4, help="frame/overlay pairs per domain row")
    parser.add_argument("--devices", action="store_true", help="one domain at 64, 128 and 256 px, pixel for pixel")
    parser.add_argument("--domain", default="clinical", help="the domain of --devices")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.devices:
        render_device_grid(args.out, args.domain, args.seed, min(args.columns, 3))
    else:
        render_grid(args.out, args.size, args.seed, args.columns)


if __name__ == "__main__":
    main()
