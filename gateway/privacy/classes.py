"""Every stored column, classified by sensitivity, in one place (issue 13, item 7). A test opens freshly
migrated stores and fails when a column has no class here, or a class names a column that is gone: a new
column cannot be stored without someone deciding what it is.

The health classes (`HEALTH`) are the ones the band's privacy policy calls sensitive: they are sealed at
rest and live in tables of their own (`records_heart`, `records_sleep`), so a database grant can keep them
from a role that may read activity only.
"""

from __future__ import annotations

from collections.abc import Mapping

IDENTIFIER = "identifier"  # names a device, an owner's data (ownership), a principal, or a pseudonym of one
ACTIVITY = "activity"  # steps, activity, wear, distance values
HEART = "heart"  # heart rate, HRV, resting heart rate
SLEEP = "sleep"  # sleep stages and night summaries
PERSONAL = "personal"  # the owner's profile, consent decisions, guardian, second factor
DEVICE_METADATA = "device metadata"  # sequence numbers, times, kinds, states, algorithm names
AUDIT = "audit"  # the hash-chained audit log
KEY = "key"  # wrapped data keys and their identifiers
SYSTEM = "system"  # schema versions and counters: nothing about anyone

CLASSES = (IDENTIFIER, ACTIVITY, HEART, SLEEP, PERSONAL, DEVICE_METADATA, AUDIT, KEY, SYSTEM)
HEALTH = frozenset({HEART, SLEEP})

_RECORD_COLUMNS = {
    "cursor": DEVICE_METADATA,
    "device": IDENTIFIER,
    "ownership": IDENTIFIER,
    "family": DEVICE_METADATA,
    "start_us": DEVICE_METADATA,
    "duration_s": DEVICE_METADATA,
    "algo": DEVICE_METADATA,
}

# database ("features": the feature store, "keys": the key store) → table → column → class
COLUMNS: Mapping[str, Mapping[str, Mapping[str, str]]] = {
    "features": {
        "schema_version": {"version": SYSTEM},
        "sqlite_sequence": {"name": SYSTEM, "seq": SYSTEM},
        "record_cursor": {"next": SYSTEM},
        "registry_version": {"version": SYSTEM},
        "records_activity": {**_RECORD_COLUMNS, "value": ACTIVITY},
        "records_heart": {**_RECORD_COLUMNS, "value": HEART},
        "records_sleep": {**_RECORD_COLUMNS, "value": SLEEP},
        # a device's feature state holds every family's arrays: classed as the most sensitive of them
        "devices": {
            "device": IDENTIFIER,
            "boot_id": DEVICE_METADATA,
            "state": HEART,
            "updated_us": DEVICE_METADATA,
            "ownership": IDENTIFIER,
        },
        "boots": {
            "device": IDENTIFIER,
            "boot_id": DEVICE_METADATA,
            "last_seq": DEVICE_METADATA,
            "updated_us": DEVICE_METADATA,
        },
        "tombstones": {
            "pseudonym": IDENTIFIER,
            "boot_id": DEVICE_METADATA,
            "last_seq": DEVICE_METADATA,
            "erased_us": DEVICE_METADATA,
        },
        "principals": {
            "kind": DEVICE_METADATA,
            "name": IDENTIFIER,
            "state": DEVICE_METADATA,
            "created_us": DEVICE_METADATA,
            "updated_us": DEVICE_METADATA,
            "last_seen_us": DEVICE_METADATA,
        },
        "credentials": {
            "id": IDENTIFIER,
            "kind": DEVICE_METADATA,
            "name": IDENTIFIER,
            "serial": IDENTIFIER,
            "not_after_us": DEVICE_METADATA,
            "state": DEVICE_METADATA,
            "created_us": DEVICE_METADATA,
        },
        "bindings": {"relay": IDENTIFIER, "device": IDENTIFIER, "created_us": DEVICE_METADATA},
        # the registry's change log names the principals each change touched (erasure deletes a device's)
        "registry_changes": {"seq": SYSTEM, "version": SYSTEM, "subject": IDENTIFIER},
        "grants": {
            "consumer": IDENTIFIER,
            "family": DEVICE_METADATA,
            "operation": DEVICE_METADATA,
            "devices": IDENTIFIER,
            "created_us": DEVICE_METADATA,
        },
        "audit": {"seq": AUDIT, "time_us": AUDIT, "entry": AUDIT, "mac": AUDIT},
        "audit_segments": {
            "seq": AUDIT,
            "mac": AUDIT,
            "first_seq": AUDIT,
            "first_time_us": AUDIT,
            "last_time_us": AUDIT,
        },
        # the feature stream's outbox: a message entry holds a batch's records of one family, encoded
        # and sealed as records are (any family: classed as the most sensitive, as a device's state);
        # an older gateway's record entry names a record by cursor (its values stay in the record); a
        # purge entry names an erased device until its stream subjects are purged
        "outbox": {
            "id": SYSTEM,
            "cursor": DEVICE_METADATA,
            "purge_device": IDENTIFIER,
            "taken_us": DEVICE_METADATA,
            "batch": DEVICE_METADATA,  # the first cursor of a record entry's commit: its stream message
            "device": IDENTIFIER,
            "ownership": IDENTIFIER,
            "family": DEVICE_METADATA,
            "start_us": DEVICE_METADATA,  # the message's first record's: with the above, its ID
            "records": DEVICE_METADATA,
            "message": HEART,
        },
        # per-device rate limits shared by processes and gateways: a bucket's level, nothing measured
        "device_limits": {
            "device": IDENTIFIER,
            "bucket": DEVICE_METADATA,
            "level": DEVICE_METADATA,
            "stamp_us": DEVICE_METADATA,
        },
        "ownerships": {
            "device": IDENTIFIER,
            "ownership": IDENTIFIER,
            "started_us": DEVICE_METADATA,
            "ended_us": DEVICE_METADATA,
        },
        "consent": {
            "seq": DEVICE_METADATA,
            "device": IDENTIFIER,
            "ownership": IDENTIFIER,
            "family": DEVICE_METADATA,
            "granted": PERSONAL,
            "time_us": DEVICE_METADATA,
            "actor": IDENTIFIER,
        },
        "guardians": {
            "device": IDENTIFIER,
            "ownership": IDENTIFIER,
            "guardian": PERSONAL,
            "time_us": DEVICE_METADATA,
            "actor": IDENTIFIER,
        },
        "profiles": {
            "device": IDENTIFIER,
            "ownership": IDENTIFIER,
            "version": DEVICE_METADATA,
            "sealed": PERSONAL,
            "time_us": DEVICE_METADATA,
        },
        "totp": {
            "device": IDENTIFIER,
            "ownership": IDENTIFIER,
            "sealed": PERSONAL,
            "last_step": DEVICE_METADATA,
            "time_us": DEVICE_METADATA,
        },
    },
    "keys": {
        "data_keys": {
            "id": SYSTEM,
            "device": IDENTIFIER,
            "ownership": IDENTIFIER,
            "key_id": KEY,
            "kek_id": KEY,
            "wrapped": KEY,
            "created_us": DEVICE_METADATA,
        },
    },
}


# The PostgreSQL store and key store (gateway/store/postgres.py, gateway/privacy/keys_postgres.py): the
# same tables, with these columns added (table → column → class) and these removed (SQLite's own).
_POSTGRES_ADDED: Mapping[str, Mapping[str, Mapping[str, str]]] = {
    "features": {
        "schema_version": {"compatible": SYSTEM},  # the oldest code version that may use the schema
        "record_cursor": {"high": SYSTEM},
        # a record's value is stored in clear (encrypt_at_rest off) or sealed, in one of two columns
        **{
            table: {"value_text": cls, "value_sealed": cls}
            for table, cls in (
                ("records_activity", ACTIVITY),
                ("records_heart", HEART),
                ("records_sleep", SLEEP),
            )
        },
        "outbox_leases": {"device": IDENTIFIER, "holder": SYSTEM, "until_us": DEVICE_METADATA},
        # message entries in a table of their own, which an older gateway's drainer never reads (its
        # `outbox` rows without a cursor are purge entries); the columns are SQLite's outbox's
        "outbox_messages": {
            "id": SYSTEM,  # from outbox's identity: one order across both tables
            "device": IDENTIFIER,
            "ownership": IDENTIFIER,
            "family": DEVICE_METADATA,
            "start_us": DEVICE_METADATA,
            "records": DEVICE_METADATA,
            "message": HEART,
            "taken_us": DEVICE_METADATA,
        },
    },
    "keys": {"schema_version": {"version": SYSTEM}},
}
_POSTGRES_REMOVED: Mapping[str, Mapping[str, frozenset[str]]] = {
    "features": {
        "sqlite_sequence": frozenset({"name", "seq"}),
        "record_cursor": frozenset({"next"}),
        # record and purge entries only: a purge entry is one whose cursor is NULL; no batch (before
        # message entries, a PostgreSQL gateway wrote a message a record); message entries are in
        # outbox_messages
        "outbox": frozenset(
            {"purge_device", "batch", "ownership", "family", "start_us", "records", "message"}
        ),
        "records_activity": frozenset({"value"}),
        "records_heart": frozenset({"value"}),
        "records_sleep": frozenset({"value"}),
    },
    "keys": {"data_keys": frozenset({"id"})},  # keyed by (device, ownership) alone
}


def _postgres_columns() -> dict[str, dict[str, dict[str, str]]]:
    out: dict[str, dict[str, dict[str, str]]] = {}
    for db, tables in COLUMNS.items():
        removed = _POSTGRES_REMOVED.get(db, {})
        out[db] = {
            table: {c: cls for c, cls in columns.items() if c not in removed.get(table, frozenset())}
            for table, columns in tables.items()
        }
        for table, columns in _POSTGRES_ADDED.get(db, {}).items():
            out[db].setdefault(table, {}).update(columns)
        out[db] = {table: columns for table, columns in out[db].items() if columns}
    return out


# store kind ("sqlite", "postgresql") → database → table → column → class
COLUMNS_BY_STORE: Mapping[str, Mapping[str, Mapping[str, Mapping[str, str]]]] = {
    "sqlite": COLUMNS,
    "postgresql": _postgres_columns(),
}


def class_of(database: str, table: str, column: str, store: str = "sqlite") -> str | None:
    """The class of a stored column, None if it has none (which the classification test refuses)."""
    return COLUMNS_BY_STORE[store].get(database, {}).get(table, {}).get(column)


def health_columns() -> list[tuple[str, str, str]]:
    """(database, table, column) of every column holding health data."""
    return [
        (db, table, column)
        for db, tables in COLUMNS.items()
        for table, columns in tables.items()
        for column, cls in columns.items()
        if cls in HEALTH
    ]
