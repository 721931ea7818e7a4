"""End to end through the real gateway over mutual TLS, compute in worker processes (which commit, so the
outbox rides in their commits), encryption at rest on: the stream holds exactly the stored records;
consent withdrawal leaves the stream alone; erasure purges the device from every family's stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decoder.records import FAMILIES
from gateway.server import Gateway, run_server
from tests.gateway.gatewaykit import Credentials, Uploader, band, gateway_store, key, tls_config
from tests.privacy.privacykit import OK, Owner, hexid, privacy_gateway, send_all
from tests.stream.natskit import (
    all_messages,
    delete_streams,
    free_port,
    record_of,
    run,
    shared_nats,
    unique_prefix,
)


@pytest.fixture
def url():
    base = shared_nats()
    prefix = unique_prefix()
    yield f"{base}?prefix={prefix}"
    run(delete_streams(base, prefix))


async def drained(gw: Gateway, timeout: float = 30) -> None:
    """Until the gateway's outbox is empty (what was committed is in the stream)."""
    drainer = gw.drainer
    assert drainer is not None
    for _ in range(int(timeout / 0.05)):
        if await drainer.outbox.call(drainer.outbox.store.outbox_depth) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the outbox did not drain")


def stored_records(db: str) -> list[dict]:
    with gateway_store(db) as store:
        return [r for _, r in store.read_since(0, limit=10**6)]


def streamed(url: str) -> list[dict]:
    base, _, prefix = url.partition("?prefix=")
    messages = run(all_messages(base, prefix))
    ids = [m[1] for m in messages]
    assert len(ids) == len(set(ids)), "a record is in the stream twice"
    return sorted((record_of(b) for *_, b in messages), key=key)


def test_the_stream_equals_the_stored_records_and_erasure_purges_it(tmp_path, url) -> None:
    a, a_batches = band(seed=31, minutes=20, batch_minutes=5)
    b, b_batches = band(seed=32, minutes=20, batch_minutes=5)
    db = f"sqlite:///{tmp_path}/gw.db"
    snapshots: dict[str, list[dict]] = {}

    async def scenario() -> None:
        async with privacy_gateway(tmp_path, stream=url) as (gw, creds, _cfg):
            owners = {}
            for device, batches in ((a, a_batches), (b, b_batches)):
                async with await creds.band_channel(device) as ch:
                    owners[device] = Owner(ch, device)
                    assert (await owners[device].profile(birth_year=1980, country="DE")).code == OK
                    assert (await owners[device].consent(grant=FAMILIES)).code == OK
                    up = Uploader(ch, device)
                    acks = await send_all(up, batches)
                    await up.close()
                    assert all(ack.code == 0 for ack in acks)
            await drained(gw)
            snapshots["stored"] = await asyncio.to_thread(stored_records, db)
            snapshots["streamed"] = await asyncio.to_thread(streamed, url)
            async with await creds.band_channel(b) as ch:  # withdrawal: no new processing, no purge
                assert (await Owner(ch, b).consent(withdraw=["heart", "steps"])).code == OK
            async with await creds.band_channel(a) as ch:
                assert (await Owner(ch, a).erase()).code == OK
            await drained(gw)
            snapshots["after"] = await asyncio.to_thread(streamed, url)
            snapshots["stored_after"] = await asyncio.to_thread(stored_records, db)

    run(scenario())
    stored = sorted(snapshots["stored"], key=key)
    assert {r["device"] for r in stored} == {hexid(a), hexid(b)}
    assert {r["family"] for r in stored} >= {"steps", "heart", "activity"}
    assert snapshots["streamed"] == stored
    b_only = [r for r in stored if r["device"] == hexid(b)]
    assert snapshots["after"] == b_only  # a's messages purged, b's kept (heart and steps included)
    assert sorted(snapshots["stored_after"], key=key) == b_only


def test_an_unreachable_stream_holds_up_no_ack_and_the_backlog_shows(tmp_path) -> None:
    """NATS down from the start: every batch is acked (its records and outbox rows are stored), health
    stays SERVING, and the metrics show the backlog waiting in the outbox and the failed rounds."""
    device, batches = band(seed=33, minutes=20, batch_minutes=5)
    cfg = tls_config(tmp_path, stream=f"nats://127.0.0.1:{free_port()}?prefix=down")

    async def scenario() -> tuple[list, int, float, int]:
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            async with await creds.band_channel(device) as ch:
                up = Uploader(ch, device)
                acks = await send_all(up, batches)
                await up.close()
            async with grpc.aio.insecure_channel(gw.health_address) as ch:
                health = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())).status
            await asyncio.sleep(0.6)  # a drainer round or two, failing
            gw.drainer.wake()
            for _ in range(200):  # until the gauges show it (a loaded box's drainer rounds come late)
                depth = gw.metrics.registry.get_sample_value("bandgate_stream_outbox_depth")
                errors = gw.metrics.registry.get_sample_value(
                    "bandgate_stream_errors_total", {"reason": "stream"}
                )
                if depth and errors:
                    break
                await asyncio.sleep(0.05)
            return acks, health, errors or 0, int(depth or 0)

    acks, health, errors, depth = run(scenario())
    assert acks and all(ack.code == 0 for ack in acks)
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert errors > 0
    stored = stored_records(f"sqlite:///{tmp_path}/gw.db")
    assert depth == len(stored) > 0  # all of it waits, on disk
