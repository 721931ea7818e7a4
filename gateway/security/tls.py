"""TLS for every gRPC listener: server credentials that reload the certificate and CA bundle from their
files without a restart, and client channel credentials from PEM files.

grpcio asks `certificate_configuration_fetcher` before every handshake; it compares the files' mtimes
and sizes (a few stat calls) and hands grpc a new configuration only when one changed, so open
connections and streams keep the keys they were made with and new ones get the new files.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("bandgate.tls")


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and key, and the CA bundle it trusts for client certificates."""

    cert: Path
    key: Path
    ca: Path

    def __repr__(self) -> str:
        return f"TlsFiles(cert={self.cert}, key=<file>, ca={self.ca})"


def _stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


class ReloadingCredentials:
    """Server credentials whose files are re-read when they change. `require_client_auth`: mutual TLS
    (client certificates verified against the CA bundle at the handshake: no certificate, a foreign CA or
    an expired one never reach Python); without it, server-authenticated TLS for token clients."""

    def __init__(self, files: TlsFiles, *, require_client_auth: bool):
        self.files = files
        self.require_client_auth = require_client_auth
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths())
        self.reloads = 0

    def _paths(self) -> tuple[Path, ...]:
        return (self.files.cert, self.files.key, self.files.ca)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        f = self.files
        return grpc.ssl_server_certificate_configuration(
            [(f.key.read_bytes(), f.cert.read_bytes())],
            root_certificates=f.ca.read_bytes() if self.require_client_auth else None,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """On a grpc core thread before each handshake: a new configuration only if a file changed."""
        try:
            stamp = _stamp(self._paths())
            if stamp == self._stamp:
                return None
            with self._lock:
                if stamp == self._stamp:
                    return None
                config = self._configuration()
                self._stamp = stamp
                self.reloads += 1
        except Exception as e:  # a file half-written or removed: keep serving with what we have
            log.warning(
                "TLS files not reloaded",
                extra={"fields": {"event": "tls_reload_failed", "error": type(e).__name__}},
            )
            return None
        log.info(
            "TLS files reloaded", extra={"fields": {"event": "tls_reloaded", "cert": str(self.files.cert)}}
        )
        return config

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(), self._fetch, require_client_authentication=self.require_client_auth
        )


def channel_credentials(
    ca: Path | bytes, cert: Path | bytes | None = None, key: Path | bytes | None = None
) -> grpc.ChannelCredentials:
    """Client credentials: trust `ca`, and present `cert`/`key` (mutual TLS) when given."""

    def read(x: Path | bytes | None) -> bytes | None:
        return x if isinstance(x, bytes) or x is None else Path(x).read_bytes()

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


__all__ = ["ReloadingCredentials", "TlsFiles", "channel_credentials"]
