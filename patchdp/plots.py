"""Figures people would rather look at than read. Matplotlib with the Agg backend, so
they render on headless machines; every function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
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
              logx: bool = False, xticklabels: Sequence[str] | None = None) -> Path:
    """One line per named (x, y) curve; ``xticklabels`` names categorical x = 0, 1, …"""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, marker="o" if len(x) <= 12 else None, ms=4)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
