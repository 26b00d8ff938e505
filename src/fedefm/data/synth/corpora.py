"""Dataset writers: segmentation, pre-training and position datasets on disk, reproducible per image."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from fedefm.data.labels import LABEL_NAMES
from fedefm.data.synth.devices import WIRE_LABELS
from fedefm.data.synth.domains import (
    _check_size,
    DOMAINS,
    POSITION_CLASSES,
    PRETRAIN_ANNOTATED,
    PRETRAIN_CLASSES,
    PRETRAIN_LABELS,
    render_fluoro,
    render_position,
    render_pretrain_masked,
)
from fedefm.errors import ConfigError, choose
from fedefm.files import write_json


# 2.0.0: devices are real products (guidewires 0.014-0.038 inch, steel or nitinol, some with a
# platinum tip coil; catheters 4-7 Fr, barium-filled polymer, some braided) attenuating at the
# domain's beam energy; quanta per pixel follow the detector dose and the pixel's area (automatic
# exposure control), and the blur the focal spot, detector and motion, per domain (docs/design.md §5).
GENERATOR_VERSION = "2.0.0"

logger = logging.getLogger(__name__)


def _image_rng(seed: int, kind: int, group: int, index: int) -> np.random.Generator:
    """The generator of one image: independent of the order and number of images. kind 0 seg, 1 pretrain, 2 position."""
    return np.random.default_rng([seed, kind, group, index])


def _check_out(out: Path) -> None:
    """Raise ConfigError when OUT exists and is not an empty folder, so nothing is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already exists and is not an empty folder; choose another folder or delete it")


def _check_counts(value: int, option: str, seed: int) -> None:
    """Raise ConfigError unless ``value`` >= 1 and the seed is a non-negative integer."""
    if int(value) != value or value < 1:
        raise ConfigError(f"{option} {value}: need at least 1 image; pass {option} 1 or more")
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"--seed {seed}: the seed must be a non-negative integer")


def _check_workers(workers: int) -> None:
    """Raise ConfigError unless ``workers`` is an integer of at least 1."""
    if int(workers) != workers or workers < 1:
        raise ConfigError(f"--workers {workers}: need at least 1 process; pass --workers 1 or more")


def each_image(write_one: Callable, jobs: Sequence, workers: int, what: str) -> list:
    """``[write_one(job) for job in jobs]``, in ``workers`` processes when more than one, logging progress.

    Every image draws from its own generator (_image_rng), so the files are the same for any number of
    workers. Workers are spawned, not forked: the parent may hold torch's thread pools.
    """
    n = len(jobs)
    step = max(n // 10, 1)
    entries: list = []

    def done(entry) -> None:
        entries.append(entry)
        if len(entries) % step == 0 or len(entries) == n:
            logger.info("%s: %d/%d images", what, len(entries), n)

    if workers == 1 or n == 1:
        for job in jobs:
            done(write_one(job))
        return entries
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, n), mp_context=context) as pool:
        for entry in pool.map(write_one, jobs, chunksize=max(min(n // (4 * workers), 16), 1)):
            done(entry)
    return entries


def _save_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 (H, W) array as a greyscale PNG."""
    Image.fromarray(array).save(path, format="PNG")


def _write_atomically(out: Path, fill: Callable[[Path], dict]) -> dict:
    """Build a dataset in a sibling temporary folder with ``fill(tmp) -> manifest`` and rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (unlike tempfile.mkdtemp, which makes it private) gives the folder the user's usual permissions.
    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = fill(tmp)
        write_json(tmp / "manifest.json", manifest)
        _check_out(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_seg_image(tmp: Path, domain: str, size: int, seed: int, wire_label: str, i: int) -> dict:
    """Render frame ``i`` of a segmentation dataset into TMP/images and TMP/masks; its manifest entry."""
    rng = _image_rng(seed, 0, DOMAINS.index(domain), i)
    image, mask, info = render_fluoro(domain, size, rng, wire_label=wire_label)
    name = f"img_{i:05d}.png"
    _save_png(tmp / "images" / name, image)
    _save_png(tmp / "masks" / name, mask)
    counts = np.bincount(mask.ravel(), minlength=3)
    return {"name": name, "label_counts": dict(zip(LABEL_NAMES, map(int, counts))), "info": info}


def write_seg_dataset(out: Path, domain: str, n: int, size: int = 256, seed: int = 0,
                      wire_label: str = "lead", workers: int = 1) -> dict:
    """Write ``n`` fluoroscopy frames of ``domain`` with masks: OUT/images, OUT/masks, OUT/manifest.json.

    ``wire_label`` is how the guidewire is labelled inside the catheter (WIRE_LABELS; see render_fluoro).
    ``workers`` processes render the frames; the files are the same for any number.

    Returns:
        The manifest: generator_version, kind "seg", domain, n, size, seed, wire_label, and per image
        its name, label_counts {background, catheter, guidewire} and info (see render_fluoro).

    Raises:
        ConfigError: unknown domain or wire label, n < 1, size < 32, negative seed, workers < 1, or OUT exists
            and is not empty.
    """
    out = Path(out)
    choose("--domain", domain, DOMAINS)
    choose("--wire-label", wire_label, WIRE_LABELS)
    _check_counts(n, "--n", seed)
    _check_size(size)
    _check_workers(workers)
    _check_out(out)

    def fill(tmp: Path) -> dict:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        write_one = functools.partial(_write_seg_image, tmp, domain, size, seed, wire_label)
        images = each_image(write_one, range(n), workers, f"{domain} frames")
        return {"generator_version": GENERATOR_VERSION, "kind": "seg", "domain": domain, "n": n, "size": size,
                "seed": seed, "wire_label": wire_label, "images": images}

    manifest = _write_atomically(out, fill)
    logger.info("wrote %d %s frames to %s", n, domain, out)
    return manifest


def _write_pretrain_image(tmp: Path, size: int, seed: int, annotated: Sequence[str], job: tuple[str, int]) -> None:
    """Render image ``job`` (class, index) of a pre-training corpus into TMP/CLASS, its mask into TMP/CLASS/masks."""
    cls, i = job
    name = f"img_{i:05d}.png"
    image, mask = render_pretrain_masked(cls, size, _image_rng(seed, 1, PRETRAIN_CLASSES.index(cls), i))
    _save_png(tmp / cls / name, image)
    if cls in annotated:
        _save_png(tmp / cls / "masks" / name, mask)


def write_pretrain_corpus(out: Path, per_class: int, size: int = 256, seed: int = 0,
                          classes: Sequence[str] = PRETRAIN_CLASSES, masks: bool = True, workers: int = 1) -> dict:
    """Write ``per_class`` images of each class to OUT/CLASS/img_NNNNN.png plus OUT/manifest.json.

    With ``masks``, every image of a class that PRETRAIN_ANNOTATED gives labels also gets its label mask,
    OUT/CLASS/masks/img_NNNNN.png (indices into PRETRAIN_LABELS), and OUT/labels.json holds the label table
    ``{"labels": [...], "annotated": {CLASS: [LABEL, ...]}}`` (docs/design.md §4), which the manifest repeats under
    ``label_table``. The images are the same with or without masks, and for any number of ``workers`` processes.

    Returns:
        The manifest: generator_version, kind "pretrain", classes, per_class, size, seed, counts per class, and
        with masks label_table and masked (masked images per class).

    Raises:
        ConfigError: unknown or repeated class, no classes, per_class < 1, size < 32, negative seed, workers < 1,
            or OUT exists and is not empty.
    """
    out = Path(out)
    classes = list(classes)
    if not classes:
        raise ConfigError(f"classes: none given; pass some of {', '.join(PRETRAIN_CLASSES)}")
    for cls in classes:
        choose("class", cls, PRETRAIN_CLASSES)
    if len(set(classes)) != len(classes):
        raise ConfigError(f"classes {classes}: a class is listed twice; list each once")
    _check_counts(per_class, "--per-class", seed)
    _check_size(size)
    _check_workers(workers)
    _check_out(out)
    annotated = {cls: list(PRETRAIN_ANNOTATED[cls]) for cls in classes if masks and PRETRAIN_ANNOTATED[cls]}
    label_table = {"labels": list(PRETRAIN_LABELS), "annotated": annotated}

    def fill(tmp: Path) -> dict:
        for cls in classes:
            (tmp / cls).mkdir()
            if cls in annotated:
                (tmp / cls / "masks").mkdir()
        jobs = [(cls, i) for cls in classes for i in range(per_class)]
        write_one = functools.partial(_write_pretrain_image, tmp, size, seed, list(annotated))
        each_image(write_one, jobs, workers, "pre-training images")
        manifest = {"generator_version": GENERATOR_VERSION, "kind": "pretrain", "classes": classes,
                    "per_class": per_class, "size": size, "seed": seed, "counts": {cls: per_class for cls in classes}}
        if not masks:
            return manifest
        write_json(tmp / "labels.json", label_table)
        return manifest | {"label_table": label_table, "masked": {cls: per_class for cls in annotated}}

    manifest = _write_atomically(out, fill)
    logger.info("wrote %d images per class for %d classes to %s (masks for %s)", per_class, len(classes), out,
                ", ".join(annotated) or "none")
    return manifest


def _write_position_image(tmp: Path, size: int, seed: int, job: tuple[str, int]) -> dict:
    """Render frame ``job`` (class, index) of a position dataset into TMP/CLASS; its manifest entry."""
    cls, i = job
    image, _, info = render_position(cls, size, _image_rng(seed, 2, POSITION_CLASSES.index(cls), i))
    name = f"img_{i:05d}.png"
    _save_png(tmp / cls / name, image)
    return {"class": cls, "name": name, "info": info}


def write_position_dataset(out: Path, n: int, size: int = 256, seed: int = 0, workers: int = 1) -> dict:
    """Write ``n`` chest frames, balanced over POSITION_CLASSES, to OUT/CLASS/img_NNNNN.png plus OUT/manifest.json.

    Class k gets ``n // 4`` images, one more for the first ``n % 4`` classes; ``workers`` processes render
    them, with the same files for any number.

    Returns:
        The manifest: generator_version, kind "position", classes, n, size, seed, counts per class, and
        per image its class, name and info (see render_position).

    Raises:
        ConfigError: n below the number of classes, size < 32, negative seed, workers < 1, or OUT exists and is
            not empty.
    """
    out = Path(out)
    _check_counts(n, "--n", seed)
    if n < len(POSITION_CLASSES):
        raise ConfigError(f"--n {n}: the position task has {len(POSITION_CLASSES)} classes; "
                          f"pass --n {len(POSITION_CLASSES)} or more")
    _check_size(size)
    _check_workers(workers)
    _check_out(out)
    counts = {cls: n // len(POSITION_CLASSES) + (k < n % len(POSITION_CLASSES))
              for k, cls in enumerate(POSITION_CLASSES)}

    def fill(tmp: Path) -> dict:
        for cls in counts:
            (tmp / cls).mkdir()
        jobs = [(cls, i) for cls, count in counts.items() for i in range(count)]
        images = each_image(functools.partial(_write_position_image, tmp, size, seed), jobs, workers,
                             "position frames")
        return {"generator_version": GENERATOR_VERSION, "kind": "position", "classes": list(POSITION_CLASSES),
                "n": n, "size": size, "seed": seed, "counts": counts, "images": images}

    manifest = _write_atomically(out, fill)
    logger.info("wrote %d position frames (%s) to %s", n, ", ".join(POSITION_CLASSES), out)
    return manifest
