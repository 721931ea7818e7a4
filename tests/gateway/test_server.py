"""The gateway against the real server on loopback and the real SQLite store (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from dataclasses import replace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from bandgate.v1 import batch_pb2, features_pb2, features_pb2_grpc, ingest_pb2
from decoder.features import device_key
from gateway.auth import DEVICE_METADATA, STREAM_ACCEPTED, is_loopback
from gateway.envelope import build_batch
from gateway.logs import JsonFormatter
from gateway.metrics import Metrics
from gateway.pipeline import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    OK,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    StoreWriter,
)
from gateway.privacy.consent import ConsentGate, Processing
from gateway.server import run_server
from gateway.simulator.recorder import fleet_batches, recording_frames
from gateway.store import SequenceError, SqliteStore, StoreUnavailable, open_store
from gateway.store.base import CommitItem
from tests.gateway.gatewaykit import (
    Credentials,
    Uploader,
    assert_no_leak,
    band,
    config,
    encode,
    envelope,
    frames_of,
    key,
    processed,
    same_records,
    stored,
    tls_config,
)


def run(coro):
    # a hang's bound, not a speed check (a slow box, a cold cache)
    return asyncio.run(asyncio.wait_for(coro, 120))


def high_water(url: str, device_id: int) -> int | None:
    with open_store(url) as store:
        row = store.device(device_id)
    return None if row is None else row.last_seq


def test_batch_stored_and_acked(tmp_path):
    cfg = config(tmp_path)
    device, batches = band()

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, device)
            acks = [await up.send(b) for b in batches[:3]]
            assert await up.close() == grpc.StatusCode.OK
            return acks

    acks = run(scenario())
    assert [a.code for a in acks] == [OK] * 3
    assert [(a.has_acked_seq, a.acked_seq) for a in acks] == [(True, b.last_seq) for b in batches[:3]]
    assert stored(cfg.store) == processed(batches[:3])
    assert len(stored(cfg.store)) > 0
    assert high_water(cfg.store, device) == batches[2].last_seq


def test_band_reboot_starts_a_new_sequence_and_loses_nothing(tmp_path):
    """The band restarts half-way (new boot ID, sequence numbers from 0 again, time going on): the stored
    records equal those of the same samples sent without a reboot."""
    cfg = config(tmp_path)
    ((rec, uninterrupted),) = fleet_batches(bands=1, minutes=20, seed=21, batch_minutes=2)
    frames = recording_frames(rec)
    after = [replace(f, boot_id=2, seq=i) for i, f in enumerate(frames[10:])]
    rebooted = [build_batch(frames[i : i + 2]) for i in range(0, 10, 2)]
    rebooted += [build_batch(after[i : i + 2]) for i in range(0, len(after), 2)]

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            acks = []
            for part in (rebooted[:5], rebooted[5:]):  # one stream before the reboot, one after
                up = Uploader(ch, rec.device_id)
                acks += [await up.send(b) for b in part]
                await up.close()
            return acks

    acks = run(scenario())
    assert [a.code for a in acks] == [OK] * len(rebooted)
    assert [(a.boot_id, a.acked_seq) for a in acks[4:6]] == [(1, 9), (2, 1)]
    assert same_records(stored(cfg.store), processed(uninterrupted))


def test_duplicate_acked_already_exists_not_decompressed_not_stored_twice(tmp_path):
    cfg = config(tmp_path)
    device, batches = band()

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, device)
            first = [await up.send(b) for b in batches[:2]]
            bytes_out = gw.metrics.bytes_out._value.get()
            again = [await up.send(b) for b in batches[:2]]
            assert gw.metrics.bytes_out._value.get() == bytes_out  # duplicates are never decompressed
            return first, again

    first, again = run(scenario())
    assert [a.code for a in first] == [OK, OK]
    assert [a.code for a in again] == [ALREADY_EXISTS, ALREADY_EXISTS]
    assert all(a.has_acked_seq and a.acked_seq == batches[1].last_seq for a in again)
    assert stored(cfg.store) == processed(batches[:2])


def test_gap_refused_naming_expected_seq_then_accepted_with_dropped_flag(tmp_path):
    cfg = config(tmp_path)
    device, batches = band()
    flagged = batch_pb2.Batch()
    flagged.CopyFrom(batches[2])
    flagged.flags = batch_pb2.BATCH_FLAG_DATA_DROPPED_BEFORE

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, device)
            return [await up.send(b) for b in (batches[0], batches[2], flagged)]

    ok, gap, accepted = run(scenario())
    expected = batches[0].last_seq + 1
    assert ok.code == OK
    assert gap.code == FAILED_PRECONDITION and gap.expected_seq == expected
    assert f"expected sequence {expected}" in gap.reason
    assert accepted.code == OK and accepted.acked_seq == batches[2].last_seq
    assert high_water(cfg.store, device) == batches[2].last_seq


def test_corrupt_frame_listed_in_ack_and_the_others_stored(tmp_path):
    cfg = tls_config(tmp_path)  # over mutual TLS, as a band sends
    device = 0x0123456789ABCDEF
    frames = frames_of(device, 6)
    encoded = encode(frames)
    bad = bytearray(encoded[2])
    bad[len(bad) // 2] ^= 0x55  # inside the samples: the CRC no longer matches
    encoded[2] = bytes(bad)

    async def scenario():
        async with (
            run_server(cfg) as gw,
            await Credentials(cfg.state_dir, gw.address).band_channel(device) as ch,
        ):
            return await Uploader(ch, device).send(envelope(encoded, frames[0]))

    ack = run(scenario())
    assert ack.code == OK and ack.acked_seq == 5
    assert [(e.index, e.seq) for e in ack.frame_errors] == [(2, 2)]
    assert "integrity" in ack.frame_errors[0].reason
    records = stored(cfg.store)
    minutes = sorted(r["start_us"] for r in records)
    assert len(minutes) >= 3 and frames[2].start_us not in minutes  # the other frames' minutes are stored
    assert same_records(records, processed([envelope(encoded, frames[0])]))  # exactly what replay makes of it


def test_bad_zstd_is_invalid_argument_and_the_stream_goes_on(tmp_path):
    cfg = config(tmp_path)
    device, batches = band()
    broken = batch_pb2.Batch()
    broken.CopyFrom(batches[0])
    broken.payload = batches[0].payload[:-100]  # a zstd frame that ends early

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, device)
            return [await up.send(b) for b in (broken, batches[0])]

    bad, good = run(scenario())
    assert bad.code == INVALID_ARGUMENT and bad.reason.startswith("bad_compression") and not bad.has_acked_seq
    assert good.code == OK


def test_device_mismatch_refused(tmp_path):
    """A frame naming another device inside a batch is that frame's error; a batch whose envelope names
    another device ends the stream with PERMISSION_DENIED, nothing of it stored."""
    cfg = config(tmp_path)
    device, _ = band()
    other = 0xFEDCBA9876543210
    mixed = frames_of(device, 3)
    intruder = frames_of(other, 3)[1]
    intruder = type(intruder)(**{**intruder.__dict__, "seq": 1})

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, device)
            wrong_frame = await up.send(envelope(encode([mixed[0], intruder, mixed[2]]), mixed[0]))
            await up.call.write(envelope(encode(frames_of(other, 2)), frames_of(other, 1)[0]))
            return wrong_frame, await up.call.code(), await up.call.details()

    wrong_frame, code, details = run(scenario())
    assert code == grpc.StatusCode.PERMISSION_DENIED and f"batch names device {other:016x}" in details
    assert wrong_frame.code == OK and [e.index for e in wrong_frame.frame_errors] == [1]
    assert "contradicts the envelope" in wrong_frame.frame_errors[0].reason
    assert high_water(cfg.store, other) is None
    assert all(r["device"] == f"{device:016x}" for r in stored(cfg.store))


def test_unauthenticated_stream_refused(tmp_path):
    cfg = config(tmp_path)

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            from bandgate.v1 import ingest_pb2_grpc

            call = ingest_pb2_grpc.IngestServiceStub(ch).Upload(metadata=((DEVICE_METADATA, "not-hex"),))
            await call.done_writing()
            return await call.code(), await call.details()

    code, details = run(scenario())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "16 hex digits" in details
    assert is_loopback("ipv4:127.0.0.1:5") and is_loopback("ipv6:[::1]:5")
    assert not is_loopback("ipv4:10.1.2.3:5") and not is_loopback("ipv6:[2001:db8::1]:5")


def test_a_stream_says_it_is_accepted_before_its_first_batch_and_a_refused_one_does_not(tmp_path):
    """The headers come as soon as the gateway has taken the stream up, with nothing sent yet: a band
    (and the load generator) tells a stream grpc core dropped unaccepted from one the gateway ended."""
    cfg = config(tmp_path)
    device, batches = band()

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            from bandgate.v1 import ingest_pb2_grpc

            accepted = Uploader(ch, device)
            headers = tuple(await accepted.call.initial_metadata())
            first = await accepted.send(batches[0])
            refused = ingest_pb2_grpc.IngestServiceStub(ch).Upload(metadata=((DEVICE_METADATA, "not-hex"),))
            refused_headers = tuple(await refused.initial_metadata())
            return headers, first.code, refused_headers, await refused.code()

    headers, first, refused_headers, refused = run(scenario())
    assert STREAM_ACCEPTED[0] in headers and first == OK
    assert STREAM_ACCEPTED[0] not in refused_headers and refused == grpc.StatusCode.UNAUTHENTICATED


def test_second_stream_supersedes_the_first_with_aborted(tmp_path):
    cfg = config(tmp_path)
    device, batches = band()

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            first = Uploader(ch, device)
            a0 = await first.send(batches[0])
            second = Uploader(ch, device)
            a1 = await second.send(batches[1])
            code, details = await first.call.code(), await first.call.details()
            a2 = await second.send(batches[2])
            return a0, a1, a2, code, details

    a0, a1, a2, code, details = run(scenario())
    assert (a0.code, a1.code, a2.code) == (OK, OK, OK)
    assert code == grpc.StatusCode.ABORTED and "superseded" in details


@pytest.mark.parametrize(
    ("limit", "changes", "batch_index", "code", "named"),
    [
        ("frames", {"max_frames_per_batch": 4}, 0, RESOURCE_EXHAUSTED, "max_frames_per_batch = 4"),
        (
            "bytes",
            {"max_decompressed_bytes": 10_000},
            0,
            RESOURCE_EXHAUSTED,
            "max_decompressed_bytes = 10000",
        ),
        (
            "rate",
            {"rate_batches_per_s": 0.01, "rate_burst_batches": 1},  # no refill in a slow box's run
            1,
            RESOURCE_EXHAUSTED,
            "rate_batches_per_s",
        ),
        (
            "samples",
            {"rate_samples_per_s": 10, "rate_burst_samples": 1000},
            1,
            RESOURCE_EXHAUSTED,
            "rate_samples",
        ),
    ],
)
def test_each_limit_names_itself_while_another_device_carries_on(
    tmp_path, limit, changes, batch_index, code, named
):
    cfg = config(tmp_path, **changes)
    device, batches = band()
    other, others = band(seed=8)
    bigger = changes.get("max_frames_per_batch") or changes.get("max_decompressed_bytes")

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up, up2 = Uploader(ch, device), Uploader(ch, other)
            acks = [await up.send(b) for b in batches[: batch_index + 1]]
            # the other device is not held back (its own buckets; its small batches fit the size limits)
            small = envelope(encode(frames_of(other, 1)), frames_of(other, 1)[0]) if bigger else others[0]
            other_ack = await up2.send(small)
            return acks[-1], other_ack

    limited, other_ack = run(scenario())
    assert limited.code == code and named in limited.reason, limited
    if limit in ("rate", "samples"):
        assert limited.retry_after_ms > 0
    assert other_ack.code == OK, other_ack


def test_message_size_limit_ends_only_that_stream(tmp_path):
    cfg = config(tmp_path, max_message_bytes=5_000)
    device, batches = band()
    other = 0x1111111111111111

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up, up2 = Uploader(ch, device), Uploader(ch, other)
            with pytest.raises(grpc.aio.AioRpcError) as too_big:
                await up.send(batches[0])
            return too_big.value, await up2.send(
                envelope(encode(frames_of(other, 1)), frames_of(other, 1)[0])
            )

    too_big, other_ack = run(scenario())
    assert len(band()[1][0].SerializeToString()) > 5_000
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert other_ack.code == OK


@pytest.mark.parametrize(
    "mode, limit",
    [
        # compute worker processes commit what they computed: the batch holds its compute_queue place
        ({"compute_queue": 1}, "compute_queue = 1"),
        # compute threads hand their items to the writer thread and its commit_queue
        ({"compute_processes": 0, "commit_queue": 1}, "commit_queue = 1"),
    ],
    ids=["processes", "threads"],
)
def test_store_locked_unavailable_not_acked_and_full_queue_overloaded(tmp_path, mode, limit):
    """A lock held by another process: the first batch's commit waits, then UNAVAILABLE (nothing stored,
    no acked_seq); meanwhile the queue it holds a place in (1) is full and another device gets
    RESOURCE_EXHAUSTED naming that limit."""
    cfg = config(tmp_path, overload_wait_ms=100, retry_after_ms=321, **mode)
    cfg = cfg.replace(store=cfg.store + "?busy_timeout_ms=3000")
    device, batches = band()
    other, others = band(seed=8)

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            lock = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            up, up2 = Uploader(ch, device), Uploader(ch, other)
            first = asyncio.ensure_future(up.send(batches[0]))
            gauge = f"bandgate_{limit.partition(' ')[0]}_depth"  # the queue whose one place it takes
            for _ in range(100):  # until it holds that place (a fixed sleep was a slow box's race)
                if (gw.metrics.registry.get_sample_value(gauge) or 0) >= 1:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the first batch never entered {gauge}")
            overloaded = await up2.send(others[0])
            unavailable = await first
            lock.execute("ROLLBACK")
            lock.close()
            retried = await up.send(batches[0])
            return overloaded, unavailable, retried

    overloaded, unavailable, retried = run(scenario())
    assert overloaded.code == RESOURCE_EXHAUSTED and limit in overloaded.reason
    assert overloaded.retry_after_ms == 321
    assert unavailable.code == UNAVAILABLE and not unavailable.has_acked_seq
    assert retried.code == OK
    assert stored(cfg.store.partition("?")[0]) == processed(batches[:1])


def test_health_is_not_serving_while_the_store_cannot_store_and_serving_once_it_can(tmp_path):
    """A store that refuses for want of itself turns health NOT_SERVING (a balancer moves bands away),
    with the store_available metric at 0; once the lock is gone a probe turns it SERVING again and the
    band's resend is stored."""
    cfg = config(tmp_path, compute_processes=0)
    cfg = cfg.replace(store=cfg.store + "?busy_timeout_ms=300")
    device, batches = band()

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)

            async def status() -> int:
                return (await health.Check(health_pb2.HealthCheckRequest(service=""))).status

            before = await status()
            lock = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            up = Uploader(ch, device)
            unavailable = await up.send(batches[0])
            await asyncio.sleep(0.05)
            during = await status()
            gauge_during = gw.metrics.store_available._value.get()
            await asyncio.sleep(1.5)  # probes keep failing while the lock is held
            still = await status()
            lock.execute("ROLLBACK")
            lock.close()
            for _ in range(60):
                if await status() == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.1)
            after = await status()
            retried = await up.send(batches[0])
            return before, unavailable, during, gauge_during, still, after, retried, gw.metrics

    before, unavailable, during, gauge_during, still, after, retried, metrics = run(scenario())
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert before == SERVING
    assert unavailable.code == UNAVAILABLE and not unavailable.has_acked_seq
    assert during == still == NOT_SERVING and gauge_during == 0
    assert after == SERVING and metrics.store_available._value.get() == 1
    assert retried.code == OK
    assert stored(cfg.store.partition("?")[0]) == processed(batches[:1])


def test_subscribe_live_then_resume_from_cursor_without_gaps_or_repeats(tmp_path):
    cfg = config(tmp_path)
    fleet = [band(), band(seed=8)]

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            stub = features_pb2_grpc.FeatureServiceStub(ch)
            live: list[features_pb2.FeatureRecord] = []
            sub = stub.Subscribe(features_pb2.SubscribeRequest())

            async def follow():
                async for rec in sub:
                    live.append(rec)

            follower = asyncio.ensure_future(follow())
            await asyncio.sleep(0.2)  # subscribed and caught up (nothing stored yet)
            for device, batches in fleet:
                up = Uploader(ch, device)
                for b in batches[:4]:
                    assert (await up.send(b)).code == OK
            total = len(stored(cfg.store))
            for _ in range(100):
                if len(live) >= total:
                    break
                await asyncio.sleep(0.05)
            sub.cancel()
            follower.cancel()
            middle = live[len(live) // 2].cursor
            resumed = [
                r
                async for r in stub.Subscribe(
                    features_pb2.SubscribeRequest(from_cursor=middle, no_follow=True)
                )
            ]
            one = f"{fleet[1][0]:016x}"
            filtered = [
                r
                async for r in stub.Subscribe(
                    features_pb2.SubscribeRequest(device=one, families=["steps"], no_follow=True)
                )
            ]
            return live, resumed, filtered, middle

    live, resumed, filtered, middle = run(scenario())
    everything = stored(cfg.store)
    cursors = [r.cursor for r in live]
    assert len(live) == len(everything) > 0 and cursors == sorted(set(cursors))
    assert [r.cursor for r in resumed] == [c for c in cursors if c > middle]
    assert [(r.device, r.family, r.start_us) for r in live] == [key(r) for r in everything]
    assert {r.device for r in filtered} == {f"{fleet[1][0]:016x}"}
    assert {r.family for r in filtered} == {"steps"}
    assert len(filtered) == len(
        [r for r in everything if r["device"] == f"{fleet[1][0]:016x}" and r["family"] == "steps"]
    )
    steps = next(r for r in live if r.family == "steps")
    assert steps.values["steps"].WhichOneof("kind") == "number"
    assert steps.values["walk_s"].WhichOneof("kind") == "integer"  # counts stay integers end to end


def test_health_serving_and_reflection(tmp_path):
    cfg = config(tmp_path)

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            overall = await stub.Check(health_pb2.HealthCheckRequest())
            ingest = await stub.Check(health_pb2.HealthCheckRequest(service="bandgate.v1.IngestService"))
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            services = [s.name async for r in call for s in r.list_services_response.service]
            return overall.status, ingest.status, services

    overall, ingest, services = run(scenario())
    assert overall == ingest == health_pb2.HealthCheckResponse.SERVING
    assert "bandgate.v1.IngestService" in services and "bandgate.v1.FeatureService" in services


def test_no_sample_values_in_any_sink(tmp_path, capfd):
    """A sentinel accelerometer pattern goes through good, corrupt and undecodable batches over mutual TLS:
    neither the logs (the compute workers' stderr included), acks, metrics, store files, stored records,
    the feature stream nor the audit log may contain it."""
    cfg = tls_config(tmp_path)
    device = 0x00000000CAFEF00D
    sentinel = -1717  # a distinctive 12-bit count
    accel = np.full((3000, 3), sentinel, np.int16)
    accel[::2] = 1717
    frames = frames_of(device, 4, accel=accel)
    encoded = encode(frames)
    corrupt = bytearray(encoded[1])
    corrupt[len(corrupt) // 2] ^= 0x01
    encoded[1] = bytes(corrupt)
    good = envelope(encoded, frames[0])
    undecodable = envelope(encoded, frames[0], payload=good.payload[:-40])  # zstd ends early
    lying = envelope(encoded, frames[0], frame_count=3, last_seq=2)

    captured: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: captured.append(JsonFormatter().format(record))  # type: ignore[method-assign]
    logger = logging.getLogger("bandgate")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)

    async def scenario():
        async with run_server(cfg) as gw:
            credentials = Credentials(cfg.state_dir, gw.address)
            async with await credentials.band_channel(device) as ch:
                up = Uploader(ch, device)
                acks = [await up.send(b) for b in (undecodable, lying, good, good)]
            async with credentials.channel("consumer") as ch:
                stub = features_pb2_grpc.FeatureServiceStub(ch)
                stream = [r async for r in stub.Subscribe(features_pb2.SubscribeRequest(no_follow=True))]
            return acks, stream, generate_latest(gw.metrics.registry).decode()

    try:
        acks, stream, metrics_text = run(scenario())
    finally:
        logger.removeHandler(handler)
    assert [a.code for a in acks] == [INVALID_ARGUMENT, INVALID_ARGUMENT, OK, ALREADY_EXISTS]
    assert len(captured) >= 4 and stream and "bandgate_samples" in metrics_text
    # Every sink: the store's files (database and WAL) never hold the raw pattern...
    raw = np.array([sentinel, 1717, sentinel, 1717], "<i2").tobytes()
    for path in [*tmp_path.glob("gw.db*"), *(tmp_path / "state").iterdir()]:
        assert raw not in path.read_bytes(), path.name
    # ...and no log line, ack, metric, stored record or streamed record shows the values.
    text = "\n".join(captured) + "\n".join(str(a) for a in acks) + metrics_text
    text += "\n".join(str(r) for r in stream) + "\n".join(map(str, stored(cfg.store)))
    with open_store(cfg.store) as store:
        text += "\n".join(row.entry for row in store.audit_rows(0, limit=10**6))
    text += "".join(capfd.readouterr())  # what any process wrote to stdout or stderr
    # a leaked sample: the number ±1717 standing alone, its int16 hex, or the raw pattern's bytes
    assert_no_leak(
        text,
        raw,
        (r"(?<![\w.])-?1717(?!\w)", rf"(?<![0-9a-fA-F]){np.int16(sentinel).tobytes().hex()}(?![0-9a-fA-F])"),
    )


def test_metrics_endpoint_counts_batches_and_devices(tmp_path):
    import urllib.request

    cfg = config(tmp_path, metrics_listen="127.0.0.1:0")
    device, batches = band()

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, device)
            await up.send(batches[0])
            await up.send(batches[0])
            url = f"http://127.0.0.1:{gw.metrics.bound_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

    text = run(scenario())
    assert 'bandgate_batches_total{code="OK"} 1.0' in text
    assert 'bandgate_batches_total{code="ALREADY_EXISTS"} 1.0' in text
    assert "bandgate_devices_connected 1.0" in text
    assert "bandgate_ack_latency_seconds_count 2.0" in text
    assert "bandgate_samples_total 15000.0" in text


def _differing_entries(got: dict, want: dict, but: str) -> list[tuple[str, str]]:
    """(family, entry) of two states' families, `but` one, whose bytes differ (NaN-safe, dtype-exact)."""
    return [
        (name, k)
        for name in got.keys() - {but}
        for k in got[name].keys() | want[name].keys()
        if k not in got[name]
        or k not in want[name]
        or np.asarray(got[name][k]).tobytes() != np.asarray(want[name][k]).tobytes()
    ]


@pytest.mark.parametrize("family", ["heart", "steps"])
def test_a_stored_state_that_does_not_load_starts_the_stream_afresh_and_says_so(tmp_path, family):
    """A device's stored feature state damaged in the store (heart's open day, far back: it hung the
    kernel before states were checked where they load; steps' rate of 0 divided by zero) would refuse
    every later batch of the device for ever. The gateway starts the device's stream afresh, as after a
    gap: the batch is stored and acked, the log and a metric say so, and the next batch goes on from the
    new state. Steps' state is read by nothing else, so only it restarts: the epochs, the day and the
    sleep period go on."""
    from decoder import heart, steps
    from decoder.features import DeviceState
    from gateway.store.base import UNOWNED
    from tests.gateway.gatewaykit import gateway_store

    cfg = config(tmp_path)
    device, batches = band()
    captured: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: captured.append(JsonFormatter().format(record))  # type: ignore[method-assign]
    logger = logging.getLogger("bandgate")
    logger.addHandler(handler)

    def damage_the_stored_state() -> None:
        path, name = cfg.store.removeprefix("sqlite:///"), device_key(device)
        with gateway_store(cfg.store) as store, contextlib.closing(sqlite3.connect(path)) as db, db:
            state = DeviceState.from_bytes(store.device(device).state)
            if family == "heart":
                state.families["heart"]["ints"][heart._DAY] = -(10**15)
            else:
                state.families["steps"]["values"][steps._FS] = 0.0
            (ownership,) = db.execute("SELECT ownership FROM devices WHERE device = ?", (name,)).fetchone()
            sealed = store.sealer.seal_state(name, ownership or UNOWNED, state.to_bytes())
            db.execute("UPDATE devices SET state = ? WHERE device = ?", (sealed, name))
        with gateway_store(cfg.store) as store, pytest.raises(ValueError):
            DeviceState.from_bytes(store.device(device).state)  # what the worker will meet

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, device)
            acks = [await up.send(batches[0])]
            await asyncio.to_thread(damage_the_stored_state)
            acks += [await up.send(b) for b in batches[1:3]]
            await up.close()
            return acks, generate_latest(gw.metrics.registry).decode()

    try:
        acks, metrics_text = run(scenario())
    finally:
        logger.removeHandler(handler)
    assert [a.code for a in acks] == [OK] * 3
    assert "bandgate_state_resets_total 1.0" in metrics_text
    resets = [line for line in captured if '"state_reset"' in line]
    assert len(resets) == 1 and device_key(device) in resets[0]
    reason = {"heart": "heart state is corrupt", "steps": "step state is corrupt"}[family]
    assert reason in resets[0] and ("the other families go on" in resets[0]) == (family == "steps")
    # what a new stream from batch 1 on makes (as after a gap), beside batch 0's: every family's, or
    # only steps' while the others' stream goes on
    before, anew = processed(batches[:1]), processed(batches[1:3])
    if family == "steps":
        restarted = {"steps", "distance"}  # distance is made from the steps records
        on = [r for r in processed(batches[:3]) if r["family"] not in restarted]
        assert {"activity", "heart"} <= {r["family"] for r in on}
        # the other families' states are the uninterrupted stream's (the sleep period too)
        from gateway.compute import compute

        state = None
        for b in batches[:3]:
            state = compute(b, state, cfg.max_decompressed_bytes).state
        want = DeviceState.from_bytes(state).families
        with gateway_store(cfg.store) as store:
            got = DeviceState.from_bytes(store.device(device).state).families
        assert got.keys() == want.keys() and "sleep" in got
        assert _differing_entries(got, want, but="steps") == []
        assert got["steps"]["values"].tolist() != want["steps"]["values"].tolist()
        before = on + [r for r in before if r["family"] in restarted]
        anew = [r for r in anew if r["family"] in restarted]
    assert same_records(stored(cfg.store), before + anew)


def test_a_state_reset_keeps_the_other_families_only_when_steps_alone_is_at_fault():
    """Steps restarts alone only where the state loads without it: steps and heart both damaged restart
    every family (the state is a new stream's) and say nothing of the others going on; a steps entry of
    another dtype restarts steps alone (the other families' states go on as if nothing happened), and
    the reason names steps."""
    from decoder import heart, steps
    from decoder.features import DeviceState
    from gateway.compute import compute

    _, batches = band()
    limit = 1 << 24
    good = compute(batches[0], None, limit).state
    fresh = compute(batches[1], None, limit).state  # a new stream from batch 1
    going_on = compute(batches[1], good, limit)

    def damaged(damage) -> bytes:
        state = DeviceState.from_bytes(good)
        damage(state.families)
        return state.to_bytes()

    def steps_and_heart(families: dict) -> None:
        families["steps"]["values"][steps._FS] = 0.0
        families["heart"]["ints"][heart._DAY] = -(10**15)

    def steps_of_another_dtype(families: dict) -> None:
        families["steps"] = {"values": np.zeros(3, np.int16)}  # another dtype: refused

    assert going_on.state_reset == "" and going_on.state != fresh
    everything = compute(batches[1], damaged(steps_and_heart), limit)
    assert "is corrupt" in everything.state_reset and "go on" not in everything.state_reset
    assert everything.state == fresh
    alone = compute(batches[1], damaged(steps_of_another_dtype), limit)
    assert alone.state_reset.endswith("(steps restarts; the other families go on)")
    kept, want = DeviceState.from_bytes(alone.state).families, DeviceState.from_bytes(going_on.state).families
    assert kept.keys() == want.keys()
    assert kept["steps"]["values"].tobytes() != want["steps"]["values"].tobytes()
    assert _differing_entries(kept, want, but="steps") == []


def test_retention_purges_expired_records(tmp_path):
    """Simulated data starts in January 2026; a 30-day retention purges it, a long one keeps it."""
    device, batches = band()
    for days, expect_empty in ((30.0, True), (36500.0, False)):
        cfg = config(tmp_path / f"r{int(days)}", retention_days=days, retention_check_s=0.1)
        (tmp_path / f"r{int(days)}").mkdir()

        async def scenario(cfg=cfg):
            async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
                sweep, rounds = gw.sweeper.sweep, []

                async def counted() -> dict[str, int]:  # the background rounds, counted when done
                    removed = await sweep()
                    rounds.append(removed)
                    return removed

                gw.sweeper.sweep = counted
                up = Uploader(ch, device)
                ack = await up.send(batches[0])
                await up.close()
                after = len(rounds)
                for _ in range(300):  # two whole rounds after the ack (a fixed sleep was short on a slow box)
                    if len(rounds) >= after + 2:
                        break
                    await asyncio.sleep(0.1)
                assert len(rounds) >= after + 2, rounds
                return ack

        assert run(scenario()).code == OK
        assert (stored(cfg.store) == []) is expect_empty


class _Consent(ConsentGate):
    """Consent as a user set it: families per device, changeable while the gateway runs (withdrawal)."""

    def __init__(self, granted: dict[int, set[str]]):
        self.granted = granted

    def decide(self, device_id: int) -> Processing:
        return Processing(frozenset(self.granted.get(device_id, set())), "no consent")


def test_consent_per_family_and_withdrawal_stops_processing(tmp_path):
    """Only consented families are stored; after consent is withdrawn the next batch is refused and
    nothing more of the device is stored (processing stops at once)."""
    cfg = config(tmp_path)
    device, batches = band()
    consent = _Consent({device: {"steps", "heart"}})

    async def scenario():
        async with run_server(cfg, consent=consent) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, device)
            first = [await up.send(b) for b in batches[:2]]
            consent.granted[device] = set()  # the user withdraws consent
            after = await up.send(batches[2])
            await up.close()
            return first, after

    first, after = run(scenario())
    assert [a.code for a in first] == [OK, OK]
    records = stored(cfg.store)
    assert records and {r["family"] for r in records} <= {"steps", "heart"}
    assert {r["family"] for r in records} == {"steps", "heart"}
    assert after.code == PERMISSION_DENIED and "consent" in after.reason
    assert stored(cfg.store) == records and high_water(cfg.store, device) == batches[1].last_seq


class _GroupRecordingStore(SqliteStore):
    """The real SQLite store, noting the size of every group the writer hands it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups: list[int] = []
        self.began = threading.Event()  # set once the writer has handed over its first group

    def commit_many(self, items):
        self.groups.append(len(items))
        self.began.set()
        return super().commit_many(items)


def test_commits_waiting_together_share_one_transaction_each_with_its_own_outcome(tmp_path):
    """While the writer waits for a lock, five commits queue up; they go in one group, in order: the
    gapped one is refused alone, the same device's second batch sees its first, the repeat is a
    duplicate. A lock held past the busy timeout fails a whole group, with nothing stored or acked."""
    path = tmp_path / "gw.db"
    cfg = config(tmp_path)
    a, b, c = 0xA1, 0xB2, 0xC3

    def recs(device_id, minute):
        return [
            {
                "family": "steps",
                "device": device_key(device_id),
                "start_us": 1_767_225_600_000_000 + minute * 60_000_000,
                "duration_s": 60,
                "algo": "steps/1",
                "values": {"steps": 1.0 + minute},
            }
        ]

    async def scenario():
        store = _GroupRecordingStore(path, busy_timeout_ms=3000)
        metrics = Metrics()
        writer = StoreWriter(store, cfg, metrics)
        writer.start()
        try:
            lock = sqlite3.connect(path, isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            first = asyncio.ensure_future(writer.commit(CommitItem(a, 1, 0, 0, b"a0", recs(a, 0))))
            # the writer now waits for the lock with the first commit alone
            assert await asyncio.to_thread(store.began.wait, 20)
            rest = [
                asyncio.ensure_future(writer.commit(CommitItem(b, 1, 0, 0, b"b0", recs(b, 0)))),
                asyncio.ensure_future(writer.commit(CommitItem(a, 1, 3, 3, b"gap", recs(a, 3)))),
                asyncio.ensure_future(writer.commit(CommitItem(a, 1, 1, 1, b"a1", recs(a, 1)))),
                asyncio.ensure_future(writer.commit(CommitItem(a, 1, 1, 1, b"again", recs(a, 1)))),
                asyncio.ensure_future(writer.commit(CommitItem(c, 1, 0, 0, b"c0", recs(c, 0)))),
            ]
            for _ in range(200):  # all five queued behind it (commits queued or running: six)
                if metrics.registry.get_sample_value("bandgate_commit_queue_depth") == 6:
                    break
                await asyncio.sleep(0.01)
            assert metrics.registry.get_sample_value("bandgate_commit_queue_depth") == 6
            assert not first.done() and not any(f.done() for f in rest)  # nothing answered before its commit
            lock.execute("ROLLBACK")
            grouped = await asyncio.gather(first, *rest, return_exceptions=True)
            lock.execute("BEGIN IMMEDIATE")  # now past the busy timeout: the whole group fails
            failed = await asyncio.gather(
                writer.commit(CommitItem(b, 1, 1, 1, b"b1", recs(b, 1))),
                writer.commit(CommitItem(c, 1, 1, 1, b"c1", recs(c, 1))),
                return_exceptions=True,
            )
            lock.execute("ROLLBACK")
            lock.close()
            return grouped, failed, list(store.groups)
        finally:
            writer.shutdown()

    grouped, failed, groups = run(scenario())
    assert groups[:2] == [1, 5]
    assert [getattr(r, "high_water", None) for r in grouped] == [0, 0, None, 1, 1, 0]
    assert isinstance(grouped[2], SequenceError) and grouped[2].expected_seq == 1  # a0 is stored
    assert grouped[4].duplicate and not grouped[3].duplicate
    assert all(isinstance(r, StoreUnavailable) for r in failed)
    url = f"sqlite:///{path}"
    assert sorted((r["device"], r["start_us"]) for r in stored(url)) == sorted(
        (r["device"], r["start_us"]) for r in recs(a, 0) + recs(b, 0) + recs(a, 1) + recs(c, 0)
    )
    assert high_water(url, a) == 1 and high_water(url, b) == 0 and high_water(url, c) == 0


def test_an_established_stream_is_not_queued_behind_a_flood_of_new_streams_first_batches(tmp_path):
    """A reconnect storm: 40 new streams send their first batches (30 one-minute frames each) at once to
    a gateway with one compute thread and a compute queue of 4. They take opening turns (2 with one
    thread) before they enter the queue, so a batch of a stream that already had one stored goes next:
    it waits for the 2 first batches in compute, not for the flood, and neither it nor a newcomer is
    refused for want of room. Which acks arrive between its send and its ack is counted, not timed."""
    cfg = config(tmp_path, compute_processes=0, compute_threads=1, compute_queue=4, overload_wait_ms=50)
    old = 0x01D0_0000_0000_0001
    flood = [0xF100_0000_0000_0000 + i for i in range(40)]

    def batch(device_id: int, seq: int, minutes: int) -> batch_pb2.Batch:
        frames = frames_of(device_id, minutes, seq=seq, start_us=1_767_225_600_000_000 + seq * 60_000_000)
        return envelope(encode(frames), frames[0])

    first_batches = {d: batch(d, 0, 30) for d in flood}
    opened, later = batch(old, 0, 1), batch(old, 1, 1)

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, old)
            assert (await up.send(opened)).code == OK
            acks: list[ingest_pb2.Ack] = []

            async def first_batch(device_id: int) -> None:
                acks.append(await Uploader(ch, device_id).send(first_batches[device_id]))

            storm = [asyncio.ensure_future(first_batch(d)) for d in flood]
            received = len(opened.payload) + sum(len(b.payload) for b in first_batches.values())
            while gw.metrics.registry.get_sample_value("bandgate_bytes_in_total") < received:
                await asyncio.sleep(0.001)  # until every first batch is in the pipeline
            before = len(acks)
            ack = await up.send(later)
            overtaken, left = len(acks) - before, len(flood) - len(acks)
            await asyncio.gather(*storm)
            return ack, overtaken, left, acks

    ack, overtaken, left, acks = run(scenario())
    assert ack.code == OK and ack.acked_seq == 1
    # the 2 in compute, and those that ended while it was on its way (1-3 seen on a loaded box; 39 when
    # first batches queued with everything else)
    assert overtaken <= 6, overtaken
    assert left >= len(flood) // 2, left  # the rest of the flood was still waiting behind it
    assert [a.code for a in acks] == [OK] * len(flood)  # each newcomer once, none refused for room
