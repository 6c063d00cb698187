"""The processes of one run: ``patchdp train`` as the same command in every process of a
TPU pod, a SLURM or Open MPI job, or processes started by hand.

    detect(flags, environment) ─► Launch, or None for one process (nothing to start)
    start(launch) ─► Processes: jax.distributed initialised, a watchdog on the peers
    in_writer / from_writer / agree / anyone / gather_sum
                                       what process 0 does or knows, shared; the same run seen by all
    local_rows / assemble              each process loads its rows of a global batch

**One process** (no launch detected): :func:`start` returns ``Processes(0, 1)`` and
initialises nothing; every function here is then the identity (no collective compiled).

**Several processes** (:func:`detect`, first match wins):

- ``--coordinator HOST:PORT --num-processes N --process-id I`` flags, each in place of
  the environment variable ``PATCHDP_COORDINATOR`` / ``PATCHDP_NUM_PROCESSES`` /
  ``PATCHDP_PROCESS_ID``; all three or none, else one line naming the missing one;
- SLURM (``srun``): ``SLURM_NTASKS`` > 1 with the variables jax reads (job id, step node
  list, task and local ids); one process per GPU, as jax's SLURM detection assigns;
- Open MPI (``mpirun``): ``OMPI_COMM_WORLD_SIZE`` > 1 with ``OMPI_MCA_orte_hnp_uri``;
- Cloud TPU (jax sees TPU chips on the PCI bus): on GKE, ``TPU_WORKER_HOSTNAMES`` (or
  ``TPU_PROCESS_ADDRESSES``) listing several hosts; on a TPU VM, whose pod workers are
  listed only in the VM metadata, always: ``jax.distributed.initialize()`` reads them, and
  a single-host TPU VM becomes a run of one process.

A one-task SLURM or MPI job, and a 1-process flag set, are one process: nothing starts.

**Failure bounds** (:data:`INIT_TIMEOUT_S`, the peer timeout ``peer_timeout`` of
:func:`start`, default :data:`PEER_TIMEOUT_S`):

- start-up: every process must join within INIT_TIMEOUT_S, else each that did exits
  with one line;
- a peer that is killed, crashes or hangs (no heartbeat for ``peer_timeout`` s, counted
  with this process's own clock) makes every other process print one line and exit
  (status 1) within ``peer_timeout`` + 1 s; a peer that stops on an error says so at
  once (:meth:`Processes.fail`) and the others stop within 1 s;
- when process 0 (the coordinator, which hosts jax's distributed service) dies, jax's
  runtime terminates the others at once with its own message (its RPCs fail);
- jax's own heartbeat timeout (2 × ``peer_timeout``) is the backstop: it terminates every
  process with jax's message should the watchdog itself be stuck.

**Collectives here are exact**: they move bytes (``uint8`` arrays through
``jax.experimental.multihost_utils``), so int64 counts and JSON text cross unchanged
whatever ``jax_enable_x64`` says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from typing import Callable, Mapping, NamedTuple, TypeVar

import numpy as np

__all__ = ["Launch", "Processes", "DistributedError", "detect", "start", "local_rows", "assemble",
           "ENVIRONMENT", "INIT_TIMEOUT_S", "PEER_TIMEOUT_S"]

ENVIRONMENT = {"coordinator": "PATCHDP_COORDINATOR", "num_processes": "PATCHDP_NUM_PROCESSES",
               "process_id": "PATCHDP_PROCESS_ID"}
FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes", "process_id": "--process-id"}
SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
INIT_TIMEOUT_S = 300  # every process of a pod must have started within this
PEER_TIMEOUT_S = 60.0  # a peer silent this long is gone
BEAT_S = 1.0  # how often each process says it is alive, and checks the others
_BEATS = "patchdp/beat/"  # key-value directory of the distributed service: one key per process
_DONE, _FAILED = "done", "failed"
T = TypeVar("T")


class DistributedError(RuntimeError):
    """The processes of a run could not start or agree: one line, for every process."""


class Launch(NamedTuple):
    """How this process was launched as one of several. A field that is None is left to
    ``jax.distributed.initialize()``'s cluster detection (SLURM, Open MPI, Cloud TPU)."""

    coordinator: str | None  # host:port of process 0
    num_processes: int | None
    process_id: int | None
    source: str  # what said so: "flags", "SLURM", ...


def detect(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
           environ: Mapping[str, str] = os.environ, *, tpu_chips: Callable[[], int] | None = None) -> Launch | None:
    """The launch this process belongs to, or None for a run of one process.

    Pure but for ``tpu_chips`` (default: jax's count of TPU chips on the PCI bus), which
    is asked only when nothing else matched. Raises ValueError in one line for an
    incomplete or inconsistent ``--coordinator`` / ``--num-processes`` / ``--process-id``
    set (flags or ``PATCHDP_*`` variables).
    """
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    explicit = {name: value if value is not None else environ.get(ENVIRONMENT[name]) for name, value in given.items()}
    if any(value is not None for value in explicit.values()):
        return _explicit(explicit, given)
    if all(name in environ for name in SLURM):
        return _counted("SLURM", environ["SLURM_NTASKS"], environ["SLURM_PROCID"])
    if "OMPI_MCA_orte_hnp_uri" in environ and "OMPI_COMM_WORLD_SIZE" in environ:
        return _counted("Open MPI", environ["OMPI_COMM_WORLD_SIZE"], environ.get("OMPI_COMM_WORLD_RANK", "0"))
    if (tpu_chips or _tpu_chips)() > 0:
        workers = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")  # GKE sets these
        if workers is not None:
            return Launch(None, None, None, "Cloud TPU (GKE)") if len(workers.split(",")) > 1 else None
        return Launch(None, None, None, "Cloud TPU VM")  # the pod's workers are in the VM metadata
    return None


def _explicit(values: dict, given: dict) -> Launch | None:
    def where(name):
        return FLAGS[name] if given[name] is not None else ENVIRONMENT[name]

    missing = [f"{FLAGS[name]} (or {ENVIRONMENT[name]})" for name, value in values.items() if value is None]
    if missing:
        raise ValueError(f"a run of several processes needs --coordinator HOST:PORT, --num-processes N and "
                         f"--process-id I in every process; missing: {', '.join(missing)}.")
    counts = {}
    for name in ("num_processes", "process_id"):
        try:
            counts[name] = int(values[name])
        except ValueError:
            raise ValueError(f"{where(name)} must be an integer, got {values[name]!r}.") from None
    n, i = counts["num_processes"], counts["process_id"]
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"{where('process_id')} must be in 0 … {n - 1} for {where('num_processes')} {n}, got {i}.")
    host, _, port = str(values["coordinator"]).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{where('coordinator')} must be HOST:PORT (process 0's address), got {values['coordinator']!r}.")
    if n == 1:
        return None
    source = "flags" if all(value is not None for value in given.values()) else "flags and PATCHDP_* variables"
    return Launch(str(values["coordinator"]), n, i, source)


def _counted(source: str, count: str, index: str) -> Launch | None:
    """A cluster's launch when it counts more than one process (jax fills in the rest)."""
    return Launch(None, int(count), int(index), source) if int(count) > 1 else None


def _tpu_chips() -> int:
    from jax._src import hardware_utils  # what jax itself asks before reading Cloud TPU metadata

    return hardware_utils.num_available_tpu_chips_and_device_id()[0]


# ============================================================================ the processes


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``index`` of ``count`` (process 0 writes).

    Built by :func:`start`; ``Processes(0, 1)`` is a run of one process.
    """

    index: int = 0
    count: int = 1
    peer_timeout: float = PEER_TIMEOUT_S
    _watchdog: "_Watchdog | None" = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def writer(self) -> bool:
        """Whether this process writes the run directory: process 0."""
        return self.index == 0

    def in_writer(self, act: Callable[[], T]) -> T | None:
        """``act()`` run in process 0 alone: its result there, None in the others. A
        ValueError or OSError it raises is raised in every process (in the others as a
        ValueError with the same line), so all refuse together and none waits for the others."""
        if self.count == 1:
            return act()
        result, error, line = None, None, ""
        if self.writer:
            try:
                result = act()
            except (ValueError, OSError) as raised:
                error, line = raised, _one_line(raised)
        line = _broadcast(line.encode()).decode()
        if error is not None:
            raise error
        if line:
            raise ValueError(line)
        return result

    def from_writer(self, produce: Callable[[], str]) -> str:
        """The text ``produce()`` returns in process 0 alone, in every process; its errors
        as :meth:`in_writer`'s."""
        text = self.in_writer(produce)
        return text if self.count == 1 else _broadcast((text or "").encode()).decode()

    def agree(self, what: str, value) -> None:
        """Raises ValueError in every process, in one line naming the processes that
        differ, unless ``value`` (JSON-serialisable) is the same in all processes as in
        process 0: compared by SHA-256 of its canonical JSON."""
        if self.count == 1:
            return
        digest = np.frombuffer(hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest(), np.uint8)
        digests = _gather(digest)
        differ = [i for i in range(self.count) if not np.array_equal(digests[i], digests[0])]
        if differ:
            raise ValueError(f"process{'es' if len(differ) > 1 else ''} {', '.join(map(str, differ))} of {self.count} "
                             f"{'see' if len(differ) > 1 else 'sees'} a different {what} than process 0; run the same "
                             "command in every process, on files every process sees alike.")

    def all_true(self, value: bool) -> list[int]:
        """The processes (indices) where ``value`` is False; [] when it holds in all."""
        if self.count == 1:
            return [] if value else [0]
        flags = _gather(np.array([value], np.uint8))[:, 0]
        return [i for i in range(self.count) if not flags[i]]

    def anyone(self, value: bool) -> bool:
        """Whether ``value`` is True in any process (the same answer in every process)."""
        return bool(self.all_true(not value))

    def gather_sum(self, array: np.ndarray) -> np.ndarray:
        """The sum over processes of ``array`` (same shape and dtype in each), exact for
        integers (the bytes travel, the sum is taken here in numpy)."""
        array = np.ascontiguousarray(array)
        if self.count == 1:
            return array
        parts = _gather(np.frombuffer(array.tobytes(), np.uint8))
        return sum(np.frombuffer(part.tobytes(), array.dtype).reshape(array.shape) for part in parts)

    def finish(self) -> None:
        """This process is done: the others stop watching it. Call before exiting."""
        if self._watchdog is not None:
            self._watchdog.stop(_DONE)

    def blame_peers(self) -> None:
        """After an unexpected error (e.g. a collective broken by a peer that died): gives
        the watchdog one peer timeout to find a peer gone, in which case it ends this
        process with its one line instead of this error's traceback. Returns when every
        peer is still heard from."""
        if self._watchdog is not None:
            time.sleep(self.peer_timeout + 2 * BEAT_S)

    def fail(self) -> None:
        """This process stops on an error: the others stop within a second, with one
        line. Process 0 first waits (at most the peer timeout) for the others to stop,
        since its exit ends jax's distributed service under them."""
        if self._watchdog is not None:
            self._watchdog.stop(_FAILED)
            if self.writer:
                self._watchdog.wait_for_peers(self.peer_timeout)


def start(launch: Launch | None, *, peer_timeout: float = PEER_TIMEOUT_S) -> Processes:
    """Joins the run ``launch`` describes: initialises ``jax.distributed`` (before any other
    JAX call; CPU collectives over gloo) and starts the watchdog on the peers. None: one
    process, nothing started. Raises DistributedError in one line when the processes do
    not all join within :data:`INIT_TIMEOUT_S`."""
    if launch is None:
        return Processes()
    if peer_timeout < 2 * BEAT_S:
        raise ValueError(f"--peer-timeout must be at least {2 * BEAT_S:g} s, got {peer_timeout:g}.")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU runs only; other platforms have their own
    where = launch.coordinator or f"the coordinator {launch.source} names"
    try:
        jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                                   initialization_timeout=INIT_TIMEOUT_S,
                                   heartbeat_timeout_seconds=int(2 * peer_timeout),
                                   shutdown_timeout_seconds=INIT_TIMEOUT_S)
    except Exception as error:  # jax raises RuntimeError, ValueError or XlaRuntimeError here
        raise DistributedError(f"could not join the run's processes at {where} ({launch.source}) within "
                               f"{INIT_TIMEOUT_S} s: {_one_line(error)}") from None
    from jax._src.distributed import global_state  # the service's key-value store (orbax uses it alike)

    processes = Processes(jax.process_index(), jax.process_count(), peer_timeout)
    if processes.count == 1:
        return processes
    watchdog = _Watchdog(global_state.client, processes.index, processes.count, peer_timeout)
    return dataclasses.replace(processes, _watchdog=watchdog)


# ============================================================================ data


def local_rows(sharding, size: int) -> np.ndarray:
    """The rows (indices into axis 0 of a global array of ``size`` rows placed with
    ``sharding``) held by this process's devices, ascending; all rows in one process."""
    index_map = sharding.addressable_devices_indices_map((size,))
    return np.array(sorted({row for index in index_map.values() for row in range(size)[index[0]]}), np.int64)


def assemble(sharding, local):
    """The global arrays (leaf by leaf of the pytree ``local``) whose :func:`local_rows`
    this process holds in ``local``: ``jax.make_array_from_process_local_data``."""
    import jax

    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


# ============================================================================ internals


def _broadcast(data: bytes) -> bytes:
    """Process 0's ``data`` in every process (the others' argument is ignored)."""
    from jax.experimental import multihost_utils

    length = int(multihost_utils.broadcast_one_to_all(np.array([len(data)], np.int32))[0])
    buffer = np.zeros(length, np.uint8)
    buffer[:len(data)] = np.frombuffer(data, np.uint8)[:length]
    return multihost_utils.broadcast_one_to_all(buffer).tobytes()


def _gather(array: np.ndarray) -> np.ndarray:
    """(processes, *array.shape): every process's ``array`` (uint8, same shape in all)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array))


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class _Watchdog:
    """A thread that, every BEAT_S, writes this process's heartbeat to the distributed
    service's key-value store and reads the others'. A peer whose beat has not changed
    for ``timeout`` s (this process's clock), or that says it failed, ends this process
    with one line on stderr (``os._exit(1)``: a peer waiting in a collective cannot be
    interrupted otherwise). An unreachable service (process 0 gone) ends it likewise."""

    def __init__(self, client, index: int, count: int, timeout: float):
        self.client, self.index, self.count, self.timeout = client, index, count, timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="patchdp-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        heard: dict[str, tuple[str, float]] = {}  # peer → (last beat, when it changed)
        beat = 0
        while not self._stop.is_set():
            beat += 1
            try:
                self.client.key_value_set(f"{_BEATS}{self.index}", str(beat), allow_overwrite=True)
                beats = dict(self.client.key_value_dir_get(_BEATS))
            except Exception as error:  # the service is gone with process 0
                if not self._stop.is_set():
                    self._leave(f"process {self.index}: lost process 0 (the coordinator): {_one_line(error)}")
                return
            now = time.monotonic()
            for peer in range(self.count):
                value = beats.get(f"{_BEATS}{peer}")
                if peer == self.index or value == _DONE or self._stop.is_set():
                    continue
                if value == _FAILED and not self._stop.wait(BEAT_S):  # unless this process is failing too
                    self._leave(f"process {peer} of {self.count} stopped on an error (its output says which); "
                          f"process {self.index} stops too.")
                last = heard.get(peer)
                if last is None or last[0] != value:
                    heard[peer] = (value, now)
                elif now - last[1] > self.timeout:
                    self._leave(f"process {peer} of {self.count} has not been heard from for {self.timeout:g} s "
                          f"(killed, crashed or hung); process {self.index} stops. Continue the run with the same "
                          "command and --resume RUN_DIR in every process.")
            self._stop.wait(BEAT_S)

    def _leave(self, line: str) -> None:
        """Ends this process with ``line`` on stderr, telling the peers it failed."""
        sys.stdout.flush()
        print(f"patchdp: error: {line}", file=sys.stderr, flush=True)
        self._tell(_FAILED)
        os._exit(1)

    def _tell(self, state: str) -> None:
        try:
            self.client.key_value_set(f"{_BEATS}{self.index}", state, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service is gone; the peers learn it from jax
            pass

    def stop(self, state: str) -> None:
        """Stops watching and tells the peers ``state`` (done or failed)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._tell(state)

    def wait_for_peers(self, timeout: float) -> None:
        """Waits until every peer is done or failed, or ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                beats = dict(self.client.key_value_dir_get(_BEATS))
            except Exception:  # noqa: BLE001 - nobody left to wait for
                return
            if all(beats.get(f"{_BEATS}{peer}") in (_DONE, _FAILED) for peer in range(self.count)):
                return
            time.sleep(BEAT_S / 4)

