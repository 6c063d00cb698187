"""Book-keeping clipping: per-example norms and clipped sums without per-example
gradients of the large layers (docs/method.md, "Fast clipping").

The layers are found on the traced program of the loss (:mod:`patchdp.program`): every
``dot_general`` and ``conv_general_dilated`` (transposed convolutions included) whose
weight operand is a parameter leaf used nowhere else, in any model written in any JAX
framework. For such a layer ``y = x ⋆ W`` that example i's views meet at positions
t = 1 … T (every view, every output position), the per-example weight gradient is

    G_i = Σ_t P_it ⊗ g_it,

with P_it the input patch at t (d = kernel area × input channels values for a
convolution; the contracted input values for a dense layer) and g_it = ∂loss_i/∂y_it
the output gradient (o values). One backward pass of the summed loss gives every g_i
(examples do not mix), so the layer's part of ‖∇loss_i‖² follows from (P_i, g_i) by one
of three methods, chosen per layer:

- ``direct``: G_i materialised by the operation's own vector-Jacobian product under
  ``vmap`` (for a convolution XLA makes that a grouped convolution); any layer.
- ``unfold``: G_i = P_iᵀ g_i materialised by a batched matrix product of the patch
  matrix: T·d·o multiply-adds and T·d patch values per example (no feature groups).
- ``ghost``: ‖G_i‖² = Σ_{t,t'} (P_it·P_it')(g_it·g_it') from two T×T Gram matrices,
  never materialising G_i: T²·(d + o) multiply-adds, best when T·(d + o) < d·o (few
  pixels, many channels: the deep layers of a ResNet). Only for a weight that is its
  leaf rearranged (no replication), so that ‖G_i‖ is the leaf's gradient norm.

The leaf's gradient is the transpose of its chain (reshape, transpose, …) applied to
G_i, in the operation's precision (at least float32; a bfloat16 leaf used in float32
gets its float32 gradient, not one rounded to bfloat16). With the clip factor
c_i = min(1, C / ‖∇loss_i‖), the clipped sum of a ``direct`` or ``unfold`` layer is
Σ_i c_i G_i from the same materialised G_i whose norms were measured; that of a
``ghost`` layer is the operation's batch weight gradient with the output gradients
rescaled, Σ_i P_iᵀ (c_i g_i): the cost of the non-private step. Every other parameter
(biases, normalisation scales, weights used twice, inside ``scan``/``cond``/``remat``/
custom derivatives/``shard_map``, or through other operations) gets per-example
gradients from the same backward pass, so the result equals the per-example path for
any loss.

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
so that accelerators do not round them to bfloat16; tapes of lower precision are
raised to float32 first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from patchdp import program as programs

__all__ = ["METHODS", "Layer", "Plan", "find_layers", "choose_method", "clipped_sum", "square_norms",
           "clipped_sums", "squared_norms"]

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
    """One layer found on the loss's program: a ``dot_general`` or
    ``conv_general_dilated`` whose weight operand comes from one parameter leaf.

    Attributes:
      match: where it is (:class:`patchdp.program.Match`: leaf, equation, weight side, chain).
      op: the operation's equation.
      input_shape: the other operand's shape in one view (e.g. (1, H, W, C)).
      weight_shape: the weight operand's shape (the leaf after its chain).
      leaf_shape: the parameter leaf's shape.
      output_shape, output_dtype: the operation's output in one view.
      method: one of :data:`METHODS`.
    """

    match: programs.Match
    op: programs.Eqn
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    leaf_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output_dtype: object
    method: str = "direct"

    @property
    def leaf(self) -> int:
        """Position of its parameter among ``jax.tree.leaves(params)``."""
        return self.match.leaf

    @property
    def conv(self) -> bool:
        return self.op.name == "conv_general_dilated"

    @property
    def kernel(self) -> tuple[int, ...]:
        """Kernel window (spatial sizes); () for a dense layer."""
        if not self.conv:
            return ()
        return tuple(self.weight_shape[a] for a in self.op.params["dimension_numbers"].rhs_spec[2:])

    def sizes(self, views: int) -> tuple[int, int, int]:
        """(T, d, o) per example with ``views`` views: positions, patch size, outputs."""
        if self.conv:
            rhs = self.op.params["dimension_numbers"].rhs_spec
            out = self.op.params["dimension_numbers"].out_spec
            positions = math.prod(self.output_shape) // self.output_shape[out[1]]
            return (views * positions, math.prod(self.kernel) * self.weight_shape[rhs[1]],
                    self.weight_shape[rhs[0]])
        x_contract, w_contract = self._contracting()
        d = math.prod(self.input_shape[a] for a in x_contract)
        return (views * math.prod(self.input_shape) // d, d,
                math.prod(self.weight_shape) // math.prod(self.weight_shape[a] for a in w_contract))

    def supports(self, method: str) -> bool:
        """``direct`` always; ``unfold`` without feature groups; ``ghost`` also needs a
        weight that is its leaf rearranged (same number of values)."""
        unfoldable = not self.conv or self.op.params["feature_group_count"] == 1
        isometric = math.prod(self.weight_shape) == math.prod(self.leaf_shape)
        return method == "direct" or unfoldable and (method == "unfold" or isometric)

    def _contracting(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input's, weight's) contracting axes of a dense layer, paired in order."""
        contracting, _ = self.op.params["dimension_numbers"]
        return tuple(contracting[1 - self.match.side]), tuple(contracting[self.match.side])


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """The traced loss and its layers (:func:`find_layers`)."""

    program: programs.Program
    layers: tuple[Layer, ...]


def choose_method(layer: Layer, views: int = 1) -> str:
    """The fastest exact norm method for ``layer``, by a cost model fitted to the
    per-layer measurements of benchmarks/bench_layers.py (XLA:CPU, README there):

    - ``ghost`` when T·(d + o) < d·o, i.e. its T²·(d + o) multiply-adds undercut the
      T·d·o of materialising G_i (few positions, many channels), and its rounding
      allowance γ_n stays ≤ 1%;
    - ``unfold`` for dense layers, 1×1 convolutions (the patch matrix is the input
      itself), patches of at most 32 values (a first layer on RGB images: 3·3·3) and
      transposed convolutions (input dilation: the U-Net's 2×2 up-convolutions took
      0.67–0.71 of ``direct``'s time);
    - ``direct`` otherwise: there the grouped convolution was as fast as or faster than
      the patch matrix, which copies every input value kernel-area times.
    """
    positions, patch, out = layer.sizes(views)
    if (layer.supports("ghost") and positions * (patch + out) < patch * out
            and gamma(_ghost_terms(patch, out, positions)) <= MAX_GHOST_GAMMA):
        return "ghost"
    transposed = layer.conv and any(d > 1 for d in layer.op.params["lhs_dilation"])
    if layer.supports("unfold") and (not layer.conv or math.prod(layer.kernel) == 1 or patch <= SMALL_PATCH
                                     or transposed):
        return "unfold"
    return "direct"


def find_layers(loss_fn: Callable, params, view, *, method: str = "auto", views: int = 1) -> Plan:
    """The traced ``loss_fn(params, view) -> scalar`` and its layers with their norm method.

    Args:
      loss_fn: the loss of one view (e.g. one crop) of one example.
      params: the parameters (arrays, tracers or ``jax.ShapeDtypeStruct``).
      view: one view (the same; without the batch and view axes).
      method: "auto" (:func:`choose_method` per layer) or one of :data:`METHODS` for
        every layer that supports it (``direct`` for the others).
      views: views per example (K), for the cost model.
    """
    program = programs.trace(loss_fn, params, view)
    leaves = jax.tree.leaves(jax.eval_shape(lambda tree: tree, params))
    layers = []
    for match in programs.matches(program):
        op = program.eqns[match.eqn]
        operand = lambda position: program.aval(op.inputs[position])
        layer = Layer(match, op, operand(1 - match.side).shape, operand(match.side).shape,
                      tuple(leaves[match.leaf].shape), op.avals[0].shape, op.avals[0].dtype)
        chosen = (choose_method(layer, views) if method == "auto" else method if layer.supports(method)
                  else "direct")
        layers.append(dataclasses.replace(layer, method=chosen))
    return Plan(program, tuple(layers))


# ---------------------------------------------------------------------------------------
# Per-layer geometry. x: (B, K, *input_shape), g: (B, K, *output_shape) tapes.


def _compute_dtype(layer: Layer):
    """The precision of the norms and sums: the operation's, at least float32."""
    return jnp.promote_types(layer.output_dtype, jnp.float32)


def _patches(layer: Layer, x: jax.Array) -> jax.Array:
    """(B, T, d) patch matrices: row t is the input patch that output position t reads,
    ordered like the weight's rows (:func:`_to_weight`); for a convolution gathered by
    strided slices of the padded (and, for a transposed convolution, dilated) input."""
    x = x.astype(_compute_dtype(layer))
    if not layer.conv:
        contract, _ = layer._contracting()
        free = tuple(a for a in range(len(layer.input_shape)) if a not in contract)
        x = x.transpose((0, 1) + tuple(2 + a for a in free + contract))
        return x.reshape(x.shape[0], -1, math.prod(layer.input_shape[a] for a in contract))
    params, spec = layer.op.params, layer.op.params["dimension_numbers"].lhs_spec
    x = x.transpose((0, 1, 2 + spec[0], *(2 + a for a in spec[2:]), 2 + spec[1]))  # (B, K, N, *spatial, C)
    images = x.reshape((-1,) + x.shape[3:])
    config = [(0, 0, 0), *((low, high, dilation - 1) for (low, high), dilation in
                           zip(params["padding"], params["lhs_dilation"])), (0, 0, 0)]
    images = jax.lax.pad(images, jnp.zeros((), images.dtype), config)
    out_spec = layer.op.params["dimension_numbers"].out_spec
    out = tuple(layer.output_shape[a] for a in out_spec[2:])
    columns = [images[(slice(None), *(slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, n, s in
                                      zip(offset, params["rhs_dilation"], out, params["window_strides"])))]
               for offset in np.ndindex(*layer.kernel)]
    patches = jnp.stack(columns, axis=-2)  # (B·K·N, *out, kernel area, C)
    return patches.reshape(x.shape[0], -1, math.prod(layer.kernel) * images.shape[-1])


def _outputs(layer: Layer, g: jax.Array) -> jax.Array:
    """(B, T, o) output gradients, positions in the order of :func:`_patches`."""
    g = g.astype(_compute_dtype(layer))
    if layer.conv:
        spec = layer.op.params["dimension_numbers"].out_spec
        g = g.transpose((0, 1, 2 + spec[0], *(2 + a for a in spec[2:]), 2 + spec[1]))
    elif layer.match.side == 0:  # weight on the left: output axes (weight's free…, input's free…)
        free = len(layer.output_shape) - (len(layer.input_shape) - len(layer._contracting()[0]))
        g = jnp.moveaxis(g, tuple(range(2, 2 + free)), tuple(range(g.ndim - free, g.ndim)))
    return g.reshape(g.shape[0], -1, layer.sizes(1)[2])


def _to_weight(layer: Layer, grads: jax.Array) -> jax.Array:
    """(B, d, o) patch-by-output gradients to (B, *weight_shape)."""
    if layer.conv:
        spec = layer.op.params["dimension_numbers"].rhs_spec
        order = (*spec[2:], spec[1], spec[0])  # weight axes in (kernel…, in, out) order
    else:
        _, contract = layer._contracting()
        order = contract + tuple(a for a in range(len(layer.weight_shape)) if a not in contract)
    grads = grads.reshape((grads.shape[0],) + tuple(layer.weight_shape[a] for a in order))
    return grads.transpose((0,) + tuple(1 + i for i in np.argsort(order)))


def _to_leaf(layer: Layer, grad: jax.Array) -> jax.Array:
    """A weight-operand gradient (weight_shape) to the leaf's gradient (leaf_shape): the
    transpose of the chain, without its dtype conversions (the precision stays)."""

    def chain(leaf):
        for eqn in layer.match.chain:
            leaf = leaf if eqn.name == "convert_element_type" else eqn.bind(leaf)
        return leaf

    _, pullback = jax.vjp(chain, jnp.zeros(layer.leaf_shape, grad.dtype))
    return pullback(grad)[0]


def _forward(layer: Layer, x: jax.Array, w: jax.Array) -> jax.Array:
    """The operation on one view's input ``x`` and weight operand ``w`` (same dtype)."""
    operands = (w, x) if layer.match.side == 0 else (x, w)
    return layer.op.bind(*operands, preferred_element_type=None)


def _weight_grads(layer: Layer, x: jax.Array, g: jax.Array, per_example: bool) -> jax.Array:
    """The operation's weight gradient from its vector-Jacobian product: per example
    (B, *weight_shape) or summed over the batch (weight_shape)."""
    dtype = _compute_dtype(layer)
    x, g = x.astype(dtype), g.astype(dtype)

    def grad(x, g):  # x: (..., *input_shape): one vmap per leading axis
        forward = lambda w: _vmapped(lambda v: _forward(layer, v, w), x.ndim - len(layer.input_shape))(x)
        return jax.vjp(forward, jnp.zeros(layer.weight_shape, dtype))[1](g)[0]

    return jax.vmap(grad)(x, g) if per_example else grad(x, g)


def _vmapped(f: Callable, depth: int) -> Callable:
    for _ in range(depth):
        f = jax.vmap(f)
    return f


def _ghost_square_bound(layer: Layer, x: jax.Array, g: jax.Array) -> jax.Array:
    """(B,) upper bounds on ‖G_i‖² from Gram matrices, rounding included (module
    docstring, "Guarantee")."""
    patches = _patches(layer, x).astype(jnp.float32)
    out = _outputs(layer, g).astype(jnp.float32)
    gram = lambda a: jnp.einsum("btd,bsd->bts", a, a, precision=HIGHEST)
    products = gram(patches) * gram(out)
    square = _pairwise_sum(products.reshape(products.shape[0], -1))
    scale = jnp.sum(jnp.linalg.norm(patches, axis=-1) * jnp.linalg.norm(out, axis=-1), axis=1)
    allowance = 2 * gamma(_ghost_terms(patches.shape[-1], out.shape[-1], out.shape[1]))
    return jnp.maximum(square, 0) + allowance * scale**2


def _ghost_terms(patch: int, out: int, positions: int) -> int:
    """n of the ghost allowance γ_n: the Gram dot products' lengths d and o, the levels
    of the pairwise sum over T² products, and a few single roundings."""
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


def _broadcast(c: jax.Array, like: jax.Array) -> jax.Array:
    return c.reshape(c.shape + (1,) * (like.ndim - 1))


# ---------------------------------------------------------------------------------------
# The clipped sum.


def clipped_sum(plan: Plan, params, examples, mask: jax.Array,
                clip_norm: float) -> tuple[object, jax.Array, jax.Array]:
    """Σ_i m_i f_i c_i ∇loss_i by book-keeping, for examples with K views each.

    Args:
      plan: from :func:`find_layers` (its layers may be empty: all parameters per-example).
      params: the parameters, of the shapes and dtypes traced.
      examples: pytree with leaves (B, K, ...), each view of the traced structure.
      mask: bool (B,).
      clip_norm: C > 0.

    Returns:
      (total, losses, norms): the clipped sum (structure of ``params``, leaves ≥ float32),
      the example losses (B,) (the mean over its views) and the norms (B,) used for
      clipping (ghost layers' contributions are upper bounds). As in
      :func:`patchdp.clipping.clip_per_example`, an example with a non-finite norm or
      m_i = 0 contributes exactly zero.
    """
    leaves, treedef = jax.tree.flatten(params)
    layers = plan.layers
    rest = {i: leaf for i, leaf in enumerate(leaves) if i not in {layer.leaf for layer in layers}}
    size, views = jax.tree.leaves(examples)[0].shape[:2]
    zeros = {layer.match.eqn: jnp.zeros((size, views) + layer.output_shape, layer.output_dtype) for layer in layers}

    def view_loss(rest, perturbations, view):
        values = [rest.get(i, leaf) for i, leaf in enumerate(leaves)]
        loss, taps = programs.evaluate(plan.program, values, jax.tree.leaves(view), perturbations)
        return loss, {layer.match.eqn: taps[layer.match.eqn][1 - layer.match.side] for layer in layers}

    def example_loss(rest, perturbations, example):
        losses, inputs = jax.vmap(view_loss, in_axes=(None, 0, 0))(rest, perturbations, example)
        return jnp.mean(losses), inputs

    backward = jax.vmap(jax.value_and_grad(example_loss, argnums=(0, 1), has_aux=True), in_axes=(None, 0, 0))
    (losses, inputs), (rest_grads, out_grads) = backward(rest, zeros, examples)

    taps = [(layer, inputs[layer.match.eqn], out_grads[layer.match.eqn]) for layer in layers]
    squares, grads = zip(*[square_norms(*tap) for tap in taps]) if taps else ((), ())
    norms = jnp.sqrt(sum(squares) + sum(squared_norms(g) for g in rest_grads.values()))
    keep = mask & jnp.isfinite(norms)
    scale = jnp.where(keep, clip_norm / jnp.maximum(norms, clip_norm), 0)

    total = {i: _scaled_sum(g, scale) for i, g in rest_grads.items()}
    for tap, grad in zip(taps, grads):
        total[tap[0].leaf] = clipped_sums(*tap, grad, scale)
    return jax.tree.unflatten(treedef, [total[i] for i in range(len(leaves))]), losses, norms


def square_norms(layer: Layer, x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(B,) squared norms of the layer's per-example leaf gradients (an upper bound for
    ``ghost``), and those gradients (B, *leaf_shape) for ``direct`` and ``unfold``
    (None for ``ghost``). x: (B, K, *input_shape) inputs; g: (B, K, *output_shape)
    output gradients."""
    if layer.method == "ghost":
        return _ghost_square_bound(layer, x, g), None
    if layer.method == "unfold":
        weights = _to_weight(layer, jnp.einsum("btd,bto->bdo", _patches(layer, x), _outputs(layer, g),
                                               precision=HIGHEST))
    else:
        weights = _weight_grads(layer, x, g, per_example=True)
    grads = jax.vmap(lambda w: _to_leaf(layer, w))(weights)
    return squared_norms(grads), grads


def clipped_sums(layer: Layer, x: jax.Array, g: jax.Array, grads: jax.Array | None,
                 scale: jax.Array) -> jax.Array:
    """Σ_i scale_i · (example i's gradient of the layer's leaf) (leaf_shape, ≥ float32);
    ``scale`` (B,) is zero for every example that must contribute nothing."""
    if grads is not None:
        return _scaled_sum(grads, scale)
    keep = scale > 0
    x = jnp.where(_broadcast(keep, x), x, 0)
    g = jnp.where(_broadcast(keep, g), g.astype(_compute_dtype(layer)) * _broadcast(scale, g), 0)
    return _to_leaf(layer, _weight_grads(layer, x, g, per_example=False))


def squared_norms(v: jax.Array) -> jax.Array:
    """(B,) squared norms, in float32, of the per-example arrays v (B, ...)."""
    return jnp.sum(jnp.square(v.astype(jnp.float32)).reshape(v.shape[0], -1), axis=1)


def _scaled_sum(v: jax.Array, scale: jax.Array) -> jax.Array:
    """Σ_i scale_i v_i (≥ float32), exactly zero terms where scale_i = 0 (even if v_i is
    not finite)."""
    v = v.astype(jnp.promote_types(v.dtype, jnp.float32))
    return jnp.sum(jnp.where(_broadcast(scale > 0, v), v * _broadcast(scale, v).astype(v.dtype), 0), axis=0)
