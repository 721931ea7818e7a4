"""AdminService (the registry, for admin credentials only) and IdentityService (a principal's own
credential: renewal over its live connection). Every change goes through `Registry.apply`, so it is
audited in the same transaction and applies to open streams at once.

The admin operation carries no data by itself: it manages principals and grants; reading features needs
family grants of its own.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import grpc

from bandgate.v1 import admin_pb2, admin_pb2_grpc
from gateway.auth import Authenticator
from gateway.config import GatewayConfig
from gateway.privacy.ownership import current_ownership, ownership_ops, transfer_op
from gateway.security.audit import AuditEvent
from gateway.security.pki import CertInfo, Identity, PkiError, cert_info
from gateway.security.policy import Policy, Principal, token_id
from gateway.security.registry import Refusal, Registry
from gateway.security.setup import SecuritySetup
from gateway.store.base import CredentialRow, GrantRow, RegistryOp, check_principal, check_registry_op

TOKEN_PREFIX = "bgt_"


def new_token() -> str:
    """A bearer token: 256 random bits, shown once; the registry keeps only its SHA-256."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _credential(kind: str, name: str, info: CertInfo) -> CredentialRow:
    return CredentialRow(
        id="x509:" + info.fingerprint,
        kind=kind,
        name=name,
        serial=f"{info.serial:x}",
        not_after_us=int(info.not_after.timestamp() * 1_000_000),
        state="active",
        created_us=time.time_ns() // 1000,
    )


def principal_message(policy: Policy, kind: str, name: str) -> admin_pb2.Principal:
    """What the registry holds of one principal: ids and serials, never a secret."""
    row = policy.principal(kind, name)
    msg = admin_pb2.Principal(kind=kind, name=name)
    if row is None:
        return msg
    msg.state = row.state
    msg.created_us = row.created_us
    msg.last_seen_us = row.last_seen_us or 0
    for c in policy.credentials_of(kind, name):
        msg.credentials.add(id=c.id, serial=c.serial, not_after_us=c.not_after_us, state=c.state)
    if kind == "relay":
        msg.bound.extend(sorted(policy.bound.get(name, ())))
    elif kind == "device":
        msg.bound.extend(sorted(policy.relays_of.get(name, ())))
    elif kind == "consumer":
        for g in policy.grants_of(name):
            msg.grants.add(family=g.family, operation=g.operation, devices=list(g.devices))
    return msg


class _Service:
    def __init__(
        self, authenticator: Authenticator, registry: Registry, security: SecuritySetup, config: GatewayConfig
    ):
        self.authenticator = authenticator
        self.registry = registry
        self.security = security
        self.config = config

    @property
    def policy(self) -> Policy:
        assert self.registry.policy is not None
        return self.registry.policy

    async def _caller(self, context: grpc.aio.ServicerContext, *, admin: bool) -> Principal:
        try:
            principal = await self.authenticator.authenticate(context)
            if admin:
                self.registry.check(context.peer(), principal, self.policy.is_admin(principal))
        except Refusal as e:
            await context.abort(e.code, e.reason)
        return principal

    def _sign(
        self, csr_pem: bytes, identity: Identity, days: int, region: str | None = None
    ) -> tuple[bytes, CertInfo]:
        if self.security.ca is None:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this gateway holds no CA key: sign the CSR with `bandgate pki sign` where the CA is kept",
            )
        try:
            pem = self.security.ca.sign_csr(
                csr_pem, identity=identity, days=days or self.config.cert_days, region=region
            )
        except PkiError as e:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"CSR refused: {e}") from None
        return pem, cert_info(pem)

    def _ca_pem(self) -> bytes:
        tls = self.security.tls
        return tls.ca.read_bytes() if tls is not None else b""


class AdminService(_Service, admin_pb2_grpc.AdminServiceServicer):
    """The registry, for callers holding the admin grant."""

    async def Register(  # noqa: N802 - the gRPC method name
        self, request: admin_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Credential:
        caller = await self._caller(context, admin=True)
        kind, name = request.kind, request.name.lower()
        try:
            check_principal(kind, name)
            identity = Identity(kind, name)
        except (ValueError, PkiError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        subject = f"{kind}:{name}"
        ops = [RegistryOp("principal", kind=kind, name=name, state="active")]
        events = [AuditEvent("principal.registered", caller.key, subject)]
        if kind == "device":  # a new band starts an ownership (a re-registered one keeps its own)
            ops += ownership_ops(self.policy.snapshot, name)[1]
        reply = admin_pb2.Credential()
        try:
            if request.csr_pem:
                # a band or relay is enrolled in this gateway's region: its home from now on
                home = (self.config.region or None) if kind in ("device", "relay") else None
                pem, info = self._sign(request.csr_pem, identity, request.days, home)
                reply.certificate_pem = pem
                ops.append(RegistryOp("credential", credential=_credential(kind, name, info)))
                events.append(
                    AuditEvent(
                        "credential.issued", caller.key, subject, details={"serial": f"{info.serial:x}"}
                    )
                )
                reply.credential_id, reply.serial = "x509:" + info.fingerprint, f"{info.serial:x}"
                reply.not_after_us = int(info.not_after.timestamp() * 1_000_000)
            if request.certificate_pem:
                try:
                    info = cert_info(request.certificate_pem)
                except PkiError as e:
                    raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"certificate refused: {e}") from None
                if info.identity != identity:
                    raise Refusal(
                        grpc.StatusCode.INVALID_ARGUMENT, f"the certificate does not name {subject}"
                    )
                ops.append(RegistryOp("credential", credential=_credential(kind, name, info)))
                events.append(
                    AuditEvent(
                        "credential.registered", caller.key, subject, details={"serial": f"{info.serial:x}"}
                    )
                )
                reply.credential_id, reply.serial = "x509:" + info.fingerprint, f"{info.serial:x}"
            if request.issue_token:
                if kind == "device":
                    raise Refusal(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "devices use certificates; tokens are for relays and consumers",
                    )
                token = new_token()
                cred = CredentialRow(token_id(token), kind, name, "", 0, "active", time.time_ns() // 1000)
                ops.append(RegistryOp("credential", credential=cred))
                events.append(AuditEvent("credential.issued", caller.key, subject, details={"type": "token"}))
                reply.token = token
                reply.credential_id = cred.id
        except Refusal as e:
            await context.abort(e.code, e.reason)
        policy = await self.registry.apply(events, ops)
        reply.principal.CopyFrom(principal_message(policy, kind, name))
        reply.ca_pem = self._ca_pem()
        return reply

    async def Revoke(  # noqa: N802
        self, request: admin_pb2.RevokeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Principal:
        caller = await self._caller(context, admin=True)
        kind, name = request.kind, request.name.lower()
        if request.credential_id:
            cred = self.policy.credentials.get(request.credential_id)
            if cred is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such credential")
            kind, name = cred.kind, cred.name
            op = RegistryOp("credential_state", name=cred.id, state="revoked")
            event = AuditEvent(
                "credential.revoked", caller.key, f"{kind}:{name}", details={"serial": cred.serial or "token"}
            )
        else:
            if self.policy.principal(kind, name) is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"{kind} {name} is not registered")
            op = RegistryOp("revoke", kind=kind, name=name)
            event = AuditEvent("principal.revoked", caller.key, f"{kind}:{name}")
        policy = await self.registry.apply([event], [op])
        return principal_message(policy, kind, name)

    async def Transfer(  # noqa: N802
        self, request: admin_pb2.TransferRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.TransferResponse:
        caller = await self._caller(context, admin=True)
        device = request.device.lower()
        try:
            check_principal("device", device)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.policy.principal("device", device) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"device {device} is not registered")
        previous = current_ownership(self.policy.snapshot, device) or ""
        ownership, op = transfer_op(device)
        event = AuditEvent("device.transferred", caller.key, f"device:{device}")
        await self.registry.apply([event], [op])
        return admin_pb2.TransferResponse(device=device, ownership=ownership, previous=previous)

    async def _binding(
        self, request: admin_pb2.BindRequest, context: grpc.aio.ServicerContext, op: str
    ) -> admin_pb2.Principal:
        caller = await self._caller(context, admin=True)
        relay, device = request.relay.lower(), request.device.lower()
        change = RegistryOp(op, name=relay, device=device)
        try:
            check_registry_op(change)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.policy.principal("relay", relay) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"relay {relay} is not registered")
        action = "binding.added" if op == "bind" else "binding.removed"
        policy = await self.registry.apply(
            [AuditEvent(action, caller.key, f"relay:{relay}", details={"device": device})], [change]
        )
        return principal_message(policy, "relay", relay)

    async def Bind(  # noqa: N802
        self, request: admin_pb2.BindRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Principal:
        return await self._binding(request, context, "bind")

    async def Unbind(  # noqa: N802
        self, request: admin_pb2.BindRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Principal:
        return await self._binding(request, context, "unbind")

    async def _grant(
        self, request: admin_pb2.GrantRequest, context: grpc.aio.ServicerContext, op: str
    ) -> admin_pb2.Principal:
        caller = await self._caller(context, admin=True)
        grant = GrantRow(
            request.consumer.lower(),
            request.family,
            request.operation,
            tuple(d.lower() for d in request.devices),
        )
        change = RegistryOp(op, grant=grant)
        try:
            check_registry_op(change)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.policy.principal("consumer", grant.consumer) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"consumer {grant.consumer} is not registered")
        details: dict[str, str | int] = {"family": grant.family, "operation": grant.operation}
        if grant.devices:
            details["devices"] = len(grant.devices)
        action = "grant.added" if op == "grant" else "grant.removed"
        policy = await self.registry.apply(
            [AuditEvent(action, caller.key, f"consumer:{grant.consumer}", details=details)], [change]
        )
        return principal_message(policy, "consumer", grant.consumer)

    async def Grant(  # noqa: N802
        self, request: admin_pb2.GrantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Principal:
        return await self._grant(request, context, "grant")

    async def Ungrant(  # noqa: N802
        self, request: admin_pb2.GrantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Principal:
        return await self._grant(request, context, "ungrant")

    async def List(  # noqa: N802
        self, request: admin_pb2.ListRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListResponse:
        caller = await self._caller(context, admin=True)
        # an admin read is an admin action too: who looked at the registry is on record
        policy = await self.registry.apply([AuditEvent("registry.listed", caller.key, request.kind or "*")])
        reply = admin_pb2.ListResponse()
        for kind, name in sorted(policy.principals):
            if not request.kind or request.kind == kind:
                reply.principals.append(principal_message(policy, kind, name))
        return reply


class IdentityService(_Service, admin_pb2_grpc.IdentityServiceServicer):
    """A principal's own credential."""

    async def Renew(  # noqa: N802
        self, request: admin_pb2.RenewRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Credential:
        caller = await self._caller(context, admin=False)
        if caller.insecure or not caller.credential.startswith("x509:"):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "renewal is for certificates (mutual TLS)"
            )
        # a renewed certificate keeps its home region (one from before regions gets this gateway's)
        certs = context.auth_context().get("x509_pem_cert")
        home = cert_info(certs[0]).region if certs else None
        if home is None and caller.kind in ("device", "relay"):
            home = self.config.region or None
        try:
            pem, info = self._sign(request.csr_pem, Identity(caller.kind, caller.name), request.days, home)
        except Refusal as e:
            await context.abort(e.code, e.reason)
        event = AuditEvent(
            "credential.renewed",
            caller.key,
            caller.key,
            details={"serial": f"{info.serial:x}", "previous": caller.serial},
        )
        policy = await self.registry.apply(
            [event], [RegistryOp("credential", credential=_credential(caller.kind, caller.name, info))]
        )
        return admin_pb2.Credential(
            principal=principal_message(policy, caller.kind, caller.name),
            certificate_pem=pem,
            ca_pem=self._ca_pem(),
            credential_id="x509:" + info.fingerprint,
            serial=f"{info.serial:x}",
            not_after_us=int(info.not_after.timestamp() * 1_000_000),
        )

    async def WhoAmI(  # noqa: N802
        self, request: admin_pb2.WhoAmIRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Principal:
        caller = await self._caller(context, admin=False)
        if caller.insecure:
            return admin_pb2.Principal(kind=caller.kind, name=caller.name, state="insecure")
        return principal_message(self.policy, caller.kind, caller.name)


def add_services(server: Any, admin: AdminService, identity: IdentityService) -> None:
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    admin_pb2_grpc.add_IdentityServiceServicer_to_server(identity, server)


__all__ = ["AdminService", "IdentityService", "add_services", "new_token", "principal_message"]
