"""What every SQL store does to a batch before it reaches the database, and to a row after it leaves:
records checked and encoded as rows (values as JSON, or sealed), and rows opened back into records.

Shared by sqlite.py and postgres.py so that both accept, encode and serve exactly the same records; this
module does no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from decoder.records import device_key
from gateway.store.base import (
    FAMILY_CLASS,
    U64,
    UNOWNED,
    CommitItem,
    OutboxRow,
    Sealer,
    StoreError,
    Unreadable,
    check_batch,
    check_records,
)

log = logging.getLogger("bandgate.store")

# Each family's table, by sensitivity class (base.FAMILY_CLASS).
RECORD_TABLES = {cls: f"records_{cls}" for cls in sorted(set(FAMILY_CLASS.values()))}
TABLE_OF = {family: RECORD_TABLES[cls] for family, cls in FAMILY_CLASS.items()}


@dataclass(frozen=True)
class Prepared:
    """`Store.prepare`'s work: one device's records, checked and encoded as rows. The prepared item's
    `records` is `token`, an empty list; an item whose records or device were changed after `prepare` is
    encoded again from what it holds, so nothing unchecked reaches the database."""

    token: list[dict]
    device_id: int
    rows: list[tuple]
    ownership: str = ""


def rows_of(item: CommitItem, sealer: Sealer | None) -> list[tuple]:
    """The item's rows: prepared ahead for exactly this item, or checked and encoded now."""
    p = item.prepared
    if (
        isinstance(p, Prepared)
        and p.token is item.records
        and not item.records
        and p.device_id == item.device_id
        and p.ownership == item.ownership
    ):
        check_item(item)  # the IDs and state may have been replaced since: cheap, so checked again
        return p.rows
    return encode(item, sealer)


def check_item(item: CommitItem) -> None:
    """Refuse IDs outside their wire types and a state that is not bytes."""
    check_batch(item.device_id, item.boot_id, item.first_seq, item.last_seq)
    if not isinstance(item.state, bytes):
        raise ValueError("state must be bytes")


def encode(item: CommitItem, sealer: Sealer | None) -> list[tuple]:
    """The item's checks that need no database, and its records as rows (table, device, ownership, family,
    start_us, duration_s, algo, value): the value is JSON text, or bytes sealed when there is a sealer;
    `ValueError` if malformed."""
    check_item(item)
    device = device_key(item.device_id)
    check_records(device, item.records)
    ownership = item.ownership
    if sealer is None:
        return [
            (
                TABLE_OF[r["family"]],
                device,
                ownership,
                r["family"],
                r["start_us"],
                r["duration_s"],
                r["algo"],
                dumps(r["values"]),
            )
            for r in item.records
        ]
    owner = ownership or UNOWNED
    return [
        (
            TABLE_OF[r["family"]],
            device,
            ownership,
            r["family"],
            r["start_us"],
            r["duration_s"],
            r["algo"],
            sealer.seal_values(device, owner, r["family"], r["start_us"], orjson.dumps(r["values"])),
        )
        for r in item.records
    ]


def dumps(values: dict) -> str:
    """Compact JSON, UTF-8, floats in their shortest round-trip form (as `json.dumps` writes them, 7x
    faster: every record of every batch passes here). `check_records` has refused NaN, infinities and
    ints beyond int64, which orjson would write as null or refuse."""
    return orjson.dumps(values).decode()


def token_decision(
    level: float, elapsed_s: float, rate: float, burst: float, need: float, charge: float
) -> tuple[float, float]:
    """`Store.take_tokens`' rule, the same in every store: the level refilled over `elapsed_s` (clamped
    at 0: two gateways' clocks may disagree a little), then (new level, 0.0) if it holds `need`, else
    (refilled level, seconds until it will)."""
    level = min(burst, level + max(0.0, elapsed_s) * rate)
    if level >= need:
        return level - charge, 0.0
    return level, (need - level) / rate


def check_device_id(device_id: int) -> None:
    """Refuse a device ID that is not a u64."""
    if not 0 <= device_id < U64:
        raise ValueError(f"device_id {device_id} is not a u64")


def open_record(
    row: tuple,
    sealer: Sealer | None,
    where: str,
    openers: dict[tuple[str, str], Callable[[str, int, bytes], bytes]] | None = None,
) -> dict | None:
    """A stored row (cursor, device, ownership, family, start_us, duration_s, algo, value) as a record, its
    values opened: `value` is JSON text (written in clear: before encryption at rest, or without a sealer)
    or sealed bytes. None, logged by identifiers only, for sealed values that do not open (an erased
    device's key, or a value moved from another row); `StoreError` for sealed values and no sealer.
    `openers` (a page's `Sealer.values_opener` per device and ownership) looks a key up once a page."""
    _, device, ownership, family, start_us, duration_s, algo, value = row
    if isinstance(value, str):
        values = orjson.loads(value)
    else:
        if sealer is None:
            raise StoreError(f"{where}: sealed records and no sealer to open them")
        slot = (device, ownership or UNOWNED)
        opener = None if openers is None else openers.get(slot)
        if opener is None:
            opener = sealer.values_opener(*slot)
            if openers is not None:
                openers[slot] = opener
        try:
            values = orjson.loads(opener(family, start_us, value))
        except Unreadable as e:
            log.warning(
                "a sealed record does not open: skipped",
                extra={
                    "fields": {
                        "event": "record_unreadable",
                        "device": device,
                        "family": family,
                        "start_us": start_us,
                        "reason": str(e),
                    }
                },
            )
            return None
    return {
        "family": family,
        "device": device,
        "start_us": start_us,
        "duration_s": duration_s,
        "algo": algo,
        "values": values,
    }


def outbox_page(
    entries: list[tuple],
    found: dict[int, tuple],
    open_row: Callable[[tuple], dict | None],
    now_us: int,
) -> tuple[list[OutboxRow], list[int]]:
    """`Store.outbox_take`'s answer from a page of entries (id, the device a purge entry names, cursor,
    taken_us[, batch]) and the record rows of their cursors (`found`, by cursor), opened with `open_row`: the
    rows, and the ids of entries that can never be published (a destroyed key, or a record gone)."""
    out: list[OutboxRow] = []
    dead: list[int] = []
    for id_, purge_device, cursor, taken_us, *batch in entries:
        taken = now_us if taken_us is None else int(taken_us)
        if cursor is None:
            out.append(OutboxRow(id_, purge_device or "", "", None, None, taken))
            continue
        row = found.get(cursor)
        record = None if row is None else open_row(row)
        if record is None:
            dead.append(id_)
            continue
        out.append(OutboxRow(id_, row[1], row[2], cursor, record, taken, batch[0] if batch else None))
    return out, dead
