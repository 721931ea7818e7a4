"""Slow, obviously-correct references for decoder/steps.py: whole arrays, plain loops, no streaming.

Each function is one piece of the kernel written the direct way; `naive_steps` chains them over a whole
recording, which the streaming kernel must reproduce whatever the batch boundaries.
"""

from __future__ import annotations

import math

import numpy as np

from decoder.steps import FS_DEC, RUN, SHIFT_ENERGY_FLOOR, WALK, StepParams


def butter2_sos(params: StepParams) -> np.ndarray:
    """The band-pass as scipy designs it: 2nd-order Butterworth low-pass, then high-pass, at FS_DEC."""
    from scipy.signal import butter

    lp = butter(2, params.lp_hz, "lowpass", fs=FS_DEC, output="sos")
    hp = butter(2, params.hp_hz, "highpass", fs=FS_DEC, output="sos")
    return np.vstack([lp, hp])


def samples_in_first_second(sample_rate_hz: int, start_us: int) -> int:
    """How many samples share the UTC second of the first one."""
    period_us = 1_000_000 // sample_rate_hz
    n = 0
    while (start_us + n * period_us) // 1_000_000 == start_us // 1_000_000:
        n += 1
    return n


def decimated_magnitude(xyz, sample_rate_hz, start_us, g_per_count):
    """Mean vector magnitude (g) of each decimation block, and the sample index each block ends at.

    Blocks are `fs / FS_DEC` samples long and end on UTC second boundaries, at most FS_DEC of them in a
    second, so the first one holds what the others leave of the first second: fewer samples, or one
    more where that second holds fs + 1 (a period that is not a whole number of µs); a block the input
    does not complete is left out.
    """
    d = sample_rate_hz // FS_DEC
    mag = np.sqrt(np.sum(xyz.astype(np.float64) ** 2, axis=1))
    n0 = samples_in_first_second(sample_rate_hz, start_us)
    blocks = min(int(np.ceil(n0 / d)), FS_DEC)
    first = n0 - (blocks - 1) * d
    ends = list(range(first, len(mag) + 1, d))
    starts = [0, *ends[:-1]]
    values = np.array([mag[a:b].mean() * g_per_count for a, b in zip(starts, ends, strict=True)])
    return values, np.array(ends, dtype=np.int64)


def bandpass(values: np.ndarray, sos: np.ndarray) -> np.ndarray:
    """Each section's difference equation, started in its steady state for the first value."""
    x = np.asarray(values, dtype=np.float64)
    for b0, b1, b2, _, a1, a2 in sos:
        dc = (b0 + b1 + b2) / (1.0 + a1 + a2)
        y = np.empty_like(x)
        x1 = x2 = x[0] if len(x) else 0.0
        y1 = y2 = dc * x1
        for n in range(len(x)):
            y[n] = b0 * x[n] + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2
            x2, x1 = x1, x[n]
            y2, y1 = y1, y[n]
        x = y
    return x


def lag_sum(y: np.ndarray, idx: np.ndarray, lag: int) -> float:
    """Σ y[n]·y[n−lag] over the sample indices `idx` (values before the stream are zero)."""
    return float(sum(y[n] * y[n - lag] for n in idx if n - lag >= 0))


def autocorrelation(y: np.ndarray, idx: np.ndarray, nlag: int) -> np.ndarray:
    """r(lag) = Σ y[n]·y[n−lag] / √(Σ y[n]² · Σ y[n−lag]²) over the window's indices `idx`, the shifted
    energy floored at SHIFT_ENERGY_FLOOR of the window's own."""
    r = np.zeros(nlag)
    e0 = sum(y[n] ** 2 for n in idx)
    for lag in range(nlag):
        e_lag = sum(y[n - lag] ** 2 for n in idx if n - lag >= 0)
        if e0 > 0:
            r[lag] = lag_sum(y, idx, lag) / math.sqrt(e0 * max(e_lag, SHIFT_ENERGY_FLOOR * e0))
    return r


def window_cadence(r: np.ndarray, mean_square: float, p: StepParams) -> float:
    """The gait test and cadence (Hz) of a window from its autocorrelation, written out step by step."""
    if math.sqrt(max(mean_square, 0.0)) < p.min_rms_g:
        return 0.0
    lmin = round(p.min_lag_s * FS_DEC)
    peaks = [lag for lag in range(lmin, len(r) - 1) if r[lag] >= r[lag - 1] and r[lag] >= r[lag + 1]]
    if not peaks:
        return 0.0
    top = max(peaks, key=lambda lag: (r[lag], -lag))  # the first of equal maxima
    if r[top] < p.min_periodicity:
        return 0.0
    best = next(lag for lag in peaks if lag == top or r[lag] >= p.peak_tolerance * r[top])
    a, b, c = r[best - 1], r[best], r[best + 1]
    curvature = a - 2 * b + c
    lag_f = best + (0.5 * (a - c) / curvature if curvature < 0 else 0.0)
    half = round(0.5 * lag_f)
    r_half = max(r[h] for h in range(max(half - 1, 1), half + 2))
    stride = r_half >= p.harmonic_ratio * r[best] or FS_DEC / lag_f < p.stride_max_hz
    cadence = FS_DEC / (0.5 * lag_f if stride else lag_f)
    return cadence if p.min_cadence_hz <= cadence <= p.max_cadence_hz else 0.0


def naive_steps(xyz, sample_rate_hz, start_us, params: StepParams, g_per_count=16.0 / 4096, flush=True):
    """Per-second (second, steps, cadence_spm, activity) and per-minute rows of a whole recording.

    With `flush=False`, only the seconds a stream would have finalised so far (those with every covering
    window complete).
    """
    p = params
    fs = sample_rate_hz
    k = p.window_s
    nlag = round(p.max_lag_s * FS_DEC) + 2
    period_us = 1_000_000 // fs
    sample_second = (start_us + np.arange(len(xyz)) * period_us) // 1_000_000
    values, ends = decimated_magnitude(xyz, fs, start_us, g_per_count)
    y = bandpass(values, butter2_sos(p)) if len(values) else values
    y_second = sample_second[ends - 1] if len(ends) else ends
    first = start_us // 1_000_000
    last = int(sample_second[-1]) if len(xyz) else first - 1
    seconds = np.arange(first, last + 1)
    samples = np.array([np.sum(sample_second == s) for s in seconds])
    complete = (start_us + len(xyz) * period_us) // 1_000_000 > last  # the next sample opens a new second
    closed = len(seconds) if (flush or complete) else len(seconds) - 1
    dec_of = [np.flatnonzero(y_second == s) for s in seconds[:closed]]
    cadence = []
    for e in range(closed):
        idx = np.concatenate(dec_of[max(0, e - k + 1) : e + 1])
        if len(idx) < 2:
            cadence.append(0.0)
            continue
        r = autocorrelation(y, idx, nlag)
        cadence.append(window_cadence(r, float(np.sum(y[idx] ** 2)) / len(idx), p))
    rows = []
    n_final = closed if flush else max(0, closed - k + 1)
    for j in range(n_final):
        gait = [(e, cadence[e]) for e in range(j, min(j + k, closed)) if cadence[e] > 0]

        def agreeing(c, ref):
            # The cadence a window adds to a group referenced at `ref`, or None: its own when close, twice
            # its own when it read the stride of `ref`.
            if abs(c - ref) <= p.cadence_agreement * ref:
                return c
            if p.stride_agreement and abs(2 * c - ref) <= p.cadence_agreement * ref:
                return 2 * c
            return None

        # The largest group of windows agreeing with one of them (the first such group on ties).
        groups = [[(e, agreeing(c, ref)) for e, c in gait if agreeing(c, ref) is not None] for _, ref in gait]
        group = max(groups, key=len) if groups else []
        quiet = np.sum(y[dec_of[j]] ** 2) < p.min_second_rms_g**2 * len(dec_of[j])
        c = float(np.mean([c for _, c in group])) if len(group) >= p.min_cover and not quiet else 0.0
        act = 0 if c == 0 else (RUN if c >= p.run_cadence_hz else WALK)
        # A bout edge: the agreeing windows all end before j + k//2 (gait only before j) or all from it on
        # (gait only after j). Windows past the end of the stream count as gait after j.
        ends = [e for e, _ in group]
        before = any(e < j + k // 2 for e in ends)
        after = any(e >= j + k // 2 for e in ends) or min(j + k, closed) <= j + k // 2
        share = 1.0 if before and after else p.edge_credit
        rows.append((int(seconds[j]), c * share * samples[j] / fs, 60 * c, act))
    minutes = {}
    for sec, st, _, act in rows:
        m = minutes.setdefault(sec // 60, [0.0, 0, 0, 0])
        m[0] += st
        m[1] += act == WALK
        m[2] += act == RUN
        m[3] += 1
    return rows, {m: tuple(v) for m, v in minutes.items()}


def naive_bouts(rows, p: StepParams):
    """Runs of active seconds joined over pauses of up to `bout_max_gap_s`, kept from `bout_min_s` on."""
    active = [(sec, st, act) for sec, st, _, act in rows if act]
    bouts, cur = [], []
    for item in active:
        if cur and item[0] - cur[-1][0] - 1 > p.bout_max_gap_s:
            bouts.append(cur)
            cur = []
        cur.append(item)
    if cur:
        bouts.append(cur)
    out = []
    for b in bouts:
        length = b[-1][0] + 1 - b[0][0]
        if length >= p.bout_min_s:
            n_run = sum(1 for _, _, a in b if a == RUN)
            out.append(
                (b[0][0], b[-1][0] + 1, sum(st for _, st, _ in b), RUN if 2 * n_run > length else WALK)
            )
    return out
