"""Compile (or load from the cache) every Numba kernel the gateway runs, before it serves.

`bandgate warm` runs this at image build time with NUMBA_CACHE_DIR set, so a container's first batch
does not pay ~45 s of JIT compilation. Half an hour of a simulated band, from 08:40 local time, goes
through `compute.compute` (the server's own path: decompress, decode, features): the night window
closes at 09:00, so the sleep stager runs too and every kernel and signature is compiled.
"""

from __future__ import annotations

import time

from decoder import config as decoder_config
from gateway.compute import compute
from gateway.simulator import simulate_band
from gateway.simulator.recorder import recording_batches
from gateway.simulator.signals import DEFAULT_START_US

_MINUTE_US = 60_000_000


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
    if "night" not in families:  # the stager did not run: its kernels would compile on a live batch
        raise RuntimeError(f"warm-up reached only {sorted(families)}; the night window never closed")
    return {"families": sorted(families), "seconds": round(time.perf_counter() - started, 1)}
