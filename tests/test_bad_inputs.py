"""Every bad input is a clear error: one table of bad or edge inputs, CLI and API.

A CLI row gives argv (``{tmp}`` is a folder holding the broken files below), the exit
status and a pattern its output must contain: for status 2, the one stderr line, which
names the offending value or file; for status 0, what stdout or the warning line says.
Every CLI row also checks that no traceback was printed, that ``--json`` output is
strict JSON, and that a refused command wrote nothing. An API row gives a call, the
exception (or warning) type and a pattern of its message.
"""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from patchdp import accounting as A
from patchdp.cli import main
from patchdp.config import Config
from patchdp.inclusion import CropSpec, Patch, inclusion_map, inclusion_probability
from patchdp.mechanism import DPSGD
from patchdp.sampling import FixedSizeSampling

SMALL = ["--image-size", "64", "--crop", "16", "--patch", "rect:4x4", "--batch-size", "32",
         "--dataset-size", "1000", "--steps", "200", "--resolution", "1e-3"]
NO_STEPS = SMALL[:-4] + SMALL[-2:]
FIXED = FixedSizeSampling(batch_size=32, dataset_size=1000)
QUICK = dict(sampling=FIXED, resolution=1e-3)
MECHANISM = DPSGD(sampling=FIXED, clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, accounting="image", resolution=1e-3)
LEDGER = {"mechanism": MECHANISM.to_dict(), "budget_epsilon": None, "runs": []}


def make_files(tmp):
    """The broken inputs the rows name."""
    good = tmp / "good.npy"
    np.save(good, np.ones((3, 3), bool))
    data = good.read_bytes()
    (tmp / "truncated.npy").write_bytes(data[:-4])
    (tmp / "empty.npy").write_bytes(b"")
    (tmp / "junk.npy").write_bytes(b"not numpy at all " * 8)
    np.save(tmp / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp / "float.npy", np.full((3, 3), 0.5))
    np.save(tmp / "cube.npy", np.ones((2, 2, 2), bool))
    (tmp / "folder.npy").mkdir()
    (tmp / "heatmaps").mkdir()
    (tmp / "a_file").write_text("not a folder")
    (tmp / "binary.toml").write_bytes(b"\xff\xfe\x00\x01binary")
    (tmp / "broken.toml").write_text("batch_size = = 3\n")
    (tmp / "typo.toml").write_text("noise_multiplier = 1.0\n[dataset_options]\nimag_size = 64\n")
    (tmp / "typed.toml").write_text('noise_multiplier = 1.0\n[dataset_options]\nimage_size = "64"\n')


CLI = [
    # argparse abbreviations are refused, not expanded
    (["demo", "--epsilon", "8"], 2, "unrecognized arguments: --epsilon 8"),
    (["demo", "--output", "64"], 2, "unrecognized arguments: --output 64"),
    (["privacy", *SMALL, "--nois", "2"], 2, "unrecognized arguments: --nois"),
    (["calibrate", *SMALL, "--epsilon", "3", "--eps", "3"], 2, "unrecognized arguments: --eps"),
    (["train", "--config", "demo", "--batch", "8"], 2, "unrecognized arguments: --batch"),
    (["inclusion", "--heat", "x.png"], 2, "unrecognized arguments: --heat"),
    # noise, δ, ε and grid values out of range
    (["privacy", *SMALL, "--noise", "1e-300"], 2, "z = 1e-300 is outside"),
    (["privacy", *SMALL, "--noise", "1e300"], 2, r"z = 1e\+300 is outside"),
    (["privacy", *SMALL, "--noise", "nan"], 2, "noise_multiplier .* got nan"),
    (["privacy", *SMALL, "--delta", "nan"], 2, "delta must be a finite number in .* got nan"),
    (["privacy", *SMALL, "--delta", "1.5"], 2, "delta must be a finite number in .* got 1.5"),
    (["privacy", *SMALL, "--resolution", "0"], 2, "resolution .* got 0"),
    (["privacy", *SMALL, "--resolution", "1"], 2, "resolution .* got 1"),
    (["calibrate", *SMALL, "--epsilon", "inf"], 2, "epsilon must be a finite number in .* got inf"),
    (["privacy", *NO_STEPS, "--epochs", "0"], 2, r"epochs must be a finite number in \(0, inf\), got 0"),
    (["privacy", *NO_STEPS, "--epochs", "inf"], 2, r"epochs must be a finite number in \(0, inf\), got inf"),
    (["privacy", *SMALL, "--steps", "-5"], 2, "--steps must be >= 1, got -5"),
    (["privacy", *SMALL, "--dataset-size", "0"], 2, "dataset_size must be an integer >= 1, got 0"),
    (["privacy", *SMALL, "-K", "2.5"], 2, "invalid int value: '2.5'"),
    (["privacy", *SMALL, "--sampling", "uniform"], 2, "invalid choice: 'uniform'"),
    # sizes, crops and patches
    (["privacy", *SMALL, "--image-size", "0"], 2, r"--image-size must be N, 'HxW' or \[H, W\] with positive integers, got \[0\]"),
    (["privacy", *SMALL, "--image-size", "64x64x3"], 2, "'64x64x3'"),
    (["privacy", *SMALL, "--crop-sizes", "8x8"], 2, "HxW:PROB, got '8x8'"),
    (["privacy", *SMALL, "--crop-sizes", "8x8:0.5,8x8:0.5", "--output-size", "8"], 2, "distinct"),
    (["inclusion", "--crop-sizes", "8x8:0.5,16x16:0.5"], 2, "output_size"),
    (["privacy", *SMALL, "--patch", "rect:0x3"], 2, r"positive integers, got \[0, 3\]"),
    (["privacy", *SMALL, "--patch", "disc:x"], 2, "'disc:x'"),
    (["privacy", *SMALL, "--patch", "blob:1"], 2, "blob needs diameter >= 2"),
    (["privacy", *SMALL, "--patch", "cluster:3:1:2"], 2, "'cluster:3:1:2'"),
    # broken files are named
    (["privacy", *SMALL, "--patch", "{tmp}/truncated.npy"], 2, "truncated.npy: Failed to read"),
    (["privacy", *SMALL, "--patch", "{tmp}/empty.npy"], 2, "empty.npy: No data left"),
    (["privacy", *SMALL, "--patch", "{tmp}/junk.npy"], 2, "junk.npy: .*pickled"),
    (["privacy", *SMALL, "--patch", "{tmp}/object.npy"], 2, "object.npy: Object arrays"),
    (["inclusion", "--patch", "{tmp}/float.npy"], 2, "float.npy: a patch mask must be boolean"),
    (["inclusion", "--patch", "{tmp}/cube.npy"], 2, r"cube.npy: a patch mask must be 2-D"),
    (["inclusion", "--patch", "{tmp}/folder.npy"], 2, "folder.npy: .*Is a directory"),
    (["inclusion", "--heatmap", "{tmp}/a_file/p.png"], 2, "cannot write the heatmap .*a_file/p.png"),
    (["train", "--config", "{tmp}/binary.toml"], 2, "binary.toml is not a text"),
    (["train", "--config", "{tmp}/broken.toml"], 2, "broken.toml is not valid TOML"),
    (["train", "--config", "{tmp}/heatmaps"], 2, "no config file .*heatmaps"),
    (["train", "--resume", "{tmp}/a_file"], 2, "a_file is not a run directory"),
    # config values: the key is named
    (["train", "--config", "{tmp}/typo.toml"], 2, "no option 'imag_size'; did you mean 'image_size'"),
    (["train", "--config", "{tmp}/typed.toml"], 2, "image_size must be an integer .* got '64'"),
    (["train", "--config", "demo", "--dataset-options", "{image_size = '64'}"], 2, "image_size .* got '64'"),
    (["train", "--config", "demo", "--dataset-options", "{sead = 1}"], 2, "no option 'sead'; did you mean 'seed'"),
    (["train", "--config", "demo", "--model-options", "{widht = 8}"], 2, "no option 'widht'"),
    (["train", "--config", "demo", "--model-options", "{width = '8'}"], 2, "width must be an integer .* got '8'"),
    (["train", "--config", "demo", "--model-options", "{width = true}"], 2, "width must be an integer .* got True"),
    (["train", "--config", "demo", "--batch-size", "0"], 2, "batch_size must be an integer >= 1, got 0"),
    (["train"], 2, "train needs --config"),
    # legal edge values: a meaningful answer (strict JSON) or one warning line, exit 0
    (["privacy", *SMALL, "--noise", "0.02"], 0, r"ε patch-level, substitution +∞ \(δ = 1e-05 is not reachable"),
    (["privacy", *SMALL, "--noise", "-1"], 2, "noise_multiplier .* got -1"),
    (["privacy", *SMALL, "--noise", "inf"], 2, "noise_multiplier .* got inf"),
    (["privacy", *SMALL, "--noise", "0.02", "--json"], 0, r'"epsilon_patch": null, "epsilon_patch_reason": "\\u221e'),
    (["privacy", *SMALL, "--noise", "0", "--json"], 0, r'"epsilon_patch": null, "epsilon_patch_reason": "\\u221e'),
    (["privacy", *SMALL, "--delta", "0.5", "--json"], 0, '"epsilon_ratio": null.*undefined for .* / 0.0'),
    (["privacy", *SMALL, "--delta", "0.01"], 0, "warning: delta = 0.01 exceeds 1/N = 1/1000"),
    (["calibrate", *SMALL[:-4], "--steps", "10", "--resolution", "1e-2", "--epsilon", "1e6"], 2,
     "target ε = 1e\\+06 is beyond 1000 nats"),
    (["privacy", *SMALL, "--crop", "64"], 0, "warning: p\\* = 1: .*no amplification"),
    (["calibrate", *SMALL, "--crop", "64", "--epsilon", "3"], 0, "warning: p\\* = 1"),
    (["inclusion", "--image-size", "32", "--crop", "32"], 0, "warning: p\\* = 1"),
    (["inclusion", "--image-size", "32", "--crop", "8", "--heatmap", "{tmp}/heatmaps"], 0, "heatmaps.png"),
    # memory and time: estimated first, answered or refused in one line naming a size that fits
    (["inclusion", "--image-size", "100000x100000", "--crop", "50000"], 0, r"p\* +1\n"),
    (["inclusion", "--image-size", "100000x100000", "--crop", "50000", "--patch", "disc:5"], 2,
     r"100000x100000 image needs about 3\d\d.\d GiB, more than the 4 GiB allowed; an image of at most about \d+x\d+ fits"),
    (["inclusion", "--image-size", "20000x20000", "--heatmap", "{tmp}/h.png"], 2,
     r"the heatmap of p\(t\) for a 20000x20000 image needs about .* at most about \d+x\d+ fits"),
    (["inclusion", "--image-size", "64", "--crop", "16", "-K", "1000000"], 0, "too many to compute"),
    (["inclusion", "--image-size", "64", "--crop", "16", "-K", "1000000", "--json"], 0,
     '"inclusion_probability": 1.0, "inclusion_probability_exact": null'),
    (["privacy", *SMALL, "-K", "100000", "--json"], 0, '"inclusion_probability": 1.0'),
    (["privacy", *SMALL, "--padding", "1000000000"], 0, r"warning: p\* = .* < 1e-09: a crop almost never sees"),
    (["calibrate", *SMALL[:-4], "--steps", "10", "--epsilon", "1000", "--json"], 0,
     "calibrating at resolution 0.01 nats"),
    (["calibrate", *SMALL, "--epsilon", "1001"], 2, "target ε = 1001 is beyond 1000 nats"),
]

API = [
    (lambda: inclusion_probability((64, 64), CropSpec(16), "rect:2x2"), TypeError, "must be a Patch.*'rect:2x2'"),
    (lambda: inclusion_probability((64, 64), 16, Patch.rectangle(2)), TypeError, "must be a CropSpec.*16"),
    (lambda: inclusion_map((64, 64), CropSpec(16), None), TypeError, "must be a Patch.*None"),
    (lambda: inclusion_probability("64", CropSpec(16), Patch.rectangle(2)), ValueError, "'64'"),
    (lambda: CropSpec("16"), TypeError, "crop size .*'16'"),
    (lambda: A.epsilon(1, 10, 1e-5, relation="patch", **QUICK), TypeError, "relation must be .*'patch'"),
    (lambda: A.epsilon(1, 10, 1e-5, sampling=None, relation=A.ImageLevel()), TypeError, "sampling must be .*None"),
    (lambda: A.calibrate_noise(3, 1e-5, 10, relation="image", **QUICK), TypeError, "relation must be"),
    (lambda: A.max_steps(1, 3, 1e-5, relation=A.PatchLevel, **QUICK), TypeError, "relation must be"),
    (lambda: A.effective_sampling_rate(0.1, A.ImageLevel()), TypeError, "sampling must be .*0.1"),
    (lambda: A.Ledger(None), TypeError, "Ledger needs a mechanism such as patchdp.DPSGD"),
    (lambda: A.epsilon("abc", 10, 1e-5, relation=A.ImageLevel(), **QUICK), TypeError, "must be a number, got 'abc'"),
    (lambda: A.epsilon(1, 10, None, relation=A.ImageLevel(), **QUICK), TypeError, "delta must be a number, got None"),
    (lambda: A.epsilon(1e-300, 10, 1e-5, relation=A.ImageLevel(), **QUICK), ValueError, "z = 1e-300 is outside"),
    (lambda: A.Ledger.from_dict({}, MECHANISM), ValueError, "missing mechanism, budget_epsilon, runs"),
    (lambda: A.Ledger.from_dict([], MECHANISM), ValueError, "not a Ledger state"),
    (lambda: A.Ledger.from_dict({**LEDGER, "mechanism": {**LEDGER["mechanism"], "accounting": "patch"}}, MECHANISM),
     ValueError, "another mechanism: accounting 'patch' → 'image'"),
    (lambda: DPSGD.from_dict({**LEDGER["mechanism"], "sampling": {"type": "Batch"}}), ValueError,
     "unknown sampling type 'Batch'"),
    (lambda: A.epsilon(1, 10, 0.5, relation=A.ImageLevel(), **QUICK), UserWarning, "delta = 0.5 exceeds 1/N"),
    (lambda: MECHANISM.replace(delta=0.01), UserWarning, "delta = 0.01 exceeds"),
    (lambda: Config(noise_multiplier=1, dataset_options={"image_size": "64"}), ValueError, "image_size .* got '64'"),
    (lambda: Config(noise_multiplier=1, model_options={"levels": 2.5}), ValueError, "levels must be an integer"),
]


def _rows() -> list:
    cli = [pytest.param(argv, code, pattern, id="cli " + " ".join(a for a in argv if a not in SMALL)[:60])
           for argv, code, pattern in CLI]
    api = [pytest.param(call, kind, pattern, id=f"api {i}: {pattern[:40]}") for i, (call, kind, pattern) in enumerate(API)]
    return cli + api


@pytest.mark.parametrize("call,expected,pattern", _rows())
def test_bad_input(call, expected, pattern, capsys, tmp_path, monkeypatch):
    if callable(call):
        checker = pytest.warns if issubclass(expected, Warning) else pytest.raises
        with checker(expected, match=pattern):
            call()
        return
    make_files(tmp_path)
    monkeypatch.chdir(tmp_path)  # a stray run directory would land here
    before = sorted(tmp_path.rglob("*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy overflow is a bug, not an answer
        code = main([a.replace("{tmp}", str(tmp_path)) for a in call])
    out, err = capsys.readouterr()
    assert code == expected, (out, err)
    assert "Traceback" not in err
    if expected == 2:
        assert out == "" and len(err.splitlines()) == 1 and err.startswith("patchdp: error: "), err
        assert re.search(pattern, err), err
        assert sorted(tmp_path.rglob("*")) == before, "a refused command wrote files"
    else:
        assert re.search(pattern, out + err, re.S), out + err
        assert all(line.startswith("patchdp: warning: ") for line in err.splitlines()), err
        if "--json" in call:
            json.loads(out, parse_constant=lambda name: pytest.fail(f"non-strict JSON: {name}"))


# ------------------------------------------------------------------ a damaged or busy run directory
#
# One tiny finished run (tests/conftest.py: 4 steps, checkpoints at 2 and 4) is copied per
# row and damaged as the row says. A row that must refuse leaves every file byte for byte
# as it was; a row that must resume ends with the run's ledger, secrets and training
# records intact (a re-trained step reproduces the lost one exactly: same seeds, same step).

def _newest_meta(run):
    from patchdp.checkpoint import Checkpointer
    with Checkpointer(run / "checkpoints") as checkpoints:
        return checkpoints.restore()[1]


def _files(run) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _write(name, text):
    return lambda run: (run / name).write_bytes(text if isinstance(text, bytes) else text.encode())


def _edit_config(**changes):
    def edit(run):
        values = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**values, **changes}))
    return edit


def _random_bytes(*steps):
    def damage(run):
        for step in steps:
            for path in (run / "checkpoints" / str(step)).rglob("*"):
                if path.is_file() and "d" in path.relative_to(run / "checkpoints" / str(step)).parts:
                    path.write_bytes(np.random.default_rng(step).bytes(max(path.stat().st_size, 64)))
    return damage


def _empty_checkpoints(run):
    import shutil
    for step in (run / "checkpoints").iterdir():
        shutil.rmtree(step)


def _rmtree(name):
    import shutil
    return lambda run: shutil.rmtree(run / name)


def _torn_metrics(run):
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # killed mid-write: no newline


def _damaged_metrics(run):
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + "{not json\n" + "".join(lines[1:]))


def _ledger_behind_its_step(run):
    """A checkpoint whose ledger records 1 step at step 4 (digests rewritten, so it reads)."""
    from patchdp.files import digests
    folder = run / "checkpoints" / "4"
    meta = folder / "meta" / "metadata"
    values = json.loads(meta.read_text())
    values["ledger"]["runs"] = [[1.0, 1]]
    meta.write_text(json.dumps(values))
    (folder / "patchdp.sha256.json").write_text(json.dumps(digests(folder, skip="patchdp.sha256.json")))


def _stale_lock(run):
    (run / "run.lock").write_text("pid 999999999 on a-host-that-crashed")


def _only_orbax_tmp(run):
    _empty_checkpoints(run)
    (run / "checkpoints" / "2.orbax-checkpoint-tmp-99").mkdir()


RESUME = ["train", "--resume", "{run}"]
EXPORT = ["export", "{run}", "{tmp}/out"]
NEW_RUN = ["train", "--config", "{config}", "--run-dir", "{run}"]
REFUSED, RESUMED, EXPORTED = "refused", "resumed", "exported"

RUN_ROWS = [
    # --resume never starts over
    ("emptied checkpoints", _empty_checkpoints, RESUME, 2, "cannot resume .*checkpoints holds no checkpoint", REFUSED),
    ("no checkpoints folder", _rmtree("checkpoints"), RESUME, 2, "checkpoints holds no checkpoint", REFUSED),
    ("killed during the first save", _only_orbax_tmp, RESUME, 2, "holds no checkpoint", REFUSED),
    ("no secrets", lambda run: (run / "secrets.json").unlink(), RESUME, 2, "secrets.json is missing", REFUSED),
    ("secrets not JSON", _write("secrets.json", "{"), RESUME, 2, "secrets.json is damaged: not JSON", REFUSED),
    ("secrets {}", _write("secrets.json", "{}"), RESUME, 2, r"secrets.json is damaged \(KeyError", REFUSED),
    ("secrets wrong type", _write("secrets.json", '{"sampling": "x", "secure": 1, "key": [1, 2]}'), RESUME, 2,
     r"secrets.json is damaged \(ValueError", REFUSED),
    ("ledger behind its step", _ledger_behind_its_step, RESUME, 2,
     "checkpoint is at step 4 but its ledger records 1 steps", REFUSED),
    ("config changed", _edit_config(clip_norm=2.0), RESUME, 2, "differs from its checkpoint in clip_norm 1.0 → 2.0",
     REFUSED),
    # every JSON read names its file
    ("config not JSON", _write("config.json", "{bad"), RESUME, 2, "config.json is damaged: not JSON", REFUSED),
    ("config {}", _write("config.json", "{}"), RESUME, 2, "config.json holds no run configuration", REFUSED),
    ("config []", _write("config.json", "[]"), RESUME, 2, "config.json holds no run configuration", REFUSED),
    ("config binary", _write("config.json", b"\xff\xfe\x00"), RESUME, 2, "config.json is damaged", REFUSED),
    ("config unknown key", _edit_config(bogus=1), RESUME, 2, "config.json: config: unknown key 'bogus'", REFUSED),
    ("config bad value", _edit_config(batch_size=0), RESUME, 2, "config.json: .*batch_size must be", REFUSED),
    ("no config", lambda run: (run / "config.json").unlink(), RESUME, 2, "is not a run directory", REFUSED),
    ("metrics damaged mid-file", _damaged_metrics, RESUME, 2, r"metrics.jsonl is damaged at line 2", REFUSED),
    # checkpoints that do not read: the newest good one, else one line naming the folder
    ("every checkpoint damaged", _random_bytes(2, 4), RESUME, 2,
     r"checkpoints/2 is damaged .* no older checkpoint reads", REFUSED),
    ("newest checkpoint damaged", _random_bytes(4), RESUME, 0, r"checkpoints/4 is damaged \(state/.*falling back", RESUMED),
    ("torn metrics line", _torn_metrics, RESUME, 0, "metrics.jsonl: dropped its torn last line", RESUMED),
    ("stale lock", _stale_lock, RESUME, 0, "taking over the stale lock .* of pid 999999999 on a-host-that-crashed",
     RESUMED),
    # one run per directory
    ("new run over a run", lambda run: None, NEW_RUN, 2, "already holds the checkpoints of a run; resume it", REFUSED),
    ("new run over secrets", _rmtree("checkpoints"), NEW_RUN, 2, "already holds a run's secrets", REFUSED),
    ("run dir under a file", lambda run: None, ["train", "--config", "{config}", "--run-dir", "{run}/secrets.json/x"],
     2, "cannot create the run directory .*secrets.json/x .*choose a run directory you can write", REFUSED),
    # export reads like --resume
    ("export, newest damaged", _random_bytes(4), EXPORT, 0, "checkpoints/4 is damaged .*step 2", EXPORTED),
    ("export, every checkpoint damaged", _random_bytes(2, 4), EXPORT, 2, "no older checkpoint reads", REFUSED),
    ("export, config not JSON", _write("config.json", "]"), EXPORT, 2, "config.json is damaged", REFUSED),
    ("export, config {}", _write("config.json", "{}"), EXPORT, 2, "config.json holds no run configuration", REFUSED),
    ("export, report not JSON", _write("report.json", "{"), EXPORT, 2, "report.json is damaged", REFUSED),
    ("export, no checkpoints", _rmtree("checkpoints"), EXPORT, 2, "not a run directory with checkpoints", REFUSED),
    ("export, out under a file", lambda run: None, ["export", "{run}", "{run}/report.json/out"], 2,
     "report.json/out: Not a directory", REFUSED),
]


@pytest.mark.parametrize("damage,argv,expected,pattern,outcome",
                         [pytest.param(*row[1:], id=row[0]) for row in RUN_ROWS])
def test_a_damaged_run_directory(damage, argv, expected, pattern, outcome, finished, tiny, tmp_path, capsys):
    import shutil
    _, original, _ = finished
    config = tiny
    run = Path(shutil.copytree(original, tmp_path / "run"))
    damage(run)
    before = _files(run)
    code = main([a.format(run=run, tmp=tmp_path, config=config) for a in argv])
    out, err = capsys.readouterr()
    assert code == expected, (out, err)
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    if expected == 2:
        assert out == "" and len(err.splitlines()) == 1 and err.startswith("patchdp: error: "), err
        assert re.search(pattern, err), err
        assert "--resume" not in err or "already holds the checkpoints" in err, err
    else:
        assert re.search(pattern, out + err), out + err
        assert all(line.startswith("patchdp: ") for line in err.splitlines()), err
    if outcome == REFUSED:
        assert _files(run) == before, "a refused command changed the run directory"
    elif outcome == RESUMED:
        assert (run / "secrets.json").read_bytes() == (original / "secrets.json").read_bytes()
        assert _newest_meta(run) == _newest_meta(original)  # the ledger of all 4 steps, nothing lost
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        originals = [json.loads(line) for line in (original / "metrics.jsonl").read_text().splitlines()]
        assert [r for r in records if r["kind"] == "train"] == [r for r in originals if r["kind"] == "train"]
        assert not (run / "run.lock").exists()
    else:
        assert json.loads((tmp_path / "out" / "model.json").read_text())["steps"] == 2


def test_a_run_directory_in_use_is_refused_naming_its_holder(finished, tiny, tmp_path, capsys):
    """A second process (here: a second lock on the same file) gets one line naming the
    holder's pid and host, for a new run and for --resume, and changes nothing."""
    import os
    import shutil
    import socket
    from patchdp.run_dir import RunDirectory
    (_, original, _), config = finished, tiny
    run = Path(shutil.copytree(original, tmp_path / "run"))
    with RunDirectory(run).locked():
        before = _files(run)
        for argv in (["train", "--resume", str(run)], ["train", "--config", str(config), "--run-dir", str(run)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert len(err.splitlines()) == 1 and f"is in use by pid {os.getpid()} on {socket.gethostname()}" in err
        assert _files(run) == before
    assert not (run / "run.lock").exists()


def test_privacy_chooses_the_finest_resolution_that_fits(monkeypatch, capsys):
    """A grid too large for memory (here: a limit lowered to 2^14 points) is coarsened
    until it fits, said in one warning line; ε stays an upper bound of the fine one."""
    from patchdp.accounting import composition
    argv = ["privacy", *SMALL, "--noise", "0.8", "--json"]
    assert main(argv) == 0
    fine = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(composition, "_MAX_GRID", 2 ** 14)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    coarse = json.loads(out)
    assert len(err.splitlines()) == 1 and "the finest that fits" in err, err
    assert coarse["mechanism"]["resolution"] > fine["mechanism"]["resolution"] == 1e-3
    assert coarse["epsilon_patch"] >= fine["epsilon_patch"] and coarse["epsilon_image"] >= fine["epsilon_image"]
