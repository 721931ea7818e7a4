"""Recordings from elsewhere, made into what a band would send: read, resample, quantise.

`bandgate replay` uses this to put any CSV recording (15 to 500 Hz, in g) through the band encoder, the
decoder and the feature path, so that replay exercises exactly the code the gateway runs.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy import signal

MIN_RATE_HZ = 15.0
MAX_RATE_HZ = 500.0


class RecordingError(ValueError):
    """A recording that cannot be read: says which file and what is wrong (never the values)."""


@dataclass(frozen=True)
class Recording:
    accel_g: np.ndarray  # (n, 3) float64 at rate_hz
    rate_hz: float
    hr_bpm: np.ndarray | None = None  # (n,) float64 at rate_hz, when a heart-rate column was named


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_csv(path: str | Path, rate_hz: float, columns: tuple[str, ...] = ("x", "y", "z")) -> Recording:
    """Read accelerometer (and optionally heart-rate) columns, matched case-insensitively, from CSV(.gz)."""
    path = Path(path)
    if not MIN_RATE_HZ <= rate_hz <= MAX_RATE_HZ:
        raise RecordingError(f"--rate-hz must be within {MIN_RATE_HZ:g}-{MAX_RATE_HZ:g} Hz, got {rate_hz:g}")
    if len(columns) not in (3, 4):
        raise RecordingError("--columns takes x,y,z or x,y,z,hr")
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise RecordingError(f"{path}: empty file")
            index = {name.strip().lower(): i for i, name in enumerate(header)}
            missing = [c for c in columns if c.lower() not in index]
            if missing:
                raise RecordingError(
                    f"{path}: no column named {', '.join(missing)} (have {', '.join(header)})"
                )
            picks = [index[c.lower()] for c in columns]
            rows = []
            for line_no, row in enumerate(reader, start=2):
                try:
                    rows.append([float(row[i]) for i in picks])
                except (ValueError, IndexError):
                    raise RecordingError(
                        f"{path}: line {line_no} has a missing or non-numeric value"
                    ) from None
    except OSError as e:
        raise RecordingError(f"{path}: {e.strerror}") from None
    if not rows:
        raise RecordingError(f"{path}: no samples")
    data = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(data).all():
        raise RecordingError(f"{path}: non-finite values")
    return Recording(data[:, :3], float(rate_hz), data[:, 3] if len(columns) == 4 else None)


def resample(x: np.ndarray, from_hz: float, to_hz: float) -> np.ndarray:
    """Polyphase resampling with an anti-aliasing filter, as a band's sensor front end would sample."""
    if from_hz == to_hz:
        return np.array(x, dtype=np.float64)
    ratio = Fraction(to_hz / from_hz).limit_denominator(1000)
    return signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=0, padtype="line")


def quantise(accel_g: np.ndarray, *, range_g: int = 8, bits: int = 12) -> np.ndarray:
    """g → the band's signed counts, clipped to its range."""
    lsb = 2.0 * range_g / 2**bits
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return np.clip(np.round(accel_g / lsb), lo, hi).astype(np.int16)


def as_band(
    rec: Recording, band_hz: int, *, range_g: int = 8, bits: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    """(accelerometer counts at band_hz, heart rate u8 at 1 Hz) for a recording.

    Heart rate is the mean over each whole second (0 where there is no column or no valid value).
    """
    counts = quantise(resample(rec.accel_g, rec.rate_hz, band_hz), range_g=range_g, bits=bits)
    seconds = counts.shape[0] // band_hz
    hr = np.zeros(seconds, np.uint8)
    if rec.hr_bpm is not None and seconds:
        per_second = round(rec.rate_hz)
        usable = min(seconds, rec.hr_bpm.size // max(per_second, 1))
        if usable:
            block = rec.hr_bpm[: usable * per_second].reshape(usable, per_second).mean(axis=1)
            ok = (block >= 20) & (block <= 250)
            hr[:usable] = np.where(ok, np.round(block), 0).astype(np.uint8)
    return counts, hr
