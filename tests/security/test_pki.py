"""gateway/security/pki.py and pki_cli.py on real files, checked with `cryptography` and a real TLS handshake.

Every refusal a CA must make (a forged or widened CSR, a foreign key type, an ambiguous identity) is an
attack here, asserted as a PkiError; the handshake test proves the certificates work where they are used.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console

from gateway.security import pki
from gateway.security.pki import (
    CertificateAuthority,
    Identity,
    LocalState,
    PkiError,
    cert_info,
    client_identity_from_pem,
    default_state_dir,
    ensure_local_state,
    key_pem,
    make_csr,
    new_key,
    write_private,
    write_public,
)
from gateway.security.pki_cli import add_parser

DEVICE = Identity.device(0xFF)


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CertificateAuthority:
    root = tmp_path_factory.mktemp("ca")
    return CertificateAuthority.create(root / "ca.pem", root / "ca.key")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> CertificateAuthority:
    root = tmp_path_factory.mktemp("other-ca")
    return CertificateAuthority.create(root / "ca.pem", root / "ca.key", common_name="someone else's CA")


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _csr_pem_from_der(der: bytes) -> bytes:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    pem = "\n".join(["-----BEGIN CERTIFICATE REQUEST-----", *lines, "-----END CERTIFICATE REQUEST-----", ""])
    return pem.encode()


def _csr(key, uris: list[str], *, dns: list[str] = ()) -> bytes:
    names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --- identity ------------------------------------------------------------------------------------


def test_identity_uri_round_trip():
    assert DEVICE.uri == "bandgate:device:00000000000000ff"
    assert DEVICE.device_id == 0xFF
    assert Identity.parse(DEVICE.uri) == DEVICE
    relay = Identity.parse("bandgate:relay:phone-7.home_a")
    assert (relay.kind, relay.name) == ("relay", "phone-7.home_a")
    assert Identity.device((1 << 64) - 1).name == "f" * 16


@pytest.mark.parametrize(
    "uri",
    [
        "bandgate:device:00000000000000FF",  # upper-case hex: one device must have one spelling
        "bandgate:device:0000000000000ff",  # 15 digits
        "bandgate:device:000000000000000ff",  # 17 digits
        "bandgate:device:0x000000000000ff",
        "bandgate:admin:root",  # unknown kind
        "BANDGATE:device:00000000000000ff",
        "bandgate:relay:Relay",
        "bandgate:relay:-relay",
        "bandgate:relay:" + "r" * 64,
        "bandgate:relay:",
        "bandgate:consumer:a:b",
        "bandgate:consumer:a b",
        "bandgate:device:00000000000000ff\n",
        " bandgate:device:00000000000000ff",
        "urn:bandgate:device:00000000000000ff",
        "bandgate:device",
        "",
    ],
)
def test_identity_parse_refuses_malformed(uri):
    with pytest.raises(PkiError):
        Identity.parse(uri)


def test_identity_device_range_and_device_id_only_for_devices():
    for bad in (-1, 1 << 64, True, "ff"):
        with pytest.raises(PkiError):
            Identity.device(bad)
    with pytest.raises(PkiError):
        _ = Identity("consumer", "local").device_id


# --- issuing -------------------------------------------------------------------------------------


def test_issued_client_cert_verifies_against_ca_and_carries_identity(ca, other_ca):
    before = datetime.now(UTC)
    cert_pem, key = ca.issue(DEVICE, days=30)
    cert = _cert(cert_pem)
    cert.verify_directly_issued_by(_cert(ca.cert_pem))
    with pytest.raises(Exception):  # noqa: B017 - InvalidSignature or ValueError: any refusal will do
        cert.verify_directly_issued_by(_cert(other_ca.cert_pem))

    assert client_identity_from_pem(cert_pem) == DEVICE
    info = cert_info(cert_pem)
    assert info.identity == DEVICE
    assert info.serial == cert.serial_number
    assert info.fingerprint == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert info.subject == "CN=device:00000000000000ff"
    assert info.issuer == "CN=bandgate development CA"
    assert timedelta(minutes=4) < before - info.not_before < timedelta(minutes=6)  # back-dated for skew
    assert timedelta(days=29) < info.not_after - before <= timedelta(days=30)

    ext = cert.extensions
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == [DEVICE.uri]
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    ext.get_extension_for_class(x509.AuthorityKeyIdentifier)

    private = serialization.load_pem_private_key(key, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1)
    assert private.public_key() == cert.public_key()


def test_ca_certificate_constraints(ca):
    cert = _cert(ca.cert_pem)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert cert_info(ca.cert_pem).identity is None
    assert "bandgate development CA" in repr(ca) and "PRIVATE" not in repr(ca)


def test_server_cert_names_hosts_and_has_no_identity(ca):
    cert_pem, _ = ca.issue_server(["GW.example.com.", "10.0.0.5", "[::1]", "gw.example.com"])
    cert = _cert(cert_pem)
    cert.verify_directly_issued_by(_cert(ca.cert_pem))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    assert cert.subject.rfc4514_string() == "CN=gw.example.com"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert_info(cert_pem).identity is None
    with pytest.raises(PkiError, match="no bandgate identity"):
        client_identity_from_pem(cert_pem)
    for bad in (["not a host"], ["under_score.example"], []):
        with pytest.raises(PkiError):
            ca.issue_server(bad)


# --- CSRs ----------------------------------------------------------------------------------------


def test_sign_csr_certifies_the_band_key_for_the_callers_identity_only(ca):
    key = new_key()
    cert = _cert(ca.sign_csr(make_csr(key, DEVICE), identity=DEVICE))
    cert.verify_directly_issued_by(_cert(ca.cert_pem))
    assert cert.public_key() == key.public_key()
    assert cert_info(cert.public_bytes(serialization.Encoding.PEM)).identity == DEVICE

    # A CSR without an identity gets the caller's; its other SANs are not copied.
    plain = _cert(ca.sign_csr(_csr(key, [], dns=["evil.example"]), identity=DEVICE))
    san = plain.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(DEVICE.uri)]
    assert plain.subject.rfc4514_string() == "CN=device:00000000000000ff"


@pytest.mark.parametrize(
    "uris",
    [
        ["bandgate:device:0000000000000100"],  # another band
        ["bandgate:consumer:operator"],  # a widening
        [DEVICE.uri, "bandgate:consumer:operator"],  # the right one, and more
        ["BANDGATE:consumer:operator"],  # a spelling another parser might accept
    ],
)
def test_sign_csr_refuses_identity_other_than_callers(ca, uris):
    with pytest.raises(PkiError):
        ca.sign_csr(_csr(new_key(), uris), identity=DEVICE)


def test_sign_csr_refuses_a_bad_signature(ca):
    der = x509.load_pem_x509_csr(make_csr(new_key(), DEVICE)).public_bytes(serialization.Encoding.DER)
    tampered = der[:-1] + bytes([der[-1] ^ 0x01])  # the last byte of the signature's s
    with pytest.raises(PkiError, match="signature"):
        ca.sign_csr(_csr_pem_from_der(tampered), identity=DEVICE)


def test_sign_csr_refuses_a_key_swapped_in_without_its_private_half(ca):
    """Proof of possession: a CSR signed by one key but naming another must not certify the other."""
    signer, victim = new_key(), new_key()
    der = x509.load_pem_x509_csr(make_csr(signer, DEVICE)).public_bytes(serialization.Encoding.DER)
    spki_format = serialization.PublicFormat.SubjectPublicKeyInfo
    spki = [k.public_key().public_bytes(serialization.Encoding.DER, spki_format) for k in (signer, victim)]
    assert der.count(spki[0]) == 1 and len(spki[0]) == len(spki[1])
    with pytest.raises(PkiError, match="signature"):
        ca.sign_csr(_csr_pem_from_der(der.replace(spki[0], spki[1])), identity=DEVICE)


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["rsa", "p384"],
)
def test_sign_csr_refuses_keys_other_than_p256(ca, make_key):
    with pytest.raises(PkiError, match="P-256"):
        ca.sign_csr(_csr(make_key(), [DEVICE.uri]), identity=DEVICE)


def test_sign_csr_refuses_garbage_and_private_keys(ca):
    with pytest.raises(PkiError):
        ca.sign_csr(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", identity=DEVICE
        )
    secret = key_pem(new_key())
    with pytest.raises(PkiError) as refused:
        ca.sign_csr(secret, identity=DEVICE)
    assert secret.decode().splitlines()[1] not in str(refused.value)


# --- reading certificates ------------------------------------------------------------------------


def test_cert_info_refuses_keys_garbage_and_ambiguous_identity():
    secret = key_pem(new_key())
    with pytest.raises(PkiError, match="private key") as refused:
        cert_info(secret)
    assert secret.decode().splitlines()[1] not in str(refused.value)
    for junk in (b"", b"hello", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "é"):
        with pytest.raises(PkiError):
            cert_info(junk)

    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "two")])
    now = datetime.now(UTC)
    two = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(DEVICE.uri),
                    x509.UniformResourceIdentifier("bandgate:relay:r"),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(PkiError, match="2 bandgate identities"):
        client_identity_from_pem(two)


# --- CA files ------------------------------------------------------------------------------------


def test_ca_load_round_trip_and_refusals(tmp_path, ca, other_ca):
    created = CertificateAuthority.create(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert _mode(tmp_path / "ca.key") == 0o600
    loaded = CertificateAuthority.load(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert loaded.cert_pem == created.cert_pem
    _cert(loaded.issue(DEVICE)[0]).verify_directly_issued_by(_cert(created.cert_pem))

    with pytest.raises(PkiError, match="already exists"):  # a new CA never replaces one
        CertificateAuthority.create(tmp_path / "ca.pem", tmp_path / "other.key")
    assert not (tmp_path / "other.key").exists()

    with pytest.raises(PkiError, match="does not exist"):
        CertificateAuthority.load(tmp_path / "missing.pem", tmp_path / "ca.key")
    (tmp_path / "foreign.key").write_bytes(key_pem(new_key()))
    with pytest.raises(PkiError, match="is not the key of"):
        CertificateAuthority.load(tmp_path / "ca.pem", tmp_path / "foreign.key")
    leaf, leaf_key = created.issue(DEVICE)
    (tmp_path / "leaf.pem").write_bytes(leaf)
    (tmp_path / "leaf.key").write_bytes(leaf_key)
    with pytest.raises(PkiError, match="not a CA"):
        CertificateAuthority.load(tmp_path / "leaf.pem", tmp_path / "leaf.key")


# --- files ---------------------------------------------------------------------------------------


def test_write_private_and_public_modes_atomic_and_no_overwrite(tmp_path):
    old_umask = os.umask(0o077)  # the umask must neither narrow a public file nor matter for a key
    try:
        write_private(tmp_path / "k", b"secret")
        write_public(tmp_path / "c", b"cert")
    finally:
        os.umask(old_umask)
    assert (_mode(tmp_path / "k"), _mode(tmp_path / "c")) == (0o600, 0o644)

    os.chmod(tmp_path / "k", 0o644)  # replacing a file gives the new one 0600 whatever the old was
    write_private(tmp_path / "k", b"second")
    assert (tmp_path / "k").read_bytes() == b"second" and _mode(tmp_path / "k") == 0o600

    with pytest.raises(PkiError, match="already exists"):
        write_private(tmp_path / "k", b"third", overwrite=False)
    assert (tmp_path / "k").read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "k"]  # no temporary files left behind


# --- local state ---------------------------------------------------------------------------------

_KEYS = ("ca_key", "server_key", "operator_key", "consumer_key", "audit_key")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _server_sans(state: LocalState) -> x509.SubjectAlternativeName:
    return (
        _cert(state.server_cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )


def test_ensure_local_state_creates_everything_once(tmp_path):
    root = tmp_path / "state" / "bandgate"
    state, created = ensure_local_state(root, [])
    assert len(created) == 6 and any("ca.pem, ca.key" in line for line in created)
    assert not any("BEGIN" in line for line in created)
    assert _mode(root) == 0o700
    for field in _KEYS:
        assert _mode(getattr(state, field)) == 0o600, field
    assert len(state.audit_key.read_bytes()) == 32
    assert not state.audit_head.exists()

    ca_cert = _cert(state.ca_cert.read_bytes())
    for cert_path, identity in (
        (state.operator_cert, Identity("consumer", "operator")),
        (state.consumer_cert, Identity("consumer", "local")),
        (state.server_cert, None),
    ):
        _cert(cert_path.read_bytes()).verify_directly_issued_by(ca_cert)
        assert cert_info(cert_path.read_bytes()).identity == identity
    san = _server_sans(state)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }

    before = _snapshot(root)
    again, created = ensure_local_state(root, ["localhost", "::1"])
    assert created == [] and again == state
    assert _snapshot(root) == before


def test_ensure_local_state_reissues_the_server_cert_for_a_new_host_only(tmp_path):
    state, _ = ensure_local_state(tmp_path, ["gw.example.com"])
    before = _snapshot(tmp_path)
    _, created = ensure_local_state(tmp_path, ["gw.example.com", "192.0.2.7"])
    assert created == [
        "server.pem, server.key: server certificate for localhost, 127.0.0.1, ::1, gw.example.com, 192.0.2.7 "
        "(re-issued: lacks 192.0.2.7)"
    ]
    after = _snapshot(tmp_path)
    assert {name for name in after if after[name] != before[name]} == {"server.pem", "server.key"}
    san = _server_sans(state)
    assert ipaddress.ip_address("192.0.2.7") in san.get_values_for_type(x509.IPAddress)
    assert "gw.example.com" in san.get_values_for_type(x509.DNSName)


def test_ensure_local_state_reissues_expiring_and_foreign_certs(tmp_path, other_ca):
    state, _ = ensure_local_state(tmp_path, [])
    ca = CertificateAuthority.load(state.ca_cert, state.ca_key)

    cert, key = ca.issue_server(["localhost", "127.0.0.1", "::1"], days=10)
    state.server_cert.write_bytes(cert)
    state.server_key.write_bytes(key)
    cert, key = other_ca.issue(Identity("consumer", "operator"))
    state.operator_cert.write_bytes(cert)
    state.operator_key.write_bytes(key)
    state.consumer_key.write_bytes(key_pem(new_key()))  # a key that is not the certificate's

    _, created = ensure_local_state(tmp_path, [])
    assert [line.split("(re-issued: ")[1].split(" ")[0] for line in created] == ["expires", "not", "key"]
    ca_cert = _cert(state.ca_cert.read_bytes())
    for cert_path in (state.server_cert, state.operator_cert, state.consumer_cert):
        _cert(cert_path.read_bytes()).verify_directly_issued_by(ca_cert)
    assert ensure_local_state(tmp_path, [])[1] == []


def test_ensure_local_state_all_addresses_means_this_machines_names(tmp_path, monkeypatch):
    monkeypatch.setattr(pki.socket, "gethostname", lambda: "Gateway-7")
    state, _ = ensure_local_state(tmp_path, ["0.0.0.0", "::"])
    san = _server_sans(state)
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gateway-7"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


def test_ensure_local_state_refuses_half_a_ca(tmp_path):
    state, _ = ensure_local_state(tmp_path, [])
    state.ca_key.unlink()
    with pytest.raises(PkiError, match=r"ca\.key does not;"):
        ensure_local_state(tmp_path, [])
    assert not state.ca_key.exists()  # not silently replaced by a new CA


def test_default_state_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BANDGATE_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_state_dir() == tmp_path / "home" / ".local" / "share" / "bandgate"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert default_state_dir() == tmp_path / "home" / ".local" / "share" / "bandgate"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "bandgate"
    monkeypatch.setenv("BANDGATE_STATE_DIR", str(tmp_path / "explicit"))
    assert default_state_dir() == tmp_path / "explicit"


# --- CLI -----------------------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["pki", *argv])
    return args.run(args, Console())


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_cli_init_then_nothing_to_create(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BANDGATE_STATE_DIR", str(tmp_path / "st"))  # --state-dir defaults to it
    assert _cli("init", "--host", "gw.example.com") == 0
    out = capsys.readouterr().out
    assert "ca.pem, ca.key" in out and "gw.example.com" in out and "BEGIN" not in out
    assert (tmp_path / "st" / "server.pem").exists()
    assert _cli("init", "--host", "gw.example.com") == 0
    assert "nothing to create" in capsys.readouterr().out


def test_cli_issue_devices_and_refuse_overwrite(tmp_path, capsys):
    st, out = tmp_path / "st", tmp_path / "out"
    out.mkdir()
    assert _cli("init", "--state-dir", str(st)) == 0
    capsys.readouterr()
    assert (
        _cli(
            "issue",
            "device",
            "00000000000000FF",
            "0000000000000100",
            "--state-dir",
            str(st),
            "--out-dir",
            str(out),
            "--days",
            "7",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "BEGIN" not in printed
    ca_cert = _cert((st / "ca.pem").read_bytes())
    for name, device_id in (("00000000000000ff", 0xFF), ("0000000000000100", 0x100)):
        cert_pem = (out / f"{name}.pem").read_bytes()
        _cert(cert_pem).verify_directly_issued_by(ca_cert)
        assert client_identity_from_pem(cert_pem).device_id == device_id
        assert _mode(out / f"{name}.key") == 0o600

    before = (out / "00000000000000ff.key").read_bytes()
    assert _cli("issue", "device", "00000000000000ff", "--state-dir", str(st), "--out-dir", str(out)) == 2
    assert "already exists" in _one_error_line(capsys)
    assert (out / "00000000000000ff.key").read_bytes() == before

    assert _cli("issue", "relay", "phone-1", "--state-dir", str(st), "--out-dir", str(out)) == 0
    assert cert_info((out / "phone-1.pem").read_bytes()).identity == Identity("relay", "phone-1")
    assert (
        _cli("issue", "server", "gw.example.com", "10.0.0.5", "--state-dir", str(st), "--out-dir", str(out))
        == 0
    )
    assert cert_info((out / "gw.example.com.pem").read_bytes()).subject == "CN=gw.example.com"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["issue", "device", "ff"], "16 hex digits"),
        (["issue", "device", "0x00000000000000ff"], "16 hex digits"),
        (["issue", "consumer", "Bad Name"], "consumer name"),
    ],
)
def test_cli_issue_refuses_bad_names(tmp_path, capsys, argv, expected):
    assert _cli("init", "--state-dir", str(tmp_path)) == 0
    capsys.readouterr()
    assert _cli(*argv, "--state-dir", str(tmp_path), "--out-dir", str(tmp_path)) == 2
    line = _one_error_line(capsys)
    assert line.startswith("pki issue: ") and expected in line


def test_cli_without_a_ca_fails_in_one_line(tmp_path, capsys):
    none = str(tmp_path / "none")
    assert _cli("issue", "relay", "r1", "--state-dir", none, "--out-dir", str(tmp_path)) == 2
    assert "pki init" in _one_error_line(capsys)
    assert not (tmp_path / "none").exists()


def test_cli_sign_csr_to_file_and_stdout_and_refuse_mismatch(tmp_path, capsys):
    st = tmp_path / "st"
    assert _cli("init", "--state-dir", str(st)) == 0
    key = new_key()
    (tmp_path / "band.csr").write_bytes(make_csr(key, DEVICE))
    capsys.readouterr()

    common = ["sign", str(tmp_path / "band.csr"), "--kind", "device", "--state-dir", str(st)]
    assert _cli(*common, "--name", "00000000000000ff", "--out", str(tmp_path / "band.pem")) == 0
    cert = _cert((tmp_path / "band.pem").read_bytes())
    cert.verify_directly_issued_by(_cert((st / "ca.pem").read_bytes()))
    assert cert.public_key() == key.public_key()
    capsys.readouterr()

    assert _cli(*common, "--name", "00000000000000ff") == 0
    assert cert_info(capsys.readouterr().out).identity == DEVICE

    assert _cli(*common, "--name", "0000000000000100", "--out", str(tmp_path / "other.pem")) == 2
    assert "asks for device:00000000000000ff" in _one_error_line(capsys)
    assert not (tmp_path / "other.pem").exists()


def test_cli_show_prints_a_cert_and_refuses_a_key(tmp_path, capsys, ca):
    cert_pem, key = ca.issue(DEVICE)
    (tmp_path / "d.pem").write_bytes(cert_pem)
    (tmp_path / "d.key").write_bytes(key)
    assert _cli("show", str(tmp_path / "d.pem")) == 0
    out = capsys.readouterr().out
    info = cert_info(cert_pem)
    assert "00000000000000ff" in out and info.fingerprint in out and f"{info.serial:x}" in out
    assert "CN=bandgate development CA" in out

    assert _cli("show", str(tmp_path / "d.key")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "private key" in captured.err and len(captured.err.splitlines()) == 1
    assert all(line not in captured.err for line in key.decode().splitlines()[1:-1])


# --- TLS -----------------------------------------------------------------------------------------


def _handshake(
    tmp_path: Path,
    ca_pem: bytes,
    server: tuple[bytes, bytes],
    client: tuple[bytes, bytes],
    server_hostname: str = "localhost",
):
    """One mutual-TLS connection over loopback; returns (server peer DER or error, client reply or error)."""
    files = {}
    for label, data in (
        ("ca.pem", ca_pem),
        ("s.pem", server[0]),
        ("s.key", server[1]),
        ("c.pem", client[0]),
        ("c.key", client[1]),
    ):
        files[label] = tmp_path / label
        files[label].write_bytes(data)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files["ca.pem"]))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(files["s.pem"], files["s.key"])
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files["ca.pem"]))
    assert client_ctx.verify_mode == ssl.CERT_REQUIRED and client_ctx.check_hostname
    client_ctx.load_cert_chain(files["c.pem"], files["c.key"])

    server_result: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    server_result["peer"] = tls.getpeercert(binary_form=True)
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as e:
                server_result["error"] = e

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                client_result: object = tls.recv(2)
        except (ssl.SSLError, OSError) as e:
            client_result = e
        thread.join(10)
    assert not thread.is_alive()
    return server_result, client_result


def test_tls_handshake_with_this_cas_certs_and_refusal_of_another_cas(tmp_path, ca, other_ca):
    server = ca.issue_server(["localhost", "127.0.0.1"])
    for hostname in ("localhost", "127.0.0.1"):
        server_result, client_result = _handshake(tmp_path, ca.cert_pem, server, ca.issue(DEVICE), hostname)
        assert client_result == b"ok", client_result
        peer_pem = ssl.DER_cert_to_PEM_cert(server_result["peer"]).encode()
        assert client_identity_from_pem(peer_pem) == DEVICE  # what the gateway will do with the peer

    server_result, client_result = _handshake(tmp_path, ca.cert_pem, server, other_ca.issue(DEVICE))
    assert "peer" not in server_result
    assert isinstance(server_result["error"], ssl.SSLError)
    assert "certificate verify failed" in str(server_result["error"]).lower()
    assert client_result != b"ok"


def test_tls_refuses_a_server_cert_presented_as_a_client_cert(tmp_path, ca):
    """The EKU matters: a stolen server certificate does not authenticate a client."""
    server = ca.issue_server(["localhost"])
    server_result, client_result = _handshake(tmp_path, ca.cert_pem, server, ca.issue_server(["localhost"]))
    assert "peer" not in server_result and isinstance(server_result["error"], ssl.SSLError)
    assert client_result != b"ok"
