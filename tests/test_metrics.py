"""Metrics: confusion matrices and scores against matrices computed by hand, with
ignored pixels, absent classes and batches that add up."""

import math

import jax
import numpy as np
import pytest

from patchdp.metrics import accuracy, confusion_matrix, iou_per_class, mean_iou, per_class, scores

LABELS = np.array([[[0, 1, 255], [2, 2, 1]]])       # (1, 2, 3); one ignored pixel
PREDICTIONS = np.array([[[0, 2, 1], [2, 1, 1]]])
BY_HAND = np.array([[1, 0, 0],                        # true 0: predicted 0
                    [0, 1, 1],                        # true 1: predicted 2, then 1
                    [0, 1, 1]])                       # true 2: predicted 2, then 1


def test_confusion_matrix_by_hand_skips_the_ignore_label():
    m = jax.jit(confusion_matrix, static_argnums=2)(LABELS, PREDICTIONS, 3)
    assert m.dtype == np.int32
    np.testing.assert_array_equal(m, BY_HAND)


def test_scores_by_hand():
    # IoU_0 = 1 / (1 + 1 − 1); IoU_1 = 1 / (2 + 2 − 1); IoU_2 = 1 / (2 + 2 − 1)
    np.testing.assert_allclose(iou_per_class(BY_HAND), [1, 1 / 3, 1 / 3])
    assert mean_iou(BY_HAND) == pytest.approx(5 / 9)
    assert accuracy(BY_HAND) == pytest.approx(3 / 5)
    assert scores(BY_HAND, "segmentation") == {"miou": pytest.approx(5 / 9), "pixel_accuracy": pytest.approx(0.6)}


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_the_mean():
    m = confusion_matrix(LABELS, PREDICTIONS, 4)
    assert math.isnan(iou_per_class(m)[3])
    assert mean_iou(m) == pytest.approx(5 / 9)
    # predicted but never true: IoU 0, and it counts
    m = confusion_matrix(np.array([0, 0]), np.array([0, 3]), 4)
    np.testing.assert_allclose(iou_per_class(m), [0.5, np.nan, np.nan, 0.0])
    assert mean_iou(m) == pytest.approx(0.25)


def test_batch_matrices_add_up_to_the_matrix_of_the_set():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (6, 8, 8))
    labels[rng.random(labels.shape) < 0.2] = 255
    predictions = rng.integers(0, 5, (6, 8, 8))
    parts = sum(np.asarray(confusion_matrix(labels[i:i + 2], predictions[i:i + 2], 5), np.int64) for i in (0, 2, 4))
    whole = confusion_matrix(labels, predictions, 5)
    np.testing.assert_array_equal(parts, whole)
    scored = labels != 255
    assert whole.sum() == scored.sum()
    assert accuracy(whole) == pytest.approx(np.mean(labels[scored] == predictions[scored]))


def test_classification_accuracy():
    m = confusion_matrix(np.array([0, 1, 1, 255]), np.array([0, 0, 1, 2]), 3)
    np.testing.assert_array_equal(m, [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    assert scores(m, "classification") == {"accuracy": pytest.approx(2 / 3)}


def test_empty_and_bad_inputs():
    assert math.isnan(mean_iou(np.zeros((3, 3)))) and math.isnan(accuracy(np.zeros((3, 3))))
    with pytest.raises(ValueError, match="task"):
        scores(BY_HAND, "detection")


def test_per_class_counts_and_iou_by_brute_force():
    """Per class k, from the raw labels: IoU = |y=k ∧ p=k| / |y=k ∨ p=k| over scored pixels."""
    rng = np.random.default_rng(4)
    labels = rng.choice([0, 1, 2, 255], size=(3, 9, 9), p=[0.5, 0.3, 0.1, 0.1])
    predictions = rng.choice([0, 1], size=(3, 9, 9))  # class 2 never predicted; class 3 absent
    table = per_class(confusion_matrix(labels, predictions, 4), ["a", "b", "c", "d"])
    scored = labels != 255
    for k, name in enumerate("abcd"):
        y, p = (labels == k) & scored, (predictions == k) & scored
        assert table[name]["labelled"] == y.sum() and table[name]["predicted"] == p.sum()
        union = (y | p).sum()
        if union:
            assert table[name]["iou"] == pytest.approx((y & p).sum() / union)
    assert table["c"]["iou"] == 0 and table["c"]["predicted"] == 0 and table["c"]["labelled"] > 0
    assert math.isnan(table["d"]["iou"]) and table["d"]["labelled"] == table["d"]["predicted"] == 0
    with pytest.raises(ValueError, match="3 class names"):
        per_class(np.zeros((4, 4)), ["a", "b", "c"])
