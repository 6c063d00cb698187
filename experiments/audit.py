"""Empirical audit of the patch-level guarantee: audited lower bound vs accounted ε.

    .venv/bin/python experiments/audit.py [--runs 200000]

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

Writes results/audit.{png,csv,json}. A honest row whose lower bound exceeds its
accounted ε is a bug (or a 5% event): the script exits non-zero.
"""

import argparse
import sys
import time

import jax

from common import RESULTS, write_rows  # noqa: E402
from patchdp import plots  # noqa: E402
from patchdp.audit import audit, audit_ceiling, canary_step  # noqa: E402
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


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200_000, help="runs per world (default %(default)s)")
    runs = parser.parse_args(argv).runs
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
    png = plots.line_plot(curves, RESULTS / "audit.png", xlabel="p* (crops 4, 6, 8, 16 of 16×16)",
                          ylabel=f"ε at δ = {DELTA:g}",
                          title=f"one step, q = 1, z = {Z:g}: audit vs accounting ({runs} runs/world)")
    total = time.perf_counter() - start
    for row in rows:
        row["total_seconds"] = total
    print(f"wrote {png} and {write_rows('audit', rows)}  ({total:.0f} s)")
    bugs = [r for r in honest if r["flagged"]]
    if bugs:
        sys.exit(f"BUG: the audit exceeds the accounted ε for crops {[r['crop'] for r in bugs]}")


if __name__ == "__main__":
    main(sys.argv[1:])
