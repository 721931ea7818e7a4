"""What `bandgate serve` needs before it listens: its TLS files, the CA that may sign, the audit key and
head, and on a first start with no CA configured, a development CA and the local credentials (like
Elasticsearch 8), registered with their grants so the README's first session works unchanged.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from gateway.config import GatewayConfig, split_address
from gateway.security.audit import AuditEvent
from gateway.security.pki import (
    CertificateAuthority,
    LocalState,
    cert_info,
    default_state_dir,
    ensure_local_state,
    write_private,
)
from gateway.security.tls import TlsFiles
from gateway.store.base import ADMIN_FAMILY, FAMILIES, OPERATIONS, GrantRow, RegistryOp

log = logging.getLogger("bandgate.security")

OPERATOR = "operator"  # the local operator credential: admin, and every data operation on every family
LOCAL_CONSUMER = "local"  # the local consumer credential: subscribe on every family


@dataclass(frozen=True)
class SecuritySetup:
    """Where a gateway's credentials are. `tls` is None on an insecure gateway; `ca` is the CA that may
    sign CSRs (None when the gateway only verifies: a production CA kept elsewhere)."""

    state: LocalState
    tls: TlsFiles | None
    ca: CertificateAuthority | None
    local: bool  # the state dir's development CA is in use, with its operator and local consumer
    created: tuple[str, ...]

    def __repr__(self) -> str:
        return f"SecuritySetup(state={self.state.root}, local={self.local}, ca={'yes' if self.ca else 'no'})"


def state_dir_of(config: GatewayConfig) -> Path:
    return Path(config.state_dir).expanduser() if config.state_dir else default_state_dir()


def prepare(config: GatewayConfig) -> SecuritySetup:
    """Create what is missing in the state dir and say where everything is (see the module docstring)."""
    root = state_dir_of(config)
    created: list[str] = []
    if config.insecure or config.tls_cert:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = LocalState.at(root)
        if not state.audit_key.exists():
            write_private(state.audit_key, secrets.token_bytes(32), overwrite=False)
            created.append(state.audit_key.name)
        tls = None
        ca = None
        if config.tls_cert:
            tls = TlsFiles(Path(config.tls_cert), Path(config.tls_key), Path(config.tls_ca))
            if config.ca_key:
                ca = CertificateAuthority.load(Path(config.tls_ca), Path(config.ca_key))
        return SecuritySetup(state, tls, ca, local=False, created=tuple(created))
    hosts = [split_address(a)[0] for a in (config.listen, config.token_listen) if a] + config.server_hosts()
    state, made = ensure_local_state(root, hosts)
    created += made
    tls = TlsFiles(state.server_cert, state.server_key, state.ca_cert)
    ca = CertificateAuthority.load(state.ca_cert, state.ca_key)
    return SecuritySetup(state, tls, ca, local=True, created=tuple(created))


def bootstrap_ops(
    setup: SecuritySetup, registered: set[tuple[str, str]]
) -> tuple[list[AuditEvent], list[RegistryOp]]:
    """The local operator and consumer, with their certificates and grants, for a local-CA gateway whose
    registry does not hold them yet (a later revocation or grant change by the operator is kept)."""
    if not setup.local:
        return [], []
    events: list[AuditEvent] = []
    ops: list[RegistryOp] = []
    s = setup.state
    for name, cert, grants in (
        (
            OPERATOR,
            s.operator_cert,
            [GrantRow(OPERATOR, ADMIN_FAMILY, "admin")]
            + [GrantRow(OPERATOR, f, op) for f in sorted(FAMILIES) for op in sorted(OPERATIONS - {"admin"})],
        ),
        (
            LOCAL_CONSUMER,
            s.consumer_cert,
            [GrantRow(LOCAL_CONSUMER, f, "subscribe") for f in sorted(FAMILIES)],
        ),
    ):
        if ("consumer", name) in registered:
            continue
        info = cert_info(cert.read_bytes())
        from gateway.store.base import CredentialRow

        ops.append(RegistryOp("principal", kind="consumer", name=name))
        ops.append(
            RegistryOp(
                "credential",
                credential=CredentialRow(
                    id="x509:" + info.fingerprint,
                    kind="consumer",
                    name=name,
                    serial=f"{info.serial:x}",
                    not_after_us=int(info.not_after.timestamp() * 1_000_000),
                    state="active",
                    created_us=0,
                ),
            )
        )
        ops += [RegistryOp("grant", grant=g) for g in grants]
        events.append(AuditEvent("principal.registered", "gateway:first-start", f"consumer:{name}"))
        events.append(
            AuditEvent(
                "credential.issued",
                "gateway:first-start",
                f"consumer:{name}",
                details={"serial": f"{info.serial:x}"},
            )
        )
        events += [
            AuditEvent(
                "grant.added",
                "gateway:first-start",
                f"consumer:{name}",
                details={"family": g.family, "operation": g.operation},
            )
            for g in grants
        ]
    return events, ops


__all__ = ["LOCAL_CONSUMER", "OPERATOR", "SecuritySetup", "bootstrap_ops", "prepare", "state_dir_of"]
