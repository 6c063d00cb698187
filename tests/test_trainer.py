"""The training loop end to end on a tiny U-Net and 16x16 scenes: a run killed mid-way
and resumed equals an uninterrupted run, training stops before the ε budget is
exceeded, the run directory holds the report and the plots, classification trains and
scores accuracy, and `patchdp train` reports bad input in one line.

Every run compiles its step; the `patchdp train` processes share a persistent
compilation cache, so only the first one compiles. The tiny config and a finished run of
it are fixtures of tests/conftest.py, shared with tests/test_bad_inputs.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dp_accounting
import jax
import numpy as np
import pytest

from patchdp import accounting, clipping
from patchdp.checkpoint import Checkpointer
from patchdp.cli import main
from patchdp.config import Config
from patchdp.data import SyntheticScenes
from patchdp.mechanism import DPSGD
from patchdp.metrics import confusion_matrix
from patchdp.metrics import scores as scores_of
from patchdp.run_dir import Seeds
from patchdp.sampling import FixedSizeSampling
from patchdp.task import evaluate
from patchdp.trainer import make_plan, train




@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A persistent compilation cache shared by the `patchdp train` subprocesses."""
    return str(tmp_path_factory.mktemp("jax-cache"))


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
    progress = whole.stderr.read()  # a pipe, not a terminal: plain progress lines
    assert "patchdp: compiling the private step" in progress and "patchdp: step 24/24 (100%)  loss " in progress
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
    m = plan.mechanism
    eps = [accounting.epsilon(1.0, t, 1e-5, sampling=m.sampling, relation=m.relation, resolution=1e-3)
           for t in (5, 6)]
    budget = (eps[0] + eps[1]) / 2
    run_dir = tmp_path_factory.mktemp("budget")
    return train(config.replace(target_epsilon=budget), run_dir=run_dir, progress=False), run_dir, budget, eps


def test_training_stops_before_a_step_would_exceed_the_budget(budget_run):
    report, run_dir, budget, eps = budget_run
    assert report["steps"] == 5 and report["stop_reason"] == "budget" and report["steps_planned"] == 12
    assert report["privacy"]["epsilon_patch"] == pytest.approx(eps[0]) and eps[0] <= budget < eps[1]
    assert report["privacy"]["noise_multiplier"] == 1.0
    # no microbatch_size in the config: the cost model's schedule, recorded
    schedule = report["schedule"]
    assert schedule["microbatch_size"] == clipping.default_schedule(8).microbatch_size and schedule["basis"]


def test_the_run_directory_holds_the_report_and_the_plots(budget_run):
    report, run_dir, _, _ = budget_run
    for name in ("curves.png", "per_class.png", "predictions.png", "inclusion.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG", name
        assert f"]({name})" in (run_dir / "report.md").read_text(), f"report.md links {name}"
    assert set(report["per_class"]) == {"background", "disc", "box", "stripes", "sensitive"}
    assert "| sensitive | " in (run_dir / "report.md").read_text()
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert DPSGD.from_dict(saved["mechanism"]).epsilon(saved["steps"]) == saved["privacy"]["epsilon_patch"]
    for key in ("inclusion_probability", "sampling_rate", "effective_sampling_rate", "epsilon_patch", "epsilon_image",
                "epsilon_add_remove"):
        assert key in saved["privacy"]
    assert saved["privacy"]["epsilon_patch"] < saved["privacy"]["epsilon_image"]
    assert saved["privacy"]["epsilon_add_remove"] < saved["privacy"]["epsilon_image"]  # Δ = 1 instead of 2
    assert saved["same_epsilon"]["noise_multiplier_image"] > saved["privacy"]["noise_multiplier"]
    assert set(saved["scores"]) == {"miou", "pixel_accuracy"} and "NOT secure" in saved["seed"]
    markdown = (run_dir / "report.md").read_text()
    for text in ("ε patch-level, substitution", "ε image-level, substitution (paper's baseline)",
                 "ε image-level, add/remove + Poisson (Opacus/jax-privacy)", "p*", "w (effective sampling rate)", "miou"):
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


def test_real_digits_train_through_the_loader_interface(tmp_path):
    """scikit-learn's 8x8 digits (real images, no network) through the same loader, step,
    evaluation and report as every dataset. A smoke test: a few private steps of a tiny
    CNN do not learn the digits (nor do 60 non-private ones of this global-pooling CNN)."""
    pytest.importorskip("sklearn")
    config = Config(model="cnn", model_options={"width": 4, "stages": (1,)}, dataset="digits", crop=6, padding=2,
                    patch="rect:1x1", batch_size=16, noise_multiplier=1.0, steps=4, seed=0, log_every=1,
                    eval_batch_size=128, resolution=1e-3, tensorboard=False)
    report = train(config, run_dir=tmp_path, progress=False)
    assert report["steps"] == 4 and 0 <= report["scores"]["accuracy"] <= 1
    assert set(report["per_class"]) == set("0123456789")
    assert sum(c["labelled"] for c in report["per_class"].values()) == 357  # the whole validation split
    assert all(np.isfinite(r["loss"]) for r in train_records(tmp_path)) and len(train_records(tmp_path)) == 4
    assert not (tmp_path / "tensorboard").exists()


def test_evaluation_scores_exactly_the_requested_examples():
    """10 of 12 examples in batches of 4: the padded slots of the last batch count nowhere."""
    dataset = SyntheticScenes("validation", num_examples=12, image_size=16)
    all_background = lambda params, images, labels: (confusion_matrix(labels, 0 * labels, 5), None)
    scores = scores_of(evaluate(all_background, None, dataset, batch_size=4, count=10), "segmentation")
    labels = dataset.get_batch(np.arange(10))["label"]
    assert scores["pixel_accuracy"] == pytest.approx(np.mean(labels == 0))
    assert scores["miou"] == pytest.approx(np.mean(labels == 0) / 5)  # IoU 0 for the 4 other classes


def test_demo_trains_and_prints_the_table(capsys, tmp_path):
    tiny = ["--model-options", "{width = 4, levels = 1}", "--dataset-options", "{num_examples = 32, image_size = 16}",
            "--crop", "8", "--padding", "2", "--patch", "rect:3x3", "--batch-size", "8", "--steps", "4",
            "--eval-examples", "8", "--eval-batch-size", "8", "--resolution", "1e-3", "--run-dir", str(tmp_path)]
    assert main(["demo", *tiny]) == 0
    out = capsys.readouterr().out
    for text in ("wall time", "miou", "ε patch-level, substitution", "ε image-level, substitution (paper's baseline), "
                 "same noise", "ε image-level, add/remove + Poisson (Opacus/jax-privacy), same noise",
                 "noise z image-level DP needs"):
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
    m = plan.mechanism
    assert m.delta == 0.1 / 32 and plan.budget == 3.0
    assert accounting.epsilon(m.noise_multiplier, 12, 0.1 / 32, sampling=m.sampling, relation=m.relation,
                              resolution=1e-3) <= 3.0
    with pytest.raises(ValueError, match="delta 0.5 exceeds 1/N = 0.0312 for N = 32 training examples"):
        make_plan(config.replace(delta=0.5), 32, (16, 16, 3))
    with pytest.raises(ValueError, match="microbatch_size \\(3\\) must divide the batch of 8"):
        make_plan(config.replace(microbatch_size=3), 32, (16, 16, 3))
    with pytest.raises(ValueError, match="microbatch_size \\(8\\) must divide the batch of 8 slots split over 2 devices"):
        make_plan(config.replace(microbatch_size=8), 32, (16, 16, 3), devices=2)
    with pytest.raises(ValueError, match="the number of devices \\(3\\) must divide the batch of 8"):
        make_plan(config, 32, (16, 16, 3), devices=3)
    with pytest.raises(ValueError, match="batch_size 8 exceeds the 4 training examples"):
        make_plan(config, 4, (16, 16, 3))
    with pytest.raises(ValueError, match="larger than the padded image"):
        make_plan(config.replace(crop=40), 32, (16, 16, 3))


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.toml"], "no config file 'missing.toml'"),
    (["--config", "TINY", "--batch-size", "0"], "config: batch_size must be an integer >= 1"),
    (["--config", "TINY", "--crop", "40"], "larger than the padded image"),
    (["--config", "TINY", "--model-options", "{depth = 3}"], "no option 'depth'"),
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


# ---------------------------------------------------------------- a finished run: what resume, report and export promise


def snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    import shutil
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def test_a_refused_command_leaves_the_run_directory_as_it_was(finished, tiny, capsys):
    config, run_dir, _ = finished
    before = snapshot(run_dir)
    assert main(["train", "--config", str(tiny), "--noise-multiplier", "3", "--run-dir", str(run_dir)]) == 2
    assert "already holds the checkpoints of a run" in capsys.readouterr().err
    for change, differs in [({"clip_norm": 2.0}, "clip_norm 1.0 → 2.0"),
                            ({"crop": 6}, "crop.sizes [[8, 8]] → [[6, 6]]"),
                            ({"patch": "rect:2x2"}, "patch.name 'rect3x3' → 'rect2x2'"), ({"delta": 1e-6}, "delta 1e-05"),
                            ({"accounting": "image"}, "accounting 'patch' → 'image'"),
                            ({"sampling": "poisson"}, "sampling.type 'FixedSizeSampling' → 'PoissonSampling'"),
                            ({"target_epsilon": 50.0}, "target_epsilon (budget) None → 50.0"),
                            ({"clipping": "ghost"}, "clipping 'auto' → 'ghost'"),
                            ({"dataset_options": {"num_examples": 40, "image_size": 16}},
                             "sampling.dataset_size 32 → 40")]:
        with pytest.raises(ValueError, match=f"cannot resume {run_dir}: the config differs from its checkpoint in") as error:
            train(config.replace(**change), run_dir=run_dir, resume=True, progress=False)
        assert differs in str(error.value) and "\n" not in str(error.value)
    assert snapshot(run_dir) == before


def test_resume_refuses_a_checkpoint_whose_ledger_disagrees_with_its_step(finished, tmp_path):
    config, run_dir, _ = finished
    run_dir = copy_run(run_dir, tmp_path)
    with Checkpointer(run_dir / "checkpoints") as checkpoints:
        state, meta = checkpoints.restore()
    import shutil
    shutil.rmtree(run_dir / "checkpoints" / "4")
    meta["ledger"]["runs"] = [[1.0, 1]]  # "1 of 4 steps"
    with Checkpointer(run_dir / "checkpoints") as checkpoints:
        checkpoints.save(4, state, meta)
    with pytest.raises(ValueError, match="checkpoint is at step 4 but its ledger records 1 steps"):
        train(config, run_dir=run_dir, resume=True, progress=False)


def test_every_epsilon_of_a_resumed_run_is_its_ledgers(finished, tmp_path):
    """Resumed at z = 3 (config.json edited by hand): 4 steps at z = 1 and 4 at z = 3 are
    composed, in the report, the CLI table, metrics.jsonl and the image-level comparison."""
    config, run_dir, _ = finished
    run_dir = copy_run(run_dir, tmp_path)
    result = train(config.replace(noise_multiplier=3.0, steps=8), run_dir=run_dir, resume=True, progress=False)
    plan = make_plan(config, 32, (16, 16, 3))
    truth = {}
    for name in ("patch", "image"):
        ledger = plan.mechanism.replace(accounting=name).ledger()
        ledger.step(4)
        ledger.change_noise(3.0)
        ledger.step(4)
        truth[name] = ledger.epsilon()
    privacy = json.loads((run_dir / "report.json").read_text())["privacy"]
    assert privacy["noise_runs"] == [[1.0, 4], [3.0, 4]] and privacy["noise_multiplier"] is None
    assert privacy["epsilon_patch"] == pytest.approx(truth["patch"], rel=1e-12)
    assert privacy["epsilon_image"] == pytest.approx(truth["image"], rel=1e-12)
    # add/remove with Poisson sampling at the same rate, composed by dp_accounting itself
    add_remove = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for z in (1.0, 3.0):
        add_remove.compose(dp_accounting.PoissonSampledDpEvent(plan.mechanism.sampling_rate,
                                                               dp_accounting.GaussianDpEvent(z)), 4)
    assert privacy["epsilon_add_remove"] == pytest.approx(add_remove.get_epsilon(1e-5), rel=1e-3)
    only_z3 = plan.mechanism.replace(noise_multiplier=3.0).epsilon(8)
    assert truth["patch"] > 1.5 * only_z3  # what the report said before: the config's z times the steps
    epsilons = [r["epsilon"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "epsilon"]
    assert epsilons[-1] == pytest.approx(truth["patch"], rel=1e-12)
    from patchdp.cli import _run_table
    table = _run_table(result)
    assert f"{truth['patch']:.3f}" in table and "1 (4 steps), then 3 (4 steps)" in table


def test_a_run_without_amplification_or_noise_to_find_still_writes_its_report(tiny, tmp_path):
    """p* = 1 (the crop covers the image) and z = 1e5: ε = 0 and no noise level to
    calibrate; the run warns, and writes a strict JSON report with the reasons."""
    config = Config.from_toml(tiny, {"crop": 16, "padding": 0, "noise_multiplier": 1e5, "steps": 2})
    with pytest.warns(UserWarning, match="p\\* = 1: every crop covers the whole patch"):
        result = train(config, run_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert saved["warnings"] and saved["privacy"]["epsilon_patch"] == 0.0
    assert saved["privacy"]["epsilon_ratio"] is None and "undefined" in saved["privacy"]["epsilon_ratio_reason"]
    assert saved["same_epsilon"]["noise_multiplier_image"] is None
    assert "no noise multiplier reaches ε = 0" in saved["same_epsilon"]["noise_multiplier_image_reason"]
    markdown = (tmp_path / "report.md").read_text()
    assert "**Warning:** p* = 1" in markdown and "n/a (no noise multiplier reaches" in markdown
    assert (tmp_path / "curves.png").exists() and result["steps"] == 2


def test_secrets_live_in_their_own_private_file(finished):
    _, run_dir, result = finished
    path = run_dir / "secrets.json"
    assert path.stat().st_mode & 0o777 == 0o600
    secrets = json.loads(path.read_text())
    values = [secrets["sampling"], *map(str, secrets["key"])]
    assert all(len(v) >= 6 for v in values)  # OS entropy: long numbers that cannot appear by chance
    for file in (run_dir / "checkpoints").rglob("*"):
        if file.is_file():
            assert not any(v.encode() in file.read_bytes() for v in values), file
    assert "secrets.json" in result["secrets"] and "secrets.json" in (run_dir / "report.md").read_text()


def test_a_run_whose_directory_turns_read_only_ends_with_one_line(tiny, tmp_path, monkeypatch, capfd):
    """The checkpoint folder becomes immutable (chattr +i, as root) after the first save."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode:
        pytest.skip("chattr +i needs root")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    from patchdp import trainer
    save = trainer.Checkpointer.save

    def save_then_lock(self, step, state, meta):
        save(self, step, state, meta)
        subprocess.run(["chattr", "+i", str(self.directory)], check=True)

    monkeypatch.setattr(trainer.Checkpointer, "save", save_then_lock)
    run_dir = tmp_path / "run"
    try:
        with pytest.raises(trainer.RunDirectoryError) as error:
            train(Config.from_toml(tiny, {"steps": 8}), run_dir=run_dir, progress=False)
    finally:
        subprocess.run(["chattr", "-i", str(run_dir / "checkpoints")], check=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"cannot write {run_dir / 'checkpoints'}")
    assert f"patchdp train --resume {run_dir}" in message
    assert "Traceback" not in capfd.readouterr().err


def test_an_export_has_no_secret_and_rebuilds_the_model(finished, tmp_path):
    from patchdp.export import export_model, load_model, predict
    _, run_dir, result = finished
    out = export_model(run_dir, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "params.npz"]
    secrets = json.loads((run_dir / "secrets.json").read_text())
    for file in out.iterdir():
        assert not any(str(v).encode() in file.read_bytes() for v in (secrets["sampling"], *secrets["key"])), file
    model, params, info = load_model(out)
    assert info["class_names"] and info["privacy"]["epsilon_patch"] == result["privacy"]["epsilon_patch"]
    with np.load(out / "params.npz") as saved:
        assert not any("opt_state" in key or key.startswith(("mu", "nu")) for key in saved.files)
    _, trained = final_params(run_dir)
    images = SyntheticScenes("validation", num_examples=4, image_size=16).get_batch(np.arange(4))["image"]
    expected = predict(model, trained, images, "unit")
    np.testing.assert_array_equal(predict(model, params, images, info["input_normalization"]), expected)
    assert expected.shape == (4, 16, 16)


def test_export_verb_writes_the_same_export(finished, tmp_path, capsys):
    _, run_dir, _ = finished
    assert main(["export", str(run_dir), str(tmp_path / "cli"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"export": str(tmp_path / "cli")}
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["model.json", "params.npz"]
    assert main(["export", str(tmp_path), str(tmp_path / "none")]) == 2  # not a run directory: one line


def test_a_gaussian_augmentation_run_reports_its_own_guarantee(tiny, tmp_path, capsys):
    """accounting = "gaussian_augmentation": the report's ε is that of w = q·TV with
    Δ = sqrt(3·3 patch pixels · 3 channels)·255, computed here by accounting.epsilon."""
    sigma = 2000.0  # Δ / 2σ = 0.33: TV = 0.26, well below image-level's 1
    config = Config.from_toml(tiny, {"accounting": "gaussian_augmentation", "augmentation_noise": sigma, "steps": 3,
                                     "checkpoint_every": 0, "tensorboard": False})
    report = train(config, run_dir=tmp_path, progress=False)
    relation = accounting.GaussianAugmentation(sigma, np.sqrt(3 * 3 * 3) * 255)
    want = accounting.epsilon(1.0, 3, 1e-5, sampling=FixedSizeSampling(batch_size=8, dataset_size=32),
                              relation=relation, resolution=1e-3)
    p = report["privacy"]
    assert report["steps"] == 3 and p["augmentation_tv"] == pytest.approx(relation.amplification)
    assert p["epsilon_gaussian_augmentation"] == pytest.approx(want, rel=1e-9)
    assert p["epsilon_gaussian_augmentation"] < p["epsilon_image"] and 0.2 < p["augmentation_tv"] < 0.3
    assert "ε Gaussian augmentation, w = q·TV" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="needs augmentation_noise"):
        config.replace(augmentation_noise=None)


def test_ctrl_c_and_sigterm_end_cleanly_and_a_second_run_is_refused(tmp_path, tiny, cache):
    """Two `patchdp train` on one run directory: the second is refused in one line naming
    the first's pid. Ctrl-C ends the first after its step in flight, with a checkpoint
    whose ledger matches its step, one line giving the exact resume command, exit 130;
    SIGTERM ends the resumed run likewise with 143. Seeds are never rewritten."""
    run_dir = tmp_path / "run"
    steps = ["--steps", "100000", "--checkpoint-every", "1000", "--log-every", "1000"]
    first = cli("--config", str(tiny), "--run-dir", str(run_dir), *steps, cache_dir=cache)
    deadline = time.monotonic() + 120
    while not (run_dir / "secrets.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    second = cli("--config", str(tiny), "--run-dir", str(run_dir), cache_dir=cache)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and err.count("\n") == 1
    assert err.startswith(f"patchdp: error: {run_dir} is in use by pid {first.pid} on "), err
    secrets = (run_dir / "secrets.json").read_bytes()

    for process, signum, status in [(first, signal.SIGINT, 130), (None, signal.SIGTERM, 143)]:
        if process is None:
            process = cli("--resume", str(run_dir), cache_dir=cache)
        for line in process.stderr:  # a signal during compilation acts after the first step; wait for it
            if "took the first step" in line:
                break
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
        assert process.returncode == status, err[-2000:]
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"patchdp: interrupted by {signal.Signals(signum).name}: stopped after step "), last
        assert last.endswith(f"continue with `patchdp train --resume {run_dir}`"), last
        step, meta = final_params(run_dir)[0], None
        with Checkpointer(run_dir / "checkpoints") as checkpoints:
            _, meta = checkpoints.restore()
        assert f"stopped after step {step}," in last
        assert accounting.Ledger.from_dict(meta["ledger"], DPSGD.from_dict(meta["ledger"]["mechanism"])).steps == step
        assert (run_dir / "secrets.json").read_bytes() == secrets and not (run_dir / "run.lock").exists()
