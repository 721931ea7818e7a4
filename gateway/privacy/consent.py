"""Consent per device × family, and the minors rule: what the pipeline may compute for a device's batch.

The pipeline asks `ConsentGate.decide(device_id)` at stream open and for every batch; the answer names
the families to compute (`Processing.families`, the kernels' input) and, when it is empty, why nothing
is processed. `RegistryConsent` answers from the registry's snapshot (consent decisions, guardians and
sealed profiles ride the registry's versioned, audited changes), so a withdrawal applies to the next
batch the gateway receives after the change returned. Answers are cached per device until the snapshot
changes; a profile is unsealed once per version.

Rules, in order:
1. A device's current ownership holds a decision per family (granted or withdrawn); a family without
   one follows the operator's default set (`default_consent`, empty unless configured).
2. Nothing consented → nothing processed.
3. An owner below the age of digital consent for their country (`minors.ConsentAges`; age counted
   from the birth year conservatively) needs a guardian's consent recorded for this ownership; a profile
   without a birth year follows `age_unknown` ("minor": a guardian or a birth year is needed; "adult").
"""

from __future__ import annotations

import abc
import copy
import datetime
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from decoder.records import FAMILIES, device_key
from gateway.privacy.crypto import CryptoError
from gateway.privacy.minors import ConsentAges
from gateway.privacy.profile import Profile, ProfileError
from gateway.store.base import RegistryDelta, RegistrySnapshot, SealedRow, names_by_kind

log = logging.getLogger("bandgate.privacy")

ALL_FAMILIES = frozenset(FAMILIES)
AGE_UNKNOWN = ("minor", "adult")
NO_CONSENT = "no consent for any feature family of this device"


@dataclass(frozen=True)
class Processing:
    """What may be computed for a device's batch now: the consented `families` (empty: nothing, and
    `reason` says why), and the profile the computation may use (distance needs the stride)."""

    families: frozenset[str]
    reason: str = ""
    profile_version: int = 0
    stride_m: float = 0.0  # 0: no height in the profile, so no distance
    ownership: str = ""  # whose the data is: records and state are sealed under its data key

    def __bool__(self) -> bool:
        return bool(self.families)


EVERYTHING = Processing(ALL_FAMILIES)


class ConsentGate(abc.ABC):
    """Consent per device and family: the one place the pipeline asks."""

    @abc.abstractmethod
    def decide(self, device_id: int) -> Processing:
        """What may be computed for `device_id` now; empty families stop processing entirely."""


class AllowAll(ConsentGate):
    """Every family for every device, no profile: for benchmarks and tests of other parts."""

    def decide(self, device_id: int) -> Processing:
        return EVERYTHING


@dataclass(frozen=True)
class ConsentSettings:
    """The operator's part of the rules (gateway/config.py: default_consent, consent_ages, ...)."""

    default_families: frozenset[str] = frozenset()
    ages: ConsentAges = field(default_factory=ConsentAges)
    age_unknown: str = "minor"

    def __post_init__(self) -> None:
        if self.age_unknown not in AGE_UNKNOWN:
            raise ValueError(f"age_unknown must be one of {AGE_UNKNOWN}, not {self.age_unknown!r}")
        unknown = self.default_families - ALL_FAMILIES
        if unknown:
            raise ValueError(f"default_consent: unknown families {sorted(unknown)}")


def parse_families(text: str) -> frozenset[str]:
    """`"all"`, `""` or `"steps,heart"` → the set of families; ValueError naming an unknown one."""
    text = text.strip()
    if text == "all":
        return ALL_FAMILIES
    families = frozenset(f.strip() for f in text.split(",") if f.strip())
    unknown = families - ALL_FAMILIES
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; known {sorted(ALL_FAMILIES)}")
    return families


@dataclass(frozen=True)
class DeviceConsent:
    """One device's privacy state as the snapshot holds it (no profile values: those stay sealed)."""

    ownership: str
    decisions: dict[str, bool]  # family → granted, for families with a decision
    guardian: bool
    profile: SealedRow | None


class ConsentIndex:
    """A registry snapshot's privacy part, by device."""

    def __init__(self, snapshot: RegistrySnapshot):
        self.version = snapshot.version
        self.changes = snapshot.changes
        decisions: dict[str, dict[str, bool]] = defaultdict(dict)
        for c in snapshot.consents:
            decisions[c.device][c.family] = c.granted
        guarded = {g.device for g in snapshot.guardians}
        profiles = {p.device: p for p in snapshot.profiles}
        self.devices = {
            o.device: DeviceConsent(
                o.ownership, dict(decisions[o.device]), o.device in guarded, profiles.get(o.device)
            )
            for o in snapshot.ownerships
        }

    def get(self, device: str) -> DeviceConsent | None:
        return self.devices.get(device)

    def updated(self, delta: RegistryDelta) -> ConsentIndex:
        """This index after `delta` (read after this index's snapshot): the devices it touched indexed
        again from its rows, which hold all of theirs; the rest shared. A copy of the device map, not
        a pass over the registry's rows."""
        part = ConsentIndex(delta.rows)
        index = copy.copy(part)
        index.devices = dict(self.devices)
        for device in names_by_kind(delta.subjects)["device"]:
            index.devices.pop(device, None)
        index.devices.update(part.devices)
        return index


ProfileOpener = Callable[[str, str, SealedRow], Profile]


class RegistryConsent(ConsentGate):
    """Consent and the minors rule from the registry's live snapshot (`snapshot()` returns it, or None
    before the registry has loaded: then nothing is processed)."""

    def __init__(
        self,
        snapshot: Callable[[], RegistrySnapshot | None],
        open_profile: ProfileOpener | None,
        settings: ConsentSettings,
        today: Callable[[], datetime.date] = datetime.date.today,
    ):
        self._snapshot = snapshot
        self._open_profile = open_profile
        self.settings = settings
        self._today = today
        self._lock = threading.Lock()
        self._index: ConsentIndex | None = None
        self._prepared: ConsentIndex | None = None  # built by `prepare`, off the serving loop
        self._answers: dict[int, Processing] = {}
        self._profiles: dict[tuple[str, str, int], Profile | None] = {}
        self._day = today()

    def decide(self, device_id: int) -> Processing:
        return self._look(device_id, with_state=False)[1]

    def explain(self, device: str) -> tuple[DeviceConsent | None, Processing]:
        """The device's state as the snapshot holds it, and the decision (for the owner's own view)."""
        return self._look(int(device, 16), with_state=True)

    def prepare(self, snapshot: RegistrySnapshot, delta: RegistryDelta | None = None) -> None:
        """Index `snapshot` ahead of its use (the registry calls this on its store thread before it
        serves a new version), so the first batch after a change does not index the whole registry on
        the event loop. With the `delta` that made it, from the index prepared before if that was of
        the snapshot the delta was read after."""
        with self._lock:
            base = self._prepared
        if delta is not None and base is not None and base.changes == delta.since:
            index = base.updated(delta)
        else:
            index = ConsentIndex(snapshot)
        with self._lock:
            self._prepared = index

    def _look(self, device_id: int, *, with_state: bool) -> tuple[DeviceConsent | None, Processing]:
        """The device's state and decision from the index of the current snapshot, built once per
        registry version (by `prepare`, or here if it did not), not once per call; answers are kept
        per version and per day (ages change)."""
        snap = self._snapshot()
        if snap is None:
            return None, Processing(frozenset(), "the privacy registry is not loaded yet")
        with self._lock:
            day = self._today()
            if self._index is None or self._index.version != snap.version:
                prepared = self._prepared
                fresh = prepared is not None and prepared.version == snap.version
                self._index = prepared if fresh else ConsentIndex(snap)
                self._answers.clear()
            if day != self._day:
                self._answers.clear()
                self._day = day
            answer = self._answers.get(device_id)  # per batch: this lookup, nothing more
            if answer is None or with_state:
                device = device_key(device_id)  # one spelling for the index and the cache
                if answer is None:
                    answer = self._answers[device_id] = self._decide(self._index, device)
                return (self._index.get(device) if with_state else None), answer
            return None, answer

    def profile(self, device: str, state: DeviceConsent) -> Profile | None:
        """The device's current profile, unsealed (cached per version); None if it has none or it does
        not open (reported in the log by identifiers only)."""
        row = state.profile
        if row is None or self._open_profile is None:
            return None
        key = (device, row.ownership, row.version)
        if key not in self._profiles:
            try:
                self._profiles[key] = self._open_profile(device, row.ownership, row)
            except (CryptoError, ProfileError, LookupError) as e:
                log.warning(
                    "profile does not open",
                    extra={
                        "fields": {"event": "profile_unreadable", "device": device, "error": type(e).__name__}
                    },
                )
                self._profiles[key] = None
            if len(self._profiles) > 100_000:
                self._profiles.clear()
        return self._profiles[key]

    def _decide(self, index: ConsentIndex, device: str) -> Processing:
        s = self.settings
        state = index.get(device)
        decisions = state.decisions if state is not None else {}
        families = frozenset(f for f in ALL_FAMILIES if decisions.get(f, f in s.default_families))
        if not families:
            return Processing(frozenset(), NO_CONSENT)
        profile = self.profile(device, state) if state is not None else None
        guardian = state is not None and state.guardian
        if not guardian:
            refusal = self._minor(profile)
            if refusal:
                return Processing(frozenset(), refusal)
        version = state.profile.version if state is not None and state.profile is not None else 0
        stride = profile.stride_m() if profile is not None else None
        return Processing(
            families,
            profile_version=version if stride else 0,
            stride_m=stride or 0.0,
            ownership=state.ownership if state is not None else "",
        )

    def _minor(self, profile: Profile | None) -> str:
        """Why a guardian's consent is needed, or "" if the owner may consent alone."""
        age = profile.age_at_least(self._today()) if profile is not None else None
        if age is None:
            if self.settings.age_unknown == "adult":
                return ""
            return "the owner's birth year is unknown: it, or a guardian's consent, is needed first"
        country = profile.country if profile is not None else None
        needed = self.settings.ages.age(country)
        if age < needed:
            return (
                f"the owner may be under the age of digital consent ({needed} in "
                f"{country or 'any country'}); a guardian's consent is needed first"
            )
        return ""
