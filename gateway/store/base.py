"""The store contract: what the gateway needs from a sink, and the rules every sink applies the same way.

A batch is acknowledged only after `Store.commit` returns: its feature records, the device's new state
and its high-water sequence number are then stored together, in one transaction, or not at all. The
sequence rules (`check_sequence`) and the record checks (`check_records`) live here, not in each
implementation, so SQLite and any later sink accept and refuse exactly the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, runtime_checkable

from decoder import records

RECORD_KEYS = frozenset({"family", "device", "start_us", "duration_s", "algo", "values"})
FAMILIES = frozenset(records.FAMILIES)
MAX_VALUE_STR = 64  # a value is a number or a short label; anything longer is not a feature
MAX_VALUES = 64  # keys in one record's `values`
U32 = 2**32
U64 = 2**64


class StoreError(Exception):
    """Anything the store refuses or cannot do."""


class Unreadable(StoreError):  # noqa: N818 - a state of the row (its key erased, or moved), not a bug
    """A sealed value that does not open: its data key is destroyed (an erased device), or it was copied
    from another row (tampering). Reported by identifiers; never served."""


class StoreUnavailable(StoreError):  # noqa: N818 - the gRPC status it maps to, not a kind of bug
    """The store cannot write now (locked, disk full, I/O error) and wrote nothing: do not ack; retry."""


class AuditConflict(StoreError):  # noqa: N818 - a race lost, not a bug: catch up and try again
    """Audit rows that do not continue the log: another writer (a second gateway on the same store, a
    CLI) appended first. Nothing was stored."""


class SchemaVersionError(StoreError):
    """The database was written by a newer bandgate (or is not a bandgate database); opening it is refused."""


class SequenceError(StoreError):
    """A batch that neither continues its boot's sequence nor repeats it: a gap, or an overlap (straddle)."""

    def __init__(self, device_id: int, boot_id: int, first_seq: int, last_seq: int, expected_seq: int):
        self.device_id = device_id
        self.boot_id = boot_id
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.expected_seq = expected_seq
        kind = "gap" if first_seq > expected_seq else "overlap"
        super().__init__(
            f"device {device_id:016x} boot {boot_id}: batch {first_seq}..{last_seq} is a sequence {kind}, "
            f"expected sequence {expected_seq}"
        )

    def __reduce__(self) -> tuple:  # crosses from a compute worker process intact
        return type(self), (self.device_id, self.boot_id, self.first_seq, self.last_seq, self.expected_seq)


@dataclass(frozen=True)
class DeviceRow:
    """What the store keeps of a device: its current boot, that boot's high-water, its feature state."""

    device_id: int
    boot_id: int
    last_seq: int  # highest sequence number stored for `boot_id`
    state: bytes  # decoder.features.DeviceState.to_bytes(); opaque to the store


@dataclass(frozen=True)
class CommitResult:
    """The outcome of one `Store.commit`."""

    duplicate: bool  # the batch was stored before: nothing written, ack it again
    high_water: int  # the boot's high-water after the commit
    cursors: tuple[int | None, ...]  # one per record passed in: its cursor, or None if not inserted


@dataclass(frozen=True)
class CommitItem:
    """The arguments of one `Store.commit`, so several can be committed as a group (`Store.commit_many`)."""

    device_id: int
    boot_id: int
    first_seq: int
    last_seq: int
    state: bytes
    records: list[dict]
    allow_gap: bool = False
    # What `Store.prepare` made of the item (the store's own type; it checks that it is its own).
    prepared: Any = field(default=None, compare=False, repr=False)
    # Whose the data is (gateway/privacy/ownership.py): its records and state are sealed under this
    # ownership's data key. "" for a device without one (a development gateway).
    ownership: str = ""


@dataclass(frozen=True)
class OutboxRow:
    """One entry of the transactional outbox (`Store.outbox_take`), of one of three kinds:

    - a **message** (`message` set): a batch's records of one family, encoded as the stream carries them
      (gateway/stream/base.py) once at the commit and sealed there, opened here; `family` and
      `start_us` are its first record's, so its ID (`msg_id`) is fixed in the row, and `records` counts
      what it holds. What a store writes since schema 9 (SQLite) and 4 (PostgreSQL).
    - a **record** (`record` set, with its `cursor`): one stored record, written by an older gateway;
      `batch` names its commit (the first cursor it inserted; None before that), so the stream still
      publishes a batch's records of a family as one message, and a take never splits a batch.
    - a **purge** (neither): an erased device whose stream messages are still to be purged.

    `taken_us` is when a drainer first took the entry: an entry taken before may have been published
    already, and only the stream's duplicate window makes its republish harmless
    (gateway/stream/drainer.py)."""

    id: int
    device: str
    ownership: str
    cursor: int | None
    record: dict | None
    taken_us: int
    batch: int | None = None
    message: bytes | None = None
    family: str = ""
    start_us: int = 0
    records: int = 0

    @property
    def is_purge(self) -> bool:
        return self.record is None and self.message is None

    @property
    def msg_id(self) -> str:
        """A message entry's stream message ID, `<device>/<family>/<start_us>/<ownership>`: the key of
        its first record, as the drainer names a message of record entries."""
        return f"{self.device}/{self.family}/{self.start_us}/{self.ownership or '-'}"

    def __repr__(self) -> str:  # ids only: a record's values stay out of logs
        if self.message is not None:
            kind = f"message {self.family} {self.start_us} of {self.records}"
        else:
            kind = f"record {self.cursor}" if self.record is not None else "purge"
        return f"OutboxRow({self.id}, {kind}, {self.device})"


PRINCIPAL_KINDS = frozenset({"device", "relay", "consumer"})
PRINCIPAL_STATES = frozenset({"active", "revoked"})
OPERATIONS = frozenset({"subscribe", "export", "admin"})
ADMIN_FAMILY = "*"  # the family column of an admin grant: admin carries no data by itself
# The registry change log (`Store.registry_delta`): entries kept, and the subjects past which a delta is
# no cheaper than reading the whole registry (a delta reads each subject's rows by key).
REGISTRY_CHANGES_KEPT = 100_000
MAX_DELTA_SUBJECTS = 5_000


@dataclass(frozen=True)
class PrincipalRow:
    """A registered device, relay or consumer (`name`: a device's 16 hex digits, or a relay's or
    consumer's name)."""

    kind: str
    name: str
    state: str  # active | revoked
    created_us: int
    updated_us: int
    last_seen_us: int | None = None


@dataclass(frozen=True)
class CredentialRow:
    """One credential of a principal: a certificate (`id` "x509:<sha256 of DER>") or a bearer token
    (`id` "token:<sha256 of the token>": the token itself is never stored)."""

    id: str
    kind: str
    name: str
    serial: str  # a certificate's serial number in hex; "" for a token
    not_after_us: int  # 0: no expiry
    state: str
    created_us: int

    def __repr__(self) -> str:  # the id of a token credential is a digest, but keep logs to the identity
        return f"CredentialRow({self.kind}:{self.name}, serial={self.serial or '-'}, state={self.state})"


@dataclass(frozen=True)
class GrantRow:
    """`consumer` may do `operation` on `family` (ADMIN_FAMILY for admin), for every device (`devices`
    empty) or only those listed (16-hex device names)."""

    consumer: str
    family: str
    operation: str
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class OwnershipRow:
    """Who a device's data belongs to now: an ownership starts at registration or at a transfer (a resold
    band), and a device's data keys, consent and profile belong to one ownership."""

    device: str
    ownership: str
    started_us: int


@dataclass(frozen=True)
class ConsentRow:
    """One consent decision: `granted` or withdrawn, for one family of one device's ownership, by `actor`
    (the owner's credential, or an operator). The store keeps every decision; a snapshot holds the
    latest per (device, ownership, family)."""

    device: str
    ownership: str
    family: str
    granted: bool
    time_us: int
    actor: str


@dataclass(frozen=True)
class GuardianRow:
    """A guardian's consent for a minor's ownership: who (a reference, never a free-text name) and when."""

    device: str
    ownership: str
    guardian: str
    time_us: int
    actor: str


@dataclass(frozen=True)
class SealedRow:
    """A sealed (encrypted) personal value of an ownership: a profile version, or a TOTP secret with the
    last time step used (`version`). The store never sees what is inside."""

    device: str
    ownership: str
    version: int
    sealed: bytes
    time_us: int

    def __repr__(self) -> str:
        return f"SealedRow({self.device}/{self.ownership} v{self.version}, {len(self.sealed)} bytes)"


@dataclass(frozen=True)
class RegistrySnapshot:
    """Everything the registry holds, read in one transaction, at `version`: identities and grants
    (gateway/security), and each device's current ownership with its latest consent, guardian, profile
    and TOTP (gateway/privacy)."""

    version: int
    principals: tuple[PrincipalRow, ...]
    credentials: tuple[CredentialRow, ...]
    bindings: tuple[tuple[str, str], ...]  # (relay name, device name)
    grants: tuple[GrantRow, ...]
    ownerships: tuple[OwnershipRow, ...] = ()  # current ownerships only
    consents: tuple[ConsentRow, ...] = ()  # latest per family, of current ownerships
    guardians: tuple[GuardianRow, ...] = ()  # of current ownerships
    profiles: tuple[SealedRow, ...] = ()  # latest version, of current ownerships
    totp: tuple[SealedRow, ...] = ()  # of current ownerships; version = last time step used
    changes: int = 0  # the registry change log's last entry this snapshot includes (`Store.registry_delta`)


@dataclass(frozen=True)
class RegistryDelta:
    """What changed in the registry after a snapshot (`Store.registry_delta`): the subjects touched
    ("kind:name", `subject`) and, in `rows` (at the newest version and change), every row about each of
    them now and no other. `merge_registry` lays it over the older snapshot."""

    subjects: frozenset[str]
    rows: RegistrySnapshot
    since: int = 0  # the change number of the snapshot it was read after


def subject(kind: str, name: str) -> str:
    """How the registry change log names a principal: every registry row is about one or two of them."""
    return f"{kind}:{name}"


def names_by_kind(subjects: Iterable[str]) -> dict[str, set[str]]:
    """Subjects ("kind:name") as the names of each principal kind (every kind a key)."""
    names: dict[str, set[str]] = {kind: set() for kind in sorted(PRINCIPAL_KINDS)}
    for s in subjects:
        kind, _, name = s.partition(":")
        names[kind].add(name)
    return names


def op_subjects(op: RegistryOp) -> set[str]:
    """The principals whose rows `op` may change, as far as the op itself tells: a store adds the owner
    of a credential whose state changes and the consumers whose grants a "forget" narrows. "seen" names
    none: last-seen times are not policy, and a delta does not carry them."""
    if op.op == "seen":
        return set()
    if op.op in ("principal", "revoke"):
        return {subject(op.kind, op.name)}
    if op.op == "credential":
        assert op.credential is not None
        return {subject(op.credential.kind, op.credential.name)}
    if op.op in ("bind", "unbind"):
        return {subject("relay", op.name), subject("device", op.device)}
    if op.op in ("grant", "ungrant"):
        assert op.grant is not None
        return {subject("consumer", op.grant.consumer)}
    if op.op == "credential_state":
        return set()  # the store names the credential's owner
    return {subject("device", op.device)}  # ownership, consent, guardians, profile, TOTP, forget


def change_entries(touched: set[str], ops: Sequence[RegistryOp], last: int) -> tuple[list[str], int]:
    """The subjects a registry write logs, and the change number after which they go (`last` is the
    log's newest). A bump that touched nothing is logged too ('' names no subject). An erased device
    ("forget") is never named: the store deletes its earlier entries, and the write's entries go after
    a number left out, so every snapshot from before it sees a gap (`change_log_whole`) and reads the
    whole registry, which no longer holds the device."""
    erased = {subject("device", op.device) for op in ops if op.op == "forget"}
    listed = sorted(touched - erased) or [""]
    return listed, last + 1 if erased else last


def change_log_whole(
    snapshot: RegistrySnapshot, version: int, last: int, logged: int, first: int | None, versions: int
) -> bool:
    """Whether a store's change log holds every change after `snapshot`, read with the registry at
    `version`: its entries after the snapshot's run unbroken (`logged` of them, the first numbered
    `first`) to the newest (`last`), and each version bumped since has entries (`versions`: the distinct
    versions above the snapshot's among them). A pruned log shows as a gap, and so does a writer that
    bumps the version without logging (a gateway from before the log, during a rolling upgrade)."""
    if version < snapshot.version or last < snapshot.changes:
        return False  # another store, or one restored from an older backup
    if logged != last - snapshot.changes or (logged and first != snapshot.changes + 1):
        return False
    return versions == version - snapshot.version


def read_privacy_history(execute: Callable[[str, tuple], Any], device: str, mark: str) -> PrivacyHistory:
    """`Store.privacy_history` inside a store's read transaction, the same queries for both: `execute` is
    the connection's (sqlite3 or psycopg), `mark` its parameter placeholder ("?" or "%s")."""
    row = execute(
        f"SELECT device, ownership, started_us FROM ownerships WHERE device = {mark} AND ended_us IS NULL",
        (device,),
    ).fetchone()
    if row is None:
        return PrivacyHistory(None, (), (), ())
    key = (device, row[1])
    mine = f"WHERE device = {mark} AND ownership = {mark}"
    consents = tuple(
        ConsentRow(d, o, f, bool(g), t, a)
        for d, o, f, g, t, a in execute(
            f"SELECT device, ownership, family, granted, time_us, actor FROM consent {mine} ORDER BY seq", key
        )
    )
    guardians = tuple(
        GuardianRow(*r)
        for r in execute(
            f"SELECT device, ownership, guardian, time_us, actor FROM guardians {mine} "
            "ORDER BY time_us, guardian",
            key,
        )
    )
    profiles = tuple(
        SealedRow(d, o, v, bytes(sealed), t)  # psycopg gives bytea as a memoryview
        for d, o, v, sealed, t in execute(
            f"SELECT device, ownership, version, sealed, time_us FROM profiles {mine} ORDER BY version", key
        )
    )
    return PrivacyHistory(OwnershipRow(*row), consents, guardians, profiles)


def merge_registry(old: RegistrySnapshot, delta: RegistryDelta) -> RegistrySnapshot:
    """`old` with every row about `delta.subjects` replaced by `delta.rows`: the snapshot a full read
    at the delta's version would give (rows in another order; a principal's `last_seen_us` as `old` had
    it, unless the delta touched it). A pass over the tables the change touched, no store read of them."""
    new = delta.rows
    names = names_by_kind(delta.subjects)
    devices, relays, consumers = names["device"], names["relay"], names["consumer"]

    def of_principals(rows: tuple) -> tuple:
        return tuple(r for r in rows if r.name not in names[r.kind]) if delta.subjects else rows

    def of_devices(rows: tuple) -> tuple:
        return tuple(r for r in rows if r.device not in devices) if devices else rows

    bindings = old.bindings
    if relays or devices:
        bindings = tuple(b for b in bindings if b[0] not in relays and b[1] not in devices)
    grants = old.grants
    if consumers:
        grants = tuple(g for g in grants if g.consumer not in consumers)
    return RegistrySnapshot(
        version=new.version,
        principals=of_principals(old.principals) + new.principals,
        credentials=of_principals(old.credentials) + new.credentials,
        bindings=bindings + new.bindings,
        grants=grants + new.grants,
        ownerships=of_devices(old.ownerships) + new.ownerships,
        consents=of_devices(old.consents) + new.consents,
        guardians=of_devices(old.guardians) + new.guardians,
        profiles=of_devices(old.profiles) + new.profiles,
        totp=of_devices(old.totp) + new.totp,
        changes=new.changes,
    )


@dataclass(frozen=True)
class PrivacyHistory:
    """Everything kept about one ownership of a device besides its features: for export."""

    ownership: OwnershipRow | None
    consents: tuple[ConsentRow, ...]
    guardians: tuple[GuardianRow, ...]
    profiles: tuple[SealedRow, ...]


@dataclass(frozen=True)
class RegistryOp:
    """One change of the registry, applied by `Store.registry_apply`. `op` is one of:

    - "principal": insert or update (`kind`, `name`) with `state`;
    - "credential": insert `credential`;
    - "credential_state": set the state of credential `name` (its id) to `state`;
    - "revoke": set principal (`kind`, `name`) and all its credentials to "revoked";
    - "bind" / "unbind": relay `name` speaks / no longer speaks for device `device`;
    - "grant" / "ungrant": put / delete `grant` (ungrant matches consumer, family and operation);
    - "seen": set the principal's last_seen_us to `time_us` (no version bump: not a policy change);
    - "ownership": device `device` starts ownership `ownership` (the previous one ends);
    - "consent": `actor` grants (`granted`) or withdraws consent for `family` of (`device`, `ownership`);
    - "guardian" / "unguardian": record / remove guardian `name`'s consent for (`device`, `ownership`);
    - "profile": a new profile version `version` (`sealed`) of (`device`, `ownership`);
    - "totp": put (`sealed` non-empty) or delete the TOTP secret of (`device`, `ownership`);
    - "totp_used": time step `version` of that secret was used (no version bump; never moves back);
    - "forget": erasure: delete the consent decisions, guardians, profiles, TOTP secrets and ownership
      of `device` (of `ownership` only, if given), and the band's identity: its registration,
      credentials, bindings and its name in device-narrowed grants (a grant left with no device goes).
    """

    op: str
    kind: str = ""
    name: str = ""
    state: str = "active"
    device: str = ""
    credential: CredentialRow | None = None
    grant: GrantRow | None = None
    time_us: int = 0
    ownership: str = ""
    family: str = ""
    granted: bool = False
    version: int = 0
    sealed: bytes = b""
    actor: str = ""

    def __repr__(self) -> str:  # sealed bytes are opaque, but keep them out of logs anyway
        fields = (
            f"{k}={v!r}"
            for k, v in vars(self).items()
            if v not in ("", None, 0, False, b"") and k != "sealed" and (k != "state" or self.op != "consent")
        )
        return f"RegistryOp({', '.join(fields)}{', sealed' if self.sealed else ''})"


@dataclass(frozen=True)
class AuditRow:
    """One audit entry as stored: `entry` is canonical JSON, `mac` the hex HMAC chaining it to the entry
    before (gateway/security/audit.py makes both; the store only keeps them, append-only)."""

    seq: int
    time_us: int
    entry: str
    mac: str


@dataclass(frozen=True)
class AuditCheckpoint:
    """The head of a closed audit segment (entries `first_seq`..`seq`): its last entry's seq and MAC, so
    the entries up to it can be dropped and the chain still verifies from here."""

    seq: int
    mac: str
    first_seq: int
    first_time_us: int
    last_time_us: int


# Each family's table, by sensitivity class (gateway/privacy/classes.py): the health classes (heart, sleep)
# apart from activity, so a database-level grant can separate them. One cursor sequence runs across them.
FAMILY_CLASS = {
    "steps": "activity",
    "activity": "activity",
    "wear": "activity",
    "distance": "activity",
    "heart": "heart",
    "day": "heart",
    "sleep": "sleep",
    "night": "sleep",
}
UNOWNED = "unowned"  # the ownership a device without one seals under


class Sealer(Protocol):
    """Encryption at rest as a store sees it (gateway/privacy/sealing.py): bytes in, bytes out, each
    value bound to its row. `open_*` raise `Unreadable` for a value that does not open."""

    def seal_values(self, device: str, ownership: str, family: str, start_us: int, data: bytes) -> bytes: ...

    def open_values(self, device: str, ownership: str, family: str, start_us: int, data: bytes) -> bytes: ...

    def values_opener(self, device: str, ownership: str) -> Callable[[str, int, bytes], bytes]:
        """`open_values` for many rows of one device and ownership, `(family, start_us, data)`: a page of
        records looks its key up once, not per row."""
        ...

    def seal_state(self, device: str, ownership: str, data: bytes) -> bytes: ...

    def open_state(self, device: str, ownership: str, data: bytes) -> bytes: ...

    def pseudonym(self, device: str) -> str:
        """A keyed, one-way name of the device: what an erasure tombstone is stored under."""
        ...


class RegistryListener(Protocol):
    """Wakes a registry loop when the registry changes (`Store.registry_listener`); used from the event
    loop."""

    async def wait(self, timeout_s: float) -> bool:
        """Until a change is notified (True) or `timeout_s` has passed (False); True too after a fault,
        once the timeout has passed, so that the caller polls as it would have."""
        ...

    async def close(self) -> None:
        """Let go of the connection; safe twice."""
        ...


@runtime_checkable
class Store(Protocol):
    """A feature sink. One object is used from one thread at a time; `open`/`close` follow the
    component contract (close is safe without open, and twice); `with store:` opens and closes it.

    Errors: `StoreUnavailable` for a transient failure with nothing written (the gateway answers
    UNAVAILABLE and does not ack), `SequenceError` for a batch that breaks its boot's sequence,
    `SchemaVersionError` for a database this version must not touch, `ValueError` for a malformed call.
    """

    def open(self) -> None:
        """Connect and migrate the schema to this version; a no-op if already open."""
        ...

    def close(self) -> None:
        """Release the connection; safe when not open."""
        ...

    def device(self, device_id: int) -> DeviceRow | None:
        """The device's current boot, high-water and state; None if the store has never seen it."""
        ...

    def commit(
        self,
        device_id: int,
        boot_id: int,
        first_seq: int,
        last_seq: int,
        state: bytes,
        records: list[dict],
        *,
        allow_gap: bool = False,
    ) -> CommitResult:
        """Store one batch's records, the device's new state and high-water in one transaction.

        A batch at or below its boot's high-water is a duplicate (nothing written); one that skips
        ahead raises `SequenceError` unless `allow_gap` (the band says it dropped data itself); one
        that overlaps the high-water always raises. An unseen boot ID starts a new sequence.
        """
        ...

    def prepare(self, item: CommitItem) -> CommitItem:
        """The item with its database-free work done ahead (checks, encoding): `ValueError` if it is
        malformed. Safe on any thread, beside the one using the store: the gateway prepares where the
        records were made (a compute worker or thread), so that a writer does only what needs the
        database. `commit_many` of a prepared item does not redo the work; of an unprepared one, it
        does it itself.

        The prepared item carries its records in the store's encoded form only (`records` is empty,
        `prepared` holds them), so what travels to a writer is half the bytes. An item whose records
        or device are replaced after `prepare` is checked and encoded again from what it then holds."""
        ...

    def commit_many(self, items: list[CommitItem]) -> list[CommitResult | Exception]:
        """Commit several batches in one transaction (one fsync): group commit.

        Each item is checked and applied exactly as `commit` would, in order, so a later item sees the
        effects of an earlier one of the same device. An item that fails its own checks (`ValueError`,
        `SequenceError`) has no effect and gets its exception in its slot; the others still commit. If
        the transaction as a whole fails (`StoreUnavailable`, or another `StoreError`), nothing is
        written and every slot gets that exception. Nothing is durable before this returns.
        """
        ...

    def read_since(
        self,
        cursor: int,
        *,
        families: set[str] | None = None,
        device: str | None = None,
        limit: int = 1000,
        ownership: str | None = None,
    ) -> list[tuple[int, dict]]:
        """Up to `limit` records with a cursor above `cursor`, in commit order, optionally filtered (by
        family, device, and the ownership they were stored under). Sealed values that do not open are
        skipped (and reported), so a page may hold fewer than `limit` records before the end."""
        ...

    def latest_cursor(self) -> int:
        """The highest cursor ever assigned (0 if none): where a subscriber for new records only starts."""
        ...

    def ownerships_held(self) -> set[tuple[str, str]]:
        """Every (device, ownership) the store holds a record or a state of ("" = unowned): what the
        erasure journal checks a restored store against (gateway/privacy/journal.py)."""
        ...

    def check_writable(self) -> None:
        """Return once a commit could take the store's write lock now (and give it back), or raise
        `StoreUnavailable`: the probe that tells health when a store that refused is back."""
        ...

    def export_device(self, device_id: int) -> Iterator[dict]:
        """Everything stored about one device: a summary, then its records in time order."""
        ...

    def erase_device(self, device_id: int, ownership: str | None = None) -> int:
        """Delete everything of one device: its records in chunks (others' commits wait one chunk at
        most), then its state and high-water marks, leaving a tombstone per boot under the sealer's
        pseudonym so a resent old batch is a duplicate; returns the number of records deleted. With
        `ownership`, only the records (and state) stored under that ownership."""
        ...

    def purge_before(self, start_us: int, families: Iterable[str] | None = None) -> int:
        """Delete records of `families` (None: all) that start before `start_us` (retention), in chunks
        so commits wait one chunk at most; returns the number deleted. Only a purge of every family also
        drops the high-water of past boots last written before `start_us` (a boot's batches may hold any
        family). `ValueError` for an unknown family."""
        ...

    # the transactional outbox (gateway/stream): on a store opened with the outbox on, `commit_many`
    # writes, in the same transaction, a message entry for every batch and family it inserts records of
    # (the message encoded once, sealed with the device's data key as its records are, so encryption at
    # rest and crypto-shredding cover it), and `erase_device` deletes the device's entries and writes one
    # purge entry. Retention takes a message entry whose first record it deletes; record entries (older
    # gateways') go with their records

    def name_drainer(self, name: str) -> None:
        """Take outbox entries under `name` (before the first take): a store several drainers share leases
        devices to them by name, and a drainer restarted under its old name takes its leases back at once
        (gateway/stream/holder.py). A store with one drainer keeps no leases and ignores it."""

    def outbox_drains(self) -> bool:
        """Whether this object's takes drain the outbox now: False while another drainer holds a store that
        one drainer drains at a time (SQLite), this one's takes being empty meanwhile."""
        return True

    def outbox_take(self, limit: int = 500) -> list[OutboxRow]:
        """Up to `limit` outbox entries, oldest first, each marked taken (its first `taken_us` is kept).
        Entries stay until `outbox_done`: a drainer that dies before publishing loses nothing. Entries
        whose record does not open (a destroyed key) are dropped here, never returned. A drainer holds
        one page at a time: a take ends its previous page. A store several drainers share (PostgreSQL)
        gives each the entries of devices no other has in flight, so a page may pass older entries by;
        SQLite gives the whole outbox to one drainer at a time (the others' takes are empty).
        A page ends at the end of a batch (record entries sharing `batch`), so it may hold more than
        `limit`; a message entry is one entry however many records it holds."""
        ...

    def outbox_done(self, ids: Sequence[int]) -> int:
        """Delete the outbox entries `ids` (published, or purged); returns how many were still there."""
        ...

    def outbox_depth(self) -> int:
        """How many records wait in the outbox, a purge entry counting one: the stream's backlog (a
        metric), the same figure whether the entries are messages or records."""
        ...

    # per-device rate limits shared by every process and gateway on this store (gateway/pipeline.Limits)

    def take_tokens(
        self, device_id: int, bucket: str, rate: float, burst: float, need: float, charge: float
    ) -> float:
        """A token bucket of the device's (`bucket` names it: "batches", "samples"), kept in the store so
        that a device moving between processes or gateways keeps its level: refilled at `rate` a second
        up to `burst` (full when first used), then if it holds at least `need` tokens, `charge` is taken
        and 0.0 returned; else nothing is taken and the seconds until `need` will be there are returned.
        The level may go below zero (a charge after the fact). Atomic: concurrent takes are serialised.
        Erasure removes the device's buckets."""
        ...

    # registry and audit (gateway/security): who may connect, for which devices, and what was done

    def registry_snapshot(self) -> RegistrySnapshot:
        """The whole registry, consistent, with its version."""
        ...

    def registry_version(self) -> int:
        """A number that grows with every policy change (not with "seen"): a cache compares it."""
        ...

    def registry_listener(self) -> RegistryListener | None:
        """Something to wait on for the next registry change by any gateway (PostgreSQL: LISTEN/NOTIFY),
        or None where polling `registry_version` is the only way (SQLite: every gateway on the file is on
        this machine, and a poll is a read of one row). Makes no connection until waited on."""
        ...

    def registry_delta(self, snapshot: RegistrySnapshot) -> RegistryDelta | None:
        """The change since `snapshot` (an earlier `registry_snapshot` or merge of this store's) as a
        delta, read in one transaction; None when the change log cannot tell it whole (its entries
        pruned, a version bumped by a writer that kept no log) or it names more than MAX_DELTA_SUBJECTS:
        then read the snapshot. Every registry write logs the subjects it touched (`op_subjects`, and
        the owners and consumers only the store knows) under its change number."""
        ...

    def registry_apply(
        self,
        ops: Sequence[RegistryOp],
        audit: Sequence[AuditRow] = (),
        checkpoints: Sequence[AuditCheckpoint] = (),
    ) -> int:
        """Apply `ops`, append `audit` and record `checkpoints` in one transaction; returns the registry
        version after it. `ValueError` for a malformed op (unknown kind, state, operation, family); an
        audit row whose seq is not the next one, or a checkpoint that is not of a stored entry (its seq
        and MAC) after the last checkpoint, raises `StoreError` and nothing is written."""
        ...

    def audit_rows(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRow]:
        """Up to `limit` audit rows with seq above `after_seq`, in order."""
        ...

    def privacy_history(self, device: str) -> PrivacyHistory:
        """The current ownership of `device` (16 hex) and every consent decision, guardian record and
        profile version kept for it, oldest first: what an export holds besides the features."""
        ...

    def audit_last(self) -> AuditRow | None:
        """The newest audit row, None if the log is empty."""
        ...

    def audit_checkpoints(self, after_seq: int = 0, limit: int = 1000) -> list[AuditCheckpoint]:
        """Up to `limit` segment checkpoints with seq above `after_seq`, in order."""
        ...

    def audit_checkpoint_last(self) -> AuditCheckpoint | None:
        """The newest checkpoint (the head of the last closed segment), None if there is none."""
        ...

    def audit_drop_through(self, seq: int) -> int:
        """Delete the audit rows up to `seq` in one transaction, and the checkpoints before it (the one at
        `seq` stays: the kept entries chain from it); returns the rows deleted. `StoreError` unless `seq`
        is a checkpoint below the newest entry (a segment boundary, never the log's head)."""
        ...

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
_HEX = frozenset("0123456789abcdef")


def check_principal(kind: str, name: str) -> None:
    """Refuse a principal the registry cannot hold: a device is named by 16 lower-case hex digits, a
    relay or consumer by 1-63 of [a-z0-9._-] starting with a letter or digit."""
    if kind not in PRINCIPAL_KINDS:
        raise ValueError(f"unknown principal kind {kind!r}; known {sorted(PRINCIPAL_KINDS)}")
    if kind == "device":
        if len(name) != 16 or not set(name) <= _HEX:
            raise ValueError("a device is named by 16 lower-case hex digits")
    elif not (0 < len(name) <= 63 and set(name) <= _NAME_OK and name[0] not in "._-"):
        raise ValueError(f"a {kind} name is 1-63 characters of [a-z0-9._-], starting with a letter or digit")


def check_registry_op(op: RegistryOp) -> None:
    """Refuse a registry change that no store may apply (the same rules for every store)."""
    if op.op in ("principal", "revoke", "seen"):
        check_principal(op.kind, op.name)
        if op.state not in PRINCIPAL_STATES:
            raise ValueError(f"unknown state {op.state!r}")
    elif op.op == "credential":
        c = op.credential
        if c is None or not c.id.startswith(("x509:", "token:")) or c.state not in PRINCIPAL_STATES:
            raise ValueError("a credential op needs a credential with an x509: or token: id and a state")
        check_principal(c.kind, c.name)
    elif op.op == "credential_state":
        if not op.name.startswith(("x509:", "token:")) or op.state not in PRINCIPAL_STATES:
            raise ValueError("credential_state needs a credential id and a state")
    elif op.op in ("bind", "unbind"):
        check_principal("relay", op.name)
        check_principal("device", op.device)
    elif op.op in ("grant", "ungrant"):
        g = op.grant
        if g is None:
            raise ValueError(f"{op.op} needs a grant")
        check_principal("consumer", g.consumer)
        if g.operation not in OPERATIONS:
            raise ValueError(f"unknown operation {g.operation!r}; known {sorted(OPERATIONS)}")
        if (g.operation == "admin") != (g.family == ADMIN_FAMILY):
            raise ValueError(f"the admin operation, and only it, has the family {ADMIN_FAMILY!r}")
        if g.family != ADMIN_FAMILY and g.family not in FAMILIES:
            raise ValueError(f"unknown family {g.family!r}; known {sorted(FAMILIES)}")
        for d in g.devices:
            check_principal("device", d)
    elif op.op == "forget":
        check_principal("device", op.device)
        if op.ownership:
            _check_ownership(op.ownership)
    elif op.op in PRIVACY_OPS:
        check_principal("device", op.device)
        _check_ownership(op.ownership)
        if op.op == "consent":
            if op.family not in FAMILIES:
                raise ValueError(f"unknown family {op.family!r}; known {sorted(FAMILIES)}")
            if not op.actor:
                raise ValueError("a consent decision names its actor")
        elif op.op in ("guardian", "unguardian"):
            _check_reference("guardian", op.name)
        elif op.op == "profile":
            if op.version <= 0 or not op.sealed:
                raise ValueError("a profile op needs a positive version and a sealed profile")
        elif op.op == "totp_used" and op.version <= 0:
            raise ValueError("totp_used needs the time step used")
    else:
        raise ValueError(f"unknown registry op {op.op!r}")


PRIVACY_OPS = frozenset({"ownership", "consent", "guardian", "unguardian", "profile", "totp", "totp_used"})


def _check_ownership(ownership: str) -> None:
    if not (0 < len(ownership) <= 64 and set(ownership) <= _NAME_OK):
        raise ValueError("an ownership is 1-64 characters of [a-z0-9._-]")


def _check_reference(what: str, name: str) -> None:
    if not (0 < len(name) <= 63 and set(name) <= _NAME_OK and name[0] not in "._-"):
        raise ValueError(
            f"a {what} is named by 1-63 characters of [a-z0-9._-], starting with a letter or digit"
        )


def check_sequence(
    high_water: int | None, device_id: int, boot_id: int, first_seq: int, last_seq: int, *, allow_gap: bool
) -> bool:
    """Whether a batch repeats what its boot already stored (True: ack again, write nothing) or is new;
    `SequenceError` for a gap (unless `allow_gap`: the band dropped data itself) or an overlap.

    `high_water` None means the boot is unseen, and any first batch starts its sequence: the store
    cannot tell a band that starts at N from history it has lost on purpose (an erased device, a
    restored backup), and refusing would leave the band resending a batch that can never be accepted.
    """
    if high_water is None:
        return False
    if last_seq <= high_water:
        return True
    expected = high_water + 1
    if first_seq == expected or (first_seq > expected and allow_gap):
        return False
    raise SequenceError(device_id, boot_id, first_seq, last_seq, expected)


def check_batch(device_id: int, boot_id: int, first_seq: int, last_seq: int) -> None:
    """Refuse IDs outside their wire types (u64 device, u32 boot and sequence)."""
    if not 0 <= device_id < U64:
        raise ValueError(f"device_id {device_id} is not a u64")
    if not 0 <= boot_id < U32:
        raise ValueError(f"boot_id {boot_id} is not a u32")
    if not 0 <= first_seq <= last_seq < U32:
        raise ValueError(f"sequence range {first_seq}..{last_seq} is not an ordered u32 range")


def check_records(device: str, records: list[dict]) -> None:
    """Refuse anything that is not a feature record of `device`.

    `values` must be flat and scalar: this is what keeps raw samples (arrays) out of every store. Every
    record of every batch passes here, so the common types are tested by identity first.
    """
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or rec.keys() != RECORD_KEYS:
            raise ValueError(f"record {i}: a record has exactly the keys {sorted(RECORD_KEYS)}")
        if rec["family"] not in FAMILIES:
            raise ValueError(f"record {i}: unknown family {rec['family']!r}")
        if rec["device"] != device:
            raise ValueError(f"record {i}: device {rec['device']!r} is not the batch's device {device}")
        if not (_is_int(rec["start_us"]) and -(2**63) <= rec["start_us"] < 2**63):
            raise ValueError(f"record {i}: start_us must be an int64")
        if not (_is_int(rec["duration_s"]) and 0 <= rec["duration_s"] < 2**31):
            raise ValueError(f"record {i}: duration_s must be a non-negative int")
        if not (isinstance(rec["algo"], str) and 0 < len(rec["algo"]) <= MAX_VALUE_STR):
            raise ValueError(f"record {i}: algo must be a short string")
        values = rec["values"]
        if not isinstance(values, dict) or len(values) > MAX_VALUES:
            raise ValueError(f"record {i}: values must be a dict of at most {MAX_VALUES} keys")
        for k, v in values.items():
            t = type(v)
            if type(k) is str and (
                (t is float and v - v == 0.0)  # finite: inf - inf and NaN - NaN are NaN
                or (t is int and -(2**63) <= v < 2**63)
                or _is_scalar(v)
            ):
                continue
            if not isinstance(k, str) or not _is_scalar(v):
                raise ValueError(
                    f"record {i}: values[{k!r}] is not a finite number or a short string: {v!r:.40}"
                )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_scalar(v: Any) -> bool:
    if isinstance(v, str):
        return len(v) <= MAX_VALUE_STR
    if isinstance(v, float):
        return math.isfinite(v)  # NaN and inf have no JSON (or SQL) form that every sink shares
    return isinstance(v, int) and -(2**63) <= v < 2**63  # bool included
