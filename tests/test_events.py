"""TensorBoard event files: CRC-32C against RFC 3720's test vectors, the records against
protobuf's own parser (message classes built from the Event schema), and the file
against TensorBoard's reader where TensorBoard is installed."""

import struct

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from patchdp.events import EventWriter, crc32c


def test_crc32c_matches_rfc_3720():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def event_class():
    """tensorflow.Event (the fields this writer uses), from a schema, by protobuf itself."""
    f = descriptor_pb2.FileDescriptorProto(name="event_test.proto", package="t", syntax="proto3")
    value = f.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=9, label=1)
    value.field.add(name="simple_value", number=2, type=2, label=1)
    summary = f.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=11, label=3, type_name=".t.Value")
    event = f.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=1, label=1)
    event.field.add(name="step", number=2, type=3, label=1)
    event.field.add(name="file_version", number=3, type=9, label=1)
    event.field.add(name="summary", number=5, type=11, label=1, type_name=".t.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))


def records(path):
    """The payloads of a TFRecord file, checking both masked CRCs of every record."""
    data, out, at = path.read_bytes(), [], 0
    masked = lambda b: (((crc32c(b) >> 15) | (crc32c(b) << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    while at < len(data):
        header = data[at:at + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[at + 8:at + 12])
        payload = data[at + 12:at + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert header_crc == masked(header) and payload_crc == masked(payload)
        out.append(payload)
        at += 16 + length
    return out


def test_events_parse_with_protobuf(tmp_path):
    writer = EventWriter(tmp_path / "tb")
    writer.scalars(3, {"train/loss": 0.25, "epsilon": 1.5})
    writer.scalars(300, {"eval/miou": 0.8})
    writer.scalars(301, {})  # nothing to record: no record
    assert writer.path.name.startswith("events.out.tfevents.")
    Event = event_class()
    events = [Event.FromString(payload) for payload in records(writer.path)]
    assert [e.step for e in events] == [0, 3, 300]
    assert events[0].file_version == "brain.Event:2"
    assert {v.tag: v.simple_value for v in events[1].summary.value} == {"train/loss": 0.25, "epsilon": 1.5}
    assert events[2].summary.value[0].tag == "eval/miou"
    assert events[2].summary.value[0].simple_value == pytest.approx(0.8, rel=1e-7)  # float32
    assert all(e.wall_time > 1e9 for e in events)
    with pytest.raises(ValueError, match="non-negative"):
        writer.scalars(-1, {"x": 1.0})


def test_tensorboard_reads_the_file(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    writer = EventWriter(tmp_path)
    for step in range(5):
        writer.scalars(step * 10, {"train/loss": 1.0 / (step + 1)})
    events = accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [0, 10, 20, 30, 40]
    np.testing.assert_allclose([s.value for s in scalars], [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5], rtol=1e-7)
