"""The run directory as a transaction: one process at a time, every file whole, and a
``--resume`` that continues the run or refuses in one line, never starts over.

    with RunDirectory(path).locked():          run.lock: pid and host of the one process
        config.json   written atomically (temp file, fsync, rename); read naming the file
        secrets.json  the run's seeds (:class:`Seeds`), mode 0600, written once, never replaced
        metrics.jsonl append-only; a torn last record (a kill mid-write) is dropped with one warning
        checkpoints/  patchdp.checkpoint (atomic per step; a damaged step falls back)

**The lock** is ``run.lock``, held with ``flock`` for the life of the run and removed at
its end. A second process on the same directory is refused in one line naming the
holder's pid and host. The kernel releases the lock of a process that died (kill -9,
power loss), so a lock file that is present but free is stale: it is taken over with
one warning naming the dead holder. (A run over several processes takes the lock in
the one process that writes, process 0.)

**Resuming** (:func:`resume_point`) needs the run's secrets, a checkpoint that reads and
a ledger that agrees with it; without them the privacy already spent or the batches
already drawn are unknown, so the run is refused, never restarted.

**Signals** (:func:`interruptible`): Ctrl-C or SIGTERM ends the steps after the one in
flight; the trainer saves a checkpoint and raises :class:`Interrupted`, whose one line
gives the exact resume command.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets as os_secrets
import shlex
import signal
import socket
import threading
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from patchdp import accounting, report, sampling
from patchdp.checkpoint import Checkpointer
from patchdp.config import Config
from patchdp.distributed import Processes
from patchdp.files import read_json, write_atomic
from patchdp.mechanism import DPSGD

__all__ = ["RunDirectory", "RunDirectoryError", "RunLocked", "Seeds", "MetricsLog", "Interrupted", "interruptible",
           "resume_point", "resume_command", "held_by_writer", "shared_checkpoints"]

LOCK, CONFIG, SECRETS, METRICS = "run.lock", "config.json", "secrets.json", "metrics.jsonl"


class RunDirectoryError(OSError):
    """The run directory could not be created or written: one line naming the path."""


def resume_command(run_dir) -> str:
    """The exact command that continues the run in ``run_dir``."""
    return f"patchdp train --resume {shlex.quote(str(run_dir))}"


# ============================================================================ the lock


class RunLocked(ValueError):
    """Another live process holds the run directory."""


@contextlib.contextmanager
def _lock(path: Path):
    """Holds ``path`` with flock (see the module docstring) and removes it on exit."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(descriptor)
            raise RunLocked(f"{path.parent} is in use by {holder} (lock {path}); wait for that run to end, "
                            "or stop it, before starting or resuming this one.") from None
        try:
            same_file = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the holder removed it while we waited: lock the new one
            same_file = False
        if same_file:
            break
        os.close(descriptor)
    try:
        stale = os.pread(descriptor, 256, 0).decode(errors="replace").strip()
        if stale:
            warnings.warn(f"taking over the stale lock {path} of {stale}, which no longer holds it "
                          "(it ended without releasing it).", stacklevel=3)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(descriptor)


class RunDirectory:
    """One run's folder: its files by name, the lock, the config and the secrets."""

    def __init__(self, path):
        self.path = Path(path)
        self.config_file, self.secrets_file = self.path / CONFIG, self.path / SECRETS
        self.metrics_file, self.checkpoints = self.path / METRICS, self.path / "checkpoints"

    @contextlib.contextmanager
    def locked(self):
        """Creates the folder if needed and holds its lock (:class:`RunLocked` when another
        process does; :class:`RunDirectoryError` when the folder cannot be created)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirectoryError(f"cannot create the run directory {self.path} "
                                    f"({error.strerror or error}); choose a run directory you can write.") from None
        with _lock(self.path / LOCK):
            yield self

    def read_config(self) -> Config:
        """The run's saved config; ValueError naming ``config.json`` when it is missing or not a run's config."""
        values = read_json(self.config_file)
        if not isinstance(values, dict) or not values:
            raise ValueError(f"{self.config_file} holds no run configuration (got {json.dumps(values)[:40]}); "
                             "restore the file the run wrote.")
        try:
            return Config.from_dict(values)
        except ValueError as error:
            raise ValueError(f"{self.config_file}: {error}") from None

    def write_config(self, config: Config) -> None:
        write_atomic(self.config_file, json.dumps(config.to_dict(), indent=1))

    def holds_checkpoints(self) -> bool:
        """Whether a run has saved a checkpoint here (a step folder, readable or not)."""
        return self.checkpoints.is_dir() and any(p.name.isdigit() for p in self.checkpoints.iterdir())

    def open_checkpoints(self, *, resume: bool) -> Checkpointer:
        """The run's checkpoints, to resume from or, for a new run, an empty folder.

        ValueError in one line when resuming a run without checkpoints, or starting a new
        run where one already is (its checkpoints or its secrets), so that two runs never mix."""
        held = self.holds_checkpoints()
        if resume and not held:
            raise ValueError(f"cannot resume {self.path}: {self.checkpoints} holds no checkpoint, so the steps taken "
                             "and the privacy spent are unknown; start a new run in another directory.")
        if not resume and held:
            raise ValueError(f"{self.path} already holds the checkpoints of a run; resume it "
                             f"(`{resume_command(self.path)}`) or choose another run directory.")
        if not resume and self.secrets_file.exists():
            raise ValueError(f"{self.path} already holds a run's secrets ({SECRETS}) but no checkpoint to continue "
                             "from; choose another run directory.")
        return Checkpointer(self.checkpoints)

    def write_secrets(self, seeds: "Seeds") -> None:
        """``secrets.json`` (mode 0600), written once: FileExistsError rather than replace it."""
        write_atomic(self.secrets_file, json.dumps(seeds.to_dict()), mode=0o600, replace=False)

    def read_secrets(self) -> "Seeds":
        if not self.secrets_file.is_file():
            raise ValueError(f"cannot resume {self.path}: {self.secrets_file} is missing, and the run's seeds with "
                             "it; start a new run.")
        values = read_json(self.secrets_file)
        try:
            return Seeds.from_dict(values)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{self.secrets_file} is damaged ({type(error).__name__}: {error}); the run's seeds "
                             "are lost, so it cannot be resumed.") from None


# ============================================================================ several processes


@contextlib.contextmanager
def held_by_writer(run: RunDirectory, processes: Processes):
    """The run directory's lock, held by process 0 alone; a refusal is every process's.
    With several processes, every one must see the directory process 0 locked."""
    with contextlib.ExitStack() as held:
        processes.in_writer(lambda: held.enter_context(run.locked()))
        _check_shared(run, processes)
        yield


def _check_shared(run: RunDirectory, processes: Processes) -> None:
    """Raises ValueError in every process, naming the processes that do not see process
    0's run directory (a file process 0 writes there, with a fresh token): their
    checkpoint shards and process 0's would land in different places."""
    if processes.count == 1:
        return
    probe = run.path / ".shared-by-all-processes"

    def write_token() -> str:
        token = os_secrets.token_hex(16)
        write_atomic(probe, token)
        return token

    token = processes.from_writer(write_token)
    blind = processes.all_true(probe.is_file() and probe.read_text() == token)
    processes.in_writer(probe.unlink)
    if blind:
        raise ValueError(f"process{'es' if len(blind) > 1 else ''} {', '.join(map(str, blind))} of {processes.count} "
                         f"cannot see the run directory {run.path} as process 0 writes it; give every process a run "
                         "directory on a filesystem they all share (NFS, a cluster filesystem, gcsfuse).")


@contextlib.contextmanager
def shared_checkpoints(run: RunDirectory, processes: Processes, resume: bool):
    """:meth:`RunDirectory.open_checkpoints` in every process, once all agree on the run
    directory's files: orbax's opening and restoring wait for every process, so one that
    saw other checkpoints would otherwise wait in another collective than the rest."""
    processes.agree("run directory's checkpoints or secrets", {
        "checkpoints": sorted(p.name for p in run.checkpoints.iterdir()) if run.checkpoints.is_dir() else None,
        "secrets": run.secrets_file.exists()})
    with run.open_checkpoints(resume=resume) as checkpoints:
        yield checkpoints


# ============================================================================ seeds


class Seeds(NamedTuple):
    """The run's secrets: the batch-sampling seed and the 64-bit base of the JAX keys
    (kept in the run directory's ``secrets.json``, mode 0600, never in a checkpoint).

    Step t uses batch ``plan.sampling.sample(sampling, t)`` and key ``step_keys()(t)``; the
    initial parameters use :meth:`init_key`. Secure seeds come from OS entropy; a fixed
    seed s gives ``SamplingSeed.fixed(s)`` and ``jax.random.key(s)``: reproducible and
    NOT secure.
    """

    sampling: sampling.SamplingSeed
    key: tuple[int, int]  # threefry key data, two uint32

    @classmethod
    def create(cls, seed: int | None) -> "Seeds":
        if seed is None:
            return cls(sampling.SamplingSeed.from_os(), (os_secrets.randbits(32), os_secrets.randbits(32)))
        key = jax.random.key_data(jax.random.key(seed))
        return cls(sampling.SamplingSeed.fixed(seed), tuple(int(k) for k in key))

    def _bases(self) -> tuple[jax.Array, jax.Array]:
        return tuple(jax.random.split(jax.random.wrap_key_data(np.asarray(self.key, np.uint32))))

    def init_key(self) -> jax.Array:
        """An ``rbg`` key for parameter initialisation: its initialisers compile ~3x
        faster than threefry's on CPU, and initialisation needs no sharding invariance."""
        bits = jax.random.bits(self._bases()[0], (), jnp.uint32)
        return jax.random.key(int(bits), impl="rbg")

    def step_keys(self) -> Callable[[int], jax.Array]:
        """t ↦ the key of step t: ``fold_in(base, t)``."""
        base = self._bases()[1]
        return lambda step: jax.random.fold_in(base, step)

    def to_dict(self) -> dict:
        return {"sampling": str(self.sampling.value), "secure": self.sampling.secure, "key": list(self.key)}

    @classmethod
    def from_dict(cls, state: dict) -> "Seeds":
        seed = sampling.SamplingSeed(int(state["sampling"]), secure=bool(state["secure"]))
        return cls(seed, tuple(int(k) for k in state["key"]))


# ============================================================================ resuming


def resume_point(run: RunDirectory, checkpoints, like, mechanism: DPSGD, budget: float | None):
    """(state, ledger, seeds, step) to continue the run in ``run`` from its newest
    readable checkpoint (``checkpoints``, from :meth:`RunDirectory.open_checkpoints`;
    ``like`` the state to restore into), its next steps taken with ``mechanism``.

    Refused with ValueError in one line — never restarted — when its secrets are missing
    or damaged, when no checkpoint reads, when the config changed anything the
    steps taken were accounted under (crop, patch, sampling, clip norm, accounting, δ,
    budget; a new noise multiplier is composed by the ledger), or when the checkpoint's
    ledger disagrees with its step.
    """
    seeds = run.read_secrets()
    state, meta = checkpoints.restore(like)
    ledger = _resumable_ledger(meta, mechanism, budget, run.path)
    return state, ledger, seeds, meta["step"]


def _resumable_ledger(meta: dict, mechanism: DPSGD, budget: float | None, path: Path) -> accounting.Ledger:
    saved = meta["ledger"]
    changed = mechanism.differences(saved.get("mechanism", {}), ignore=("noise_multiplier",))
    if saved.get("budget_epsilon") != budget:
        changed.append(f"target_epsilon (budget) {saved.get('budget_epsilon')!r} → {budget!r}")
    if changed:
        raise ValueError(f"cannot resume {path}: the config differs from its checkpoint in {'; '.join(changed)}. "
                         "Steps already taken cannot be re-accounted: restore the run's config.json, or start a new run.")
    ledger = accounting.Ledger.from_dict(saved, mechanism)
    if ledger.steps != meta["step"]:
        raise ValueError(f"cannot resume {path}: its checkpoint is at step {meta['step']} but its ledger records "
                         f"{ledger.steps} steps, so the privacy spent is unknown; start a new run.")
    if ledger.mechanism.noise_multiplier != mechanism.noise_multiplier:
        ledger.change_noise(mechanism.noise_multiplier)
    return ledger


# ============================================================================ metrics


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, each with ``kind`` and ``step``, appended;
    with ``events`` (a :class:`patchdp.events.EventWriter`), every number also goes to
    TensorBoard as ``<kind>/<key>`` (``epsilon`` as itself). A resumed run appends a new
    event file; TensorBoard shows the newest value of a step.

    A last line without its newline, or one that does not parse, is a record torn by a
    kill mid-write: :meth:`read` drops it with one warning. Damage elsewhere is a ValueError
    naming the file and line. With ``writes=False`` (a process other than 0 of a run of
    several) it writes nothing."""

    def __init__(self, path: Path, events=None, *, writes: bool = True):
        self.path, self.events, self.writes = Path(path), events, writes

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("not a record with a step")
            except ValueError as error:
                if number == len(lines):  # the last line, without a newline: torn
                    warnings.warn(f"{self.path}: dropped its torn last line {number} (a run killed while writing "
                                  "it).", stacklevel=2)
                    continue
                raise ValueError(f"{self.path} is damaged at line {number} ({error}); remove that line to continue.") \
                    from None
            records.append(record)
        return records

    def rewrite(self, records: list[dict]) -> None:
        """Replaces the file with ``records``, atomically (a resumed run keeps those up to
        its checkpoint, read before the run was accepted)."""
        if self.writes:
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def write(self, kind: str, step: int, **values) -> None:
        if not self.writes:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(report.strict({"kind": kind, "step": step, **values}), allow_nan=False) + "\n")
        if self.events is not None:
            self.events.scalars(step, {(kind if key == kind else f"{kind}/{key}"): value for key, value in values.items()
                                       if isinstance(value, (int, float)) and math.isfinite(value)})


# ============================================================================ signals


class Interrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C (SIGINT) or SIGTERM after saving a checkpoint; ``exit_status``
    is 128 + the signal number (130, 143), and the message says how to continue."""

    def __init__(self, signum: int, run_dir, step: int):
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}: stopped after step {step}, checkpoint saved; continue with "
                         f"`{resume_command(run_dir)}`")
        self.exit_status = 128 + signum


class _Interruption:
    """Callable: true once SIGINT or SIGTERM arrived (``signal`` says which)."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.signal = self.signal or signum


@contextlib.contextmanager
def interruptible():
    """Within the block, SIGINT and SIGTERM only set a flag: ``interrupted()`` is true once
    one arrived (``interrupted.signal`` says which), so the loop can end after the step in
    flight. A second Ctrl-C interrupts at once (KeyboardInterrupt). Outside the main
    thread, signals are left alone and ``interrupted()`` stays false."""
    interrupted = _Interruption()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = {s: signal.signal(s, interrupted.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupted
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
