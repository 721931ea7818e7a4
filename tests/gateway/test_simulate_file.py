"""`bandgate simulate --out`, batch files, envelopes and `bandgate dict train`, through the real CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bandgate.v1 import batch_pb2
from decoder.batch import BatchDecompressor, BatchError, BatchErrorCode, load_dictionary
from decoder.frames import Frame
from gateway.batchfile import BatchFileError, read_batches, truth_path
from gateway.cli import main
from gateway.envelope import build_batch, open_batch
from gateway.simulator import simulate_band
from gateway.simulator.recorder import band_device_id, band_seed
from tests.decoder.strategies import START_2026


def _decode_file(path) -> dict[int, np.ndarray]:
    """Every band's accelerometer samples, in sequence order, from a batch file."""
    dec = BatchDecompressor()
    per_device: dict[int, list[np.ndarray]] = {}
    last_seq: dict[int, int] = {}
    for batch in read_batches(path):
        opened = open_batch(batch, dec)
        assert opened.frame_errors == []
        assert batch.first_seq == last_seq.get(batch.device_id, -1) + 1
        last_seq[batch.device_id] = batch.last_seq
        d = opened.decoded
        per_device.setdefault(batch.device_id, []).append(np.stack([d.x, d.y, d.z], axis=1))
    return {k: np.concatenate(v) for k, v in per_device.items()}


def test_simulate_writes_what_the_bands_recorded(tmp_path) -> None:
    out = tmp_path / "fleet.bgb"
    assert (
        main(
            [
                "simulate",
                "--out",
                str(out),
                "--bands",
                "3",
                "--minutes",
                "25",
                "--seed",
                "4",
                "--batch-minutes",
                "10",
            ]
        )
        == 0
    )
    decoded = _decode_file(out)
    truth = np.load(truth_path(out))
    assert len(decoded) == 3 and truth["device_id"].size == 3
    for band in range(3):
        rec = simulate_band(band_seed(4, band), 25, device_id=band_device_id(4, band), scenario="mixed")
        np.testing.assert_array_equal(decoded[rec.device_id], rec.accel)
        np.testing.assert_array_equal(truth[f"steps_per_s_{band}"], rec.steps_per_s)
    # Same seed, same bytes; another seed, other bytes.
    again = tmp_path / "again.bgb"
    other = tmp_path / "other.bgb"
    main(["simulate", "--out", str(again), "--bands", "3", "--minutes", "25", "--seed", "4"])
    main(["simulate", "--out", str(other), "--bands", "3", "--minutes", "25", "--seed", "5"])
    assert again.read_bytes() == out.read_bytes() != other.read_bytes()


def test_console_script_runs(tmp_path) -> None:
    out = tmp_path / "one.bgb"
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "simulate", "--out", str(out), "--minutes", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 1 batches of 1 bands" in done.stdout and out.stat().st_size > 0


def test_dict_train_cli(tmp_path) -> None:
    out = tmp_path / "fleet.bgb"
    main(["simulate", "--out", str(out), "--bands", "12", "--minutes", "3", "--batch-minutes", "1"])
    dict_file = tmp_path / "fleet.zdict"
    assert main(["dict", "train", str(out), "--out", str(dict_file), "--size", "2048"]) == 0
    dictionary = load_dictionary(dict_file.read_bytes())
    rec = simulate_band(99, 1)
    from gateway.simulator.recorder import recording_batches

    plain = next(recording_batches(rec))
    frames = [
        Frame(
            device_id=rec.device_id,
            boot_id=1,
            seq=0,
            start_us=rec.start_us,
            accel=rec.accel,
            hr_bpm=rec.hr_bpm,
        )
    ]
    with_dict = build_batch(frames, dictionary=dictionary)
    assert with_dict.dict_id == dictionary.dict_id() != 0
    dec = BatchDecompressor(dictionaries={dictionary.dict_id(): dictionary})
    assert open_batch(with_dict, dec).decoded.n_samples == open_batch(plain, dec).decoded.n_samples
    assert main(["dict", "train", str(tmp_path / "missing.bgb"), "--out", str(dict_file)]) == 2


def test_bad_batch_file(tmp_path) -> None:
    bad = tmp_path / "bad.bgb"
    bad.write_bytes(b"not a batch file")
    with pytest.raises(BatchFileError, match="bad magic"):
        list(read_batches(bad))
    good = tmp_path / "good.bgb"
    main(["simulate", "--out", str(good), "--minutes", "2"])
    cut = tmp_path / "cut.bgb"
    cut.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(BatchFileError, match="truncated"):
        list(read_batches(cut))


def _frames(device_id: int = 7, n: int = 3) -> list[Frame]:
    accel = np.zeros((100, 3), np.int16)
    return [
        Frame(device_id=device_id, boot_id=2, seq=10 + i, start_us=START_2026, accel=accel) for i in range(n)
    ]


def test_envelope_must_agree_with_frames() -> None:
    dec = BatchDecompressor()
    batch = build_batch(_frames())
    assert open_batch(batch, dec).frame_errors == []
    lying = batch_pb2.Batch()
    lying.CopyFrom(batch)
    lying.device_id = 8  # claims another device than its frames carry
    errors = open_batch(lying, dec).frame_errors
    assert [i for i, _ in errors] == [0, 1, 2] and "contradicts the envelope" in errors[0][1]
    lying.CopyFrom(batch)
    lying.last_seq = 13
    with pytest.raises(BatchError) as e:
        open_batch(lying, dec)
    assert e.value.code is BatchErrorCode.BAD_ENVELOPE
    lying.last_seq, lying.first_seq, lying.frame_count = 13, 11, 3
    errors = open_batch(lying, dec).frame_errors
    assert [i for i, _ in errors] == [0, 1, 2]
    with pytest.raises(ValueError, match="consecutive"):
        build_batch(_frames()[:1] + _frames()[2:])
