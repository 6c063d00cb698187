"""The embedded default dataset: synthetic street-like scenes with small sensitive objects,
rendered on the fly (nothing to download).

Each scene (default 64×64 RGB) holds, painted in this order over a smooth, noisy
green-grey background (class 0):

- class 3 ``stripes`` — a diagonal band with yellow/dark stripes (p = 0.7);
- class 2 ``box`` — an axis-aligned rectangle with a blue checkerboard (p = 0.7);
- class 1 ``disc`` — a red, radially shaded disc (p = 0.7);
- class 4 ``sensitive`` — one to ``max_sensitive`` small objects on top, each either
  face-like (a skin-toned disc with dark eyes and mouth) or plate-like (a white plate
  with dark characters). Every one fits in a :data:`SENSITIVE_SIZE` × :data:`SENSITIVE_SIZE`
  square, so ``Patch`` of that size protects any single one of them.

Large shapes scale with the image size; sensitive objects do not (they stay small, which
is the premise of patch-level privacy). Pixel noise (std 6) is added last.

Guarantee: example i of a split is a pure function of (seed, split, i, image_size,
max_sensitive), drawn from its own ``numpy`` generator — independent of batching, order
and ``num_examples``. Rendering is vectorised over pixels (1–2 ms per 64×64 scene on one
CPU core) and memoised: each scene is rendered on its first request only, so after the
first epoch batches are plain array lookups; the memo costs 4 bytes per pixel per scene
(64 MiB for 4096 scenes of 64×64), committed as scenes are rendered.
"""

from __future__ import annotations

import numpy as np

from patchdp.data.dataset import Dataset

CLASS_NAMES = ("background", "disc", "box", "stripes", "sensitive")
SENSITIVE_CLASS = 4
SENSITIVE_SIZE = 7
SPLITS = {"train": 0, "validation": 1}
DEFAULT_SIZES = {"train": 4096, "validation": 512}
MIN_IMAGE_SIZE = 16


def render_scene(rng: np.random.Generator, size: int, max_sensitive: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One scene drawn with ``rng``: uint8 image (size, size, 3) and uint8 labels (size, size)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    label = np.zeros((size, size), np.uint8)

    def colour(rgb):  # a colour near rgb, one per object
        return np.float32(rgb) + rng.uniform(-25, 25, 3).astype(np.float32)

    def paint(mask, colours, cls):
        nonlocal image
        image = np.where(mask[..., None], colours, image)
        label[mask] = cls

    angle = rng.uniform(0, 2 * np.pi)
    image = colour((85, 105, 80)) + (40 / size) * (xx * np.cos(angle) + yy * np.sin(angle))[..., None]

    if rng.random() < 0.7:  # striped band
        cx, cy, phi = rng.uniform((0, 0, 0), (size, size, np.pi))
        band = np.abs((xx - cx) * np.sin(phi) - (yy - cy) * np.cos(phi)) < rng.uniform(0.1, 0.2) * size
        stripes = (((xx + yy) // 3) % 2 == 0)[..., None]
        paint(band, np.where(stripes, colour((220, 190, 40)), colour((60, 50, 25))), 3)

    if rng.random() < 0.7:  # checkered box
        h, w = rng.uniform(0.2, 0.4, 2) * size
        y0, x0 = rng.uniform(0, (size - h, size - w))
        box = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        checker = (((xx // 4) + (yy // 4)) % 2 == 0)[..., None]
        paint(box, np.where(checker, colour((40, 80, 200)), colour((130, 170, 235))), 2)

    if rng.random() < 0.7:  # shaded disc
        r = rng.uniform(0.1, 0.2) * size
        cy, cx = rng.uniform(r, size - r, 2)
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2
        paint(d2 < 1, colour((200, 50, 50)) * (1 - 0.4 * d2)[..., None], 1)

    half = SENSITIVE_SIZE // 2
    for _ in range(rng.integers(1, max_sensitive + 1)):  # sensitive objects, centre ± half inside
        cy, cx = rng.integers(half, size - half, 2)
        dy, dx = yy - cy, xx - cx
        if rng.random() < 0.5:  # face: skin disc, two eyes, a mouth
            paint(dy**2 + dx**2 <= half**2, colour((225, 180, 140)), SENSITIVE_CLASS)
            paint(((dy == -1) & (np.abs(dx) == 1)) | ((dy == 1) & (np.abs(dx) <= 1)), np.float32((40, 25, 25)),
                  SENSITIVE_CLASS)
        else:  # plate: white rectangle with dark characters
            paint((np.abs(dy) <= 2) & (np.abs(dx) <= half), colour((235, 235, 230)), SENSITIVE_CLASS)
            paint((np.abs(dy) <= 1) & (np.abs(dx) < half) & (dx % 2 == 0), np.float32((20, 20, 30)),
                  SENSITIVE_CLASS)

    image += 6 * rng.standard_normal(image.shape, np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


class SyntheticScenes(Dataset):
    """A split (``"train"`` or ``"validation"``) of synthetic scenes: segmentation with the
    five classes of :data:`CLASS_NAMES`; images uint8 (size, size, 3)."""

    def __init__(self, split: str = "train", *, num_examples: int | None = None, image_size: int = 64,
                 seed: int = 0, max_sensitive: int = 3):
        if split not in SPLITS:
            raise ValueError(f"synthetic split must be one of {tuple(SPLITS)}, got {split!r}.")
        num_examples = DEFAULT_SIZES[split] if num_examples is None else num_examples
        if num_examples < 1:
            raise ValueError(f"num_examples must be positive, got {num_examples}.")
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        if max_sensitive < 1:
            raise ValueError(f"max_sensitive must be at least 1, got {max_sensitive}.")
        super().__init__(task="segmentation", class_names=CLASS_NAMES, image_shape=(image_size, image_size, 3))
        self.split, self.num_examples, self.seed, self.max_sensitive = split, num_examples, seed, max_sensitive
        self._images = np.zeros((num_examples, *self.image_shape), np.uint8)  # memo, filled on first access
        self._labels = np.zeros((num_examples, image_size, image_size), np.uint8)
        self._rendered = np.zeros(num_examples, bool)

    def __len__(self) -> int:
        return self.num_examples

    def _load(self, indices):
        for i in np.unique(indices[~self._rendered[indices]]).tolist():
            rng = np.random.default_rng((self.seed, SPLITS[self.split], i))
            self._images[i], self._labels[i] = render_scene(rng, self.image_shape[0], self.max_sensitive)
            self._rendered[i] = True
        return {"image": self._images[indices], "label": self._labels[indices].astype(np.int32)}
