"""The training loop end to end on a tiny U-Net and 16x16 scenes: a run killed mid-way
and resumed equals an uninterrupted run, training stops before the ε budget is
exceeded, the run directory holds the report and the plots, classification trains and
scores accuracy, and `patchdp train` reports bad input in one line.

Every run compiles its step; the three `patchdp train` processes of the kill-and-resume
test share a persistent compilation cache, so only the first one compiles.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from patchdp import accounting
from patchdp.checkpoint import Checkpointer
from patchdp.cli import main
from patchdp.config import Config
from patchdp.data import SyntheticScenes
from patchdp.metrics import confusion_matrix
from patchdp.trainer import Seeds, evaluate, make_plan, train

TINY = """
model = "unet"
dataset = "synthetic"
crop = 8
padding = 2
patch = "rect:3x3"
batch_size = 8
noise_multiplier = 1.0
delta = 1e-5
steps = 12
optimizer = "adam"
learning_rate = 1e-2
seed = 0
log_every = 1
epsilon_every = 4
checkpoint_every = 4
eval_examples = 8
eval_batch_size = 8
resolution = 1e-3

[model_options]
width = 4
levels = 1

[dataset_options]
num_examples = 32
image_size = 16
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A persistent compilation cache shared by the `patchdp train` subprocesses."""
    return str(tmp_path_factory.mktemp("jax-cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(TINY)
    return path


def cli(*args, cache_dir):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "patchdp.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def final_params(run_dir: Path):
    with Checkpointer(run_dir / "checkpoints") as checkpoints:
        state, meta = checkpoints.restore()
    return meta["step"], state["params"]


def train_records(run_dir: Path):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, tiny, cache):
    steps = ["--steps", "24", "--checkpoint-every", "4"]
    whole = cli("--config", str(tiny), "--run-dir", str(tmp_path / "whole"), *steps, cache_dir=cache)
    assert whole.wait(timeout=180) == 0, whole.stderr.read()[-2000:]
    killed = cli("--config", str(tiny), "--run-dir", str(tmp_path / "killed"), *steps, cache_dir=cache)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert killed.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "report.json").exists()
    interrupted_at, _ = final_params(tmp_path / "killed")
    assert 0 < interrupted_at < 24

    resumed = cli("--resume", str(tmp_path / "killed"), cache_dir=cache)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-2000:]

    (step_a, params_a), (step_b, params_b) = final_params(tmp_path / "whole"), final_params(tmp_path / "killed")
    assert step_a == step_b == 24
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(a, b)
    assert train_records(tmp_path / "whole") == train_records(tmp_path / "killed")
    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert report["steps"] == 24 and report["stop_reason"] == "completed"


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, tiny):
    """Noise z = 1 with a budget that affords 5 of the 12 planned steps."""
    config = Config.from_toml(tiny)
    plan = make_plan(config, 32, (16, 16, 3))
    eps = [accounting.epsilon(1.0, t, 1e-5, sampling=plan.sampling, relation=plan.relation, resolution=1e-3)
           for t in (5, 6)]
    budget = (eps[0] + eps[1]) / 2
    run_dir = tmp_path_factory.mktemp("budget")
    return train(config.replace(target_epsilon=budget), run_dir=run_dir, progress=False), run_dir, budget, eps


def test_training_stops_before_a_step_would_exceed_the_budget(budget_run):
    report, run_dir, budget, eps = budget_run
    assert report["steps"] == 5 and report["stop_reason"] == "budget" and report["steps_planned"] == 12
    assert report["privacy"]["epsilon_patch"] == pytest.approx(eps[0]) and eps[0] <= budget < eps[1]
    assert report["privacy"]["noise_multiplier"] == 1.0


def test_the_run_directory_holds_the_report_and_the_plots(budget_run):
    report, run_dir, _, _ = budget_run
    for name in ("curves.png", "predictions.png", "inclusion.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG", name
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for key in ("inclusion_probability", "sampling_rate", "effective_sampling_rate", "epsilon_patch", "epsilon_image"):
        assert key in saved["privacy"]
    assert saved["privacy"]["epsilon_patch"] < saved["privacy"]["epsilon_image"]
    assert saved["same_epsilon"]["noise_multiplier_image"] > saved["privacy"]["noise_multiplier"]
    assert set(saved["scores"]) == {"miou", "pixel_accuracy"} and "NOT secure" in saved["seed"]
    markdown = (run_dir / "report.md").read_text()
    for text in ("ε patch-level", "ε image-level", "p*", "w = q·p*", "miou"):
        assert text in markdown
    kinds = {r["kind"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert kinds == {"train", "epsilon", "eval"}
    assert Config.from_dict(json.loads((run_dir / "config.json").read_text())) == Config.from_dict(saved["config"])


def test_classification_trains_and_reports_accuracy(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = Config(model="cnn", model_options={"width": 4, "stages": (1,)}, dataset="mnist", eval_split="test", crop=10,
                    patch="rect:1x1", batch_size=4, noise_multiplier=1.0, steps=3, seed=1, eval_batch_size=4,
                    resolution=1e-3)
    with tfds.testing.mock_data(num_examples=8):
        report = train(config, run_dir=tmp_path, progress=False)
    assert report["steps"] == 3 and set(report["scores"]) == {"accuracy"}
    assert 0 <= report["scores"]["accuracy"] <= 1
    assert (tmp_path / "predictions.png").exists()


def test_evaluation_scores_exactly_the_requested_examples():
    """10 of 12 examples in batches of 4: the padded slots of the last batch count nowhere."""
    dataset = SyntheticScenes("validation", num_examples=12, image_size=16)
    all_background = lambda params, images, labels: (confusion_matrix(labels, 0 * labels, 5), None)
    scores = evaluate(all_background, None, dataset, batch_size=4, count=10)
    labels = dataset.get_batch(np.arange(10))["label"]
    assert scores["pixel_accuracy"] == pytest.approx(np.mean(labels == 0))
    assert scores["miou"] == pytest.approx(np.mean(labels == 0) / 5)  # IoU 0 for the 4 other classes


def test_demo_trains_and_prints_the_table(capsys, tmp_path):
    tiny = ["--model-options", "{width = 4, levels = 1}", "--dataset-options", "{num_examples = 32, image_size = 16}",
            "--crop", "8", "--padding", "2", "--patch", "rect:3x3", "--batch-size", "8", "--steps", "4",
            "--eval-examples", "8", "--eval-batch-size", "8", "--resolution", "1e-3", "--run-dir", str(tmp_path)]
    assert main(["demo", *tiny]) == 0
    out = capsys.readouterr().out
    for text in ("wall time", "miou", "ε patch-level", "ε image-level, same noise", "noise image-level DP needs"):
        assert text in out
    assert (tmp_path / "report.md").exists()


def test_seeds():
    a, b = Seeds.create(None), Seeds.create(None)
    assert a.sampling.secure and a != b
    assert Seeds.create(3) == Seeds.create(3) and not Seeds.create(3).sampling.secure
    assert Seeds.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    keys = Seeds.create(3).step_keys()
    assert not np.array_equal(jax.random.key_data(keys(0)), jax.random.key_data(keys(1)))


def test_plan_defaults_and_errors(tiny):
    config = Config.from_toml(tiny, {"delta": None, "noise_multiplier": None, "target_epsilon": 3.0})
    plan = make_plan(config, 32, (16, 16, 3))
    assert plan.delta == 1 / 32 and plan.budget == 3.0
    assert accounting.epsilon(plan.noise_multiplier, 12, 1 / 32, sampling=plan.sampling, relation=plan.relation,
                              resolution=1e-3) <= 3.0
    with pytest.raises(ValueError, match="microbatch_size \\(3\\) must divide the batch of 8"):
        make_plan(config.replace(microbatch_size=3), 32, (16, 16, 3))
    with pytest.raises(ValueError, match="batch_size 8 exceeds the 4 training examples"):
        make_plan(config, 4, (16, 16, 3))
    with pytest.raises(ValueError, match="larger than the padded image"):
        make_plan(config.replace(crop=40), 32, (16, 16, 3))


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.toml"], "no config file 'missing.toml'"),
    (["--config", "TINY", "--batch-size", "0"], "config: batch_size must be an integer >= 1"),
    (["--config", "TINY", "--crop", "40"], "larger than the padded image"),
    (["--config", "TINY", "--model-options", "{depth = 3}"], "no option \\['depth'\\]"),
    (["--config", "TINY", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--resume", "nowhere"], "nowhere is not a run directory"),
    (["--resume", "nowhere", "--config", "TINY"], "drop --config"),
    ([], "train needs --config"),
])
def test_train_errors_are_one_line(capsys, tmp_path, monkeypatch, tiny, args, message):
    monkeypatch.chdir(tmp_path)
    args = [str(tiny) if a == "TINY" else a for a in args]
    assert main(["train", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("patchdp: error: ")
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists(), "a failed run leaves no run directory behind"
