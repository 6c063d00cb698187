#!/usr/bin/env python3
"""One entry point for a fresh machine: creates ``.venv`` on first use, then runs a task.

    python3 dev.py demo    # the main job on the embedded default configuration
    python3 dev.py test    # the test suite
    python3 dev.py run ARGS...  # any `patchdp` CLI command inside the venv

The venv is (re)installed whenever ``pyproject.toml`` changes (a hash stamp in .venv).
Needs only Python >= 3.11 with pip and venv.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".patchdp-installed"


def ensure_venv() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("[dev.py] creating .venv ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    print("[dev.py] installing patchdp and its dependencies into .venv ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.check_call(pip + ["-e", f"{ROOT}[dev]"])
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):
        sys.exit("patchdp needs Python >= 3.11; run dev.py with a newer python3.")
    task, rest = (argv[0], argv[1:]) if argv else ("demo", [])
    ensure_venv()
    python = str(BIN / "python")
    if task == "test":
        cmd = [python, "-P", "-m", "pytest", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), *(rest or [str(ROOT / "tests")])]
    elif task == "demo":
        cmd = [python, "-P", "-m", "patchdp.cli", "demo", *rest]
    elif task == "run":
        cmd = [python, "-P", "-m", "patchdp.cli", *rest]
    else:
        sys.exit(f"unknown task {task!r}: use 'demo', 'test' or 'run ...'")
    return subprocess.call(cmd)  # in the caller's directory: relative paths mean what the user meant


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
