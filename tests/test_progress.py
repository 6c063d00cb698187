"""Progress without a terminal: plain lines with the step, loss, clipped fraction, ε,
steps/s and ETA; one before the first step says XLA compiles; a bar on a terminal."""

import io
import time

from patchdp.progress import Progress, _duration


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    progress = Progress(100, enabled=True, stream=out, every_seconds=0, budget=2.0)
    progress.compiling()
    progress.update(1)
    time.sleep(0.02)
    progress.update(10, loss=0.5, clipped=0.25, epsilon=None)
    progress.update(50, epsilon=1.25)
    progress.update(100)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("patchdp: compiling the private step")
    assert lines[1].startswith("patchdp: compiled and took the first step in")
    assert lines[2] == "patchdp: step 1/100 (1%)"
    assert lines[3].startswith("patchdp: step 10/100 (10%)  loss 0.5  clipped 0.25  ") and "steps/s  ETA " in lines[3]
    assert "loss 0.5  clipped 0.25  ε 1.25 of 2  " in lines[4]  # the latest known values are kept
    assert lines[5].startswith("patchdp: step 100/100 (100%)") and "ETA" not in lines[5]
    assert len(lines) == 6


def test_lines_are_spaced_in_time_and_the_last_step_always_shows():
    out = io.StringIO()
    progress = Progress(1000, stream=out, every_seconds=3600)
    for step in range(1, 1001):
        progress.update(step, loss=1.0)
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["1/1000", "1000/1000"]


def test_disabled_shows_nothing_but_written_lines():
    out = io.StringIO()
    progress = Progress(10, enabled=False, stream=out, every_seconds=0)
    progress.compiling()
    progress.update(1, loss=1.0)
    progress.note("patchdp: evaluation at step 1")
    progress.write("patchdp: overflow")
    assert out.getvalue() == "patchdp: overflow\n"


def test_a_terminal_gets_a_bar():
    out = Terminal()
    progress = Progress(10, start=2, stream=out, every_seconds=0)
    progress.update(3, loss=0.25, epsilon=0.5)
    progress.close()
    assert "3/10" in out.getvalue() and "loss=0.250" in out.getvalue() and "patchdp: step" not in out.getvalue()


def test_durations():
    assert [_duration(s) for s in (3.2, 75, 3600 * 2 + 60 * 5)] == ["3s", "1m15s", "2h05m"]
