"""A drainer that dies on purpose, run as a process of its own so the crash is real (os._exit: no
cleanup, no finally): `python -m tests.stream.crash_drainer DB STATE_DIR NATS_URL WHEN`.

WHEN is `before_ack` (the page is sent to NATS and flushed, then the process dies before reading a
single ack) or `before_delete` (every message acked, then it dies before `outbox_done`)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from gateway.pipeline import StoreThread
from gateway.privacy.sealing import open_sealer
from gateway.store import SqliteStore
from gateway.stream.base import MSG_ID_HEADER
from gateway.stream.drainer import Drainer
from gateway.stream.nats import NatsStream, subject

CRASHED = 137


class CrashingStream(NatsStream):
    when = ""

    async def publish(self, messages):  # type: ignore[no-untyped-def]
        if self.when == "before_delete":
            acked = await super().publish(messages)
            assert all(acked), acked
            os._exit(CRASHED)
        nc = await self._connection()
        for m in messages:  # plain publishes with a reply inbox nobody reads: the acks never arrive
            await nc.publish(
                subject(self.prefix, m.family, m.device),
                m.payload,
                reply=nc.new_inbox(),
                headers={MSG_ID_HEADER: m.msg_id},
            )
        await nc.flush()
        os._exit(CRASHED)


async def main(db: str, state: str, url: str, when: str) -> int:
    sealer = open_sealer(Path(state))
    outbox = StoreThread(SqliteStore(db, sealer=sealer, outbox=True), "outbox")
    outbox.start()
    stream = CrashingStream.from_url(url)
    stream.when = when
    await stream.start()
    await Drainer(outbox, stream).flush()
    return 1  # not reached: the drainer dies in its first publish


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:5])))
