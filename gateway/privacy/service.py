"""PrivacyService: the band owner's self-service (consent, profile, second factor, export, erasure) and the
operator's path to the same for any device. Identity first: the caller is the band's own credential, a
relay the band is bound to, or an admin credential; an owner who enrolled TOTP gives a current code for
consent changes, export, erasure and a new enrolment. Every change goes through `Registry.apply`, so it
is audited in the same transaction and applies to the next batch at once. Audit entries name devices
and families, never a profile value.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from bandgate.v1 import privacy_pb2, privacy_pb2_grpc
from gateway.auth import Authenticator
from gateway.privacy import totp
from gateway.privacy.consent import ALL_FAMILIES, RegistryConsent
from gateway.privacy.crypto import CryptoError
from gateway.privacy.ownership import ownership_ops
from gateway.privacy.profile import Profile, ProfileError, seal, unseal
from gateway.security.audit import AuditEvent
from gateway.security.policy import Policy, Principal
from gateway.security.registry import Refusal, Registry
from gateway.store.base import RegistryOp, check_principal

PROFILE_FIELDS = ("birth_year", "country", "height_cm", "weight_kg", "sex")


@dataclass(frozen=True)
class Caller:
    """Who asks, for which device, and whether as the operator (admin: any device, no second factor)."""

    principal: Principal
    device: str
    operator: bool
    peer: str = ""

    @property
    def actor(self) -> str:
        return self.principal.key


Exporter = Callable[[Caller, str, str], AsyncIterator[bytes]]
Eraser = Callable[[Caller], Awaitable[dict[str, int]]]


class PrivacyService(privacy_pb2_grpc.PrivacyServiceServicer):
    """The gRPC face of gateway/privacy (see the module docstring)."""

    def __init__(
        self,
        authenticator: Authenticator,
        registry: Registry,
        consent: RegistryConsent,
        data_key: Callable[[str, str], Any],
        export: Exporter,
        erase: Eraser,
    ):
        self.authenticator = authenticator
        self.registry = registry
        self.consent = consent
        self.data_key = data_key  # (device, ownership) -> DataKey, made on first use
        self.export = export
        self.erase = erase

    @property
    def policy(self) -> Policy:
        assert self.registry.policy is not None
        return self.registry.policy

    # who asks

    async def _caller(
        self, context: grpc.aio.ServicerContext, device: str, *, operator_only: bool = False
    ) -> Caller:
        try:
            principal = await self.authenticator.authenticate(context)
            return self._authorise(context.peer(), principal, device.lower(), operator_only)
        except Refusal as e:
            await context.abort(e.code, e.reason)
            raise AssertionError("unreachable") from None

    def _authorise(self, peer: str, principal: Principal, device: str, operator_only: bool) -> Caller:
        policy = self.registry.policy
        if policy is None:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "the registry is not loaded yet")
        if device:
            try:
                check_principal("device", device)
            except ValueError as e:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if principal.kind == "consumer" and policy.is_admin(principal):
            if not device:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "name the device (16 hex digits)")
            return Caller(principal, device, operator=True, peer=peer)
        if operator_only:
            raise self.registry.refuse_principal(
                peer, principal, grpc.StatusCode.PERMISSION_DENIED, "only an operator may do this"
            )
        if principal.kind == "device":
            if device and device != principal.name:
                raise self.registry.refuse_principal(
                    peer,
                    principal,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"device {principal.name} may act for itself only",
                )
            self.registry.check(peer, principal, policy.may_upload(principal, principal.name))
            return Caller(principal, principal.name, operator=False, peer=peer)
        if principal.kind == "relay":
            if not device:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "a relay names the device (16 hex digits)")
            self.registry.check(peer, principal, policy.may_upload(principal, device))
            return Caller(principal, device, operator=False, peer=peer)
        raise self.registry.refuse_principal(
            peer, principal, grpc.StatusCode.PERMISSION_DENIED, f"a {principal.kind} does not act for a band"
        )

    async def _second_factor(self, caller: Caller, code: str) -> None:
        """An owner with TOTP enrolled proves a current, unused code; an operator does not."""
        if caller.operator:
            return
        snap = self.policy.snapshot
        row = next((r for r in snap.totp if r.device == caller.device), None)
        if row is None:
            return
        try:
            secret = totp.unseal_secret(self.data_key(caller.device, row.ownership), row.sealed)
            step = totp.check(secret, code, row.version)
        except CryptoError:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "the second factor cannot be read") from None
        except totp.TotpRefused as e:
            # counted against the credential: six digits must not be guessed at line rate
            raise self.registry.refuse_principal(
                caller.peer, caller.principal, grpc.StatusCode.UNAUTHENTICATED, str(e)
            ) from None
        await self.registry.apply(
            [], [RegistryOp("totp_used", device=caller.device, ownership=row.ownership, version=step)]
        )

    # consent

    def _consent_state(self, device: str) -> privacy_pb2.ConsentState:
        snap = self.policy.snapshot
        state, decision = self.consent.explain(device)
        msg = privacy_pb2.ConsentState(
            device=device,
            processing=bool(decision),
            reason=decision.reason,
            guardian=state is not None and state.guardian,
            totp_enrolled=any(r.device == device for r in snap.totp),
        )
        if state is not None:
            msg.ownership = state.ownership
        latest = {c.family: c for c in snap.consents if c.device == device}
        defaults = self.consent.settings.default_families
        for family in sorted(ALL_FAMILIES):
            c = latest.get(family)
            if c is not None:
                msg.families.add(family=family, granted=c.granted, time_us=c.time_us, actor=c.actor)
            else:
                msg.families.add(family=family, granted=family in defaults)
        return msg

    async def GetConsent(  # noqa: N802 - the gRPC method name
        self, request: privacy_pb2.DeviceRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.ConsentState:
        caller = await self._caller(context, request.device)
        return self._consent_state(caller.device)

    async def SetConsent(  # noqa: N802
        self, request: privacy_pb2.SetConsentRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.ConsentState:
        caller = await self._caller(context, request.device)
        grant, withdraw = set(request.grant), set(request.withdraw)
        unknown = (grant | withdraw) - ALL_FAMILIES
        if unknown:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown families {sorted(unknown)}; known {sorted(ALL_FAMILIES)}",
            )
        if grant & withdraw:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"both granted and withdrawn: {sorted(grant & withdraw)}"
            )
        try:
            await self._second_factor(caller, request.totp)
        except Refusal as e:
            await context.abort(e.code, e.reason)
        ownership, ops = ownership_ops(self.policy.snapshot, caller.device)
        ops += [
            RegistryOp(
                "consent",
                device=caller.device,
                ownership=ownership,
                family=f,
                granted=f in grant,
                actor=caller.actor,
            )
            for f in sorted(grant | withdraw)
        ]
        details = {"granted": ",".join(sorted(grant)), "withdrawn": ",".join(sorted(withdraw))}
        await self.registry.apply(
            [AuditEvent("consent.changed", caller.actor, f"device:{caller.device}", details=details)], ops
        )
        return self._consent_state(caller.device)

    async def RecordGuardian(  # noqa: N802
        self, request: privacy_pb2.GuardianRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.ConsentState:
        caller = await self._caller(context, request.device, operator_only=True)
        ownership, ops = ownership_ops(self.policy.snapshot, caller.device)
        op = "unguardian" if request.withdraw else "guardian"
        who = request.guardian
        ops.append(RegistryOp(op, device=caller.device, ownership=ownership, name=who, actor=caller.actor))
        try:
            events = [
                AuditEvent(
                    f"guardian.{'withdrawn' if request.withdraw else 'recorded'}",
                    caller.actor,
                    f"device:{caller.device}",
                    details={"guardian": request.guardian},
                )
            ]
            await self.registry.apply(events, ops)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return self._consent_state(caller.device)

    # profile

    def _profile(self, device: str) -> tuple[int, Profile, str]:
        """The current profile's version (0: none), the profile, and the ownership."""
        snap = self.policy.snapshot
        ownership, _ = ownership_ops(snap, device)
        row = next((p for p in snap.profiles if p.device == device), None)
        if row is None:
            return 0, Profile(), ownership
        return row.version, unseal(self.data_key(device, row.ownership), row.sealed, row.version), ownership

    async def GetProfile(  # noqa: N802
        self, request: privacy_pb2.DeviceRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.ProfileState:
        caller = await self._caller(context, request.device)
        try:
            version, profile, _ = self._profile(caller.device)
        except (CryptoError, ProfileError) as e:
            await context.abort(grpc.StatusCode.DATA_LOSS, f"the profile cannot be read: {type(e).__name__}")
        return _profile_state(caller.device, version, profile)

    async def SetProfile(  # noqa: N802
        self, request: privacy_pb2.SetProfileRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.ProfileState:
        caller = await self._caller(context, request.device)
        given = request.profile
        changes: dict[str, Any] = {f: getattr(given, f) for f in PROFILE_FIELDS if given.HasField(f)}
        for f in request.clear:
            if f not in PROFILE_FIELDS:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown profile field {f!r}")
            changes[f] = None
        if "birth_year" in changes and changes["birth_year"] is not None:
            changes["birth_year"] = int(changes["birth_year"])
        try:
            version, current, ownership = self._profile(caller.device)
            profile = current.merged(changes)
        except ProfileError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except CryptoError as e:
            await context.abort(grpc.StatusCode.DATA_LOSS, f"the profile cannot be read: {type(e).__name__}")
        _, ops = ownership_ops(self.policy.snapshot, caller.device)
        sealed = seal(self.data_key(caller.device, ownership), profile, version + 1)
        ops.append(
            RegistryOp(
                "profile", device=caller.device, ownership=ownership, version=version + 1, sealed=sealed
            )
        )
        event = AuditEvent(
            "profile.corrected" if version else "profile.created",
            caller.actor,
            f"device:{caller.device}",
            details={"version": version + 1, "fields": ",".join(sorted(changes))},
        )
        await self.registry.apply([event], ops)
        return _profile_state(caller.device, version + 1, profile)

    # second factor

    async def EnrolTotp(  # noqa: N802
        self, request: privacy_pb2.DeviceRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.TotpEnrolment:
        caller = await self._caller(context, request.device)
        try:
            await self._second_factor(caller, request.totp)  # replacing an enrolled factor needs it
        except Refusal as e:
            await context.abort(e.code, e.reason)
        ownership, ops = ownership_ops(self.policy.snapshot, caller.device)
        secret = totp.new_secret()
        sealed = totp.seal_secret(self.data_key(caller.device, ownership), secret)
        ops.append(RegistryOp("totp", device=caller.device, ownership=ownership, sealed=sealed))
        await self.registry.apply([AuditEvent("totp.enrolled", caller.actor, f"device:{caller.device}")], ops)
        return privacy_pb2.TotpEnrolment(provisioning_uri=totp.provisioning_uri(secret, caller.device))

    # access and erasure

    async def Export(  # noqa: N802
        self, request: privacy_pb2.PrivacyExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[privacy_pb2.ExportChunk]:
        caller = await self._caller(context, request.device)
        fmt = request.format or "jsonl"
        if fmt not in ("jsonl", "msgpack"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "format is jsonl or msgpack")
        try:
            await self._second_factor(caller, request.totp)
        except Refusal as e:
            await context.abort(e.code, e.reason)
        ownership, _ = ownership_ops(self.policy.snapshot, caller.device)
        await self.registry.apply(
            [AuditEvent("device.exported", caller.actor, f"device:{caller.device}", details={"format": fmt})]
        )
        async for chunk in self.export(caller, ownership, fmt):
            yield privacy_pb2.ExportChunk(data=chunk)

    async def Erase(  # noqa: N802
        self, request: privacy_pb2.DeviceRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.ErasureReport:
        caller = await self._caller(context, request.device)
        try:
            await self._second_factor(caller, request.totp)
        except Refusal as e:
            await context.abort(e.code, e.reason)
        removed = await self.erase(caller)
        return privacy_pb2.ErasureReport(device=caller.device, removed=removed)


def _profile_state(device: str, version: int, profile: Profile) -> privacy_pb2.ProfileState:
    msg = privacy_pb2.ProfileState(device=device, version=version)
    for k, v in profile.to_dict().items():
        setattr(msg.profile, k, v)
    return msg
