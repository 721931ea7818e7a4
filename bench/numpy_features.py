"""The baseline the feature kernels are measured against: the same features in straightforward numpy/scipy.

What a competent engineer would write without Numba: whole-array operations, `scipy.signal` filters,
`sliding_window_view` for the per-second step analysis, `reshape` for epochs. One-shot over a whole
recording (no streaming state), which flatters the baseline: it never pays for batch boundaries.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import signal

from decoder import activity, steps

EPOCH_S = 30


def steps_per_second(accel: np.ndarray, fs: int, g_per_count: float) -> np.ndarray:
    """Steps in each second: magnitude → 25 Hz → band-pass → 4-s autocorrelation gate and cadence."""
    p = steps.DEFAULT_PARAMS
    dec = fs // steps.FS_DEC
    mag = np.sqrt((accel.astype(np.float64) ** 2).sum(axis=1)) * g_per_count
    mag = mag[: mag.size // dec * dec].reshape(-1, dec).mean(axis=1)
    band = signal.sosfilt(steps.filter_sos(p), mag)
    win = p.window_s * steps.FS_DEC
    if band.size < win:
        return np.zeros(band.size // steps.FS_DEC)
    windows = sliding_window_view(band, win)[:: steps.FS_DEC]
    windows = windows - windows.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(windows, n=2 * win, axis=1)
    acf = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :win]
    energy = acf[:, :1]
    lo, hi = round(p.min_lag_s * steps.FS_DEC), round(p.max_lag_s * steps.FS_DEC)
    r = acf[:, lo:hi] / np.maximum(energy, 1e-12)
    lag = lo + r.argmax(axis=1)
    peak = r.max(axis=1)
    cadence = steps.FS_DEC / lag
    cadence = np.where(cadence < p.stride_max_hz, 2 * cadence, cadence)
    gait = (np.sqrt(energy[:, 0] / win) >= p.min_rms_g) & (peak >= p.min_periodicity)
    gait &= (cadence >= p.min_cadence_hz) & (cadence <= p.max_cadence_hz)
    return np.where(gait, cadence, 0.0)


def activity_epochs(accel: np.ndarray, fs: int, g_per_count: float) -> dict[str, np.ndarray]:
    """ENMO, MAD, ActiGraph counts (agcounts' filter and steps, in scipy) and arm angle per 30-s epoch."""
    g = accel.astype(np.float64) * g_per_count
    n_epochs = g.shape[0] // (fs * EPOCH_S)
    ge = g[: n_epochs * fs * EPOCH_S].reshape(n_epochs, fs * EPOCH_S, 3)
    mag = np.sqrt((ge**2).sum(axis=2))
    enmo = np.maximum(mag - 1.0, 0).mean(axis=1) * 1000
    mad = np.abs(mag - mag.mean(axis=1, keepdims=True)).mean(axis=1) * 1000
    up, down = activity.resample_factors(fs)
    g30 = signal.resample_poly(g, up, down, axis=0)
    filtered = signal.lfilter(activity.BPF_B, activity.BPF_A, g30, axis=0) * activity.COUNTS_SCALE
    rect = np.abs(filtered)
    rect = np.where(rect < activity.COUNTS_MIN, 0, np.minimum(rect, activity.COUNTS_MAX))
    ten_hz = rect[: rect.shape[0] // 3 * 3].reshape(-1, 3, 3).mean(axis=1)
    per_epoch = ten_hz[: n_epochs * 300].reshape(n_epochs, -1, 3).sum(axis=1).astype(np.int64)
    seconds = g[: n_epochs * fs * EPOCH_S].reshape(-1, fs, 3).mean(axis=1)
    angle = np.degrees(np.arctan2(seconds[:, 2], np.hypot(seconds[:, 0], seconds[:, 1])))
    return {
        "enmo_mg": enmo,
        "mad_mg": mad,
        "counts_vm": np.sqrt((per_epoch.astype(np.float64) ** 2).sum(axis=1)),
        "z_angle_deg": angle.reshape(n_epochs, EPOCH_S).mean(axis=1),
    }


def heart_epochs(hr_bpm: np.ndarray, rr_ms: np.ndarray, rr_end_s: np.ndarray) -> dict[str, np.ndarray]:
    """HR mean/min/max and RMSSD/SDNN of beats in range, per 30-s epoch."""
    n_epochs = hr_bpm.size // EPOCH_S
    hr = hr_bpm[: n_epochs * EPOCH_S].reshape(n_epochs, EPOCH_S).astype(np.float64)
    hr = np.where(hr > 0, hr, np.nan)
    ok = (rr_ms >= 300) & (rr_ms <= 2000)
    rr = rr_ms[ok].astype(np.float64)
    epoch = (rr_end_s[ok] // EPOCH_S).astype(np.int64)
    diff2 = np.where(epoch[1:] == epoch[:-1], np.diff(rr) ** 2, 0.0)
    sums = np.bincount(epoch[1:], diff2, minlength=n_epochs + 1)[:n_epochs]
    pairs = np.bincount(epoch[1:], epoch[1:] == epoch[:-1], minlength=n_epochs + 1)[:n_epochs]
    count = np.bincount(epoch, minlength=n_epochs + 1)[:n_epochs]
    mean = np.bincount(epoch, rr, minlength=n_epochs + 1)[:n_epochs] / np.maximum(count, 1)
    var = np.bincount(epoch, rr**2, minlength=n_epochs + 1)[:n_epochs] / np.maximum(count, 1) - mean**2
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # epochs without readings are NaN, as intended
        return {
            "hr_mean_bpm": np.nanmean(hr, axis=1),
            "hr_min_bpm": np.nanmin(hr, axis=1),
            "hr_max_bpm": np.nanmax(hr, axis=1),
            "rmssd_ms": np.sqrt(sums / pairs),
            "sdnn_ms": np.sqrt(np.maximum(var, 0) * count / np.maximum(count - 1, 1)),
        }


def sleep_wake(counts_per_epoch: np.ndarray) -> np.ndarray:
    """Cole–Kripke (1992) on per-minute counts from 30-s epochs: 1 = asleep."""
    minutes = counts_per_epoch[: counts_per_epoch.size // 2 * 2].reshape(-1, 2).sum(axis=1) / 100.0
    weights = np.array([106, 54, 58, 76, 230, 74, 67], dtype=np.float64)  # a_-4 … a_+2
    score = 0.001 * np.convolve(minutes, weights[::-1], mode="same")
    return (score < 1).astype(np.int8)


def all_features(
    accel: np.ndarray, fs: int, hr_bpm: np.ndarray, rr_ms: np.ndarray, rr_end_s: np.ndarray
) -> dict:
    """Every family of a recording, one shot."""
    g_per_count = 16.0 / 4096
    act = activity_epochs(accel, fs, g_per_count)
    return {
        "steps": steps_per_second(accel, fs, g_per_count),
        "activity": act,
        "heart": heart_epochs(hr_bpm, rr_ms, rr_end_s),
        "sleep": sleep_wake(act["counts_vm"]),
    }
