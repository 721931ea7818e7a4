"""Sleep staging from per-epoch movement counts and heart rate: wake / light / deep / REM every 30 s.

The data path for one device, one 30-s epoch at a time:

    push (time, hr, counts) → ring buffer + night HR histogram → features of the epoch LOOKAHEAD epochs
    back → boosted-tree emission scores → HMM forward step → the epoch SMOOTH_LAG epochs further
    back is decided by fixed-lag forward-backward → sleep-onset gate → final stage

so a stage is final ``LAG_EPOCHS`` = FEATURE_LOOKAHEAD + SMOOTH_LAG epochs (10 minutes) after its epoch
ends. Everything the kernel remembers lives in one flat float64 array (`SleepState`); "relative to the
night's baseline" means relative to quantiles of an HR histogram of the night so far, so any split of the
input into chunks gives the same stages as one call. Model parameters come from
``decoder/sleep_params.json`` (written by ``scripts/fit_sleep.py``). See docs/sleep.md.

The constants of this module belong in ``decoder/config.py``; they live here until that file is merged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from decoder import config

# --- constants ------------------------------------------------------------------------------------
EPOCH_S = 30.0
FEATURE_LOOKAHEAD = 10  # epochs after an epoch that its features may see (5 min)
SMOOTH_LAG = 10  # epochs of fixed-lag HMM smoothing after the features are known (5 min)
LAG_EPOCHS = FEATURE_LOOKAHEAD + SMOOTH_LAG  # a stage is final this many epochs after its epoch (10 min)
PAST_EPOCHS = 40  # look back of the movement and HR-trend features (20 min)
HOUR_EPOCHS = 110  # look back of the hour-scale HR features: the window t-110 … t+10 is an hour
RING = 128  # ring buffer length, a power of two ≥ HOUR_EPOCHS + FEATURE_LOOKAHEAD + 1
MOVE_COUNTS = 20.0  # counts per epoch above which the wrist "moved"
HR_HIST_MIN = 20.0  # night HR histogram: bins of HR_HIST_BIN bpm from HR_HIST_MIN to HR_HIST_MAX
HR_HIST_MAX = 250.0
HR_HIST_BIN = 0.5
HR_HIST_BINS = int((HR_HIST_MAX - HR_HIST_MIN) / HR_HIST_BIN)
HR_MIN_SCALE = 2.0  # bpm; floor of the night's HR spread so a flat night does not blow up z-scores
ONSET_EPOCHS = 10  # sleep onset: first run of this many epochs the smoother calls asleep (≤ SMOOTH_LAG+1)

N_STAGES = 4
WAKE, LIGHT, DEEP, REM = 0, 1, 2, 3
STAGE_NAMES = ("wake", "light", "deep", "rem")
# PSG stage (0 wake, 1 N1, 2 N2, 3 N3, 4 N4 of R&K, 5 REM) → our 4 classes
PSG_TO_STAGE = np.array([WAKE, LIGHT, LIGHT, DEEP, DEEP, REM], dtype=np.int64)

FEATURE_NAMES = (
    "log_counts",  # this epoch
    "log_counts_c5",  # mean over ±2 epochs
    "log_counts_c21",  # mean over ±10 epochs
    "log_counts_p41",  # mean over the 20 min before
    "log_counts_max21",  # max over ±10 epochs
    "log_epochs_since_move",
    "log_epochs_to_move",  # within the lookahead; LOOKAHEAD+1 if none
    "log_cole_kripke",  # Cole–Kripke 1992 D index on minute sums (ActiLife scaling)
    "hr_z_median",  # (HR - night median) / night IQR
    "hr_z_p10",  # (HR - night 10th percentile) / night IQR
    "hr_trend",  # mean HR ±10 epochs minus mean of the 20 min before, / IQR
    "hr_slope",  # least-squares slope over ±10 epochs × 10, / IQR
    "hr_std21",  # std over ±10 epochs / IQR
    "hr_msd21",  # mean |successive difference| over ±10 epochs / IQR
    "log_hr_std7",  # log1p std over ±3 epochs, bpm
    "hr_local_dev",  # HR minus mean over ±10 epochs, / IQR
    "log_hr_msd21",  # log1p mean |successive difference| over ±10 epochs, bpm
    "hours_since_quiet",  # since the first 5.5-min run without movement
    "hours_elapsed",  # since the first epoch
    "hr_valid_frac21",  # share of epochs with a heart rate over ±10 epochs
    "hr_over_min_hour",  # mean HR ±10 epochs minus the lowest HR of the hour t-110 … t+10, bpm
    "hr_over_median_hour",  # mean HR ±10 epochs minus the median HR of that hour, bpm
    "hr_rank",  # share of the night's HR so far in bins at or below the bin of the mean HR ±10 epochs
)
N_FEATURES = len(FEATURE_NAMES)
PARAMS_VERSION = 2  # of decoder/sleep_params.json; 1 was a logistic model with hinges

# Cole, Kripke et al. 1992 (Sleep 15(5):461), 1-min epochs, mean-activity mode: D = P Σ W_k A_{t+k},
# k = -4..+2, sleep when D < 1. ActiLife applies it to ActiGraph counts as A = min(counts / 100, 300).
COLE_KRIPKE_P = 0.001
COLE_KRIPKE_WEIGHTS = np.array([106.0, 54.0, 58.0, 76.0, 230.0, 74.0, 67.0])  # A-4 .. A+2
COLE_KRIPKE_SCALE = 100.0
COLE_KRIPKE_CAP = 300.0

# --- the stager's input: one definition for training, the raw path and per-epoch replay ----------------
# Movement is the `counts` of the Sleep-Accel nights the model is fitted on: per-second ActiGraph counts
# (agcounts 0.2.6, raw acceleration resampled to 30 Hz), the vector magnitude of each second, summed over
# the 30-s epoch. On the raw path that is the activity kernel's `counts_vm_1s_sum` column (not
# `counts_vm`, the magnitude of the epoch's axis sums, which is smaller whenever the wrist turns within
# an epoch). Both inputs are taken at the precision the activity and heart records publish them, so a
# backend replaying stored records gets the stages the gateway emitted.
COUNTS_FIELD = "counts_vm_1s_sum"  # decoder/activity.py EPOCH_DTYPE column
COUNTS_DEFINITION = "agcounts-vm-1s-sum"  # named in sleep_params.json; params fitted on another are refused
INPUT_DIGITS = 1  # decimals of counts and heart rate in the activity and heart records


def stager_inputs(hr_bpm: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heart rate and counts per epoch as the stager takes them: through float32 (the kernels' precision)
    and rounded to INPUT_DIGITS as the records round them (half to even). NaN stays NaN."""

    def published(v: np.ndarray) -> np.ndarray:
        scale = 10.0**INPUT_DIGITS
        return np.rint(np.asarray(v, dtype=np.float32).astype(np.float64) * scale) / scale

    return published(hr_bpm), published(counts)


# --- state layout (one flat float64 array per device) ---------------------------------------------
STATE_VERSION = 2  # 2: a ring of 128 epochs for the hour-scale HR features
_H_VERSION, _H_N_IN, _H_N_FEAT, _H_N_OUT, _H_T0 = 0, 1, 2, 3, 4
_H_LAST_MOVE, _H_QUIET_RUN, _H_QUIET_ONSET, _H_HR_N, _H_ASLEEP = 5, 6, 7, 8, 9
_HEADER = 16
_OFF_HR = _HEADER
_OFF_COUNTS = _OFF_HR + RING
_OFF_TIME = _OFF_COUNTS + RING
_OFF_HIST = _OFF_TIME + RING
_OFF_EMIT = _OFF_HIST + HR_HIST_BINS
_OFF_ALPHA = _OFF_EMIT + (SMOOTH_LAG + 1) * N_STAGES
STATE_LEN = _OFF_ALPHA + (SMOOTH_LAG + 1) * N_STAGES
_V1_RING = 64  # version 1: the same layout with rings of 64 epochs (`SleepState.upgraded`)
_V1_LEN = STATE_LEN - 3 * (RING - _V1_RING)


# --- small numeric helpers --------------------------------------------------------------------------
@njit(**config.JIT)
def _logsumexp(x):
    m = x[0]
    for v in x[1:]:
        m = max(m, v)
    s = 0.0
    for v in x:
        s += math.exp(v - m)
    return m + math.log(s)


@njit(**config.JIT)
def _hist_quantile(state, q):
    """Lower `q`-quantile of the night's HR histogram (bin centre); NaN while it is empty."""
    n = state[_H_HR_N]
    if n <= 0:
        return np.nan
    target = q * n
    acc = 0.0
    for b in range(HR_HIST_BINS):
        acc += state[_OFF_HIST + b]
        if acc >= target and acc > 0:
            return HR_HIST_MIN + (b + 0.5) * HR_HIST_BIN
    return HR_HIST_MAX


@njit(**config.JIT)
def _cole_kripke(minute_counts, out):
    """Cole–Kripke D index of 1-min counts; neighbours beyond the ends count as zero."""
    n = minute_counts.size
    for t in range(n):
        d = 0.0
        for k in range(7):
            j = t + k - 4
            if 0 <= j < n:
                a = min(minute_counts[j] / COLE_KRIPKE_SCALE, COLE_KRIPKE_CAP)
                d += COLE_KRIPKE_WEIGHTS[k] * a
        out[t] = COLE_KRIPKE_P * d


def cole_kripke(minute_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cole–Kripke 1992 sleep index D of 1-min ActiGraph counts and the sleep call (D < 1) per minute.

    The published algorithm as ActiLife applies it; kept as the movement-only reference and checked
    against the paper's constants in the tests.
    """
    minute_counts = np.ascontiguousarray(minute_counts, dtype=np.float64)
    d = np.empty(minute_counts.size)
    _cole_kripke(minute_counts, d)
    return d, d < 1.0


# --- features -------------------------------------------------------------------------------------
@njit(**config.JIT)
def _features_at(state, t, n_avail, out, hour):
    """Features of epoch `t` from the ring, seeing epochs up to `n_avail - 1` (≤ t + LOOKAHEAD); `hour` is
    scratch of HOUR_EPOCHS + FEATURE_LOOKAHEAD + 1 values, allocated once a call, as `out` is.

    Called once per epoch, in order, so the running "last movement" and "quiet onset" it updates in
    `state` are causal.
    """
    lo_p = max(0, t - PAST_EPOCHS)
    lo = max(0, t - FEATURE_LOOKAHEAD)
    hi = min(n_avail - 1, t + FEATURE_LOOKAHEAD)
    mask = RING - 1

    # movement -------------------------------------------------------------------------------
    c_t = state[_OFF_COUNTS + (t & mask)]
    if c_t > MOVE_COUNTS:
        state[_H_LAST_MOVE] = t
    s5 = 0.0
    n5 = 0
    for j in range(max(0, t - 2), min(hi, t + 2) + 1):
        s5 += state[_OFF_COUNTS + (j & mask)]
        n5 += 1
    s21 = 0.0
    m21 = 0.0
    for j in range(lo, hi + 1):
        c = state[_OFF_COUNTS + (j & mask)]
        s21 += c
        m21 = max(m21, c)
    sp = 0.0
    for j in range(lo_p, t + 1):
        sp += state[_OFF_COUNTS + (j & mask)]
    to_move = FEATURE_LOOKAHEAD + 1
    for j in range(t + 1, hi + 1):
        if state[_OFF_COUNTS + (j & mask)] > MOVE_COUNTS:
            to_move = j - t
            break
    since_move = t - state[_H_LAST_MOVE] if state[_H_LAST_MOVE] >= 0 else t + 1.0
    # quiet onset: the first epoch that starts a run of LOOKAHEAD+1 epochs without movement
    if state[_H_QUIET_ONSET] != state[_H_QUIET_ONSET]:  # NaN: not found yet
        quiet = hi == t + FEATURE_LOOKAHEAD
        for j in range(t, hi + 1):
            if state[_OFF_COUNTS + (j & mask)] > MOVE_COUNTS:
                quiet = False
                break
        if quiet:
            state[_H_QUIET_ONSET] = state[_OFF_TIME + (t & mask)]
    # Cole–Kripke on minute sums ending at each 30-s epoch: minute m(k) = c[t+2k-1] + c[t+2k]
    ck = 0.0
    for k in range(7):
        jj = t + 2 * (k - 4)
        a = 0.0
        for j in (jj - 1, jj):
            if 0 <= j <= hi and j >= lo_p:
                a += state[_OFF_COUNTS + (j & mask)]
        ck += COLE_KRIPKE_WEIGHTS[k] * min(a / COLE_KRIPKE_SCALE, COLE_KRIPKE_CAP)
    ck *= COLE_KRIPKE_P

    out[0] = math.log1p(c_t)
    out[1] = math.log1p(s5 / n5)
    out[2] = math.log1p(s21 / (hi - lo + 1))
    out[3] = math.log1p(sp / (t - lo_p + 1))
    out[4] = math.log1p(m21)
    out[5] = math.log1p(since_move)
    out[6] = math.log1p(to_move)
    out[7] = math.log1p(ck)

    # heart rate ------------------------------------------------------------------------------
    med = _hist_quantile(state, 0.5)
    p10 = _hist_quantile(state, 0.1)
    scale = _hist_quantile(state, 0.75) - _hist_quantile(state, 0.25)
    if not scale >= HR_MIN_SCALE:  # also NaN
        scale = HR_MIN_SCALE
    # window sums over ±LOOKAHEAD: count, mean, slope, successive differences
    n = 0
    sx = 0.0
    sxx = 0.0
    st = 0.0
    stt = 0.0
    stx = 0.0
    nd = 0
    sd = 0.0
    prev = np.nan
    for j in range(lo, hi + 1):
        h = state[_OFF_HR + (j & mask)]
        if h == h:
            n += 1
            sx += h
            sxx += h * h
            tt = float(j - t)
            st += tt
            stt += tt * tt
            stx += tt * h
            if prev == prev:
                nd += 1
                sd += abs(h - prev)
            prev = h
    n_p = 0
    s_p = 0.0
    for j in range(lo_p, lo):
        h = state[_OFF_HR + (j & mask)]
        if h == h:
            n_p += 1
            s_p += h
    # short window ±3
    n7 = 0
    s7 = 0.0
    s77 = 0.0
    for j in range(max(0, t - 3), min(hi, t + 3) + 1):
        h = state[_OFF_HR + (j & mask)]
        if h == h:
            n7 += 1
            s7 += h
            s77 += h * h
    # level at t: mean of ±1 epochs, else the latest valid value in the past window
    lvl = np.nan
    nl = 0
    sl = 0.0
    for j in range(max(0, t - 1), min(hi, t + 1) + 1):
        h = state[_OFF_HR + (j & mask)]
        if h == h:
            nl += 1
            sl += h
    if nl > 0:
        lvl = sl / nl
    else:
        for j in range(t, lo_p - 1, -1):
            h = state[_OFF_HR + (j & mask)]
            if h == h:
                lvl = h
                break
    for k in range(8, 17):
        out[k] = 0.0
    for k in range(20, N_FEATURES):
        out[k] = 0.0
    if n > 0 and med == med:
        mean = sx / n
        if lvl != lvl:
            lvl = mean
        out[8] = (lvl - med) / scale
        out[9] = (lvl - p10) / scale
        if n_p > 0:
            out[10] = (mean - s_p / n_p) / scale
        den = n * stt - st * st
        if n >= 3 and den > 0:
            out[11] = (n * stx - st * sx) / den * FEATURE_LOOKAHEAD / scale
        out[12] = math.sqrt(max(sxx / n - mean * mean, 0.0)) / scale
        if nd > 0:
            out[13] = sd / nd / scale
            out[16] = math.log1p(sd / nd)
        if n7 > 0:
            m7 = s7 / n7
            out[14] = math.log1p(math.sqrt(max(s77 / n7 - m7 * m7, 0.0)))
        out[15] = (lvl - mean) / scale
        # hour scale: the window's level against the hour around it (sleep cycles are ~90 min long)
        nh = 0
        for j in range(max(0, t - HOUR_EPOCHS), hi + 1):
            h = state[_OFF_HR + (j & mask)]
            if h == h:
                hour[nh] = h
                nh += 1
        out[20] = mean - hour[:nh].min()
        out[21] = mean - np.median(hour[:nh])
        top = int((mean - HR_HIST_MIN) / HR_HIST_BIN)
        below = 0.0
        for b in range(min(top, HR_HIST_BINS - 1) + 1):
            below += state[_OFF_HIST + b]
        out[22] = below / state[_H_HR_N]
    # clock ------------------------------------------------------------------------------------
    now = state[_OFF_TIME + (t & mask)]
    onset = state[_H_QUIET_ONSET]
    out[17] = (now - onset) / 3600.0 if onset == onset and onset <= now else 0.0
    out[18] = (now - state[_H_T0]) / 3600.0
    out[19] = n / (hi - lo + 1)


# --- the streaming stager ----------------------------------------------------------------------------
@njit(**config.JIT)
def _tree_scores(feats, tree_feature, tree_threshold, tree_value, out):
    """Sum of boosted-tree outputs per stage. Tree i adds to stage i % N_STAGES; each tree is complete, of
    depth log2(leaves): node j's children are 2j+1 (feature ≤ threshold) and 2j+2 (above); leaves follow
    the internal nodes, so leaf = node - internal. A threshold of +inf never splits."""
    for k in range(N_STAGES):
        out[k] = 0.0
    n_int = tree_threshold.shape[1]
    for i in range(tree_threshold.shape[0]):
        node = 0
        while node < n_int:
            node = 2 * node + (2 if feats[tree_feature[i, node]] > tree_threshold[i, node] else 1)
        out[i % N_STAGES] += tree_value[i, node - n_int]


@njit(**config.JIT)
def _emit(state, feats, model, out_stage, out_post, n_out):
    """Push one feature row through the emission model and the HMM forward step; decide what is due.

    `model` is `SleepParams.model`: (tree_feature, tree_threshold, tree_value, log_a, log_pi, scale)."""
    tree_feature, tree_threshold, tree_value, log_a, log_pi, emission_scale = model
    n_states = N_STAGES
    s = int(state[_H_N_FEAT])
    ring_len = SMOOTH_LAG + 1
    slot = s % ring_len
    # emission: scaled log-softmax of the boosted-tree scores (class-balanced fit ≈ likelihood)
    z = np.empty(n_states)
    _tree_scores(feats, tree_feature, tree_threshold, tree_value, z)
    lse = _logsumexp(z)
    e = np.empty(n_states)
    for k in range(n_states):
        e[k] = emission_scale * (z[k] - lse)
        state[_OFF_EMIT + slot * n_states + k] = e[k]
    # forward step, normalised in log space
    a = np.empty(n_states)
    if s == 0:
        for k in range(n_states):
            a[k] = log_pi[k] + e[k]
    else:
        prev = _OFF_ALPHA + ((s - 1) % ring_len) * n_states
        tmp = np.empty(n_states)
        for k in range(n_states):
            for j in range(n_states):
                tmp[j] = state[prev + j] + log_a[j, k]
            a[k] = _logsumexp(tmp) + e[k]
    norm = _logsumexp(a)
    for k in range(n_states):
        state[_OFF_ALPHA + slot * n_states + k] = a[k] - norm
    state[_H_N_FEAT] = s + 1
    if s + 1 - int(state[_H_N_OUT]) > SMOOTH_LAG:
        n_out = _decide(state, log_a, out_stage, out_post, n_out)
    return n_out


@njit(**config.JIT)
def _decide(state, log_a, out_stage, out_post, n_out):
    """Decide the oldest pending epoch from its forward vector and the emissions after it."""
    n_states = N_STAGES
    ring_len = SMOOTH_LAG + 1
    d = int(state[_H_N_OUT])
    last = int(state[_H_N_FEAT]) - 1
    width = last - d + 1
    # backward pass over the pending window; post[i] = smoothed log-posterior of epoch d+i
    beta = np.zeros((width, n_states))
    tmp = np.empty(n_states)
    for i in range(width - 1, 0, -1):
        nxt = _OFF_EMIT + ((d + i) % ring_len) * n_states
        for k in range(n_states):
            for j in range(n_states):
                tmp[j] = log_a[k, j] + state[nxt + j] + beta[i, j]
            beta[i - 1, k] = _logsumexp(tmp)
    post = np.empty((width, n_states))
    best = np.empty(width, dtype=np.int64)
    for i in range(width):
        al = _OFF_ALPHA + ((d + i) % ring_len) * n_states
        for k in range(n_states):
            post[i, k] = state[al + k] + beta[i, k]
        norm = _logsumexp(post[i])
        b = 0
        for k in range(n_states):
            post[i, k] -= norm
            if post[i, k] > post[i, b]:
                b = k
        best[i] = b
    stage = best[0]
    # sleep onset: before it, an epoch is asleep only if it starts ONSET_EPOCHS smoothed sleep epochs
    if state[_H_ASLEEP] == 0:
        run = min(ONSET_EPOCHS, width)
        for i in range(run):
            if best[i] == WAKE:
                stage = WAKE
                break
        if stage != WAKE:
            state[_H_ASLEEP] = 1
    out_stage[n_out] = stage
    for k in range(n_states):
        out_post[n_out, k] = math.exp(post[0, k])
    state[_H_N_OUT] = d + 1
    return n_out + 1


@njit(**config.JIT)
def _stage_epochs(
    time_s,
    hr_bpm,
    counts,
    state,
    model,
    finish,
    out_feat,
    out_stage,
    out_post,
):
    """Push epochs into `state`; write features of epochs whose lookahead is complete and stages of
    epochs whose lag has passed (all pending ones when `finish`). Returns (n features, n stages)."""
    mask = RING - 1
    n_f = 0
    n_s = 0
    feats = np.empty(N_FEATURES)
    hour = np.empty(HOUR_EPOCHS + FEATURE_LOOKAHEAD + 1)
    for i in range(time_s.size):
        t_new = int(state[_H_N_IN])
        if t_new == 0:
            state[_H_T0] = time_s[i]
        h = hr_bpm[i]
        valid = h == h and HR_HIST_MIN <= h < HR_HIST_MAX
        state[_OFF_HR + (t_new & mask)] = h if valid else np.nan
        c = counts[i]
        state[_OFF_COUNTS + (t_new & mask)] = c if c == c and c > 0 else 0.0
        state[_OFF_TIME + (t_new & mask)] = time_s[i]
        if valid:
            state[_OFF_HIST + int((h - HR_HIST_MIN) / HR_HIST_BIN)] += 1.0
            state[_H_HR_N] += 1.0
        state[_H_N_IN] = t_new + 1
        t = t_new - FEATURE_LOOKAHEAD
        if t >= 0:
            _features_at(state, t, t_new + 1, feats, hour)
            out_feat[n_f, :] = feats
            n_f += 1
            n_s = _emit(state, feats, model, out_stage, out_post, n_s)
    if finish:
        n_in = int(state[_H_N_IN])
        for t in range(int(state[_H_N_FEAT]), n_in):
            _features_at(state, t, n_in, feats, hour)
            out_feat[n_f, :] = feats
            n_f += 1
            n_s = _emit(state, feats, model, out_stage, out_post, n_s)
        while state[_H_N_OUT] < state[_H_N_FEAT]:
            n_s = _decide(state, model[3], out_stage, out_post, n_s)
    return n_f, n_s


# --- public API ------------------------------------------------------------------------------------
def _check_header(a: np.ndarray) -> None:
    """The counters as the kernel leaves them between calls (the same in versions 1 and 2): whole epoch
    counts with at most FEATURE_LOOKAHEAD epochs awaiting features and SMOOTH_LAG awaiting a decision,
    the last movement before the newest epoch, a histogram count, an asleep flag."""
    n_in, n_feat, n_out = a[_H_N_IN], a[_H_N_FEAT], a[_H_N_OUT]
    counts = (n_in, n_feat, n_out, a[_H_HR_N])
    if not all(0 <= c < 2**53 and c == math.floor(c) for c in counts):  # NaN and inf fail too
        raise ValueError("sleep state: its counters are not counts")
    if not (n_out <= n_feat <= n_in and n_in - n_feat <= FEATURE_LOOKAHEAD and n_feat - n_out <= SMOOTH_LAG):
        raise ValueError("sleep state: inconsistent counters")
    if not (-1 <= a[_H_LAST_MOVE] < max(n_in, 1)) or a[_H_ASLEEP] not in (0.0, 1.0):
        raise ValueError("sleep state: inconsistent counters")


@dataclass
class SleepState:
    """Per-device stager memory: one flat float64 array (about 7.5 kB) holding a version, counters, the
    last RING epochs (the hour features reach HOUR_EPOCHS+LOOKAHEAD back), the night's HR histogram, and
    the pending HMM window."""

    array: np.ndarray

    @classmethod
    def new(cls) -> SleepState:
        a = np.zeros(STATE_LEN)
        a[_H_VERSION] = STATE_VERSION
        a[_H_LAST_MOVE] = -1.0
        a[_H_QUIET_ONSET] = np.nan
        return cls(a)

    @property
    def epochs_in(self) -> int:
        return int(self.array[_H_N_IN])

    @property
    def epochs_out(self) -> int:
        return int(self.array[_H_N_OUT])

    def to_dict(self) -> dict:
        return {"version": STATE_VERSION, "state": self.array.tolist()}

    @classmethod
    def from_array(cls, array: np.ndarray) -> SleepState:
        """A stored state, checked: the kernel indexes its output by these counters, so a damaged or
        hostile header must be refused here (a ValueError), never reach it."""
        if np.asarray(array).dtype != np.float64:
            raise ValueError("not a sleep state: not float64")
        a = np.array(array, dtype=np.float64)
        if a.shape != (STATE_LEN,) or a[_H_VERSION] != STATE_VERSION:  # a float compare: NaN and inf fail
            raise ValueError(f"not a v{STATE_VERSION} sleep state of {STATE_LEN} values")
        _check_header(a)
        return cls(a)

    @classmethod
    def upgraded(cls, array: np.ndarray) -> SleepState:
        """A stored state of this version, checked; one of version 1 (rings of 64 epochs, saved by the
        previous release) moved into this layout, so a device's open sleep period survives the upgrade.
        Its epochs older than 64 are not known: the two hour-window features of the next 46 epochs (until
        about 28 minutes after the upgrade) see less than their hour of heart rate."""
        a = np.asarray(array)
        if a.shape != (_V1_LEN,) or a.dtype != np.float64 or a[_H_VERSION] != 1:
            return cls.from_array(a)
        _check_header(a)
        out = cls.new().array
        out[:_HEADER] = a[:_HEADER]
        out[_H_VERSION] = STATE_VERSION
        out[_OFF_HR : _OFF_HR + RING] = np.nan
        n_in = int(a[_H_N_IN])
        for ring in range(3):  # HR, counts, time: the same order in both layouts
            old, new = _HEADER + ring * _V1_RING, _HEADER + ring * RING
            for j in range(max(0, n_in - _V1_RING), n_in):
                out[new + (j & (RING - 1))] = a[old + (j & (_V1_RING - 1))]
        out[_OFF_HIST:] = a[_HEADER + 3 * _V1_RING :]
        return cls(out)

    @classmethod
    def from_dict(cls, d: dict) -> SleepState:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"sleep state version {d.get('version')!r}, this code reads {STATE_VERSION}")
        return cls.from_array(np.asarray(d["state"], dtype=np.float64))


@dataclass(frozen=True)
class SleepParams:
    """Fitted model: boosted-tree emission scores, HMM priors.

    Trees are complete binary trees of one depth, flattened: tree i scores stage i % N_STAGES.
    """

    tree_feature: np.ndarray  # (n_trees, 2**depth - 1) int64 feature index per internal node
    tree_threshold: np.ndarray  # (n_trees, 2**depth - 1) go right when the feature is above it
    tree_value: np.ndarray  # (n_trees, 2**depth) leaf outputs (log-odds scale)
    log_a: np.ndarray  # (N_STAGES, N_STAGES) log transition matrix, rows = from
    log_pi: np.ndarray  # (N_STAGES,) log initial distribution
    emission_scale: float  # < 1 tempers emissions of overlapping feature windows
    # Calibration of the smoothed posterior into the probabilities the records carry (vector scaling,
    # Guo et al. 2017): p ∝ exp(calibration_scale · log posterior + calibration_bias). Identity by default.
    calibration_scale: float = 1.0
    calibration_bias: np.ndarray = field(default_factory=lambda: np.zeros(N_STAGES))

    @property
    def model(self) -> tuple:
        """What the kernel takes: (tree_feature, tree_threshold, tree_value, log_a, log_pi, scale)."""
        return (
            self.tree_feature,
            self.tree_threshold,
            self.tree_value,
            self.log_a,
            self.log_pi,
            float(self.emission_scale),
        )

    @classmethod
    def from_dict(cls, d: dict) -> SleepParams:
        if list(d["feature_names"]) != list(FEATURE_NAMES):
            raise ValueError("sleep params were fitted on a different feature set")
        if d.get("version") != PARAMS_VERSION:
            raise ValueError(f"sleep params version {d.get('version')!r}, this code reads {PARAMS_VERSION}")
        if d.get("counts") != COUNTS_DEFINITION:
            raise ValueError(f"sleep params fitted on counts {d.get('counts')!r}, not {COUNTS_DEFINITION}")
        f = np.ascontiguousarray
        p = cls(
            tree_feature=f(d["tree_feature"], dtype=np.int64),
            tree_threshold=f(d["tree_threshold"], dtype=np.float64),
            tree_value=f(d["tree_value"], dtype=np.float64),
            log_a=np.log(f(d["transitions"], dtype=np.float64)),
            log_pi=np.log(f(d["initial"], dtype=np.float64)),
            emission_scale=float(d["emission_scale"]),
        )
        cal = d.get("calibration")  # absent in files fitted before probabilities were published: identity
        if cal is not None:
            p = cls(
                **{k: getattr(p, k) for k in p.__dataclass_fields__ if not k.startswith("calibration")},
                calibration_scale=float(cal["scale"]),
                calibration_bias=f(cal["bias"], dtype=np.float64),
            )
        p.validate()
        return p

    def validate(self) -> None:
        n_trees, n_int = self.tree_threshold.shape
        if (
            self.tree_feature.shape != (n_trees, n_int)
            or self.tree_value.shape != (n_trees, n_int + 1)
            or n_trees % N_STAGES
            or (n_int + 1) & n_int  # leaves must be a power of two
            or self.log_a.shape != (N_STAGES, N_STAGES)
            or self.log_pi.shape != (N_STAGES,)
            or np.shape(self.calibration_bias) != (N_STAGES,)
        ):
            raise ValueError("sleep params have the wrong shapes")
        if n_trees and not ((self.tree_feature >= 0) & (self.tree_feature < N_FEATURES)).all():
            raise ValueError("sleep params name a feature that does not exist")

    @classmethod
    def blank(cls) -> SleepParams:
        """Uninformative model: the kernel still computes features (used when fitting)."""
        return cls(
            np.zeros((0, 1), dtype=np.int64),
            np.zeros((0, 1)),
            np.zeros((0, 2)),
            np.log(np.full((N_STAGES, N_STAGES), 1.0 / N_STAGES)),
            np.log(np.full(N_STAGES, 1.0 / N_STAGES)),
            1.0,
        )


PARAMS_PATH = Path(__file__).with_name("sleep_params.json")
_default_params: SleepParams | None = None


def load_params(path: str | Path | None = None) -> SleepParams:
    """The shipped model (decoder/sleep_params.json) or the one at `path`."""
    global _default_params
    if path is None:
        if _default_params is None:
            _default_params = SleepParams.from_dict(json.loads(PARAMS_PATH.read_text()))
        return _default_params
    return SleepParams.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class StagedEpochs:
    """Epochs finalised by one call: night-relative epoch index, stage, smoothed posterior, features."""

    epoch: np.ndarray  # int64
    stage: np.ndarray  # int8, WAKE/LIGHT/DEEP/REM
    posterior: np.ndarray  # (n, N_STAGES) float64
    features: np.ndarray  # (m, N_FEATURES) features computed in this call (epochs feature_epoch)
    feature_epoch: np.ndarray  # int64


def stage_epochs(
    time_s: np.ndarray,
    hr_bpm: np.ndarray,
    counts: np.ndarray,
    state: SleepState,
    params: SleepParams | None = None,
    finish: bool = False,
) -> StagedEpochs:
    """Stages of the 30-s epochs that became final with these new epochs (LAG_EPOCHS behind the newest).

    `hr_bpm` is NaN (or 0) where the band gave no heart rate; `counts` is the epoch's sum of per-second
    vector-magnitude activity counts (COUNTS_DEFINITION), both as `stager_inputs` gives them.
    `finish=True` ends the night and finalises everything pending. `state` is updated in place; feeding
    a night in any chunks gives the same result as feeding it at once.
    """
    p = load_params() if params is None else params
    time_s = np.ascontiguousarray(time_s, dtype=np.float64)
    hr_bpm = np.ascontiguousarray(hr_bpm, dtype=np.float64)
    counts = np.ascontiguousarray(counts, dtype=np.float64)
    if not (time_s.shape == hr_bpm.shape == counts.shape) or time_s.ndim != 1:
        raise ValueError("time_s, hr_bpm and counts must be 1-D arrays of one length")
    if state.array.shape != (STATE_LEN,) or state.array[_H_VERSION] != STATE_VERSION:
        raise ValueError("incompatible sleep state")
    cap = time_s.size + LAG_EPOCHS + 2
    out_feat = np.empty((cap, N_FEATURES))
    out_stage = np.empty(cap, dtype=np.int64)
    out_post = np.empty((cap, N_STAGES))
    first_feat = int(state.array[_H_N_FEAT])
    first_out = int(state.array[_H_N_OUT])
    n_f, n_s = _stage_epochs(
        time_s,
        hr_bpm,
        counts,
        state.array,
        p.model,
        bool(finish),
        out_feat,
        out_stage,
        out_post,
    )
    return StagedEpochs(
        epoch=np.arange(first_out, first_out + n_s, dtype=np.int64),
        stage=out_stage[:n_s].astype(np.int8),
        posterior=out_post[:n_s].copy(),
        features=out_feat[:n_f].copy(),
        feature_epoch=np.arange(first_feat, first_feat + n_f, dtype=np.int64),
    )


PROBABILITY_DIGITS = 3  # decimals of the stage probabilities in the sleep records
PROBABILITY_FIELDS = tuple(f"p_{name}" for name in STAGE_NAMES)  # their names in the records


def calibrate(posterior: np.ndarray, scale: float, bias: np.ndarray) -> np.ndarray:
    """(n, N_STAGES) probabilities from smoothed posteriors: softmax(scale · log posterior + bias)."""
    logp = np.log(np.maximum(np.asarray(posterior, dtype=np.float64), 1e-300))
    z = scale * logp + np.asarray(bias, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def stage_probabilities(posterior: np.ndarray, params: SleepParams | None = None) -> np.ndarray:
    """Calibrated stage probabilities (wake, light, deep, REM) of `StagedEpochs.posterior`, rounded to
    PROBABILITY_DIGITS decimals so that each row sums to exactly 1 in those units.

    The stage is the stager's decision from the uncalibrated posterior (class-balanced, which is what
    maximises κ); these are calibrated frequencies, so the most probable stage can differ from it.
    """
    p = load_params() if params is None else params
    prob = calibrate(posterior, p.calibration_scale, p.calibration_bias)
    unit = 10**PROBABILITY_DIGITS
    scaled = prob * unit
    q = np.floor(scaled).astype(np.int64)
    # largest remainders take the units the floors left over, so the row sums to `unit`
    short = unit - q.sum(axis=1)
    order = np.argsort(-(scaled - q), axis=1, kind="stable")
    for r in np.flatnonzero(short):
        q[r, order[r, : short[r]]] += 1
    return q / unit


def stage_night(
    time_s: np.ndarray, hr_bpm: np.ndarray, counts: np.ndarray, params: SleepParams | None = None
) -> np.ndarray:
    """Stage per epoch of a whole night (int8 WAKE/LIGHT/DEEP/REM); epochs before sleep onset are wake.

    The per-epoch API of `bandgate replay --epochs`: the same streaming kernel, fed at once.
    """
    res = stage_epochs(time_s, hr_bpm, counts, SleepState.new(), params, finish=True)
    return res.stage


def night_features(time_s: np.ndarray, hr_bpm: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(n_epochs, N_FEATURES) features exactly as the stager computes them (for fitting and baselines)."""
    return stage_epochs(time_s, hr_bpm, counts, SleepState.new(), SleepParams.blank(), finish=True).features


def summarize_night(stage: np.ndarray, epoch_s: float = EPOCH_S) -> dict:
    """Summary in minutes of a detected sleep period's stages (`stage[0]` is the period's first epoch).

    time in bed = all epochs of the period; sleep period = first to last sleep epoch; total sleep time =
    sleep epochs; efficiency = TST / time in bed; WASO = wake between sleep onset and final awakening;
    sleep onset latency `sol_min` = the period's start to the first sleep epoch (also under its older
    name `onset_latency_min`); minutes per stage.
    """
    stage = np.asarray(stage)
    minutes = epoch_s / 60.0
    asleep = np.flatnonzero(stage != WAKE)
    tib = stage.size * minutes
    tst = asleep.size * minutes
    if asleep.size:
        period = stage[asleep[0] : asleep[-1] + 1]
        waso = float(np.count_nonzero(period == WAKE)) * minutes
        latency = asleep[0] * minutes
        spt = period.size * minutes
    else:
        waso = latency = spt = 0.0
    out = {
        "time_in_bed_min": tib,
        "sleep_period_min": spt,
        "total_sleep_min": tst,
        "efficiency": tst / tib if tib else 0.0,
        "waso_min": waso,
        "onset_latency_min": latency,
        "sol_min": latency,
    }
    for k, name in enumerate(STAGE_NAMES):
        out[f"{name}_min"] = float(np.count_nonzero(stage == k)) * minutes
    return out
