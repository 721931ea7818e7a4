"""What every SQL store does to a batch before it reaches the database, and to a row after it leaves:
records checked and encoded as rows (values as JSON, or sealed), and rows opened back into records.

Shared by sqlite.py and postgres.py so that both accept, encode and serve exactly the same records; this
module does no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
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
    packed: list[bytes] | None = None  # with the outbox on: each record packed for its message


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


def packed_of(item: CommitItem) -> list[bytes]:
    """The item's records packed for their stream messages (`pack_record`), one a row of `rows_of`:
    prepared ahead with the rows, or packed now."""
    p = item.prepared
    if isinstance(p, Prepared) and p.token is item.records and not item.records and p.packed is not None:
        return p.packed
    if not item.records and isinstance(p, Prepared):
        raise ValueError("prepared without the outbox: its records are not packed for the stream")
    return [pack_record(r) for r in item.records]


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
    open_msg: Callable[[tuple], bytes | None] | None = None,
) -> tuple[list[OutboxRow], list[int]]:
    """`Store.outbox_take`'s answer from a page of entries (id, the device a purge entry names, cursor,
    taken_us, batch, device, ownership, family, start_us, records, message) and the record rows of their
    cursors (`found`, by cursor), opened with `open_row`, messages with `open_msg` (`open_message`'s
    entry): the rows, and the ids of entries that can never be published (a destroyed key, or a record
    gone)."""
    out: list[OutboxRow] = []
    dead: list[int] = []
    for id_, purge_device, cursor, taken_us, batch, *message_entry in entries:
        taken = now_us if taken_us is None else int(taken_us)
        if message_entry and message_entry[5] is not None:
            device, ownership, family, start_us, records, sealed = message_entry
            assert open_msg is not None
            message = open_msg((device, ownership, family, start_us, sealed))
            if message is None:
                dead.append(id_)
                continue
            out.append(
                OutboxRow(
                    id_, device, ownership, None, None, taken, None, message, family, int(start_us), records
                )
            )
            continue
        if cursor is None:
            out.append(OutboxRow(id_, purge_device or "", "", None, None, taken))
            continue
        row = found.get(cursor)
        record = None if row is None else open_row(row)
        if record is None:
            dead.append(id_)
            continue
        out.append(OutboxRow(id_, row[1], row[2], cursor, record, taken, batch, records=1))
    return out, dead


# The feature stream's message, layout 2 (gateway/stream/base.py, docs/streams.md), encoded here, where
# the records are encoded: a store with the outbox on writes a batch's records of a family as one
# message entry at the commit, so the drainer publishes bytes it opens once and never encodes again.
# A message is a msgpack map {"v": 2, "device", "family", "records": [{"cursor", "start_us",
# "duration_s", "algo", "values"}, ...]}, keys in that order; a record is packed once, in `prepare`
# (outside the store's write lock), without its cursor, which the commit splices in: the bytes are
# those msgpack.packb gives for the whole map.
MESSAGE_LAYOUT = 2
_HEAD = b"\x84" + msgpack.packb("v") + msgpack.packb(MESSAGE_LAYOUT) + msgpack.packb("device")
_FAMILY = msgpack.packb("family")
_RECORDS = msgpack.packb("records")
_CURSOR = b"\x85" + msgpack.packb("cursor")  # a record's map: five entries, the cursor first


def pack_record(record: dict) -> bytes:
    """A record's entries in its message's list after its cursor (the map's header and cursor are the
    commit's, `message_body`)."""
    packed = msgpack.packb(
        {
            "start_us": record["start_us"],
            "duration_s": record["duration_s"],
            "algo": record["algo"],
            "values": record["values"],
        }
    )
    return packed[1:]  # a four-entry map's header is one byte (fixmap)


def message_body(device: str, family: str, cursors: list[int], packed: list[bytes]) -> bytes:
    """A message of `device`'s records of `family` (their cursors, and each `pack_record`'d)."""
    n = len(cursors)
    if n < 16:
        header = bytes((0x90 | n,))
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    parts = [_HEAD, msgpack.packb(device), _FAMILY, msgpack.packb(family), _RECORDS, header]
    for cursor, rest in zip(cursors, packed, strict=True):
        parts += (_CURSOR, msgpack.packb(cursor), rest)
    return b"".join(parts)


def message_seal_family(family: str) -> str:
    """The family a message entry is sealed under: the record recipe and the device's data key, with
    associated data no record row has (a family name has no '/'), so a message cannot pass for a
    record's values or the other way round."""
    return f"message/{family}"


def message_rows(
    device: str,
    ownership: str,
    rows: list[tuple],
    cursors: tuple[int | None, ...],
    packed: list[bytes],
    sealer: Sealer | None,
) -> list[tuple[str, str, str, int, int, bytes]]:
    """The message entries of one commit of one device (`rows`, `cursors` and `packed` aligned, a cursor
    None for a record not inserted): (device, ownership, family, start_us, records, message), one a
    family in the order of its first record, the message sealed with the device's data key (as its
    records are) when there is a sealer. `start_us` is the first record's: with the device, family and
    ownership it is the message's ID (`OutboxRow.msg_id`)."""
    by_family: dict[str, tuple[list[int], list[bytes], int]] = {}
    for row, cursor, rest in zip(rows, cursors, packed, strict=True):
        if cursor is None:
            continue
        family = row[3]
        group = by_family.get(family)
        if group is None:
            group = by_family[family] = ([], [], row[4])
        group[0].append(cursor)
        group[1].append(rest)
    out = []
    for family, (cs, ps, start_us) in by_family.items():
        body = message_body(device, family, cs, ps)
        if sealer is not None:
            owner = ownership or UNOWNED
            body = sealer.seal_values(device, owner, message_seal_family(family), start_us, body)
        out.append((device, ownership, family, start_us, len(cs), body))
    return out


def open_message(
    entry: tuple,
    sealer: Sealer | None,
    where: str,
    openers: dict[tuple[str, str], Callable[[str, int, bytes], bytes]],
) -> bytes | None:
    """A message entry's (device, ownership, family, start_us, message) bytes, opened; None, logged by
    identifiers only, if it does not open (an erased device's key). A message written without a sealer
    is in clear, and tells itself apart by its first byte (a map's, where a sealed token starts with its
    version, 1), as a record's JSON text does from sealed bytes."""
    device, ownership, family, start_us, message = entry
    if message[:1] == _HEAD[:1]:
        return bytes(message)
    if sealer is None:
        raise StoreError(f"{where}: sealed outbox messages and no sealer to open them")
    slot = (device, ownership or UNOWNED)
    opener = openers.get(slot)
    if opener is None:
        opener = openers[slot] = sealer.values_opener(*slot)
    try:
        return opener(message_seal_family(family), start_us, bytes(message))
    except Unreadable as e:
        log.warning(
            "a sealed outbox message does not open: skipped",
            extra={
                "fields": {
                    "event": "outbox_message_unreadable",
                    "device": device,
                    "family": family,
                    "start_us": start_us,
                    "reason": str(e),
                }
            },
        )
        return None
