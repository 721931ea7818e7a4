"""Accuracy and speed of the wrist step detector on real annotated recordings, as a band would see them.

    python -m bench.accuracy_steps [--data DIR] [--json out.json] [--no-speed]

Each recording (OxWalk P30, Clemson P15's three walks; /work/shared/data/README.md) is resampled onto a
uniform 50 Hz and 25 Hz grid from its time stamps, quantised to the band's 12-bit ±8 g counts and run
through `decoder.steps` as one stream. Per recording × band rate: true and detected steps, signed error
(%), and per-second F1 with ±1 s tolerance (a second is positive when it holds a step).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from decoder import steps  # noqa: E402

BAND_RATES_HZ = (50, 25)
BAND_G_PER_COUNT = 16.0 / 4096  # ±8 g, 12 bits
OXWALK = "steps/oxwalk_p30_wrist100hz.csv.gz"
CLEMSON = "steps/clemson_p15_wrist15hz.csv.gz"
CLEMSON_WALKS = ("regular", "semiregular", "irregular")


@dataclass(frozen=True)
class Recording:
    """A recording in g with its annotated step times (s, same clock as `time_s`)."""

    name: str
    time_s: np.ndarray
    xyz_g: np.ndarray
    step_times_s: np.ndarray

    @property
    def start_us(self) -> int:
        return round(float(self.time_s[0]) * 1e6)


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The shared data folder: the argument, else $BANDGATE_DATA, else ../shared/data beside the repo."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("BANDGATE_DATA", ROOT.parent / "shared" / "data"))


def have_data(path: str | os.PathLike | None = None) -> bool:
    d = data_dir(path)
    return (d / OXWALK).is_file() and (d / CLEMSON).is_file()


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with gzip.open(path, "rt") as f:
        header = f.readline().strip().split(",")
        rows = [line.rstrip("\n").split(",") for line in f]
    return header, rows


@functools.lru_cache(maxsize=4)
def load_recordings(path: str | os.PathLike | None = None) -> dict[str, Recording]:
    """OxWalk P30 and the three Clemson P15 walks, keyed `oxwalk_p30`, `clemson_p15_<walk>`."""
    d = data_dir(path)
    recs = {}
    _, rows = _read_csv(d / OXWALK)
    stamp = np.array([r[0].replace(" ", "T") for r in rows], dtype="datetime64[ms]")  # wall clock read as UTC
    t = stamp.astype(np.int64) / 1e3
    xyz = np.array([r[1:4] for r in rows], dtype=np.float64)
    ann = np.array([r[4] for r in rows], dtype=np.float64) > 0
    recs["oxwalk_p30"] = Recording("oxwalk_p30", t, xyz, t[ann])
    header, rows = _read_csv(d / CLEMSON)
    col = {name: i for i, name in enumerate(header)}
    activity = np.array([r[col["cat_activity"]] for r in rows])
    t = np.array([r[col["tm_dttm"]] for r in rows], dtype=np.float64)
    xyz = np.array([[r[col["X"]], r[col["Y"]], r[col["Z"]]] for r in rows], dtype=np.float64)
    step = np.array([r[col["ind_step"]] for r in rows], dtype=np.float64) > 0
    for walk in CLEMSON_WALKS:
        sel = activity == f"walk_{walk}"
        name = f"clemson_p15_{walk}"
        recs[name] = Recording(name, t[sel], xyz[sel], t[sel & step])
    return recs


def to_band(rec: Recording, fs: int) -> np.ndarray:
    """The recording as a band at `fs` would send it: linear resampling, 12-bit ±8 g int16 counts."""
    n = int(np.floor((rec.time_s[-1] - rec.time_s[0]) * fs)) + 1
    grid = rec.time_s[0] + np.arange(n) / fs
    g = np.stack([np.interp(grid, rec.time_s, rec.xyz_g[:, i]) for i in range(3)], axis=1)
    return np.clip(np.round(g / BAND_G_PER_COUNT), -2048, 2047).astype(np.int16)


def second_f1(true_seconds: np.ndarray, detected_seconds: np.ndarray, tolerance_s: int = 1) -> float:
    """F1 of 'this UTC second holds a step', a match allowed within ±`tolerance_s` seconds."""
    t = np.unique(true_seconds)
    p = np.unique(detected_seconds)
    if len(t) == 0 and len(p) == 0:
        return 1.0
    if len(t) == 0 or len(p) == 0:
        return 0.0

    def near(a: np.ndarray, b: np.ndarray) -> int:
        i = np.clip(np.searchsorted(b, a), 1, len(b) - 1) if len(b) > 1 else np.zeros(len(a), int)
        dist = np.minimum(np.abs(b[i] - a), np.abs(b[np.maximum(i - 1, 0)] - a))
        return int(np.sum(dist <= tolerance_s))

    precision = near(p, t) / len(p)
    recall = near(t, p) / len(t)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


NON_WALKING_MARGIN_S = 2  # a second this close to an annotated step may hold it as the detector times it


def non_walking_seconds(true_sec: np.ndarray, seconds: np.ndarray, margin_s: int = NON_WALKING_MARGIN_S):
    """Mask of `seconds` with no annotated step within ±`margin_s` s: annotated non-walking time.

    The annotations mark every step, so the time between them is not walking; the margin keeps a bout's
    first and last step, which the detector may place a second or two off, out of it."""
    steps_at = np.unique(true_sec)
    if steps_at.size == 0:
        return np.ones(seconds.size, bool)
    i = np.clip(np.searchsorted(steps_at, seconds), 1, steps_at.size - 1) if steps_at.size > 1 else 0
    gap = np.minimum(np.abs(steps_at[i] - seconds), np.abs(steps_at[np.maximum(i - 1, 0)] - seconds))
    return gap > margin_s


def score(rec: Recording, fs: int, params: steps.StepParams = steps.DEFAULT_PARAMS) -> dict:
    """True and detected steps, signed error and per-second F1 of one recording at one band rate."""
    out = steps.steps_of_recording(to_band(rec, fs), fs, rec.start_us, params=params)
    detected = float(out.seconds["steps"].sum(dtype=np.float64))
    true = len(rec.step_times_s)
    true_sec = np.floor(rec.start_us / 1e6 + (rec.step_times_s - rec.time_s[0])).astype(np.int64)
    det_sec = out.seconds["second"][out.seconds["steps"] > 0]
    idle = non_walking_seconds(true_sec, out.seconds["second"])
    idle_h = float(idle.sum()) / 3600.0
    idle_steps = float(out.seconds["steps"][idle].sum(dtype=np.float64))
    return {
        "true_steps": true,
        "detected_steps": round(detected, 1),
        "error_pct": round(100.0 * (detected - true) / true, 2),
        "error_steps": round(detected - true, 1),
        "second_f1": round(second_f1(true_sec, det_sec), 3),
        "minutes_steps": round(float(out.minutes["steps"].sum(dtype=np.float64)), 1),
        "bouts": len(out.bouts),
        "non_walking_min": round(60.0 * idle_h, 1),
        "non_walking_steps": round(idle_steps, 1),
        "false_steps_per_hour": round(idle_steps / idle_h, 1) if idle_h > 0 else None,
    }


def evaluate(path: str | os.PathLike | None = None, params: steps.StepParams = steps.DEFAULT_PARAMS) -> dict:
    """`{recording@rate: score}` for every recording at 50 and 25 Hz."""
    recs = load_recordings(str(data_dir(path)))
    return {f"{name}@{fs}": score(rec, fs, params) for name, rec in recs.items() for fs in BAND_RATES_HZ}


def steps_error_pct(results: dict) -> dict:
    """The headline figure the targets check reads: signed step-total error per recording@rate."""
    return {k: v["error_pct"] for k, v in results.items()}


def throughput(seconds: float = 2.0, fs: int = 50, minutes: int = 60, walking_share: float = 2 / 3) -> dict:
    """Samples/s of one stream through `count_steps` on one core: thread CPU time, so that other processes
    on a shared machine do not count; a synthetic day-like signal, walking `walking_share` of each 2 min."""
    rng = np.random.default_rng(0)
    n = minutes * 60 * fs
    t = np.arange(n) / fs
    walking = (t % 120) < 120 * walking_share
    mag = 1.0 + walking * 0.3 * np.sin(2 * np.pi * 1.9 * t) + 0.02 * rng.standard_normal(n)
    xyz = np.clip(np.round(np.stack([mag * 0.6, mag * 0.64, mag * 0.48], 1) / BAND_G_PER_COUNT), -2048, 2047)
    xyz = xyz.astype(np.int16)
    state = steps.new_state(fs, 1_700_000_000_000_000)
    steps.count_steps(xyz[: fs * 60], state)  # compile / load the cache
    best = float("inf")
    for _ in range(3):
        runs, t0 = 0, time.thread_time()
        while True:
            steps.count_steps(xyz, state)
            runs += 1
            elapsed = time.thread_time() - t0
            if elapsed >= seconds / 3:
                break
        best = min(best, elapsed / runs)
    return {"steps_samples_per_s": n / best, "fs": fs, "walking_share": walking_share}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", default=None, help="shared data folder (default $BANDGATE_DATA or ../shared/data)"
    )
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-speed", action="store_true", help="skip the throughput measurement")
    args = ap.parse_args(argv)
    if not have_data(args.data):
        print(f"step recordings not found under {data_dir(args.data)}: nothing to score", file=sys.stderr)
        return 1
    results = evaluate(args.data)
    print(f"{'recording@Hz':32s} {'true':>6s} {'detected':>9s} {'error %':>8s} {'F1 ±1s':>7s}")
    for key, r in results.items():
        print(
            f"{key:32s} {r['true_steps']:6d} {r['detected_steps']:9.1f} {r['error_pct']:+8.2f}"
            f" {r['second_f1']:7.3f}"
        )
    report = {"steps_error_pct": steps_error_pct(results), "steps_accuracy": results}
    if not args.no_speed:
        for fs in BAND_RATES_HZ:
            for share in (2 / 3, 0.1):
                speed = throughput(fs=fs, walking_share=share)["steps_samples_per_s"]
                print(f"throughput at {fs} Hz, walking {share:.0%}: {speed / 1e6:.1f} M samples/s (one core)")
                report[f"steps_samples_per_s_{fs}hz_walk{round(100 * share)}"] = speed
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
