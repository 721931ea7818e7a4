"""`bandgate serve --stream` as a process: killed with SIGKILL mid-stream (its drainer with it, wherever it
was: before a publish, between publish and ack, between ack and delete), restarted on the same store,
the feature stream ends up holding every stored record exactly once, and those are what replay computes."""

from __future__ import annotations

import asyncio

from gateway.simulator.recorder import fleet_batches
from tests.gateway.gatewaykit import ServeProcess, key, processed, same_records, stored, wait_until
from tests.stream.natskit import all_messages, delete_streams, record_of, run, shared_nats, unique_prefix


def test_kill_9_mid_stream_then_restart_streams_everything_once(tmp_path) -> None:
    base, prefix = shared_nats(), unique_prefix()
    url = f"{base}?prefix={prefix}"
    db = tmp_path / "gw.db"
    fleet = [(rec.device_id, b) for rec, b in fleet_batches(bands=4, minutes=30, seed=12, batch_minutes=1)]
    server = ServeProcess(tmp_path, db, extra=("--stream", url))
    address = server.address

    async def scenario():
        nonlocal server
        bands = await server.fleet_acked(fleet, 40)
        server.kill()
        server = ServeProcess(tmp_path, db, listen=address, extra=("--stream", url))
        return await bands

    try:
        stats = asyncio.run(asyncio.wait_for(scenario(), 180))
        got = stored(f"sqlite:///{db}")
        assert wait_until(lambda: len(run(all_messages(base, prefix))) >= len(got), timeout=30)
        assert server.terminate() == 0
        messages = run(all_messages(base, prefix))
    finally:
        if server.proc.poll() is None:
            server.kill()
        run(delete_streams(base, prefix))
    assert sum(s.reconnects for s in stats) > 0 and not any(s.refused for s in stats)
    expected = processed(b for _, batches in fleet for b in batches)
    assert len(got) == len(expected) > 0 and same_records(got, expected)
    ids = [m[1] for m in messages]
    assert len(ids) == len(set(ids)) == len(got), "a record is missing from the stream, or in it twice"
    assert sorted((record_of(b) for *_, b in messages), key=key) == sorted(got, key=key)
