"""`MemoryStream`: a `FeatureStream` in memory, shipped as a test double (as httpx ships MockTransport), so
the drainer and anything that feeds it can be tested without a NATS server. It deduplicates by message ID
for ever (a window longer than any test) and can be made to fail."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.stream.base import Message, StreamUnavailable, records_of


class MemoryStream:
    """Messages by family, in publish order, each message ID once. `down = True` makes `publish` and
    `purge` raise `StreamUnavailable`, as an unreachable server would."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.publishes = 0  # publish calls that reached the stream (duplicates included)
        self.down = False
        self._ids: set[str] = set()

    async def start(self) -> None:
        return None

    async def publish(self, messages: Sequence[Message]) -> list[bool]:
        if self.down:
            raise StreamUnavailable("the memory stream is down")
        for m in messages:
            self.publishes += 1
            if m.msg_id not in self._ids:
                self._ids.add(m.msg_id)
                self.messages.append(m)
        return [True] * len(messages)

    @property
    def records(self) -> list[dict]:
        """The records of the messages kept, in publish order."""
        return [r for m in self.messages for r in records_of(m.payload)]

    async def purge(self, device: str) -> None:
        if self.down:
            raise StreamUnavailable("the memory stream is down")
        self.messages = [m for m in self.messages if m.device != device]

    async def close(self) -> None:
        return None


__all__ = ["MemoryStream"]
