"""The erasure journal: what a restore from backup must not bring back.

A backup of the store taken before an erasure or a withdrawal still holds the erased rows and the
consent that was withdrawn. The journal is an append-only file, kept apart from the store (by default in
the state dir; put it on storage that backups do not restore), with one line per erasure, consent
withdrawal and guardian withdrawal, written and fsynced *before* the change is applied. At every start the
gateway re-applies whatever the store has that the journal says is gone (`plan`), so a restore never
resurrects data, or processing without consent.

Lines name devices (and guardians) by their keyed pseudonym (the tombstone key's HMAC), never in clear:
the journal outlives the data, and must not list whose it was. A restored store still names the device
in its rows, which is how a line finds it again. An erasure line lists the ownerships it covered, so a
band re-registered (a new ownership) after the erasure keeps its new data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.store.base import RegistryOp, RegistrySnapshot

log = logging.getLogger("bandgate.privacy")

JOURNAL_FILE = "erasures.journal"
ACTOR = "erasure-journal"  # who re-applies, in the audit log


@dataclass(frozen=True)
class Entry:
    """One journal line: `op` "erase" (of `ownerships`), "withdraw" (consent for `family`) or "unguardian"
    (`guardian`, a pseudonym), of the device whose pseudonym is `device`, at `time_us`."""

    op: str
    device: str
    time_us: int
    ownerships: tuple[str, ...] = ()
    family: str = ""
    guardian: str = ""


@dataclass(frozen=True)
class Plan:
    """What a start re-applies: erasures (device ID, ownership) and registry ops (withdrawals)."""

    erasures: tuple[tuple[str, str], ...]
    forget: tuple[RegistryOp, ...]
    ops: tuple[RegistryOp, ...]

    def __bool__(self) -> bool:
        return bool(self.erasures or self.forget or self.ops)


class ErasureJournal:
    """The file, appended to under a lock; `pseudonym(device)` is the tombstone key's."""

    def __init__(self, path: Path, pseudonym: Callable[[str], str]):
        self.path = Path(path)
        self._pseudonym = pseudonym
        self._lock = threading.Lock()

    def entries_for(
        self,
        ops: Sequence[RegistryOp],
        ownerships_of: Callable[[str], Iterable[str]],
        now_us: int | None = None,
    ) -> list[Entry]:
        """The lines `ops` call for: erasures ("forget"), consent withdrawals and guardian withdrawals."""
        now = time.time_ns() // 1000 if now_us is None else now_us
        out = []
        for op in ops:
            device = op.device
            if op.op == "forget":
                covered = (op.ownership,) if op.ownership else tuple(sorted(set(ownerships_of(device))))
                out.append(Entry("erase", self._pseudonym(device), now, ownerships=covered))
            elif op.op == "consent" and not op.granted:
                out.append(Entry("withdraw", self._pseudonym(device), now, (op.ownership,), family=op.family))
            elif op.op == "unguardian":
                out.append(
                    Entry(
                        "unguardian",
                        self._pseudonym(device),
                        now,
                        (op.ownership,),
                        guardian=self._name_pseudonym(op.name),
                    )
                )
        return out

    def append(self, entries: Sequence[Entry]) -> None:
        """Write and fsync `entries` (the file made 0600 on first use); before the change is applied."""
        if not entries:
            return
        data = b"".join(
            orjson.dumps(
                {
                    "op": e.op,
                    "device": e.device,
                    "time_us": e.time_us,
                    "ownerships": list(e.ownerships),
                    "family": e.family,
                    "guardian": e.guardian,
                }
            )
            + b"\n"
            for e in entries
        )
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    def entries(self) -> list[Entry]:
        """Every line; a torn last line (a crash while appending) is skipped."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for n, line in enumerate(raw.splitlines(), 1):
            try:
                d = orjson.loads(line)
                out.append(
                    Entry(
                        d["op"],
                        d["device"],
                        int(d["time_us"]),
                        tuple(d["ownerships"]),
                        d.get("family", ""),
                        d.get("guardian", ""),
                    )
                )
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning(
                    "erasure journal line unreadable: skipped",
                    extra={"fields": {"event": "journal_line_skipped", "line": n}},
                )
        return out

    def plan(self, snapshot: RegistrySnapshot | None, held: Iterable[tuple[str, str]]) -> Plan:
        """What to re-apply, given the registry and the (device, ownership) pairs the store holds rows of
        (`Store.ownerships_held`): only what the journal says is gone and is here again."""
        entries = self.entries()
        if not entries:
            return Plan((), (), ())
        held = set(held)
        current = {o.device: o for o in snapshot.ownerships} if snapshot else {}
        devices = {d for d, _ in held} | set(current)
        if snapshot is not None:
            devices |= {p.name for p in snapshot.principals if p.kind == "device"}
            devices |= {c.device for c in snapshot.consents} | {g.device for g in snapshot.guardians}
        by_pseudonym = {self._pseudonym(d): d for d in devices}
        erasures: set[tuple[str, str]] = set()
        forget: dict[tuple[str, str], RegistryOp] = {}
        ops: list[RegistryOp] = []
        for e in entries:
            device = by_pseudonym.get(e.device)
            if device is None:
                continue
            if e.op == "erase":
                for o in e.ownerships:
                    if (device, o) in held:
                        erasures.add((device, o))
                    if device in current and current[device].ownership == o:
                        forget[(device, o)] = RegistryOp("forget", device=device, ownership=o, actor=ACTOR)
            elif e.op == "withdraw" and snapshot is not None:
                for c in snapshot.consents:
                    if (c.device, c.ownership, c.family) == (device, e.ownerships[0], e.family) and (
                        c.granted and c.time_us < e.time_us
                    ):
                        ops.append(
                            RegistryOp(
                                "consent",
                                device=device,
                                ownership=c.ownership,
                                family=c.family,
                                granted=False,
                                actor=ACTOR,
                            )
                        )
            elif e.op == "unguardian" and snapshot is not None:
                for g in snapshot.guardians:
                    if (
                        (g.device, g.ownership) == (device, e.ownerships[0])
                        and self._name_pseudonym(g.guardian) == e.guardian
                        and g.time_us < e.time_us
                    ):
                        ops.append(
                            RegistryOp(
                                "unguardian",
                                device=device,
                                ownership=g.ownership,
                                name=g.guardian,
                                actor=ACTOR,
                            )
                        )
        return Plan(tuple(sorted(erasures)), tuple(forget.values()), tuple(ops))

    def _name_pseudonym(self, name: str) -> str:
        # a guardian reference is not a device ID: the same keyed function over 16 hex digits of its hash
        return self._pseudonym(hashlib.sha256(name.encode()).hexdigest()[:16])
