"""TLS handshake failures never reach Python: no client certificate, one from a foreign CA, an expired one
from the gateway's own CA, a plaintext client, or TLS below 1.2 fail at the handshake (UNAVAILABLE at the
client), so no refusal is counted, nothing is registered and nothing is stored, while an enrolled band on
the same gateway streams. The bearer-token listener presents the same server certificate, asks for no
client certificate, and refuses a call without a token in Python (which the refusal counter shows).

Every attacker's device is registered, so if its handshake got through, the registry would accept it: the
handshake is the only thing between it and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bandgate.v1 import admin_pb2, admin_pb2_grpc, features_pb2, features_pb2_grpc
from gateway.pipeline import OK
from gateway.security.client import local_identity
from gateway.security.pki import CertificateAuthority, Identity, LocalState, key_pem, new_key
from gateway.server import Gateway, run_server
from gateway.store import open_store
from tests.gateway.gatewaykit import Credentials, Uploader, band, processed, stored, tls_config

LOCAL_CONSUMER = Identity("consumer", "local")  # holds subscribe on every family


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))  # a hang bound, not a speed check


def counted(gw: Gateway, metric: str) -> float:
    """The sum of a counter's samples over all its labels (e.g. bandgate_auth_refused_total)."""
    return sum(
        sample.value
        for family in gw.metrics.registry.collect()
        for sample in family.samples
        if sample.name == metric
    )


def refusals(gw: Gateway) -> float:
    """Every call Python refused or throttled: what a handshake failure must never add to."""
    return counted(gw, "bandgate_auth_refused_total") + counted(gw, "bandgate_auth_throttled_total")


def expired_certificate(state: LocalState, identity: Identity) -> tuple[bytes, bytes]:
    """A client certificate and key signed by the gateway's own CA that expired yesterday (built here,
    since the CA refuses to issue one)."""
    ca_cert = x509.load_pem_x509_certificate(state.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(state.ca_key.read_bytes(), password=None)
    key = new_key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.label)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    # A subchannel of its own: a connection another test channel made must never be reused here.
    options = [("grpc.use_local_subchannel_pool", 1)]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)


async def upload_attempt(address, credentials, device: int, batch) -> tuple[grpc.StatusCode, str]:
    async with channel(address, credentials) as ch:
        up = Uploader(ch, device)
        with contextlib.suppress(grpc.aio.AioRpcError, AssertionError):  # the status says what happened
            await up.send(batch)
        return await up.call.code(), await up.call.details()


async def subscribe_attempt(address, credentials) -> tuple[grpc.StatusCode, str, int]:
    """A Subscribe that reads what is stored and ends: its status, details and how many records came."""
    async with channel(address, credentials) as ch:
        request = features_pb2.SubscribeRequest(no_follow=True)
        call = features_pb2_grpc.FeatureServiceStub(ch).Subscribe(request)
        records = 0
        try:
            async for _ in call:
                records += 1
        except grpc.aio.AioRpcError:
            pass
        return await call.code(), await call.details(), records


def high_water(url: str, device_id: int) -> int | None:
    with open_store(url) as store:
        row = store.device(device_id)
    return None if row is None else row.last_seq


def test_no_foreign_or_expired_client_certificate_and_plaintext_fail_at_the_handshake(tmp_path):
    cfg = tls_config(tmp_path)
    device, batches = band()
    state = LocalState.at(tmp_path / "state")
    (tmp_path / "foreign").mkdir()
    foreign_ca = CertificateAuthority.create(tmp_path / "foreign" / "ca.pem", tmp_path / "foreign" / "ca.key")

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(state.root, gw.address)
            enrolled = await creds.band(device)  # registered: only the handshake stands in the way
            ca_pem = state.ca_cert.read_bytes()  # every attacker trusts the gateway's certificate

            def mtls(cert_and_key: tuple[bytes, bytes]) -> grpc.ChannelCredentials:
                cert, key = cert_and_key
                return grpc.ssl_channel_credentials(ca_pem, key, cert)

            async with channel(gw.address, enrolled.credentials()) as ch:
                up = Uploader(ch, device)
                first = await up.send(batches[0])
                assert await up.close() == grpc.StatusCode.OK

            attackers = {
                "no client certificate": (
                    grpc.ssl_channel_credentials(ca_pem),
                    grpc.ssl_channel_credentials(ca_pem),
                ),
                "foreign CA": (
                    mtls(foreign_ca.issue(Identity.device(device))),
                    mtls(foreign_ca.issue(LOCAL_CONSUMER)),
                ),
                "expired, our CA": (
                    mtls(expired_certificate(state, Identity.device(device))),
                    mtls(expired_certificate(state, LOCAL_CONSUMER)),
                ),
                "plaintext": (None, None),
            }
            outcomes = {}
            for name, (band_creds, consumer_creds) in attackers.items():
                outcomes[name] = (
                    await upload_attempt(gw.address, band_creds, device, batches[1]),
                    await subscribe_attempt(gw.address, consumer_creds),
                )
            refused_by_python = refusals(gw)
            async with creds.channel("operator") as ch:
                listed = await admin_pb2_grpc.AdminServiceStub(ch).List(admin_pb2.ListRequest(kind="device"))

            # the same batch the attackers sent, from the enrolled band: storable, and the data is there
            async with channel(gw.address, enrolled.credentials()) as ch:
                up = Uploader(ch, device)
                second = await up.send(batches[1])
                assert await up.close() == grpc.StatusCode.OK
            valid_subscribe = await subscribe_attempt(
                gw.address, local_identity("consumer", state.root).credentials()
            )
            return first, outcomes, refused_by_python, listed, second, valid_subscribe

    first, outcomes, refused_by_python, listed, second, valid_subscribe = run(scenario())
    for name, ((up_code, up_details), (sub_code, sub_details, records)) in outcomes.items():
        assert up_code == grpc.StatusCode.UNAVAILABLE, (name, up_code, up_details)
        assert sub_code == grpc.StatusCode.UNAVAILABLE and records == 0, (name, sub_code, sub_details)
    assert refused_by_python == 0  # no attempt reached an authenticator
    # nothing of the attackers was registered (a certificate that reached Python would be recorded)
    (principal,) = listed.principals
    assert principal.name == f"{device:016x}" and len(principal.credentials) == 1
    assert first.code == OK and second.code == OK
    assert high_water(cfg.store, device) == batches[1].last_seq
    assert stored(cfg.store) == processed(batches[:2])
    code, details, records = valid_subscribe
    assert code == grpc.StatusCode.OK and records == len(processed(batches[:2])) > 0, details


def server_certificate(address: str, ca: Path, client: tuple[Path, Path] | None = None, **versions) -> bytes:
    """The DER certificate a listener presents to a Python `ssl` client that verifies it against `ca` (and
    presents `client` when given); `versions`: minimum_version / maximum_version for the context."""
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for name, version in versions.items():
        setattr(ctx, name, version)
    ctx.load_verify_locations(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(*client)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def der(pem_path: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_token_listener_presents_the_server_certificate_and_refuses_a_call_without_a_token(tmp_path):
    cfg = tls_config(tmp_path)
    device, batches = band()
    state = LocalState.at(tmp_path / "state")

    async def scenario():
        async with run_server(cfg) as gw:
            assert gw.token_address and gw.token_address != gw.address
            # no client certificate asked for on the token listener; the server proves itself on both
            on_token = await asyncio.to_thread(server_certificate, gw.token_address, state.ca_cert)
            on_mtls = await asyncio.to_thread(
                server_certificate, gw.address, state.ca_cert, (state.operator_cert, state.operator_key)
            )
            before = refusals(gw)
            tls_only = grpc.ssl_channel_credentials(state.ca_cert.read_bytes())
            upload = await upload_attempt(gw.token_address, tls_only, device, batches[0])
            subscribe = await subscribe_attempt(gw.token_address, tls_only)
            unauthenticated = gw.metrics.registry.get_sample_value(
                "bandgate_auth_refused_total", {"code": "UNAUTHENTICATED"}
            )
            plaintext = await upload_attempt(gw.token_address, None, device, batches[0])
            after_plaintext = refusals(gw)
            return on_token, on_mtls, before, upload, subscribe, unauthenticated, plaintext, after_plaintext

    (on_token, on_mtls, before, upload, subscribe, unauthenticated, plaintext, after_plaintext) = run(
        scenario()
    )
    assert on_token == on_mtls == der(state.server_cert)
    assert before == 0
    assert upload[0] == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in upload[1], upload
    assert subscribe[0] == grpc.StatusCode.UNAUTHENTICATED and subscribe[2] == 0, subscribe
    assert unauthenticated == 2  # these did reach Python, and the counter shows it
    assert plaintext[0] == grpc.StatusCode.UNAVAILABLE, plaintext
    assert after_plaintext == 2  # the plaintext client did not
    assert stored(cfg.store) == []


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_below_1_2_fails_at_the_handshake(tmp_path):
    if not ssl.HAS_TLSv1_1:
        pytest.skip("this Python's OpenSSL cannot offer TLS 1.1 at all")
    cfg = tls_config(tmp_path)
    state = LocalState.at(tmp_path / "state")
    operator = (state.operator_cert, state.operator_key)

    def tls_1_1(address: str):
        """The handshake a TLS 1.1-only client makes (SECLEVEL=0: OpenSSL 3 would not offer 1.1 otherwise)."""
        host, _, port = address.rpartition(":")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.load_verify_locations(cafile=str(state.ca_cert))
        ctx.load_cert_chain(*operator)
        try:
            with (
                socket.create_connection((host, int(port)), timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname=host) as tls,
            ):
                return tls.version()
        except (ssl.SSLError, ConnectionError) as e:
            return e

    def version(address: str, maximum: ssl.TLSVersion) -> str:
        host, _, port = address.rpartition(":")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.maximum_version = maximum
        ctx.load_verify_locations(cafile=str(state.ca_cert))
        ctx.load_cert_chain(*operator)
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            return tls.version()

    async def scenario():
        async with run_server(cfg) as gw:
            old = await asyncio.to_thread(tls_1_1, gw.address)
            old_token = await asyncio.to_thread(tls_1_1, gw.token_address)
            # the same client with 1.2 or 1.3 allowed gets through: the version is what was refused
            v12 = await asyncio.to_thread(version, gw.address, ssl.TLSVersion.TLSv1_2)
            v13 = await asyncio.to_thread(version, gw.address, ssl.TLSVersion.MAXIMUM_SUPPORTED)
            return old, old_token, v12, v13, refusals(gw)

    old, old_token, v12, v13, refused = run(scenario())
    for outcome in (old, old_token):
        if isinstance(outcome, ssl.SSLError) and outcome.reason == "NO_PROTOCOLS_AVAILABLE":
            pytest.skip(f"the local OpenSSL refuses to offer TLS 1.1: {outcome}")
        assert isinstance(outcome, ssl.SSLError | ConnectionError), f"TLS 1.1 was accepted: {outcome}"
    assert v12 == "TLSv1.2" and v13 in ("TLSv1.2", "TLSv1.3")
    assert refused == 0
