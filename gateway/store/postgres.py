"""The fleet store: PostgreSQL through psycopg 3 and its pool, for many gateways over one database.

`postgresql://user@host:5432/db?schema=bandgate` (or `postgres://`): the tables live in `schema` (default
`bandgate`, created if missing), `lock_timeout_ms` bounds how long a write waits for a lock before it is
`StoreUnavailable` (as SQLite's busy timeout), `pool_max` and `pool_timeout_s` size the connection pool,
`outbox=1` turns the feature stream's outbox on (as in SQLite); every other query parameter goes to libpq
as it is (`sslmode`, `connect_timeout`, ...).

The schema and the rules are SQLite's (sqlite.py): records by sensitivity class in records_activity,
records_heart and records_sleep under one cursor order, one transaction per batch group for records,
device state and high-water marks, idempotent on resend. What many gateways add:

- A device is held by one writer at a time: each transaction takes a transaction-scoped advisory lock per
  device (in a fixed order, so two groups never deadlock) before it reads the device's high-water. A
  lock and not `SELECT … FOR UPDATE`: a device's first batch has no row yet to lock, and two gateways
  seeing "unseen" at once would both store it.
- Cursors. Sequence values commit out of order across connections, so a reader that pages by a sequence
  can pass a lower value that commits later. Here a record's cursor is its writing transaction's ID
  shifted left by CURSOR_BITS, plus its place in the transaction: cursor order is transaction order.
  A reader returns only cursors below the snapshot's xmin (`pg_snapshot_xmin`) shifted the same way:
  every transaction below xmin has ended, and every one that has not has an ID (so cursors) at or above
  it, so nothing can ever commit below what a reader has passed. A long write transaction anywhere in
  the cluster holds readers back (never loses them); docs/storage.md.
- Migrations are versioned and expand/contract: `schema_version` holds the version and the oldest code
  version that can still use the database. An expanding migration (new tables, nullable columns) leaves
  that where it was, so older gateways keep working beside a newer one in a rolling upgrade; a
  contracting one (a drop, a NOT NULL older code cannot fill) raises it, and older gateways refuse to
  start (SchemaVersionError), as they do on a newer SQLite file.
- The outbox has many drainers (one a gateway), and each takes a device's entries only while it holds
  the device's lease (`outbox_take`): a device's messages go out in order and its purge after whatever
  another drainer had in flight, as with SQLite's one drainer. Message entries are in a table of their
  own (`outbox_messages`, ids from `outbox`'s identity), so an older gateway's drainer, which reads an
  `outbox` row without a cursor as a purge, never sees one during a rolling upgrade. docs/streams.md.

Threads: a store object is used from one thread at a time (as SqliteStore); it holds a small pool, so an
export iterator and a commit on the same object each have a connection of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from decoder.records import device_key
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

DEFAULT_SCHEMA = "bandgate"
DEFAULT_LOCK_TIMEOUT_MS = 2000  # as SQLite's busy timeout: an erasure chunk is short; the band retries later
DEFAULT_POOL_MAX = 4  # a writer, an export iterator, and room for a reconnect beside them
DEFAULT_POOL_TIMEOUT_S = 5.0  # waiting for a connection (or a reconnect) before StoreUnavailable
MIGRATE_LOCK_TIMEOUT_S = 60  # a migration (DDL on big tables) may take a while; those starting beside wait
PURGE_CHUNK = 1000  # records an erasure or retention transaction deletes: a writer waits one chunk at most
# A cursor is (transaction ID << CURSOR_BITS) + the row's place in its transaction: 2**20 rows a
# transaction (a bigger group commits in several), and transaction IDs (xid8, epoch included) up to 2**43.
CURSOR_BITS = 20
CURSOR_ROWS = 1 << CURSOR_BITS
# How long a drainer holds the devices of the page it took (`outbox_take`) without taking again or being
# done: longer than a running drainer's round (ROUND_BUDGET_S, then one purge or publish: 8 purge requests
# or a publish and its acks, 5 s each), so only a crashed or stalled gateway loses its devices to another
# drainer. A crashed gateway's entries are taken again by the others after this, well within CRASH_BOUND_S.
OUTBOX_LEASE_S = 120.0
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_OWN_OPTIONS = frozenset({"schema", "lock_timeout_ms", "pool_max", "pool_timeout_s", "outbox"})
# Where readers stop (PostgresStore._frontier): the next transaction ID, and the transaction IDs of this
# schema's writers (holders of its writer lock) now, from one read of the lock table.
_WRITERS = (
    "WITH locks AS MATERIALIZED (SELECT locktype, classid, objid, objsubid, virtualtransaction, "
    "transactionid FROM pg_locks) "
    "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, array("
    "SELECT x.transactionid::text::bigint FROM locks w LEFT JOIN locks x "
    "ON x.virtualtransaction = w.virtualtransaction AND x.locktype = 'transactionid' "
    "WHERE w.locktype = 'advisory' AND w.classid = %s AND w.objid = 0 AND w.objsubid = 2)"
)


# The channel a schema's registry changes are notified on: named by a hash of the schema, as a channel
# name is at most 63 bytes and a schema name may take all of them. Computed alike in SQL and in Python.
_REGISTRY_CHANNEL_SQL = "'bandgate_registry_' || left(md5(TG_TABLE_SCHEMA), 16)"


def registry_channel(schema: str) -> str:
    """The NOTIFY channel of `schema`'s registry changes (as `_REGISTRY_CHANNEL_SQL` names it)."""
    return "bandgate_registry_" + hashlib.md5(schema.encode(), usedforsecurity=False).hexdigest()[:16]


class RegistryListener:
    """Wakes a gateway's registry loop when any gateway changes the registry (`Store.registry_listener`):
    one autocommit connection that LISTENs on the schema's channel, driven from the event loop (psycopg's
    async connection), so that waiting holds no thread. The loop still polls the version at every
    timeout: a notification only makes the next read sooner, and one lost with its connection costs one
    poll interval at most."""

    def __init__(self, conninfo: str, channel: str):
        self._conninfo = conninfo
        self.channel = channel
        self._conn: psycopg.AsyncConnection | None = None
        self._polling = False  # the connection is lost and the loss was logged

    async def wait(self, timeout_s: float) -> bool:
        """Until a change is notified (True; those queued behind it are taken too) or `timeout_s` has
        passed (False). On a connection that cannot be opened (within `timeout_s`) or was lost: the
        timeout, then True, so the caller reads the version as it would have by polling."""
        try:
            conn = await asyncio.wait_for(self._connected(), timeout_s)
            if self._polling:
                self._polling = False
                log.info("registry listener back", extra={"fields": {"event": "registry_listener_back"}})
            notified = False
            async for _ in conn.notifies(timeout=timeout_s, stop_after=1):
                notified = True
            if notified:  # the rest of a burst, already here: one read serves them all
                async for _ in conn.notifies(timeout=0):
                    pass
            return notified
        except (psycopg.Error, OSError, TimeoutError) as e:
            if not self._polling:  # once per loss, not once per poll while the database is away
                self._polling = True
                log.warning(
                    "registry listener lost; polling until it is back",
                    extra={"fields": {"event": "registry_listener_lost", "error": type(e).__name__}},
                )
            await self.close()
            await asyncio.sleep(timeout_s)
            return True

    async def _connected(self) -> psycopg.AsyncConnection:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return conn

    async def close(self) -> None:
        """Close the connection (safe twice, and without a wait)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(psycopg.Error):
                await conn.close()


@dataclass(frozen=True)
class Migration:
    """One schema version: its statements, run in one transaction with the version bump. `contract`: it
    removes or tightens something older code uses, so older gateways must stop before it runs."""

    statements: tuple[str, ...]
    contract: bool = False


_RECORD_TABLE = """CREATE TABLE {table} (
    cursor bigint PRIMARY KEY,
    device text NOT NULL,
    ownership text NOT NULL,
    family text NOT NULL CHECK (family IN ({families})),
    start_us bigint NOT NULL,
    duration_s integer NOT NULL,
    algo text NOT NULL,
    value_text text,
    value_sealed bytea,
    CHECK ((value_text IS NULL) <> (value_sealed IS NULL)),
    UNIQUE (device, family, start_us)
)"""

# Append, never edit: a database at version n has run exactly MIGRATIONS[:n].
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        (
            # devices and boots are keyed by the records' 16-hex device name, as in SQLite: a u64 does not
            # fit bigint, and the name is what records, the registry and erasure already use
            """CREATE TABLE devices (
                device text PRIMARY KEY,
                boot_id bigint NOT NULL,
                state bytea NOT NULL,
                updated_us bigint NOT NULL,
                ownership text NOT NULL DEFAULT ''
            )""",
            # high-water per boot, not per device, so a late batch of an earlier boot is still a duplicate
            """CREATE TABLE boots (
                device text NOT NULL,
                boot_id bigint NOT NULL,
                last_seq bigint NOT NULL,
                updated_us bigint NOT NULL,
                PRIMARY KEY (device, boot_id)
            )""",
            # the highest cursor erased or purged: latest_cursor never goes back when the newest records go
            "CREATE TABLE record_cursor (high bigint NOT NULL)",
            "INSERT INTO record_cursor (high) VALUES (0)",
            *(
                statement
                for cls, table in RECORD_TABLES.items()
                for statement in (
                    _RECORD_TABLE.format(
                        table=table,
                        families=", ".join(f"'{f}'" for f, c in sorted(FAMILY_CLASS.items()) if c == cls),
                    ),
                    f"CREATE INDEX {table}_device ON {table} (device, ownership)",
                    f"CREATE INDEX {table}_start ON {table} (start_us)",
                )
            ),
            """CREATE TABLE tombstones (
                pseudonym text NOT NULL,
                boot_id bigint NOT NULL,
                last_seq bigint NOT NULL,
                erased_us bigint NOT NULL,
                PRIMARY KEY (pseudonym, boot_id)
            )""",
            # the registry (gateway/security)
            """CREATE TABLE principals (
                kind text NOT NULL,
                name text NOT NULL,
                state text NOT NULL,
                created_us bigint NOT NULL,
                updated_us bigint NOT NULL,
                last_seen_us bigint,
                PRIMARY KEY (kind, name)
            )""",
            """CREATE TABLE credentials (
                id text PRIMARY KEY,
                kind text NOT NULL,
                name text NOT NULL,
                serial text NOT NULL,
                not_after_us bigint NOT NULL,
                state text NOT NULL,
                created_us bigint NOT NULL
            )""",
            "CREATE INDEX credentials_principal ON credentials (kind, name)",
            """CREATE TABLE bindings (
                relay text NOT NULL,
                device text NOT NULL,
                created_us bigint NOT NULL,
                PRIMARY KEY (relay, device)
            )""",
            """CREATE TABLE grants (
                consumer text NOT NULL,
                family text NOT NULL,
                operation text NOT NULL,
                devices text NOT NULL,
                created_us bigint NOT NULL,
                PRIMARY KEY (consumer, family, operation)
            )""",
            # one row; every registry change locks it first, so registry writes from many gateways queue
            "CREATE TABLE registry_version (version bigint NOT NULL)",
            "INSERT INTO registry_version (version) VALUES (0)",
            """CREATE TABLE audit (
                seq bigint PRIMARY KEY,
                time_us bigint NOT NULL,
                entry text NOT NULL,
                mac text NOT NULL
            )""",
            """CREATE TABLE audit_segments (
                seq bigint PRIMARY KEY,
                mac text NOT NULL,
                first_seq bigint NOT NULL,
                first_time_us bigint NOT NULL,
                last_time_us bigint NOT NULL
            )""",
            # the privacy control plane (gateway/privacy)
            """CREATE TABLE ownerships (
                device text NOT NULL,
                ownership text NOT NULL,
                started_us bigint NOT NULL,
                ended_us bigint,
                PRIMARY KEY (device, ownership)
            )""",
            "CREATE UNIQUE INDEX ownerships_current ON ownerships (device) WHERE ended_us IS NULL",
            """CREATE TABLE consent (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                device text NOT NULL,
                ownership text NOT NULL,
                family text NOT NULL,
                granted boolean NOT NULL,
                time_us bigint NOT NULL,
                actor text NOT NULL
            )""",
            "CREATE INDEX consent_device ON consent (device, ownership, family, seq)",
            """CREATE TABLE guardians (
                device text NOT NULL,
                ownership text NOT NULL,
                guardian text NOT NULL,
                time_us bigint NOT NULL,
                actor text NOT NULL,
                PRIMARY KEY (device, ownership, guardian)
            )""",
            """CREATE TABLE profiles (
                device text NOT NULL,
                ownership text NOT NULL,
                version bigint NOT NULL,
                sealed bytea NOT NULL,
                time_us bigint NOT NULL,
                PRIMARY KEY (device, ownership, version)
            )""",
            """CREATE TABLE totp (
                device text NOT NULL,
                ownership text NOT NULL,
                sealed bytea NOT NULL,
                last_step bigint NOT NULL,
                time_us bigint NOT NULL,
                PRIMARY KEY (device, ownership)
            )""",
        ),
        contract=True,  # the first version: nothing older can use it
    ),
    Migration(
        (
            # The transactional outbox of the feature stream (gateway/stream), as SQLite's migration 6: an
            # entry per record to publish, written in the record's own transaction and naming it by
            # cursor, or (cursor NULL) an erased device whose stream subjects are still to be purged. The
            # device is on every entry, so drainers share the work out by device (outbox_leases). An
            # identity never hands a value out twice, so a late `outbox_done` deletes no one's new entry;
            # ids of one device grow in commit order, as its commits hold the device's lock.
            """CREATE TABLE outbox (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                device text NOT NULL,
                cursor bigint UNIQUE,
                taken_us bigint
            )""",
            # the device a drainer holds while its entries are in flight there, until `until_us` (the
            # database's clock: gateways' clocks may disagree); no row: the device is free
            """CREATE TABLE outbox_leases (
                device text PRIMARY KEY,
                holder text NOT NULL,
                until_us bigint NOT NULL
            )""",
        )
        # expanding: older gateways keep working beside it, but they neither write entries nor delete
        # them with erased records; docs/storage.md says to finish the upgrade before turning the stream on
    ),
    Migration(
        (
            # Per-device rate limits shared by every gateway on the database (`take_tokens`), stamped by
            # the database's clock: a band that moves to another gateway keeps its level.
            """CREATE TABLE device_limits (
                device text NOT NULL,
                bucket text NOT NULL,
                level double precision NOT NULL,
                stamp_us bigint NOT NULL,
                PRIMARY KEY (device, bucket)
            )""",
        )
        # expanding: an older gateway keeps its limits per process, as before
    ),
    Migration(
        (
            # A message entry per batch and family (gateway/store/rows.py: message_rows), as SQLite's
            # migration 9: the stream message encoded once at the commit and sealed with the device's
            # data key as its records are, with the family and first start_us that, with the device and
            # ownership, make its ID. A row is a message, so the leases and SKIP LOCKED stay per row and
            # a PostgreSQL gateway publishes a message a batch and family too.
            #
            # A table of their own, not new columns of `outbox`: an older gateway's drainer reads an
            # `outbox` row without a cursor as a purge entry, and one already running never re-reads
            # schema_version, so it would purge the device's subjects and delete the message. Here it
            # never sees them. Ids come from outbox's identity sequence (the default is bound to it by
            # OID, resolved here), so entries of both tables are in one order, and a device's in commit
            # order (its commits hold the device's lock): takes merge the two tables by id.
            """CREATE TABLE outbox_messages (
                id bigint PRIMARY KEY,
                device text NOT NULL,
                ownership text NOT NULL,
                family text NOT NULL,
                start_us bigint NOT NULL,
                records integer NOT NULL CHECK (records > 0),
                message bytea NOT NULL,
                taken_us bigint
            )""",
            "DO $$ BEGIN EXECUTE format('ALTER TABLE outbox_messages ALTER COLUMN id SET DEFAULT "
            "nextval(%L::regclass)', pg_get_serial_sequence('outbox', 'id')); END $$",
            # takes read a held device's entries, erasure deletes a device's
            "CREATE INDEX outbox_messages_device ON outbox_messages (device, id)",
        ),
        # expanding: `outbox` is untouched, and an older gateway beside a newer one drains its record and
        # purge entries as before (docs/streams.md). Rewritten in place before any release used it: it
        # added these columns to `outbox` and contracted.
    ),
    Migration(
        (
            # The registry's change log, as SQLite's migration 10 (Store.registry_delta): each registry
            # write's subjects under the next change numbers, handed out under the registry_version row
            # lock every registry write takes first, so they are gapless and in commit order.
            """CREATE TABLE registry_changes (
                seq bigint PRIMARY KEY,
                version bigint NOT NULL,
                subject text NOT NULL
            )""",
            "CREATE INDEX bindings_device ON bindings (device)",
        ),
        # expanding: an older gateway writes no log; a newer one sees the versions it bumped unlogged and
        # reads the whole registry (base.change_log_whole)
    ),
    Migration(
        (
            # Every registry version bump, by any gateway (older ones too: the trigger is the database's),
            # is notified on the schema's registry channel at its commit (RegistryListener): the other
            # gateways read the change at once instead of at their next poll.
            f"""CREATE FUNCTION registry_notify() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify({_REGISTRY_CHANNEL_SQL}, NEW.version::text);
                RETURN NEW;
            END $$""",
            "CREATE TRIGGER registry_version_notify AFTER UPDATE ON registry_version "
            "FOR EACH ROW EXECUTE FUNCTION registry_notify()",
        ),
        # expanding: nothing older code reads or writes changes
    ),
)

_NOW_US = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"

_RECORD_COLUMNS = "cursor, device, ownership, family, start_us, duration_s, algo, value_text, value_sealed"
_INSERT_RECORDS = (
    "{alias} AS (INSERT INTO {table} ({columns}) SELECT * FROM unnest(%({alias})b::bigint[], "
    "%({alias}_dev)b::text[], %({alias}_own)b::text[], %({alias}_f)b::text[], %({alias}_s)b::bigint[], "
    "%({alias}_d)b::integer[], %({alias}_a)b::text[], %({alias}_vt)b::text[], %({alias}_vs)b::bytea[]) "
    # in cursor order, so of a key repeated in the group the first is stored, as in SQLite
    "AS u ORDER BY 1 ON CONFLICT (device, family, start_us) DO NOTHING RETURNING cursor, device)"
)
# The message entries of a group's commits (rows.message_rows), ids in the order given (commit order).
_INSERT_MESSAGES = (
    "INSERT INTO outbox_messages (device, ownership, family, start_us, records, message) "
    "SELECT device, ownership, family, start_us, records, message FROM unnest(%s::text[], %s::text[], "
    "%s::text[], %s::bigint[], %s::integer[], %s::bytea[]) WITH ORDINALITY "
    "AS m(device, ownership, family, start_us, records, message, n) ORDER BY n"
)
# A held device's entries (`%(held)s`) of both tables, merged by id, as rows.outbox_page reads them: a
# purge entry names its device, a record entry has no batch, a message entry its own columns. Last, for
# a message entry, whether its first record (its ID) is still stored: an older gateway's erasure or
# retention deletes records but knows nothing of message entries, and a message whose first record is
# gone is never published (as this code's retention deletes it whole), even in clear, after the purge.
_HELD_ENTRIES = (
    "SELECT e.*, e.message IS NULL OR "
    + " OR ".join(
        f"EXISTS (SELECT 1 FROM {table} r WHERE r.device = e.device AND r.family = e.family "
        "AND r.start_us = e.start_us AND r.ownership = e.ownership)"
        for table in RECORD_TABLES.values()
    )
    + " FROM (SELECT id, CASE WHEN cursor IS NULL THEN device END, cursor, taken_us, NULL::bigint, "
    "device, NULL::text AS ownership, NULL::text AS family, NULL::bigint AS start_us, NULL::integer, "
    "NULL::bytea AS message FROM outbox WHERE device = ANY(%(held)s::text[]) UNION ALL "
    "SELECT id, NULL, NULL, taken_us, NULL, device, ownership, family, start_us, records, message "
    "FROM outbox_messages WHERE device = ANY(%(held)s::text[]) ORDER BY 1 LIMIT %(limit)s) AS e "
    "ORDER BY 1"
)
_UPSERT_BOOTS_AND_DEVICES = (
    "boot AS (INSERT INTO boots (device, boot_id, last_seq, updated_us) SELECT b.*, %(now_us)s "
    "FROM unnest(%(b_dev)b::text[], %(b_boot)b::bigint[], %(b_last)b::bigint[]) AS b "
    "ON CONFLICT (device, boot_id) DO UPDATE SET last_seq = excluded.last_seq, "
    "updated_us = excluded.updated_us), "
    "dev AS (INSERT INTO devices (device, boot_id, state, updated_us, ownership) "
    "SELECT d.device, d.boot_id, d.state, %(now_us)s, d.ownership FROM unnest(%(d_dev)b::text[], "
    "%(d_boot)b::bigint[], %(d_state)b::bytea[], %(d_own)b::text[]) AS d(device, boot_id, state, ownership) "
    "ON CONFLICT (device) DO UPDATE SET boot_id = excluded.boot_id, state = excluded.state, "
    "updated_us = excluded.updated_us, ownership = excluded.ownership)"
)
# SQLSTATE classes of a transient failure: nothing was written and a retry may succeed.
_UNAVAILABLE_CLASSES = frozenset(
    {"08", "40", "53", "57", "58"}
)  # connection, rollback, resources, admin, I/O
_UNAVAILABLE_STATES = frozenset({"55P03", "25006"})  # lock_not_available, read_only_sql_transaction
_NOW_US = "(extract(epoch FROM now()) * 1000000)::bigint"  # the database's clock: the same for every gateway
# The devices of the oldest entries that no other drainer holds, claimed (or renewed) for this one: those
# it now holds. The candidates' rows locked SKIP LOCKED, and each device under an advisory lock tried, not
# waited for: two drainers taking at once pass each other by, and never both claim one device (one would
# wait for the other's lease row while the other waits for its row locks).
_UNLEASED = (
    "SELECT o.id, o.device FROM {table} o WHERE NOT EXISTS (SELECT 1 FROM outbox_leases l "
    f"WHERE l.device = o.device AND l.holder <> %(me)s AND l.until_us > {_NOW_US}) "
    "ORDER BY o.id LIMIT %(limit)s FOR UPDATE OF o SKIP LOCKED"
)
_CLAIM_DEVICES = (  # the oldest of each table (a row lock cannot cross a UNION), then of both
    f"WITH records AS MATERIALIZED ({_UNLEASED.format(table='outbox')}), "
    f"messages AS MATERIALIZED ({_UNLEASED.format(table='outbox_messages')}), "
    "candidates AS MATERIALIZED (SELECT device FROM (SELECT * FROM records UNION ALL "
    "SELECT * FROM messages) AS c ORDER BY id LIMIT %(limit)s), "
    "devices AS MATERIALIZED (SELECT DISTINCT device FROM candidates), "
    "free AS MATERIALIZED (SELECT device FROM devices "
    "WHERE pg_try_advisory_xact_lock(%(key)s, hashtext(device))) "
    "INSERT INTO outbox_leases (device, holder, until_us) "
    f"SELECT device, %(me)s, {_NOW_US} + %(lease)s FROM free ORDER BY device "
    "ON CONFLICT (device) DO UPDATE SET holder = excluded.holder, until_us = excluded.until_us "
    f"WHERE outbox_leases.holder = excluded.holder OR outbox_leases.until_us <= {_NOW_US} "
    "RETURNING device"
)


class PostgresStore(Store):
    """Feature records, device state and high-water marks in one PostgreSQL schema (module docstring)."""

    migrations: tuple[Migration, ...] = MIGRATIONS

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
        pool_max: int = DEFAULT_POOL_MAX,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        sealer: Sealer | None = None,
        outbox: bool = False,
    ):
        if not _SCHEMA_NAME.fullmatch(schema) or schema.startswith("pg_"):
            raise ValueError(f"schema {schema!r}: 1-63 of [a-z0-9_], not starting with a digit or pg_")
        if lock_timeout_ms < 1:  # 0 is "wait for ever" to PostgreSQL: a gateway must not hang
            raise ValueError("lock_timeout_ms must be >= 1")
        if pool_max < 2:
            raise ValueError("pool_max must be >= 2 (a writer and an export)")
        if pool_timeout_s <= 0:
            raise ValueError("pool_timeout_s must be > 0")
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.ProgrammingError as e:
            raise ValueError(f"PostgreSQL connection string: {e}") from None
        self._conninfo = conninfo
        self._display = "postgresql://{}@{}:{}/{}".format(
            params.get("user", ""), params.get("host", ""), params.get("port", ""), params.get("dbname", "")
        )
        self.schema = schema
        self.lock_timeout_ms = int(lock_timeout_ms)
        self.pool_max = int(pool_max)
        self.pool_timeout_s = float(pool_timeout_s)
        self.sealer = sealer  # None: values and state in clear
        self.unreadable = 0  # sealed values that did not open, skipped (reported in the log)
        # Commits write outbox entries for the feature stream (a gateway with --stream); the flag travels
        # in the URL (`?outbox=1`), so compute worker processes that commit write them too.
        self.outbox = bool(outbox)
        # This object as a drainer: its name in outbox_leases (a gateway's survives its restarts:
        # `name_drainer`), and the entries of its last page not yet done, by id, with their devices (a
        # device is released when none of its entries is left here).
        self.outbox_holder = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.outbox_lease_s = OUTBOX_LEASE_S
        self._in_flight: dict[int, str] = {}
        self._leasing = False  # this object took entries: close() releases its devices
        # advisory lock keys of this schema (two gateways on other schemas of one database never wait
        # on each other, but for a hash collision: a short wait, never a wrong result)
        self._device_lock_key = _int32(zlib.crc32(f"bandgate-device:{schema}".encode()))
        self._migrate_lock_key = _int32(zlib.crc32(f"bandgate-migrate:{schema}".encode()))
        self._writer_lock_key = _int32(zlib.crc32(f"bandgate-writers:{schema}".encode()))
        self._outbox_lock_key = _int32(zlib.crc32(f"bandgate-outbox:{schema}".encode()))
        self._drainer_name_key = _int32(zlib.crc32(f"bandgate-drainer-name:{schema}".encode()))
        self._wanted_name: str | None = None  # `name_drainer`'s, until claimed at the first take
        self._name_conn: psycopg.Connection | None = None  # holds the claimed name's session lock
        self._pool: psycopg_pool.ConnectionPool | None = None

    @classmethod
    def from_url(cls, url: str, sealer: Sealer | None = None) -> PostgresStore:
        """`postgresql://user@host:port/db?schema=s&lock_timeout_ms=N&pool_max=N&pool_timeout_s=X` (also
        `postgres://`), and `outbox=0|1` (commits write outbox entries for the feature stream); other
        parameters are libpq's, checked by libpq now, so a typo does not start a gateway."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres") or not url.startswith(f"{parts.scheme}://"):
            raise ValueError(f"not a PostgreSQL URL: {url!r}")
        ours: dict[str, Any] = {}
        theirs: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
            if key not in _OWN_OPTIONS:
                theirs.append((key, value))
            elif key in ours:
                raise ValueError(f"{_redacted(url)}: {key} given twice")
            elif key == "schema":
                ours[key] = value
            elif key == "outbox":
                if value not in ("0", "1"):
                    raise ValueError(f"{_redacted(url)}: outbox={value!r} is not 0 or 1")
                ours[key] = value == "1"
            elif key == "pool_timeout_s":
                try:
                    ours[key] = float(value)
                except ValueError:
                    raise ValueError(f"{_redacted(url)}: pool_timeout_s={value!r} is not a number") from None
            elif value.isdigit():
                ours[key] = int(value)
            else:
                raise ValueError(f"{_redacted(url)}: {key}={value!r} is not a non-negative integer")
        if not parts.path.strip("/"):
            raise ValueError(f"{_redacted(url)}: name the database (postgresql://host/db)")
        libpq_url = urlunsplit(
            ("postgresql", parts.netloc, parts.path, urlencode(theirs, quote_via=quote), "")
        )
        return cls(libpq_url, sealer=sealer, **ours)

    def __repr__(self) -> str:  # never the password
        outbox = ", outbox" if self.outbox else ""
        return (
            f"PostgresStore({self._display!r}, schema={self.schema!r}, open={self._pool is not None}{outbox})"
        )

    # lifecycle

    def open(self) -> None:
        if self._pool is not None:
            return
        given = conninfo_to_dict(self._conninfo)
        options = (
            f"{given.get('options', '')} -c search_path={self.schema} -c lock_timeout={self.lock_timeout_ms}"
        )
        pool = psycopg_pool.ConnectionPool(
            make_conninfo(
                self._conninfo,
                options=options.strip(),
                application_name=given.get("application_name", "bandgate"),  # what pg_stat_activity shows
            ),
            min_size=1,
            max_size=self.pool_max,
            timeout=self.pool_timeout_s,
            kwargs={"autocommit": True},
            check=psycopg_pool.ConnectionPool.check_connection,  # a connection cut while idle is replaced
            open=False,
            name=f"bandgate-{self.schema}",
        )
        try:
            with _errors():
                pool.open(wait=True, timeout=self.pool_timeout_s)
                with pool.connection() as conn:
                    self._migrate(conn)
        except BaseException:
            pool.close()
            raise
        self._pool = pool

    def close(self) -> None:
        if self._leasing and self._pool is not None:
            # the devices this drainer held go to the others at once, not after the lease (best effort: a
            # store that is down lets them expire)
            with suppress(StoreError):
                self._release_all()
        name_conn, self._name_conn = self._name_conn, None
        if name_conn is not None:  # after the leases went: the name is free for a restart
            with suppress(psycopg.Error):
                name_conn.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @property
    def schema_version(self) -> int:
        """This class's schema version: how many migrations it knows."""
        return len(self.migrations)

    def _migrate(self, conn: psycopg.Connection) -> None:
        """Bring the schema to `schema_version` in one transaction, one gateway at a time; refuse a
        database that needs newer code, or a schema that is not bandgate's. An up-to-date (or newer but
        compatible) schema is only read, so a gateway starts while others hold locks."""
        stored = self._stored_version(conn)
        if stored is not None and stored >= self.schema_version:
            return
        with conn.transaction():
            # a gateway starting beside one that migrates waits for it, longer than a write waits
            conn.execute(f"SET LOCAL lock_timeout = {MIGRATE_LOCK_TIMEOUT_S * 1000}")
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (self._migrate_lock_key,))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            version = self._stored_version(conn)  # again, under the lock
            if version is None:
                conn.execute(
                    "CREATE TABLE schema_version (version integer NOT NULL, compatible integer NOT NULL)"
                )
                conn.execute("INSERT INTO schema_version (version, compatible) VALUES (0, 0)")
                version = 0
            if version >= self.schema_version:
                return
            compatible = None
            for n, migration in enumerate(self.migrations[version:], version + 1):
                for statement in migration.statements:
                    conn.execute(statement)  # type: ignore[arg-type]  # our own SQL, no input in it
                if migration.contract:
                    compatible = n
            conn.execute(
                "UPDATE schema_version SET version = %s, compatible = coalesce(%s, compatible)",
                (self.schema_version, compatible),
            )

    def _stored_version(self, conn: psycopg.Connection) -> int | None:
        """The schema's version, None for a missing or empty schema; raises for one that needs newer
        code, or that holds tables that are not bandgate's."""
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (self.schema,))
        }
        where = f"{self._display} schema {self.schema}"
        if "schema_version" not in tables:
            if tables:
                raise SchemaVersionError(f"{where}: not a bandgate database (tables {sorted(tables)})")
            return None
        rows = conn.execute("SELECT version, compatible FROM schema_version").fetchall()
        if len(rows) != 1:
            raise SchemaVersionError(f"{where}: schema_version holds {len(rows)} rows, not one")
        version, compatible = int(rows[0][0]), int(rows[0][1])
        if compatible > self.schema_version:
            raise SchemaVersionError(
                f"{where}: schema version {version} was written by a newer bandgate that needs code of "
                f"version {compatible} or later; this one knows versions up to {self.schema_version} and "
                "will not touch it (upgrade bandgate)"
            )
        return version

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection (autocommit), psycopg errors translated."""
        pool = self._pool
        if pool is None:
            raise StoreError(f"{self!r} is not open")
        with _errors(), pool.connection() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection]:
        """A transaction on a pooled connection: committed on exit, rolled back on any error."""
        with self._connection() as conn, conn.transaction():
            yield conn

    # the batch path

    def device(self, device_id: int) -> DeviceRow | None:
        check_device_id(device_id)
        device = device_key(device_id)
        with self._connection() as conn:
            row = conn.execute(
                "SELECT d.boot_id, b.last_seq, d.state, d.ownership FROM devices d "
                "JOIN boots b ON b.device = d.device AND b.boot_id = d.boot_id WHERE d.device = %s",
                (device,),
            ).fetchone()
        if row is None:
            return None
        return DeviceRow(device_id, row[0], row[1], self._open_state(device, row[3], bytes(row[2])))

    def _open_state(self, device: str, ownership: str, state: bytes) -> bytes:
        """The state in clear; b"" (start afresh) when it does not open (a new ownership's key, or the key
        destroyed)."""
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
        token: list[dict] = []
        return replace(
            item, records=token, prepared=Prepared(token, item.device_id, rows, item.ownership, packed)
        )

    def commit_many(self, items: list[CommitItem]) -> list[CommitResult | Exception]:
        """One transaction for the group (several if its records exceed CURSOR_ROWS): the devices'
        locks, then each item's sequence check and writes in order. An item refused by its check writes
        nothing; any database error aborts the transaction and every item of it gets that error."""
        results: list[CommitResult | Exception | None] = [None] * len(items)
        groups: list[list[tuple[int, CommitItem, list[tuple]]]] = [[]]
        packs: dict[int, list[bytes]] = {}  # with the outbox on: each item's records packed for the stream
        in_group = 0
        for i, item in enumerate(items):
            try:
                if self.outbox:
                    packs[i] = packed_of(item)
                rows = rows_of(item, self.sealer)
            except ValueError as e:
                results[i] = e
                continue
            if len(rows) > CURSOR_ROWS:
                results[i] = ValueError(f"a batch of {len(rows)} records: at most {CURSOR_ROWS}")
                continue
            if in_group + len(rows) > CURSOR_ROWS:
                groups.append([])
                in_group = 0
            groups[-1].append((i, item, rows))
            in_group += len(rows)
        for group in groups:
            if not group:
                continue
            now_us = time.time_ns() // 1000
            try:
                with self._write() as conn:
                    # the writer lock (readers find this transaction by it), the devices' locks in a fixed
                    # order, then the transaction ID (so the cursors): readers see a writer before it has
                    # an ID, and a writer waiting for a device holds no reader back
                    (xid,) = conn.execute(  # type: ignore[misc]
                        "WITH locks AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared(%s, 0), "
                        "(SELECT count(pg_advisory_xact_lock(%s, h)) FROM (SELECT DISTINCT hashtext(d) AS h "
                        "FROM unnest(%s::text[]) AS d ORDER BY 1) AS l)) "
                        "SELECT pg_current_xact_id()::text::bigint FROM locks",
                        (
                            self._writer_lock_key,
                            self._device_lock_key,
                            [device_key(item.device_id) for _, item, _ in group],
                        ),
                    ).fetchone()
                    base = int(xid) << CURSOR_BITS
                    if base + CURSOR_ROWS >= 2**63:
                        raise StoreError("postgresql: transaction IDs beyond 2**43: cursors would overflow")
                    for i, result in self._apply_group(conn, group, now_us, base, packs).items():
                        results[i] = result
            except StoreError as e:  # nothing of the transaction was written
                for i, _, _ in group:
                    results[i] = e
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _apply_group(
        self,
        conn: psycopg.Connection,
        group: list[tuple[int, CommitItem, list[tuple]]],
        now_us: int,
        base: int,
        packs: dict[int, list[bytes]] | None = None,
    ) -> dict[int, CommitResult | Exception]:
        """The sequence checks of a group's items in order, then the writes of those that pass in one
        statement, inside the caller's transaction with the devices locked; records take cursors from
        `base` on, in item order. Each item is checked against the high-water the items before it left
        (as `commit` one by one would); a tombstone counts as its boot's high-water (as in SQLite). Three
        round trips whatever the group's size: read the high-waters, write, and the commit; a fourth with
        the outbox on (`packs`), to write a message entry per item and family of the records it stored."""
        devices = sorted({device_key(item.device_id) for _, item, _ in group})
        sealer = self.sealer
        pseudonyms = {d: sealer.pseudonym(d) for d in devices} if sealer is not None else {}
        found = conn.execute(
            "SELECT 0, device, boot_id, last_seq FROM boots WHERE device = ANY(%s) UNION ALL "
            "SELECT 1, pseudonym, boot_id, last_seq FROM tombstones WHERE pseudonym = ANY(%s)",
            (devices, list(pseudonyms.values())),
        ).fetchall()
        high: dict[tuple[str, int], int] = {(d, b): int(last) for k, d, b, last in found if k == 0}
        erased: dict[tuple[str, int], int] = {(p, b): int(last) for k, p, b, last in found if k == 1}
        out: dict[int, CommitResult | Exception] = {}
        records: list[tuple] = []  # (cursor, *row) of the items that pass
        firsts: dict[int, tuple[int, int, int]] = {}  # item index: its cursor range and high-water
        boot_rows: dict[tuple[str, int], int] = {}  # the high-water each boot written is left at
        device_rows: dict[str, tuple[int, bytes, str]] = {}  # the last item of each device wins
        cursor = base
        for i, item, rows in group:
            device = device_key(item.device_id)
            high_water = high.get((device, item.boot_id))
            tombstone = erased.get((pseudonyms.get(device, ""), item.boot_id))
            if high_water is None and tombstone is not None and item.last_seq <= tombstone:
                out[i] = CommitResult(duplicate=True, high_water=tombstone, cursors=(None,) * len(rows))
                continue
            try:
                repeat = check_sequence(
                    high_water,
                    item.device_id,
                    item.boot_id,
                    item.first_seq,
                    item.last_seq,
                    allow_gap=item.allow_gap,
                )
            except SequenceError as e:
                out[i] = e
                continue
            if repeat:
                assert high_water is not None
                out[i] = CommitResult(duplicate=True, high_water=high_water, cursors=(None,) * len(rows))
                continue
            records += ((c, *row) for c, row in enumerate(rows, cursor))
            firsts[i] = (cursor, cursor + len(rows), item.last_seq)
            cursor += len(rows)
            high[(device, item.boot_id)] = boot_rows[(device, item.boot_id)] = item.last_seq
            device_rows[device] = (item.boot_id, item.state, item.ownership)
        if not firsts:
            return out
        params: dict[str, Any] = {
            "now_us": now_us,
            "b_dev": [d for d, _ in boot_rows],
            "b_boot": [b for _, b in boot_rows],
            "b_last": list(boot_rows.values()),
        }
        params["d_dev"] = list(device_rows)
        params["d_boot"] = [b for b, _, _ in device_rows.values()]
        params["d_state"] = [
            sealer.seal_state(d, own or UNOWNED, state) if sealer is not None and state else state
            for d, (_, state, own) in device_rows.items()
        ]
        params["d_own"] = [own for _, _, own in device_rows.values()]
        by_table: dict[str, list[tuple]] = {}
        for c, table, *rest in records:
            by_table.setdefault(table, []).append((c, *rest))
        ctes = []
        for k, (table, batch) in enumerate(sorted(by_table.items())):
            alias = f"r{k}"
            ctes.append(_INSERT_RECORDS.format(alias=alias, table=table, columns=_RECORD_COLUMNS))
            cursors, devs, owners, families, starts, durations, algos, values = zip(*batch, strict=True)
            params.update(
                {
                    alias: list(cursors),
                    f"{alias}_dev": list(devs),
                    f"{alias}_own": list(owners),
                    f"{alias}_f": list(families),
                    f"{alias}_s": list(starts),
                    f"{alias}_d": list(durations),
                    f"{alias}_a": list(algos),
                    f"{alias}_vt": [v if isinstance(v, str) else None for v in values],
                    f"{alias}_vs": [v if not isinstance(v, str) else None for v in values],
                }
            )
        selects = " UNION ALL ".join(f"SELECT cursor FROM r{k}" for k in range(len(ctes)))
        query = f"WITH {', '.join([*ctes, _UPSERT_BOOTS_AND_DEVICES])} {selects or 'SELECT NULL::bigint'}"
        stored = {c for (c,) in conn.execute(query, params).fetchall()}  # type: ignore[call-overload]
        messages: list[tuple] = []
        written = {i: (item, rows) for i, item, rows in group if i in firsts}
        for i, (first, end, last_seq) in firsts.items():
            cursors = tuple(c if c in stored else None for c in range(first, end))
            out[i] = CommitResult(duplicate=False, high_water=last_seq, cursors=cursors)
            if packs is not None and i in packs:  # the stream gets what the store got: first versions
                item, rows = written[i]
                device = device_key(item.device_id)
                messages += message_rows(device, item.ownership, rows, cursors, packs[i], sealer)
        if messages:
            conn.execute(_INSERT_MESSAGES, [list(column) for column in zip(*messages, strict=True)])
        return out

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
        """As SqliteStore.read_since, and never past a transaction that may still commit: only cursors
        below the snapshot's frontier (module docstring), so a reader that resumes from the last cursor
        it saw misses nothing that commits later."""
        if limit <= 0:
            raise ValueError("limit must be positive")
        wanted = set(FAMILY_CLASS) if families is None else set(families) & set(FAMILY_CLASS)
        if not wanted:
            return []
        parts: list[str] = []
        params: list[Any] = []
        cursor_at: list[int] = []
        for table in sorted({TABLE_OF[f] for f in wanted}):
            q = f"SELECT {_RECORD_COLUMNS} FROM {table} WHERE cursor > %s AND cursor < %s"
            cursor_at.append(len(params))
            params += [cursor, 0]  # the frontier, filled in for each page
            fams = sorted(f for f in wanted if TABLE_OF[f] == table)
            if len(fams) < sum(1 for v in TABLE_OF.values() if v == table):
                q += " AND family = ANY(%s)"
                params.append(fams)
            if device is not None:
                q += " AND device = %s"
                params.append(device)
            if ownership is not None:
                q += " AND ownership = %s"
                params.append(ownership)
            parts.append(f"({q} ORDER BY cursor LIMIT %s)")
            params.append(limit)
        query = f"SELECT * FROM ({' UNION ALL '.join(parts)}) AS page ORDER BY cursor LIMIT %s"
        params.append(limit)
        out: list[tuple[int, dict]] = []
        while True:
            with self._connection() as conn:
                frontier = self._frontier(conn)
                for i in cursor_at:
                    params[i + 1] = frontier
                rows = conn.execute(query, params).fetchall()  # type: ignore[call-overload]
            openers: dict[tuple[str, str], Callable[[str, int, bytes], bytes]] = {}
            for row in rows:
                record = self._record(row, openers)
                if record is not None:
                    out.append((row[0], record))
            # a page shortened by rows that did not open reads on, so a short page means the end only
            if len(rows) < limit or len(out) >= limit:
                return out[:limit]
            for i in cursor_at:
                params[i] = rows[-1][0]

    def _record(
        self, row: tuple, openers: dict[tuple[str, str], Callable[[str, int, bytes], bytes]] | None = None
    ) -> dict | None:
        *head, value_text, value_sealed = row
        record = open_record(
            (*head, value_text if value_text is not None else bytes(value_sealed)),
            self.sealer,
            f"{self._display} schema {self.schema}",
            openers,
        )
        if record is None:
            self.unreadable += 1
        return record

    def latest_cursor(self) -> int:
        """The highest cursor below the readers' frontier, or erased: where a subscriber for new records
        only starts without passing a transaction that may still commit."""
        maxima = ", ".join(
            f"(SELECT max(cursor) FROM {t} WHERE cursor < %(f)s)" for t in RECORD_TABLES.values()
        )
        with self._connection() as conn:
            frontier = self._frontier(conn)
            (latest,) = conn.execute(  # type: ignore[misc]
                f"SELECT greatest((SELECT high FROM record_cursor), {maxima})",  # type: ignore[arg-type]
                {"f": frontier},
            ).fetchone()
        return int(latest or 0)

    def ownerships_held(self) -> set[tuple[str, str]]:
        query = " UNION ".join(
            [f"SELECT device, ownership FROM {table}" for table in RECORD_TABLES.values()]
            + ["SELECT device, ownership FROM devices"]
        )
        with self._connection() as conn:
            return {(device, ownership or "") for device, ownership in conn.execute(query)}  # type: ignore[arg-type]

    def check_writable(self) -> None:
        with self._write() as conn:
            conn.execute("SELECT 1")

    def _frontier(self, conn: psycopg.Connection) -> int:
        """The lowest cursor a writer of this schema that may still commit holds or can draw: readers
        return only cursors below it. Read in a statement of its own before the reader's query, whose
        snapshot is then the later one: a writer holding the writer lock now is held back to its
        transaction ID (the next ID, if it has none yet); one that takes the lock later draws an ID at or
        above the next ID now; and one that held it and has ended did so before the reader's snapshot,
        which therefore sees its records. Writers elsewhere in the cluster do not hold readers back."""
        row = conn.execute(_WRITERS, (self._writer_lock_key & 0xFFFFFFFF,)).fetchone()  # classid is an oid
        assert row is not None
        next_xid, writers = int(row[0]), row[1]
        lowest = min((next_xid if x is None else _widen(int(x), next_xid) for x in writers), default=next_xid)
        return min(lowest, next_xid) << CURSOR_BITS

    # privacy and retention

    def export_device(self, device_id: int) -> Iterator[dict]:
        """A summary `{"kind": "device", ...}` (state as bytes), then `{"kind": "record", "cursor",
        "record"}` in time order, all from one snapshot (a repeatable-read transaction on a connection of
        its own, held until the iterator is exhausted or closed; commits on this object go on beside it)."""
        check_device_id(device_id)
        if self._pool is None:
            raise StoreError(f"{self!r} is not open")
        return self._export(device_key(device_id))

    def _export(self, device: str) -> Iterator[dict]:
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            dev = conn.execute(
                "SELECT boot_id, state, updated_us, ownership FROM devices WHERE device = %s", (device,)
            ).fetchone()
            boots = conn.execute(
                "SELECT boot_id, last_seq, updated_us FROM boots WHERE device = %s ORDER BY updated_us",
                (device,),
            ).fetchall()
            n_records = sum(
                conn.execute(f"SELECT count(*) FROM {t} WHERE device = %s", (device,)).fetchone()[0]  # type: ignore[index]
                for t in RECORD_TABLES.values()
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
                f"SELECT {_RECORD_COLUMNS} FROM {t} WHERE device = %s" for t in RECORD_TABLES.values()
            )
            with conn.cursor(name="bandgate_export") as cur:  # server-side: a long history streams
                cur.execute(f"{union} ORDER BY start_us, family, cursor", (device,) * len(RECORD_TABLES))  # type: ignore[arg-type]
                while batch := cur.fetchmany(1000):
                    for row in batch:
                        record = self._record(row)
                        if record is not None:
                            yield {"kind": "record", "cursor": row[0], "record": record}

    def erase_device(self, device_id: int, ownership: str | None = None) -> int:
        """Records in chunks of PURGE_CHUNK (each its own transaction), then in one transaction, with the
        device locked as a commit locks it, its state and every boot's high-water, leaving a tombstone
        per boot under the device's pseudonym (with a sealer). Returns the records deleted; idempotent.
        Deleted rows stay in PostgreSQL's pages until (auto)vacuum reclaims them."""
        check_device_id(device_id)
        device = device_key(device_id)
        scope, args = (
            ("device = %s", (device,))
            if ownership is None
            else ("device = %s AND ownership = %s", (device, ownership))
        )
        deleted = sum(self._delete_in_chunks(t, scope, args) for t in RECORD_TABLES.values())
        now_us = time.time_ns() // 1000
        with self._write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (self._device_lock_key, device))
            if self.sealer is not None:
                conn.execute(
                    "INSERT INTO tombstones (pseudonym, boot_id, last_seq, erased_us) "
                    "SELECT %s, boot_id, last_seq, %s FROM boots WHERE device = %s "
                    "ON CONFLICT (pseudonym, boot_id) DO UPDATE SET "
                    "last_seq = greatest(tombstones.last_seq, excluded.last_seq), "
                    "erased_us = excluded.erased_us",
                    (self.sealer.pseudonym(device), now_us, device),
                )
            conn.execute("DELETE FROM boots WHERE device = %s", (device,))
            conn.execute(f"DELETE FROM devices WHERE {scope}", args)  # type: ignore[arg-type]
            conn.execute("DELETE FROM device_limits WHERE device = %s", (device,))
            if self.outbox:  # the stream's purge, after the device's entries in flight (outbox_take)
                conn.execute(f"DELETE FROM outbox_messages WHERE {scope}", args)  # type: ignore[arg-type]
                conn.execute("INSERT INTO outbox (device) VALUES (%s)", (device,))
        return deleted

    def _delete_in_chunks(self, table: str, where: str, args: tuple) -> int:
        """DELETE FROM `table` WHERE `where`, PURGE_CHUNK rows a transaction, raising record_cursor's
        high mark to the newest cursor deleted; the rows deleted. Their outbox entries go in the same
        statement: an erased or expired record is never published afterwards."""
        deleted = 0
        while True:
            with self._write() as conn:
                (n,) = conn.execute(  # type: ignore[misc]
                    f"WITH gone AS (DELETE FROM {table} WHERE cursor IN "  # type: ignore[arg-type]
                    f"(SELECT cursor FROM {table} WHERE {where} LIMIT %s) RETURNING cursor), "
                    "top AS (SELECT max(cursor) AS c FROM gone), "
                    "mark AS (UPDATE record_cursor SET high = (SELECT c FROM top) "
                    "WHERE high < (SELECT c FROM top)), "
                    "ob AS (DELETE FROM outbox WHERE cursor IN (SELECT cursor FROM gone)) "
                    "SELECT count(*) FROM gone",
                    (*args, PURGE_CHUNK),
                ).fetchone()
            deleted += int(n)
            if n < PURGE_CHUNK:
                return deleted

    def purge_before(self, start_us: int, families: Iterable[str] | None = None) -> int:
        """In chunks of PURGE_CHUNK records, each its own transaction; with every family, boots other
        than a device's current one that were last written before `start_us` go too."""
        scopes: dict[str, tuple[str, tuple]]
        if families is None:
            scopes = {t: ("", ()) for t in RECORD_TABLES.values()}
        else:
            chosen = sorted(set(families))
            for family in chosen:
                if family not in TABLE_OF:
                    raise ValueError(f"unknown family {family!r}; known {sorted(TABLE_OF)}")
            scopes = {
                t: (" AND family = ANY(%s)", ([f for f in chosen if TABLE_OF[f] == t],))
                for t in dict.fromkeys(TABLE_OF[f] for f in chosen)
            }
        total = 0
        for table, (where, args) in scopes.items():
            total += self._delete_in_chunks(table, f"start_us < %s{where}", (start_us, *args))
            # a message entry goes whole with its first record (its ID), as in SQLite
            fams = args[0] if args else sorted(f for f, t in TABLE_OF.items() if t == table)
            with self._write() as conn:
                conn.execute(
                    "DELETE FROM outbox_messages WHERE start_us < %s AND family = ANY(%s)",
                    (start_us, fams),
                )
        if families is not None:
            return total
        with self._write() as conn:
            conn.execute(
                "DELETE FROM boots WHERE updated_us < %s AND NOT EXISTS (SELECT 1 FROM devices d "
                "WHERE d.device = boots.device AND d.boot_id = boots.boot_id)",
                (start_us,),
            )
        return total

    # the outbox

    def name_drainer(self, name: str) -> None:
        """The name is claimed at the first take: held as a session advisory lock on a connection of its
        own, so that no two live drainers ever lease under one name, whatever their state dirs say (a
        state dir copied to a second host would give both the same name). A name another live drainer
        holds is not used: this one keeps its random name, and a crash of it leaves its devices to the
        lease, as before."""
        if self._leasing and name != self.outbox_holder:
            raise RuntimeError("a drainer is named before its first take")
        self._wanted_name = name

    def _claim_name(self) -> None:
        wanted = self._wanted_name
        assert wanted is not None
        with _errors():
            conn = psycopg.connect(
                make_conninfo(self._conninfo, application_name="bandgate-drainer"), autocommit=True
            )
            try:
                (held,) = conn.execute(  # type: ignore[misc]
                    "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (self._drainer_name_key, wanted)
                ).fetchone()
            except BaseException:
                conn.close()
                raise
        self._wanted_name = None
        if not held:
            conn.close()
            log.warning(
                "drainer name held by another live drainer; leasing under a name of this process",
                extra={"fields": {"event": "drainer_name_taken", "name": wanted}},
            )
            return
        self._name_conn = conn
        self.outbox_holder = wanted

    def outbox_take(self, limit: int = 500) -> list[OutboxRow]:
        """As SQLite's, for several drainers on one database (one a gateway). A drainer takes a device's
        entries only while it holds the device: a row of outbox_leases, claimed or renewed by each take,
        released when the page's entries of the device are done (`outbox_done`), by the next take, at
        close, or after `outbox_lease_s` without a take (a crashed gateway). So a device is published by
        one drainer at a time, in id order, and an erased device's purge entry is taken only after the
        drainer that had its records in flight is done with them (the erasure deleted their entries: only
        the lease still knows they are out).

        One transaction, in which no drainer waits for another: the oldest entries of devices no other
        drainer holds, `FOR UPDATE SKIP LOCKED` (drainers taking at the same moment pass each other's
        candidates by), their devices claimed under a transaction-scoped advisory lock each, tried and
        not waited for; then the page: the oldest entries of the devices held, locked `SKIP LOCKED` too and
        cut, per device, before the first entry another drainer has locked (so a device's entries are
        never taken out of order; the rest come next round); marked taken; their records. The values are
        opened after the commit. A take ends this object's previous page."""
        if limit <= 0:
            raise ValueError("limit must be positive")
        if self._wanted_name is not None:
            self._claim_name()
        now_us = time.time_ns() // 1000
        me = self.outbox_holder
        self._leasing = True
        with self._write() as conn:
            held = [
                d
                for (d,) in conn.execute(
                    _CLAIM_DEVICES,
                    {
                        "me": me,
                        "limit": limit,
                        "lease": int(self.outbox_lease_s * 1e6),
                        "key": self._outbox_lock_key,
                    },
                )
            ]
            listed = conn.execute(_HELD_ENTRIES, {"held": held, "limit": limit}).fetchall()
            locked = {
                id_
                for (id_,) in conn.execute(
                    "WITH r AS (SELECT id FROM outbox WHERE id = ANY(%(ids)s::bigint[]) "
                    "FOR UPDATE SKIP LOCKED), m AS (SELECT id FROM outbox_messages "
                    "WHERE id = ANY(%(ids)s::bigint[]) FOR UPDATE SKIP LOCKED) "
                    "SELECT id FROM r UNION ALL SELECT id FROM m",
                    {"ids": [row[0] for row in listed]},
                )
            }
            page, cut = [], set()
            for row in listed:  # a device's entries up to the first one locked elsewhere (or gone)
                if row[5] in cut or row[0] not in locked:  # row[5]: the entry's device
                    cut.add(row[5])
                    continue
                page.append(row)
            # the previous page is over: the devices held without an entry in this one go back
            conn.execute(
                "DELETE FROM outbox_leases WHERE holder = %s AND device <> ALL(%s::text[])",
                (me, sorted({row[5] for row in page})),
            )
            if any(row[3] is None for row in page):
                conn.execute(
                    "WITH r AS (UPDATE outbox SET taken_us = %(now)s WHERE id = ANY(%(ids)s::bigint[]) "
                    "AND taken_us IS NULL) UPDATE outbox_messages SET taken_us = %(now)s "
                    "WHERE id = ANY(%(ids)s::bigint[]) AND taken_us IS NULL",
                    {"now": now_us, "ids": [row[0] for row in page if row[3] is None]},
                )
            cursors = [row[2] for row in page if row[2] is not None]
            found: dict[int, tuple] = {}
            if cursors:
                union = " UNION ALL ".join(
                    f"SELECT {_RECORD_COLUMNS} FROM {t} WHERE cursor = ANY(%(c)s::bigint[])"
                    for t in RECORD_TABLES.values()
                )
                found = {row[0]: row for row in conn.execute(union, {"c": cursors})}  # type: ignore[call-overload]
        self._in_flight = {row[0]: row[5] for row in page}
        openers: dict = {}  # a key a device and ownership for the page
        out, dead = outbox_page(
            [row[:-1] for row in page if row[-1]],
            found,
            self._record,
            now_us,
            lambda entry: open_message(entry, self.sealer, self._display, openers),
        )
        dead += [row[0] for row in page if not row[-1]]  # a message entry whose first record is gone
        if dead:
            self.outbox_done(dead)
        return out

    def outbox_done(self, ids: Sequence[int]) -> int:
        """Delete the entries; the devices of this object's page with no entry of it left are released
        (in the same transaction), so another drainer may take their newer entries."""
        if not ids:
            return 0
        done = set(ids)
        left = {id_: device for id_, device in self._in_flight.items() if id_ not in done}
        finished = {self._in_flight[i] for i in done if i in self._in_flight} - set(left.values())
        with self._write() as conn:
            (n,) = conn.execute(  # type: ignore[misc]
                "WITH r AS (DELETE FROM outbox WHERE id = ANY(%(ids)s::bigint[]) RETURNING 1), "
                "m AS (DELETE FROM outbox_messages WHERE id = ANY(%(ids)s::bigint[]) RETURNING 1) "
                "SELECT (SELECT count(*) FROM r) + (SELECT count(*) FROM m)",
                {"ids": sorted(done)},
            ).fetchone()
            if finished:
                conn.execute(
                    "DELETE FROM outbox_leases WHERE holder = %s AND device = ANY(%s::text[])",
                    (self.outbox_holder, sorted(finished)),
                )
        self._in_flight = left
        return int(n)

    def _release_all(self) -> None:
        """Give back every device this object holds."""
        self._in_flight = {}
        with self._write() as conn:
            conn.execute("DELETE FROM outbox_leases WHERE holder = %s", (self.outbox_holder,))

    def outbox_depth(self) -> int:
        with self._connection() as conn:
            (n,) = conn.execute(  # type: ignore[misc]
                "SELECT (SELECT count(*) FROM outbox) + "
                "(SELECT coalesce(sum(records), 0) FROM outbox_messages)"
            ).fetchone()
        return int(n)

    def take_tokens(
        self, device_id: int, bucket: str, rate: float, burst: float, need: float, charge: float
    ) -> float:
        check_device_id(device_id)
        key = (device_key(device_id), bucket)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO device_limits (device, bucket, level, stamp_us) "
                f"VALUES (%s, %s, %s, {_NOW_US}) ON CONFLICT (device, bucket) DO NOTHING",
                (*key, burst),
            )
            level, stamp_us, now_us = conn.execute(  # type: ignore[misc]
                f"SELECT level, stamp_us, {_NOW_US} FROM device_limits "
                "WHERE device = %s AND bucket = %s FOR UPDATE",
                key,
            ).fetchone()
            level, wait_s = token_decision(level, (now_us - stamp_us) / 1e6, rate, burst, need, charge)
            conn.execute(
                "UPDATE device_limits SET level = %s, stamp_us = %s WHERE device = %s AND bucket = %s",
                (level, now_us, *key),
            )
        return wait_s

    # registry and audit

    @contextmanager
    def _snapshot(self) -> Iterator[psycopg.Connection]:
        """A read-only repeatable-read transaction: several reads that agree with each other."""
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield conn

    def registry_snapshot(self) -> RegistrySnapshot:
        with self._snapshot() as conn:
            (version,) = conn.execute("SELECT version FROM registry_version").fetchone()  # type: ignore[misc]
            (changes,) = conn.execute("SELECT coalesce(max(seq), 0) FROM registry_changes").fetchone()  # type: ignore[misc]
            rows = _registry_rows(conn, None)
        return RegistrySnapshot(int(version), *rows, changes=int(changes))

    def registry_listener(self) -> RegistryListener:
        """A listener for this schema's registry changes, by any gateway (LISTEN/NOTIFY; it connects on
        its first wait, on its own connection, from the event loop)."""
        given = conninfo_to_dict(self._conninfo)
        conninfo = make_conninfo(self._conninfo, application_name=given.get("application_name", "bandgate"))
        return RegistryListener(conninfo, registry_channel(self.schema))

    def registry_version(self) -> int:
        with self._connection() as conn:
            (version,) = conn.execute("SELECT version FROM registry_version").fetchone()  # type: ignore[misc]
        return int(version)

    def registry_delta(self, snapshot: RegistrySnapshot) -> RegistryDelta | None:
        with self._snapshot() as conn:
            (version,) = conn.execute("SELECT version FROM registry_version").fetchone()  # type: ignore[misc]
            (last,) = conn.execute("SELECT coalesce(max(seq), 0) FROM registry_changes").fetchone()  # type: ignore[misc]
            logged, first = conn.execute(  # type: ignore[misc]
                "SELECT count(*), min(seq) FROM registry_changes WHERE seq > %s", (snapshot.changes,)
            ).fetchone()
            (versions,) = conn.execute(  # type: ignore[misc]
                "SELECT count(DISTINCT version) FROM registry_changes WHERE seq > %s AND version > %s",
                (snapshot.changes, snapshot.version),
            ).fetchone()
            if not change_log_whole(snapshot, version, last, logged, first, versions):
                return None
            subjects = frozenset(
                s
                for (s,) in conn.execute(
                    "SELECT DISTINCT subject FROM registry_changes WHERE seq > %s AND subject != '' LIMIT %s",
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
            # first, the version row locked: registry changes and audit appends from many gateways queue
            conn.execute("SELECT version FROM registry_version FOR UPDATE")
            if audit:
                (last,) = conn.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()  # type: ignore[misc]
                if [row.seq for row in audit] != list(range(last + 1, last + 1 + len(audit))):
                    raise AuditConflict(f"audit rows must continue the log at seq {last + 1}")
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO audit (seq, time_us, entry, mac) VALUES (%s, %s, %s, %s)",
                        [(r.seq, r.time_us, r.entry, r.mac) for r in audit],
                    )
            for cp in checkpoints:
                (before,) = conn.execute("SELECT coalesce(max(seq), 0) FROM audit_segments").fetchone()  # type: ignore[misc]
                row = conn.execute("SELECT mac FROM audit WHERE seq = %s", (cp.seq,)).fetchone()
                if row is None or row[0] != cp.mac or cp.seq <= before or not 0 < cp.first_seq <= cp.seq:
                    raise StoreError(f"checkpoint {cp.seq} is no stored entry after checkpoint {before}")
                conn.execute(
                    "INSERT INTO audit_segments (seq, mac, first_seq, first_time_us, last_time_us) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (cp.seq, cp.mac, cp.first_seq, cp.first_time_us, cp.last_time_us),
                )
            changed, touched = False, set()
            for op in ops:
                changed |= _apply_registry_op(conn, op, now_us, touched)
                touched |= op_subjects(op)
            if changed:
                conn.execute("UPDATE registry_version SET version = version + 1")
            (version,) = conn.execute("SELECT version FROM registry_version").fetchone()  # type: ignore[misc]
            if touched or changed:
                (last,) = conn.execute("SELECT coalesce(max(seq), 0) FROM registry_changes").fetchone()  # type: ignore[misc]
                listed, last = change_entries(touched, ops, last)
                erased = [subject("device", op.device) for op in ops if op.op == "forget"]
                if erased:
                    conn.execute("DELETE FROM registry_changes WHERE subject = ANY(%s::text[])", (erased,))
                conn.execute(
                    "INSERT INTO registry_changes (seq, version, subject) "
                    "SELECT %s + n, %s, s FROM unnest(%s::text[]) WITH ORDINALITY AS c(s, n)",
                    (last, version, listed),
                )
                conn.execute(
                    "DELETE FROM registry_changes WHERE seq <= %s",
                    (last + len(listed) - REGISTRY_CHANGES_KEPT,),
                )
        return int(version)

    def privacy_history(self, device: str) -> PrivacyHistory:
        check_principal("device", device)
        with self._snapshot() as conn:
            return read_privacy_history(conn.execute, device, "%s")

    def audit_rows(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRow]:
        if limit <= 0:
            raise ValueError("limit must be positive")
        with self._connection() as conn:
            return [
                AuditRow(*row)
                for row in conn.execute(
                    "SELECT seq, time_us, entry, mac FROM audit WHERE seq > %s ORDER BY seq LIMIT %s",
                    (after_seq, limit),
                )
            ]

    def audit_last(self) -> AuditRow | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT seq, time_us, entry, mac FROM audit ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return None if row is None else AuditRow(*row)

    def audit_checkpoints(self, after_seq: int = 0, limit: int = 1000) -> list[AuditCheckpoint]:
        if limit <= 0:
            raise ValueError("limit must be positive")
        with self._connection() as conn:
            return [
                AuditCheckpoint(*row)
                for row in conn.execute(
                    "SELECT seq, mac, first_seq, first_time_us, last_time_us FROM audit_segments "
                    "WHERE seq > %s ORDER BY seq LIMIT %s",
                    (after_seq, limit),
                )
            ]

    def audit_checkpoint_last(self) -> AuditCheckpoint | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT seq, mac, first_seq, first_time_us, last_time_us FROM audit_segments "
                "ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return None if row is None else AuditCheckpoint(*row)

    def audit_drop_through(self, seq: int) -> int:
        with self._write() as conn:
            conn.execute("SELECT version FROM registry_version FOR UPDATE")  # not beside an append
            if conn.execute("SELECT 1 FROM audit_segments WHERE seq = %s", (seq,)).fetchone() is None:
                raise StoreError(f"audit entry {seq} ends no segment: only whole segments are dropped")
            (newest,) = conn.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()  # type: ignore[misc]
            if seq >= newest:
                raise StoreError(f"audit entry {seq} is the newest: the log's head is never dropped")
            n = conn.execute("DELETE FROM audit WHERE seq <= %s", (seq,)).rowcount
            conn.execute("DELETE FROM audit_segments WHERE seq < %s", (seq,))
        return n


def _apply_registry_op(conn: psycopg.Connection, op: RegistryOp, now_us: int, touched: set[str]) -> bool:
    """One checked registry op inside the caller's transaction; whether it changed policy, and into
    `touched` the subjects the op does not name (as SQLite's)."""
    if op.op == "principal":
        conn.execute(
            "INSERT INTO principals (kind, name, state, created_us, updated_us) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (kind, name) DO UPDATE SET state = excluded.state, updated_us = excluded.updated_us",
            (op.kind, op.name, op.state, now_us, now_us),
        )
    elif op.op == "credential":
        c = op.credential
        assert c is not None
        # an id already stored keeps its owner, whose rows this changes (whoever the op names)
        for kind, name in conn.execute(
            "INSERT INTO credentials (id, kind, name, serial, not_after_us, state, created_us) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET state = excluded.state "
            "RETURNING kind, name",
            (c.id, c.kind, c.name, c.serial, c.not_after_us, c.state, c.created_us or now_us),
        ).fetchall():
            touched.add(subject(kind, name))
    elif op.op == "credential_state":
        for kind, name in conn.execute(
            "UPDATE credentials SET state = %s WHERE id = %s RETURNING kind, name", (op.state, op.name)
        ).fetchall():
            touched.add(subject(kind, name))
    elif op.op == "revoke":
        conn.execute(
            "UPDATE principals SET state = 'revoked', updated_us = %s WHERE kind = %s AND name = %s",
            (now_us, op.kind, op.name),
        )
        conn.execute(
            "UPDATE credentials SET state = 'revoked' WHERE kind = %s AND name = %s", (op.kind, op.name)
        )
    elif op.op == "bind":
        conn.execute(
            "INSERT INTO bindings (relay, device, created_us) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (op.name, op.device, now_us),
        )
    elif op.op == "unbind":
        conn.execute("DELETE FROM bindings WHERE relay = %s AND device = %s", (op.name, op.device))
    elif op.op == "grant":
        g = op.grant
        assert g is not None
        conn.execute(
            "INSERT INTO grants (consumer, family, operation, devices, created_us) "
            "VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (consumer, family, operation) DO UPDATE SET devices = excluded.devices",
            (g.consumer, g.family, g.operation, " ".join(sorted(set(g.devices))), now_us),
        )
    elif op.op == "ungrant":
        g = op.grant
        assert g is not None
        conn.execute(
            "DELETE FROM grants WHERE consumer = %s AND family = %s AND operation = %s",
            (g.consumer, g.family, g.operation),
        )
    elif op.op == "seen":
        conn.execute(
            "UPDATE principals SET last_seen_us = greatest(coalesce(last_seen_us, 0), %s) "
            "WHERE kind = %s AND name = %s",
            (op.time_us, op.kind, op.name),
        )
        return False
    elif op.op == "ownership":
        conn.execute(
            "UPDATE ownerships SET ended_us = %s WHERE device = %s AND ended_us IS NULL AND ownership != %s",
            (now_us, op.device, op.ownership),
        )
        conn.execute(
            "INSERT INTO ownerships (device, ownership, started_us) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (op.device, op.ownership, now_us),
        )
    elif op.op == "consent":
        conn.execute(
            "INSERT INTO consent (device, ownership, family, granted, time_us, actor) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (op.device, op.ownership, op.family, bool(op.granted), op.time_us or now_us, op.actor),
        )
    elif op.op == "guardian":
        conn.execute(
            "INSERT INTO guardians (device, ownership, guardian, time_us, actor) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (op.device, op.ownership, op.name, op.time_us or now_us, op.actor),
        )
    elif op.op == "unguardian":
        conn.execute(
            "DELETE FROM guardians WHERE device = %s AND ownership = %s AND guardian = %s",
            (op.device, op.ownership, op.name),
        )
    elif op.op == "profile":
        conn.execute(
            "INSERT INTO profiles (device, ownership, version, sealed, time_us) VALUES (%s, %s, %s, %s, %s)",
            (op.device, op.ownership, op.version, op.sealed, op.time_us or now_us),
        )
    elif op.op == "totp":
        if op.sealed:
            conn.execute(
                "INSERT INTO totp (device, ownership, sealed, last_step, time_us) VALUES (%s, %s, %s, 0, %s) "
                "ON CONFLICT (device, ownership) DO UPDATE SET sealed = excluded.sealed, last_step = 0, "
                "time_us = excluded.time_us",
                (op.device, op.ownership, op.sealed, now_us),
            )
        else:
            conn.execute("DELETE FROM totp WHERE device = %s AND ownership = %s", (op.device, op.ownership))
    elif op.op == "forget":
        scope, args = ("device = %s", (op.device,))
        if op.ownership:
            scope, args = "device = %s AND ownership = %s", (op.device, op.ownership)
        for table in ("consent", "guardians", "profiles", "totp", "ownerships"):  # names of ours, no input
            conn.execute(f"DELETE FROM {table} WHERE {scope}", args)  # type: ignore[arg-type]
        conn.execute("DELETE FROM principals WHERE kind = 'device' AND name = %s", (op.device,))
        conn.execute("DELETE FROM credentials WHERE kind = 'device' AND name = %s", (op.device,))
        conn.execute("DELETE FROM bindings WHERE device = %s", (op.device,))
        for consumer, family, operation, devices in conn.execute(
            "SELECT consumer, family, operation, devices FROM grants WHERE ' ' || devices || ' ' LIKE %s",
            (f"% {op.device} %",),
        ).fetchall():
            touched.add(subject("consumer", consumer))
            rest = " ".join(d for d in devices.split() if d != op.device)
            if rest:
                conn.execute(
                    "UPDATE grants SET devices = %s WHERE consumer = %s AND family = %s AND operation = %s",
                    (rest, consumer, family, operation),
                )
            else:
                conn.execute(
                    "DELETE FROM grants WHERE consumer = %s AND family = %s AND operation = %s",
                    (consumer, family, operation),
                )
    elif op.op == "totp_used":
        conn.execute(
            "UPDATE totp SET last_step = greatest(last_step, %s) WHERE device = %s AND ownership = %s",
            (op.version, op.device, op.ownership),
        )
        return False
    return True


def _registry_rows(conn: psycopg.Connection, subjects: frozenset[str] | None) -> tuple[tuple, ...]:
    """The registry's rows in RegistrySnapshot's order of fields: all of them (`subjects` None), or those
    about `subjects` ("kind:name": a principal's own rows; a binding is about its relay and its device)."""
    names: dict[str, list[str]] = {}
    where, args = "", {}
    if subjects is not None:
        names = {k: sorted(v) for k, v in names_by_kind(subjects).items()}
        pairs = [(k, n) for k, listed in names.items() for n in listed]
        where = "WHERE (kind, name) IN (SELECT * FROM unnest(%(kinds)s::text[], %(names)s::text[])) "
        args = {"kinds": [k for k, _ in pairs], "names": [n for _, n in pairs]}
    principals = tuple(
        PrincipalRow(*row)
        for row in conn.execute(
            "SELECT kind, name, state, created_us, updated_us, last_seen_us FROM principals "  # type: ignore[arg-type]
            f"{where}ORDER BY kind, name",
            args,
        )
    )
    credentials = tuple(
        CredentialRow(*row)
        for row in conn.execute(
            "SELECT id, kind, name, serial, not_after_us, state, created_us FROM credentials "  # type: ignore[arg-type]
            f"{where}ORDER BY kind, name, created_us",
            args,
        )
    )
    if subjects is None:
        bindings = conn.execute("SELECT relay, device FROM bindings ORDER BY relay, device").fetchall()
        grants_sql, grants_args = "", {}
    else:
        bindings = conn.execute(
            "SELECT relay, device FROM bindings WHERE relay = ANY(%s::text[]) UNION "
            "SELECT relay, device FROM bindings WHERE device = ANY(%s::text[]) ORDER BY relay, device",
            (names["relay"], names["device"]),
        ).fetchall()
        grants_sql, grants_args = (
            "WHERE consumer = ANY(%(consumers)s::text[]) ",
            {"consumers": names["consumer"]},
        )
    grants = tuple(
        GrantRow(c, f, o, tuple(devices.split()))
        for c, f, o, devices in conn.execute(
            f"SELECT consumer, family, operation, devices FROM grants {grants_sql}"  # type: ignore[arg-type]
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
    conn: psycopg.Connection, devices: list[str] | None = None
) -> tuple[
    tuple[OwnershipRow, ...],
    tuple[ConsentRow, ...],
    tuple[GuardianRow, ...],
    tuple[SealedRow, ...],
    tuple[SealedRow, ...],
]:
    """Current ownerships and, of those, the latest consent per family, guardians, latest profile, TOTP;
    of every device, or of `devices` only."""
    current = "JOIN ownerships o ON o.device = x.device AND o.ownership = x.ownership AND o.ended_us IS NULL"
    mine, only, args = "", "", {}
    if devices is not None:
        mine = " AND x.device = ANY(%(devices)s::text[])"
        # and on the ownerships side of a join: a planner without statistics (tables not yet analysed)
        # otherwise hashes every current ownership to join one device's rows
        only = f"{mine} AND o.device = ANY(%(devices)s::text[])"
        args = {"devices": devices}
    ownerships = tuple(
        OwnershipRow(*r)
        for r in conn.execute(
            "SELECT device, ownership, started_us FROM ownerships x WHERE ended_us IS NULL"  # type: ignore[arg-type]
            f"{mine} ORDER BY device",
            args,
        )
    )
    consents = tuple(
        ConsentRow(d, o, f, bool(g), t, a)
        for d, o, f, g, t, a in conn.execute(
            # the latest decision per family by DISTINCT ON, not a join on max(seq): on tables not yet
            # analysed (a bulk enrolment) the planner took that join for one row and nested it, 10^10
            # comparisons at 100,000 devices; this is one sort whatever the statistics say
            "SELECT DISTINCT ON (x.device, x.ownership, x.family) x.device, x.ownership, x.family, "  # type: ignore[arg-type]
            f"x.granted, x.time_us, x.actor FROM consent x {current} WHERE true{only} "
            "ORDER BY x.device, x.ownership, x.family, x.seq DESC",
            args,
        )
    )
    guardians = tuple(
        GuardianRow(*r)
        for r in conn.execute(
            "SELECT x.device, x.ownership, x.guardian, x.time_us, x.actor FROM guardians x "  # type: ignore[arg-type]
            f"{current} WHERE true{only} ORDER BY x.device, x.guardian",
            args,
        )
    )
    profiles = tuple(
        SealedRow(d, o, v, bytes(s), t)
        for d, o, v, s, t in conn.execute(
            "SELECT x.device, x.ownership, x.version, x.sealed, x.time_us FROM profiles x "  # type: ignore[arg-type]
            f"{current} WHERE x.version = (SELECT max(version) FROM profiles y WHERE y.device = x.device "
            f"AND y.ownership = x.ownership){only} ORDER BY x.device",
            args,
        )
    )
    totp = tuple(
        SealedRow(d, o, v, bytes(s), t)
        for d, o, v, s, t in conn.execute(
            f"SELECT x.device, x.ownership, x.last_step, x.sealed, x.time_us FROM totp x {current} "  # type: ignore[arg-type]
            f"WHERE true{only} ORDER BY x.device",
            args,
        )
    )
    return ownerships, consents, guardians, profiles, totp


@contextmanager
def _errors() -> Iterator[None]:
    """Translate psycopg errors: transient ones (connection lost or refused, lock timeout, deadlock,
    server shutting down, disk full, a read-only standby) to StoreUnavailable, the rest to StoreError."""
    try:
        yield
    except psycopg.InterfaceError:
        raise  # a bug in the caller, not a state of the store
    except psycopg.Error as e:
        state = e.sqlstate or ""
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if (
            (isinstance(e, psycopg.OperationalError) and not state)  # incl. the pool's timeout
            or state[:2] in _UNAVAILABLE_CLASSES
            or state in _UNAVAILABLE_STATES
        ):
            raise StoreUnavailable(f"postgresql: {detail} ({state or type(e).__name__})") from e
        raise StoreError(f"postgresql: {detail} ({state or type(e).__name__})") from e


def _widen(xid: int, next_xid: int) -> int:
    """A 32-bit transaction ID (pg_locks shows no epoch) as the 64-bit one, given the next 64-bit ID."""
    full = (next_xid & ~0xFFFFFFFF) | xid
    return full - (1 << 32) if full >= next_xid else full


def _int32(n: int) -> int:
    """An unsigned 32-bit hash as the signed int4 an advisory lock key is."""
    return n - (1 << 32) if n >= 1 << 31 else n


def _redacted(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
