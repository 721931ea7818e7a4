"""Relays (phones) speak for the bands bound to them, and for no other: against the real gateway over real
TLS on loopback. A relay authenticates as itself, by a certificate on the mutual-TLS listener or by a
bearer token on the TLS-only one, names the device of each Upload stream in `bandgate-device-id`
metadata, and every refusal is asserted together with what the store holds afterwards (nothing of it)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import grpc

from bandgate.v1 import admin_pb2, admin_pb2_grpc, batch_pb2, ingest_pb2, ingest_pb2_grpc
from gateway.auth import device_metadata
from gateway.pipeline import OK
from gateway.security.client import ClientIdentity
from gateway.security.pki import Identity, key_pem, make_csr, new_key
from gateway.server import run_server
from gateway.store import open_store
from tests.gateway.gatewaykit import Credentials, Uploader, band, processed, stored, tls_config

# D and E are two different simulated bands; the relay is bound to D (and F), never to E.
D_SEED, E_SEED, F_SEED = 31, 32, 33


def run(coro, timeout: float = 180):  # a hang bound (a cold Numba cache compiles first)
    return asyncio.run(asyncio.wait_for(coro, timeout))


def hexid(device_id: int) -> str:
    return f"{device_id:016x}"


def high_water(url: str, device_id: int) -> int | None:
    with open_store(url) as store:
        row = store.device(device_id)
    return None if row is None else row.last_seq


def nothing_of(url: str, device_id: int) -> bool:
    """Neither a record nor a high-water of `device_id` in the store."""
    return stored(url, device=hexid(device_id)) == [] and high_water(url, device_id) is None


class Outcome(NamedTuple):
    code: grpc.StatusCode
    details: str
    acks: list[ingest_pb2.Ack]
    attempts: int  # 2 when grpc's client lost the server's status to a failed write (below) once


async def refused(
    call: Callable[[], grpc.aio.StreamStreamCall] | grpc.aio.StreamStreamCall, batch: batch_pb2.Batch
) -> Outcome:
    """Open a call with `call` (or take `call`, an open one), send one batch and finish writing: the
    stream's status, its details, and any ack that came back (a refused stream has none). Whether the
    refusal surfaces on the write, the read or only in the status depends on timing; the status is what
    the server said.

    A write that loses the race with the server's refusal makes grpc's asyncio client replace the server's
    status with its own INTERNAL "Internal error from Core" (grpc/grpc#36066, fix pending in #43486): the
    server said nothing of the kind. That one client-side outcome is tried once more on a new call (when
    `call` makes one); any other INTERNAL is returned as it is. A test that can count the server's
    refusals checks `attempts` against them."""
    tries = (1, 2) if callable(call) else (1,)
    for attempt in tries:
        stream = call() if callable(call) else call
        acks: list[ingest_pb2.Ack] = []
        try:
            await stream.write(batch)
            await stream.done_writing()
            while (ack := await stream.read()) is not grpc.aio.EOF:
                acks.append(ack)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        code, details = await stream.code(), await stream.details()
        lost = (  # exactly what grpc's set_internal_error puts there for a failed execute_batch
            code == grpc.StatusCode.INTERNAL
            and details == "Internal error from Core"
            and "execute_batch" in (await stream.debug_error_string() or "")
        )
        if not lost or attempt == tries[-1]:
            return Outcome(code, details, acks, attempt)
    raise AssertionError("unreachable")


def upload(channel: grpc.aio.Channel, device_id: int | None) -> grpc.aio.StreamStreamCall:
    """A raw Upload stream; `device_id` None sends no `bandgate-device-id` metadata."""
    metadata = device_metadata(device_id) if device_id is not None else None
    return ingest_pb2_grpc.IngestServiceStub(channel).Upload(metadata=metadata)


async def register_cert_relay(creds: Credentials, name: str, *devices: int) -> ClientIdentity:
    """A relay registered with a CSR made here (the phone's key never leaves the phone), bound to
    `devices`, through the admin API with the operator credential."""
    key = new_key()
    async with creds.channel("operator") as op:
        admin = admin_pb2_grpc.AdminServiceStub(op)
        reply = await admin.Register(
            admin_pb2.RegisterRequest(kind="relay", name=name, csr_pem=make_csr(key, Identity("relay", name)))
        )
        for d in devices:
            await admin.Bind(admin_pb2.BindRequest(relay=name, device=hexid(d)))
    assert reply.certificate_pem and reply.principal.state == "active"
    return ClientIdentity(reply.certificate_pem, key_pem(key), reply.ca_pem)


def token_channel(address: str, ca_pem: bytes, token: str) -> grpc.aio.Channel:
    """What a phone without a certificate uses: server-authenticated TLS, `authorization: Bearer <token>`."""
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(ca_pem), grpc.access_token_call_credentials(token)
    )
    return grpc.aio.secure_channel(address, creds)


def test_cert_relay_uploads_for_a_bound_band_stored_as_that_band(tmp_path):
    cfg = tls_config(tmp_path)
    d, batches = band(seed=D_SEED, minutes=20, batch_minutes=5)

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            relay = await register_cert_relay(creds, "phone-1", d)
            async with grpc.aio.secure_channel(gw.address, relay.credentials()) as ch:
                up = Uploader(ch, d)  # sends bandgate-device-id: D
                acks = [await up.send(b) for b in batches[:3]]
                return acks, await up.close()

    acks, status = run(scenario())
    assert [a.code for a in acks] == [OK] * 3
    assert [a.acked_seq for a in acks] == [b.last_seq for b in batches[:3]]
    assert status == grpc.StatusCode.OK
    expected = processed(batches[:3])
    assert expected, "the batches must derive records, or the comparison proves nothing"
    assert stored(cfg.store) == expected  # everything stored is D's, as replay computes it
    assert {r["device"] for r in stored(cfg.store)} == {hexid(d)}
    assert high_water(cfg.store, d) == batches[2].last_seq


def test_cert_relay_refused_for_unbound_band_for_a_smuggled_batch_and_without_metadata(tmp_path):
    cfg = tls_config(tmp_path)
    d, d_batches = band(seed=D_SEED, minutes=20, batch_minutes=5)
    e, e_batches = band(seed=E_SEED, minutes=20, batch_minutes=5)
    assert d != e

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            await creds.band(e)  # E is a registered band, just not bound to this relay
            relay = await register_cert_relay(creds, "phone-1", d)
            async with grpc.aio.secure_channel(gw.address, relay.credentials()) as ch:
                # an unbound band through the relay: refused when the stream opens
                unbound = await refused(lambda: upload(ch, e), e_batches[0])
                # a stream for D that carries E's batch: the stream ends there
                smuggle = Uploader(ch, d)
                first = await smuggle.send(d_batches[0])
                smuggled = await refused(smuggle.call, e_batches[0])
                # a relay that does not say which band a stream is for
                anonymous = await refused(lambda: upload(ch, None), d_batches[1])
                # the relay itself still works for D afterwards: refusals ended single streams only
                up = Uploader(ch, d)
                after = await up.send(d_batches[1])
                await up.close()
                return unbound, first, smuggled, anonymous, after

    unbound, first, smuggled, anonymous, after = run(scenario())

    code, details, acks, _ = unbound
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert f"device {hexid(e)} is not bound to relay phone-1" in details
    assert acks == []

    assert first.code == OK
    code, details, acks, _ = smuggled
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert f"batch names device {hexid(e)}" in details and "nothing of it was stored" in details
    assert acks == []

    code, details, acks, _ = anonymous
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "bandgate-device-id" in details
    assert acks == []

    assert after.code == OK
    assert nothing_of(cfg.store, e)
    assert stored(cfg.store, device=hexid(d)) == processed(d_batches[:2])
    assert {r["device"] for r in stored(cfg.store)} == {hexid(d)}


def test_token_relay_on_the_tls_only_port_and_the_token_is_kept_only_as_its_hash(tmp_path, caplog):
    cfg = tls_config(tmp_path)
    d2, batches = band(seed=D_SEED, minutes=20, batch_minutes=5)

    async def scenario():
        async with run_server(cfg) as gw:
            assert gw.token_address and gw.token_address != gw.address
            creds = Credentials(cfg.state_dir, gw.address)
            async with creds.channel("operator") as op:
                admin = admin_pb2_grpc.AdminServiceStub(op)
                reply = await admin.Register(
                    admin_pb2.RegisterRequest(kind="relay", name="phone-2", issue_token=True)
                )
                other = await admin.Register(
                    admin_pb2.RegisterRequest(kind="relay", name="phone-3", issue_token=True)
                )
                await admin.Bind(admin_pb2.BindRequest(relay="phone-2", device=hexid(d2)))
            token, ca = reply.token, reply.ca_pem

            # a wrong token (well-formed, same shape, never issued) is refused before anything is stored
            forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
            lookups = gw.metrics.token_lookups._value.get()
            unauthenticated = gw.metrics.auth_refused.labels("UNAUTHENTICATED")._value.get()
            async with token_channel(gw.token_address, ca, forged) as ch:
                wrong = await refused(lambda: upload(ch, d2), batches[0])
            assert gw.metrics.token_lookups._value.get() == lookups + wrong.attempts  # it reached the lookup
            # and the server refused every attempt so (a retried attempt hid no other ending)
            refusals = gw.metrics.auth_refused.labels("UNAUTHENTICATED")._value.get() - unauthenticated
            assert refusals == wrong.attempts
            nothing_before = nothing_of(cfg.store, d2)

            async with token_channel(gw.token_address, ca, token) as ch:
                up = Uploader(ch, d2)
                acks = [await up.send(b) for b in batches[:2]]
                status = await up.close()
            running_files = _file_bytes(tmp_path)  # db, its WAL and the state dir while serving
            return reply, other.token, wrong, nothing_before, acks, status, running_files

    reply, other_token, wrong, nothing_before, acks, status, running_files = run(scenario())
    token = reply.token

    # ≥ 128 random bits: URL-safe base64 after an optional prefix, two issuances differ
    body = re.sub(r"^[a-z]+_", "", token)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", body), "the token is printable URL-safe text"
    assert len(body) * 6 >= 128, f"a token body of {len(body)} base64 characters holds < 128 bits"
    assert other_token and other_token != token
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert reply.credential_id == f"token:{digest}"

    code, details, ack_list, _ = wrong
    assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown token" in details
    assert ack_list == []
    assert nothing_before

    assert [a.code for a in acks] == [OK, OK] and status == grpc.StatusCode.OK
    assert stored(cfg.store) == processed(batches[:2])
    assert {r["device"] for r in stored(cfg.store)} == {hexid(d2)}

    # never stored in clear: not in the db, its WAL, or the state dir, while serving or after
    for files in (running_files, _file_bytes(tmp_path)):
        assert files, "the scan must see the gateway's files"
        for path, data in files.items():
            assert token.encode() not in data and body.encode() not in data, f"the token is in {path}"
    db_bytes = b"".join(data for path, data in _file_bytes(tmp_path).items() if path.name.startswith("gw.db"))
    assert f"token:{digest}".encode() in db_bytes
    with open_store(cfg.store) as store:
        ids = {c.id for c in store.registry_snapshot().credentials}
    assert f"token:{digest}" in ids
    assert token not in caplog.text


def _file_bytes(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_unbinding_ends_the_relays_stream_for_that_band_within_1s_and_no_other(tmp_path):
    cfg = tls_config(tmp_path)
    d, d_batches = band(seed=D_SEED, minutes=20, batch_minutes=5)
    f, f_batches = band(seed=F_SEED, minutes=20, batch_minutes=5)

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            relay = await register_cert_relay(creds, "phone-1", d, f)
            async with grpc.aio.secure_channel(gw.address, relay.credentials()) as ch, creds.channel() as op:
                up_d, up_f = Uploader(ch, d), Uploader(ch, f)
                acked_d = [await up_d.send(b) for b in d_batches[:2]]
                acked_f = [await up_f.send(f_batches[0])]
                ended = asyncio.ensure_future(up_d.call.code())
                await admin_pb2_grpc.AdminServiceStub(op).Unbind(
                    admin_pb2.BindRequest(relay="phone-1", device=hexid(d))
                )
                unbound_at = time.monotonic()
                # D's stream is idle (between batches): it must end all the same, not at its next batch
                code = await asyncio.wait_for(asyncio.shield(ended), 5)
                took = time.monotonic() - unbound_at
                details = await up_d.call.details()
                # a batch sent after the unbinding: never stored
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await up_d.call.write(d_batches[2])
                # the relay's other stream goes on, on the same connection
                acked_f += [await up_f.send(b) for b in f_batches[1:3]]
                f_status = await up_f.close()
                # and a new stream for D through the relay is refused
                again = await refused(lambda: upload(ch, d), d_batches[2])
                return acked_d, acked_f, code, details, took, f_status, again

    acked_d, acked_f, code, details, took, f_status, again = run(scenario())
    assert [a.code for a in acked_d] == [OK, OK]
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert f"device {hexid(d)} is not bound to relay phone-1" in details
    assert took < 1.0, f"the stream ended {took:.2f} s after the unbinding"
    assert high_water(cfg.store, d) == d_batches[1].last_seq
    assert stored(cfg.store, device=hexid(d)) == processed(d_batches[:2])

    assert [a.code for a in acked_f] == [OK] * 3 and f_status == grpc.StatusCode.OK
    assert stored(cfg.store, device=hexid(f)) == processed(f_batches[:3])
    assert again.code == grpc.StatusCode.PERMISSION_DENIED and again.acks == []
    assert high_water(cfg.store, d) == d_batches[1].last_seq


def test_token_relay_on_the_mutual_tls_port_fails_the_handshake(tmp_path):
    cfg = tls_config(tmp_path)
    d, batches = band(seed=D_SEED, minutes=20, batch_minutes=5)

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            async with creds.channel("operator") as op:
                admin = admin_pb2_grpc.AdminServiceStub(op)
                reply = await admin.Register(
                    admin_pb2.RegisterRequest(kind="relay", name="phone-2", issue_token=True)
                )
                await admin.Bind(admin_pb2.BindRequest(relay="phone-2", device=hexid(d)))
            lookups = gw.metrics.token_lookups._value.get()
            refusals = sum(s.get() for s in _samples(gw.metrics.auth_refused))
            async with token_channel(gw.address, reply.ca_pem, reply.token) as ch:
                result = await refused(lambda: upload(ch, d), batches[0])
            # the same token on its own port works: the refusal above is the port, not the token
            async with token_channel(gw.token_address, reply.ca_pem, reply.token) as ch:
                up = Uploader(ch, d)
                ok = await up.send(batches[0])
                await up.close()
            return (
                result,
                gw.metrics.token_lookups._value.get() - lookups,
                sum(s.get() for s in _samples(gw.metrics.auth_refused)) - refusals,
                ok,
            )

    (code, details, acks, _), lookups, refusals, ok = run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert acks == []
    # the handshake failed in grpc core: Python never saw the call, let alone the token
    assert lookups == 1  # only the accepted upload on the token port
    assert refusals == 0
    assert ok.code == OK
    assert stored(cfg.store) == processed(batches[:1])


def _samples(counter):
    """Each labelled child's value holder of a prometheus Counter (none before its first use)."""
    return [child._value for child in counter._metrics.values()]
