"""Signal models of a simulated band: wrist acceleration, heart beats and their ground truth.

Everything is drawn from one `numpy.random.Generator` seeded by `seed`, in a fixed order, so the
same arguments give byte-identical recordings. Work is vectorised over samples; Python loops run
only over bouts, gestures and sleep movements (hundreds a day).

A recording is a timeline of bouts (sedentary, walking, running, non-wear, in bed) planned per
scenario, rendered in three layers:

Orientation. The static part of the reading is the "up" vector (1 g against gravity) in the band
frame: x along the forearm towards the hand, y across the wrist, z out of the display. Each bout
sets posture keyframes (desk, lap, arm hanging, running arm bent, band on a table, a lying
position); the up vector is interpolated between keyframes, so orientation drifts slowly within
a bout and turns over a second or two between bouts, and at sleep position changes.

Motion. Gait is a forearm pendulum about the band's z axis, phase-locked to the step times: the
swing angle is `A·sin(π·k(t))` with `k(t)` the interpolated step index, i.e. one swing period
per stride (half the step cadence). It rotates the up vector and adds tangential (stride rate) and
centripetal (step rate) acceleration for an arm of length L. Every step adds a damped 6 Hz impact
and a step-rate body bounce along the vertical. Four styles: "stride" (large swing, small impacts:
the dominant component at half cadence), "swing" (normal), "still" (hand on a rail, bag or in a
pocket: only step-rate impacts) and "run" (bent arm, large swing, 1-2 g impacts). Step times are
ground truth: cadence 1.6-2.1 Hz walking and 2.5-3.0 Hz running, with slow drift and 2.5 % jitter.
Sedentary bouts have gestures that are not steps: aperiodic reaches, typing taps at 3-6 Hz, and
washing or brushing-like periodic bursts at 3-6 Hz. Asleep, movement bursts and position changes
come at stage-dependent rates (wake frequent, light occasional, deep almost none, REM rare short
twitches). On top: per-device offset (~15 mg) and gain (~1 %) errors, 3 mg white noise, then
quantisation to the band's counts (`round(g / lsb)`, clipped to the signed range).

Heart. A per-second target heart rate follows activity (sedentary at the subject's resting rate,
walking ~90-115, running ~125-170 with drift, asleep a 50-68 bpm baseline + stage offset
wake > REM ≈ light > deep, minus ~1 bpm/h) and arousals; a causal exponential lag (τ 20 s)
smooths it. Beats come from an integrate-and-fire model of the RR interval `60000/HR + RSA`,
respiratory sinus arrhythmia at the breathing rate (~0.25 Hz asleep, irregular in REM, faster
when running), then per-beat timing jitter. Stage-dependent RSA and jitter give RMSSD highest and
most regular in deep sleep (~50 ms), lower in light, lowest and more irregular (slow LF wander)
in REM and wake (literature: vagal tone peaks in N3). `hr_bpm` is the time-weighted mean of the
instantaneous rate 60000/RR over each second, computed from the beat times, rounded; 0 when the
band is off the wrist, and RR intervals touching non-wear are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gateway.simulator import stage_model

DEFAULT_START_US = 1_767_600_000_000_000  # 2026-01-05T08:00:00Z
SCENARIOS = ("day", "night", "mixed", "schedule")
# Bouts a `schedule` names (minutes from sample 0): "sleep" in bed, "desk" work (typing, reaches),
# "couch" (evening TV: lap posture, few gestures), "day" (the random day plan), "walk".
SCHEDULE_LABELS = ("sleep", "desk", "couch", "day", "walk")
SAMPLE_RATES_HZ = (25, 50)
ACCEL_BITS = (12, 16)
ACCEL_RANGES_G = (2, 4, 8, 16)

# Activity labels (activity_per_s).
SEDENTARY, WALK, RUN, NON_WEAR, SLEEP, GESTURE = 0, 1, 2, 3, 4, 5

G = 9.81  # m/s² per g
NOISE_G = 0.003  # white sensor noise, per axis
OFFSET_G = 0.015  # per-device zero-g offset spread
GAIN_SD = 0.008  # per-device sensitivity error spread
HR_LAG_S = 20.0  # time constant of the heart rate's response to effort
HEART_GRID_HZ = 4  # resolution of the integrate-and-fire heart model

# Gait styles: (swing amplitude rad, arm length m, impact g, body bounce g), each as a (low, high) range.
_GAIT = {
    "stride": ((0.30, 0.45), 0.60, (0.05, 0.10), (0.02, 0.04)),
    "swing": ((0.15, 0.30), 0.60, (0.12, 0.25), (0.04, 0.08)),
    "still": ((0.00, 0.03), 0.60, (0.04, 0.10), (0.03, 0.06)),
    "run": ((0.45, 0.70), 0.35, (0.80, 2.00), (0.20, 0.40)),
}

# Up vectors in the band frame for each posture family (before a random tilt).
_UP_DESK = (0.1, 0.1, 0.98)
_UP_LAP = (0.0, 0.95, 0.3)
_UP_HANGING = (-0.97, 0.1, 0.2)
_UP_RUN = (-0.4, 0.85, 0.35)
_UP_STILL = ((0.0, 0.3, 0.95), (-0.7, 0.7, 0.0), (-1.0, 0.0, 0.05))
_UP_TABLE = ((0.0, 0.0, 1.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0))

# Asleep, per stage (wake, light, deep, REM).
_MOVES_PER_EPOCH = np.array([0.5, 0.06, 0.01, 0.04])
_MOVE_S = ((1.0, 6.0), (1.0, 4.0), (0.5, 2.0), (0.2, 0.6))
_MOVE_G = ((0.05, 0.30), (0.03, 0.15), (0.02, 0.05), (0.02, 0.08))
_TURNS_PER_EPOCH = np.array([0.06, 0.012, 0.002, 0.004])
_STAGE_HR = np.array([7.0, 1.5, -2.5, 2.5])  # bpm above the subject's sleeping baseline
_STAGE_RSA_MS = np.array([18.0, 36.0, 48.0, 18.0])
_STAGE_JITTER_MS = np.array([9.0, 6.0, 4.0, 10.0])
_STAGE_LF_BPM = np.array([3.0, 1.5, 0.7, 3.0])  # slow heart-rate wander, irregular in REM and wake
_STAGE_RESP_SD_HZ = np.array([0.04, 0.02, 0.01, 0.05])


@dataclass(frozen=True)
class BandRecording:
    """What one band records, with the simulator's ground truth (steps, stages, activity)."""

    device_id: int  # u64
    start_us: int  # UTC µs of sample 0
    utc_offset_min: int
    sample_rate_hz: int  # 25 or 50
    accel_bits: int  # 12 or 16
    accel_range_g: int
    accel: np.ndarray  # int16 (n, 3) counts
    hr_bpm: np.ndarray  # uint8 (n_seconds,), 0 = no reading
    rr_ms: np.ndarray  # uint16 (n_beats,)
    rr_end_us: np.ndarray  # int64 (n_beats,), UTC µs of the beat that ends each interval
    steps_per_s: np.ndarray  # uint16 (n_seconds,)
    stage_per_epoch: np.ndarray  # int8 (n_seconds // 30,): -1 outside nights, 0 wake 1 light 2 deep 3 REM
    activity_per_s: np.ndarray  # uint8 (n_seconds,): 0 sedentary 1 walk 2 run 3 non-wear 4 sleep 5 gestures


@dataclass
class Bout:
    """One planned stretch of the timeline, in whole seconds from sample 0."""

    label: int  # SEDENTARY, WALK, RUN, NON_WEAR or SLEEP (in bed)
    start_s: int
    stop_s: int
    style: str = ""  # gait style for WALK and RUN
    stages: np.ndarray | None = None  # in bed: stage per 30-s epoch from start_s


@dataclass
class Truth:
    """Ground truth that the recording does not carry: the plan and every step event."""

    bouts: list[Bout]
    step_times_s: np.ndarray  # seconds from sample 0


@dataclass
class _Subject:
    sleep_hr: float  # sleeping baseline, bpm
    rest_hr: float  # awake at rest, bpm
    fit_bpm: float  # offset of the effort heart rate
    vagal: float  # scales RSA and jitter (between-subject HRV spread)
    wrist_sign: float  # +1 or -1: which wrist mirrors the y axis
    offset_g: np.ndarray
    gain: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Subject:
        sleep_hr = rng.uniform(50.0, 68.0)
        return cls(
            sleep_hr=sleep_hr,
            rest_hr=sleep_hr + rng.uniform(8.0, 14.0),
            fit_bpm=rng.normal(0.0, 4.0),
            vagal=float(np.exp(rng.normal(0.0, 0.25))),
            wrist_sign=float(rng.choice((-1.0, 1.0))),
            offset_g=rng.normal(0.0, OFFSET_G, 3),
            gain=1.0 + rng.normal(0.0, GAIN_SD, 3),
        )


@dataclass
class _Gait:
    i0: int  # sample range of the bout
    i1: int
    steps_s: np.ndarray
    swing_rad: float
    arm_m: float
    impact_g: np.ndarray  # per step
    bounce_g: float
    axis: np.ndarray  # swing axis, band frame


@dataclass
class _Canvas:
    """Per-second and per-sample layers the bouts are rendered onto."""

    fs: int
    n_seconds: int
    subject: _Subject
    key_t: list[float] = field(default_factory=list)
    key_up: list[np.ndarray] = field(default_factory=list)
    gaits: list[_Gait] = field(default_factory=list)

    def __post_init__(self) -> None:
        n, s = self.n_seconds * self.fs, self.n_seconds
        self.lin = np.zeros((n, 3), dtype=np.float32)  # linear acceleration, g
        self.activity = np.full(s, SEDENTARY, dtype=np.uint8)
        self.stage_epoch = np.full(s // stage_model.EPOCH_S, -1, dtype=np.int8)
        self.hr_target = np.full(s, self.subject.rest_hr)
        self.rsa_ms = np.full(s, 25.0)
        self.jitter_ms = np.full(s, 7.0)
        self.lf_bpm = np.full(s, 2.0)
        self.resp_hz = np.full(s, 0.25)
        self.resp_sd_hz = np.full(s, 0.03)

    def key(self, t_s: float, up: np.ndarray) -> None:
        self.key_t.append(float(t_s))
        self.key_up.append(up)


# --- small helpers ------------------------------------------------------------------------------


def _unit(v: np.ndarray | tuple) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _turn(rng: np.random.Generator, up: np.ndarray, angle_rad: float) -> np.ndarray:
    """`up` rotated by `angle_rad` about a random axis perpendicular to it."""
    axis = _unit(np.cross(up, rng.standard_normal(3)))
    return _unit(up * np.cos(angle_rad) + np.cross(axis, up) * np.sin(angle_rad))


def _posture(rng: np.random.Generator, base: tuple, subject: _Subject, tilt_rad: float) -> np.ndarray:
    up = _unit(base) * np.array([1.0, subject.wrist_sign, 1.0])
    return _turn(rng, up, rng.uniform(0.0, tilt_rad))


def _rotate(v: np.ndarray, axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate rows of `v` about a fixed unit `axis` by per-row `angle` (Rodrigues)."""
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return v * c + np.cross(axis, v) * s + np.outer(v @ axis, axis) * (1.0 - c)


def _smooth_noise(rng: np.random.Generator, n: int, step: float) -> np.ndarray:
    """Roughly unit-variance noise varying on a scale of `step` samples (interpolated knots)."""
    knots = rng.standard_normal(int(n / step) + 2)
    return np.interp(np.arange(n) / step, np.arange(knots.size), knots)


def _lognormal_s(rng: np.random.Generator, median_s: float, sd: float, lo: float, hi: float) -> int:
    return int(np.clip(median_s * np.exp(rng.normal(0.0, sd)), lo, hi))


def _hann(n: int) -> np.ndarray:
    return np.hanning(n + 2)[1:-1] if n > 0 else np.zeros(0)


# --- planning -----------------------------------------------------------------------------------

# Next-bout weights during the day; a bout is never followed by the same label except walking.
_DAY_NEXT = {SEDENTARY: 0.50, WALK: 0.36, RUN: 0.04, NON_WEAR: 0.06}
_DAY_DURATION = {  # median s, log sd, min s, max s
    SEDENTARY: (600.0, 0.8, 60.0, 5400.0),
    WALK: (150.0, 0.9, 20.0, 1800.0),
    RUN: (600.0, 0.5, 120.0, 3600.0),
    NON_WEAR: (900.0, 0.8, 120.0, 7200.0),
}
_WALK_STYLES = ("stride", "swing", "still")
_WALK_STYLE_P = (0.3, 0.45, 0.25)


def _plan_day(rng: np.random.Generator, t0: int, t1: int, bouts: list[Bout]) -> None:
    prev = -1
    t = t0
    while t < t1:
        labels = [lab for lab in _DAY_NEXT if lab != prev or lab == WALK]
        w = np.array([_DAY_NEXT[lab] for lab in labels])
        label = labels[rng.choice(len(labels), p=w / w.sum())]
        stop = min(t + _lognormal_s(rng, *_DAY_DURATION[label]), t1)
        if t1 - stop < 20:  # no slivers at the end
            stop = t1
        style = {WALK: str(rng.choice(_WALK_STYLES, p=_WALK_STYLE_P)), RUN: "run"}.get(label, "")
        bouts.append(Bout(label, t, stop, style))
        prev, t = label, stop


def _ensure_walk(rng: np.random.Generator, bouts: list[Bout]) -> None:
    """A day recording always has steps: put a walk in the middle if the plan drew none."""
    if any(b.label in (WALK, RUN) for b in bouts):
        return
    t0, t1 = bouts[0].start_s, bouts[-1].stop_s
    length = max(1, min(180, (t1 - t0) * 3 // 10))
    w0 = (t0 + t1 - length) // 2
    out = []
    for b in bouts:
        if b.stop_s <= w0 or b.start_s >= w0 + length:
            out.append(b)
            continue
        if b.start_s < w0:
            out.append(Bout(b.label, b.start_s, w0, b.style))
        out.append(Bout(WALK, w0, w0 + length, "swing"))
        if b.stop_s > w0 + length:
            out.append(Bout(b.label, w0 + length, b.stop_s, b.style))
    bouts[:] = out


def _plan_night(rng: np.random.Generator, bed_s: int, rise_s: int, n_seconds: int, bouts: list[Bout]) -> None:
    """An in-bed bout [bed_s, rise_s), both multiples of 30 s, clipped to the recording."""
    stages = stage_model.simulate_stages(
        stage_model.load_stage_model(), rng, (rise_s - bed_s) // stage_model.EPOCH_S
    )
    start, stop = max(bed_s, 0), min(rise_s, n_seconds)
    if stop > start:
        bouts.append(Bout(SLEEP, start, stop, stages=stages[(start - bed_s) // stage_model.EPOCH_S :]))


def _plan_schedule(rng: np.random.Generator, schedule: tuple, n_seconds: int, bouts: list[Bout]) -> None:
    """Bouts at the minutes `schedule` gives: ((label, start_min, stop_min), ...), in order; the time it
    leaves out is a random day plan."""
    epoch = stage_model.EPOCH_S
    t = 0
    for label, start_min, stop_min in schedule:
        if label not in SCHEDULE_LABELS:
            raise ValueError(f"schedule label must be one of {SCHEDULE_LABELS}")
        a = round(start_min * 60) // epoch * epoch
        b = min(round(stop_min * 60) // epoch * epoch, n_seconds)
        if a < t or b <= a:
            raise ValueError("schedule bouts must be in order, not overlapping, and not empty")
        if a > t:
            _plan_day(rng, t, a, bouts)
        if label == "sleep":
            _plan_night(rng, a, b, n_seconds, bouts)
        elif label == "day":
            _plan_day(rng, a, b, bouts)
        elif label == "walk":
            bouts.append(Bout(WALK, a, b, "swing"))
        else:
            bouts.append(Bout(SEDENTARY, a, b, label))
        t = b
    if t < n_seconds:
        _plan_day(rng, t, n_seconds, bouts)


def _plan(
    rng: np.random.Generator, scenario: str, n_seconds: int, local0_s: int, schedule: tuple = ()
) -> list[Bout]:
    bouts: list[Bout] = []
    epoch = stage_model.EPOCH_S
    if scenario == "schedule":
        _plan_schedule(rng, schedule, n_seconds, bouts)
    elif scenario == "day":
        _plan_day(rng, 0, n_seconds, bouts)
        _ensure_walk(rng, bouts)
    elif scenario == "night":
        pre = int(min(900, n_seconds // 10)) // epoch * epoch
        post = int(min(600, n_seconds // 12))
        bed_stop = pre + (n_seconds - post - pre) // epoch * epoch
        if bed_stop <= pre:
            bouts.append(Bout(SEDENTARY, 0, n_seconds))
        else:
            if pre:
                bouts.append(Bout(SEDENTARY, 0, pre))
            _plan_night(rng, pre, bed_stop, n_seconds, bouts)
            if bed_stop < n_seconds:
                bouts.append(Bout(SEDENTARY, bed_stop, n_seconds))
    else:  # mixed: nights at the local bedtime, days in between
        day_s = 86_400
        first_midnight = -local0_s  # recording seconds of the local midnight starting day 0
        t = 0
        for d in range(-1, n_seconds // day_s + 2):
            bed = first_midnight + d * day_s + int(rng.normal(23.0, 0.6) * 3600)
            bed = bed // epoch * epoch
            rise = bed + int(np.clip(rng.normal(7.8, 0.5), 6.5, 9.0) * 3600) // epoch * epoch
            if rise <= t or bed >= n_seconds:
                continue
            wind_down = min(max(bed - t, 0), 1200)  # sedentary before bed: brushing teeth, reading
            _plan_day(rng, t, bed - wind_down, bouts)
            if wind_down:
                bouts.append(Bout(SEDENTARY, bed - wind_down, bed))
            _plan_night(rng, bed, rise, n_seconds, bouts)
            t = rise
        if t < n_seconds:
            _plan_day(rng, t, n_seconds, bouts)
    return [b for b in bouts if b.stop_s > b.start_s]


# --- rendering ----------------------------------------------------------------------------------


def _secs(a: float, b: float, n: int) -> slice:
    return slice(max(int(np.floor(a)), 0), min(int(np.ceil(b)), n))


def _add_burst(
    canvas: _Canvas, rng: np.random.Generator, t0: float, dur: float, amp_g: float, hz: float
) -> None:
    """Aperiodic movement: band-limited noise (up to `hz`) in a Hann window."""
    fs = canvas.fs
    i0 = int(t0 * fs)
    m = min(max(int(dur * fs), 2), canvas.lin.shape[0] - i0)
    if m <= 0:
        return
    step = max(fs / (2.0 * hz), 1.0)
    motion = np.stack([_smooth_noise(rng, m, step) for _ in range(3)], axis=1)
    canvas.lin[i0 : i0 + m] += (amp_g * motion * _hann(m)[:, None]).astype(np.float32)


def _add_periodic(
    canvas: _Canvas, rng: np.random.Generator, t0: float, dur: float, amp_g: float, hz: float
) -> None:
    """Washing or brushing-like burst: a wobbling 3-6 Hz oscillation along a random direction."""
    fs = canvas.fs
    i0 = int(t0 * fs)
    m = min(max(int(dur * fs), 2), canvas.lin.shape[0] - i0)
    if m <= 0:
        return
    freq = hz * (1.0 + 0.08 * _smooth_noise(rng, m, fs))
    phase = 2.0 * np.pi * np.cumsum(freq) / fs + rng.uniform(0, 2 * np.pi)
    wave = np.sin(phase) + 0.3 * np.sin(2.0 * phase + rng.uniform(0, 2 * np.pi))
    env = np.minimum(1.0, np.minimum(np.arange(m), np.arange(m)[::-1]) / (0.3 * fs))
    direction = _unit(rng.standard_normal(3))
    canvas.lin[i0 : i0 + m] += (amp_g * (wave * env)[:, None] * direction).astype(np.float32)


def _add_taps(
    canvas: _Canvas, rng: np.random.Generator, t0: float, dur: float, amp_g: float, hz: float
) -> None:
    """Typing: small damped taps at an irregular 3-6 Hz."""
    fs = canvas.fs
    i0 = int(t0 * fs)
    m = min(max(int(dur * fs), 2), canvas.lin.shape[0] - i0)
    if m <= 0:
        return
    times = np.cumsum(rng.exponential(0.5 / hz, int(dur * hz * 2) + 2) + 0.5 / hz)
    idx = (times[times < dur] * fs).astype(np.int64)
    train = np.zeros(m)
    np.add.at(train, idx[idx < m], amp_g * rng.uniform(0.5, 1.5, np.count_nonzero(idx < m)))
    kt = np.arange(int(0.12 * fs)) / fs
    tap = np.convolve(train, np.exp(-kt / 0.02) * np.sin(2 * np.pi * 9.0 * kt))[:m]
    direction = _unit(rng.standard_normal(3) + np.array([0.0, 0.0, 2.0]))
    canvas.lin[i0 : i0 + m] += (tap[:, None] * direction).astype(np.float32)


# Sedentary styles: posture weights (desk, lap, hanging), seconds between gestures, gesture kind weights
# (reach, typing, periodic). "couch" is the hard case for sleep detection: an hour of TV with the arm on
# a cushion moves the wrist about as often as light sleep does; only the heart rate stays awake.
_SEDENTARY_STYLE = {
    "": ((0.6, 0.3, 0.1), 90.0, (0.55, 0.25, 0.20)),
    "desk": ((1.0, 0.0, 0.0), 60.0, (0.35, 0.60, 0.05)),
    "couch": ((0.0, 1.0, 0.0), 300.0, (0.85, 0.0, 0.15)),
}


def _render_sedentary(canvas: _Canvas, rng: np.random.Generator, bout: Bout) -> None:
    subj, a, b = canvas.subject, bout.start_s, bout.stop_s
    posture_p, gesture_gap_s, kind_p = _SEDENTARY_STYLE[bout.style]
    base = _posture(rng, (_UP_DESK, _UP_LAP, _UP_HANGING)[rng.choice(3, p=posture_p)], subj, 0.3)
    t = a + min(1.5, (b - a) / 2)
    while t < b:  # slow drift and posture shifts
        canvas.key(t, _turn(rng, base, rng.uniform(0.0, 0.12)))
        t += rng.uniform(15.0, 90.0)
    canvas.key(max(b - 0.5, a), base)
    canvas.hr_target[a:b] = subj.rest_hr
    n_gestures = rng.poisson((b - a) / gesture_gap_s)
    for t0 in np.sort(rng.uniform(a, b, n_gestures)):
        kind = rng.choice(3, p=kind_p)
        if kind == 0:  # reach, scratch, turn the wrist: aperiodic, changes orientation
            dur = min(rng.uniform(1.0, 4.0), b - t0)
            _add_burst(canvas, rng, t0, dur, rng.uniform(0.1, 0.4), 3.0)
            canvas.key(t0 + dur / 2, _turn(rng, base, rng.uniform(0.4, 1.0)))
            bump = 3.0
        elif kind == 1:
            dur = min(rng.uniform(5.0, 40.0), b - t0)
            _add_taps(canvas, rng, t0, dur, rng.uniform(0.02, 0.06), rng.uniform(3.0, 6.0))
            bump = 1.0
        else:
            dur = min(rng.uniform(5.0, 30.0), b - t0)
            _add_periodic(canvas, rng, t0, dur, rng.uniform(0.3, 1.0), rng.uniform(3.0, 6.0))
            bump = 6.0
        sl = _secs(t0, t0 + dur, canvas.n_seconds)
        canvas.activity[sl] = GESTURE
        canvas.hr_target[sl] += bump


def _render_non_wear(canvas: _Canvas, rng: np.random.Generator, bout: Bout) -> None:
    a, b = bout.start_s, bout.stop_s
    up = _turn(rng, _unit(_UP_TABLE[rng.choice(3, p=(0.8, 0.1, 0.1))]), rng.uniform(0.0, 0.03))
    canvas.key(a + min(2.0, (b - a) / 3), up)
    canvas.key(max(b - 2.0, a + (b - a) * 2 / 3), up)
    canvas.activity[a:b] = NON_WEAR
    canvas.hr_target[a:b] = canvas.subject.rest_hr


def _render_gait(canvas: _Canvas, rng: np.random.Generator, bout: Bout) -> np.ndarray:
    subj, a, b, fs = canvas.subject, bout.start_s, bout.stop_s, canvas.fs
    running = bout.style == "run"
    cadence = rng.uniform(2.5, 3.0) if running else rng.uniform(1.6, 2.1)
    n_max = int((b - a) * cadence * 1.3) + 4
    local = cadence * (1.0 + 0.03 * _smooth_noise(rng, n_max, 20.0))
    intervals = (1.0 + 0.025 * rng.standard_normal(n_max)) / local
    steps = a + rng.uniform(0.2, 0.8) + np.concatenate(([0.0], np.cumsum(intervals[:-1])))
    steps = steps[steps < b - 0.1]

    swing_rng, arm_m, impact_rng, bounce_rng = _GAIT[bout.style]
    if running:
        base = _posture(rng, _UP_RUN, subj, 0.25)
    elif bout.style == "still":
        base = _posture(rng, _UP_STILL[rng.choice(3)], subj, 0.3)
    else:
        base = _posture(rng, _UP_HANGING, subj, 0.25)
    t = a + min(1.5, (b - a) / 2)
    while t < b:
        canvas.key(t, _turn(rng, base, rng.uniform(0.0, 0.08)))
        t += rng.uniform(5.0, 15.0)
    canvas.key(max(b - 0.5, a), base)
    canvas.gaits.append(
        _Gait(
            i0=a * fs,
            i1=b * fs,
            steps_s=steps,
            swing_rad=rng.uniform(*swing_rng),
            arm_m=arm_m,
            impact_g=rng.uniform(*impact_rng)
            * np.clip(1.0 + 0.15 * rng.standard_normal(steps.size), 0.4, 1.6),
            bounce_g=rng.uniform(*bounce_rng),
            axis=_unit(np.array([0.0, 0.0, 1.0]) + 0.15 * rng.standard_normal(3)),
        )
    )
    canvas.activity[a:b] = RUN if running else WALK
    minutes = (np.arange(b - a) + 0.5) / 60.0
    if running:  # effort level with cardiac drift over the bout
        hr = 140.0 + 25.0 * (cadence - 2.75) + subj.fit_bpm + 0.5 * minutes
        canvas.hr_target[a:b] = np.clip(hr, 125.0, 170.0)
        canvas.rsa_ms[a:b], canvas.jitter_ms[a:b], canvas.resp_hz[a:b] = 2.0, 2.0, 0.5
    else:
        canvas.hr_target[a:b] = np.clip(97.0 + 30.0 * (cadence - 1.85) + subj.fit_bpm, 85.0, 118.0)
        canvas.rsa_ms[a:b], canvas.jitter_ms[a:b], canvas.resp_hz[a:b] = 8.0, 4.0, 0.33
    return steps


def _apply_gait(up: np.ndarray, lin: np.ndarray, fs: int, g: _Gait) -> None:
    """Swing the arm and add step impacts, given the bout's posture (up vectors)."""
    if g.steps_s.size < 2:
        return
    t = np.arange(g.i0, g.i1) / fs
    k = np.interp(t, g.steps_s, np.arange(g.steps_s.size, dtype=np.float64))
    last = g.steps_s.size - 1
    envelope = np.clip(np.minimum(k, last - k) / 2.0, 0.0, 1.0)  # the swing builds up over two steps
    step_rate = np.gradient(k, 1.0 / fs)
    phase = np.pi * k
    omega = np.pi * step_rate
    amp = g.swing_rad * envelope
    theta = amp * np.sin(phase)
    theta_dot = amp * np.cos(phase) * omega
    theta_ddot = -amp * np.sin(phase) * omega**2
    posture = up[g.i0 : g.i1].astype(np.float64)
    arm = np.array([1.0, 0.0, 0.0])  # elbow to wrist, band frame
    tangential = _unit(np.cross(g.axis, arm))
    linear = g.arm_m / G * (np.outer(theta_ddot, tangential) - np.outer(theta_dot**2, arm))

    idx = np.clip(np.rint((g.steps_s - t[0]) * fs).astype(np.int64), 0, t.size - 1)
    train = np.zeros(t.size)
    np.add.at(train, idx, g.impact_g)
    kt = np.arange(int(0.3 * fs)) / fs
    impacts = np.convolve(train, np.exp(-kt / 0.05) * np.sin(2.0 * np.pi * 6.0 * kt))[: t.size]
    bounce = g.bounce_g * np.cos(2.0 * np.pi * k) * np.minimum(envelope * 2.0, 1.0)
    linear += (impacts + bounce)[:, None] * posture

    # Turning the arm by +θ turns gravity by -θ in the band frame; near the arm's pendulum frequency
    # this cancels the tangential term, as for any freely swinging pendulum.
    up[g.i0 : g.i1] = _rotate(posture, g.axis, -theta)
    lin[g.i0 : g.i1] += linear.astype(np.float32)


def _render_sleep(canvas: _Canvas, rng: np.random.Generator, bout: Bout) -> None:
    subj, a, b, epoch = canvas.subject, bout.start_s, bout.stop_s, stage_model.EPOCH_S
    assert bout.stages is not None
    n_epochs = -(-(b - a) // epoch)
    stages = bout.stages[:n_epochs]
    per_s = np.repeat(stages, epoch)[: b - a]
    e0 = a // epoch
    e1 = min(e0 + stages.size, canvas.stage_epoch.size)
    canvas.stage_epoch[e0:e1] = stages[: e1 - e0]
    canvas.activity[a:b] = np.where(per_s == stage_model.WAKE, SEDENTARY, SLEEP)

    hours = (np.arange(b - a) + 0.5) / 3600.0
    canvas.hr_target[a:b] = subj.sleep_hr + _STAGE_HR[per_s] - 1.0 * hours
    canvas.rsa_ms[a:b] = _STAGE_RSA_MS[per_s]
    canvas.jitter_ms[a:b] = _STAGE_JITTER_MS[per_s]
    canvas.lf_bpm[a:b] = _STAGE_LF_BPM[per_s]
    canvas.resp_hz[a:b] = 0.24
    canvas.resp_sd_hz[a:b] = _STAGE_RESP_SD_HZ[per_s]

    up = _unit(rng.standard_normal(3))
    canvas.key(a + min(2.0, (b - a) / 2), up)
    turns = rng.random(stages.size) < _TURNS_PER_EPOCH[stages]
    moves = rng.poisson(_MOVES_PER_EPOCH[stages])
    for e in np.flatnonzero(turns | (moves > 0)):
        st = int(stages[e])
        for t0 in np.sort(a + epoch * e + rng.uniform(0.0, epoch, moves[e])):
            if t0 >= b:
                continue
            dur = rng.uniform(*_MOVE_S[st])
            _add_burst(canvas, rng, t0, dur, rng.uniform(*_MOVE_G[st]), 3.0)
            canvas.hr_target[_secs(t0, t0 + dur + 5.0, canvas.n_seconds)] += 4.0
        if turns[e]:
            t0 = a + epoch * e + rng.uniform(0.0, epoch - 5.0)
            if t0 + 5.0 >= b:
                continue
            dur = rng.uniform(2.0, 4.0)
            canvas.key(t0, up)
            up = _turn(rng, up, rng.uniform(0.8, 2.5))
            canvas.key(t0 + dur, up)
            _add_burst(canvas, rng, t0, dur, rng.uniform(0.2, 0.5), 3.0)
            canvas.hr_target[_secs(t0, t0 + dur + 10.0, canvas.n_seconds)] += 10.0
    canvas.key(max(b - 0.5, a), up)


def _orientation(canvas: _Canvas, n: int) -> np.ndarray:
    """Per-sample up vectors interpolated between posture keyframes (float64, unit)."""
    order = np.argsort(np.asarray(canvas.key_t), kind="stable")
    times = np.asarray(canvas.key_t)[order]
    ups = np.asarray(canvas.key_up)[order]
    # Linear interpolation through nearly opposite keyframes would pass near zero: add a midpoint.
    flip = np.flatnonzero(np.einsum("ij,ij->i", ups[:-1], ups[1:]) < -0.3)
    if flip.size:
        mids = ups[flip] + ups[flip + 1]
        side = _unit(np.cross(ups[flip], np.array([0.3, 0.5, 0.8])))
        mids = _unit(np.where(np.linalg.norm(mids, axis=1, keepdims=True) < 0.5, side, mids))
        times = np.insert(times, flip + 1, (times[flip] + times[flip + 1]) / 2)
        ups = np.insert(ups, flip + 1, mids, axis=0)
    t = np.arange(n) / canvas.fs
    up = np.stack([np.interp(t, times, ups[:, j]) for j in range(3)], axis=1)
    return _unit(up)


def _lag(x: np.ndarray, tau: float) -> np.ndarray:
    """Causal first-order lag of a 1 Hz series (exponential kernel, unit gain)."""
    kernel = np.exp(-np.arange(int(5 * tau)) / tau)
    kernel /= kernel.sum()
    padded = np.concatenate((np.full(kernel.size - 1, x[0]), x))
    return np.convolve(padded, kernel, mode="valid")


def _heart(canvas: _Canvas, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Beat times (s from sample 0) and per-second mean heart rate from them."""
    s = canvas.n_seconds
    subj = canvas.subject
    hr_s = _lag(canvas.hr_target, HR_LAG_S) + _lag(canvas.lf_bpm, 10.0) * _smooth_noise(rng, s, 12.0)
    dt = 1.0 / HEART_GRID_HZ
    t = np.arange(-2.0, s + 2.0, dt)
    centers = np.arange(s) + 0.5
    hr = np.interp(t, centers, hr_s)
    rsa = np.interp(t, centers, _lag(canvas.rsa_ms, 10.0)) * subj.vagal * (60.0 / hr) ** 2
    resp_hz = np.interp(t, centers, _lag(canvas.resp_hz, 10.0))
    resp_hz += np.interp(t, centers, canvas.resp_sd_hz) * _smooth_noise(rng, t.size, 8.0 * HEART_GRID_HZ)
    resp_phase = 2.0 * np.pi * np.cumsum(np.clip(resp_hz, 0.1, 0.8)) * dt
    rr_s = (60.0 / hr) + rsa / 1000.0 * np.sin(resp_phase)
    beats_phase = np.cumsum(dt / rr_s)
    k = np.arange(np.ceil(beats_phase[0]), np.floor(beats_phase[-1]) + 1)
    beats = np.interp(k, beats_phase, t)
    jitter = np.interp(beats, centers, canvas.jitter_ms) * subj.vagal / 1000.0
    beats = np.maximum.accumulate(beats + jitter * np.clip(rng.standard_normal(beats.size), -3.0, 3.0))
    count = np.interp(np.arange(s + 1, dtype=np.float64), beats, np.arange(beats.size, dtype=np.float64))
    return beats, 60.0 * np.diff(count)


def _simulate(
    seed: int,
    minutes: float,
    *,
    device_id: int | None = None,
    start_us: int = DEFAULT_START_US,
    sample_rate_hz: int = 50,
    accel_bits: int = 12,
    accel_range_g: int = 8,
    utc_offset_min: int = 60,
    scenario: str = "day",
    schedule: tuple = (),
) -> tuple[BandRecording, Truth]:
    if sample_rate_hz not in SAMPLE_RATES_HZ:
        raise ValueError(f"sample_rate_hz must be one of {SAMPLE_RATES_HZ}")
    if accel_bits not in ACCEL_BITS:
        raise ValueError(f"accel_bits must be one of {ACCEL_BITS}")
    if accel_range_g not in ACCEL_RANGES_G:
        raise ValueError(f"accel_range_g must be one of {ACCEL_RANGES_G}")
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}")
    n_seconds = round(minutes * 60.0)
    if n_seconds < 1:
        raise ValueError("minutes must cover at least one second")

    rng = np.random.default_rng(seed)
    drawn_id = int(rng.integers(0, 2**64, dtype=np.uint64))  # always drawn: signals ignore device_id
    device_id = drawn_id if device_id is None else int(device_id)
    if not 0 <= device_id < 2**64:
        raise ValueError("device_id must be a u64")
    subject = _Subject.draw(rng)
    local0_s = (start_us // 1_000_000 + utc_offset_min * 60) % 86_400
    bouts = _plan(rng, scenario, n_seconds, local0_s, tuple(schedule))

    canvas = _Canvas(fs=sample_rate_hz, n_seconds=n_seconds, subject=subject)
    step_lists = []
    for bout in bouts:
        if bout.label in (WALK, RUN):
            step_lists.append(_render_gait(canvas, rng, bout))
        elif bout.label == NON_WEAR:
            _render_non_wear(canvas, rng, bout)
        elif bout.label == SLEEP:
            _render_sleep(canvas, rng, bout)
        else:
            _render_sedentary(canvas, rng, bout)
    step_times = np.concatenate(step_lists) if step_lists else np.zeros(0)

    n = n_seconds * sample_rate_hz
    up = _orientation(canvas, n)
    for gait in canvas.gaits:
        _apply_gait(up, canvas.lin, sample_rate_hz, gait)
    accel_g = (up * subject.gain + subject.offset_g).astype(np.float32)
    accel_g += canvas.lin
    accel_g += rng.standard_normal((n, 3), dtype=np.float32) * np.float32(NOISE_G)
    lsb = 2.0 * accel_range_g / 2**accel_bits
    top = 2 ** (accel_bits - 1)
    accel = np.clip(np.rint(accel_g / np.float32(lsb)), -top, top - 1).astype(np.int16)

    beats, hr_mean = _heart(canvas, rng)
    worn = canvas.activity != NON_WEAR
    hr_bpm = np.where(worn, np.clip(np.rint(hr_mean), 30, 250), 0).astype(np.uint8)
    sec = np.floor(beats).astype(np.int64)
    inside = (sec >= 0) & (sec < n_seconds)
    beat_worn = np.zeros(beats.size, dtype=bool)
    beat_worn[inside] = worn[sec[inside]]
    keep = beat_worn[1:] & beat_worn[:-1]
    rr_ms = np.rint(np.diff(beats) * 1000.0)[keep].astype(np.uint16)
    rr_end_us = start_us + np.rint(beats[1:][keep] * 1e6).astype(np.int64)

    in_range = step_times[(step_times >= 0) & (step_times < n_seconds)]
    steps_per_s = np.bincount(np.floor(in_range).astype(np.int64), minlength=n_seconds).astype(np.uint16)
    recording = BandRecording(
        device_id=device_id,
        start_us=int(start_us),
        utc_offset_min=int(utc_offset_min),
        sample_rate_hz=sample_rate_hz,
        accel_bits=accel_bits,
        accel_range_g=accel_range_g,
        accel=accel,
        hr_bpm=hr_bpm,
        rr_ms=rr_ms,
        rr_end_us=rr_end_us,
        steps_per_s=steps_per_s,
        stage_per_epoch=canvas.stage_epoch,
        activity_per_s=canvas.activity,
    )
    return recording, Truth(bouts=bouts, step_times_s=step_times)


def simulate_band(
    seed: int,
    minutes: float,
    *,
    device_id: int | None = None,
    start_us: int = DEFAULT_START_US,
    sample_rate_hz: int = 50,
    accel_bits: int = 12,
    accel_range_g: int = 8,
    utc_offset_min: int = 60,
    scenario: str = "day",
    schedule: tuple = (),
) -> BandRecording:
    """Simulate `minutes` of one band; the same arguments always give byte-identical arrays.

    `scenario` is "day" (bouts of walking, running, sitting with gestures, non-wear), "night"
    (wind-down, a night in bed from the fitted stage model, getting up) or "mixed" (a 24 h pattern
    from the local clock at `start_us` + `utc_offset_min`, truncated to `minutes`) or "schedule"
    (`schedule` = ((label, start_min, stop_min), ...) in minutes from the start, labels in
    SCHEDULE_LABELS: sleep at any hour, desk work, evening TV on a couch; the rest a random day). `device_id`
    defaults to one drawn from `seed`; it does not change the signals.
    """
    recording, _ = _simulate(
        seed,
        minutes,
        device_id=device_id,
        start_us=start_us,
        sample_rate_hz=sample_rate_hz,
        accel_bits=accel_bits,
        accel_range_g=accel_range_g,
        utc_offset_min=utc_offset_min,
        scenario=scenario,
        schedule=schedule,
    )
    return recording
