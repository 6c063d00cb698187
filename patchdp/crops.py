"""Random crops on device, drawn exactly as the accountant assumes.

Each example is zero-padded by P pixels on every side and cropped K times. Every crop
draws its size (c_h, c_w) from the :class:`~patchdp.inclusion.CropSpec`'s public size
distribution and its top-left offset uniformly from

    U = {0, …, H + 2P − c_h} × {0, …, W + 2P − c_w}            (padded coordinates),

the distribution behind ``patchdp.inclusion.inclusion_map``: one ``CropSpec`` drives
both, so the sampler and the accountant cannot disagree (docs/method.md, "Why random crops amplify privacy"). A crop whose
size differs from ``spec.output_size`` is then resized to it (bilinear for images,
nearest for label maps); the resize reads only pixels inside the crop box, so a patch
outside the box cannot influence the crop. An optional horizontal flip comes last and
does not change the inclusion probability.

Everything is a pure function of an explicit key, with static output shapes, so it
jits and vmaps: :func:`crop` handles one example (:func:`sample_boxes`, then
:func:`crop_boxes`, then flips), :func:`crop_batch` a batch with one key per example
split from the batch key.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from patchdp.inclusion import CropSpec

__all__ = ["Boxes", "sample_boxes", "crop_boxes", "crop", "crop_batch"]


class Boxes(NamedTuple):
    """K crop boxes in padded coordinates: int32 arrays of shape (K,), in pixels.

    Box k covers rows [top, top + height) and columns [left, left + width) of the image
    after zero padding by ``spec.padding``.
    """

    top: jax.Array
    left: jax.Array
    height: jax.Array
    width: jax.Array


def sample_boxes(spec: CropSpec, key: jax.Array, image_shape) -> Boxes:
    """Draws ``spec.crops_per_example`` independent crop boxes for an image of
    ``image_shape`` ((H, W) or (H, W, C)): size k with probability ``spec.probabilities[k]``,
    then the offset uniformly over U for that size. The size probabilities enter as
    float32 (relative rounding ≤ 6e-8), the only departure from the accountant's
    float64 mixture.

    Raises ValueError (from the spec) if a crop does not fit in the padded image.
    """
    ranges = spec.offset_ranges(image_shape)
    count = spec.crops_per_example
    size_key, row_key, col_key = jax.random.split(key, 3)
    if len(spec.sizes) == 1:
        index = jnp.zeros(count, jnp.int32)
    else:
        index = jax.random.choice(size_key, len(spec.sizes), (count,), p=jnp.asarray(spec.probabilities))
    table = jnp.asarray([size + offsets for size, offsets in zip(spec.sizes, ranges)], jnp.int32)
    height, width, rows, cols = table[index].T
    top = jax.random.randint(row_key, (count,), 0, rows, jnp.int32)
    left = jax.random.randint(col_key, (count,), 0, cols, jnp.int32)
    return Boxes(top, left, height, width)


def crop_boxes(spec: CropSpec, boxes: Boxes, image: jax.Array, label: jax.Array | None = None, *,
               label_fill=0) -> tuple[jax.Array, jax.Array | None]:
    """Cuts the given boxes out of one zero-padded example and resizes them to
    ``spec.output_size``: the deterministic half of :func:`crop` (no flip).

    Args:
      spec: supplies the padding P and the output size.
      boxes: K boxes in padded coordinates, each inside the padded image and of a
        size in ``spec.sizes`` (as drawn by :func:`sample_boxes`).
      image: (H, W, C) array.
      label: optional. A label map whose leading axes are (H, W) (segmentation; any
        trailing axes, e.g. one-hot) is cut from the same boxes and resized with
        nearest-neighbour sampling. Any other label (a class id, a one-hot vector) is
        repeated K times.
      label_fill: value of label pixels in the padding (e.g. an ignore index).
        Image padding is always zero, as the accountant assumes.

    Returns:
      (images, labels): images (K, h, w, C) with (h, w) = ``spec.output_size`` and the
      image's dtype; labels (K, h, w, ...) for label maps, (K, ...) for other labels,
      or None. Output pixels depend only on input pixels inside their box.
    """
    if image.ndim != 3:
        raise ValueError(f"expected one (H, W, C) image, got shape {image.shape}; "
                         "use crop_batch for a batch.")
    count = boxes.top.shape[0]

    def cut(array, fill, method):
        pad = [(spec.padding, spec.padding)] * 2 + [(0, 0)] * (array.ndim - 2)
        padded = jnp.pad(array, pad, constant_values=fill)
        return jax.vmap(lambda box: _extract(padded, box, spec, method))(boxes)

    if label is None:
        labels = None
    elif _is_map(label, image):
        labels = cut(label, label_fill, "nearest")
    else:
        labels = jnp.broadcast_to(label, (count,) + label.shape)
    return cut(image, 0, "bilinear"), labels


def crop(spec: CropSpec, key: jax.Array, image: jax.Array, label: jax.Array | None = None, *,
         flip: bool = False, label_fill=0) -> tuple[jax.Array, jax.Array | None]:
    """K random crops of one example, image and label map cut by the same boxes:
    :func:`sample_boxes`, then :func:`crop_boxes`, then (if ``flip``) each crop and its
    label map mirrored horizontally with probability 1/2.

    Args:
      spec: the crop distribution (sizes, probabilities, padding P, K, output size).
      key: this example's PRNG key.
      image, label, label_fill: as in :func:`crop_boxes`. The example may also come
        with a leading batch axis of size 1, image (1, H, W, C) and label (1, ...), as
        ``jax_privacy.clipped_grad`` passes it under its default ``keep_batch_dim=True``;
        the K crops then replace that axis (same output shapes).
      flip: random horizontal flips after cropping.

    Returns:
      (images, labels) of shapes (K, h, w, C) and (K, h, w, ...) / (K, ...) / None.
    """
    if image.ndim == 4 and image.shape[0] == 1:
        image, label = image[0], (None if label is None else label[0])
    box_key, flip_key = jax.random.split(key)
    boxes = sample_boxes(spec, box_key, image.shape)
    images, labels = crop_boxes(spec, boxes, image, label, label_fill=label_fill)
    if not flip:
        return images, labels
    flips = jax.random.bernoulli(flip_key, 0.5, (spec.crops_per_example,))
    return _flip(images, flips), (_flip(labels, flips) if _is_map(label, image) else labels)


def crop_batch(spec: CropSpec, key: jax.Array, images: jax.Array, labels: jax.Array | None = None, *,
               flip: bool = False, label_fill=0) -> tuple[jax.Array, jax.Array | None]:
    """:func:`crop` for a batch: images (B, H, W, C), labels (B, ...) or None, one key per
    example split from ``key``. Returns images (B, K, h, w, C) and labels (B, K, ...)."""
    keys = jax.random.split(key, images.shape[0])
    one = lambda k, x, y: crop(spec, k, x, y, flip=flip, label_fill=label_fill)
    return jax.vmap(one)(keys, images, labels)


def _is_map(label, image) -> bool:
    """A label map shares the image's (H, W); anything else is a per-image label."""
    return label is not None and label.ndim >= 2 and label.shape[:2] == image.shape[:2]


def _extract(padded: jax.Array, box: Boxes, spec: CropSpec, method: str) -> jax.Array:
    """The box's content resized to ``spec.output_size``; shape (h, w) + trailing axes."""
    out_h, out_w = spec.output_size
    if spec.sizes == (spec.output_size,):  # plain random crop: a slice, no resampling
        start = (box.top, box.left) + (0,) * (padded.ndim - 2)
        return jax.lax.dynamic_slice(padded, start, (out_h, out_w) + padded.shape[2:])
    resample = _bilinear if method == "bilinear" else _nearest
    rows = resample(padded, box.top, box.height, out_h, axis=0)
    return resample(rows, box.left, box.width, out_w, axis=1)


def _positions(start, length, size):
    """Half-pixel-centred sample positions of ``size`` outputs over [start, start + length)."""
    scale = length.astype(jnp.float32) / size
    return start + (jnp.arange(size, dtype=jnp.float32) + 0.5) * scale


def _nearest(array, start, length, size, axis):
    index = jnp.floor(_positions(start, length, size)).astype(jnp.int32)
    return jnp.take(array, jnp.clip(index, start, start + length - 1), axis=axis)


def _bilinear(array, start, length, size, axis):
    """Linear interpolation along ``axis`` between the two nearest pixels, both clamped
    into [start, start + length − 1], so pixels outside the box are never read."""
    last = start + length - 1
    position = jnp.clip(_positions(start, length, size) - 0.5, start, last)
    low = jnp.floor(position).astype(jnp.int32)
    high = jnp.minimum(low + 1, last)
    shape = [1] * array.ndim
    shape[axis] = size
    frac = (position - low).reshape(shape)
    a = jnp.take(array, low, axis=axis).astype(jnp.float32)
    b = jnp.take(array, high, axis=axis).astype(jnp.float32)
    out = a + frac * (b - a)
    if jnp.issubdtype(array.dtype, jnp.integer):
        out = jnp.round(out)
    return out.astype(array.dtype)


def _flip(crops: jax.Array, flips: jax.Array) -> jax.Array:
    """Mirrors the width axis (axis 2) of the crops whose flag is set; crops (K, h, w, ...)."""
    flags = flips.reshape((-1,) + (1,) * (crops.ndim - 1))
    return jnp.where(flags, crops[:, :, ::-1], crops)
