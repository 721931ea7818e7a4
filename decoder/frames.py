"""Wire format v1: the batch container, frames, the Numba decoder and the reference encoder.

The layout is specified in docs/wire-format.md; this module is its executable form. The decoder is one
Numba call per decompressed batch: it checks every length and offset before use, gives each frame a
status, and decodes the good frames around a bad one. It never raises on input bytes and never reads
outside the buffer.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import google_crc32c
import numpy as np
from numba import njit

from decoder import config
from decoder._intrinsics import crc32c_update, load_i8, load_i16, load_u16, load_u32, load_u64, store_i16


class FrameStatus(enum.IntEnum):
    """Why a frame (or a whole batch container) did not decode; OK otherwise."""

    OK = 0
    TRUNCATED = 1  # the bytes end before the frame (or the container's index) does
    BAD_MAGIC = 2
    UNKNOWN_VERSION = 3  # the frame needs a newer reader than format v1
    LENGTH_OVERFLOW = 4  # a length or count field claims more bytes than the frame has
    INTEGRITY_MISMATCH = 5  # CRC-32C differs: the bytes changed after the band wrote them
    IMPLAUSIBLE_VALUE = 6  # a header field or heart rate outside what a band can produce
    MALFORMED = 7  # lengths disagree, an unknown block width, or bytes left over

    @property
    def reason(self) -> str:
        """A short, stable, human-readable reason (safe for logs and gRPC details: no sample values)."""
        return _REASONS[self]


_REASONS = {
    FrameStatus.OK: "ok",
    FrameStatus.TRUNCATED: "truncated: the data ends inside the frame",
    FrameStatus.BAD_MAGIC: "bad magic: not a bandgate frame",
    FrameStatus.UNKNOWN_VERSION: "unknown version: the frame needs a newer decoder",
    FrameStatus.LENGTH_OVERFLOW: "length overflow: a length or count exceeds the bytes present",
    FrameStatus.INTEGRITY_MISMATCH: "integrity mismatch: CRC-32C does not match",
    FrameStatus.IMPLAUSIBLE_VALUE: "implausible value: a header field or heart rate is out of range",
    FrameStatus.MALFORMED: "malformed: lengths disagree or an unknown block encoding",
}

_OK = 0
_TRUNCATED = 1
_BAD_MAGIC = 2
_UNKNOWN_VERSION = 3
_LENGTH_OVERFLOW = 4
_INTEGRITY = 5
_IMPLAUSIBLE = 6
_MALFORMED = 7

# Header field offsets (docs/wire-format.md, "Frame header").
_H_MAGIC, _H_VERSION, _H_MIN_VERSION, _H_HEADER_LEN, _H_FLAGS = 0, 2, 3, 4, 6
_H_DEVICE, _H_BOOT, _H_SEQ, _H_START, _H_UTC_OFFSET = 8, 16, 20, 24, 32
_H_RANGE, _H_BITS, _H_RATE, _H_N_ACCEL, _H_N_HR, _H_N_RR = 34, 35, 36, 40, 44, 46
_H_PAYLOAD_LEN, _H_CRC = 48, 52
_HEADER_STRUCT = struct.Struct("<HBBHHQIIqhBBIIHHII")
assert _HEADER_STRUCT.size == config.FRAME_HEADER_LEN

_HDR = config.FRAME_HEADER_LEN
_BLOCK = config.ACCEL_BLOCK


# --- the kernel ----------------------------------------------------------------------------------------


@njit(**config.JIT)
def _accel_size(buf, p, end, n):
    """Bytes the accelerometer section at `p` occupies, or -1 if its width table is invalid or overruns."""
    if n == 0:
        return 0
    nres = n - 1
    nblocks = (nres + _BLOCK - 1) // _BLOCK
    table = p + 6
    if table + 3 * nblocks > end:
        return -1
    size = 6 + 3 * nblocks
    for axis in range(3):
        for b in range(nblocks):
            w = np.int64(buf[table + axis * nblocks + b])
            if w != 1 and w != 2:
                return -2
            k = min(_BLOCK, nres - b * _BLOCK)
            size += w * k
    return size


# Raw loads and stores: the caller has checked every position, and Numba's negative-index fix-up on
# `p + j` (it cannot prove the sum non-negative) otherwise costs two thirds of the decode time.
@njit(inline="always")
def _block_narrow(buf, p, out, o, k, v, x):
    for j in range(k):
        v += load_i8(buf, p + j)
        x += v
        store_i16(out, o + j, x)
    return v, x


@njit(inline="always")
def _block_wide(buf, p, out, o, k, v, x):
    # Low bytes then high bytes of the block: the high plane is nearly constant, which zstd likes.
    for j in range(k):
        v += (load_i8(buf, p + j) & 0xFF) | (load_i8(buf, p + k + j) << 8)
        x += v
        store_i16(out, o + j, x)
    return v, x


@njit(inline="always")
def _decode_block(buf, width, p, out, o, k, v, x):
    """One block of one axis; returns the advanced data position and the running sums, wrapped."""
    if width == 2:
        if k == _BLOCK:
            v, x = _block_wide(buf, p, out, o, _BLOCK, v, x)
        else:
            v, x = _block_wide(buf, p, out, o, k, v, x)
        p += 2 * k
    else:
        if k == _BLOCK:
            v, x = _block_narrow(buf, p, out, o, _BLOCK, v, x)
        else:
            v, x = _block_narrow(buf, p, out, o, k, v, x)
        p += k
    return p, ((v + 32768) & 0xFFFF) - 32768, ((x + 32768) & 0xFFFF) - 32768


@njit(**config.JIT)
def _decode_accel(buf, p, n, nblocks, xo, yo, zo, o):
    """Second-order prediction: residual r gives velocity v += r and value x += v (mod 2**16).

    Within a block the running sums stay far inside int64 (|v| < 2**22), so the wrap to int16 is done
    once per block, not once per sample. Full blocks run with a constant trip count, which LLVM unrolls
    (three times faster than a variable count). Blocks are taken x, y, z in turn although each axis's
    data is contiguous: the three dependency chains are independent, so the core overlaps them.
    """
    wx = p + 6
    wy = wx + nblocks
    wz = wy + nblocks
    px = wz + nblocks
    py = px
    for b in range(nblocks):
        py += np.int64(buf[wx + b]) * min(_BLOCK, n - 1 - b * _BLOCK)
    pz = py
    for b in range(nblocks):
        pz += np.int64(buf[wy + b]) * min(_BLOCK, n - 1 - b * _BLOCK)
    ax = np.int64(load_i16(buf, p))
    ay = np.int64(load_i16(buf, p + 2))
    az = np.int64(load_i16(buf, p + 4))
    xo[o] = ax
    yo[o] = ay
    zo[o] = az
    vx = np.int64(0)
    vy = np.int64(0)
    vz = np.int64(0)
    o += 1
    for b in range(nblocks):
        k = min(_BLOCK, n - 1 - b * _BLOCK)
        px, vx, ax = _decode_block(buf, buf[wx + b], px, xo, o, k, vx, ax)
        py, vy, ay = _decode_block(buf, buf[wy + b], py, yo, o, k, vy, ay)
        pz, vz, az = _decode_block(buf, buf[wz + b], pz, zo, o, k, vz, az)
        o += k


@njit(**config.JIT)
def _decode_batch(buf):
    """Decode a whole decompressed batch container; see decode_frames for the outputs."""
    size = buf.size
    batch_status = _OK
    nframes = 0
    if size < config.BATCH_HEADER_LEN:
        batch_status = _TRUNCATED
    elif load_u32(buf, 0) != config.BATCH_MAGIC:
        batch_status = _BAD_MAGIC
    else:
        nframes = load_u32(buf, 4)
        if config.BATCH_HEADER_LEN + 4 * nframes > size:
            batch_status = _LENGTH_OVERFLOW
            nframes = 0
        else:
            c = crc32c_update(buf, 0, 8, 0xFFFFFFFF)
            c = crc32c_update(buf, config.BATCH_HEADER_LEN, config.BATCH_HEADER_LEN + 4 * nframes, c)
            if (c ^ 0xFFFFFFFF) != load_u32(buf, 8):
                batch_status = _INTEGRITY
                nframes = 0

    status = np.zeros(nframes, np.uint8)
    version = np.zeros(nframes, np.uint8)
    flags = np.zeros(nframes, np.uint16)
    device_id = np.zeros(nframes, np.uint64)
    boot_id = np.zeros(nframes, np.uint32)
    seq = np.zeros(nframes, np.uint32)
    start_us = np.zeros(nframes, np.int64)
    utc_offset_min = np.zeros(nframes, np.int16)
    accel_range_g = np.zeros(nframes, np.uint8)
    accel_bits = np.zeros(nframes, np.uint8)
    sample_rate_mhz = np.zeros(nframes, np.uint32)
    rr_first_beat_ms = np.zeros(nframes, np.uint32)
    # Where each frame's samples start in the concatenated channel arrays, and how many it has.
    accel_start = np.zeros(nframes, np.int64)
    accel_count = np.zeros(nframes, np.int64)
    hr_start = np.zeros(nframes, np.int64)
    hr_count = np.zeros(nframes, np.int64)
    rr_start = np.zeros(nframes, np.int64)
    rr_count = np.zeros(nframes, np.int64)
    frame_offset = np.zeros(nframes, np.int64)
    frame_len = np.zeros(nframes, np.int64)

    # Pass 1: locate frames, read headers, bound the output sizes by what the payloads can hold.
    pos = config.BATCH_HEADER_LEN + 4 * nframes
    total_accel = 0
    total_hr = 0
    total_rr = 0
    for f in range(nframes):
        length = load_u32(buf, config.BATCH_HEADER_LEN + 4 * f)
        frame_offset[f] = pos
        frame_len[f] = length
        start = pos
        pos += length
        if pos > size or length < _HDR:
            status[f] = _TRUNCATED
            continue
        if load_u16(buf, start + _H_MAGIC) != config.FRAME_MAGIC:
            status[f] = _BAD_MAGIC
            continue
        version[f] = buf[start + _H_VERSION]
        if buf[start + _H_MIN_VERSION] > config.FORMAT_VERSION or buf[start + _H_VERSION] == 0:
            status[f] = _UNKNOWN_VERSION
            continue
        header_len = load_u16(buf, start + _H_HEADER_LEN)
        payload_len = load_u32(buf, start + _H_PAYLOAD_LEN)
        if header_len < _HDR or header_len + payload_len != length:
            status[f] = _LENGTH_OVERFLOW if header_len + payload_len > length else _MALFORMED
            continue
        flags[f] = load_u16(buf, start + _H_FLAGS)
        device_id[f] = load_u64(buf, start + _H_DEVICE)
        boot_id[f] = load_u32(buf, start + _H_BOOT)
        seq[f] = load_u32(buf, start + _H_SEQ)
        start_us[f] = np.int64(load_u64(buf, start + _H_START))
        utc_offset_min[f] = load_i16(buf, start + _H_UTC_OFFSET)
        accel_range_g[f] = buf[start + _H_RANGE]
        accel_bits[f] = buf[start + _H_BITS]
        sample_rate_mhz[f] = load_u32(buf, start + _H_RATE)
        n_accel = load_u32(buf, start + _H_N_ACCEL)
        n_hr = load_u16(buf, start + _H_N_HR)
        n_rr = load_u16(buf, start + _H_N_RR)
        # Each residual needs at least one byte, so this bounds allocation by the input size.
        need = n_hr
        if n_accel > 0:
            need += 6 + 3 * (n_accel - 1)
        if n_rr > 0:
            need += config.RR_SECTION_HEADER + 2 * n_rr
        if need > payload_len:
            status[f] = _LENGTH_OVERFLOW
            continue
        accel_count[f] = n_accel
        hr_count[f] = n_hr
        rr_count[f] = n_rr
        total_accel += n_accel
        total_hr += n_hr
        total_rr += n_rr
    if batch_status == _OK and pos < size:
        batch_status = _MALFORMED  # bytes after the last indexed frame

    x = np.empty(total_accel, np.int16)
    y = np.empty(total_accel, np.int16)
    z = np.empty(total_accel, np.int16)
    hr = np.empty(total_hr, np.uint8)
    rr = np.empty(total_rr, np.uint16)

    # Pass 2: integrity, plausibility and exact section sizes, then decode while the frame is in cache.
    ca = 0
    ch = 0
    cr = 0
    for f in range(nframes):
        if status[f] != _OK:
            continue
        start = frame_offset[f]
        end = start + frame_len[f]
        n_accel = accel_count[f]
        n_hr = hr_count[f]
        n_rr = rr_count[f]
        accel_count[f] = 0
        hr_count[f] = 0
        rr_count[f] = 0
        c = crc32c_update(buf, start, start + _H_CRC, 0xFFFFFFFF)
        c = crc32c_update(buf, start + _HDR, end, c)
        if (c ^ 0xFFFFFFFF) != load_u32(buf, start + _H_CRC):
            status[f] = _INTEGRITY
            continue
        rate = np.int64(sample_rate_mhz[f])
        bits = np.int64(accel_bits[f])
        rng = np.int64(accel_range_g[f])
        if (
            (n_accel > 0 and (rate < config.MIN_SAMPLE_RATE_MHZ or rate > config.MAX_SAMPLE_RATE_MHZ))
            or bits < config.MIN_ACCEL_BITS
            or bits > config.MAX_ACCEL_BITS
            or (rng != 2 and rng != 4 and rng != 8 and rng != 16)
            or start_us[f] < config.MIN_START_US
            or start_us[f] > config.MAX_START_US
            or abs(np.int64(utc_offset_min[f])) > config.MAX_UTC_OFFSET_MIN
        ):
            status[f] = _IMPLAUSIBLE
            continue
        p = start + np.int64(load_u16(buf, start + _H_HEADER_LEN))
        accel_bytes = _accel_size(buf, p, end, n_accel)
        if accel_bytes == -2:
            status[f] = _MALFORMED
            continue
        used = accel_bytes + n_hr + (config.RR_SECTION_HEADER + 2 * n_rr if n_rr > 0 else 0)
        if accel_bytes < 0 or p + used > end:
            status[f] = _LENGTH_OVERFLOW
            continue
        if version[f] == config.FORMAT_VERSION and p + used != end:
            status[f] = _MALFORMED  # a v1 frame has no room for anything but its three sections
            continue
        hp = p + accel_bytes
        bad_hr = False
        for i in range(n_hr):
            v = buf[hp + i]
            if v != 0 and (v < config.MIN_HR_BPM or v > config.MAX_HR_BPM):
                bad_hr = True
        if bad_hr:
            status[f] = _IMPLAUSIBLE
            continue

        if n_accel > 0:
            _decode_accel(buf, p, n_accel, (n_accel - 2 + _BLOCK) // _BLOCK, x, y, z, ca)
        for i in range(n_hr):
            hr[ch + i] = buf[hp + i]
        rp = hp + n_hr
        if n_rr > 0:
            rr_first_beat_ms[f] = load_u32(buf, rp)
            rp += config.RR_SECTION_HEADER
            for i in range(n_rr):
                rr[cr + i] = load_u16(buf, rp + 2 * i)
        accel_start[f] = ca
        accel_count[f] = n_accel
        hr_start[f] = ch
        hr_count[f] = n_hr
        rr_start[f] = cr
        rr_count[f] = n_rr
        ca += n_accel
        ch += n_hr
        cr += n_rr

    return (
        batch_status,
        status,
        version,
        flags,
        device_id,
        boot_id,
        seq,
        start_us,
        utc_offset_min,
        accel_range_g,
        accel_bits,
        sample_rate_mhz,
        rr_first_beat_ms,
        accel_start,
        accel_count,
        hr_start,
        hr_count,
        rr_start,
        rr_count,
        x[:ca],
        y[:ca],
        z[:ca],
        hr[:ch],
        rr[:cr],
    )


# --- the public wrapper --------------------------------------------------------------------------------

_FRAME_FIELDS = (
    "status",
    "version",
    "flags",
    "device_id",
    "boot_id",
    "seq",
    "start_us",
    "utc_offset_min",
    "accel_range_g",
    "accel_bits",
    "sample_rate_mhz",
    "rr_first_beat_ms",
    "accel_start",
    "accel_count",
    "hr_start",
    "hr_count",
    "rr_start",
    "rr_count",
)


@dataclass(frozen=True, eq=False)
class DecodedBatch:
    """Structure of arrays for one decoded batch.

    Per-frame arrays (one entry per frame in the container, good or bad) hold the header fields and where
    the frame's samples sit in the concatenated channel arrays. Only frames with status OK contribute
    samples; a bad frame has zero counts. Sample `i` of frame `f` was taken at
    `start_us[f] + i * 1e9 / sample_rate_mhz[f]` µs (see `accel_time_us`); heart rate is 1 Hz from
    `start_us[f]`; RR interval `j` ends `rr_first_beat_ms[f] + sum(rr[1..j])` ms after `start_us[f]`.
    """

    batch_status: FrameStatus
    status: np.ndarray
    version: np.ndarray
    flags: np.ndarray
    device_id: np.ndarray
    boot_id: np.ndarray
    seq: np.ndarray
    start_us: np.ndarray
    utc_offset_min: np.ndarray
    accel_range_g: np.ndarray
    accel_bits: np.ndarray
    sample_rate_mhz: np.ndarray
    rr_first_beat_ms: np.ndarray
    accel_start: np.ndarray
    accel_count: np.ndarray
    hr_start: np.ndarray
    hr_count: np.ndarray
    rr_start: np.ndarray
    rr_count: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    hr_bpm: np.ndarray
    rr_ms: np.ndarray

    @property
    def n_frames(self) -> int:
        return int(self.status.size)

    @property
    def n_samples(self) -> int:
        """Tri-axial accelerometer samples decoded (good frames only)."""
        return int(self.x.size)

    def ok(self) -> np.ndarray:
        """Boolean mask of frames that decoded."""
        return self.status == FrameStatus.OK

    def errors(self) -> list[tuple[int, FrameStatus]]:
        """(frame index, status) of every frame that did not decode."""
        return [(int(i), FrameStatus(int(self.status[i]))) for i in np.flatnonzero(self.status)]

    def accel_time_us(self, f: int) -> np.ndarray:
        """Sample times of frame `f` in UTC µs (integer, floor), computed on demand, not in the hot path."""
        n = int(self.accel_count[f])
        return int(self.start_us[f]) + (np.arange(n, dtype=np.int64) * 1_000_000_000) // int(
            self.sample_rate_mhz[f]
        )


def decode_frames(data: bytes | bytearray | memoryview | np.ndarray) -> DecodedBatch:
    """Decode a decompressed batch container (all frames, one call, no exception on any bytes)."""
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        buf = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    out = _decode_batch(np.ascontiguousarray(buf))
    return DecodedBatch(FrameStatus(int(out[0])), *out[1:])


# --- the reference encoder (plain numpy) --------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Frame:
    """One device's samples over a window, as a band holds them before encoding."""

    device_id: int
    boot_id: int
    seq: int
    start_us: int
    accel: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int16))  # (n, 3) int16 counts
    hr_bpm: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # 1 Hz, 0 = no reading
    rr_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    rr_first_beat_ms: int = 0
    sample_rate_mhz: int = 50_000
    accel_range_g: int = 8
    accel_bits: int = 12
    utc_offset_min: int = 0
    flags: int = 0


def _wrap16(a: np.ndarray) -> np.ndarray:
    return ((a + 32768) & 0xFFFF) - 32768


def _encode_axis(values: np.ndarray) -> tuple[bytes, bytes]:
    """Width table and block data of one axis: second-order residuals mod 2**16, 1 or 2 bytes a block."""
    v = values.astype(np.int64)
    d1 = np.diff(v)
    res = _wrap16(np.concatenate([d1[:1], np.diff(d1)])) if d1.size else d1
    nres = res.size
    nblocks = -(-nres // _BLOCK)
    widths = np.empty(nblocks, np.uint8)
    chunks: list[bytes] = []
    for b in range(nblocks):
        block = res[b * _BLOCK : (b + 1) * _BLOCK]
        if block.min() >= -128 and block.max() <= 127:
            widths[b] = 1
            chunks.append(block.astype(np.int8).tobytes())
        else:
            widths[b] = 2
            u = block.astype(np.int16).view(np.uint16)
            chunks.append((u & 0xFF).astype(np.uint8).tobytes() + (u >> 8).astype(np.uint8).tobytes())
    return widths.tobytes(), b"".join(chunks)


def encode_payload(frame: Frame) -> bytes:
    """The three v1 sections (accelerometer, heart rate, RR) of a frame."""
    accel = np.asarray(frame.accel, dtype=np.int16).reshape(-1, 3)
    parts: list[bytes] = []
    if accel.shape[0]:
        axes = [_encode_axis(accel[:, k]) for k in range(3)]
        parts.append(accel[0].astype("<i2").tobytes())
        parts.extend(w for w, _ in axes)
        parts.extend(d for _, d in axes)
    parts.append(np.asarray(frame.hr_bpm, dtype=np.uint8).tobytes())
    rr = np.asarray(frame.rr_ms, dtype="<u2")
    if rr.size:
        parts.append(struct.pack("<I", frame.rr_first_beat_ms))
        parts.append(rr.tobytes())
    return b"".join(parts)


def encode_frame(
    frame: Frame,
    *,
    version: int = config.FORMAT_VERSION,
    min_reader_version: int = config.FORMAT_VERSION,
    extra_header: bytes = b"",
    extra_payload: bytes = b"",
) -> bytes:
    """Encode one frame. `extra_*` and the version bytes exist to write future-version frames in tests."""
    accel = np.asarray(frame.accel).reshape(-1, 3)
    payload = encode_payload(frame) + extra_payload
    header_len = _HDR + len(extra_header)
    header = _HEADER_STRUCT.pack(
        config.FRAME_MAGIC,
        version,
        min_reader_version,
        header_len,
        frame.flags,
        frame.device_id,
        frame.boot_id,
        frame.seq,
        frame.start_us,
        frame.utc_offset_min,
        frame.accel_range_g,
        frame.accel_bits,
        frame.sample_rate_mhz,
        accel.shape[0],
        len(frame.hr_bpm),
        len(frame.rr_ms),
        len(payload),
        0,
    )
    crc = google_crc32c.value(header[:_H_CRC] + extra_header + payload)
    return header[:_H_CRC] + struct.pack("<I", crc) + extra_header + payload


def encode_container(frames: Sequence[bytes] | Iterable[bytes]) -> bytes:
    """The decompressed batch: magic, frame count, index CRC, one u32 length per frame, the frames."""
    frames = list(frames)
    head = struct.pack("<II", config.BATCH_MAGIC, len(frames))
    index = struct.pack(f"<{len(frames)}I", *(len(f) for f in frames))
    crc = google_crc32c.value(head + index)
    return head + struct.pack("<I", crc) + index + b"".join(frames)


def split_frames(
    accel: np.ndarray,
    *,
    frame_samples: int,
    hr_bpm: np.ndarray | None = None,
    rr_ms: np.ndarray | None = None,
    rr_end_us: np.ndarray | None = None,
    device_id: int,
    boot_id: int,
    first_seq: int,
    start_us: int,
    sample_rate_hz: float,
    accel_bits: int = 12,
    accel_range_g: int = 8,
    utc_offset_min: int = 0,
) -> list[Frame]:
    """Cut a continuous recording into frames of `frame_samples` samples (the band's framing).

    Heart rate is 1 Hz from `start_us`; `frame_samples / sample_rate_hz` should be whole seconds so each
    frame's heart-rate samples align. RR intervals go to the frame whose window holds their ending beat.
    """
    rate_mhz = round(sample_rate_hz * 1000)
    n = accel.shape[0]
    frame_s = frame_samples / sample_rate_hz
    frames = []
    hr = np.zeros(0, np.uint8) if hr_bpm is None else np.asarray(hr_bpm, np.uint8)
    rr = np.zeros(0, np.uint16) if rr_ms is None else np.asarray(rr_ms, np.uint16)
    rr_t = np.zeros(0, np.int64) if rr_end_us is None else np.asarray(rr_end_us, np.int64)
    for i, a in enumerate(range(0, n, frame_samples)):
        f_start = start_us + (a * 1_000_000_000) // rate_mhz
        f_end = start_us + (min(a + frame_samples, n) * 1_000_000_000) // rate_mhz
        h0, h1 = round(i * frame_s), round(min((i + 1) * frame_s, n / sample_rate_hz))
        sel = np.flatnonzero((rr_t >= f_start) & (rr_t < f_end))
        frames.append(
            Frame(
                device_id=device_id,
                boot_id=boot_id,
                seq=first_seq + i,
                start_us=f_start,
                accel=accel[a : a + frame_samples],
                hr_bpm=hr[h0:h1],
                rr_ms=rr[sel],
                rr_first_beat_ms=int((rr_t[sel[0]] - f_start) // 1000) if sel.size else 0,
                sample_rate_mhz=rate_mhz,
                accel_range_g=accel_range_g,
                accel_bits=accel_bits,
                utc_offset_min=utc_offset_min,
            )
        )
    return frames
