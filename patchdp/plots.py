"""Figures people would rather look at than read. Matplotlib with the Agg backend, so
they render on headless machines; every function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def inclusion_heatmap(p_map: np.ndarray, path, *, title: str = "",
                      placements: Sequence[tuple[int, int]] = (), patch_shape: tuple[int, int] = (1, 1)) -> Path:
    """Heatmap of p(t) over patch placements (rows × columns of the unpadded image); the
    ``placements`` (row, column) of several patches, e.g. the worst case of
    ``patchdp.coverage.union_inclusion``, are outlined as ``patch_shape`` boxes."""
    fig, ax = plt.subplots(figsize=(6.4, 1.0 + 5 * min(p_map.shape[0] / max(p_map.shape[1], 1), 1.5)))
    image = ax.imshow(p_map, cmap="magma", vmin=0, interpolation="nearest")
    for row, col in placements if len(placements) > 1 else ():
        ax.add_patch(matplotlib.patches.Rectangle((col - 0.5, row - 0.5), patch_shape[1], patch_shape[0],
                                                  fill=False, edgecolor="cyan", linewidth=1.5))
    fig.colorbar(image, ax=ax, label="inclusion probability p(t)", shrink=0.8)
    ax.set_xlabel("patch column b (px)")
    ax.set_ylabel("patch row a (px)")
    ax.set_title(title or f"p* = {p_map.max():.4g}")
    return _save(fig, path)


def line_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, *,
              xlabel: str, ylabel: str, title: str = "", logy: bool = False,
              logx: bool = False, xticklabels: Sequence[str] | None = None,
              errors: Mapping[str, Sequence[float]] | None = None) -> Path:
    """One line per named (x, y) curve; ``xticklabels`` names categorical x = 0, 1, …;
    ``errors`` gives ± error bars for some curves, by name."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, (x, y) in curves.items():
        yerr = (errors or {}).get(label)
        ax.errorbar(x, y, yerr=yerr, label=label, marker="o" if len(x) <= 12 else None, ms=4, capsize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), xticklabels, rotation=20)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path) -> Path:
    """Writes the figure to ``path`` (a PNG if it has no suffix) and returns the path written."""
    path = Path(path)
    if not path.suffix:  # matplotlib would append .png itself
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def training_curves(records: Sequence[Mapping], path, *, title: str = "", steps: int | None = None,
                    budget: float | None = None, delta: float | None = None, accounting: str = "") -> Path:
    """Three panels against the step, from the records of a run's ``metrics.jsonl``:
    training loss (``kind == "train"``), ε spent (``"epsilon"``) under the named
    ``accounting`` at ``delta``, with the ε ``budget`` as a dashed line, and evaluation
    scores (``"eval"``, in [0, 1]). Every panel spans steps 0 … ``steps`` (the planned
    number), so a few evaluation points sit where they were taken."""
    def series(kind, key):
        rows = [r for r in records if r["kind"] == kind and r.get(key) is not None]
        return [r["step"] for r in rows], [r[key] for r in rows]

    score_keys = sorted({k for r in records if r["kind"] == "eval" for k in r} - {"kind", "step"})
    where = ", ".join(filter(None, (f"{accounting}-level accounting" if accounting else "",
                                    f"δ = {delta:.3g}" if delta is not None else "")))
    panels = [("training loss", [("loss", series("train", "loss"))]),
              (f"ε spent ({where})" if where else "ε spent", [("ε", _from_zero(*series("epsilon", "epsilon")))]),
              ("evaluation", [(k, series("eval", k)) for k in score_keys])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, curves) in zip(axes, panels):
        for label, (x, y) in curves:
            ax.plot(x, y, label=label, marker="o" if len(x) <= 12 else None, ms=4)
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if steps:
            ax.set_xlim(0, steps * 1.02)
    if budget is not None:
        axes[1].axhline(budget, color="tab:red", ls="--", lw=1, label=f"budget ε = {budget:g}")
        axes[1].set_ylim(0, budget * 1.1)
    axes[2].set_ylim(0, 1.02)
    for ax in axes[1:]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _from_zero(steps: list, values: list) -> tuple[list, list]:
    """ε is 0 before the first step: the curve starts at (0, 0)."""
    return ([0, *steps], [0.0, *values]) if steps and steps[0] > 0 else (steps, values)


def per_class_bars(iou: Mapping[str, float | None], path, *, title: str = "") -> Path:
    """A horizontal bar per class: its IoU (or accuracy); a class with none (None or NaN:
    it occurs neither in the labels nor in the predictions) is marked "absent"."""
    names = list(iou)
    values = [np.nan if iou[n] is None else float(iou[n]) for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.32 * len(names)))
    rows = np.arange(len(names))
    ax.barh(rows, np.nan_to_num(values), color="tab:blue")
    for row, value in zip(rows, values):
        ax.text(min(value, 0.85) + 0.01 if np.isfinite(value) else 0.01, row,
                f"{value:.3f}" if np.isfinite(value) else "absent", va="center", fontsize=8)
    ax.set_yticks(rows, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title or "per-class IoU")
    return _save(fig, path)


def prediction_grid(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, path, *,
                    class_names: Sequence[str], ignore_label: int = 255) -> Path:
    """Model predictions on a few evaluation images.

    Segmentation (labels (B, H, W)): one row per image — the image, the true label map
    and the predicted one, coloured by class over the faded image (ignored pixels black).
    Classification (labels (B,)): the images titled "true → predicted".
    ``images`` are uint8 (B, H, W, C) with C = 1 or 3.
    """
    images = np.asarray(images)
    shown = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
    count = len(images)
    if np.ndim(labels) == 1:
        fig, axes = plt.subplots(1, count, figsize=(2.2 * count, 2.6), squeeze=False)
        for ax, image, y, p in zip(axes[0], shown, labels, predictions):
            ax.imshow(image)
            ax.set_title(f"{class_names[y]} → {class_names[p]}", fontsize=8, color="k" if y == p else "r")
            ax.axis("off")
        return _save(fig, path)
    colours = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")(np.arange(len(class_names)))[:, :3]

    def overlay(image, label):
        coloured = colours[np.minimum(label, len(class_names) - 1)]
        mixed = 0.35 * image / 255.0 + 0.65 * coloured
        return np.where((label == ignore_label)[..., None], 0.0, mixed)

    fig, axes = plt.subplots(count, 3, figsize=(9, 2.5 * count), squeeze=False)
    for row, (image, y, p) in enumerate(zip(shown, labels, predictions)):
        for ax, picture, name in zip(axes[row], (image, overlay(image, y), overlay(image, p)),
                                     ("image", "true labels", "prediction")):
            ax.imshow(picture, interpolation="nearest")
            ax.axis("off")
            if row == 0:
                ax.set_title(name)
    handles = [matplotlib.patches.Patch(color=c, label=n) for c, n in zip(colours, class_names)]
    axes[0, -1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
    return _save(fig, path)
