"""Who is on the other end, and what they may do: the principal, decided once per stream, and the one
policy that answers every later question about it, default deny, from an in-memory view of the registry.

The view is rebuilt from `Store.registry_snapshot()` whenever the registry's version changes (an admin
change in this process, or another gateway's, seen by polling), so every check is a dictionary lookup on
the hot path: a batch asks `may_upload` without touching the store.
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from dataclasses import dataclass

from gateway.store.base import (
    ADMIN_FAMILY,
    FAMILIES,
    CredentialRow,
    GrantRow,
    PrincipalRow,
    RegistrySnapshot,
)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: kind (device, relay, consumer), name, and the credential it proved.

    `credential` is a credential id ("x509:<sha256 of the certificate>" or "token:<sha256 of the token>"),
    never the secret itself. A device principal speaks for its own device; a relay for the devices the
    registry binds to it, asked live (`Policy.may_upload`), so an unbinding applies to open streams.
    """

    kind: str
    name: str
    credential: str
    serial: str = ""
    insecure: bool = False  # identified by a claim on a loopback-only plaintext gateway (development)

    @property
    def key(self) -> str:
        """ "kind:name": how logs, metrics and audit entries name it."""
        return f"{self.kind}:{self.name}"

    @property
    def device_id(self) -> int | None:
        return int(self.name, 16) if self.kind == "device" else None

    def __repr__(self) -> str:
        return f"Principal({self.key}, serial={self.serial or '-'})"


@dataclass(frozen=True)
class Decision:
    """Allow or deny, with a reason that is safe to send back (it names the caller's own identity and the
    rule, never whether another principal exists)."""

    allowed: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Decision(True)


def token_id(token: str) -> str:
    """The credential id of a bearer token: its SHA-256. A token has ≥ 128 random bits, so a fast hash is
    enough, and a slow password hash would turn a reconnect storm into a denial of service."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()


class Policy:
    """The registry as lookups. Immutable once built: a change builds a new one (`Policy(snapshot)`), so a
    check never sees half a change."""

    def __init__(self, snapshot: RegistrySnapshot):
        self.version = snapshot.version
        self.principals: dict[tuple[str, str], PrincipalRow] = {
            (p.kind, p.name): p for p in snapshot.principals
        }
        self.credentials: dict[str, CredentialRow] = {c.id: c for c in snapshot.credentials}
        self.bound: dict[str, frozenset[str]] = {}
        relays_of: dict[str, set[str]] = defaultdict(set)
        bound: dict[str, set[str]] = defaultdict(set)
        for relay, device in snapshot.bindings:
            bound[relay].add(device)
            relays_of[device].add(relay)
        self.bound = {r: frozenset(d) for r, d in bound.items()}
        self.relays_of = {d: frozenset(r) for d, r in relays_of.items()}
        grants: dict[str, dict[tuple[str, str], frozenset[str] | None]] = defaultdict(dict)
        for g in snapshot.grants:
            grants[g.consumer][(g.family, g.operation)] = frozenset(g.devices) or None
        self.grants = dict(grants)
        self.snapshot = snapshot

    # identity

    def principal(self, kind: str, name: str) -> PrincipalRow | None:
        return self.principals.get((kind, name))

    def check_credential(self, kind: str, name: str, credential: str) -> Decision:
        """Whether a proven identity may act now: registered, active, and this credential not revoked.

        A certificate not yet in the registry is accepted for a registered principal (the CA issued it;
        `Registry` records it on first use); a token must be registered, and for this principal."""
        row = self.principals.get((kind, name))
        if row is None:
            return Decision(False, f"{kind} {name} is not registered")
        if row.state != "active":
            return Decision(False, f"{kind} {name} is revoked")
        cred = self.credentials.get(credential)
        if credential.startswith("token:") and (cred is None or (cred.kind, cred.name) != (kind, name)):
            return Decision(False, "unknown token")
        if cred is not None and cred.state != "active":
            return Decision(False, f"this credential of {kind} {name} is revoked")
        return ALLOW

    @functools.cached_property
    def _owned(self) -> dict[tuple[str, str], list[CredentialRow]]:
        """Credentials by principal: built on first use (admin reads), not with every policy."""
        owned: dict[tuple[str, str], list[CredentialRow]] = defaultdict(list)
        for c in self.snapshot.credentials:
            owned[(c.kind, c.name)].append(c)
        return dict(owned)

    def credentials_of(self, kind: str, name: str) -> list[CredentialRow]:
        """The principal's credentials, oldest first (a dictionary lookup: `admin list` asks for each)."""
        return sorted(self._owned.get((kind, name), ()), key=lambda c: (c.created_us, c.id))

    def token_owner(self, credential: str) -> CredentialRow | None:
        """The registered credential with this token id, whatever its state."""
        cred = self.credentials.get(credential)
        return cred if cred is not None and credential.startswith("token:") else None

    # data in

    def may_upload(self, principal: Principal, device: str) -> Decision:
        """Whether `principal` may upload for `device` (16 hex digits) now."""
        if principal.insecure:
            return (
                ALLOW
                if principal.kind == "device" and principal.name == device
                else Decision(False, f"the stream is identified as {principal.key}")
            )
        decision = self.check_credential(principal.kind, principal.name, principal.credential)
        if not decision:
            return decision
        if principal.kind == "device":
            if principal.name != device:
                return Decision(False, f"device {principal.name} may upload for itself only, not {device}")
            return ALLOW
        if principal.kind == "relay":
            if device not in self.bound.get(principal.name, ()):
                return Decision(False, f"device {device} is not bound to relay {principal.name}")
            target = self.principals.get(("device", device))
            if target is not None and target.state != "active":
                return Decision(False, f"device {device} may not upload through relay {principal.name}")
            return ALLOW
        return Decision(False, f"a {principal.kind} does not upload")

    # data out

    def families(self, principal: Principal, operation: str) -> dict[str, frozenset[str] | None]:
        """The families `principal` holds `operation` on: family → device set (None: every device).
        Default deny: a family with no grant — one added in a later release too — is absent."""
        if principal.insecure:
            return dict.fromkeys(FAMILIES)
        if principal.kind != "consumer" or not self.check_credential(
            principal.kind, principal.name, principal.credential
        ):
            return {}
        held = self.grants.get(principal.name, {})
        return {f: devices for (f, op), devices in held.items() if op == operation and f in FAMILIES}

    def is_admin(self, principal: Principal) -> Decision:
        if principal.insecure:
            return ALLOW
        decision = self.check_credential(principal.kind, principal.name, principal.credential)
        if not decision:
            return decision
        if principal.kind == "consumer" and (ADMIN_FAMILY, "admin") in self.grants.get(principal.name, {}):
            return ALLOW
        return Decision(False, f"{principal.key} holds no admin grant")

    def grants_of(self, consumer: str) -> list[GrantRow]:
        return [
            GrantRow(consumer, f, op, tuple(sorted(d or ())))
            for (f, op), d in sorted(self.grants.get(consumer, {}).items())
        ]


__all__ = ["ALLOW", "Decision", "Policy", "Principal", "token_id"]
