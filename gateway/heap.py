"""The serving process's garbage collector: its start-up heap frozen, full collections rare.

A serving process keeps most of its objects for its whole life (modules, the registry's policy, grpc's
per-stream state), and CPython's full (oldest-generation) collection walks every one of them while the
event loop, and with it every open stream's ack, waits. In a 2,000-band reconnect storm the serving
process made three full collections of 60–190 ms of CPU each (BENCHMARKS.md, "Garbage collection in
the serving process"). The young generations, which hold a batch's short-lived objects and most of the
cyclic garbage, are collected as before.

`settle` is for processes that serve until they exit (`bandgate serve`, a supervisor's serving
processes), not for libraries or tests that run a gateway in their own process: it changes the whole
interpreter's collector.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("bandgate.heap")

# A full collection once per this many middle-generation collections (CPython's default is 10): with
# the default young thresholds, about every 7 million net container allocations, minutes apart in a
# storm. The interpreter's own rule still applies on top: only when the objects promoted since the last
# full collection are at least a quarter of those that survived it.
OLDEST_THRESHOLD = 1000


def settle() -> int:
    """Collect once, then freeze what survives (`gc.freeze`: never walked by a collection again, still
    freed by reference counting when dropped), and make full collections rarer. Returns the number of
    objects frozen."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, OLDEST_THRESHOLD)
    frozen = gc.get_freeze_count()
    log.info(
        "start-up heap frozen",
        extra={"fields": {"event": "heap_frozen", "objects": frozen, "oldest_threshold": OLDEST_THRESHOLD}},
    )
    return frozen


__all__ = ["OLDEST_THRESHOLD", "settle"]
