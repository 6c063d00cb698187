"""Pretrained parameters from a local file: save, load, and merge into a fresh model.

Nothing here downloads. A parameter file holds a nested dict of float arrays (a params
pytree, or a subtree of one such as ``{"backbone": ...}``), in one of two formats chosen
by the file suffix:

- ``.msgpack`` — ``flax.serialization.msgpack_serialize`` of the nested dict;
- ``.npz`` — ``numpy.savez`` with one array per leaf, keyed by its path joined with
  ``"/"`` (e.g. ``"backbone/stem/conv/kernel"``), convenient to write from other tools.

Layouts are Flax's: convolution kernels (kh, kw, in, out), dense kernels (in, out).
:func:`patchdp.models.from_torchvision` converts torchvision ResNet weights.
"""

from __future__ import annotations

import os
from typing import Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

FORMATS = (".msgpack", ".npz")


def _format(path) -> str:
    suffix = os.path.splitext(os.fspath(path))[1]
    if suffix not in FORMATS:
        raise ValueError(f"parameter file {path} must end in one of {FORMATS}, got {suffix!r}.")
    return suffix


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        flat.update(_flatten(value, path + "/") if isinstance(value, Mapping) else {path: np.asarray(value)})
    return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = np.asarray(value)
    return tree


def save_params(path, params: Mapping) -> None:
    """Write a nested dict of arrays to ``path`` (.msgpack or .npz)."""
    flat = _flatten(params)
    if _format(path) == ".npz":
        np.savez(path, **flat)
    else:
        with open(path, "wb") as f:
            f.write(flax.serialization.msgpack_serialize(_unflatten(flat)))


def load_params(path) -> dict:
    """Read a nested dict of numpy arrays from ``path`` (.msgpack or .npz)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no parameter file at {path}; patchdp never downloads weights, "
                                "see patchdp.models.pretrained for the expected format.")
    if _format(path) == ".npz":
        with np.load(path) as data:
            return _unflatten({key: data[key] for key in data.files})
    with open(path, "rb") as f:
        return flax.serialization.msgpack_restore(f.read())


def merge_params(params: Mapping, pretrained: Mapping) -> dict:
    """``params`` with every leaf present in ``pretrained`` replaced by it.

    ``pretrained`` must be a subtree of ``params`` with identical shapes (leaves missing
    from it, such as a new classifier head, keep their initial values); anything else is a
    ValueError listing every mismatch. Dtypes follow ``params``.
    """
    target, source = _flatten(params), _flatten(pretrained)
    problems = [f"{k}: not in the model" for k in source if k not in target]
    problems += [f"{k}: shape {source[k].shape} in the file, {target[k].shape} in the model"
                 for k in source if k in target and source[k].shape != target[k].shape]
    if problems:
        raise ValueError("pretrained parameters do not fit the model (converted BatchNorm weights need "
                         "norm='affine', or backbone_norm='affine' in segmentation nets, and the "
                         "ImageNet stem):\n  " + "\n  ".join(problems))
    merged = _unflatten({k: source[k].astype(v.dtype) if k in source else v for k, v in target.items()})
    return jax.tree.map(jnp.asarray, merged)
