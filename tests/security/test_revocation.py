"""Revocation of a device, a relay and a consumer, against the real gateway over real TLS on loopback:
the revoked principal's open streams end with PERMISSION_DENIED within a second of the Revoke reply, no
batch it sends after that is stored, everyone else's streams go on, a reconnect is refused, and the
revocation is in the audit log, which verifies and holds identifiers only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import grpc

from bandgate.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    batch_pb2,
    features_pb2,
    features_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
)
from bench.registry_bench import fleet_ops
from gateway.auth import device_metadata
from gateway.pipeline import OK
from gateway.security.audit import load_key, verify
from gateway.security.client import ClientIdentity
from gateway.security.pki import Identity, key_pem, make_csr, new_key
from gateway.server import run_server
from gateway.store import open_store
from tests.gateway.gatewaykit import (
    Credentials,
    Uploader,
    audit_name,
    band,
    processed,
    registry_reads,
    stored,
    tls_config,
)

PERIOD_S = 0.05  # a band sends a batch this often
WITHIN_S = 1.0  # the promise: a revoked stream ends, and nothing it sends is stored, after this long

# The fields of an audit entry and of its details: identifiers, reasons and counts, never feature values.
AUDIT_FIELDS = {"v", "seq", "time_us", "actor", "action", "subject", "reason", "count", "details"}
DETAIL_FIELDS = {"serial", "type", "device", "family", "operation", "devices", "previous"}


def run(coro, timeout: float = 180):  # a hang bound (a cold Numba cache compiles first)
    return asyncio.run(asyncio.wait_for(coro, timeout))


def hexid(device_id: int) -> str:
    return f"{device_id:016x}"


def high_water(url: str, device_id: int) -> int | None:
    with open_store(url) as store:
        row = store.device(device_id)
    return None if row is None else row.last_seq


class Streamer:
    """One Upload stream sending `batches` one every PERIOD_S, each after the previous ack; records when
    each ack came and when (and how) the stream ended."""

    def __init__(self, channel: grpc.aio.Channel, device_id: int, batches, *, idle_after: int | None = None):
        self.up = Uploader(channel, device_id)  # a relay's stream names its device the same way
        self.batches = batches[:idle_after]  # then the stream stays open, idle, until `finish`
        self.acks: list[tuple[float, ingest_pb2.Ack]] = []
        self.ended_at: float | None = None
        self.stop = asyncio.Event()
        self.sender = asyncio.ensure_future(self._send())
        self.watcher = asyncio.ensure_future(self._watch())

    async def _send(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, AssertionError):
            for batch in self.batches:
                if self.stop.is_set():
                    await self.up.call.done_writing()
                    return
                ack = await self.up.send(batch)
                self.acks.append((time.monotonic(), ack))
                await asyncio.sleep(PERIOD_S)
            await self.stop.wait()
            await self.up.call.done_writing()

    async def _watch(self) -> grpc.StatusCode:
        code = await self.up.call.code()
        self.ended_at = time.monotonic()
        return code

    async def until_acks(self, n: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acks) < n:
            assert time.monotonic() < deadline, f"only {len(self.acks)} acks"
            assert not self.watcher.done(), f"the stream ended early: {self.watcher.result()}"
            await asyncio.sleep(0.01)

    async def ended(self, timeout: float = 5) -> tuple[grpc.StatusCode, str]:
        code = await asyncio.wait_for(asyncio.shield(self.watcher), timeout)
        self.stop.set()  # an idle sender is waiting for it
        await self.sender
        return code, await self.up.call.details()

    async def finish(self) -> grpc.StatusCode:
        self.stop.set()
        await self.sender
        return await asyncio.wait_for(asyncio.shield(self.watcher), 10)

    def acked(self) -> list[ingest_pb2.Ack]:
        return [a for _, a in self.acks]

    def acked_after(self, t: float) -> list[ingest_pb2.Ack]:
        return [a for at, a in self.acks if at > t]


async def refused_upload(channel: grpc.aio.Channel, device_id: int, batch: batch_pb2.Batch):
    """A new Upload stream with one batch: its status, details, and the acks that came (none if refused)."""
    call = ingest_pb2_grpc.IngestServiceStub(channel).Upload(metadata=device_metadata(device_id))
    acks = []
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.write(batch)
        await call.done_writing()
        while (ack := await call.read()) is not grpc.aio.EOF:
            acks.append(ack)
    return await call.code(), await call.details(), acks


async def revoke(creds: Credentials, kind: str, name: str) -> tuple[admin_pb2.Principal, float]:
    """Revoke through the admin API; the reply and the moment it came back."""
    async with creds.channel("operator") as op:
        reply = await admin_pb2_grpc.AdminServiceStub(op).Revoke(
            admin_pb2.RevokeRequest(kind=kind, name=name)
        )
        replied_at = time.monotonic()
    return reply, replied_at


async def register(creds: Credentials, kind: str, name: str) -> ClientIdentity:
    key = new_key()
    async with creds.channel("operator") as op:
        reply = await admin_pb2_grpc.AdminServiceStub(op).Register(
            admin_pb2.RegisterRequest(kind=kind, name=name, csr_pem=make_csr(key, Identity(kind, name)))
        )
    return ClientIdentity(reply.certificate_pem, key_pem(key), reply.ca_pem)


def assert_stored_exactly_the_acked(url: str, device_id: int, batches, acks) -> None:
    """The store holds the records of the acked batches of `device_id`, and of nothing after them."""
    n = len(acks)
    assert n and all(a.code == OK for a in acks), [a.code for a in acks]
    assert [a.acked_seq for a in acks] == [b.last_seq for b in batches[:n]]
    assert high_water(url, device_id) == batches[n - 1].last_seq
    assert stored(url, device=hexid(device_id)) == processed(batches[:n])


def audit_entries(cfg) -> list[dict]:
    """The audit log's entries, after checking that it verifies (chain and head)."""
    state = Path(cfg.state_dir)
    with open_store(cfg.store) as store:
        report = verify(store, load_key(state / "audit.key"), state / "audit.head")
        assert report.ok, report.problems
        rows = store.audit_rows(0, 10**6)
    assert report.entries == len(rows) > 0
    return [json.loads(r.entry) for r in rows]


def assert_audited_revocation(cfg, *subjects: str) -> None:
    """Each of `subjects` has a principal.revoked entry by the operator; every entry holds identifiers
    and reasons only: the known fields, text and integers, no key of any stored feature record."""
    entries = audit_entries(cfg)
    revoked = {e["subject"]: e for e in entries if e["action"] == "principal.revoked"}
    for subject in subjects:
        assert subject in revoked, f"no principal.revoked entry for {subject}: {sorted(revoked)}"
        assert revoked[subject]["actor"] == "consumer:operator"
    value_keys = {k for r in stored(cfg.store) for k in r["values"]}
    assert value_keys, "records were stored, so there are feature values an entry could have leaked"
    for e in entries:
        assert set(e) <= AUDIT_FIELDS, e
        assert set(e["details"]) <= DETAIL_FIELDS, e
        assert not set(e["details"]) & value_keys, e
        for value in (*(v for k, v in e.items() if k != "details"), *e["details"].values()):
            assert isinstance(value, str | int) and not isinstance(value, bool | float), e


def test_revoked_device_stream_ends_within_1s_nothing_after_stored_others_untouched(tmp_path):
    cfg = tls_config(tmp_path)
    a, a_batches = band(seed=41, minutes=60, batch_minutes=1)
    b, b_batches = band(seed=42, minutes=60, batch_minutes=1)

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            async with await creds.band_channel(a) as ch_a, await creds.band_channel(b) as ch_b:
                sa, sb = Streamer(ch_a, a, a_batches), Streamer(ch_b, b, b_batches)
                await sa.until_acks(5)
                await sb.until_acks(5)
                reply, revoked_at = await revoke(creds, "device", hexid(a))
                code, details = await sa.ended()
                await asyncio.sleep(WITHIN_S)  # B streams on for a second after the revocation
                await sb.until_acks(len(sb.acks) - len(sb.acked_after(revoked_at)) + 5)  # (a slow box's)
                b_after = sb.acked_after(revoked_at)
                b_status = await sb.finish()
            async with await creds.band_channel(a) as ch:  # the same, still valid, certificate
                again = await refused_upload(ch, a, a_batches[len(sa.acks)])
            return reply, revoked_at, code, details, sa, b_after, sb, b_status, again

    reply, revoked_at, code, details, sa, b_after, sb, b_status, again = run(scenario())
    assert reply.state == "revoked"

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in details
    took = sa.ended_at - revoked_at
    assert took < WITHIN_S, f"A's stream ended {took:.2f} s after the Revoke reply"
    assert len(sa.acks) < len(a_batches), "A must still have been sending when it was revoked"
    assert not sa.acked_after(revoked_at + WITHIN_S)
    assert_stored_exactly_the_acked(cfg.store, a, a_batches, sa.acked())

    assert len(b_after) >= 5 and all(ack.code == OK for ack in b_after), [ack.code for ack in b_after]
    assert b_status == grpc.StatusCode.OK
    assert_stored_exactly_the_acked(cfg.store, b, b_batches, sb.acked())

    code, details, acks = again
    assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details
    assert acks == []
    assert_stored_exactly_the_acked(cfg.store, a, a_batches, sa.acked())  # the reconnect added nothing
    assert_audited_revocation(cfg, f"device:{audit_name(cfg.state_dir, a)}")


def test_revoked_relay_loses_all_its_streams_within_1s_a_direct_band_streams_on(tmp_path):
    cfg = tls_config(tmp_path)
    d, d_batches = band(seed=43, minutes=60, batch_minutes=1)
    f, f_batches = band(seed=44, minutes=60, batch_minutes=1)
    g, g_batches = band(seed=45, minutes=60, batch_minutes=1)

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            relay = await register(creds, "relay", "phone-1")
            async with creds.channel("operator") as op:
                admin = admin_pb2_grpc.AdminServiceStub(op)
                for device in (d, f):
                    await admin.Bind(admin_pb2.BindRequest(relay="phone-1", device=hexid(device)))
            async with (
                grpc.aio.secure_channel(gw.address, relay.credentials()) as ch_r,
                await creds.band_channel(g) as ch_g,
            ):
                # D streams; F sent a few batches and is idle, as a band between batches mostly is
                sd, sf = Streamer(ch_r, d, d_batches), Streamer(ch_r, f, f_batches, idle_after=5)
                sg = Streamer(ch_g, g, g_batches)
                for s in (sd, sf, sg):
                    await s.until_acks(5)
                reply, revoked_at = await revoke(creds, "relay", "phone-1")
                ended = [await s.ended() for s in (sd, sf)]
                await asyncio.sleep(WITHIN_S)
                await sg.until_acks(len(sg.acks) - len(sg.acked_after(revoked_at)) + 5)
                g_after = sg.acked_after(revoked_at)
                g_status = await sg.finish()
            async with grpc.aio.secure_channel(gw.address, relay.credentials()) as ch:
                again = await refused_upload(ch, d, d_batches[len(sd.acks)])
            return reply, revoked_at, ended, (sd, sf), g_after, sg, g_status, again

    reply, revoked_at, ended, relayed, g_after, sg, g_status, again = run(scenario())
    assert reply.state == "revoked"
    for (code, details), s, (device, batches) in zip(
        ended, relayed, ((d, d_batches), (f, f_batches)), strict=True
    ):
        assert code == grpc.StatusCode.PERMISSION_DENIED and "relay phone-1 is revoked" in details
        took = s.ended_at - revoked_at
        assert took < WITHIN_S, f"a relayed stream ended {took:.2f} s after the Revoke reply"
        assert len(s.acks) < len(batches) and s.ended_at is not None
        assert not s.acked_after(revoked_at + WITHIN_S)
        assert_stored_exactly_the_acked(cfg.store, device, batches, s.acked())

    assert len(g_after) >= 5 and all(ack.code == OK for ack in g_after)
    assert g_status == grpc.StatusCode.OK
    assert_stored_exactly_the_acked(cfg.store, g, g_batches, sg.acked())

    code, details, acks = again
    assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details and acks == []
    assert_stored_exactly_the_acked(cfg.store, d, d_batches, relayed[0].acked())
    assert_audited_revocation(cfg, "relay:phone-1")


class Subscriber:
    """A following Subscribe: the records it received with when, and when (and how) it ended."""

    def __init__(self, channel: grpc.aio.Channel, families=()):
        self.call = features_pb2_grpc.FeatureServiceStub(channel).Subscribe(
            features_pb2.SubscribeRequest(families=list(families))
        )
        self.records: list[tuple[float, features_pb2.FeatureRecord]] = []
        self.ended_at: float | None = None
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> grpc.StatusCode:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for record in self.call:
                self.records.append((time.monotonic(), record))
        code = await self.call.code()
        self.ended_at = time.monotonic()
        return code

    async def until(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.records) < n:
            assert time.monotonic() < deadline, f"only {len(self.records)} of {n} records"
            assert not self.reader.done(), "the subscription ended early"
            await asyncio.sleep(0.01)


def test_revoked_consumer_subscription_ends_within_1s_and_it_cannot_subscribe_again(tmp_path):
    cfg = tls_config(tmp_path)
    d, batches = band(seed=46, minutes=60, batch_minutes=1)

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            clinic = await register(creds, "consumer", "clinic")
            async with creds.channel("operator") as op:
                await admin_pb2_grpc.AdminServiceStub(op).Grant(
                    admin_pb2.GrantRequest(consumer="clinic", family="activity", operation="subscribe")
                )
            async with (
                await creds.band_channel(d) as ch_d,
                grpc.aio.secure_channel(gw.address, clinic.credentials()) as ch_c,
                creds.channel("consumer") as ch_local,
            ):
                up = Uploader(ch_d, d)
                for b in batches[:3]:
                    assert (await up.send(b)).code == OK
                before = stored(cfg.store)
                n_activity = sum(r["family"] == "activity" for r in before)
                sub_c, sub_local = Subscriber(ch_c), Subscriber(ch_local)
                await sub_c.until(n_activity)
                await sub_local.until(len(before))
                reply, revoked_at = await revoke(creds, "consumer", "clinic")
                code = await asyncio.wait_for(asyncio.shield(sub_c.reader), 5)
                details = await sub_c.call.details()
                # records stored after the revocation reach the local consumer, never the clinic
                for b in batches[3:6]:
                    assert (await up.send(b)).code == OK
                await up.close()
                await sub_local.until(len(stored(cfg.store)))
                local_after = sub_local.records[len(before) :]
                again = Subscriber(ch_c)
                again_code = await asyncio.wait_for(again.reader, 5)
                again_details = await again.call.details()
                sub_local.call.cancel()
            return (
                reply,
                revoked_at,
                code,
                details,
                sub_c,
                n_activity,
                local_after,
                again_code,
                again_details,
            )

    reply, revoked_at, code, details, sub_c, n_activity, local_after, again_code, again_details = run(
        scenario()
    )
    assert reply.state == "revoked"
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "clinic" in details and "revoked" in details
    took = sub_c.ended_at - revoked_at
    assert took < WITHIN_S, f"the subscription ended {took:.2f} s after the Revoke reply"
    received = [r for _, r in sub_c.records]
    assert len(received) == n_activity and {r.family for r in received} == {"activity"}
    assert not [r for at, r in sub_c.records if at > revoked_at]
    assert local_after, "the local consumer's subscription went on after the clinic's revocation"
    assert again_code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in again_details
    assert_audited_revocation(cfg, "consumer:clinic")


def test_revocations_are_audited_verifiably_with_identifiers_only(tmp_path):
    """A device, a relay and a consumer revoked on one gateway, each then refused once (a refusal is
    audited too): the log verifies, names each revocation, and carries no feature value."""
    cfg = tls_config(tmp_path)
    d, batches = band(seed=47, minutes=60, batch_minutes=1)

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            relay = await register(creds, "relay", "phone-1")
            clinic = await register(creds, "consumer", "clinic")
            async with creds.channel("operator") as op:
                admin = admin_pb2_grpc.AdminServiceStub(op)
                await admin.Bind(admin_pb2.BindRequest(relay="phone-1", device=hexid(d)))
                await admin.Grant(
                    admin_pb2.GrantRequest(consumer="clinic", family="steps", operation="export")
                )
            async with await creds.band_channel(d) as ch:
                up = Uploader(ch, d)
                assert (await up.send(batches[0])).code == OK
                await up.close()
            for kind, name in (("device", hexid(d)), ("relay", "phone-1"), ("consumer", "clinic")):
                reply, _ = await revoke(creds, kind, name)
                assert reply.state == "revoked"
            async with await creds.band_channel(d) as ch:
                refused = [await refused_upload(ch, d, batches[1])]
            async with grpc.aio.secure_channel(gw.address, relay.credentials()) as ch:
                refused.append(await refused_upload(ch, d, batches[1]))
            async with grpc.aio.secure_channel(gw.address, clinic.credentials()) as ch:
                try:
                    await (
                        features_pb2_grpc.FeatureServiceStub(ch)
                        .Export(features_pb2.ExportRequest(device=hexid(d)))
                        .read()
                    )
                except grpc.aio.AioRpcError as e:
                    refused.append((e.code(), e.details(), []))
            return refused

    refused = run(scenario())  # the gateway has shut down: its refusal counts are flushed to the log
    assert [(c, "revoked" in why, acks) for c, why, acks in refused] == [
        (grpc.StatusCode.PERMISSION_DENIED, True, [])
    ] * 3
    assert_audited_revocation(
        cfg, f"device:{audit_name(cfg.state_dir, d)}", "relay:phone-1", "consumer:clinic"
    )
    entries = audit_entries(cfg)
    refusals = [e for e in entries if e["action"] == "rpc.refused"]
    assert refusals and all("revoked" in e["reason"] for e in refusals)
    assert sum(e["count"] for e in refusals) == 3
    assert stored(cfg.store) == processed(batches[:1])


FLEET = 100_000  # registered devices in the fleet-size test: a whole re-read of them takes 1.5-4 s


def test_a_revocation_among_100000_registered_devices_still_ends_the_stream_within_1s(tmp_path):
    """The promise at fleet size: with 100,000 devices registered (each with a certificate, an ownership
    and a consent decision), the revoked band's open stream still ends within a second of the Revoke
    call (its reply waits for the new policy), because the gateway reads the change (the revoked
    device's rows, `Store.registry_delta`), not the whole registry again; no batch after that is
    stored."""
    cfg = tls_config(tmp_path)
    with open_store(cfg.store) as store:
        store.registry_apply(fleet_ops(FLEET))
    a, a_batches = band(seed=43, minutes=60, batch_minutes=1)

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            async with await creds.band_channel(a) as ch_a:
                sa = Streamer(ch_a, a, a_batches)
                await sa.until_acks(5)
                full_before = registry_reads(gw, "full")
                asked_at = time.monotonic()  # the reply waits for the new policy: time from the ask
                reply, revoked_at = await revoke(creds, "device", hexid(a))
                code, details = await sa.ended()
            return (
                reply,
                asked_at,
                revoked_at,
                code,
                details,
                sa,
                registry_reads(gw, "full") - full_before,
                len(gw.registry.policy.principals),
            )

    reply, asked_at, revoked_at, code, details, sa, full_reads, principals = run(scenario())
    assert principals > FLEET  # the fleet, the band and the local credentials
    assert reply.state == "revoked"
    assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details
    took = sa.ended_at - asked_at
    assert took < WITHIN_S, f"A's stream ended {took:.2f} s after the Revoke call among {FLEET} devices"
    assert full_reads == 0, "the revocation was read as a delta, not by reading the registry whole"
    assert not sa.acked_after(revoked_at + WITHIN_S)
    assert_stored_exactly_the_acked(cfg.store, a, a_batches, sa.acked())
