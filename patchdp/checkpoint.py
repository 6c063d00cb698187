"""Checkpoints of a training run, written atomically with orbax.

A checkpoint is one folder per step, ``<directory>/<step>/``, holding

- ``state``: the :class:`~patchdp.training.TrainState` pytree (parameters, optimizer
  state, step count), as arrays;
- ``meta``: a JSON object the training loop fills with everything else it needs to
  continue exactly — the step and the privacy ledger with its mechanism (the secret seeds
  stay in the run directory's ``secrets.json``).

Atomic: orbax writes each step into a temporary folder and renames it only once every
file is written, so a run killed mid-save leaves the previous checkpoint intact, and the
half-written folder is neither listed nor restored (it is deleted when the directory is
opened again). Saving is synchronous: when :meth:`Checkpointer.save` returns, the step is
on disk.

Damage after the fact (a truncated or emptied file, a deleted ``state/``, random bytes in
the tensorstore data) is found before anything is read: each step's folder holds the
SHA-256 of its files (``patchdp.sha256.json``, written after orbax's commit).
:meth:`restore` falls back to the newest checkpoint that reads, with a one-line warning
naming the damaged step, and a later :meth:`save` of that step replaces it.

The training loop keeps its secret seeds out of the meta (see ``patchdp.trainer``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from patchdp.files import digests, read_json, write_atomic

__all__ = ["Checkpointer"]

DIGESTS = "patchdp.sha256.json"  # in each step's folder: the SHA-256 of every other file in it


class Checkpointer:
    """The checkpoints of one run in ``directory``, keeping the newest ``keep`` steps."""

    def __init__(self, directory, *, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._damaged: set[int] = set()  # steps restore() could not read; save() replaces them

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Writes ``state`` (a pytree of arrays) and ``meta`` (JSON-serialisable) as ``step``;
        a step that is already saved is left as it is, unless :meth:`restore` found it damaged."""
        if step in self._damaged:
            self._manager.delete(step)
            self._damaged.discard(step)
        elif step in self._manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:  # in a run of several processes, after orbax's commit of every process's shards
            folder = self.directory / str(step)
            write_atomic(folder / DIGESTS, json.dumps(digests(folder, skip=DIGESTS)))

    def restore(self, like=None, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of ``step``, or by default of the newest checkpoint that reads.

        ``like`` is a pytree with the structure, shapes, dtypes (and shardings) to restore
        into, e.g. a freshly initialised state or its ``jax.eval_shape``; without it the
        state comes back as nested dicts and lists of arrays (a NamedTuple as a dict).

        Without ``step``, damaged checkpoints are skipped and the newest one that reads is
        restored, with one warning line naming the damaged ones. Raises ValueError naming
        the folder when no checkpoint (or the requested ``step``) reads, FileNotFoundError
        when there is none.
        """
        steps = sorted(self._manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        problems = []
        for candidate in steps:
            try:
                self._verify(candidate)
                restored = self._manager.restore(candidate, args=args)
            except Exception as error:  # orbax: ValueError, KeyError, OSError; tensorstore: a bare Exception
                self._damaged.add(candidate)
                reason = error if isinstance(error, _Damaged) else type(error).__name__
                problems.append(f"checkpoint {self.directory / str(candidate)} is damaged ({reason})")
                continue
            if problems:
                warnings.warn(f"{'; '.join(problems)}; falling back to the checkpoint of step {candidate}.",
                              stacklevel=2)
            return restored.state, restored.meta
        raise ValueError(f"{'; '.join(problems)} and no older checkpoint reads; it cannot be restored.")

    def _verify(self, step: int) -> None:
        """Raises :class:`_Damaged` naming the first file of ``step`` whose digest differs
        from the one saved with it. Checked before orbax reads anything: a damaged array
        would otherwise restore as garbage, or fail mid-read and leave tensorstore reads
        running past orbax's event loop ("Event loop is closed" tracebacks). A step saved
        without digests (by an older patchdp, or killed between the two writes) is read as it is."""
        folder = self.directory / str(step)
        if not (folder / DIGESTS).is_file():
            return
        try:
            saved = read_json(folder / DIGESTS)
        except ValueError:
            raise _Damaged(f"{DIGESTS} is not JSON") from None
        found = digests(folder, skip=DIGESTS)
        for name in sorted(set(saved) | set(found)):
            if saved.get(name) != found.get(name):
                raise _Damaged(f"{name} {'is missing' if name not in found else 'differs from its saved digest'}")

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Damaged(ValueError):
    """A file of a checkpoint that does not match its saved digest."""
