"""The drainer on the in-memory stream (no server): the back-off that bounds how long a taken entry waits
in a running drainer, a bug that does not end it, and the order of purges and records."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

from decoder.records import device_key
from gateway.metrics import Metrics
from gateway.pipeline import StoreThread
from gateway.store import SqliteStore
from gateway.stream import FeatureStream
from gateway.stream.base import BACKOFF_MAX_S, CRASH_BOUND_S, PUBLISH_TIMEOUT_S
from gateway.stream.drainer import BACKOFF_MIN_S, Drainer
from gateway.stream.memory import MemoryStream
from tests.gateway.store.contract import A, B, minutes
from tests.stream.natskit import run


async def _drainer(path: Path, stream: MemoryStream, **kw) -> Drainer:
    thread = StoreThread(SqliteStore(path, outbox=True), "outbox")
    await asyncio.to_thread(thread.start)
    return Drainer(thread, stream, **kw)


def test_a_failing_stream_is_retried_with_a_capped_back_off_within_the_bound(tmp_path) -> None:
    """Every wait between two publishes of a taken entry is at most BACKOFF_MAX_S, and a publish gives up
    after PUBLISH_TIMEOUT_S: inside a running drainer an entry is retried well within CRASH_BOUND_S."""
    with SqliteStore(tmp_path / "gw.db", outbox=True) as s:
        s.commit(A, 1, 0, 0, b"a", minutes(A, 0, 3))
    stream = MemoryStream()
    stream.down = True
    metrics = Metrics()
    waits: list[float] = []

    async def scenario() -> Drainer:
        drainer = await _drainer(tmp_path / "gw.db", stream, metrics=metrics)

        async def sleep(s: float) -> None:
            waits.append(s)
            if len(waits) == 10:
                stream.down = False  # the server is back

        drainer._sleep = sleep
        task = asyncio.ensure_future(drainer.run())
        for _ in range(3000):  # 30 s
            if drainer.published == 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(drainer.outbox.shutdown)
        return drainer

    drainer = run(scenario())
    assert drainer.published == 3 and len(stream.records) == 3
    assert waits[0] == BACKOFF_MIN_S and max(waits) == BACKOFF_MAX_S
    assert all(b == min(2 * a, BACKOFF_MAX_S) for a, b in itertools.pairwise(waits))
    assert PUBLISH_TIMEOUT_S + max(waits) < CRASH_BOUND_S
    assert metrics.registry.get_sample_value("bandgate_stream_errors_total", {"reason": "stream"}) == 10


class Buggy(MemoryStream):
    calls = 0

    async def publish(self, messages):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug")
        return await super().publish(messages)


def test_a_bug_in_a_round_does_not_end_the_drainer(tmp_path) -> None:
    with SqliteStore(tmp_path / "gw.db", outbox=True) as s:
        s.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
    stream = Buggy()
    metrics = Metrics()

    async def scenario() -> Drainer:
        drainer = await _drainer(tmp_path / "gw.db", stream, metrics=metrics)
        drainer._sleep = lambda s: asyncio.sleep(0)
        task = asyncio.ensure_future(drainer.run())
        for _ in range(3000):  # 30 s
            if drainer.published == 2:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(drainer.outbox.shutdown)
        return drainer

    assert run(scenario()).published == 2
    assert metrics.registry.get_sample_value("bandgate_stream_errors_total", {"reason": "bug"}) == 1


def test_a_purge_runs_before_the_records_behind_it_and_republishes_dedup(tmp_path) -> None:
    stream = MemoryStream()
    assert isinstance(stream, FeatureStream)
    with SqliteStore(tmp_path / "gw.db", outbox=True) as s:
        s.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
        s.commit(B, 1, 0, 0, b"b", minutes(B, 0, 1))

        async def first() -> None:
            drainer = await _drainer(tmp_path / "gw.db", stream)
            await drainer.flush()
            await asyncio.to_thread(drainer.outbox.shutdown)

        run(first())
        s.erase_device(A)
        s.commit(A, 2, 0, 0, b"a", minutes(A, 10, 1))  # new data after the erasure, behind the purge

        async def second() -> Drainer:
            drainer = await _drainer(tmp_path / "gw.db", stream)
            await drainer.flush()
            await asyncio.to_thread(drainer.outbox.shutdown)
            return drainer

        run(second())
        assert s.outbox_depth() == 0
    devices = [r["device"] for r in stream.records]
    assert devices == [device_key(B), device_key(A)]  # A's old two purged, its new one kept


class SlowPurges(MemoryStream):
    async def purge(self, device: str) -> None:
        await asyncio.sleep(0.25)
        await super().purge(device)


def test_a_round_starts_nothing_past_its_budget(tmp_path) -> None:
    """Five erased devices and a record behind them, purges that take 250 ms, a budget of 400 ms: the first
    round purges one or two devices and publishes nothing (the lease a store lends the page for outlives
    the round); the next rounds do the rest, in order."""
    with SqliteStore(tmp_path / "gw.db", outbox=True) as s:
        for k in range(5):
            s.commit(B + k, 1, 0, 0, b"b", minutes(B + k, 0, 1))
            s.erase_device(B + k)
        s.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
    stream = SlowPurges()

    async def scenario() -> tuple[int, int, int]:
        drainer = await _drainer(tmp_path / "gw.db", stream, round_budget_s=0.4)  # (a slow box's take fits)
        first = await drainer.drain_once()
        published_then = len(stream.messages)
        await drainer.flush()
        depth = await drainer.outbox.call(drainer.outbox.store.outbox_depth)
        await asyncio.to_thread(drainer.outbox.shutdown)
        return first, published_then, depth

    first, published_then, depth = run(scenario())
    assert first in (1, 2) and published_then == 0
    assert depth == 0 and [r["device"] for r in stream.records] == [device_key(A)] * 2
    assert len(stream.messages) == 1  # A's two records, one batch: one message


class SlowFirstTake(SqliteStore):
    """A store whose first take returns after the drainer's round budget (a store under load)."""

    slow = True

    def outbox_take(self, limit: int = 500):  # type: ignore[no-untyped-def]
        rows = super().outbox_take(limit)
        if self.slow:
            self.slow = False
            time.sleep(0.6)
        return rows


def test_a_page_taken_past_the_budget_is_not_published_but_taken_again(tmp_path) -> None:
    """The budget counts from before the take (a store lends the page from its take): a page whose take
    returned after it is left for the next round, not published late; the next round publishes it once."""
    with SqliteStore(tmp_path / "gw.db", outbox=True) as s:
        s.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
    stream = MemoryStream()

    async def scenario() -> tuple[int, int, int]:
        thread = StoreThread(SlowFirstTake(tmp_path / "gw.db", outbox=True), "outbox")
        await asyncio.to_thread(thread.start)
        drainer = Drainer(thread, stream, round_budget_s=0.3)  # a slow box's later takes fit
        first = await drainer.drain_once()
        published_then = len(stream.messages)
        await drainer.flush()
        depth = await thread.call(thread.store.outbox_depth)
        await asyncio.to_thread(thread.shutdown)
        return first, published_then, depth

    first, published_then, depth = run(scenario())
    assert (first, published_then) == (0, 0)
    assert depth == 0 and len(stream.messages) == 1 and len(stream.records) == 2


class CountedDepth(SqliteStore):
    """A store that counts its depth queries (a scan of the outbox)."""

    depths = 0

    def outbox_depth(self) -> int:
        self.depths += 1
        return super().outbox_depth()


def test_a_standby_drainer_neither_publishes_nor_counts_the_outbox_until_it_has_it(tmp_path) -> None:
    """SQLite: a second drainer on the file (another serving process) stands by while the first has the
    outbox: its rounds, one at every commit's wake, publish nothing and do not count the backlog (a scan
    each); once the first is closed, its next round drains the file."""
    path = tmp_path / "gw.db"
    with SqliteStore(path, outbox=True) as s:
        s.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
        s.commit(B, 1, 0, 0, b"b", minutes(B, 0, 1))
    first_stream, second_stream = MemoryStream(), MemoryStream()

    async def scenario() -> tuple[int, int, int, int]:
        first = await _drainer(path, first_stream)
        thread = StoreThread(CountedDepth(path, outbox=True), "outbox")
        await asyncio.to_thread(thread.start)
        second = Drainer(thread, second_stream, metrics=Metrics())
        assert await first.outbox.call(first.outbox.store.outbox_take, 1)  # the first has the outbox
        standby = [await second.drain_once() for _ in range(20)]
        assert standby == [0] * 20 and not second_stream.records
        depths_standing_by = thread.store.depths
        await asyncio.to_thread(first.outbox.shutdown)
        drained = await second.drain_once()
        empty = await second.drain_once()
        await asyncio.to_thread(thread.shutdown)
        return depths_standing_by, drained, empty, thread.store.depths

    depths_standing_by, drained, empty, depths = run(scenario())
    assert depths_standing_by == 0
    assert drained == 2 and empty == 0 and depths >= 1  # its own empty take counts the depth again
    assert not first_stream.records and len(second_stream.records) == 3
