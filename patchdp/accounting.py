"""Privacy accounting for DP-SGD with patch-level privacy amplified by random cropping.

One step of DP-SGD adds N(0, (z·C)²) to the sum of per-example gradients clipped to norm
C. In units of C (noise std z, sensitivity Δ) the privacy of one step under the relations
below is that of a *dominating pair* of distributions on the real line (docs/method.md, "The switching substitution profile"):

- **patch** (:class:`PatchLevel`, the point of patchdp) and **image-level substitution**
  (:class:`ImageLevel`, the baseline): the protected image stays in the dataset and its
  clipped gradient can change by up to 2C only when it is sampled AND (patch level) one of
  its crops hits the patch. With effective sampling rate w = q·p* (w = q at image level)
  and Δ = 2, one step is dominated by (Zhu, Dong & Wang 2022)

      ε ≥ 0 ("remove" branch):  P = (1 − w)·N(0, z²) + w·N(Δ, z²)  against  Q = N(0, z²),
      ε < 0 ("add" branch):     Q against P,

  which together are ONE privacy profile δ(ε), i.e. one symmetric privacy loss
  distribution (PLD), composed T times.
- **add/remove** (:class:`AddRemove`, Poisson sampling only, Δ = 1): the Opacus /
  jax-privacy convention, composing the remove pair and the add pair separately and
  taking the larger δ, for comparing numbers with those libraries.

Numerics: each pair's profile is evaluated in closed form (Gaussian tails in log space)
on the grid ε_i = i·Δε, turned into a PLD with the pessimistic connect-the-dots
discretisation of Doroshenko et al. (2022) (implemented here from its definition; only
tests and :mod:`patchdp.interop` import ``dp_accounting``), self-composed with an
FFT, and queried for ε(δ) or δ(ε). Every approximation rounds towards *less* privacy:
the discretisation is pessimistic, truncated tails move to ε = +∞, the lowest losses
are lumped upwards, and the FFT's floating-point error, bounded a priori for any CPU
(section "composition"), is added to every δ. Tests cross-check against dp_accounting's
PLD code and its RDP accountant (the latter a sanity check, not a proof: see
:mod:`patchdp.interop` for why no standard DpEvent provably bounds the switching pair).

Units: ``noise_multiplier`` z is the noise std divided by the clip norm C; ``steps`` T is
the number of DP-SGD steps; ``delta`` δ ∈ (0, 1); ``epsilon`` ε > 0 in nats.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import NamedTuple, Sequence, Union

import numpy as np
from scipy import fft as sp_fft
from scipy import optimize, signal, special

from patchdp import _validation
from patchdp.sampling import FixedSizeSampling, PoissonSampling, Sampling

__all__ = [
    "FixedSizeSampling", "PoissonSampling", "PatchLevel", "ImageLevel", "AddRemove",
    "GaussianAugmentation", "effective_sampling_rate", "epsilon", "delta",
    "privacy_profile", "numerical_floor", "calibrate_noise", "max_steps", "Ledger",
    "gaussian_mechanism_delta", "gaussian_mechanism_epsilon", "data_level_noise_profile",
    "DEFAULT_RESOLUTION",
]

DEFAULT_RESOLUTION = 1e-4
"""Spacing Δε of the privacy-loss grid (nats). Smaller is tighter and slower."""

_LOG_TAIL = -50.0          # per-step Gaussian tail mass (log) beyond the grid → ε = +∞
_TAIL_MASS = 1e-15         # mass dropped (→ +∞, pessimistically) per composition
_MAX_HALF_GRID = 2 ** 21   # grid points per side; losses beyond go to +∞ (pessimistic)
_MAX_LOSS = 700.0          # largest grid loss (nats): e^ε overflows float64 near 709.8
_MIN_NOISE, _MAX_NOISE = 1e-100, 1e100  # noise multipliers whose μ = 2/z squares within float64


# =========================================================================== sampling


# FixedSizeSampling and PoissonSampling live in patchdp.sampling: one object per scheme
# gives both the host sampler and the rate q composed here. Re-exported from this module.




# =========================================================================== relations


@dataclasses.dataclass(frozen=True)
class PatchLevel:
    """Patch-level substitution (docs/method.md, "The patch relation"): one image changes inside one patch
    region; amplified by cropping with worst-case inclusion probability p*
    (:func:`patchdp.inclusion.inclusion_probability`). w = q·p*, Δ = 2."""

    inclusion_probability: float

    def __post_init__(self):
        object.__setattr__(self, "inclusion_probability",
                           _validation.rate("inclusion probability p*", self.inclusion_probability))

    @property
    def amplification(self) -> float:
        return self.inclusion_probability


@dataclasses.dataclass(frozen=True)
class ImageLevel:
    """Image-level substitution, standard DP-SGD (the paper's baseline): w = q, Δ = 2."""

    amplification = 1.0


@dataclasses.dataclass(frozen=True)
class GaussianAugmentation:
    """COMPARATOR, not a patchdp guarantee: amplification by Gaussian data augmentation.

    Each sampled image gets N(0, σ²) noise on every pixel; the patch changes the input by
    at most ``patch_sensitivity`` in L2 (e.g. sqrt(p_h·p_w·channels)·255), so the sampled
    example's input distributions differ in total variation by
    TV = 2Φ(sensitivity / 2σ) − 1, and w = q·TV: the two noisy inputs can be coupled to
    coincide with probability 1 − TV, so the example's gradient differs with probability
    at most TV. No credit is taken for crops. The trainer's ``accounting =
    "gaussian_augmentation"`` uses this relation alone, with the noise added before
    cropping (:func:`patchdp.training.gaussian_pixel_noise`).
    """

    noise_std: float
    patch_sensitivity: float

    def __post_init__(self):
        if not (self.noise_std > 0) or not (self.patch_sensitivity > 0):
            raise ValueError("GaussianAugmentation needs noise_std > 0 and patch_sensitivity > 0.")

    @property
    def amplification(self) -> float:
        return float(-special.expm1(special.log_ndtr(-self.patch_sensitivity / (2 * self.noise_std)) + math.log(2)))


@dataclasses.dataclass(frozen=True)
class AddRemove:
    """Add/remove one example with Poisson sampling (Opacus / jax-privacy convention):
    w = q, Δ = 1, remove and add pairs composed separately, the larger δ reported."""

    amplification = 1.0


Relation = Union[PatchLevel, ImageLevel, GaussianAugmentation, AddRemove]


def _check_setting(sampling, relation) -> None:
    """TypeError unless ``sampling`` and ``relation`` are the objects this module defines."""
    if not isinstance(sampling, (FixedSizeSampling, PoissonSampling)):
        raise TypeError(f"sampling must be FixedSizeSampling(batch_size=B, dataset_size=N) or "
                        f"PoissonSampling(rate=q, dataset_size=N), got {sampling!r}.")
    if not isinstance(relation, (PatchLevel, ImageLevel, GaussianAugmentation, AddRemove)):
        raise TypeError(f"relation must be PatchLevel(inclusion_probability), ImageLevel(), AddRemove() "
                        f"or GaussianAugmentation(...), got {relation!r}.")


def effective_sampling_rate(sampling: Sampling, relation: Relation) -> float:
    """w: the probability that a step's gradient depends on the protected content."""
    _check_setting(sampling, relation)
    if isinstance(relation, AddRemove) and not isinstance(sampling, PoissonSampling):
        raise ValueError("the add/remove relation is accounted for Poisson sampling only; "
                         "use PoissonSampling, or ImageLevel() for fixed-size batches.")
    return sampling.rate * relation.amplification


# =========================================================================== one step


def _hockey_stick(eps: np.ndarray, rate: float, mu: float) -> np.ndarray:
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


def _hockey_stick_add(eps: np.ndarray, rate: float, mu: float) -> np.ndarray:
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


class _PLD(NamedTuple):
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


def _connect_the_dots(deltas: np.ndarray, offset: int, step: float) -> _PLD:
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
    return _PLD(np.maximum(probs, 0.0), offset, step, float(deltas[-1]))


def _grid(low: float, high: float, step: float) -> np.ndarray:
    """Grid indices covering the losses [low, high], clipped to ±_MAX_LOSS and to at most
    2·_MAX_HALF_GRID points (losses cut below are lumped up, above moved to +∞)."""
    top = int(math.ceil(min(high, _MAX_LOSS) / step))
    bottom = max(int(math.floor(max(low, -_MAX_LOSS) / step)), top - 2 * _MAX_HALF_GRID)
    return np.arange(min(bottom, top - 1), top + 1)


def _switching_pld(rate: float, mu: float, step: float) -> _PLD:
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
    positive = _connect_the_dots(_hockey_stick(np.arange(half + 1) * step, rate, mu), 0, step)
    above = positive.probs[1:]
    mirrored = (above * np.exp(-np.arange(1, half + 1) * step))[::-1]
    zero = 1.0 - positive.infinity_mass - above.sum() - mirrored.sum()
    if zero < -1e-6:  # connect-the-dots rounding leaves ~1e-9; more would be a bug
        raise ArithmeticError(f"inconsistent switching PLD (atom at 0 is {zero}); please report.")
    probs = np.concatenate([mirrored, [max(zero, 0.0)], above])
    # Trim only the e^_LOG_TAIL-scale tails here: this PLD is composed up to ~1e5 times.
    return _truncate(_PLD(probs, -half, step, positive.infinity_mass), math.exp(_LOG_TAIL))


def _add_remove_plds(rate: float, mu: float, step: float) -> tuple[_PLD, _PLD]:
    """The remove pair (P against Q) and the add pair (Q against P) as two PLDs, each by
    pessimistic connect-the-dots of its closed-form profile over the losses that carry
    all but e^_LOG_TAIL of its upper distribution's mass (what dp_accounting builds for
    a Poisson-subsampled Gaussian with use_connect_dots=True)."""
    remove = _grid(_remove_loss(-_TAIL_X, rate, mu), _remove_loss(mu + _TAIL_X, rate, mu), step)
    add = _grid(-_remove_loss(_TAIL_X, rate, mu), -_remove_loss(-_TAIL_X, rate, mu), step)
    return (_connect_the_dots(_hockey_stick(remove * step, rate, mu), int(remove[0]), step),
            _connect_the_dots(_hockey_stick_add(add * step, rate, mu), int(add[0]), step))


@functools.lru_cache(maxsize=8)
def _single_step(kind: str, rate: float, noise_multiplier: float, step: float) -> tuple[_PLD, ...]:
    """The PLD(s) of one DP-SGD step in units of C; δ of a composition is the max over
    the tuple. Substitution relations: the switching pair with Δ = 2. Add/remove: the
    Poisson-subsampled Gaussian with Δ = 1, remove and add pairs separately."""
    if kind == "add_remove":
        return _add_remove_plds(rate, 1.0 / noise_multiplier, step)
    return (_switching_pld(rate, 2.0 / noise_multiplier, step),)


# =========================================================================== composition
#
# Floating-point error of the FFT composition (the derivation behind ``error_max`` and
# ``error_l2`` of every composed :class:`_PLD`). Notation: u = 2^-53 the unit roundoff,
# N the (5-smooth) FFT length, p the n grid masses of a PLD, X = DFT(p) its spectrum,
# computed values wear a hat.
#
# (F) One real FFT of length N. scipy.fft (pocketfft) factors N into radix-2, -3, -4 and -5
#     passes; every output is reached from every input along exactly one path of
#     butterflies, so the computed transform satisfies, componentwise and normwise,
#         |X̂_k − X_k| ≤ g(N)·‖p‖₁,      ‖ŷ − y‖₂ ≤ g(N)·‖y‖₂,
#     with g(N) = (1 + η)^L − 1 + 2u, L the binary levels of N (a radix-r pass counts
#     ⌈log₂ r⌉), and η = 8u the error of one level: Higham (2002, §24.1, Thm 24.2) has
#     η = μ + γ₄(√2 + μ) ≈ 5.7u + μ for radix 2 with twiddle factors accurate to μ ≤ u, and
#     pocketfft's radix-3/-4/-5 butterflies stay below 8u per level they count for. The
#     2u covers the 1/N scaling of the inverse. This is a worst-case bound: it holds for
#     any rounding order, vectorisation or FMA use, i.e. on any CPU and numpy/scipy build.
# (P) The T-th power by binary powering (only multiplications, never the libm ``cpow``
#     that ``**`` calls): a complex product has relative error ≤ m = √2·γ₂ (Higham
#     Lemma 3.5), and by induction x^a·x^b carries (1 + m)^(a+b−1), so
#         |pow(X̂_k) − X̂_k^T| ≤ ρ_T·|X̂_k|^T,   ρ_T = (1 + m)^(T−1) − 1.
#     The input error propagates as |X̂^T − X^T| ≤ T·max(|X̂|, |X|)^(T−1)·|X̂ − X| (from
#     a^T − b^T = (a − b)·Σ a^i b^(T−1−i)), with |X| ≤ |X̂| + e. A product of two spectra
#     (``_compose``) likewise: |âb̂(1+θ) − ab| ≤ m|â||b̂| + e_a|b̂| + (|â| + e_a)e_b.
# (I) The inverse transform of the computed spectrum ŝ, whose error against the exact
#     one is bounded per coefficient by σ_k (from (P)): by (F), linearity and Parseval,
#         max_j |ŷ_j − y_j| ≤ (Σ_k σ_k + g(N)·Σ_k |ŝ_k|) / N,
#         ‖ŷ − y‖₂        ≤ (‖σ‖₂ + g(N)·‖ŝ‖₂) / √N,
#     sums over all N coefficients (the Hermitian half counted twice).
# A PLD whose masses carry such errors d (|d_l| ≤ error_max, ‖d‖₂ ≤ error_l2) enters the
# next FFT with ‖d‖₁ ≤ min(n·error_max, √n·error_l2) added to e. The exact-arithmetic
# PLD is then dominated by probs + |d|, and δ(ε) gains at most
#     Σ_{l>ε} |d_l|(1 − e^{ε−l}) ≤ min(error_max·C(ε), error_l2·√C(ε)),  C(ε) = Σ_{l>ε} (1 − e^{ε−l}),
# (Hölder, and c² ≤ c for c ∈ [0, 1]), which every query adds: δ stays an upper bound.
# The bounds exceed the float64 errors measured against an 80-bit composition by
# 10²–10³ (tests/test_accounting.py); they cost < 1e-3 relative in ε at δ = 1e-5 and set
# a numerical floor (:func:`numerical_floor`) below which δ is a valid but loose bound.

_UNIT_ROUNDOFF = np.finfo(np.float64).eps / 2
_FFT_LEVEL_ERROR = 8 * _UNIT_ROUNDOFF                                       # η in (F)
_PRODUCT_ERROR = math.sqrt(2) * 2 * _UNIT_ROUNDOFF / (1 - 2 * _UNIT_ROUNDOFF)  # m in (P)
_UNDERFLOW = 4 * np.finfo(np.float64).smallest_subnormal  # absolute error of a product that underflows
_BOUND_SLACK = 1 + 1e-6  # covers the rounding in evaluating the bounds themselves
_MAX_GRID = 2 ** 25      # grid points of one composition (~2 GB of FFT buffers)


def _truncate(pld: _PLD, tail: float) -> _PLD:
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
    return _PLD(kept, pld.offset + first, pld.step, pld.infinity_mass + dropped_high)


def _support_bounds(pld: _PLD, times: int, tail: float) -> tuple[int, int]:
    """Grid-index range [lo, hi] (relative to times·offset) holding all but ≤ tail of the
    `times`-fold composition, by Chernoff bounds P(S ≥ s) ≤ E[e^{λS}] e^{−λs} at a fixed
    ladder of orders λ and at orders around the Gaussian optimum
    λ* ≈ sqrt(2 log(2/tail) / (T·Var L)); any λ gives a valid bound."""
    probs = np.maximum(pld.probs, 0.0)
    losses = pld.losses
    with np.errstate(divide="ignore"):
        log_p = np.log(probs)
    total = probs.sum()
    mean = float(probs @ losses) / total
    var = max(float(probs @ (losses - mean) ** 2) / total, pld.step ** 2)
    best = math.sqrt(2 * math.log(2 / tail) / (times * var))
    orders = np.concatenate([2.0 ** np.arange(-4, 7), best * 2.0 ** np.arange(-2, 3)])
    lo, hi = 0, (probs.size - 1) * times
    for sign in (1.0, -1.0):
        log_mgf = special.logsumexp(sign * orders[:, None] * losses[None, :] + log_p[None, :], axis=1)
        bound = sign * (times * log_mgf + math.log(2 / tail)) / orders  # in loss units
        index = bound / pld.step - times * pld.offset
        if sign > 0:
            hi = min(hi, int(math.ceil(np.min(index))))
        else:
            lo = max(lo, int(math.floor(np.max(index))))
    return lo, hi


def _fft_error(size: int) -> float:
    """g(N) of (F): the relative error bound of one real FFT of length ``size``."""
    levels, rest = 0, size
    for radix, cost in ((2, 1), (3, 2), (5, 3)):
        while rest % radix == 0:
            rest, levels = rest // radix, levels + cost
    if rest != 1:
        raise ArithmeticError(f"FFT length {size} is not 5-smooth; please report.")
    return math.expm1(levels * math.log1p(_FFT_LEVEL_ERROR)) + 2 * _UNIT_ROUNDOFF


def _fft_length(points: int, step: float) -> int:
    """A fast (5-smooth) FFT length ≥ ``points``, or a ValueError when the grid is too fine."""
    if points > _MAX_GRID:
        coarser = step * points / _MAX_GRID
        raise ValueError(f"the composed privacy loss distribution needs {points:,} grid points at resolution "
                         f"{step:g}, more than {_MAX_GRID:,}: use resolution >= {coarser:.2g} nats "
                         "(ε is then rounded up a little more), or fewer steps.")
    return sp_fft.next_fast_len(points, real=True)


def _spectrum(pld: _PLD, size: int) -> tuple[np.ndarray, float]:
    """The rFFT of the masses and a bound e on every coefficient's error against the
    exact DFT of the dominating masses probs + |d| (see (F) and the closing remark)."""
    n = pld.probs.size
    carried = min(n * pld.error_max, math.sqrt(n) * pld.error_l2)
    return sp_fft.rfft(pld.probs, size), _fft_error(size) * float(np.abs(pld.probs).sum()) + carried


def _power(x: np.ndarray, times: int) -> np.ndarray:
    """x**times elementwise by binary powering: multiplications only, error as in (P)."""
    result, base = None, x
    while True:
        if times & 1:
            result = base if result is None else result * base
        times >>= 1
        if not times:
            return result
        base = base * base


def _from_spectrum(spectrum: np.ndarray, spectrum_error: np.ndarray, size: int, window: tuple[int, int],
                   offset: int, step: float, infinity: float) -> _PLD:
    """The inverse rFFT read out over ``window`` = (first index, count), with the error
    bounds of (I). ``spectrum_error[k]`` bounds the error of coefficient k."""
    first, count = window
    raw = sp_fft.irfft(spectrum, size)
    probs = np.roll(raw, -first)[:count] if first else raw[:count]
    weights = np.full(spectrum.size, 2.0)  # the rFFT stores half of a Hermitian spectrum
    weights[0] = 1.0
    if size % 2 == 0:
        weights[-1] = 1.0
    magnitude, g = np.abs(spectrum), _fft_error(size)
    error_max = (weights @ spectrum_error + g * (weights @ magnitude)) / size
    error_l2 = (math.sqrt(weights @ spectrum_error ** 2) + g * math.sqrt(weights @ magnitude ** 2)) / math.sqrt(size)
    return _PLD(probs, offset, step, min(infinity, 1.0), _BOUND_SLACK * error_max, _BOUND_SLACK * error_l2)


def _self_compose(pld: _PLD, times: int) -> _PLD:
    """The `times`-fold composition: one real FFT raised to the power `times`, read out
    over a window that holds all but _TAIL_MASS of the mass (Chernoff bounds); the
    rounding error is bounded as derived above."""
    if times == 1:
        return pld
    lo, hi = _support_bounds(pld, times, _TAIL_MASS)
    size = _fft_length(max(hi - lo + 1, pld.probs.size), pld.step)
    x, e = _spectrum(pld, size)
    magnitude = np.abs(x)
    rho = math.expm1((times - 1) * math.log1p(_PRODUCT_ERROR))
    error = rho * magnitude ** times + times * (magnitude + e) ** (times - 1) * e + times * _UNDERFLOW
    # Circular convolution: index k holds all sums ≡ k (mod size); the window [lo, hi]
    # fits in one period, so rolling by lo reads it out. Mass outside the window
    # (≤ _TAIL_MASS) is counted at +∞; the part of it that aliases into the window only
    # adds mass there, which is pessimistic.
    infinity = -math.expm1(times * math.log1p(-pld.infinity_mass)) + _TAIL_MASS
    return _from_spectrum(_power(x, times), error, size, (lo, hi - lo + 1), pld.offset * times + lo,
                          pld.step, infinity)


def _compose(a: _PLD, b: _PLD) -> _PLD:
    """The PLD of the composition: the convolution of the two, by one real FFT, with the
    rounding error bounded as derived above."""
    if a.step != b.step:
        raise ValueError("cannot compose PLDs with different resolutions.")
    n = a.probs.size + b.probs.size - 1
    size = _fft_length(n, a.step)
    (xa, ea), (xb, eb) = _spectrum(a, size), _spectrum(b, size)
    ma, mb = np.abs(xa), np.abs(xb)
    error = _PRODUCT_ERROR * ma * mb + ea * mb + (ma + ea) * eb + _UNDERFLOW
    infinity = 1 - (1 - a.infinity_mass) * (1 - b.infinity_mass)
    return _from_spectrum(xa * xb, error, size, (0, n), a.offset + b.offset, a.step, infinity)


def _tail_sums(pld: _PLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Suffix sums from the top loss down, for δ(ε) = upper − e^ε·Σ_{l ≥ ·} p_l e^{−l}:

      upper[j]  = P(L = ∞) + Σ_{i ≥ j} p_i
      scaled[j] = Σ_{i ≥ j} p_i e^{−(l_i − l_j)}   (≤ upper: no overflow at any loss)

    ``scaled`` follows the recursion scaled[j] = p_j + e^{−step}·scaled[j + 1].
    """
    probs = np.maximum(pld.probs, 0.0)
    upper = np.cumsum(probs[::-1])[::-1] + pld.infinity_mass
    scaled = signal.lfilter([1.0], [1.0, -math.exp(-pld.step)], probs[::-1])[::-1]
    return pld.losses, upper, scaled


def _rounding_allowance(pld: _PLD, epsilons: np.ndarray) -> np.ndarray:
    """The most the rounding errors d can add to δ(ε): min(error_max·C, error_l2·√C)
    with C(ε) = Σ_{l>ε} (1 − e^{ε−l}) over the grid (a geometric sum), see above."""
    epsilons = np.asarray(epsilons, dtype=np.float64)
    if pld.error_max == 0 and pld.error_l2 == 0:
        return np.zeros(epsilons.shape)
    losses = pld.losses
    first = np.searchsorted(losses, epsilons, side="right")  # first loss > ε
    count = losses.size - first
    above = np.minimum(first, losses.size - 1)
    geometric = -np.expm1(-count * pld.step) / -math.expm1(-pld.step)  # Σ_{i<count} e^{−i·step}
    below = np.minimum(epsilons - losses[above], 0.0)  # ≤ 0 wherever count > 0; no overflow elsewhere
    c = np.where(count > 0, count - np.exp(below) * geometric, 0.0)
    c = np.maximum(c, 0.0) * _BOUND_SLACK + 1e-6  # + its own absolute rounding (≪ 1e-6)
    return np.minimum(pld.error_max * c, pld.error_l2 * np.sqrt(c))


def _delta_of(pld: _PLD, epsilons: np.ndarray) -> np.ndarray:
    """δ(ε) = P(L = ∞) + Σ_{l > ε} p_l (1 − e^{ε − l}) for each ε, plus the rounding
    allowance of a composed PLD."""
    losses, upper, scaled = _tail_sums(pld)
    idx = np.searchsorted(losses, epsilons, side="right")  # first loss > ε
    inside = idx < losses.size
    out = np.full(np.shape(epsilons), pld.infinity_mass, dtype=np.float64)
    j = idx[inside]
    out[inside] = upper[j] - np.exp(np.asarray(epsilons)[inside] - losses[j]) * scaled[j]
    return np.clip(out + _rounding_allowance(pld, epsilons), 0.0, 1.0)


def _epsilon_of(pld: _PLD, target_delta: float) -> float:
    """Smallest ε ≥ 0 whose δ(ε), rounding allowance included, is ≤ target_delta
    (math.inf if none: δ below the numerical floor or the mass at +∞).

    The allowance A(ε) decreases in ε, so with ε₀ the answer without it, the answer for
    target_delta − A(ε₀) satisfies δ + A ≤ target_delta (it is ≥ ε₀, where A ≤ A(ε₀)).
    """
    first = _epsilon_of_masses(pld, target_delta)
    if math.isinf(first):
        return first
    allowance = float(_rounding_allowance(pld, np.array([first]))[0])
    return first if allowance == 0 else _epsilon_of_masses(pld, target_delta - allowance)


def _epsilon_of_masses(pld: _PLD, target_delta: float) -> float:
    """Smallest ε ≥ 0 with P(L = ∞) + Σ_{l > ε} p_l (1 − e^{ε − l}) ≤ target_delta."""
    if not pld.infinity_mass <= target_delta:
        return math.inf
    losses, upper, scaled = _tail_sums(pld)
    # δ at grid loss l_j counts the losses above it: e^{l_j}Σ_{i>j} p_i e^{−l_i} = e^{−step}·scaled[j+1].
    at_grid = np.append(upper[1:], pld.infinity_mass) - math.exp(-pld.step) * np.append(scaled[1:], 0.0)
    j = int(np.argmax(at_grid <= target_delta))
    if not at_grid[j] <= target_delta:
        raise ArithmeticError("ε search found no grid loss with δ ≤ target; please report.")
    # On [l_{j−1}, l_j) the losses ≥ l_j count: δ(ε) = upper[j] − e^{ε − l_j}·scaled[j].
    floor = losses[j - 1] if j > 0 else -math.inf
    if scaled[j] > 0 and upper[j] > target_delta:
        eps = min(max(losses[j] + math.log((upper[j] - target_delta) / scaled[j]), floor), losses[j])
    else:
        eps = floor
    return max(0.0, eps)


# =========================================================================== public API


def _kind(relation: Relation) -> str:
    return "add_remove" if isinstance(relation, AddRemove) else "substitution"


def _check_noise(value) -> float:
    """z > 0, within [_MIN_NOISE, _MAX_NOISE], where one step's losses stay in float64 range."""
    z = _validation.number("noise_multiplier z (noise std / clip norm)", value, 0, math.inf, low_open=True)
    if not _MIN_NOISE <= z <= _MAX_NOISE:
        raise ValueError(f"noise_multiplier z = {z:g} is outside [{_MIN_NOISE:g}, {_MAX_NOISE:g}], the range "
                         f"the accountant computes in; such noise gives ε = {'∞' if z < _MIN_NOISE else '0'}.")
    return z


def _check_delta(value, sampling: Sampling | None = None) -> float:
    """δ in (0, 1); warns when it exceeds 1/N for a known dataset size N."""
    delta = _validation.number("delta", value, 0, 1, low_open=True, high_open=True)
    size = getattr(sampling, "dataset_size", None)
    if size is not None and delta > 1 / size:
        warnings.warn(f"delta = {delta:g} exceeds 1/N = 1/{size}: at such a δ, publishing a random example "
                      f"outright is (0, δ)-DP, so ε means little; use δ < 1/N (e.g. 1e-5 or 1/(10·N)).",
                      stacklevel=3)
    return delta


def _check_epsilon(value) -> float:
    return _validation.number("epsilon", value, 0, math.inf, low_open=True)


def _check_resolution(value) -> float:
    return _validation.number("resolution (PLD grid spacing in nats)", value, 0, 0.1, low_open=True)


@functools.lru_cache(maxsize=2)  # a profile and its numerical floor share one composition
def _composed(noise_multiplier: float, steps: int, sampling: Sampling, relation: Relation,
              resolution: float) -> tuple[_PLD, ...]:
    rate = effective_sampling_rate(sampling, relation)
    one = _single_step(_kind(relation), rate, _check_noise(noise_multiplier), _check_resolution(resolution))
    return tuple(_self_compose(p, _validation.integer("steps", steps)) for p in one)


def epsilon(noise_multiplier: float, steps: int, delta: float, *, sampling: Sampling,
            relation: Relation, resolution: float = DEFAULT_RESOLUTION) -> float:
    """ε such that T steps of DP-SGD with noise multiplier z are (ε, δ)-DP under the
    relation (an upper bound, tight up to the discretisation ``resolution``).

    ``math.inf`` when no ε can be certified: δ is at or below :func:`numerical_floor`,
    where the float64 composition cannot resolve the profile (or the mass at +∞)."""
    target = _check_delta(delta, sampling)
    plds = _composed(noise_multiplier, steps, sampling, relation, resolution)
    return max(_epsilon_of(p, target) for p in plds)


def delta(noise_multiplier: float, steps: int, epsilon: float, *, sampling: Sampling,
          relation: Relation, resolution: float = DEFAULT_RESOLUTION) -> float:
    """δ(ε) after T steps: the smallest δ (up to discretisation, rounded up) such that the
    training is (ε, δ)-DP under the relation."""
    if not (float(epsilon) >= 0):
        raise ValueError(f"epsilon must be >= 0, got {epsilon}.")
    return float(privacy_profile(noise_multiplier, steps, [float(epsilon)], sampling=sampling,
                                 relation=relation, resolution=resolution)[0])


def privacy_profile(noise_multiplier: float, steps: int, epsilons: Sequence[float], *,
                    sampling: Sampling, relation: Relation,
                    resolution: float = DEFAULT_RESOLUTION) -> np.ndarray:
    """The privacy profile δ(ε) after T steps on a grid of ε (any order, ε ≥ 0).

    Every value is an upper bound. Below :func:`numerical_floor` (about 1e-9 to 1e-8 for
    10^5 steps at the default resolution) the bound is dominated by the allowance for
    float64 rounding and flattens out while the true profile keeps falling: do not read
    the shape of the curve there.
    """
    eps = np.asarray(epsilons, dtype=np.float64)
    if eps.ndim != 1 or (eps < 0).any() or not np.isfinite(eps).all():
        raise ValueError("epsilons must be a 1-D sequence of finite values >= 0.")
    plds = _composed(noise_multiplier, steps, sampling, relation, resolution)
    return np.max([_delta_of(p, eps) for p in plds], axis=0)


def numerical_floor(noise_multiplier: float, steps: int, *, sampling: Sampling, relation: Relation,
                    resolution: float = DEFAULT_RESOLUTION) -> float:
    """The δ below which float64 cannot make the accountant tight: the mass at +∞ (tails
    cut from the grid) plus the most that the bounded rounding errors of the FFT
    composition can add to δ (module section "composition"). A δ(ε) below it is still a
    valid upper bound, but possibly far above the truth; ε for a target δ below it can
    come out ``inf``. Plots of privacy profiles mark this region."""
    plds = _composed(noise_multiplier, steps, sampling, relation, resolution)
    return max(p.infinity_mass + float(_rounding_allowance(p, np.zeros(1))[0]) for p in plds)


def calibrate_noise(target_epsilon: float, delta: float, steps: int, *, sampling: Sampling,
                    relation: Relation, resolution: float = DEFAULT_RESOLUTION,
                    rtol: float = 1e-3, max_noise: float = 1e4) -> float:
    """Smallest noise multiplier z (to relative tolerance ``rtol``, rounded up) such that
    T steps are (target_epsilon, δ)-DP under the relation.

    The search runs on a 10× coarser grid first (fast, pessimistic) and finishes on the
    requested one; the returned z always satisfies ε(z) ≤ target at ``resolution``.
    """
    target = _check_epsilon(target_epsilon)
    effective_sampling_rate(sampling, relation)
    _check_delta(delta, sampling)
    _validation.integer("steps", steps)

    def eps_at(z, res):
        return epsilon(z, steps, delta, sampling=sampling, relation=relation, resolution=res)

    if eps_at(max_noise, resolution) > target:
        raise ValueError(f"target ε = {target} at δ = {delta} is unreachable in {steps} steps even "
                         f"with noise multiplier {max_noise:g}: raise ε or δ, or take fewer steps.")
    coarse = min(10 * resolution, 0.1)

    def log_gap(log_z):  # log ε(z) − log target on the coarse grid, finite everywhere
        return math.log(min(max(eps_at(math.exp(log_z), coarse), 1e-300), 1e300)) - math.log(target)

    low, high = _bracket(lambda z: log_gap(math.log(z)) <= 0, start=1.0, limit=max_noise)
    root = math.exp(optimize.brentq(log_gap, math.log(low), math.log(high), xtol=rtol / 8))
    # The fine grid is tighter (ε smaller), so its root lies at or just below the coarse one.
    high = root * (1 + rtol / 8)

    def fine_ok(z):
        return eps_at(z, resolution) <= target

    if fine_ok(high) and not fine_ok(high * (1 - rtol)):
        return high
    low, high = _bracket(fine_ok, start=high, limit=max_noise)  # rare: widen and bisect
    return _bisect(fine_ok, low, high, rtol)[1]


def _bracket(ok, start: float, limit: float) -> tuple[float, float]:
    """(low, high) with ok(high) true and ok(low) false (or low tiny), by doubling/halving."""
    z = start
    if ok(z):
        while z > 1e-3 and ok(z / 2):
            z /= 2
        return z / 2, z
    while not ok(z * 2):
        z *= 2
        if z > limit:
            raise ValueError("noise calibration failed to bracket the target.")
    return z, z * 2


def _bisect(ok, low: float, high: float, rtol: float) -> tuple[float, float]:
    while high - low > rtol * high:
        mid = math.sqrt(low * high)
        if ok(mid):
            high = mid
        else:
            low = mid
    return low, high


def max_steps(noise_multiplier: float, target_epsilon: float, delta: float, *,
              sampling: Sampling, relation: Relation,
              resolution: float = DEFAULT_RESOLUTION, limit: int = 10 ** 7) -> int:
    """The largest T such that T steps at noise multiplier z stay (target_epsilon, δ)-DP
    (0 if even one step exceeds the budget; ``limit`` if the budget allows more)."""
    target = _check_epsilon(target_epsilon)

    def ok(t):
        return epsilon(noise_multiplier, t, delta, sampling=sampling, relation=relation,
                       resolution=resolution) <= target

    return _last_true(ok, 1, limit)


def _last_true(ok, first: int, limit: int) -> int:
    """Largest t in [first, limit] with ok(t), for monotone ok (first − 1 if none)."""
    if not ok(first):
        return first - 1
    low, high = first, first
    while high < limit and ok(high):
        low, high = high, min(2 * high, limit)
    if ok(high):
        return high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low


# =========================================================================== ledger


class Ledger:
    """Incremental privacy ledger for a training run.

    Records the steps actually taken (in runs of equal noise multiplier), answers ε so
    far at δ, and how many more steps fit a budget. Queries are cached: ε so far is one
    FFT per distinct noise level (never a step-by-step recomposition), and
    ``remaining_steps`` is computed once per noise level by bisection, so the per-step
    check "would the next step exceed the budget?" is O(1).

    ``to_dict``/``from_dict`` give a JSON-serialisable state for checkpoints.
    """

    def __init__(self, *, sampling: Sampling, relation: Relation, delta: float,
                 budget_epsilon: float | None = None, resolution: float = DEFAULT_RESOLUTION):
        effective_sampling_rate(sampling, relation)
        self.sampling, self.relation = sampling, relation
        self.delta = _check_delta(delta, sampling)
        self.budget_epsilon = None if budget_epsilon is None else _check_epsilon(budget_epsilon)
        self.resolution = _check_resolution(resolution)
        self._runs: list[list] = []   # [noise_multiplier, count], consecutive z merged
        self._cache: dict = {}        # pure function of its keys: never invalidated

    @property
    def steps(self) -> int:
        return sum(count for _, count in self._runs)

    def step(self, noise_multiplier: float, count: int = 1) -> None:
        """Records ``count`` steps taken at noise multiplier z."""
        z = _check_noise(noise_multiplier)
        _validation.integer("count", count)
        if self._runs and self._runs[-1][0] == z:
            self._runs[-1][1] += count
        else:
            self._runs.append([z, count])

    def _composed_runs(self, runs: tuple) -> tuple[_PLD, ...] | None:
        """The PLD(s) of a sequence of (z, count) runs; None for no steps (cached)."""
        if not runs:
            return None
        if runs not in self._cache:
            parts = [_composed(z, n, self.sampling, self.relation, self.resolution) for z, n in runs]
            self._cache[runs] = functools.reduce(lambda a, b: tuple(map(_compose, a, b)), parts)
        return self._cache[runs]

    def _epsilon_after(self, prefix: tuple, z: float, extra: int) -> float:
        plds = _composed(z, extra, self.sampling, self.relation, self.resolution)
        before = self._composed_runs(prefix)
        if before is not None:
            plds = tuple(map(_compose, before, plds))
        return max(_epsilon_of(p, self.delta) for p in plds)

    def epsilon(self) -> float:
        """ε spent so far at the ledger's δ (0 before the first step)."""
        if not self._runs:
            return 0.0
        *prefix, (z, count) = self._runs
        key = ("epsilon", tuple(map(tuple, self._runs)))
        if key not in self._cache:
            self._cache[key] = self._epsilon_after(tuple(map(tuple, prefix)), z, count)
        return self._cache[key]

    def remaining_steps(self, noise_multiplier: float, limit: int = 10 ** 7) -> int:
        """How many more steps at noise multiplier z keep ε within the budget."""
        if self.budget_epsilon is None:
            raise ValueError("this ledger has no budget_epsilon; pass one to Ledger(...).")
        z = _check_noise(noise_multiplier)
        runs = [tuple(r) for r in self._runs]
        done = runs.pop()[1] if runs and runs[-1][0] == z else 0
        key = ("affordable", tuple(runs), z)
        if key not in self._cache:
            self._cache[key] = _last_true(
                lambda extra: self._epsilon_after(tuple(runs), z, extra) <= self.budget_epsilon, 1, limit)
        return max(self._cache[key] - done, 0)

    def can_step(self, noise_multiplier: float) -> bool:
        """Would one more step at z keep ε within the budget?"""
        return self.remaining_steps(noise_multiplier) >= 1

    def to_dict(self) -> dict:
        return {
            "sampling": {"type": type(self.sampling).__name__, **dataclasses.asdict(self.sampling)},
            "relation": {"type": type(self.relation).__name__, **dataclasses.asdict(self.relation)},
            "delta": self.delta, "budget_epsilon": self.budget_epsilon,
            "resolution": self.resolution, "runs": [list(r) for r in self._runs],
        }

    @classmethod
    def from_dict(cls, state: dict) -> "Ledger":
        """The ledger that :meth:`to_dict` saved; ValueError naming what is missing or wrong."""
        keys = ("sampling", "relation", "delta", "budget_epsilon", "resolution", "runs")
        missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
        if missing:
            raise ValueError(f"not a Ledger state (from Ledger.to_dict): missing {', '.join(missing)}.")
        kinds = {c.__name__: c for c in (FixedSizeSampling, PoissonSampling, PatchLevel,
                                         ImageLevel, GaussianAugmentation, AddRemove)}

        def build(spec):
            spec = dict(spec)
            name = spec.pop("type", None)
            if name not in kinds:
                raise ValueError(f"Ledger state: unknown type {name!r}; expected one of {', '.join(kinds)}.")
            return kinds[name](**spec)

        ledger = cls(sampling=build(state["sampling"]), relation=build(state["relation"]),
                     delta=state["delta"], budget_epsilon=state["budget_epsilon"],
                     resolution=state["resolution"])
        for z, count in state["runs"]:
            ledger.step(z, count)
        return ledger


# =========================================================================== closed forms


def gaussian_mechanism_delta(epsilon, mu: float):
    """δ(ε) of the Gaussian mechanism with sensitivity/std = μ (Balle & Wang 2018):
    Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2). T-fold composition: μ·sqrt(T)."""
    eps = np.asarray(epsilon, dtype=np.float64)
    a = special.log_ndtr(-eps / mu + mu / 2)
    b = eps + special.log_ndtr(-eps / mu - mu / 2)
    return np.exp(a) * -np.expm1(np.minimum(b - a, 0.0))


def gaussian_mechanism_epsilon(mu: float, delta: float) -> float:
    """ε(δ) of the Gaussian mechanism with sensitivity/std = μ (exact, by root finding)."""
    _check_delta(delta)
    if gaussian_mechanism_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while gaussian_mechanism_delta(high, mu) > delta:
        high *= 2
    return optimize.brentq(lambda e: float(gaussian_mechanism_delta(e, mu)) - delta, 0.0, high,
                           xtol=1e-12, rtol=1e-12)


def data_level_noise_profile(epsilons, noise_std: float, patch_area: int, channels: int = 3,
                             pixel_range: float = 255.0) -> np.ndarray:
    """COMPARATOR: δ(ε) of adding N(0, σ²) once to every pixel of the data (input
    perturbation; training afterwards is post-processing). A patch of ``patch_area``
    pixels changes the image by at most sqrt(area·channels)·pixel_range in L2."""
    sensitivity = math.sqrt(patch_area * channels) * pixel_range
    return gaussian_mechanism_delta(epsilons, sensitivity / noise_std)

