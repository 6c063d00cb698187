"""A small U-Net (Ronneberger et al. 2015): the default segmentation model.

Encoder level k (k = 0 … levels−1) has ``width · 2^k`` channels and two 3×3 ConvNorm
units; levels are joined by 2×2 max-pooling. Each decoder level resizes the coarser map
bilinearly to the skip connection's size (no transposed convolutions, hence no
checkerboard artefacts and no constraint on H, W), concatenates and applies two ConvNorm
units; a 1×1 convolution gives the logits. About 118k parameters at the default
``width=16, levels=3`` (5 classes).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from patchdp.models.layers import NORMS, ConvNorm, check_choice, check_positive, resize_to


class DoubleConv(nn.Module):
    """Two 3×3 ConvNorm units with ``features`` channels."""

    features: int
    norm: str

    @nn.compact
    def __call__(self, x):
        x = ConvNorm(self.features, norm=self.norm)(x)
        return ConvNorm(self.features, norm=self.norm)(x)


class UNet(nn.Module):
    """(N, H, W, C) float images → (N, H, W, num_classes) per-pixel logits, any H, W."""

    task: ClassVar[str] = "segmentation"

    num_classes: int
    width: int = 16
    levels: int = 3
    norm: str = "group"

    def __post_init__(self):
        check_positive("num_classes", self.num_classes)
        check_positive("U-Net width", self.width)
        check_positive("U-Net levels", self.levels)
        check_choice("norm", self.norm, NORMS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        skips = []
        for level in range(self.levels):
            if level:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            x = DoubleConv(self.width * 2**level, self.norm, name=f"down{level}")(x)
            skips.append(x)
        for level in reversed(range(self.levels - 1)):
            skip = skips[level]
            x = jnp.concatenate([resize_to(x, skip.shape[1:3]), skip], axis=-1)
            x = DoubleConv(self.width * 2**level, self.norm, name=f"up{level}")(x)
        return nn.Conv(self.num_classes, (1, 1), name="head")(x)
