"""patchdp's guarantee as ``dp_accounting`` objects, to compose with other mechanisms.

:func:`privacy_loss_distribution` exports the tight privacy loss distribution (PLD) that
:mod:`patchdp.accounting` computes, per step (``steps=1``) or composed over a run, as a
``dp_accounting.pld.PrivacyLossDistribution`` built with public constructors only::

    pld = interop.privacy_loss_distribution(mechanism, steps)   # mechanism: a patchdp.DPSGD
    total = pld.compose(other)          # e.g. a Gaussian release, same relation and grid
    total.get_epsilon_for_delta(1e-5)

The export is never tighter than patchdp's own answer: a single step's connect-the-dots
PLD is exported as it is (it has no rounding error), and a composed PLD's FFT rounding
allowance (:mod:`patchdp.accounting.composition`) is carried pessimistically
as extra mass at ε = +∞ (see :func:`_to_pmf`). To compose in dp_accounting, every PLD
must use the same grid: pass ``value_discretization_interval=resolution`` to its
constructors (the mechanism's ``resolution``). Every mechanism composed with it must be
analysed under the same neighbour relation (for patch level: one image changing inside one patch region).

DpEvent. For add/remove accounting (``DPSGD(accounting="add_remove")``: Poisson sampling
at rate q, add or remove one example), :func:`dp_event` returns the standard event
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), T)``: that IS the
mechanism, so dp_accounting's RDP and PLD accountants bound it by their own proofs.

For the substitution relations (:class:`~patchdp.accounting.PatchLevel`,
:class:`~patchdp.accounting.ImageLevel`) no standard event is exported: we know of none
that keeps the amplification and provably bounds the mechanism. The natural candidate is
``PoissonSampledDpEvent(w, GaussianDpEvent(z/2))`` with w = q·p*: in units of 2C its
"remove" pair (1 − w)N(0, (z/2)²) + wN(1, (z/2)²) against N(0, (z/2)²) is the switching
pair's remove branch exactly. But the switching pair (docs/method.md, "The switching
substitution profile") has privacy profile δ_sw(ε) = δ_r(ε) for ε ≥ 0 and δ_a(ε) for
ε < 0 (r: remove pair, a: add pair), i.e. δ_sw = max(δ_r, δ_a) pointwise (δ_r ≥ δ_a for
ε ≥ 0, Zhu et al. 2022; for ε < 0 this follows from H_{e^ε}(A‖B) = 1 − e^ε +
e^ε·H_{e^{−ε}}(B‖A)), and

- dp_accounting's PLD accountant composes the remove and add pairs separately and
  reports max(δ_r^{⊗T}, δ_a^{⊗T}); since δ_sw dominates both pairs, δ_sw^{⊗T} ≥ each, so
  that number can be *below* the switching pair's (tests/test_interop.py shows it is);
- its RDP accountant reports D_α of the remove pair. Writing a pair's Rényi moment
  through its profile, E_Q[(dP/dQ)^α] = ∫₀^∞ α(α − 1)γ^{α−2} H_γ(P‖Q) dγ (H_γ the
  hockey-stick divergence, ε = log γ), the switching pair's moment exceeds the remove
  pair's by ∫₁^∞ α(α − 1)β^{−α−1}(δ_r − δ_a)(log β) dβ > 0 (for 0 < w < 1: the add
  pair's losses stay below −log(1 − w), so δ_a = 0 < δ_r above it). So the RDP of the
  remove pair does not bound the dominating pair that patchdp's proof goes through;
  whether it bounds the patch-level mechanism itself is not established, and
  tests/test_accounting.py only observes that its ε stays above ours.

The one standard event that provably bounds a step without further argument is
``GaussianDpEvent(z/2)`` (sensitivity 2C, no sampling, no cropping), which forgets all
amplification; we do not export it. Use :func:`privacy_loss_distribution` instead.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from patchdp import _validation
from patchdp.accounting import queries
from patchdp.accounting.loss import PLD
from patchdp.accounting.relations import AddRemove
from patchdp.mechanism import DPSGD

__all__ = ["privacy_loss_distribution", "dp_event"]


def _to_pmf(pld: PLD) -> pld_pmf.PLDPmf:
    """One of patchdp's PLDs as a dp_accounting PLDPmf that dominates it.

    The exact composed masses are probs − d with |d_l| ≤ error_max and ‖d‖₂ ≤ error_l2,
    so they are at most max(probs, 0) + |d| pointwise. Moving mass to a higher loss never
    lowers δ(ε) for any ε, before or after composing with any other PLD, so placing
    ‖d‖₁ ≤ min(n·error_max, √n·error_l2) at +∞ gives a PLD whose δ(ε) is at least
    patchdp's (which adds min(error_max·C(ε), error_l2·√C(ε)) with C(ε) < n) and which
    stays an upper bound under composition.
    """
    probs = np.maximum(pld.probs, 0.0)
    n = probs.size
    rounding = min(n * pld.error_max, math.sqrt(n) * pld.error_l2)
    masses = {int(pld.offset + i): float(probs[i]) for i in np.flatnonzero(probs)}
    return pld_pmf.create_pmf(masses, pld.step, min(pld.infinity_mass + rounding, 1.0),
                              pessimistic_estimate=True)


def privacy_loss_distribution(mechanism: DPSGD, steps: int = 1) -> pld_lib.PrivacyLossDistribution:
    """The PLD of ``steps`` steps of ``mechanism`` under its accounting, as a
    ``dp_accounting.pld.PrivacyLossDistribution`` on the mechanism's grid (spacing
    ``mechanism.resolution`` nats).

    Substitution relations give a symmetric PLD (the switching pair's one profile, whose
    negative losses are the add branch); add/remove gives the remove and add pairs. Its
    ``get_epsilon_for_delta`` is ≥ ``mechanism.epsilon(steps)`` and its
    ``get_delta_for_epsilon`` ≥ the mechanism's δ(ε) (equal for one step; above by at
    most the numerical floor for a composition).
    """
    plds = queries.composed(mechanism.noise_multiplier, steps, mechanism.sampling, mechanism.relation,
                            mechanism.resolution)
    return pld_lib.PrivacyLossDistribution(*map(_to_pmf, plds))


def dp_event(mechanism: DPSGD, steps: int) -> dp_accounting.DpEvent:
    """The dp_accounting event of ``steps`` steps of ``mechanism``, for add/remove
    accounting with Poisson sampling only (see the module docstring for why the
    substitution relations have none: use :func:`privacy_loss_distribution` for them)."""
    if not isinstance(mechanism.relation, AddRemove):
        raise ValueError(
            f"no standard DpEvent provably bounds {type(mechanism.relation).__name__} (the switching substitution "
            "pair; see patchdp.interop's docstring): use interop.privacy_loss_distribution(...) and "
            "compose it in dp_accounting instead.")
    steps = _validation.integer("steps", steps)
    event = dp_accounting.PoissonSampledDpEvent(mechanism.effective_sampling_rate,
                                                dp_accounting.GaussianDpEvent(mechanism.noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(event, steps)
