"""The private step on an accelerator: checked against the CPU, then timed and measured.

    PYTHONPATH=. python benchmarks/accelerator.py --out $OUT/acc          # ≤ 8 min on one GPU
    PYTHONPATH=. python benchmarks/accelerator.py --quick                 # seconds, on CPU

Runs on any JAX backend; "accelerator" is the default device (``jax.devices()[0]``), so
on a CPU-only machine the check compares the CPU with itself and must pass exactly.
Imports neither dp_accounting nor tensorflow_datasets (the device image lacks them).
Writes ``accelerator.json`` and ``accelerator.md`` into ``--out`` (after every arm, so a
run killed at its time limit still leaves what it measured), and prints the tables.

**1. Correctness** (always first; a small U-Net segmenting random crops, clip norm C,
noise multiplier z = 1, microbatches at the backend's default loop). The same jitted
step runs with the same parameters, batch and key committed to the CPU and to the
accelerator; its optimizer keeps the privatised gradient ĝ (shape of the parameters,
gradient units per example) as its state, so ĝ itself is compared:

* book-keeping clipping, noise off; book-keeping, noise on (same key); per-example
  clipping, noise off: ‖ĝ_acc − ĝ_cpu‖₂ ≤ 4δ·M (derivation below);
* the noise std: N = E[B]·(ĝ_on − ĝ_off) on the accelerator, d entries, should be
  N(0, σ²) with σ = z·C; s = ‖N‖₂/√d must lie in the two-sided χ² interval
  σ·√(χ²_d(α/2)/d) ≤ s ≤ σ·√(χ²_d(1 − α/2)/d) with α = 10⁻⁶ (so a correct step fails
  it once in a million runs). The rounding in N (≤ 4δ·M, next item) is orders of
  magnitude below the interval's width 1/√(2d);
* informational, not asserted: the relative difference of the noise-off step at the
  backend's default matmul precision (TF32 or bfloat16 passes may apply there).

**Tolerance.** The checks run under ``jax.default_matmul_precision("highest")``: every
product and sum is float32 on both backends (cuBLAS/cuDNN without TF32; TPU 6-pass
bfloat16 ≈ float32), unit roundoff u = 2⁻²⁴. With a TF32 default (u = 2⁻¹¹) the bound
below exceeds 1 for any real network: no float32 statement is possible there.
From the step's jaxpr (the program both backends compile), every operation e adds a
relative error, measured against the magnitudes of its operands:

* a contraction or reduction of K terms (``dot_general``: the contracted length;
  ``conv_general_dilated``: window × input features per group; ``reduce_sum``;
  windowed and scattered sums; ``cumsum``), accumulated in any order, FMA or not:
  ≤ γ_K = K·u / (1 − K·u) (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1);
* an elementwise float operation: ≤ 8u, i.e. 4 ulp: correctly rounded arithmetic is
  ≤ u, and the single-precision transcendental functions of CUDA's libdevice and
  XLA:CPU's polynomial approximations are documented within 2–4 ulp (an assumption
  for the latter two, not a theorem); data movement, selection, max/min, comparisons
  and integer work (crop offsets from the key's bits) are exact;
* a ``lax.scan`` of L iterations adds γ_L for its carried sum (its body counted once).

δ = Σ_e (error of e) over all operations. To first order, and assuming that no
operation amplifies a relative perturbation of its inputs (relative condition number
≤ 1: the errors add, none is multiplied; an assumption about the network, generous
here because δ sums every operation of the program, not just one path through it),
each per-example gradient g_i is within δ‖g_i‖ of its exact value on each backend.
Its clipped contribution c_i·g_i (c_i = min(1, C/‖g_i‖), continuous, so no clip
decision can flip) carries that error twice, once directly and once through its norm:
≤ 2δ·‖c_i g_i‖ ≤ 2δ·C. The sum, the noise (N's entries are computed from the same
random bits on both backends, then by elementwise operations counted in δ) and the
division by E[B] are operations counted in δ too, so each backend is within
2δ·M of the exact ĝ, M = (C·B_valid + ‖N‖₂)/E[B], and the two backends within 4δ·M.

**2. Speed and memory**, in priority order; each arm runs only while its workload's
longest arm so far still fits into what is left of ``--budget-seconds``, the rest are
listed as skipped (full mode: DeepLabV3+ first, the paper's setting; an arm that fails,
e.g. out of memory, is recorded with its error). Workloads (full / ``--quick``):

* ``deeplabv3plus``: DeepLabV3+ (ResNet-50, GroupNorm, output stride 16) on
  1024×2048 Cityscapes-sized images, random 505×505 crops, logical batch 200 in
  microbatches of 8, C = 2 (``patchdp/configs/cityscapes_deeplabv3plus.toml``);
* ``resnet18``: ResNet-18 (GroupNorm, small stem) on 32×32, batch 256;
* ``unet``: U-Net (width 16, 3 levels) on 128×128, batch 64.

``--quick`` keeps the crops, microbatching and arms but shrinks them (batch 8 in
microbatches of 2) and puts few-layer models in place of DeepLabV3+ and ResNet-18
(named in the table): it checks that the script runs, not how fast anything is.

Every step is ``make_train_step`` of a :class:`patchdp.DPSGD` mechanism (fixed-size
batches of B, the workload's crops and C, z = 1; ``build_step``). Arms: non-private
(``private=False``: one batch gradient, the denominator of the ratios), DP default
(book-keeping, ``clipping="auto"``, no ``microbatch_size``: the schedule
:func:`patchdp.clipping.default_schedule` picks, microbatches of ~8 unrolled on CPU, the
whole batch with ``lax.scan`` on accelerators unless its memory estimate exceeds half
the device's memory; the table names the choice), DP book-keeping on the whole batch,
DP per-example (``"per_example"``, vmap; default schedule), and DP book-keeping in
microbatches with ``lax.scan`` and unrolled (``unroll=False/True``; ResNet-18 and U-Net:
microbatches of B/4). DeepLabV3+'s whole-batch arms (non-private, DP book-keeping) run
in its config's microbatches of 8 at the platform's loop. All SGD with momentum 0.9.
Per arm: compile time (``lower`` + ``compile``, autotuning included), the fastest and
the median of up to ``--repeats`` steps after one warm-up step (stopping early after
``--arm-seconds`` of timed steps), images/s = B / fastest step, ratios over the
workload's non-private arm, XLA's buffer-assigned peak (arguments + outputs +
temporaries − donated), and the device allocator's peak
(``memory_stats()["peak_bytes_in_use"]``; n/a on CPU). That peak is the process's running
maximum, which JAX cannot reset: it is an arm's own peak only when the arm raised it,
and is reported only then (else "≤ earlier").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import ClosedJaxpr, Jaxpr
from scipy import stats

from bench_step import compiled_peak_bytes
from patchdp import DPSGD, CropSpec, FixedSizeSampling
from patchdp.clipping import Schedule, default_schedule, example_bytes
from patchdp.config import Config, config_path
from patchdp.crops import crop as crop_views
from patchdp.models import get_model
from patchdp.training import Batch, TrainState, linen_loss, make_train_step

UNIT_ROUNDOFF = 2.0 ** -24  # float32
ELEMENTWISE_ERROR = 8 * UNIT_ROUNDOFF  # 4 ulp per elementwise float operation (module docstring)
NOISE_ALPHA = 1e-6  # the noise-std check fails a correct step with this probability
MiB = 2 ** 20
CITYSCAPES = (1024, 2048, 3), 19  # image shape and classes of the paper's DeepLabV3+ setting

# Primitives that move, select or compare values without rounding them.
EXACT = frozenset("""broadcast_in_dim reshape squeeze expand_dims slice dynamic_slice dynamic_update_slice
gather pad concatenate stack transpose rev select_n max min abs neg sign copy copy_p stop_gradient reduce_max
reduce_min reduce_window_max reduce_window_min argmax argmin iota split sort clamp floor ceil round
optimization_barrier bitcast_convert_type""".split())
# Primitives that only hold programs (all branches of a cond are counted).
CONTAINERS = frozenset("""jit pjit closed_call core_call custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr remat
checkpoint cond scan while""".split())
ELEMENTWISE = frozenset("""add add_any sub mul div square sqrt rsqrt exp exp2 log log1p expm1 tanh logistic
erf erf_inv integer_pow pow convert_element_type reduce_precision""".split())


def build_step(loss_fn, optimizer, *, private, clip_norm, noise_multiplier, batch_size, image_shape, crop,
               clipping, microbatch_size, unroll):
    """The jitted ``step(state, batch, key) -> (state, metrics)`` of the mechanism with
    fixed-size batches of B (q = 1: no ε is computed here, so the accounting, image
    level, and δ = 1e-5 only complete the mechanism; the step does not depend on them):
    crops ``crop`` (a CropSpec, or None) of images of ``image_shape``, clip norm C,
    noise z·C (z = 0: none), divided by B; with ``private=False`` the non-private
    baseline of the same code path (one gradient of the summed loss).
    ``microbatch_size=None`` takes :func:`patchdp.clipping.default_schedule`. The one
    place this script calls :func:`patchdp.training.make_train_step`."""
    mechanism = DPSGD(sampling=FixedSizeSampling(batch_size=batch_size, dataset_size=batch_size),
                      clip_norm=clip_norm, noise_multiplier=noise_multiplier, delta=1e-5, crop=crop,
                      image_shape=image_shape, accounting="image", clipping=clipping)
    return make_train_step(loss_fn, optimizer, mechanism, private=private, microbatch_size=microbatch_size,
                           unroll=unroll)


def setup(model, image_shape, label_shape, batch_size, classes, crop):
    """Parameters (initialised on one input of the size the model sees: the crop's output
    size, or the image's without ``crop``), a random batch (images and labels) and the
    per-example loss."""
    keys = jax.random.split(jax.random.key(0), 3)
    seen = image_shape if crop is None else crop.output_size + image_shape[2:]
    params = jax.jit(model.init)(keys[0], jnp.zeros((1,) + seen))["params"]
    batch = Batch(jax.random.normal(keys[1], (batch_size,) + image_shape),
                  jax.random.randint(keys[2], (batch_size,) + label_shape, 0, classes))
    return params, batch, linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)


def keep_gradient() -> optax.GradientTransformation:
    """An "optimizer" whose state is the last gradient it received (the step's privatised
    gradient ĝ) and whose updates are zero: ĝ becomes readable as ``state.opt_state``."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


# ---------------------------------------------------------------------------------------
# 1. Correctness


def relative_error_bound(closed_jaxpr: ClosedJaxpr) -> tuple[float, list[str]]:
    """δ of the module docstring for a program: the sum over its operations (nested
    programs included) of γ_K per K-term contraction or reduction, 8u per elementwise
    float operation and γ_L per L-iteration ``scan``. Also returns the names of the
    primitives it did not know (counted as elementwise; a reduction among them would
    make δ too small, so they are reported)."""
    unknown = set()

    def walk(jaxpr: Jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name not in CONTAINERS:
                total += operation_error(eqn, unknown)
                continue
            for value in eqn.params.values():
                for inner in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(inner, (ClosedJaxpr, Jaxpr)):
                        total += walk(inner.jaxpr if isinstance(inner, ClosedJaxpr) else inner)
            if eqn.primitive.name == "scan":
                total += gamma(eqn.params["length"])
            elif eqn.primitive.name == "while":
                unknown.add("while (trip count unknown: body counted once)")
        return total

    return walk(closed_jaxpr.jaxpr), sorted(unknown)


def operation_error(eqn, unknown: set) -> float:
    """The relative rounding error bound of one operation without nested programs."""
    name, params = eqn.primitive.name, eqn.params
    if not any(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.outvars) or name in EXACT:
        return 0.0
    shape = lambda i: eqn.invars[i].aval.shape
    if name == "dot_general":
        (contracting, _), _ = params["dimension_numbers"]
        return gamma(math.prod(shape(0)[a] for a in contracting))
    if name == "conv_general_dilated":
        rhs = params["dimension_numbers"].rhs_spec  # (out features, in features, *window)
        return gamma(math.prod(shape(1)[a] for a in rhs[1:]))
    if name == "reduce_sum":
        return gamma(math.prod(shape(0)[a] for a in params["axes"]))
    if name in ("reduce_window_sum", "select_and_scatter_add"):
        return gamma(math.prod(params["window_dimensions"]))
    if name in ("scatter-add", "scatter_add"):
        return gamma(math.prod(shape(1)[:-1]) + 1)  # every index vector may hit one entry
    if name == "cumsum":
        return gamma(shape(0)[params["axis"]])
    if name not in ELEMENTWISE:
        unknown.add(name)
    return ELEMENTWISE_ERROR


def gamma(terms: int) -> float:
    """γ_K = K·u / (1 − K·u): the relative error bound of a K-term float32 sum or dot
    product in any order (Higham, Accuracy and Stability of Numerical Algorithms, §3.1)."""
    return terms * UNIT_ROUNDOFF / (1 - terms * UNIT_ROUNDOFF) if terms * UNIT_ROUNDOFF < 1 else math.inf


def noise_std_check(noise: np.ndarray, std: float, alpha: float = NOISE_ALPHA) -> dict:
    """Whether the sample ``noise`` (d entries) has standard deviation ``std``: s = ‖noise‖₂/√d
    against the two-sided χ²_d interval of level 1 − α for N(0, std²) entries."""
    d = noise.size
    low, high = (std * math.sqrt(stats.chi2.ppf(p, d) / d) for p in (alpha / 2, 1 - alpha / 2))
    observed = float(np.linalg.norm(noise.astype(np.float64)) / math.sqrt(d))
    return {"check": f"noise std = z·C (χ² interval, α = {alpha:g}, d = {d})", "observed": observed,
            "bound": [low, high], "passed": bool(low <= observed <= high)}


def difference_check(name: str, accelerator: np.ndarray, cpu: np.ndarray, delta: float, magnitude: float) -> dict:
    """Whether ‖accelerator − cpu‖₂ ≤ 4δ·M (module docstring); both flattened ĝ."""
    observed = float(np.linalg.norm(accelerator.astype(np.float64) - cpu))
    bound = 4 * delta * magnitude
    return {"check": name, "observed": observed, "bound": bound, "delta": delta, "magnitude": magnitude,
            "passed": bool(observed <= bound)}


def flat(tree) -> np.ndarray:
    """All leaves of a pytree, on the host, as one float32 vector."""
    return np.concatenate([np.asarray(leaf, np.float32).ravel() for leaf in jax.tree.leaves(tree)])


def correctness(quick: bool) -> dict:
    """The checks of the module docstring's part 1, on a U-Net segmenting random crops."""
    size, crop, batch_size, micro, width, levels = (24, 16, 4, 2, 4, 1) if quick else (64, 48, 16, 8, 8, 3)
    clip_norm, z, classes = 0.1, 1.0, 4
    model = get_model("unet", classes, width=width, levels=levels)
    spec = CropSpec(crop)
    params, batch, loss = setup(model, (size, size, 3), (size, size), batch_size, classes, spec)
    cpu, accelerator = jax.devices("cpu")[0], jax.devices()[0]
    key = jax.random.key(3)

    def run(step, device):
        state = jax.device_put(TrainState.create(params, keep_gradient()), device, may_alias=False)  # donated
        state, metrics = step(state, jax.device_put(batch, device), jax.device_put(key, device))
        return flat(state.opt_state), {k: float(v) for k, v in metrics.items()}

    def build(clipping, noise_multiplier):
        return build_step(loss, keep_gradient(), private=True, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                          batch_size=batch_size, image_shape=(size, size, 3), crop=spec, clipping=clipping,
                          microbatch_size=micro, unroll=None)

    state = TrainState.create(params, keep_gradient())
    checks, grads = [], {}
    with jax.default_matmul_precision("highest"):
        for name, clipping, noise_multiplier in (("book-keeping, noise off", "auto", 0.0),
                                                 ("book-keeping, noise on", "auto", z),
                                                 ("per-example, noise off", "per_example", 0.0)):
            step = build(clipping, noise_multiplier)
            delta, unknown = relative_error_bound(jax.make_jaxpr(step)(state, batch, key))
            (on_cpu, metrics), (on_accelerator, _) = run(step, cpu), run(step, accelerator)
            grads[name] = on_cpu, on_accelerator
            noise = batch_size * (on_cpu - grads["book-keeping, noise off"][0]) if noise_multiplier else 0.0
            magnitude = (clip_norm * metrics["valid"] + float(np.linalg.norm(noise))) / batch_size
            check = difference_check(f"{name}: ‖ĝ_acc − ĝ_cpu‖₂", on_accelerator, on_cpu, delta, magnitude)
            checks.append(check | {"unclassified_primitives": unknown, "clipped_fraction": metrics["clipped_fraction"]})
    noise = batch_size * (grads["book-keeping, noise on"][1] - grads["book-keeping, noise off"][1])
    checks.append(noise_std_check(noise, z * clip_norm))
    step = build("auto", 0.0)  # the backend's default matmul precision
    (on_cpu, _), (on_accelerator, _) = run(step, cpu), run(step, accelerator)
    default_difference = float(np.linalg.norm(on_accelerator.astype(np.float64) - on_cpu) / clip_norm)
    return {"model": f"unet width {width}, {levels} levels, {size}x{size} images, crops {crop}, batch {batch_size} "
                     f"in microbatches of {micro}, C = {clip_norm}, z = {z}, {on_cpu.size} parameters",
            "precision": "highest", "cpu": str(cpu), "accelerator": str(accelerator), "checks": checks,
            "passed": all(c["passed"] for c in checks),
            "default_precision_relative_difference": default_difference}


# ---------------------------------------------------------------------------------------
# 2. Speed and memory


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model and logical batch of the speed table.

    Attributes:
      name: its key (``--models``).
      description: the model and input, for the table.
      model: the flax module.
      image_shape: (H, W, C) of the stored images; label_shape: () or (H, W).
      classes: output classes (random labels in [0, classes)).
      batch_size: the logical batch B.
      crop: the random crops the model sees, or None (whole images).
      microbatch_size: examples per microbatch of the microbatched arms.
      always_microbatched: every arm in microbatches (the logical batch does not fit at once).
      clip_norm: C.
    """

    name: str
    description: str
    model: object
    image_shape: tuple[int, int, int]
    label_shape: tuple[int, ...]
    classes: int
    batch_size: int
    crop: CropSpec | None
    microbatch_size: int
    always_microbatched: bool
    clip_norm: float


@dataclasses.dataclass(frozen=True)
class Arm:
    """One step variant. ``schedule``: "whole" (the whole batch in one pass, or the
    workload's microbatches where it is always microbatched), "default" (no
    microbatch_size: :func:`patchdp.clipping.default_schedule` chooses), "scan" or
    "unrolled" (the workload's microbatches in that loop)."""

    label: str
    private: bool
    clipping: str = "auto"
    schedule: str = "whole"


NON_PRIVATE, DEFAULT, BOOKKEEPING = (Arm("non-private", False), Arm("DP default", True, schedule="default"),
                                     Arm("DP book-keeping", True))
PER_EXAMPLE = Arm("DP per-example", True, "per_example", "default")
SCAN, UNROLLED = Arm("DP book-keeping, scan", True, schedule="scan"), Arm("DP book-keeping, unrolled", True,
                                                                         schedule="unrolled")
# Priority order: the paper's setting (its config's microbatches), the DP default / non-private ratios, the
# default schedule on DeepLabV3+, the whole batch, per-example clipping, loops.
PLAN = [("deeplabv3plus", NON_PRIVATE), ("deeplabv3plus", BOOKKEEPING), ("resnet18", NON_PRIVATE),
        ("resnet18", DEFAULT), ("unet", NON_PRIVATE), ("unet", DEFAULT), ("deeplabv3plus", DEFAULT),
        ("resnet18", BOOKKEEPING), ("unet", BOOKKEEPING), ("resnet18", PER_EXAMPLE), ("unet", PER_EXAMPLE),
        ("resnet18", SCAN), ("resnet18", UNROLLED), ("unet", SCAN), ("unet", UNROLLED),
        ("deeplabv3plus", PER_EXAMPLE), ("deeplabv3plus", UNROLLED)]


def workloads(quick: bool) -> dict[str, Workload]:
    """The three workloads of the module docstring; DeepLabV3+ from the paper's config.
    ``quick``: the same batches, crops and microbatching, shrunk, with few-layer stand-in
    models (compiling a book-keeping step costs seconds per layer on a CPU)."""
    config = Config.from_toml(config_path("cityscapes_deeplabv3plus"))
    if quick:
        return {w.name: w for w in (
            Workload("deeplabv3plus", "stand-in: U-Net width 4, 1 level; 48x64 images, crops 33",
                     get_model("unet", 19, width=4, levels=1), (48, 64, 3), (48, 64), 19, 8, CropSpec(33), 2, True,
                     config.clip_norm),
            Workload("resnet18", "stand-in: 3-conv VGG width 4; 16x16 images", get_model("cnn", 10, width=4),
                     (16, 16, 3), (), 10, 8, None, 2, False, 1.0),
            Workload("unet", "U-Net width 4, 2 levels; 32x32 images", get_model("unet", 4, width=4, levels=2),
                     (32, 32, 3), (32, 32), 4, 8, None, 2, False, 1.0))}
    image_shape, classes = CITYSCAPES
    crop = config.crop_spec
    return {w.name: w for w in (
        Workload("deeplabv3plus", f"DeepLabV3+ {dict(config.model_options)}; {image_shape[0]}x{image_shape[1]} "
                                  f"images, crops {crop.output_size[0]}x{crop.output_size[1]}",
                 get_model(config.model, classes, **config.model_options), image_shape, image_shape[:2], classes,
                 config.batch_size, crop, config.microbatch_size, True, config.clip_norm),
        Workload("resnet18", "ResNet-18 (small stem); 32x32 images", get_model("resnet18", 10, stem="small"),
                 (32, 32, 3), (), 10, 256, None, 64, False, 1.0),
        Workload("unet", "U-Net width 16, 3 levels; 128x128 images", get_model("unet", 4), (128, 128, 3),
                 (128, 128), 4, 64, None, 16, False, 1.0))}


def device_memory() -> dict | None:
    """The default device's allocator statistics (bytes), None where the backend has none (CPU)."""
    return jax.devices()[0].memory_stats()


def default_choice(loss_fn, params, batch: Batch, crop: CropSpec | None) -> Schedule:
    """The schedule :func:`default_schedule` picks for a step built without one, asked
    as :func:`patchdp.clipping.clipped_grad_sum` asks it (with one crop's memory
    estimate off the CPU), so that the table can say what the "default" arms ran."""
    image, label = (jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in (batch.image, batch.label))
    views = 1
    if crop is not None:
        shapes = jax.eval_shape(lambda i, l: crop_views(crop, jax.random.key(0), i, l), image, label)
        image, label = (jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for v in shapes)
        views = crop.crops_per_example
    estimate = (None if jax.default_backend() == "cpu" else
                example_bytes(lambda p, view: loss_fn(p, *view), params, (image, label), views))
    return default_schedule(batch.image.shape[0], example_bytes=estimate)


def measure(workload: Workload, data, arm: Arm, repeats: int, arm_seconds: float) -> dict:
    """Compile time, step times, images/s and peak memory of one arm (module docstring)."""
    params, batch, loss = data
    optimizer = optax.sgd(0.01, momentum=0.9)
    whole = workload.microbatch_size if workload.always_microbatched else workload.batch_size
    micro = {"whole": whole, "default": None}.get(arm.schedule, workload.microbatch_size)
    unroll = {"scan": False, "unrolled": True}.get(arm.schedule)
    step = build_step(loss, optimizer, private=arm.private, clip_norm=workload.clip_norm, noise_multiplier=1.0,
                      batch_size=workload.batch_size, image_shape=workload.image_shape, crop=workload.crop,
                      clipping=arm.clipping, microbatch_size=micro, unroll=unroll)
    schedule = (default_choice(loss, params, batch, workload.crop) if micro is None else
                Schedule(micro, jax.default_backend() == "cpu" if unroll is None else unroll, "given"))
    state = TrainState.create(jax.tree.map(jnp.copy, params), optimizer)
    start = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
    compile_seconds = time.perf_counter() - start
    before = device_memory()
    state = jax.block_until_ready(compiled(state, batch, jax.random.key(1))[0])  # warm-up
    seconds = []
    while len(seconds) < repeats and sum(seconds) < arm_seconds:
        start = time.perf_counter()
        state = jax.block_until_ready(compiled(state, batch, jax.random.key(2 + len(seconds)))[0])
        seconds.append(time.perf_counter() - start)
    after = device_memory()
    raised = after is not None and after["peak_bytes_in_use"] > before["peak_bytes_in_use"]
    loop = None if schedule.microbatch_size == workload.batch_size else ("unrolled" if schedule.unroll else "scan")
    return {"microbatch_size": schedule.microbatch_size, "loop": loop, "schedule_basis": schedule.basis,
            "compile_s": compile_seconds, "step_s": seconds,
            "step_s_min": min(seconds), "step_s_median": statistics.median(seconds),
            "images_per_s": workload.batch_size / min(seconds), "xla_peak_bytes": compiled_peak_bytes(compiled),
            "device_peak_bytes": after["peak_bytes_in_use"] if raised else None,
            "device_memory": "n/a" if after is None else ("own peak" if raised else "≤ earlier")}


def speed(results: dict, quick: bool, models: list[str], budget: float, started: float, repeats: int,
          arm_seconds: float, write) -> None:
    """Runs the plan's arms for ``models`` in priority order into ``results["arms"]`` and
    ``results["skipped"]``, calling ``write()`` after each; skips an arm when what is left of
    the budget is less than its workload's longest arm so far."""
    defined = workloads(quick)
    plan = [(defined[name], arm) for name, arm in PLAN if name in models]
    data, longest = {}, {}
    for index, (workload, arm) in enumerate(plan):
        left, needed = budget - (time.perf_counter() - started), longest.get(workload.name, 0.0)
        row = {"model": workload.name, "description": workload.description, "arm": arm.label,
               "private": arm.private, "clipping": arm.clipping, "schedule": arm.schedule,
               "batch_size": workload.batch_size, "input": list(workload.image_shape),
               "crop": None if workload.crop is None else workload.crop.to_dict()}
        if left < needed:
            results["skipped"].append(row | {"reason": f"{left:.0f} s of the budget left, this workload's longest "
                                                       f"arm so far took {needed:.0f} s"})
        else:
            start = time.perf_counter()
            try:
                if workload.name not in data:
                    data[workload.name] = setup(workload.model, workload.image_shape, workload.label_shape,
                                                workload.batch_size, workload.classes, workload.crop)
                row |= measure(workload, data[workload.name], arm, repeats, arm_seconds)
            except Exception as error:  # e.g. out of device memory: recorded, and the other arms still run
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            longest[workload.name] = max(longest.get(workload.name, 0.0), time.perf_counter() - start)
            results["arms"].append(row)
        if all(w is not workload for w, _ in plan[index + 1:]):
            data.pop(workload.name, None)  # its last arm: free the batch and parameters
        write()
    for row in results["arms"]:
        base = next((r for r in results["arms"] if r["model"] == row["model"] and not r["private"]
                     and "error" not in r), None)
        if base is not None and "error" not in row:
            row["time_ratio"] = row["step_s_min"] / base["step_s_min"]
            row["memory_ratio"] = row["xla_peak_bytes"] / base["xla_peak_bytes"]
    write()


# ---------------------------------------------------------------------------------------
# Output


def markdown(results: dict) -> str:
    """The correctness checks, the speed table and the skipped arms as markdown."""
    meta = results["meta"]
    lines = [f"# Accelerator: {meta['device']} ({meta['platform']}), jax {meta['jax']}, "
             f"{'quick' if meta['quick'] else 'full'} run, {meta['elapsed_s']:.0f} s, commit {meta['commit']}", ""]
    check = results.get("correctness")
    if check is not None:
        lines += [f"Correctness ({check['model']}; {check['accelerator']} against {check['cpu']}, "
                  f"precision {check['precision']}): {'passed' if check['passed'] else 'FAILED'}", "",
                  "| check | observed | bound | passed |", "|---|---|---|---|"]
        for c in check["checks"]:
            bound = (f"[{c['bound'][0]:.4g}, {c['bound'][1]:.4g}]" if isinstance(c["bound"], list)
                     else f"{c['bound']:.3g} (4δ·M, δ = {c['delta']:.3g}, M = {c['magnitude']:.3g})")
            lines.append(f"| {c['check']} | {c['observed']:.4g} | {bound} | {'yes' if c['passed'] else 'NO'} |")
        lines += ["", f"At the default matmul precision (not asserted): ‖ĝ_acc − ĝ_cpu‖₂ / C = "
                      f"{check['default_precision_relative_difference']:.3g}.", ""]
    lines += ["| model | arm | batch (micro, loop) | compile s | step ms, min (median) | images/s | ÷ NP time "
              "| XLA peak MiB | ÷ NP | device peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["arms"]:
        shape = f"{row['batch_size']}" + (f" ({row['microbatch_size']}, {row['loop']})" if row.get("loop") else "")
        if "error" in row:
            lines.append(f"| {row['model']} | {row['arm']} | {shape} | failed: {row['error'][:120]} |  |  |  |  |  |  |")
            continue
        ratio = lambda key: f"{row[key]:.2f}" if key in row else ""
        device = (f"{row['device_peak_bytes'] / MiB:.0f}" if row["device_peak_bytes"] is not None
                  else row["device_memory"])
        lines.append(f"| {row['model']} | {row['arm']} | {shape} | {row['compile_s']:.1f} | "
                     f"{row['step_s_min'] * 1e3:.1f} ({row['step_s_median'] * 1e3:.1f}) | {row['images_per_s']:.1f} | "
                     f"{ratio('time_ratio')} | {row['xla_peak_bytes'] / MiB:.1f} | {ratio('memory_ratio')} | {device} |")
    described = {row["model"]: row["description"] for row in results["arms"] + results["skipped"]}
    lines += ["", *(f"- {name}: {description}" for name, description in described.items())]
    chosen = {}  # the default schedule's basis -> the arms it chose for
    for row in results["arms"]:
        if row["schedule"] == "default" and "error" not in row:
            chosen.setdefault(row["schedule_basis"], []).append(f"{row['model']} / {row['arm']}")
    lines += [f"- default schedule of {', '.join(arms)}: {basis}" for basis, arms in chosen.items()]
    for row in results["skipped"]:
        lines.append(f"\nSkipped: {row['model']} / {row['arm']} ({row['reason']}).")
    return "\n".join(lines) + "\n"


def commit() -> str | None:
    """The checkout's git commit, None where it is not a git work tree (a copied checkout)."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    return done.stdout.strip() if done.returncode == 0 else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accelerator"),
                        help="folder for accelerator.json and accelerator.md")
    parser.add_argument("--quick", action="store_true", help="tiny models and batches: seconds on a CPU")
    parser.add_argument("--budget-seconds", type=float, default=360.0,
                        help="arms that no longer fit are skipped (default 360: the run ends within 8 min)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per arm (default 5; quick 2)")
    parser.add_argument("--arm-seconds", type=float, default=20.0, help="stop timing an arm after this many seconds")
    parser.add_argument("--models", default="deeplabv3plus,resnet18,unet", help="comma-separated workloads")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    models = args.models.split(",")
    unknown = sorted(set(models) - {name for name, _ in PLAN})
    if unknown:
        parser.error(f"unknown models {unknown}; choose from deeplabv3plus, resnet18, unet")
    device = jax.devices()[0]
    results = {"meta": {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
                        "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
                        "quick": args.quick, "budget_s": args.budget_seconds, "commit": commit(),
                        "elapsed_s": 0.0},
               "arms": [], "skipped": []}
    args.out.mkdir(parents=True, exist_ok=True)

    def write():
        results["meta"]["elapsed_s"] = time.perf_counter() - started
        (args.out / "accelerator.json").write_text(json.dumps(results, indent=1))
        (args.out / "accelerator.md").write_text(markdown(results))

    results["correctness"] = correctness(args.quick)
    write()
    speed(results, args.quick, models, args.budget_seconds, started, args.repeats or (2 if args.quick else 5),
          args.arm_seconds, write)
    print(markdown(results), flush=True)
    return results


if __name__ == "__main__":
    main()
