"""Anonymised statistics (gateway/privacy/stats.py) on a real SQLite store, a real budget file and a real
audit log: small cohorts are suppressed, the noise is the configured Laplace (Kolmogorov–Smirnov over
many releases), one person cannot move a mean past the clamp, the budget refuses once spent (and
remembers across restarts), and every release is audited without values.

OpenDP takes no seed, so the statistical tests are sized for their false-failure rate instead: the two
KS tests reject at α = 1e-5 each (their wrong-scale controls sit 8 standard deviations past the critical
D), a big cohort is 27 noise scales above its threshold, and the tiny cohorts' 33 draws at 14 scales
below it show one with probability 1.6e-5: a run fails by chance with probability about 4e-5.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from gateway import cli
from gateway.privacy import stats
from gateway.privacy.stats import (
    DAILY_STEPS,
    METRICS,
    RESTING_HR,
    SLEEP_TIME,
    Budget,
    BudgetExhausted,
    CohortStat,
    ReleaseSummary,
    StatsConfig,
    StatsError,
    audit_recorder,
    collect,
    release,
)
from gateway.security.audit import AuditLog, verify
from gateway.store import SqliteStore

DAY = stats.DAY_US
FIRST_DAY = 20_454  # 2026-01-01
KS_ALPHA = 1e-5


@dataclass(frozen=True)
class Person:
    """A device and what it did each day (the same every day unless `days_values` says otherwise)."""

    device: int
    cohort: tuple[str, str]
    steps: float = 8000.0
    sleep_min: float = 420.0
    rhr_bpm: float = 60.0
    days: int = 3


def write(store: SqliteStore, people: list[Person]) -> dict[str, tuple[str, str]]:
    """Records as the gateway stores them: steps in two 12-h records a day, a night ending on the day,
    a resting HR per day; returns the cohorts mapping."""
    for p in people:
        dev = f"{p.device:016x}"
        recs = []
        for d in range(FIRST_DAY, FIRST_DAY + p.days):
            recs += _day(dev, d, p.steps, p.sleep_min, p.rhr_bpm)
        store.commit(p.device, 1, 0, 0, b"", recs)
    return {f"{p.device:016x}": p.cohort for p in people}


def _day(dev: str, day: int, steps: float, sleep_min: float, rhr: float, data_s: int = 43_200) -> list[dict]:
    half = {"steps": steps / 2, "cadence_spm": 100.0, "walk_s": 600, "run_s": 0, "data_s": data_s}
    return [
        {"family": "steps", "device": dev, "start_us": day * DAY, "duration_s": 43_200, "algo": "steps/1",
         "values": half},
        {"family": "steps", "device": dev, "start_us": day * DAY + DAY // 2, "duration_s": 43_200,
         "algo": "steps/1", "values": half},
        {"family": "night", "device": dev, "start_us": day * DAY - 2 * 3_600_000_000, "duration_s": 8 * 3600,
         "algo": "sleep/1", "values": {"total_sleep_min": sleep_min, "time_in_bed_min": 480.0}},
        {"family": "day", "device": dev, "start_us": day * DAY - 3_600_000_000, "duration_s": 86_400,
         "algo": "heart/1", "values": {"resting_hr_bpm": rhr, "resting_epochs": 200}},
    ]  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "bandgate.db")
    s.open()
    yield s
    s.close()


def big_budget(tmp_path: Path) -> Budget:
    return Budget(tmp_path / "big.budget.json", total_epsilon=1e9, total_delta=1.0)


def _units(metric: stats.Metric, value: float) -> int:
    """The naive oracle's person value: one day's value, clamped, in the metric's units."""
    return min(max(round(value / metric.resolution), metric.lower), metric.upper)


def _value(metric: stats.Metric, p: Person) -> float:
    return {"daily_steps": p.steps, "sleep_min": p.sleep_min, "resting_hr_bpm": p.rhr_bpm}[metric.name]


# suppression


def test_a_tiny_cohort_is_suppressed_and_counted_as_such(store: SqliteStore, tmp_path: Path) -> None:
    people = [Person(0x1000 + i, ("25-34", "DE")) for i in range(250)]
    people += [Person(0x9000 + i, ("65+", "IS"), steps=25_000.0) for i in range(3)]
    values = collect(store, write(store, people))
    summaries: list[ReleaseSummary] = []
    budget = big_budget(tmp_path)
    for _ in range(10):
        out = release(values, 1.0, budget, summaries.append)
        assert {(s.age_group, s.country) for s in out} <= {("25-34", "DE")}
    # ε = 1, δ = 1e-6 over three metrics: the noisy threshold (86) sits 14 noise scales above a cohort
    # of three, so each of these 30 draws shows it with probability 5e-7: that is what δ buys
    assert all(p.threshold > 60 and p.delta <= 1e-6 / 3 for s in summaries for p in s.plans)
    assert sum(s.released for s in summaries) == 30  # the big cohort, 27 noise scales above it: always
    assert all(s.suppressed == 3 for s in summaries)  # one small cohort, three metrics


def test_the_floor_suppresses_a_tiny_cohort_even_at_a_huge_epsilon(
    store: SqliteStore, tmp_path: Path
) -> None:
    people = [Person(0x1000 + i, ("25-34", "DE")) for i in range(10)]
    people += [Person(0x9000 + i, ("65+", "IS")) for i in range(3)]
    values = collect(store, write(store, people))
    out = release(values, 30_000.0, big_budget(tmp_path), lambda s: None)
    # at ε = 10,000 a metric the count noise has scale 2e-4: what is released is what the floor allows
    assert {(s.metric, s.age_group, s.country, s.persons) for s in out} == {
        (m.name, "25-34", "DE", 10) for m in METRICS
    }


# the noise


def ks_releases(store: SqliteStore, tmp_path: Path, epsilon: float, releases: int):
    """Many releases of one dataset (8 cohorts of 60 persons): the sum noise over its scale, and the
    count noise, pooled over cohorts and metrics."""
    cohorts = [(g, c) for g in ("16-24", "35-44", "55-64", "65+") for c in ("DE", "FR")]
    people = [
        Person(0x100000 + 100 * k + i, cohort, steps=2000.0 + 97 * i + 500 * k, sleep_min=300.0 + 3 * i + k,
               rhr_bpm=50.0 + 0.3 * i + k)
        for k, cohort in enumerate(cohorts)
        for i in range(60)
    ]  # fmt: skip
    values = collect(store, write(store, people))
    true_sum: dict[tuple[str, tuple[str, str]], int] = defaultdict(int)  # the oracle: about the centre
    for m in METRICS:
        for p in people:
            true_sum[(m.name, p.cohort)] += _units(m, _value(m, p)) - m.centre
    per_metric = epsilon / len(METRICS)
    count_scale = 1 / (per_metric / 2)  # the configured split: half the metric's ε to the count
    sum_scale = {m.name: m.half_width / (per_metric / 2) for m in METRICS}
    threshold = stats.plan(DAILY_STEPS, per_metric, 1e-6 / 3, 10).threshold
    assert 60 - threshold >= 40 * count_scale  # no cohort goes missing, bar a chance below e^-40
    budget = big_budget(tmp_path)
    z, count_noise = [], []
    for _ in range(releases):
        out = release(values, epsilon, budget, lambda s: None)
        assert len(out) == len(cohorts) * len(METRICS)
        for s in out:
            key = (s.metric, (s.age_group, s.country))
            z.append((s.noisy_sum - true_sum[key]) / sum_scale[s.metric])
            count_noise.append(s.persons - 60)
    return np.array(z), np.array(count_noise), count_scale


def test_noise_is_laplace_at_the_configured_scale(store: SqliteStore, tmp_path: Path) -> None:
    z, count_noise, count_scale = ks_releases(store, tmp_path, epsilon=6.0, releases=1000)
    # The sums: discrete Laplace with scales of 450 units and more, against the continuous Laplace(1)
    # (the lattice moves the CDF by at most 1/(2·450) ≈ 0.001, against a critical D of 0.015).
    fit = sps.kstest(z, "laplace")
    print(f"KS sums: n={len(z)} D={fit.statistic:.4f} p={fit.pvalue:.3g}")
    assert fit.pvalue > KS_ALPHA
    # ...and the test can tell: a scale 25 % off, or a Gaussian of the same variance, is rejected
    assert sps.kstest(z, "laplace", args=(0, 1.25)).pvalue < KS_ALPHA
    assert sps.kstest(z, "laplace", args=(0, 0.8)).pvalue < KS_ALPHA
    assert sps.kstest(z, "norm", args=(0, math.sqrt(2))).pvalue < KS_ALPHA

    # The counts: discrete Laplace at scale 1, where the lattice matters. Jittered by an independent
    # U[0, 1), a discrete variable has a continuous CDF that KS can test exactly.
    jittered = count_noise + np.random.default_rng(13).random(len(count_noise))
    fit = sps.kstest(jittered, jittered_cdf(sps.dlaplace(1 / count_scale)))
    print(f"KS counts: n={len(count_noise)} D={fit.statistic:.4f} p={fit.pvalue:.3g}")
    assert fit.pvalue > KS_ALPHA
    assert sps.kstest(jittered, jittered_cdf(sps.dlaplace(1 / (1.25 * count_scale)))).pvalue < KS_ALPHA


def jittered_cdf(dist: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The CDF of K + U, K from the integer distribution `dist` and U ~ U[0, 1) independent of it."""

    def cdf(x: np.ndarray) -> np.ndarray:
        k = np.floor(x)
        return dist.cdf(k - 1) + (x - k) * dist.pmf(k)

    return cdf


# bounded contribution


def test_one_device_cannot_move_a_mean_past_the_clamp(store: SqliteStore, tmp_path: Path) -> None:
    honest = [
        Person(
            0x2000 + i, ("35-44", "NL"), steps=6000.0 + 40 * i, sleep_min=400.0 + i, rhr_bpm=58.0 + 0.1 * i
        )
        for i in range(100)
    ]
    absurd = Person(0xBAD, ("35-44", "NL"), steps=1e9, sleep_min=1e6, rhr_bpm=1e4, days=200)
    cohorts = write(store, [*honest, absurd])
    values = collect(store, cohorts)
    # one row per person and metric, the absurd one at the upper bound however many days it sent
    for m in METRICS:
        rows = [v for _, v in values.rows[m.name]]
        assert len(rows) == 101
        assert max(rows) == m.upper
        assert sorted(rows)[:-1] == sorted(_units(m, _value(m, p)) for p in honest)
    out = release(values, 3000.0, big_budget(tmp_path), lambda s: None)  # noise far below the bound
    for m in METRICS:
        honest_mean = float(np.mean([_units(m, _value(m, p)) for p in honest])) * m.resolution
        bound = (m.upper * m.resolution - honest_mean) / 101  # the most one person of 101 can add
        (got,) = [s for s in out if s.metric == m.name]
        # the noise on the mean (sd of the sum's Laplace over 101), and rounding to the resolution
        tolerance = 8 * math.sqrt(2) * m.half_width / (1000 / 2) * m.resolution / 101 + m.resolution
        assert got.persons == 101
        assert abs((got.mean - honest_mean) - bound) <= tolerance  # it adds just what the clamp lets it
        assert bound < (_value(m, absurd) - honest_mean) / 101 / 100  # unclamped, 100 times more at least


def test_a_person_contributes_their_most_recent_max_days_of_valid_days(store: SqliteStore) -> None:
    dev = f"{0x3000:016x}"
    recs = []
    for d in range(FIRST_DAY, FIRST_DAY + 12):  # older days: many steps
        recs += _day(dev, d, 20_000.0, 300.0, 70.0)
    for d in range(FIRST_DAY + 12, FIRST_DAY + 40):  # the most recent 28 days
        recs += _day(dev, d, 4000.0, 450.0, 55.0)
    recs += _day(dev, FIRST_DAY + 40, 30_000.0, 450.0, 55.0, data_s=3600)  # 2 h of data: not a day
    store.commit(0x3000, 1, 0, 0, b"", recs)
    values = collect(store, {dev: ("45-54", "PL")}, StatsConfig(max_days=28))
    assert values.rows["daily_steps"] == ((("45-54", "PL"), 4000),)
    assert values.rows["sleep_min"] == ((("45-54", "PL"), 450),)
    assert values.rows["resting_hr_bpm"] == ((("45-54", "PL"), 550),)  # tenths of a bpm
    assert collect(store, {}).rows["daily_steps"] == ()  # a device outside the cohorts: no row


def test_cohorts_with_labels_that_are_not_cohorts_are_refused(store: SqliteStore) -> None:
    for bad in ({"0123": ("25-34", "DE")}, {"0" * 16: ("25-30", "DE")}, {"0" * 16: ("25-34", "Germany")}):
        with pytest.raises(ValueError, match="cohorts"):
            collect(store, bad)
    assert stats.age_group(2000, 2026) == "25-34"
    assert stats.age_group(2012, 2026) is None
    assert stats.age_group(1950, 2026) == "65+"


# the budget


def test_the_budget_runs_out_with_a_refusal_that_survives_a_restart(
    store: SqliteStore, tmp_path: Path
) -> None:
    people = [Person(0x1000 + i, ("25-34", "DE")) for i in range(150)]
    values = collect(store, write(store, people))
    path = tmp_path / "state" / stats.BUDGET_FILE
    path.parent.mkdir()
    budget = Budget(path, total_epsilon=2.5, total_delta=1e-5)
    recorded: list[ReleaseSummary] = []
    release(values, 1.0, budget, recorded.append)
    release(values, 1.0, budget, recorded.append)
    with pytest.raises(BudgetExhausted, match=r"privacy budget exhausted.*left.*nothing was released"):
        release(values, 1.0, budget, recorded.append)
    assert len(recorded) == 2
    assert recorded[-1].remaining.epsilon == pytest.approx(0.5)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    restarted = Budget(path)  # a new process: the file holds the total and the spends
    assert restarted.remaining().epsilon == pytest.approx(0.5)
    with pytest.raises(BudgetExhausted):
        release(values, 1.0, restarted, recorded.append)
    release(values, 0.5, restarted, recorded.append)  # what is left can still be spent
    assert restarted.remaining().epsilon == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(StatsError, match="a total is set once"):
        Budget(path, total_epsilon=100.0).remaining()


def test_the_budget_refuses_a_file_it_cannot_trust(tmp_path: Path) -> None:
    path = tmp_path / stats.BUDGET_FILE
    budget = Budget(path, total_epsilon=1.0)
    for _ in range(10):  # 10 × 0.1 is 0.9999999999999999 in floats: still within a total of 1
        budget.spend(0.1, 0.0, "test")
    with pytest.raises(BudgetExhausted):
        budget.spend(1e-6, 0.0, "test")
    path.chmod(0o644)
    with pytest.raises(StatsError, match="0600"):
        budget.remaining()
    path.write_text("{}")
    path.chmod(0o600)
    with pytest.raises(StatsError, match="not a budget file"):
        budget.spend(0.1, 0.0, "test")


def test_a_release_whose_record_fails_is_paid_for_and_not_returned(
    store: SqliteStore, tmp_path: Path
) -> None:
    values = collect(store, write(store, [Person(0x1000 + i, ("25-34", "DE")) for i in range(150)]))
    budget = Budget(tmp_path / stats.BUDGET_FILE, total_epsilon=5.0)

    def broken(summary: ReleaseSummary) -> None:
        raise OSError("audit disk full")

    with pytest.raises(OSError, match="audit disk full"):
        release(values, 1.0, budget, broken)
    assert budget.remaining().epsilon == pytest.approx(4.0)


# the audit entry


def state_dir(root: Path) -> Path:
    root.mkdir(mode=0o700, exist_ok=True)
    (root / "audit.key").write_bytes(secrets.token_bytes(32))
    (root / "audit.key").chmod(0o600)
    return root


def test_each_release_is_audited_with_its_cost_and_no_values(store: SqliteStore, tmp_path: Path) -> None:
    people = [
        Person(0x4000 + i, ("55-64", "SE"), steps=7001.0 + 13 * i, sleep_min=401.0 + i) for i in range(250)
    ]
    people += [Person(0x9000 + i, ("65+", "IS"), steps=12_345.0) for i in range(2)]
    values = collect(store, write(store, people))
    state = state_dir(tmp_path / "state")
    log = AuditLog(store, (state / "audit.key").read_bytes(), state / "audit.head")
    log.open()
    out = release(values, 1.0, Budget.in_state_dir(state), audit_recorder(log))
    rows = [json.loads(r.entry) for r in store.audit_rows()]
    (entry,) = [r for r in rows if r["action"] == "stats.release"]
    assert entry["actor"] == "consumer:operator"
    details = entry["details"]
    assert details["epsilon"] == "1"
    assert float(details["remaining_epsilon"]) == pytest.approx(9.0)
    assert float(details["delta"]) <= 1e-6
    assert details["cohorts_released"] == len(out)
    assert details["cohorts_suppressed"] == 3
    assert set(details) == {
        "epsilon", "delta", "remaining_epsilon", "remaining_delta", "cohorts_released", "cohorts_suppressed",
        *(f"threshold.{m.name}" for m in METRICS),
    }  # fmt: skip
    # what an entry says beyond its seq and time: no device, no person's value, no released mean
    text = json.dumps({k: entry[k] for k in ("actor", "subject", "reason", "details")})
    for p in people:
        assert f"{p.device:016x}" not in text
        assert str(int(p.steps)) not in text and str(int(p.sleep_min)) not in text
    for s in out:
        assert f"{s.mean}" not in text
    assert verify(store, (state / "audit.key").read_bytes(), state / "audit.head").ok


# the command


def test_cli_prints_json_lines_then_refuses_when_the_budget_is_spent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "bandgate.db"
    with SqliteStore(db) as s:
        cohorts = write(s, [Person(0x5000 + i, ("25-34", "DE")) for i in range(200)])
    cohorts_file = tmp_path / "cohorts.json"
    cohorts_file.write_text(json.dumps({d: list(c) for d, c in cohorts.items()}))
    state = state_dir(tmp_path / "state")
    argv = ["stats", "--store", f"sqlite:///{db}", "--epsilon", "2", "--state-dir", str(state)]
    argv += ["--cohorts", str(cohorts_file), "--total-epsilon", "3"]

    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["metric"] for line in lines} <= {m.name for m in METRICS}
    assert all(line.keys() == {"metric", "unit", "age_group", "country", "persons", "mean"} for line in lines)
    assert all((line["age_group"], line["country"]) == ("25-34", "DE") for line in lines)

    # a new process, the same state dir: 1 of 3 left, and this release needs 2
    env = {**os.environ, "BANDGATE_STATE_DIR": str(state)}
    argv_again = [a for a in argv if a != str(state) and a != "--state-dir"]
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *argv_again],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("stats: privacy budget exhausted")
    assert "nothing was released" in done.stderr
    with SqliteStore(db) as s:
        entries = [json.loads(r.entry) for r in s.audit_rows()]
    assert [e["action"] for e in entries] == ["stats.release"]


def test_cli_refuses_without_an_audit_key_and_spends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "bandgate.db"
    with SqliteStore(db) as s:
        cohorts = write(s, [Person(0x5000 + i, ("25-34", "DE")) for i in range(20)])
    cohorts_file = tmp_path / "cohorts.json"
    cohorts_file.write_text(json.dumps({d: list(c) for d, c in cohorts.items()}))
    state = tmp_path / "state"
    state.mkdir()
    argv = ["stats", "--store", f"sqlite:///{db}", "--epsilon", "1", "--state-dir", str(state)]
    assert cli.main([*argv, "--cohorts", str(cohorts_file)]) == 2
    assert "audit key" in capsys.readouterr().err
    assert not (state / stats.BUDGET_FILE).exists()


def test_cohort_stat_json_has_no_noisy_sum() -> None:
    s = CohortStat(RESTING_HR.name, RESTING_HR.unit, "25-34", "DE", 120, 61.2, -400)
    assert s.to_json()["mean"] == 61.2 and "noisy_sum" not in s.to_json()
    assert SLEEP_TIME.centre == 450 and DAILY_STEPS.half_width == 15_000


def test_no_noise_but_opendp_s() -> None:
    """Naive floating-point noise leaks (Mironov 2012): the module imports no other source of randomness."""
    import ast

    tree = ast.parse(Path(stats.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("random", "numpy", "secrets", "scipy")}
    assert "opendp.prelude" in imported


def test_cohorts_come_from_the_owners_sealed_profiles_and_leave_out_minors_and_the_unknown(tmp_path):
    import datetime

    from gateway.privacy.sealing import open_sealer
    from gateway.privacy.stats import age_group
    from gateway.privacy.stats_cli import _profile_cohorts
    from gateway.store import open_store
    from tests.gateway.gatewaykit import band
    from tests.privacy.privacykit import Owner, hexid, privacy_gateway, run

    year = datetime.date.today().year
    people = {
        band(seed=101)[0]: {"birth_year": 1990, "country": "DE"},
        band(seed=102)[0]: {"birth_year": year - 12, "country": "FR"},  # a minor: never counted
        band(seed=103)[0]: {"birth_year": 1960},  # no country
        band(seed=104)[0]: {"birth_year": 1950, "country": "US"},
    }

    async def scenario():
        async with privacy_gateway(tmp_path) as (_gw, creds, cfg):
            for device, fields in people.items():
                async with await creds.band_channel(device) as ch:
                    await Owner(ch, device).profile(**fields)
            return cfg

    cfg = run(scenario())
    sealer = open_sealer(tmp_path / "state")
    try:
        with open_store(cfg.store, sealer) as store:
            cohorts = _profile_cohorts(store, sealer)
    finally:
        sealer.keys.close()
    devices = list(people)
    assert cohorts == {hexid(devices[0]): (age_group(1990, year), "DE"), hexid(devices[3]): ("65+", "US")}
