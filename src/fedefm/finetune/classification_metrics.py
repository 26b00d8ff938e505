"""Classification metrics from predictions and truth: confusion matrix, accuracy, balanced accuracy, F1, AUROC.

The rules, shared by ``fedefm evaluate`` and model selection:

* a class's precision is undefined (None) when it is never predicted, its recall when it never occurs
  in the truth; its F1 is undefined only when both are, and 0 when it occurs or is predicted but never
  correctly;
* balanced accuracy is the mean recall and macro F1 the mean F1, each over the classes where it is defined;
* multi-label scores treat each label as a yes/no question decided at probability 0.5, and its AUROC
  comes from the rank formula (Mann-Whitney U) with tied scores sharing their mean rank; AUROC is
  undefined for a label that is always or never present.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (C, C): row = true class, column = predicted class; pred and truth (N,) class indices."""
    return np.bincount(np.asarray(truth) * n_classes + np.asarray(pred), minlength=n_classes**2).reshape(
        n_classes, n_classes)


def _ratio(numerator: int, denominator: int) -> float | None:
    return float(numerator / denominator) if denominator else None


def _f1(tp: int, n_pred: int, n_true: int) -> float | None:
    if n_pred == 0 and n_true == 0:
        return None
    return 2 * tp / (n_pred + n_true)


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def class_scores(confusion: np.ndarray, class_names: list[str]) -> dict:
    """Evaluate JSON of a multi-class confusion matrix (C, C) (row true, column predicted).

    Returns:
        {"n_images", "accuracy", "balanced_accuracy", "macro_f1", "per_class": {CLASS: {"precision", "recall",
        "f1"}}, "confusion": C lists of C counts, "classes": class_names}.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    tp, n_pred, n_true = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
    per_class = {
        name: {"precision": _ratio(tp[k], n_pred[k]), "recall": _ratio(tp[k], n_true[k]),
               "f1": _f1(tp[k], n_pred[k], n_true[k])}
        for k, name in enumerate(class_names)
    }
    return {
        "n_images": int(confusion.sum()),
        "accuracy": _ratio(int(tp.sum()), int(confusion.sum())),
        "balanced_accuracy": _mean_defined([s["recall"] for s in per_class.values()]),
        "macro_f1": _mean_defined([s["f1"] for s in per_class.values()]),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": list(class_names),
    }


def auroc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the ROC curve of scores (N,) for binary truth (N,) by the rank formula; None if one class is absent."""
    truth = np.asarray(truth).astype(bool)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multilabel_scores(probabilities: np.ndarray, truth: np.ndarray, label_names: list[str]) -> dict:
    """Evaluate JSON of multi-label predictions: probabilities (N, L) in [0, 1], truth (N, L) in {0, 1}.

    Returns:
        {"n_images", "accuracy" (share of right yes/no decisions), "balanced_accuracy" (mean over labels of
        (sensitivity + specificity) / 2), "macro_f1", "macro_auroc", "per_class": {LABEL: {"precision", "recall",
        "f1", "auroc"}}, "confusion": L matrices [[TN, FP], [FN, TP]], "classes": label_names}.
    """
    probabilities, truth = np.asarray(probabilities, dtype=float), np.asarray(truth).astype(np.int64)
    pred = (probabilities >= 0.5).astype(np.int64)
    per_class, confusions, balanced = {}, [], []
    for k, name in enumerate(label_names):
        matrix = confusion_matrix(pred[:, k], truth[:, k], 2)
        (tn, fp), (fn, tp) = matrix
        per_class[name] = {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                           "f1": _f1(tp, tp + fp, tp + fn), "auroc": auroc(probabilities[:, k], truth[:, k])}
        balanced.append(_mean_defined([_ratio(tp, tp + fn), _ratio(tn, tn + fp)]))
        confusions.append(matrix.tolist())
    return {
        "n_images": int(truth.shape[0]),
        "accuracy": _ratio(int((pred == truth).sum()), int(truth.size)),
        "balanced_accuracy": _mean_defined(balanced),
        "macro_f1": _mean_defined([s["f1"] for s in per_class.values()]),
        "macro_auroc": _mean_defined([s["auroc"] for s in per_class.values()]),
        "per_class": per_class,
        "confusion": confusions,
        "classes": list(label_names),
    }
