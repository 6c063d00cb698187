"""Named datasets read through ``tfds.data_source``: random access to ArrayRecord files
without TensorFlow (pillow decodes the images).

=================  ==============  ==========================================================
name               task            classes, labels
=================  ==============  ==========================================================
cityscapes         segmentation    the 19 Cityscapes train ids; every other label id → 255
oxford_iiit_pet    segmentation    trimap: 2 → 0 background, 1 → 1 pet, 3 (border) → 255
mnist              classification  10 digits, 28×28×1
dtd                classification  47 textures
=================  ==============  ==========================================================

Cityscapes images are 1024×2048 and MNIST 28×28; Oxford pets and DTD vary in size and
need ``image_size=(H, W)`` (see :mod:`patchdp.data.dataset` on resizing).

Nothing is downloaded unless ``download=True``. Prepare each dataset once, in the
ArrayRecord format that random access needs::

    pip install 'patchdp[data]'                 # building needs TensorFlow; reading does not
    patchdp data prepare mnist [--data-dir DIR]  # = download=True; see patchdp.data.prepare

Cityscapes needs a manual download first: register at https://www.cityscapes-dataset.com,
put ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` into
``DIR/downloads/manual/`` (DIR defaults to ``~/tensorflow_datasets``), then
``patchdp data prepare cityscapes``.

tfds logs a warning "Variant folder … has no dataset_info.json" whenever it looks for a
dataset that is not prepared yet; :func:`quiet_tfds` drops it (the error that follows,
if any, says what to do).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np

from patchdp.data.dataset import IGNORE_LABEL, SourceDataset, image_size_pair

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# Cityscapes label id -> train id, for the 19 evaluated classes (cityscapesScripts labels.py).
CITYSCAPES_TRAIN_IDS = dict(zip((7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33), range(19)))
PET_TRIMAP = {1: 1, 2: 0}  # trimap value -> class; 3 (border) and anything else -> ignore


def lookup_table(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 table sending each key of ``mapping`` to its value and every
    other byte to :data:`IGNORE_LABEL`."""
    table = np.full(256, IGNORE_LABEL, np.uint8)
    table[list(mapping)] = list(mapping.values())
    return table


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How one tfds dataset becomes a :class:`~patchdp.data.dataset.Dataset`."""

    tfds_name: str
    task: str
    image_key: str
    label_key: str
    channels: int
    native_size: tuple[int, int] | None  # None: images differ in size
    class_names: tuple[str, ...] | None = None  # None: the tfds ClassLabel names
    label_table: np.ndarray | None = None  # segmentation: raw mask value -> class
    manual: str = ""  # what to download by hand, if anything

    def decode(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
        """A tfds record → (uint8 image (H, W, C), label (H, W) or scalar)."""
        label = np.asarray(record[self.label_key])
        if self.label_table is not None:
            label = self.label_table[label[..., 0]]
        return record[self.image_key], label


DATASETS = {
    "cityscapes": TfdsSpec(
        "cityscapes/semantic_segmentation", "segmentation", "image_left", "segmentation_label", 3, (1024, 2048),
        CITYSCAPES_CLASSES, lookup_table(CITYSCAPES_TRAIN_IDS),
        manual="register at https://www.cityscapes-dataset.com and put leftImg8bit_trainvaltest.zip and "
               "gtFine_trainvaltest.zip into <data_dir>/downloads/manual/ first"),
    "oxford_iiit_pet": TfdsSpec("oxford_iiit_pet", "segmentation", "image", "segmentation_mask", 3, None,
                                ("background", "pet"), lookup_table(PET_TRIMAP)),
    "mnist": TfdsSpec("mnist", "classification", "image", "label", 1, (28, 28)),
    "dtd": TfdsSpec("dtd", "classification", "image", "label", 3, None),
}


class _DropVariantFolder(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Variant folder" not in record.getMessage()


@contextlib.contextmanager
def quiet_tfds():
    """Drops tfds's "Variant folder … has no dataset_info.json" warnings inside."""
    logger, drop = logging.getLogger("absl"), _DropVariantFolder()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that prepares dataset ``name``."""
    return f"patchdp data prepare {name}" + (f" --data-dir {data_dir}" if data_dir else "")


def load_tfds(name: str, split: str, *, data_dir: str | None = None, image_size: tuple[int, int] | int | None = None,
              download: bool = False, threads: int = 4) -> SourceDataset:
    """The ``split`` (a tfds split string such as ``"train"``, ``"validation"``,
    ``"test"`` or ``"train[:90%]"``) of dataset ``name`` (a key of :data:`DATASETS`).

    ``image_size``: (H, W) every image (and label map) is resized to; required for datasets
    whose images differ in size. ``data_dir``: the tfds data directory (default
    ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). ``download=True`` first prepares
    the data as :func:`patchdp.data.prepare.prepare` does (needs ``patchdp[data]``).

    Raises FileNotFoundError, in one line that gives the command to run, when the data
    are not prepared.
    """
    import tensorflow_datasets as tfds  # imported on use: it is slow to import

    if name not in DATASETS:
        raise ValueError(f"unknown tfds dataset {name!r}; choose one of {sorted(DATASETS)}, or load your own "
                         "images with patchdp.data.load_folder.")
    spec = DATASETS[name]
    size = spec.native_size if image_size is None else image_size_pair(image_size)
    if size is None:
        raise ValueError(f"{name} images differ in size; pass image_size=(H, W) to resize every image.")
    if download:
        from patchdp.data.prepare import prepare
        prepare(name, data_dir)
    try:
        with quiet_tfds():
            source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False,
                                      builder_kwargs={"file_format": "array_record"})
    except KeyError as error:  # tfds: the split is unknown or the dataset was never prepared
        manual = f"{spec.manual}, then " if spec.manual else ""
        where = data_dir or "the tfds data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
        raise FileNotFoundError(
            f"{name} split {split!r} is not prepared in {where} ({str(error).strip(chr(34))}). "
            f"To prepare it: {manual}run `{prepare_command(name, data_dir)}`.") from None
    class_names = spec.class_names or tuple(source.dataset_info.features[spec.label_key].names)
    return SourceDataset(source, spec.decode, task=spec.task, class_names=class_names,
                         image_shape=(*size, spec.channels), resize=image_size is not None, threads=threads)
