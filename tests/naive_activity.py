"""Slow, obviously-correct references for decoder/activity.py: whole arrays, plain loops, no streaming.

Each function is one step written the direct way (scipy's lfilter for the band-pass, a Python loop for
the resampler's low-pass, numpy group-bys for the epochs); `naive_activity` chains them over a whole
recording, which the streaming kernel must reproduce whatever the batch boundaries.
"""

from __future__ import annotations

import math

import numpy as np

from decoder.activity import (
    ANGLE_CHANGE_DEG,
    BLOCK_S,
    COUNTS_MAX,
    COUNTS_MIN,
    EPOCH_DTYPE,
    NONWEAR_AXES,
    NONWEAR_DTYPE,
    NONWEAR_MIN_COVER,
    NONWEAR_RANGE_G,
    NONWEAR_SD_G,
    WINDOW_BLOCKS,
    resample_factors,
)


def sample_times(n: int, sample_rate_hz: int, start_us: int) -> np.ndarray:
    return start_us + (np.arange(n, dtype=np.int64) * 1_000_000) // sample_rate_hz


def resample_to_30hz(raw_g: np.ndarray, sample_rate_hz: int) -> tuple[np.ndarray, np.ndarray]:
    """ActiGraph's resampler as agcounts writes it (one axis): zero insertion by L, the first-order
    low-pass (skipped when L = 1), every M-th value, rounded to 3 decimals. Also returns, for each
    30-Hz value, the input sample it is made at."""
    up, down = resample_factors(sample_rate_hz)
    u = np.zeros(raw_g.size * up)
    u[::up] = raw_g
    if up > 1:
        a = math.pi / (math.pi + 2 * up)
        b = (math.pi - 2 * up) / (math.pi + 2 * up)
        c = (a * up) * (u + np.roll(u, 1))
        y = np.zeros(u.size)
        prev = 0.0
        for j in range(u.size):
            prev = c[j] + (-b) * prev
            y[j] = prev
        u = y
    idx = np.arange(0, u.size, down)
    return np.round(u[idx], 3), idx // up


def counts_per_value(v30: np.ndarray) -> np.ndarray:
    """Band-pass (scipy, charged to steady state on the first value), scale, dead band, clip, floor."""
    from scipy.signal import lfilter, lfilter_zi

    from decoder.activity import BPF_A, BPF_B, COUNTS_SCALE

    if v30.size == 0:
        return np.zeros(0, np.int64)
    y, _ = lfilter(BPF_B, BPF_A, v30, zi=lfilter_zi(BPF_B, BPF_A) * v30[0])
    s = np.abs(COUNTS_SCALE * y)
    t = np.floor(np.minimum(s, COUNTS_MAX))
    t[s < COUNTS_MIN] = 0
    return t.astype(np.int64)


def axis_counts(raw_g: np.ndarray, sample_rate_hz: int) -> tuple[np.ndarray, np.ndarray]:
    """10-Hz count values (floor of the mean of 3) and the input sample that completes each."""
    v30, src = resample_to_30hz(raw_g, sample_rate_hz)
    t = counts_per_value(v30)
    m = t.size // 3
    tens = np.array([(t[3 * i] + t[3 * i + 1] + t[3 * i + 2]) // 3 for i in range(m)], dtype=np.int64)
    return tens, src[3 * np.arange(m) + 2]


def z_angles(xyz: np.ndarray, seconds: np.ndarray) -> dict[int, float]:
    """Arm angle of each second's mean vector, degrees."""
    out = {}
    for s in np.unique(seconds):
        m = xyz[seconds == s].astype(np.float64).mean(axis=0)
        out[int(s)] = math.degrees(math.atan2(m[2], math.hypot(m[0], m[1])))
    return out


def nonwear_blocks(xyz: np.ndarray, times: np.ndarray, sample_rate_hz: int, g: float) -> np.ndarray:
    """Van Hees 2013 on 60-min windows of four 15-min UTC blocks; a block is non-wear if any judged
    window holding it is."""
    blocks = times // (BLOCK_S * 1_000_000)
    uniq = np.unique(blocks)
    flag = {int(b): 0 for b in uniq}
    for b in uniq:
        sel = (blocks > b - WINDOW_BLOCKS) & (blocks <= b)
        n = int(sel.sum())
        if n < 2 or n < NONWEAR_MIN_COVER * WINDOW_BLOCKS * BLOCK_S * sample_rate_hz:
            continue
        w = xyz[sel].astype(np.float64)
        still = 0
        for axis in range(3):
            sd = w[:, axis].std(ddof=1) * g
            rng = (w[:, axis].max() - w[:, axis].min()) * g
            still += sd < NONWEAR_SD_G and rng < NONWEAR_RANGE_G
        if still >= NONWEAR_AXES:
            for k in range(WINDOW_BLOCKS):
                if int(b) - k in flag:
                    flag[int(b) - k] = 1
    rows = np.empty(uniq.size, NONWEAR_DTYPE)
    rows["block_start_us"] = uniq * BLOCK_S * 1_000_000
    rows["n_samples"] = [int((blocks == b).sum()) for b in uniq]
    rows["nonwear"] = [flag[int(b)] for b in uniq]
    return rows


def naive_activity(
    xyz: np.ndarray, sample_rate_hz: int, start_us: int, g: float = 16 / 4096, *, with_counts: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Epoch rows (EPOCH_DTYPE) and non-wear rows (NONWEAR_DTYPE) of a whole recording."""
    xyz = np.asarray(xyz, dtype=np.int64)
    n = xyz.shape[0]
    times = sample_times(n, sample_rate_hz, start_us)
    epochs = times // 30_000_000
    seconds = times // 1_000_000
    mag = np.sqrt((xyz.astype(np.float64) ** 2).sum(axis=1)) * g
    tens_epoch = None
    if with_counts and n:
        per_axis = []
        for axis in range(3):
            tens, done_at = axis_counts(xyz[:, axis] * g, sample_rate_hz)
            per_axis.append(tens)
        tens_epoch = epochs[done_at] if len(done_at) else np.zeros(0, np.int64)
        tens_second = seconds[done_at] if len(done_at) else np.zeros(0, np.int64)
    angle = z_angles(xyz, seconds)
    five_angle = {}
    for f in sorted({s // 5 for s in angle}):
        vals = [angle[s] for s in angle if s // 5 == f]
        five_angle[f] = sum(vals) / len(vals)
    rows = np.zeros(np.unique(epochs).size, EPOCH_DTYPE)
    for i, e in enumerate(np.unique(epochs)):
        sel = epochs == e
        m = mag[sel]
        rows[i]["epoch_start_us"] = e * 30_000_000
        rows[i]["n_samples"] = sel.sum()
        rows[i]["enmo_mg"] = 1000 * np.maximum(m - 1.0, 0.0).mean()
        rows[i]["mad_mg"] = 1000 * np.abs(m - m.mean()).mean()
        if tens_epoch is not None:
            te = tens_epoch == e
            c = [int(per_axis[k][te].sum()) for k in range(3)]
            rows[i]["counts_x"], rows[i]["counts_y"], rows[i]["counts_z"] = c
            rows[i]["counts_vm"] = math.sqrt(sum(v * v for v in c))
            rows[i]["counts_n10"] = te.sum()
            vm_1s = 0.0
            for sec in np.unique(tens_second[te]):
                ts = tens_second == sec
                vm_1s += math.sqrt(sum(int(per_axis[k][ts].sum()) ** 2 for k in range(3)))
            rows[i]["counts_vm_1s_sum"] = vm_1s
        secs = [s for s in angle if s // 30 == e]
        rows[i]["z_angle_deg"] = np.mean([angle[s] for s in secs])
        rows[i]["angle_changes"] = sum(
            1
            for f in five_angle
            if f // 6 == e
            and f - 1 in five_angle
            and abs(five_angle[f] - five_angle[f - 1]) > ANGLE_CHANGE_DEG
        )
    return rows, nonwear_blocks(xyz, times, sample_rate_hz, g)
