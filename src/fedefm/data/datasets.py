"""Datasets over the folder layouts of DESIGN.md §4, deterministic splits and the dataset checker.

Segmentation roots are ``ROOT/images`` + ``ROOT/masks`` or ``ROOT/{train,val,test}/images|masks``;
an image pairs with the mask of the same stem. A multi-frame image (DICOM, NPY stack, multi-page
TIFF) expands to one item per frame, ``NAME_f000``, ``NAME_f001``, ..., paired with the frames of a
multi-frame mask ``NAME.ext`` or with per-frame masks ``NAME_fNNN.ext``.

Classification roots are ``ROOT/CLASS/*.ext`` or ``ROOT/{train,val,test}/CLASS/*.ext``; class
names are sorted and a label is the index of its class. A dense pre-training corpus adds label masks
``CLASS/masks/NAME.ext`` (the image's stem; a frame of a multi-frame image takes ``NAME_fNNN``) and
``ROOT/labels.json``, ``{"labels": [...], "annotated": {CLASS: [LABEL, ...]}}``: a mask pixel is an index
into ``labels``, 0 means none of its class's annotated labels, and a label its class does not annotate
is unknown there. A class not in ``annotated`` holds images only, whatever its ``masks/`` folder holds.

An nnU-Net v2 raw or MSD folder (``dataset.json`` beside ``imagesTr/``, :mod:`fedefm.data.nnunet`) is a
segmentation root too: its labelled training cases are the train pool, its label values map to fedefm's
labels by name, and val and test are carved from the pool (``imagesTs/`` has no labels).

Missing splits are carved from train: the sorted source files are shuffled by
``np.random.default_rng(seed)``, then test (only when no test split exists at all) and val are
taken off the front. Every frame of a file lands in the same split, so frames of one sequence
never leak between train and test. A fraction above zero takes at least one file (per class for
classification), and train keeps at least one. Files are read lazily, one item at a time.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch.utils.data import Dataset

from fedefm.data.labels import LABEL_NAMES
from fedefm.data.readers import (IMAGE_SUFFIXES, count_frames, image_stem, image_suffix, read_image, read_label_values,
                                 read_mask)
from fedefm.data.nnunet import is_nnunet_root, read_layout
from fedefm.errors import ConfigError, DataError, choose

SPLITS = ("train", "val", "test")
_MAX_LISTED_PROBLEMS = 20
LABELS_FILE = "labels.json"
MASKS_FOLDER = "masks"
_MAX_LABELS = 256  # masks store a label id per pixel in 8 bits

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Problems = list[tuple[Path, str]]


@dataclass(frozen=True)
class SegmentationItem:
    """One image (or its frame ``frame``) and its mask (or the mask's frame ``mask_frame``).

    ``label_map`` (nnU-Net / MSD datasets) maps a stored mask value to a fedefm label (index = value, -1 for a
    value the dataset.json does not list); None reads the mask as fedefm's own labels (:func:`read_mask`).
    """

    name: str
    image: Path
    mask: Path
    frame: int | None = None
    mask_frame: int | None = None
    label_map: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ClassificationItem:
    """One image (or one frame of a multi-frame image), the index of its class (multi-label: 0/1 per label) and, in
    a dense corpus, its label mask (None: images only)."""

    name: str
    image: Path
    label: int | tuple[int, ...]
    frame: int | None = None
    mask: Path | None = None


@dataclass(frozen=True)
class LabelSpec:
    """A dense corpus's label table (ROOT/labels.json); empty when the corpus has none (every class images only).

    Attributes:
        labels: label names; a mask pixel is an index into them, 0 "background" (none of the annotated labels).
        annotated: class name -> the label ids (sorted, never 0) its masks annotate; other labels are unknown there.
    """

    labels: tuple[str, ...] = ()
    annotated: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def allowed(self, class_name: str) -> tuple[int, ...]:
        """The values a mask of ``class_name`` may hold: 0 and the label ids the class annotates."""
        return (0, *self.annotated.get(class_name, ()))


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found: split sizes, image size range, label counts and every bad file."""

    kind: str
    splits: dict[str, int]
    min_hw: tuple[int, int] = (0, 0)
    max_hw: tuple[int, int] = (0, 0)
    label_histogram: dict[str, int] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    bad_files: list[tuple[Path, str]] = field(default_factory=list)
    masked: dict[str, int] = field(default_factory=dict)
    label_frames: dict[str, dict[str, int]] = field(default_factory=dict)


def find_segmentation_splits(
    root: Path, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> dict[str, list[SegmentationItem]]:
    """Pair images with masks under ``root`` and return the items of the train, val and test splits.

    Raises:
        DataError: the root is missing or empty, an image has no mask or a mask no image, or too
            few files remain to carve the missing splits; every problem found is listed.
        ConfigError: a fraction is outside [0, 1) or val_fraction + test_fraction >= 1.
    """
    splits, problems = _discover_segmentation(Path(root), seed, val_fraction, test_fraction)
    _raise_problems(problems)
    return splits


def find_classification_splits(
    root: Path, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
    images_only: Collection[str] = (),
) -> tuple[dict[str, list[ClassificationItem]], list[str]]:
    """List the images of each class folder; returns the splits (stratified per class) and the sorted class names.

    In a dense corpus (ROOT/labels.json) an item of an annotated class carries its mask ``CLASS/masks/NAME.ext``
    when there is one; the classes in ``images_only`` (e.g. the hospital that joins pre-training with images only)
    keep none. Mask values are checked when read (:func:`read_label_mask`, :func:`check_label_masks`).

    Raises:
        DataError: the root is missing, a class folder is empty, fewer than two classes exist, a class is too
            small to carve the missing splits, a mask has no image, or labels.json is malformed; every problem
            found is listed.
        ConfigError: a fraction is outside [0, 1), val_fraction + test_fraction >= 1, or ``images_only`` names
            a class the corpus does not have.
    """
    splits, class_names, problems = _discover_classification(Path(root), seed, val_fraction, test_fraction,
                                                             images_only)
    _raise_problems(problems)
    return splits, class_names


def read_label_spec(root: Path) -> LabelSpec:
    """Read ROOT/labels.json ``{"labels": [...], "annotated": {CLASS: [LABEL, ...]}}``; no file, no labels.

    Raises:
        DataError: naming the file, when it is not JSON, ``labels`` is not a list of distinct names starting with
            "background" (at most 256), or ``annotated`` lists a label not in ``labels`` (or "background").
    """
    path = Path(root) / LABELS_FILE
    if not path.is_file():
        return LabelSpec()
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); write {{\"labels\": [...], \"annotated\": {{...}}}}") from exc
    labels = table.get("labels") if isinstance(table, dict) else None
    if (not isinstance(labels, list) or not labels or labels[0] != "background" or len(set(labels)) != len(labels)
            or not all(isinstance(name, str) and name for name in labels) or len(labels) > _MAX_LABELS):
        raise DataError(f"{path}: \"labels\" must list distinct label names, \"background\" first (a mask pixel "
                        f"indexes them, at most {_MAX_LABELS}); found {labels!r}")
    annotated = table.get("annotated", {})
    if not isinstance(annotated, dict):
        raise DataError(f"{path}: \"annotated\" must map class names to lists of labels; found {annotated!r}")
    ids: dict[str, tuple[int, ...]] = {}
    for class_name, names in annotated.items():
        if not isinstance(names, list):
            raise DataError(f"{path}: class '{class_name}' must map to a list of labels, e.g. [\"vessel\"]; "
                            f"found {names!r}")
        unknown = [name for name in names if name not in labels[1:]]
        if unknown:
            raise DataError(f"{path}: class '{class_name}' annotates {unknown[0]!r}, which is not one of the "
                            f"foreground labels {', '.join(labels[1:])}; list only those")
        if names:
            ids[class_name] = tuple(sorted({labels.index(name) for name in names}))
    return LabelSpec(tuple(labels), ids)


def read_label_mask(path: Path, allowed: Collection[int], size: int) -> torch.Tensor:
    """Read a dense corpus's label mask and resize it: (size, size) int64 label ids, nearest.

    ``allowed`` holds the ids its class may use (:meth:`LabelSpec.allowed`: 0 and the annotated labels). A
    binary {0, 255} mask of a class annotating one label marks that label (a DRIVE-style vessel mask).

    Raises:
        DataError: naming the file, when it is unreadable or holds a value outside ``allowed``.
    """
    return resize_mask(_label_values(Path(path), allowed), _check_size(size))


def read_item_mask(item: SegmentationItem) -> np.ndarray:
    """The mask of a segmentation item as fedefm labels: (H, W) uint8 {0, 1, 2}, mapped through ``item.label_map``.

    Raises:
        DataError: naming the mask file, when it is unreadable or holds a value its dataset.json does not list.
    """
    if item.label_map is None:
        return read_mask(item.mask, item.mask_frame)
    values = read_label_values(item.mask, item.mask_frame)
    lookup = np.asarray(item.label_map, dtype=np.int16)
    found = np.unique(values)
    unknown = [v for v in found.tolist() if v != int(v) or not 0 <= v < len(lookup) or lookup[int(v)] < 0]
    if unknown:
        listed = ", ".join(str(i) for i, ours in enumerate(item.label_map) if ours >= 0)
        raise DataError(f"{item.mask}: holds label value(s) {', '.join(f'{v:g}' for v in unknown[:10])}, which "
                        f"dataset.json's \"labels\" does not list (values {listed}); fix the label image or add "
                        "the label")
    return lookup[values.astype(np.int64)].astype(np.uint8)


def check_label_masks(items: Sequence[ClassificationItem], spec: LabelSpec) -> None:
    """Read every item's mask and raise one DataError listing each that is unreadable or holds a label its class
    does not annotate (the class is the image's folder)."""
    _raise_problems(_mask_problems(items, spec)[0])


def find_multilabel_splits(
    path: Path, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> tuple[dict[str, list[ClassificationItem]], list[str]]:
    """Read a multi-label CSV ``image,LABEL_1,LABEL_2,...`` (a file, or ``labels.csv`` in a folder).

    Image paths are relative to the CSV's folder; each label column holds 0 or 1. Val and test are
    carved from the rows by the seed. Returns the splits and the label names in column order.

    Raises:
        DataError: the CSV is missing or has no label column, a row names a missing image or holds a
            value other than 0/1, or too few rows remain to carve the splits; every problem found is listed.
        ConfigError: a fraction is outside [0, 1) or val_fraction + test_fraction >= 1.
    """
    _check_fractions(val_fraction, test_fraction)
    path = Path(path)
    csv_path = path / "labels.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: multi-label CSV not found; write image,LABEL_1,LABEL_2,... rows there")
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    header = [cell.strip() for cell in rows[0]] if rows else []
    if len(header) < 2 or header[0] != "image":
        raise DataError(f"{csv_path}: header must be image,LABEL_1,LABEL_2,... (found {','.join(header) or 'nothing'})")
    labels = header[1:]
    repeated = sorted({name for name in labels if labels.count(name) > 1})
    if repeated:
        raise DataError(f"{csv_path}: label column '{repeated[0]}' appears twice; name each label once")
    problems: Problems = []
    items: list[ClassificationItem] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{csv_path}, line {line}"
        if len(row) != len(header):
            problems.append((Path(where), f"has {len(row)} cells but the header has {len(header)}"))
            continue
        image = csv_path.parent / row[0].strip()
        values = [cell.strip() for cell in row[1:]]
        unknown = [(name, value) for name, value in zip(labels, values) if value not in ("0", "1")]
        if unknown:
            problems.append((Path(where), f"label '{unknown[0][0]}' is '{unknown[0][1]}'; label cells hold 0 or 1"))
        elif not image.is_file():
            problems.append((Path(where), f"image {image} not found; fix the path (relative to {csv_path.parent})"))
        else:
            items.append(ClassificationItem(row[0].strip(), image, tuple(int(v) for v in values)))
    if not items and not problems:
        problems.append((csv_path, "no image rows; add one row per image"))
    n_test, n_val = _carve_count(len(items), test_fraction), _carve_count(len(items), val_fraction)
    if items and len(items) <= n_test + n_val:
        problems.append((csv_path, f"only {len(items)} image rows; carving val and test needs at least "
                                   f"{n_test + n_val + 1}; add rows or set the val/test fractions to 0"))
    _raise_problems(problems)
    train, val, test = _carve([[item] for item in items], n_val, n_test, np.random.default_rng(seed))
    return _sorted_by_name({"train": train, "val": val, "test": test}), labels


def list_silo_images(root: Path, class_names: Sequence[str]) -> list[ClassificationItem]:
    """Every image of one silo's own folder ROOT/CLASS/*.ext, labelled by the federation's ``class_names``.

    A silo may hold a single class (at 100% unseen it does); all its images are training images. Items of the
    classes the silo's ROOT/labels.json annotates carry their masks, as in :func:`find_classification_splits`.

    Raises:
        DataError: the root is missing, a folder is not one of ``class_names``, or a folder is empty
            or unreadable; every problem found is listed.
    """
    return find_silo_splits(root, class_names)["train"]


def list_silo_classes(root: Path) -> list[str]:
    """The class folders of one silo's folder ROOT/CLASS/, sorted.

    Raises:
        DataError: the root is missing or holds no class folder.
    """
    problems: Problems = []
    names = list(_silo_class_folders(Path(root), problems))
    _raise_problems(problems)
    return names


def _silo_class_folders(root: Path, problems: Problems) -> dict[str, Path]:
    """A silo folder's class folders by name; no folder at all is a problem.

    Raises:
        DataError: the root is missing.
    """
    if not root.is_dir():
        raise DataError(f"{root}: silo data folder not found")
    folders = _list_class_folders(root, problems)
    if not folders:
        problems.append((root, "no class folders; a silo's data sits in ROOT/CLASS_NAME/*.png"))
    return folders


def find_silo_splits(root: Path, class_names: Sequence[str], seed: int = 0, val_fraction: float = 0.0,
                     test_fraction: float = 0.0) -> dict[str, list[ClassificationItem]]:
    """One silo's folder ROOT/CLASS/*.ext cut into train, val and test per class, as find_classification_splits cuts.

    Labels index the federation's ``class_names``; the frames of one file stay in one split. With both
    fractions 0 every image is a training image (:func:`list_silo_images`).

    Raises:
        DataError: the root is missing, a folder is not one of ``class_names``, a folder is empty or
            unreadable, or a class is too small to carve; every problem found is listed.
        ConfigError: a fraction is outside [0, 1), or their sum is 1 or more.
    """
    _check_fractions(val_fraction, test_fraction)
    root = Path(root)
    problems: Problems = []
    folders = _silo_class_folders(root, problems)
    masked = set(read_label_spec(root).annotated)
    _warn_unannotated_masks(root, list(folders.values()), masked)
    splits: dict[str, list[ClassificationItem]] = {split: [] for split in SPLITS}
    rng = np.random.default_rng(seed)
    for name, path in sorted(folders.items()):
        if name not in class_names:
            problems.append((path, f"class '{name}' is not one of the federation's classes {', '.join(class_names)}; "
                                   "rename the folder or add the class to the run's classes"))
            continue
        pool = _class_groups(path, list(class_names).index(name), problems, name in masked)
        n_test, n_val = _carve_count(len(pool), test_fraction), _carve_count(len(pool), val_fraction)
        if pool and len(pool) <= n_test + n_val:
            problems.append((path, f"class '{name}' has only {len(pool)} image file(s); holding out validation "
                                   f"and test images needs at least {n_test + n_val + 1}; add images"))
            continue
        for split, items in zip(("train", "val", "test"), _carve(pool, n_val, n_test, rng), strict=True):
            splits[split] += items
    _raise_problems(problems)
    return _sorted_by_name(splits)


class _ItemDataset(Dataset):
    """Items read lazily, one per index, resized to ``size`` x ``size`` and optionally transformed."""

    def __init__(self, items: Sequence[Any], size: int, transform: Callable[[dict], dict] | None = None):
        self.items = list(items)
        self.size = _check_size(size)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)


class SegmentationDataset(_ItemDataset):
    """Reads one image and mask per index, resized to ``size`` x ``size``.

    A sample is ``{"image": (1, size, size) float in [0, 1], "mask": (size, size) long labels
    {0, 1, 2}, "name": str}``. ``transform`` receives and returns ``{"image", "mask"}`` after resizing.
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image = read_image(item.image, item.frame)
        mask = read_item_mask(item)
        _check_same_size(item, image, mask)
        sample = {"image": resize_image(image, self.size), "mask": resize_mask(mask, self.size)}
        if self.transform is not None:
            sample = self.transform(sample)
        return {"image": sample["image"], "mask": sample["mask"], "name": item.name}


class ClassificationDataset(_ItemDataset):
    """Reads one image per index, resized to ``size`` x ``size``.

    A sample is ``{"image": (1, size, size) float in [0, 1], "label": int, "name": str}``;
    ``transform`` receives and returns ``{"image"}`` after resizing.
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        sample = {"image": resize_image(read_image(item.image, item.frame), self.size)}
        if self.transform is not None:
            sample = self.transform(sample)
        return {"image": sample["image"], "label": item.label, "name": item.name}


def check_dataset(root: Path, seed: int = 0) -> DatasetReport:
    """Read every image and mask under ``root`` and report sizes, label counts and all bad files.

    The layout decides the kind: ``images/`` folders (at the root or in split folders) make a
    segmentation dataset, class folders a classification one. Nothing stops at the first problem.

    Raises:
        DataError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if _is_segmentation_root(root):
        return _check_segmentation(root, seed)
    return _check_classification(root, seed)


def format_report(report: DatasetReport) -> Table:
    """Lay out a :class:`DatasetReport` as a two-column rich table, bad files last."""
    table = Table(title=f"{report.kind} dataset", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    table.add_row("splits", "  ".join(f"{split} {n}" for split, n in report.splits.items()))
    table.add_row("image size (HxW)", f"{_hw(report.min_hw)} to {_hw(report.max_hw)}")
    unit = " px" if report.kind == "segmentation" else ""
    table.add_row("labels", "  ".join(f"{name} {n}{unit}" for name, n in report.label_histogram.items()))
    for name, frames in report.label_frames.items():
        holding = "  ".join(f"{label} {n}" for label, n in frames.items())
        table.add_row(f"masks {name}", f"{report.masked[name]} of {report.label_histogram[name]} images masked; "
                                       f"masks holding {holding}")
    table.add_row("bad files", str(len(report.bad_files)), style="red" if report.bad_files else "green")
    for path, reason in report.bad_files:
        table.add_row(str(path), reason, style="red")
    return table


def _hw(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def _check_size(size: int) -> int:
    if size < 1:
        raise ConfigError(f"image size {size} must be a positive number of pixels")
    return size


def _check_same_size(item: SegmentationItem, image: np.ndarray, mask: np.ndarray) -> None:
    if image.shape != mask.shape:
        raise DataError(
            f"{item.mask}: mask is {_hw(mask.shape)} but {item.image} is {_hw(image.shape)}; "
            "resize the mask to its image"
        )


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) float32 -> (1, size, size), bilinear with antialiasing."""
    tensor = torch.from_numpy(image)[None, None]
    if image.shape != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return tensor[0]


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) uint8 labels -> (size, size) long; no label is invented, and a thin device survives shrinking.

    Enlarging is nearest-neighbour. Shrinking labels an output pixel with the foreground class that covers
    most of it, wherever any foreground does, else background: nearest-neighbour sampling would keep only
    every f-th row and column, breaking a 1-2 px guidewire into dots, while the image (resized with
    antialiasing) still shows the wire as a continuous 1 px line.
    """
    tensor = torch.from_numpy(mask)[None, None]
    if mask.shape == (size, size):
        return tensor[0, 0].long()
    if mask.shape[0] < size or mask.shape[1] < size:
        return F.interpolate(tensor, size=(size, size), mode="nearest-exact")[0, 0].long()
    labels = tensor[0, 0].long()
    coverage = F.interpolate(F.one_hot(labels, int(labels.max()) + 1).permute(2, 0, 1)[None].float(),
                             size=(size, size), mode="area")[0, 1:]  # (classes - 1, size, size) foreground shares
    if coverage.shape[0] == 0:
        return torch.zeros(size, size, dtype=torch.long)
    share, foreground = coverage.max(0)
    return torch.where(share > 0, foreground + 1, 0)


def _raise_problems(problems: Problems) -> None:
    if not problems:
        return
    lines = [f"{path}: {reason}" for path, reason in problems[:_MAX_LISTED_PROBLEMS]]
    if len(problems) > _MAX_LISTED_PROBLEMS:
        lines.append(f"... and {len(problems) - _MAX_LISTED_PROBLEMS} more; run the dataset checker to list them all")
    raise DataError("\n".join(lines))


def _reason(exc: DataError, path: Path) -> str:
    """A reader's message without its leading path, which the problem list already holds."""
    return str(exc).removeprefix(f"{path}: ")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{name}={value} must lie in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves nothing to train on; "
            "keep the sum below 1"
        )


def _carve_count(n: int, fraction: float) -> int:
    return 0 if fraction == 0 else max(1, math.floor(fraction * n + 0.5))


def _carve(
    groups: list[list[Item]], n_val: int, n_test: int, rng: np.random.Generator
) -> tuple[list[Item], list[Item], list[Item]]:
    """Shuffle whole groups (the frames of one file), take test, then val, off the front; returns (train, val, test)."""
    shuffled = [groups[i] for i in rng.permutation(len(groups))]
    test, val, train = shuffled[:n_test], shuffled[n_test : n_test + n_val], shuffled[n_test + n_val :]
    return _flatten(train), _flatten(val), _flatten(test)


def _flatten(groups: list[list[Item]]) -> list[Item]:
    return [item for group in groups for item in group]


def _sorted_by_name(splits: dict[str, list[Item]]) -> dict[str, list[Item]]:
    return {split: sorted(items, key=lambda item: item.name) for split, items in splits.items()}


def _list_files(folder: Path, problems: Problems, skip: Collection[str] = ()) -> dict[str, Path]:
    """Image files directly inside ``folder`` keyed by stem; hidden files and the folders in ``skip`` are skipped."""
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or (path.name in skip and path.is_dir()):
            continue
        if path.is_dir():
            problems.append((path, f"unexpected folder inside {folder.name}/; files must sit directly in {folder}"))
        elif image_suffix(path) not in IMAGE_SUFFIXES:
            supported = ", ".join(IMAGE_SUFFIXES)
            problems.append((path, f"unsupported file type '{path.suffix}'; use one of {supported} or move it out"))
        elif image_stem(path) in by_stem:
            problems.append((path, f"has the same name as {by_stem[image_stem(path)].name}; keep one file per name"))
        else:
            by_stem[image_stem(path)] = path
    return by_stem


def _frame_names(stem: str, n_frames: int) -> list[str]:
    return [f"{stem}_f{k:03d}" for k in range(n_frames)]


def _pair_folder(images_dir: Path, masks_dir: Path, problems: Problems) -> list[list[SegmentationItem]]:
    """Pair every image in ``images_dir`` with its mask; one group of items per image file."""
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            problems.append((folder, "folder not found; a segmentation dataset needs images/ and masks/ side by side"))
            return []
    images = _list_files(images_dir, problems)
    masks = _list_files(masks_dir, problems)
    if not images:
        problems.append((images_dir, "no images found; add images or remove the folder"))
    groups: list[list[SegmentationItem]] = []
    used: set[str] = set()
    for stem, image in images.items():
        used.add(stem)
        try:
            n_frames = count_frames(image)
        except DataError as exc:
            problems.append((image, _reason(exc, image)))
            continue
        if n_frames == 1:
            if stem in masks:
                groups.append([SegmentationItem(stem, image, masks[stem])])
            else:
                problems.append((image, f"has no mask; expected {masks_dir / stem}.<ext>"))
            continue
        names = _frame_names(stem, n_frames)
        if stem in masks:
            group = _pair_mask_stack(image, masks[stem], names, problems)
        else:
            used.update(name for name in names if name in masks)
            group = _pair_frame_masks(image, masks, names, problems)
        if group:
            groups.append(group)
    problems.extend(
        (mask, f"has no image; expected {images_dir / stem}.<ext>") for stem, mask in masks.items() if stem not in used
    )
    return groups


def _pair_mask_stack(image: Path, mask: Path, names: list[str], problems: Problems) -> list[SegmentationItem]:
    try:
        n_mask_frames = count_frames(mask)
    except DataError as exc:
        problems.append((mask, _reason(exc, mask)))
        return []
    if n_mask_frames != len(names):
        problems.append((
            mask,
            f"holds {n_mask_frames} frame(s) but {image} holds {len(names)}; give one mask frame per image frame",
        ))
        return []
    return [SegmentationItem(name, image, mask, k, k) for k, name in enumerate(names)]


def _pair_frame_masks(
    image: Path, masks: dict[str, Path], names: list[str], problems: Problems
) -> list[SegmentationItem]:
    missing = [name for name in names if name not in masks]
    if missing:
        problems.append((
            image,
            f"holds {len(names)} frames but {len(missing)} have no mask (first: {missing[0]}); give a multi-frame "
            f"mask with the image's name or one mask per frame named {names[0]}, {names[1]}, ...",
        ))
        return []
    return [SegmentationItem(name, image, masks[name], k) for k, name in enumerate(names)]


def _is_segmentation_root(root: Path) -> bool:
    return (is_nnunet_root(root) or (root / "images").is_dir()
            or any((root / split / "images").is_dir() for split in SPLITS))


def _present_splits(root: Path) -> list[str]:
    return [split for split in SPLITS if (root / split).is_dir()]


def _discover_segmentation(
    root: Path, seed: int, val_fraction: float, test_fraction: float
) -> tuple[dict[str, list[SegmentationItem]], Problems]:
    _check_fractions(val_fraction, test_fraction)
    problems: Problems = []
    if not root.is_dir():
        return {split: [] for split in SPLITS}, [(root, "dataset folder not found")]
    if is_nnunet_root(root):
        groups = {"train": _layout_groups(root, problems)}
        given = []
    else:
        given = _present_splits(root)
        groups = _our_layout_groups(root, given, problems)
        if groups is None:
            return {split: [] for split in SPLITS}, problems
    splits = {split: _flatten(groups.get(split, [])) for split in SPLITS}
    pool = groups.get("train", [])
    n_test = 0 if "test" in given else _carve_count(len(pool), test_fraction)
    n_val = 0 if "val" in given else _carve_count(len(pool), val_fraction)
    if pool and len(pool) <= n_test + n_val:
        problems.append((
            root,
            f"only {len(pool)} training image file(s); carving val and test needs at least {n_test + n_val + 1}; "
            "add images or set the val/test fractions to 0",
        ))
    elif pool:
        train, val, test = _carve(pool, n_val, n_test, np.random.default_rng(seed))
        splits["train"] = train
        splits["val"] = splits["val"] if "val" in given else val
        splits["test"] = splits["test"] if "test" in given else test
    return _sorted_by_name(splits), problems


def _our_layout_groups(root: Path, given: list[str], problems: Problems
                       ) -> dict[str, list[list[SegmentationItem]]] | None:
    """The item groups per split folder of our own layout (ROOT/images or ROOT/SPLIT/images); None when neither."""
    if (root / "images").is_dir() and given:
        problems.append((root, f"holds both images/ and split folders ({', '.join(given)}); keep one layout"))
    if not given and not (root / "images").is_dir():
        problems.append((
            root,
            "no images/ + masks/ folders and no train/val/test folders; expected ROOT/images and ROOT/masks "
            "(or an nnU-Net / MSD dataset.json beside imagesTr/)",
        ))
        return None
    folders = {split: root / split for split in given} if given else {"train": root}
    return {split: _pair_folder(folder / "images", folder / "masks", problems) for split, folder in folders.items()}


def _layout_groups(root: Path, problems: Problems) -> list[list[SegmentationItem]]:
    """One single-item group per labelled case of an nnU-Net v2 / MSD folder; a multi-frame case is a problem."""
    spec = read_layout(root)
    groups = []
    for case in spec.training:
        try:
            n_frames = count_frames(case.image)
        except DataError as exc:
            problems.append((case.image, _reason(exc, case.image)))
            continue
        if n_frames != 1:
            problems.append((case.image, f"holds {n_frames} frames; an nnU-Net 2-D case is one image"))
            continue
        groups.append([SegmentationItem(case.name, case.image, case.label, label_map=spec.label_map)])
    return groups


def _list_class_folders(folder: Path, problems: Problems) -> dict[str, Path]:
    classes: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            classes[path.name] = path
        elif image_suffix(path) in IMAGE_SUFFIXES:
            problems.append((path, f"image outside any class folder; move it into {folder}/CLASS_NAME/"))
    return classes


def _class_groups(class_dir: Path, label: int, problems: Problems, with_masks: bool = False
                  ) -> list[list[ClassificationItem]]:
    """One group of items per image file of ``class_dir``; with ``with_masks`` each item gets its masks/ file."""
    files = _list_files(class_dir, problems, skip=(MASKS_FOLDER,))
    if not files:
        problems.append((class_dir, f"class folder '{class_dir.name}' has no images; add images or remove the folder"))
    masks_dir = class_dir / MASKS_FOLDER
    masks = _list_files(masks_dir, problems) if with_masks and masks_dir.is_dir() else {}
    groups = []
    for stem, path in files.items():
        try:
            n_frames = count_frames(path)
        except DataError as exc:
            problems.append((path, _reason(exc, path)))
            continue
        names = [stem] if n_frames == 1 else _frame_names(stem, n_frames)
        frames = [None] if n_frames == 1 else range(n_frames)
        groups.append([ClassificationItem(f"{class_dir.name}/{name}", path, label, k, masks.pop(name, None))
                       for k, name in zip(frames, names)])
    problems.extend((mask, f"has no image; expected {class_dir / stem}.<ext> (a frame of a multi-frame image takes "
                           "its frame name, NAME_fNNN)") for stem, mask in masks.items())
    return groups


def _warn_unannotated_masks(root: Path, class_dirs: Sequence[Path], annotated: Collection[str]) -> None:
    """Log each class folder holding masks/ that ROOT/labels.json does not annotate: its masks are not read."""
    for class_dir in class_dirs:
        if (class_dir / MASKS_FOLDER).is_dir() and class_dir.name not in annotated:
            log.warning("%s: ignored; add '%s' to \"annotated\" in %s to use its masks", class_dir / MASKS_FOLDER,
                        class_dir.name, root / LABELS_FILE)


def _discover_classification(
    root: Path, seed: int, val_fraction: float, test_fraction: float, images_only: Collection[str] = ()
) -> tuple[dict[str, list[ClassificationItem]], list[str], Problems]:
    _check_fractions(val_fraction, test_fraction)
    problems: Problems = []
    splits: dict[str, list[ClassificationItem]] = {split: [] for split in SPLITS}
    if not root.is_dir():
        return splits, [], [(root, "dataset folder not found")]
    given = _present_splits(root)
    top = _list_class_folders(root, problems)
    if given:
        mixed = sorted(set(top) - set(SPLITS))
        if mixed:
            problems.append((root / mixed[0], "class folder beside train/val/test split folders; keep one layout"))
        folders = {split: _list_class_folders(root / split, problems) for split in given}
    else:
        folders = {"train": top}
    class_names = sorted({name for classes in folders.values() for name in classes})
    if len(class_names) < 2:
        found = f"only class '{class_names[0]}'" if class_names else "no class folders"
        problems.append((root, f"{found}; a classification dataset needs at least two class folders ROOT/CLASS_NAME/"))
        return splits, class_names, problems
    for name in images_only:
        choose("images-only class", name, class_names)
    annotated = read_label_spec(root).annotated
    _warn_unannotated_masks(root, [path for classes in folders.values() for path in classes.values()], annotated)
    masked = set(annotated) - set(images_only)
    groups = {
        split: {name: _class_groups(path, class_names.index(name), problems, name in masked)
                for name, path in classes.items()}
        for split, classes in folders.items()
    }
    for split in set(given) - {"train"}:
        splits[split] = [item for per_class in groups[split].values() for item in _flatten(per_class)]
    rng = np.random.default_rng(seed)
    for name, pool in sorted(groups.get("train", {}).items()):
        if not pool:
            continue
        n_test = 0 if "test" in given else _carve_count(len(pool), test_fraction)
        n_val = 0 if "val" in given else _carve_count(len(pool), val_fraction)
        if len(pool) <= n_test + n_val:
            problems.append((
                folders["train"][name],
                f"class '{name}' has only {len(pool)} image file(s); carving val and test needs at least "
                f"{n_test + n_val + 1}; add images or set the val/test fractions to 0",
            ))
            continue
        train, val, test = _carve(pool, n_val, n_test, rng)
        splits["train"] += train
        splits["val"] += val
        splits["test"] += test
    return _sorted_by_name(splits), class_names, problems


def _add_bad(bad: dict[Path, str], exc: DataError, path: Path) -> None:
    bad.setdefault(path, _reason(exc, path))


def _check_segmentation(root: Path, seed: int) -> DatasetReport:
    splits, problems = _discover_segmentation(root, seed, 0.15, 0.15)
    bad: dict[Path, str] = dict(problems)
    histogram = np.zeros(len(LABEL_NAMES), dtype=np.int64)
    shapes: list[tuple[int, int]] = []
    for item in (item for items in splits.values() for item in items):
        if item.image in bad or item.mask in bad:
            continue
        try:
            image = read_image(item.image, item.frame)
        except DataError as exc:
            _add_bad(bad, exc, item.image)
            continue
        try:
            mask = read_item_mask(item)
            _check_same_size(item, image, mask)
        except DataError as exc:
            _add_bad(bad, exc, item.mask)
            continue
        histogram += np.bincount(mask.ravel(), minlength=len(LABEL_NAMES))
        shapes.append(image.shape)
    report = DatasetReport(
        kind="segmentation",
        splits={split: len(items) for split, items in splits.items()},
        label_histogram=dict(zip(LABEL_NAMES, histogram.tolist())),
        class_names=list(LABEL_NAMES),
        bad_files=list(bad.items()),
    )
    return _with_size_range(report, shapes)


def _label_values(path: Path, allowed: Collection[int]) -> np.ndarray:
    """A label mask's ids at its own size (H, W) uint8, checked against ``allowed`` (see :func:`read_label_mask`)."""
    array = read_label_values(path)
    values = np.unique(array)
    found = {float(v) for v in values}
    foreground = sorted(set(allowed) - {0})
    if found <= {0.0, 255.0} and 255 not in allowed and len(foreground) == 1:
        return (array == 255).astype(np.uint8) * np.uint8(foreground[0])
    if not found <= {float(v) for v in allowed}:
        outside = ", ".join(f"{v:g}" for v in sorted(found - {float(v) for v in allowed})[:10])
        raise DataError(f"{path}: mask holds label id(s) {outside}, which its class does not annotate (allowed "
                        f"{', '.join(map(str, sorted(allowed)))}, see labels.json); fix the mask or add the label "
                        "to the class's \"annotated\" list")
    return array.astype(np.uint8)


def _class_of(item: ClassificationItem) -> str:
    """The class folder an item's image sits in."""
    return item.image.parent.name


def _mask_problems(items: Sequence[ClassificationItem], spec: LabelSpec,
                   image_shapes: dict[Path, tuple[int, int]] | None = None) -> tuple[Problems, dict[str, dict[str, int]]]:
    """Read every item's mask: the bad ones, and per class the number of masks holding each annotated label.

    With ``image_shapes`` (image path -> (H, W)), a mask of another size than its image is bad too.
    """
    problems: Problems = []
    frames: dict[str, dict[str, int]] = {}
    for item in items:
        if item.mask is None:
            continue
        name = _class_of(item)
        counts = frames.setdefault(name, {spec.labels[i]: 0 for i in spec.annotated.get(name, ())})
        try:
            mask = _label_values(item.mask, spec.allowed(name))
        except DataError as exc:
            problems.append((item.mask, _reason(exc, item.mask)))
            continue
        shape = (image_shapes or {}).get(item.image, mask.shape)
        if mask.shape != shape:
            problems.append((item.mask, f"mask is {_hw(mask.shape)} but {item.image} is {_hw(shape)}; "
                                        "resize the mask to its image"))
            continue
        present = np.unique(mask)
        for label_id in present[present > 0]:
            counts[spec.labels[label_id]] += 1
    return problems, frames


def _check_classification(root: Path, seed: int) -> DatasetReport:
    splits, class_names, problems = _discover_classification(root, seed, 0.15, 0.15)
    bad: dict[Path, str] = dict(problems)
    counts = dict.fromkeys(class_names, 0)
    shape_of: dict[Path, tuple[int, int]] = {}
    for item in (item for items in splits.values() for item in items):
        if item.image in bad:
            continue
        try:
            shape_of[item.image] = read_image(item.image, item.frame).shape
        except DataError as exc:
            _add_bad(bad, exc, item.image)
            continue
        counts[class_names[item.label]] += 1
    shapes = list(shape_of.values())
    items = [item for items in splits.values() for item in items if item.image not in bad]
    mask_problems, label_frames = _mask_problems(items, read_label_spec(root), shape_of)
    bad.update(mask_problems)
    masked = {name: sum(item.mask is not None for item in items if _class_of(item) == name) for name in label_frames}
    report = DatasetReport(
        kind="dense classification" if masked else "classification",
        splits={split: len(items) for split, items in splits.items()},
        label_histogram=counts,
        class_names=class_names,
        bad_files=list(bad.items()),
        masked=masked,
        label_frames=label_frames,
    )
    return _with_size_range(report, shapes)


def _with_size_range(report: DatasetReport, shapes: list[tuple[int, int]]) -> DatasetReport:
    if shapes:
        heights, widths = zip(*shapes)
        report.min_hw = (min(heights), min(widths))
        report.max_hw = (max(heights), max(widths))
    return report
