"""Sleep period detection (decoder/periods.py): real PSG nights padded with simulated wake, and simulated
days with sleep at other hours.

    python -m bench.accuracy_periods [--data DIR] [--plot docs/img/periods.png]

Figures (issue 15):
- `sleep_psg_coverage`: share of the PSG sleep epochs of the 21 shared nights that lie inside a detected
  period. The nights run only from lights-off to lights-on, so each is padded as a band worn all day
  would see it: PAD_BEFORE_H hours of a simulated waking day before lights-off and PAD_AFTER_H hours of
  simulated morning after lights-on (simulator counts through the real activity kernel; the simulated
  heart rate shifted so the simulated subject's sleeping level sits at the real night's median).
- `sleep_shifted_coverage`: share of simulated sleep epochs (in bed, asleep) inside a detected period,
  on simulated days with sleep at other hours: a night shift sleeping 08:00–15:00, a 40-minute nap,
  a 03:00 bedtime. Simulator only.
- `sleep_waking_day_periods`: periods detected in simulated waking days (desk work, evening TV on a
  couch, a normal day plan) that overlap no simulated sleep. Simulator only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

from decoder import activity, periods, sleep

ROOT = Path(__file__).resolve().parents[1]
EPOCH_S = 30
BAND_HZ = 25
PAD_BEFORE_H = 14.0  # simulated waking day before lights-off
PAD_AFTER_H = 2.0  # simulated morning after lights-on
START_LOCAL_H = 12  # simulated recordings start at local noon
UTC_OFFSET_MIN = 60
DAY_MIN = 24 * 60

# Simulated schedules, in minutes from local noon of day 0 (two days each); the time a schedule leaves
# out is the simulator's random day plan (walks, sitting with gestures, non-wear).
_H = 60


def _at(day: int, hour: float) -> float:
    return day * DAY_MIN + (hour - START_LOCAL_H) * _H


def _normal_day(day: int) -> list:
    """Desk work, lunch walk, desk, evening TV on a couch until bed at 23:00."""
    return [
        ("desk", _at(day, 9.0), _at(day, 12.5)),
        ("walk", _at(day, 12.5), _at(day, 12.75)),
        ("desk", _at(day, 13.5), _at(day, 17.5)),
        ("couch", _at(day, 19.5), _at(day, 22.75)),
    ]


SCHEDULES = {
    # every day awake from 07:00 to 23:00: the waking days, with their nights as sleep
    "waking": [
        ("couch", _at(0, 19.5), _at(0, 22.75)),
        ("sleep", _at(0, 23.0), _at(1, 7.0)),
        *_normal_day(1),
        ("sleep", _at(1, 23.0), _at(2, 7.0)),
    ],
    "night_shift": [
        ("desk", _at(0, 22.0), _at(1, 6.0)),  # the shift
        ("walk", _at(1, 6.0), _at(1, 6.5)),
        ("sleep", _at(1, 8.0), _at(1, 15.0)),
        ("couch", _at(1, 18.0), _at(1, 21.0)),
        ("desk", _at(1, 22.0), _at(2, 6.0)),
    ],
    "nap": [
        ("sleep", _at(0, 23.0), _at(1, 7.0)),
        ("desk", _at(1, 9.0), _at(1, 12.5)),
        ("walk", _at(1, 12.5), _at(1, 12.75)),
        ("sleep", _at(1, 14.0), _at(1, 14.0 + 40 / 60)),  # the 40-minute nap
        ("desk", _at(1, 15.0), _at(1, 17.5)),
        ("couch", _at(1, 19.5), _at(1, 22.75)),
        ("sleep", _at(1, 23.0), _at(2, 7.0)),
    ],
    "late_bedtime": [
        ("couch", _at(0, 20.0), _at(1, 2.75)),
        ("sleep", _at(1, 3.0), _at(1, 10.0)),
        ("desk", _at(1, 11.0), _at(1, 17.0)),
        ("couch", _at(1, 20.0), _at(2, 2.75)),
        ("sleep", _at(2, 3.0), _at(2, 10.0)),
    ],
}
SHIFTED = ("night_shift", "nap", "late_bedtime")
TUNING_SEEDS = (1, 2, 3)  # the simulated subjects the detector's constants were chosen on
SEEDS = (4, 5, 6, 7)  # the ones the figures are measured on (not seen while tuning)


def data_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("BANDGATE_DATA") or ROOT.parent / "shared" / "data")


@functools.cache
def simulated_epochs(name: str, seed: int, minutes: float | None = None) -> dict[str, np.ndarray]:
    """A schedule simulated as a band at BAND_HZ, per 30-s epoch: counts (`counts_vm_1s_sum` of the
    activity kernel), heart rate (mean of the band's per-second readings, none off the wrist), both as
    the stager takes them; the simulated stage (-1 out of bed) and activity."""
    from gateway.simulator import simulate_band
    from gateway.simulator.signals import DEFAULT_START_US

    day0 = DEFAULT_START_US - DEFAULT_START_US % 86_400_000_000  # 2026-01-05 00:00 UTC
    start_us = day0 + (START_LOCAL_H * 60 - UTC_OFFSET_MIN) * 60_000_000
    minutes = 2 * DAY_MIN if minutes is None else minutes
    rec = simulate_band(
        seed,
        minutes,
        scenario="schedule",
        schedule=tuple(SCHEDULES[name]) if name in SCHEDULES else (),
        sample_rate_hz=BAND_HZ,
        start_us=start_us,
        utc_offset_min=UTC_OFFSET_MIN,
    )
    a = rec.accel
    out = activity.activity_of_recording(
        a[:, 0], a[:, 1], a[:, 2], BAND_HZ, rec.start_us, range_g=rec.accel_range_g, bits=rec.accel_bits
    )
    n = min(out.epochs.size, rec.hr_bpm.size // EPOCH_S)
    per_s = rec.hr_bpm[: n * EPOCH_S].reshape(n, EPOCH_S).astype(np.float64)
    with np.errstate(invalid="ignore"):
        hr = np.where((per_s > 0).any(1), per_s.sum(1) / (per_s > 0).sum(1), np.nan)
    hr, counts = sleep.stager_inputs(hr, out.epochs["counts_vm_1s_sum"][:n])
    stage = np.full(n, -1, np.int8)
    m = min(n, rec.stage_per_epoch.size)
    stage[:m] = rec.stage_per_epoch[:m]
    return {
        "time_us": out.epochs["epoch_start_us"][:n].astype(np.int64),
        "hr": hr,
        "counts": counts,
        "stage": stage,
        "sleep_hr": float(np.nanmedian(hr[stage > 0])) if (stage > 0).any() else float("nan"),
    }


def load_nights(path: str | os.PathLike | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The shared nights: per epoch hr, counts (as the stager takes them) and the PSG stage (4 classes)."""
    folder = data_dir(path) / "sleep" / "epochs"
    nights = {}
    for f in sorted(folder.glob("*.csv")):
        d = np.genfromtxt(f, delimiter=",", names=True)
        hr, counts = sleep.stager_inputs(d["hr_bpm"], d["counts"])
        nights[f.stem] = {
            "hr": hr,
            "counts": counts,
            "stage": sleep.PSG_TO_STAGE[d["stage"].astype(np.int64)],
        }
    return nights


def padded_night(night: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """A real night inside simulated wake: PAD_BEFORE_H of a simulated waking day, the night, PAD_AFTER_H
    of simulated morning. The simulated heart rate is shifted so the simulated subject's sleeping level
    (its median asleep) equals the real night's median, so the wake around the night is as far above the
    wearer's sleep as the simulated subject's is. Returns per-epoch hr, counts, and `psg_sleep` (True on
    the real night's sleep epochs)."""
    seed = SEEDS[k % len(SEEDS)]
    sim = simulated_epochs("waking", seed)
    # the waking day 1 from 09:00 - PAD_BEFORE_H.. ; the morning after the second night
    e_day = int((_at(1, 23.0) - PAD_BEFORE_H * _H) * 2)
    e_bed = int(_at(1, 23.0) * 2)
    e_up = int(_at(2, 7.0) * 2)
    n_after = int(PAD_AFTER_H * 120)
    shift = float(np.nanmedian(night["hr"])) - sim["sleep_hr"]
    before = slice(e_day, e_bed)
    after = slice(e_up, e_up + n_after)
    hr = np.concatenate([sim["hr"][before] + shift, night["hr"], sim["hr"][after] + shift])
    counts = np.concatenate([sim["counts"][before], night["counts"], sim["counts"][after]])
    psg_sleep = np.concatenate(
        [np.zeros(e_bed - e_day, bool), night["stage"] != sleep.WAKE, np.zeros(n_after, bool)]
    )
    return {"hr": np.round(hr, 1), "counts": counts, "psg_sleep": psg_sleep, "offset": e_bed - e_day}


def detect(hr: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return periods.detect_periods(np.arange(hr.size) * float(EPOCH_S), hr, counts)


def psg_coverage(path: str | os.PathLike | None = None) -> dict:
    nights = load_nights(path)
    covered = total = 0
    per_night = {}
    for k, (name, night) in enumerate(nights.items()):
        p = padded_night(night, k)
        period = detect(p["hr"], p["counts"])
        inside = period != periods.NO_PERIOD
        c = int(np.count_nonzero(inside & p["psg_sleep"]))
        n = int(np.count_nonzero(p["psg_sleep"]))
        covered += c
        total += n
        per_night[name] = {
            "coverage": c / n if n else float("nan"),
            "periods": len(periods.periods_of(period)),
            "period": period,
            "padded": p,
        }
    return {"sleep_psg_coverage": covered / total, "nights": per_night}


def psg_sensitivity(path: str | os.PathLike | None = None) -> dict:
    """How much the real-night coverage owes to the simulated padding: the awake heart rate of the padding
    moved halfway to / onto the night's median, and the nights alone (what `replay --epochs` on one of
    the shared files sees: no day before lights-off)."""
    nights = load_nights(path)
    out = {}
    for label, scale in (("half", 0.5), ("none", 0.0)):
        covered = total = 0
        for k, night in enumerate(nights.values()):
            p = padded_night(night, k)
            level = float(np.nanmedian(night["hr"]))
            hr = p["hr"].copy()
            pad = np.ones(hr.size, bool)
            pad[p["offset"] : p["offset"] + night["hr"].size] = False
            hr[pad] = np.round(level + scale * (hr[pad] - level), 1)
            inside = detect(hr, p["counts"]) != periods.NO_PERIOD
            covered += int(np.count_nonzero(inside & p["psg_sleep"]))
            total += int(np.count_nonzero(p["psg_sleep"]))
        out[f"sleep_psg_coverage_awake_hr_{label}"] = covered / total
    covered = total = 0
    for night in nights.values():
        asleep = night["stage"] != sleep.WAKE
        covered += int(np.count_nonzero((detect(night["hr"], night["counts"]) != periods.NO_PERIOD) & asleep))
        total += int(np.count_nonzero(asleep))
    out["sleep_psg_coverage_bare_nights"] = covered / total
    return out


NIGHT_ONLY_WEARINGS = 3


def night_only_coverage(path: str | os.PathLike | None = None) -> dict:
    """A band worn only in bed (charged by day): each real night is the band's only data, worn
    NIGHT_ONLY_WEARINGS times in a row with nothing between (the detector counts epochs, not clock time).
    The coverage of the PSG sleep epochs on the first wearing (a fresh band) and on the later ones (the
    history then holds only nights: no awake level to be below)."""
    covered = {"first": 0, "later": 0}
    total = {"first": 0, "later": 0}
    w = NIGHT_ONLY_WEARINGS
    for night in load_nights(path).values():
        m = night["hr"].size
        period = detect(np.tile(night["hr"], w), np.tile(night["counts"], w))
        asleep = night["stage"] != sleep.WAKE
        for k in range(w):
            inside = period[k * m : (k + 1) * m] != periods.NO_PERIOD
            which = "first" if k == 0 else "later"
            covered[which] += int(np.count_nonzero(inside & asleep))
            total[which] += int(np.count_nonzero(asleep))
    return {f"sleep_psg_coverage_night_only_{k}": covered[k] / total[k] for k in covered}


def simulated_figures(seeds: tuple[int, ...] = SEEDS) -> dict:
    """Coverage of simulated shifted sleep, and periods invented in simulated waking time."""
    covered = total = 0
    invented = invented_other = 0
    detail = {}
    for name in (*SHIFTED, "waking"):
        for seed in seeds:
            sim = simulated_epochs(name, seed)
            period = detect(sim["hr"], sim["counts"])
            inside = period != periods.NO_PERIOD
            asleep = sim["stage"] > 0
            in_bed = sim["stage"] >= 0
            found = periods.periods_of(period)
            false = [(a, b) for a, b in found if not in_bed[a : b + 1].any()]
            if name in SHIFTED:  # the sleep at other hours than 23:00 (the regular nights are beside it)
                shifted = np.zeros_like(asleep)
                for label, a, b in SCHEDULES[name]:
                    if label == "sleep" and (a / _H + START_LOCAL_H) % 24 != 23.0:
                        shifted[int(a * 2) : int(b * 2)] = True
                covered += int(np.count_nonzero(inside & asleep & shifted))
                total += int(np.count_nonzero(asleep & shifted))
                invented_other += len(false)
            else:
                invented += len(false)
            detail[f"{name}/{seed}"] = {
                "coverage": float(np.count_nonzero(inside & asleep) / max(1, np.count_nonzero(asleep))),
                "periods_h": [
                    (round(a / 120 + START_LOCAL_H, 2), round((b + 1) / 120 + START_LOCAL_H, 2))
                    for a, b in found
                ],
                "false_periods": len(false),
            }
    return {
        "sleep_shifted_coverage": covered / total,
        "sleep_waking_day_periods": invented,
        "sleep_false_periods_shifted_days": invented_other,
        "simulated": detail,
        "seeds": list(seeds),
    }


def plot_choice(result: dict) -> list[str]:
    """The nights the plot shows: the two least covered and the median one."""
    ranked = sorted(result["nights"], key=lambda k: (result["nights"][k]["coverage"], k))
    return [ranked[0], ranked[1], ranked[len(ranked) // 2]]


def plot_nights(result: dict, names: list[str], path: str | Path) -> bool:
    """PSG hypnograms of `names` with the detected period shaded, from an hour before lights-off to an
    hour after lights-on (the padding is simulated). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    nights = load_nights(None)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.2 * len(names)), sharex=False)
    level = {sleep.WAKE: 3, sleep.REM: 2, sleep.LIGHT: 1, sleep.DEEP: 0}
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        r = result["nights"][name]
        off = r["padded"]["offset"]
        stage = nights[name]["stage"]
        lo, hi = off - 120, off + stage.size + 120
        hours = (np.arange(lo, hi) - off) / 120.0
        inside = r["period"][lo:hi] != periods.NO_PERIOD
        ax.fill_between(
            hours, -0.5, 3.5, where=inside, color="tab:blue", alpha=0.18, step="post", label="period"
        )
        ax.step(
            (np.arange(stage.size)) / 120.0, [level[int(s)] for s in stage], where="post", color="k", lw=0.8
        )
        ax.axvline(0, color="grey", ls=":", lw=0.8)
        ax.axvline(stage.size / 120.0, color="grey", ls=":", lw=0.8)
        ax.set_yticks([0, 1, 2, 3], ["deep", "light", "REM", "wake"])
        ax.set_xlim(hours[0], hours[-1])
        ax.set_title(
            f"{name}: PSG (black), detected period (shaded); coverage {r['coverage']:.3f}", fontsize=9
        )
    np.atleast_1d(axes)[-1].set_xlabel("hours from lights-off (dotted: lights-off, lights-on)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def evaluate(path: str | os.PathLike | None = None, seeds: tuple[int, ...] = SEEDS) -> dict:
    out = simulated_figures(seeds)
    if (data_dir(path) / "sleep" / "epochs").is_dir():
        out.update(psg_coverage(path))
        out.update(psg_sensitivity(path))
        out.update(night_only_coverage(path))
    return out


FIGURE_KEYS = (
    "sleep_psg_coverage",
    "sleep_shifted_coverage",
    "sleep_waking_day_periods",
    "sleep_false_periods_shifted_days",
    "sleep_psg_coverage_awake_hr_half",
    "sleep_psg_coverage_awake_hr_none",
    "sleep_psg_coverage_bare_nights",
    "sleep_psg_coverage_night_only_first",
    "sleep_psg_coverage_night_only_later",
)


def figures(result: dict) -> dict:
    """The JSON figures (bench/accuracy.json) of `evaluate`'s result."""
    return {k: result[k] for k in FIGURE_KEYS if k in result}


def report(result: dict) -> list[str]:
    """The ACCURACY.md section on sleep period detection."""
    nights = result.get("nights", {})
    worst = sorted(nights.items(), key=lambda kv: kv[1]["coverage"])[:3]
    cov = result.get("sleep_psg_coverage", float("nan"))
    only_first = result.get("sleep_psg_coverage_night_only_first", float("nan"))
    only_later = result.get("sleep_psg_coverage_night_only_later", float("nan"))
    lines = [
        "",
        "## Sleep periods (decoder/periods.py)",
        "",
        "Sleep is staged only inside detected sleep periods (van Hees 2018 HDCZA adapted to per-epoch",
        "counts and heart rate; docs/sleep.md). Measured by `python -m bench.accuracy_periods` (called",
        "from `python -m bench.accuracy`).",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| `sleep_psg_coverage`: PSG sleep epochs of the {len(nights)} real nights in a period "
        f"| {cov:.4f} | ≥ 0.95 |",
        "| `sleep_shifted_coverage` (**simulator only**): shifted sleep inside a period "
        f"| {result['sleep_shifted_coverage']:.4f} | ≥ 0.9 |",
        "| `sleep_waking_day_periods` (**simulator only**): periods in waking days "
        f"| {result['sleep_waking_day_periods']} | 0 |",
        "| `sleep_false_periods_shifted_days` (**simulator only**): periods in the shifted days' waking time "
        f"| {result['sleep_false_periods_shifted_days']} | (0) |",
        "",
        "Real nights: each runs only lights-off to lights-on, so it is padded as a band worn all day sees",
        f"it: {PAD_BEFORE_H:.0f} h of a simulated waking day before lights-off and {PAD_AFTER_H:.0f} h of",
        "simulated morning after (simulator counts through the real activity kernel; the simulated heart",
        "rate shifted so the simulated subject's median asleep equals the real night's median heart rate).",
        "The padding is simulated; the coverage counts only the real PSG sleep epochs. Lowest nights: "
        + ", ".join(f"{k} {v['coverage']:.3f}" for k, v in worst)
        + ".",
        "",
        "**How much of that is the padding** (the detector opens a period on a heart rate below the",
        "wearer's own awake level, so it needs the day before the night): with the padding's awake heart",
        "rate moved halfway to the night's median, coverage "
        f"{result.get('sleep_psg_coverage_awake_hr_half', float('nan')):.3f}; moved onto it, "
        f"{result.get('sleep_psg_coverage_awake_hr_none', float('nan')):.3f}; the nights alone, as",
        "`bandgate replay --epochs` sees one of the shared files (no day before lights-off), "
        f"{result.get('sleep_psg_coverage_bare_nights', float('nan')):.3f}. A lights-off-to-lights-on file",
        "is not what the detector is for; it needs the wearer's day.",
        "",
        "**A band worn only in bed** (charged by day) never sees that day: each real night worn",
        f"{NIGHT_ONLY_WEARINGS} times in a row as the band's only data covers {only_first:.3f} of the PSG "
        "sleep on the first",
        f"wearing and {only_later:.3f} on the later ones (`night_only_coverage`). **Low for such",
        "wearers**: the history then holds only nights, so the wearer's median is a sleeping level and",
        "the rule that opens a period 6 bpm below it (`HR_OPEN_DROP`) rarely holds (docs/sleep.md, Weak).",
        "",
        "Simulated days (**simulator only**, gateway/simulator `schedule` scenario, 25 Hz, subjects (seeds)",
        f"{', '.join(map(str, result['seeds']))}; the constants were chosen on seeds "
        f"{', '.join(map(str, TUNING_SEEDS))}): two days each of a night shift sleeping 08:00–15:00, a",
        "regular night with a 40-minute nap at 14:00, a 03:00 bedtime, and waking days of desk work, a",
        "lunch walk and an evening of TV on a couch before a 23:00 bedtime. Coverage counts the simulated",
        "asleep epochs of the shifted sleep (not the 23:00 nights); a false period is one overlapping no",
        "time in bed. Each recording starts at noon with a fresh band (no heart-rate history).",
        "",
        "![PSG hypnograms with the detected period](docs/img/periods.png)",
        "",
        "Made by `python -m bench.accuracy` (or alone: `python -m bench.accuracy_periods --plot",
        "docs/img/periods.png`): three real nights (the two least covered and the median one), PSG stages in",
        "black, the detected period shaded, an hour of the simulated padding either side.",
    ]
    false = [f"{k}: {v['periods_h']}" for k, v in result["simulated"].items() if v["false_periods"]]
    if false:
        lines += ["", "Simulated recordings with a false period (hours from midnight of day 0):", ""]
        lines += [f"- {x}" for x in false]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--tuning-seeds", action="store_true", help="the simulated subjects tuned on")
    parser.add_argument("--plot", default=None, help="write the three-night hypnogram plot here")
    args = parser.parse_args(argv)
    res = evaluate(args.data, TUNING_SEEDS if args.tuning_seeds else SEEDS)
    if args.plot and "nights" in res:
        plot_nights(res, plot_choice(res), args.plot)
    for k, v in res.get("nights", {}).items():
        print(k, round(v["coverage"], 3), v["periods"])
    for k, v in res["simulated"].items():
        print(k, v)
    print(json.dumps({k: v for k, v in res.items() if k.startswith("sleep_")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
