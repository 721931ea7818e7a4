"""Sleep period detection (decoder/periods.py) and the night record of each period."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from decoder import activity, periods, sleep
from decoder.features import feed_sleep
from gateway.simulator import simulate_band
from tests import naive_periods

EPOCH_US = 30_000_000
T0_US = 1_767_600_000_000_000  # on the 30-s grid


# --- synthetic epochs: segments of lying still with a low heart rate, sitting, walking, off the wrist ---
_SEGMENT = {  # counts per epoch (probability of a movement, its size), heart rate (mean, sd)
    "asleep": ((0.05, 300.0), (56.0, 2.0)),
    "sitting": ((0.3, 400.0), (70.0, 2.5)),
    "walking": ((1.0, 2500.0), (100.0, 6.0)),
    "restless": ((0.6, 150.0), (62.0, 3.0)),
}


def synthetic(segments: list[tuple[str, int]], seed: int = 0, no_hr_share: float = 0.02) -> tuple:
    rng = np.random.default_rng(seed)
    counts, hr = [], []
    for kind, n in segments:
        if kind == "off":  # band on a table: no movement, no heart rate
            counts.append(np.zeros(n))
            hr.append(np.full(n, np.nan))
            continue
        (p_move, size), (mean, sd) = _SEGMENT[kind]
        counts.append(np.where(rng.random(n) < p_move, rng.exponential(size, n), 0.0))
        h = mean + rng.normal(0.0, sd, n)
        hr.append(np.where(rng.random(n) < no_hr_share, np.nan, h))
    hr, counts = sleep.stager_inputs(np.concatenate(hr), np.concatenate(counts))
    time_us = T0_US + np.arange(counts.size, dtype=np.int64) * EPOCH_US
    return time_us, hr, counts


DAY = [("sitting", 300), ("walking", 20), ("sitting", 200), ("walking", 10), ("sitting", 150)]
NIGHT = [("sitting", 30), ("asleep", 600), ("walking", 30), ("sitting", 120)]
_segments = st.lists(
    st.tuples(st.sampled_from(["asleep", "sitting", "walking", "restless", "off"]), st.integers(1, 200)),
    min_size=1,
    max_size=12,
)


def test_a_night_after_a_day_is_one_period_and_the_day_none() -> None:
    time_us, hr, counts = synthetic(DAY + NIGHT)
    period = periods.detect_periods(time_us, hr, counts)
    found = periods.periods_of(period)
    bed = sum(n for _, n in DAY) + 30
    assert len(found) == 1
    first, last = found[0]
    # sitting still just before bed may be in it: at most the back-dating of an opening period
    assert bed - periods.MIN_PERIOD - periods.CLOSE_GAP <= first <= bed + 5
    assert bed + 600 - 5 <= last <= bed + 600 + 5
    assert period[first] == time_us[first] and np.all(period[first : last + 1] == time_us[first])


def test_waking_day_has_no_period() -> None:
    """Hours of sitting (moving now and then) at a resting heart rate, after a night: nothing invented."""
    time_us, hr, counts = synthetic(DAY + NIGHT + DAY + DAY)
    found = periods.periods_of(periods.detect_periods(time_us, hr, counts))
    night_end = sum(n for _, n in DAY + NIGHT)
    assert len(found) == 1 and found[0][1] < night_end


def test_the_period_can_fail_to_open_and_close() -> None:
    """Must-fail checks of the rule itself: too short a still spell is no period; a long walk ends one."""
    time_us, hr, counts = synthetic([*DAY, ("asleep", periods.MIN_PERIOD // 2), ("walking", 200)])
    assert periods.periods_of(periods.detect_periods(time_us, hr, counts)) == []
    time_us, hr, counts = synthetic([*DAY, ("asleep", 200), ("walking", 60), ("asleep", 200)])
    assert len(periods.periods_of(periods.detect_periods(time_us, hr, counts))) == 2


@pytest.mark.parametrize(("moving", "expect"), [(periods.CLOSE_GAP - 1, 1), (periods.CLOSE_GAP, 2)])
def test_close_gap_epochs_not_still_in_a_row_end_a_period(moving, expect) -> None:
    """The boundary itself, on counts alone (a band without heart rate): CLOSE_GAP − 1 epochs not still
    keep one period, CLOSE_GAP end it, in the kernel and the reference alike (they once disagreed)."""
    counts = np.concatenate([np.zeros(100), np.full(moving, 1000.0), np.zeros(100)])
    time_us = T0_US + np.arange(counts.size, dtype=np.int64) * EPOCH_US
    hr = np.full(counts.size, np.nan)
    got = periods.detect_periods(time_us, hr, counts)
    assert len(periods.periods_of(got)) == expect
    np.testing.assert_array_equal(got, naive_periods.periods(time_us.astype(np.float64), hr, counts))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_segments, st.integers(0, 2**16))
@example([("restless", 7), ("restless", 61), ("asleep", 9)], 1199)  # 39 epochs not still: the block goes on
def test_matches_the_naive_reference(segments, seed) -> None:
    time_us, hr, counts = synthetic(DAY[:1] + segments, seed)
    got = periods.detect_periods(time_us, hr, counts)
    want = naive_periods.periods(time_us.astype(np.float64), hr, counts)
    np.testing.assert_array_equal(got, want)


def test_matches_the_naive_reference_on_a_night() -> None:
    time_us, hr, counts = synthetic(DAY + NIGHT + DAY, seed=5)
    got = periods.detect_periods(time_us, hr, counts)
    assert (got != periods.NO_PERIOD).sum() > 500
    np.testing.assert_array_equal(got, naive_periods.periods(time_us.astype(np.float64), hr, counts))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 1800), max_size=8), st.integers(0, 3))
def test_any_split_and_state_round_trip_give_the_same_periods(cuts, seed) -> None:
    time_us, hr, counts = synthetic(DAY + NIGHT + [("restless", 100), ("asleep", 100)], seed=seed)
    whole = periods.detect(time_us, hr, counts, periods.PeriodState.new(), finish=True)
    state = periods.PeriodState.new()
    parts = []
    bounds = [0, *sorted(c for c in cuts if c < time_us.size), time_us.size]
    for a, b in itertools.pairwise(bounds):
        state = periods.PeriodState.from_array(state.array.copy())  # as the device state stores it
        parts.append(periods.detect(time_us[a:b], hr[a:b], counts[a:b], state))
    parts.append(periods.detect(np.zeros(0), np.zeros(0), np.zeros(0), state, finish=True))
    for name in ("time", "hr_bpm", "counts", "period"):
        np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name))
    assert whole.time.size == time_us.size


def test_decisions_lag_by_a_fixed_number_of_epochs() -> None:
    time_us, hr, counts = synthetic(DAY + NIGHT)
    state = periods.PeriodState.new()
    for k in range(time_us.size):
        periods.detect(time_us[k : k + 1], hr[k : k + 1], counts[k : k + 1], state)
        assert state.epochs_in - state.epochs_out <= periods.DECISION_LAG


def test_state_is_checked() -> None:
    state = periods.PeriodState.new()
    periods.detect(*synthetic(DAY)[:3], state)
    assert np.array_equal(periods.PeriodState.from_array(state.array).array, state.array, equal_nan=True)
    bad = state.array.copy()
    bad[0] = 99
    with pytest.raises(ValueError, match="state"):
        periods.PeriodState.from_array(bad)
    bad = state.array.copy()
    bad[3] = bad[1] + 1  # more decided than pushed
    with pytest.raises(ValueError, match="counters"):
        periods.PeriodState.from_array(bad)
    with pytest.raises(ValueError):
        periods.PeriodState.from_array(state.array[:-1])


def _mid_stream(open_block: bool) -> np.ndarray:
    """A state as the kernel leaves it inside a night's open period, or in a still block not yet open."""
    time_us, hr, counts = synthetic(DAY + NIGHT)
    bed = sum(n for _, n in DAY) + 30
    stop = bed + (300 if open_block else periods.MIN_PERIOD // 2)
    state = periods.PeriodState.new()
    periods.detect(time_us[:stop], hr[:stop], counts[:stop], state)
    assert state.array[periods._H_BLK_START] >= 0 and state.array[periods._H_BLK_OPEN] == float(open_block)
    return state.array


_H = periods
_HOSTILE = {  # field: values the kernel never leaves (before: -1e15 as the open block's last hung it)
    "n_in 1e12": (_H._H_N_IN, 1e12),
    "n_in not whole": (_H._H_N_IN, lambda a: a[_H._H_N_IN] + 0.5),
    "n_flag negative": (_H._H_N_FLAG, -1.0),
    "flags lag too far": (_H._H_N_FLAG, lambda a: a[_H._H_N_IN] - _H.HALF_WINDOW - 1),
    "decisions lag too far": (_H._H_N_DEC, lambda a: a[_H._H_N_IN] - _H.DECISION_LAG - 1),
    "n_dec inf": (_H._H_N_DEC, np.inf),
    "block last far back": (_H._H_BLK_LAST, -1e15),
    "block last unflagged": (_H._H_BLK_LAST, lambda a: a[_H._H_N_FLAG]),
    "block last a gap back": (_H._H_BLK_LAST, lambda a: a[_H._H_N_FLAG] - 1 - _H.CLOSE_GAP),
    "block start after last": (_H._H_BLK_START, lambda a: a[_H._H_BLK_LAST] + 1),
    "block start NaN": (_H._H_BLK_START, np.nan),
    "open flag 0.5": (_H._H_BLK_OPEN, 0.5),
    "since NaN": (_H._H_SINCE, np.nan),
    "history weight inf": (_H._H_HR_W, np.inf),
    "histogram negative": (_H._OFF_HIST + 40, -1.0),
}


@pytest.mark.parametrize("open_block", [True, False])
@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_a_damaged_or_hostile_stored_state_is_refused(case, open_block) -> None:
    """Each value the kernel loops over or indexes by, damaged in a real mid-stream state, is refused
    where the state loads; the undamaged state loads (so each case fails on its own damage)."""
    a = _mid_stream(open_block)
    assert np.array_equal(periods.PeriodState.from_array(a).array, a, equal_nan=True)
    where, value = _HOSTILE[case]
    bad = a.copy()
    bad[where] = value(a) if callable(value) else value
    with pytest.raises(ValueError, match="sleep-period state"):
        periods.PeriodState.from_array(bad)


def test_a_not_yet_open_block_must_lie_in_undecided_epochs() -> None:
    a = _mid_stream(open_block=False)
    bad = a.copy()
    bad[periods._H_BLK_START] = a[periods._H_N_DEC] - 1
    with pytest.raises(ValueError, match="block"):
        periods.PeriodState.from_array(bad)
    with pytest.raises(ValueError, match="sleep-period state"):
        periods.PeriodState.from_array(a.astype(np.float32))


# --- simulated days with sleep at other hours (gateway/simulator, schedule scenario) -----------------------
@functools.cache
def _simulated(schedule: tuple, minutes: int, seed: int) -> tuple:
    rec = simulate_band(seed, minutes, scenario="schedule", schedule=schedule, sample_rate_hz=25)
    a = rec.accel
    ep = activity.activity_of_recording(a[:, 0], a[:, 1], a[:, 2], 25, rec.start_us).epochs
    n = min(ep.size, rec.stage_per_epoch.size)
    per_s = rec.hr_bpm[: n * 30].reshape(n, 30).astype(np.float64)
    with np.errstate(invalid="ignore"):
        hr = np.where((per_s > 0).any(1), per_s.sum(1) / (per_s > 0).sum(1), np.nan)
    hr, counts = sleep.stager_inputs(hr, ep["counts_vm_1s_sum"][:n])
    return ep["epoch_start_us"][:n].astype(np.int64), hr, counts, rec.stage_per_epoch[:n]


H = 60  # minutes


@pytest.mark.parametrize(
    ("name", "schedule", "minutes"),
    [
        # minutes from the start; the recording's first hours are a random day (the wearer's heart rate)
        (
            "night shift 08:00-15:00",
            (("desk", 3 * H, 9 * H), ("walk", 9 * H, 9 * H + 20), ("sleep", 11 * H, 18 * H)),
            19 * H,
        ),
        (
            "40-minute nap",
            (("desk", 3 * H, 6 * H), ("walk", 6 * H, 6 * H + 15), ("sleep", 6 * H + 30, 7 * H + 10)),
            8 * H,
        ),
        ("03:00 bedtime", (("couch", 3 * H, 6 * H), ("sleep", 6 * H + 15, 13 * H)), 14 * H),
    ],
)
def test_shifted_sleep_is_found(name, schedule, minutes) -> None:
    time_us, hr, counts, stage = _simulated(schedule, minutes, 2)
    period = periods.detect_periods(time_us, hr, counts)
    asleep = stage > 0
    inside = period != periods.NO_PERIOD
    assert (inside & asleep).sum() / asleep.sum() >= 0.9, name
    in_bed = stage >= 0
    for a, b in periods.periods_of(period):
        assert in_bed[a : b + 1].any(), f"{name}: a period in waking time"


def test_simulated_waking_day_has_no_period() -> None:
    """Desk work, a lunch walk, more desk work, an evening on the couch: no period."""
    schedule = (
        ("desk", 2 * H, 5 * H),
        ("walk", 5 * H, 5 * H + 15),
        ("desk", 6 * H, 9 * H),
        ("couch", 11 * H, 14 * H),
    )
    for seed in (1, 2):
        time_us, hr, counts, _ = _simulated(schedule, 14 * H, seed)
        assert periods.periods_of(periods.detect_periods(time_us, hr, counts)) == []


# --- the night record of a period --------------------------------------------------------------------------
def test_night_record_against_a_naive_summary_of_its_stages() -> None:
    """TST, SOL and WASO of each night record equal a plain count over the stages its sleep records carry;
    the period it names spans exactly those records."""
    time_us, hr, counts = synthetic(DAY + NIGHT + DAY + [("asleep", 90), ("sitting", 200)], seed=3)
    records, _fam = feed_sleep("d", None, time_us, counts, hr, finish=True)
    nights = [r for r in records if r["family"] == "night"]
    assert len(nights) == 2 and [n["values"]["kind"] for n in nights] == ["main", "nap"]
    sleep_records = sorted((r for r in records if r["family"] == "sleep"), key=lambda r: r["start_us"])
    assert [r["start_us"] for r in sleep_records] == time_us.tolist(), "one sleep record per epoch"
    for night in nights:
        v = night["values"]
        mine = [r for r in sleep_records if r["values"].get("period") == v["period_start_us"]]
        assert mine[0]["start_us"] == v["period_start_us"] == night["start_us"]
        assert mine[-1]["start_us"] + EPOCH_US == v["period_end_us"]
        assert night["duration_s"] * 1_000_000 == v["period_end_us"] - v["period_start_us"]
        stage = np.array([sleep.STAGE_NAMES.index(r["values"]["stage"]) for r in mine])
        want = naive_periods.night_summary(stage)
        assert want["total_sleep_min"] > 0
        for key, value in want.items():
            assert v[key] == pytest.approx(value), key
    outside = [r for r in sleep_records if "period" not in r["values"]]
    assert outside and all(r["values"]["stage"] == "wake" for r in outside)


def test_summary_sol_and_waso_by_hand() -> None:
    stage = np.array([0, 0, 0, 1, 1, 0, 0, 2, 3, 0, 0], dtype=np.int8)
    s = sleep.summarize_night(stage)
    assert s["sol_min"] == 1.5 and s["waso_min"] == 1.0 and s["total_sleep_min"] == 2.0
    assert s == {**s, **naive_periods.night_summary(stage)}
