"""Hypothesis strategies for frames and containers, shared by the decoder tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from decoder.frames import Frame

START_2026 = 1_767_225_600_000_000


@st.composite
def accel_arrays(draw, max_samples: int = 400) -> np.ndarray:
    """Counts that exercise both block widths: smooth walks, noise, full-range jumps, constants."""
    n = draw(st.integers(0, max_samples))
    bits = draw(st.sampled_from([12, 16]))
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["walk", "noise", "uniform", "constant", "sine"]))
    if kind == "walk":
        a = np.cumsum(rng.normal(0, draw(st.sampled_from([1, 20, 300])), (n, 3)), axis=0)
    elif kind == "noise":
        a = rng.normal(0, draw(st.sampled_from([2, 60, 2000])), (n, 3))
    elif kind == "uniform":
        a = rng.integers(lo, hi + 1, (n, 3))
    elif kind == "constant":
        a = np.full((n, 3), draw(st.integers(lo, hi)))
    else:
        t = np.arange(n)[:, None] / 50.0
        a = hi * 0.9 * np.sin(2 * np.pi * np.array([1.7, 0.9, 3.1]) * t)
    return np.clip(np.round(a), lo, hi).astype(np.int16)


@st.composite
def frames(draw, device_id: int | None = None, seq: int | None = None) -> Frame:
    accel = draw(accel_arrays())
    n_hr = draw(st.integers(0, 30))
    hr = np.array(
        draw(st.lists(st.one_of(st.just(0), st.integers(20, 250)), min_size=n_hr, max_size=n_hr)), np.uint8
    )
    n_rr = draw(st.integers(0, 40))
    rr = np.array(draw(st.lists(st.integers(0, 65535), min_size=n_rr, max_size=n_rr)), np.uint16)
    return Frame(
        device_id=device_id if device_id is not None else draw(st.integers(0, 2**64 - 1)),
        boot_id=draw(st.integers(0, 2**32 - 1)),
        seq=seq if seq is not None else draw(st.integers(0, 2**32 - 1)),
        start_us=START_2026 + draw(st.integers(-(8 * 10**14), 2 * 10**15)),
        accel=accel,
        hr_bpm=hr,
        rr_ms=rr,
        rr_first_beat_ms=draw(st.integers(0, 2**32 - 1)) if n_rr else 0,
        sample_rate_mhz=draw(st.sampled_from([25_000, 50_000, 12_500, 100_000, 1_000_000])),
        accel_range_g=draw(st.sampled_from([2, 4, 8, 16])),
        accel_bits=draw(st.sampled_from([12, 16])),
        utc_offset_min=draw(st.integers(-1080, 1080)),
        flags=draw(st.integers(0, 3)),
    )
