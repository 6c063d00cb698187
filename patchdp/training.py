"""The train state and one DP-SGD step (docs/method.md, "The training step").

    key ─┬─► per-example keys ─► K random crops (patchdp.crops)
         │                          │
         │        per-example loss: mean of the K crop losses
         │                          │
         │        per-example gradient, clipped to C, summed (patchdp.clipping)
         │                          │
         └─► noise key ─► + N(0, (z·C)²) once, / expected batch size (patchdp.noise)
                                    │
                             optax update

:func:`make_train_step` builds the jitted ``train_step(state, batch, key)``. The same
code path with ``clip_norm=None, noise_multiplier=0`` is the non-private baseline.

**Sharding.** With a ``jax.sharding.Mesh`` the examples are sharded over all of its
devices (:func:`shard_batch`), the state is replicated (:func:`replicate`) or sharded
as the caller placed it, and XLA sums the clipped gradients across devices. Because
the program is written for the global batch, per-example keys and noise are drawn
for the global arrays, so a step on 8 devices equals the step on 1 device for the
same key (up to float summation order), and noise is added once.

**Multi-host (TPU pods, multi-node GPU).** Call ``jax.distributed.initialize()`` in
every process before anything else; build the mesh over ``jax.devices()`` (all
processes' devices, e.g. ``jax.make_mesh((jax.device_count(),), ("data",))``; its axes
are used in Auto mode, XLA partitioning the global program); give
every process the same sampling seed and step key so they agree on the batch indices
and the noise (``jax.experimental.multihost_utils.broadcast_one_to_all``); let each
process load only its slice of the batch and assemble the global batch with
``jax.make_array_from_process_local_data(NamedSharding(mesh, P(mesh.axis_names)), local)``.
The step itself is unchanged.

**Keys.** The step key drives crops and noise, so the privacy guarantee needs it
secret and fresh each step: e.g. ``jax.random.fold_in(base, step)`` with ``base``
seeded from OS entropy (``secrets.randbits(64)``).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from patchdp import crops
from patchdp.clipping import clipped_grad_sum, validate_clip_norm
from patchdp.inclusion import CropSpec
from patchdp.noise import noisy_mean, validate_noise

__all__ = ["Batch", "TrainState", "make_train_step", "linen_loss", "shard_batch", "replicate"]

LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class TrainState(NamedTuple):
    """Everything a step updates: parameters, optimizer state, and the step count (int32)."""

    params: Any
    opt_state: Any
    step: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(params, optimizer.init(params), jnp.zeros((), jnp.int32))


class Batch(NamedTuple):
    """One padded batch on device.

    Attributes:
      image: (B, H, W, C) images.
      label: (B, H, W, ...) label maps (cropped with the images) or (B, ...) labels.
      mask: optional bool (B,); False marks padded slots (Poisson sampling).
    """

    image: jax.Array
    label: jax.Array
    mask: jax.Array | None = None


def linen_loss(model, loss: Callable[[jax.Array, jax.Array], jax.Array]) -> LossFn:
    """A per-example ``loss_fn(params, image, label) -> scalar`` for a flax linen model.

    The model is applied to ``image[None]`` (a batch of one, so normalization must be
    per-example: GroupNorm or LayerNorm, never BatchNorm) with variables
    ``{"params": params}``; ``loss(output, label)`` may return per-pixel losses, which
    are averaged. E.g. ``linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)``.
    """

    def loss_fn(params, image, label):
        output = model.apply({"params": params}, image[None])[0]
        return jnp.mean(loss(output, label))

    return loss_fn


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    clip_norm: float | None, noise_multiplier: float, expected_batch_size: float,
                    crop: CropSpec | None = None, flip: bool = False, label_fill=0,
                    microbatch_size: int | None = None, unroll: bool | None = None,
                    mesh: Mesh | None = None) -> Callable:
    """Builds the jitted DP-SGD step ``train_step(state, batch, key) -> (state, metrics)``.

    Args:
      loss_fn: ``loss_fn(params, image, label) -> scalar`` for ONE example and one crop
        (image (h, w, C)); see :func:`linen_loss`.
      optimizer: any optax transformation (SGD, momentum, Adam, ...).
      clip_norm: C, the per-example clip norm; None disables clipping (non-private).
      noise_multiplier: z, noise std in units of C (the accountant's z); 0 for none.
      expected_batch_size: B for fixed-size batches, q·N for Poisson sampling: the noisy
        sum is divided by it (use the sampler's ``expected_batch_size``).
      crop: the crop distribution (the same ``CropSpec`` the accountant uses); None
        trains on the images as they are (no amplification by cropping).
      flip: random horizontal flips after cropping.
      label_fill: label value in the padding of label maps (e.g. an ignore index).
      microbatch_size: examples per physical microbatch (must divide the batch size);
        peak memory follows it. Default: the whole batch at once.
      unroll: microbatch loop unrolled (True) or ``lax.scan`` (False); default by backend.
      mesh: shard examples over all devices of this mesh (data parallelism).

    The step: split ``key`` into a crop key (one key per example) and a noise key; per
    example, the mean loss of its K crops; per-example gradients clipped to C and
    summed over valid examples (``patchdp.clipping``); N(0, (z·C)²) added once and the
    result divided by ``expected_batch_size`` (``patchdp.noise``); an optax update.
    The state argument is donated: do not reuse it after the call.

    Metrics (float32 scalars): ``loss`` (mean over valid examples with a finite
    gradient), ``clipped_fraction`` (of those, the fraction whose norm exceeded C),
    ``valid`` (examples in the batch), ``nonfinite`` (examples that contributed zero
    because their gradient was not finite).
    """
    validate_clip_norm(clip_norm)
    validate_noise(noise_multiplier, clip_norm, expected_batch_size)
    if crop is not None and not isinstance(crop, CropSpec):
        raise ValueError(f"crop must be a patchdp.inclusion.CropSpec (the one the accountant uses) or None, "
                         f"got {type(crop).__name__}.")
    if microbatch_size is not None and (isinstance(microbatch_size, bool) or not isinstance(
            microbatch_size, numbers.Integral) or microbatch_size < 1):
        raise ValueError(f"microbatch_size must be a positive integer dividing the batch size, or None; "
                         f"got {microbatch_size!r}.")
    data = None if mesh is None else _examples(mesh)

    def example_loss(params, example):
        key, image, label = example
        if crop is None:
            return loss_fn(params, image, label)
        images, labels = crops.crop(crop, key, image, label, flip=flip, label_fill=label_fill)
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, images, labels))

    def train_step(state: TrainState, batch: Batch, key: jax.Array):
        if data is not None:
            batch = jax.lax.with_sharding_constraint(batch, data)
        crop_key, noise_key = jax.random.split(key)
        keys = jax.random.split(crop_key, batch.image.shape[0])
        grad_sum, stats = clipped_grad_sum(
            example_loss, state.params, (keys, batch.image, batch.label), batch.mask,
            clip_norm=clip_norm, microbatch_size=microbatch_size, unroll=unroll)
        grads = noisy_mean(noise_key, grad_sum, noise_multiplier=noise_multiplier,
                           clip_norm=clip_norm, expected_batch_size=expected_batch_size)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        state = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
        counted = jnp.maximum(stats.valid - stats.nonfinite, 1)
        metrics = {"loss": stats.loss_sum / counted, "clipped_fraction": stats.clipped / counted,
                   "valid": stats.valid, "nonfinite": stats.nonfinite}
        return state, metrics

    return jax.jit(train_step, donate_argnums=0)


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """Places a host batch on the mesh, examples split over all its devices (the batch
    size must be divisible by the number of devices)."""
    return jax.device_put(batch, _examples(mesh))


def replicate(tree, mesh: Mesh):
    """Places a pytree (e.g. a TrainState) fully replicated on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(_auto(mesh), PartitionSpec()))


def _auto(mesh: Mesh) -> Mesh:
    """The same devices and axis names with Auto axis types: the step is written for
    the global batch and leaves the partitioning to XLA (``jax.make_mesh`` makes
    Explicit axes by default)."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _examples(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over all devices of the mesh."""
    return NamedSharding(_auto(mesh), PartitionSpec(mesh.axis_names))
