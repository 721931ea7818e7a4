"""The server certificate and the CA bundle reload from their files without a restart, and an open stream
survives both: new connections see the new server certificate, a band whose certificate only the new CA
signed is refused at the handshake before the bundle names that CA and accepted after, and the stream that
was open all along keeps getting its acks.

The state dir's `ca.pem` is both the trusted bundle and the certificate of the CA key the gateway signs
with; the gateway reads its signing CA at start only, from the first certificate in the file, so a bundle
that keeps the signing CA first goes on signing and survives a restart (the second test).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bandgate.v1 import admin_pb2, admin_pb2_grpc
from gateway.pipeline import OK
from gateway.security.client import ClientIdentity
from gateway.security.pki import (
    CertificateAuthority,
    Identity,
    LocalState,
    cert_info,
    write_cert_and_key,
    write_public,
)
from gateway.server import run_server
from tests.gateway.gatewaykit import Credentials, Uploader, band, processed, same_records, stored, tls_config


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))  # a hang bound, not a speed check


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def presented(address: str, state: LocalState, client: bool = True) -> bytes:
    """The DER certificate a listener presents on a new connection to a Python `ssl` client that verifies
    it against the state dir's CA (and presents the operator certificate on the mutual-TLS listener)."""
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(state.ca_cert))
    if client:
        ctx.load_cert_chain(state.operator_cert, state.operator_key)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def channel(address: str, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    # A connection of its own: a failed or older one another channel made must not be reused.
    return grpc.aio.secure_channel(address, credentials, options=[("grpc.use_local_subchannel_pool", 1)])


async def upload_once(address: str, credentials: grpc.ChannelCredentials, device: int, batch):
    """One batch on a new connection: (ack or None, status code, details)."""
    async with channel(address, credentials) as ch:
        up = Uploader(ch, device)
        ack = None
        with contextlib.suppress(grpc.aio.AioRpcError, AssertionError):
            ack = await up.send(batch)
            await up.call.done_writing()
        return ack, await up.call.code(), await up.call.details()


async def register_certificate(creds: Credentials, identity: Identity, cert_pem: bytes) -> None:
    """Register a device with a certificate issued elsewhere, as an operator does for a new CA's bands."""
    async with creds.channel("operator") as ch:
        await admin_pb2_grpc.AdminServiceStub(ch).Register(
            admin_pb2.RegisterRequest(kind="device", name=identity.name, certificate_pem=cert_pem)
        )


def test_server_certificate_and_ca_bundle_reload_without_a_restart_or_a_dropped_stream(tmp_path):
    cfg = tls_config(tmp_path)
    state = LocalState.at(tmp_path / "state")
    a, a_batches = band(seed=7)  # streams across both reloads
    b, b_batches = band(seed=8)  # an old-CA band connecting after each reload
    c, c_batches = band(seed=9)  # a band of the new CA
    (tmp_path / "ca2").mkdir()
    new_ca = CertificateAuthority.create(
        tmp_path / "ca2" / "ca.pem", tmp_path / "ca2" / "ca.key", common_name="bandgate fleet CA 2"
    )
    c_cert, c_key = new_ca.issue(Identity.device(c))

    async def scenario():
        out = {}
        async with run_server(cfg) as gw:
            creds = Credentials(state.root, gw.address)
            b_creds = (await creds.band(b)).credentials()
            async with await creds.band_channel(a) as a_channel:
                stream = Uploader(a_channel, a)
                out["a0"] = await stream.send(a_batches[0])

                # (a) a new server certificate and key from the same CA, written as an operator would
                old_cert = state.server_cert.read_bytes()
                out["before"] = await asyncio.to_thread(presented, gw.address, state)
                out["token_before"] = await asyncio.to_thread(presented, gw.token_address, state, False)
                ca = CertificateAuthority.load(state.ca_cert, state.ca_key)
                new_cert, new_key = ca.issue_server(["localhost", "127.0.0.1", "::1"])
                write_cert_and_key(state.server_cert, new_cert, state.server_key, new_key)
                out["after"] = await asyncio.to_thread(presented, gw.address, state)
                out["token_after"] = await asyncio.to_thread(presented, gw.token_address, state, False)
                out["server_certs"] = der(old_cert), der(new_cert)
                out["b0"] = await upload_once(gw.address, b_creds, b, b_batches[0])
                out["a1"] = await stream.send(a_batches[1])

                # (b) a second CA: its band is registered, but refused at the handshake until trusted
                c_identity = ClientIdentity(c_cert, c_key, state.ca_cert.read_bytes())
                await register_certificate(creds, Identity.device(c), c_cert)
                refused_before = gw.metrics.registry.get_sample_value(
                    "bandgate_auth_refused_total", {"code": "PERMISSION_DENIED"}
                )
                out["c_untrusted"] = await upload_once(gw.address, c_identity.credentials(), c, c_batches[0])
                old_ca = state.ca_cert.read_bytes()
                write_public(state.ca_cert, old_ca + new_ca.cert_pem)  # the bundle: old CA first, then new
                out["c_trusted"] = await upload_once(gw.address, c_identity.credentials(), c, c_batches[0])
                out["b1"] = await upload_once(gw.address, b_creds, b, b_batches[1])
                out["a2"] = await stream.send(a_batches[2])
                out["a_close"] = await stream.close()
                out["refused"] = (
                    refused_before,
                    gw.metrics.registry.get_sample_value(
                        "bandgate_auth_refused_total", {"code": "PERMISSION_DENIED"}
                    ),
                )
        return out

    out = run(scenario())
    old_der, new_der = out["server_certs"]
    assert old_der != new_der
    assert out["before"] == out["token_before"] == old_der
    assert out["after"] == out["token_after"] == new_der  # both listeners, on the next handshake
    # the stream opened before both reloads was never dropped
    assert [out[k].code for k in ("a0", "a1", "a2")] == [OK, OK, OK]
    assert out["a_close"] == grpc.StatusCode.OK
    for k in ("b0", "b1", "c_trusted"):
        ack, code, details = out[k]
        assert ack is not None and ack.code == OK and code == grpc.StatusCode.OK, (k, code, details)
    ack, code, details = out["c_untrusted"]
    assert ack is None and code == grpc.StatusCode.UNAVAILABLE, (code, details)  # the handshake, not Python
    assert out["refused"][0] == out["refused"][1]
    assert same_records(
        stored(cfg.store), processed(a_batches[:3]) + processed(b_batches[:2]) + processed(c_batches[:1])
    )


def test_after_a_ca_rotation_the_gateway_still_signs_and_restarts_trusting_both_cas(tmp_path):
    """A bundle keeps the signing CA first: enrolment signs with it as before, and a restart loads it as
    the CA (ca.key) while trusting both."""
    cfg = tls_config(tmp_path)
    state = LocalState.at(tmp_path / "state")
    c, c_batches = band(seed=9)  # the new CA's band
    d, d_batches = band(seed=10)  # enrolled after the rotation, signed by the gateway's CA
    (tmp_path / "ca2").mkdir()
    new_ca = CertificateAuthority.create(
        tmp_path / "ca2" / "ca.pem", tmp_path / "ca2" / "ca.key", common_name="bandgate fleet CA 2"
    )
    c_cert, c_key = new_ca.issue(Identity.device(c))

    async def scenario():
        out = {}
        async with run_server(cfg) as gw:
            creds = Credentials(state.root, gw.address)
            old_ca = state.ca_cert.read_bytes()
            write_public(state.ca_cert, old_ca + new_ca.cert_pem)
            await register_certificate(creds, Identity.device(c), c_cert)
            d_identity = await creds.band(d)  # signed after the rotation
            out["d_issuer"] = cert_info(d_identity.cert_pem).issuer
            out["ca_pem"] = d_identity.ca_pem, old_ca + new_ca.cert_pem
            out["d0"] = await upload_once(gw.address, d_identity.credentials(), d, d_batches[0])
        async with run_server(cfg) as gw:
            c_identity = ClientIdentity(c_cert, c_key, state.ca_cert.read_bytes())
            out["c0"] = await upload_once(gw.address, c_identity.credentials(), c, c_batches[0])
            out["d1"] = await upload_once(gw.address, d_identity.credentials(), d, d_batches[1])
            out["signing_ca"] = gw.security.ca.certificate.subject.rfc4514_string()
        return out

    out = run(scenario())
    assert out["d_issuer"] == out["signing_ca"] == "CN=bandgate development CA"  # the state dir's own CA
    got, bundle = out["ca_pem"]
    assert got == bundle  # enrolment hands the band the whole bundle it may meet
    for k in ("d0", "c0", "d1"):
        ack, code, details = out[k]
        assert ack is not None and ack.code == OK and code == grpc.StatusCode.OK, (k, code, details)
    assert same_records(stored(cfg.store), processed(c_batches[:1]) + processed(d_batches[:2]))
