"""The training loop: a :class:`~patchdp.config.Config` in, a trained model and a privacy
report out. (Over 500 lines: plan, seeds, evaluation, loop and outputs; the run
directory and the task pieces are to move to modules of their own, issue 22.)

    config ─► plan (pure: the mechanism — sampling, crops, p*, C, z calibrated if asked, δ —
                 and the planned steps T)
           ─► ledger = mechanism.ledger(budget); train_step = make_train_step(..., ledger.mechanism)
           ─► for t = start … T − 1:
                  stop if one more step would exceed the ε budget      (Ledger.can_step, O(1))
                  batch t  = dataset[sampling.sample(seed, t)]         (loaded one step ahead)
                  state    = train_step(state, batch, fold_in(key, t)) (crop, clip, noise once)
                  ledger.step()
                  log · refresh ε · evaluate · checkpoint
           ─► final evaluation, report (JSON + Markdown), plots

**Exact resumption.** Batch t and the key of step t are pure functions of the run's
seeds and t (:class:`Seeds`), so a checkpoint needs only the train state and the ledger
(which holds the mechanism, :class:`patchdp.DPSGD`), and the run directory the seeds; a
resumed run computes exactly the steps an uninterrupted run with the same seeds would
have. Resuming checks the checkpoint against the config first and refuses, in one line,
each difference between the config's mechanism and the checkpoint's that the ledger
cannot account for (crop, patch, sampling, dataset size, accounting, δ, budget, clip
norm, clipping); a changed noise multiplier is composed by the ledger
(:meth:`~patchdp.accounting.Ledger.change_noise`).

**Nothing is written before the run is accepted**: the config, the dataset, the plan and
any checkpoint to resume are all checked first, so a refused command leaves an existing
run directory as it was.

**Secrets.** ``secrets.json`` (mode 0600) holds the run's seeds; checkpoints do not. Whoever
has it knows which images were sampled at each step and the noise added: do not share a
run directory; share :func:`patchdp.export.export_model`'s output instead.

**Outputs** in the run directory: ``config.json`` (what ``--resume`` reads), ``secrets.json``,
``metrics.jsonl`` (one record per line: ``kind`` = ``train`` with loss and clipped
fraction every ``log_every`` steps, ``epsilon`` every ``epsilon_every`` steps, ``eval``
with the scores), the same numbers as TensorBoard event files in ``tensorboard/`` (config
``tensorboard``), ``checkpoints/``, ``report.json`` and ``report.md`` (with per-class IoU
and a link to every figure), and ``curves.png``, ``per_class.png``, ``predictions.png``,
``inclusion.png``. Progress goes to stderr (:mod:`patchdp.progress`).

**Evaluation** runs the model on whole images of the held-out split, at full resolution
(the segmentation models are fully convolutional and the classifiers pool globally), in
batches of ``eval_batch_size``; a partial last batch is padded with ignored labels.

**Privacy.** The guarantee is that of the accounting named in the config (patch level:
w = q·p* with the crop distribution of ``config.crop_spec``; image level: w = q;
Gaussian augmentation, the paper's comparator: w = q·TV from the pixel noise
``augmentation_noise`` added to every sampled image before cropping, no credit for
the crops), at δ,
for the steps actually taken, under the secure seed mode. Every ε the run shows (report,
``metrics.jsonl``, plots) comes from its ledger, i.e. the steps taken with their noise
multipliers; the report gives ε at the same δ under both accountings. Evaluation scores and the logged training loss are NOT
privatised: the loss is a statistic of the sampled batch, and the held-out split is
assumed public (or separately protected).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from patchdp import accounting, clipping, metrics, plots, report, sampling
from patchdp.checkpoint import Checkpointer
from patchdp.config import Config
from patchdp.data import IGNORE_LABEL, Dataset, Prefetcher, get_dataset
from patchdp.events import EventWriter
from patchdp.inclusion import inclusion_map
from patchdp.mechanism import DPSGD
from patchdp.models import IMAGENET_MEAN, IMAGENET_STD, get_model, load_params, merge_params
from patchdp.progress import Progress
from patchdp.training import Batch, TrainState, make_train_step, replicate, shard_batch

__all__ = ["Plan", "Seeds", "RunDirectoryError", "make_plan", "train", "load_dataset", "make_loss", "make_optimizer"]

OVERLAY_IMAGES = 4
SECRETS = "secrets.json"
SECRETS_NOTE = (f"{SECRETS} in the run directory holds the run's secret seeds (which images each step sampled, "
                "its crops and noise): do not share the run directory; share patchdp.export.export_model's output.")
NO_AMPLIFICATION = ("p* = 1: every crop covers the whole patch, so cropping gives no amplification and "
                    "patch-level ε equals image-level ε; use smaller crops, or more padding, to gain from cropping.")


# ============================================================================ the plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the loop derives from the config and the training set before step 0.

    Attributes:
      mechanism: the DP-SGD mechanism (:class:`patchdp.DPSGD`): sampling, crops, patch,
        clip norm, noise multiplier z (calibrated if the config gives a target ε), pixel
        noise, accounting, δ. The step and the ledger are both built from it.
      steps: T, the planned number of steps.
      budget: the ε (at δ) training may not exceed, or None.
    """

    mechanism: DPSGD
    steps: int
    budget: float | None


def make_plan(config: Config, dataset_size: int, image_shape: tuple[int, int, int], *, devices: int = 1) -> Plan:
    """The plan for training ``config`` on ``dataset_size`` images of ``image_shape``
    over ``devices`` devices; calibrates z when the config gives no noise multiplier.

    Raises ValueError when the crop does not fit the image, the batch does not fit the
    dataset, the microbatch / device count does not divide the batch, or δ > 1/N (a
    mechanism publishing a random example in the clear satisfies δ = 1/N).
    """
    n = dataset_size
    if config.batch_size > n:
        raise ValueError(f"config: batch_size {config.batch_size} exceeds the {n} training examples.")
    if config.sampling == "fixed":
        scheme = sampling.FixedSizeSampling(batch_size=config.batch_size, dataset_size=n)
    else:
        scheme = sampling.PoissonSampling(rate=config.batch_size / n, dataset_size=n,
                                          multiple_of=(config.microbatch_size or 1) * devices)
    for divisor, what in ((config.microbatch_size, "microbatch_size"), (devices, "the number of devices")):
        if divisor and scheme.padded_size % divisor:
            raise ValueError(f"config: {what} ({divisor}) must divide the batch of {scheme.padded_size} slots; "
                             "change batch_size or microbatch_size.")
    steps = config.steps or scheme.steps_for_epochs(config.epochs)
    delta = config.delta if config.delta is not None else 0.1 / n
    if delta > 1 / n:
        raise ValueError(f"config: delta {delta:g} exceeds 1/N = {1 / n:.3g} for N = {n} training examples, so it "
                         "would allow publishing examples in the clear; set delta to at most 1/N (the paper's "
                         "choice), better well below it (unset: 0.1/N).")
    fields = dict(sampling=scheme, clip_norm=config.clip_norm, delta=delta, crop=config.crop_spec,
                  image_shape=tuple(image_shape), patch=config.patch_shape, accounting=config.accounting,
                  augmentation_noise=config.augmentation_noise, clipping=config.clipping,
                  resolution=config.resolution)
    if config.noise_multiplier is None:
        mechanism = DPSGD.calibrated(target_epsilon=config.target_epsilon, steps=steps, **fields)
    else:
        mechanism = DPSGD(noise_multiplier=config.noise_multiplier, **fields)
    return Plan(mechanism=mechanism, steps=steps, budget=config.target_epsilon)


# ============================================================================ randomness


class Seeds(NamedTuple):
    """The run's secrets: the batch-sampling seed and the 64-bit base of the JAX keys
    (kept in the run directory's ``secrets.json``, mode 0600, never in a checkpoint).

    Step t uses batch ``plan.sampling.sample(sampling, t)`` and key ``step_keys()(t)``; the
    initial parameters use :meth:`init_key`. Secure seeds come from OS entropy; a fixed
    seed s gives ``SamplingSeed.fixed(s)`` and ``jax.random.key(s)``: reproducible and
    NOT secure.
    """

    sampling: sampling.SamplingSeed
    key: tuple[int, int]  # threefry key data, two uint32

    @classmethod
    def create(cls, seed: int | None) -> "Seeds":
        if seed is None:
            return cls(sampling.SamplingSeed.from_os(), (secrets.randbits(32), secrets.randbits(32)))
        key = jax.random.key_data(jax.random.key(seed))
        return cls(sampling.SamplingSeed.fixed(seed), tuple(int(k) for k in key))

    def _bases(self) -> tuple[jax.Array, jax.Array]:
        return tuple(jax.random.split(jax.random.wrap_key_data(np.asarray(self.key, np.uint32))))

    def init_key(self) -> jax.Array:
        """An ``rbg`` key for parameter initialisation: its initialisers compile ~3x
        faster than threefry's on CPU, and initialisation needs no sharding invariance."""
        bits = jax.random.bits(self._bases()[0], (), jnp.uint32)
        return jax.random.key(int(bits), impl="rbg")

    def step_keys(self) -> Callable[[int], jax.Array]:
        """t ↦ the key of step t: ``fold_in(base, t)``."""
        base = self._bases()[1]
        return lambda step: jax.random.fold_in(base, step)

    def to_dict(self) -> dict:
        return {"sampling": str(self.sampling.value), "secure": self.sampling.secure, "key": list(self.key)}

    @classmethod
    def from_dict(cls, state: dict) -> "Seeds":
        seed = sampling.SamplingSeed(int(state["sampling"]), secure=bool(state["secure"]))
        return cls(seed, tuple(int(k) for k in state["key"]))


# ============================================================================ model pieces


def load_dataset(config: Config, split: str) -> Dataset:
    """The ``split`` of the config's dataset. For ``folder`` datasets, a ``class_list``
    option (A2D2's ``class_list.json``: "#rrggbb" → name) gives the class names and palette."""
    options = dict(config.dataset_options)
    if config.dataset == "folder" and "class_list" in options:
        path = Path(options.pop("class_list")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"the class list {path} (dataset_options.class_list) does not exist; for A2D2, "
                                    f"`patchdp data prepare a2d2 --data-dir {options.get('root')}` says what to "
                                    "download and checks the folder layout.")
        classes = json.loads(path.read_text())
        options.update(class_names=list(classes.values()), palette={c: i for i, c in enumerate(classes)})
    return get_dataset(config.dataset, split, **options)


def normalize(images: jax.Array, kind: str) -> jax.Array:
    """uint8 images → float32 model inputs: image / 255, or ImageNet-standardised."""
    x = images.astype(jnp.float32) / 255.0
    if kind == "imagenet":
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x


def make_loss(model, task: str, normalization: str = "unit") -> Callable:
    """``loss_fn(params, image, label) -> scalar`` for ONE uint8 example (h, w, C):
    segmentation — mean cross-entropy over the pixels whose label is not 255 (0 if none);
    classification — cross-entropy of the image label."""

    def loss_fn(params, image, label):
        logits = model.apply({"params": params}, normalize(image[None], normalization))[0]
        if task == "classification":
            return optax.softmax_cross_entropy_with_integer_labels(logits, label)
        valid = label != IGNORE_LABEL
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, label, 0))
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    return loss_fn


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """SGD, SGD with momentum, or Adam at the config's learning rate."""
    if config.optimizer == "adam":
        return optax.adam(config.learning_rate)
    return optax.sgd(config.learning_rate, momentum=config.momentum if config.optimizer == "momentum" else None)


def make_evaluator(model, num_classes: int, normalization: str) -> Callable:
    """Jitted ``(params, images, labels) -> (confusion (K, K) int32, predictions)``."""

    def evaluate(params, images, labels):
        logits = model.apply({"params": params}, normalize(images, normalization))
        predictions = jnp.argmax(logits, axis=-1)
        return metrics.confusion_matrix(labels, predictions, num_classes), predictions

    return jax.jit(evaluate)


def evaluate(evaluator: Callable, params, dataset: Dataset, *, batch_size: int, count: int | None) -> np.ndarray:
    """The confusion matrix (K × K, int64; :mod:`patchdp.metrics`) of the first ``count``
    (default all) examples of ``dataset``."""
    count = len(dataset) if count is None else min(count, len(dataset))
    starts = range(0, count, batch_size)

    def load(start):
        indices = np.arange(start, start + batch_size)
        batch = dataset.get_batch(np.minimum(indices, count - 1))
        labels = np.where((indices < count).reshape((-1,) + (1,) * (batch["label"].ndim - 1)),
                          batch["label"], IGNORE_LABEL)  # padding slots: ignored
        return batch["image"], labels

    total = np.zeros((dataset.num_classes,) * 2, np.int64)
    with Prefetcher(load, starts) as batches:
        for images, labels in batches:
            total += np.asarray(evaluator(params, images, labels)[0], np.int64)
    return total


# ============================================================================ the loop


def train(config: Config, *, run_dir=None, resume: bool = False, progress: bool = True) -> dict:
    """Trains ``config`` and returns the final report (also written to the run directory).

    Args:
      config: the run.
      run_dir: output directory; default ``config.run_dir`` or ``runs/<name>-<time>``.
      resume: continue from the newest readable checkpoint in ``run_dir`` (start afresh if
        none); refused when the config differs from the checkpoint in anything but the noise.
      progress: show progress on stderr: a bar on a terminal, else a plain line every
        ~10 s (:class:`patchdp.progress.Progress`).

    Raises ValueError before writing anything when the run is refused, and
    :class:`RunDirectoryError` when the run directory cannot be written.
    """
    started = time.perf_counter()
    train_set, eval_set = load_dataset(config, config.train_split), load_dataset(config, config.eval_split)
    mesh = jax.make_mesh((jax.device_count(),), ("data",)) if jax.device_count() > 1 else None
    plan = make_plan(config, len(train_set), train_set.image_shape, devices=jax.device_count())
    mechanism = plan.mechanism
    if mechanism.inclusion_probability >= 1:
        warnings.warn(NO_AMPLIFICATION, stacklevel=2)
    run_dir = Path(run_dir or config.run_dir or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    model = get_model(config.model, train_set.num_classes, **config.model_options)
    optimizer = make_optimizer(config)
    evaluator = make_evaluator(model, eval_set.num_classes, config.input_normalization)
    ledger = mechanism.ledger(budget_epsilon=plan.budget)
    seeds = Seeds.create(config.seed)
    state = _initial_state(model, optimizer, seeds, plan, config.pretrained)
    start = 0
    checkpoint_dir = run_dir / "checkpoints"
    checkpoints = Checkpointer(checkpoint_dir) if checkpoint_dir.is_dir() else None  # opening creates it
    if checkpoints is not None and checkpoints.latest_step() is not None:
        if not resume:
            raise ValueError(f"{run_dir} already holds the checkpoints of a run; resume it (--resume {run_dir}) "
                             "or choose another run directory.")
        state, meta = checkpoints.restore(state)
        ledger = _resumable_ledger(meta, plan, run_dir)
        seeds, start = _read_secrets(run_dir), meta["step"]

    with _writing(run_dir, ledger):  # the run is accepted: from here on it writes its directory
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        if start == 0:
            _write_secrets(run_dir, seeds)
        checkpoints = checkpoints or Checkpointer(checkpoint_dir)
        schedule = _schedule(config, mechanism.sampling.padded_size // jax.device_count())
        step_fn = make_train_step(  # the ledger's mechanism: the one its next steps are recorded for
            make_loss(model, train_set.task, config.input_normalization), optimizer, ledger.mechanism,
            flip=config.flip, label_fill=IGNORE_LABEL, microbatch_size=schedule.microbatch_size,
            unroll=schedule.unroll, mesh=mesh)
        log = _MetricsLog(run_dir / "metrics.jsonl", EventWriter(run_dir / "tensorboard") if config.tensorboard else None)
        log.keep_until(start)
        if mesh is not None:
            state = replicate(state, mesh)

        def checkpoint(step, state):
            meta = {"step": step, "ledger": ledger.to_dict()}
            checkpoints.save(step, state, meta)

        def load(step):
            chosen = mechanism.sampling.sample(seeds.sampling, step)
            data = train_set.get_batch(chosen.indices)
            batch = Batch(data["image"], data["label"], chosen.mask)
            return shard_batch(batch, mesh) if mesh is not None else jax.device_put(batch)

        def run_eval(step, params):
            confusion = evaluate(evaluator, params, eval_set, batch_size=config.eval_batch_size,
                                 count=config.eval_examples)
            scores = metrics.scores(confusion, eval_set.task)
            log.write("eval", step, **scores)
            console.note(f"patchdp: evaluation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            return scores, confusion

        step_key, z = seeds.step_keys(), ledger.mechanism.noise_multiplier
        stop_reason = "completed"
        console = Progress(plan.steps, start, enabled=progress, budget=plan.budget, description=f"DP-SGD z={z:.3g}")
        console.compiling()
        with Prefetcher(load, range(start, plan.steps)) as batches:
            for t in range(start, plan.steps):
                if plan.budget is not None and not ledger.can_step():
                    stop_reason = "budget"
                    break
                try:
                    batch = next(batches)
                except sampling.BatchOverflowError as error:  # Poisson batch too large: stop, never truncate
                    stop_reason = "poisson overflow"
                    console.write(f"patchdp: {error}")
                    break
                state, step_metrics = step_fn(state, batch, step_key(t))
                ledger.step()
                done = t + 1
                values, epsilon = {}, None
                if done % config.log_every == 0 or done == plan.steps:
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    log.write("train", done, **values)
                if done % config.epsilon_every == 0:
                    epsilon = ledger.epsilon()
                    log.write("epsilon", done, epsilon=epsilon)
                console.update(done, loss=values.get("loss"), clipped=values.get("clipped_fraction"), epsilon=epsilon)
                if config.eval_every and done % config.eval_every == 0 and done < plan.steps:
                    run_eval(done, state.params)
                if config.checkpoint_every and done % config.checkpoint_every == 0:
                    checkpoint(done, state)
        console.close()

        steps_taken = ledger.steps
        if steps_taken % config.epsilon_every:
            log.write("epsilon", steps_taken, epsilon=ledger.epsilon())
        checkpoint(steps_taken, state)
        checkpoints.close()
        scores, confusion = run_eval(steps_taken, state.params)
        result = final_report(config, plan, ledger, stop_reason=stop_reason, scores=scores,
                              secure=seeds.sampling.secure, seconds=time.perf_counter() - started)
        result["run_dir"], result["schedule"] = str(run_dir), schedule._asdict()
        _write_outputs(run_dir, result, plan, log.read(), evaluator, state.params, eval_set, config, confusion)
        return result


def _schedule(config: Config, device_batch: int) -> clipping.Schedule:
    """The config's microbatches (unroll by platform), else the cost model's
    (:func:`patchdp.clipping.default_schedule`) for ``device_batch`` examples per device."""
    if config.microbatch_size is None:
        return clipping.default_schedule(device_batch)
    return clipping.Schedule(config.microbatch_size, jax.default_backend() == "cpu", "config: microbatch_size")


class RunDirectoryError(OSError):
    """The run directory could not be written (read-only, full disk, removed): one line
    naming the path; the run continues from its last checkpoint with ``--resume``."""


@contextlib.contextmanager
def _writing(run_dir: Path, ledger: accounting.Ledger):
    """Turns a failed write into one :class:`RunDirectoryError` line saying how to continue."""
    try:
        yield
    except OSError as error:
        where = error.filename or run_dir
        raise RunDirectoryError(f"cannot write {where} ({error.strerror or error}); training stopped at step "
                                f"{ledger.steps}. Make {run_dir} writable and continue with "
                                f"`patchdp train --resume {run_dir}`.") from None


def _initial_state(model, optimizer, seeds: Seeds, plan: Plan, pretrained: str | None) -> TrainState:
    h, w = plan.mechanism.crop.output_size
    params = jax.jit(model.init)(seeds.init_key(), jnp.zeros((1, h, w, plan.mechanism.image_shape[2])))["params"]
    if pretrained:
        params = merge_params(params, load_params(pretrained))
    return TrainState.create(params, optimizer)


def _resumable_ledger(meta: dict, plan: Plan, run_dir: Path) -> accounting.Ledger:
    """The ledger of a checkpoint that a run with ``plan`` may continue, its next steps
    taken at the plan's noise multiplier (a change the ledger composes, made explicit
    here); ValueError in one line naming each difference when the config changed
    anything else the steps taken were accounted under (crop, patch, sampling, clip norm,
    accounting, δ, budget), or when the checkpoint contradicts itself."""
    saved = meta["ledger"]
    changed = plan.mechanism.differences(saved.get("mechanism", {}), ignore=("noise_multiplier",))
    if saved.get("budget_epsilon") != plan.budget:
        changed.append(f"target_epsilon (budget) {saved.get('budget_epsilon')!r} → {plan.budget!r}")
    if changed:
        raise ValueError(f"cannot resume {run_dir}: the config differs from its checkpoint in {'; '.join(changed)}. "
                         "Steps already taken cannot be re-accounted: restore the run's config.json, or start a new run.")
    ledger = accounting.Ledger.from_dict(saved, plan.mechanism)
    if ledger.steps != meta["step"]:
        raise ValueError(f"cannot resume {run_dir}: its checkpoint is at step {meta['step']} but its ledger records "
                         f"{ledger.steps} steps, so the privacy spent is unknown; start a new run.")
    if ledger.mechanism.noise_multiplier != plan.mechanism.noise_multiplier:
        ledger.change_noise(plan.mechanism.noise_multiplier)
    return ledger


def _write_secrets(run_dir: Path, seeds: Seeds) -> None:
    """``run_dir/secrets.json``, readable by its owner only (mode 0600)."""
    path = run_dir / SECRETS
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # also when the file was already there
    with os.fdopen(descriptor, "w") as f:
        json.dump(seeds.to_dict(), f)


def _read_secrets(run_dir: Path) -> Seeds:
    path = run_dir / SECRETS
    if not path.is_file():
        raise ValueError(f"cannot resume {run_dir}: {path} is missing, and the run's seeds with it; start a new run.")
    return Seeds.from_dict(json.loads(path.read_text()))


class _MetricsLog:
    """``metrics.jsonl``: one JSON record per line, each with ``kind`` and ``step``; with
    ``events``, every number also goes to TensorBoard as ``<kind>/<key>`` (``epsilon``
    as itself). A resumed run appends a new event file; TensorBoard shows the newest
    value of a step."""

    def __init__(self, path: Path, events: EventWriter | None = None):
        self.path, self.events = path, events

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_until(self, step: int) -> None:
        """Drops records after ``step`` (written by a run that is being resumed from there)."""
        kept = [r for r in self.read() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, kind: str, step: int, **values) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(report.strict({"kind": kind, "step": step, **values}), allow_nan=False) + "\n")
        if self.events is not None:
            self.events.scalars(step, {(kind if key == kind else f"{kind}/{key}"): value for key, value in values.items()
                                       if isinstance(value, (int, float)) and math.isfinite(value)})


# ============================================================================ report


def final_report(config: Config, plan: Plan, ledger: accounting.Ledger, *, stop_reason: str, scores: dict,
                 secure: bool, seconds: float) -> dict:
    """The run's report: what was trained, how far, the scores, the mechanism, and the
    privacy guarantee of the steps the ledger records, each at the noise multiplier it
    was taken with (:func:`patchdp.report.privacy_comparison`), and the constant noise
    patch- and image-level accounting need over as many steps for the patch-level ε
    (:func:`patchdp.report.noise_comparison`). Strict JSON.
    """
    privacy = same_epsilon = None
    if ledger.steps:
        privacy = report.privacy_comparison(ledger)
        same_epsilon = report.noise_comparison(ledger.mechanism, privacy["epsilon_patch"], ledger.steps)
    return report.strict({
        "config": config.to_dict(),
        "model": config.model, "dataset": config.dataset,
        "accounting": config.accounting,
        "mechanism": ledger.mechanism.to_dict(),
        "steps_planned": plan.steps, "steps": ledger.steps, "stop_reason": stop_reason,
        "budget_epsilon": plan.budget,
        "noise_calibrated": config.noise_multiplier is None,
        "seed": "secure (OS entropy)" if secure else f"fixed ({config.seed}): reproducible, NOT secure",
        "secure": secure,
        "secrets": SECRETS_NOTE,
        "warnings": [NO_AMPLIFICATION] if plan.mechanism.inclusion_probability >= 1 else [],
        "scores": scores,
        "privacy": privacy,
        "same_epsilon": same_epsilon,
        "seconds": seconds,
    })


def _write_outputs(run_dir: Path, result: dict, plan: Plan, records: list[dict], evaluator, params,
                   eval_set: Dataset, config: Config, confusion: np.ndarray) -> None:
    """The figures, then ``report.json`` (with ``per_class``, from the final evaluation's
    ``confusion`` matrix) and ``report.md`` (the report, a per-class table and a link to
    every figure). Adds ``per_class`` to ``result``."""
    result["per_class"] = report.strict(metrics.per_class(confusion, eval_set.class_names))
    name = f"{config.name}: {config.model} on {config.dataset}"
    figures = {"training curves": plots.training_curves(
        records, run_dir / "curves.png", title=name, steps=plan.steps, budget=plan.budget, delta=plan.mechanism.delta,
        accounting=config.accounting)}
    figures["per-class IoU"] = plots.per_class_bars({k: c["iou"] for k, c in result["per_class"].items()},
                                                    run_dir / "per_class.png", title=f"per-class IoU, step {result['steps']}")
    shown = eval_set.get_batch(np.minimum(np.arange(config.eval_batch_size), len(eval_set) - 1))  # eval's shape
    predictions = np.asarray(evaluator(params, shown["image"], shown["label"])[1])
    figures["predictions"] = plots.prediction_grid(
        shown["image"][:OVERLAY_IMAGES], shown["label"][:OVERLAY_IMAGES], predictions[:OVERLAY_IMAGES],
        run_dir / "predictions.png", class_names=eval_set.class_names)
    m = plan.mechanism
    title = f"p(t): {m.patch.name}, crops {m.crop.sizes[0][0]}x{m.crop.sizes[0][1]}"
    figures["inclusion probability p(t)"] = plots.inclusion_heatmap(
        inclusion_map(m.image_shape, m.crop, m.patch), run_dir / "inclusion.png",
        title=f"{title}, padding {m.crop.padding}; p* = {m.inclusion_probability:.4g}")
    (run_dir / "report.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    counted = "pixels" if eval_set.task == "segmentation" else "images"
    lines = ["", f"## Per class (final evaluation; {counted} labelled as / predicted as the class)", "",
             f"| class | IoU | labelled {counted} | predicted {counted} |", "|---|---|---|---|"]
    lines += [f"| {k} | {report.shown(c, 'iou', '.4f')} | {c['labelled']} | {c['predicted']} |"
              for k, c in result["per_class"].items()]
    lines += ["", "## Figures", ""]
    lines += [f"![{caption}]({path.relative_to(run_dir)})\n" for caption, path in figures.items()]
    (run_dir / "report.md").write_text(report.markdown(result) + "\n".join(lines) + "\n")
