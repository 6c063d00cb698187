"""Flax (linen) models for patch-level DP training, and a registry.

Every model maps float32 images (N, H, W, C), conventionally ``uint8 / 255``, to

- segmentation (``model.task == "segmentation"``): per-pixel logits (N, H, W, num_classes)
  at the input resolution — ``unet``, ``deeplabv3plus``, ``pspnet``;
- classification (``model.task == "classification"``): logits (N, num_classes) —
  ``resnet18/34/50/101``, ``vgg11``, ``vgg16``, ``cnn``.

Guarantees for DP-SGD, whose per-example gradients come from ``jax.vmap`` over single
examples: every model works on a batch of one, and example i's output depends on
example i alone — normalisation is GroupNorm or a frozen (folded) BatchNorm, never batch
statistics; there is no dropout and no train/eval switch. ``model.init(key, images)``
returns ``{"params": params}`` and nothing else: params is the whole trainable state.

Pretrained weights load from a local file (:mod:`patchdp.models.pretrained`); torchvision
ResNets convert with :func:`from_torchvision`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn

from patchdp.models.deeplab import DeepLabV3Plus
from patchdp.models.layers import fold_batchnorm
from patchdp.models.pretrained import load_params, merge_params, save_params
from patchdp.models.pspnet import PSPNet
from patchdp.models.resnet import IMAGENET_MEAN, IMAGENET_STD, ResNet, ResNetBackbone, from_torchvision
from patchdp.models.unet import UNet
from patchdp.models.vgg import VGG

__all__ = [
    "MODELS", "get_model", "model_options", "UNet", "DeepLabV3Plus", "PSPNet", "ResNet", "ResNetBackbone", "VGG",
    "load_params", "save_params", "merge_params", "from_torchvision", "fold_batchnorm",
    "IMAGENET_MEAN", "IMAGENET_STD",
]

MODELS = {
    "unet": UNet,
    "deeplabv3plus": DeepLabV3Plus,
    "pspnet": PSPNet,
    **{f"resnet{d}": functools.partial(ResNet, depth=d) for d in (18, 34, 50, 101)},
    "vgg11": functools.partial(VGG, stages=(1, 1, 2, 2, 2)),
    "vgg16": functools.partial(VGG, stages=(2, 2, 3, 3, 3)),
    "cnn": functools.partial(VGG, stages=(1, 1, 1), width=16),
}


def model_options(name: str) -> dict:
    """The options of model ``name`` (its fields but ``num_classes``) and their defaults."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    factory = MODELS[name]
    cls, preset = getattr(factory, "func", factory), getattr(factory, "keywords", {})
    return {f.name: preset.get(f.name, f.default) for f in dataclasses.fields(cls)
            if f.init and f.name not in ("parent", "name", "num_classes")}


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """The model ``name`` (a key of :data:`MODELS`) with ``num_classes`` outputs; ``kwargs``
    override its fields (e.g. ``width=8``, ``norm="affine"``, ``backbone_depth=101``)."""
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"model {name!r} has no option {unknown}; its options are {sorted(options)}.")
    return MODELS[name](num_classes=num_classes, **kwargs)
