"""Hostile input: random and mutated batches. Every outcome is an exact round-trip or a specific status.

The normal run tries a few thousand cases; set BANDGATE_FUZZ_CASES (e.g. 200000) for a longer campaign.
Mutations that also recompute the CRC reach the checks behind it (lengths, counts, widths, plausibility).
"""

from __future__ import annotations

import os
import struct

import google_crc32c
import numpy as np

from decoder.batch import BatchDecompressor, BatchError, compress_batch
from decoder.frames import Frame, FrameStatus, decode_frames, encode_container, encode_frame
from tests.decoder.strategies import START_2026
from tests.decoder.test_frames import assert_matches_naive, frame_arrays

CASES = int(os.environ.get("BANDGATE_FUZZ_CASES", "3000"))


def _originals(rng: np.random.Generator) -> list[Frame]:
    out = []
    for seq in range(3):
        n = int(rng.integers(0, 200))
        walk = np.cumsum(rng.normal(0, rng.choice([2, 40, 400]), (n, 3)), axis=0)
        accel = np.clip(walk, -2048, 2047).astype(np.int16)
        hr = rng.integers(40, 120, int(rng.integers(0, 5))).astype(np.uint8)
        rr = rng.integers(300, 2000, int(rng.integers(0, 6))).astype(np.uint16)
        out.append(
            Frame(device_id=9, boot_id=3, seq=seq, start_us=START_2026, accel=accel, hr_bpm=hr, rr_ms=rr)
        )
    return out


def _fix_frame_crcs(buf: bytearray) -> None:
    """Recompute each frame's CRC (and the index CRC) where the structure still allows finding them."""
    if len(buf) < 12:
        return
    count = struct.unpack_from("<I", buf, 4)[0]
    if 12 + 4 * count > len(buf) or count > 64:
        return
    pos = 12 + 4 * count
    for length in struct.unpack_from(f"<{count}I", buf, 12):
        if length >= 56 and pos + length <= len(buf):
            struct.pack_into(
                "<I",
                buf,
                pos + 52,
                google_crc32c.value(bytes(buf[pos : pos + 52] + buf[pos + 56 : pos + length])),
            )
        pos += length
    struct.pack_into("<I", buf, 8, google_crc32c.value(bytes(buf[:8] + buf[12 : 12 + 4 * count])))


FIELD_OFFSETS = [
    (4, "<H"),
    (40, "<I"),
    (44, "<H"),
    (46, "<H"),
    (48, "<I"),
    (36, "<I"),
    (35, "<B"),
    (24, "<q"),
    (32, "<h"),
    (3, "<B"),
]


def _mutate(rng: np.random.Generator, buf: bytes, frame_starts: list[int]) -> tuple[bytes, bool]:
    """One random mutation; returns the bytes and whether CRCs were recomputed afterwards."""
    b = bytearray(buf)
    kind = int(rng.integers(0, 8))
    if kind == 0:  # bit flips
        for _ in range(int(rng.integers(1, 9))):
            bit = int(rng.integers(0, 8 * len(b)))
            b[bit // 8] ^= 1 << (bit % 8)
    elif kind == 1:  # truncation
        del b[int(rng.integers(0, len(b))) :]
    elif kind == 2:  # random bytes overwritten
        at = int(rng.integers(0, len(b)))
        b[at : at + 8] = rng.bytes(min(8, len(b) - at))
    elif kind == 3:  # insert or delete a run
        at = int(rng.integers(0, len(b)))
        if rng.random() < 0.5:
            b[at:at] = rng.bytes(int(rng.integers(1, 20)))
        else:
            del b[at : at + int(rng.integers(1, 20))]
    elif kind in (4, 5):  # a header length/count/plausibility field set to an extreme, CRC fixed or not
        start = frame_starts[int(rng.integers(0, len(frame_starts)))]
        off, fmt = FIELD_OFFSETS[int(rng.integers(0, len(FIELD_OFFSETS)))]
        size = struct.calcsize(fmt)
        signed = fmt[-1].islower()
        lo, hi = (-(2 ** (8 * size - 1)), 2 ** (8 * size - 1) - 1) if signed else (0, 2 ** (8 * size) - 1)
        value = int(rng.choice([lo, hi, 0, 1, int(rng.integers(lo, hi, dtype=np.int64, endpoint=True))]))
        struct.pack_into(fmt, b, start + off, value)
        if kind == 5:
            _fix_frame_crcs(b)
            return bytes(b), True
    elif kind == 6:  # index lengths set to huge or random values
        i = int(rng.integers(0, len(frame_starts)))
        struct.pack_into("<I", b, 12 + 4 * i, int(rng.choice([0, 0xFFFFFFFF, int(rng.integers(0, 1 << 32))])))
        if rng.random() < 0.5:
            _fix_frame_crcs(b)
            return bytes(b), True
    else:  # payload byte changed behind a fixed CRC: widths, anchors, residuals, heart rate
        start = frame_starts[int(rng.integers(0, len(frame_starts)))]
        at = start + 56 + int(rng.integers(0, 40))
        if at < len(b):
            b[at] = int(rng.integers(0, 256))
        _fix_frame_crcs(b)
        return bytes(b), True
    return bytes(b), False


def test_mutated_batches_decode_or_report() -> None:
    rng = np.random.default_rng(20261125)
    seen: set[FrameStatus] = set()
    for case in range(CASES):
        originals = _originals(rng)
        encoded = [encode_frame(f) for f in originals]
        buf = encode_container(encoded)
        starts = list(np.cumsum([12 + 4 * len(encoded)] + [len(e) for e in encoded[:-1]]))
        mutated, crc_fixed = _mutate(rng, buf, starts)
        d = assert_matches_naive(mutated)  # also proves no exception and agreement on every status
        seen.update(FrameStatus(int(s)) for s in d.status)
        seen.add(d.batch_status)
        if crc_fixed:
            continue  # a deliberately re-signed frame decodes to what it now says; the oracle checked that
        for f in np.flatnonzero(d.ok()):
            accel, hr, rr = frame_arrays(d, f)
            match = [o for o in originals if o.accel.shape == accel.shape and np.array_equal(o.accel, accel)]
            assert match, f"case {case}: frame {f} decoded OK but is not an original frame"
            assert np.array_equal(match[0].hr_bpm, hr) and np.array_equal(match[0].rr_ms, rr)
    if CASES >= 2000:  # the campaign must actually reach every defect class
        assert seen == set(FrameStatus), f"statuses never produced: {set(FrameStatus) - seen}"


def test_random_bytes_never_crash() -> None:
    rng = np.random.default_rng(1)
    for _ in range(CASES):
        n = int(rng.integers(0, 400))
        raw = bytearray(rng.bytes(n))
        if n >= 12 and rng.random() < 0.5:
            raw[:4] = b"BGBT"  # get past the container magic often
            struct.pack_into("<I", raw, 4, int(rng.integers(0, 8)))
        assert_matches_naive(bytes(raw))


def test_mutated_compressed_batches() -> None:
    """Damage after compression: refused by zstd with a reason, or caught per frame by the CRC."""
    rng = np.random.default_rng(5)
    decompressor = BatchDecompressor(max_bytes=1 << 20)
    outcomes = {"refused": 0, "frames": 0}
    for _ in range(max(CASES // 3, 300)):
        originals = _originals(rng)
        packed = bytearray(
            compress_batch(
                encode_container(encode_frame(f) for f in originals), checksum=bool(rng.random() < 0.5)
            )
        )
        for _ in range(int(rng.integers(1, 4))):
            bit = int(rng.integers(0, 8 * len(packed)))
            packed[bit // 8] ^= 1 << (bit % 8)
        try:
            buf = decompressor.decompress(bytes(packed))
        except BatchError as e:
            assert e.reason
            outcomes["refused"] += 1
            continue
        outcomes["frames"] += 1
        d = decode_frames(buf)
        for f in np.flatnonzero(d.ok()):
            accel, _, _ = frame_arrays(d, f)
            assert any(np.array_equal(o.accel, accel) for o in originals)
    assert outcomes["refused"] > 0 and outcomes["frames"] > 0
