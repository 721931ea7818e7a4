"""End-to-end figures for `python -m bench`: `bandgate serve` as its own process, bands as gRPC clients in
another process (the load generator, `python -m bench.e2e_bench load …`), SQLite on a temp dir.

Every figure is wall time on loopback: the gateway, the load generator and anything else on the machine
share its cores, so these move with the machine's load more than the one-core CPU-time figures do.

- throughput: 64 simulated bands cut into batches beforehand (`recording_batches`, written to a batch
  file); the load generator streams each band on its own Upload stream and connection, a batch at a
  time, as fast as the acks come back (and the first 16 bands alone, for comparison). Beside it, in
  this process, the same batches through `compute.compute` and `SqliteStore.commit` without gRPC (one
  thread).
- ack latency: the same batches paced at half the measured rate, latency from when a batch was due
  (not when it was sent: a late send counts) to its ack.
- streams: 10,000 devices hold an Upload stream open, multiplexed over a few channels, each sending a
  1-minute batch once per cadence; the gateway's VmRSS from /proc (here plaintext; over TLS through
  relays in `bench.tls_bench`).
- ready: from launching `serve` to gRPC health SERVING, with the Numba cache warm and cold.

These figures run `serve --insecure` (plaintext, devices named in metadata), the baseline they were
measured on before the gateway served mutual TLS by default; `bench.tls_bench` measures the TLS path
beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

FRAME_SECONDS = 60
SAMPLE_RATE_HZ = 50
FRAME_SAMPLES = FRAME_SECONDS * SAMPLE_RATE_HZ


# --- the gateway process ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unpin(pid: int) -> None:
    """Children inherit the bench's one-core pin; the gateway and the load generator get every core."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, range(os.cpu_count() or 1))


class Gateway:
    """`bandgate serve` as a subprocess on a free loopback port, its log in a file.

    `insecure` (the default here): plaintext with identities claimed in metadata (`serve --insecure`), the
    baseline every figure before the identity issue was measured on. Otherwise mutual TLS, as `serve` runs
    by default, with the development CA and local credentials its first start makes in `state_dir`.
    Readiness is polled on the plaintext loopback health listener in both modes. `restart` stops it
    (SIGTERM) and starts it again on the same port, state dir and store. `store` (default: a new SQLite
    file in `workdir`) and `serve_args` (more `serve` flags, e.g. `--stream URL`) say what else it runs
    with."""

    module = "gateway.cli"  # what runs `serve` (its flags are `bandgate serve`'s)

    def __init__(
        self,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        insecure: bool = True,
        state_dir: Path | None = None,
        store: str | None = None,
        serve_args: Sequence[str] = (),
    ):
        self.workdir = workdir
        self.insecure = insecure
        # The benchmark's simulated bands have no owners to consent: the operator's settings consent to
        # every family for them (the gate is still asked for every batch). A caller's env overrides.
        self.env = {"BANDGATE_DEFAULT_CONSENT": "all", "BANDGATE_AGE_UNKNOWN": "adult", **(env or os.environ)}
        self.address = f"127.0.0.1:{_free_port()}"
        self.health_address = f"127.0.0.1:{_free_port()}"
        self.token_address = f"127.0.0.1:{_free_port()}"  # the bearer-token listener (TLS only)
        self.state_dir = state_dir or workdir / f"state-{time.monotonic_ns()}"
        self.store = store or f"sqlite:///{workdir / f'gw-{time.monotonic_ns()}.db'}"
        self.serve_args = list(serve_args)  # more `serve` flags (`--workers 2`: bench/workers_bench.py)
        self.launch()

    def launch(self) -> None:
        """Start `serve` (again, after `stop`: the same port, state dir and store)."""
        self.log = self.workdir / f"serve-{time.monotonic_ns()}.log"
        args = [
            sys.executable, "-m", self.module, "serve",
            "--listen", self.address,
            "--store", self.store,
            "--state-dir", str(self.state_dir),
            "--health-listen", self.health_address,
            "--token-listen", self.token_address,
        ]  # fmt: skip
        if self.insecure:
            args.append("--insecure")
        args += self.serve_args
        with open(self.log, "w") as err:
            self.launched = time.perf_counter()
            self.proc = subprocess.Popen(
                args, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=err, env=self.env
            )
        _unpin(self.proc.pid)

    def restart(self) -> float:
        """SIGTERM, wait for the exit, start again on the same port, state dir and store; returns the
        seconds the old process took to drain and exit."""
        started = time.perf_counter()
        self.stop()
        stopped = time.perf_counter() - started
        self.launch()
        return stopped

    def wait_serving(self, timeout_s: float = 60.0) -> float:
        """Seconds from launch to health SERVING (polled every 10 ms)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.perf_counter() + timeout_s
        # grpc's reconnect backoff (1 s, then 1.6×) would otherwise make a refused first attempt wait a
        # second or more: readiness read as ~1.1 or ~2.7 s whenever the gateway was not up at once
        fast = [(f"grpc.{k}_reconnect_backoff_ms", 10) for k in ("initial", "min", "max")]
        with grpc.insecure_channel(self.health_address, options=fast) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {self.log.read_text()[-2000:]}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - self.launched
                except grpc.RpcError:
                    pass
                time.sleep(0.01)
        raise TimeoutError(f"serve not SERVING after {timeout_s} s")

    def rss_mb(self) -> float:
        """VmRSS of the serving process plus its compute worker processes: a sum, so the shared
        libraries they each map count once per process (an upper bound on what the gateway holds)."""
        return sum(_rss_kb(pid) for pid in (self.proc.pid, *_children(self.proc.pid))) / 1024

    def serving_rss_kb(self) -> int:
        """VmRSS of the serving process alone (gRPC, TLS and the streams live there, not in the workers)."""
        return _rss_kb(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the workers and the serving process: for a gateway whose drain is not measured and
        would wait for workers compiling kernels (a cold Numba cache: ~20 s)."""
        for pid in (*_children(self.proc.pid), self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:  # a worker that ended since it was listed
        return 0
    raise RuntimeError(f"no VmRSS for {pid}")


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/*/stat."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _load(args: list[str], *, stdin: int | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.e2e_bench", "load", *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
    )
    _unpin(proc.pid)
    return proc


# --- inputs -------------------------------------------------------------------------------------------


def _recordings(bands: int, minutes: float) -> list:
    """Simulated bands: a day's mix of activity and sleep, from 08:00 local."""
    from gateway.simulator import simulate_band
    from gateway.simulator.recorder import band_seed

    return [simulate_band(band_seed(2026, b), minutes, scenario="mixed") for b in range(bands)]


def _fleet_file(path: Path, recordings: list, *, batch_minutes: int, fleet: int) -> tuple[list, int]:
    """The recordings as batches under the device IDs of fleet `fleet` (so two fleets cut from the same
    signals are different devices to the gateway), written to a batch file in the order a fleet sends
    them; returns the batches and the sample count."""
    from dataclasses import replace

    from gateway.batchfile import write_batches
    from gateway.simulator.recorder import band_device_id, recording_batches

    per_band = [
        list(recording_batches(replace(rec, device_id=band_device_id(fleet, b)), batch_frames=batch_minutes))
        for b, rec in enumerate(recordings)
    ]
    order = [bs[i] for i in range(max(map(len, per_band))) for bs in per_band if i < len(bs)]
    with open(path, "wb") as f:
        write_batches(f, order)
    return order, sum(rec.accel.shape[0] for rec in recordings)


def _warm_gateway(gw: Gateway, workdir: Path, credentials: Path | None = None) -> None:
    """Before timing, one band through the gateway whose night window closes (gateway/warm.py's input),
    so every kernel is loaded from the Numba cache and none is loaded inside a timed run."""
    from dataclasses import replace

    from gateway.batchfile import write_batches
    from gateway.simulator import simulate_band
    from gateway.simulator.recorder import recording_batches
    from gateway.simulator.signals import DEFAULT_START_US

    rec = simulate_band(1, 30, scenario="night", start_us=DEFAULT_START_US - 20 * 60_000_000)
    path = workdir / f"warm-{time.monotonic_ns()}.bgb"
    with open(path, "wb") as f:
        write_batches(f, recording_batches(replace(rec, device_id=WARM_DEVICE), batch_frames=10))
    _stream(gw, path, channels=1, credentials=credentials)


WARM_DEVICE = 0xAAAA_0000_0000_0001  # the band _warm_gateway sends (a TLS gateway must have enrolled it)


def _in_process(batches: list, workdir: Path) -> float:
    """decode + features + store without gRPC: `compute.compute` then `SqliteStore.commit`, one thread;
    returns wall seconds."""
    from decoder import config as decoder_config
    from gateway.compute import compute
    from gateway.store import open_store

    with open_store(f"sqlite:///{workdir / f'inproc-{time.monotonic_ns()}.db'}") as store:
        compute(batches[0], None, decoder_config.MAX_DECOMPRESSED_BYTES)  # kernels loaded, not timed
        states: dict[int, bytes | None] = defaultdict(lambda: None)
        started = time.perf_counter()
        for batch in batches:
            c = compute(batch, states[batch.device_id], decoder_config.MAX_DECOMPRESSED_BYTES)
            store.commit(batch.device_id, batch.boot_id, batch.first_seq, batch.last_seq, c.state, c.records)
            states[batch.device_id] = c.state
        return time.perf_counter() - started


def _stream(
    gw: Gateway, batch_file: Path, *, channels: int, rate: float = 0.0, credentials: Path | None = None
) -> dict:
    """Stream a batch file through `gw` (see `_stream_load`); with `credentials` (a TLS gateway) each
    band on a connection of its own with its own certificate from that file, whatever `channels` says."""
    args = ["stream", "--target", gw.address, "--file", str(batch_file)]
    args += ["--channels", str(channels), "--rate", str(rate)]
    if credentials is not None:
        args += ["--credentials", str(credentials)]
    proc = _load(args)
    out, _ = proc.communicate(timeout=600)
    if proc.returncode:
        raise RuntimeError(f"load generator failed ({proc.returncode})")
    return json.loads(out.splitlines()[-1])


# --- the figures --------------------------------------------------------------------------------------


def throughput_figures(quick: bool, workdir: Path) -> dict[str, float]:
    """e2e_samples_per_s (10-minute batches), e2e_1min_samples_per_s, e2e_vs_pipeline, ack_p50/p99_ms."""
    # A gateway serves many bands at once, each on its own connection, and each band waits for its ack
    # before its next batch: with too few bands the figure measures that round trip, not the gateway
    # (4 bands -> 16: +30 to 45 %; 16 -> 64: +20 % with 1-minute batches, where 16 bands left the
    # workers waiting). The first 16 bands alone are measured too: what 16 concurrent bands get. A full
    # run streams a whole day, so that the night's sleep staging is part of the load.
    bands, minutes = (64, 60) if quick else (64, 24 * 60)
    few = 16
    recordings = _recordings(bands, minutes)
    out: dict[str, float] = {}
    gw = Gateway(workdir)
    try:
        gw.wait_serving()
        _warm_gateway(gw, workdir)
        runs = (
            (10, "e2e_samples_per_s", recordings),
            (1, "e2e_1min_samples_per_s", recordings),
            (10, f"e2e_{few}_bands_samples_per_s", recordings[:few]),
            (1, f"e2e_1min_{few}_bands_samples_per_s", recordings[:few]),
        )
        for fleet, (batch_minutes, key, fleet_recordings) in enumerate(runs, start=1):
            path = workdir / f"fleet-{fleet}.bgb"
            # the same signals as other devices for each run, so nothing is a duplicate
            batches, samples = _fleet_file(path, fleet_recordings, batch_minutes=batch_minutes, fleet=fleet)
            result = _stream(gw, path, channels=len(fleet_recordings))
            assert result["samples"] == samples, (result["samples"], samples)
            out[key] = samples / result["wall_s"]
            if key == "e2e_samples_per_s":
                t_pipeline = _in_process(batches, workdir)
                out["pipeline_samples_per_s"] = samples / t_pipeline
                out["e2e_vs_pipeline"] = out[key] / out["pipeline_samples_per_s"]
                ten_minute_file, ten_minute_samples = path, samples
    finally:
        gw.stop()
    # Half load on a fresh gateway (the fleet above is stored there already).
    gw = Gateway(workdir)
    try:
        gw.wait_serving()
        _warm_gateway(gw, workdir)
        paced = _stream(gw, ten_minute_file, channels=bands, rate=out["e2e_samples_per_s"] / 2)
        assert paced["samples"] == ten_minute_samples
    finally:
        gw.stop()
    lat = np.array(paced["latency_ms"])
    out["ack_p50_ms"] = float(np.percentile(lat, 50))
    out["ack_p99_ms"] = float(np.percentile(lat, 99))
    out["ack_half_load_samples_per_s"] = paced["samples"] / paced["wall_s"]
    return out


def streams_figures(quick: bool, workdir: Path, devices: int = 10_000) -> dict[str, float]:
    """streams_plain_rss_mb: `streams_run` on a plaintext gateway (`serve --insecure`), the streams over 16
    connections (the figure `streams_rss_mb` was until the gateway served TLS; that key is now the relays
    over mutual TLS of `bench.tls_bench.relay_streams_figures`)."""
    gw = Gateway(workdir)
    try:
        gw.wait_serving()
        _warm_gateway(gw, workdir)
        found = streams_run(gw, quick, devices, ["--channels", "16"])
    finally:
        gw.stop()
    return {
        "streams_plain_rss_mb": found["peak_mb"],
        "streams_plain_idle_rss_mb": found["idle_mb"],
        "streams_plain_open_s": found["open_s"],
    }


def streams_run(gw: Gateway, quick: bool, devices: int, load_args: list[str]) -> dict[str, float]:
    """The peak VmRSS of `gw` (serving process plus workers) with `devices` streams open, each sending a
    1-minute batch every 10 minutes (phases spread over the cadence), sampled over a window of the
    cadence: all of it in a full run, 20 s in --quick (the count and the cadence stay; about 330 devices
    send in 20 s). `load_args` say how the streams reach the gateway (`--channels`, `--relays`)."""
    cadence_s, window_s = 600.0, (20.0 if quick else 600.0)
    idle_mb = gw.rss_mb()
    proc = _load(
        ["streams", "--target", gw.address, "--devices", str(devices),
         "--cadence", str(cadence_s), "--window", str(window_s), *load_args],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        opened = json.loads(proc.stdout.readline() or "null")  # every stream is open
        if opened is None:
            raise RuntimeError("stream load generator died before its streams were open")
        os.set_blocking(proc.stdout.fileno(), False)
        peak, done = 0.0, None
        while done is None:
            peak = max(peak, gw.rss_mb())
            text = proc.stdout.readline()
            if text:
                done = json.loads(text)
            elif proc.poll() is not None:
                raise RuntimeError("stream load generator died")
            else:
                time.sleep(0.25)
        peak = max(peak, gw.rss_mb())
        proc.stdin.close()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if done["acked"] != done["due"] or done["failures"]:
        raise RuntimeError(f"streams: not every due batch was acked: {done}")
    return {"peak_mb": peak, "idle_mb": idle_mb, "open_s": opened["open_s"]}


def ready_figures(quick: bool, workdir: Path) -> dict[str, float]:
    """serve_ready_s (Numba cache warm) and serve_ready_cold_s (NUMBA_CACHE_DIR an empty temp dir)."""
    rounds = 3 if quick else 5
    warm = []
    for _ in range(rounds):
        gw = Gateway(workdir)
        try:
            warm.append(gw.wait_serving())
        finally:
            gw.stop()
    cold = []
    for _ in range(max(1, rounds - 1)):
        with tempfile.TemporaryDirectory() as cache:
            gw = Gateway(workdir, env={**os.environ, "NUMBA_CACHE_DIR": cache})
            try:
                cold.append(gw.wait_serving())
            finally:
                gw.kill()
    # the median: a start-up is one wall-clock event, and the best of a few would flatter it
    return {"serve_ready_s": float(np.median(warm)), "serve_ready_cold_s": float(np.median(cold))}


def e2e_figures(quick: bool) -> dict[str, float]:
    """Every gateway group in turn. `--quick` leaves out the plaintext streams figure (`streams_plain_*`,
    full runs only: 40 s in --quick), and its plaintext reconnect run stops after the connections' memory
    (`plain_conn_rss_kb`; the plaintext storm, `reconnect_plain_*`, in full runs only), so that the
    identity and TLS figures keep --quick near 3 minutes."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bandgate-e2e-") as tmp:
        workdir = Path(tmp)
        from bench import tls_bench

        for name, group in (
            ("e2e", throughput_figures),
            ("tls_e2e", tls_bench.tls_throughput_figures),
            ("streams", tls_bench.relay_streams_figures),
            *((("streams_plain", streams_figures),) if not quick else ()),
            ("reconnect", tls_bench.reconnect_figures),
            ("reconnect_plain", tls_bench.plain_reconnect_figures),
            ("refusals", tls_bench.refusal_figures),
            ("ready", ready_figures),
        ):
            started = time.perf_counter()
            out.update(group(quick, workdir))
            out[f"{name}_bench_seconds"] = round(time.perf_counter() - started, 1)
    return out


# --- the load generator (its own process) ------------------------------------------------------------


async def _stream_load(
    target: str, file: str, channels: int, rate: float, credentials: str | None = None
) -> dict:
    """Each device of the batch file on its own Upload stream, over `channels` plaintext connections
    round-robin; with `credentials` (a TLS gateway), each device on a connection of its own made with
    its own certificate (`bench.tls_bench.write_credentials`)."""
    import grpc

    from bandgate.v1 import ingest_pb2_grpc
    from bench.tls_bench import read_credentials
    from gateway.auth import device_metadata
    from gateway.batchfile import read_batches
    from gateway.pipeline import OK

    per_device: dict[int, list] = defaultdict(list)
    for batch in read_batches(file):
        per_device[batch.device_id].append(batch)
    devices = list(per_device)
    latency_ms: list[float] = []
    samples = 0
    # A local subchannel pool each, so each channel is a connection of its own, as each band's (or
    # phone's) is: channels to one target otherwise share one TCP connection.
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
    if credentials:
        creds = read_credentials(credentials)
        chans = [grpc.aio.secure_channel(target, creds[f"{d:016x}"], options=options) for d in devices]
        metadata: Callable[[int], tuple] = lambda _device: ()  # noqa: E731 - the certificate names it
    else:
        chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
        metadata = device_metadata
    for ch in chans:
        await ch.channel_ready()

    async def band(i: int, device_id: int, started: float) -> None:
        nonlocal samples
        stub = ingest_pb2_grpc.IngestServiceStub(chans[i % len(chans)])
        call = stub.Upload(metadata=metadata(device_id))
        due = started
        for batch in per_device[device_id]:
            n = batch.frame_count * FRAME_SAMPLES
            if rate:
                # the fleet's batches spread evenly in time: this band's next one is due when the whole
                # fleet has sent `n` samples at `rate` since its last
                due += n * len(devices) / rate
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            sent = due if rate else time.perf_counter()
            await call.write(batch)
            ack = await call.read()
            if ack is grpc.aio.EOF or ack.code != OK:
                raise RuntimeError(f"device {device_id:016x}: {ack}")
            latency_ms.append(1000 * (time.perf_counter() - sent))
            samples += n
        await call.done_writing()
        await call.code()

    started = time.perf_counter()
    # Paced: the bands' schedules are offset so their batches do not all fall due at once.
    period = per_device[devices[0]][0].frame_count * FRAME_SAMPLES * len(devices) / rate if rate else 0.0
    await asyncio.gather(
        *(band(i, d, started + period * (i / len(devices) - 1)) for i, d in enumerate(devices))
    )
    wall = time.perf_counter() - started
    for ch in chans:
        await ch.close()
    # started_at: time.perf_counter() here, CLOCK_MONOTONIC on Linux, so the bench process can place it
    # on its own clock (the stream figures time the drain after the last ack from it)
    return {
        "samples": samples,
        "wall_s": wall,
        "started_at": started,
        "latency_ms": latency_ms,
        "batches": len(latency_ms),
    }


def _device_batches(devices: int, seed: int = 7) -> list:
    """One distinct 1-minute batch for each of `devices` devices (a minute of one simulated band, encoded
    under each device's ID)."""
    from decoder.frames import split_frames
    from gateway.envelope import build_batch
    from gateway.simulator import simulate_band

    rec = simulate_band(seed, 1, scenario="day")
    out = []
    for d in range(devices):
        device_id = 0x5EED_0000_0000_0000 + d
        frames = split_frames(
            rec.accel,
            frame_samples=FRAME_SAMPLES,
            hr_bpm=rec.hr_bpm,
            rr_ms=rec.rr_ms,
            rr_end_us=rec.rr_end_us,
            device_id=device_id,
            boot_id=1,
            first_seq=0,
            start_us=rec.start_us,
            sample_rate_hz=rec.sample_rate_hz,
            accel_bits=rec.accel_bits,
            accel_range_g=rec.accel_range_g,
            utc_offset_min=rec.utc_offset_min,
        )
        out.append(build_batch(frames))
    return out


async def _streams_load(
    target: str,
    devices: int,
    channels: int,
    cadence_s: float,
    window_s: float,
    ramp_per_s: float = 1000.0,
    relays: str | None = None,
) -> None:
    """Open `devices` Upload streams, then each sends its batch at a random moment of one cadence; print
    {"event": "open"} when all are open and {"event": "acked"} when all are acked; hold the streams open
    until stdin closes.

    Plaintext: the streams round-robin over `channels` connections. `relays` (a TLS gateway): a file of
    relay certificates (`bench.tls_bench.write_credentials`), relay k bound to devices k·n … k·n + n − 1
    of `_device_batches` (n = devices / relays); each relay is one mutual-TLS connection carrying its
    devices' streams, each naming its device in `bandgate-device-id` metadata."""
    import grpc

    from bandgate.v1 import ingest_pb2_grpc
    from bench.tls_bench import read_credentials
    from gateway.auth import STREAM_ACCEPTED, device_metadata
    from gateway.pipeline import OK

    batches = _device_batches(devices)
    # a local subchannel pool each: otherwise channels to one target share one TCP connection
    options = [("grpc.use_local_subchannel_pool", 1)]
    if relays:
        creds = read_credentials(relays)
        chans = [grpc.aio.secure_channel(target, c, options=options) for c in creds.values()]
        per_relay = -(-devices // len(chans))

        def channel_of(i: int) -> grpc.aio.Channel:
            return chans[i // per_relay]
    else:
        chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]

        def channel_of(i: int) -> grpc.aio.Channel:
            return chans[i % channels]

    for ch in chans:
        await ch.channel_ready()
    started = time.perf_counter()
    reopened = 0

    async def open_stream(i: int, batch) -> grpc.aio.StreamStreamCall:
        """One device's stream, open once the gateway has accepted it (its headers, sent on acceptance,
        have arrived); one that grpc core cancels before that is opened again, as a band reconnects (at
        most 3 tries)."""
        nonlocal reopened
        stub = ingest_pb2_grpc.IngestServiceStub(channel_of(i))
        for attempt in range(3):
            call = stub.Upload(metadata=device_metadata(batch.device_id))
            if STREAM_ACCEPTED[0] in tuple(await call.initial_metadata()):
                return call
            code = await call.code()  # ended unaccepted: its status is all there is
            if attempt == 2 or code not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE):
                raise RuntimeError(f"stream {i} not accepted: {code}: {await call.details()}")
            reopened += 1
            await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    calls = []
    # Ramp up at `ramp_per_s` streams a second: grpc core cancels calls that wait unaccepted past its
    # pending-request limit, which an instant burst of 10,000 streams exceeds (a fleet reconnects over time).
    for k in range(0, len(batches), 100):
        calls += await asyncio.gather(
            *(open_stream(i, b) for i, b in enumerate(batches[k : k + 100], start=k))
        )
        await asyncio.sleep(max(0.0, started + (k + 100) / ramp_per_s - time.perf_counter()))
    print(
        json.dumps({"event": "open", "open_s": time.perf_counter() - started, "reopened": reopened}),
        flush=True,
    )
    rng = random.Random(1)
    acked = 0
    codes: dict[int, int] = defaultdict(int)
    failures: list[str] = []

    async def device(call, batch) -> None:
        nonlocal acked
        await asyncio.sleep(rng.uniform(0, cadence_s))  # the devices' phases spread over the cadence
        while True:  # as a band does: an overloaded gateway's batch is sent again after retry_after_ms
            try:
                await call.write(batch)
                ack = await call.read()
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                codes[-2] += 1
                if not failures:
                    failures.append(f"{await call.code()}: {await call.details()}")
                return
            code = -1 if ack is grpc.aio.EOF else ack.code
            codes[code] += 1
            if code == OK:
                acked += 1
                return
            if code == -1 or not ack.retry_after_ms:
                return
            await asyncio.sleep(ack.retry_after_ms / 1000)

    # Observe `window_s` of the cadence: the devices due in it send; all stay open.
    tasks = [asyncio.ensure_future(device(c, b)) for c, b in zip(calls, batches, strict=True)]
    await asyncio.sleep(window_s)
    due = sum(t.done() for t in tasks)
    print(
        json.dumps(
            {"event": "acked", "acked": acked, "due": due, "codes": dict(codes), "failures": failures}
        ),
        flush=True,
    )
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for t in tasks:
        t.cancel()
    for c in calls:
        c.cancel()
    for ch in chans:
        await ch.close()


def _load_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_bench load")
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("stream")
    s.add_argument("--target", required=True)
    s.add_argument("--file", required=True)
    s.add_argument("--channels", type=int, default=4)
    s.add_argument("--rate", type=float, default=0.0, help="samples/s of the whole fleet; 0: as fast as acks")
    s.add_argument("--credentials", help="band certificates (TLS gateway): one connection and cert a band")
    m = sub.add_parser("streams")
    m.add_argument("--target", required=True)
    m.add_argument("--devices", type=int, default=10_000)
    m.add_argument("--channels", type=int, default=16)
    m.add_argument("--cadence", type=float, default=600.0)
    m.add_argument("--window", type=float, default=600.0, help="seconds of the cadence to observe")
    m.add_argument("--relays", help="relay certificates (TLS gateway): each relay one connection")
    args = parser.parse_args(argv)
    if args.mode == "stream":
        result = _stream_load(args.target, args.file, args.channels, args.rate, args.credentials)
        print(json.dumps(asyncio.run(result)))
    else:
        asyncio.run(
            _streams_load(
                args.target, args.devices, args.channels, args.cadence, args.window, relays=args.relays
            )
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        sys.exit(_load_main(sys.argv[2:]))
    print(json.dumps(e2e_figures("--quick" in sys.argv), indent=2))
