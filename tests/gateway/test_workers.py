"""Compute worker processes: a worker that dies costs its batches an UNAVAILABLE and nothing else (it is
replaced, the stream goes on, the resent batches are stored once), and the in-process compute threads
(`compute_processes = 0`) store exactly what the workers do."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest

from gateway.pipeline import ALREADY_EXISTS, INTERNAL, OK, RESOURCE_EXHAUSTED, UNAVAILABLE
from gateway.server import run_server
from tests.gateway.gatewaykit import Uploader, band, config, processed, running, same_records, stored


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def kill_with_a_batch_in_flight(gw, up: Uploader, batch) -> object:
    """Stop every worker, send `batch` so that it is in flight on one, kill them all, return its ack, and
    wait until both workers are running again."""
    pool = gw._pipeline.workers
    pids = pool.pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    sent = asyncio.ensure_future(up.send(batch))
    while gw.metrics.compute_queue._value.get() < 1:  # its job is written to a stopped worker's socket
        await asyncio.sleep(0.01)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    ack = await sent
    for _ in range(1200):  # both replaced (a killed idle worker's pid may be listed a moment longer)
        if len(pool.pids) >= 2 and not set(pool.pids) & set(pids):
            break
        await asyncio.sleep(0.05)
    assert len(pool.pids) >= 2 and not set(pool.pids) & set(pids), (pool.pids, pids)
    return ack


def test_a_worker_killed_mid_batch_answers_unavailable_is_replaced_and_nothing_is_lost(tmp_path):
    cfg = config(tmp_path, retry_after_ms=50)
    device, batches = band(seed=5, minutes=40, batch_minutes=2)

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            pool = gw._pipeline.workers
            first = pool.pids
            assert len(first) == 2
            up = Uploader(ch, device)
            acks = [await up.send(b) for b in batches[:5]]
            lost = await kill_with_a_batch_in_flight(gw, up, batches[5])
            refused = [lost]
            for b in batches[5:]:
                while (ack := await up.send(b)).code == UNAVAILABLE:  # a band resends after the hint
                    refused.append(ack)
                    await asyncio.sleep(ack.retry_after_ms / 1000)
                acks.append(ack)
            assert await up.close() == grpc.StatusCode.OK  # the same stream carried on throughout
            metrics = {m.name: m.samples[0].value for m in gw.metrics.registry.collect() if m.samples}
            return first, pool.pids, acks, refused, metrics

    first, replaced, acks, refused, metrics = run(scenario())
    assert refused[0].code == UNAVAILABLE and "compute worker" in refused[0].reason
    assert all(a.code == UNAVAILABLE and a.retry_after_ms > 0 for a in refused)
    assert metrics["bandgate_compute_workers"] == 2
    assert metrics["bandgate_compute_worker_restarts"] == 2
    assert len(replaced) == 2 and not set(replaced) & set(first)
    assert not any(map(running, first))
    assert [a.code for a in acks] == [OK] * len(batches)
    assert same_records(stored(cfg.store), processed(batches))


def test_a_batch_lost_with_two_workers_is_refused_not_retried_and_the_gateway_goes_on(tmp_path):
    """A batch that (as far as the gateway can tell) kills the worker computing it is answered INTERNAL
    after the second time, instead of being resent to kill workers forever."""
    cfg = config(tmp_path, retry_after_ms=50)
    device, batches = band(seed=6, minutes=20, batch_minutes=2)
    other, other_batches = band(seed=8, minutes=20, batch_minutes=2)

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            up = Uploader(ch, device)
            first = await up.send(batches[0])
            losses = [await kill_with_a_batch_in_flight(gw, up, batches[1]) for _ in range(2)]
            refused = await up.send(batches[1])
            again = await up.send(batches[0])  # the same stream still answers
            up_other = Uploader(ch, other)
            others = [await up_other.send(b) for b in other_batches]
            return first, losses, refused, again, others

    first, losses, refused, again, others = run(scenario())
    assert first.code == OK and [a.code for a in losses] == [UNAVAILABLE] * 2
    assert refused.code == INTERNAL and "2 compute workers" in refused.reason
    assert again.code == ALREADY_EXISTS
    assert [a.code for a in others] == [OK] * len(other_batches)
    assert same_records(stored(cfg.store), processed([batches[0], *other_batches]))


@pytest.mark.parametrize("processes", [0, 1])
def test_compute_threads_and_one_worker_store_what_replay_computes(tmp_path, processes):
    cfg = config(tmp_path, compute_processes=processes)
    bands = [band(seed=s, minutes=30, batch_minutes=3) for s in (31, 32, 33)]

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            assert len(gw._pipeline.workers.pids if gw._pipeline.workers else []) == processes

            async def send(device, batches):
                up = Uploader(ch, device)
                acks = [await up.send(b) for b in batches]
                await up.close()
                return acks

            return await asyncio.gather(*(send(d, bs) for d, bs in bands))

    acks = run(scenario())
    assert all(a.code == OK for per_band in acks for a in per_band)
    assert same_records(stored(cfg.store), processed(b for _, bs in bands for b in bs))


def test_full_compute_queue_is_resource_exhausted_naming_the_limit_and_streams_carry_on(tmp_path):
    """The workers are stopped (SIGSTOP), so the one compute slot stays taken: the next batch waits
    `overload_wait_ms`, is refused naming the limit with the retry hint, and nothing is lost."""
    cfg = config(tmp_path, compute_queue=1, overload_wait_ms=50, retry_after_ms=321)
    a_device, a_batches = band(seed=41, minutes=10, batch_minutes=5)
    b_device, b_batches = band(seed=42, minutes=10, batch_minutes=5)

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            pids = gw._pipeline.workers.pids
            up_a, up_b = Uploader(ch, a_device), Uploader(ch, b_device)
            try:
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                held = asyncio.ensure_future(up_a.send(a_batches[0]))
                while gw.metrics.compute_queue._value.get() < 1:  # A's batch holds the only slot
                    await asyncio.sleep(0.01)
                refused = await up_b.send(b_batches[0])
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            acks_a = [await held] + [await up_a.send(b) for b in a_batches[1:]]
            acks_b = [await up_b.send(b) for b in b_batches]  # B resends, on the same stream
            return refused, acks_a, acks_b

    refused, acks_a, acks_b = run(scenario())
    assert refused.code == RESOURCE_EXHAUSTED and "compute_queue = 1" in refused.reason
    assert refused.retry_after_ms == 321
    assert [a.code for a in acks_a + acks_b] == [OK] * (len(a_batches) + len(b_batches))
    assert same_records(stored(cfg.store), processed([*a_batches, *b_batches]))


def test_only_known_exceptions_cross_back_and_unknown_ones_keep_no_message():
    """What a worker raises reaches the serving process as itself when it is one the gateway answers
    (sequence, batch, store and builtin errors); anything else becomes a RuntimeError naming only its
    type, so no message (which could quote data) and no heavy module (Numba) crosses."""
    import pickle

    import numba

    from decoder.batch import BatchError, BatchErrorCode
    from gateway.store import SequenceError, StoreUnavailable
    from gateway.workers import _portable

    known_errors = (
        SequenceError(7, 1, 5, 9, 3),
        BatchError(BatchErrorCode.TOO_LARGE, "over"),
        StoreUnavailable("x"),
    )
    for known in known_errors:
        back = pickle.loads(pickle.dumps(_portable(known)))
        assert type(back) is type(known) and str(back) == str(known)
    assert pickle.loads(pickle.dumps(_portable(SequenceError(7, 1, 5, 9, 3)))).expected_seq == 3
    unknown = _portable(numba.core.errors.TypingError("value 1717 does not type"))
    assert type(unknown) is RuntimeError and "1717" not in str(unknown) and "TypingError" in str(unknown)


def test_a_job_whose_caller_is_cancelled_runs_to_its_end_before_it_counts_as_done(tmp_path):
    """`WorkerPool.run`'s `on_done` (what frees a place in `compute_queue`) waits for the job itself: a
    handler cancelled while its batch is being computed does not free the place while the worker still
    works on it."""
    from gateway.privacy.consent import EVERYTHING
    from gateway.store import open_store
    from gateway.workers import WorkerPool

    url = f"sqlite:///{tmp_path}/gw.db"
    with open_store(url):  # the schema exists before a worker reads device rows
        pass
    device, batches = band(seed=61, minutes=5, batch_minutes=5)

    async def scenario():
        pool = WorkerPool(1, url, 64 << 20)
        await pool.start()
        done = []
        try:
            (pid,) = pool.pids
            os.kill(pid, signal.SIGSTOP)
            try:
                payload = batches[0].SerializeToString()
                job = asyncio.ensure_future(
                    pool.run("k", device, payload, EVERYTHING, False, on_done=lambda: done.append(1))
                )
                await asyncio.sleep(0.2)  # written to the stopped worker's socket
                job.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await job
                await asyncio.sleep(0.2)
                while_stopped = list(done)
            finally:
                os.kill(pid, signal.SIGCONT)
            for _ in range(500):  # the worker answers the job nobody waits for any more
                if done:
                    break
                await asyncio.sleep(0.01)
            # the worker committed the job nobody waited for: the same batch again is a duplicate
            again = await pool.run("k2", device, payload, EVERYTHING, False)
            return while_stopped, list(done), again
        finally:
            await pool.shutdown()

    while_stopped, after, again = run(scenario())
    assert while_stopped == [] and after == [1]
    assert again == batches[0].last_seq
    with open_store(url) as store:
        assert [r for _, r in store.read_since(0)] == processed(batches[:1])


def test_a_worker_commits_the_batches_that_arrived_together_as_one_group(tmp_path):
    """Jobs that reach a busy worker together are computed, then committed in one `commit_many`, each
    answered with its own outcome; a device's next batch waits for the group holding its previous one,
    so it is computed from that batch's state, and a gap is still refused."""
    from gateway.privacy.consent import EVERYTHING
    from gateway.store import SequenceError, open_store
    from gateway.store.base import CommitResult
    from gateway.workers import WorkerPool

    url = f"sqlite:///{tmp_path}/gw.db"
    with open_store(url):
        pass
    a, a_batches = band(seed=71, minutes=20, batch_minutes=5)
    b, b_batches = band(seed=72, minutes=20, batch_minutes=5)
    sent = [(a, a_batches[0]), (b, b_batches[0]), (a, a_batches[1]), (b, b_batches[2])]

    async def scenario():
        pool = WorkerPool(1, url, 64 << 20)
        await pool.start()
        try:
            (pid,) = pool.pids
            os.kill(pid, signal.SIGSTOP)  # the jobs wait in its socket, then arrive together
            try:
                jobs = [
                    asyncio.ensure_future(
                        pool.run((d, x.boot_id, x.first_seq), d, x.SerializeToString(), EVERYTHING, False)
                    )
                    for d, x in sent
                ]
                await asyncio.sleep(0.3)
            finally:
                os.kill(pid, signal.SIGCONT)
            return await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            await pool.shutdown()

    *stored_ok, gap = run(scenario())
    assert isinstance(gap, SequenceError) and gap.expected_seq == b_batches[0].last_seq + 1
    for (_, result), (_, x) in zip(stored_ok, sent, strict=False):
        assert isinstance(result, CommitResult) and not result.duplicate and result.high_water == x.last_seq
    # a's second batch continued from its first one's state: the records of a band sending both in turn
    assert same_records(stored(url), processed(a_batches[:2]) + processed(b_batches[:1]))


def _seed_on_worker(index: int, processes: int = 2, start: int = 300) -> int:
    """A simulator seed whose band's device is routed to worker `index` first (`workers._mix`)."""
    from gateway.simulator.recorder import band_device_id
    from gateway.workers import _mix

    return next(s for s in range(start, start + 64) if _mix(band_device_id(s, 0)) % processes == index)


def test_a_stuck_worker_is_killed_at_the_deadline_its_batch_answered_and_the_others_go_on(tmp_path):
    """A worker that holds a batch and answers nothing for `compute_deadline_s` (here 2 s: stopped with
    SIGSTOP, as a kernel that never returned would look) is killed and replaced; its batch is answered
    UNAVAILABLE and stored once when resent; the other worker's bands never notice."""
    cfg = config(tmp_path, retry_after_ms=50, compute_deadline_s=2.0)
    device, batches = band(seed=_seed_on_worker(0), minutes=10, batch_minutes=2)
    other, other_batches = band(seed=_seed_on_worker(1), minutes=10, batch_minutes=2)

    async def scenario():
        async with run_server(cfg) as gw, grpc.aio.insecure_channel(gw.address) as ch:
            pool = gw._pipeline.workers
            while not all(w.warm for w in pool._workers):  # both have loaded their kernels
                await asyncio.sleep(0.05)
            stuck, spared = (w.proc.pid for w in pool._workers)
            up, up_other = Uploader(ch, device), Uploader(ch, other)
            acks = [await up.send(batches[0])]
            os.kill(stuck, signal.SIGSTOP)
            started = asyncio.get_running_loop().time()
            lost = asyncio.ensure_future(up.send(batches[1]))
            others = [await up_other.send(b) for b in other_batches]  # while the first one hangs
            lost_ack = await lost
            waited = asyncio.get_running_loop().time() - started
            for b in batches[1:]:
                while (ack := await up.send(b)).code == UNAVAILABLE:
                    await asyncio.sleep(ack.retry_after_ms / 1000)
                acks.append(ack)
            while len(pool.pids) < 2:  # its replacement
                await asyncio.sleep(0.05)
            metrics = {m.name: m.samples[0].value for m in gw.metrics.registry.collect() if m.samples}
            return stuck, spared, pool.pids, acks, others, lost_ack, waited, metrics

    # a generous timeout: with a cold Numba cache both workers compile before they say they are warm
    stuck, spared, pids, acks, others, lost_ack, waited, metrics = run(scenario(), timeout=240)
    assert lost_ack.code == UNAVAILABLE and "compute worker" in lost_ack.reason
    assert 2.0 <= waited < 12.0
    assert not running(stuck) and spared in pids and len(pids) == 2
    assert metrics["bandgate_compute_worker_restarts"] == 1
    assert [a.code for a in others] == [OK] * len(other_batches)
    assert [a.code for a in acks] == [OK] * len(batches)
    assert same_records(stored(cfg.store), processed(batches) + processed(other_batches))


def test_restarts_back_off_while_a_worker_cannot_start_and_resume_when_it_can(tmp_path, caplog):
    """A worker slot whose starts keep failing (here its store's directory is gone) waits twice as long
    after each failure, up to the cap, and is running again once a start succeeds."""
    import logging

    from gateway.store import open_store
    from gateway.workers import WorkerPool

    home = tmp_path / "db"
    home.mkdir()
    url = f"sqlite:///{home}/gw.db"
    with open_store(url):
        pass

    async def scenario():
        pool = WorkerPool(1, url, 64 << 20, restart_delay_s=0.1, restart_max_s=0.4)
        await pool.start()
        try:
            (pid,) = pool.pids
            home.rename(tmp_path / "away")  # the next starts cannot open the store
            os.kill(pid, signal.SIGKILL)
            while len([r for r in caplog.records if r.msg == "compute worker restart failed"]) < 4:
                await asyncio.sleep(0.05)
            (tmp_path / "away").rename(home)
            while not pool.pids:
                await asyncio.sleep(0.05)
            return pid, pool.pids, running(pool.pids[0])
        finally:
            await pool.shutdown()

    with caplog.at_level(logging.ERROR, logger="bandgate.workers"):
        killed, (restarted,), was_running = run(scenario())
    failed = [r.fields for r in caplog.records if r.msg == "compute worker restart failed"]
    assert [f["retry_s"] for f in failed[:4]] == [0.2, 0.4, 0.4, 0.4]
    assert all("SQLITE_CANTOPEN" in f["error"] for f in failed)  # the reason reaches the log
    assert restarted != killed and was_running


def test_only_the_batch_a_lost_worker_was_computing_is_blamed(tmp_path):
    """A worker writes the job it computes into its shared marker. When it dies (or the watchdog kills
    it) that job counts towards `PoisonBatch`; a batch that only waited behind it does not, so two
    losses refuse the culprit for good and never the batch queued after it."""
    from gateway.privacy.consent import EVERYTHING
    from gateway.store import open_store
    from gateway.workers import _MARKER, PoisonBatch, WorkerLost, WorkerPool

    url = f"sqlite:///{tmp_path}/gw.db"
    with open_store(url):
        pass
    a, a_batches = band(seed=81, minutes=5, batch_minutes=5)
    b, b_batches = band(seed=82, minutes=5, batch_minutes=5)
    sent = [((a, 1, 0), a, a_batches[0]), ((b, 1, 0), b, b_batches[0])]

    async def scenario():
        pool = WorkerPool(1, url, 64 << 20, restart_delay_s=0.05)
        await pool.start()
        try:
            lost = []
            for _ in range(2):
                while not pool.pids:
                    await asyncio.sleep(0.02)
                (pid,) = pool.pids
                os.kill(pid, signal.SIGSTOP)
                jobs = [
                    asyncio.ensure_future(pool.run(k, d, x.SerializeToString(), EVERYTHING, False))
                    for k, d, x in sent
                ]
                await asyncio.sleep(0.2)  # both are in the stopped worker's socket
                (worker,) = pool._workers
                first = min(worker.pending)
                _MARKER.pack_into(worker.marker, 0, first)  # as the worker marks a job it starts on
                os.kill(pid, signal.SIGKILL)
                lost.append(await asyncio.gather(*jobs, return_exceptions=True))
            while not pool.pids:
                await asyncio.sleep(0.02)
            third = await asyncio.gather(
                *(pool.run(k, d, x.SerializeToString(), EVERYTHING, False) for k, d, x in sent),
                return_exceptions=True,
            )
            return lost, third
        finally:
            await pool.shutdown()

    lost, (culprit, bystander) = run(scenario())
    assert all(isinstance(r, WorkerLost) for round_ in lost for r in round_)
    assert isinstance(culprit, PoisonBatch)
    assert not isinstance(bystander, Exception) and bystander[1].high_water == b_batches[0].last_seq


def test_processes_load_only_what_they_use():
    """A compute worker loads neither grpc, the pipeline nor psycopg, and the serving process on SQLite
    neither Numba nor psycopg: each start (a restart's readiness, a replaced worker) pays ~0.1–0.3 s for
    every heavy module it loads. Checked in fresh interpreters, on the modules each process imports
    (a worker: `workers._serve`'s imports; a serving process: `serve`'s and the supervisor's)."""

    def loaded(modules: str, heavy: list[str]) -> list[str]:
        code = f"import sys, {modules}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return out.stdout.split()

    worker = "gateway.workers, gateway.compute, gateway.warm, gateway.privacy.sealing, gateway.store"
    assert loaded(worker, ["grpc", "gateway.pipeline", "psycopg", "prometheus_client"]) == []
    assert "numba" in loaded(worker, ["numba"])  # the check can see a module that is loaded
    serving = "gateway.cli, gateway.server, gateway.supervisor"
    assert loaded(serving, ["numba", "psycopg", "decoder.features"]) == []
