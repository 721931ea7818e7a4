"""A fleet's deployment, end to end: two gateways on one PostgreSQL schema (one CA, one key schema) and
one NATS JetStream, over real mutual TLS, compute in worker processes (their commits write the outbox),
encryption at rest on. Bands move from one gateway to the other mid-stream and back: the stored
features and the messages on the stream both equal the single-gateway run, none lost, none doubled, each
device's messages in order; both drainers drain the one outbox without publishing an entry twice. An
erasure made through one gateway purges the device from the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from bandgate.v1 import privacy_pb2, privacy_pb2_grpc
from gateway.pipeline import ALREADY_EXISTS, OK
from gateway.privacy.sealing import open_sealer
from gateway.server import Gateway, run_server
from gateway.store import open_store
from tests.gateway.gatewaykit import Credentials, Uploader, band, key, processed, tls_config
from tests.privacy.privacykit import hexid
from tests.services import postgres_url, unique_name
from tests.stream.natskit import all_messages, delete_streams, record_of, shared_nats, unique_prefix


@pytest.fixture
def stream_url() -> Iterator[str]:
    base = shared_nats()
    prefix = unique_prefix()
    yield f"{base}?prefix={prefix}"
    asyncio.run(delete_streams(base, prefix))


@pytest.fixture
def pg() -> Iterator[tuple[str, str]]:
    """(store URL, key schema): a schema of the test database and a key schema of its own, dropped after."""
    base = postgres_url()
    schema = unique_name("test")
    keys = f"{schema}_keys"
    yield f"{base}?schema={schema}", keys
    with psycopg.connect(base, autocommit=True) as conn:
        for s in (schema, keys):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s)))


@contextlib.asynccontextmanager
async def two_gateways(tmp_path: Path, store: str, keys: str, stream: str):
    common = dict(
        store=store, key_schema=keys, stream=stream, state_dir=str(tmp_path / "state"), compute_processes=1
    )
    async with (
        run_server(tls_config(tmp_path, **common)) as a,
        run_server(tls_config(tmp_path, **common)) as b,
    ):
        yield a, b, Credentials(tmp_path / "state", a.address)


async def drained(gw: Gateway, timeout: float = 60) -> None:
    """Until the outbox (one for both gateways) is empty: every committed record acked by the stream."""
    assert gw.drainer is not None
    outbox = gw.drainer.outbox
    for _ in range(int(timeout / 0.05)):
        if await outbox.call(outbox.store.outbox_depth) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the outbox did not drain")


def read_store(tmp_path: Path, store: str, keys: str) -> list[dict]:
    sealer = open_sealer(tmp_path / "state", store, key_schema=keys)
    try:
        with open_store(store, sealer) as s:
            return [r for _, r in s.read_since(0, limit=10**6)]
    finally:
        sealer.keys.close()


def read_stream(url: str) -> list[tuple[str, str, dict]]:
    base, _, prefix = url.partition("?prefix=")
    return asyncio.run(all_messages(base, prefix))


def by_key(records: list[dict]) -> list[dict]:
    return sorted(records, key=key)


def test_bands_moving_between_gateways_on_postgresql_stream_everything_once(
    tmp_path: Path, pg: tuple[str, str], stream_url: str
) -> None:
    store, keys = pg
    fleet = [band(seed=s, minutes=30, batch_minutes=5) for s in (51, 52, 53)]
    erased, _ = fleet[0]
    seen: dict[str, object] = {}

    async def scenario() -> None:
        async with two_gateways(tmp_path, store, keys, stream_url) as (a, b, creds):
            codes: list[int] = []
            for device, batches in fleet:
                thirds = [batches[:2], batches[2:4], batches[4:]]
                for gw, part in zip((a, b, a), thirds, strict=True):
                    async with await creds.band_channel(device, gw.address) as ch:
                        up = Uploader(ch, device)
                        codes += [(await up.send(x)).code for x in part]
                        await up.close()
                # a resend of what the other gateway stored: acknowledged, neither stored nor streamed again
                async with await creds.band_channel(device, b.address) as ch:
                    resent = (await Uploader(ch, device).send(batches[0])).code
                    assert resent in (OK, ALREADY_EXISTS), resent
            await drained(a)
            seen["codes"] = codes
            seen["published"] = (a.drainer.published, b.drainer.published)  # type: ignore[union-attr]
            seen["stored"] = await asyncio.to_thread(read_store, tmp_path, store, keys)
            seen["streamed"] = await asyncio.to_thread(read_stream, stream_url)
            async with creds.channel("operator", b.address) as op:  # erased through the other gateway
                request = privacy_pb2.DeviceRequest(device=hexid(erased))
                await privacy_pb2_grpc.PrivacyServiceStub(op).Erase(request)
            await drained(a)
            seen["after"] = await asyncio.to_thread(read_stream, stream_url)

    asyncio.run(asyncio.wait_for(scenario(), 240))
    assert seen["codes"] == [OK] * sum(len(batches) for _, batches in fleet)
    expected = by_key([r for _, batches in fleet for r in processed(batches)])
    stored = by_key(seen["stored"])  # type: ignore[arg-type]
    assert stored == expected  # the single-gateway run: none lost, none doubled
    messages: list[tuple[str, str, dict]] = seen["streamed"]  # type: ignore[assignment]
    ids = [msg_id for _, msg_id, _ in messages]
    assert len(ids) == len(set(ids)), "a record is in the stream twice"
    assert by_key([record_of(body) for *_, body in messages]) == expected
    # each device's messages in the order its records were committed (cursor order), in every family
    cursors: dict[str, list[int]] = {}
    for subject, _, body in messages:
        cursors.setdefault(subject, []).append(body["cursor"])
    assert all(c == sorted(c) for c in cursors.values())
    # the two drainers shared the outbox: each entry was published by one of them, once
    assert sum(seen["published"]) == len(expected), seen["published"]  # type: ignore[arg-type]
    after = by_key([record_of(body) for *_, body in seen["after"]])  # type: ignore[union-attr]
    assert after == [r for r in expected if r["device"] != hexid(erased)]
