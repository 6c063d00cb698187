"""Building blocks shared by every model: per-example normalisation and conv units.

DP-SGD clips each example's gradient on its own, so nothing in a forward pass may mix
examples of a batch. The two normalisations offered both act on one example at a time:

- ``"group"`` — GroupNorm (statistics over H, W and a group of channels of *one*
  example); the default for training from scratch.
- ``"affine"`` — a per-channel ``x * scale + shift``: BatchNorm with frozen statistics
  folded into a fixed affine map (:func:`fold_batchnorm`), for pretrained weights.
  ``scale`` and ``shift`` stay trainable parameters, like BatchNorm's γ and β; the
  running statistics themselves are gone, so no extra variable collection exists and
  the model's variables are one pure ``params`` pytree.

Its parameters are called ``shift`` (GroupNorm's are ``bias``) on purpose: converted
BatchNorm weights cannot be loaded into a GroupNorm model by mistake.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NORMS = ("group", "affine")
MAX_GROUPS = 32


def check_choice(name: str, value, choices: Sequence) -> None:
    """Raise a ValueError naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def check_positive(name: str, value) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def group_count(channels: int) -> int:
    """GroupNorm's group count for ``channels``: the largest divisor of ``channels`` that
    is at most 32 and leaves at least two channels per group (32 for the usual widths)."""
    return next(g for g in range(min(MAX_GROUPS, max(channels // 2, 1)), 0, -1) if channels % g == 0)


class Affine(nn.Module):
    """Per-channel ``x * scale + shift`` over the last axis (frozen BatchNorm)."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        shift = self.param("shift", nn.initializers.zeros, (c,))
        return x * scale + shift


def fold_batchnorm(gamma, beta, mean, var, eps: float = 1e-5) -> dict[str, np.ndarray]:
    """BatchNorm in inference mode, ``γ (x − μ) / √(σ² + eps) + β``, as :class:`Affine`
    parameters ``{"scale": γ / √(σ² + eps), "shift": β − μ · scale}`` (float32)."""
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    shift = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale
    return {"scale": scale.astype(np.float32), "shift": shift.astype(np.float32)}


def make_norm(kind: str, channels: int, name: str | None = None) -> nn.Module:
    """The normalisation layer ``kind`` (one of :data:`NORMS`) for ``channels`` channels."""
    if kind == "group":
        return nn.GroupNorm(num_groups=group_count(channels), name=name)
    return Affine(name=name)


class ConvNorm(nn.Module):
    """Convolution (no bias) → normalisation → optional ReLU; NHWC in, NHWC out.

    Padding is ``dilation · (kernel // 2)`` on every side, as in PyTorch, so a stride-s
    convolution maps H to ⌈H / s⌉ and pretrained weights see the same alignment.
    """

    features: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    norm: str = "group"
    relu: bool = True

    @nn.compact
    def __call__(self, x):
        pad = self.dilation * (self.kernel // 2)
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=self.stride,
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=self.dilation,
            use_bias=False,
            kernel_init=nn.initializers.he_normal(),
            name="conv",
        )(x)
        x = make_norm(self.norm, self.features, name="norm")(x)
        return nn.relu(x) if self.relu else x


def resize_to(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize of NHWC ``x`` to spatial size ``hw`` (half-pixel centres, i.e.
    PyTorch's ``align_corners=False``)."""
    n, _, _, c = x.shape
    return jax.image.resize(x, (n, *hw, c), method="bilinear")


def global_avg_pool(x: jax.Array) -> jax.Array:
    """(N, H, W, C) → (N, C)."""
    return jnp.mean(x, axis=(1, 2))
