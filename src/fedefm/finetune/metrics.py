"""Segmentation metrics per foreground class: Dice, IoU and HD95 through MONAI, clDice from skeletons.

The rules, shared by ``fedefm evaluate`` and model selection:

* background (label 0) is excluded;
* a class absent from both prediction and truth in an image does not count for that image
  (its scores are NaN there and every mean skips NaNs);
* a class present in only one of the two scores Dice 0, IoU 0, clDice 0 and HD95 equal to the
  image diagonal (the worst distance the image allows), so a miss is never silently dropped.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from skimage.morphology import skeletonize

from fedefm.data.labels import LABEL_NAMES

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "cldice", "hd95")


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Label maps (B, H, W) of ints → one-hot (B, C, H, W) float."""
    return torch.nn.functional.one_hot(labels.long(), n_classes).permute(0, 3, 1, 2).float()


def cldice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Centreline Dice of two binary masks (H, W) (Shit et al., CVPR 2021); NaN if both are empty."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return math.nan
    if not pred.any() or not truth.any():
        return 0.0
    pred_skeleton, truth_skeleton = skeletonize(pred), skeletonize(truth)
    # Thin structures can skeletonise to nothing; fall back to the mask itself so the ratio is defined.
    pred_skeleton = pred_skeleton if pred_skeleton.any() else pred
    truth_skeleton = truth_skeleton if truth_skeleton.any() else truth
    precision = (pred_skeleton & truth).sum() / pred_skeleton.sum()
    sensitivity = (truth_skeleton & pred).sum() / truth_skeleton.sum()
    if precision + sensitivity == 0:
        return 0.0
    return float(2 * precision * sensitivity / (precision + sensitivity))


def score_batch(pred: torch.Tensor, truth: torch.Tensor, n_classes: int = 3) -> dict[str, np.ndarray]:
    """Per-image, per-foreground-class scores of label maps pred, truth (B, H, W).

    Returns:
        {"dice", "iou", "cldice", "hd95"}: each (B, C - 1), NaN where the class is absent from both.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")
    pred_1h, truth_1h = one_hot(pred, n_classes), one_hot(truth, n_classes)
    present_pred = pred_1h[:, 1:].flatten(2).any(-1)
    present_truth = truth_1h[:, 1:].flatten(2).any(-1)
    both_absent = (~present_pred & ~present_truth).numpy()
    one_absent = (present_pred ^ present_truth).numpy()

    dice = compute_dice(pred_1h, truth_1h, include_background=False, ignore_empty=False).numpy()
    iou = compute_iou(pred_1h, truth_1h, include_background=False, ignore_empty=False).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns for every empty class; the rules above handle them
        hd95 = compute_hausdorff_distance(pred_1h, truth_1h, include_background=False, percentile=95).numpy()
    diagonal = math.hypot(*pred.shape[-2:])
    hd95 = np.where(one_absent, diagonal, hd95)
    cl = np.array(
        [
            [cldice((p == c).numpy(), (t == c).numpy()) for c in range(1, n_classes)]
            for p, t in zip(pred, truth)
        ]
    )
    scores = {"dice": dice, "iou": iou, "cldice": cl, "hd95": hd95}
    return {name: np.where(both_absent, np.nan, value).astype(np.float64) for name, value in scores.items()}


class SegmentationScores:
    """Accumulates per-image scores over batches and reduces them once, as MONAI's metric classes do."""

    def __init__(self, class_names: tuple[str, ...] = LABEL_NAMES) -> None:
        self.class_names = class_names
        self._rows: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
        self.n_images = 0

    def update(self, pred: torch.Tensor, truth: torch.Tensor) -> None:
        """Add a batch of label maps pred, truth (B, H, W)."""
        for name, value in score_batch(pred, truth, len(self.class_names)).items():
            self._rows[name].append(value)
        self.n_images += pred.shape[0]

    def aggregate(self) -> dict:
        """The evaluate JSON: {"n_images", "per_class": {class: {metric: mean}}, "mean": {metric: mean}}.

        A class never present in any image gets null scores and is left out of the mean.
        """
        per_class: dict[str, dict[str, float | None]] = {}
        for c, name in enumerate(self.class_names[1:]):
            per_class[name] = {}
            for metric in METRIC_NAMES:
                values = np.concatenate(self._rows[metric])[:, c] if self.n_images else np.array([])
                values = values[~np.isnan(values)]
                per_class[name][metric] = float(values.mean()) if values.size else None
        mean = {}
        for metric in METRIC_NAMES:
            values = [scores[metric] for scores in per_class.values() if scores[metric] is not None]
            mean[metric] = float(np.mean(values)) if values else None
        return {"n_images": self.n_images, "per_class": per_class, "mean": mean}
