"""VGG-style plain convolutional classifiers (Simonyan & Zisserman 2015), and the small CNN.

Stage k has ``stages[k]`` 3×3 ConvNorm units of ``width · min(2^k, 8)`` channels followed
by 2×2 max-pooling ("SAME", so tiny inputs never shrink to zero); global average pooling
and one dense layer give the logits. The 4096-wide fully connected layers of the original
are replaced by global pooling, which removes ~120M parameters and any dependence on the
input size. Presets (see :func:`patchdp.models.get_model`): ``vgg11`` = stages
(1, 1, 2, 2, 2), ``vgg16`` = (2, 2, 3, 3, 3), width 64; ``cnn`` = (1, 1, 1), width 16:
three conv units, about 24k parameters.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn

from patchdp.models.layers import NORMS, ConvNorm, check_choice, check_positive, global_avg_pool


class VGG(nn.Module):
    """(N, H, W, C) float images → (N, num_classes) logits."""

    task: ClassVar[str] = "classification"

    num_classes: int
    stages: tuple[int, ...] = (1, 1, 2, 2, 2)
    width: int = 64
    norm: str = "group"

    def __post_init__(self):
        check_positive("num_classes", self.num_classes)
        check_positive("VGG width", self.width)
        if not self.stages:
            raise ValueError("VGG stages must list at least one stage, e.g. (1, 1, 2, 2, 2).")
        for n in self.stages:
            check_positive("every VGG stage's number of conv units", n)
        check_choice("norm", self.norm, NORMS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        for stage, units in enumerate(self.stages):
            for _ in range(units):
                x = ConvNorm(self.width * min(2**stage, 8), norm=self.norm)(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return nn.Dense(self.num_classes, name="head")(global_avg_pool(x))
