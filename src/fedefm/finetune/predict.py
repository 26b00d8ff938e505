"""Label masks and colour overlays for new images, or class probabilities under a classifier (``fedefm predict``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from fedefm.data.datasets import resize_image
from fedefm.data.readers import IMAGE_SUFFIXES, count_frames, read_image
from fedefm.errors import ConfigError, DataError
from fedefm.files import atomic_write
from fedefm.finetune.classify import predict_probabilities
from fedefm.finetune.evaluate import is_classifier, weights_path
from fedefm.models.weights import build_from_weights

log = logging.getLogger(__name__)

# RGB per label; catheter orange and guidewire cyan stay distinct for colour-blind readers too.
LABEL_COLOURS = np.array([[0, 0, 0], [255, 120, 0], [0, 210, 255]], dtype=np.float32)


@dataclass
class PredictReport:
    """What a predict call wrote, what it skipped and how fast it ran."""

    outputs: list[tuple[Path, Path]] = field(default_factory=list)
    probabilities: list[Path] = field(default_factory=list)
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
def class_probabilities(model: torch.nn.Module, image: np.ndarray, size: int) -> np.ndarray:
    """Softmax (C, H, W) float32 of one image (H, W) in [0, 1]: predicted at ``size``, logits resized back."""
    logits = model(resize_image(image, size)[None])
    logits = F.interpolate(logits, size=image.shape, mode="bilinear", align_corners=False)
    return torch.softmax(logits, dim=1)[0].numpy().astype(np.float32)


def segment(model: torch.nn.Module, image: np.ndarray, size: int) -> np.ndarray:
    """Label map (H, W) uint8 of one image (H, W) in [0, 1]: the most probable class per pixel."""
    return class_probabilities(model, image, size).argmax(0).astype(np.uint8)


def remove_small_components(labels: np.ndarray, min_pixels: int) -> np.ndarray:
    """Labels (H, W) with every foreground component (8-connected, per class) under ``min_pixels`` set to 0.

    8-connectivity keeps a 1 px diagonal wire in one piece; isolated false-positive specks go.
    """
    cleaned = labels.copy()
    for value in np.unique(labels[labels > 0]):
        components, count = ndimage.label(labels == value, structure=np.ones((3, 3), bool))
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        small = sizes < min_pixels
        small[0] = False
        cleaned[small[components]] = 0
    return cleaned


def write_npy(path: Path, array: np.ndarray) -> None:
    """Write an array as .npy, atomically."""
    with atomic_write(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as PNG, atomically."""
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")


def read_inputs(inputs: list[Path], report: PredictReport, skip_bad: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(name, image (H, W) in [0, 1]) of every input image and DICOM frame; unreadable ones raise or are skipped."""
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
        yield from images


def write_skipped(out: Path, report: PredictReport) -> None:
    """List the skipped inputs in OUT/skipped.txt (nothing when none were skipped)."""
    if report.skipped:
        with atomic_write(out / "skipped.txt", "w") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in report.skipped)


def classify_images(model: Path, inputs: list[Path], out: Path | None = None, skip_bad: bool = False
                    ) -> tuple[list[dict], PredictReport]:
    """Class probabilities of every input image or DICOM frame under a fine-tuned classifier.

    With ``out``, the rows also go to OUT/predictions.jsonl (and skipped inputs to OUT/skipped.txt).

    Returns:
        One {"image": name, "class": most likely class (multi-label: the labels at p >= 0.5, as a list),
        "probabilities": {CLASS: p}} per image, and the report of skipped inputs and timing.

    Raises:
        ConfigError: the weights are a segmenter's (use :func:`predict`).
    """
    network, metadata = build_from_weights(weights_path(model))
    if not is_classifier(metadata):
        raise ConfigError(f"--model {model}: holds a {metadata['arch']} segmenter, which predicts masks; use predict")
    multilabel, classes = bool(metadata.get("multilabel", False)), list(metadata["classes"])
    size = int(metadata["image_size"])
    report, rows = PredictReport(), []
    started = time.perf_counter()
    for name, image in read_inputs(inputs, report, skip_bad):
        probabilities = predict_probabilities(network, resize_image(image, size)[None], multilabel)[0].tolist()
        chosen = ([c for c, p in zip(classes, probabilities) if p >= 0.5] if multilabel
                  else classes[int(np.argmax(probabilities))])
        rows.append({"image": name, "class": chosen, "probabilities": dict(zip(classes, probabilities))})
    report.seconds = time.perf_counter() - started
    if out is not None:
        with atomic_write(Path(out) / "predictions.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        write_skipped(Path(out), report)
    return rows, report


def predict(model: Path, inputs: list[Path], out: Path, skip_bad: bool = False, probabilities: bool = False,
            min_component_px: int = 0) -> PredictReport:
    """Write NAME_mask.png (labels 0/1/2) and NAME_overlay.png for every input image or DICOM frame.

    With ``probabilities``, also NAME_probabilities.npy: float32 (C, H, W) softmax per class (background,
    catheter, guidewire) at the input's size, for users who threshold themselves. ``min_component_px`` > 0
    drops predicted components (8-connected, per class) smaller than that from the mask and overlay (the
    probabilities are left as predicted). An unreadable input raises DataError naming it, unless
    ``skip_bad``: then it is listed in the report and in ``OUT/skipped.txt``.
    """
    if min_component_px < 0:
        raise ConfigError(f"--min-component-px {min_component_px}: must be 0 (no clean-up) or more")
    network, metadata = build_from_weights(weights_path(model))
    if is_classifier(metadata):
        raise ConfigError(f"--model {model}: holds a classifier, which predicts classes, not masks; use classify_images")
    network.eval()
    size = int(metadata["image_size"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport()
    started = time.perf_counter()
    for name, image in read_inputs(inputs, report, skip_bad):
        probability = class_probabilities(network, image, size)
        labels = probability.argmax(0).astype(np.uint8)
        if min_component_px > 0:
            labels = remove_small_components(labels, min_component_px)
        if probabilities:
            write_npy(out / f"{name}_probabilities.npy", probability)
            report.probabilities.append(out / f"{name}_probabilities.npy")
        mask_path, overlay_path = out / f"{name}_mask.png", out / f"{name}_overlay.png"
        write_png(mask_path, labels)
        write_png(overlay_path, overlay(image, labels))
        report.outputs.append((mask_path, overlay_path))
    report.seconds = time.perf_counter() - started
    write_skipped(out, report)
    return report
