"""Build and open batch envelopes: frames → container → zstd → protobuf, and back.

Opening checks what the envelope claims against what the frames say (device, boot, sequence range,
frame count) so that the gateway's dedup, which runs on the envelope alone, cannot be lied to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

from bandgate.v1 import batch_pb2
from decoder import config
from decoder.batch import BatchDecompressor, BatchError, BatchErrorCode, compress_batch
from decoder.frames import DecodedBatch, Frame, FrameStatus, decode_frames, encode_container, encode_frame


def build_batch(
    frames: Sequence[Frame],
    *,
    flags: int = 0,
    level: int = config.ZSTD_LEVEL,
    dictionary: zstandard.ZstdCompressionDict | None = None,
) -> batch_pb2.Batch:
    """What a band sends: its frames (one device, one boot, consecutive sequence numbers) in one batch."""
    if not frames:
        raise ValueError("a batch holds at least one frame")
    first = frames[0]
    for i, f in enumerate(frames):
        if (f.device_id, f.boot_id, f.seq) != (first.device_id, first.boot_id, first.seq + i):
            raise ValueError("frames of a batch share device and boot and have consecutive sequence numbers")
    container = encode_container(encode_frame(f) for f in frames)
    return batch_pb2.Batch(
        device_id=first.device_id,
        boot_id=first.boot_id,
        first_seq=first.seq,
        last_seq=frames[-1].seq,
        flags=flags,
        dict_id=dictionary.dict_id() if dictionary is not None else 0,
        payload=compress_batch(container, level=level, dictionary=dictionary),
        format_version=config.FORMAT_VERSION,
        frame_count=len(frames),
    )


@dataclass(frozen=True, eq=False)
class OpenedBatch:
    """A decoded batch whose frames were checked against its envelope."""

    envelope: batch_pb2.Batch
    decoded: DecodedBatch
    # Frames whose header contradicts the envelope are marked here (and count as bad frames).
    frame_errors: list[tuple[int, str]]


def open_batch(batch: batch_pb2.Batch, decompressor: BatchDecompressor) -> OpenedBatch:
    """Decompress (bounded) and decode; raises BatchError when the batch fails as a whole."""
    if batch.format_version != config.FORMAT_VERSION:
        raise BatchError(BatchErrorCode.BAD_ENVELOPE, f"unsupported format_version {batch.format_version}")
    if batch.last_seq < batch.first_seq or batch.last_seq - batch.first_seq + 1 != batch.frame_count:
        raise BatchError(BatchErrorCode.BAD_ENVELOPE, "first_seq, last_seq and frame_count disagree")
    buf = decompressor.decompress(batch.payload, dict_id=batch.dict_id)
    decoded = decode_frames(buf)
    if decoded.batch_status != FrameStatus.OK:
        raise BatchError(BatchErrorCode.BAD_CONTAINER, f"frame container: {decoded.batch_status.reason}")
    if decoded.n_frames != batch.frame_count:
        raise BatchError(
            BatchErrorCode.BAD_ENVELOPE,
            f"the envelope says {batch.frame_count} frames, the container holds {decoded.n_frames}",
        )
    errors = [(i, s.reason) for i, s in decoded.errors()]
    ok = decoded.ok()
    expected_seq = batch.first_seq + np.arange(decoded.n_frames, dtype=np.int64)
    wrong = ok & (
        (decoded.device_id != np.uint64(batch.device_id))
        | (decoded.boot_id != batch.boot_id)
        | (decoded.seq.astype(np.int64) != expected_seq)
    )
    errors += [
        (int(i), "frame header contradicts the envelope (device, boot or sequence)")
        for i in np.flatnonzero(wrong)
    ]
    return OpenedBatch(batch, decoded, sorted(errors))
