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

from decoder import steps
from decoder.frames import DecodedBatch

STATE_VERSION = 1
ALGO = {"steps": "steps/1"}
FAMILIES = ("steps",)


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
    families: dict[str, np.ndarray] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """msgpack with a version, family arrays as raw little-endian float64."""
        return msgpack.packb(
            {
                "v": STATE_VERSION,
                "device_id": self.device_id,
                "next_us": self.next_us,
                "rate": self.sample_rate_mhz,
                "range": self.accel_range_g,
                "bits": self.accel_bits,
                "utc": self.utc_offset_min,
                "families": {k: np.ascontiguousarray(v, "<f8").tobytes() for k, v in self.families.items()},
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
            families={k: np.frombuffer(v, "<f8").copy() for k, v in d["families"].items()},
        )


@dataclass(frozen=True)
class _Run:
    """Consecutive good frames whose samples continue one another."""

    start_us: int
    sample_rate_mhz: int
    accel_range_g: int
    accel_bits: int
    utc_offset_min: int
    accel: np.ndarray  # (n, 3) int16
    end_us: int  # where the sample after the last is expected


def _runs(d: DecodedBatch) -> Iterator[_Run]:
    """Split the good frames of a batch into contiguous runs (their samples are adjacent in d.x/y/z)."""
    ok = np.flatnonzero(d.ok())
    i = 0
    while i < ok.size:
        f0 = ok[i]
        j = i
        end = _frame_end(d, f0)
        while j + 1 < ok.size and _continues(
            d, ok[j + 1], end, d.accel_start[ok[j]] + d.accel_count[ok[j]], f0
        ):
            j += 1
            end = _frame_end(d, ok[j])
        a = int(d.accel_start[f0])
        b = int(d.accel_start[ok[j]] + d.accel_count[ok[j]])
        yield _Run(
            start_us=int(d.start_us[f0]),
            sample_rate_mhz=int(d.sample_rate_mhz[f0]),
            accel_range_g=int(d.accel_range_g[f0]),
            accel_bits=int(d.accel_bits[f0]),
            utc_offset_min=int(d.utc_offset_min[f0]),
            accel=np.stack([d.x[a:b], d.y[a:b], d.z[a:b]], axis=1),
            end_us=end,
        )
        i = j + 1


def _frame_end(d: DecodedBatch, f: int) -> int:
    return int(d.start_us[f]) + (int(d.accel_count[f]) * 1_000_000_000) // int(d.sample_rate_mhz[f])


def _continues(d: DecodedBatch, f: int, expected_us: int, expected_index: int, first: int) -> bool:
    """Frame f picks up exactly where the run ended: same format, no lost samples, within half a sample."""
    half_period_us = 500_000_000 // max(int(d.sample_rate_mhz[first]), 1)
    return (
        int(d.accel_start[f]) == expected_index
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


def _record(family: str, device: str, start_us: int, duration_s: int, values: dict) -> dict:
    return {
        "family": family,
        "device": device,
        "start_us": int(start_us),
        "duration_s": duration_s,
        "algo": ALGO[family],
        "values": values,
    }


def _num(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


def _step_records(device: str, out: steps.StepOutput) -> list[dict]:
    return [
        _record(
            "steps",
            device,
            m["minute_start_us"],
            60,
            {
                "steps": _num(m["steps"], 2),
                "cadence_spm": _num(m["cadence_spm"], 1),
                "walk_s": int(m["walk_s"]),
                "run_s": int(m["run_s"]),
                "data_s": int(m["data_s"]),
            },
        )
        for m in out.minutes
    ]


def _flush(state: DeviceState) -> tuple[list[dict], DeviceState]:
    """Close every family's open epochs; the stream ends here."""
    device = device_key(state.device_id)
    records: list[dict] = []
    if "steps" in state.families:
        out, _ = steps.flush_steps(steps.StepState.from_array(state.families["steps"]))
        records += _step_records(device, out)
    return records, replace(state, next_us=-1, families={})


def _open(state: DeviceState, run: _Run) -> DeviceState:
    g_per_count = 2.0 * run.accel_range_g / 2**run.accel_bits
    families = {}
    rate_hz = run.sample_rate_mhz / 1000
    if rate_hz == int(rate_hz) and int(rate_hz) % steps.FS_DEC == 0 and rate_hz <= 8 * steps.FS_DEC:
        families["steps"] = steps.new_state(int(rate_hz), run.start_us, g_per_count).to_array()
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
        families = dict(state.families)
        if "steps" in families:
            out, st = steps.count_steps(run.accel, steps.StepState.from_array(families["steps"]))
            families["steps"] = st.to_array()
            records += _step_records(device, out)
        state = replace(state, next_us=run.end_us, utc_offset_min=run.utc_offset_min, families=families)
    return records, state


def finish(state: DeviceState) -> tuple[list[dict], DeviceState]:
    """End of input (replay's last line, a device retired): every family emits what it has pending."""
    return _flush(state)
