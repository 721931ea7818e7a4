"""The one path from decoded samples to feature records: `process(decoded, state) -> (records, state)`.

`bandgate replay` and the gateway's pipeline both call this function, so a record is the same whether it
came from a file or over gRPC. A record (docs/features.md) is a plain dict:
`{"family", "device", "start_us", "duration_s", "algo", "values": {...}}`.

Streaming: a device's `DeviceState` holds each family's state as flat arrays plus where the next sample
is expected. Good frames that continue where the last ended are processed as one run; a gap (the band
lost data, or a frame failed) or a change of sample rate or format flushes every family and starts them
again at the new frame, so no feature is computed across missing data. Because each family is
split-invariant, the records do not depend on how the samples were cut into frames and batches, nor on
the state being serialised and restored between them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import msgpack
import numpy as np
import zstandard
from numba import njit

from decoder import activity, config, heart, periods, sleep, steps
from decoder.frames import DecodedBatch, FrameStatus
from decoder.records import FAMILIES as FAMILIES  # re-exported: the record families
from decoder.records import device_key

STATE_VERSION = 2  # 2: zstd-compressed
ALGO = {
    "steps": "steps/2",  # 2: bout-edge share and stride agreement (issue 15)
    "activity": "activity/1",
    "wear": "activity/1",
    "heart": "heart/1",
    "day": "heart/1",
    "sleep": "sleep/3",  # 2: detected sleep periods, stage probabilities; 3: hour-scale HR features
    "night": "sleep/3",
    "distance": "distance/1",
}
# An epoch counts as inactive for resting heart rate below this ENMO (Hildebrand 2014's wrist
# sedentary threshold is about 30 mg at 50 Hz).
INACTIVE_ENMO_MG = 30.0
# Sleep is staged inside the sleep periods decoder/periods.py detects (any hour, naps included); a
# `night` record summarises each period.
STAGE_NAMES = ("wake", "light", "deep", "rem")
_FRAME_OK = int(FrameStatus.OK)


@dataclass(frozen=True)
class DeviceState:
    """Everything the feature path remembers about one device between batches (small, serialisable)."""

    device_id: int
    next_us: int = -1  # where the next accelerometer sample is expected (UTC µs); -1 = no stream open
    sample_rate_mhz: int = 0
    accel_range_g: int = 0
    accel_bits: int = 0
    utc_offset_min: int = 0
    families: dict[str, dict] = field(default_factory=dict)  # family -> {name: ndarray | int}

    def to_bytes(self) -> bytes:
        """msgpack with a version, each family's arrays as (dtype, raw little-endian bytes), in a zstd
        frame: a state is mostly zeros and small integers (about 110 KB raw, 11 KB packed for a band
        with heart rate), and it is written with every batch and held for every open stream."""
        packed = msgpack.packb(
            {
                "v": STATE_VERSION,
                "device_id": self.device_id,
                "next_us": self.next_us,
                "rate": self.sample_rate_mhz,
                "range": self.accel_range_g,
                "bits": self.accel_bits,
                "utc": self.utc_offset_min,
                "families": {k: _pack_arrays(v) for k, v in self.families.items()},
            }
        )
        return _zstd().compress(packed)

    @classmethod
    def from_bytes(cls, data: bytes, without: frozenset[str] = frozenset()) -> DeviceState:
        """The state `to_bytes` wrote, less the families named in `without` (not checked: they restart
        at the next run, as a family newly consented does); `ValueError` for anything else (the size is
        bounded before anything is decompressed, and every family's arrays are checked as their kernel
        checks them)."""
        try:
            size = zstandard.frame_content_size(data) if bytes(data[:4]) == _ZSTD_MAGIC else -1
        except zstandard.ZstdError:
            size = -1
        if not 0 < size <= MAX_STATE_BYTES:
            raise ValueError("not a device state: no zstd frame of a bounded size")
        try:
            d = msgpack.unpackb(_zstd_d().decompress(data))
            if not isinstance(d, dict) or d.get("v") != STATE_VERSION:
                raise ValueError(f"not a device state of version {STATE_VERSION}")
            return cls(
                device_id=d["device_id"],
                next_us=d["next_us"],
                sample_rate_mhz=d["rate"],
                accel_range_g=d["range"],
                accel_bits=d["bits"],
                utc_offset_min=d["utc"],
                families=_checked(
                    {k: _unpack_arrays(v) for k, v in d["families"].items() if k not in without}
                ),
            )
        except (zstandard.ZstdError, KeyError, TypeError, AttributeError, IndexError, OverflowError) as e:
            raise ValueError(f"not a device state: {type(e).__name__}") from None


class StateCache:
    """The last states this compute worker made, by device, each beside the exact bytes it was stored as.

    A band that syncs its buffer sends batch after batch; loading its state from the stored bytes
    (decompress, unpack, check) cost about as much as its kernels on a one-minute batch. `load` returns
    the kept object only when the stored bytes are byte-for-byte the ones it was kept with, so anything
    else written meanwhile (a commit that failed, another worker's batch, an erase) is loaded from the
    bytes. Safe because `process` never modifies the state it is given. Not thread-safe: one per worker.
    """

    def __init__(self, capacity: int = 256):  # ~60 KB a band with heart rate: ~16 MB when full
        self.capacity = capacity
        self._kept: OrderedDict[int, tuple[bytes, DeviceState]] = OrderedDict()

    def load(self, device_id: int, data: bytes) -> DeviceState:
        kept = self._kept.get(device_id)
        if kept is not None and kept[0] == data:
            self._kept.move_to_end(device_id)
            return kept[1]
        return DeviceState.from_bytes(data)

    def keep(self, device_id: int, data: bytes, state: DeviceState) -> None:
        self._kept[device_id] = (data, state)
        self._kept.move_to_end(device_id)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_STATE_BYTES = 4 << 20  # a real state is about 110 KB decompressed
_local = threading.local()


def _zstd() -> zstandard.ZstdCompressor:
    """A compressor per thread (they are not thread-safe); level -5: the fastest, 10x on a state."""
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=-5, write_content_size=True)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def _checked(families: dict[str, dict]) -> dict[str, dict]:
    """Each family's state as its kernel checks it (version, sizes, invariants): the feature path runs the
    kernels on these arrays without checking them again, so a state is checked once, where it comes in."""
    for name, fam in families.items():
        if name not in _FAMILY_KEYS:
            raise ValueError("device state: an unknown family")  # (its name is stored data: not echoed)
        if not isinstance(fam, dict) or not _FAMILY_KEYS[name] <= fam.keys():
            raise ValueError(f"device state: the {name} family lacks an entry")
        if name == "activity":  # an older version's arrays are upgraded here
            families[name] = activity.ActivityState.from_arrays(fam).to_arrays()
        elif name == "heart":  # the checked int64 arrays, not the stored ones (another dtype: no kernel)
            families[name] = heart.HeartState.from_arrays(fam).to_arrays()
        elif name == "steps":
            fam["values"] = steps.StepState.from_array(fam["values"]).values  # the checked float64 copy
        elif name == "sleep":
            fam["values"] = sleep.SleepState.upgraded(fam["values"]).array  # a version 1 state is upgraded
            fam["periods"] = periods.PeriodState.from_array(fam["periods"]).array
            if fam["stages"].dtype != np.int8 or fam["stages"].ndim != 1:
                raise ValueError("device state: sleep stages are corrupt")
            if type(fam["period_us"]) is not int or fam["period_us"] < -1:
                raise ValueError("device state: the open sleep period is corrupt")
        elif name == "hr_buffer":
            us, hr = fam["epoch_us"], fam["hr"]
            if (
                us.dtype != np.int64
                or hr.dtype != np.float64
                or us.shape != hr.shape
                or np.any(np.diff(us) <= 0)
            ):
                raise ValueError("device state: heart-rate buffer is corrupt")
    return families


_FAMILY_KEYS = {  # what each family's kernels read
    "activity": {"version", "ints", "floats"},
    "heart": {"version", "ints", "ring"},
    "steps": {"values"},
    "sleep": {"periods", "values", "period_us", "stages"},
    "hr_buffer": {"epoch_us", "hr"},
}


def _pack_arrays(arrays: dict) -> dict:
    out = {}
    for name, v in arrays.items():
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            out[name] = [a.dtype.newbyteorder("<").str, a.astype(a.dtype.newbyteorder("<")).tobytes()]
        else:
            out[name] = int(v)
    return out


def _unpack_arrays(packed: dict) -> dict:
    return {
        name: np.frombuffer(v[1], np.dtype(v[0])).copy() if isinstance(v, list) else int(v)
        for name, v in packed.items()
    }


@dataclass(frozen=True)
class _Run:
    """Consecutive good frames whose samples continue one another."""

    start_us: int
    end_us: int  # where the sample after the last is expected
    sample_rate_mhz: int
    accel_range_g: int
    accel_bits: int
    utc_offset_min: int
    x: np.ndarray  # int16 counts, contiguous views of the batch's samples
    y: np.ndarray
    z: np.ndarray
    hr_bpm: np.ndarray  # u8, 1 Hz from start_us (0 = no reading)
    rr_ms: np.ndarray  # u16
    rr_end_us: np.ndarray  # int64, sorted, within [start_us, end_us)


def _runs(d: DecodedBatch) -> Iterator[_Run]:
    """Split the good frames of a batch into contiguous runs (their samples are adjacent in d.x/y/z)."""
    ok, heads, ends = _run_bounds(
        d.status, d.sample_rate_mhz, d.start_us, d.accel_start, d.accel_count, d.accel_range_g, d.accel_bits
    )
    for k in range(heads.size - 1):
        yield _make_run(d, ok[heads[k] : heads[k + 1]], int(ends[k]))


@njit(**config.JIT)
def _run_bounds(status, rate_mhz, start_us, accel_start, accel_count, range_g, bits):
    """The good frames with accelerometer samples, where each run of them starts (indices into them,
    closed by their count), and where each run ends (µs). Frame f continues the run when it picks up
    exactly where the frame before ended: same format, no lost samples, within half a sample period.

    The accelerometer is the feature path's clock: a frame's heart rate is read on its samples' timeline.
    A frame without samples has none, so it is left out (its heart rate with it) rather than taken for a
    stream of its own: it used to end the open stream (epochs, minute and sleep period closed early) and
    open one at its time, which the next frame ended again."""
    ok = np.flatnonzero((status == _FRAME_OK) & (accel_count > 0))
    heads = np.empty(ok.size + 1, np.int64)
    ends = np.empty(ok.size, np.int64)
    n = 0
    end = np.int64(0)
    for i in range(ok.size):
        f = ok[i]
        rate = max(np.int64(rate_mhz[f]), 1)
        if i > 0:
            p = ok[i - 1]
            if not (
                np.int64(accel_start[f]) == np.int64(accel_start[p]) + np.int64(accel_count[p])
                and rate_mhz[f] == rate_mhz[p]
                and range_g[f] == range_g[p]
                and bits[f] == bits[p]
                and abs(np.int64(start_us[f]) - end) <= 500_000_000 // rate
            ):
                ends[n - 1] = end
                heads[n] = i
                n += 1
        else:
            heads[0] = 0
            n = 1
        end = np.int64(start_us[f]) + (np.int64(accel_count[f]) * 1_000_000_000) // rate
    if ok.size:
        ends[n - 1] = end
        heads[n] = ok.size
    else:
        heads[0] = 0
    return ok, heads[: n + 1], ends[:n]


def _make_run(d: DecodedBatch, frames: np.ndarray, end_us: int) -> _Run:
    f0 = int(frames[0])
    start_us = int(d.start_us[f0])
    a = int(d.accel_start[f0])
    b = int(d.accel_start[frames[-1]] + d.accel_count[frames[-1]])
    hr, rr_ms, rr_end = _run_heart(
        frames,
        d.start_us,
        d.hr_start,
        d.hr_count,
        d.hr_bpm,
        d.rr_start,
        d.rr_count,
        d.rr_first_beat_ms,
        d.rr_ms,
        start_us,
        end_us,
    )
    return _Run(
        start_us=start_us,
        end_us=end_us,
        sample_rate_mhz=int(d.sample_rate_mhz[f0]),
        accel_range_g=int(d.accel_range_g[f0]),
        accel_bits=int(d.accel_bits[f0]),
        utc_offset_min=int(d.utc_offset_min[f0]),
        x=d.x[a:b],
        y=d.y[a:b],
        z=d.z[a:b],
        hr_bpm=hr,
        rr_ms=rr_ms,
        rr_end_us=rr_end,
    )


@njit(**config.JIT)
def _run_heart(
    frames,
    start_us,
    hr_start,
    hr_count,
    hr_bpm,
    rr_start,
    rr_count,
    rr_first_beat_ms,
    rr_ms,
    run_start,
    run_end,
):
    """The run's heart data on its own grid: 1 Hz readings placed by each frame's start (a frame's
    readings are 1 Hz from its own start), and beats with their end times. A beat the band placed outside
    the run's window, or before the beat listed ahead of it, is not trusted and is left out."""
    n_sec = max((run_end - run_start + 999_999) // 1_000_000, 0)
    hr = np.zeros(n_sec, np.uint8)
    n_rr = 0
    for f in frames:
        n_rr += rr_count[f]
    rr = np.empty(n_rr, np.uint16)
    ends = np.empty(n_rr, np.int64)
    m = 0
    previous = np.iinfo(np.int64).min
    for f in frames:
        offset = (np.int64(start_us[f]) - run_start) // 1_000_000
        for k in range(np.int64(hr_count[f])):
            s = offset + k
            if 0 <= s < n_sec:
                hr[s] = hr_bpm[hr_start[f] + k]
        t = np.int64(start_us[f]) + np.int64(rr_first_beat_ms[f]) * 1000
        for k in range(np.int64(rr_count[f])):
            v = rr_ms[rr_start[f] + k]
            if k > 0:
                t += np.int64(v) * 1000
            if run_start <= t < run_end and t >= previous:
                rr[m] = v
                ends[m] = t
                m += 1
            previous = t
    return hr, rr[:m], ends[:m]


@njit(**config.JIT)
def _join_hr(buffer_us, buffer_hr, epoch_us):
    """Heart rate of each activity epoch from the waiting heart epochs (both sorted; NaN where none
    waits), and how many waiting epochs the activity epochs have passed (they are done)."""
    hr = np.full(epoch_us.size, np.nan)
    j = 0
    for i in range(epoch_us.size):
        while j < buffer_us.size and buffer_us[j] < epoch_us[i]:
            j += 1
        if j < buffer_us.size and buffer_us[j] == epoch_us[i]:
            hr[i] = buffer_hr[j]
    done = 0
    if epoch_us.size:
        while done < buffer_us.size and buffer_us[done] <= epoch_us[-1]:
            done += 1
    return hr, done


def _same_stream(state: DeviceState, run: _Run) -> bool:
    if state.next_us < 0:
        return False
    half_period_us = 500_000_000 // max(run.sample_rate_mhz, 1)
    return (run.sample_rate_mhz, run.accel_range_g, run.accel_bits) == (
        state.sample_rate_mhz,
        state.accel_range_g,
        state.accel_bits,
    ) and abs(run.start_us - state.next_us) <= half_period_us


# --- records ------------------------------------------------------------------------------------------------


def _record(family: str, device: str, start_us: int, duration_s: int, values: dict) -> dict:
    return {
        "family": family,
        "device": device,
        "start_us": int(start_us),
        "duration_s": duration_s,
        "algo": ALGO[family],
        "values": values,
    }


class _Layout:
    """How a family's kernel rows (float64, columns in the family's dtype order) become record values.

    A field is (name, column, digits): a float column passes through float32 (the precision the kernels
    publish) and is rounded to `digits` as `np.round` does (multiply, round half to even, divide); an
    integer column (digits None) becomes a Python int. Whole columns are converted at once, not values.
    """

    def __init__(self, family: str, duration_s: int, fields: tuple[tuple[str, int, int | None], ...]):
        self.family = family
        self.duration_s = duration_s
        self.algo = ALGO[family]
        self.names = [name for name, _, _ in fields]
        self.float_cols = np.array([col for _, col, digits in fields if digits is not None], np.int64)
        self.scale = np.array([10.0**digits for _, _, digits in fields if digits is not None])
        self.int_cols = np.array([col for _, col, digits in fields if digits is None], np.int64)
        n_float = len(self.float_cols)
        order, fi, ii = [], 0, n_float
        for _, _, digits in fields:
            if digits is None:
                order.append(ii)
                ii += 1
            else:
                order.append(fi)
                fi += 1
        self.order = order

    def columns(self, rows: np.ndarray) -> list[list]:
        if not rows.shape[0]:
            return [[] for _ in self.order]
        # one signature (C-contiguous float64), so no batch ever waits for a new specialisation
        rows = np.ascontiguousarray(rows, np.float64)
        f, i = _round_columns(rows, self.float_cols, self.scale, self.int_cols)
        cols = f.tolist() + i.tolist()
        return [cols[k] for k in self.order]

    def records(self, device: str, starts: list, columns: list[list]) -> list[dict]:
        """Records from value columns; a NaN or None value is left out of its record."""
        family, duration_s, algo, names = self.family, self.duration_s, self.algo, self.names
        return [
            {
                "family": family,
                "device": device,
                "start_us": start,
                "duration_s": duration_s,
                "algo": algo,
                "values": {k: v for k, v in zip(names, row, strict=True) if v is not None and v == v},
            }
            for start, *row in zip(starts, *columns, strict=True)
        ]


@njit(**config.JIT)
def _round_columns(rows, float_cols, scale, int_cols):
    """`_Layout.columns`' arithmetic in one call (a batch's few rows made numpy's per-call cost most of
    it): float columns through float32, rounded as `np.round` does; integer columns as int64. Both
    column-major, as the records are built column by column."""
    n = rows.shape[0]
    f = np.empty((float_cols.size, n))
    for k in range(float_cols.size):
        c = float_cols[k]
        for r in range(n):
            f[k, r] = np.rint(np.float64(np.float32(rows[r, c])) * scale[k]) / scale[k]
    i = np.empty((int_cols.size, n), np.int64)
    for k in range(int_cols.size):
        c = int_cols[k]
        for r in range(n):
            i[k, r] = np.int64(rows[r, c])
    return f, i


# Columns of the kernels' rows (the dtype field order of each family's output).
_A = {name: k for k, name in enumerate(activity.EPOCH_DTYPE.names)}
_W = {name: k for k, name in enumerate(activity.NONWEAR_DTYPE.names)}
_S = {name: k for k, name in enumerate(steps.MINUTE_DTYPE.names)}
_H = {name: k for k, name in enumerate(heart.EPOCH_DTYPE.names)}
_R = {name: k for k, name in enumerate(heart.RESTING_DTYPE.names)}
_ACTIVITY = _Layout(
    "activity",
    30,
    (
        ("enmo_mg", _A["enmo_mg"], 2),
        ("mad_mg", _A["mad_mg"], 2),
        ("counts", _A["counts_vm"], 1),
        ("counts_vm_1s_sum", _A["counts_vm_1s_sum"], sleep.INPUT_DIGITS),
        ("counts_x", _A["counts_x"], None),
        ("counts_y", _A["counts_y"], None),
        ("counts_z", _A["counts_z"], None),
        ("z_angle_deg", _A["z_angle_deg"], 2),
        ("angle_changes", _A["angle_changes"], None),
        ("n_samples", _A["n_samples"], None),
    ),
)
_WEAR = _Layout("wear", 900, (("nonwear", _W["nonwear"], None), ("n_samples", _W["n_samples"], None)))
_STEPS = _Layout(
    "steps",
    60,
    (
        ("steps", _S["steps"], 2),
        ("cadence_spm", _S["cadence_spm"], 1),
        ("walk_s", _S["walk_s"], None),
        ("run_s", _S["run_s"], None),
        ("data_s", _S["data_s"], None),
    ),
)
_HEART = _Layout(
    "heart",
    30,
    (
        ("hr_mean_bpm", _H["hr_mean_bpm"], 1),
        ("hr_min_bpm", _H["hr_min_bpm"], None),
        ("hr_max_bpm", _H["hr_max_bpm"], None),
        ("hr_n", _H["hr_n"], None),
        ("rr_kept", _H["rr_kept"], None),
        ("rr_rejected", _H["rr_rejected"], None),
        ("mean_nn_ms", _H["mean_nn_ms"], 1),
        ("sdnn_ms", _H["sdnn_ms"], 2),
        ("rmssd_ms", _H["rmssd_ms"], 2),
    ),
)
_DAY = _Layout(
    "day", 86_400, (("resting_hr_bpm", _R["resting_hr_bpm"], 1), ("resting_epochs", _R["n_epochs"], None))
)


def _starts(rows: np.ndarray) -> list:
    return rows[:, 0].astype(np.int64).tolist()


def _step_records(device: str, minutes: np.ndarray) -> list[dict]:
    starts = (minutes[:, 0].astype(np.int64) * 60_000_000).tolist()  # the kernel's rows hold the minute
    return _STEPS.records(device, starts, _STEPS.columns(minutes))


def _activity_records(device: str, epochs: np.ndarray, nonwear: np.ndarray) -> list[dict]:
    return _ACTIVITY.records(device, _starts(epochs), _ACTIVITY.columns(epochs)) + _WEAR.records(
        device, _starts(nonwear), _WEAR.columns(nonwear)
    )


def _heart_records(device: str, epochs: np.ndarray, resting: np.ndarray) -> list[dict]:
    columns = _HEART.columns(epochs)
    no_reading = (epochs[:, _H["hr_n"]] == 0).tolist()
    if any(no_reading):  # min and max are 0 there: no value
        for k in (1, 2):
            columns[k] = [None if none else v for v, none in zip(columns[k], no_reading, strict=True)]
    return _HEART.records(device, _starts(epochs), columns) + _DAY.records(
        device, _starts(resting), _DAY.columns(resting)
    )


def _wake_records(device: str, epoch_us: np.ndarray) -> list[dict]:
    """Epochs outside every sleep period: wake, naming no period."""
    return [_record("sleep", device, int(t), 30, {"stage": "wake"}) for t in epoch_us.tolist()]


def _staged_records(device: str, fam: dict, staged: sleep.StagedEpochs) -> list[dict]:
    """Staged epochs of a sleep period: the stage, the calibrated stage probabilities (3 decimals, summing
    to 1) and the period (its start, µs)."""
    first = int(fam["period_us"])
    prob = sleep.stage_probabilities(staged.posterior).tolist()
    return [
        _record(
            "sleep",
            device,
            first + int(k) * 30_000_000,
            30,
            {
                "stage": STAGE_NAMES[int(st)],
                **dict(zip(sleep.PROBABILITY_FIELDS, p, strict=True)),
                "period": first,
            },
        )
        for k, st, p in zip(staged.epoch.tolist(), staged.stage.tolist(), prob, strict=True)
    ]


def _close_period(device: str, fam: dict) -> tuple[list[dict], dict]:
    """End the open sleep period: stage what is pending and summarise it in a `night` record."""
    state = sleep.SleepState(fam["values"].copy())  # checked where it came in (`_checked`)
    staged = sleep.stage_epochs(np.zeros(0), np.zeros(0), np.zeros(0), state, finish=True)
    records = _staged_records(device, fam, staged)
    stages = np.concatenate([fam["stages"], staged.stage.astype(np.int8)])
    start = int(fam["period_us"])
    if stages.size:
        summary = sleep.summarize_night(stages)
        values = {k: round(float(v), 3) for k, v in summary.items() if np.isfinite(v)}
        values["period_start_us"] = start
        values["period_end_us"] = start + int(stages.size) * 30_000_000
        values["kind"] = "main" if stages.size * 30 >= periods.MAIN_PERIOD_S else "nap"
        records.append(_record("night", device, start, int(stages.size) * 30, values))
    return records, dict(fam, period_us=-1, stages=np.zeros(0, np.int8))


def new_sleep_family() -> dict:
    """The `sleep` entry of a device's state: the period detector, and the stager of the open period."""
    return {
        "periods": periods.PeriodState.new().array,
        "values": sleep.SleepState.new().array,
        "period_us": -1,
        "stages": np.zeros(0, np.int8),
    }


def _stage_decided(device: str, fam: dict, decided: periods.DecidedEpochs) -> tuple[list[dict], dict]:
    """Epochs whose period is final: outside a period they are wake; inside, the period's stager
    stages them; a period ends (its `night` record) when the first epoch after it is decided."""
    records: list[dict] = []
    epoch_us = decided.time.astype(np.int64)
    period = decided.period.astype(np.int64)  # NO_PERIOD is -1
    i = 0
    while i < epoch_us.size:
        p = int(period[i])
        j = i + 1
        while j < epoch_us.size and period[j] == p:
            j += 1
        if int(fam["period_us"]) >= 0 and int(fam["period_us"]) != p:
            closed, fam = _close_period(device, fam)
            records += closed
        if p < 0:
            records += _wake_records(device, epoch_us[i:j])
        else:
            if int(fam["period_us"]) < 0:
                fam = dict(fam, values=sleep.SleepState.new().array, period_us=p, stages=np.zeros(0, np.int8))
            state = sleep.SleepState(fam["values"].copy())  # checked where it came in, or new
            time_s = (epoch_us[i:j] - p) / 1e6 + 30.0
            staged = sleep.stage_epochs(time_s, decided.hr_bpm[i:j], decided.counts[i:j], state)
            records += _staged_records(device, fam, staged)
            fam = dict(
                fam, values=state.array, stages=np.concatenate([fam["stages"], staged.stage.astype(np.int8)])
            )
        i = j
    return records, fam


def feed_sleep(
    device: str,
    fam: dict | None,
    epoch_us: np.ndarray,
    counts: np.ndarray,
    hr: np.ndarray,
    finish: bool = False,
) -> tuple[list[dict], dict]:
    """Epochs (30-s, consecutive, with counts and heart rate as `sleep.stager_inputs` gives them) through
    the period detector and the stager: a `sleep` record for every epoch once its period is final (wake,
    naming no period, outside every period), a `night` record when a period ends. `finish` ends the data.
    The one path of the raw stream and of `bandgate replay --epochs`."""
    fam = new_sleep_family() if fam is None else fam
    pstate = periods.PeriodState.from_array(fam["periods"])
    decided = periods.detect(epoch_us.astype(np.float64), hr, counts, pstate, finish=finish)
    records, fam = _stage_decided(device, dict(fam, periods=pstate.array), decided)
    if finish and int(fam["period_us"]) >= 0:
        closed, fam = _close_period(device, fam)
        records += closed
    return records, fam


# --- the path -----------------------------------------------------------------------------------------------


def _flush(state: DeviceState) -> tuple[list[dict], DeviceState]:
    """Close every family's open epochs; the stream ends here."""
    device = device_key(state.device_id)
    fam = state.families
    records: list[dict] = []
    if "activity" in fam:
        epochs, nonwear, _, _ = activity.flush_rows(fam["activity"]["ints"], fam["activity"]["floats"])
        records += _activity_records(device, epochs, nonwear)
    if "heart" in fam:
        epochs, resting, _, _ = heart.flush_rows(fam["heart"]["ints"], fam["heart"]["ring"])
        records += _heart_records(device, epochs, resting)
    if "steps" in fam:
        _, minutes, _, _ = steps.flush_rows(fam["steps"]["values"])
        records += _step_records(device, minutes)
    if "sleep" in fam:
        records += feed_sleep(
            device, fam["sleep"], np.zeros(0, np.int64), np.zeros(0), np.zeros(0), finish=True
        )[0]
    return records, replace(state, next_us=-1, families={})


# The kernels (state entries) each record family needs: its own, and the inputs it is computed from
# (sleep stages from activity counts and heart rate; resting heart rate from inactive epochs).
_NEEDS = {
    "activity": ("activity",),
    "wear": ("activity",),
    "steps": ("steps",),
    "heart": ("heart",),
    "day": ("heart", "activity"),
    "sleep": ("sleep", "activity", "heart"),
    "night": ("sleep", "activity", "heart"),
    "distance": ("steps",),
}
ALL_FAMILIES = frozenset(FAMILIES)
# Kernels whose state no other kernel's output is combined with (every record family needing one needs
# it alone): a damaged state of one can restart alone while the others' streams go on.
SELF_CONTAINED = frozenset(
    k for needs in _NEEDS.values() for k in needs if all(n == (k,) for n in _NEEDS.values() if k in n)
)


def kernels_for(families: frozenset[str]) -> frozenset[str]:
    """The state entries `process` keeps for `families` (consent): nothing else is computed or kept."""
    return frozenset(k for f in families for k in _NEEDS[f])


def _open_kernels(run: _Run, kernels: frozenset[str]) -> dict[str, dict]:
    """New states, at the run's first sample, for each of `kernels` that supports the run's format."""
    families: dict[str, dict] = {}
    rate_hz = run.sample_rate_mhz / 1000
    whole = rate_hz == int(rate_hz)
    if "activity" in kernels and whole and int(rate_hz) in activity.SAMPLE_RATES_HZ:
        families["activity"] = activity.new_activity_state(
            int(rate_hz), run.start_us, range_g=run.accel_range_g, bits=run.accel_bits
        ).to_arrays()
    if "steps" in kernels and whole and int(rate_hz) % steps.FS_DEC == 0 and 0 < rate_hz <= 8 * steps.FS_DEC:
        g_per_count = 2.0 * run.accel_range_g / 2**run.accel_bits
        families["steps"] = {"values": steps.new_state(int(rate_hz), run.start_us, g_per_count).to_array()}
    if "heart" in kernels:
        families["heart"] = heart.new_heart_state(run.start_us, run.utc_offset_min).to_arrays()
    return families


def _open(state: DeviceState, run: _Run, kernels: frozenset[str]) -> DeviceState:
    """Start every kernel of `kernels` that supports the run's format at the run's first sample."""
    return replace(
        state,
        next_us=run.start_us,
        sample_rate_mhz=run.sample_rate_mhz,
        accel_range_g=run.accel_range_g,
        accel_bits=run.accel_bits,
        utc_offset_min=run.utc_offset_min,
        families=_open_kernels(run, kernels),
    )


def _consented(fam: dict[str, dict], run: _Run, kernels: frozenset[str]) -> dict[str, dict]:
    """`fam` with the kernels consent no longer needs dropped (their arrays leave the state now) and the
    ones it newly needs started at this run's first sample."""
    keep = {k: v for k, v in fam.items() if k in kernels or (k == "hr_buffer" and "sleep" in kernels)}
    missing = kernels - keep.keys() - {"sleep"}  # the period detector starts with the first epoch
    if missing:
        keep.update(_open_kernels(run, frozenset(missing)))
    return keep


def distance_records(steps_records: list[dict], stride_m: float, profile_version: int) -> list[dict]:
    """A `distance` record per `steps` record: steps × stride (from the owner's height), naming the profile
    version the stride came from, so a corrected profile shows in the records computed after it."""
    out = []
    for r in steps_records:
        steps_ = r["values"]["steps"]
        values = {
            "distance_m": round(steps_ * stride_m, 2),
            "stride_m": stride_m,
            "profile_version": profile_version,
        }
        out.append(_record("distance", r["device"], r["start_us"], r["duration_s"], values))
    return out


def process(
    decoded: DecodedBatch,
    state: DeviceState,
    families: frozenset[str] = ALL_FAMILIES,
    *,
    stride_m: float = 0.0,
    profile_version: int = 0,
) -> tuple[list[dict], DeviceState]:
    """Feature records of `families` that the good frames of `decoded` complete, and the device's new
    state.

    `families` is what the device's owner consents to now: only the kernels those families need run
    (`kernels_for`), the state keeps only theirs, and records of other families are never returned
    (an input another family needs, such as activity for sleep, is computed and dropped). A family
    consented again later starts afresh at the next batch. `distance` records come with a stride (from
    the owner's height, `stride_m` > 0) and name `profile_version`. `state` is not modified: a batch
    that fails later (say, the store refuses it) can be processed again from the same state.
    """
    device = device_key(state.device_id)
    kernels = kernels_for(families)
    records: list[dict] = []
    for run in _runs(decoded):
        if not _same_stream(state, run):
            flushed, state = _flush(state)
            records += flushed
            state = _open(state, run, kernels)
        fam = _consented(state.families, run, kernels)
        inactive = np.zeros(0, np.int64)
        act_epochs = None
        hr_epochs = None
        if "activity" in fam:
            a = fam["activity"]
            act_epochs, nonwear, ints, floats = activity.advance_rows(
                run.x, run.y, run.z, a["ints"], a["floats"]
            )
            fam["activity"] = {"version": a["version"], "ints": ints, "floats": floats}
            records += _activity_records(device, act_epochs, nonwear)
            calm = (act_epochs[:, _A["enmo_mg"]].astype(np.float32) < INACTIVE_ENMO_MG) & (
                act_epochs[:, _A["n_samples"]] > 0
            )
            inactive = act_epochs[calm, 0].astype(np.int64)
        if "heart" in fam:
            h = fam["heart"]
            hr_epochs, resting, ints, ring = heart.advance_rows(
                run.hr_bpm, run.start_us, run.rr_ms, run.rr_end_us, inactive, run.end_us, h["ints"], h["ring"]
            )
            fam["heart"] = {"version": h["version"], "ints": ints, "ring": ring}
            records += _heart_records(device, hr_epochs, resting)
        # Heart closes an epoch once the data covers its end; activity can close the same epoch one call
        # later. Heart rates wait in the state until activity brings their epoch, so the join does not
        # depend on where batches end; at a rate the activity kernel does not take, nothing would ever
        # take them out (the state grew by 2,880 a day until it no longer loaded), so none wait.
        buffer = fam.get("hr_buffer", {"epoch_us": np.zeros(0, np.int64), "hr": np.zeros(0)})
        if "sleep" in kernels and "activity" in fam and hr_epochs is not None and hr_epochs.size:
            buffer = {
                "epoch_us": np.concatenate([buffer["epoch_us"], hr_epochs[:, 0].astype(np.int64)]),
                "hr": np.concatenate(
                    [buffer["hr"], hr_epochs[:, _H["hr_mean_bpm"]].astype(np.float32).astype(np.float64)]
                ),
            }
        if "sleep" in kernels and act_epochs is not None and act_epochs.size:
            epoch_us = act_epochs[:, 0].astype(np.int64)
            hr, done = _join_hr(buffer["epoch_us"], buffer["hr"], epoch_us)
            buffer = {"epoch_us": buffer["epoch_us"][done:], "hr": buffer["hr"][done:]}
            hr, counts = sleep.stager_inputs(hr, act_epochs[:, _A[sleep.COUNTS_FIELD]])
            staged, fam["sleep"] = feed_sleep(device, fam.get("sleep"), epoch_us, counts, hr)
            records += staged
        if "sleep" in kernels:
            fam["hr_buffer"] = buffer
        if "steps" in fam:
            _, minutes, _, values = steps.advance_rows(run.x, run.y, run.z, fam["steps"]["values"])
            fam["steps"] = {"values": values}
            records += _step_records(device, minutes)
        state = replace(state, next_us=run.end_us, utc_offset_min=run.utc_offset_min, families=fam)
    if "distance" in families and stride_m > 0:
        records += distance_records([r for r in records if r["family"] == "steps"], stride_m, profile_version)
    if families != ALL_FAMILIES:
        records = [r for r in records if r["family"] in families]
    return records, state


def finish(state: DeviceState) -> tuple[list[dict], DeviceState]:
    """End of input (replay's last line, a device retired): every family emits what it has pending."""
    return _flush(state)
