"""The JetStream sink and the drainer against the shared NATS (127.0.0.1:4222), each test under a prefix of
its own whose streams it deletes after: dedup of republished entries, a drainer killed before the publish
acks and after them (a real process crash), erasure purging the device's subjects in every family,
the duplicate-window bound, and the stream's configuration."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from decoder.records import FAMILIES, device_key
from gateway.metrics import Metrics
from gateway.pipeline import StoreThread
from gateway.privacy.sealing import open_sealer
from gateway.store import SqliteStore
from gateway.stream import DUPLICATE_WINDOW_S, messages_of
from gateway.stream.drainer import Drainer
from gateway.stream.nats import NatsStream, stream_name
from tests.gateway.store.contract import A, B, minutes
from tests.stream.crash_drainer import CRASHED
from tests.stream.natskit import all_messages, delete_streams, record_of, run, shared_nats, unique_prefix

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def url() -> Iterator[str]:
    base = shared_nats()
    prefix = unique_prefix()
    yield f"{base}?prefix={prefix}"
    run(delete_streams(base, prefix))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state dir with real data keys: the outbox's records are sealed at rest, as in a gateway."""
    (tmp_path / "state").mkdir()
    yield tmp_path / "state"


def outbox_store(tmp_path: Path, state: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "gw.db", sealer=open_sealer(state), outbox=True)


def fill(store: SqliteStore) -> list[dict]:
    """Three batches of two devices over three families; the records stored, in cursor order."""
    store.open()
    store.commit(A, 1, 0, 0, b"a", [*minutes(A, 0, 5), *minutes(A, 0, 2, "heart")])
    store.commit(B, 1, 0, 0, b"b", minutes(B, 0, 3, "sleep"))
    store.commit(A, 1, 1, 1, b"a", minutes(A, 5, 4))
    return [r for _, r in store.read_since(0, limit=1000)]


def prefix_of(url: str) -> str:
    return url.rpartition("prefix=")[2]


def base_of(url: str) -> str:
    return url.partition("?")[0]


def in_stream(url: str) -> list[tuple[str, str, dict]]:
    return run(all_messages(base_of(url), prefix_of(url)))


def assert_once_each(url: str, records: list[dict]) -> None:
    """The stream holds exactly `records`, one message each, under their own subjects and IDs."""
    messages = in_stream(url)
    ids = [m[1] for m in messages]
    assert len(ids) == len(set(ids)), "a record is in the stream twice"
    key = lambda r: (r["device"], r["family"], r["start_us"])  # noqa: E731
    assert sorted((record_of(b) for _, _, b in messages), key=key) == sorted(records, key=key)
    for subj, msg_id, body in messages:
        assert subj == f"{prefix_of(url)}.{body['family']}.{body['device']}"
        assert msg_id.startswith(f"{body['device']}/{body['family']}/")
        if msg_id.endswith("#0"):  # a message's ID is its first record's key
            assert msg_id.startswith(f"{body['device']}/{body['family']}/{body['start_us']}/")


async def drain(store: SqliteStore, stream: NatsStream, **kw) -> Drainer:
    thread = StoreThread(store, "outbox")
    await asyncio.to_thread(thread.start)
    drainer = Drainer(thread, stream, **kw)
    await stream.start()
    await drainer.flush()
    return drainer


def test_republishing_the_same_entries_leaves_one_message_each(tmp_path, state, url) -> None:
    store = outbox_store(tmp_path, state)
    records = fill(store)
    rows = store.outbox_take(100)
    assert sum(r.records for r in rows) == len(records) == 14  # 4 messages: a batch and family each

    async def publish_three_times() -> list[list[bool]]:
        acks = []
        for _ in range(2):  # a new connection each time, as after a restart
            stream = NatsStream.from_url(url)
            await stream.start()
            acks.append(await stream.publish(messages_of(rows)))  # a batch's records of a family at once
            acks.append(await stream.publish(messages_of(store.outbox_take(100))))  # taken again
            await stream.close()
        return acks

    acks = run(publish_three_times())
    assert all(all(a) for a in acks)  # a duplicate is acked too: it is stored, once
    assert_once_each(url, records)
    store.close()


def test_the_drainer_publishes_everything_once_and_empties_the_outbox(tmp_path, state, url) -> None:
    store = outbox_store(tmp_path, state)
    records = fill(store)
    metrics = Metrics()

    async def scenario() -> Drainer:
        drainer = await drain(store, NatsStream.from_url(url), metrics=metrics)
        await drainer.shutdown()
        await asyncio.to_thread(drainer.outbox.shutdown)
        return drainer

    drainer = run(scenario())
    assert drainer.published == len(records) and drainer.unguarded == 0
    assert_once_each(url, records)
    with outbox_store(tmp_path, state) as s:
        assert s.outbox_depth() == 0
    assert metrics.registry.get_sample_value("bandgate_stream_published_total") == len(records)
    assert metrics.registry.get_sample_value("bandgate_stream_last_ack_age_seconds") == 0


def test_pages_on_one_connection_share_one_ack_inbox(tmp_path, state, url) -> None:
    """A JetStream context subscribes an ack inbox at its first async publish and keeps it: one context a
    page leaked a subscription (and its reader task) a page, for as long as the gateway ran."""
    store = outbox_store(tmp_path, state)
    records = fill(store)

    async def scenario() -> tuple[Drainer, list[int]]:
        stream = NatsStream.from_url(url)
        subscriptions = []
        publish = stream.publish

        async def counting(messages):  # type: ignore[no-untyped-def]
            acked = await publish(messages)
            subscriptions.append(len(stream._nc._subs))  # nats-py's subscriptions of this connection
            return acked

        stream.publish = counting  # type: ignore[method-assign]
        drainer = await drain(store, stream, page=3)
        await drainer.shutdown()
        await asyncio.to_thread(drainer.outbox.shutdown)
        return drainer, subscriptions

    drainer, subscriptions = run(scenario())
    assert drainer.published == len(records) == 14
    # the same count after every page (the context's ack inbox, and the client's own request inbox); an
    # entry is a message (a batch and family), so pages of 3 are two pages of the four messages here
    assert len(subscriptions) == 2 and len(set(subscriptions)) == 1, subscriptions
    assert_once_each(url, records)


@pytest.mark.parametrize("when", ["before_ack", "before_delete"])
def test_a_drainer_killed_mid_page_loses_nothing_and_doubles_nothing(tmp_path, state, url, when) -> None:
    store = outbox_store(tmp_path, state)
    records = fill(store)
    store.close()
    crash = subprocess.run(
        [sys.executable, "-m", "tests.stream.crash_drainer", str(store.path), str(state), url, when],
        cwd=REPO,
        env={**os.environ},
        capture_output=True,
        timeout=60,
    )
    assert crash.returncode == CRASHED, crash.stderr.decode()[-2000:]
    with outbox_store(tmp_path, state) as s:
        left = s.outbox_take(100)
    assert sum(r.records for r in left) == len(records)  # nothing was deleted: all published again
    if when == "before_delete":
        assert len(in_stream(url)) == len(records)  # they were all in the stream already

    async def restart() -> Drainer:
        drainer = await drain(outbox_store(tmp_path, state), NatsStream.from_url(url))
        await drainer.shutdown()
        await asyncio.to_thread(drainer.outbox.shutdown)
        return drainer

    drainer = run(restart())
    assert drainer.published == len(records)  # all acked again (as duplicates where they were in)
    assert_once_each(url, records)
    with outbox_store(tmp_path, state) as s:
        assert s.outbox_depth() == 0


class HeldStream(NatsStream):
    """Publishes only once `release` is set: a page in flight while the test erases its device."""

    held: asyncio.Event
    release: asyncio.Event

    async def publish(self, messages):  # type: ignore[no-untyped-def]
        self.held.set()
        await self.release.wait()
        return await super().publish(messages)


def test_erasure_purges_the_device_in_every_family_even_a_page_in_flight(tmp_path, state, url) -> None:
    store = outbox_store(tmp_path, state)
    fill(store)
    first_b = [r for _, r in store.read_since(0, limit=1000) if r["device"] == device_key(B)]

    async def scenario() -> None:
        stream = HeldStream.from_url(url)
        stream.held, stream.release = asyncio.Event(), asyncio.Event()
        thread = StoreThread(store, "outbox")
        await asyncio.to_thread(thread.start)
        drainer = Drainer(thread, stream)
        await stream.start()
        round_one = asyncio.ensure_future(drainer.drain_once())  # takes A's and B's records
        await stream.held.wait()
        with outbox_store(tmp_path, state) as other:  # the gateway's writer erases A meanwhile
            assert await asyncio.to_thread(other.erase_device, A) == 11
            other.commit(A, 2, 0, 0, b"a", minutes(A, 100, 2))  # new data after the erasure
        stream.release.set()
        assert await round_one == 4  # A's messages land in the stream after the erasure...
        assert await drainer.drain_once() == 1 + 1  # ...and the purge entry comes next, then new data
        await drainer.shutdown()
        await asyncio.to_thread(thread.shutdown)

    run(scenario())
    with outbox_store(tmp_path, state) as s:
        assert s.outbox_depth() == 0
        after = [r for _, r in s.read_since(0, limit=1000) if r["device"] == device_key(A)]
    assert len(after) == 2
    assert_once_each(url, first_b + after)


def test_an_entry_republished_after_the_duplicate_window_is_counted(tmp_path, state, url) -> None:
    store = outbox_store(tmp_path, state)
    records = fill(store)
    store.outbox_take(100)  # a drainer took them, and then was down for longer than the window
    metrics = Metrics()
    late = lambda: time.time() + DUPLICATE_WINDOW_S  # noqa: E731

    drainer = run(drain(store, NatsStream.from_url(url), metrics=metrics, clock=late))
    assert drainer.unguarded == len(records)
    assert metrics.registry.get_sample_value("bandgate_stream_unguarded_republish_total") == len(records)
    assert_once_each(url, records)  # within the server's real window it still dedups
    store.outbox_take(1)  # nothing left; a fresh entry taken now is inside any window
    store.commit(B, 1, 1, 1, b"b", minutes(B, 50, 1))
    again = run(drain(store, NatsStream.from_url(url), metrics=metrics))
    assert again.unguarded == 0
    store.close()


def test_each_family_stream_keeps_its_retention_and_the_window(url) -> None:
    async def scenario() -> dict:
        stream = NatsStream.from_url(url, {"heart": 90})
        await stream.start()
        await stream.publish([])
        await stream._connection()
        await stream.close()
        changed = NatsStream.from_url(url, {"heart": 30, "sleep": 7})  # a new retention setting
        await changed.start()
        await changed._connection()
        await changed.close()
        nc = await nats.connect(base_of(url))
        try:
            jsm = nc.jsm()
            return {f: (await jsm.stream_info(stream_name(prefix_of(url), f))).config for f in FAMILIES}
        finally:
            await nc.close()

    configs = run(scenario())
    assert configs["heart"].max_age == 30 * 86_400 and configs["sleep"].max_age == 7 * 86_400
    assert configs["steps"].max_age in (None, 0)
    assert all(c.duplicate_window == DUPLICATE_WINDOW_S for c in configs.values())
    assert configs["steps"].subjects == [f"{prefix_of(url)}.steps.*"]
