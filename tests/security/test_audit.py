"""The audit log (gateway/security/audit.py) on a real SQLite store: the chain verifies when untouched, and
every way of tampering with a copy of the database or the head record is caught, by `verify`, by
`AuditLog.open`, and by `bandgate audit verify`; devices are named by pseudonym only; whole old segments
can be dropped and the rest still verifies, while a deletion dressed up as a drop does not."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from gateway.privacy.crypto import PseudonymKey
from gateway.privacy.keys import TOMBSTONE_FILE, load_tombstone_key
from gateway.security import audit, audit_cli
from gateway.security.audit import (
    AuditError,
    AuditEvent,
    AuditLog,
    RefusalCounter,
    Segments,
    VerifyReport,
    audit_pseudonym,
    load_key,
    verify,
)
from gateway.store import SqliteStore, StoreUnavailable
from gateway.store.base import GrantRow, RegistryOp

OPERATOR = "consumer:operator"
DEV = "00ff00ff00ff00ff"


def naive_chain(key: bytes, entries: list[str]) -> list[str]:
    """The MACs the spec defines, computed here without the module: mac_0 = HMAC(key, genesis), then
    mac_n = HMAC(key, hex(mac_{n-1}) || entry_n)."""
    mac = hmac.new(key, b"bandgate-audit-genesis", hashlib.sha256).hexdigest()
    out = []
    for entry in entries:
        mac = hmac.new(key, mac.encode() + entry.encode(), hashlib.sha256).hexdigest()
        out.append(mac)
    return out


class Site:
    """A gateway's state directory and database, as a deployment has them."""

    def __init__(self, root: Path, key: bytes | None = None):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.db = root / "bandgate.db"
        self.key_path = root / "audit.key"
        self.head = root / "audit.head"
        if key is not None:
            self.key_path.write_bytes(key)
            self.key_path.chmod(0o600)

    @property
    def key(self) -> bytes:
        return self.key_path.read_bytes()

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"  # an absolute path: four slashes in all

    def store(self) -> SqliteStore:
        store = SqliteStore(self.db, busy_timeout_ms=100)
        store.open()
        return store

    @property
    def pseudonyms(self) -> PseudonymKey:
        return load_tombstone_key(self.root / TOMBSTONE_FILE)  # created on first use, as the gateway does

    def log(self, store: SqliteStore, **kwargs) -> AuditLog:
        log = AuditLog(store, self.key, self.head, pseudonyms=self.pseudonyms, **kwargs)
        log.open()
        return log

    def copy(self, to: Path) -> Site:
        """The database, key and head copied (the stores must be closed: the WAL is then checkpointed)."""
        to.mkdir()
        for f in self.root.iterdir():
            shutil.copy2(f, to / f.name)
        return Site(to)

    def sql(self, *statements: str, params: tuple = ()) -> None:
        """Edit the database behind the store's back, as someone with the file would."""
        conn = sqlite3.connect(self.db, isolation_level=None)
        try:
            for statement in statements:
                conn.execute(statement, params)
        finally:
            conn.close()

    def rows(self) -> list[tuple[int, int, str, str]]:
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute("SELECT seq, time_us, entry, mac FROM audit ORDER BY seq").fetchall()
        finally:
            conn.close()

    def verify(self, key: bytes | None = None) -> VerifyReport:
        store = self.store()
        try:
            return verify(store, key if key is not None else self.key, self.head)
        finally:
            store.close()


def grant(consumer: str, family: str = "steps") -> RegistryOp:
    return RegistryOp("grant", grant=GrantRow(consumer, family, "subscribe"))


def write_history(log: AuditLog) -> int:
    """Five policy changes, twelve entries: what the tampering tests then attack."""
    log.record(
        [AuditEvent("principal.added", OPERATOR, "consumer:clinic")],
        [RegistryOp("principal", kind="consumer", name="clinic")],
    )
    log.record(
        [
            AuditEvent("grant.added", OPERATOR, "consumer:clinic", details={"family": f})
            for f in ("steps", "heart")
        ],
        [grant("clinic", "steps"), grant("clinic", "heart")],
    )
    log.record(
        [AuditEvent("credential.issued", OPERATOR, f"device:{DEV}", details={"serial": "0a1b"})],
        [RegistryOp("principal", kind="device", name=DEV)],
    )
    log.record(
        [
            AuditEvent("rpc.refused", f"peer:ipv4:10.0.0.{i}", reason="unknown certificate", count=i)
            for i in range(1, 8)
        ]
    )
    log.record(
        [AuditEvent("principal.revoked", OPERATOR, "consumer:clinic", reason="contract ended")],
        [RegistryOp("revoke", kind="consumer", name="clinic")],
    )
    return 12


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site", os.urandom(32))


@pytest.fixture
def written(site: Site) -> Site:
    """A site with a history written and every store closed."""
    store = site.store()
    try:
        assert write_history(site.log(store)) == 12
    finally:
        store.close()
    return site


# a clean log


def test_a_clean_log_verifies(written: Site) -> None:
    assert written.verify() == VerifyReport(ok=True, entries=12, problems=())
    assert written.verify(os.urandom(32)).ok is False  # and only under its own key


def test_an_empty_log_verifies_and_opens(site: Site) -> None:
    store = site.store()
    try:
        log = site.log(store)
        assert log.seq == 0
        assert verify(store, site.key, site.head) == VerifyReport(True, 0, ())
    finally:
        store.close()


def test_entries_are_canonical_json_chained_as_specified(written: Site) -> None:
    rows = written.rows()
    assert [r[0] for r in rows] == list(range(1, 13))
    entries = [r[2] for r in rows]
    assert [r[3] for r in rows] == naive_chain(written.key, entries)
    for seq, time_us, entry, _ in rows:
        data = json.loads(entry)
        assert entry == json.dumps(data, sort_keys=True, separators=(",", ":"))
        assert data["seq"] == seq and data["time_us"] == time_us
        assert {"actor", "action", "subject", "reason", "count", "details"} <= data.keys()
    refused = [json.loads(e) for e in entries if '"rpc.refused"' in e]
    assert [(r["actor"], r["reason"], r["count"]) for r in refused] == [
        (f"peer:ipv4:10.0.0.{i}", "unknown certificate", i) for i in range(1, 8)
    ]
    assert json.loads(entries[1])["details"] == {"family": "steps"}
    head = json.loads(written.head.read_text())
    assert head == {"seq": 12, "mac": rows[-1][3]}
    assert written.head.stat().st_mode & 0o777 == 0o600


def test_the_key_is_never_written_beside_the_log(site: Site) -> None:
    store = site.store()
    log = site.log(store)
    write_history(log)
    key = site.key
    assert key.hex() not in repr(log)

    def leaked() -> list[str]:
        found = []
        for f in site.root.iterdir():
            if f != site.key_path:
                data = f.read_bytes()
                if key in data or key.hex().encode() in data or key.hex().upper().encode() in data:
                    found.append(f.name)
        return found

    assert (site.root / "bandgate.db-wal").exists()  # checked while entries are still in the WAL, too
    assert leaked() == []
    store.close()
    assert leaked() == []


# tampering: each on a copy of the database, each caught


def _edit(site: Site) -> None:
    site.sql("UPDATE audit SET entry = replace(entry, '10.0.0.1', '10.6.6.6') WHERE seq = 5")


def _edit_details(site: Site) -> None:
    (entry,) = [r[2] for r in site.rows() if r[0] == 2]
    data = json.loads(entry)
    data["details"]["family"] = "sleep"
    site.sql("UPDATE audit SET entry = ? WHERE seq = 2", params=(json.dumps(data, sort_keys=True),))


def _insert_middle(site: Site) -> None:
    forged = json.dumps({"seq": 6, "time_us": 1, "actor": OPERATOR, "action": "grant.added"}, sort_keys=True)
    site.sql(
        "UPDATE audit SET seq = seq + 1000 WHERE seq >= 6",
        "UPDATE audit SET seq = seq - 999 WHERE seq >= 1000",
        f"INSERT INTO audit (seq, time_us, entry, mac) VALUES (6, 1, '{forged}', '{'ab' * 32}')",
    )


def _insert_end(site: Site) -> None:
    forged = json.dumps({"seq": 13, "time_us": 1, "actor": OPERATOR, "action": "grant.added"}, sort_keys=True)
    site.sql(f"INSERT INTO audit (seq, time_us, entry, mac) VALUES (13, 1, '{forged}', '{'ab' * 32}')")


def _delete_middle(site: Site) -> None:
    site.sql("DELETE FROM audit WHERE seq = 7")


def _cut_tail(site: Site) -> None:
    site.sql("DELETE FROM audit WHERE seq > 10")


def _move(site: Site) -> None:  # a sealed entry given another time: the columns no longer match it
    site.sql("UPDATE audit SET time_us = time_us + 1 WHERE seq = 4")


def _rewrite(site: Site, *, new_head: bool) -> None:
    """Every entry re-sealed under a key the attacker has (one of them edited first), and optionally a
    new head written for the forged chain: without the real key, neither can be made to verify."""
    forger = os.urandom(32)
    rows = site.rows()
    entries = [e.replace("contract ended", "never happened") for _, _, e, _ in rows]
    macs = naive_chain(forger, entries)
    conn = sqlite3.connect(site.db, isolation_level=None)
    try:
        for (seq, *_), entry, mac in zip(rows, entries, macs, strict=True):
            conn.execute("UPDATE audit SET entry = ?, mac = ? WHERE seq = ?", (entry, mac, seq))
    finally:
        conn.close()
    if new_head:
        site.head.write_text(json.dumps({"seq": rows[-1][0], "mac": macs[-1]}))


def _head_deleted(site: Site) -> None:
    site.head.unlink()


def _head_back(site: Site) -> None:  # to an earlier entry, as if the tail were never written
    seq, _, _, mac = site.rows()[9]
    site.head.write_text(json.dumps({"seq": seq + 1, "mac": mac}))


def _head_mac(site: Site) -> None:
    site.head.write_text(json.dumps({"seq": 12, "mac": "00" * 32}))


def _head_garbage(site: Site) -> None:
    site.head.write_text("{not json")


TAMPERING: dict[str, tuple[Callable[[Site], None], str]] = {
    "entry edited": (_edit, "entry 5: MAC mismatch"),
    "details edited": (_edit_details, "entry 2: MAC mismatch"),
    "entry inserted": (_insert_middle, "entry 6: MAC mismatch"),
    "entry appended": (_insert_end, "entry 13: MAC mismatch"),
    "entry deleted": (_delete_middle, "seq 7 missing after 6 (deleted)"),
    "tail cut": (_cut_tail, "log ends at 10, head says 12 (tail cut)"),
    "entry moved": (_move, "entry 4: its seq or time_us columns differ"),
    "chain rewritten": (lambda s: _rewrite(s, new_head=False), "head MAC does not match entry 12"),
    "chain and head rewritten": (lambda s: _rewrite(s, new_head=True), "entry 1: MAC mismatch"),
    "head deleted": (_head_deleted, "is missing: a cut tail cannot be detected"),
    "head moved back": (_head_back, "head MAC does not match entry 11"),
    "head MAC edited": (_head_mac, "head MAC does not match entry 12 (chain rewritten)"),
    "head garbled": (_head_garbage, "is not a head record"),
}


@pytest.mark.parametrize("how", TAMPERING)
def test_verify_catches_tampering(written: Site, tmp_path: Path, how: str) -> None:
    tamper, expected = TAMPERING[how]
    copy = written.copy(tmp_path / "copy")
    assert copy.verify().ok  # the copy itself verifies: it is the tampering that is caught
    tamper(copy)
    report = copy.verify()
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems
    assert written.verify().ok  # the original is untouched


def test_verify_reads_in_pages_across_a_deletion(written: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_PAGE", 3)
    assert written.verify() == VerifyReport(True, 12, ())
    written.sql("DELETE FROM audit WHERE seq IN (3, 4, 9)")  # 3: the last of a page; 4: the first of one
    assert written.verify().problems == (
        "seq 3..4 missing after 2 (deleted)",
        "seq 9 missing after 8 (deleted)",
    )


def test_verify_lists_a_bounded_number_of_problems(written: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MAX_PROBLEMS", 4)
    report = written.verify(os.urandom(32))  # every entry fails under the wrong key
    assert report.entries == 12
    assert report.problems[:4] == tuple(f"entry {s}: MAC mismatch (edited or inserted)" for s in range(1, 5))
    assert report.problems[4:] == ("... and 8 more problems",)


# opening


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("tail cut", "tail cut"),
        ("chain rewritten", "chain rewritten"),
        ("head deleted", "missing"),
        ("head moved back", "chain rewritten"),
        ("head garbled", "not a head record"),
    ],
)
def test_open_refuses_a_log_that_does_not_match_its_head(
    written: Site, tmp_path: Path, how: str, match: str
) -> None:
    copy = written.copy(tmp_path / "copy")
    TAMPERING[how][0](copy)
    head_before = copy.head.read_bytes() if copy.head.exists() else None
    store = copy.store()
    try:
        with pytest.raises(AuditError, match=match):
            copy.log(store)
    finally:
        store.close()
    assert (copy.head.read_bytes() if copy.head.exists() else None) == head_before  # not "repaired"


def test_open_refuses_an_edited_entry_at_the_head(written: Site) -> None:
    written.sql("UPDATE audit SET entry = replace(entry, 'contract ended', 'on request') WHERE seq = 12")
    store = written.store()
    try:
        with pytest.raises(AuditError, match="entry 12: MAC mismatch"):
            written.log(store)
    finally:
        store.close()


def test_a_crash_before_the_head_write_is_recovered(site: Site) -> None:
    store = site.store()
    log = site.log(store)
    write_history(log)
    old_head = site.head.read_bytes()
    log.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [grant("lab")])
    ungrant = RegistryOp("ungrant", grant=GrantRow("lab", "steps", "subscribe"))
    log.record([AuditEvent("grant.removed", OPERATOR, "consumer:lab")], [ungrant])
    store.close()
    site.head.write_bytes(old_head)  # the process died after the store's commits, before the head writes
    assert json.loads(site.head.read_text())["seq"] == 12
    assert site.verify().ok  # entries beyond the head that verify are accepted
    store = site.store()
    try:
        reopened = site.log(store)
        assert reopened.seq == 14
        assert json.loads(site.head.read_text()) == {"seq": 14, "mac": site.rows()[-1][3]}
        reopened.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [grant("lab")])
    finally:
        store.close()
    assert site.verify() == VerifyReport(True, 15, ())


def test_entries_beyond_the_head_must_verify_too(written: Site) -> None:
    old_head = written.head.read_bytes()
    store = written.store()
    try:
        written.log(store).record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [grant("lab")])
    finally:
        store.close()
    written.head.write_bytes(old_head)
    written.sql("UPDATE audit SET entry = replace(entry, 'lab', 'mallory') WHERE seq = 13")
    store = written.store()
    try:
        with pytest.raises(AuditError, match="entry 13: MAC mismatch"):
            written.log(store)
    finally:
        store.close()
    assert json.loads(written.head.read_text())["seq"] == 12


# recording


def test_a_failed_store_call_leaves_the_chain_where_it_was(site: Site) -> None:
    store = site.store()
    log = site.log(store)
    write_history(log)
    head = site.head.read_bytes()
    bad = RegistryOp("grant", grant=GrantRow("lab", "raw", "subscribe"))
    with pytest.raises(ValueError):
        log.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [bad])
    conn = sqlite3.connect(site.db)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable):
            log.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [grant("lab")])
    finally:
        conn.close()
    assert log.seq == 12 and len(site.rows()) == 12  # neither the entry nor the grant was stored
    assert site.head.read_bytes() == head
    assert not any(g.consumer == "lab" for g in store.registry_snapshot().grants)
    version = log.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [grant("lab")])
    assert version == store.registry_version()
    assert any(g.consumer == "lab" for g in store.registry_snapshot().grants)
    store.close()
    assert site.verify() == VerifyReport(True, 13, ())


def test_a_policy_change_is_never_stored_without_its_entry(site: Site) -> None:
    store = site.store()
    try:
        log = site.log(store)
        version = store.registry_version()
        with pytest.raises(ValueError, match="audit event"):
            log.record([], [grant("lab")])
        assert store.registry_version() == version and site.rows() == []
        # a "seen" op is not a policy change: it needs no entry
        assert log.record([], [RegistryOp("seen", kind="consumer", name="lab", time_us=5)]) == version
        assert site.rows() == []
        with pytest.raises(AuditError, match="not open"):
            AuditLog(store, site.key, site.head).record([AuditEvent("x", OPERATOR)])
    finally:
        store.close()


def test_two_writers_with_one_key_continue_each_others_chain(site: Site) -> None:
    """The server and a command-line tool beside it, each with its own store object and AuditLog."""
    s1, s2 = site.store(), site.store()
    try:
        server, tool = site.log(s1), site.log(s2)
        server.record([AuditEvent("rpc.refused", "peer:ipv4:10.0.0.1", reason="bad token")])
        tool.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [grant("lab")])
        server.record([AuditEvent("rpc.refused", "peer:ipv4:10.0.0.2", reason="bad token")])
        assert server.seq == tool.seq + 1 == 3
    finally:
        s1.close()
        s2.close()
    assert site.verify() == VerifyReport(True, 3, ())


def test_a_running_writer_notices_a_cut_tail(site: Site) -> None:
    store = site.store()
    try:
        log = site.log(store)
        write_history(log)
        site.sql("DELETE FROM audit WHERE seq = 12")
        with pytest.raises(AuditError, match="tail cut"):
            log.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [grant("lab")])
    finally:
        store.close()


# keys and events


def test_load_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    with pytest.raises(AuditError, match="missing"):
        load_key(path)
    key = os.urandom(32)
    path.write_bytes(key)
    for mode in (0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(AuditError, match="0600"):
            load_key(path)
    path.chmod(0o600)
    assert load_key(path) == key
    for wrong in (key[:31], key + b"\n"):
        path.write_bytes(wrong)
        with pytest.raises(AuditError, match="32 bytes"):
            load_key(path)
    path.write_bytes(key)
    with pytest.raises(AuditError) as err:
        AuditLog(SqliteStore(tmp_path / "x.db"), key[:16], tmp_path / "audit.head")
    assert key.hex() not in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"action": ""},
        {"actor": ""},
        {"reason": "line one\nline two"},
        {"subject": "x" * 300},
        {"count": 0},
        {"count": True},
        {"details": {"pem": "-----BEGIN CERTIFICATE-----\nMIIB..."}},
        {"details": {"ok": True}},
        {"details": {"values": [1, 2, 3]}},
        {"details": {"": "x"}},
        {"details": {f"k{i}": i for i in range(40)}},
    ],
)
def test_an_event_carries_identifiers_only(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AuditEvent(**{"action": "grant.added", "actor": OPERATOR, **kwargs})


def test_an_event_is_a_value() -> None:
    a = AuditEvent("grant.added", OPERATOR, "consumer:lab", details={"family": "steps", "n": 2})
    b = AuditEvent("grant.added", OPERATOR, "consumer:lab", details={"n": 2, "family": "steps"})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.details["family"] == "steps" and dict(a.details) == {"family": "steps", "n": 2}
    assert a != AuditEvent("grant.added", OPERATOR, "consumer:lab", details={"family": "heart", "n": 2})


# refusals


def test_refusals_are_counted_per_peer_and_reason_and_drained() -> None:
    counter = RefusalCounter()
    for peer, reason in [("peer:a", "bad token"), ("peer:b", "bad token"), ("peer:a", "bad token")]:
        counter.note(peer, reason)
    counter.note("peer:a", "revoked")
    assert counter.drain() == [
        AuditEvent("rpc.refused", "peer:a", reason="bad token", count=2),
        AuditEvent("rpc.refused", "peer:a", reason="revoked", count=1),
        AuditEvent("rpc.refused", "peer:b", reason="bad token", count=1),
    ]
    assert counter.drain() == []
    counter.note("peer:\x1b[31mred", "x" * 1000)  # a strange peer is cleaned, never a failed refusal
    (event,) = counter.drain()
    assert event.actor == "peer:?[31mred" and event.reason == "x" * audit.MAX_TEXT


def test_refusal_counter_memory_is_bounded() -> None:
    counter = RefusalCounter(max_keys=5)
    for i in range(1000):
        counter.note(f"peer:ipv4:10.0.{i // 250}.{i % 250}", "bad token")
        counter.note(f"peer:ipv4:10.1.0.{i}", f"reason {i}")
    assert len(counter._counts) <= 5 + audit._MAX_OVERFLOW_REASONS + 1
    events = counter.drain()
    assert sum(e.count for e in events) == 2000  # nothing is lost, only pooled
    assert sum(e.count for e in events if e.actor == audit.OTHER_PEER) == 2000 - 5  # the first 5 each once


def test_drained_refusals_are_recorded(site: Site) -> None:
    counter = RefusalCounter()
    for _ in range(3):
        counter.note("peer:ipv4:10.9.9.9", "unknown certificate")
    store = site.store()
    try:
        site.log(store).record(counter.drain())
    finally:
        store.close()
    ((_, _, entry, _),) = site.rows()
    assert json.loads(entry) | {"time_us": 0} == {
        "v": 1,
        "seq": 1,
        "time_us": 0,
        "actor": "peer:ipv4:10.9.9.9",
        "action": "rpc.refused",
        "subject": "",
        "reason": "unknown certificate",
        "count": 3,
        "details": {},
    }
    assert site.verify().ok


# the command


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bandgate")
    audit_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args, Console())


def test_cli_verify_clean_and_tampered(written: Site, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["audit", "verify", "--store", written.url, "--state-dir", str(written.root)]
    assert _run(argv) == 0
    assert capsys.readouterr().out == "audit log verified: 12 entries\n"
    _delete_middle(written)
    _edit(written)
    assert _run(argv) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["entry 5: MAC mismatch (edited or inserted)", "seq 7 missing after 6 (deleted)"]
    assert out[-1].startswith("audit log NOT verified: 2 problem(s)")


def test_cli_state_dir_from_the_environment(
    written: Site, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BANDGATE_STATE_DIR", str(written.root))
    assert _run(["audit", "verify", "--store", written.url]) == 0
    monkeypatch.setenv("BANDGATE_STATE_DIR", str(written.root / "elsewhere"))
    assert _run(["audit", "verify", "--store", written.url]) == 2


def test_cli_cannot_verify_without_key_or_store(
    written: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing_db = tmp_path / "nothing-here.db"
    state = ["--state-dir", str(written.root)]
    assert _run(["audit", "verify", "--store", f"sqlite:///{missing_db}", *state]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no store" in err and "Traceback" not in err
    assert not missing_db.exists()  # verifying did not create an empty store (which would "verify")
    written.key_path.unlink()
    assert _run(["audit", "verify", "--store", written.url, "--state-dir", str(written.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audit key" in err and "missing" in err


def test_cli_show(written: Site, capsys: pytest.CaptureFixture[str]) -> None:
    entries = [r[2] for r in written.rows()]
    assert _run(["audit", "show", "--store", written.url]) == 0
    assert capsys.readouterr().out.splitlines() == entries
    assert _run(["audit", "show", "--store", written.url, "--after", "3", "--limit", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == entries[3:7]


# devices by pseudonym


RELAY_HEX = "relay:0123456789abcdef"  # a relay that happens to be named like a device keeps its name


def test_a_devices_id_is_in_no_audit_row_and_its_pseudonym_is(site: Site, capsys) -> None:
    other = "0a0b0c0d0e0f0102"
    store = site.store()
    try:
        log = site.log(store)
        write_history(log)  # names DEV as a subject
        log.record(
            [
                AuditEvent("consent.changed", f"device:{DEV}", f"device:{DEV}", details={"granted": "heart"}),
                AuditEvent("binding.added", OPERATOR, RELAY_HEX, details={"device": DEV}),
                AuditEvent(
                    "rpc.refused", "peer:ipv4:10.0.0.9", reason=f"device {DEV} may upload for itself only"
                ),
                AuditEvent("rpc.refused", "peer:ipv4:10.0.0.9", reason=f"device {other} is not registered"),
            ]
        )
        keyless = AuditLog(store, site.key, site.head)
        keyless.open()
        with pytest.raises(ValueError, match="pseudonym key"):  # a log without the key names no band
            keyless.record([AuditEvent("x", f"device:{DEV}")])
        keyless.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")])  # naming none, it records
    finally:
        store.close()
    rows = site.rows()
    pseudonym = audit_pseudonym(site.pseudonyms, DEV)
    assert pseudonym == "pseudonym-" + site.pseudonyms.pseudonym(DEV) and pseudonym != audit_pseudonym(
        site.pseudonyms, other
    )
    everything = "\n".join(r[2] for r in rows)
    for device in (DEV, other, DEV.upper()):  # (the registry names DEV: it is registered; the log does not)
        assert device not in everything and device not in site.head.read_text()
    naming = [json.loads(r[2]) for r in rows if pseudonym in r[2]]
    assert [(e["action"], e["actor"], e["subject"]) for e in naming] == [
        ("credential.issued", OPERATOR, f"device:{pseudonym}"),
        ("consent.changed", f"device:{pseudonym}", f"device:{pseudonym}"),
        ("binding.added", OPERATOR, RELAY_HEX),
        ("rpc.refused", "peer:ipv4:10.0.0.9", ""),
    ]
    assert naming[2]["details"] == {"device": pseudonym}
    assert naming[3]["reason"] == f"device {pseudonym} may upload for itself only"
    assert site.verify().ok

    # `bandgate audit show --device` finds the device's entries by its pseudonym
    state = ["--store", site.url, "--state-dir", str(site.root)]
    assert _run(["audit", "show", *state, "--device", DEV.upper()]) == 0
    assert capsys.readouterr().out.splitlines() == [r[2] for r in rows if pseudonym in r[2]]
    assert _run(["audit", "show", *state, "--device", DEV, "--limit", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert _run(["audit", "show", *state, "--device", "not-a-device"]) == 2
    (site.root / TOMBSTONE_FILE).unlink()
    assert _run(["audit", "show", *state, "--device", DEV]) == 2
    assert "tombstone key" in capsys.readouterr().err


# segments: checkpointed, dropped whole, the rest verifies


class Clock:
    def __init__(self, now_s: float = 1_767_225_600.0):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def checkpoints(site: Site) -> list[tuple[int, str, int]]:
    conn = sqlite3.connect(site.db)
    try:
        return conn.execute("SELECT seq, mac, first_seq FROM audit_segments ORDER BY seq").fetchall()
    finally:
        conn.close()


@pytest.fixture
def segmented(site: Site) -> Site:
    """The history written in segments of 5 entries: checkpoints at 5 and 10, 11 and 12 open."""
    store = site.store()
    try:
        write_history(site.log(store, segments=Segments(entries=5)))
    finally:
        store.close()
    return site


def test_segments_close_at_n_entries_or_by_age_and_their_heads_are_checkpointed(site: Site) -> None:
    clock = Clock()
    store = site.store()
    try:
        log = site.log(store, segments=Segments(entries=5, max_age_s=3600), clock=clock)
        write_history(log)  # records of 1, 2, 1, 7, 1 entries: 5 and 10 close a segment by count
        clock.now_s += 3599
        log.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [grant("lab")])  # 13: same segment
        clock.now_s += 1  # an hour after the open segment's first entry (11): it closes before the next
        log.record([AuditEvent("grant.added", OPERATOR, "consumer:lab2")], [grant("lab2")])
    finally:
        store.close()
    macs = {seq: mac for seq, _, _, mac in site.rows()}
    assert checkpoints(site) == [(5, macs[5], 1), (10, macs[10], 6), (13, macs[13], 11)]
    # another writer (a fresh log) continues the open segment where the last one left it
    store = site.store()
    try:
        site.log(store, segments=Segments(entries=2), clock=clock).record([AuditEvent("x", OPERATOR)])
    finally:
        store.close()
    assert [c[0] for c in checkpoints(site)] == [5, 10, 13, 15]


def test_after_dropping_old_segments_verify_passes_and_the_log_goes_on(segmented: Site) -> None:
    rows = segmented.rows()
    store = segmented.store()
    try:
        log = segmented.log(store)
        assert log.drop_through(9, "consumer:operator") == 5  # only whole segments: through 5
        assert log.drop_through(3, "consumer:operator") == 0  # nothing there to drop: nothing recorded
    finally:
        store.close()
    assert [r[0] for r in segmented.rows()] == list(range(6, 14))
    assert segmented.verify() == VerifyReport(True, 8, (), dropped=5)
    (drop,) = [json.loads(r[2]) for r in segmented.rows() if '"audit.dropped"' in r[2]]
    assert (drop["actor"], drop["details"]) == (
        "consumer:operator",
        {"through_seq": 5, "entries": 5, "segments": 1},
    )
    store = segmented.store()
    try:
        log = segmented.log(store)  # reopens against the head, over the gap
        assert log.drop_through(12, "consumer:operator") == 5  # through 10 (13, the drop, is open)
        log.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [grant("lab")])
    finally:
        store.close()
    kept = segmented.rows()
    assert [r[0] for r in kept] == [11, 12, 13, 14, 15]
    assert kept[:2] == [r for r in rows if r[0] in (11, 12)]  # the kept entries are untouched
    assert segmented.verify() == VerifyReport(True, 5, (), dropped=10)


def test_a_log_whose_head_follows_a_dropped_segment_still_opens(site: Site) -> None:
    store = site.store()
    try:
        log = site.log(store, segments=Segments(entries=4))
        write_history(log)  # checkpoints at 4, 8, 12
        assert log.drop_through(12, OPERATOR) == 12
    finally:
        store.close()
    assert [r[0] for r in site.rows()] == [13]
    store = site.store()
    try:
        site.log(store)  # the head (13) chains to entry 12's MAC: from its checkpoint
    finally:
        store.close()
    assert site.verify() == VerifyReport(True, 1, (), dropped=12)


def _unrecorded_drop(site: Site) -> None:  # whole segments deleted, but no sealed entry says so
    site.sql("DELETE FROM audit WHERE seq <= 5")


def _drop_past_the_record(site: Site) -> None:  # a recorded drop through 5, then more deleted
    store = site.store()
    try:
        site.log(store).drop_through(5, OPERATOR)
    finally:
        store.close()
    site.sql("DELETE FROM audit WHERE seq <= 10")


def _forged_drop(site: Site) -> None:  # a drop entry written without the key
    entry = json.dumps({"action": "audit.dropped", "details": {"through_seq": 5}, "seq": 13, "time_us": 1})
    site.sql(f"INSERT INTO audit (seq, time_us, entry, mac) VALUES (13, 1, '{entry}', '{'ab' * 32}')")
    site.sql("DELETE FROM audit WHERE seq <= 5")


def _forged_checkpoint(site: Site) -> None:
    store = site.store()
    try:
        site.log(store).drop_through(5, OPERATOR)
    finally:
        store.close()
    site.sql(f"UPDATE audit_segments SET mac = '{'cd' * 32}' WHERE seq = 5")


def _edit_kept(site: Site) -> None:
    store = site.store()
    try:
        site.log(store).drop_through(10, OPERATOR)
    finally:
        store.close()
    site.sql("UPDATE audit SET entry = replace(entry, 'contract ended', 'on request') WHERE seq = 12")


DROP_TAMPERING: dict[str, tuple[Callable[[Site], None], str]] = {
    "unrecorded drop": (_unrecorded_drop, "entries 1..5 are gone and no sealed audit.dropped entry"),
    "dropped past the record": (_drop_past_the_record, "entries 1..10 are gone and no sealed audit.dropped"),
    "forged drop entry": (_forged_drop, "entry 13: MAC mismatch"),
    "forged checkpoint": (_forged_checkpoint, "entry 6: MAC mismatch"),
    "kept entry edited": (_edit_kept, "entry 12: MAC mismatch"),
}


@pytest.mark.parametrize("how", DROP_TAMPERING)
def test_verify_catches_tampering_around_dropped_segments(segmented: Site, tmp_path: Path, how: str) -> None:
    tamper, expected = DROP_TAMPERING[how]
    copy = segmented.copy(tmp_path / "copy")
    tamper(copy)
    report = copy.verify()
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems
    assert segmented.verify().ok


def test_cli_drop_before_a_seq_or_an_age_beside_a_running_writer(
    segmented: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    state = ["--store", segmented.url, "--state-dir", str(segmented.root)]
    server_store = segmented.store()
    try:
        server = segmented.log(server_store)  # the gateway's log, open while the command runs
        assert _run(["audit", "drop-before", "7", *state]) == 0
        assert capsys.readouterr().out == "dropped 5 entries; the log now starts at 6\n"
        assert _run(["audit", "drop-before", "3", *state]) == 0
        assert capsys.readouterr().out.startswith("nothing dropped")
        server.record([AuditEvent("grant.added", OPERATOR, "consumer:lab")], [grant("lab")])  # 14
        assert _run(["audit", "drop-before", "--days", "0", *state]) == 0  # every closed segment: to 10
        assert capsys.readouterr().out == "dropped 5 entries; the log now starts at 11\n"
        server.record([AuditEvent("grant.removed", OPERATOR, "consumer:lab")])
    finally:
        server_store.close()
    assert _run(["audit", "verify", *state]) == 0
    assert capsys.readouterr().out == "audit log verified: 6 entries (1..10 dropped by segment)\n"
    for neither_or_both in ([], ["5", "--days", "1"]):  # SEQ or --days
        with pytest.raises(SystemExit) as exited:
            _run(["audit", "drop-before", *neither_or_both, *state])
        assert exited.value.code == 2
    assert _run(["audit", "drop-before", "--days", "-1", *state]) == 2
    assert "--days" in capsys.readouterr().err


def test_two_writers_on_one_store_interleave_into_one_chain(site: Site) -> None:
    """Two gateways sharing a store (each its own head) append at the same moments: every entry is kept,
    in one chain that verifies, none sealed twice at one seq (a lost race catches up and seals again)."""
    import threading

    stores = [site.store(), site.store()]
    logs = [
        AuditLog(stores[0], site.key, site.head, pseudonyms=site.pseudonyms),
        AuditLog(stores[1], site.key, site.root / "other.head", pseudonyms=site.pseudonyms),
    ]
    for log in logs:
        log.open()
    start = threading.Barrier(2)

    def write(n: int, log: AuditLog) -> None:
        start.wait()
        for i in range(40):
            log.record(
                [AuditEvent("principal.added", OPERATOR, f"consumer:w{n}-{i}")],
                [RegistryOp("principal", kind="consumer", name=f"w{n}-{i}")],
            )

    threads = [threading.Thread(target=write, args=(n, log)) for n, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in stores:
        store.close()
    rows = site.rows()
    assert [r[0] for r in rows] == list(range(1, 81))
    names = sorted(json.loads(r[2])["subject"] for r in rows)
    assert names == sorted(f"consumer:w{n}-{i}" for n in range(2) for i in range(40))
    assert site.verify().ok
