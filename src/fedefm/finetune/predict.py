"""Label masks and colour overlays for new images, or class probabilities under a classifier (``fedefm predict``)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from fedefm.data.datasets import resize_image
from fedefm.data.readers import IMAGE_SUFFIXES, count_frames, image_stem, image_suffix, read_image
from fedefm.errors import ConfigError, DataError, choose
from fedefm.files import atomic_write
from fedefm.finetune.cine import DEFAULT_FPS, cine_path, device_pixels, source_frame_rate, write_cine, write_device_table
from fedefm.finetune.classify import predict_probabilities
from fedefm.finetune.dicom_seg import require_dicom_suffix, write_dicom_seg
from fedefm.finetune.evaluate import is_classifier, weights_path
from fedefm.models.position import POSITION_MODELS, PathPositionClassifier
from fedefm.models.weights import build_from_weights
from fedefm.runfolder import owned_run_folder

log = logging.getLogger(__name__)

# RGB per label; catheter orange and guidewire cyan stay distinct for colour-blind readers too.
LABEL_COLOURS = np.array([[0, 0, 0], [255, 120, 0], [0, 210, 255]], dtype=np.float32)
TIP_COLOUR, COURSE_COLOUR = (255, 0, 255), (0, 255, 0)  # a position classifier's tip and the course it read
OUTPUT_FORMATS = ("png", "dicom-seg")


@dataclass
class PredictReport:
    """What a predict call wrote, what it skipped and how fast it ran."""

    outputs: list[tuple[Path | None, Path]] = field(default_factory=list)  # (mask PNG or None, overlay PNG)
    probabilities: list[Path] = field(default_factory=list)
    segmentations: list[Path] = field(default_factory=list)
    cines: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    def written(self) -> list[Path]:
        """Every file this predict call wrote."""
        return [*(p for pair in self.outputs for p in pair if p is not None), *self.probabilities,
                *self.segmentations, *self.cines, *self.tables]

    @property
    def images_per_s(self) -> float:
        """Predicted images per second of wall time (reading and writing included)."""
        return len(self.outputs) / self.seconds if self.seconds else 0.0


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Image files named directly, plus the image files inside each named folder, sorted; a file named twice counts once."""
    files: dict[Path, Path] = {}
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and image_suffix(p) in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.update((p.resolve(), p) for p in found if p.resolve() not in files)
        elif path.exists():
            files.setdefault(path.resolve(), path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return list(files.values())


def frame_names(base: str, n_frames: int) -> list[str]:
    """Output names of a file's frames: ``base`` for a single frame, ``base_fNNN`` for each of several."""
    return [base] if n_frames == 1 else [f"{base}_f{k:03d}" for k in range(n_frames)]


def output_names(files: list[Path], n_frames: list[int]) -> list[list[str]]:
    """Distinct output names of every frame of every file (compared ignoring case).

    A file keeps its stem (``x``) unless another input's name collides with it: then it is named by its
    path below the inputs' common folder (``a__x``), and if that still collides, with its suffix (``a__x.png``).
    """
    root = Path(os.path.commonpath([p.resolve().parent for p in files])) if files else Path()
    bases = [image_stem(p) for p in files]
    for keep_suffix in (False, True):
        names = [frame_names(base, n) for base, n in zip(bases, n_frames)]
        counts = Counter(name.lower() for file_names in names for name in file_names)
        clashing = [i for i, file_names in enumerate(names) if any(counts[name.lower()] > 1 for name in file_names)]
        for i in clashing:
            relative = files[i].resolve().relative_to(root)
            bases[i] = "__".join((relative if keep_suffix else relative.with_suffix("")).parts)
    return [frame_names(base, n) for base, n in zip(bases, n_frames)]


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


@dataclass(frozen=True)
class InputFrame:
    """One image or DICOM frame to predict: its output name, pixels (H, W) in [0, 1], file and frame index there."""

    name: str
    image: np.ndarray
    path: Path
    frame: int
    n_frames: int


def read_inputs(inputs: list[Path], report: PredictReport, skip_bad: bool) -> Iterator[InputFrame]:
    """Every input image and DICOM frame, file by file and frame by frame.

    Every file's header is read before the first image is returned, so an unreadable input stops the run
    before anything is written. An unreadable file or frame raises DataError, or with ``skip_bad`` is
    listed in ``report.skipped`` and left out.
    """
    files, n_frames = [], []
    for path in collect_inputs(inputs):
        try:
            n_frames.append(count_frames(path))
        except DataError as exc:
            skip(exc, path, report, skip_bad)
            continue
        files.append(path)
    for path, names in zip(files, output_names(files, n_frames)):
        for k, name in enumerate(names):
            try:
                image = read_image(path, frame=k if len(names) > 1 else None)
            except DataError as exc:
                skip(exc, path, report, skip_bad)
                continue
            yield InputFrame(name, image, path, k, len(names))


def skip(error: DataError, path: Path, report: PredictReport, skip_bad: bool) -> None:
    """Record an unreadable input in the report under ``skip_bad``; raise the error otherwise."""
    if not skip_bad:
        raise error
    log.warning("skipping %s", error)
    report.skipped.append((path, str(error)))


def write_skipped(out: Path, report: PredictReport) -> None:
    """List the skipped inputs in OUT/skipped.txt (nothing when none were skipped)."""
    if report.skipped:
        with atomic_write(out / "skipped.txt", "w") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in report.skipped)


def prediction_config(model: Path, inputs: list[Path], skip_bad: bool, **options) -> dict:
    """What the manifest of a predict folder records: the weights, the inputs as given, ``skip_bad`` and ``options``."""
    return {"model": str(model), "inputs": [str(path) for path in inputs], "skip_bad": skip_bad, **options}


def classify_images(model: Path, inputs: list[Path], out: Path | None = None, skip_bad: bool = False,
                    overwrite: bool = False) -> tuple[list[dict], PredictReport]:
    """Class probabilities of every input image or DICOM frame under a fine-tuned classifier.

    With ``out``, the rows also go to OUT/predictions.jsonl (and skipped inputs to OUT/skipped.txt); OUT is
    claimed as a run folder of kind "predict" (another run there is refused unless ``overwrite``).

    A position classifier (``--pooling tip``, ``mask`` or ``path``) also says where it looked: its rows add
    ``"tip": [row, col]`` in px of the input image (``path`` also ``"path"``, the PATH_POINTS [row, col] of the
    course it read, entry to tip), and with ``out`` it writes NAME_overlay.png, the image with the predicted
    catheter (probability >= 0.5, orange), a cross at the tip (magenta) and small crosses along the course (green).

    Returns:
        One {"image": name, "class": most likely class (multi-label: the labels at p >= 0.5, as a list),
        "probabilities": {CLASS: p}} per image (plus "tip" and "path"), and the report of skipped inputs and timing.

    Raises:
        ConfigError: the weights are a segmenter's (use :func:`predict`).
    """
    network, metadata = build_from_weights(weights_path(model))
    if not is_classifier(metadata):
        raise ConfigError(f"--model {model}: holds a {metadata['arch']} segmenter, which predicts masks; use predict")
    multilabel, classes = bool(metadata.get("multilabel", False)), list(metadata["classes"])
    size = int(metadata["image_size"])
    report, rows = PredictReport(), []
    folder = (contextlib.nullcontext() if out is None else
              owned_run_folder(Path(out), "predict", prediction_config(model, inputs, skip_bad), overwrite=overwrite))
    with folder:
        started = time.perf_counter()
        for frame in read_inputs(inputs, report, skip_bad):
            name = frame.name
            probabilities = predict_probabilities(network, resize_image(frame.image, size)[None], multilabel)[0].tolist()
            chosen = ([c for c, p in zip(classes, probabilities) if p >= 0.5] if multilabel
                      else classes[int(np.argmax(probabilities))])
            rows.append({"image": name, "class": chosen, "probabilities": dict(zip(classes, probabilities))})
            if isinstance(network, tuple(POSITION_MODELS.values())):
                seen = where_it_looked(network, frame.image, size)
                rows[-1] |= {part: seen[part] for part in ("tip", "path") if part in seen}
                if out is not None:
                    shown = overlay(frame.image, seen["catheter"].astype(np.uint8))
                    shown = mark(shown, seen.get("path", []), COURSE_COLOUR, arm=1)
                    write_png(Path(out) / f"{name}_overlay.png", mark(shown, [seen["tip"]], TIP_COLOUR))
        report.seconds = time.perf_counter() - started
        if out is not None:
            with atomic_write(Path(out) / "predictions.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            write_skipped(Path(out), report)
    return rows, report


@torch.no_grad()
def where_it_looked(network: torch.nn.Module, image: np.ndarray, size: int) -> dict:
    """What a position classifier read in ``image`` (H, W), in px of the image: "tip" [row, col], "catheter" its
    mask (H, W) bool and, for a model that reads the course (``--pooling path``), "path" ([row, col], entry to tip)."""
    network.eval()
    parts = ("tip", "catheter", "path") if isinstance(network, PathPositionClassifier) else ("tip", "catheter")
    seen = network(resize_image(image, size)[None], parts=parts)
    catheter = F.interpolate(seen["catheter"][None], size=image.shape, mode="bilinear", align_corners=False)[0, 0]
    scale = [image.shape[0] / size, image.shape[1] / size]

    def in_image(point: torch.Tensor) -> list[float]:  # pixel centres: model px k covers image px [k·s, (k+1)·s)
        return [round((float(v) + 0.5) * k - 0.5, 1) for v, k in zip(point, scale)]

    found = {"tip": in_image(seen["tip"][0]), "catheter": catheter.numpy() >= 0.5}
    if "path" in seen:
        found["path"] = [in_image(point) for point in seen["path"][0]]
    return found


def mark(rgb: np.ndarray, points: list[list[float]], colour: tuple[int, int, int], arm: int | None = None
         ) -> np.ndarray:
    """A copy of an RGB image (H, W, 3) uint8 with a cross of ``colour`` centred at each [row, col] of ``points``
    inside it; ``arm`` px long each way (default: 1/32 of the image's shorter side, at least 2), cut at the edges."""
    marked = rgb.copy()
    height, width = rgb.shape[:2]
    arm = max(2, min(height, width) // 32) if arm is None else arm
    for point in points:
        row, col = (int(round(v)) for v in point)
        if 0 <= row < height and 0 <= col < width:  # a point off the image has no cross to draw
            marked[max(0, row - arm) : row + arm + 1, col] = colour
            marked[row, max(0, col - arm) : col + arm + 1] = colour
    return marked


def predict(model: Path, inputs: list[Path], out: Path, skip_bad: bool = False, overwrite: bool = False,
            probabilities: bool = False, min_component_px: int = 0, output_format: str = "png", cine: bool = False,
            fps: float | None = None) -> PredictReport:
    """Write the masks and overlays of every input image or DICOM frame into the run folder ``out``.

    ``output_format`` "png" writes NAME_mask.png (labels 0/1/2) per frame; "dicom-seg" writes NAME_seg.dcm, one
    DICOM Segmentation per input DICOM file (:mod:`fedefm.finetune.dicom_seg`); both write NAME_overlay.png per
    frame. A multi-frame input (or, with ``cine``, all inputs in order, named "cine") also gets NAME_cine.mp4 (GIF
    without ffmpeg) at the source frame rate (``fps`` overrides it; 15 when neither is known) and NAME_frames.csv,
    the device pixel counts per frame (:mod:`fedefm.finetune.cine`).

    OUT is claimed as a run folder of kind "predict": another run there is refused unless ``overwrite``.
    Inputs whose names collide get names from their paths (:func:`output_names`). With ``probabilities``,
    also NAME_probabilities.npy: float32 (C, H, W) softmax per class (background, catheter, guidewire) at the
    input's size, for users who threshold themselves. ``min_component_px`` > 0 drops predicted components
    (8-connected, per class) smaller than that from the mask and overlay (the probabilities are left as
    predicted). An unreadable input raises DataError naming it and the files this call wrote are removed
    again, unless ``skip_bad``: then it is listed in the report and in ``OUT/skipped.txt``.

    Raises:
        ConfigError: a bad option (format, ``min_component_px``, ``fps``) or the weights are a classifier's.
        DataError: an unreadable input, or a non-DICOM input under "dicom-seg" (before anything is written).
    """
    if min_component_px < 0:
        raise ConfigError(f"--min-component-px {min_component_px}: must be 0 (no clean-up) or more")
    if fps is not None and fps <= 0:
        raise ConfigError(f"--fps {fps}: must be a positive frame rate")
    output_format = choose("--format", output_format, OUTPUT_FORMATS)
    network, metadata = build_from_weights(weights_path(model))
    if is_classifier(metadata):
        raise ConfigError(f"--model {model}: holds a classifier, which predicts classes, not masks; use classify_images")
    if output_format == "dicom-seg":
        for path in collect_inputs(inputs):
            require_dicom_suffix(path)
    network.eval()
    size = int(metadata["image_size"])
    out = Path(out)
    report = PredictReport()
    config = prediction_config(model, inputs, skip_bad, probabilities=probabilities, min_component_px=min_component_px,
                               output_format=output_format, cine=cine, fps=fps)
    with owned_run_folder(out, "predict", config, overwrite=overwrite):
        started = time.perf_counter()
        try:
            frames = read_inputs(inputs, report, skip_bad)
            runs = [frames] if cine else (group for _, group in itertools.groupby(frames, key=lambda f: f.path))
            for run in runs:
                _predict_run(network, size, run, out, report, probabilities, min_component_px, output_format,
                             cine, fps, str(model))
        except BaseException:
            for path in report.written():
                path.unlink(missing_ok=True)
            raise
        report.seconds = time.perf_counter() - started
        write_skipped(out, report)
    return report


def _predict_run(network: torch.nn.Module, size: int, frames: Iterable[InputFrame], out: Path, report: PredictReport,
                 probabilities: bool, min_component_px: int, output_format: str, cine: bool, fps: float | None,
                 model: str) -> None:
    """Predict the frames of one input file (with ``cine``, of all inputs) and write their outputs, frame by frame."""
    overlays, rows, first = [], [], None
    seg_labels: dict[Path, tuple[str, list[np.ndarray]]] = {}  # source file -> (output name, its frames' labels)
    for frame in frames:
        first = first or frame
        probability = class_probabilities(network, frame.image, size)
        labels = probability.argmax(0).astype(np.uint8)
        if min_component_px > 0:
            labels = remove_small_components(labels, min_component_px)
        if probabilities:
            report.probabilities.append(out / f"{frame.name}_probabilities.npy")
            write_npy(report.probabilities[-1], probability)
        mask_path = out / f"{frame.name}_mask.png" if output_format == "png" else None
        report.outputs.append((mask_path, out / f"{frame.name}_overlay.png"))
        if mask_path is not None:
            write_png(mask_path, labels)
        coloured = overlay(frame.image, labels)
        write_png(report.outputs[-1][1], coloured)
        if output_format == "dicom-seg":
            seg_labels.setdefault(frame.path, (frame.name.removesuffix("_f000"), []))[1].append(labels)
        if cine or frame.n_frames > 1:
            overlays.append(coloured)
            rows.append((frame.name, str(frame.path), frame.frame, *device_pixels(labels)))
    for path, (name, stack) in seg_labels.items():
        report.segmentations.append(write_dicom_seg(path, np.stack(stack), out / f"{name}_seg.dcm", model))
    if overlays:
        base = "cine" if cine else first.name.removesuffix("_f000")
        header = pydicom.dcmread(first.path, stop_before_pixels=True) if image_suffix(first.path) == ".dcm" else None
        rate = fps or source_frame_rate(header) or DEFAULT_FPS
        report.cines.append(write_cine(cine_path(out, base), overlays, rate))
        report.tables.append(write_device_table(out / f"{base}_frames.csv", rows))
