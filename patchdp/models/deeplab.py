"""DeepLabV3+ (Chen et al. 2018): ResNet backbone, atrous spatial pyramid pooling (ASPP)
and a decoder that refines the ASPP output with stride-4 features.

Layout follows the common torchvision-based implementation the paper's reference code
uses: ASPP with a 1×1 branch, three dilated 3×3 branches (rates 6, 12, 18 at output
stride 16; doubled at 8) and an image-pooling branch, projected to 256 channels; 48-channel
low-level projection of the first ResNet stage; two 3×3 units of 256; 1×1 classifier;
bilinear upsampling to the input size. Dropout is left out (it would need an RNG stream
per example and the DP noise already regularises). The paper used a ResNet-101 backbone
(``backbone_depth=101``); the default here is ResNet-50.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from patchdp.models.layers import NORMS, ConvNorm, check_choice, check_positive, resize_to
from patchdp.models.resnet import ResNetBackbone, check_backbone


class ASPP(nn.Module):
    """(N, h, w, C) → (N, h, w, features): parallel 1×1, dilated 3×3 and image-pooling
    branches, concatenated and projected by a 1×1 unit."""

    features: int
    rates: tuple[int, ...]
    norm: str

    @nn.compact
    def __call__(self, x):
        branches = [ConvNorm(self.features, 1, norm=self.norm)(x)]
        branches += [ConvNorm(self.features, 3, dilation=r, norm=self.norm)(x) for r in self.rates]
        pooled = ConvNorm(self.features, 1, norm=self.norm)(jnp.mean(x, axis=(1, 2), keepdims=True))
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        return ConvNorm(self.features, 1, norm=self.norm, name="project")(jnp.concatenate(branches, -1))


class DeepLabV3Plus(nn.Module):
    """(N, H, W, C) float images → (N, H, W, num_classes) per-pixel logits.

    Parameters: ``{"backbone": ..., "aspp": ..., "low_level": ..., "decoder_*": ...,
    "classifier": ...}``. ``norm`` normalises the head, ``backbone_norm`` the backbone, whose
    subtree accepts :func:`~patchdp.models.from_torchvision` weights when
    ``backbone_norm="affine"`` (keep ``norm="group"`` for the freshly trained head).
    """

    task: ClassVar[str] = "segmentation"

    num_classes: int
    backbone_depth: int = 50
    backbone_width: int = 64
    output_stride: int = 16
    features: int = 256
    low_level_features: int = 48
    norm: str = "group"
    backbone_norm: str = "group"

    def __post_init__(self):
        check_positive("num_classes", self.num_classes)
        check_choice("norm", self.norm, NORMS)
        check_backbone(self.backbone_depth, self.backbone_width, self.backbone_norm, "imagenet", self.output_stride)
        if self.output_stride not in (8, 16):
            raise ValueError(f"DeepLabV3+ output_stride must be 8 or 16, got {self.output_stride}.")
        check_positive("features", self.features)
        check_positive("low_level_features", self.low_level_features)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        stages = ResNetBackbone(self.backbone_depth, self.backbone_width, self.backbone_norm,
                                output_stride=self.output_stride, name="backbone")(x)
        rates = tuple(r * 16 // self.output_stride for r in (6, 12, 18))
        y = ASPP(self.features, rates, self.norm, name="aspp")(stages[-1])
        low = ConvNorm(self.low_level_features, 1, norm=self.norm, name="low_level")(stages[0])
        y = jnp.concatenate([resize_to(y, low.shape[1:3]), low], axis=-1)
        y = ConvNorm(self.features, norm=self.norm, name="decoder_0")(y)
        y = ConvNorm(self.features, norm=self.norm, name="decoder_1")(y)
        y = nn.Conv(self.num_classes, (1, 1), name="classifier")(y)
        return resize_to(y, x.shape[1:3])
