"""Compile (or load from the cache) every Numba kernel the gateway runs, before it serves.

`bandgate warm` runs this at image build time with NUMBA_CACHE_DIR set, so a container's first batch
does not pay ~45 s of JIT compilation. Half an hour of a simulated band goes through `compute.compute`
(the server's own path: decompress, decode, features, the sleep-period detector on every epoch); then,
since no sleep period opens in half an hour, per-epoch counts and heart rate of an afternoon awake and an
hour asleep go through `features.feed_sleep` (the same call the raw path makes, with the same dtypes),
so the period detector opens and closes a period and the sleep stager runs too.
"""

from __future__ import annotations

import time

import numpy as np

from decoder import config as decoder_config
from decoder import sleep
from decoder.features import device_key, feed_sleep
from gateway.compute import compute
from gateway.simulator import simulate_band
from gateway.simulator.recorder import recording_batches
from gateway.simulator.signals import DEFAULT_START_US

_MINUTE_US = 60_000_000
_EPOCH_US = 30_000_000


def _sleep_period() -> list[dict]:
    """Records of 3 h awake, 1 h asleep (still, heart rate 20 bpm lower) and 1 h awake again, as epochs."""
    rng = np.random.default_rng(1)
    awake, asleep = 360, 120
    phases = [(awake, 300.0, 75.0), (asleep, 0.0, 55.0), (awake, 300.0, 75.0)]
    counts = np.concatenate([np.full(n, c) for n, c, _ in phases])
    hr = np.concatenate([np.full(n, h) for n, _, h in phases]) + rng.normal(0.0, 2.0, counts.size)
    hr, counts = sleep.stager_inputs(hr, counts)
    epoch_us = DEFAULT_START_US + np.arange(counts.size, dtype=np.int64) * _EPOCH_US
    records, _ = feed_sleep(device_key(1), None, epoch_us, counts, hr, finish=True)
    return records


def warm() -> dict[str, object]:
    """Run the feature path once on a simulated band; returns what it did, for the caller to print."""
    started = time.perf_counter()
    rec = simulate_band(1, 30, device_id=1, scenario="night", start_us=DEFAULT_START_US - 20 * _MINUTE_US)
    state: bytes | None = None
    families: set[str] = set()
    for batch in recording_batches(rec, batch_frames=10):
        computed = compute(batch, state, decoder_config.MAX_DECOMPRESSED_BYTES)
        state = computed.state
        families.update(r["family"] for r in computed.records)
    families.update(r["family"] for r in _sleep_period())
    if "night" not in families:  # the stager did not run: its kernels would compile on a live batch
        raise RuntimeError(f"warm-up reached only {sorted(families)}; no sleep period closed")
    return {"families": sorted(families), "seconds": round(time.perf_counter() - started, 1)}
