"""decoder/heart.py against the naive reference and itself split into chunks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoder import heart
from decoder.heart import HeartState, heart_epochs, heart_flush, heart_of_recording, new_heart_state
from tests.naive_heart import kept_beats, naive_heart

MIDNIGHT = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


@st.composite
def recordings(draw, max_minutes: int = 150):
    """1 Hz HR with dropouts, and RR intervals with artefacts and missed beats, around a local midnight."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    offset_min = draw(st.integers(-720, 840))
    minutes = draw(st.integers(0, max_minutes))
    # Start up to two hours before the local midnight, so most recordings span two local days.
    start = MIDNIGHT - offset_min * 60_000_000 - draw(st.integers(0, 7_200_000_000))
    n = minutes * 60 + draw(st.integers(0, 59))
    level = 65 + np.cumsum(rng.normal(0, 0.3, n))
    hr = np.clip(np.round(level + rng.normal(0, 3, n)), 30, 200).astype(np.uint8)
    hr[rng.random(n) < draw(st.sampled_from([0.0, 0.1, 0.6]))] = 0
    rr = np.clip(np.round(60_000 / np.maximum(level, 30) + rng.normal(0, 25, n)), 1, 65535).astype(np.int64)
    bad = rng.random(n) < draw(st.sampled_from([0.0, 0.03, 0.3]))
    rr[bad] = rng.choice([150, 250, 2600, 400, 1900], bad.sum())
    if draw(st.booleans()):
        # A steady heart with beats on both sides of the 20 % line: the rule's edges, to the millisecond.
        rr[:] = 1000
        edge = rng.random(n) < 0.15
        rr[edge] = rng.choice([799, 800, 801, 1199, 1200, 1201], edge.sum())
    step = rr * 1000 + np.where(rng.random(n) < 0.02, rng.integers(1, 3_000_000, n), 0)  # missed beats
    rr_end = start + np.cumsum(step)
    inside = rr_end < start + n * 1_000_000
    rr, rr_end = rr[inside].astype(np.uint16), rr_end[inside]
    first_epoch = start // heart.EPOCH_US
    marks = (first_epoch + np.flatnonzero(rng.random(n // 30 + 2) < 0.7)) * heart.EPOCH_US
    return hr, start, rr, rr_end, offset_min, marks


def _assert_rows_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert len(a) == len(b)
    for name in a.dtype.names:
        if a.dtype[name].kind == "f":
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec=recordings(), require_inactive=st.booleans())
def test_kernel_matches_naive(rec, require_inactive):
    hr, start, rr, rr_end, offset_min, marks = rec
    out = heart_of_recording(
        hr, start, rr, rr_end, offset_min, inactive_epoch_us=marks, require_inactive=require_inactive
    )
    rows, resting = naive_heart(hr, start, rr, rr_end, offset_min, marks, require_inactive)
    _assert_rows_equal(out.epochs, rows)
    _assert_rows_equal(out.resting, resting)


def _roundtrip(state: HeartState) -> HeartState:
    return HeartState.from_arrays(
        {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in state.to_arrays().items()}
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec=recordings(), cuts=st.lists(st.floats(0, 1), max_size=8), require_inactive=st.booleans())
def test_any_split_gives_identical_rows(rec, cuts, require_inactive):
    hr, start, rr, rr_end, offset_min, marks = rec
    whole = heart_of_recording(
        hr, start, rr, rr_end, offset_min, inactive_epoch_us=marks, require_inactive=require_inactive
    )
    end = max(start + hr.size * 1_000_000, int(rr_end[-1]) + 1_000_000 if rr_end.size else 0)
    times = sorted({start, end, *(start + int(c * (end - start)) for c in cuts)})
    state = new_heart_state(start, offset_min, require_inactive=require_inactive)
    epochs, resting = [], []
    hr_t = start + np.arange(hr.size, dtype=np.int64) * 1_000_000
    for k, (a, b) in enumerate(itertools.pairwise(times)):
        h = np.flatnonzero((hr_t >= a) & (hr_t < b))
        r = (rr_end >= a) & (rr_end < b)
        # Marks come with the call that covers their epoch's end, as the activity family emits them.
        m_end = marks + heart.EPOCH_US
        m = (m_end > a) & (m_end <= b) if k else m_end <= b
        if k == len(times) - 2:
            m |= m_end > b
        out, state = heart_epochs(
            hr[h],
            int(hr_t[h[0]]) if h.size else a,
            rr[r],
            rr_end[r],
            _roundtrip(state),
            until_us=b,
            inactive_epoch_us=marks[m],
        )
        epochs.append(out.epochs)
        resting.append(out.resting)
    out, state = heart_flush(_roundtrip(state))
    _roundtrip(state)  # a flushed state loads too
    epochs.append(out.epochs)
    resting.append(out.resting)
    assert np.concatenate(epochs).tobytes() == whole.epochs.tobytes()
    assert np.concatenate(resting).tobytes() == whole.resting.tobytes()
    assert state.late == 0


@settings(deadline=None)
@given(rr=st.lists(st.integers(0, 3000), max_size=60))
def test_artefact_rule_on_clean_and_dirty_beats(rr):
    """Out-of-range beats are always rejected; a beat within 20 % of the median of the previous plausible
    ones is always kept."""
    arr = np.array(rr, np.int64)
    kept = kept_beats(arr)
    plausible = (arr >= heart.RR_MIN_MS) & (arr <= heart.RR_MAX_MS)
    assert not np.any(kept & ~plausible)
    t = MIDNIGHT + np.cumsum(np.maximum(arr, 1)) * 1000
    out = heart_of_recording(np.zeros(0, np.uint8), MIDNIGHT, arr.astype(np.uint16), t)
    assert out.epochs["rr_kept"].sum() == kept.sum()
    assert out.epochs["rr_rejected"].sum() == len(rr) - kept.sum()


def test_late_data_is_dropped_and_counted():
    state = new_heart_state(MIDNIGHT)
    out, state = heart_epochs(np.full(90, 60, np.uint8), MIDNIGHT, np.zeros(0), np.zeros(0), state)
    assert len(out.epochs) == 3
    out, state = heart_epochs(
        np.full(5, 80, np.uint8),
        MIDNIGHT + 80_000_000,
        np.zeros(0),
        np.zeros(0),
        state,
        until_us=MIDNIGHT + 100_000_000,
    )
    assert state.late == 5 and len(out.epochs) == 0


def test_a_damaged_beat_history_is_refused_where_the_state_loads():
    """The kernel writes the beat history at _HIST_POS and reads _HIST_N of it: a stored state with either
    out of range is a ValueError when it loads (it wrote past its array: an abort or a silent heap write)."""
    good = new_heart_state(MIDNIGHT).to_arrays()
    HeartState.from_arrays(good)
    damage = ((heart._HIST_POS, 5), (heart._HIST_POS, -1), (heart._HIST_N, 6), (heart._HIST_N, -1))
    for index, value in damage:
        bad = dict(good, ints=good["ints"].copy())
        bad["ints"][index] = value
        with pytest.raises(ValueError, match="beat history"):
            HeartState.from_arrays(bad)


def _mid_stream_ints() -> dict:
    """A state as the kernel leaves it mid-epoch, a minute after a local midnight (in the day's grace)."""
    hr = np.full(140, 60, np.uint8)
    t0 = MIDNIGHT - 90_000_000
    _, state = heart_epochs(hr, t0, np.zeros(0), np.zeros(0), new_heart_state(t0), until_us=t0 + 145_000_000)
    assert state.ints[heart._EPOCH] >= 0 and state.ints[heart._DAY] == MIDNIGHT // heart.DAY_US - 1
    return state.to_arrays()


_DAY_FAR_BACK = (heart._DAY, -(10**15))  # before: the kernel closed days past its buffer (a crash or hang)
_CLOCK_DAMAGE = {
    "day far back": [_DAY_FAR_BACK],
    "day back": [(heart._DAY, lambda v: v[heart._DAY] - 1)],
    "day ahead": [(heart._DAY, lambda v: (v[heart._NOW] + v[heart._OFFSET_US]) // heart.DAY_US + 1)],
    "offset huge": [(heart._OFFSET_US, 10**15)],
    "offset not whole minutes": [(heart._OFFSET_US, 1)],
    "time implausible": [(heart._NOW, 0)],
    "time far ahead": [(heart._NOW, 2**62)],
    "epoch elsewhere": [(heart._EPOCH, lambda v: v[heart._EPOCH] - 1)],
    "epoch negative": [(heart._EPOCH, -5)],
    "flag not a flag": [(heart._FLUSHED, 7)],
    "count negative": [(heart._E_HR_N, -1)],
    "late negative": [(heart._LATE, -1)],
}


@pytest.mark.parametrize("case", sorted(_CLOCK_DAMAGE))
def test_a_clock_the_kernel_could_not_have_left_is_refused_where_the_state_loads(case):
    """The kernel sizes its output from the span a call covers, trusting that the open day is where the
    stream's time is: each damage below, in a real mid-stream state, is a ValueError when it loads."""
    good = _mid_stream_ints()
    HeartState.from_arrays(good)
    bad = dict(good, ints=good["ints"].copy())
    for index, value in _CLOCK_DAMAGE[case]:
        bad["ints"][index] = value(good["ints"]) if callable(value) else value
    with pytest.raises(ValueError, match="heart state is corrupt"):
        HeartState.from_arrays(bad)


def test_refuses_bad_input():
    state = new_heart_state(MIDNIGHT)
    with pytest.raises(ValueError):
        heart_epochs(
            np.zeros(3, np.uint8), MIDNIGHT, np.array([800, 900]), np.array([MIDNIGHT + 9, MIDNIGHT]), state
        )
    with pytest.raises(ValueError):
        heart_epochs(
            np.zeros(3, np.uint8), MIDNIGHT, np.zeros(0), np.zeros(0), state, inactive_epoch_us=[MIDNIGHT + 1]
        )
    with pytest.raises(ValueError):
        heart_epochs(np.zeros(3, np.uint8), MIDNIGHT, np.zeros(0), np.zeros(0), state, until_us=MIDNIGHT + 1)
    _, done = heart_flush(state)
    with pytest.raises(ValueError, match="flushed"):
        heart_epochs(np.zeros(3, np.uint8), MIDNIGHT, np.zeros(0), np.zeros(0), done)
