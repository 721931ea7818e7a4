"""Who a certificate proves is decided by the CA and the registry together, never by metadata:

- a certificate the CA signed for a device that is not registered is refused (PERMISSION_DENIED, audited),
  and accepted and registered with its serial when the operator turns on auto-registration (devices only);
- band A's certificate sending B's batch ends the stream, and a stream that claims B in metadata is still
  A's; nothing of B's batch is stored and B's own stream carries on;
- the CA signs a CSR for exactly the identity the admin registers, never the one a CSR asks for instead;
- a band renews its certificate over its live stream with a CSR (same identity, new serial, both listed),
  a token or a CSR for someone else cannot renew, and revoking the old credential leaves the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bandgate.v1 import admin_pb2, admin_pb2_grpc, features_pb2, features_pb2_grpc
from gateway.pipeline import OK
from gateway.security.client import ClientIdentity
from gateway.security.pki import (
    CertificateAuthority,
    Identity,
    LocalState,
    cert_info,
    key_pem,
    make_csr,
    new_key,
)
from gateway.server import Gateway, run_server
from gateway.store import open_store
from tests.gateway.gatewaykit import (
    Credentials,
    Uploader,
    audit_name,
    band,
    processed,
    same_records,
    stored,
    tls_config,
)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))  # a hang bound, not a speed check


def channel(address: str, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    # A connection of its own, so each "new connection" below is one.
    return grpc.aio.secure_channel(address, credentials, options=[("grpc.use_local_subchannel_pool", 1)])


async def upload_once(address: str, credentials: grpc.ChannelCredentials, device: int, batch):
    """One batch on a new connection: (ack or None, status code, details)."""
    async with channel(address, credentials) as ch:
        up = Uploader(ch, device)
        ack = None
        with contextlib.suppress(grpc.aio.AioRpcError, AssertionError):  # the status says what happened
            ack = await up.send(batch)
            await up.call.done_writing()
        return ack, await up.call.code(), await up.call.details()


async def ended(up: Uploader) -> tuple[grpc.StatusCode, str]:
    return await asyncio.wait_for(up.call.code(), 5), await up.call.details()


async def admin_call(creds: Credentials, method: str, request):
    """An AdminService call with the local operator credential: (reply or None, status code, details)."""
    async with creds.channel("operator") as ch:
        try:
            return await getattr(admin_pb2_grpc.AdminServiceStub(ch), method)(request), grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as e:
            return None, e.code(), e.details()


async def listed(creds: Credentials, kind: str) -> dict[str, admin_pb2.Principal]:
    reply, code, details = await admin_call(creds, "List", admin_pb2.ListRequest(kind=kind))
    assert code == grpc.StatusCode.OK, details
    return {p.name: p for p in reply.principals}


def refused(gw: Gateway, code: str) -> float:
    return gw.metrics.registry.get_sample_value("bandgate_auth_refused_total", {"code": code}) or 0.0


def audit_entries(url: str) -> list[dict]:
    with open_store(url) as store:
        return [json.loads(row.entry) for row in store.audit_rows(0, limit=100_000)]


def spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def the_ca(state: LocalState) -> CertificateAuthority:
    """The gateway's CA, as `bandgate pki issue` on the CA's host uses it."""
    return CertificateAuthority.load(state.ca_cert, state.ca_key)


# (a), (b) registration


def test_a_certificate_of_our_ca_for_an_unregistered_device_is_refused_and_the_refusal_audited(tmp_path):
    cfg = tls_config(tmp_path)
    state = LocalState.at(tmp_path / "state")
    unknown, batches = band()  # a device the CA signs for but nobody registered
    name = f"{unknown:016x}"

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(state.root, gw.address)
            cert, key = the_ca(state).issue(Identity.device(unknown))
            unregistered = ClientIdentity(cert, key, state.ca_cert.read_bytes())
            attempt = await upload_once(gw.address, unregistered.credentials(), unknown, batches[0])
            devices = await listed(creds, "device")
            denied = refused(gw, "PERMISSION_DENIED")
            # refusals are aggregated and flushed into the audit log every couple of seconds
            deadline = time.monotonic() + 20  # (a slow box's flushes come late)
            entries: list[dict] = []
            while time.monotonic() < deadline:
                entries = [
                    e
                    for e in await asyncio.to_thread(audit_entries, cfg.store)
                    if e["action"] == "rpc.refused" and audit_name(state.root, name) in e["reason"]
                ]
                if entries:
                    break
                await asyncio.sleep(0.2)
            return attempt, devices, denied, entries

    (ack, code, details), devices, denied, entries = run(scenario())
    assert ack is None and code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
    assert details == f"device {name} is not registered"
    assert denied == 1
    assert name not in devices  # refusing it did not register it
    assert stored(cfg.store) == []
    (entry,) = entries
    # the reason as the caller got it, the device named by its pseudonym
    assert entry["reason"] == details.replace(name, audit_name(state.root, name)) and entry["count"] == 1
    assert name not in str(entries)
    assert entry["actor"] == "peer:ipv4:127.0.0.1"  # the peer's address, not its port


def test_auto_registration_accepts_and_registers_a_device_of_our_ca_but_no_other_kind(tmp_path):
    cfg = tls_config(tmp_path, auto_register=True)
    state = LocalState.at(tmp_path / "state")
    unknown, batches = band()  # a device the CA signs for but nobody registered
    name = f"{unknown:016x}"

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(state.root, gw.address)
            ca = the_ca(state)
            cert, key = ca.issue(Identity.device(unknown))
            device = ClientIdentity(cert, key, state.ca_cert.read_bytes())
            attempt = await upload_once(gw.address, device.credentials(), unknown, batches[0])
            # a consumer is never auto-registered: data out needs an operator's grant
            c_cert, c_key = ca.issue(Identity("consumer", "snoop"))
            consumer = ClientIdentity(c_cert, c_key, state.ca_cert.read_bytes())
            async with channel(gw.address, consumer.credentials()) as ch:
                call = features_pb2_grpc.FeatureServiceStub(ch).Subscribe(
                    features_pb2.SubscribeRequest(no_follow=True)
                )
                records = 0
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for _ in call:
                        records += 1
                subscribe = await call.code(), await call.details(), records
            return cert, attempt, subscribe, await listed(creds, "device"), await listed(creds, "consumer")

    cert, (ack, code, details), subscribe, devices, consumers = run(scenario())
    assert ack is not None and ack.code == OK and code == grpc.StatusCode.OK, (code, details)
    assert stored(cfg.store) == processed(batches[:1])
    principal = devices[name]
    assert principal.state == "active"
    info = cert_info(cert)
    assert [(c.id, c.serial, c.state) for c in principal.credentials] == [
        ("x509:" + info.fingerprint, f"{info.serial:x}", "active")
    ]
    assert subscribe == (grpc.StatusCode.PERMISSION_DENIED, "consumer snoop is not registered", 0)
    assert "snoop" not in consumers
    events = [e for e in audit_entries(cfg.store) if e["subject"] == f"device:{audit_name(state.root, name)}"]
    assert [(e["action"], e["actor"]) for e in events] == [
        ("principal.registered", "auto-registration"),
        ("credential.recorded", "auto-registration"),
    ]


# (c) one band's certificate, another band's data


def test_band_a_cannot_send_band_b_batches_even_claiming_b_in_metadata(tmp_path):
    cfg = tls_config(tmp_path)
    state = LocalState.at(tmp_path / "state")
    a, a_batches = band(seed=7)
    b, b_batches = band(seed=8)

    async def scenario():
        out = {}
        async with run_server(cfg) as gw:
            creds = Credentials(state.root, gw.address)
            a_creds = (await creds.band(a)).credentials()
            async with await creds.band_channel(b) as b_channel:
                b_stream = Uploader(b_channel, b)  # B streams all along, registered and connected
                out["b0"] = await b_stream.send(b_batches[0])

                async with channel(gw.address, a_creds) as ch:
                    up = Uploader(ch, a)
                    out["a0"] = await up.send(a_batches[0])
                    await up.call.write(b_batches[1])
                    out["a_sends_b"] = await ended(up)

                async with channel(gw.address, a_creds) as ch:
                    # Uploader(ch, b) names B in bandgate-device-id metadata; the certificate says A
                    call = Uploader(ch, b)
                    out["a_as_b_own"] = await call.send(a_batches[1])
                    await call.call.write(b_batches[1])
                    out["a_as_b_sends_b"] = await ended(call)

                out["b1"] = await b_stream.send(b_batches[1])  # not a duplicate: nothing of it was stored
                out["b2"] = await b_stream.send(b_batches[2])
                out["b_close"] = await b_stream.close()
            out["denied"] = refused(gw, "PERMISSION_DENIED")
        return out

    out = run(scenario())
    assert [out[k].code for k in ("b0", "a0", "a_as_b_own", "b1", "b2")] == [OK] * 5
    assert out["b_close"] == grpc.StatusCode.OK  # B's stream was neither superseded nor touched
    for k in ("a_sends_b", "a_as_b_sends_b"):
        code, details = out[k]
        assert code == grpc.StatusCode.PERMISSION_DENIED, (k, code, details)
        assert details == (
            f"batch names device {b:016x}, the stream is for {a:016x}; nothing of it was stored"
        ), k
    assert out["denied"] == 2
    assert same_records(stored(cfg.store), processed(a_batches[:2]) + processed(b_batches[:3]))


# (d) CSR signing


def test_register_signs_a_csr_for_exactly_the_registered_identity_and_refuses_any_other(tmp_path):
    cfg = tls_config(tmp_path)
    state = LocalState.at(tmp_path / "state")
    a, batches = band(seed=7)
    b = 0x00000000000000B0
    c = 0x00000000000000C0
    a_name, b_name, c_name = (f"{d:016x}" for d in (a, b, c))

    async def scenario():
        out = {}
        async with run_server(cfg) as gw:
            creds = Credentials(state.root, gw.address)
            key = new_key()
            out["key"] = key
            out["signed"] = await admin_call(
                creds,
                "Register",
                admin_pb2.RegisterRequest(
                    kind="device", name=a_name, csr_pem=make_csr(key, Identity.device(a))
                ),
            )
            reply = out["signed"][0]
            if reply is not None:
                band_a = ClientIdentity(reply.certificate_pem, key_pem(key), reply.ca_pem)
                out["upload"] = await upload_once(gw.address, band_a.credentials(), a, batches[0])
            # a CSR that asks for B while the admin registers C; one that asks for the operator's identity
            out["other_device"] = await admin_call(
                creds,
                "Register",
                admin_pb2.RegisterRequest(
                    kind="device", name=c_name, csr_pem=make_csr(new_key(), Identity.device(b))
                ),
            )
            out["operator"] = await admin_call(
                creds,
                "Register",
                admin_pb2.RegisterRequest(
                    kind="consumer",
                    name="mallory",
                    csr_pem=make_csr(new_key(), Identity("consumer", "operator")),
                ),
            )
            out["devices"] = await listed(creds, "device")
            out["consumers"] = await listed(creds, "consumer")
        return out

    out = run(scenario())
    reply, code, details = out["signed"]
    assert code == grpc.StatusCode.OK, details
    info = cert_info(reply.certificate_pem)
    cert = x509.load_pem_x509_certificate(reply.certificate_pem)
    assert info.identity == Identity.device(a)
    assert spki(cert.public_key()) == spki(out["key"].public_key())  # the band's key, never one made here
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(state.ca_cert.read_bytes()))
    assert (reply.serial, reply.credential_id) == (f"{info.serial:x}", "x509:" + info.fingerprint)
    assert [c.serial for c in out["devices"][a_name].credentials] == [reply.serial]
    ack, code, details = out["upload"]
    assert ack is not None and ack.code == OK and code == grpc.StatusCode.OK, details

    _, code, details = out["other_device"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"CSR refused: the CSR asks for device:{b_name}, not device:{c_name}; refused"
    _, code, details = out["operator"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "asks for consumer:operator, not consumer:mallory" in details
    assert set(out["devices"]) == {a_name}  # neither B nor C registered
    assert "mallory" not in out["consumers"]
    assert same_records(stored(cfg.store), processed(batches[:1]))


# (e), (f) renewal over a live stream, and revoking one credential


async def renew(ch: grpc.aio.Channel, key, identity: Identity):
    """IdentityService.Renew on `ch`: (reply or None, status code, details)."""
    try:
        reply = await admin_pb2_grpc.IdentityServiceStub(ch).Renew(
            admin_pb2.RenewRequest(csr_pem=make_csr(key, identity))
        )
        return reply, grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as e:
        return None, e.code(), e.details()


def test_a_band_renews_over_its_live_stream_and_nobody_renews_for_someone_else(tmp_path):
    cfg = tls_config(tmp_path)
    state = LocalState.at(tmp_path / "state")
    a, batches = band(seed=7)
    b = 0x00000000000000B0
    a_name, b_name = f"{a:016x}", f"{b:016x}"

    async def scenario():
        out = {}
        async with run_server(cfg) as gw:
            creds = Credentials(state.root, gw.address)
            old = await creds.band(a)
            new_private = new_key()
            async with channel(gw.address, old.credentials()) as ch:
                stream = Uploader(ch, a)
                out["a0"] = await stream.send(batches[0])
                out["renewed"] = await renew(ch, new_private, Identity.device(a))  # the same connection
                out["a1"] = await stream.send(batches[1])
                out["for_b"] = await renew(ch, new_key(), Identity.device(b))
                out["a2"] = await stream.send(batches[2])
                out["a_close"] = await stream.close()
            reply = out["renewed"][0]
            assert reply is not None, out["renewed"]
            renewed = ClientIdentity(reply.certificate_pem, key_pem(new_private), reply.ca_pem)
            out["new_cert_upload"] = await upload_once(gw.address, renewed.credentials(), a, batches[3])

            # a consumer holding a token: authenticated on the token listener, but no certificate to renew
            token_reply, code, details = await admin_call(
                creds,
                "Register",
                admin_pb2.RegisterRequest(kind="consumer", name="backend", issue_token=True),
            )
            assert code == grpc.StatusCode.OK, details
            token_creds = grpc.composite_channel_credentials(
                grpc.ssl_channel_credentials(state.ca_cert.read_bytes()),
                grpc.access_token_call_credentials(token_reply.token),
            )
            async with channel(gw.token_address, token_creds) as ch:
                out["whoami"] = await admin_pb2_grpc.IdentityServiceStub(ch).WhoAmI(admin_pb2.WhoAmIRequest())
                out["token_renew"] = await renew(ch, new_key(), Identity("consumer", "backend"))
            out["devices"] = await listed(creds, "device")
            out["consumers"] = await listed(creds, "consumer")
        out["old"] = old
        return out

    out = run(scenario())
    assert [out[k].code for k in ("a0", "a1", "a2")] == [OK, OK, OK]  # the live stream never noticed
    assert out["a_close"] == grpc.StatusCode.OK
    reply, code, details = out["renewed"]
    assert code == grpc.StatusCode.OK, details
    old_info, new_info = cert_info(out["old"].cert_pem), cert_info(reply.certificate_pem)
    assert new_info.identity == old_info.identity == Identity.device(a)
    assert new_info.serial != old_info.serial and reply.serial == f"{new_info.serial:x}"
    assert {(c.serial, c.state) for c in out["devices"][a_name].credentials} == {
        (f"{old_info.serial:x}", "active"),
        (f"{new_info.serial:x}", "active"),
    }
    ack, code, details = out["new_cert_upload"]
    assert ack is not None and ack.code == OK and code == grpc.StatusCode.OK, details

    _, code, details = out["for_b"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"CSR refused: the CSR asks for device:{b_name}, not device:{a_name}; refused"
    assert b_name not in out["devices"]

    assert (out["whoami"].kind, out["whoami"].name) == ("consumer", "backend")  # the token works
    _, code, details = out["token_renew"]
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "certificates" in details, details
    assert [c.id.partition(":")[0] for c in out["consumers"]["backend"].credentials] == ["token"]
    assert same_records(stored(cfg.store), processed(batches[:4]))


def test_revoking_the_old_credential_refuses_it_and_leaves_the_renewed_one(tmp_path):
    cfg = tls_config(tmp_path)
    state = LocalState.at(tmp_path / "state")
    a, batches = band(seed=7)
    a_name = f"{a:016x}"

    async def scenario():
        out = {}
        async with run_server(cfg) as gw:
            creds = Credentials(state.root, gw.address)
            old = await creds.band(a)
            new_private = new_key()
            async with channel(gw.address, old.credentials()) as ch:
                stream = Uploader(ch, a)
                out["a0"] = await stream.send(batches[0])
                reply, code, details = await renew(ch, new_private, Identity.device(a))
                assert code == grpc.StatusCode.OK, details
                old_id = "x509:" + cert_info(old.cert_pem).fingerprint
                out["revoked"] = await admin_call(
                    creds, "Revoke", admin_pb2.RevokeRequest(credential_id=old_id)
                )
                out["stream_after"] = await ended(stream)  # its credential is gone: so is the stream
            renewed = ClientIdentity(reply.certificate_pem, key_pem(new_private), reply.ca_pem)
            out["old_again"] = await upload_once(gw.address, old.credentials(), a, batches[1])
            out["new"] = await upload_once(gw.address, renewed.credentials(), a, batches[1])
            out["ids"] = old_id, reply.credential_id
        return out

    out = run(scenario())
    assert out["a0"].code == OK
    principal, code, details = out["revoked"]
    assert code == grpc.StatusCode.OK, details
    old_id, new_id = out["ids"]
    assert principal.state == "active"  # the band, not just its credential
    assert {c.id: c.state for c in principal.credentials} == {old_id: "revoked", new_id: "active"}
    code, details = out["stream_after"]
    assert code == grpc.StatusCode.PERMISSION_DENIED and details == (
        f"this credential of device {a_name} is revoked"
    ), details
    ack, code, details = out["old_again"]
    assert ack is None and code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
    assert details == f"this credential of device {a_name} is revoked"
    ack, code, details = out["new"]
    assert ack is not None and ack.code == OK and code == grpc.StatusCode.OK, details  # not a duplicate
    assert same_records(stored(cfg.store), processed(batches[:2]))
