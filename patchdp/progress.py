"""Training progress that shows wherever the run's stderr goes.

On a terminal: a tqdm bar with the latest loss and ε. Anywhere else (a pipe, ``nohup``,
a cluster job's log file): one plain line every ``every_seconds`` seconds and at the
last step, e.g.

    patchdp: step 120/400 (30%)  loss 0.412  clipped 1.00  ε 0.81 of 2  3.4 steps/s  ETA 1m22s

Before the first step it says that XLA is compiling the private step (which takes
seconds to minutes, with the bar at 0%), and after it how long that took. Steps per
second and the ETA count the steps after the first, so compilation does not skew them.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["Progress"]


def _duration(seconds: float) -> str:
    """1234.5 → '20m35s'; 3.2 → '3s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """Progress of steps ``start + 1 … total``.

    Args:
      total: the planned number of steps; start: steps already taken (a resumed run).
      enabled: False shows nothing but :meth:`write` lines (errors).
      stream: where to write (default ``sys.stderr``); a bar when it is a terminal.
      every_seconds: the interval between plain lines.
      budget: the ε budget shown beside ε spent, or None.
    """

    def __init__(self, total: int, start: int = 0, *, enabled: bool = True, stream=None,
                 every_seconds: float = 10.0, budget: float | None = None, description: str = "DP-SGD"):
        self.stream = stream or sys.stderr
        self.total, self.start, self.enabled = total, start, enabled
        self.every_seconds, self.budget = every_seconds, budget
        interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, initial=start, desc=description, unit="step", dynamic_ncols=True,
                        file=self.stream) if interactive else None
        self.values: dict[str, float] = {}
        self.compile_started = self.first_done = self.last_line = None
        self.first_step = start

    def write(self, text: str) -> None:
        """One line, above the bar if there is one."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """One line, as :meth:`write`, unless disabled."""
        if self.enabled:
            self.write(text)

    def compiling(self) -> None:
        """Call just before the first step."""
        self.compile_started = time.perf_counter()
        self.note("patchdp: compiling the private step (XLA, once per run: seconds to minutes) …")

    def update(self, step: int, **values: float | None) -> None:
        """Step ``step`` is done; ``values`` (loss, clipped, epsilon) are the latest known,
        None where not measured at this step."""
        now = time.perf_counter()
        self.values.update({k: v for k, v in values.items() if v is not None})
        if self.first_done is None:
            self.first_done, self.first_step = now, step
            if self.compile_started is not None:
                self.note(f"patchdp: compiled and took the first step in {now - self.compile_started:.1f} s")
        if not self.enabled:
            return
        if self.bar is not None:
            shown = {"loss": ".3f", "epsilon": ".3g"}
            self.bar.set_postfix({("ε" if k == "epsilon" else k): format(self.values[k], f)
                                  for k, f in shown.items() if k in self.values}, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.last_line is None or now - self.last_line >= self.every_seconds or step == self.total:
            self.last_line = now
            self.write(self.line(step, now))

    def line(self, step: int, now: float) -> str:
        """The plain progress line of ``step`` at time ``now`` (``time.perf_counter``)."""
        parts = [f"patchdp: step {step}/{self.total} ({100 * step / self.total:.0f}%)"]
        if "loss" in self.values:
            parts.append(f"loss {self.values['loss']:.4g}")
        if "clipped" in self.values:
            parts.append(f"clipped {self.values['clipped']:.2f}")
        if "epsilon" in self.values:
            budget = f" of {self.budget:g}" if self.budget is not None else ""
            parts.append(f"ε {self.values['epsilon']:.3g}{budget}")
        timed = step - self.first_step
        if timed > 0 and now > self.first_done:
            rate = timed / (now - self.first_done)
            parts.append(f"{rate:.3g} steps/s")
            if step < self.total:
                parts.append(f"ETA {_duration((self.total - step) / rate)}")
        return "  ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
