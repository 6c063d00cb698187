"""Data: the synthetic scenes, the tfds loaders (through tfds.testing.mock_data, which
serves tfds.data_source without TensorFlow), the folder loader on generated PNGs, and
the prefetcher."""

import itertools
import json
import threading

import numpy as np
import pytest
from PIL import Image

from patchdp.data import (
    IGNORE_LABEL, SENSITIVE_CLASS, SENSITIVE_SIZE, Prefetcher, SyntheticScenes, get_dataset, load_folder, load_tfds,
)
from patchdp.config import Config, config_path
from patchdp.data.dataset import resize_image
from patchdp.data.prepare import prepare
from patchdp.task import load_dataset
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


def test_missing_tfds_data_says_how_to_prepare_it(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="cityscapes-dataset.com") as error:
        load_tfds("cityscapes", "train", data_dir=str(tmp_path))
    assert f"`patchdp data prepare cityscapes --data-dir {tmp_path}`" in str(error.value)
    assert "\n" not in str(error.value)
    assert not [r for r in caplog.records if "Variant folder" in r.getMessage()], "tfds's warning is dropped"
    with pytest.raises(ValueError, match="load_folder"):
        load_tfds("voc", "train")


def test_prepare_builds_with_tfds_and_then_the_data_loads(tmp_path, mock_tfds):
    assert prepare("mnist", str(tmp_path)).startswith("mnist: prepared in ")
    assert len(load_tfds("mnist", "train", data_dir=str(tmp_path), download=True)) == 4


def test_prepare_says_in_one_line_what_building_needs(tmp_path, monkeypatch):
    def no_tensorflow(self, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_tensorflow)
    for call in (lambda: prepare("dtd", str(tmp_path)),
                 lambda: load_tfds("mnist", "train", data_dir=str(tmp_path), download=True)):
        with pytest.raises(ValueError, match=r"needs tensorflow.*pip install 'patchdp\[data\]'.*patchdp data prepare") as e:
            call()
        assert "\n" not in str(e.value)


def test_prepare_cityscapes_names_the_manual_download(tmp_path):
    (tmp_path / "downloads/manual").mkdir(parents=True)
    (tmp_path / "downloads/manual/gtFine_trainvaltest.zip").touch()
    with pytest.raises(ValueError, match=r"cityscapes-dataset.com, download leftImg8bit_trainvaltest.zip into"):
        prepare("cityscapes", str(tmp_path))
    assert prepare("synthetic").startswith("synthetic: nothing to prepare")
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        prepare("voc")


def make_a2d2_archive(source, drives, rng):
    """A miniature camera_lidar_semantic folder: 2 frames per drive, colour-coded labels."""
    (source / "class_list.json").parent.mkdir(parents=True, exist_ok=True)
    (source / "class_list.json").write_text(json.dumps({"#ff0000": "Car 1", "#00ff00": "Sky"}))
    for drive in drives:
        for n in range(2):
            label = np.where(rng.random((4, 6, 1)) < 0.5, [255, 0, 0], [0, 255, 0]).astype(np.uint8)
            write_png(source / f"{drive}/label/cam_front_center/{drive}_label_frontcenter_{n:09d}.png", label)
            write_png(source / f"{drive}/camera/cam_front_center/{drive}_camera_frontcenter_{n:09d}.png",
                      rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    return source


def test_a2d2_is_linked_into_the_folder_layout_and_loads(tmp_path):
    drives = [f"2018080{i}_000000" for i in range(11)]
    source = make_a2d2_archive(tmp_path / "camera_lidar_semantic", drives, np.random.default_rng(0))
    root = tmp_path / "a2d2"
    with pytest.raises(ValueError, match=r"not an A2D2 folder: no .*class_list.json.*a2d2.audi.*--source"):
        prepare("a2d2", str(root))
    assert prepare("a2d2", str(root), source=str(source)) == (
        f"a2d2: ready in {root}: 18 training and 4 validation images.")  # drives 0 and 10 validate
    config = Config(dataset="folder", noise_multiplier=1.0, crop=4, dataset_options={
        "root": str(root), "class_list": str(root / "class_list.json")})
    train, validation = load_dataset(config, "train"), load_dataset(config, "validation")
    assert (len(train), len(validation), train.class_names) == (18, 4, ("Car 1", "Sky"))
    first = validation.get_batch(np.array([0]))
    label_png = np.asarray(Image.open(source / drives[0] / "label/cam_front_center" / f"{drives[0]}_label_frontcenter_000000000.png"))
    np.testing.assert_array_equal(first["label"][0], np.where(label_png[..., 0] == 255, 0, 1))
    with pytest.raises(ValueError, match="no A2D2 label images"):
        prepare("a2d2", str(root), source=str(tmp_path))


@pytest.mark.parametrize("name", ["mnist_resnet18", "dtd_resnet18", "cityscapes_deeplabv3plus", "cityscapes_pspnet",
                                  "a2d2_deeplabv3plus"])
def test_every_shipped_config_without_its_data_says_in_one_line_how_to_get_it(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the a2d2 config's data/a2d2 is relative
    config = Config.from_toml(config_path(name))
    if config.dataset != "folder":
        config = config.replace(dataset_options={**config.dataset_options, "data_dir": str(tmp_path)})
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_dataset(config, config.train_split)
    assert "patchdp data prepare" in str(error.value) and "\n" not in str(error.value)


def test_digits_are_real_images_shipped_by_scikit_learn():
    pytest.importorskip("sklearn")
    train, validation = get_dataset("digits", "train"), get_dataset("digits", "validation")
    assert (len(train), len(validation), train.task, train.num_classes, train.image_shape) == (
        1440, 357, "classification", 10, (8, 8, 1))
    batch = train.get_batch(np.arange(10))
    assert batch["image"].dtype == np.uint8 and batch["image"].max() == 255 and batch["image"].min() == 0
    np.testing.assert_array_equal(batch["label"], np.arange(10))  # scikit-learn's first ten are 0..9
    assert np.bincount(validation.get_batch(np.arange(357))["label"], minlength=10).min() > 20


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
