"""decoder/sleep.py against tests/naive_sleep.py, split invariance of the streaming stager, and the
published algorithms it reimplements (Cole–Kripke 1992)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder import sleep
from tests import naive_sleep as naive

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("BANDGATE_DATA") or REPO.parent / "shared" / "data")
HAVE_DATA = (DATA / "sleep" / "epochs").is_dir()


# --- generated nights and models ------------------------------------------------------------------
@st.composite
def nights(draw, max_epochs=160):
    """A night of epochs: HR that drifts, with gaps (NaN, 0) and out-of-range readings; counts mostly
    zero with bursts; 30-s steps with occasional missing epochs."""
    n = draw(st.integers(1, max_epochs))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    time_s = draw(st.floats(0, 3600)) + 30.0 * np.cumsum(rng.choice([1, 1, 1, 1, 2], size=n))
    hr = 60 + np.cumsum(rng.normal(0, draw(st.sampled_from([0.0, 0.5, 3.0])), n)) + rng.normal(0, 2, n)
    hr[rng.random(n) < draw(st.sampled_from([0.0, 0.1, 0.9]))] = np.nan
    hr[rng.random(n) < 0.03] = 0.0
    hr[rng.random(n) < 0.01] = 300.0
    counts = np.where(rng.random(n) < draw(st.sampled_from([0.0, 0.1, 0.5])), rng.exponential(300, n), 0.0)
    counts[rng.random(n) < 0.01] = np.nan
    if draw(st.booleans()):  # as the records publish them (0.1): means land on histogram bin edges
        hr, counts = np.round(hr, 1), np.round(counts, 1)
    return time_s, hr, counts


def random_params(seed: int, depth: int = 2, n_rounds: int = 3) -> sleep.SleepParams:
    """A random but well-formed model (no exact ties between stages); thresholds near the features'
    typical values so that both sides of a split are taken, some +inf (no split)."""
    rng = np.random.default_rng(seed)
    a = rng.dirichlet(np.ones(sleep.N_STAGES), size=sleep.N_STAGES) + 0.9 * np.eye(sleep.N_STAGES)
    a /= a.sum(axis=1, keepdims=True)
    n_trees, n_int = n_rounds * sleep.N_STAGES, 2**depth - 1
    threshold = rng.normal(0.5, 1.5, (n_trees, n_int))
    threshold[rng.random((n_trees, n_int)) < 0.1] = np.inf
    return sleep.SleepParams(
        tree_feature=rng.integers(0, sleep.N_FEATURES, (n_trees, n_int)),
        tree_threshold=threshold,
        tree_value=rng.normal(0, 1, (n_trees, n_int + 1)),
        log_a=np.log(a),
        log_pi=np.log(rng.dirichlet(np.ones(sleep.N_STAGES))),
        emission_scale=float(rng.uniform(0.2, 1.0)),
    )


# --- kernels vs naive references --------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(nights())
def test_features_match_naive(night):
    time_s, hr, counts = night
    got = sleep.night_features(time_s, hr, counts)
    want = naive.features(time_s, hr, counts)
    assert got.shape == (time_s.size, sleep.N_FEATURES)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(nights(), st.integers(0, 2**32 - 1))
def test_stager_matches_naive_fixed_lag_smoother(night, seed):
    time_s, hr, counts = night
    params = random_params(seed)
    res = sleep.stage_epochs(time_s, hr, counts, sleep.SleepState.new(), params, finish=True)
    log_e = naive.emissions(naive.features(time_s, hr, counts), params)
    want_stage, want_post = naive.stages(log_e, params)
    np.testing.assert_allclose(res.posterior, want_post, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(res.stage, want_stage)
    np.testing.assert_array_equal(res.epoch, np.arange(time_s.size))


@settings(max_examples=80, deadline=None)
@given(
    nights(max_epochs=200),
    st.lists(st.integers(0, 200), max_size=8),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_any_split_gives_identical_output(night, cuts, seed, via_dict):
    """Chunks with the state carried between them (and serialised, when via_dict) = one call."""
    time_s, hr, counts = night
    params = random_params(seed)
    whole = sleep.stage_epochs(time_s, hr, counts, sleep.SleepState.new(), params, finish=True)
    bounds = [0, *sorted(min(c, time_s.size) for c in cuts), time_s.size]
    state = sleep.SleepState.new()
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        last = hi == time_s.size
        parts.append(sleep.stage_epochs(time_s[lo:hi], hr[lo:hi], counts[lo:hi], state, params, finish=last))
        if via_dict:
            state = sleep.SleepState.from_dict(json.loads(json.dumps(state.to_dict())))
    for field in ("epoch", "stage", "posterior", "features", "feature_epoch"):
        got = np.concatenate([getattr(p, field) for p in parts])
        np.testing.assert_array_equal(got, getattr(whole, field), err_msg=field)


def test_stages_are_final_after_the_documented_lag():
    rng = np.random.default_rng(3)
    n = 100
    state = sleep.SleepState.new()
    hr = 60 + rng.normal(0, 2, n)
    res = sleep.stage_epochs(30.0 * np.arange(n), hr, np.zeros(n), state, random_params(1))
    assert res.stage.size == n - sleep.LAG_EPOCHS
    assert state.epochs_in == n and state.epochs_out == n - sleep.LAG_EPOCHS
    assert sleep.LAG_EPOCHS * sleep.EPOCH_S / 60 == 10.0


def test_state_refuses_other_versions_and_layouts():
    d = sleep.SleepState.new().to_dict()
    sleep.SleepState.from_dict(d)
    with pytest.raises(ValueError):
        sleep.SleepState.from_dict({**d, "version": sleep.STATE_VERSION + 1})
    with pytest.raises(ValueError):
        sleep.SleepState.from_array(np.zeros(sleep.STATE_LEN + 1))
    bad = sleep.SleepState.new().array
    bad[0] = 99
    with pytest.raises(ValueError):
        sleep.SleepState.from_array(bad)


def _as_version_1(state: sleep.SleepState) -> np.ndarray:
    """`state` laid out as the previous release stored it: the same header, histogram and HMM window,
    rings of 64 epochs (slot j & 63) holding the last 64 epochs."""
    a, ring, old = state.array, sleep.RING, 64
    v1 = [a[: sleep._HEADER].copy()]
    v1[0][0] = 1
    n_in = state.epochs_in
    for r in range(3):
        slots = np.zeros(old)
        for j in range(max(0, n_in - old), n_in):
            slots[j & (old - 1)] = a[sleep._HEADER + r * ring + (j & (ring - 1))]
        v1.append(slots)
    v1.append(a[sleep._OFF_HIST :])
    return np.concatenate(v1)


@settings(max_examples=40, deadline=None)
@given(nights(max_epochs=300), st.integers(0, 300), st.integers(0, 2**32 - 1))
def test_a_version_1_state_is_upgraded_and_goes_on(night, cut, seed):
    """A period open when the gateway is upgraded goes on from its stored version-1 state: every feature
    but the two hour-window ones is what an uninterrupted run gives, and those two are the naive
    reference's without the heart rate older than the 64 epochs the old ring kept."""
    time_s, hr, counts = night
    cut = min(cut, time_s.size)
    params = random_params(seed)
    whole = sleep.stage_epochs(time_s, hr, counts, sleep.SleepState.new(), params, finish=True)
    state = sleep.SleepState.new()
    first = sleep.stage_epochs(time_s[:cut], hr[:cut], counts[:cut], state, params)
    v1 = _as_version_1(state)
    assert v1.size == 756  # the version-1 STATE_LEN
    upgraded = sleep.SleepState.upgraded(v1)
    assert int(upgraded.array[0]) == sleep.STATE_VERSION
    np.testing.assert_array_equal(upgraded.array[1 : sleep._HEADER], state.array[1 : sleep._HEADER])
    np.testing.assert_array_equal(upgraded.array[sleep._OFF_HIST :], state.array[sleep._OFF_HIST :])
    rest = sleep.stage_epochs(time_s[cut:], hr[cut:], counts[cut:], upgraded, params, finish=True)
    got = np.concatenate([first.features, rest.features])
    epoch = np.concatenate([first.feature_epoch, rest.feature_epoch])
    np.testing.assert_array_equal(epoch, whole.feature_epoch)
    hour = [sleep.FEATURE_NAMES.index(f) for f in ("hr_over_min_hour", "hr_over_median_hour")]
    other = [k for k in range(sleep.N_FEATURES) if k not in hour]
    np.testing.assert_array_equal(got[:, other], whole.features[:, other])
    n1 = first.feature_epoch.size
    np.testing.assert_array_equal(got[:n1][:, hour], whole.features[:n1][:, hour])
    forgotten = hr.copy()  # what the upgraded state knows: no heart rate older than the old ring
    forgotten[: max(0, cut - 64)] = np.nan
    want = naive.features(time_s, forgotten, counts)[rest.feature_epoch][:, hour]
    np.testing.assert_allclose(got[n1:][:, hour], want, rtol=1e-9, atol=1e-9)
    if cut <= 64:  # nothing was lost: the stages and posteriors are the uninterrupted run's too
        np.testing.assert_array_equal(np.concatenate([first.stage, rest.stage]), whole.stage)
        np.testing.assert_array_equal(np.concatenate([first.posterior, rest.posterior]), whole.posterior)
    assert sleep.SleepState.upgraded(state.array).array is not state.array  # this version: checked, copied
    with pytest.raises(ValueError):
        sleep.SleepState.upgraded(v1[:-1])
    for bad in (np.inf, np.nan, -1.0):  # a damaged or hostile stored count is refused, not a crash
        hostile = v1.copy()
        hostile[1] = bad
        with pytest.raises(ValueError):
            sleep.SleepState.upgraded(hostile)
    hostile = v1.copy()
    hostile[0] = np.inf
    with pytest.raises(ValueError):
        sleep.SleepState.upgraded(hostile)


def test_a_state_the_previous_release_wrote_is_upgraded():
    """`data/sleep_state_v1.json`: 90 epochs staged by the version-1 stager (commit 7b02839, its own
    params), its state as that release stored it. Upgraded, the counters, histogram and HMM window are
    kept, the ring holds the last 64 epochs' inputs at their new slots, and the features this release
    computes from it are those of a version-2 run over the same epochs (the hour-window ones as the
    naive reference gives them without the forgotten epochs)."""
    fixture = json.loads((Path(__file__).parent / "data" / "sleep_state_v1.json").read_text())
    time_s, hr, counts = (np.array(fixture[k]) for k in ("time_s", "hr_bpm", "counts"))
    v1 = np.array(fixture["state"])
    upgraded = sleep.SleepState.upgraded(v1)
    a = upgraded.array
    n = time_s.size
    assert upgraded.epochs_in == n and a[9] == 1.0  # asleep, as the old stager left it
    np.testing.assert_array_equal(a[1 : sleep._HEADER], v1[1 : sleep._HEADER])
    np.testing.assert_array_equal(a[sleep._OFF_HIST :], v1[sleep._HEADER + 3 * 64 :])
    clean_hr, clean_counts = naive.clean_inputs(hr, counts)
    for j in range(n):
        slot = j & (sleep.RING - 1)
        if j >= n - 64:
            np.testing.assert_array_equal(a[sleep._OFF_HR + slot], clean_hr[j])
            assert a[sleep._OFF_COUNTS + slot] == clean_counts[j] and a[sleep._OFF_TIME + slot] == time_s[j]
        else:
            assert np.isnan(a[sleep._OFF_HR + slot])
    more = 40
    t2 = np.concatenate([time_s, time_s[-1] + 30.0 * np.arange(1, more + 1)])
    hr2, counts2 = np.concatenate([hr, np.full(more, 58.0)]), np.concatenate([counts, np.zeros(more)])
    params = random_params(3)
    rest = sleep.stage_epochs(t2[n:], hr2[n:], counts2[n:], upgraded, params, finish=True)
    fresh = sleep.stage_epochs(t2, hr2, counts2, sleep.SleepState.new(), params, finish=True)
    got, want = rest.features, fresh.features[rest.feature_epoch]
    hour = [sleep.FEATURE_NAMES.index(f) for f in ("hr_over_min_hour", "hr_over_median_hour")]
    other = [k for k in range(sleep.N_FEATURES) if k not in hour]
    np.testing.assert_array_equal(got[:, other], want[:, other])
    forgotten = hr2.copy()
    forgotten[: n - 64] = np.nan
    want_hour = naive.features(t2, forgotten, counts2)[rest.feature_epoch][:, hour]
    np.testing.assert_allclose(got[:, hour], want_hour, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(rest.epoch, np.arange(upgraded.epochs_out - rest.epoch.size, n + more))


@pytest.mark.parametrize(
    ("index", "value"),
    [(1, 1e6), (1, np.inf), (2, -100000.0), (3, -1e7), (3, 2.5), (5, 1e9), (8, -1.0), (8, np.nan), (9, 0.5)],
)
def test_a_damaged_or_hostile_stored_header_is_refused(index, value):
    """The kernel indexes its outputs by these counters: a stored state whose counters the kernel could
    not have left (too many epochs pending, negative or fractional counts, a flag that is not one) is a
    ValueError when it loads, in either version's layout, never a crash or a hang in the kernel."""
    state = sleep.SleepState.new()
    sleep.stage_epochs(30.0 * np.arange(90), np.full(90, 60.0), np.zeros(90), state, random_params(1))
    for array in (state.array.copy(), _as_version_1(state)):
        array[index] = value
        with pytest.raises(ValueError):
            sleep.SleepState.upgraded(array)
    with pytest.raises(ValueError):
        sleep.SleepState.from_array(state.array.astype(np.complex128))


# --- published algorithms --------------------------------------------------------------------------
def test_cole_kripke_constants_are_the_papers():
    """Cole et al. 1992, Sleep 15(5):461, 1-min epochs (mean activity): D = 0.001 (106 A-4 + 54 A-3 +
    58 A-2 + 76 A-1 + 230 A0 + 74 A+1 + 67 A+2), sleep if D < 1; ActiLife: A = min(counts/100, 300)."""
    assert sleep.COLE_KRIPKE_P == 0.001
    assert sleep.COLE_KRIPKE_WEIGHTS.tolist() == [106, 54, 58, 76, 230, 74, 67]
    assert (sleep.COLE_KRIPKE_SCALE, sleep.COLE_KRIPKE_CAP) == (100, 300)


def test_cole_kripke_worked_example():
    """One minute of 1000 counts (A = 10) at minute 10 of a quiet night: D at minute m is 0.01 × the
    weight that minute 10 gets, so only minutes 10 (2.30) and 14 (1.06) are called wake."""
    minutes = np.zeros(20)
    minutes[10] = 1000.0
    d, asleep = sleep.cole_kripke(minutes)
    expected = np.zeros(20)
    expected[[8, 9, 10, 11, 12, 13, 14]] = [0.67, 0.74, 2.30, 0.76, 0.58, 0.54, 1.06]
    np.testing.assert_allclose(d, expected, atol=1e-12)
    assert np.flatnonzero(~asleep).tolist() == [10, 14]
    d_cap, _ = sleep.cole_kripke(np.array([0, 0, 0, 0, 1e6, 0, 0]))
    assert d_cap[4] == pytest.approx(0.001 * 230 * 300)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 5e4), max_size=40))
def test_cole_kripke_matches_naive(minutes):
    d, _ = sleep.cole_kripke(np.array(minutes))
    np.testing.assert_allclose(d, naive.cole_kripke(np.array(minutes)), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(nights())
def test_stager_cole_kripke_feature_is_cole_kripke_on_minute_sums(night):
    """At odd epochs the minute sums (c[2k] + c[2k+1]) line up with whole minutes: the feature must be
    the published D of those minutes."""
    time_s, hr, counts = night
    feats = sleep.night_features(time_s, hr, counts)
    c = np.where(counts > 0, counts, 0.0)
    c = np.append(c, np.zeros(c.size % 2))  # a last half minute sums with nothing after it
    d, _ = sleep.cole_kripke(c[0::2] + c[1::2])
    col = sleep.FEATURE_NAMES.index("log_cole_kripke")
    np.testing.assert_allclose(feats[1::2, col], np.log1p(d[: feats[1::2].shape[0]]), rtol=1e-12, atol=1e-12)


# --- nightly summary and per-epoch API ------------------------------------------------------------
def test_summary_of_a_hand_made_night():
    w, li, d, r = sleep.WAKE, sleep.LIGHT, sleep.DEEP, sleep.REM
    stage = np.array([w, w, li, li, d, d, w, r, r, li, w, w])  # 12 epochs = 6 min
    s = sleep.summarize_night(stage)
    assert s["time_in_bed_min"] == 6.0
    assert s["total_sleep_min"] == 3.5
    assert s["sleep_period_min"] == 4.0  # epochs 2..9
    assert s["waso_min"] == 0.5
    assert s["onset_latency_min"] == 1.0
    assert s["efficiency"] == pytest.approx(3.5 / 6)
    assert (s["wake_min"], s["light_min"], s["deep_min"], s["rem_min"]) == (2.5, 1.5, 1.0, 1.0)
    assert sleep.summarize_night(np.zeros(4, dtype=np.int8))["total_sleep_min"] == 0.0


def test_stage_night_with_shipped_params_on_an_obvious_night():
    """20 min restless at 85 bpm, then 6 h still at about 55 bpm: awake first, then mostly asleep."""
    rng = np.random.default_rng(0)
    awake, asleep = 40, 720
    n = awake + asleep
    hr = np.r_[85 + rng.normal(0, 4, awake), 55 + rng.normal(0, 1, asleep)]
    counts = np.r_[rng.exponential(800, awake), np.zeros(asleep)]
    stage = sleep.stage_night(30.0 * np.arange(n), hr, counts)
    assert stage.shape == (n,) and stage.dtype == np.int8
    assert (stage[: awake - 5] == sleep.WAKE).all()
    assert np.mean(stage[awake + 20 :] != sleep.WAKE) > 0.9


def test_shipped_params_load_and_match_the_kernel():
    p = sleep.load_params()
    assert p.tree_threshold.shape[0] % sleep.N_STAGES == 0 and p.tree_value.shape[0] > 0
    np.testing.assert_allclose(np.exp(p.log_a).sum(axis=1), 1.0)
    d = json.loads(sleep.PARAMS_PATH.read_text())
    assert d["lag_epochs"] == sleep.LAG_EPOCHS
    assert d["counts"] == sleep.COUNTS_DEFINITION
    for other in ({**d, "counts": "epoch-vm"}, {k: v for k, v in d.items() if k != "counts"}):
        with pytest.raises(ValueError, match="counts"):
            sleep.SleepParams.from_dict(other)


def test_stage_probabilities_are_calibrated_rounded_rows_summing_to_one():
    """Vector scaling (softmax(a·log p + b)) with a = 1, b = 0 is the identity; the published rows are
    thousandths that sum to exactly 1000, each within one thousandth of the calibrated value."""
    rng = np.random.default_rng(3)
    post = rng.dirichlet(np.full(sleep.N_STAGES, 0.3), size=500)
    np.testing.assert_allclose(sleep.calibrate(post, 1.0, np.zeros(4)), post, rtol=1e-12, atol=1e-15)
    params = sleep.SleepParams(
        **{
            k: getattr(sleep.SleepParams.blank(), k) for k in ("tree_feature", "tree_threshold", "tree_value")
        },
        log_a=np.zeros((4, 4)),
        log_pi=np.zeros(4),
        emission_scale=1.0,
        calibration_scale=0.5,
        calibration_bias=np.array([0.0, 1.0, -0.5, 0.2]),
    )
    want = np.exp(0.5 * np.log(post) + params.calibration_bias)
    want /= want.sum(axis=1, keepdims=True)
    got = sleep.stage_probabilities(post, params)
    thousandths = np.rint(got * 1000)
    np.testing.assert_array_equal(thousandths / 1000, got)
    assert (thousandths.sum(axis=1) == 1000).all()
    assert np.abs(got - want).max() < 1e-3 + 1e-12
    assert sleep.stage_probabilities(np.zeros((0, 4)), params).shape == (0, 4)


def test_shipped_params_carry_a_calibration():
    shipped = json.loads(sleep.PARAMS_PATH.read_text())
    assert set(shipped["calibration"]) == {"scale", "bias"}
    p = sleep.load_params()
    assert p.calibration_scale > 0 and p.calibration_bias.shape == (sleep.N_STAGES,)


def test_stager_inputs_are_what_the_records_publish():
    """Rounded as `_Layout` rounds a record's value (float32, then half to even); NaN passes."""
    from decoder.features import _round_columns

    rng = np.random.default_rng(3)
    v = np.r_[rng.uniform(0, 5000, 200), 0.05, 0.15, 2.25, np.nan]
    hr, counts = sleep.stager_inputs(v, v)
    f, _ = _round_columns(
        v[:, None], np.array([0]), np.array([10.0**sleep.INPUT_DIGITS]), np.zeros(0, np.int64)
    )
    np.testing.assert_array_equal(counts, f[0])
    np.testing.assert_array_equal(hr, counts)


def test_fitted_trees_learn_a_toy_rule_and_the_kernel_reads_them():
    """fit_trees on a rule of two features (stage = 2·[f0 > 0] + [f3 > 1]): the kernel's scores, in the
    fitter's layout, recover it, and the naive tree walk agrees with the kernel's."""
    from scripts.fit_sleep import fit_trees

    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (2000, sleep.N_FEATURES))
    y = 2 * (X[:, 0] > 0) + (X[:, 3] > 1)
    feature, threshold, value = fit_trees(X, y, n_rounds=30, depth=2)
    params = sleep.SleepParams(feature, threshold, value, np.zeros((4, 4)), np.zeros(4), 1.0)
    scores = np.empty((X.shape[0], sleep.N_STAGES))
    for t, x in enumerate(X):
        sleep._tree_scores(x, feature, threshold, value, scores[t])
    assert np.mean(scores.argmax(axis=1) == y) > 0.95
    log_softmax = scores[:50] - np.log(np.exp(scores[:50]).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(naive.emissions(X[:50], params), log_softmax, atol=1e-9)
    assert set(feature[: sleep.N_STAGES, 0].tolist()) <= {0, 3}  # first round: roots split on the rule


def test_fit_calibration_recovers_a_known_vector_scaling():
    """Posteriors that are softmax(log p / 0.4 - b) of the true probabilities p: the fit undoes it."""
    from scripts.fit_sleep import fit_calibration

    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(sleep.N_STAGES, 0.7), size=20000)
    y = np.array([rng.choice(sleep.N_STAGES, p=row) for row in p])
    b = np.array([0.0, 0.8, -0.3, 0.4])
    post = sleep.calibrate(p, 1 / 0.4, -b / 0.4)
    scale, bias = fit_calibration(post, y)
    assert scale == pytest.approx(0.4, abs=0.03)
    np.testing.assert_allclose(bias, b, atol=0.08)


def test_a_split_tie_goes_to_the_lower_feature_whatever_the_rounding():
    """Two features cutting the rows alike have equal gains, summed in different orders; where the
    higher feature's rounds higher (as another CPU's exp and sums can make either), the lower one wins."""
    from scripts.fit_sleep import _best_split

    binned = np.stack([np.repeat([0, 1, 2], 10), np.repeat([0, 0, 1], 10)], axis=1)
    edges = [np.array([1.0, 2.0]), np.array([2.0])]  # feature 0 cut 1 and feature 1 cut 0: rows 0-19 left

    def gain(f: int, b: int, g: np.ndarray, h: np.ndarray) -> float:
        gl = np.cumsum(np.bincount(binned[:, f], g, edges[f].size + 1))[b]
        hl = np.cumsum(np.bincount(binned[:, f], h, edges[f].size + 1))[b]
        return gl * gl / (hl + 1) + (g.sum() - gl) ** 2 / (h.sum() - hl + 1)

    rounded_up = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        g, h = np.r_[-1 - rng.random(20), 1 + rng.random(10)] * 10, 1 + rng.random(30)
        assert gain(1, 0, g, h) == pytest.approx(gain(0, 1, g, h), rel=1e-12)
        rounded_up += gain(1, 0, g, h) > gain(0, 1, g, h)
        assert _best_split(binned, g, h, edges, 1.0, 1.0) == (0, 1)
    assert rounded_up  # the case that matters was met


@pytest.mark.skipif(not HAVE_DATA, reason=f"Sleep-Accel nights not found under {DATA} (set BANDGATE_DATA)")
def test_the_fitted_file_does_not_depend_on_the_cpus_simd(tmp_path):
    """scripts/fit_sleep.py with numpy's SIMD kernels as this CPU has them, and with none beyond the
    baseline: the same trees, and every number within rounding (before the tie rule and the Newton
    calibration, AVX-512 against AVX2 gave other trees)."""
    import subprocess
    import sys

    from numpy._core._multiarray_umath import __cpu_dispatch__ as dispatch
    from numpy._core._multiarray_umath import __cpu_features__ as features

    found = [f for f in dispatch if features.get(f)]
    if not found:
        pytest.skip("this CPU has no SIMD beyond numpy's baseline: nothing to compare")
    fit = [sys.executable, str(REPO / "scripts" / "fit_sleep.py"), "--data", str(DATA), "--out"]
    procs = [
        subprocess.Popen(
            [*fit, str(tmp_path / f"{name}.json")], env=os.environ | env, stdout=subprocess.DEVNULL
        )
        for name, env in (("simd", {}), ("baseline", {"NPY_DISABLE_CPU_FEATURES": " ".join(found)}))
    ]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    simd, baseline = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("simd", "baseline"))
    close = ("tree_value", "calibration")  # sums of floats: rounding; all else (trees, choices, κ) exact
    assert {k: v for k, v in simd.items() if k not in close} == {
        k: v for k, v in baseline.items() if k not in close
    }
    for key in close:
        a, b = simd[key], baseline[key]
        if isinstance(a, dict):
            a, b = [a["scale"], *a["bias"]], [b["scale"], *b["bias"]]
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-9, atol=1e-12)


def test_pooled_confusions_collapse_and_bootstrap_as_the_scores_do():
    """The bench's per-night 4-class confusions, collapsed to 3 and 2 classes, give the κ that scores()
    computes from labels; the bootstrap interval holds the pooled κ and is reproducible."""
    from bench.accuracy_sleep import bootstrap_kappa, collapse, kappa_batch, scores
    from scripts.fit_sleep import confusion

    rng = np.random.default_rng(2)
    truth = [rng.integers(0, 4, 300) for _ in range(8)]
    pred = [np.where(rng.random(t.size) < 0.6, t, rng.integers(0, 4, t.size)) for t in truth]
    m4 = np.array([confusion(t, q, 4) for t, q in zip(truth, pred, strict=True)])
    pooled = scores(np.concatenate(truth), np.concatenate(pred))
    for name in ("4class", "3class", "sleepwake"):
        assert collapse(m4.sum(axis=0), name).tolist() == pooled[name]["confusion"]
        assert kappa_batch(collapse(m4.sum(axis=0), name)) == pytest.approx(pooled[name]["kappa"], rel=1e-12)
    ci = bootstrap_kappa(m4)
    assert ci == bootstrap_kappa(m4)
    for name, (lo, hi) in ci.items():
        assert lo <= pooled[name]["kappa"] <= hi


# --- real data ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_DATA, reason=f"Sleep-Accel nights not found under {DATA} (set BANDGATE_DATA)")
@pytest.mark.slow
def test_held_out_night_beats_chance_and_fit_is_deterministic():
    from bench.accuracy_sleep import scores
    from scripts.fit_sleep import fit_params, load_hypnograms, load_nights

    nights_ = load_nights(DATA)
    hyp = load_hypnograms(DATA)
    held = next(n for n in nights_ if n.subject == "8692923")
    train = [n for n in nights_ if n is not held]
    fitted = fit_params(train, hyp)
    assert held.subject not in fitted["subjects"]
    assert fit_params(train, hyp) == fitted
    pred = sleep.stage_night(held.time_s, held.hr_bpm, held.counts, sleep.SleepParams.from_dict(fitted))
    s = scores(held.stage, pred.astype(np.int64))
    assert s["4class"]["kappa"] > 0.2
    assert s["sleepwake"]["accuracy"] > 0.8
