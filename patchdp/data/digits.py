"""Real images without a download: scikit-learn's 8×8 handwritten digits.

``sklearn.datasets.load_digits`` ships 1797 digits (the test part of UCI's "Optical
Recognition of Handwritten Digits": 32×32 bitmaps by 43 writers, counted in 4×4 blocks,
so each pixel is 0–16) inside the scikit-learn wheel. Here they are a classification
dataset of 10 classes, uint8 images (8, 8, 1) scaled to 0–255 (value · 255 / 16,
rounded), split in scikit-learn's order: the first 1440 examples are ``train``, the
other 357 ``validation``. Small enough to train a few private steps of a tiny CNN in
seconds: the smoke test of the loader interface on real data.
"""

from __future__ import annotations

import numpy as np

from patchdp.data.dataset import Dataset

SPLITS = {"train": slice(0, 1440), "validation": slice(1440, None)}


class Digits(Dataset):
    """The ``split`` (``"train"`` or ``"validation"``) of scikit-learn's digits."""

    def __init__(self, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"digits split must be one of {tuple(SPLITS)}, got {split!r}.")
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ModuleNotFoundError("the digits dataset ships inside scikit-learn, which is not installed: "
                                      "pip install scikit-learn (or patchdp's dev extra).") from None
        digits = load_digits()
        super().__init__(task="classification", class_names=[str(d) for d in digits.target_names],
                         image_shape=(8, 8, 1))
        images = np.rint(digits.images[SPLITS[split]] * (255 / 16))
        self._images = images.astype(np.uint8)[..., None]
        self._labels = digits.target[SPLITS[split]].astype(np.int32)

    def __len__(self) -> int:
        return len(self._labels)

    def _load(self, indices):
        return {"image": self._images[indices], "label": self._labels[indices]}
