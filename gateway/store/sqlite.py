"""The embedded store: one SQLite file in WAL mode, `sqlite:///relative.db` or `sqlite:////abs/path.db`.

Durability: WAL with `synchronous=FULL`, so every commit fsyncs the WAL before it returns and an acked
batch survives a power cut. WAL with NORMAL syncs only at checkpoints: the last commits before a power
cut would vanish while their bands had already dropped them. docs/storage.md has the measured cost.

Threads: an object owns one connection and is not thread-safe; use it from one thread at a time (the
gateway's single writer thread; it may be created on another thread). Other threads and processes open
their own `SqliteStore` on the same file: WAL lets them read while the writer writes, and a second
writer waits up to `busy_timeout_ms`, then gets `StoreUnavailable`.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, unquote

from decoder.records import device_key
from gateway.filelock import try_flock
from gateway.store.base import (
    FAMILY_CLASS,
    MAX_DELTA_SUBJECTS,
    REGISTRY_CHANGES_KEPT,
    UNOWNED,
    AuditCheckpoint,
    AuditConflict,
    AuditRow,
    CommitItem,
    CommitResult,
    ConsentRow,
    CredentialRow,
    DeviceRow,
    GrantRow,
    GuardianRow,
    OutboxRow,
    OwnershipRow,
    PrincipalRow,
    PrivacyHistory,
    RegistryDelta,
    RegistryOp,
    RegistrySnapshot,
    SchemaVersionError,
    SealedRow,
    Sealer,
    SequenceError,
    Store,
    StoreError,
    StoreUnavailable,
    Unreadable,
    change_entries,
    change_log_whole,
    check_principal,
    check_registry_op,
    check_sequence,
    names_by_kind,
    op_subjects,
    read_privacy_history,
    subject,
)
from gateway.store.rows import (
    RECORD_TABLES,
    TABLE_OF,
    Prepared,
    check_device_id,
    encode,
    message_rows,
    open_message,
    open_record,
    outbox_page,
    pack_record,
    packed_of,
    rows_of,
    token_decision,
)

log = logging.getLogger("bandgate.store")

DEFAULT_BUSY_TIMEOUT_MS = 2000  # a backup or an erasure in another process is short; the band retries later
PURGE_CHUNK = 1000  # records an erasure or retention transaction deletes: a writer waits one chunk at most
# The pause after each chunk: SQLite's busy handler keeps no queue, so a deleter that takes the lock again
# at once starves the compute workers' commits (measured: ack p99 424 ms with 5,000-row chunks and no
# pause, 60 ms with 1,000 and 5 ms, the erasure of 100k rows 1.6 s).
PURGE_PAUSE_S = 0.005

# One entry a schema version, applied in order, each statement in the same transaction as the version bump.
# Append, never edit: a file at version n has run exactly MIGRATIONS[:n].
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # devices and boots are keyed by the records' 16-hex device name: a u64 does not fit SQLite's int64
        """CREATE TABLE devices (
            device TEXT PRIMARY KEY,
            boot_id INTEGER NOT NULL,
            state BLOB NOT NULL,
            updated_us INTEGER NOT NULL
        ) WITHOUT ROWID""",
        # high-water per boot, not per device, so a late batch of an earlier boot is still a duplicate
        """CREATE TABLE boots (
            device TEXT NOT NULL,
            boot_id INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            updated_us INTEGER NOT NULL,
            PRIMARY KEY (device, boot_id)
        ) WITHOUT ROWID""",
        # AUTOINCREMENT: a cursor is never reused, even after the newest records are erased or purged.
        # No column can hold samples: values is a flat JSON object of scalars (base.check_records).
        """CREATE TABLE records (
            cursor INTEGER PRIMARY KEY AUTOINCREMENT,
            device TEXT NOT NULL,
            family TEXT NOT NULL,
            start_us INTEGER NOT NULL,
            duration_s INTEGER NOT NULL,
            algo TEXT NOT NULL,
            values_json TEXT NOT NULL,
            UNIQUE (device, family, start_us)
        )""",
        "CREATE INDEX records_device ON records (device)",  # (device, cursor): subscribe and erase by device
        "CREATE INDEX records_start ON records (start_us)",  # retention
    ),
    (
        # The registry (gateway/security): who may connect, for which devices, with which grants.
        """CREATE TABLE principals (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            state TEXT NOT NULL,
            created_us INTEGER NOT NULL,
            updated_us INTEGER NOT NULL,
            last_seen_us INTEGER,
            PRIMARY KEY (kind, name)
        ) WITHOUT ROWID""",
        # A token credential's id is its SHA-256: the token itself is never stored.
        """CREATE TABLE credentials (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            serial TEXT NOT NULL,
            not_after_us INTEGER NOT NULL,
            state TEXT NOT NULL,
            created_us INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX credentials_principal ON credentials (kind, name)",
        """CREATE TABLE bindings (
            relay TEXT NOT NULL,
            device TEXT NOT NULL,
            created_us INTEGER NOT NULL,
            PRIMARY KEY (relay, device)
        ) WITHOUT ROWID""",
        # devices: '' for every device, else space-separated device names
        """CREATE TABLE grants (
            consumer TEXT NOT NULL,
            family TEXT NOT NULL,
            operation TEXT NOT NULL,
            devices TEXT NOT NULL,
            created_us INTEGER NOT NULL,
            PRIMARY KEY (consumer, family, operation)
        ) WITHOUT ROWID""",
        "CREATE TABLE registry_version (version INTEGER NOT NULL)",
        "INSERT INTO registry_version (version) VALUES (0)",
        # Append-only, hash-chained: seq is given by the audit log, never by SQLite, so a gap shows.
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            time_us INTEGER NOT NULL,
            entry TEXT NOT NULL,
            mac TEXT NOT NULL
        )""",
    ),
    (
        # The privacy control plane (gateway/privacy): whose a device's data is now, what its owner
        # consents to, a minor's guardian, and the owner's profile and TOTP secret, sealed with the
        # ownership's data key (the store never sees them in clear).
        """CREATE TABLE ownerships (
            device TEXT NOT NULL,
            ownership TEXT NOT NULL,
            started_us INTEGER NOT NULL,
            ended_us INTEGER,
            PRIMARY KEY (device, ownership)
        ) WITHOUT ROWID""",
        "CREATE UNIQUE INDEX ownerships_current ON ownerships (device) WHERE ended_us IS NULL",
        # every decision is kept (export shows them); the latest per family is in force
        """CREATE TABLE consent (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            device TEXT NOT NULL,
            ownership TEXT NOT NULL,
            family TEXT NOT NULL,
            granted INTEGER NOT NULL,
            time_us INTEGER NOT NULL,
            actor TEXT NOT NULL
        )""",
        "CREATE INDEX consent_device ON consent (device, ownership, family, seq)",
        """CREATE TABLE guardians (
            device TEXT NOT NULL,
            ownership TEXT NOT NULL,
            guardian TEXT NOT NULL,
            time_us INTEGER NOT NULL,
            actor TEXT NOT NULL,
            PRIMARY KEY (device, ownership, guardian)
        ) WITHOUT ROWID""",
        """CREATE TABLE profiles (
            device TEXT NOT NULL,
            ownership TEXT NOT NULL,
            version INTEGER NOT NULL,
            sealed BLOB NOT NULL,
            time_us INTEGER NOT NULL,
            PRIMARY KEY (device, ownership, version)
        ) WITHOUT ROWID""",
        """CREATE TABLE totp (
            device TEXT NOT NULL,
            ownership TEXT NOT NULL,
            sealed BLOB NOT NULL,
            last_step INTEGER NOT NULL,
            time_us INTEGER NOT NULL,
            PRIMARY KEY (device, ownership)
        ) WITHOUT ROWID""",
    ),
    (
        # Records by sensitivity class (base.FAMILY_CLASS): activity, heart, sleep each in a table of its
        # own, so a database grant can separate health data; one cursor sequence runs across them (the
        # next one to hand out is in record_cursor), so `tail --from` resumes exactly. `value` holds the
        # record's values sealed under its device's and ownership's data key (bytes), or, for rows
        # written before encryption at rest or by a store without a sealer, their JSON (text).
        "CREATE TABLE record_cursor (next INTEGER NOT NULL)",
        "INSERT INTO record_cursor (next) "
        "VALUES (coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'records'), 0) + 1)",
        *(
            statement
            for cls, families in (
                ("activity", "'steps', 'activity', 'wear', 'distance'"),
                ("heart", "'heart', 'day'"),
                ("sleep", "'sleep', 'night'"),
            )
            for statement in (
                f"""CREATE TABLE records_{cls} (
                    cursor INTEGER PRIMARY KEY,
                    device TEXT NOT NULL,
                    ownership TEXT NOT NULL,
                    family TEXT NOT NULL,
                    start_us INTEGER NOT NULL,
                    duration_s INTEGER NOT NULL,
                    algo TEXT NOT NULL,
                    value BLOB NOT NULL,
                    UNIQUE (device, family, start_us)
                )""",
                f"CREATE INDEX records_{cls}_device ON records_{cls} (device, ownership)",
                f"CREATE INDEX records_{cls}_start ON records_{cls} (start_us)",
                f"INSERT INTO records_{cls} "
                "(cursor, device, ownership, family, start_us, duration_s, algo, value) "
                "SELECT cursor, device, '', family, start_us, duration_s, algo, values_json FROM records "
                f"WHERE family IN ({families})",
            )
        ),
        "DROP TABLE records",
        # whose the state is: it is sealed under that ownership's key (a new owner starts afresh)
        "ALTER TABLE devices ADD COLUMN ownership TEXT NOT NULL DEFAULT ''",
        # An erased device's boots and their high-water, under a keyed pseudonym of its ID (the one
        # residue erasure leaves): a band resending batches from before the erasure gets them acked and
        # dropped.
        """CREATE TABLE tombstones (
            pseudonym TEXT NOT NULL,
            boot_id INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            erased_us INTEGER NOT NULL,
            PRIMARY KEY (pseudonym, boot_id)
        ) WITHOUT ROWID""",
    ),
    (
        # The audit log is kept by segment (gateway/security/audit.py): the head (last seq and MAC) of each
        # closed segment, so old segments can be dropped and the entries kept still verify from here.
        """CREATE TABLE audit_segments (
            seq INTEGER PRIMARY KEY,
            mac TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            first_time_us INTEGER NOT NULL,
            last_time_us INTEGER NOT NULL
        )""",
    ),
    (
        # The transactional outbox of the feature stream (gateway/stream): an entry per record to publish,
        # written in the record's own transaction, naming it by cursor (the values stay in the record,
        # sealed), or an erased device whose stream subjects are still to be purged. AUTOINCREMENT: an
        # id is never reused, so a late `outbox_done` of one drainer cannot delete another's new entry.
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            cursor INTEGER UNIQUE,
            purge_device TEXT,
            taken_us INTEGER,
            CHECK ((cursor IS NULL) != (purge_device IS NULL))
        )""",
    ),
    (
        # Per-device rate limits shared by every process on the file (`take_tokens`): a token bucket
        # per device and limit, so a band that reconnects to another process keeps its level.
        """CREATE TABLE device_limits (
            device TEXT NOT NULL,
            bucket TEXT NOT NULL,
            level REAL NOT NULL,
            stamp_us INTEGER NOT NULL,
            PRIMARY KEY (device, bucket)
        ) WITHOUT ROWID""",
    ),
    (
        # The batch an outbox entry came from (the first cursor its commit inserted): the stream publishes
        # a batch's records of one family as one message (gateway/stream/base.py), so which records a
        # message holds is fixed at the commit. NULL in entries written before.
        "ALTER TABLE outbox ADD COLUMN batch INTEGER",
    ),
    (
        # A message entry per batch and family (gateway/store/rows.py: message_rows): the stream message
        # encoded once at the commit and sealed with the device's data key as its records are, with the
        # device, family and first start_us that make its ID, so the drainer opens one token a message
        # instead of one a record, and retention or erasure take the message whole, ID and all. The
        # table is rebuilt because SQLite cannot change a CHECK; the entries kept (record entries of the
        # gateway before, purges) keep their ids and order, and the AUTOINCREMENT high mark is carried
        # over, so no id is used twice. An older gateway refuses the file (its version is newer), so no
        # older drainer ever reads a message entry as a purge.
        """CREATE TABLE outbox_v9 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            cursor INTEGER UNIQUE,
            purge_device TEXT,
            taken_us INTEGER,
            batch INTEGER,
            device TEXT,
            ownership TEXT,
            family TEXT,
            start_us INTEGER,
            records INTEGER,
            message BLOB,
            CHECK ((cursor IS NOT NULL) + (purge_device IS NOT NULL) + (message IS NOT NULL) = 1),
            CHECK (message IS NULL OR (device IS NOT NULL AND ownership IS NOT NULL
                AND family IS NOT NULL AND start_us IS NOT NULL AND records > 0))
        )""",
        "INSERT INTO outbox_v9 (id, cursor, purge_device, taken_us, batch) "
        "SELECT id, cursor, purge_device, taken_us, batch FROM outbox ORDER BY id",
        "DELETE FROM sqlite_sequence WHERE name = 'outbox_v9'",
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'outbox_v9', seq FROM sqlite_sequence "
        "WHERE name = 'outbox'",
        "DROP TABLE outbox",
        "ALTER TABLE outbox_v9 RENAME TO outbox",
        # erasure deletes a device's message entries: without an index it would read the whole backlog
        "CREATE INDEX outbox_device ON outbox (device) WHERE device IS NOT NULL",
    ),
    (
        # The registry's change log (Store.registry_delta): each registry write's subjects ("kind:name")
        # under the next change numbers (seq, handed out under the write lock, so they are gapless and in
        # commit order) with the version the write left, so a gateway reads the rows of what changed
        # instead of the whole registry. The oldest entries are pruned (base.REGISTRY_CHANGES_KEPT).
        """CREATE TABLE registry_changes (
            seq INTEGER PRIMARY KEY,
            version INTEGER NOT NULL,
            subject TEXT NOT NULL
        )""",
        # a delta reads bindings by device as well as by relay
        "CREATE INDEX bindings_device ON bindings (device)",
    ),
)

_RECORD_COLUMNS = "cursor, device, ownership, family, start_us, duration_s, algo, value"
# as rows.outbox_page reads an entry
_OUTBOX_COLUMNS = (
    "id, purge_device, cursor, taken_us, batch, device, ownership, family, start_us, records, message"
)
_INSERT_MESSAGE = (
    "INSERT INTO outbox (device, ownership, family, start_us, records, message) VALUES (?, ?, ?, ?, ?, ?)"
)
# ON CONFLICT DO NOTHING rather than INSERT OR IGNORE: OR IGNORE would also drop rows that fail NOT NULL
# silently. The first version of a record wins, so a cursor a subscriber has read never changes.
_INSERT_RECORD = {
    table: f"INSERT INTO {table} ({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (device, family, start_us) DO NOTHING"
    for table in RECORD_TABLES.values()
}
_UPSERT_BOOT = (
    "INSERT INTO boots (device, boot_id, last_seq, updated_us) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (device, boot_id) DO UPDATE SET "
    "last_seq = excluded.last_seq, updated_us = excluded.updated_us"
)
_UPSERT_DEVICE = (
    "INSERT INTO devices (device, boot_id, state, updated_us, ownership) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (device) DO UPDATE SET boot_id = excluded.boot_id, state = excluded.state, "
    "updated_us = excluded.updated_us, ownership = excluded.ownership"
)
# Transient conditions: the write did not happen and may succeed later (primary result codes).
_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)


class SqliteStore(Store):
    """Feature records, device state and high-water marks in one SQLite file (see the module docstring)."""

    migrations: tuple[tuple[str, ...], ...] = MIGRATIONS

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        sealer: Sealer | None = None,
        outbox: bool = False,
    ):
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise ValueError("a SQLite store needs a file path (in-memory databases are not durable)")
        if busy_timeout_ms < 0:
            raise ValueError("busy_timeout_ms must be >= 0")
        self.path = Path(path)
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.sealer = sealer  # None: values and state in clear (benchmarks of the cost, tests of other parts)
        # Commits write outbox entries for the feature stream (a gateway with --stream); the flag travels
        # in the URL (`?outbox=1`), so compute worker processes that commit write them too.
        self.outbox = bool(outbox)
        self.unreadable = 0  # sealed values that did not open, skipped (reported in the log)
        self._conn: sqlite3.Connection | None = None
        self._drainer_lock: IO[bytes] | None = None  # held: this object drains the file's outbox

    @classmethod
    def from_url(cls, url: str, sealer: Sealer | None = None) -> SqliteStore:
        """`sqlite:///relative.db` (relative to the working directory now) or `sqlite:////abs/path.db`,
        optionally `?busy_timeout_ms=N` and `outbox=1` (commits write outbox entries for the feature
        stream); anything else is refused, so a typo does not start a gateway."""
        scheme, sep, rest = url.partition("://")
        if scheme != "sqlite" or not sep:
            raise ValueError(f"not a sqlite URL: {url!r}")
        location, _, query = rest.partition("?")
        if not location.startswith("/") or len(location) < 2:
            raise ValueError(f"{url!r}: use sqlite:///relative.db or sqlite:////abs/path.db (no host)")
        options: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            if key == "busy_timeout_ms" and value.isdigit():
                options[key] = int(value)
            elif key == "outbox" and value in ("0", "1"):
                options[key] = value == "1"
            else:
                raise ValueError(
                    f"{url!r}: unknown option {key}={value!r} (only busy_timeout_ms=<int>, outbox=0|1)"
                )
        name = unquote(location[1:])
        if name == ":memory:":
            raise ValueError(f"{url!r}: a SQLite store needs a file (in-memory databases are not durable)")
        return cls(Path(name).absolute(), sealer=sealer, **options)

    def __repr__(self) -> str:
        outbox = ", outbox" if self.outbox else ""
        return f"SqliteStore({str(self.path)!r}, open={self._conn is not None}{outbox})"

    # lifecycle

    def open(self) -> None:
        if self._conn is not None:
            return
        with _errors():
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
            )
        try:
            with _errors():
                conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreError(f"{self.path}: cannot use WAL (journal mode {mode!r})")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA secure_delete = ON")  # erased records are zeroed, not left in free pages
                self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def close(self) -> None:
        lock, self._drainer_lock = self._drainer_lock, None
        if lock is not None:
            lock.close()  # another process's drainer may take the outbox from its next take
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.in_transaction:  # an export abandoned half-way
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        conn.close()

    @property
    def schema_version(self) -> int:
        """This class's schema version: how many migrations it knows."""
        return len(self.migrations)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the file to `schema_version` in one transaction; refuse a newer or foreign file.

        An up-to-date file is only read, so readers can open while the writer holds the write lock.
        """
        if self._stored_version(conn) == self.schema_version:
            return
        with _transaction(conn):
            version = self._stored_version(conn)  # again, under the write lock
            if version is None:
                conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            for statements in self.migrations[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (self.schema_version,))

    def _stored_version(self, conn: sqlite3.Connection) -> int | None:
        """The file's schema version, None for an empty file; raises for a newer or a foreign one."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" not in tables:
            if tables:
                raise SchemaVersionError(f"{self.path}: not a bandgate database (tables {sorted(tables)})")
            return None
        rows = conn.execute("SELECT version FROM schema_version").fetchall()
        if len(rows) != 1:
            raise SchemaVersionError(f"{self.path}: schema_version holds {len(rows)} rows, not one")
        version = int(rows[0][0])
        if version > self.schema_version:
            raise SchemaVersionError(
                f"{self.path}: schema version {version} was written by a newer bandgate; this one knows "
                f"versions up to {self.schema_version} and will not touch it (upgrade bandgate)"
            )
        return version

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self!r} is not open")
        return self._conn

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction on this object's connection: several reads that agree with each other (WAL
        fixes the snapshot at the first read)."""
        conn = self._connection()
        with _errors():
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                with suppress(sqlite3.Error):
                    conn.execute("COMMIT")

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction on this object's connection (the write lock is taken at BEGIN)."""
        conn = self._connection()
        if conn.in_transaction:
            raise StoreError("an export_device iterator is open on this store object: finish or close it")
        return _transaction(conn)

    # the batch path

    def device(self, device_id: int) -> DeviceRow | None:
        check_device_id(device_id)
        with _errors():
            row = (
                self._connection()
                .execute(
                    "SELECT d.boot_id, b.last_seq, d.state, d.ownership FROM devices d "
                    "JOIN boots b ON b.device = d.device AND b.boot_id = d.boot_id WHERE d.device = ?",
                    (device_key(device_id),),
                )
                .fetchone()
            )
        if row is None:
            return None
        return DeviceRow(
            device_id, row[0], row[1], self._open_state(device_key(device_id), row[3], bytes(row[2]))
        )

    def _open_state(self, device: str, ownership: str, state: bytes) -> bytes:
        """The state in clear; b"" (start afresh) when it does not open: a new ownership's key is not the
        one it was sealed under, or the key was destroyed."""
        if self.sealer is None or not state:
            return state
        try:
            return self.sealer.open_state(device, ownership or UNOWNED, state)
        except Unreadable:
            return b""

    def commit(
        self,
        device_id: int,
        boot_id: int,
        first_seq: int,
        last_seq: int,
        state: bytes,
        records: list[dict],
        *,
        allow_gap: bool = False,
    ) -> CommitResult:
        item = CommitItem(device_id, boot_id, first_seq, last_seq, state, records, allow_gap)
        (result,) = self.commit_many([item])
        if isinstance(result, Exception):
            raise result
        return result

    def prepare(self, item: CommitItem) -> CommitItem:
        rows = encode(item, self.sealer)
        packed = [pack_record(r) for r in item.records] if self.outbox else None
        token: list[dict] = []  # the prepared item's records: empty, the rows stand for them
        return replace(
            item, records=token, prepared=Prepared(token, item.device_id, rows, item.ownership, packed)
        )

    def commit_many(self, items: list[CommitItem]) -> list[CommitResult | Exception]:
        """One BEGIN IMMEDIATE … COMMIT (one WAL fsync) for all `items`. An item refused by its sequence
        check is refused before it writes anything, so it needs no savepoint of its own. Any sqlite
        error aborts the group: after an I/O error or a full disk SQLite may already have rolled back the
        whole transaction."""
        results: list[CommitResult | Exception | None] = [None] * len(items)
        prepared: list[tuple[int, CommitItem, list[tuple]]] = []
        packs: dict[int, list[bytes]] = {}
        for i, item in enumerate(items):
            try:
                if self.outbox:
                    packs[i] = packed_of(item)
                prepared.append((i, item, rows_of(item, self.sealer)))
            except ValueError as e:
                results[i] = e
        if prepared:
            now_us = time.time_ns() // 1000
            try:
                with self._write() as conn:
                    latest = _latest_cursor(conn)
                    for i, item, rows in prepared:
                        try:
                            results[i], latest = _apply(
                                conn, item, rows, now_us, latest, self.sealer, packs.get(i)
                            )
                        except SequenceError as e:
                            results[i] = e
                    if _latest_cursor(conn) != latest:  # one check a group that the cursors were right
                        raise StoreError("sqlite: record cursors out of step; the group is rolled back")
            except StoreError as e:  # nothing of the group was written
                for i, _, _ in prepared:
                    results[i] = e
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    # subscribe

    def read_since(
        self,
        cursor: int,
        *,
        families: set[str] | None = None,
        device: str | None = None,
        limit: int = 1000,
        ownership: str | None = None,
    ) -> list[tuple[int, dict]]:
        if limit <= 0:
            raise ValueError("limit must be positive")
        wanted = set(FAMILY_CLASS) if families is None else set(families) & set(FAMILY_CLASS)
        if not wanted:
            return []
        # Each class table's filter; cursor bounds are added per query.
        filters: list[tuple[str, str, list[Any]]] = []
        for table in sorted({TABLE_OF[f] for f in wanted}):
            where, args = "", []
            fams = sorted(f for f in wanted if TABLE_OF[f] == table)
            if len(fams) < sum(1 for v in TABLE_OF.values() if v == table):
                where += f" AND family IN ({', '.join('?' * len(fams))})"
                args += fams
            if device is not None:
                where += " AND device = ?"
                args.append(device)
            if ownership is not None:
                where += " AND ownership = ?"
                args.append(ownership)
            filters.append((table, where, args))
        # A page in two steps: the page's last cursor from the cursors alone (the indexes answer it; no
        # value is read), then exactly the page's rows. One query of whole rows would read up to `limit`
        # rows from every table to keep `limit` of them.
        bound = " UNION ALL ".join(
            f"SELECT * FROM (SELECT cursor FROM {table} WHERE cursor > ?{where} ORDER BY cursor LIMIT ?)"
            for table, where, _ in filters
        )
        bound_query = f"{bound} ORDER BY cursor LIMIT 1 OFFSET ?"
        page_query = (
            " UNION ALL ".join(
                f"SELECT {_RECORD_COLUMNS} FROM {table} WHERE cursor > ? AND cursor <= ?{where}"
                for table, where, _ in filters
            )
            + " ORDER BY cursor"
        )
        out: list[tuple[int, dict]] = []
        while True:
            with _errors():
                conn = self._connection()
                bound_args: list[Any] = []
                for _, _, args in filters:
                    bound_args += [cursor, *args, limit]
                last = conn.execute(bound_query, (*bound_args, limit - 1)).fetchone()
                upper = last[0] if last is not None else 2**63 - 1  # fewer than `limit` left: all of them
                page_args: list[Any] = []
                for _, _, args in filters:
                    page_args += [cursor, upper, *args]
                rows = conn.execute(page_query, page_args).fetchall()
            openers: dict[tuple[str, str], Callable[[str, int, bytes], bytes]] = {}
            for row in rows:
                record = self._record(row, openers)
                if record is not None:
                    out.append((row[0], record))
            # a short page means the end; one shortened by rows that did not open reads on, so a reader
            # that stops at a short page stops at the end only
            if len(rows) < limit or len(out) >= limit:
                return out[:limit]
            cursor = rows[-1][0]

    def _record(
        self, row: tuple, openers: dict[tuple[str, str], Callable[[str, int, bytes], bytes]] | None = None
    ) -> dict | None:
        """A stored row as a record, its values opened; None (counted, logged) if they do not open."""
        record = open_record(row, self.sealer, str(self.path), openers)
        if record is None:
            self.unreadable += 1
        return record

    def latest_cursor(self) -> int:
        with _errors():
            return _latest_cursor(self._connection())

    def ownerships_held(self) -> set[tuple[str, str]]:
        query = " UNION ".join(
            [f"SELECT device, ownership FROM {table}" for table in RECORD_TABLES.values()]
            + ["SELECT device, ownership FROM devices"]
        )
        with _errors():
            return {(device, ownership or "") for device, ownership in self._connection().execute(query)}

    def check_writable(self) -> None:
        with _errors():
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")  # waits up to the busy timeout, as a commit would
            conn.execute("ROLLBACK")

    # privacy and retention

    def export_device(self, device_id: int) -> Iterator[dict]:
        """A summary `{"kind": "device", ...}` (state as bytes), then `{"kind": "record", "cursor", "record"}`
        in time order, all from one snapshot. The snapshot is held until the iterator is exhausted or
        closed, and this object cannot commit meanwhile: export from a store object of its own."""
        check_device_id(device_id)
        conn = self._connection()
        if conn.in_transaction:
            raise StoreError("another export_device iterator is still open on this store object")
        return self._export(conn, device_key(device_id))

    def _export(self, conn: sqlite3.Connection, device: str) -> Iterator[dict]:
        with _errors():
            conn.execute("BEGIN")
            try:
                dev = conn.execute(
                    "SELECT boot_id, state, updated_us, ownership FROM devices WHERE device = ?", (device,)
                ).fetchone()
                boots = conn.execute(
                    "SELECT boot_id, last_seq, updated_us FROM boots WHERE device = ? ORDER BY updated_us",
                    (device,),
                ).fetchall()
                n_records = sum(
                    conn.execute(f"SELECT count(*) FROM {table} WHERE device = ?", (device,)).fetchone()[0]
                    for table in RECORD_TABLES.values()
                )
                if dev is None and not boots and n_records == 0:
                    return
                current = dev[0] if dev is not None else None
                yield {
                    "kind": "device",
                    "device": device,
                    "boot_id": current,
                    "last_seq": next((b[1] for b in boots if b[0] == current), None),
                    "state": self._open_state(device, dev[3], bytes(dev[1])) if dev is not None else None,
                    "updated_us": dev[2] if dev is not None else None,
                    "boots": [{"boot_id": b[0], "last_seq": b[1], "updated_us": b[2]} for b in boots],
                    "records": n_records,
                }
                union = " UNION ALL ".join(
                    f"SELECT {_RECORD_COLUMNS} FROM {table} WHERE device = ?"
                    for table in RECORD_TABLES.values()
                )
                rows = conn.execute(
                    f"{union} ORDER BY start_us, family, cursor", (device,) * len(RECORD_TABLES)
                )
                while batch := rows.fetchmany(1000):
                    openers: dict[tuple[str, str], Callable[[str, int, bytes], bytes]] = {}
                    for row in batch:
                        record = self._record(row, openers)
                        if record is not None:
                            yield {"kind": "record", "cursor": row[0], "record": record}
            finally:
                with suppress(sqlite3.Error):  # includes a connection closed under a half-read export
                    if conn.in_transaction:
                        conn.execute("COMMIT")

    def erase_device(self, device_id: int, ownership: str | None = None) -> int:
        """Records (in chunks of PURGE_CHUNK, each its own transaction, so other devices' commits wait at
        most one chunk), then in one transaction the state and every boot's high-water, leaving a
        tombstone per boot under the device's pseudonym (with a sealer); then the WAL is checkpointed and
        truncated so the old pages leave the disk too (best effort: a reader holding an old snapshot keeps
        them until the next checkpoint). Returns the records deleted; idempotent.

        With `ownership`, only the records stored under it go (a band's owner erases their own data, not
        a previous owner's), and the state only if it is that ownership's."""
        check_device_id(device_id)
        device = device_key(device_id)
        deleted = 0
        scope, args = (
            ("device = ?", (device,))
            if ownership is None
            else ("device = ? AND ownership = ?", (device, ownership))
        )
        for table in RECORD_TABLES.values():
            deleted += self._delete_in_chunks(table, scope, args)
        now_us = time.time_ns() // 1000
        with self._write() as conn:
            if self.sealer is not None:
                pseudonym = self.sealer.pseudonym(device)
                conn.executemany(
                    "INSERT INTO tombstones (pseudonym, boot_id, last_seq, erased_us) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (pseudonym, boot_id) DO UPDATE SET "
                    "last_seq = max(last_seq, excluded.last_seq), erased_us = excluded.erased_us",
                    [
                        (pseudonym, boot_id, last_seq, now_us)
                        for boot_id, last_seq in conn.execute(
                            "SELECT boot_id, last_seq FROM boots WHERE device = ?", (device,)
                        )
                    ],
                )
            conn.execute("DELETE FROM boots WHERE device = ?", (device,))
            conn.execute(f"DELETE FROM devices WHERE {scope}", args)
            conn.execute("DELETE FROM device_limits WHERE device = ?", (device,))
            if self.outbox:  # the drainer purges the device's stream subjects after what it has in flight
                conn.execute(f"DELETE FROM outbox WHERE message IS NOT NULL AND {scope}", args)
                conn.execute("INSERT INTO outbox (purge_device) VALUES (?)", (device,))
        self._checkpoint()
        return deleted

    def _delete_in_chunks(self, table: str, where: str, args: tuple) -> int:
        """DELETE FROM `table` WHERE `where`, PURGE_CHUNK rows a transaction with a pause between, so a
        writer waits one chunk at most; the rows deleted. Their outbox entries go in the same transaction:
        an erased or expired record is never published afterwards."""
        deleted = 0
        while True:
            with self._write() as conn:
                gone = conn.execute(
                    f"DELETE FROM {table} WHERE cursor IN (SELECT cursor FROM {table} WHERE {where} LIMIT ?) "
                    "RETURNING cursor",
                    (*args, PURGE_CHUNK),
                ).fetchall()
                if gone and conn.execute("SELECT 1 FROM outbox WHERE cursor IS NOT NULL LIMIT 1").fetchone():
                    conn.executemany("DELETE FROM outbox WHERE cursor = ?", gone)
            n = len(gone)
            deleted += n
            if n < PURGE_CHUNK:
                return deleted
            time.sleep(PURGE_PAUSE_S)  # let the waiting writers in

    def purge_before(self, start_us: int, families: Iterable[str] | None = None) -> int:
        """In chunks of PURGE_CHUNK records, each its own transaction, so commits are not held up for
        long; with every family, boots other than a device's current one that were last written before
        `start_us` go too."""
        if families is None:
            scopes = {table: ("", ()) for table in RECORD_TABLES.values()}
        else:
            chosen = sorted(set(families))
            for family in chosen:
                if family not in TABLE_OF:
                    raise ValueError(f"unknown family {family!r}; known {sorted(TABLE_OF)}")
            scopes = {}
            for table in dict.fromkeys(TABLE_OF[f] for f in chosen):
                of_table = tuple(f for f in chosen if TABLE_OF[f] == table)
                scopes[table] = (f" AND family IN ({', '.join('?' * len(of_table))})", of_table)
        total = 0
        for table, (where, args) in scopes.items():
            total += self._delete_in_chunks(table, f"start_us < ?{where}", (start_us, *args))
            # a message entry goes whole with its first record (its ID): of a message that straddles the
            # cut, the later records are not published (they were about to expire too)
            with self._write() as conn:
                conn.execute(
                    f"DELETE FROM outbox WHERE message IS NOT NULL AND start_us < ?{where}"
                    + ("" if where else f" AND family IN ({_families_of(table)})"),
                    (start_us, *args),
                )
        if families is not None:
            return total
        with self._write() as conn:
            conn.execute(
                "DELETE FROM boots WHERE updated_us < ? AND NOT EXISTS (SELECT 1 FROM devices d "
                "WHERE d.device = boots.device AND d.boot_id = boots.boot_id)",
                (start_us,),
            )
        return total

    # the outbox

    def outbox_take(self, limit: int = 500) -> list[OutboxRow]:
        """One write transaction marks the page taken and reads its records; their values are opened
        after it, so the write lock is held for two index lookups a row, not for the decryption. The page
        goes on to the end of its last entry's batch (a batch's entries have consecutive ids: one commit
        writes them).

        One drainer at a time: SQLite's outbox has no leases, so two drainers would publish the same
        entries, and a record taken before an erasure could land after its purge. The first store object
        to take holds an `flock` on `<file>-drainer.lock` until it closes or its process dies, however it
        dies; meanwhile every other object's take (another serving process of `serve --workers`, another
        gateway on the file) is empty, and the next one after that takes over."""
        if limit <= 0:
            raise ValueError("limit must be positive")
        if not self._drains():
            return []
        now_us = time.time_ns() // 1000
        with self._unsynced_write() as conn:
            page = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
            if not page:
                return []
            batch = page[-1][4]
            while batch is not None and len(page) >= limit:  # on, in steps, while the batch goes on
                more = conn.execute(
                    f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT 64",
                    (page[-1][0],),
                ).fetchall()
                rest = list(itertools.takewhile(lambda row: row[4] == batch, more))
                page += rest
                if len(rest) < len(more) or not more:
                    break
            if any(row[3] is None for row in page):
                conn.execute(
                    "UPDATE outbox SET taken_us = ? WHERE id <= ? AND taken_us IS NULL", (now_us, page[-1][0])
                )
            cursors = [row[2] for row in page if row[2] is not None]
            found: dict[int, tuple] = {}
            if cursors:
                # one range a table: a page's cursors are nearly consecutive, and IN (…) of thousands is
                # slower to bind and plan than the few rows of other commits a range passes over
                lo, hi = min(cursors), max(cursors)
                if hi - lo < 2 * len(cursors):
                    where, args = "cursor BETWEEN ? AND ?", [lo, hi]
                else:  # entries far apart (an outbox turned on later, a long backlog): only theirs
                    where, args = f"cursor IN ({', '.join('?' * len(cursors))})", cursors
                for table in RECORD_TABLES.values():
                    sql = f"SELECT {_RECORD_COLUMNS} FROM {table} WHERE {where}"
                    found.update((row[0], row) for row in conn.execute(sql, args))
        openers: dict = {}  # a key a device and ownership for the page, not a lookup a record
        out, dead = outbox_page(
            page,
            found,
            lambda row: self._record(row, openers),
            now_us,
            lambda entry: open_message(entry, self.sealer, str(self.path), openers),
        )
        if dead:
            self.outbox_done(dead)
        return out

    def outbox_drains(self) -> bool:
        return self._drainer_lock is not None

    def _drains(self) -> bool:
        """Whether this object holds the file's drainer lock, taking it if it is free (an open store only:
        a closed one gives it back)."""
        self._connection()
        if self._drainer_lock is None:
            try:
                self._drainer_lock = try_flock(f"{self.path}-drainer.lock")
            except OSError as e:  # no locks on this file system (ENOLCK): a store error, retried
                raise StoreError(f"sqlite: the outbox's drainer lock: {e}") from e
        return self._drainer_lock is not None

    def outbox_done(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        n = 0
        with self._unsynced_write() as conn:
            for at in range(0, len(ids), 10_000):  # under SQLite's limit of bound parameters
                chunk = list(ids[at : at + 10_000])
                marks = ", ".join("?" * len(chunk))
                n += conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk).rowcount
        return n

    @contextmanager
    def _unsynced_write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that does not fsync at its commit (synchronous=NORMAL on this connection for
        its duration): the drainer's marks and deletions need no durability of their own, as losing one
        to a power cut only republishes entries the stream drops as duplicates; and every later commit of
        records fsyncs the WAL, these frames with it. So the drainer adds no fsync to the batch path."""
        conn = self._connection()
        with _errors():
            conn.execute("PRAGMA synchronous = NORMAL")
        try:
            with self._write() as conn:
                yield conn
        finally:
            with suppress(sqlite3.Error):
                conn.execute("PRAGMA synchronous = FULL")

    def outbox_depth(self) -> int:
        with _errors():
            return int(
                self._connection()
                .execute("SELECT coalesce(sum(coalesce(records, 1)), 0) FROM outbox")
                .fetchone()[0]
            )

    def take_tokens(
        self, device_id: int, bucket: str, rate: float, burst: float, need: float, charge: float
    ) -> float:
        check_device_id(device_id)
        device = device_key(device_id)
        now_us = time.time_ns() // 1000
        with _errors(), self._write() as conn:
            row = conn.execute(
                "SELECT level, stamp_us FROM device_limits WHERE device = ? AND bucket = ?", (device, bucket)
            ).fetchone()
            level, stamp_us = (burst, now_us) if row is None else row
            level, wait_s = token_decision(level, (now_us - stamp_us) / 1e6, rate, burst, need, charge)
            conn.execute(
                "INSERT INTO device_limits (device, bucket, level, stamp_us) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (device, bucket) DO UPDATE SET "
                "level = excluded.level, stamp_us = excluded.stamp_us",
                (device, bucket, level, now_us),
            )
        return wait_s

    # registry and audit

    def registry_snapshot(self) -> RegistrySnapshot:
        with self._snapshot() as conn:
            (version,) = conn.execute("SELECT version FROM registry_version").fetchone()
            (changes,) = conn.execute("SELECT coalesce(max(seq), 0) FROM registry_changes").fetchone()
            rows = _registry_rows(conn, None)
        return RegistrySnapshot(int(version), *rows, changes=int(changes))

    def registry_listener(self) -> None:
        """None: the gateways on one file poll its registry version (`Store.registry_listener`)."""
        return None

    def registry_version(self) -> int:
        with _errors():
            return int(self._connection().execute("SELECT version FROM registry_version").fetchone()[0])

    def registry_delta(self, snapshot: RegistrySnapshot) -> RegistryDelta | None:
        with self._snapshot() as conn:
            (version,) = conn.execute("SELECT version FROM registry_version").fetchone()
            (last,) = conn.execute("SELECT coalesce(max(seq), 0) FROM registry_changes").fetchone()
            logged, first = conn.execute(
                "SELECT count(*), min(seq) FROM registry_changes WHERE seq > ?", (snapshot.changes,)
            ).fetchone()
            (versions,) = conn.execute(
                "SELECT count(DISTINCT version) FROM registry_changes WHERE seq > ? AND version > ?",
                (snapshot.changes, snapshot.version),
            ).fetchone()
            if not change_log_whole(snapshot, version, last, logged, first, versions):
                return None
            subjects = frozenset(
                s
                for (s,) in conn.execute(
                    "SELECT DISTINCT subject FROM registry_changes WHERE seq > ? AND subject != '' LIMIT ?",
                    (snapshot.changes, MAX_DELTA_SUBJECTS + 1),
                )
            )
            if len(subjects) > MAX_DELTA_SUBJECTS:
                return None
            rows = _registry_rows(conn, subjects)
        return RegistryDelta(
            subjects, RegistrySnapshot(int(version), *rows, changes=int(last)), since=snapshot.changes
        )

    def registry_apply(
        self,
        ops: Sequence[RegistryOp],
        audit: Sequence[AuditRow] = (),
        checkpoints: Sequence[AuditCheckpoint] = (),
    ) -> int:
        for op in ops:
            check_registry_op(op)
        now_us = time.time_ns() // 1000
        with self._write() as conn:
            if audit:
                last = conn.execute("SELECT max(seq) FROM audit").fetchone()[0] or 0
                if [row.seq for row in audit] != list(range(last + 1, last + 1 + len(audit))):
                    raise AuditConflict(f"audit rows must continue the log at seq {last + 1}")
                conn.executemany(
                    "INSERT INTO audit (seq, time_us, entry, mac) VALUES (?, ?, ?, ?)",
                    [(r.seq, r.time_us, r.entry, r.mac) for r in audit],
                )
            for cp in checkpoints:
                # of a stored entry, after the last checkpoint: its MAC is what the next entry chains to
                before = conn.execute("SELECT max(seq) FROM audit_segments").fetchone()[0] or 0
                row = conn.execute("SELECT mac FROM audit WHERE seq = ?", (cp.seq,)).fetchone()
                if row is None or row[0] != cp.mac or cp.seq <= before or not 0 < cp.first_seq <= cp.seq:
                    raise StoreError(f"checkpoint {cp.seq} is no stored entry after checkpoint {before}")
                conn.execute(
                    "INSERT INTO audit_segments (seq, mac, first_seq, first_time_us, last_time_us) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (cp.seq, cp.mac, cp.first_seq, cp.first_time_us, cp.last_time_us),
                )
            changed, touched = False, set()
            for op in ops:
                changed |= _apply_registry_op(conn, op, now_us, touched)
                touched |= op_subjects(op)
            if changed:
                conn.execute("UPDATE registry_version SET version = version + 1")
            (version,) = conn.execute("SELECT version FROM registry_version").fetchone()
            if touched or changed:
                (last,) = conn.execute("SELECT coalesce(max(seq), 0) FROM registry_changes").fetchone()
                listed, last = change_entries(touched, ops, last)
                erased = [(subject("device", op.device),) for op in ops if op.op == "forget"]
                conn.executemany("DELETE FROM registry_changes WHERE subject = ?", erased)
                conn.executemany(
                    "INSERT INTO registry_changes (seq, version, subject) VALUES (?, ?, ?)",
                    [(last + 1 + i, version, s) for i, s in enumerate(listed)],
                )
                conn.execute(
                    "DELETE FROM registry_changes WHERE seq <= ?",
                    (last + len(listed) - REGISTRY_CHANGES_KEPT,),
                )
        return int(version)

    def privacy_history(self, device: str) -> PrivacyHistory:
        check_principal("device", device)
        with self._snapshot() as conn:
            return read_privacy_history(conn.execute, device, "?")

    def audit_rows(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRow]:
        if limit <= 0:
            raise ValueError("limit must be positive")
        with _errors():
            return [
                AuditRow(*row)
                for row in self._connection().execute(
                    "SELECT seq, time_us, entry, mac FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                )
            ]

    def audit_last(self) -> AuditRow | None:
        with _errors():
            row = (
                self._connection()
                .execute("SELECT seq, time_us, entry, mac FROM audit ORDER BY seq DESC LIMIT 1")
                .fetchone()
            )
        return None if row is None else AuditRow(*row)

    def audit_checkpoints(self, after_seq: int = 0, limit: int = 1000) -> list[AuditCheckpoint]:
        if limit <= 0:
            raise ValueError("limit must be positive")
        with _errors():
            return [
                AuditCheckpoint(*row)
                for row in self._connection().execute(
                    "SELECT seq, mac, first_seq, first_time_us, last_time_us FROM audit_segments "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                )
            ]

    def audit_checkpoint_last(self) -> AuditCheckpoint | None:
        with _errors():
            row = (
                self._connection()
                .execute(
                    "SELECT seq, mac, first_seq, first_time_us, last_time_us FROM audit_segments "
                    "ORDER BY seq DESC LIMIT 1"
                )
                .fetchone()
            )
        return None if row is None else AuditCheckpoint(*row)

    def audit_drop_through(self, seq: int) -> int:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM audit_segments WHERE seq = ?", (seq,)).fetchone() is None:
                raise StoreError(f"audit entry {seq} ends no segment: only whole segments are dropped")
            if seq >= (conn.execute("SELECT max(seq) FROM audit").fetchone()[0] or 0):
                raise StoreError(f"audit entry {seq} is the newest: the log's head is never dropped")
            n = conn.execute("DELETE FROM audit WHERE seq <= ?", (seq,)).rowcount
            conn.execute("DELETE FROM audit_segments WHERE seq < ?", (seq,))
        return n

    def _checkpoint(self) -> None:
        with suppress(sqlite3.Error):
            self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT; on any error ROLLBACK, and sqlite errors become store errors."""
    with _errors():
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise


@contextmanager
def _errors() -> Iterator[None]:
    """Translate sqlite errors: transient ones to StoreUnavailable, the rest to StoreError."""
    try:
        yield
    except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise  # a bug in the caller, not a state of the store
    except sqlite3.Error as e:
        code = getattr(e, "sqlite_errorcode", None)
        name = getattr(e, "sqlite_errorname", "unknown")
        if code is not None and code & 0xFF in _UNAVAILABLE:
            raise StoreUnavailable(f"sqlite: {e} ({name})") from e
        raise StoreError(f"sqlite: {e} ({name})") from e


def _apply(
    conn: sqlite3.Connection,
    item: CommitItem,
    rows: list[tuple],
    now_us: int,
    latest: int,
    sealer: Sealer | None = None,
    packed: list[bytes] | None = None,
) -> tuple[CommitResult, int]:
    """The sequence check, then the writes of one item, inside the caller's transaction; `latest` is
    the newest cursor before it, and the newest after it is returned beside the result. Nothing is
    written before the check, so a `SequenceError` leaves the transaction as it found it. With `packed`
    (the outbox on: the rows' records packed for the stream), a message entry per family inserted.

    An erased device's tombstone counts as its boot's high-water: a batch from before the erasure is a
    duplicate (acked, dropped), whatever the state of the device rows."""
    device = device_key(item.device_id)
    found = conn.execute(
        "SELECT last_seq FROM boots WHERE device = ? AND boot_id = ?", (device, item.boot_id)
    ).fetchone()
    high_water = None if found is None else int(found[0])
    if high_water is None and sealer is not None:
        erased = conn.execute(
            "SELECT last_seq FROM tombstones WHERE pseudonym = ? AND boot_id = ?",
            (sealer.pseudonym(device), item.boot_id),
        ).fetchone()
        if erased is not None and item.last_seq <= int(erased[0]):
            return CommitResult(
                duplicate=True, high_water=int(erased[0]), cursors=(None,) * len(rows)
            ), latest
    if check_sequence(
        high_water, item.device_id, item.boot_id, item.first_seq, item.last_seq, allow_gap=item.allow_gap
    ):
        assert high_water is not None
        return CommitResult(duplicate=True, high_water=high_water, cursors=(None,) * len(rows)), latest
    cursors: tuple[int | None, ...] = ()
    if rows:
        # every row takes the next cursor, in order, whatever table it goes to; a row whose key is stored
        # already (a replay, or a key repeated within the batch) leaves its cursor unused
        first = latest + 1
        by_table: dict[str, list[tuple]] = {}
        for cursor, row in enumerate(rows, first):
            by_table.setdefault(row[0], []).append((cursor, *row[1:]))
        inserted = sum(
            conn.executemany(_INSERT_RECORD[table], batch).rowcount for table, batch in by_table.items()
        )
        latest += len(rows)
        conn.execute("UPDATE record_cursor SET next = ?", (latest + 1,))
        if inserted == len(rows):
            cursors = tuple(range(first, latest + 1))
        else:
            stored: set[int] = set()
            for table in by_table:
                stored.update(
                    c
                    for (c,) in conn.execute(
                        f"SELECT cursor FROM {table} WHERE cursor BETWEEN ? AND ?", (first, latest)
                    )
                )
            cursors = tuple(c if c in stored else None for c in range(first, latest + 1))
        if packed is not None:  # the stream gets what the store got: the first version of each record, once
            conn.executemany(
                _INSERT_MESSAGE, message_rows(device, item.ownership, rows, cursors, packed, sealer)
            )
    ownership = item.ownership
    state = item.state
    if sealer is not None and state:
        state = sealer.seal_state(device, ownership or UNOWNED, state)
    conn.execute(_UPSERT_BOOT, (device, item.boot_id, item.last_seq, now_us))
    conn.execute(_UPSERT_DEVICE, (device, item.boot_id, state, now_us, ownership))
    return CommitResult(duplicate=False, high_water=item.last_seq, cursors=cursors), latest


def _apply_registry_op(conn: sqlite3.Connection, op: RegistryOp, now_us: int, touched: set[str]) -> bool:
    """One checked registry op inside the caller's transaction; whether it changed policy. Into
    `touched`, the subjects it changed that the op does not name (base.op_subjects names the rest)."""
    if op.op == "principal":
        conn.execute(
            "INSERT INTO principals (kind, name, state, created_us, updated_us) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (kind, name) DO UPDATE SET state = excluded.state, updated_us = excluded.updated_us",
            (op.kind, op.name, op.state, now_us, now_us),
        )
    elif op.op == "credential":
        c = op.credential
        assert c is not None
        # an id already stored keeps its owner, whose rows this changes (whoever the op names)
        for kind, name in conn.execute(
            "INSERT INTO credentials (id, kind, name, serial, not_after_us, state, created_us) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET state = excluded.state "
            "RETURNING kind, name",
            (c.id, c.kind, c.name, c.serial, c.not_after_us, c.state, c.created_us or now_us),
        ).fetchall():
            touched.add(subject(kind, name))
    elif op.op == "credential_state":
        for kind, name in conn.execute(
            "UPDATE credentials SET state = ? WHERE id = ? RETURNING kind, name", (op.state, op.name)
        ).fetchall():
            touched.add(subject(kind, name))
    elif op.op == "revoke":
        conn.execute(
            "UPDATE principals SET state = 'revoked', updated_us = ? WHERE kind = ? AND name = ?",
            (now_us, op.kind, op.name),
        )
        conn.execute(
            "UPDATE credentials SET state = 'revoked' WHERE kind = ? AND name = ?", (op.kind, op.name)
        )
    elif op.op == "bind":
        conn.execute(
            "INSERT INTO bindings (relay, device, created_us) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (op.name, op.device, now_us),
        )
    elif op.op == "unbind":
        conn.execute("DELETE FROM bindings WHERE relay = ? AND device = ?", (op.name, op.device))
    elif op.op == "grant":
        g = op.grant
        assert g is not None
        conn.execute(
            "INSERT INTO grants (consumer, family, operation, devices, created_us) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (consumer, family, operation) DO UPDATE SET devices = excluded.devices",
            (g.consumer, g.family, g.operation, " ".join(sorted(set(g.devices))), now_us),
        )
    elif op.op == "ungrant":
        g = op.grant
        assert g is not None
        conn.execute(
            "DELETE FROM grants WHERE consumer = ? AND family = ? AND operation = ?",
            (g.consumer, g.family, g.operation),
        )
    elif op.op == "seen":
        conn.execute(
            "UPDATE principals SET last_seen_us = max(coalesce(last_seen_us, 0), ?) "
            "WHERE kind = ? AND name = ?",
            (op.time_us, op.kind, op.name),
        )
        return False
    elif op.op == "ownership":
        conn.execute(
            "UPDATE ownerships SET ended_us = ? WHERE device = ? AND ended_us IS NULL AND ownership != ?",
            (now_us, op.device, op.ownership),
        )
        conn.execute(
            "INSERT INTO ownerships (device, ownership, started_us) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (op.device, op.ownership, now_us),
        )
    elif op.op == "consent":
        conn.execute(
            "INSERT INTO consent (device, ownership, family, granted, time_us, actor) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (op.device, op.ownership, op.family, int(op.granted), op.time_us or now_us, op.actor),
        )
    elif op.op == "guardian":
        conn.execute(
            "INSERT INTO guardians (device, ownership, guardian, time_us, actor) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (op.device, op.ownership, op.name, op.time_us or now_us, op.actor),
        )
    elif op.op == "unguardian":
        conn.execute(
            "DELETE FROM guardians WHERE device = ? AND ownership = ? AND guardian = ?",
            (op.device, op.ownership, op.name),
        )
    elif op.op == "profile":
        conn.execute(
            "INSERT INTO profiles (device, ownership, version, sealed, time_us) VALUES (?, ?, ?, ?, ?)",
            (op.device, op.ownership, op.version, op.sealed, op.time_us or now_us),
        )
    elif op.op == "totp":
        if op.sealed:
            conn.execute(
                "INSERT INTO totp (device, ownership, sealed, last_step, time_us) VALUES (?, ?, ?, 0, ?) "
                "ON CONFLICT (device, ownership) DO UPDATE SET sealed = excluded.sealed, last_step = 0, "
                "time_us = excluded.time_us",
                (op.device, op.ownership, op.sealed, now_us),
            )
        else:
            conn.execute("DELETE FROM totp WHERE device = ? AND ownership = ?", (op.device, op.ownership))
    elif op.op == "forget":
        # the owner's privacy rows (of one ownership, or all), and the band's identity: its registration,
        # certificates, bindings, and its name in device-narrowed grants (a grant narrowed to it alone goes)
        scope, args = ("device = ?", (op.device,))
        if op.ownership:
            scope, args = "device = ? AND ownership = ?", (op.device, op.ownership)
        for table in ("consent", "guardians", "profiles", "totp", "ownerships"):  # names of ours, no input
            conn.execute(f"DELETE FROM {table} WHERE {scope}", args)
        conn.execute("DELETE FROM principals WHERE kind = 'device' AND name = ?", (op.device,))
        conn.execute("DELETE FROM credentials WHERE kind = 'device' AND name = ?", (op.device,))
        conn.execute("DELETE FROM bindings WHERE device = ?", (op.device,))
        for consumer, family, operation, devices in conn.execute(
            "SELECT consumer, family, operation, devices FROM grants WHERE ' ' || devices || ' ' LIKE ?",
            (f"% {op.device} %",),
        ).fetchall():
            touched.add(subject("consumer", consumer))
            rest = " ".join(d for d in devices.split() if d != op.device)
            if rest:
                conn.execute(
                    "UPDATE grants SET devices = ? WHERE consumer = ? AND family = ? AND operation = ?",
                    (rest, consumer, family, operation),
                )
            else:
                conn.execute(
                    "DELETE FROM grants WHERE consumer = ? AND family = ? AND operation = ?",
                    (consumer, family, operation),
                )
    elif op.op == "totp_used":
        conn.execute(
            "UPDATE totp SET last_step = max(last_step, ?) WHERE device = ? AND ownership = ?",
            (op.version, op.device, op.ownership),
        )
        return False
    return True


def _registry_rows(conn: sqlite3.Connection, subjects: frozenset[str] | None) -> tuple[tuple, ...]:
    """The registry's rows in RegistrySnapshot's order of fields: all of them (`subjects` None), or those
    about `subjects` ("kind:name": a principal's own rows; a binding is about its relay and its device)."""
    names: dict[str, str] = {}  # kind → its names as a JSON array, for json_each
    if subjects is not None:
        names = {k: json.dumps(sorted(v)) for k, v in names_by_kind(subjects).items()}

    def of_each_kind(sql: str) -> Iterator[tuple]:  # `sql` ends in a WHERE clause's first condition
        if subjects is None:
            yield from conn.execute(sql.replace("{where}", ""))
            return
        for kind, listed in names.items():
            yield from conn.execute(
                sql.replace("{where}", "WHERE kind = ? AND name IN (SELECT value FROM json_each(?))"),
                (kind, listed),
            )

    principals = tuple(
        PrincipalRow(*row)
        for row in of_each_kind(
            "SELECT kind, name, state, created_us, updated_us, last_seen_us FROM principals {where} "
            "ORDER BY kind, name"
        )
    )
    credentials = tuple(
        CredentialRow(*row)
        for row in of_each_kind(
            "SELECT id, kind, name, serial, not_after_us, state, created_us FROM credentials {where} "
            "ORDER BY kind, name, created_us"
        )
    )
    if subjects is None:
        bindings = tuple(conn.execute("SELECT relay, device FROM bindings ORDER BY relay, device"))
        grants_sql, grants_args = "", ()
    else:
        bindings = tuple(
            conn.execute(
                "SELECT relay, device FROM bindings WHERE relay IN (SELECT value FROM json_each(?)) UNION "
                "SELECT relay, device FROM bindings WHERE device IN (SELECT value FROM json_each(?)) "
                "ORDER BY relay, device",
                (names["relay"], names["device"]),
            )
        )
        grants_sql, grants_args = "WHERE consumer IN (SELECT value FROM json_each(?)) ", (names["consumer"],)
    grants = tuple(
        GrantRow(c, f, o, tuple(devices.split()))
        for c, f, o, devices in conn.execute(
            f"SELECT consumer, family, operation, devices FROM grants {grants_sql}"
            "ORDER BY consumer, family, operation",
            grants_args,
        )
    )
    return (
        principals,
        credentials,
        tuple((r, d) for r, d in bindings),
        grants,
        *_privacy_snapshot(conn, None if subjects is None else names["device"]),
    )


def _privacy_snapshot(
    conn: sqlite3.Connection, devices: str | None = None
) -> tuple[
    tuple[OwnershipRow, ...],
    tuple[ConsentRow, ...],
    tuple[GuardianRow, ...],
    tuple[SealedRow, ...],
    tuple[SealedRow, ...],
]:
    """Current ownerships and, of those, the latest consent per family, guardians, latest profile, TOTP;
    of every device, or of `devices` only (a JSON array of names)."""
    current = "JOIN ownerships o ON o.device = x.device AND o.ownership = x.ownership AND o.ended_us IS NULL"
    only, args = "", ()
    if devices is not None:
        only, args = " AND x.device IN (SELECT value FROM json_each(?))", (devices,)
    ownerships = tuple(
        OwnershipRow(*r)
        for r in conn.execute(
            f"SELECT device, ownership, started_us FROM ownerships x WHERE ended_us IS NULL{only} "
            "ORDER BY device",
            args,
        )
    )
    consents = tuple(
        ConsentRow(d, o, f, bool(g), t, a)
        for d, o, f, g, t, a in conn.execute(
            "SELECT x.device, x.ownership, x.family, x.granted, x.time_us, x.actor FROM consent x "
            f"JOIN (SELECT max(seq) AS seq FROM consent x WHERE 1{only} GROUP BY device, ownership, family) "
            f"latest ON latest.seq = x.seq {current} ORDER BY x.device, x.family",
            args,
        )
    )
    guardians = tuple(
        GuardianRow(*r)
        for r in conn.execute(
            "SELECT x.device, x.ownership, x.guardian, x.time_us, x.actor FROM guardians x "
            f"{current} WHERE 1{only} ORDER BY x.device, x.guardian",
            args,
        )
    )
    profiles = tuple(
        SealedRow(*r)
        for r in conn.execute(
            "SELECT x.device, x.ownership, x.version, x.sealed, x.time_us FROM profiles x "
            f"{current} WHERE x.version = (SELECT max(version) FROM profiles y WHERE y.device = x.device "
            f"AND y.ownership = x.ownership){only} ORDER BY x.device",
            args,
        )
    )
    totp = tuple(
        SealedRow(*r)
        for r in conn.execute(
            f"SELECT x.device, x.ownership, x.last_step, x.sealed, x.time_us FROM totp x {current} "
            f"WHERE 1{only} ORDER BY x.device",
            args,
        )
    )
    return ownerships, consents, guardians, profiles, totp


def _families_of(table: str) -> str:
    """The families stored in `table`, as SQL string literals (names of ours, no input)."""
    return ", ".join(f"'{f}'" for f, t in sorted(TABLE_OF.items()) if t == table)


def _latest_cursor(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT next FROM record_cursor").fetchone()[0]) - 1
