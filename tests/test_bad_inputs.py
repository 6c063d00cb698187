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
    (["calibrate", *SMALL[:-4], "--steps", "10", "--resolution", "1e-2", "--epsilon", "1e6"], 0, "noise z, patch"),
    (["privacy", *SMALL, "--crop", "64"], 0, "warning: p\\* = 1: .*no amplification"),
    (["calibrate", *SMALL, "--crop", "64", "--epsilon", "3"], 0, "warning: p\\* = 1"),
    (["inclusion", "--image-size", "32", "--crop", "32"], 0, "warning: p\\* = 1"),
    (["inclusion", "--image-size", "32", "--crop", "8", "--heatmap", "{tmp}/heatmaps"], 0, "heatmaps.png"),
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
