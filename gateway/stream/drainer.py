"""The drainer: the one path from the store's outbox to the feature stream, beside the batch path.

    outbox_take → (purge erased devices) → publish → await the acks → outbox_done

A record reaches the outbox in its own commit, before its batch is acked (gateway/store), so the band's
ack never waits for the stream. An entry leaves the outbox only after the stream acked it: a drainer that
dies before the ack, or after it and before the delete, publishes the entry again when it runs again, and
the stream drops the copy by its message ID (within DUPLICATE_WINDOW_S; see CRASH_BOUND_S). While the
stream is down the drainer backs off (up to BACKOFF_MAX_S) and the backlog stays on disk, not here: it
holds one page at a time.

Erasure leaves a purge entry in the outbox; the drainer purges the device's subjects when it reaches it,
after any page it had in flight, so a record taken before the erasure cannot land after the purge. With
several drainers on one store (PostgreSQL, a gateway each) the store hands a device to one drainer at a
time, for a while; a round starts nothing after ROUND_BUDGET_S, so it never outlasts that while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.store.base import StoreError
from gateway.stream.base import (
    BACKOFF_MAX_S,
    DUPLICATE_WINDOW_S,
    PUBLISH_TIMEOUT_S,
    ROUND_BUDGET_S,
    FeatureStream,
    StreamUnavailable,
    messages_of,
)

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.pipeline import StoreThread
    from gateway.store.base import OutboxRow

log = logging.getLogger("bandgate.stream")

PAGE = 500  # entries a round (to the end of a batch): one page of messages in flight, then their acks
IDLE_S = 1.0  # with nothing to do, look again this often (commits of other gateways, other processes)
BACKOFF_MIN_S = 0.25
DEPTH_EVERY_S = 1.0  # the outbox depth metric is a count(*): at most this often


class Drainer:
    """Publishes the outbox of `outbox.store` (a store thread of its own, opened with the outbox on) to
    `stream`. start/shutdown: start launches the task (a second start is a no-op); shutdown stops it, safe
    without start and twice. `wake()` after a commit makes it look at once instead of within IDLE_S."""

    def __init__(
        self,
        outbox: StoreThread,
        stream: FeatureStream,
        metrics: Metrics | None = None,
        *,
        page: int = PAGE,
        idle_s: float = IDLE_S,
        duplicate_window_s: float = DUPLICATE_WINDOW_S,
        round_budget_s: float = ROUND_BUDGET_S,
        clock: Callable[[], float] = time.time,
    ):
        self.outbox = outbox
        self.stream = stream
        self.metrics = metrics
        self.page = page
        self.idle_s = idle_s
        self.duplicate_window_s = duplicate_window_s
        self.round_budget_s = round_budget_s
        self.clock = clock  # wall clock (s), compared with the entries' taken_us: a test injects its own
        self.published = 0  # records acked by the stream (a message holds a batch's records of a family)
        self.unguarded = 0  # records republished after the duplicate window: a copy may be in the stream
        self._task: asyncio.Future | None = None
        self._wake = asyncio.Event()
        self._depth_at = 0.0
        self._last_ack = time.monotonic()
        self._backlog = False  # the last round found entries waiting
        self._sleep = asyncio.sleep  # the back-off's wait: a test records it instead
        if metrics is not None:
            metrics.stream_ack_age.set_function(self.ack_age_s)

    def ack_age_s(self) -> float:
        """Seconds since the stream last acked a message while entries were waiting; 0 when none wait."""
        return time.monotonic() - self._last_ack if self._backlog else 0.0

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            await self.stream.start()
            self._task = asyncio.ensure_future(self.run())

    async def shutdown(self, flush_s: float = 0.0) -> None:
        """Stop; with `flush_s`, first drain what waits for up to that long (a clean stop leaves an empty
        outbox when the stream is up; what is left is published at the next start)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if flush_s > 0:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(), flush_s)
        await self.stream.close()

    async def flush(self) -> None:
        """Drain until the outbox is empty (raises what a round raises)."""
        while await self.drain_once():
            pass

    async def drain_once(self) -> int:
        """One round: take a page, purge, publish, delete what was acked; returns the entries done.
        `StreamUnavailable` (after deleting what was acked) if any message went unacked. Past
        `round_budget_s` after the take, nothing more is started: the rest is taken again next round."""
        store = self.outbox.store
        started = time.monotonic()
        rows = await self.outbox.call(store.outbox_take, self.page)
        self._backlog = bool(rows)
        if not rows:
            # another drainer has the outbox (SQLite's one at a time): its depth is that one's to count (a
            # count of a long backlog at every commit's wake would cost a core)
            if store.outbox_drains():
                await self._update_depth(force=True)
            return 0
        try:
            done = await self._publish_page(rows, started)
        except Exception:  # the backlog must show while the stream is down, and the stream's error wins
            with contextlib.suppress(Exception):
                await self._update_depth(force=False)
            raise
        await self._update_depth(force=False)  # after the publish: nothing between a take and its publish
        return done

    async def _publish_page(self, rows: list[OutboxRow], started: float) -> int:
        """Purge, publish and mark done a page taken at `started` (monotonic); the entries done."""
        store = self.outbox.store
        purges = [r for r in rows if r.is_purge]
        for n, row in enumerate(purges):  # before the page's records: those after a purge entry are new data
            if n and time.monotonic() - started > self.round_budget_s:  # (a round always makes progress)
                return n
            await self.stream.purge(row.device)
            await self.outbox.call(store.outbox_done, [row.id])
            log.info("stream purged", extra={"fields": {"event": "stream_purged", "device": row.device}})
        messages = messages_of(rows)
        if time.monotonic() - started > self.round_budget_s:  # (a slow store or purges): taken again next
            return len(purges)  # round, so no page is published after the lease a store lent it for
        # taken before, longer ago than the window: if that earlier publish reached the stream, this one
        # is a second copy (the drainer was down longer than CRASH_BOUND_S)
        stale_before_us = (self.clock() - self.duplicate_window_s + PUBLISH_TIMEOUT_S) * 1e6
        unguarded = sum(max(r.records, 1) for r in rows if not r.is_purge and r.taken_us < stale_before_us)
        if unguarded:
            self.unguarded += unguarded
            if self.metrics is not None:
                self.metrics.stream_unguarded.inc(unguarded)
            log.warning(
                "outbox entries republished after the duplicate window",
                extra={"fields": {"event": "stream_unguarded_republish", "entries": unguarded}},
            )
        acked = await self.stream.publish(messages)
        done = [i for m, ok in zip(messages, acked, strict=True) if ok for i in m.outbox_ids]
        if done:
            self._last_ack = time.monotonic()
            await self.outbox.call(store.outbox_done, done)
            records = sum(m.record_count for m, ok in zip(messages, acked, strict=True) if ok)
            self.published += records  # records, as the metric counts them
            if self.metrics is not None:
                self.metrics.stream_published.inc(records)
        if not all(acked):
            unacked = len(acked) - sum(acked)
            raise StreamUnavailable(f"{unacked} of {len(messages)} messages not acked")
        return len(purges) + len(done)

    async def _update_depth(self, force: bool) -> None:
        now = time.monotonic()
        if self.metrics is None or (not force and now - self._depth_at < DEPTH_EVERY_S):
            return
        self._depth_at = now
        self.metrics.outbox_depth.set(await self.outbox.call(self.outbox.store.outbox_depth))

    async def run(self) -> None:
        """Drain until cancelled: at once while entries wait, on `wake()` or every IDLE_S when none do,
        and with a doubling back-off (up to BACKOFF_MAX_S) while the stream or the store fails."""
        backoff = BACKOFF_MIN_S
        while True:
            try:
                if not await self.drain_once():
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.idle_s)
                backoff = BACKOFF_MIN_S
                continue
            except asyncio.CancelledError:
                raise
            except StreamUnavailable as e:
                reason, error = "stream", str(e)
            except StoreError as e:
                reason, error = "store", type(e).__name__
            except Exception as e:  # a bug must not end the drainer: the outbox would only grow
                reason, error = "bug", type(e).__name__
                log.exception("drainer round failed", extra={"fields": {"event": "stream_bug"}})
            if self.metrics is not None:
                self.metrics.stream_errors.labels(reason).inc()
            log.warning(
                "feature stream round failed; backing off",
                extra={"fields": {"event": "stream_backoff", "reason": reason, "error": error, "s": backoff}},
            )
            await self._sleep(backoff)
            backoff = min(2 * backoff, BACKOFF_MAX_S)


__all__ = ["Drainer"]
