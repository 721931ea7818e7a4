"""Who is on the other end of a stream. One interface, so mutual TLS can replace the loopback check here
without the server or the pipeline changing."""

from __future__ import annotations

import abc
import ipaddress
import logging
import re

DEVICE_METADATA = "bandgate-device-id"
_DEVICE_RE = re.compile(r"[0-9a-fA-F]{16}")

log = logging.getLogger("bandgate.auth")


class AuthError(Exception):
    """The stream is refused as a whole (UNAUTHENTICATED); the message is safe to send back."""


class Authenticator(abc.ABC):
    """Identifies the device a stream speaks for."""

    @abc.abstractmethod
    def authenticate(self, peer: str, metadata: tuple[tuple[str, str | bytes], ...]) -> int:
        """The stream's device ID, from the peer address (`context.peer()`) and invocation metadata;
        raises AuthError."""


class InsecureLoopbackAuthenticator(Authenticator):
    """Development only: trusts the device ID a loopback peer claims in `bandgate-device-id` metadata.

    Anything on the machine can claim any device, which is why only loopback peers are accepted.
    """

    def __init__(self) -> None:
        log.warning(
            "INSECURE authentication: devices are identified by the %s metadata they claim, and only "
            "loopback peers are accepted; use mutual TLS for anything but development",
            DEVICE_METADATA,
            extra={"fields": {"event": "insecure_auth"}},
        )

    def authenticate(self, peer: str, metadata: tuple[tuple[str, str | bytes], ...]) -> int:
        if not is_loopback(peer):
            raise AuthError(f"insecure loopback authentication accepts loopback peers only, not {peer}")
        claimed = [v for k, v in metadata if k == DEVICE_METADATA]
        if len(claimed) != 1 or not isinstance(claimed[0], str) or not _DEVICE_RE.fullmatch(claimed[0]):
            raise AuthError(f"metadata {DEVICE_METADATA} must hold one device ID of 16 hex digits")
        return int(claimed[0], 16)


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


def device_metadata(device_id: int) -> tuple[tuple[str, str]]:
    """What a client sends to claim `device_id` (insecure loopback authentication)."""
    return ((DEVICE_METADATA, f"{device_id:016x}"),)


__all__ = [
    "DEVICE_METADATA",
    "AuthError",
    "Authenticator",
    "InsecureLoopbackAuthenticator",
    "device_metadata",
    "is_loopback",
]
