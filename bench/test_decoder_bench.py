"""pytest-benchmark suite for the decoder: `pytest bench --benchmark-enable` (or --benchmark-only).

Each group pairs our path with its baseline on the same batches, so the ratio can be read off one table.
"""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from bench import corpus
from bench.numpy_decoder import decode_numpy
from decoder.batch import BatchDecompressor, compress_batch
from decoder.frames import decode_frames


@pytest.fixture(scope="module")
def batches() -> dict:
    name, accel = corpus.band_accel(bits=12)
    containers = corpus.containers(accel, frames_per_batch=10)
    return {
        "corpus": name,
        "samples": sum(a.shape[0] for a in accel),
        "containers": containers,
        "arrays": [np.frombuffer(c, np.uint8) for c in containers],
        "packed": [compress_batch(c) for c in containers],
        "raw_int16": [
            zstandard.ZstdCompressor(level=3).compress(np.ascontiguousarray(a[i : i + 30000]).tobytes())
            for a in accel
            for i in range(0, a.shape[0], 30000)
        ],
        "small": [
            np.frombuffer(c, np.uint8) for c in corpus.containers(accel, frames_per_batch=60, seconds=1)
        ],
    }


def _rate(benchmark, batches: dict) -> None:
    benchmark.extra_info["corpus"] = batches["corpus"]
    benchmark.extra_info["samples"] = batches["samples"]


@pytest.mark.benchmark(group="decode")
def test_decode_kernel(benchmark, batches) -> None:
    _rate(benchmark, batches)
    benchmark(lambda: [decode_frames(a) for a in batches["arrays"]])


@pytest.mark.benchmark(group="decode")
def test_decode_numpy_baseline(benchmark, batches) -> None:
    _rate(benchmark, batches)
    out = benchmark(lambda: [decode_numpy(c) for c in batches["containers"]])
    first = decode_frames(batches["arrays"][0])
    np.testing.assert_array_equal(out[0][0][:, 0], first.x[: first.accel_count[0]])


@pytest.mark.benchmark(group="ingest")
def test_ingest(benchmark, batches) -> None:
    _rate(benchmark, batches)
    dec = BatchDecompressor()
    benchmark(lambda: [decode_frames(dec.decompress(p)) for p in batches["packed"]])


@pytest.mark.benchmark(group="ingest")
def test_zstd_only(benchmark, batches) -> None:
    _rate(benchmark, batches)
    d = zstandard.ZstdDecompressor()
    benchmark(lambda: [d.decompress(p) for p in batches["packed"]])


@pytest.mark.benchmark(group="ingest")
def test_zstd_raw_int16(benchmark, batches) -> None:
    _rate(benchmark, batches)
    d = zstandard.ZstdDecompressor()
    benchmark(lambda: [d.decompress(p) for p in batches["raw_int16"]])


@pytest.mark.benchmark(group="small-frames")
def test_decode_one_second_frames(benchmark, batches) -> None:
    _rate(benchmark, batches)
    benchmark(lambda: [decode_frames(a) for a in batches["small"]])
