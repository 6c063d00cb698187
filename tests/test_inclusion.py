"""Inclusion probabilities against an independent brute force that enumerates every
crop offset and every placement, against closed forms, and against docs/method.md, "Settings to check against"."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from patchdp.inclusion import CropSpec, Patch, inclusion_counts, inclusion_map, inclusion_probability


def brute_force_counts(image_hw, crop_hw, padding, mask):
    """For every placement, build the padded image with the patch drawn in and count the
    crop windows that contain a sensitive pixel. No shared code with the library."""
    H, W = image_hw
    ch, cw = crop_hw
    ph, pw = mask.shape
    out = np.zeros((H - ph + 1, W - pw + 1), np.int64)
    for a, b in itertools.product(range(H - ph + 1), range(W - pw + 1)):
        canvas = np.zeros((H + 2 * padding, W + 2 * padding), bool)
        canvas[padding + a: padding + a + ph, padding + b: padding + b + pw] = mask
        hits = 0
        for u in range(H + 2 * padding - ch + 1):
            for v in range(W + 2 * padding - cw + 1):
                hits += canvas[u: u + ch, v: v + cw].any()
        out[a, b] = hits
    return out


SHAPES = {
    "pixel": Patch.rectangle(1),
    "rect2x3": Patch.rectangle(2, 3),
    "disc4": Patch.disc(4),
    "disc5": Patch.disc(5),
    "blob5": Patch.blob(5),
    "cluster2": Patch.cluster(2, gap=1),
    "ring": Patch.from_mask([[1, 1, 1], [1, 0, 1], [1, 1, 1]]),
    "diagonal": Patch.from_mask(np.eye(4, dtype=bool)),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("image_hw,crop_hw,padding", [
    ((9, 9), (3, 3), 0),
    ((9, 11), (4, 2), 2),
    ((8, 7), (8, 7), 0),     # crop = image: every crop hits
    ((8, 7), (10, 9), 1),    # crop = padded image
    ((10, 10), (1, 1), 3),   # single-pixel crop, padded
    ((7, 12), (5, 9), 1),
])
def test_counts_match_brute_force(shape, image_hw, crop_hw, padding):
    patch = SHAPES[shape]
    if patch.shape[0] > image_hw[0] or patch.shape[1] > image_hw[1]:
        pytest.skip("patch larger than image")
    got = inclusion_counts(image_hw, crop_hw, padding, patch)
    want = brute_force_counts(image_hw, crop_hw, padding, patch.mask)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("image,crop,pad,patch_hw", [
    ((300, 400), (70, 50), 0, (3, 4)),
    ((300, 400), (120, 333), 40, (10, 1)),
    ((64, 64), (64, 64), 0, (64, 64)),
])
def test_summed_area_path_agrees_with_rectangle_closed_form(image, crop, pad, patch_hw):
    # Sizes where brute force is too slow: the two independent code paths must agree.
    from patchdp import inclusion as inc
    mask = np.ones(patch_hw, bool)
    offsets = (image[0] + 2 * pad - crop[0] + 1, image[1] + 2 * pad - crop[1] + 1)
    np.testing.assert_array_equal(inc._mask_counts(image, crop, pad, offsets, mask),
                                  inc._rectangle_counts(image, crop, pad, offsets, mask))


def test_science_worked_value():
    # docs/method.md, "Settings to check against": 10x10 square, crop 100, 1000x1000 image: p* = 109^2 / 901^2 ≈ 0.0146.
    p = inclusion_probability((1000, 1000), CropSpec(100), Patch.rectangle(10), exact=True)
    assert p == Fraction(109 * 109, 901 * 901)
    assert abs(float(p) - 0.0146) < 1e-4


def test_float_is_rounded_up():
    exact = inclusion_probability((1000, 1000), CropSpec(100), Patch.disc(10), exact=True)
    approx = inclusion_probability((1000, 1000), CropSpec(100), Patch.disc(10))
    assert Fraction(approx) >= exact
    assert approx - float(exact) <= 2 * math.ulp(float(exact))


def test_disc_is_below_its_bounding_square():
    crop = CropSpec(100)
    disc = inclusion_probability((1000, 1000), crop, Patch.disc(10))
    square = inclusion_probability((1000, 1000), crop, Patch.rectangle(10))
    assert disc < square


def test_full_crop_means_no_amplification():
    assert inclusion_probability((32, 32), CropSpec(32), Patch.rectangle(1)) == 1.0
    assert inclusion_probability((32, 32), CropSpec(36, padding=2), Patch.disc(3)) == 1.0


def test_padding_never_hosts_the_patch():
    # With padding, the patch at the image corner is hit by fewer offsets than it would
    # be if it could move into the padded border; p* is attained in the interior.
    m = inclusion_map((20, 20), CropSpec(5, padding=3), Patch.rectangle(2))
    assert m.shape == (19, 19)
    assert m[0, 0] <= m.max()
    want = brute_force_counts((20, 20), (5, 5), 3, np.ones((2, 2), bool)) / (26 - 5 + 1) ** 2
    np.testing.assert_allclose(m, want, rtol=1e-15)


def test_k_crops():
    crop1, crop3 = CropSpec(4), CropSpec(4, crops_per_example=3)
    p1 = inclusion_probability((12, 12), crop1, Patch.disc(3), exact=True)
    p3 = inclusion_probability((12, 12), crop3, Patch.disc(3), exact=True)
    assert p3 == 1 - (1 - p1) ** 3
    np.testing.assert_allclose(inclusion_map((12, 12), crop3, Patch.disc(3)),
                               1 - (1 - inclusion_map((12, 12), crop1, Patch.disc(3))) ** 3, rtol=1e-14)


def test_size_mixture_is_max_of_mixture_not_mixture_of_maxima():
    image, patch = (10, 20), Patch.rectangle(1)
    spec = CropSpec([(3, 3), (10, 20)], probabilities=[0.5, 0.5], output_size=3)
    small = brute_force_counts(image, (3, 3), 0, patch.mask) / (8 * 18)
    full = brute_force_counts(image, (10, 20), 0, patch.mask) / 1
    want = (0.5 * small + 0.5 * full)
    np.testing.assert_allclose(inclusion_map(image, spec, patch), want, rtol=1e-14)
    p = inclusion_probability(image, spec, patch, exact=True)
    assert p == Fraction(1, 2) * Fraction(int(brute_force_counts(image, (3, 3), 0, patch.mask).max()), 8 * 18) + Fraction(1, 2)
    # Mixtures whose maxima sit at different places: max of mixture < mixture of maxima.
    spec2 = CropSpec([(2, 2), (9, 9)], probabilities=[0.3, 0.7], output_size=2, padding=4)
    maps = [brute_force_counts((10, 10), s, 4, patch.mask) / ((18 - s[0] + 1) ** 2) for s in [(2, 2), (9, 9)]]
    mix_of_max = 0.3 * maps[0].max() + 0.7 * maps[1].max()
    got = inclusion_probability((10, 10), spec2, patch)
    assert got == pytest.approx((0.3 * maps[0] + 0.7 * maps[1]).max(), rel=1e-14)
    assert got <= mix_of_max + 1e-15


@settings(max_examples=40, deadline=None)
@given(
    H=st.integers(3, 9), W=st.integers(3, 9), pad=st.integers(0, 3),
    ch=st.integers(1, 10), cw=st.integers(1, 10),
    mask=st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=2, max_size=3),
)
def test_property_random_masks(H, W, pad, ch, cw, mask):
    mask = np.array(mask, bool)
    if not mask.any():
        with pytest.raises(ValueError, match="empty"):
            Patch.from_mask(mask)
        return
    patch = Patch.from_mask(mask)
    if patch.shape[0] > H or patch.shape[1] > W or ch > H + 2 * pad or cw > W + 2 * pad:
        with pytest.raises(ValueError):
            inclusion_map((H, W), CropSpec((ch, cw), padding=pad), patch)
        return
    got = inclusion_counts((H, W), (ch, cw), pad, patch)
    np.testing.assert_array_equal(got, brute_force_counts((H, W), (ch, cw), pad, patch.mask))
    p = inclusion_map((H, W), CropSpec((ch, cw), padding=pad), patch)
    assert ((0 < p) & (p <= 1)).all()


@settings(max_examples=30, deadline=None)
@given(H=st.integers(10, 60), c=st.integers(1, 40), ph=st.integers(1, 6), pad=st.integers(0, 5))
def test_property_monotone_in_patch_and_crop(H, c, ph, pad):
    if c > H + 2 * pad - 1:
        return
    image = (H, H)
    p = inclusion_probability(image, CropSpec(c, padding=pad), Patch.rectangle(ph))
    assert inclusion_probability(image, CropSpec(c + 1, padding=pad), Patch.rectangle(ph)) >= p
    if ph < H:
        assert inclusion_probability(image, CropSpec(c, padding=pad), Patch.rectangle(ph + 1)) >= p
    # A disc inscribed in the square is never easier to hit than the square.
    assert inclusion_probability(image, CropSpec(c, padding=pad), Patch.disc(ph)) <= p


@pytest.mark.parametrize("bad,match", [
    (lambda: CropSpec(0), "positive integer"),
    (lambda: CropSpec(2.5), r"crop size must be N, .HxW. or \[H, W\] with positive integers, got 2.5"),
    (lambda: CropSpec(4, padding=-1), "padding"),
    (lambda: CropSpec(4, crops_per_example=0), "crops_per_example"),
    (lambda: CropSpec([(2, 2), (3, 3)]), "probabilities"),
    (lambda: CropSpec([(2, 2), (3, 3)], probabilities=[0.5, 0.6], output_size=2), "sum to 1"),
    (lambda: CropSpec([(2, 2), (3, 3)], probabilities=[0.5, 0.5]), "output_size"),
    (lambda: Patch.from_mask(np.zeros((3, 3))), "empty"),
    (lambda: Patch.from_mask(np.ones(3)), "2-D"),
    (lambda: Patch.rectangle(0), "positive"),
    (lambda: inclusion_probability((10, 10), CropSpec(12), Patch.rectangle(2)), "larger than the padded image"),
    (lambda: inclusion_probability((10, 10), CropSpec(4), Patch.rectangle(11, 2)), "larger than the image"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
