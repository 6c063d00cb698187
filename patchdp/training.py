"""The train state and one DP-SGD step (docs/method.md, "The training step").

    key ─┬─► per-example keys ─► K random crops (patchdp.crops)          ┐
         │                          │                                    │
         │        per-example loss: mean of the K crop losses            │ private_grad
         │                          │                                    │
         │   per-example gradient, clipped to C, summed (book-keeping)   ┘
         │                          │
         └─► noise key ─► + N(0, (z·C)²) once, / expected batch size     gaussian_noise
                                    │
                             optax update

:func:`private_grad` (the clipped gradient sum of each example's crops, like
``jax.grad``) and :func:`patchdp.noise.gaussian_noise` (an optax transformation) are the
pieces for an own training loop; :func:`make_train_step` composes them into the jitted
``train_step(state, batch, key)`` of a mechanism (:class:`patchdp.DPSGD`), which alone
holds the crops, clip norm and noise (and, with ``private=False``, gives the non-private
baseline of the same training).

**Sharding.** With a ``jax.sharding.Mesh`` the examples are sharded over all of its
devices (:func:`shard_batch`) and the state is replicated (:func:`replicate`); each
device clips its own examples and the clipped sums are added across devices
(``shard_map`` and ``psum``: :func:`private_grad`). Per-example keys and noise are drawn
for the global arrays, so a step on 8 devices equals the step on 1 device for the same
key (up to float summation order), and noise is added once.

**Multi-host (TPU pods, multi-node GPU).** Call ``jax.distributed.initialize()`` in
every process before any other JAX call; build the mesh over ``jax.devices()`` (all
processes' devices, e.g. ``jax.make_mesh((jax.device_count(),), ("data",))``; its axes
are used in Auto mode, XLA partitioning the global program); give
every process the same sampling seed and step key so they agree on the batch indices
and the noise (``jax.experimental.multihost_utils.broadcast_one_to_all``); place the
(identical) initial state with :func:`replicate`; let each process load only its slice
of the batch, the rows its devices hold
(``sharding.addressable_devices_indices_map((B,))``), and assemble the global batch
leaf by leaf with ``jax.make_array_from_process_local_data(sharding, local)``, where
``sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))`` (:func:`examples_sharding`).
The step itself is unchanged; its outputs are replicated, readable in every process.
tests/test_multiprocess.py runs this in 2 processes and checks it against the step in one
process. ``patchdp train`` does all of this itself in every process of a launch
(:mod:`patchdp.distributed`, :func:`patchdp.trainer.train`).

**Keys.** The step key drives crops and noise, so the privacy guarantee needs it
secret and fresh each step: e.g. ``jax.random.fold_in(base, step)`` with ``base``
seeded from OS entropy (``secrets.randbits(64)``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from patchdp import _validation, crops
from patchdp.clipping import clipped_grad_sum, validate_clipping
from patchdp.inclusion import CropSpec
from patchdp.mechanism import DPSGD
from patchdp.noise import gaussian_noise

__all__ = ["Batch", "TrainState", "private_grad", "make_train_step", "gaussian_pixel_noise", "linen_loss",
           "shard_batch", "replicate", "examples_sharding"]

LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
Augment = Callable[[jax.Array, jax.Array], jax.Array]


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


def gaussian_pixel_noise(std: float) -> Augment:
    """``augment(image, key)``: the image (any shape, e.g. (H, W, C) uint8 in pixel units
    0–255) as float32 plus fresh N(0, std²) noise on every value, ``std`` in the image's
    units. Nothing is clipped or rounded: the model sees the noisy value itself (any
    later clipping or rounding would be post-processing of it, and keep the bound).

    The Gaussian-augmentation comparator (:class:`patchdp.accounting.GaussianAugmentation`):
    two images differing by at most Δ in L2 give noisy inputs at total-variation distance
    TV = 2Φ(Δ / 2·std) − 1, so they can be coupled to coincide with probability 1 − TV.
    """
    std = _validation.number("gaussian_pixel_noise std (pixel units)", std, 0, math.inf, low_open=True)

    def augment(image: jax.Array, key: jax.Array) -> jax.Array:
        return image.astype(jnp.float32) + std * jax.random.normal(key, image.shape, jnp.float32)

    return augment


def private_grad(loss_fn: LossFn, *, crop: CropSpec | None, clip_norm: float | None,
                 microbatch_size: int | None = None, flip: bool = False, label_fill=0,
                 unroll: bool | None = None, augment: Augment | None = None,
                 clipping: str = "auto", mesh: Mesh | None = None) -> Callable:
    """Like ``jax.grad``, for DP-SGD with crops: returns ``grad_fn(params, batch, key)``
    giving ``(grad_sum, stats)``.

    ``grad_sum`` = Σ_i m_i · clip_C(∇_θ (1/K) Σ_k loss_fn(θ, crop_k(x_i), crop_k(y_i))):
    the gradient of each example's mean loss over its K random crops, clipped as a whole
    to norm ≤ C, summed over the valid examples (mask m_i); an example whose gradient is
    not finite contributes exactly 0. Replacing one example changes ``grad_sum`` by at
    most 2C, and only if one of its crops hits the changed pixels: the sensitivity
    :mod:`patchdp.accounting` assumes with this ``crop``. Add the noise with
    :func:`gaussian_noise` (once per logical step).

    Args:
      loss_fn: ``loss_fn(params, image, label) -> scalar`` for ONE example and one crop
        (image (h, w, C)). Linen: :func:`linen_loss`. NNX: split the model once,
        ``graphdef, params = nnx.split(model)``, and merge inside,
        ``nnx.merge(graphdef, params)(image[None])[0]``.
      crop: the crop distribution (the ``CropSpec`` given to the accountant), or None to
        use the images as they are (no amplification by cropping).
      clip_norm: C > 0; None gives the non-private baseline (plain gradient of the
        loss sum, no per-example gradients).
      microbatch_size: examples per physical microbatch (must divide the batch size);
        peak memory follows it. Default: :func:`patchdp.clipping.default_schedule`'s
        (microbatches of ~8, unrolled, on CPU; the whole batch on accelerators unless it
        does not fit).
      flip: random horizontal flips after cropping.
      label_fill: label value in the padding of label maps (e.g. an ignore index).
      unroll: microbatch loop unrolled (True) or ``lax.scan`` (False); default by platform
        (:func:`patchdp.clipping.default_schedule`).
      augment: optional ``augment(image, key) -> image`` applied to each example's whole
        image (H, W, C), BEFORE cropping, with a key of its own, e.g.
        :func:`gaussian_pixel_noise`. Applied before the crops so that the crops, their
        flips and resizing are post-processing of the augmented image: the bound of
        :class:`patchdp.accounting.GaussianAugmentation` (an input change of at most Δ in
        L2) then holds for any K and crop distribution. None leaves the step unchanged.
      clipping: how the per-example norms and the clipped sum are computed, all with the
        same result: ``"auto"`` (default, the fastest: book-keeping, :mod:`patchdp.bookkeeping`),
        ``"direct"``, ``"unfold"``, ``"ghost"`` (book-keeping with that method for every
        layer), or ``"per_example"`` (``vmap`` of per-example gradients, the reference).
      mesh: the batch's examples are split over all devices of this mesh: each device
        clips and sums its own examples (``shard_map``; ``microbatch_size`` counts a
        device's examples) and the sums are added across devices, once. Not left to XLA's
        partitioner: it all-gathers the batch for the grouped convolutions of per-example
        convolution gradients, and on XLA:CPU (jax 0.10.2) got them wrong, up to 4× on 4
        devices (tests/test_training.py).

    The returned ``grad_fn(params, batch: Batch, key)`` splits ``key`` into one key per
    example (the crops; with ``augment``, each example's key is split once more into a
    crop key and an augmentation key), is pure and jittable. ``grad_sum`` has the structure of
    ``params`` (leaves ≥ float32). ``stats`` (float32 scalars): ``loss`` (mean over
    valid examples with a finite gradient), ``clipped_fraction`` (of those, the fraction
    whose norm exceeded C), ``valid`` (examples in the batch), ``nonfinite`` (examples
    that contributed zero because their gradient was not finite). They are statistics
    of the private batch, not privatised.
    """
    if clip_norm is not None:
        _validation.clip_norm(clip_norm)
    if crop is not None and not isinstance(crop, CropSpec):
        raise ValueError(f"crop must be a patchdp.CropSpec (the one the accountant uses) or None, "
                         f"got {type(crop).__name__}.")
    if microbatch_size is not None:
        _validation.integer("microbatch_size (examples per microbatch, dividing the batch size)", microbatch_size)
    validate_clipping(clipping)

    def views(example):
        """The example's K views, (K, h, w, C) and (K, ...); the image itself if no crop."""
        key, image, label = example
        if augment is not None:
            key, augment_key = jax.random.split(key)
            image = augment(image, augment_key)
        if crop is None:
            return image[None], label[None]
        return crops.crop(crop, key, image, label, flip=flip, label_fill=label_fill)

    view_loss = lambda params, view: loss_fn(params, *view)

    def summed(params, examples, mask):
        return clipped_grad_sum(view_loss, params, examples, mask, clip_norm=clip_norm,
                                microbatch_size=microbatch_size, unroll=unroll, clipping=clipping, views=views)

    if mesh is not None:
        summed = _summed_over_devices(summed, mesh)

    def grad_fn(params, batch: Batch, key: jax.Array):
        _check_batch(batch)
        keys = jax.random.split(key, batch.image.shape[0])  # the global batch's: the same on any mesh
        grad_sum, stats = summed(params, (keys, batch.image, batch.label), batch.mask)
        counted = jnp.maximum(stats.valid - stats.nonfinite, 1)
        return grad_sum, {"loss": stats.loss_sum / counted, "clipped_fraction": stats.clipped / counted,
                          "valid": stats.valid, "nonfinite": stats.nonfinite}

    return grad_fn


def _summed_over_devices(summed: Callable, mesh: Mesh) -> Callable:
    """``summed(params, examples, mask)`` of each device's examples (leading axis split
    over all devices of ``mesh``; ``params`` replicated), added across devices.
    ``check_vma=False``: book-keeping replays equations traced outside the ``shard_map``,
    which carry no record of which values vary across devices; the one cross-device
    operation is the final ``psum``, whose result is the same on every device."""
    examples = PartitionSpec(mesh.axis_names)
    return jax.shard_map(lambda *args: jax.lax.psum(summed(*args), mesh.axis_names), mesh=_auto(mesh),
                         in_specs=(PartitionSpec(), examples, examples), out_specs=PartitionSpec(),
                         check_vma=False)


def _check_batch(batch: Batch) -> None:
    """ValueError in one line, naming the shapes, unless image is (B, H, W, C), label has
    leading axis B and mask (if any) is (B,)."""
    image, label, mask = (None if x is None else jnp.shape(x) for x in batch)
    if len(image) != 4 or not label or label[0] != image[0] or (mask is not None and mask != image[:1]):
        raise ValueError(f"Batch shapes do not fit together: image {image} must be (B, H, W, C), label {label} "
                         f"must start with B, mask {mask} must be (B,) or None.")


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mechanism: DPSGD, *,
                    flip: bool = False, label_fill=0, microbatch_size: int | None = None,
                    unroll: bool | None = None, mesh: Mesh | None = None, private: bool = True) -> Callable:
    """Builds the jitted DP-SGD step ``train_step(state, batch, key) -> (state, metrics)``
    of ``mechanism``: :func:`private_grad` with its crops, clip norm, pixel noise and
    clipping method, then its noise (:meth:`~patchdp.DPSGD.noise`), then ``optimizer``.
    Nothing privacy-related is given here, so the step cannot disagree with the
    mechanism's accountant (:meth:`~patchdp.DPSGD.ledger`).

    Args:
      loss_fn, flip, label_fill, microbatch_size, unroll: as in :func:`private_grad`.
      optimizer: any optax transformation (SGD, momentum, Adam, ...); the state's
        ``opt_state`` is this optimizer's, ``TrainState.create(params, optimizer)``.
      mechanism: the :class:`~patchdp.DPSGD` mechanism the step implements.
      mesh: shard examples over all devices of this mesh (data parallelism).
      private: False builds the NON-private baseline of the same training (the same
        crops and pixel noise, no clipping, no noise, the summed gradient divided by
        the expected batch size), for benchmarks and comparisons only.

    The step splits ``key`` into a crop key and a noise key; the clipped gradient sum of
    the batch's crops gets N(0, (z·C)²) once and is divided by the expected batch size;
    the result (cast to the parameters' dtypes) goes to ``optimizer``. The noise is
    applied as its own transformation rather than ``optax.chain``-ed into ``optimizer``:
    the chain would change the optimizer-state structure that ``TrainState.create(params,
    optimizer)`` and saved checkpoints have, for a transformation whose state is empty.
    The state argument is donated: do not reuse it after the call.

    Metrics (float32 scalars, statistics of the private batch, NOT privatised): ``loss``
    (mean crop loss over the valid examples with a finite gradient), ``clipped_fraction``
    (of those, the fraction whose gradient norm exceeded C), ``valid`` (examples in the
    batch), ``nonfinite`` (examples that contributed zero: gradient not finite).
    """
    if not isinstance(mechanism, DPSGD):
        raise TypeError(f"make_train_step needs the mechanism, a patchdp.DPSGD(...), got {mechanism!r}.")
    augment = None if mechanism.augmentation_noise is None else gaussian_pixel_noise(mechanism.augmentation_noise)
    grad_fn = private_grad(loss_fn, crop=mechanism.crop, clip_norm=mechanism.clip_norm if private else None,
                           microbatch_size=microbatch_size, flip=flip, label_fill=label_fill, unroll=unroll,
                           augment=augment, clipping=mechanism.clipping, mesh=mesh)
    noise = mechanism.noise() if private else gaussian_noise(0.0, None, mechanism.expected_batch_size)
    data = None if mesh is None else examples_sharding(mesh)

    def train_step(state: TrainState, batch: Batch, key: jax.Array):
        if data is not None:
            batch = jax.lax.with_sharding_constraint(batch, data)
        crop_key, noise_key = jax.random.split(key)
        grad_sum, metrics = grad_fn(state.params, batch, crop_key)
        grads, _ = noise.update(grad_sum, noise.init(state.params), noise_key=noise_key)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        state = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
        return state, metrics

    return jax.jit(train_step, donate_argnums=0)


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """Places a host batch on the mesh, examples split over all its devices (the batch
    size must be divisible by the number of devices)."""
    return jax.device_put(batch, examples_sharding(mesh))


def replicate(tree, mesh: Mesh):
    """Places a pytree (e.g. a TrainState) fully replicated on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(_auto(mesh), PartitionSpec()))


def _auto(mesh: Mesh) -> Mesh:
    """The same devices and axis names with Auto axis types: the step is written for
    the global batch and leaves the partitioning to XLA (``jax.make_mesh`` makes
    Explicit axes by default)."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def examples_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over all devices of the mesh."""
    return NamedSharding(_auto(mesh), PartitionSpec(mesh.axis_names))
