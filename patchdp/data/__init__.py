"""Datasets with random access by index, and host-side prefetching.

Every dataset is a :class:`Dataset`: ``len(dataset)``, ``dataset.task``
(``"segmentation"`` or ``"classification"``), ``dataset.class_names``,
``dataset.num_classes``, ``dataset.image_shape`` (H, W, C, shared by all its images) and
``dataset.get_batch(indices) -> {"image": uint8 (B, H, W, C), "label": int32 (B, H, W) or (B,)}``
with label 255 = ignore in segmentation. :class:`Prefetcher` loads the next batches on a
background thread.

Sources: ``synthetic`` (embedded, generated on the fly: :mod:`patchdp.data.synthetic`),
``digits`` (scikit-learn's 8×8 digits, real and shipped in its wheel: :mod:`patchdp.data.digits`),
``cityscapes``, ``oxford_iiit_pet``, ``mnist``, ``dtd`` (``tfds.data_source``:
:mod:`patchdp.data.tfds`), ``folder`` (images + label PNGs: :mod:`patchdp.data.folder`).
"""

from __future__ import annotations

import inspect

from patchdp.data.dataset import IGNORE_LABEL, Dataset, SourceDataset
from patchdp.data.digits import Digits
from patchdp.data.folder import load_folder
from patchdp.data.prefetch import Prefetcher
from patchdp.data.synthetic import SENSITIVE_CLASS, SENSITIVE_SIZE, SyntheticScenes
from patchdp.data.tfds import DATASETS as TFDS_DATASETS
from patchdp.data.tfds import load_tfds

__all__ = [
    "DATASET_NAMES", "get_dataset", "dataset_options", "Dataset", "SourceDataset", "SyntheticScenes", "Digits", "load_tfds", "load_folder",
    "Prefetcher", "IGNORE_LABEL", "SENSITIVE_CLASS", "SENSITIVE_SIZE",
]

DATASET_NAMES = ("synthetic", "digits", *TFDS_DATASETS, "folder")


def _loader(name: str):
    if name == "synthetic":
        return SyntheticScenes
    if name == "digits":
        return Digits
    if name == "folder":
        return load_folder
    if name in TFDS_DATASETS:
        return load_tfds
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASET_NAMES}.")


def dataset_options(name: str) -> dict:
    """The keyword arguments :func:`get_dataset` takes for dataset ``name``, with their
    defaults (``inspect.Parameter.empty`` where required, e.g. folder's ``root``)."""
    parameters = inspect.signature(_loader(name)).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in ("name", "split")}


def get_dataset(name: str, split: str, **kwargs) -> Dataset:
    """The ``split`` of dataset ``name`` (one of :data:`DATASET_NAMES`); ``kwargs`` go to
    :class:`SyntheticScenes`, :class:`Digits`, :func:`load_tfds` or :func:`load_folder` (``root=...``)."""
    loader = _loader(name)
    return loader(name, split, **kwargs) if loader is load_tfds else loader(split=split, **kwargs)
