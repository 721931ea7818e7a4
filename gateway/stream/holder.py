"""The name a gateway's drainer holds outbox leases under (PostgreSQL, `outbox_leases`), kept across
restarts, so a gateway killed mid-page takes its devices back as soon as it is up again, instead of
leaving them unpublished until the lease runs out (`OUTBOX_LEASE_S`, 120 s).

A name is `<gateway id>-<slot>`: the gateway id is made once per state dir (`drainer-id`, random), and the
slot is the first `drainer-<k>.lock` in the state dir this process can `flock`. The kernel drops the lock
when the process dies, however it dies, so a name is never held by two live processes: a second gateway
on the same state dir (or a serving process beside the first) takes the next slot, and a restarted one
finds its slot free again. Two holders of one name would both publish a device, out of order; a lock
that is not free is therefore never waited for or broken. The store enforces it too, whatever the files
say (a state dir copied to a second host, a file system whose locks do not hold): PostgreSQL keeps a
name to one live drainer (`PostgresStore.name_drainer`), and another is left with a random name.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import IO

from gateway.filelock import try_flock
from gateway.security.pki import PkiError, write_public

ID_FILE = "drainer-id"
MAX_SLOTS = 64


class DrainerName:
    """A claimed name, held while this object lives (its open lock file is the claim): `close()`, its
    collection or the process's end frees the slot."""

    def __init__(self, name: str, lock: IO[bytes]):
        self.name = name
        self._lock: IO[bytes] | None = lock

    def close(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # closing the file drops the flock

    def __repr__(self) -> str:
        return f"DrainerName({self.name})"


def _gateway_id(state_dir: Path) -> str:
    """This state dir's id, made on first use: staged, fsynced and linked into place (`write_public`), so
    a second process starting at the same moment reads the one that won, and a power cut leaves the file
    whole or absent."""
    path = state_dir / ID_FILE
    if not path.exists():
        with contextlib.suppress(PkiError):  # another process made it first
            write_public(path, (secrets.token_hex(8) + "\n").encode(), overwrite=False)
    text = path.read_text().strip()
    if len(text) != 16 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{path} is not a drainer id (16 hex digits); remove it to make a new one")
    return text


def claim_drainer_name(state_dir: Path) -> DrainerName:
    """The first free slot of this state dir's gateway id; RuntimeError when all MAX_SLOTS are held."""
    state_dir.mkdir(parents=True, exist_ok=True)
    gateway = _gateway_id(state_dir)
    for slot in range(MAX_SLOTS):
        lock = try_flock(state_dir / f"drainer-{slot}.lock")
        if lock is not None:
            return DrainerName(f"{gateway}-{slot}", lock)
    raise RuntimeError(f"all {MAX_SLOTS} drainer slots of {state_dir} are held by running processes")


__all__ = ["DrainerName", "claim_drainer_name"]
