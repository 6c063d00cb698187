"""The shared argument checks: what they accept, normalise and refuse, and how they say it."""

import math

import numpy as np
import pytest

from patchdp import _validation as V


def test_accepted_values_are_normalised():
    assert V.integer("n", np.int64(3)) == 3 and type(V.integer("n", np.int64(3))) is int
    assert V.integer("padding", 0, 0) == 0
    assert V.number("x", np.float32(0.5), 0, 1) == 0.5 and type(V.number("x", 1, 0, 1)) is float
    assert V.rate("q", 1) == 1.0
    assert V.size("s", 5) == (5, 5) and V.size("s", "3x4") == (3, 4) and V.size("s", " 7 ") == (7, 7)
    assert V.size("s", [2, 6]) == (2, 6) and V.size("s", (np.int64(2),)) == (2, 2)


@pytest.mark.parametrize("call, message", [
    (lambda: V.integer("batch_size", 0), r"batch_size must be an integer >= 1, got 0\."),
    (lambda: V.integer("batch_size", 3.0), r"batch_size must be an integer >= 1, got 3\.0"),
    (lambda: V.integer("flag", True), "got True"),
    (lambda: V.number("delta", 1.0, 0, 1, low_open=True, high_open=True), r"delta must be a finite number in \(0, 1\), got 1\.0"),
    (lambda: V.number("momentum", -0.1, 0, 1), r"in \[0, 1\], got -0\.1"),
    (lambda: V.number("z", math.inf, 0, math.inf), r"in \[0, inf\), got inf"),
    (lambda: V.number("z", math.nan), "got nan"),
    (lambda: V.rate("sampling rate q", 0), r"sampling rate q must be a finite number in \(0, 1\]"),
    (lambda: V.size("crop", "3x"), r"crop must be N, 'HxW' or \[H, W\] with positive integers, got '3x'"),
    (lambda: V.size("crop", [0, 3]), r"got \[0, 3\]"),
    (lambda: V.size("crop", (1, 2, 3)), r"got \(1, 2, 3\)"),
])
def test_refused_values_name_the_argument_and_the_rule(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("value", ["0.5", None, True, [0.5]])
def test_a_non_number_is_both_a_type_error_and_a_value_error(value):
    with pytest.raises(TypeError, match="x must be a number"):
        V.number("x", value)
    with pytest.raises(ValueError, match="x must be a number"):
        V.number("x", value)
