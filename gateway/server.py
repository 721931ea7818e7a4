"""The gRPC gateway: IngestService.Upload (bands in), FeatureService.Subscribe (features out), health and
reflection. `serve(config)` runs it until SIGTERM; `run_server(config)` is the same server for tests.

Shutdown (SIGTERM, SIGINT): health turns NOT_SERVING, no new RPC is accepted, every upload stream
finishes the batch it is processing, writes its ack and ends with UNAVAILABLE, subscribers end, the
writer finishes its queue and the store closes; then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bandgate.v1 import (
    admin_pb2,
    features_pb2,
    features_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
)
from gateway import heap
from gateway.auth import (
    STREAM_ACCEPTED,
    Authenticator,
    InsecureLoopbackAuthenticator,
    TlsAuthenticator,
    claimed_device,
)
from gateway.config import GatewayConfig
from gateway.listen import PortLocks
from gateway.metrics import Metrics
from gateway.pipeline import ALL_FAMILIES, Pipeline, StoreThread
from gateway.privacy.access import erase, export_lines
from gateway.privacy.consent import ConsentGate, RegistryConsent
from gateway.privacy.journal import ACTOR as JOURNAL_ACTOR
from gateway.privacy.journal import JOURNAL_FILE, ErasureJournal
from gateway.privacy.keys import TOMBSTONE_FILE, DataKeyStore, key_store_for_url, load_kek, load_tombstone_key
from gateway.privacy.ownership import current_ownership
from gateway.privacy.profile import unseal
from gateway.privacy.retention import Sweeper
from gateway.privacy.sealing import KeySealer
from gateway.privacy.service import PrivacyService
from gateway.regions import Regions
from gateway.security import setup as security_setup
from gateway.security.admin import AdminService, IdentityService, add_services
from gateway.security.audit import AuditEvent, Segments
from gateway.security.policy import Policy, Principal
from gateway.security.registry import Refusal, Registry
from gateway.security.tls import ReloadingCredentials
from gateway.store import outbox_url, store_for_url
from gateway.store.base import UNOWNED, RegistryOp
from gateway.storewatch import StoreWatch
from gateway.stream import stream_for_url
from gateway.stream.drainer import Drainer
from gateway.stream.holder import DrainerName, claim_drainer_name

log = logging.getLogger("bandgate.server")

SERVICE_NAMES = (
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
    features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,
    privacy_pb2.DESCRIPTOR.services_by_name["PrivacyService"].full_name,
)


async def _first(*events: asyncio.Event) -> None:
    """Return when any of `events` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class CommitSignal:
    """Wakes subscribers when a commit stored records. Read `version` before querying the store, then
    `wait(version)`: a commit in between is not missed."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, seen: int, stop: asyncio.Event) -> None:
        if self.version == seen:
            await _first(self._event, stop)


class _Stream:
    """One open upload stream: who sent it, for which device, and why it must end (set once)."""

    __slots__ = ("device", "principal", "reason", "status", "stop")

    def __init__(self, principal: Principal, device: str):
        self.principal = principal
        self.device = device
        self.stop = asyncio.Event()
        self.status = grpc.StatusCode.OK
        self.reason = ""

    def end(self, status: grpc.StatusCode, reason: str) -> None:
        if not self.stop.is_set():
            self.status, self.reason = status, reason
            self.stop.set()


class _LiveStreams:
    """The one live upload stream of each device: opening a stream supersedes the previous one."""

    def __init__(self) -> None:
        self._live: dict[str, _Stream] = {}

    def open(self, principal: Principal, device: str) -> _Stream:
        """The new stream; ends the previous one of the same device."""
        previous = self._live.get(device)
        if previous is not None:
            previous.end(grpc.StatusCode.ABORTED, "superseded by a newer stream for the same device")
        self._live[device] = stream = _Stream(principal, device)
        return stream

    def close(self, stream: _Stream) -> None:
        if self._live.get(stream.device) is stream:
            del self._live[stream.device]

    def recheck(self, policy: Policy) -> int:
        """End every stream whose principal may no longer upload for its device; how many ended."""
        ended = 0
        for stream in list(self._live.values()):
            decision = policy.may_upload(stream.principal, stream.device)
            if not decision:
                stream.end(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
                ended += 1
        return ended

    def __len__(self) -> int:
        return len(self._live)


async def _journal(
    journal: ErasureJournal, ops: Sequence[RegistryOp], registry: Registry, keys: DataKeyStore
) -> None:
    """Journal the erasures and withdrawals among `ops` (not the journal's own re-applications)."""
    wanted = [op for op in ops if op.actor != JOURNAL_ACTOR]
    snapshot = registry.policy.snapshot if registry.policy else None

    def ownerships_of(device: str) -> set[str]:
        held = {"" if o == UNOWNED else o for o in keys.ownerships(device)}
        current = current_ownership(snapshot, device)
        return held | ({current} if current else set())

    def write() -> None:  # the key store may be a database: off the event loop
        journal.append(journal.entries_for(wanted, ownerships_of))

    if any(op.op in ("forget", "consent", "unguardian") for op in wanted):
        await asyncio.to_thread(write)


class IngestService(ingest_pb2_grpc.IngestServiceServicer):
    """Upload: one device per stream, one batch at a time, so a slow store slows the band (gRPC flow
    control) instead of queueing its batches here."""

    def __init__(
        self,
        pipeline: Pipeline,
        authenticator: Authenticator,
        registry: Registry,
        metrics: Metrics,
        draining: asyncio.Event,
        regions: Regions | None = None,
    ):
        self.pipeline = pipeline
        self.authenticator = authenticator
        self.registry = registry
        self.metrics = metrics
        self.draining = draining
        self.regions = regions or Regions()
        self.streams = _LiveStreams()
        # Handlers still running (superseded ones included): shutdown waits for them to send their
        # status before it stops the server, so no stream is cut by core shutdown mid-status.
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        registry.listeners.append(self.streams.recheck)

    async def wait_idle(self, timeout_s: float) -> None:
        """Until every upload handler has ended, or `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def Upload(  # noqa: N802 - the gRPC method name
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> None:
        self._active += 1
        self._idle.clear()
        try:
            await self._upload(context)
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _open(self, context: grpc.aio.ServicerContext) -> tuple[Principal, str]:
        """home region → identify → authorise: the principal and the one device this stream is for."""
        # Before identification, which may register the caller: nothing of another region's band is kept.
        certs = context.auth_context().get("x509_pem_cert")
        misrouted = self.regions.check(certs[0] if certs else None)
        if misrouted is not None:
            self.metrics.misrouted.inc()
            context.set_trailing_metadata(misrouted.trailers)
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, misrouted.reason)
        principal = await self.authenticator.authenticate(context)
        metadata = tuple(context.invocation_metadata() or ())
        device = principal.name if principal.kind == "device" else claimed_device(metadata)
        if device is None:
            raise self.registry.refuse_principal(
                context.peer(),
                principal,
                grpc.StatusCode.INVALID_ARGUMENT,
                "a relay names the device of each stream in bandgate-device-id metadata",
            )
        policy = self.registry.policy
        if policy is not None:
            self.registry.check(context.peer(), principal, policy.may_upload(principal, device))
        # consent, at stream open (and again for every batch, in the pipeline)
        allowed = self.pipeline.consent.decide(int(device, 16))
        if not allowed:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, allowed.reason)
        return principal, device

    async def _upload(self, context: grpc.aio.ServicerContext) -> None:
        try:
            principal, device = await self._open(context)
        except Refusal as e:
            await context.abort(e.code, e.reason)
        if self.draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        # Headers now, not with the first ack: the band learns that its stream is accepted (identified,
        # authorised, consented). Until then grpc core may still cancel it unaccepted under load, which a
        # band can safely answer by reopening; after, a failure is the gateway's, with its reason.
        await context.send_initial_metadata(STREAM_ACCEPTED)
        device_id = int(device, 16)
        stream = self.streams.open(principal, device)
        self.metrics.devices.set(len(self.streams))
        log.info(
            "stream opened",
            extra={"fields": {"event": "stream_open", "device": device, "principal": principal.key}},
        )
        batches = 0
        established = False  # a batch of this stream is stored: its next ones go before newcomers'
        # One watcher for the stream's life, not one per batch: tasks are most of the loop's own cost.
        stop = asyncio.ensure_future(_first(stream.stop, self.draining))
        try:
            while True:
                read = asyncio.ensure_future(context.read())
                await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    # Not cancelled: cancelling a pending read can fail the call with INTERNAL in grpc core;
                    # the abort below ends the RPC and with it the read.
                    read.add_done_callback(lambda f: f.cancelled() or f.exception())
                    break
                batch = read.result()
                if batch is grpc.aio.EOF:
                    return
                # authorise every batch: a revocation or an unbinding applies from the next batch on
                if batch.device_id != device_id:
                    reason = f"batch names device {batch.device_id:016x}, the stream is for {device}"
                    self.registry.refuse_principal(
                        context.peer(), principal, grpc.StatusCode.PERMISSION_DENIED, reason
                    )
                    stream.end(grpc.StatusCode.PERMISSION_DENIED, reason + "; nothing of it was stored")
                    break
                policy = self.registry.policy
                if policy is not None and not (decision := policy.may_upload(principal, device)):
                    stream.end(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
                    break
                ack = await self.pipeline.handle(device_id, batch, established=established)
                await context.write(ack)
                batches += 1
                established = established or ack.has_acked_seq
                if stream.stop.is_set() or self.draining.is_set():
                    break
        finally:
            stop.cancel()
            self.streams.close(stream)
            self.metrics.devices.set(len(self.streams))
            log.info(
                "stream closed",
                extra={"fields": {"event": "stream_close", "device": device, "batches": batches}},
            )
        if stream.stop.is_set():
            await context.abort(stream.status, stream.reason)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; reconnect")


def feature_record(cursor: int, record: dict) -> features_pb2.FeatureRecord:
    """A stored record as the API FeatureRecord: floats as `number`, ints as `integer`, labels as `text`."""
    msg = features_pb2.FeatureRecord(
        cursor=cursor,
        family=record["family"],
        device=record["device"],
        start_us=record["start_us"],
        duration_s=record["duration_s"],
        algo=record["algo"],
    )
    for key, value in record["values"].items():
        if isinstance(value, str):
            msg.values[key].text = value
        elif isinstance(value, int):
            msg.values[key].integer = value
        else:
            msg.values[key].number = float(value)
    return msg


class FeatureService(features_pb2_grpc.FeatureServiceServicer):
    """Subscribe: records after a cursor, in commit order, then live. Cursors increase in commit order
    and a commit becomes visible all at once, so paging by the last cursor sent has no gaps or repeats.

    Only granted families leave: default deny, a request naming an ungranted family is refused naming
    it, and a request with no families gets every family the caller holds subscribe on. Grants are read
    again whenever the registry changes, so a grant or a revocation applies to an open subscription
    (records already passed by its cursor are not sent again)."""

    def __init__(
        self,
        reader: StoreThread,
        signal_: CommitSignal,
        config: GatewayConfig,
        metrics: Metrics,
        draining: asyncio.Event,
        authenticator: Authenticator,
        registry: Registry,
    ):
        self.reader = reader
        self.signal = signal_
        self.config = config
        self.metrics = metrics
        self.draining = draining
        self.authenticator = authenticator
        self.registry = registry

    def _granted(
        self, peer: str, principal: Principal, requested: set[str], operation: str = "subscribe"
    ) -> dict[str, frozenset[str] | None]:
        """The families this call reads now (family → devices, None for all); `Refusal` if the caller asks
        for a family it does not hold `operation` on, or holds none."""
        policy = self.registry.policy
        if policy is None:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "the registry is not loaded yet")
        if not principal.insecure:
            self.registry.check(
                peer, principal, policy.check_credential(principal.kind, principal.name, principal.credential)
            )
        held = policy.families(principal, operation)
        if requested:
            missing = requested - held.keys()
            if missing:
                raise self.registry.refuse_principal(
                    peer,
                    principal,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{principal.key} holds no {operation} grant for {', '.join(sorted(missing))}",
                )
            return {f: held[f] for f in requested}
        if not held:
            raise self.registry.refuse_principal(
                peer,
                principal,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.key} holds no {operation} grant",
            )
        return held

    async def _check_request(
        self, families: Any, device: str, context: grpc.aio.ServicerContext
    ) -> tuple[set[str], str | None]:
        unknown = set(families) - ALL_FAMILIES
        if unknown:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown families {sorted(unknown)}; known {sorted(ALL_FAMILIES)}",
            )
        device = device.lower() or None
        if device is not None and (len(device) != 16 or any(c not in "0123456789abcdef" for c in device)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "device must be 16 hex digits")
        return set(families), device

    def _for_device(
        self,
        peer: str,
        principal: Principal,
        granted: dict[str, frozenset[str] | None],
        requested: set[str],
        device: str | None,
        operation: str,
    ) -> dict[str, frozenset[str] | None]:
        """`granted` narrowed to the one device a request names: a family named in the request whose grant
        does not reach that device, or no family at all, is PERMISSION_DENIED (as for an ungranted family)."""
        if device is None:
            return granted
        reach = {f: d for f, d in granted.items() if d is None or device in d}
        missing = requested - reach.keys()
        if missing or not reach:
            what = f" for {', '.join(sorted(missing))}" if missing else ""
            raise self.registry.refuse_principal(
                peer,
                principal,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.key} holds no {operation} grant{what} for this device",
            )
        return reach

    async def Export(  # noqa: N802 - the gRPC method name
        self, request: features_pb2.ExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[features_pb2.FeatureRecord]:
        requested, device = await self._check_request(request.families, request.device, context)
        if device is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "export names one device (16 hex digits)")
        try:
            principal = await self.authenticator.authenticate(context)
            granted = self._granted(context.peer(), principal, requested, "export")
            families = set(self._for_device(context.peer(), principal, granted, requested, device, "export"))
        except Refusal as e:
            await context.abort(e.code, e.reason)
        cursor = 0
        page = self.config.subscribe_page
        while True:
            rows = await self.reader.call(
                self.reader.store.read_since, cursor, families=families, device=device, limit=page
            )
            for row_cursor, record in rows:
                yield feature_record(row_cursor, record)
                cursor = row_cursor
            if len(rows) < page:
                return

    async def Subscribe(  # noqa: N802 - the gRPC method name
        self, request: features_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[features_pb2.FeatureRecord]:
        requested, device = await self._check_request(request.families, request.device, context)
        peer = context.peer()
        try:
            principal = await self.authenticator.authenticate(context)
            granted = self._granted(peer, principal, requested)
            granted = self._for_device(peer, principal, granted, requested, device, "subscribe")
        except Refusal as e:
            await context.abort(e.code, e.reason)
        version = self.registry.policy.version if self.registry.policy is not None else 0
        cursor = request.from_cursor
        page = self.config.subscribe_page
        self.metrics.subscribers.inc()
        try:
            while not self.draining.is_set():
                seen = self.signal.version
                policy = self.registry.policy
                if policy is not None and policy.version != version:
                    version = policy.version
                    try:
                        granted = self._granted(peer, principal, requested)
                        granted = self._for_device(peer, principal, granted, requested, device, "subscribe")
                    except Refusal as e:
                        await context.abort(e.code, e.reason)
                narrowed = any(d is not None for d in granted.values())
                rows = await self.reader.call(
                    self.reader.store.read_since, cursor, families=set(granted), device=device, limit=page
                )
                for row_cursor, record in rows:
                    cursor = row_cursor
                    if narrowed:
                        devices = granted.get(record["family"])
                        if devices is not None and record["device"] not in devices:
                            continue
                    yield feature_record(row_cursor, record)
                if len(rows) == page:
                    continue
                if request.no_follow:
                    return
                await self.signal.wait(seen, self.draining)
        finally:
            self.metrics.subscribers.dec()


class Gateway:
    """The assembled service. start/shutdown contract: start binds and opens everything (a second start is
    a no-op); shutdown drains (see the module docstring) and is safe without start, and twice.

    Listeners: `address` (mutual TLS; plaintext with `insecure`), `token_address` (server-authenticated
    TLS for bearer tokens) and `health_address` (plaintext gRPC health, loopback only). `shared_port`: the
    first two are bound with SO_REUSEPORT, as one of the serving processes of `serve --workers N`
    (gateway/supervisor.py, whose port lock keeps any other gateway off them); otherwise a second gateway
    on the same port fails to bind instead of sharing it. `listeners`: "all", or only the mutual-TLS one
    ("tls") or only the token one ("token"), for a supervisor that serves them from separate processes."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        authenticator: Authenticator | None = None,
        consent: ConsentGate | None = None,
        clock: Callable[[], float] = time.time,
        shared_port: bool = False,
        listeners: str = "all",
    ):
        self.config = config.validate()
        self.shared_port = shared_port
        if listeners not in ("all", "tls", "token"):
            raise ValueError(f"listeners: 'all', 'tls' or 'token', not {listeners!r}")
        if listeners != "all" and (self.config.insecure or not self.config.token_listen):
            raise ValueError(
                "listeners 'tls' or 'token' split TLS listeners: not with insecure, nor without token_listen"
            )
        self.listeners = listeners
        self.authenticator = authenticator
        self.consent = consent  # None: the registry's consent and minors rules (gateway/privacy)
        self.clock = clock  # wall clock (s) of the retention sweeper: a test injects its own
        self.sweeper: Sweeper | None = None
        self.privacy: RegistryConsent | None = None
        self.keys: DataKeyStore | None = None
        self.metrics = Metrics()
        self.address: str | None = None
        self.token_address: str | None = None
        self.health_address: str | None = None
        self.security: security_setup.SecuritySetup | None = None
        self.registry: Registry | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._pipeline: Pipeline | None = None
        self._reader: StoreThread | None = None
        self._registry_thread: StoreThread | None = None
        self._health: Any = None
        self._store_watch: StoreWatch | None = None
        self._draining: asyncio.Event | None = None
        self._ingest: IngestService | None = None
        self._retention: asyncio.Future | None = None
        self.drainer: Drainer | None = None  # the feature stream's publisher (with `stream` set)
        self._drainer_name: DrainerName | None = None

    async def start(self) -> str:
        """Open the store, bind, serve; returns the bound HOST:PORT of the main listener."""
        if self._server is not None:
            assert (self.address or self.token_address) is not None
            return self.address or self.token_address
        c = self.config
        # credentials first: a gateway that cannot serve TLS must not have started anything
        self.security = security = await asyncio.to_thread(security_setup.prepare, c)
        for line in security.created:
            log.info("created", extra={"fields": {"event": "state_created", "what": line}})
        self._draining = asyncio.Event()
        signal_ = CommitSignal()
        # data keys (encryption at rest) in their own store, wrapped by a key-encryption key kept apart:
        # keys.db in the state dir, or with a PostgreSQL store a schema of its database that every gateway
        # of the fleet shares (a device's key is one key wherever it connects, an erasure reaches all)
        self.keys = keys = key_store_for_url(
            c.store, security.state.root, load_kek(security.state.root), schema=c.key_schema
        )
        await asyncio.to_thread(keys.open)
        # one pseudonym key for erasure tombstones and the devices audit entries name
        pseudonyms = load_tombstone_key(security.state.root / TOMBSTONE_FILE)
        sealer = KeySealer(keys, pseudonyms) if c.encrypt_at_rest else None
        self.privacy = RegistryConsent(
            lambda: self.registry.policy.snapshot if self.registry and self.registry.policy else None,
            lambda device, ownership, row: unseal(
                keys.data_key(device, ownership, create=False), row.sealed, row.version
            ),
            c.consent_settings(),
        )
        # store → ack. With a stream, the same commits write the outbox (in every process that commits),
        # and the drainer publishes it beside the batch path: an unreachable stream never holds up an ack.
        store_url = outbox_url(c.store) if c.stream else c.store

        def committed() -> None:
            signal_.notify()
            if self.drainer is not None:
                self.drainer.wake()

        self._pipeline = Pipeline(
            c.replace(store=store_url),
            store_for_url(store_url, sealer),
            lambda: store_for_url(store_url, sealer),
            self.consent or self.privacy,
            self.metrics,
            on_commit=committed,
            sealing_dir=str(security.state.root) if sealer is not None else "",
        )
        await self._pipeline.start()  # opens (and migrates) the store, starts the workers, before we listen
        # The token process (`serve --token-process`) commits outbox entries but drains none: the mutual-TLS
        # processes do. It runs SCHED_IDLE and takes the bad-token floods, and on SQLite the one drainer of
        # the file would otherwise stay with it once it had the outbox.
        if c.stream and self.listeners != "token":
            outbox_store = store_for_url(store_url, sealer)
            # its leases under a name this state dir keeps: restarted after a crash, it takes them back
            self._drainer_name = claim_drainer_name(security.state.root)
            outbox_store.name_drainer(self._drainer_name.name)
            outbox = StoreThread(outbox_store, "outbox")
            await asyncio.to_thread(outbox.start)
            self.drainer = Drainer(
                outbox, stream_for_url(c.stream, c.retention_settings().days), self.metrics
            )
            await self.drainer.start()
        self._reader = StoreThread(store_for_url(c.store, sealer), "reader")
        await asyncio.to_thread(self._reader.start)
        self._registry_thread = StoreThread(store_for_url(c.store), "registry")
        await asyncio.to_thread(self._registry_thread.start)
        self.registry = registry = Registry(
            self._registry_thread,
            audit_key=security.state.audit_key,
            audit_head=security.state.audit_head,
            pseudonyms=pseudonyms,
            segments=Segments(c.audit_segment_entries, c.audit_segment_days * 86_400),
            auto_register=c.auto_register,
            metrics=self.metrics,
        )
        registry.indexers.append(self.privacy.prepare)  # the consent index, built off the loop
        await registry.start()
        journal = ErasureJournal(
            Path(c.erasure_journal) if c.erasure_journal else security.state.root / JOURNAL_FILE,
            pseudonyms.pseudonym,
        )
        await self._reapply_erasures(journal, registry, keys)
        registry.before_apply = lambda ops: _journal(journal, ops, registry, keys)
        registered = (
            {(p.kind, p.name) for p in registry.policy.principals.values()} if registry.policy else set()
        )
        events, ops = security_setup.bootstrap_ops(security, registered)
        if ops:
            await registry.apply(events, ops)
        registry.listeners.append(lambda _policy: signal_.notify())  # subscriptions re-read their grants
        if self.authenticator is None:
            self.authenticator = InsecureLoopbackAuthenticator() if c.insecure else TlsAuthenticator(registry)
        self.sweeper = Sweeper(
            c.retention_settings(), self._pipeline.writer, registry.apply, now=lambda: self.clock()
        )
        if self.sweeper.retention:
            self._retention = asyncio.ensure_future(self.sweeper.run(c.retention_check_s))
        options = [
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.keepalive_time_ms", c.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", c.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 3),
            ("grpc.so_reuseport", int(self.shared_port)),
        ]
        if c.max_connection_idle_ms:
            options.append(("grpc.max_connection_idle_ms", c.max_connection_idle_ms))
        server = grpc.aio.server(options=options)
        self._ingest = IngestService(
            self._pipeline, self.authenticator, registry, self.metrics, self._draining, c.region_settings()
        )
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(self._ingest, server)
        features_pb2_grpc.add_FeatureServiceServicer_to_server(
            FeatureService(
                self._reader, signal_, c, self.metrics, self._draining, self.authenticator, registry
            ),
            server,
        )
        add_services(
            server,
            AdminService(self.authenticator, registry, security, c),
            IdentityService(self.authenticator, registry, security, c),
        )
        reader, writer = self._reader, self._pipeline.writer
        privacy_pb2_grpc.add_PrivacyServiceServicer_to_server(
            PrivacyService(
                self.authenticator,
                registry,
                self.privacy,
                keys.data_key,
                lambda caller, ownership, fmt: export_lines(
                    caller, ownership, fmt, reader=reader, data_key=keys.data_key, pseudonyms=pseudonyms
                ),
                lambda caller: erase(caller, registry=registry, writer=writer, destroy_keys=keys.destroy),
            ),
            server,
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if c.insecure:
            log.warning(
                "serving PLAINTEXT on a loopback address (--insecure): development only",
                extra={"fields": {"event": "insecure", "listen": c.listen}},
            )
            port = server.add_insecure_port(c.listen)
            self.address = f"{c.listen.rpartition(':')[0]}:{port}"
        else:
            assert security.tls is not None
            if self.listeners != "token":
                mtls = ReloadingCredentials(security.tls, require_client_auth=True)
                port = server.add_secure_port(c.listen, mtls.server_credentials())
                self.address = f"{c.listen.rpartition(':')[0]}:{port}"
            if c.token_listen and self.listeners != "tls":
                tls_only = ReloadingCredentials(security.tls, require_client_auth=False)
                token_port = server.add_secure_port(c.token_listen, tls_only.server_credentials())
                self.token_address = f"{c.token_listen.rpartition(':')[0]}:{token_port}"
        if c.health_listen:
            # Probes have no client certificate: a plaintext server of its own, health only, loopback only.
            health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, health_server)
            health_port = health_server.add_insecure_port(c.health_listen)
            self.health_address = f"{c.health_listen.rpartition(':')[0]}:{health_port}"
            await health_server.start()
            self._health_server = health_server
        await server.start()
        self._server = server
        await self._set_serving(True)
        self._store_watch = StoreWatch(
            lambda: writer.call(writer.store.check_writable),
            self._set_serving,
            lambda available: self.metrics.store_available.set(int(available)),
        )
        self._pipeline.store_down = self._store_watch.unavailable
        self.metrics.start(c.metrics_listen)
        log.info(
            "gateway serving",
            extra={
                "fields": {
                    "event": "serving",
                    "address": self.address,
                    "token_address": self.token_address or "",
                    "health_address": self.health_address or "",
                    "tls": not c.insecure,
                    "state_dir": str(security.state.root),
                    "store": _safe_url(c.store),
                    "stream": _safe_url(c.stream),
                }
            },
        )
        return self.address or self.token_address

    async def _reapply_erasures(
        self, journal: ErasureJournal, registry: Registry, keys: DataKeyStore
    ) -> None:
        """A store restored from a backup holds what was erased or withdrawn since: do it again, before
        serving (gateway/privacy/journal.py)."""
        if not journal.entries():
            return
        assert self._reader is not None and self._pipeline is not None
        held = await self._reader.call(self._reader.store.ownerships_held)
        plan = journal.plan(registry.policy.snapshot if registry.policy else None, held)
        if not plan:
            return
        for device, ownership in plan.erasures:
            await asyncio.to_thread(keys.destroy, device, ownership or UNOWNED)
        devices = sorted({d for d, _ in plan.erasures} | {op.device for op in (*plan.forget, *plan.ops)})
        events = [AuditEvent("device.erasure_reapplied", JOURNAL_ACTOR, f"device:{d}") for d in devices]
        await registry.apply(events, [*plan.forget, *plan.ops])
        writer = self._pipeline.writer
        for device, ownership in plan.erasures:
            await writer.call(writer.store.erase_device, int(device, 16), ownership)
        log.warning(
            "restored data re-erased from the erasure journal",
            extra={
                "fields": {
                    "event": "erasure_journal_reapplied",
                    "erasures": len(plan.erasures),
                    "registry_ops": len(plan.forget) + len(plan.ops),
                }
            },
        )

    async def _set_serving(self, serving: bool) -> None:
        """Every service's health, SERVING or NOT_SERVING; never SERVING again once draining."""
        if serving and self._draining is not None and self._draining.is_set():
            return
        codes = health_pb2.HealthCheckResponse
        status = codes.SERVING if serving else codes.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    async def shutdown(self) -> None:
        if self._store_watch is not None:
            await self._store_watch.close()
        server, self._server = self._server, None
        if server is not None:
            log.info("gateway draining", extra={"fields": {"event": "draining"}})
            await self._health.enter_graceful_shutdown()
            assert self._draining is not None
            self._draining.set()
            if self._retention is not None:
                self._retention.cancel()
            if self._ingest is not None:
                await self._ingest.wait_idle(self.config.shutdown_grace_s)
            await server.stop(self.config.shutdown_grace_s)
        health_server, self._health_server = self._health_server, None
        if health_server is not None:
            await health_server.stop(0)
        registry, self.registry = self.registry, None
        if registry is not None:
            await registry.shutdown()
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            await pipeline.shutdown()
        drainer, self.drainer = self.drainer, None
        if drainer is not None:  # after the last commits: a clean stop publishes them (what is left waits)
            await drainer.shutdown(flush_s=min(self.config.shutdown_grace_s, 5.0))
            await asyncio.to_thread(drainer.outbox.shutdown)
        drainer_name, self._drainer_name = self._drainer_name, None
        if drainer_name is not None:  # after the store let go of its leases
            drainer_name.close()
        for attr in ("_reader", "_registry_thread"):
            thread = getattr(self, attr)
            setattr(self, attr, None)
            if thread is not None:
                await asyncio.to_thread(thread.shutdown)
        keys, self.keys = self.keys, None
        if keys is not None:
            await asyncio.to_thread(keys.close)
        self.metrics.shutdown()
        if server is not None:
            log.info("gateway stopped", extra={"fields": {"event": "stopped"}})

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _safe_url(url: str) -> str:
    """A store or stream URL without credentials, for logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


@contextlib.asynccontextmanager
async def run_server(
    config: GatewayConfig,
    *,
    authenticator: Authenticator | None = None,
    consent: ConsentGate | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Gateway]:
    """A running gateway for tests: `async with run_server(cfg) as gw: ... gw.address`."""
    gateway = Gateway(config, authenticator=authenticator, consent=consent, clock=clock)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.shutdown()


def serve(config: GatewayConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain and return 0. The ports of `listen` and `token_listen` are
    locked first (gateway/listen.py): a second `serve` on them fails at once, saying who holds them."""

    async def main() -> int:
        gateway = Gateway(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await gateway.start()
            heap.settle()  # after start: the registry's policy and grpc's server state are in the frozen heap
            await stop.wait()
        finally:
            await gateway.shutdown()
        return 0

    with PortLocks([config.listen, config.token_listen]):
        return asyncio.run(main())


__all__ = ["Gateway", "feature_record", "run_server", "serve"]
