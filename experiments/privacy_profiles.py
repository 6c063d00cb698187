"""Privacy profiles δ(ε): patch-level vs minibatch-only (image-level) vs two comparators.

    .venv/bin/python experiments/privacy_profiles.py

One panel per noise multiplier z ∈ {0.5, 1, 2} (noise std 1/2/4 on clip norm 2); in each,
patch-level DP-SGD for crops 100/200/400 × square patches 10/20/40 on 1000×1000 images,
standard image-level DP-SGD (the same training, amplified by minibatch sampling only),
and two COMPARATORS the paper plots:
- data-level noise: Gaussian noise with std DATA_NOISE_STD added once to every pixel
  (patch sensitivity sqrt(p_h·p_w·3)·255);
- Gaussian data augmentation: fresh pixel noise with std AUG_NOISE_STD on each sampled
  image, amplifying by w = q·TV (no cropping).
Each accountant curve is cut where it falls below :func:`accounting.numerical_floor`
(float64 cannot make it tight there), and that region is shaded; the CSV holds NaN there.
Writes results/privacy_profiles.{png,csv,json}.
"""

import math

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import DELTA, IMAGE, NOISE_MULTIPLIERS, RESULTS, SAMPLING, STEPS, progress, write_rows  # noqa: E402
from patchdp import accounting  # noqa: E402
from patchdp.inclusion import CropSpec, Patch, inclusion_probability  # noqa: E402

CROPS = (100, 200, 400)
PATCHES = (10, 20, 40)
DATA_NOISE_STD = 255.0      # as large as the whole pixel range
AUG_NOISE_STD = 255.0
EPSILONS = np.linspace(0, 30, 121)


def profile(z: float, relation, floors: dict) -> np.ndarray:
    """δ(ε) on EPSILONS, NaN where it is below the accountant's numerical floor (there it
    is a valid but loose upper bound that flattens out: not the shape of the profile).
    Records the floor as floors[z] (the highest of the panel's curves)."""
    delta = accounting.privacy_profile(z, STEPS, EPSILONS, sampling=SAMPLING, relation=relation)
    floor = accounting.numerical_floor(z, STEPS, sampling=SAMPLING, relation=relation)
    floors[z] = max(floors.get(z, 0.0), floor)
    return np.where(delta >= floor, delta, np.nan)


def main():
    rows = []
    fig, axes = plt.subplots(1, len(NOISE_MULTIPLIERS), figsize=(15, 4.6), sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(CROPS)))
    styles = dict(zip(PATCHES, ["-", "--", ":"]))
    jobs = [(z, c, p) for z in NOISE_MULTIPLIERS for c in CROPS for p in PATCHES]
    profiles, floors = {}, {}
    for z, c, p in progress(jobs, "patch-level profiles"):
        w = inclusion_probability(IMAGE, CropSpec(c), Patch.rectangle(p))
        profiles[z, c, p] = profile(z, accounting.PatchLevel(w), floors)
        rows += [dict(curve="patch", z=z, crop=c, patch=p, epsilon=e, delta=d)
                 for e, d in zip(EPSILONS, profiles[z, c, p])]
    for ax, z in zip(axes, NOISE_MULTIPLIERS):
        for (zz, c, p), prof in profiles.items():
            if zz == z:
                ax.plot(EPSILONS, prof, styles[p], color=colors[CROPS.index(c)], label=f"crop {c}, patch {p}")
        image = profile(z, accounting.ImageLevel(), floors)
        ax.plot(EPSILONS, image, color="crimson", lw=2, label="minibatch only (image-level)")
        rows += [dict(curve="image", z=z, crop="", patch="", epsilon=e, delta=d) for e, d in zip(EPSILONS, image)]
        for p, style in styles.items():
            sensitivity = math.sqrt(p * p * 3) * 255
            aug = accounting.GaussianAugmentation(AUG_NOISE_STD, sensitivity)
            prof = profile(z, aug, floors)
            ax.plot(EPSILONS, prof, style, color="gray", lw=1, label=f"Gaussian augmentation (σ=255), patch {p}" + (" = minibatch only" if aug.amplification > 0.999 else ""))
            data = accounting.data_level_noise_profile(EPSILONS, DATA_NOISE_STD, p * p)
            ax.plot(EPSILONS, data, style, color="black", lw=1, label=f"data-level noise (σ=255), patch {p}" + (" (δ≈1)" if data[-1] > 0.5 else ""))
            rows += [dict(curve="augmentation", z=z, crop="", patch=p, epsilon=e, delta=d) for e, d in zip(EPSILONS, prof)]
            rows += [dict(curve="data-level", z=z, crop="", patch=p, epsilon=e, delta=d) for e, d in zip(EPSILONS, data)]
        ax.axhline(DELTA, color="k", lw=0.5, ls="-.")
        ax.axhspan(1e-12, floors[z], color="0.88", zorder=0,
                   label="below the accountant's numerical floor (curves cut)")
        ax.set_yscale("log")
        ax.set_ylim(1e-12, 1.5)
        ax.set_xlabel("ε")
        ax.set_title(f"z = {z:g} (noise std {2 * z:g}, clip 2), T = {STEPS}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("δ(ε)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle("Privacy profiles, 1000×1000 images, batch 100 of 10^5, 100 epochs")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "privacy_profiles.png", dpi=110, bbox_inches="tight")
    print(f"wrote {RESULTS / 'privacy_profiles.png'} and {write_rows('privacy_profiles', rows)}")
    for z in NOISE_MULTIPLIERS:
        at = lambda prof: EPSILONS[np.argmax(np.nan_to_num(prof) <= DELTA)]  # NaN: below the floor < DELTA
        print(f"z = {z}: ε at δ=1e-5 — crop 100/patch 10: ≤{at(profiles[z, 100, 10]):.2f} on this grid")


if __name__ == "__main__":
    main()
