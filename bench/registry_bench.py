"""What one registry change costs the gateway as the fleet grows.

`python -m bench.registry_bench 10000 100000 [--propagation] [--postgres postgresql://127.0.0.1:5432/test]`

Every policy change (a registration, a revocation, a consent decision) makes each gateway read what
changed (`Store.registry_delta`, laid over the snapshot it holds by `merge_registry`) and re-index the
registry (`Policy` and the consent index, on the registry's store thread); with no usable change log it
re-reads the whole registry (`Store.registry_snapshot`), as every change did before the log. Per fleet
size: the full rebuild (snapshot read and the two indexes), beside it a baseline measured in the same
run (the same rows fetched as plain tuples by the sqlite3 module, the least any full read can cost), and
the cost of one revocation through the change log (delta read, merge, the policy index, the consent
index updated by the devices touched), with its ratio to the full rebuild. SQLite in a temporary
directory; each device is a principal with a credential, an ownership and one consent decision.

`--propagation` adds what the revocation promise (open streams end within 1 s) rests on, end to end:
two TLS gateways (`run_server`) on one store with the fleet registered, a device revoked through A (as
the admin API does), and the time until B serves a policy in which it is revoked (B's 0.5-s poll, then
its read), the median of several; beside it the same two gateways reading every change whole
(`registry_delta` answering None: the gateway before the change log), and their ratio. With `--postgres`
also on PostgreSQL, where B is woken by the store's notice of A's commit: beside it the same gateways
finding each change by their version poll alone, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.privacy.consent import ConsentIndex
from gateway.security.audit import AuditEvent
from gateway.security.policy import Policy
from gateway.server import run_server
from gateway.store import SqliteStore, Store, open_store
from gateway.store.base import CredentialRow, RegistryOp, merge_registry

# what registry_snapshot reads
TABLES = (
    "principals",
    "credentials",
    "bindings",
    "grants",
    "ownerships",
    "consent",
    "guardians",
    "profiles",
    "totp",
)


def fleet_ops(devices: int) -> list[RegistryOp]:
    """The registry rows of `devices` registered bands, as the admin API would write them."""
    ops = []
    for i in range(devices):
        name = f"{i:016x}"
        credential = CredentialRow(f"x509:{i:064x}", "device", name, f"{i:x}", 0, "active", 0)
        ops += [
            RegistryOp("principal", kind="device", name=name),
            RegistryOp("credential", credential=credential),
            RegistryOp("ownership", device=name, ownership=f"o-{i:016x}"),
            RegistryOp(
                "consent", device=name, ownership=f"o-{i:016x}", family="steps", granted=True, actor="owner"
            ),
        ]
    return ops


def _best_ms(work, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


@contextlib.contextmanager
def _fleet_store(devices: int, postgres: str | None) -> Iterator[tuple[Store, Callable[[], None]]]:
    """A store holding `devices` registered bands, and the baseline: its registry tables fetched as
    plain tuples by the driver. SQLite in a temporary directory, or a schema of its own in the
    PostgreSQL database `postgres`, dropped afterwards."""
    if postgres is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "gw.db"
            conn = sqlite3.connect(path)
            try:
                with SqliteStore(path) as store:
                    store.registry_apply(fleet_ops(devices))

                    def fetch_all() -> None:
                        for table in TABLES:
                            conn.execute(f"SELECT * FROM {table}").fetchall()  # fixed table names

                    yield store, fetch_all
            finally:
                conn.close()
        return
    import psycopg
    from psycopg import sql

    schema = f"registry_bench_{secrets.token_hex(6)}"
    sep = "&" if "?" in postgres else "?"
    with psycopg.connect(postgres, autocommit=True) as conn:
        try:
            with open_store(f"{postgres}{sep}schema={schema}") as store:
                store.registry_apply(fleet_ops(devices))
                conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))

                def fetch_all() -> None:
                    for table in TABLES:
                        conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table))).fetchall()

                yield store, fetch_all
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def measure(devices: int, repeats: int = 3, postgres: str | None = None) -> dict[str, float]:
    """The costs, in ms (best of `repeats`), of one rebuild and of one change through the change log
    with `devices` registered, on SQLite or on the PostgreSQL database `postgres`."""
    with _fleet_store(devices, postgres) as (store, fetch_all):
        snapshot = store.registry_snapshot()
        figures = {
            "devices": devices,
            "snapshot_ms": _best_ms(store.registry_snapshot, repeats),
            "policy_ms": _best_ms(lambda: Policy(snapshot), repeats),
            "consent_index_ms": _best_ms(lambda: ConsentIndex(snapshot), repeats),
        }
        # one revocation, read as a gateway holding `snapshot` reads it
        store.registry_apply([RegistryOp("revoke", kind="device", name=f"{devices // 2:016x}")])
        delta = store.registry_delta(snapshot)
        assert delta is not None and len(delta.subjects) == 1, "the change log gives the revocation"
        merged = merge_registry(snapshot, delta)
        figures["delta_read_ms"] = _best_ms(lambda: store.registry_delta(snapshot), repeats)
        figures["merge_ms"] = _best_ms(lambda: merge_registry(snapshot, delta), repeats)
        figures["delta_policy_ms"] = _best_ms(lambda: Policy(merged), repeats)
        held_index = ConsentIndex(snapshot)
        assert held_index.updated(delta).devices == ConsentIndex(merged).devices
        figures["delta_consent_index_ms"] = _best_ms(lambda: held_index.updated(delta), repeats)
        figures["baseline_fetchall_ms"] = _best_ms(fetch_all, repeats)
    figures["rebuild_ms"] = figures["snapshot_ms"] + figures["policy_ms"] + figures["consent_index_ms"]
    figures["rebuild_vs_fetchall"] = figures["rebuild_ms"] / figures["baseline_fetchall_ms"]
    figures["change_ms"] = sum(
        figures[k] for k in ("delta_read_ms", "merge_ms", "delta_policy_ms", "delta_consent_index_ms")
    )
    figures["change_vs_rebuild"] = figures["change_ms"] / figures["rebuild_ms"]
    return {k: round(v, 2) for k, v in figures.items()}


@contextlib.contextmanager
def _no_change_log():
    """Every registry change read whole, as a gateway did before the change log (the baseline)."""
    saved = SqliteStore.registry_delta
    SqliteStore.registry_delta = lambda self, snapshot: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        SqliteStore.registry_delta = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def _polling_only():
    """Other gateways' changes seen by the version poll alone, as before PostgreSQL notified them (the
    baseline of the PostgreSQL propagation figures)."""
    from gateway.store import PostgresStore

    saved = PostgresStore.registry_listener
    PostgresStore.registry_listener = lambda self: None  # type: ignore[method-assign,assignment,return-value]
    try:
        yield
    finally:
        PostgresStore.registry_listener = saved  # type: ignore[method-assign]


async def _seen_on_b(tmp: Path, revocations: int, store: str | None = None, **config: str) -> list[float]:
    """Seconds from each revocation's apply called on gateway A to gateway B serving it (both on `store`,
    by default a SQLite file in `tmp`)."""
    common = dict(
        listen="127.0.0.1:0",
        token_listen="127.0.0.1:0",
        health_listen="127.0.0.1:0",
        store=store or f"sqlite:///{tmp}/gw.db",
        state_dir=str(tmp / "state"),
        **config,
    )
    seen = []
    async with run_server(GatewayConfig(**common)) as a, run_server(GatewayConfig(**common)) as b:
        for i in range(revocations):
            name = f"{i:016x}"
            event = AuditEvent("principal.revoked", "consumer:bench", f"device:{name}")
            t0 = time.monotonic()  # from the call: B may serve it before A's apply returns
            await a.registry.apply([event], [RegistryOp("revoke", kind="device", name=name)])
            while b.registry.policy.principal("device", name).state != "revoked":
                if time.monotonic() - t0 > 60:
                    raise RuntimeError(f"B did not serve revocation {i} within 60 s")
                await asyncio.sleep(0.002)
            seen.append(time.monotonic() - t0)
            await asyncio.sleep(0.25)  # the next one from another point of B's poll
    return seen


def propagation(devices: int, revocations: int = 7) -> dict[str, float]:
    """Revocation through A until B serves it (ms, median of `revocations`), with the change log and
    without it (whole reads), on a store with `devices` registered."""
    figures: dict[str, float] = {"devices": devices}
    for key, reading in (
        ("revocation_seen_ms", contextlib.nullcontext),
        ("whole_read_seen_ms", _no_change_log),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            with SqliteStore(Path(tmp) / "gw.db") as store:
                store.registry_apply(fleet_ops(devices))
            with reading():
                seen = asyncio.run(_seen_on_b(Path(tmp), revocations))
        figures[key] = statistics.median(seen) * 1000
        figures[key.replace("_ms", "_max_ms")] = max(seen) * 1000
    figures["seen_vs_whole_read"] = figures["revocation_seen_ms"] / figures["whole_read_seen_ms"]
    return {k: round(v, 2) for k, v in figures.items()}


def propagation_postgres(devices: int, postgres: str, revocations: int = 7) -> dict[str, float]:
    """The same on PostgreSQL: B woken by the store's notice of A's commit (LISTEN/NOTIFY), against B
    finding it by its 0.5-s version poll alone, in the same run."""
    import psycopg
    from psycopg import sql

    figures: dict[str, float] = {"devices": devices}
    sep = "&" if "?" in postgres else "?"
    for key, waking in (("notified_seen_ms", contextlib.nullcontext), ("polled_seen_ms", _polling_only)):
        schema = f"registry_bench_{secrets.token_hex(6)}"
        url = f"{postgres}{sep}schema={schema}"
        try:
            with open_store(url) as store:
                store.registry_apply(fleet_ops(devices))
            with tempfile.TemporaryDirectory() as tmp, waking():
                seen = asyncio.run(_seen_on_b(Path(tmp), revocations, url, key_schema=f"{schema}_keys"))
        finally:
            with psycopg.connect(postgres, autocommit=True) as conn:
                for name in (schema, f"{schema}_keys"):
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        figures[key] = statistics.median(seen) * 1000
        figures[key.replace("_ms", "_max_ms")] = max(seen) * 1000
    figures["notified_vs_polled"] = figures["notified_seen_ms"] / figures["polled_seen_ms"]
    return {k: round(v, 2) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devices", nargs="*", type=int, default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--propagation", action="store_true", help="also time a revocation across gateways")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="also measure on this PostgreSQL database (a schema of its own, dropped afterwards)",
    )
    args = parser.parse_args()
    for n in args.devices:
        print(json.dumps(measure(n, args.repeats)), flush=True)
        if args.postgres:
            print(json.dumps({"store": "postgresql", **measure(n, args.repeats, args.postgres)}), flush=True)
        if args.propagation:
            print(json.dumps(propagation(n)), flush=True)
            if args.postgres:
                figures = propagation_postgres(n, args.postgres)
                print(json.dumps({"store": "postgresql", **figures}), flush=True)


if __name__ == "__main__":
    main()
