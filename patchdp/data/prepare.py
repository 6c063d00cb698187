"""Getting the data of the shipped configs ready: ``patchdp data prepare NAME [--data-dir DIR]``.

=======================  =====================================================================
NAME                     what ``prepare`` does
=======================  =====================================================================
synthetic                nothing: the scenes are generated on the fly
digits                   nothing: scikit-learn ships them (``pip install scikit-learn``)
mnist, dtd,              downloads and builds the ArrayRecord files that
oxford_iiit_pet          ``tfds.data_source`` reads, in DIR (default ``$TFDS_DATA_DIR`` or
                         ``~/tensorflow_datasets``)
cityscapes               the same, once the licence's manual download is in
                         ``DIR/downloads/manual/`` (it says what to download otherwise)
a2d2                     checks the folder layout in DIR (default ``data/a2d2``); with
                         ``--source`` first links the extracted A2D2 archive into it
=======================  =====================================================================

Building tfds datasets needs TensorFlow (and ``importlib_resources``), which patchdp does
not install by default: ``pip install 'patchdp[data]'``. Reading the built files does not.
Every failure is one ValueError saying what is missing and the command that fixes it.

A2D2 (https://www.a2d2.audi, licence CC BY-ND 4.0, registration required): download the
semantic segmentation archive ``camera_lidar_semantic.tar`` and extract it. It holds
``<drive>/camera/cam_<view>/<drive>_camera_<view>_<n>.png``, the label images
``<drive>/label/cam_<view>/<drive>_label_<view>_<n>.png`` (colour-coded) and
``class_list.json`` ("#rrggbb" → class name). ``patchdp data prepare a2d2 --source
camera_lidar_semantic --data-dir data/a2d2`` links it into the layout of
:mod:`patchdp.data.folder`::

    data/a2d2/class_list.json
    data/a2d2/images/{train,validation}/<drive>/cam_<view>/<drive>_<view>_<n>.png
    data/a2d2/labels/{train,validation}/<drive>/cam_<view>/<drive>_<view>_<n>.png

Every tenth drive (in name order, from the first) goes to ``validation``, so no drive is
in both splits. (The archive's naming is taken from A2D2's documentation; no archive was
at hand to test against, so the tests use a miniature of it.)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from patchdp.data.tfds import DATASETS, prepare_command, quiet_tfds

__all__ = ["NAMES", "prepare", "check_a2d2", "link_a2d2"]

NAMES = ("synthetic", "digits", *DATASETS, "a2d2")
A2D2_DIR = "data/a2d2"
A2D2_SPLITS = ("train", "validation")
A2D2_HOWTO = ("A2D2 needs a manual download: register at https://www.a2d2.audi, download the semantic "
              "segmentation archive camera_lidar_semantic.tar, extract it and run `patchdp data prepare a2d2 "
              "--source camera_lidar_semantic --data-dir {root}` (layout: patchdp/data/prepare.py)")
CITYSCAPES_ZIPS = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")


def prepare(name: str, data_dir: str | None = None, *, source: str | None = None) -> str:
    """Prepares dataset ``name`` (one of :data:`NAMES`) and returns what it did, or
    raises ValueError saying what is missing and how to get it."""
    if name == "synthetic":
        return "synthetic: nothing to prepare, the scenes are generated on the fly."
    if name == "digits":
        if importlib.util.find_spec("sklearn") is None:
            raise ValueError("digits ship inside scikit-learn, which is not installed: pip install scikit-learn.")
        return "digits: ready (they ship inside scikit-learn)."
    if name == "a2d2":
        root = Path(data_dir or A2D2_DIR)
        if source is not None:
            link_a2d2(Path(source), root)
        return check_a2d2(root)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)} (your own images: "
                         "patchdp.data.load_folder).")
    if source is not None:
        raise ValueError("--source is for a2d2 only; tfds datasets are downloaded, or read from DIR/downloads/manual/.")
    return _prepare_tfds(name, data_dir)


def _prepare_tfds(name: str, data_dir: str | None) -> str:
    import tensorflow_datasets as tfds

    spec = DATASETS[name]
    root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()
    manual = root / "downloads" / "manual"
    with quiet_tfds():
        builder = tfds.builder(spec.tfds_name, data_dir=str(root), file_format="array_record")
        if builder.is_prepared():
            return f"{name}: ready in {builder.data_dir}."
        if name == "cityscapes":
            missing = [zip_name for zip_name in CITYSCAPES_ZIPS if not (manual / zip_name).is_file()]
            if missing:
                raise ValueError(f"cityscapes needs a manual download (its licence requires registration): register "
                                 f"at https://www.cityscapes-dataset.com, download {' and '.join(missing)} into "
                                 f"{manual}/, then run `{prepare_command(name, data_dir)}` again.")
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
        except ModuleNotFoundError as error:
            raise ValueError(f"building {name} needs {error.name}, which patchdp does not install by default "
                             "(TensorFlow is large; reading the built files does not need it): pip install "
                             "'patchdp[data]' (in a clone: .venv/bin/pip install -e '.[data]'), then run "
                             f"`{prepare_command(name, data_dir)}` again.") from None
    return f"{name}: prepared in {builder.data_dir}."


def check_a2d2(root: Path) -> str:
    """What ``root`` holds if it has the A2D2 layout (module docstring); else ValueError
    naming what is missing and how to get it."""
    missing = [str(root / "class_list.json")] if not (root / "class_list.json").is_file() else []
    counts = {}
    for split in A2D2_SPLITS:
        for kind in ("images", "labels"):
            folder = root / kind / split
            counts[kind, split] = sum(1 for _ in folder.rglob("*.png")) if folder.is_dir() else 0
            if not counts[kind, split]:
                missing.append(f"{folder}/ (PNGs)")
    if missing:
        raise ValueError(f"{root} is not an A2D2 folder: no {', no '.join(missing)}. "
                         + A2D2_HOWTO.format(root=root) + ".")
    return (f"a2d2: ready in {root}: {counts['images', 'train']} training and {counts['images', 'validation']} "
            "validation images.")


def link_a2d2(source: Path, root: Path) -> int:
    """Links the extracted A2D2 semantic segmentation archive ``source`` into the folder
    layout at ``root`` (module docstring; symbolic links, nothing is copied) and returns
    the number of image/label pairs linked."""
    labels = sorted(source.glob("*/label/*/*_label_*.png"))
    if not labels:
        raise ValueError(f"{source} holds no A2D2 label images (<drive>/label/cam_<view>/<drive>_label_<view>_<n>.png): "
                         "give the folder camera_lidar_semantic.tar extracts to.")
    if not (source / "class_list.json").is_file():
        raise ValueError(f"{source} has no class_list.json: give the folder camera_lidar_semantic.tar extracts to.")
    drives = sorted({label.parts[-4] for label in labels})
    validation = set(drives[::10])
    pairs = []
    for label in labels:
        drive, view = label.parts[-4], label.parent.name
        image = source / drive / "camera" / view / label.name.replace("_label_", "_camera_")
        if not image.is_file():
            raise ValueError(f"{label} has no camera image {image}; is the archive fully extracted?")
        pairs.append((drive, view, image, label))
    for drive, view, image, label in pairs:
        split = "validation" if drive in validation else "train"
        name = label.name.replace("_label_", "_")
        for kind, target in (("images", image), ("labels", label)):
            _link(root / kind / split / drive / view / name, target)
    _link(root / "class_list.json", source / "class_list.json")
    return len(pairs)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())
