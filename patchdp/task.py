"""The learning task a run trains and scores: its data, its loss, its evaluation.

    load_dataset(config, split)        the config's dataset split (patchdp.data)
    normalize(images, kind)            uint8 images → float32 model inputs
    make_loss(model, task, kind)       loss of ONE example: per-pixel or per-image cross-entropy
    make_evaluator(model, K, kind)     jitted (params, images, labels) → (confusion, predictions)
    evaluate(evaluator, params, data)  the confusion matrix of a split, in padded batches

**Evaluation** runs the model on whole images of the held-out split, at full resolution
(the segmentation models are fully convolutional and the classifiers pool globally), in
batches of ``eval_batch_size``; a partial last batch is padded with ignored labels.
Neither the loss nor the scores are privatised (see :mod:`patchdp.trainer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from patchdp import metrics
from patchdp.config import Config
from patchdp.data import IGNORE_LABEL, Dataset, Prefetcher, get_dataset
from patchdp.distributed import Processes
from patchdp.files import read_json
from patchdp.models import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["load_dataset", "normalize", "make_loss", "make_evaluator", "evaluate"]


def load_dataset(config: Config, split: str) -> Dataset:
    """The ``split`` of the config's dataset. For ``folder`` datasets, a ``class_list``
    option (A2D2's ``class_list.json``: "#rrggbb" → name) gives the class names and palette."""
    options = dict(config.dataset_options)
    if config.dataset == "folder" and "class_list" in options:
        path = Path(options.pop("class_list")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"the class list {path} (dataset_options.class_list) does not exist; for A2D2, "
                                    f"`patchdp data prepare a2d2 --data-dir {options.get('root')}` says what to "
                                    "download and checks the folder layout.")
        classes = read_json(path)
        options.update(class_names=list(classes.values()), palette={c: i for i, c in enumerate(classes)})
    return get_dataset(config.dataset, split, **options)


def normalize(images: jax.Array, kind: str) -> jax.Array:
    """uint8 images → float32 model inputs: image / 255, or ImageNet-standardised."""
    x = images.astype(jnp.float32) / 255.0
    if kind == "imagenet":
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x


def make_loss(model, task: str, normalization: str = "unit") -> Callable:
    """``loss_fn(params, image, label) -> scalar`` for ONE uint8 example (h, w, C):
    segmentation — mean cross-entropy over the pixels whose label is not 255 (0 if none);
    classification — cross-entropy of the image label."""

    def loss_fn(params, image, label):
        logits = model.apply({"params": params}, normalize(image[None], normalization))[0]
        if task == "classification":
            return optax.softmax_cross_entropy_with_integer_labels(logits, label)
        valid = label != IGNORE_LABEL
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, label, 0))
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    return loss_fn


def make_evaluator(model, num_classes: int, normalization: str) -> Callable:
    """Jitted ``(params, images, labels) -> (confusion (K, K) int32, predictions)``."""

    def evaluate(params, images, labels):
        logits = model.apply({"params": params}, normalize(images, normalization))
        predictions = jnp.argmax(logits, axis=-1)
        return metrics.confusion_matrix(labels, predictions, num_classes), predictions

    return jax.jit(evaluate)


def evaluate(evaluator: Callable, params, dataset: Dataset, *, batch_size: int, count: int | None,
             processes: Processes = Processes()) -> np.ndarray:
    """The confusion matrix (K × K, int64; :mod:`patchdp.metrics`) of the first ``count``
    (default all) examples of ``dataset``, the same in every process of a run of several:
    each evaluates every ``processes.count``-th batch on its own devices (``params`` must
    be readable there: on the host, or replicated), and the counts are summed exactly."""
    count = len(dataset) if count is None else min(count, len(dataset))
    starts = range(0, count, batch_size)[processes.index::processes.count]

    def load(start):
        indices = np.arange(start, start + batch_size)
        batch = dataset.get_batch(np.minimum(indices, count - 1))
        labels = np.where((indices < count).reshape((-1,) + (1,) * (batch["label"].ndim - 1)),
                          batch["label"], IGNORE_LABEL)  # padding slots: ignored
        return batch["image"], labels

    total = np.zeros((dataset.num_classes,) * 2, np.int64)
    with Prefetcher(load, starts) as batches:
        for images, labels in batches:
            total += np.asarray(evaluator(params, images, labels)[0], np.int64)
    return processes.gather_sum(total)
