"""Simulated bands as real gRPC clients: one Upload stream each, batches kept until acked and sent again
after a reconnect, as a band's flash queue would.

A band sends one batch and waits for its ack before the next (the gateway processes one batch at a time
per stream anyway). Acks decide what happens to the batch at the head of the queue:

| ack | the band |
|---|---|
| OK, ALREADY_EXISTS | drops it (it is stored) |
| RESOURCE_EXHAUSTED, UNAVAILABLE | waits `retry_after_ms`, sends it again |
| FAILED_PRECONDITION | sends it again flagged DATA_DROPPED_BEFORE (the gateway lost what came before) |
| anything else | drops it and counts it as refused (it can never be accepted) |

A broken stream (gateway restart, ABORTED, UNAVAILABLE) is reopened with backoff and the queue resent; a
stream refused as a whole (PERMISSION_DENIED, UNAUTHENTICATED) ends the band, its batches counted refused.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from bandgate.v1 import batch_pb2, ingest_pb2_grpc
from gateway.auth import device_metadata
from gateway.pipeline import (
    ALREADY_EXISTS,
    CODE_NAMES,
    FAILED_PRECONDITION,
    OK,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
)

RETRYABLE = frozenset({RESOURCE_EXHAUSTED, UNAVAILABLE})
FINAL = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})


@dataclass
class BandStats:
    """What one band saw; no sample values."""

    device_id: int
    batches: int = 0
    stored: int = 0
    duplicates: int = 0
    resent: int = 0
    reconnects: int = 0
    refused: dict[str, int] = field(default_factory=dict)


class BandClient:
    """One simulated band on one channel. `run` returns when every batch is acked (or refused for good)."""

    def __init__(
        self,
        target: str,
        device_id: int,
        *,
        max_backoff_s: float = 2.0,
        give_up_after_s: float = 120.0,
        on_ack: Callable[[int], None] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.target = target
        self.credentials = credentials  # the band's own certificate (mutual TLS); None: plaintext
        self.device_id = device_id
        self.max_backoff_s = max_backoff_s
        self.give_up_after_s = give_up_after_s
        self.on_ack = on_ack
        self.stats = BandStats(device_id)

    async def run(self, batches: Sequence[batch_pb2.Batch], *, interval_s: float = 0.0) -> BandStats:
        """Send `batches`, batch i becoming available `i * interval_s` after the start (the band records
        in real time, scaled); returns when all are answered for good."""
        started = time.monotonic()
        queue: collections.deque[batch_pb2.Batch] = collections.deque()
        upcoming = collections.deque(batches)
        self.stats.batches = len(batches)
        backoff = 0.05
        last_progress = time.monotonic()
        while upcoming or queue:
            try:
                channel = (
                    grpc.aio.secure_channel(self.target, self.credentials)
                    if self.credentials is not None
                    else grpc.aio.insecure_channel(self.target)
                )
                async with channel:
                    call = ingest_pb2_grpc.IngestServiceStub(channel).Upload(
                        metadata=device_metadata(self.device_id)
                    )
                    resending = bool(queue)
                    while upcoming or queue:
                        if not queue:
                            wait = (
                                started + (self.stats.batches - len(upcoming)) * interval_s - time.monotonic()
                            )
                            if wait > 0:
                                await asyncio.sleep(wait)
                            queue.append(upcoming.popleft())
                        batch = queue[0]
                        if resending:
                            self.stats.resent += 1
                        await call.write(batch)
                        ack = await call.read()
                        if ack is grpc.aio.EOF:
                            raise ConnectionError("stream ended")
                        backoff = 0.05
                        last_progress = time.monotonic()
                        resending = self._answer(queue, ack)
                        if resending and ack.code in RETRYABLE:
                            await asyncio.sleep(max(ack.retry_after_ms, 20) / 1000)
                    await call.done_writing()
                    await call.code()
            except (grpc.aio.AioRpcError, ConnectionError) as e:
                if isinstance(e, grpc.aio.AioRpcError) and e.code() in FINAL:
                    # refused as a whole (revoked, unbound, not registered): resending cannot help
                    self.stats.refused[e.code().name] = (
                        self.stats.refused.get(e.code().name, 0) + len(queue) + len(upcoming)
                    )
                    break
                if time.monotonic() - last_progress > self.give_up_after_s:
                    raise
                self.stats.reconnects += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        return self.stats

    def _answer(self, queue: collections.deque[batch_pb2.Batch], ack) -> bool:
        """Apply one ack to the head of the queue; True if the head must be sent again."""
        if ack.code in (OK, ALREADY_EXISTS):
            queue.popleft()
            if ack.code == OK:
                self.stats.stored += 1
            else:
                self.stats.duplicates += 1
            if self.on_ack:
                self.on_ack(self.device_id)
            return False
        if ack.code in RETRYABLE:
            return True
        if ack.code == FAILED_PRECONDITION and not queue[0].flags & batch_pb2.BATCH_FLAG_DATA_DROPPED_BEFORE:
            head = batch_pb2.Batch()
            head.CopyFrom(queue[0])
            head.flags |= batch_pb2.BATCH_FLAG_DATA_DROPPED_BEFORE
            queue[0] = head
            return True
        name = CODE_NAMES.get(ack.code, str(ack.code))
        self.stats.refused[name] = self.stats.refused.get(name, 0) + 1
        queue.popleft()
        return False


async def run_fleet(
    target: str,
    fleet: Sequence[tuple[int, Sequence[batch_pb2.Batch]]],
    *,
    interval_s: float = 0.0,
    on_ack: Callable[[int], None] | None = None,
    give_up_after_s: float = 120.0,
    credentials: Mapping[int, grpc.ChannelCredentials] | None = None,
) -> list[BandStats]:
    """Every band of `fleet` (device ID, batches) as its own client, concurrently; `credentials` maps each
    device to its certificate (mutual TLS), None for a plaintext gateway."""
    clients = [
        BandClient(
            target,
            device_id,
            on_ack=on_ack,
            give_up_after_s=give_up_after_s,
            credentials=None if credentials is None else credentials[device_id],
        )
        for device_id, _ in fleet
    ]
    return list(
        await asyncio.gather(
            *(c.run(batches, interval_s=interval_s) for c, (_, batches) in zip(clients, fleet, strict=True))
        )
    )
