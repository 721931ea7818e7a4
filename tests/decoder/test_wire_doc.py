"""docs/wire-format.md's worked example, encoded byte for byte by the reference encoder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from decoder.frames import Frame, decode_frames, encode_container, encode_frame

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"


def _example_bytes() -> bytes:
    text = DOC.read_text()
    section = text[text.index("## 9. Worked example") :]
    block = re.search(r"```hex\n(.*?)```", section, re.S)
    assert block, "the worked example's hex block is missing"
    return bytes.fromhex(block.group(1).replace("\n", " "))


EXAMPLE = Frame(
    device_id=0x0123456789ABCDEF,
    boot_id=7,
    seq=42,
    start_us=1_767_225_600_000_000,
    utc_offset_min=60,
    accel_range_g=8,
    accel_bits=12,
    sample_rate_mhz=50_000,
    accel=np.array([[0, 0, 256], [3, -2, 250], [8, -3, 100]], np.int16),
    hr_bpm=np.array([62, 63], np.uint8),
    rr_ms=np.array([960, 950], np.uint16),
    rr_first_beat_ms=410,
)


def test_encoder_writes_the_documented_bytes() -> None:
    assert encode_container([encode_frame(EXAMPLE)]) == _example_bytes()


def test_decoder_reads_the_documented_bytes() -> None:
    d = decode_frames(_example_bytes())
    assert d.status.tolist() == [0]
    np.testing.assert_array_equal(np.stack([d.x, d.y, d.z], axis=1), EXAMPLE.accel)
    assert d.hr_bpm.tolist() == [62, 63] and d.rr_ms.tolist() == [960, 950]
    assert int(d.rr_first_beat_ms[0]) == 410 and int(d.utc_offset_min[0]) == 60
