"""Config: TOML files and overrides, validation with messages that name the key, and
the shipped configurations (they parse, and their plans hold the paper's numbers)."""

import math

import numpy as np
import pytest

from patchdp import accounting
from patchdp import config as config_module
from patchdp.config import CONFIG_DIR, Config, config_path, parse_value
from patchdp.inclusion import CropSpec, Patch
from patchdp.trainer import make_plan

TOML = """
model = "unet"
crop = "16x24"
padding = 2
patch = "disc:5"
batch_size = 32
noise_multiplier = 1.5
seed = 7

[model_options]
width = 8
"""


def test_toml_file_with_overrides(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(TOML)
    config = Config.from_toml(path, {"batch_size": 16, "model_options": {"width": 4}})
    assert config.name == "small" and config.batch_size == 16 and dict(config.model_options) == {"width": 4}
    assert config.crop_spec == CropSpec((16, 24), padding=2)
    assert config.patch_shape.name == "disc5" and np.array_equal(config.patch_shape.mask, Patch.disc(5).mask)
    assert config.noise_multiplier == 1.5 and config.target_epsilon is None
    assert not config.secure and Config(noise_multiplier=1.0).secure
    assert Config.from_dict(config.to_dict()) == config


def test_values_are_normalised():
    config = Config(noise_multiplier=1, clip_norm=2, epochs=3, crop=[8, 12], output_size="8")
    assert (config.noise_multiplier, config.clip_norm, config.epochs) == (1.0, 2.0, 3.0)
    assert isinstance(config.clip_norm, float)
    assert config.crop == ((8, 12),) and config.output_size == (8, 8)
    mixture = Config(noise_multiplier=1.0, crop=["8x8", [16, 16]], crop_probabilities=[0.5, 0.5], output_size=8)
    assert mixture.crop_spec == CropSpec([(8, 8), (16, 16)], probabilities=[0.5, 0.5], output_size=8)
    with pytest.raises(TypeError):
        mixture.model_options["width"] = 3  # frozen all the way down


@pytest.mark.parametrize("text, value", [
    ("8", 8), ("1e-5", 1e-5), ("true", True), ("[256, 512]", [256, 512]), ("{width = 8}", {"width": 8}),
    ("rect:10x10", "rect:10x10"), ("256x512", "256x512"), ("none", None), ('"quoted"', "quoted"),
])
def test_command_line_values_read_as_toml(text, value):
    assert parse_value(text) == value


@pytest.mark.parametrize("changes, message", [
    (dict(noise_multiplier=None), "give noise_multiplier .* or target_epsilon"),
    (dict(noise_multiplier=0.0), "noise_multiplier must be a finite number in \\(0, inf\\)"),
    (dict(noise_multiplier=math.nan), "noise_multiplier"),
    (dict(target_epsilon=-1.0), "target_epsilon"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(batch_size=True), "batch_size"),
    (dict(clip_norm=0), "clip_norm"),
    (dict(delta=1.0), "delta must be a finite number in \\(0, 1\\)"),
    (dict(epochs=0), "epochs"),
    (dict(steps=0), "steps"),
    (dict(model="transformer"), "model must be one of .*unet"),
    (dict(model_options={"widht": 4}), "model_options has no option 'widht'; did you mean 'width'"),
    (dict(model_options=4), "model_options must be a table"),
    (dict(dataset="imagenet"), "dataset must be one of"),
    (dict(optimizer="rmsprop"), "optimizer must be one of sgd, momentum, adam"),
    (dict(sampling="shuffle"), "sampling must be one of fixed, poisson"),
    (dict(accounting="pixel"), "accounting must be one of patch, image"),
    (dict(clipping="fast"), "clipping must be one of auto, per_example"),
    (dict(crop="3x"), "crop must be N, 'HxW' or \\[H, W\\]"),
    (dict(crop=0), "crop"),
    (dict(crop=["8x8", "16x16"]), "crop: several crop sizes need `probabilities`"),
    (dict(crops_per_example=0), "crops_per_example"),
    (dict(padding=-1), "padding must be an integer >= 0"),
    (dict(patch="hexagon:3"), "patch: unknown patch"),
    (dict(patch="missing.npy"), "patch: patch mask file missing.npy does not exist"),
    (dict(flip="yes"), "flip must be true or false"),
    (dict(tensorboard=1), "tensorboard must be true or false"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed must be below 2\\*\\*63"),
    (dict(learning_rate=0), "learning_rate"),
    (dict(momentum=1.0), "momentum"),
    (dict(eval_every=-5), "eval_every"),
    (dict(log_every=0), "log_every"),
    (dict(name=""), "name must be a non-empty string"),
    (dict(accounting="gaussian_augmentation"), "accounting 'gaussian_augmentation' needs augmentation_noise"),
    (dict(accounting="gaussian_augmentation", augmentation_noise=0), "augmentation_noise must be a finite number"),
    (dict(augmentation_noise=-3.0), "augmentation_noise must be a finite number in \\(0, inf\\)"),
])
def test_invalid_values_are_rejected_with_the_key_named(changes, message):
    with pytest.raises(ValueError, match="^config: " + message):
        Config.from_dict({"noise_multiplier": 1.0, **changes})


def test_unknown_keys_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'batch_sise'; did you mean 'batch_size'"):
        Config.from_dict({"noise_multiplier": 1.0, "batch_sise": 3})
    with pytest.raises(ValueError, match="does not exist"):
        Config.from_toml(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("batch_size = = 3")
    with pytest.raises(ValueError, match="not valid TOML"):
        Config.from_toml(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="shipped configs: .*demo"):
        config_path("no-such-config")
    assert config_path("demo") == CONFIG_DIR / "demo.toml"


# Training-set size and image shape of each shipped config's dataset.
SHIPPED = {
    "demo": (4096, (64, 64, 3)),
    "cityscapes_deeplabv3plus": (2975, (1024, 2048, 3)),
    "cityscapes_pspnet": (2975, (1024, 2048, 3)),
    "a2d2_deeplabv3plus": (18557, (1208, 1920, 3)),
    "a2d2_pspnet": (18557, (1208, 1920, 3)),
    "mnist_resnet18": (60000, (28, 28, 1)),
    "mnist_vgg11": (60000, (28, 28, 1)),
    "dtd_resnet18": (1880, (300, 300, 3)),
    "dtd_vgg11": (1880, (300, 300, 3)),
}


def test_every_shipped_config_is_listed_here():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_parse_and_plan(name):
    config = Config.from_toml(config_path(name), {"resolution": 1e-3})
    size, shape = SHIPPED[name]
    mechanism = make_plan(config, size, shape).mechanism
    assert 0 < mechanism.inclusion_probability < 1 and mechanism.noise_multiplier > 0
    if config.target_epsilon is not None:
        steps = make_plan(config, size, shape).steps
        eps = accounting.epsilon(mechanism.noise_multiplier, steps, mechanism.delta, sampling=mechanism.sampling,
                                 relation=mechanism.relation, resolution=1e-3)
        assert eps <= config.target_epsilon and mechanism.epsilon(steps) == eps


def test_the_paper_settings():
    cityscapes = make_plan(Config.from_toml(config_path("cityscapes_deeplabv3plus")), 2975, (1024, 2048, 3))
    mechanism = cityscapes.mechanism
    assert cityscapes.steps == 1500 and mechanism.sampling_rate == 200 / 2975  # the paper's ceil(N/B) per epoch
    assert mechanism.inclusion_probability == pytest.approx(0.32906, abs=1e-5)
    assert mechanism.delta == 1 / 2975
    mnist = Config.from_toml(config_path("mnist_resnet18"))
    assert (mnist.crop, mnist.patch, mnist.batch_size, mnist.epochs, mnist.clip_norm) == \
        (((10, 10),), "rect:1x1", 64, 15.0, 1.0)


def test_clipping_choices_are_the_libraries():
    from patchdp.clipping import CLIPPING

    assert config_module.CLIPPING == CLIPPING
