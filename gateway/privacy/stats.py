"""Anonymised statistics: daily steps, sleep time and resting heart rate by age group and country, released
with differential privacy (issue 13, item 9).

The release reads left to right:

`store → one bounded value per person and metric → budget.spend → OpenDP noise → recorder → releases`

- **A person is a device.** Each device listed in `Cohorts` contributes at most one value per metric: the
  mean of its most recent `max_days` valid days, each day clamped to the metric's bounds and the mean
  clamped again. Neighbouring datasets differ by one person, so no number of days or absurd value moves
  a cohort's sum by more than half the clamp width (sums are taken about the bounds' centre).
- **Noise comes from OpenDP only** (`make_laplace`, `make_laplace_threshold`: exact discrete samplers).
  Floating-point Laplace from numpy or `random` leaks through the gaps in its output (Mironov 2012);
  values are integers in a metric's resolution, so every sum is exact and the noise integral.
- **Small cohorts are suppressed by a noisy threshold**: a cohort appears only if its noisy person count
  reaches a threshold chosen so that OpenDP's privacy map gives at most the release's δ (split over the
  metrics). The threshold is the price of δ: with ε = 1 and δ = 1e-6 it is about 90 persons.
- **ε and δ per release, from a persisted `Budget`.** OpenDP's maps say what the release costs; the
  budget is charged before any noise is drawn, and refuses (`BudgetExhausted`) once spent.
- **Each release is recorded** through a `ReleaseRecorder` (`audit_recorder` writes "stats.release" to
  the audit log): ε, δ, what remains, how many cohorts were released and suppressed; never a value.

```python
values = collect(store, cohorts)                     # cohorts: {"0123456789abcdef": ("25-34", "DE"), ...}
stats = release(values, 1.0, Budget.in_state_dir(state), audit_recorder(audit_log))
```
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import re
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gateway.privacy.profile import Profile
from gateway.security.audit import AuditEvent, AuditLog
from gateway.security.pki import write_private
from gateway.store.base import SealedRow, Store

# Cohorts: who is in which cohort. The profile (birth year, country) is kept elsewhere; what this module
# needs of it is a mapping from a device's 16 hex digits to (age group, ISO 3166-1 alpha-2 country).
# A device not in the mapping contributes nothing.
Cohorts = Mapping[str, tuple[str, str]]

AGE_GROUPS = ("16-24", "25-34", "35-44", "45-54", "55-64", "65+")
_AGE_LOWER = (16, 25, 35, 45, 55, 65)
_COUNTRY = re.compile(r"[A-Z]{2}")
_DEVICE = re.compile(r"[0-9a-f]{16}")

DAY_US = 86_400_000_000
BUDGET_FILE = "stats.budget.json"
DEFAULT_TOTAL_EPSILON = 10.0  # a lifetime budget: ten releases at ε = 1
DEFAULT_TOTAL_DELTA = 1e-5
DEFAULT_DELTA = 1e-6  # per release: well below 1 / the persons a gateway serves
_PAGE = 5000
_SLACK = 1e-9  # relative: OpenDP's maps round ε up by an ulp; a budget of 10 × 0.1 must still allow 10


class StatsError(Exception):
    """A release that cannot be made as asked (a bad budget file, a privacy map above the request)."""


class BudgetExhausted(StatsError):  # noqa: N818 - a refusal, named for what the caller is told
    """The release would spend more than is left of the privacy budget; nothing was released."""


# what is released


@dataclass(frozen=True)
class Metric:
    """A released statistic: one value per person and day from a record family, in integer units of
    `resolution` (so sums are exact), clamped to [lower, upper] units."""

    name: str
    family: str
    key: str  # the record value
    unit: str
    resolution: float
    lower: int
    upper: int

    def __post_init__(self) -> None:
        if self.upper <= self.lower or (self.upper - self.lower) % 2:
            raise ValueError(f"{self.name}: bounds must be ordered with an even width (an integer centre)")

    @property
    def centre(self) -> int:
        return (self.lower + self.upper) // 2

    @property
    def half_width(self) -> int:
        """How far one person moves a cohort's sum about the centre: the sum's sensitivity."""
        return (self.upper - self.lower) // 2


DAILY_STEPS = Metric("daily_steps", "steps", "steps", "steps/day", 1.0, 0, 30_000)
SLEEP_TIME = Metric("sleep_min", "night", "total_sleep_min", "min/night", 1.0, 0, 900)
RESTING_HR = Metric("resting_hr_bpm", "day", "resting_hr_bpm", "bpm", 0.1, 300, 1200)
METRICS = (DAILY_STEPS, SLEEP_TIME, RESTING_HR)


@dataclass(frozen=True)
class StatsConfig:
    """How contributions are bounded and δ spent. `since_us`/`until_us` bound record starts (UTC µs)."""

    metrics: tuple[Metric, ...] = METRICS
    max_days: int = 28
    min_steps_data_s: int = 10 * 3600  # a day of steps counts only with 10 h of band data
    delta: float = DEFAULT_DELTA
    min_cohort: int = 10  # a floor under the noisy threshold, whatever ε and δ allow
    since_us: int | None = None
    until_us: int | None = None

    def __post_init__(self) -> None:
        if not self.metrics or len({m.name for m in self.metrics}) != len(self.metrics):
            raise ValueError("metrics must be a non-empty tuple of distinct metrics")
        if self.max_days < 1 or self.min_cohort < 1 or self.min_steps_data_s < 0:
            raise ValueError("max_days and min_cohort must be >= 1, min_steps_data_s >= 0")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")


@dataclass(frozen=True)
class CohortStat:
    """One released aggregate. `persons` is the noisy count; `mean` = centre + noisy_sum / persons, in
    the metric's unit; `noisy_sum` (integer units, about the centre) is what the noise was added to."""

    metric: str
    unit: str
    age_group: str
    country: str
    persons: int
    mean: float
    noisy_sum: int

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "unit": self.unit,
            "age_group": self.age_group,
            "country": self.country,
            "persons": self.persons,
            "mean": self.mean,
        }


@dataclass(frozen=True)
class MetricPlan:
    """How one metric is released: noise scales, threshold, and what OpenDP's maps say it costs."""

    metric: Metric
    count_scale: float
    sum_scale: float
    threshold: int
    epsilon: float
    delta: float


class Remaining(NamedTuple):
    epsilon: float
    delta: float


@dataclass(frozen=True)
class ReleaseSummary:
    """What the recorder is told of a release: its cost and its shape, never a value."""

    epsilon: float
    delta: float
    remaining: Remaining
    released: int
    suppressed: int  # cohorts with data but under the noisy threshold (an exact count: audit only)
    plans: tuple[MetricPlan, ...]


ReleaseRecorder = Callable[[ReleaseSummary], None]


def age_group(birth_year: int, year: int) -> str | None:
    """The age group of someone born in `birth_year`, in `year` (by year of birth: coarse on purpose);
    None under 16, who are not counted."""
    age = year - birth_year
    group = None
    for name, lower in zip(AGE_GROUPS, _AGE_LOWER, strict=True):
        if age >= lower:
            group = name
    return group


def cohorts_from_profiles(
    profiles: Iterable[SealedRow], open_profile: Callable[[SealedRow], Profile | None], year: int
) -> dict[str, tuple[str, str]]:
    """Each device's cohort from its owner's current profile (birth year and country), unsealed with
    `open_profile`; a device whose profile lacks either, does not open, or is under 16 is left out."""
    cohorts: dict[str, tuple[str, str]] = {}
    for row in profiles:
        profile = open_profile(row)
        if profile is None or profile.birth_year is None or profile.country is None:
            continue
        group = age_group(profile.birth_year, year)
        if group is not None:
            cohorts[row.device] = (group, profile.country)
    return cohorts


# bounded contributions


@dataclass(frozen=True)
class PersonValues:
    """Per metric, one (cohort, value) row per person: bounded contributions, no device IDs."""

    rows: Mapping[str, tuple[tuple[tuple[str, str], int], ...]]
    config: StatsConfig


def collect(store: Store, cohorts: Cohorts, config: StatsConfig | None = None) -> PersonValues:
    """Read the records of the devices in `cohorts` from `store` and bound each device's contribution:
    per metric, the mean of its most recent `max_days` valid days (UTC), each day and the mean clamped."""
    config = config or StatsConfig()
    members = _check_cohorts(cohorts)
    by_family = {m.family: m for m in config.metrics}
    days: dict[str, dict[tuple[str, int], float]] = {m.name: defaultdict(float) for m in config.metrics}
    steps_data_s: dict[tuple[str, int], float] = defaultdict(float)
    for rec in _records(store, set(by_family)):
        if rec["device"] not in members or not _in_window(rec["start_us"], config):
            continue
        metric = by_family[rec["family"]]
        value = rec["values"].get(metric.key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        day = _day_of(rec)
        key = (rec["device"], day)
        if metric.family == "day":  # one resting HR a local day: a later record replaces an earlier one
            days[metric.name][key] = float(value)
        else:
            days[metric.name][key] += float(value)
        if metric.family == "steps":
            steps_data_s[key] += float(rec["values"].get("data_s", 0))
    rows = {}
    for metric in config.metrics:
        per_device: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for (device, day), value in days[metric.name].items():
            if metric.family == "steps" and steps_data_s[(device, day)] < config.min_steps_data_s:
                continue
            per_device[device].append((day, value))
        rows[metric.name] = tuple(
            (members[device], _person_value(metric, found, config.max_days))
            for device, found in sorted(per_device.items())
        )
    return PersonValues(rows, config)


def _check_cohorts(cohorts: Cohorts) -> dict[str, tuple[str, str]]:
    members = {}
    for device, cohort in cohorts.items():
        if not (isinstance(device, str) and _DEVICE.fullmatch(device)):
            raise ValueError(f"cohorts: {device!r:.40} is not a device (16 lower-case hex digits)")
        if not (isinstance(cohort, tuple) and len(cohort) == 2):
            raise ValueError(f"cohorts: device {device}: a cohort is (age group, country)")
        group, country = cohort
        if group not in AGE_GROUPS or not (isinstance(country, str) and _COUNTRY.fullmatch(country)):
            raise ValueError(
                f"cohorts: device {device}: age group must be one of {AGE_GROUPS} and country an ISO 3166 "
                "alpha-2 code"
            )
        members[device] = (group, country)
    return members


def _records(store: Store, families: set[str]) -> Iterator[dict]:
    cursor = 0
    while page := store.read_since(cursor, families=families, limit=_PAGE):
        for cursor, rec in page:  # noqa: B007 - the last cursor is where the next page starts
            yield rec


def _in_window(start_us: int, config: StatsConfig) -> bool:
    return (config.since_us is None or start_us >= config.since_us) and (
        config.until_us is None or start_us < config.until_us
    )


def _day_of(rec: dict) -> int:
    """The UTC day a record's value belongs to: a minute of steps its own; a night the day it ends (wake);
    a local day's resting HR the UTC day its local noon falls on (local midnight is ±12 h of UTC's)."""
    start = rec["start_us"]
    if rec["family"] == "night":
        return (start + rec["duration_s"] * 1_000_000) // DAY_US
    if rec["family"] == "day":
        return (start + DAY_US // 2) // DAY_US
    return start // DAY_US


def _person_value(metric: Metric, days: list[tuple[int, float]], max_days: int) -> int:
    """The most recent `max_days` days, each clamped, averaged, rounded to a unit, and clamped."""
    recent = sorted(days)[-max_days:]
    units = [_clamp(round(v / metric.resolution), metric.lower, metric.upper) for _, v in recent]
    return _clamp(round(math.fsum(units) / len(units)), metric.lower, metric.upper)


def _clamp(value: int, lower: int, upper: int) -> int:
    return min(max(value, lower), upper)


# the release


def plan(metric: Metric, epsilon: float, delta: float, min_cohort: int = 1) -> MetricPlan:
    """Split (ε, δ) between the noisy count (with its threshold) and the noisy sum, half each, and take
    the cost from OpenDP's privacy maps rather than from our arithmetic."""
    if not (math.isfinite(epsilon) and epsilon > 0) or not 0 < delta < 1:
        raise ValueError("epsilon must be > 0 and delta in (0, 1)")
    count_scale = 2.0 / epsilon  # one person adds 1 to one cohort's count
    sum_scale = metric.half_width * 2.0 / epsilon
    threshold = _threshold(count_scale, delta, min_cohort)
    count_eps, count_delta = _count_measurement(count_scale, threshold).map(1)
    sum_eps = _sum_measurement(sum_scale).map(_sum_sensitivity(metric))
    return MetricPlan(metric, count_scale, sum_scale, threshold, count_eps + sum_eps, count_delta)


def release(
    values: PersonValues,
    epsilon: float,
    budget: Budget,
    recorder: ReleaseRecorder,
    *,
    delta: float | None = None,
) -> list[CohortStat]:
    """Release every metric's cohorts at a total of `epsilon` (split evenly over the metrics) and `delta`
    (default the config's). The budget is charged first: `BudgetExhausted` means nothing was released.
    The recorder is told before anything is returned; if it raises, nothing is returned (and the budget
    stays spent: a release that may have happened is paid for)."""
    delta = values.config.delta if delta is None else delta
    n = len(values.config.metrics)
    plans = tuple(plan(m, epsilon / n, delta / n, values.config.min_cohort) for m in values.config.metrics)
    spent_eps = math.fsum(p.epsilon for p in plans)
    spent_delta = math.fsum(p.delta for p in plans)
    if spent_eps > epsilon * (1 + _SLACK) or spent_delta > delta * (1 + _SLACK):
        raise StatsError(f"OpenDP maps the release to ε={spent_eps}, δ={spent_delta}, above the request")
    what = f"stats {','.join(m.name for m in values.config.metrics)} max_days={values.config.max_days}"
    remaining = budget.spend(spent_eps, spent_delta, what)
    stats: list[CohortStat] = []
    suppressed = 0
    for p in plans:
        released, hidden = _release_metric(p, values.rows[p.metric.name])
        stats += released
        suppressed += hidden
    recorder(ReleaseSummary(spent_eps, spent_delta, remaining, len(stats), suppressed, plans))
    return stats


def _release_metric(p: MetricPlan, rows: tuple[tuple[tuple[str, str], int], ...]) -> tuple[list, int]:
    """One metric: noisy counts above the threshold pick the cohorts, then noisy sums for those only.
    Choosing the sums' cohorts from the counts' output is adaptive sequential composition: the costs add."""
    m = p.metric
    keys = [f"{group}|{country}" for (group, country), _ in rows]
    counts = _count_measurement(p.count_scale, p.threshold)(keys)
    cohorts = sorted(counts)
    sums = dict.fromkeys(cohorts, 0)
    for key, (_, value) in zip(keys, rows, strict=True):
        if key in sums:
            sums[key] += value - m.centre
    noisy_sums = _sum_measurement(p.sum_scale)([sums[k] for k in cohorts]) if cohorts else []
    out = []
    for key, noisy_sum in zip(cohorts, noisy_sums, strict=True):
        group, country = key.split("|")
        persons = int(counts[key])  # >= threshold >= 1: never a division by zero
        mean_units = min(max(m.centre + noisy_sum / persons, m.lower), m.upper)
        digits = max(0, -math.floor(math.log10(m.resolution)))
        out.append(
            CohortStat(
                m.name, m.unit, group, country, persons, round(mean_units * m.resolution, digits), noisy_sum
            )
        )
    return out, len(set(keys)) - len(cohorts)


def _dp() -> Any:
    import opendp.prelude as dp  # imported on use: the gateway's serving path never needs it

    dp.enable_features("contrib")
    return dp


@functools.lru_cache(maxsize=64)
def _count_measurement(scale: float, threshold: int) -> Any:
    """Cohort key per person → counts per cohort → Laplace noise, keeping counts at or above `threshold`."""
    dp = _dp()
    count = dp.t.make_count_by(dp.vector_domain(dp.atom_domain(T=str)), dp.symmetric_distance(), TV=dp.i64)
    return count >> dp.m.then_laplace_threshold(scale=scale, threshold=threshold)


@functools.lru_cache(maxsize=64)
def _sum_measurement(scale: float) -> Any:
    dp = _dp()
    return dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.l1_distance(T=dp.i64), scale=scale
    )


def _sum_sensitivity(metric: Metric) -> int:
    """The L1 distance one person makes to the vector of cohort sums. OpenDP gives a clamped sum's
    sensitivity; that one person lands in one cohort (so it is also the vector's) is our argument."""
    dp = _dp()
    h = metric.half_width
    domain = dp.vector_domain(dp.atom_domain(bounds=(-h, h), T=dp.i64))
    return dp.t.make_sum(domain, dp.symmetric_distance()).map(1)


@functools.lru_cache(maxsize=64)
def _threshold(scale: float, delta: float, floor: int) -> int:
    """The least threshold (at least `floor`) at which OpenDP's map of the noisy count costs <= δ."""

    def cost(threshold: int) -> float:
        return _count_measurement(scale, threshold).map(1)[1]

    lo, hi = floor, max(floor, 2)
    while cost(hi) > delta:
        lo, hi = hi, hi * 2
        if hi > 2**40:
            raise StatsError(f"no threshold reaches δ={delta} at scale {scale}")
    if cost(lo) <= delta:
        return lo
    while hi - lo > 1:  # cost(lo) > δ >= cost(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cost(mid) <= delta else (mid, hi)
    return hi


# the budget


class Budget:
    """A lifetime privacy budget in a JSON file (0600): what may be spent in total and every spend so far.

    The total is set when the file is created (from the arguments, or the defaults) and is not changed
    by later arguments: raising it is a decision for whoever edits the file, not for a flag. Spends take
    an exclusive lock, so two releases cannot both spend the last of it. A file that cannot be read as a
    budget is refused, never treated as a fresh one."""

    def __init__(self, path: Path, *, total_epsilon: float | None = None, total_delta: float | None = None):
        self.path = Path(path)
        for name, value in (("total_epsilon", total_epsilon), ("total_delta", total_delta)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0")
        self._asked = (total_epsilon, total_delta)

    @classmethod
    def in_state_dir(cls, state_dir: Path, **totals: float | None) -> Budget:
        return cls(Path(state_dir) / BUDGET_FILE, **totals)

    def __repr__(self) -> str:
        return f"Budget({str(self.path)!r})"

    def remaining(self) -> Remaining:
        """What is left to spend."""
        with self._locked():
            return _left(self._load())

    def spend(self, epsilon: float, delta: float, what: str) -> Remaining:
        """Charge (ε, δ) for `what`, durably, and return what is left; `BudgetExhausted` if either
        would go over the total (nothing is charged then)."""
        if not (math.isfinite(epsilon) and epsilon > 0) or not (math.isfinite(delta) and delta >= 0):
            raise ValueError("a spend is epsilon > 0 and delta >= 0")
        with self._locked():
            data = self._load()
            left = _left(data)
            if epsilon > left.epsilon + _SLACK * data["total_epsilon"] or delta > left.delta + (
                _SLACK * data["total_delta"]
            ):
                raise BudgetExhausted(
                    f"privacy budget exhausted: {what} needs ε={epsilon:.6g}, δ={delta:.3g}, but only "
                    f"ε={max(left.epsilon, 0):.6g}, δ={max(left.delta, 0):.3g} is left of ε="
                    f"{data['total_epsilon']:.6g}, δ={data['total_delta']:.3g} ({len(data['spends'])} "
                    f"releases so far, in {self.path}); nothing was released"
                )
            data["spends"].append(
                {"time_us": time.time_ns() // 1000, "epsilon": epsilon, "delta": delta, "what": what[:200]}
            )
            write_private(self.path, json.dumps(data, indent=1).encode())
            return _left(data)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load(self) -> dict:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            eps, delta = self._asked
            return {
                "v": 1,
                "total_epsilon": DEFAULT_TOTAL_EPSILON if eps is None else eps,
                "total_delta": DEFAULT_TOTAL_DELTA if delta is None else delta,
                "spends": [],
            }
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise StatsError(f"budget {self.path} is open to group or others; it must be 0600")
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise StatsError(f"budget {self.path} is not a regular file")
            try:
                data = json.loads(f.read())
                ok = (
                    data["v"] == 1
                    and all(_positive(data[k]) for k in ("total_epsilon", "total_delta"))
                    and all(_positive(s["epsilon"]) and s["delta"] >= 0 for s in data["spends"])
                )
            except (ValueError, KeyError, TypeError):
                ok = False
        if not ok:
            raise StatsError(f"budget {self.path} is not a budget file; refusing to release (restore it)")
        for asked, key in zip(self._asked, ("total_epsilon", "total_delta"), strict=True):
            if asked is not None and asked != data[key]:
                raise StatsError(f"budget {self.path} has {key} {data[key]:.6g}; a total is set once")
        return data


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _left(data: dict) -> Remaining:
    spends = data["spends"]
    return Remaining(
        data["total_epsilon"] - math.fsum(s["epsilon"] for s in spends),
        data["total_delta"] - math.fsum(s["delta"] for s in spends),
    )


# the record of a release


def audit_recorder(log: AuditLog, actor: str = "consumer:operator") -> ReleaseRecorder:
    """A recorder that writes each release to the audit log as "stats.release": cost, what remains, and
    cohort counts released and suppressed, with each metric's threshold; no values."""

    def record(summary: ReleaseSummary) -> None:
        details: dict[str, str | int] = {
            "epsilon": f"{summary.epsilon:.6g}",
            "delta": f"{summary.delta:.3g}",
            "remaining_epsilon": f"{summary.remaining.epsilon:.6g}",
            "remaining_delta": f"{summary.remaining.delta:.3g}",
            "cohorts_released": summary.released,
            "cohorts_suppressed": summary.suppressed,
        }
        for p in summary.plans:
            details[f"threshold.{p.metric.name}"] = p.threshold
        log.record([AuditEvent("stats.release", actor, subject="stats", details=details)])

    return record


__all__ = [
    "AGE_GROUPS",
    "DAILY_STEPS",
    "METRICS",
    "RESTING_HR",
    "SLEEP_TIME",
    "Budget",
    "BudgetExhausted",
    "CohortStat",
    "Cohorts",
    "Metric",
    "MetricPlan",
    "PersonValues",
    "ReleaseRecorder",
    "ReleaseSummary",
    "Remaining",
    "StatsConfig",
    "StatsError",
    "age_group",
    "audit_recorder",
    "collect",
    "plan",
    "release",
]
