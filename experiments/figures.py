"""The accounting figures of the paper (arXiv 2603.24695), A to G, at the paper's settings.

    .venv/bin/python experiments/figures.py FIG [--quick] [--output-dir DIR] [--step-count paper|patchdp]

FIG is one of A B C D E F G (or ``all``). Each writes ``figure_<FIG>.png`` beside
``figure_<FIG>.csv`` (one row per computed point) and ``figure_<FIG>.json`` (the settings,
the rows and the runtime) into ``--output-dir`` (default ``experiments/results/``).

Settings (read from the authors' public experiment configurations; unless a figure says
otherwise): 1000×1000 images, no padding, fixed-size batches of 100 out of N = 10^5
(q = 10^-3), 100 epochs, δ = 10^-5, clip norm C = 2. The paper's noise level σ is the noise
std on the sum of gradients clipped to C = 2, so the noise multiplier of patchdp's
accountant (std in units of C) is z = σ / 2. Steps: the paper counts ceil(N/B) steps per
epoch (``--step-count paper``, the default here); patchdp's trainer plans ceil(epochs·N/B)
(``--step-count patchdp``). For N = 10^5, B = 100 both give T = 10^5.

Curves: patch-level DP-SGD (w = q·p*), minibatch only (standard image-level DP-SGD, w = q)
and the data-level noise comparator (σ_data added once to every pixel, patch sensitivity
sqrt(area·3)·255). Every δ(ε) curve is cut where it falls below the accountant's
numerical floor (float64 cannot make the bound tight there; the CSV holds NaN), and that
region is shaded.

``--quick`` runs a reduced grid (two values per axis, 1 epoch, a 10× coarser privacy-loss
grid) in seconds, for CI; its numbers are not the paper's.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# this folder (common.py) and the checkout holding it (its patchdp, not an installed one)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, training_steps  # noqa: E402

from patchdp import accounting  # noqa: E402
from patchdp.inclusion import CropSpec, Patch, inclusion_probability  # noqa: E402
from patchdp.sampling import FixedSizeSampling  # noqa: E402

FIGURES = "ABCDEFG"
SIGMA_GROUPS = {"low": (1.0, 1.5, 2.0), "medium": (2.5, 3.0, 3.5), "high": (4.0, 4.5, 5.0)}
PAPER_EPSILONS = (0.1, 1000.0, 50)  # log-spaced ε grid of the δ(ε) figures: from, to, points


# ============================================================================ settings


@dataclasses.dataclass(frozen=True)
class Setting:
    """One accounting setting. ``step_count``: "paper" (ceil(N/B) per epoch) or "patchdp"
    (ceil(epochs·N/B) in all); ``resolution``: the accountant's privacy-loss grid (nats)."""

    image: tuple[int, int] = (1000, 1000)
    batch_size: int = 100
    dataset_size: int = 10 ** 5
    epochs: int = 100
    delta: float = 1e-5
    step_count: str = "paper"
    resolution: float = accounting.DEFAULT_RESOLUTION

    @property
    def sampling(self) -> FixedSizeSampling:
        return FixedSizeSampling(batch_size=self.batch_size, dataset_size=self.dataset_size)

    @property
    def steps(self) -> int:
        return training_steps(self.epochs, self.batch_size, self.dataset_size, self.step_count)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "sampling_rate_q": self.batch_size / self.dataset_size,
                "steps_T": self.steps, "clip_norm": 2.0, "noise_multiplier": "z = sigma / 2"}


def noise_multiplier(sigma: float) -> float:
    """The paper's σ (noise std at clip norm 2) as patchdp's z (noise std / clip norm)."""
    return sigma / 2


def _lattice_disc(radius: int, height: int, width: int, cy: int, cx: int) -> np.ndarray:
    """Pixels (y, x) with (y − cy)² + (x − cx)² ≤ radius², as the authors draw discs."""
    y, x = np.mgrid[:height, :width]
    return (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2


@functools.lru_cache(maxsize=None)
def paper_patch(shape: str, size: int) -> Patch:
    """The paper's patch shapes at size parameter ``size`` (10 in figure D):
    square size×size; rectangle size tall × 2·size wide; circle of radius size // 2
    (81 px at size 10); cluster: two discs of radius int(0.4·size) side by side, centres
    2·radius + 2·(radius // 4) apart (98 px at size 10); blob: the crescent of a disc of
    radius int(0.9·size) minus a disc of 0.6 of that radius shifted right by 0.4 of it
    (172 px at size 10)."""
    if shape == "square":
        return Patch.rectangle(size)
    if shape == "rectangle":
        return Patch.rectangle(size, 2 * size)
    if shape == "circle":
        r = size // 2
        return Patch.from_mask(_lattice_disc(r, 2 * r + 1, 2 * r + 1, r, r), f"circle r={r}")
    if shape == "cluster":
        r = int(size * 0.4)
        offset = 2 * (r + (r // 2) // 2)
        mask = _lattice_disc(r, 2 * r + 1, 2 * r + 1 + offset, r, r)
        mask |= _lattice_disc(r, 2 * r + 1, 2 * r + 1 + offset, r, r + offset)
        return Patch.from_mask(mask, f"cluster 2 discs r={r}")
    if shape == "blob":
        r = int(size * 0.9)
        bite, shift = int(r * 0.6), int(r * 0.4)
        mask = _lattice_disc(r, 2 * r + 1, 2 * r + 1, r, r) & ~_lattice_disc(bite, 2 * r + 1, 2 * r + 1, r, r + shift)
        return Patch.from_mask(mask, f"crescent r={r}")
    raise ValueError(f"unknown patch shape {shape!r}: square, rectangle, circle, cluster or blob.")


@functools.lru_cache(maxsize=None)
def p_star(image: tuple[int, int], crop: int, padding: int, shape: str, size: int) -> float:
    """Worst-case inclusion probability of the paper patch under square crops (cached)."""
    return inclusion_probability(image, CropSpec(crop, padding=padding), paper_patch(shape, size))


def _relation(amplification: float):
    """p* = 1 is no amplification: the same composition as image level (and cached with it)."""
    return accounting.ImageLevel() if amplification >= 1.0 else accounting.PatchLevel(amplification)


@functools.lru_cache(maxsize=None)
def epsilon(sigma: float, setting: Setting, amplification: float = 1.0) -> float:
    """ε at the setting's δ for noise level σ and crop amplification p* (1: image level)."""
    return accounting.epsilon(noise_multiplier(sigma), setting.steps, setting.delta, sampling=setting.sampling,
                              relation=_relation(amplification), resolution=setting.resolution)


@functools.lru_cache(maxsize=None)
def profile(sigma: float, setting: Setting, amplification: float, epsilons: tuple) -> tuple[np.ndarray, float]:
    """(δ(ε) on ``epsilons`` with NaN below the numerical floor, the floor) — cached."""
    args = dict(sampling=setting.sampling, relation=_relation(amplification), resolution=setting.resolution)
    z = noise_multiplier(sigma)
    deltas = accounting.privacy_profile(z, setting.steps, epsilons, **args)
    floor = accounting.numerical_floor(z, setting.steps, **args)
    return np.where(deltas >= floor, deltas, np.nan), floor


# ============================================================================ figures


class Figure:
    """Collects one figure's rows and settings and writes PNG + CSV + JSON."""

    def __init__(self, name: str, setting: Setting, quick: bool, **settings):
        self.name, self.setting, self.quick = name, setting, quick
        self.settings = {"setting": setting.to_dict(), "quick": quick, **settings}
        self.rows: list[dict] = []
        self.summary: list[dict] = []  # per δ(ε) curve: its ε at the setting's δ
        self.start = time.perf_counter()

    def write(self, fig, output_dir: Path) -> dict:
        output_dir.mkdir(parents=True, exist_ok=True)
        stem = output_dir / f"figure_{self.name}"
        fig.savefig(stem.with_suffix(".png"), dpi=110, bbox_inches="tight")
        plt.close(fig)
        with stem.with_suffix(".csv").open("w", newline="") as f:
            fields = list(dict.fromkeys(key for row in self.rows for key in row))
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # strict JSON: NaN, ∞ → null
        record = {"figure": self.name, "settings": self.settings, "runtime_s": round(time.perf_counter() - self.start, 2),
                  **{key: [{k: clean(v) for k, v in row.items()} for row in rows]
                     for key, rows in (("summary", self.summary), ("rows", self.rows))}}
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1, allow_nan=False))
        return record


def _pick(values, quick: bool):
    """The full grid, or its first and last value in quick mode."""
    values = tuple(values)
    return (values[0], values[-1]) if quick and len(values) > 2 else values


def _epsilon_grid(quick: bool) -> tuple:
    low, high, points = PAPER_EPSILONS
    return tuple(np.logspace(math.log10(low), math.log10(high), 8 if quick else points))


def _profile_axes(ax, title: str, floor: float):
    """Log ε, linear δ as in the paper, the below-floor band shaded."""
    ax.axhspan(0, floor, color="0.85", zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(PAPER_EPSILONS[0], PAPER_EPSILONS[1])
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3, which="both")


FLOOR_LABEL = "below the accountant's numerical floor (curves cut)"


def _add_profile(fig_data: Figure, ax, epsilons, sigma, amplification, curve, label, style, **row):
    deltas, floor = profile(sigma, fig_data.setting, amplification, epsilons)
    ax.plot(epsilons, deltas, style[0], color=style[1], lw=1.5, label=label)
    fig_data.summary.append(dict(curve=curve, sigma=sigma, p_star=amplification, **row, numerical_floor=floor,
                                 epsilon_at_delta=epsilon(sigma, fig_data.setting, amplification)))
    fig_data.rows += [dict(curve=curve, sigma=sigma, p_star=amplification, **row, epsilon=e, delta=float(d))
                      for e, d in zip(epsilons, deltas)]
    return floor


def _add_data_level(fig_data: Figure, ax, epsilons, sigma_data, area, label, style, **row):
    deltas = accounting.data_level_noise_profile(np.asarray(epsilons), sigma_data, area)
    ax.plot(epsilons, deltas, style[0], color=style[1], lw=1.2, label=label)
    mu = math.sqrt(area * 3) * 255 / sigma_data  # the comparator's sensitivity / std
    fig_data.summary.append(dict(curve="data-level", sigma_data=sigma_data, **row,
                                 epsilon_at_delta=accounting.gaussian_mechanism_epsilon(mu, fig_data.setting.delta)))
    fig_data.rows += [dict(curve="data-level", sigma_data=sigma_data, **row, epsilon=e, delta=float(d))
                      for e, d in zip(epsilons, deltas)]


def _legend_above(fig, axes_with_labels, ncol=4):
    handles, labels = axes_with_labels.get_legend_handles_labels()
    handles.append(matplotlib.patches.Patch(color="0.85"))
    labels.append(FLOOR_LABEL)
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol, fontsize=8, frameon=False)


def figure_a(setting: Setting, quick: bool) -> tuple:
    """27 panels: crop 100/200/400 × square patch 10/20/40 × σ 1/2/4; patch-level,
    minibatch only and data-level noise (σ_data = 1000, one release)."""
    crops, patches, sigmas = _pick((100, 200, 400), quick), _pick((10, 20, 40), quick), _pick((1.0, 2.0, 4.0), quick)
    eps = _epsilon_grid(quick)
    data = Figure("A", setting, quick, crops=crops, patches=patches, sigmas=sigmas, sigma_data=1000.0,
                  epsilons=list(eps))
    fig, axes = plt.subplots(len(sigmas) * len(crops), len(patches), sharex=True, sharey=True,
                             figsize=(3.6 * len(patches), 2.3 * len(sigmas) * len(crops)), squeeze=False)
    for i, (sigma, crop) in enumerate((s, c) for s in sigmas for c in crops):
        for j, size in enumerate(patches):
            ax = axes[i, j]
            p = p_star(setting.image, crop, 0, "square", size)
            setting_row = dict(crop=crop, patch=size)
            floor = max(_add_profile(data, ax, eps, sigma, p, "patch", "patch-level (q·p*)", ("-", "C0"), **setting_row),
                        _add_profile(data, ax, eps, sigma, 1.0, "image", "minibatch only (image-level)", ("--", "C3"),
                                     **setting_row))
            _add_data_level(data, ax, eps, 1000.0, size * size, "data-level noise, σ_data = 1000", (":", "k"),
                            **setting_row)
            _profile_axes(ax, f"crop {crop}, patch {size}, σ = {sigma:g}: p* = {p:.3g}", floor)
    for ax in axes[-1]:
        ax.set_xlabel("ε")
    for ax in axes[:, 0]:
        ax.set_ylabel("δ(ε)")
    _legend_above(fig, axes[0, 0])
    fig.tight_layout()
    return data, fig


def _single_profile_figure(name, setting, quick, title, curves, **settings):
    """One δ(ε) panel. curves: (kind, label, (linestyle, colour), σ or σ_data, p* or patch
    area in px, extra CSV columns); kind "patch"/"image" are DP-SGD curves, "data-level" the
    comparator."""
    eps = _epsilon_grid(quick)
    data = Figure(name, setting, quick, epsilons=list(eps), **settings)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    floor = 0.0
    for kind, label, style, level, value, row in curves:
        if kind == "data-level":
            _add_data_level(data, ax, eps, level, value, label, style, **row)
        else:
            floor = max(floor, _add_profile(data, ax, eps, level, value, kind, label, style, **row))
    _profile_axes(ax, title, floor)
    ax.set_xlabel("ε")
    ax.set_ylabel("δ(ε)")
    _legend_above(fig, ax, ncol=2)
    fig.tight_layout()
    return data, fig


def figure_b(setting: Setting, quick: bool) -> tuple:
    """Data-level noise comparator: crop 200, patch 20, σ = 2; σ_data 1000 vs 2000."""
    p = p_star(setting.image, 200, 0, "square", 20)
    row = dict(crop=200, patch=20)
    curves = [("patch", f"patch-level (p* = {p:.3g})", ("-", "C0"), 2.0, p, row),
              ("image", "minibatch only (image-level)", ("--", "C3"), 2.0, 1.0, row),
              ("data-level", "data-level noise, σ_data = 1000", (":", "k"), 1000.0, 400, row),
              ("data-level", "data-level noise, σ_data = 2000", ("-.", "0.4"), 2000.0, 400, row)]
    return _single_profile_figure("B", setting, quick, "1000×1000, crop 200, patch 20, σ = 2", curves,
                                  crop=200, patch=20, sigma=2.0, sigma_data=[1000.0, 2000.0])


def figure_c(setting: Setting, quick: bool) -> tuple:
    """Large image: 1000×2000, crop 200, patch 20, σ = 2 (1000×1000 dashed for reference)."""
    large = dataclasses.replace(setting, image=(1000, 2000))
    p_large = p_star(large.image, 200, 0, "square", 20)
    p_square = p_star(setting.image, 200, 0, "square", 20)
    curves = [("patch", f"patch-level, 1000×2000 (p* = {p_large:.3g})", ("-", "C0"), 2.0, p_large,
               dict(image="1000x2000")),
              ("patch", f"patch-level, 1000×1000 (p* = {p_square:.3g})", ("--", "C0"), 2.0, p_square,
               dict(image="1000x1000")),
              ("image", "minibatch only (image-level)", ("--", "C3"), 2.0, 1.0, dict(image="any")),
              ("data-level", "data-level noise, σ_data = 1000", (":", "k"), 1000.0, 400, dict(image="any"))]
    return _single_profile_figure("C", setting, quick, "crop 200, patch 20, σ = 2", curves,
                                  image=[1000, 2000], crop=200, patch=20, sigma=2.0, sigma_data=1000.0)


D_SHAPES = ("square", "rectangle", "circle", "cluster", "blob")


def figure_d(setting: Setting, quick: bool) -> tuple:
    """Patch shapes at crop 100, σ = 1: square 10×10, rectangle 10×20, circle r = 5,
    two-disc cluster (r = 4), crescent blob; δ(ε) profiles and the masks."""
    shapes = _pick(D_SHAPES, quick)
    eps = _epsilon_grid(quick)
    data = Figure("D", setting, quick, crop=100, sigma=1.0, shapes={s: paper_patch(s, 10).name for s in shapes},
                  pixels={s: paper_patch(s, 10).area for s in shapes}, epsilons=list(eps))
    fig = plt.figure(figsize=(7.5, 6.2))
    grid = fig.add_gridspec(2, len(shapes), height_ratios=(1, 4.5))
    ax = fig.add_subplot(grid[1, :])
    floor = 0.0
    for k, shape in enumerate(shapes):
        patch = paper_patch(shape, 10)
        p = p_star(setting.image, 100, 0, shape, 10)
        floor = max(floor, _add_profile(data, ax, eps, 1.0, p, "patch", f"{patch.name}, {patch.area} px: p* = {p:.4f}",
                                        ("-", f"C{k}"), shape=shape, pixels=patch.area))
        thumb = fig.add_subplot(grid[0, k])
        thumb.imshow(np.pad(patch.mask, 1), cmap="Greys", interpolation="nearest")
        thumb.set_title(f"{shape}\n{patch.shape[0]}×{patch.shape[1]}, {patch.area} px", fontsize=7)
        thumb.set_axis_off()
    floor = max(floor, _add_profile(data, ax, eps, 1.0, 1.0, "image", "minibatch only (image-level)",
                                    ("--", "k"), shape="any", pixels=""))
    _profile_axes(ax, "crop 100, σ = 1, 1000×1000", floor)
    ax.set_xlabel("ε")
    ax.set_ylabel("δ(ε)")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles + [matplotlib.patches.Patch(color="0.85")], labels + [FLOOR_LABEL], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    return data, fig


def _epsilon_panels(data: Figure, panels, xlabel: str):
    """Rows of ε-vs-knob panels. panels: rows of (title, [(σ, [(x, setting, p*)...])...]).
    Patch-level solid with markers, image-level (minibatch only) dashed in the same colour."""
    rows = len(panels)
    cols = max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False)
    for i, row in enumerate(panels):
        for j, (title, lines, extra) in enumerate(row):
            ax = axes[i, j]
            for k, (sigma, points) in enumerate(lines):
                xs = [x for x, _, _ in points]
                patch_eps = [epsilon(sigma, s, p) for _, s, p in points]
                image_eps = [epsilon(sigma, s, 1.0) for _, s, _ in points]
                ax.plot(xs, patch_eps, "-o", ms=3, color=f"C{k}", label=f"σ = {sigma:g}, patch-level")
                ax.plot(xs, image_eps, "--", color=f"C{k}", lw=1, label=f"σ = {sigma:g}, minibatch only")
                data.rows += [dict(panel=title, sigma=sigma, x=x, p_star=p, epsilon_patch=ep, epsilon_image=ei,
                                   steps=s.steps, **extra)
                              for (x, s, p), ep, ei in zip(points, patch_eps, image_eps)]
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"ε at δ = {data.setting.delta:g}")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
        for j in range(len(row), cols):
            axes[i, j].set_axis_off()
    fig.tight_layout()
    return fig


def _sigma_groups(quick: bool):
    return {name: _pick(values, quick) for name, values in SIGMA_GROUPS.items()
            if not quick or name in ("low", "high")}


def _int_linspace(low: int, high: int, count: int, quick: bool) -> tuple[int, ...]:
    return _pick(tuple(int(round(v)) for v in np.linspace(low, high, count)), quick)


def figure_e(setting: Setting, quick: bool) -> tuple:
    """ε vs crop size, square patch 10: crops linspace(10, 700, 20) on 1000×1000 and
    linspace(10, 1000, 20) on 1000×2000; σ 1 to 5 in three panels per image."""
    images = {(1000, 1000): _int_linspace(10, 700, 20, quick), (1000, 2000): _int_linspace(10, 1000, 20, quick)}
    groups = _sigma_groups(quick)
    data = Figure("E", setting, quick, patch=10, crops={f"{h}x{w}": list(c) for (h, w), c in images.items()},
                  sigma_groups=groups)
    panels = []
    for image, crops in images.items():
        s = dataclasses.replace(setting, image=image)
        label = f"{image[0]}×{image[1]}"
        panels.append([(f"{label}, patch 10, σ {name}", [(sigma, [(c, s, p_star(image, c, 0, "square", 10))
                                                                 for c in crops]) for sigma in sigmas],
                        dict(image=label, patch=10)) for name, sigmas in groups.items()])
    return data, _epsilon_panels(data, panels, "crop size (px)")


def figure_f(setting: Setting, quick: bool) -> tuple:
    """ε vs zero padding P = 0, 5, …, 50: (i) patch 10, crops 400/450/500, σ 4/4.5/5;
    (ii) crop 500, patch 20, low/medium/high σ; (iii) crop 500, patches 10/20/40, σ 4/4.5/5.
    At crop 500 and P = 0, p* = 1: padding alone creates the amplification."""
    paddings = _pick(range(0, 51, 5), quick)
    groups = _sigma_groups(quick)
    high = groups["high"]
    data = Figure("F", setting, quick, paddings=list(paddings), sigma_groups=groups)

    def line(sigma, crop, size):
        return sigma, [(pad, setting, p_star(setting.image, crop, pad, "square", size)) for pad in paddings]

    panels = [
        [(f"(i) patch 10, crop {c}", [line(s, c, 10) for s in high], dict(part="i", crop=c, patch=10))
         for c in _pick((400, 450, 500), quick)],
        [(f"(ii) crop 500, patch 20, σ {name}", [line(s, 500, 20) for s in sigmas], dict(part="ii", crop=500, patch=20))
         for name, sigmas in groups.items()],
        [(f"(iii) crop 500, patch {size}", [line(s, 500, size) for s in high], dict(part="iii", crop=500, patch=size))
         for size in _pick((10, 20, 40), quick)],
    ]
    return data, _epsilon_panels(data, panels, "zero padding P (px)")


def figure_g(setting: Setting, quick: bool) -> tuple:
    """ε vs square patch side linspace(1, 120, 20), crop 450, on 1000×1000 and 1000×2000; σ 1 to 5."""
    sides = _int_linspace(1, 120, 20, quick)
    groups = _sigma_groups(quick)
    data = Figure("G", setting, quick, crop=450, patch_sides=list(sides), sigma_groups=groups)
    panels = []
    for image in ((1000, 1000), (1000, 2000)):
        s = dataclasses.replace(setting, image=image)
        label = f"{image[0]}×{image[1]}"
        panels.append([(f"{label}, crop 450, σ {name}", [(sigma, [(side, s, p_star(image, 450, 0, "square", side))
                                                                  for side in sides]) for sigma in sigmas],
                        dict(image=label, crop=450)) for name, sigmas in groups.items()])
    return data, _epsilon_panels(data, panels, "square patch side (px)")


BUILDERS = dict(A=figure_a, B=figure_b, C=figure_c, D=figure_d, E=figure_e, F=figure_f, G=figure_g)


def run(name: str, *, quick: bool = False, output_dir: Path = RESULTS, step_count: str = "paper") -> dict:
    """Builds figure ``name`` and writes its PNG, CSV and JSON; returns the JSON record."""
    setting = Setting(step_count=step_count)
    if quick:
        setting = dataclasses.replace(setting, epochs=1, resolution=1e-3)
    data, fig = BUILDERS[name](setting, quick)
    return data.write(fig, Path(output_dir))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", type=str.upper, choices=[*FIGURES, "ALL"], help="which figure (A–G) or all")
    parser.add_argument("--quick", action="store_true", help="a reduced grid in seconds (CI); not the paper's numbers")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help=f"where to write (default {RESULTS})")
    parser.add_argument("--step-count", choices=("paper", "patchdp"), default="paper",
                        help="steps per run: paper = ceil(N/B)·epochs (default), patchdp = ceil(epochs·N/B)")
    args = parser.parse_args(argv)
    for name in FIGURES if args.figure == "ALL" else args.figure:
        record = run(name, quick=args.quick, output_dir=args.output_dir, step_count=args.step_count)
        print(f"figure {name}: {len(record['rows'])} rows in {record['runtime_s']:.1f} s → "
              f"{args.output_dir / f'figure_{name}'}.{{png,csv,json}}")


if __name__ == "__main__":
    main()
