"""Who is on the other end of an RPC: one interface (`Authenticator.authenticate(context)` → `Principal`),
decided once at the start of a call, so the server and the pipeline ask the principal and never the
metadata again.

- `TlsAuthenticator`: a verified client certificate (mutual TLS listener: grpc checked the chain and the
  validity at the handshake), or a bearer token on the server-authenticated TLS listener; the registry
  (`gateway.security.registry`) decides whether the identity may act.
- `InsecureLoopbackAuthenticator`: development only (`serve --insecure`): trusts the device ID a loopback
  peer claims in `bandgate-device-id` metadata.
"""

from __future__ import annotations

import abc
import ipaddress
import logging
import re
from typing import TYPE_CHECKING

import grpc

from gateway.security.policy import Principal
from gateway.security.registry import Refusal

if TYPE_CHECKING:
    from gateway.security.registry import Registry

DEVICE_METADATA = "bandgate-device-id"
# The headers of an Upload stream, sent once the gateway has accepted it (identified, authorised,
# consented): a stream that ends without them was never the gateway's, and may simply be reopened.
STREAM_ACCEPTED = (("bandgate-stream", "accepted"),)
_DEVICE_RE = re.compile(r"[0-9a-fA-F]{16}")

log = logging.getLogger("bandgate.auth")


class AuthError(Refusal):
    """The call is refused as a whole; the message is safe to send back."""

    def __init__(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED):
        super().__init__(code, reason)


class Authenticator(abc.ABC):
    """Identifies the principal behind a call."""

    @abc.abstractmethod
    async def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        """The call's principal; raises `Refusal` (a status code and a reason)."""


class TlsAuthenticator(Authenticator):
    """A client certificate on the mutual-TLS listener, a bearer token on the TLS-only one."""

    def __init__(self, registry: Registry):
        self.registry = registry

    async def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        auth = context.auth_context()
        peer = context.peer()
        certs = auth.get("x509_pem_cert")
        if certs:
            principal = await self.registry.identify_certificate(peer, certs[0])
        elif auth.get("transport_security_type") == [b"ssl"]:
            principal = await self.registry.identify_token(peer, tuple(context.invocation_metadata() or ()))
        else:  # grpc never serves our services without TLS unless --insecure; refuse if it ever did
            raise self.registry.refuse(peer, None, grpc.StatusCode.UNAUTHENTICATED, "TLS is required")
        self.registry.seen(principal)
        return principal


class InsecureLoopbackAuthenticator(Authenticator):
    """Development only: trusts the device ID a loopback peer claims in `bandgate-device-id` metadata;
    a call without one is the development consumer (every family, admin).

    Anything on the machine can claim any device, which is why only loopback peers are accepted.
    """

    def __init__(self) -> None:
        log.warning(
            "INSECURE authentication: plaintext, devices are identified by the %s metadata they claim, and "
            "only loopback peers are accepted; use TLS (the default) for anything but development",
            DEVICE_METADATA,
            extra={"fields": {"event": "insecure_auth"}},
        )

    async def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        return self.identify(context.peer(), tuple(context.invocation_metadata() or ()))

    def identify(self, peer: str, metadata: tuple[tuple[str, str | bytes], ...]) -> Principal:
        if not is_loopback(peer):
            raise AuthError(f"insecure loopback authentication accepts loopback peers only, not {peer}")
        claimed = [v for k, v in metadata if k == DEVICE_METADATA]
        if not claimed:
            return Principal("consumer", "insecure", "insecure", insecure=True)
        if len(claimed) != 1 or not isinstance(claimed[0], str) or not _DEVICE_RE.fullmatch(claimed[0]):
            raise AuthError(f"metadata {DEVICE_METADATA} must hold one device ID of 16 hex digits")
        return Principal("device", claimed[0].lower(), "insecure", insecure=True)


def claimed_device(metadata: tuple[tuple[str, str | bytes], ...]) -> str | None:
    """The device a relay's stream says it speaks for (`bandgate-device-id`), lower-case; None if absent;
    `AuthError` (INVALID_ARGUMENT) if malformed."""
    claimed = [v for k, v in metadata if k == DEVICE_METADATA]
    if not claimed:
        return None
    if len(claimed) != 1 or not isinstance(claimed[0], str) or not _DEVICE_RE.fullmatch(claimed[0]):
        raise AuthError(
            f"metadata {DEVICE_METADATA} must hold one device ID of 16 hex digits",
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    return claimed[0].lower()


def is_loopback(peer: str) -> bool:
    """Whether a gRPC peer string (`ipv4:127.0.0.1:5`, `ipv6:[::1]:5`, `unix:…`) is this machine."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    """Whether a listen host (`127.0.0.1`, `[::1]`, `localhost`) is a loopback address."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def device_metadata(device_id: int) -> tuple[tuple[str, str]]:
    """What a client sends to name the device a stream is for: the claim itself on an insecure gateway,
    and the device a relay speaks for on a TLS one."""
    return ((DEVICE_METADATA, f"{device_id:016x}"),)


__all__ = [
    "DEVICE_METADATA",
    "STREAM_ACCEPTED",
    "AuthError",
    "Authenticator",
    "InsecureLoopbackAuthenticator",
    "TlsAuthenticator",
    "claimed_device",
    "device_metadata",
    "is_loopback",
    "is_loopback_host",
]
