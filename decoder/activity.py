"""Activity per 30-s UTC epoch: ENMO, MAD, ActiGraph counts, arm angle, and 15-min non-wear blocks.

The data path for one device, one sample at a time (docs/activity-heart.md):

    int16 counts → g → |a| (ENMO, MAD) ─────────────────────────────────────────┐
                 → per-second axis sums → z-angle → 5-s angles → changes > 5° ───┼→ 30-s epoch row
                 → ActiGraph counts: resample to 30 Hz → band-pass → ×scale →   │
                   trim 4..128 → 10 Hz (floor of mean of 3) → epoch sums ───────┤
                                                            → 1-s sums → VM → Σ ┘
                 → per-axis n, Σ, Σ², min, max per 15-min block → 60-min window → non-wear row

Counts follow agcounts 0.2.6 (Neishabouri et al. 2022) step by step, with its coefficients and the same
floating-point operations in the same order, so a 30–100 Hz stream gives agcounts' numbers. A 25 Hz band
(which agcounts does not take) goes through the same resampler with up/down factors 6/5.

Streaming: a device's state is two flat arrays (int64 and float64) plus a version; every sum is taken in
sample order and every float is computed from the same values in the same order whatever the chunking,
so any split of a stream gives bit-identical rows. Epochs are emitted as soon as a sample past their end
arrives; `activity_flush` emits the partial epoch and the non-wear blocks still waiting for windows. The
kernel trusts its state, so `ActivityState.from_arrays` refuses a stored one it could not have left.

The constants of this module belong in ``decoder/config.py``; they live here until that file is merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from decoder import config

# --- constants -------------------------------------------------------------------------------------------
STATE_VERSION = 2  # 2: per-second count sums for counts_vm_1s_sum
EPOCH_US = 30_000_000
SECOND_US = 1_000_000
EPOCH_S = 30
FIVE_S = 5  # arm-angle resolution (van Hees 2015/2018 sleep detection works on 5-s angles)
ANGLE_CHANGE_DEG = 5.0  # a 5-s change larger than this is "arm moved"
BLOCK_S = 900  # non-wear resolution: 15 min (van Hees 2013)
WINDOW_BLOCKS = 4  # non-wear window: 60 min = 4 blocks
NONWEAR_SD_G = 0.013  # per-axis standard deviation below this ...
NONWEAR_RANGE_G = 0.050  # ... and range below this make an axis "still"
NONWEAR_AXES = 2  # a window is non-wear when at least this many axes are still
NONWEAR_MIN_COVER = 0.75  # a window is judged only when it holds ≥ 45 of its 60 minutes of samples
SAMPLE_RATES_HZ = (25, 30, 40, 50, 60, 70, 80, 90, 100)
_ACCEL_BITS = range(config.MIN_ACCEL_BITS, config.MAX_ACCEL_BITS + 1)  # whole: from_arrays knows each scale

# ActiGraph band-pass at 30 Hz, as published in agcounts (agcounts/legacy.py: INPUT_/OUTPUT_COEFFICIENTS).
# The trailing zeros are ActiLife's; they make the 9th filter state identically zero, so it is left out.
BPF_B = np.array(
    [
        -0.009341062898525,
        -0.025470289659360,
        -0.004235264826105,
        0.044152415456420,
        0.036493718347760,
        -0.011893961934740,
        -0.022917390623150,
        -0.006788163862310,
        0.000000000000000,
    ]
)
BPF_A = np.array(
    [
        1.00000000000000000000,
        -3.63367395910957000000,
        5.03689812757486000000,
        -3.09612247819666000000,
        0.50620507633883000000,
        0.32421701566682000000,
        -0.15685485875559000000,
        0.01949130205890000000,
        0.00000000000000000000,
    ]
)
# scipy.signal.lfilter_zi(BPF_B, BPF_A): the filter's steady state for a unit step, which agcounts scales
# by the first sample (tests/decoder/test_activity.py checks these against scipy).
BPF_ZI = np.array(
    [
        0.00934106283621987,
        0.034811352721976385,
        0.0390466172342568,
        -0.0051057980292588895,
        -0.041599516408558065,
        -0.02970555449401845,
        -0.006788163861095593,
    ]
)
# Filter output → counts: (3/4096) / (2.6/256) × 237.5, evaluated left to right as agcounts does.
COUNTS_SCALE = (3.0 / 4096.0) / (2.6 / 256.0) * 237.5
COUNTS_MIN = 4  # |value| below this is 0 (dead band)
COUNTS_MAX = 128  # |value| above this is clipped
_NB = 7  # filter states kept

EPOCH_DTYPE = np.dtype(
    [
        ("epoch_start_us", "i8"),  # UTC, a multiple of 30 s
        ("n_samples", "i4"),  # accelerometer samples in the epoch (fs × 30 when complete)
        ("enmo_mg", "f4"),  # mean of max(|a| − 1 g, 0), milli-g
        ("mad_mg", "f4"),  # mean |(|a|) − mean |a||, milli-g
        ("counts_x", "i4"),  # ActiGraph counts per axis
        ("counts_y", "i4"),
        ("counts_z", "i4"),
        ("counts_vm", "f4"),  # √(x² + y² + z²) of the epoch's axis counts
        ("counts_n10", "i2"),  # 10-Hz count values summed (300 when complete)
        ("z_angle_deg", "f4"),  # mean of the epoch's per-second arm angles, NaN if none
        ("angle_changes", "u1"),  # 5-s windows ending in the epoch whose angle moved > 5° from the last
        # Σ over the epoch's UTC seconds of √(x² + y² + z²) of that second's axis counts: the sleep stager's
        # movement input, the `counts` of the Sleep-Accel nights it is trained on (agcounts with epoch=1,
        # vector magnitude per second, summed over 30 s; docs/sleep.md)
        ("counts_vm_1s_sum", "f4"),
    ]
)
NONWEAR_DTYPE = np.dtype(
    [
        ("block_start_us", "i8"),  # UTC, a multiple of 15 min
        ("n_samples", "i4"),
        ("nonwear", "u1"),  # 1 if any judged 60-min window covering the block was non-wear
    ]
)
_E_COLS = len(EPOCH_DTYPE.names)
_NW_COLS = len(NONWEAR_DTYPE.names)

# --- state layout ------------------------------------------------------------------------------------------
# int64 slots
(
    _VERSION,
    _FS,
    _UP,  # resampler: upsample factor L
    _DOWN,  # resampler: downsample factor M
    _START_US,
    _N_SEEN,
    _NEXT_SEC_N,  # samples of the stream before the next UTC second boundary
    _SECOND,  # UTC second the arriving samples belong to
    _PHASE,  # upsampled index of the next 30-Hz output, relative to the next sample's first one
    _PRIMED,  # the band-pass has been charged with the first 30-Hz value
    _N3,  # 30-Hz values in the open 10-Hz group
    _ACC3_X,
    _ACC3_Y,
    _ACC3_Z,
    _FLUSHED,
    _S_N,  # the open second: samples and per-axis sums
    _S_SX,
    _S_SY,
    _S_SZ,
    _F5_N,  # the open 5-s window: seconds with an angle
    _HAVE_PREV5,
    _PREV5,  # index of the last closed 5-s window
    _E_N,  # the open epoch
    _E_CX,
    _E_CY,
    _E_CZ,
    _E_N10,
    _E_NSEC,
    _E_CHANGES,
    _B_N,  # the open 15-min block: n, Σ, Σ², min, max per axis
    _B_SUM,  # 3 slots
) = range(31)
_B_SQ = _B_SUM + 3
_B_MIN = _B_SQ + 3
_B_MAX = _B_MIN + 3
_RING = _B_MAX + 3  # WINDOW_BLOCKS closed blocks: index, n, Σ×3, Σ²×3, min×3, max×3, flag
_SLOT = 15
_S_CX = _RING + WINDOW_BLOCKS * _SLOT  # the open second's counts per axis (3 slots)
_I_LEN = _S_CX + 3
# float64 slots
(
    _G_PER_COUNT,
    _LPF_GAIN,  # a·L of the resampler's low-pass
    _LPF_NEG_B,  # −b of the resampler's low-pass
    _LPF_Y,  # 3 slots
) = range(4)
_BPF_Z = _LPF_Y + 3  # 3 × _NB
_E_ENMO = _BPF_Z + 3 * _NB
_E_MAG = _E_ENMO + 1
_E_ANGLE = _E_MAG + 1
_F5_ANGLE = _E_ANGLE + 1
_PREV5_ANGLE = _F5_ANGLE + 1
_E_VM1S = _PREV5_ANGLE + 1  # the open epoch's Σ of per-second vector magnitudes
_MAG_BUF = _E_VM1S + 1  # the open epoch's |a| (g), for MAD


@dataclass(frozen=True)
class ActivityState:
    """One stream's state: int64 and float64 arrays; `to_arrays`/`from_arrays` serialise it."""

    ints: np.ndarray
    floats: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray | int]:
        return {"version": STATE_VERSION, "ints": self.ints.copy(), "floats": self.floats.copy()}

    @classmethod
    def from_arrays(cls, arrays: dict) -> ActivityState:
        """A stored state, checked (one of version 1 upgraded first). The kernel runs on it without checks
        and indexes, loops and sizes by its counters, so a state it could not have left is a ValueError
        here: damaged counters crashed or hung the process."""
        version = arrays["version"]
        iv = _stored_ints(arrays["ints"])
        fv = _stored_floats(arrays["floats"])
        if _is_number(version, 1) and iv.ndim == 1 and iv.size == _S_CX and iv[_VERSION] == 1:
            # Version 1 lacked the per-second count sums: they start at zero, so the epoch open at the
            # upgrade carries only its later seconds in counts_vm_1s_sum.
            iv = np.concatenate([iv, np.zeros(3, np.int64)])
            iv[_VERSION] = STATE_VERSION
            fv = np.insert(fv, _E_VM1S, 0.0) if fv.ndim == 1 and fv.size >= _E_VM1S else fv
            version = STATE_VERSION
        if not _is_number(version, STATE_VERSION) or iv.ndim != 1 or iv.size != _I_LEN or fv.ndim != 1:
            raise ValueError(f"not an activity state of version {STATE_VERSION}")
        _check(iv.tolist(), fv)
        return cls(iv, fv)

    @property
    def sample_rate_hz(self) -> int:
        return int(self.ints[_FS])

    @property
    def samples_seen(self) -> int:
        return int(self.ints[_N_SEEN])

    @property
    def next_sample_us(self) -> int:
        """UTC µs of the next sample the stream expects."""
        return sample_time_us(self.ints[_START_US], self.ints[_FS], self.ints[_N_SEEN])


def sample_time_us(start_us: int, sample_rate_hz: int, n: int) -> int:
    """Time of sample `n` of a stream (integer µs, floor), as the frame decoder computes it."""
    return int(start_us) + (int(n) * 1_000_000) // int(sample_rate_hz)


def resample_factors(sample_rate_hz: int) -> tuple[int, int]:
    """(L, M): 30 Hz = fs × L / M; agcounts' table for 30–100 Hz, and 6/5 for a 25 Hz band."""
    g = math.gcd(30, int(sample_rate_hz))
    return 30 // g, int(sample_rate_hz) // g


def _samples_before(t_us: int, start_us: int, fs: int) -> int:
    """How many samples of the stream fall before `t_us` (t_n < t ⟺ n·10⁶ < (t − start)·fs)."""
    return -((-(t_us - start_us) * fs) // 1_000_000)


def new_activity_state(
    sample_rate_hz: int, start_us: int, *, range_g: int = 8, bits: int = 12
) -> ActivityState:
    """State of a new stream whose first sample is at `start_us` (UTC µs); ±`range_g` g over `bits` bits."""
    fs = int(sample_rate_hz)
    if fs != sample_rate_hz or fs not in SAMPLE_RATES_HZ:
        raise ValueError(f"sample rate must be one of {SAMPLE_RATES_HZ} Hz")
    start_us = int(start_us)
    if not (config.MIN_START_US <= start_us <= config.MAX_START_US):
        raise ValueError("start time outside the plausible range")
    if range_g not in config.ACCEL_RANGES_G or bits not in _ACCEL_BITS:
        raise ValueError("unsupported accelerometer range or resolution")
    up, down = resample_factors(fs)
    iv = np.zeros(_I_LEN, np.int64)
    iv[_VERSION] = STATE_VERSION
    iv[_FS] = fs
    iv[_UP] = up
    iv[_DOWN] = down
    iv[_START_US] = start_us
    second = start_us // SECOND_US
    iv[_SECOND] = second
    iv[_NEXT_SEC_N] = _samples_before((second + 1) * SECOND_US, start_us, fs)
    iv[_PREV5] = -2
    for k in range(WINDOW_BLOCKS):
        iv[_RING + k * _SLOT] = -1
    iv[_B_MIN : _B_MIN + 3] = np.iinfo(np.int64).max
    iv[_B_MAX : _B_MAX + 3] = np.iinfo(np.int64).min
    fv = np.zeros(_MAG_BUF + EPOCH_S * fs)
    fv[_G_PER_COUNT] = 2.0 * range_g / 2.0**bits
    fv[_LPF_GAIN], fv[_LPF_NEG_B] = _low_pass(up)
    return ActivityState(iv, fv)


def _low_pass(up: int) -> tuple[float, float]:
    """(a·L, −b) of the resampler's first-order low-pass for upsampling by L: agcounts' expressions."""
    pi = np.pi
    return (pi / (pi + 2 * up)) * up, -((pi - 2 * up) / (pi + 2 * up))


# --- a stored state's checks -----------------------------------------------------------------------------
# A stream longer than the plausible range of start times is damage; the bound keeps the kernel's
# µs × rate arithmetic far inside int64.
_MAX_STREAM_S = (config.MAX_START_US - config.MIN_START_US) // SECOND_US
# 2·range / 2^bits for every range and resolution new_activity_state takes.
_G_PER_COUNT_VALUES = frozenset(
    2.0 * range_g / 2.0**bits for range_g in config.ACCEL_RANGES_G for bits in _ACCEL_BITS
)
_INT16_ABS = 1 << 15  # the largest |sample| (int16)
_I64_MAX = int(np.iinfo(np.int64).max)  # the empty block's min and max (as new_activity_state sets them)
_I64_MIN = int(np.iinfo(np.int64).min)


def _corrupt(reason: str) -> ValueError:
    """The error for a stored state the kernel could not have left; `reason` never carries a value."""
    return ValueError(f"activity state is corrupt: {reason}")


def _is_number(value: object, number: int) -> bool:
    """`value` is the scalar `number`: a stored version that is inf, NaN or an array is not (int() raised)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and value == number


def _stored_numbers(values: object) -> np.ndarray:
    try:
        a = np.asarray(values)
    except (TypeError, ValueError, OverflowError):
        raise _corrupt("an array is not numbers") from None
    if a.dtype.kind not in "iuf":
        raise _corrupt("an array is not numbers")
    return a


def _stored_ints(values: object) -> np.ndarray:
    """An int64 copy of the stored integers. One stored as a float that is not whole (0.5, NaN, 1e30) is
    refused: the plain cast would truncate it into a counter the kernel trusts."""
    a = _stored_numbers(values)
    with np.errstate(invalid="ignore"):
        iv = a.astype(np.int64)
    if a.dtype != np.int64 and not np.array_equal(iv, a):
        raise _corrupt("an integer is not a whole number")
    return iv


def _stored_floats(values: object) -> np.ndarray:
    return _stored_numbers(values).astype(np.float64)


def _first_sample(second: int, start_us: int, fs: int) -> int:
    """The stream's first sample at or after the start of UTC `second`."""
    return max(0, _samples_before(second * SECOND_US, start_us, fs))


def _sums_fit(n: int, h: list[int], sums: int, squares: int, lows: int, highs: int) -> bool:
    """Per-axis Σ, Σ², min and max that `n` int16 samples can have; none: zeros and the kernel's sentinels."""
    for axis in range(3):
        total, square, low, high = h[sums + axis], h[squares + axis], h[lows + axis], h[highs + axis]
        if n == 0:
            if (total, square, low, high) != (0, 0, _I64_MAX, _I64_MIN):
                return False
        elif not (
            abs(total) <= _INT16_ABS * n
            and 0 <= square <= _INT16_ABS**2 * n
            and -_INT16_ABS <= low <= high < _INT16_ABS
        ):
            return False
    return True


def _check(h: list[int], fv: np.ndarray) -> None:
    """Refuse a state the kernel could not have left (`h`: its int64 slots as Python ints).

    The kernel trusts its state: it writes each sample's |a| at _MAG_BUF + _E_N, runs the resampler's
    inner loop _UP times a sample, cuts the batch into segments of _NEXT_SEC_N − _N_SEEN samples (a
    negative one runs the sample index backwards) and sizes its outputs from the sample rate. The stream's
    start, rate, samples seen and whether it was flushed determine every counter, so each must be exactly
    that; sums must be what their counts of int16 samples allow; parameters what the rate and a supported
    range give. Scalar work on the header and one vectorised pass over the floats: this runs once a batch
    when the state cache misses.
    """
    fs, up, down, start, n, flushed = (h[k] for k in (_FS, _UP, _DOWN, _START_US, _N_SEEN, _FLUSHED))
    if h[_VERSION] != STATE_VERSION:
        raise _corrupt("its header is of another version")
    if fs not in SAMPLE_RATES_HZ:
        raise _corrupt("not a supported sample rate")
    if fv.size != _MAG_BUF + EPOCH_S * fs:
        raise _corrupt("its float array is not its sample rate's size")
    if (
        (up, down) != resample_factors(fs)
        or (fv[_LPF_GAIN], fv[_LPF_NEG_B]) != _low_pass(up)
        or float(fv[_G_PER_COUNT]) not in _G_PER_COUNT_VALUES
    ):
        raise _corrupt("its resampler or scale is not one its sample rate and a supported range give")
    if not np.isfinite(fv).all():  # NaN or inf in a sum or filter memory reaches every later row
        raise _corrupt("a float is not finite")
    if not config.MIN_START_US <= start <= config.MAX_START_US:
        raise _corrupt("start time outside the plausible range")
    if not (0 <= n <= fs * _MAX_STREAM_S and flushed in (0, 1)):
        raise _corrupt("stream position out of range")

    start_s = start // SECOND_US
    # The open second is the last sample's (the first's before any): the kernel moves on lazily, when
    # the next sample arrives.
    second = (start if n == 0 else sample_time_us(start, fs, n - 1)) // SECOND_US
    epoch_s = second - second % EPOCH_S
    block_s = second - second % BLOCK_S
    n_30hz = -(-n * up // down)  # 30-Hz values made from the n samples
    want = {
        _SECOND: second,
        _NEXT_SEC_N: _samples_before((second + 1) * SECOND_US, start, fs),
        _PHASE: n_30hz * down - n * up,
        _PRIMED: int(n > 0),
        _N3: n_30hz % 3,
    }
    if flushed:  # the flush closed the second, 5-s window, epoch and block, and emitted the ring
        want |= dict.fromkeys([_S_N, _F5_N, *range(_E_N, _E_CHANGES + 1), _B_N, *range(_S_CX, _S_CX + 3)], 0)
        prev5 = second // FIVE_S if n > 0 else None
        changes_max = 0
    else:
        e0 = _first_sample(epoch_s, start, fs)
        want |= {
            _S_N: n - _first_sample(second, start, fs),
            _F5_N: second - max(second - second % FIVE_S, start_s),  # each closed second has samples
            _E_N: n - e0,
            _E_N10: n_30hz // 3 - (-(-e0 * up // down)) // 3,
            _E_NSEC: second - max(epoch_s, start_s),
            _B_N: n - _first_sample(block_s, start, fs),
        }
        prev5 = second // FIVE_S - 1 if second // FIVE_S > start_s // FIVE_S else None  # the last closed
        changes_max = (second - epoch_s) // FIVE_S  # 5-s windows closed in the open epoch
    want[_HAVE_PREV5] = int(prev5 is not None)
    want[_PREV5] = -2 if prev5 is None else prev5
    if any(h[k] != v for k, v in want.items()):
        raise _corrupt("its counters are not where the stream is")

    e_n10 = h[_E_N10]
    if not (
        0 <= h[_E_CHANGES] <= changes_max
        and all(0 <= h[_ACC3_X + a] <= COUNTS_MAX * h[_N3] for a in range(3))
        and all(0 <= h[_S_CX + a] <= h[_E_CX + a] <= COUNTS_MAX * e_n10 for a in range(3))
        and all(abs(h[_S_SX + a]) <= _INT16_ABS * h[_S_N] for a in range(3))
        and _sums_fit(h[_B_N], h, _B_SUM, _B_SQ, _B_MIN, _B_MAX)
    ):
        raise _corrupt("a sum or count is beyond what its samples allow")

    # The ring holds the closed blocks of the last window (each has samples: the rate is ≥ 25 Hz).
    block = second // BLOCK_S
    oldest = max(block - (WINDOW_BLOCKS - 1), start_s // BLOCK_S)
    for k in range(WINDOW_BLOCKS):
        s = _RING + k * _SLOT
        b = block - 1 - (block - 1 - k) % WINDOW_BLOCKS  # the latest closed block that files in slot k
        if flushed or b < oldest:
            ok = h[s] == -1  # empty (the rest of the slot is stale and never read)
        else:
            n_b = _first_sample((b + 1) * BLOCK_S, start, fs) - _first_sample(b * BLOCK_S, start, fs)
            ok = h[s] == b and h[s + 1] == n_b and h[s + 14] in (0, 1)
            ok = ok and _sums_fit(n_b, h, s + 2, s + 5, s + 8, s + 11)
        if not ok:
            raise _corrupt("its non-wear ring is not where the stream is")


# --- kernel ----------------------------------------------------------------------------------------------


_B0, _B1, _B2, _B3, _B4, _B5, _B6, _B7 = (float(v) for v in BPF_B[:8])
_A1, _A2, _A3, _A4, _A5, _A6, _A7 = (float(v) for v in BPF_A[1:8])


@njit(inline="always")
def _bpf(v, z0, z1, z2, z3, z4, z5, z6):
    """One 30-Hz value through the band-pass: scipy's transposed direct form II, same operation order."""
    y = z0 + _B0 * v
    return (
        y,
        z1 + v * _B1 - y * _A1,
        z2 + v * _B2 - y * _A2,
        z3 + v * _B3 - y * _A3,
        z4 + v * _B4 - y * _A4,
        z5 + v * _B5 - y * _A5,
        z6 + v * _B6 - y * _A6,
        v * _B7 - y * _A7,
    )


@njit(inline="always")
def _trim(y):
    """Filter output → count value: scale, dead band below 4, clip above 128, floor.

    Written as selects, not branches: on a moving wrist the dead-band test is a coin toss that a branch
    predictor loses."""
    s = abs(COUNTS_SCALE * y)
    t = np.int64(min(s, np.float64(COUNTS_MAX)))  # s ≥ 0: truncation is the floor
    return t if s >= COUNTS_MIN else np.int64(0)


# np.round(v, 3) divides by 1000 after rounding; a division costs more than the whole band-pass step, so
# quotients of the integers a band can produce are looked up (the table is numpy's own division).
_MG_RANGE = 1 << 16
MG_TABLE = np.arange(-_MG_RANGE, _MG_RANGE + 1, dtype=np.float64) / 1000.0


@njit(inline="always")
def _round_mg(v, table):
    """np.round(v, 3) as numpy computes it: multiply, round half to even, divide (here: look up)."""
    r = np.rint(v * 1000.0)
    if abs(r) <= _MG_RANGE:
        return table[np.int64(r) + _MG_RANGE]
    return r / 1000.0


@njit(**config.JIT)
def _close_second(iv, fv):
    # A 10-Hz count value belongs to the second of the sample that completes it; with the stream on the
    # UTC second grid that is agcounts' grouping of ten values per second (epoch=1).
    scx = iv[_S_CX]
    scy = iv[_S_CX + 1]
    scz = iv[_S_CX + 2]
    fv[_E_VM1S] += math.sqrt(float(scx * scx + scy * scy + scz * scz))
    iv[_S_CX] = 0
    iv[_S_CX + 1] = 0
    iv[_S_CX + 2] = 0
    if iv[_S_N] > 0:
        sx = iv[_S_SX]
        sy = iv[_S_SY]
        sz = iv[_S_SZ]
        iv[_B_SUM] += sx
        iv[_B_SUM + 1] += sy
        iv[_B_SUM + 2] += sz
        # atan(z / √(x² + y²)) of the second's mean vector; the sums are exact and the 1/n cancels.
        angle = math.degrees(math.atan2(float(sz), math.sqrt(float(sx * sx + sy * sy))))
        fv[_F5_ANGLE] += angle
        iv[_F5_N] += 1
        fv[_E_ANGLE] += angle
        iv[_E_NSEC] += 1
    iv[_S_N] = 0
    iv[_S_SX] = 0
    iv[_S_SY] = 0
    iv[_S_SZ] = 0


@njit(**config.JIT)
def _close_five(iv, fv, five):
    if iv[_F5_N] > 0:
        angle = fv[_F5_ANGLE] / iv[_F5_N]
        if (
            iv[_HAVE_PREV5] == 1
            and iv[_PREV5] == five - 1
            and abs(angle - fv[_PREV5_ANGLE]) > ANGLE_CHANGE_DEG
        ):
            iv[_E_CHANGES] += 1
        iv[_HAVE_PREV5] = 1
        iv[_PREV5] = five
        fv[_PREV5_ANGLE] = angle
    iv[_F5_N] = 0
    fv[_F5_ANGLE] = 0.0


@njit(**config.JIT)
def _close_epoch(iv, fv, epoch, out, n_out):
    n = iv[_E_N]
    if n > 0:
        mean_mag = fv[_E_MAG] / n
        dev = 0.0
        for i in range(n):
            dev += abs(fv[_MAG_BUF + i] - mean_mag)
        cx = iv[_E_CX]
        cy = iv[_E_CY]
        cz = iv[_E_CZ]
        out[n_out, 0] = epoch * EPOCH_US
        out[n_out, 1] = n
        out[n_out, 2] = 1000.0 * fv[_E_ENMO] / n
        out[n_out, 3] = 1000.0 * dev / n
        out[n_out, 4] = cx
        out[n_out, 5] = cy
        out[n_out, 6] = cz
        out[n_out, 7] = math.sqrt(float(cx * cx + cy * cy + cz * cz))
        out[n_out, 8] = iv[_E_N10]
        out[n_out, 9] = fv[_E_ANGLE] / iv[_E_NSEC] if iv[_E_NSEC] > 0 else np.nan
        out[n_out, 10] = iv[_E_CHANGES]
        out[n_out, 11] = fv[_E_VM1S]
        n_out += 1
    for k in range(_E_N, _E_CHANGES + 1):
        iv[k] = 0
    fv[_E_ENMO] = 0.0
    fv[_E_MAG] = 0.0
    fv[_E_ANGLE] = 0.0
    fv[_E_VM1S] = 0.0
    return n_out


@njit(**config.JIT)
def _window_nonwear(iv, block, g):
    """Van Hees 2013 on the 60 min ending with `block`: ≥ NONWEAR_AXES axes with SD and range small."""
    n = 0
    for k in range(WINDOW_BLOCKS):
        s = _RING + ((block - k) % WINDOW_BLOCKS) * _SLOT
        if iv[s] == block - k:
            n += iv[s + 1]
    if n < 2 or n < NONWEAR_MIN_COVER * WINDOW_BLOCKS * BLOCK_S * iv[_FS]:
        return False
    still = 0
    for axis in range(3):
        total = 0
        sq = 0
        lo = np.iinfo(np.int64).max
        hi = np.iinfo(np.int64).min
        for k in range(WINDOW_BLOCKS):
            s = _RING + ((block - k) % WINDOW_BLOCKS) * _SLOT
            if iv[s] == block - k:
                total += iv[s + 2 + axis]
                sq += iv[s + 5 + axis]
                lo = min(lo, iv[s + 8 + axis])
                hi = max(hi, iv[s + 11 + axis])
        mean = total / n
        var = max((sq - total * mean) / (n - 1), 0.0)  # sample SD (R's sd), from exact integer sums
        if math.sqrt(var) * g < NONWEAR_SD_G and (hi - lo) * g < NONWEAR_RANGE_G:
            still += 1
    return still >= NONWEAR_AXES


@njit(**config.JIT)
def _emit_block(iv, slot_block, nw_out, n_nw):
    s = _RING + (slot_block % WINDOW_BLOCKS) * _SLOT
    if iv[s] == slot_block:
        nw_out[n_nw, 0] = slot_block * BLOCK_S * SECOND_US
        nw_out[n_nw, 1] = iv[s + 1]
        nw_out[n_nw, 2] = iv[s + 14]
        iv[s] = -1
        n_nw += 1
    return n_nw


@njit(**config.JIT)
def _close_block(iv, fv, block, nw_out, n_nw):
    """File the block in the ring, judge the window it ends, and emit the block no window can reach now."""
    if iv[_B_N] > 0:
        s = _RING + (block % WINDOW_BLOCKS) * _SLOT
        iv[s] = block
        iv[s + 1] = iv[_B_N]
        for k in range(12):
            iv[s + 2 + k] = iv[_B_SUM + k]
        iv[s + 14] = 0
        if _window_nonwear(iv, block, fv[_G_PER_COUNT]):
            for k in range(WINDOW_BLOCKS):
                t = _RING + ((block - k) % WINDOW_BLOCKS) * _SLOT
                if iv[t] == block - k:
                    iv[t + 14] = 1
    n_nw = _emit_block(iv, block - (WINDOW_BLOCKS - 1), nw_out, n_nw)
    iv[_B_N] = 0
    for axis in range(3):
        iv[_B_SUM + axis] = 0
        iv[_B_SQ + axis] = 0
        iv[_B_MIN + axis] = np.iinfo(np.int64).max
        iv[_B_MAX + axis] = np.iinfo(np.int64).min
    return n_nw


@njit(**config.JIT)
def _next_second(iv, fv, out, counts, nw_out):
    """The open second has ended: close it and whatever 5-s window, epoch and block end with it."""
    s = iv[_SECOND]
    _close_second(iv, fv)
    s1 = s + 1
    if s1 % FIVE_S == 0:
        _close_five(iv, fv, s // FIVE_S)
    if s1 % EPOCH_S == 0:
        counts[0] = _close_epoch(iv, fv, s // EPOCH_S, out, counts[0])
    if s1 % BLOCK_S == 0:
        counts[1] = _close_block(iv, fv, s // BLOCK_S, nw_out, counts[1])
    iv[_SECOND] = s1
    fs = iv[_FS]
    iv[_NEXT_SEC_N] = -((-((s1 + 1) * SECOND_US - iv[_START_US]) * fs) // SECOND_US)


@njit(inline="always")
def _run(x, y, z, iv, fv, table, out, nw_out, counts, up, down):
    """The sample loop; inlined with constant `up`, `down` so the resampler's inner loop is unrolled."""
    n = x.shape[0]
    g = fv[_G_PER_COUNT]
    gain = fv[_LPF_GAIN]
    neg_b = fv[_LPF_NEG_B]
    if n > 0 and iv[_PRIMED] == 0:
        # The first 30-Hz value is the first sample through the low-pass from rest; agcounts charges the
        # band-pass to its steady state for that value.
        v = np.float64(x[0]) * g
        w = np.float64(y[0]) * g
        u = np.float64(z[0]) * g
        if up > 1:
            v = gain * v + neg_b * 0.0
            w = gain * w + neg_b * 0.0
            u = gain * u + neg_b * 0.0
        v = _round_mg(v, table)
        w = _round_mg(w, table)
        u = _round_mg(u, table)
        for k in range(_NB):
            fv[_BPF_Z + k] = BPF_ZI[k] * v
            fv[_BPF_Z + _NB + k] = BPF_ZI[k] * w
            fv[_BPF_Z + 2 * _NB + k] = BPF_ZI[k] * u
        iv[_PRIMED] = 1
    i = 0
    while i < n:
        if iv[_N_SEEN] == iv[_NEXT_SEC_N]:
            _next_second(iv, fv, out, counts, nw_out)
        seg = min(iv[_NEXT_SEC_N] - iv[_N_SEEN], n - i)
        # The segment lies in one second (so in one epoch and one block): accumulate in locals.
        ssx = iv[_S_SX]
        ssy = iv[_S_SY]
        ssz = iv[_S_SZ]
        bqx = iv[_B_SQ]
        bqy = iv[_B_SQ + 1]
        bqz = iv[_B_SQ + 2]
        lox = iv[_B_MIN]
        loy = iv[_B_MIN + 1]
        loz = iv[_B_MIN + 2]
        hix = iv[_B_MAX]
        hiy = iv[_B_MAX + 1]
        hiz = iv[_B_MAX + 2]
        enmo = fv[_E_ENMO]
        mag_sum = fv[_E_MAG]
        e_n = iv[_E_N]
        lx = fv[_LPF_Y]
        ly = fv[_LPF_Y + 1]
        lz = fv[_LPF_Y + 2]
        o = _BPF_Z
        x0, x1, x2, x3, x4, x5, x6 = fv[o], fv[o + 1], fv[o + 2], fv[o + 3], fv[o + 4], fv[o + 5], fv[o + 6]
        o += _NB
        y0, y1, y2, y3, y4, y5, y6 = fv[o], fv[o + 1], fv[o + 2], fv[o + 3], fv[o + 4], fv[o + 5], fv[o + 6]
        o += _NB
        z0, z1, z2, z3, z4, z5, z6 = fv[o], fv[o + 1], fv[o + 2], fv[o + 3], fv[o + 4], fv[o + 5], fv[o + 6]
        phase = iv[_PHASE]
        n3 = iv[_N3]
        ax3 = iv[_ACC3_X]
        ay3 = iv[_ACC3_Y]
        az3 = iv[_ACC3_Z]
        cx = iv[_E_CX]
        cy = iv[_E_CY]
        cz = iv[_E_CZ]
        n10 = iv[_E_N10]
        scx = iv[_S_CX]
        scy = iv[_S_CX + 1]
        scz = iv[_S_CX + 2]
        for j in range(i, i + seg):
            xi = np.int64(x[j])
            yi = np.int64(y[j])
            zi = np.int64(z[j])
            ssx += xi
            ssy += yi
            ssz += zi
            bqx += xi * xi
            bqy += yi * yi
            bqz += zi * zi
            lox = min(lox, xi)
            loy = min(loy, yi)
            loz = min(loz, zi)
            hix = max(hix, xi)
            hiy = max(hiy, yi)
            hiz = max(hiz, zi)
            mag = math.sqrt(np.float64(xi * xi + yi * yi + zi * zi)) * g
            enmo += max(mag - 1.0, 0.0)
            mag_sum += mag
            fv[_MAG_BUF + e_n] = mag
            e_n += 1
            # ActiGraph resampler: L-fold zero insertion, first-order low-pass, keep every M-th value.
            # agcounts adds the inserted zeros explicitly (u[j] + u[j−1], 0 + ...); leaving out those
            # additions changes at most the sign of a zero.
            xg = np.float64(xi) * g
            yg = np.float64(yi) * g
            zg = np.float64(zi) * g
            for r in range(up):
                if up == 1:
                    lx = xg
                    ly = yg
                    lz = zg
                elif r < 2:
                    lx = gain * xg + neg_b * lx
                    ly = gain * yg + neg_b * ly
                    lz = gain * zg + neg_b * lz
                else:
                    lx = neg_b * lx
                    ly = neg_b * ly
                    lz = neg_b * lz
                if r == phase:
                    phase += down
                    yx, x0, x1, x2, x3, x4, x5, x6 = _bpf(_round_mg(lx, table), x0, x1, x2, x3, x4, x5, x6)
                    yy, y0, y1, y2, y3, y4, y5, y6 = _bpf(_round_mg(ly, table), y0, y1, y2, y3, y4, y5, y6)
                    yz, z0, z1, z2, z3, z4, z5, z6 = _bpf(_round_mg(lz, table), z0, z1, z2, z3, z4, z5, z6)
                    ax3 += _trim(yx)
                    ay3 += _trim(yy)
                    az3 += _trim(yz)
                    n3 += 1
                    if n3 == 3:
                        cx += ax3 // 3
                        cy += ay3 // 3
                        cz += az3 // 3
                        scx += ax3 // 3
                        scy += ay3 // 3
                        scz += az3 // 3
                        n10 += 1
                        n3 = 0
                        ax3 = 0
                        ay3 = 0
                        az3 = 0
            phase -= up
        iv[_S_SX] = ssx
        iv[_S_SY] = ssy
        iv[_S_SZ] = ssz
        iv[_S_N] += seg
        iv[_B_N] += seg
        iv[_B_SQ] = bqx
        iv[_B_SQ + 1] = bqy
        iv[_B_SQ + 2] = bqz
        iv[_B_MIN] = lox
        iv[_B_MIN + 1] = loy
        iv[_B_MIN + 2] = loz
        iv[_B_MAX] = hix
        iv[_B_MAX + 1] = hiy
        iv[_B_MAX + 2] = hiz
        fv[_E_ENMO] = enmo
        fv[_E_MAG] = mag_sum
        iv[_E_N] = e_n
        fv[_LPF_Y] = lx
        fv[_LPF_Y + 1] = ly
        fv[_LPF_Y + 2] = lz
        o = _BPF_Z
        fv[o], fv[o + 1], fv[o + 2], fv[o + 3], fv[o + 4], fv[o + 5], fv[o + 6] = x0, x1, x2, x3, x4, x5, x6
        o += _NB
        fv[o], fv[o + 1], fv[o + 2], fv[o + 3], fv[o + 4], fv[o + 5], fv[o + 6] = y0, y1, y2, y3, y4, y5, y6
        o += _NB
        fv[o], fv[o + 1], fv[o + 2], fv[o + 3], fv[o + 4], fv[o + 5], fv[o + 6] = z0, z1, z2, z3, z4, z5, z6
        iv[_PHASE] = phase
        iv[_N3] = n3
        iv[_ACC3_X] = ax3
        iv[_ACC3_Y] = ay3
        iv[_ACC3_Z] = az3
        iv[_E_CX] = cx
        iv[_E_CY] = cy
        iv[_E_CZ] = cz
        iv[_E_N10] = n10
        iv[_S_CX] = scx
        iv[_S_CX + 1] = scy
        iv[_S_CX + 2] = scz
        iv[_N_SEEN] += seg
        i += seg


@njit(**config.JIT)
def _activity(x, y, z, iv, fv, table, out, nw_out, counts):
    """Process samples x, y, z (int16) in order; rows go to `out` / `nw_out`, their numbers to `counts`.

    The band rates get their own copy of the loop with the resampling factors as constants."""
    up = iv[_UP]
    down = iv[_DOWN]
    if up == 3 and down == 5:  # 50 Hz
        _run(x, y, z, iv, fv, table, out, nw_out, counts, 3, 5)
    elif up == 6 and down == 5:  # 25 Hz
        _run(x, y, z, iv, fv, table, out, nw_out, counts, 6, 5)
    else:
        _run(x, y, z, iv, fv, table, out, nw_out, counts, up, down)


@njit(**config.JIT)
def _flush(iv, fv, out, nw_out, counts):
    """End of stream: close the partial second, 5-s window, epoch and block; emit the waiting blocks.

    A partial 10-Hz group is dropped, as agcounts drops it."""
    s = iv[_SECOND]
    _close_second(iv, fv)
    _close_five(iv, fv, s // FIVE_S)
    counts[0] = _close_epoch(iv, fv, s // EPOCH_S, out, counts[0])
    block = s // BLOCK_S
    counts[1] = _close_block(iv, fv, block, nw_out, counts[1])
    for k in range(WINDOW_BLOCKS - 2, -1, -1):
        counts[1] = _emit_block(iv, block - k, nw_out, counts[1])
    iv[_FLUSHED] = 1


# --- public wrappers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivityOutput:
    """What one call completed: 30-s epoch rows and 15-min non-wear rows, on the UTC grid."""

    epochs: np.ndarray  # EPOCH_DTYPE
    nonwear: np.ndarray  # NONWEAR_DTYPE


def _buffers(iv: np.ndarray, n_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_sec = n_samples // int(iv[_FS]) + 2
    return (
        np.empty((n_sec // EPOCH_S + 2, _E_COLS)),
        np.empty((n_sec // BLOCK_S + WINDOW_BLOCKS + 1, _NW_COLS)),
        np.zeros(2, np.int64),
    )


def _typed(rows: np.ndarray, nw_rows: np.ndarray) -> ActivityOutput:
    epochs = np.empty(len(rows), EPOCH_DTYPE)
    for k, name in enumerate(EPOCH_DTYPE.names):
        epochs[name] = rows[:, k]
    nonwear = np.empty(len(nw_rows), NONWEAR_DTYPE)
    for k, name in enumerate(NONWEAR_DTYPE.names):
        nonwear[name] = nw_rows[:, k]
    return ActivityOutput(epochs, nonwear)


def activity_epochs(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    state: ActivityState,
    *,
    t0_us: int | None = None,
) -> tuple[ActivityOutput, ActivityState]:
    """Activity of the next samples of a stream (int16 counts per axis, at the state's rate).

    `t0_us`, if given, is the time of `x[0]`; it must be where the stream is (within one sample period),
    else a gap or overlap is refused — start a new stream then. Returns the rows these samples
    completed and the new state; `state` itself is unchanged, so a failed batch can be replayed.
    """
    x, y, z = (np.ascontiguousarray(v) for v in (x, y, z))
    if not (x.ndim == y.ndim == z.ndim == 1 and x.size == y.size == z.size):
        raise ValueError("x, y, z must be 1-d arrays of one length")
    if not all(np.issubdtype(v.dtype, np.integer) for v in (x, y, z)):
        raise ValueError("x, y, z must be integer counts")
    x, y, z = (np.ascontiguousarray(v, dtype=np.int16) for v in (x, y, z))
    if state.ints[_FLUSHED]:
        raise ValueError("the stream was flushed; start a new one")
    if t0_us is not None and abs(int(t0_us) - state.next_sample_us) >= 1_000_000 // state.sample_rate_hz:
        raise ValueError("t0_us is not where the stream is: a gap or overlap; start a new stream")
    epochs, nonwear, iv, fv = advance_rows(x, y, z, state.ints, state.floats)
    return _typed(epochs, nonwear), ActivityState(iv, fv)


def advance_rows(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, ints: np.ndarray, floats: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`activity_epochs` without its checks, for the feature path, which holds a valid state and
    contiguous int16 samples: epoch and non-wear rows as float64 (columns in dtype order), new state."""
    iv = ints.copy()
    fv = floats.copy()
    out, nw_out, counts = _buffers(iv, x.size)
    _activity(x, y, z, iv, fv, MG_TABLE, out, nw_out, counts)
    return out[: counts[0]], nw_out[: counts[1]], iv, fv


def activity_flush(state: ActivityState) -> tuple[ActivityOutput, ActivityState]:
    """End of a stream: emit the partial epoch and the non-wear blocks still open."""
    epochs, nonwear, iv, fv = flush_rows(state.ints, state.floats)
    return _typed(epochs, nonwear), ActivityState(iv, fv)


def flush_rows(ints: np.ndarray, floats: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`activity_flush` as rows, as `advance_rows` returns them."""
    iv = ints.copy()
    fv = floats.copy()
    out, nw_out, counts = _buffers(iv, 0)
    if not iv[_FLUSHED]:
        _flush(iv, fv, out, nw_out, counts)
    return out[: counts[0]], nw_out[: counts[1]], iv, fv


def activity_of_recording(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    sample_rate_hz: int,
    start_us: int,
    *,
    range_g: int = 8,
    bits: int = 12,
) -> ActivityOutput:
    """One-shot: a whole recording through a new stream and its flush."""
    a, st = activity_epochs(x, y, z, new_activity_state(sample_rate_hz, start_us, range_g=range_g, bits=bits))
    b, _ = activity_flush(st)
    return ActivityOutput(np.concatenate([a.epochs, b.epochs]), np.concatenate([a.nonwear, b.nonwear]))
