"""Label masks and colour overlays for new images (``fedefm predict``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fedefm.data.datasets import resize_image
from fedefm.data.readers import IMAGE_SUFFIXES, count_frames, read_image
from fedefm.errors import DataError
from fedefm.files import atomic_write
from fedefm.finetune.evaluate import weights_path
from fedefm.models.weights import build_from_weights

log = logging.getLogger(__name__)

# RGB per label; catheter orange and guidewire cyan stay distinct for colour-blind readers too.
LABEL_COLOURS = np.array([[0, 0, 0], [255, 120, 0], [0, 210, 255]], dtype=np.float32)


@dataclass
class PredictReport:
    """What a predict call wrote, what it skipped and how fast it ran."""

    outputs: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Predicted images per second of wall time (reading and writing included)."""
        return len(self.outputs) / self.seconds if self.seconds else 0.0


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Image files named directly, plus the image files inside each named folder, sorted."""
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend label colours over a grey image: image (H, W) in [0, 1], labels (H, W) → RGB uint8 (H, W, 3)."""
    grey = np.repeat(image[..., None] * 255.0, 3, axis=-1)
    colour = LABEL_COLOURS[labels]
    weight = np.where(labels[..., None] > 0, alpha, 0.0)
    return np.clip(grey * (1 - weight) + colour * weight, 0, 255).astype(np.uint8)


@torch.no_grad()
def segment(model: torch.nn.Module, image: np.ndarray, size: int) -> np.ndarray:
    """Label map (H, W) uint8 of one image (H, W) in [0, 1], predicted at ``size`` and resized back."""
    logits = model(resize_image(image, size)[None])
    logits = F.interpolate(logits, size=image.shape, mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy().astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as PNG, atomically."""
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")


def predict(model: Path, inputs: list[Path], out: Path, skip_bad: bool = False) -> PredictReport:
    """Write NAME_mask.png (labels 0/1/2) and NAME_overlay.png for every input image or DICOM frame.

    An unreadable input raises DataError naming it, unless ``skip_bad``: then it is listed in the
    report and in ``OUT/skipped.txt``.
    """
    network, metadata = build_from_weights(weights_path(model))
    network.eval()
    size = int(metadata["image_size"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport()
    started = time.perf_counter()
    for path in collect_inputs(inputs):
        try:
            frames = count_frames(path)
            images = [(path.stem, read_image(path))] if frames == 1 else [
                (f"{path.stem}_f{k:03d}", read_image(path, frame=k)) for k in range(frames)
            ]
        except DataError as exc:
            if not skip_bad:
                raise
            log.warning("skipping %s", exc)
            report.skipped.append((path, str(exc)))
            continue
        for name, image in images:
            labels = segment(network, image, size)
            mask_path, overlay_path = out / f"{name}_mask.png", out / f"{name}_overlay.png"
            write_png(mask_path, labels)
            write_png(overlay_path, overlay(image, labels))
            report.outputs.append((mask_path, overlay_path))
    report.seconds = time.perf_counter() - started
    if report.skipped:
        with atomic_write(out / "skipped.txt", "w") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in report.skipped)
    return report
