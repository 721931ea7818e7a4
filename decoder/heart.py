"""Heart per 30-s UTC epoch (rate, HRV from RR intervals) and resting heart rate per local day.

The data path for one device (docs/activity-heart.md):

    1 Hz HR (0 = no reading) ───────────────────────────────→ epoch mean / min / max / readings
    RR (ms, with the UTC time of the beat that ends it) → 300–2000 ms → within 20 % of the running median
        of the 5 preceding plausible intervals → kept: mean NN, SDNN; successive kept pairs: RMSSD
    epoch mean HR (≥ 20 readings, inactive if asked) → 10th percentile per local day → resting HR

Every accumulator is an integer (bpm and ms are integers), so any order of additions gives the same
sums, and the floats of a row are computed once, from those sums, when the epoch closes.

Streaming: a call covers the time span up to `until_us`; the kernel walks HR readings, beats and
inactivity marks merged in time order, closes an epoch when time passes its end and a day
`RESTING_GRACE_US` after the day ends (so inactivity marks for its last epochs can still arrive). The
whole state is an int64 header and an int32 ring of per-epoch day slots, plus a version; data older than
where the stream already is is dropped and counted (`late`). Any split of a device's data into calls,
with the state carried, gives the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from decoder import config

# --- constants -------------------------------------------------------------------------------------------
STATE_VERSION = 2  # 2: the per-epoch day slots in an int32 array of their own
EPOCH_US = 30_000_000
DAY_US = 86_400_000_000
EPOCHS_PER_DAY = DAY_US // EPOCH_US
RR_MIN_MS = 300  # 200 bpm
RR_MAX_MS = 2000  # 30 bpm
RR_MEDIAN_BEATS = 5  # running median of this many preceding plausible intervals ...
RR_MEDIAN_MIN = 3  # ... used once it holds at least this many
RR_MAX_CHANGE = 0.2  # a beat further than this fraction from the running median is an artefact
RR_GAP_TOL_US = 20_000  # two beats are successive when their end times differ by the later RR (± this)
RESTING_PERCENTILE = 10  # resting HR: this percentile (nearest rank) of the day's qualifying epoch means
RESTING_MIN_READINGS = 20  # an epoch qualifies with at least this many 1 Hz readings (of 30)
RESTING_MIN_EPOCHS = 20  # a day needs this many qualifying epochs (10 min) for a resting HR
RESTING_GRACE_US = 5 * 60_000_000  # a day closes this long after it ends
_CHANGE_FIFTHS = round(1 / RR_MAX_CHANGE)  # |rr − med| > med / 5, in integers

EPOCH_DTYPE = np.dtype(
    [
        ("epoch_start_us", "i8"),  # UTC, a multiple of 30 s
        ("hr_mean_bpm", "f4"),  # mean of the epoch's non-zero 1 Hz readings, NaN if none
        ("hr_min_bpm", "u1"),  # 0 if no reading
        ("hr_max_bpm", "u1"),
        ("hr_n", "u1"),  # non-zero readings
        ("rr_kept", "u2"),  # beats ending in the epoch that passed artefact rejection
        ("rr_rejected", "u2"),
        ("mean_nn_ms", "f4"),  # mean of the kept intervals, NaN if none
        ("sdnn_ms", "f4"),  # sample SD of the kept intervals, NaN if fewer than 2
        ("rmssd_ms", "f4"),  # √ mean squared difference of successive kept intervals, NaN if no pair
    ]
)
RESTING_DTYPE = np.dtype(
    [
        ("day_start_us", "i8"),  # UTC µs of the local midnight that starts the day
        ("resting_hr_bpm", "f4"),  # NaN when fewer than RESTING_MIN_EPOCHS epochs qualify
        ("n_epochs", "i2"),  # qualifying epochs
    ]
)
_E_COLS = len(EPOCH_DTYPE.names)
_R_COLS = len(RESTING_DTYPE.names)

# --- state layout (an int64 header; the day ring below) -------------------------------------------------
(
    _VERSION,
    _OFFSET_US,  # local time − UTC
    _REQUIRE_INACTIVE,
    _FLUSHED,
    _NOW,  # the stream's time: data before it is late
    _LATE,
    _DAY,  # the open local day (day index of local time)
    _EPOCH,  # the open epoch, −1 if none
    _E_ITEMS,
    _E_HR_N,
    _E_HR_SUM,
    _E_HR_MIN,
    _E_HR_MAX,
    _E_KEPT,
    _E_REJ,
    _E_NN_SUM,
    _E_NN_SQ,
    _E_DIFF_N,
    _E_DIFF_SQ,
    _HAVE_LAST,  # the previous beat: kept?, interval, end time, epoch
    _LAST_KEPT,
    _LAST_RR,
    _LAST_END_US,
    _LAST_EPOCH,
    _HIST_N,
    _HIST_POS,
    _HIST,  # RR_MEDIAN_BEATS slots
) = range(27)
_LEN = _HIST + RR_MEDIAN_BEATS
# The day ring (int32): two local days of epochs, HR sum × 64 + readings (≤ 255·30·64 + 30), then one
# inactivity flag per epoch. int32, not the header's int64: it is most of a band's state, which is stored
# with every batch.
_RING = 2 * EPOCHS_PER_DAY
_FLAGS = _RING
_RING_LEN = 2 * _RING


def _check_clock(iv: np.ndarray) -> None:
    """The stream's time, zone, open day and open epoch as the kernel leaves them. The output buffers are
    sized from the span a call covers, on the promise that the open day is the one `now` lies in (or the
    day before, for RESTING_GRACE_US after midnight; up to two days on after a flush): an open day far
    behind made the kernel close days one by one past its buffer (a crash, or a hang)."""
    h = iv[:_HIST].tolist()  # Python ints: scalar checks on numpy values cost ten times more
    now, off = h[_NOW], h[_OFFSET_US]
    if not (config.MIN_START_US <= now <= 2 * config.MAX_START_US):  # a stream may run past the last start
        raise ValueError("heart state is corrupt: its time is implausible")
    if abs(off) > config.MAX_UTC_OFFSET_MIN * 60_000_000 or off % 60_000_000:
        raise ValueError("heart state is corrupt: its UTC offset is implausible")
    flags = (_REQUIRE_INACTIVE, _FLUSHED, _HAVE_LAST, _LAST_KEPT)
    if any(h[k] not in (0, 1) for k in flags) or min(h[_E_ITEMS : _E_DIFF_SQ + 1]) < 0 or h[_LATE] < 0:
        raise ValueError("heart state is corrupt: a flag or count is out of range")
    lo = (now + off - RESTING_GRACE_US) // DAY_US
    hi = (now + off) // DAY_US + (2 if h[_FLUSHED] else 0)
    if not (lo <= h[_DAY] <= hi) or h[_EPOCH] not in (-1, now // EPOCH_US):
        raise ValueError("heart state is corrupt: its open day or epoch is not where its time is")


@dataclass(frozen=True)
class HeartState:
    """One stream's state: an int64 header and an int32 day ring; `to_arrays`/`from_arrays` serialise it."""

    ints: np.ndarray
    ring: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray | int]:
        return {"version": STATE_VERSION, "ints": self.ints.copy(), "ring": self.ring.copy()}

    @classmethod
    def from_arrays(cls, arrays: dict) -> HeartState:
        if int(arrays["version"]) != STATE_VERSION or "ring" not in arrays:
            raise ValueError(f"not a heart state of version {STATE_VERSION}")
        iv = np.array(arrays["ints"], dtype=np.int64, copy=True)
        ring = np.array(arrays["ring"], copy=True)
        if iv.ndim != 1 or iv.size != _LEN or ring.dtype != np.int32 or ring.shape != (_RING_LEN,):
            raise ValueError(f"not a heart state of version {STATE_VERSION}")
        if iv[_VERSION] != STATE_VERSION or ring.min() < 0:
            raise ValueError("heart state is corrupt")
        # the kernel writes the beat history at _HIST_POS and takes the median of _HIST_N of it
        if not (0 <= iv[_HIST_N] <= RR_MEDIAN_BEATS and 0 <= iv[_HIST_POS] < RR_MEDIAN_BEATS):
            raise ValueError("heart state is corrupt: its beat history is out of range")
        _check_clock(iv)
        return cls(iv, ring)

    @property
    def now_us(self) -> int:
        """Where the stream is: data before this time is dropped as late."""
        return int(self.ints[_NOW])

    @property
    def late(self) -> int:
        """Readings, beats and marks dropped so far because they arrived after their time had passed."""
        return int(self.ints[_LATE])


def local_day(t_us: int, utc_offset_min: int) -> int:
    """Index of the local day (days since 1970-01-01 local) holding UTC time `t_us`."""
    return (int(t_us) + int(utc_offset_min) * 60_000_000) // DAY_US


def new_heart_state(start_us: int, utc_offset_min: int = 0, *, require_inactive: bool = False) -> HeartState:
    """State of a new stream starting at `start_us` (UTC µs) in a zone `utc_offset_min` ahead of UTC.

    With `require_inactive`, only epochs marked inactive count towards resting heart rate; otherwise all
    epochs with enough readings do."""
    start_us = int(start_us)
    if not (config.MIN_START_US <= start_us <= config.MAX_START_US):
        raise ValueError("start time outside the plausible range")
    if abs(int(utc_offset_min)) > config.MAX_UTC_OFFSET_MIN:
        raise ValueError("UTC offset outside ±18 h")
    iv = np.zeros(_LEN, np.int64)
    iv[_VERSION] = STATE_VERSION
    iv[_OFFSET_US] = int(utc_offset_min) * 60_000_000
    iv[_REQUIRE_INACTIVE] = int(bool(require_inactive))
    iv[_NOW] = start_us
    iv[_DAY] = local_day(start_us, utc_offset_min)
    iv[_EPOCH] = -1
    return HeartState(iv, np.zeros(_RING_LEN, np.int32))


# --- kernel ----------------------------------------------------------------------------------------------


@njit(**config.JIT)
def _median2(iv):
    """Twice the median of the beat history (an integer, so the 20 % test is exact)."""
    m = iv[_HIST_N]
    buf = np.empty(RR_MEDIAN_BEATS, np.int64)
    for k in range(m):
        v = iv[_HIST + k]
        j = k
        while j > 0 and buf[j - 1] > v:
            buf[j] = buf[j - 1]
            j -= 1
        buf[j] = v
    if m % 2 == 1:
        return 2 * buf[m // 2]
    return buf[m // 2 - 1] + buf[m // 2]


@njit(**config.JIT)
def _close_epoch(iv, ring, out, n_out):
    e = iv[_EPOCH]
    hr_n = iv[_E_HR_N]
    kept = iv[_E_KEPT]
    out[n_out, 0] = e * EPOCH_US
    out[n_out, 1] = iv[_E_HR_SUM] / hr_n if hr_n > 0 else np.nan
    out[n_out, 2] = iv[_E_HR_MIN] if hr_n > 0 else 0
    out[n_out, 3] = iv[_E_HR_MAX]
    out[n_out, 4] = hr_n
    out[n_out, 5] = kept
    out[n_out, 6] = iv[_E_REJ]
    s = iv[_E_NN_SUM]
    out[n_out, 7] = s / kept if kept > 0 else np.nan
    out[n_out, 8] = np.sqrt((kept * iv[_E_NN_SQ] - s * s) / (kept * (kept - 1))) if kept > 1 else np.nan
    out[n_out, 9] = np.sqrt(iv[_E_DIFF_SQ] / iv[_E_DIFF_N]) if iv[_E_DIFF_N] > 0 else np.nan
    # File the epoch's readings for the day's resting heart rate (its day is the open one or the next).
    ring[e % _RING] = iv[_E_HR_SUM] * 64 + hr_n
    iv[_EPOCH] = -1
    return n_out + 1


@njit(**config.JIT)
def _close_day(iv, ring, rhr_out, n_rhr):
    """Resting HR of the open day: nearest-rank percentile of its qualifying epoch means."""
    day = iv[_DAY]
    day_start = day * DAY_US - iv[_OFFSET_US]
    first = day_start // EPOCH_US
    means = np.empty(EPOCHS_PER_DAY)
    n_q = 0
    n_data = 0
    for k in range(EPOCHS_PER_DAY):
        s = (first + k) % _RING
        packed = np.int64(ring[s])
        readings = packed % 64
        if readings > 0:
            n_data += 1
            if readings >= RESTING_MIN_READINGS and (iv[_REQUIRE_INACTIVE] == 0 or ring[_FLAGS + s] == 1):
                means[n_q] = (packed // 64) / readings
                n_q += 1
        ring[s] = 0
        ring[_FLAGS + s] = 0
    if n_data > 0:
        rhr_out[n_rhr, 0] = day_start
        if n_q >= RESTING_MIN_EPOCHS:
            v = np.sort(means[:n_q])
            rank = -((-RESTING_PERCENTILE * n_q) // 100)  # ceil(p·n / 100), ≥ 1
            rhr_out[n_rhr, 1] = v[rank - 1]
        else:
            rhr_out[n_rhr, 1] = np.nan
        rhr_out[n_rhr, 2] = n_q
        n_rhr += 1
    iv[_DAY] = day + 1
    return n_rhr


@njit(**config.JIT)
def _advance(iv, ring, t, out, rhr_out, counts):
    """Move the stream's time to `t`: close the epoch and the days that end before it."""
    if iv[_EPOCH] >= 0 and t >= (iv[_EPOCH] + 1) * EPOCH_US:
        counts[0] = _close_epoch(iv, ring, out, counts[0])
    while t >= (iv[_DAY] + 1) * DAY_US - iv[_OFFSET_US] + RESTING_GRACE_US:
        counts[1] = _close_day(iv, ring, rhr_out, counts[1])
    if t > iv[_NOW]:
        iv[_NOW] = t


@njit(**config.JIT)
def _open_epoch(iv, t):
    e = t // EPOCH_US
    if iv[_EPOCH] != e:
        iv[_EPOCH] = e
        for k in range(_E_ITEMS, _E_DIFF_SQ + 1):
            iv[k] = 0
    iv[_E_ITEMS] += 1


@njit(**config.JIT)
def _beat(iv, rr, t):
    """Artefact rejection of one beat and its share of the epoch's HRV sums."""
    e = t // EPOCH_US
    kept = False
    if RR_MIN_MS <= rr <= RR_MAX_MS:
        kept = True
        if iv[_HIST_N] >= RR_MEDIAN_MIN:
            med2 = _median2(iv)
            if abs(2 * rr - med2) * _CHANGE_FIFTHS > med2:
                kept = False
        iv[_HIST + iv[_HIST_POS]] = rr
        iv[_HIST_POS] = (iv[_HIST_POS] + 1) % RR_MEDIAN_BEATS
        iv[_HIST_N] = min(iv[_HIST_N] + 1, RR_MEDIAN_BEATS)
    if kept:
        iv[_E_KEPT] += 1
        iv[_E_NN_SUM] += rr
        iv[_E_NN_SQ] += rr * rr
        if (
            iv[_HAVE_LAST] == 1
            and iv[_LAST_KEPT] == 1
            and iv[_LAST_EPOCH] == e
            and abs(t - iv[_LAST_END_US] - rr * 1000) <= RR_GAP_TOL_US
        ):
            d = rr - iv[_LAST_RR]
            iv[_E_DIFF_N] += 1
            iv[_E_DIFF_SQ] += d * d
    else:
        iv[_E_REJ] += 1
    iv[_HAVE_LAST] = 1
    iv[_LAST_KEPT] = 1 if kept else 0
    iv[_LAST_RR] = rr
    iv[_LAST_END_US] = t
    iv[_LAST_EPOCH] = e


@njit(**config.JIT)
def _mark_inactive(iv, ring, epoch_start_us):
    e = epoch_start_us // EPOCH_US
    d = (epoch_start_us + iv[_OFFSET_US]) // DAY_US
    if iv[_DAY] <= d <= iv[_DAY] + 1:
        ring[_FLAGS + e % _RING] = 1
    else:
        iv[_LATE] += 1


@njit(**config.JIT)
def _heart(hr, hr_t0, rr, rr_end, inactive, until, iv, ring, out, rhr_out, counts):
    """Walk readings, beats and inactivity marks merged in time order (ties: mark, reading, beat)."""
    n_hr = hr.shape[0]
    n_rr = rr.shape[0]
    n_in = inactive.shape[0]
    big = np.iinfo(np.int64).max
    i = 0
    j = 0
    k = 0
    while i < n_hr or j < n_rr or k < n_in:
        t_hr = hr_t0 + i * 1_000_000 if i < n_hr else big
        t_rr = rr_end[j] if j < n_rr else big
        t_in = inactive[k] if k < n_in else big
        if t_in <= t_hr and t_in <= t_rr:
            _mark_inactive(iv, ring, t_in)  # marks do not move time: they may come before or after their data
            k += 1
            continue
        t = t_hr if t_hr <= t_rr else t_rr
        if t < iv[_NOW] or t >= until:
            iv[_LATE] += 1
        else:
            _advance(iv, ring, t, out, rhr_out, counts)
            _open_epoch(iv, t)
            if t_hr <= t_rr:
                v = np.int64(hr[i])
                if v > 0:
                    if iv[_E_HR_N] == 0:
                        iv[_E_HR_MIN] = v
                        iv[_E_HR_MAX] = v
                    iv[_E_HR_N] += 1
                    iv[_E_HR_SUM] += v
                    iv[_E_HR_MIN] = min(iv[_E_HR_MIN], v)
                    iv[_E_HR_MAX] = max(iv[_E_HR_MAX], v)
            else:
                _beat(iv, np.int64(rr[j]), t)
        if t_hr <= t_rr:
            i += 1
        else:
            j += 1
    if until > iv[_NOW]:
        _advance(iv, ring, until, out, rhr_out, counts)


@njit(**config.JIT)
def _flush(iv, ring, out, rhr_out, counts):
    if iv[_EPOCH] >= 0:
        counts[0] = _close_epoch(iv, ring, out, counts[0])
    counts[1] = _close_day(iv, ring, rhr_out, counts[1])
    counts[1] = _close_day(iv, ring, rhr_out, counts[1])
    iv[_FLUSHED] = 1


# --- public wrappers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeartOutput:
    """What one call completed: 30-s epoch rows and resting heart rate per closed local day."""

    epochs: np.ndarray  # EPOCH_DTYPE
    resting: np.ndarray  # RESTING_DTYPE


def _buffers(iv: np.ndarray, span_us: int, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_ep = min(max(span_us, 0) // EPOCH_US + 2, n_items + 2)
    n_days = max(span_us, 0) // DAY_US + 3
    return np.empty((n_ep, _E_COLS)), np.empty((n_days, _R_COLS)), np.zeros(2, np.int64)


def _typed(rows: np.ndarray, resting_rows: np.ndarray) -> HeartOutput:
    epochs = np.empty(len(rows), EPOCH_DTYPE)
    for k, name in enumerate(EPOCH_DTYPE.names):
        epochs[name] = rows[:, k]
    resting = np.empty(len(resting_rows), RESTING_DTYPE)
    for k, name in enumerate(RESTING_DTYPE.names):
        resting[name] = resting_rows[:, k]
    return HeartOutput(epochs, resting)


def heart_epochs(
    hr_bpm: np.ndarray,
    hr_t0_us: int,
    rr_ms: np.ndarray,
    rr_end_us: np.ndarray,
    state: HeartState,
    *,
    until_us: int | None = None,
    inactive_epoch_us: np.ndarray | None = None,
) -> tuple[HeartOutput, HeartState]:
    """Heart features of the next span of a stream.

    `hr_bpm` (u8, 0 = no reading) is 1 Hz from `hr_t0_us`; `rr_ms[i]` ends at `rr_end_us[i]` (sorted).
    The call covers the stream up to `until_us` (default: one second after the last reading or beat):
    epochs ending by then are emitted, and later calls may not bring data before it.
    `inactive_epoch_us` lists epoch starts the activity family found inactive, for resting heart rate;
    give each with the call that covers its epoch's end, or earlier. `state` itself is unchanged.
    """
    hr = np.ascontiguousarray(hr_bpm)
    rr = np.ascontiguousarray(rr_ms)
    rr_end = np.ascontiguousarray(rr_end_us, dtype=np.int64)
    marks = np.ascontiguousarray(
        np.zeros(0, np.int64) if inactive_epoch_us is None else inactive_epoch_us, dtype=np.int64
    )
    if hr.ndim != 1 or rr.ndim != 1 or rr_end.shape != rr.shape or marks.ndim != 1:
        raise ValueError("hr_bpm, rr_ms, rr_end_us and inactive_epoch_us must be 1-d; rr_* of one length")
    for name, a in (("hr_bpm", hr), ("rr_ms", rr)):
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{name} must be non-negative integers")
    if hr.size and hr.max() > 255:
        raise ValueError("hr_bpm must fit u8")
    if np.any(np.diff(rr_end) < 0):
        raise ValueError("rr_end_us must be sorted")
    if np.any(marks % EPOCH_US != 0):
        raise ValueError("inactive_epoch_us must be epoch starts (multiples of 30 s)")
    marks = np.sort(marks)
    if state.ints[_FLUSHED]:
        raise ValueError("the stream was flushed; start a new one")
    hr_t0_us = int(hr_t0_us)
    if until_us is None:
        ends = [hr_t0_us + hr.size * 1_000_000] if hr.size else []
        if rr_end.size:
            ends.append(int(rr_end[-1]) + 1_000_000)
        until_us = max(ends) if ends else state.now_us
    last = max(
        hr_t0_us + (hr.size - 1) * 1_000_000 if hr.size else -1, int(rr_end[-1]) if rr_end.size else -1
    )
    if last >= int(until_us):
        raise ValueError("data at or after until_us")
    epochs, resting, iv, ring = advance_rows(
        hr.astype(np.uint8),
        hr_t0_us,
        rr.astype(np.uint16),
        rr_end,
        marks,
        int(until_us),
        state.ints,
        state.ring,
    )
    return _typed(epochs, resting), HeartState(iv, ring)


def advance_rows(
    hr_bpm: np.ndarray,
    hr_t0_us: int,
    rr_ms: np.ndarray,
    rr_end_us: np.ndarray,
    inactive_epoch_us: np.ndarray,
    until_us: int,
    ints: np.ndarray,
    ring: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`heart_epochs` without its checks, for the feature path, which holds a valid state and arrays
    that pass them (u8 readings, u16 beats with sorted int64 ends, sorted int64 epoch marks, an explicit
    `until_us`): epoch and resting rows as float64 (columns in dtype order), then the new state."""
    iv = ints.copy()
    ring = ring.copy()
    out, rhr_out, counts = _buffers(iv, until_us - int(iv[_NOW]), hr_bpm.size + rr_ms.size)
    _heart(hr_bpm, hr_t0_us, rr_ms, rr_end_us, inactive_epoch_us, until_us, iv, ring, out, rhr_out, counts)
    return out[: counts[0]], rhr_out[: counts[1]], iv, ring


def heart_flush(state: HeartState) -> tuple[HeartOutput, HeartState]:
    """End of a stream: emit the open epoch and the resting heart rate of the open days."""
    epochs, resting, iv, ring = flush_rows(state.ints, state.ring)
    return _typed(epochs, resting), HeartState(iv, ring)


def flush_rows(ints: np.ndarray, ring: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`heart_flush` as rows, as `advance_rows` returns them."""
    iv = ints.copy()
    ring = ring.copy()
    out, rhr_out, counts = _buffers(iv, 0, 0)
    if not iv[_FLUSHED]:
        _flush(iv, ring, out, rhr_out, counts)
    return out[: counts[0]], rhr_out[: counts[1]], iv, ring


def heart_of_recording(
    hr_bpm: np.ndarray,
    hr_t0_us: int,
    rr_ms: np.ndarray,
    rr_end_us: np.ndarray,
    utc_offset_min: int = 0,
    *,
    inactive_epoch_us: np.ndarray | None = None,
    require_inactive: bool = False,
) -> HeartOutput:
    """One-shot: a whole recording through a new stream and its flush."""
    starts = [int(hr_t0_us)] + ([int(np.min(rr_end_us))] if len(rr_end_us) else [])
    st = new_heart_state(min(starts), utc_offset_min, require_inactive=require_inactive)
    a, st = heart_epochs(hr_bpm, hr_t0_us, rr_ms, rr_end_us, st, inactive_epoch_us=inactive_epoch_us)
    b, _ = heart_flush(st)
    return HeartOutput(np.concatenate([a.epochs, b.epochs]), np.concatenate([a.resting, b.resting]))
