"""Sleep period detection from per-epoch counts and heart rate: which 30-s epochs lie in a sleep period.

The method follows van Hees et al. 2018 (Sci Rep 8:12975, "Estimating sleep parameters using an
accelerometer without sleep diary", the HDCZA algorithm), adapted to what a band publishes per epoch
and to streaming:

    HDCZA (z-angle, 5-s epochs, a whole day)           here (counts + heart rate, 30-s epochs, streaming)
    5-min rolling median of the angle change      →    5.5-min rolling median of the epoch's counts
    threshold: 10th percentile of the day × 15    →    counts: the agcounts scale Cole–Kripke and Sadeh
                                                       also threshold on; heart rate: the wearer's own
                                                       10th percentile (a decaying histogram of about
                                                       the last day) plus a margin
    blocks ≥ 30 min, gaps < 60 min merged          →   blocks ≥ MIN_PERIOD (20 min: naps), gaps shorter
                                                       than CLOSE_GAP merged; a block opens a period
                                                       only when most of its last MIN_PERIOD epochs
                                                       also have a low heart rate
    longest block of the day = the SPT window     →    every block is a period (main sleep and naps),
                                                       any time of day

Movement alone cannot tell desk work or an evening on the couch from light sleep (the wrist moves about
as often); a heart rate near the wearer's sleeping level can. An epoch is "still" when the counts
median is low and the heart-rate median is not clearly above the wearer's low level (HR_STAY_MARGIN);
a period opens when MIN_PERIOD epochs of a block are still and most are also near it
(HR_OPEN_MARGIN, and HR_OPEN_DROP below the wearer's median); it is closed when CLOSE_GAP epochs in a
row are not still (the wearer is up). A band that has not yet seen its wearer sleep is judged more
strictly: no period opens before HR_MIN_HISTORY epochs of heart rate, and while no period was open in
the last SLEEPLESS epochs the heart rate must also be FRESH_DROP below the history's FRESH_QUANTILE
(the low decile of a history without sleep is sitting still awake).

An epoch's period is final DECISION_LAG epochs after it (the rolling window's half, the gap that closes
a period, the length that opens one): `detect` returns epochs in order as they become final, each with
its period (the start of the period in the epochs' own time unit, µs on the raw path) or -1 outside
every period. Everything is kept in one flat float64 array, updated epoch by epoch, so any split of the
input gives the same result. An epoch without heart rate (NaN) on a band that has given some is never
still (off the wrist); a band that has never given heart rate is judged on counts alone.

The constants live here, as decoder/sleep.py's do, until decoder/config.py takes the families' own.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from decoder import config

# --- constants (decoder/config.py holds the shared ones; these are this detector's) ---------------------
HALF_WINDOW = 5  # rolling medians over 2·5+1 epochs (5.5 min), centred
STILL_COUNTS = 20.0  # counts per epoch (as sleep.MOVE_COUNTS): a median above this is movement
MIN_PERIOD = 40  # epochs (20 min): the shortest nap a period stands for
CLOSE_GAP = 40  # epochs (20 min) not still in a row close a period: the wearer is up
OPEN_SHARE = 0.75  # share of the last MIN_PERIOD epochs that must be still with a low heart rate
HR_QUANTILE = 0.10  # the wearer's low heart-rate level: this quantile of about the last day
HR_OPEN_MARGIN = 6.0  # bpm above that level that still opens a period
HR_STAY_MARGIN = 10.0  # bpm above it that keeps an epoch still (hysteresis: REM and arousals)
HR_OPEN_DROP = 6.0  # bpm below the wearer's median of about the last day that opens a period
HR_HALF_LIFE = 2880  # epochs (1 day): half-life of the heart-rate histogram
FRESH_QUANTILE = 0.25  # with no period open in SLEEPLESS epochs, a period opens only this far below
FRESH_DROP = 2.0  # (bpm) this quantile of the history: its low end is sitting still awake
SLEEPLESS = 2880  # epochs (1 day): with no period in this long, the history holds no sleep to judge by
HR_MIN_HISTORY = 120.0  # epochs of heart rate (1 h) before a period opens on it
HR_BIN_MIN, HR_BIN_MAX = 20, 250  # 1-bpm bins
HR_BINS = HR_BIN_MAX - HR_BIN_MIN
MAIN_PERIOD_S = 3 * 3600  # a period this long or longer is a main sleep period; shorter, a nap
DECISION_LAG = HALF_WINDOW + MIN_PERIOD + CLOSE_GAP  # an epoch's period is final this many epochs later
RING = 128  # ≥ DECISION_LAG + 1, a power of two
NO_PERIOD = -1.0

# --- state layout ---------------------------------------------------------------------------------------
STATE_VERSION = 1
_H_VERSION, _H_N_IN, _H_N_FLAG, _H_N_DEC, _H_BLK_START, _H_BLK_LAST, _H_BLK_OPEN, _H_HR_W, _H_SINCE = range(9)
_HEADER = 9
_OFF_TIME = _HEADER
_OFF_HR = _OFF_TIME + RING
_OFF_COUNTS = _OFF_HR + RING
_OFF_GOOD = _OFF_COUNTS + RING  # still with a low heart rate (1) or not (0), per flagged epoch
_OFF_DEC = _OFF_GOOD + RING  # period start, NO_PERIOD, or NaN while undecided
_OFF_HIST = _OFF_DEC + RING
STATE_LEN = _OFF_HIST + HR_BINS
_DECAY = 0.5 ** (1.0 / HR_HALF_LIFE)
_MASK = RING - 1


@njit(**config.JIT)
def _median(buf, n):
    """Median of the first `n` values of `buf` (sorted in place)."""
    v = np.sort(buf[:n])
    if n % 2:
        return v[n // 2]
    return 0.5 * (v[n // 2 - 1] + v[n // 2])


@njit(**config.JIT)
def _hr_level(state, q):
    """The `q` quantile of the wearer's decayed heart-rate histogram; NaN with too little history."""
    total = state[_H_HR_W]
    if total < HR_MIN_HISTORY:
        return np.nan
    target = q * total
    acc = 0.0
    for b in range(HR_BINS):
        acc += state[_OFF_HIST + b]
        if acc >= target:
            return HR_BIN_MIN + b + 0.5
    return float(HR_BIN_MAX)


@njit(**config.JIT)
def _decide(state, lo, hi, value):
    for j in range(lo, hi + 1):
        state[_OFF_DEC + (j & _MASK)] = value


@njit(**config.JIT)
def _flag(state, c, n_avail, buf):
    """Still / low-heart-rate flags of epoch `c` (windows clipped to epochs 0..n_avail-1); runs the block
    rule on them."""
    lo = max(0, c - HALF_WINDOW)
    hi = min(n_avail - 1, c + HALF_WINDOW)
    n = 0
    for j in range(lo, hi + 1):
        buf[n] = state[_OFF_COUNTS + (j & _MASK)]
        n += 1
    counts_med = _median(buf, n)
    n = 0
    for j in range(lo, hi + 1):
        h = state[_OFF_HR + (j & _MASK)]
        if h == h:
            buf[n] = h
            n += 1
    level = _hr_level(state, HR_QUANTILE)
    hr_stay = True
    hr_low = True
    if n == 0 and state[_H_HR_W] > 0:  # a band with heart rate gives none: off the wrist, or unreadable
        hr_stay = False
        hr_low = False
    elif n > 0 and level != level:  # heart rate, but too little history to judge it by: open nothing yet
        hr_low = False
    elif n > 0:
        hr_med = _median(buf, n)
        hr_stay = hr_med <= level + HR_STAY_MARGIN
        hr_low = hr_med <= level + HR_OPEN_MARGIN and hr_med <= _hr_level(state, 0.5) - HR_OPEN_DROP
        if state[_H_SINCE] >= SLEEPLESS:  # no sleep in the history to judge by
            hr_low = hr_low and hr_med <= _hr_level(state, FRESH_QUANTILE) - FRESH_DROP
    still = counts_med <= STILL_COUNTS and hr_stay
    state[_OFF_GOOD + (c & _MASK)] = 1.0 if still and hr_low else 0.0
    state[_OFF_DEC + (c & _MASK)] = np.nan

    start = int(state[_H_BLK_START])
    last = int(state[_H_BLK_LAST])
    is_open = state[_H_BLK_OPEN] > 0
    if still:
        if start < 0:
            start = c
            state[_H_BLK_START] = c
            state[_H_BLK_OPEN] = 0.0
            is_open = False
        elif is_open:
            _decide(state, last + 1, c, state[_OFF_DEC + (last & _MASK)])  # a short gap: still the period
        state[_H_BLK_LAST] = c
        if not is_open and c - start + 1 >= MIN_PERIOD:
            good = 0.0
            for j in range(c - MIN_PERIOD + 1, c + 1):
                good += state[_OFF_GOOD + (j & _MASK)]
            if good >= OPEN_SHARE * MIN_PERIOD:
                state[_H_BLK_OPEN] = 1.0
                _decide(state, start, c, state[_OFF_TIME + (start & _MASK)])
    elif start < 0:
        state[_OFF_DEC + (c & _MASK)] = NO_PERIOD
    elif c - last >= CLOSE_GAP:  # up: the block ends at its last still epoch
        _decide(state, start if not is_open else last + 1, c, NO_PERIOD)
        state[_H_BLK_START] = -1.0
        state[_H_BLK_LAST] = -1.0
        state[_H_BLK_OPEN] = 0.0
    state[_H_SINCE] = 0.0 if state[_H_BLK_OPEN] > 0 else state[_H_SINCE] + 1.0
    state[_H_N_FLAG] = c + 1


@njit(**config.JIT)
def _release(state, force_before, out_time, out_hr, out_counts, out_period, n_out):
    """Emit the decided epochs in order; epochs before `force_before` still undecided (a block that has
    not opened for too long) are decided outside every period first."""
    while state[_H_N_DEC] < state[_H_N_FLAG]:
        t = int(state[_H_N_DEC])
        k = t & _MASK
        d = state[_OFF_DEC + k]
        if d != d:
            if t >= force_before:
                break
            d = NO_PERIOD
            state[_OFF_DEC + k] = d
            start = int(state[_H_BLK_START])
            if start >= 0 and state[_H_BLK_OPEN] == 0 and start <= t:  # the block loses its oldest epoch
                if t >= int(state[_H_BLK_LAST]):
                    state[_H_BLK_START] = -1.0
                    state[_H_BLK_LAST] = -1.0
                else:
                    state[_H_BLK_START] = t + 1
        out_time[n_out] = state[_OFF_TIME + k]
        out_hr[n_out] = state[_OFF_HR + k]
        out_counts[n_out] = state[_OFF_COUNTS + k]
        out_period[n_out] = d
        n_out += 1
        state[_H_N_DEC] = t + 1
    return n_out


@njit(**config.JIT)
def _detect(time, hr, counts, state, finish, out_time, out_hr, out_counts, out_period):
    buf = np.empty(2 * HALF_WINDOW + 1)
    n_out = 0
    for i in range(time.size):
        t = int(state[_H_N_IN])
        k = t & _MASK
        h = hr[i]
        valid = h == h and HR_BIN_MIN <= h < HR_BIN_MAX
        state[_OFF_TIME + k] = time[i]
        state[_OFF_HR + k] = h if valid else np.nan
        c = counts[i]
        state[_OFF_COUNTS + k] = c if c == c and c > 0 else 0.0
        for b in range(HR_BINS):
            state[_OFF_HIST + b] *= _DECAY
        state[_H_HR_W] *= _DECAY
        if valid:
            state[_OFF_HIST + int(h - HR_BIN_MIN)] += 1.0
            state[_H_HR_W] += 1.0
        state[_H_N_IN] = t + 1
        if t - HALF_WINDOW >= 0:
            _flag(state, t - HALF_WINDOW, t + 1, buf)
        n_out = _release(state, t + 1 - DECISION_LAG, out_time, out_hr, out_counts, out_period, n_out)
    if finish:
        n_in = int(state[_H_N_IN])
        for c in range(int(state[_H_N_FLAG]), n_in):
            _flag(state, c, n_in, buf)
        if state[_H_BLK_OPEN] > 0:  # the data ends: the period ends at its last still epoch
            _decide(state, int(state[_H_BLK_LAST]) + 1, n_in - 1, NO_PERIOD)
        n_out = _release(state, n_in, out_time, out_hr, out_counts, out_period, n_out)
        state[_H_BLK_START] = -1.0
        state[_H_BLK_LAST] = -1.0
        state[_H_BLK_OPEN] = 0.0
    return n_out


# --- public API ------------------------------------------------------------------------------------------
def _check_header(a: list[float]) -> None:
    """The counters and the open block as the kernel leaves them between calls: whole epoch counts, at
    most HALF_WINDOW epochs awaiting flags and DECISION_LAG awaiting a decision; no block (-1, -1, closed),
    or one whose last still epoch is flagged and less than CLOSE_GAP back, and that has not opened only
    while its epochs are undecided."""
    n_in, n_flag, n_dec = a[_H_N_IN], a[_H_N_FLAG], a[_H_N_DEC]
    start, last, is_open = a[_H_BLK_START], a[_H_BLK_LAST], a[_H_BLK_OPEN]
    whole = (n_in, n_flag, n_dec, start + 1, last + 1)
    if not all(0 <= c < 2**53 and c == math.floor(c) for c in whole):  # NaN and inf fail too
        raise ValueError("sleep-period state: its counters are not counts")
    if not (n_dec <= n_flag <= n_in and n_in - n_flag <= HALF_WINDOW and n_in - n_dec <= DECISION_LAG):
        raise ValueError("sleep-period state: inconsistent counters")
    if is_open not in (0.0, 1.0) or not (a[_H_SINCE] >= 0 and math.isfinite(a[_H_SINCE])):
        raise ValueError("sleep-period state: inconsistent block")
    if start < 0:
        ok = last < 0 and is_open == 0.0
    else:
        ok = start <= last < n_flag and n_flag - 1 - last < CLOSE_GAP and (is_open == 1.0 or n_dec <= start)
    if not ok:
        raise ValueError("sleep-period state: inconsistent block")


@dataclass
class PeriodState:
    """Per-device detector memory: one flat float64 array (about 2.7 kB): counters, the open block, the
    last RING epochs and the wearer's decaying heart-rate histogram."""

    array: np.ndarray

    @classmethod
    def new(cls) -> PeriodState:
        a = np.zeros(STATE_LEN)
        a[_H_VERSION] = STATE_VERSION
        a[_H_BLK_START] = -1.0
        a[_H_BLK_LAST] = -1.0
        a[_H_SINCE] = SLEEPLESS
        return cls(a)

    @classmethod
    def from_array(cls, array: np.ndarray) -> PeriodState:
        """A stored state, refused (ValueError) unless the kernel could have left it: the kernel indexes
        its ring and loops over epoch ranges by these counters, so a damaged one crashed or hung it."""
        a = np.asarray(array)
        if a.dtype != np.float64 or a.shape != (STATE_LEN,) or a[_H_VERSION] != STATE_VERSION:
            raise ValueError(f"not a v{STATE_VERSION} sleep-period state of {STATE_LEN} values")
        a = a.copy()
        _check_header(a[:_HEADER].tolist())  # Python floats: scalar checks on numpy values cost more
        hist = a[_OFF_HIST:]
        if not (hist.min() >= 0 and math.isfinite(hist.sum()) and 0 <= a[_H_HR_W] < math.inf):  # NaN fails
            raise ValueError("sleep-period state: its heart-rate history is not a histogram")
        return cls(a)

    @property
    def epochs_in(self) -> int:
        return int(self.array[_H_N_IN])

    @property
    def epochs_out(self) -> int:
        return int(self.array[_H_N_DEC])


@dataclass(frozen=True)
class DecidedEpochs:
    """Epochs whose period became final, in input order, with the inputs they came with."""

    time: np.ndarray  # float64, as given (µs on the raw path)
    hr_bpm: np.ndarray  # NaN where none
    counts: np.ndarray
    period: np.ndarray  # float64: the period's start time (a `time` value), or NO_PERIOD


def detect(
    time: np.ndarray, hr_bpm: np.ndarray, counts: np.ndarray, state: PeriodState, finish: bool = False
) -> DecidedEpochs:
    """Push 30-s epochs (consecutive, in order) and return those whose period is now final.

    `time` is any increasing per-epoch time (µs on the raw path, seconds in replay); a period is named by
    the `time` of its first epoch. `finish=True` ends the data: every pending epoch is decided and an
    open period ends at its last still epoch. `state` is updated in place; any split of the input gives
    the same result as one call.
    """
    time = np.ascontiguousarray(time, dtype=np.float64)
    hr_bpm = np.ascontiguousarray(hr_bpm, dtype=np.float64)
    counts = np.ascontiguousarray(counts, dtype=np.float64)
    if not (time.shape == hr_bpm.shape == counts.shape) or time.ndim != 1:
        raise ValueError("time, hr_bpm and counts must be 1-D arrays of one length")
    if state.array.shape != (STATE_LEN,) or state.array[_H_VERSION] != STATE_VERSION:
        raise ValueError("incompatible sleep-period state")
    cap = time.size + RING
    out = [np.empty(cap) for _ in range(4)]
    n = _detect(time, hr_bpm, counts, state.array, bool(finish), *out)
    return DecidedEpochs(*(a[:n].copy() for a in out))


def detect_periods(time: np.ndarray, hr_bpm: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Period per epoch of a whole recording at once (the period's start `time`, or NO_PERIOD)."""
    return detect(time, hr_bpm, counts, PeriodState.new(), finish=True).period


def periods_of(period: np.ndarray) -> list[tuple[int, int]]:
    """[(first epoch, last epoch)] of each period in a per-epoch `period` array."""
    period = np.asarray(period)
    inside = period != NO_PERIOD
    edges = np.flatnonzero(np.diff(np.concatenate([[NO_PERIOD], period, [NO_PERIOD]])) != 0)
    out = []
    for a, b in itertools.pairwise(edges):
        if inside[a]:
            out.append((int(a), int(b) - 1))
    return out
