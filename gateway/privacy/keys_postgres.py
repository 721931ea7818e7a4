"""The key store in PostgreSQL: the same data keys as `keys.KeyStore`, in a schema of their own
(`bandgate_keys` by default) of the feature store's database, which every gateway of a fleet shares.

Why the store's database and not a file per gateway: a device moves between gateways, so its key must be
one key wherever it lands, and an erasure made through one gateway must reach the others. Why a schema of
its own: it can be dumped on its own schedule (`pg_dump -n bandgate_keys`) and left out of the feature
backups, no consumer role is ever granted it (`bandgate admin db-grants` revokes it explicitly), and two
key stores (a test's, a second environment's) can share a database without sharing keys.

```python
with PostgresKeyStore("postgresql://gateway@db/bandgate", kek) as keys:
    key = keys.data_key(device_id, ownership)
    keys.destroy(device_id)     # committed (synchronous_commit on) before it returns
```

Another gateway's destroy reaches this one by LISTEN/NOTIFY: a destroy notifies the schema's channel in
its own transaction, and every `data_key` call first drains this store's listening connection (a poll of
a few microseconds) and forgets the named device's keys that are gone. A lost listening connection may
have missed notifications, so on reconnecting every held key is checked against the table again.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from gateway.privacy.crypto import (
    DataKey,
    UnwrapError,
    new_key,
    new_key_id,
    normalize_device,
    normalize_ownership,
    wrap_aad,
)
from gateway.privacy.keys import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_KEY_SCHEMA,
    KEK_ENV,
    KEK_FILE,
    HeldKeys,
    KekError,
    KeyEncryptionKey,
    KeyStoreError,
    KeyStoreUnavailable,
    NoDataKey,
    check_key_schema,
)

__all__ = ["PostgresKeyStore", "libpq_url"]

SCHEMA_VERSION = 1
CONNECT_TIMEOUT_S = 5
_LOCK_CLASS = 0x62676B73  # "bgks": the advisory lock class of key store migrations

log = logging.getLogger("bandgate.privacy")
T = TypeVar("T")


class PostgresKeyStore:
    """Data keys per device × ownership, wrapped by `kek`, in `schema`.data_keys of the database at `url`.

    Thread-safe: one connection for reads and writes and one listening for other gateways' destroys,
    both behind one lock; unwrapped keys in a bounded LRU, one `DataKey` object per device × ownership
    (`keys.HeldKeys`). A create and a destroy each commit with synchronous_commit on, whatever the
    database's default: a key is durable before anything is sealed under it, and a destroy before the
    erasure goes on. A dropped connection is reopened at the next call; while it cannot be, calls raise
    `KeyStoreUnavailable`. `open`/`close` as `KeyStore`."""

    def __init__(
        self,
        url: str,
        kek: KeyEncryptionKey,
        *,
        schema: str = DEFAULT_KEY_SCHEMA,
        cache_size: int = DEFAULT_CACHE_SIZE,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ):
        self.url = libpq_url(url)
        self.schema = check_key_schema(schema)
        self._kek = kek
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._listen: psycopg.Connection | None = None
        self._listen_lost = False  # a FATAL arrived on the listening connection: it may have missed some
        self._opened = False
        self._keys = HeldKeys(cache_size)
        self._channel = f"{self.schema}_destroyed"[:63]
        self._table = sql.Identifier(self.schema, "data_keys")

    def __repr__(self) -> str:  # the URL may carry a password: the host and database only
        state = "open" if self._opened else "closed"
        where = f"{_where(self.url)!r}, schema={self.schema!r}"
        return f"PostgresKeyStore({where}, kek_id={self._kek.key_id!r}, {state})"

    def __enter__(self) -> PostgresKeyStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Connect, create the schema and its table on first use (one migrator at a time, under an
        advisory lock), start listening, and check the KEK: KekError if the table holds keys and none was
        wrapped by this KEK."""
        with self._lock:
            if self._opened:
                return
            try:
                conn = self._connect()
                try:
                    self._prepare(conn)
                    listen = self._connect_listener()
                except BaseException:
                    conn.close()
                    raise
            except psycopg.OperationalError as e:
                raise KeyStoreUnavailable(
                    f"key store {self._name()} cannot be opened: {_reason(e)}"
                ) from None
            except psycopg.Error as e:
                raise KeyStoreError(f"key store {self._name()} cannot be opened: {_reason(e)}") from None
            self._conn, self._listen, self._opened = conn, listen, True

    def close(self) -> None:
        """Forget every unwrapped key (holders get KeyDestroyed) and close both connections."""
        with self._lock:
            self._keys.forget_all()
            for conn in (self._conn, self._listen):
                if conn is not None:
                    conn.close()
            self._conn = self._listen = None
            self._opened = False

    def data_key(self, device_id: str | int, ownership: str, *, create: bool = True) -> DataKey:
        """As `KeyStore.data_key`: the key, made durably on first use when `create`, NoDataKey when there
        is none and not `create`. A cache hit costs a poll of the listening connection."""
        slot = (normalize_device(device_id), normalize_ownership(ownership))
        with self._lock:
            self._notice_other_gateways()
            key = self._keys.get(slot)
            if key is None:
                key = self._load(slot, create)
                self._keys.put(slot, key)
            return key

    def ownerships(self, device_id: str | int) -> list[str]:
        """The ownerships `device_id` has a data key under, sorted."""
        device = normalize_device(device_id)
        query = sql.SQL("SELECT ownership FROM {} WHERE device = %s ORDER BY ownership").format(self._table)

        def read(cur: psycopg.Cursor) -> list[str]:
            cur.execute(query, (device,))
            return [row[0] for row in cur.fetchall()]

        with self._lock:
            return self._run(read)

    def destroy(self, device_id: str | int, ownership: str | None = None) -> int:
        """Erase: delete the device's wrapped keys (under `ownership`, or all of them), notify the other
        gateways, commit durably, and forget them here. Idempotent; returns the number deleted. Raises
        (KeyStoreUnavailable) rather than return before the commit is known; the wrapped bytes stay in
        dead tuples until vacuum, and in WAL and backups (docs/privacy-keys.md, 'PostgreSQL')."""
        device = normalize_device(device_id)
        owner = None if ownership is None else normalize_ownership(ownership)
        if owner is None:
            delete = sql.SQL("DELETE FROM {} WHERE device = %s").format(self._table)
            params: tuple[str, ...] = (device,)
        else:
            delete = sql.SQL("DELETE FROM {} WHERE device = %s AND ownership = %s").format(self._table)
            params = (device, owner)

        def delete_and_notify(cur: psycopg.Cursor) -> int:
            cur.execute(delete, params)
            count = cur.rowcount
            # delivered at commit, to every listening gateway (this one too, which re-checks: harmless)
            cur.execute("SELECT pg_notify(%s, %s)", (self._channel, device))
            return count

        with self._lock:
            count = self._run(delete_and_notify)
            self._keys.forget(lambda slot: slot[0] == device and (owner is None or slot[1] == owner))
        log.info(
            "data keys destroyed",
            extra={"fields": {"event": "data_keys_destroyed", "device": device, "count": count}},
        )
        return count

    # inside the lock

    def _name(self) -> str:
        return f"{_where(self.url)} schema {self.schema}"

    def _connect(self, autocommit: bool = False) -> psycopg.Connection:
        return psycopg.connect(
            self.url,
            autocommit=autocommit,
            connect_timeout=max(1, round(self._connect_timeout_s)),
            application_name="bandgate-keys",
            # a silently dropped peer (no FATAL, no FIN) is noticed in ~20 s, not at the TCP timeout
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=3,
            keepalives_count=3,
        )

    def _connect_listener(self) -> psycopg.Connection:
        listen = self._connect(autocommit=True)
        self._listen_lost = False

        def on_notice(diag: psycopg.errors.Diagnostic) -> None:
            # A terminated backend (pg_terminate_backend, shutdown, failover) sends FATAL, which a poll
            # that does not block reads as a notice, one call before the closed socket shows.
            if diag.severity_nonlocalized in ("FATAL", "PANIC") or (diag.sqlstate or "")[:2] in ("08", "57"):
                self._listen_lost = True

        listen.add_notice_handler(on_notice)
        try:
            listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except BaseException:
            listen.close()
            raise
        return listen

    def _run(self, work: Callable[[psycopg.Cursor], T]) -> T:
        """`work` in one transaction on the main connection, with synchronous_commit on (the commit returns
        once the WAL is flushed, and replicated where configured). A connection found lost (a restart, a
        failover, a terminated backend) is replaced and `work` run once more: every piece of work here is
        idempotent, so a commit whose answer was lost is harmless to repeat."""
        if not self._opened:
            raise KeyStoreError(f"key store {self._name()} is not open")
        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    self._conn = self._connect()
                with self._conn.transaction(), self._conn.cursor() as cur:
                    cur.execute("SET LOCAL synchronous_commit = on")
                    return work(cur)
            except psycopg.OperationalError as e:
                if attempt == 1 and self._conn is not None and (self._conn.broken or self._conn.closed):
                    continue
                raise KeyStoreUnavailable(f"key store {self._name()}: {_reason(e)}") from None
            except psycopg.Error as e:
                raise KeyStoreError(f"key store {self._name()}: {_reason(e)}") from None
        raise AssertionError("unreachable")

    def _prepare(self, conn: psycopg.Connection) -> None:
        schema = sql.Identifier(self.schema)
        with conn.transaction(), conn.cursor() as cur:
            # two gateways starting on an empty database: one creates, the other waits and finds it made
            cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, self.schema))
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,))
            if cur.fetchone() is None:  # checked first: a gateway without CREATE may use a schema made for it
                cur.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            cur.execute("SELECT to_regclass(%s)", (f"{self.schema}.schema_version",))
            if cur.fetchone()[0] is None:
                cur.execute(
                    sql.SQL("CREATE TABLE {} (version integer NOT NULL)").format(
                        sql.Identifier(self.schema, "schema_version")
                    )
                )
                cur.execute(
                    sql.SQL("INSERT INTO {} (version) VALUES (0)").format(
                        sql.Identifier(self.schema, "schema_version")
                    )
                )
            cur.execute(
                sql.SQL("SELECT version FROM {}").format(sql.Identifier(self.schema, "schema_version"))
            )
            version = cur.fetchone()[0]
            if version > SCHEMA_VERSION:
                raise KeyStoreError(
                    f"key store {self._name()} is schema {version}; this gateway knows {SCHEMA_VERSION}"
                )
            if version < 1:
                cur.execute(
                    sql.SQL(
                        """CREATE TABLE {} (
                            device text NOT NULL,
                            ownership text NOT NULL,
                            key_id bigint NOT NULL,
                            kek_id text NOT NULL,
                            wrapped bytea NOT NULL,
                            created_us bigint NOT NULL,
                            PRIMARY KEY (device, ownership)
                        )"""
                    ).format(self._table)
                )
                cur.execute(
                    sql.SQL("UPDATE {} SET version = %s").format(
                        sql.Identifier(self.schema, "schema_version")
                    ),
                    (SCHEMA_VERSION,),
                )
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT DISTINCT kek_id FROM {}").format(self._table))
            kek_ids = {row[0] for row in cur.fetchall()}
        if kek_ids and self._kek.key_id not in kek_ids:
            raise KekError(
                f"key store {self._name()} holds keys wrapped by KEK {', '.join(sorted(kek_ids))}, "
                f"not by this KEK ({self._kek.key_id}): wrong {KEK_ENV} or {KEK_FILE}?"
            )

    def _notice_other_gateways(self) -> None:
        """Forget the held keys of devices another gateway destroyed since the last call; after a lost
        listening connection, of every device whose key is gone or replaced."""
        if not self._opened:
            raise KeyStoreError(f"key store {self._name()} is not open")
        devices: set[str] | None = set()
        try:
            if self._listen is None or self._listen.closed or self._listen.broken:
                raise psycopg.OperationalError("the listening connection was lost")
            for note in self._listen.notifies(timeout=0):
                devices.add(note.payload)
            if self._listen_lost:
                raise psycopg.OperationalError("the listening connection was terminated")
        except psycopg.OperationalError:
            if self._listen is not None:
                self._listen.close()
            self._listen = None
            try:
                self._listen = self._connect_listener()
            except psycopg.Error as e:
                raise KeyStoreUnavailable(f"key store {self._name()}: {_reason(e)}") from None
            devices = None  # whatever was notified meanwhile is lost: check every held key
        held = [(slot, key) for slot, key in self._keys.held() if devices is None or slot[0] in devices]
        if not held:
            return
        query = sql.SQL("SELECT device, ownership, key_id FROM {} WHERE device = ANY(%s)").format(self._table)

        def read(cur: psycopg.Cursor) -> dict[tuple[str, str], int]:
            cur.execute(query, (sorted({slot[0] for slot, _ in held}),))
            return {(device, ownership): key_id for device, ownership, key_id in cur.fetchall()}

        current = self._run(read)
        gone = {slot for slot, key in held if current.get(slot) != key.key_id}
        self._keys.forget(gone.__contains__)

    def _load(self, slot: tuple[str, str], create: bool) -> DataKey:
        device, ownership = slot
        select = sql.SQL(
            "SELECT key_id, kek_id, wrapped FROM {} WHERE device = %s AND ownership = %s"
        ).format(self._table)

        def read(cur: psycopg.Cursor) -> tuple | None:
            cur.execute(select, slot)
            return cur.fetchone()

        row = self._run(read)
        if row is None:
            if not create:
                raise NoDataKey(
                    f"no data key for device {device} ownership {ownership!r} (none made, or erased)"
                )
            key_id, raw = new_key_id(), new_key()
            wrapped = self._kek.wrap(raw, wrap_aad(device, ownership, key_id))
            insert = sql.SQL(
                "INSERT INTO {} (device, ownership, key_id, kek_id, wrapped, created_us) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (device, ownership) DO NOTHING"
            ).format(self._table)

            def create_or_read(cur: psycopg.Cursor) -> tuple:
                # another gateway may have made this key since the SELECT: the insert waits for its
                # commit and does nothing, and the SELECT (a new snapshot, READ COMMITTED) reads theirs
                cur.execute(
                    insert, (device, ownership, key_id, self._kek.key_id, wrapped, time.time_ns() // 1000)
                )
                cur.execute(select, slot)
                return cur.fetchone()

            row = self._run(create_or_read)
            if row[0] == key_id:
                return DataKey(device, ownership, key_id, raw)
        key_id, kek_id, wrapped = row
        if kek_id != self._kek.key_id:
            raise KekError(
                f"data key of device {device} ownership {ownership!r} was wrapped by KEK {kek_id}, "
                f"not by this KEK ({self._kek.key_id})"
            )
        try:
            raw = self._kek.unwrap(bytes(wrapped), wrap_aad(device, ownership, key_id))
        except UnwrapError as e:
            raise KeyStoreError(f"data key of device {device} ownership {ownership!r}: {e}") from None
        return DataKey(device, ownership, key_id, raw)


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    return frozenset(opt.keyword.decode() for opt in psycopg.pq.Conninfo.get_defaults())


def libpq_url(url: str) -> str:
    """The store URL without the query parameters that are the store's own (`?schema=`, pool sizes:
    gateway/store/postgres.py), which libpq would refuse; libpq's own (`sslmode`, ...) are kept."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    known = _libpq_keywords()
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k in known]
    return urlunsplit(parts._replace(query=urlencode(kept, quote_via=quote)))


def _where(url: str) -> str:
    """host:port/database of a connection URL, without user or password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://?"
    host, port, db = info.get("host", ""), info.get("port", ""), info.get("dbname", "")
    return f"postgresql://{host}{':' + str(port) if port else ''}/{db}"


def _reason(e: psycopg.Error) -> str:
    """An error's first line: the server's message, never the connection string or a parameter."""
    diag = getattr(e, "diag", None)
    message = (diag.message_primary if diag is not None else None) or next(iter(str(e).splitlines()), "")
    return f"{type(e).__name__}: {message}" if message else type(e).__name__
