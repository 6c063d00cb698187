"""The accountant against closed forms, direct numerical integration of the dominating
pair, dp_accounting's own PLD composition and its RDP accountant."""

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import integrate, stats

from patchdp import accounting as acc
from patchdp.accounting import AddRemove, GaussianAugmentation, ImageLevel, Ledger, PatchLevel
from patchdp.accounting.composition import compose, delta_of, epsilon_of, rounding_allowance, self_compose
from patchdp.accounting.loss import connect_the_dots, hockey_stick
from patchdp.inclusion import CropSpec, Patch
from patchdp.mechanism import DPSGD
from patchdp.sampling import FixedSizeSampling, PoissonSampling

COARSE = 1e-3  # grid spacing for tests that do not probe the last digits


def pair_delta(eps, w, z, sensitivity=2.0, reverse=False):
    """H_{e^eps} of P = (1-w)N(0,z²) + wN(Δ,z²) against Q = N(0,z²) (or Q against P),
    by adaptive quadrature of (p − e^ε q)_+ : independent of the library's closed form."""
    p = lambda x: (1 - w) * stats.norm.pdf(x, 0, z) + w * stats.norm.pdf(x, sensitivity, z)
    q = lambda x: stats.norm.pdf(x, 0, z)
    if reverse:
        p, q = q, p
    f = lambda x: max(p(x) - math.exp(eps) * q(x), 0.0)
    lo, hi = -12 * z - 2, 12 * z + sensitivity + 2
    return integrate.quad(f, lo, hi, points=[sensitivity / 2], limit=400, epsabs=1e-14, epsrel=1e-10)[0]


# ------------------------------------------------------------------ closed forms

@pytest.mark.parametrize("z,steps", [(1.0, 1), (2.0, 10), (4.0, 1000), (0.8, 3), (10.0, 10 ** 5)])
def test_no_subsampling_is_the_gaussian_mechanism(z, steps):
    # w = 1: every step is the Gaussian mechanism with sensitivity 2 (units of C), and T
    # of them compose to μ = 2·sqrt(T)/z, whose ε(δ) has a closed form (Balle & Wang 2018).
    got = acc.epsilon(z, steps, 1e-5, sampling=PoissonSampling(rate=1.0), relation=ImageLevel())
    want = acc.gaussian_mechanism_epsilon(2 * math.sqrt(steps) / z, 1e-5)
    assert want <= got <= want * (1 + 1e-5) + 1e-6


def test_add_remove_without_subsampling_has_sensitivity_one():
    got = acc.epsilon(2.0, 50, 1e-6, sampling=PoissonSampling(rate=1.0), relation=AddRemove())
    want = acc.gaussian_mechanism_epsilon(math.sqrt(50) / 2.0, 1e-6)
    assert want <= got <= want * (1 + 1e-5)


def test_gaussian_closed_form_against_integration():
    mu = 1.3
    for eps in [0.0, 0.5, 2.0]:
        f = lambda x: max(stats.norm.pdf(x, mu) - math.exp(eps) * stats.norm.pdf(x), 0.0)
        want = integrate.quad(f, -15, 15, points=[mu / 2], epsabs=1e-14)[0]
        assert acc.gaussian_mechanism_delta(eps, mu) == pytest.approx(want, rel=1e-9, abs=1e-15)


# ------------------------------------------------------------------ one step

@pytest.mark.parametrize("w,z", [(0.02, 1.0), (0.3, 0.7), (1e-3, 2.0), (1.0, 1.5)])
def test_one_step_profile_matches_numerical_integration(w, z):
    # The hockey-stick closed form against quadrature, at and between grid points; the
    # discretised PLD is exact at grid points and pessimistic between them.
    eps = np.array([0.0, 0.05, 0.3, 1.0, 2.5])
    want = np.array([pair_delta(e, w, z) for e in eps])
    np.testing.assert_allclose(hockey_stick(eps, w, 2.0 / z), want, rtol=1e-8, atol=1e-15)
    got = acc.privacy_profile(z, 1, eps, sampling=PoissonSampling(rate=w), relation=ImageLevel())
    assert (got >= want - 1e-12).all()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("w,z", [(0.02, 1.0), (0.3, 0.7)])
def test_switching_pld_negative_half_is_the_add_pair(w, z):
    # For ε < 0 the one profile must be the "add" branch: Q against P.
    (pld,) = ImageLevel().one_step(w, z, COARSE)
    for eps in [-0.02, -0.2, -1.0]:
        want = pair_delta(eps, w, z, reverse=True)
        assert delta_of(pld, np.array([eps]))[0] == pytest.approx(want, rel=2e-3, abs=1e-12)
    # and a proper distribution: total mass 1, E[e^{-L}] ≤ 1
    assert pld.probs.sum() + pld.infinity_mass == pytest.approx(1, abs=1e-12)
    assert (pld.probs * np.exp(-pld.losses)).sum() <= 1 + 1e-12


def test_one_step_is_max_of_remove_and_add_for_every_epsilon():
    w, z = 0.05, 1.0
    for eps in [0.01, 0.4, 1.5]:
        remove, add = pair_delta(eps, w, z), pair_delta(eps, w, z, reverse=True)
        assert remove >= add  # the remove branch dominates for ε ≥ 0 (Zhu et al. 2022)
        got = acc.delta(z, 1, eps, sampling=PoissonSampling(rate=w), relation=ImageLevel())
        assert got == pytest.approx(max(remove, add), rel=1e-3)


# ------------------------------------------------------------------ composition

def _to_dp_accounting(pld):
    """Our single-step PLD as a dp_accounting object, to compose with their code."""
    pmf = pld_pmf.DensePLDPmf(pld.step, pld.offset, pld.probs.copy(), pld.infinity_mass, True)
    return pld_lib.PrivacyLossDistribution(pmf)


@pytest.mark.parametrize("w,z,steps", [(0.02, 1.0, 300), (0.005, 0.8, 3000), (0.3, 3.0, 20)])
def test_fft_composition_and_queries_agree_with_dp_accounting(w, z, steps):
    (one,) = ImageLevel().one_step(w, z, COARSE)
    # dp_accounting composes the same PLD without a rounding allowance: our masses agree
    # with theirs, and the allowance we add on top moves ε by < 1e-3 relative here.
    theirs = _to_dp_accounting(one).self_compose(steps)
    ours = self_compose(one, steps)
    for delta in [1e-3, 1e-5, 1e-8]:
        want = theirs.get_epsilon_for_delta(delta)
        assert acc.composition._epsilon_of_masses(ours, delta) == pytest.approx(want, rel=1e-5, abs=1e-9)
        assert want * (1 - 1e-9) <= epsilon_of(ours, delta) <= want * (1 + 1e-3)
    eps = np.array([0.1, 0.5, 1.0, 3.0])
    allowance = rounding_allowance(ours, eps)
    assert (allowance > 0).all() and (allowance < 1e-9).all()
    np.testing.assert_allclose(delta_of(ours, eps) - allowance, theirs.get_delta_for_epsilon(eps),
                               rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize("w,z", [(0.01, 1.0), (0.3, 0.7), (1.0, 1.5)])
def test_connect_the_dots_matches_dp_accounting(w, z):
    # Our discretisation against dp_accounting's public one on the same δ values: the
    # masses (read through its public δ(ε)) agree at and between grid points.
    deltas = hockey_stick(np.arange(400) * COARSE, w, 2.0 / z)
    ours = connect_the_dots(deltas, 0, COARSE)
    theirs = pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(COARSE, 0, 399, deltas)
    eps = np.array([-0.5, 0.0, 0.0004, 0.1, 0.2315, 0.399, 0.5])
    np.testing.assert_allclose(delta_of(ours, eps), theirs.get_delta_for_epsilon(eps), rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("w,z", [(0.01, 1.0), (0.2, 0.6), (1.0, 2.0)])
def test_add_and_remove_pairs_match_dp_accounting(w, z):
    # The two pairs built from our closed forms against dp_accounting's own
    # Poisson-subsampled Gaussian (its public PrivacyLossDistribution.get_delta_for_epsilon
    # is the max of its two pairs); and each of our pairs against quadrature.
    remove, add = AddRemove().one_step(w, z, COARSE)
    theirs = pld_lib.from_gaussian_mechanism(z, sampling_prob=w, value_discretization_interval=COARSE)
    eps = np.array([0.0, 0.01, 0.3, 1.0, 2.5])
    ours = np.maximum(delta_of(remove, eps), delta_of(add, eps))
    np.testing.assert_allclose(ours, theirs.get_delta_for_epsilon(eps), rtol=1e-9, atol=1e-15)
    for e in [0.05, 0.3]:
        assert delta_of(remove, np.array([e]))[0] == pytest.approx(pair_delta(e, w, z, 1.0), rel=1e-3, abs=1e-12)
        assert delta_of(add, np.array([e]))[0] == pytest.approx(
            pair_delta(e, w, z, 1.0, reverse=True), rel=1e-3, abs=1e-12)


def test_add_remove_matches_dp_accounting_pld_accountant():
    q, z, steps = 0.01, 1.1, 2000
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=acc.DEFAULT_RESOLUTION)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    want = accountant.get_epsilon(1e-5)
    got = acc.epsilon(z, steps, 1e-5, sampling=PoissonSampling(rate=q), relation=AddRemove())
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("w,z,steps", [(0.01, 1.0, 1000), (0.0146 * 1e-3, 1.0, 10 ** 5), (0.1, 4.0, 100), (0.5, 2.0, 10)])
def test_rdp_is_never_below_pld(w, z, steps):
    # Sanity check, not a proof (patchdp/interop.py: the switching pair's Rényi divergence
    # exceeds the remove pair's). dp_accounting's RDP for the Poisson-subsampled Gaussian
    # bounds the pair (1-w)N(0,σ²)+wN(1,σ²) vs N(0,σ²) in sensitivity-1 units; our pair
    # has sensitivity Δ = 2 in units of C, i.e. noise multiplier σ = z / 2 there. (Its
    # REPLACE_ONE relation would instead mean sensitivity 2 with σ = z, another scaling.)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(dp_accounting.PoissonSampledDpEvent(w, dp_accounting.GaussianDpEvent(z / 2)), steps)
    ours = acc.epsilon(z, steps, 1e-5, sampling=PoissonSampling(rate=w), relation=ImageLevel())
    assert 0 < ours <= rdp.get_epsilon(1e-5)


def test_patch_level_is_image_level_at_rate_q_times_p():
    sampling = FixedSizeSampling(batch_size=100, dataset_size=10 ** 5)
    patch = acc.epsilon(1.0, 1000, 1e-5, sampling=sampling, relation=PatchLevel(0.0146), resolution=COARSE)
    same = acc.epsilon(1.0, 1000, 1e-5, sampling=PoissonSampling(rate=1e-3 * 0.0146), relation=ImageLevel(), resolution=COARSE)
    image = acc.epsilon(1.0, 1000, 1e-5, sampling=sampling, relation=ImageLevel(), resolution=COARSE)
    assert patch == same
    assert patch < image / 5


def test_monotone_in_noise_steps_and_rate():
    s = PoissonSampling(rate=0.01)
    e = lambda z=1.0, t=500, w=0.3: acc.epsilon(z, t, 1e-5, sampling=s, relation=PatchLevel(w), resolution=COARSE)
    base = e()
    assert e(z=1.2) < base < e(z=0.8)
    assert e(t=400) < base < e(t=600)
    assert e(w=0.2) < base < e(w=0.4)


def test_profile_is_decreasing_and_consistent_with_epsilon():
    kw = dict(sampling=FixedSizeSampling(batch_size=64, dataset_size=6000), relation=PatchLevel(0.1))
    eps_grid = np.linspace(0, 5, 26)
    prof = acc.privacy_profile(1.0, 2000, eps_grid, **kw)
    assert (np.diff(prof) <= 1e-15).all()
    e = acc.epsilon(1.0, 2000, 1e-6, **kw)
    assert acc.delta(1.0, 2000, e, **kw) <= 1e-6 * (1 + 1e-9)
    assert acc.delta(1.0, 2000, e * 0.99, **kw) > 1e-6


# ------------------------------------------------------------------ calibration, budgets

def test_calibrate_noise_is_the_smallest_sufficient_noise():
    kw = dict(sampling=FixedSizeSampling(batch_size=200, dataset_size=2975), relation=PatchLevel(0.329))
    z = acc.calibrate_noise(4.0, 1e-5, 300, **kw)
    assert acc.epsilon(z, 300, 1e-5, **kw) <= 4.0
    assert acc.epsilon(z * (1 - 2e-3), 300, 1e-5, **kw) > 4.0


def test_calibration_patch_needs_less_noise_than_image():
    s = FixedSizeSampling(batch_size=100, dataset_size=10 ** 5)
    z_patch = acc.calibrate_noise(1.0, 1e-5, 1000, sampling=s, relation=PatchLevel(0.0146), resolution=COARSE)
    z_image = acc.calibrate_noise(1.0, 1e-5, 1000, sampling=s, relation=ImageLevel(), resolution=COARSE)
    assert z_patch < z_image


def test_max_steps():
    kw = dict(sampling=PoissonSampling(rate=0.02), relation=PatchLevel(0.2), resolution=COARSE)
    t = acc.max_steps(1.0, 2.0, 1e-5, **kw)
    assert t > 0
    assert acc.epsilon(1.0, t, 1e-5, **kw) <= 2.0 < acc.epsilon(1.0, t + 1, 1e-5, **kw)
    assert acc.max_steps(0.3, 0.01, 1e-5, **kw) == 0


def test_ledger_composes_runs_and_answers_budget_questions():
    # A 1x1 crop of a 2x2 image hits a 1x1 patch with p* = 1/4 exactly: w = 0.01 · 1/4.
    mechanism = DPSGD(sampling=FixedSizeSampling(batch_size=50, dataset_size=5000), clip_norm=1.0,
                      noise_multiplier=1.0, delta=1e-5, crop=CropSpec(1), image_shape=(2, 2),
                      patch=Patch.rectangle(1), resolution=COARSE)
    kw = dict(sampling=mechanism.sampling, relation=PatchLevel(0.25), resolution=COARSE)
    assert mechanism.relation == kw["relation"]
    ledger = mechanism.ledger(budget_epsilon=6.0)
    assert ledger.epsilon() == 0.0
    ledger.step(300)
    assert ledger.epsilon() == pytest.approx(acc.epsilon(1.0, 300, 1e-5, **kw), rel=1e-12)
    for _ in range(5):
        ledger.step()
    assert ledger.steps == 305
    ledger.change_noise(2.0)
    ledger.step(100)
    assert ledger.runs == ((1.0, 305), (2.0, 100))
    # Two different noise levels: equals the composition done by hand.
    by_hand = compose(self_compose(ImageLevel().one_step(0.0025, 1.0, COARSE)[0], 305),
                      self_compose(ImageLevel().one_step(0.0025, 2.0, COARSE)[0], 100))
    assert ledger.epsilon() == pytest.approx(epsilon_of(by_hand, 1e-5), rel=1e-9)
    left = ledger.remaining_steps()
    assert left > 0
    more = Ledger.from_dict(json.loads(json.dumps(ledger.to_dict())), mechanism)
    assert more.epsilon() == ledger.epsilon() and more.steps == ledger.steps
    assert more.mechanism.noise_multiplier == 2.0  # the saved latest z, not the given mechanism's
    more.step(left)
    assert more.epsilon() <= 6.0 and not more.can_step()
    more.step()
    assert more.epsilon() > 6.0


def test_no_noise_means_no_privacy():
    # z = 0 is a valid mechanism (a debugging run) whose honest ε is ∞ and δ(ε) = 1.
    kw = dict(sampling=PoissonSampling(rate=0.1), relation=ImageLevel(), resolution=COARSE)
    assert acc.epsilon(0, 10, 1e-5, **kw) == math.inf
    assert (acc.privacy_profile(0.0, 10, [0.0, 5.0], **kw) == 1.0).all()
    assert acc.max_steps(0.0, 1.0, 1e-5, **kw) == 0


@pytest.mark.parametrize("call,match", [
    (lambda: acc.epsilon(-1, 10, 1e-5, sampling=PoissonSampling(rate=0.1), relation=ImageLevel()), "noise_multiplier"),
    (lambda: acc.epsilon(math.nan, 10, 1e-5, sampling=PoissonSampling(rate=0.1), relation=ImageLevel()), "noise_multiplier"),
    (lambda: acc.epsilon(1, 0, 1e-5, sampling=PoissonSampling(rate=0.1), relation=ImageLevel()), "steps"),
    (lambda: acc.epsilon(1, 10, 1.0, sampling=PoissonSampling(rate=0.1), relation=ImageLevel()), "delta"),
    (lambda: acc.epsilon(1, 10, 0.0, sampling=PoissonSampling(rate=0.1), relation=ImageLevel()), "delta"),
    (lambda: acc.epsilon(1, 10.5, 1e-5, sampling=PoissonSampling(rate=0.1), relation=ImageLevel()), "steps"),
    (lambda: PoissonSampling(rate=0.0), r"\(0, 1\]"),
    (lambda: PoissonSampling(rate=1.5), r"\(0, 1\]"),
    (lambda: FixedSizeSampling(batch_size=10, dataset_size=5), "exceeds"),
    (lambda: PatchLevel(0.0), "inclusion probability"),
    (lambda: acc.calibrate_noise(-1, 1e-5, 10, sampling=PoissonSampling(rate=0.1), relation=ImageLevel()), "epsilon"),
    (lambda: acc.calibrate_noise(1e-4, 1e-12, 10 ** 5, sampling=PoissonSampling(rate=1.0), relation=ImageLevel(),
                                 max_noise=10.0), "unreachable"),
    (lambda: acc.epsilon(1, 10, 1e-5, sampling=FixedSizeSampling(batch_size=10, dataset_size=100), relation=AddRemove()), "Poisson"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------ comparators

def test_gaussian_augmentation_rate_is_total_variation():
    aug = GaussianAugmentation(noise_std=30.0, patch_sensitivity=50.0)
    f = lambda x: abs(stats.norm.pdf(x, 0, 30) - stats.norm.pdf(x, 50, 30)) / 2
    tv = integrate.quad(f, -400, 450, points=[25], epsabs=1e-13)[0]
    assert aug.amplification == pytest.approx(tv, rel=1e-9)
    assert acc.effective_sampling_rate(PoissonSampling(rate=0.1), aug) == pytest.approx(0.1 * tv)


def test_data_level_noise_is_a_gaussian_mechanism_on_pixels():
    got = acc.data_level_noise_profile([1.0], noise_std=255.0, patch_area=4, channels=3)
    mu = math.sqrt(12) * 255 / 255.0
    assert got[0] == pytest.approx(acc.gaussian_mechanism_delta(1.0, mu))


# ------------------------------------------------------------------ floating point

@pytest.mark.parametrize("z", [1.0, 4.0, 10.0, 30.0])
@pytest.mark.parametrize("steps", [10 ** 3, 10 ** 4, 10 ** 5])
def test_epsilon_is_never_below_the_exact_gaussian_composition(z, steps):
    # w = 1: T steps compose exactly to the Gaussian mechanism with μ = 2·sqrt(T)/z. Far
    # tails are where FFT rounding used to put ε *below* the truth (on an AVX-512 EPYC at
    # δ = 1e-8 and 1e-10): ε must be ≥ the closed form at every δ (inf allowed below the
    # numerical floor) and tight at δ = 1e-5. The grid is coarsened with μ so that every
    # case fits ~10^6 points; the bound holds at any resolution.
    mu = 2 * math.sqrt(steps) / z
    resolution = min(max(mu / 4e4, 1e-4), 0.1)
    kw = dict(sampling=PoissonSampling(rate=1.0), relation=ImageLevel(), resolution=resolution)
    for delta in [1e-5, 1e-8, 1e-10]:
        got = acc.epsilon(z, steps, delta, **kw)
        want = acc.gaussian_mechanism_epsilon(mu, delta)
        assert got >= want, (delta, got, want)
        if delta == 1e-5:
            assert got <= want * (1 + 1e-3) + 10 * resolution


def exact_convolution_power(masses: list[int], times: int) -> list[int]:
    """The `times`-fold self-convolution of non-negative integers, exactly, by Kronecker
    substitution: pack the vector into one integer, raise it to the power, unpack."""
    slot = (times * sum(masses).bit_length() + 8) // 8 * 8  # each result ≤ (Σ masses)^times
    packed = sum(m << (slot * i) for i, m in enumerate(masses))
    raw = (packed ** times).to_bytes((len(masses) * times * slot) // 8 + 1, "little")
    width = slot // 8
    return [int.from_bytes(raw[i * width:(i + 1) * width], "little") for i in range((len(masses) - 1) * times + 1)]


def exact_minus(numerators, denominator: int, floats: np.ndarray) -> np.ndarray:
    """(numerators / denominator − floats), each rounded once to float64 at the end."""
    out = []
    for n, f in zip(numerators, floats):
        num, den = float(f).as_integer_ratio()
        out.append((n * den - num * denominator) / (denominator * den))
    return np.array(out)


@pytest.mark.parametrize("w,z,steps", [(0.05, 1.0, 32), (0.3, 2.0, 24), (1.0, 3.0, 16)])
def test_fft_composition_is_dominated_by_its_error_bounds_in_exact_arithmetic(w, z, steps):
    # The float64 FFT composition against the same composition in exact integer
    # arithmetic: every exact mass is ≤ the float64 mass + error_max, and the whole error
    # vector has 2-norm ≤ error_l2 (module section "composition"). The float64 error is
    # not zero (else this test could not fail), and the bound is not absurdly loose.
    (one,) = ImageLevel().one_step(w, z, 0.1)  # a coarse grid keeps the exact part fast
    scale = 2 ** 52  # masses rounded to multiples of 2^-52 are exact in float64 and as integers
    rounded = np.round(np.maximum(one.probs, 0) * scale)
    first, last = np.flatnonzero(rounded)[[0, -1]]  # masses below 2^-53 round to 0: trim them
    ints = [int(v) for v in rounded[first:last + 1]]
    pld = one._replace(probs=np.asarray(ints, np.float64) / scale, offset=one.offset + int(first))
    got = self_compose(pld, steps)
    # Our FFT is circular over `size` points and read out from index lo: alias the exact
    # linear result the same way.
    lo, hi = acc.composition._support_bounds(pld, steps, acc.composition.TAIL_MASS)
    size = acc.composition._fft_length(max(hi - lo + 1, pld.probs.size), pld.step)
    circular = [0] * size
    for j, c in enumerate(exact_convolution_power(ints, steps)):
        circular[j % size] += c
    window = [circular[(lo + i) % size] for i in range(got.probs.size)]
    errors = exact_minus(window, scale ** steps, got.probs)
    assert got.offset == pld.offset * steps + lo
    assert 0 < np.abs(errors).max() <= got.error_max
    assert np.linalg.norm(errors) <= got.error_l2
    assert got.error_max < 1e4 * np.abs(errors).max()
    # Composition of two different PLDs, the first carrying its own rounding bounds.
    both = compose(got, pld)
    exact_both = np.convolve(np.array(window, dtype=object), np.array(ints, dtype=object))
    gaps = exact_minus(exact_both, scale ** (steps + 1), both.probs)
    assert np.abs(gaps).max() <= both.error_max
    assert np.linalg.norm(gaps) <= both.error_l2


def test_another_cpus_rounding_within_the_bounds_cannot_lower_delta():
    # A machine that rounds differently may return any masses within the error bounds
    # of ours (|d_l| ≤ error_max, ‖d‖₂ ≤ error_l2; the failure this guards against was
    # an AVX-512 EPYC whose errors were all of one sign). Take, for several ε, the most
    # harmful such masses: all bins above ε lowered as far as both bounds allow. Their
    # δ(ε), allowance included, must still bound the δ(ε) of ours without allowance.
    (one,) = ImageLevel().one_step(1.46e-5, 1.0, acc.DEFAULT_RESOLUTION)
    ours = self_compose(one, 10 ** 4)
    bare = ours._replace(error_max=0.0, error_l2=0.0)
    assert ours.error_max > 0 and ours.error_l2 > 0
    for eps in [0.0, 0.05, 0.2, 1.0, 3.0, 6.0]:
        above = ours.losses > eps
        drop = min(ours.error_max, ours.error_l2 / math.sqrt(above.sum()))
        lowest = ours._replace(probs=ours.probs - drop * above)
        got, want = delta_of(lowest, np.array([eps]))[0], delta_of(bare, np.array([eps]))[0]
        assert got >= want, (eps, got, want)
        assert epsilon_of(lowest, want * 1.5) >= epsilon_of(bare, want * 1.5)


def test_too_fine_a_grid_is_refused_quickly_with_the_resolution_that_fits():
    with pytest.raises(ValueError, match=r"use resolution >= \S+ nats"):
        acc.epsilon(1.0, 10 ** 8, 1e-5, sampling=FixedSizeSampling(batch_size=200, dataset_size=2975), relation=PatchLevel(0.33))


def test_numerical_floor_marks_where_the_rounding_allowance_dominates():
    kw = dict(sampling=FixedSizeSampling(batch_size=100, dataset_size=10 ** 5), relation=PatchLevel(0.0146))
    floor = acc.numerical_floor(1.0, 10 ** 4, **kw)
    assert 1e-15 < floor < 1e-8
    assert acc.epsilon(1.0, 10 ** 4, floor / 2, **kw) == math.inf
    assert math.isfinite(acc.epsilon(1.0, 10 ** 4, floor * 100, **kw))
    assert acc.numerical_floor(1.0, 1, **kw) <= 1e-20  # one step is not composed: no rounding
