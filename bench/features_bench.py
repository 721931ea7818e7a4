"""Feature figures for `python -m bench`: the feature path on a simulated day beside its baselines.

Baselines, all on the same simulated day and in the same run: the same features in numpy/scipy
(bench/numpy_features.py), scikit-digital-health's activity and sleep pipelines, and agcounts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from bench import numpy_features
from decoder import activity, heart, steps
from decoder.features import DeviceState, process
from decoder.frames import decode_frames, encode_container, encode_frame
from gateway.simulator import simulate_band
from gateway.simulator.recorder import recording_frames

G_PER_COUNT = 16.0 / 4096


def _day(minutes: float):
    return simulate_band(20261125, minutes, scenario="mixed")


def _decoded_batches(rec, batch_minutes: int = 10) -> list:
    frames = recording_frames(rec)
    return [
        decode_frames(encode_container(encode_frame(f) for f in frames[i : i + batch_minutes]))
        for i in range(0, len(frames), batch_minutes)
    ]


def feature_figures(best_seconds: Callable[..., float], quick: bool) -> dict[str, float]:
    rounds, min_s = (2, 0.1) if quick else (5, 0.5)
    rec = _day(24 * 60)  # the same day in both modes: a shorter slice has no night, which skews skdh
    n = rec.accel.shape[0]
    fs = rec.sample_rate_hz
    batches = _decoded_batches(rec)

    def ours() -> None:
        state = DeviceState(rec.device_id)
        for d in batches:
            _, state = process(d, state)

    ours()  # compile or load the cache
    t_ours = best_seconds(ours, rounds=rounds, min_round_s=min_s)
    rr_end_s = (rec.rr_end_us - rec.start_us) / 1e6

    def baseline() -> None:
        numpy_features.all_features(rec.accel, fs, rec.hr_bpm, rec.rr_ms, rr_end_s)

    # Warmed, and the best of at least 3, as ours is: its first calls fault in fresh memory for a day's
    # temporaries (measured 1.2-1.3 s a call, then 0.63 s once the allocator reuses it), and a single
    # cold call made the ratio read 10-12x in --quick against 4.3-4.5x in a full run.
    baseline()
    t_numpy = best_seconds(baseline, rounds=max(3, rounds - 1), min_round_s=min_s)
    x, y, z = (np.ascontiguousarray(rec.accel[:, k]) for k in range(3))
    families = {
        "steps": lambda: steps.steps_of_recording(rec.accel, fs, rec.start_us),
        "activity": lambda: activity.activity_of_recording(x, y, z, fs, rec.start_us),
        "heart": lambda: heart.heart_of_recording(
            rec.hr_bpm, rec.start_us, rec.rr_ms, rec.rr_end_us, rec.utc_offset_min
        ),
    }
    out: dict[str, float] = {
        "features_samples_per_s": n / t_ours,
        "numpy_features_samples_per_s": n / t_numpy,
        "features_vs_numpy": t_numpy / t_ours,
    }
    for name, fn in families.items():
        fn()
        out[f"{name}_samples_per_s"] = n / best_seconds(fn, rounds=rounds, min_round_s=min_s)
    out.update(_agcounts_figures(rec, best_seconds, quick))
    out.update(_skdh_figures(rec, t_ours, best_seconds))
    return out


def _agcounts_figures(rec, best_seconds: Callable[..., float], quick: bool) -> dict[str, float]:
    """Counts alone: our activity kernel against agcounts on the same hour of signal."""
    try:
        from agcounts.extract import get_counts
    except ImportError:
        return {}
    hour = rec.accel[: 3600 * rec.sample_rate_hz]
    g = hour.astype(np.float64) * G_PER_COUNT
    x, y, z = (np.ascontiguousarray(hour[:, k]) for k in range(3))
    ours = best_seconds(
        lambda: activity.activity_of_recording(x, y, z, rec.sample_rate_hz, rec.start_us),
        rounds=3,
        min_round_s=0.1,
    )
    theirs = best_seconds(lambda: get_counts(g, freq=rec.sample_rate_hz, epoch=30), rounds=1, min_round_s=0.0)
    return {"agcounts_samples_per_s": hour.shape[0] / theirs, "counts_vs_agcounts": theirs / ours}


def _skdh_figures(rec, t_ours: float, best_seconds: Callable[..., float]) -> dict[str, float]:
    """scikit-digital-health's activity and sleep pipelines on the same day (the `peers` extra)."""
    try:
        import skdh
    except ImportError:
        return {}
    n = rec.accel.shape[0]
    time_s = rec.start_us / 1e6 + np.arange(n) / rec.sample_rate_hz
    g = rec.accel.astype(np.float64) * G_PER_COUNT

    def run() -> None:
        pipeline = skdh.Pipeline()
        pipeline.add(skdh.preprocessing.GetDayWindowIndices(bases=[0], periods=[24]))
        pipeline.add(skdh.activity.ActivityLevelClassification(day_window=(0, 24)))
        pipeline.add(skdh.sleep.Sleep(min_day_hours=1, day_window=(0, 24)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline.run(time=time_s, accel=g, fs=rec.sample_rate_hz, tz_name="UTC")

    t_skdh = best_seconds(run, rounds=1, min_round_s=0.0)
    return {"skdh_samples_per_s": n / t_skdh, "features_vs_skdh": t_skdh / t_ours}
