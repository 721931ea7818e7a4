"""Retention per feature family (issue 13, item 8): how long each family's records are kept, and the
sweeper that deletes what has expired.

`retention_days` is every family's default (0: kept until erased) and `retention` overrides it per family
("heart=90,sleep=30"), so health data can be kept for less time than step counts. The sweeper deletes
each family's records with that family's own cutoff on the store's writer thread, between commits (the
store deletes in chunks, so a band's commit waits one chunk at most), and records every sweep that deleted
something in the audit log: counts and cutoffs per family, never a device or a value.

```python
sweeper = Sweeper(config.retention_settings(), pipeline.writer, registry.apply, now=clock)
removed = await sweeper.sweep()  # {"heart": 120, "sleep": 0}: the families that expire, what went
```
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from decoder.records import FAMILIES
from gateway.security.audit import AuditEvent

if TYPE_CHECKING:  # the pipeline (and its kernels) is not needed to read the settings
    from gateway.pipeline import StoreThread

log = logging.getLogger("bandgate.privacy")

DAY_US = 86_400_000_000
ACTOR = "gateway:retention"
SWEPT = "retention.swept"


def parse_retention(text: str) -> dict[str, float]:
    """`"heart=90,sleep=30"` → `{"heart": 90.0, "sleep": 30.0}` (days; 0 keeps a family until erased).
    ValueError naming what is wrong: an unknown family, a family twice, a negative or missing number."""
    days: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        family, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"{part!r} is not FAMILY=DAYS")
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; known {', '.join(FAMILIES)}")
        if family in days:
            raise ValueError(f"{family} is given twice")
        try:
            n = float(value)
        except ValueError:
            raise ValueError(f"{family}: {value!r} is not a number of days") from None
        if not math.isfinite(n) or n < 0:
            raise ValueError(f"{family}: days must be >= 0, got {value}")
        days[family] = n
    return days


@dataclass(frozen=True)
class Retention:
    """Days each family's records are kept after their period started (0: until erased); every family
    has an entry."""

    days: Mapping[str, float]

    @classmethod
    def from_settings(cls, default_days: float, overrides: str = "") -> Retention:
        """`retention_days` for every family, then `retention`'s overrides (see `parse_retention`)."""
        if not math.isfinite(default_days) or default_days < 0:
            raise ValueError(f"retention_days must be >= 0, got {default_days}")
        return cls({**dict.fromkeys(FAMILIES, float(default_days)), **parse_retention(overrides)})

    def __bool__(self) -> bool:
        return any(d > 0 for d in self.days.values())

    def cutoffs(self, now_us: int) -> dict[str, int]:
        """Each family that expires → the start time before which its records are deleted."""
        return {f: now_us - int(d * DAY_US) for f, d in sorted(self.days.items()) if d > 0}


class Sweeper:
    """Deletes expired records, family by family, and audits each sweep that deleted something.

    `now` is the wall clock in seconds (time.time); a test injects its own. `audit` stores events in the
    audit log (Registry.apply). A sweep whose audit entry cannot be stored keeps its counts and adds them
    to the next sweep's entry, so no deletion goes unrecorded for longer than one round."""

    def __init__(
        self,
        retention: Retention,
        writer: StoreThread,
        audit: Callable[[Sequence[AuditEvent]], Awaitable[Any]],
        *,
        now: Callable[[], float] = time.time,
    ):
        self.retention = retention
        self.writer = writer
        self.audit = audit
        self.now = now
        self._unaudited: dict[str, int] = {}

    async def sweep(self) -> dict[str, int]:
        """Delete what has expired at `now()`; returns the records deleted per family that expires."""
        cutoffs = self.retention.cutoffs(int(self.now() * 1_000_000))
        if not cutoffs:
            return {}
        store = self.writer.store
        removed = {f: await self.writer.call(store.purge_before, cut, [f]) for f, cut in cutoffs.items()}
        if len(cutoffs) == len(FAMILIES):
            # every family expires: the high-water of past boots older than the oldest cutoff can go too
            # (a store drops those only in a sweep of every family: a boot's batches may hold any)
            late = await self.writer.call(store.purge_before, min(cutoffs.values()))
            if late:  # committed between the family sweeps with an older start: rare, but counted
                removed["other"] = late
        counts = {f: self._unaudited.get(f, 0) + removed.get(f, 0) for f in {*removed, *self._unaudited}}
        if sum(counts.values()):
            details: dict[str, str | int] = {"records": sum(counts.values())}
            for family, n in sorted(counts.items()):
                details[family] = n
                if family in cutoffs:
                    details[f"{family}_before_us"] = cutoffs[family]
            try:
                await self.audit([AuditEvent(SWEPT, ACTOR, details=details)])
                self._unaudited = {}
            except Exception:
                self._unaudited = counts
                raise
            log.info(
                "retention sweep",
                extra={"fields": {"event": "purged", "records": sum(removed.values())}},
            )
        return removed

    async def run(self, every_s: float) -> None:
        """Sweep now and every `every_s` seconds until cancelled; a failed sweep is retried next round
        (the store may be busy or full: serving goes on)."""
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning(
                    "retention sweep failed",
                    extra={"fields": {"event": "purge_failed", "error": type(e).__name__}},
                )
            await asyncio.sleep(every_s)


__all__ = ["Retention", "Sweeper", "parse_retention"]
