"""Sleep-stage model for simulated nights, fitted to real PSG hypnograms.

A first-order Markov chain over 30-s epochs gets the stage fractions right but not the night's
shape: its bouts are geometric (too many one-epoch REM and deep bouts) and it has no notion of
time, so deep sleep is spread evenly instead of concentrating in the first cycles and REM in the
last. The model here is a compact time-inhomogeneous semi-Markov chain:

* stages are the band's four classes: 0 wake, 1 light (N1+N2), 2 deep (N3), 3 REM;
* time since sleep onset is cut into 45-min bins (the last, from 6 h, is open-ended); hourly bins
  smear the first cycle's deep sleep into the second and leave too much deep in the last third;
* leaving a stage, the next stage is drawn from a per-bin jump matrix (no self-transitions);
* a bout's length is log-normal in epochs, with a per-(bin, stage) mean of the log duration and
  a per-stage spread, so deep bouts are long early and REM bouts grow through the night;
* durations are truncated at the longest bout seen per stage: an untruncated log-normal tail
  makes a few nights mostly REM or mostly deep, far more night-to-night spread than real nights;
* sleep onset latency and the final awakening are log-normal too.

Late bins have few bouts late in the night, so every per-bin parameter is shrunk toward the
pooled estimate with a fixed number of pseudo-observations (`SHRINK`). The fit is plain counting,
deterministic, and its parameters are rounded so the JSON is reproducible byte for byte.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WAKE, LIGHT, DEEP, REM = 0, 1, 2, 3
N_STAGES = 4
EPOCH_S = 30
BIN_EPOCHS = 90  # 45 min of 30-s epochs
N_BINS = 9  # 0-45 min, ..., 5.25-6 h, 6 h and later
SHRINK = 3.0  # pseudo-observations pulling each time bin toward the pooled estimate
DIGITS = 6  # rounding of the JSON parameters: reproducible across platforms
MODEL_PATH = Path(__file__).with_name("stage_model.json")

# PSG scoring (0 wake, 1 N1, 2 N2, 3 N3, 4 old-style S4, 5 REM) to the band's four classes.
_PSG_TO_BAND = {0: WAKE, 1: LIGHT, 2: LIGHT, 3: DEEP, 4: DEEP, 5: REM}


@dataclass(frozen=True)
class StageModel:
    """Fitted parameters; arrays are indexed [time bin, from stage, to stage] and [time bin, stage]."""

    bin_epochs: int  # length of a time bin, epochs
    jump: np.ndarray  # (n_bins, 4, 4) P(next stage | leaving stage, time bin); zero diagonal
    log_dur_mean: np.ndarray  # (n_bins, 4) mean of log(bout length in epochs)
    log_dur_sd: np.ndarray  # (4,) spread of log(bout length), per stage
    max_dur: np.ndarray  # (4,) longest bout, epochs, per stage
    first_sleep: np.ndarray  # (4,) stage of the first sleep epoch (wake entry is 0)
    onset_log_mean: float  # log-normal sleep-onset latency, epochs
    onset_log_sd: float
    final_wake_log_mean: float  # log-normal final awakening before lights on, epochs
    final_wake_log_sd: float


def psg_to_band(psg: np.ndarray) -> np.ndarray:
    """Map PSG stage codes to the four band classes (int8); unknown codes raise."""
    codes = np.asarray(psg).astype(np.int64)
    out = np.empty(codes.shape, dtype=np.int8)
    for psg_code, band in _PSG_TO_BAND.items():
        out[codes == psg_code] = band
    unknown = ~np.isin(codes, list(_PSG_TO_BAND))
    if unknown.any():
        raise ValueError(f"unknown PSG stage codes: {sorted(set(codes[unknown].tolist()))}")
    return out


def read_hypnograms(folder: Path) -> list[np.ndarray]:
    """Read `subject_*.txt` hypnograms (one PSG stage per line) as four-class arrays, sorted by name."""
    files = sorted(Path(folder).glob("subject_*.txt"))
    if not files:
        raise FileNotFoundError(f"no subject_*.txt hypnograms in {folder}")
    return [psg_to_band(np.loadtxt(f, ndmin=1)) for f in files]


def _bouts(stages: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run-length encode: (stage, start epoch, length) of each bout."""
    change = np.flatnonzero(np.diff(stages)) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [stages.size])))
    return stages[starts], starts, lengths


def _lognormal(values: Sequence[float]) -> tuple[float, float]:
    logs = np.log(np.asarray(values, dtype=np.float64))
    return float(logs.mean()), float(max(logs.std(), 0.25))


def fit_stage_model(
    nights: Sequence[np.ndarray],
    *,
    bin_epochs: int = BIN_EPOCHS,
    n_bins: int = N_BINS,
    shrink: float = SHRINK,
) -> dict:
    """Fit the model to four-class hypnograms; returns the JSON-ready parameter dict."""
    jump_counts = np.zeros((n_bins, N_STAGES, N_STAGES))
    log_durs: list[list[list[float]]] = [[[] for _ in range(N_STAGES)] for _ in range(n_bins)]
    first_sleep = np.zeros(N_STAGES)
    max_dur = np.ones(N_STAGES)
    onsets: list[float] = []
    final_wakes: list[float] = []
    for night in nights:
        stage, start, length = _bouts(np.asarray(night, dtype=np.int8))
        asleep = np.flatnonzero(stage != WAKE)
        if asleep.size == 0:
            continue
        first = asleep[0]
        onset_epoch = start[first]
        onsets.append(max(onset_epoch, 1))
        first_sleep[stage[first]] += 1
        if stage[-1] == WAKE and stage.size - 1 > first:
            final_wakes.append(length[-1])
        # Bouts from sleep onset on; the last bout is cut by lights-on, so its length is not used.
        for k in range(first, stage.size):
            b = min((start[k] - onset_epoch) // bin_epochs, n_bins - 1)
            if k + 1 < stage.size:
                log_durs[b][stage[k]].append(float(np.log(length[k])))
                max_dur[stage[k]] = max(max_dur[stage[k]], length[k])
                jump_counts[b, stage[k], stage[k + 1]] += 1

    # Pooled estimates, with one pseudo-count per allowed jump so no transition is impossible.
    off_diag = 1.0 - np.eye(N_STAGES)
    pooled = jump_counts.sum(axis=0) + off_diag
    pooled /= pooled.sum(axis=1, keepdims=True)
    jump = (jump_counts + shrink * pooled) / (jump_counts.sum(axis=2, keepdims=True) + shrink)

    pooled_logs = [[x for b in range(n_bins) for x in log_durs[b][s]] for s in range(N_STAGES)]
    pooled_mean = np.array([np.mean(v) for v in pooled_logs])
    log_dur_sd = np.array([np.std(v) for v in pooled_logs])
    log_dur_mean = np.array(
        [
            [
                (sum(log_durs[b][s]) + shrink * pooled_mean[s]) / (len(log_durs[b][s]) + shrink)
                for s in range(N_STAGES)
            ]
            for b in range(n_bins)
        ]
    )
    onset_mean, onset_sd = _lognormal(onsets)
    final_mean, final_sd = _lognormal(final_wakes or [10.0])

    def r(x: np.ndarray | float) -> list | float:
        return np.round(np.asarray(x, dtype=np.float64), DIGITS).tolist()

    return {
        "description": "Sleep-stage semi-Markov model (gateway/simulator/stage_model.py); "
        "fitted by scripts/fit_stage_model.py",
        "source": "Walch et al. 2019 Sleep-Accel PSG hypnograms (PhysioNet, ODC-By 1.0)",
        "n_nights": len(nights),
        "n_epochs": int(sum(len(n) for n in nights)),
        "epoch_s": EPOCH_S,
        "bin_epochs": bin_epochs,
        "shrink": shrink,
        "stages": ["wake", "light", "deep", "rem"],
        "jump": r(jump),
        "log_dur_mean": r(log_dur_mean),
        "log_dur_sd": r(log_dur_sd),
        "max_dur": r(max_dur),
        "first_sleep": r(first_sleep / first_sleep.sum()),
        "onset_log_mean": r(onset_mean),
        "onset_log_sd": r(onset_sd),
        "final_wake_log_mean": r(final_mean),
        "final_wake_log_sd": r(final_sd),
    }


def dumps_model(params: dict) -> str:
    """The canonical JSON text of a parameter dict (what the fit script writes), one matrix row a line."""
    text = json.dumps(params, indent=1, sort_keys=True)
    flat = re.sub(r"\[\s+([-0-9.e,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    return flat + "\n"


def model_from_params(params: dict) -> StageModel:
    """Build a `StageModel` from a parameter dict, checking shapes and probabilities."""
    if params["epoch_s"] != EPOCH_S:
        raise ValueError("stage model was fitted with a different epoch length")
    jump = np.asarray(params["jump"], dtype=np.float64)
    shape_ok = jump.ndim == 3 and jump.shape[1:] == (N_STAGES, N_STAGES)
    if not shape_ok or not np.allclose(jump.sum(axis=2), 1.0, atol=1e-4):
        raise ValueError("stage model jump matrices are malformed")
    return StageModel(
        bin_epochs=int(params["bin_epochs"]),
        jump=jump / jump.sum(axis=2, keepdims=True),
        log_dur_mean=np.asarray(params["log_dur_mean"], dtype=np.float64),
        log_dur_sd=np.asarray(params["log_dur_sd"], dtype=np.float64),
        max_dur=np.asarray(params["max_dur"], dtype=np.float64),
        first_sleep=np.asarray(params["first_sleep"], dtype=np.float64),
        onset_log_mean=float(params["onset_log_mean"]),
        onset_log_sd=float(params["onset_log_sd"]),
        final_wake_log_mean=float(params["final_wake_log_mean"]),
        final_wake_log_sd=float(params["final_wake_log_sd"]),
    )


@functools.cache
def load_stage_model(path: Path = MODEL_PATH) -> StageModel:
    """The committed model (cached): the simulator needs no data folder."""
    return model_from_params(json.loads(Path(path).read_text()))


def _draw_epochs(rng: np.random.Generator, log_mean: float, log_sd: float, longest: float = np.inf) -> int:
    """A log-normal bout length in whole epochs, at least 1, redrawn (up to 20 times) above `longest`."""
    for _ in range(20):
        length = max(1, round(float(np.exp(rng.normal(log_mean, log_sd)))))
        if length <= longest:
            return length
    return int(longest)


def simulate_stages(model: StageModel, rng: np.random.Generator, n_epochs: int) -> np.ndarray:
    """One in-bed period of `n_epochs` 30-s epochs: onset latency, sleep, final awakening (int8)."""
    stages = np.full(n_epochs, WAKE, dtype=np.int8)
    onset = min(_draw_epochs(rng, model.onset_log_mean, model.onset_log_sd), n_epochs // 3)
    final = min(_draw_epochs(rng, model.final_wake_log_mean, model.final_wake_log_sd), n_epochs // 6)
    end = n_epochs - final
    t = onset
    stage = int(rng.choice(N_STAGES, p=model.first_sleep))
    while t < end:
        b = min((t - onset) // model.bin_epochs, model.jump.shape[0] - 1)
        length = _draw_epochs(
            rng, model.log_dur_mean[b, stage], model.log_dur_sd[stage], model.max_dur[stage]
        )
        stages[t : min(t + length, end)] = stage
        t += length
        stage = int(rng.choice(N_STAGES, p=model.jump[b, stage]))
    return stages
