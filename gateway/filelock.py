"""An `flock` tried, never waited for: the lock the kernel drops when its holder dies, however it dies
(the drainer's name in the state dir, gateway/stream/holder.py; a SQLite outbox's one drainer)."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO


def try_flock(path: Path | str) -> IO[bytes] | None:
    """The open lock file, holding an exclusive `flock` on `path` (created if absent) until it is closed
    or collected; None when another open file holds it. Other OS errors (ENOLCK) are raised."""
    lock = open(path, "ab")  # noqa: SIM115 (returned open: the file is the lock)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    except BaseException:
        lock.close()
        raise
    return lock


__all__ = ["try_flock"]
