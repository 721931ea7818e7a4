"""Leave-one-subject-out accuracy of the sleep stager on the 21 Sleep-Accel nights, against a
gradient-boosting baseline fitted on the same features in the same folds.

    python -m bench.accuracy_sleep [--data DIR] [--json out.json] [--plot night.png]

Everything (boosted-tree emission model, transition priors) is refitted in each fold without the night
being scored, including the held-out subject's stage-only hypnogram. Needs scikit-learn for the
baseline only (skipped, and said so, without it); matplotlib for the optional plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# One BLAS thread: the matrices are small, so threads only contend on a shared machine (20x slower
# here), and a fixed thread count keeps the float summation order, hence the fitted file, reproducible.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from decoder import sleep  # noqa: E402
from scripts.fit_sleep import data_dir, fit_params, load_hypnograms, load_nights  # noqa: E402

# class sets: name → (map from 4-class stage, label names)
CLASS_SETS = {
    "4class": (np.array([0, 1, 2, 3]), ("wake", "light", "deep", "rem")),
    "3class": (np.array([0, 1, 1, 2]), ("wake", "nrem", "rem")),
    "sleepwake": (np.array([0, 1, 1, 1]), ("wake", "sleep")),
}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """Rows = truth, columns = prediction."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def kappa(m: np.ndarray) -> float:
    """Cohen's κ of a confusion matrix (0 when chance agreement is total)."""
    n = m.sum()
    if n == 0:
        return float("nan")
    po = np.trace(m) / n
    pe = (m.sum(axis=0) @ m.sum(axis=1)) / (n * n)
    return float((po - pe) / (1 - pe)) if pe < 1 else 0.0


def f1_per_class(m: np.ndarray) -> np.ndarray:
    tp = np.diag(m).astype(np.float64)
    denom = m.sum(axis=0) + m.sum(axis=1)
    return np.divide(2 * tp, denom, out=np.full(tp.shape, np.nan), where=denom > 0)


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """κ, accuracy, per-class F1 and confusion for every class set, from 4-class labels."""
    out = {}
    for name, (mapping, labels) in CLASS_SETS.items():
        m = confusion(mapping[y_true], mapping[y_pred], len(labels))
        out[name] = {
            "kappa": kappa(m),
            "accuracy": float(np.trace(m) / m.sum()) if m.sum() else float("nan"),
            "f1": dict(zip(labels, f1_per_class(m).tolist(), strict=True)),
            "confusion": m.tolist(),
        }
    return out


def _hgb_predict(X_train, y_train, X_test):
    from sklearn.ensemble import HistGradientBoostingClassifier

    clf = HistGradientBoostingClassifier(random_state=0)
    clf.fit(X_train, y_train)
    return clf.predict(X_test).astype(np.int64)


def evaluate(data_dir_: str | Path | None = None, baseline: bool = True, **fit_options) -> dict:
    """LOSO evaluation; pooled κ under `sleep_kappa_4class` / `_3class` / `_sleepwake` (and `hgb_…`)."""
    root = data_dir(None if data_dir_ is None else str(data_dir_))
    nights = load_nights(root)
    if not nights:
        raise FileNotFoundError(f"no nights under {root}/sleep/epochs")
    hyp = load_hypnograms(root)
    feats = [sleep.night_features(n.time_s, n.hr_bpm, n.counts) for n in nights]
    if baseline:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            baseline = False
    preds, base_preds, per_night = [], [], []
    for i, night in enumerate(nights):
        train = [n for j, n in enumerate(nights) if j != i]
        train_f = [f for j, f in enumerate(feats) if j != i]
        params = sleep.SleepParams.from_dict(fit_params(train, hyp, features=train_f, **fit_options))
        pred = sleep.stage_night(night.time_s, night.hr_bpm, night.counts, params).astype(np.int64)
        preds.append(pred)
        row = {
            "subject": night.subject,
            "epochs": int(night.stage.size),
            "hr_valid_frac": float(np.mean(np.r_[True, np.diff(night.hr_bpm) != 0])),
            "ours": scores(night.stage, pred),
            "summary": sleep.summarize_night(pred),
            "summary_psg": sleep.summarize_night(night.stage),
        }
        if baseline:
            bp = _hgb_predict(np.concatenate(train_f), np.concatenate([n.stage for n in train]), feats[i])
            base_preds.append(bp)
            row["hgb"] = scores(night.stage, bp)
        per_night.append(row)
    y = np.concatenate([n.stage for n in nights])
    pooled = scores(y, np.concatenate(preds))
    result = {
        "lag_epochs": sleep.LAG_EPOCHS,
        "lag_minutes": sleep.LAG_EPOCHS * sleep.EPOCH_S / 60,
        "nights": len(nights),
        "epochs": int(y.size),
        "pooled": pooled,
        "per_night": per_night,
        "fit_options": fit_options,
    }
    for name in CLASS_SETS:
        result[f"sleep_kappa_{name}"] = pooled[name]["kappa"]
        result[f"sleep_accuracy_{name}"] = pooled[name]["accuracy"]
        result[f"sleep_kappa_{name}_night_mean"] = float(
            np.mean([r["ours"][name]["kappa"] for r in per_night])
        )
    if baseline:
        pooled_b = scores(y, np.concatenate(base_preds))
        result["hgb_pooled"] = pooled_b
        for name in CLASS_SETS:
            result[f"hgb_kappa_{name}"] = pooled_b[name]["kappa"]
            result[f"hgb_accuracy_{name}"] = pooled_b[name]["accuracy"]
            result[f"hgb_kappa_{name}_night_mean"] = float(
                np.mean([r["hgb"][name]["kappa"] for r in per_night])
            )
    result["_predictions"] = {n.subject: p for n, p in zip(nights, preds, strict=True)}
    return result


def plot_night(result: dict, data_dir_: str | Path | None, subject: str, path: str | Path) -> bool:
    """Hypnogram of one night, ours vs PSG, as PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    night = next(
        n
        for n in load_nights(data_dir(None if data_dir_ is None else str(data_dir_)))
        if n.subject == subject
    )
    pred = result["_predictions"][subject]
    order = np.array([3, 1, 0, 2])  # plot rows top→bottom: wake, REM, light, deep
    hours = (night.time_s - night.time_s[0]) / 3600
    fig, ax = plt.subplots(2, 1, figsize=(10, 4), sharex=True)
    for a, s, title in ((ax[0], night.stage, "PSG"), (ax[1], pred, "bandgate")):
        a.step(hours, order[s], where="post", lw=1)
        a.set_yticks([0, 1, 2, 3], ["deep", "light", "REM", "wake"])
        a.set_title(f"subject {subject}: {title}", fontsize=9)
    ax[1].set_xlabel("hours since lights off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _print(result: dict) -> None:
    print(
        f"LOSO on {result['nights']} nights, {result['epochs']} epochs, lag {result['lag_minutes']:.0f} min"
    )
    print(f"{'':12s}{'κ ours':>9s}{'acc ours':>10s}{'κ HGB':>9s}{'acc HGB':>9s}{'κ ours/night':>14s}")
    for name in CLASS_SETS:
        print(
            f"{name:12s}{result[f'sleep_kappa_{name}']:9.3f}{result[f'sleep_accuracy_{name}']:10.3f}"
            f"{result.get(f'hgb_kappa_{name}', float('nan')):9.3f}"
            f"{result.get(f'hgb_accuracy_{name}', float('nan')):9.3f}"
            f"{result[f'sleep_kappa_{name}_night_mean']:14.3f}"
        )
    p = result["pooled"]["4class"]
    print("F1 4-class:", {k: round(v, 3) for k, v in p["f1"].items()})
    if "hgb_pooled" in result:
        print("F1 4-class HGB:", {k: round(v, 3) for k, v in result["hgb_pooled"]["4class"]["f1"].items()})
    print("confusion 4-class (rows PSG wake/light/deep/REM, cols ours):")
    for row in p["confusion"]:
        print("   ", " ".join(f"{v:6d}" for v in row))
    print("per night κ (4-class / 3-class / sleep-wake):")
    for r in result["per_night"]:
        o = r["ours"]
        print(
            f"  {r['subject']:>8s} n={r['epochs']:4d} hr_fresh={r['hr_valid_frac']:.2f}  "
            f"{o['4class']['kappa']:6.3f} {o['3class']['kappa']:6.3f} {o['sleepwake']['kappa']:6.3f}"
            + (f"   HGB {r['hgb']['4class']['kappa']:6.3f}" if "hgb" in r else "")
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--json", help="write the full result here")
    ap.add_argument("--plot", help="PNG of one night's hypnogram vs PSG")
    ap.add_argument("--plot-subject", default="1360686")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args(argv)
    result = evaluate(args.data, baseline=not args.no_baseline)
    _print(result)
    if args.json:
        out = {k: v for k, v in result.items() if not k.startswith("_")}
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        ok = plot_night(result, args.data, args.plot_subject, args.plot)
        print(f"plot → {args.plot}" if ok else "matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
