"""Augmentation: image and mask move together, labels survive, a seed reproduces the draws."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import get_track_meta
from scipy import ndimage

from fedefm.data.augment import labels_from_shares, train_transforms


def blob_sample(size: int = 64) -> dict[str, torch.Tensor]:
    """An off-centre bright rectangle (0.8 on 0.2) whose mask is exactly image > 0.5."""
    image = torch.full((1, size, size), 0.2)
    image[0, 8:30, 12:50] = 0.8
    return {"image": image, "mask": (image[0] > 0.5).long()}


def three_label_sample(size: int = 64) -> dict[str, torch.Tensor]:
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[10:20, 5:60] = 1
    mask[30:34, 5:60] = 2
    return {"image": mask[None].float() / 2, "mask": mask}


def test_geometric_transforms_keep_mask_aligned_with_image():
    augment = train_transforms(seed=0)
    original = blob_sample()
    changed = 0

    for _ in range(30):
        out = augment(blob_sample())
        agreement = ((out["image"][0] > 0.5).long() == out["mask"]).float().mean()
        assert agreement > 0.98  # only bilinear edge pixels may disagree
        changed += not torch.equal(out["mask"], original["mask"])

    assert changed > 10


def test_labels_stay_in_0_1_2_and_shapes_and_dtypes_are_kept():
    augment = train_transforms(seed=1)

    for _ in range(20):
        out = augment(three_label_sample())
        assert out["image"].shape == (1, 64, 64) and out["image"].dtype == torch.float32
        assert out["mask"].shape == (64, 64) and out["mask"].dtype == torch.long
        assert set(out["mask"].unique().tolist()) <= {0, 1, 2}
        assert 0 <= out["image"].min() and out["image"].max() <= 1


def test_same_seed_reproduces_the_same_sequence_and_another_seed_differs():
    first, again, other = train_transforms(7), train_transforms(7), train_transforms(8)

    runs = [[augment(blob_sample()) for _ in range(5)] for augment in (first, again, other)]

    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not all(torch.equal(a["image"], c["image"]) for a, c in zip(runs[0], runs[2]))


def test_reseeding_restarts_the_sequence():
    augment = train_transforms(3)
    first = augment(blob_sample())["image"]
    augment(blob_sample())

    augment.set_random_state(3)

    assert torch.equal(augment(blob_sample())["image"], first)


def test_sample_without_mask_is_augmented_for_classification():
    out = train_transforms(0)({"image": blob_sample()["image"]})

    assert set(out) == {"image"} and out["image"].shape == (1, 64, 64)


def test_outputs_are_plain_tensors_and_global_meta_tracking_is_restored():
    out = train_transforms(0)(blob_sample())

    assert type(out["image"]) is torch.Tensor and type(out["mask"]) is torch.Tensor
    assert get_track_meta() is True


def test_input_sample_is_not_modified_in_place():
    sample = three_label_sample()
    image, mask = sample["image"].clone(), sample["mask"].clone()
    augment = train_transforms(2)

    for _ in range(20):
        augment(sample)

    assert torch.equal(sample["image"], image) and torch.equal(sample["mask"], mask)


def wire_sample(size: int = 96) -> dict[str, torch.Tensor]:
    """A 1 px guidewire (label 2) along a gentle curve, dark on a flat background."""
    mask = torch.zeros(size, size, dtype=torch.long)
    cols = torch.arange(10, size - 10)
    rows = (size / 2 + 12 * torch.sin(cols / 15.0)).round().long()
    mask[rows, cols] = 2
    return {"image": 1.0 - 0.5 * (mask[None] == 2).float(), "mask": mask}


def test_a_warped_one_pixel_wire_stays_one_connected_line():
    augment = train_transforms(seed=4)
    assert ndimage.label(wire_sample()["mask"].numpy() == 2, structure=np.ones((3, 3)))[1] == 1
    pieces = []
    for _ in range(30):
        wire = augment(wire_sample())["mask"].numpy() == 2
        pieces.append(ndimage.label(wire, structure=np.ones((3, 3)))[1])
        assert wire.sum() > 0

    # Nearest-neighbour resampling of the same draws broke the rotated wire into several pieces.
    assert max(pieces) == 1


def test_labels_from_shares_keeps_the_largest_foreground_class_where_foreground_reaches_the_threshold():
    # Columns: no foreground; 0.2 of foreground (below 0.3); catheter 0.25 + guidewire 0.15; guidewire ahead.
    shares = torch.tensor([[[1.0, 0.8, 0.6, 0.2]], [[0.0, 0.1, 0.25, 0.3]], [[0.0, 0.1, 0.15, 0.5]]])

    assert labels_from_shares(shares).tolist() == [[0, 0, 1, 2]]


def test_kept_orientation_never_mirrors_or_turns_a_frame():
    # a bright block in the top-left quarter: a flip or quarter turn would carry it to another quarter, while the
    # small affine (20 degrees, 15% scale) leaves its centre of mass in the quarter it started in
    image = torch.full((1, 64, 64), 0.1)
    image[0, 4:24, 4:24] = 0.9
    kept, free = train_transforms(3, keep_orientation=True), train_transforms(3)
    moved = {"kept": 0, "free": 0}
    for _ in range(40):
        for name, augment in (("kept", kept), ("free", free)):
            out = augment({"image": image.clone()})["image"][0]
            rows, cols = ndimage.center_of_mass((out > 0.5).numpy())
            moved[name] += not (rows < 32 and cols < 32)
    assert moved["kept"] == 0 and moved["free"] > 10
