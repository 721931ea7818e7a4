"""`bandgate serve --workers N`: N serving processes on one port, and the process that keeps them.

    reserve the ports → lock them → start process 0 → start the others → health and metrics for all
    → (a process ends: start it again) → SIGTERM: forward it, wait for every process, exit

Each serving process is a whole gateway (`gateway.server.Gateway`: gRPC server, pipeline, its own
`compute_processes`) over the shared store and state dir, bound to the shared ports with SO_REUSEPORT:
the kernel hands each new connection to one of them. Nothing of a device lives in one process only: its
state and high-water are read from the store with each batch (gateway/compute.py), and the registry is
read again when a certificate is unknown (gateway/security/registry.py), so a band that reconnects may
land on any process, or any gateway of the store, and continues its sequence there.

Ports (gateway/listen.py): the supervisor holds a bound, never-listening SO_REUSEPORT socket on the
ports of `listen` and `token_listen` (port 0 is resolved there), so that nothing binding without
SO_REUSEPORT takes one while its processes restart, and locks them, so that a stray second `serve`
fails with a message instead of sharing them.

With `token_process` (`serve --token-process`) one more serving process serves the token listener alone
and the `workers` serve mutual TLS alone: a token caller has proved nothing at the handshake, so a flood
of bad tokens (each answered, throttled, in Python) then takes the event loop of that process, not the
one the bands' batches are acked from, and it runs SCHED_IDLE, so that it yields the CPU to them too;
its compute workers (relays' batches) run TOKEN_PROCESS_NICE nicer (docs/security.md, "Hostile peers").

Health and metrics are the supervisor's own listeners (`health_listen`, `metrics_listen`). Each serving
process has private loopback listeners for both, which the supervisor polls (health, every
HEALTH_POLL_S) and scrapes (metrics, on every scrape of its own endpoint, each sample labelled with its
`process`). Health is SERVING only while every process is up and SERVING.

Start: process 0 first (a first start creates the state dir's CA and keys and migrates the store), then
the others together. A process that fails to start stops the supervisor with that process's error
(`ServingProcessError`: `serve` exits 2). Later, a process that ends is started again after
`restart_delay_s`, doubled while its slot keeps failing (a start that fails, a process that ends within
STABLE_S of serving) up to `restart_max_s`; at `give_up_after` failures in a row the supervisor stops
the others and exits 1.

SIGTERM or SIGINT: health NOT_SERVING, the signal forwarded to every process (each drains as a single
gateway does, gateway/server.py), and the exit status is 0 when every process exited 0. A serving process
whose supervisor is gone (SIGKILL) sees its socket close and drains too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.config import GatewayConfig, split_address
from gateway.listen import PortLocks, reserve

log = logging.getLogger("bandgate.supervisor")

START_TIMEOUT_S = 120.0  # a serving process's start: imports, store, compute workers, bind
HEALTH_POLL_S = 0.25  # how often each process's health is asked
HEALTH_TIMEOUT_S = 1.0
# Checks in a row a process may leave unanswered (a loaded box, a long pause) before it counts as not
# serving: one slow answer must not turn the whole gateway NOT_SERVING and send a balancer's bands away.
# An answer of NOT_SERVING, or a refused connection, counts at once; an exit is seen on its socket.
HEALTH_MISSES = 3
SCRAPE_TIMEOUT_S = 2.0  # one process's /metrics, within a scrape of the supervisor's
RESTART_DELAY_S = 1.0  # after a process ended: the first restart waits this long ...
RESTART_MAX_S = 30.0  # ... each failed one twice as long as the last, up to this
STABLE_S = 60.0  # a process that served this long before it ended is not counted as failing
GIVE_UP_AFTER = 5  # failures in a row of one slot: the supervisor stops and exits 1
KILL_AFTER_S = 30.0  # on shutdown, beyond shutdown_grace_s: then a process is killed
PRIVATE_LISTEN = "127.0.0.1:0"  # a serving process's own health and metrics listeners
# The token process's compute workers run this much nicer than the bands' (`os.nice` before they start;
# they inherit it): relays' and token consumers' batches get a quarter of a core the bands also want.
# The token process itself then runs SCHED_IDLE (`_idle_scheduling`), or at this nice level where the
# platform refuses that.
TOKEN_PROCESS_NICE = 5


class ServingProcessError(RuntimeError):
    """A serving process did not start; the message is its own error."""


@dataclass(eq=False)
class _Process:
    slot: int
    proc: subprocess.Popen
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    health_address: str
    metrics_address: str
    started: float  # monotonic, when it said it serves
    serving: bool = False  # its last health answer was SERVING
    monitor: asyncio.Task | None = None


class Supervisor:
    """`config.workers` serving processes on `config.listen` (and with `token_process` one more on
    `config.token_listen`), and health and metrics for all of them.

    start/shutdown: start locks and reserves the ports, binds health and metrics, and starts every
    process (ServingProcessError if one does not start; what had started is stopped); `wait` returns
    once `stop` was called or the supervisor gave up; shutdown forwards SIGTERM, waits for every process
    and releases everything, returning the exit status (0: every process drained and exited 0; 1: one
    did not, or the supervisor gave up). Shutdown is safe without start, and twice."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        restart_delay_s: float = RESTART_DELAY_S,
        restart_max_s: float = RESTART_MAX_S,
        give_up_after: int = GIVE_UP_AFTER,
    ):
        self.config = config.validate()
        self.restart_delay_s = restart_delay_s
        self.restart_max_s = restart_max_s
        self.give_up_after = give_up_after
        self.address: str | None = None
        self.token_address: str | None = None
        self.health_address: str | None = None
        self.metrics_address: str | None = None
        self.exit_code = 0
        self._locks = PortLocks([])
        self._reserved: list[socket.socket] = []
        slots = config.workers + int(config.token_process)
        self._slots: list[_Process | None] = [None] * slots
        self._failures = [0] * slots
        self._restarts: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._stopping = False
        self._started = False
        self._child_config: GatewayConfig | None = None
        self._health: Any = None
        self._health_server: grpc.aio.Server | None = None
        self._all_serving: bool | None = None  # what health says now (None: nothing set yet)
        self._http: Any = None
        self.registry = CollectorRegistry()
        self._serving_gauge = Gauge(
            "bandgate_serving_processes", "Serving processes up and SERVING", registry=self.registry
        )
        self._restarted = Counter(
            "bandgate_serving_process_restarts",
            "Serving processes that ended unexpectedly (each is started again)",
            registry=self.registry,
        )
        self.registry.register(_ProcessMetrics(self._scrape_targets))

    @property
    def pids(self) -> list[int]:
        """The serving processes' IDs, by slot (0 for a slot being restarted)."""
        return [p.proc.pid if p is not None else 0 for p in self._slots]

    async def start(self) -> str:
        if self._started:
            assert self.address is not None
            return self.address
        self._started = True
        c = self.config
        # Reserved first, so that port 0 is resolved before it is locked; a stray second supervisor on a
        # fixed port reserves it too (SO_REUSEPORT) and then stops at the lock.
        sock, self.address = reserve(c.listen)
        self._reserved.append(sock)
        if c.token_listen:
            sock, self.token_address = reserve(c.token_listen)
            self._reserved.append(sock)
        self._locks = PortLocks([self.address, self.token_address or ""])
        self._locks.acquire()
        self._child_config = c.replace(
            listen=self.address,
            token_listen=self.token_address or "",
            health_listen=PRIVATE_LISTEN,
            metrics_listen=PRIVATE_LISTEN if c.metrics_listen else "",
            workers=1,
            token_process=False,
        )
        self._health = health.aio.HealthServicer()
        await self._set_health(False)
        if c.health_listen:  # plaintext, loopback only (the config says so), as a single gateway's
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            port = server.add_insecure_port(c.health_listen)
            await server.start()
            self._health_server = server
            self.health_address = f"{c.health_listen.rpartition(':')[0]}:{port}"
        if c.metrics_listen:
            host, port = split_address(c.metrics_listen)
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
            self.metrics_address = f"{c.metrics_listen.rpartition(':')[0]}:{self._http.server_address[1]}"
        # Process 0 alone first: a first start creates the state dir's credentials and keys and migrates
        # the store, which processes starting side by side would race for.
        self._slots[0] = await self._launch(0)
        rest = await asyncio.gather(
            *(self._launch(i) for i in range(1, len(self._slots))), return_exceptions=True
        )
        for i, started in enumerate(rest, start=1):
            if not isinstance(started, BaseException):
                self._slots[i] = started
        failed = [e for e in rest if isinstance(e, BaseException)]
        if failed:
            raise failed[0]
        for p in self._slots:
            assert p is not None
            p.monitor = asyncio.ensure_future(self._monitor(p))
        log.info(
            "serving processes started",
            extra={
                "fields": {
                    "event": "supervisor_serving",
                    "address": self.address,
                    "token_address": self.token_address or "",
                    "health_address": self.health_address or "",
                    "metrics_address": self.metrics_address or "",
                    "workers": c.workers,
                    "pids": self.pids,
                }
            },
        )
        return self.address

    def stop(self) -> None:
        """Ask `wait` to return (a signal handler's)."""
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def _launch(self, slot: int) -> _Process:
        """Start serving process `slot` and wait until it serves (or says why it cannot)."""
        assert self._child_config is not None
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.supervisor", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                # the modules this process imported, from the same places, whatever its working directory
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)},
                # Its own process group: a terminal's Ctrl-C reaches the supervisor, which forwards it once.
                process_group=0,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
            hello = {
                "process": slot,
                "listeners": self.listeners(slot),
                "config": dataclasses.asdict(self._child_config),
            }
            writer.write(json.dumps(hello).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), START_TIMEOUT_S)
            said = json.loads(line) if line else {}
            if said.get("event") != "serving":
                code = await asyncio.to_thread(proc.wait)
                why = said.get("error") or f"it ended before serving (exit status {code}); see its log"
                raise ServingProcessError(f"serving process {slot}: {why}")
        except BaseException as e:
            ours.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if isinstance(e, TimeoutError):
                raise ServingProcessError(
                    f"serving process {slot}: not serving after {START_TIMEOUT_S:g} s"
                ) from None
            raise
        log.info(
            "serving process started",
            extra={"fields": {"event": "serving_process_started", "process": slot, "pid": proc.pid}},
        )
        return _Process(
            slot,
            proc,
            reader,
            writer,
            health_address=said["health_address"],
            metrics_address=said.get("metrics_address", ""),
            started=time.monotonic(),
        )

    async def _monitor(self, p: _Process) -> None:
        """Poll `p`'s health until its socket ends (it exited); then, unless stopping, start it again."""
        ended = asyncio.ensure_future(p.reader.read())  # it sends nothing more: this is its EOF
        request = health_pb2.HealthCheckRequest()
        try:
            async with grpc.aio.insecure_channel(p.health_address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                misses = 0
                while not ended.done():
                    try:
                        reply = await stub.Check(request, timeout=HEALTH_TIMEOUT_S)
                        serving, misses = reply.status == health_pb2.HealthCheckResponse.SERVING, 0
                    except grpc.aio.AioRpcError as e:
                        slow = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                        misses = misses + 1 if slow else HEALTH_MISSES
                        serving = p.serving and misses < HEALTH_MISSES
                    if serving != p.serving:
                        p.serving = serving
                        await self._update_health()
                    await asyncio.wait({ended}, timeout=HEALTH_POLL_S)
        finally:
            ended.cancel()
            p.serving = False
            p.writer.close()
        await self._update_health()
        code = await asyncio.to_thread(p.proc.wait)
        if self._stopping:
            return
        self._restarted.inc()
        young = time.monotonic() - p.started < STABLE_S
        self._failures[p.slot] = self._failures[p.slot] + 1 if young else 0
        log.error(
            "serving process ended",
            extra={
                "fields": {
                    "event": "serving_process_lost",
                    "process": p.slot,
                    "pid": p.proc.pid,
                    "exit_code": code,
                }
            },
        )
        if self._slots[p.slot] is p:
            self._slots[p.slot] = None
        task = asyncio.ensure_future(self._restart(p.slot))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    def listeners(self, slot: int) -> str:
        """What serving process `slot` listens on (`Gateway`'s `listeners`): with `token_process`, the last
        slot serves the token listener alone and the others mutual TLS alone; otherwise each serves both."""
        if not self.config.token_process:
            return "all"
        return "token" if slot == self.config.workers else "tls"

    def restart_delay(self, slot: int) -> float:
        """`restart_delay_s`, doubled for each failure in a row after the first, up to `restart_max_s`."""
        doublings = min(max(self._failures[slot] - 1, 0), 16)
        return min(self.restart_max_s, self.restart_delay_s * 2**doublings)

    async def _restart(self, slot: int) -> None:
        while not self._stopping:
            if self._failures[slot] >= self.give_up_after:
                self._give_up(slot)
                return
            await asyncio.sleep(self.restart_delay(slot))
            if self._stopping:
                return
            try:
                p = await self._launch(slot)
            except ServingProcessError as e:
                self._failures[slot] += 1
                fields = {"event": "serving_process_restart_failed", "process": slot, "error": str(e)}
                log.error("serving process restart failed", extra={"fields": fields})
                continue
            self._slots[slot] = p
            p.monitor = asyncio.ensure_future(self._monitor(p))
            return

    def _give_up(self, slot: int) -> None:
        fields = {"event": "supervisor_gave_up", "process": slot, "failures": self._failures[slot]}
        log.error("a serving process keeps failing: stopping", extra={"fields": fields})
        self.exit_code = 1
        self._stop.set()

    async def _update_health(self) -> None:
        serving = [p for p in self._slots if p is not None and p.serving]
        self._serving_gauge.set(len(serving))
        await self._set_health(len(serving) == len(self._slots) and not self._stopping)

    async def _set_health(self, serving: bool) -> None:
        """Every service's health, as a single gateway sets it (gateway/server.py `_set_serving`)."""
        if self._health is None or serving is self._all_serving:
            return
        from gateway.server import SERVICE_NAMES

        self._all_serving = serving
        codes = health_pb2.HealthCheckResponse
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, codes.SERVING if serving else codes.NOT_SERVING)

    def _scrape_targets(self) -> list[tuple[str, str]]:
        return [(str(p.slot), p.metrics_address) for p in list(self._slots) if p and p.metrics_address]

    async def shutdown(self) -> int:
        """Drain every serving process (SIGTERM), then release the listeners and ports; the exit status."""
        if self._stopping:
            return self.exit_code
        self._stopping = True
        self._stop.set()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        restarts = list(self._restarts)
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        running = [p for p in self._slots if p is not None]
        if running:
            log.info("serving processes draining", extra={"fields": {"event": "supervisor_draining"}})
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(self._reap(p) for p in running))
        for p in running:
            if p.monitor is not None:
                p.monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await p.monitor
        if any(codes):
            self.exit_code = 1
        server, self._health_server = self._health_server, None
        if server is not None:
            await server.stop(0)
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()
        self._locks.release()
        if running:
            fields = {"event": "supervisor_stopped", "exit_codes": codes}
            log.info("serving processes stopped", extra={"fields": fields})
        return self.exit_code

    async def _reap(self, p: _Process) -> int:
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(p.proc.wait), self.config.shutdown_grace_s + KILL_AFTER_S
            )
        except TimeoutError:
            p.proc.kill()
            await asyncio.to_thread(p.proc.wait)
            return p.proc.returncode


class _ProcessMetrics(Collector):
    """Every serving process's metrics, scraped when the supervisor's endpoint is, each sample labelled
    `process` (its slot, which a restarted process keeps; its counters start again from 0, which
    Prometheus reads as a counter reset). A process that does not answer (restarting) is left out of
    that scrape."""

    def __init__(self, targets: Callable[[], list[tuple[str, str]]]):
        self.targets = targets

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for process, address in self.targets():
            try:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type)
                out.samples += [s._replace(labels={**s.labels, "process": process}) for s in family.samples]
        return merged.values()

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration: the names are the serving processes'


def supervise(config: GatewayConfig) -> int:
    """`serve --workers N`: run the serving processes until SIGTERM or SIGINT; the exit status."""

    async def main() -> int:
        supervisor = Supervisor(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.stop)
        try:
            await supervisor.start()
            await supervisor.wait()
        finally:
            code = await supervisor.shutdown()
        return code

    return asyncio.run(main())


# --- a serving process -----------------------------------------------------------------------------


def _serve_process(fd: int) -> int:
    """One serving process: its slot and config from the supervisor's socket, then a gateway on the
    shared ports until SIGTERM, SIGINT or the socket's end (the supervisor is gone)."""
    from gateway.logs import configure_logging

    async def main() -> int:
        reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
        hello = json.loads(await reader.readline())
        configure_logging(stamp={"process": hello["process"]})
        if hello["listeners"] == "token":
            os.nice(TOKEN_PROCESS_NICE)
        from gateway import heap
        from gateway.server import Gateway

        gateway = Gateway(GatewayConfig(**hello["config"]), shared_port=True, listeners=hello["listeners"])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            try:
                await gateway.start()
            except Exception as e:
                if not _expected(e):  # a bug: its traceback here; the supervisor prints the message
                    log.error("serving process failed to start", exc_info=True)
                error = str(e) if _expected(e) else f"{type(e).__name__}: {e}"
                writer.write(json.dumps({"event": "failed", "error": error}).encode() + b"\n")
                await writer.drain()
                return 2
            said = {
                "event": "serving",
                "pid": os.getpid(),
                "health_address": gateway.health_address,
                "metrics_address": f"127.0.0.1:{gateway.metrics.bound_port}"
                if gateway.metrics.bound_port
                else "",
            }
            writer.write(json.dumps(said).encode() + b"\n")
            await writer.drain()
            heap.settle()
            if hello["listeners"] == "token":  # after its compute workers started: they keep the nice level
                _idle_scheduling()
            orphaned = asyncio.ensure_future(reader.read())  # EOF: the supervisor has gone
            orphaned.add_done_callback(lambda _: stop.set())
            await stop.wait()
            orphaned.cancel()
        finally:
            await gateway.shutdown()
        return 0

    return asyncio.run(main())


def _idle_scheduling() -> bool:
    """Every thread of this process SCHED_IDLE, and so every thread they start later: the kernel runs the
    process only on CPU no normal process wants and preempts it at once when one wakes, so a flood of
    bad tokens answered here cannot delay the bands' acks in the other processes (a nice level only
    shares a core: the flood test's bands' ack p99 went from 1.7-3.1x their quiet run's to 1.2-1.7x;
    BENCHMARKS.md, "A flood of bad tokens"). Logged either way. False where the platform has no
    SCHED_IDLE or refuses it: the process then stays at its nice level."""
    policy = getattr(os, "SCHED_IDLE", None)
    done: set[int] = set()
    try:
        if policy is None:
            raise OSError("no SCHED_IDLE on this platform")
        for _ in range(5):  # a thread started meanwhile by one not yet switched: another pass
            tids = {int(t) for t in os.listdir("/proc/self/task")} - done
            if not tids:
                break
            for tid in tids:
                with contextlib.suppress(ProcessLookupError):  # the thread has ended
                    os.sched_setscheduler(tid, policy, os.sched_param(0))
                done.add(tid)
    except OSError as e:
        log.warning(
            "token process stays at its nice level: %s",
            e,
            extra={"fields": {"event": "sched_idle", "applied": False, "nice": TOKEN_PROCESS_NICE}},
        )
        return False
    log.info(
        "token process runs SCHED_IDLE",
        extra={"fields": {"event": "sched_idle", "applied": True, "threads": len(done)}},
    )
    return True


def start_errors() -> tuple[type[Exception], ...]:
    """The start errors `serve` answers with their message alone (`serve: …`, exit 2): a store, URL,
    port, audit log or key; anything else is a bug and keeps its traceback. One list for `bandgate serve`
    (gateway/cli.py) and for the serving processes here."""
    from gateway.privacy.keys import KeyStoreError
    from gateway.security.audit import AuditError
    from gateway.store import StoreError

    return (StoreError, AuditError, KeyStoreError, ValueError, OSError, RuntimeError)


def _expected(e: Exception) -> bool:
    return isinstance(e, start_errors())


if __name__ == "__main__":
    from gateway.logs import exit_now

    exit_now(_serve_process(int(sys.argv[1])))
