"""Every stored column has a sensitivity class (issue 13, item 7): the feature store and the key store are
created and migrated for real, then every column of every table is looked up in gateway/privacy/classes.py.
A column added without a class fails here, and so does a class left behind for a column that is gone."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.privacy.classes import CLASSES, COLUMNS, HEALTH, class_of, health_columns
from gateway.privacy.sealing import open_sealer
from gateway.store import SqliteStore
from gateway.store.base import FAMILY_CLASS
from gateway.store.sqlite import RECORD_TABLES


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
    for db, columns in found.items():
        unclassified = sorted(f"{t}.{c}" for t, c in columns if class_of(db, t, c) is None)
        assert not unclassified, f"{db}: columns with no sensitivity class: {unclassified}"
        stale = sorted(f"{t}.{c}" for t, cols in COLUMNS[db].items() for c in cols if (t, c) not in columns)
        assert not stale, f"{db}: classes for columns that are not stored: {stale}"
    assert {cls for tables in COLUMNS.values() for cols in tables.values() for cls in cols.values()} <= set(
        CLASSES
    )


def test_health_lives_in_tables_of_its_own_and_each_record_table_holds_one_class():
    for cls, table in RECORD_TABLES.items():
        assert class_of("features", table, "value") == cls
    assert {cls for cls in FAMILY_CLASS.values()} == set(RECORD_TABLES)
    health_tables = {t for db, t, _ in health_columns() if t.startswith("records_")}
    assert health_tables == {"records_heart", "records_sleep"}
    assert {"heart", "sleep"} == HEALTH
    assert FAMILY_CLASS["heart"] == "heart" and FAMILY_CLASS["sleep"] == "sleep"
    assert FAMILY_CLASS["steps"] not in HEALTH
