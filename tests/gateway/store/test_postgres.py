"""The PostgreSQL store: the store contract on a fresh schema of the test database, plus what only many
gateways over one database need (cursors that commit out of order, two writers holding one device,
several drainers on one outbox, connections cut under the store, migrations an older gateway runs
beside)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import psycopg
import pytest
from psycopg import sql

from bench.registry_bench import fleet_ops
from decoder.records import device_key
from gateway.pipeline import ALREADY_EXISTS, OK, UNAVAILABLE
from gateway.privacy.sealing import KeySealer, open_sealer
from gateway.server import run_server
from gateway.store import (
    DeviceRow,
    PostgresStore,
    SchemaVersionError,
    StoreError,
    StoreUnavailable,
    open_store,
    store_for_url,
)
from gateway.store.base import CommitItem, RegistryOp
from gateway.store.postgres import CURSOR_BITS, MIGRATIONS, Migration
from gateway.stream.base import messages_of, records_of
from tests.gateway.gatewaykit import Uploader, band, config, processed, same_records
from tests.services import postgres_url

from .contract import A, B, C, OutboxContract, StoreContract, entry_records, everything, minutes

LOCK_TIMEOUT_MS = 100
REPO = Path(__file__).resolve().parents[3]


class _NewerPostgresStore(PostgresStore):
    """The store as a later bandgate would ship it: one contracting migration more (say, a column the
    newer code relies on being filled, which older code would leave empty), so older gateways must refuse
    the database."""

    migrations = (*MIGRATIONS, Migration(("ALTER TABLE devices ADD COLUMN firmware text",), contract=True))


class _ExpandedPostgresStore(PostgresStore):
    """A later bandgate with an expanding migration only: older gateways keep working beside it."""

    migrations = (
        *MIGRATIONS,
        Migration(("ALTER TABLE devices ADD COLUMN firmware text", "CREATE TABLE future (device text)")),
    )


def _url(base: str, **params: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{base}{'&' if '?' in base else '?'}{query}"


class PostgresHarness:
    """Each test on schemas of its own in the test database, dropped after it."""

    def __init__(self, url: str, sealer: KeySealer | None = None):
        self.url = url
        self.sealer = sealer
        self.schema = self._new_schema()
        self.schemas = [self.schema]

    @staticmethod
    def _new_schema() -> str:
        return f"test_{secrets.token_hex(6)}"

    def store_url(self, schema: str | None = None, **params: object) -> str:
        options = {"lock_timeout_ms": LOCK_TIMEOUT_MS, "pool_timeout_s": 5, **params}
        return _url(self.url, schema=schema or self.schema, **options)

    def new_store(self) -> PostgresStore:
        return PostgresStore.from_url(self.store_url(), self.sealer)

    def fresh_database(self) -> Callable[[], PostgresStore]:
        schema = self._new_schema()
        self.schemas.append(schema)
        return lambda: PostgresStore.from_url(self.store_url(schema), self.sealer)

    def outbox_store(self) -> PostgresStore:
        return PostgresStore.from_url(self.store_url(outbox=1), self.sealer)

    def newer_store(self) -> PostgresStore:
        return _NewerPostgresStore.from_url(self.store_url(), self.sealer)

    def schema_version(self) -> int:
        return len(MIGRATIONS)

    def connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=True)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn

    def write_schema_version(self, version: int) -> None:
        """As a bandgate of `version` would leave it: needing code of that version."""
        with self.connect() as conn:
            conn.execute("UPDATE schema_version SET version = %s, compatible = %s", (version, version))

    @contextmanager
    def exclusive_lock(self) -> Iterator[None]:
        """Every table of the schema in EXCLUSIVE mode: writes (and row locks) wait, plain reads go on,
        as SQLite's write lock leaves WAL readers be."""
        with self.connect() as conn, conn.transaction():
            tables = [
                r[0]
                for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (self.schema,))
            ]
            conn.execute(
                sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
                    sql.SQL(", ").join(sql.Identifier(self.schema, t) for t in tables)
                )
            )
            yield

    def drop(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            for schema in self.schemas:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def pg_harness() -> Iterator[PostgresHarness]:
    harness = PostgresHarness(postgres_url())
    yield harness
    harness.drop()


class TestPostgresContract(StoreContract, OutboxContract):
    @pytest.fixture
    def harness(self, pg_harness: PostgresHarness) -> PostgresHarness:
        return pg_harness


class TestSealedPostgresContract(StoreContract, OutboxContract):
    """The same promises with encryption at rest: values and state sealed under real data keys."""

    @pytest.fixture
    def harness(self, tmp_path: Path) -> Iterator[PostgresHarness]:
        url = postgres_url()
        (tmp_path / "state").mkdir()
        sealer = open_sealer(tmp_path / "state")
        harness = PostgresHarness(url, sealer)
        yield harness
        harness.drop()
        sealer.keys.close()


# URLs


def test_urls_name_the_database_schema_and_options() -> None:
    store = store_for_url(
        "postgres://bob:s3cret@db.example:6543/features?schema=fleet_1&lock_timeout_ms=250&pool_max=6"
        "&sslmode=require"
    )
    assert isinstance(store, PostgresStore)
    assert (store.schema, store.lock_timeout_ms, store.pool_max) == ("fleet_1", 250, 6)
    assert "s3cret" not in repr(store) and "db.example:6543/features" in repr(store)
    plain = store_for_url("postgresql://postgres@127.0.0.1/test")
    assert isinstance(plain, PostgresStore) and plain.schema == "bandgate"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://127.0.0.1/test?schema=Bad-Name",
        "postgresql://127.0.0.1/test?schema=pg_catalog",
        "postgresql://127.0.0.1/test?lock_timeout_ms=0",
        "postgresql://127.0.0.1/test?lock_timeout_ms=-5",
        "postgresql://127.0.0.1/test?pool_max=1",
        "postgresql://127.0.0.1/test?pool_timeout_s=soon",
        "postgresql://127.0.0.1/test?schema=a&schema=b",
        "postgresql://127.0.0.1/test?outbox=yes",
        "postgresql://127.0.0.1/test?sslmod=require",  # a typo of a libpq option
        "postgresql://127.0.0.1/",
        "postgresql:127.0.0.1/test",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        store_for_url(url)


def test_a_password_stays_out_of_errors() -> None:
    with pytest.raises(ValueError) as err:
        store_for_url("postgresql://bob:s3cret@127.0.0.1/test?pool_max=x")
    assert "s3cret" not in str(err.value)


# cursors across gateways


def test_a_reader_never_passes_a_lower_cursor_that_commits_later(pg_harness: PostgresHarness) -> None:
    """Two gateways: the one whose records take the lower cursors commits last. A reader between the two
    commits must not return the higher cursors yet (it would resume past the lower ones and miss them)."""
    with pg_harness.new_store() as setup:
        setup.commit(B, 1, 0, 0, b"", minutes(B, 0, 1))
    with pg_harness.connect() as low, pg_harness.connect() as high, pg_harness.new_store() as reader:
        seen = everything(reader)
        cursor = seen[-1][0]
        low.execute("BEGIN")
        high.execute("BEGIN")
        for writer in (low, high):  # as a gateway's commit does: the writer lock, then an ID
            writer.execute("SELECT pg_advisory_xact_lock_shared(%s, 0)", (reader._writer_lock_key,))
        (low_xid,) = low.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        (high_xid,) = high.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        assert low_xid < high_xid
        insert = (
            "INSERT INTO records_activity (cursor, device, ownership, family, start_us, duration_s, algo, "
            "value_text) VALUES (%s, %s, '', 'steps', %s, 60, 'steps/1', '{}')"
        )
        low_cursor, high_cursor = low_xid << CURSOR_BITS, high_xid << CURSOR_BITS
        low.execute(insert, (low_cursor, "00000000000000aa", 1))
        high.execute(insert, (high_cursor, "00000000000000bb", 2))
        high.execute("COMMIT")  # the higher cursor is visible first
        assert reader.read_since(cursor) == []  # ...but not served while the lower may still commit
        assert reader.latest_cursor() == cursor
        low.execute("COMMIT")
        assert [c for c, _ in reader.read_since(cursor)] == [low_cursor, high_cursor]


def test_two_gateways_through_the_store_miss_nothing(pg_harness: PostgresHarness) -> None:
    """The same through `commit`: a gateway's group held open (its device lock taken, its transaction
    ID drawn) while the other commits; a reader paging all along sees every record once, in order."""
    gate, release = threading.Event(), threading.Event()
    with pg_harness.new_store() as slow, pg_harness.new_store() as fast, pg_harness.new_store() as reader:
        real_apply = slow._apply_group

        def held_apply(*args, **kwargs):  # type: ignore[no-untyped-def]
            gate.set()
            assert release.wait(30)
            return real_apply(*args, **kwargs)

        slow._apply_group = held_apply  # type: ignore[method-assign]
        results: list[object] = []
        writer = threading.Thread(
            target=lambda: results.append(slow.commit(A, 1, 0, 0, b"a", minutes(A, 0, 3)))
        )
        writer.start()
        try:
            assert gate.wait(30)
            later = fast.commit(B, 1, 0, 0, b"b", minutes(B, 0, 2))
            assert fast.read_since(0) == []  # B's records wait behind the open transaction
            assert reader.latest_cursor() == 0
        finally:
            release.set()
            writer.join(30)
        (earlier,) = results
        want = [
            *zip(earlier.cursors, minutes(A, 0, 3), strict=True),  # type: ignore[attr-defined]
            *zip(later.cursors, minutes(B, 0, 2), strict=True),
        ]
        assert everything(reader) == want
        assert earlier.cursors[-1] < later.cursors[0]  # type: ignore[attr-defined]


def test_two_gateways_holding_one_device_lose_nothing_and_store_nothing_twice(
    pg_harness: PostgresHarness,
) -> None:
    """Both gateways commit every batch of one band (as after a reconnect to the other gateway, with
    the band resending what it had not seen acked): each batch is stored by exactly one of them, the
    other gets a duplicate, and the device ends with the last batch's state and high-water."""
    n = 40
    batches = [(i, minutes(A, 3 * i, 3)) for i in range(n)]
    outcomes: dict[int, list[tuple[int, bool, int]]] = {i: [] for i in range(n)}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def gateway(k: int) -> None:
        try:
            with pg_harness.new_store() as store:
                start.wait(10)
                for i, records in batches:
                    result = store.commit_many(
                        [
                            CommitItem(A, 1, i, i, f"g{k}-{i}".encode(), [dict(r) for r in records]),
                            CommitItem(B + k, 1, i, i, b"", []),  # another device of each, in the group
                        ]
                    )[0]
                    if isinstance(result, Exception):
                        raise result
                    outcomes[i].append((k, result.duplicate, sum(c is not None for c in result.cursors)))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=gateway, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(n):
        assert sorted(dup for _, dup, _ in outcomes[i]) == [False, True], (i, outcomes[i])
        assert sorted(stored for _, _, stored in outcomes[i]) == [0, 3]
    with pg_harness.new_store() as store:
        assert [r for _, r in everything(store) if r["device"] == minutes(A, 0, 1)[0]["device"]] == [
            r for _, records in batches for r in records
        ]
        ((winner, _, _),) = [o for o in outcomes[n - 1] if not o[1]]
        assert store.device(A) == DeviceRow(A, 1, n - 1, f"g{winner}-{n - 1}".encode())


# several drainers on one outbox (a gateway each)


def test_drainers_taking_at_once_share_the_devices_and_keep_each_device_in_order(
    pg_harness: PostgresHarness,
) -> None:
    """Two drainers drain while a gateway commits for eight devices: every record is published exactly
    once, each device's records in commit order, a device is never in flight at both at once, and no
    take waits for another (the lock timeout is 100 ms: a wait would be StoreUnavailable)."""
    devices = [B + k for k in range(8)]
    n_batches = 25
    committed = threading.Event()
    errors: list[BaseException] = []
    guard = threading.Lock()
    holder_of: dict[str, int] = {}
    published: dict[str, list[int]] = {}
    rounds = [0, 0]

    def write() -> None:
        try:
            with pg_harness.outbox_store() as writer:
                for i in range(n_batches):
                    for d in devices:
                        writer.commit(d, 1, i, i, b"", minutes(d, 3 * i, 3))
        except BaseException as e:
            errors.append(e)
        finally:
            committed.set()

    def drain(k: int) -> None:
        try:
            with pg_harness.outbox_store() as drainer:
                idle = 0
                while idle < 3:
                    done = committed.is_set()
                    rows = drainer.outbox_take(7)  # small pages: the drainers interleave
                    if not rows:
                        idle += done
                        continue
                    rounds[k] += 1
                    with guard:
                        for r in rows:
                            assert holder_of.setdefault(r.device, k) == k, f"{r.device} at both drainers"
                    for r in rows:  # "publish"
                        published.setdefault(r.device, []).extend(c for c, _ in entry_records([r]))
                    with guard:  # given back before done releases them: the check stays strict
                        for r in rows:
                            holder_of.pop(r.device, None)
                    drainer.outbox_done([r.id for r in rows])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write), *(threading.Thread(target=drain, args=(k,)) for k in (0, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    with pg_harness.new_store() as store:
        want: dict[str, list[int]] = {}
        for c, r in everything(store):
            want.setdefault(r["device"], []).append(c)
        assert store.outbox_depth() == 0
    assert published == want  # each device: every cursor once, in commit order
    assert all(rounds), rounds  # both drained


def test_a_take_passes_entries_another_take_has_locked_by_and_keeps_each_device_in_order(
    pg_harness: PostgresHarness,
) -> None:
    """An entry locked by another drainer's take in progress is not waited for (the lock timeout is
    100 ms) and not jumped: its device's page stops before it, other devices are taken whole."""
    with pg_harness.outbox_store() as writer, pg_harness.outbox_store() as drainer:
        for m in range(3):
            writer.commit(A, 1, m, m, b"a", minutes(A, m, 1))
        writer.commit(B, 1, 0, 0, b"b", minutes(B, 0, 2))
        with pg_harness.connect() as other, other.transaction():
            ids = [i for (i,) in other.execute("SELECT id FROM outbox_messages ORDER BY id")]
            other.execute("SELECT id FROM outbox_messages WHERE id = %s FOR UPDATE", (ids[1],))
            assert [r.id for r in drainer.outbox_take(100)] == [ids[0], ids[3]]
        assert [r.id for r in drainer.outbox_take(100)] == ids


def test_an_erased_device_is_purged_only_after_the_drainer_with_its_records_is_done(
    pg_harness: PostgresHarness,
) -> None:
    """Drainer 1 has a device's records in flight when the device is erased: the erasure deletes their
    entries, but drainer 2 gets the purge only once drainer 1 is done, so the records cannot land in
    the stream after the purge."""
    with (
        pg_harness.outbox_store() as writer,
        pg_harness.outbox_store() as one,
        pg_harness.outbox_store() as two,
    ):
        writer.commit(A, 1, 0, 0, b"a", minutes(A, 0, 3))
        writer.commit(B, 1, 0, 0, b"b", minutes(B, 0, 2))
        in_flight = one.outbox_take(100)
        assert [r.records for r in in_flight] == [3, 2]  # a message entry each
        writer.erase_device(A)
        assert two.outbox_take(100) == []  # A's purge waits for drainer 1
        assert one.outbox_done([r.id for r in in_flight if r.device == device_key(B)]) == 1
        assert two.outbox_take(100) == []  # B is done; A is still out
        assert one.outbox_done([r.id for r in in_flight if r.device == device_key(A)]) == 0  # erased
        (purge,) = two.outbox_take(100)
        assert purge.is_purge and purge.device == device_key(A)
        writer.commit(A, 1, 5, 5, b"a", minutes(A, 10, 1))  # new data after the erasure
        assert one.outbox_take(100) == []  # A is drainer 2's until its purge is done
        assert [r.is_purge for r in two.outbox_take(100)] == [True, False]  # the purge, then the new


_CRASHING_DRAINER = """
import os, sys
from gateway.store import PostgresStore
store = PostgresStore.from_url(sys.argv[1])
store.outbox_lease_s = float(sys.argv[2])
if len(sys.argv) > 3:
    store.name_drainer(sys.argv[3])
store.open()
print(" ".join(f"{r.id}:{r.taken_us}" for r in store.outbox_take(100)), flush=True)
os._exit(137)  # dies with its page in flight: no done, no close
"""


def _crash_drainer(harness: PostgresHarness, lease_s: float, *name: str) -> list[tuple[int, ...]]:
    """(id, taken_us) of the page a drainer process (named `name`, if given) took before it died."""
    crash = subprocess.run(
        [sys.executable, "-c", _CRASHING_DRAINER, harness.store_url(outbox=1), str(lease_s), *name],
        capture_output=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert crash.returncode == 137, crash.stderr.decode()[-2000:]
    return [tuple(map(int, pair.split(":"))) for pair in crash.stdout.decode().split()]


def test_a_crashed_drainers_devices_go_to_another_after_the_lease(pg_harness: PostgresHarness) -> None:
    lease_s = 10.0  # outlasts the crashed child's exit on a slow box, so the survivor finds it held
    with pg_harness.outbox_store() as writer, pg_harness.outbox_store() as survivor:
        for m in range(3):  # three batches: three message entries
            writer.commit(A, 1, m, m, b"a", minutes(A, m, 1))
        taken = _crash_drainer(pg_harness, lease_s)
        assert len(taken) == 3
        assert survivor.outbox_take(100) == []  # the crashed drainer still holds the device
        time.sleep(max(0.0, taken[0][1] / 1e6 + lease_s + 0.2 - time.time()))
        again = survivor.outbox_take(100)
        assert [(r.id, r.taken_us) for r in again] == taken  # taken again, the first taken time kept
        assert survivor.outbox_done([r.id for r in again]) == 3


def test_a_drainer_restarted_under_its_name_takes_its_devices_back_at_once(
    pg_harness: PostgresHarness,
) -> None:
    """A gateway's drainer keeps its name across restarts (gateway/stream/holder.py): killed with its page
    in flight, it takes the page again as soon as it is back, while another drainer still waits for the
    lease. The first taken time is kept."""
    with pg_harness.outbox_store() as writer, pg_harness.outbox_store() as other:
        for m in range(3):
            writer.commit(A, 1, m, m, b"a", minutes(A, m, 1))
        writer.commit(B, 1, 0, 0, b"b", minutes(B, 0, 2))
        taken = _crash_drainer(pg_harness, 120, "0123abcd-0")
        assert len(taken) == 4
        other.name_drainer("0123abcd-1")  # the gateway's other slot: not the dead process's name
        assert other.outbox_take(100) == []
        with pg_harness.outbox_store() as restarted:
            restarted.name_drainer("0123abcd-0")
            again = restarted.outbox_take(100)
            assert [(r.id, r.taken_us) for r in again] == taken
            assert restarted.outbox_done([r.id for r in again]) == 4
            with pytest.raises(RuntimeError, match="before its first take"):
                restarted.name_drainer("0123abcd-2")
        assert other.outbox_take(100) == []  # nothing left, and nothing held


def test_a_name_is_leased_under_by_one_live_drainer_only(pg_harness: PostgresHarness) -> None:
    """Two drainers given one name (a state dir copied to a second host): the database keeps the name to
    the first to take; the second leases under a name of its own, so it never takes the first's devices,
    and the name is free again once the first is closed."""
    with pg_harness.outbox_store() as writer, pg_harness.outbox_store() as one:
        writer.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
        one.name_drainer("feedc0de-0")
        (page,) = one.outbox_take(100)
        with pg_harness.outbox_store() as copy:
            copy.name_drainer("feedc0de-0")
            assert copy.outbox_take(100) == []  # A is the first's, in flight
            assert copy.outbox_holder != "feedc0de-0"
        one.close()  # gives A back and frees the name
        with pg_harness.outbox_store() as restarted:
            restarted.name_drainer("feedc0de-0")
            assert [r.id for r in restarted.outbox_take(100)] == [page.id]
            assert restarted.outbox_holder == "feedc0de-0"


# connections cut under the store


def _backends(harness: PostgresHarness, application_name: str) -> list[int]:
    with harness.connect() as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
            )
        ]


def test_a_connection_terminated_mid_commit_is_unavailable_then_recovers(pg_harness: PostgresHarness) -> None:
    name = f"bandgate_{pg_harness.schema}"
    store = PostgresStore.from_url(pg_harness.store_url(application_name=name, lock_timeout_ms=30_000))
    with store:
        store.commit(A, 1, 0, 0, b"s0", minutes(A, 0, 2))
        before = everything(store)
        with pg_harness.connect() as locker, locker.transaction():
            locker.execute("LOCK TABLE records_activity IN EXCLUSIVE MODE")
            holder = locker.info.backend_pid
            killed: list[int] = []

            def terminate() -> None:  # the commit's backend, once it waits behind the lock
                with pg_harness.connect() as admin:
                    for _ in range(300):
                        rows = admin.execute(
                            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                            "AND %s = ANY(pg_blocking_pids(pid))",
                            (name, holder),
                        ).fetchall()
                        if rows:
                            for (pid,) in rows:
                                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                                killed.append(pid)
                            return
                        threading.Event().wait(0.05)

            killer = threading.Thread(target=terminate)
            killer.start()
            with pytest.raises(StoreUnavailable):
                store.commit(A, 1, 1, 1, b"s1", minutes(A, 2, 2))
            killer.join(30)
            assert killed
        assert everything(store) == before  # nothing of the cut commit
        # every connection of the store cut while idle: the next call gets a new one
        with pg_harness.connect() as admin:
            for pid in _backends(pg_harness, name):  # waits for the exit: a backend merely signalled
                # still passes the pool's check, then dies in the commit (a loaded box's timing)
                ended = admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()
                assert ended == (True,)
        result = store.commit(A, 1, 1, 1, b"s1", minutes(A, 2, 2))  # the band's retry
        assert not result.duplicate and store.device(A) == DeviceRow(A, 1, 1, b"s1")
        assert [r for _, r in everything(store)] == minutes(A, 0, 4)


def test_no_server_is_unavailable(pg_harness: PostgresHarness) -> None:
    store = PostgresStore.from_url(
        "postgresql://postgres@127.0.0.1:1/test?pool_timeout_s=1&connect_timeout=1"
    )
    with pytest.raises(StoreUnavailable):
        store.open()
    store.close()
    with pytest.raises(StoreError, match="not open"):
        store.device(A)


# migrations


def test_an_expanding_migration_leaves_older_gateways_working(pg_harness: PostgresHarness) -> None:
    with pg_harness.new_store() as old:
        old.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
        with _ExpandedPostgresStore.from_url(pg_harness.store_url()) as new:  # the rolling upgrade
            new.commit(A, 1, 1, 1, b"new", minutes(A, 2, 1))
            assert old.commit(A, 1, 2, 2, b"old", minutes(A, 3, 1)).high_water == 2  # side by side
            assert everything(new) == everything(old)
    with pg_harness.new_store() as restarted:  # an older gateway (re)starts on the newer schema
        assert restarted.device(A) == DeviceRow(A, 1, 2, b"old")
    with pg_harness.connect() as conn:
        # an expansion leaves `compatible` at the last contraction (the outbox expanded too)
        last_contract = max(n for n, m in enumerate(MIGRATIONS, 1) if m.contract)
        assert conn.execute("SELECT version, compatible FROM schema_version").fetchone() == (
            len(MIGRATIONS) + 1,
            last_contract,
        )


def test_a_contracting_migration_stops_older_gateways(pg_harness: PostgresHarness) -> None:
    with pg_harness.new_store() as old:
        old.commit(A, 1, 0, 0, b"a", minutes(A, 0, 1))
    with pg_harness.newer_store() as newer:
        assert newer.device(A) == DeviceRow(A, 1, 0, b"a")
    with pytest.raises(SchemaVersionError, match=f"version {len(MIGRATIONS) + 1} or later"):
        pg_harness.new_store().open()


def test_a_foreign_schema_is_refused_untouched(pg_harness: PostgresHarness) -> None:
    with pg_harness.connect() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_harness.schema)))
        conn.execute("CREATE TABLE notes (body text)")
    with pytest.raises(SchemaVersionError, match="not a bandgate database"):
        pg_harness.new_store().open()
    with pg_harness.connect() as conn:
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (pg_harness.schema,))
        assert [r[0] for r in tables] == ["notes"]


def test_gateways_starting_together_migrate_once(pg_harness: PostgresHarness) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with pg_harness.new_store() as s:
                s.latest_cursor()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with pg_harness.connect() as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]


def test_values_and_state_are_sealed_in_the_database(pg_harness: PostgresHarness, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    sealer = open_sealer(tmp_path / "state")
    try:
        sentinel = "SENTINEL-4c1d"
        records = minutes(A, 0, 5)
        for r in records:
            r["values"]["tag"] = sentinel
        with PostgresStore.from_url(pg_harness.store_url(), sealer) as store:
            store.commit(A, 1, 0, 0, b"STATE-" + sentinel.encode(), records)
            assert [r for _, r in everything(store)] == records
        with pg_harness.connect() as conn:
            dumped = repr(conn.execute("SELECT * FROM records_activity").fetchall())
            dumped += repr(conn.execute("SELECT * FROM devices").fetchall())
        assert sentinel not in dumped and "STATE-" not in dumped
        with open_store(pg_harness.store_url()) as plain, pytest.raises(StoreError, match="no sealer"):
            everything(plain)
    finally:
        sealer.keys.close()


# the gateway over PostgreSQL


def test_a_gateway_stores_acks_and_withholds_acks_over_postgresql(
    pg_harness: PostgresHarness, tmp_path: Path
) -> None:
    """The real gateway (compute workers, sealing, the writer) with `--store postgresql://...`: batches are
    acked once stored, a resend is a duplicate, and while the record tables are locked past the lock
    timeout the batch is UNAVAILABLE and not acked; its retry is stored once."""
    keys = f"{pg_harness.schema}_keys"  # its own key schema: the default is shared by every run here
    pg_harness.schemas.append(keys)
    cfg = config(tmp_path, store=pg_harness.store_url(lock_timeout_ms=500), key_schema=keys)
    device, batches = band()

    async def scenario() -> list:
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, device)
            acks = [await up.send(b) for b in batches[:2]]
            acks.append(await up.send(batches[1]))  # resent
            with pg_harness.exclusive_lock():
                acks.append(await up.send(batches[2]))
            acks.append(await up.send(batches[2]))  # the band's retry
            await up.close()
            return acks

    acks = asyncio.run(asyncio.wait_for(scenario(), 180))
    assert [a.code for a in acks] == [OK, OK, ALREADY_EXISTS, UNAVAILABLE, OK]
    assert not acks[3].has_acked_seq
    sealer = open_sealer(tmp_path / "state", pg_harness.store_url(), key_schema=keys)
    try:
        with open_store(pg_harness.store_url(), sealer) as store:
            records = [r for _, r in everything(store)]
            assert store.device(device).last_seq == batches[2].last_seq  # type: ignore[union-attr]
    finally:
        sealer.keys.close()
    assert records and same_records(records, processed(batches[:3]))
    assert len(records) == len(processed(batches[:3]))


class _Version3(PostgresStore):
    """The store as it was before message entries: an entry a record (PostgreSQL migration 3)."""

    migrations = MIGRATIONS[:3]


def test_record_entries_of_an_older_gateway_drain_after_the_upgrade(pg_harness: PostgresHarness) -> None:
    """Migration 4 puts message entries in a table of their own and expands: the record entries an older
    gateway left drain as before, a message a record, in order with the purge entries and the new
    message entries after them, and an older gateway still opens the schema."""
    with _Version3.from_url(pg_harness.store_url(), pg_harness.sealer) as old:
        a = old.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2)).cursors
        with pg_harness.connect() as conn:  # what version 3 wrote in the commit, with outbox=1
            conn.execute(
                "INSERT INTO outbox (device, cursor) SELECT %s, c FROM unnest(%s::bigint[]) AS c ORDER BY c",
                (device_key(A), list(a)),
            )
            conn.execute("INSERT INTO outbox (device) VALUES (%s)", (device_key(C),))
    with pg_harness.outbox_store() as new:
        new.commit(A, 1, 1, 1, b"a", minutes(A, 5, 2))
        rows = new.outbox_take(100)
        assert [r.cursor for r in rows if r.record is not None] == list(a)
        assert [r.batch for r in rows if r.record is not None] == [None, None]
        messages = messages_of(rows)
        assert [(m.device, m.record_count) for m in messages] == [(device_key(A), 1)] * 2 + [
            (device_key(A), 2)
        ]
        assert messages[0].msg_id == f"{device_key(A)}/steps/{minutes(A, 0, 1)[0]['start_us']}/-"
        assert [r.device for r in rows if r.is_purge] == [device_key(C)]
        published = [r["cursor"] for m in messages for r in records_of(m.payload)]
        assert published == [c for c, _ in everything(new)]
        assert new.outbox_done([r.id for r in rows]) == len(rows)
    with _Version3.from_url(pg_harness.store_url()) as old:
        assert old.device(A) is not None


# What an older gateway's drainer (PostgreSQL migration 3, before message entries) ran in its take: claim
# the devices of the oldest `outbox` rows, then list their rows; a row without a cursor is a purge entry.
_OLDER_CLAIM = (
    "WITH candidates AS MATERIALIZED (SELECT o.device FROM outbox o WHERE NOT EXISTS (SELECT 1 FROM "
    "outbox_leases l WHERE l.device = o.device AND l.holder <> %(me)s AND l.until_us > %(now)s) "
    "ORDER BY o.id LIMIT %(limit)s FOR UPDATE OF o SKIP LOCKED), "
    "devices AS MATERIALIZED (SELECT DISTINCT device FROM candidates), "
    "free AS MATERIALIZED (SELECT device FROM devices "
    "WHERE pg_try_advisory_xact_lock(%(key)s, hashtext(device))) "
    "INSERT INTO outbox_leases (device, holder, until_us) "
    "SELECT device, %(me)s, %(now)s + 1 FROM free ORDER BY device "
    "ON CONFLICT (device) DO UPDATE SET holder = excluded.holder, until_us = excluded.until_us "
    "WHERE outbox_leases.holder = excluded.holder OR outbox_leases.until_us <= %(now)s "
    "RETURNING device"
)
_OLDER_LIST = (
    "SELECT id, device, cursor, taken_us FROM outbox WHERE device = ANY(%s::text[]) ORDER BY id LIMIT %s"
)


def test_an_older_drainer_beside_the_upgrade_never_sees_a_message_entry(pg_harness: PostgresHarness) -> None:
    """The rolling upgrade with the stream on: an older gateway keeps draining while a newer one commits
    message entries. Migration 4 leaves `compatible` where it was (an older gateway still starts), and the
    older drainer's own take finds only record and purge entries, never a message entry it would read as
    a purge. A newer drainer takes both tables in one id order, so a message entry and an older gateway's
    purge of the same device go out in the order they were committed."""
    with _Version3.from_url(pg_harness.store_url(), pg_harness.sealer):
        pass
    with pg_harness.connect() as conn:
        (compatible_before,) = conn.execute("SELECT compatible FROM schema_version").fetchone()  # type: ignore[misc]
    with pg_harness.outbox_store() as new:
        first = new.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2)).cursors
        with pg_harness.connect() as conn:
            assert conn.execute("SELECT version, compatible FROM schema_version").fetchone() == (
                len(MIGRATIONS),
                compatible_before,
            )
            # the older gateway, beside: a record entry of B, and an erasure of A (its purge entry)
            b = _Version3.from_url(pg_harness.store_url(), pg_harness.sealer)
            with b:
                (b_cursor,) = b.commit(B, 1, 0, 0, b"b", minutes(B, 0, 1)).cursors
            conn.execute("INSERT INTO outbox (device, cursor) VALUES (%s, %s)", (device_key(B), b_cursor))
            conn.execute("INSERT INTO outbox (device) VALUES (%s)", (device_key(A),))
        new.commit(A, 1, 1, 1, b"a", minutes(A, 5, 1))
        # its take undone at the end: the newer drainer takes everything below
        with pg_harness.connect() as older, older.transaction(force_rollback=True):
            now = time.time_ns() // 1000
            held = [
                d for (d,) in older.execute(_OLDER_CLAIM, {"me": "older", "now": now, "limit": 100, "key": 7})
            ]
            seen = older.execute(_OLDER_LIST, (held, 100)).fetchall()
        assert sorted(held) == sorted([device_key(A), device_key(B)])
        purges = [device for _, device, cursor, _ in seen if cursor is None]
        assert purges == [device_key(A)]  # the one purge written, no message entry read as one
        assert [cursor for *_, cursor, _ in seen if cursor is not None] == [b_cursor]
        rows = new.outbox_take(100)
        # one id order across both tables: A's first message, B's record, A's purge, A's next message
        assert [(r.device, r.is_purge, r.records) for r in rows] == [
            (device_key(A), False, 2),
            (device_key(B), False, 1),
            (device_key(A), True, 0),
            (device_key(A), False, 1),
        ]
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        assert messages_of(rows)[0].record_count == len(first)
        assert new.outbox_depth() == 2 + 1 + 1 + 1
        assert new.outbox_done([r.id for r in rows]) == 4
        assert new.outbox_depth() == 0
    with _Version3.from_url(pg_harness.store_url()) as old:  # an older gateway (re)starts beside
        assert old.device(B) is not None


def test_message_entries_an_older_gateway_erased_the_records_of_are_never_published(
    pg_harness: PostgresHarness,
) -> None:
    """An older gateway's erasure deletes a device's records and writes a purge entry, but leaves its
    message entries (it knows nothing of outbox_messages); an older drainer may run the purge first. The
    newer drainer then finds each message's first record gone and drops it unpublished, even in clear
    (no sealer: no destroyed key to stop it)."""
    with PostgresStore.from_url(pg_harness.store_url(outbox=1)) as new:
        new.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
        new.commit(B, 1, 0, 0, b"b", minutes(B, 0, 1))
        with pg_harness.connect() as older:  # its erasure of A, then its drainer's purge, done
            for table in ("records_activity", "records_heart", "records_sleep"):
                older.execute(
                    sql.SQL("DELETE FROM {} WHERE device = %s").format(sql.Identifier(table)),
                    (device_key(A),),
                )
            older.execute("INSERT INTO outbox (device) VALUES (%s)", (device_key(A),))
            older.execute("DELETE FROM outbox WHERE device = %s", (device_key(A),))
        rows = new.outbox_take(100)
        assert [(r.device, r.records) for r in rows] == [(device_key(B), 1)]
        with pg_harness.connect() as conn:  # A's dead entry deleted at the take
            assert conn.execute("SELECT device FROM outbox_messages ORDER BY id").fetchall() == [
                (device_key(B),)
            ]
        assert new.outbox_done([r.id for r in rows]) == 1


def test_the_registry_is_read_in_one_pass_right_after_a_bulk_enrolment(pg_harness: PostgresHarness) -> None:
    """30,000 devices enrolled in one write and read at once, before any ANALYZE (autovacuum has not run
    yet, or is off): the planner has no statistics. The whole-registry read and a delta still take one
    pass each. The consent query used to join each decision to its family's max(seq), which such a
    planner nested over both tables (~10^9 comparisons here: minutes; at 100,000 devices it ran 19
    minutes before it was stopped)."""
    with pg_harness.new_store() as store:
        store.registry_apply(fleet_ops(30_000))
        started = time.monotonic()
        snapshot = store.registry_snapshot()
        store.registry_apply([RegistryOp("revoke", kind="device", name=f"{7:016x}")])
        delta = store.registry_delta(snapshot)
        took = time.monotonic() - started
    assert len(snapshot.principals) == len(snapshot.consents) == len(snapshot.ownerships) == 30_000
    assert delta is not None and [p.state for p in delta.rows.principals] == ["revoked"]
    assert len(delta.rows.consents) == len(delta.rows.ownerships) == 1
    assert took < 30, f"{took:.1f} s"  # a hang bound: ~0.5 s on the 2-core box


def test_every_registry_change_is_notified_at_its_commit_and_a_lost_listener_falls_back_to_polling(
    pg_harness: PostgresHarness,
) -> None:
    """`Store.registry_listener`: a version bump by any writer (here another store object, as another
    gateway) wakes the listener at its commit; a write that bumps no version (last-seen times) wakes
    nothing; a burst is taken in one wake. A listening connection cut under it (`pg_terminate_backend`)
    answers True after the timeout, as a poll would, and the next wait listens again."""
    other_schema = pg_harness.fresh_database()

    async def scenario(store: PostgresStore, writer: PostgresStore, elsewhere: PostgresStore) -> dict:
        listener = store.registry_listener()
        out: dict = {}
        try:
            out["quiet"] = await listener.wait(0.3)  # connects and listens; nothing changes

            async def change_in(s: PostgresStore, ops: list[RegistryOp]) -> None:
                await asyncio.sleep(0.2)
                await asyncio.to_thread(s.registry_apply, ops)

            started = time.monotonic()
            writing = asyncio.ensure_future(
                change_in(writer, [RegistryOp("principal", kind="device", name=f"{A:016x}")])
            )
            out["notified"] = await listener.wait(30)
            out["took"] = time.monotonic() - started
            await writing
            seen = [RegistryOp("seen", kind="device", name=f"{A:016x}", time_us=1)]
            writing = asyncio.ensure_future(change_in(writer, seen))  # no version bump: no notice
            out["seen"] = await listener.wait(0.6)
            await writing
            writing = asyncio.ensure_future(  # another schema of the same database: another channel
                change_in(elsewhere, [RegistryOp("principal", kind="device", name=f"{B:016x}")])
            )
            out["other_schema"] = await listener.wait(0.6)
            await writing
            for name in (B, C):  # a burst: two commits, one wake
                await asyncio.to_thread(
                    writer.registry_apply, [RegistryOp("principal", kind="device", name=f"{name:016x}")]
                )
            out["burst"] = [await listener.wait(0.3), await listener.wait(0.3)]

            with pg_harness.connect() as admin:  # the listening connection cut
                admin.execute(
                    "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                    "WHERE query LIKE %s AND pid <> pg_backend_pid()",
                    (f"LISTEN%{listener.channel}%",),
                )
            started = time.monotonic()
            out["lost"] = await listener.wait(0.3)
            out["lost_took"] = time.monotonic() - started
            await listener.wait(0.3)  # listens again (on a new connection) ...
            revoke = [RegistryOp("revoke", kind="device", name=f"{A:016x}")]
            writing = asyncio.ensure_future(change_in(writer, revoke))
            out["again"] = await listener.wait(30)  # ... and is woken again
            await writing
        finally:
            await listener.close()
            await listener.close()  # twice: safe
        return out

    with pg_harness.new_store() as store, pg_harness.new_store() as writer, other_schema() as elsewhere:
        out = asyncio.run(asyncio.wait_for(scenario(store, writer, elsewhere), 120))
    assert out["quiet"] is False
    assert out["notified"] is True and out["took"] < 5, out  # at the commit, ~0.2 s in; not a poll
    assert out["seen"] is False and out["other_schema"] is False, out
    assert out["burst"] == [True, False], out
    assert out["lost"] is True and out["lost_took"] >= 0.3, out
    assert out["again"] is True, out
