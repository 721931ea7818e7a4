"""The sentinel (issue 13, item 10): a raw accelerometer pattern and a distinctive profile value planted on
the way in appear in no store file (feature store, key store, audit), stream, log line, metric, export
of another device, or error string. Against the real server over mutual TLS, compute in worker
processes, encryption at rest on (the gateway's defaults)."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest

from bandgate.v1 import features_pb2, features_pb2_grpc, privacy_pb2
from decoder.records import FAMILIES
from gateway.logs import JsonFormatter
from tests.gateway.gatewaykit import Uploader, assert_no_leak, band, encode, envelope, frames_of, stored
from tests.privacy.privacykit import OK, Owner, call, hexid, privacy_gateway, run, send_all
from tests.stream.natskit import all_messages, delete_streams, raw_messages, shared_nats, unique_prefix

HEIGHT = 187.3456  # a profile value nobody else has
PATTERN = -1717  # a distinctive 12-bit count


@pytest.mark.parametrize("feature_stream", [False, True], ids=["store", "store+nats"])
def test_no_raw_sample_or_profile_value_in_any_sink(tmp_path, capfd, feature_stream):
    """With `feature_stream`, the gateway also publishes to NATS JetStream (its outbox rows are in the
    store files checked here) and every message of every family stream is checked too."""
    nats_url = prefix = ""
    if feature_stream:
        nats_url, prefix = shared_nats(), unique_prefix()
    a = 0x00000000CAFEF00D
    b, b_batches = band(seed=91, minutes=20, batch_minutes=5)
    accel = np.full((3000, 3), PATTERN, np.int16)
    accel[::2] = 1717
    frames = frames_of(a, 4, accel=accel)
    batch = envelope(encode(frames), frames[0])

    captured: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: captured.append(JsonFormatter().format(record))  # type: ignore[method-assign]
    logger = logging.getLogger("bandgate")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)

    async def scenario():
        stream = f"{nats_url}?prefix={prefix}" if feature_stream else ""
        async with privacy_gateway(tmp_path, stream=stream) as (gw, creds, _cfg):
            errors = []
            async with await creds.band_channel(a) as ch:
                owner = Owner(ch, a)
                await owner.profile(birth_year=1990, country="DE", height_cm=HEIGHT, weight_kg=71.25)
                await owner.consent(grant=FAMILIES)
                up = Uploader(ch, a)
                acks = await send_all(up, [batch, batch])
                await up.close()
                bad = await owner.profile(height_cm=HEIGHT * 10)  # out of range: the error names the field
                errors.append(bad.details)
                own = await owner.export()
            async with await creds.band_channel(b) as ch:
                other = Owner(ch, b)
                await other.profile(birth_year=1970, country="NL", height_cm=165.0)
                await other.consent(grant=FAMILIES)
                up = Uploader(ch, b)
                await send_all(up, b_batches)
                await up.close()
                theirs = await other.export()
                peek = await call(
                    other.stub.GetProfile, privacy_pb2.DeviceRequest(device=hexid(a))
                )  # B asks for A's profile
                errors.append(peek.details)
            async with creds.channel("consumer") as ch:
                stream = [
                    r
                    async for r in features_pb2_grpc.FeatureServiceStub(ch).Subscribe(
                        features_pb2.SubscribeRequest(no_follow=True)
                    )
                ]
            return acks, own, theirs, peek, errors, stream, generate_latest(gw.metrics.registry).decode()

    published: list[bytes] = []
    published_records: list = []
    try:
        acks, own, theirs, peek, errors, stream, metrics_text = run(scenario())
        if feature_stream:  # the gateway's shutdown drained its outbox
            published = run(raw_messages(nats_url, prefix))
            published_records = run(all_messages(nats_url, prefix))  # a message holds a batch's records
    finally:
        logger.removeHandler(handler)
        if feature_stream:
            run(delete_streams(nats_url, prefix))
    assert [x.code for x in acks] and own.code == OK and theirs.code == OK
    assert peek.code == grpc.StatusCode.PERMISSION_DENIED
    assert str(HEIGHT).encode() in own.reply  # the owner's own export holds it: the planting worked
    assert stream and stored(f"sqlite:///{tmp_path}/gw.db", device=hexid(a))

    raw = np.array([PATTERN, 1717, PATTERN, 1717], "<i2").tobytes()
    height = [str(HEIGHT).encode(), np.float64(HEIGHT).tobytes(), np.float32(HEIGHT).tobytes()]
    # every file of every store: the feature store (its records, state, audit table), the key store, the
    # state dir
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "keys.db" for p in files) and any(p.name.startswith("gw.db") for p in files)
    if feature_stream:
        assert len(published_records) == len(stream)  # every record the consumer saw was published, once
    for path, data in [*((p, p.read_bytes()) for p in files), *(("nats", m) for m in published)]:
        assert raw not in data, path
        for needle in height:
            assert needle not in data, path
    text = "\n".join(captured) + metrics_text + "\n".join(map(str, stream)) + "\n".join(errors)
    text += theirs.reply.decode() + "".join(capfd.readouterr())
    text += "".join(m.decode(errors="replace") for m in published)
    # a leaked value: a number standing alone (the text holds the NATS ciphertext decoded, too), the
    # pattern's int16 hex, or its raw bytes
    patterns = (
        r"(?<![\w.])-?1717(?!\w)",
        r"(?<![\w.])187\.3456",
        r"(?<![\w.])71\.25(?!\d)",
        rf"(?<![0-9a-fA-F]){np.int16(PATTERN).tobytes().hex()}(?![0-9a-fA-F])",
    )
    assert_no_leak(text, raw, patterns)
