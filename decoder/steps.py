"""Wrist step counting: steps, cadence and walking/running bouts from int16 accelerometer counts.

The method (docs/steps.md): vector magnitude (orientation-free), boxcar-decimated to 25 Hz so that a
25 Hz and a 50 Hz band see the same analysis, band-passed by two biquads. At the end of each UTC second
the lag products of the last `window_s` seconds give a normalised autocorrelation; the window is gait
when it is energetic and periodic enough. Its cadence comes from the autocorrelation peak, halved in
period when the peak is a stride (an arm that swings once per stride shows half the cadence in the
magnitude). A second is credited with `cadence × 1 s` steps when enough of the windows covering it are
gait.

Streaming: all a device needs between batches is one flat float64 array (`StepState`): parameters,
filter memory, the last seconds' lag products, pending seconds, the open minute and the open bout.
Seconds and minutes sit on the UTC grid and the arithmetic runs in the same order whatever the batch
boundaries, so any split of the input gives the same outputs as one call; `flush_steps` ends a stream.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import numpy as np
from numba import njit

from decoder import config


@dataclass(frozen=True)
class StepParams:
    """Thresholds of the step detector (tuned by scripts/tune_steps.py); copied into each stream's state."""

    hp_hz: float = 0.25  # high-pass: removes gravity and posture drift, keeps a slow 0.5 Hz stride
    lp_hz: float = 5.0  # low-pass: keeps running cadence (3 Hz), drops impacts and tremor
    window_s: int = 4  # autocorrelation window: two strides of a slow walk
    min_lag_s: float = 0.28  # shortest period searched (3.5 steps/s)
    max_lag_s: float = 2.0  # longest period searched (a 0.5 Hz stride)
    min_rms_g: float = 0.06  # band-passed magnitude quieter than this is not gait (rest, typing)
    min_second_rms_g: float = 0.0  # a second this quiet gets no steps, even inside a gait window
    min_periodicity: float = 0.4  # autocorrelation peak a gait window must reach
    peak_tolerance: float = 0.8  # an earlier peak this close to the strongest is the fundamental
    harmonic_ratio: float = 0.5  # r(L/2) >= ratio * r(L): the peak at L was a stride of two steps
    stride_max_hz: float = 1.4  # a peak slower than this is a stride (arm swing once per stride)
    min_cadence_hz: float = 1.4  # 84 steps/min: slower shuffling is not counted
    max_cadence_hz: float = 3.6
    min_cover: int = 2  # agreeing gait windows (of the `window_s` covering a second) to credit it
    cadence_agreement: float = 0.15  # windows agree when their cadences differ by at most this fraction
    stride_agreement: bool = True  # a window at half another's cadence (it read the stride) agrees with it
    run_cadence_hz: float = 2.5  # at or above: running (150 steps/min)
    bout_min_s: int = 10  # shorter gait still counts steps but is not reported as a bout
    bout_max_gap_s: int = 3  # pauses up to this long do not end a bout
    edge_credit: float = 0.6  # share of a step-second credited at a bout edge (gait seen on one side only)


DEFAULT_PARAMS = StepParams()
FS_DEC = 25  # analysis rate, Hz: every supported band rate is a multiple of it
SHIFT_ENERGY_FLOOR = 0.05  # r(lag) divides by at least this share of the window's own energy
# 2: a block records whether its lag sums beyond lag 0 were computed; 3: edge_credit, stride_agreement
STATE_VERSION = 3
REST, WALK, RUN = 0, 1, 2

# Parameter slots at the head of the state (StepParams field order).
(
    _HP_HZ,
    _LP_HZ,
    _WINDOW_S,
    _MIN_LAG_S,
    _MAX_LAG_S,
    _MIN_RMS_G,
    _MIN_SECOND_RMS_G,
    _MIN_PERIODICITY,
    _PEAK_TOLERANCE,
    _HARMONIC_RATIO,
    _STRIDE_MAX_HZ,
    _MIN_CADENCE_HZ,
    _MAX_CADENCE_HZ,
    _MIN_COVER,
    _CADENCE_AGREEMENT,
    _STRIDE_AGREEMENT,
    _RUN_CADENCE_HZ,
    _BOUT_MIN_S,
    _BOUT_MAX_GAP_S,
    _EDGE_CREDIT,
) = range(20)
_N_PARAMS = 20
# Stream header after the parameters; the rings follow at offsets stored in the header.
(
    _VERSION,
    _LEN,
    _FS,
    _G_PER_COUNT,
    _START_US,
    _N_SEEN,
    _UNTIL_DEC,  # input samples until the next decimated sample
    _UNTIL_SEC,  # input samples until the next UTC second boundary
    _FIRST_SECOND,  # UTC second of the stream's first sample
    _CUR_SECOND,  # UTC second the arriving samples belong to
    _SEC_SAMPLES,  # input samples seen in it
    _SEC_DEC,  # decimated samples made in it
    _NEXT_FINAL,  # next second to finalise
    _DEC_SUM,
    _DEC_CNT,
    _PRIMED,  # filter memory set from the first value
    _Z0,
    _Z1,
    _Z2,
    _Z3,
    _HIST_POS,  # where the next filtered value goes (the ring is written backwards)
    _MINUTE,  # open minute (UTC minute index), -1 if none
    _M_STEPS,
    _M_WALK,
    _M_RUN,
    _M_DATA,
    _B_START,  # open bout: first second, -1 if none
    _B_LAST,
    _B_STEPS,
    _B_RUN,
    _NLAG,  # lags 0 .. nlag-1
    _OFF_HIST,  # ring of the last window_s * FS_DEC + nlag filtered values
    _OFF_BLOCKS,  # per second of the window (slot = second % window_s): lag sums, decimated samples, done
    _OFF_WIN,  # per second (same slots): window cadence (Hz, 0 = not gait), input samples
) = range(_N_PARAMS, _N_PARAMS + 34)
_HDR_LEN = _N_PARAMS + 34

SECOND_DTYPE = np.dtype([("second", "i8"), ("steps", "f4"), ("cadence_spm", "f4"), ("activity", "u1")])
MINUTE_DTYPE = np.dtype(
    [
        ("minute_start_us", "i8"),
        ("steps", "f4"),
        ("cadence_spm", "f4"),  # mean over the minute's walking and running seconds
        ("walk_s", "u1"),
        ("run_s", "u1"),
        ("data_s", "u1"),  # seconds of the minute the stream covered
    ]
)
BOUT_DTYPE = np.dtype(
    [("start_s", "i8"), ("end_s", "i8"), ("steps", "f4"), ("cadence_spm", "f4"), ("activity", "u1")]
)
# Kernel output columns, in dtype field order (float64 rows, typed by the wrapper).
_SEC_COLS = 4
_MIN_COLS = 6
_BOUT_COLS = 5


@dataclass(frozen=True)
class StepOutput:
    """What one call finalised: per-second rows, closed minutes and closed bouts, on the UTC grid."""

    seconds: np.ndarray  # SECOND_DTYPE
    minutes: np.ndarray  # MINUTE_DTYPE
    bouts: np.ndarray  # BOUT_DTYPE


@dataclass(frozen=True)
class StepState:
    """One stream's state as a flat float64 array: serialise with `to_array`, restore with `from_array`."""

    values: np.ndarray

    def to_array(self) -> np.ndarray:
        return self.values.copy()

    @classmethod
    def from_array(cls, values: np.ndarray) -> StepState:
        """A stored state, checked; its `values` are a float64 copy, the one to store. A version-2 state
        (before edge_credit and stride_agreement) is upgraded, taking their defaults, so that streams
        survive a gateway upgrade. The kernels index, loop and size their outputs by the header without
        checking it, so a state they could not have left is refused here (ValueError), never reaches them."""
        if np.asarray(values).dtype != np.float64:  # float32 cannot hold the start time, integers the filter
            raise ValueError("step state is corrupt: not float64")
        v = np.array(values, dtype=np.float64, copy=True)
        if v.ndim == 1 and v.size >= _HDR_LEN - 2 and v[_VERSION - 2] == 2 and v.size == v[_LEN - 2]:
            v = _upgrade_v2(v)
        if v.ndim != 1 or v.size < _HDR_LEN or v[_VERSION] != STATE_VERSION:
            raise ValueError(f"not a step state of version {STATE_VERSION}")
        if v.size != v[_LEN]:
            raise ValueError("step state is corrupt: truncated")
        if not np.all(np.isfinite(v)):
            raise ValueError("step state is corrupt: not finite")
        _check(v)
        return cls(v)

    @property
    def sample_rate_hz(self) -> int:
        return int(self.values[_FS])

    @property
    def samples_seen(self) -> int:
        return int(self.values[_N_SEEN])

    @property
    def params(self) -> StepParams:
        p = self.values[:_N_PARAMS]
        return StepParams(*(type(d)(x) for d, x in zip(astuple(DEFAULT_PARAMS), p, strict=True)))


def _upgrade_v2(v: np.ndarray) -> np.ndarray:
    """Version 2 had no stride_agreement (after cadence_agreement) and no edge_credit (last parameter):
    insert them, and move the header's ring offsets by the two slots."""
    up = np.concatenate(
        [
            v[:_STRIDE_AGREEMENT],
            [float(DEFAULT_PARAMS.stride_agreement)],
            v[_STRIDE_AGREEMENT : _N_PARAMS - 2],
            [DEFAULT_PARAMS.edge_credit],
            v[_N_PARAMS - 2 :],
        ]
    )
    up[_VERSION] = STATE_VERSION
    for slot in (_LEN, _OFF_HIST, _OFF_BLOCKS, _OFF_WIN):
        up[slot] += 2
    return up


@njit(**config.JIT)
def _butter2(f_hz, fs, highpass):
    """Butterworth 2nd-order section (bilinear, pre-warped): b0, b1, b2, a1, a2."""
    k = math.tan(math.pi * f_hz / fs)
    norm = 1.0 / (1.0 + math.sqrt(2.0) * k + k * k)
    a1 = 2.0 * (k * k - 1.0) * norm
    a2 = (1.0 - math.sqrt(2.0) * k + k * k) * norm
    if highpass:
        return norm, -2.0 * norm, norm, a1, a2
    b0 = k * k * norm
    return b0, 2.0 * b0, b0, a1, a2


def filter_sos(params: StepParams = DEFAULT_PARAMS) -> np.ndarray:
    """The band-pass at FS_DEC in scipy's `sos` layout: the low-pass section, then the high-pass."""
    rows = []
    for f_hz, hp in ((params.lp_hz, False), (params.hp_hz, True)):
        b0, b1, b2, a1, a2 = _butter2(f_hz, float(FS_DEC), hp)
        rows.append([b0, b1, b2, 1.0, a1, a2])
    return np.array(rows)


def _supported_rate(fs: float) -> bool:
    return FS_DEC <= fs <= 8 * FS_DEC and fs % FS_DEC == 0


def _nlag(p: StepParams) -> int:
    return round(p.max_lag_s * FS_DEC) + 2  # one lag past the longest period, for the peak test


def _consistent(p: StepParams) -> bool:
    """The parameters `new_state` takes (and so the only ones a stored state can hold)."""
    if not (math.isfinite(p.min_lag_s * FS_DEC) and math.isfinite(p.max_lag_s * FS_DEC)):
        return False  # round() of inf raises
    return (
        0 < p.hp_hz < p.lp_hz < FS_DEC / 2
        and 2 <= p.window_s <= 60
        and 1 <= p.min_cover <= p.window_s
        and 2 <= round(p.min_lag_s * FS_DEC) < _nlag(p) - 2
        and p.max_lag_s <= p.window_s  # a longer period is not gait the window sees; bounds the lags' cost
        and 0 < p.min_cadence_hz < p.max_cadence_hz
        and 0.0 <= p.edge_credit <= 1.0
    )


def _layout(window_s: int, nlag: int) -> tuple[int, int, int, int]:
    """Offsets of the history ring, the window blocks and the window table; the state's length."""
    off_hist = _HDR_LEN
    off_blocks = off_hist + window_s * FS_DEC + nlag  # the window's values and the lags before it
    off_win = off_blocks + window_s * (nlag + 2)
    return off_hist, off_blocks, off_win, off_win + 2 * window_s


def _first_block(n0: int, d: int) -> int:
    """Samples in the first decimation block, for `n0` in the first second: blocks end on second
    boundaries and a second holds at most FS_DEC of them, so the first takes what the second's other
    blocks leave (d + 1 where the period is not a whole number of µs and the second holds fs + 1
    samples: 75, 150 and 175 Hz streams that start on a second; 26 values overran the history ring)."""
    return n0 - (min(-(-n0 // d), FS_DEC) - 1) * d


def _first_second(fs: int, start_us: int) -> tuple[int, int]:
    """The UTC second of a stream's first sample, and how many of its samples fall in that second (up to
    fs + 1 where the sample period is not a whole number of µs)."""
    period_us = 1_000_000 // fs
    first_second = start_us // 1_000_000
    return first_second, -(-((first_second + 1) * 1_000_000 - start_us) // period_us)


_MAX_STREAM_S = (config.MAX_START_US - config.MIN_START_US) // 1_000_000
_MAX_MAGNITUDE = 56756.0  # |(x, y, z)| of int16 counts is at most 32768·√3 = 56755.8


def _corrupt(reason: str) -> ValueError:
    return ValueError(f"step state is corrupt: {reason}")  # a reason only: never a stored value


def _whole(x: float, lo: float, hi: float) -> bool:
    return lo <= x <= hi and x == math.floor(x)


def _check(v: np.ndarray) -> None:
    """Refuse a finite state of its own length that the kernel could not have left.

    The kernel trusts the header: offsets and window size place its ring reads and writes, the rate and
    counters drive its loops, the pending seconds size its outputs. So the parameters must be ones
    `new_state` takes, the layout the one they give, and the counters where the samples seen put them:
    the kernel counts alike whatever the batch boundaries, so most follow from the sample count alone."""
    h = v[:_HDR_LEN].tolist()  # Python floats: plain scalar checks, once per load
    p = StepParams(*h[:_N_PARAMS])
    if not _consistent(p) or not _whole(p.window_s, 2, 60):
        raise _corrupt("its parameters are inconsistent")
    k = int(p.window_s)
    nlag = _nlag(p)
    off_hist, off_blocks, off_win, total = layout = _layout(k, nlag)
    if [h[_NLAG], h[_OFF_HIST], h[_OFF_BLOCKS], h[_OFF_WIN], h[_LEN]] != [nlag, *layout]:
        raise _corrupt("its layout does not match its parameters")
    if not _supported_rate(h[_FS]) or not 0.0 < h[_G_PER_COUNT] < 1.0:
        raise _corrupt("its sample rate or count scale is not supported")
    if not _whole(h[_START_US], config.MIN_START_US, config.MAX_START_US):
        raise _corrupt("its start time is out of range")
    if not _whole(h[_N_SEEN], 0, 2.0**53):
        raise _corrupt("its sample count is out of range")

    # Where the samples seen put the kernel: in the first second (n0 samples) or in a later one (fs).
    fs, n = int(h[_FS]), int(h[_N_SEEN])
    d = fs // FS_DEC
    first, n0 = _first_second(fs, int(h[_START_US]))
    if n < n0:
        second, in_second, until_sec = first, n0, n0 - n
    else:
        second, in_second, until_sec = first + 1 + (n - n0) // fs, fs, fs - (n - n0) % fs
    if n > fs * _MAX_STREAM_S:  # longer than the plausible starts span: keeps the µs arithmetic in int64
        raise _corrupt("its sample count is out of range")

    def counters(u0: int) -> list[float]:  # with a first decimation block of u0 samples
        made = 0 if n < u0 else 1 + (min(n, n0) - u0) // d + max(n - n0, 0) // d  # decimated values
        dec_cnt = n if n < u0 else (n - u0) % d
        until_dec = u0 - n if n < u0 else until_sec % d or d
        hist_pos = -made % (off_blocks - off_hist)  # the ring is written backwards from slot 0
        return [first, until_sec, until_dec, dec_cnt, hist_pos, float(made > 0)]

    stored = [h[_FIRST_SECOND], h[_UNTIL_SEC], h[_UNTIL_DEC], h[_DEC_CNT], h[_HIST_POS], h[_PRIMED]]
    u0 = _first_block(n0, d)
    if stored != counters(u0):
        legacy = n0 % d or d  # a release before 2026-12-07 gave a first second of fs + 1 samples a
        if n0 != fs + 1 or stored != counters(legacy):  # 1-sample first block: fine once its 26 values
            raise _corrupt("its sample counters disagree")  # have left the window (block counts below)
        u0 = legacy
    dec_cnt = stored[3]

    def blocks_done(x: int, in_first: bool) -> int:  # decimated values after x samples of a second
        return (0 if x < u0 else 1 + (x - u0) // d) if in_first else x // d

    if not 0.0 <= h[_DEC_SUM] <= dec_cnt * _MAX_MAGNITUDE or (h[_PRIMED] == 0.0 and any(h[_Z0 : _Z3 + 1])):
        raise _corrupt("its filter memory is inconsistent")

    # A flush closes the partial second early, and the samples after it count toward the next second:
    # each such flush (a sample after the last at least) puts the current second one further ahead.
    cur = h[_CUR_SECOND]
    sec_samples = h[_SEC_SAMPLES]
    j, in_first = in_second - until_sec, second == first  # samples into the second the count is in
    if (
        not _whole(cur, second, second + n)
        or not _whole(sec_samples, 0, in_second - until_sec)
        or (cur == second and sec_samples != in_second - until_sec)
        or h[_SEC_DEC] != blocks_done(j, in_first) - blocks_done(j - int(sec_samples), in_first)
    ):
        raise _corrupt("its current second is inconsistent")
    # A second is final once the last window covering it has closed (window_s - 1 later), or at a flush.
    next_final = h[_NEXT_FINAL]
    if not _whole(next_final, max(first, cur + 1 - k), cur):
        raise _corrupt("its pending seconds are out of range")

    # The open minute is that of the last final second, and counts its final seconds; a closed one is 0.
    minute = h[_MINUTE]
    if minute == -1.0:
        minute_ok = not any(h[_M_STEPS : _M_DATA + 1])
    else:
        minute_ok = (
            next_final > first
            and minute == (int(next_final) - 1) // 60
            and _whole(h[_M_DATA], 1, min(60, next_final - max(minute * 60, first)))
            and _whole(h[_M_WALK], 0, 60)
            and _whole(h[_M_RUN], 0, 60)
            and h[_M_WALK] + h[_M_RUN] <= h[_M_DATA]
            and h[_M_STEPS] >= 0.0
        )
    # An open bout runs between final seconds, and a rest longer than bout_max_gap_s would have closed it.
    b_start, b_last = h[_B_START], h[_B_LAST]
    bout_ok = b_start == -1.0 or (
        _whole(b_start, first, next_final - 1)
        and _whole(b_last, b_start, next_final - 1)
        and next_final - 1 - b_last <= max(p.bout_max_gap_s, 0.0)
        and _whole(h[_B_RUN], 0, b_last + 1 - b_start)
        and h[_B_STEPS] >= 0.0
    )
    if not (minute_ok and bout_ok):
        raise _corrupt("its open minute or bout is inconsistent")

    # The window's per-second counts bound the kernel's reads of the ring (window_s blocks: vectorised).
    blocks = v[off_blocks:off_win].reshape(k, nlag + 2)
    n_block, done = blocks[:, nlag], blocks[:, nlag + 1]
    window_n = v[off_win + 1 : total : 2]
    if not (
        np.all((n_block >= 0) & (n_block <= FS_DEC) & (n_block == np.floor(n_block)))
        and np.all((done == 0.0) | (done == 1.0))
        and np.all((window_n >= 0) & (window_n <= max(n0, fs)) & (window_n == np.floor(window_n)))
    ):
        raise _corrupt("its window blocks are out of range")


def new_state(
    sample_rate_hz: int,
    start_us: int,
    g_per_count: float = 16.0 / 4096,
    params: StepParams = DEFAULT_PARAMS,
) -> StepState:
    """State of a new stream whose first sample is at `start_us` (UTC µs); counts × `g_per_count` = g."""
    fs = int(sample_rate_hz)
    if fs != sample_rate_hz or not _supported_rate(fs):
        raise ValueError(f"sample rate must be a multiple of {FS_DEC} Hz up to {8 * FS_DEC} Hz")
    start_us = int(start_us)
    if not (config.MIN_START_US <= start_us <= config.MAX_START_US):
        raise ValueError("start time outside the plausible range")
    if not (0.0 < g_per_count < 1.0):
        raise ValueError("g_per_count must be in (0, 1)")
    p = params
    if not _consistent(p):
        raise ValueError("inconsistent step parameters")
    k = p.window_s
    nlag = _nlag(p)
    off_hist, off_blocks, off_win, total = _layout(k, nlag)
    v = np.zeros(total, dtype=np.float64)
    v[:_N_PARAMS] = astuple(p)
    first_second, n0 = _first_second(fs, start_us)
    d = fs // FS_DEC
    v[_VERSION] = STATE_VERSION
    v[_LEN] = total
    v[_FS] = fs
    v[_G_PER_COUNT] = g_per_count
    v[_START_US] = start_us
    v[_UNTIL_DEC] = _first_block(n0, d)
    v[_UNTIL_SEC] = n0
    v[_FIRST_SECOND] = first_second
    v[_CUR_SECOND] = first_second
    v[_NEXT_FINAL] = first_second
    v[_MINUTE] = -1
    v[_B_START] = -1
    v[_NLAG] = nlag
    v[_OFF_HIST] = off_hist
    v[_OFF_BLOCKS] = off_blocks
    v[_OFF_WIN] = off_win
    return StepState(v)


# --- kernel ---------------------------------------------------------------------------------------------


@njit(**config.JIT)
def _window_cadence(st, r, mean_square):
    """Cadence (Hz) of a window from its autocorrelation `r` (by lag); 0.0 when it is not gait."""
    nlag = r.shape[0]
    if mean_square < st[_MIN_RMS_G] ** 2:
        return 0.0
    lmin = round(st[_MIN_LAG_S] * FS_DEC)
    top = -1
    for lag in range(lmin, nlag - 1):
        if r[lag] >= r[lag - 1] and r[lag] >= r[lag + 1] and (top < 0 or r[lag] > r[top]):
            top = lag
    if top < 0 or r[top] < st[_MIN_PERIODICITY]:
        return 0.0
    # The fundamental is the shortest peak nearly as strong as the strongest (which may be 2 periods).
    best = top
    for lag in range(lmin, top):
        if r[lag] >= r[lag - 1] and r[lag] >= r[lag + 1] and r[lag] >= st[_PEAK_TOLERANCE] * r[top]:
            best = lag
            break
    ym = r[best - 1]
    y0 = r[best]
    yp = r[best + 1]
    den = ym - 2.0 * y0 + yp
    lag_f = best + (0.5 * (ym - yp) / den if den < 0.0 else 0.0)  # parabolic peak
    half = round(0.5 * lag_f)
    r_half = -2.0
    for h in range(max(half - 1, 1), half + 2):
        r_half = max(r_half, r[h])
    period = lag_f
    if r_half >= st[_HARMONIC_RATIO] * r[best] or FS_DEC / lag_f < st[_STRIDE_MAX_HZ]:
        period = 0.5 * lag_f
    cadence = FS_DEC / period
    if cadence < st[_MIN_CADENCE_HZ] or cadence > st[_MAX_CADENCE_HZ]:
        return 0.0
    return cadence


@njit(**config.JIT)
def _close_minute(st, min_out, n_min):
    active = st[_M_WALK] + st[_M_RUN]
    min_out[n_min, 0] = st[_MINUTE]
    min_out[n_min, 1] = st[_M_STEPS]
    min_out[n_min, 2] = 60.0 * st[_M_STEPS] / active if active > 0 else 0.0
    min_out[n_min, 3] = st[_M_WALK]
    min_out[n_min, 4] = st[_M_RUN]
    min_out[n_min, 5] = st[_M_DATA]
    st[_MINUTE] = -1
    st[_M_STEPS] = 0.0
    st[_M_WALK] = 0.0
    st[_M_RUN] = 0.0
    st[_M_DATA] = 0.0
    return n_min + 1


@njit(**config.JIT)
def _close_bout(st, bout_out, n_bout):
    length = st[_B_LAST] + 1 - st[_B_START]
    if length >= st[_BOUT_MIN_S]:
        bout_out[n_bout, 0] = st[_B_START]
        bout_out[n_bout, 1] = st[_B_LAST] + 1
        bout_out[n_bout, 2] = st[_B_STEPS]
        bout_out[n_bout, 3] = 60.0 * st[_B_STEPS] / length
        bout_out[n_bout, 4] = RUN if 2.0 * st[_B_RUN] > length else WALK
        n_bout += 1
    st[_B_START] = -1
    return n_bout


@njit(**config.JIT)
def _emit_second(st, second, steps, cadence, activity, out, counts):
    """Append a finalised second; close the minute and the bout it ends."""
    sec_out, min_out, bout_out = out
    n = counts[0]
    sec_out[n, 0] = second
    sec_out[n, 1] = steps
    sec_out[n, 2] = 60.0 * cadence
    sec_out[n, 3] = activity
    counts[0] = n + 1
    minute = second // 60
    if st[_MINUTE] >= 0 and minute != st[_MINUTE]:
        counts[1] = _close_minute(st, min_out, counts[1])
    st[_MINUTE] = minute
    st[_M_STEPS] += steps
    st[_M_DATA] += 1.0
    if activity == WALK:
        st[_M_WALK] += 1.0
    elif activity == RUN:
        st[_M_RUN] += 1.0
    max_gap = st[_BOUT_MAX_GAP_S]
    if activity != REST:
        if st[_B_START] < 0:
            st[_B_START] = second
            st[_B_STEPS] = 0.0
            st[_B_RUN] = 0.0
        st[_B_LAST] = second
        st[_B_STEPS] += steps
        if activity == RUN:
            st[_B_RUN] += 1.0
    elif st[_B_START] >= 0 and second - st[_B_LAST] > max_gap:
        counts[2] = _close_bout(st, bout_out, counts[2])


@njit(**config.JIT)
def _finalise(st, upto, out, counts):
    """Finalise the pending seconds before `upto` from the windows covering them (those that exist)."""
    k = int(st[_WINDOW_S])
    nlag = int(st[_NLAG])
    off_blocks = int(st[_OFF_BLOCKS])
    off_win = int(st[_OFF_WIN])
    last_window = st[_CUR_SECOND] - 1
    while st[_NEXT_FINAL] < upto:
        j = int(st[_NEXT_FINAL])
        # Gait keeps its cadence from window to window; narrow-band arm movement does not. The second
        # takes the largest group of covering windows that agree with one of them.
        e_last = int(min(j + k - 1, last_window))
        n_gait = 0
        cad_sum = 0.0
        # Whether the group holds a window that ends within the first half of those covering j (the
        # second sits late in it: gait before j) and one that ends in the second half (gait after j).
        seen_before = False
        seen_after = False
        half = j + k // 2
        for e in range(j, e_last + 1):
            ce = st[off_win + 2 * (e % k)]
            if ce <= 0.0:
                continue
            n_agree = 0
            agree_sum = 0.0
            before = False
            after = False
            for f in range(j, e_last + 1):
                cf = st[off_win + 2 * (f % k)]
                if cf <= 0.0:
                    continue
                if abs(cf - ce) > st[_CADENCE_AGREEMENT] * ce:
                    # The half-cadence ambiguity (_window_cadence) is not always resolved the same way in
                    # neighbouring windows: one that read the stride of this cadence saw the same gait.
                    if st[_STRIDE_AGREEMENT] == 0.0 or abs(2.0 * cf - ce) > st[_CADENCE_AGREEMENT] * ce:
                        continue
                    cf = 2.0 * cf
                n_agree += 1
                agree_sum += cf
                if f < half:
                    before = True
                else:
                    after = True
            if n_agree > n_gait:
                n_gait = n_agree
                cad_sum = agree_sum
                seen_before = before
                seen_after = after
        if e_last < half:  # the stream ended before the later windows: no sign that the walk stopped
            seen_after = True
        cadence = 0.0
        activity = REST
        # A still second at the edge of a walk sits in gait windows but holds no steps.
        blk = off_blocks + (j % k) * (nlag + 2)
        quiet = st[blk] < st[_MIN_SECOND_RMS_G] ** 2 * st[blk + nlag]
        if n_gait >= st[_MIN_COVER] and not quiet:
            cadence = cad_sum / n_gait
            activity = RUN if cadence >= st[_RUN_CADENCE_HZ] else WALK
        # The stream's first and last seconds may be partial: credit the part present.
        frac = st[off_win + 2 * (j % k) + 1] / st[_FS]
        # Gait seen on one side only: j is where a walk starts or stops, and windows reach into it from
        # the walk beside it; the walk covers only part of it (docs/steps.md, bout edges).
        if not (seen_before and seen_after):
            frac *= st[_EDGE_CREDIT]
        _emit_second(st, j, cadence * frac, cadence, activity, out, counts)
        st[_NEXT_FINAL] = j + 1


@njit(**config.JIT)
def _close_second(st, out, counts, scratch):
    """End of a UTC second: its lag sums join the window, the window is analysed, old seconds finalised.

    Lag sums beyond lag 0 matter only to a window energetic enough to be gait, and most seconds of a day
    are still: a second's other lags are summed when the first such window covering it needs them (the
    ring still holds its values and the lags before them then), in the same order as at once."""
    k = int(st[_WINDOW_S])
    nlag = int(st[_NLAG])
    stride = nlag + 2  # lag sums, decimated samples, lags beyond 0 done
    off_hist = int(st[_OFF_HIST])
    off_blocks = int(st[_OFF_BLOCKS])
    off_win = int(st[_OFF_WIN])
    hist_len = off_blocks - off_hist
    second = st[_CUR_SECOND]
    slot = int(second % k)
    n_new = int(st[_SEC_DEC])
    n_blocks = int(min(k, second - st[_FIRST_SECOND] + 1))  # never before the stream began
    n_dec = n_new
    for b in range(1, n_blocks):
        n_dec += int(st[off_blocks + ((slot - b) % k) * stride + nlag])
    # The ring is written backwards, so newest first it is contiguous and the lag loops run forwards in
    # memory (they vectorise): the window's values, then the nlag before them (zeros before the stream).
    newest = int(st[_HIST_POS]) + 1
    if newest == hist_len:
        newest = 0
    base = off_blocks + slot * stride
    e = 0.0
    for i in range(n_new):  # the new second's values, newest first, read from the ring where they are
        j = newest + i
        if j >= hist_len:
            j -= hist_len
        e += st[off_hist + j] * st[off_hist + j]
    st[base] = e
    st[base + nlag] = n_new
    st[base + nlag + 1] = 0.0
    e0 = 0.0
    for b in range(n_blocks):
        e0 += st[off_blocks + ((slot - b) % k) * stride]
    cadence = 0.0
    if n_dec >= 2 and e0 >= st[_MIN_RMS_G] ** 2 * n_dec:
        # Only a window energetic enough to be gait needs the window in one piece: most seconds are not.
        m = n_dec + nlag
        rev = scratch[0, :m]
        first = min(m, hist_len - newest)
        rev[:first] = st[off_hist + newest : off_hist + newest + first]
        rev[first:] = st[off_hist : off_hist + m - first]
        blk = scratch[1, :nlag]
        at = 0  # where block b's values start in rev (newest block first)
        for b in range(n_blocks):
            bb = off_blocks + ((slot - b) % k) * stride
            n_b = int(st[bb + nlag])
            if st[bb + nlag + 1] == 0.0:
                blk[:] = 0.0
                for i in range(at, at + n_b):
                    a = rev[i]
                    for lag in range(nlag):
                        blk[lag] += a * rev[i + lag]
                st[bb : bb + nlag] = blk
                st[bb + nlag + 1] = 1.0
            at += n_b
        s = scratch[2, :nlag]
        s[:] = 0.0
        for b in range(n_blocks):
            bb = off_blocks + ((slot - b) % k) * stride
            s += st[bb : bb + nlag]
        # r(lag) = Σ y[n]·y[n−lag] / √(Σ y[n]² · Σ y[n−lag]²) over the window's samples n: the energy of
        # the shifted window slides back along the history, so a burst before the window cannot fake a peak.
        r = scratch[3, :nlag]
        e_shift = scratch[4, :nlag]
        e_shift[0] = e0
        for lag in range(1, nlag):
            e_shift[lag] = e_shift[lag - 1] + rev[n_dec - 1 + lag] ** 2 - rev[lag - 1] ** 2
        # The shifted energy is floored at a fraction of the window's: against rounding in the running sum
        # where the shifted window reaches back before the stream, and so that a lag reaching back into
        # rest cannot look periodic. Branch-free, so it vectorises.
        floor = SHIFT_ENERGY_FLOOR * e0
        for lag in range(nlag):
            r[lag] = s[lag] / math.sqrt(e0 * max(e_shift[lag], floor))
        cadence = _window_cadence(st, r, e0 / n_dec)
    st[off_win + 2 * slot] = cadence
    st[off_win + 2 * slot + 1] = st[_SEC_SAMPLES]
    st[_SEC_SAMPLES] = 0.0
    st[_SEC_DEC] = 0.0
    st[_CUR_SECOND] = second + 1
    _finalise(st, second + 2 - k, out, counts)


@njit(**config.JIT)
def _count_steps(x, y, z, st, out, counts):
    """Consume int16 counts `x`, `y`, `z` into state `st`; append finalised rows to `out`."""
    fs = int(st[_FS])
    d = fs // FS_DEC
    gpc = st[_G_PER_COUNT]
    off_hist = int(st[_OFF_HIST])
    off_blocks = int(st[_OFF_BLOCKS])
    hist_len = off_blocks - off_hist
    scratch = np.empty((5, hist_len))
    lb0, lb1, lb2, la1, la2 = _butter2(st[_LP_HZ], float(FS_DEC), False)
    hb0, hb1, hb2, ha1, ha2 = _butter2(st[_HP_HZ], float(FS_DEC), True)
    until_dec = int(st[_UNTIL_DEC])
    until_sec = int(st[_UNTIL_SEC])
    dec_sum = st[_DEC_SUM]
    dec_cnt = st[_DEC_CNT]
    z0 = st[_Z0]
    z1 = st[_Z1]
    z2 = st[_Z2]
    z3 = st[_Z3]
    pos = int(st[_HIST_POS])
    sec_samples = st[_SEC_SAMPLES]
    sec_dec = st[_SEC_DEC]
    hist = st[off_hist:off_blocks]
    for i in range(x.shape[0]):
        fx = float(x[i])
        fy = float(y[i])
        fz = float(z[i])
        dec_sum += math.sqrt(fx * fx + fy * fy + fz * fz)
        dec_cnt += 1.0
        sec_samples += 1.0
        until_dec -= 1
        if until_dec == 0:
            until_dec = d
            m = dec_sum * gpc / dec_cnt
            dec_sum = 0.0
            dec_cnt = 0.0
            if st[_PRIMED] == 0.0:
                # Start both sections in their steady state for this value: no switch-on transient.
                st[_PRIMED] = 1.0
                z1 = (lb2 - la2) * m
                z0 = (lb1 - la1) * m + z1
                z3 = hb2 * m
                z2 = hb1 * m + z3
            u = lb0 * m + z0
            z0 = lb1 * m - la1 * u + z1
            z1 = lb2 * m - la2 * u
            v = hb0 * u + z2
            z2 = hb1 * u - ha1 * v + z3
            z3 = hb2 * u - ha2 * v
            hist[pos] = v
            pos = pos - 1 if pos > 0 else hist_len - 1
            sec_dec += 1.0
        until_sec -= 1
        if until_sec == 0:
            until_sec = fs
            st[_HIST_POS] = pos
            st[_SEC_SAMPLES] = sec_samples
            st[_SEC_DEC] = sec_dec
            sec_samples = 0.0
            sec_dec = 0.0
            _close_second(st, out, counts, scratch)
    st[_N_SEEN] += x.shape[0]
    st[_UNTIL_DEC] = until_dec
    st[_UNTIL_SEC] = until_sec
    st[_DEC_SUM] = dec_sum
    st[_DEC_CNT] = dec_cnt
    st[_Z0] = z0
    st[_Z1] = z1
    st[_Z2] = z2
    st[_Z3] = z3
    st[_HIST_POS] = pos
    st[_SEC_SAMPLES] = sec_samples
    st[_SEC_DEC] = sec_dec


@njit(**config.JIT)
def _flush(st, out, counts):
    """End of stream: analyse the partial second, finalise every pending second, close minute and bout."""
    if st[_SEC_SAMPLES] > 0.0:
        scratch = np.empty((5, int(st[_OFF_BLOCKS] - st[_OFF_HIST])))
        _close_second(st, out, counts, scratch)
    _finalise(st, st[_CUR_SECOND], out, counts)
    if st[_MINUTE] >= 0:
        counts[1] = _close_minute(st, out[1], counts[1])
    if st[_B_START] >= 0:
        counts[2] = _close_bout(st, out[2], counts[2])


# --- public wrappers ------------------------------------------------------------------------------------


def _outputs(st: np.ndarray, n_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Every second, minute and bout a call can close: those the samples reach plus the pending ones.
    fs = int(st[_FS])
    pending = int(st[_CUR_SECOND] - st[_NEXT_FINAL]) + 1
    n_sec = n_samples // fs + pending + 2
    return (
        np.empty((n_sec, _SEC_COLS)),
        np.empty((n_sec // 60 + 2, _MIN_COLS)),
        np.empty((n_sec // 2 + 2, _BOUT_COLS)),
    )


def _typed(sec_raw: np.ndarray, min_raw: np.ndarray, bout_raw: np.ndarray) -> StepOutput:
    seconds = np.empty(len(sec_raw), SECOND_DTYPE)
    for i, name in enumerate(SECOND_DTYPE.names):
        seconds[name] = sec_raw[:, i]
    minutes = np.empty(len(min_raw), MINUTE_DTYPE)
    minutes["minute_start_us"] = min_raw[:, 0].astype(np.int64) * 60_000_000
    for i, name in enumerate(MINUTE_DTYPE.names[1:], start=1):
        minutes[name] = min_raw[:, i]
    bouts = np.empty(len(bout_raw), BOUT_DTYPE)
    for i, name in enumerate(BOUT_DTYPE.names):
        bouts[name] = bout_raw[:, i]
    return StepOutput(seconds, minutes, bouts)


def count_steps(xyz: np.ndarray, state: StepState) -> tuple[StepOutput, StepState]:
    """Steps of the next samples of a stream: int16 counts (n, 3) at the state's rate.

    Returns what these samples finalised (seconds lag the input by `window_s - 1` s) and the new state;
    `state` itself is left as it was, so a batch that fails downstream can be replayed from it.
    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or not np.issubdtype(xyz.dtype, np.integer):
        raise ValueError("xyz must be integer counts of shape (n, 3)")
    x, y, z = (np.ascontiguousarray(xyz[:, k], dtype=np.int16) for k in range(3))
    *rows, st = advance_rows(x, y, z, state.values)
    return _typed(*rows), StepState(st)


def advance_rows(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`count_steps` without its checks, for the feature path, which holds a valid state and contiguous
    int16 axes: second, minute and bout rows as float64 (columns in dtype order), then the new state."""
    st = values.copy()
    out = _outputs(st, x.shape[0])
    counts = np.zeros(3, dtype=np.int64)
    _count_steps(x, y, z, st, out, counts)
    return out[0][: counts[0]], out[1][: counts[1]], out[2][: counts[2]], st


def flush_steps(state: StepState) -> tuple[StepOutput, StepState]:
    """End of a stream: finalise the pending seconds and emit the partial minute and the open bout."""
    *rows, st = flush_rows(state.values)
    return _typed(*rows), StepState(st)


def flush_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`flush_steps` as rows, as `advance_rows` returns them."""
    st = values.copy()
    out = _outputs(st, 0)
    counts = np.zeros(3, dtype=np.int64)
    _flush(st, out, counts)
    return out[0][: counts[0]], out[1][: counts[1]], out[2][: counts[2]], st


def steps_of_recording(
    xyz: np.ndarray, sample_rate_hz: int, start_us: int, params: StepParams = DEFAULT_PARAMS
) -> StepOutput:
    """One-shot: a whole recording through a new stream and its flush."""
    a, st = count_steps(xyz, new_state(sample_rate_hz, start_us, params=params))
    b, _ = flush_steps(st)
    return StepOutput(
        *(
            np.concatenate([x, y])
            for x, y in zip((a.seconds, a.minutes, a.bouts), (b.seconds, b.minutes, b.bouts), strict=False)
        )
    )
