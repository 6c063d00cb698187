"""Shared settings and output helpers for the accounting experiments.

The paper's privacy-profile setting (docs/method.md, "Settings to check against"): 1000×1000 images, batch 100 of
N = 10^5 (fixed-size, q = 10^-3), 100 epochs (T = 10^5 steps), clip norm 2 with noise
std 1/2/4 on the clipped sum, i.e. noise multipliers z = 0.5/1/2, δ = 10^-5.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from patchdp import accounting
from patchdp.inclusion import CropSpec, Patch, inclusion_probability

IMAGE = (1000, 1000)
SAMPLING = accounting.FixedSizeSampling(batch_size=100, dataset_size=10 ** 5)
STEPS = SAMPLING.steps_for_epochs(100)
DELTA = 1e-5
NOISE_MULTIPLIERS = (0.5, 1.0, 2.0)
RESULTS = Path(__file__).resolve().parent / "results"


def patch_epsilon(z: float, crop: CropSpec, patch: Patch, image=IMAGE, steps: int = STEPS) -> tuple[float, float]:
    """(p*, ε at DELTA) for patch-level DP-SGD in the paper's setting."""
    p = inclusion_probability(image, crop, patch)
    return p, accounting.epsilon(z, steps, DELTA, sampling=SAMPLING, relation=accounting.PatchLevel(p))


def image_epsilon(z: float, steps: int = STEPS) -> float:
    """ε of standard image-level DP-SGD (minibatch sampling only) in the same setting."""
    return accounting.epsilon(z, steps, DELTA, sampling=SAMPLING, relation=accounting.ImageLevel())


def write_rows(name: str, rows: list[dict]) -> Path:
    """rows → results/<name>.csv (and the same as JSON), returns the CSV path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return path


def progress(iterable, desc: str):
    """tqdm on a terminal, plain otherwise."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=not sys.stderr.isatty(), leave=False)
