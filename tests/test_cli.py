"""The command line: numbers agree with the Python API; every bad input is one line
on stderr and exit status 2."""

import json

import numpy as np
import pytest

from patchdp import accounting
from patchdp.cli import main
from patchdp.inclusion import CropSpec, Patch, inclusion_probability
from patchdp.sampling import FixedSizeSampling, PoissonSampling

SMALL = ["--image-size", "64", "--crop", "16", "--patch", "rect:4x4", "--batch-size", "32",
         "--dataset-size", "1000", "--steps", "200", "--resolution", "1e-3"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_privacy_json_matches_the_api(capsys):
    code, out, err = run(capsys, "privacy", *SMALL, "--noise", "1.5", "--json")
    assert code == 0 and err == ""
    r = json.loads(out)
    p = inclusion_probability((64, 64), CropSpec(16), Patch.rectangle(4))
    assert r["inclusion_probability"] == p
    assert r["sampling_rate"] == 0.032
    assert r["effective_sampling_rate"] == pytest.approx(0.032 * p)
    kw = dict(sampling=FixedSizeSampling(batch_size=32, dataset_size=1000), resolution=1e-3)
    assert r["epsilon_patch"] == accounting.epsilon(1.5, 200, 1e-5, relation=accounting.PatchLevel(p), **kw)
    assert r["epsilon_image"] == accounting.epsilon(1.5, 200, 1e-5, relation=accounting.ImageLevel(), **kw)
    assert r["epsilon_patch"] < r["epsilon_image"]
    poisson = PoissonSampling(rate=0.032, dataset_size=1000)
    assert r["epsilon_add_remove"] == accounting.epsilon(1.5, 200, 1e-5, sampling=poisson,
                                                         relation=accounting.AddRemove(), resolution=1e-3)
    assert r["epsilon_add_remove"] < r["epsilon_image"]


def test_privacy_table_is_readable(capsys):
    code, out, _ = run(capsys, "privacy", *SMALL)
    assert code == 0
    for label in ["p*", "w (effective sampling rate)", "ε patch-level, substitution",
                  "ε image-level, substitution (paper's baseline)",
                  "ε image-level, add/remove + Poisson (Opacus/jax-privacy)", "x patch-level"]:
        assert label in out


def test_calibrate_json(capsys):
    code, out, _ = run(capsys, "calibrate", *SMALL, "--epsilon", "3", "--json")
    assert code == 0
    r = json.loads(out)
    assert 0 < r["noise_multiplier_patch"] < r["noise_multiplier_image"]


def test_inclusion_heatmap_and_mask_file(capsys, tmp_path):
    mask = np.zeros((5, 5), bool)
    mask[1:4, 2] = True
    np.save(tmp_path / "m.npy", mask)
    code, out, _ = run(capsys, "inclusion", "--image-size", "30x40", "--crop", "8x6", "--padding", "2",
                       "--patch", str(tmp_path / "m.npy"), "--heatmap", str(tmp_path / "h.png"), "--json")
    assert code == 0
    r = json.loads(out)
    assert r["inclusion_probability"] == inclusion_probability((30, 40), CropSpec((8, 6), padding=2), Patch.rectangle(3, 1))
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_random_resized_crop_mixture(capsys):
    code, out, _ = run(capsys, "inclusion", "--image-size", "40", "--crop-sizes", "8x8:0.25,16x16:0.75",
                       "--output-size", "8", "--patch", "disc:3", "--json")
    assert code == 0
    spec = CropSpec([(8, 8), (16, 16)], probabilities=[0.25, 0.75], output_size=8)
    assert json.loads(out)["inclusion_probability"] == inclusion_probability((40, 40), spec, Patch.disc(3))


@pytest.mark.parametrize("argv,match", [
    (["privacy", *SMALL, "--crop", "100"], "larger than the padded image"),
    (["privacy", *SMALL, "--patch", "rect:65x2"], "larger than the image"),
    (["privacy", *SMALL, "--patch", "EMPTY"], "empty"),
    (["privacy", *SMALL, "--delta", "1"], "delta"),
    (["privacy", *SMALL, "--delta", "0"], "delta"),
    (["calibrate", *SMALL, "--epsilon", "0"], "epsilon"),
    (["calibrate", *SMALL, "--epsilon", "-1"], "epsilon"),
    (["privacy", *SMALL, "--noise", "inf"], "noise_multiplier"),
    (["privacy", *SMALL, "--noise", "-2"], "noise_multiplier"),
    (["privacy", *SMALL, "--batch-size", "2000"], "exceeds"),
    (["privacy", *SMALL, "--sampling", "poisson", "--batch-size", "2000"], r"\(0, 1\]"),
    (["privacy", *SMALL, "--batch-size", "0"], "batch_size"),
    (["privacy", *SMALL, "--steps", "0"], "steps"),
    (["privacy", *SMALL, "--image-size", "64.5"], "integers"),
    (["privacy", *SMALL, "--crop", "3x"], "integers"),
    (["privacy", *SMALL, "--batch-size", "3.5"], "invalid int"),
    (["privacy", *SMALL, "--padding", "-1"], "padding"),
    (["privacy", *SMALL, "-K", "0"], "crops_per_example"),
    (["privacy", *SMALL, "--patch", "hexagon:3"], "unknown patch"),
    (["privacy", *SMALL, "--patch", "missing.npy"], "does not exist"),
    (["inclusion", "--crop-sizes", "8x8:0.5,9x9:0.6", "--output-size", "8"], "sum to 1"),
    (["calibrate", *SMALL, "--epsilon", "1e-4", "--delta", "1e-12"], "unreachable"),
    (["nonsense"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, match):
    if "EMPTY" in argv:
        np.save(tmp_path / "empty.npy", np.zeros((3, 3), bool))
        argv = [str(tmp_path / "empty.npy") if a == "EMPTY" else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("patchdp: error: ")
    import re
    assert re.search(match, err), err


def test_data_prepare_says_what_it_did_or_what_to_download_in_one_line(capsys, tmp_path):
    assert main(["data", "prepare", "synthetic"]) == 0
    assert "nothing to prepare" in capsys.readouterr().out
    assert main(["data", "prepare", "cityscapes", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cityscapes-dataset.com" in err and f"{tmp_path}/downloads/manual/" in err
    assert main(["data", "prepare", "a2d2", "--data-dir", str(tmp_path / "a2d2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a2d2.audi" in err and "class_list.json" in err


def test_dev_py_runs_commands_in_the_callers_directory():
    """`python3 dev.py run inclusion --heatmap x.png` must write x.png where the user is."""
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "dev.py").read_text()
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", "") in ("call", "run", "check_call") and getattr(n.func.value, "id", "") == "subprocess"]
    assert calls and not any(k.arg == "cwd" for call in calls for k in call.keywords)
