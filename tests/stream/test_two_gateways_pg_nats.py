"""A fleet's deployment, end to end: gateways on one PostgreSQL schema (one CA, one key schema) and one
NATS JetStream, over real mutual TLS, compute in worker processes (their commits write the outbox),
encryption at rest on.

- Two gateways; bands move from one to the other mid-stream and back: the stored features and the
  messages on the stream both equal the single-gateway run, none lost, none doubled, each device's
  messages in order; both drainers drain the one outbox without publishing an entry twice. An erasure
  made through one gateway purges the device from the stream.
- The gateway's PostgreSQL connections cut under it mid-stream (`pg_terminate_backend`), idle and in
  the middle of a commit: the batch is answered UNAVAILABLE and sent again, nothing is lost or doubled
  in the store or the stream, and the gateway recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

from bandgate.v1 import privacy_pb2, privacy_pb2_grpc
from gateway.pipeline import ALREADY_EXISTS, OK
from gateway.privacy.sealing import open_sealer
from gateway.server import Gateway, run_server
from gateway.simulator.client import run_fleet
from gateway.simulator.recorder import fleet_batches
from gateway.store import open_store
from gateway.store.postgres import OUTBOX_LEASE_S
from tests.gateway.gatewaykit import Credentials, ServeProcess, Uploader, band, key, processed, tls_config
from tests.privacy.privacykit import hexid
from tests.services import postgres_url, unique_name
from tests.stream.natskit import all_messages, delete_streams, record_of, shared_nats, unique_prefix


@pytest.fixture
def stream_url() -> Iterator[str]:
    base = shared_nats()
    prefix = unique_prefix()
    yield f"{base}?prefix={prefix}"
    asyncio.run(delete_streams(base, prefix))


@pytest.fixture
def pg() -> Iterator[tuple[str, str]]:
    """(store URL, key schema): a schema of the test database and a key schema of its own, dropped after."""
    base = postgres_url()
    schema = unique_name("test")
    keys = f"{schema}_keys"
    yield f"{base}?schema={schema}", keys
    with psycopg.connect(base, autocommit=True) as conn:
        for s in (schema, keys):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s)))


@contextlib.asynccontextmanager
async def two_gateways(tmp_path: Path, store: str, keys: str, stream: str):
    common = dict(
        store=store, key_schema=keys, stream=stream, state_dir=str(tmp_path / "state"), compute_processes=1
    )
    async with (
        run_server(tls_config(tmp_path, **common)) as a,
        run_server(tls_config(tmp_path, **common)) as b,
    ):
        yield a, b, Credentials(tmp_path / "state", a.address)


async def drained(gw: Gateway, timeout: float = 60) -> None:
    """Until the outbox (one for both gateways) is empty: every committed record acked by the stream."""
    assert gw.drainer is not None
    outbox = gw.drainer.outbox
    for _ in range(int(timeout / 0.05)):
        if await outbox.call(outbox.store.outbox_depth) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the outbox did not drain")


def read_store(tmp_path: Path, store: str, keys: str) -> list[dict]:
    sealer = open_sealer(tmp_path / "state", store, key_schema=keys)
    try:
        with open_store(store, sealer) as s:
            return [r for _, r in s.read_since(0, limit=10**6)]
    finally:
        sealer.keys.close()


def read_stream(url: str) -> list[tuple[str, str, dict]]:
    base, _, prefix = url.partition("?prefix=")
    return asyncio.run(all_messages(base, prefix))


def by_key(records: list[dict]) -> list[dict]:
    return sorted(records, key=key)


def test_bands_moving_between_gateways_on_postgresql_stream_everything_once(
    tmp_path: Path, pg: tuple[str, str], stream_url: str
) -> None:
    store, keys = pg
    fleet = [band(seed=s, minutes=30, batch_minutes=5) for s in (51, 52, 53)]
    erased, _ = fleet[0]
    seen: dict[str, object] = {}

    async def scenario() -> None:
        async with two_gateways(tmp_path, store, keys, stream_url) as (a, b, creds):
            codes: list[int] = []
            for device, batches in fleet:
                thirds = [batches[:2], batches[2:4], batches[4:]]
                for gw, part in zip((a, b, a), thirds, strict=True):
                    async with await creds.band_channel(device, gw.address) as ch:
                        up = Uploader(ch, device)
                        codes += [(await up.send(x)).code for x in part]
                        await up.close()
                # a resend of what the other gateway stored: acknowledged, neither stored nor streamed again
                async with await creds.band_channel(device, b.address) as ch:
                    resent = (await Uploader(ch, device).send(batches[0])).code
                    assert resent in (OK, ALREADY_EXISTS), resent
            await drained(a)
            # a drainer counts what it published a step after the outbox commit that `drained` sees
            records = len(by_key([r for _, batches in fleet for r in processed(batches)]))
            for _ in range(200):
                if a.drainer.published + b.drainer.published >= records:  # type: ignore[union-attr]
                    break
                await asyncio.sleep(0.05)
            seen["codes"] = codes
            seen["published"] = (a.drainer.published, b.drainer.published)  # type: ignore[union-attr]
            seen["stored"] = await asyncio.to_thread(read_store, tmp_path, store, keys)
            seen["streamed"] = await asyncio.to_thread(read_stream, stream_url)
            async with creds.channel("operator", b.address) as op:  # erased through the other gateway
                request = privacy_pb2.DeviceRequest(device=hexid(erased))
                await privacy_pb2_grpc.PrivacyServiceStub(op).Erase(request)
            await drained(a)
            seen["after"] = await asyncio.to_thread(read_stream, stream_url)

    asyncio.run(asyncio.wait_for(scenario(), 240))
    assert seen["codes"] == [OK] * sum(len(batches) for _, batches in fleet)
    expected = by_key([r for _, batches in fleet for r in processed(batches)])
    stored = by_key(seen["stored"])  # type: ignore[arg-type]
    assert stored == expected  # the single-gateway run: none lost, none doubled
    messages: list[tuple[str, str, dict]] = seen["streamed"]  # type: ignore[assignment]
    ids = [msg_id for _, msg_id, _ in messages]
    assert len(ids) == len(set(ids)), "a record is in the stream twice"
    assert by_key([record_of(body) for *_, body in messages]) == expected
    # each device's messages in the order its records were committed (cursor order), in every family
    cursors: dict[str, list[int]] = {}
    for subject, _, body in messages:
        cursors.setdefault(subject, []).append(body["cursor"])
    assert all(c == sorted(c) for c in cursors.values())
    # the two drainers shared the outbox: each entry was published by one of them, once
    assert sum(seen["published"]) == len(expected), seen["published"]  # type: ignore[arg-type]
    after = by_key([record_of(body) for *_, body in seen["after"]])  # type: ignore[union-attr]
    assert after == [r for r in expected if r["device"] != hexid(erased)]


# connections cut under the gateway


class Cutter:
    """Terminates the gateway's PostgreSQL backends, and only its: the store's (by the application name the
    test gives its store URL) and the key store's (named bandgate-keys, found by the key schema in their
    queries, which no other run shares)."""

    def __init__(self, base_url: str, store_app: str, keys: str):
        self.base_url = base_url
        self.store_app = store_app
        self.keys = keys
        self.cut = 0  # backends terminated
        self.mid_commit = 0  # of them, commits waiting for a lock when cut

    def _ours(self, conn: psycopg.Connection, blocked_by: int | None = None) -> list[int]:
        query = (
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND (application_name = %s "
            "OR (application_name = 'bandgate-keys' AND position(%s in query) > 0))"
        )
        args: tuple = (self.store_app, self.keys)
        if blocked_by is not None:
            query += " AND %s = ANY(pg_blocking_pids(pid))"
            args += (blocked_by,)
        return [pid for (pid,) in conn.execute(query, args)]

    def _terminate(self, conn: psycopg.Connection, pids: list[int]) -> None:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        self.cut += len(pids)

    def everything(self) -> None:
        with psycopg.connect(self.base_url, autocommit=True) as admin:
            self._terminate(admin, self._ours(admin))

    def a_commit(self, schema: str, within_s: float = 20) -> None:
        """Hold the activity records' table so the next commit waits, then cut that commit's backend (and
        every other of ours); the lock goes with this call."""
        with (
            psycopg.connect(self.base_url, autocommit=True) as admin,
            psycopg.connect(self.base_url) as locker,
        ):
            locker.execute(
                sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.Identifier(schema, "records_activity"))
            )
            holder = locker.info.backend_pid
            deadline = time.monotonic() + within_s
            while time.monotonic() < deadline:
                waiting = self._ours(admin, blocked_by=holder)
                if waiting:
                    self._terminate(admin, waiting)
                    self.mid_commit += len(waiting)
                    break
                time.sleep(0.02)
            self._terminate(admin, self._ours(admin))
            locker.rollback()


async def health(gw: Gateway) -> int:
    async with grpc.aio.insecure_channel(gw.health_address) as ch:
        return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())).status


def test_postgresql_connections_cut_mid_stream_lose_nothing_and_double_nothing(
    tmp_path: Path, pg: tuple[str, str], stream_url: str
) -> None:
    store, keys = pg
    base, _, query = store.partition("?")
    schema = query.removeprefix("schema=")
    app = f"bandgate_{schema}"[:63]
    # a commit waits for a lock long enough to be cut while it waits
    store = f"{store}&application_name={app}&lock_timeout_ms=30000"
    fleet = [band(seed=s, minutes=40, batch_minutes=5) for s in (61, 62, 63)]
    total = sum(len(batches) for _, batches in fleet)
    cutter = Cutter(base, app, keys)
    acked = [0]
    seen: dict[str, object] = {}

    async def cut_when(n: int, cut) -> None:  # type: ignore[no-untyped-def]
        while acked[0] < n:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(cut)

    async def scenario() -> None:
        cfg = tls_config(tmp_path, store=store, key_schema=keys, stream=stream_url, compute_processes=1)
        async with run_server(cfg) as gw:
            creds = Credentials(tmp_path / "state", gw.address)
            credentials = await creds.fleet_credentials(d for d, _ in fleet)

            def count(_device: int) -> None:
                acked[0] += 1

            bands = asyncio.ensure_future(
                run_fleet(gw.address, fleet, interval_s=0.3, on_ack=count, credentials=credentials)
            )
            cuts = asyncio.ensure_future(
                asyncio.gather(
                    cut_when(2, cutter.everything),  # idle, or whatever it is doing
                    cut_when(total // 3, lambda: cutter.a_commit(schema)),  # in the middle of a commit
                    cut_when(2 * total // 3, cutter.everything),
                )
            )
            stats = await bands
            await cuts
            seen["stats"] = stats
            await drained(gw)
            for _ in range(200):  # it comes back by itself: nothing restarted
                if await health(gw) == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
            seen["health"] = await health(gw)
            seen["unavailable"] = gw.metrics.registry.get_sample_value(
                "bandgate_batches_total", {"code": "UNAVAILABLE"}
            )
        seen["stored"] = await asyncio.to_thread(read_store, tmp_path, store, keys)
        seen["streamed"] = await asyncio.to_thread(read_stream, stream_url)

    asyncio.run(asyncio.wait_for(scenario(), 240))
    stats = seen["stats"]
    assert all(s.refused == {} and s.stored + s.duplicates == s.batches for s in stats), stats  # type: ignore[attr-defined]
    assert cutter.cut >= 3 and cutter.mid_commit >= 1, (cutter.cut, cutter.mid_commit)
    # the commit cut mid-way was not acked: its batch was answered UNAVAILABLE and sent again
    assert (seen["unavailable"] or 0) >= 1 and sum(s.resent for s in stats) >= 1  # type: ignore[attr-defined]
    assert seen["health"] == health_pb2.HealthCheckResponse.SERVING
    expected = by_key([r for _, batches in fleet for r in processed(batches)])
    assert by_key(seen["stored"]) == expected  # type: ignore[arg-type]
    messages: list[tuple[str, str, dict]] = seen["streamed"]  # type: ignore[assignment]
    ids = [msg_id for _, msg_id, _ in messages]
    assert len(ids) == len(set(ids)), "a record is in the stream twice"
    assert by_key([record_of(body) for *_, body in messages]) == expected


def _leases(base: str, schema: str) -> list[tuple[str, str]]:
    """(device, holder) of the outbox leases not yet run out."""
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn.execute(
            "SELECT device, holder FROM outbox_leases WHERE until_us > (extract(epoch FROM now()) * 1e6)"
        ).fetchall()


def test_a_gateway_killed_holding_devices_publishes_them_as_soon_as_it_is_back(
    tmp_path: Path, pg: tuple[str, str], stream_url: str
) -> None:
    """`serve --stream` on PostgreSQL, killed with SIGKILL while its drainer holds devices (rows of
    outbox_leases), then started again on the same state dir: it takes them back under its name
    (gateway/stream/holder.py), so the stream holds every stored record, once, soon after the restart;
    before, their publishing waited for the lease (OUTBOX_LEASE_S, 120 s) to run out."""
    store, keys = pg
    base, schema = store.split("?schema=")
    env = {"BANDGATE_KEY_SCHEMA": keys}
    fleet = [(rec.device_id, b) for rec, b in fleet_batches(bands=4, minutes=40, seed=31, batch_minutes=1)]
    server = ServeProcess(tmp_path, store, extra=("--stream", stream_url), env=env)
    address = server.address

    def kill_holding() -> list[tuple[str, str]]:
        """Stopped (SIGSTOP: it can give nothing back), then killed if it holds devices, else resumed."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _leases(base, schema):
                server.proc.send_signal(signal.SIGSTOP)
                held = _leases(base, schema)
                if held:
                    server.kill()
                    return held
                server.proc.send_signal(signal.SIGCONT)
            time.sleep(0.002)
        raise AssertionError("the drainer never held a device")

    async def scenario() -> tuple[list, list, float]:
        nonlocal server
        bands = await server.fleet_acked(fleet, 20)
        held = await asyncio.to_thread(kill_holding)
        server = ServeProcess(tmp_path, store, listen=address, extra=("--stream", stream_url), env=env)
        restarted = time.monotonic()
        return await bands, held, restarted

    try:
        stats, held, restarted = asyncio.run(asyncio.wait_for(scenario(), 120))
        stored = read_store(tmp_path, store, keys)
        for _ in range(600):
            if len(read_stream(stream_url)) >= len(stored):
                break
            time.sleep(0.05)
        caught_up_s = time.monotonic() - restarted
        assert server.terminate() == 0
        messages = read_stream(stream_url)
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert held, "killed while holding no device: the run shows nothing"
    assert not any(s.refused for s in stats)
    assert by_key(stored) == by_key(processed(b for _, batches in fleet for b in batches))
    ids = [msg_id for _, msg_id, _ in messages]
    assert len(ids) == len(set(ids)) == len(stored), "a record is missing from the stream, or in it twice"
    assert by_key([record_of(body) for *_, body in messages]) == by_key(stored)
    # counted from the restart, so it holds the rest of the fleet's upload too: well under the lease
    assert caught_up_s < OUTBOX_LEASE_S / 2, f"the stream caught up {caught_up_s:.1f} s after the restart"
