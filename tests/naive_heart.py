"""Slow, obviously-correct references for decoder/heart.py: whole recordings, plain loops, no streaming."""

from __future__ import annotations

import math

import numpy as np

from decoder.heart import (
    DAY_US,
    EPOCH_DTYPE,
    EPOCH_US,
    RESTING_DTYPE,
    RESTING_MIN_EPOCHS,
    RESTING_MIN_READINGS,
    RESTING_PERCENTILE,
    RR_GAP_TOL_US,
    RR_MAX_CHANGE,
    RR_MAX_MS,
    RR_MEDIAN_BEATS,
    RR_MEDIAN_MIN,
    RR_MIN_MS,
)


def kept_beats(rr_ms: np.ndarray) -> np.ndarray:
    """Artefact rejection: plausible range, then within 20 % of the median of the (up to) 5 preceding
    plausible intervals once there are 3 of them."""
    history: list[int] = []
    kept = np.zeros(len(rr_ms), bool)
    for i, rr in enumerate(int(v) for v in rr_ms):
        if not (RR_MIN_MS <= rr <= RR_MAX_MS):
            continue
        ok = True
        if len(history) >= RR_MEDIAN_MIN:
            med = float(np.median(history[-RR_MEDIAN_BEATS:]))
            ok = abs(rr - med) <= RR_MAX_CHANGE * med
        kept[i] = ok
        history.append(rr)
    return kept


def naive_heart(
    hr_bpm: np.ndarray,
    hr_t0_us: int,
    rr_ms: np.ndarray,
    rr_end_us: np.ndarray,
    utc_offset_min: int = 0,
    inactive_epoch_us: np.ndarray | None = None,
    require_inactive: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    hr = np.asarray(hr_bpm, np.int64)
    rr = np.asarray(rr_ms, np.int64)
    rr_end = np.asarray(rr_end_us, np.int64)
    hr_t = hr_t0_us + np.arange(hr.size, dtype=np.int64) * 1_000_000
    hr_e = hr_t // EPOCH_US
    rr_e = rr_end // EPOCH_US
    kept = kept_beats(rr)
    epochs = sorted(set(hr_e.tolist()) | set(rr_e.tolist()))
    rows = np.zeros(len(epochs), EPOCH_DTYPE)
    for i, e in enumerate(epochs):
        h = hr[(hr_e == e) & (hr > 0)]
        sel = np.flatnonzero(rr_e == e)
        nn = rr[sel[kept[sel]]]
        diffs = [
            rr[j] - rr[j - 1]
            for j in sel
            if j > 0
            and kept[j]
            and kept[j - 1]
            and rr_e[j - 1] == e
            and abs(rr_end[j] - rr_end[j - 1] - 1000 * rr[j]) <= RR_GAP_TOL_US
        ]
        rows[i] = (
            e * EPOCH_US,
            h.mean() if h.size else np.nan,
            h.min() if h.size else 0,
            h.max() if h.size else 0,
            h.size,
            nn.size,
            sel.size - nn.size,
            nn.mean() if nn.size else np.nan,
            nn.std(ddof=1) if nn.size > 1 else np.nan,
            math.sqrt(np.mean(np.square(diffs))) if diffs else np.nan,
        )
    # Resting heart rate per local day.
    offset_us = utc_offset_min * 60_000_000
    marks = set(np.asarray(inactive_epoch_us if inactive_epoch_us is not None else [], np.int64).tolist())
    by_day: dict[int, list[float]] = {}
    for e in epochs:
        day = (e * EPOCH_US + offset_us) // DAY_US
        h = hr[(hr_e == e) & (hr > 0)]
        if h.size == 0:
            continue
        means = by_day.setdefault(day, [])
        if h.size >= RESTING_MIN_READINGS and (not require_inactive or e * EPOCH_US in marks):
            means.append(h.sum() / h.size)
    resting = np.zeros(len(by_day), RESTING_DTYPE)
    for i, day in enumerate(sorted(by_day)):
        m = sorted(by_day[day])
        value = (
            m[math.ceil(RESTING_PERCENTILE * len(m) / 100) - 1] if len(m) >= RESTING_MIN_EPOCHS else np.nan
        )
        resting[i] = (day * DAY_US - offset_us, value, len(m))
    return rows, resting
