"""decoder/activity.py against agcounts, the naive reference, and itself split into chunks."""

from __future__ import annotations

import functools
import itertools
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoder import activity
from decoder.activity import (
    ActivityState,
    activity_epochs,
    activity_flush,
    activity_of_recording,
    new_activity_state,
)
from tests.naive_activity import naive_activity, resample_to_30hz

G = 16 / 4096
EPOCH_ALIGNED = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z, on the 30-s and 15-min grids


def _signal(seed: int, n: int, kind: str) -> np.ndarray:
    """int16 counts (n, 3): wrist-like motion, noise, stillness with a tilt, or full-range chaos."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None] / 50.0
    if kind == "walk":
        a = 256 * (0.6 * np.sin(2 * np.pi * np.array([1.8, 0.9, 3.6]) * t + rng.uniform(0, 6, 3)))
        a += rng.normal(0, 25, (n, 3)) + np.array([0, 256, 0])
    elif kind == "still":
        a = np.array([60, 30, 245]) + rng.normal(0, 0.6, (n, 3))  # ~2 mg: a band on a table
    elif kind == "noise":
        a = rng.normal(0, rng.choice([5, 100, 600]), (n, 3)) + np.array([0, 0, 256])
    else:
        a = rng.integers(-2048, 2048, (n, 3))
    return np.clip(np.round(a), -2048, 2047).astype(np.int16)


def _agree(mine: np.ndarray, ref: np.ndarray) -> None:
    """Within 1 % or 2 counts per epoch and axis."""
    diff = np.abs(mine.astype(np.int64) - ref.astype(np.int64))
    assert np.all(diff <= np.maximum(2, 0.01 * np.abs(ref))), (mine, ref)


def _axis_counts(rows: np.ndarray) -> np.ndarray:
    return np.stack([rows["counts_x"], rows["counts_y"], rows["counts_z"]], axis=1)


# --- published constants ------------------------------------------------------------------------------


def test_coefficients_are_agcounts():
    from agcounts.legacy import INPUT_COEFFICIENTS, OUTPUT_COEFFICIENTS
    from scipy.signal import lfilter_zi

    assert np.array_equal(activity.BPF_B, INPUT_COEFFICIENTS[0])
    assert np.array_equal(activity.BPF_A, OUTPUT_COEFFICIENTS[0])
    zi = lfilter_zi(INPUT_COEFFICIENTS[0], OUTPUT_COEFFICIENTS[0])
    assert zi[-1] == 0.0  # the dropped ninth state
    # lfilter_zi solves a linear system: its last digits depend on the CPU's BLAS kernels (5e-12
    # relative on one machine, 0 on another), so the constant is held to 1e-10, not to the bit.
    np.testing.assert_allclose(activity.BPF_ZI, zi[:-1], rtol=1e-10, atol=1e-15)
    assert activity.COUNTS_SCALE == (3.0 / 4096.0) / (2.6 / 256.0) * 237.5


@pytest.mark.parametrize("fs", [30, 40, 50, 60, 100])
def test_resample_factors_are_agcounts(fs):
    from agcounts.legacy import _factors

    assert activity.resample_factors(fs) == _factors(fs)


def test_mg_table_is_numpy_division():
    r = np.arange(-(1 << 16), (1 << 16) + 1, dtype=np.float64)
    assert np.array_equal(activity.MG_TABLE, np.round(r / 1000.0, 3))
    assert np.array_equal(activity.MG_TABLE, r / 1000.0)


@settings(deadline=None)
@given(st.lists(st.floats(-70.0, 70.0), min_size=1, max_size=50))
def test_round_mg_is_numpy_round(values):
    """The looked-up rounding equals np.round(v, 3) bit for bit, inside and outside the table."""
    edges = np.arange(65_000, 70_000) / 1000.0  # either side of the table's end
    v = np.concatenate([values, [0.0005, -0.0015], edges, -edges])
    ours = np.array([activity._round_mg(a, activity.MG_TABLE) for a in v])
    assert np.array_equal(ours, np.round(v, 3))


def test_naive_resampler_is_agcounts():
    from agcounts.extract import _resample

    x = _signal(3, 3000, "walk")[:, 0] * G
    for fs in (40, 50, 100):
        ours, _ = resample_to_30hz(x, fs)
        np.testing.assert_array_equal(ours, _resample(x[:, None], fs)[0])


# --- agcounts agreement -------------------------------------------------------------------------------


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["walk", "noise", "chaos"]),
    fs=st.sampled_from([50, 100]),
)
def test_counts_match_agcounts(seed, kind, fs):
    from agcounts.extract import get_counts

    n = fs * 30 * 6
    xyz = _signal(seed, n, kind)
    ref = get_counts(xyz * G, fs, 30)
    out = activity_of_recording(*xyz.T, fs, EPOCH_ALIGNED)
    mine = _axis_counts(out.epochs)[: len(ref)]
    _agree(mine, ref)
    np.testing.assert_allclose(
        out.epochs["counts_vm"][: len(ref)], np.sqrt((ref.astype(float) ** 2).sum(1)), rtol=1e-6
    )


def _vm_1s_sums(per_second: np.ndarray) -> np.ndarray:
    """Σ over each whole 30 s of √(x² + y² + z²) of agcounts' per-second counts (epoch=1)."""
    vm = np.sqrt((per_second.astype(np.float64) ** 2).sum(axis=1))
    k = vm.size // 30
    return vm[: 30 * k].reshape(k, 30).sum(axis=1)


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["walk", "noise", "chaos"]),
    fs=st.sampled_from([50, 100]),
)
def test_vm_1s_sum_is_agcounts_per_second_vm_summed(seed, kind, fs):
    """The sleep stager's movement input is agcounts' per-second vector magnitude summed over the epoch
    (exact but for the float32 column)."""
    from agcounts.extract import get_counts

    xyz = _signal(seed, fs * 30 * 6, kind)
    ref = _vm_1s_sums(get_counts(xyz * G, fs, 1))
    out = activity_of_recording(*xyz.T, fs, EPOCH_ALIGNED)
    np.testing.assert_allclose(out.epochs["counts_vm_1s_sum"][: ref.size], ref, rtol=1e-6)
    # never below the magnitude of the epoch's axis sums (triangle inequality), equal only without turns
    assert np.all(out.epochs["counts_vm_1s_sum"] >= out.epochs["counts_vm"] * (1 - 1e-6))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["walk", "noise"]))
def test_counts_25hz_match_agcounts_after_resampling(seed, kind):
    """agcounts takes no 25 Hz; our resampling to 30 Hz, handed to agcounts at 30 Hz, gives our counts."""
    from agcounts.extract import get_counts

    n = 25 * 30 * 6
    xyz = _signal(seed, n, kind)
    at30 = np.stack([resample_to_30hz(xyz[:, k] * G, 25)[0] for k in range(3)], axis=1)
    ref = get_counts(at30, 30, 30)
    out = activity_of_recording(*xyz.T, 25, EPOCH_ALIGNED)
    _agree(_axis_counts(out.epochs)[: len(ref)], ref)


# --- the naive reference ------------------------------------------------------------------------------


def _compare(rows: np.ndarray, ref: np.ndarray) -> None:
    assert len(rows) == len(ref)
    for name in (
        "epoch_start_us",
        "n_samples",
        "counts_x",
        "counts_y",
        "counts_z",
        "counts_n10",
        "angle_changes",
    ):
        np.testing.assert_array_equal(rows[name], ref[name], err_msg=name)
    for name in ("enmo_mg", "mad_mg", "counts_vm", "counts_vm_1s_sum", "z_angle_deg"):
        np.testing.assert_allclose(rows[name], ref[name], rtol=2e-6, atol=2e-4, err_msg=name)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["walk", "still", "noise", "chaos"]),
    fs=st.sampled_from([25, 30, 50, 60, 100]),
    seconds=st.integers(0, 150),
    offset_us=st.integers(0, 60_000_000),
)
def test_kernel_matches_naive(seed, kind, fs, seconds, offset_us):
    n = fs * seconds + seed % fs
    xyz = _signal(seed, n, kind)
    start = EPOCH_ALIGNED + offset_us
    out = activity_of_recording(*xyz.T, fs, start)
    rows, nonwear = naive_activity(xyz, fs, start)
    _compare(out.epochs, rows)
    np.testing.assert_array_equal(out.nonwear, nonwear)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), still_from_min=st.integers(0, 100), offset_s=st.integers(0, 1800))
def test_nonwear_matches_naive(seed, still_from_min, offset_s):
    fs = 25
    n = fs * 60 * 150  # 2.5 h: moving, then still from a random minute
    xyz = _signal(seed, n, "walk")
    a = fs * 60 * still_from_min
    xyz[a:] = _signal(seed + 1, n - a, "still")
    start = EPOCH_ALIGNED + offset_s * 1_000_000
    out = activity_of_recording(*xyz.T, fs, start)
    rows, nonwear = naive_activity(xyz, fs, start, with_counts=False)
    np.testing.assert_array_equal(out.nonwear, nonwear)
    if still_from_min <= 75:  # the still part then holds four whole 15-min UTC blocks
        assert out.nonwear["nonwear"][-1] == 1
    if still_from_min > 90:
        assert out.nonwear["nonwear"][0] == 0
    np.testing.assert_allclose(out.epochs["enmo_mg"], rows["enmo_mg"], rtol=2e-6, atol=2e-4)


# --- streaming ------------------------------------------------------------------------------------------


def _as_version_1(arrays: dict) -> dict:
    """A version-2 state's arrays in version 1's layout: no per-second count sums."""
    v1 = {"version": 1, "ints": arrays["ints"][: activity._S_CX].copy()}
    v1["ints"][activity._VERSION] = 1
    v1["floats"] = np.delete(arrays["floats"], activity._E_VM1S)
    return v1


def _roundtrip(state: ActivityState) -> ActivityState:
    """Serialise to plain arrays and back, as the gateway stores a device between batches. The state is
    loaded in version 1's layout too: from_arrays checks the upgraded state as strictly as a stored one."""
    arrays = {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in state.to_arrays().items()}
    upgraded = ActivityState.from_arrays(_as_version_1(arrays))
    s_cx, vm = slice(activity._S_CX, activity._S_CX + 3), activity._E_VM1S
    assert not upgraded.ints[s_cx].any() and upgraded.floats[vm] == 0.0
    loaded = ActivityState.from_arrays(arrays)
    assert np.array_equal(loaded.ints, state.ints) and np.array_equal(loaded.floats, state.floats)
    return loaded


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["walk", "still", "noise", "chaos"]),
    fs=st.sampled_from([25, 50, 40, 90]),
    seconds=st.integers(1, 200),
    offset_us=st.integers(0, 3_600_000_000),
    cuts=st.lists(st.floats(0, 1), max_size=8),
)
def test_any_split_gives_identical_rows(seed, kind, fs, seconds, offset_us, cuts):
    n = fs * seconds + seed % 7
    xyz = _signal(seed, n, kind)
    start = EPOCH_ALIGNED + offset_us
    whole = activity_of_recording(*xyz.T, fs, start)
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    state = new_activity_state(fs, start)
    epochs, nonwear = [], []
    for a, b in itertools.pairwise(bounds):
        out, state = activity_epochs(
            *xyz[a:b].T, _roundtrip(state), t0_us=activity.sample_time_us(start, fs, a)
        )
        epochs.append(out.epochs)
        nonwear.append(out.nonwear)
    out, flushed = activity_flush(_roundtrip(state))
    epochs.append(out.epochs)
    nonwear.append(out.nonwear)
    assert np.concatenate(epochs).tobytes() == whole.epochs.tobytes()
    assert np.concatenate(nonwear).tobytes() == whole.nonwear.tobytes()
    again, _ = activity_flush(_roundtrip(flushed))  # a flushed state loads, and has nothing more to emit
    assert again.epochs.size == again.nonwear.size == 0


@pytest.mark.parametrize("fs", activity.SAMPLE_RATES_HZ)
def test_every_state_the_kernel_leaves_loads(fs):
    """from_arrays holds a state's counters to exactly where its stream is, so every state the kernel
    leaves must pass: batches of 1 sample to a whole epoch, ending on and between the UTC second, epoch and
    15-min block boundaries, flushed or not, in either version's layout. At 25 Hz the stream is still for
    over an hour, so the non-wear ring fills and its blocks are flagged."""
    seconds = 3_700 if fs == 25 else 70
    xyz = _signal(fs, fs * seconds, "still" if fs == 25 else "walk")
    start = EPOCH_ALIGNED + 899_987_654  # 12.3 s before a block boundary, off the sample grid
    state = _roundtrip(new_activity_state(fs, start, range_g=4, bits=16))
    sizes = itertools.cycle([1, fs - 1, 2, fs, 3, fs + 1, 7 * fs + 3, 30 * fs - 1, 30 * fs, 30 * fs + 1])
    a = 0
    for step, size in enumerate(sizes):
        if a >= len(xyz):
            break
        _, state = activity_epochs(*xyz[a : a + size].T, state)
        state = _roundtrip(state)
        a += size
        if step % 5 == 0:
            _roundtrip(activity_flush(state)[1])
    if fs == 25:  # the ring holds its most blocks, all flagged non-wear
        ring = state.ints[activity._RING : activity._S_CX].reshape(activity.WINDOW_BLOCKS, activity._SLOT)
        filed = ring[ring[:, 0] >= 0]
        assert len(filed) == activity.WINDOW_BLOCKS - 1 and filed[:, 14].all()
    _roundtrip(activity_flush(state)[1])
    _roundtrip(activity_flush(new_activity_state(fs, start))[1])


def test_epochs_are_emitted_when_complete():
    fs = 50
    xyz = _signal(1, fs * 75, "walk")
    state = new_activity_state(fs, EPOCH_ALIGNED)
    out, state = activity_epochs(*xyz[: fs * 30].T, state)
    assert len(out.epochs) == 0  # the epoch ends, but no sample past it has arrived
    out, state = activity_epochs(*xyz[fs * 30 :].T, state)
    assert list(out.epochs["epoch_start_us"]) == [EPOCH_ALIGNED, EPOCH_ALIGNED + 30_000_000]
    assert list(out.epochs["n_samples"]) == [fs * 30, fs * 30]
    out, _ = activity_flush(state)
    assert list(out.epochs["n_samples"]) == [fs * 15]


def test_refuses_gaps_and_use_after_flush():
    state = new_activity_state(50, EPOCH_ALIGNED)
    xyz = _signal(2, 100, "noise")
    _, state = activity_epochs(*xyz.T, state, t0_us=EPOCH_ALIGNED)
    with pytest.raises(ValueError, match="gap"):
        activity_epochs(*xyz.T, state, t0_us=EPOCH_ALIGNED + 10_000_000)
    _, done = activity_flush(state)
    with pytest.raises(ValueError, match="flushed"):
        activity_epochs(*xyz.T, done)
    with pytest.raises(ValueError):
        new_activity_state(33, EPOCH_ALIGNED)
    with pytest.raises(ValueError):
        ActivityState.from_arrays({"version": 99, "ints": state.ints, "floats": state.floats})


def test_state_does_not_change_under_a_call():
    state = new_activity_state(25, EPOCH_ALIGNED)
    before = state.to_arrays()
    activity_epochs(*_signal(4, 2000, "walk").T, state)
    assert np.array_equal(before["ints"], state.ints) and np.array_equal(before["floats"], state.floats)


def test_a_version_1_state_is_upgraded_and_goes_on():
    """A stream stored before counts_vm_1s_sum existed goes on after an upgrade: every row is the same
    as if it had never stopped, except the open epoch's counts_vm_1s_sum, which lacks its earlier
    seconds."""
    fs = 50
    xyz = _signal(7, fs * 100, "walk")
    cut = fs * 45  # mid-epoch
    first, state = activity_epochs(*xyz[:cut].T, new_activity_state(fs, EPOCH_ALIGNED))
    upgraded = ActivityState.from_arrays(_as_version_1(state.to_arrays()))
    rest, _ = activity_epochs(*xyz[cut:].T, upgraded)
    straight, _ = activity_epochs(*xyz[cut:].T, state)
    for name in activity.EPOCH_DTYPE.names:
        if name != "counts_vm_1s_sum":
            np.testing.assert_array_equal(rest.epochs[name], straight.epochs[name], err_msg=name)
    vm = rest.epochs["counts_vm_1s_sum"]
    assert vm[0] < straight.epochs["counts_vm_1s_sum"][0]
    np.testing.assert_array_equal(vm[1:], straight.epochs["counts_vm_1s_sum"][1:])
    assert first.epochs.size == 1


# --- a damaged or hostile stored state ------------------------------------------------------------------
# (field, value): a field is a name in decoder.activity, or a slot of the non-wear ring ("ring.n": a
# filed block's sample count; "ring.empty": an empty slot's block index); a value is what is stored
# there, or "+k" for k more than the real value. Finite but for a few: what storage corruption or a
# hand-made state can hold. The kernel indexes, loops and sizes by some of these (a crash or a hang);
# the rest give wrong rows.
_HOSTILE_INTS = [
    ("_VERSION", 1e12),
    ("_FS", 1e12),
    ("_FS", 33),
    ("_FS", 100),  # a supported rate, but not the state's
    ("_UP", 1e12),  # the resampler's inner loop runs _UP times a sample
    ("_UP", 6),  # 25 Hz's factors, not 50 Hz's
    ("_UP", 0),
    ("_UP", -1),
    ("_DOWN", 1e12),
    ("_DOWN", 10),  # 100 Hz's
    ("_DOWN", 0),
    ("_START_US", 1e18),
    ("_START_US", -1),
    ("_START_US", 1e15),  # plausible (2001), but not this stream's
    ("_START_US", "+1000000"),
    ("_N_SEEN", 1e12),
    ("_N_SEEN", 1e15),
    ("_N_SEEN", -1),
    ("_N_SEEN", 0.5),
    ("_N_SEEN", "+1"),
    ("_NEXT_SEC_N", 1e12),
    ("_NEXT_SEC_N", -1),
    ("_NEXT_SEC_N", "+1"),
    ("_SECOND", 1e12),
    ("_SECOND", -1),
    ("_SECOND", "+1"),
    ("_PHASE", 1e12),
    ("_PHASE", -1),
    ("_PHASE", "+1"),
    ("_PRIMED", 0),
    ("_PRIMED", 2),
    ("_N3", 3),
    ("_N3", -1),
    ("_ACC3_X", 1e12),
    ("_ACC3_Z", -1),
    ("_FLUSHED", 1),  # flushed, with an open epoch the flush would have closed
    ("_FLUSHED", 2),
    ("_FLUSHED", -1),
    ("_S_N", 1e12),
    ("_S_N", -1),
    ("_S_SY", 1e15),
    ("_F5_N", 1e12),
    ("_HAVE_PREV5", 2),
    ("_PREV5", 1e12),
    ("_E_N", 1e12),  # the kernel writes each sample's |a| at _MAG_BUF + _E_N
    ("_E_N", 1e15),
    ("_E_N", -1),
    ("_E_N", 1501),  # one past the 30-s buffer at 50 Hz
    ("_E_N", 0.5),
    ("_E_CX", -1),
    ("_E_CZ", 1e12),
    ("_E_N10", 1e12),
    ("_E_NSEC", 1e12),
    ("_E_CHANGES", 200),
    ("_B_N", 1e12),
    ("_B_N", -1),
    ("_B_SUM", 1e15),
    ("_B_SQ", -1),
    ("_B_MIN", 1e12),
    ("_B_MAX", -1e12),
    ("ring.block", 1e12),
    ("ring.block", -1),  # a filed block dropped
    ("ring.empty", 0),  # an empty slot claiming a block
    ("ring.n", 1e12),
    ("ring.n", -1),
    ("ring.sum", 1e15),
    ("ring.max", 1e12),
    ("ring.flag", 2),
    ("_S_CX", -1),
    ("_S_CX", 1e12),
]
_HOSTILE_FLOATS = [
    ("_G_PER_COUNT", 1e12),
    ("_G_PER_COUNT", 0.5),  # no supported range and resolution gives it
    ("_G_PER_COUNT", np.nan),
    ("_LPF_GAIN", (np.pi / (np.pi + 2 * 6)) * 6),  # 25 Hz's low-pass gain (L = 6), not 50 Hz's (L = 3)
    ("_LPF_NEG_B", 1e12),
    ("_BPF_Z", np.nan),
    ("_E_ENMO", np.inf),
    ("_E_VM1S", -np.inf),
    ("_MAG_BUF", np.nan),
]
_FLOAT_FIELDS = {field for field, _ in _HOSTILE_FLOATS}
_RING_OFFSETS = {"block": 0, "empty": 0, "n": 1, "sum": 2, "max": 11, "flag": 14}
_VERSION_2_ONLY = {"_VERSION", "_S_CX", "_E_VM1S"}  # not in version 1's layout, or set by its upgrade


@functools.cache
def _mid_stream() -> ActivityState:
    """A state mid-second, mid-epoch and mid-10-Hz-group, 33 min into a stream at 50 Hz that started off
    the grids: two blocks filed in the non-wear ring, two slots empty. It loads, in either layout."""
    fs = 50
    xyz = _signal(11, fs * 2000 + 17, "walk")
    _, state = activity_epochs(*xyz.T, new_activity_state(fs, EPOCH_ALIGNED + 7_123_457))
    iv = state.ints
    assert iv[activity._PHASE] != 0 and iv[activity._N3] != 0 and iv[activity._E_N] > 0
    assert (iv[activity._RING :: activity._SLOT][: activity.WINDOW_BLOCKS] >= 0).sum() == 2
    ActivityState.from_arrays(state.to_arrays())
    ActivityState.from_arrays(_as_version_1(state.to_arrays()))
    return state


def _damaged(field: str, value: float | str, layout: int) -> dict:
    """The mid-stream state's arrays with `field` set to `value`, in version `layout`'s layout."""
    state = _mid_stream()
    arrays = state.to_arrays()
    name = "floats" if field in _FLOAT_FIELDS else "ints"
    if field.startswith("ring."):
        blocks = state.ints[activity._RING :: activity._SLOT][: activity.WINDOW_BLOCKS]
        k = int(np.flatnonzero(blocks == -1 if field == "ring.empty" else blocks >= 0)[0])
        index = activity._RING + k * activity._SLOT + _RING_OFFSETS[field.removeprefix("ring.")]
    else:
        index = getattr(activity, field)
    if isinstance(value, str):
        value = arrays[name][index] + int(value)
    elif name == "ints" and value != int(value):
        arrays["ints"] = arrays["ints"].astype(np.float64)  # a stored float where an integer belongs
    arrays[name][index] = value
    return arrays if layout == 2 else _as_version_1(arrays)


@pytest.mark.parametrize(
    ("field", "value", "layout"),
    [(f, v, 2) for f, v in _HOSTILE_INTS + _HOSTILE_FLOATS]
    + [(f, v, 1) for f, v in _HOSTILE_INTS + _HOSTILE_FLOATS if f not in _VERSION_2_ONLY],
    ids=str,
)
def test_a_damaged_or_hostile_stored_state_is_refused(field, value, layout):
    """The kernel trusts the state it is given: a stored one it could not have left is a ValueError when it
    loads, in either version's layout, never a crash, a hang or wrong rows. Before these checks each case
    but the version and rate ones loaded: a damaged start, position or epoch count crashed the process,
    _UP = 1e12 hung it, the others gave wrong rows or carried the damage on unseen."""
    with pytest.raises(ValueError, match=r"^(activity state is corrupt: |not an activity state)") as refused:
        ActivityState.from_arrays(_damaged(field, value, layout))
    # the reason only: no stored value in the message
    assert not re.search(r"\d", str(refused.value).removesuffix(f"version {activity.STATE_VERSION}"))


def test_a_stored_state_that_is_not_numbers_is_refused():
    """A version that is not a number, arrays of other kinds or sizes, integers that a cast would change."""
    good = _mid_stream().to_arrays()
    for damage in (
        {"version": np.inf},
        {"version": np.array([2, 2])},
        {"ints": good["ints"].astype(np.complex128)},
        {"ints": good["ints"].astype(str)},
        {"ints": [*good["ints"].tolist()[:-1], 2**70]},
        {"ints": np.where(np.arange(good["ints"].size) == activity._E_N, np.nan, good["ints"])},
        {"ints": np.where(np.arange(good["ints"].size) == activity._E_N, 1e30, good["ints"])},
        {"floats": good["floats"][:-1]},
        {"floats": good["floats"].astype(bool)},
    ):
        with pytest.raises(ValueError):
            ActivityState.from_arrays(dict(good, **damage))
    # integers stored as float64 (a hand-made state) load as the int64 the kernel was compiled for
    loaded = ActivityState.from_arrays(dict(good, ints=good["ints"].astype(np.float64)))
    assert loaded.ints.dtype == np.int64
