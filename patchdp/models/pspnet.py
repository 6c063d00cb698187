"""PSPNet (Zhao et al. 2017): a dilated ResNet backbone (output stride 8) and a pyramid
pooling module.

The last backbone stage is average-pooled into 1×1, 2×2, 3×3 and 6×6 bins (adaptive
pooling, the same bins as PyTorch's ``AdaptiveAvgPool2d``), each reduced by a 1×1 unit to
a quarter of the channels, upsampled bilinearly and concatenated with the stage itself;
a 3×3 unit of 512 channels and a 1×1 classifier follow, and the logits are upsampled to the
input size. The auxiliary loss head and dropout are left out.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from patchdp.models.layers import NORMS, ConvNorm, check_choice, check_positive, resize_to
from patchdp.models.resnet import ResNetBackbone, check_backbone


def _pool_matrix(size: int, bins: int) -> np.ndarray:
    """(bins, size) averaging matrix of adaptive pooling: bin i covers
    [⌊i·size/bins⌋, ⌈(i+1)·size/bins⌉)."""
    m = np.zeros((bins, size), np.float32)
    for i in range(bins):
        start, stop = i * size // bins, -(-(i + 1) * size // bins)
        m[i, start:stop] = 1.0 / (stop - start)
    return m


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
    """(N, H, W, C) → (N, bins, bins, C) adaptive average pooling."""
    rows, cols = _pool_matrix(x.shape[1], bins), _pool_matrix(x.shape[2], bins)
    return jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols)


class PyramidPooling(nn.Module):
    """(N, h, w, C) → (N, h, w, 2C): the input and one C/4-channel branch per bin size."""

    bins: tuple[int, ...]
    norm: str

    @nn.compact
    def __call__(self, x):
        features = max(x.shape[-1] // len(self.bins), 1)
        branches = [
            resize_to(ConvNorm(features, 1, norm=self.norm)(adaptive_avg_pool(x, b)), x.shape[1:3])
            for b in self.bins
        ]
        return jnp.concatenate([x, *branches], axis=-1)


class PSPNet(nn.Module):
    """(N, H, W, C) float images → (N, H, W, num_classes) per-pixel logits.

    Parameters: ``{"backbone": ..., "ppm": ..., "bottleneck": ..., "classifier": ...}``;
    ``norm`` and ``backbone_norm`` as in :class:`~patchdp.models.DeepLabV3Plus`.
    """

    task: ClassVar[str] = "segmentation"

    num_classes: int
    backbone_depth: int = 50
    backbone_width: int = 64
    bins: tuple[int, ...] = (1, 2, 3, 6)
    features: int = 512
    norm: str = "group"
    backbone_norm: str = "group"

    def __post_init__(self):
        check_positive("num_classes", self.num_classes)
        check_choice("norm", self.norm, NORMS)
        check_backbone(self.backbone_depth, self.backbone_width, self.backbone_norm, "imagenet", 8)
        for b in self.bins:
            check_positive("every pyramid bin size", b)
        check_positive("features", self.features)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        top = ResNetBackbone(self.backbone_depth, self.backbone_width, self.backbone_norm, output_stride=8,
                             name="backbone")(x)[-1]
        y = PyramidPooling(tuple(self.bins), self.norm, name="ppm")(top)
        y = ConvNorm(self.features, norm=self.norm, name="bottleneck")(y)
        y = nn.Conv(self.num_classes, (1, 1), name="classifier")(y)
        return resize_to(y, x.shape[1:3])
