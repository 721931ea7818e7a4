"""A batch's compute job: decompress (bounded), decode, features of the consented families, the store's
encoding.

The only place raw samples exist. It runs in a compute worker process (`gateway/workers.py`) or, with
`compute_processes = 0`, on a compute thread of the serving process; the serving process itself never
imports this module otherwise, and so never loads the kernels (or Numba).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import replace

import numpy as np
import zstandard

from bandgate.v1 import batch_pb2
from decoder.batch import BatchDecompressor
from decoder.features import SELF_CONTAINED, DeviceState, StateCache, process
from decoder.frames import FrameStatus
from gateway.computed import Computed
from gateway.envelope import open_batch
from gateway.privacy.consent import EVERYTHING, Processing
from gateway.store import Store
from gateway.store.base import CommitItem, check_sequence

_local = threading.local()


def _decompressor(max_bytes: int) -> BatchDecompressor:
    """One decompressor per compute thread (zstandard objects are not thread-safe)."""
    d = getattr(_local, "decompressor", None)
    if d is None or d.max_bytes != max_bytes:
        d = _local.decompressor = BatchDecompressor(max_bytes=max_bytes)
    return d


def compute(
    batch: batch_pb2.Batch,
    state: bytes | None,
    max_decompressed_bytes: int,
    cache: StateCache | None = None,
    allowed: Processing = EVERYTHING,
) -> Computed:
    """Decompress (bounded), decode, check frames against the envelope, run the feature path for the
    families and profile `allowed` (the previous state through `cache` when given: a worker's own, see
    `StateCache`)."""
    opened = open_batch(batch, _decompressor(max_decompressed_bytes))
    decoded = opened.decoded
    if opened.frame_errors:
        # Frames that contradict the envelope (another device's, say) are bad frames: mask them out.
        bad = np.array([i for i, _ in opened.frame_errors], np.int64)
        status = decoded.status.copy()
        status[bad[status[bad] == FrameStatus.OK]] = FrameStatus.MALFORMED
        decoded = replace(decoded, status=status)
    previous, reset = _previous(batch.device_id, state, cache)
    records, new_state = process(
        decoded,
        previous,
        allowed.families,
        stride_m=allowed.stride_m,
        profile_version=allowed.profile_version,
    )
    new_bytes = new_state.to_bytes()
    if cache is not None:
        cache.keep(batch.device_id, new_bytes, new_state)
    return Computed(
        records=records,
        state=new_bytes,
        frame_errors=[(i, batch.first_seq + i, reason) for i, reason in opened.frame_errors],
        n_samples=decoded.n_samples,
        bytes_out=int(zstandard.get_frame_parameters(batch.payload).content_size),  # checked by open_batch
        state_reset=reset,
    )


def _previous(device_id: int, state: bytes | None, cache: StateCache | None) -> tuple[DeviceState, str]:
    """The device's stored feature state, or a new one and why. A state that does not load (damaged, or
    one the kernels' load checks refuse) would refuse every later batch of the device, for ever: the
    stream starts afresh instead, as after a gap (the open epoch, minute and sleep period are lost,
    nothing stored is), and the answer says why for the log (the load checks' messages carry no stored
    value). Where only a self-contained kernel's state (steps) is at fault, only it restarts: the open
    sleep period, epochs and day go on."""
    if not state:
        return DeviceState(device_id), ""
    try:
        return (cache.load(device_id, state) if cache is not None else DeviceState.from_bytes(state)), ""
    except ValueError as e:
        reason = str(e) or "ValueError"
    try:
        rest = DeviceState.from_bytes(state, without=SELF_CONTAINED)
    except ValueError:
        return DeviceState(device_id), reason
    return rest, f"{reason} (steps restarts; the other families go on)"


def load_and_compute(
    rows: Store,
    device_id: int,
    batch: batch_pb2.Batch,
    allowed: Processing,
    allow_gap: bool,
    max_decompressed_bytes: int,
    cache: StateCache | None = None,
) -> int | tuple[Computed, CommitItem]:
    """A batch's whole compute job, in a worker process or a compute thread: the device's row (read on
    `rows`, the caller's own store connection) and the sequence check (`SequenceError`); then, unless the
    batch is a duplicate (its boot's high-water is returned), `compute` from the row's state for the
    consented families (`allowed`), and the store's database-free checks and encoding (`Store.prepare`),
    so that the single writer does only what needs the database."""
    row = rows.device(device_id)
    same_boot = row is not None and row.boot_id == batch.boot_id
    high_water = row.last_seq if same_boot and row is not None else None
    if check_sequence(
        high_water, device_id, batch.boot_id, batch.first_seq, batch.last_seq, allow_gap=allow_gap
    ):
        assert high_water is not None
        return high_water
    previous = row.state if row is not None else None
    computed = compute(batch, previous, max_decompressed_bytes, cache, allowed)
    item = CommitItem(
        batch.device_id,
        batch.boot_id,
        batch.first_seq,
        batch.last_seq,
        computed.state,
        computed.records,
        allow_gap,
        ownership=allowed.ownership,
    )
    with contextlib.suppress(ValueError):  # commit_many finds it again and refuses the batch
        item = rows.prepare(item)
    # The answer crosses to the serving process, which needs the item (the consented records, in the
    # store's encoded form once prepared), not the records as dicts: unpickling those was ~40 % of the
    # answer's cost there. Records of families without consent were never made.
    return replace(computed, records=[]), item
