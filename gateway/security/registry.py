"""The live registry of one gateway process: the current `Policy`, every change to it (audited, in one
store transaction with its audit entry), and the identification of callers at the start of each RPC.

Changes made here take effect at once: `apply` rebuilds the policy and calls the listeners (the server
ends streams that lost their right, subscriptions re-read their grants). Changes made by another process
on the same store are seen within `poll_s` by comparing the registry version, and on PostgreSQL at once:
the store notifies every version bump at its commit (`Store.registry_listener`).

Refusals are rate-limited per peer address and per credential before anything is looked up, aggregated
into audit entries, and answered with a reason that names only the caller's own identity.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from gateway.privacy.crypto import PseudonymKey
from gateway.privacy.ownership import ownership_ops
from gateway.security.audit import AuditEvent, AuditLog, RefusalCounter, Segments, load_key
from gateway.security.pki import PkiError, cert_info
from gateway.security.policy import Decision, Policy, Principal, token_id
from gateway.store.base import CredentialRow, RegistryDelta, RegistryOp, RegistrySnapshot, merge_registry

log = logging.getLogger("bandgate.security")

FLUSH_S = 2.0  # last-seen times and refusal counts are written this often, never per RPC
POLL_S = 0.5  # the store's registry version is read this often, for changes made by other gateways
NOTICE_MIN_S = 0.05  # a change notified by the store (Store.registry_listener) is read at most this often
REFRESH_S = 0.1  # an unknown certificate reads the store's registry version at most this often
# The whole registry is read again at least this often, though the change log has every change: it brings
# last-seen times (not policy, so no delta carries them) and is a safety net under the log.
FULL_READ_S = 300.0


class Throttle:
    """Refusals per key (a peer address, a credential): `rate` a second up to `burst`, and a key that has
    used them up is refused before its next request is even looked at. Bounded memory: the stalest keys
    go first."""

    def __init__(self, rate: float = 5.0, burst: float = 20.0, max_keys: int = 65_536):
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._level: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def _refilled(self, key: str, now: float) -> float | None:
        entry = self._level.get(key)
        if entry is None:
            return None
        level, stamp = entry
        return min(self.burst, level + (now - stamp) * self.rate)

    def blocked(self, key: str) -> bool:
        level = self._refilled(key, time.monotonic())
        return level is not None and level < 1.0

    def refund(self, key: str) -> None:
        """Give back what `fail` took (a refusal that turned out not to be one)."""
        entry = self._level.get(key)
        if entry is not None:
            level, stamp = entry
            self._level[key] = (min(self.burst, level + 1.0), stamp)

    def fail(self, key: str) -> None:
        now = time.monotonic()
        level = self._refilled(key, now)
        self._level[key] = ((self.burst if level is None else level) - 1.0, now)
        self._level.move_to_end(key)
        while len(self._level) > self.max_keys:
            self._level.popitem(last=False)


def peer_host(peer: str) -> str:
    """`ipv4:1.2.3.4:5678` → `ipv4:1.2.3.4`: the address without the port, which a client picks anew."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rpartition(':')[0]}"
    return kind


class Refusal(Exception):  # noqa: N818 - an answer, not a bug
    """Identification refused: `code` and a reason safe to send back."""

    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Registry:
    """Policy, changes and identification for one gateway process (see the module docstring).

    start/shutdown: start loads the registry on `thread` (a StoreThread of its own) and starts the poll
    and flush loop; shutdown flushes what is buffered; safe without start, and twice."""

    def __init__(
        self,
        thread: Any,  # gateway.pipeline.StoreThread: one store object on its own thread
        *,
        audit_key: Path,
        audit_head: Path,
        pseudonyms: PseudonymKey | None = None,
        segments: Segments | None = None,
        auto_register: bool = False,
        poll_s: float | None = None,
        metrics: Any = None,
    ):
        self.thread = thread
        self.audit_key = audit_key
        self.audit_head = audit_head
        self.pseudonyms = pseudonyms  # devices are named by their pseudonym in audit entries
        self.segments = segments or Segments()
        self.auto_register = auto_register
        self.poll_s = POLL_S if poll_s is None else poll_s
        self.metrics = metrics
        self.policy: Policy | None = None
        self.listeners: list[Callable[[Policy], None]] = []
        # called with each new snapshot on the store thread, before it is served (indexes built ahead),
        # and the delta it was made with (None: read whole), laid over the snapshot served before
        self.indexers: list[Callable[[RegistrySnapshot, RegistryDelta | None], None]] = []
        # called with a change's ops before it is stored (gateway/privacy/journal.py)
        self.before_apply: Callable[[Sequence[RegistryOp]], Awaitable[None]] | None = None
        self._refreshed = 0.0  # when `refresh` last read the store's registry version
        self.peer_throttle = Throttle()
        self.credential_throttle = Throttle()
        self.refusals = RefusalCounter()
        self._audit: AuditLog | None = None
        self._seen: dict[tuple[str, str], int] = {}
        self._known_certs: dict[bytes, tuple[Any, str, str]] = {}  # pem → (identity, credential id, serial)
        self._loop: asyncio.Future | None = None
        self._lock = asyncio.Lock()
        self._reload = asyncio.Lock()
        self._refreshing = asyncio.Lock()  # one `refresh` read at a time
        self._refreshed_newer = False  # what the last `refresh` read found
        self._full_read = -FULL_READ_S  # when the whole registry was last read (monotonic)

    async def start(self) -> None:
        if self._loop is not None:
            return
        key = load_key(self.audit_key)

        def open_audit() -> AuditLog:
            audit = AuditLog(
                self.thread.store, key, self.audit_head, pseudonyms=self.pseudonyms, segments=self.segments
            )
            audit.open()
            return audit

        self._audit = await self.thread.call(open_audit)
        self._install(await self._read_policy())
        self._loop = asyncio.ensure_future(self._background())

    async def shutdown(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await loop
        with contextlib.suppress(Exception):
            await self._flush()

    async def _read_policy(self) -> Policy:
        """The registry read and indexed on the registry's store thread, with every `indexers` hook
        (the consent index): at 100,000 devices the indexes take ~0.5 s, which the event loop serving
        the bands must not spend on the first batch after a change.

        What is read is the change since the policy served (`Store.registry_delta`: the rows of the
        principals changed, laid over the snapshot held), so a change costs its own rows rather than a
        read of the whole registry; the whole registry when there is no policy yet, when the change
        log cannot give the change whole, and at least every FULL_READ_S."""
        store, indexers = self.thread.store, list(self.indexers)
        held = self.policy.snapshot if self.policy is not None else None
        if time.monotonic() - self._full_read >= FULL_READ_S:
            held = None
        started = time.monotonic()

        def read() -> tuple[Policy, bool]:
            delta = None if held is None else store.registry_delta(held)
            snapshot = store.registry_snapshot() if delta is None else merge_registry(held, delta)
            policy = Policy(snapshot)
            for index in indexers:
                index(policy.snapshot, delta)
            return policy, delta is None

        policy, whole = await self.thread.call(read)
        if whole:
            self._full_read = started
        if self.metrics is not None:
            self.metrics.registry_reads.labels("full" if whole else "delta").inc()
        return policy

    def _install(self, policy: Policy) -> None:
        changed = self.policy is not None and self.policy.version != policy.version
        self.policy = policy
        if changed:
            for listener in list(self.listeners):
                try:
                    listener(policy)
                except Exception as e:  # a listener's bug must not stop the others
                    log.error("policy listener failed", extra={"fields": {"error": type(e).__name__}})

    # changes

    async def apply(self, events: Sequence[AuditEvent], ops: Sequence[RegistryOp] = ()) -> Policy:
        """Store `ops` with their audit `events` in one transaction, then serve the new policy."""
        assert self._audit is not None, "registry not started"
        if ops and self.before_apply is not None:
            await self.before_apply(ops)  # the erasure journal: written before the change is made
        async with self._lock:
            version = await self.thread.call(self._audit.record, list(events), list(ops))
        # One snapshot read serves every change stored meanwhile (a registration storm), and this change
        # is served before apply returns: the read that runs under the reload lock after it began covers it.
        # a second factor's last step bumps no version but must be served at once (a replay is refused)
        unversioned = any(op.op == "totp_used" for op in ops)
        async with self._reload:
            if self.policy is None or self.policy.version < version or unversioned:
                self._install(await self._read_policy())
        assert self.policy is not None
        return self.policy

    async def refresh(self) -> bool:
        """Read the registry again if the store holds a newer version (another gateway changed it since the
        last poll); True if a newer policy was installed. Reads are at most one per REFRESH_S: a caller
        that comes sooner waits for the next read rather than being refused on stale state, and callers
        that arrive together share one read (a flood of unknown certificates costs ten reads a second)."""
        asked = time.monotonic()
        async with self._refreshing:
            if self._refreshed >= asked:  # a read that began after we asked has been made
                return self._refreshed_newer
            wait = self._refreshed + REFRESH_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._refreshed = time.monotonic()
            self._refreshed_newer = False
            version = await self.thread.call(self.thread.store.registry_version)
            if self.policy is not None and version == self.policy.version:
                return False
            async with self._reload:
                if self.policy is None or self.policy.version < version:
                    self._install(await self._read_policy())
            self._refreshed_newer = True
            return True

    async def _background(self) -> None:
        last_flush = time.monotonic()
        # Another gateway's change wakes this loop at its commit where the store can say so (PostgreSQL);
        # the version is polled every poll_s all the same.
        listener = self.thread.store.registry_listener()
        last_read = time.monotonic()
        try:
            while True:
                if listener is None:
                    await asyncio.sleep(self.poll_s)
                else:
                    try:
                        await listener.wait(self.poll_s)
                    except Exception as e:  # a listener's fault must not end the poll: poll without it
                        log.error("registry listener failed", extra={"fields": {"error": type(e).__name__}})
                        with contextlib.suppress(Exception):
                            await listener.close()
                        listener = None
                        continue
                    # a burst of changes (another gateway's bulk enrolment) is read at most this often
                    await asyncio.sleep(max(0.0, last_read + NOTICE_MIN_S - time.monotonic()))
                last_read = time.monotonic()
                try:
                    version = await self.thread.call(self.thread.store.registry_version)
                    stale = time.monotonic() - self._full_read >= FULL_READ_S
                    if self.policy is None or version != self.policy.version or stale:
                        async with self._reload:
                            self._install(await self._read_policy())
                    if time.monotonic() - last_flush >= FLUSH_S:
                        last_flush = time.monotonic()
                        await self._flush()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the store may be busy: try again next round
                    log.warning(
                        "registry poll failed",
                        extra={"fields": {"event": "registry_poll_failed", "error": type(e).__name__}},
                    )
        finally:
            if listener is not None:
                await listener.close()

    async def _flush(self) -> None:
        seen, self._seen = self._seen, {}
        events = self.refusals.drain()
        if seen:
            ops = [RegistryOp("seen", kind=k, name=n, time_us=t) for (k, n), t in seen.items()]
            await self.thread.call(self.thread.store.registry_apply, ops)
        if events:
            assert self._audit is not None
            async with self._lock:
                await self.thread.call(self._audit.record, events, [])

    def seen(self, principal: Principal) -> None:
        self._seen[(principal.kind, principal.name)] = time.time_ns() // 1000

    # identification

    def refuse(
        self,
        peer: str,
        principal_key: str | None,
        code: grpc.StatusCode,
        reason: str,
        *,
        charge_peer: bool = True,
    ) -> Refusal:
        """Count a refusal against the credential and, for callers that proved nothing at the handshake
        (the token listener), against the peer address, for the throttles and the audit log.

        A certificate caller is charged by its certificate only: phones behind one NAT share an address,
        and one band with a revoked certificate must not lock its neighbours' relays out."""
        if charge_peer:
            self.peer_throttle.fail(peer_host(peer))
        if principal_key is not None:
            self.credential_throttle.fail(principal_key)
        self.refusals.note("peer:" + peer_host(peer), reason)
        if self.metrics is not None:
            self.metrics.auth_refused.labels(code.name).inc()
        return Refusal(code, reason)

    def _throttled(self) -> Refusal:
        if self.metrics is not None:
            self.metrics.auth_throttled.inc()
        return Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "too many refused requests from this peer; slow down"
        )

    async def identify_certificate(self, peer: str, pem: bytes) -> Principal:
        """The principal a verified client certificate proves (grpc checked the chain and validity at the
        handshake); `Refusal` if the registry does not let it act."""
        known = self._known_certs.get(pem)
        if known is None:
            pem_key = "pem:" + hashlib.sha256(pem).hexdigest()[:32]
            if self.credential_throttle.blocked(pem_key):
                raise self._throttled()
            try:
                info = cert_info(pem)
            except PkiError as e:
                raise self.refuse(
                    peer, pem_key, grpc.StatusCode.UNAUTHENTICATED, f"certificate: {e}", charge_peer=False
                ) from None
            if info.identity is None:
                raise self.refuse(
                    peer,
                    pem_key,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "the certificate names no bandgate identity",
                    charge_peer=False,
                )
            known = (info.identity, "x509:" + info.fingerprint, f"{info.serial:x}", info)
            if len(self._known_certs) > 10_000:
                self._known_certs.clear()
            self._known_certs[pem] = known
        identity, credential, serial, info = known
        key = f"{identity.kind}:{identity.name}"
        if self.credential_throttle.blocked(key):
            raise self._throttled()
        assert self.policy is not None
        decision = self.policy.check_credential(identity.kind, identity.name, credential)
        unknown = not decision and self.policy.principal(identity.kind, identity.name) is None
        if unknown:
            # perhaps registered a moment ago through another gateway on the same store: not yet polled here
            await self.refresh()
            decision = self.policy.check_credential(identity.kind, identity.name, credential)
        if (
            not decision
            and self.policy.principal(identity.kind, identity.name) is None
            and self.auto_register
            and identity.kind == "device"
        ):
            await self.register_certificate(identity.kind, identity.name, info, actor="auto-registration")
            decision = self.policy.check_credential(identity.kind, identity.name, credential)
        if not decision:
            raise self.refuse(
                peer, key, grpc.StatusCode.PERMISSION_DENIED, decision.reason, charge_peer=False
            )
        if credential not in self.policy.credentials:
            await self.register_certificate(
                identity.kind, identity.name, info, actor=key, new_principal=False
            )
        return Principal(identity.kind, identity.name, credential, serial)

    async def register_certificate(
        self, kind: str, name: str, info: Any, *, actor: str, new_principal: bool = True, action: str = ""
    ) -> None:
        """Record a certificate as a credential of (kind, name), registering the principal if asked."""
        cred = CredentialRow(
            id="x509:" + info.fingerprint,
            kind=kind,
            name=name,
            serial=f"{info.serial:x}",
            not_after_us=int(info.not_after.timestamp() * 1_000_000),
            state="active",
            created_us=time.time_ns() // 1000,
        )
        ops = [RegistryOp("credential", credential=cred)]
        events = [
            AuditEvent(
                action or "credential.recorded", actor, f"{kind}:{name}", details={"serial": cred.serial}
            )
        ]
        if new_principal:
            ops.insert(0, RegistryOp("principal", kind=kind, name=name, state="active"))
            events.insert(0, AuditEvent("principal.registered", actor, f"{kind}:{name}"))
            if kind == "device":  # a new band starts an ownership: its data belongs to it from here
                ops += ownership_ops(self.policy.snapshot if self.policy else None, name)[1]
        await self.apply(events, ops)

    async def identify_token(self, peer: str, metadata: Sequence[tuple[str, Any]]) -> Principal:
        """The principal a bearer token proves (`authorization: Bearer <token>`); throttled per peer address
        before the token is even hashed. A token not found is looked for once more in a fresh read of the
        registry (issued a moment ago through another process or gateway); the throttle bounds those reads
        as it bounds the lookups."""
        host = peer_host(peer)
        if self.peer_throttle.blocked(host):
            raise self._throttled()
        tokens = [v for k, v in metadata if k == "authorization"]
        if len(tokens) != 1 or not isinstance(tokens[0], str) or not tokens[0].startswith("Bearer "):
            raise self.refuse(
                peer,
                None,
                grpc.StatusCode.UNAUTHENTICATED,
                "this listener needs 'authorization: Bearer <token>'",
            )
        if self.metrics is not None:
            self.metrics.token_lookups.inc()
        credential = token_id(tokens[0][7:].strip())
        assert self.policy is not None
        owner = self.policy.token_owner(credential)
        if owner is None:
            # charged before the read, so that calls arriving meanwhile see the throttle this one used
            self.peer_throttle.fail(host)
            # looked up again whatever the read says: the poll (or a store's notice) may have brought the
            # token's policy between the lookup above and this read, which then finds nothing newer
            await self.refresh()
            owner = self.policy.token_owner(credential)
            if owner is None:
                raise self.refuse(
                    peer, None, grpc.StatusCode.UNAUTHENTICATED, "unknown token", charge_peer=False
                )
            self.peer_throttle.refund(host)
        decision = self.policy.check_credential(owner.kind, owner.name, credential)
        if not decision:
            raise self.refuse(
                peer, owner.kind + ":" + owner.name, grpc.StatusCode.PERMISSION_DENIED, decision.reason
            )
        return Principal(owner.kind, owner.name, credential)

    def refuse_principal(
        self, peer: str, principal: Principal, code: grpc.StatusCode, reason: str
    ) -> Refusal:
        """`refuse` for an identified caller: the peer address is charged only for a token caller."""
        by_certificate = principal.credential.startswith("x509:")
        return self.refuse(peer, principal.key, code, reason, charge_peer=not by_certificate)

    def check(self, peer: str, principal: Principal, decision: Decision) -> None:
        """Raise a counted PERMISSION_DENIED `Refusal` unless `decision` allows."""
        if not decision:
            raise self.refuse_principal(peer, principal, grpc.StatusCode.PERMISSION_DENIED, decision.reason)


async def abort(context: grpc.aio.ServicerContext, refusal: Refusal) -> None:
    await context.abort(refusal.code, refusal.reason)


__all__ = ["Refusal", "Registry", "Throttle", "abort", "peer_host"]
