"""`bandgate serve --workers 2` as a process, over mutual TLS as it runs by default: two serving processes
take streams on one port; a band that reconnects to the other process continues its sequence with nothing
lost or doubled; SIGTERM drains both and exits 0; a second `serve` on the port is refused with a message;
a killed serving process is started again and health recovers; one that keeps dying stops the supervisor
with exit status 1; `--token-process` serves the token listener from a process of its own."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bandgate.v1 import admin_pb2, admin_pb2_grpc
from gateway.pipeline import ALREADY_EXISTS, OK
from gateway.simulator.client import run_fleet
from gateway.simulator.recorder import fleet_batches
from gateway.store import open_store
from gateway.supervisor import HEALTH_MISSES, HEALTH_POLL_S, HEALTH_TIMEOUT_S, Supervisor
from tests.gateway.gatewaykit import (
    REPO,
    SERVE,
    Credentials,
    Uploader,
    band,
    config,
    key,
    processed,
    running,
    same_records,
    stored,
    wait_until,
)
from tests.stream.natskit import all_messages, delete_streams, record_of, shared_nats, unique_prefix

SERVING = health_pb2.HealthCheckResponse.SERVING


class Supervised:
    """`bandgate serve --workers N` as a subprocess, its JSON log in a file; addresses and the serving
    processes' pids from the supervisor's "supervisor_serving" line."""

    def __init__(self, tmp_path: Path, db: Path, *extra: str, workers: int = 2, listen: str = "127.0.0.1:0"):
        self.log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self.state_dir = tmp_path / "state"
        self.db = db
        self.proc = _serve(
            tmp_path,
            self.log_path,
            "--workers", str(workers),
            "--listen", listen,
            "--store", f"sqlite:///{db}",
            "--state-dir", str(self.state_dir),
            "--metrics-listen", "127.0.0.1:0",
            *extra,
        )  # fmt: skip
        line = self.wait_for('"event":"supervisor_serving"', 60)
        self.address = _field(line, "address")
        self.token_address = _field(line, "token_address")
        self.health_address = _field(line, "health_address")
        self.metrics_address = _field(line, "metrics_address")
        self.pids = [int(p) for p in re.search(r'"pids":\[([\d,]+)\]', line).group(1).split(",")]
        self.credentials = Credentials(self.state_dir, self.address)

    @property
    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def wait_for(self, text: str, timeout: float, after: int = 0) -> str:
        """The first log line (from line `after` on) that holds `text`."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # before reading: its last lines are then in the file
            for line in self.lines[after:]:
                if text in line:
                    return line
            if exited or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise AssertionError(f"serve did not log {text!r}: {self.lines[-30:]}")

    def worker_pids(self, process: int) -> list[int]:
        """The compute workers serving process `process` logged as started."""
        found = (
            re.search(rf'"process":{process},"event":"worker_started".*"pid":(\d+)', x) for x in self.lines
        )
        return [int(m.group(1)) for m in found if m]

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """The supervisor's /metrics: (sample name, labels) -> value."""
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def per_process(self, name: str, *, every: Iterable[str] = (), **labels: str) -> dict[str, float]:
        """Sample `name` with `labels`, by the `process` label. A scrape leaves out a process that does not
        answer within its timeout (a loaded box): with `every`, scrape again until those processes are in
        it (20 s)."""
        want, needed = set(labels.items()), set(every)
        deadline = time.monotonic() + 20
        while True:
            got = {
                dict(lbl)["process"]: v
                for (n, lbl), v in self.metrics().items()
                if n == name and want <= lbl and "process" in dict(lbl)
            }
            if needed <= set(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.1)

    def health(self) -> int:
        try:
            with grpc.insecure_channel(self.health_address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return -1

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def _serve(tmp_path: Path, log_path: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}:{REPO / 'protos'}",
        "BANDGATE_DEFAULT_CONSENT": "all",
        "BANDGATE_AGE_UNKNOWN": "adult",
    }
    common = ["--token-listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"]
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [*SERVE, *common, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log, env=env
        )


def _field(line: str, name: str) -> str:
    return re.search(rf'"{name}":"([^"]*)"', line).group(1)


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_two_processes_serve_one_port_and_both_take_streams(tmp_path):
    db = tmp_path / "gw.db"
    server = Supervised(tmp_path, db)
    fleet = [(rec.device_id, b) for rec, b in fleet_batches(bands=16, minutes=20, seed=21, batch_minutes=5)]
    try:
        assert wait_until(lambda: server.health() == SERVING, 20)  # a slow box's first checks
        assert len(server.pids) == 2 and all(map(running, server.pids))

        async def scenario():
            credentials = await server.credentials.fleet_credentials(d for d, _ in fleet)
            return await run_fleet(server.address, fleet, give_up_after_s=30, credentials=credentials)

        stats = run(scenario())
        assert not any(s.refused for s in stats)
        # every band on a connection of its own: the kernel spread them over both processes
        ok = server.per_process("bandgate_batches_total", every="01", code="OK")
        assert set(ok) == {"0", "1"} and all(ok.values()), ok
        assert sum(ok.values()) == sum(len(b) for _, b in fleet)
        assert set(server.per_process("bandgate_compute_workers", every="01")) == {"0", "1"}
        assert server.metrics()[("bandgate_serving_processes", frozenset())] == 2
        # each serving process froze its start-up heap (gateway/heap.py) once it served
        settled = [json.loads(x) for x in server.lines if '"event":"heap_frozen"' in x]
        assert sorted(x["process"] for x in settled) == [0, 1] and all(x["objects"] > 10_000 for x in settled)
    finally:
        assert server.terminate() == 0
    expected = processed(b for _, batches in fleet for b in batches)
    got = stored(f"sqlite:///{db}")
    assert len(got) == len(expected) > 0 and same_records(got, expected)


async def _stream_on(
    server: Supervised, device: int, want: str | None
) -> tuple[Uploader, grpc.aio.Channel, str]:
    """An Upload stream of `device` on a new connection, opened again until the kernel gives it to process
    `want` (any when None); the process that holds it, from the devices_connected gauge."""
    identity = await server.credentials.band(device)
    for _ in range(40):
        # a local subchannel pool: a connection of its own, so the kernel chooses a process anew
        channel = grpc.aio.secure_channel(
            server.address, identity.credentials(), options=[("grpc.use_local_subchannel_pool", 1)]
        )
        up = Uploader(channel, device)
        await up.call.wait_for_connection()
        holders: list[str] = []
        for _ in range(100):
            gauges = await asyncio.to_thread(server.per_process, "bandgate_devices_connected")
            holders = [p for p, v in gauges.items() if v == 1]
            if holders:
                break
            await asyncio.sleep(0.05)
        assert len(holders) == 1, gauges
        if want is None or holders[0] == want:
            return up, channel, holders[0]
        up.call.cancel()
        await channel.close()
        assert await asyncio.to_thread(
            wait_until, lambda: not any(server.per_process("bandgate_devices_connected").values())
        )
    raise AssertionError(f"40 connections, none to process {want}")


def test_a_band_that_reconnects_to_the_other_process_continues_its_sequence(tmp_path):
    db = tmp_path / "gw.db"
    server = Supervised(tmp_path, db)
    device, batches = band(seed=51, minutes=60, batch_minutes=5)
    parts = [batches[:4], batches[4:8], batches[8:]]

    async def scenario():
        acks, took = [], []
        want = None
        for part in parts:  # first process, the other one, and back
            up, channel, process = await _stream_on(server, device, want)
            acks += [(await up.send(b)).code for b in part]
            await up.close()
            await channel.close()
            took.append(process)
            want = "1" if process == "0" else "0"
        # a resend of what the first process stored, to the other one: acknowledged, not stored again
        up, channel, _ = await _stream_on(server, device, want)
        resent = await up.send(batches[0])
        await up.close()
        await channel.close()
        return acks, took, resent

    try:
        acks, took, resent = run(scenario())
    finally:
        assert server.terminate() == 0
    assert took in (["0", "1", "0"], ["1", "0", "1"])
    assert acks == [OK] * len(batches)
    assert resent.code in (OK, ALREADY_EXISTS) and resent.acked_seq == batches[-1].last_seq
    # the device's state went through the store: the records equal one uninterrupted run
    got = stored(f"sqlite:///{db}")
    assert len(got) == len(processed(batches)) and same_records(got, processed(batches))


def test_sigterm_drains_every_process_acks_what_is_stored_and_exits_0(tmp_path):
    db = tmp_path / "gw.db"
    server = Supervised(tmp_path, db)
    fleet = [band(seed=s, minutes=60, batch_minutes=1) for s in (61, 62, 63, 64, 65, 66)]
    workers = server.worker_pids(0) + server.worker_pids(1)
    assert len(workers) == 4

    async def one(device, batches, acks):
        async with await server.credentials.band_channel(device) as ch:
            up = Uploader(ch, device)
            try:
                for b in batches:
                    acks.append(await up.send(b))
            except (grpc.aio.AioRpcError, AssertionError):
                pass
            return await up.call.code()

    async def scenario():
        acks = {d: [] for d, _ in fleet}
        for d, _ in fleet:
            await server.credentials.band(d)  # enrolled before the clock starts
        streams = [asyncio.ensure_future(one(d, b, acks[d])) for d, b in fleet]
        while sum(map(len, acks.values())) < 30:
            await asyncio.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        return acks, await asyncio.gather(*streams)

    acks, codes = run(scenario(), 60)
    assert server.proc.wait(timeout=60) == 0
    assert '"exit_codes":[0,0]' in server.wait_for('"event":"supervisor_stopped"', 1)
    assert not any(map(running, server.pids + workers))  # the serving processes and their workers went
    assert all(c in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL) for c in codes), codes
    with open_store(f"sqlite:///{db}") as store:
        for device, batches in fleet:
            assert all(a.code == OK for a in acks[device])
            assert len(acks[device]) < len(batches)
            if acks[device]:  # acked = stored, no more, no less
                assert store.device(device).last_seq == acks[device][-1].acked_seq


def test_a_second_serve_on_the_same_port_is_refused_with_a_message(tmp_path):
    server = Supervised(tmp_path, tmp_path / "gw.db")
    try:
        for workers in ("1", "2"):
            other = tmp_path / f"other-{workers}"
            other.mkdir()
            log_path = other / "serve.log"
            second = _serve(
                other,
                log_path,
                "--workers", workers,
                "--listen", server.address,
                "--store", f"sqlite:///{other / 'gw.db'}",
                "--state-dir", str(other / "state"),
            )  # fmt: skip
            assert second.wait(timeout=60) == 2
            message = log_path.read_text()
            port = server.address.rsplit(":", 1)[1]
            assert f"port {port} ({server.address}) is held by another bandgate serve" in message, message
            assert f"pid {server.proc.pid}" in message
            assert not (other / "gw.db").exists()  # refused before it opened anything
        assert wait_until(lambda: server.health() == SERVING, 20)  # a slow box's first checks
    finally:
        assert server.terminate() == 0


def test_a_killed_serving_process_is_started_again_and_health_recovers(tmp_path):
    db = tmp_path / "gw.db"
    server = Supervised(tmp_path, db)
    try:
        killed = server.pids[1]
        orphans = server.worker_pids(1)
        seen = len(server.lines)
        os.kill(killed, signal.SIGKILL)
        lost = server.wait_for('"event":"serving_process_lost"', 10, after=seen)
        assert f'"pid":{killed}' in lost and '"process":1' in lost
        assert server.health() != SERVING  # not every process serves
        # its compute workers see their sockets close and exit: no orphan keeps computing
        assert wait_until(lambda: not any(map(running, orphans)), 20)
        restarted = server.wait_for('"event":"serving_process_started","process":1', 60, after=seen)
        assert int(re.search(r'"pid":(\d+)', restarted).group(1)) != killed
        assert wait_until(lambda: server.health() == SERVING, 20)
        metrics = server.metrics()
        assert metrics[("bandgate_serving_process_restarts_total", frozenset())] == 1
        assert metrics[("bandgate_serving_processes", frozenset())] == 2
        assert set(server.per_process("bandgate_compute_workers", every="01")) == {"0", "1"}
        fleet = [
            (rec.device_id, b) for rec, b in fleet_batches(bands=8, minutes=10, seed=71, batch_minutes=5)
        ]

        async def scenario():
            credentials = await server.credentials.fleet_credentials(d for d, _ in fleet)
            return await run_fleet(server.address, fleet, give_up_after_s=30, credentials=credentials)

        assert not any(s.refused for s in run(scenario()))
    finally:
        assert server.terminate() == 0
    expected = processed(b for _, batches in fleet for b in batches)
    assert same_records(stored(f"sqlite:///{db}"), expected)


def test_a_stalled_serving_process_turns_health_not_serving_only_after_missed_checks_in_a_row(tmp_path):
    """A serving process paused for about one health check's timeout (a loaded box, a long GC) leaves the
    gateway SERVING; paused through HEALTH_MISSES checks it turns it NOT_SERVING, and SERVING again once
    it answers. It did not exit, so nothing restarts it."""
    server = Supervised(tmp_path, tmp_path / "gw.db")
    try:
        assert wait_until(lambda: server.health() == SERVING, 20)
        paused = server.pids[1]
        seen = set()
        os.kill(paused, signal.SIGSTOP)
        try:
            end = time.monotonic() + 1.3 * HEALTH_TIMEOUT_S  # at most two checks go unanswered
            while time.monotonic() < end:
                seen.add(server.health())
                time.sleep(0.05)
        finally:
            os.kill(paused, signal.SIGCONT)
        assert seen == {SERVING}
        os.kill(paused, signal.SIGSTOP)
        try:
            misses_s = HEALTH_MISSES * (HEALTH_TIMEOUT_S + HEALTH_POLL_S)
            assert wait_until(lambda: server.health() != SERVING, misses_s + 10)
        finally:
            os.kill(paused, signal.SIGCONT)
        assert wait_until(lambda: server.health() == SERVING, 20)
        metrics = server.metrics()
        assert metrics[("bandgate_serving_process_restarts_total", frozenset())] == 0
        assert server.pids[1] == paused and running(paused)
    finally:
        assert server.terminate() == 0


def test_a_process_that_keeps_dying_stops_the_supervisor_with_status_1(tmp_path):
    async def scenario():
        # one compute worker each: what is tested is the supervisor, and starts are most of the time
        settings = config(tmp_path, workers=2, compute_processes=1)
        supervisor = Supervisor(settings, restart_delay_s=0.05, give_up_after=2)
        try:
            await supervisor.start()
            for _ in range(2):  # dies young twice: the second time, no third start
                pid = supervisor.pids[1]
                os.kill(pid, signal.SIGKILL)
                while supervisor.pids[1] in (pid, 0) and not supervisor._stop.is_set():
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(supervisor.wait(), 30)
        finally:
            code = await supervisor.shutdown()
        return code, supervisor.pids

    code, pids = run(scenario())
    assert code == 1
    assert pids[1] == 0 and not running(pids[0])


def test_a_process_that_cannot_start_stops_serve_with_its_error(tmp_path):
    log_path = tmp_path / "serve.log"
    proc = _serve(
        tmp_path,
        log_path,
        "--workers", "2",
        "--listen", "127.0.0.1:0",
        "--store", f"sqlite:///{tmp_path / 'no-such-dir' / 'gw.db'}",
        "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    assert proc.wait(timeout=60) == 2
    last = log_path.read_text().splitlines()[-1]
    assert last.startswith("serve: serving process 0: sqlite: unable to open database file"), last
    assert "Traceback" not in log_path.read_text()  # an expected error: its message, as a single serve's


def scheduling(pid: int) -> set[tuple[int, int]]:
    """(policy, nice) of every thread of process `pid`."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    return {(os.sched_getscheduler(t), os.getpriority(os.PRIO_PROCESS, t)) for t in tids}


def test_token_process_serves_the_token_listener_alone_and_yields_the_cpu(tmp_path):
    """`serve --workers 1 --token-process`: process 0 takes the bands (mutual TLS) and process 1 the token
    callers; each listener reaches only its own process. Every thread of the token process runs
    SCHED_IDLE (a flood answered there takes only CPU the bands leave) and its compute workers, which
    compute relays' batches, run 5 nicer: not starved."""
    db = tmp_path / "gw.db"
    server = Supervised(tmp_path, db, "--token-process", workers=1)
    device, batches = band(seed=61, minutes=15, batch_minutes=5)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        assert wait_until(lambda: server.health() == SERVING, 20)  # a slow box's first checks
        assert len(server.pids) == 2 and all(map(running, server.pids))
        line = server.wait_for('"event":"sched_idle"', 10)
        assert '"process":1' in line and '"applied":true' in line, line
        assert scheduling(server.pids[0]) == {(os.SCHED_OTHER, nice)}
        assert scheduling(server.pids[1]) == {(os.SCHED_IDLE, min(19, nice + 5))}
        assert len(server.worker_pids(1)) == 2
        for worker in server.worker_pids(1) + server.worker_pids(0):
            expected = min(19, nice + 5) if worker in server.worker_pids(1) else nice
            assert scheduling(worker) == {(os.SCHED_OTHER, expected)}, worker

        async def scenario():
            async with server.credentials.channel("operator") as op:
                reply = await admin_pb2_grpc.AdminServiceStub(op).Register(
                    admin_pb2.RegisterRequest(kind="relay", name="phone-1", issue_token=True)
                )
            ca = grpc.ssl_channel_credentials((server.state_dir / "ca.pem").read_bytes())
            async with grpc.aio.secure_channel(server.token_address, ca) as ch:
                me = await admin_pb2_grpc.IdentityServiceStub(ch).WhoAmI(
                    admin_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {reply.token}"),)
                )
            up, channel, _ = await _stream_on(server, device, None)
            acks = [(await up.send(b)).code for b in batches]
            await up.close()
            await channel.close()
            return f"{me.kind}:{me.name}", acks

        whoami, acks = run(scenario())
        assert whoami == "relay:phone-1" and acks == [OK] * len(batches)
        assert server.per_process("bandgate_batches_total", every="0", code="OK") == {
            "0": float(len(batches))
        }
        lookups = server.per_process("bandgate_token_lookups_total", every="01")
        assert lookups.get("1") == 1.0 and not lookups.get("0"), lookups
    finally:
        assert server.terminate() == 0


def test_one_serving_process_drains_a_sqlite_outbox_and_another_takes_over_when_it_dies(tmp_path):
    """`serve --workers 2 --token-process --stream` on SQLite: the processes commit outbox entries, one of
    the mutual-TLS ones drains them (two would publish the same entries, and a record taken before an
    erasure could land after its purge; the token process, nicer and the target of floods, drains none);
    killed, the other takes the outbox over. Every stored record is on the stream once."""
    base, prefix = shared_nats(), unique_prefix()
    db = tmp_path / "gw.db"
    server = Supervised(tmp_path, db, "--token-process", "--stream", f"{base}?prefix={prefix}")
    published = "bandgate_stream_published_total"

    def fleet(seed: int) -> list:
        return [(r.device_id, b) for r, b in fleet_batches(bands=4, minutes=20, seed=seed, batch_minutes=1)]

    async def send(batches: list) -> None:
        credentials = await server.credentials.fleet_credentials(d for d, _ in batches)
        stats = await run_fleet(server.address, batches, give_up_after_s=30, credentials=credentials)
        assert not any(s.refused for s in stats)

    def streamed_all() -> bool:
        return len(run(all_messages(base, prefix))) == len(stored(f"sqlite:///{db}"))

    try:
        run(send(fleet(71)))
        assert wait_until(streamed_all, timeout=30)
        # the drainer counts what it published a step after the stream's ack that streamed_all sees
        assert wait_until(
            lambda: sum(server.per_process(published).values()) >= len(stored(f"sqlite:///{db}"))
        )
        before = server.per_process(published, every="012")
        drainers = [p for p, n in before.items() if n > 0]
        assert len(drainers) == 1 and sum(before.values()) > 0, before
        (drainer,) = drainers
        assert drainer in ("0", "1") and len(server.pids) == 3, (before, server.pids)  # "2": token
        os.kill(server.pids[int(drainer)], signal.SIGKILL)
        run(send(fleet(72)))
        assert wait_until(streamed_all, timeout=30)
        other = "1" if drainer == "0" else "0"
        assert wait_until(lambda: server.per_process(published).get(other, 0) > 0, timeout=10)
        assert server.per_process(published).get("2", 0) == 0
        messages = run(all_messages(base, prefix))
    finally:
        assert server.terminate() == 0
        run(delete_streams(base, prefix))
    got = stored(f"sqlite:///{db}")
    ids = [m[1] for m in messages]
    assert len(ids) == len(set(ids)) == len(got), "a record is missing from the stream, or in it twice"
    assert sorted((record_of(b) for *_, b in messages), key=key) == sorted(got, key=key)
