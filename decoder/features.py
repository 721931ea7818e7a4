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

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import msgpack
import numpy as np

from decoder import activity, heart, sleep, steps
from decoder.frames import DecodedBatch

STATE_VERSION = 1
# Every family a record can have (docs/features.md); the store accepts exactly these.
FAMILIES = ("steps", "activity", "heart", "sleep", "night", "wear", "day")
ALGO = {
    "steps": "steps/1",
    "activity": "activity/1",
    "wear": "activity/1",
    "heart": "heart/1",
    "day": "heart/1",
    "sleep": "sleep/1",
    "night": "sleep/1",
}
# An epoch counts as inactive for resting heart rate below this ENMO (Hildebrand 2014's wrist
# sedentary threshold is about 30 mg at 50 Hz).
INACTIVE_ENMO_MG = 30.0
# Nights are staged inside a fixed local window; the stager finds sleep onset within it. A detected
# bed time would serve users with other hours better (docs/features.md says so).
NIGHT_START_LOCAL_H = 21
NIGHT_END_LOCAL_H = 9
STAGE_NAMES = ("wake", "light", "deep", "rem")
_HOUR_US = 3_600_000_000
_DAY_US = 24 * _HOUR_US


def device_key(device_id: int) -> str:
    """How a device is named in records: its 64-bit ID as 16 lower-case hex digits."""
    return f"{device_id:016x}"


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
        """msgpack with a version; each family's arrays as (dtype, raw little-endian bytes)."""
        return msgpack.packb(
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

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceState:
        d = msgpack.unpackb(data)
        if not isinstance(d, dict) or d.get("v") != STATE_VERSION:
            raise ValueError(f"not a device state of version {STATE_VERSION}")
        return cls(
            device_id=d["device_id"],
            next_us=d["next_us"],
            sample_rate_mhz=d["rate"],
            accel_range_g=d["range"],
            accel_bits=d["bits"],
            utc_offset_min=d["utc"],
            families={k: _unpack_arrays(v) for k, v in d["families"].items()},
        )


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
    accel: np.ndarray  # (n, 3) int16
    hr_bpm: np.ndarray  # u8, 1 Hz from start_us (0 = no reading)
    rr_ms: np.ndarray  # u16
    rr_end_us: np.ndarray  # int64, sorted, within [start_us, end_us)


def _runs(d: DecodedBatch) -> Iterator[_Run]:
    """Split the good frames of a batch into contiguous runs (their samples are adjacent in d.x/y/z)."""
    ok = np.flatnonzero(d.ok())
    i = 0
    while i < ok.size:
        j = i
        end = _frame_end(d, ok[i])
        while j + 1 < ok.size and _continues(d, ok[j + 1], end, ok[j], ok[i]):
            j += 1
            end = _frame_end(d, ok[j])
        yield _make_run(d, ok[i : j + 1], end)
        i = j + 1


def _make_run(d: DecodedBatch, frames: np.ndarray, end_us: int) -> _Run:
    f0 = frames[0]
    start_us = int(d.start_us[f0])
    a = int(d.accel_start[f0])
    b = int(d.accel_start[frames[-1]] + d.accel_count[frames[-1]])
    # Heart rate is 1 Hz from each frame's own start: place every frame's readings on the run's grid.
    hr = np.zeros(max((end_us - start_us + 999_999) // 1_000_000, 0), np.uint8)
    rr_parts: list[np.ndarray] = []
    rr_end_parts: list[np.ndarray] = []
    for f in frames:
        offset_s = (int(d.start_us[f]) - start_us) // 1_000_000
        readings = d.hr_bpm[d.hr_start[f] : d.hr_start[f] + d.hr_count[f]][: max(hr.size - offset_s, 0)]
        hr[offset_s : offset_s + readings.size] = readings
        n_rr = int(d.rr_count[f])
        if n_rr:
            rr = d.rr_ms[d.rr_start[f] : d.rr_start[f] + n_rr]
            since_first_ms = np.concatenate([[0], np.cumsum(rr[1:], dtype=np.int64)])
            rr_parts.append(rr)
            rr_end_parts.append(int(d.start_us[f]) + (int(d.rr_first_beat_ms[f]) + since_first_ms) * 1000)
    rr_ms = np.concatenate(rr_parts) if rr_parts else np.zeros(0, np.uint16)
    rr_end = np.concatenate(rr_end_parts) if rr_end_parts else np.zeros(0, np.int64)
    # A beat the band placed outside its frame's window, or out of order, is not trusted.
    keep = (rr_end >= start_us) & (rr_end < end_us)
    keep[1:] &= np.diff(rr_end) >= 0
    return _Run(
        start_us=start_us,
        end_us=end_us,
        sample_rate_mhz=int(d.sample_rate_mhz[f0]),
        accel_range_g=int(d.accel_range_g[f0]),
        accel_bits=int(d.accel_bits[f0]),
        utc_offset_min=int(d.utc_offset_min[f0]),
        accel=np.stack([d.x[a:b], d.y[a:b], d.z[a:b]], axis=1),
        hr_bpm=hr,
        rr_ms=rr_ms[keep],
        rr_end_us=rr_end[keep],
    )


def _frame_end(d: DecodedBatch, f: int) -> int:
    return int(d.start_us[f]) + (int(d.accel_count[f]) * 1_000_000_000) // int(d.sample_rate_mhz[f])


def _continues(d: DecodedBatch, f: int, expected_us: int, previous: int, first: int) -> bool:
    """Frame f picks up exactly where the run ended: same format, no lost samples, within half a sample."""
    half_period_us = 500_000_000 // max(int(d.sample_rate_mhz[first]), 1)
    return (
        int(d.accel_start[f]) == int(d.accel_start[previous] + d.accel_count[previous])
        and int(d.accel_count[f]) > 0
        and int(d.sample_rate_mhz[f]) == int(d.sample_rate_mhz[first])
        and int(d.accel_range_g[f]) == int(d.accel_range_g[first])
        and int(d.accel_bits[f]) == int(d.accel_bits[first])
        and abs(int(d.start_us[f]) - expected_us) <= half_period_us
    )


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


def _column(rows: np.ndarray, name: str, digits: int | None = None) -> list:
    """One field of a structured array as Python numbers (rounded floats; NaN becomes None: no value)."""
    col = rows[name]
    if digits is None:
        return col.tolist()
    values = np.round(col.astype(np.float64), digits)
    return [None if v != v else v for v in values.tolist()]


def _records(family: str, device: str, duration_s: int, starts: list, columns: dict[str, list]) -> list[dict]:
    """Records from columns; a None value is left out of its record."""
    names = list(columns)
    return [
        _record(
            family,
            device,
            start,
            duration_s,
            {k: v for k, v in zip(names, row, strict=True) if v is not None},
        )
        for start, *row in zip(starts, *columns.values(), strict=True)
    ]


def _step_records(device: str, out: steps.StepOutput) -> list[dict]:
    m = out.minutes
    return _records(
        "steps",
        device,
        60,
        m["minute_start_us"].tolist(),
        {
            "steps": _column(m, "steps", 2),
            "cadence_spm": _column(m, "cadence_spm", 1),
            "walk_s": _column(m, "walk_s"),
            "run_s": _column(m, "run_s"),
            "data_s": _column(m, "data_s"),
        },
    )


def _activity_records(device: str, out: activity.ActivityOutput) -> list[dict]:
    e = out.epochs
    b = out.nonwear
    return _records(
        "activity",
        device,
        30,
        e["epoch_start_us"].tolist(),
        {
            "enmo_mg": _column(e, "enmo_mg", 2),
            "mad_mg": _column(e, "mad_mg", 2),
            "counts": _column(e, "counts_vm", 1),
            "counts_x": _column(e, "counts_x"),
            "counts_y": _column(e, "counts_y"),
            "counts_z": _column(e, "counts_z"),
            "z_angle_deg": _column(e, "z_angle_deg", 2),
            "angle_changes": _column(e, "angle_changes"),
            "n_samples": _column(e, "n_samples"),
        },
    ) + _records(
        "wear",
        device,
        900,
        b["block_start_us"].tolist(),
        {"nonwear": _column(b, "nonwear"), "n_samples": _column(b, "n_samples")},
    )


def _heart_records(device: str, out: heart.HeartOutput) -> list[dict]:
    e = out.epochs
    r = out.resting
    any_hr = (e["hr_n"] > 0).tolist()
    return _records(
        "heart",
        device,
        30,
        e["epoch_start_us"].tolist(),
        {
            "hr_mean_bpm": _column(e, "hr_mean_bpm", 1),
            "hr_min_bpm": [v if ok else None for v, ok in zip(_column(e, "hr_min_bpm"), any_hr, strict=True)],
            "hr_max_bpm": [v if ok else None for v, ok in zip(_column(e, "hr_max_bpm"), any_hr, strict=True)],
            "hr_n": _column(e, "hr_n"),
            "rr_kept": _column(e, "rr_kept"),
            "rr_rejected": _column(e, "rr_rejected"),
            "mean_nn_ms": _column(e, "mean_nn_ms", 1),
            "sdnn_ms": _column(e, "sdnn_ms", 2),
            "rmssd_ms": _column(e, "rmssd_ms", 2),
        },
    ) + _records(
        "day",
        device,
        86_400,
        r["day_start_us"].tolist(),
        {"resting_hr_bpm": _column(r, "resting_hr_bpm", 1), "resting_epochs": _column(r, "n_epochs")},
    )


def _night_of(epoch_start_us: int, utc_offset_min: int) -> int:
    """UTC µs when the night window holding this epoch began, or -1 outside every window."""
    local = epoch_start_us + utc_offset_min * 60_000_000
    day = local - local % _DAY_US
    hour = (local - day) // _HOUR_US
    if hour >= NIGHT_START_LOCAL_H:
        start = day + NIGHT_START_LOCAL_H * _HOUR_US
    elif hour < NIGHT_END_LOCAL_H:
        start = day - _DAY_US + NIGHT_START_LOCAL_H * _HOUR_US
    else:
        return -1
    return start - utc_offset_min * 60_000_000


def _sleep_records(device: str, fam: dict, staged: sleep.StagedEpochs) -> list[dict]:
    first = int(fam["first_epoch_us"])
    return [
        _record("sleep", device, first + int(k) * 30_000_000, 30, {"stage": STAGE_NAMES[int(st)]})
        for k, st in zip(staged.epoch.tolist(), staged.stage.tolist(), strict=True)
    ]


def _finish_night(device: str, fam: dict) -> list[dict]:
    """End the open night: stage what is pending and summarise the night."""
    state = sleep.SleepState.from_array(fam["values"].copy())
    staged = sleep.stage_epochs(np.zeros(0), np.zeros(0), np.zeros(0), state, finish=True)
    records = _sleep_records(device, fam, staged)
    stages = np.concatenate([fam["stages"], staged.stage.astype(np.int8)])
    if stages.size:
        summary = sleep.summarize_night(stages)
        values = {k: round(float(v), 3) for k, v in summary.items() if np.isfinite(v)}
        records.append(_record("night", device, int(fam["first_epoch_us"]), int(stages.size) * 30, values))
    return records


def _feed_sleep(
    device: str,
    fam: dict | None,
    utc_offset_min: int,
    epoch_us: np.ndarray,
    counts: np.ndarray,
    hr: np.ndarray,
) -> tuple[list[dict], dict | None]:
    """Epochs (with counts and heart rate) into the night they belong to; nights end at their window's end."""
    records: list[dict] = []
    i = 0
    while i < epoch_us.size:
        night = _night_of(int(epoch_us[i]), utc_offset_min)
        if fam is not None and int(fam["night_us"]) != night:
            records += _finish_night(device, fam)
            fam = None
        j = i
        while j < epoch_us.size and _night_of(int(epoch_us[j]), utc_offset_min) == night:
            j += 1
        if night >= 0:
            if fam is None:
                fam = {
                    "values": sleep.SleepState.new().array,
                    "night_us": night,
                    "first_epoch_us": int(epoch_us[i]),
                    "stages": np.zeros(0, np.int8),
                }
            state = sleep.SleepState.from_array(fam["values"].copy())
            time_s = (epoch_us[i:j] - fam["first_epoch_us"]) / 1e6 + 30.0
            staged = sleep.stage_epochs(time_s, hr[i:j], counts[i:j], state)
            records += _sleep_records(device, fam, staged)
            fam = dict(
                fam, values=state.array, stages=np.concatenate([fam["stages"], staged.stage.astype(np.int8)])
            )
        i = j
    return records, fam


# --- the path -----------------------------------------------------------------------------------------------


def _flush(state: DeviceState) -> tuple[list[dict], DeviceState]:
    """Close every family's open epochs; the stream ends here."""
    device = device_key(state.device_id)
    fam = state.families
    records: list[dict] = []
    if "activity" in fam:
        out, _ = activity.activity_flush(activity.ActivityState.from_arrays(fam["activity"]))
        records += _activity_records(device, out)
    if "heart" in fam:
        out, _ = heart.heart_flush(heart.HeartState.from_arrays(fam["heart"]))
        records += _heart_records(device, out)
    if "steps" in fam:
        out, _ = steps.flush_steps(steps.StepState.from_array(fam["steps"]["values"]))
        records += _step_records(device, out)
    if "sleep" in fam:
        records += _finish_night(device, fam["sleep"])
    return records, replace(state, next_us=-1, families={})


def _open(state: DeviceState, run: _Run) -> DeviceState:
    """Start every family that supports the run's format at the run's first sample."""
    families: dict[str, dict] = {}
    rate_hz = run.sample_rate_mhz / 1000
    if rate_hz == int(rate_hz) and int(rate_hz) in activity.SAMPLE_RATES_HZ:
        families["activity"] = activity.new_activity_state(
            int(rate_hz), run.start_us, range_g=run.accel_range_g, bits=run.accel_bits
        ).to_arrays()
    if rate_hz == int(rate_hz) and int(rate_hz) % steps.FS_DEC == 0 and rate_hz <= 8 * steps.FS_DEC:
        g_per_count = 2.0 * run.accel_range_g / 2**run.accel_bits
        families["steps"] = {"values": steps.new_state(int(rate_hz), run.start_us, g_per_count).to_array()}
    families["heart"] = heart.new_heart_state(run.start_us, run.utc_offset_min).to_arrays()
    return replace(
        state,
        next_us=run.start_us,
        sample_rate_mhz=run.sample_rate_mhz,
        accel_range_g=run.accel_range_g,
        accel_bits=run.accel_bits,
        utc_offset_min=run.utc_offset_min,
        families=families,
    )


def process(decoded: DecodedBatch, state: DeviceState) -> tuple[list[dict], DeviceState]:
    """Feature records that the good frames of `decoded` complete, and the device's new state.

    `state` is not modified: a batch that fails later (say, the store refuses it) can be processed
    again from the same state.
    """
    device = device_key(state.device_id)
    records: list[dict] = []
    for run in _runs(decoded):
        if not _same_stream(state, run):
            flushed, state = _flush(state)
            records += flushed
            state = _open(state, run)
        fam = dict(state.families)
        inactive = np.zeros(0, np.int64)
        act_epochs = None
        hr_epochs = None
        if "activity" in fam:
            x, y, z = run.accel[:, 0], run.accel[:, 1], run.accel[:, 2]
            out, st = activity.activity_epochs(x, y, z, activity.ActivityState.from_arrays(fam["activity"]))
            fam["activity"] = st.to_arrays()
            records += _activity_records(device, out)
            calm = (out.epochs["enmo_mg"] < INACTIVE_ENMO_MG) & (out.epochs["n_samples"] > 0)
            inactive = out.epochs["epoch_start_us"][calm]
            act_epochs = out.epochs
        if "heart" in fam:
            out, st = heart.heart_epochs(
                run.hr_bpm,
                run.start_us,
                run.rr_ms,
                run.rr_end_us,
                heart.HeartState.from_arrays(fam["heart"]),
                until_us=run.end_us,
                inactive_epoch_us=inactive,
            )
            fam["heart"] = st.to_arrays()
            records += _heart_records(device, out)
            hr_epochs = out.epochs
        # Heart closes an epoch once the data covers its end; activity can close the same epoch one call
        # later. Heart rates wait in the state until activity brings their epoch, so the join does not
        # depend on where batches end.
        buffer = fam.get("hr_buffer", {"epoch_us": np.zeros(0, np.int64), "hr": np.zeros(0)})
        if hr_epochs is not None and hr_epochs.size:
            buffer = {
                "epoch_us": np.concatenate([buffer["epoch_us"], hr_epochs["epoch_start_us"]]),
                "hr": np.concatenate([buffer["hr"], hr_epochs["hr_mean_bpm"].astype(np.float64)]),
            }
        if act_epochs is not None and act_epochs.size:
            epoch_us = act_epochs["epoch_start_us"]
            hr = np.full(epoch_us.size, np.nan)
            at = np.searchsorted(buffer["epoch_us"], epoch_us)
            found = at < buffer["epoch_us"].size
            found[found] = buffer["epoch_us"][at[found]] == epoch_us[found]
            hr[found] = buffer["hr"][at[found]]
            keep = buffer["epoch_us"] > epoch_us[-1]
            buffer = {"epoch_us": buffer["epoch_us"][keep], "hr": buffer["hr"][keep]}
            staged, night = _feed_sleep(
                device,
                fam.get("sleep"),
                run.utc_offset_min,
                epoch_us,
                act_epochs["counts_vm"].astype(np.float64),
                hr,
            )
            records += staged
            if night is None:
                fam.pop("sleep", None)
            else:
                fam["sleep"] = night
        fam["hr_buffer"] = buffer
        if "steps" in fam:
            out, st = steps.count_steps(run.accel, steps.StepState.from_array(fam["steps"]["values"]))
            fam["steps"] = {"values": st.to_array()}
            records += _step_records(device, out)
        state = replace(state, next_us=run.end_us, utc_offset_min=run.utc_offset_min, families=fam)
    return records, state


def finish(state: DeviceState) -> tuple[list[dict], DeviceState]:
    """End of input (replay's last line, a device retired): every family emits what it has pending."""
    return _flush(state)
