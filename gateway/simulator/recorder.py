"""Simulated bands as a band would ship them: frames, batches, and a batch file with ground truth."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bandgate.v1 import batch_pb2
from decoder.frames import Frame, split_frames
from gateway.batchfile import truth_path, write_batches
from gateway.envelope import build_batch
from gateway.simulator.signals import BandRecording, simulate_band


def band_seed(seed: int, band: int) -> int:
    """Independent, reproducible seed of band `band` in a fleet simulated with `seed`."""
    return int(np.random.SeedSequence([seed, band]).generate_state(1, np.uint32)[0])


def band_device_id(seed: int, band: int) -> int:
    """A 64-bit device ID that differs between bands and between fleets."""
    return int(np.random.SeedSequence([seed, band, 1]).generate_state(1, np.uint64)[0])


def recording_frames(rec: BandRecording, *, boot_id: int = 1, frame_seconds: int = 60) -> list[Frame]:
    """A recording as the band frames it: `frame_seconds` each, sequence numbers from 0."""
    return split_frames(
        rec.accel,
        frame_samples=frame_seconds * rec.sample_rate_hz,
        hr_bpm=rec.hr_bpm,
        rr_ms=rec.rr_ms,
        rr_end_us=rec.rr_end_us,
        device_id=rec.device_id,
        boot_id=boot_id,
        first_seq=0,
        start_us=rec.start_us,
        sample_rate_hz=rec.sample_rate_hz,
        accel_bits=rec.accel_bits,
        accel_range_g=rec.accel_range_g,
        utc_offset_min=rec.utc_offset_min,
    )


def recording_batches(
    rec: BandRecording, *, boot_id: int = 1, frame_seconds: int = 60, batch_frames: int = 10
) -> Iterator[batch_pb2.Batch]:
    """Cut a recording into frames of `frame_seconds` and batches of `batch_frames` frames, in order."""
    frames = recording_frames(rec, boot_id=boot_id, frame_seconds=frame_seconds)
    for i in range(0, len(frames), batch_frames):
        yield build_batch(frames[i : i + batch_frames])


def fleet_batches(
    *,
    bands: int,
    minutes: float,
    seed: int = 0,
    scenario: str = "mixed",
    sample_rate_hz: int = 50,
    frame_seconds: int = 60,
    batch_minutes: int = 10,
) -> Iterator[tuple[BandRecording, list[batch_pb2.Batch]]]:
    """Each band's recording and its batches in order: the same for `simulate --out` and `--target`."""
    for b in range(bands):
        rec = simulate_band(
            band_seed(seed, b),
            minutes,
            device_id=band_device_id(seed, b),
            sample_rate_hz=sample_rate_hz,
            scenario=scenario,
        )
        batches = recording_batches(
            rec, frame_seconds=frame_seconds, batch_frames=max(1, batch_minutes * 60 // frame_seconds)
        )
        yield rec, list(batches)


@dataclass(frozen=True)
class FleetSummary:
    bands: int
    batches: int
    samples: int
    wire_bytes: int


def simulate_to_file(
    out: str | Path,
    *,
    bands: int,
    minutes: float,
    seed: int = 0,
    scenario: str = "mixed",
    sample_rate_hz: int = 50,
    frame_seconds: int = 60,
    batch_minutes: int = 10,
    progress: Callable[[int], None] | None = None,
) -> FleetSummary:
    """Simulate `bands` bands and write their batches, interleaved as a fleet would send them.

    Ground truth goes to `out`.truth.npz: `device_id`, `start_us`, `sample_rate_hz`, and per band `i`
    the arrays `steps_per_s_i`, `stage_per_epoch_i`, `activity_per_s_i`.
    """
    recordings = []
    per_band = []
    for rec, batches in fleet_batches(
        bands=bands,
        minutes=minutes,
        seed=seed,
        scenario=scenario,
        sample_rate_hz=sample_rate_hz,
        frame_seconds=frame_seconds,
        batch_minutes=batch_minutes,
    ):
        recordings.append(rec)
        per_band.append(batches)
        if progress:
            progress(1)
    order = [
        batches[i]
        for i in range(max(map(len, per_band), default=0))
        for batches in per_band
        if i < len(batches)
    ]
    with open(out, "wb") as f:
        write_batches(f, order)
    truth: dict[str, np.ndarray] = {
        "device_id": np.array([r.device_id for r in recordings], np.uint64),
        "start_us": np.array([r.start_us for r in recordings], np.int64),
        "sample_rate_hz": np.array([r.sample_rate_hz for r in recordings], np.int64),
    }
    for i, r in enumerate(recordings):
        truth[f"steps_per_s_{i}"] = r.steps_per_s
        truth[f"stage_per_epoch_{i}"] = r.stage_per_epoch
        truth[f"activity_per_s_{i}"] = r.activity_per_s
    np.savez_compressed(truth_path(out), **truth)
    return FleetSummary(
        bands=bands,
        batches=len(order),
        samples=sum(r.accel.shape[0] for r in recordings),
        wire_bytes=sum(len(b.payload) for b in order),
    )
