"""nnU-Net v2 raw and Medical Segmentation Decathlon (MSD) dataset folders, read as segmentation datasets.

nnU-Net v2 (``nnUNet_raw/DatasetXXX_NAME``): ``dataset.json`` with ``channel_names`` ({"0": "X-ray"}), ``labels``
({"background": 0, "catheter": 1, ...}) and ``file_ending`` (".png", ".tif", ".nii.gz"); images
``imagesTr/CASE_0000{file_ending}`` with labels ``labelsTr/CASE{file_ending}``, unlabelled ``imagesTs/``.
MSD (``TaskXX_NAME``): ``dataset.json`` with ``modality`` ({"0": "X-ray"}), ``labels`` ({"0": "background",
"1": "catheter"}) and ``training`` ([{"image": "./imagesTr/CASE.nii.gz", "label": "./labelsTr/CASE.nii.gz"}]).

Label names map to fedefm's (background, catheter, guidewire) by name, ignoring case, spaces, ``-`` and ``_``
(so "Guide wire" is the guidewire); the mapping is a lookup table from stored value to fedefm label. fedefm
models see one grey channel, so a dataset must declare exactly one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from fedefm.data.labels import LABEL_NAMES
from fedefm.data.readers import image_stem
from fedefm.errors import DataError

DATASET_JSON = "dataset.json"
# Stored label values above this cannot come from an 8- or 16-bit label image of a few classes.
_MAX_VALUE = 65535


@dataclass(frozen=True)
class Case:
    """One labelled case: its single-channel image and its label image."""

    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class LayoutSpec:
    """What dataset.json says: the layout ("nnU-Net v2" or "MSD"), the value->fedefm-label table and the cases."""

    layout: str
    label_map: tuple[int, ...]
    training: tuple[Case, ...]


def is_nnunet_root(root: Path) -> bool:
    """Whether ``root`` is an nnU-Net v2 or MSD folder: a dataset.json beside imagesTr/."""
    return (Path(root) / DATASET_JSON).is_file() and (Path(root) / "imagesTr").is_dir()


def read_layout(root: Path) -> LayoutSpec:
    """Read ROOT/dataset.json and list the labelled training cases.

    Raises:
        DataError: naming dataset.json, when it is not JSON, misses a field its layout needs, declares more than
            one channel, or names a label that is not background, catheter or guidewire (or a region label);
            naming an image or label file, when a case's file is missing.
    """
    root = Path(root)
    path = root / DATASET_JSON
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(table, dict):
        raise DataError(f"{path}: must hold a JSON object with channel_names, labels and file_ending")
    msd = "channel_names" not in table and "modality" in table
    required = ("modality", "labels", "training") if msd else ("channel_names", "labels", "file_ending")
    missing = [key for key in required if key not in table]
    if missing:
        layout = "an MSD" if msd else "an nnU-Net v2"
        raise DataError(f"{path}: misses \"{missing[0]}\", which {layout} dataset.json must hold "
                        f"({', '.join(required)})")
    channels = table["modality" if msd else "channel_names"]
    if not isinstance(channels, dict) or len(channels) != 1:
        raise DataError(f"{path}: declares channels {channels!r}; fedefm models read one grey channel, "
                        "so give exactly one (e.g. {\"0\": \"X-ray\"})")
    label_map = _label_map(table["labels"], msd, path)
    cases = _msd_cases(root, table["training"], path) if msd else _nnunet_cases(root, table["file_ending"], path)
    return LayoutSpec("MSD" if msd else "nnU-Net v2", label_map, cases)


def _label_map(labels: object, msd: bool, path: Path) -> tuple[int, ...]:
    """Lookup table stored value -> fedefm label from nnU-Net's {name: value} or MSD's {"value": name}."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: \"labels\" must map label names to values, e.g. {{\"background\": 0, \"catheter\": 1}}")
    pairs = [(name, value) for value, name in labels.items()] if msd else list(labels.items())
    table: dict[int, int] = {}
    for name, value in pairs:
        if isinstance(value, list):
            raise DataError(f"{path}: label \"{name}\" is a region ({value}); fedefm reads one value per label")
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise DataError(f"{path}: label \"{name}\" has value {value!r}, not a whole number") from None
        key = re.sub(r"[\s_-]+", "", str(name)).lower()
        if key not in LABEL_NAMES or not 0 <= value <= _MAX_VALUE:
            raise DataError(f"{path}: label \"{name}\" = {value} cannot be mapped; fedefm segments "
                            f"{', '.join(LABEL_NAMES)} - rename it to one of those (values 0..{_MAX_VALUE})")
        table[value] = LABEL_NAMES.index(key)
    if table.get(0) != 0:
        raise DataError(f"{path}: value 0 must be \"background\" (found {labels!r})")
    lookup = [-1] * (max(table) + 1)
    for value, ours in table.items():
        lookup[value] = ours
    return tuple(lookup)


def _nnunet_cases(root: Path, file_ending: object, path: Path) -> tuple[Case, ...]:
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise DataError(f"{path}: \"file_ending\" must be a suffix such as \".png\" or \".nii.gz\"; "
                        f"found {file_ending!r}")
    cases = []
    for image in sorted((root / "imagesTr").glob(f"*_0000{file_ending}")):
        case = image.name[: -len(f"_0000{file_ending}")]
        cases.append(Case(case, image, _existing(root / "labelsTr" / f"{case}{file_ending}", image)))
    labels = {p.name for p in (root / "labelsTr").glob(f"*{file_ending}")} if (root / "labelsTr").is_dir() else set()
    orphans = sorted(labels - {case.label.name for case in cases})
    if orphans:
        raise DataError(f"{root / 'labelsTr' / orphans[0]}: has no image; expected "
                        f"{root / 'imagesTr' / orphans[0][: -len(file_ending)]}_0000{file_ending}")
    if not cases:
        raise DataError(f"{root / 'imagesTr'}: no images named CASE_0000{file_ending}; nnU-Net v2 names "
                        "channel 0 of each case so")
    return tuple(cases)


def _msd_cases(root: Path, training: object, path: Path) -> tuple[Case, ...]:
    if not isinstance(training, list) or not training:
        raise DataError(f"{path}: \"training\" must list {{\"image\": ..., \"label\": ...}} pairs")
    cases = []
    for entry in training:
        if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
            raise DataError(f"{path}: training entry {entry!r} needs \"image\" and \"label\"")
        image = root / entry["image"]
        if not image.is_file():
            raise DataError(f"{image}: image listed in {path} not found")
        cases.append(Case(image_stem(image), image, _existing(root / entry["label"], image)))
    return tuple(sorted(cases, key=lambda case: case.name))


def _existing(label: Path, image: Path) -> Path:
    if not label.is_file():
        raise DataError(f"{image}: has no label; expected {label}")
    return label
