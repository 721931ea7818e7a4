"""Identity and TLS figures for `python -m bench` (issue: identity, transport security and access
control), beside their plaintext baselines in the same run. `bandgate serve` runs as its own process
(`bench.e2e_bench.Gateway`: mutual TLS with the development CA its first start makes, or `--insecure`);
bands are gRPC clients in load-generator processes (`python -m bench.tls_bench load …`).

- `tls_throughput_figures`: 1-minute batches, every band on its own connection, through a TLS gateway
  (each band its own certificate, enrolled through the admin API) and a plaintext one, runs alternating.
- `reconnect_figures`: 2,000 bands, each on its own mutual-TLS connection; the serving process's RSS per
  connection; a restart (SIGTERM, the same port, state dir and store) and the reconnect storm, with 20
  other bands streaming on the new gateway to see what the storm does to their acks.
- `plain_conn_figures`: the same connections in plaintext, for the memory baseline.
- `relay_streams_figures`: 10,000 device streams through 100 relays, one mutual-TLS connection each.

Registering thousands of principals through the admin API costs O(registry) a call (each change
rebuilds the whole policy: 2,000 devices ≈ 40 s, 10,000 bindings ≈ 200 s on the reference box), so the
large fleets are written into the registry in one audited transaction through the store contract
(`seed_registry`, what a bulk import would do), and the admin API's per-call cost at that size is
measured on its own (`admin_register_2k_ms`, `admin_bind_10k_ms`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.e2e_bench import (
    WARM_DEVICE,
    Gateway,
    _children,
    _fleet_file,
    _free_port,
    _recordings,
    _stream,
    _unpin,
    _warm_gateway,
    streams_run,
)
from gateway import heap

STREAMS_DEVICE_BASE = 0x5EED_0000_0000_0000  # the device IDs of e2e_bench._device_batches
BAND_BASE = 0xB0B0_0000_0000_0000  # the reconnecting bands
OBSERVER_BASE = 0x0B5E_0000_0000_0000  # the 20 bands whose acks are watched during the storm
OPERATOR = "consumer:operator"  # the actor the seeded audit entries name, as the admin API would


# --- credentials ------------------------------------------------------------------------------------


def write_credentials(path: Path, ca_pem: bytes, principals: dict[str, tuple[bytes, bytes]]) -> Path:
    """Client certificates for a load generator: {"ca": PEM, "principals": {name: [cert, key]}}, in order.
    Bench-only files in a temp dir (0600): keys of test principals of a throwaway development CA."""
    data = {
        "ca": ca_pem.decode(),
        "principals": {n: [c.decode(), k.decode()] for n, (c, k) in principals.items()},
    }
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


def read_credentials(path: str | Path) -> dict:
    """name (a device's 16 hex digits, a relay's name) → grpc.ChannelCredentials, in the file's order."""
    import grpc

    data = json.loads(Path(path).read_text())
    ca = data["ca"].encode()
    return {
        name: grpc.ssl_channel_credentials(ca, key.encode(), cert.encode())
        for name, (cert, key) in data["principals"].items()
    }


def _operator_channel(gw: Gateway):
    import grpc

    from gateway.security.client import local_identity

    return grpc.aio.secure_channel(gw.address, local_identity("operator", gw.state_dir).credentials())


def enrol(gw: Gateway, device_ids: list[int], *, sequential: bool = False) -> tuple[bytes, dict, float]:
    """Register `device_ids` through the admin API with the operator credential, each with a key made here
    and a CSR the gateway signs (`enrol_device`); returns the CA, name → (cert, key), and the mean wall ms
    a Register took (`sequential`: one call at a time, so that is its latency)."""
    from gateway.security.client import enrol_device

    async def run() -> tuple[bytes, dict, float]:
        out: dict[str, tuple[bytes, bytes]] = {}
        ca = b""
        started = time.perf_counter()
        async with _operator_channel(gw) as channel:
            step = 1 if sequential else 50
            for k in range(0, len(device_ids), step):
                chunk = device_ids[k : k + step]
                for d, identity in zip(
                    chunk, await asyncio.gather(*(enrol_device(channel, d) for d in chunk)), strict=True
                ):
                    out[f"{d:016x}"] = (identity.cert_pem, identity.key_pem)
                    ca = identity.ca_pem
        return ca, out, 1000 * (time.perf_counter() - started) / max(1, len(device_ids))

    return asyncio.run(run())


def seed_registry(
    gw: Gateway, *, devices: list[int] = (), relays: dict[str, list[int]] | None = None
) -> tuple[bytes, dict[str, tuple[bytes, bytes]]]:
    """Register devices and relays (certificates from CSRs the state dir's CA signs, as Register does)
    and bind each relay's devices, in one transaction with its audit entries, through the store contract
    and the gateway's audit log (a running gateway follows: it polls the registry version and catches up
    with the entries). Returns the CA and name → (cert, key)."""
    from gateway.privacy.keys import TOMBSTONE_FILE, load_tombstone_key
    from gateway.security.audit import AuditEvent, AuditLog, load_key
    from gateway.security.pki import (
        CertificateAuthority,
        Identity,
        LocalState,
        cert_info,
        key_pem,
        make_csr,
        new_key,
    )
    from gateway.store import open_store
    from gateway.store.base import CredentialRow, RegistryOp

    relays = relays or {}
    state = LocalState.at(gw.state_dir)
    ca = CertificateAuthority.load(state.ca_cert, state.ca_key)
    now_us = time.time_ns() // 1000
    ops: list[RegistryOp] = []
    events: list[AuditEvent] = []
    out: dict[str, tuple[bytes, bytes]] = {}
    for identity in [Identity.device(d) for d in devices] + [Identity("relay", r) for r in relays]:
        key = new_key()
        cert = ca.sign_csr(make_csr(key, identity), identity=identity, days=30)
        info = cert_info(cert)
        subject = f"{identity.kind}:{identity.name}"
        credential = CredentialRow(
            id="x509:" + info.fingerprint,
            kind=identity.kind,
            name=identity.name,
            serial=f"{info.serial:x}",
            not_after_us=int(info.not_after.timestamp() * 1_000_000),
            state="active",
            created_us=now_us,
        )
        ops += [
            RegistryOp("principal", kind=identity.kind, name=identity.name, state="active"),
            RegistryOp("credential", credential=credential),
        ]
        events += [
            AuditEvent("principal.registered", OPERATOR, subject),
            AuditEvent("credential.issued", OPERATOR, subject, details={"serial": credential.serial}),
        ]
        out[identity.name] = (cert, key_pem(key))
    for relay, bound in relays.items():
        for d in bound:
            ops.append(RegistryOp("bind", name=relay, device=f"{d:016x}"))
            events.append(
                AuditEvent("binding.added", OPERATOR, f"relay:{relay}", details={"device": f"{d:016x}"})
            )
    with open_store(gw.store) as store:
        pseudonyms = load_tombstone_key(state.root / TOMBSTONE_FILE)  # entries name devices by pseudonym
        audit = AuditLog(store, load_key(state.audit_key), state.audit_head, pseudonyms=pseudonyms)
        audit.open()
        audit.record(events, ops)
    for kind, names in (("device", [f"{d:016x}" for d in devices]), ("relay", list(relays))):
        if names:
            _wait_registered(gw, kind, set(names))
    return state.ca_cert.read_bytes(), out


def _wait_registered(gw: Gateway, kind: str, names: set[str], timeout_s: float = 30.0) -> None:
    """Until the gateway's policy holds `names` (it polls the registry version twice a second)."""
    from bandgate.v1 import admin_pb2, admin_pb2_grpc

    async def run() -> None:
        async with _operator_channel(gw) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            deadline = time.monotonic() + timeout_s
            while True:
                listed = await stub.List(admin_pb2.ListRequest(kind=kind))
                if names <= {p.name for p in listed.principals}:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the gateway did not load the seeded {kind}s")
                await asyncio.sleep(0.1)

    asyncio.run(run())


def _bind_ms(gw: Gateway, relay: str, device_ids: list[int]) -> float:
    """Mean wall ms of one Bind through the admin API, one call at a time."""
    from bandgate.v1 import admin_pb2, admin_pb2_grpc

    async def run() -> float:
        async with _operator_channel(gw) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            started = time.perf_counter()
            for d in device_ids:
                await stub.Bind(admin_pb2.BindRequest(relay=relay, device=f"{d:016x}"))
            return 1000 * (time.perf_counter() - started) / len(device_ids)

    return asyncio.run(run())


# --- processes ----------------------------------------------------------------------------------------


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` so far, from /proc (a process that ended counts 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _gateway_pids(gw: Gateway) -> list[int]:
    return [gw.proc.pid, *_children(gw.proc.pid)]


class _LoadProcess:
    """A load generator (`python -m bench.tls_bench load …`) driven by lines on its stdin; it answers with
    one JSON object a line."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.tls_bench", "load", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        _unpin(self.proc.pid)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited ({self.proc.wait()}) before {event!r}")
        reply = json.loads(line)
        if reply.get("event") != event:
            raise RuntimeError(f"load generator: expected {event!r}, got {reply}")
        return reply

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _all(procs: list[_LoadProcess], command: str, event: str) -> list[dict]:
    for p in procs:
        p.send(command)
    return [p.expect(event) for p in procs]


def _settled_rss_kb(gw: Gateway, settle_s: float = 1.0, samples: int = 5) -> float:
    """The serving process's VmRSS after `settle_s`, the median of `samples` readings 0.2 s apart."""
    time.sleep(settle_s)
    readings = []
    for _ in range(samples):
        readings.append(gw.serving_rss_kb())
        time.sleep(0.2)
    return float(np.median(readings))


# --- the figures ------------------------------------------------------------------------------------


def tls_throughput_figures(quick: bool, workdir: Path) -> dict[str, float]:
    """e2e_1min_tls_samples_per_s, e2e_1min_plain_samples_per_s, e2e_1min_tls_vs_plain.

    The same bands (64, as e2e_1min_samples_per_s) in 1-minute batches, each band on its own connection,
    as fast as acks come back: on a TLS gateway each band with its own certificate (enrolled through the
    admin API before timing), on a plaintext gateway (`serve --insecure`) with device metadata. Both
    gateways run side by side; the runs alternate plain, TLS, TLS, plain (fresh device IDs each run, so
    nothing is a duplicate), and each figure is its runs' samples over their wall time."""
    bands, minutes = (64, 40) if quick else (64, 180)
    order = ("plain", "tls", "tls", "plain")
    recordings = _recordings(bands, minutes)
    plain = Gateway(workdir)
    tls = Gateway(workdir, insecure=False)
    out: dict[str, float] = {}
    try:
        plain.wait_serving()
        tls.wait_serving()
        fleets = []
        for run, mode in enumerate(order, start=101):
            path = workdir / f"tls-fleet-{run}.bgb"
            batches, samples = _fleet_file(path, recordings, batch_minutes=1, fleet=run)
            fleets.append((mode, path, samples, len(batches), sorted({b.device_id for b in batches})))
        tls_devices = [WARM_DEVICE] + [d for mode, *_, ids in fleets if mode == "tls" for d in ids]
        ca, certs, _ = enrol(tls, tls_devices)
        credentials = write_credentials(workdir / "tls-e2e-bands.json", ca, certs)
        _warm_gateway(plain, workdir)
        _warm_gateway(tls, workdir, credentials)
        totals = {m: [0, 0.0, 0.0, 0] for m in ("plain", "tls")}  # samples, wall, serving CPU, batches
        for mode, path, samples, n_batches, _ in fleets:
            gw = tls if mode == "tls" else plain
            cpu = _cpu_s([gw.proc.pid])
            result = _stream(gw, path, channels=bands, credentials=credentials if mode == "tls" else None)
            assert result["samples"] == samples, (result["samples"], samples)
            t = totals[mode]
            t[0] += samples
            t[1] += result["wall_s"]
            t[2] += _cpu_s([gw.proc.pid]) - cpu
            t[3] += n_batches
    finally:
        plain.stop()
        tls.stop()
    for mode, (samples, wall, cpu, n_batches) in totals.items():
        out[f"e2e_1min_{mode}_samples_per_s"] = samples / wall
        out[f"e2e_1min_{mode}_serving_cpu_ms"] = 1000 * cpu / n_batches
    out["e2e_1min_tls_vs_plain"] = out["e2e_1min_tls_samples_per_s"] / out["e2e_1min_plain_samples_per_s"]
    return out


def _connections(gw: Gateway, procs: list[_LoadProcess], total: int, base: int) -> dict[str, float]:
    """Connect `base` bands, then all `total` (split over `procs`); the serving process's RSS per extra
    connection with its open Upload stream (each band has sent one batch and holds its stream open), the
    seconds the rest took to connect, and the load processes' RSS."""
    per, first = total // len(procs), base // len(procs)
    _all(procs, f"connect {first}", "connected")
    at_base = _settled_rss_kb(gw)
    started = time.perf_counter()
    replies = _all(procs, f"connect {per - first}", "connected")
    connect_s = time.perf_counter() - started
    assert sum(r["bands"] for r in replies) == total, replies
    at_total = _settled_rss_kb(gw, settle_s=2.0)
    return {
        "conn_rss_kb": (at_total - at_base) / (total - base),
        "connect_s": connect_s,
        "loadgen_rss_mb": sum(r["rss_kb"] for r in replies) / 1024,
    }


def reconnect_figures(quick: bool, workdir: Path) -> dict[str, float]:
    """tls_conn_rss_kb, reconnect_2k_s, reconnect_ack_p99_ms and what the load costs: `_reconnect` on a
    mutual-TLS gateway, each band with its own certificate. The bands are written into the registry
    (`seed_registry`); the 20 observers are registered through the admin API one at a time at that
    size (admin_register_2k_ms). The same run in --quick: the figures are about 2,000 bands, and it fits."""
    gw = Gateway(workdir, insecure=False)
    try:
        gw.wait_serving()
        started = time.perf_counter()
        ca, certs = seed_registry(gw, devices=[BAND_BASE + i for i in range(RECONNECT_BANDS)])
        seed_s = time.perf_counter() - started
        ca, observer_certs, register_ms = enrol(
            gw, [OBSERVER_BASE + i for i in range(OBSERVERS)], sequential=True
        )
        found = _reconnect(
            gw,
            write_credentials(workdir / "reconnect-bands.json", ca, certs),
            write_credentials(workdir / "reconnect-observers.json", ca, observer_certs),
        )
    finally:
        gw.stop()
    return {
        "tls_conn_rss_kb": found["conn_rss_kb"],
        "reconnect_2k_s": found["reconnect_s"],
        "reconnect_ack_p99_ms": found["ack_p99_ms"],
        "reconnect_quiet_ack_p99_ms": found["quiet_ack_p99_ms"],
        "reconnect_restart_s": found["restart_s"],
        "reconnect_stop_s": found["stop_s"],
        "reconnect_storm_s": found["storm_s"],
        "reconnect_serving_cpu_s": found["serving_cpu_s"],
        "reconnect_workers_cpu_s": found["workers_cpu_s"],
        "reconnect_loadgen_cpu_s": found["loadgen_cpu_s"],
        "reconnect_connect_s": found["connect_s"],
        "reconnect_loadgen_rss_mb": found["loadgen_rss_mb"],
        "reconnect_retries": found["retries"],
        "reconnect_seed_s": seed_s,
        "admin_register_2k_ms": register_ms,
    }


def plain_reconnect_figures(quick: bool, workdir: Path) -> dict[str, float]:
    """plain_conn_rss_kb and reconnect_plain_*: the same `_reconnect` on a plaintext gateway (`serve
    --insecure`), the bands naming themselves in metadata: the baselines of the TLS figures. --quick
    stops after the connections' memory (the storm's baseline is for full runs)."""
    gw = Gateway(workdir)
    try:
        gw.wait_serving()
        found = _reconnect(gw, None, None, storm=not quick)
    finally:
        gw.stop()
    if quick:
        return {"plain_conn_rss_kb": found["conn_rss_kb"]}
    return {
        "plain_conn_rss_kb": found["conn_rss_kb"],
        "reconnect_plain_2k_s": found["reconnect_s"],
        "reconnect_plain_ack_p99_ms": found["ack_p99_ms"],
        "reconnect_plain_storm_s": found["storm_s"],
        "reconnect_plain_serving_cpu_s": found["serving_cpu_s"],
        "reconnect_plain_loadgen_cpu_s": found["loadgen_cpu_s"],
    }


RECONNECT_BANDS, OBSERVERS = 2_000, 20
# The reconnecting bands' load processes run this much nicer (the observers, which measure, do not): a
# real fleet's bands cost the gateway's box no CPU, and unniced they took a third of the two cores in a
# storm (BENCHMARKS.md, "Reconnect storm"). The flood test's attacker runs SCHED_IDLE for the same reason.
BANDS_NICE = int(os.environ.get("BENCH_BANDS_NICE", "19"))


def _reconnect(
    gw: Gateway, band_file: Path | None, observer_file: Path | None, *, storm: bool = True
) -> dict[str, float]:
    """Connections, restart and reconnect storm against `gw` (certificates from the files; plaintext
    with none):

    1. Two load processes (at BANDS_NICE) open the bands' connections, each band its own, 100 then all
       2,000; each band sends a batch and keeps its Upload stream open. The serving process's RSS (not its
       workers') per extra connection: (RSS at 2,000 − RSS at 100) / 1,900, each the median of 5
       readings after the connections settled.
    2. Restart: SIGTERM, the process exits (its drain ends every stream), the bands drop their broken
       connections, `serve` starts again on the same port, state dir and store, health SERVING.
    3. 20 observer bands connect to the new gateway and stream 1-minute batches, each one every 0.2 s;
       after 1 s (the workers load their kernels right after SERVING) and 3 quiet seconds, every band
       reconnects at once (a new connection, a full handshake, its next batch) and waits for its ack;
       a refused or cut attempt is retried with a band's backoff (50 ms, doubling).

    With `storm` False, only step 1.

    reconnect_s = the restart (stop + start to SERVING) + the storm (from its start to the last band's
    ack); ack_p99_ms = the observers' acks due from the storm's start to its last ack (from when each
    was due, a late send counting). The seconds between restart and storm are not counted: they exist
    so that the observers are connected first."""
    settle_s, quiet_s, interval_s = 1.0, 3.0, 0.2
    creds = lambda f: ["--credentials", str(f)] if f else []  # noqa: E731
    per = RECONNECT_BANDS // 2
    load = [
        _LoadProcess(["bands", "--target", gw.address, *creds(band_file),
                      "--first", str(BAND_BASE + k * per), "--count", str(per)])
        for k in range(2)
    ]  # fmt: skip
    for p in load:  # they stand for 2,000 other machines: they take only what the gateway leaves of the cores
        os.setpriority(os.PRIO_PROCESS, p.proc.pid, BANDS_NICE)
    observe = ["observe", "--target", gw.address, *creds(observer_file), "--first", str(OBSERVER_BASE)]
    observe += ["--count", str(OBSERVERS), "--interval", str(interval_s)]
    watchers = [_LoadProcess(observe)] if storm else []
    try:
        for p in [*load, *watchers]:
            p.expect("ready")
        out = _connections(gw, load, RECONNECT_BANDS, 100)
        if not watchers:
            return out
        (watcher,) = watchers

        started = time.perf_counter()
        gw.stop()
        stop_s = time.perf_counter() - started
        _all(load, "close", "closed")
        gw.launch()
        ready_s = gw.wait_serving()
        watcher.send("start")
        watcher.expect("started")
        time.sleep(settle_s + quiet_s)
        workers = [pid for pid in _gateway_pids(gw) if pid != gw.proc.pid]
        cpu = (_cpu_s([gw.proc.pid]), _cpu_s(workers), _cpu_s([p.proc.pid for p in load]))
        storm_start = time.monotonic()
        stormed = _all(load, "storm", "stormed")
        last_ack = max(r["last_ack"] for r in stormed)
        cpu = tuple(
            b - a
            for a, b in zip(
                cpu, (_cpu_s([gw.proc.pid]), _cpu_s(workers), _cpu_s([p.proc.pid for p in load])), strict=True
            )
        )
        if os.environ.get("BENCH_DEBUG"):
            acks = np.sort(np.concatenate([r["acks"] for r in stormed])) - storm_start
            shares = np.percentile(acks, [1, 10, 50, 90, 99, 100]).round(2).tolist()
            reasons = [r["reasons"] for r in stormed]
            print(
                f"storm: acks at {shares} s (1, 10, 50, 90, 99, 100 %); retried: {reasons}", file=sys.stderr
            )
        time.sleep(2 * interval_s)
        watcher.send("stop")
        watched = watcher.expect("stopped")
    finally:
        for p in [*load, *watchers]:
            p.close()
    if watched["failures"]:
        raise RuntimeError(f"observers: {watched['failures']}")
    storm_s = last_ack - storm_start
    during = [ms for due, ms in watched["latency"] if storm_start <= due <= last_ack]
    quiet = [ms for due, ms in watched["latency"] if storm_start - quiet_s <= due < storm_start]
    if len(during) < 20:
        raise RuntimeError(f"only {len(during)} observer acks during a {storm_s:.2f} s storm")
    out.update(
        {
            "reconnect_s": stop_s + ready_s + storm_s,
            "restart_s": stop_s + ready_s,
            "stop_s": stop_s,
            "storm_s": storm_s,
            "ack_p99_ms": float(np.percentile(during, 99)),
            "quiet_ack_p99_ms": float(np.percentile(quiet, 99)),
            "serving_cpu_s": cpu[0],
            "workers_cpu_s": cpu[1],
            "loadgen_cpu_s": cpu[2],
            "retries": sum(r["retries"] for r in stormed),
        }
    )
    return out


def relay_streams_figures(
    quick: bool, workdir: Path, devices: int = 10_000, relays: int = 100
) -> dict[str, float]:
    """streams_rss_mb: `e2e_bench.streams_run` on a TLS gateway, the 10,000 device streams through 100
    relays (each relay one mutual-TLS connection carrying the streams of the 100 devices bound to it);
    admin_bind_10k_ms: one Bind through the admin API with those 10,000 bindings registered."""
    gw = Gateway(workdir, insecure=False)
    per = -(-devices // relays)
    bound = {
        f"relay-{r:03d}": [STREAMS_DEVICE_BASE + d for d in range(r * per, min(devices, (r + 1) * per))]
        for r in range(relays)
    }
    try:
        gw.wait_serving()
        ca, certs = seed_registry(gw, devices=[WARM_DEVICE], relays=bound)
        bind_ms = _bind_ms(gw, "relay-000", [STREAMS_DEVICE_BASE + devices + i for i in range(10)])
        warm = write_credentials(
            workdir / "streams-warm.json", ca, {f"{WARM_DEVICE:016x}": certs[f"{WARM_DEVICE:016x}"]}
        )
        relay_file = write_credentials(workdir / "streams-relays.json", ca, {r: certs[r] for r in bound})
        _warm_gateway(gw, workdir, warm)
        found = streams_run(gw, quick, devices, ["--relays", str(relay_file)])
    finally:
        gw.stop()
    return {
        "streams_rss_mb": found["peak_mb"],
        "streams_idle_rss_mb": found["idle_mb"],
        "streams_open_s": found["open_s"],
        "admin_bind_10k_ms": bind_ms,
    }


REFUSAL_IN_FLIGHT = 128  # the flood's calls in flight on its one connection (as tests/security/test_hostile)


def refusal_figures(quick: bool, workdir: Path) -> dict[str, float]:
    """token_refusals_per_s: bad tokens one client gets refused a second by the gateway's token listener
    (WhoAmI, a new random token a call, `REFUSAL_IN_FLIGHT` at a time on one TLS connection), almost all
    past the peer's throttle, RESOURCE_EXHAUSTED without a token lookup; bare_refusals_per_s: the same
    client against a bare grpc.aio server on the same certificate whose WhoAmI refuses at once, what grpc
    and TLS alone cost; token_refusals_vs_bare their ratio. The client waits for each answer, so the rate
    is what the server answers: the refusal path's cost, which the flood test can only judge beside 20
    bands on a box of unknown speed. Each for 5 s in --quick (15 s, twice alternating, in full runs)."""
    from gateway.security.pki import LocalState

    seconds, rounds = (5.0, 1) if quick else (15.0, 2)
    gw = Gateway(workdir, insecure=False)
    rates: dict[str, list[float]] = {"token": [], "bare": []}
    try:
        gw.wait_serving()
        local = LocalState.at(gw.state_dir)
        bare = f"127.0.0.1:{_free_port()}"
        refuser = _LoadProcess(
            ["refuser", "--listen", bare, "--cert", str(local.server_cert), "--key", str(local.server_key)]
        )
        try:
            refuser.expect("ready")
            for _ in range(rounds):
                for name, target in (("token", gw.token_address), ("bare", bare)):
                    flood = _LoadProcess(
                        ["flood", "--target", target, "--ca", str(local.ca_cert), "--seconds", str(seconds),
                         "--in-flight", str(REFUSAL_IN_FLIGHT)]
                    )  # fmt: skip
                    try:
                        done = flood.expect("flooded")
                    finally:
                        flood.close()
                    calls = sum(done["codes"].values())
                    if done["codes"].get("RESOURCE_EXHAUSTED", 0) < 0.95 * calls:
                        raise RuntimeError(f"{name}: not a throttled flood: {done['codes']}")
                    rates[name].append(calls / (done["end"] - done["start"]))
        finally:
            refuser.close()
    finally:
        gw.stop()
    token, bare_rate = float(np.median(rates["token"])), float(np.median(rates["bare"]))
    return {
        "token_refusals_per_s": token,
        "bare_refusals_per_s": bare_rate,
        "token_refusals_vs_bare": token / bare_rate,
    }


# --- the load generators (their own processes) ------------------------------------------------------


async def flood_refusals(stub, seconds: float, in_flight: int) -> dict:
    """WhoAmI on `stub` (an IdentityServiceStub) with a new random bad token a call, `in_flight` calls at
    a time, for `seconds`: how many calls ended with each status, and when the flood began and ended
    (time.monotonic, the same clock in every process)."""
    import collections
    import secrets

    import grpc

    from bandgate.v1 import admin_pb2

    request = admin_pb2.WhoAmIRequest()
    codes: collections.Counter[str] = collections.Counter()
    start = time.monotonic()
    deadline = start + seconds

    async def caller() -> None:
        while time.monotonic() < deadline:
            token = "bgt_" + secrets.token_urlsafe(32)  # the gateway's shape, never issued
            try:
                await stub.WhoAmI(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1

    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return {"codes": dict(codes), "start": start, "end": time.monotonic()}


async def _flood_load(target: str, ca: str, seconds: float, in_flight: int) -> None:
    import grpc

    from bandgate.v1 import admin_pb2_grpc

    async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(Path(ca).read_bytes())) as ch:
        await ch.channel_ready()
        _say("flooded", **await flood_refusals(admin_pb2_grpc.IdentityServiceStub(ch), seconds, in_flight))


async def _refuser_load(listen: str, cert: str, key: str) -> None:
    """A grpc.aio server on TLS whose WhoAmI refuses every call at once, RESOURCE_EXHAUSTED: the baseline
    of `refusal_figures`; it serves until stdin closes."""
    import grpc

    from bandgate.v1 import admin_pb2_grpc

    class Refuser(admin_pb2_grpc.IdentityServiceServicer):
        async def WhoAmI(self, request, context):  # noqa: N802 - the gRPC method name
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "throttled")

    server = grpc.aio.server()
    admin_pb2_grpc.add_IdentityServiceServicer_to_server(Refuser(), server)
    creds = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
    server.add_secure_port(listen, creds)
    await server.start()
    _say("ready")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(None)


def _minute_batches(device_ids: list[int], minutes: int, seed: int = 11) -> dict[int, list]:
    """`minutes` consecutive 1-minute batches (sequence 0, 1, …) for each device: one simulated band's
    minutes, encoded under each device's ID."""
    from gateway.simulator import simulate_band
    from gateway.simulator.recorder import recording_batches

    rec = simulate_band(seed, minutes, scenario="day")
    return {d: list(recording_batches(replace(rec, device_id=d), batch_frames=1)) for d in device_ids}


def _rss_self_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class _Bands:
    """Bands of one load process: each its own connection (its own certificate on a TLS gateway) and one
    Upload stream, sending a batch and waiting for its ack."""

    def __init__(self, target: str, credentials: str | None, device_ids: list[int], minutes: int):
        import grpc

        from gateway.auth import device_metadata

        self.target = target
        self.device_ids = device_ids
        self.batches = _minute_batches(device_ids, minutes)
        self.creds = read_credentials(credentials) if credentials else None
        self.metadata = (lambda _d: ()) if self.creds else device_metadata
        self.channels: dict[int, grpc.aio.Channel] = {}
        self.calls: dict[int, grpc.aio.StreamStreamCall] = {}
        self.retries = 0
        self.reasons: dict[str, int] = {}  # why attempts were retried: a status or an ack code

    def _channel(self, device_id: int):
        import grpc

        channel = self.channels.get(device_id)
        if channel is None:
            options = [("grpc.use_local_subchannel_pool", 1)]
            channel = (
                grpc.aio.secure_channel(self.target, self.creds[f"{device_id:016x}"], options=options)
                if self.creds
                else grpc.aio.insecure_channel(self.target, options=options)
            )
            self.channels[device_id] = channel
        return channel

    async def send(self, device_id: int, k: int) -> float:
        """Open the band's stream (and connection, if it has none), send its batch `k`, and return the
        monotonic time of its ack; a refused or cut attempt is retried as a band does (backoff from
        50 ms, doubling, at most 2 s; an overloaded gateway's retry_after_ms)."""
        import grpc

        from bandgate.v1 import ingest_pb2_grpc
        from gateway.pipeline import CODE_NAMES, OK

        backoff = 0.05
        for _ in range(12):
            call = ingest_pb2_grpc.IngestServiceStub(self._channel(device_id)).Upload(
                metadata=self.metadata(device_id)
            )
            try:
                while True:
                    await call.write(self.batches[device_id][k])
                    ack = await call.read()
                    if ack is grpc.aio.EOF:
                        raise ConnectionError("stream ended")
                    if ack.code == OK:
                        self.calls[device_id] = call
                        return time.monotonic()
                    if not ack.retry_after_ms:
                        raise RuntimeError(f"device {device_id:016x}: ack code {ack.code}")
                    self._retry(f"ack {CODE_NAMES.get(ack.code, ack.code)}")
                    await asyncio.sleep(ack.retry_after_ms / 1000)
            except (grpc.RpcError, ConnectionError, asyncio.InvalidStateError) as e:
                call.cancel()
                self._retry(
                    f"{e.code().name}: {e.details()}"[:80]
                    if isinstance(e, grpc.aio.AioRpcError)
                    else type(e).__name__
                )
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)
        raise RuntimeError(f"device {device_id:016x}: no ack after 12 attempts")

    def _retry(self, reason: str) -> None:
        self.retries += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    async def close(self) -> None:
        for call in self.calls.values():
            call.cancel()
        await asyncio.gather(*(c.close() for c in self.channels.values()))
        self.calls.clear()
        self.channels.clear()


def _say(event: str, **fields) -> None:
    fields.update(event=event, cpu_s=time.process_time(), rss_kb=_rss_self_kb())
    print(json.dumps(fields), flush=True)


async def _lines():
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        yield line.split()


async def _bands_load(target: str, credentials: str | None, first: int, count: int) -> None:
    """`connect N`: the next N bands connect and each sends its first batch (100 at a time); `close`:
    every band drops its connection (after a restart it is broken); `storm`: every connected band at once
    opens a new connection and stream and sends its second batch, and the last ack's time is told."""
    bands = _Bands(target, credentials, [first + i for i in range(count)], minutes=2)
    connected: list[int] = []
    heap.settle()  # see _observe_load
    _say("ready")
    async for words in _lines():
        if words[0] == "connect":
            todo = bands.device_ids[len(connected) : len(connected) + int(words[1])]
            for k in range(0, len(todo), 100):
                await asyncio.gather(*(bands.send(d, 0) for d in todo[k : k + 100]))
            connected += todo
            _say("connected", bands=len(connected))
        elif words[0] == "close":
            await bands.close()
            _say("closed")
        elif words[0] == "storm":
            retries, bands.reasons = bands.retries, {}
            acks = await asyncio.gather(*(bands.send(d, 1) for d in connected))
            _say("stormed", last_ack=max(acks), acks=sorted(acks), retries=bands.retries - retries,
                 reasons=bands.reasons)  # fmt: skip
    await bands.close()


async def _observe_load(
    target: str,
    credentials: str | None,
    first: int,
    count: int,
    interval_s: float,
    minutes: int = 300,
    *,
    must_last: bool = True,
) -> None:
    """`start`: the bands connect and each sends a 1-minute batch every `interval_s` (phases spread), the
    latency of each from when it was due (a late send counts) to its ack; `stop`: they stop and the
    latencies are told with their due times (monotonic, comparable across processes). A band that has
    sent its `minutes` batches stops: a failure if it `must_last` (it should have been stopped first)."""
    import grpc

    from bandgate.v1 import ingest_pb2_grpc
    from gateway.pipeline import OK

    bands = _Bands(target, credentials, [first + i for i in range(count)], minutes=minutes)
    latency: list[tuple[float, float]] = []
    failures: list[str] = []
    stop = asyncio.Event()
    first_acks = 0
    all_started = asyncio.Event()

    async def band(i: int, device_id: int, started: float) -> None:
        nonlocal first_acks
        call = ingest_pb2_grpc.IngestServiceStub(bands._channel(device_id)).Upload(
            metadata=bands.metadata(device_id)
        )
        due = started + interval_s * i / count
        for k in range(minutes):
            if stop.is_set():
                return
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                await call.write(bands.batches[device_id][k])
                ack = await call.read()
            except grpc.RpcError as e:
                failures.append(f"{device_id:016x}: {e.code().name}")
                return
            if ack is grpc.aio.EOF or ack.code != OK:
                failures.append(f"{device_id:016x}: {ack}")
                return
            latency.append((due, 1000 * (time.monotonic() - due)))
            if k == 0:
                first_acks += 1
                if first_acks == count:
                    all_started.set()
            due += interval_s
        if must_last:
            failures.append(f"{device_id:016x}: ran out of batches")

    # A load process stands for other machines: a full collection of its heap (its batches, its channels)
    # stalls all its bands at once, and the observers' would count it as the gateway's latency.
    heap.settle()
    _say("ready")
    tasks: list[asyncio.Future] = []
    async for words in _lines():
        if words[0] == "start":
            started = time.monotonic()
            tasks = [asyncio.ensure_future(band(i, d, started)) for i, d in enumerate(bands.device_ids)]
            await asyncio.wait(
                [asyncio.ensure_future(all_started.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED
            )
            _say("started")
        elif words[0] == "stop":
            stop.set()
            await asyncio.gather(*tasks)
            _say("stopped", latency=latency, failures=failures)
    await bands.close()


def _load_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_bench load")
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("bands", "observe"):
        p = sub.add_parser(name)
        p.add_argument("--target", required=True)
        p.add_argument("--credentials", help="band certificates (TLS gateway); none: plaintext")
        p.add_argument("--first", type=int, required=True, help="first device ID")
        p.add_argument("--count", type=int, required=True)
        if name == "observe":
            p.add_argument("--interval", type=float, default=0.2, help="seconds between a band's batches")
    p = sub.add_parser("flood")
    p.add_argument("--target", required=True)
    p.add_argument("--ca", required=True, help="the CA the target's certificate is checked against")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--in-flight", type=int, required=True)
    p = sub.add_parser("refuser")
    p.add_argument("--listen", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    if args.mode == "flood":
        asyncio.run(_flood_load(args.target, args.ca, args.seconds, args.in_flight))
    elif args.mode == "refuser":
        asyncio.run(_refuser_load(args.listen, args.cert, args.key))
    elif args.mode == "bands":
        asyncio.run(_bands_load(args.target, args.credentials, args.first, args.count))
    else:
        asyncio.run(_observe_load(args.target, args.credentials, args.first, args.count, args.interval))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        sys.exit(_load_main(sys.argv[2:]))
    import tempfile

    # the identity and TLS figures alone: python -m bench.tls_bench [--quick] [group ...]
    quick = "--quick" in sys.argv
    groups = [a for a in sys.argv[1:] if not a.startswith("--")] or [
        "tls_throughput", "relay_streams", "reconnect", "plain_reconnect", "refusal"
    ]  # fmt: skip
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bandgate-tls-") as tmp:
        for group in groups:
            figures.update(globals()[f"{group}_figures"](quick, Path(tmp)))
    print(json.dumps(figures, indent=2))
