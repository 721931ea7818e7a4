"""The audit log: who changed policy, and who was refused, in an append-only chain that shows tampering.

Every entry is sealed with an HMAC-SHA256 over the previous entry's MAC and the entry itself, so editing,
inserting or deleting an entry breaks the chain from that point. The key lives outside the store (a
0600 file in the state directory), so whoever can write the database cannot re-seal a forged chain; and
a head record outside the store (`audit.head`: the last sequence number and its MAC) catches what a
chain alone cannot: a tail cut off, or a whole chain rewritten.

```python
log = AuditLog(store, load_key(state / "audit.key"), state / "audit.head", pseudonyms=tombstone_key)
log.open()
log.record([AuditEvent("grant.added", "consumer:operator", subject="consumer:clinic")], [grant_op])
```

Entries carry identifiers and reasons only: never feature values, tokens, keys or certificates. A device
is named by a keyed pseudonym (`audit_pseudonym`: HMAC of its ID under the state dir's tombstone key),
never by its ID: who holds the key (the gateway, an operator looking up one device) can find a device's
entries, a copy of the log alone names no band.

Retention by segment: the chain is cut into segments (`Segments`: so many entries, or so long), and the
head of each closed segment (its last seq and MAC) is checkpointed in the store with the entries that
close it. `drop_through` deletes whole old segments after recording a sealed "audit.dropped" entry that
names how far; `verify` then checks the kept entries from the checkpoint they chain to, and refuses a log
whose first entries are gone with no such entry covering them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from gateway.privacy.crypto import PseudonymKey, normalize_device
from gateway.store.base import AuditCheckpoint, AuditConflict, AuditRow, RegistryOp, Store

KEY_BYTES = 32
GENESIS = b"bandgate-audit-genesis"
ENTRY_VERSION = 1  # the "v" of an entry: its fields, should they ever change
MAX_TEXT = 256  # an identifier or a reason; a PEM or a blob of values is longer (or has newlines)
MAX_DETAILS = 32
MAX_PROBLEMS = 100  # what `verify` lists of a log rewritten wholesale; the rest are counted
MAX_REFUSAL_KEYS = 10_000
OTHER_PEER = "peer:other"
_PAGE = 1000
_MAX_OVERFLOW_REASONS = 64  # distinct reasons under OTHER_PEER before they too are pooled
PSEUDONYM_PREFIX = "pseudonym-"  # what stands for a device ID in an entry: "device:pseudonym-<32 hex>"
DROPPED = "audit.dropped"  # the sealed entry that authorises dropping the segments before it
CONFLICT_RETRIES = 20  # gateways sharing a store that append at the same moment: each catches up and retries
RESTORED = "audit.restored"  # the entry an operator's accepted restore from backup starts with
# A device ID in free text (a reason, a detail): 16 lower-case hex digits standing alone. Actor and subject
# are pseudonymised only as "device:<id>", so a relay or consumer that happens to be named so keeps its name.
_DEVICE_WORD = re.compile(r"(?<![0-9A-Za-z_-])[0-9a-f]{16}(?![0-9A-Za-z_-])")

log = logging.getLogger("bandgate.audit")


class AuditError(Exception):
    """The audit log cannot be used as it is: a key that is missing or exposed, or a store whose chain
    does not match the head record (cut or rewritten). The message names the problem, never the key."""


class _Details(Mapping[str, str | int]):
    """An immutable, hashable mapping, so that `AuditEvent` stays a value (frozen and hashable)."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str | int]]):
        self._items = tuple(sorted(items))

    def __getitem__(self, key: str) -> str | int:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

    def __repr__(self) -> str:
        return repr(dict(self._items))


@dataclass(frozen=True)
class AuditEvent:
    """Something to record: `actor` did `action` to `subject` (principals as "kind:name", a peer as
    "peer:<address>"), for `reason`; `count` folds repeated refusals into one entry.

    Checked on construction, so a caller finds out where it builds the event, not when it is sealed:
    text is at most MAX_TEXT characters with no control characters (which keeps PEM blocks and value
    dumps out), `details` maps short names to such text or to integers.
    """

    action: str
    actor: str
    subject: str = ""
    reason: str = ""
    count: int = 1
    details: Mapping[str, str | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("action", "actor"):
            if not getattr(self, name):
                raise ValueError(f"an audit event needs an {name}")
        for name in ("action", "actor", "subject", "reason"):
            _check_text(name, getattr(self, name))
        if type(self.count) is not int or self.count < 1:
            raise ValueError("count is a positive int")
        if not isinstance(self.details, Mapping) or len(self.details) > MAX_DETAILS:
            raise ValueError(f"details is a mapping of at most {MAX_DETAILS} keys")
        for k, v in self.details.items():
            if not (isinstance(k, str) and 0 < len(k) <= 64):
                raise ValueError(f"details key {k!r:.70} is not a short string")
            if isinstance(v, str):
                _check_text(f"details[{k!r}]", v)
            elif type(v) is not int or not -(2**63) <= v < 2**63:
                raise ValueError(f"details[{k!r}] is neither a short string nor an int64")
        object.__setattr__(self, "details", _Details(self.details.items()))


def audit_pseudonym(key: PseudonymKey, device: str | int) -> str:
    """How entries name `device` (16 hex or the 64-bit ID): "pseudonym-" and its keyed pseudonym
    (gateway/privacy/crypto.py `device_pseudonym`), the same in every entry, so one device's entries are
    found by searching for this text (`bandgate audit show --device`, the owner's export)."""
    return PSEUDONYM_PREFIX + key.pseudonym(normalize_device(device))


def pseudonymise(event: AuditEvent, key: PseudonymKey | None) -> AuditEvent:
    """`event` with each device ID replaced by `audit_pseudonym`: an actor or subject "device:<id>", and
    any 16-hex word in its reason and text details. Without a key an event that names a device is refused
    (ValueError): a log must not name bands because a caller forgot the key."""

    def named(text: str) -> str:  # a stand-in is longer than an ID: cut to size, never to an ID's part
        return _DEVICE_WORD.sub(lambda m: _stand_in(key, m.group(0)), text)[:MAX_TEXT]

    def principal(text: str) -> str:
        kind, sep, name = text.partition(":")
        if kind == "device" and sep and _DEVICE_WORD.fullmatch(name):
            return f"device:{_stand_in(key, name)}"
        return text

    changed = replace(
        event,
        actor=principal(event.actor),
        subject=principal(event.subject),
        reason=named(event.reason),
        details={k: named(v) if isinstance(v, str) else v for k, v in event.details.items()},
    )
    return event if changed == event else changed


def _stand_in(key: PseudonymKey | None, device: str) -> str:
    if key is None:
        raise ValueError("an audit event names a device, and this log has no pseudonym key to name it by")
    return audit_pseudonym(key, device)


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT or not value.isprintable():
        raise ValueError(f"{name} must be printable text of at most {MAX_TEXT} characters (identifiers only)")


def load_key(path: Path) -> bytes:
    """The audit key from `path`: exactly KEY_BYTES bytes, in a regular file no one but its owner may
    touch (any group or other permission is refused: an exposed key lets anyone re-seal a forged log)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise AuditError(f"audit key {path} is missing") from None
    except OSError as e:
        raise AuditError(f"audit key {path} cannot be read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())  # the file opened, not whatever the path names a moment later
        if not stat.S_ISREG(info.st_mode):
            raise AuditError(f"audit key {path} is not a regular file")
        if info.st_mode & 0o077:
            raise AuditError(
                f"audit key {path} is open to group or others (mode {info.st_mode & 0o777:03o}); "
                "it must be 0600"
            )
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise AuditError(f"audit key {path} is not {KEY_BYTES} bytes long")
    return key


# the chain


def genesis_mac(key: bytes) -> str:
    """mac_0: what the first entry chains to, so an empty log is also bound to the key."""
    return hmac.new(key, GENESIS, hashlib.sha256).hexdigest()


def _chain(key: bytes, prev_mac: str, entry: str) -> str:
    # utf-8, not ascii: a forged row may hold anything, and verify must report it, not crash on it
    return hmac.new(key, prev_mac.encode("utf-8") + entry.encode("utf-8"), hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _entry(seq: int, time_us: int, event: AuditEvent) -> str:
    """Canonical JSON: sorted keys, compact, ASCII, so the same event always seals to the same MAC."""
    return json.dumps(
        {
            "v": ENTRY_VERSION,
            "seq": seq,
            "time_us": time_us,
            "actor": event.actor,
            "action": event.action,
            "subject": event.subject,
            "reason": event.reason,
            "count": event.count,
            "details": dict(event.details),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )


def _row_problem(key: bytes, prev_mac: str, row: AuditRow) -> str | None:
    """What is wrong with `row` following an entry sealed `prev_mac`; None if it is sound."""
    if not _same(row.mac, _chain(key, prev_mac, row.entry)):
        return f"entry {row.seq}: MAC mismatch (edited or inserted)"
    try:
        entry = json.loads(row.entry)
    except ValueError:
        return f"entry {row.seq}: not JSON"
    # Sealed correctly, so only a key holder wrote it; the columns must still say what the entry says.
    if not isinstance(entry, dict) or entry.get("seq") != row.seq or entry.get("time_us") != row.time_us:
        return f"entry {row.seq}: its seq or time_us columns differ from the sealed entry (moved)"
    return None


# the head record


@dataclass(frozen=True)
class _Head:
    seq: int
    mac: str


def _read_head(path: Path) -> _Head | None:
    """The head record; None if there is none; AuditError if it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise AuditError(f"audit head {path} cannot be read: {e}") from None
    try:
        data = json.loads(text)
        head = _Head(data["seq"], data["mac"])
    except (ValueError, TypeError, KeyError):
        raise AuditError(f"audit head {path} is not a head record") from None
    if type(head.seq) is not int or head.seq < 0 or not isinstance(head.mac, str):
        raise AuditError(f"audit head {path} is not a head record")
    return head


def _write_head(path: Path, head: _Head) -> None:
    """Replace the head record atomically and durably: a crash leaves the old head or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"seq": head.seq, "mac": head.mac}, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself
    finally:
        os.close(dir_fd)


# the log


@dataclass(frozen=True)
class Segments:
    """When the open segment closes (its last entry checkpointed, so it can later be dropped whole): once
    it holds `entries` entries, or before the first entry recorded `max_age_s` or more after its first
    (0: no age limit). The default closes a segment a day, or at 10,000 entries."""

    entries: int = 10_000
    max_age_s: float = 86_400.0

    def __post_init__(self) -> None:
        if type(self.entries) is not int or self.entries < 1 or not self.max_age_s >= 0:
            raise ValueError("a segment holds at least one entry, and its age limit is >= 0")


class AuditLog:
    """Appends sealed entries to `store` and keeps the head record at `head_path`.

    Called from one thread (the thread that uses `store`). `open` checks the store's chain against the
    head before anything is appended; `record` stores a policy change and its entries in one
    transaction, each device named by its pseudonym under `pseudonyms`, and the checkpoints of the
    segments those entries close (`segments`). `clock` is the wall clock in seconds (tests inject one)."""

    def __init__(
        self,
        store: Store,
        key: bytes,
        head_path: Path,
        *,
        pseudonyms: PseudonymKey | None = None,
        segments: Segments = Segments(),
        clock: Callable[[], float] = time.time,
    ):
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise AuditError(f"the audit key is {KEY_BYTES} bytes")
        self._store = store
        self._key = key
        self._head_path = Path(head_path)
        self._genesis = genesis_mac(key)
        self._pseudonyms = pseudonyms
        self.segments = segments
        self.clock = clock
        self._seq: int | None = None  # the last stored entry and its MAC, once open
        self._mac = ""
        self._last_time_us = 0
        self._open_segment: tuple[int, int] | None = None  # its first entry's (seq, time_us); None: empty

    def __repr__(self) -> str:
        return f"AuditLog(head={str(self._head_path)!r}, seq={self._seq})"

    @property
    def seq(self) -> int | None:
        """The sequence number of the last entry stored (0: none yet); None before `open`."""
        return self._seq

    def open(self) -> None:
        """Check the store's chain against the head record, and bring the head forward over entries a
        crash stored without it. Refuses (AuditError) a log that ends before the head (its tail was cut),
        whose entry at the head does not carry the head's MAC (rewritten), or a non-empty log without a
        head. Only the head's entry and those after it are checked here; `verify` reads the whole log."""
        last = self._store.audit_last()
        head = _read_head(self._head_path)
        if head is None:
            if last is not None:
                raise AuditError(
                    f"audit head {self._head_path} is missing but the log holds entries up to {last.seq}: "
                    "a cut tail could not be told apart (restore the head, or run `bandgate audit verify`)"
                )
            head = _Head(0, self._genesis)
            self._write_head_or_refuse(head)
        last_seq = 0 if last is None else last.seq
        if last_seq < head.seq:
            raise AuditError(f"audit log ends at {last_seq}, head says {head.seq} (tail cut)")
        self._check_head(head)
        seq, mac = self._follow(head.seq, head.mac)
        if seq != head.seq:
            # A crash between the store's commit and the head write: the entries verified, so keep them.
            log.warning(
                "audit head was behind the log; brought forward",
                extra={"fields": {"event": "audit_head_forward", "head_seq": head.seq, "log_seq": seq}},
            )
            self._write_head_or_refuse(_Head(seq, mac))
        self._seq, self._mac = seq, mac
        self._load_segment()

    def _write_head_or_refuse(self, head: _Head) -> None:
        try:
            _write_head(self._head_path, head)
        except OSError as e:
            raise AuditError(f"audit head {self._head_path} cannot be written: {e.strerror}") from None

    def _check_head(self, head: _Head) -> None:
        """The entry the head names is stored, carries the head's MAC, and is sealed by this key."""
        if head.seq == 0:
            if not _same(head.mac, self._genesis):
                raise AuditError("head MAC does not match the empty log's genesis (wrong key or rewritten)")
            return
        rows = {r.seq: r for r in self._store.audit_rows(max(head.seq - 2, 0), 2)}
        row = rows.get(head.seq)
        prev = _mac_before(self._store, head.seq, rows.get(head.seq - 1), self._genesis)
        if row is None or prev is None:
            raise AuditError(f"audit entries before or at the head ({head.seq}) are missing (deleted)")
        if not _same(row.mac, head.mac):
            raise AuditError(f"head MAC does not match entry {head.seq} (chain rewritten)")
        problem = _row_problem(self._key, prev, row)
        if problem:
            raise AuditError(problem)

    def _follow(self, seq: int, mac: str) -> tuple[int, str]:
        """The last entry of the chain continuing from (`seq`, `mac`), each entry after it verified."""
        while page := self._store.audit_rows(seq, _PAGE):
            for row in page:
                if row.seq != seq + 1:
                    raise AuditError(f"seq {seq + 1} missing after {seq} (deleted)")
                problem = _row_problem(self._key, mac, row)
                if problem:
                    raise AuditError(problem)
                seq, mac = row.seq, row.mac
        return seq, mac

    def _load_segment(self) -> None:
        """Where the open segment starts (after the last checkpoint), and the newest entry's time."""
        checkpoint = self._store.audit_checkpoint_last()
        first = self._store.audit_rows(checkpoint.seq if checkpoint else 0, 1)
        self._open_segment = (first[0].seq, first[0].time_us) if first else None
        last = self._store.audit_last()
        self._last_time_us = last.time_us if last else 0

    def record(self, events: Sequence[AuditEvent], ops: Sequence[RegistryOp] = ()) -> int:
        """Seal `events` into rows continuing the chain and store them with `ops` in one transaction (a
        policy change and its audit entries are stored together or not at all), with the checkpoints of
        the segments they close; then write the head. Returns the registry version.

        A policy change without an event is refused (ValueError): only "seen" and "totp_used" ops (no policy
        change: a last-seen time, a second factor's last step) may go unrecorded. So is an event naming a
        device when the log has no pseudonym key. If
        the store raises, nothing is stored and the chain continues from the last stored entry. If the
        head cannot be written after the commit, that is logged rather than raised, because the change
        is stored; the next record (or open) writes it again."""
        if self._seq is None:
            raise AuditError("the audit log is not open")
        if not events:
            if any(op.op not in ("seen", "totp_used") for op in ops):
                raise ValueError("a policy change must be recorded with an audit event")
            return self._store.registry_apply(ops) if ops else self._store.registry_version()
        events = [pseudonymise(event, self._pseudonyms) for event in events]
        for attempt in range(CONFLICT_RETRIES):
            try:
                return self._record(events, ops)
            except AuditConflict:
                # another writer on the same store appended first: follow its entries and seal again
                if attempt == CONFLICT_RETRIES - 1:
                    raise
                time.sleep(0.001 * (attempt + 1))
        raise AssertionError("unreachable")

    def _record(self, events: Sequence[AuditEvent], ops: Sequence[RegistryOp]) -> int:
        self._catch_up()
        time_us = int(self.clock() * 1_000_000)
        seq, mac, segment = self._seq, self._mac, self._open_segment
        rows, checkpoints = [], []
        max_age_us = int(self.segments.max_age_s * 1_000_000)
        if segment is not None and max_age_us and time_us - segment[1] >= max_age_us:
            checkpoints.append(AuditCheckpoint(seq, mac, segment[0], segment[1], self._last_time_us))
            segment = None
        for event in events:
            seq += 1
            entry = _entry(seq, time_us, event)
            mac = _chain(self._key, mac, entry)
            rows.append(AuditRow(seq, time_us, entry, mac))
            if segment is None:
                segment = (seq, time_us)
            if seq - segment[0] + 1 >= self.segments.entries:
                checkpoints.append(AuditCheckpoint(seq, mac, segment[0], segment[1], time_us))
                segment = None
        version = self._store.registry_apply(ops, rows, checkpoints)
        self._seq, self._mac = seq, mac
        self._open_segment, self._last_time_us = segment, time_us
        try:
            _write_head(self._head_path, _Head(seq, mac))
        except OSError as e:
            log.error(
                "audit head not written; a cut tail would go unnoticed until it is",
                extra={"fields": {"event": "audit_head_failed", "seq": seq, "error": e.strerror}},
            )
        return version

    def _catch_up(self) -> None:
        """Follow entries another writer with the same key appended (a CLI beside the server), and
        refuse a log that lost or changed entries since this one last wrote."""
        assert self._seq is not None
        last = self._store.audit_last()
        last_seq = 0 if last is None else last.seq
        if last_seq < self._seq:
            raise AuditError(f"audit log ends at {last_seq}, this writer stored up to {self._seq} (tail cut)")
        if last is not None and last.seq == self._seq:
            if not _same(last.mac, self._mac):
                raise AuditError(f"entry {last.seq} no longer carries the MAC it was stored with (rewritten)")
            return
        if last is not None:
            self._seq, self._mac = self._follow(self._seq, self._mac)
            self._load_segment()  # the other writer may have closed segments

    # retention by segment

    def drop_through(self, seq: int, actor: str) -> int:
        """Drop the closed segments that end at or before `seq`: first a sealed "audit.dropped" entry by
        `actor` naming the last entry dropped (what `verify` accepts as the authority for the gap), then
        the segments oldest first, one transaction each, so an interrupted drop leaves whole segments.
        Returns the entries deleted (0: no closed segment ends there)."""
        if self._seq is None:
            raise AuditError("the audit log is not open")
        self._catch_up()
        first = self._store.audit_rows(0, 1)
        floor = first[0].seq - 1 if first else self._seq
        bounds = [cp for cp in _checkpoints(self._store, floor) if cp.seq <= seq]
        if not bounds:
            return 0
        through = bounds[-1].seq
        details = {"through_seq": through, "entries": through - floor, "segments": len(bounds)}
        self.record([AuditEvent(DROPPED, actor, details=details)])
        dropped = sum(self._store.audit_drop_through(cp.seq) for cp in bounds)
        log.info(
            "audit segments dropped",
            extra={"fields": {"event": "audit_dropped", "through_seq": through, "entries": dropped}},
        )
        return dropped

    def accept_restore(self, actor: str) -> tuple[int, int]:
        """After the store was restored from a backup, its log ends before the head: `open` refuses it as
        a cut tail, rightly, since nothing else tells the two apart. The operator who restored says so
        here: the restored log's own chain is verified, the head moves back to its last entry, and an
        "audit.restored" entry by `actor` records the gap (the head's old seq). Returns (restored seq,
        the head's old seq). Refuses if the log does not end before the head."""
        last = self._store.audit_last()
        head = _read_head(self._head_path)
        if head is None or last is None or last.seq >= head.seq:
            raise AuditError("nothing to accept: the audit log does not end before its head")
        before = self._store.audit_rows(last.seq - 2, 1) if last.seq >= 2 else []
        mac = _mac_before(self._store, last.seq, before[0] if before else None, self._genesis)
        problem = _row_problem(self._key, mac, last) if mac is not None else "its predecessor is missing"
        if problem is not None:
            raise AuditError(f"the restored log's last entry does not verify: {problem}")
        _write_head(self._head_path, _Head(last.seq, last.mac))
        self.open()
        details = {"restored_to_seq": last.seq, "head_was_seq": head.seq, "lost": head.seq - last.seq}
        self.record([AuditEvent(RESTORED, actor, details=details)])
        return last.seq, head.seq

    def drop_older_than(self, time_us: int, actor: str) -> int:
        """`drop_through` the closed segments whose last entry was recorded before `time_us`."""
        if self._seq is None:
            raise AuditError("the audit log is not open")
        old = [cp.seq for cp in _checkpoints(self._store, 0) if cp.last_time_us < time_us]
        return self.drop_through(old[-1], actor) if old else 0


def _checkpoints(store: Store, after_seq: int) -> Iterator[AuditCheckpoint]:
    """Every checkpoint after `after_seq`, in order, read in pages."""
    while page := store.audit_checkpoints(after_seq, _PAGE):
        yield from page
        after_seq = page[-1].seq


def _mac_before(store: Store, seq: int, prev_row: AuditRow | None, genesis: str) -> str | None:
    """The MAC entry `seq` chains to: genesis for the first, else entry seq - 1's, from its row or, once
    its segment was dropped, from its checkpoint; None if neither is there."""
    if seq == 1:
        return genesis
    if prev_row is not None and prev_row.seq == seq - 1:
        return prev_row.mac
    checkpoint = store.audit_checkpoints(seq - 2, 1) if seq >= 2 else []
    return checkpoint[0].mac if checkpoint and checkpoint[0].seq == seq - 1 else None


# verification


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `verify`: `ok` when the whole chain and the head agree; `dropped`: the entries
    before the kept ones, gone with their segments by a recorded drop (0: the log is whole)."""

    ok: bool
    entries: int
    problems: tuple[str, ...]
    dropped: int = 0


class _Problems:
    """The first MAX_PROBLEMS problems and a count of the rest: a rewritten log must not fill memory."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.more = 0

    def add(self, problem: str) -> None:
        if len(self.listed) < MAX_PROBLEMS:
            self.listed.append(problem)
        else:
            self.more += 1

    def all(self) -> tuple[str, ...]:
        return (*self.listed, f"... and {self.more} more problems") if self.more else tuple(self.listed)


def verify(store: Store, key: bytes, head_path: Path) -> VerifyReport:
    """Check every entry's MAC and sequence, then the head record against the log's end. Streams the
    log in pages, so memory stays flat however long it is. Never raises for what it finds.

    A log whose first segments were dropped is checked from the checkpoint its first kept entry chains
    to, and only if a sealed "audit.dropped" entry names a last dropped entry at or beyond it."""
    problems = _Problems()
    try:
        head = _read_head(Path(head_path))
        head_readable = True
    except AuditError as e:
        problems.add(str(e))
        head, head_readable = None, False
    genesis = genesis_mac(key)
    entries, seq, mac = 0, 0, genesis
    first = store.audit_rows(0, 1)
    dropped = 0
    if first and first[0].seq > 1:
        checkpoint = _mac_before(store, first[0].seq, None, genesis)
        if checkpoint is not None:  # (else the gap is reported below as deleted entries)
            dropped = seq = first[0].seq - 1
            mac = checkpoint
    authorised = 0  # the last entry a sealed drop entry says was dropped
    mac_at_head: str | None = None
    while page := store.audit_rows(seq, _PAGE):  # rows come in seq order, each above the last
        for row in page:
            entries += 1
            if row.seq != seq + 1:
                missing = f"{seq + 1}" if row.seq == seq + 2 else f"{seq + 1}..{row.seq - 1}"
                problems.add(f"seq {missing} missing after {seq} (deleted)")
                # its predecessor is gone, so its MAC cannot be checked; the chain resumes from it
            else:
                problem = _row_problem(key, mac, row)
                if problem:
                    problems.add(problem)
                elif f'"action":"{DROPPED}"' in row.entry:
                    authorised = max(authorised, _dropped_through(row.entry))
            if head is not None and row.seq == head.seq:
                mac_at_head = row.mac
            seq, mac = row.seq, row.mac
    if head is None:
        if head_readable and entries:
            problems.add(f"head record {head_path} is missing: a cut tail cannot be detected")
    elif seq < head.seq:
        problems.add(f"log ends at {seq}, head says {head.seq} (tail cut)")
    elif head.seq == 0:
        if not _same(head.mac, genesis):
            problems.add("head MAC does not match the empty log's genesis (chain rewritten)")
    elif mac_at_head is not None and not _same(mac_at_head, head.mac):
        problems.add(f"head MAC does not match entry {head.seq} (chain rewritten)")
    # (mac_at_head None with seq >= head.seq: the head's entry was deleted, reported above as missing)
    if dropped > authorised:
        problems.add(f"entries 1..{dropped} are gone and no sealed {DROPPED} entry covers them (deleted)")
    listed = problems.all()
    return VerifyReport(ok=not listed, entries=entries, problems=listed, dropped=dropped)


def _dropped_through(entry: str) -> int:
    """The last entry a sound "audit.dropped" entry dropped."""
    through = json.loads(entry).get("details", {}).get("through_seq")
    return through if type(through) is int else 0


# refused RPCs


class RefusalCounter:
    """Aggregates refused RPCs per (peer, reason) in memory; `drain()` returns AuditEvents (action
    "rpc.refused", actor the peer, reason, count) and resets. The server calls `note` on each refusal
    and drains every few seconds into `AuditLog.record`, so a flood of refusals costs one entry per
    peer and reason, not one per RPC.

    Memory is bounded: past `max_keys` distinct keys, new peers are counted under OTHER_PEER. Pass
    the peer's address without its port, or every reconnect is a new key. Safe from any thread."""

    def __init__(self, max_keys: int = MAX_REFUSAL_KEYS):
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self._max_keys = max_keys
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def note(self, peer: str, reason: str) -> None:
        """Count one refusal. Never raises for its text: a refusal path must not fail on a strange peer."""
        key = (_clean(peer) or "peer:unknown", _clean(reason) or "unknown")
        with self._lock:
            counts = self._counts
            if key not in counts and len(counts) >= self._max_keys:
                key = (OTHER_PEER, key[1])
                if key not in counts and len(counts) >= self._max_keys + _MAX_OVERFLOW_REASONS:
                    key = (OTHER_PEER, "other")
            counts[key] = counts.get(key, 0) + 1

    def drain(self) -> list[AuditEvent]:
        """The refusals noted since the last drain, one event per (peer, reason), and start afresh."""
        with self._lock:
            counts, self._counts = self._counts, {}
        return [
            AuditEvent(action="rpc.refused", actor=peer, reason=reason, count=n)
            for (peer, reason), n in sorted(counts.items())
        ]


def _clean(text: object) -> str:
    """`text` as an audit field: printable, at most MAX_TEXT characters."""
    s = text if isinstance(text, str) else str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else "?" for c in s)
    return s[:MAX_TEXT]
