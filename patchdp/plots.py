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


def inclusion_heatmap(p_map: np.ndarray, path, *, title: str = "") -> Path:
    """Heatmap of p(t) over patch placements (rows × columns of the unpadded image)."""
    fig, ax = plt.subplots(figsize=(6.4, 1.0 + 5 * min(p_map.shape[0] / max(p_map.shape[1], 1), 1.5)))
    image = ax.imshow(p_map, cmap="magma", vmin=0, interpolation="nearest")
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


def training_curves(records: Sequence[Mapping], path, *, title: str = "") -> Path:
    """Three panels against the step, from the records of a run's ``metrics.jsonl``:
    training loss (``kind == "train"``), ε spent (``"epsilon"``) and evaluation scores
    (``"eval"``)."""
    def series(kind, key):
        rows = [r for r in records if r["kind"] == kind and key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    score_keys = sorted({k for r in records if r["kind"] == "eval" for k in r} - {"kind", "step"})
    panels = [("training loss", [("loss", series("train", "loss"))]),
              ("ε spent", [("ε", series("epsilon", "epsilon"))]),
              ("evaluation", [(k, series("eval", k)) for k in score_keys])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (name, curves) in zip(axes, panels):
        for label, (x, y) in curves:
            ax.plot(x, y, label=label, marker="o" if len(x) <= 12 else None, ms=4)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
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
