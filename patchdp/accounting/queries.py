"""The accountant's queries: ε(δ), δ(ε), the privacy profile, the numerical floor, noise
calibration and the step budget of T steps of DP-SGD at noise multiplier z.

The top layer of :mod:`patchdp.accounting`: each query composes one step's PLD
(:meth:`~patchdp.accounting.relations.Relation.one_step`) T times
(:mod:`patchdp.accounting.composition`) and reads the answer off the composition, so
every answer is an upper bound (pessimistic discretisation, tails at +∞, rounding
allowance added). Units: ``noise_multiplier`` z is the noise std divided by the clip
norm C (z = 0, no noise, gives ε = ∞); ``steps`` T; ``delta`` δ ∈ (0, 1); ``epsilon`` ε in
nats.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import numpy as np
from scipy import optimize

from patchdp import _validation
from patchdp.accounting.composition import delta_of, epsilon_of, rounding_allowance, self_compose
from patchdp.accounting.loss import PLD, no_privacy
from patchdp.accounting.relations import Relation, effective_sampling_rate
from patchdp.sampling import Sampling

__all__ = ["DEFAULT_RESOLUTION", "composed", "epsilon", "delta", "privacy_profile", "numerical_floor",
           "calibrate_noise", "max_steps", "last_true", "check_noise", "check_delta", "check_resolution"]

DEFAULT_RESOLUTION = 1e-4
"""Spacing Δε of the privacy-loss grid (nats). Smaller is tighter and slower."""

_MIN_NOISE, _MAX_NOISE = 1e-100, 1e100  # noise multipliers whose μ = 2/z squares within float64


def check_noise(value) -> float:
    """z ≥ 0 finite (the shared check); a positive z must lie in [_MIN_NOISE, _MAX_NOISE],
    where one step's losses stay in float64 range."""
    z = _validation.noise_multiplier(value)
    if z > 0 and not _MIN_NOISE <= z <= _MAX_NOISE:
        raise ValueError(f"noise_multiplier z = {z:g} is outside [{_MIN_NOISE:g}, {_MAX_NOISE:g}], the range "
                         f"the accountant computes in; such noise gives ε = {'∞' if z < _MIN_NOISE else '0'}.")
    return z


def check_delta(value, sampling: Sampling | None = None) -> float:
    """δ in (0, 1); warns when it exceeds 1/N for a known dataset size N."""
    delta = _validation.delta(value)
    size = getattr(sampling, "dataset_size", None)
    if size is not None and delta > 1 / size:
        warnings.warn(f"delta = {delta:g} exceeds 1/N = 1/{size}: at such a δ, publishing a random example "
                      f"outright is (0, δ)-DP, so ε means little; use δ < 1/N (e.g. 1e-5 or 1/(10·N)).",
                      stacklevel=3)
    return delta


def check_resolution(value) -> float:
    return _validation.number("resolution (PLD grid spacing in nats)", value, 0, 0.1, low_open=True)


@functools.lru_cache(maxsize=2)  # a profile and its numerical floor share one composition
def composed(noise_multiplier: float, steps: int, sampling: Sampling, relation: Relation,
             resolution: float) -> tuple[PLD, ...]:
    """The PLD(s) of T = ``steps`` steps at noise multiplier z (validated); δ of the
    composition is the max over the tuple. z = 0 gives :func:`~patchdp.accounting.loss.no_privacy`."""
    rate = effective_sampling_rate(sampling, relation)
    z, step = check_noise(noise_multiplier), check_resolution(resolution)
    steps = _validation.integer("steps", steps)
    if z == 0:
        return (no_privacy(step),)
    return tuple(self_compose(p, steps) for p in relation.one_step(rate, z, step))


def epsilon(noise_multiplier: float, steps: int, delta: float, *, sampling: Sampling,
            relation: Relation, resolution: float = DEFAULT_RESOLUTION) -> float:
    """ε such that T steps of DP-SGD with noise multiplier z are (ε, δ)-DP under the
    relation (an upper bound, tight up to the discretisation ``resolution``).

    ``math.inf`` when no ε can be certified: δ is at or below :func:`numerical_floor`,
    where the float64 composition cannot resolve the profile (or the mass at +∞)."""
    target = check_delta(delta, sampling)
    plds = composed(noise_multiplier, steps, sampling, relation, resolution)
    return max(epsilon_of(p, target) for p in plds)


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
    plds = composed(noise_multiplier, steps, sampling, relation, resolution)
    return np.max([delta_of(p, eps) for p in plds], axis=0)


def numerical_floor(noise_multiplier: float, steps: int, *, sampling: Sampling, relation: Relation,
                    resolution: float = DEFAULT_RESOLUTION) -> float:
    """The δ below which float64 cannot make the accountant tight: the mass at +∞ (tails
    cut from the grid) plus the most that the bounded rounding errors of the FFT
    composition can add to δ (module section "composition"). A δ(ε) below it is still a
    valid upper bound, but possibly far above the truth; ε for a target δ below it can
    come out ``inf``. Plots of privacy profiles mark this region."""
    plds = composed(noise_multiplier, steps, sampling, relation, resolution)
    return max(p.infinity_mass + float(rounding_allowance(p, np.zeros(1))[0]) for p in plds)


def calibrate_noise(target_epsilon: float, delta: float, steps: int, *, sampling: Sampling,
                    relation: Relation, resolution: float = DEFAULT_RESOLUTION,
                    rtol: float = 1e-3, max_noise: float = 1e4) -> float:
    """Smallest noise multiplier z (to relative tolerance ``rtol``, rounded up) such that
    T steps are (target_epsilon, δ)-DP under the relation.

    The search runs on a 10× coarser grid first (fast, pessimistic) and finishes on the
    requested one; the returned z always satisfies ε(z) ≤ target at ``resolution``.
    """
    target = _validation.epsilon(target_epsilon)
    effective_sampling_rate(sampling, relation)
    check_delta(delta, sampling)
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
    target = _validation.epsilon(target_epsilon)

    def ok(t):
        return epsilon(noise_multiplier, t, delta, sampling=sampling, relation=relation,
                       resolution=resolution) <= target

    return last_true(ok, 1, limit)


def last_true(ok, first: int, limit: int) -> int:
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

