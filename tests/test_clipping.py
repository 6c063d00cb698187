"""Per-example clipping: norms ≤ C whatever the input, agreement with an explicit
per-example loop, and microbatching that changes nothing but memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from patchdp.clipping import clip_per_example, clipped_grad_sum, per_example_grads

SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
BATCH = 6


def flat(tree):
    """(B, P) float64 matrix of per-example gradients."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1)


CLIP = jax.jit(clip_per_example)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), clip_norm=st.sampled_from([1e-3, 0.5, 1.0, 7.0, 1e4]),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       log_scale=st.lists(st.floats(-8, 8), min_size=BATCH, max_size=BATCH))
def test_every_clipped_norm_is_at_most_c(seed, clip_norm, dtype, log_scale):
    rng = np.random.default_rng(seed)
    scale = np.power(10.0, log_scale)
    with np.errstate(over="ignore"):  # float16 overflows to inf: such examples count as non-finite
        grads = {k: jnp.asarray(rng.normal(size=(BATCH,) + s) * scale.reshape((-1,) + (1,) * len(s)), dtype)
                 for k, s in SHAPES.items()}
    # example 0 gets a NaN, example 1 an inf, example 2 is padding
    grads["w"] = grads["w"].at[0, 1, 2].set(jnp.nan).at[1, 0, 0].set(jnp.inf)
    mask = jnp.arange(BATCH) != 2
    clipped, norms = CLIP(grads, clip_norm, mask)
    assert all(x.dtype == jnp.promote_types(dtype, jnp.float32) for x in jax.tree.leaves(clipped))
    got = np.linalg.norm(flat(clipped), axis=1)
    assert (got <= clip_norm * (1 + 1e-6)).all()
    raw = flat(grads)
    kept = np.isfinite(raw).all(axis=1) & np.asarray(mask)
    assert not kept[:3].any() and (got[~kept] == 0).all()  # non-finite and padded slots: exactly zero
    raw = raw[kept]
    want = raw * np.minimum(1, clip_norm / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-300))
    np.testing.assert_allclose(flat(clipped)[kept], want, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(np.asarray(norms)[kept], np.linalg.norm(raw, axis=1), rtol=1e-5)


def mlp_loss(params, example):
    """A tiny two-layer network on one example (x: (3,), y: scalar)."""
    x, y = example
    hidden = jnp.tanh(x @ params["w"] + params["b"])
    return (hidden @ params["v"] - y) ** 2


def toy_problem():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(keys[0], (3, 4)), "b": jnp.zeros(4), "v": jax.random.normal(keys[1], (4,))}
    x = 3 * jax.random.normal(keys[2], (12, 3))
    y = jax.random.normal(keys[3], (12,))
    x = x.at[4, 1].set(jnp.nan)  # a non-finite example
    mask = jnp.arange(12) < 10  # two padded slots
    return params, (x[:, None], y[:, None]), mask  # one view per example


def test_vmapped_sum_equals_an_explicit_per_example_loop():
    params, (x, y), mask = toy_problem()
    clip_norm = 1.5
    total, stats = jax.jit(lambda p: clipped_grad_sum(mlp_loss, p, (x, y), mask, clip_norm=clip_norm))(params)
    want = np.zeros(flat(jax.tree.map(lambda a: a[None], params)).shape[1])
    loss_sum = clipped = nonfinite = 0
    single = jax.jit(jax.value_and_grad(mlp_loss))
    for i in range(12):
        if not mask[i]:
            continue
        loss, grad = single(params, (x[i, 0], y[i, 0]))
        g = flat(jax.tree.map(lambda a: a[None], grad))[0]
        norm = np.linalg.norm(g)
        if not np.isfinite(norm):
            nonfinite += 1
            continue
        want += g * min(1.0, clip_norm / norm)
        loss_sum += float(loss)
        clipped += norm > clip_norm
    np.testing.assert_allclose(flat(jax.tree.map(lambda a: a[None], total))[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.loss_sum, loss_sum, rtol=1e-5)
    assert (stats.valid, stats.clipped, stats.nonfinite) == (10, clipped, nonfinite)
    assert 0 < clipped < 9  # the problem exercises both branches


@pytest.mark.parametrize("microbatch_size", [1, 3, 4])
@pytest.mark.parametrize("unroll", [True, False])
@pytest.mark.parametrize("clip_norm", [1.5, None])
def test_microbatched_equals_unbatched(microbatch_size, unroll, clip_norm):
    params, examples, mask = toy_problem()
    if clip_norm is None:  # the non-private path has no per-example NaN filter
        examples = (jnp.nan_to_num(examples[0]), examples[1])
    run = lambda size: jax.jit(lambda p: clipped_grad_sum(
        mlp_loss, p, examples, mask, clip_norm=clip_norm, microbatch_size=size, unroll=unroll))(params)
    whole, chunked = run(None), run(microbatch_size)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_private_path_is_the_gradient_of_the_masked_loss_sum():
    params, (x, y), mask = toy_problem()
    x = jnp.nan_to_num(x)
    total, stats = clipped_grad_sum(mlp_loss, params, (x, y), mask, clip_norm=None)
    masked = lambda p: jnp.sum(jnp.where(mask, jax.vmap(mlp_loss, (None, 0))(p, (x[:, 0], y[:, 0])), 0))
    want = jax.grad(masked)(params)
    for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert stats.clipped == 0 and stats.valid == 10


def test_per_example_grads_match_single_example_grads():
    params, (x, y), _ = toy_problem()
    losses, grads = per_example_grads(mlp_loss, params, (x[:3], y[:3]))
    for i in range(3):
        loss, grad = jax.value_and_grad(mlp_loss)(params, (x[i, 0], y[i, 0]))
        np.testing.assert_allclose(losses[i], loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grad)):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(clip_norm=float("inf")), "clip_norm"),
    (dict(clip_norm=1.0, microbatch_size=5), "microbatch_size"),
    (dict(clip_norm=1.0, microbatch_size=0), "microbatch_size"),
])
def test_invalid_arguments_are_rejected(kwargs, message):
    params, examples, mask = toy_problem()
    with pytest.raises(ValueError, match=message):
        clipped_grad_sum(mlp_loss, params, examples, mask, **kwargs)
