"""The experiment scripts: every accounting figure runs in quick mode and writes its data
where asked; the paper's shapes, step count and settings are what the paper states; the
paper-setting training configs parse."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import figures  # noqa: E402
from common import training_steps  # noqa: E402

from patchdp.config import Config, config_path  # noqa: E402
from patchdp.trainer import make_plan  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Every figure in quick mode, once, into one temporary folder: name → JSON record."""
    out = tmp_path_factory.mktemp("figures")
    figures.main(["all", "--quick", "--output-dir", str(out)])
    return out, {name: json.loads((out / f"figure_{name}.json").read_text()) for name in figures.FIGURES}


def test_every_figure_writes_png_csv_json_with_its_settings(quick):
    out, records = quick
    for name, record in records.items():
        assert (out / f"figure_{name}.png").stat().st_size > 10_000
        with (out / f"figure_{name}.csv").open() as f:
            assert len(list(csv.DictReader(f))) == len(record["rows"]) > 0
        setting = record["settings"]["setting"]
        assert record["settings"]["quick"] and setting["delta"] == 1e-5 and setting["steps_T"] == 1000


def test_padding_creates_the_amplification_at_crop_500(quick):
    """Figure F's point: at crop 500, P = 0 a 10×10 patch is hit by every crop (p* = 1),
    so patch-level ε equals image-level ε; padding makes p* < 1 and ε smaller."""
    rows = [r for r in quick[1]["F"]["rows"] if r["part"] == "i" and r["crop"] == 500]
    at = {r["x"]: r for r in rows if r["sigma"] == 4.0}
    assert at[0]["p_star"] == 1.0 and at[0]["epsilon_patch"] == at[0]["epsilon_image"]
    assert at[50]["p_star"] < 1.0 and at[50]["epsilon_patch"] < at[50]["epsilon_image"]


def test_profiles_are_cut_below_the_floor_and_data_level_matches_closed_form(quick):
    rows = quick[1]["B"]["rows"]
    patch = [r for r in rows if r["curve"] == "patch"]
    assert any(r["delta"] is None for r in patch)  # cut (NaN → null) below the numerical floor
    data = {r["epsilon"]: r["delta"] for r in rows if r["curve"] == "data-level" and r["sigma_data"] == 1000.0}
    # Gaussian mechanism, μ = sqrt(20·20·3)·255 / 1000 = 8.833 (Balle & Wang 2018), at ε = 1
    eps = min(data, key=lambda e: abs(e - 1.0))
    mu = math.sqrt(1200) * 255 / 1000
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    assert data[eps] == pytest.approx(phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2), rel=1e-9)


def test_the_paper_patch_shapes_have_the_stated_pixel_counts():
    counts = {shape: figures.paper_patch(shape, 10) for shape in figures.D_SHAPES}
    assert {s: p.area for s, p in counts.items()} == dict(square=100, rectangle=200, circle=81, cluster=98, blob=172)
    assert counts["rectangle"].shape == (10, 20) and counts["circle"].shape == (11, 11)
    assert counts["cluster"].shape == (9, 19)  # two discs of radius 4, side by side


def test_square_patch_p_star_is_the_closed_form():
    # 10×10 patch, 100×100 crop, 1000×1000 image: (109 / 901)² (SCIENCE.md §5)
    assert figures.p_star((1000, 1000), 100, 0, "square", 10) == pytest.approx((109 / 901) ** 2, rel=1e-12)


def test_step_counts():
    assert training_steps(100, 200, 2975, "paper") == 1500  # the paper: ceil(N/B) per epoch
    assert training_steps(100, 200, 2975, "patchdp") == 1488  # patchdp: ceil(epochs·N/B)
    assert training_steps(25, 200, 18557, "paper") == 93 * 25
    assert training_steps(100, 100, 10 ** 5, "paper") == training_steps(100, 100, 10 ** 5, "patchdp") == 10 ** 5
    with pytest.raises(ValueError, match="whole epochs"):
        training_steps(1.5, 200, 2975, "paper")


# name → (N, image shape of the dataset after resizing, batch, steps at the paper's count)
PAPER_CONFIGS = {
    "cityscapes_deeplabv3plus": (2975, (1024, 2048, 3), 200, 1500),
    "cityscapes_pspnet": (2975, (1024, 2048, 3), 200, 1500),
    "a2d2_deeplabv3plus": (18557, (1208, 1920, 3), 200, 2325),
    "a2d2_pspnet": (18557, (1208, 1920, 3), 200, 2325),
    "mnist_resnet18": (60000, (28, 28, 1), 64, 14070),
    "mnist_vgg11": (60000, (28, 28, 1), 64, 14070),
    "dtd_resnet18": (1880, (300, 300, 3), 128, 2250),
    "dtd_vgg11": (1880, (300, 300, 3), 64, 4500),
}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_parse_at_the_paper_settings(name):
    size, shape, batch, steps = PAPER_CONFIGS[name]
    config = Config.from_toml(config_path(name))
    assert config.batch_size == batch and config.steps == steps
    assert config.delta == pytest.approx(1 / size, rel=1e-12) and config.delta <= 1 / size
    plan = make_plan(config.replace(target_epsilon=None, noise_multiplier=1.0), size, shape)
    assert plan.steps == steps and 0 < plan.mechanism.inclusion_probability < 1
