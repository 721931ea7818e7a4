"""What a feature record is named by, without the kernels: the serving process imports this, not Numba
(its compute runs in worker processes, and Numba with LLVM costs ~60 MB of memory to import)."""

from __future__ import annotations

# Every family a record can have (docs/features.md); the store accepts exactly these.
FAMILIES = ("steps", "activity", "heart", "sleep", "night", "wear", "day", "distance")


def device_key(device_id: int) -> str:
    """How a device is named in records: its 64-bit ID as 16 lower-case hex digits."""
    return f"{device_id:016x}"
