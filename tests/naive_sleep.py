"""Slow, obviously-correct references for decoder/sleep.py: whole-night arrays, no ring buffers, no
streaming state, plain numpy. Each feature of epoch t is computed from the epochs 0..t+LOOKAHEAD
(what the stager has seen when it computes it), by its definition in decoder/sleep.py."""

from __future__ import annotations

import numpy as np

from decoder import sleep


def clean_inputs(hr_bpm: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hr = np.asarray(hr_bpm, dtype=np.float64).copy()
    hr[~((hr >= sleep.HR_HIST_MIN) & (hr < sleep.HR_HIST_MAX))] = np.nan  # also NaN → NaN
    c = np.asarray(counts, dtype=np.float64).copy()
    c[~(c > 0)] = 0.0
    return hr, c


def hist_quantile(hr_seen: np.ndarray, q: float) -> float:
    """Centre of the histogram bin holding the k-th smallest valid HR, k = smallest integer ≥ q·n."""
    v = hr_seen[~np.isnan(hr_seen)]
    if v.size == 0:
        return np.nan
    bins = np.sort(np.floor((v - sleep.HR_HIST_MIN) / sleep.HR_HIST_BIN))
    k = int(np.ceil(q * v.size))
    return sleep.HR_HIST_MIN + (bins[max(k, 1) - 1] + 0.5) * sleep.HR_HIST_BIN


def features(time_s: np.ndarray, hr_bpm: np.ndarray, counts: np.ndarray) -> np.ndarray:
    hr, c = clean_inputs(hr_bpm, counts)
    time_s = np.asarray(time_s, dtype=np.float64)
    n = c.size
    la, past = sleep.FEATURE_LOOKAHEAD, sleep.PAST_EPOCHS
    out = np.zeros((n, sleep.N_FEATURES))
    moving = c > sleep.MOVE_COUNTS
    quiet_onset = np.nan
    for t in range(n):
        seen = min(n - 1, t + la)  # last epoch available when epoch t's features are computed
        win = np.arange(max(0, t - la), seen + 1)
        f = out[t]
        f[0] = np.log1p(c[t])
        f[1] = np.log1p(c[max(0, t - 2) : min(seen, t + 2) + 1].mean())
        f[2] = np.log1p(c[win].mean())
        f[3] = np.log1p(c[max(0, t - past) : t + 1].mean())
        f[4] = np.log1p(c[win].max())
        before = np.flatnonzero(moving[: t + 1])
        f[5] = np.log1p(t - before[-1] if before.size else t + 1)
        after = np.flatnonzero(moving[t + 1 : seen + 1])
        f[6] = np.log1p(after[0] + 1 if after.size else la + 1)
        if np.isnan(quiet_onset) and t + la <= seen and not moving[t : t + la + 1].any():
            quiet_onset = time_s[t]
        # Cole–Kripke on the minute sums ending at t-8, t-6, ..., t+4 (zero outside the night)
        padded = np.concatenate([np.zeros(10), c[: seen + 1], np.zeros(10)])
        minutes = [padded[10 + t + 2 * k - 1] + padded[10 + t + 2 * k] for k in range(-4, 3)]
        a = np.minimum(np.array(minutes) / sleep.COLE_KRIPKE_SCALE, sleep.COLE_KRIPKE_CAP)
        f[7] = np.log1p(sleep.COLE_KRIPKE_P * np.dot(sleep.COLE_KRIPKE_WEIGHTS, a))

        h_seen = hr[: seen + 1]
        med, p10 = hist_quantile(h_seen, 0.5), hist_quantile(h_seen, 0.1)
        scale = hist_quantile(h_seen, 0.75) - hist_quantile(h_seen, 0.25)
        scale = scale if scale >= sleep.HR_MIN_SCALE else sleep.HR_MIN_SCALE
        hw = hr[win]
        ok = ~np.isnan(hw)
        f[19] = ok.sum() / win.size
        if ok.any() and not np.isnan(med):
            v = hw[ok]
            tt = (win - t)[ok].astype(np.float64)
            near = hr[max(0, t - 1) : min(seen, t + 1) + 1]
            near = near[~np.isnan(near)]
            if near.size:
                lvl = near.mean()
            else:
                back = hr[max(0, t - past) : t + 1]
                back = back[~np.isnan(back)]
                lvl = back[-1] if back.size else v.mean()
            f[8] = (lvl - med) / scale
            f[9] = (lvl - p10) / scale
            prev = hr[max(0, t - past) : max(0, t - la)]
            prev = prev[~np.isnan(prev)]
            if prev.size:
                f[10] = (v.mean() - prev.mean()) / scale
            if v.size >= 3 and np.ptp(tt) > 0:
                f[11] = np.polyfit(tt, v, 1)[0] * la / scale
            f[12] = v.std() / scale
            if v.size >= 2:  # successive differences between consecutive *valid* readings
                msd = np.abs(np.diff(v)).mean()
                f[13] = msd / scale
                f[16] = np.log1p(msd)
            short = hr[max(0, t - 3) : min(seen, t + 3) + 1]
            short = short[~np.isnan(short)]
            if short.size:
                f[14] = np.log1p(short.std())
            f[15] = (lvl - v.mean()) / scale
            hour = hr[max(0, t - sleep.HOUR_EPOCHS) : seen + 1]
            hour = hour[~np.isnan(hour)]
            f[20] = v.mean() - hour.min()
            f[21] = v.mean() - np.median(hour)
            valid = h_seen[~np.isnan(h_seen)]
            bin_of = lambda x: np.floor((x - sleep.HR_HIST_MIN) / sleep.HR_HIST_BIN)  # noqa: E731
            # the mean summed in window order, as the kernel sums it: numpy's pairwise sum can round a
            # mean that lies on a bin edge to the other side of it
            f[22] = np.mean(bin_of(valid) <= bin_of(np.cumsum(v)[-1] / v.size))
        f[17] = (time_s[t] - quiet_onset) / 3600 if quiet_onset <= time_s[t] else 0.0
        f[18] = (time_s[t] - time_s[0]) / 3600
    return out


def tree_output(x: np.ndarray, feature: np.ndarray, threshold: np.ndarray, value: np.ndarray) -> float:
    """One complete binary tree stored level by level: children of node j are 2j+1 and 2j+2."""
    node = 0
    while node < threshold.size:
        node = 2 * node + (2 if x[feature[node]] > threshold[node] else 1)
    return float(value[node - threshold.size])


def emissions(feats: np.ndarray, params: sleep.SleepParams) -> np.ndarray:
    """Tempered log-softmax of the boosted-tree scores: tree i adds to stage i mod N_STAGES."""
    scores = np.zeros((feats.shape[0], sleep.N_STAGES))
    for t, x in enumerate(feats):
        for i in range(params.tree_threshold.shape[0]):
            scores[t, i % sleep.N_STAGES] += tree_output(
                x, params.tree_feature[i], params.tree_threshold[i], params.tree_value[i]
            )
    scores = scores - scores.max(axis=1, keepdims=True)
    logp = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    return params.emission_scale * logp


def fixed_lag_posteriors(log_e: np.ndarray, a: np.ndarray, pi: np.ndarray, d: int, last: int) -> np.ndarray:
    """P(stage_s | emissions 0..last) for s = d..last, by the textbook recursions in probability space."""
    e = np.exp(log_e - log_e.max(axis=1, keepdims=True))  # per-epoch constants cancel in posteriors
    alpha = pi * e[0]
    alpha /= alpha.sum()
    alphas = [alpha]
    for s in range(1, last + 1):
        alpha = (alphas[-1] @ a) * e[s]
        alphas.append(alpha / alpha.sum())
    beta = np.ones(a.shape[0])
    post = np.empty((last - d + 1, a.shape[0]))
    for s in range(last, d - 1, -1):
        g = alphas[s] * beta
        post[s - d] = g / g.sum()
        beta = a @ (e[s] * beta)
        beta /= beta.sum()
    return post


def stages(
    log_e: np.ndarray, params: sleep.SleepParams, lag: int = sleep.SMOOTH_LAG
) -> tuple[np.ndarray, np.ndarray]:
    """Decided stage and posterior per epoch: epoch d decided from emissions 0..d+lag, with the onset
    gate (before sleep onset an epoch is asleep only if it and the next ONSET_EPOCHS-1 decided-window
    epochs are most likely asleep)."""
    a, pi = np.exp(params.log_a), np.exp(params.log_pi)
    n = log_e.shape[0]
    out = np.empty(n, dtype=np.int64)
    posts = np.empty((n, a.shape[0]))
    asleep = False
    for d in range(n):
        post = fixed_lag_posteriors(log_e, a, pi, d, min(n - 1, d + lag))
        best = post.argmax(axis=1)
        stage = best[0]
        if not asleep:
            if (best[: sleep.ONSET_EPOCHS] == sleep.WAKE).any():
                stage = sleep.WAKE
            else:
                asleep = True
        out[d] = stage
        posts[d] = post[0]
    return out, posts


def cole_kripke(minute_counts: np.ndarray) -> np.ndarray:
    """D index straight from the paper's formula, one minute at a time."""
    a = np.minimum(np.asarray(minute_counts, dtype=np.float64) / 100.0, 300.0)
    w = {-4: 106, -3: 54, -2: 58, -1: 76, 0: 230, 1: 74, 2: 67}
    return np.array(
        [0.001 * sum(wk * a[m + k] for k, wk in w.items() if 0 <= m + k < a.size) for m in range(a.size)]
    )
