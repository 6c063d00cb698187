"""Composition of privacy loss distributions by FFT, with a priori floating-point error
bounds, and the two queries every accountant answers: δ(ε) and ε(δ).

The layer above one step's loss (:mod:`patchdp.accounting.loss`). Every function takes
and returns :class:`~patchdp.accounting.loss.PLD` objects; rounding always goes towards
less privacy (a composed PLD carries bounds on its own rounding error, and every query
adds what that error can add to δ).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft as sp_fft
from scipy import signal, special

from patchdp.accounting.loss import PLD

__all__ = ["self_compose", "compose", "delta_of", "epsilon_of", "rounding_allowance", "TAIL_MASS"]

TAIL_MASS = 1e-15  # mass dropped (→ +∞, pessimistically) per composition

# Floating-point error of the FFT composition (the derivation behind ``error_max`` and
# ``error_l2`` of every composed :class:`PLD`). Notation: u = 2^-53 the unit roundoff,
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
#     (``compose``) likewise: |âb̂(1+θ) − ab| ≤ m|â||b̂| + e_a|b̂| + (|â| + e_a)e_b.
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
# a numerical floor (:func:`patchdp.accounting.numerical_floor`) below which δ is a valid but loose bound.

_UNIT_ROUNDOFF = np.finfo(np.float64).eps / 2
_FFT_LEVEL_ERROR = 8 * _UNIT_ROUNDOFF                                       # η in (F)
_PRODUCT_ERROR = math.sqrt(2) * 2 * _UNIT_ROUNDOFF / (1 - 2 * _UNIT_ROUNDOFF)  # m in (P)
_UNDERFLOW = 4 * np.finfo(np.float64).smallest_subnormal  # absolute error of a product that underflows
_BOUND_SLACK = 1 + 1e-6  # covers the rounding in evaluating the bounds themselves
_MAX_GRID = 2 ** 25      # grid points of one composition (~2 GB of FFT buffers)


def _support_bounds(pld: PLD, times: int, tail: float) -> tuple[int, int]:
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


def _spectrum(pld: PLD, size: int) -> tuple[np.ndarray, float]:
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
                   offset: int, step: float, infinity: float) -> PLD:
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
    return PLD(probs, offset, step, min(infinity, 1.0), _BOUND_SLACK * error_max, _BOUND_SLACK * error_l2)


def self_compose(pld: PLD, times: int) -> PLD:
    """The `times`-fold composition: one real FFT raised to the power `times`, read out
    over a window that holds all but TAIL_MASS of the mass (Chernoff bounds); the
    rounding error is bounded as derived above. A PLD with all its mass at +∞ (no noise)
    is its own composition."""
    if times == 1 or pld.infinity_mass >= 1:
        return pld
    lo, hi = _support_bounds(pld, times, TAIL_MASS)
    size = _fft_length(max(hi - lo + 1, pld.probs.size), pld.step)
    x, e = _spectrum(pld, size)
    magnitude = np.abs(x)
    rho = math.expm1((times - 1) * math.log1p(_PRODUCT_ERROR))
    error = rho * magnitude ** times + times * (magnitude + e) ** (times - 1) * e + times * _UNDERFLOW
    # Circular convolution: index k holds all sums ≡ k (mod size); the window [lo, hi]
    # fits in one period, so rolling by lo reads it out. Mass outside the window
    # (≤ TAIL_MASS) is counted at +∞; the part of it that aliases into the window only
    # adds mass there, which is pessimistic.
    infinity = -math.expm1(times * math.log1p(-pld.infinity_mass)) + TAIL_MASS
    return _from_spectrum(_power(x, times), error, size, (lo, hi - lo + 1), pld.offset * times + lo,
                          pld.step, infinity)


def compose(a: PLD, b: PLD) -> PLD:
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


def _tail_sums(pld: PLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Suffix sums from the top loss down, for δ(ε) = upper − e^ε·Σ_{l ≥ ·} p_l e^{−l}:

      upper[j]  = P(L = ∞) + Σ_{i ≥ j} p_i
      scaled[j] = Σ_{i ≥ j} p_i e^{−(l_i − l_j)}   (≤ upper: no overflow at any loss)

    ``scaled`` follows the recursion scaled[j] = p_j + e^{−step}·scaled[j + 1].
    """
    probs = np.maximum(pld.probs, 0.0)
    upper = np.cumsum(probs[::-1])[::-1] + pld.infinity_mass
    scaled = signal.lfilter([1.0], [1.0, -math.exp(-pld.step)], probs[::-1])[::-1]
    return pld.losses, upper, scaled


def rounding_allowance(pld: PLD, epsilons: np.ndarray) -> np.ndarray:
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


def delta_of(pld: PLD, epsilons: np.ndarray) -> np.ndarray:
    """δ(ε) = P(L = ∞) + Σ_{l > ε} p_l (1 − e^{ε − l}) for each ε, plus the rounding
    allowance of a composed PLD."""
    losses, upper, scaled = _tail_sums(pld)
    idx = np.searchsorted(losses, epsilons, side="right")  # first loss > ε
    inside = idx < losses.size
    out = np.full(np.shape(epsilons), pld.infinity_mass, dtype=np.float64)
    j = idx[inside]
    out[inside] = upper[j] - np.exp(np.asarray(epsilons)[inside] - losses[j]) * scaled[j]
    return np.clip(out + rounding_allowance(pld, epsilons), 0.0, 1.0)


def epsilon_of(pld: PLD, target_delta: float) -> float:
    """Smallest ε ≥ 0 whose δ(ε), rounding allowance included, is ≤ target_delta
    (math.inf if none: δ below the numerical floor or the mass at +∞).

    The allowance A(ε) decreases in ε, so with ε₀ the answer without it, the answer for
    target_delta − A(ε₀) satisfies δ + A ≤ target_delta (it is ≥ ε₀, where A ≤ A(ε₀)).
    """
    first = _epsilon_of_masses(pld, target_delta)
    if math.isinf(first):
        return first
    allowance = float(rounding_allowance(pld, np.array([first]))[0])
    return first if allowance == 0 else _epsilon_of_masses(pld, target_delta - allowance)


def _epsilon_of_masses(pld: PLD, target_delta: float) -> float:
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

