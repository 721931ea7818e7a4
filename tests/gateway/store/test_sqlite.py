"""The SQLite store: the store contract on a file in tmp_path, plus what only SQLite has (URLs, pragmas,
a full disk, what erasure leaves in the files)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from decoder.features import device_key
from gateway.privacy.sealing import KeySealer, open_sealer
from gateway.store import (
    DeviceRow,
    SchemaVersionError,
    SqliteStore,
    StoreUnavailable,
    open_store,
    store_for_url,
)
from gateway.store.base import RegistryOp, merge_registry
from gateway.store.sqlite import MIGRATIONS
from gateway.stream.base import messages_of, records_of
from tests.gateway.gatewaykit import REPO

from .contract import A, B, C, OutboxContract, StoreContract, everything, minutes

BUSY_MS = 100


class _NewerSqliteStore(SqliteStore):
    """The store as a later bandgate would ship it: one migration more."""

    migrations = (*MIGRATIONS, ("ALTER TABLE devices ADD COLUMN firmware TEXT",))


class SqliteHarness:
    def __init__(self, tmp_path: Path, sealer: KeySealer | None = None):
        self.dir = tmp_path
        self.path = tmp_path / "bandgate.db"
        self.sealer = sealer
        self._databases = 0

    def new_store(self) -> SqliteStore:
        return SqliteStore(self.path, busy_timeout_ms=BUSY_MS, sealer=self.sealer)

    def fresh_database(self) -> Callable[[], SqliteStore]:
        self._databases += 1
        path = self.dir / f"fresh-{self._databases}.db"
        return lambda: SqliteStore(path, busy_timeout_ms=BUSY_MS, sealer=self.sealer)

    def outbox_store(self) -> SqliteStore:
        return SqliteStore(self.path, busy_timeout_ms=BUSY_MS, sealer=self.sealer, outbox=True)

    def newer_store(self) -> SqliteStore:
        return _NewerSqliteStore(self.path, busy_timeout_ms=BUSY_MS, sealer=self.sealer)

    def schema_version(self) -> int:
        return len(MIGRATIONS)

    def write_schema_version(self, version: int) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("UPDATE schema_version SET version = ?", (version,))
        finally:
            conn.close()

    @contextmanager
    def exclusive_lock(self) -> Iterator[None]:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()


class TestSqliteContract(StoreContract, OutboxContract):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> SqliteHarness:
        return SqliteHarness(tmp_path)


class TestSealedSqliteContract(StoreContract, OutboxContract):
    """The same promises with encryption at rest: values and state sealed under real data keys."""

    @pytest.fixture
    def harness(self, tmp_path: Path) -> Iterator[SqliteHarness]:
        (tmp_path / "state").mkdir()
        sealer = open_sealer(tmp_path / "state")
        yield SqliteHarness(tmp_path, sealer)
        sealer.keys.close()


# URLs


def test_three_slashes_is_relative_to_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///sub%20dir.db") as store:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "sub dir.db"
        store.commit(A, 1, 0, 0, b"", [])
    assert (tmp_path / "sub dir.db").is_file()


def test_four_slashes_is_absolute(tmp_path: Path) -> None:
    store = store_for_url(f"sqlite:///{tmp_path}/abs.db?busy_timeout_ms=250")
    assert str(tmp_path).startswith("/")
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "abs.db"
    assert store.busy_timeout_ms == 250
    assert not store.path.exists()  # store_for_url does not open


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/x.db",
        "sqlite:///",
        "sqlite:x.db",
        "sqlite:///:memory:",
        "sqlite:///x.db?synchronous=OFF",
        "sqlite:///x.db?busy_timeout_ms=-1",
        "mysql://localhost/bandgate",  # no such store
        "x.db",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        store_for_url(url)


# SQLite specifics


def test_wal_and_full_synchronous(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "p.db") as store:
        conn = store._conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == store.busy_timeout_ms
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    other = sqlite3.connect(tmp_path / "p.db")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    other.close()


def test_the_outbox_drainer_writes_without_fsync_and_commits_stay_full(tmp_path: Path) -> None:
    """outbox_take/outbox_done run at synchronous=NORMAL (losing one only republishes a deduplicated
    message) and leave the connection at FULL for the commits of records."""
    with SqliteStore(tmp_path / "p.db", outbox=True) as store:
        conn = store._conn
        assert conn is not None
        store.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
        rows = store.outbox_take(10)
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        store.outbox_done([r.id for r in rows])
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert store_for_url(f"sqlite:///{tmp_path}/p.db?outbox=1").outbox  # type: ignore[attr-defined]
    assert not store_for_url(f"sqlite:///{tmp_path}/p.db?outbox=0").outbox  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        store_for_url(f"sqlite:///{tmp_path}/p.db?outbox=yes")


_TAKE_AND_DIE = """
import os, sys
from gateway.store.sqlite import SqliteStore
store = SqliteStore(sys.argv[1], outbox=True)
store.open()
print(len(store.outbox_take(10)), flush=True)
os.kill(os.getpid(), 9)  # holding the outbox: no close
"""


def test_one_drainer_at_a_time_takes_a_files_outbox(tmp_path: Path) -> None:
    """Two store objects on one file (two serving processes, say): the first to take drains, the
    other's takes are empty (they would publish the same entries) until the first closes, or dies."""
    path = tmp_path / "p.db"
    with SqliteStore(path, outbox=True) as first, SqliteStore(path, outbox=True) as second:
        first.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
        (page,) = first.outbox_take(10)
        first.commit(B, 1, 0, 0, b"b", minutes(B, 0, 1))
        assert second.outbox_take(10) == []
        assert [r.id for r in first.outbox_take(10)] == [page.id, page.id + 1]  # still the first's
        first.close()
        assert sorted(r.records for r in second.outbox_take(10)) == [1, 2]
    killed = subprocess.run(
        [sys.executable, "-c", _TAKE_AND_DIE, str(path)],
        capture_output=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert killed.returncode == -9 and killed.stdout.split() == [b"2"], killed.stderr.decode()[-2000:]
    with SqliteStore(path, outbox=True) as after:  # the kernel dropped the dead process's lock
        assert len(after.outbox_take(10)) == 2


def test_full_disk_is_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "full.db") as store:
        store.commit(A, 1, 0, 0, b"s0", minutes(A, 0, 2))
        before = everything(store)
        conn = store._conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL, not a mock
        big = minutes(A, 2, 400)
        with pytest.raises(StoreUnavailable, match="full"):
            store.commit(A, 1, 1, 1, b"s1" * 10_000, big)
        assert store.device(A) == DeviceRow(A, 1, 0, b"s0")
        assert everything(store) == before
        conn.execute(f"PRAGMA max_page_count = {2**30}")
        assert store.commit(A, 1, 1, 1, b"s1", big).high_water == 1
        assert len(everything(store)) == 2 + 400


def test_erasure_leaves_no_trace_in_the_files(tmp_path: Path) -> None:
    path = tmp_path / "erase.db"
    marker = "ERASE-ME-7f3a"
    records = minutes(A, 0, 50)
    for r in records:
        r["values"]["tag"] = marker
    with SqliteStore(path) as store:
        store.commit(A, 1, 0, 0, marker.encode() * 10, records)
        store.commit(B, 1, 0, 0, b"keep", minutes(B, 0, 5))
    # closing checkpointed the WAL: the device is in the main file's pages now, not only in the WAL
    assert marker.encode() in path.read_bytes() and device_key(A).encode() in path.read_bytes()
    with SqliteStore(path) as store:
        store.commit(B, 1, 1, 1, b"keep", minutes(B, 5, 1))
        store.erase_device(A)
        for p in tmp_path.iterdir():
            if p.name.startswith("erase.db"):
                data = p.read_bytes()
                assert marker.encode() not in data, p.name
                assert device_key(A).encode() not in data, p.name
        assert store.device(B) == DeviceRow(B, 1, 1, b"keep")


def test_a_foreign_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaVersionError, match="not a bandgate database"):
        SqliteStore(path).open()
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["notes"]
    conn.close()


def test_commit_is_refused_while_an_export_is_open_on_the_same_object(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "x.db") as store:
        store.commit(A, 1, 0, 0, b"", minutes(A, 0, 3))
        export = store.export_device(A)
        next(export)
        with pytest.raises(Exception, match="export_device"):
            store.commit(A, 1, 1, 1, b"", [])
        assert len(list(export)) == 3
        assert store.commit(A, 1, 1, 1, b"", []).high_water == 1


def test_open_twice_keeps_one_connection(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "x.db")
    store.open()
    conn = store._conn
    store.open()
    assert store._conn is conn
    store.close()
    assert store._conn is None


class _TwoAheadSqliteStore(SqliteStore):
    migrations = (
        *MIGRATIONS,
        ("ALTER TABLE devices ADD COLUMN firmware TEXT",),
        ("CREATE TABLE future (device TEXT PRIMARY KEY)", "INSERT INTO future SELECT device FROM devices"),
    )


@pytest.mark.parametrize("start", ["empty", "current"])
def test_every_pending_migration_runs_in_order(tmp_path: Path, start: str) -> None:
    path = tmp_path / "m.db"
    if start == "current":
        with SqliteStore(path) as store:
            store.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
    with _TwoAheadSqliteStore(path) as store:
        assert store.schema_version == len(MIGRATIONS) + 2
        if start == "current":
            assert store.device(A) == DeviceRow(A, 1, 0, b"a")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS) + 2,)]
    assert "firmware" in [r[1] for r in conn.execute("PRAGMA table_info(devices)")]
    want = [(device_key(A),)] if start == "current" else []
    assert conn.execute("SELECT device FROM future").fetchall() == want
    conn.close()


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with SqliteStore(path) as store:
        store.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))

    class Broken(SqliteStore):
        migrations = (*MIGRATIONS, ("ALTER TABLE devices ADD COLUMN firmware TEXT", "SELECT * FROM missing"))

    with pytest.raises(Exception, match="missing"):
        Broken(path).open()
    with SqliteStore(path) as store:  # still the current version, with its data, without the column
        assert store.device(A) == DeviceRow(A, 1, 0, b"a")
        assert store._conn is not None
        assert "firmware" not in [r[1] for r in store._conn.execute("PRAGMA table_info(devices)")]


def test_closing_under_a_half_read_export(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "x.db")
    store.open()
    store.commit(A, 1, 0, 0, b"", minutes(A, 0, 3))
    export = store.export_device(A)
    next(export)
    store.close()
    export.close()  # its cleanup meets a closed connection quietly
    with SqliteStore(tmp_path / "x.db") as again:
        assert len(everything(again)) == 3


# encryption at rest


@pytest.fixture
def sealer(tmp_path: Path) -> Iterator[KeySealer]:
    (tmp_path / "state").mkdir()
    s = open_sealer(tmp_path / "state")
    yield s
    s.keys.close()


def test_sealed_values_and_state_are_not_in_the_file_and_come_back(tmp_path: Path, sealer: KeySealer) -> None:
    path = tmp_path / "sealed.db"
    sentinel = "SENTINEL-4c1d"
    records = minutes(A, 0, 20)
    for r in records:
        r["values"]["tag"] = sentinel
    state = b"STATE-" + sentinel.encode() * 20
    with SqliteStore(path, sealer=sealer) as store:
        store.commit(A, 1, 0, 0, state, records)
        assert [r for _, r in everything(store)] == records
        assert store.device(A) == DeviceRow(A, 1, 0, state)
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert sentinel.encode() not in files and b"STATE-" not in files
    # without a sealer, sealed rows are refused, never returned as bytes
    with SqliteStore(path) as plain, pytest.raises(Exception, match="no sealer"):
        everything(plain)


def test_a_ciphertext_moved_to_another_row_is_reported_not_served(
    tmp_path: Path, sealer: KeySealer, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sealed.db"
    with SqliteStore(path, sealer=sealer) as store:
        store.commit(A, 1, 0, 0, b"a", minutes(A, 0, 2))
        store.commit(B, 1, 0, 0, b"b", minutes(B, 0, 2))
    conn = sqlite3.connect(path)
    (a_value,) = conn.execute(
        "SELECT value FROM records_activity WHERE device = ? ORDER BY cursor LIMIT 1", (device_key(A),)
    ).fetchone()
    with conn:  # A's first value copied over B's first, and over A's own second minute
        conn.execute(
            "UPDATE records_activity SET value = ? WHERE cursor IN "
            "(SELECT min(cursor) FROM records_activity WHERE device = ?)",
            (a_value, device_key(B)),
        )
        conn.execute(
            "UPDATE records_activity SET value = ? WHERE cursor = "
            "(SELECT max(cursor) FROM records_activity WHERE device = ?)",
            (a_value, device_key(A)),
        )
    conn.close()
    with SqliteStore(path, sealer=sealer) as store:
        served = [r for _, r in everything(store)]
        assert served == minutes(A, 0, 1) + minutes(B, 1, 1)  # the moved values are not served
        assert store.unreadable == 2
    reported = [
        r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "record_unreadable"
    ]
    assert sorted(f["device"] for f in reported) == sorted([device_key(A), device_key(B)])
    assert all("Tampered" in f["reason"] for f in reported)


def test_after_the_key_is_destroyed_nothing_of_the_device_opens(tmp_path: Path, sealer: KeySealer) -> None:
    path = tmp_path / "sealed.db"
    with SqliteStore(path, sealer=sealer) as store:
        store.commit(
            A,
            1,
            0,
            0,
            b"a-state",
            minutes(A, 0, 3),
        )
        store.commit(B, 1, 0, 0, b"b-state", minutes(B, 0, 3))
        assert sealer.keys.destroy(device_key(A)) == 1
        assert [r["device"] for _, r in everything(store)] == [device_key(B)] * 3
        assert store.device(A) == DeviceRow(A, 1, 0, b"")  # its state does not open: a fresh start
        assert store.device(B) == DeviceRow(B, 1, 0, b"b-state")


def test_rows_written_in_clear_before_encryption_stay_readable(tmp_path: Path, sealer: KeySealer) -> None:
    path = tmp_path / "mixed.db"
    with SqliteStore(path) as plain:
        plain.commit(A, 1, 0, 0, b"old", minutes(A, 0, 2))
    with SqliteStore(path, sealer=sealer) as store:
        store.commit(A, 1, 1, 1, b"new", minutes(A, 2, 2))
        assert [r for _, r in everything(store)] == minutes(A, 0, 4)
        assert store.device(A) == DeviceRow(A, 1, 1, b"new")


class _Version8(SqliteStore):
    """The store as it was before message entries: record entries naming their batch (migration 8)."""

    migrations = MIGRATIONS[:8]


def test_record_entries_of_an_older_gateway_drain_after_the_upgrade(
    tmp_path: Path, sealer: KeySealer
) -> None:
    """Migration 9 rebuilds the outbox: an older gateway's record entries (with and without a batch) and
    purge entries keep their ids, order and taken time, drain as before (a batch and family a message,
    its ID its first record's), and new commits write message entries after them with higher ids."""
    path = tmp_path / "up.db"
    with _Version8(path, sealer=sealer) as old:
        first = old.commit(A, 1, 0, 0, b"a", [*minutes(A, 0, 2), *minutes(A, 0, 1, "heart")])
        lone = old.commit(B, 1, 0, 0, b"b", minutes(B, 0, 1))
        conn = old._connection()
        with conn:
            batch = first.cursors[0]
            conn.executemany(
                "INSERT INTO outbox (cursor, batch, taken_us) VALUES (?, ?, ?)",
                [(c, batch, 7) for c in first.cursors],
            )
            conn.execute("INSERT INTO outbox (cursor) VALUES (?)", (lone.cursors[0],))  # before batches
            conn.execute("INSERT INTO outbox (purge_device) VALUES (?)", (device_key(C),))
            conn.execute("INSERT INTO outbox (purge_device) VALUES ('gone')")
            conn.execute("DELETE FROM outbox WHERE purge_device = 'gone'")  # the high mark is above
    with SqliteStore(path, sealer=sealer, outbox=True) as new:
        new.commit(A, 1, 1, 1, b"a", minutes(A, 5, 2))
        rows = new.outbox_take(100)
        assert [(r.cursor, r.batch) for r in rows[:4]] == [
            *((c, batch) for c in first.cursors),
            (lone.cursors[0], None),
        ]
        assert rows[4].is_purge and rows[4].device == device_key(C)
        assert rows[5].message is not None and rows[5].records == 2 and rows[5].id > rows[4].id + 1
        assert [r.taken_us for r in rows[:3]] == [7, 7, 7]
        messages = messages_of(rows)
        assert [(m.family, m.device, m.record_count) for m in messages] == [
            ("steps", device_key(A), 2),
            ("heart", device_key(A), 1),
            ("steps", device_key(B), 1),
            ("steps", device_key(A), 2),
        ]
        assert messages[0].msg_id == f"{device_key(A)}/steps/{minutes(A, 0, 1)[0]['start_us']}/-"
        published = [(r["cursor"], r["start_us"]) for m in messages for r in records_of(m.payload)]
        assert published == [(c, r["start_us"]) for c, r in everything(new)]
        assert new.outbox_done([r.id for r in rows]) == len(rows) and new.outbox_depth() == 0


def test_outbox_messages_are_sealed_in_the_file_and_shredded_with_the_key(
    tmp_path: Path, sealer: KeySealer
) -> None:
    """A message row waiting in the outbox holds its records sealed with the device's data key: no value
    in the file while it waits, and once the key is destroyed the row never opens, so it is dropped at
    the take and nothing of the device is published."""
    path = tmp_path / "sealed.db"
    sentinel = "SENTINEL-9e2f"
    records = minutes(A, 0, 20)
    for r in records:
        r["values"]["tag"] = sentinel
    with SqliteStore(path, sealer=sealer, outbox=True) as store:
        store.commit(A, 1, 0, 0, b"a", records)
        store.commit(B, 1, 0, 0, b"b", minutes(B, 0, 2))
        files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
        assert sentinel.encode() not in files and store.outbox_depth() == 22
        assert sealer.keys.destroy(device_key(A)) == 1
        rows = store.outbox_take(10)
        assert [(r.device, r.records) for r in rows] == [(device_key(B), 2)]
        assert store.outbox_depth() == 2  # A's message was dropped, not left to block the outbox


def test_a_registry_change_written_without_the_log_makes_the_delta_a_full_read(tmp_path: Path) -> None:
    """A gateway from before the change log (a rolling upgrade) revokes a device by bumping the version
    and writing no log entry: a newer gateway's delta must not pass that change by, so there is none."""
    dev = device_key(A)
    with SqliteStore(tmp_path / "gw.db") as store:
        store.registry_apply([RegistryOp("principal", kind="device", name=dev)])
        held = store.registry_snapshot()
        conn = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)
        try:  # what the older gateway's registry_apply writes for a revocation
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE principals SET state = 'revoked' WHERE kind = 'device' AND name = ?", (dev,))
            conn.execute("UPDATE registry_version SET version = version + 1")
            conn.execute("COMMIT")
        finally:
            conn.close()
        assert store.registry_delta(held) is None
        store.registry_apply([RegistryOp("principal", kind="relay", name="r1")])  # a newer writer, logged
        assert store.registry_delta(held) is None  # the unlogged version is still missing
        full = store.registry_snapshot()
        assert {(p.name, p.state) for p in full.principals} == {(dev, "revoked"), ("r1", "active")}
        delta = store.registry_delta(full)
        assert delta is not None and merge_registry(full, delta) == full
