"""The random-access dataset interface every loader implements, and the generic loader
that decodes examples one at a time from any indexable source.

``dataset.get_batch(indices)`` returns a dict of host numpy arrays:

- ``"image"``: uint8 (B, H, W, C), every image of the dataset has ``dataset.image_shape``
  = (H, W, C) — models take ``image / 255`` as float32;
- ``"label"``: int32 (B, H, W) class per pixel for ``task == "segmentation"`` or (B,)
  class per image for ``task == "classification"``; values in [0, num_classes), and in
  segmentation :data:`IGNORE_LABEL` (255, as in Cityscapes) marks pixels that count in
  neither loss nor metrics.

Examples of one dataset share one size because the patch inclusion probability p* is
computed for one image size. Sources whose images differ in size (DTD, Oxford pets,
your folders) are resized to a configured ``image_size``: images bilinearly (PIL, which
low-pass filters when shrinking), label maps by nearest neighbour. The protected patch is
then measured in pixels of the resized image. A patch p original pixels wide influences
at most ⌈(p + 2r) · new / old⌉ + 1 resized pixels along that axis, r = max(1, old / new)
being the bilinear filter's radius in original pixels (checked empirically against PIL
for down- and upsampling), so protect a patch of that size.
"""

from __future__ import annotations

import abc
import concurrent.futures
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

IGNORE_LABEL = 255
TASKS = ("segmentation", "classification")


class Dataset(abc.ABC):
    """A split of a dataset with random access by index (see the module docstring)."""

    def __init__(self, *, task: str, class_names: Sequence[str], image_shape: tuple[int, int, int]):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
        if not class_names:
            raise ValueError("class_names must name at least one class.")
        if task == "segmentation" and len(class_names) > IGNORE_LABEL:
            raise ValueError(f"segmentation supports at most {IGNORE_LABEL} classes (label {IGNORE_LABEL} "
                             f"means ignore), got {len(class_names)}.")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {image_shape!r}.")
        self.task = task
        self.class_names = tuple(class_names)
        self.image_shape = tuple(int(s) for s in image_shape)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of examples N."""

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        """The examples at ``indices`` (a non-empty 1-D integer array), in that order.
        Repeated indices are allowed; padded batch slots should carry any valid index
        (e.g. 0) and be masked by the caller."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices must be a non-empty 1-D integer array, got shape {indices.shape} "
                             f"and dtype {indices.dtype}.")
        if indices.min() < 0 or indices.max() >= len(self):
            raise IndexError(f"indices must lie in [0, {len(self)}), got values from {indices.min()} to "
                             f"{indices.max()}.")
        return self._load(indices)

    @abc.abstractmethod
    def _load(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """``get_batch`` for validated indices."""

    def _check_label(self, label: np.ndarray, where: str) -> None:
        """Raise a ValueError when ``label`` holds a value that is no class of this dataset."""
        valid = (label >= 0) & (label < self.num_classes)
        if self.task == "segmentation":
            valid |= label == IGNORE_LABEL
        if not np.all(valid):
            bad = np.unique(np.asarray(label)[~valid])[:5]
            raise ValueError(f"{where} has label values {bad.tolist()} outside [0, {self.num_classes})"
                             + (f" and not {IGNORE_LABEL} (ignore)" if self.task == "segmentation" else "")
                             + "; check the class list or the label mapping.")


def image_size_pair(size) -> tuple[int, int]:
    """``size`` (an int for squares, or (H, W)) as a validated pair of positive ints."""
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ValueError(f"image_size must be a positive int or an (H, W) pair of them, got {size!r}.")
    return int(pair[0]), int(pair[1])


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, C) image to ``hw``."""
    if image.shape[:2] == tuple(hw):
        return image
    channels = [Image.fromarray(image[..., c]).resize(hw[::-1], Image.BILINEAR) for c in range(image.shape[-1])]
    return np.stack([np.asarray(c) for c in channels], axis=-1)


def resize_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label map with values in [0, 255] to ``hw``."""
    if label.shape == tuple(hw):
        return label
    return np.asarray(Image.fromarray(label.astype(np.uint8)).resize(hw[::-1], Image.NEAREST))


class SourceDataset(Dataset):
    """Examples decoded one at a time from an indexable ``source`` (a ``tfds`` data
    source, a list of file pairs, a list of arrays ...).

    ``decode(source[i])`` returns ``(image, label)``: image uint8 (H, W) or (H, W, C),
    label (H, W) for segmentation or a scalar for classification. With ``resize=True``
    images and label maps are resized to ``image_shape``'s (H, W); otherwise an example of
    another size is a ValueError. A batch is decoded by ``threads`` threads (PIL decoding
    and array-record reads release the GIL).
    """

    def __init__(self, source: Sequence[Any], decode: Callable[[Any], tuple[Any, Any]], *, task: str,
                 class_names: Sequence[str], image_shape: tuple[int, int, int], resize: bool = False,
                 threads: int = 4):
        super().__init__(task=task, class_names=class_names, image_shape=image_shape)
        if len(source) == 0:
            raise ValueError("the source holds no examples.")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}.")
        self.source, self.decode, self.resize, self.threads = source, decode, resize, threads

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, indices):
        with concurrent.futures.ThreadPoolExecutor(min(self.threads, len(indices))) as pool:
            images, labels = zip(*pool.map(self._example, indices.tolist()))
        return {"image": np.stack(images), "label": np.stack(labels)}

    def _example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.decode(self.source[index])
        image, label = np.asarray(image, np.uint8), np.asarray(label)
        if image.ndim == 2:
            image = image[..., None]
        hw = self.image_shape[:2]
        if self.resize:
            image = resize_image(image, hw)
            label = resize_label(label, hw) if self.task == "segmentation" else label
        if image.shape != self.image_shape:
            raise ValueError(f"example {index} has an image of shape {image.shape}, but this dataset's images "
                             f"are {self.image_shape}; pass image_size=(H, W) to resize every image.")
        expected = hw if self.task == "segmentation" else ()
        if label.shape != expected:
            raise ValueError(f"example {index} has a label of shape {label.shape}, expected {expected}.")
        self._check_label(label, f"example {index}")
        return image, label.astype(np.int32)
