"""Simulated band signals: determinism, formats, ground truth, and realism against real hypnograms."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest

from gateway.simulator import signals, stage_model
from gateway.simulator.signals import NON_WEAR, RUN, WALK, simulate_band

REPO_ROOT = Path(__file__).resolve().parents[2]
HYPNOGRAMS = REPO_ROOT / os.environ.get("BANDGATE_DATA", "../shared/data") / "sleep/psg_hypnograms"
needs_hypnograms = pytest.mark.skipif(
    not HYPNOGRAMS.is_dir(), reason=f"PSG hypnograms not found at {HYPNOGRAMS} (set BANDGATE_DATA)"
)
ARRAYS = ("accel", "hr_bpm", "rr_ms", "rr_end_us", "steps_per_s", "stage_per_epoch", "activity_per_s")
LOCAL_2230 = signals.DEFAULT_START_US + 13 * 3600 * 1_000_000 + 30 * 60 * 1_000_000  # 22:30 at +60 min


def _g(rec: signals.BandRecording) -> np.ndarray:
    return rec.accel * (2.0 * rec.accel_range_g / 2**rec.accel_bits)


def _first(seeds: range, minutes: float, want, **kwargs) -> tuple[signals.BandRecording, signals.Truth]:
    """The first seed whose day has what a test needs (deterministic: the code fixes which)."""
    for seed in seeds:
        rec, truth = signals._simulate(seed, minutes, **kwargs)
        if want(rec, truth):
            return rec, truth
    raise AssertionError("no seed produced the wanted recording")


def _sleep_period_stats(nights: list[np.ndarray]) -> dict[str, float]:
    """Deep share of sleep in the first and last third of each sleep period, and REM share, pooled."""
    deep_first = deep_last = rem = asleep_first = asleep_last = asleep = 0
    for night in nights:
        sleep = np.flatnonzero(night != stage_model.WAKE)
        if sleep.size < 60:
            continue
        period = night[sleep[0] : sleep[-1] + 1]
        third = period.size // 3
        first, last = period[:third], period[-third:]
        deep_first += np.count_nonzero(first == stage_model.DEEP)
        deep_last += np.count_nonzero(last == stage_model.DEEP)
        asleep_first += np.count_nonzero(first != stage_model.WAKE)
        asleep_last += np.count_nonzero(last != stage_model.WAKE)
        rem += np.count_nonzero(period == stage_model.REM)
        asleep += np.count_nonzero(period != stage_model.WAKE)
    return {
        "deep_first": deep_first / asleep_first,
        "deep_last": deep_last / asleep_last,
        "rem": rem / asleep,
    }


# --- determinism and format ---------------------------------------------------------------------


@pytest.mark.parametrize("scenario", signals.SCENARIOS)
def test_same_seed_gives_identical_bytes_and_other_seeds_differ(scenario: str) -> None:
    a = simulate_band(7, 45, scenario=scenario, start_us=LOCAL_2230)
    b = simulate_band(7, 45, scenario=scenario, start_us=LOCAL_2230)
    c = simulate_band(8, 45, scenario=scenario, start_us=LOCAL_2230)
    for name in ARRAYS:
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert a.device_id == b.device_id != c.device_id
    assert not np.array_equal(a.accel, c.accel)
    assert not np.array_equal(a.rr_ms[:100], c.rr_ms[:100])


def test_device_id_does_not_change_the_signals() -> None:
    a = simulate_band(3, 5)
    b = simulate_band(3, 5, device_id=12345)
    assert b.device_id == 12345
    assert np.array_equal(a.accel, b.accel) and np.array_equal(a.rr_ms, b.rr_ms)


@pytest.mark.parametrize(
    ("scenario", "fs", "bits"), [("day", 50, 12), ("day", 25, 16), ("night", 25, 12), ("mixed", 50, 16)]
)
def test_shapes_dtypes_and_ranges(scenario: str, fs: int, bits: int) -> None:
    minutes = 61.5
    rec = simulate_band(
        1, minutes, scenario=scenario, sample_rate_hz=fs, accel_bits=bits, start_us=LOCAL_2230
    )
    n_s = round(minutes * 60)
    assert (rec.sample_rate_hz, rec.accel_bits, rec.accel_range_g) == (fs, bits, 8)
    assert rec.accel.shape == (n_s * fs, 3) and rec.accel.dtype == np.int16
    for name, dtype, shape in [
        ("hr_bpm", np.uint8, (n_s,)),
        ("steps_per_s", np.uint16, (n_s,)),
        ("activity_per_s", np.uint8, (n_s,)),
        ("stage_per_epoch", np.int8, (n_s // 30,)),
    ]:
        arr = getattr(rec, name)
        assert arr.dtype == dtype and arr.shape == shape, name
    assert rec.rr_ms.dtype == np.uint16 and rec.rr_end_us.dtype == np.int64
    assert rec.rr_ms.shape == rec.rr_end_us.shape and rec.rr_ms.size > 0
    assert 0 < rec.device_id < 2**64
    assert set(np.unique(rec.activity_per_s)) <= set(range(6))
    assert set(np.unique(rec.stage_per_epoch)) <= {-1, 0, 1, 2, 3}
    worn = rec.hr_bpm[rec.hr_bpm > 0]
    assert worn.min() >= 35 and worn.max() <= 190
    assert rec.rr_ms.min() >= 300 and rec.rr_ms.max() <= 2000
    assert np.all(np.diff(rec.rr_end_us) > 0)
    assert rec.rr_end_us[0] >= rec.start_us and rec.rr_end_us[-1] < rec.start_us + n_s * 1_000_000


@pytest.mark.parametrize("bits", signals.ACCEL_BITS)
def test_accel_is_quantised_counts_of_about_one_g_at_rest(bits: int) -> None:
    rec, _ = _first(
        range(40), 120, lambda r, t: np.count_nonzero(r.activity_per_s == NON_WEAR) > 300, accel_bits=bits
    )
    top = 2 ** (bits - 1)
    assert rec.accel.min() >= -top and rec.accel.max() <= top - 1
    # On the table only gravity and noise remain: |a| ≈ 1 g (offset and gain errors are ~1-2 %).
    off = np.repeat(rec.activity_per_s == NON_WEAR, rec.sample_rate_hz)
    mag = np.linalg.norm(_g(rec)[off], axis=1)
    assert abs(np.median(mag) - 1.0) < 0.06
    assert np.std(mag) < 0.03


def test_accel_clips_to_a_small_range() -> None:
    rec, _ = _first(range(60), 90, lambda r, t: (r.activity_per_s == RUN).sum() > 120, accel_range_g=2)
    assert rec.accel.max() == 2**11 - 1 or rec.accel.min() == -(2**11)  # running impacts exceed 2 g


def test_bad_arguments_are_refused() -> None:
    for kwargs in ({"sample_rate_hz": 100}, {"accel_bits": 10}, {"accel_range_g": 3}, {"scenario": "week"}):
        with pytest.raises(ValueError):
            simulate_band(0, 1, **kwargs)
    with pytest.raises(ValueError):
        simulate_band(0, 0.001)


# --- steps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_steps_per_second_count_every_step_event_and_only_while_walking(seed: int) -> None:
    rec, truth = signals._simulate(seed, 30, scenario="day", sample_rate_hz=25)
    assert truth.step_times_s.size > 0
    assert int(rec.steps_per_s.sum()) == truth.step_times_s.size
    moving = np.isin(rec.activity_per_s, (WALK, RUN))
    assert rec.steps_per_s[~moving].sum() == 0  # gestures, typing and washing are not steps
    edges = np.arange(rec.steps_per_s.size + 1)
    assert np.array_equal(rec.steps_per_s, np.histogram(truth.step_times_s, edges)[0])


def test_cadence_and_gait_spectrum() -> None:
    """Cadence 1.5-2.2 Hz walking, 2.4-3.1 running; the spectral peak at half cadence for a swinging arm."""
    rec, truth = _first(
        range(40),
        60,
        lambda r, t: {b.style for b in t.bouts if b.stop_s - b.start_s > 60} >= {"stride", "still"},
    )
    fs, g = rec.sample_rate_hz, _g(rec)
    for bout in truth.bouts:
        if bout.label not in (WALK, RUN) or bout.stop_s - bout.start_s < 30:
            continue
        steps = truth.step_times_s[(truth.step_times_s >= bout.start_s) & (truth.step_times_s < bout.stop_s)]
        cadence = (steps.size - 1) / (steps[-1] - steps[0])
        assert (2.4 <= cadence <= 3.1) if bout.label == RUN else (1.5 <= cadence <= 2.2)
        if bout.style in ("stride", "still") and bout.stop_s - bout.start_s > 60:
            seg = g[(bout.start_s + 5) * fs : (bout.stop_s - 5) * fs]
            seg = seg - seg.mean(axis=0)
            freqs = np.fft.rfftfreq(seg.shape[0], 1.0 / fs)
            power = (np.abs(np.fft.rfft(seg, axis=0)) ** 2).sum(axis=1)
            band = (freqs > 0.5) & (freqs < 4.0)
            peak = freqs[band][np.argmax(power[band])]
            # A still arm (rail, bag, pocket) only shows the step-rate impacts.
            expected = cadence / 2 if bout.style == "stride" else cadence
            assert abs(peak - expected) < 0.1 * cadence


# --- heart --------------------------------------------------------------------------------------


def test_hr_is_zero_exactly_off_the_wrist_and_rr_only_while_worn() -> None:
    rec, _ = _first(range(40), 120, lambda r, t: np.count_nonzero(r.activity_per_s == NON_WEAR) > 60)
    off = rec.activity_per_s == NON_WEAR
    assert np.array_equal(rec.hr_bpm == 0, off)
    beat_s = (rec.rr_end_us - rec.start_us) // 1_000_000
    assert not off[beat_s].any()
    # Each RR interval is the gap between consecutive beats where both were recorded.
    gaps_ms = np.diff(rec.rr_end_us) / 1000.0
    contiguous = gaps_ms < 2000
    assert np.all(np.abs(gaps_ms[contiguous] - rec.rr_ms[1:][contiguous]) <= 1.0)


def test_hr_is_the_mean_rate_of_the_rr_series() -> None:
    rec = simulate_band(4, 10, scenario="night")
    t_end = (rec.rr_end_us - rec.start_us) / 1e6
    for s in range(100, 500, 37):
        # The intervals overlapping second s: from the first beat after s to the first at or after s + 1.
        first, last = np.searchsorted(t_end, s, "right"), np.searchsorted(t_end, s + 1, "left")
        rate = 60000.0 / rec.rr_ms[first : last + 1]
        assert rate.min() - 1 <= rec.hr_bpm[s] <= rate.max() + 1


def test_daytime_hr_rises_with_activity() -> None:
    rec, _ = _first(range(60), 120, lambda r, t: (r.activity_per_s == RUN).sum() > 300)
    hr = rec.hr_bpm.astype(float)
    act = rec.activity_per_s
    sitting = hr[act == signals.SEDENTARY].mean()
    # Skip each bout's first minute: the heart rate lags the effort.
    settled = np.convolve(np.isin(act, (WALK, RUN)), np.ones(60), "full")[: act.size] == 60
    walking = hr[settled & (act == WALK)].mean()
    running = hr[settled & (act == RUN)].mean()
    assert sitting < 85 and 85 <= walking <= 120 and 125 <= running <= 175


# --- nights -------------------------------------------------------------------------------------


@needs_hypnograms
def test_fit_script_reproduces_the_committed_model() -> None:
    spec = importlib.util.spec_from_file_location("fit_stage_model", REPO_ROOT / "scripts/fit_stage_model.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.fitted_json(HYPNOGRAMS) == stage_model.MODEL_PATH.read_text()


def test_committed_model_is_well_formed() -> None:
    model = stage_model.load_stage_model()
    assert np.allclose(model.jump.sum(axis=2), 1.0)
    assert np.all(np.diagonal(model.jump, axis1=1, axis2=2) == 0)
    assert np.all(model.max_dur >= 1)


def test_psg_codes_map_to_four_classes() -> None:
    assert stage_model.psg_to_band(np.array([0, 1, 2, 3, 4, 5])).tolist() == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        stage_model.psg_to_band(np.array([0, 6]))


def _simulated_nights(n: int, epochs: int) -> list[np.ndarray]:
    rng = np.random.default_rng(2024)
    model = stage_model.load_stage_model()
    return [stage_model.simulate_stages(model, rng, epochs) for _ in range(n)]


def test_simulated_nights_have_cycle_structure() -> None:
    """Deep sleep early, REM late: what a plain Markov chain cannot produce."""
    nights = _simulated_nights(80, 960)
    stats = _sleep_period_stats(nights)
    assert stats["deep_first"] > 2.5 * stats["deep_last"]
    rem_first = np.mean([(n[: n.size // 3] == stage_model.REM).mean() for n in nights])
    rem_last = np.mean([(n[-n.size // 3 :] == stage_model.REM).mean() for n in nights])
    assert rem_last > 2 * rem_first
    assert all(n[0] == stage_model.WAKE and n[-1] == stage_model.WAKE for n in nights)


@needs_hypnograms
def test_simulated_nights_resemble_the_real_hypnograms() -> None:
    real_nights = [n for n in stage_model.read_hypnograms(HYPNOGRAMS) if n.size >= 600]
    real = _sleep_period_stats(real_nights)
    sim = _sleep_period_stats(_simulated_nights(80, int(np.mean([n.size for n in real_nights]))))
    assert abs(sim["rem"] - real["rem"]) < 0.06
    assert abs(sim["deep_first"] - real["deep_first"]) < 0.12
    assert abs(sim["deep_last"] - real["deep_last"]) < 0.06
    # Night-to-night spread of the REM share: the same order as in real nights.
    real_sd = np.std([(n[n > 0] == stage_model.REM).mean() for n in real_nights])
    sim_sd = np.std([(n[n > 0] == stage_model.REM).mean() for n in _simulated_nights(80, 900)])
    assert sim_sd < 2.5 * real_sd


def test_night_signals_follow_the_stages() -> None:
    rec = simulate_band(5, 480, scenario="night", sample_rate_hz=25)
    stages = rec.stage_per_epoch
    assert np.count_nonzero(stages >= 0) > 0.9 * stages.size
    assert np.count_nonzero(np.isin(stages, (1, 2, 3))) > 0.6 * stages.size
    in_bed = np.repeat(stages >= 0, 30)
    assert np.all(rec.activity_per_s[: in_bed.size][in_bed] != NON_WEAR)
    assert rec.steps_per_s.sum() == 0

    n_ep = stages.size
    hr = rec.hr_bpm[: n_ep * 30].reshape(n_ep, 30).mean(axis=1)
    mag = np.linalg.norm(_g(rec)[: n_ep * 30 * 25].reshape(n_ep, 30 * 25, 3), axis=2)
    moved = np.ptp(mag, axis=1) > 0.08
    beat_epoch = (rec.rr_end_us - rec.start_us) // 30_000_000
    successive = np.diff(rec.rr_ms.astype(float))

    def rmssd(stage: int) -> float:
        mine = np.isin(beat_epoch, np.flatnonzero(stages == stage))
        return float(np.sqrt(np.mean(successive[mine[1:] & mine[:-1]] ** 2)))

    wake, light, deep, rem = (stages == s for s in range(4))
    assert hr[wake].mean() > hr[light].mean() > hr[deep].mean()
    assert hr[rem].mean() > hr[deep].mean()
    assert moved[wake].mean() > moved[light].mean() > moved[deep].mean()
    assert rmssd(2) > rmssd(1) > rmssd(3)


def test_mixed_day_has_day_and_night() -> None:
    local_2030 = LOCAL_2230 - 2 * 3600 * 1_000_000
    rec = simulate_band(2, 6 * 60, scenario="mixed", start_us=local_2030)
    assert (rec.stage_per_epoch[:60] == -1).all()  # 20:30-21:00 local is daytime
    assert (rec.stage_per_epoch >= 1).sum() > 120  # asleep for over an hour before 02:30
    assert (rec.activity_per_s == signals.SLEEP).any() and (rec.activity_per_s != signals.SLEEP).any()


@pytest.mark.slow
def test_a_day_at_50_hz_is_fast() -> None:
    t0 = time.perf_counter()
    rec = simulate_band(0, 24 * 60, scenario="mixed")
    assert time.perf_counter() - t0 < 15.0
    assert rec.accel.shape == (86_400 * 50, 3)
    assert dataclasses.is_dataclass(rec)
