"""Book-keeping clipping: per-example norms and clipped sums without per-example
gradients of the large layers (docs/method.md, "Fast clipping").

For a convolution or dense layer ``y = x ⋆ W + b`` that example i's crops meet at
positions t = 1 … T (every crop, every output pixel), the per-example gradient is

    G_i = Σ_t P_it ⊗ g_it,        ∇b_i = Σ_t g_it,

with P_it the input patch at t (d = kernel area × input channels values; for a dense
layer the input itself) and g_it = ∂loss_i/∂y_it the output gradient. One backward pass
of the summed loss gives every g_i (examples do not mix), so the layer's part of
‖∇loss_i‖² follows from (P_i, g_i) by one of three methods, chosen per layer:

- ``direct``: G_i materialised by the layer's own vector-Jacobian product under
  ``vmap`` (for a convolution XLA makes that a grouped convolution); any layer type.
- ``unfold``: G_i = P_iᵀ g_i materialised by a batched matrix product of the patch
  matrix: T·d·o multiply-adds and T·d patch values per example.
- ``ghost``: ‖G_i‖² = Σ_{t,t'} (P_it·P_it')(g_it·g_it') from two T×T Gram matrices,
  never materialising G_i: T²·(d + o) multiply-adds, best when T·(d + o) < d·o (few
  pixels, many channels: the deep layers of a ResNet).

With the clip factor c_i = min(1, C / ‖∇loss_i‖), the clipped sum of a ``direct`` or
``unfold`` layer is Σ_i c_i G_i from the same materialised G_i whose norms were measured;
that of a ``ghost`` layer is the layer's batch weight gradient with the output gradients
rescaled, Σ_i P_iᵀ (c_i g_i): the cost of the non-private step. Parameters outside the
covered layers (normalisation scales and shifts, layers of other types, layers called
more than once) get per-example gradients from the same backward pass.

**Guarantee.** Every example's contribution has norm ≤ C, exactly as with per-example
gradients: a materialised gradient is scaled by its own measured norm; a ghost norm is
replaced by an upper bound that adds the worst-case float32 rounding of its
computation (any summation order inside a dot product, FMA or not):

    |ghost − ‖G_i‖²| ≲ γ_n · (Σ_t ‖P_it‖ ‖g_it‖)²,   n = d + o + ⌈log₂ T²⌉ + T + 8,

with γ_n = n·u / (1 − n·u), u = 2⁻²⁴. Each Gram entry is a dot product of length d or o
(error ≤ γ_d ‖P_it‖‖P_it'‖ by Cauchy–Schwarz), and the T² products are added as a
balanced binary tree (error ≤ γ_⌈log₂ T²⌉ of their magnitudes); T and 8 cover the sums
over positions and single roundings. The allowance used is twice that bound (for the
second-order terms and the rounding of Σ_t ‖P_it‖‖g_it‖ itself); the cost model gives
a layer the ghost method only while γ_n ≤ 1%. Contractions run at ``Precision.HIGHEST``
so that accelerators do not round them to bfloat16.

**Coverage.** Layers are found by tracing the loss once with flax's method interceptor:
a ``flax.linen.Conv`` or ``flax.linen.Dense`` called exactly once per view, not inside a
nested transformation of the loss (``lax.scan``, ``cond``, ``checkpoint``), whose parameters are leaves of the
``params`` given to the loss (the same arrays) and are used nowhere else (checked on
the traced program). Everything else falls back to per-example gradients for its own
parameters, so the result equals the per-example path for any model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Var, find_top_trace

__all__ = ["METHODS", "Layer", "find_layers", "choose_method", "clipped_sum", "square_norms", "clipped_sums",
           "squared_norms"]

METHODS = ("direct", "unfold", "ghost")
HIGHEST = jax.lax.Precision.HIGHEST
UNIT_ROUNDOFF = 2.0 ** -24  # float32
MAX_GHOST_GAMMA = 0.01
SMALL_PATCH = 32


def gamma(n: int) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of an n-term float32 sum or dot
    product in any order (Higham, Accuracy and Stability of Numerical Algorithms, §3.1)."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF) if n * UNIT_ROUNDOFF < 1 else math.inf


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """One covered layer, as the loss's trace met it.

    Attributes:
      name: its flax scope path joined by "/" (the key of its tape entries).
      module: an unbound copy of the module: ``module.apply({"params": p}, x)``.
      leaves: positions of its parameters among ``jax.tree.leaves(params)``, in the
        order of ``jax.tree.leaves`` of its own parameter dict.
      treedef: the structure of its own parameter dict.
      names: its parameter names in that order (e.g. ("bias", "kernel")).
      input_shape, output_shape: the shapes it saw in one view (e.g. (1, H, W, C)).
      output_dtype: the dtype of its output.
      method: one of :data:`METHODS`.
    """

    name: str
    module: nn.Module
    leaves: tuple[int, ...]
    treedef: object
    names: tuple[str, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output_dtype: object
    method: str = "direct"

    @property
    def spatial(self) -> int:
        """Number of spatial axes (0 for a dense layer)."""
        return len(self.module.kernel_size) if isinstance(self.module, nn.Conv) else 0

    def sizes(self, views: int) -> tuple[int, int, int]:
        """(T, d, o) per example with ``views`` views: positions, patch size, outputs."""
        patch = self.input_shape[-1] * (math.prod(self.module.kernel_size) if self.spatial else 1)
        return views * math.prod(self.output_shape[:-1]), patch, self.output_shape[-1]

    def apply(self, params: list, x: jax.Array) -> jax.Array:
        """The layer on input ``x`` (its view shape) with parameter leaves ``params``."""
        with _bypass():
            return self.module.apply({"params": jax.tree.unflatten(self.treedef, params)}, x)


def choose_method(layer: Layer, views: int = 1) -> str:
    """The fastest exact norm method for ``layer``, by a cost model fitted to the
    per-layer measurements of benchmarks/bench_layers.py (XLA:CPU, README there):

    - ``ghost`` when T·(d + o) < d·o, i.e. its T²·(d + o) multiply-adds undercut the
      T·d·o of materialising G_i (few positions, many channels), and its rounding
      allowance γ_n stays ≤ 1%;
    - ``unfold`` for dense layers, 1×1 convolutions (the patch matrix is the input
      itself) and patches of at most 32 values (a first layer on RGB images: 3·3·3);
    - ``direct`` otherwise: there the grouped convolution was as fast as or faster than
      the patch matrix, which copies every input value kernel-area times.
    """
    if not _unfoldable(layer.module):
        return "direct"
    positions, patch, out = layer.sizes(views)
    if positions * (patch + out) < patch * out and gamma(_ghost_terms(layer, positions)) <= MAX_GHOST_GAMMA:
        return "ghost"
    if not layer.spatial or math.prod(layer.module.kernel_size) == 1 or patch <= SMALL_PATCH:
        return "unfold"
    return "direct"


# ---------------------------------------------------------------------------------------
# Finding the layers: one trace of the loss under flax's method interceptor.

_BYPASS = contextvars.ContextVar("patchdp_bookkeeping_bypass", default=False)


@contextlib.contextmanager
def _bypass():
    """Lets a layer's own ``apply`` run without the interceptors seeing it again (trace
    time only; per thread and task)."""
    token = _BYPASS.set(True)
    try:
        yield
    finally:
        _BYPASS.reset(token)


def _path(module: nn.Module) -> str:
    return "/".join(str(part) for part in module.scope.path)


def _unfoldable(module: nn.Module) -> bool:
    """Dense, or a convolution the patch matrix describes: no feature groups, no input
    dilation, padding "SAME", "VALID" or explicit."""
    if isinstance(module, nn.Dense):
        return True
    padding = module.padding
    return (module.feature_group_count == 1 and not (isinstance(padding, str) and padding not in ("SAME", "VALID"))
            and all(d == 1 for d in np.atleast_1d(1 if module.input_dilation is None else module.input_dilation)))


def find_layers(loss_fn: Callable, params, view, *, method: str = "auto", views: int = 1) -> tuple[Layer, ...]:
    """The covered layers of ``loss_fn(params, view) -> scalar`` and their norm method.

    Args:
      loss_fn: the loss of one view (e.g. one crop) of one example.
      params: the parameters (arrays or tracers).
      view: one view (arrays or tracers, without the batch and view axes).
      method: "auto" (:func:`choose_method` per layer) or one of :data:`METHODS` for
        every layer that supports it (``direct`` for the others).
      views: views per example (K), for the cost model.
    """
    calls, found, reachable, layers, loss_trace = {}, {}, {}, [], []

    def record(next_fun, args, kwargs, context):
        if _BYPASS.get():
            return next_fun(*args, **kwargs)
        module, name = context.module, _path(context.module)
        calls[name] = calls.get(name, 0) + 1
        output = next_fun(*args, **kwargs)
        if type(module) in (nn.Conv, nn.Dense) and context.method_name == "__call__" and len(args) == 1 and not kwargs:
            found[name] = (module.clone(parent=None), module.variables.get("params", {}), args[0], output)
            # traced inside a nested transformation (lax.scan, cond, checkpoint): the tape cannot carry it out
            reachable[name] = find_top_trace([args[0]]) is loss_trace[0]
        return output

    def trace(params, view):
        loss_trace[:] = [find_top_trace(jax.tree.leaves((params, view)))]
        position = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}
        with nn.intercept_methods(record):
            loss_fn(params, view)
        claimed = set()
        for name, (module, own, x, y) in found.items():
            indices = tuple(position.get(id(leaf)) for leaf in jax.tree.leaves(own))
            if calls[name] == 1 and indices and None not in indices and not claimed & set(indices) and reachable[name]:
                claimed |= set(indices)
                names = tuple(str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(own)[0])
                layers.append(Layer(name, module, indices, jax.tree.structure(own), names, x.shape, y.shape, y.dtype))

    jax.eval_shape(trace, params, view)
    layers = _used_only_by_their_layer(loss_fn, params, view, layers)
    return tuple(dataclasses.replace(layer, method=(
        choose_method(layer, views) if method == "auto" else method if _unfoldable(layer.module) else "direct"))
        for layer in layers)


def _used_only_by_their_layer(loss_fn, params, view, layers: list[Layer]) -> list[Layer]:
    """The layers whose parameters the loss uses only inside the layer's own call.

    Weight tying or a regulariser would otherwise lose that other use's gradient. The
    check traces the loss as a function of the covered parameters with every covered
    layer computing from a copy of its parameters: an input of that program that is
    still used is used elsewhere.
    """
    if not layers:
        return layers
    leaves, treedef = jax.tree.flatten(params)
    by_name = {layer.name: layer for layer in layers}

    def loss(covered, copies, view):
        """The loss with the covered leaves as ``covered``, each layer reading ``copies``."""

        def substitute(next_fun, args, kwargs, context):
            layer = None if _BYPASS.get() else by_name.get(_path(context.module))
            if layer is None:
                return next_fun(*args, **kwargs)
            return layer.apply([copies[i] for i in layer.leaves], args[0])

        with nn.intercept_methods(substitute):
            return loss_fn(_replaced(treedef, copies, covered), view)

    covered = {i: leaves[i] for layer in layers for i in layer.leaves}
    program = jax.make_jaxpr(loss)(covered, leaves, view).jaxpr
    used = {v for eqn in program.eqns for v in eqn.invars if isinstance(v, Var)}
    used |= {v for v in program.outvars if isinstance(v, Var)}
    elsewhere = {i for i, var in zip(sorted(covered), program.invars) if var in used}
    return [layer for layer in layers if not elsewhere & set(layer.leaves)]


def _replaced(treedef, leaves: list, replacements: dict):
    """The pytree of ``leaves`` with ``replacements`` ({position: leaf}) swapped in."""
    return jax.tree.unflatten(treedef, [replacements.get(i, leaf) for i, leaf in enumerate(leaves)])


def _taped(loss_fn: Callable) -> Callable:
    """``loss_fn(params, view)`` as ``(params, perturbations, view) -> (loss, inputs)``:
    every covered layer named in ``perturbations`` adds its entry (zeros, whose gradient
    is the layer's output gradient) to its output and reports its input."""

    def taped(params, perturbations, view):
        inputs = {}

        def tape(next_fun, args, kwargs, context):
            name = None if _BYPASS.get() else _path(context.module)
            if name not in perturbations or context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            inputs[name] = args[0]
            return next_fun(*args, **kwargs) + perturbations[name]

        with nn.intercept_methods(tape):
            loss = loss_fn(params, view)
        return loss, inputs

    return taped


# ---------------------------------------------------------------------------------------
# Per-layer norms and sums. x: (B, K, *input_shape), g: (B, K, *output_shape).


def _patches(layer: Layer, x: jax.Array) -> jax.Array:
    """(B, T, d) patch matrices: row t is the input patch that output position t reads,
    ordered (*kernel offsets, input channel) like the flattened kernel, gathered by
    strided slices of the padded input (data movement only)."""
    if not layer.spatial:
        return x.reshape(x.shape[0], -1, x.shape[-1])
    module, rank = layer.module, layer.spatial
    as_tuple = lambda v: (1,) * rank if v is None else (v,) * rank if isinstance(v, int) else tuple(v)
    kernel, strides, dilation = tuple(module.kernel_size), as_tuple(module.strides), as_tuple(module.kernel_dilation)
    images = x.reshape((-1,) + x.shape[-(rank + 1):])
    spatial = images.shape[1:-1]
    padding = nn.linear.canonicalize_padding(module.padding, rank)
    if isinstance(padding, str):
        window = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
        padding = jax.lax.padtype_to_pads(spatial, window, strides, padding)
    images = jnp.pad(images, ((0, 0), *padding, (0, 0)))
    out = layer.output_shape[-(rank + 1):-1]
    columns = [images[(slice(None), *(slice(o * d, o * d + (n - 1) * s + 1, s)
                                      for o, d, n, s in zip(offset, dilation, out, strides)))]
               for offset in np.ndindex(*kernel)]
    patches = jnp.stack(columns, axis=-2)  # (N, *out, kernel area, C)
    return patches.reshape(x.shape[0], -1, math.prod(kernel) * images.shape[-1])


def _outputs(g: jax.Array) -> jax.Array:
    """(B, T, o) output gradients."""
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _unfold_grads(layer: Layer, x: jax.Array, g: jax.Array) -> list[jax.Array]:
    """Per-example gradients (B, *leaf shape) from the patch matrix: P_iᵀ g_i."""
    patches, out = _patches(layer, x), _outputs(g)
    kernel = jnp.einsum("btd,bto->bdo", patches, out, precision=HIGHEST)
    if layer.spatial:  # (B, k…·C, o) -> (B, k…, C, o)
        kernel = kernel.reshape((x.shape[0], *layer.module.kernel_size, x.shape[-1], out.shape[-1]))
    own = {"kernel": kernel, "bias": jnp.sum(out, axis=1)}
    return [own[key] for key in layer.names]


def _direct_grads(layer: Layer, params: list, x: jax.Array, g: jax.Array) -> list[jax.Array]:
    """Per-example gradients (B, *leaf shape) from the layer's own vector-Jacobian product."""

    def one(x_i, g_i):
        _, pullback = jax.vjp(lambda p: jax.vmap(lambda v: layer.apply(p, v))(x_i), params)
        return pullback(g_i)[0]

    return jax.vmap(one)(x, g)


def _ghost_square_bound(layer: Layer, x: jax.Array, g: jax.Array) -> jax.Array:
    """(B,) upper bounds on ‖G_i‖² + ‖∇b_i‖² from Gram matrices, rounding included
    (module docstring, "Guarantee")."""
    patches, out = _patches(layer, x).astype(jnp.float32), _outputs(g).astype(jnp.float32)  # e.g. bfloat16 layers
    gram = lambda a: jnp.einsum("btd,bsd->bts", a, a, precision=HIGHEST)
    products = gram(patches) * gram(out)
    kernel = _pairwise_sum(products.reshape(products.shape[0], -1))
    out_norms = jnp.linalg.norm(out, axis=-1)
    scale = jnp.sum(jnp.linalg.norm(patches, axis=-1) * out_norms, axis=1)
    allowance = 2 * gamma(_ghost_terms(layer, out.shape[1]))
    square = jnp.maximum(kernel, 0) + allowance * scale**2
    if "bias" in layer.names:
        bias = jnp.linalg.norm(jnp.sum(out, axis=1), axis=-1)
        square += (bias * (1 + allowance) + allowance * jnp.sum(out_norms, axis=1)) ** 2
    return square


def _ghost_terms(layer: Layer, positions: int) -> int:
    """n of the ghost allowance γ_n: the Gram dot products' lengths d and o, the levels
    of the pairwise sum over T² products, and a few single roundings."""
    patch, out = layer.sizes(1)[1:]
    return patch + out + math.ceil(math.log2(max(positions, 2) ** 2)) + positions + 8


def _pairwise_sum(v: jax.Array) -> jax.Array:
    """Σ over the last axis as a balanced binary tree of single additions, so that its
    rounding error is at most γ_⌈log₂ n⌉ of the sum of magnitudes (XLA does not
    reassociate floating-point additions)."""
    while v.shape[-1] > 1:
        if v.shape[-1] % 2:
            v = jnp.concatenate([v, jnp.zeros_like(v[..., :1])], axis=-1)
        v = v[..., 0::2] + v[..., 1::2]
    return v[..., 0]


def _batch_grads(layer: Layer, params: list, x: jax.Array, g: jax.Array) -> list[jax.Array]:
    """Σ_i of the layer's gradient for inputs x_i and output gradients g_i: the
    layer's batch weight gradient."""
    _, pullback = jax.vjp(lambda p: jax.vmap(jax.vmap(lambda v: layer.apply(p, v)))(x), params)
    return pullback(g)[0]


def _broadcast(c: jax.Array, like: jax.Array) -> jax.Array:
    return c.reshape(c.shape + (1,) * (like.ndim - 1))


def clipped_sum(loss_fn: Callable, params, layers: tuple[Layer, ...], examples, mask: jax.Array,
                clip_norm: float) -> tuple[object, jax.Array, jax.Array]:
    """Σ_i m_i f_i c_i ∇loss_i by book-keeping, for examples with K views each.

    Args:
      loss_fn: ``loss_fn(params, view) -> scalar``; an example's loss is the mean over
        its views.
      params: the parameters.
      layers: from :func:`find_layers` (may be empty: all parameters per-example).
      examples: pytree with leaves (B, K, ...).
      mask: bool (B,).
      clip_norm: C > 0.

    Returns:
      (total, losses, norms): the clipped sum (structure of ``params``, leaves ≥ float32),
      the example losses (B,) and the norms (B,) used for clipping (ghost layers'
      contributions are upper bounds). As in :func:`patchdp.clipping.clip_per_example`,
      an example with a non-finite norm or m_i = 0 contributes exactly zero.
    """
    leaves, treedef = jax.tree.flatten(params)
    covered = {i for layer in layers for i in layer.leaves}
    rest = {i: leaf for i, leaf in enumerate(leaves) if i not in covered}
    size, views = jax.tree.leaves(examples)[0].shape[:2]
    zeros = {layer.name: jnp.zeros((size, views) + layer.output_shape, layer.output_dtype) for layer in layers}
    taped = jax.vmap(_taped(loss_fn), in_axes=(None, 0, 0))

    def example_loss(rest, perturbations, example):
        losses, inputs = taped(_replaced(treedef, leaves, rest), perturbations, example)
        return jnp.mean(losses), inputs

    backward = jax.vmap(jax.value_and_grad(example_loss, argnums=(0, 1), has_aux=True), in_axes=(None, 0, 0))
    (losses, inputs), (rest_grads, out_grads) = backward(rest, zeros, examples)

    taps = [(layer, [leaves[i] for i in layer.leaves], inputs[layer.name], out_grads[layer.name]) for layer in layers]
    squares, grads = zip(*[square_norms(*tap) for tap in taps]) if taps else ((), ())
    norms = jnp.sqrt(sum(squares) + sum(squared_norms(g) for g in rest_grads.values()))
    keep = mask & jnp.isfinite(norms)
    scale = jnp.where(keep, clip_norm / jnp.maximum(norms, clip_norm), 0)

    total = {i: _scaled_sum(g, scale) for i, g in rest_grads.items()}
    for tap, grad in zip(taps, grads):
        total.update(zip(tap[0].leaves, clipped_sums(*tap, grad, scale)))
    return jax.tree.unflatten(treedef, [total[i] for i in range(len(leaves))]), losses, norms


def square_norms(layer: Layer, params: list, x: jax.Array, g: jax.Array) -> tuple[jax.Array, list | None]:
    """(B,) squared norms of the layer's per-example gradients (an upper bound for
    ``ghost``), and the per-example gradients for ``direct`` and ``unfold`` (None for
    ``ghost``). ``params``: the layer's parameter leaves; x: (B, K, *input_shape);
    g: (B, K, *output_shape) output gradients."""
    if layer.method == "ghost":
        return _ghost_square_bound(layer, x, g), None
    grads = _unfold_grads(layer, x, g) if layer.method == "unfold" else _direct_grads(layer, params, x, g)
    return sum(squared_norms(v) for v in grads), grads


def clipped_sums(layer: Layer, params: list, x: jax.Array, g: jax.Array, grads: list | None,
                 scale: jax.Array) -> list[jax.Array]:
    """Σ_i scale_i · (the layer's gradient of example i), per parameter leaf (≥ float32);
    ``scale`` (B,) is zero for every example that must contribute nothing."""
    if grads is not None:
        return [_scaled_sum(v, scale) for v in grads]
    keep = scale > 0
    x = jnp.where(_broadcast(keep, x), x, 0)
    g = jnp.where(_broadcast(keep, g), g * _broadcast(scale, g).astype(g.dtype), 0)
    return [_at_least_float32(v) for v in _batch_grads(layer, params, x, g)]


def squared_norms(v: jax.Array) -> jax.Array:
    """(B,) squared norms, in float32, of the per-example arrays v (B, ...)."""
    return jnp.sum(jnp.square(v.astype(jnp.float32)).reshape(v.shape[0], -1), axis=1)


def _at_least_float32(v: jax.Array) -> jax.Array:
    return v.astype(jnp.promote_types(v.dtype, jnp.float32))


def _scaled_sum(v: jax.Array, scale: jax.Array) -> jax.Array:
    """Σ_i scale_i v_i, exactly zero terms where scale_i = 0 (even if v_i is not finite)."""
    v = _at_least_float32(v)
    return jnp.sum(jnp.where(_broadcast(scale > 0, v), v * _broadcast(scale, v).astype(v.dtype), 0), axis=0)
