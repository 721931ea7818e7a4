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
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bandgate.v1 import features_pb2, features_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from decoder.records import device_key
from gateway.auth import Authenticator, AuthError, InsecureLoopbackAuthenticator
from gateway.config import GatewayConfig
from gateway.consent import AllowAll, ConsentGate
from gateway.metrics import Metrics
from gateway.pipeline import ALL_FAMILIES, Pipeline, StoreThread
from gateway.store import store_for_url

log = logging.getLogger("bandgate.server")

SERVICE_NAMES = (
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
    features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name,
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


class _LiveStreams:
    """The one live upload stream of each device: opening a stream supersedes the previous one."""

    def __init__(self) -> None:
        self._live: dict[int, asyncio.Event] = {}

    def open(self, device_id: int) -> asyncio.Event:
        """The new stream's `superseded` event; sets the previous stream's."""
        previous = self._live.get(device_id)
        if previous is not None:
            previous.set()
        self._live[device_id] = superseded = asyncio.Event()
        return superseded

    def close(self, device_id: int, superseded: asyncio.Event) -> None:
        if self._live.get(device_id) is superseded:
            del self._live[device_id]

    def __len__(self) -> int:
        return len(self._live)


class IngestService(ingest_pb2_grpc.IngestServiceServicer):
    """Upload: one device per stream, one batch at a time, so a slow store slows the band (gRPC flow
    control) instead of queueing its batches here."""

    def __init__(
        self, pipeline: Pipeline, authenticator: Authenticator, metrics: Metrics, draining: asyncio.Event
    ):
        self.pipeline = pipeline
        self.authenticator = authenticator
        self.metrics = metrics
        self.draining = draining
        self.streams = _LiveStreams()
        # Handlers still running (superseded ones included): shutdown waits for them to send their
        # status before it stops the server, so no stream is cut by core shutdown mid-status.
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

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

    async def _upload(self, context: grpc.aio.ServicerContext) -> None:
        try:
            device_id = self.authenticator.authenticate(
                context.peer(), tuple(context.invocation_metadata() or ())
            )
        except AuthError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        if self.draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        device = device_key(device_id)
        superseded = self.streams.open(device_id)
        self.metrics.devices.set(len(self.streams))
        log.info("stream opened", extra={"fields": {"event": "stream_open", "device": device}})
        batches = 0
        # One watcher for the stream's life, not one per batch: tasks are most of the loop's own cost.
        stop = asyncio.ensure_future(_first(superseded, self.draining))
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
                await context.write(await self.pipeline.handle(device_id, batch))
                batches += 1
                if superseded.is_set() or self.draining.is_set():
                    break
        finally:
            stop.cancel()
            self.streams.close(device_id, superseded)
            self.metrics.devices.set(len(self.streams))
            log.info(
                "stream closed",
                extra={"fields": {"event": "stream_close", "device": device, "batches": batches}},
            )
        if superseded.is_set():
            await context.abort(grpc.StatusCode.ABORTED, "superseded by a newer stream for the same device")
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
    and a commit becomes visible all at once, so paging by the last cursor sent has no gaps or repeats."""

    def __init__(
        self,
        reader: StoreThread,
        signal_: CommitSignal,
        config: GatewayConfig,
        metrics: Metrics,
        draining: asyncio.Event,
    ):
        self.reader = reader
        self.signal = signal_
        self.config = config
        self.metrics = metrics
        self.draining = draining

    async def Subscribe(  # noqa: N802 - the gRPC method name
        self, request: features_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[features_pb2.FeatureRecord]:
        unknown = set(request.families) - ALL_FAMILIES
        if unknown:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown families {sorted(unknown)}; known {sorted(ALL_FAMILIES)}",
            )
        device = request.device.lower() or None
        if device is not None and (len(device) != 16 or any(c not in "0123456789abcdef" for c in device)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "device must be 16 hex digits")
        families = set(request.families) or None
        cursor = request.from_cursor
        page = self.config.subscribe_page
        self.metrics.subscribers.inc()
        try:
            while not self.draining.is_set():
                seen = self.signal.version
                rows = await self.reader.call(
                    self.reader.store.read_since, cursor, families=families, device=device, limit=page
                )
                for row_cursor, record in rows:
                    yield feature_record(row_cursor, record)
                    cursor = row_cursor
                if len(rows) == page:
                    continue
                if request.no_follow:
                    return
                await self.signal.wait(seen, self.draining)
        finally:
            self.metrics.subscribers.dec()


class Gateway:
    """The assembled service. start/shutdown contract: start binds and opens everything (a second start is
    a no-op); shutdown drains (see the module docstring) and is safe without start, and twice."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        authenticator: Authenticator | None = None,
        consent: ConsentGate | None = None,
    ):
        self.config = config.validate()
        self.authenticator = authenticator
        self.consent = consent or AllowAll()
        self.metrics = Metrics()
        self.address: str | None = None
        self._server: grpc.aio.Server | None = None
        self._pipeline: Pipeline | None = None
        self._reader: StoreThread | None = None
        self._health: Any = None
        self._draining: asyncio.Event | None = None
        self._ingest: IngestService | None = None
        self._retention: asyncio.Future | None = None

    async def start(self) -> str:
        """Open the store, bind, serve; returns the bound HOST:PORT."""
        if self._server is not None:
            assert self.address is not None
            return self.address
        c = self.config
        if self.authenticator is None:
            self.authenticator = InsecureLoopbackAuthenticator()
        self._draining = asyncio.Event()
        signal_ = CommitSignal()
        self._pipeline = Pipeline(
            c,
            store_for_url(c.store),
            lambda: store_for_url(c.store),
            self.consent,
            self.metrics,
            on_commit=signal_.notify,
        )
        await self._pipeline.start()  # opens (and migrates) the store, starts the workers, before we listen
        self._reader = StoreThread(store_for_url(c.store), "reader")
        await asyncio.to_thread(self._reader.start)
        if c.retention_days > 0:
            self._retention = asyncio.ensure_future(self._retain())
        options = [
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.keepalive_time_ms", c.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", c.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 3),
            ("grpc.so_reuseport", 0),  # a second gateway on the same port fails instead of sharing it
        ]
        if c.max_connection_idle_ms:
            options.append(("grpc.max_connection_idle_ms", c.max_connection_idle_ms))
        server = grpc.aio.server(options=options)
        self._ingest = IngestService(self._pipeline, self.authenticator, self.metrics, self._draining)
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(self._ingest, server)
        features_pb2_grpc.add_FeatureServiceServicer_to_server(
            FeatureService(self._reader, signal_, c, self.metrics, self._draining), server
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = server.add_insecure_port(c.listen)
        host = c.listen.rpartition(":")[0]
        self.address = f"{host}:{port}"
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.start(c.metrics_listen)
        log.info(
            "gateway serving",
            extra={"fields": {"event": "serving", "address": self.address, "store": _safe_url(c.store)}},
        )
        return self.address

    async def shutdown(self) -> None:
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
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            await pipeline.shutdown()
        reader, self._reader = self._reader, None
        if reader is not None:
            await asyncio.to_thread(reader.shutdown)
        self.metrics.shutdown()
        if server is not None:
            log.info("gateway stopped", extra={"fields": {"event": "stopped"}})

    async def _retain(self) -> None:
        """Purge expired records now and every `retention_check_s`; a failed purge is retried next time."""
        while True:
            try:
                purged = await self._pipeline.purge_expired(time.time_ns() // 1000)
                if purged:
                    log.info("retention purge", extra={"fields": {"event": "purged", "records": purged}})
            except Exception as e:  # the store may be busy or full; serving goes on
                log.warning(
                    "retention purge failed",
                    extra={"fields": {"event": "purge_failed", "error": type(e).__name__}},
                )
            await asyncio.sleep(self.config.retention_check_s)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _safe_url(url: str) -> str:
    """A store URL without credentials, for logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


@contextlib.asynccontextmanager
async def run_server(
    config: GatewayConfig,
    *,
    authenticator: Authenticator | None = None,
    consent: ConsentGate | None = None,
) -> AsyncIterator[Gateway]:
    """A running gateway for tests: `async with run_server(cfg) as gw: ... gw.address`."""
    gateway = Gateway(config, authenticator=authenticator, consent=consent)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.shutdown()


def serve(config: GatewayConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain and return 0."""

    async def main() -> int:
        gateway = Gateway(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await gateway.start()
            await stop.wait()
        finally:
            await gateway.shutdown()
        return 0

    return asyncio.run(main())


__all__ = ["Gateway", "feature_record", "run_server", "serve"]
