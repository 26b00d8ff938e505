"""nnU-Net v2 raw and MSD dataset folders: dataset.json, label mapping, NIfTI cases, and the same training as our layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image

from fedefm.data.datasets import check_dataset, find_segmentation_splits, read_item_mask
from fedefm.data.readers import count_frames, read_image, read_label_values, read_mask
from fedefm.data.synth import write_seg_dataset
from fedefm.errors import DataError
from fedefm.finetune import train
from fedefm.finetune.config import FinetuneConfig
from fedefm.finetune.evaluate import evaluate_model

SIZE = 64
# nnU-Net stores this dataset's guidewire as 1 and catheter as 2: the mapping must swap them back.
NNUNET_LABELS = {"background": 0, "Guide wire": 1, "catheter": 2}
SWAP = np.array([0, 2, 1], np.uint8)  # our label -> stored value under NNUNET_LABELS (and back)


def to_nnunet(ours: Path, root: Path, file_ending: str = ".png") -> Path:
    """Copy an images/ + masks/ folder into the nnU-Net v2 raw layout, labels stored as NNUNET_LABELS says."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for image in sorted((ours / "images").glob("*.png")):
        mask = SWAP[read_mask(ours / "masks" / image.name)]
        if file_ending == ".png":
            shutil.copy(image, root / "imagesTr" / f"{image.stem}_0000.png")
            Image.fromarray(mask).save(root / "labelsTr" / f"{image.stem}.png")
        else:
            save_nifti(root / "imagesTr" / f"{image.stem}_0000{file_ending}", np.asarray(Image.open(image)))
            save_nifti(root / "labelsTr" / f"{image.stem}{file_ending}", mask)
    write_json(root / "dataset.json", {"channel_names": {"0": "X-ray"}, "labels": NNUNET_LABELS,
                                       "numTraining": len(list((root / "imagesTr").iterdir())),
                                       "file_ending": file_ending})
    return root


def save_nifti(path: Path, array: np.ndarray) -> None:
    """Save a 2-D (rows, columns) array as nnU-Net 2-D NIfTI: voxel axes (x, y, 1)."""
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(array.T[..., None]), np.eye(4)), path)


def write_json(path: Path, table: dict) -> None:
    path.write_text(json.dumps(table))


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "ours"
    write_seg_dataset(root, "clinical", 12, size=SIZE, seed=5)
    return root


def test_nifti_case_reads_back_as_the_saved_image_and_a_3d_volume_is_refused(tmp_path):
    image = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4)
    save_nifti(tmp_path / "case.nii.gz", image)
    assert count_frames(tmp_path / "case.nii.gz") == 1
    assert read_image(tmp_path / "case.nii.gz").shape == (6, 4)
    np.testing.assert_array_equal(read_label_values(tmp_path / "case.nii.gz"), image)
    np.testing.assert_allclose(read_image(tmp_path / "case.nii.gz"), image / 23.0, atol=1e-6)
    nibabel.save(nibabel.Nifti1Image(np.zeros((6, 4, 3), np.uint8), np.eye(4)), tmp_path / "volume.nii")
    with pytest.raises(DataError, match=r"volume\.nii: NIfTI of shape \(6, 4, 3\) is not a 2-D image"):
        count_frames(tmp_path / "volume.nii")


def test_nnunet_labels_map_by_name_and_the_splits_match_our_layout(ours, tmp_path):
    root = to_nnunet(ours, tmp_path / "Dataset001_XA")
    mine, theirs = find_segmentation_splits(ours, seed=1), find_segmentation_splits(root, seed=1)
    assert {s: [i.name for i in items] for s, items in mine.items()} == \
        {s: [i.name for i in items] for s, items in theirs.items()}
    item = theirs["train"][0]
    np.testing.assert_array_equal(read_item_mask(item), read_mask(ours / "masks" / f"{item.name}.png"))
    assert check_dataset(root).label_histogram == check_dataset(ours).label_histogram


def test_msd_layout_with_nifti_cases_is_read_through_its_training_list(ours, tmp_path):
    nnunet = to_nnunet(ours, tmp_path / "nn", file_ending=".nii.gz")
    msd = tmp_path / "Task01_XA"
    shutil.copytree(nnunet / "labelsTr", msd / "labelsTr")
    (msd / "imagesTr").mkdir()
    training = []
    for image in sorted((nnunet / "imagesTr").iterdir()):
        case = image.name.removesuffix("_0000.nii.gz")
        shutil.copy(image, msd / "imagesTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    labels = {str(value): name for name, value in NNUNET_LABELS.items()}
    write_json(msd / "dataset.json", {"name": "XA", "modality": {"0": "X-ray"}, "labels": labels,
                                      "training": training, "test": []})
    splits = find_segmentation_splits(msd, seed=1)
    assert [i.name for i in splits["test"]] == [i.name for i in find_segmentation_splits(ours, seed=1)["test"]]
    report = check_dataset(msd)
    assert not report.bad_files and report.label_histogram == check_dataset(ours).label_histogram


@pytest.mark.slow
def test_an_nnunet_folder_trains_and_evaluates_the_same_as_our_layout(ours, tmp_path):
    root = to_nnunet(ours, tmp_path / "Dataset001_XA")
    results = []
    for data in (ours, root):
        out = tmp_path / f"run_{data.name}"
        cfg = FinetuneConfig(data=data, out=out, shots=6, epochs=2, batch_size=4, samples_per_epoch=8,
                             warmup_steps=1, image_size=SIZE, seed=0)
        train.run(cfg, progress=False)
        results.append(evaluate_model(out, data))
    assert results[0] == results[1]


@pytest.mark.parametrize("change, match", [
    (lambda t: t.pop("file_ending"), r"dataset\.json: misses \"file_ending\""),
    (lambda t: t["labels"].update(stent=3), r"dataset\.json: label \"stent\" = 3 cannot be mapped"),
    (lambda t: t.update(channel_names={"0": "X-ray", "1": "DSA"}), r"dataset\.json: declares channels"),
    (lambda t: t["labels"].update(catheter=[1, 2]), r"dataset\.json: label \"catheter\" is a region"),
])
def test_a_bad_dataset_json_is_a_clear_error_naming_it(ours, tmp_path, change, match):
    root = to_nnunet(ours, tmp_path / "Dataset001_XA")
    table = json.loads((root / "dataset.json").read_text())
    change(table)
    write_json(root / "dataset.json", table)
    with pytest.raises(DataError, match=match):
        find_segmentation_splits(root)


def test_a_label_value_the_dataset_json_does_not_list_is_a_clear_error_naming_the_file(ours, tmp_path):
    root = to_nnunet(ours, tmp_path / "Dataset001_XA")
    first = sorted((root / "labelsTr").iterdir())[0]
    Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(first)
    report = check_dataset(root)
    assert [path for path, _ in report.bad_files] == [first]
    assert "label value(s) 7, which dataset.json's \"labels\" does not list" in report.bad_files[0][1]
