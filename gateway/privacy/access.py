"""Right of access and erasure for one device's current ownership.

`export_lines` streams what is kept about the ownership as JSON lines (one object a line) or msgpack
(one object after another), page by page, so memory stays flat however much a device holds: first the
device and ownership, then each profile version, consent decision and guardian record, then every
feature record (`kind` "feature", with `family` and `start_us`), then the audit entries that name the
device. Nothing of another device: every read is filtered by the device's ID. Audit entries name devices
by a keyed pseudonym; they are found by it, and shown to the owner with the device's own ID in its place.

`erase` destroys the device's data keys first (from then on nothing sealed under them opens), then
forgets its privacy rows through the registry (audited, and the gateway stops processing at once) and
deletes its records, state and high-water marks in the feature store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import orjson

from gateway.pipeline import StoreThread
from gateway.privacy.crypto import PseudonymKey
from gateway.privacy.ownership import current_ownership
from gateway.privacy.profile import unseal
from gateway.privacy.service import Caller
from gateway.security.audit import AuditEvent, audit_pseudonym
from gateway.security.registry import Registry
from gateway.store.base import RegistryOp, Store

PAGE = 1000
CHUNK_BYTES = 256 * 1024


class _Encoder:
    """Objects to bytes in the export's format, handed out in chunks of about CHUNK_BYTES."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.buffer = bytearray()

    def add(self, obj: dict[str, Any]) -> bytes | None:
        if self.fmt == "msgpack":
            self.buffer += msgpack.packb(obj)
        else:
            self.buffer += orjson.dumps(obj) + b"\n"
        if len(self.buffer) >= CHUNK_BYTES:
            return self.take()
        return None

    def extend(self, data: bytes) -> bytes | None:
        """Objects already encoded in this format (`_feature_page`)."""
        self.buffer += data
        if len(self.buffer) >= CHUNK_BYTES:
            return self.take()
        return None

    def take(self) -> bytes:
        out, self.buffer = bytes(self.buffer), bytearray()
        return out


def _feature_page(store: Store, cursor: int, device: str, ownership: str, fmt: str) -> tuple[bytes, int, int]:
    """One page of the ownership's feature records after `cursor`, encoded: (bytes, last cursor, rows).
    Runs on the reader's thread; the records stored under this ownership only (a resold band's earlier
    ones are not this owner's)."""
    rows = store.read_since(cursor, device=device, ownership=ownership, limit=PAGE)
    if fmt == "msgpack":
        packb = msgpack.packb
        data = b"".join([packb({"kind": "feature", "cursor": c, **record}) for c, record in rows])
    else:
        dumps = orjson.dumps
        data = b"".join([dumps({"kind": "feature", "cursor": c, **record}) + b"\n" for c, record in rows])
    return data, (rows[-1][0] if rows else cursor), len(rows)


async def export_lines(
    caller: Caller,
    ownership: str,
    fmt: str,
    *,
    reader: StoreThread,
    data_key: Callable[[str, str], Any],
    pseudonyms: PseudonymKey,
) -> AsyncIterator[bytes]:
    """The export of `caller.device`'s current ownership `ownership` (see the module docstring)."""
    device = caller.device
    enc = _Encoder(fmt)
    history = await reader.call(reader.store.privacy_history, device)
    started = history.ownership.started_us if history.ownership is not None else 0
    objects: list[dict[str, Any]] = [
        {"kind": "device", "device": device, "ownership": ownership, "ownership_started_us": started}
    ]
    for row in history.profiles:
        profile = unseal(data_key(device, row.ownership), row.sealed, row.version)
        fields = profile.to_dict()
        objects.append({"kind": "profile", "version": row.version, "time_us": row.time_us, **fields})
    objects += [
        {"kind": "consent", "family": c.family, "granted": c.granted, "time_us": c.time_us, "actor": c.actor}
        for c in history.consents
    ]
    objects += [
        {"kind": "guardian", "guardian": g.guardian, "time_us": g.time_us, "actor": g.actor}
        for g in history.guardians
    ]
    for obj in objects:
        if (chunk := enc.add(obj)) is not None:
            yield chunk

    # Feature records: each page is read, opened and encoded on the reader's thread, and the next page is
    # asked for before this one is sent, so the store's work overlaps the sending and the event loop (which
    # also acks every streaming band) only hands bytes on.
    page = reader.submit(_feature_page, reader.store, 0, device, ownership, fmt)
    while page is not None:
        data, cursor, n = await asyncio.wrap_future(page)
        page = (
            reader.submit(_feature_page, reader.store, cursor, device, ownership, fmt) if n == PAGE else None
        )
        if (chunk := enc.extend(data)) is not None:
            yield chunk

    # the device's pseudonym, wherever an entry names it (actor, subject, reason, details); entries from
    # before pseudonyms named it in clear as actor or subject
    pseudonym, legacy = audit_pseudonym(pseudonyms, device), f"device:{device}"
    after = 0
    while True:
        rows = await reader.call(reader.store.audit_rows, after, PAGE)
        for row in rows:
            after = row.seq
            if pseudonym in row.entry:
                entry = orjson.loads(row.entry.replace(pseudonym, device))
            elif legacy in row.entry:
                entry = orjson.loads(row.entry)
                if legacy not in (entry.get("subject"), entry.get("actor")):
                    continue
            else:
                continue
            chunk = enc.add({"kind": "audit", **entry})
            if chunk is not None:
                yield chunk
        if len(rows) < PAGE:
            break
    if enc.buffer:
        yield enc.take()


async def erase(
    caller: Caller,
    *,
    registry: Registry,
    writer: StoreThread,
    destroy_keys: Callable[[str, str | None], int],
) -> dict[str, int]:
    """Erase the device (see the module docstring); returns what was removed, by kind. Idempotent."""
    device = caller.device
    # the owner erases their own ownership; the operator, every ownership of the device
    scope = (
        None
        if caller.operator
        else current_ownership(registry.policy.snapshot if registry.policy else None, device)
    )
    # durable before anything else of the erasure (a key store across the network: off the event loop)
    keys = await asyncio.to_thread(destroy_keys, device, scope)
    await registry.apply(
        [
            AuditEvent(
                "device.erased",
                caller.actor,
                f"device:{device}",
                details={"keys": keys, "scope": "all ownerships" if scope is None else "current ownership"},
            )
        ],
        [RegistryOp("forget", device=device, ownership=scope or "")],
    )
    records = await writer.call(writer.store.erase_device, int(device, 16), scope)
    removed = {"keys": keys, "records": records}
    done = AuditEvent("device.erase_completed", caller.actor, f"device:{device}", details=removed)
    await registry.apply([done])
    return removed
