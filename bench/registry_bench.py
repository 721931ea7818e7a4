"""What one registry change costs the gateway as the fleet grows.

`python -m bench.registry_bench 10000 100000`

Every policy change (a registration, a revocation, a consent decision) makes each gateway re-read the
whole registry (`Store.registry_snapshot`) and re-index it (`Policy` and the consent index, on the
registry's store thread), so the cost grows with the registered devices (docs/security.md, "Known
limit"). Per fleet size: the snapshot read, the two indexes, and beside them a baseline measured in the
same run: the same rows fetched as plain tuples by the sqlite3 module, the least any snapshot read can
cost. SQLite in a temporary directory; each device is a principal with a credential, an ownership and
one consent decision.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from gateway.privacy.consent import ConsentIndex
from gateway.security.policy import Policy
from gateway.store import SqliteStore
from gateway.store.base import CredentialRow, RegistryOp

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


def measure(devices: int, repeats: int = 3) -> dict[str, float]:
    """The costs, in ms (best of `repeats`), of one rebuild with `devices` registered."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gw.db"
        with SqliteStore(path) as store:
            store.registry_apply(fleet_ops(devices))
            snapshot = store.registry_snapshot()
            figures = {
                "devices": devices,
                "snapshot_ms": _best_ms(store.registry_snapshot, repeats),
                "policy_ms": _best_ms(lambda: Policy(snapshot), repeats),
                "consent_index_ms": _best_ms(lambda: ConsentIndex(snapshot), repeats),
            }
        conn = sqlite3.connect(path)
        try:

            def fetch_all() -> None:
                for table in TABLES:
                    conn.execute(f"SELECT * FROM {table}").fetchall()  # fixed table names

            figures["baseline_fetchall_ms"] = _best_ms(fetch_all, repeats)
        finally:
            conn.close()
    figures["rebuild_ms"] = figures["snapshot_ms"] + figures["policy_ms"] + figures["consent_index_ms"]
    figures["rebuild_vs_fetchall"] = figures["rebuild_ms"] / figures["baseline_fetchall_ms"]
    return {k: round(v, 2) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devices", nargs="*", type=int, default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for n in args.devices:
        print(json.dumps(measure(n, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
