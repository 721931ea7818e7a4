"""The feature stream as the gateway sees it: one small protocol (`FeatureStream`), the message layout
every stream shares, and the outbox bounds that make publishing exactly-once in effect.

Why a package of its own beside `gateway/store/`: a stream is not a `Store` (no sequences, no device
rows, nothing the gateway reads back); it is fed from the store's transactional outbox by the drainer, so
it sits downstream of the store and the `Store` protocol stays small.

Messages (docs/streams.md): one per stored record, msgpack, on `<prefix>.<family>.<device>`, with the
header `Nats-Msg-Id` = `<device>/<family>/<start_us>/<ownership>`: the record's key in the store, so a
record republished after a crash is the same message and the stream drops it as a duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import msgpack

from gateway.store.base import OutboxRow

LAYOUT_VERSION = 1
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
    """One record as the stream carries it: where it goes (`family`, `device`), its ID, its bytes."""

    outbox_id: int
    family: str
    device: str
    msg_id: str
    payload: bytes

    def __repr__(self) -> str:  # the payload holds feature values: never in logs
        return f"Message({self.outbox_id}, {self.family}, {self.device}, {len(self.payload)} bytes)"


def message_of(row: OutboxRow) -> Message:
    """The message of a record's outbox entry (see docs/streams.md for the layout)."""
    record = row.record
    if record is None:
        raise ValueError(f"{row!r} is a purge entry, not a record")
    body = {
        "v": LAYOUT_VERSION,
        "cursor": row.cursor,
        "device": record["device"],
        "family": record["family"],
        "start_us": record["start_us"],
        "duration_s": record["duration_s"],
        "algo": record["algo"],
        "values": record["values"],
    }
    msg_id = f"{record['device']}/{record['family']}/{record['start_us']}/{row.ownership or '-'}"
    return Message(row.id, record["family"], record["device"], msg_id, msgpack.packb(body))


def decode_message(payload: bytes) -> dict:
    """A message's record (and its `cursor` and layout `v`); ValueError for a layout this code does not
    know, so a consumer never misreads a newer one."""
    body = msgpack.unpackb(payload)
    if not isinstance(body, dict) or body.get("v") != LAYOUT_VERSION:
        raise ValueError(f"unknown message layout {body.get('v') if isinstance(body, dict) else None!r}")
    return body


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
