"""The one-run audit: the guessing-game bound checked against exact arithmetic and
closed forms, and a real (tiny) training run with patch canaries, honest and broken."""

import math
from fractions import Fraction

import jax
import numpy as np
import pytest

from patchdp.audit_one_run import (Canaries, _kth_unused, audit_run, epsilon_lower_bound, guessing_bound,
                                   p_value)
from patchdp.config import Config, config_path
from patchdp.inclusion import Patch


def _binomial(r, q):
    """Exact rational P[Bin(r, q) = k], k = 0 … r (q a Fraction)."""
    return [math.comb(r, k) * q ** k * (1 - q) ** (r - k) for k in range(r + 1)]


@pytest.mark.parametrize("m, r, v, delta", [(20, 12, 10, 0.0), (20, 12, 10, 1e-3), (50, 30, 30, 1e-4), (9, 9, 1, 0.01)])
def test_p_value_is_the_theorem_in_exact_rational_arithmetic(m, r, v, delta):
    for epsilon in (0.0, 0.5, 2.0):
        q = Fraction(1) / (1 + Fraction(math.exp(-epsilon)))
        pmf = _binomial(r, q)
        tail = sum(pmf[v:])
        spread = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))
        exact = min(Fraction(1), tail + 2 * m * Fraction(delta) * spread)
        assert p_value(m, r, v, epsilon, delta) == pytest.approx(float(exact), rel=1e-9, abs=1e-15)


def test_all_correct_without_delta_has_a_closed_form():
    # r = v, δ = 0: P[Bin(r, q) ≥ r] = q^r < β  ⇔  ε > log(q/(1 − q)) with q = β^(1/r)
    for r, beta in ((10, 0.05), (100, 0.05), (500, 0.01)):
        q = beta ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0, beta) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_the_bound_is_valid_and_tight_for_randomized_response():
    """ε-DP randomized response, every canary guessed: W ~ Bin(m, e^ε/(1+e^ε)) exactly, so
    P[bound > ε] = Σ_v P[W = v]·[bound(v) > ε] is computed exactly; it must be ≤ β (the
    theorem) and, since this mechanism is the extreme one, not far below it."""
    m, beta = 200, 0.05
    for epsilon in (0.5, 1.0, 2.0):
        q = 1 / (1 + math.exp(-epsilon))
        pmf = _binomial(m, Fraction(q))
        exceed = float(sum(pmf[v] for v in range(m + 1) if epsilon_lower_bound(m, m, v, 0.0, beta) > epsilon))
        assert 0.3 * beta < exceed <= beta


def test_guessing_bound_takes_top_scores_and_pays_for_every_try():
    included = np.array([True] * 60 + [False] * 40)
    perfect = np.where(included, 1.0, 0.0) + np.linspace(0, 0.5, 100)
    one = guessing_bound({"a": perfect}, included, 0.0, pairs=[(50, 0)])
    assert (one.correct, one.guesses_in, one.tried) == (50, 50, 1)
    assert one.epsilon == pytest.approx(epsilon_lower_bound(100, 50, 50, 0.0, 0.05))
    two = guessing_bound({"a": perfect, "b": -perfect}, included, 0.0, pairs=[(50, 0), (30, 30)])
    assert two.tried == 4 and two.score == "a"
    assert two.epsilon == pytest.approx(epsilon_lower_bound(100, 60, 60, 0.0, 0.05 / 4))
    assert guessing_bound({"a": -perfect}, included, 0.0).epsilon == 0.0
    with pytest.raises(ValueError, match="k\\+, k-"):
        guessing_bound({"a": perfect}, included, 0.0, pairs=[(90, 20)])


def test_kth_unused_colour():
    used = np.array([0, 1, 2, 5, 6, 9])
    free = [c for c in range(20) if c not in used]
    np.testing.assert_array_equal(_kth_unused(used, np.arange(10)), free[:10])


def test_canaries_paint_only_included_images_inside_the_patch():
    patch = Patch.disc(5)
    marks = Canaries(indices=np.array([3, 7]), included=np.array([True, False]), colours=np.array([0x010203, 0x040506]),
                     rows=np.array([2, 0]), cols=np.array([4, 0]), hit_probability=np.ones(2), patch=patch)
    images = np.full((3, 16, 16, 3), 200, np.uint8)
    painted = marks.paint(images, np.array([7, 3, 1]))
    np.testing.assert_array_equal(painted[[0, 2]], images[[0, 2]])
    changed = np.any(painted[1] != images[1], axis=-1)
    expected = np.zeros((16, 16), bool)
    expected[2:7, 4:9] = patch.mask
    np.testing.assert_array_equal(changed, expected)
    assert tuple(painted[1, 4, 6]) == (1, 2, 3)


@pytest.fixture(scope="module")
def small():
    """Synthetic scenes 32×32, 512 images, batch 128 (q = 1/4), crop 8 (p* = 0.31), 30
    steps, noise calibrated for ε = 1; 256 canaries. A noise-free step then leaves an
    included canary's coordinate at its number of hits (mean 30·q·p* = 2.3)."""
    return Config.from_toml(config_path("demo"), {
        "dataset_options": {"num_examples": 512, "image_size": 32}, "crop": 8, "padding": 0, "batch_size": 128,
        "steps": 30, "target_epsilon": 1.0, "model_options": {"width": 1}, "seed": 3, "eval_every": 0})


def test_a_noise_free_run_is_flagged_and_its_canary_coordinates_count_hits(small):
    audit = audit_run(small, canaries=256, key=jax.random.key(0), running=lambda m: m.replace(noise_multiplier=0),
                      progress=False)
    counts = audit.updates.sum(axis=0)
    included = audit.marks.included
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)  # C·e_i per hit, exactly
    assert np.all(counts[~included] == 0) and np.all(counts >= 0)
    expected = 30 * (128 / 512) * audit.marks.hit_probability[0]
    assert abs(counts[included].mean() - expected) < 0.5  # sd of the mean ≈ 1.5/√128 = 0.13
    # ~90% of the ~128 included canaries are hit: ~115 perfect guesses give ε ≥ 3, the claim is 1
    assert audit.flagged and audit.bound.epsilon > 2 * audit.epsilon_patch
