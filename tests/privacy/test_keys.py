"""Encryption at rest (gateway/privacy/crypto.py, keys.py and keys_postgres.py) with real keys, real
databases and real threads: what is sealed opens only in its own row, erasure is destroying the key (and a
key store backup taken before is the one thing that undoes it), KEKs from a file or the environment, and
no key or plaintext ever shows in a repr, a message or a file.

The key store tests run once per key store (test IDs `[sqlite]`, `[postgres]`): the SQLite file, and the
PostgreSQL schema in a fresh schema per test at tests/services.py's database (skipped when it is
unreachable, failed under CI=true)."""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoder.records import FAMILIES
from gateway.privacy.crypto import (
    TOKEN_OVERHEAD,
    DataKey,
    KekCipher,
    KeyDestroyed,
    PseudonymKey,
    TamperedCiphertext,
    UnwrapError,
    device_pseudonym,
    new_key,
    token_key_id,
    wrap_aad,
)
from gateway.privacy.keys import (
    DEFAULT_CACHE_SIZE,
    KEK_ENV,
    KEK_FILE,
    KEYS_DB,
    DataKeyStore,
    KekError,
    KeyEncryptionKey,
    KeyStore,
    KeyStoreError,
    LocalKek,
    NoDataKey,
    key_store_for_url,
    load_kek,
    load_tombstone_key,
)
from tests.services import postgres_url, unique_name

DEV_A = "00000000000000a1"
DEV_B = "00000000000000b2"
OWNER = "owner-1"
SENTINEL = b"SENTINEL-7f3c-heart-bpm-\xe2\x9d\xa4"  # planted in plaintexts; must never reach a file
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

devices = st.integers(0, 2**64 - 1).map(lambda d: f"{d:016x}")
families = st.sampled_from(FAMILIES)
starts = st.integers(-(2**63), 2**63 - 1)
ownerships = st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=20)


def values_json(i: int = 0) -> bytes:
    """What a record's values look like once serialised, with the sentinel planted in them."""
    values = {"steps": 1000 + i, "cadence_spm": 101.5, "note": SENTINEL.decode()}
    return json.dumps(values, separators=(",", ":")).encode()


def key_material_forms(raw: bytes) -> list[bytes]:
    """How a key could leak into text: raw, hex, base64, Python's bytes repr."""
    return [raw, raw.hex().encode(), base64.b64encode(raw), repr(raw).encode()]


def files_of(db: Path) -> bytes:
    """A SQLite database as it lies on disk: the file and its WAL, if any."""
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def backup(db: Path, to: Path) -> Path:
    """A consistent copy of a live database, as an operator's backup job takes it."""
    src, dst = sqlite3.connect(db), sqlite3.connect(to)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return to


class SqliteKeys:
    """The SQLite key store under test: keys.db in the test's directory."""

    name = "sqlite"

    def __init__(self, tmp_path: Path):
        self.where = tmp_path / KEYS_DB
        self._tmp = tmp_path

    def store(self, kek: KeyEncryptionKey, *, cache_size: int = DEFAULT_CACHE_SIZE, where: Any = None):
        return KeyStore(self.where if where is None else where, kek, cache_size=cache_size)

    def execute(self, query: str, params: tuple = ()) -> list[tuple]:
        """Raw SQL on the key table (`{t}`), as someone with write access to the database runs it."""
        conn = sqlite3.connect(self.where)
        try:
            with conn:
                return conn.execute(query.format(t="data_keys"), params).fetchall()
        finally:
            conn.close()

    def backup(self) -> Path:
        """A consistent copy of the live key store, as an operator's backup job takes it."""
        return backup(self.where, self._tmp / "keys-backup.db")

    def at_rest(self) -> bytes:
        """Everything the key store holds on disk."""
        return files_of(self.where)


class PostgresKeys:
    """The PostgreSQL key store under test: a fresh schema (and its backups' schemas), dropped after."""

    name = "postgres"

    def __init__(self, url: str):
        import psycopg

        self.url = url
        self.where = unique_name("test_keys")
        self._schemas = [self.where]
        self._conn = psycopg.connect(url, autocommit=True)

    def store(self, kek: KeyEncryptionKey, *, cache_size: int = DEFAULT_CACHE_SIZE, where: Any = None):
        from gateway.privacy.keys_postgres import PostgresKeyStore

        return PostgresKeyStore(
            self.url, kek, schema=self.where if where is None else where, cache_size=cache_size
        )

    def execute(self, query: str, params: tuple = ()) -> list[tuple]:
        from psycopg import sql

        text = sql.SQL(query.replace("?", "%s")).format(t=sql.Identifier(self.where, "data_keys"))
        cur = self._conn.execute(text, params)
        return cur.fetchall() if cur.description else []

    def backup(self) -> str:
        """A copy of the key schema, as `pg_dump -n` and a restore into another schema make it."""
        from psycopg import sql

        to = f"{self.where}_bak"
        self._schemas.append(to)
        self._conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(to)))
        for table in ("schema_version", "data_keys"):
            self._conn.execute(
                sql.SQL("CREATE TABLE {} AS TABLE {}").format(
                    sql.Identifier(to, table), sql.Identifier(self.where, table)
                )
            )
        return to

    def at_rest(self) -> bytes:
        """Every live row of the key table (dead tuples until vacuum are not seen: docs/privacy-keys.md)."""
        rows = self.execute("SELECT device, ownership, key_id::text, kek_id, wrapped FROM {t}")
        return b"".join(b"|".join(v if isinstance(v, bytes) else str(v).encode() for v in r) for r in rows)

    def drop(self) -> None:
        from psycopg import sql

        for schema in self._schemas:
            self._conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        self._conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteKeys | PostgresKeys]:
    """Each key store in turn; the test ID names it."""
    if request.param == "sqlite":
        yield SqliteKeys(tmp_path)
        return
    pg = PostgresKeys(postgres_url())
    try:
        yield pg
    finally:
        pg.drop()


@pytest.fixture
def postgres_keys() -> Iterator[PostgresKeys]:
    """The PostgreSQL key store alone, for what only it has (connections, notifications)."""
    pg = PostgresKeys(postgres_url())
    try:
        yield pg
    finally:
        pg.drop()


@pytest.fixture
def kek_raw() -> bytes:
    return new_key()


@pytest.fixture
def kek(kek_raw: bytes) -> LocalKek:
    return LocalKek(kek_raw, "test")


@pytest.fixture
def keys(backend: SqliteKeys | PostgresKeys, kek: LocalKek) -> Iterator[DataKeyStore]:
    with backend.store(kek) as store:
        yield store


# the recipe: round trips and bindings


@SETTINGS
@given(plaintext=st.binary(max_size=2048), device=devices, family=families, start_us=starts)
def test_value_round_trip_is_plaintext_plus_33_bytes(
    plaintext: bytes, device: str, family: str, start_us: int
) -> None:
    key = DataKey(device, OWNER, 0x01020304, new_key())
    token = key.seal(plaintext, family=family, start_us=start_us)
    assert len(token) == len(plaintext) + TOKEN_OVERHEAD == len(plaintext) + 33
    assert token[0] == 1 and token_key_id(token) == 0x01020304
    assert key.open(token, family=family, start_us=start_us) == plaintext


@SETTINGS
@given(plaintext=st.binary(max_size=4096), device=devices)
def test_state_round_trip(plaintext: bytes, device: str) -> None:
    key = DataKey(device, OWNER, 7, new_key())
    assert key.open_state(key.seal_state(plaintext)) == plaintext


def test_int_and_hex_device_ids_are_one_device() -> None:
    raw = new_key()
    by_int, by_hex = DataKey(0xA1, OWNER, 1, raw), DataKey("00000000000000A1", OWNER, 1, raw)
    assert by_int.device_id == by_hex.device_id == DEV_A
    assert by_hex.open(by_int.seal(b"v", family="steps", start_us=5), family="steps", start_us=5) == b"v"


def assert_refused_without_leak(error: TamperedCiphertext, plaintext: bytes, device: str) -> None:
    text = f"{error} {error!r}"
    assert device in text  # names the row it was read as
    for form in [plaintext, plaintext.hex().encode(), repr(plaintext).encode()]:
        assert form.decode("utf-8", "replace") not in text
    assert "SENTINEL" not in text
    assert error.__context__ is None or error.__suppress_context__  # no InvalidTag chained on


@SETTINGS
@given(
    device=devices,
    other_device=devices,
    family=families,
    other_family=families,
    start_us=starts,
    other_start=starts,
    ownership=ownerships,
    other_ownership=ownerships,
)
def test_a_value_moved_to_another_row_does_not_open(
    device: str,
    other_device: str,
    family: str,
    other_family: str,
    start_us: int,
    other_start: int,
    ownership: str,
    other_ownership: str,
) -> None:
    """The same key bytes and key id under another row: only the associated data differs, so this is the
    binding itself that refuses, not a key mismatch."""
    raw, plaintext = new_key(), values_json()
    token = DataKey(device, ownership, 9, raw).seal(plaintext, family=family, start_us=start_us)
    rows = []
    if other_device != device:
        rows.append((DataKey(other_device, ownership, 9, raw), family, start_us))
    if other_ownership != ownership:
        rows.append((DataKey(device, other_ownership, 9, raw), family, start_us))
    if other_family != family:
        rows.append((DataKey(device, ownership, 9, raw), other_family, start_us))
    if other_start != start_us:
        rows.append((DataKey(device, ownership, 9, raw), family, other_start))
    for key, fam, start in rows:
        with pytest.raises(TamperedCiphertext, match="authentication failed") as caught:
            key.open(token, family=fam, start_us=start)
        error = caught.value
        assert (error.device_id, error.family, error.start_us) == (key.device_id, fam, start)
        assert_refused_without_leak(caught.value, plaintext, key.device_id)


def test_another_devices_key_refuses_and_names_the_row(keys: DataKeyStore) -> None:
    plaintext = values_json()
    token = keys.data_key(DEV_A, OWNER).seal(plaintext, family="heart", start_us=1_700_000_000_000_000)
    with pytest.raises(TamperedCiphertext) as caught:
        keys.data_key(DEV_B, OWNER).open(token, family="heart", start_us=1_700_000_000_000_000)
    assert str(caught.value).startswith(f"ciphertext for device {DEV_B} heart start_us 1700000000000000")
    assert "another device" in caught.value.reason
    assert_refused_without_leak(caught.value, plaintext, DEV_B)


def test_a_state_blob_and_a_value_are_not_interchangeable() -> None:
    key = DataKey(DEV_A, OWNER, 3, new_key())
    with pytest.raises(TamperedCiphertext, match=f"device {DEV_A} state does not open"):
        key.open_state(key.seal(b"x", family="steps", start_us=0))
    with pytest.raises(TamperedCiphertext):
        key.open(key.seal_state(b"x"), family="steps", start_us=0)
    other = DataKey(DEV_B, OWNER, 3, key_bytes := new_key())
    with pytest.raises(TamperedCiphertext):
        DataKey(DEV_A, OWNER, 3, key_bytes).open_state(other.seal_state(b"state"))


@SETTINGS
@given(data=st.data())
def test_any_edit_of_a_token_is_refused(data: st.DataObject) -> None:
    key = DataKey(DEV_A, OWNER, 11, new_key())
    token = bytearray(key.seal(values_json(), family="sleep", start_us=42))
    index = data.draw(st.integers(0, len(token) - 1))
    token[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(TamperedCiphertext):
        key.open(bytes(token), family="sleep", start_us=42)
    with pytest.raises(TamperedCiphertext, match="too short"):
        key.open(bytes(token[: TOKEN_OVERHEAD - 1]), family="sleep", start_us=42)


@SETTINGS
@given(data=st.data(), family=families, other_family=families, start_us=starts)
def test_the_page_opener_answers_as_open_does(
    data: st.DataObject, family: str, other_family: str, start_us: int
) -> None:
    """`records_opener` (a page of records) takes shortcuts: it must open exactly what `open` opens and
    refuse with the same error everything `open` refuses, a destroyed key included."""
    key = DataKey(DEV_A, OWNER, 11, new_key())
    opener = key.records_opener()
    plaintext = values_json()
    token = key.seal(plaintext, family=family, start_us=start_us)
    edited = bytearray(token)
    edited[data.draw(st.integers(0, len(token) - 1))] ^= data.draw(st.integers(1, 255))
    cases = [
        (token, family, start_us),
        (token, other_family, start_us),
        (token, family, start_us + 1),
        (bytes(edited), family, start_us),
        (token[: TOKEN_OVERHEAD - 1], family, start_us),
        (
            DataKey(DEV_A, OWNER, 12, new_key()).seal(plaintext, family=family, start_us=start_us),
            family,
            start_us,
        ),
    ]
    for _ in range(2):  # the second time the family's associated data is cached
        for tok, fam, start in cases:
            try:
                expected: object = key.open(tok, family=fam, start_us=start)
            except (TamperedCiphertext, ValueError) as e:  # ValueError: start_us + 1 past 64 bits
                expected = f"{type(e).__name__}: {e}"
            try:
                got: object = opener(fam, start, tok)
            except (TamperedCiphertext, ValueError) as e:
                got = f"{type(e).__name__}: {e}"
            assert got == expected
    assert opener(family, start_us, token) == plaintext
    key.forget()
    with pytest.raises(KeyDestroyed):
        opener(family, start_us, token)


def test_nonces_never_repeat() -> None:
    key = DataKey(DEV_A, OWNER, 1, new_key())
    tokens = [key.seal(b"same value", family="steps", start_us=0) for _ in range(20_000)]
    assert len({t[5:17] for t in tokens}) == len(tokens)  # the 96-bit nonce after version and key id
    assert len(set(tokens)) == len(tokens)


def test_values_are_bytes_only_and_times_are_int64() -> None:
    key = DataKey(DEV_A, OWNER, 1, new_key())
    with pytest.raises(ValueError, match="signed 64-bit"):
        key.seal(b"x", family="steps", start_us=2**63)
    with pytest.raises(ValueError, match="family"):
        key.seal(b"x", family="", start_us=0)
    for bad_device in ("a1", "zz00000000000000", -1, 2**64, True):
        with pytest.raises(ValueError, match="device ID"):
            DataKey(bad_device, OWNER, 1, new_key())
    with pytest.raises(ValueError, match="ownership"):
        DataKey(DEV_A, "", 1, new_key())


# key wrapping


def test_wrapped_key_opens_only_in_its_own_row() -> None:
    kek, raw = KekCipher(new_key()), new_key()
    blob = kek.wrap(raw, wrap_aad(DEV_A, OWNER, 5))
    assert kek.unwrap(blob, wrap_aad(DEV_A, OWNER, 5)) == raw
    for aad in (wrap_aad(DEV_B, OWNER, 5), wrap_aad(DEV_A, "owner-2", 5), wrap_aad(DEV_A, OWNER, 6)):
        with pytest.raises(UnwrapError, match=f"KEK {kek.key_id}"):
            kek.unwrap(blob, aad)
    with pytest.raises(UnwrapError, match="another KEK"):
        KekCipher(new_key()).unwrap(blob, wrap_aad(DEV_A, OWNER, 5))


def test_a_wrapped_key_moved_to_another_devices_row_does_not_unwrap(
    backend: SqliteKeys | PostgresKeys, kek: LocalKek
) -> None:
    with backend.store(kek) as keys:
        keys.data_key(DEV_A, OWNER)
        keys.data_key(DEV_B, OWNER)
    # someone with write access to the key store gives B the key of A
    backend.execute(
        "UPDATE {t} SET wrapped = (SELECT wrapped FROM {t} WHERE device = ?), "
        "key_id = (SELECT key_id FROM {t} WHERE device = ?) WHERE device = ?",
        (DEV_A, DEV_A, DEV_B),
    )
    with backend.store(kek) as keys, pytest.raises(KeyStoreError, match=f"device {DEV_B}.*does not unwrap"):
        keys.data_key(DEV_B, OWNER)


# the key store: erasure


def test_destroy_is_erasure_and_a_key_store_backup_is_its_horizon(
    backend: SqliteKeys | PostgresKeys, kek: LocalKek
) -> None:
    feature_rows: list[tuple[str, str, int, bytes]] = []  # the feature store's sealed rows (and backups)
    with backend.store(kek) as keys:
        for device in (DEV_A, DEV_B):
            key = keys.data_key(device, OWNER)
            for i, family in enumerate(FAMILIES):
                start_us = i * 60_000_000
                token = key.seal(values_json(i), family=family, start_us=start_us)
                feature_rows.append((device, family, start_us, token))
        held = keys.data_key(DEV_A, OWNER)  # a compute thread holding the key mid-batch
        ((wrapped_a,),) = backend.execute("SELECT wrapped FROM {t} WHERE device = ?", (DEV_A,))
        wrapped_a = bytes(wrapped_a)
        key_store_backup = backend.backup()

        assert keys.destroy(DEV_A) == 1
        assert keys.destroy(DEV_A) == 0  # idempotent
        assert keys.ownerships(DEV_A) == []
        with pytest.raises(NoDataKey, match=DEV_A):
            keys.data_key(DEV_A, OWNER, create=False)
        assert held.destroyed
        with pytest.raises(KeyDestroyed):
            held.open(feature_rows[0][3], family=feature_rows[0][1], start_us=feature_rows[0][2])
        with pytest.raises(KeyDestroyed):
            held.seal(b"late record", family="steps", start_us=0)
        # nothing of the destroyed key is left in the key store's files (SQLite: zeroed, and the WAL
        # truncated) or its live rows (PostgreSQL: dead tuples stay until vacuum, docs/privacy-keys.md)
        assert wrapped_a not in backend.at_rest()

        fresh = keys.data_key(DEV_A, OWNER)  # the device comes back after erasure: a new key
        assert fresh.key_id != held.key_id
        for device, family, start_us, token in feature_rows:
            if device == DEV_A:
                with pytest.raises(TamperedCiphertext, match="destroyed"):
                    fresh.open(token, family=family, start_us=start_us)
            else:
                assert keys.data_key(device, OWNER).open(token, family=family, start_us=start_us)

    # The erasure horizon: a key store backup taken before, with the KEK, still opens the erased rows.
    with backend.store(kek, where=key_store_backup) as restored:
        old = restored.data_key(DEV_A, OWNER, create=False)
        assert old.key_id == held.key_id
        device, family, start_us, token = feature_rows[0]
        assert old.open(token, family=family, start_us=start_us) == values_json(0)
    # ...and without the KEK it is only wrapped bytes.
    with pytest.raises(KekError, match="not by this KEK"):
        backend.store(LocalKek(new_key(), "another"), where=key_store_backup).open()


def test_destroy_one_ownership_keeps_the_others(keys: DataKeyStore) -> None:
    first = keys.data_key(DEV_A, "owner-1")
    second = keys.data_key(DEV_A, "owner-2")
    assert first.key_id != second.key_id
    assert keys.ownerships(DEV_A) == ["owner-1", "owner-2"]
    assert keys.destroy(DEV_A, "owner-1") == 1
    assert first.destroyed and not second.destroyed
    assert keys.ownerships(DEV_A) == ["owner-2"]
    assert keys.data_key(DEV_A, "owner-2") is second
    assert keys.destroy(0xA1) == 1


def test_destroy_reaches_a_key_evicted_from_the_cache(
    backend: SqliteKeys | PostgresKeys, kek: LocalKek
) -> None:
    with backend.store(kek, cache_size=2) as keys:
        held = keys.data_key(DEV_A, OWNER)
        for d in range(1, 10):  # pushes DEV_A out of the LRU
            keys.data_key(d, OWNER)
        assert keys.data_key(DEV_A, OWNER) is held  # one object per device × ownership while held
        for d in range(1, 10):
            keys.data_key(d, OWNER)
        keys.destroy(DEV_A)
        assert held.destroyed


def noticed(keys: DataKeyStore, device: str, within_s: float) -> None:
    """`keys` answers NoDataKey for `device` within `within_s` (SQLite: at once; PostgreSQL: once the
    destroy's notification has arrived)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            keys.data_key(device, OWNER, create=False)
        except NoDataKey:
            return
        assert time.monotonic() < deadline, f"a destroy of {device} by another store not noticed"
        time.sleep(0.002)


def test_a_destroy_by_another_process_is_noticed(backend: SqliteKeys | PostgresKeys, kek: LocalKek) -> None:
    """The gateway's key store and an erasure run from a second connection (a CLI, another gateway)."""
    with backend.store(kek) as gateway, backend.store(kek) as eraser:
        held = gateway.data_key(DEV_A, OWNER)
        token = held.seal(b"v", family="steps", start_us=0)
        assert eraser.data_key(DEV_A, OWNER).key_id == held.key_id
        assert eraser.destroy(DEV_A) == 1
        # SQLite: at the next call; PostgreSQL: once the NOTIFY is delivered (a loaded box's scheduling)
        noticed(gateway, DEV_A, within_s=0.0 if backend.name == "sqlite" else 5.0)
        assert held.destroyed
        recreated = gateway.data_key(DEV_A, OWNER)
        with pytest.raises(TamperedCiphertext):
            recreated.open(token, family="steps", start_us=0)


def test_the_store_url_picks_the_key_store(tmp_path: Path, kek: LocalKek) -> None:
    from gateway.privacy.keys_postgres import PostgresKeyStore

    sqlite_keys = key_store_for_url("sqlite:///features.db", tmp_path, kek)
    assert isinstance(sqlite_keys, KeyStore) and sqlite_keys.path == tmp_path / KEYS_DB
    for url in ("postgresql://gw:pw@db.example/bandgate", "postgres://db.example/bandgate"):
        pg_keys = key_store_for_url(url, tmp_path, kek, schema="fleet_keys")
        assert isinstance(pg_keys, PostgresKeyStore) and pg_keys.schema == "fleet_keys"
        assert "pw" not in repr(pg_keys) and "gw" not in repr(pg_keys)  # the URL's credentials
    # the feature store's own URL options are its own; libpq's are kept
    pg_keys = key_store_for_url("postgresql://db/x?schema=fleet&pool_max=4&sslmode=require", tmp_path, kek)
    assert isinstance(pg_keys, PostgresKeyStore) and pg_keys.url == "postgresql://db/x?sslmode=require"
    for bad in ("Keys", "1keys", "keys; drop", "k" * 64, ""):
        with pytest.raises(ValueError, match="key schema"):
            key_store_for_url("postgresql://db/x", tmp_path, kek, schema=bad)


def test_an_unreachable_postgres_key_store_is_unavailable(kek: LocalKek) -> None:
    from gateway.privacy.keys import KeyStoreUnavailable
    from gateway.privacy.keys_postgres import PostgresKeyStore

    keys = PostgresKeyStore("postgresql://postgres@127.0.0.1:1/test", kek, connect_timeout_s=1)
    with pytest.raises(KeyStoreUnavailable, match="cannot be opened"):
        keys.open()


def test_a_destroy_missed_while_disconnected_is_noticed_on_reconnecting(
    postgres_keys: PostgresKeys, kek: LocalKek
) -> None:
    """PostgreSQL only: the gateway's connections are cut (a failover, pg_terminate_backend) and another
    gateway erases the device meanwhile; its notification is lost, so reconnecting checks every held key."""
    backend = postgres_keys
    with backend.store(kek) as gateway, backend.store(kek) as eraser:
        held = gateway.data_key(DEV_A, OWNER)
        kept = gateway.data_key(DEV_B, OWNER)
        pids = [gateway._conn.info.backend_pid, gateway._listen.info.backend_pid]  # type: ignore[union-attr]
        # with a timeout, pg_terminate_backend returns once the backends have exited, their FATAL sent.
        # Without it, a backend a loaded box has not scheduled yet is still alive when the gateway polls:
        # nothing on the socket, nothing to notice, and the test fails on timing (a CI run once did)
        ended = backend.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM unnest(?::int[]) AS pid", (pids,)
        )
        assert ended == [(True,), (True,)]
        assert eraser.destroy(DEV_A) == 1
        with pytest.raises(NoDataKey):
            gateway.data_key(DEV_A, OWNER, create=False)
        assert held.destroyed and not kept.destroyed
        assert gateway.data_key(DEV_B, OWNER) is kept


def test_keys_survive_a_restart(backend: SqliteKeys | PostgresKeys, kek_raw: bytes, kek: LocalKek) -> None:
    with backend.store(kek) as keys:
        token = keys.data_key(DEV_A, OWNER).seal(values_json(), family="day", start_us=86_400_000_000)
    restarted = LocalKek.from_env(environ={KEK_ENV: base64.b64encode(kek_raw).decode() + "\n"})
    with backend.store(restarted) as keys:
        assert keys.data_key(DEV_A, OWNER).open(token, family="day", start_us=86_400_000_000) == values_json()


def test_key_store_lifecycle(backend: SqliteKeys | PostgresKeys, kek: LocalKek) -> None:
    keys = backend.store(kek)
    keys.close()  # before open: fine
    keys.open()
    keys.open()  # twice: fine
    key = keys.data_key(DEV_A, OWNER)
    keys.close()
    keys.close()
    assert key.destroyed  # closing forgets every unwrapped key
    with pytest.raises(KeyStoreError, match="not open"):
        keys.data_key(DEV_A, OWNER)
    if backend.name == "sqlite":
        assert stat.S_IMODE(backend.where.stat().st_mode) == 0o600


# KEKs


def test_file_kek_is_created_0600_and_reused(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the most permissive umask must not open the file up
    try:
        first = load_kek(tmp_path, environ={})
    finally:
        os.umask(old_umask)
    path = tmp_path / KEK_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    content = path.read_bytes()
    again = load_kek(tmp_path, environ={})
    assert again.key_id == first.key_id and path.read_bytes() == content
    assert not [p for p in tmp_path.iterdir() if p.name != KEK_FILE]  # no temporary file left behind


def test_file_kek_created_at_once_by_many_starts_is_one_kek(tmp_path: Path) -> None:
    barrier, ids = threading.Barrier(8), []

    def start() -> None:
        barrier.wait()
        ids.append(LocalKek.from_file(tmp_path / KEK_FILE).key_id)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8 and len(set(ids)) == 1


def test_an_exposed_or_malformed_kek_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEK_FILE
    LocalKek.from_file(path)
    path.chmod(0o640)
    with pytest.raises(KekError, match="group or others"):
        LocalKek.from_file(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(KekError, match="not 32 bytes"):
        LocalKek.from_file(path)
    with pytest.raises(KekError, match="missing"):
        LocalKek.from_file(tmp_path / "absent.key", create=False)
    target = tmp_path / "real.key"
    LocalKek.from_file(target)
    (tmp_path / "link.key").symlink_to(target)
    with pytest.raises(KekError, match="cannot be read"):
        LocalKek.from_file(tmp_path / "link.key")


def test_env_kek_works_and_wins_over_the_file(tmp_path: Path) -> None:
    raw = new_key()
    kek = load_kek(tmp_path, environ={KEK_ENV: base64.b64encode(raw).decode()})
    assert kek.key_id == LocalKek(raw, "x").key_id
    assert "env:BANDGATE_KEK" in repr(kek)
    assert not (tmp_path / KEK_FILE).exists()
    with KeyStore(tmp_path / KEYS_DB, kek) as keys:
        token = keys.data_key(DEV_A, OWNER).seal(b"v", family="wear", start_us=1)
    restarted = LocalKek.from_env(environ={KEK_ENV: base64.b64encode(raw).decode()})
    with KeyStore(tmp_path / KEYS_DB, restarted) as k:
        assert k.data_key(DEV_A, OWNER).open(token, family="wear", start_us=1) == b"v"


def test_a_malformed_env_kek_is_refused_without_echoing_it() -> None:
    secretish = "c2VjcmV0LXZhbHVlLXRoYXQtbXVzdC1ub3QtbGVhaw=="  # base64, but of 31 bytes
    cases = [(secretish, "31 bytes, not 32"), ("not base64 at all!", "not base64"), ("", "not set")]
    for value, match in cases:
        with pytest.raises(KekError, match=match) as caught:
            LocalKek.from_env(environ={KEK_ENV: value})
        assert (value or "\0") not in str(caught.value)


def test_a_wrong_kek_is_refused_at_open_with_both_ids(
    backend: SqliteKeys | PostgresKeys, kek: LocalKek
) -> None:
    with backend.store(kek) as keys:
        keys.data_key(DEV_A, OWNER)
    wrong_raw = new_key()
    wrong = LocalKek(wrong_raw, "env:BANDGATE_KEK")
    store = backend.store(wrong)
    with pytest.raises(KekError) as caught:
        store.open()
    message = str(caught.value)
    assert kek.key_id in message and wrong.key_id in message and "wrong BANDGATE_KEK" in message
    assert not any(form.decode("latin-1") in message for form in key_material_forms(wrong_raw))
    with pytest.raises(KeyStoreError, match="not open"):
        store.data_key(DEV_A, OWNER)


class ClaimingKek(KeyEncryptionKey):
    """Another implementation of the interface (as a KMS client would be) that claims another KEK's id:
    the blob still does not unwrap, and the store says which row."""

    def __init__(self, key_id: str):
        self._id, self._cipher = key_id, KekCipher(new_key())

    @property
    def key_id(self) -> str:
        return self._id

    def wrap(self, data_key: bytes, aad: bytes) -> bytes:
        return self._cipher.wrap(data_key, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        return self._cipher.unwrap(blob, aad)


def test_a_kek_that_only_claims_the_id_fails_to_unwrap_clearly(
    backend: SqliteKeys | PostgresKeys, kek: LocalKek
) -> None:
    with backend.store(kek) as keys:
        keys.data_key(DEV_A, OWNER)
    with backend.store(ClaimingKek(kek.key_id)) as keys:
        with pytest.raises(KeyStoreError, match=f"device {DEV_A} ownership 'owner-1'.*does not unwrap"):
            keys.data_key(DEV_A, OWNER)
        fresh = keys.data_key(DEV_B, OWNER)  # the interface is enough to make new keys
        assert fresh.open_state(fresh.seal_state(b"s")) == b"s"


# threads


def test_threads_creating_the_same_key_at_once_get_one_key(
    backend: SqliteKeys | PostgresKeys, kek: LocalKek
) -> None:
    with backend.store(kek) as one, backend.store(kek) as other:  # two connections, as two gateways
        barrier, got = threading.Barrier(16), []

        def ask(store: DataKeyStore) -> None:
            barrier.wait()
            got.append((store, store.data_key(DEV_A, OWNER)))

        threads = [threading.Thread(target=ask, args=(one if i % 2 else other,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 16
        assert len({key.key_id for _, key in got}) == 1
        for store in (one, other):
            assert len({id(key) for s, key in got if s is store}) == 1  # one object per store
        token = got[0][1].seal(b"v", family="steps", start_us=3)
        assert all(key.open(token, family="steps", start_us=3) == b"v" for _, key in got)
    assert backend.execute("SELECT count(*) FROM {t}") == [(1,)]


def test_a_gateway_creating_a_key_another_has_not_yet_committed_takes_theirs(
    postgres_keys: PostgresKeys, kek: LocalKek
) -> None:
    """The exact interleaving two gateways race into: ours finds no key, theirs inserts one and has not
    committed when ours inserts. Ours waits on the row, does nothing, and reads and unwraps theirs."""
    import psycopg

    backend = postgres_keys
    with backend.store(kek) as ours:  # creates the schema
        theirs_raw, theirs_id = new_key(), 0x7E1F5
        wrapped = kek.wrap(theirs_raw, wrap_aad(DEV_A, OWNER, theirs_id))
        with psycopg.connect(backend.url) as theirs:  # a transaction left open
            theirs.execute(
                f'INSERT INTO "{backend.where}".data_keys VALUES (%s, %s, %s, %s, %s, 0)',
                (DEV_A, OWNER, theirs_id, kek.key_id, wrapped),
            )
            got: list[DataKey] = []
            asking = threading.Thread(target=lambda: got.append(ours.data_key(DEV_A, OWNER)))
            asking.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until ours waits on their row's transaction
                (waiting,) = backend.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
                )[0]
                if waiting >= 1:
                    break
                time.sleep(0.02)
            assert waiting >= 1
            assert got == []  # blocked on their uncommitted row
            theirs.commit()
        asking.join(5)
        assert len(got) == 1 and got[0].key_id == theirs_id
        assert (
            got[0].open(
                DataKey(DEV_A, OWNER, theirs_id, theirs_raw).seal(b"v", family="steps", start_us=1),
                family="steps",
                start_us=1,
            )
            == b"v"
        )
        assert backend.execute("SELECT count(*) FROM {t}") == [(1,)]


def test_sealing_threads_and_a_destroy(keys: DataKeyStore) -> None:
    """Compute threads seal while the writer erases one device: the other device is untouched, and no
    seal under the erased key begins after the destroy returned."""
    stop, destroyed_at = threading.Event(), [float("inf")]
    late: list[str] = []
    refused: list[str] = []

    def compute(device: str) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                keys.data_key(device, OWNER, create=False).seal(values_json(), family="steps", start_us=0)
            except (NoDataKey, KeyDestroyed):
                refused.append(device)
                time.sleep(0.001)
                continue
            if device == DEV_A and started > destroyed_at[0]:
                late.append(device)

    keys.data_key(DEV_A, OWNER)
    keys.data_key(DEV_B, OWNER)
    threads = [threading.Thread(target=compute, args=(d,)) for d in (DEV_A, DEV_B, DEV_A, DEV_B)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    keys.destroy(DEV_A)
    destroyed_at[0] = time.monotonic()
    deadline = destroyed_at[0] + 10
    while DEV_A not in refused and time.monotonic() < deadline:  # a thread has tried since
        time.sleep(0.01)
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert late == []
    assert DEV_A in refused and DEV_B not in refused
    assert keys.ownerships(DEV_A) == []


# secrets never shown


def test_reprs_show_no_key_material(backend: SqliteKeys | PostgresKeys) -> None:
    raw = new_key()
    data_key = DataKey(DEV_A, OWNER, 0xABCDEF01, raw)
    kek = LocalKek(raw, "test")
    shown = [repr(data_key), str(data_key), repr(kek), repr(KekCipher(raw)), repr(PseudonymKey(raw))]
    with backend.store(kek) as keys:
        shown += [repr(keys), repr(keys.data_key(DEV_A, OWNER))]
    for text in shown:
        for form in key_material_forms(raw):
            assert form.decode("latin-1") not in text
    assert repr(data_key) == "DataKey(device='00000000000000a1', ownership='owner-1', key_id=0xabcdef01)"
    assert not any(getattr(data_key, name, None) == raw for name in DataKey.__slots__)
    for secret in (data_key, kek, PseudonymKey(raw)):
        with pytest.raises(TypeError, match="not serialisable"):
            pickle.dumps(secret)
    with pytest.raises(TypeError):
        copy.deepcopy(data_key)


def test_sentinel_never_reaches_a_file_or_a_token(tmp_path: Path, backend: SqliteKeys | PostgresKeys) -> None:
    kek = LocalKek.from_file(tmp_path / KEK_FILE)
    kek_raw = (tmp_path / KEK_FILE).read_bytes()
    features = tmp_path / "features.db"
    with backend.store(kek) as keys, sqlite3.connect(features) as conn:
        conn.execute("CREATE TABLE records (device TEXT, family TEXT, start_us INTEGER, sealed BLOB)")
        conn.execute("CREATE TABLE devices (device TEXT, state BLOB)")
        tokens = []
        for d in range(20):
            key = keys.data_key(d, OWNER)
            for i in range(50):
                token = key.seal(values_json(i), family="heart", start_us=i)
                tokens.append(token)
                conn.execute("INSERT INTO records VALUES (?, ?, ?, ?)", (key.device_id, "heart", i, token))
            conn.execute("INSERT INTO devices VALUES (?, ?)", (key.device_id, key.seal_state(SENTINEL * 4)))
        on_disk = files_of(features) + backend.at_rest()
    conn.close()
    assert all(SENTINEL not in t and SENTINEL[:12] not in t for t in tokens)
    assert SENTINEL[:12] not in on_disk
    for form in key_material_forms(kek_raw):
        assert form not in backend.at_rest()


# pseudonyms


def test_device_pseudonyms(tmp_path: Path) -> None:
    key = load_tombstone_key(tmp_path / "tombstone.key")
    assert stat.S_IMODE((tmp_path / "tombstone.key").stat().st_mode) == 0o600
    again = load_tombstone_key(tmp_path / "tombstone.key")
    p = device_pseudonym(key, DEV_A)
    assert len(p) == 32 and int(p, 16) >= 0
    assert p == device_pseudonym(again, 0xA1) == device_pseudonym(key, DEV_A.upper())
    assert p != device_pseudonym(key, DEV_B)
    assert p != device_pseudonym(PseudonymKey(new_key()), DEV_A)
    assert DEV_A not in p and "a1" not in p[-2:]


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 2**64 - 1), b=st.integers(0, 2**64 - 1))
def test_pseudonyms_are_one_to_one_in_practice(a: int, b: int) -> None:
    key = PseudonymKey(b"\x01" * 32)
    assert (device_pseudonym(key, a) == device_pseudonym(key, b)) == (a == b)


# throughput


def test_seal_and_open_throughput(keys: DataKeyStore) -> None:
    """The gateway seals every record of every batch: tens of thousands a second on one core is the need.
    Prints the figures (pytest -s); the bound is a floor far below them, for slow CI machines."""
    n = 50_000
    plaintexts = [values_json(i) for i in range(256)]
    size = sum(map(len, plaintexts)) // len(plaintexts)
    t0 = time.perf_counter()
    for _ in range(n):
        keys.data_key(DEV_A, OWNER)
    lookup_s = time.perf_counter() - t0
    key = keys.data_key(DEV_A, OWNER)
    t0 = time.perf_counter()
    tokens = [key.seal(plaintexts[i & 255], family="steps", start_us=i) for i in range(n)]
    seal_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, token in enumerate(tokens):
        key.open(token, family="steps", start_us=i)
    open_s = time.perf_counter() - t0
    print(
        f"\n{size}-byte values: seal {n / seal_s:,.0f}/s ({seal_s / n * 1e6:.2f} µs), "
        f"open {n / open_s:,.0f}/s ({open_s / n * 1e6:.2f} µs), "
        f"data_key cache hit {lookup_s / n * 1e6:.2f} µs"
    )
    assert n / seal_s > 20_000 and n / open_s > 20_000


# the sealer: the store URL picks its key store


def test_the_sealer_of_a_postgres_store_seals_with_the_fleets_key_store(
    tmp_path: Path, postgres_keys: PostgresKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.privacy.keys_postgres import PostgresKeyStore
    from gateway.privacy.sealing import has_key_store, open_sealer

    monkeypatch.delenv(KEK_ENV, raising=False)
    url = postgres_keys.url + "?schema=fleet_store"  # the store's own option, dropped for the key store
    assert has_key_store(tmp_path, url) and not has_key_store(tmp_path, "sqlite:///x.db")
    one = open_sealer(tmp_path, url, key_schema=postgres_keys.where)
    other = open_sealer(tmp_path, url, key_schema=postgres_keys.where)  # a second gateway, same KEK
    try:
        assert isinstance(one.keys, PostgresKeyStore) and not (tmp_path / KEYS_DB).exists()
        token = one.seal_values(DEV_A, OWNER, "steps", 60, b"values")
        assert other.open_values(DEV_A, OWNER, "steps", 60, token) == b"values"
        assert postgres_keys.execute("SELECT count(*) FROM {t}") == [(1,)]
    finally:
        one.keys.close()
        other.keys.close()


def test_a_key_store_that_cannot_be_reached_is_unavailable_not_unreadable() -> None:
    """A row whose key cannot be looked up now is not a tampered or erased row: the store must answer
    UNAVAILABLE (the band resends, the reader retries), never skip the row as unreadable."""
    from gateway.privacy.keys import KeyStoreUnavailable
    from gateway.privacy.sealing import KeySealer
    from gateway.store.base import StoreUnavailable, Unreadable

    class Away:
        def data_key(self, device_id: str | int, ownership: str, *, create: bool = True) -> DataKey:
            raise KeyStoreUnavailable("key store postgresql://db/x: connection refused")

    class Erased:
        def data_key(self, device_id: str | int, ownership: str, *, create: bool = True) -> DataKey:
            raise NoDataKey("no data key")

    away = KeySealer(Away(), PseudonymKey(new_key()))  # type: ignore[arg-type]
    for call in (
        lambda: away.seal_values(DEV_A, OWNER, "steps", 0, b"v"),
        lambda: away.open_values(DEV_A, OWNER, "steps", 0, b"token"),
        lambda: away.seal_state(DEV_A, OWNER, b"s"),
        lambda: away.open_state(DEV_A, OWNER, b"token"),
    ):
        with pytest.raises(StoreUnavailable, match="connection refused"):
            call()
    with pytest.raises(Unreadable, match="NoDataKey"):
        KeySealer(Erased(), PseudonymKey(new_key())).open_values(DEV_A, OWNER, "steps", 0, b"t")  # type: ignore[arg-type]
