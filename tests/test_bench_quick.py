"""`python -m bench --json --quick` runs and prints every documented key (values are not judged here)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _unserved_keys() -> set[str]:
    """The scale-out keys of a service that does not answer here (the bench leaves them out and says why
    on stderr); none under CI=true, where a missing service must fail the run, not thin it."""
    from bench import scaleout_bench as so

    if os.environ.get("CI", "").lower() == "true":
        return set()
    keys: set[str] = set()
    if so.postgres_problem(so.POSTGRES_URL):
        keys |= set(so.POSTGRES_KEYS)
    if so.nats_problem(so.NATS_URL):
        keys |= set(so.NATS_KEYS)
    return keys


# The whole quick bench, one group after another: 4 min 30 s - 4 min 48 s on the 2-core box before the
# serving-process group (~45 s) was added, so pytest's 300 s (pyproject.toml) would end it mid-run.
@pytest.mark.timeout(900)
def test_quick_bench_prints_every_documented_key() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--json", "--quick"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    text = (REPO / "BENCHMARKS.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, re.M))
    assert documented, "BENCHMARKS.md documents no keys"
    # plaintext baselines too slow for --quick, marked in their row (bench/e2e_bench.py e2e_figures)
    full_only = set(re.findall(r"^\| `([a-z0-9_]+)` \|[^|]*\|[^|]*\| \*\*Full runs only\.\*\*", text, re.M))
    assert not full_only & figures.keys(), f"marked full-only but printed by --quick: {sorted(full_only)}"
    documented -= full_only
    if importlib.util.find_spec("skdh") is None:  # the `peers` extra is optional
        documented -= {"skdh_samples_per_s", "features_vs_skdh"}
    unserved = _unserved_keys()
    assert not unserved & figures.keys(), f"printed without their service: {sorted(unserved)}"
    if unserved:
        warnings.warn(f"not checked, their service is missing: {sorted(unserved)}", stacklevel=1)
    documented -= unserved
    missing = documented - figures.keys()
    assert not missing, f"documented but not printed: {sorted(missing)}"
    undocumented = {k for k, v in figures.items() if isinstance(v, float)} - documented
    assert not undocumented, f"printed but not documented: {sorted(undocumented)}"
    # a count (unit `count` in its row, e.g. sleep periods found in waking days) may rightly be 0
    counts = set(re.findall(r"^\| `([a-z0-9_]+)` \| count \|", text, re.M))
    for key in documented:
        value = figures[key]
        assert isinstance(value, (int, float)) and (value > 0 or (key in counts and value == 0)), key
