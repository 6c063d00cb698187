"""Scalars as TensorBoard event files, written without TensorFlow or TensorBoard.

``tensorboard --logdir runs/`` (or any reader of the format: TensorBoard, tbparse,
Weights & Biases' TensorBoard sync) shows the curves of every run below ``runs/``.

The format is small and has been stable since 2016, so it is written here rather than
through a dependency. A file ``events.out.tfevents.<time>.<host>.<pid>`` is a sequence of
TFRecords, each

    uint64 length | uint32 masked CRC-32C of length | data | uint32 masked CRC-32C of data

(little-endian; masked(c) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2^32), whose data is
a serialized ``tensorflow.Event`` protocol buffer:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

The first record carries ``file_version = "brain.Event:2"``; each later one the scalars
of one step. Scalars are stored as float32 (``simple_value``), as TensorBoard keeps them.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Mapping

__all__ = ["EventWriter", "crc32c"]


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as an unsigned 32-bit int."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _record(data: bytes) -> bytes:
    """One TFRecord holding ``data``."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    """A serialized ``Event`` (see the module docstring)."""
    event = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        event += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        event += _field(5, values)
    return event


class EventWriter:
    """Appends scalars to one new event file in ``directory`` (created if needed).

    Each :meth:`scalars` call appends and flushes one record, so a viewer shows the
    run while it trains and a killed run loses nothing already written.
    """

    def __init__(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = directory / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._append(_event(now, 0, file_version="brain.Event:2"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Records ``values`` (tag → number, e.g. ``{"train/loss": 0.4}``) at ``step`` ≥ 0."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}.")
        if values:
            self._append(_event(time.time(), step, scalars={tag: float(v) for tag, v in values.items()}))

    def _append(self, event: bytes) -> None:
        with self.path.open("ab") as f:
            f.write(_record(event))
