"""Health follows the store: a gateway that cannot store must not look ready.

When a batch is refused because the store is unavailable (nothing stored, not acked: the band keeps it),
the gateway turns NOT_SERVING, so a load balancer or an orchestrator moves bands elsewhere, and probes
the store every `interval_s` until it answers again, then turns SERVING. Bands already connected keep
their streams and get UNAVAILABLE with a retry hint meanwhile; nothing is held in memory for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("bandgate.store")

PROBE_INTERVAL_S = 1.0


class StoreWatch:
    """`unavailable()` from the pipeline; `set_serving(bool)` is the health servicer's side."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[object]],
        set_serving: Callable[[bool], Awaitable[None]],
        on_change: Callable[[bool], None] = lambda available: None,
        interval_s: float = PROBE_INTERVAL_S,
    ):
        self._probe = probe
        self._set_serving = set_serving
        self._on_change = on_change
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.available = True

    def unavailable(self) -> None:
        """The store refused for want of itself: NOT_SERVING until a probe gets an answer."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._recover())

    async def _recover(self) -> None:
        self.available = False
        self._on_change(False)
        log.warning("store unavailable: health NOT_SERVING", extra={"fields": {"event": "store_down"}})
        await self._set_serving(False)
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._probe()
            except Exception as e:  # any failure to answer: still down (its type only: no data in logs)
                fields = {"event": "store_probe", "error": type(e).__name__}
                log.debug("store probe failed", extra={"fields": fields})
                continue
            break
        self.available = True
        self._on_change(True)
        log.warning("store answers again: health SERVING", extra={"fields": {"event": "store_up"}})
        await self._set_serving(True)

    async def close(self) -> None:
        """Stop probing (shutdown: health is the shutdown's to set from here). Safe twice."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
