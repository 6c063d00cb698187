"""On-device crops: windows of the padded image, resizing that reads only the box,
flips, and — the tie between sampler and accountant — hit frequencies that match
``inclusion_map``."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchdp.crops import Boxes, crop, crop_batch, crop_boxes, sample_boxes
from patchdp.inclusion import CropSpec, Patch, inclusion_map

MIXTURE = CropSpec([(3, 3), (5, 4), (6, 6)], probabilities=[0.2, 0.3, 0.5], output_size=(4, 5), padding=1)


def numbered(h, w, c=2):
    """An image whose pixels are all distinct, and the matching id label map."""
    image = np.arange(h * w * c, dtype=np.float32).reshape(h, w, c) + 1
    return jnp.asarray(image), jnp.asarray(np.arange(h * w).reshape(h, w) + 1)


def windows(array, padding, size, fill):
    """Every size-window of the padded array, by brute force."""
    pad = [(padding, padding)] * 2 + [(0, 0)] * (array.ndim - 2)
    padded = np.pad(np.asarray(array), pad, constant_values=fill)
    return {(u, v): padded[u:u + size[0], v:v + size[1]]
            for u in range(padded.shape[0] - size[0] + 1) for v in range(padded.shape[1] - size[1] + 1)}


def test_plain_crops_are_windows_of_the_padded_image_with_the_same_label_window():
    image, label = numbered(7, 6)
    spec = CropSpec((4, 3), padding=2, crops_per_example=3)
    images, labels = jax.jit(lambda k: crop(spec, k, image, label, label_fill=-1))(jax.random.key(0))
    assert images.shape == (3, 4, 3, 2) and labels.shape == (3, 4, 3)
    image_windows = windows(image, 2, (4, 3), 0)
    label_windows = windows(label, 2, (4, 3), -1)
    for got_image, got_label in zip(np.asarray(images), np.asarray(labels)):
        offsets = [uv for uv, w in image_windows.items() if np.array_equal(w, got_image)]
        assert len(offsets) == 1
        np.testing.assert_array_equal(got_label, label_windows[offsets[0]])


def test_sampled_boxes_lie_in_the_padded_image_with_sizes_from_the_spec():
    spec = CropSpec(MIXTURE.sizes, probabilities=MIXTURE.probabilities, output_size=MIXTURE.output_size,
                    padding=1, crops_per_example=4000)
    boxes = jax.jit(lambda k: sample_boxes(spec, k, (8, 7)))(jax.random.key(1))
    top, left, height, width = map(np.asarray, boxes)
    sizes = set(zip(height.tolist(), width.tolist()))
    assert sizes == set(MIXTURE.sizes)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 8 + 2).all() and (left + width <= 7 + 2).all()
    # every offset of every size is reachable, including the last one
    assert top[height == 3].max() == 10 - 3 and left[width == 4].max() == 9 - 4


def test_resize_matches_jax_image_resize_on_the_box():
    image, label = numbered(9, 8, 3)
    boxes = Boxes(*(jnp.asarray(v, jnp.int32) for v in ([0, 3, 2], [1, 0, 4], [3, 5, 6], [3, 4, 6])))
    images, labels = jax.jit(partial(crop_boxes, MIXTURE))(boxes, image, label)
    padded_image = np.pad(np.asarray(image), [(1, 1), (1, 1), (0, 0)])
    padded_label = np.pad(np.asarray(label), [(1, 1), (1, 1)])
    for k, (t, l, h, w) in enumerate(zip(*map(np.asarray, boxes))):
        want = jax.image.resize(padded_image[t:t + h, l:l + w], (4, 5, 3), "bilinear", antialias=False)
        np.testing.assert_allclose(images[k], want, rtol=1e-5)
        want = jax.image.resize(padded_label[t:t + h, l:l + w], (4, 5), "nearest")
        np.testing.assert_array_equal(labels[k], want)


def test_resize_reads_only_pixels_inside_the_box():
    image, label = numbered(9, 8, 3)
    boxes = Boxes(*(jnp.asarray(v, jnp.int32) for v in ([2, 1, 4], [3, 2, 0], [3, 5, 6], [3, 4, 6])))
    cut = jax.jit(partial(crop_boxes, MIXTURE))
    clean = cut(boxes, image, label)
    for k, (t, l, h, w) in enumerate(zip(*map(np.asarray, boxes))):
        inside = np.zeros((11, 10), bool)
        inside[t:t + h, l:l + w] = True
        inside = inside[1:-1, 1:-1]  # box in unpadded coordinates
        poisoned_image = jnp.where(inside[..., None], image, jnp.nan)
        poisoned_label = jnp.where(inside, label, -7)
        images, labels = cut(boxes, poisoned_image, poisoned_label)
        np.testing.assert_array_equal(images[k], clean[0][k])
        np.testing.assert_array_equal(labels[k], clean[1][k])


def test_flips_mirror_image_and_label_together_and_both_occur():
    image, label = numbered(6, 6, 1)
    spec = CropSpec(4, padding=1, crops_per_example=64)
    images, labels = jax.jit(partial(crop, spec, flip=True))(jax.random.key(2), image, label)
    image_windows = list(windows(image, 1, (4, 4), 0).values())
    flipped = 0
    for got_image, got_label in zip(np.asarray(images), np.asarray(labels)):
        # the label map follows the image: pixel ids correspond everywhere
        np.testing.assert_array_equal(got_label, got_image[..., 0])
        plain = any(np.array_equal(w, got_image) for w in image_windows)
        mirrored = any(np.array_equal(w[:, ::-1], got_image) for w in image_windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 10 < flipped < 54


def test_class_labels_pass_through_and_batches_get_independent_crops():
    images = jnp.stack([numbered(8, 8)[0]] * 5)
    spec = CropSpec(5, crops_per_example=2)
    cut = jax.jit(partial(crop_batch, spec))
    out, labels = cut(jax.random.key(3), images, jnp.arange(5))
    assert out.shape == (5, 2, 5, 5, 2)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(5)[:, None], 2, 1))
    assert len({np.asarray(x).tobytes() for x in out.reshape(10, -1)}) > 5
    again, _ = cut(jax.random.key(3), images, jnp.arange(5))
    np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("label", ["map", "class"])
def test_an_example_with_a_batch_axis_of_one_is_cropped_like_the_example(label):
    """jax_privacy.clipped_grad(keep_batch_dim=True) hands the loss (1, H, W, C)."""
    image, label_map = numbered(8, 7)
    label = label_map if label == "map" else jnp.asarray(2)
    spec = CropSpec(5, padding=1, crops_per_example=3)
    key = jax.random.key(5)
    plain = crop(spec, key, image, label, flip=True)
    batched = jax.jit(lambda k, x, y: crop(spec, k, x, y, flip=True))(key, image[None], label[None])
    for want, got in zip(plain, batched):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_crop_validates_its_input():
    with pytest.raises(ValueError, match="larger than the padded image"):
        crop(CropSpec(9), jax.random.key(0), jnp.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        crop(CropSpec(4), jax.random.key(0), jnp.zeros((2, 8, 8, 1)))


# ------------------------------------------------------------ sampler vs accountant

SPECS = {
    "fixed": CropSpec((4, 5)),
    "padded": CropSpec(4, padding=2),
    "K=3": CropSpec((5, 3), padding=1, crops_per_example=3),
    "mixture": CropSpec([(3, 3), (4, 5), (5, 5)], probabilities=[0.5, 0.2, 0.3], output_size=5, padding=1),
}
IMAGE = (10, 9)
PATCHES = [Patch.rectangle(2, 3), Patch.disc(3)]
POSITIONS = [(0, 0), (0, 6), (3, 2), (7, 6), (4, 0), (7, 3)]
DRAWS = 20_000


def marked_image():
    """Channel (i, j) marks PATCHES[i] placed at POSITIONS[j]."""
    channels = np.zeros(IMAGE + (len(PATCHES), len(POSITIONS)), np.float32)
    for i, patch in enumerate(PATCHES):
        for j, (a, b) in enumerate(POSITIONS):
            channels[a:a + patch.shape[0], b:b + patch.shape[1], i, j] = patch.mask
    return channels.reshape(IMAGE + (-1,))


def hit_frequencies(spec):
    """For every (patch, position) channel: the fraction of examples, out of DRAWS, for
    which one of the K crops shows a marked pixel. One key per example, split from one
    key as in a batch."""

    @jax.jit
    def hits(key, image):
        one = lambda k: (crop(spec, k, image)[0] > 0).any(axis=(0, 1, 2))
        return jax.vmap(one)(jax.random.split(key, DRAWS)).mean(axis=0, dtype=jnp.float32)

    return np.asarray(hits(jax.random.key(7), marked_image())).reshape(len(PATCHES), len(POSITIONS))


def inclusion(spec):
    at = tuple(np.array(POSITIONS).T)
    return np.stack([inclusion_map(IMAGE, spec, patch)[at] for patch in PATCHES])


def within_sampling_error(frequency, p, sigmas=5):
    return np.abs(frequency - p) <= sigmas * np.sqrt(p * (1 - p) / DRAWS) + 1e-12


@pytest.mark.parametrize("name", SPECS)
def test_hit_frequencies_match_inclusion_map(name):
    spec = SPECS[name]
    frequency, p = hit_frequencies(spec), inclusion(spec)
    assert 0 < p.min() and p.max() < 1
    assert within_sampling_error(frequency, p).all(), (frequency, p)
    # The test has power: a sampler off by one pixel of padding would fail it.
    wrong = CropSpec(spec.sizes, probabilities=spec.probabilities, output_size=spec.output_size,
                     padding=spec.padding + 1, crops_per_example=spec.crops_per_example)
    assert not within_sampling_error(frequency, inclusion(wrong)).all()
