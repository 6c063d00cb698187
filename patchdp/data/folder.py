"""Segmentation data from a folder of images and label PNGs (A2D2, your own data).

Layout (``<split>`` is e.g. ``train`` or ``validation``; subfolders are allowed)::

    root/
      images/<split>/<path>/<name>.png|.jpg|.jpeg     RGB (other modes are converted)
      labels/<split>/<path>/<name>.png                 one label map per image

An image and its label pair up by ``<path>/<name>``; every image needs a label and vice
versa. Label PNGs hold class ids per pixel (mode ``L``, or ``P`` whose palette indices are
the ids, as in Pascal VOC), 255 = ignore — or RGB colours translated by ``palette``
(colours not in it become 255). For A2D2, whose ``class_list.json`` maps ``"#rrggbb"`` to
class names, ``patchdp data prepare a2d2`` links its archive into this layout
(:mod:`patchdp.data.prepare`); then pass::

    classes = json.load(open("class_list.json"))
    load_folder(root, "train", class_names=list(classes.values()),
                palette={colour: i for i, colour in enumerate(classes)}, image_size=(604, 960))

Without ``image_size`` every image must have the size of the first one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from patchdp.data.dataset import IGNORE_LABEL, SourceDataset, image_size_pair

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """``<path>/<name>`` (no suffix) → file, for every file below ``folder`` with one of ``suffixes``."""
    return {str(p.relative_to(folder).with_suffix("")): p for p in sorted(folder.rglob("*"))
            if p.suffix.lower() in suffixes}


def _colour_code(rgb) -> int:
    """(r, g, b) or "#rrggbb" → r·2¹⁶ + g·2⁸ + b."""
    if isinstance(rgb, str):
        return int(rgb.lstrip("#"), 16)
    r, g, b = rgb
    return (int(r) << 16) | (int(g) << 8) | int(b)


class _PairDecoder:
    """(image file, label file) → (uint8 RGB image, uint8 label map)."""

    def __init__(self, palette: Mapping | None):
        self.codes = self.ids = None
        if palette is not None:
            codes = np.array([_colour_code(c) for c in palette], np.int64)
            order = np.argsort(codes)
            self.codes, self.ids = codes[order], np.array(list(palette.values()), np.int64)[order]

    def __call__(self, pair: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = pair
        with Image.open(image_path) as image_file:
            image = np.asarray(image_file.convert("RGB"))
        with Image.open(label_path) as label_file:
            if self.codes is not None:
                label = self._classes(np.asarray(label_file.convert("RGB")))
            elif label_file.mode in ("L", "P"):
                label = np.asarray(label_file)
            else:
                raise ValueError(f"label {label_path} has mode {label_file.mode}; label PNGs must hold class ids "
                                 "(mode L or P), or pass palette={colour: class id} for colour-coded labels.")
        if label.shape != image.shape[:2]:
            raise ValueError(f"label {label_path} is {label.shape[::-1]} (W×H) but its image is "
                             f"{image.shape[1::-1]}; they must match.")
        return image, label

    def _classes(self, rgb: np.ndarray) -> np.ndarray:
        code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        position = np.minimum(np.searchsorted(self.codes, code), len(self.codes) - 1)
        return np.where(self.codes[position] == code, self.ids[position], IGNORE_LABEL)


def load_folder(root, split: str, *, class_names: Sequence[str], image_size: tuple[int, int] | int | None = None,
                palette: Mapping | None = None, threads: int = 4) -> SourceDataset:
    """The segmentation split ``split`` of the folder dataset at ``root`` (layout above)."""
    root = Path(root)
    images_dir, labels_dir = root / "images" / split, root / "labels" / split
    if not images_dir.is_dir() or not labels_dir.is_dir():
        found = sorted(p.name for p in (root / "images").iterdir()) if (root / "images").is_dir() else []
        raise ValueError(f"{root} has no split {split!r}: expected folders {images_dir} and {labels_dir} "
                         f"(splits found: {found or 'none'}); for A2D2, `patchdp data prepare a2d2 --data-dir {root}` "
                         "says what to download and checks the layout.")
    images, labels = _files(images_dir, IMAGE_SUFFIXES), _files(labels_dir, (".png",))
    for missing, kind in ((sorted(set(images) - set(labels)), "label"), (sorted(set(labels) - set(images)), "image")):
        if missing:
            raise ValueError(f"{len(missing)} files in {root} have no {kind}, e.g. {missing[:3]}; every image "
                             f"needs a label PNG with the same relative path and name.")
    if not images:
        raise ValueError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    pairs = [(images[key], labels[key]) for key in sorted(images)]
    if image_size is None:
        with Image.open(pairs[0][0]) as first:
            size = first.size[::-1]
    else:
        size = image_size_pair(image_size)
    return SourceDataset(pairs, _PairDecoder(palette), task="segmentation", class_names=class_names,
                         image_shape=(*size, 3), resize=image_size is not None, threads=threads)
