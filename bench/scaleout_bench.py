"""Scale-out figures for `python -m bench` (issue 14): the gateway end to end on the PostgreSQL store, and
with the NATS JetStream feature stream on, each beside the gateway with the default SQLite store and no
stream, in the same run, on the same batches.

Three `bandgate serve --insecure` gateways (`bench.e2e_bench.Gateway`, the same settings) run side by side:

- `sqlite`: the default store (a SQLite file), no stream: the baseline of both ratios;
- `postgres`: `--store postgresql://…?schema=<unique>`, its data keys in a key schema of its own
  (`key_schema = <schema>_keys`); both schemas are made for the bench and dropped after;
- `nats`: the SQLite store and `--stream nats://…?prefix=<unique>`: commits write the outbox, the
  drainer publishes it to JetStream (docs/streams.md); the prefix's streams are deleted after.

The load is `throughput_figures`': 64 bands in 10-minute batches from a batch file, each on its own
connection, as fast as acks come back (the load generator of `bench.e2e_bench`); an hour a band in
--quick (16 simulated signals under 64 device IDs), 4 hours full. The runs alternate sqlite, postgres,
nats, nats, postgres, sqlite (twice in a full run), a gateway's second run on other device IDs, so drift
in the shared machine's load falls on every side alike. Samples/s is the runs' samples over their wall
time (first write to last ack). For the stream a record counts once JetStream has acked it: a run's
time ends when the outbox is empty after its last band's ack (the drainer deletes an entry only after
its publish ack), sampled every 5 ms from the bench process; the stream is then read back and checked to
hold as many records as its store (a message holds a batch's records of a family), and every side to
have stored the same records.

A service that does not answer leaves its keys out (POSTGRES_KEYS, NATS_KEYS), saying why on stderr.
`python -m bench.scaleout_bench [--quick]` runs these figures alone; `BENCH_DEBUG=1` prints each run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.e2e_bench import Gateway, _children, _fleet_file, _recordings, _stream, _warm_gateway
from bench.tls_bench import _cpu_s

POSTGRES_URL = os.environ.get("BANDGATE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("BANDGATE_BENCH_NATS", "nats://127.0.0.1:4222")
POLL_S = 0.005  # how often the outbox depth is sampled while a stream run goes on


# --- the services ---------------------------------------------------------------------------------------


def postgres_problem(url: str) -> str:
    """Why `url` cannot serve as the bench's PostgreSQL ("" if it can)."""
    try:
        import psycopg
    except ImportError as e:  # pragma: no cover - a pinned dependency
        return f"psycopg is not installed: {e}"
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ""


def nats_problem(url: str) -> str:
    """Why `url` cannot serve as the bench's NATS with JetStream ("" if it can)."""

    async def ask() -> str:
        try:
            nc = await _nats_connect(url)
        except Exception as e:  # any failure to connect is an answer here, not a crash of the bench
            return f"{type(e).__name__}: {e}"
        try:
            await nc.jsm(timeout=3).account_info()
        except Exception as e:
            return f"JetStream does not answer ({type(e).__name__}: {e}); run nats-server with -js"
        finally:
            await nc.close()
        return ""

    return asyncio.run(ask())


async def _nats_connect(url: str) -> Any:  # nats.aio.client.Client, imported where used
    import nats

    from gateway.stream.nats import parse_nats_url

    async def quiet(_: Exception) -> None:  # the default callback logs a traceback each attempt
        pass

    servers, user, password, _ = parse_nats_url(url)
    connect = nats.connect(
        servers=servers,
        user=user or None,
        password=password or None,
        connect_timeout=3,
        allow_reconnect=False,
        # nats-py tries a server of the pool again until it has failed more often than this; 0 would
        # never discard one (the first connect then loops for ever on a server that refuses)
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
        error_cb=quiet,
    )
    return await asyncio.wait_for(connect, 10)


async def _stream_records(url: str, prefix: str) -> int:
    """Records the prefix's family streams hold, all together: each message read (a batch's records of a
    family, docs/streams.md) and its records counted, so a record in two messages counts twice."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from decoder.records import FAMILIES
    from gateway.stream.base import records_of
    from gateway.stream.nats import stream_name

    nc = await _nats_connect(url)
    try:
        js, jsm = nc.jetstream(timeout=5), nc.jsm(timeout=5)
        total = 0
        for family in FAMILIES:
            left = (await jsm.stream_info(stream_name(prefix, family))).state.messages
            if not left:
                continue
            sub = await js.pull_subscribe(
                f"{prefix}.{family}.*",
                stream=stream_name(prefix, family),
                config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
            )
            while left > 0:
                for msg in await sub.fetch(min(left, 512), timeout=5):
                    total += len(records_of(msg.data))
                    left -= 1
            await sub.unsubscribe()
        return total
    finally:
        await nc.close()


async def _delete_streams(url: str, prefix: str) -> None:
    import nats.js.errors

    from decoder.records import FAMILIES
    from gateway.stream.nats import stream_name

    nc = await _nats_connect(url)
    try:
        jsm = nc.jsm(timeout=5)
        for family in FAMILIES:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await jsm.delete_stream(stream_name(prefix, family))
    finally:
        await nc.close()


def _drop_schemas(url: str, schemas: list[str]) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        for schema in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _with_params(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + "&".join(f"{k}={v}" for k, v in params.items())


def _postgres_backends(url: str, application_name: str) -> list[int]:
    """PIDs of the server processes serving connections named `application_name`."""
    import psycopg

    with psycopg.connect(url, connect_timeout=3) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchall()
    return [pid for (pid,) in rows]


def _postgres_records(url: str, schema: str) -> int:
    import psycopg
    from psycopg import sql

    from gateway.store.rows import RECORD_TABLES

    with psycopg.connect(url, connect_timeout=3) as conn:
        return sum(
            conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, t))).fetchone()[0]
            for t in RECORD_TABLES.values()
        )


# --- the SQLite side, read from the bench process -----------------------------------------------------------


def _sqlite_path(gw: Gateway) -> Path:
    return Path(gw.store.removeprefix("sqlite:///"))


def _sqlite_records(path: Path) -> int:
    from gateway.store.rows import RECORD_TABLES

    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in RECORD_TABLES.values())


class OutboxWatch:
    """Samples the outbox depth of a gateway's SQLite store every POLL_S in a thread: (monotonic time,
    depth) pairs, on the clock the load generator reports its start on."""

    def __init__(self, path: Path):
        self.path = path
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-watch", daemon=True)

    def __enter__(self) -> OutboxWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as conn:
            while not self._stop.is_set():
                (depth,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
                self.samples.append((time.perf_counter(), depth))
                self._stop.wait(POLL_S)

    def empty_after(self, t: float, timeout_s: float = 60.0) -> float:
        """The first sampled time at or after `t` at which the outbox was empty (waits for it)."""
        deadline = time.perf_counter() + timeout_s
        seen = 0
        while time.perf_counter() < deadline:
            samples = self.samples[seen:]
            for at, depth in samples:
                if at >= t and depth == 0:
                    return at
            seen += len(samples)
            time.sleep(POLL_S)
        raise TimeoutError(f"the outbox was not empty {timeout_s} s after the last ack")


# --- the figures ---------------------------------------------------------------------------------------

# The keys each side adds; a side whose service does not answer adds none (tests/test_bench_quick.py).
POSTGRES_KEYS = (
    "e2e_postgres_samples_per_s",
    "e2e_postgres_vs_sqlite",
    "e2e_postgres_vs_sqlite_cpu",
    "scaleout_postgres_serving_cpu_ms",
    "scaleout_postgres_workers_cpu_ms",
    "scaleout_postgres_server_cpu_ms",
)
NATS_KEYS = (
    "nats_records_per_s",
    "nats_vs_no_stream",
    "nats_vs_no_stream_cpu",
    "nats_drain_tail_s",
    "scaleout_nats_serving_cpu_ms",
    "scaleout_nats_workers_cpu_ms",
)


@dataclass
class Tally:
    """One side's runs, summed."""

    samples: int = 0
    records: int = 0
    batches: int = 0
    wall_s: float = 0.0
    serving_cpu_s: float = 0.0  # the `serve` process (gRPC; the drainer runs in its event loop)
    workers_cpu_s: float = 0.0  # its compute workers (decode, features, sealing, the commits)
    server_cpu_s: float = 0.0  # the PostgreSQL backends of the gateway's connections
    drain_tail_s: float = 0.0  # the longest wait, after a run's last band ack, for an empty outbox

    def per_batch_ms(self, cpu_s: float) -> float:
        return 1000 * cpu_s / self.batches


def scaleout_figures(quick: bool, workdir: Path) -> dict[str, float]:
    """e2e_postgres_vs_sqlite and nats_vs_no_stream with their figures (keys in BENCHMARKS.md)."""
    # 64 bands, each on its own connection, as throughput_figures streams them; --quick repeats 16 simulated
    # signals under 64 device IDs (the gateway's work is the same; simulating 64 took 3-6 s of the minute)
    distinct, minutes = (16, 60) if quick else (64, 4 * 60)
    rounds = 1 if quick else 2
    sides = ["sqlite"]
    problem = postgres_problem(POSTGRES_URL)
    if problem:
        _say(f"PostgreSQL at {POSTGRES_URL} is not reachable ({problem}): e2e_postgres_* left out")
    else:
        sides.append("postgres")
    problem = nats_problem(NATS_URL)
    if problem:
        _say(f"NATS at {NATS_URL} is not usable ({problem}): nats_* left out")
    else:
        sides.append("nats")
    order = [s for s in ("sqlite", "postgres", "nats", "nats", "postgres", "sqlite") if s in sides] * rounds

    started = time.perf_counter()
    token = secrets.token_hex(5)
    schema, prefix = f"bench_{token}", f"bench{token}"
    gateways: dict[str, Gateway] = {}
    tallies = {side: Tally() for side in sides}
    try:
        # launched first: they start while the inputs are made
        gateways["sqlite"] = Gateway(workdir)
        if "postgres" in sides:
            store = _with_params(POSTGRES_URL, schema=schema, application_name=f"bandgate_{schema}")
            env = {**os.environ, "BANDGATE_KEY_SCHEMA": f"{schema}_keys"}
            gateways["postgres"] = Gateway(workdir, store=store, env=env)
        if "nats" in sides:
            stream = _with_params(NATS_URL, prefix=prefix)
            gateways["nats"] = Gateway(workdir, serve_args=["--stream", stream])
        recordings = _recordings(distinct, minutes) * (64 // distinct)
        fleets = []  # a gateway's k-th run streams fleet k: other device IDs each run, never duplicates
        for k in range(2 * rounds):
            path = workdir / f"scaleout-fleet-{k}.bgb"
            batches, samples = _fleet_file(path, recordings, batch_minutes=10, fleet=301 + k)
            fleets.append((path, samples, len(batches)))
        _debug(f"inputs ready at {time.perf_counter() - started:.1f} s")
        for gw in gateways.values():
            gw.wait_serving()
            _warm_gateway(gw, workdir)
        _debug(f"gateways warm at {time.perf_counter() - started:.1f} s")
        runs_of = dict.fromkeys(sides, 0)
        for side in order:
            path, samples, n_batches = fleets[runs_of[side]]
            runs_of[side] += 1
            _run(side, gateways[side], path, samples, n_batches, tallies[side], schema)
        _check(gateways, tallies, prefix)
        _debug(f"runs done at {time.perf_counter() - started:.1f} s")
    except BaseException:
        for side, gw in gateways.items():
            _debug(f"{side} gateway's log (tail):\n{gw.log.read_text()[-3000:]}")
        raise
    finally:
        for gw in gateways.values():  # their drains at once
            if gw.proc.poll() is None:
                gw.proc.terminate()
        for gw in gateways.values():
            gw.stop()
        if "postgres" in sides:
            _drop_schemas(POSTGRES_URL, [schema, f"{schema}_keys"])
        if "nats" in sides:
            asyncio.run(_delete_streams(NATS_URL, prefix))
    return _figures(tallies)


def _run(side: str, gw: Gateway, path: Path, samples: int, n_batches: int, t: Tally, schema: str) -> None:
    """One run of the fleet in `path` through `gw`, added to `t`."""
    workers = _children(gw.proc.pid)
    backends = _Backends(f"bandgate_{schema}") if side == "postgres" else None
    serving_cpu, workers_cpu = _cpu_s([gw.proc.pid]), _cpu_s(workers)
    before = _records(side, gw, schema)
    with OutboxWatch(_sqlite_path(gw)) if side == "nats" else contextlib.nullcontext() as watch:
        result = _stream(gw, path, channels=64)
        wall = result["wall_s"]
        if watch is not None:  # the stream's records count once JetStream acked them: the outbox is empty
            last_ack = result["started_at"] + result["wall_s"]
            drained = watch.empty_after(last_ack)
            wall = drained - result["started_at"]
            t.drain_tail_s = max(t.drain_tail_s, drained - last_ack)
    if result["samples"] != samples:
        raise RuntimeError(f"{side}: {result['samples']} samples acked of {samples}")
    records = _records(side, gw, schema) - before
    t.samples += samples
    t.records += records
    t.batches += n_batches
    t.wall_s += wall
    serving_cpu, workers_cpu = _cpu_s([gw.proc.pid]) - serving_cpu, _cpu_s(workers) - workers_cpu
    server_cpu = backends.cpu_s() if backends is not None else 0.0
    t.serving_cpu_s += serving_cpu
    t.workers_cpu_s += workers_cpu
    t.server_cpu_s += server_cpu
    _debug(
        f"{side}: {samples / wall / 1e6:.2f} M samples/s, {records / wall:,.0f} records/s, wall {wall:.2f} s "
        f"(load {result['wall_s']:.2f} s); CPU s: serving {serving_cpu:.2f}, workers {workers_cpu:.2f}, "
        f"postgres {server_cpu:.2f}"
    )


class _Backends:
    """CPU of the PostgreSQL server processes of connections named `application_name` since this was made,
    those opened meanwhile included (the pool grows with the load)."""

    def __init__(self, application_name: str):
        self.name = application_name
        self.before = {pid: _cpu_s([pid]) for pid in _postgres_backends(POSTGRES_URL, self.name)}

    def cpu_s(self) -> float:
        pids = set(self.before) | set(_postgres_backends(POSTGRES_URL, self.name))
        return sum(_cpu_s([pid]) - self.before.get(pid, 0.0) for pid in pids)


def _records(side: str, gw: Gateway, schema: str) -> int:
    """Records `gw` holds (the warm-up band's included: runs count the difference)."""
    if side == "postgres":
        return _postgres_records(POSTGRES_URL, schema)
    return _sqlite_records(_sqlite_path(gw))


def _figures(tallies: dict[str, Tally]) -> dict[str, float]:
    base = tallies["sqlite"]
    base_cpu = base.serving_cpu_s + base.workers_cpu_s
    out = {
        "e2e_sqlite_samples_per_s": base.samples / base.wall_s,
        "no_stream_records_per_s": base.records / base.wall_s,
    }
    for side, t in tallies.items():
        out[f"scaleout_{side}_serving_cpu_ms"] = t.per_batch_ms(t.serving_cpu_s)
        out[f"scaleout_{side}_workers_cpu_ms"] = t.per_batch_ms(t.workers_cpu_s)
    if "postgres" in tallies:
        t = tallies["postgres"]
        out["e2e_postgres_samples_per_s"] = t.samples / t.wall_s
        out["e2e_postgres_vs_sqlite"] = out["e2e_postgres_samples_per_s"] / out["e2e_sqlite_samples_per_s"]
        out["scaleout_postgres_server_cpu_ms"] = t.per_batch_ms(t.server_cpu_s)
        # per sample: the gateway's and its database's CPU, SQLite over PostgreSQL
        pg_cpu = t.serving_cpu_s + t.workers_cpu_s + t.server_cpu_s
        out["e2e_postgres_vs_sqlite_cpu"] = (base_cpu / base.samples) / (pg_cpu / t.samples)
    if "nats" in tallies:
        t = tallies["nats"]
        out["nats_records_per_s"] = t.records / t.wall_s
        out["nats_vs_no_stream"] = out["nats_records_per_s"] / out["no_stream_records_per_s"]
        out["nats_vs_no_stream_cpu"] = (base_cpu / base.records) / (
            (t.serving_cpu_s + t.workers_cpu_s) / t.records
        )
        out["nats_drain_tail_s"] = t.drain_tail_s
    return out


def _check(gateways: dict[str, Gateway], tallies: dict[str, Tally], prefix: str) -> None:
    """What was measured is what was meant: every side stored the same records in its runs, and the stream
    holds as many records as its gateway stored (the warm-up band's too)."""
    base = tallies["sqlite"].records
    for side in ("postgres", "nats"):
        if side in tallies and tallies[side].records != base:
            raise RuntimeError(f"{side} stored {tallies[side].records} records in its runs, sqlite {base}")
    if "nats" in gateways:
        stored = _sqlite_records(_sqlite_path(gateways["nats"]))
        streamed = asyncio.run(_stream_records(NATS_URL, prefix))
        if streamed != stored:
            raise RuntimeError(f"nats: the stream holds {streamed} records, the store {stored}")


def _say(text: str) -> None:
    print(f"scaleout: {text}", file=sys.stderr)


def _debug(text: str) -> None:
    if os.environ.get("BENCH_DEBUG"):
        _say(text)


def main(argv: list[str] | None = None) -> int:
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bandgate-scaleout-") as tmp:
        out = scaleout_figures(quick, Path(tmp))
    out["scaleout_bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
