"""The Gaussian mechanism: noise of std z·C on the clipped sum, once, then / E[B]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from patchdp.noise import add_noise, noisy_mean

Z, C = 1.3, 0.7


def zero_tree():
    return {"a": jnp.zeros((100, 120)), "b": {"c": jnp.zeros((8000,))}}


NOISE = jax.jit(lambda key, tree: add_noise(key, tree, noise_multiplier=Z, clip_norm=C))


def noise_samples(key=jax.random.key(0)):
    noisy = NOISE(key, zero_tree())
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(noisy)])


def test_kolmogorov_smirnov_accepts_z_times_c_and_rejects_other_scales():
    samples = noise_samples()
    assert samples.size == 20_000
    assert stats.kstest(samples, "norm", args=(0, Z * C)).pvalue > 1e-3
    assert stats.kstest(samples, "norm", args=(0, 2 / 3 * Z * C)).pvalue < 1e-6
    assert stats.kstest(samples, "norm", args=(0, 1.5 * Z * C)).pvalue < 1e-6
    # and not the classic bug: a std computed for sensitivity 2C
    assert stats.kstest(samples, "norm", args=(0, 2 * Z * C)).pvalue < 1e-6


def test_leaves_get_independent_noise_and_keys_matter():
    tree = {"x": jnp.zeros(5000), "y": jnp.zeros(5000)}
    noisy = add_noise(jax.random.key(1), tree, noise_multiplier=1.0, clip_norm=1.0)
    assert abs(np.corrcoef(noisy["x"], noisy["y"])[0, 1]) < 0.05
    np.testing.assert_array_equal(noise_samples(jax.random.key(3)), noise_samples(jax.random.key(3)))
    assert not np.array_equal(noise_samples(jax.random.key(3)), noise_samples(jax.random.key(4)))


def test_noise_is_added_to_the_sum_and_then_divided_by_the_expected_batch_size():
    key, tree = jax.random.key(2), {"g": jnp.arange(6.0)}
    noisy = add_noise(key, tree, noise_multiplier=Z, clip_norm=C)
    mean = noisy_mean(key, tree, noise_multiplier=Z, clip_norm=C, expected_batch_size=12.5)
    np.testing.assert_allclose(mean["g"], noisy["g"] / 12.5, rtol=1e-6)
    assert not np.allclose(noisy["g"], tree["g"])


def test_zero_noise_returns_the_sum_untouched():
    tree = {"g": jnp.arange(4.0)}
    assert add_noise(jax.random.key(0), tree, noise_multiplier=0.0, clip_norm=None) is tree
    mean = noisy_mean(jax.random.key(0), tree, noise_multiplier=0, clip_norm=None, expected_batch_size=4)
    np.testing.assert_array_equal(mean["g"], tree["g"] / 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=-1.0, clip_norm=1.0), "noise_multiplier"),
    (dict(noise_multiplier=float("nan"), clip_norm=1.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, clip_norm=None), "needs a clip_norm"),
    (dict(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=0), "expected_batch_size"),
])
def test_invalid_arguments_are_rejected(kwargs, message):
    kwargs.setdefault("expected_batch_size", 8)
    with pytest.raises(ValueError, match=message):
        noisy_mean(jax.random.key(0), {"g": jnp.zeros(3)}, **kwargs)
