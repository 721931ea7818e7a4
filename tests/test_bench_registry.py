"""`bench.registry_bench` measures what it says: a fleet of that size really is in the snapshot it times."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.registry_bench import fleet_ops, measure, propagation, propagation_postgres
from gateway.store import SqliteStore
from tests.services import postgres_url


def test_the_fleet_is_in_the_registry_and_every_figure_is_reported() -> None:
    with tempfile.TemporaryDirectory() as tmp, SqliteStore(Path(tmp) / "gw.db") as store:
        store.registry_apply(fleet_ops(50))
        snapshot = store.registry_snapshot()
    assert len(snapshot.principals) == len(snapshot.credentials) == len(snapshot.ownerships) == 50
    assert len(snapshot.consents) == 50
    figures = measure(500, repeats=1)  # (big enough that no figure rounds to 0.00 ms)
    assert figures["devices"] == 500
    parts = ("snapshot_ms", "policy_ms", "consent_index_ms")
    assert all(figures[k] > 0 for k in (*parts, "baseline_fetchall_ms"))
    assert abs(figures["rebuild_ms"] - sum(figures[k] for k in parts)) < 0.05
    change = ("delta_read_ms", "merge_ms", "delta_policy_ms", "delta_consent_index_ms")
    assert all(figures[k] > 0 for k in change)
    assert abs(figures["change_ms"] - sum(figures[k] for k in change)) < 0.05


def test_the_revocation_is_timed_until_the_other_gateway_serves_it() -> None:
    """`propagation` waits until gateway B's policy holds each revocation (it raises if one never
    arrives), with the change log and without it, and reports both."""
    figures = propagation(200, revocations=2)
    assert figures["devices"] == 200
    for key in ("revocation_seen_ms", "whole_read_seen_ms"):
        assert 0 < figures[key] <= figures[key.replace("_ms", "_max_ms")] < 60_000
    assert figures["seen_vs_whole_read"] > 0


def test_the_postgresql_figures_are_measured_on_a_schema_that_is_dropped_after() -> None:
    import psycopg

    url = postgres_url()

    def bench_schemas() -> set[str]:
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'registry_bench_%'")
            return {name for (name,) in rows}

    before = bench_schemas()  # (another run's may be there)
    figures = measure(300, repeats=1, postgres=url)
    assert figures["devices"] == 300
    assert all(figures[k] > 0 for k in ("snapshot_ms", "delta_read_ms", "baseline_fetchall_ms"))
    assert bench_schemas() <= before


def test_the_postgresql_propagation_is_timed_notified_and_polled_and_drops_its_schemas() -> None:
    """`propagation_postgres` times B serving A's revocation woken by the store's notice and by its poll
    alone (it raises if one never arrives), and drops the fleet's and the keys' schemas after."""
    import psycopg

    url = postgres_url()

    def bench_schemas() -> set[str]:
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'registry_bench_%'")
            return {name for (name,) in rows}

    before = bench_schemas()
    figures = propagation_postgres(200, url, revocations=3)
    assert figures["devices"] == 200
    for key in ("notified_seen_ms", "polled_seen_ms"):
        assert 0 < figures[key] <= figures[key.replace("_ms", "_max_ms")] < 60_000
    assert figures["notified_vs_polled"] > 0  # (that the notice is sooner: test_two_gateways.py)
    assert bench_schemas() <= before
