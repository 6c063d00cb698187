"""One DP-SGD step's privacy loss distribution (PLD), in units of the clip norm C.

The layer below composition (:mod:`patchdp.accounting.composition`): closed-form privacy
profiles (hockey-stick divergences) of the dominating pairs of docs/method.md
("The switching substitution profile", "Add/remove, the convention of other libraries"),
turned into discrete PLDs by the pessimistic connect-the-dots discretisation of
Doroshenko et al. (2022), implemented here from its definition.

With noise std z (units of C), sensitivity Δ and μ = Δ/z, the pair is

    P = (1 − w)·N(0, 1) + w·N(μ, 1)  against  Q = N(0, 1),

with w the effective sampling rate. Every approximation rounds towards less privacy:
losses beyond the grid go to +∞, the lowest losses are lumped upwards, and the
discretisation is pessimistic between grid points.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from scipy import special

__all__ = ["PLD", "hockey_stick", "hockey_stick_add", "connect_the_dots", "switching_pld", "add_remove_plds",
           "substitution_step", "add_remove_step", "truncate", "no_privacy"]

_LOG_TAIL = -50.0          # per-step Gaussian tail mass (log) beyond the grid → ε = +∞
_MAX_HALF_GRID = 2 ** 21   # grid points per side; losses beyond go to +∞ (pessimistic)
_MAX_LOSS = 700.0          # largest grid loss (nats): e^ε overflows float64 near 709.8


class PLD(NamedTuple):
    """A discrete privacy loss distribution: mass ``probs[i]`` at loss
    (offset + i)·step, plus ``infinity_mass`` at +∞. A composed PLD's masses carry
    floating-point errors d bounded by ``error_max`` and ``error_l2``: the exact PLD is
    dominated by probs + |d|, and every query adds what d can add to δ."""

    probs: np.ndarray
    offset: int
    step: float
    infinity_mass: float
    error_max: float = 0.0   # bounds on the rounding error d of composed masses:
    error_l2: float = 0.0    # max |d_l| and ‖d‖₂ (see "composition")

    @property
    def losses(self) -> np.ndarray:
        return (self.offset + np.arange(self.probs.size)) * self.step


def no_privacy(step: float) -> PLD:
    """The PLD of a release without noise (z = 0): all mass at loss +∞, so δ(ε) = 1 and
    ε(δ) = ∞ for every δ < 1 (an upper bound; nothing smaller is claimed)."""
    return PLD(np.zeros(1), 0, step, 1.0)


def hockey_stick(eps: np.ndarray, rate: float, mu: float) -> np.ndarray:
    """H_{e^ε}(P‖Q) for P = (1 − w)N(0, 1) + wN(μ, 1), Q = N(0, 1), any real ε (the
    "remove" pair).

    The privacy loss is increasing in x, so H = P(x > x_ε) − e^ε Q(x > x_ε) with
    x_ε = (log((e^ε − 1 + w)/w) + μ²/2)/μ; evaluated in log space so tiny δ keep their
    relative precision.
    """
    eps = np.asarray(eps, dtype=np.float64)
    out = -np.expm1(eps)  # e^ε ≤ 1 − w: every outcome counts, H = 1 − e^ε
    shifted = np.expm1(eps) + rate
    live = shifted > 0
    s = shifted[live]
    x = (np.log(s / rate) + mu * mu / 2) / mu
    log_p = math.log(rate) + special.log_ndtr(mu - x)
    log_q = np.log(s) + special.log_ndtr(-x)
    # H = w·Φ̄(x − μ) − (e^ε − 1 + w)·Φ̄(x); the (1 − w)Φ̄(x) terms cancel exactly.
    out[live] = np.exp(log_p) * -np.expm1(np.minimum(log_q - log_p, 0.0))
    return np.clip(out, 0.0, 1.0)


def hockey_stick_add(eps: np.ndarray, rate: float, mu: float) -> np.ndarray:
    """H_{e^ε}(Q‖P) for the same P and Q, any real ε (the "add" pair).

    The loss log(Q/P)(x) = −log(1 − w + w·e^{μx − μ²/2}) ≤ −log(1 − w) decreases in x, so
    H = Q(x < x_ε) − e^ε P(x < x_ε) = e^ε·(s·Φ(x_ε) − w·Φ(x_ε − μ)) with s = e^{−ε} − 1 + w
    and x_ε = (log(s/w) + μ²/2)/μ, and H = 0 where s ≤ 0; in log space as above.
    """
    eps = np.asarray(eps, dtype=np.float64)
    out = np.zeros(eps.shape)
    shifted = np.expm1(-eps) + rate
    live = shifted > 0
    s = shifted[live]
    x = (np.log(s / rate) + mu * mu / 2) / mu
    log_a = np.log(s) + special.log_ndtr(x)
    log_b = math.log(rate) + special.log_ndtr(x - mu)
    out[live] = np.exp(eps[live] + log_a) * -np.expm1(np.minimum(log_b - log_a, 0.0))
    return np.clip(out, 0.0, 1.0)


def _remove_loss(x: float, rate: float, mu: float) -> float:
    """log(P/Q)(x) of the remove pair, increasing in x (the add pair's loss is its negative)."""
    return float(np.logaddexp(math.log1p(-rate) if rate < 1 else -np.inf, math.log(rate) + mu * x - mu * mu / 2))


_TAIL_X = float(-special.ndtri(math.exp(_LOG_TAIL)))  # Φ̄(_TAIL_X) = e^_LOG_TAIL


def _loss_range(rate: float, mu: float) -> float:
    """A loss beyond which the remove pair has P-mass below e^_LOG_TAIL."""
    return _remove_loss(mu + _TAIL_X, rate, mu)



def connect_the_dots(deltas: np.ndarray, offset: int, step: float) -> PLD:
    """The pessimistic connect-the-dots PLD (Doroshenko et al. 2022, Algorithm 1) of a
    privacy profile given at the grid losses ε_i = (offset + i)·step, i = 0 … n − 1.

    Its δ(ε) equals the profile at every grid point and interpolates between them along
    the chord of e^ε ↦ δ, which lies above the (convex) true profile: masses, with
    d = step and Δδ_i = δ_{i+1} − δ_i,

        ε_1:            1 − δ_1 + Δδ_1/(e^d − 1)      (all lower losses lumped up here)
        ε_i, 1 < i < n: (Δδ_i − e^d·Δδ_{i−1})/(e^d − 1)
        ε_n:            Δδ_{n−1}/(e^{−d} − 1)
        +∞:             δ_n.

    Tiny negative masses from rounding are set to 0 (pessimistic).
    """
    deltas = np.minimum.accumulate(np.asarray(deltas, dtype=np.float64))  # a profile never rises
    if deltas.size < 2:
        raise ValueError("connect-the-dots needs at least two grid points.")
    diffs = np.diff(deltas)
    probs = np.empty(deltas.size)
    probs[0] = 1 - deltas[0] + diffs[0] / math.expm1(step)
    probs[1:-1] = (diffs[1:] - diffs[:-1] * math.exp(step)) / math.expm1(step)
    probs[-1] = diffs[-1] / math.expm1(-step)
    return PLD(np.maximum(probs, 0.0), offset, step, float(deltas[-1]))


def _grid(low: float, high: float, step: float) -> np.ndarray:
    """Grid indices covering the losses [low, high], clipped to ±_MAX_LOSS and to at most
    2·_MAX_HALF_GRID points (losses cut below are lumped up, above moved to +∞)."""
    top = int(math.ceil(min(high, _MAX_LOSS) / step))
    bottom = max(int(math.floor(max(low, -_MAX_LOSS) / step)), top - 2 * _MAX_HALF_GRID)
    return np.arange(min(bottom, top - 1), top + 1)


def switching_pld(rate: float, mu: float, step: float) -> PLD:
    """The switching substitution pair of docs/method.md ("Accounting") as one symmetric PLD.

    For ε ≥ 0 the profile is H_{e^ε}(P‖Q) of the remove pair; discretised by pessimistic
    connect-the-dots on the grid {0, step, …}. For ε < 0 it is the add pair,
    H_{e^ε}(Q‖P) = 1 − e^ε + e^ε H_{e^{−ε}}(P‖Q): the loss distribution of such a
    symmetric pair obeys ω(−l) = e^{−l} ω(l), so the negative half is the mirror image of
    the positive half, and the atom at 0 takes the remaining mass. (Building the negative
    half from δ values instead would difference numbers near 1 − e^ε and spray ~1e-12 of
    phantom mass on every grid point.)
    """
    half = min(int(math.ceil(min(_loss_range(rate, mu), _MAX_LOSS) / step)) + 1, _MAX_HALF_GRID)
    positive = connect_the_dots(hockey_stick(np.arange(half + 1) * step, rate, mu), 0, step)
    above = positive.probs[1:]
    mirrored = (above * np.exp(-np.arange(1, half + 1) * step))[::-1]
    zero = 1.0 - positive.infinity_mass - above.sum() - mirrored.sum()
    if zero < -1e-6:  # connect-the-dots rounding leaves ~1e-9; more would be a bug
        raise ArithmeticError(f"inconsistent switching PLD (atom at 0 is {zero}); please report.")
    probs = np.concatenate([mirrored, [max(zero, 0.0)], above])
    # Trim only the e^_LOG_TAIL-scale tails here: this PLD is composed up to ~1e5 times.
    return truncate(PLD(probs, -half, step, positive.infinity_mass), math.exp(_LOG_TAIL))


def add_remove_plds(rate: float, mu: float, step: float) -> tuple[PLD, PLD]:
    """The remove pair (P against Q) and the add pair (Q against P) as two PLDs, each by
    pessimistic connect-the-dots of its closed-form profile over the losses that carry
    all but e^_LOG_TAIL of its upper distribution's mass (what dp_accounting builds for
    a Poisson-subsampled Gaussian with use_connect_dots=True)."""
    remove = _grid(_remove_loss(-_TAIL_X, rate, mu), _remove_loss(mu + _TAIL_X, rate, mu), step)
    add = _grid(-_remove_loss(_TAIL_X, rate, mu), -_remove_loss(-_TAIL_X, rate, mu), step)
    return (connect_the_dots(hockey_stick(remove * step, rate, mu), int(remove[0]), step),
            connect_the_dots(hockey_stick_add(add * step, rate, mu), int(add[0]), step))


@functools.lru_cache(maxsize=8)
def substitution_step(rate: float, noise_multiplier: float, step: float) -> tuple[PLD]:
    """One step under a substitution relation: the switching pair with Δ = 2 (units of C)
    at effective sampling rate w = ``rate``, as one symmetric PLD on the grid ``step``."""
    return (switching_pld(rate, 2.0 / noise_multiplier, step),)


@functools.lru_cache(maxsize=8)
def add_remove_step(rate: float, noise_multiplier: float, step: float) -> tuple[PLD, PLD]:
    """One step under add/remove: the Poisson-subsampled Gaussian with Δ = 1, its remove
    and add pairs as two PLDs (δ of a composition is the max over the two)."""
    return add_remove_plds(rate, 1.0 / noise_multiplier, step)


def truncate(pld: PLD, tail: float) -> PLD:
    """Drops ≤ tail/2 of mass from each end, pessimistically: the low end is lumped into
    the first kept loss (moved up), the high end goes to +∞. For exact PLDs only."""
    probs = np.maximum(pld.probs, 0.0)
    low = np.cumsum(probs)
    first = int(np.searchsorted(low, tail / 2, side="right"))
    high = np.cumsum(probs[::-1])
    last = probs.size - int(np.searchsorted(high, tail / 2, side="right"))
    first = min(first, last - 1)
    kept = probs[first:last].copy()
    kept[0] += low[first - 1] if first > 0 else 0.0
    dropped_high = high[probs.size - last - 1] if last < probs.size else 0.0
    return PLD(kept, pld.offset + first, pld.step, pld.infinity_mass + dropped_high)
