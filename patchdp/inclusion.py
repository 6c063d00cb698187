"""Which crops touch a sensitive patch: the inclusion probability p(t) and its worst case p*.

A training crop is a ``c_h × c_w`` window whose top-left offset (u, v) is drawn uniformly
from the padded image,

    U = {0, …, H + 2P − c_h} × {0, …, W + 2P − c_w}        (zero padding P on every side).

A patch R (a boolean mask, public and fixed in advance) placed at t = (a, b) — the
top-left corner of R's bounding box in the *unpadded* image — is hit when the window
contains at least one of its pixels. The inclusion probability is

    p(t) = |{(u, v) ∈ U : window hits R + t}| / |U|,      p* = max_t p(t),

and the accountant uses the effective sampling rate w = q · p* (docs/method.md, "Why random crops amplify privacy" and "Accounting").

The set of hitting offsets is R dilated by the crop box; p(t) for *all* t at once is one
summed-area table of that dilation queried with per-row and per-column clipping bounds:
O(H·W) with no Python loop over positions or pixels. Rectangles use the separable closed
form. Everything is exact integer counting; ``inclusion_probability(..., exact=True)``
returns p* as a ``Fraction`` and the float default is rounded *up*, so that the
accountant never sees a rate smaller than the true one.

One :class:`CropSpec` describes the crops for both this module and the on-device crop
sampler (``patchdp.crops``), so the two cannot disagree.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from patchdp import _validation

__all__ = [
    "CropSpec",
    "Patch",
    "inclusion_counts",
    "inclusion_map",
    "inclusion_probability",
]


def image_hw(image_shape) -> tuple[int, int]:
    """(H, W) from an image shape ``(H, W)`` or ``(H, W, C)``, validated."""
    if isinstance(image_shape, (int, np.integer)):
        return _validation.size("image size", image_shape)
    if isinstance(image_shape, str) or not isinstance(image_shape, Sequence) or len(image_shape) not in (2, 3):
        raise ValueError(f"image shape must be (H, W) or (H, W, C), got {image_shape!r}.")
    return _validation.size("image size", tuple(image_shape[:2]))


# --------------------------------------------------------------------------- crops


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """The public, data-independent crop distribution: the single source of truth.

    Each example is zero-padded by ``padding`` pixels on every side, then cropped
    ``crops_per_example`` (K) times independently. Each crop first draws its size
    (height, width) from ``sizes`` with ``probabilities`` (a single size for an ordinary
    random crop), then its top-left offset uniformly over the padded image. Crops whose
    size differs from ``output_size`` are resized to it afterwards (random-resized crop;
    resizing reads only pixels inside the box, so p(t) is unaffected).

    Attributes:
      sizes: crop sizes (height, width) in pixels.
      probabilities: probability of each size; positive, summing to 1.
      padding: zero padding P in pixels on each side (≥ 0).
      crops_per_example: K ≥ 1 independent crops per example, whose losses are averaged
        before clipping; the example is hit with probability 1 − (1 − p)^K.
      output_size: (height, width) the model sees; defaults to the single crop size.
    """

    sizes: tuple[tuple[int, int], ...]
    probabilities: tuple[float, ...] = (1.0,)
    padding: int = 0
    crops_per_example: int = 1
    output_size: tuple[int, int] | None = None

    def __init__(self, size, *, padding: int = 0, crops_per_example: int = 1,
                 probabilities: Sequence[float] | None = None,
                 output_size=None):
        """``CropSpec(100)``, ``CropSpec((100, 200), padding=4)``, or a size mixture
        ``CropSpec([(64, 64), (128, 128)], probabilities=[0.5, 0.5], output_size=64)``."""
        if isinstance(size, str):
            raise TypeError(f"crop size must be an int, a (height, width) pair or a list of pairs, got {size!r}.")
        if isinstance(size, Sequence) and size and isinstance(size[0], Sequence):
            sizes = tuple(_validation.size("crop size", s) for s in size)
        else:
            sizes = (_validation.size("crop size", size),)
        if probabilities is None:
            if len(sizes) != 1:
                raise ValueError("several crop sizes need `probabilities`, one per size.")
            probabilities = (1.0,)
        probabilities = tuple(float(p) for p in probabilities)
        if len(probabilities) != len(sizes):
            raise ValueError(f"got {len(sizes)} crop sizes but {len(probabilities)} probabilities.")
        if any(not (p > 0) or not math.isfinite(p) for p in probabilities):
            raise ValueError(f"crop-size probabilities must be positive, got {probabilities}.")
        if abs(math.fsum(probabilities) - 1) > 1e-9:
            raise ValueError(f"crop-size probabilities must sum to 1, got sum {math.fsum(probabilities)}.")
        total = math.fsum(probabilities)
        probabilities = tuple(p / total for p in probabilities)
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"crop sizes must be distinct, got {sizes}; merge their probabilities.")
        padding = _validation.integer("padding", padding, 0)
        if output_size is None:
            if len(sizes) != 1:
                raise ValueError("a crop-size mixture needs `output_size`, the size crops are resized to.")
            output_size = sizes[0]
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "probabilities", probabilities)
        object.__setattr__(self, "padding", int(padding))
        object.__setattr__(self, "crops_per_example", _validation.integer("crops_per_example", crops_per_example))
        object.__setattr__(self, "output_size", _validation.size("output size", output_size))

    def to_dict(self) -> dict:
        """Plain JSON that :meth:`from_dict` turns back into this crop distribution."""
        return {"sizes": [list(s) for s in self.sizes], "probabilities": list(self.probabilities),
                "padding": self.padding, "crops_per_example": self.crops_per_example,
                "output_size": list(self.output_size)}

    @classmethod
    def from_dict(cls, state: dict) -> "CropSpec":
        state = dict(state)
        return cls([tuple(s) for s in state.pop("sizes")], **state)

    def offset_ranges(self, image_shape) -> tuple[tuple[int, int], ...]:
        """Number of possible (row, column) offsets, |U| = rows · cols, for each crop size.

        Raises ValueError if a crop does not fit in the padded image.
        """
        height, width = image_hw(image_shape)
        ranges = []
        for ch, cw in self.sizes:
            rows = height + 2 * self.padding - ch + 1
            cols = width + 2 * self.padding - cw + 1
            if rows < 1 or cols < 1:
                raise ValueError(
                    f"crop {ch}x{cw} is larger than the padded image "
                    f"{height + 2 * self.padding}x{width + 2 * self.padding} "
                    f"({height}x{width} with padding {self.padding}); use a smaller crop or more padding.")
            ranges.append((rows, cols))
        return tuple(ranges)


# --------------------------------------------------------------------------- patches


@dataclasses.dataclass(frozen=True, eq=False)
class Patch:
    """The shape R of the protected region: a non-empty boolean mask, cropped to its
    bounding box. It may be placed anywhere inside the unpadded image."""

    mask: np.ndarray
    name: str = "mask"

    def __post_init__(self):
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise ValueError(f"a patch mask must be 2-D, got shape {mask.shape}.")
        if mask.dtype != bool:
            if not np.isin(mask, (0, 1)).all():
                raise ValueError("a patch mask must be boolean (or 0/1).")
            mask = mask.astype(bool)
        if not mask.any():
            raise ValueError("the patch mask is empty: mark at least one pixel as sensitive.")
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        mask = mask[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1].copy()
        mask.flags.writeable = False
        object.__setattr__(self, "mask", mask)

    def __eq__(self, other) -> bool:
        """Patches are equal when their masks are (the name is a label)."""
        return isinstance(other, Patch) and self.mask.shape == other.mask.shape and bool(
            (self.mask == other.mask).all())

    def __hash__(self) -> int:
        return hash((self.mask.shape, self.mask.tobytes()))

    def to_dict(self) -> dict:
        """Plain JSON: the name and the mask as rows of "0"/"1" (:meth:`from_dict`)."""
        return {"name": self.name, "mask": ["".join("1" if v else "0" for v in row) for row in self.mask]}

    @classmethod
    def from_dict(cls, state: dict) -> "Patch":
        rows = state["mask"]
        if not isinstance(rows, list) or not all(isinstance(r, str) and set(r) <= {"0", "1"} for r in rows):
            raise ValueError(f"a saved patch mask must be a list of '0'/'1' rows, got {rows!r}.")
        return cls(np.array([[c == "1" for c in row] for row in rows], bool), state["name"])

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the bounding box in pixels."""
        return self.mask.shape

    @property
    def area(self) -> int:
        """Number of sensitive pixels."""
        return int(self.mask.sum())

    @property
    def is_rectangle(self) -> bool:
        return bool(self.mask.all())

    @classmethod
    def from_mask(cls, mask, name: str = "mask") -> "Patch":
        return cls(np.asarray(mask), name)

    @classmethod
    def rectangle(cls, height, width: int | None = None) -> "Patch":
        """A ``height × width`` rectangle: ``rectangle(10)``, ``rectangle(3, 5)`` or
        ``rectangle((3, 5))``, as :class:`CropSpec` takes sizes."""
        h, w = _validation.size("patch size", height if width is None else (height, width))
        return cls(np.ones((h, w), bool), f"rect{h}x{w}")

    @classmethod
    def disc(cls, diameter: int) -> "Patch":
        """Pixels whose centres lie in the disc of the given diameter."""
        d = _validation.integer("disc diameter", diameter)
        return cls(_disc(d, d, d / 2, d / 2, d / 2), f"disc{d}")

    @classmethod
    def blob(cls, diameter: int) -> "Patch":
        """A crescent: a disc of ``diameter`` minus a disc of the same size whose centre
        is shifted right by ``diameter / 2`` (the paper's irregular-shape example)."""
        d = _validation.integer("blob diameter", diameter)
        if d < 2:
            raise ValueError("a blob needs diameter >= 2.")
        r = d / 2
        outer = _disc(d, d, r, r, r)
        bite = _disc(d, d, r, r + r, r)
        return cls(outer & ~bite, f"blob{d}")

    @classmethod
    def cluster(cls, diameter: int, gap: int | None = None) -> "Patch":
        """Two discs of ``diameter`` side by side on a diagonal, ``gap`` pixels apart
        (default: one diameter), e.g. two faces in a group."""
        d = _validation.integer("cluster diameter", diameter)
        gap = d if gap is None else gap
        if isinstance(gap, bool) or not isinstance(gap, (int, np.integer)) or gap < 0:
            raise ValueError(f"cluster gap must be a non-negative integer, got {gap!r}.")
        size = 2 * d + gap
        r = d / 2
        first = _disc(size, size, r, r, r)
        second = _disc(size, size, size - r, size - r, r)
        return cls(first | second, f"cluster{d}gap{gap}")


def _disc(height: int, width: int, cy: float, cx: float, radius: float) -> np.ndarray:
    rows = np.arange(height)[:, None] + 0.5
    cols = np.arange(width)[None, :] + 0.5
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= radius ** 2


# --------------------------------------------------------------------------- counting


def _check_types(crop, patch) -> None:
    """TypeError unless crop is a CropSpec (or None, where a size is given) and patch a Patch."""
    if crop is not None and not isinstance(crop, CropSpec):
        raise TypeError(f"crop must be a CropSpec, e.g. CropSpec(256, padding=4), got {crop!r}.")
    if not isinstance(patch, Patch):
        raise TypeError(f"patch must be a Patch, e.g. Patch.rectangle(10, 10) "
                        f"(patchdp.config.parse_patch reads 'rect:10x10'), got {patch!r}.")


def _check_fits(image: tuple[int, int], patch: Patch) -> None:
    if patch.shape[0] > image[0] or patch.shape[1] > image[1]:
        raise ValueError(f"patch {patch.shape[0]}x{patch.shape[1]} is larger than the image "
                         f"{image[0]}x{image[1]}; use a smaller patch.")


def _interval_counts(n_image: int, crop: int, padding: int, n_offsets: int, extent: int) -> np.ndarray:
    """Per patch start a ∈ [0, n_image − extent]: how many crop starts u ∈ [0, n_offsets)
    make [u, u + crop) overlap the patch rows [P + a, P + a + extent)."""
    starts = padding + np.arange(n_image - extent + 1, dtype=np.int64)
    lo = np.maximum(starts - crop + 1, 0)
    hi = np.minimum(starts + extent - 1, n_offsets - 1)
    return np.maximum(hi - lo + 1, 0)


def _clip_bounds(n_image: int, crop: int, padding: int, n_offsets: int, extent: int,
                 dilated: int) -> tuple[np.ndarray, np.ndarray]:
    """Row bounds [lo, hi) into the dilated mask of the offsets that lie inside U.

    Dilated index I corresponds to crop start u = P + a − (crop − 1) + I.
    """
    starts = padding + np.arange(n_image - extent + 1, dtype=np.int64)
    first = starts - (crop - 1)
    lo = np.clip(-first, 0, dilated)
    hi = np.clip(n_offsets - first, 0, dilated)
    return lo, hi


def _dilate(mask: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Minkowski sum of the mask with a crop_h × crop_w box, as a boolean array of shape
    (h + crop_h − 1, w + crop_w − 1): the crop starts (relative) that hit the mask."""

    def along(axis_mask: np.ndarray, size: int, axis: int) -> np.ndarray:
        pad = [(0, 0), (0, 0)]
        pad[axis] = (size, size - 1)
        csum = np.cumsum(np.pad(axis_mask.astype(np.int32), pad), axis=axis)
        n = axis_mask.shape[axis] + size - 1
        hi = np.take(csum, np.arange(size, size + n), axis=axis)
        lo = np.take(csum, np.arange(0, n), axis=axis)
        return hi - lo > 0

    return along(along(mask, crop_h, 0), crop_w, 1)


def inclusion_counts(image_shape, crop_size, padding: int, patch: Patch) -> np.ndarray:
    """Exact hit counts for one crop size: an int64 array of shape
    (H − p_h + 1, W − p_w + 1) whose entry [a, b] is the number of crop offsets in U
    whose window overlaps the patch placed with its bounding box at row a, column b.
    Divide by |U| = (H + 2P − c_h + 1)(W + 2P − c_w + 1) for p(t)."""
    _check_types(None, patch)
    spec = CropSpec(crop_size, padding=padding)
    image = image_hw(image_shape)
    _check_fits(image, patch)
    (offsets,), (crop,) = spec.offset_ranges(image), spec.sizes
    counter = _rectangle_counts if patch.is_rectangle else _mask_counts
    return counter(image, crop, spec.padding, offsets, patch.mask)


def _rectangle_counts(image, crop, padding, offsets, mask) -> np.ndarray:
    """Separable closed form for a full rectangle: count_rows(a) · count_cols(b)."""
    rows = _interval_counts(image[0], crop[0], padding, offsets[0], mask.shape[0])
    cols = _interval_counts(image[1], crop[1], padding, offsets[1], mask.shape[1])
    return np.outer(rows, cols)


def _mask_counts(image, crop, padding, offsets, mask) -> np.ndarray:
    """Any mask: sum the dilated mask over the offsets that fall inside U, for all
    placements at once, with one summed-area table and four gathers."""
    dilated = _dilate(mask, *crop)
    table = np.zeros((dilated.shape[0] + 1, dilated.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(dilated, 0, dtype=np.int64), 1, out=table[1:, 1:])
    row_lo, row_hi = _clip_bounds(image[0], crop[0], padding, offsets[0], mask.shape[0], dilated.shape[0])
    col_lo, col_hi = _clip_bounds(image[1], crop[1], padding, offsets[1], mask.shape[1], dilated.shape[1])
    strips = table[row_hi] - table[row_lo]  # (placement rows, dilated width + 1)
    return strips[:, col_hi] - strips[:, col_lo]


def inclusion_map(image_shape, crop: CropSpec, patch: Patch) -> np.ndarray:
    """p(t) for every valid placement t: float64 array of shape (H − p_h + 1, W − p_w + 1),
    entry [a, b] for the patch's bounding box at row a, column b of the unpadded image.

    Includes the crop-size mixture (Σ_k π_k p_k(t)) and K crops (1 − (1 − p(t))^K).
    """
    _check_types(crop, patch)
    image = image_hw(image_shape)
    ranges = crop.offset_ranges(image)
    _check_fits(image, patch)
    total = None
    for size, weight, (rows, cols) in zip(crop.sizes, crop.probabilities, ranges):
        term = inclusion_counts(image, size, crop.padding, patch) * (weight / (rows * cols))
        total = term if total is None else total + term
    if crop.crops_per_example > 1:
        total = -np.expm1(crop.crops_per_example * np.log1p(-np.minimum(total, 1.0)))
    return total


def _round_up(value: Fraction) -> float:
    """The smallest float ≥ value."""
    out = float(value)
    return math.nextafter(out, math.inf) if Fraction(out) < value else out


def inclusion_probability(image_shape, crop: CropSpec, patch: Patch, *, exact: bool = False):
    """Worst-case inclusion probability p* = max_t p(t) (docs/method.md, "Why random crops amplify privacy").

    Returns a float rounded up (never below the true p*), or the exact rational value
    as a ``Fraction`` with ``exact=True``. p* = 1 when every crop covers every placement
    (e.g. the crop covers the whole padded image): then there is no amplification.
    """
    _check_types(crop, patch)
    image = image_hw(image_shape)
    counts = [inclusion_counts(image, size, crop.padding, patch) for size in crop.sizes]
    sizes = [rows * cols for rows, cols in crop.offset_ranges(image)]
    if len(counts) == 1:
        best = Fraction(int(counts[0].max()), sizes[0])
    else:
        # The float mixture locates the argmax; exact arithmetic settles it among all
        # placements within rounding distance of the float maximum.
        mixture = sum(c * (w / n) for c, w, n in zip(counts, crop.probabilities, sizes))
        candidates = np.argwhere(mixture >= mixture.max() * (1 - 1e-9))
        weights = [Fraction(w) / n for w, n in zip(crop.probabilities, sizes)]
        weights = [w / sum(Fraction(p) for p in crop.probabilities) for w in weights]
        best = max(sum(int(c[a, b]) * w for c, w in zip(counts, weights)) for a, b in candidates)
    k = crop.crops_per_example
    if k > 1:
        best = 1 - (1 - best) ** k
    return best if exact else _round_up(best)
