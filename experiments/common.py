"""Shared helpers of the experiment scripts: the output folder, the step count, writing rows."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STEP_COUNTS = ("paper", "patchdp")


def training_steps(epochs: int, batch_size: int, dataset_size: int, count: str = "paper") -> int:
    """DP-SGD steps T of a run of ``epochs`` epochs of batches of ``batch_size`` out of
    ``dataset_size`` examples.

    ``count = "paper"``: the paper's count, ceil(N/B) steps in every epoch, so
    T = ceil(N/B)·epochs (1500 for Cityscapes: N = 2975, B = 200, 100 epochs).
    ``count = "patchdp"``: patchdp's trainer, T = ceil(epochs·N/B) (1488 for Cityscapes),
    i.e. epochs·N examples drawn in expectation.
    """
    if count == "paper":
        if int(epochs) != epochs:
            raise ValueError(f"the paper's step count needs whole epochs, got {epochs}.")
        return math.ceil(dataset_size / batch_size) * int(epochs)
    if count == "patchdp":
        return math.ceil(epochs * dataset_size / batch_size)
    raise ValueError(f"step count must be one of {STEP_COUNTS}, got {count!r}.")


def write_rows(name: str, rows: list[dict], output_dir: Path = RESULTS) -> Path:
    """rows → <output_dir>/<name>.csv (and the same as JSON); returns the CSV path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return path


def progress(iterable, desc: str):
    """tqdm on a terminal, plain otherwise."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=not sys.stderr.isatty(), leave=False)
