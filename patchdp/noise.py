"""Gaussian noise on the sum of clipped gradients: the Gaussian mechanism of DP-SGD.

The accountant's noise multiplier z is in units of the clip norm C: the sum S of
clipped per-example gradients (sensitivity 2C under substitution, ``patchdp.clipping``)
receives noise N(0, (z·C)² I), ONCE per logical step, and only then is divided by the
expected batch size (docs/method.md, "Units" and "The training step"):

    ĝ = (S + N(0, (z·C)² I)) / E[B],     E[B] = B (fixed-size batches) or q·N (Poisson).

Dividing by the *expected* rather than the realised batch size keeps the release a
post-processing of the noisy sum, so the realised size (private under Poisson
sampling) is never used.

Shard-aware by construction: these functions run inside the global-view ``jax.jit``
program, where ``jax.random.normal`` draws one global array for the whole parameter
tree. With replicated parameters every device computes the same draw; with sharded
parameters each device draws its own shard of that same array (threefry is
partitionable). Either way the noise is added once, never once per device or per
microbatch, and equals the single-device draw for the same key. (Inside a
``shard_map``, first ``psum`` the clipped sums, then call these with the same key on
every device.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from patchdp import _validation

__all__ = ["add_noise", "gaussian_noise", "noisy_mean", "validate_noise"]


def validate_noise(noise_multiplier, clip_norm, expected_batch_size=1.0) -> None:
    """Raises ValueError, in one line naming the value, unless z ≥ 0 is finite, C is a
    finite number > 0 (or None, only with z = 0: the noise is z·C), and the expected batch
    size is positive and finite (the shared checks of :mod:`patchdp._validation`)."""
    z = _validation.noise_multiplier(noise_multiplier)
    if clip_norm is None:
        if z > 0:
            raise ValueError("noise_multiplier > 0 needs a clip_norm: the noise std is z·C and only "
                             "clipped gradients have bounded sensitivity.")
    else:
        _validation.clip_norm(clip_norm)
    _validation.number("expected_batch_size (B for fixed-size batches, q·N for Poisson sampling)",
                       expected_batch_size, 0, math.inf, low_open=True)


def add_noise(key: jax.Array, grad_sum, *, noise_multiplier: float, clip_norm: float | None):
    """``grad_sum`` + independent N(0, (z·C)²) on every entry of every leaf.

    Args:
      key: PRNG key of this step's noise; a fresh key per step.
      grad_sum: the sum of clipped per-example gradients (any pytree of float arrays).
      noise_multiplier: z, the noise std in units of C (the accountant's z).
      clip_norm: C, the clip norm the sum was computed with (None only if z = 0).

    Returns the noisy sum, same structure and dtypes. With z = 0 it returns
    ``grad_sum`` unchanged and draws nothing.
    """
    validate_noise(noise_multiplier, clip_norm)
    if noise_multiplier == 0:
        return grad_sum
    stddev = noise_multiplier * clip_norm
    leaves, tree = jax.tree.flatten(grad_sum)
    keys = jax.random.split(key, len(leaves))
    noisy = [g + stddev * jax.random.normal(k, g.shape, g.dtype) for k, g in zip(keys, leaves)]
    return jax.tree.unflatten(tree, noisy)


def noisy_mean(key: jax.Array, grad_sum, *, noise_multiplier: float, clip_norm: float | None,
               expected_batch_size: float):
    """The private gradient estimate (S + N(0, (z·C)²)) / E[B]: :func:`add_noise`, then
    division by ``expected_batch_size`` (B, or q·N for Poisson sampling)."""
    validate_noise(noise_multiplier, clip_norm, expected_batch_size)
    noisy = add_noise(key, grad_sum, noise_multiplier=noise_multiplier, clip_norm=clip_norm)
    return jax.tree.map(lambda g: g / jnp.asarray(expected_batch_size, g.dtype), noisy)


def gaussian_noise(noise_multiplier: float, clip_norm: float | None,
                   expected_batch_size: float) -> optax.GradientTransformationExtraArgs:
    """The Gaussian mechanism as an optax transformation: :func:`noisy_mean` on the updates.

    ``update(grad_sum, state, params=None, *, noise_key)`` returns
    ((grad_sum + N(0, (z·C)² I)) / E[B], state), where ``grad_sum`` is the sum of clipped
    per-example gradients of one logical batch (:func:`patchdp.private_grad`). Chained
    before an optimizer it makes a DP optimizer::

        optimizer = optax.chain(patchdp.gaussian_noise(z, C, B), optax.adam(1e-3))
        updates, opt_state = optimizer.update(grad_sum, opt_state, params, noise_key=key)

    **Pure.** The state is ``optax.EmptyState()``: the transformation holds no random
    state. The noise comes only from ``noise_key``, an extra argument (optax passes extra
    keyword arguments through ``chain`` to the transformations that take them), which
    the caller must draw fresh and secret for every step, e.g.
    ``jax.random.fold_in(base_key, step)`` with ``base_key`` from OS entropy. The same
    key gives the same noise, so a step is reproducible from (state, batch, key).

    Once per logical step: apply it to the full clipped sum, outside any gradient
    accumulation (e.g. not inside ``optax.MultiSteps``), or the noise is added per
    microbatch and the accountant's z no longer describes it.

    Args:
      noise_multiplier: z ≥ 0, the noise std in units of C (the accountant's z);
        with z = 0 ``noise_key`` may be omitted.
      clip_norm: C, the clip norm of the summed gradients (None only with z = 0).
      expected_batch_size: B for fixed-size batches, q·N for Poisson sampling (the
        sampling scheme's ``expected_batch_size``): never the realised batch size.
    """
    validate_noise(noise_multiplier, clip_norm, expected_batch_size)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, noise_key=None, **extra_args):
        del params, extra_args
        if noise_key is None and noise_multiplier > 0:
            raise TypeError("gaussian_noise needs this step's key: update(grads, state, params, noise_key=key), "
                            "a fresh secret key every step.")
        key = jax.random.key(0) if noise_key is None else noise_key  # z = 0: no noise is drawn
        return noisy_mean(key, updates, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                          expected_batch_size=expected_batch_size), state

    return optax.GradientTransformationExtraArgs(init, update)
