"""The gateway's settings in one typed place: defaults, then a TOML file, then `BANDGATE_*`, then flags.

`GatewayConfig.validate` runs before anything starts, so a bad value stops the gateway with a message
that names the setting instead of surfacing later as a confusing failure under load.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from decoder import config as decoder_config
from gateway.privacy.keys import check_key_schema

ENV_PREFIX = "BANDGATE_"


class ConfigError(ValueError):
    """A setting that the gateway refuses to start with; the message names the setting."""


@dataclass(frozen=True)
class GatewayConfig:
    """Every knob of `bandgate serve`. Limits are per batch or per device unless said otherwise."""

    listen: str = "127.0.0.1:50051"  # mutual TLS: bands, relays and consumers with certificates
    store: str = "sqlite:///bandgate.db"
    metrics_listen: str = ""  # host:port for Prometheus; empty = no metrics endpoint
    # The feature stream (docs/streams.md): nats://[user:password@]host:port[?prefix=p]; empty = none.
    # Records reach it through the store's outbox, so an unreachable stream never holds up an ack.
    stream: str = ""

    # Identity and transport (docs/security.md). Credentials and keys live in `state_dir` (empty: the
    # default, $BANDGATE_STATE_DIR or $XDG_DATA_HOME/bandgate); with no tls_* files given, the first start
    # creates a development CA, a server certificate and the local operator and consumer credentials there.
    state_dir: str = ""
    token_listen: str = "127.0.0.1:50052"  # server-authenticated TLS for bearer tokens; empty = off
    health_listen: str = "127.0.0.1:50050"  # plaintext gRPC health for probes, loopback only; empty = off
    # Extra DNS names or IPs (comma-separated) the development server certificate must carry: the names
    # clients dial (a load balancer's, a container's published host). Ignored with tls_* files given.
    server_names: str = ""
    tls_cert: str = ""  # server certificate chain (PEM); reloaded when the file changes
    tls_key: str = ""
    tls_ca: str = ""  # CA bundle trusted for client certificates; reloaded when the file changes
    ca_key: str = ""  # key of the CA in tls_ca that may sign CSRs (registration, renewal); empty = none
    cert_days: int = 365  # validity of certificates the gateway signs
    auto_register: bool = False  # accept (and register) an unknown device whose certificate the CA signed
    insecure: bool = False  # plaintext, identities claimed in metadata: development, loopback only

    # Privacy (docs/privacy.md). Families a device's owner has not decided on follow `default_consent`
    # ("" = none: nothing is processed until the owner consents; "all"; or "steps,heart,..."). Below the
    # age of digital consent for the owner's country (the table in gateway/privacy/minors.py, overridden
    # by `consent_ages` "FR=15,US=13", else `consent_age_default`) a guardian's consent is needed; a
    # profile without a birth year is treated as `age_unknown` ("minor" or "adult").
    default_consent: str = ""
    # Feature values and device state sealed (AES-256-GCM) under per-device data keys; off only to measure
    # what it costs (bench), never in production.
    encrypt_at_rest: bool = True
    # With a PostgreSQL store, the data keys live in this schema of its database (docs/privacy-keys.md);
    # with SQLite, in keys.db in the state dir.
    key_schema: str = "bandgate_keys"
    consent_ages: str = ""
    consent_age_default: int = 16
    age_unknown: str = "minor"

    # Limits, checked before any decompression (each error names its limit).
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC receive limit; larger messages end the stream
    max_frames_per_batch: int = 1024
    max_decompressed_bytes: int = decoder_config.MAX_DECOMPRESSED_BYTES
    rate_batches_per_s: float = 0.0  # per device, token bucket; 0 = unlimited
    rate_burst_batches: float = 10.0
    rate_samples_per_s: float = 0.0  # per device, charged after decoding; 0 = unlimited
    rate_burst_samples: float = 600_000.0
    # The rate buckets live in the store, so they hold for a device across every serving process and
    # gateway on it (one small write a batch with a rate set); false: each process keeps its own.
    shared_limits: bool = True

    # Backpressure: bounded queues and how long a batch may wait for room.
    commit_queue: int = 64  # commits queued on the writer thread (compute_processes = 0 only)
    compute_queue: int = 1024  # batches decoding or waiting for a compute worker (bounds memory, not speed)
    overload_wait_ms: int = 250  # wait this long for room in either queue, then RESOURCE_EXHAUSTED
    retry_after_ms: int = 1000  # what an overloaded gateway tells the band
    # Serving processes on the one port (`serve --workers N`, gateway/supervisor.py): each a whole gateway
    # with its own gRPC server and its own `compute_processes`, over the shared store and state dir.
    # 1 = this process serves, no supervisor.
    workers: int = 1
    # The token listener in a serving process of its own, beside the `workers` that serve mutual TLS
    # (gateway/supervisor.py): callers there have proved nothing at the handshake, so a flood of bad tokens
    # takes that process's event loop, not the one the bands are served from (docs/security.md).
    token_process: bool = False
    compute_processes: int = 2  # decode + features worker processes; 0 = compute threads in this process
    compute_threads: int = 2  # decode + features threads when compute_processes = 0
    # A compute worker holding batches that answers none of them for this long is killed and replaced
    # (its batches UNAVAILABLE, resent by the bands); 0 = never. Threads cannot be killed: none there.
    compute_deadline_s: float = 30.0
    subscribe_page: int = 500  # records a subscriber reads per store query

    # Retention (gateway/privacy/retention.py): records whose period started more than `retention_days`
    # ago are deleted (0 = kept until erased); `retention` overrides it per family ("heart=90,sleep=30").
    # Checked every `retention_check_s`; each sweep that deletes something is audited.
    retention_days: float = 0.0
    retention: str = ""
    retention_check_s: float = 3600.0
    # The erasure journal (gateway/privacy/journal.py): "" = erasures.journal in the state dir. Keep it
    # where restoring the store's backups does not restore it too.
    erasure_journal: str = ""
    # The audit log is kept by segment (gateway/security/audit.py): a segment closes at this many entries
    # or after this many days (0 = no age limit), and `bandgate audit drop-before` drops whole old ones.
    audit_segment_entries: int = 10_000
    audit_segment_days: float = 1.0

    # Regions (gateway/regions.py): the region this gateway serves ("" = one region, nothing checked), where
    # every region is ("eu=eu.example:443,us=us.example:443"), and the home of certificates without one.
    region: str = ""
    regions: str = ""
    region_default: str = ""

    # gRPC transport.
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    max_connection_idle_ms: int = 0  # 0 = never close idle connections
    shutdown_grace_s: float = 10.0  # SIGTERM: how long in-flight batches get to finish

    def validate(self) -> GatewayConfig:
        """Refuse values the gateway cannot run with; returns self so it chains."""
        _address("listen", self.listen)
        if self.metrics_listen:
            _address("metrics_listen", self.metrics_listen)
        host, _ = _address("listen", self.listen)
        if self.insecure:
            from gateway.auth import is_loopback_host

            if not is_loopback_host(host):
                raise ConfigError(
                    f"insecure: plaintext is served on a loopback address only, not {self.listen}; "
                    "drop --insecure to serve TLS"
                )
        if self.health_listen:
            from gateway.auth import is_loopback_host

            if not is_loopback_host(_address("health_listen", self.health_listen)[0]):
                raise ConfigError(
                    f"health_listen: plaintext health is for loopback only, not {self.health_listen}"
                )
        if self.token_listen:
            _address("token_listen", self.token_listen)
        if self.token_process and (not self.token_listen or self.insecure):
            raise ConfigError("token_process needs a token listener (token_listen) and TLS (not --insecure)")
        for name in self.server_hosts():
            if any(c.isspace() or c in "/:@" for c in name) and not _is_ip(name):
                raise ConfigError(f"server_names: {name!r} is neither a DNS name nor an IP address")
        tls = [self.tls_cert, self.tls_key, self.tls_ca]
        if any(tls) and not all(tls):
            raise ConfigError(
                "tls_cert, tls_key and tls_ca go together (or none: the state dir's development CA)"
            )
        if self.ca_key and not self.tls_ca:
            raise ConfigError("ca_key needs tls_ca (the CA it belongs to)")
        self.consent_settings()  # refuses unknown families, ages and age_unknown values
        self.retention_settings()  # refuses unknown families and negative days
        self.region_settings()  # refuses malformed names and a region not among `regions`
        if "://" not in self.store:
            raise ConfigError(f"store: {self.store!r} is not a store URL (e.g. sqlite:///bandgate.db)")
        try:
            check_key_schema(self.key_schema)
        except ValueError as e:
            raise ConfigError(f"key_schema: {e}") from None
        if self.stream:
            from gateway.stream import check_stream_url

            try:
                check_stream_url(self.stream)
            except ValueError as e:
                raise ConfigError(f"stream: {e}") from None
        for name in (
            "max_message_bytes",
            "max_frames_per_batch",
            "max_decompressed_bytes",
            "commit_queue",
            "compute_queue",
            "compute_threads",
            "workers",
            "subscribe_page",
            "keepalive_time_ms",
            "keepalive_timeout_ms",
            "cert_days",
            "retention_check_s",
            "audit_segment_entries",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "compute_processes",
            "rate_batches_per_s",
            "rate_samples_per_s",
            "overload_wait_ms",
            "retry_after_ms",
            "max_connection_idle_ms",
            "retention_days",
            "audit_segment_days",
            "shutdown_grace_s",
            "compute_deadline_s",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rate_batches_per_s and self.rate_burst_batches < 1:
            raise ConfigError(f"rate_burst_batches must be >= 1, got {self.rate_burst_batches}")
        if self.rate_samples_per_s and self.rate_burst_samples < 1:
            raise ConfigError(f"rate_burst_samples must be >= 1, got {self.rate_burst_samples}")
        return self

    def consent_settings(self) -> Any:
        """The privacy rules these settings make (gateway.privacy.consent.ConsentSettings)."""
        from gateway.privacy.consent import ConsentSettings, parse_families
        from gateway.privacy.minors import ConsentAges, parse_ages

        try:
            if not 0 < self.consent_age_default < 100:
                raise ValueError(f"consent_age_default must be 1 to 99, got {self.consent_age_default}")
            return ConsentSettings(
                default_families=parse_families(self.default_consent),
                ages=ConsentAges(parse_ages(self.consent_ages), self.consent_age_default),
                age_unknown=self.age_unknown,
            )
        except ValueError as e:
            text = str(e)
            if not text.startswith(("consent", "age_unknown", "default_consent")):
                text = f"default_consent: {text}"
            raise ConfigError(text) from None

    def retention_settings(self) -> Any:
        """Days kept per family (gateway.privacy.retention.Retention): `retention_days`, then `retention`."""
        from gateway.privacy.retention import Retention

        try:
            return Retention.from_settings(self.retention_days, self.retention)
        except ValueError as e:
            text = str(e)
            raise ConfigError(text if text.startswith("retention") else f"retention: {text}") from None

    def region_settings(self) -> Any:
        """This gateway's region and the others' addresses (gateway.regions.Regions)."""
        from gateway.regions import Regions

        try:
            return Regions.from_settings(self.region, self.regions, self.region_default)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def server_hosts(self) -> list[str]:
        """server_names as a list, blanks dropped."""
        return [n.strip() for n in self.server_names.split(",") if n.strip()]

    def replace(self, **changes: Any) -> GatewayConfig:
        return dataclasses.replace(self, **changes)


def _address(name: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{name}: {value!r} is not HOST:PORT")
    return host, int(port)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def split_address(value: str) -> tuple[str, int]:
    """HOST:PORT → (host, port), brackets of an IPv6 host removed."""
    host, port = _address("address", value)
    return host.strip("[]"), port


def _coerce(name: str, kind: type, raw: Any) -> Any:
    """A value from TOML or the environment as the field's type, with an error that names the field."""
    try:
        if kind is bool:
            return raw if isinstance(raw, bool) else str(raw).lower() in {"1", "true", "yes", "on"}
        if kind is int and isinstance(raw, float):
            raise ValueError("not an integer")
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {raw!r} is not a valid {kind.__name__}") from None


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def load_config(
    *,
    file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> GatewayConfig:
    """Defaults ← TOML `file` (keys as the field names, top level or under [gateway]) ← `BANDGATE_<FIELD>`
    environment variables ← `overrides` (command-line flags; None values are ignored). Validated."""
    types = {f.name: _TYPES[f.type] if isinstance(f.type, str) else f.type for f in fields(GatewayConfig)}
    values: dict[str, Any] = {}
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"--config {file}: {e}") from None
        data = data.get("gateway", data)
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in types:
                raise ConfigError(f"--config {file}: unknown setting {key!r}")
            values[name] = _coerce(name, types[name], raw)
    env = os.environ if environ is None else environ
    for name, kind in types.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(ENV_PREFIX + name.upper(), kind, raw)
    for name, raw in (overrides or {}).items():
        if raw is not None:
            if name not in types:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = _coerce(name, types[name], raw)
    return GatewayConfig(**values).validate()
