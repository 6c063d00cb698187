"""Evaluation scores from a confusion matrix: mIoU and pixel accuracy for segmentation,
accuracy for classification.

A confusion matrix M (K × K for K classes) counts, over a whole evaluation set,

    M[i, j] = number of pixels (segmentation) or images (classification)
              whose true class is i and whose predicted class is j.

Labels equal to the ignore label (255, as in Cityscapes) count nowhere. Matrices of
batches add up to the matrix of the set, so :func:`confusion_matrix` runs jitted on
device per batch and the scores are computed once, on the host, from the sum:

    IoU_k          = M[k, k] / (Σ_j M[k, j] + Σ_i M[i, k] − M[k, k])
    mIoU           = mean of IoU_k over the classes that occur (in labels or predictions)
    pixel accuracy = trace(M) / ΣM     (= accuracy, for classification)

A class that occurs neither in the labels nor in the predictions has no IoU (NaN) and
is left out of the mean, as in the Cityscapes evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from patchdp.data.dataset import IGNORE_LABEL

__all__ = ["confusion_matrix", "iou_per_class", "mean_iou", "accuracy", "scores", "per_class"]


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int, *,
                     ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """The K × K confusion matrix (int32) of one batch; jittable (``num_classes`` static).

    Args:
      labels: true classes, any shape: (B, H, W) label maps or (B,) image labels. Every
        value must be a class in [0, K) or ``ignore_label``; ignored entries count nowhere.
      predictions: predicted classes in [0, K), the shape of ``labels``.
      num_classes: K.
      ignore_label: the label value that is not scored.

    int32 holds up to 2^31 − 1 counts per cell: sum batch matrices on the host in int64.
    """
    labels, predictions = jnp.ravel(labels), jnp.ravel(predictions)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    cell = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[cell].add(valid.astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion) -> np.ndarray:
    """IoU of every class (float64, (K,)); NaN for a class absent from labels and predictions."""
    m = np.asarray(confusion, np.float64)
    hits = np.diag(m)
    union = m.sum(axis=0) + m.sum(axis=1) - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, hits / union, np.nan)


def mean_iou(confusion) -> float:
    """Mean IoU over the classes that occur; NaN for an empty matrix."""
    iou = iou_per_class(confusion)
    return float(np.mean(iou[~np.isnan(iou)])) if np.any(~np.isnan(iou)) else float("nan")


def accuracy(confusion) -> float:
    """Fraction of scored entries classified correctly: pixel accuracy for segmentation,
    top-1 accuracy for classification; NaN for an empty matrix."""
    m = np.asarray(confusion, np.float64)
    total = m.sum()
    return float(np.trace(m) / total) if total > 0 else float("nan")


def scores(confusion, task: str) -> dict[str, float]:
    """The scores reported for ``task``: {"miou", "pixel_accuracy"} for segmentation,
    {"accuracy"} for classification."""
    if task == "segmentation":
        return {"miou": mean_iou(confusion), "pixel_accuracy": accuracy(confusion)}
    if task == "classification":
        return {"accuracy": accuracy(confusion)}
    raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}.")


def per_class(confusion, class_names) -> dict[str, dict]:
    """Class name → {"iou": IoU_k (NaN when class k occurs neither in the labels nor in
    the predictions), "labelled": Σ_j M[k, j] (entries whose true class is k),
    "predicted": Σ_i M[i, k] (entries predicted as k)}, in class order; the counts show
    whether an IoU of 0 comes from a class never predicted or always confused."""
    m = np.asarray(confusion, np.int64)
    if m.shape != (len(class_names),) * 2:
        raise ValueError(f"confusion matrix of shape {m.shape} does not match {len(class_names)} class names.")
    iou = iou_per_class(m)
    return {name: {"iou": float(iou[k]), "labelled": int(m[k].sum()), "predicted": int(m[:, k].sum())}
            for k, name in enumerate(class_names)}
