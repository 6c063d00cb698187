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

Damage after the fact (a truncated or emptied file, a deleted ``state/``): :meth:`restore`
falls back to the newest checkpoint that reads, with a one-line warning naming the
damaged step, and a later :meth:`save` of that step replaces it.

The training loop keeps its secret seeds out of the meta (see ``patchdp.trainer``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


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

    def restore(self, like=None, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of ``step``, or by default of the newest checkpoint that reads.

        ``like`` is a pytree with the structure, shapes, dtypes (and shardings) to restore
        into, e.g. a freshly initialised state or its ``jax.eval_shape``; without it the
        state comes back as nested dicts and lists of arrays (a NamedTuple as a dict).

        Without ``step``, a damaged newest checkpoint is skipped with a one-line warning
        naming it, and the previous one is restored. Raises ValueError naming the damaged
        folder when no checkpoint (or the requested ``step``) reads, FileNotFoundError
        when there is none.
        """
        steps = sorted(self._manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        for candidate in steps:
            try:
                restored = self._manager.restore(candidate, args=args)
                return restored.state, restored.meta
            except (ValueError, KeyError, OSError) as error:  # what orbax raises on truncated/missing files
                self._damaged.add(candidate)
                problem = f"checkpoint {self.directory / str(candidate)} is damaged ({type(error).__name__})"
                if candidate == steps[-1]:
                    raise ValueError(f"{problem} and no older checkpoint reads; it cannot be restored.") from None
                warnings.warn(f"{problem}; falling back to the previous checkpoint.", stacklevel=2)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
