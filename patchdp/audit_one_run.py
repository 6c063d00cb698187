"""Auditing a real training run in ONE run: patch canaries and the guessing-game bound.

Steinke, Nasr & Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023,
arXiv:2305.08846), at patch level (docs/method.md, "Auditing in one run"):

1. ``m`` training images each get a canary patch — the protected shape R, painted in a
   colour of its own that occurs nowhere in the training set — at the worst-case
   placement t* of :func:`patchdp.inclusion_map` (or at random valid placements). An
   independent fair coin S_i from a secret key decides whether image i carries its canary
   (S_i = +1) or its own pixels (S_i = −1). Flipping one coin changes one image inside
   R + t only: the two datasets are patch-level neighbours, so the run's patch-level
   (ε, δ) holds for each coin.
2. The run is an ordinary DP-SGD run of the config — the same mechanism
   (:class:`patchdp.DPSGD`), sampler, crops, clip norm, noise and optimizer, on the
   same model — with one addition the adversary is allowed to make (DP holds for every
   loss): a *canary head*, one parameter θ_i per canary, and the loss term
   ``2KC · Σ_i θ_i · [the view shows canary i's colour]`` (the model's own loss is
   dropped on a view that shows a canary). So an example whose crop meets its canary
   contributes exactly C·e_i after clipping (K = 1), every other example exactly 0 in
   the canary coordinates. The head is trained by SGD at learning rate 1, whatever the
   config's optimizer for the model, so θ_i is the running sum of the noisy updates.
3. Scores, each with its threat model:
   - ``"final"`` (final-model adversary): the adversary chose the loss and the canaries
     and sees only the final parameters — equivalently, it queries the final model's
     canary output on each canary patch. Score: −θ_i·E[B]/C = Σ_t x_{t,i}, where x_{t,i}
     is step t's noisy clipped sum in coordinate i, in units of C.
   - ``"steps"`` (white-box adversary that sees every noisy update, as in federated or
     leaked-checkpoint settings): the log-likelihood ratio of "canary i is hit in step t
     with probability w_i = q·p(t_i), unit signal, Gaussian noise σ" summed over steps,
     Σ_t log(1 − w_i + w_i·exp((x_{t,i} − ½)/σ²)), with σ = the claimed z / 4 by default
     (a fixed choice made before the run: any fixed score gives a valid bound; a small σ
     makes the score sensitive to single hits, i.e. to noise smaller than claimed).
4. Guess S_i = +1 for the k⁺ highest scores, −1 for the k⁻ lowest, abstain on the rest;
   W correct of r = k⁺ + k⁻. If the run is (ε, δ)-DP for each coin, with
   q_ε = e^ε / (1 + e^ε) (their Theorem 5.2 / Proposition 5.7),

       P[W ≥ v] ≤ P[Bin(r, q_ε) ≥ v] + 2mδ · max_{1≤i≤v} (1/i) · P[v − i ≤ Bin(r, q_ε) < v].

   :func:`epsilon_lower_bound` gives the largest ε whose right-hand side at the observed
   v is below β (exact binomial tails, bisection). Scores and (k⁺, k⁻) pairs are fixed
   before the run; the bound reported is the largest over all of them, each computed at
   β / (number tried) — a union bound — so it holds with probability ≥ 1 − β overall.

What the audit cannot detect: a leak through content the canary does not exercise (the
label map — the canary keeps the image's labels; pixels outside R; a crop scheme that
leaks only for other patch shapes or placements); a leak the score does not see (e.g. a
bug that changes what the model learns from a canary but not the canary coordinate);
with bilinear resizing a blended canary pixel does not count as seen (weaker, still
valid). It is a lower bound: a run can pass and still leak more than claimed, and with m
canaries and ε of a few units the bound on a correct mechanism is expected far below the
claim (docs/method.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from patchdp import _validation
from patchdp.inclusion import Patch, inclusion_map
from patchdp.mechanism import DPSGD
from patchdp.progress import Progress

__all__ = ["p_value", "epsilon_lower_bound", "GUESS_FRACTIONS", "OneRunBound", "guessing_bound", "Canaries",
           "make_canaries", "canary_loss", "canary_scores", "OneRunAudit", "audit_run"]

GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2)
"""Default guesses: "in" for the top k⁺ = f·m scores, f in these fractions, no "out"
guesses (a canary that no crop met scores like an absent one, so low scores say little)."""

SCORES = ("final", "steps")
_BLACK = 0  # packed RGB of zero padding: never a canary colour


# =========================================================================== the bound


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The theorem's bound on P[W ≥ v] for r guesses on m canaries of an (ε, δ)-DP run
    (module docstring), in [0, 1]. Exact binomial tails (scipy), no approximation."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}.")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v − i ≤ Bin < v], i = 1 … v
    return min(1.0, tail + 2 * m * delta * float(np.max(below / np.arange(1, v + 1))))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float, *, tolerance: float = 1e-6) -> float:
    """The largest ε (to ``tolerance``, rounded down) with ``p_value(m, r, v, ε, δ) < β``,
    or 0 when even ε = 0 is not rejected: with probability ≥ 1 − β, the run is not
    (ε', δ)-DP for any ε' below it. Bisection (the p-value decreases in ε)."""
    _validation.number("beta (1 − confidence)", beta, 0, 1, low_open=True, high_open=True)
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < beta:
        low, high = high, 2 * high
        if high > 1e3:
            raise ValueError(f"the p-value stays below {beta} for every ε (v={v}, r={r}, m={m}, δ={delta}).")
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < beta else (low, middle)
    return low


@dataclasses.dataclass(frozen=True)
class OneRunBound:
    """The best of the tried (score, k⁺, k⁻): ``epsilon`` holds at ``confidence`` for
    all of them together (each was computed at β / ``tried``)."""

    epsilon: float
    confidence: float
    score: str
    guesses_in: int
    guesses_out: int
    correct: int
    canaries: int
    tried: int


def guessing_bound(scores: Mapping[str, np.ndarray], included: np.ndarray, delta: float, *,
                   confidence: float = 0.95, pairs: Sequence[tuple[int, int]] | None = None) -> OneRunBound:
    """The one-run lower bound on ε from scores (name → float array (m,), higher = "in")
    and the true coins ``included`` (bool (m,)), union-bounded over every score and every
    (k⁺, k⁻) of ``pairs`` (default: (f·m, 0) for f in :data:`GUESS_FRACTIONS`). The
    scores and pairs must not depend on the coins (fix them before the run)."""
    included = np.asarray(included, bool)
    m = included.size
    pairs = [(max(1, int(f * m)), 0) for f in GUESS_FRACTIONS] if pairs is None else list(pairs)
    if any(kp < 0 or km < 0 or kp + km > m or kp + km == 0 for kp, km in pairs):
        raise ValueError(f"every (k+, k-) must be >= 0 with 0 < k+ + k- <= m = {m}, got {pairs}.")
    beta = (1 - confidence) / (len(scores) * len(pairs))
    best = None
    for name, score in scores.items():
        order = np.argsort(-np.asarray(score, np.float64), kind="stable")
        for kp, km in pairs:
            correct = int(included[order[:kp]].sum() + (~included[order[m - km:]]).sum())
            epsilon = epsilon_lower_bound(m, kp + km, correct, delta, beta)
            if best is None or epsilon > best.epsilon:
                best = OneRunBound(epsilon, confidence, name, kp, km, correct, m, len(scores) * len(pairs))
    return best


# =========================================================================== the canaries


@dataclasses.dataclass(frozen=True)
class Canaries:
    """m patch canaries (all arrays (m,), numpy).

    Attributes:
      indices: the training images that carry them (distinct).
      included: the secret coins: True where the image carries its canary (S_i = +1).
      colours: each canary's packed RGB colour (r·2¹⁶ + g·2⁸ + b), distinct, occurring in
        no training image and not black (the crops' zero padding).
      rows, cols: the placement t_i of R's bounding box (unpadded pixel coordinates).
      hit_probability: p(t_i), the probability that one crop meets canary i.
      patch: the protected shape R.
    """

    indices: np.ndarray
    included: np.ndarray
    colours: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    hit_probability: np.ndarray
    patch: Patch

    def paint(self, images: np.ndarray, batch_indices: np.ndarray) -> np.ndarray:
        """The batch as the run sees it: uint8 images (B, H, W, 3) of dataset rows
        ``batch_indices`` (B,), with every included canary painted in its colour on R."""
        images = np.array(images, copy=True)
        slot = {int(i): c for c, i in enumerate(self.indices) if self.included[c]}
        ph, pw = self.patch.shape
        rgb = np.stack([(self.colours >> s) & 255 for s in (16, 8, 0)], axis=-1).astype(np.uint8)
        for b, index in enumerate(np.asarray(batch_indices)):
            c = slot.get(int(index))
            if c is not None:
                region = images[b, self.rows[c]:self.rows[c] + ph, self.cols[c]:self.cols[c] + pw]
                region[self.patch.mask] = rgb[c]
        return images


def _colours_in(dataset, chunk: int = 512) -> np.ndarray:
    """The sorted distinct packed RGB colours of every image of ``dataset``."""
    seen = []
    for start in range(0, len(dataset), chunk):
        image = dataset.get_batch(np.arange(start, min(start + chunk, len(dataset))))["image"].astype(np.int32)
        seen.append(np.unique((image[..., 0] << 16) | (image[..., 1] << 8) | image[..., 2]))
    return np.unique(np.concatenate(seen + [np.asarray([_BLACK])]))


def make_canaries(dataset, mechanism: DPSGD, count: int, key: jax.Array, *, placement: str = "worst") -> Canaries:
    """``count`` canaries for training ``dataset`` (RGB, uint8) under ``mechanism``.

    ``key`` (secret) draws the images, the coins (fair, independent) and, with
    ``placement = "random"``, each canary's placement uniformly over the valid ones;
    ``"worst"`` puts every canary at t* = argmax p(t) (:func:`patchdp.inclusion_map`).
    Scans every training image once for its colours.
    """
    n, shape = len(dataset), dataset.image_shape
    _validation.integer("canaries (m)", count)
    if count > n:
        raise ValueError(f"canaries: m = {count} exceeds the {n} training images.")
    if shape[2] != 3:
        raise ValueError(f"one-run audit needs RGB images (a canary is a colour no image has), got {shape}.")
    if placement not in ("worst", "random"):
        raise ValueError(f"placement must be 'worst' or 'random', got {placement!r}.")
    pick, coins, place = jax.random.split(key, 3)
    if mechanism.crop is None:  # whole images: every placement is seen
        p = np.ones((shape[0] - mechanism.patch.shape[0] + 1, shape[1] - mechanism.patch.shape[1] + 1))
    else:
        p = inclusion_map(shape[:2], mechanism.crop, mechanism.patch)
    if placement == "worst":
        flat = np.full(count, int(np.argmax(p)))
    else:
        flat = np.asarray(jax.random.randint(place, (count,), 0, p.size))
    rows, cols = np.unravel_index(flat, p.shape)
    used = _colours_in(dataset)
    free = 2 ** 24 - used.size
    if free < count:
        raise ValueError(f"only {free} colours are unused by the training images; m = {count} canaries need "
                         "one each.")
    # evenly spread over the unused colours, the same for every key: the colours need no secrecy, and runs
    # of one config then compile to the same program (a persistent compilation cache reuses it)
    ranks = np.arange(count) * (free // count)
    return Canaries(indices=np.asarray(jax.random.choice(pick, n, (count,), replace=False)),
                    included=np.asarray(jax.random.bernoulli(coins, 0.5, (count,))),
                    colours=_kth_unused(used, ranks), rows=rows, cols=cols,
                    hit_probability=p[rows, cols], patch=mechanism.patch)


def _kth_unused(used: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """For sorted distinct ``used`` and ``ranks`` (0-based), the ranks-th integers ≥ 0 not in ``used``."""
    gaps = used - np.arange(used.size)  # how many unused integers lie below used[j]
    return (ranks + np.searchsorted(gaps, ranks, side="right")).astype(np.int64)


def _detector(canaries: Canaries):
    """``shows(view) -> float32 (m,)``: 1 where the view (h, w, 3) has a pixel of canary i's colour."""
    order = np.argsort(canaries.colours)
    palette, owner = jnp.asarray(canaries.colours[order], jnp.int32), jnp.asarray(order, jnp.int32)
    m = palette.size

    def shows(view):
        v = view.astype(jnp.int32)
        packed = ((v[..., 0] << 16) | (v[..., 1] << 8) | v[..., 2]).ravel()
        slot = jnp.minimum(jnp.searchsorted(palette, packed), m - 1)
        return jnp.zeros(m, jnp.float32).at[owner[slot]].max((palette[slot] == packed).astype(jnp.float32))

    return shows


def canary_loss(loss_fn, canaries: Canaries, mechanism: DPSGD):
    """The audited loss on params ``{"model": …, "canary": θ (m,)}``: ``loss_fn`` on a view
    that shows no canary, else ``2KC · Σ_i θ_i · shows_i(view)`` (K crops per example, C
    the clip norm): a view that shows canary i gives the gradient 2KC·e_i, clipped to
    exactly C·e_i (K = 1)."""
    shows = _detector(canaries)
    k = 1 if mechanism.crop is None else mechanism.crop.crops_per_example
    scale = 2.0 * k * mechanism.clip_norm

    def loss(params, image, label):
        seen = shows(image)
        own = loss_fn(params["model"], image, label)
        return jnp.where(jnp.max(seen) > 0, 0.0, own) + scale * jnp.dot(params["canary"], seen)

    return loss


def _with_canary_head(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` for ``params["model"]``, SGD at learning rate 1 for ``params["canary"]``."""
    return optax.multi_transform({"model": optimizer, "canary": optax.sgd(1.0)},
                                 {"model": "model", "canary": "canary"})


def canary_scores(updates: np.ndarray, canaries: Canaries, mechanism: DPSGD, *, test_noise: float) -> dict:
    """The scores (module docstring) from ``updates`` (T, m): step t's noisy clipped sum in
    canary i's coordinate in units of C (x_{t,i} = −Δθ_{t,i}·E[B]/C). ``"final"`` needs only
    their sum, i.e. the final parameters; ``"steps"`` needs every update."""
    w = mechanism.sampling_rate * canaries.hit_probability
    log_ratio = np.logaddexp(np.log1p(-w), np.log(w) + (updates - 0.5) / test_noise ** 2)
    return {"final": updates.sum(axis=0), "steps": log_ratio.sum(axis=0)}


# =========================================================================== one audited run


@dataclasses.dataclass(frozen=True)
class OneRunAudit:
    """One audited run.

    Attributes:
      bound: the :class:`OneRunBound` (``bound.epsilon``: the lower bound at ``bound.confidence``).
      epsilon_patch: the accounted patch-level ε at δ of the steps taken (the claim).
      epsilon_image: image-level ε (w = q) at the same noise, steps and δ.
      inclusion_probability: p* of the claimed mechanism.
      delta, steps, placement, seconds: the setting and the wall time.
      marks: the :class:`Canaries` (with the secret coins).
      updates: float64 (T, m), x_{t,i}: step t's noisy clipped sum in canary i's
        coordinate, in units of C (what the scores are computed from).
      flagged: the bound exceeds the claim — the run leaks more than accounted, with
        probability ≥ ``bound.confidence``.
    """

    bound: OneRunBound
    epsilon_patch: float
    epsilon_image: float
    inclusion_probability: float
    delta: float
    steps: int
    placement: str
    seconds: float
    marks: Canaries = dataclasses.field(repr=False)
    updates: np.ndarray = dataclasses.field(repr=False)

    @property
    def flagged(self) -> bool:
        return bool(self.bound.epsilon > self.epsilon_patch)


def audit_run(config, *, canaries: int = 2000, key: jax.Array, placement: str = "worst",
              confidence: float = 0.95, running: Callable[[DPSGD], DPSGD] | None = None, test_noise: float | None = None,
              progress: bool = True) -> OneRunAudit:
    """Trains ``config`` once with ``canaries`` patch canaries and audits the run.

    Args:
      config: a :class:`patchdp.config.Config` (RGB dataset, patch-level accounting); its
        plan (:func:`patchdp.trainer.make_plan`) is the claimed mechanism, its model,
        loss, optimizer, sampling seed and step keys are the run's (``config.seed``).
      canaries: m.
      key: the auditor's secret key (canary images, coins, placements).
      placement: ``"worst"`` (t* for all) or ``"random"``.
      confidence: 1 − β of the bound (over all tried scores and guesses).
      running: ``claimed -> the mechanism the steps really run``, default the claimed one
        itself. A deliberately broken run passes another, e.g.
        ``lambda m: m.replace(noise_multiplier=0)``; the claim stays the plan's.
      test_noise: σ of the ``"steps"`` score, default the claimed z / 4.
    """
    from patchdp.data import IGNORE_LABEL
    from patchdp.models import get_model
    from patchdp.run_dir import Seeds
    from patchdp.task import load_dataset, make_loss
    from patchdp.trainer import make_optimizer, make_plan
    from patchdp.training import Batch, TrainState, make_train_step

    started = time.perf_counter()
    train_set = load_dataset(config, config.train_split)
    plan = make_plan(config, len(train_set), train_set.image_shape)
    claimed = plan.mechanism
    if claimed.accounting != "patch" or claimed.noise_multiplier <= 0:
        raise ValueError("one-run audit needs patch-level accounting and a claimed noise multiplier z > 0.")
    running = claimed if running is None else running(claimed)
    marks = make_canaries(train_set, claimed, canaries, key, placement=placement)
    model = get_model(config.model, train_set.num_classes, **config.model_options)
    optimizer = _with_canary_head(make_optimizer(config))
    step = make_train_step(canary_loss(make_loss(model, train_set.task, config.input_normalization), marks, running),
                           optimizer, running, flip=config.flip, label_fill=IGNORE_LABEL,
                           microbatch_size=config.microbatch_size)
    seeds = Seeds.create(config.seed)
    h, w = running.crop.output_size if running.crop is not None else train_set.image_shape[:2]
    params = jax.jit(model.init)(seeds.init_key(), jnp.zeros((1, h, w, 3)))["params"]
    state = TrainState.create({"model": params, "canary": jnp.zeros(canaries, jnp.float32)}, optimizer)
    step_key, updates = seeds.step_keys(), np.zeros((plan.steps, canaries), np.float64)
    unit = running.expected_batch_size / running.clip_norm
    console = Progress(plan.steps, enabled=progress, description="one-run audit")
    console.compiling()
    before = np.zeros(canaries)
    for t in range(plan.steps):
        chosen = running.sampling.sample(seeds.sampling, t)
        data = train_set.get_batch(chosen.indices)
        batch = Batch(marks.paint(data["image"], chosen.indices), data["label"], chosen.mask)
        state, _ = step(state, jax.device_put(batch), step_key(t))
        after = np.asarray(state.params["canary"], np.float64)
        updates[t] = (before - after) * unit
        before = after
        console.update(t + 1)
    console.close()
    sigma = claimed.noise_multiplier / 4 if test_noise is None else test_noise
    bound = guessing_bound(canary_scores(updates, marks, claimed, test_noise=sigma), marks.included,
                           claimed.delta, confidence=confidence)
    return OneRunAudit(bound, claimed.epsilon(plan.steps), claimed.replace(accounting="image").epsilon(plan.steps),
                       claimed.inclusion_probability, claimed.delta, plan.steps, placement,
                       time.perf_counter() - started, marks, updates)
