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
from patchdp.files import read_json, write_atomic
from patchdp.models import get_model, load_params, save_params
from patchdp.run_dir import RunDirectory
from patchdp.task import load_dataset, normalize

__all__ = ["export_model", "load_model", "predict"]


def export_model(run_dir, out) -> Path:
    """Writes ``out/params.npz`` and ``out/model.json`` from the run in ``run_dir``; returns ``out``.

    Raises ValueError in one line when ``run_dir`` holds no run with a checkpoint, when its
    ``config.json`` is damaged, or when no checkpoint reads (a damaged newest one falls
    back to the previous with a warning, as for ``--resume``).
    """
    run, out = RunDirectory(run_dir), Path(out)
    if not run.config_file.is_file() or not run.checkpoints.is_dir():
        raise ValueError(f"{run.path} is not a run directory with checkpoints (config.json and checkpoints/).")
    config = run.read_config()
    with Checkpointer(run.checkpoints) as opened:
        state, meta = opened.restore()
    dataset = load_dataset(config, config.train_split)
    report = run.path / "report.json"
    info = {
        "model": config.model, "model_options": config.to_dict()["model_options"],
        "num_classes": dataset.num_classes, "class_names": list(dataset.class_names), "task": dataset.task,
        "input_normalization": config.input_normalization, "image_shape": list(dataset.image_shape),
        "steps": meta["step"],
        "privacy": read_json(report).get("privacy") if report.is_file() else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_params(out / "params.npz", state["params"])
    write_atomic(out / "model.json", json.dumps(info, indent=1, allow_nan=False))
    return out


def load_model(path) -> tuple:
    """(model, params, info) from an :func:`export_model` folder."""
    path = Path(path)
    info = read_json(path / "model.json")
    model = get_model(info["model"], info["num_classes"], **info["model_options"])
    return model, load_params(path / "params.npz"), info


def predict(model, params, images, normalization: str) -> np.ndarray:
    """Predicted labels (a label map for segmentation) of uint8 images (B, H, W, C)."""
    logits = model.apply({"params": params}, normalize(jnp.asarray(images), normalization))
    return np.asarray(jnp.argmax(logits, axis=-1))
