"""JAX worker of the peer benchmark: the patchdp, jax-privacy and plain-JAX arms.

Started by run.py with the repository's .venv (arms ``patchdp``, ``patchdp-mb``, ``jax``)
or with the jax-privacy venv (arm ``jax-privacy``); speaks protocol.py's line-JSON on
stdin/stdout. The models are benchmarks/bench_step.py's flax ``UNet`` and ``ResNet18``;
every arm starts from the parameters in ``<data>/params_<model>.npz`` (written by the
``init`` op of the repository-venv worker) and trains on ``<data>/batch_<model>.npz``
(images (B, H, W, 3) float32, integer labels (B, H, W) or (B,)).

Every arm is one jitted step ``step(state, images, labels, key) -> (state, loss)`` that
updates parameters and momentum in place (the state is donated), compiled ahead of
time so that XLA's ``memory_analysis()`` describes exactly the executable that is timed.
Loss: softmax cross-entropy, mean over an example's pixels, mean over the batch.
Privacy: per-example clipping to C = 1, Gaussian noise of std z·C with z = 1 on the
clipped sum, divided by the batch size B; then SGD with momentum 0.9.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's patchdp and bench_step

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bench_step  # noqa: E402
from patchdp.models import load_params, save_params  # noqa: E402
from protocol import Arms  # noqa: E402

MODELS = {"unet": bench_step.UNet(), "resnet18": bench_step.ResNet18()}
CLIP_NORM, NOISE_MULTIPLIER, MOMENTUM = 1.0, 1.0, 0.9


def example_losses(model, params, images, labels):
    """(B,) cross-entropy of each example, averaged over its pixels (if any)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, images), labels)
    return jnp.mean(losses.reshape(len(labels), -1), axis=1)


def batch_loss(model, params, images, labels):
    return jnp.mean(example_losses(model, params, images, labels))


def patchdp_step(model, lr, batch_size, microbatch_size):
    """patchdp's public ``make_train_step``, privately (C = 1, z = 1, batches of
    ``batch_size``, no crops)."""
    from patchdp.mechanism import DPSGD
    from patchdp.sampling import FixedSizeSampling
    from patchdp.training import Batch, TrainState, linen_loss, make_train_step

    mechanism = DPSGD(sampling=FixedSizeSampling(batch_size=batch_size, dataset_size=batch_size),
                      clip_norm=CLIP_NORM, noise_multiplier=NOISE_MULTIPLIER, delta=1e-5, accounting="image")
    optimizer = optax.sgd(lr, momentum=MOMENTUM)
    step = make_train_step(linen_loss(model, optax.softmax_cross_entropy_with_integer_labels), optimizer,
                           mechanism, microbatch_size=microbatch_size)

    def init(params):
        return TrainState.create(params, optimizer)

    def run(state, images, labels, key):
        state, metrics = step(state, Batch(images, labels), key)
        return state, metrics["loss"]

    return init, jax.jit(run, donate_argnums=0)


def jax_privacy_step(model, lr, batch_size):
    """jax-privacy's public API: ``clipped_grad`` (per-example gradients clipped to C and
    summed), then the optax chain ``gaussian_privatizer`` (std z·C) → scale 1/B → SGD."""
    import jax_privacy
    from jax_privacy import noise_addition

    grad_fn = jax_privacy.clipped_grad(
        functools.partial(batch_loss, model), l2_clip_norm=CLIP_NORM, batch_argnums=(1, 2), return_values=True)
    optimizer = optax.chain(noise_addition.gaussian_privatizer(stddev=NOISE_MULTIPLIER * CLIP_NORM, prng_key=0),
                            optax.scale(1 / batch_size), optax.sgd(lr, momentum=MOMENTUM))

    def init(params):
        return params, optimizer.init(params)

    def run(state, images, labels, key):
        del key  # the privatizer carries its own key in its state
        params, opt_state = state
        grads, aux = grad_fn(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), jnp.mean(aux.values)

    return init, jax.jit(run, donate_argnums=0)


def plain_step(model, lr):
    """The non-private step: one gradient of the batch loss, SGD with momentum."""
    optimizer = optax.sgd(lr, momentum=MOMENTUM)

    def init(params):
        return params, optimizer.init(params)

    def run(state, images, labels, key):
        del key
        params, opt_state = state
        loss, grads = jax.value_and_grad(functools.partial(batch_loss, model))(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return init, jax.jit(run, donate_argnums=0)


class Worker(Arms):
    def versions(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        found = {}
        for package in ("jax", "jaxlib", "flax", "optax", "jax-privacy"):
            try:
                found[package] = version(package)
            except PackageNotFoundError:
                pass
        return {"versions": found, "backend": jax.default_backend(), "devices": jax.device_count()}

    def init(self, model: str, data: str) -> dict:
        """Writes the model's initial parameters (flax init, key 0) to <data>/params_<model>.npz."""
        with np.load(Path(data) / f"batch_{model}.npz") as batch:
            example = jnp.asarray(batch["images"][:1])
        params = jax.jit(MODELS[model].init)(jax.random.key(0), example)["params"]
        save_params(Path(data) / f"params_{model}.npz", params)  # "/"-joined names, read by worker_torch
        return {}

    def prepare(self, arm: str, model: str, data: str, lr: float, microbatch_size: int, warmup: int) -> dict:
        """Builds and compiles the arm's step for the model, runs ``warmup`` steps; the
        parameter count, the loss of the initial parameters on the batch (to check that
        all frameworks compute the same function) and XLA's memory analysis."""
        module = MODELS[model]
        params = jax.tree.map(jnp.asarray, load_params(Path(data) / f"params_{model}.npz"))
        with np.load(Path(data) / f"batch_{model}.npz") as batch:
            images, labels = jnp.asarray(batch["images"]), jnp.asarray(batch["labels"])
        initial_loss = float(jax.jit(functools.partial(batch_loss, module))(params, images, labels))
        batch_size = len(labels)
        if arm == "patchdp":
            init, step = patchdp_step(module, lr, batch_size, None)
        elif arm == "patchdp-mb":
            init, step = patchdp_step(module, lr, batch_size, microbatch_size)
        elif arm == "jax-privacy":
            init, step = jax_privacy_step(module, lr, batch_size)
        elif arm == "jax":
            init, step = plain_step(module, lr)
        else:
            raise ValueError(f"worker_jax.py has no arm {arm!r}")
        state = init(params)
        compiled = step.lower(state, images, labels, jax.random.key(0)).compile()
        memory = compiled.memory_analysis()
        keys = iter(jax.random.split(jax.random.key(1), 10**4))
        run = {"state": state}

        def one_step() -> float:
            key = next(keys)
            run["state"], loss = jax.block_until_ready(compiled(run["state"], images, labels, key))
            return loss

        for _ in range(warmup):
            one_step()
        self.arms[arm, model] = one_step
        return {"params": int(sum(p.size for p in jax.tree.leaves(params))), "initial_loss": initial_loss,
                "xla": {"argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
                        "temp": memory.temp_size_in_bytes, "alias": memory.alias_size_in_bytes}}


if __name__ == "__main__":
    Worker().serve()
