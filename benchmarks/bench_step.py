"""DP-SGD step cost against the non-private step, for the same network written in
flax.linen, Flax NNX and plain JAX, and for a model zoo.

    cd benchmarks && ../.venv/bin/python bench_step.py   # a few minutes on a 2-core CPU
    # --repeats N, --models cnn,resnet18,unet,vgg11,deeplabv3plus, --memory (microbatch memory ratio)

In one run, on the same parameters, batch and key, the arms alternating step by step
(load from other processes hits all alike), the fastest of ``--repeats`` steps after
compilation, and XLA's compiled peak memory (``compiled.memory_analysis()``: arguments
+ outputs + temporaries − aliased donations):

* the non-private step on the whole batch (one gradient of the summed loss: what a
  training loop without privacy runs; the denominator of every ratio), and with the
  default schedule (:func:`patchdp.clipping.default_schedule`);
* the private step (C = 1, z = 1) with the defaults (book-keeping, default schedule),
  on the whole batch (the previous default), and, for the 4-convolution CNN, with
  per-example gradients by ``vmap`` (what the linen interceptor left NNX and plain-JAX
  models before the layers were found on the jaxpr);
* the CNN (32×32×3, batch 32, 10 classes) in linen, NNX (``nnx.merge`` inside the loss)
  and plain ``jax.lax``; ResNet-18 (GroupNorm) and a U-Net with ConvTranspose (defined
  here), VGG-11 and DeepLabV3+ (patchdp.models) at small inputs.

The step is built here from :func:`patchdp.clipping.clipped_grad_sum`, Gaussian noise
on the sum and optax SGD with momentum, not from ``make_train_step``, so that the
benchmark measures the clipping and not one version of the training API.
Targets (issue 21): DP / non-private ≤ 1.2 with the defaults; the CNN's DP step in the
three frameworks within 10% of each other; peak memory ≤ 1.5× non-private.
Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from patchdp.clipping import clipped_grad_sum
from patchdp.models import get_model


def conv(features, kernel=3, stride=1):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), use_bias=False)


class UNet(nn.Module):
    """A two-level U-Net with GroupNorm: ~117k parameters for 3 input channels."""

    classes: int = 4
    widths: tuple[int, ...] = (16, 32, 64)

    @nn.compact
    def __call__(self, x):
        def block(x, features):
            for _ in range(2):
                x = nn.relu(nn.GroupNorm(num_groups=4)(conv(features)(x)))
            return x

        skips = []
        for features in self.widths[:-1]:
            x = block(x, features)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = block(x, self.widths[-1])
        for features, skip in zip(reversed(self.widths[:-1]), reversed(skips)):
            x = nn.ConvTranspose(features, (2, 2), strides=(2, 2))(x)
            x = block(jnp.concatenate([x, skip], axis=-1), features)
        return nn.Conv(self.classes, (1, 1))(x)


class ResNet18(nn.Module):
    """ResNet-18 (basic blocks [2, 2, 2, 2], widths 64–512) with GroupNorm and a CIFAR
    stem (3×3 conv, no max-pool): ~11.2M parameters."""

    classes: int = 10

    @nn.compact
    def __call__(self, x):
        norm = lambda: nn.GroupNorm(num_groups=32)
        x = nn.relu(norm()(conv(64)(x)))
        for stage, features in enumerate((64, 128, 256, 512)):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                y = nn.relu(norm()(conv(features, stride=stride)(x)))
                y = norm()(conv(features)(y))
                if x.shape[-1] != features or stride != 1:
                    x = norm()(conv(features, kernel=1, stride=stride)(x))
                x = nn.relu(x + y)
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


class LinenCNN(nn.Module):
    """Four 3×3 convolutions (32, 32/2, 64, 64/2 channels/stride), ReLU, mean, Dense."""

    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for features, stride in CNN_LAYERS:
            x = nn.relu(nn.Conv(features, (3, 3), strides=stride)(x))
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


CNN_LAYERS = ((32, 1), (32, 2), (64, 1), (64, 2))


class NNXCNN(nnx.Module):
    """:class:`LinenCNN` in Flax NNX."""

    def __init__(self, classes: int, rngs: nnx.Rngs):
        channels = (3,) + tuple(f for f, _ in CNN_LAYERS)
        self.convs = nnx.List([nnx.Conv(i, o, (3, 3), strides=s, rngs=rngs)
                               for i, (o, s) in zip(channels, CNN_LAYERS)])
        self.head = nnx.Linear(channels[-1], classes, rngs=rngs)

    def __call__(self, x):
        for layer in self.convs:
            x = nnx.relu(layer(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


def plain_cnn(params, x):
    """:class:`LinenCNN` in plain ``jax.lax`` (params from the linen model)."""
    for i, (_, stride) in enumerate(CNN_LAYERS):
        layer = params[f"Conv_{i}"]
        x = jax.lax.conv_general_dilated(x, layer["kernel"], (stride, stride), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + layer["bias"])
    return jnp.mean(x, axis=(1, 2)) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]


def cross_entropy(logits, label):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, label))


def linen_problem(model, image_shape):
    """(params, loss(params, (image, label))) for a linen model applied to one image."""
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + image_shape))["params"]
    return params, lambda p, view: cross_entropy(model.apply({"params": p}, view[0][None])[0], view[1])


def cnn_problems():
    """The same CNN in three frameworks: name -> (params, loss)."""
    params, linen_loss = linen_problem(LinenCNN(), (32, 32, 3))
    graphdef, state = nnx.split(NNXCNN(10, nnx.Rngs(0)))
    nnx_loss = lambda p, view: cross_entropy(nnx.merge(graphdef, p)(view[0][None])[0], view[1])
    plain_loss = lambda p, view: cross_entropy(plain_cnn(p, view[0][None])[0], view[1])
    return {"linen": (params, linen_loss), "NNX": (state, nnx_loss), "plain JAX": (params, plain_loss)}


def make_step(loss, private: bool, **options):
    """``step(params, opt_state, examples, key) -> (params, opt_state)``: the clipped
    (C = 1) or plain gradient sum, N(0, 1) noise on it if private, SGD with momentum."""
    optimizer = optax.sgd(0.1, momentum=0.9)

    def step(params, opt_state, examples, key):
        size = examples[0].shape[0]
        total, _ = clipped_grad_sum(loss, params, examples, clip_norm=1.0 if private else None, **options)
        if private:
            keys = jax.random.split(key, len(jax.tree.leaves(total)))
            noise = [jax.random.normal(k, g.shape, g.dtype) for k, g in zip(keys, jax.tree.leaves(total))]
            total = jax.tree.unflatten(jax.tree.structure(total), [g + n for g, n in zip(jax.tree.leaves(total), noise)])
        grads = jax.tree.map(lambda g, p: (g / size).astype(p.dtype), total, params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1)), optimizer


def arms(batch_size, per_example=False):
    """name -> (private, clipped_grad_sum options); the first is every ratio's denominator."""
    chosen = {
        "non-private, whole batch": (False, dict(microbatch_size=batch_size)),
        "non-private, default": (False, {}),
        "DP default": (True, {}),
        "DP whole batch": (True, dict(microbatch_size=batch_size)),
    }
    if per_example:
        chosen["DP per-example (vmap), default"] = (True, dict(clipping="per_example"))
    return chosen


def batch_of(image_shape, label_shape, batch_size, classes):
    """(B, 1) views: random images and labels."""
    keys = jax.random.split(jax.random.key(1))
    return (jax.random.normal(keys[0], (batch_size, 1) + image_shape),
            jax.random.randint(keys[1], (batch_size, 1) + label_shape, 0, classes))


def compiled_peak_bytes(compiled) -> int:
    """XLA's buffer-assigned peak of a compiled program (``jit(f).lower(...).compile()``):
    arguments + outputs + temporaries − donated (aliased) bytes."""
    stats = compiled.memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes)


def time_arms(problems, examples, repeats, per_example=False):
    """Step times (fastest of ``repeats``) and compiled peaks of every arm of every
    problem ({name: (params, loss)}), all steps alternating. Returns {(problem, arm): (s, bytes)}."""
    size = examples[0].shape[0]
    compiled, states, samples, peaks = {}, {}, {}, {}
    for name, (params, loss) in problems.items():
        for arm, (private, options) in arms(size, per_example).items():
            step, optimizer = make_step(loss, private, **options)
            state = (jax.tree.map(jnp.copy, params), optimizer.init(params))
            lowered = step.lower(*state, examples, jax.random.key(0)).compile()
            peaks[name, arm] = compiled_peak_bytes(lowered)
            compiled[name, arm] = lowered
            states[name, arm] = jax.block_until_ready(lowered(*state, examples, jax.random.key(0)))
            samples[name, arm] = []
    for i in range(repeats):
        for key, step in compiled.items():
            start = time.perf_counter()
            states[key] = jax.block_until_ready(step(*states[key], examples, jax.random.key(2 + i)))
            samples[key].append(time.perf_counter() - start)
    return {key: (min(times), peaks[key]) for key, times in samples.items()}


def report(results, title):
    """Prints every problem's arms with ratios over its whole-batch non-private step."""
    print(title, flush=True)
    for name in dict.fromkeys(problem for problem, _ in results):
        base, base_peak = results[name, "non-private, whole batch"]
        for (problem, arm), (seconds, peak) in results.items():
            if problem == name:
                print(f"  {name:10s} {arm:32s} {seconds * 1e3:7.0f} ms  ratio {seconds / base:5.2f}   "
                      f"peak {peak / 2**20:7.1f} MiB  ratio {peak / base_peak:5.2f}", flush=True)


ZOO = {  # name -> (model, input shape, label shape, classes, batch)
    "resnet18": (lambda: ResNet18(), (32, 32, 3), (), 10, 32),
    "unet": (lambda: UNet(), (64, 64, 3), (64, 64), 4, 16),
    "vgg11": (lambda: get_model("vgg11", 10), (32, 32, 3), (), 10, 16),
    "deeplabv3plus": (lambda: get_model("deeplabv3plus", 4), (64, 64, 3), (64, 64), 4, 8),
}


def memory_ratio(unroll, logical=256, micro=16):
    """Peak of the private U-Net step for a logical batch in microbatches, over the peak
    for one microbatch-sized logical batch."""
    params, loss = linen_problem(UNet(), (64, 64, 3))

    def peak(size, **options):
        step, optimizer = make_step(loss, True, unroll=unroll, **options)
        examples = batch_of((64, 64, 3), (64, 64), size, 4)
        return compiled_peak_bytes(step.lower(params, optimizer.init(params), examples, jax.random.key(0)).compile())

    chunked, single = peak(logical, microbatch_size=micro), peak(micro, microbatch_size=micro)
    loop = "unrolled" if unroll else "lax.scan"
    print(f"memory  U-Net, {loop:8s} loop: logical {logical} in microbatches of {micro}: {chunked / 2**20:6.1f} MiB, "
          f"logical {micro}: {single / 2**20:6.1f} MiB, ratio {chunked / single:.2f} (target <= 1.2)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per arm")
    parser.add_argument("--models", default="cnn," + ",".join(ZOO), help="cnn and/or zoo models, comma-separated")
    parser.add_argument("--memory", action="store_true", help="also the U-Net microbatching memory ratios")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s); "
          f"fastest of {args.repeats}, ratios over the whole-batch non-private step")
    for name in args.models.split(","):
        if name == "cnn":
            results = time_arms(cnn_problems(), batch_of((32, 32, 3), (), 32, 10), args.repeats, per_example=True)
            report(results, "4-conv CNN, 32x32x3, batch 32, the same network in three frameworks")
            continue
        model, image, label, classes, size = ZOO[name]
        params, loss = linen_problem(model(), image)
        count = sum(leaf.size for leaf in jax.tree.leaves(params))
        results = time_arms({name: (params, loss)}, batch_of(image, label, size, classes), args.repeats)
        report(results, f"{name}: {count:,} parameters, batch {size}, input {image}")
    if args.memory:
        for unroll in (True, False):
            memory_ratio(unroll)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
