"""The auditor: its statistics against closed forms and a Gaussian mechanism of known ε,
its canary against the exact p*, and the real step: honest stays below the claim,
broken mechanisms are flagged."""

import json

import jax
import numpy as np
import pytest
from scipy import stats

from patchdp import accounting
from patchdp.audit import (AuditResult, audit, audit_ceiling, audit_scores, canary_datasets, canary_step, clopper_pearson,
                           epsilon_lower_bound)
from patchdp.inclusion import CropSpec, Patch, inclusion_probability
from patchdp.mechanism import DPSGD
from patchdp.sampling import FixedSizeSampling, PoissonSampling, SamplingSeed

DELTA = 1e-5
IMAGE = (16, 16)


@pytest.mark.parametrize("n", [1, 10, 1000])
def test_clopper_pearson_solves_the_binomial_tail(n):
    """The upper bound u solves P[Bin(n, u) ≤ k] = α, the lower bound l solves P[Bin(n, l) ≥ k] = α."""
    alpha = 0.025
    for k in sorted({0, 1, n // 3, n - 1, n}):
        upper = float(clopper_pearson(k, n, alpha, "upper"))
        lower = float(clopper_pearson(k, n, alpha, "lower"))
        if k < n:
            assert stats.binom.cdf(k, n, upper) == pytest.approx(alpha, rel=1e-6)
        else:
            assert upper == 1.0
        if k > 0:
            assert stats.binom.sf(k - 1, n, lower) == pytest.approx(alpha, rel=1e-6)
        else:
            assert lower == 0.0


def test_gaussian_mechanism_bound_is_below_the_true_epsilon_and_close():
    """N(0, 1) vs N(1, 1): ε(1e-5) = 4.377 exactly; 10^6 runs per world give more than half
    of it (the best test on these many runs expects 3.19, 73%: ``audit_ceiling``)."""
    true = accounting.gaussian_mechanism_epsilon(1.0, DELTA)
    assert audit_ceiling(2.0, 1.0, DELTA, 10 ** 6) == pytest.approx(3.19, abs=0.01)  # z = 2, Δ = 2: μ = 1
    rng = np.random.default_rng(0)
    bound = epsilon_lower_bound(rng.normal(0, 1, 10 ** 6), rng.normal(1, 1, 10 ** 6), DELTA)
    assert 0.5 * true <= bound.epsilon <= true
    assert bound.confidence == 0.95 and bound.runs == (10 ** 6, 10 ** 6)


def test_error_rate_bounds_hold_with_the_stated_confidence():
    """Over 200 independent audits of N(0, 1) vs N(1.5, 1), the chosen test's exact TPR and
    FPR lie inside the Clopper–Pearson bounds in at least ~95% of them (and ε_lower never
    exceeds the true ε). A bound without the held-out split or the exact intervals fails."""
    mu, runs, repeats = 1.5, 2000, 200
    true = accounting.gaussian_mechanism_epsilon(mu, DELTA)
    rng = np.random.default_rng(1)
    misses = 0
    for _ in range(repeats):
        bound = epsilon_lower_bound(rng.normal(0, 1, runs), rng.normal(mu, 1, runs), DELTA, max_thresholds=256)
        assert bound.epsilon <= true
        tau = bound.threshold
        if bound.direction == "with>":
            tpr, fpr = stats.norm.sf(tau - mu), stats.norm.sf(tau)
        else:  # scores negated: "−score > τ ⇒ D"
            tpr, fpr = stats.norm.cdf(-tau), stats.norm.cdf(-tau - mu)
        misses += bound.tpr_low > tpr or bound.fpr_high < fpr
    assert misses <= 20  # expected ≤ 10 at α = 0.05; P[Bin(200, 0.05) > 20] ≈ 0.001


def test_no_difference_gives_no_bound():
    rng = np.random.default_rng(2)
    scores = rng.normal(0, 1, 4000)
    assert epsilon_lower_bound(scores[:2000], scores[2000:], DELTA).epsilon < 0.5


@pytest.mark.parametrize("sampling", [FixedSizeSampling(dataset_size=8, batch_size=4),
                                      PoissonSampling(dataset_size=8, rate=0.5)], ids=["fixed", "poisson"])
def test_canary_is_hit_exactly_with_probability_q_times_p_star(sampling):
    """Noise-free step, q = 1/2, padding 2. The same batches and keys on D and D' (the
    same key, seed and world index): the canary's clipped gradient flips from −C to +C,
    i.e. the score rises by 2C/E[B], in a fraction q·p* of runs, p* computed independently
    by ``inclusion_probability``; nothing else changes."""
    crop, patch = CropSpec(6, padding=2), Patch.rectangle(2, 3)
    without, with_canary, _ = canary_datasets(IMAGE, crop, patch, sampling.dataset_size)
    step = canary_step(DPSGD(sampling=sampling, clip_norm=1.0, noise_multiplier=0.0, delta=DELTA, crop=crop,
                             image_shape=IMAGE, patch=patch))
    runs = 10_000
    coupled = dict(runs=runs, key=jax.random.key(0), seed=SamplingSeed.fixed(0))
    (s0,), (s1,) = (audit_scores(step, (world,), sampling, **coupled) for world in (without, with_canary))
    if isinstance(sampling, FixedSizeSampling):
        np.testing.assert_array_equal(s0, -1.0)  # four examples, each −C, over E[B] = 4
    hits = s1 - s0
    assert set(np.unique(hits)) <= {0.0, 0.5}
    rate = 0.5 * inclusion_probability(IMAGE, crop, patch)
    assert stats.binomtest(int(np.sum(hits == 0.5)), runs, rate).pvalue > 1e-3


Z = 2.0
ACCOUNTED = DPSGD(sampling=FixedSizeSampling(dataset_size=4, batch_size=4), clip_norm=1.0, noise_multiplier=Z,
                  delta=DELTA, crop=CropSpec(4), image_shape=IMAGE, patch=Patch.rectangle(1))
WHOLE_IMAGE = canary_step(ACCOUNTED.replace(crop=CropSpec(16)))


def _audit(crop, *, step, runs=20_000) -> AuditResult:
    return audit(ACCOUNTED.replace(crop=crop), runs=runs, key=jax.random.key(3), seed=SamplingSeed.fixed(3),
                 step=step)


def test_honest_step_without_amplification_is_audited_close_to_its_claim():
    """Crop = image (p* = 1), q = 1, z = 2: the step is the Gaussian mechanism with μ = 1,
    ε = 4.38; 2·10^4 runs per world allow at best ~2.17 at δ = 1e-5 (``audit_ceiling``)."""
    runs = 20_000
    result = _audit(CropSpec(16), step=WHOLE_IMAGE, runs=runs)
    assert result.inclusion_probability == 1.0
    assert result.epsilon_patch == pytest.approx(accounting.gaussian_mechanism_epsilon(1.0, DELTA), abs=1e-2)
    assert 0.7 * audit_ceiling(Z, 1.0, DELTA, runs) <= result.bound.epsilon <= result.epsilon_patch
    assert not result.flagged


@pytest.mark.parametrize("broken", ["crop ignored", "half the noise"])
def test_broken_mechanism_is_flagged(broken):
    """Accounted: crop 4 of 16 (p* = 0.095), z = 2, ε = 1.63. Run: crops of the whole
    image (the patch is always seen, true ε 4.38) or noise std z·C/2 (true ε 6.49)."""
    crop = CropSpec(4)
    if broken == "crop ignored":
        step = WHOLE_IMAGE
    else:
        step = canary_step(ACCOUNTED.replace(noise_multiplier=Z / 2))
    result = _audit(crop, step=step)
    assert result.epsilon_patch == pytest.approx(1.63, abs=0.01)
    assert result.flagged and result.bound.epsilon > result.epsilon_patch + 0.5


def test_cli_audit_prints_the_bound_next_to_the_claim(capsys):
    from patchdp.cli import main
    assert main(["audit", "--crop", "8", "--runs", "500", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["epsilon_audited"] <= out["epsilon_patch"] < out["epsilon_image"]
    assert out["runs_per_world"] == 500 and out["flagged"] is False


def test_cli_audit_refuses_too_few_runs(capsys):
    from patchdp.cli import main
    assert main(["audit", "--runs", "2"]) == 2
    assert "runs must be an integer >= 4" in capsys.readouterr().err
