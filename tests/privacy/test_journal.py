"""A restore from backup never resurrects data or processing without consent (issue 14, two regions: the
erasure journal). Against the real server over mutual TLS: two bands stream; a backup of the store is
taken; band A is erased and band B's owner withdraws heart consent; the gateway stops, the store is
restored from the backup, and the next start re-applies both before serving: nothing of A is in any table
but its audit entries and tombstones, B's heart consent is withdrawn again and its other data is intact.
The journal names devices by pseudonym only, and is 0600."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from decoder.records import FAMILIES
from gateway.cli import main
from gateway.pipeline import OK as ACK_OK
from gateway.privacy.journal import JOURNAL_FILE, Entry, ErasureJournal
from gateway.store.base import ConsentRow, OwnershipRow, RegistrySnapshot
from tests.gateway.gatewaykit import Uploader, audit_name, band, stored
from tests.privacy.privacykit import OK, Owner, hexid, privacy_gateway, run, send_all
from tests.privacy.test_erasure import backup, rows_naming


def consent_of(db: Path, device: str, family: str) -> bool | None:
    """The latest consent decision stored for the device's family."""
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT granted FROM consent WHERE device = ? AND family = ? ORDER BY seq DESC LIMIT 1",
            (device, family),
        ).fetchone()
    return None if row is None else bool(row[0])


def test_a_restored_backup_is_erased_and_withdrawn_again_before_serving(tmp_path):
    a, a_batches = band(seed=91, minutes=20, batch_minutes=5)
    b, b_batches = band(seed=92, minutes=20, batch_minutes=5)
    gw_dir = tmp_path / "gw"

    async def stream_both(creds) -> None:
        for device, batches in ((a, a_batches), (b, b_batches)):
            async with await creds.band_channel(device) as ch:
                owner = Owner(ch, device)
                await owner.profile(birth_year=1980, country="PT")
                assert (await owner.consent(grant=FAMILIES)).code == OK
                up = Uploader(ch, device)
                assert [x.code for x in await send_all(up, batches)] == [ACK_OK] * len(batches)
                await up.close()

    async def first_life():
        async with privacy_gateway(gw_dir, auto_register=True) as (_gw, creds, cfg):
            await stream_both(creds)
            db = Path(cfg.store.removeprefix("sqlite:///"))
            backup(db, tmp_path / "backup.db")  # last night's backup
            async with await creds.band_channel(b) as ch:
                assert (await Owner(ch, b).consent(withdraw=["heart"])).code == OK
            async with await creds.band_channel(a) as ch:
                assert (await Owner(ch, a).erase()).code == OK
            return cfg, db

    cfg, db = run(first_life())
    state = Path(cfg.state_dir)
    journal = (state / JOURNAL_FILE).read_bytes()
    b_kept = [r for r in stored(cfg.store, device=hexid(b))]
    # the restore: the database file replaced by the backup (the key store is not restored)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    os.replace(tmp_path / "backup.db", db)
    restored_a = rows_naming(db, [hexid(a)])
    restored_b_heart = consent_of(db, hexid(b), "heart")
    # the restored log is shorter than the audit head says: the operator accepts the restore
    accepted = main(["audit", "accept-restore", "--store", cfg.store, "--state-dir", str(state)])
    verified = main(["audit", "verify", "--store", cfg.store, "--state-dir", str(state)])
    again = main(["audit", "accept-restore", "--store", cfg.store, "--state-dir", str(state)])

    async def second_life():
        async with privacy_gateway(gw_dir, auto_register=True) as (_gw, _creds, cfg2):
            return cfg2

    run(second_life())
    after_a = rows_naming(db, [hexid(a)])
    audit_a = rows_naming(db, [audit_name(state, a)]).get("audit", 0)

    assert accepted == 0 and verified == 0
    assert again == 2  # nothing to accept once the log and its head agree
    assert restored_a.get("records_activity", 0) > 0 and restored_b_heart is True  # the backup had them
    assert after_a == {}, after_a  # nothing of A in any table, by its ID
    assert audit_a >= 3  # erased, completed, and re-applied: by pseudonym
    assert consent_of(db, hexid(b), "heart") is False
    assert consent_of(db, hexid(b), "steps") is True
    assert stored(cfg.store, device=hexid(b)) == b_kept  # B's features untouched
    assert hexid(a).encode() not in journal and hexid(b).encode() not in journal
    assert stat.S_IMODE(os.stat(state / JOURNAL_FILE).st_mode) == 0o600


def test_the_plan_spares_a_band_registered_again_after_its_erasure(tmp_path):
    """An erasure covers the ownerships it named: a new ownership started later, its consent given after
    the withdrawal, and data of another device are not touched."""
    journal = ErasureJournal(tmp_path / JOURNAL_FILE, lambda d: f"p-{d}")
    dev, other = "00000000000000a1", "00000000000000b2"
    journal.append(
        [
            Entry("erase", f"p-{dev}", 100, ownerships=("old",)),
            Entry("withdraw", f"p-{other}", 200, ownerships=("o2",), family="heart"),
        ]
    )
    snapshot = RegistrySnapshot(
        version=1,
        principals=(),
        credentials=(),
        bindings=(),
        grants=(),
        ownerships=(OwnershipRow(dev, "new", 150), OwnershipRow(other, "o2", 10)),
        consents=(
            ConsentRow(dev, "new", "heart", True, 160, "x"),
            ConsentRow(other, "o2", "heart", True, 250, "x"),  # given again after the withdrawal
        ),
    )
    plan = journal.plan(snapshot, {(dev, "old"), (dev, "new"), (other, "o2")})
    assert plan.erasures == ((dev, "old"),)
    assert plan.forget == ()  # the registry holds the new ownership only: its identity stays
    assert plan.ops == ()
    restored = RegistrySnapshot(
        1,
        (),
        (),
        (),
        (),
        (OwnershipRow(other, "o2", 10),),
        (ConsentRow(other, "o2", "heart", True, 50, "x"),),
    )
    plan = journal.plan(restored, {(other, "o2")})
    assert [(op.op, op.device, op.family, op.granted) for op in plan.ops] == [
        ("consent", other, "heart", False)
    ]
    (tmp_path / JOURNAL_FILE).write_bytes((tmp_path / JOURNAL_FILE).read_bytes() + b'{"op": "era')
    assert len(journal.entries()) == 2  # a torn last line is skipped
