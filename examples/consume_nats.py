"""Read one feature family from bandgate's NATS JetStream stream with a plain NATS client.

    python examples/consume_nats.py nats://steps_reader:PASSWORD@127.0.0.1:4222 steps \\
        --prefix bandgate --inbox _INBOX_steps [--follow]

One JSON line per record, as the gateway stored it (docs/streams.md has the message layout: a message
holds a batch's records of the family, for one device). The user
needs only the permissions `gateway.stream.nats.reader_permissions` lists: its family's stream, and its
own inbox prefix (`--inbox`), which the server config gives that user alone. Nothing here depends on
bandgate: a consumer in any language does the same with its NATS client and msgpack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator

import msgpack
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

LAYOUTS = (1, 2)  # docs/streams.md: refuse a layout this reader does not know (1: a record a message)


async def consume(
    url: str,
    family: str,
    *,
    prefix: str = "bandgate",
    inbox: str = "_INBOX",
    follow: bool = False,
    batch: int = 256,
    idle_s: float = 1.0,
    timeout_s: float = 2.0,
) -> AsyncIterator[dict]:
    """Every record of `family` in the stream, oldest first (an ephemeral consumer of our own: nothing is
    left on the server); then, with `follow`, new ones as they arrive. Each record dict carries its
    message's `msg_id` (device/family/start_us of its first record/ownership) and its `index` in it: a
    reader that restarts dedups by the pair."""
    nc = await nats.connect(url, inbox_prefix=inbox, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=timeout_s)
        sub = await js.pull_subscribe(
            f"{prefix}.{family}.*",
            stream=f"{prefix.upper()}_{family.upper()}",
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=idle_s)
            except TimeoutError:  # nats.errors.TimeoutError, or asyncio's from inside fetch: no more now
                if follow:
                    continue
                return
            for msg in msgs:
                body = msgpack.unpackb(msg.data)
                if body.get("v") not in LAYOUTS:
                    raise ValueError(f"message layout {body.get('v')!r} is newer than this reader")
                msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
                records = body["records"] if body["v"] == 2 else [body]
                for index, r in enumerate(records):
                    yield {
                        "device": body["device"],
                        "family": body["family"],
                        "cursor": r["cursor"],
                        "start_us": r["start_us"],
                        "duration_s": r["duration_s"],
                        "algo": r["algo"],
                        "values": r["values"],
                        "msg_id": msg_id,
                        "index": index,
                    }
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="nats://user:password@host:port of a user allowed this family")
    p.add_argument("family", help="steps, activity, wear, distance, heart, day, sleep or night")
    p.add_argument("--prefix", default="bandgate", help="the gateway's stream prefix (its --stream ?prefix=)")
    p.add_argument("--inbox", default="_INBOX", help="this user's own inbox prefix")
    p.add_argument("--follow", action="store_true", help="keep reading new records")
    args = p.parse_args(argv)

    async def run() -> None:
        async for record in consume(
            args.url, args.family, prefix=args.prefix, inbox=args.inbox, follow=args.follow
        ):
            sys.stdout.write(json.dumps(record) + "\n")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
