"""The feature stream consumers read: records published from the store's transactional outbox by the
drainer (`drainer.py`), to a sink chosen by URL behind one small protocol (`base.FeatureStream`).

```python
stream = stream_for_url("nats://127.0.0.1:4222?prefix=bandgate", retention_days={"heart": 90})
drainer = Drainer(outbox_thread, stream, metrics)
await drainer.start()
```
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.stream.base import (
    CRASH_BOUND_S,
    DUPLICATE_WINDOW_S,
    FeatureStream,
    Message,
    StreamUnavailable,
    decode_message,
    message_of,
    messages_of,
    records_of,
)

__all__ = [
    "CRASH_BOUND_S",
    "DUPLICATE_WINDOW_S",
    "FeatureStream",
    "Message",
    "StreamUnavailable",
    "check_stream_url",
    "decode_message",
    "message_of",
    "messages_of",
    "records_of",
    "stream_for_url",
]


def check_stream_url(url: str) -> None:
    """ValueError naming what is wrong with a stream URL, before anything starts."""
    if url.partition("://")[0] != "nats":
        raise ValueError(f"stream URL {url!r}: scheme must be nats")
    from gateway.stream.nats import parse_nats_url

    parse_nats_url(url)


def stream_for_url(url: str, retention_days: Mapping[str, float] | None = None) -> FeatureStream:
    """The stream a URL names, not yet started; each family's messages kept `retention_days[family]`
    days (0 or missing: until erased)."""
    check_stream_url(url)
    from gateway.stream.nats import NatsStream

    return NatsStream.from_url(url, retention_days)
