"""Every stored column has a sensitivity class (issue 13, item 7): the feature store and the key store are
created and migrated for real, then every column of every table is looked up in gateway/privacy/classes.py.
A column added without a class fails here, and so does a class left behind for a column that is gone."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
from psycopg import sql

from gateway.privacy.classes import CLASSES, COLUMNS_BY_STORE, HEALTH, class_of, health_columns
from gateway.privacy.sealing import open_sealer
from gateway.store import SqliteStore, open_store
from gateway.store.base import FAMILY_CLASS
from gateway.store.sqlite import RECORD_TABLES
from tests.services import postgres_url, unique_name


def stored_columns(path: Path) -> set[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {(t, r[1]) for t in tables for r in conn.execute(f"PRAGMA table_info({t})")}
    finally:
        conn.close()


def test_every_stored_column_of_every_store_has_a_class_and_no_class_is_stale(tmp_path):
    (tmp_path / "state").mkdir()
    sealer = open_sealer(tmp_path / "state")
    try:
        with SqliteStore(tmp_path / "features.db", sealer=sealer):
            pass
    finally:
        sealer.keys.close()
    found = {
        "features": stored_columns(tmp_path / "features.db"),
        "keys": stored_columns(tmp_path / "state" / "keys.db"),
    }
    check_classes("sqlite", found)
    for tables in COLUMNS_BY_STORE.values():
        assert {cls for t in tables.values() for cols in t.values() for cls in cols.values()} <= set(CLASSES)


def check_classes(store: str, found: dict[str, set[tuple[str, str]]]) -> None:
    for db, columns in found.items():
        unclassified = sorted(f"{t}.{c}" for t, c in columns if class_of(db, t, c, store) is None)
        assert not unclassified, f"{store} {db}: columns with no sensitivity class: {unclassified}"
        classified = COLUMNS_BY_STORE[store][db]
        stale = sorted(f"{t}.{c}" for t, cols in classified.items() for c in cols if (t, c) not in columns)
        assert not stale, f"{store} {db}: classes for columns that are not stored: {stale}"


def test_every_column_of_the_postgresql_stores_has_a_class_and_no_class_is_stale(tmp_path):
    """The same over PostgreSQL: the feature store's schema and the key store's, made by the real stores."""
    base = postgres_url()
    schema = unique_name("test_classes")
    keys = f"{schema}_keys"
    url = f"{base}?schema={schema}"
    (tmp_path / "state").mkdir()
    try:
        sealer = open_sealer(tmp_path / "state", url, key_schema=keys)
        try:
            with open_store(url, sealer):
                pass
        finally:
            sealer.keys.close()
        with psycopg.connect(base, autocommit=True) as conn:
            found = {
                db: {
                    (t, c)
                    for t, c in conn.execute(
                        "SELECT table_name, column_name FROM information_schema.columns "
                        "WHERE table_schema = %s",
                        (name,),
                    )
                }
                for db, name in (("features", schema), ("keys", keys))
            }
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            for name in (schema, keys):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    assert found["features"] and found["keys"]
    check_classes("postgresql", found)


def test_health_lives_in_tables_of_its_own_and_each_record_table_holds_one_class():
    for cls, table in RECORD_TABLES.items():
        assert class_of("features", table, "value") == cls
    assert {cls for cls in FAMILY_CLASS.values()} == set(RECORD_TABLES)
    health_tables = {t for db, t, _ in health_columns() if t.startswith("records_")}
    assert health_tables == {"records_heart", "records_sleep"}
    assert {"heart", "sleep"} == HEALTH
    assert FAMILY_CLASS["heart"] == "heart" and FAMILY_CLASS["sleep"] == "sleep"
    assert FAMILY_CLASS["steps"] not in HEALTH
