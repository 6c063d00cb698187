"""The training loop: a :class:`~patchdp.config.Config` in, a trained model and a privacy
report out, in four named stages. The run directory (lock, atomic files, seeds, resume)
is :mod:`patchdp.run_dir`; data, loss and evaluation are :mod:`patchdp.task`.

    config ─► plan   _setup: data, the mechanism (sampling, crops, p*, C, z calibrated if
                     asked, δ) and the planned steps T; pure, writes nothing
           ─► state  _start (under the run directory's lock): fresh seeds and parameters,
                     or the checkpoint to resume and its ledger
           ─► steps  _steps, for t = start … T − 1:
                  stop if one more step would exceed the ε budget      (Ledger.can_step, O(1))
                  batch t  = dataset[sampling.sample(seed, t)]         (loaded one step ahead)
                  state    = train_step(state, batch, fold_in(key, t)) (crop, clip, noise once)
                  ledger.step()
                  log · refresh ε · evaluate · checkpoint
                  stop cleanly on Ctrl-C / SIGTERM: checkpoint, one line to resume
           ─► report _report: final evaluation, report (JSON + Markdown), plots

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
run directory as it was (its lock file comes and goes).

**Several processes** (a TPU pod, several GPU nodes: :mod:`patchdp.distributed`): every
process calls ``train`` alike and computes the step one process would over the same
devices. One mesh spans all their devices; process 0 draws the seeds (or the run's are
read) and names the default run directory; the config, plan and run directory, then the
run directory's checkpoints and secrets, then a restored checkpoint's ledger are compared
across processes before any step (a difference is refused in every process, in one
line); each process loads only the rows of batch t its devices hold; the step, its
noise and the ledger are the single global ones. Process 0 alone holds the lock and
writes the run directory, which every process must see (checked); checkpoints are
orbax's multi-host ones, every process taking part. Ctrl-C or SIGTERM in any process
stops every process after the same step.

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
import functools
import json
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from patchdp import accounting, clipping, metrics, plots, report, sampling
from patchdp.checkpoint import Checkpointer
from patchdp.config import Config
from patchdp.data import IGNORE_LABEL, Dataset, Prefetcher
from patchdp.distributed import Processes, assemble, local_rows
from patchdp.events import EventWriter
from patchdp.files import write_atomic
from patchdp.inclusion import inclusion_map
from patchdp.mechanism import DPSGD
from patchdp.models import get_model, load_params, merge_params
from patchdp.progress import Progress
from patchdp.run_dir import (SECRETS, Interrupted, MetricsLog, RunDirectory, RunDirectoryError, Seeds, held_by_writer,
                             interruptible, resume_command, resume_point, shared_checkpoints)
from patchdp.task import evaluate, load_dataset, make_evaluator, make_loss
from patchdp.training import Batch, TrainState, examples_sharding, make_train_step, replicate, shard_batch

__all__ = ["Plan", "make_plan", "train", "make_optimizer", "final_report"]

OVERLAY_IMAGES = 4
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
    dataset, the device count does not divide the batch or the microbatch each device's
    share, or δ > 1/N (a
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
    if scheme.padded_size % devices:
        raise ValueError(f"config: the number of devices ({devices}) must divide the batch of {scheme.padded_size} "
                         "slots; change batch_size.")
    device_batch = scheme.padded_size // devices  # each device clips its own examples, in microbatches
    if config.microbatch_size and device_batch % config.microbatch_size:
        raise ValueError(f"config: microbatch_size ({config.microbatch_size}) must divide the batch of "
                         f"{scheme.padded_size} slots{f' split over {devices} devices' if devices > 1 else ''}; "
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


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """SGD, SGD with momentum, or Adam at the config's learning rate."""
    if config.optimizer == "adam":
        return optax.adam(config.learning_rate)
    return optax.sgd(config.learning_rate, momentum=config.momentum if config.optimizer == "momentum" else None)



# ============================================================================ the stages


def train(config: Config, *, run_dir=None, resume: bool = False, progress: bool = True,
          processes: Processes = Processes()) -> dict:
    """Trains ``config`` and returns the final report (also written to the run directory).

    Args:
      config: the run.
      run_dir: output directory; default ``config.run_dir`` or ``runs/<name>-<time>``.
      resume: continue from the newest readable checkpoint in ``run_dir``; refused (never
        started over) when there is none, or when the config differs from the checkpoint
        in anything but the noise (:func:`patchdp.run_dir.resume_point`).
      progress: show progress on stderr: a bar on a terminal, else a plain line every
        ~10 s (:class:`patchdp.progress.Progress`).
      processes: this process's place in a run of several (:func:`patchdp.distributed.start`),
        each calling ``train`` alike; see "Several processes" above.

    Raises ValueError before writing anything when the run is refused (another process
    holds the run directory: :class:`patchdp.run_dir.RunLocked`; in every process alike
    when several disagree on the config, data, plan or run directory),
    :class:`~patchdp.run_dir.RunDirectoryError` when the run directory cannot be written,
    and :class:`~patchdp.run_dir.Interrupted` after saving a checkpoint on Ctrl-C or SIGTERM.
    """
    started = time.perf_counter()
    setup = _setup(config, processes)
    run = RunDirectory(run_dir or config.run_dir or processes.from_writer(  # process 0's clock
        lambda: f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    processes.agree("config, dataset, plan or run directory", {
        "config": config.to_dict(), "mechanism": setup.plan.mechanism.to_dict(), "steps": setup.plan.steps,
        "run_dir": str(run.path)})
    with held_by_writer(run, processes), shared_checkpoints(run, processes, resume) as checkpoints:
        start = _start(setup, run, checkpoints, resume)
        records = processes.in_writer(  # damaged: refused
            lambda: [r for r in MetricsLog(run.metrics_file).read() if r["step"] <= start.step])
        with _writing(run, start.ledger, checkpoints):  # the run is accepted: from here on it writes its directory
            if processes.writer:
                run.write_config(config)
                if start.step == 0:
                    run.write_secrets(start.seeds)
            events = EventWriter(run.path / "tensorboard") if config.tensorboard and processes.writer else None
            log = MetricsLog(run.metrics_file, events, writes=processes.writer)
            log.rewrite(records)
            z = start.ledger.mechanism.noise_multiplier
            console = Progress(setup.plan.steps, start.step, enabled=progress and processes.writer,
                               budget=setup.plan.budget, description=f"DP-SGD z={z:.3g}")
            with interruptible() as interrupted:
                state, stop_reason = _steps(setup, start, log, checkpoints, console, interrupted)
                console.close()
                _checkpoint(checkpoints, start.ledger, state)
            if stop_reason == "interrupted":
                raise Interrupted(interrupted.signal or signal.SIGTERM, run.path, start.ledger.steps)
            checkpoints.close()
            return _report(setup, run, start, state, stop_reason, log, console, seconds=time.perf_counter() - started)


class _Setup(NamedTuple):
    """What the plan stage derives from the config: the data, the plan, the model, the
    optimizer, the evaluator, the device mesh (None on one device), the microbatch
    schedule of each device's share of the batch, and the processes of the run."""

    config: Config
    plan: Plan
    train_set: Dataset
    eval_set: Dataset
    model: Any
    optimizer: optax.GradientTransformation
    evaluator: Callable
    mesh: Any
    schedule: clipping.Schedule
    processes: Processes


def _setup(config: Config, processes: Processes) -> _Setup:
    """The plan stage: validates the config against its data and plans the mechanism
    (pure, writes nothing); the mesh spans the devices of every process."""
    train_set, eval_set = load_dataset(config, config.train_split), load_dataset(config, config.eval_split)
    mesh = jax.make_mesh((jax.device_count(),), ("data",)) if jax.device_count() > 1 else None
    plan = make_plan(config, len(train_set), train_set.image_shape, devices=jax.device_count())
    if plan.mechanism.inclusion_probability >= 1 and processes.writer:
        warnings.warn(NO_AMPLIFICATION, stacklevel=3)
    model = get_model(config.model, train_set.num_classes, **config.model_options)
    evaluator = make_evaluator(model, eval_set.num_classes, config.input_normalization)
    schedule = _schedule(config, plan.mechanism.sampling.padded_size // jax.device_count())
    return _Setup(config, plan, train_set, eval_set, model, make_optimizer(config), evaluator, mesh, schedule,
                  processes)


def _schedule(config: Config, device_batch: int) -> clipping.Schedule:
    """The config's microbatches (unrolled on CPU), else the cost model's
    (:func:`patchdp.clipping.default_schedule`) for ``device_batch`` examples per device."""
    if config.microbatch_size is None:
        return clipping.default_schedule(device_batch)
    return clipping.Schedule(config.microbatch_size, jax.default_backend() == "cpu", "config: microbatch_size")


class _Start(NamedTuple):
    """Where the steps begin: the train state, the ledger, the seeds and the step."""

    state: TrainState
    ledger: accounting.Ledger
    seeds: Seeds
    step: int


def _start(setup: _Setup, run: RunDirectory, checkpoints: Checkpointer, resume: bool) -> _Start:
    """The state stage: fresh seeds (process 0's) and parameters, or the run's checkpoint
    to resume (restored in every process, into the mesh's replicated layout)."""
    plan, config, processes = setup.plan, setup.config, setup.processes
    seeds = Seeds.from_dict(json.loads(processes.from_writer(lambda: json.dumps(Seeds.create(config.seed).to_dict()))))
    h, w = plan.mechanism.crop.output_size
    dummy = jnp.zeros((1, h, w, plan.mechanism.image_shape[2]))
    params = jax.jit(setup.model.init)(seeds.init_key(), dummy)["params"]
    if config.pretrained:
        params = merge_params(params, load_params(config.pretrained))
    state = TrainState.create(params, setup.optimizer)
    if setup.mesh is not None:
        state = replicate(state, setup.mesh)
    start = _Start(state, plan.mechanism.ledger(budget_epsilon=plan.budget), seeds, 0)
    if resume:
        start = _Start(*resume_point(run, checkpoints, start.state, plan.mechanism, plan.budget))
        processes.agree("checkpoint restored (step and ledger)", start.ledger.to_dict())
    return start


def _steps(setup: _Setup, start: _Start, log: MetricsLog, checkpoints: Checkpointer, console: Progress,
           interrupted: Callable[[], bool]) -> tuple[TrainState, str]:
    """The steps stage: steps ``start.step …`` T − 1, each recorded by the ledger; returns
    the state and why the steps stopped (completed, budget, poisson overflow, interrupted)."""
    config, plan, ledger, state = setup.config, setup.plan, start.ledger, start.state
    step_fn = make_train_step(  # the ledger's mechanism: the one its next steps are recorded for
        make_loss(setup.model, setup.train_set.task, config.input_normalization), setup.optimizer, ledger.mechanism,
        flip=config.flip, label_fill=IGNORE_LABEL, microbatch_size=setup.schedule.microbatch_size,
        unroll=setup.schedule.unroll, mesh=setup.mesh)
    step_key = start.seeds.step_keys()
    console.compiling()
    with Prefetcher(functools.partial(_load_batch, setup, start.seeds), range(start.step, plan.steps)) as batches:
        for t in range(start.step, plan.steps):
            if setup.processes.anyone(interrupted()):  # several processes stop after the same step
                return state, "interrupted"
            if plan.budget is not None and not ledger.can_step():
                return state, "budget"
            try:
                batch = next(batches)
            except sampling.BatchOverflowError as error:  # Poisson batch too large: stop, never truncate
                console.write(f"patchdp: {error}")
                return state, "poisson overflow"
            state, step_metrics = step_fn(state, batch, step_key(t))
            ledger.step()
            done, values, epsilon = t + 1, {}, None
            if done % config.log_every == 0 or done == plan.steps:
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                log.write("train", done, **values)
            if done % config.epsilon_every == 0:
                epsilon = ledger.epsilon()
                log.write("epsilon", done, epsilon=epsilon)
            console.update(done, loss=values.get("loss"), clipped=values.get("clipped_fraction"), epsilon=epsilon)
            if config.eval_every and done % config.eval_every == 0 and done < plan.steps:
                _evaluate(setup, log, console, state.params, done)
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                _checkpoint(checkpoints, ledger, state)
    return state, "completed"


def _load_batch(setup: _Setup, seeds: Seeds, step: int) -> Batch:
    """Batch ``step``: a pure function of the seeds and the step (on the devices). With
    several processes, each loads the rows its devices hold of the same global batch."""
    chosen = setup.plan.mechanism.sampling.sample(seeds.sampling, step)
    if setup.processes.count > 1:
        examples = examples_sharding(setup.mesh)
        rows = local_rows(examples, len(chosen.indices))
        data = setup.train_set.get_batch(chosen.indices[rows])
        return assemble(examples, Batch(data["image"], data["label"], chosen.mask[rows]))
    data = setup.train_set.get_batch(chosen.indices)
    batch = Batch(data["image"], data["label"], chosen.mask)
    return shard_batch(batch, setup.mesh) if setup.mesh is not None else jax.device_put(batch)


def _checkpoint(checkpoints: Checkpointer, ledger: accounting.Ledger, state: TrainState) -> None:
    """Saves ``state`` with the ledger that accounts for it, as the ledger's step."""
    checkpoints.save(ledger.steps, state, {"step": ledger.steps, "ledger": ledger.to_dict()})


def _evaluate(setup: _Setup, log: MetricsLog, console: Progress, params, step: int) -> tuple[dict, np.ndarray]:
    """Scores (logged as ``eval``) and the confusion matrix of ``params`` on the eval split
    (with several processes, each evaluates its share on one of its devices)."""
    config, processes = setup.config, setup.processes
    if processes.count > 1:  # a global array: a copy on this process's own device
        params = jax.device_put(jax.device_get(params), jax.local_devices()[0])
    confusion = evaluate(setup.evaluator, params, setup.eval_set, batch_size=config.eval_batch_size,
                         count=config.eval_examples, processes=processes)
    scores = metrics.scores(confusion, setup.eval_set.task)
    log.write("eval", step, **scores)
    console.note(f"patchdp: evaluation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores, confusion


def _report(setup: _Setup, run: RunDirectory, start: _Start, state: TrainState, stop_reason: str, log: MetricsLog,
            console: Progress, *, seconds: float) -> dict:
    """The report stage: the final evaluation, ``report.json``, ``report.md`` and the figures."""
    ledger, config = start.ledger, setup.config
    if ledger.steps % config.epsilon_every:
        log.write("epsilon", ledger.steps, epsilon=ledger.epsilon())
    scores, confusion = _evaluate(setup, log, console, state.params, ledger.steps)
    result = final_report(config, setup.plan, ledger, stop_reason=stop_reason, scores=scores,
                          secure=start.seeds.sampling.secure, seconds=seconds)
    result["run_dir"], result["schedule"] = str(run.path), setup.schedule._asdict()
    if setup.processes.writer:
        _write_outputs(run.path, result, setup.plan, log.read(), setup.evaluator, jax.device_get(state.params),
                       setup.eval_set, config, confusion)
    return result


@contextlib.contextmanager
def _writing(run: RunDirectory, ledger: accounting.Ledger, checkpoints: Checkpointer):
    """Turns a failed write into one :class:`RunDirectoryError` line saying how to continue."""
    try:
        yield
    except OSError as error:
        where = error.filename or run.path
        saved = checkpoints.latest_step()
        how = (f"continue from step {saved} with `{resume_command(run.path)}`" if saved is not None else
               "start again in a run directory you can write (no checkpoint was saved)")
        raise RunDirectoryError(f"cannot write {where} ({error.strerror or error}); training stopped at step "
                                f"{ledger.steps}. Make {run.path} writable and {how}.") from None


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
    p_star = "p*" if m.patch.count == 1 else f"p*_{m.patch.count}"
    figures["inclusion probability p(t)"] = plots.inclusion_heatmap(
        inclusion_map(m.image_shape, m.crop, m.patch), run_dir / "inclusion.png",
        title=f"{title}, padding {m.crop.padding}; {p_star} = {m.inclusion_probability:.4g}")
    write_atomic(run_dir / "report.json", json.dumps(result, indent=1, allow_nan=False))
    counted = "pixels" if eval_set.task == "segmentation" else "images"
    lines = ["", f"## Per class (final evaluation; {counted} labelled as / predicted as the class)", "",
             f"| class | IoU | labelled {counted} | predicted {counted} |", "|---|---|---|---|"]
    lines += [f"| {k} | {report.shown(c, 'iou', '.4f')} | {c['labelled']} | {c['predicted']} |"
              for k, c in result["per_class"].items()]
    lines += ["", "## Figures", ""]
    lines += [f"![{caption}]({path.relative_to(run_dir)})\n" for caption, path in figures.items()]
    write_atomic(run_dir / "report.md", report.markdown(result) + "\n".join(lines) + "\n")
