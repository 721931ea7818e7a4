"""Slow, obviously-correct references that the kernels are checked against.

Written for reading, not speed: one field at a time with `struct`, one sample at a time, the CRC from the
google-crc32c package (an implementation independent of the kernel's). Each follows docs/wire-format.md
section by section, in the order the spec lists the checks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import google_crc32c
import numpy as np

OK, TRUNCATED, BAD_MAGIC, UNKNOWN_VERSION, LENGTH_OVERFLOW, INTEGRITY, IMPLAUSIBLE, MALFORMED = range(8)
HEADER = struct.Struct("<HBBHHQIIqhBBIIHHII")
HEADER_FIELDS = (
    "magic version min_version header_len flags device_id boot_id seq start_us utc_offset_min "
    "accel_range_g accel_bits sample_rate_mhz n_accel n_hr n_rr payload_len crc"
).split()
BLOCK = 64


@dataclass
class NaiveFrame:
    status: int
    header: dict = field(default_factory=dict)
    accel: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int16))
    hr_bpm: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    rr_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    rr_first_beat_ms: int = 0


def _s16(u: int) -> int:
    """Reinterpret the low 16 bits of an integer as signed."""
    u &= 0xFFFF
    return u - 0x10000 if u >= 0x8000 else u


def _accel_section(payload: bytes, n: int) -> tuple[int, np.ndarray | None]:
    """(bytes used, samples) of an accelerometer section; bytes used -1 = overrun, -2 = bad width."""
    if n == 0:
        return 0, np.zeros((0, 3), np.int16)
    nres = n - 1
    nblocks = (nres + BLOCK - 1) // BLOCK
    if 6 + 3 * nblocks > len(payload):
        return -1, None
    anchors = struct.unpack_from("<3h", payload, 0)
    widths = [list(payload[6 + a * nblocks : 6 + (a + 1) * nblocks]) for a in range(3)]
    if any(w not in (1, 2) for ws in widths for w in ws):
        return -2, None
    pos = 6 + 3 * nblocks
    out = np.zeros((n, 3), np.int16)
    for axis in range(3):
        residuals = []
        for b in range(nblocks):
            k = min(BLOCK, nres - b * BLOCK)
            if widths[axis][b] == 1:
                if pos + k > len(payload):
                    return -1, None
                residuals += [_s16(c if c < 128 else c - 256) for c in payload[pos : pos + k]]
                pos += k
            else:
                if pos + 2 * k > len(payload):
                    return -1, None
                lo, hi = payload[pos : pos + k], payload[pos + k : pos + 2 * k]
                residuals += [_s16(lo[j] | (hi[j] << 8)) for j in range(k)]
                pos += 2 * k
        value, velocity = anchors[axis], 0
        out[0, axis] = value
        for i, r in enumerate(residuals, start=1):
            velocity = _s16(velocity + r)
            value = _s16(value + velocity)
            out[i, axis] = value
    return pos, out


def decode_frame(frame: bytes) -> NaiveFrame:
    """One frame's bytes (exactly as long as the container's index says) → status and contents."""
    if len(frame) < HEADER.size:
        return NaiveFrame(TRUNCATED)
    h = dict(zip(HEADER_FIELDS, HEADER.unpack_from(frame, 0), strict=True))
    if h["magic"] != 0x4742:
        return NaiveFrame(BAD_MAGIC)
    if h["min_version"] > 1 or h["version"] == 0:
        return NaiveFrame(UNKNOWN_VERSION)
    if h["header_len"] < HEADER.size or h["header_len"] + h["payload_len"] != len(frame):
        return NaiveFrame(LENGTH_OVERFLOW if h["header_len"] + h["payload_len"] > len(frame) else MALFORMED)
    lower_bound = h["n_hr"] + (6 + 3 * (h["n_accel"] - 1) if h["n_accel"] else 0)
    lower_bound += 4 + 2 * h["n_rr"] if h["n_rr"] else 0
    if lower_bound > h["payload_len"]:
        return NaiveFrame(LENGTH_OVERFLOW, h)
    if google_crc32c.value(frame[:52] + frame[56:]) != h["crc"]:
        return NaiveFrame(INTEGRITY, h)
    plausible = (
        (h["n_accel"] == 0 or 1_000 <= h["sample_rate_mhz"] <= 1_000_000)
        and 8 <= h["accel_bits"] <= 16
        and h["accel_range_g"] in (2, 4, 8, 16)
        and 946_684_800_000_000 <= h["start_us"] <= 4_102_444_800_000_000
        and abs(h["utc_offset_min"]) <= 18 * 60
    )
    if not plausible:
        return NaiveFrame(IMPLAUSIBLE, h)
    payload = frame[h["header_len"] :]
    used, accel = _accel_section(payload, h["n_accel"])
    if used == -2:
        return NaiveFrame(MALFORMED, h)
    if used == -1:
        return NaiveFrame(LENGTH_OVERFLOW, h)
    hr = payload[used : used + h["n_hr"]]
    rr_bytes = 4 + 2 * h["n_rr"] if h["n_rr"] else 0
    total = used + h["n_hr"] + rr_bytes
    if total > len(payload):
        return NaiveFrame(LENGTH_OVERFLOW, h)
    if h["version"] == 1 and total != len(payload):
        return NaiveFrame(MALFORMED, h)
    if any(b != 0 and not 20 <= b <= 250 for b in hr):
        return NaiveFrame(IMPLAUSIBLE, h)
    rr_at = used + h["n_hr"]
    first_beat = struct.unpack_from("<I", payload, rr_at)[0] if h["n_rr"] else 0
    rr = struct.unpack_from(f"<{h['n_rr']}H", payload, rr_at + 4) if h["n_rr"] else ()
    return NaiveFrame(
        OK,
        h,
        accel,
        np.frombuffer(bytes(hr), np.uint8).copy(),
        np.array(rr, dtype=np.uint16),
        first_beat,
    )


def decode_batch(buf: bytes) -> tuple[int, list[NaiveFrame]]:
    """A decompressed container → (container status, frames in index order)."""
    if len(buf) < 12:
        return TRUNCATED, []
    magic, count, index_crc = struct.unpack_from("<III", buf, 0)
    if magic != 0x54424742:
        return BAD_MAGIC, []
    if 12 + 4 * count > len(buf):
        return LENGTH_OVERFLOW, []
    lengths = struct.unpack_from(f"<{count}I", buf, 12)
    if google_crc32c.value(buf[:8] + buf[12 : 12 + 4 * count]) != index_crc:
        return INTEGRITY, []
    frames = []
    pos = 12 + 4 * count
    for length in lengths:
        frames.append(
            decode_frame(buf[pos : pos + length]) if pos + length <= len(buf) else NaiveFrame(TRUNCATED)
        )
        pos += length
    return (MALFORMED if pos < len(buf) else OK), frames
