"""The feature stream as the gateway sees it: one small protocol (`FeatureStream`), the message layout
every stream shares, and the outbox bounds that make publishing exactly-once in effect.

Why a package of its own beside `gateway/store/`: a stream is not a `Store` (no sequences, no device
rows, nothing the gateway reads back); it is fed from the store's transactional outbox by the drainer, so
it sits downstream of the store and the `Store` protocol stays small.

Messages (docs/streams.md): one per committed batch and family, msgpack, on `<prefix>.<family>.<device>`:
the records of that family the batch added to the store, as a list. Its header `Nats-Msg-Id` is the key
of its first record in the store, `<device>/<family>/<start_us>/<ownership>`, and which records a
message holds is fixed when they commit (the outbox entries name their batch), so a message republished
after a crash is the same message and the stream drops it as a duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import msgpack

from gateway.store.base import OutboxRow

LAYOUT_VERSION = 2
LAYOUTS = (1, 2)  # what decode_message reads; 1: a record a message (before 2026-12-06)
MSG_ID_HEADER = "Nats-Msg-Id"

# The bound the stream's duplicate window must cover (docs/streams.md): an outbox entry a drainer has
# taken is done, or taken again, within CRASH_BOUND_S. Inside one running drainer that is one publish
# timeout plus the longest back-off (PUBLISH_TIMEOUT_S + BACKOFF_MAX_S, 20 s); across a crash it is the
# time until the gateway runs again, which a deployment keeps below CRASH_BOUND_S (systemd Restart=always
# restarts in seconds; Kubernetes' CrashLoopBackOff waits at most 5 minutes).
PUBLISH_TIMEOUT_S = 5.0
BACKOFF_MAX_S = 15.0
CRASH_BOUND_S = 600.0
# A drainer starts no purge and no publish later than this after its take, leaving the rest of the page to
# the next round: a round ends within it plus one purge or publish, so a store that lends a page's devices
# to one drainer for a while (PostgreSQL: OUTBOX_LEASE_S) can lend them for longer than a round lasts.
ROUND_BUDGET_S = 20.0
# Twice the bound: an entry republished within it is dropped by the stream as a duplicate. JetStream keeps
# each message ID this long in memory (about 100 bytes each: 12 MB per 100 records/s).
DUPLICATE_WINDOW_S = 2 * CRASH_BOUND_S


class StreamUnavailable(Exception):  # noqa: N818 - a state of the stream, like StoreUnavailable
    """The stream cannot take messages now (unreachable, reconnecting, no ack in time): the outbox keeps
    them and the drainer tries again."""


@dataclass(frozen=True)
class Message:
    """A batch's records of one family as the stream carries them: where it goes (`family`, `device`), its
    ID, its bytes, and the outbox entries it publishes (`outbox_ids`, done together on its ack)."""

    outbox_ids: tuple[int, ...]
    family: str
    device: str
    msg_id: str
    payload: bytes
    records: int = 0  # how many records it holds (0: one an entry)

    @property
    def record_count(self) -> int:
        return self.records or len(self.outbox_ids)

    def __repr__(self) -> str:  # the payload holds feature values: never in logs
        n, size = self.record_count, len(self.payload)
        return f"Message({self.outbox_ids[0]}, {n} records, {self.family}, {self.device}, {size} bytes)"


def messages_of(rows: Sequence[OutboxRow]) -> list[Message]:
    """The messages of a page's entries (purge entries are skipped), in the order of their first
    entries, so a device's messages of a family go out in commit order. A message entry is its message,
    as the store encoded it at the commit; record entries (an older gateway's) are grouped here, one
    message a batch and family, and one without a batch is a message of its own. See docs/streams.md
    for the layout."""
    groups: dict[tuple, list[OutboxRow] | Message] = {}
    for row in rows:
        if row.message is not None:
            groups[(row.id,)] = Message(
                (row.id,), row.family, row.device, row.msg_id, row.message, row.records
            )
            continue
        record = row.record
        if record is None:
            continue
        key = (row.device, row.batch, record["family"]) if row.batch is not None else (row.id,)
        group = groups.setdefault(key, [])
        assert isinstance(group, list)
        group.append(row)
    return [g if isinstance(g, Message) else _message(g) for g in groups.values()]


def message_of(row: OutboxRow) -> Message:
    """The message of one record's outbox entry alone."""
    if row.record is None:
        raise ValueError(f"{row!r} is a purge entry, not a record")
    return _message([row])


def _message(group: list[OutboxRow]) -> Message:
    first = group[0].record
    assert first is not None
    device, family = first["device"], first["family"]
    body = {
        "v": LAYOUT_VERSION,
        "device": device,
        "family": family,
        "records": [
            {
                "cursor": row.cursor,
                "start_us": r["start_us"],
                "duration_s": r["duration_s"],
                "algo": r["algo"],
                "values": r["values"],
            }
            for row in group
            if (r := row.record) is not None
        ],
    }
    msg_id = f"{device}/{family}/{first['start_us']}/{group[0].ownership or '-'}"
    return Message(tuple(row.id for row in group), family, device, msg_id, msgpack.packb(body), len(group))


def decode_message(payload: bytes) -> dict:
    """A message's body: its layout `v`, `device`, `family` and `records`; ValueError for a layout this
    code does not know, so a consumer never misreads a newer one. A layout-1 message (a record alone) is
    read as a list of one."""
    body = msgpack.unpackb(payload)
    v = body.get("v") if isinstance(body, dict) else None
    if v not in LAYOUTS:
        raise ValueError(f"unknown message layout {v!r}")
    if v == 1:
        record = {k: body[k] for k in ("cursor", "start_us", "duration_s", "algo", "values")}
        return {"v": 1, "device": body["device"], "family": body["family"], "records": [record]}
    return body


def records_of(payload: bytes) -> list[dict]:
    """A message's records, each with its `device`, `family` and `cursor`, as the store holds them."""
    body = decode_message(payload)
    return [{"device": body["device"], "family": body["family"], **r} for r in body["records"]]


@runtime_checkable
class FeatureStream(Protocol):
    """A sink for feature records that consumers read. start/close follow the component contract (close
    is safe without start, and twice); start never fails because the stream is down: `publish` and
    `purge` raise `StreamUnavailable` until it is back."""

    async def start(self) -> None:
        """Begin connecting (in the background) and set the streams up once connected."""
        ...

    async def publish(self, messages: Sequence[Message]) -> list[bool]:
        """Publish `messages` and wait for the stream's acks (at most PUBLISH_TIMEOUT_S); one bool per
        message: acked (stored, or dropped as a duplicate of a stored one). `StreamUnavailable` if the
        stream cannot be reached at all."""
        ...

    async def purge(self, device: str) -> None:
        """Delete every message of `device` (16 hex) in every family; `StreamUnavailable` if it could not."""
        ...

    async def close(self) -> None:
        """Disconnect; safe without start, and twice."""
        ...
