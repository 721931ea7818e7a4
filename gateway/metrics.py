"""Prometheus metrics of one gateway. Each gateway has its own registry, so several can run in one
process (tests) and none leaks into the global default registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from gateway.config import split_address


class Metrics:
    """Counts, never contents: labels are codes and reasons, not device IDs (unbounded) or values."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batches = Counter("bandgate_batches", "Batches answered, by ack code", ["code"], registry=r)
        self.samples = Counter("bandgate_samples", "Accelerometer samples decoded", registry=r)
        self.bytes_in = Counter("bandgate_bytes_in", "Compressed payload bytes received", registry=r)
        self.bytes_out = Counter("bandgate_bytes_out", "Bytes after decompression", registry=r)
        self.records = Counter("bandgate_records", "Feature records stored", registry=r)
        self.state_resets = Counter(
            "bandgate_state_resets",
            "Devices whose stored feature state did not load, so their stream started afresh",
            registry=r,
        )
        self.decode_errors = Counter(
            "bandgate_decode_errors", "Batches and frames refused, by reason", ["reason"], registry=r
        )
        self.ack_latency = Histogram(
            "bandgate_ack_latency_seconds",
            "From a batch's arrival to its ack",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.commit_queue = Gauge("bandgate_commit_queue_depth", "Commits queued or running", registry=r)
        self.compute_queue = Gauge("bandgate_compute_queue_depth", "Batches decoding or waiting", registry=r)
        self.devices = Gauge("bandgate_devices_connected", "Devices with an open upload stream", registry=r)
        self.subscribers = Gauge("bandgate_subscribers", "Open Subscribe streams", registry=r)
        self.misrouted = Counter(
            "bandgate_streams_misrouted",
            "Upload streams refused because the band's home region is another (sent to its address)",
            registry=r,
        )
        self.store_available = Gauge(
            "bandgate_store_available",
            "1 while the store answers; 0 after a refusal for want of it",
            registry=r,
        )
        self.store_available.set(1)
        self.compute_workers = Gauge(
            "bandgate_compute_workers", "Compute worker processes running", registry=r
        )
        self.worker_restarts = Counter(
            "bandgate_compute_worker_restarts",
            "Compute worker processes that ended unexpectedly (each is started again)",
            registry=r,
        )
        self.auth_refused = Counter(
            "bandgate_auth_refused",
            "Calls refused by identification or authorisation, by status",
            ["code"],
            registry=r,
        )
        self.auth_throttled = Counter(
            "bandgate_auth_throttled",
            "Calls refused RESOURCE_EXHAUSTED because their peer or credential was refused too often",
            registry=r,
        )
        self.token_lookups = Counter(
            "bandgate_token_lookups", "Bearer tokens hashed and looked up", registry=r
        )
        self.registry_reads = Counter(
            "bandgate_registry_reads",
            "Registry reads after a change: the rows of what changed (delta) or the whole registry (full)",
            ["kind"],
            registry=r,
        )
        # the feature stream (gateway/stream): its backlog is on disk, in the store's outbox
        self.outbox_depth = Gauge(
            "bandgate_stream_outbox_depth", "Outbox entries waiting to be published or purged", registry=r
        )
        self.stream_published = Counter(
            "bandgate_stream_published", "Records the feature stream acked", registry=r
        )
        self.stream_errors = Counter(
            "bandgate_stream_errors",
            "Drainer rounds that failed, by what failed (stream, store, bug)",
            ["reason"],
            registry=r,
        )
        self.stream_ack_age = Gauge(
            "bandgate_stream_last_ack_age_seconds",
            "Seconds since the feature stream last acked while entries wait (0: none wait)",
            registry=r,
        )
        self.stream_unguarded = Counter(
            "bandgate_stream_unguarded_republish",
            "Outbox entries published again after the duplicate window: a second copy is possible",
            registry=r,
        )
        self._http = None

    def start(self, listen: str) -> None:
        """Serve /metrics on `listen` (HOST:PORT); a no-op for an empty address."""
        if not listen or self._http is not None:
            return
        host, port = split_address(listen)
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)

    def shutdown(self) -> None:
        """Stop the HTTP endpoint; safe without start, and twice."""
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()

    @property
    def bound_port(self) -> int | None:
        return None if self._http is None else self._http.server_address[1]
