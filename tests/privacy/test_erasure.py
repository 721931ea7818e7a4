"""Erasure and encryption at rest (issue 13, items 5 and 6), against the real server over mutual TLS and the
real stores: after an erasure, a scan of every table of the feature store and the key store finds nothing
of the device but its audit entries and the tombstone; copies of both stores taken before it no longer
open once the key store's copy is gone; a band resending its old batches gets them acked and dropped;
new data after a fresh consent is accepted; a sealed value moved into another row is reported, not
served."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from bandgate.v1 import features_pb2, features_pb2_grpc
from decoder.records import FAMILIES
from gateway.pipeline import ALREADY_EXISTS
from gateway.pipeline import OK as ACK_OK
from gateway.privacy.keys import KEYS_DB
from gateway.privacy.sealing import open_sealer
from gateway.store import SqliteStore
from tests.gateway.gatewaykit import Uploader, audit_name, band, stored
from tests.privacy.privacykit import OK, Owner, hexid, privacy_gateway, run, send_all

PROFILE_SENTINEL = 187.3456


def backup(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite file (what a backup job takes)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


def rows_naming(path: Path, needles: list[str], skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Per table, the rows of which any column holds one of `needles` (as text or bytes)."""
    found: dict[str, int] = {}
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            if table in skip:
                continue
            for row in conn.execute(f"SELECT * FROM {table}"):
                text = " ".join(v.hex() + repr(v) if isinstance(v, bytes) else str(v) for v in row)
                if any(n in text for n in needles):
                    found[table] = found.get(table, 0) + 1
    finally:
        conn.close()
    return found


def test_erasure_leaves_only_the_audit_and_the_tombstone_and_old_copies_do_not_open(tmp_path):
    a, a_batches = band(seed=81, minutes=40, batch_minutes=5)
    b, b_batches = band(seed=82, minutes=20, batch_minutes=5)
    copies = tmp_path / "backups"
    copies.mkdir()

    async def scenario():
        async with privacy_gateway(tmp_path / "gw", auto_register=True) as (_gw, creds, cfg):
            for device, batches in ((a, a_batches[:5]), (b, b_batches)):
                async with await creds.band_channel(device) as ch:
                    owner = Owner(ch, device)
                    await owner.profile(birth_year=1979, country="PT", height_cm=PROFILE_SENTINEL)
                    await owner.consent(grant=FAMILIES)
                    up = Uploader(ch, device)
                    assert [x.code for x in await send_all(up, batches)] == [ACK_OK] * len(batches)
                    await up.close()
            db = Path(cfg.store.removeprefix("sqlite:///"))
            state = Path(cfg.state_dir)
            backup(db, copies / "features.db")
            backup(state / KEYS_DB, copies / "keys.db")
            b_before = stored(cfg.store, device=hexid(b))
            async with await creds.band_channel(a) as ch:
                erased = await Owner(ch, a).erase()
            after = {
                # the audit entries too: they name the device by its keyed pseudonym only
                "features": rows_naming(db, [hexid(a), str(PROFILE_SENTINEL)]),
                "keys": rows_naming(state / KEYS_DB, [hexid(a)]),
                "audit": rows_naming(db, [audit_name(state, a)]).get("audit", 0),
                "tombstones": rows_naming(db, [""]).get("tombstones", 0),
            }
            b_after = stored(cfg.store, device=hexid(b))
            # the band comes back (its certificate is still the CA's: auto-registration) with fresh consent,
            # and resends what it had buffered before the erasure, then new data
            async with await creds.band_channel(a) as ch:
                owner = Owner(ch, a)
                await owner.profile(birth_year=1979, country="PT")
                await owner.consent(grant=["steps"])
                up = Uploader(ch, a)
                resent = await send_all(up, a_batches[:5])
                fresh = await send_all(up, a_batches[5:])
                await up.close()
            return cfg, erased, after, b_before, b_after, resent, fresh

    cfg, erased, after, b_before, b_after, resent, fresh = run(scenario())
    assert erased.code == OK and erased.reply.removed["keys"] == 1 and erased.reply.removed["records"] > 0
    assert after["features"] == {}, f"the device is still in {after['features']}"
    assert after["keys"] == {}
    assert after["audit"] >= 1 and after["tombstones"] >= 1  # the allowed residue
    assert b_after == b_before and b_before  # the other band is untouched
    assert [x.code for x in resent] == [ALREADY_EXISTS] * len(resent), [x.reason for x in resent]
    assert [x.code for x in fresh] == [ACK_OK] * len(fresh)
    now = stored(cfg.store, device=hexid(a))
    assert now and {r["family"] for r in now} == {"steps"}

    # The backups: once the key store's copy is gone, the feature store's copy does not open for the
    # erased band with the live keys and KEK; the other band's rows still do.
    (copies / "keys.db").unlink()
    sealer = open_sealer(Path(cfg.state_dir))
    try:
        with SqliteStore(copies / "features.db", sealer=sealer) as old:
            readable = {r["device"] for _, r in old.read_since(0, limit=10**9)}
            assert old.unreadable > 0
    finally:
        sealer.keys.close()
    assert hexid(a) not in readable and hexid(b) in readable


def test_a_sealed_value_moved_into_another_devices_row_is_reported_not_served(tmp_path):
    a, a_batches = band(seed=83, minutes=10, batch_minutes=5)
    b, b_batches = band(seed=84, minutes=10, batch_minutes=5)

    async def upload(creds, device, batches):
        async with await creds.band_channel(device) as ch:
            up = Uploader(ch, device)
            await send_all(up, batches)
            await up.close()

    async def scenario():
        async with privacy_gateway(tmp_path, default_consent="all", age_unknown="adult") as (_gw, creds, cfg):
            await upload(creds, a, a_batches)
            await upload(creds, b, b_batches)
            db = Path(cfg.store.removeprefix("sqlite:///"))
            with sqlite3.connect(db) as conn:  # an attacker with the database file swaps two values
                rows = dict(
                    conn.execute(
                        "SELECT device, count(*) FROM records_activity WHERE family = 'steps' GROUP BY device"
                    ).fetchall()
                )
                (value,) = conn.execute(
                    "SELECT value FROM records_activity WHERE device = ? AND family = 'steps' LIMIT 1",
                    (hexid(a),),
                ).fetchone()
                conn.execute(
                    "UPDATE records_activity SET value = ? WHERE cursor = "
                    "(SELECT min(cursor) FROM records_activity WHERE device = ? AND family = 'steps')",
                    (value, hexid(b)),
                )
            async with creds.channel("consumer") as ch:
                served = [
                    r
                    async for r in features_pb2_grpc.FeatureServiceStub(ch).Subscribe(
                        features_pb2.SubscribeRequest(families=["steps"], no_follow=True)
                    )
                ]
            return served, rows

    served, rows = run(scenario())
    devices = [r.device for r in served]
    assert rows[hexid(a)] > 0 and rows[hexid(b)] > 1
    assert devices.count(hexid(b)) == rows[hexid(b)] - 1  # every steps minute of B's but the tampered one
    assert devices.count(hexid(a)) == rows[hexid(a)]
