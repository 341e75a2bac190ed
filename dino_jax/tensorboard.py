"""A dependency-free TensorBoard scalar writer (event files: TFRecord framing, Event protos).

Training needs neither TensorFlow nor the `tensorboard` package to write these files: all it
logs is scalars, and their format is a few lines, written here. Each record is (length,
masked CRC32C, data, masked CRC32C) around an `Event` protocol buffer holding a scalar
summary. Viewing them needs `tensorboard` (`tensorboard --logdir`), whose own reader works
without TensorFlow; tests/test_tensorboard.py reads our files back with it.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    # A per-byte loop in Python: about 0.3 ms for a record of 30 scalars (~900 bytes),
    # written once every log_every_steps, so nothing faster is worth a dependency.
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _event(wall_time: float, step: int, *, summary: bytes = b"", file_version: str = "") -> bytes:
    # Event: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5.
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        out += _length_delimited(3, file_version.encode())
    if summary:
        out += _length_delimited(5, summary)
    return out


def _scalar_summary(scalars: dict[str, float]) -> bytes:
    # Summary.value = 1 (repeated Value); Value.tag = 1, Value.simple_value = 2 (float).
    values = b"".join(
        _length_delimited(
            1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v)))
        )
        for tag, v in scalars.items()
    )
    return values


class ScalarWriter:
    """Appends scalar summaries to `events.out.tfevents.<time>.<host>` in `logdir`."""

    def __init__(self, logdir: str | os.PathLike):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(os.fspath(logdir), name)
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the run
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)))
        self._file.write(record + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._write(_event(time.time(), int(step), summary=_scalar_summary(scalars)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
