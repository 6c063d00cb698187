"""The DP-SGD step end to end: equal to the pipeline of docs/method.md, "The training step", written out by
hand, noise of the right size, deterministic, and the same on 8 devices as on 1."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from patchdp import crops
from patchdp.inclusion import CropSpec
from patchdp.mechanism import DPSGD
from patchdp.sampling import PoissonSampling
from patchdp.training import Batch, TrainState, linen_loss, make_train_step

CLASSES = 3
SPEC = CropSpec(4, padding=1, crops_per_example=2)


def pixel_loss(params, image, label):
    """Per-pixel linear classifier (a 1×1 convolution) on one (h, w, C) crop."""
    logits = image @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()


def problem(batch_size=6, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {"w": jax.random.normal(keys[0], (3, CLASSES)), "b": jnp.zeros(CLASSES)}
    image = 3 * jax.random.normal(keys[1], (batch_size, 6, 5, 3))
    label = jax.random.randint(keys[2], (batch_size, 6, 5), 0, CLASSES)
    mask = jnp.arange(batch_size) != 1  # slot 1 is padding
    return params, Batch(image, label, mask)


def mechanism(clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=6.0, **fields) -> DPSGD:
    """A mechanism whose expected batch size is ``expected_batch_size`` (Poisson sampling
    of 1000 examples at rate E[B]/1000), accounted at image level."""
    sampling = PoissonSampling(rate=expected_batch_size / 1000, dataset_size=1000)
    return DPSGD(sampling=sampling, clip_norm=clip_norm, noise_multiplier=noise_multiplier, delta=1e-4,
                 accounting="image", **fields)


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def test_step_equals_the_pipeline_written_out_by_hand():
    params, batch = problem()
    clip_norm, lr, expected = 1.7, 0.3, 5.5
    step = make_train_step(pixel_loss, optax.sgd(lr), mechanism(clip_norm, 0.0, expected, crop=SPEC), flip=True)
    key = jax.random.key(42)
    state, metrics = step(TrainState.create(copy(params), optax.sgd(lr)), batch, key)

    @jax.jit
    def by_hand(p, example_key, image, label):
        images, labels = crops.crop(SPEC, example_key, image, label, flip=True)
        losses = [pixel_loss(p, x, y) for x, y in zip(images, labels)]  # K = 2 crops
        return sum(losses) / len(losses)

    crop_key, _ = jax.random.split(key)
    total = {k: np.zeros(v.shape) for k, v in params.items()}
    losses, clipped = [], 0
    for i, example_key in enumerate(jax.random.split(crop_key, 6)):
        if not batch.mask[i]:
            continue
        # the mean of the K crop losses is differentiated, and only then clipped
        loss, grad = jax.value_and_grad(by_hand)(params, example_key, batch.image[i], batch.label[i])
        losses.append(loss)
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in grad.values()))
        clipped += norm > clip_norm
        for k in total:
            total[k] += np.asarray(grad[k]) * min(1, clip_norm / norm)
    for k in params:
        np.testing.assert_allclose(state.params[k], params[k] - lr * total[k] / expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5)
    assert metrics["valid"] == 5 and metrics["nonfinite"] == 0
    assert metrics["clipped_fraction"] == pytest.approx(clipped / 5) and 0 < clipped < 5
    assert int(state.step) == 1


def test_with_zero_gradients_the_update_is_the_noise_formula():
    z, clip_norm, lr, expected = 2.0, 0.5, 0.1, 12.5
    params = {"w": jnp.zeros((100, 200)), "b": jnp.zeros(7)}
    no_signal = lambda p, image, label: 0.0 * (jnp.sum(p["w"]) + jnp.sum(p["b"])) + jnp.sum(image) * 0
    step = make_train_step(no_signal, optax.sgd(lr), mechanism(clip_norm, z, expected))
    _, batch = problem()
    state, _ = step(TrainState.create(copy(params), optax.sgd(lr)), batch, jax.random.key(0))
    update = np.concatenate([np.ravel(state.params[k] - params[k]) for k in params])
    std = lr * z * clip_norm / expected  # noise z·C on the sum, then / E[B], times the step size
    assert stats.kstest(update, "norm", args=(0, std)).pvalue > 1e-3
    assert stats.kstest(update, "norm", args=(0, 2 / 3 * std)).pvalue < 1e-6
    assert stats.kstest(update, "norm", args=(0, 1.5 * std)).pvalue < 1e-6
    np.testing.assert_allclose(np.linalg.norm(update), std * np.sqrt(update.size), rtol=0.03)


def test_deterministic_given_the_key_and_the_state_is_donated():
    params, batch = problem()
    step = make_train_step(pixel_loss, optax.adam(0.01), mechanism(1.0, 1.0, 6, crop=SPEC), flip=True,
                           microbatch_size=3)
    run = lambda key: step(TrainState.create(copy(params), optax.adam(0.01)), batch, key)
    (a, ma), (b, mb), (c, _) = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb))):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.params["w"], c.params["w"])
    state = TrainState.create(copy(params), optax.adam(0.01))
    step(state, batch, jax.random.key(3))
    assert state.params["w"].is_deleted()


@pytest.mark.parametrize("optimizer", [optax.sgd(0.5), optax.sgd(0.5, momentum=0.9), optax.adam(0.05)],
                         ids=["sgd", "momentum", "adam"])
def test_the_non_private_baseline_is_the_same_step_without_clipping_or_noise(optimizer):
    params, batch = problem()
    batch = batch._replace(mask=None)
    step = make_train_step(pixel_loss, optimizer, mechanism(1.0, 1.0, 6), private=False)
    state, metrics = step(TrainState.create(copy(params), optimizer), batch, jax.random.key(0))
    mean_loss = lambda p: jnp.mean(jax.vmap(pixel_loss, (None, 0, 0))(p, batch.image, batch.label))
    updates, _ = optimizer.update(jax.grad(mean_loss)(params), optimizer.init(params), params)
    want = optax.apply_updates(params, updates)
    for k in params:
        np.testing.assert_allclose(state.params[k], want[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], mean_loss(params), rtol=1e-5)
    assert metrics["clipped_fraction"] == 0


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=2)(nn.Conv(4, (3, 3))(x)))
        return nn.Conv(CLASSES, (1, 1))(x)


def test_a_flax_linen_model_trains_through_linen_loss():
    model = TinyNet()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
    loss = linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    _, batch = problem()
    image, label = batch.image[0, :4, :4], batch.label[0, :4, :4]
    want = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, image[None])[0], label)
    np.testing.assert_allclose(loss(params, image, label), want.mean(), rtol=1e-6)
    step = make_train_step(loss, optax.adam(1e-2), mechanism(1.0, 0.5, 6, crop=SPEC))
    state, metrics = step(TrainState.create(copy(params), optax.adam(1e-2)), batch, jax.random.key(1))
    assert np.isfinite(metrics["loss"]) and metrics["valid"] == 5
    assert not np.allclose(state.params["Conv_0"]["kernel"], params["Conv_0"]["kernel"])


def test_a_non_finite_example_contributes_nothing():
    params, batch = problem()
    poisoned = batch._replace(image=batch.image.at[3].set(jnp.nan))
    step = make_train_step(pixel_loss, optax.sgd(1.0), mechanism(1.0, 0.0, 6))
    state, metrics = step(TrainState.create(copy(params), optax.sgd(1.0)), poisoned, jax.random.key(0))
    without = batch._replace(mask=batch.mask.at[3].set(False))
    want, _ = step(TrainState.create(copy(params), optax.sgd(1.0)), without, jax.random.key(0))
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    assert metrics["nonfinite"] == 1 and metrics["valid"] == 5


def test_scan_microbatching_keeps_peak_memory_near_one_microbatch():
    """Compiled peak memory (XLA buffer assignment) of logical batch 64 in microbatches
    of 8, against a logical batch of 8."""
    params = {"w": jax.random.normal(jax.random.key(0), (3, 64)), "v": jnp.ones((64, CLASSES))}
    wide = lambda p, image, label: optax.softmax_cross_entropy_with_integer_labels(
        jnp.tanh(image @ p["w"]) @ p["v"], label).mean()
    _, batch = problem(batch_size=64)
    batch = Batch(jnp.tile(batch.image, (1, 4, 4, 1)), jnp.tile(batch.label, (1, 4, 4)))

    def peak(batch, microbatch_size):
        step = make_train_step(wide, optax.sgd(0.1), mechanism(1.0, 1.0, 8), microbatch_size=microbatch_size,
                               unroll=False)
        memory = step.lower(TrainState.create(params, optax.sgd(0.1)), batch, jax.random.key(0)) \
            .compile().memory_analysis()
        return memory.temp_size_in_bytes

    small = jax.tree.map(lambda x: x[:8], batch)
    assert peak(batch, 8) <= 1.2 * peak(small, 8)
    assert peak(batch, 64) > 4 * peak(small, 8)  # the measurement can tell the difference


@pytest.mark.parametrize("make, error, message", [
    (lambda: make_train_step(pixel_loss, optax.sgd(0.1), mechanism(), microbatch_size=0), ValueError,
     "microbatch_size"),
    (lambda: make_train_step(pixel_loss, optax.sgd(0.1), None), TypeError, "needs the mechanism"),
    (lambda: mechanism(crop=(4, 4)), TypeError, "CropSpec"),
])
def test_invalid_configurations_are_rejected_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


SHARDED = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    sys.path.insert(0, {tests!r})
    from test_training import SPEC, TrainState, copy, make_train_step, mechanism, pixel_loss, problem
    from patchdp.training import replicate, shard_batch

    assert jax.device_count() == 8
    params, batch = problem(batch_size=32)
    mesh = jax.make_mesh((8,), ("data",))
    outputs = []
    for on_mesh in (None, mesh):
        step = make_train_step(pixel_loss, optax.adam(0.01), mechanism(0.3, 1.0, 30.0, crop=SPEC), flip=True,
                               microbatch_size=2, mesh=on_mesh)  # per device: 4 examples each
        state = TrainState.create(copy(params), optax.adam(0.01))
        data = batch
        if on_mesh is not None:
            state, data = replicate(state, mesh), shard_batch(batch, mesh)
            assert len(data.image.sharding.device_set) == 8
        state, metrics = step(state, data, jax.random.key(5))
        outputs.append((state, metrics))
        if on_mesh is not None:
            assert state.params["w"].sharding.is_fully_replicated
    (one, m1), (eight, m8) = outputs
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)))
    metrics = {{k: [float(m1[k]), float(m8[k])] for k in m1}}
    print(json.dumps({{"max_abs_diff": diff, "metrics": metrics}}))
""")


CONV_SHARDED = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    sys.path.insert(0, {tests!r})
    from test_training import TrainState, copy, make_train_step, mechanism
    from patchdp.inclusion import CropSpec
    from patchdp.training import Batch, replicate, shard_batch

    def conv_loss(params, image, label):  # a 3x3 convolution, then a per-pixel classifier
        y = jax.lax.conv_general_dilated(image[None], params["k"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
        return optax.softmax_cross_entropy_with_integer_labels(jnp.tanh(y) @ params["w"], label).mean()

    assert jax.device_count() == 4
    keys = jax.random.split(jax.random.key(0), 4)
    params = {{"k": jax.random.normal(keys[0], (3, 3, 3, 8)) / 3, "w": jax.random.normal(keys[1], (8, 3))}}
    batch = Batch(jax.random.normal(keys[2], (16, 8, 8, 3)), jax.random.randint(keys[3], (16, 8, 8), 0, 3), None)
    mesh = jax.make_mesh((4,), ("data",))
    report = {{}}
    for clipping in ("per_example", "direct"):
        outputs = []
        for on_mesh in (None, mesh):
            step = make_train_step(conv_loss, optax.sgd(1.0), mechanism(1e6, 1e-12, 16.0, crop=CropSpec(4, padding=2),
                                                                         clipping=clipping),
                                   microbatch_size=4, unroll=True, mesh=on_mesh)
            state = TrainState.create(copy(params), optax.sgd(1.0))
            data = batch if on_mesh is None else shard_batch(batch, mesh)
            state = state if on_mesh is None else replicate(state, mesh)
            outputs.append(jax.tree.map(np.asarray, step(state, data, jax.random.key(5))[0].params))
        (one, four), start = outputs, params
        report[clipping] = max(float(np.max(np.abs(a - b)) / np.max(np.abs(a - p))) for a, b, p in zip(
            jax.tree.leaves(one), jax.tree.leaves(four), jax.tree.leaves(start)))
    print(json.dumps(report))
""")


def test_per_example_convolution_gradients_on_4_devices_equal_1_device():
    """Each device clips its own examples (shard_map). Left to XLA's partitioner, the
    per-example weight gradients of a convolution (grouped convolutions) over a
    batch-sharded input came out wrong on XLA:CPU (jax 0.10.2) with one crop per example:
    this test measured an error of 0.89 of the update. (C = 10⁶: nothing is clipped, so
    the sum is the plain gradient; z = 10⁻¹²: noise 10⁻⁶, the same on both.)"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = CONV_SHARDED.format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"per_example", "direct"}
    for clipping, error in report.items():  # float32 sums of 16 examples in another order: ~1e-6 of the update
        assert error < 1e-4, (clipping, error)


def test_a_step_on_8_devices_equals_the_step_on_1_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = SHARDED.format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["max_abs_diff"] < 1e-5
    for one, eight in report["metrics"].values():
        assert one == pytest.approx(eight, rel=1e-5, abs=1e-6)
