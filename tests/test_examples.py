"""The scripts in examples/ run, in their fast mode, and print what they promise."""

import runpy
import sys
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [name, "--quick"])
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as when the script runs: its folder on the path
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    return capsys.readouterr().out


def test_own_loop_trains_privately_and_prints_its_epsilon(monkeypatch, capsys):
    out = run("own_loop.py", monkeypatch, capsys)
    assert "test accuracy" in out and "ε = " in out and "patch-level" in out
    assert len((EXAMPLES / "own_loop.py").read_text().splitlines()) <= 80


def test_opacus_accounting_prints_the_three_relations(monkeypatch, capsys):
    out = run("opacus_accounting.py", monkeypatch, capsys)
    for relation in ("add/remove", "image-level substitution", "patch-level"):
        assert f"ε {relation}" in out


def test_jax_privacy_example_trains_or_says_why_it_skips(monkeypatch, capsys):
    out = run("jax_privacy_crops.py", monkeypatch, capsys)
    try:
        import jax_privacy  # noqa: F401
    except ImportError:
        assert "jax_privacy is not installed" in out and "skipping" in out
    else:
        assert "ε = " in out
