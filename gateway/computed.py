"""What a compute job answers (`Computed`), in a module of its own: a compute worker builds it and the
serving process unpickles it, so neither loads the other's modules for it (the kernels and Numba stay out
of the serving process, grpc and the pipeline out of the workers)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Computed:
    """What leaves a compute worker (process or thread): records and state bytes; raw arrays never do."""

    records: list[dict]
    state: bytes
    frame_errors: list[tuple[int, int, str]]  # (index, seq, reason)
    n_samples: int
    bytes_out: int
    state_reset: str = ""  # why the stored state did not load (so the stream started afresh); value-free


__all__ = ["Computed"]
