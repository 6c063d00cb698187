"""The ``patchdp`` command line.

    patchdp privacy    ε for patch-level vs image-level DP-SGD at a given noise
    patchdp calibrate  the noise each needs for a target ε
    patchdp inclusion  p* and a heatmap of p(t)
    patchdp train      train a model with patch-level DP-SGD from a config file (--resume RUN_DIR)
    patchdp demo       train the small U-Net on the embedded synthetic scenes, print the numbers
    patchdp export     a shareable model from a run directory (parameters, no secrets)
    patchdp data       prepare a dataset (`data prepare NAME`), or say what to download by hand
    patchdp audit      an empirical lower bound on ε from the real private step (exit 1 if it beats the claim)

Every bad input exits with status 2 and one line on stderr saying what is wrong and how
to fix it. ``--json`` prints one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

from patchdp import _validation, accounting, report
from patchdp.config import Config, config_path, parse_patch, parse_value
from patchdp.inclusion import CropSpec, image_hw, inclusion_map, inclusion_probability
from patchdp.mechanism import DPSGD
from patchdp.sampling import FixedSizeSampling, PoissonSampling

# Defaults of the accounting verbs: the paper's Cityscapes setting (docs/method.md, "Settings to check against") with
# noise std 2 on a clip norm of 2, i.e. z = 1.
DEFAULTS = dict(image_size="1024x2048", crop="505", padding=0, crops_per_example=1,
                patch="rect:10x10", batch_size=200, dataset_size=2975, epochs=100.0,
                sampling="fixed", noise=1.0, delta=1e-5)


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


def _mechanism(args, noise_multiplier: float) -> DPSGD:
    """The mechanism the accounting verbs describe. ε does not depend on the clip norm
    (z is in units of C), so C = 1 stands for any."""
    return DPSGD(sampling=_sampling(args), clip_norm=1.0, noise_multiplier=noise_multiplier, delta=args.delta,
                 crop=_crop_spec(args), image_shape=image_hw(_validation.size("--image-size", args.image_size)),
                 patch=parse_patch(args.patch), resolution=args.resolution)


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


def _warn_if_no_amplification(p_star: float, image, crop: CropSpec) -> None:
    if p_star >= 1:
        h, w = image[0] + 2 * crop.padding, image[1] + 2 * crop.padding
        _warn(f"p* = 1: every crop hits the patch wherever it lies (crops on the {h}x{w} padded image), "
              "so cropping gives no amplification; use a smaller crop or more padding.")


def cmd_privacy(args) -> None:
    mechanism = _mechanism(args, args.noise)
    steps = _steps(args, mechanism.sampling)
    _warn_if_no_amplification(mechanism.inclusion_probability, mechanism.image_shape, mechanism.crop)
    ledger = mechanism.ledger()
    ledger.step(steps)  # the planned steps, recorded in a ledger of their own: the report reads ledgers
    privacy = report.privacy_comparison(ledger)
    _print({"mechanism": mechanism.to_dict(), **privacy}, _describe(mechanism, steps, args)
           + report.privacy_rows(privacy), args.json)


def cmd_calibrate(args) -> None:
    mechanism = _mechanism(args, 1.0)
    steps = _steps(args, mechanism.sampling)
    _warn_if_no_amplification(mechanism.inclusion_probability, mechanism.image_shape, mechanism.crop)
    needed = report.noise_comparison(mechanism, args.epsilon, steps)
    if needed["noise_multiplier_patch"] is None:
        raise CliError(needed["noise_multiplier_patch_reason"])
    rows = _describe(mechanism, steps, args) + [
        ("target ε", f"{args.epsilon:g}"),
        ("p*  (crop hits patch)", f"{mechanism.inclusion_probability:.6g}"),
        ("w = q·p*", f"{mechanism.effective_sampling_rate:.6g}"),
        ("noise z, patch-level", report.shown(needed, "noise_multiplier_patch", ".4f")),
        ("noise z, image-level", report.shown(needed, "noise_multiplier_image", ".4f")),
        ("ratio image / patch", f"{report.shown(needed, 'noise_ratio', '.2f')}x"),
    ]
    _print({"inclusion_probability": mechanism.inclusion_probability,
            "effective_sampling_rate": mechanism.effective_sampling_rate, **needed}, rows, args.json)


def cmd_inclusion(args) -> None:
    image = image_hw(_validation.size("--image-size", args.image_size))
    crop, patch = _crop_spec(args), parse_patch(args.patch)
    p_star = inclusion_probability(image, crop, patch)
    _warn_if_no_amplification(p_star, image, crop)
    result = {"inclusion_probability": p_star,
              "inclusion_probability_exact": str(inclusion_probability(image, crop, patch, exact=True))}
    if args.heatmap:
        from patchdp import plots
        p_map = inclusion_map(image, crop, patch)
        title = f"p(t): {patch.name}, crop {args.crop}, padding {crop.padding}; p* = {p_star:.4g}"
        try:
            result["heatmap"] = str(plots.inclusion_heatmap(p_map, args.heatmap, title=title))
        except OSError as error:
            raise CliError(f"cannot write the heatmap {args.heatmap}: {error.strerror} ({error.filename}).") from None
    rows = [("p*", f"{p_star:.6g}"), ("exact", result["inclusion_probability_exact"])]
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
    from patchdp.trainer import train  # imported on use: jax and flax are slow to import

    overrides = _overrides(args)
    if args.resume:
        if args.config or overrides:
            raise CliError("--resume continues a run with the config saved in its directory; "
                           "drop --config and the overrides.")
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise CliError(f"{args.resume} is not a run directory (it has no config.json).")
        result = train(Config.from_dict(json.loads(saved.read_text())), run_dir=args.resume, resume=True)
    else:
        if not args.config:
            raise CliError("train needs --config FILE (or the name of a shipped config, e.g. demo), or --resume RUN_DIR.")
        result = train(Config.from_toml(config_path(args.config), overrides))
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(_run_table(result))


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
    p.add_argument("--batch-size", type=int, default=4, help="B, fixed-size batches (default %(default)s)")
    p.add_argument("--dataset-size", type=int, default=4, help="N; q = B/N (default %(default)s)")
    p.add_argument("--noise", "-z", type=float, default=2.0, help="noise multiplier z (default %(default)s)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default %(default)s)")
    p.add_argument("--runs", type=int, default=20_000, help="runs with and without the canary (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the audit's runs (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_audit(args) -> None:
    """Audits one real DP-SGD step with a canary patch (patchdp.audit): a 95% lower bound on
    ε next to the accounted patch- and image-level ε; exits 1 if the bound exceeds the claim."""
    import jax
    from patchdp.audit import audit
    from patchdp.sampling import SamplingSeed

    mechanism = DPSGD(sampling=FixedSizeSampling(dataset_size=args.dataset_size, batch_size=args.batch_size),
                      clip_norm=1.0, noise_multiplier=args.noise, delta=args.delta,
                      crop=CropSpec(_validation.size("--crop", args.crop), padding=args.padding,
                                    crops_per_example=args.crops_per_example),
                      image_shape=image_hw(_validation.size("--image-size", args.image_size)),
                      patch=parse_patch(args.patch))
    r = audit(mechanism, runs=args.runs, key=jax.random.key(args.seed), seed=SamplingSeed.fixed(args.seed))
    result = {"epsilon_audited": r.bound.epsilon, "confidence": r.bound.confidence,
              "epsilon_patch": r.epsilon_patch, "epsilon_image": r.epsilon_image,
              "inclusion_probability": r.inclusion_probability, "runs_per_world": args.runs, "flagged": r.flagged}
    rows = [("p*", f"{r.inclusion_probability:.6g}"), ("runs per world", f"{args.runs}"),
            (f"ε audited ({r.bound.confidence:.0%} lower bound)", f"{r.bound.epsilon:.4f}"),
            ("ε patch-level (accounted)", f"{r.epsilon_patch:.4f}"), ("ε image-level", f"{r.epsilon_image:.4f}"),
            ("verdict", "FLAGGED: leaks more than accounted" if r.flagged else "consistent with the accounting")]
    _print(result, rows, args.json)
    if r.flagged:
        raise SystemExit(1)


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


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with _warnings_as_lines():
            args.run(args)
    except (CliError, ValueError) as err:
        print(f"patchdp: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file that cannot be read or written (or a run directory that became read-only)
        message = f"{err.filename}: {err.strerror or err}" if err.filename else str(err)
        print(f"patchdp: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
