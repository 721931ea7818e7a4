"""Benchmark inputs: the real wrist recordings as a band would send them, or simulated bands without them.

Reads `$BANDGATE_DATA/steps` (default ../shared/data); resamples each recording to the band's rate and
quantises it like the reference band (±8 g, 12 or 16 bits), then frames it in one-minute frames.
"""

from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from decoder.frames import Frame, encode_container, encode_frame

REPO = Path(__file__).resolve().parents[1]
START_US = 1_767_225_600_000_000


def data_dir() -> Path:
    """The shared data folder: $BANDGATE_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("BANDGATE_DATA", REPO.parent / "shared" / "data"))


@dataclass(frozen=True)
class Recording:
    name: str
    time_s: np.ndarray  # float64, from 0
    accel_g: np.ndarray  # (n, 3) float64


def load_recordings(root: Path | None = None) -> list[Recording]:
    """OxWalk P30 and the three Clemson P15 walks, or [] when the files are absent."""
    steps = (root or data_dir()) / "steps"
    ox, cl = steps / "oxwalk_p30_wrist100hz.csv.gz", steps / "clemson_p15_wrist15hz.csv.gz"
    if not (ox.exists() and cl.exists()):
        return []
    out = []
    with gzip.open(ox, "rt") as f:
        a = np.loadtxt(f, delimiter=",", skiprows=1, usecols=(1, 2, 3))
    out.append(Recording("oxwalk_p30", np.arange(len(a)) / 100.0, a))
    with gzip.open(cl, "rt") as f:
        rows = list(csv.DictReader(f))
    for walk in ("regular", "semiregular", "irregular"):
        sel = [r for r in rows if r["cat_activity"] == f"walk_{walk}"]
        t = np.array([float(r["tm_dttm"]) for r in sel])
        a = np.array([[float(r["X"]), float(r["Y"]), float(r["Z"])] for r in sel])
        out.append(Recording(f"clemson_p15_{walk}", t - t[0], a))
    return out


def as_band(rec: Recording, *, rate_hz: int = 50, bits: int = 12, range_g: int = 8) -> np.ndarray:
    """Resample linearly to the band's rate and quantise to its counts."""
    t = np.arange(0.0, rec.time_s[-1], 1.0 / rate_hz)
    g = np.stack([np.interp(t, rec.time_s, rec.accel_g[:, k]) for k in range(3)], axis=1)
    lsb = 2.0 * range_g / 2**bits
    return np.clip(np.round(g / lsb), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int16)


def minute_frames(
    accel: np.ndarray, *, rate_hz: int = 50, seconds: int = 60, bits: int = 12, device_id: int = 1
) -> list[Frame]:
    """Consecutive frames of `seconds` each (the last may be shorter)."""
    n = rate_hz * seconds
    return [
        Frame(
            device_id=device_id,
            boot_id=1,
            seq=i,
            start_us=START_US + i * seconds * 1_000_000,
            accel=accel[a : a + n],
            hr_bpm=np.full(seconds, 70, np.uint8),
            sample_rate_mhz=rate_hz * 1000,
            accel_bits=bits,
        )
        for i, a in enumerate(range(0, accel.shape[0], n))
    ]


def band_accel(*, bits: int = 12, rate_hz: int = 50) -> tuple[str, list[np.ndarray]]:
    """(corpus name, per-recording counts): real recordings when present, else simulated bands."""
    recs = load_recordings()
    if recs:
        return "real", [as_band(r, rate_hz=rate_hz, bits=bits) for r in recs]
    from gateway.simulator import simulate_band

    return "simulated", [
        simulate_band(s, 30, accel_bits=bits, sample_rate_hz=rate_hz).accel for s in range(4)
    ]


def containers(
    accel: list[np.ndarray], *, frames_per_batch: int = 10, seconds: int = 60, bits: int = 12
) -> list[bytes]:
    """Decompressed batches: each recording in frames of `seconds`, `frames_per_batch` frames a batch."""
    out = []
    for i, a in enumerate(accel):
        frames = [encode_frame(f) for f in minute_frames(a, seconds=seconds, bits=bits, device_id=i + 1)]
        out += [
            encode_container(frames[j : j + frames_per_batch])
            for j in range(0, len(frames), frames_per_batch)
        ]
    return out
