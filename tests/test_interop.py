"""patchdp's PLDs and events inside dp_accounting: never tighter than patchdp, close to it,
composable with other mechanisms; and the reason no substitution DpEvent is exported."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import integrate

from patchdp import accounting as acc
from patchdp import interop
from patchdp.accounting.loss import hockey_stick, hockey_stick_add
from patchdp.inclusion import CropSpec, Patch
from patchdp.mechanism import DPSGD
from patchdp.sampling import FixedSizeSampling, PoissonSampling

COARSE = 1e-3


def mechanism(z, resolution=COARSE, **fields) -> DPSGD:
    """The paper's setting (1000², crop 100, 10x10 patch, 100 of 10^5) unless ``fields`` say otherwise."""
    paper = dict(sampling=FixedSizeSampling(batch_size=100, dataset_size=10 ** 5), crop=CropSpec(100),
                 image_shape=(1000, 1000), patch=Patch.rectangle(10))
    return DPSGD(clip_norm=1.0, noise_multiplier=z, delta=1e-5, resolution=resolution, **{**paper, **fields})


ADD_REMOVE = dict(sampling=PoissonSampling(rate=0.02, dataset_size=10 ** 5), accounting="add_remove")


@pytest.mark.parametrize("fields", [{}, ADD_REMOVE])
def test_one_step_export_is_patchdps_pld(fields):
    # One step carries no rounding error: dp_accounting's δ(ε) of the export is ours.
    m = mechanism(0.8, **fields)
    exported = interop.privacy_loss_distribution(m, 1)
    eps = np.array([0.0, 0.0105, 0.2, 1.0, 3.0])
    np.testing.assert_allclose(exported.get_delta_for_epsilon(eps), m.privacy_profile(1, eps), rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("z,steps,resolution", [(1.0, 3000, acc.DEFAULT_RESOLUTION), (0.6, 500, COARSE)])
def test_composed_export_is_never_tighter_and_close(z, steps, resolution):
    m = mechanism(z, resolution)
    exported = interop.privacy_loss_distribution(m, steps)
    want = m.epsilon(steps)
    got = exported.get_epsilon_for_delta(1e-5)
    assert want <= got <= want * (1 + 1e-3)
    eps = np.array([0.0, 0.05, 0.3, 1.0])
    assert (exported.get_delta_for_epsilon(eps) >= m.privacy_profile(steps, eps)).all()


def test_composed_with_a_gaussian_in_dp_accounting_matches_the_closed_form():
    # Without subsampling the switching pair is the Gaussian mechanism with μ = 2/z, so T
    # steps then one more Gaussian release (μ = 1/σ) compose to μ² = 4T/z² + 1/σ² exactly.
    z, steps, sigma = 4.0, 200, 3.0
    ours = interop.privacy_loss_distribution(
        mechanism(z, sampling=PoissonSampling(rate=1.0, dataset_size=1000), accounting="image"), steps)
    other = pld_lib.from_gaussian_mechanism(sigma, value_discretization_interval=COARSE)
    got = ours.compose(other).get_epsilon_for_delta(1e-5)
    exact = acc.gaussian_mechanism_epsilon(math.sqrt(4 * steps / z ** 2 + 1 / sigma ** 2), 1e-5)
    assert exact <= got <= exact * (1 + 1e-2)
    assert got > ours.get_epsilon_for_delta(1e-5)  # the extra release costs privacy


def test_add_remove_event_is_the_mechanism():
    z, steps = 1.1, 500
    m = mechanism(z, acc.DEFAULT_RESOLUTION, sampling=PoissonSampling(rate=0.01, dataset_size=10 ** 5),
                  accounting="add_remove")
    event = interop.dp_event(m, steps)
    ours = m.epsilon(steps)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=acc.DEFAULT_RESOLUTION)
    assert pld.compose(event).get_epsilon(1e-5) == pytest.approx(ours, rel=1e-6)
    rdp = dp_accounting.rdp.RdpAccountant()
    assert rdp.compose(event).get_epsilon(1e-5) >= ours


def test_no_event_for_substitution_and_why():
    with pytest.raises(ValueError, match="privacy_loss_distribution"):
        interop.dp_event(mechanism(1.0), 100)
    # The natural candidate, PoissonSampled(w, Gaussian(z/2)), composes the remove and add
    # pairs separately in dp_accounting's PLD accountant: it reports LESS than the
    # switching pair, so it would overstate the privacy of patch-level training.
    w, z, steps = 0.1, 1.0, 100
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=COARSE)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(w, dp_accounting.GaussianDpEvent(z / 2)), steps)
    ours = mechanism(z, sampling=PoissonSampling(rate=w, dataset_size=10 ** 5), accounting="image").epsilon(steps)
    assert accountant.get_epsilon(1e-5) < 0.95 * ours


def test_switching_pair_renyi_moment_exceeds_the_remove_pairs():
    # The docstring's argument at α = 2: E_Q[(dP/dQ)²] = 1 + w²(e^{μ²} − 1) for the remove
    # pair (what RDP accountants use); the switching pair's, ∫ 2·H_γ dγ over its profile,
    # is larger by 2∫₁^∞ β^{-3}(δ_r − δ_a)(log β) dβ > 0. Both by quadrature here.
    w, mu = 0.1, 2.0

    def profile(gamma, pair):
        return float(pair(np.array([math.log(gamma)]), w, mu)[0])

    def moment(low_pair):  # ∫₀^∞ 2·H_γ dγ with H_γ from `low_pair` below γ = 1, remove above
        below = integrate.quad(lambda g: 2 * profile(g, low_pair), 0, 1, epsabs=1e-12)[0]
        above = integrate.quad(lambda g: 2 * profile(g, hockey_stick), 1, np.inf, epsabs=1e-12, limit=200)[0]
        return below + above

    remove = moment(hockey_stick)
    assert remove == pytest.approx(1 + w ** 2 * math.expm1(mu ** 2), rel=1e-6)
    assert moment(hockey_stick_add) > remove * (1 + 1e-3)
