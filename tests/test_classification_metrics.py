import numpy as np
import pytest

from fedefm.finetune.classification_metrics import auroc, class_scores, confusion_matrix, multilabel_scores


def test_confusion_matrix_counts_rows_of_truth_and_columns_of_predictions():
    truth = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 2, 2])
    assert confusion_matrix(pred, truth, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_class_scores_match_a_hand_computed_three_class_matrix():
    # rows truth, columns prediction: 6 images of class a, 3 of b, 1 of c.
    confusion = [[4, 2, 0],
                 [1, 2, 0],
                 [0, 0, 1]]
    result = class_scores(confusion, ["a", "b", "c"])
    assert result["n_images"] == 10
    assert result["accuracy"] == pytest.approx(7 / 10)
    # recall a 4/6, b 2/3, c 1/1
    assert result["balanced_accuracy"] == pytest.approx((4 / 6 + 2 / 3 + 1) / 3)
    # precision a 4/5, b 2/4, c 1/1; F1 = 2TP / (predicted + true)
    assert result["per_class"]["a"] == pytest.approx({"precision": 0.8, "recall": 4 / 6, "f1": 8 / 11})
    assert result["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7})
    assert result["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0})
    assert result["macro_f1"] == pytest.approx((8 / 11 + 4 / 7 + 1) / 3)
    assert result["confusion"] == confusion and result["classes"] == ["a", "b", "c"]


def test_a_class_absent_from_truth_and_predictions_is_left_out_of_the_means():
    # class c never occurs and is never predicted; class b occurs once and is never predicted.
    result = class_scores([[3, 0, 0], [1, 0, 0], [0, 0, 0]], ["a", "b", "c"])
    assert result["per_class"]["c"] == {"precision": None, "recall": None, "f1": None}
    assert result["per_class"]["b"] == {"precision": None, "recall": 0.0, "f1": 0.0}
    assert result["balanced_accuracy"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["macro_f1"] == pytest.approx((6 / 7 + 0.0) / 2)


@pytest.mark.parametrize(
    "scores, truth, expected",
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # 3 of the 4 (positive, negative) pairs are ordered right
        ([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], 1.0),
        ([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1], 0.0),
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # ties count half
        ([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1], 0.875),  # one tied pair: (3 + 0.5) / 4
        ([0.2, 0.5], [1, 1], None),  # no negatives: undefined
    ],
)
def test_auroc_is_the_share_of_correctly_ordered_positive_negative_pairs(scores, truth, expected):
    assert auroc(np.array(scores), np.array(truth)) == (None if expected is None else pytest.approx(expected))


def test_multilabel_scores_decide_each_label_at_one_half():
    probabilities = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4], [0.3, 0.8]])
    truth = np.array([[1, 0], [0, 1], [0, 1], [1, 1]])
    result = multilabel_scores(probabilities, truth, ["ett_abnormal", "cvc_normal"])
    # label 0: predicted [1, 1, 0, 0] vs truth [1, 0, 0, 1] → TN 1, FP 1, FN 1, TP 1
    # label 1: predicted [0, 1, 0, 1] vs truth [0, 1, 1, 1] → TN 1, FP 0, FN 1, TP 2
    assert result["confusion"] == [[[1, 1], [1, 1]], [[1, 0], [1, 2]]]
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["balanced_accuracy"] == pytest.approx(((0.5 + 0.5) / 2 + (2 / 3 + 1.0) / 2) / 2)
    assert result["per_class"]["cvc_normal"]["precision"] == pytest.approx(1.0)
    assert result["per_class"]["cvc_normal"]["recall"] == pytest.approx(2 / 3)
    # label 0 AUROC: positives 0.9, 0.3 vs negatives 0.6, 0.1 → pairs ordered right: (0.9>0.6, 0.9>0.1, 0.3>0.1) = 3/4
    assert result["per_class"]["ett_abnormal"]["auroc"] == pytest.approx(0.75)
    # label 1: positives 0.7, 0.4, 0.8 vs negative 0.2 → 1.0
    assert result["per_class"]["cvc_normal"]["auroc"] == pytest.approx(1.0)
    assert result["macro_auroc"] == pytest.approx(0.875)
