"""Per-example gradients, clipped as a whole and summed, in microbatches.

The sensitivity of DP-SGD comes from here (docs/method.md, "The training step", steps 2–3). For a batch of
examples x_i with validity mask m_i, :func:`clipped_grad_sum` returns

    S = Σ_i  m_i · f_i · g_i · min(1, C / ‖g_i‖),      g_i = ∇_θ loss(θ, x_i),

where ‖g_i‖ is the L2 norm over *all* parameters together and f_i = 0 when g_i has a
non-finite entry (or its squared norm overflows float32), else 1. Every term has norm
≤ C (up to float32 rounding, relative ~1e-7), so replacing one example changes S by at
most 2C: the sensitivity the accountant assumes, in units of C. Padded slots (m_i = 0)
and non-finite examples contribute exactly zero.

Each example may have K views (e.g. K random crops); its loss is the mean over them, and
g_i is the gradient of that mean. The per-example norms and the sum come either from
per-example gradients (``vmap`` of ``grad``, method ``"per_example"``) or, by default,
from book-keeping (:mod:`patchdp.bookkeeping`), which gives the same result without
materialising the per-example gradients of the large layers.

A logical batch may be processed in physical microbatches whose clipped sums are
accumulated, so that peak memory follows the microbatch, not the logical batch; noise
is added once to the total afterwards (``patchdp.noise``). With ``clip_norm=None`` the
same function returns the plain gradient of the summed loss without per-example
gradients: the non-private baseline.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from patchdp import bookkeeping, program

__all__ = ["GradStats", "Schedule", "per_example_grads", "per_example_norms", "clip_per_example",
           "clipped_grad_sum", "default_schedule", "example_bytes", "validate_clip_norm", "validate_clipping",
           "example_loss", "CLIPPING"]

CLIPPING = ("auto", "per_example") + bookkeeping.METHODS

PyTree = object


class GradStats(NamedTuple):
    """Counts over a (logical) batch; float32 scalars so that they add across microbatches.

    Attributes:
      loss_sum: sum of the losses of valid examples with a finite gradient.
      valid: number of valid (non-padded) examples.
      clipped: valid, finite examples whose gradient norm exceeded C (and was scaled).
      nonfinite: valid examples with a non-finite gradient (they contributed zero).
    """

    loss_sum: jax.Array
    valid: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array


class Schedule(NamedTuple):
    """How a logical batch is processed (:func:`default_schedule`).

    Attributes:
      microbatch_size: examples per physical microbatch (divides the batch size).
      unroll: True: the microbatch loop unrolled; False: ``lax.scan``.
      basis: one line saying why (for the run's report: ``schedule._asdict()``).
    """

    microbatch_size: int
    unroll: bool
    basis: str


CPU_MICROBATCH = 8  # fastest measured on XLA:CPU (benchmarks/README.md): per-example work stays in cache
MAX_UNROLLED = 16  # unrolled copies compile one by one: bounds compile time
MEMORY_FRACTION = 0.5  # of an accelerator's memory, for one microbatch's activations and gradients


def default_schedule(batch_size: int, *, platform: str | None = None, example_bytes: int | None = None,
                     memory_bytes: int | None = None) -> Schedule:
    """The microbatch schedule used when none is given: a cost model, no tuning.

    - CPU: microbatches of about 8 examples, the loop unrolled: on XLA:CPU the private
      and the non-private step were both fastest so (0.76–0.94 of the whole batch's time
      on U-Net and ResNet-18, benchmarks/README.md), and a ``lax.scan`` loop makes
      backward passes 10–20× slower there. At most 16 unrolled copies (compile time
      grows with them): the smallest divisor of B that is ≥ max(8, B / 16).
    - Accelerators: the whole batch in one pass (their throughput grows with the batch)
      with ``lax.scan``, unless ``example_bytes`` × B exceeds half of ``memory_bytes``:
      then the largest divisor of B that fits.

    Args:
      batch_size: B, the logical batch.
      platform: "cpu", "gpu", "tpu", …; default ``jax.default_backend()``.
      example_bytes: estimated bytes one example needs (:func:`example_bytes`); None: no
        memory limit applied.
      memory_bytes: the device's memory; default its ``bytes_limit`` where JAX reports one.

    The clipped sum does not depend on the schedule (up to float32 summation order).
    """
    platform = platform or jax.default_backend()
    divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
    if platform == "cpu":
        micro = min(d for d in divisors if d >= min(batch_size, max(CPU_MICROBATCH, -(-batch_size // MAX_UNROLLED))))
        return Schedule(micro, True, f"cpu: microbatches of ~{CPU_MICROBATCH} (measured fastest), unrolled, "
                                     f"≤ {MAX_UNROLLED} copies")
    if memory_bytes is None:
        memory_bytes = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if example_bytes is None or memory_bytes is None:
        return Schedule(batch_size, False, f"{platform}: whole batch (no memory estimate)")
    fitting = [d for d in divisors if d * example_bytes <= MEMORY_FRACTION * memory_bytes]
    micro = max(fitting, default=1)
    return Schedule(micro, False, f"{platform}: largest divisor of the batch whose estimated "
                                  f"{micro * example_bytes / 2**20:.0f} MiB fit in half of "
                                  f"{memory_bytes / 2**30:.1f} GiB")


def example_bytes(loss_fn: Callable, params: PyTree, view: PyTree, views: int = 1) -> int:
    """A memory estimate for one example with ``views`` views: every value its loss's
    program computes (all kept for the backward pass, in the worst case) twice (the
    value and its gradient), per view, plus one copy of the parameters (its per-example
    gradient, in the worst case). ``view`` and ``params``: arrays or shapes."""
    traced = program.trace(loss_fn, params, view)
    values = sum(math.prod(a.shape) * a.dtype.itemsize for a in traced.avals.values() if hasattr(a, "shape"))
    weights = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(
        jax.eval_shape(lambda tree: tree, params)))
    return 2 * views * values + weights


def example_loss(loss_fn: Callable) -> Callable:
    """``(params, views) -> scalar``: the mean of ``loss_fn(params, view)`` over the views
    (leading axis K of every leaf of ``views``)."""
    return lambda params, views: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, views))


def per_example_grads(loss_fn: Callable, params: PyTree, examples: PyTree) -> tuple[jax.Array, PyTree]:
    """Losses (B,) and gradients (each leaf (B,) + the parameter's shape) of every
    example's mean view loss, ``examples`` having leaves (B, K, ...)."""
    return jax.vmap(jax.value_and_grad(example_loss(loss_fn)), in_axes=(None, 0))(params, examples)


def per_example_norms(grads: PyTree) -> jax.Array:
    """L2 norm over all leaves of each example's gradient: float32 array (B,).
    Non-finite if the gradient has a non-finite entry or its squared norm overflows."""
    return jnp.sqrt(sum(bookkeeping.squared_norms(g) for g in jax.tree.leaves(grads)))


def clip_per_example(grads: PyTree, clip_norm: float, mask: jax.Array | None = None
                     ) -> tuple[PyTree, jax.Array]:
    """Scales each example's whole gradient to norm ≤ ``clip_norm``.

    Args:
      grads: per-example gradients, every leaf with leading axis B.
      clip_norm: C > 0.
      mask: optional bool (B,); False marks a padded slot.

    Returns:
      (clipped, norms): clipped gradients (leaves promoted to at least float32), whose
      per-example norm is min(‖g_i‖, C) for valid finite examples and exactly 0 for
      padded slots and non-finite gradients; and the unclipped norms ‖g_i‖ (B,).
    """
    norms = per_example_norms(grads)
    keep = jnp.isfinite(norms) if mask is None else jnp.isfinite(norms) & mask
    scale = clip_norm / jnp.maximum(norms, clip_norm)

    def one(g):
        g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
        shape = (-1,) + (1,) * (g.ndim - 1)
        return jnp.where(keep.reshape(shape), g * scale.reshape(shape).astype(g.dtype), 0)

    return jax.tree.map(one, grads), norms


def clipped_grad_sum(loss_fn: Callable, params: PyTree, examples: PyTree, mask: jax.Array | None = None, *,
                     clip_norm: float | None, microbatch_size: int | None = None,
                     unroll: bool | None = None, clipping: str = "auto",
                     views: Callable | None = None) -> tuple[PyTree, GradStats]:
    """The sum of clipped per-example gradients over a logical batch, in microbatches.

    Args:
      loss_fn: ``loss_fn(params, view) -> scalar``, for ONE view of one example (a slice
        of ``examples`` along axes 0 and 1); an example's loss is its views' mean.
      params: the parameters (any pytree; may be sharded).
      examples: a pytree whose leaves have shape (B, K, ...): K views of each of B
        examples; or, with ``views``, any pytree with leading axis B.
      mask: optional bool (B,); False marks padded slots, which contribute nothing.
      clip_norm: C > 0; or None for the non-private baseline: the gradient of the
        masked loss sum, with no per-example gradients, no clipping, and non-finite
        losses left in (as in ordinary training).
      microbatch_size: examples per physical microbatch; must divide B. Default: the
        cost model :func:`default_schedule` (with ``unroll`` from it too, unless given).
        Microbatch j holds examples j, j + n, j + 2n, … (n = B / microbatch_size), so a
        batch sharded over devices in contiguous blocks gives every device a share of
        every microbatch.
      unroll: True unrolls the microbatch loop in Python, False uses ``lax.scan``.
        Default: unroll on CPU, where rolled loops make backward passes 10–20× slower
        (measured), and scan on accelerators, where it keeps the program small and
        peak memory at one microbatch (:func:`default_schedule`).
      clipping: how per-example norms and the clipped sum are computed, all exact:
        ``"auto"`` book-keeping with the cheapest method per layer
        (:func:`patchdp.bookkeeping.choose_method`); ``"direct"``, ``"unfold"`` or
        ``"ghost"`` book-keeping with that method for every layer that supports it;
        ``"per_example"`` ``vmap`` of per-example gradients of everything (the
        reference). Ignored by the non-private baseline.
      views: optional ``views(example) -> pytree with leaves (K, ...)``, the K views of
        one example (e.g. its random crops), formed inside the microbatch loop so that
        their memory follows the microbatch, not the logical batch.

    Returns:
      (S, stats): S has the structure of ``params`` with leaves of at least float32;
      stats are :class:`GradStats` over the whole logical batch.
    """
    size = jax.tree.leaves(examples)[0].shape[0]
    if mask is None:
        mask = jnp.ones(size, bool)
    micro = microbatch_size
    if micro is not None and (isinstance(micro, bool) or not isinstance(micro, numbers.Integral) or micro < 1
                              or size % micro):
        raise ValueError(f"microbatch_size must be a positive divisor of the batch size {size}, "
                         f"got {microbatch_size!r}; pad the batch or pick a divisor.")
    validate_clip_norm(clip_norm)
    validate_clipping(clipping)
    first = jax.tree.map(lambda x: x[0], examples)
    shapes = jax.eval_shape(views, first) if views is not None else first
    view = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), shapes)
    count_views = jax.tree.leaves(shapes)[0].shape[0]
    if micro is None:
        estimate = None if jax.default_backend() == "cpu" else example_bytes(loss_fn, params, view, count_views)
        schedule = default_schedule(size, example_bytes=estimate)
        micro, unroll = schedule.microbatch_size, schedule.unroll if unroll is None else unroll
    if unroll is None:
        unroll = jax.default_backend() == "cpu"
    if clip_norm is None:
        accumulate = lambda chunk: _plain_sum(loss_fn, params, chunk)
    elif clipping == "per_example":
        accumulate = lambda chunk: _private_sum(loss_fn, params, chunk, clip_norm)
    else:
        plan = bookkeeping.find_layers(loss_fn, params, view, method=clipping, views=count_views)
        accumulate = lambda chunk: _bookkeeping_sum(plan, params, chunk, clip_norm)
    one = accumulate if views is None else lambda chunk: accumulate((jax.vmap(views)(chunk[0]), chunk[1]))
    count = size // micro
    if count == 1:
        return one((examples, mask))
    # (B, ...) -> (micro, count, ...): microbatch j is [:, j], indexed, never transposed.
    grouped = jax.tree.map(lambda x: x.reshape((micro, count) + x.shape[1:]), (examples, mask))
    chunk = lambda j: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, j, 1, keepdims=False), grouped)
    add = lambda total, part: jax.tree.map(jnp.add, total, one(part))
    if unroll:
        total = one(chunk(0))
        for j in range(1, count):
            total = add(total, _after(total, chunk(j)))
        return total
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, chunk(0)))
    return jax.lax.scan(lambda total, j: (add(total, chunk(j)), None), zeros, jnp.arange(count))[0]


def _after(total, chunk):
    """``chunk`` made to depend on ``total`` by adding an exact zero computed from it.

    Unrolled, the microbatches are independent, and XLA:CPU (which drops
    ``optimization_barrier`` before scheduling) would run them side by side, so memory
    would follow the logical batch. This data dependency makes microbatch j start
    after microbatch j − 1 is summed, so memory follows the microbatch.
    """
    anchor = jax.tree.leaves(total)[0].ravel()[0]
    zero = jnp.where(jnp.isfinite(anchor), anchor, 0) * 0  # finite · 0: always ±0
    gate = lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.number) else x
    return jax.tree.map(gate, chunk)


def validate_clip_norm(clip_norm) -> None:
    """Raises ValueError unless ``clip_norm`` is None or a positive finite number."""
    if clip_norm is None:
        return
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real) or not 0 < clip_norm < math.inf:
        raise ValueError(f"clip_norm (C) must be a positive finite number, or None for the non-private "
                         f"baseline; got {clip_norm!r}.")


def validate_clipping(clipping) -> None:
    """Raises ValueError unless ``clipping`` is one of :data:`CLIPPING`."""
    if clipping not in CLIPPING:
        raise ValueError(f"clipping must be one of {CLIPPING} (all exact; 'auto' is the fastest), got {clipping!r}.")


def _private_sum(loss_fn, params, chunk, clip_norm):
    examples, mask = chunk
    losses, grads = per_example_grads(loss_fn, params, examples)
    clipped, norms = clip_per_example(grads, clip_norm, mask)
    total = jax.tree.map(lambda g: jnp.sum(g, axis=0), clipped)
    return total, _stats(losses, mask, jnp.isfinite(norms), norms > clip_norm)


def _bookkeeping_sum(plan, params, chunk, clip_norm):
    examples, mask = chunk
    total, losses, norms = bookkeeping.clipped_sum(plan, params, examples, mask, clip_norm)
    return total, _stats(losses, mask, jnp.isfinite(norms), norms > clip_norm)


def _plain_sum(loss_fn, params, chunk):
    examples, mask = chunk

    def masked_sum(p):
        losses = jax.vmap(example_loss(loss_fn), in_axes=(None, 0))(p, examples)
        return jnp.sum(jnp.where(mask, losses, 0)), losses

    (_, losses), total = jax.value_and_grad(masked_sum, has_aux=True)(params)
    total = jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), total)
    return total, _stats(losses, mask, jnp.isfinite(losses), jnp.zeros_like(mask))


def _stats(losses, mask, finite, clipped) -> GradStats:
    counted = mask & finite
    count = lambda flags: jnp.sum(flags, dtype=jnp.float32)
    return GradStats(loss_sum=jnp.sum(jnp.where(counted, losses, 0), dtype=jnp.float32),
                     valid=count(mask), clipped=count(counted & clipped), nonfinite=count(mask & ~finite))
