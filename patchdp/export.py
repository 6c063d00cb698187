"""A shareable model from a run directory: the trained parameters and what rebuilds the
model, without the run's secrets (``secrets.json``: its sampling seed and step keys) and
without optimizer state.

    export_model(run_dir, out)      out/params.npz   the parameters (patchdp.models.save_params)
                                    out/model.json   model name and options, task, class names,
                                                     input normalization, privacy guarantee
    model, params, info = load_model(out)
    labels = predict(model, params, images, info["input_normalization"])

The parameters are those of the run's newest readable checkpoint; ``model.json`` carries
the run's privacy section of ``report.json`` (ε, δ, the noise runs) when the run finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from patchdp.checkpoint import Checkpointer
from patchdp.config import Config
from patchdp.models import get_model, load_params, save_params
from patchdp.trainer import load_dataset, normalize

__all__ = ["export_model", "load_model", "predict"]


def export_model(run_dir, out) -> Path:
    """Writes ``out/params.npz`` and ``out/model.json`` from the run in ``run_dir``; returns ``out``.

    Raises ValueError when ``run_dir`` holds no run with a checkpoint.
    """
    run_dir, out = Path(run_dir), Path(out)
    saved, checkpoints = run_dir / "config.json", run_dir / "checkpoints"
    if not saved.is_file() or not checkpoints.is_dir():
        raise ValueError(f"{run_dir} is not a run directory with checkpoints (config.json and checkpoints/).")
    config = Config.from_dict(json.loads(saved.read_text()))
    with Checkpointer(checkpoints) as opened:
        state, meta = opened.restore()
    dataset = load_dataset(config, config.train_split)
    report = run_dir / "report.json"
    info = {
        "model": config.model, "model_options": config.to_dict()["model_options"],
        "num_classes": dataset.num_classes, "class_names": list(dataset.class_names), "task": dataset.task,
        "input_normalization": config.input_normalization, "image_shape": list(dataset.image_shape),
        "steps": meta["step"],
        "privacy": json.loads(report.read_text())["privacy"] if report.is_file() else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_params(out / "params.npz", state["params"])
    (out / "model.json").write_text(json.dumps(info, indent=1, allow_nan=False))
    return out


def load_model(path) -> tuple:
    """(model, params, info) from an :func:`export_model` folder."""
    path = Path(path)
    info = json.loads((path / "model.json").read_text())
    model = get_model(info["model"], info["num_classes"], **info["model_options"])
    return model, load_params(path / "params.npz"), info


def predict(model, params, images, normalization: str) -> np.ndarray:
    """Predicted labels (a label map for segmentation) of uint8 images (B, H, W, C)."""
    logits = model.apply({"params": params}, normalize(jnp.asarray(images), normalization))
    return np.asarray(jnp.argmax(logits, axis=-1))
