"""The frame decoder: exact round-trips, agreement with tests/naive.py, and a status for every defect."""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoder import config
from decoder._intrinsics import HARDWARE_CRC, crc32c, crc32c_update_sw
from decoder.frames import DecodedBatch, Frame, FrameStatus, decode_frames, encode_container, encode_frame
from tests import naive
from tests.decoder.strategies import START_2026, frames

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame_arrays(d: DecodedBatch, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, n = d.accel_start[f], d.accel_count[f]
    accel = np.stack([d.x[a : a + n], d.y[a : a + n], d.z[a : a + n]], axis=1)
    return (
        accel,
        d.hr_bpm[d.hr_start[f] : d.hr_start[f] + d.hr_count[f]],
        d.rr_ms[d.rr_start[f] : d.rr_start[f] + d.rr_count[f]],
    )


def assert_matches_naive(buf: bytes) -> DecodedBatch:
    """The kernel and the naive decoder agree on every status and every decoded value."""
    d = decode_frames(buf)
    status, expected = naive.decode_batch(buf)
    assert int(d.batch_status) == status
    assert d.n_frames == len(expected)
    for f, e in enumerate(expected):
        assert int(d.status[f]) == e.status, f"frame {f}"
        if e.status != naive.OK:
            assert d.accel_count[f] == d.hr_count[f] == d.rr_count[f] == 0
            continue
        accel, hr, rr = frame_arrays(d, f)
        np.testing.assert_array_equal(accel, e.accel)
        np.testing.assert_array_equal(hr, e.hr_bpm)
        np.testing.assert_array_equal(rr, e.rr_ms)
        h = e.header
        got = (d.device_id[f], d.boot_id[f], d.seq[f], d.start_us[f], d.utc_offset_min[f], d.flags[f])
        assert tuple(int(v) for v in got) == (
            h["device_id"],
            h["boot_id"],
            h["seq"],
            h["start_us"],
            h["utc_offset_min"],
            h["flags"],
        )
        got = (d.sample_rate_mhz[f], d.accel_range_g[f], d.accel_bits[f], d.rr_first_beat_ms[f])
        assert tuple(int(v) for v in got) == (
            h["sample_rate_mhz"],
            h["accel_range_g"],
            h["accel_bits"],
            e.rr_first_beat_ms,
        )
    # Samples are packed: good frames back to back, nothing else.
    assert d.n_samples == sum(e.accel.shape[0] for e in expected if e.status == naive.OK)
    return d


def assert_round_trip(originals: list[Frame], d: DecodedBatch) -> None:
    for f, frame in enumerate(originals):
        assert d.status[f] == FrameStatus.OK
        accel, hr, rr = frame_arrays(d, f)
        np.testing.assert_array_equal(accel, frame.accel)
        np.testing.assert_array_equal(hr, frame.hr_bpm)
        np.testing.assert_array_equal(rr, frame.rr_ms)
        assert int(d.device_id[f]) == frame.device_id and int(d.seq[f]) == frame.seq
        assert int(d.start_us[f]) == frame.start_us and int(d.boot_id[f]) == frame.boot_id


@SETTINGS
@given(st.lists(frames(), min_size=0, max_size=6))
def test_round_trip_and_oracle(batch: list[Frame]) -> None:
    buf = encode_container(encode_frame(f) for f in batch)
    d = assert_matches_naive(buf)
    assert d.batch_status == FrameStatus.OK
    assert_round_trip(batch, d)


@SETTINGS
@given(st.lists(frames(), min_size=1, max_size=4), st.data())
def test_corrupted_frame_is_isolated(batch: list[Frame], data: st.DataObject) -> None:
    """A bit flip anywhere in one frame gives that frame a status; its neighbours still decode exactly."""
    encoded = [encode_frame(f) for f in batch]
    victim = data.draw(st.integers(0, len(batch) - 1))
    bit = data.draw(st.integers(0, 8 * len(encoded[victim]) - 1))
    damaged = bytearray(encoded[victim])
    damaged[bit // 8] ^= 1 << (bit % 8)
    encoded[victim] = bytes(damaged)
    d = assert_matches_naive(encode_container(encoded))
    assert d.status[victim] != FrameStatus.OK
    assert_round_trip([f for i, f in enumerate(batch) if i != victim], _without(d, victim))


def _without(d: DecodedBatch, victim: int) -> DecodedBatch:
    keep = np.arange(d.n_frames) != victim
    fields = {
        k: getattr(d, k)[keep]
        for k in (
            "status",
            "device_id",
            "boot_id",
            "seq",
            "start_us",
            "accel_start",
            "accel_count",
            "hr_start",
            "hr_count",
            "rr_start",
            "rr_count",
        )
    }
    return _Sub(d, fields)


class _Sub:
    """A view of a decoded batch without some frames (sample arrays shared)."""

    def __init__(self, d: DecodedBatch, fields: dict):
        self.__dict__.update({k: getattr(d, k) for k in ("x", "y", "z", "hr_bpm", "rr_ms")})
        self.__dict__.update(fields)


def _frame(**kw) -> Frame:
    base = dict(
        device_id=42,
        boot_id=1,
        seq=0,
        start_us=START_2026,
        accel=np.arange(300, dtype=np.int16).reshape(100, 3),
        hr_bpm=np.array([60, 61], np.uint8),
    )
    base.update(kw)
    return Frame(**base)


def _refresh_crc(frame: bytes) -> bytes:
    """Recompute a frame's CRC after a deliberate edit, so the edit itself is what the decoder sees."""
    crc = google_crc32c.value(frame[:52] + frame[56:])
    return frame[:52] + struct.pack("<I", crc) + frame[56:]


def _patch(frame: bytes, offset: int, fmt: str, value: int, *, fix_crc: bool = True) -> bytes:
    b = bytearray(frame)
    struct.pack_into(fmt, b, offset, value)
    return _refresh_crc(bytes(b)) if fix_crc else bytes(b)


GOOD = encode_frame(_frame())


@pytest.mark.parametrize(
    ("frame", "status"),
    [
        (GOOD, FrameStatus.OK),
        (_patch(GOOD, 0, "<H", 0x1234), FrameStatus.BAD_MAGIC),
        (_patch(GOOD, 3, "<B", 2), FrameStatus.UNKNOWN_VERSION),
        (_patch(GOOD, 2, "<B", 0), FrameStatus.UNKNOWN_VERSION),
        (_patch(GOOD, 48, "<I", 0xFFFFFFF0), FrameStatus.LENGTH_OVERFLOW),
        (_patch(GOOD, 4, "<H", 20), FrameStatus.MALFORMED),
        (_patch(GOOD, 40, "<I", 0xFFFFFFFF), FrameStatus.LENGTH_OVERFLOW),
        (_patch(GOOD, 44, "<H", 0xFFFF), FrameStatus.LENGTH_OVERFLOW),
        (_patch(GOOD, 46, "<H", 0xFFFF), FrameStatus.LENGTH_OVERFLOW),
        (_patch(GOOD, 60, "<B", 0x55, fix_crc=False), FrameStatus.INTEGRITY_MISMATCH),
        (_patch(GOOD, 36, "<I", 0), FrameStatus.IMPLAUSIBLE_VALUE),
        (_patch(GOOD, 35, "<B", 17), FrameStatus.IMPLAUSIBLE_VALUE),
        (_patch(GOOD, 34, "<B", 3), FrameStatus.IMPLAUSIBLE_VALUE),
        (_patch(GOOD, 24, "<q", 0), FrameStatus.IMPLAUSIBLE_VALUE),
        (_patch(GOOD, 32, "<h", 2000), FrameStatus.IMPLAUSIBLE_VALUE),
        (encode_frame(_frame(hr_bpm=np.array([60, 5], np.uint8))), FrameStatus.IMPLAUSIBLE_VALUE),
        (_patch(GOOD, 56 + 6, "<B", 3), FrameStatus.MALFORMED),  # width code 3
        (_patch(GOOD, 56 + 6, "<B", 2), FrameStatus.LENGTH_OVERFLOW),  # wide block needs bytes not there
        (encode_frame(_frame(), extra_payload=b"\0"), FrameStatus.MALFORMED),  # v1 leaves nothing over
        (
            encode_frame(_frame(accel=np.zeros((0, 3), np.int16), hr_bpm=np.zeros(0, np.uint8))),
            FrameStatus.OK,
        ),
    ],
)
def test_each_defect_has_its_status(frame: bytes, status: FrameStatus) -> None:
    neighbour = encode_frame(_frame(seq=1))
    d = assert_matches_naive(encode_container([neighbour, frame, neighbour]))
    assert FrameStatus(int(d.status[1])) == status
    assert d.status[0] == d.status[2] == FrameStatus.OK
    assert status.reason and "0x" not in status.reason


def test_truncation_keeps_earlier_frames() -> None:
    frames_ = [_frame(seq=i) for i in range(4)]
    buf = encode_container(encode_frame(f) for f in frames_)
    for cut in range(0, len(buf), 7):
        d = assert_matches_naive(buf[:cut])
        if d.batch_status == FrameStatus.OK or d.n_frames:
            ok = d.ok()
            # A frame is OK only if all its bytes are present; every OK frame is the original.
            assert_round_trip(
                [frames_[i] for i in np.flatnonzero(ok)],
                _Sub(
                    d,
                    {
                        k: getattr(d, k)[ok]
                        for k in (
                            "status",
                            "device_id",
                            "boot_id",
                            "seq",
                            "start_us",
                            "accel_start",
                            "accel_count",
                            "hr_start",
                            "hr_count",
                            "rr_start",
                            "rr_count",
                        )
                    },
                ),
            )
            assert (d.status[~ok] == FrameStatus.TRUNCATED).all()


@pytest.mark.parametrize(
    ("buf", "status"),
    [
        (b"", FrameStatus.TRUNCATED),
        (b"BGBT\x01\x00\x00", FrameStatus.TRUNCATED),
        (b"XXXX" + bytes(8), FrameStatus.BAD_MAGIC),
        (b"BGBT" + struct.pack("<II", 0xFFFFFFFF, 0), FrameStatus.LENGTH_OVERFLOW),
        (
            encode_container([GOOD])[:8] + b"\0\0\0\0" + encode_container([GOOD])[12:],
            FrameStatus.INTEGRITY_MISMATCH,
        ),
        (encode_container([GOOD]) + b"\0", FrameStatus.MALFORMED),
    ],
)
def test_container_defects(buf: bytes, status: FrameStatus) -> None:
    d = assert_matches_naive(buf)
    assert d.batch_status == status


def test_future_version_with_extra_channel_decodes_in_v1() -> None:
    """A v2 frame that only adds (header fields, a channel after v1's) is read by a v1 decoder."""
    frame = _frame()
    v2 = encode_frame(
        frame, version=2, min_reader_version=1, extra_header=b"\x07" * 8, extra_payload=b"new channel"
    )
    needs_v2 = encode_frame(frame, version=2, min_reader_version=2)
    d = assert_matches_naive(encode_container([v2, needs_v2, GOOD]))
    assert [FrameStatus(int(s)) for s in d.status] == [
        FrameStatus.OK,
        FrameStatus.UNKNOWN_VERSION,
        FrameStatus.OK,
    ]
    assert int(d.version[0]) == 2
    assert_round_trip([frame], d)


def test_sixteen_bit_full_range_round_trips() -> None:
    rng = np.random.default_rng(7)
    extremes = np.array([[-32768, 32767, 0], [32767, -32768, -1]] * 100, np.int16)
    noise = rng.integers(-32768, 32768, (1000, 3)).astype(np.int16)
    batch = [_frame(accel=extremes, accel_bits=16), _frame(seq=1, accel=noise, accel_bits=16)]
    d = assert_matches_naive(encode_container(encode_frame(f) for f in batch))
    assert_round_trip(batch, d)


def test_sample_times() -> None:
    d = decode_frames(encode_container([encode_frame(_frame(sample_rate_mhz=25_000))]))
    t = d.accel_time_us(0)
    assert t[0] == START_2026 and t[1] - t[0] == 40_000 and t.size == 100


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_kernel_crc_matches_reference(data: bytes) -> None:
    expected = google_crc32c.value(data)
    assert crc32c(data) == expected
    buf = np.frombuffer(data, np.uint8)
    assert int(crc32c_update_sw(buf, 0, buf.size, 0xFFFFFFFF) ^ 0xFFFFFFFF) == expected


def test_hardware_crc_is_used_where_available() -> None:
    import llvmlite.binding as llvm

    assert bool(llvm.get_host_cpu_features().get("sse4.2", False)) == HARDWARE_CRC


def test_decoder_accepts_any_buffer_type() -> None:
    buf = encode_container([GOOD])
    for form in (buf, bytearray(buf), memoryview(buf), np.frombuffer(buf, np.uint8)):
        assert decode_frames(form).status.tolist() == [0]
    assert config.FRAME_HEADER_LEN == 56
