"""Empirical privacy auditing: a high-confidence LOWER bound on ε from the real DP-SGD step.

The accountant (``patchdp.accounting``) gives an upper bound ε on what one step can leak.
This module measures, by running the jitted step itself (``make_train_step``: the same
batch sampler, crops, per-example clipping and noise code as training), how much a
white-box adversary can actually tell two patch-level neighbours apart. If the audited
lower bound ever exceeds the accounted ε, the implementation leaks more than it claims.

**The canary** (gradient-space auditing, Nasr et al. 2021/2023, here for the patch
relation). The adversary chooses the worst case the guarantee must cover:

- the data: N all-zero images; in D' one of them carries a canary patch (pixels
  :data:`CANARY_VALUE` on the patch mask R) at the placement t* with the largest
  inclusion probability p* (``patchdp.inclusion.inclusion_map``);
- the model: one scalar parameter θ with the linear loss
  ``θ · (max(crop) − 1) · 1000 C`` (:func:`canary_loss`). Its gradient is −1000 C for
  a crop of zeros and far above +C for a crop that contains a canary pixel (with K crops
  per example: if any of them does), so after clipping to C every example contributes
  exactly −C, except the canary example when its crop hits the patch: +C;
- the observation: the parameter after one step from θ = 0 with SGD (learning rate 1);
  the score is the update −θ₁ = (S + N(0, (zC)²)) / E[B], S the clipped-gradient sum.

So under D the score is (−(batch size)·C + noise)/E[B], and under D' the canary's
gradient flips by 2C exactly when it is sampled and its crop hits the patch: the
one-step mechanism realises the accountant's dominating pair (1 − w)·N(0, z²) + w·N(2, z²)
against N(0, z²), w = q·p* (exactly so for fixed-size batches), and the audit can
approach the accounted ε as the number of runs grows.

**The bound** (Jagielski et al. 2020; Nasr et al. 2021). For any threshold τ, an
(ε, δ)-DP mechanism satisfies TPR ≤ e^ε·FPR + δ for the test "score > τ ⇒ D'" (and
for "score < τ ⇒ D", the worlds swapped), so

    ε ≥ ln((TPR − δ) / FPR).

The runs of each world are split in two halves. τ (and the direction of the test) is
chosen on the first half; on the second, independent half a one-sided Clopper–Pearson
lower bound on TPR and upper bound on FPR, each at level α/2, give
ε_lower = ln((TPR_low − δ) / FPR_high), which is ≤ the true ε of the mechanism with
probability ≥ 1 − α (the ``confidence``) over the runs. ε_lower = 0 when nothing can be
concluded.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from patchdp.inclusion import CropSpec, Patch, image_hw, inclusion_map
from patchdp.mechanism import DPSGD
from patchdp.sampling import FixedSizeSampling, PoissonSampling, SamplingSeed
from patchdp.training import Batch, TrainState, make_train_step

__all__ = ["CANARY_VALUE", "AuditBound", "AuditResult", "clopper_pearson", "epsilon_lower_bound", "audit_ceiling",
           "canary_datasets", "canary_loss", "canary_step", "audit_scores", "audit"]

CANARY_VALUE = 1000.0
"""Pixel value of the canary patch (all other pixels, and the zero padding, are 0)."""

_GRADIENT_SCALE = 1000.0  # |canary gradient| in units of C, so that clipping always binds


# =========================================================================== statistics


def clopper_pearson(successes, trials: int, alpha: float, side: str) -> np.ndarray:
    """One-sided exact (Clopper–Pearson) confidence bound on a binomial proportion.

    Args:
      successes: count(s) k of successes in ``trials`` n (array-like of ints in [0, n]).
      alpha: error probability; the bound holds with probability ≥ 1 − alpha.
      side: "upper" (P[Bin(n, u) ≤ k] = alpha, u = 1 when k = n) or
        "lower" (P[Bin(n, l) ≥ k] = alpha, l = 0 when k = 0).
    """
    k = np.asarray(successes, dtype=np.float64)
    if side == "upper":
        return np.where(k >= trials, 1.0, stats.beta.ppf(1 - alpha, k + 1, np.maximum(trials - k, 1)))
    if side == "lower":
        return np.where(k <= 0, 0.0, stats.beta.ppf(alpha, np.maximum(k, 1), trials - k + 1))
    raise ValueError(f"side must be 'upper' or 'lower', got {side!r}.")


def _log_ratio(tpr_low, fpr_high, delta: float) -> np.ndarray:
    """ln((TPR_low − δ) / FPR_high), and 0 where that is ≤ 0 or TPR_low ≤ δ (no conclusion)."""
    tpr_low, fpr_high = np.asarray(tpr_low), np.asarray(fpr_high)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.log(np.maximum(tpr_low - delta, 1e-300) / fpr_high)
    return np.where(tpr_low > delta, eps, 0.0).clip(min=0.0)


def _test_bounds(positives: np.ndarray, negatives: np.ndarray, thresholds: np.ndarray, delta: float,
                 alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ε_lower, TPR_low, FPR_high) of the tests "score > τ ⇒ positive world", one per τ,
    with Clopper–Pearson bounds at alpha/2 each."""
    above = lambda scores: scores.size - np.searchsorted(np.sort(scores), thresholds, side="right")
    tpr = clopper_pearson(above(positives), positives.size, alpha / 2, "lower")
    fpr = clopper_pearson(above(negatives), negatives.size, alpha / 2, "upper")
    return _log_ratio(tpr, fpr, delta), tpr, fpr


@dataclasses.dataclass(frozen=True)
class AuditBound:
    """The outcome of :func:`epsilon_lower_bound`.

    Attributes:
      epsilon: the lower bound on ε at ``delta``; holds with probability ≥ ``confidence``.
      delta: the δ it is for.
      confidence: 1 − α.
      threshold: τ of the test, chosen on the selection half (on the negated scores
        for direction "without>").
      direction: "with>" (score > τ ⇒ canary present) or "without>" (scores negated).
      tpr_low, fpr_high: the Clopper–Pearson bounds on the evaluation half.
      runs: (runs without, runs with) the canary, both halves together.
    """

    epsilon: float
    delta: float
    confidence: float
    threshold: float
    direction: str
    tpr_low: float
    fpr_high: float
    runs: tuple[int, int]


def epsilon_lower_bound(without, with_canary, delta: float, *, confidence: float = 0.95,
                        max_thresholds: int = 4096) -> AuditBound:
    """A lower bound on ε at δ of any mechanism that produced these scores, valid with
    probability ≥ ``confidence`` (module docstring: held-out threshold, Clopper–Pearson).

    Args:
      without, with_canary: 1-D arrays of i.i.d. scores of runs on D and on D' (each
        at least 4 runs); the first half of each chooses the test, the second half
        bounds its error rates.
      delta: δ in (0, 1).
      confidence: 1 − α in (0, 1).
      max_thresholds: candidate thresholds (quantiles of the selection half's scores).
    """
    without = np.asarray(without, dtype=np.float64).ravel()
    with_canary = np.asarray(with_canary, dtype=np.float64).ravel()
    if min(without.size, with_canary.size) < 4 or not (np.isfinite(without).all() and np.isfinite(with_canary).all()):
        raise ValueError("epsilon_lower_bound needs at least 4 finite scores per world.")
    if not 0 < delta < 1 or not 0 < confidence < 1:
        raise ValueError(f"delta and confidence must lie in (0, 1), got {delta!r} and {confidence!r}.")
    alpha = 1 - confidence
    halves = lambda x: (x[: x.size // 2], x[x.size // 2:])
    (select_0, eval_0), (select_1, eval_1) = halves(without), halves(with_canary)
    best = None
    for direction, sign, pos_s, neg_s, pos_e, neg_e in (
            ("with>", 1.0, select_1, select_0, eval_1, eval_0),
            ("without>", -1.0, select_0, select_1, eval_0, eval_1)):
        pooled = sign * np.concatenate([pos_s, neg_s])
        candidates = np.unique(np.quantile(pooled, np.linspace(0, 1, max_thresholds)))
        chosen, _, _ = _test_bounds(sign * pos_s, sign * neg_s, candidates, delta, alpha)
        index = int(np.argmax(chosen))
        if best is None or chosen[index] > best[0]:
            best = chosen[index], direction, candidates[index], sign * pos_e, sign * neg_e
    _, direction, tau, positives, negatives = best
    epsilon, tpr, fpr = (float(x[0]) for x in _test_bounds(positives, negatives, np.array([tau]), delta, alpha))
    return AuditBound(epsilon, float(delta), float(confidence), float(tau), direction, tpr, fpr,
                      (without.size, with_canary.size))


def audit_ceiling(noise_multiplier: float, rate: float, delta: float, runs: int, *,
                  confidence: float = 0.95) -> float:
    """What :func:`epsilon_lower_bound` can be expected to give at best with ``runs`` per
    world on the one-step dominating pair itself, (1 − w)·N(0, z²) + w·N(2, z²) vs
    N(0, z²) with w = ``rate``: for the best threshold of either direction, the exact TPR
    and FPR become expected counts of the evaluation half (runs/2), then the same
    Clopper–Pearson bounds. The gap between an audit and this ceiling is the auditor's
    (one audit may also exceed it by chance); the gap between the ceiling and the
    accounted ε is the price of finite runs at this δ.
    """
    z, n = noise_multiplier, runs // 2
    tau = np.linspace(-8 * z, 2 + 8 * z, 20001)
    null_above = stats.norm.sf(tau / z)
    canary_above = (1 - rate) * null_above + rate * stats.norm.sf((tau - 2) / z)
    best = 0.0
    for tpr, fpr in ((canary_above, null_above), (1 - null_above, 1 - canary_above)):
        low = clopper_pearson(np.floor(n * tpr), n, (1 - confidence) / 2, "lower")
        high = clopper_pearson(np.ceil(n * fpr), n, (1 - confidence) / 2, "upper")
        best = max(best, float(np.max(_log_ratio(low, high, delta))))
    return best


# =========================================================================== the canary mechanism


def canary_datasets(image_shape, crop: CropSpec, patch: Patch, dataset_size: int
                    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The neighbouring datasets D and D' of the audit.

    Returns (without, with_canary, location): float32 arrays (N, H, W, 1) of zeros, the
    second with example 0's patch R set to :data:`CANARY_VALUE` at the placement t* =
    (row, column) of R's bounding box that maximises p(t), i.e. p(t*) = p*.
    """
    height, width = image_hw(image_shape)
    p = inclusion_map((height, width), crop, patch)
    row, col = (int(i) for i in np.unravel_index(np.argmax(p), p.shape))
    without = np.zeros((dataset_size, height, width, 1), np.float32)
    with_canary = without.copy()
    ph, pw = patch.shape
    with_canary[0, row:row + ph, col:col + pw, 0] = np.where(patch.mask, CANARY_VALUE, 0.0)
    return without, with_canary, (row, col)


def canary_loss(clip_norm: float):
    """The adversary's per-example loss ``loss(params, image, label)`` for one crop:
    ``θ · (max(image) − 1) · 1000 C``, θ = ``params`` (a float32 scalar).

    Its gradient is −1000 C on a crop without canary pixels and, when at least one of the
    example's K crops contains one (their losses are averaged), at least
    (CANARY_VALUE/K − 1)·1000 C > C for K < 500; so the clipped gradient is exactly ∓C:
    a flip of 2C, the substitution sensitivity. (A resized crop that blends a canary
    pixel below value 1 counts as a miss: the audit can only get weaker, never invalid.)
    """

    def loss(params, image, label):
        del label
        return params * (jnp.max(image) - 1.0) * (_GRADIENT_SCALE * clip_norm)

    return loss


def canary_step(mechanism: DPSGD):
    """The real jitted DP-SGD step of ``mechanism`` (``make_train_step``) on the canary
    model, SGD with learning rate 1. To audit a broken mechanism, pass one that differs
    from the accounted one (``mechanism.replace(noise_multiplier=z / 2)``, another crop):
    :func:`audit` holds its steps against the claim of the mechanism it is given."""
    return make_train_step(canary_loss(mechanism.clip_norm), optax.sgd(1.0), mechanism)


def audit_scores(step, worlds, sampling: FixedSizeSampling | PoissonSampling, *, runs: int, key: jax.Array,
                 seed: SamplingSeed, chunk: int = 4096) -> list[np.ndarray]:
    """Runs the mechanism ``runs`` times independently on each dataset of ``worlds``.

    Args:
      step: a ``train_step`` of the canary model (:func:`canary_step`).
      worlds: datasets, each a float32 array (N, H, W, 1) (e.g. D and D').
      sampling: the batch sampling of training (its ``sample`` draws the batches).
      runs: runs per dataset.
      key, seed: run i on dataset j samples batch ``j·runs + i`` with ``sampling`` and
        ``seed`` and takes one ``step`` from θ = 0 with key ``fold_in(fold_in(key, j), i)``
        (crops and noise).
      chunk: runs vmapped at once (memory ∝ chunk × padded batch size × H × W).

    Returns one float64 array (runs,) of scores −θ₁ per dataset. The vmapped step is
    compiled once per ``step`` object and shape, and reused across calls.
    """
    chunk = min(chunk, runs)
    out = []
    for world, images in enumerate(worlds):
        world_key, data, parts = jax.random.fold_in(key, world), jnp.asarray(images), []
        for start in range(0, runs, chunk):  # the last chunk is padded to the full size (one compilation)
            batches = [sampling.sample(seed, world * runs + start + i) for i in range(chunk)]
            keys = jax.vmap(lambda i: jax.random.fold_in(world_key, i))(jnp.arange(start, start + chunk))
            result = _scores(step, data, np.stack([b.indices for b in batches]),
                             np.stack([b.mask for b in batches]), keys)
            parts.append(np.asarray(result, np.float64)[: min(chunk, runs - start)])
        out.append(np.concatenate(parts))
    return out


@functools.partial(jax.jit, static_argnums=0)  # one compilation per step and shape, reused across calls
def _scores(step, data, indices, mask, keys):
    """−θ₁ after one ``step`` from θ = 0 for each run: indices/mask (R, B), keys (R,)."""
    state = TrainState.create(jnp.zeros((), jnp.float32), optax.sgd(1.0))
    labels = jnp.zeros(data.shape[0], jnp.int32)
    one = lambda idx, m, k: -step(state, Batch(data[idx], labels[idx], m), k)[0].params
    return jax.vmap(one)(indices, mask, keys)


# =========================================================================== the audit


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Audited lower bound vs accounted ε for one patch-level setting.

    Attributes:
      bound: the :class:`AuditBound` (``bound.epsilon`` is the audited lower bound).
      epsilon_patch: accounted ε at δ for ONE step, patch level (w = q·p*).
      epsilon_image: accounted ε at δ for one step, image level (w = q), same noise.
      inclusion_probability: p* of the accounted crop and patch.
      flagged: the audited lower bound exceeds the accounted patch-level ε — the
        mechanism leaks more than claimed (with probability ≥ confidence).
    """

    bound: AuditBound
    epsilon_patch: float
    epsilon_image: float
    inclusion_probability: float

    @property
    def flagged(self) -> bool:
        return bool(self.bound.epsilon > self.epsilon_patch)


def audit(mechanism: DPSGD, *, runs: int, key: jax.Array, seed: SamplingSeed, confidence: float = 0.95,
          step=None, chunk: int = 4096) -> AuditResult:
    """Audits one DP-SGD step of ``mechanism`` for its patch-level relation.

    Args:
      mechanism: the accounted setting (:class:`patchdp.DPSGD` with crop, image_shape
        (H, W) of the single-channel canary images, patch, sampling, z, C, δ); the
        claimed ε is ``mechanism.replace(accounting="patch").epsilon(1)``.
      runs: runs per world (with and without the canary); half of them choose the test.
      key, seed: the step keys (crops, noise) and the batch-sampling seed of the runs.
      confidence: the bound holds with at least this probability.
      step: the step to audit; default the honest :func:`canary_step` of ``mechanism``.
        Pass the :func:`canary_step` of another mechanism to audit a step that does not
        do what is accounted.
      chunk: runs vmapped at once (memory ∝ chunk × batch size × H × W).
    """
    if isinstance(runs, bool) or not isinstance(runs, numbers.Integral) or runs < 4:
        raise ValueError(f"runs must be an integer >= 4 (runs per world), got {runs!r}.")
    if step is None:
        step = canary_step(mechanism)
    sampling = mechanism.sampling
    without, with_canary, _ = canary_datasets(mechanism.image_shape, mechanism.crop, mechanism.patch,
                                              sampling.dataset_size)
    scores_0, scores_1 = audit_scores(step, (without, with_canary), sampling, runs=runs, key=key, seed=seed,
                                      chunk=chunk)
    bound = epsilon_lower_bound(scores_0, scores_1, mechanism.delta, confidence=confidence)
    claim = lambda accounting: float(mechanism.replace(accounting=accounting).epsilon(1))
    return AuditResult(bound, claim("patch"), claim("image"), mechanism.inclusion_probability)
