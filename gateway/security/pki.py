"""Certificates for mutual TLS: who a band, relay or consumer is, decided by the CA that signed it.

Identity lives in one place only, a URI SubjectAlternativeName `bandgate:<kind>:<name>`; the Subject CN
repeats it for people reading a certificate and is never trusted. Everything goes through the
`cryptography` package (ECDSA P-256, SHA-256); private keys are written 0600 and atomically, and never
appear in a message, a repr or a log.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "KINDS",
    "CertInfo",
    "CertificateAuthority",
    "Identity",
    "LocalState",
    "PkiError",
    "cert_info",
    "check_region",
    "client_identity_from_pem",
    "default_state_dir",
    "ensure_local_state",
    "key_pem",
    "make_csr",
    "new_key",
    "write_cert_and_key",
    "write_private",
    "write_public",
]

KINDS = ("device", "relay", "consumer")

URI_SCHEME = "bandgate"
# A band's or relay's home region (docs/deployment.md), a second URI SubjectAlternativeName
# `bandgate-region:<name>`, stamped by the CA of the region that enrolled it; never the identity.
REGION_SCHEME = "bandgate-region"
CLOCK_SKEW = timedelta(minutes=5)  # not_valid_before is back-dated so a band whose clock lags still accepts
RENEW_BEFORE = timedelta(days=30)  # ensure_local_state re-issues certificates this close to expiry
MAX_DAYS = 36500
AUDIT_KEY_BYTES = 32
MAX_PEM_BYTES = 1 << 20  # a certificate or CSR file larger than this is not one

_DEVICE_NAME = re.compile(r"[0-9a-f]{16}")
_PRINCIPAL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_REGION_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_UNSPECIFIED = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_SIGNATURE_HASH = hashes.SHA256()
_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


class PkiError(ValueError):
    """A certificate, key, CSR or name that cannot be used. The message is safe to show: it names files,
    identities and reasons, never key material."""


def _quote(text: str) -> str:
    """Untrusted text (from a certificate, CSR or command line) for a one-line message."""
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


# --- identity ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who a client certificate speaks for; checked on construction, so every Identity is well formed."""

    kind: str
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise PkiError(f"identity kind must be one of {', '.join(KINDS)}, not {_quote(str(self.kind))}")
        if not isinstance(self.name, str):
            raise PkiError("identity name must be text")
        if self.kind == "device":
            if not _DEVICE_NAME.fullmatch(self.name):
                raise PkiError(f"a device name is 16 lower-case hex digits, not {_quote(self.name)}")
        elif not _PRINCIPAL_NAME.fullmatch(self.name):
            raise PkiError(
                f"a {self.kind} name is 1-63 of a-z 0-9 . _ - (starting with a letter or digit), "
                f"not {_quote(self.name)}"
            )

    @property
    def uri(self) -> str:
        """The URI SubjectAlternativeName that carries this identity."""
        return f"{URI_SCHEME}:{self.kind}:{self.name}"

    @property
    def label(self) -> str:
        """`kind:name`, the informational Subject CN."""
        return f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """The identity in a `bandgate:<kind>:<name>` URI; other case, spaces or extra parts are refused."""
        if not isinstance(uri, str):
            raise PkiError("an identity URI must be text")
        scheme, sep, rest = uri.partition(":")
        kind, sep2, name = rest.partition(":")
        if scheme != URI_SCHEME or not sep or not sep2:
            raise PkiError(f"not a bandgate identity URI (bandgate:<kind>:<name>): {_quote(uri)}")
        return cls(kind, name)

    @classmethod
    def device(cls, device_id: int) -> Identity:
        """A band's identity from its 64-bit device ID."""
        if isinstance(device_id, bool) or not isinstance(device_id, int) or not 0 <= device_id < 1 << 64:
            raise PkiError("a device ID is an integer in [0, 2**64)")
        return cls("device", f"{device_id:016x}")

    @property
    def device_id(self) -> int:
        """The 64-bit device ID of a device identity (the pipeline's integer)."""
        if self.kind != "device":
            raise PkiError(f"{self.label} is not a device")
        return int(self.name, 16)


# --- reading certificates ------------------------------------------------------------------------


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says, for people and for the gateway; never anything secret."""

    identity: Identity | None
    serial: int
    fingerprint: str
    not_before: datetime
    not_after: datetime
    subject: str
    issuer: str
    region: str | None = None  # the home region it carries, if any


def check_region(name: str) -> str:
    """A region name as certificates and the configuration carry it: 1-32 of a-z 0-9 - (a letter first)."""
    if not isinstance(name, str) or not _REGION_NAME.fullmatch(name):
        raise PkiError(f"a region name is 1-32 of a-z 0-9 - starting with a letter, not {_quote(str(name))}")
    return name


def _pem_bytes(pem: bytes | str) -> bytes:
    if isinstance(pem, str):
        try:
            pem = pem.encode("ascii")
        except UnicodeEncodeError:
            raise PkiError("not a PEM file (non-ASCII text)") from None
    if not isinstance(pem, bytes):
        raise PkiError("PEM data must be bytes or text")
    if b"PRIVATE KEY-----" in pem:
        # Refused outright, so a key handed to a certificate reader is never parsed, echoed or logged.
        raise PkiError("this is a private key, not a certificate; private keys are never shown")
    return pem


def _load_cert(pem: bytes | str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_pem_bytes(pem))
    except ValueError as e:
        if isinstance(e, PkiError):
            raise
        raise PkiError("not a PEM certificate") from None


def _bandgate_uris(extensions: x509.Extensions) -> list[str]:
    """URI SANs whose scheme is bandgate in any case, so a `BANDGATE:` variant is refused, not ignored."""
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return [u for u in uris if u.partition(":")[0].lower() == URI_SCHEME]


def _extensions(obj: x509.Certificate | x509.CertificateSigningRequest) -> x509.Extensions:
    try:
        return obj.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise PkiError("malformed or duplicated extensions") from None


def _identity_of(obj: x509.Certificate | x509.CertificateSigningRequest) -> Identity | None:
    uris = _bandgate_uris(_extensions(obj))
    if len(uris) > 1:
        raise PkiError(f"{len(uris)} bandgate identities in one certificate; exactly one is allowed")
    return Identity.parse(uris[0]) if uris else None


def _region_of(obj: x509.Certificate | x509.CertificateSigningRequest) -> str | None:
    try:
        san = _extensions(obj).get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    regions = [u for u in uris if u.partition(":")[0].lower() == REGION_SCHEME]
    if len(regions) > 1:
        raise PkiError(f"{len(regions)} home regions in one certificate; at most one is allowed")
    if not regions:
        return None
    scheme, _, name = regions[0].partition(":")
    if scheme != REGION_SCHEME:
        raise PkiError(f"not a home region URI ({REGION_SCHEME}:<name>): {_quote(regions[0])}")
    return check_region(name)


def _info(cert: x509.Certificate) -> CertInfo:
    return CertInfo(
        region=_region_of(cert),
        identity=_identity_of(cert),
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
    )


def cert_info(pem: bytes | str) -> CertInfo:
    """What a PEM certificate says; PkiError for anything that is not one (including a private key)."""
    return _info(_load_cert(pem))


def client_identity_from_pem(pem: bytes) -> Identity:
    """The identity of a peer certificate TLS has already verified against the CA.

    Read only from the single bandgate URI SAN: a certificate with none (a server or CA certificate) or
    with several is refused, never guessed from the CN.
    """
    identity = cert_info(pem).identity
    if identity is None:
        raise PkiError("the certificate carries no bandgate identity")
    return identity


# --- keys and files ------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the file's 0600 mode is what protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _is_p256(public_key) -> bool:
    return isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path} does not exist") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):  # TypeError: an encrypted key
        raise PkiError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{path} is not an ECDSA P-256 key")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, identity: Identity) -> bytes:
    """A CSR PEM asking for `identity`, as a band makes it on the device (its key never leaves it)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.label)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), False)
        .sign(key, _SIGNATURE_HASH)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry, not only the file, must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a fresh temporary file beside `path` with exactly `mode`, synced; return its path."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # Created 0600 whatever the final mode, so a key is never readable by others, even for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, mode)  # exactly `mode`: a umask such as 077 must not turn a certificate 0600
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _commit(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Move a staged file into place: replace atomically, or (overwrite=False) only if `path` is absent."""
    try:
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # atomic create-if-absent, unlike exists() followed by replace()
        except FileExistsError:
            raise PkiError(f"{path} already exists; not overwriting it") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            if path.exists():  # a filesystem without hard links: best effort
                raise PkiError(f"{path} already exists; not overwriting it") from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_files(files: list[tuple[Path, bytes, int]], *, overwrite: bool) -> None:
    """Stage every file first, then rename them in turn, so a crash leaves whole files, never half of one.

    Without `overwrite`, either all files are created or none: a refusal removes what this call created.
    """
    staged: list[tuple[Path, Path]] = []
    committed: list[Path] = []
    try:
        for path, _, _ in files:
            if not overwrite and Path(path).exists():
                raise PkiError(f"{path} already exists; not overwriting it")
        for path, data, mode in files:
            path = Path(path)
            staged.append((_stage(path, data, mode), path))
        try:
            for tmp, path in staged:
                _commit(tmp, path, overwrite=overwrite)
                committed.append(path)
        except BaseException:
            if not overwrite:  # these names did not exist before this call: they are ours to remove
                for path in committed:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            raise
        for directory in {path.parent for _, path in staged}:
            _fsync_dir(directory)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_private(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write a secret atomically with mode 0600."""
    _write_files([(Path(path), data, 0o600)], overwrite=overwrite)


def write_public(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write a certificate atomically with mode 0644."""
    _write_files([(Path(path), data, 0o644)], overwrite=overwrite)


def write_cert_and_key(
    cert_path: Path, cert_pem: bytes, key_path: Path, key_pem: bytes, *, overwrite: bool = True
) -> None:
    """Write a certificate (0644) and its key (0600) together: both staged before either is renamed."""
    _write_files([(Path(key_path), key_pem, 0o600), (Path(cert_path), cert_pem, 0o644)], overwrite=overwrite)


# --- hosts ---------------------------------------------------------------------------------------


def _host_name(host: str) -> x509.GeneralName:
    """A DNS name or IP literal for a server SAN; refuses what a TLS client could never match."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if getattr(ip, "scope_id", None):
            raise PkiError(f"an IPv6 zone cannot be in a certificate: {_quote(host)}")
        return x509.IPAddress(ip)
    name = text.lower().rstrip(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise PkiError(f"not a DNS name or IP address: {_quote(host)}")
    return x509.DNSName(name)


def _host_text(name: x509.GeneralName) -> str:
    return str(name.value)


def _server_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """SANs for `hosts`, in order, without repeats. An unspecified address (0.0.0.0, ::) means "every
    address": clients reach it as localhost, a loopback address or this machine's name, so those go in."""
    if isinstance(hosts, str):
        hosts = [hosts]
    names: list[x509.GeneralName] = []
    for host in hosts:
        name = _host_name(host)
        if isinstance(name, x509.IPAddress) and name.value in _UNSPECIFIED:
            expanded = [_host_name(h) for h in _LOOPBACK_HOSTS]
            with contextlib.suppress(PkiError):  # a hostname that is no DNS name is left out, not fatal
                expanded.append(_host_name(socket.gethostname()))
        else:
            expanded = [name]
        names.extend(n for n in expanded if n not in names)
    if not names:
        raise PkiError("a server certificate needs at least one host")
    return names


# --- the CA --------------------------------------------------------------------------------------


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise PkiError(f"days must be a whole number from 1 to {MAX_DAYS}")
    return days


def _cn(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text[:64])])  # X.520 limits a CN to 64


def _read_limited(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise PkiError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise PkiError(f"{path} is a directory, not {what}") from None
    if len(data) > MAX_PEM_BYTES:
        raise PkiError(f"{path} is too large to be {what}")
    return data


class CertificateAuthority:
    """The CA that decides identities: it signs client certificates (from its own keys or from a band's
    CSR) and server certificates. Holds its private key in memory only; its repr shows the subject."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self._cert = cert
        self._key = key
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)

    def __repr__(self) -> str:
        return f"CertificateAuthority({self._cert.subject.rfc4514_string()!r})"

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @classmethod
    def create(
        cls,
        cert_path: Path,
        key_path: Path,
        *,
        common_name: str = "bandgate development CA",
        days: int = 3650,
    ) -> CertificateAuthority:
        """A new self-signed CA, written to `cert_path` and `key_path` (0600).

        Refuses to replace an existing file: a new CA silently orphans every certificate the old one issued.
        """
        if not isinstance(common_name, str) or not 1 <= len(common_name) <= 64:
            raise PkiError("a CA common name is 1 to 64 characters")
        _check_days(days)
        key = new_key()
        now = datetime.now(UTC)
        name = _cn(common_name)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(_aki(ski), critical=False)
            .sign(key, _SIGNATURE_HASH)
        )
        ca = cls(cert, key)
        write_cert_and_key(Path(cert_path), ca.cert_pem, Path(key_path), key_pem(key), overwrite=False)
        return ca

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """The CA in `cert_path` and `key_path`; PkiError if either is missing, the certificate is no CA, or
        the key is not the certificate's."""
        cert = _load_cert(_read_limited(Path(cert_path), "a CA certificate"))
        try:
            constraints = _extensions(cert).get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise PkiError(f"{cert_path} is not a CA certificate")
        key = _load_key(Path(key_path))
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise PkiError(f"{key_path} is not the key of {cert_path}")
        return cls(cert, key)

    def _sign(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        days: int,
    ) -> bytes:
        _check_days(days)
        now = datetime.now(UTC)
        if self._cert.not_valid_after_utc <= now:
            raise PkiError(f"the CA expired on {self._cert.not_valid_after_utc:%Y-%m-%d}; create a new one")
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_aki(ca_ski), critical=False)
            .sign(self._key, _SIGNATURE_HASH)
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def _sign_client(
        self, identity: Identity, public_key: ec.EllipticCurvePublicKey, days: int, region: str | None
    ) -> bytes:
        if not isinstance(identity, Identity):
            raise PkiError("an identity is required")
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        if region is not None:
            sans.append(x509.UniformResourceIdentifier(f"{REGION_SCHEME}:{check_region(region)}"))
        return self._sign(_cn(identity.label), public_key, sans, ExtendedKeyUsageOID.CLIENT_AUTH, days)

    def issue(self, identity: Identity, *, days: int = 365, region: str | None = None) -> tuple[bytes, bytes]:
        """A client certificate and a key made here: for tooling and development, where the key may
        exist beside the CA. Real bands make their key themselves and send a CSR (sign_csr)."""
        key = new_key()
        return self._sign_client(identity, key.public_key(), days, region), key_pem(key)

    def sign_csr(
        self, csr_pem: bytes, *, identity: Identity, days: int = 365, region: str | None = None
    ) -> bytes:
        """A client certificate for the key in a band's CSR, carrying `identity` (and the home `region`, if
        given) and nothing else.

        The caller decides the identity; the CSR only proves possession of its key (its self-signature).
        A CSR that names a bandgate identity must name this one, so it can never widen what is granted.
        """
        if not isinstance(identity, Identity):
            raise PkiError("an identity is required")
        if isinstance(csr_pem, str):
            csr_pem = csr_pem.encode("ascii", "replace")
        try:
            csr = x509.load_pem_x509_csr(_pem_bytes(csr_pem))
        except ValueError as e:
            if isinstance(e, PkiError):
                raise
            raise PkiError("not a PEM certificate signing request") from None
        try:
            public_key = csr.public_key()
            signed = isinstance(csr.signature_hash_algorithm, _CSR_HASHES) and csr.is_signature_valid
        except (UnsupportedAlgorithm, ValueError):  # a key or signature algorithm cryptography cannot use
            raise PkiError("the CSR's key or signature algorithm is not supported") from None
        if not _is_p256(public_key):
            raise PkiError("the CSR's key is not ECDSA P-256; only P-256 keys are certified")
        if not signed:
            raise PkiError("the CSR's signature does not verify (or uses a hash other than SHA-2)")
        asked = _identity_of(csr)
        if asked is not None and asked != identity:
            raise PkiError(f"the CSR asks for {asked.label}, not {identity.label}; refused")
        asked_region = _region_of(csr)
        if asked_region is not None and asked_region != region:
            raise PkiError(f"the CSR asks for home region {asked_region}, not {region}; refused")
        return self._sign_client(identity, public_key, days, region)

    def issue_server(self, hosts: Iterable[str], *, days: int = 365) -> tuple[bytes, bytes]:
        """A server certificate and key for DNS names and IP literals; CN is the first host."""
        sans = _server_names(hosts)
        key = new_key()
        cert = self._sign(
            _cn(_host_text(sans[0])), key.public_key(), sans, ExtendedKeyUsageOID.SERVER_AUTH, days
        )
        return cert, key_pem(key)


def _aki(ski: x509.SubjectKeyIdentifier) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False):
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


# --- local state (first start) -------------------------------------------------------------------


def default_state_dir() -> Path:
    """$BANDGATE_STATE_DIR, else $XDG_DATA_HOME/bandgate, else ~/.local/share/bandgate."""
    explicit = os.environ.get("BANDGATE_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is ignored
        return Path(xdg) / "bandgate"
    return Path.home() / ".local" / "share" / "bandgate"


OPERATOR = Identity("consumer", "operator")
LOCAL_CONSUMER = Identity("consumer", "local")


@dataclass(frozen=True)
class LocalState:
    """Where a gateway keeps its CA, its own certificates and its audit key."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    operator_cert: Path
    operator_key: Path
    consumer_cert: Path
    consumer_key: Path
    audit_key: Path
    audit_head: Path

    @classmethod
    def at(cls, root: Path) -> LocalState:
        """The paths under `root`; creates nothing."""
        root = Path(root)
        return cls(
            root=root,
            ca_cert=root / "ca.pem",
            ca_key=root / "ca.key",
            server_cert=root / "server.pem",
            server_key=root / "server.key",
            operator_cert=root / "operator.pem",
            operator_key=root / "operator.key",
            consumer_cert=root / "consumer.pem",
            consumer_key=root / "consumer.key",
            audit_key=root / "audit.key",
            audit_head=root / "audit.head",
        )


def _leaf_problem(
    ca: CertificateAuthority,
    cert_path: Path,
    key_path: Path,
    *,
    identity: Identity | None,
    names: list[x509.GeneralName] | None = None,
) -> str | None:
    """Why the certificate and key at these paths must be (re-)issued, or None if they serve."""
    if not cert_path.exists() or not key_path.exists():
        return "missing"
    try:
        cert = _load_cert(cert_path.read_bytes())
        key = _load_key(key_path)
        info = _info(cert)
    except PkiError:
        return "unreadable"
    try:
        cert.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by this CA"
    if _spki(key.public_key()) != _spki(cert.public_key()):
        return "key does not match"
    if info.not_after - datetime.now(UTC) < RENEW_BEFORE:
        return f"expires {info.not_after:%Y-%m-%d}"
    if info.identity != identity:
        return "other identity"
    if names is not None:
        try:
            have = _extensions(cert).get_extension_for_class(x509.SubjectAlternativeName).value
        except (x509.ExtensionNotFound, PkiError):
            have = x509.SubjectAlternativeName([])
        lacking = [_host_text(n) for n in names if n not in have]
        if lacking:
            return f"lacks {', '.join(lacking)}"
    return None


def _why(reason: str) -> str:
    return "" if reason == "missing" else f" (re-issued: {reason})"


def ensure_local_state(root: Path, hosts: Iterable[str]) -> tuple[LocalState, list[str]]:
    """Create whatever of the local state is missing, as a gateway's first start does; return the state
    and one line per thing created (file names only, never contents).

    Certificates are re-issued when missing, broken, not from this CA or close to expiry, and the server's
    when it lacks a wanted host. The CA and the audit key are never replaced: that would orphan every
    certificate or break the audit chain, so a half-present CA is an error for a person to resolve.
    """
    state = LocalState.at(Path(root))
    created: list[str] = []
    if not state.root.is_dir():
        state.root.mkdir(mode=0o700, parents=True)
        os.chmod(state.root, 0o700)
        created.append(f"state directory {state.root.name}/ (0700)")

    have_cert, have_key = state.ca_cert.exists(), state.ca_key.exists()
    if have_cert and have_key:
        ca = CertificateAuthority.load(state.ca_cert, state.ca_key)
    elif have_cert or have_key:
        present, absent = (state.ca_cert, state.ca_key) if have_cert else (state.ca_key, state.ca_cert)
        raise PkiError(f"{present} exists but {absent} does not; restore it or remove both to start a new CA")
    else:
        ca = CertificateAuthority.create(state.ca_cert, state.ca_key)
        created.append(f"{state.ca_cert.name}, {state.ca_key.name}: new certificate authority")

    names = _server_names([*_LOOPBACK_HOSTS, *([hosts] if isinstance(hosts, str) else hosts)])
    reason = _leaf_problem(ca, state.server_cert, state.server_key, identity=None, names=names)
    if reason:
        cert, key = ca.issue_server([_host_text(n) for n in names])
        write_cert_and_key(state.server_cert, cert, state.server_key, key)
        created.append(
            f"{state.server_cert.name}, {state.server_key.name}: server certificate for "
            f"{', '.join(_host_text(n) for n in names)}{_why(reason)}"
        )

    for identity, cert_path, key_path in (
        (OPERATOR, state.operator_cert, state.operator_key),
        (LOCAL_CONSUMER, state.consumer_cert, state.consumer_key),
    ):
        reason = _leaf_problem(ca, cert_path, key_path, identity=identity)
        if reason:
            cert, key = ca.issue(identity)
            write_cert_and_key(cert_path, cert, key_path, key)
            created.append(
                f"{cert_path.name}, {key_path.name}: client certificate {identity.label}{_why(reason)}"
            )

    if state.audit_key.exists():
        if state.audit_key.stat().st_size != AUDIT_KEY_BYTES:
            raise PkiError(
                f"{state.audit_key} is not {AUDIT_KEY_BYTES} bytes; it is never replaced automatically"
            )
    else:
        try:
            write_private(state.audit_key, secrets.token_bytes(AUDIT_KEY_BYTES), overwrite=False)
        except PkiError:
            pass  # another process wrote it first: theirs is the key
        else:
            created.append(f"{state.audit_key.name}: audit key")
    return state, created
