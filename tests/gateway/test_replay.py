"""`bandgate replay`: CSV recordings and simulator files through the encoder, decoder and feature path."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from decoder.batch import BatchDecompressor
from decoder.features import DeviceState, finish, process
from gateway.batchfile import read_batches, truth_path
from gateway.cli import main
from gateway.envelope import open_batch

CADENCE_HZ = 1.8
WALK_S = 90


def _walk_csv(path: Path, *, fs: int = 100, gz: bool = False) -> Path:
    """120 s: 15 s still, 90 s of walking at 1.8 steps/s (162 steps), 15 s still. Columns in mixed case."""
    t = np.arange(0, 120, 1 / fs)
    walk = (t >= 15) & (t < 15 + WALK_S)
    rng = np.random.default_rng(0)
    x = np.where(walk, 0.4 * np.sin(np.pi * CADENCE_HZ * t), 0) + rng.normal(0, 0.005, t.size)
    y = np.where(walk, 0.1 * np.sin(2 * np.pi * CADENCE_HZ * t + 1), 0) + 0.1 + rng.normal(0, 0.005, t.size)
    z = 1 + np.where(walk, 0.3 * np.sin(2 * np.pi * CADENCE_HZ * t), 0) + rng.normal(0, 0.005, t.size)
    text = "time,X,Y,Z\n" + "\n".join(
        f"{a:.3f},{b:.5f},{c:.5f},{d:.5f}" for a, b, c, d in zip(t, x, y, z, strict=True)
    )
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text + "\n")
    return path


def _replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "replay", *args], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("band_hz", [50, 25])
def test_known_walk(tmp_path: Path, band_hz: int) -> None:
    csv_path = _walk_csv(tmp_path / "walk.csv.gz", gz=True)
    done = _replay(
        str(csv_path), "--rate-hz", "100", "--band-hz", str(band_hz), "--start", "2026-03-01T08:00:00"
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    steps = [r for r in records if r["family"] == "steps"]
    assert [r["start_us"] for r in steps] == [1772352000000000, 1772352060000000]  # 08:00 and 08:01 UTC
    total = sum(r["values"]["steps"] for r in steps)
    assert abs(total - CADENCE_HZ * WALK_S) / (CADENCE_HZ * WALK_S) < 0.1
    assert all(r["device"] == "0000000000000001" for r in records)


def test_still_recording_has_no_steps(tmp_path: Path) -> None:
    t = np.arange(0, 90, 1 / 40)
    path = tmp_path / "still.csv"
    path.write_text("x,y,z\n" + "\n".join("0.01,0.02,0.99" for _ in t) + "\n")
    done = _replay(str(path), "--rate-hz", "40")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert records and sum(r["values"]["steps"] for r in records if r["family"] == "steps") == 0


def test_csv_output(tmp_path: Path) -> None:
    done = _replay(
        str(_walk_csv(tmp_path / "w.csv")), "--rate-hz", "100", "--format", "csv", "--device", "0xab"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("family,device,start_us,duration_s,algo,")
    assert all(line.split(",")[1] == "00000000000000ab" for line in lines[1:])


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("a,b,c\n1,2,3\n", ["--rate-hz", "50"], "no column named x"),
        ("x,y,z\n1,2,oops\n", ["--rate-hz", "50"], "line 2"),
        ("x,y,z\n1,2,3\n", ["--rate-hz", "1000"], "within 15-500 Hz"),
        ("x,y,z\n1,2,3\n", [], "--rate-hz is required"),
        ("x,y,z\n1,2,3\n", ["--rate-hz", "50", "--device", "-4"], "64 bits"),
    ],
)
def test_bad_input_is_refused_clearly(tmp_path: Path, content: str, args: list[str], message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    done = _replay(str(path), *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_simulator_file(tmp_path: Path, capsys) -> None:
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
                "12",
                "--seed",
                "2",
                "--scenario",
                "day",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["replay", str(out)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # The same batches processed device by device, without serialising state: the same records.
    dec = BatchDecompressor()
    expected: list[dict] = []
    states: dict[int, DeviceState] = {}
    for batch in read_batches(out):
        state = states.get(batch.device_id, DeviceState(batch.device_id))
        got, states[batch.device_id] = process(open_batch(batch, dec).decoded, state)
        expected += got
    for state in states.values():
        expected += finish(state)[0]
    assert records == expected
    truth = np.load(truth_path(out))
    assert {r["device"] for r in records} == {f"{int(d):016x}" for d in truth["device_id"]}
    true_steps = sum(int(truth[f"steps_per_s_{i}"].sum()) for i in range(3))
    found = sum(r["values"]["steps"] for r in records if r["family"] == "steps")
    assert true_steps > 0 and abs(found - true_steps) / true_steps < 0.5


def _epochs_csv(path: Path, n: int = 800) -> Path:
    """A synthetic evening and night: 2 h sitting (moving a little, resting heart rate), 4 h still with a
    lower heart rate, then up and about for 40 min."""
    rng = np.random.default_rng(3)
    t = 30 * (np.arange(n) + 1)
    k = np.arange(n)
    moving = (k < 240) | (k >= n - 80)
    counts = np.where(moving, rng.integers(200, 2000, n), rng.integers(0, 3, n) * (rng.random(n) < 0.05))
    hr = np.where(moving, 75, 58) + rng.normal(0, 1.5, n)
    lines = ["epoch,time_s,hr_bpm,counts,stage"] + [f"{i},{t[i]},{hr[i]:.2f},{counts[i]},9" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_epochs_mode(tmp_path: Path) -> None:
    """`replay --epochs` runs the period detector from counts and heart rate alone: one sleep record per
    row (wake and no period outside the detected period), then the period's night record."""
    path = _epochs_csv(tmp_path / "night.csv")
    done = _replay("--epochs", str(path), "--device", "7")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    sleep_records = [r for r in records if r["family"] == "sleep"]
    assert len(sleep_records) == 800, "exactly one sleep record per input row"
    assert [r["values"]["epoch"] for r in sleep_records] == list(range(800))
    assert all(r["device"] == "0000000000000007" for r in records)
    stages = [r["values"]["stage"] for r in sleep_records]
    assert set(stages) <= {"wake", "light", "deep", "rem"}
    assert stages[:240] == ["wake"] * 240 and stages[-60:] == ["wake"] * 60, "outside the period: wake"
    assert all("period" not in r["values"] for r in sleep_records[:200])
    assert stages[300:700].count("wake") < 100, "the still, slow-heart middle is mostly asleep"
    nights = [r for r in records if r["family"] == "night"]
    assert len(nights) == 1 and nights[0]["values"]["kind"] == "main"
    period = nights[0]["values"]["period_start_us"]
    assert {r["values"].get("period") for r in sleep_records[300:700]} == {period}
    assert sleep_records[240]["start_us"] - 10 * 60_000_000 <= period <= sleep_records[240]["start_us"]


def test_epochs_mode_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("epoch,time_s,counts\n0,30,5\n")
    done = _replay("--epochs", str(path))
    assert done.returncode == 2 and "hr_bpm" in done.stderr
