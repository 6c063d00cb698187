"""ε against one knob at a time, patch-level vs image-level, in the paper's setting.

    .venv/bin/python experiments/sweeps.py [crop|padding|patch|shape|all]

- crop:    ε vs crop size (square patch 10, no padding)
- padding: ε vs zero padding P (crop 200, patch 10)
- patch:   ε vs square patch size (crop 200)
- shape:   ε for five patch shapes of similar extent (crop 200): square, disc, blob
           (crescent), cluster (two discs), thin line
Each writes results/eps_vs_<knob>.{png,csv,json}; one line per noise multiplier z.
"""

import sys

from common import IMAGE, NOISE_MULTIPLIERS, RESULTS, image_epsilon, patch_epsilon, progress, write_rows  # noqa: E402
from patchdp import plots  # noqa: E402
from patchdp.inclusion import CropSpec, Patch  # noqa: E402

SWEEPS = {
    "crop": ("crop size (px)", [(c, CropSpec(c), Patch.rectangle(10)) for c in (50, 100, 200, 300, 400, 600, 800)]),
    "padding": ("zero padding P (px)", [(p, CropSpec(200, padding=p), Patch.rectangle(10)) for p in (0, 25, 50, 100, 200, 400)]),
    "patch": ("square patch side (px)", [(s, CropSpec(200), Patch.rectangle(s)) for s in (1, 5, 10, 20, 40, 80)]),
    "shape": ("patch shape", [(name, CropSpec(200), patch) for name, patch in [
        ("square 20", Patch.rectangle(20)), ("disc 20", Patch.disc(20)), ("blob 20", Patch.blob(20)),
        ("cluster 10+10", Patch.cluster(10)), ("line 1x40", Patch.rectangle(1, 40))]]),
}


def run(knob: str):
    xlabel, settings = SWEEPS[knob]
    rows, curves = [], {}
    for z in NOISE_MULTIPLIERS:
        eps_image = image_epsilon(z)
        xs, patch_eps = [], []
        for x, crop, patch in progress(settings, f"{knob}, z={z}"):
            p, eps = patch_epsilon(z, crop, patch)
            rows.append(dict(knob=knob, value=x, z=z, inclusion_probability=p, epsilon_patch=eps,
                             epsilon_image=eps_image, patch_area=patch.area))
            xs.append(x)
            patch_eps.append(eps)
        index = list(range(len(xs))) if knob == "shape" else xs
        curves[f"patch-level, z={z:g}"] = (index, patch_eps)
        curves[f"image-level, z={z:g}"] = (index, [eps_image] * len(xs))
    png = plots.line_plot(curves, RESULTS / f"eps_vs_{knob}.png", xlabel=xlabel, ylabel="ε at δ = 1e-5",
                          title=f"ε vs {knob} ({IMAGE[0]}x{IMAGE[1]} images, T = 1e5)", logy=True,
                          xticklabels=xs if knob == "shape" else None)
    print(f"wrote {png} and {write_rows(f'eps_vs_{knob}', rows)}")
    for row in rows:
        if row["z"] == 1.0:
            print(f"  {knob}={row['value']!s:>13}  p*={row['inclusion_probability']:.5f}  "
                  f"ε_patch={row['epsilon_patch']:.3f}  ε_image={row['epsilon_image']:.3f}")


def main(argv):
    knobs = list(SWEEPS) if not argv or argv[0] == "all" else argv
    for knob in knobs:
        if knob not in SWEEPS:
            sys.exit(f"unknown sweep {knob!r}: choose from {', '.join(SWEEPS)} or all")
        run(knob)


if __name__ == "__main__":
    main(sys.argv[1:])
