"""Compute in worker processes: decompress, decode and features, each process with its own GIL.

Why processes: the kernels release the GIL, but the Python around them (state, records, the store's
encoding) does not, and with compute threads the serving process spent its time handing the GIL between
the event loop, the compute threads and the writer (measured: 1.1 of 2 cores used, a quarter of the CPU
in futex calls). A worker process does a batch's whole job (`compute.load_and_compute`: read the device
row on its own store connection, check the sequence, compute, apply consent, encode) and commits it on
that connection, with the other batches it computed meanwhile (group commit: `GROUP_MAX`), before it
answers: a writer thread in the serving process cost twice its SQLite time there in GIL hand-offs.
Raw samples exist only inside a worker.

The wire between the event loop and a worker is a socketpair carrying length-prefixed pickles, read by
the loop itself (asyncio streams): no helper threads in the serving process. A worker ignores SIGINT and
SIGTERM (the serving process drains, then closes the socket) and exits when its socket closes, so it
also ends when the serving process is killed. A worker that dies fails its jobs with `WorkerLost`
(UNAVAILABLE: the bands resend; nothing was stored for them) and is started again, after a delay that
doubles while its starts keep failing or its processes keep dying young. A worker that holds jobs and
answers none of them for `deadline_s` (a kernel that never returns, a process stopped or swapped out)
is killed, with the same outcome. A batch that two lost workers were computing when they ended is
refused for good (`PoisonBatch`); each worker keeps the number of the job it computes in 8 bytes it
shares with the serving process, so the batches that only waited behind that one are not blamed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bandgate.workers")

_HEADER = struct.Struct("!I")
READY_TIMEOUT_S = 60.0  # a worker's start: imports and its store connection (kernels load after)
RESTART_DELAY_S = 1.0  # after a worker died: the first restart waits this long ...
RESTART_MAX_S = 30.0  # ... each failed one twice as long as the last, up to this
STABLE_S = 60.0  # a worker that ran this long after its kernels loaded is restarted after RESTART_DELAY_S
WARM_TIMEOUT_S = 120.0  # a worker's first answer may wait for its kernels to load (cold cache: compile)
WARM_JOB = -1  # the job number of the note a worker sends once its kernels are loaded
_NOT_COMPUTING = -1  # in a worker's job marker: between jobs, or committing
_MARKER = struct.Struct("<q")
SPILL = 2  # jobs a device's own worker may have waiting beyond the least busy one before it spills
POISON_LOSSES = 2  # a batch this many lost workers were computing (or held) is refused, not retried
POISON_KEPT = 1024  # batches remembered as lost with a worker (oldest forgotten first)
GROUP_MIN = 8  # a group closes at GROUP_MAX_S only once it holds this many
GROUP_MAX = 32  # batches a worker computes before it commits them (one transaction, one fsync) ...
GROUP_MAX_S = 0.025  # ... or as many as it computed in this long (GROUP_MIN at least): the first's wait


class WorkerLost(Exception):  # noqa: N818 - names the event the gateway answers UNAVAILABLE to
    """The worker process running a job ended before answering (killed, or crashed)."""


class PoisonBatch(Exception):  # noqa: N818 - names the batch, answered INTERNAL and not retried
    """`POISON_LOSSES` workers ended while computing this batch: it is not sent to another one."""


@dataclass(eq=False)
class _Worker:
    index: int
    proc: subprocess.Popen
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pending: dict[int, tuple[asyncio.Future, Hashable]] = field(default_factory=dict)
    listener: asyncio.Task | None = None
    dead: bool = False  # set as soon as its socket ends, before it is reaped
    warmed: float | None = None  # when it said its kernels are loaded (monotonic s)
    progress: float = 0.0  # when it last answered, or went from idle to busy (monotonic s)
    killed_stuck: bool = False
    marker: mmap.mmap | None = None  # the job it is computing, which it writes there (8 bytes, shared)

    @property
    def warm(self) -> bool:
        return self.warmed is not None

    def computing(self) -> int:
        """The job this worker is computing now, or `_NOT_COMPUTING`."""
        return _MARKER.unpack_from(self.marker)[0] if self.marker is not None else _NOT_COMPUTING


class WorkerPool:
    """`processes` worker processes running `compute.load_and_compute` for the event loop.

    start/shutdown: start launches the workers and waits until each has imported the feature path and
    opened its store connection; shutdown closes their sockets (a worker finishes the job it is on) and
    waits for them to exit, killing one that does not within `grace_s`. Both are safe to repeat.

    `deadline_s` (0: none) is how long a worker holding jobs may go without answering one before it is
    killed as stuck (`WARM_TIMEOUT_S` at least, until its kernels are loaded). `restart_delay_s` and
    `restart_max_s` set the back-off of restarts.
    """

    def __init__(
        self,
        processes: int,
        store_url: str,
        max_decompressed_bytes: int,
        on_change: Callable[[int, bool], None] = lambda live, lost: None,
        *,
        deadline_s: float = 0.0,
        restart_delay_s: float = RESTART_DELAY_S,
        restart_max_s: float = RESTART_MAX_S,
        sealing_dir: str = "",
        key_schema: str = "bandgate_keys",
    ):
        self.processes = processes
        self.sealing_dir = sealing_dir  # a state dir: workers seal records with its keys ("" = in clear)
        self.key_schema = key_schema  # with a PostgreSQL store: where its keys are (as the serving process)
        self.on_change = on_change  # (workers running, whether one was just lost): for the metrics
        self.store_url = store_url
        self.max_decompressed_bytes = max_decompressed_bytes
        self.deadline_s = deadline_s
        self.restart_delay_s = restart_delay_s
        self.restart_max_s = restart_max_s
        self._workers: list[_Worker | None] = [None] * processes
        self._ids = itertools.count()
        self._closing = False
        self._restarts: set[asyncio.Task] = set()
        self._failures = [0] * processes  # failed starts and early deaths in a row, per worker slot
        self._watchdog: asyncio.Task | None = None
        self._lost: OrderedDict[Hashable, int] = OrderedDict()  # batch key -> workers lost with it

    @property
    def pids(self) -> list[int]:
        """The live workers' process IDs (for RSS accounting and tests)."""
        return [w.proc.pid for w in self._workers if w is not None and not w.dead]

    async def start(self) -> None:
        if any(self._workers):
            return
        self._closing = False
        self._failures = [0] * self.processes
        started = await asyncio.gather(
            *(self._launch(i) for i in range(self.processes)), return_exceptions=True
        )
        failed = [e for e in started if isinstance(e, BaseException)]
        for i, w in enumerate(started):
            if not isinstance(w, BaseException):
                self._workers[i] = w
        if failed:
            await self.shutdown()
            raise failed[0]
        self.on_change(len(self.pids), False)
        if self.deadline_s > 0:
            self._watchdog = asyncio.ensure_future(self._watch())

    async def run(
        self, key: Hashable, device_id: int, *args: Any, on_done: Callable[[], None] = lambda: None
    ) -> Any:
        """`load_and_compute(rows, device_id, *args, max_decompressed_bytes)` in a worker: its result, or the
        exception it raised (`SequenceError`, `BatchError`, `StoreError`, `ValueError`), or `WorkerLost`.

        `key` names the batch (device, boot, first sequence number): a batch that `POISON_LOSSES`
        workers were computing when they ended (or held, when one ended between jobs) raises
        `PoisonBatch` instead of killing a third. `on_done` is
        called exactly once, when the job is over: answered, lost with its worker, or never sent. A caller
        cancelled while its job runs does not end the job, so `on_done` still waits for it (what a
        bounded queue needs to stay true)."""
        try:
            if self._lost.get(key, 0) >= POISON_LOSSES:
                raise PoisonBatch(f"this batch was in flight on {POISON_LOSSES} compute workers that ended")
            worker = self._pick(device_id)
            job = next(self._ids)
            payload = pickle.dumps((job, (device_id, *args)), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            on_done()
            raise
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: on_done())
        if not worker.pending:  # idle until now: the deadline counts from here
            worker.progress = time.monotonic()
        worker.pending[job] = (future, key)
        try:
            worker.writer.write(_HEADER.pack(len(payload)) + payload)
            await worker.writer.drain()  # flow control: a busy worker's socket buffer stays bounded
        except (ConnectionError, RuntimeError) as e:
            worker.pending.pop(job, None)
            future.cancel()
            raise WorkerLost(f"compute worker {worker.index} is gone") from e
        ok, value = await asyncio.shield(future)
        if ok:
            return value
        raise value

    def _pick(self, device_id: int) -> _Worker:
        """The device's own worker (its state is likely in that worker's `StateCache`), unless that one
        has `SPILL` more jobs waiting than the least busy live worker, or is down."""
        live = [w for w in self._workers if w is not None and w.listener is not None and not w.dead]
        if not live:
            raise WorkerLost("no compute worker is running")
        least = min(live, key=lambda w: len(w.pending))
        own = self._workers[_mix(device_id) % self.processes]
        if own in live and len(own.pending) - len(least.pending) <= SPILL:  # type: ignore[union-attr]
            return own  # type: ignore[return-value]
        return least

    async def _launch(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        marker_fd, marker = _job_marker()
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway.workers",
                    str(theirs.fileno()),
                    self.store_url,
                    str(self.max_decompressed_bytes),
                    str(marker_fd),
                    self.sealing_dir,
                    self.key_schema,
                ],
                pass_fds=(theirs.fileno(), marker_fd),
                stdin=subprocess.DEVNULL,
                # the modules this process imported, from the same places, whatever its working directory
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)},
                # Their own process group, so a terminal's Ctrl-C reaches only the serving process (which
                # drains); not their own session, which the kernel's autogroup scheduling would treat as
                # another desktop task (measured: +35 % CPU per batch in the serving process).
                process_group=0,
            )
        except BaseException:
            ours.close()
            marker.close()
            raise
        finally:
            theirs.close()
            os.close(marker_fd)
        try:
            reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 20)
        except BaseException:
            ours.close()
            marker.close()
            proc.kill()
            await asyncio.to_thread(proc.wait)
            raise
        worker = _Worker(index, proc, reader, writer, marker=marker)
        try:
            ok, value = await asyncio.wait_for(_read(reader), READY_TIMEOUT_S)
            if not ok:
                raise value
        except BaseException as e:
            writer.close()
            marker.close()
            proc.kill()
            await asyncio.to_thread(proc.wait)
            if isinstance(e, (asyncio.IncompleteReadError, TimeoutError)):
                raise RuntimeError(
                    f"compute worker {index} did not start (exit code {proc.returncode}); see its log"
                ) from None
            raise
        worker.listener = asyncio.ensure_future(self._listen(worker))
        log.info(
            "compute worker started",
            extra={"fields": {"event": "worker_started", "worker": index, "pid": proc.pid}},
        )
        return worker

    async def _listen(self, worker: _Worker) -> None:
        """Answers from `worker` to their jobs' futures, until its socket ends or carries something that is
        not an answer; then the worker is done with: its jobs fail with `WorkerLost`, it is killed if it is
        still running, and (unless the pool is closing) started again."""
        try:
            while True:
                job, ok, value = await _read(worker.reader)
                worker.progress = time.monotonic()
                if job == WARM_JOB:
                    worker.warmed = worker.progress
                    continue
                entry = worker.pending.pop(job, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result((ok, value))
        except asyncio.CancelledError:
            raise
        except Exception:  # end of stream, or an answer that does not unpickle: the worker is lost
            pass
        finally:
            worker.dead = True  # before any await: `_pick` sends it nothing more
            worker.writer.close()
            # The job it was computing when it died or was killed is the one to blame; the others
            # waited behind it. Dying between jobs or in a commit blames every job it held.
            culprit = worker.computing()
            if worker.marker is not None:
                worker.marker.close()
                worker.marker = None
            blamed = [culprit] if culprit in worker.pending else list(worker.pending)
            lost = WorkerLost(f"compute worker {worker.index} ended before answering")
            for job_id, (future, key) in worker.pending.items():
                if not future.done():
                    future.set_result((False, lost))
                if not self._closing and job_id in blamed:
                    self._lost[key] = self._lost.pop(key, 0) + 1
                    while len(self._lost) > POISON_KEPT:
                        self._lost.popitem(last=False)
            worker.pending.clear()
            if not self._closing:
                if worker.proc.poll() is None:  # alive but not answering as it should
                    worker.proc.kill()
                code = await asyncio.to_thread(worker.proc.wait)
                # A worker that dies young (or before its kernels loaded) is a crash loop in the making:
                # its restart waits longer.
                young = worker.warmed is None or time.monotonic() - worker.warmed < STABLE_S
                self._failures[worker.index] = self._failures[worker.index] + 1 if young else 0
                self.on_change(len(self.pids), True)
                fields = {"event": "worker_lost", "worker": worker.index, "exit_code": code}
                if worker.killed_stuck:
                    fields["reason"] = f"no answer within {self.deadline_s:g} s"
                log.error("compute worker ended", extra={"fields": fields})
                task = asyncio.ensure_future(self._restart(worker.index))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)

    def restart_delay(self, index: int) -> float:
        """How long the next start of worker slot `index` waits: `restart_delay_s`, doubled for each
        failure in a row after the first (a start that failed, a worker that died within `STABLE_S`),
        up to `restart_max_s`."""
        doublings = min(max(self._failures[index] - 1, 0), 16)
        return min(self.restart_max_s, self.restart_delay_s * 2**doublings)

    async def _restart(self, index: int) -> None:
        delay = self.restart_delay(index)
        while not self._closing:
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                worker = await self._launch(index)
            except Exception as e:
                self._failures[index] += 1
                delay = self.restart_delay(index)
                fields = {"event": "worker_restart_failed", "worker": index, "error": str(e)}
                log.error("compute worker restart failed", extra={"fields": {**fields, "retry_s": delay}})
                continue
            if self._closing:
                worker.writer.close()
                await asyncio.to_thread(worker.proc.wait)
                return
            self._workers[index] = worker
            self.on_change(len(self.pids), False)
            return

    async def _watch(self) -> None:
        """Kill a worker that holds jobs and has answered none of them for `deadline_s` (until its
        kernels are loaded, `WARM_TIMEOUT_S` at least). Its listener then fails its jobs and restarts
        it, as for any worker that died."""
        period = min(1.0, self.deadline_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                self._kill_stuck(time.monotonic())
            except Exception as e:  # a bug here must not end the watch unnoticed
                fields = {"event": "watchdog_failed", "error": repr(e)}
                log.error("worker watchdog failed", extra={"fields": fields})

    def _kill_stuck(self, now: float) -> None:
        for w in self._workers:
            if w is None or w.dead or not w.pending or w.killed_stuck:
                continue
            limit = self.deadline_s if w.warm else max(self.deadline_s, WARM_TIMEOUT_S)
            if now - w.progress > limit:
                w.killed_stuck = True
                fields = {
                    "event": "worker_stuck",
                    "worker": w.index,
                    "pid": w.proc.pid,
                    "jobs": len(w.pending),
                    "silent_s": round(now - w.progress, 1),
                }
                log.error("compute worker stuck: killed", extra={"fields": fields})
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()

    async def shutdown(self, grace_s: float = 10.0) -> None:
        self._closing = True
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watchdog
        restarts = list(self._restarts)
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        workers, self._workers = self._workers, [None] * self.processes
        for w in workers:
            if w is not None:
                w.writer.close()
        for w in workers:
            if w is None:
                continue
            try:
                await asyncio.wait_for(asyncio.to_thread(w.proc.wait), grace_s)
            except TimeoutError:
                w.proc.kill()
                await asyncio.to_thread(w.proc.wait)
            if w.listener is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await w.listener


def _mix(device_id: int) -> int:
    """A device ID's bits mixed (splitmix64's finaliser): IDs that differ in a few bits still spread."""
    z = device_id & 0xFFFF_FFFF_FFFF_FFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFF_FFFF_FFFF_FFFF
    return z ^ (z >> 31)


async def _read(reader: asyncio.StreamReader) -> Any:
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(n))


# --- the worker process ------------------------------------------------------------------------------


# Exceptions that cross back as they are: the serving process maps these to answers, and unpickling
# one must not import anything heavy there (a Numba error would load Numba into the serving process).
_PORTABLE_MODULES = frozenset({"builtins", "gateway.store.base", "decoder.batch"})


def _portable(e: BaseException) -> BaseException:
    """`e` if the serving process knows its type and it survives pickling, else a RuntimeError naming
    its type (never its message: it could quote data)."""
    if type(e).__module__ in _PORTABLE_MODULES:
        try:
            pickle.loads(pickle.dumps(e))
            return e
        except Exception:
            pass
    return RuntimeError(f"compute failed: {type(e).__name__}")


def _send(sock: socket.socket, message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(payload)) + payload)


class _Inbox:
    """The worker's end of the socket, as whole jobs: `take` waits for the first job of a group, `more`
    takes only jobs that have already arrived, so a busy worker commits what it computed as one group
    and an idle one answers a lone batch at once."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.ready: collections.deque[Any] = collections.deque()
        self.closed = False

    def take(self) -> Any | None:
        """The next job, waiting for it; None once the socket has closed."""
        while not self.ready and not self.closed:
            self._receive(block=True)
        return self.ready.popleft() if self.ready else None

    def more(self) -> Any | None:
        """The next job if it has arrived already, else None."""
        if not self.ready and not self.closed:
            self._receive(block=False)
        return self.ready.popleft() if self.ready else None

    def _receive(self, *, block: bool) -> None:
        try:
            chunk = self.sock.recv(1 << 20, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not chunk:
            self.closed = True
            return
        self.buf += chunk
        at = 0
        while len(self.buf) - at >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self.buf, at)
            end = at + _HEADER.size + n
            if len(self.buf) < end:
                break
            self.ready.append(pickle.loads(memoryview(self.buf)[at + _HEADER.size : end]))
            at = end
        del self.buf[:at]


def _job_marker() -> tuple[int, mmap.mmap]:
    """8 shared bytes where a worker keeps the number of the job it is computing: an fd to pass to the
    worker and the serving process's own mapping of it (which outlives the fd)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("bandgate-worker-job", os.MFD_CLOEXEC)
    else:  # not Linux: an unlinked temporary file does the same
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, _MARKER.size)
    marker = mmap.mmap(fd, _MARKER.size)
    _MARKER.pack_into(marker, 0, _NOT_COMPUTING)
    return fd, marker


def _serve(
    fd: int,
    store_url: str,
    max_decompressed_bytes: int,
    marker_fd: int,
    sealing_dir: str = "",
    key_schema: str = "bandgate_keys",
) -> int:
    """The worker's loop: compute the jobs that have arrived, commit them as one group, answer them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the serving process drains first, then closes us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    marker = mmap.mmap(marker_fd, _MARKER.size)
    os.close(marker_fd)
    sealer = None
    try:
        from gateway.logs import configure_logging

        configure_logging(logging.WARNING)  # the serving process's format, on the stderr it shares
        from bandgate.v1 import batch_pb2
        from decoder.features import StateCache
        from gateway.compute import load_and_compute
        from gateway.store import store_for_url
        from gateway.warm import warm

        if sealing_dir:  # records and state sealed here, where they are made, with the gateway's keys
            from gateway.privacy.sealing import open_sealer

            sealer = open_sealer(Path(sealing_dir), store_url, key_schema=key_schema)
        store = store_for_url(store_url, sealer)
        store.open()
    except Exception as e:
        if sealer is not None:
            sealer.keys.close()
        _send(sock, (False, _portable(e)))
        return 1
    _send(sock, (True, os.getpid()))
    try:  # from here on, every way out closes the store and its key store (PostgreSQL: a listener)
        cache = StateCache()
        try:
            warm()  # load every kernel now, not inside a band's batch (jobs wait in the socket meanwhile)
            # from now on the serving process's deadline applies in full
            _send(sock, (WARM_JOB, True, None))
        except OSError:  # the serving process closed us while we warmed up
            return 0
        except Exception as e:  # a kernel that failed here fails its batches with a reason, as before
            failed = {"event": "warm_failed", "error": type(e).__name__}
            log.warning("warm-up failed", extra={"fields": failed})

        def compute(job: Any) -> tuple[int, bool, Any]:
            """One job's answer before the commit: (job, True, high-water or (Computed, CommitItem)), or
            (job, False, the exception)."""
            job_id, (device_id, batch_bytes, allowed, allow_gap) = job
            _MARKER.pack_into(marker, 0, job_id)  # the serving process blames this job if we never answer
            try:
                batch = batch_pb2.Batch.FromString(batch_bytes)
                outcome = load_and_compute(
                    store, device_id, batch, allowed, allow_gap, max_decompressed_bytes, cache
                )
                return job_id, True, outcome
            except Exception as e:
                return job_id, False, _portable(e)

        inbox = _Inbox(sock)
        held = None
        while (job := held or inbox.take()) is not None:
            held = None
            answers: list[tuple[int, bool, Any]] = []
            devices: set[int] = set()
            until = time.monotonic() + GROUP_MAX_S
            while job is not None:
                devices.add(job[1][0])
                answers.append(compute(job))
                more = len(answers) < GROUP_MIN or (len(answers) < GROUP_MAX and time.monotonic() < until)
                job = inbox.more() if more else None
                if job is not None and job[1][0] in devices:
                    # Its device has a batch in this group, not committed yet: computed now, it would start
                    # from the row before that batch. It opens the next group instead.
                    held, job = job, None
            _MARKER.pack_into(marker, 0, _NOT_COMPUTING)
            _commit(store, answers)
            for answer in answers:
                try:
                    _send(sock, answer)
                except OSError:
                    return 0
                except Exception as e:  # an answer that does not pickle: the job fails, the worker goes on
                    _send(
                        sock, (answer[0], False, RuntimeError(f"compute failed: answer {type(e).__name__}"))
                    )
        return 0
    finally:
        store.close()
        if sealer is not None:
            sealer.keys.close()


def _commit(store: Any, answers: list[tuple[int, bool, Any]]) -> None:
    """Commit the group's computed items in one transaction (`Store.commit_many`: one fsync), and put
    each item's outcome in its answer: (Computed, CommitResult), or the exception that refused it."""
    slots = [i for i, (_, ok, value) in enumerate(answers) if ok and isinstance(value, tuple)]
    if not slots:
        return
    items = [answers[i][2][1] for i in slots]
    try:
        results: list[Any] = store.commit_many(items)
    except Exception as e:  # a bug, not a store state (commit_many answers those per item)
        results = [e] * len(items)
    for i, result in zip(slots, results, strict=True):
        job, _, (computed, _) = answers[i]
        if isinstance(result, Exception):
            answers[i] = (job, False, _portable(result))
        else:  # stored: the state stays here, the serving process needs only the counts and errors
            answers[i] = (job, True, (dataclasses.replace(computed, state=b""), result))


if __name__ == "__main__":
    from gateway.logs import exit_now

    exit_now(_serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:7]))
