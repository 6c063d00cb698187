"""Figures H and I: the paper's training comparison. At the same target ε, noise calibrated
by patch-level accounting (w = q·p*) against noise calibrated by image-level accounting
(w = q), everything else equal; the evaluation score (mIoU or accuracy) against ε for both,
mean ± std over seeds. With ``--augmentation-noise SIGMA`` a third arm, the paper's
comparator: Gaussian augmentation (N(0, SIGMA²) on every pixel of each sampled image,
pixel units 0–255), its noise calibrated at the same target ε by the Gaussian-augmentation
accountant (w = q·TV, TV = 2Φ(Δ/2σ) − 1, Δ = sqrt(patch area · channels)·255), which
takes no credit for the crops.

    .venv/bin/python experiments/train_comparison.py                 # embedded scale, CPU (see experiments/README.md)
    .venv/bin/python experiments/train_comparison.py --config cityscapes_deeplabv3plus \
        --paper-grid --seeds 0 1 2 3                                  # figure H, Cityscapes (accelerator)
    .venv/bin/python experiments/train_comparison.py --augmentation-noise 500   # plus the comparator arm

Every run trains ``--config`` (default: the demo's, ``patchdp/configs/demo.toml``, on the
embedded synthetic scenes) with only ``target_epsilon``, ``accounting`` and ``seed``
changed (and ``steps`` with ``--steps``), so both arms spend the same ε at the same δ:
patch-level DP-SGD for the patch-level arm, standard image-level DP-SGD for the other
(whose guarantee is the stronger one; the point is what each costs in accuracy). The
paper-setting configs (``cityscapes_*``, ``a2d2_*``, ``mnist_*``, ``dtd_*``) carry the
paper's step count, ceil(N/B) per epoch, as ``steps``. Seeds are explicit, so the runs are
reproducible and not secure.

Writes ``train_comparison[_CONFIG].{csv,json,png}`` into ``--output-dir`` (default
``experiments/results/``); each run's directory (report, plots, checkpoints) goes to
``<output-dir>/train_comparison_runs/``. An interrupted sweep continues where it stopped:
finished runs are read back, unfinished ones resume. ``--quick`` (seconds, for the
tests): one ε (2), one seed, 2 steps of a width-1 U-Net on 256 scenes of 32×32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax

# this folder (common.py) and the checkout holding it (its patchdp, not an installed one)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, progress, write_rows  # noqa: E402

from patchdp import plots  # noqa: E402
from patchdp.config import Config, config_path  # noqa: E402
from patchdp.run_dir import RunDirectory  # noqa: E402
from patchdp.trainer import train  # noqa: E402

ACCOUNTINGS = ("patch", "image")
PAPER_EPSILONS = (1, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100)  # figure H's target ε grid
QUICK = {"steps": 2, "batch_size": 16, "model_options": {"width": 1}, "eval_examples": 16,
         "dataset_options": {"num_examples": 256, "image_size": 32}}


def run(config: Config, output_dir: Path, epsilon: float, accounting: str, seed: int) -> dict:
    """One training run; its report, read back when the run had already finished. The
    Gaussian-augmentation arm uses the config's ``augmentation_noise``."""
    length = f"T{config.steps}" if config.steps else f"{config.epochs:g}epochs"
    arm = f"{accounting}{config.augmentation_noise:g}" if accounting == "gaussian_augmentation" else accounting
    run_dir = output_dir / "train_comparison_runs" / f"{config.name}-{length}-eps{epsilon:g}-{arm}-seed{seed}"
    if (run_dir / "report.json").exists():
        return json.loads((run_dir / "report.json").read_text())
    changed = config.replace(target_epsilon=epsilon, noise_multiplier=None, accounting=accounting, seed=seed,
                             augmentation_noise=config.augmentation_noise if accounting == "gaussian_augmentation"
                             else None)
    return train(changed, run_dir=run_dir, resume=RunDirectory(run_dir).holds_checkpoints(), progress=False)


def row(report: dict, epsilon: float, accounting: str, seed: int) -> dict:
    p = report["privacy"]
    return {"target_epsilon": epsilon, "delta": p["delta"], "accounting": accounting, "seed": seed,
            "noise_multiplier": p["noise_multiplier"], "steps": report["steps"],
            "epsilon_patch": p["epsilon_patch"], "epsilon_image": p["epsilon_image"],
            "epsilon_gaussian_augmentation": p.get("epsilon_gaussian_augmentation"),
            **report["scores"], "seconds": report["seconds"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo", help="config file or shipped config name (default: demo)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="target ε values")
    parser.add_argument("--paper-grid", action="store_true",
                        help=f"the paper's target ε grid {PAPER_EPSILONS} instead of --epsilons")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (one run per seed and arm)")
    parser.add_argument("--steps", type=int, help="override the config's number of steps (shorter embedded runs)")
    parser.add_argument("--augmentation-noise", type=float, metavar="SIGMA",
                        help="add the Gaussian-augmentation arm with pixel noise std SIGMA (units 0–255)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help=f"where to write (default {RESULTS})")
    parser.add_argument("--quick", action="store_true", help="a few seconds' version (for the tests)")
    args = parser.parse_args(argv)
    if args.paper_grid:
        args.epsilons = [float(e) for e in PAPER_EPSILONS]
    if args.quick:
        args.epsilons, args.seeds = [2.0], [0]
    out = args.output_dir

    # Runs that share a noise multiplier (the seeds of one arm) share one compilation.
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    overrides = dict(QUICK) if args.quick else {}
    if args.steps:
        overrides["steps"] = args.steps
    if args.augmentation_noise is not None:
        overrides["augmentation_noise"] = args.augmentation_noise
    config = Config.from_toml(config_path(args.config), overrides)
    arms = ACCOUNTINGS + (("gaussian_augmentation",) if args.augmentation_noise is not None else ())
    grid = [(e, a, s) for e in args.epsilons for a in arms for s in args.seeds]
    rows = [row(run(config, out, *point), *point) for point in progress(grid, "training runs")]

    score = "miou" if "miou" in rows[0] else "accuracy"
    summary = {}
    for accounting in arms:
        for epsilon in args.epsilons:
            values = [r[score] for r in rows if r["accounting"] == accounting and r["target_epsilon"] == epsilon]
            z = next(r["noise_multiplier"] for r in rows if r["accounting"] == accounting and r["target_epsilon"] == epsilon)
            summary[accounting, epsilon] = (statistics.mean(values), statistics.pstdev(values), z)
    name = "train_comparison" if args.config == "demo" else f"train_comparison_{config.name}"
    csv = write_rows(name, rows, out)
    label = {"patch": "noise calibrated patch-level (w = q·p*)", "image": "noise calibrated image-level (w = q)",
             "gaussian_augmentation": f"Gaussian augmentation σ_aug = {args.augmentation_noise} (w = q·TV)"}
    curves = {label[a]: (args.epsilons, [summary[a, e][0] for e in args.epsilons]) for a in arms}
    errors = {label[a]: [summary[a, e][1] for e in args.epsilons] for a in arms}
    png = plots.line_plot(curves, out / f"{name}.png", xlabel=f"target ε (δ = {rows[0]['delta']:g})",
                          ylabel=score, logx=True, errors=errors,
                          title=f"{config.model} on {config.dataset}: mean ± std over {len(args.seeds)} seeds")

    print(f"{'ε':>5}  {'arm':21}  {'z':>7}  {score} (mean ± std over seeds {args.seeds})")
    for epsilon in args.epsilons:
        for accounting in arms:
            mean, std, z = summary[accounting, epsilon]
            print(f"{epsilon:5g}  {accounting:21}  {z:7.3f}  {mean:.3f} ± {std:.3f}")
    print(f"wrote {csv}, {png}")


if __name__ == "__main__":
    main()
