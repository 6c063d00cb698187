"""A loss function as a flat traced program, and the layers found on it.

Book-keeping clipping (:mod:`patchdp.bookkeeping`) needs, for every layer
``y = x · W`` of the loss, the layer's input ``x`` and the gradient of the loss with
respect to its output ``y``. This module finds such layers on the jaxpr of
``loss_fn(params, view)`` — not through any model framework, so flax.linen, Flax NNX,
Equinox and plain ``jax.numpy`` models are all seen the same way — and evaluates the
program again with a tap on each of them.

**The program.** ``jax.make_jaxpr(loss_fn)(params, view)`` with every nested ``jit``
call inlined (those carrying no sharding annotations), so that a layer inside a jitted
helper is seen. Every other higher-order primitive (``scan``, ``cond``, ``while``,
``remat``, ``custom_jvp_call``, ``custom_vjp_call``, ``shard_map``, …) stays one opaque
equation, evaluated as it was traced.

**A layer** is an equation ``dot_general`` (no batch dimensions) or
``conv_general_dilated`` (the parameter as its kernel; any padding, strides, input and
kernel dilation, feature groups; not batch groups) one of whose operands is a parameter
leaf, directly or through a chain of ``reshape`` / ``transpose`` / ``squeeze`` /
``expand_dims`` / ``broadcast_in_dim`` / ``convert_element_type`` / ``copy``, where the
leaf and every link of the chain are used by exactly one equation. Then the leaf's
whole gradient is the chain's transpose applied to the operation's weight gradient,
which depends only on the operation's other operand and its output gradient. A leaf used
anywhere else (weight tying, a regulariser, a second call, a use inside an opaque
equation) or transformed by anything else (``2 * W``, ``tanh(W)``) is no layer; an
operation both of whose operands are such chains is none either; a product of two
activations has no parameter operand at all. Those parameters get exact per-example
gradients instead (:func:`patchdp.bookkeeping.clipped_sum`): an unmatched case costs
time, never correctness.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

__all__ = ["Eqn", "Program", "Match", "trace", "evaluate", "matches"]

# Linear ops that only move, replicate or re-type values: a chain of them from a leaf
# to an operand is a linear map whose transpose gives the leaf's gradient.
TRANSPARENT = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
                         "convert_element_type", "copy", "copy_p"})


@dataclasses.dataclass(frozen=True, eq=False)
class Eqn:
    """One equation of the flat program: ``outputs = primitive.bind(*inputs, **params)``.

    ``inputs`` are value ids (int) or :class:`jax.extend.core.Literal`; ``outputs`` are
    value ids; ``avals`` the outputs' abstract values; ``ctx`` the equation's context
    (whose ``manager`` :func:`jax.core.eval_jaxpr` enters around the bind)."""

    primitive: Any
    params: dict
    inputs: tuple
    outputs: tuple[int, ...]
    avals: tuple
    ctx: Any

    @property
    def name(self) -> str:
        return self.primitive.name

    def bind(self, *values, **overrides):
        """The equation applied to ``values`` (a list of outputs if it has several)."""
        with self.ctx.manager:
            return self.primitive.bind(*values, **self.primitive.get_bind_params({**self.params, **overrides}))


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """``loss_fn(params, view)`` as a flat list of equations.

    Attributes:
      eqns: the equations in evaluation order.
      consts: {value id: constant} (the loss's closed-over arrays).
      params, view: value ids of ``jax.tree.leaves(params)`` and of ``jax.tree.leaves(view)``.
      outputs: value ids or literals of the loss's outputs.
      out_tree: the structure of the loss's output.
      avals: {value id: abstract value (shape, dtype)} of every value.
    """

    eqns: tuple[Eqn, ...]
    consts: dict
    params: tuple[int, ...]
    view: tuple[int, ...]
    outputs: tuple
    out_tree: Any
    avals: dict

    def aval(self, value):
        """The abstract value of a value id or literal."""
        return value.aval if isinstance(value, Literal) else self.avals[value]


@dataclasses.dataclass(frozen=True, eq=False)
class Match:
    """A parameter leaf that enters exactly one ``dot_general`` / ``conv_general_dilated``.

    Attributes:
      leaf: its position among ``jax.tree.leaves(params)``.
      eqn: the operation's position in :attr:`Program.eqns`.
      side: the operand position of the weight (0 or 1).
      chain: the transparent equations from the leaf to the operand, in order.
    """

    leaf: int
    eqn: int
    side: int
    chain: tuple[Eqn, ...]


def trace(loss_fn: Callable, params, view) -> Program:
    """The flat program of ``loss_fn(params, view)`` (arrays, tracers or
    ``jax.ShapeDtypeStruct``; only shapes and dtypes are used)."""
    params, view = jax.eval_shape(lambda tree: tree, (params, view))
    closed, out_shape = jax.make_jaxpr(loss_fn, return_shape=True)(params, view)
    counter, eqns, consts = iter(range(1 << 62)), [], {}
    inputs = [next(counter) for _ in closed.jaxpr.invars]
    avals = dict(zip(inputs, (v.aval for v in closed.jaxpr.invars)))
    outputs = _inline(closed.jaxpr, closed.consts, inputs, counter, eqns, consts, avals)
    count = len(jax.tree.leaves(params))
    return Program(tuple(eqns), consts, tuple(inputs[:count]), tuple(inputs[count:]), tuple(outputs),
                   jax.tree.structure(out_shape), avals)


def _inline(jaxpr, const_values, inputs, counter, eqns: list, consts: dict, avals: dict) -> list:
    """Appends the equations of ``jaxpr`` (applied to value ids ``inputs``) to ``eqns``,
    inlining nested ``jit`` calls without sharding annotations; returns its output ids.
    Records constants in ``consts`` and every new value's abstract value in ``avals``."""
    env = {}
    for var, value in zip(jaxpr.constvars, const_values):
        env[var] = next(counter)
        consts[env[var]], avals[env[var]] = value, var.aval
    env.update(zip(jaxpr.invars, inputs))
    read = lambda v: v if isinstance(v, Literal) else env[v]
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        if _inlinable(eqn):
            inner = eqn.params["jaxpr"]
            results = _inline(inner.jaxpr, inner.consts, values, counter, eqns, consts, avals)
        else:
            results = [next(counter) for _ in eqn.outvars]
            avals.update(zip(results, (v.aval for v in eqn.outvars)))
            eqns.append(Eqn(eqn.primitive, dict(eqn.params), tuple(values), tuple(results),
                            tuple(v.aval for v in eqn.outvars), eqn.ctx))
        env.update(zip(eqn.outvars, results))
    return [read(v) for v in jaxpr.outvars]


def _inlinable(eqn) -> bool:
    """A nested ``jit`` whose boundary means nothing but compilation (no shardings, no donation)."""
    if eqn.primitive.name not in ("jit", "pjit"):
        return False
    unspecified = lambda shardings: all(type(s).__name__ == "UnspecifiedValue" for s in shardings)
    return (unspecified(eqn.params["in_shardings"]) and unspecified(eqn.params["out_shardings"])
            and not any(eqn.params.get("donated_invars", ())))


def evaluate(program: Program, params: list, view: list, perturbations: dict | None = None):
    """Evaluates the program: returns ``(output, taps)``.

    Args:
      params, view: the leaves of ``params`` and ``view`` (any values of the traced
        shapes and dtypes, under any transformation).
      perturbations: {equation position: array of its output's shape}: each is added to
        that equation's output, so that its gradient is the output's gradient.

    Returns:
      The loss's output (its traced structure) and ``taps``: {equation position: that
      equation's operands (a list)} for every perturbed equation.
    """
    perturbations = perturbations or {}
    env = dict(program.consts)
    env.update(zip(program.params, params))
    env.update(zip(program.view, view))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]
    taps = {}
    for index, eqn in enumerate(program.eqns):
        values = [read(v) for v in eqn.inputs]
        results = eqn.bind(*values)
        results = list(results) if eqn.primitive.multiple_results else [results]
        if index in perturbations:
            taps[index] = values
            results[0] = results[0] + perturbations[index]
        env.update(zip(eqn.outputs, results))
    return jax.tree.unflatten(program.out_tree, [read(v) for v in program.outputs]), taps


def matches(program: Program) -> tuple[Match, ...]:
    """Every parameter leaf that is the weight of exactly one layer (module docstring),
    in the order of the leaves; an operation with two such operands gives none."""
    uses: dict[int, list[tuple[int, int]]] = {}
    for index, eqn in enumerate(program.eqns):
        for position, v in enumerate(eqn.inputs):
            if not isinstance(v, Literal):
                uses.setdefault(v, []).append((index, position))
    for v in program.outputs:
        if not isinstance(v, Literal):
            uses.setdefault(v, []).append((-1, 0))
    found = []
    for leaf, value in enumerate(program.params):
        chain = []
        while len(uses.get(value, ())) == 1:
            index, position = uses[value][0]
            eqn = program.eqns[index] if index >= 0 else None
            if eqn is not None and eqn.name in TRANSPARENT and len(eqn.inputs) == 1:
                chain.append(eqn)
                value = eqn.outputs[0]
                continue
            if eqn is not None and _is_layer(eqn, position) and jnp.issubdtype(eqn.avals[0].dtype, jnp.floating):
                found.append(Match(leaf, index, position, tuple(chain)))
            break
    per_eqn = {}
    for match in found:
        per_eqn[match.eqn] = per_eqn.get(match.eqn, 0) + 1
    return tuple(match for match in found if per_eqn[match.eqn] == 1)


def _is_layer(eqn: Eqn, position: int) -> bool:
    """A ``dot_general`` without batch dimensions, or a ``conv_general_dilated`` with the
    weight as its kernel and no batch groups."""
    if eqn.name == "dot_general":
        (_, _), (batch_lhs, batch_rhs) = eqn.params["dimension_numbers"]
        return not batch_lhs and not batch_rhs
    return eqn.name == "conv_general_dilated" and position == 1 and eqn.params["batch_group_count"] == 1
