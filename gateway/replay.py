"""`bandgate replay`: recordings through the band encoder, the decoder and the feature path.

Replay runs exactly what the gateway runs after authentication and consent: bounded zstd decompression,
`decode_frames`, `features.process` with the device's state serialised between batches, and at the end
of the input `features.finish`, so every family emits what it has pending.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from bandgate.v1 import batch_pb2
from decoder.batch import BatchDecompressor
from decoder.features import DeviceState, finish, process
from decoder.frames import decode_frames, split_frames
from gateway import batchfile
from gateway.envelope import build_batch
from gateway.recording import as_band, read_csv

DEFAULT_START = "2026-01-01T00:00:00Z"
FRAME_SECONDS = 60
BATCH_FRAMES = 10


def parse_start(text: str) -> int:
    """ISO 8601 → UTC µs; a time without an offset is taken as UTC."""
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def parse_device(text: str) -> int:
    """A device ID as decimal or 0x-hex, within 64 bits."""
    value = int(text, 0)
    if not 0 <= value < 2**64:
        raise ValueError(f"device ID must fit 64 bits, got {text}")
    return value


def band_batches(
    path: str | Path,
    *,
    rate_hz: float,
    band_hz: int = 50,
    columns: tuple[str, ...] = ("x", "y", "z"),
    device_id: int = 1,
    start_us: int | None = None,
) -> Iterator[batch_pb2.Batch]:
    """A CSV recording as the batches a band at `band_hz` would have sent."""
    rec = read_csv(path, rate_hz, columns)
    accel, hr = as_band(rec, band_hz)
    frames = split_frames(
        accel,
        frame_samples=FRAME_SECONDS * band_hz,
        hr_bpm=hr,
        device_id=device_id,
        boot_id=1,
        first_seq=0,
        start_us=parse_start(DEFAULT_START) if start_us is None else start_us,
        sample_rate_hz=band_hz,
    )
    for i in range(0, len(frames), BATCH_FRAMES):
        yield build_batch(frames[i : i + BATCH_FRAMES])


def replay_batches(batches: Iterable[batch_pb2.Batch]) -> Iterator[dict]:
    """Feature records of batches from any number of devices, in arrival order, then the flushes."""
    decompressor = BatchDecompressor()
    states: dict[int, bytes] = {}
    for batch in batches:
        decoded = decode_frames(decompressor.decompress(batch.payload, dict_id=batch.dict_id))
        previous = states.get(batch.device_id)
        state = DeviceState.from_bytes(previous) if previous else DeviceState(batch.device_id)
        records, state = process(decoded, state)
        states[batch.device_id] = state.to_bytes()  # as the gateway stores it between batches
        yield from records
    for data in states.values():
        records, _ = finish(DeviceState.from_bytes(data))
        yield from records


def is_batch_file(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(batchfile.MAGIC)) == batchfile.MAGIC


def replay_file(path: str | Path, **csv_options) -> Iterator[dict]:
    """Records of a batch file (`bandgate simulate --out`) or of a CSV(.gz) recording."""
    if is_batch_file(path):
        return replay_batches(batchfile.read_batches(path))
    return replay_batches(band_batches(path, **csv_options))


def write_jsonl(records: Iterable[dict], out: io.TextIOBase) -> int:
    n = 0
    for r in records:
        out.write(json.dumps(r, separators=(",", ":")) + "\n")
        n += 1
    return n


def write_csv(records: Iterable[dict], out: io.TextIOBase) -> int:
    """One row a record: the fixed fields, then one column per value name seen (blank where absent)."""
    rows = list(records)
    names = sorted({k for r in rows for k in r["values"]})
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["family", "device", "start_us", "duration_s", "algo", *names])
    for r in rows:
        v = r["values"]
        w.writerow(
            [
                r["family"],
                r["device"],
                r["start_us"],
                r["duration_s"],
                r["algo"],
                *(v.get(k, "") for k in names),
            ]
        )
    return len(rows)


def replay_epochs(path: str | Path, *, device_id: int = 1, start_us: int | None = None) -> Iterator[dict]:
    """The sleep path alone on per-epoch input (columns epoch,time_s,hr_bpm,counts; others ignored): the
    sleep period detector and, inside each period, the stager, from counts and heart rate alone.

    `counts` follow the stager's one definition (sleep.COUNTS_DEFINITION): the activity records'
    `counts_vm_1s_sum`, and the `counts` of ../shared/data/sleep/epochs. Rows are 30-s epochs in order.

    Exactly one `sleep` record per row, in row order, with the row's `epoch` beside the stage (and the
    `period` it belongs to; wake and no period outside every period); then one `night` record per
    detected period. The record's time is the 30 s before the row's `time_s` (as in
    ../shared/data/sleep/epochs).
    """
    import numpy as np

    from decoder import sleep
    from decoder.features import device_key, feed_sleep

    columns = ("epoch", "time_s", "hr_bpm", "counts")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = {name.strip().lower(): name for name in reader.fieldnames or []}
        missing = [c for c in columns if c not in fields]
        if missing:
            raise ValueError(f"{path}: no column named {', '.join(missing)}")
        for line_no, row in enumerate(reader, start=2):
            try:
                rows.append([float(row[fields[c]]) for c in columns])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: line {line_no} has a missing or non-numeric value") from None
    if not rows:
        return iter(())
    data = np.asarray(rows)
    hr_bpm, counts = sleep.stager_inputs(data[:, 2], data[:, 3])
    origin = parse_start(DEFAULT_START) if start_us is None else start_us
    epoch_us = origin + np.rint((data[:, 1] - 30.0) * 1e6).astype(np.int64)
    records, _ = feed_sleep(device_key(device_id), None, epoch_us, counts, hr_bpm, finish=True)
    by_start = {r["start_us"]: r for r in records if r["family"] == "sleep"}
    out = []
    for e, t in zip(data[:, 0].tolist(), epoch_us.tolist(), strict=True):
        r = by_start[t]
        out.append(dict(r, values={"epoch": int(e), **r["values"]}))
    out += [r for r in records if r["family"] == "night"]
    return iter(out)
