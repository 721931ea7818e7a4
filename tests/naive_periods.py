"""Slow, obviously-correct references for decoder/periods.py and the night summary: whole recordings at
once, plain NumPy, no streaming state."""

from __future__ import annotations

import numpy as np

from decoder import periods as P  # noqa: N812 (the constants read as P.NAME)


def hr_levels(hr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """After each epoch: the HR_QUANTILE and median of the decayed 1-bpm histogram, its weight, and its
    FRESH_QUANTILE.
    (The same recurrence as the kernel, decay then add, so float sums agree bit for bit.)"""
    n = hr.size
    hist = np.zeros(P.HR_BINS)
    weight = 0.0
    low, mid, w = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n)
    fresh = np.full(n, np.nan)
    for i in range(n):
        hist *= P._DECAY
        weight *= P._DECAY
        h = hr[i]
        if P.HR_BIN_MIN <= h < P.HR_BIN_MAX:
            hist[int(h - P.HR_BIN_MIN)] += 1.0
            weight += 1.0
        w[i] = weight
        if weight >= P.HR_MIN_HISTORY:
            cum = np.cumsum(hist)
            for q, out in ((P.HR_QUANTILE, low), (0.5, mid), (P.FRESH_QUANTILE, fresh)):
                b = int(np.argmax(cum >= q * weight)) if (cum >= q * weight).any() else P.HR_BINS
                out[i] = P.HR_BIN_MIN + b + 0.5 if b < P.HR_BINS else float(P.HR_BIN_MAX)
    return low, mid, w, fresh


def flags(hr: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch: still (counts median low, heart rate not clearly awake), good (still with a low heart
    rate) and fresh_ok (low enough to open a period for a wearer with no sleep in the last day), from
    centred windows clipped to the recording, judged by the history up to the window's end."""
    n = hr.size
    hr = np.where((hr >= P.HR_BIN_MIN) & (hr < P.HR_BIN_MAX), hr, np.nan)
    counts = np.where(counts > 0, counts, 0.0)
    low, mid, w, fresh = hr_levels(hr)
    still = np.zeros(n, bool)
    good = np.zeros(n, bool)
    fresh_ok = np.ones(n, bool)
    for c in range(n):
        lo, hi = max(0, c - P.HALF_WINDOW), min(n - 1, c + P.HALF_WINDOW)
        seen = min(c + P.HALF_WINDOW, n - 1)  # the history when the window is complete
        window_hr = hr[lo : hi + 1][~np.isnan(hr[lo : hi + 1])]
        quiet = np.median(counts[lo : hi + 1]) <= P.STILL_COUNTS
        if window_hr.size == 0:
            stay = opens = w[seen] == 0  # no heart rate: fine on a band without any, else off the wrist
        elif np.isnan(low[seen]):
            stay, opens = True, False
        else:
            m = np.median(window_hr)
            stay = m <= low[seen] + P.HR_STAY_MARGIN
            opens = m <= low[seen] + P.HR_OPEN_MARGIN and m <= mid[seen] - P.HR_OPEN_DROP
            fresh_ok[c] = m <= fresh[seen] - P.FRESH_DROP
        still[c] = quiet and stay
        good[c] = still[c] and opens
    return still, good, fresh_ok


def periods(time: np.ndarray, hr: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Period start time per epoch (NO_PERIOD outside): blocks of still epochs with gaps shorter than
    CLOSE_GAP; a block opens where MIN_PERIOD epochs of it lie behind and OPEN_SHARE of the last MIN_PERIOD
    are good, and then holds from its start (at most MIN_PERIOD + CLOSE_GAP epochs back: older epochs were
    already given out as wake) to its last still epoch. With no period open in the last SLEEPLESS epochs,
    good also needs fresh_ok."""
    still, good, fresh_ok = flags(np.asarray(hr, float), np.asarray(counts, float))
    n = still.size
    out = np.full(n, P.NO_PERIOD)
    start = last = -1
    opened = -1  # the open period's first epoch
    since = P.SLEEPLESS  # epochs since a period was last open
    for c in range(n):
        if since >= P.SLEEPLESS:
            good[c] = good[c] and fresh_ok[c]
        if still[c]:
            if start < 0:  # (a block whose last CLOSE_GAP epochs were not still was ended below)
                start, opened = c, -1
            elif opened >= 0:
                out[last + 1 : c + 1] = time[opened]
            last = c
            behind = good[max(0, c - P.MIN_PERIOD + 1) : c + 1].sum()
            if opened < 0 and c - start + 1 >= P.MIN_PERIOD and behind >= P.OPEN_SHARE * P.MIN_PERIOD:
                # epochs older than this were given out as wake; at the end of the data (the last
                # HALF_WINDOW epochs, flagged together) nothing more was given out
                opened = max(start, min(c, n - P.HALF_WINDOW) - P.MIN_PERIOD - P.CLOSE_GAP)
                out[opened : c + 1] = time[opened]
        elif start >= 0 and c - last >= P.CLOSE_GAP:
            start = last = opened = -1
        since = 0 if opened >= 0 else since + 1
    return out


def night_summary(stage: np.ndarray) -> dict[str, float]:
    """TST, SOL and WASO (minutes) of a period's stages, counted the plain way."""
    asleep = [k for k, s in enumerate(stage.tolist()) if s != 0]
    tst = len(asleep) / 2
    if not asleep:
        return {"total_sleep_min": 0.0, "sol_min": 0.0, "waso_min": 0.0}
    sol = asleep[0] / 2
    waso = sum(1 for k in range(asleep[0], asleep[-1] + 1) if stage[k] == 0) / 2
    return {"total_sleep_min": tst, "sol_min": sol, "waso_min": waso}
