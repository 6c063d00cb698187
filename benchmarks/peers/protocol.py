"""What the driver (run.py) and the workers (worker_jax.py, worker_torch.py) share.

Standard library only: every worker imports this module from its own virtual
environment.

- The line-JSON protocol. The driver writes one request per line to a worker's stdin
  (``{"op": "prepare" | "step" | "release" | "versions", ...}``); the worker answers with
  one line on its stdout: ``{"ok": true, ...}`` or ``{"ok": false, "error": traceback}``.
  Anything the libraries print goes to stderr (:func:`serve` points ``sys.stdout`` there),
  so it cannot corrupt the protocol.
- The memory probe: the growth of the process's resident set during one step
  (:class:`PeakRSS`), measured the same way for every framework.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Callable

MiB = 2**20


class PeakRSS:
    """Peak resident-set growth of this process over a stretch of code, in bytes.

    Linux keeps the process's RSS high-water mark (``VmHWM`` in ``/proc/self/status``);
    writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS. So
    ``start()`` resets it and notes the current RSS, and ``growth()`` is the peak RSS
    since then minus that starting RSS: every byte the code touched on top of what was
    resident before (buffers of any allocator, torch's or XLA's alike), at kernel page
    granularity, without sampling. Memory the allocator had freed but kept resident
    before ``start()`` and reuses does not count; run.py therefore measures memory in a
    fresh process per arm with glibc's mmap threshold fixed (see benchmarks/peers/README.md).
    """

    def start(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._start = self._status_kib("VmRSS")

    def growth(self) -> int:
        return (self._status_kib("VmHWM") - self._start) * 1024

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}: the memory probe needs Linux")


def timed(step: Callable[[], float]) -> dict:
    """Runs ``step`` (one training step that blocks until its results exist and returns
    the step's loss) once: wall-clock seconds, peak RSS growth in bytes, loss."""
    probe = PeakRSS()
    probe.start()
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_growth": probe.growth(), "loss": float(loss)}


def serve(handlers: dict[str, Callable[..., dict]]) -> None:
    """The worker loop: one request per stdin line, ``handlers[request["op"]](**rest)``,
    one answer per stdout line, until stdin closes or ``{"op": "quit"}``."""
    out, sys.stdout = sys.stdout, sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            answer = {"ok": True, **handlers[op](**request)}
        except Exception:  # the driver reports the failing arm and goes on with the others
            answer = {"ok": False, "error": traceback.format_exc()}
        out.write(json.dumps(answer) + "\n")
        out.flush()


class Arms:
    """A worker's prepared arms, each a zero-argument step (blocking, returning its loss)
    keyed by (arm, model). A worker subclasses it with ``versions`` and ``prepare``
    (which stores the step in ``self.arms``), and optionally ``init``."""

    OPS = ("versions", "init", "prepare", "step", "release")

    def __init__(self):
        self.arms: dict[tuple[str, str], Callable[[], float]] = {}

    def step(self, arm: str, model: str) -> dict:
        return timed(self.arms[arm, model])

    def release(self, arm: str, model: str) -> dict:
        del self.arms[arm, model]
        return {}

    def serve(self) -> None:
        """Answers the driver's requests until it closes stdin (:func:`serve`)."""
        serve({op: getattr(self, op) for op in self.OPS if hasattr(self, op)})
