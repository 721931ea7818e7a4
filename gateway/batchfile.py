"""Batch files: what `bandgate simulate --out` writes and `replay` and the load generator read.

Format (docs/wire-format.md, "Batch files"): the 8 bytes b"BGBFILE1", then records, each a
little-endian u32 length followed by that many bytes of a serialized bandgate.v1.Batch. Ground truth,
when there is any, sits beside the file as FILE.truth.npz.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from bandgate.v1 import batch_pb2

MAGIC = b"BGBFILE1"
MAX_RECORD_BYTES = 256 * 1024 * 1024


class BatchFileError(ValueError):
    """A batch file that is not one, or ends inside a record."""


def write_batches(out: BinaryIO, batches: Iterable[batch_pb2.Batch]) -> int:
    """Write the file header and the batches; returns how many were written."""
    out.write(MAGIC)
    n = 0
    for batch in batches:
        data = batch.SerializeToString()
        out.write(struct.pack("<I", len(data)))
        out.write(data)
        n += 1
    return n


def read_batches(path: str | Path) -> Iterator[batch_pb2.Batch]:
    """Yield the batches of a batch file in order."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise BatchFileError(f"{path}: not a bandgate batch file (bad magic)")
        while head := f.read(4):
            if len(head) < 4:
                raise BatchFileError(f"{path}: truncated record header")
            (length,) = struct.unpack("<I", head)
            if length > MAX_RECORD_BYTES:
                raise BatchFileError(f"{path}: record of {length} bytes exceeds {MAX_RECORD_BYTES}")
            data = f.read(length)
            if len(data) < length:
                raise BatchFileError(f"{path}: truncated record")
            batch = batch_pb2.Batch()
            batch.ParseFromString(data)
            yield batch


def truth_path(path: str | Path) -> Path:
    """Where the ground truth of a simulated batch file lives."""
    return Path(f"{path}.truth.npz")
