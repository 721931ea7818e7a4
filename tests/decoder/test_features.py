"""The one feature path: records do not depend on how samples were cut into frames and batches."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from decoder.features import (
    ALL_FAMILIES,
    FAMILIES,
    DeviceState,
    StateCache,
    device_key,
    finish,
    kernels_for,
    process,
)
from decoder.frames import Frame, decode_frames, encode_container, encode_frame
from gateway.simulator import simulate_band


@functools.cache
def _band(seed: int = 11, minutes: float = 9.0):
    return simulate_band(seed, minutes, scenario="day")


def _frames(rec, cuts: list[int]) -> list[Frame]:
    """Frames cut at the given sample indices (seconds-aligned so heart rate splits cleanly)."""
    bounds = [0, *sorted(set(cuts)), rec.accel.shape[0]]
    out = []
    fs = rec.sample_rate_hz
    for seq, (a, b) in enumerate(itertools.pairwise(bounds)):
        if b <= a:
            continue
        out.append(
            Frame(
                device_id=rec.device_id,
                boot_id=1,
                seq=seq,
                start_us=rec.start_us + a * 1_000_000 // fs,
                accel=rec.accel[a:b],
                hr_bpm=rec.hr_bpm[a // fs : b // fs],
                sample_rate_mhz=fs * 1000,
                utc_offset_min=rec.utc_offset_min,
            )
        )
    return out


def _run(frames: list[Frame], batch_cuts: list[int], device_id: int, *, serialise: bool) -> list[dict]:
    bounds = [0, *sorted(set(batch_cuts)), len(frames)]
    state = DeviceState(device_id)
    records: list[dict] = []
    for a, b in itertools.pairwise(bounds):
        if b <= a:
            continue
        decoded = decode_frames(encode_container(encode_frame(f) for f in frames[a:b]))
        out, state = process(decoded, DeviceState.from_bytes(state.to_bytes()) if serialise else state)
        records += out
    out, _ = finish(state)
    return records + out


def _one_shot(rec) -> list[dict]:
    return _run(_frames(rec, []), [], rec.device_id, serialise=False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_split_invariance(data: st.DataObject) -> None:
    rec = _band()
    fs = rec.sample_rate_hz
    seconds = rec.accel.shape[0] // fs
    cuts = data.draw(st.lists(st.integers(1, seconds - 1), max_size=12))
    frames = _frames(rec, [c * fs for c in cuts])
    batch_cuts = data.draw(st.lists(st.integers(1, max(1, len(frames) - 1)), max_size=6))
    got = _run(frames, batch_cuts, rec.device_id, serialise=data.draw(st.booleans()))
    assert _key_sorted(got) == _key_sorted(_one_shot(rec))


def _key_sorted(records: list[dict]) -> list[dict]:
    """Records in a canonical order: the order of emission depends on where batches end, nothing else."""
    return sorted(records, key=lambda r: (r["family"], r["start_us"]))


def test_records_follow_the_schema() -> None:
    rec = _band()
    records = _one_shot(rec)
    assert {"steps", "activity", "heart", "wear"} <= {r["family"] for r in records} <= set(FAMILIES)
    for r in records:
        assert set(r) == {"family", "device", "start_us", "duration_s", "algo", "values"}
        assert r["device"] == device_key(rec.device_id) and len(r["device"]) == 16
        local_us = r["start_us"] + (rec.utc_offset_min * 60_000_000 if r["family"] == "day" else 0)
        assert local_us % (r["duration_s"] * 1_000_000) == 0, "epochs on the UTC grid, days on local midnight"
        assert all(isinstance(v, (int, float, str)) for v in r["values"].values())
    assert all("steps" not in r["values"] for r in records if r["family"] != "steps")
    minutes = [r for r in records if r["family"] == "steps"]
    assert len(minutes) == len({r["start_us"] for r in minutes}), "one steps record a minute"
    truth = rec.steps_per_s.sum()
    total = sum(r["values"]["steps"] for r in minutes)
    assert truth > 100 and abs(total - truth) / truth < 0.5


def test_gap_flushes_and_restarts() -> None:
    """Frames with missing data between them: nothing is computed across the gap, later data still is."""
    rec = _band()
    frames = _frames(rec, [120 * rec.sample_rate_hz, 240 * rec.sample_rate_hz])
    with_gap = [frames[0], frames[2]]
    records = _run(with_gap, [], rec.device_id, serialise=True)
    steps_starts = sorted(r["start_us"] for r in records if r["family"] == "steps")
    gap_start = frames[1].start_us
    gap_end = frames[2].start_us
    assert not any(gap_start <= s < gap_end - 60_000_000 for s in steps_starts)
    assert any(s >= gap_end for s in steps_starts)


def test_bad_frames_are_skipped_like_gaps() -> None:
    rec = _band()
    frames = _frames(rec, [60 * rec.sample_rate_hz])
    encoded = [encode_frame(f) for f in frames]
    damaged = bytearray(encoded[0])
    damaged[100] ^= 0xFF
    decoded = decode_frames(encode_container([bytes(damaged), encoded[1]]))
    assert decoded.status.tolist()[0] != 0
    records, state = process(decoded, DeviceState(rec.device_id))
    flushed, _ = finish(state)
    epochs = [r for r in records + flushed if r["duration_s"] <= 60]  # day and wear blocks span longer
    assert epochs and all(r["start_us"] >= frames[1].start_us for r in epochs)


def test_state_is_not_modified_and_round_trips() -> None:
    rec = _band()
    frames = _frames(rec, [180 * rec.sample_rate_hz])
    decoded = decode_frames(encode_container([encode_frame(frames[0])]))
    _, state = process(decoded, DeviceState(rec.device_id))
    before = state.to_bytes()
    decoded2 = decode_frames(encode_container([encode_frame(frames[1])]))
    first, _ = process(decoded2, state)
    assert state.to_bytes() == before
    again, _ = process(decoded2, DeviceState.from_bytes(before))
    assert first == again
    future = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(before))
    future["v"] = 99
    with pytest.raises(ValueError, match="version"):
        DeviceState.from_bytes(zstandard.ZstdCompressor().compress(msgpack.packb(future)))
    restored = DeviceState.from_bytes(before).families
    assert restored.keys() == state.families.keys()
    for family, arrays in state.families.items():
        for name, value in arrays.items():
            nan_ok = (
                isinstance(value, np.ndarray) and value.dtype.kind == "f"
            )  # the stager's "not yet" is NaN
            assert np.array_equal(restored[family][name], value, equal_nan=nan_ok), (family, name)


def test_a_stored_version_1_sleep_state_is_upgraded_on_load() -> None:
    """A device state stored by the previous release (its stager's rings held 64 epochs) loads, its open
    sleep period's stager upgraded to this layout; a sleep state of neither layout, or with counters the
    kernels could not have left, is refused as a state that does not load (ValueError)."""
    from decoder import sleep
    from decoder.features import new_sleep_family
    from tests.decoder.test_sleep import _as_version_1

    stager = sleep.SleepState.new()
    rng = np.random.default_rng(5)
    sleep.stage_epochs(30.0 * np.arange(90), 60 + rng.normal(0, 2, 90), rng.exponential(5, 90), stager)
    v1 = _as_version_1(stager)
    state = DeviceState(7, families={"sleep": dict(new_sleep_family(), values=v1, period_us=0)})
    loaded = DeviceState.from_bytes(state.to_bytes()).families["sleep"]["values"]
    assert loaded.size == sleep.STATE_LEN
    np.testing.assert_array_equal(loaded, sleep.SleepState.upgraded(v1).array)
    damaged_v1, damaged_v2, damaged_periods = v1.copy(), stager.array.copy(), new_sleep_family()["periods"]
    damaged_v1[1] = 1e6  # a million epochs in, none awaiting features: the kernel would overrun
    damaged_v2[3] = -1e7  # a negative count of decided epochs: the kernel would loop for ever
    damaged_periods[0] = np.inf  # a version int() would not take
    for family in (
        dict(new_sleep_family(), values=v1[:-1]),
        dict(new_sleep_family(), values=damaged_v1),
        dict(new_sleep_family(), values=damaged_v2),
        dict(new_sleep_family(), periods=damaged_periods),
    ):
        with pytest.raises(ValueError):
            DeviceState.from_bytes(DeviceState(7, families={"sleep": family}).to_bytes())


def test_a_heart_state_stored_as_another_dtype_loads_as_the_kernel_takes_it() -> None:
    """The heart family's integers stored as float64 (a damaged or hand-made state) load as the checked
    int64 copy: the kernel is given what was checked, not a dtype it was never compiled for."""
    rec = _band()
    decoded = decode_frames(encode_container([encode_frame(f) for f in _frames(rec, [])]))
    _, state = process(decoded, DeviceState(rec.device_id))
    floats = dict(state.families["heart"], ints=state.families["heart"]["ints"].astype(np.float64))
    stored = dataclasses.replace(state, families=dict(state.families, heart=floats))
    loaded = DeviceState.from_bytes(stored.to_bytes())
    assert loaded.families["heart"]["ints"].dtype == np.int64
    assert finish(loaded)[0] == finish(DeviceState.from_bytes(state.to_bytes()))[0]


@pytest.mark.parametrize(
    ("family", "array", "slot", "value"),
    [  # one damage per family that crashed or hung its kernel before it was checked where it loads
        ("activity", "ints", "_N_SEEN", 10**12),
        ("heart", "ints", "_DAY", -(10**15)),
        ("steps", "values", "_HIST_POS", 1e12),
        ("sleep", "periods", "_H_BLK_LAST", -1e15),
        ("sleep", "values", "_H_N_IN", 1e6),
    ],
)
def test_a_family_state_its_kernel_could_not_have_left_is_refused_on_load(family, array, slot, value) -> None:
    """`DeviceState.from_bytes` is where a stored state comes in, and the feature path runs the kernels on
    what it returns without more checks: each family's check must be wired in there."""
    from decoder import activity, heart, periods, sleep, steps
    from decoder.features import new_sleep_family

    module = {"activity": activity, "heart": heart, "steps": steps, "sleep": sleep}[family]
    module = periods if array == "periods" else module
    rec = _band()
    _, state = process(
        decode_frames(encode_container([encode_frame(f) for f in _frames(rec, [])])), DeviceState(7)
    )
    families = dict(state.families, sleep=dict(new_sleep_family(), period_us=0))
    good = dataclasses.replace(state, families=families)
    assert DeviceState.from_bytes(good.to_bytes()).families.keys() == families.keys()
    damaged = {k: dict(v) for k, v in families.items()}
    damaged[family][array] = damaged[family][array].copy()
    damaged[family][array][getattr(module, slot)] = value
    with pytest.raises(ValueError):
        DeviceState.from_bytes(dataclasses.replace(state, families=damaged).to_bytes())


def test_a_stored_version_that_is_not_a_number_is_refused() -> None:
    """A family's version stored as a float infinity (msgpack carries one): a ValueError, not the
    OverflowError int() raised (which the gateway would have answered as a compute bug)."""
    rec = _band()
    _, state = process(
        decode_frames(encode_container([encode_frame(f) for f in _frames(rec, [])])), DeviceState(7)
    )
    packed = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(state.to_bytes()))
    packed["families"]["activity"]["version"] = float("inf")
    with pytest.raises(ValueError, match="not a device state"):
        DeviceState.from_bytes(zstandard.ZstdCompressor().compress(msgpack.packb(packed)))


def test_a_frame_without_samples_of_rate_0_opens_no_stream() -> None:
    """The wire format checks the rate only of frames with samples, so one without may say 0 Hz. It
    opened a step stream at 0 Hz (new_state raised): the batch was refused, and so was every resend.
    A frame without samples now opens nothing (the accelerometer is the feature path's clock)."""
    frame = Frame(7, 1, 0, 1_767_600_000_000_000, accel=np.zeros((0, 3), np.int16), sample_rate_mhz=0)
    frame = dataclasses.replace(frame, hr_bpm=np.full(90, 60, np.uint8))
    decoded = decode_frames(encode_container([encode_frame(frame)]))
    assert decoded.status.tolist() == [0]
    records, state = process(decoded, DeviceState(7))
    assert records == [] and state.families == {} and state.next_us == -1
    assert finish(DeviceState.from_bytes(state.to_bytes()))[0] == []


@pytest.mark.parametrize("one_batch", [False, True], ids=["a_batch_a_frame", "one_batch"])
@pytest.mark.parametrize("offset_us", [123, 30_000_000, -3_000_000_000, 7 * 86_400_000_000])
def test_a_frame_without_accelerometer_samples_leaves_the_stream_as_it_was(offset_us, one_batch) -> None:
    """A frame with heart rate but no accelerometer samples, between two frames of a stream: at another
    time it ended the open stream (epochs, minute and sleep period closed early, a `day` record before
    its day ended) and opened one at its own time, which the next frame ended again; within half a
    sample period of the stream's time it moved the heart kernel's clock (an epoch lost a reading).
    Every record is now the same as without it."""
    rng = np.random.default_rng(5)
    start = 1_767_600_000_000_000
    frames = []
    for k in range(16):
        accel = np.tile(np.array([[0, 0, 256]], np.int16), (3000, 1))
        accel[:, 0] += rng.integers(-40, 40, 3000).astype(np.int16)
        hr = np.full(60, 60 + k % 5, np.uint8)
        frames.append(Frame(7, 1, k, start + k * 60_000_000, accel=accel, hr_bpm=hr))
    stray = Frame(7, 1, 99, start + 8 * 60_000_000 + offset_us, hr_bpm=np.full(60, 90, np.uint8))

    def records(frames: list[Frame]) -> list[dict]:
        out, state = [], DeviceState(7)
        for batch in [frames] if one_batch else [[f] for f in frames]:
            r, state = process(decode_frames(encode_container([encode_frame(f) for f in batch])), state)
            out += r
            state = DeviceState.from_bytes(state.to_bytes())
        return out + finish(state)[0]

    plain = records(frames)
    assert {"activity", "heart", "sleep", "steps", "day"} <= {r["family"] for r in plain}
    assert records([*frames[:8], stray, *frames[8:]]) == plain


@pytest.mark.parametrize("rate_mhz", [1_000, 75_000])
def test_heart_rates_do_not_pile_up_where_the_activity_kernel_does_not_run(rate_mhz) -> None:
    """Sleep joins heart rates to activity epochs; at a rate the activity kernel does not take, the heart
    rates waiting for them were never taken out: 2,880 more a day in the stored state, until (after about
    three months) it passed the state size limit and no longer loaded."""
    start, hours = 1_767_600_000_000_000, 6
    n = 3600 * rate_mhz // 1000
    frames = [
        Frame(
            7,
            1,
            h,
            start + h * 3_600_000_000,
            accel=np.tile(np.array([[0, 0, 256]], np.int16), (n, 1)),
            hr_bpm=np.full(3600, 60, np.uint8),
            sample_rate_mhz=rate_mhz,
        )
        for h in range(hours)
    ]
    state = DeviceState(7)
    heart_epochs = 0
    for f in frames:
        records, state = process(decode_frames(encode_container([encode_frame(f)])), state)
        state = DeviceState.from_bytes(state.to_bytes())
        heart_epochs += sum(r["family"] == "heart" for r in records)
    assert "activity" not in state.families and heart_epochs > 600  # the case: heart, no activity
    assert state.families["hr_buffer"]["epoch_us"].size == 0


def test_hostile_state_bytes_are_refused() -> None:
    """A state comes from the store: damaged or hostile bytes are a ValueError, never a crash or a
    large allocation (the declared size is checked before decompressing)."""
    rec = _band()
    frames = _frames(rec, [])
    _, state = process(decode_frames(encode_container([encode_frame(frames[0])])), DeviceState(rec.device_id))
    good = state.to_bytes()
    packed = zstandard.ZstdDecompressor().decompress(good)
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # 64 MB of zeros in a few KB
    wrong_family = msgpack.unpackb(packed)
    wrong_family["families"]["steps"]["values"][1] = wrong_family["families"]["steps"]["values"][1][:-8]
    for data in (
        b"",
        b"\x00" * 10,
        good[:-3],
        good[:4] + bytes(len(good) - 4),
        packed,  # not compressed
        bomb,
        zstandard.ZstdCompressor().compress(b"\x93\x01\x02"),  # msgpack, not a map
        zstandard.ZstdCompressor().compress(msgpack.packb(wrong_family)),  # a truncated family array
    ):
        with pytest.raises(ValueError):
            DeviceState.from_bytes(data)


def test_sleep_period_is_detected_staged_and_split_invariant() -> None:
    """A simulated afternoon and a sleep period through the whole path: a sleep record for every epoch
    (wake outside the period), one `night` record naming the period, however the stream is cut."""
    rec, frames = _day_and_night()
    one = _run(frames, [], rec.device_id, serialise=False)
    rng = np.random.default_rng(0)
    cut = _run(
        frames,
        sorted(rng.choice(np.arange(1, len(frames)), 7, replace=False).tolist()),
        rec.device_id,
        serialise=True,
    )
    assert _key_sorted(one) == _key_sorted(cut)
    sleep_records = [r for r in one if r["family"] == "sleep"]
    activity_epochs = {r["start_us"] for r in one if r["family"] == "activity"}
    assert {r["start_us"] for r in sleep_records} >= activity_epochs - {max(activity_epochs)}
    for r in sleep_records:  # staged epochs: calibrated stage probabilities, 3 decimals, summing to 1
        if "period" not in r["values"]:
            assert not any(f in r["values"] for f in ("p_wake", "p_light", "p_deep", "p_rem"))
            continue
        p = [r["values"][f] for f in ("p_wake", "p_light", "p_deep", "p_rem")]
        assert all(0 <= v <= 1 and round(v * 1000) == v * 1000 for v in p) and round(sum(p) * 1000) == 1000
    nights = [r for r in one if r["family"] == "night"]
    assert len(nights) == 1
    night = nights[0]["values"]
    bed_us = rec.start_us + SLEEP_FROM_MIN * 60_000_000
    rise_us = rec.start_us + SLEEP_TO_MIN * 60_000_000
    # the period holds the simulated sleep, begins no earlier than an hour before bed (sitting still with
    # a low heart rate before bed is in it) and ends within 30 min of getting up
    asleep_us = rec.start_us + np.flatnonzero(rec.stage_per_epoch > 0) * 30_000_000
    held = (asleep_us >= night["period_start_us"]) & (asleep_us < night["period_end_us"])
    assert held.mean() >= 0.95
    assert bed_us - 60 * 60_000_000 <= night["period_start_us"]
    assert abs(night["period_end_us"] - rise_us) <= 30 * 60_000_000
    assert nights[0]["start_us"] == night["period_start_us"] and night["kind"] == "main"
    assert 0 < night["total_sleep_min"] <= (SLEEP_TO_MIN - SLEEP_FROM_MIN) and night["sol_min"] >= 0
    inside = [r for r in sleep_records if "period" in r["values"]]
    assert {r["values"]["period"] for r in inside} == {night["period_start_us"]}
    assert all(night["period_start_us"] <= r["start_us"] < night["period_end_us"] for r in inside)
    assert {r["values"]["stage"] for r in inside} - {"wake"}
    outside = [r for r in sleep_records if "period" not in r["values"]]
    assert outside and {r["values"]["stage"] for r in outside} == {"wake"}


def test_state_cache_returns_its_object_only_for_the_exact_bytes_it_kept() -> None:
    """A worker's cache stands in for `from_bytes` only when the stored bytes are the kept ones; other
    bytes (a commit that failed, another worker's state) are loaded, and the oldest device goes first."""
    rec = _band()
    frames = _frames(rec, [120 * rec.sample_rate_hz, 240 * rec.sample_rate_hz])
    decoded = [decode_frames(encode_container([encode_frame(f)])) for f in frames]
    _, s1 = process(decoded[0], DeviceState(rec.device_id))
    _, s2 = process(decoded[1], s1)
    b1, b2 = s1.to_bytes(), s2.to_bytes()
    cache = StateCache(capacity=2)
    cache.keep(rec.device_id, b2, s2)
    assert cache.load(rec.device_id, bytes(b2)) is s2  # equal bytes, another object: a hit
    older = cache.load(rec.device_id, b1)  # the store holds another state: loaded from its bytes
    assert older is not s1 and older.to_bytes() == b1
    with pytest.raises(ValueError):
        cache.load(rec.device_id, b2[:-1])
    # the records from a kept state equal those from its bytes
    assert (
        process(decoded[2], cache.load(rec.device_id, b2))[0]
        == process(decoded[2], DeviceState.from_bytes(b2))[0]
    )
    cache.keep(2, b1, s1)
    cache.keep(3, b1, s1)  # capacity 2: the device kept first is dropped
    assert cache.load(rec.device_id, b2) is not s2
    assert cache.load(3, b1) is s1


# --- consent: only the consented families are computed, kept and returned ---------------------------------


SLEEP_FROM_MIN, SLEEP_TO_MIN = 270, 460  # in bed 20:30-23:40 local, after an afternoon awake


@functools.cache
def _day_and_night():
    """From 16:00 local: an afternoon (the detector needs a few hours of the wearer's heart rate), 3 h 10 min
    in bed, 20 min up; 25 Hz to keep it cheap. Every family has records."""
    rec = simulate_band(
        5,
        SLEEP_TO_MIN + 20,
        scenario="schedule",
        schedule=(("day", 0, SLEEP_FROM_MIN), ("sleep", SLEEP_FROM_MIN, SLEEP_TO_MIN)),
        sample_rate_hz=25,
        start_us=1_767_625_200_000_000,
    )
    return rec, _frames(rec, [s * 60 * rec.sample_rate_hz for s in range(1, SLEEP_TO_MIN + 20)])


def _run_consent(frames: list[Frame], device_id: int, consent: list[frozenset[str]]) -> tuple[list, list]:
    """One batch per entry of `consent`, processed under that consent; the records and each state."""
    cuts = np.linspace(0, len(frames), len(consent) + 1).astype(int)
    state = DeviceState(device_id)
    records: list[dict] = []
    states = []
    for (a, b), families in zip(itertools.pairwise(cuts), consent, strict=True):
        decoded = decode_frames(encode_container(encode_frame(f) for f in frames[a:b]))
        out, state = process(decoded, DeviceState.from_bytes(state.to_bytes()), families)
        assert {r["family"] for r in out} <= families, "a record of a family without consent"
        records += out
        states.append(state)
    return records, states


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.sampled_from(FAMILIES), min_size=1))
@example({"heart"})  # heart without activity: its inactive epochs are unknown, its records the same
@example({"night"})
@example({"wear"})
def test_consented_families_are_exactly_the_unconsented_runs_records_of_those_families(families) -> None:
    rec, frames = _day_and_night()
    everything, _ = _run_consent(frames, rec.device_id, [ALL_FAMILIES] * 4)
    assert {r["family"] for r in everything} >= {"activity", "heart", "sleep", "steps", "wear"}
    consented = frozenset(families)
    got, states = _run_consent(frames, rec.device_id, [consented] * 4)
    want = [r for r in everything if r["family"] in consented]
    assert _key_sorted(got) == _key_sorted(want)
    for state in states:  # nothing kept for a kernel no consented family needs
        kept = set(state.families) - {"hr_buffer"}
        assert kept <= kernels_for(consented), (consented, kept)
        assert ("hr_buffer" in state.families) <= ("sleep" in kernels_for(consented))


def test_withdrawal_mid_stream_drops_the_family_and_its_arrays_and_the_rest_go_on() -> None:
    rec, frames = _day_and_night()
    everything, _ = _run_consent(frames, rec.device_id, [ALL_FAMILIES] * 6)
    no_heart = ALL_FAMILIES - {"heart", "day"}  # sleep goes on: it needs heart rate, computed and dropped
    no_activity = frozenset({"steps"})
    records, states = _run_consent(
        frames, rec.device_id, [ALL_FAMILIES, ALL_FAMILIES, no_heart, no_heart, no_activity, no_activity]
    )
    # what each batch may return is asserted in _run_consent; the families still consented are unharmed
    assert _key_sorted([r for r in records if r["family"] == "steps"]) == _key_sorted(
        [r for r in everything if r["family"] == "steps"]
    )
    assert [r for r in records if r["family"] == "sleep"], "sleep goes on while heart is withdrawn"
    assert "heart" in states[2].families  # an input sleep still needs
    assert set(states[4].families) == {"steps"}  # activity, heart, the night and its buffer are gone
    assert set(states[5].families) == {"steps"}


def test_a_family_consented_again_starts_afresh_at_the_next_batch() -> None:
    rec, frames = _day_and_night()
    steps_only = frozenset({"steps"})
    records, states = _run_consent(frames, rec.device_id, [ALL_FAMILIES, steps_only, ALL_FAMILIES])
    cut = frames[len(frames) * 2 // 3].start_us
    activity = [r for r in records if r["family"] == "activity"]
    assert activity and "activity" in states[2].families
    later = [r["start_us"] for r in activity if r["start_us"] >= frames[len(frames) // 3].start_us]
    assert later and min(later) >= cut - 60_000_000  # nothing for the withdrawn stretch


def test_distance_is_steps_times_stride_and_names_the_profile_version() -> None:
    rec = _band()
    frames = _frames(rec, [])
    decoded = decode_frames(encode_container(encode_frame(f) for f in frames))
    plain, _ = process(decoded, DeviceState(rec.device_id))
    assert not [r for r in plain if r["family"] == "distance"], "no stride, no distance"
    both, _ = process(decoded, DeviceState(rec.device_id), stride_m=0.72, profile_version=3)
    steps_ = {r["start_us"]: r for r in both if r["family"] == "steps"}
    distance = [r for r in both if r["family"] == "distance"]
    assert steps_ and sorted(r["start_us"] for r in distance) == sorted(steps_)
    for r in distance:
        assert r["values"]["profile_version"] == 3 and r["values"]["stride_m"] == 0.72
        walked = steps_[r["start_us"]]["values"]["steps"]
        assert r["values"]["distance_m"] == pytest.approx(walked * 0.72, abs=0.01)
        assert r["duration_s"] == 60 and r["algo"] == "distance/1"
    only, state = process(decoded, DeviceState(rec.device_id), frozenset({"distance"}), stride_m=0.72)
    assert {r["family"] for r in only} == {"distance"} and set(state.families) == {"steps"}


# --- the sleep stager's input: one count definition (decoder/sleep.py COUNTS_DEFINITION) -----------------


def _staged_inputs(monkeypatch, frames: list[Frame], device_id: int) -> tuple[list[dict], dict[str, list]]:
    """The records of `frames` through the whole path, and every (time, hr_bpm, counts) the sleep path got
    (the period detector, which hands the same values on to the stager inside a period)."""
    from decoder import periods

    fed: dict[str, list] = {"time": [], "hr_bpm": [], "counts": []}
    detect = periods.detect

    def spy(time, hr_bpm, counts, *args, **kwargs):
        for name, v in (("time", time), ("hr_bpm", hr_bpm), ("counts", counts)):
            fed[name] += np.asarray(v, dtype=np.float64).tolist()
        return detect(time, hr_bpm, counts, *args, **kwargs)

    monkeypatch.setattr(periods, "detect", spy)
    return _run(frames, [], device_id, serialise=False), fed


def test_stager_gets_agcounts_per_second_vm_of_a_real_recording(monkeypatch) -> None:
    """OxWalk P30 (real wrist data, 30 min) sent as a 50 Hz 12-bit band: the counts the sleep path receives
    are agcounts' per-second vector magnitudes summed over each epoch — exactly (to the record's 0.1) on
    the samples the band measured, and within what the 12-bit quantisation moves on the signal itself."""
    from agcounts.extract import get_counts

    from bench.accuracy_steps import BAND_G_PER_COUNT, have_data, load_recordings, to_band

    if not have_data():
        pytest.skip("shared data absent (set BANDGATE_DATA): no real recording to check against")
    rec = load_recordings()["oxwalk_p30"]
    fs = 50
    band = to_band(rec, fs)
    n = band.shape[0]
    exact = rec.time_s[0] + np.arange(n) / fs
    signal_g = np.stack([np.interp(exact, rec.time_s, rec.xyz_g[:, k]) for k in range(3)], axis=1)
    start_us = 1_767_650_400_000_000  # 22:00 UTC, on the 30-s grid
    frames = [
        Frame(
            device_id=7,
            boot_id=1,
            seq=k,
            start_us=start_us + a * 1_000_000 // fs,
            accel=band[a : a + 60 * fs],
            hr_bpm=np.zeros(min(60, (n - a) // fs), np.uint8),
            sample_rate_mhz=fs * 1000,
            utc_offset_min=0,
        )
        for k, a in enumerate(range(0, n, 60 * fs))
    ]
    records, fed = _staged_inputs(monkeypatch, frames, 7)

    def vm_1s_sums(per_second: np.ndarray) -> np.ndarray:
        vm = np.sqrt((per_second.astype(np.float64) ** 2).sum(axis=1))
        k = vm.size // 30
        return vm[: 30 * k].reshape(k, 30).sum(axis=1)

    on_samples = vm_1s_sums(get_counts(band * BAND_G_PER_COUNT, fs, 1))  # agcounts on what the band sent
    on_signal = vm_1s_sums(get_counts(signal_g, fs, 1))  # agcounts on the unquantised signal
    got = np.asarray(fed["counts"])  # the epoch closed by the stream's flush is not fed
    assert got.size >= on_samples.size - 1 >= 58 and np.count_nonzero(got) > 50
    on_samples, on_signal = on_samples[: got.size], on_signal[: got.size]
    np.testing.assert_allclose(got, on_samples, rtol=0, atol=0.05 + 1e-6)
    # what the records publish is what the stager got
    published = [r["values"]["counts_vm_1s_sum"] for r in records if r["family"] == "activity"]
    assert published[: got.size] == got.tolist()
    # quantisation (±2 mg) moves a 10-Hz count value by at most one step where it crosses one: allow one
    # count per second per epoch, and 0.5 % over the recording
    assert np.all(np.abs(got - on_signal) <= 30.0)
    assert abs(got.sum() - on_signal.sum()) <= 0.005 * on_signal.sum()


def test_replaying_the_records_per_epoch_gives_the_streamed_stages(monkeypatch, tmp_path) -> None:
    """A night streamed through the raw path, then its own activity and heart records replayed per epoch
    (`bandgate replay --epochs`): the same stage for every epoch."""
    from gateway.replay import DEFAULT_START, parse_start, replay_epochs

    rec, frames = _day_and_night()
    records, fed = _staged_inputs(monkeypatch, frames, rec.device_id)
    stages = {r["start_us"]: r["values"]["stage"] for r in records if r["family"] == "sleep"}
    assert len(stages) == len(fed["counts"]) > 300
    counts = {r["start_us"]: r["values"]["counts_vm_1s_sum"] for r in records if r["family"] == "activity"}
    hr = {r["start_us"]: r["values"].get("hr_mean_bpm") for r in records if r["family"] == "heart"}
    first = min(stages)
    lines = ["epoch,time_s,hr_bpm,counts"]
    for k, t in enumerate(sorted(stages)):
        h = hr.get(t)
        lines.append(f"{k},{(t - first) / 1e6 + 30.0},{'nan' if h is None else h},{counts[t]}")
    path = tmp_path / "night.csv"
    path.write_text("\n".join(lines) + "\n")
    out = list(replay_epochs(path))
    replayed = [r["values"]["stage"] for r in out if r["family"] == "sleep"]
    assert replayed == [stages[t] for t in sorted(stages)]
    streamed_nights = [r["values"] for r in records if r["family"] == "night"]
    replayed_nights = [r["values"] for r in out if r["family"] == "night"]
    shift = first - parse_start(DEFAULT_START)  # replay puts the first epoch at its default start
    for night in replayed_nights:
        night["period_start_us"] += shift
        night["period_end_us"] += shift
    assert replayed_nights == streamed_nights and len(streamed_nights) == 1
    assert {"light", "deep"} <= set(replayed)
