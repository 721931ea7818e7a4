"""Retention per family (issue 13, item 8), against the real server over mutual TLS and its real store: a
band uploads, the sweeper runs with an injected clock, and exactly the expired records of each family are
gone (families that share a table are still told apart), the rest stay, and the sweep is in the audit log
with counts and cutoffs and nothing that names the device."""

from __future__ import annotations

import orjson

from gateway.pipeline import OK as ACK_OK
from gateway.security.audit import load_key, verify
from gateway.server import run_server
from gateway.store import open_store
from tests.gateway.gatewaykit import Credentials, Uploader, band, processed, same_records, stored, tls_config
from tests.privacy.privacykit import hexid, run, send_all

DAY_S = 86_400
MINUTE_US = 60_000_000


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now_s: float):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def audit_entries(url: str) -> list[dict]:
    with open_store(url) as store:
        return [orjson.loads(r.entry) for r in store.audit_rows(0, 10**6)]


def test_each_family_expires_at_its_own_cutoff_and_every_sweep_that_deletes_is_audited(tmp_path):
    device, batches = band(seed=71, minutes=40, batch_minutes=5)
    expected = processed(batches)
    t0_us = min(r["start_us"] for r in expected)
    clock = Clock(t0_us / 1e6)  # the sweep at start finds nothing expired: the data is from "now"
    # heart a day, steps a day and 22.5 minutes (1/64 day), activity (same table as steps) forever
    cfg = tls_config(tmp_path, retention="heart=1,steps=1.015625", retention_check_s=3600)

    async def scenario():
        async with run_server(cfg, clock=clock) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            async with await creds.band_channel(device) as ch:
                up = Uploader(ch, device)
                acks = await send_all(up, batches)
                await up.close()
            before = stored(cfg.store)
            clock.now_s = t0_us / 1e6 + DAY_S + 30 * 60
            first = await gw.sweeper.sweep()
            after_first = stored(cfg.store)
            again = await gw.sweeper.sweep()  # nothing more has expired: no entry
            clock.now_s += 10 * DAY_S
            later = await gw.sweeper.sweep()
            after_later = stored(cfg.store)
        return acks, before, first, after_first, again, later, after_later

    acks, before, first, after_first, again, later, after_later = run(scenario())
    assert [a.code for a in acks] == [ACK_OK] * len(batches)
    assert same_records(before, expected)
    assert {r["family"] for r in before} == {"heart", "steps", "activity"}

    # the cutoffs as the settings define them: the sweep's now less each family's days
    first_us = int((t0_us / 1e6 + DAY_S + 30 * 60) * 1e6)
    later_us = int((t0_us / 1e6 + 11 * DAY_S + 30 * 60) * 1e6)

    def cutoffs(now_us: int) -> dict[str, int]:
        return {"heart": now_us - DAY_S * 10**6, "steps": now_us - DAY_S * 10**6 - 1350 * 10**6}

    cut = cutoffs(first_us)
    assert cut == {"heart": t0_us + 30 * MINUTE_US, "steps": t0_us + 7 * MINUTE_US + 30 * 10**6}

    def expired(r: dict) -> bool:
        return r["family"] in cut and r["start_us"] < cut[r["family"]]

    gone = [r for r in before if expired(r)]
    assert same_records(after_first, [r for r in before if not expired(r)])
    assert first == {f: sum(r["family"] == f for r in gone) for f in ("heart", "steps")}
    assert 0 < first["heart"] < 80 and 0 < first["steps"] < 39  # both cutoffs fall inside the data
    assert again == {"heart": 0, "steps": 0}
    assert same_records(after_later, [r for r in before if r["family"] == "activity"])  # kept forever
    assert later == {f: sum(r["family"] == f for r in after_first) for f in ("heart", "steps")}

    entries = audit_entries(cfg.store)
    swept = [e for e in entries if e["action"] == "retention.swept"]
    assert [(e["actor"], e["subject"], e["details"]) for e in swept] == [
        (
            "gateway:retention",
            "",
            {
                "records": sum(counts.values()),
                **{f: counts[f] for f in counts},
                **{f"{f}_before_us": c for f, c in cutoffs(now_us).items()},
            },
        )
        for counts, now_us in ((first, first_us), (later, later_us))
    ]
    assert hexid(device) not in orjson.dumps(swept).decode()
    state = tmp_path / "state"
    with open_store(cfg.store) as store:
        assert verify(store, load_key(state / "audit.key"), state / "audit.head").ok


def test_the_default_covers_every_family_and_an_override_of_zero_keeps_one(tmp_path):
    device, batches = band(seed=72, minutes=10, batch_minutes=5)
    t0_us = min(r["start_us"] for r in processed(batches))
    clock = Clock(t0_us / 1e6)
    cfg = tls_config(tmp_path, retention_days=2, retention="heart=0")

    async def scenario():
        async with run_server(cfg, clock=clock) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            async with await creds.band_channel(device) as ch:
                up = Uploader(ch, device)
                await send_all(up, batches)
                await up.close()
            before = stored(cfg.store)
            clock.now_s += 3 * DAY_S
            return before, await gw.sweeper.sweep(), stored(cfg.store)

    before, removed, after = run(scenario())
    assert set(removed) == {"steps", "activity", "sleep", "night", "wear", "day", "distance"}
    assert sum(removed.values()) == sum(r["family"] != "heart" for r in before) > 0
    assert same_records(after, [r for r in before if r["family"] == "heart"]) and after
