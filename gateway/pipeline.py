"""The path a batch takes, top to bottom (`Pipeline.handle`):

receive → authenticate → consent gate → limits → dedup → decompress, decode, features of the consented
families only (a compute worker process, `gateway/workers.py`, or a compute thread; raw arrays end there)
→ commit (in that worker process, or on the one writer thread for compute threads) → ack

Every batch gets exactly one Ack. A batch is acked OK only after the `Store.commit_many` that holds it
returned (group commit: one transaction for the commits waiting together): its records, the device's
new state and its high-water are then durable together. Anything else is answered with a
code and a reason, and nothing that was not stored is ever acked. Reasons name IDs, counts and limits,
never sample values.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from bandgate.v1 import batch_pb2, ingest_pb2
from decoder.batch import BatchError, BatchErrorCode
from decoder.records import device_key
from gateway.computed import Computed
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.privacy.consent import NO_CONSENT, ConsentGate, Processing
from gateway.store import FAMILIES, SequenceError, Store, StoreError, StoreUnavailable
from gateway.store.base import CommitItem, CommitResult
from gateway.workers import PoisonBatch, WorkerLost, WorkerPool

log = logging.getLogger("bandgate.pipeline")

# First batches of new streams in compute at once, per compute worker process: half a worker's smallest
# commit group (`workers.GROUP_MIN`), so an established stream's batch waits behind few device-state
# loads in its worker (`Pipeline._run_compute`).
OPENING_PER_WORKER = 4

T = TypeVar("T")

OK = grpc.StatusCode.OK.value[0]
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
CODE_NAMES = {s.value[0]: s.name for s in grpc.StatusCode}

ALL_FAMILIES = frozenset(FAMILIES)


class Refused(Exception):  # noqa: N818 - an answer to a band, not a bug
    """A batch answered with a code other than OK, before or instead of being stored."""

    def __init__(self, code: int, reason: str, *, retry_after_ms: int = 0, expected_seq: int | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        self.expected_seq = expected_seq


# limits


class TokenBucket:
    """`rate` tokens a second up to `burst`. `take` may drive the level below zero (charging after the
    fact: samples are known only after decoding); a negative level refuses until it has refilled."""

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_ms(self, need: float) -> int:
        """0 if `need` tokens are available now, else the milliseconds until they are."""
        self._refill()
        if self.level >= need:
            return 0
        return max(1, int(1000 * (need - self.level) / self.rate + 0.999))

    def take(self, n: float) -> None:
        self._refill()
        self.level -= n


class Limits:
    """Per-device rate limits (token buckets); the size limits are checked inline in `Pipeline`.

    With `take` (the store's `take_tokens`, through a store thread) the buckets live in the store, so
    they hold for the device across every process and gateway on it: a band that reconnects elsewhere
    keeps its level instead of starting a fresh burst (one small write a batch, only with a limit set).
    Without, each process keeps its own."""

    def __init__(self, config: GatewayConfig, take: Callable[..., Awaitable[float]] | None = None):
        self.config = config
        self.take = take
        self._batches: dict[int, TokenBucket] = {}
        self._samples: dict[int, TokenBucket] = {}

    async def admit(self, device_id: int) -> None:
        """Take one batch token, or refuse naming the limit that is exhausted."""
        c = self.config
        for name, rate, burst, need, local in (
            ("samples", c.rate_samples_per_s, c.rate_burst_samples, 0, self._samples),
            ("batches", c.rate_batches_per_s, c.rate_burst_batches, 1, self._batches),
        ):
            if not rate:
                continue
            if self.take is not None:
                wait = _wait_ms(await self.take(device_id, name, rate, burst, need, need))
            else:
                bucket = local.setdefault(device_id, TokenBucket(rate, burst))
                wait = bucket.wait_ms(need)
                if not wait:
                    bucket.take(need)
            if wait:
                raise Refused(
                    RESOURCE_EXHAUSTED,
                    f"rate_{name}_per_s = {rate:g} exceeded for this device",
                    retry_after_ms=wait,
                )

    async def charge_samples(self, device_id: int, n: int) -> None:
        c = self.config
        if not c.rate_samples_per_s:
            return
        if self.take is not None:
            await self.take(device_id, "samples", c.rate_samples_per_s, c.rate_burst_samples, -math.inf, n)
        else:
            self._samples[device_id].take(n)


def _wait_ms(wait_s: float) -> int:
    return 0 if wait_s <= 0 else max(1, math.ceil(wait_s * 1000))


async def take_room(room: asyncio.Semaphore, config: GatewayConfig, limit: str) -> None:
    """A place in a bounded queue: at once if there is one, else within `overload_wait_ms`, else the
    batch is refused with RESOURCE_EXHAUSTED naming `limit` and the retry hint."""
    try:
        if room.locked():  # wait_for costs a task: only when there is something to wait for
            await asyncio.wait_for(room.acquire(), config.overload_wait_ms / 1000)
        else:
            await room.acquire()
    except TimeoutError:
        raise Refused(
            RESOURCE_EXHAUSTED, f"overloaded: {limit} is full", retry_after_ms=config.retry_after_ms
        ) from None


# store threads


class StoreThread:
    """One store object used from one dedicated thread (store objects are not thread-safe).

    start/shutdown: start opens the store on its thread (a second start is a no-op); shutdown lets queued
    calls finish, then closes the store; it is safe without start, and twice.
    """

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"bandgate-{self.name}"
            )
            self._executor.submit(self.store.open).result()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        if self._executor is None:
            raise StoreUnavailable(f"the store {self.name} is not running")
        return self._executor.submit(fn, *args, **kwargs)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` (a method of `self.store`) on this thread."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.submit(self.store.close)
            executor.shutdown(wait=True)


class StoreWriter(StoreThread):
    """The single writer: every commit runs on its thread, at most `commit_queue` queued or running. A
    full queue makes a batch wait up to `overload_wait_ms`, then it is refused with RESOURCE_EXHAUSTED: a
    slow store slows the bands down instead of growing memory here.

    Group commit: commits are queued here, and each one also submits a drain job to the thread. A drain
    takes everything queued (up to `GROUP_MAX` items) and stores it with one `store.commit_many` (one
    transaction, one fsync); the later drain jobs of commits it took find less, or nothing, to do. So a
    commit is always stored by the time its own drain job has run (before a `shutdown`'s close), and
    other writer calls (retention) still run between groups.
    """

    GROUP_MAX = 64  # commits in one transaction: bounds how long one group holds the write lock

    def __init__(self, store: Store, config: GatewayConfig, metrics: Metrics):
        super().__init__(store, "writer")
        self.config = config
        self.metrics = metrics
        self._room: asyncio.Semaphore | None = None
        self._queued = 0
        self._pending: collections.deque[tuple[CommitItem, concurrent.futures.Future[CommitResult]]] = (
            collections.deque()
        )
        self._pending_lock = threading.Lock()

    def start(self) -> None:
        self._room = self._room or asyncio.Semaphore(self.config.commit_queue)
        super().start()

    async def commit(self, item: CommitItem) -> CommitResult:
        """What `store.commit(...)` returns (or raises) for `item`, stored in a group on the writer thread,
        once there is room in the queue; it returns only after the group's transaction has committed."""
        room = self._room
        if room is None:
            raise StoreUnavailable("the store writer is not running")
        await take_room(room, self.config, f"commit_queue = {self.config.commit_queue}")
        future: concurrent.futures.Future[CommitResult] = concurrent.futures.Future()
        entry = (item, future)
        with self._pending_lock:
            self._pending.append(entry)
        try:
            self.submit(self._drain)
        except BaseException:
            with self._pending_lock, contextlib.suppress(ValueError):
                self._pending.remove(entry)
            room.release()
            raise
        self._queued += 1
        self.metrics.commit_queue.set(self._queued)
        loop = asyncio.get_running_loop()
        # Room is given back when the commit ends, not when its waiter is cancelled: the bound stays true.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, room))
        return await asyncio.wrap_future(future)

    def _drain(self) -> None:
        """On the writer thread: commit what is queued as one group; each waiter gets its own outcome."""
        with self._pending_lock:
            taken = [self._pending.popleft() for _ in range(min(len(self._pending), self.GROUP_MAX))]
        # a waiter cancelled before its group started is not committed (as an executor job would not run)
        group = [(item, future) for item, future in taken if future.set_running_or_notify_cancel()]
        if not group:
            return
        try:
            outcomes = self.store.commit_many([item for item, _ in group])
        except BaseException as e:  # a bug, not a store state: no waiter is left hanging
            for _, future in group:
                future.set_exception(e)
            raise
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _release(self, room: asyncio.Semaphore) -> None:
        self._queued -= 1
        self.metrics.commit_queue.set(self._queued)
        room.release()


# the pipeline


class Pipeline:
    """Turns one batch into one Ack. Owns the compute workers (`config.compute_processes` worker
    processes, which commit what they compute, or with 0 that many compute threads in this process,
    each with a store object for reading device rows) and the store writer thread (the compute threads'
    commits, and retention).

    start/shutdown: start opens the store, then starts the workers; shutdown (safe without start, and
    twice) waits for compute and commits in flight, then stops the workers and closes the store.
    """

    def __init__(
        self,
        config: GatewayConfig,
        store: Store,
        open_rows: Callable[[], Store],
        consent: ConsentGate,
        metrics: Metrics,
        on_commit: Callable[[], None] = lambda: None,
        sealing_dir: str = "",
    ):
        self.config = config
        self.sealing_dir = sealing_dir  # compute workers seal with this state dir's keys ("" = in clear)
        self.consent = consent
        self.metrics = metrics
        self.writer = StoreWriter(store, config, metrics)
        self.limits = Limits(config, self._take_tokens if config.shared_limits else None)
        # Each compute thread reads device rows on a store object of its own (`open_rows()`), in the
        # same job as the batch's compute: one thread hop less per batch, and a duplicate is still
        # answered while the writer is busy (WAL: a read sees every commit that returned before it).
        self._open_rows = open_rows
        self._rows_local = threading.local()
        self._rows_opened: list[Store] = []
        self._rows_lock = threading.Lock()
        self.on_commit = on_commit
        self.store_down: Callable[[], None] = lambda: None  # health's side (gateway/storewatch.py)
        self._compute: concurrent.futures.ThreadPoolExecutor | None = None
        self.workers: WorkerPool | None = None
        self._computing = 0
        self._compute_room = asyncio.Semaphore(config.compute_queue)
        # First batches of new streams in compute at once (see `_run_compute`): OPENING_PER_WORKER a worker
        # process, so that an established stream's batch waits behind few device-state loads; one running
        # and one queued batch a compute thread. In a 2,000-band storm on 2 cores (BENCHMARKS.md, "Opening
        # turns") the observers' ack p99 was 74-251 ms (median 113) with 8 turns, 96-395 ms (median 268)
        # with 16 and 276-441 ms with 128, the storm no longer with 8.
        c = config
        self._opening = asyncio.Semaphore(
            c.compute_processes * OPENING_PER_WORKER if c.compute_processes else 2 * c.compute_threads
        )

    async def start(self) -> None:
        if self._compute is not None or self.workers is not None:
            return
        await asyncio.to_thread(self.writer.start)  # opens (and migrates) the store before any reader
        c = self.config
        if c.compute_processes:
            workers = WorkerPool(
                c.compute_processes,
                c.store,
                c.max_decompressed_bytes,
                self._workers_changed,
                deadline_s=c.compute_deadline_s,
                sealing_dir=self.sealing_dir,
                key_schema=c.key_schema,
            )
            await workers.start()
            self.workers = workers
        else:
            self._compute = concurrent.futures.ThreadPoolExecutor(
                c.compute_threads, thread_name_prefix="bandgate-compute"
            )

    def _workers_changed(self, running: int, lost: bool) -> None:
        self.metrics.compute_workers.set(running)
        if lost:
            self.metrics.worker_restarts.inc()

    async def shutdown(self) -> None:
        workers, self.workers = self.workers, None
        if workers is not None:
            await workers.shutdown(self.config.shutdown_grace_s)
        await asyncio.to_thread(self._shutdown_threads)

    def _shutdown_threads(self) -> None:
        compute, self._compute = self._compute, None
        if compute is not None:
            compute.shutdown(wait=True)
        with self._rows_lock:
            opened, self._rows_opened = self._rows_opened, []
        for store in opened:  # their threads have ended with the executor
            store.close()
        self.writer.shutdown()

    async def handle(
        self, device_id: int, batch: batch_pb2.Batch, *, established: bool = True
    ) -> ingest_pb2.Ack:
        """The one Ack for `batch`, received on a stream authenticated as `device_id`. `established`: the
        stream has had a batch stored already (False: its first batch, which waits for an opening turn
        before it enters the compute queue; see `_run_compute`)."""
        started = time.monotonic()
        self.metrics.bytes_in.inc(len(batch.payload))
        try:
            ack = await self._handle(device_id, batch, established)
        except Refused as e:
            ack = _ack(batch, e.code, e.reason, retry_after_ms=e.retry_after_ms)
            if e.expected_seq is not None:
                ack.expected_seq = e.expected_seq
        self.metrics.batches.labels(CODE_NAMES.get(ack.code, str(ack.code))).inc()
        self.metrics.ack_latency.observe(time.monotonic() - started)
        # A stored batch is counted in the metrics and logged at debug level (thousands a second is
        # normal); a refused one is logged at info with its reason.
        level = logging.DEBUG if ack.code == OK else logging.INFO
        if not log.isEnabledFor(level):
            return ack
        log.log(
            level,
            "batch answered",
            extra={
                "fields": {
                    "event": "ack",
                    "device": device_key(batch.device_id),
                    "boot_id": batch.boot_id,
                    "first_seq": batch.first_seq,
                    "last_seq": batch.last_seq,
                    "code": CODE_NAMES.get(ack.code, ack.code),
                    "reason": ack.reason,
                    "bad_frames": len(ack.frame_errors),
                    "ms": round(1000 * (time.monotonic() - started), 2),
                }
            },
        )
        return ack

    async def _handle(self, device_id: int, batch: batch_pb2.Batch, established: bool) -> ingest_pb2.Ack:
        # authenticate: the envelope must name the stream's device (frames are checked in compute)
        if batch.device_id != device_id:
            raise Refused(
                PERMISSION_DENIED,
                f"batch names device {batch.device_id:016x}, the stream is authenticated as {device_id:016x}",
            )

        # consent gate, on every batch: the families its owner consents to now (and the profile they
        # may use); nothing consented, or a minor without a guardian's consent, is not processed at all
        allowed = self.consent.decide(device_id)
        if not allowed:
            raise Refused(PERMISSION_DENIED, allowed.reason or NO_CONSENT)

        # limits, before anything is decompressed
        if batch.frame_count > self.config.max_frames_per_batch:
            raise Refused(
                RESOURCE_EXHAUSTED,
                f"frame_count {batch.frame_count} over max_frames_per_batch = "
                f"{self.config.max_frames_per_batch}",
            )
        await self.limits.admit(device_id)

        # In a compute worker: dedup on the envelope (a duplicate is acked again, never decompressed),
        # then decompress, decode, features of the consented families, the store's checks; raw arrays
        # stay there
        allow_gap = bool(batch.flags & batch_pb2.BATCH_FLAG_DATA_DROPPED_BEFORE)
        outcome = await self._run_compute(device_id, batch, allowed, allow_gap, established)
        if isinstance(outcome, int):
            return _ack(batch, ALREADY_EXISTS, "already stored", acked_seq=outcome)
        computed, committed = outcome
        await self.limits.charge_samples(device_id, computed.n_samples)
        self.metrics.samples.inc(computed.n_samples)
        self.metrics.bytes_out.inc(computed.bytes_out)
        for _, _, reason in computed.frame_errors:
            self.metrics.decode_errors.labels(reason.partition(":")[0]).inc()

        # commit: records + state + high-water in one transaction; a worker process has committed already
        if isinstance(committed, CommitResult):
            result = committed
        else:  # a compute thread's item, for the writer thread
            try:
                result = await self._store_call(self.writer.commit, committed)
            except SequenceError as e:
                raise Refused(FAILED_PRECONDITION, str(e), expected_seq=e.expected_seq) from None
        if result.duplicate:
            return _ack(batch, ALREADY_EXISTS, "already stored", acked_seq=result.high_water)
        if computed.state_reset:  # counted once it took effect: a refused or repeated batch changed nothing
            self.metrics.state_resets.inc()
            fields = {"event": "state_reset", "device": device_key(device_id), "reason": computed.state_reset}
            log.error(
                "the device's stored state did not load: its stream (or the failing family's) started afresh",
                extra={"fields": fields},
            )
        stored = sum(c is not None for c in result.cursors)
        self.metrics.records.inc(stored)
        if stored:
            self.on_commit()

        # ack
        ack = _ack(batch, OK, "", acked_seq=result.high_water)
        for index, seq, reason in computed.frame_errors:
            ack.frame_errors.add(index=index, seq=seq, reason=reason)
        return ack

    def _rows(self) -> Store:
        """This compute thread's store object for reading device rows (opened on first use)."""
        store = getattr(self._rows_local, "store", None)
        if store is None:
            store = self._open_rows()
            store.open()
            with self._rows_lock:
                self._rows_opened.append(store)
            self._rows_local.store = store
        return store

    def _in_thread(
        self, device_id: int, batch: batch_pb2.Batch, allowed: Processing, allow_gap: bool
    ) -> int | tuple[Computed, CommitItem]:
        from decoder.features import StateCache  # thread mode only: the kernels load in this process
        from gateway.compute import load_and_compute

        cache = getattr(self._rows_local, "cache", None)
        if cache is None:
            cache = self._rows_local.cache = StateCache()
        return load_and_compute(
            self._rows(), device_id, batch, allowed, allow_gap, self.config.max_decompressed_bytes, cache
        )

    async def _run_compute(
        self,
        device_id: int,
        batch: batch_pb2.Batch,
        allowed: Processing,
        allow_gap: bool,
        established: bool = True,
    ) -> int | tuple[Computed, CommitItem | CommitResult]:
        # A new stream's first batch (a device-state load) first waits for one of a few opening turns,
        # outside the compute queue: after a restart 2,000 reconnecting bands send theirs within a second
        # or two, and in arrival order they sat in the compute queue in front of the bands that were
        # already streaming (whose batches waited 0.5-5 s behind them; BENCHMARKS.md, "Identity and
        # TLS"). Now at most a few are in compute at once, and established streams' batches go as
        # before. The wait holds no room in the compute queue (so established streams are not refused
        # for the newcomers) and no more memory than the one message per stream grpc would hold unread.
        opening = None if established else self._opening
        if opening is not None:
            await opening.acquire()
        workers, threads = self.workers, self._compute
        room = self._compute_room
        try:
            if workers is None and threads is None:
                raise Refused(UNAVAILABLE, "the gateway is shutting down")
            # Bounded: every batch waiting here holds its payload. One batch a stream is in flight, so this
            # fills only when more streams send at once than the workers keep up with.
            await take_room(room, self.config, f"compute_queue = {self.config.compute_queue}")
        except BaseException:
            if opening is not None:
                opening.release()
            raise
        self._computing += 1
        self.metrics.compute_queue.set(self._computing)
        released = False

        def release() -> None:
            """When the compute job is over, not when this handler stops waiting for it (a cancelled
            stream's job still runs to its end and holds its place in the queue until then)."""
            nonlocal released
            if not released:
                released = True
                self._computing -= 1
                self.metrics.compute_queue.set(self._computing)
                room.release()
                if opening is not None:
                    opening.release()

        try:
            if workers is not None:
                key = (device_id, batch.boot_id, batch.first_seq)
                return await workers.run(
                    key, device_id, batch.SerializeToString(), allowed, allow_gap, on_done=release
                )
            assert threads is not None
            try:
                job = threads.submit(self._in_thread, device_id, batch, allowed, allow_gap)
            except BaseException:
                release()
                raise
            loop = asyncio.get_running_loop()
            job.add_done_callback(lambda _: loop.call_soon_threadsafe(release))
            return await asyncio.wrap_future(job)
        except WorkerLost as e:
            log.warning("compute worker lost", extra={"fields": {"event": "worker_lost", "error": str(e)}})
            raise Refused(
                UNAVAILABLE,
                "a compute worker stopped: nothing stored",
                retry_after_ms=self.config.retry_after_ms,
            ) from None
        except PoisonBatch as e:
            log.error("batch not retried", extra={"fields": {"event": "poison_batch", "error": str(e)}})
            raise Refused(INTERNAL, f"not processed: {e}") from None
        except SequenceError as e:
            raise Refused(FAILED_PRECONDITION, str(e), expected_seq=e.expected_seq) from None
        except BatchError as e:
            self.metrics.decode_errors.labels(e.code.value).inc()
            code = RESOURCE_EXHAUSTED if e.code is BatchErrorCode.TOO_LARGE else INVALID_ARGUMENT
            raise Refused(code, str(e)) from None
        except (StoreError, ValueError) as e:  # reading the row, or a compute bug's ValueError
            raise self._store_refusal(e) from None
        except Exception as e:  # a bug: this batch is answered, the stream and the gateway go on
            fields = {"event": "compute_failed", "error": type(e).__name__}
            log.error("compute failed", extra={"fields": fields})
            raise Refused(INTERNAL, "the batch could not be processed") from None

    async def _take_tokens(self, *args: Any) -> float:
        """`Store.take_tokens` on the writer's thread, its failures mapped as a commit's."""
        return await self._store_call(self.writer.call, self.writer.store.take_tokens, *args)

    async def _store_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store call with its failures mapped: unavailable → UNAVAILABLE (nothing stored, not acked)."""
        try:
            return await fn(*args, **kwargs)
        except SequenceError:
            raise
        except (StoreError, ValueError) as e:
            raise self._store_refusal(e) from None

    def _store_refusal(self, e: Exception) -> Refused:
        if isinstance(e, StoreUnavailable):
            self.store_down()
            log.warning(
                "store unavailable", extra={"fields": {"event": "store_unavailable", "error": str(e)}}
            )
            return Refused(
                UNAVAILABLE, "storage unavailable: nothing stored", retry_after_ms=self.config.retry_after_ms
            )
        # Store messages are ours; another error (a compute bug's ValueError) is logged by type only.
        error = str(e) if isinstance(e, StoreError) else type(e).__name__
        log.error("store refused a batch", extra={"fields": {"event": "store_error", "error": error}})
        return Refused(INTERNAL, "the store refused the batch")


def _ack(
    batch: batch_pb2.Batch,
    code: int,
    reason: str,
    *,
    acked_seq: int | None = None,
    retry_after_ms: int = 0,
) -> ingest_pb2.Ack:
    ack = ingest_pb2.Ack(
        device_id=batch.device_id,
        boot_id=batch.boot_id,
        first_seq=batch.first_seq,
        last_seq=batch.last_seq,
        code=code,
        reason=reason,
        retry_after_ms=retry_after_ms,
    )
    if acked_seq is not None:
        ack.acked_seq = acked_seq
        ack.has_acked_seq = True
    return ack
