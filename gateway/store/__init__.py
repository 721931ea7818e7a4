"""Where feature records go: one small contract (`base.Store`), one module a sink, chosen by URL.

```python
with open_store("sqlite:////var/lib/bandgate/features.db") as store:
    result = store.commit(device_id, boot_id, first_seq, last_seq, state.to_bytes(), records)
```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.store.base import (
    FAMILIES,
    AuditConflict,
    CommitResult,
    DeviceRow,
    SchemaVersionError,
    Sealer,
    SequenceError,
    Store,
    StoreError,
    StoreUnavailable,
)
from gateway.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from gateway.store.postgres import PostgresStore

__all__ = [
    "FAMILIES",
    "AuditConflict",
    "CommitResult",
    "DeviceRow",
    "PostgresStore",
    "SchemaVersionError",
    "SequenceError",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "open_store",
    "outbox_url",
    "store_for_url",
]


def _postgres(url: str, sealer: Sealer | None) -> Store:
    from gateway.store.postgres import PostgresStore

    return PostgresStore.from_url(url, sealer)


# PostgreSQL's module (and psycopg, ~0.13 s) is imported only for its URLs: every compute worker and
# serving process on the SQLite default starts that much sooner.
_SCHEMES: dict[str, Callable[[str, Sealer | None], Store]] = {
    "sqlite": SqliteStore.from_url,
    "postgresql": _postgres,
    "postgres": _postgres,
}


def __getattr__(name: str) -> Any:
    if name == "PostgresStore":
        from gateway.store.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"PostgresStore"})


def store_for_url(url: str, sealer: Sealer | None = None) -> Store:
    """The store a URL names, not yet opened, sealing values and state with `sealer` (encryption at rest;
    None: in clear); a bad URL raises ValueError before anything starts."""
    scheme = url.partition("://")[0]
    if scheme not in _SCHEMES:
        raise ValueError(f"store URL {url!r}: scheme must be one of {sorted(_SCHEMES)}")
    return _SCHEMES[scheme](url, sealer)


def outbox_url(url: str) -> str:
    """`url` with the outbox on (`outbox=1`): every store object made from it, in this process or a
    compute worker's, writes outbox entries for the feature stream in its commits."""
    if "outbox=" in url.partition("?")[2]:
        return url
    return f"{url}{'&' if '?' in url else '?'}outbox=1"


def open_store(url: str, sealer: Sealer | None = None) -> Store:
    """An open store for `url`: `sqlite:///relative.db` (three slashes) or `sqlite:////abs/path.db`
    (four), with an optional `?busy_timeout_ms=N`; or `postgresql://user@host:port/db?schema=bandgate`
    (postgres.py). `with open_store(url) as store:` closes it after."""
    store = store_for_url(url, sealer)
    store.open()
    return store
