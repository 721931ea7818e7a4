"""Keys for encryption at rest: a key-encryption key (KEK), per device × ownership data keys wrapped by it
in a key store of their own, and the pseudonym key behind erasure tombstones.

Erasing a device is destroying its data keys: the sealed feature rows may stay in the feature store and
its backups, and no longer open. The key store is kept apart from the features for that reason: it is
small, it can be backed up on its own schedule, and a key store backup taken before an erasure is the one
thing that (with the KEK) still opens that device's rows. Two key stores behind one protocol
(`DataKeyStore`): a SQLite file (`keys.db`, `KeyStore`) beside an SQLite feature store, and a schema of
its own (`bandgate_keys`) in the database of a PostgreSQL feature store (`keys_postgres.PostgresKeyStore`),
which every gateway of a fleet shares; `key_store_for_url` picks one from the store URL.
docs/privacy-keys.md has the design.

```python
kek = load_kek(state_dir)                      # $BANDGATE_KEK, else state_dir/kek.key (development only)
with KeyStore(state_dir / KEYS_DB, kek) as keys:
    token = keys.data_key(device_id, ownership).seal(values_json, family="steps", start_us=start_us)
    keys.destroy(device_id)                    # erasure: nothing of the device opens after this
```
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import sqlite3
import stat
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from gateway.privacy.crypto import (
    KEY_BYTES,
    DataKey,
    KekCipher,
    PseudonymKey,
    UnwrapError,
    device_pseudonym,
    new_key,
    new_key_id,
    normalize_device,
    normalize_ownership,
    wrap_aad,
)
from gateway.security.pki import PkiError, write_private

__all__ = [
    "DEFAULT_KEY_SCHEMA",
    "KEK_ENV",
    "KEK_FILE",
    "KEYS_DB",
    "TOMBSTONE_FILE",
    "DataKeyStore",
    "KekError",
    "KeyEncryptionKey",
    "KeyStore",
    "KeyStoreError",
    "KeyStoreUnavailable",
    "LocalKek",
    "NoDataKey",
    "check_key_schema",
    "device_pseudonym",
    "is_postgres_url",
    "key_store_for_url",
    "load_kek",
    "load_tombstone_key",
]

KEK_ENV = "BANDGATE_KEK"
KEK_FILE = "kek.key"
TOMBSTONE_FILE = "tombstone.key"
KEYS_DB = "keys.db"
DEFAULT_KEY_SCHEMA = "bandgate_keys"  # the PostgreSQL key store's schema in the feature store's database
POSTGRES_SCHEMES = ("postgresql", "postgres")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # needs no quoting, fits a NOTIFY channel's 63 bytes
DEFAULT_CACHE_SIZE = 4096  # unwrapped keys kept: one per active device × ownership, ~1 kB each
DEFAULT_BUSY_TIMEOUT_MS = 5000
SCHEMA_VERSION = 1

log = logging.getLogger("bandgate.privacy")

# A rowid table, not WITHOUT ROWID: interior pages of a rowid b-tree hold rowids only, so with
# secure_delete a destroyed row's wrapped key is zeroed where it lived and copied nowhere else. The
# UNIQUE index's interior pages may keep a device ID as a separator after a delete, never a key.
_SCHEMA = (
    """CREATE TABLE data_keys (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        ownership TEXT NOT NULL,
        key_id INTEGER NOT NULL,
        kek_id TEXT NOT NULL,
        wrapped BLOB NOT NULL,
        created_us INTEGER NOT NULL,
        UNIQUE (device, ownership)
    )""",
)


class KeyStoreError(Exception):
    """The key store cannot serve a key. Messages name devices, ownerships and key ids, never keys."""


class KekError(KeyStoreError):
    """The KEK is missing, exposed, malformed, or not the KEK the stored data keys were wrapped by."""


class KeyStoreUnavailable(KeyStoreError):  # noqa: N818 - the state it reports, as StoreUnavailable
    """The key store's database cannot be reached now: transient, nothing was created or destroyed (or,
    for a destroy, it may have been: a destroy is idempotent, so the erasure is retried)."""


class NoDataKey(KeyStoreError):  # noqa: N818 - an answer (never created, or erased), not a bug
    """No data key for this device × ownership: never created, or destroyed (the device was erased)."""


@runtime_checkable
class DataKeyStore(Protocol):
    """What the sealer, export and erasure ask of a key store, whichever database holds it. The contract
    every implementation keeps (tests/privacy/test_keys.py runs it against each):

    - one `DataKey` object per device × ownership while anyone holds it, so `destroy` reaches every holder;
    - `data_key(create=True)` by two processes at once agrees on one key;
    - `destroy` returns only once the deletion is durable, and a destroy by another process is noticed at
      a later `data_key` call (SQLite: the next; PostgreSQL: once its notification arrives, milliseconds);
    - `open` refuses a KEK that wrapped none of the stored keys; `close` is safe before `open` and twice,
      and forgets every unwrapped key."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> DataKeyStore: ...

    def __exit__(self, *exc: object) -> None: ...

    def data_key(self, device_id: str | int, ownership: str, *, create: bool = True) -> DataKey: ...

    def ownerships(self, device_id: str | int) -> list[str]: ...

    def destroy(self, device_id: str | int, ownership: str | None = None) -> int: ...


def check_key_schema(schema: str) -> str:
    """`schema` if it is a plain lower-case identifier of at most 63 bytes; ValueError otherwise."""
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"key schema {schema!r}: want 1-63 of [a-z0-9_], not starting with a digit")
    return schema


def is_postgres_url(url: str) -> bool:
    """Whether a store URL names a PostgreSQL database (whose key store is a schema in it)."""
    return url.partition("://")[0] in POSTGRES_SCHEMES and "://" in url


def key_store_for_url(
    store_url: str, state_dir: Path, kek: KeyEncryptionKey, *, schema: str = DEFAULT_KEY_SCHEMA
) -> DataKeyStore:
    """The key store that goes with the feature store `store_url`, not yet opened: schema `schema` of the
    same PostgreSQL database when the store is `postgresql://` (every gateway of a fleet must see one
    destroy), else `state_dir/keys.db`."""
    check_key_schema(schema)
    if is_postgres_url(store_url):
        from gateway.privacy.keys_postgres import PostgresKeyStore  # psycopg only where it is used

        return PostgresKeyStore(store_url, kek, schema=schema)
    return KeyStore(Path(state_dir) / KEYS_DB, kek)


# the key-encryption key


class KeyEncryptionKey(ABC):
    """What wraps data keys: a local key (file or environment) here, a KMS later, behind the same three
    members. `unwrap` raises `UnwrapError` for a blob wrapped by another KEK or under other `aad`."""

    @property
    @abstractmethod
    def key_id(self) -> str:
        """A stable, non-secret name of this KEK, stored beside every key it wraps."""

    @abstractmethod
    def wrap(self, data_key: bytes, aad: bytes) -> bytes:
        """`data_key` encrypted under the KEK and bound to `aad`."""

    @abstractmethod
    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        """The data key `wrap` took with the same `aad`."""


class LocalKek(KeyEncryptionKey):
    """A KEK held in this process: from `BANDGATE_KEK` (base64 of 32 bytes, e.g. injected by a secret
    manager) or from a 0600 key file (development only: whoever copies the state directory has it)."""

    __slots__ = ("_cipher", "source")

    def __init__(self, kek: bytes, source: str):
        self._cipher = KekCipher(kek)
        self.source = source

    def __repr__(self) -> str:
        return f"LocalKek(key_id={self.key_id!r}, source={self.source!r})"

    def __reduce__(self) -> object:
        raise TypeError("a KEK is not serialisable")

    @property
    def key_id(self) -> str:
        return self._cipher.key_id

    def wrap(self, data_key: bytes, aad: bytes) -> bytes:
        return self._cipher.wrap(data_key, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        return self._cipher.unwrap(blob, aad)

    @classmethod
    def from_env(cls, name: str = KEK_ENV, environ: Mapping[str, str] | None = None) -> LocalKek:
        """The KEK in environment variable `name` (standard base64 of KEY_BYTES bytes). KekError if it is
        unset or malformed; the message never repeats the value."""
        value = (os.environ if environ is None else environ).get(name, "").strip()
        if not value:
            raise KekError(f"{name} is not set")
        try:
            kek = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise KekError(f"{name} is not base64") from None
        if len(kek) != KEY_BYTES:
            raise KekError(f"{name} decodes to {len(kek)} bytes, not {KEY_BYTES}")
        return cls(kek, f"env:{name}")

    @classmethod
    def from_file(cls, path: Path, *, create: bool = True) -> LocalKek:
        """The KEK in `path` (KEY_BYTES raw bytes, mode 0600). Missing and `create`: a new random KEK is
        written there atomically (two gateways starting at once end up with the same one)."""
        return cls(_load_or_create_secret(Path(path), "KEK", create), f"file:{path}")


def load_kek(state_dir: Path, environ: Mapping[str, str] | None = None) -> KeyEncryptionKey:
    """The gateway's KEK: `BANDGATE_KEK` when set, else `state_dir/kek.key`, created on first start with a
    warning, since a KEK stored beside the data it protects guards against little but a lost disk."""
    env = os.environ if environ is None else environ
    if env.get(KEK_ENV, "").strip():
        return LocalKek.from_env(KEK_ENV, env)
    kek = LocalKek.from_file(Path(state_dir) / KEK_FILE)
    log.warning(
        "KEK read from a file in the state directory: development only; set %s in production",
        KEK_ENV,
        extra={"fields": {"event": "kek_from_file", "kek_id": kek.key_id}},
    )
    return kek


def load_tombstone_key(path: Path, *, create: bool = True) -> PseudonymKey:
    """The pseudonym key for erasure tombstones and audit keys (`tombstone.key`, 0600), created on first
    start. Kept out of the key store: it must outlive every erasure it records."""
    return PseudonymKey(_load_or_create_secret(Path(path), "tombstone key", create))


def _load_or_create_secret(path: Path, what: str, create: bool) -> bytes:
    key = _read_secret(path, what)
    if key is not None:
        return key
    if not create:
        raise KekError(f"{what} {path} is missing")
    if not path.parent.is_dir():
        raise KekError(f"{what} {path}: directory {path.parent} does not exist")
    try:
        write_private(path, new_key(), overwrite=False)  # staged 0600, fsynced, linked only if absent
        log.info(
            "created %s %s", what, path, extra={"fields": {"event": "secret_created", "path": str(path)}}
        )
    except PkiError:
        pass  # another process created it first: use theirs
    except OSError as e:
        raise KekError(f"{what} {path} cannot be created: {e.strerror}") from None
    key = _read_secret(path, what)
    if key is None:
        raise KekError(f"{what} {path} vanished as it was created")
    return key


def _read_secret(path: Path, what: str) -> bytes | None:
    """KEY_BYTES from a regular file only its owner may touch; None if there is no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KekError(f"{what} {path} cannot be read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())  # the file opened, not whatever the path names a moment later
        if not stat.S_ISREG(info.st_mode):
            raise KekError(f"{what} {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KekError(
                f"{what} {path} is open to group or others (mode {info.st_mode & 0o777:03o}); want 0600"
            )
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise KekError(f"{what} {path} is not {KEY_BYTES} bytes long")
    return key


# the key store


class HeldKeys:
    """The unwrapped keys of one key store object: a bounded LRU of recent ones, and every `DataKey` still
    held anywhere (weakly), so there is at most one object per device × ownership and `forget` reaches
    all holders. Not thread-safe: the key store calls it under its lock."""

    __slots__ = ("_cache", "_cache_size", "_live")

    def __init__(self, cache_size: int):
        if cache_size < 1:
            raise ValueError("cache_size is at least 1")
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], DataKey] = OrderedDict()
        self._live: weakref.WeakValueDictionary[tuple[str, str], DataKey] = weakref.WeakValueDictionary()

    def get(self, slot: tuple[str, str]) -> DataKey | None:
        """The key of `slot` if anyone holds it, made recent."""
        key = self._cache.get(slot)
        if key is not None:
            self._cache.move_to_end(slot)
            return key
        key = self._live.get(slot)
        if key is not None:
            self._put_cached(slot, key)
        return key

    def put(self, slot: tuple[str, str], key: DataKey) -> None:
        self._live[slot] = key
        self._put_cached(slot, key)

    def _put_cached(self, slot: tuple[str, str], key: DataKey) -> None:
        self._cache[slot] = key
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)  # a holder keeps it usable; destroy still reaches it

    def held(self) -> list[tuple[tuple[str, str], DataKey]]:
        """Every (slot, key) still held somewhere."""
        return list(self._live.items())

    def forget(self, matches: Callable[[tuple[str, str]], bool]) -> None:
        """Forget (holders get KeyDestroyed) every held key whose slot `matches`."""
        for slot, key in self.held():
            if matches(slot):
                key.forget()
                self._live.pop(slot, None)
                self._cache.pop(slot, None)

    def forget_all(self) -> None:
        self.forget(lambda _slot: True)
        self._cache.clear()


class KeyStore:
    """Data keys per device × ownership, wrapped by `kek`, in their own SQLite file (WAL, synchronous
    FULL: a key is durable before anything is sealed under it; secure_delete: a destroyed key's bytes are
    overwritten, and the WAL is truncated after a destroy).

    Thread-safe: one connection behind one lock; unwrapped keys are kept in a bounded LRU, and at most one
    `DataKey` object exists per device × ownership, so `destroy` reaches every holder. Several processes
    may share the file: a key another process destroyed is forgotten here at the next `data_key` call
    (SQLite's data_version tells that the file changed). `open`/`close` as the store does: `close` is
    safe before `open` and twice."""

    def __init__(
        self,
        path: Path,
        kek: KeyEncryptionKey,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ):
        self.path = Path(path)
        self._kek = kek
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._data_version = 0
        self._keys = HeldKeys(cache_size)

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"KeyStore(path={str(self.path)!r}, kek_id={self._kek.key_id!r}, {state})"

    def __enter__(self) -> KeyStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Open (creating the file 0600 and its schema) and check the KEK: KekError if the store holds
        keys and none was wrapped by this KEK, which is a wrong KEK, refused before the first batch."""
        with self._lock:
            if self._conn is not None:
                return
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # the WAL and shm files copy its mode
                os.close(fd)
                conn = sqlite3.connect(
                    self.path,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=self._busy_timeout_ms / 1000,
                )
            except (OSError, sqlite3.Error) as e:
                raise KeyStoreError(f"key store {self.path} cannot be opened: {e}") from None
            try:
                self._prepare(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA secure_delete = ON")  # per connection: zero what a delete frees
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise KeyStoreError(f"key store {self.path}: WAL mode refused")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise KeyStoreError(
                    f"key store {self.path} is schema {version}; this gateway knows {SCHEMA_VERSION}"
                )
            if version == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        kek_ids = {row[0] for row in conn.execute("SELECT DISTINCT kek_id FROM data_keys")}
        if kek_ids and self._kek.key_id not in kek_ids:
            raise KekError(
                f"key store {self.path} holds keys wrapped by KEK {', '.join(sorted(kek_ids))}, "
                f"not by this KEK ({self._kek.key_id}): wrong {KEK_ENV} or {KEK_FILE}?"
            )
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        """Forget every unwrapped key (holders get KeyDestroyed) and close the file."""
        with self._lock:
            self._keys.forget_all()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def data_key(self, device_id: str | int, ownership: str, *, create: bool = True) -> DataKey:
        """The data key of `device_id` under `ownership`, made (random, wrapped, stored durably) on first
        use when `create`; NoDataKey when there is none and not `create` (what a reader asks: reading an
        erased device must not make it a new key). Call it per batch, not per record: each call costs a
        few microseconds to notice another process's destroy."""
        slot = (normalize_device(device_id), normalize_ownership(ownership))
        with self._lock:
            conn = self._connection()
            self._notice_other_writers(conn)
            key = self._keys.get(slot)
            if key is None:
                key = self._load(conn, slot, create)
                self._keys.put(slot, key)
            return key

    def ownerships(self, device_id: str | int) -> list[str]:
        """The ownerships `device_id` has a data key under, sorted."""
        device = normalize_device(device_id)
        with self._lock:
            rows = self._connection().execute(
                "SELECT ownership FROM data_keys WHERE device = ? ORDER BY ownership", (device,)
            )
            return [row[0] for row in rows]

    def destroy(self, device_id: str | int, ownership: str | None = None) -> int:
        """Erase: delete the device's wrapped keys (under `ownership`, or all of them) and forget them in
        memory, so nothing sealed under them opens again, here or for anyone holding the DataKey.
        Idempotent; returns the number of keys deleted. Backups of this file taken before still hold them.
        """
        device = normalize_device(device_id)
        owner = None if ownership is None else normalize_ownership(ownership)
        with self._lock:
            conn = self._connection()
            if owner is None:
                cursor = conn.execute("DELETE FROM data_keys WHERE device = ?", (device,))
            else:
                cursor = conn.execute(
                    "DELETE FROM data_keys WHERE device = ? AND ownership = ?", (device, owner)
                )
            count = cursor.rowcount
            self._keys.forget(lambda slot: slot[0] == device and (owner is None or slot[1] == owner))
            self._truncate_wal(conn)
        log.info(
            "data keys destroyed",
            extra={"fields": {"event": "data_keys_destroyed", "device": device, "count": count}},
        )
        return count

    # inside the lock

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise KeyStoreError(f"key store {self.path} is not open")
        return self._conn

    def _notice_other_writers(self, conn: sqlite3.Connection) -> None:
        """If another connection changed the file, forget the keys it destroyed (or replaced)."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return
        self._data_version = version
        gone = set()
        for slot, key in self._keys.held():
            row = conn.execute(
                "SELECT key_id FROM data_keys WHERE device = ? AND ownership = ?", slot
            ).fetchone()
            if row is None or row[0] != key.key_id:
                gone.add(slot)
        self._keys.forget(gone.__contains__)

    def _load(self, conn: sqlite3.Connection, slot: tuple[str, str], create: bool) -> DataKey:
        device, ownership = slot
        select = "SELECT key_id, kek_id, wrapped FROM data_keys WHERE device = ? AND ownership = ?"
        row = conn.execute(select, slot).fetchone()
        if row is None:
            if not create:
                raise NoDataKey(
                    f"no data key for device {device} ownership {ownership!r} (none made, or erased)"
                )
            key_id, raw = new_key_id(), new_key()
            wrapped = self._kek.wrap(raw, wrap_aad(device, ownership, key_id))
            conn.execute("BEGIN IMMEDIATE")
            try:
                # OR IGNORE: another process may have made this key since the SELECT; theirs wins
                conn.execute(
                    "INSERT OR IGNORE INTO data_keys "
                    "(device, ownership, key_id, kek_id, wrapped, created_us) VALUES (?, ?, ?, ?, ?, ?)",
                    (device, ownership, key_id, self._kek.key_id, wrapped, time.time_ns() // 1000),
                )
                row = conn.execute(select, slot).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if row[0] == key_id:
                return DataKey(device, ownership, key_id, raw)
        key_id, kek_id, wrapped = row
        if kek_id != self._kek.key_id:
            raise KekError(
                f"data key of device {device} ownership {ownership!r} was wrapped by KEK {kek_id}, "
                f"not by this KEK ({self._kek.key_id})"
            )
        try:
            raw = self._kek.unwrap(wrapped, wrap_aad(device, ownership, key_id))
        except UnwrapError as e:
            raise KeyStoreError(f"data key of device {device} ownership {ownership!r}: {e}") from None
        return DataKey(device, ownership, key_id, raw)

    def _truncate_wal(self, conn: sqlite3.Connection) -> None:
        """Copy the zeroed pages into the file and empty the WAL, whose older frames still hold the
        destroyed rows. A reader in another process can hold the WAL; then it empties at a later destroy
        or checkpoint, and the warning says so."""
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning(
                "key store WAL not truncated after a destroy (a reader holds it): destroyed keys stay in "
                "the WAL file until the next checkpoint",
                extra={"fields": {"event": "keys_wal_busy", "path": str(self.path)}},
            )
