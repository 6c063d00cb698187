"""Checkpoints of a training run, written atomically with orbax.

A checkpoint is one folder per step, ``<directory>/<step>/``, holding

- ``state``: the :class:`~patchdp.training.TrainState` pytree (parameters, optimizer
  state, step count), as arrays;
- ``meta``: a JSON object the training loop fills with everything else it needs to
  continue exactly — the RNG seeds, the sampler's description, the privacy ledger.

Atomic: orbax writes each step into a temporary folder and renames it only once every
file is written, so a run killed mid-save leaves the previous checkpoint intact, and the
half-written folder is neither listed nor restored (it is deleted when the directory is
opened again). Saving is synchronous: when :meth:`Checkpointer.save` returns, the step is
on disk.

The meta of a secure run holds its secret seeds: protect the checkpoint directory like
the training data.
"""

from __future__ import annotations

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

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Writes ``state`` (a pytree of arrays) and ``meta`` (JSON-serialisable) as ``step``;
        a step that is already saved is left as it is."""
        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def restore(self, like=None, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of ``step`` (default: the newest).

        ``like`` is a pytree with the structure, shapes, dtypes (and shardings) to restore
        into, e.g. a freshly initialised state or its ``jax.eval_shape``; without it the
        state comes back as nested dicts and lists of arrays (a NamedTuple as a dict).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored.state, restored.meta

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
