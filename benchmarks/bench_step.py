"""DP-SGD step cost against the non-private step, and microbatching's peak memory.

    .venv/bin/python benchmarks/bench_step.py            # a few minutes on a 2-core CPU

In one run, on the same model, batch and key:

* step time and peak memory of the non-private step (``clip_norm=None,
  noise_multiplier=0``: one batch gradient), the private step with its default
  book-keeping clipping, the private step with per-example gradients by ``vmap``
  (the pre-book-keeping path), and both default steps in microbatches of 8, for a
  117k-parameter U-Net on 64×64×3 inputs and a ResNet-18 classifier (11.2M
  parameters, GroupNorm) on 32×32×3 inputs, batch 32; the fastest of a few steps
  after compilation, all arms alternating; peak memory is XLA's compiled peak
  (``compiled.memory_analysis()``: arguments + outputs + temporaries − aliased
  donations, as buffer-assigned); ratios are over the non-private whole-batch step;
* microbatching's memory ratio: the private U-Net step's peak for a logical batch of
  256 in microbatches of 16 over a logical batch of 16, for the unrolled loop (CPU
  default) and ``lax.scan`` (accelerator default).

Targets (issue 9): DP / non-private ≤ 1.2 (U-Net) and ≤ 1.3 (ResNet-18), DP peak memory ≤ 1.5×
the non-private peak; microbatching memory ratio ≤ 1.2. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from patchdp.training import Batch, TrainState, linen_loss, make_train_step


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


def setup(model, image_shape, label_shape, batch_size, classes, init_shape=None):
    """Parameters, a random batch (images and labels) and the per-example loss. The
    parameters are initialised on one input of ``init_shape`` (default ``image_shape``;
    e.g. the crop size when the images are larger than what the model sees)."""
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.jit(model.init)(keys[0], jnp.zeros((1,) + (init_shape or image_shape)))["params"]
    batch = Batch(jax.random.normal(keys[1], (batch_size,) + image_shape),
                  jax.random.randint(keys[2], (batch_size,) + label_shape, 0, classes))
    loss = linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    return params, batch, loss


def step_fn(loss, private, batch_size, **options):
    """The private step (C = 1, z = 1) or the non-private baseline, same code path."""
    privacy = dict(clip_norm=1.0, noise_multiplier=1.0) if private else dict(clip_norm=None, noise_multiplier=0.0)
    return make_train_step(loss, optax.sgd(0.1, momentum=0.9), expected_batch_size=batch_size,
                           **privacy, **options)


ARMS = {  # name -> (private, options); "non-private" is the denominator of every ratio
    "non-private": (False, {}),
    "DP book-keeping (default)": (True, {}),
    "DP per-example (vmap)": (True, dict(clipping="per_example")),
    "non-private, microbatch 8": (False, dict(microbatch_size=8)),
    "DP book-keeping, microbatch 8": (True, dict(microbatch_size=8)),
}


def time_arms(name, model, image_shape, label_shape, batch_size, classes, repeats, target):
    """Step times and compiled peak memory of every arm on the same parameters, batch and
    keys; the arms alternate step by step so that load from other processes hits all
    alike; the fastest of ``repeats`` each (the least disturbed). Ratios are over the
    non-private whole-batch step."""
    params, batch, loss = setup(model, image_shape, label_shape, batch_size, classes)
    count = sum(p.size for p in jax.tree.leaves(params))
    print(f"{name}: {count:,} parameters, batch {batch_size}, input {image_shape}", flush=True)
    steps, states, peaks, samples = {}, {}, {}, {}
    for arm, (private, options) in ARMS.items():
        steps[arm] = step_fn(loss, private, batch_size, **options)
        state = TrainState.create(jax.tree.map(jnp.copy, params), optax.sgd(0.1, momentum=0.9))
        peaks[arm] = peak_bytes(steps[arm], state, batch)
        states[arm] = jax.block_until_ready(steps[arm](state, batch, jax.random.key(1))[0])  # compile
        samples[arm] = []
    for i in range(repeats):
        for arm, step in steps.items():
            start = time.perf_counter()
            states[arm] = jax.block_until_ready(step(states[arm], batch, jax.random.key(2 + i))[0])
            samples[arm].append(time.perf_counter() - start)
    base, base_peak = min(samples["non-private"]), peaks["non-private"]
    for arm in ARMS:
        best = min(samples[arm])
        print(f"  {arm:31s} {best * 1e3:7.0f} ms  ratio {best / base:5.2f}   peak {peaks[arm] / 2**20:7.1f} MiB  "
              f"ratio {peaks[arm] / base_peak:5.2f}", flush=True)
    print(f"  targets: time ratio <= {target}, memory ratio <= 1.5", flush=True)


def peak_bytes(step, state, batch) -> int:
    """XLA's buffer-assigned peak of the compiled step: arguments + outputs +
    temporaries − donated (aliased) bytes."""
    return compiled_peak_bytes(step.lower(state, batch, jax.random.key(0)).compile())


def compiled_peak_bytes(compiled) -> int:
    """The buffer-assigned peak of a compiled program (``jit(f).lower(...).compile()``)."""
    stats = compiled.memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes)


def memory_ratio(unroll, logical=256, micro=16):
    """Peak of the private U-Net step for a logical batch in microbatches, over the peak
    for one microbatch-sized logical batch."""
    params, big, loss = setup(UNet(), (64, 64, 3), (64, 64), logical, 4)
    state = TrainState.create(params, optax.sgd(0.1, momentum=0.9))
    small = jax.tree.map(lambda x: x[:micro], big)
    chunked = peak_bytes(step_fn(loss, True, logical, microbatch_size=micro, unroll=unroll), state, big)
    single = peak_bytes(step_fn(loss, True, micro, unroll=unroll), state, small)
    ratio = chunked / single
    loop = "unrolled" if unroll else "lax.scan"
    print(f"memory  U-Net, {loop:8s} loop: logical {logical} in microbatches of {micro}: {chunked / 2**20:6.1f} MiB, "
          f"logical {micro}: {single / 2**20:6.1f} MiB, ratio {ratio:.2f} (target <= 1.2)", flush=True)
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per configuration")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    time_arms("U-Net", UNet(), (64, 64, 3), (64, 64), 32, 4, args.repeats, target=1.2)
    time_arms("ResNet-18", ResNet18(), (32, 32, 3), (), 32, 10, args.repeats, target=1.3)
    for unroll in (True, False):
        memory_ratio(unroll)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
