"""Privacy lifecycle figures for `python -m bench` (issue 13: consent, erasure, export, encryption at rest),
each beside a baseline measured in the same run. `bandgate serve` runs as its own process
(`bench.e2e_bench.Gateway`); bands are gRPC clients in load-generator processes.

- `encrypted_throughput_figures`: 1-minute batches end to end, every band on its own plaintext connection
  (`serve --insecure`, as the `e2e_1min_plain_*` baseline), through a gateway as it runs by default —
  records and device state sealed (AES-256-GCM, per-device data keys) and the consent gate asked for
  every batch (the registry's rules; `default_consent = "all"`, `age_unknown = "adult"`, so every band is
  processed without a self-service step) — and through one with both off (`encrypt_at_rest = false`, an
  `AllowAll` consent gate: `python -m bench.privacy_bench serve`). Runs alternate off, on, on, off, twice.
- `lifecycle_figures`: a store of 1,000 devices whose records are sealed as the gateway seals them, one
  device holding a tenth of them, written straight into the store's tables (`build_store`: the gateway's
  commit path writes ~27 k records/s, too slow for 10 M), under the same state dir as the mutual-TLS
  gateway then started on it, so its key store holds their data keys. While 20 bands stream 1-minute
  batches, the operator exports the large device and then erases it through the PrivacyService:
  records/s and the serving process's RSS growth of the export beside a paged `read_since` of the same
  rows; the erasure's time until the data key is gone (nothing of the device opens) and until every row
  is gone, beside a plain DELETE of the same rows on a copy of the store, and the other bands' ack p99.

`python -m bench.privacy_bench [--quick] [group …]` runs these groups alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from bench import tls_bench
from bench.e2e_bench import (
    WARM_DEVICE,
    Gateway,
    _children,
    _fleet_file,
    _recordings,
    _rss_kb,
    _stream,
    _unpin,
    _warm_gateway,
)
from bench.tls_bench import (
    OPERATOR,
    _cpu_s,
    _LoadProcess,
    _operator_channel,
    _wait_registered,
    enrol,
    write_credentials,
)

STORE_BASE = 0x5707_0000_0000_0000  # the devices of the large store; STORE_BASE itself holds a tenth
OBSERVER_BASE = 0x0B5F_0000_0000_0000  # the bands that stream while the export and the erasure run
OBSERVERS = 20
OBSERVE_INTERVAL_S = 0.2  # each observer sends a 1-minute batch this often
DAY_US = 86_400_000_000

# The gateway as it runs by default, with consent the registry answers for every band without a
# self-service step (the gate is still asked for every batch), and the same gateway with both off.
PRIVACY_ON = {"default_consent": "all", "age_unknown": "adult"}
PRIVACY_OFF = {"encrypt_at_rest": "false"}


def _env(settings: dict[str, str]) -> dict[str, str]:
    """This environment without any `BANDGATE_<setting>` (so a shell's settings do not leak into one side
    of a comparison), plus `settings`."""
    from gateway.config import ENV_PREFIX, GatewayConfig

    known = {ENV_PREFIX + f.name.upper() for f in fields(GatewayConfig)}
    env = {k: v for k, v in os.environ.items() if k not in known}
    env.update({ENV_PREFIX + k.upper(): v for k, v in settings.items()})
    return env


class AllowAllGateway(Gateway):
    """`Gateway` with the consent gate of `gateway.privacy.consent.AllowAll` (every family of every
    device, asked of no registry): `python -m bench.privacy_bench serve`, the flags of `bandgate serve`."""

    module = "bench.privacy_bench"


def _store_path(gw: Gateway) -> Path:
    return Path(gw.store.removeprefix("sqlite:///"))


def _value_types(db: Path) -> set[str]:
    """SQLite types of the stored record values: {"blob"} sealed, {"text"} JSON in clear."""
    from gateway.store.sqlite import RECORD_TABLES

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return {
            t
            for table in RECORD_TABLES.values()
            for (t,) in conn.execute(f"SELECT DISTINCT typeof(value) FROM {table}")
        }


# --- 1-minute batches, privacy on and off ---------------------------------------------------------------


def encrypted_throughput_figures(quick: bool, workdir: Path) -> dict[str, float]:
    """e2e_1min_encrypted_samples_per_s, e2e_1min_unencrypted_samples_per_s, e2e_1min_encrypted_vs_plain.

    The 64 bands of `e2e_1min_samples_per_s` in 1-minute batches, each band on its own plaintext
    connection, as fast as acks come back, through two gateways running side by side (see the module
    docstring). Eight runs of 20 minutes a band (--quick; 90 full) alternate off, on, on, off twice, fresh
    device IDs each run: on a shared 2-core box a burst of someone else's load lands on one side of
    fewer, longer runs (one quick run of off, on, on, off read 0.51 with 14 % more CPU a batch). Each
    figure is its runs' samples over their wall time. The CPU of the serving process and of its compute
    workers per batch says where a difference goes (sealing happens in the workers), and their ratio is
    what the throughput ratio would be were both CPU-bound alike (`e2e_1min_encrypted_vs_plain_cpu`)."""
    bands, minutes = (64, 20) if quick else (64, 90)
    order = ("off", "on", "on", "off") * 2
    recordings = _recordings(bands, minutes)
    gateways = {
        "on": Gateway(workdir, env=_env(PRIVACY_ON)),
        "off": AllowAllGateway(workdir, env=_env(PRIVACY_OFF)),
    }
    totals = {m: [0, 0.0, 0.0, 0.0, 0] for m in gateways}  # samples, wall, serving CPU, workers CPU, batches
    try:
        for gw in gateways.values():
            gw.wait_serving()
        fleets = []
        for run, mode in enumerate(order, start=201):
            path = workdir / f"privacy-fleet-{run}.bgb"
            batches, samples = _fleet_file(path, recordings, batch_minutes=1, fleet=run)
            fleets.append((mode, path, samples, len(batches)))
        for gw in gateways.values():
            _warm_gateway(gw, workdir)
        for mode, path, samples, n_batches in fleets:
            gw = gateways[mode]
            workers = _children(gw.proc.pid)
            cpu = (_cpu_s([gw.proc.pid]), _cpu_s(workers))
            result = _stream(gw, path, channels=bands)
            assert result["samples"] == samples, (result["samples"], samples)
            t = totals[mode]
            t[0] += samples
            t[1] += result["wall_s"]
            t[2] += _cpu_s([gw.proc.pid]) - cpu[0]
            t[3] += _cpu_s(workers) - cpu[1]
            t[4] += n_batches
    finally:
        for gw in gateways.values():
            gw.stop()
    # what was measured is what was meant: sealed values on one side, JSON in clear on the other
    for mode, want in (("on", {"blob"}), ("off", {"text"})):
        found = _value_types(_store_path(gateways[mode]))
        if found != want:
            raise RuntimeError(f"privacy {mode}: stored values are {sorted(found)}, expected {sorted(want)}")
    out: dict[str, float] = {}
    for mode, name in (("on", "encrypted"), ("off", "unencrypted")):
        samples, wall, serving, workers, n_batches = totals[mode]
        out[f"e2e_1min_{name}_samples_per_s"] = samples / wall
        out[f"e2e_1min_{name}_serving_cpu_ms"] = 1000 * serving / n_batches
        out[f"e2e_1min_{name}_workers_cpu_ms"] = 1000 * workers / n_batches
    out["e2e_1min_encrypted_vs_plain"] = (
        out["e2e_1min_encrypted_samples_per_s"] / out["e2e_1min_unencrypted_samples_per_s"]
    )
    cpu = {
        n: out[f"e2e_1min_{n}_serving_cpu_ms"] + out[f"e2e_1min_{n}_workers_cpu_ms"]
        for n in ("encrypted", "unencrypted")
    }
    out["e2e_1min_encrypted_vs_plain_cpu"] = cpu["unencrypted"] / cpu["encrypted"]
    return out


# --- the large store --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A simulated band's day as the gateway computes it: its records (family, start_us, duration_s, algo,
    values as the JSON the store seals) and its streaming state at the end."""

    records: list[tuple[str, int, int, str, bytes]]
    state: bytes


def day_template(seed: int = 5) -> Template:
    """One simulated day (08:00 to 08:00, activity and a night) through `compute.compute` in 10-minute
    batches: ~8,700 records of every family in the proportions a band produces them."""
    import orjson

    from decoder import config as decoder_config
    from gateway.compute import compute
    from gateway.simulator import simulate_band
    from gateway.simulator.recorder import recording_batches

    rec = simulate_band(seed, 24 * 60, scenario="mixed")
    state: bytes | None = None
    records: list[tuple[str, int, int, str, bytes]] = []
    for batch in recording_batches(rec, batch_frames=10):
        c = compute(batch, state, decoder_config.MAX_DECOMPRESSED_BYTES)
        state = c.state
        records += [
            (r["family"], r["start_us"], r["duration_s"], r["algo"], orjson.dumps(r["values"]))
            for r in c.records
        ]
    assert state is not None
    return Template(records, state)


def seed_devices(gw: Gateway, ownerships: dict[str, str]) -> None:
    """Register devices (16 hex digits → the ownership their data belongs to) in one audited transaction
    through the store contract, as `tls_bench.seed_registry` does for certificates (the admin API costs
    O(registry) a call); the devices hold no certificate: they do not stream here."""
    from gateway.privacy.keys import TOMBSTONE_FILE, load_tombstone_key
    from gateway.security.audit import AuditEvent, AuditLog, load_key
    from gateway.security.pki import LocalState
    from gateway.store import open_store
    from gateway.store.base import RegistryOp

    state = LocalState.at(gw.state_dir)
    ops: list[RegistryOp] = []
    events: list[AuditEvent] = []
    for device, ownership in ownerships.items():
        ops += [
            RegistryOp("principal", kind="device", name=device, state="active"),
            RegistryOp("ownership", device=device, ownership=ownership),
        ]
        events.append(AuditEvent("principal.registered", OPERATOR, f"device:{device}"))
    pseudonyms = load_tombstone_key(state.root / TOMBSTONE_FILE)  # entries name devices by pseudonym
    with open_store(gw.store) as store:
        audit = AuditLog(store, load_key(state.audit_key), state.audit_head, pseudonyms=pseudonyms)
        audit.open()
        audit.record(events, ops)
    _wait_registered(gw, "device", set(ownerships))


def build_store(
    db: Path, state_dir: Path, devices: list[tuple[int, str, int]], template: Template, slices: int
) -> None:
    """Write `devices` (device ID, ownership, record count) into the store `db` of a gateway whose state
    dir is `state_dir`, with the gateway stopped.

    Each device's row, boot and sealed state go through `SqliteStore.commit_many`, which makes the data
    keys in the state dir's key store. The records are the template's day, repeated a day later each time.
    Their values are sealed with the device's data key exactly as `KeySealer.seal_values` seals them
    (the same `DataKey.seal`, bound to device, ownership, family and start) and inserted with executemany
    on a connection of its own (synchronous off: this is set-up, not the gateway's commit path). Devices
    interleave as a fleet's batches do: `slices` rounds, each taking the next 1/slices of every device's
    records, so a device's rows lie spread through the tables and their indexes."""
    from decoder.records import device_key
    from gateway.privacy.sealing import open_sealer
    from gateway.store.base import FAMILY_CLASS, CommitItem
    from gateway.store.sqlite import RECORD_TABLES, SqliteStore

    sealer = open_sealer(state_dir)
    try:
        store = SqliteStore(db, sealer=sealer)
        store.open()
        try:
            results = store.commit_many(
                [CommitItem(d, 1, 0, 0, template.state, [], ownership=o) for d, o, _ in devices]
            )
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                raise RuntimeError(f"build_store: {failed[0]}")
            cursor = store.latest_cursor() + 1
        finally:
            store.close()
        names = [device_key(d) for d, _, _ in devices]
        keys = [
            sealer.keys.data_key(name, o, create=False)
            for name, (_, o, _) in zip(names, devices, strict=True)
        ]
        day = template.records
        table_of = [RECORD_TABLES[FAMILY_CLASS[r[0]]] for r in day]
        insert = {
            t: f"INSERT INTO {t} (cursor, device, ownership, family, start_us, duration_s, algo, value) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            for t in set(table_of)
        }
        pending: dict[str, list[tuple]] = {t: [] for t in insert}
        n_pending = 0
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("PRAGMA cache_size = -262144")  # the indexes of 10 M rows: keep them in memory
            for s in range(slices):
                for (_, ownership, n), name, key in zip(devices, names, keys, strict=True):
                    lo, hi = n * s // slices, n * (s + 1) // slices
                    for i in range(lo, hi):
                        days, k = divmod(i, len(day))
                        family, start_us, duration_s, algo, values = day[k]
                        start_us += days * DAY_US
                        sealed = key.seal(values, family=family, start_us=start_us)
                        pending[table_of[k]].append(
                            (cursor, name, ownership, family, start_us, duration_s, algo, sealed)
                        )
                        cursor += 1
                    n_pending += hi - lo
                if n_pending >= 50_000 or s == slices - 1:
                    conn.execute("BEGIN")
                    for table, rows in pending.items():
                        conn.executemany(insert[table], rows)
                        rows.clear()
                    conn.execute("UPDATE record_cursor SET next = ?", (cursor,))
                    conn.execute("COMMIT")
                    n_pending = 0
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        sealer.keys.close()


def _device_rows(db: Path, device: str) -> int:
    """Rows of `device` left in the store's record, device and boot tables."""
    from gateway.store.sqlite import RECORD_TABLES

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return sum(
            conn.execute(f"SELECT count(*) FROM {table} WHERE device = ?", (device,)).fetchone()[0]
            for table in (*RECORD_TABLES.values(), "devices", "boots")
        )


def read_since_scan(db: Path, state_dir: Path, device: str, ownership: str) -> tuple[int, float]:
    """The export's baseline: the device's records read in pages of the export's size with
    `SqliteStore.read_since` (values opened with the state dir's keys), in this process; (rows, seconds)."""
    from gateway.privacy.access import PAGE
    from gateway.privacy.sealing import open_sealer
    from gateway.store.sqlite import SqliteStore

    sealer = open_sealer(state_dir)
    store = SqliteStore(db, sealer=sealer)
    try:
        store.open()
        cursor, n = 0, 0
        started = time.perf_counter()
        while True:
            rows = store.read_since(cursor, device=device, ownership=ownership, limit=PAGE)
            n += len(rows)
            if rows:
                cursor = rows[-1][0]
            if len(rows) < PAGE:
                return n, time.perf_counter() - started
    finally:
        store.close()
        sealer.keys.close()


def sql_scan(db: Path, device: str, ownership: str) -> tuple[int, float]:
    """The floor under both: the same rows read with SQL alone (nothing opened, nothing decoded)."""
    from gateway.store.sqlite import RECORD_TABLES

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        n = 0
        started = time.perf_counter()
        for table in RECORD_TABLES.values():
            rows = conn.execute(
                f"SELECT cursor, device, ownership, family, start_us, duration_s, algo, value FROM {table} "
                "WHERE device = ? AND ownership = ? ORDER BY cursor",
                (device, ownership),
            )
            while batch := rows.fetchmany(1000):
                n += len(batch)
        return n, time.perf_counter() - started


def plain_delete(db: Path, device: str) -> tuple[int, float]:
    """The erasure's baseline: one DELETE a table of the device's rows (and its device and boot rows) in
    one transaction, with the store's settings (WAL, synchronous FULL, secure_delete), then the WAL
    checkpointed and truncated as `erase_device` does; (records deleted, seconds)."""
    from gateway.store.sqlite import RECORD_TABLES

    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA secure_delete = ON")
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        n = sum(
            conn.execute(f"DELETE FROM {table} WHERE device = ?", (device,)).rowcount
            for table in RECORD_TABLES.values()
        )
        conn.execute("DELETE FROM boots WHERE device = ?", (device,))
        conn.execute("DELETE FROM devices WHERE device = ?", (device,))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return n, time.perf_counter() - started


class _RssPeak:
    """The peak VmRSS (KiB) of one process, sampled every 10 ms on a thread until `stop`."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = _rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_kb(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kb(self.pid))
        return self.peak


def _export(gw: Gateway, device: str) -> tuple[int, int, float]:
    """The operator's Export of `device` (JSON lines) through the PrivacyService, read to the end;
    (feature records, bytes, seconds from the request to the last chunk). The connection is made and
    the handshake done before timing."""
    from bandgate.v1 import privacy_pb2, privacy_pb2_grpc

    async def run() -> tuple[int, int, float]:
        async with _operator_channel(gw) as channel:
            stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
            await stub.GetConsent(privacy_pb2.DeviceRequest(device=device))
            features, size = 0, 0
            started = time.perf_counter()
            async for chunk in stub.Export(privacy_pb2.PrivacyExportRequest(device=device), timeout=600):
                features += chunk.data.count(b'{"kind":"feature"')
                size += len(chunk.data)
            return features, size, time.perf_counter() - started

    return asyncio.run(run())


def _erase(gw: Gateway, device: str, ownership: str) -> dict:
    """The operator's Erase of `device` through the PrivacyService. A thread of this process watches the
    gateway's key store (its own connection, as a reader of the store would open a key) and notes when
    the device's data key is gone: from then on nothing of it opens. Before, five GetConsent calls on the
    same connection give the round trip of a privacy call (the floor under `erase_effective_ms`)."""
    from bandgate.v1 import privacy_pb2, privacy_pb2_grpc
    from gateway.privacy.keys import KEYS_DB, KeyStore, NoDataKey, load_kek

    keys = KeyStore(gw.state_dir / KEYS_DB, load_kek(gw.state_dir))
    keys.open()
    keys.data_key(device, ownership, create=False)  # there before
    gone: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                keys.data_key(device, ownership, create=False)
            except NoDataKey:
                gone.append(time.monotonic())
                return
            time.sleep(0.0005)

    async def run() -> dict:
        async with _operator_channel(gw) as channel:
            stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
            rpc_ms = []
            for _ in range(5):
                t = time.perf_counter()
                await stub.GetConsent(privacy_pb2.DeviceRequest(device=device))
                rpc_ms.append(1000 * (time.perf_counter() - t))
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            started = time.monotonic()
            reply = await stub.Erase(privacy_pb2.DeviceRequest(device=device), timeout=600)
            done = time.monotonic()
            stop.set()
            watcher.join()
            return {"started": started, "done": done, "removed": dict(reply.removed), "rpc_ms": rpc_ms}

    try:
        out = asyncio.run(run())
    finally:
        keys.close()
    if not gone:
        raise RuntimeError(f"erase: the data key of {device} was still there after the Erase returned")
    out["key_gone"] = gone[0]
    return out


class _Observers(_LoadProcess):
    """Bands streaming 1-minute batches at a steady rate (`python -m bench.privacy_bench load observe`)."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.privacy_bench", "load", "observe", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        _unpin(self.proc.pid)


def _p99(latency: list, start: float, end: float, what: str) -> float:
    """The 99th percentile of the observers' latencies of batches due in [start, end]."""
    during = [ms for due, ms in latency if start <= due <= end]
    if len(during) < 20:
        raise RuntimeError(f"{what}: only {len(during)} observer acks in {end - start:.2f} s")
    return float(np.percentile(during, 99))


def lifecycle_figures(quick: bool, workdir: Path, devices: int = 1000) -> dict[str, float]:
    """export_device_records_per_s, export_rss_growth_mb, erase_effective_ms, erase_complete_s,
    erase_ack_p99_ms, and their baselines (see the module docstring and BENCHMARKS.md).

    A mutual-TLS gateway with the default privacy settings but consent for every family by default
    (PRIVACY_ON) starts once to make its state dir; the 1,000 store devices are registered with an
    ownership each, the 20 observers (and the warm-up band) enrolled through the admin API; it stops, the
    store is built, a copy taken for the DELETE baseline, and it starts again on the same state dir and
    store. The observers stream from then on; in turn: the read_since and SQL baselines (this process),
    the Export, the plain DELETE on the copy, 3 quiet seconds, the Erase."""
    from decoder.records import device_key
    from gateway.privacy.ownership import new_ownership

    total, big = (1_000_000, 100_000) if quick else (10_000_000, 1_000_000)
    quiet_s = 3.0
    # enough batches for every window (quick ~25 s, full ~3 min, at 5 batches/s a band), with room
    observer_minutes = 300 if quick else 1500
    ids = [STORE_BASE + i for i in range(devices)]
    ownerships = {device_key(d): new_ownership() for d in ids}
    rest, extra = divmod(total - big, devices - 1)
    counts = [big] + [rest + (i < extra) for i in range(devices - 1)]
    plan = [(d, ownerships[device_key(d)], n) for d, n in zip(ids, counts, strict=True)]
    target, target_own = device_key(ids[0]), ownerships[device_key(ids[0])]
    out: dict[str, float] = {}

    gw = Gateway(workdir, insecure=False, env=_env(PRIVACY_ON))
    observers: _Observers | None = None
    try:
        gw.wait_serving()
        band_ids = [OBSERVER_BASE + i for i in range(OBSERVERS)]
        ca, certs, _ = enrol(gw, [WARM_DEVICE, *band_ids])
        credentials = write_credentials(workdir / "privacy-bands.json", ca, certs)
        # started now: it encodes its batches while the store is built
        observers = _Observers(
            ["--target", gw.address, "--credentials", str(credentials), "--first", str(OBSERVER_BASE),
             "--count", str(OBSERVERS), "--interval", str(OBSERVE_INTERVAL_S),
             "--minutes", str(observer_minutes)]
        )  # fmt: skip
        seed_devices(gw, ownerships)
        gw.stop()

        db = _store_path(gw)
        started = time.perf_counter()
        template = day_template()
        build_store(db, gw.state_dir, plan, template, slices=max(1000, big // 100))
        out["privacy_store_build_s"] = time.perf_counter() - started
        out["privacy_store_records"] = float(total)
        out["privacy_store_mb"] = db.stat().st_size / 2**20
        baseline_db = workdir / "privacy-delete-baseline.db"
        shutil.copyfile(db, baseline_db)

        gw.launch()
        gw.wait_serving()
        _warm_gateway(gw, workdir, credentials)
        observers.expect("ready")
        observers.send("start")
        observers.expect("started")
        time.sleep(1.0)  # each observer's first batches have loaded its state in a worker

        n, seconds = read_since_scan(db, gw.state_dir, target, target_own)
        if n != big:
            raise RuntimeError(f"read_since found {n} records of the large device, not {big}")
        out["export_read_since_records_per_s"] = n / seconds
        n, seconds = sql_scan(db, target, target_own)
        out["export_sql_scan_records_per_s"] = n / seconds

        idle_kb = float(np.median([gw.serving_rss_kb() for _ in range(5)]))
        rss = _RssPeak(gw.proc.pid)
        export_start = time.monotonic()
        features, size, seconds = _export(gw, target)
        export_end = time.monotonic()
        peak_kb = rss.stop()
        if features != big:
            raise RuntimeError(f"Export returned {features} feature records, not {big}")
        out["export_device_records_per_s"] = features / seconds
        out["export_vs_read_since"] = (
            out["export_device_records_per_s"] / out["export_read_since_records_per_s"]
        )
        out["export_rss_growth_mb"] = (peak_kb - idle_kb) / 1024
        out["export_idle_rss_mb"] = idle_kb / 1024
        out["export_mb"] = size / 2**20

        n, seconds = plain_delete(baseline_db, target)
        baseline_db.unlink()
        if n != big:
            raise RuntimeError(f"the plain DELETE removed {n} records, not {big}")
        out["erase_plain_delete_s"] = seconds

        time.sleep(quiet_s)
        erased = _erase(gw, target, target_own)
        if erased["removed"].get("records") != big:
            raise RuntimeError(f"Erase removed {erased['removed']}, expected {big} records")
        left = _device_rows(db, target)
        if left:
            raise RuntimeError(f"{left} rows of the erased device are still in the store")
        out["erase_effective_ms"] = 1000 * (erased["key_gone"] - erased["started"])
        out["privacy_rpc_ms"] = float(np.median(erased["rpc_ms"]))
        out["erase_complete_s"] = erased["done"] - erased["started"]
        out["erase_vs_plain_delete"] = out["erase_plain_delete_s"] / out["erase_complete_s"]

        time.sleep(2 * OBSERVE_INTERVAL_S)
        observers.send("stop")
        watched = observers.expect("stopped")
    finally:
        if observers is not None:
            observers.close()
        gw.stop()
    if watched["failures"]:
        raise RuntimeError(f"observers: {watched['failures'][:5]}")
    latency = watched["latency"]
    out["export_ack_p99_ms"] = _p99(latency, export_start, export_end, "export")
    out["erase_quiet_ack_p99_ms"] = _p99(latency, erased["started"] - quiet_s, erased["started"], "quiet")
    out["erase_ack_p99_ms"] = _p99(latency, erased["started"], erased["done"], "erase")
    if os.environ.get("BENCH_DEBUG"):
        t0 = erased["started"]
        slow = sorted((ms, due - t0) for due, ms in latency if t0 - 1 <= due <= erased["done"] + 1)[-15:]
        print(
            f"erase: key gone at {1000 * (erased['key_gone'] - t0):.1f} ms, done at "
            f"{erased['done'] - t0:.2f} s; slowest acks (ms, due s after the request): "
            + ", ".join(f"{ms:.0f} @ {at:+.2f}" for ms, at in slow),
            file=sys.stderr,
        )
    return out


def privacy_figures(quick: bool) -> dict[str, float]:
    """Both groups, each with its wall time (`privacy_e2e_bench_seconds`, `lifecycle_bench_seconds`)."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bandgate-privacy-") as tmp:
        for name, group in (("privacy_e2e", encrypted_throughput_figures), ("lifecycle", lifecycle_figures)):
            started = time.perf_counter()
            out.update(group(quick, Path(tmp)))
            out[f"{name}_bench_seconds"] = round(time.perf_counter() - started, 1)
    return out


# --- the processes this module starts ----------------------------------------------------------------


async def _observe_load(
    target: str, credentials: str, first: int, count: int, interval_s: float, minutes: int
) -> None:
    """`tls_bench._observe_load` with `minutes` batches a band; a band that has sent them all stops."""
    await tls_bench._observe_load(target, credentials, first, count, interval_s, minutes, must_last=False)


def _serve_main(argv: list[str]) -> int:
    """`bandgate serve` with the `AllowAll` consent gate (the baseline side of the throughput figure)."""
    parser = argparse.ArgumentParser(prog="python -m bench.privacy_bench serve")
    for flag in ("--listen", "--store", "--state-dir", "--health-listen", "--token-listen"):
        parser.add_argument(flag)
    parser.add_argument("--insecure", action="store_true")
    args = parser.parse_args(argv)
    from gateway.config import load_config
    from gateway.logs import configure_logging
    from gateway.privacy.consent import AllowAll
    from gateway.server import Gateway as Server

    config = load_config(
        overrides={
            "listen": args.listen,
            "store": args.store,
            "state_dir": args.state_dir,
            "health_listen": args.health_listen,
            "token_listen": args.token_listen,
            "insecure": True if args.insecure else None,
        }
    )
    configure_logging()

    async def main() -> int:
        import signal

        server = Server(config, consent=AllowAll())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await server.start()
            await stop.wait()
        finally:
            await server.shutdown()
        return 0

    return asyncio.run(main())


def _load_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.privacy_bench load")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("observe")
    p.add_argument("--target", required=True)
    p.add_argument("--credentials", required=True, help="band certificates (TLS gateway)")
    p.add_argument("--first", type=int, required=True, help="first device ID")
    p.add_argument("--count", type=int, required=True)
    p.add_argument(
        "--interval", type=float, default=OBSERVE_INTERVAL_S, help="seconds between a band's batches"
    )
    p.add_argument("--minutes", type=int, required=True, help="batches a band has to send")
    args = parser.parse_args(argv)
    asyncio.run(
        _observe_load(args.target, args.credentials, args.first, args.count, args.interval, args.minutes)
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        sys.exit(_load_main(sys.argv[2:]))
    if sys.argv[1:2] == ["serve"]:
        sys.exit(_serve_main(sys.argv[2:]))
    # the privacy figures alone: python -m bench.privacy_bench [--quick] [group ...]
    quick = "--quick" in sys.argv
    groups = [a for a in sys.argv[1:] if not a.startswith("--")] or ["encrypted_throughput", "lifecycle"]
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bandgate-privacy-") as tmp:
        for group in groups:
            started = time.perf_counter()
            figures.update(globals()[f"{group}_figures"](quick, Path(tmp)))
            figures[f"{group}_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures, indent=2))
