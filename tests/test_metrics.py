import math

import numpy as np
import pytest
import torch

from fedefm.finetune.metrics import SegmentationScores, cldice, score_batch


def label_map(*boxes, size=16):
    """(1, H, W) label map with each (label, r0, r1, c0, c1) box filled."""
    labels = torch.zeros(1, size, size, dtype=torch.long)
    for label, r0, r1, c0, c1 in boxes:
        labels[0, r0:r1, c0:c1] = label
    return labels


def test_perfect_prediction_scores_dice_1_and_hd95_0():
    truth = label_map((1, 2, 6, 2, 12), (2, 10, 11, 1, 15))
    scores = score_batch(truth.clone(), truth)
    for name in ("dice", "iou", "cldice"):
        np.testing.assert_allclose(scores[name], [[1.0, 1.0]])
    np.testing.assert_allclose(scores["hd95"], [[0.0, 0.0]])


def test_empty_prediction_of_a_present_class_scores_dice_0_and_worst_hd95():
    truth = label_map((1, 2, 6, 2, 12))
    scores = score_batch(torch.zeros_like(truth), truth)
    assert scores["dice"][0, 0] == 0.0
    assert scores["cldice"][0, 0] == 0.0
    assert scores["hd95"][0, 0] == pytest.approx(math.hypot(16, 16))


def test_class_absent_from_prediction_and_truth_is_skipped():
    truth = label_map((1, 2, 6, 2, 12))
    scores = score_batch(truth.clone(), truth)
    assert all(math.isnan(scores[name][0, 1]) for name in ("dice", "iou", "cldice", "hd95"))
    result = SegmentationScores()
    result.update(truth.clone(), truth)
    assert result.aggregate()["per_class"]["guidewire"]["dice"] is None
    assert result.aggregate()["mean"]["dice"] == 1.0


def test_half_overlap_matches_hand_computed_dice_and_iou():
    # truth 4x4 = 16 px, prediction 4x4 shifted by 2 columns: overlap 8 → Dice 2*8/32, IoU 8/24
    truth = label_map((1, 0, 4, 0, 4))
    pred = label_map((1, 0, 4, 2, 6))
    scores = score_batch(pred, truth)
    assert scores["dice"][0, 0] == pytest.approx(0.5)
    assert scores["iou"][0, 0] == pytest.approx(1 / 3)


def test_cldice_rewards_the_centreline_not_the_width():
    line = np.zeros((20, 20), bool)
    line[10, 2:18] = True
    thick = np.zeros((20, 20), bool)
    thick[9:12, 2:18] = True
    parallel = np.zeros((20, 20), bool)
    parallel[15, 2:18] = True
    assert cldice(line, thick) > 0.95  # Dice of the two masks is only 0.5
    assert cldice(line, parallel) == 0.0


def test_aggregate_keys_follow_the_evaluate_contract():
    scores = SegmentationScores()
    scores.update(label_map((1, 2, 6, 2, 12)), label_map((1, 2, 6, 2, 10), (2, 12, 13, 0, 16)))
    result = scores.aggregate()
    assert set(result) == {"n_images", "per_class", "mean"}
    assert set(result["per_class"]) == {"catheter", "guidewire"}
    assert set(result["mean"]) == set(result["per_class"]["catheter"]) == {"dice", "iou", "cldice", "hd95"}
    assert result["n_images"] == 1


@pytest.mark.parametrize("width", [1, 2])
def test_cldice_of_a_prediction_equal_to_a_thin_curved_wire_is_1(width):
    # shape: (64, 64) mask of a 1-2 px sine-shaped wire, the way a guidewire is labelled
    wire = np.zeros((64, 64), bool)
    cols = np.arange(4, 60)
    rows = np.round(32 + 12 * np.sin(cols / 9)).astype(int)
    for offset in range(width):
        wire[rows + offset, cols] = True
    assert cldice(wire, wire.copy()) == 1.0
    labels = torch.from_numpy(wire.astype(np.int64) * 2)[None]
    assert score_batch(labels.clone(), labels)["cldice"][0, 1] == 1.0
