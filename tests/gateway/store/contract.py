"""The contract every store passes: subclass `StoreContract` and provide a `harness` fixture (`Harness`).

```python
class TestSqliteContract(StoreContract):
    @pytest.fixture
    def harness(self, tmp_path):
        return SqliteHarness(tmp_path)
```

Expected results come from what the test committed (a list kept beside the store), never from the store
itself, so every assertion can fail.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Protocol

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoder import steps
from decoder.features import DeviceState, device_key
from gateway.privacy.consent import ConsentIndex
from gateway.store import (
    CommitResult,
    DeviceRow,
    SchemaVersionError,
    SequenceError,
    Store,
    StoreError,
    StoreUnavailable,
)
from gateway.store.base import (
    ADMIN_FAMILY,
    FAMILIES,
    AuditCheckpoint,
    AuditRow,
    CommitItem,
    CredentialRow,
    GrantRow,
    OutboxRow,
    OwnershipRow,
    PrivacyHistory,
    RegistryOp,
    RegistrySnapshot,
    SealedRow,
    merge_registry,
)
from gateway.stream.base import messages_of, records_of

# The contract's property tests run once per store class (plain and sealed SQLite, later PostgreSQL), each
# on a store of its own: the fixture scope and the several executors are by design.
SHARED_BY_STORES = [HealthCheck.function_scoped_fixture, HealthCheck.differing_executors]

A = 0xF123_4567_89AB_CDEF  # above 2**63: a u64 that does not fit a signed 64-bit column
B = 0x0000_0000_0000_0042
C = 0x7FFF_FFFF_FFFF_FFFF
MINUTE_US = 60_000_000
T0 = 1_767_225_600_000_000  # 2026-01-01 UTC


class Harness(Protocol):
    """What a store's test module provides so the contract can reach behind the store."""

    def new_store(self) -> Store:
        """An unopened store object on this test's database (every call: the same database), with a
        short busy timeout so lock tests are quick."""
        ...

    def fresh_database(self) -> Callable[[], Store]:
        """A maker of unopened store objects on a new, empty database (one per hypothesis example)."""
        ...

    def outbox_store(self) -> Store:
        """Like `new_store`, with the outbox on (a gateway with a feature stream configured)."""
        ...

    def newer_store(self) -> Store:
        """Like `new_store`, but its schema is one (test-only) migration ahead of the real one."""
        ...

    def write_schema_version(self, version: int) -> None:
        """Set the database's schema version directly, bypassing the store."""
        ...

    def schema_version(self) -> int:
        """The schema version `new_store` objects know."""
        ...

    def exclusive_lock(self) -> AbstractContextManager[None]:
        """Hold the database's write lock from another connection for the duration."""
        ...


def rec(device_id: int, family: str, start_us: int, duration_s: int = 60, **values: float | str) -> dict:
    """A feature record as `decoder.features.process` makes them."""
    return {
        "family": family,
        "device": device_key(device_id),
        "start_us": start_us,
        "duration_s": duration_s,
        "algo": f"{family}/1",
        "values": values or {"n": start_us % 997, "label": "x"},
    }


def minutes(device_id: int, first: int, n: int, family: str = "steps") -> list[dict]:
    return [
        rec(device_id, family, T0 + m * MINUTE_US, steps=m + 0.5, walk_s=m % 60)
        for m in range(first, first + n)
    ]


def everything(store: Store) -> list[tuple[int, dict]]:
    return store.read_since(0, limit=1_000_000)


# the registry and the audit table

DEV1 = device_key(A)
DEV2 = device_key(B)
DEV3 = device_key(C)


def now_us() -> int:
    return time.time_ns() // 1000


def principal_op(kind: str, name: str, state: str = "active") -> RegistryOp:
    return RegistryOp("principal", kind=kind, name=name, state=state)


def credential(cid: str, kind: str, name: str, state: str = "active", serial: str = "") -> CredentialRow:
    return CredentialRow(cid, kind, name, serial, T0 + 365 * 24 * 3600 * 10**6, state, T0)


def audit_run(first: int, n: int) -> list[AuditRow]:
    """Rows `first`..`first + n - 1` as the audit log would make them (the store does not look inside;
    the non-ASCII text checks that an entry comes back exactly)."""
    return [
        AuditRow(s, T0 + s, f'{{"seq":{s},"actor":"consumer:opérateur"}}', f"{s:064x}")
        for s in range(first, first + n)
    ]


def checkpoint(first: int, last: int) -> AuditCheckpoint:
    """The checkpoint of the segment `first`..`last` of rows made by `audit_run`."""
    (row,) = audit_run(last, 1)
    return AuditCheckpoint(last, row.mac, first, T0 + first, row.time_us)


def grants_of(snapshot: RegistrySnapshot) -> set[tuple[str, str, str, frozenset[str]]]:
    return {(g.consumer, g.family, g.operation, frozenset(g.devices)) for g in snapshot.grants}


def principals_of(snapshot: RegistrySnapshot) -> dict[tuple[str, str], str]:
    return {(p.kind, p.name): p.state for p in snapshot.principals}


def credentials_of(snapshot: RegistrySnapshot) -> dict[str, str]:
    return {c.id: c.state for c in snapshot.credentials}


class RegistryContract:
    """The registry (principals, credentials, bindings, grants) and the append-only audit table. Mixed
    into `StoreContract`, which provides the `store` fixture."""

    def _seed(self, store: Store) -> tuple[list[RegistryOp], list[AuditRow]]:
        """A registry with one of everything, and the two audit rows that recorded it."""
        ops = [
            principal_op("device", DEV1),
            principal_op("relay", "phone-1"),
            principal_op("consumer", "clinic"),
            RegistryOp("credential", credential=credential("x509:aa", "device", DEV1, serial="0a")),
            RegistryOp("credential", credential=credential("token:bb", "consumer", "clinic")),
            RegistryOp("bind", name="phone-1", device=DEV1),
            RegistryOp("grant", grant=GrantRow("clinic", "steps", "subscribe", (DEV1,))),
        ]
        rows = audit_run(1, 2)
        store.registry_apply(ops, rows)
        return ops, rows

    def test_an_empty_registry(self, store: Store) -> None:
        assert store.registry_snapshot() == RegistrySnapshot(0, (), (), (), ())
        assert store.registry_version() == 0
        assert store.audit_last() is None
        assert store.audit_rows() == []

    def test_each_op_is_reflected_in_the_snapshot(self, store: Store) -> None:
        before = now_us()
        self._seed(store)
        after = now_us()
        snap = store.registry_snapshot()
        assert principals_of(snap) == {
            ("device", DEV1): "active",
            ("relay", "phone-1"): "active",
            ("consumer", "clinic"): "active",
        }
        for p in snap.principals:
            assert before <= p.created_us == p.updated_us <= after
            assert p.last_seen_us is None
        assert sorted(snap.credentials, key=lambda c: c.id) == [
            credential("token:bb", "consumer", "clinic"),
            credential("x509:aa", "device", DEV1, serial="0a"),
        ]
        assert snap.bindings == (("phone-1", DEV1),)
        assert grants_of(snap) == {("clinic", "steps", "subscribe", frozenset({DEV1}))}

        store.registry_apply(
            [
                principal_op("consumer", "clinic", "revoked"),  # an update: the row stays, its state changes
                RegistryOp("credential_state", name="x509:aa", state="revoked"),
                RegistryOp("unbind", name="phone-1", device=DEV1),
                RegistryOp("bind", name="phone-1", device=DEV2),
                RegistryOp("grant", grant=GrantRow("clinic", ADMIN_FAMILY, "admin")),
            ]
        )
        again = store.registry_snapshot()
        assert principals_of(again) == {**principals_of(snap), ("consumer", "clinic"): "revoked"}
        clinic = next(p for p in again.principals if p.name == "clinic")
        assert before <= clinic.created_us <= after and clinic.updated_us >= after
        assert credentials_of(again) == {"x509:aa": "revoked", "token:bb": "active"}
        assert again.bindings == (("phone-1", DEV2),)
        assert grants_of(again) == {
            ("clinic", "steps", "subscribe", frozenset({DEV1})),
            ("clinic", ADMIN_FAMILY, "admin", frozenset()),
        }

    def test_version_grows_with_policy_and_not_with_seen(self, store: Store) -> None:
        self._seed(store)
        v1 = store.registry_version()
        assert v1 > 0 and store.registry_snapshot().version == v1
        seen_at = T0 + 123
        assert store.registry_apply([RegistryOp("seen", kind="device", name=DEV1, time_us=seen_at)]) == v1
        assert store.registry_apply([], audit_run(3, 1)) == v1  # an audit entry alone is not policy
        assert store.registry_version() == v1
        snap = store.registry_snapshot()
        assert snap.version == v1
        last_seen = {p.name: p.last_seen_us for p in snap.principals}
        assert last_seen == {DEV1: seen_at, "phone-1": None, "clinic": None}
        versions = [v1]
        for op in [
            principal_op("consumer", "lab"),
            RegistryOp("grant", grant=GrantRow("lab", "heart", "export")),
            RegistryOp("ungrant", grant=GrantRow("lab", "heart", "export")),
            RegistryOp("revoke", kind="consumer", name="lab"),
        ]:
            returned = store.registry_apply([op])
            assert returned == store.registry_version() == store.registry_snapshot().version
            versions.append(returned)
        assert versions == sorted(set(versions))  # strictly growing

    def test_revoke_revokes_the_principal_and_every_credential_of_it(self, store: Store) -> None:
        self._seed(store)
        store.registry_apply(
            [
                RegistryOp("credential", credential=credential("x509:cc", "device", DEV1, serial="0c")),
                principal_op("device", DEV2),
                RegistryOp("credential", credential=credential("x509:dd", "device", DEV2, serial="0d")),
            ]
        )
        v = store.registry_version()
        assert store.registry_apply([RegistryOp("revoke", kind="device", name=DEV1)]) > v
        snap = store.registry_snapshot()
        assert principals_of(snap) == {
            ("device", DEV1): "revoked",
            ("device", DEV2): "active",
            ("relay", "phone-1"): "active",
            ("consumer", "clinic"): "active",
        }
        assert credentials_of(snap) == {
            "x509:aa": "revoked",
            "x509:cc": "revoked",
            "x509:dd": "active",
            "token:bb": "active",
        }

    def test_a_grant_is_replaced_not_added_to(self, store: Store) -> None:
        self._seed(store)
        other = GrantRow("clinic", "sleep", "export", (DEV3,))
        store.registry_apply([RegistryOp("grant", grant=other)])
        replacing = GrantRow("clinic", "steps", "subscribe", (DEV3, DEV2))
        store.registry_apply([RegistryOp("grant", grant=replacing)])
        assert grants_of(store.registry_snapshot()) == {
            ("clinic", "steps", "subscribe", frozenset({DEV2, DEV3})),
            ("clinic", "sleep", "export", frozenset({DEV3})),
        }
        store.registry_apply([RegistryOp("grant", grant=GrantRow("clinic", "steps", "subscribe"))])
        assert grants_of(store.registry_snapshot()) == {
            ("clinic", "steps", "subscribe", frozenset()),  # every device now
            ("clinic", "sleep", "export", frozenset({DEV3})),
        }

    def test_ungrant_deletes_only_its_grant(self, store: Store) -> None:
        self._seed(store)
        store.registry_apply(
            [
                RegistryOp("grant", grant=GrantRow("clinic", "steps", "export")),
                RegistryOp("grant", grant=GrantRow("clinic", "heart", "subscribe")),
                RegistryOp("grant", grant=GrantRow("lab", "steps", "subscribe")),
            ]
        )
        # the devices of an ungrant do not matter: it names consumer, family and operation
        store.registry_apply([RegistryOp("ungrant", grant=GrantRow("clinic", "steps", "subscribe", (DEV2,)))])
        assert grants_of(store.registry_snapshot()) == {
            ("clinic", "steps", "export", frozenset()),
            ("clinic", "heart", "subscribe", frozenset()),
            ("lab", "steps", "subscribe", frozenset()),
        }

    @pytest.mark.parametrize(
        "bad",
        [
            RegistryOp("delete", kind="device", name=DEV1),  # unknown op
            RegistryOp("principal", kind="robot", name="r2"),  # unknown principal kind
            RegistryOp("principal", kind="device", name="F123456789ABCDEF"),  # upper-case hex
            RegistryOp("principal", kind="device", name=DEV1[:-1]),
            RegistryOp("principal", kind="consumer", name="-dash-first"),
            RegistryOp("principal", kind="consumer", name="clinic", state="paused"),  # unknown state
            RegistryOp("bind", name="phone-1", device="not-a-device"),
            RegistryOp("credential", credential=credential("sha:ee", "device", DEV1)),
            RegistryOp("credential"),
            RegistryOp("credential_state", name="x509:aa", state="lost"),
            RegistryOp("grant"),
            RegistryOp("grant", grant=GrantRow("clinic", "steps", "admin")),  # admin with a family
            RegistryOp("grant", grant=GrantRow("clinic", ADMIN_FAMILY, "subscribe")),
            RegistryOp("grant", grant=GrantRow("clinic", "raw", "subscribe")),  # unknown family
            RegistryOp("grant", grant=GrantRow("clinic", "steps", "write")),  # unknown operation
            RegistryOp("grant", grant=GrantRow("clinic", "steps", "subscribe", (DEV2, "xyz"))),
            RegistryOp("ungrant", grant=GrantRow("clinic", "steps", "delete")),
        ],
        ids=lambda op: op.op,
    )
    def test_a_malformed_op_is_refused_and_nothing_is_written(self, store: Store, bad: RegistryOp) -> None:
        self._seed(store)
        before, rows = store.registry_snapshot(), store.audit_rows()
        valid = RegistryOp("grant", grant=GrantRow("clinic", "heart", "subscribe"))
        with pytest.raises(ValueError):
            store.registry_apply([valid, bad], audit_run(3, 1))
        assert store.registry_snapshot() == before
        assert store.audit_rows() == rows

    @pytest.mark.parametrize("seqs", [[4], [3, 5], [3, 3], [2], [1, 2, 3]], ids=str)
    def test_audit_rows_must_continue_the_log(self, store: Store, seqs: Sequence[int]) -> None:
        self._seed(store)  # rows 1 and 2
        before, rows = store.registry_snapshot(), store.audit_rows()
        bad = [row for s in seqs for row in audit_run(s, 1)]
        with pytest.raises(StoreError):
            store.registry_apply([principal_op("consumer", "lab")], bad)
        assert store.registry_snapshot() == before  # neither the op...
        assert store.audit_rows() == rows  # ...nor any row, not even the ones that did continue
        assert store.registry_apply([principal_op("consumer", "lab")], audit_run(3, 2)) > before.version
        assert store.audit_rows() == audit_run(1, 4)

    def test_the_first_audit_row_is_seq_1(self, store: Store) -> None:
        with pytest.raises(StoreError):
            store.registry_apply([], audit_run(2, 1))
        assert store.audit_last() is None
        store.registry_apply([], audit_run(1, 1))
        assert store.audit_rows() == audit_run(1, 1)

    def test_a_policy_change_and_its_audit_rows_are_stored_together(
        self, harness: Harness, store: Store
    ) -> None:
        self._seed(store)
        before, rows = store.registry_snapshot(), store.audit_rows()
        change = [RegistryOp("revoke", kind="consumer", name="clinic")]
        with harness.exclusive_lock(), pytest.raises(StoreUnavailable):
            store.registry_apply(change, audit_run(3, 1))
        assert store.registry_snapshot() == before
        assert store.audit_rows() == rows
        version = store.registry_apply(change, audit_run(3, 1))  # the retry
        assert version > before.version
        assert principals_of(store.registry_snapshot())[("consumer", "clinic")] == "revoked"
        assert store.audit_rows() == audit_run(1, 3)

    def test_audit_rows_page_in_order(self, store: Store) -> None:
        written: list[AuditRow] = []
        for n in (1, 7, 3, 14):
            batch = audit_run(len(written) + 1, n)
            store.registry_apply([], batch)
            written += batch
        for limit in (1, 4, 25, 1000):
            paged: list[AuditRow] = []
            while page := store.audit_rows(paged[-1].seq if paged else 0, limit):
                assert len(page) <= limit
                paged += page
            assert paged == written
        assert store.audit_rows(10, 5) == written[10:15]
        assert store.audit_rows(len(written)) == []
        assert store.audit_last() == written[-1]

    @pytest.mark.parametrize(
        "bad",
        [
            replace(checkpoint(3, 5), seq=6),  # no such entry
            replace(checkpoint(3, 5), mac="ab" * 32),  # not that entry's MAC
            replace(checkpoint(3, 5), first_seq=0),
            checkpoint(1, 2),  # not after the last checkpoint
        ],
        ids=["absent", "mac", "first", "behind"],
    )
    def test_a_checkpoint_is_of_a_stored_entry_after_the_last(
        self, store: Store, bad: AuditCheckpoint
    ) -> None:
        self._seed(store)  # rows 1 and 2
        store.registry_apply([], [], [checkpoint(1, 2)])
        assert store.audit_checkpoints() == [checkpoint(1, 2)]
        with pytest.raises(StoreError):
            store.registry_apply([principal_op("consumer", "lab")], audit_run(3, 3), [bad])
        assert store.audit_rows() == audit_run(1, 2)  # neither the rows nor the op were written
        assert ("consumer", "lab") not in principals_of(store.registry_snapshot())
        store.registry_apply([], audit_run(3, 3), [checkpoint(3, 5)])  # rows and checkpoint together
        assert store.audit_checkpoints() == [checkpoint(1, 2), checkpoint(3, 5)]
        assert store.audit_checkpoint_last() == checkpoint(3, 5)
        assert store.audit_checkpoints(2, 1) == [checkpoint(3, 5)]

    def test_only_whole_segments_are_dropped_and_never_the_head(self, harness: Harness, store: Store) -> None:
        assert store.audit_checkpoint_last() is None
        store.registry_apply([], audit_run(1, 4), [checkpoint(1, 4)])
        store.registry_apply([], audit_run(5, 4), [checkpoint(5, 8)])
        store.registry_apply([], audit_run(9, 2), [checkpoint(9, 10)])
        for seq in (5, 11):  # inside a segment; past the log
            with pytest.raises(StoreError):
                store.audit_drop_through(seq)
        with pytest.raises(StoreError):
            store.audit_drop_through(10)  # a boundary, but the newest entry: the head stays
        assert store.audit_rows() == audit_run(1, 10)
        assert store.audit_drop_through(8) == 8
        assert store.audit_rows() == audit_run(9, 2)
        assert store.audit_checkpoints() == [checkpoint(5, 8), checkpoint(9, 10)]  # the kept chain from 8
        assert store.audit_drop_through(8) == 0  # again: nothing left to drop
        with pytest.raises(StoreError):
            store.audit_drop_through(4)  # its checkpoint went with the segment after it
        store.registry_apply([], audit_run(11, 1))
        assert store.audit_drop_through(10) == 2
        with harness.new_store() as again:
            assert again.audit_rows() == audit_run(11, 1) == [again.audit_last()]
            assert again.audit_checkpoints() == [checkpoint(9, 10)]

    def test_registry_and_audit_survive_reopening(self, harness: Harness) -> None:
        with harness.new_store() as s:
            self._seed(s)
            snap, rows = s.registry_snapshot(), s.audit_rows()
        with harness.new_store() as s:
            assert s.registry_snapshot() == snap
            assert s.audit_rows() == rows == audit_run(1, 2)
            assert s.audit_last() == rows[-1]

    # the change log: a delta read over an older snapshot is the snapshot a full read gives

    @settings(max_examples=40, deadline=None, suppress_health_check=SHARED_BY_STORES)
    @given(data=st.data())
    def test_a_delta_over_an_older_snapshot_is_a_full_read(
        self, harness: Harness, data: st.DataObject
    ) -> None:
        """Random registry writes (every op, a few names so they collide) between random snapshots: each
        `registry_delta` merged over the snapshot it was asked from equals a full read at that moment
        (order aside; a principal's last_seen_us is no policy and a delta need not carry it)."""
        devices, relays, consumers = [DEV1, DEV2, DEV3], ["r1", "r2"], ["c1", "c2"]
        owners = [("device", d) for d in devices] + [("relay", r) for r in relays]
        owners += [("consumer", c) for c in consumers]
        cids = ["x509:a1", "x509:b2", "token:c3", "token:d4"]
        families = sorted(FAMILIES)
        ownership = st.sampled_from(["o1", "o2"])
        op = st.one_of(
            st.builds(
                lambda o, state: principal_op(*o, state=state),
                st.sampled_from(owners),
                st.sampled_from(["active", "revoked"]),
            ),
            st.builds(
                lambda cid, o, state: RegistryOp("credential", credential=credential(cid, *o, state=state)),
                st.sampled_from(cids),
                st.sampled_from(owners),
                st.sampled_from(["active", "revoked"]),
            ),
            st.builds(
                lambda cid, state: RegistryOp("credential_state", name=cid, state=state),
                st.sampled_from(cids),
                st.sampled_from(["active", "revoked"]),
            ),
            st.builds(lambda o: RegistryOp("revoke", kind=o[0], name=o[1]), st.sampled_from(owners)),
            st.builds(
                lambda op, r, d: RegistryOp(op, name=r, device=d),
                st.sampled_from(["bind", "unbind"]),
                st.sampled_from(relays),
                st.sampled_from(devices),
            ),
            st.builds(
                lambda op, c, f, ds: RegistryOp(op, grant=GrantRow(c, f, "subscribe", tuple(sorted(ds)))),
                st.sampled_from(["grant", "grant", "ungrant"]),
                st.sampled_from(consumers),
                st.sampled_from(families[:3]),
                st.sets(st.sampled_from(devices), max_size=2),
            ),
            st.builds(
                lambda o: RegistryOp("seen", kind=o[0], name=o[1], time_us=now_us()), st.sampled_from(owners)
            ),
            st.builds(
                lambda d, o: RegistryOp("ownership", device=d, ownership=o),
                st.sampled_from(devices),
                ownership,
            ),
            st.builds(
                lambda d, o, f, g: consent_op(d, o, f, g),
                st.sampled_from(devices),
                ownership,
                st.sampled_from(families[:3]),
                st.booleans(),
            ),
            st.builds(
                lambda op, d, o: RegistryOp(op, device=d, ownership=o, name="guardian-1", actor="device:x"),
                st.sampled_from(["guardian", "unguardian"]),
                st.sampled_from(devices),
                ownership,
            ),
            st.builds(
                lambda d, o, v: RegistryOp("profile", device=d, ownership=o, version=v, sealed=bytes([v])),
                st.sampled_from(devices),
                ownership,
                st.integers(1, 4),
            ),
            st.builds(
                lambda d, o, on: RegistryOp("totp", device=d, ownership=o, sealed=b"s" if on else b""),
                st.sampled_from(devices),
                ownership,
                st.booleans(),
            ),
            st.builds(
                lambda d, o, step: RegistryOp("totp_used", device=d, ownership=o, version=step),
                st.sampled_from(devices),
                ownership,
                st.integers(1, 9),
            ),
            st.builds(
                lambda d, o: RegistryOp("forget", device=d, ownership=o),
                st.sampled_from(devices),
                st.sampled_from(["", "o1"]),
            ),
        )

        def canonical(snap: RegistrySnapshot) -> tuple:
            return (
                snap.version,
                snap.changes,
                sorted(repr(replace(p, last_seen_us=None)) for p in snap.principals),
                *(sorted(map(repr, rows)) for rows in (snap.credentials, snap.bindings, snap.grants)),
                *(sorted(map(repr, rows)) for rows in (snap.ownerships, snap.consents, snap.guardians)),
                sorted((r.device, r.ownership, r.version, r.sealed, r.time_us) for r in snap.profiles),
                sorted((r.device, r.ownership, r.version, r.sealed, r.time_us) for r in snap.totp),
            )

        with harness.fresh_database()() as store:
            # snapshots (read or merged) a gateway may still hold, each with the erasures before it
            held = [(store.registry_snapshot(), 0)]
            erasures = 0
            for _ in range(data.draw(st.integers(1, 8), "writes")):
                ops = data.draw(st.lists(op, min_size=1, max_size=4), "ops")
                try:
                    store.registry_apply(ops)
                except StoreError:
                    continue  # a write the schema refuses (a guardian of no ownership...): nothing changed
                erasures += any(o.op == "forget" for o in ops)
                full = store.registry_snapshot()
                for old, erased_before in held:
                    delta = store.registry_delta(old)
                    if delta is None:  # an erasure since leaves a gap: a full read, never a device's name
                        assert erasures > erased_before, "the log holds every other change since"
                        continue
                    assert canonical(merge_registry(old, delta)) == canonical(full), ops
                    # and the consent index a delta updates is the one a full read builds
                    assert ConsentIndex(old).updated(delta).devices == ConsentIndex(full).devices, ops
                delta = store.registry_delta(held[-1][0])
                merged = full if delta is None else merge_registry(held[-1][0], delta)
                held.append((data.draw(st.sampled_from([full, merged]), "held"), erasures))
            unchanged = store.registry_delta(held[-1][0])
            assert unchanged is not None and unchanged.subjects == frozenset()

    def test_a_delta_is_refused_when_the_log_was_pruned_or_names_too_much(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A snapshot older than the log's oldest entry, or a change of more subjects than a delta is
        worth, gets None (the caller reads the whole registry), never a delta that misses a change."""
        module = sys.modules[type(store).__module__]
        monkeypatch.setattr(module, "REGISTRY_CHANGES_KEPT", 3)
        monkeypatch.setattr(module, "MAX_DELTA_SUBJECTS", 2)
        old = store.registry_snapshot()
        store.registry_apply([principal_op("device", DEV1)])  # change 1
        recent = store.registry_snapshot()
        store.registry_apply([principal_op("relay", "r1")])  # 2
        store.registry_apply([principal_op("relay", "r1", "revoked")])  # 3
        assert store.registry_delta(old).subjects == {f"device:{DEV1}", "relay:r1"}  # all still logged
        store.registry_apply([principal_op("relay", "r1")])  # 4: change 1 is pruned
        assert store.registry_delta(old) is None
        delta = store.registry_delta(recent)
        assert delta is not None and delta.subjects == {"relay:r1"}
        assert principals_of(merge_registry(recent, delta)) == principals_of(store.registry_snapshot())
        now = store.registry_snapshot()
        store.registry_apply([principal_op("device", DEV2), principal_op("device", DEV3)])
        assert store.registry_delta(now) is not None  # two subjects: as many as a delta may name
        store.registry_apply([principal_op("consumer", "c1")])
        assert store.registry_delta(now) is None  # three
        assert store.registry_delta(store.registry_snapshot()).subjects == frozenset()


class PrivacyContract:
    """The privacy control plane kept beside the registry: ownerships, consent decisions, guardians,
    sealed profiles and TOTP secrets. Mixed into `StoreContract`."""

    def test_consent_history_is_kept_and_the_latest_per_family_is_in_force(self, store: Store) -> None:
        v0 = store.registry_version()
        store.registry_apply([RegistryOp("ownership", device=DEV1, ownership="o1")])
        decisions = [("steps", True), ("heart", True), ("steps", False), ("sleep", True), ("heart", False)]
        for family, granted in decisions:
            store.registry_apply([consent_op(DEV1, "o1", family, granted)])
        assert store.registry_version() == v0 + 1 + len(decisions)  # each is a policy change
        snap = store.registry_snapshot()
        assert snap.ownerships == (OwnershipRow(DEV1, "o1", snap.ownerships[0].started_us),)
        assert {(c.family, c.granted) for c in snap.consents} == {
            ("steps", False),
            ("heart", False),
            ("sleep", True),
        }
        history = store.privacy_history(DEV1)
        assert [(c.family, c.granted) for c in history.consents] == decisions
        assert all(c.actor == "device:" + DEV1 for c in history.consents)
        assert store.privacy_history(DEV2) == PrivacyHistory(None, (), (), ())

    def test_a_transfer_starts_an_ownership_with_nothing_of_the_last_one_in_force(self, store: Store) -> None:
        store.registry_apply(
            [
                RegistryOp("ownership", device=DEV1, ownership="o1"),
                consent_op(DEV1, "o1", "steps", True),
                RegistryOp("guardian", device=DEV1, ownership="o1", name="guardian-1", actor="operator"),
                RegistryOp("profile", device=DEV1, ownership="o1", version=1, sealed=b"\x01sealed-1"),
                RegistryOp("profile", device=DEV1, ownership="o1", version=2, sealed=b"\x01sealed-2"),
                RegistryOp("totp", device=DEV1, ownership="o1", sealed=b"\x01secret"),
                RegistryOp("ownership", device=DEV2, ownership="o1"),
                consent_op(DEV2, "o1", "heart", True),
            ]
        )
        snap = store.registry_snapshot()
        assert {(c.device, c.family) for c in snap.consents} == {(DEV1, "steps"), (DEV2, "heart")}
        assert [(g.device, g.guardian) for g in snap.guardians] == [(DEV1, "guardian-1")]
        assert [(r.device, r.version, r.sealed) for r in snap.profiles] == [(DEV1, 2, b"\x01sealed-2")]
        assert [(r.device, r.version, r.sealed) for r in snap.totp] == [(DEV1, 0, b"\x01secret")]

        store.registry_apply([RegistryOp("ownership", device=DEV1, ownership="o2")])  # resold
        snap = store.registry_snapshot()
        assert {(o.device, o.ownership) for o in snap.ownerships} == {(DEV1, "o2"), (DEV2, "o1")}
        assert [(c.device, c.family) for c in snap.consents] == [(DEV2, "heart")]
        assert snap.guardians == snap.profiles == snap.totp == ()
        history = store.privacy_history(DEV1)
        assert history.ownership is not None and history.ownership.ownership == "o2"
        assert history.consents == history.guardians == history.profiles == ()

    def test_totp_steps_only_move_forward_and_are_not_policy_changes(self, store: Store) -> None:
        store.registry_apply(
            [
                RegistryOp("ownership", device=DEV1, ownership="o1"),
                RegistryOp("totp", device=DEV1, ownership="o1", sealed=b"\x01secret"),
            ]
        )
        version = store.registry_version()
        for step in (100, 105, 103):
            store.registry_apply([RegistryOp("totp_used", device=DEV1, ownership="o1", version=step)])
        assert store.registry_version() == version
        assert [r.version for r in store.registry_snapshot().totp] == [105]
        store.registry_apply([RegistryOp("totp", device=DEV1, ownership="o1")])  # removed
        assert store.registry_snapshot().totp == ()

    def test_forget_deletes_every_privacy_row_of_one_device_only(self, store: Store) -> None:
        for dev in (DEV1, DEV2):
            store.registry_apply(
                [
                    RegistryOp("ownership", device=dev, ownership="o1"),
                    consent_op(dev, "o1", "steps", True),
                    RegistryOp("guardian", device=dev, ownership="o1", name="g-1", actor="operator"),
                    RegistryOp("profile", device=dev, ownership="o1", version=1, sealed=b"\x01p"),
                    RegistryOp("totp", device=dev, ownership="o1", sealed=b"\x01t"),
                ]
            )
        version = store.registry_version()
        assert store.registry_apply([RegistryOp("forget", device=DEV1)]) == version + 1
        snap = store.registry_snapshot()
        for rows in (snap.ownerships, snap.consents, snap.guardians, snap.profiles, snap.totp):
            assert [r.device for r in rows] == [DEV2]
        assert store.privacy_history(DEV1) == PrivacyHistory(None, (), (), ())
        assert len(store.privacy_history(DEV2).consents) == 1

    @pytest.mark.parametrize(
        "op",
        [
            RegistryOp("forget", device="not-a-device"),
            RegistryOp("consent", device=DEV1, ownership="o1", family="raw", granted=True, actor="x"),
            RegistryOp("consent", device=DEV1, ownership="o1", family="steps", granted=True),  # no actor
            RegistryOp("consent", device="A1", ownership="o1", family="steps", granted=True, actor="x"),
            RegistryOp("ownership", device=DEV1, ownership="O 1"),
            RegistryOp("guardian", device=DEV1, ownership="o1", name="Jane Doe", actor="x"),
            RegistryOp("profile", device=DEV1, ownership="o1", version=0, sealed=b"x"),
            RegistryOp("profile", device=DEV1, ownership="o1", version=1),
            RegistryOp("totp_used", device=DEV1, ownership="o1"),
        ],
    )
    def test_malformed_privacy_ops_are_refused_and_change_nothing(self, store: Store, op: RegistryOp) -> None:
        before = store.registry_snapshot()
        with pytest.raises(ValueError):
            store.registry_apply([RegistryOp("ownership", device=DEV1, ownership="o9"), op])
        assert store.registry_snapshot() == before

    def test_sealed_values_keep_out_of_reprs(self) -> None:
        op = RegistryOp("profile", device=DEV1, ownership="o1", version=1, sealed=b"height=187.3456")
        assert "187.3456" not in repr(op) and "187.3456" not in repr(SealedRow(DEV1, "o1", 1, op.sealed, 0))


def consent_op(device: str, ownership: str, family: str, granted: bool) -> RegistryOp:
    return RegistryOp(
        "consent",
        device=device,
        ownership=ownership,
        family=family,
        granted=granted,
        actor=f"device:{device}",
    )


class OutboxContract:
    """The transactional outbox (gateway/stream): entries commit with their records, name them, go with
    them (erasure, retention), and stay until done. Mixed into `StoreContract`."""

    @pytest.fixture
    def outbox(self, harness: Harness) -> Iterator[Store]:
        s = harness.outbox_store()
        s.open()
        yield s
        s.close()

    def test_the_outbox_is_off_unless_asked_for(self, store: Store) -> None:
        store.commit(A, 1, 0, 0, b"a", minutes(A, 0, 3))
        store.erase_device(A)
        assert store.outbox_take(10) == [] and store.outbox_depth() == 0

    def test_a_message_entry_per_batch_and_family_in_commit_order(self, outbox: Store) -> None:
        first = outbox.commit(A, 1, 0, 0, b"a", [*minutes(A, 0, 2), *minutes(A, 0, 1, "heart")])
        outbox.commit(A, 1, 0, 0, b"a", minutes(A, 5, 2))  # a duplicate batch: nothing new
        outbox.commit(A, 1, 1, 1, b"a", [*minutes(A, 0, 1), *minutes(A, 9, 1)])  # one replayed record
        outbox.commit(B, 1, 0, 0, b"b", minutes(B, 0, 1, "sleep"))
        assert outbox.outbox_depth() == 5  # records, in (A steps, A heart), (A steps: the new one), (B sleep)
        before = now_us()
        rows = outbox.outbox_take(100)
        assert entry_records(rows) == everything(outbox)
        assert [c for c, _ in entry_records(rows[:2])] == list(first.cursors)
        assert [(r.family, r.records, r.start_us) for r in rows] == [
            ("steps", 2, T0),
            ("heart", 1, T0),
            ("steps", 1, T0 + 9 * MINUTE_US),
            ("sleep", 1, T0),
        ]
        assert [r.id for r in rows] == sorted({r.id for r in rows})
        assert [r.msg_id for r in rows] == [f"{r.device}/{r.family}/{r.start_us}/-" for r in rows]
        assert [r.device for r in rows] == [DEV1, DEV1, DEV1, DEV2]
        assert all(r.ownership == "" and r.cursor is None and r.record is None for r in rows)
        assert all(before <= r.taken_us <= now_us() for r in rows)
        assert "values" not in repr(rows[0]) and "start_us" not in repr(rows[0])  # ids only

    def test_a_message_entry_is_the_stream_message_of_its_records(self, outbox: Store) -> None:
        """The bytes the commit encoded are the bytes the drainer would have encoded from the records
        (layout 2), so a consumer cannot tell a message entry's message from a record entries' one."""
        records = [*minutes(A, 0, 20), *minutes(A, 0, 3, "heart")]
        outbox.commit_many([CommitItem(A, 1, 0, 0, b"a", records, ownership="o-1")])
        rows = outbox.outbox_take(10)
        for row in rows:
            assert row.message is not None and row.ownership == "o-1"
            as_records = [
                OutboxRow(0, row.device, "o-1", cursor, record, 0, 1)
                for cursor, record in everything(outbox)
                if record["family"] == row.family
            ]
            (expected,) = messages_of(as_records)
            assert row.message == expected.payload and row.msg_id == expected.msg_id

    def test_entries_stay_until_done_and_keep_their_first_taken_time(self, outbox: Store) -> None:
        for m in range(4):  # a batch a record
            outbox.commit(A, 1, m, m, b"a", minutes(A, m, 1))
        first = outbox.outbox_take(2)
        assert len(first) == 2
        time.sleep(0.002)
        again = outbox.outbox_take(10)  # a drainer that died before the ack: taken again, same times
        assert [r.id for r in again[:2]] == [r.id for r in first]
        assert [r.taken_us for r in again[:2]] == [r.taken_us for r in first]
        assert [r.message for r in again[:2]] == [r.message for r in first]  # the same message, same ID
        assert again[2].taken_us > first[0].taken_us
        assert outbox.outbox_done([r.id for r in first]) == 2
        assert outbox.outbox_done([r.id for r in first]) == 0  # twice: a no-op
        assert [r.id for r in outbox.outbox_take(10)] == [r.id for r in again[2:]]
        assert outbox.outbox_depth() == 2
        outbox.commit(A, 1, 4, 4, b"a", minutes(A, 10, 1))
        assert max(r.id for r in outbox.outbox_take(10)) > max(r.id for r in again)  # ids never reused

    def test_a_big_batch_is_one_entry(self, outbox: Store) -> None:
        big = outbox.commit(A, 1, 0, 0, b"a", minutes(A, 10, 150))
        outbox.commit(A, 1, 1, 1, b"a", minutes(A, 200, 1))
        (row,) = outbox.outbox_take(1)
        assert row.records == 150 and [c for c, _ in entry_records([row])] == list(big.cursors)

    def test_entries_commit_only_with_their_records(self, harness: Harness, outbox: Store) -> None:
        outbox.commit(A, 1, 0, 0, b"a", minutes(A, 0, 1))
        results = outbox.commit_many(
            [
                CommitItem(A, 1, 5, 5, b"a", minutes(A, 1, 2)),  # a gap: refused, nothing written
                CommitItem(B, 1, 0, 0, b"b", minutes(B, 0, 2)),
            ]
        )
        assert isinstance(results[0], SequenceError) and not isinstance(results[1], Exception)
        records = [r for _, r in entry_records(outbox.outbox_take(10))]
        assert records == [*minutes(A, 0, 1), *minutes(B, 0, 2)]
        with harness.exclusive_lock():
            (locked,) = outbox.commit_many([CommitItem(C, 1, 0, 0, b"c", minutes(C, 0, 3))])
        assert isinstance(locked, StoreUnavailable)
        assert outbox.outbox_depth() == 3  # records

    def test_prepared_items_write_the_same_entries(self, outbox: Store) -> None:
        item = outbox.prepare(CommitItem(A, 1, 0, 0, b"a", [*minutes(A, 0, 3), *minutes(A, 0, 1, "heart")]))
        outbox.commit_many([item])
        rows = outbox.outbox_take(10)
        assert [(r.family, r.records) for r in rows] == [("steps", 3), ("heart", 1)]
        assert entry_records(rows) == everything(outbox)

    def test_erasure_takes_the_device_entries_and_leaves_one_purge(self, outbox: Store) -> None:
        outbox.commit(A, 1, 0, 0, b"a", [*minutes(A, 0, 3), *minutes(A, 0, 2, "heart")])
        outbox.commit(B, 1, 0, 0, b"b", minutes(B, 0, 2))
        outbox.erase_device(A)
        rows = outbox.outbox_take(100)
        assert [r.device for r in rows if not r.is_purge] == [DEV2]
        (purge,) = [r for r in rows if r.is_purge]
        assert purge.device == DEV1 and purge.cursor is None and purge.message is None
        assert outbox.outbox_done([purge.id]) == 1
        outbox.erase_device(A)  # again: one more purge, no other change
        assert sum(r.is_purge for r in outbox.outbox_take(100)) == 1

    def test_erasure_of_one_ownership_takes_only_its_entries(self, outbox: Store) -> None:
        outbox.commit_many([CommitItem(A, 1, 0, 0, b"a", minutes(A, 0, 2), ownership="o-old")])
        outbox.commit_many([CommitItem(A, 1, 1, 1, b"a", minutes(A, 5, 2), ownership="o-new")])
        outbox.erase_device(A, ownership="o-old")
        rows = outbox.outbox_take(100)
        assert [(r.ownership, r.start_us) for r in rows if not r.is_purge] == [("o-new", T0 + 5 * MINUTE_US)]

    def test_retention_takes_a_message_entry_with_its_first_record(self, outbox: Store) -> None:
        for m in range(10):  # a batch a minute, a message a family
            outbox.commit(A, 1, m, m, b"a", [*minutes(A, m, 1), *minutes(A, m, 1, "heart")])
        straddling = outbox.commit(A, 1, 10, 10, b"a", minutes(A, 20, 3))
        cut = T0 + 5 * MINUTE_US
        outbox.purge_before(cut, ["heart"])
        outbox.purge_before(cut - MINUTE_US)
        rows = outbox.outbox_take(100)
        left = [(r.family, r.start_us) for r in rows]
        assert left == [
            x
            for m in range(4, 10)
            for x in [("steps", T0 + m * MINUTE_US)] + ([("heart", T0 + m * MINUTE_US)] if m >= 5 else [])
        ] + [("steps", T0 + 20 * MINUTE_US)]
        assert outbox.outbox_depth() == len(left) + 2  # records: the last message holds 3
        # a message goes whole, ID and all, when its first record goes: never a copy under a new ID
        outbox.purge_before(T0 + 21 * MINUTE_US, ["steps"])
        assert [(r.family, r.start_us) for r in outbox.outbox_take(100)] == [
            ("heart", T0 + m * MINUTE_US) for m in range(5, 10)
        ]
        assert [c for c, _ in everything(outbox) if c in straddling.cursors] == list(straddling.cursors[1:])

    def test_the_outbox_survives_reopening(self, harness: Harness) -> None:
        with harness.outbox_store() as s:
            s.commit(A, 1, 0, 0, b"a", minutes(A, 0, 3))
            s.commit(A, 1, 1, 1, b"a", minutes(A, 3, 1))
            taken = s.outbox_take(1)
        with harness.outbox_store() as s:
            rows = s.outbox_take(10)
        assert [r.records for r in rows] == [3, 1] and rows[0].taken_us == taken[0].taken_us


def entry_records(rows: Sequence[OutboxRow]) -> list[tuple[int, dict]]:
    """The (cursor, record) pairs a page of outbox entries publishes, as the store holds them."""
    out: list[tuple[int, dict]] = []
    for row in rows:
        if row.message is not None:
            for r in records_of(row.message):
                cursor = r.pop("cursor")
                out.append((cursor, r))
        elif row.record is not None:
            assert row.cursor is not None
            out.append((row.cursor, row.record))
    return out


class StoreContract(RegistryContract, PrivacyContract):
    """Tests every store implementation runs; `harness` comes from the subclass."""

    @pytest.fixture
    def store(self, harness: Harness) -> Iterator[Store]:
        s = harness.new_store()
        s.open()
        yield s
        s.close()

    # lifecycle

    def test_close_is_safe_without_open_and_twice(self, harness: Harness) -> None:
        s = harness.new_store()
        s.close()
        s.open()
        s.open()  # a no-op, not a second connection
        s.commit(A, 1, 0, 0, b"s", minutes(A, 0, 1))
        s.close()
        s.close()
        with pytest.raises(StoreError):
            s.device(A)
        with harness.new_store() as s2:
            assert s2.device(A) == DeviceRow(A, 1, 0, b"s")
        with pytest.raises(StoreError):
            s2.read_since(0)

    def test_is_a_store(self, store: Store) -> None:
        assert isinstance(store, Store)

    # the batch path

    def test_commit_and_read_back(self, store: Store) -> None:
        records = [*minutes(A, 0, 3), rec(A, "heart", T0, 300, hr_bpm=61.25, flag=True, label="résumé")]
        result = store.commit(A, 7, 0, 9, b"state-1", records)
        assert not result.duplicate
        assert result.high_water == 9
        assert len(result.cursors) == len(records)
        assert all(isinstance(c, int) for c in result.cursors)
        assert list(result.cursors) == sorted(set(result.cursors))
        assert everything(store) == list(zip(result.cursors, records, strict=True))
        assert store.device(A) == DeviceRow(A, 7, 9, b"state-1")
        assert store.device(B) is None
        assert store.latest_cursor() == result.cursors[-1]
        got = everything(store)[-1][1]["values"]
        assert type(got["hr_bpm"]) is float and got["flag"] is True and got["label"] == "résumé"

    @settings(max_examples=40, deadline=None, suppress_health_check=SHARED_BY_STORES)
    @given(
        values=st.dictionaries(
            st.text(max_size=12),
            st.one_of(
                st.floats(allow_nan=False, allow_infinity=False),
                st.integers(-(2**63), 2**63 - 1),
                st.booleans(),
                st.text(max_size=64),
            ),
            max_size=64,
        )
    )
    def test_every_admitted_value_comes_back_exactly(self, harness: Harness, values: dict) -> None:
        """Whatever `check_records` admits is read back equal and of the same type: extreme and tiny
        floats, -0.0, int64 bounds, bools, and non-ASCII labels, through the store's own encoding."""
        with harness.fresh_database()() as store:
            store.commit(A, 1, 0, 0, b"s", [{**rec(A, "steps", T0), "values": values}])
            ((_, got),) = everything(store)
        back = got["values"]
        assert list(back) == list(values)
        for k, v in values.items():
            assert type(back[k]) is type(v) and back[k] == v
            if isinstance(v, float):
                assert np.copysign(1.0, back[k]) == np.copysign(1.0, v)  # -0.0 stays negative

    def test_commit_without_records_moves_state_and_high_water(self, store: Store) -> None:
        assert store.commit(A, 7, 0, 4, b"one", []) == CommitResult(False, 4, ())
        assert store.commit(A, 7, 5, 5, b"two", []) == CommitResult(False, 5, ())
        assert store.device(A) == DeviceRow(A, 7, 5, b"two")
        assert everything(store) == []

    def test_duplicates_are_acked_not_stored(self, store: Store) -> None:
        store.commit(A, 7, 0, 9, b"kept", minutes(A, 0, 4))
        before = everything(store)
        for first, last in [(0, 9), (0, 4), (5, 9), (9, 9), (3, 3)]:
            other = minutes(A, 100, 2)  # even different content is not written
            result = store.commit(A, 7, first, last, b"other", other)
            assert result == CommitResult(duplicate=True, high_water=9, cursors=(None, None))
        assert everything(store) == before
        assert store.device(A) == DeviceRow(A, 7, 9, b"kept")

    def test_gap_is_refused_naming_the_expected_sequence(self, store: Store) -> None:
        store.commit(A, 7, 0, 9, b"s9", minutes(A, 0, 2))
        before, cursor = everything(store), store.latest_cursor()
        with pytest.raises(SequenceError) as err:
            store.commit(A, 7, 12, 15, b"s15", minutes(A, 2, 2))
        assert err.value.expected_seq == 10
        assert "10" in str(err.value)
        assert store.device(A) == DeviceRow(A, 7, 9, b"s9")
        assert everything(store) == before and store.latest_cursor() == cursor
        assert store.commit(A, 7, 10, 15, b"s15", minutes(A, 2, 2)).high_water == 15

    def test_gap_is_accepted_when_the_band_dropped_data(self, store: Store) -> None:
        store.commit(A, 7, 0, 9, b"s9", [])
        result = store.commit(A, 7, 12, 15, b"s15", minutes(A, 2, 2), allow_gap=True)
        assert not result.duplicate and result.high_water == 15
        assert store.device(A) == DeviceRow(A, 7, 15, b"s15")
        assert [r for _, r in everything(store)] == minutes(A, 2, 2)
        with pytest.raises(SequenceError) as err:  # the gap is forgiven once, not forever
            store.commit(A, 7, 18, 20, b"", [])
        assert err.value.expected_seq == 16

    @pytest.mark.parametrize("allow_gap", [False, True])
    def test_straddling_batch_is_refused(self, store: Store, allow_gap: bool) -> None:
        store.commit(A, 7, 0, 9, b"s9", minutes(A, 0, 1))
        before = everything(store)
        with pytest.raises(SequenceError) as err:
            store.commit(A, 7, 5, 14, b"s14", minutes(A, 1, 1), allow_gap=allow_gap)
        assert err.value.expected_seq == 10
        assert store.device(A) == DeviceRow(A, 7, 9, b"s9")
        assert everything(store) == before

    def test_new_boot_starts_a_new_sequence(self, store: Store) -> None:
        store.commit(A, 7, 0, 99, b"boot7", minutes(A, 0, 1))
        assert store.commit(A, 8, 0, 9, b"boot8", minutes(A, 1, 1)).high_water == 9
        assert store.device(A) == DeviceRow(A, 8, 9, b"boot8")
        assert store.commit(A, 8, 0, 9, b"x", []).duplicate
        with pytest.raises(SequenceError) as err:
            store.commit(A, 8, 12, 13, b"x", [])
        assert err.value.expected_seq == 10
        # the dedup key is (device, boot, sequence): a late batch of the earlier boot is still known
        assert store.commit(A, 7, 50, 59, b"x", minutes(A, 2, 1)).duplicate
        assert store.commit(A, 7, 100, 109, b"boot7-again", minutes(A, 3, 1)).high_water == 109
        assert store.device(A) == DeviceRow(A, 7, 109, b"boot7-again")
        assert [r for _, r in everything(store)] == minutes(A, 0, 2) + minutes(A, 3, 1)

    def test_first_batch_of_a_boot_may_start_anywhere(self, store: Store) -> None:
        assert store.commit(B, 3, 500, 509, b"", []).high_water == 509
        assert store.commit(B, 3, 510, 510, b"", []).high_water == 510

    def test_devices_have_their_own_sequences(self, store: Store) -> None:
        store.commit(A, 1, 0, 9, b"a", [])
        store.commit(B, 1, 0, 2, b"b", [])
        assert store.commit(B, 1, 3, 3, b"b2", []).high_water == 3
        assert store.device(A) == DeviceRow(A, 1, 9, b"a")

    def test_a_record_key_is_never_stored_twice(self, store: Store) -> None:
        # A re-commit after a crash that lost the high-water (here: under a new boot) re-emits records.
        first = store.commit(A, 7, 0, 9, b"", minutes(A, 0, 2))
        again = store.commit(A, 8, 0, 9, b"", [*minutes(A, 1, 1), *minutes(A, 2, 1), *minutes(A, 2, 1)])
        assert again.cursors[0] is None and again.cursors[2] is None
        assert isinstance(again.cursors[1], int) and again.cursors[1] > first.cursors[1]
        assert everything(store) == [
            *zip(first.cursors, minutes(A, 0, 2), strict=True),
            (again.cursors[1], minutes(A, 2, 1)[0]),
        ]
        # the first version stays: a record a subscriber has read under a cursor never changes
        changed = {**minutes(A, 0, 1)[0], "algo": "steps/2", "values": {"steps": 0}}
        assert store.commit(A, 9, 0, 0, b"", [changed]).cursors == (None,)
        assert everything(store)[0] == (first.cursors[0], minutes(A, 0, 1)[0])

    @pytest.mark.parametrize(
        "bad",
        [
            {"values": {"x": [1, 2, 3]}},  # raw samples have no place
            {"values": {"x": {"nested": 1}}},
            {"values": {"x": float("nan")}},
            {"values": {"x": "y" * 1000}},
            {"family": "raw"},
            {"device": device_key(B)},
            {"start_us": 1.5},
            {"duration_s": -1},
            {"extra": 1},
        ],
    )
    def test_malformed_records_are_refused_and_nothing_is_written(self, store: Store, bad: dict) -> None:
        store.commit(A, 7, 0, 0, b"s0", [])
        with pytest.raises(ValueError):
            store.commit(A, 7, 1, 1, b"s1", [*minutes(A, 0, 1), {**rec(A, "steps", T0 + MINUTE_US), **bad}])
        assert store.device(A) == DeviceRow(A, 7, 0, b"s0")
        assert everything(store) == []

    @pytest.mark.parametrize(
        "ids",
        [(2**64, 0, 0, 0), (-1, 0, 0, 0), (A, 2**32, 0, 0), (A, 0, 5, 4), (A, 0, 0, 2**32), (A, 0, -1, 3)],
    )
    def test_ids_outside_their_wire_types_are_refused(self, store: Store, ids: tuple[int, ...]) -> None:
        with pytest.raises(ValueError):
            store.commit(*ids, b"", [])

    def test_state_round_trips(self, store: Store) -> None:
        rng = np.random.default_rng(1)
        _, walked = steps.count_steps(rng.integers(-900, 900, (3000, 3)), steps.new_state(50, T0))
        real = DeviceState(
            A, next_us=T0, sample_rate_mhz=50_000, families={"steps": {"values": walked.values, "n": 3}}
        )
        states = [b"", b"\x00", bytes(range(256)) * 3, rng.bytes(200_000), real.to_bytes()]
        for seq, state in enumerate(states):
            store.commit(A, 1, seq, seq, state, [])
            assert store.device(A) == DeviceRow(A, 1, seq, state)
        restored = DeviceState.from_bytes(store.device(A).state)
        assert np.array_equal(restored.families["steps"]["values"], real.families["steps"]["values"])
        assert restored.families["steps"]["n"] == 3
        assert restored.next_us == real.next_us

    # group commit

    def test_group_of_devices_is_stored_in_order(self, store: Store) -> None:
        items = [
            CommitItem(A, 7, 0, 3, b"a", minutes(A, 0, 3)),
            CommitItem(B, 1, 10, 10, b"b", minutes(B, 0, 2, "heart")),
            CommitItem(C, 2, 0, 0, b"c", []),
        ]
        results = store.commit_many(items)
        assert [(r.duplicate, r.high_water) for r in results] == [(False, 3), (False, 10), (False, 0)]
        cursors = [c for r in results for c in r.cursors]
        assert all(isinstance(c, int) for c in cursors)
        assert everything(store) == list(zip(cursors, [r for i in items for r in i.records], strict=True))
        assert store.device(A) == DeviceRow(A, 7, 3, b"a")
        assert store.device(B) == DeviceRow(B, 1, 10, b"b")
        assert store.device(C) == DeviceRow(C, 2, 0, b"c")
        assert store.commit_many([]) == []

    def test_a_failing_item_leaves_no_trace_and_the_others_commit(self, store: Store) -> None:
        store.commit(B, 1, 0, 4, b"b4", minutes(B, 0, 1))
        before_b = everything(store)
        bad_record = {**rec(C, "steps", T0), "values": {"x": [1, 2]}}
        items = [
            CommitItem(A, 7, 0, 0, b"a0", minutes(A, 0, 1)),
            CommitItem(B, 1, 9, 9, b"gap", minutes(B, 5, 2)),  # expected 5
            CommitItem(C, 3, 0, 0, b"bad", [*minutes(C, 0, 1), bad_record]),
            CommitItem(B, 1, 3, 6, b"straddle", minutes(B, 7, 1)),
            CommitItem(A, 7, 1, 1, b"a1", minutes(A, 1, 1)),
        ]
        results = store.commit_many(items)
        assert isinstance(results[1], SequenceError) and results[1].expected_seq == 5
        assert isinstance(results[2], ValueError)
        assert isinstance(results[3], SequenceError) and results[3].expected_seq == 5
        assert [(r.duplicate, r.high_water) for r in (results[0], results[4])] == [(False, 0), (False, 1)]
        assert store.device(B) == DeviceRow(B, 1, 4, b"b4")
        assert store.device(C) is None
        assert everything(store) == [
            *before_b,
            *zip(results[0].cursors, minutes(A, 0, 1), strict=True),
            *zip(results[4].cursors, minutes(A, 1, 1), strict=True),
        ]
        assert store.device(A) == DeviceRow(A, 7, 1, b"a1")
        assert store.commit(B, 1, 5, 5, b"b5", []).high_water == 5  # B's sequence did not move

    def test_prepared_items_commit_as_unprepared_ones_and_cannot_smuggle(self, store: Store) -> None:
        """`prepare` does the checks ahead (any thread); what it made is used only for its own records."""
        bad_record = {**rec(C, "steps", T0), "values": {"x": [1, 2]}}
        with pytest.raises(ValueError):
            store.prepare(CommitItem(C, 3, 0, 0, b"bad", [bad_record]))
        good = store.prepare(CommitItem(A, 7, 0, 1, b"a", minutes(A, 0, 2)))
        # the same preparation with other records swapped in: checked again, and refused
        smuggled = replace(good, records=[bad_record], device_id=C)
        results = store.commit_many([good, smuggled, store.prepare(CommitItem(B, 1, 0, 0, b"b", []))])
        assert [(r.duplicate, r.high_water) for r in (results[0], results[2])] == [(False, 1), (False, 0)]
        assert isinstance(results[1], ValueError)
        assert everything(store) == list(zip(results[0].cursors, minutes(A, 0, 2), strict=True))
        assert store.device(C) is None
        # swapped to another device with the records left as prepared: encoded again from what the item
        # holds (no records), never written under the other device with the first device's rows
        moved = store.prepare(CommitItem(A, 7, 2, 2, b"a2", minutes(A, 2, 1)))
        (result,) = store.commit_many([replace(moved, device_id=B)])
        assert result.cursors == () and store.device(B) == DeviceRow(B, 7, 2, b"a2")
        assert [r for _, r in everything(store)] == minutes(A, 0, 2)
        # an ID swapped to one outside its wire type is refused even on a prepared item
        (bad,) = store.commit_many([replace(moved, boot_id=-1)])
        assert isinstance(bad, ValueError)

    def test_items_of_one_device_see_each_other(self, store: Store) -> None:
        results = store.commit_many(
            [
                CommitItem(A, 7, 0, 4, b"s4", minutes(A, 0, 2)),
                CommitItem(A, 7, 5, 9, b"s9", minutes(A, 2, 2)),
                CommitItem(A, 7, 12, 13, b"gap", []),  # the high-water is 9 now, not "unseen"
                CommitItem(A, 7, 14, 15, b"s15", minutes(A, 4, 1), allow_gap=True),
                CommitItem(A, 8, 0, 0, b"boot8", minutes(A, 5, 1)),
            ]
        )
        assert [getattr(r, "high_water", None) for r in results] == [4, 9, None, 15, 0]
        assert isinstance(results[2], SequenceError) and results[2].expected_seq == 10
        assert [r for _, r in everything(store)] == minutes(A, 0, 4) + minutes(A, 4, 2)
        assert store.device(A) == DeviceRow(A, 8, 0, b"boot8")
        assert store.commit(A, 7, 15, 15, b"", []).duplicate

    def test_a_duplicate_inside_a_group(self, store: Store) -> None:
        results = store.commit_many(
            [
                CommitItem(A, 7, 0, 9, b"first", minutes(A, 0, 2)),
                CommitItem(A, 7, 0, 9, b"again", minutes(A, 0, 2)),  # the band resent it at once
                CommitItem(A, 7, 10, 10, b"next", [*minutes(A, 1, 1), *minutes(A, 2, 1)]),
                CommitItem(B, 1, 0, 0, b"b", minutes(B, 0, 2)),  # after an item with a repeated key
            ]
        )
        assert results[1] == CommitResult(duplicate=True, high_water=9, cursors=(None, None))
        assert results[2].cursors[0] is None and results[2].cursors[1] > results[0].cursors[1]
        assert everything(store) == [
            *zip(results[0].cursors, minutes(A, 0, 2), strict=True),
            (results[2].cursors[1], minutes(A, 2, 1)[0]),
            *zip(results[3].cursors, minutes(B, 0, 2), strict=True),
        ]
        assert store.latest_cursor() == results[3].cursors[-1]
        assert store.device(A) == DeviceRow(A, 7, 10, b"next")

    def test_locked_group_is_all_or_nothing(self, harness: Harness, store: Store) -> None:
        store.commit(A, 7, 0, 9, b"s9", minutes(A, 0, 2))
        before = everything(store)
        items = [
            CommitItem(A, 7, 10, 19, b"s19", minutes(A, 2, 2)),
            CommitItem(B, 1, 0, 0, b"b", minutes(B, 0, 1)),
            CommitItem(A, 7, 30, 31, b"gap", []),
        ]
        with harness.exclusive_lock():
            results = store.commit_many(items)
        assert len(results) == 3 and all(isinstance(r, StoreUnavailable) for r in results)
        assert everything(store) == before
        assert store.device(A) == DeviceRow(A, 7, 9, b"s9") and store.device(B) is None
        retried = store.commit_many(items)  # the retry the bands make
        assert [getattr(r, "high_water", None) for r in retried[:2]] == [19, 0]
        assert isinstance(retried[2], SequenceError) and retried[2].expected_seq == 20
        assert [r for _, r in everything(store)] == minutes(A, 0, 4) + minutes(B, 0, 1)

    @settings(max_examples=40, deadline=None, suppress_health_check=SHARED_BY_STORES)
    @given(data=st.data())
    def test_a_group_equals_its_items_one_by_one(self, harness: Harness, data: st.DataObject) -> None:
        """Random batches (continuing, repeated, gapped, straddling, new boots, repeated and malformed
        records) split into random groups give the same outcomes and the same database as `commit`."""
        items = []
        for _ in range(data.draw(st.integers(1, 14), "items")):
            dev = data.draw(st.sampled_from([A, B]))
            first = data.draw(st.integers(0, 8))
            last = first + data.draw(st.integers(0, 3))
            records = [
                rec(dev, data.draw(st.sampled_from(["steps", "heart"])), T0 + m * MINUTE_US)
                for m in data.draw(st.lists(st.integers(0, 6), max_size=4))
            ]
            if data.draw(st.integers(0, 9)) == 0:
                records.append({**rec(dev, "steps", T0), "family": "raw"})
            boot = data.draw(st.sampled_from([1, 1, 1, 2]))
            items.append(
                CommitItem(dev, boot, first, last, bytes([first, last]), records, data.draw(st.booleans()))
            )
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(items) - 1)), max_size=4), "cuts"))
        groups = [items[a:b] for a, b in zip([0, *cuts], [*cuts, len(items)], strict=True) if a < b]

        def outcome(r: CommitResult | Exception) -> tuple:
            if isinstance(r, SequenceError):
                return ("sequence", r.expected_seq)
            if isinstance(r, Exception):
                return (type(r).__name__,)
            return (r.duplicate, r.high_water, tuple(c is not None for c in r.cursors))

        grouped, single = harness.fresh_database()(), harness.fresh_database()()
        with grouped, single:
            by_group = [r for g in groups for r in grouped.commit_many(g)]
            one_by_one: list[CommitResult | Exception] = []
            for i in items:
                try:
                    one_by_one.append(
                        single.commit(
                            i.device_id,
                            i.boot_id,
                            i.first_seq,
                            i.last_seq,
                            i.state,
                            i.records,
                            allow_gap=i.allow_gap,
                        )
                    )
                except (SequenceError, ValueError) as e:
                    one_by_one.append(e)
            assert [outcome(r) for r in by_group] == [outcome(r) for r in one_by_one]
            assert [r for _, r in everything(grouped)] == [r for _, r in everything(single)]
            assert [grouped.device(d) for d in (A, B)] == [single.device(d) for d in (A, B)]
            cursors = [
                (c, r)
                for i, res in zip(items, by_group, strict=True)
                if isinstance(res, CommitResult)
                for c, r in zip(res.cursors, i.records, strict=True)
                if c is not None
            ]
            assert everything(grouped) == cursors

    # subscribe

    @settings(max_examples=25, deadline=None, suppress_health_check=SHARED_BY_STORES)
    @given(data=st.data())
    def test_cursor_delivers_every_record_exactly_once(self, harness: Harness, data: st.DataObject) -> None:
        """A subscriber reading with random page sizes and filters, between commits and across reopens,
        sees exactly the matching records that were inserted, in commit order."""
        families = data.draw(st.none() | st.sets(st.sampled_from(sorted(FAMILIES)), min_size=1), "families")
        device = data.draw(st.none() | st.sampled_from([A, B, C]).map(device_key), "device")
        new_store = harness.fresh_database()
        store = new_store()
        store.open()
        try:
            committed: list[tuple[int, dict]] = []  # what was inserted, in commit order
            stored: dict[tuple, dict] = {}  # by record key
            seq = dict.fromkeys([A, B, C], 0)
            seen: list[tuple[int, dict]] = []
            cursor = 0

            def read(limit: int) -> list[tuple[int, dict]]:
                return store.read_since(cursor, families=families, device=device, limit=limit)

            for _ in range(data.draw(st.integers(1, 12), "steps")):
                op = data.draw(st.sampled_from(["commit", "commit", "read", "reopen"]))
                if op == "commit":
                    dev = data.draw(st.sampled_from([A, B, C]))
                    base = T0 + len(stored) * MINUTE_US
                    batch = [
                        rec(dev, data.draw(st.sampled_from(sorted(FAMILIES))), base + i)
                        for i in range(data.draw(st.integers(0, 6)))
                    ]
                    old = [r for r in stored.values() if r["device"] == device_key(dev)]
                    if old and data.draw(st.booleans()):  # a record stored before, sent again
                        batch.insert(data.draw(st.integers(0, len(batch))), data.draw(st.sampled_from(old)))
                    n = data.draw(st.integers(1, 3))
                    result = store.commit(dev, 1, seq[dev], seq[dev] + n - 1, b"", [dict(r) for r in batch])
                    seq[dev] += n
                    fresh = []
                    for r in batch:
                        key = (r["device"], r["family"], r["start_us"])
                        fresh.append(key not in stored)
                        stored.setdefault(key, r)
                    assert [c is not None for c in result.cursors] == fresh
                    new = [(c, r) for c, r in zip(result.cursors, batch, strict=True) if c is not None]
                    assert [c for c, _ in committed + new] == sorted({c for c, _ in committed + new})
                    committed += new
                elif op == "read":
                    page = read(data.draw(st.integers(1, 5)))
                    seen += page
                    cursor = page[-1][0] if page else cursor
                else:  # a subscriber survives a gateway restart with nothing but its cursor
                    store.close()
                    store = new_store()
                    store.open()
            while page := read(data.draw(st.integers(1, 7))):
                seen += page
                cursor = page[-1][0]
            want = [
                (c, r)
                for c, r in committed
                if (families is None or r["family"] in families) and (device is None or r["device"] == device)
            ]
            assert seen == want
            assert store.latest_cursor() >= max([0, *(c for c, _ in committed)])
        finally:
            store.close()

    def test_read_since_limits_and_filters(self, store: Store) -> None:
        store.commit(A, 1, 0, 0, b"", minutes(A, 0, 5) + minutes(A, 0, 2, "heart"))
        store.commit(B, 1, 0, 0, b"", minutes(B, 0, 3))
        assert len(store.read_since(0, limit=4)) == 4
        assert [r["family"] for _, r in store.read_since(0, families={"heart"})] == ["heart", "heart"]
        assert {r["device"] for _, r in store.read_since(0, device=device_key(B))} == {device_key(B)}
        assert store.read_since(0, families=set()) == []
        assert store.read_since(store.latest_cursor()) == []
        with pytest.raises(ValueError):
            store.read_since(0, limit=0)

    def test_latest_cursor_never_goes_back(self, store: Store) -> None:
        assert store.latest_cursor() == 0
        store.commit(B, 1, 0, 0, b"", minutes(B, 0, 2))
        last = store.commit(A, 1, 0, 0, b"", minutes(A, 0, 3)).cursors[-1]
        assert store.latest_cursor() == last
        store.erase_device(A)  # the newest records go; their cursors are not handed out again
        assert store.latest_cursor() == last
        assert store.read_since(last) == []
        new = store.commit(B, 1, 1, 1, b"", minutes(B, 5, 1)).cursors[0]
        assert new is not None and new > last
        assert store.read_since(last) == [(new, minutes(B, 5, 1)[0])]

    # privacy and retention

    def test_export_returns_exactly_the_device(self, store: Store) -> None:
        a_steps = minutes(A, 10, 3)
        a_heart = minutes(A, 0, 12, "heart")
        store.commit(A, 7, 0, 3, b"a-state", a_steps)
        store.commit(B, 1, 0, 0, b"b-state", minutes(B, 0, 4))
        store.commit(A, 8, 0, 5, b"a-state-2", a_heart)
        items = list(store.export_device(A))
        summary, records = items[0], items[1:]
        assert summary["kind"] == "device" and summary["device"] == device_key(A)
        assert (summary["boot_id"], summary["last_seq"], summary["state"]) == (8, 5, b"a-state-2")
        assert sorted((b["boot_id"], b["last_seq"]) for b in summary["boots"]) == [(7, 3), (8, 5)]
        assert summary["records"] == len(a_steps) + len(a_heart)
        assert all(item["kind"] == "record" for item in records)
        want = sorted(a_steps + a_heart, key=lambda r: (r["start_us"], r["family"]))
        assert [item["record"] for item in records] == want
        assert list(store.export_device(C)) == []

    def test_erase_removes_one_device_and_nothing_else(self, store: Store) -> None:
        store.commit(A, 7, 0, 3, b"a", minutes(A, 0, 4) + minutes(A, 0, 2, "sleep"))
        store.commit(B, 1, 0, 0, b"b", minutes(B, 0, 3))
        store.commit(A, 8, 0, 1, b"a2", minutes(A, 10, 1))
        b_before = [(c, r) for c, r in everything(store) if r["device"] == device_key(B)]
        assert store.erase_device(A) == 7
        assert store.device(A) is None
        assert list(store.export_device(A)) == []
        assert everything(store) == b_before
        assert store.device(B) == DeviceRow(B, 1, 0, b"b")
        assert store.erase_device(A) == 0
        if getattr(store, "sealer", None) is None:
            # no key for a pseudonym, so no tombstone: the band's next batch of the old boot starts afresh
            assert not store.commit(A, 7, 0, 3, b"a3", minutes(A, 0, 1)).duplicate
            return
        # a tombstone under the device's pseudonym: batches the band resends from before the erasure are
        # acked (duplicates) and dropped; what follows them is new data, and is stored
        resent = store.commit(A, 7, 0, 3, b"a3", minutes(A, 0, 1))
        assert resent.duplicate and resent.high_water == 3
        assert store.commit(A, 8, 1, 1, b"a3", minutes(A, 0, 1)).duplicate
        assert store.device(A) is None and everything(store) == b_before
        after = store.commit(A, 7, 4, 4, b"a4", minutes(A, 20, 1))
        assert not after.duplicate and store.device(A) == DeviceRow(A, 7, 4, b"a4")
        assert len(everything(store)) == len(b_before) + 1

    # per-device rate limits (`take_tokens`)

    def test_token_buckets_are_per_device_and_bucket_and_shared_by_every_store_object(
        self, store: Store, harness: Harness
    ) -> None:
        slow = dict(rate=1e-3, burst=2.0, need=1.0, charge=1.0)  # refills one token in 1,000 s
        assert store.take_tokens(A, "batches", **slow) == 0.0
        with harness.new_store() as other:  # another process or gateway on the same store
            assert other.take_tokens(A, "batches", **slow) == 0.0
            assert 990 < other.take_tokens(A, "batches", **slow) <= 1000
        assert 990 < store.take_tokens(A, "batches", **slow) <= 1000  # a refusal takes nothing
        assert store.take_tokens(B, "batches", **slow) == 0.0
        assert store.take_tokens(A, "samples", **slow) == 0.0

    def test_token_buckets_refill_and_may_be_charged_below_zero(self, store: Store) -> None:
        assert store.take_tokens(A, "batches", rate=2.0, burst=1.0, need=1.0, charge=1.0) == 0.0
        assert 0 < store.take_tokens(A, "batches", rate=2.0, burst=1.0, need=1.0, charge=1.0) <= 0.5
        time.sleep(0.55)
        assert store.take_tokens(A, "batches", rate=2.0, burst=1.0, need=1.0, charge=1.0) == 0.0
        # samples are charged after decoding, whatever the level: the next admission waits for the debt
        # (a slow refill: the second call may come a second after the first on a loaded box)
        assert store.take_tokens(A, "samples", rate=1.0, burst=5.0, need=-float("inf"), charge=25) == 0.0
        assert 19 < store.take_tokens(A, "samples", rate=1.0, burst=5.0, need=0.0, charge=0.0) <= 20

    def test_erasure_removes_the_devices_token_buckets(self, store: Store) -> None:
        store.commit(A, 1, 0, 0, b"a", minutes(A, 0, 1))
        assert store.take_tokens(A, "batches", rate=1e-3, burst=1.0, need=1.0, charge=1.0) == 0.0
        store.erase_device(A)
        # full again: the bucket went with the device
        assert store.take_tokens(A, "batches", rate=1e-3, burst=1.0, need=1.0, charge=1.0) == 0.0

    def test_purge_before(self, store: Store) -> None:
        store.commit(A, 1, 0, 0, b"a", minutes(A, 0, 10))
        store.commit(B, 1, 0, 0, b"b", minutes(B, 3, 5, "activity"))
        cut = T0 + 5 * MINUTE_US
        kept = [(c, r) for c, r in everything(store) if r["start_us"] >= cut]
        assert store.purge_before(cut) == 5 + 2
        assert everything(store) == kept
        assert store.purge_before(cut) == 0
        assert store.device(A) == DeviceRow(A, 1, 0, b"a")  # retention is about records, not state
        assert store.commit(A, 1, 0, 0, b"", []).duplicate

    def test_purge_before_by_family(self, store: Store) -> None:
        """Retention per family: only the named families go, whichever table they share with others."""
        store.commit(A, 1, 0, 0, b"a", [*minutes(A, 0, 10), *minutes(A, 0, 10, "heart")])
        store.commit(A, 1, 1, 1, b"a", [*minutes(A, 0, 10, "sleep"), *minutes(A, 0, 10, "day")])
        store.commit(B, 1, 0, 0, b"b", minutes(B, 3, 5, "activity"))  # activity shares steps' table
        store.commit(A, 2, 0, 0, b"a2", [])  # a new boot: boot 1 is a past one now
        cut = T0 + 5 * MINUTE_US
        kept = everything(store)

        def without(*families: str) -> list[tuple[int, dict]]:
            return [(c, r) for c, r in kept if not (r["family"] in families and r["start_us"] < cut)]

        with pytest.raises(ValueError):
            store.purge_before(cut, ["heart", "raw_accel"])
        assert everything(store) == kept
        assert store.purge_before(cut, ["heart"]) == 5
        assert everything(store) == without("heart")
        assert store.purge_before(cut, ["steps", "sleep"]) == 5 + 5
        kept = without("heart", "steps", "sleep")
        assert everything(store) == kept
        assert [r["start_us"] for _, r in kept if r["device"] == DEV2] == [
            T0 + m * MINUTE_US for m in range(3, 8)
        ]
        assert store.purge_before(cut, []) == 0 and store.purge_before(cut, ["heart"]) == 0
        # a purge of some families keeps every boot's high-water: a boot's batches hold any family
        assert store.purge_before(now_us() + 10**9, ["day"]) == 10
        assert store.commit(A, 1, 1, 1, b"", []).duplicate
        assert everything(store) == [(c, r) for c, r in kept if r["family"] != "day"]

    # durability and versions

    def test_reopen_keeps_everything(self, harness: Harness) -> None:
        with harness.new_store() as s:
            s.commit(A, 7, 0, 9, b"a", minutes(A, 0, 3))
            s.commit(B, 2, 0, 4, b"b", minutes(B, 0, 2, "night"))
            records, latest = everything(s), s.latest_cursor()
        with harness.new_store() as s:
            assert everything(s) == records
            assert s.latest_cursor() == latest
            assert s.device(A) == DeviceRow(A, 7, 9, b"a")
            assert s.device(B) == DeviceRow(B, 2, 4, b"b")
            assert s.commit(A, 7, 0, 9, b"", []).duplicate
            assert s.commit(A, 7, 10, 10, b"", minutes(A, 3, 1)).cursors[0] > latest

    def test_an_older_file_is_migrated(self, harness: Harness) -> None:
        with harness.new_store() as s:
            s.commit(A, 7, 0, 9, b"a", minutes(A, 0, 3))
            records = everything(s)
        with harness.newer_store() as newer:
            assert everything(newer) == records
            assert newer.device(A) == DeviceRow(A, 7, 9, b"a")
            assert newer.commit(A, 7, 5, 9, b"", []).duplicate
            newer.commit(A, 7, 10, 10, b"b", minutes(A, 3, 1))
        # the file now carries the newer version: the current code refuses it
        with pytest.raises(SchemaVersionError):
            harness.new_store().open()

    def test_a_newer_file_is_refused(self, harness: Harness) -> None:
        with harness.new_store() as s:
            s.commit(A, 7, 0, 9, b"a", minutes(A, 0, 1))
        harness.write_schema_version(harness.schema_version() + 1)
        s = harness.new_store()
        with pytest.raises(SchemaVersionError, match="newer"):
            s.open()
        s.close()
        harness.write_schema_version(harness.schema_version())
        with harness.new_store() as s:  # refusing touched nothing
            assert s.device(A) == DeviceRow(A, 7, 9, b"a")

    # contention

    def test_locked_database_is_unavailable_and_loses_nothing(self, harness: Harness, store: Store) -> None:
        store.commit(A, 7, 0, 9, b"s9", minutes(A, 0, 2))
        before = everything(store)
        with harness.exclusive_lock():
            with pytest.raises(StoreUnavailable):
                store.commit(A, 7, 10, 19, b"s19", minutes(A, 2, 2))
            with pytest.raises(StoreUnavailable):
                store.erase_device(A)
            assert store.device(A) == DeviceRow(A, 7, 9, b"s9")  # readers are not blocked
            with harness.new_store() as reader:  # nor is opening a store that needs no migration
                assert everything(reader) == before
        assert everything(store) == before
        result = store.commit(A, 7, 10, 19, b"s19", minutes(A, 2, 2))  # the retry the band makes
        assert not result.duplicate and result.high_water == 19
        assert [r for _, r in everything(store)] == minutes(A, 0, 4)

    def test_readers_see_whole_commits_while_a_writer_writes(self, harness: Harness, store: Store) -> None:
        per_batch, n_batches = 5, 40
        done, reading = threading.Event(), threading.Event()
        errors: list[BaseException] = []
        snapshots: list[list[tuple[int, dict]]] = []
        paged: list[tuple[int, dict]] = []

        def read() -> None:
            try:
                with harness.new_store() as reader:
                    cursor = 0
                    while True:
                        finished = done.is_set()
                        snapshots.append(everything(reader))
                        reading.set()
                        while page := reader.read_since(cursor, limit=3):
                            paged.extend(page)
                            cursor = page[-1][0]
                        if finished:
                            return
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=read)
        thread.start()
        reading.wait(30)  # the reader is reading before the writer writes (its connect may take a while)
        committed: list[tuple[int, dict]] = []
        exporter = harness.new_store()
        exporter.open()
        try:
            export = exporter.export_device(A)
            for i in range(n_batches):
                batch = minutes(A, i * per_batch, per_batch)
                committed += zip(store.commit(A, 1, i, i, b"", batch).cursors, batch, strict=True)
                if i == 1:
                    assert next(export)["records"] == 2 * per_batch  # a snapshot holds; the writer goes on
            assert len(list(export)) == 2 * per_batch
        finally:
            exporter.close()
            done.set()
            thread.join(60)
        assert not errors, errors
        assert paged == committed
        assert len(snapshots) >= 2
        for snap in snapshots:
            assert len(snap) % per_batch == 0  # never half a commit
            assert snap == committed[: len(snap)]
