"""bench/accuracy.json still says what the code computes: two leave-one-subject-out sleep folds and two
step recordings, recomputed and compared with their stored records.

Which folds and recordings is drawn from the current git commit (so successive commits check different
ones, and any one run is reproducible); without git, the first two of each, sorted. The full file is
`python -m bench.accuracy` (minutes); this recomputes about a tenth of it. Skipped when the shared data
is absent, since nothing can be recomputed then.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench import accuracy_sleep, accuracy_steps

REPO = Path(__file__).resolve().parents[1]
SAVED = json.loads((REPO / "bench" / "accuracy.json").read_text())
DATA = accuracy_steps.data_dir()
HAVE_SLEEP = (DATA / "sleep" / "epochs").is_dir() and any((DATA / "sleep" / "epochs").glob("subject_*.csv"))
HAVE_STEPS = accuracy_steps.have_data()
# Floats are recomputed by the same deterministic code (one BLAS thread, fixed seeds), so they agree to
# rounding: a relative 1e-9 allows for a different CPU's summation order, nothing more. Integers exactly.
REL_TOL = accuracy_sleep.FOLD_TOLERANCE


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    head = out.stdout.strip()
    return head if len(head) == 40 else None


def pick(keys, n: int = 2, commit: str | None = None) -> list[str]:
    """`n` of `keys`, chosen by the commit hash (fixed: the first `n`, sorted, when there is none)."""
    keys = sorted(keys)
    if commit is None:
        return keys[:n]
    rng = np.random.default_rng(int(commit[:16], 16))
    return sorted(keys[i] for i in rng.choice(len(keys), size=min(n, len(keys)), replace=False))


def assert_same(got, want, where: str = "") -> None:
    """Recursive comparison: same keys, integers and strings equal, floats within REL_TOL."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (
            f"{where}: keys {sorted(got)} ≠ {sorted(want)}"
        )
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length differs"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(want, rel=REL_TOL, abs=1e-12), f"{where}: {got!r} ≠ stored {want!r}"
    else:
        assert got == want, f"{where}: {got!r} ≠ stored {want!r}"


def test_pick_is_deterministic_and_falls_back_without_git():
    keys = [f"k{i}" for i in range(21)]
    assert pick(keys) == ["k0", "k1"]
    a = pick(keys, commit="0123456789abcdef" * 2 + "01234567")
    assert a == pick(keys, commit="0123456789abcdef" * 2 + "01234567") and len(set(a)) == 2


@pytest.mark.skipif(not HAVE_SLEEP, reason=f"Sleep-Accel nights not found under {DATA} (set BANDGATE_DATA)")
def test_two_sleep_folds_match_accuracy_json():
    folds = SAVED.get("sleep_folds")
    assert folds, "bench/accuracy.json has no sleep_folds: run python -m bench.accuracy"
    nights, hyp, feats = accuracy_sleep.load()
    index = {n.subject: i for i, n in enumerate(nights)}
    assert set(folds) == set(index), "accuracy.json was made on other nights"
    for subject in pick(folds, commit=_commit()):
        want = dict(folds[subject])
        baseline = "hgb_confusion_4class" in want and accuracy_sleep.have_baseline()
        if not baseline:
            want.pop("hgb_confusion_4class", None)
        got, _ = accuracy_sleep.evaluate_fold(nights, hyp, feats, index[subject], baseline=baseline)
        assert_same(got, want, f"sleep_folds.{subject}")


@pytest.mark.skipif(not HAVE_STEPS, reason=f"step recordings not found under {DATA} (set BANDGATE_DATA)")
def test_two_step_recordings_match_accuracy_json():
    saved = SAVED.get("steps_recordings")
    assert saved, "bench/accuracy.json has no steps_recordings: run python -m bench.accuracy"
    recs = accuracy_steps.load_recordings(str(DATA))
    for key in pick(saved, commit=_commit()):
        name, fs = key.rsplit("@", 1)
        assert_same(accuracy_steps.score(recs[name], int(fs)), saved[key], f"steps_recordings.{key}")
