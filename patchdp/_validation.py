"""The checks every public constructor and function repeats, written once.

Each returns the value normalised (a Python ``int``, ``float`` or ``(height, width)``
pair) or raises an error that names the argument, says what it must be and shows what
it got. A value of the wrong type raises :class:`InvalidType`, which is both a
``TypeError`` (what Python code expects) and a ``ValueError`` (what the CLI and the
config loader turn into one line).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["InvalidType", "integer", "number", "rate", "size", "clip_norm", "noise_multiplier", "delta",
           "epsilon"]


class InvalidType(TypeError, ValueError):
    """An argument of the wrong type (a string where a number belongs, a bool, None)."""


def integer(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``; bools and floats (even 3.0) are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def number(name: str, value, low: float = -math.inf, high: float = math.inf, *,
           low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the interval from ``low`` to ``high`` (each end
    closed unless ``low_open`` / ``high_open``; an infinite end is always open)."""
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real):
        raise InvalidType(f"{name} must be a number, got {value!r}.")
    value = float(value)
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not (math.isfinite(value) and inside):
        left = "(" if low_open or low == -math.inf else "["
        right = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} must be a finite number in {left}{low:g}, {high:g}{right}, got {value!r}.")
    return value


def rate(name: str, value) -> float:
    """A probability that may be 1 but not 0: a sampling rate q or an inclusion probability p."""
    return number(name, value, 0, 1, low_open=True)


def size(name: str, value) -> tuple[int, int]:
    """(height, width) in pixels from ``N``, ``"N"``, ``"HxW"`` or ``[H, W]``, all positive."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
            value = [int(p) for p in parts]
    pair = [value] if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if isinstance(pair, (list, tuple)) and len(pair) in (1, 2) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in pair):
        return int(pair[0]), int(pair[-1])
    raise ValueError(f"{name} must be N, 'HxW' or [H, W] with positive integers, got {value!r}.")


def clip_norm(value, name: str = "clip_norm C") -> float:
    """The clip norm C: a finite number > 0 (0, negative, NaN and ±inf are refused)."""
    return number(name, value, 0, math.inf, low_open=True)


def noise_multiplier(value, name: str = "noise_multiplier z (noise std / clip norm)") -> float:
    """The noise multiplier z: a finite number >= 0 (z = 0 adds no noise: no privacy)."""
    return number(name, value, 0, math.inf)


def delta(value, name: str = "delta") -> float:
    """δ of an (ε, δ) guarantee, in (0, 1)."""
    return number(name, value, 0, 1, low_open=True, high_open=True)


def epsilon(value, name: str = "epsilon") -> float:
    """A target or budget ε: a finite number > 0."""
    return number(name, value, 0, math.inf, low_open=True)
