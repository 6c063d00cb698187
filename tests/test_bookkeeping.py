"""Book-keeping clipping equals per-example clipping: norms and clipped sums of every
norm method against ``vmap`` of per-example gradients on every model, with K views,
microbatches, padding and a NaN example; the ghost norm's rounding allowance against an
exact float64 computation; which layers are covered and which method each gets.
(tests/test_bookkeeping_zoo.py: the same for models in every framework.)

Tolerances: both paths add the same float32 products in different orders; an entry of a
gradient is a sum of at most B·K·T ≤ 2^13 products here, so its worst-case reordering
error is γ_{2^13} ≈ 5e-4 of the sum of their magnitudes. Entries are compared to 1e-4
relative plus 1e-5 of the largest entry of the whole gradient (``close``): an entry that
is itself cancellation noise (1e-16 beside 1e-1) agrees only to that absolute level.

No decision sits within rounding of a threshold: the clip norm is chosen by
:func:`clip_norm_between` at least :func:`norm_margin` (relative) away from every example's
reference norm and book-keeping norm, so both paths clip the same examples on any CPU;
sums are compared against the reference clipped with the book-keeping's own norms (the
ghost allowance accounted; the scale min(1, C/‖g‖) is continuous in the norm).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from patchdp import bookkeeping
from patchdp.clipping import clipped_grad_sum, per_example_grads, per_example_norms
from patchdp.models import get_model
from test_models import TINY, random_params

BATCH, VIEWS, SIZE = 4, 2, 12


def close(got, want):
    scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)


def views_of(model, classes=3):
    """(B, K) views: images with a NaN in example 1, labels; and a mask padding example 3."""
    key_image, key_label = jax.random.split(jax.random.key(7))
    images = jax.random.normal(key_image, (BATCH, VIEWS, SIZE, SIZE, 3)).at[1, 0, 2, 3, 0].set(jnp.nan)
    label_shape = (SIZE, SIZE) if model.task == "segmentation" else ()
    labels = jax.random.randint(key_label, (BATCH, VIEWS) + label_shape, 0, classes)
    return (images, labels), jnp.arange(BATCH) != 3


def loss_of(model):
    def loss(params, view):
        image, label = view
        logits = model.apply({"params": params}, image[None])[0]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, label))

    return loss


def norm_margin(params) -> float:
    """γ_n for n = the parameter count: the relative rounding bound of a float32 sum of n
    non-negative squares, i.e. how far two computations of one gradient norm can drift
    apart beyond their entries' own differences (at least 1e-4, ``close``'s tolerance)."""
    return max(1e-4, bookkeeping.gamma(sum(np.size(leaf) for leaf in jax.tree.leaves(params))))


def clip_norm_between(*norms, margin: float) -> float:
    """A clip norm in the widest gap between examples, each example's interval spanning
    all its given norms (e.g. reference and book-keeping), widened by ``margin``
    (relative): every example is clipped or not whichever of its norms decides, on any
    machine. Fails (never guesses) if no such gap exists."""
    finite = [np.asarray(n, np.float64) for n in norms]
    keep = np.all([np.isfinite(n) for n in finite], axis=0)
    low = np.min(finite, axis=0)[keep] * (1 - margin)
    high = np.max(finite, axis=0)[keep] * (1 + margin)
    order = np.argsort(low)
    gaps = [(low[order[i + 1]] - np.max(high[order[:i + 1]]), i) for i in range(len(order) - 1)]
    width, i = max(gaps)
    assert width > 0, f"no clip norm separates the examples' norms {norms}: choose other inputs"
    return float(np.max(high[order[:i + 1]]) + width / 2)


def reference_sum(grads, norms, mask, clip_norm):
    """Σ_i m_i min(1, C / n_i) g_i: the per-example gradients ``grads`` clipped by the
    given norms (the book-keeping's, so that its rounding allowance is accounted)."""
    keep = np.asarray(mask) & np.isfinite(norms)
    scale = np.where(keep, clip_norm / np.maximum(np.where(keep, norms, 1), clip_norm), 0)
    return jax.tree.map(lambda g: jnp.sum(jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)),
                                                    g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), 0), axis=0),
                        grads)


def reference_norms(loss, params, examples):
    return per_example_norms(per_example_grads(loss, params, examples)[1])


def run(loss, params, examples, mask, clipping, clip_norm, microbatch_size=None):
    return jax.jit(lambda p: clipped_grad_sum(loss, p, examples, mask, clip_norm=clip_norm, clipping=clipping,
                                              microbatch_size=microbatch_size))(params)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_model_matches_per_example_clipping(name):
    model = get_model(name, 3, **TINY[name])
    params = random_params(model, (1, SIZE, SIZE, 3))["params"]
    loss = loss_of(model)
    examples, mask = views_of(model)
    losses, grads = jax.jit(per_example_grads, static_argnums=0)(loss, params, examples)
    norms = np.asarray(per_example_norms(grads))
    assert list(np.isfinite(norms)) == [True, False, True, True]
    plan = bookkeeping.find_layers(loss, params, jax.tree.map(lambda v: v[0, 0], examples))
    kept = np.asarray(jax.jit(lambda p: bookkeeping.clipped_sum(plan, p, examples, mask, 1.0)[2])(params))
    clip_norm = clip_norm_between(norms, kept, margin=norm_margin(params))
    got, stats = run(loss, params, examples, mask, "auto", clip_norm)
    close(got, reference_sum(grads, kept, mask, clip_norm))
    assert (stats.valid, stats.clipped, stats.nonfinite) == (3, np.sum(norms[[0, 2]] > clip_norm), 1)
    np.testing.assert_allclose(stats.loss_sum, np.sum(np.asarray(losses)[[0, 2]]), rtol=1e-5)


class Zoo(nn.Module):
    """Every layer shape the patch matrix has to get right, and some it must leave alone."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=2, padding="SAME")(x)
        x = nn.relu(nn.GroupNorm(num_groups=2)(x))
        x = nn.Conv(6, (3, 2), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1), use_bias=False)(x)
        x = nn.Conv(6, (1, 1), strides=(1, 2), padding="VALID")(x)
        x = nn.ConvTranspose(4, (2, 2), strides=(2, 2))(x)
        x = nn.Dense(5)(x)  # a dense layer on a feature map: T = pixels
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize("method", bookkeeping.METHODS)
def test_every_method_gives_the_per_example_norms_and_sums(method, monkeypatch):
    model = Zoo()
    params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    loss = lambda p, view: jnp.sum(model.apply({"params": p}, view[0][None]) ** 2)
    examples, mask = views_of(get_model("cnn", 3))
    want = reference_norms(loss, params, examples)
    plan = bookkeeping.find_layers(loss, params, jax.tree.map(lambda v: v[0, 0], examples), method=method)
    assert [layer.method for layer in plan.layers] == [method] * 6

    _, _, bounds = bookkeeping.clipped_sum(plan, params, examples, mask, 1.0)  # ghost: upper bounds
    finite = np.isfinite(want)
    assert (np.isfinite(bounds) == finite).all()
    assert (bounds[finite] >= want[finite] * (1 - 1e-5)).all()
    assert (bounds[finite] <= want[finite] * 1.01).all()

    monkeypatch.setattr(bookkeeping, "gamma", lambda n: 0.0)  # the algebra alone, without the allowance
    total, _, norms = bookkeeping.clipped_sum(plan, params, examples, mask, 1.0)
    np.testing.assert_allclose(norms[finite], want[finite], rtol=1e-4)
    clip_norm = clip_norm_between(want, margin=norm_margin(params))
    close(run(loss, params, examples, mask, method, clip_norm, microbatch_size=2)[0],
          run(loss, params, examples, mask, "per_example", clip_norm)[0])


def cancelling_tape(seed, positions=64, size=16, outputs=8):
    """Dense-layer inputs and output gradients whose per-example gradient Σ_t x_t g_tᵀ
    nearly cancels: pairs (a, b) and (a + δ, −b) with δ ≈ 1e-3 |a|."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(1, 1, positions // 2, size))
    b = rng.normal(size=(1, 1, positions // 2, outputs))
    x = np.concatenate([a, a + 1e-3 * rng.normal(size=a.shape)], axis=2).astype(np.float32)
    g = np.concatenate([b, -b], axis=2).astype(np.float32)
    return x, g


def test_ghost_bound_covers_float32_rounding_and_is_needed():
    dense = lambda w, x: jnp.sum(x @ w)
    (layer,) = bookkeeping.find_layers(dense, jnp.zeros((16, 8)), jnp.zeros((64, 16)), method="ghost").layers
    raw_below = 0
    for seed in range(20):
        x, g = cancelling_tape(seed)
        exact = np.sum((x[0, 0].astype(np.float64).T @ g[0, 0].astype(np.float64)) ** 2)
        bound = float(bookkeeping._ghost_square_bound(layer, jnp.asarray(x), jnp.asarray(g))[0])
        assert bound >= exact
        gram = lambda v: np.einsum("td,sd->ts", v[0, 0], v[0, 0]).astype(np.float32)
        raw = np.float32(np.sum(gram(x) * gram(g), dtype=np.float32))
        raw_below += raw < exact
    assert raw_below, "no case where float32 rounding lowers the ghost norm: the test cannot fail"


def test_layers_used_elsewhere_twice_or_in_a_loop_are_left_to_per_example_gradients():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(-1)
            shared, tied, plain = nn.Dense(4), nn.Dense(4), nn.Dense(3)
            h = shared(x) + shared(2 * x) + tied(x)
            return plain(h) + jnp.sum(tied.variables["params"]["kernel"] ** 2)  # a regulariser on `tied`

    model = Tied()
    params = model.init(jax.random.key(0), jnp.zeros((2, 2, 1)))["params"]
    loss = lambda p, view: jnp.sum(model.apply({"params": p}, view))
    dense_2 = [i for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0])
               if path[0].key == "Dense_2" and path[1].key == "kernel"]
    assert [layer.leaf for layer in bookkeeping.find_layers(loss, params, jnp.zeros((2, 2, 1))).layers] == dense_2
    examples = jax.random.normal(jax.random.key(1), (3, 1, 2, 2, 1))
    close(run(loss, params, examples, None, "auto", 0.5)[0], run(loss, params, examples, None, "per_example", 0.5)[0])
    dense = nn.Dense(3)
    dense_params = dense.init(jax.random.key(0), jnp.zeros(3))["params"]

    def recurrent_loss(p, view):  # the layer inside lax.scan: its inputs cannot be taped
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(dense.apply({"params": p}, h)), None), view, None, length=3)
        return jnp.sum(h**2)

    assert bookkeeping.find_layers(recurrent_loss, dense_params, jnp.zeros(3)).layers == ()
    sequences = jax.random.normal(jax.random.key(2), (4, 1, 3))
    close(run(recurrent_loss, dense_params, sequences, None, "auto", 0.1)[0],
          run(recurrent_loss, dense_params, sequences, None, "per_example", 0.1)[0])
    plain_loss = lambda p, view: jnp.sum(view * p["w"])  # no flax layer at all: everything per-example
    assert bookkeeping.find_layers(plain_loss, {"w": jnp.ones(3)}, jnp.ones(3)).layers == ()  # no product


def test_grouped_convolutions_get_the_direct_method():
    """The patch matrix does not describe feature groups. (Under ``vmap`` JAX computes a
    grouped convolution's per-example weight gradients in one block computation, so a NaN
    example makes every example's gradient NaN: the batch then contributes nothing.)"""
    model = nn.Conv(4, (3, 3), feature_group_count=2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 4)))["params"]
    loss = lambda p, view: jnp.sum(model.apply({"params": p}, view[None]) ** 2)
    (layer,) = bookkeeping.find_layers(loss, params, jnp.zeros((6, 6, 4)), method="ghost").layers
    assert layer.method == "direct"
    examples = jax.random.normal(jax.random.key(1), (3, 2, 6, 6, 4))
    close(run(loss, params, examples, None, "ghost", 1.0)[0], run(loss, params, examples, None, "per_example", 1.0)[0])


@pytest.mark.parametrize("kernel, image, channels, outputs, method", [
    ((3, 3), 4, 512, 512, "ghost"),  # ResNet-18's last stage: few pixels, many channels
    ((3, 3), 64, 16, 16, "direct"),  # a U-Net's first level: many pixels, few channels
    ((1, 1), 64, 16, 16, "unfold"),  # a 1×1 convolution: the patch matrix is the input
    ((3, 3), 64, 3, 16, "unfold"),  # a first layer on RGB: 27-value patches
])
def test_cost_model_picks_the_method_measured_fastest(kernel, image, channels, outputs, method):
    layer = check_cost_model(nn.Conv(outputs, kernel), image, channels, method)
    assert layer.sizes(1) == (image * image, channels * np.prod(kernel), outputs)


def test_cost_model_unfolds_transposed_convolutions():
    """The U-Net's 2×2 up-convolutions: ``unfold`` measured 0.67–0.71 of ``direct``."""
    check_cost_model(nn.ConvTranspose(32, (2, 2), strides=(2, 2)), 16, 64, "unfold")
    check_cost_model(nn.Conv(32, (2, 2), strides=(2, 2)), 32, 64, "direct")  # the same sizes, not transposed


def problem_of(model, image, channels):
    """(loss, parameter shapes, view shape) of a single layer."""
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image, image, channels)))["params"]
    loss = lambda p, view: jnp.sum(model.apply({"params": p}, view[None]))
    return loss, params, jax.ShapeDtypeStruct((image, image, channels), jnp.float32)


def check_cost_model(model, image, channels, method):
    """The single layer of ``model`` on an (image, image, channels) input gets ``method``; returns it."""
    (layer,) = bookkeeping.find_layers(*problem_of(model, image, channels)).layers
    assert layer.method == method
    return layer


def test_unknown_clipping_method_is_rejected():
    with pytest.raises(ValueError, match="clipping must be one of"):
        clipped_grad_sum(lambda p, v: p * v, 1.0, jnp.ones((2, 1)), clip_norm=1.0, clipping="fast")
