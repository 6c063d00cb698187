"""PyTorch worker of the peer benchmark: the Opacus arms and the non-private torch step.

Started by run.py with the Opacus venv; speaks protocol.py's line-JSON on stdin/stdout.
The models are layer-for-layer twins of benchmarks/bench_step.py's flax ``UNet`` and
``ResNet18`` (GroupNorm, the same convolutions, XLA's "SAME" padding, the same
transposed convolutions), loaded with the flax initial parameters from
``<data>/params_<model>.npz``, so that every framework computes the same function;
run.py checks that parameter counts and initial losses agree.

Arms (``torch.optim.SGD`` with momentum 0.9; loss: cross-entropy, mean over an
example's pixels, mean over the batch):

- ``torch``: the non-private step;
- ``opacus-hooks``, ``opacus-functorch``, ``opacus-ghost``: ``PrivacyEngine.make_private``
  with ``grad_sample_mode`` "hooks" (per-sample gradients from module hooks),
  "functorch" (``torch.func`` per-sample gradients) or "ghost" (ghost clipping: per-sample
  norms without per-sample gradients, two backward passes); C = 1, z = 1, the batch size
  as expected batch size, no Poisson sampling (the batch is fixed).

Threads: ``torch.set_num_threads(os.cpu_count())``, the same cores XLA uses by default.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protocol import Arms

CLIP_NORM, NOISE_MULTIPLIER, MOMENTUM = 1.0, 1.0, 0.9
EPSILON = 1e-6  # flax GroupNorm's default (torch's is 1e-5)


class FlaxNamed(nn.Module):
    """Base of the twins: layers are registered under flax's automatic names (Conv_0,
    GroupNorm_3, ...: per layer type, numbered in creation order), so that the flax
    parameters load by name (:func:`load_flax`)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict()

    def add(self, kind: str, layer: nn.Module) -> str:
        name = f"{kind}_{sum(key.startswith(kind + '_') for key in self.layers)}"
        self.layers[name] = layer
        return name

    def conv(self, cin, cout, kernel=3, stride=1, bias=False) -> str:
        return self.add("Conv", nn.Conv2d(cin, cout, kernel, stride, padding=0, bias=bias))

    def norm(self, groups, channels) -> str:
        return self.add("GroupNorm", nn.GroupNorm(groups, channels, eps=EPSILON))

    def apply_conv(self, name: str, x):
        """The convolution with XLA's "SAME" padding: output size ceil(size / stride),
        padding split with the smaller half first (torch's symmetric ``padding`` differs
        for even sizes at stride 2)."""
        conv = self.layers[name]
        pads = []
        for size, k, s in zip(reversed(x.shape[2:]), reversed(conv.kernel_size), reversed(conv.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return conv(F.pad(x, pads))


class UNet(FlaxNamed):
    """Twin of bench_step.UNet: (B, 3, H, W) -> (B, classes, H, W)."""

    def __init__(self, classes=4, widths=(16, 32, 64)):
        super().__init__()
        self.widths = widths
        cin = 3
        self.down = []
        for features in widths[:-1]:
            self.down.append(self.block(cin, features))
            cin = features
        self.bottom = self.block(cin, widths[-1])
        cin = widths[-1]
        self.up = []
        for features in reversed(widths[:-1]):
            transpose = self.add("ConvTranspose", nn.ConvTranspose2d(cin, features, 2, stride=2))
            self.up.append((transpose, self.block(2 * features, features)))
            cin = features
        self.head = self.conv(cin, classes, kernel=1, bias=True)

    def block(self, cin, features):
        layers = []
        for _ in range(2):
            layers.append((self.conv(cin, features), self.norm(4, features)))
            cin = features
        return layers

    def run_block(self, layers, x):
        for conv, norm in layers:
            x = F.relu(self.layers[norm](self.apply_conv(conv, x)))
        return x

    def forward(self, x):
        skips = []
        for layers in self.down:
            x = self.run_block(layers, x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.run_block(self.bottom, x)
        for (transpose, layers), skip in zip(self.up, reversed(skips)):
            x = self.run_block(layers, torch.cat([self.layers[transpose](x), skip], dim=1))
        return self.apply_conv(self.head, x)


class ResNet18(FlaxNamed):
    """Twin of bench_step.ResNet18: (B, 3, H, W) -> (B, classes)."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = (self.conv(3, 64), self.norm(32, 64))
        self.blocks = []
        cin = 64
        for stage, features in enumerate((64, 128, 256, 512)):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                first = (self.conv(cin, features, stride=stride), self.norm(32, features))
                second = (self.conv(features, features), self.norm(32, features))
                shortcut = None
                if cin != features or stride != 1:
                    shortcut = (self.conv(cin, features, kernel=1, stride=stride), self.norm(32, features))
                self.blocks.append((first, second, shortcut))
                cin = features
        self.head = self.add("Dense", nn.Linear(512, classes))

    def forward(self, x):
        conv, norm = self.stem
        x = F.relu(self.layers[norm](self.apply_conv(conv, x)))
        for (conv1, norm1), (conv2, norm2), shortcut in self.blocks:
            y = F.relu(self.layers[norm1](self.apply_conv(conv1, x)))
            y = self.layers[norm2](self.apply_conv(conv2, y))
            if shortcut is not None:
                x = self.layers[shortcut[1]](self.apply_conv(shortcut[0], x))
            x = F.relu(x + y)
        return self.layers[self.head](x.mean(dim=(2, 3)))


MODELS = {"unet": UNet, "resnet18": ResNet18}


def load_flax(model: FlaxNamed, arrays) -> None:
    """Copies flax parameters ({"Conv_0/kernel": array, ...}) into the twin, converting
    layouts: Conv (kh, kw, in, out) -> (out, in, kh, kw); ConvTranspose (kh, kw, in, out)
    -> (in, out, kh, kw) with the kernel flipped (flax's transposed convolution does not
    flip, torch's, the gradient of a convolution, does); Dense (in, out) -> (out, in);
    GroupNorm scale -> weight. Fails unless every parameter on both sides is matched."""
    mine = dict(model.named_parameters())
    loaded = set()
    for name, value in arrays.items():
        layer, leaf = name.split("/")
        kind = layer.split("_")[0]
        if leaf == "kernel":
            value = {"Conv": lambda v: v.transpose(3, 2, 0, 1),
                     "ConvTranspose": lambda v: v[::-1, ::-1].transpose(2, 3, 0, 1),
                     "Dense": lambda v: v.T}[kind](value)
        target = f"layers.{layer}." + {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
        if target not in mine or tuple(mine[target].shape) != value.shape:
            raise ValueError(f"flax parameter {name} {value.shape} has no twin in the torch model "
                             f"(expected {target}); the twin's layers differ from bench_step.py's")
        with torch.no_grad():
            mine[target].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        loaded.add(target)
    if loaded != set(mine):
        raise ValueError(f"torch parameters without a flax counterpart: {sorted(set(mine) - loaded)}")


class ExampleMeanCrossEntropy(nn.Module):
    """Cross-entropy averaged over each example's pixels: (B,) losses when
    ``reduction == "none"`` (what Opacus's ghost clipping asks for), their mean when
    ``"mean"``. Equal to ``F.cross_entropy``'s mean over all pixels of the batch, as
    every example has the same number of pixels."""

    def __init__(self):
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits, labels):
        per_example = F.cross_entropy(logits, labels, reduction="none").reshape(len(labels), -1).mean(dim=1)
        return per_example if self.reduction == "none" else per_example.mean()


class Worker(Arms):
    def __init__(self):
        torch.set_num_threads(os.cpu_count())
        super().__init__()

    def versions(self) -> dict:
        import opacus

        return {"versions": {"torch": torch.__version__, "opacus": opacus.__version__},
                "threads": torch.get_num_threads()}

    def prepare(self, arm: str, model: str, data: str, lr: float, microbatch_size: int, warmup: int) -> dict:
        """Builds the arm's model, optimizer and (for Opacus) privacy engine, runs
        ``warmup`` steps; the parameter count and the loss of the initial parameters."""
        del microbatch_size  # patchdp's option; Opacus has no equivalent here
        with np.load(Path(data) / f"batch_{model}.npz") as batch:
            images = torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
            labels = torch.from_numpy(batch["labels"].astype(np.int64))
        net = MODELS[model]()
        with np.load(Path(data) / f"params_{model}.npz") as arrays:
            load_flax(net, dict(arrays))
        criterion = ExampleMeanCrossEntropy()
        with torch.no_grad():
            initial_loss = float(criterion(net(images), labels))
        count = sum(p.numel() for p in net.parameters())
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=MOMENTUM)
        if arm.startswith("opacus-"):
            from opacus import PrivacyEngine

            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                                 batch_size=len(labels))
            mode = arm.removeprefix("opacus-")
            private = PrivacyEngine().make_private(
                module=net, optimizer=optimizer, criterion=criterion, data_loader=loader,
                noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=CLIP_NORM, poisson_sampling=False,
                grad_sample_mode=mode)
            net, optimizer = private[:2]
            if mode == "ghost":
                criterion = private[2]
        elif arm != "torch":
            raise ValueError(f"worker_torch.py has no arm {arm!r}")

        def one_step() -> float:
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()  # frees (per-sample) gradients now: between steps only the
            return loss.item()     # parameters, momentum and batch stay, as in the JAX arms

        for _ in range(warmup):
            one_step()
        self.arms[arm, model] = one_step
        return {"params": count, "initial_loss": initial_loss, "xla": None}


if __name__ == "__main__":
    Worker().serve()
