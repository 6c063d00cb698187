"""Per-layer cost of the three exact norm methods of book-keeping clipping.

    .venv/bin/python benchmarks/bench_layers.py          # --models resnet18,unet --batch 32

For every covered layer of the benchmark models (benchmarks/bench_step.py), on random
inputs and output gradients of the layer's real shapes (batch 32, one view), the time of
the per-example squared norms plus the clipped sum by ``direct``, ``unfold`` and
``ghost`` (:mod:`patchdp.bookkeeping`), next to the layer's batch weight gradient (what
the non-private step pays for it). The fastest of a few runs each, methods interleaved;
the last columns say which method is fastest here and which one
:func:`patchdp.bookkeeping.choose_method` picks. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from bench_step import ResNet18, UNet, linen_problem
from patchdp import bookkeeping

MODELS = {"resnet18": (ResNet18(), (32, 32, 3), (), 10), "unet": (UNet(), (64, 64, 3), (64, 64), 4)}


def layer_costs(layer, batch_size, repeats):
    """Seconds per method (and for the batch weight gradient) on random tapes."""
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch_size, 1) + layer.input_shape)
    g = jax.random.normal(kg, (batch_size, 1) + layer.output_shape)
    runs = {"batch": jax.jit(lambda x, g: bookkeeping._weight_grads(layer, x, g, per_example=False))}
    for method in filter(layer.supports, bookkeeping.METHODS):
        variant = dataclasses.replace(layer, method=method)

        def run(x, g, variant=variant):
            squares, grads = bookkeeping.square_norms(variant, x, g)
            scale = 1 / jnp.maximum(jnp.sqrt(squares), 1)
            return bookkeeping.clipped_sums(variant, x, g, grads, scale)

        runs[method] = jax.jit(run)
    for fn in runs.values():
        jax.block_until_ready(fn(x, g))
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x, g))
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,unet")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; batch {args.batch}, 1 view; ms, fastest of "
          f"{args.repeats}")
    print(f"{'layer':34s} {'T':>5s} {'d':>5s} {'o':>4s} {'batch':>7s} {'direct':>7s} {'unfold':>7s} {'ghost':>7s}"
          f"  fastest  chosen")
    for name in args.models.split(","):
        model, image, label, classes = MODELS[name]
        params, loss = linen_problem(model, image)
        view = (jnp.zeros(image), jnp.zeros(label, jnp.int32))
        layers = bookkeeping.find_layers(loss, params, view).layers
        names = ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        totals = {}
        for layer in layers:
            costs = layer_costs(layer, args.batch, args.repeats)
            for method, seconds in costs.items():
                totals[method] = totals.get(method, 0) + seconds
            totals["chosen"] = totals.get("chosen", 0) + costs[layer.method]
            methods = {m: c for m, c in costs.items() if m != "batch"}
            cells = " ".join(f"{costs[m] * 1e3:7.1f}" if m in costs else f"{'-':>7s}"
                             for m in ("batch",) + bookkeeping.METHODS)
            size = layer.sizes(1)
            print(f"{name + ':' + names[layer.leaf]:34.34s} {size[0]:5d} {size[1]:5d} {size[2]:4d} {cells}  "
                  f"{min(methods, key=methods.get):7s}  {layer.method}", flush=True)
        print(f"{name + ': all layers':34s} {'':17s}" + " ".join(
            f"{totals.get(m, float('nan')) * 1e3:7.1f}" for m in ("batch",) + bookkeeping.METHODS)
              + f"  chosen: {totals['chosen'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
