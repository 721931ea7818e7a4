"""Helpers for tests against the real gateway: a loopback server on an ephemeral port, a tmp SQLite file,
an upload stream that sends one batch and reads its ack, and the replay reference."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from bandgate.v1 import batch_pb2, ingest_pb2, ingest_pb2_grpc
from decoder.batch import compress_batch
from decoder.frames import Frame, encode_container, encode_frame
from gateway import heap
from gateway.auth import device_metadata
from gateway.config import GatewayConfig
from gateway.privacy.keys import TOMBSTONE_FILE, load_tombstone_key
from gateway.privacy.sealing import has_key_store, open_sealer
from gateway.replay import replay_batches
from gateway.security.audit import audit_pseudonym
from gateway.security.client import ClientIdentity, enrol_device, local_identity
from gateway.simulator.client import run_fleet
from gateway.simulator.recorder import fleet_batches
from gateway.store import Store, open_store

REPO = Path(__file__).resolve().parents[2]
SERVE = (sys.executable, "-m", "gateway.cli", "serve")


def config(tmp_path: Path, **changes) -> GatewayConfig:
    """A development (`insecure`, plaintext loopback) gateway: for tests of the batch path itself. Tests of
    what a real deployment does use `tls_config`."""
    return tls_config(tmp_path, **{"insecure": True, **changes})


def tls_config(tmp_path: Path, **changes) -> GatewayConfig:
    """A TLS gateway as `bandgate serve` runs by default, on ephemeral ports, its state dir in tmp_path.

    Every family is consented by default and an owner without a birth year is taken for an adult (the
    operator's settings), so tests of other parts need no consent step; tests/privacy use
    `privacy_config`, with `bandgate serve`'s own defaults (nothing consented, age unknown = minor)."""
    values = dict(
        listen="127.0.0.1:0",
        store=f"sqlite:///{tmp_path}/gw.db",
        state_dir=str(tmp_path / "state"),
        token_listen="127.0.0.1:0",
        health_listen="127.0.0.1:0",
        default_consent="all",
        age_unknown="adult",
    )
    values.update(changes)
    return GatewayConfig(**values)


def privacy_config(tmp_path: Path, **changes) -> GatewayConfig:
    """A TLS gateway with `bandgate serve`'s privacy defaults: no consent until the owner gives it, and an
    owner of unknown age is treated as a minor."""
    return tls_config(tmp_path, **{"default_consent": "", "age_unknown": "minor", **changes})


class Credentials:
    """Clients of a TLS gateway whose state dir is `state_dir`: the local operator and consumer, and bands
    enrolled through the admin API (a key made here, a CSR the gateway's CA signs), one per device."""

    def __init__(self, state_dir: Path | str, address: str):
        self.state_dir = Path(state_dir)
        self.address = address
        self._bands: dict[int, ClientIdentity] = {}

    def channel(self, role: str = "operator", address: str | None = None) -> grpc.aio.Channel:
        identity = local_identity(role, self.state_dir)
        return grpc.aio.secure_channel(address or self.address, identity.credentials())

    async def band(self, device_id: int) -> ClientIdentity:
        if device_id not in self._bands:
            async with self.channel("operator") as ch:
                self._bands[device_id] = await enrol_device(ch, device_id)
        return self._bands[device_id]

    async def band_channel(self, device_id: int, address: str | None = None) -> grpc.aio.Channel:
        identity = await self.band(device_id)
        return grpc.aio.secure_channel(address or self.address, identity.credentials())

    async def fleet_credentials(self, device_ids: Iterable[int]) -> dict[int, grpc.ChannelCredentials]:
        return {d: (await self.band(d)).credentials() for d in device_ids}


@functools.cache
def band(seed: int = 7, minutes: int = 40, batch_minutes: int = 5) -> tuple[int, tuple[batch_pb2.Batch, ...]]:
    """One simulated band's device ID and batches (cached: the simulation is the slow part)."""
    ((rec, batches),) = fleet_batches(bands=1, minutes=minutes, seed=seed, batch_minutes=batch_minutes)
    return rec.device_id, tuple(batches)


def processed(batches: Iterable[batch_pb2.Batch]) -> list[dict]:
    """replay_batches' records without its end-of-input flush (a live gateway keeps streams open)."""
    exhausted = False

    def feed():
        nonlocal exhausted
        yield from batches
        exhausted = True

    out = []
    for record in replay_batches(feed()):
        if exhausted:
            break
        out.append(record)
    return out


def key(record: dict) -> tuple:
    return (record["device"], record["family"], record["start_us"])


@contextlib.contextmanager
def gateway_store(url: str, state_dir: Path | None = None) -> Iterator[Store]:
    """The store of a gateway `tls_config` made (its state dir beside an SQLite database, else
    `state_dir`), opened as the gateway opens it: with its keys (keys.db there, or a PostgreSQL store's key
    schema), so sealed values open. A store without a key store opens in clear."""
    state = Path(url.removeprefix("sqlite:///")).parent / "state" if state_dir is None else Path(state_dir)
    sealer = open_sealer(state, url) if has_key_store(state, url) else None
    try:
        with open_store(url, sealer) as store:
            yield store
    finally:
        if sealer is not None:
            sealer.keys.close()


def audit_name(state_dir: Path | str, device: int | str) -> str:
    """How the audit log names `device`: its keyed pseudonym under the state dir's tombstone key."""
    return audit_pseudonym(load_tombstone_key(Path(state_dir) / TOMBSTONE_FILE, create=False), device)


def stored(url: str, **filters) -> list[dict]:
    with gateway_store(url) as store:
        return [r for _, r in store.read_since(0, limit=10**9, **filters)]


def same_records(a: list[dict], b: list[dict]) -> bool:
    return sorted(a, key=key) == sorted(b, key=key)


class Uploader:
    """One Upload stream for one device: `await up.send(batch)` → its Ack."""

    def __init__(self, channel: grpc.aio.Channel, device_id: int):
        self.call = ingest_pb2_grpc.IngestServiceStub(channel).Upload(metadata=device_metadata(device_id))

    async def send(self, batch: batch_pb2.Batch) -> ingest_pb2.Ack:
        await self.call.write(batch)
        ack = await self.call.read()
        assert ack is not grpc.aio.EOF, "the stream ended without an ack"
        return ack

    async def close(self) -> grpc.StatusCode:
        await self.call.done_writing()
        return await self.call.code()


def envelope(frames: list[bytes], first: Frame, **fields) -> batch_pb2.Batch:
    """A batch from already-encoded frames (so a test can corrupt one), envelope fields from `first`."""
    values = dict(
        device_id=first.device_id,
        boot_id=first.boot_id,
        first_seq=first.seq,
        last_seq=first.seq + len(frames) - 1,
        payload=compress_batch(encode_container(frames)),
        format_version=1,
        frame_count=len(frames),
    )
    values.update(fields)
    return batch_pb2.Batch(**values)


def frames_of(device_id: int, n: int, *, seq: int = 0, accel=None, start_us: int = 1_767_225_600_000_000):
    """`n` one-minute 50 Hz frames (accel rows given, or a gentle walk-free signal)."""
    import numpy as np

    out = []
    for i in range(n):
        a = accel if accel is not None else np.tile(np.array([[0, 0, 256]], np.int16), (3000, 1))
        out.append(
            Frame(device_id=device_id, boot_id=1, seq=seq + i, start_us=start_us + i * 60_000_000, accel=a)
        )
    return out


def encode(frames: list[Frame]) -> list[bytes]:
    return [encode_frame(f) for f in frames]


class ServeProcess:
    """`bandgate serve` as a subprocess; its JSON log goes to a file (a pipe nobody reads would fill up and
    block the server), and `address` is parsed from its "serving" line."""

    def __init__(
        self,
        tmp_path: Path,
        db: Path | str,
        listen: str = "127.0.0.1:0",
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        """`db`: a SQLite file, or a store URL (PostgreSQL); `env`: more environment (BANDGATE_*)."""
        self.log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self.state_dir = tmp_path / "state"
        # the operator's privacy settings tls_config uses: every family consented, age unknown = adult
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}:{REPO / 'protos'}",
            "BANDGATE_DEFAULT_CONSENT": "all",
            "BANDGATE_AGE_UNKNOWN": "adult",
            **(env or {}),
        }
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    *SERVE,
                    "--listen",
                    listen,
                    "--store",
                    db if isinstance(db, str) else f"sqlite:///{db}",
                    "--state-dir",
                    str(self.state_dir),
                    "--token-listen",
                    "127.0.0.1:0",
                    "--health-listen",
                    "127.0.0.1:0",
                    *extra,
                ],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        self.address = self._wait_for("serving", 120)  # as the supervisor's START_TIMEOUT_S
        self.health_address = self._field("health_address")
        self.credentials = Credentials(self.state_dir, self.address)

    def _field(self, name: str) -> str:
        for line in self.lines:
            if '"event":"serving"' in line:
                return re.search(rf'"{name}":"([^"]*)"', line).group(1)
        raise AssertionError(f"no {name} in the serving line")

    @property
    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def _wait_for(self, event: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in self.lines:
                if f'"event":"{event}"' in line:
                    return re.search(r'"address":"([^"]+)"', line).group(1)
            time.sleep(0.05)
        raise AssertionError(f"serve did not log {event!r}: {self.lines}")

    @property
    def worker_pids(self) -> list[int]:
        """The compute worker processes it logged as started."""
        return [
            int(m.group(1)) for line in self.lines if (m := re.search(r'"worker_started".*"pid":(\d+)', line))
        ]

    async def fleet_acked(self, fleet: list, n: int) -> asyncio.Future:
        """`run_fleet` over this server's band certificates as a task (each band giving up after 30 s
        without progress, so it rides out a restart), returned once `n` batches are acked: a fleet
        mid-stream, for a test to kill or restart the server under."""
        acked = 0

        def count(_: int) -> None:
            nonlocal acked
            acked += 1

        credentials = await self.credentials.fleet_credentials(d for d, _ in fleet)
        bands = asyncio.ensure_future(
            run_fleet(self.address, fleet, on_ack=count, give_up_after_s=30, credentials=credentials)
        )
        while acked < n:
            await asyncio.sleep(0.01)
        return bands

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a container's PID 1 may never reap one)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def assert_no_leak(text: str, raw: bytes, patterns: Iterable[str]) -> None:
    """No sample in `text`: neither the raw bytes dumped as hex or as a bytes repr, nor any of `patterns`,
    regexes for values standing alone (not four digits inside a timestamp, key ID, MAC or ciphertext
    decoded as text, where they turn up by chance: a CI run once failed on one)."""
    for needle in (raw.hex(), repr(raw)[2:-1]):
        assert needle not in text, needle
    for pattern in patterns:
        leak = re.search(pattern, text)
        assert leak is None, (pattern, text[max(0, leak.start() - 80) : leak.end() + 80])


@contextlib.contextmanager
def steady_heap() -> Iterator[None]:
    """Keep the test process's own collector out of a latency it measures: its heap (pytest, hypothesis,
    every module imported: ~160,000 objects) frozen and full collections rare, as a serving process's
    (gateway/heap.py), both undone after. One full collection of it took up to 73 ms, counted as the
    gateway's latency when it fell inside the measured window."""
    threshold = gc.get_threshold()
    heap.settle()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def registry_reads(gateway, kind: str) -> float:
    """The registry reads of `kind` ("delta": what changed, "full": the whole registry) a gateway made."""
    return gateway.metrics.registry.get_sample_value("bandgate_registry_reads_total", {"kind": kind}) or 0.0
