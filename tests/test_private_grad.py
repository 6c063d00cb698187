"""The pieces for an own training loop: private_grad (per-example clipped gradients of
each example's crops) against a per-example loop written out by hand, for a linen and
an NNX model; gaussian_noise as a pure optax transformation; make_train_step as their
composition; the augment hook (Gaussian pixel noise before cropping)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats

import patchdp
from patchdp import crops

CLASSES = 3
SPEC = patchdp.CropSpec(4, padding=1, crops_per_example=2)
C = 1.0  # between the per-example gradient norms here (0.84 to 1.38): some examples are clipped, some not


def batch_of(size=5, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    image = jax.random.normal(keys[0], (size, 6, 6, 1))
    label = jax.random.randint(keys[1], (size,), 0, CLASSES)
    return patchdp.Batch(image, label, jnp.arange(size) != 2)  # slot 2 is padding


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(2, (3, 3))(x))
        return nn.Dense(CLASSES)(x.mean(axis=(1, 2)))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 2, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(2, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.dense(nnx.relu(self.conv(x)).mean(axis=(1, 2)))


def linen_problem():
    model = LinenNet()
    params = model.init(jax.random.key(1), jnp.zeros((1, 4, 4, 1)))["params"]
    return params, patchdp.linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)


def nnx_problem():
    graphdef, params = nnx.split(NNXNet(nnx.Rngs(1)))

    def loss_fn(params, image, label):
        logits = nnx.merge(graphdef, params)(image[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, label)

    return params, loss_fn


def by_hand(loss_fn, params, batch, key, clip_norm):
    """Σ over valid examples of clip(∇ mean over the K crops of the loss), one at a time."""
    return by_hand_with_keys(loss_fn, params, batch, jax.random.split(key, batch.image.shape[0]), clip_norm)


def by_hand_with_keys(loss_fn, params, batch, crop_keys, clip_norm):
    """by_hand with example i cropped by ``crop_keys[i]``."""
    total = jax.tree.map(lambda p: np.zeros(p.shape), params)
    clipped = 0
    for i, example_key in enumerate(crop_keys):
        if not batch.mask[i]:
            continue

        def mean_loss(p):
            images, labels = crops.crop(SPEC, example_key, batch.image[i], batch.label[i])
            return sum(loss_fn(p, x, y) for x, y in zip(images, labels)) / len(images)

        grad = jax.grad(mean_loss)(params)
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grad)))
        clipped += norm > clip_norm
        total = jax.tree.map(lambda t, g: t + np.asarray(g) * min(1, clip_norm / norm), total, grad)
    return total, clipped


@pytest.mark.parametrize("make", [linen_problem, nnx_problem], ids=["linen", "nnx"])
def test_private_grad_is_the_sum_of_clipped_per_example_crop_gradients(make):
    params, loss_fn = make()
    batch, key = batch_of(), jax.random.key(7)
    grad_fn = jax.jit(patchdp.private_grad(loss_fn, crop=SPEC, clip_norm=C, microbatch_size=5))
    grads, stats = grad_fn(params, batch, key)
    want, clipped = by_hand(loss_fn, params, batch, key, C)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert stats["valid"] == 4 and stats["nonfinite"] == 0
    assert 0 < clipped < 4 and stats["clipped_fraction"] == pytest.approx(clipped / 4)


def test_private_grad_counts_non_finite_examples_and_drops_them():
    params, loss_fn = linen_problem()
    batch = batch_of()
    poisoned = batch._replace(image=batch.image.at[0].set(jnp.inf))
    grad_fn = jax.jit(patchdp.private_grad(loss_fn, crop=SPEC, clip_norm=C))
    grads, stats = grad_fn(params, poisoned, jax.random.key(0))
    want, _ = grad_fn(params, batch._replace(mask=batch.mask.at[0].set(False)), jax.random.key(0))
    assert stats["nonfinite"] == 1 and stats["valid"] == 4
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_gaussian_noise_is_pure_and_adds_z_c_noise_once_then_divides():
    z, expected_batch = 1.5, 8.0
    noise = patchdp.gaussian_noise(z, C, expected_batch)
    zeros = {"w": jnp.zeros((200, 100))}
    state = noise.init(zeros)
    assert state == optax.EmptyState()
    a, state_a = noise.update(zeros, state, noise_key=jax.random.key(3))
    b, _ = noise.update(zeros, state, noise_key=jax.random.key(3))
    c, _ = noise.update(zeros, state, noise_key=jax.random.key(4))
    assert state_a == state
    np.testing.assert_array_equal(a["w"], b["w"])  # the key is the only source of randomness
    assert not np.array_equal(a["w"], c["w"])
    assert np.std(a["w"]) == pytest.approx(z * C / expected_batch, rel=0.02)
    with pytest.raises(TypeError, match="noise_key"):
        noise.update(zeros, state)
    silent, _ = patchdp.gaussian_noise(0.0, C, 4.0).update({"w": jnp.full(3, 8.0)}, state)
    np.testing.assert_array_equal(silent["w"], 2.0)  # z = 0: only the division, no key needed


def test_optax_chain_of_the_pieces_is_the_train_step():
    params, loss_fn = linen_problem()
    batch, key, z, lr = batch_of(), jax.random.key(11), 0.8, 0.5
    optimizer = optax.chain(patchdp.gaussian_noise(z, C, 5.0), optax.adam(lr))
    grad_fn = patchdp.private_grad(loss_fn, crop=SPEC, clip_norm=C)
    crop_key, noise_key = jax.random.split(key)
    grads, _ = grad_fn(params, batch, crop_key)
    updates, _ = optimizer.update(grads, optimizer.init(params), params, noise_key=noise_key)
    want = optax.apply_updates(params, updates)
    mechanism = patchdp.DPSGD(sampling=patchdp.PoissonSampling(rate=0.005, dataset_size=1000), clip_norm=C,
                              noise_multiplier=z, delta=1e-4, crop=SPEC, accounting="image")
    assert mechanism.expected_batch_size == 5.0
    step = patchdp.make_train_step(loss_fn, optax.adam(lr), mechanism)
    copy = jax.tree.map(jnp.copy, params)
    state, _ = step(patchdp.TrainState.create(copy, optax.adam(lr)), batch, key)
    for got, expected in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(crop=(4, 4), clip_norm=1.0), "CropSpec"),
    (dict(crop=SPEC, clip_norm=0.0), "clip_norm"),
    (dict(crop=SPEC, clip_norm=1.0, microbatch_size=0), "microbatch_size"),
])
def test_private_grad_rejects_bad_settings_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        patchdp.private_grad(lambda p, x, y: 0.0, **kwargs)


def test_gaussian_pixel_noise_has_std_sigma_and_keeps_the_pixel_values():
    sigma = 30.0
    image = jnp.full((64, 64, 3), 200, jnp.uint8)
    noisy = patchdp.gaussian_pixel_noise(sigma)(image, jax.random.key(5))
    assert noisy.dtype == jnp.float32 and noisy.shape == image.shape
    standardized = (np.asarray(noisy, np.float64).ravel() - 200.0) / sigma  # not clipped to 255
    assert stats.kstest(standardized, "norm").pvalue > 1e-3
    with pytest.raises(ValueError, match="std"):
        patchdp.gaussian_pixel_noise(0.0)


def test_the_augment_hook_draws_independent_noise_per_example():
    """loss = Σ w·image: the non-private gradient sum is Σ_i of the (noisy) images, of
    std σ·sqrt(n) for n independent draws (σ·n if the examples shared their noise)."""
    n, sigma = 4, 10.0
    batch = patchdp.Batch(jnp.zeros((n, 32, 32, 1), jnp.uint8), jnp.zeros(n, jnp.int32))
    grad_fn = patchdp.private_grad(lambda w, x, y: jnp.sum(w * x), crop=None, clip_norm=None,
                                   augment=patchdp.gaussian_pixel_noise(sigma))
    grads, _ = grad_fn(jnp.zeros((32, 32, 1)), batch, jax.random.key(2))
    assert np.std(grads) == pytest.approx(sigma * np.sqrt(n), rel=0.1)


def test_private_grad_with_augment_crops_each_examples_augmented_image():
    """Against the loop by hand: example i's key splits into (crop key, augmentation key)."""
    params, loss_fn = linen_problem()
    batch, key, augment = batch_of(), jax.random.key(7), patchdp.gaussian_pixel_noise(0.5)
    example_keys = jax.random.split(key, batch.image.shape[0])
    crop_keys, noisy = [], []
    for example_key, image in zip(example_keys, batch.image):
        crop_key, augment_key = jax.random.split(example_key)
        crop_keys.append(crop_key)
        noisy.append(augment(image, augment_key))
    want, _ = by_hand_with_keys(loss_fn, params, batch._replace(image=jnp.stack(noisy)), crop_keys, C)
    grad_fn = jax.jit(patchdp.private_grad(loss_fn, crop=SPEC, clip_norm=C, augment=augment))
    grads, _ = grad_fn(params, batch, key)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
