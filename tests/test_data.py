"""Data: the synthetic scenes, the tfds loaders (through tfds.testing.mock_data, which
serves tfds.data_source without TensorFlow), the folder loader on generated PNGs, and
the prefetcher."""

import itertools
import threading

import numpy as np
import pytest
from PIL import Image

from patchdp.data import (
    IGNORE_LABEL, SENSITIVE_CLASS, SENSITIVE_SIZE, Prefetcher, SyntheticScenes, get_dataset, load_folder, load_tfds,
)
from patchdp.data.dataset import resize_image
from patchdp.data.tfds import CITYSCAPES_TRAIN_IDS, DATASETS, lookup_table

tfds = pytest.importorskip("tensorflow_datasets")


# ---------------------------------------------------------------- synthetic scenes


def test_synthetic_batches_have_the_promised_shapes_and_classes():
    ds = SyntheticScenes("train")
    batch = ds.get_batch(np.arange(64))
    assert (len(ds), ds.task, ds.num_classes, ds.image_shape) == (4096, "segmentation", 5, (64, 64, 3))
    assert batch["image"].shape == (64, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (64, 64, 64) and batch["label"].dtype == np.int32
    counts = np.bincount(batch["label"].ravel(), minlength=5)
    assert len(counts) == 5 and counts.min() > 0 and counts.argmax() == 0
    assert all((label == SENSITIVE_CLASS).any() for label in batch["label"]), "every scene has a sensitive object"


def test_synthetic_scene_is_a_function_of_seed_split_and_index_alone():
    a = SyntheticScenes("train", seed=3).get_batch(np.array([5, 2, 5]))
    b = SyntheticScenes("train", seed=3, num_examples=6).get_batch(np.array([2]))
    np.testing.assert_array_equal(a["image"][1], b["image"][0])
    np.testing.assert_array_equal(a["label"][1], b["label"][0])
    np.testing.assert_array_equal(a["image"][0], a["image"][2])
    other_seed = SyntheticScenes("train", seed=4).get_batch(np.array([2]))
    validation = SyntheticScenes("validation", seed=3).get_batch(np.array([2]))
    assert not np.array_equal(other_seed["image"], b["image"])
    assert not np.array_equal(validation["image"], b["image"])


def test_each_sensitive_object_fits_the_advertised_patch():
    batch = SyntheticScenes("train", num_examples=40, max_sensitive=1, image_size=32).get_batch(np.arange(40))
    for label in batch["label"]:
        rows, cols = np.nonzero(label == SENSITIVE_CLASS)
        assert 0 < np.ptp(rows) + 1 <= SENSITIVE_SIZE and 0 < np.ptp(cols) + 1 <= SENSITIVE_SIZE


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="test"), "split"), (dict(image_size=8), "image_size"), (dict(seed=-1), "seed"),
    (dict(num_examples=0), "num_examples"), (dict(max_sensitive=0), "max_sensitive"),
])
def test_synthetic_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticScenes(**kwargs)


@pytest.mark.parametrize("indices, error", [
    (np.array([0, 8]), IndexError), (np.array([-1]), IndexError), (np.zeros((2, 2), int), ValueError),
    (np.array([0.0]), ValueError), (np.array([], int), ValueError),
])
def test_get_batch_validates_indices(indices, error):
    with pytest.raises(error):
        SyntheticScenes("validation", num_examples=8).get_batch(indices)


def test_get_dataset_dispatches_and_rejects_unknown_names():
    assert len(get_dataset("synthetic", "validation", num_examples=8)) == 8
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("imagenet", "train")


@pytest.mark.parametrize("old, new", [(60, 17), (60, 41), (30, 90)])
def test_resize_footprint_bound_in_the_docs_holds(old, new):
    """A p-pixel change influences at most ceil((p + 2r) new / old) + 1 resized pixels."""
    rng = np.random.default_rng(0)
    r = max(1, old / new)
    for p, a in itertools.product((1, 4), range(0, old - 4, 5)):
        x = rng.integers(0, 256, (2, old, 1), dtype=np.uint8)
        y = x.copy()
        y[:, a:a + p] = 255 - y[:, a:a + p]
        changed = np.nonzero((resize_image(x, (2, new)) != resize_image(y, (2, new))).any(axis=(0, 2)))[0]
        assert np.ptp(changed) + 1 <= np.ceil((p + 2 * r) * new / old) + 1


# ---------------------------------------------------------------- tfds


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=4):
        yield


def test_mnist(mock_tfds):
    ds = load_tfds("mnist", "train")
    batch = ds.get_batch(np.array([3, 0]))
    assert (len(ds), ds.task, ds.num_classes, ds.image_shape) == (4, "classification", 10, (28, 28, 1))
    assert batch["image"].shape == (2, 28, 28, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (2,) and batch["label"].dtype == np.int32
    assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()


def test_dtd_needs_and_applies_an_image_size(mock_tfds):
    with pytest.raises(ValueError, match="image_size"):
        load_tfds("dtd", "train")
    ds = load_tfds("dtd", "train", image_size=(24, 32))
    assert ds.num_classes == 47
    assert ds.get_batch(np.arange(4))["image"].shape == (4, 24, 32, 3)


@pytest.mark.parametrize("name, size, allowed", [
    ("oxford_iiit_pet", (32, 32), {0, 1, IGNORE_LABEL}),
    ("cityscapes", (16, 32), set(range(19)) | {IGNORE_LABEL}),
])
def test_segmentation_masks_map_to_classes_and_ignore(mock_tfds, name, size, allowed):
    ds = load_tfds(name, "train", image_size=size)
    batch = ds.get_batch(np.arange(2))
    assert batch["image"].shape == (2, *size, 3) and batch["label"].shape == (2, *size)
    assert set(np.unique(batch["label"])) <= allowed


def test_label_tables():
    pets = DATASETS["oxford_iiit_pet"].decode({"image": None, "segmentation_mask": np.array([[[1], [2], [3], [0]]])})
    np.testing.assert_array_equal(pets[1], [[1, 0, IGNORE_LABEL, IGNORE_LABEL]])
    table = lookup_table(CITYSCAPES_TRAIN_IDS)
    assert (table[7], table[26], table[33], table[0], table[34], table[255]) == (0, 13, 18, 255, 255, 255)
    assert sorted(table[table != IGNORE_LABEL]) == list(range(19))


def test_missing_tfds_data_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cityscapes-dataset.com"):
        load_tfds("cityscapes", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="load_folder"):
        load_tfds("voc", "train")


# ---------------------------------------------------------------- folder


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root, sizes, rng, split="train"):
    """Random RGB images with class-id labels in {0, 1, 2, 255}; returns them by name."""
    data = {}
    for i, (h, w) in enumerate(sizes):
        name = f"city{i % 2}/img{i}"
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.choice(np.uint8([0, 1, 2, 255]), (h, w))
        write_png(root / "images" / split / f"{name}.png", image)
        write_png(root / "labels" / split / f"{name}.png", label)
        data[name] = image, label
    return data


def test_folder_pairs_images_with_labels(tmp_path):
    data = make_folder(tmp_path, [(12, 16)] * 3, np.random.default_rng(0))
    ds = load_folder(tmp_path, "train", class_names=("a", "b", "c"))
    assert (len(ds), ds.image_shape, ds.num_classes) == (3, (12, 16, 3), 3)
    batch = ds.get_batch(np.array([2, 0]))
    names = sorted(data)  # examples are ordered by relative path
    for out, name in enumerate([names[2], names[0]]):
        np.testing.assert_array_equal(batch["image"][out], data[name][0])
        np.testing.assert_array_equal(batch["label"][out], data[name][1])


def test_folder_of_mixed_sizes_needs_an_image_size(tmp_path):
    make_folder(tmp_path, [(12, 16), (20, 10)], np.random.default_rng(0))
    ds = load_folder(tmp_path, "train", class_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="image_size"):
        ds.get_batch(np.array([0, 1]))
    batch = load_folder(tmp_path, "train", class_names=("a", "b", "c"), image_size=8).get_batch(np.array([0, 1]))
    assert batch["image"].shape == (2, 8, 8, 3)
    assert set(np.unique(batch["label"])) <= {0, 1, 2, IGNORE_LABEL}  # nearest neighbour: no new values


def test_folder_translates_colour_labels_with_a_palette(tmp_path):
    colours = np.uint8([[[255, 0, 0], [0, 0, 255], [1, 2, 3]]])
    write_png(tmp_path / "images/val/x.jpg", np.zeros((1, 3, 3), np.uint8))
    write_png(tmp_path / "labels/val/x.png", colours)
    ds = load_folder(tmp_path, "val", class_names=("car", "sky"), palette={"#0000ff": 1, (255, 0, 0): 0})
    np.testing.assert_array_equal(ds.get_batch(np.array([0]))["label"], [[[0, 1, IGNORE_LABEL]]])
    with pytest.raises(ValueError, match="palette"):
        load_folder(tmp_path, "val", class_names=("car", "sky")).get_batch(np.array([0]))


def test_folder_errors_say_what_is_wrong(tmp_path):
    make_folder(tmp_path, [(4, 4)], np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"no split 'test'.*train"):
        load_folder(tmp_path, "test", class_names=("a",))
    with pytest.raises(ValueError, match=r"label values \[1, 2\]"):
        load_folder(tmp_path, "train", class_names=("a",)).get_batch(np.array([0]))
    write_png(tmp_path / "images/train/lonely.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no label"):
        load_folder(tmp_path, "train", class_names=("a", "b", "c"))


# ---------------------------------------------------------------- prefetcher


def test_prefetcher_yields_results_in_order():
    with Prefetcher(lambda i: i * i, range(20), depth=3) as batches:
        assert list(batches) == [i * i for i in range(20)]


def test_prefetcher_loads_the_next_item_while_the_consumer_works():
    started = {i: threading.Event() for i in range(3)}

    def load(i):
        started[i].set()
        return i

    with Prefetcher(load, range(3), depth=1) as batches:
        assert next(batches) == 0
        assert started[1].wait(timeout=10), "item 1 was not loaded while item 0 was in use"
        assert list(batches) == [1, 2]


def test_prefetcher_reraises_load_errors_in_position():
    def load(i):
        if i == 2:
            raise RuntimeError("bad record")
        return i

    batches = Prefetcher(load, range(5))
    assert [next(batches), next(batches)] == [0, 1]
    with pytest.raises(RuntimeError, match="bad record"):
        next(batches)
    assert list(batches) == []


def test_prefetcher_close_stops_an_endless_source():
    loaded = []
    batches = Prefetcher(lambda i: loaded.append(i) or i, itertools.count(), depth=2)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    batches.close()
    assert not batches._thread.is_alive()
    assert len(loaded) <= 3 + 2 + 1
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda i: i, [], depth=0)
