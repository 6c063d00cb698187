"""Book-keeping on models written in any JAX framework: the same layer zoo in
flax.linen, Flax NNX, Equinox and plain ``jax.numpy``/``lax`` is found on the traced
loss and clipped exactly as by per-example gradients; parameters that cannot be matched
(weight tying, ``scan``, ``cond``, ``remat``, ``custom_vjp``, ``shard_map``, a
nonlinear use) fall back to exact per-example gradients, and an activation × activation
product is never a layer; bfloat16 parameters; microbatches; a 2-device mesh.

Tolerance (the issue's ≤ 1e-5 relative, stated as a bound): gradients are compared as
whole trees, ‖got − want‖ ≤ 1e-5 ‖want‖. Both sides add the same float32 products in
other orders; an entry here is a sum of n ≤ 2^11 products, whose reordering error is, with
probability ≥ 1 − 1e-6 under random rounding, ≤ √(2 ln 2e6)·√n·u ≈ 5.4 · 45 · 6e-8 ≈ 1.5e-5
of the sum of magnitudes per entry (Higham & Mary, SIAM J. Sci. Comput. 2019), and over a
whole tree the errors of independent entries average down (√ of their count), far below
1e-5 of its norm. Norms: the ghost method's allowance is accounted by comparing the sum
against the reference clipped with the book-keeping's own norms, and its norms are
checked to be upper bounds (≥ reference · (1 − 1e-5)); with the allowance set to zero
every method's norms agree to 1e-5.
"""

import json
import os
import subprocess
import sys
import textwrap

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from patchdp import bookkeeping
from patchdp.clipping import clipped_grad_sum, default_schedule, example_bytes, per_example_grads, per_example_norms
from test_bookkeeping import reference_sum

RTOL = 1e-5
SIZE, CLASSES = 12, 3


def cross_entropy(logits, label):
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)


class LinenZoo(nn.Module):
    """SAME + stride + bias; explicit asymmetric padding + kernel dilation, no bias; 1×1
    VALID with stride; feature groups; ConvTranspose; Dense on feature maps; Dense head."""

    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME", param_dtype=self.dtype)(x))
        x = nn.Conv(6, (3, 2), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1), use_bias=False,
                    param_dtype=self.dtype)(x)
        x = nn.Conv(6, (1, 1), strides=(1, 2), padding="VALID", param_dtype=self.dtype)(x)
        x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=2, param_dtype=self.dtype)(x))
        x = nn.ConvTranspose(4, (2, 2), strides=(2, 2), param_dtype=self.dtype)(x)
        x = nn.Dense(5, param_dtype=self.dtype)(x)
        return nn.Dense(CLASSES, param_dtype=self.dtype)(jnp.mean(x, axis=(0, 1, 2)))


def linen_zoo(dtype=jnp.float32):
    model = LinenZoo(dtype)
    params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    return lambda p, view: cross_entropy(model.apply({"params": p}, view[0][None]), view[1]), params


class NNXZoo(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([
            nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", rngs=rngs),
            nnx.Conv(4, 6, (3, 2), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1), use_bias=False, rngs=rngs),
            nnx.Conv(6, 6, (1, 1), strides=(1, 2), padding="VALID", rngs=rngs),
            nnx.Conv(6, 6, (3, 3), feature_group_count=2, rngs=rngs),
            nnx.ConvTranspose(6, 4, (2, 2), strides=(2, 2), rngs=rngs),
            nnx.Linear(4, 5, rngs=rngs)])
        self.head = nnx.Linear(5, CLASSES, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(jnp.mean(x, axis=(0, 1, 2)))


def nnx_zoo():
    graphdef, params = nnx.split(NNXZoo(nnx.Rngs(0)))
    return lambda p, view: cross_entropy(nnx.merge(graphdef, p)(view[0][None]), view[1]), params


class EquinoxZoo(eqx.Module):
    """Channels first (NCHW / OIHW convolutions), Linear on single vectors under vmap."""

    convs: list
    pixel: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key, 7)
        self.convs = [eqx.nn.Conv2d(3, 4, 3, stride=2, padding=((1, 1), (1, 1)), key=keys[0]),
                      eqx.nn.Conv2d(4, 6, (3, 2), padding=((1, 0), (2, 1)), dilation=(2, 1), use_bias=False,
                                    key=keys[1]),
                      eqx.nn.Conv2d(6, 6, 1, stride=(1, 2), key=keys[2]),
                      eqx.nn.Conv2d(6, 6, 3, padding=1, groups=2, key=keys[3]),
                      eqx.nn.ConvTranspose2d(6, 4, 2, stride=2, key=keys[4])]
        self.pixel = eqx.nn.Linear(4, 5, key=keys[5])
        self.head = eqx.nn.Linear(5, CLASSES, key=keys[6])

    def __call__(self, image):
        x = image.transpose(2, 0, 1)
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        x = jax.vmap(jax.vmap(self.pixel))(x.transpose(1, 2, 0))
        return self.head(jnp.mean(x, axis=(0, 1)))


def equinox_zoo():
    params, static = eqx.partition(EquinoxZoo(jax.random.key(0)), eqx.is_array)
    return lambda p, view: cross_entropy(eqx.combine(p, static)(view[0]), view[1]), params


def plain_params(key=jax.random.key(0)):
    shapes = {"a": (4, 3, 3, 3), "a_bias": (4,), "b": (3, 2, 4, 6), "c": (6, 6, 1, 1), "d": (3, 3, 3, 6),
              "up": (2, 2, 6, 4), "pixel": (20,), "head": (CLASSES, 5)}
    keys = jax.random.split(key, len(shapes))
    return {name: 0.3 * jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}


def plain_logits(p, image):
    """Mixed layouts, the weight on either side of a product, a flat weight reshaped."""
    conv = jax.lax.conv_general_dilated
    x = conv(image[None], p["a"], (2, 2), "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC")) + p["a_bias"]
    x = conv(jnp.tanh(x).transpose(0, 3, 1, 2), p["b"], (1, 1), ((1, 0), (2, 1)), rhs_dilation=(2, 1),
             dimension_numbers=("NCHW", "HWIO", "NHWC"))
    x = conv(x, p["c"], (1, 2), "VALID", dimension_numbers=("NHWC", "OIHW", "NCHW"))
    x = conv(x, p["d"], (1, 1), "SAME", feature_group_count=2, dimension_numbers=("NCHW", "HWIO", "NHWC"))
    x = jax.lax.conv_transpose(jnp.tanh(x), p["up"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jnp.einsum("nhwc,cd->nhwd", x, p["pixel"].reshape(4, 5))
    return p["head"] @ jnp.mean(x, axis=(0, 1, 2))


def plain_zoo():
    return lambda p, view: cross_entropy(plain_logits(p, view[0]), view[1]), plain_params()


ZOOS = {"linen": linen_zoo, "nnx": nnx_zoo, "equinox": equinox_zoo, "plain": plain_zoo}


def batch(size=4, views=2, seed=1):
    """(B, K) views (image, label) and a mask padding the last example."""
    key_image, key_label = jax.random.split(jax.random.key(seed))
    images = jax.random.normal(key_image, (size, views, SIZE, SIZE, 3))
    labels = jax.random.randint(key_label, (size, views), 0, CLASSES)
    return (images, labels), jnp.arange(size) != size - 1


def relative_error(got, want) -> float:
    diff = sum(float(jnp.sum(jnp.square(a.astype(jnp.float32) - b))) for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return (diff / sum(float(jnp.sum(jnp.square(b))) for b in jax.tree.leaves(want))) ** 0.5


def check_against_reference(loss, params, examples, mask, plan, clip_norm, monkeypatch):
    """Norms and clipped sum of ``plan`` against per-example gradients (module docstring)."""
    _, grads = jax.jit(per_example_grads, static_argnums=0)(loss, params, examples)
    want_norms = np.asarray(per_example_norms(grads))
    clipped = jax.jit(lambda p: bookkeeping.clipped_sum(plan, p, examples, mask, clip_norm))
    total, _, norms = clipped(params)
    assert np.all(np.asarray(norms) >= want_norms * (1 - RTOL))
    assert relative_error(total, reference_sum(grads, np.asarray(norms), mask, clip_norm)) <= RTOL
    monkeypatch.setattr(bookkeeping, "gamma", lambda n: 0.0)  # the algebra alone, without the allowance
    np.testing.assert_allclose(jax.jit(lambda p: bookkeeping.clipped_sum(plan, p, examples, mask, clip_norm)[2])(
        params), want_norms, rtol=RTOL)


@pytest.mark.parametrize("framework", sorted(ZOOS))
def test_every_framework_zoo_is_found_and_clipped_exactly(framework, monkeypatch):
    loss, params = ZOOS[framework]()
    examples, mask = batch()
    plan = bookkeeping.find_layers(loss, params, jax.tree.map(lambda v: v[0, 0], examples))
    assert len(plan.layers) == 7  # every weight; biases are per-example leaves
    assert {layer.op.name for layer in plan.layers} == {"conv_general_dilated", "dot_general"}
    assert len({layer.method for layer in plan.layers}) > 1
    check_against_reference(loss, params, examples, mask, plan, 0.5, monkeypatch)


@pytest.mark.parametrize("method", bookkeeping.METHODS)
def test_every_method_on_mixed_layouts(method, monkeypatch):
    loss, params = plain_zoo()
    examples, mask = batch()
    plan = bookkeeping.find_layers(loss, params, jax.tree.map(lambda v: v[0, 0], examples), method=method)
    grouped = [layer for layer in plan.layers if layer.op.params.get("feature_group_count", 1) > 1]
    assert len(grouped) == 1 and grouped[0].method == "direct"
    assert all(layer.method == method for layer in plan.layers if layer not in grouped)
    check_against_reference(loss, params, examples, mask, plan, 0.5, monkeypatch)


def fallback_params():
    keys = jax.random.split(jax.random.key(3), 9)
    shapes = {"in": (3, 4), "tied": (4, 4), "scanned": (4, 4), "cond": (4, 4), "remat": (4, 4), "vjp": (4, 4),
              "sharded": (4, 4), "scaled": (4, 4), "out": (4, 2)}
    return {name: 0.5 * jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}


@jax.custom_vjp
def custom_product(h, w):
    return h @ w


custom_product.defvjp(lambda h, w: (h @ w, (h, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


def fallback_loss(p, view):
    """Each of the middle weights is used in a way book-keeping must not match."""
    h = jnp.tanh(view @ p["in"])  # a layer
    h = jnp.tanh(h @ p["tied"]) @ p["tied"].T  # weight tying: used twice
    h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["scanned"]), None), h, None, length=2)
    h = jax.lax.cond(jnp.sum(h) > 0, lambda h: h @ p["cond"], lambda h: h - 1.0, h)
    h = jax.checkpoint(lambda h: jnp.tanh(h @ p["remat"]))(h)
    h = custom_product(h, p["vjp"])
    mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    h = jax.shard_map(lambda h, w: h @ w, mesh=mesh, in_specs=(jax.P(), jax.P()), out_specs=jax.P())(h, p["sharded"])
    h = h @ jnp.tanh(p["scaled"])  # the weight through a nonlinear op
    attention = jax.nn.softmax(h @ h.T)  # activation × activation: no parameter operand
    return jnp.sum(jnp.tanh(attention @ h @ p["out"]) ** 2)


def test_unmatchable_uses_fall_back_to_exact_per_example_gradients(monkeypatch):
    params = fallback_params()
    examples = jax.random.normal(jax.random.key(4), (5, 1, 6, 3))
    plan = bookkeeping.find_layers(fallback_loss, params, examples[0, 0])
    names = sorted(params)
    assert sorted(names[layer.leaf] for layer in plan.layers) == ["in", "out"]
    check_against_reference(fallback_loss, params, examples, jnp.ones(5, bool), plan, 0.3, monkeypatch)


def test_an_activation_product_is_never_a_layer():
    """Negative control: ``x @ (h @ x)``-style products between activations, and a
    product of two parameters, are not layers; the matcher does see an honest layer."""
    params = {"w": jnp.ones((3, 3)), "u": jnp.ones((3, 3)), "v": jnp.ones((3, 3))}

    def loss(p, x):
        h = x @ p["w"]  # the only layer
        gram = h.T @ h  # activation × activation
        return jnp.sum(gram @ h.T) + jnp.sum(p["u"] @ p["v"])  # parameter × parameter: neither is a layer

    plan = bookkeeping.find_layers(loss, params, jnp.ones((4, 3)))
    assert [layer.leaf for layer in plan.layers] == [sorted(params).index("w")]
    assert all(layer.match.chain == () for layer in plan.layers)


def test_bfloat16_parameters_computed_in_float32(monkeypatch):
    """bf16 weights used in float32: their gradients stay float32 (module docstring of
    bookkeeping), the biases' per-example gradients are bf16 as in the reference, so the
    reference is the loss of the float32 copy with its bias gradients rounded to bf16."""
    loss, params = linen_zoo(jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    examples, mask = batch()
    plan = bookkeeping.find_layers(loss, params, jax.tree.map(lambda v: v[0, 0], examples))
    assert len(plan.layers) == 7 and all(layer.match.chain[-1].name == "convert_element_type"
                                         for layer in plan.layers)
    total, _, norms = jax.jit(lambda p: bookkeeping.clipped_sum(plan, p, examples, mask, 0.5))(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(total))
    wide = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), params)
    _, grads = jax.jit(per_example_grads, static_argnums=0)(loss, wide, examples)
    covered = {layer.leaf for layer in plan.layers}
    leaves, treedef = jax.tree.flatten(grads)
    grads = treedef.unflatten([g if i in covered else g.astype(jnp.bfloat16).astype(jnp.float32)
                               for i, g in enumerate(leaves)])
    np.testing.assert_allclose(norms, per_example_norms(grads), rtol=1e-2)  # ghost allowance of a few layers
    assert relative_error(total, reference_sum(grads, np.asarray(norms), mask, 0.5)) <= RTOL


SCHEDULES = [dict(microbatch_size=None), dict(microbatch_size=2, unroll=True), dict(microbatch_size=2, unroll=False),
             dict(microbatch_size=1, unroll=True)]


def test_the_clipped_sum_does_not_depend_on_the_schedule():
    loss, params = plain_zoo()
    examples, mask = batch()
    sums = [jax.jit(lambda p, s=s: clipped_grad_sum(loss, p, examples, mask, clip_norm=0.5, **s))(params)
            for s in SCHEDULES]
    for total, stats in sums[1:]:
        assert relative_error(total, sums[0][0]) <= RTOL
        assert [float(v) for v in stats] == pytest.approx([float(v) for v in sums[0][1]], rel=RTOL)


@pytest.mark.parametrize("batch_size, micro", [(32, 8), (256, 16), (100, 10), (7, 7), (3, 3), (1, 1)])
def test_the_cpu_default_is_microbatches_of_about_8_unrolled(batch_size, micro):
    schedule = default_schedule(batch_size, platform="cpu")
    assert (schedule.microbatch_size, schedule.unroll) == (micro, True) and schedule.basis.startswith("cpu")


def test_on_accelerators_the_whole_batch_unless_memory_says_otherwise():
    assert default_schedule(64, platform="gpu", memory_bytes=2**30)[:2] == (64, False)  # no estimate: whole batch
    assert default_schedule(64, platform="gpu", example_bytes=2**20, memory_bytes=2**30)[:2] == (64, False)
    assert default_schedule(64, platform="gpu", example_bytes=2**24, memory_bytes=2**30)[:2] == (32, False)
    assert default_schedule(64, platform="tpu", example_bytes=2**40, memory_bytes=2**30)[:2] == (1, False)
    loss, params = plain_zoo()
    view = (jax.ShapeDtypeStruct((SIZE, SIZE, 3), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))
    one, two = example_bytes(loss, params, view, 1), example_bytes(loss, params, view, 2)
    assert 4 * SIZE * SIZE * 3 < one < two < 2 * one


MESH = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    sys.path.insert(0, {tests!r})
    from jax.sharding import NamedSharding, PartitionSpec
    from test_bookkeeping_zoo import batch, linen_zoo, relative_error
    from patchdp.clipping import clipped_grad_sum

    assert jax.device_count() == 2
    loss, params = linen_zoo()
    examples, mask = batch(size=4)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put((examples, mask), NamedSharding(mesh, PartitionSpec("data")))
    run = lambda clipping, data, micro: jax.jit(lambda p, d: clipped_grad_sum(
        loss, p, d[0], d[1], clip_norm=0.5, clipping=clipping, microbatch_size=micro))(params, data)
    (one, _), (two, _) = run("per_example", (examples, mask), None), run("auto", sharded, 2)
    print(json.dumps({{"error": relative_error(two, one), "devices": len(sharded[0][0].sharding.device_set)}}))
""")


def test_on_a_two_device_mesh_in_microbatches():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    script = MESH.format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2 and report["error"] <= RTOL
