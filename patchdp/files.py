"""Files that are whole or absent, and reads that name the file they failed on.

    write_atomic(path, text)   temp file in the same folder, fsync, rename (or link: never replace)
    read_json(path)            the JSON value; ValueError naming the file when missing or damaged
    digests(folder)            SHA-256 of every file under a folder, to detect damage before reading
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "read_json", "digests"]


def read_json(path) -> Any:
    """The JSON value in ``path``; ValueError naming the file when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is damaged: not JSON ({error}).") from None


def write_atomic(path, text: str, *, mode: int = 0o644, replace: bool = True) -> None:
    """Writes ``text`` to ``path`` whole or not at all: a temporary file in the same folder,
    fsynced, then renamed over ``path`` (or, with ``replace=False``, linked to it, which
    raises FileExistsError when ``path`` exists: a file written once)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    descriptor = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power loss
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def digests(folder, *, skip: str = "") -> dict[str, str]:
    """{path relative to ``folder``: SHA-256 hex} of every file under ``folder`` but ``skip``."""
    folder = Path(folder)
    found = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_file() and name != skip:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            found[name] = digest.hexdigest()
    return found
