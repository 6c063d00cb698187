"""The ``patchdp`` command line.

    patchdp privacy    ε for patch-level vs image-level DP-SGD at a given noise
    patchdp calibrate  the noise each needs for a target ε
    patchdp inclusion  p* and a heatmap of p(t)
    patchdp train      train a model with patch-level DP-SGD from a config file (--resume RUN_DIR)
    patchdp demo       train the small U-Net on the embedded synthetic scenes, print the numbers
    patchdp export     a shareable model from a run directory (parameters, no secrets)
    patchdp data       prepare a dataset (`data prepare NAME`), or say what to download by hand
    patchdp audit      an empirical lower bound on ε from the real private step (exit 1 if it beats the claim);
                       --one-run CONFIG: from one whole training run with patch canaries

Every bad input exits with status 2 and one line on stderr saying what is wrong and how
to fix it. ``--json`` prints one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings

from patchdp import _validation, accounting, distributed, report
from patchdp.config import Config, config_path, parse_patch, parse_value
from patchdp.coverage import union_inclusion
from patchdp.inclusion import CropSpec, Patch, check_memory, image_hw, inclusion_map, inclusion_probability, map_bytes
from patchdp.mechanism import DPSGD
from patchdp.sampling import FixedSizeSampling, PoissonSampling

# Defaults of the accounting verbs: the paper's Cityscapes setting (docs/method.md, "Settings to check against") with
# noise std 2 on a clip norm of 2, i.e. z = 1.
DEFAULTS = dict(image_size="1024x2048", crop="505", padding=0, crops_per_example=1,
                patch="rect:10x10", batch_size=200, dataset_size=2975, epochs=100.0,
                sampling="fixed", noise=1.0, delta=1e-5)


IMPLAUSIBLE_P = 1e-9          # p* below this: a warning line (the crops would see only padding)
CALIBRATION_PRECISION = 1e-5  # calibrate's grid spacing is at most this fraction of the target ε
HEATMAP_BYTES = 64            # per pixel, what matplotlib takes to draw a map of p(t) (float copies, RGBA)
MAX_TARGET_EPSILON = 1000.0   # calibrate refuses larger targets: e^1000 is no privacy, and the search would crawl


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):  # no abbreviations: --epsilon must not mean --epsilon-every
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):  # one line instead of usage + message
        raise CliError(f"{message} (see `{self.prog} --help`)")


def _crop_spec(args) -> CropSpec:
    if args.crop_sizes:
        sizes, probs = [], []
        for item in args.crop_sizes.split(","):
            size, _, prob = item.partition(":")
            try:
                probs.append(float(prob))
            except ValueError:
                raise CliError(f"--crop-sizes items are HxW:PROB, got {item!r}.") from None
            sizes.append(_validation.size("crop size", size))
        output = _validation.size("--output-size", args.output_size) if args.output_size else None
        return CropSpec(sizes, probabilities=probs, padding=args.padding,
                        crops_per_example=args.crops_per_example, output_size=output)
    return CropSpec(_validation.size("--crop", args.crop), padding=args.padding,
                    crops_per_example=args.crops_per_example)


def _sampling(args):
    if args.sampling == "fixed":
        return FixedSizeSampling(batch_size=args.batch_size, dataset_size=args.dataset_size)
    return PoissonSampling(rate=args.batch_size / args.dataset_size, dataset_size=args.dataset_size)


def _steps(args, sampling) -> int:
    if args.steps is not None:
        if args.steps < 1:
            raise CliError(f"--steps must be >= 1, got {args.steps}.")
        return args.steps
    return sampling.steps_for_epochs(args.epochs)


def _add_setting_arguments(p: argparse.ArgumentParser, accounting_args: bool = True) -> None:
    d = DEFAULTS
    g = p.add_argument_group("image, crops and patch")
    g.add_argument("--image-size", default=d["image_size"], help="H or HxW in pixels (default %(default)s)")
    g.add_argument("--crop", default=d["crop"], help="crop size C or HxW (default %(default)s)")
    g.add_argument("--crop-sizes", help="random-resized crops: HxW:PROB,HxW:PROB,... (overrides --crop)")
    g.add_argument("--output-size", help="size mixed crops are resized to (with --crop-sizes)")
    g.add_argument("--padding", type=int, default=d["padding"], help="zero padding P per side (default %(default)s)")
    g.add_argument("--crops-per-example", "-K", type=int, default=d["crops_per_example"],
                   help="K crops per example, losses averaged before clipping (default %(default)s)")
    g.add_argument("--patch", default=d["patch"],
                   help="rect:HxW, disc:D, blob:D, cluster:D[:GAP] or a .npy boolean mask (default %(default)s)")
    _add_patches_argument(g)
    if not accounting_args:
        return
    g = p.add_argument_group("training and accounting")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="B, or the expected batch for Poisson")
    g.add_argument("--dataset-size", type=int, default=d["dataset_size"], help="N")
    g.add_argument("--epochs", type=float, default=d["epochs"], help="epochs (steps = ceil(epochs / q))")
    g.add_argument("--steps", type=int, help="number of steps T (overrides --epochs)")
    g.add_argument("--sampling", choices=("fixed", "poisson"), default=d["sampling"],
                   help="fixed-size batches without replacement (q = B/N) or Poisson with rate B/N")
    g.add_argument("--delta", type=float, default=d["delta"], help="δ (default %(default)s)")
    g.add_argument("--resolution", type=float, default=accounting.DEFAULT_RESOLUTION,
                   help="PLD grid spacing in nats (default %(default)s)")
    g.add_argument("--json", action="store_true", help="print one JSON object")


def _add_patches_argument(group) -> None:
    group.add_argument("--patches", type=int, default=1, metavar="K",
                       help="protect up to K patches of that shape in one image at once (default %(default)s)")


def _patch(args) -> Patch:
    """The protected patch, up to ``--patches`` times per image."""
    return parse_patch(args.patch).up_to(args.patches)


def _mechanism(args, noise_multiplier: float) -> DPSGD:
    """The mechanism the accounting verbs describe. ε does not depend on the clip norm
    (z is in units of C), so C = 1 stands for any."""
    return DPSGD(sampling=_sampling(args), clip_norm=1.0, noise_multiplier=noise_multiplier, delta=args.delta,
                 crop=_crop_spec(args), image_shape=image_hw(_validation.size("--image-size", args.image_size)),
                 patch=_patch(args), resolution=args.resolution)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _describe(mechanism: DPSGD, steps: int, args) -> list[tuple[str, str]]:
    crop = mechanism.crop
    sizes = ", ".join(f"{h}x{w}" + (f" ({p:g})" if len(crop.sizes) > 1 else "")
                      for (h, w), p in zip(crop.sizes, crop.probabilities))
    return [
        ("image", "x".join(map(str, mechanism.image_shape))),
        ("crop", f"{sizes}, padding {crop.padding}, K = {crop.crops_per_example}"),
        ("patch", f"{mechanism.patch.name} ({mechanism.patch.area} px)"),
        ("sampling", f"{args.sampling}, batch {args.batch_size} of {args.dataset_size}"),
        ("steps T", f"{steps}"),
        ("delta", f"{mechanism.delta:g}"),
        ("resolution", f"{mechanism.resolution:.3g} nats (PLD grid spacing)"),
    ]


def _print(result: dict, rows, as_json: bool) -> None:
    """The table, or strict JSON (a value that does not exist is null, with
    ``<key>_reason`` beside it: :func:`patchdp.report.strict`)."""
    if as_json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(_table(rows))


def _warn(message: str) -> None:
    print(f"patchdp: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _warnings_as_lines():
    """Shows each distinct warning raised inside (e.g. δ > 1/N) once, as one line."""
    shown = set()

    def show(message, *_):
        if str(message) not in shown:
            shown.add(str(message))
            _warn(str(message))

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        yield


def _warn_if_no_amplification(p_star: float, image, crop: CropSpec, patch: Patch) -> None:
    if p_star >= 1:
        h, w = image[0] + 2 * crop.padding, image[1] + 2 * crop.padding
        if patch.count == 1:
            _warn(f"p* = 1: every crop hits the patch wherever it lies (crops on the {h}x{w} padded image), "
                  "so cropping gives no amplification; use a smaller crop or more padding.")
        else:
            _warn(f"p*_{patch.count} is bounded by 1 only: crops this large (on the {h}x{w} padded image) meet "
                  f"{patch.count} patches (nearly) always, so cropping gives no amplification; use a smaller crop, "
                  "more padding or fewer patches.")


def _warn_if_implausible(mechanism: DPSGD) -> None:
    if 0 < mechanism.inclusion_probability < IMPLAUSIBLE_P:
        _warn(f"p* = {mechanism.inclusion_probability:.3g} < {IMPLAUSIBLE_P:g}: a crop almost never sees the patch "
              f"(crop {mechanism.crop.sizes[0][0]}x{mechanism.crop.sizes[0][1]}, padding {mechanism.crop.padding} on "
              f"a {'x'.join(map(str, mechanism.image_shape[:2]))} image), so patch-level ε is near 0; such a "
              "model would train on padding. Check --padding and --crop.")


def _at_finest_resolution(compute, mechanism: DPSGD):
    """``compute(mechanism)`` with the finest PLD grid, from the mechanism's resolution up,
    whose composition fits in memory (:class:`patchdp.accounting.GridTooFine`); says so
    in one warning line when it had to coarsen. Returns (result, mechanism used)."""
    requested = mechanism.resolution
    while True:
        try:
            result = compute(mechanism)
            break
        except accounting.GridTooFine as error:
            if mechanism.resolution >= accounting.MAX_RESOLUTION:
                raise CliError(f"{error} (at the coarsest resolution {accounting.MAX_RESOLUTION:g}).") from None
            mechanism = mechanism.replace(resolution=min(max(error.coarser, 1.1 * mechanism.resolution),
                                                         accounting.MAX_RESOLUTION))
    if mechanism.resolution != requested:
        _warn(f"resolution {requested:g} nats needs a grid larger than memory allows; used {mechanism.resolution:.3g} "
              "nats, the finest that fits (the discretisation rounds every loss up, so ε stays an upper bound, "
              "a little looser).")
    return result, mechanism


def cmd_privacy(args) -> None:
    mechanism = _mechanism(args, args.noise)
    steps = _steps(args, mechanism.sampling)
    _warn_if_no_amplification(mechanism.inclusion_probability, mechanism.image_shape, mechanism.crop, mechanism.patch)
    _warn_if_implausible(mechanism)

    def compare(mechanism):
        ledger = mechanism.ledger()
        ledger.step(steps)  # the planned steps, recorded in a ledger of their own: the report reads ledgers
        return report.privacy_comparison(ledger)

    privacy, mechanism = _at_finest_resolution(compare, mechanism)
    _print({"mechanism": mechanism.to_dict(), **privacy}, _describe(mechanism, steps, args)
           + report.privacy_rows(privacy), args.json)


def cmd_calibrate(args) -> None:
    mechanism = _mechanism(args, 1.0)
    steps = _steps(args, mechanism.sampling)
    _warn_if_no_amplification(mechanism.inclusion_probability, mechanism.image_shape, mechanism.crop, mechanism.patch)
    _warn_if_implausible(mechanism)
    if _validation.epsilon(args.epsilon) > MAX_TARGET_EPSILON:
        raise CliError(f"target ε = {args.epsilon:g} is beyond {MAX_TARGET_EPSILON:g} nats, a bound of e^ε on the "
                       "likelihood ratio that protects nothing; calibrate for ε <= 1000 (or train without noise).")
    # Grid spacing in proportion to the target: the relative precision of z stays the same,
    # and the search stays fast for any target (ε = 1e6 needs losses of thousands of nats).
    coarsest = min(max(mechanism.resolution, args.epsilon * CALIBRATION_PRECISION), accounting.MAX_RESOLUTION)
    if coarsest > mechanism.resolution:
        _warn(f"target ε = {args.epsilon:g}: calibrating at resolution {coarsest:.3g} nats (finer grids only slow "
              f"the search for a target this large; the z found still meets ε ≤ {args.epsilon:g}).")
        mechanism = mechanism.replace(resolution=coarsest)
    needed, mechanism = _at_finest_resolution(lambda m: report.noise_comparison(m, args.epsilon, steps), mechanism)
    if needed["noise_multiplier_patch"] is None:
        raise CliError(needed["noise_multiplier_patch_reason"])
    rows = _describe(mechanism, steps, args) + [
        ("target ε", f"{args.epsilon:g}"),
        ("protected", mechanism.patch.describe()),
        ("p*  (crop hits patch)", f"{mechanism.inclusion_probability:.6g}  "
                                  f"({report.inclusion_kind(mechanism.inclusion_exact)})"),
        ("w = q·p*", f"{mechanism.effective_sampling_rate:.6g}"),
        ("noise z, patch-level", report.shown(needed, "noise_multiplier_patch", ".4f")),
        ("noise z, image-level", report.shown(needed, "noise_multiplier_image", ".4f")),
        ("ratio image / patch", f"{report.shown(needed, 'noise_ratio', '.2f')}x"),
    ]
    _print({"inclusion_probability": mechanism.inclusion_probability,
            "inclusion_probability_is": report.inclusion_kind(mechanism.inclusion_exact),
            "effective_sampling_rate": mechanism.effective_sampling_rate, **needed}, rows, args.json)


def cmd_inclusion(args) -> None:
    image = image_hw(_validation.size("--image-size", args.image_size))
    crop, patch = _crop_spec(args), _patch(args)
    if patch.count == 1:  # memory linear in the image side for rectangles; a bounded float for many crops
        p_star, kind, placements = inclusion_probability(image, crop, patch), "exact", ()
        try:
            exact, reason = str(inclusion_probability(image, crop, patch, exact=True)), None
        except ValueError as too_long:  # K crops: a fraction of millions of digits
            exact, reason, kind = None, str(too_long), "upper bound"
        result = {"protected": patch.describe(), "inclusion_probability": p_star, "inclusion_probability_exact": exact,
                  "inclusion_probability_is": kind}
        if reason:
            result["inclusion_probability_exact_reason"] = reason
        rows = [("protected", result["protected"]), ("p*", f"{p_star:.6g}"),
                ("exact", report.shown(result, "inclusion_probability_exact", "s"))]
    else:
        check_memory("searching the placements of several patches", map_bytes(image, crop, patch), image)
        bound = union_inclusion(image, crop, patch)
        p_star, kind, placements = bound.probability, report.inclusion_kind(bound.exact), bound.placements
        result = {"protected": patch.describe(), "inclusion_probability": p_star,
                  "inclusion_probability_exact": str(bound.upper), "inclusion_probability_is": kind,
                  "inclusion_probability_lower": str(bound.lower), "worst_case_placements": [list(t) for t in placements]}
        rows = [("protected", result["protected"]), (f"p*_{patch.count}", f"{p_star:.6g}  ({kind})"),
                ("exact" if bound.exact else "upper bound", result["inclusion_probability_exact"])]
        if not bound.exact:
            rows.append(("lower bound (the placements below)", f"{float(bound.lower):.6g}"))
        rows.append(("worst-case placements (row, col)" if bound.exact else "placements found (row, col)",
                     " ".join(f"({a}, {b})" for a, b in placements)))
    _warn_if_no_amplification(p_star, image, crop, patch)
    if args.heatmap:
        from patchdp import plots
        check_memory("the heatmap of p(t)", map_bytes(image, crop, patch) + HEATMAP_BYTES * image[0] * image[1], image)
        p_map = inclusion_map(image, crop, patch)
        title = f"p(t): {patch.name}, crop {args.crop}, padding {crop.padding}; p* = {p_star:.4g}"
        if patch.count > 1:
            title = f"p(t) of one {patch.name}, crop {args.crop}, padding {crop.padding}; p*_{patch.count} = {p_star:.4g}"
        try:
            result["heatmap"] = str(plots.inclusion_heatmap(p_map, args.heatmap, title=title,
                                                            placements=placements, patch_shape=patch.shape))
        except OSError as error:
            raise CliError(f"cannot write the heatmap {args.heatmap}: {error.strerror} ({error.filename}).") from None
    if args.heatmap:
        rows.append(("heatmap", result["heatmap"]))
    _print(result, rows, args.json)


def _overrides(args) -> dict:
    """The config keys given as flags (``--batch-size 32`` → {"batch_size": 32})."""
    keys = [f.name for f in dataclasses.fields(Config)]
    return {k: parse_value(getattr(args, k)) for k in keys if getattr(args, k, None) is not None}


def _add_override_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "config overrides", "Any key of a config file (documented in patchdp/config.py), as a TOML value: "
        "32, 1e-5, true, [256, 512], '{width = 8}', rect:10x10; none unsets a key.")
    for field in dataclasses.fields(Config):
        g.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, metavar="VALUE")


def cmd_train(args) -> None:
    """Trains in this process, or in this one of several (:mod:`patchdp.distributed`): then
    only process 0 prints the result, on a stdout that carries nothing else (native
    libraries' lines, e.g. gloo's "[Gloo] Rank …", go to stderr). An error ends this process
    at once (its one line, status 2; 1 for a bug or a lost peer) after telling the others,
    which stop too; an interruption stops every process at the same step, checkpointed."""
    launch = distributed.detect(args.coordinator, args.num_processes, args.process_id)
    processes = distributed.start(launch, peer_timeout=args.peer_timeout)
    if processes.count == 1:
        _print_result(args, _train(args, processes), sys.stdout)
        return
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        result = _train(args, processes)
    except BaseException as error:
        from patchdp.run_dir import Interrupted

        if isinstance(error, Interrupted):  # every process stopped after the same step and saved its checkpoint
            processes.finish()
            raise
        if isinstance(error, USER_ERRORS):
            code = _error_line(error)
        else:  # a bug, or a collective broken by a peer that died: the watchdog says which
            processes.blame_peers()
            traceback.print_exc()
            code = 1
        processes.fail()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not through jax's exit, whose shutdown barrier would wait for the others
    processes.finish()
    if processes.writer:
        _print_result(args, result, out)


def _train(args, processes: distributed.Processes) -> dict:
    from patchdp.run_dir import RunDirectory  # imported on use: jax and flax are slow to import
    from patchdp.trainer import train

    overrides = _overrides(args)
    if args.resume:
        if args.config or overrides:
            raise CliError("--resume continues a run with the config saved in its directory; "
                           "drop --config and the overrides.")
        run = RunDirectory(args.resume)
        if not run.config_file.is_file():
            raise CliError(f"{args.resume} is not a run directory (it has no config.json).")
        return train(run.read_config(), run_dir=args.resume, resume=True, processes=processes)
    if not args.config:
        raise CliError("train needs --config FILE (or the name of a shipped config, e.g. demo), or --resume RUN_DIR.")
    return train(Config.from_toml(config_path(args.config), overrides), processes=processes)


def _print_result(args, result: dict, out) -> None:
    print(json.dumps(result, allow_nan=False) if args.json else _run_table(result), file=out, flush=True)


def _run_table(result: dict, extra: list[tuple[str, str]] = ()) -> str:
    rows = list(extra)
    rows += [(name, f"{value:.4f}") for name, value in result["scores"].items()]
    rows.append(("steps", f"{result['steps']} of {result['steps_planned']} ({result['stop_reason']})"))
    if result["privacy"] is not None:
        rows += report.privacy_rows(result["privacy"], result["same_epsilon"], how=report.noise_origin(result))
    rows += [("warning", warning) for warning in result["warnings"]]
    rows += [("seed", result["seed"]), ("run directory", result["run_dir"] + "  (report.md, PNGs, checkpoints, "
                                                         "secrets.json: do not share; see patchdp.export)")]
    return _table(rows)


def cmd_demo(args) -> None:
    """`train --config demo`, then the short table the README shows."""
    from patchdp.trainer import train

    started = time.perf_counter()
    config = Config.from_toml(config_path("demo"), _overrides(args))
    if not args.json:
        h, w = config.crop_spec.sizes[0]
        print(f"patchdp demo: patch-level DP-SGD trains a {config.model} to segment the embedded synthetic\n"
              f"scenes. Each scene holds small 'sensitive' faces and plates; the protected patch ({config.patch})\n"
              f"covers any one of them. Training crops: {h}x{w}, zero padding {config.padding}.\n", flush=True)
    result = train(config)
    result["wall_seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(result, allow_nan=False))
        return
    count = config.eval_examples or "all"
    print(_run_table(result, [("wall time (incl. compilation)", f"{result['wall_seconds']:.0f} s"),
                              ("evaluated on", f"{count} validation images at full resolution")]))


def cmd_export(args) -> None:
    """A shareable model from a run directory: parameters and what rebuilds the model, no secrets."""
    from patchdp.export import export_model

    out = export_model(args.run_dir, args.out)
    _print({"export": str(out)}, [("exported", f"{out}  (params.npz, model.json; no secrets, no optimizer state)")],
           args.json)
def cmd_data(args) -> None:
    """`data prepare NAME`: see patchdp.data.prepare."""
    from patchdp.data.prepare import prepare

    print(prepare(args.name, args.data_dir, source=args.source))
def _add_audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", default="16", help="H or HxW of the canary images (default %(default)s)")
    p.add_argument("--crop", default="4", help="crop size C or HxW (default %(default)s)")
    p.add_argument("--padding", type=int, default=0, help="zero padding P per side (default %(default)s)")
    p.add_argument("--crops-per-example", "-K", type=int, default=1, help="K crops per example (default %(default)s)")
    p.add_argument("--patch", default="rect:1x1", help="the protected patch, as for `privacy` (default %(default)s)")
    _add_patches_argument(p)
    p.add_argument("--batch-size", type=int, default=4, help="B, fixed-size batches (default %(default)s)")
    p.add_argument("--dataset-size", type=int, default=4, help="N; q = B/N (default %(default)s)")
    p.add_argument("--noise", "-z", type=float, default=2.0, help="noise multiplier z (default %(default)s)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default %(default)s)")
    p.add_argument("--runs", type=int, default=20_000, help="runs with and without the canary (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the audit's runs (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("one run", "audit a whole training run once (patchdp.audit_one_run); the "
                             "one-step options above do not apply, --seed keys the canaries")
    g.add_argument("--one-run", metavar="CONFIG", help="a config file or shipped config name to train once "
                   "with patch canaries")
    g.add_argument("--canaries", type=int, default=2000, help="m, canary images (default %(default)s)")
    g.add_argument("--placement", choices=("worst", "random"), default="worst",
                   help="canaries at the worst-case placement t* or at random ones (default %(default)s)")


def cmd_audit(args) -> None:
    """Audits one real DP-SGD step with a canary patch (patchdp.audit), or with --one-run a
    whole training run (patchdp.audit_one_run): a 95% lower bound on ε next to the
    accounted patch- and image-level ε; exits 1 if the bound exceeds the claim."""
    import jax
    from patchdp.audit import audit
    from patchdp.sampling import SamplingSeed

    if args.one_run:
        return _audit_one_run(args)
    mechanism = DPSGD(sampling=FixedSizeSampling(dataset_size=args.dataset_size, batch_size=args.batch_size),
                      clip_norm=1.0, noise_multiplier=args.noise, delta=args.delta,
                      crop=CropSpec(_validation.size("--crop", args.crop), padding=args.padding,
                                    crops_per_example=args.crops_per_example),
                      image_shape=image_hw(_validation.size("--image-size", args.image_size)),
                      patch=_patch(args))
    r = audit(mechanism, runs=args.runs, key=jax.random.key(args.seed), seed=SamplingSeed.fixed(args.seed))
    result = {"epsilon_audited": r.bound.epsilon, "confidence": r.bound.confidence,
              "epsilon_patch": r.epsilon_patch, "epsilon_image": r.epsilon_image,
              "inclusion_probability": r.inclusion_probability, "runs_per_world": args.runs, "flagged": r.flagged}
    _print_audit(result, [("p*", f"{r.inclusion_probability:.6g}"), ("runs per world", f"{args.runs}")], args.json)


def _print_audit(result: dict, rows: list[tuple[str, str]], as_json: bool) -> None:
    """An audit's ``result`` (JSON) or ``rows`` + bound, claims and verdict; exit 1 if flagged."""
    rows = rows + [(f"ε audited ({result['confidence']:.0%} lower bound)", f"{result['epsilon_audited']:.4f}"),
                   ("ε patch-level (accounted)", f"{result['epsilon_patch']:.4f}"),
                   ("ε image-level", f"{result['epsilon_image']:.4f}"),
                   ("verdict", "FLAGGED: leaks more than accounted" if result["flagged"]
                    else "consistent with the accounting")]
    _print(result, rows, as_json)
    if result["flagged"]:
        raise SystemExit(1)


def _audit_one_run(args) -> None:
    import jax
    from patchdp.audit_one_run import audit_run

    r = audit_run(Config.from_toml(config_path(args.one_run)), canaries=args.canaries, key=jax.random.key(args.seed),
                  placement=args.placement)
    b = r.bound
    result = {"epsilon_audited": b.epsilon, "confidence": b.confidence, "score": b.score, "guesses_in": b.guesses_in,
              "guesses_out": b.guesses_out, "correct": b.correct, "canaries": b.canaries, "tried": b.tried,
              "epsilon_patch": r.epsilon_patch, "epsilon_image": r.epsilon_image, "delta": r.delta, "steps": r.steps,
              "inclusion_probability": r.inclusion_probability, "placement": r.placement, "flagged": r.flagged}
    _print_audit(result, [("p*", f"{r.inclusion_probability:.6g}"), ("steps, δ", f"{r.steps}, {r.delta:g}"),
                          ("canaries", f"{b.canaries} ({r.placement} placement)"),
                          ("best guess", f"{b.correct} of {b.guesses_in + b.guesses_out} right (score {b.score!r}, "
                                         f"{b.tried} tried)")], args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="patchdp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("privacy", help="ε for patch-level vs image-level DP-SGD at a given noise")
    _add_setting_arguments(p)
    p.add_argument("--noise", "-z", type=float, default=DEFAULTS["noise"],
                   help="noise multiplier z = noise std / clip norm (default %(default)s)")
    p.set_defaults(run=cmd_privacy)
    p = sub.add_parser("calibrate", help="noise needed for a target ε, patch-level vs image-level")
    _add_setting_arguments(p)
    p.add_argument("--epsilon", "-e", type=float, required=True, help="target ε")
    p.set_defaults(run=cmd_calibrate)
    p = sub.add_parser("inclusion", help="worst-case inclusion probability p* and a heatmap of p(t)")
    _add_setting_arguments(p, accounting_args=False)
    p.add_argument("--heatmap", help="write a PNG heatmap of p(t) here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_inclusion)
    p = sub.add_parser("train", help="train a model with patch-level DP-SGD from a config file")
    p.add_argument("--config", help="a TOML config file, or the name of a shipped config (demo, "
                   "cityscapes_deeplabv3plus, mnist_resnet18, ...)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    p.add_argument("--json", action="store_true", help="print the final report as one JSON object")
    g = p.add_argument_group(
        "several processes", "A TPU pod, or a SLURM (srun) or Open MPI (mpirun) job of several tasks, is found "
        "without these; elsewhere run the same command in every process with all three (or the environment "
        "variables PATCHDP_COORDINATOR, PATCHDP_NUM_PROCESSES, PATCHDP_PROCESS_ID).")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (it listens on PORT)")
    g.add_argument("--num-processes", metavar="N", help="the number of processes of the run")
    g.add_argument("--process-id", metavar="I", help="this process's index, 0 … N-1")
    g.add_argument("--peer-timeout", metavar="SECONDS", type=float, default=distributed.PEER_TIMEOUT_S,
                   help="a process not heard from for this long stops the others (default %(default)g)")
    _add_override_arguments(p)
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("demo", help="train the small U-Net on the embedded synthetic scenes (~2 minutes on a CPU)")
    p.add_argument("--json", action="store_true", help="print the final report as one JSON object")
    _add_override_arguments(p)
    p.set_defaults(run=cmd_demo)
    p = sub.add_parser("export", help="a shareable model from a run directory (parameters, no secrets)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by train or demo")
    p.add_argument("out", metavar="OUT", help="folder to write params.npz and model.json into")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_export)
    from patchdp.data.prepare import NAMES
    p = sub.add_parser("data", help="prepare a dataset, or say what to download by hand where a licence requires it")
    p.add_argument("action", choices=("prepare",))
    p.add_argument("name", choices=NAMES)
    p.add_argument("--data-dir", help="tfds data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets); a2d2: its folder")
    p.add_argument("--source", help="a2d2 only: the folder camera_lidar_semantic.tar was extracted to")
    p.set_defaults(run=cmd_data)
    p = sub.add_parser("audit", help="empirical lower bound on the ε of one real DP-SGD step (canary patch)")
    _add_audit_arguments(p)
    p.set_defaults(run=cmd_audit)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop's steps (which handle it themselves: patchdp.run_dir.interruptible)."""

    exit_status = 128 + signal.SIGTERM


@contextlib.contextmanager
def _sigterm_ends_cleanly():
    """Within the block SIGTERM raises :class:`_Terminated`, which :func:`main` turns into one line."""
    def terminate(signum, frame):
        raise _Terminated("interrupted by SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with _warnings_as_lines(), _sigterm_ends_cleanly():
            args.run(args)
    except USER_ERRORS as err:
        return _error_line(err)
    except KeyboardInterrupt as err:  # patchdp.run_dir.Interrupted: a run that saved its checkpoint says how to go on
        print(f"patchdp: {err or 'interrupted'}", file=sys.stderr)
        return getattr(err, "exit_status", 130)
    return 0


USER_ERRORS = (CliError, ValueError, OSError, distributed.DistributedError)


def _error_line(err: BaseException) -> int:
    """Prints a user error as one line on stderr; returns the exit status, 2."""
    if isinstance(err, OSError):  # a file that cannot be read or written (or a run directory that became read-only)
        err = f"{err.filename}: {err.strerror or err}" if err.filename else str(err)
    print(f"patchdp: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
