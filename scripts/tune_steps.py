"""Tune the step detector's thresholds on one data set and check them on the other.

    python scripts/tune_steps.py [--fit oxwalk|clemson|all] [--data DIR] [--passes 2] [--json params.json]
    python scripts/tune_steps.py --edge-loo [--data DIR]

Coordinate descent over a coarse grid per parameter (few, round values: the aim is a detector that holds
on recordings not seen, not the last percent here). The objective on the fitted recordings, both band
rates: the worst |step-total error %| plus 20 × (1 − mean per-second F1); the Clemson irregular walk,
when fitted, adds its |error| in steps as a percentage of its 178 steps, weighted ¼ (it is mostly
standing, so it measures false steps). Prints the fitted parameters and every recording's score, fitted
or held out.

`--edge-loo` measures `edge_credit` instead of searching for it: the share of a bout-edge second (gait seen
on one side of it only) that the annotations say is walking, i.e. annotated steps over the steps full
credit would give, pooled over recordings. Leaving each recording out in turn, the share measured on the
other three is rounded to 0.05 and scored on the one left out; the default is the share over all four.
The annotations are first aligned with the signal (OxWalk P30's lag the accelerometer by about 2 s; this
matters only for which second a step falls in, never for totals).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from scipy.signal import sosfilt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.accuracy_steps import BAND_RATES_HZ, load_recordings, second_f1, to_band  # noqa: E402
from decoder import steps  # noqa: E402

GRID = {
    "hp_hz": [0.25, 0.4, 0.6],
    "lp_hz": [3.0, 4.0, 5.0],
    "window_s": [4, 5, 6, 8],
    "max_lag_s": [1.6, 2.0, 2.4],
    "min_rms_g": [0.02, 0.03, 0.045, 0.06, 0.08],
    "min_second_rms_g": [0.0, 0.01, 0.02, 0.03, 0.05],
    "min_periodicity": [0.3, 0.4, 0.5, 0.6],
    "peak_tolerance": [0.7, 0.8, 0.85, 0.9, 0.95],
    "harmonic_ratio": [0.3, 0.5, 0.7],
    "stride_max_hz": [1.1, 1.2, 1.3, 1.4, 1.5],
    "min_cadence_hz": [0.8, 1.0, 1.2, 1.4],
    "min_cover": [1, 2, 3, 4],
    "cadence_agreement": [0.05, 0.1, 0.15, 0.25, 1.0],
}
FIT_SETS = {
    "oxwalk": ("oxwalk_p30",),
    "clemson": ("clemson_p15_regular", "clemson_p15_semiregular", "clemson_p15_irregular"),
}
FIT_SETS["all"] = FIT_SETS["oxwalk"] + FIT_SETS["clemson"]


class Scorer:
    """Scores parameters on the recordings, with the band conversions done once."""

    def __init__(self, data: str | None):
        self.recs = load_recordings(data)
        self.bands = {(n, fs): to_band(r, fs) for n, r in self.recs.items() for fs in BAND_RATES_HZ}
        self.true_sec = {
            n: np.floor(r.start_us / 1e6 + (r.step_times_s - r.time_s[0])).astype(np.int64)
            for n, r in self.recs.items()
        }

    def score(self, name: str, fs: int, params: steps.StepParams) -> tuple[float, float, float]:
        """(error %, error in steps, per-second F1)."""
        rec = self.recs[name]
        try:
            out = steps.steps_of_recording(self.bands[name, fs], fs, rec.start_us, params=params)
        except ValueError:
            return float("inf"), float("inf"), 0.0
        detected = float(out.seconds["steps"].sum(dtype=np.float64))
        true = len(rec.step_times_s)
        f1 = second_f1(self.true_sec[name], out.seconds["second"][out.seconds["steps"] > 0])
        return 100.0 * (detected - true) / true, detected - true, f1

    def objective(self, names: tuple[str, ...], params: steps.StepParams) -> float:
        worst, f1s, extra = 0.0, [], 0.0
        for name in names:
            for fs in BAND_RATES_HZ:
                err, err_steps, f1 = self.score(name, fs, params)
                if "irregular" in name:
                    extra += (
                        0.25 * abs(err_steps) / len(self.recs[name].step_times_s) * 100 / len(BAND_RATES_HZ)
                    )
                else:
                    worst = max(worst, abs(err))
                    f1s.append(f1)
        return worst + 20.0 * (1.0 - float(np.mean(f1s))) + extra


def tune(scorer: Scorer, names: tuple[str, ...], passes: int) -> steps.StepParams:
    best = steps.DEFAULT_PARAMS
    best_obj = scorer.objective(names, best)
    for _ in range(passes):
        improved = False
        for field, values in GRID.items():
            for v in values:
                cand = dataclasses.replace(best, **{field: v})
                obj = scorer.objective(names, cand)
                if obj < best_obj - 1e-9:
                    best, best_obj, improved = cand, obj, True
        print(f"  pass objective {best_obj:.3f}", file=sys.stderr)
        if not improved:
            break
    return best


def annotation_offset_s(rec, fs: int = 25, max_lag_s: float = 4.0) -> float:
    """How far the recording's signal lags its step annotations (s): the lag, in 0.2 s steps, at which the
    log energy envelope of the band-passed magnitude best correlates with 'a step within 1 s'."""
    n = int((rec.time_s[-1] - rec.time_s[0]) * fs)
    grid = rec.time_s[0] + np.arange(n) / fs
    mag = np.sqrt(sum(np.interp(grid, rec.time_s, rec.xyz_g[:, i]) ** 2 for i in range(3)))
    y = sosfilt(steps.filter_sos(), mag - mag[0])
    env = np.log(np.convolve(y**2, np.ones(2 * fs) / (2 * fs), "same") + 1e-4)
    at = np.clip(np.round((rec.step_times_s - rec.time_s[0]) * fs).astype(int), 0, n - 1)
    marks = np.zeros(n)
    marks[at] = 1.0
    near = (np.convolve(marks, np.ones(2 * fs), "same") > 0).astype(float)
    env = (env - env.mean()) / env.std()
    near = (near - near.mean()) / near.std()
    lags = range(-round(max_lag_s * fs), round(max_lag_s * fs) + 1, round(0.2 * fs))
    corr = [float(np.mean(env[max(0, g) : n + min(0, g)] * near[max(0, -g) : n - max(0, g)])) for g in lags]
    return list(lags)[int(np.argmax(corr))] / fs


def edge_counts(scorer: Scorer, name: str, fs: int, offset_s: float) -> tuple[float, float]:
    """(steps full credit gives bout-edge seconds, annotated steps in them) at the current defaults."""
    rec = scorer.recs[name]
    full, none = (
        steps.steps_of_recording(
            scorer.bands[name, fs], fs, rec.start_us, dataclasses.replace(steps.DEFAULT_PARAMS, edge_credit=c)
        ).seconds
        for c in (1.0, 0.0)
    )
    edge = (full["steps"] > 0) & (none["steps"] == 0)
    at = np.floor(rec.start_us / 1e6 + (rec.step_times_s - rec.time_s[0]) + offset_s).astype(np.int64)
    annotated = np.isin(at, full["second"][edge]).sum()
    return float(full["steps"][edge].sum(dtype=np.float64)), float(annotated)


def edge_loo(scorer: Scorer) -> None:
    names = list(scorer.recs)
    counts = {}
    for name in names:
        offset = annotation_offset_s(scorer.recs[name])
        for fs in BAND_RATES_HZ:
            counts[name, fs] = edge_counts(scorer, name, fs, offset)
            credited, annotated = counts[name, fs]
            print(
                f"{name + '@' + str(fs):30s} signal lags annotations {offset:+.1f} s; edge seconds: credited"
                f" {credited:6.1f}, annotated {annotated:4.0f}, share {annotated / max(credited, 1e-9):.2f}"
            )

    def share(keep) -> float:
        c = sum(v[0] for k, v in counts.items() if k[0] in keep)
        a = sum(v[1] for k, v in counts.items() if k[0] in keep)
        return a / c

    print(f"\nover all: share {share(names):.3f} -> edge_credit {round(share(names) / 0.05) * 0.05:.2f}")
    print(f"{'held out':30s} {'edge_credit':>11s} {'err %':>8s} {'err steps':>10s} {'F1 ±1s':>7s}")
    for out in names:
        credit = round(share([n for n in names if n != out]) / 0.05) * 0.05
        params = dataclasses.replace(steps.DEFAULT_PARAMS, edge_credit=credit)
        for fs in BAND_RATES_HZ:
            err, err_steps, f1 = scorer.score(out, fs, params)
            print(f"{out + '@' + str(fs):30s} {credit:11.2f} {err:+8.2f} {err_steps:+10.1f} {f1:7.3f}")


def report(scorer: Scorer, params: steps.StepParams, fitted: tuple[str, ...]) -> None:
    print(f"{'recording@Hz':30s} {'role':8s} {'err %':>8s} {'err steps':>10s} {'F1 ±1s':>7s}")
    for name in scorer.recs:
        for fs in BAND_RATES_HZ:
            err, err_steps, f1 = scorer.score(name, fs, params)
            role = "fitted" if name in fitted else "held out"
            print(f"{name + '@' + str(fs):30s} {role:8s} {err:+8.2f} {err_steps:+10.1f} {f1:7.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", choices=sorted(FIT_SETS), default="oxwalk")
    ap.add_argument("--data", default=None)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the fitted parameters here")
    ap.add_argument("--edge-loo", action="store_true", help="measure edge_credit, leaving one recording out")
    args = ap.parse_args(argv)
    scorer = Scorer(args.data)
    if args.edge_loo:
        edge_loo(scorer)
        return 0
    names = FIT_SETS[args.fit]
    print("defaults:")
    report(scorer, steps.DEFAULT_PARAMS, names)
    params = tune(scorer, names, args.passes)
    changed = {k: v for k, v in dataclasses.asdict(params).items() if v != getattr(steps.DEFAULT_PARAMS, k)}
    print(f"fitted on {args.fit}: changes from the defaults {changed}")
    report(scorer, params, names)
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(params), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
