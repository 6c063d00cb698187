"""Empirical audit of the patch-level guarantee: audited lower bound vs accounted ε.

    .venv/bin/python experiments/audit.py [--runs 200000] [--quick] [--output-dir DIR]
    .venv/bin/python experiments/audit.py --one-run [--seeds 20] [--quick] [--output-dir DIR]

**Multi-run (default).**
One DP-SGD step of the real jitted ``make_train_step`` on the canary model of
``patchdp.audit`` (16×16 images, a 1×1 canary patch at the worst-case placement,
batch 4 of N = 4 so q = 1 and all amplification comes from the crop, clip 1, z = 2,
δ = 1e-5), for crops 4, 6, 8 and 16 (p* = 0.095, 0.30, 0.79, 1). Each setting: RUNS
runs with and RUNS without the canary, the 95%-confidence lower bound on ε, against
the accounted patch-level ε (w = q·p*) and the image-level ε of the same noise.

Two deliberately broken mechanisms, accounted as crop 4 (ε = 1.63):
- "crop ignored": the step crops the whole image, so the patch is always seen
  (the ε it really has is the image-level one, 4.38);
- "half noise": the step adds noise std z·C/2 (really ε = 6.49).
The audit flags a mechanism when its lower bound exceeds the accounted ε. Beside each
row: the ε of the mechanism really run (``epsilon_true``) and the best bound RUNS runs
can give on it at this δ (``epsilon_ceiling``, ``patchdp.audit.audit_ceiling``).

Writes audit.{png,csv,json}.

**One run (``--one-run``, patchdp.audit_one_run).** The embedded demo (synthetic 64×64
scenes, 4096 images, crop C + 8 px padding, 7×7 patch, batch 128, 400 steps, noise
calibrated for patch-level ε = 2 at δ = 1e-5) for crops 16, 24, 32 (p* = 0.115, 0.277,
0.601), 2000 patch canaries at the worst-case placement, trained ONCE per row:
``--seeds`` honest runs at crop 16 (``--other-seeds`` at 24 and 32), and at crop 16 one
run of each deliberately broken step, held against the claim of the honest one: noise off, noise z/4, and a crop that always
contains the patch (the whole 64×64 image, p = 1, while the claim uses the real p*). The
U-Net has width 2 instead of the demo's 8 (the canary coordinates, hence the audit, do not
depend on the model: a crop that meets a canary contributes exactly C·e_i); one row runs
the demo's own width 8 for its wall time. Beside each crop: the multi-run auditor
(``patchdp.audit``, one step of the same mechanism, ``--runs`` runs per world) and its own
one-step claim. Writes audit_one_run.{png,csv,json}. At this q = 1/32 the crop that always
contains the patch is seen ~12 times per canary through noise z = 1.28 per step: too weak
a signal for m = 2000 guesses (the demo's ε = 2 at δ = 1e-5 comes from rare hits, which
one run cannot see). So a second setting (``--part full-batch``) audits it where the
composition is Gaussian-like: full batches, N = B = 1024 (q = 1), 100 steps, crop 16,
noise for ε = 2, m = 1024 canaries; one honest run and one with the crop that always
contains the patch (audit_one_run_full_batch.{csv,json}).

``--quick``: a few seconds' version for the tests (fewer runs; one run: 32×32 scenes,
512 images, 30 steps, crop 8, one honest seed, no broken step: tests/test_audit_one_run.py
runs the noise-free one).
A honest row whose lower bound exceeds its accounted ε is a bug (or a 5% event): the
script exits non-zero.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax

# this folder (common.py) and the checkout holding it (its patchdp, not an installed one)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, write_rows  # noqa: E402
from patchdp import plots  # noqa: E402
from patchdp.audit import audit, audit_ceiling, canary_step  # noqa: E402
from patchdp.audit_one_run import audit_run  # noqa: E402
from patchdp.config import Config, config_path  # noqa: E402
from patchdp.inclusion import CropSpec, Patch  # noqa: E402
from patchdp.mechanism import DPSGD  # noqa: E402
from patchdp.sampling import FixedSizeSampling, SamplingSeed  # noqa: E402

IMAGE = (16, 16)
CROPS = (4, 6, 8, 16)
BROKEN_CROP = 4
Z = 2.0
ACCOUNTED = DPSGD(sampling=FixedSizeSampling(batch_size=4, dataset_size=4), clip_norm=1.0, noise_multiplier=Z,
                  delta=1e-5, crop=CropSpec(BROKEN_CROP), image_shape=IMAGE, patch=Patch.rectangle(1))
DELTA = ACCOUNTED.delta

ONE_RUN_CROPS = (16, 24, 32)
CANARIES = 2000
DEMO_WIDTH, AUDIT_WIDTH = 8, 2
BROKEN = {  # claimed mechanism -> the step really run
    "noise off": lambda m: m.replace(noise_multiplier=0.0),
    "noise z/4": lambda m: m.replace(noise_multiplier=m.noise_multiplier / 4),
    "crop contains patch": lambda m: m.replace(crop=CropSpec(m.image_shape[:2])),  # whole image: p = 1
}
FULL_BATCH = {"dataset_options": {"num_examples": 1024}, "batch_size": 1024, "steps": 100, "crop": 16,
              "model_options": {"width": AUDIT_WIDTH}}  # q = 1: the crop is the only amplification
QUICK = {"dataset_options": {"num_examples": 512, "image_size": 32}, "padding": 0, "steps": 30,
         "target_epsilon": 1.0, "model_options": {"width": 1}}


def setting(name, crop, runs, index, *, running=None):
    """One audit of the step of ``running`` (default: the accounted mechanism itself)
    against the claim of the mechanism with crop ``crop``."""
    start = time.perf_counter()
    accounted = ACCOUNTED.replace(crop=CropSpec(crop))
    running = running or accounted
    result = audit(accounted, runs=runs, key=jax.random.key(index), seed=SamplingSeed.fixed(index),
                   step=canary_step(running))
    row = dict(mechanism=name, crop=crop, inclusion_probability=result.inclusion_probability,
               epsilon_audited=result.bound.epsilon, epsilon_patch=result.epsilon_patch,
               epsilon_image=result.epsilon_image, flagged=result.flagged, runs_per_world=runs,
               confidence=result.bound.confidence, threshold=result.bound.threshold,
               direction=result.bound.direction, tpr_low=result.bound.tpr_low, fpr_high=result.bound.fpr_high,
               seconds=time.perf_counter() - start)
    row["epsilon_true"] = running.epsilon(1)  # what the step really does, accounted
    row["epsilon_ceiling"] = audit_ceiling(running.noise_multiplier, running.effective_sampling_rate, DELTA, runs)
    print(f"  {name:>12}  crop {crop:>2}  p*={row['inclusion_probability']:.4f}  "
          f"audited ≥ {row['epsilon_audited']:.3f} (ceiling {row['epsilon_ceiling']:.3f})  ε_patch={row['epsilon_patch']:.3f}  "
          f"ε_image={row['epsilon_image']:.3f}  {'FLAGGED' if row['flagged'] else 'ok'}  ({row['seconds']:.0f} s)",
          flush=True)
    return row


def multi_run(runs: int, output_dir: Path) -> list[dict]:
    """The one-step audits of the module docstring; writes audit.{png,csv,json}."""
    start = time.perf_counter()
    rows = [setting("honest", c, runs, i) for i, c in enumerate(CROPS)]
    rows.append(setting("crop ignored", BROKEN_CROP, runs, 10, running=ACCOUNTED.replace(crop=CropSpec(IMAGE))))
    rows.append(setting("half noise", BROKEN_CROP, runs, 11, running=ACCOUNTED.replace(noise_multiplier=Z / 2)))

    honest = rows[:len(CROPS)]
    p = [r["inclusion_probability"] for r in honest]
    curves = {"accounted, patch-level": (p, [r["epsilon_patch"] for r in honest]),
              "accounted, image-level": (p, [r["epsilon_image"] for r in honest]),
              "audited lower bound (95%)": (p, [r["epsilon_audited"] for r in honest]),
              f"best audit possible with {runs} runs": (p, [r["epsilon_ceiling"] for r in honest])}
    for row in rows[len(CROPS):]:
        curves[f"audited: {row['mechanism']} (accounted as crop {BROKEN_CROP})"] = (
            [row["inclusion_probability"]], [row["epsilon_audited"]])
    png = plots.line_plot(curves, output_dir / "audit.png", xlabel="p* (crops 4, 6, 8, 16 of 16×16)",
                          ylabel=f"ε at δ = {DELTA:g}",
                          title=f"one step, q = 1, z = {Z:g}: audit vs accounting ({runs} runs/world)")
    total = time.perf_counter() - start
    for row in rows:
        row["total_seconds"] = total
    print(f"wrote {png} and {write_rows('audit', rows, output_dir)}  ({total:.0f} s)")
    return honest


def one_run_row(config: Config, crop: int, name: str, seed: int, running=None) -> dict:
    """One training run of ``config`` with canaries, audited (seed: the run's and the auditor's)."""
    result = audit_run(config.replace(crop=crop, seed=seed), canaries=min(CANARIES, _size(config)),
                       key=jax.random.key(10_000 + seed), running=running, progress=False)
    b = result.bound
    row = dict(kind="one run", mechanism=name, crop=crop, seed=seed, width=config.model_options["width"],
               inclusion_probability=result.inclusion_probability, steps=result.steps, delta=result.delta,
               canaries=b.canaries, epsilon_audited=b.epsilon, confidence=b.confidence, score=b.score,
               guesses_in=b.guesses_in, correct=b.correct, tried=b.tried, epsilon_patch=result.epsilon_patch,
               epsilon_image=result.epsilon_image, flagged=result.flagged, seconds=result.seconds)
    print(f"  {name:>20}  crop {row['crop']:>2}  seed {seed:>2}  audited ≥ {b.epsilon:.3f} ({b.score}, "
          f"{b.correct}/{b.guesses_in})  ε_patch={row['epsilon_patch']:.3f}  ε_image={row['epsilon_image']:.3f}  "
          f"{'FLAGGED' if row['flagged'] else 'ok'}  ({row['seconds']:.0f} s)", flush=True)
    return row


def _size(config: Config) -> int:
    return config.dataset_options.get("num_examples", 4096)


def multi_run_row(crop: int, plan_mechanism: DPSGD, runs: int, seed: int) -> dict:
    """``patchdp.audit`` on one step of the same mechanism (its canary images: zeros of the
    same size, N = the training set's)."""
    start = time.perf_counter()
    result = audit(plan_mechanism.replace(image_shape=plan_mechanism.image_shape[:2]), runs=runs,
                   key=jax.random.key(seed), seed=SamplingSeed.fixed(seed), chunk=64)
    print(f"  {'multi-run, one step':>20}  crop {crop:>2}  audited ≥ {result.bound.epsilon:.3f}  "
          f"ε_patch(1 step)={result.epsilon_patch:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return dict(kind="multi-run (one step)", mechanism="honest", crop=crop, seed=seed,
                inclusion_probability=result.inclusion_probability, steps=1, delta=plan_mechanism.delta,
                runs_per_world=runs, epsilon_audited=result.bound.epsilon, confidence=result.bound.confidence,
                epsilon_patch=result.epsilon_patch, epsilon_image=result.epsilon_image, flagged=result.flagged,
                seconds=time.perf_counter() - start)


def full_batch(output_dir: Path) -> list[dict]:
    """Full batches (N = B = 1024, q = 1), 100 steps, crop 16, noise for ε = 2: one honest
    run, and one whose crop always contains the patch; writes audit_one_run_full_batch.*."""
    jax.config.update("jax_compilation_cache_dir", str(output_dir / "jax_cache"))
    config = Config.from_toml(config_path("demo"), FULL_BATCH)
    rows = [one_run_row(config, 16, "honest", 0),
            one_run_row(config, 16, "crop contains patch", 102, running=BROKEN["crop contains patch"])]
    print(f"wrote {write_rows('audit_one_run_full_batch', rows, output_dir)}")
    return rows[:1]


def one_run_tasks(seeds: int, other_seeds: int, quick: bool) -> list[tuple[str, int, int]]:
    """The runs of the crop sweep as (mechanism, crop, seed), the cheap and decisive first."""
    if quick:
        return [("multi-run", 8, 8), ("honest", 8, 0)]
    first, others = ONE_RUN_CROPS[0], ONE_RUN_CROPS[1:]
    return ([("noise off", first, 100), ("noise z/4", first, 101)]
            + [("honest", first, s) for s in range(seeds)] + [("multi-run", c, c) for c in ONE_RUN_CROPS]
            + [("honest", c, s) for s in range(other_seeds) for c in others]
            + [("honest, demo width 8", first, 0), ("crop contains patch", first, 102)])


def one_run_task(task: tuple[str, int, int], quick: bool, runs: int) -> dict:
    name, crop, seed = task
    config = Config.from_toml(config_path("demo"), QUICK if quick else {"model_options": {"width": AUDIT_WIDTH}})
    if name == "multi-run":
        from patchdp.trainer import make_plan
        size = config.dataset_options.get("image_size", 64)
        return multi_run_row(crop, make_plan(config.replace(crop=crop), _size(config), (size, size, 3)).mechanism,
                             runs, seed)
    if name == "honest, demo width 8":
        config = config.replace(model_options={"width": DEMO_WIDTH})
    return one_run_row(config, crop, name, seed, running=BROKEN.get(name))


def one_run(seeds: int, other_seeds: int, runs: int, quick: bool, output_dir: Path, shard: str) -> list[dict]:
    """The crop sweep of the module docstring, each run written to its own file under
    ``one_run_rows/`` (a finished run is not repeated; ``--shard i/n`` runs every n-th, so
    several processes can share the sweep); then every finished row goes to
    audit_one_run.{csv,json,png}."""
    # the honest runs of one crop differ only in seeds and keys: one compilation, reused from this cache
    jax.config.update("jax_compilation_cache_dir", str(output_dir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    index, count = (int(x) for x in shard.split("/"))
    folder = output_dir / "one_run_rows"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = one_run_tasks(seeds, other_seeds, quick)
    for task in tasks[index::count] if count else ():
        path = folder / ("{}-crop{}-seed{}.json".format(*task).replace(" ", "_").replace("/", "_"))
        if not path.exists():
            path.write_text(json.dumps(one_run_task(task, quick, runs)))
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    crops = sorted({r["crop"] for r in rows if r["mechanism"] == "honest" and r["kind"] == "one run"})
    fields = list(dict.fromkeys(key for row in rows for key in row))
    path = write_rows("audit_one_run", [{key: row.get(key) for key in fields} for row in rows], output_dir)
    print(f"wrote {path} and {_plot_one_run(rows, crops, output_dir)}")
    for crop in crops:
        audited = [r["epsilon_audited"] for r in rows if r["mechanism"] == "honest" and r["crop"] == crop
                   and r["kind"] == "one run"]
        print(f"crop {crop}: honest one-run bound over {len(audited)} seeds: mean {statistics.mean(audited):.3f}, "
              f"max {max(audited):.3f}")
    return [r for r in rows if r["mechanism"].startswith("honest") and r["kind"] == "one run"]


def _plot_one_run(rows, crops, output_dir: Path) -> Path:
    honest = lambda crop: [r for r in rows if r["mechanism"] == "honest" and r["crop"] == crop and r["kind"] == "one run"]
    p = [honest(c)[0]["inclusion_probability"] for c in crops]
    curves = {"accounted, patch-level": (p, [honest(c)[0]["epsilon_patch"] for c in crops]),
              "accounted, image-level (same noise)": (p, [honest(c)[0]["epsilon_image"] for c in crops]),
              "audited, one run, honest: max over seeds": (p, [max(r["epsilon_audited"] for r in honest(c))
                                                               for c in crops])}
    for name in dict.fromkeys(r["mechanism"] for r in rows if r["mechanism"] in BROKEN):
        points = [r for r in rows if r["mechanism"] == name]
        curves[f"audited, one run: {name}"] = ([r["inclusion_probability"] for r in points],
                                               [r["epsilon_audited"] for r in points])
    first = honest(crops[0])[0]
    return plots.line_plot(curves, output_dir / "audit_one_run.png", xlabel="p* (crops " +
                           ", ".join(map(str, crops)) + ")", ylabel=f"ε at δ = {first['delta']:g}",
                           title=f"one training run, {first['steps']} steps, {first['canaries']} canaries: "
                                 f"audit ({first['confidence']:.0%}) vs accounting")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help="runs per world of the multi-run auditor (default 200000; "
                        "20000 with --one-run; 1000 with --quick)")
    parser.add_argument("--one-run", action="store_true", help="audit real training runs, one run each")
    parser.add_argument("--seeds", type=int, default=20, help="--one-run: honest runs at the demo crop 16 "
                        "(default %(default)s)")
    parser.add_argument("--other-seeds", type=int, default=3, help="--one-run: honest runs at crops 24 and 32 "
                        "(default %(default)s)")
    parser.add_argument("--shard", default="0/1", help="--one-run: run every n-th run of the sweep, from the "
                        "i-th: i/n (default %(default)s); processes with i = 0 … n−1 share it; 0/0 runs none "
                        "and only gathers the finished rows")
    parser.add_argument("--part", choices=("crops", "full-batch", "all"), default="all",
                        help="--one-run: the crop sweep, the full-batch setting, or both (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few seconds' version (for the tests)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help=f"where to write (default {RESULTS})")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    runs = args.runs or (1000 if args.quick else 20_000 if args.one_run else 200_000)
    if args.one_run:
        honest = []
        if args.part in ("crops", "all"):
            honest += one_run(args.seeds, args.other_seeds, runs, args.quick, args.output_dir, args.shard)
        if args.part in ("full-batch", "all") and not args.quick:
            honest += full_batch(args.output_dir)
    else:
        honest = multi_run(runs, args.output_dir)
    bugs = [r for r in honest if r["flagged"]]
    if bugs:
        sys.exit(f"BUG: the audit exceeds the accounted ε for crops {[r['crop'] for r in bugs]}")


if __name__ == "__main__":
    main(sys.argv[1:])
