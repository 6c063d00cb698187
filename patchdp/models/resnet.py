"""ResNet-18/34/50/101 (He et al. 2016) with per-example normalisation.

:class:`ResNetBackbone` returns the four stage outputs and is shared by the classifier
:class:`ResNet` and the segmentation nets (DeepLabV3+, PSPNet). Layout and padding follow
torchvision (stride on the 3×3 convolution of bottlenecks, "ResNet v1.5"), so torchvision
ImageNet weights convert exactly (:func:`from_torchvision`); the parameter count equals
torchvision's (ResNet-18 with 1000 classes: 11,689,512), because GroupNorm and the
folded BatchNorm both hold two parameters per channel.

Stems: ``"imagenet"`` (7×7 stride-2 conv + 3×3 stride-2 max-pool, total stride 4) for
images of ImageNet scale and pretrained weights; ``"small"`` (one 3×3 stride-1 conv, no
pooling) for tiny inputs such as 10×10 MNIST crops.

``output_stride`` (input size / final feature size) trades strides of the last stages for
dilation, as segmentation nets need: with the ImageNet stem 32 (plain), 16 or 8.
"""

from __future__ import annotations

import re
from typing import ClassVar, Mapping

import flax.linen as nn
import numpy as np

from patchdp.models.layers import NORMS, ConvNorm, check_choice, check_positive, fold_batchnorm, global_avg_pool

# depth -> (bottleneck blocks?, blocks per stage)
SPECS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3))}
STEM_STRIDES = {"imagenet": 4, "small": 1}
EXPANSION = 4  # bottleneck output channels / inner channels

# torchvision's input standardisation, for use with converted ImageNet weights:
# model input = (image / 255 - IMAGENET_MEAN) / IMAGENET_STD, per RGB channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_backbone(depth, width, norm, stem, output_stride) -> None:
    """Validate a backbone configuration; raises ValueError saying what to change."""
    check_choice("ResNet depth", depth, tuple(SPECS))
    check_positive("ResNet width", width)
    check_choice("ResNet norm", norm, NORMS)
    check_choice("stem", stem, tuple(STEM_STRIDES))
    if output_stride is not None:
        check_choice(f"output_stride (with the {stem!r} stem)", output_stride,
                     tuple(STEM_STRIDES[stem] * 2**k for k in range(4)))


class Block(nn.Module):
    """Residual block: basic (3×3, 3×3) or bottleneck (1×1, 3×3, 1×1 with 4× expansion),
    with a 1×1 projection shortcut when the shape changes."""

    features: int
    stride: int
    dilation: int
    norm: str
    bottleneck: bool

    @nn.compact
    def __call__(self, x):
        f, norm = self.features, self.norm
        if self.bottleneck:
            out = EXPANSION * f
            y = ConvNorm(f, 1, norm=norm, name="conv1")(x)
            y = ConvNorm(f, 3, self.stride, self.dilation, norm, name="conv2")(y)
            y = ConvNorm(out, 1, norm=norm, relu=False, name="conv3")(y)
        else:
            out = f
            y = ConvNorm(f, 3, self.stride, self.dilation, norm, name="conv1")(x)
            y = ConvNorm(f, 3, 1, self.dilation, norm, relu=False, name="conv2")(y)
        if self.stride != 1 or x.shape[-1] != out:
            x = ConvNorm(out, 1, self.stride, norm=norm, relu=False, name="shortcut")(x)
        return nn.relu(x + y)


class ResNetBackbone(nn.Module):
    """(N, H, W, C) images → the four stage outputs ``[c1, c2, c3, c4]``.

    Stage k has ``width · 2^(k-1)`` channels (× 4 for bottleneck depths 50/101) and spatial
    size ⌈H / s_k⌉ where s_k = stem stride · 2^(k-1), capped at ``output_stride`` (later
    stages dilate instead of striding). ``output_stride=None``: no dilation.
    """

    depth: int = 18
    width: int = 64
    norm: str = "group"
    stem: str = "imagenet"
    output_stride: int | None = None

    def __post_init__(self):
        check_backbone(self.depth, self.width, self.norm, self.stem, self.output_stride)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        if self.stem == "imagenet":
            x = ConvNorm(self.width, 7, 2, norm=self.norm, name="stem")(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = ConvNorm(self.width, 3, norm=self.norm, name="stem")(x)
        bottleneck, blocks = SPECS[self.depth]
        total_stride = STEM_STRIDES[self.stem]
        max_stride = self.output_stride or total_stride * 8
        dilation, stages = 1, []
        for stage, num_blocks in enumerate(blocks):
            stride = 1 if stage == 0 else 2
            if total_stride * stride > max_stride:
                dilation, stride = dilation * stride, 1
            total_stride *= stride
            for b in range(num_blocks):
                x = Block(self.width * 2**stage, stride if b == 0 else 1, dilation, self.norm, bottleneck,
                          name=f"layer{stage + 1}_{b}")(x)
            stages.append(x)
        return stages


class ResNet(nn.Module):
    """ResNet classifier: (N, H, W, C) float images → (N, num_classes) logits.

    Parameters: ``{"backbone": ..., "head": ...}``. Default: ResNet-18, GroupNorm,
    ImageNet stem (use ``stem="small"`` for inputs below about 64×64).
    """

    task: ClassVar[str] = "classification"

    num_classes: int
    depth: int = 18
    width: int = 64
    norm: str = "group"
    stem: str = "imagenet"

    def __post_init__(self):
        check_positive("num_classes", self.num_classes)
        check_backbone(self.depth, self.width, self.norm, self.stem, None)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        features = ResNetBackbone(self.depth, self.width, self.norm, self.stem, name="backbone")(x)[-1]
        return nn.Dense(self.num_classes, name="head")(global_avg_pool(features))


_TORCH_MODULE = [  # torchvision module name -> (path under "backbone", conv or norm)
    (re.compile(r"(conv|bn)1"), lambda m: ("stem",)),
    (re.compile(r"layer(\d)\.(\d+)\.(?:conv|bn)(\d)"), lambda m: (f"layer{m[1]}_{m[2]}", f"conv{m[3]}")),
    (re.compile(r"layer(\d)\.(\d+)\.downsample\.[01]"), lambda m: (f"layer{m[1]}_{m[2]}", "shortcut")),
]


def from_torchvision(state_dict: Mapping[str, np.ndarray], eps: float = 1e-5) -> dict:
    """Convert a torchvision ResNet ``state_dict`` into ``{"backbone": params}`` for a
    model built with ``norm="affine"`` and the ImageNet stem.

    Convolution weights (O, I, kh, kw) become kernels (kh, kw, I, O); every BatchNorm
    (weight, bias, running_mean, running_var) is folded into ``{scale, shift}`` by
    :func:`~patchdp.models.layers.fold_batchnorm`. The ImageNet classifier ``fc.*`` and
    ``num_batches_tracked`` are dropped: the head is trained anew. Feed the model
    ``(image / 255 - IMAGENET_MEAN) / IMAGENET_STD``.

    Recipe (on a machine with PyTorch; nothing here downloads)::

        import numpy as np, torchvision
        sd = torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict()
        np.savez("resnet18_torchvision.npz", **{k: v.numpy() for k, v in sd.items()})

    then, with patchdp::

        from patchdp.models import from_torchvision, save_params, load_params, merge_params
        save_params("resnet18.msgpack", from_torchvision(np.load("resnet18_torchvision.npz")))
        model = get_model("deeplabv3plus", 19, backbone_depth=18, backbone_norm="affine")
        params = merge_params(model.init(key, x)["params"], load_params("resnet18.msgpack"))
    """
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module != "fc" and leaf != "num_batches_tracked":
            modules.setdefault(module, {})[leaf] = np.asarray(value)
    backbone: dict = {}
    for module, leaves in modules.items():
        pattern, path = next(((p, f) for p, f in _TORCH_MODULE if p.fullmatch(module)), (None, None))
        if pattern is None:
            raise ValueError(f"unexpected module {module!r} in the state dict: is this a torchvision ResNet?")
        node = backbone
        for name in path(pattern.fullmatch(module)):
            node = node.setdefault(name, {})
        if "running_mean" in leaves:
            node["norm"] = fold_batchnorm(leaves["weight"], leaves["bias"], leaves["running_mean"],
                                          leaves["running_var"], eps)
        else:
            node["conv"] = {"kernel": leaves["weight"].transpose(2, 3, 1, 0).astype(np.float32)}
    return {"backbone": backbone}
