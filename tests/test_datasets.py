"""Datasets: folder layouts, deterministic splits, lazy samples and the dataset checker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from fedefm.data.datasets import (
    ClassificationDataset,
    ClassificationItem,
    LabelSpec,
    SegmentationDataset,
    SegmentationItem,
    check_dataset,
    check_label_masks,
    find_classification_splits,
    find_segmentation_splits,
    format_report,
    list_silo_images,
    read_label_mask,
    read_label_spec,
    resize_mask,
)
from fedefm.errors import ConfigError, DataError


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_segmentation_folder(folder: Path, names: list[str], size: int = 8) -> None:
    """images/NAME.png (a ramp) and masks/NAME.png (catheter on the top half, as 0/255)."""
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2] = 255
    for name in names:
        save_png(folder / "images" / f"{name}.png", np.tile(np.arange(size, dtype=np.uint8) * 30, (size, 1)))
        save_png(folder / "masks" / f"{name}.png", mask)


def make_classification_folder(root: Path, counts: dict[str, int], size: int = 8) -> None:
    for class_name, n in counts.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            save_png(root / class_name / f"{class_name}{k:02d}.png", np.full((size, size), 10 * k, np.uint8))


def names(items) -> list[str]:
    return [item.name for item in items]


def test_flat_layout_pairs_by_stem_and_carves_val_and_test(tmp_path):
    make_segmentation_folder(tmp_path, [f"case{k:02d}" for k in range(10)])

    splits = find_segmentation_splits(tmp_path, seed=0, val_fraction=0.2, test_fraction=0.1)

    assert {split: len(items) for split, items in splits.items()} == {"train": 7, "val": 2, "test": 1}
    everything = sorted(names(splits["train"]) + names(splits["val"]) + names(splits["test"]))
    assert everything == [f"case{k:02d}" for k in range(10)]
    item = splits["val"][0]
    assert item.image == tmp_path / "images" / f"{item.name}.png"
    assert item.mask == tmp_path / "masks" / f"{item.name}.png"


def test_same_seed_gives_the_same_split_and_another_seed_a_different_one(tmp_path):
    make_segmentation_folder(tmp_path, [f"case{k:02d}" for k in range(20)])

    first = find_segmentation_splits(tmp_path, seed=3)
    again = find_segmentation_splits(tmp_path, seed=3)
    other = find_segmentation_splits(tmp_path, seed=4)

    assert first == again
    assert names(first["test"]) != names(other["test"])


def test_given_split_folders_are_used_as_given_and_test_is_never_carved(tmp_path):
    make_segmentation_folder(tmp_path / "train", [f"tr{k}" for k in range(6)])
    make_segmentation_folder(tmp_path / "test", ["te0", "te1"])

    splits = find_segmentation_splits(tmp_path, seed=0, val_fraction=0.2, test_fraction=0.5)

    assert names(splits["test"]) == ["te0", "te1"]
    assert len(splits["val"]) == 1  # round(0.2 * 6) = 1, carved from train only
    assert sorted(names(splits["train"]) + names(splits["val"])) == [f"tr{k}" for k in range(6)]


def test_all_three_split_folders_are_kept_untouched(tmp_path):
    for split in ("train", "val", "test"):
        make_segmentation_folder(tmp_path / split, [f"{split}{k}" for k in range(2)])

    splits = find_segmentation_splits(tmp_path, seed=0)

    assert {split: names(items) for split, items in splits.items()} == {
        "train": ["train0", "train1"],
        "val": ["val0", "val1"],
        "test": ["test0", "test1"],
    }


def test_zero_fractions_keep_everything_in_train(tmp_path):
    make_segmentation_folder(tmp_path, ["a", "b"])

    splits = find_segmentation_splits(tmp_path, val_fraction=0, test_fraction=0)

    assert names(splits["train"]) == ["a", "b"] and splits["val"] == [] and splits["test"] == []


def test_image_without_mask_and_mask_without_image_are_both_named(tmp_path):
    make_segmentation_folder(tmp_path, ["a", "b", "c"])
    (tmp_path / "masks" / "b.png").rename(tmp_path / "masks" / "z.png")

    with pytest.raises(DataError, match=r"b\.png: has no mask") as error:
        find_segmentation_splits(tmp_path)
    assert "z.png: has no image" in str(error.value)


def test_root_with_no_images_is_rejected_naming_the_root(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()

    with pytest.raises(DataError, match=rf"{tmp_path / 'images'}: no images found"):
        find_segmentation_splits(tmp_path)


def test_root_without_any_layout_is_rejected(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}: no images/ \+ masks/ folders"):
        find_segmentation_splits(tmp_path)


def test_too_few_images_to_carve_splits_is_rejected(tmp_path):
    make_segmentation_folder(tmp_path, ["a", "b"])

    with pytest.raises(DataError, match="only 2 training image file"):
        find_segmentation_splits(tmp_path)


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (1.0, 0.0), (0.5, 0.5)])
def test_fractions_outside_range_are_config_errors(tmp_path, val, test):
    make_segmentation_folder(tmp_path, ["a", "b", "c"])

    with pytest.raises(ConfigError, match="fraction"):
        find_segmentation_splits(tmp_path, val_fraction=val, test_fraction=test)


def write_npy_stack(path: Path, frames: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, frames)
    return path


def test_multi_frame_image_expands_to_frames_with_a_stack_mask(tmp_path):
    frames = np.stack([np.full((5, 5), k, np.uint8) for k in range(3)])  # shape: (3, 5, 5)
    write_npy_stack(tmp_path / "images" / "cine.npy", frames)
    write_npy_stack(tmp_path / "masks" / "cine.npy", (frames > 0).astype(np.uint8))

    splits = find_segmentation_splits(tmp_path, val_fraction=0, test_fraction=0)

    assert names(splits["train"]) == ["cine_f000", "cine_f001", "cine_f002"]
    assert [(item.frame, item.mask_frame) for item in splits["train"]] == [(0, 0), (1, 1), (2, 2)]
    sample = SegmentationDataset(splits["train"], size=5)[2]
    assert sample["mask"].sum() == 25


def test_multi_frame_image_pairs_with_per_frame_masks(tmp_path):
    write_npy_stack(tmp_path / "images" / "cine.npy", np.zeros((2, 5, 5), np.uint8))
    for k in range(2):
        save_png(tmp_path / "masks" / f"cine_f{k:03d}.png", np.full((5, 5), k, np.uint8))

    splits = find_segmentation_splits(tmp_path, val_fraction=0, test_fraction=0)

    assert [(item.name, item.frame, item.mask_frame, item.mask.name) for item in splits["train"]] == [
        ("cine_f000", 0, None, "cine_f000.png"),
        ("cine_f001", 1, None, "cine_f001.png"),
    ]


def test_frames_of_one_file_never_straddle_splits(tmp_path):
    for k in range(6):
        write_npy_stack(tmp_path / "images" / f"cine{k}.npy", np.zeros((4, 5, 5), np.uint8))
        write_npy_stack(tmp_path / "masks" / f"cine{k}.npy", np.zeros((4, 5, 5), np.uint8))

    splits = find_segmentation_splits(tmp_path, seed=1)

    sources = {split: {item.image.name for item in items} for split, items in splits.items()}
    assert sources["train"].isdisjoint(sources["val"]) and sources["train"].isdisjoint(sources["test"])
    assert [len(items) for items in splits.values()] == [16, 4, 4]


def test_mask_stack_with_wrong_frame_count_is_rejected(tmp_path):
    write_npy_stack(tmp_path / "images" / "cine.npy", np.zeros((3, 5, 5), np.uint8))
    write_npy_stack(tmp_path / "masks" / "cine.npy", np.zeros((2, 5, 5), np.uint8))

    with pytest.raises(DataError, match=r"masks/cine\.npy: holds 2 frame\(s\) but .*cine\.npy holds 3"):
        find_segmentation_splits(tmp_path, val_fraction=0, test_fraction=0)


def test_segmentation_sample_is_resized_and_binary_mask_becomes_catheter(tmp_path):
    make_segmentation_folder(tmp_path, ["a"], size=8)
    item = SegmentationItem("a", tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png")

    sample = SegmentationDataset([item], size=4)[0]

    assert sample["name"] == "a"
    assert sample["image"].shape == (1, 4, 4) and sample["image"].dtype == torch.float32
    assert 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert sample["mask"].dtype == torch.long
    assert sample["mask"].tolist() == [[1] * 4, [1] * 4, [0] * 4, [0] * 4]


def test_image_and_mask_of_different_sizes_are_rejected_naming_both(tmp_path):
    save_png(tmp_path / "images" / "case_012.png", np.zeros((8, 8), np.uint8))
    save_png(tmp_path / "masks" / "case_012.png", np.zeros((6, 8), np.uint8))
    item = SegmentationItem("case_012", tmp_path / "images" / "case_012.png", tmp_path / "masks" / "case_012.png")

    with pytest.raises(DataError, match=r"masks/case_012\.png: mask is 6x8 but .*images/case_012\.png is 8x8"):
        SegmentationDataset([item], size=8)[0]


def test_transform_receives_image_and_mask_and_its_output_is_returned(tmp_path):
    make_segmentation_folder(tmp_path, ["a"], size=4)
    item = SegmentationItem("a", tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png")

    def flip(sample):
        return {"image": sample["image"].flip(-2), "mask": sample["mask"].flip(-2)}

    sample = SegmentationDataset([item], size=4, transform=flip)[0]

    assert sample["mask"][:, 0].tolist() == [0, 0, 1, 1]


def test_classification_folders_give_sorted_classes_and_stratified_splits(tmp_path):
    make_classification_folder(tmp_path, {"phantom": 10, "animal": 10})

    splits, class_names = find_classification_splits(tmp_path, seed=0, val_fraction=0.2, test_fraction=0.2)

    assert class_names == ["animal", "phantom"]
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        assert sorted(item.label for item in splits[split]) == [0] * n + [1] * n
    assert all(item.name.startswith(class_names[item.label] + "/") for items in splits.values() for item in items)


def test_classification_split_folders_are_used_as_given(tmp_path):
    make_classification_folder(tmp_path / "train", {"a": 4, "b": 4})
    make_classification_folder(tmp_path / "test", {"a": 1, "b": 1})

    splits, class_names = find_classification_splits(tmp_path, seed=0, val_fraction=0.25, test_fraction=0.5)

    assert class_names == ["a", "b"]
    assert names(splits["test"]) == ["a/a00", "b/b00"]
    assert len(splits["val"]) == 2 and len(splits["train"]) == 6


def test_empty_class_folder_is_rejected_by_name(tmp_path):
    make_classification_folder(tmp_path, {"animal": 4, "human": 4})
    (tmp_path / "phantom").mkdir()

    with pytest.raises(DataError, match="class folder 'phantom' has no images"):
        find_classification_splits(tmp_path)


def test_single_class_is_rejected(tmp_path):
    make_classification_folder(tmp_path, {"animal": 4})

    with pytest.raises(DataError, match="only class 'animal'"):
        find_classification_splits(tmp_path)


def test_classification_sample_has_image_label_and_name(tmp_path):
    make_classification_folder(tmp_path, {"a": 1, "b": 1}, size=6)
    item = ClassificationItem("b/b00", tmp_path / "b" / "b00.png", 1)

    sample = ClassificationDataset([item], size=3)[0]

    assert sample["image"].shape == (1, 3, 3)
    assert sample["label"] == 1 and sample["name"] == "b/b00"


def test_check_dataset_reports_sizes_splits_and_pixel_counts_of_a_good_folder(tmp_path):
    make_segmentation_folder(tmp_path, [f"c{k}" for k in range(4)], size=8)
    save_png(tmp_path / "images" / "wide.png", np.zeros((8, 12), np.uint8))
    save_png(tmp_path / "masks" / "wide.png", np.full((8, 12), 2, np.uint8))

    report = check_dataset(tmp_path)

    assert report.kind == "segmentation"
    assert report.bad_files == []
    assert sum(report.splits.values()) == 5
    assert (report.min_hw, report.max_hw) == ((8, 8), (8, 12))
    assert report.label_histogram == {"background": 4 * 32, "catheter": 4 * 32, "guidewire": 96}


def test_check_dataset_lists_every_bad_file_not_only_the_first(tmp_path):
    make_segmentation_folder(tmp_path, [f"c{k}" for k in range(5)], size=8)
    save_png(tmp_path / "masks" / "c1.png", np.array([[0, 7]], np.uint8).repeat(8, 0).repeat(4, 1))  # shape: (8, 8)
    (tmp_path / "images" / "c3.png").write_bytes(b"broken")

    report = check_dataset(tmp_path)

    assert [(path.name, reason[:24]) for path, reason in report.bad_files] == [
        ("c1.png", "mask holds values {0, 7}"),
        ("c3.png", "unreadable or truncated "),
    ]
    text = _render(format_report(report))
    assert "c1.png" in text and "c3.png" in text


def test_check_dataset_on_classification_counts_images_per_class(tmp_path):
    make_classification_folder(tmp_path, {"animal": 4, "human": 3})
    (tmp_path / "phantom").mkdir()

    report = check_dataset(tmp_path)

    assert report.kind == "classification"
    assert report.class_names == ["animal", "human", "phantom"]
    assert report.label_histogram == {"animal": 4, "human": 3, "phantom": 0}
    assert [path.name for path, _ in report.bad_files] == ["phantom"]


def _render(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


# --------------------------------------------------------------------------- dense pre-training corpus


DENSE_LABELS = ["background", "catheter", "guidewire", "vessel"]


def make_dense_corpus(root: Path, annotated: dict | None = None) -> Path:
    """Three classes of four 8x8 images: devices masks 'dev/masks/' for 3 of them, vessel masks 'ves/masks/' for all,
    and 'plain' images only; labels.json annotates dev (catheter, guidewire) and ves (vessel)."""
    for cls in ("dev", "ves", "plain"):
        for k in range(4):
            save_png(root / cls / f"im{k}.png", np.full((8, 8), 40 * k, np.uint8))
    for k in range(3):
        save_png(root / "dev" / "masks" / f"im{k}.png", np.eye(8, dtype=np.uint8) * (1 + k % 2))
    for k in range(4):
        save_png(root / "ves" / "masks" / f"im{k}.png", np.eye(8, dtype=np.uint8)[::-1] * 3)
    table = {"labels": DENSE_LABELS,
             "annotated": annotated if annotated is not None else {"dev": ["catheter", "guidewire"], "ves": ["vessel"]}}
    (root / "labels.json").write_text(json.dumps(table))
    return root


def all_items(splits):
    return [item for items in splits.values() for item in items]


def test_class_folder_masks_pair_with_their_images_and_are_not_counted_as_images(tmp_path):
    root = make_dense_corpus(tmp_path / "corpus")
    splits, classes = find_classification_splits(root, val_fraction=0, test_fraction=0)
    items = {item.name: item for item in all_items(splits)}
    assert classes == ["dev", "plain", "ves"] and len(items) == 12
    assert {name: item.mask.relative_to(root).as_posix() for name, item in items.items() if item.mask} == {
        **{f"dev/im{k}": f"dev/masks/im{k}.png" for k in range(3)},
        **{f"ves/im{k}": f"ves/masks/im{k}.png" for k in range(4)},
    }
    assert items["dev/im3"].mask is None and items["plain/im0"].mask is None


def test_images_only_classes_keep_no_masks(tmp_path):
    root = make_dense_corpus(tmp_path / "corpus")
    splits, _ = find_classification_splits(root, val_fraction=0, test_fraction=0, images_only=["dev"])
    masked = sorted(item.name for item in all_items(splits) if item.mask is not None)
    assert masked == [f"ves/im{k}" for k in range(4)]
    with pytest.raises(ConfigError, match="images-only class deev: did you mean 'dev'"):
        find_classification_splits(root, images_only=["deev"])


def test_masks_of_a_class_that_labels_json_does_not_annotate_are_ignored(tmp_path, caplog):
    root = make_dense_corpus(tmp_path / "corpus", annotated={"ves": ["vessel"]})
    splits, _ = find_classification_splits(root, val_fraction=0, test_fraction=0)
    assert not any(item.mask for item in all_items(splits) if item.name.startswith("dev/"))
    assert "dev/masks: ignored; add 'dev' to" in caplog.text


def test_a_corpus_without_labels_json_is_images_only(tmp_path):
    root = make_dense_corpus(tmp_path / "corpus")
    (root / "labels.json").unlink()
    assert read_label_spec(root) == LabelSpec()
    splits, _ = find_classification_splits(root, val_fraction=0, test_fraction=0)
    assert all(item.mask is None for item in all_items(splits))


def test_label_spec_maps_classes_to_label_ids(tmp_path):
    spec = read_label_spec(make_dense_corpus(tmp_path / "corpus"))
    assert spec.labels == tuple(DENSE_LABELS)
    assert spec.annotated == {"dev": (1, 2), "ves": (3,)}
    assert spec.allowed("dev") == (0, 1, 2) and spec.allowed("plain") == (0,)


@pytest.mark.parametrize("table, match", [
    ("{not json", "not valid JSON"),
    ({"labels": ["catheter", "background"]}, '"background" first'),
    ({"labels": DENSE_LABELS, "annotated": {"dev": ["stent"]}}, "class 'dev' annotates 'stent'"),
    ({"labels": DENSE_LABELS, "annotated": {"dev": ["background"]}}, "class 'dev' annotates 'background'"),
    ({"labels": DENSE_LABELS, "annotated": {"ves": "vessel"}}, "class 'ves' must map to a list of labels"),
])
def test_a_malformed_labels_json_is_an_error_naming_it(tmp_path, table, match):
    (tmp_path / "labels.json").write_text(table if isinstance(table, str) else json.dumps(table))
    with pytest.raises(DataError, match=f"labels.json: .*{match}"):
        read_label_spec(tmp_path)


def test_a_label_mask_resizes_nearest_to_int64_ids(tmp_path):
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 3
    path = save_png(tmp_path / "m.png", mask)
    resized = read_label_mask(path, (0, 3), 8)
    assert resized.dtype == torch.int64 and resized.shape == (8, 8)
    assert set(resized.unique().tolist()) == {0, 3} and int((resized == 3).sum()) == 16


def test_shrinking_a_mask_keeps_a_one_pixel_wire_connected_and_each_pixel_to_its_largest_class():
    from skimage.draw import line
    from skimage.measure import label

    mask = np.zeros((512, 512), np.uint8)
    rows, cols = line(10, 20, 500, 300)
    mask[rows, cols] = 2                     # a 1 px guidewire, 4x thinner than an output pixel
    mask[100:140, 300:340] = 1               # a catheter block
    mask[100:102, 300:302] = 2               # a cell three quarters catheter, a quarter wire: catheter wins
    resized = resize_mask(mask, 128)
    wire = (resized == 2).numpy()
    assert label(wire, connectivity=2).max() == 1       # nearest-neighbour sampling leaves dozens of fragments
    assert wire.sum() < 2 * 512 // 4 * 1.5              # about one output pixel wide, not smeared
    assert resized[25, 75] == 1 and int((resized == 1).sum()) == 100
    assert torch.equal(resize_mask(mask[:, :], 512), torch.from_numpy(mask).long())


def test_a_mask_with_a_label_its_class_does_not_annotate_is_an_error_naming_the_file(tmp_path):
    path = save_png(tmp_path / "dev" / "masks" / "im0.png", np.full((4, 4), 3, np.uint8))
    with pytest.raises(DataError, match=r"dev/masks/im0.png: mask holds label id\(s\) 3, which its class does not "
                                        r"annotate \(allowed 0, 1, 2"):
        read_label_mask(path, (0, 1, 2), 4)


def test_a_binary_mask_of_a_class_with_one_label_marks_that_label(tmp_path):
    vessels = np.zeros((4, 4), np.uint8)
    vessels[1] = 255
    path = save_png(tmp_path / "drive_vessels.png", vessels)
    assert read_label_mask(path, (0, 3), 4).tolist() == (vessels // 255 * 3).tolist()
    with pytest.raises(DataError, match="drive_vessels.png: mask holds label id"):
        read_label_mask(path, (0, 1, 2), 4)


def test_an_unreadable_mask_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(DataError, match="broken.png"):
        read_label_mask(path, (0, 1), 4)


def test_a_mask_without_an_image_is_named(tmp_path):
    root = make_dense_corpus(tmp_path / "corpus")
    save_png(root / "ves" / "masks" / "stray.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="ves/masks/stray.png: has no image"):
        find_classification_splits(root)


def test_check_label_masks_lists_every_bad_mask(tmp_path):
    root = make_dense_corpus(tmp_path / "corpus")
    save_png(root / "dev" / "masks" / "im1.png", np.full((8, 8), 3, np.uint8))
    save_png(root / "ves" / "masks" / "im2.png", np.full((8, 8), 1, np.uint8))
    splits, _ = find_classification_splits(root, val_fraction=0, test_fraction=0)
    with pytest.raises(DataError, match=r"(?s)dev/masks/im1.png: mask holds label id\(s\) 3.*ves/masks/im2.png"):
        check_label_masks(all_items(splits), read_label_spec(root))


def test_data_check_reports_masks_per_class_and_names_bad_ones(tmp_path):
    root = make_dense_corpus(tmp_path / "corpus")
    report = check_dataset(root)
    assert report.kind == "dense classification" and not report.bad_files
    assert report.masked == {"dev": 3, "ves": 4}
    assert report.label_frames == {"dev": {"catheter": 2, "guidewire": 1}, "ves": {"vessel": 4}}
    console = Console(record=True, width=200)
    console.print(format_report(report))
    assert "3 of 4 images masked; masks holding catheter 2  guidewire 1" in console.export_text()
    save_png(root / "dev" / "masks" / "im0.png", np.full((8, 8), 3, np.uint8))
    save_png(root / "ves" / "masks" / "im1.png", np.zeros((6, 6), np.uint8))
    bad = dict(check_dataset(root).bad_files)
    assert "does not annotate" in bad[root / "dev" / "masks" / "im0.png"]
    assert "mask is 6x6 but" in bad[root / "ves" / "masks" / "im1.png"]


def test_a_silo_folder_reads_its_masks_too(tmp_path):
    root = make_dense_corpus(tmp_path / "silo")
    items = list_silo_images(root, ["dev", "plain", "ves"])
    assert sum(item.mask is not None for item in items) == 7
