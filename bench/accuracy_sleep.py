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
from scripts.fit_sleep import (  # noqa: E402
    CLASS_SETS,
    confusion,
    data_dir,
    fit_tuned,
    kappa,
    load_hypnograms,
    load_nights,
    stage_with_posterior,
)

BOOTSTRAP_RESAMPLES = 2000  # resamples of nights for the κ intervals
BOOTSTRAP_SEED = 0
CALIBRATION_BINS = 10  # equal-width bins of predicted probability for ECE and the reliability diagram
FOLD_TOLERANCE = 1e-9  # relative: what tests/test_accuracy_json.py allows between a fold and its record


def f1_per_class(m: np.ndarray) -> np.ndarray:
    tp = np.diag(m).astype(np.float64)
    denom = m.sum(axis=0) + m.sum(axis=1)
    return np.divide(2 * tp, denom, out=np.full(tp.shape, np.nan), where=denom > 0)


def collapse(m4: np.ndarray, name: str) -> np.ndarray:
    """A 4-class confusion matrix (…, 4, 4) summed into the class set `name`."""
    mapping, labels = CLASS_SETS[name]
    onehot = np.eye(len(labels), dtype=np.int64)[mapping]  # (4, k)
    return np.einsum("ia,...ij,jb->...ab", onehot, np.asarray(m4), onehot)


def kappa_batch(m: np.ndarray) -> np.ndarray:
    """Cohen's κ of a stack of confusion matrices (…, k, k)."""
    m = np.asarray(m, dtype=np.float64)
    n = m.sum(axis=(-2, -1))
    po = np.trace(m, axis1=-2, axis2=-1) / n
    pe = np.einsum("...i,...i->...", m.sum(axis=-2), m.sum(axis=-1)) / (n * n)
    return (po - pe) / (1 - pe)


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


def bootstrap_kappa(confusions: np.ndarray, seed: int = BOOTSTRAP_SEED) -> dict:
    """95 % percentile intervals of the pooled κ per class set, resampling nights with replacement:
    `confusions` is (nights, 4, 4), one 4-class confusion per night; each resample sums its nights'."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(confusions), (BOOTSTRAP_RESAMPLES, len(confusions)))
    pooled = np.asarray(confusions)[idx].sum(axis=1)
    out = {}
    for name in CLASS_SETS:
        k = kappa_batch(collapse(pooled, name))
        out[name] = (float(np.percentile(k, 2.5)), float(np.percentile(k, 97.5)))
    return out


def expected_calibration_error(prob: np.ndarray, y: np.ndarray, bins: int = CALIBRATION_BINS) -> list[float]:
    """Per class, one-vs-rest: Σ_b n_b/N · |mean predicted − observed frequency| over equal-width bins."""
    out = []
    for c in range(prob.shape[1]):
        p, hit = prob[:, c], (y == c).astype(np.float64)
        b = np.minimum((p * bins).astype(np.int64), bins - 1)
        n = np.bincount(b, minlength=bins)
        gap = np.abs(np.bincount(b, p, bins) - np.bincount(b, hit, bins))
        out.append(float(gap.sum() / p.size) if n.sum() else float("nan"))
    return out


def _hgb_predict(X_train, y_train, X_test):
    from sklearn.ensemble import HistGradientBoostingClassifier

    clf = HistGradientBoostingClassifier(random_state=0)
    clf.fit(X_train, y_train)
    return clf.predict(X_test).astype(np.int64)


def have_baseline() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def load(data_dir_: str | Path | None = None):
    """(nights, hypnograms, features per night) of the shared data; FileNotFoundError without it."""
    root = data_dir(None if data_dir_ is None else str(data_dir_))
    nights = load_nights(root)
    if not nights:
        raise FileNotFoundError(f"no nights under {root}/sleep/epochs")
    feats = [sleep.night_features(n.time_s, n.hr_bpm, n.counts) for n in nights]
    return nights, load_hypnograms(root), feats


def evaluate_fold(nights, hyp, feats, i: int, baseline: bool = True, **fit_options) -> tuple[dict, dict]:
    """One LOSO fold: everything tuned and fitted without night `i`, then night `i` scored.

    Returns (record, arrays): the record is what bench/accuracy.json keeps per fold (JSON numbers, the
    staleness test recomputes it); arrays hold the stages and probabilities for pooled figures."""
    night = nights[i]
    train = [n for j, n in enumerate(nights) if j != i]
    train_f = [f for j, f in enumerate(feats) if j != i]
    fitted = fit_tuned(train, hyp, features=train_f, **fit_options)
    params = sleep.SleepParams.from_dict(fitted)
    pred, post = stage_with_posterior(night, params)
    prob = sleep.calibrate(post, params.calibration_scale, params.calibration_bias)
    ours, psg = sleep.summarize_night(pred), sleep.summarize_night(night.stage)
    m4 = confusion(night.stage, pred, sleep.N_STAGES)
    record = {
        "epochs": int(night.stage.size),
        "emission_scale": fitted["emission_scale"],
        "boosting_rounds": len(fitted["tree_feature"]) // sleep.N_STAGES,
        "calibration": fitted["calibration"],
        "confusion_4class": m4.tolist(),
        **{f"kappa_{name}": kappa(collapse(m4, name)) for name in CLASS_SETS},
        "tst_err_min": ours["total_sleep_min"] - psg["total_sleep_min"],
        "waso_err_min": ours["waso_min"] - psg["waso_min"],
        "log_loss": float(-np.mean(np.log(np.maximum(prob[np.arange(pred.size), night.stage], 1e-300)))),
    }
    arrays = {"pred": pred, "post": post, "prob": prob}
    if baseline:
        bp = _hgb_predict(np.concatenate(train_f), np.concatenate([n.stage for n in train]), feats[i])
        record["hgb_confusion_4class"] = confusion(night.stage, bp, sleep.N_STAGES).tolist()
        arrays["hgb"] = bp
    return record, arrays


def evaluate(data_dir_: str | Path | None = None, baseline: bool = True, **fit_options) -> dict:
    """LOSO evaluation: pooled κ under `sleep_kappa_4class` / `_3class` / `_sleepwake` with bootstrap
    intervals (`…_ci_low` / `…_ci_high`), `hgb_…` the baseline in the same folds, night-level TST and
    WASO errors, calibration errors, and `sleep_folds` (one record per held-out subject)."""
    nights, hyp, feats = load(data_dir_)
    baseline = baseline and have_baseline()
    folds, arrays, per_night = {}, [], []
    for i, night in enumerate(nights):
        record, arr = evaluate_fold(nights, hyp, feats, i, baseline, **fit_options)
        folds[night.subject] = record
        arrays.append(arr)
        row = {
            "subject": night.subject,
            "epochs": int(night.stage.size),
            "hr_valid_frac": float(np.mean(np.r_[True, np.diff(night.hr_bpm) != 0])),
            "ours": scores(night.stage, arr["pred"]),
            "summary": sleep.summarize_night(arr["pred"]),
            "summary_psg": sleep.summarize_night(night.stage),
        }
        if baseline:
            row["hgb"] = scores(night.stage, arr["hgb"])
        per_night.append(row)
    y = np.concatenate([n.stage for n in nights])
    pooled = scores(y, np.concatenate([a["pred"] for a in arrays]))
    result = {
        "lag_epochs": sleep.LAG_EPOCHS,
        "lag_minutes": sleep.LAG_EPOCHS * sleep.EPOCH_S / 60,
        "nights": len(nights),
        "epochs": int(y.size),
        "pooled": pooled,
        "per_night": per_night,
        "fit_options": fit_options,
        "sleep_folds": folds,
    }
    ci = bootstrap_kappa(np.array([f["confusion_4class"] for f in folds.values()]))
    for name in CLASS_SETS:
        result[f"sleep_kappa_{name}"] = pooled[name]["kappa"]
        result[f"sleep_kappa_{name}_ci_low"], result[f"sleep_kappa_{name}_ci_high"] = ci[name]
        result[f"sleep_accuracy_{name}"] = pooled[name]["accuracy"]
        result[f"sleep_kappa_{name}_night_mean"] = float(
            np.mean([r["ours"][name]["kappa"] for r in per_night])
        )
    tst = np.array([f["tst_err_min"] for f in folds.values()])
    waso = np.array([f["waso_err_min"] for f in folds.values()])
    result["sleep_tst_abs_err_min"] = float(np.median(np.abs(tst)))
    result["sleep_tst_bias_min"] = float(np.mean(tst))
    result["sleep_waso_abs_err_min"] = float(np.median(np.abs(waso)))
    result["sleep_waso_bias_min"] = float(np.mean(waso))
    post = np.concatenate([a["post"] for a in arrays])
    prob = np.concatenate([a["prob"] for a in arrays])
    result["sleep_ece_raw"] = dict(zip(sleep.STAGE_NAMES, expected_calibration_error(post, y), strict=True))
    result["sleep_ece"] = dict(zip(sleep.STAGE_NAMES, expected_calibration_error(prob, y), strict=True))
    result["sleep_emission_scales"] = sorted({f["emission_scale"] for f in folds.values()})
    if baseline:
        pooled_b = scores(y, np.concatenate([a["hgb"] for a in arrays]))
        ci_b = bootstrap_kappa(np.array([f["hgb_confusion_4class"] for f in folds.values()]))
        result["hgb_pooled"] = pooled_b
        for name in CLASS_SETS:
            result[f"hgb_kappa_{name}"] = pooled_b[name]["kappa"]
            result[f"hgb_kappa_{name}_ci_low"], result[f"hgb_kappa_{name}_ci_high"] = ci_b[name]
            result[f"hgb_accuracy_{name}"] = pooled_b[name]["accuracy"]
            result[f"hgb_kappa_{name}_night_mean"] = float(
                np.mean([r["hgb"][name]["kappa"] for r in per_night])
            )
    result["_predictions"] = {n.subject: a["pred"] for n, a in zip(nights, arrays, strict=True)}
    result["_calibration"] = {"y": y, "post": post, "prob": prob}
    return result


def plot_calibration(result: dict, path: str | Path) -> bool:
    """Reliability diagram per stage, before and after calibration (LOSO test epochs); False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cal = result["_calibration"]
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    fig, axes = plt.subplots(1, sleep.N_STAGES, figsize=(12, 3.4), sharey=True)
    for c, ax in enumerate(axes):
        hit = cal["y"] == c
        for key, label, style in (("post", "smoothed posterior", "o--"), ("prob", "calibrated", "s-")):
            p = cal[key][:, c]
            b = np.minimum((p * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)
            n = np.bincount(b, minlength=CALIBRATION_BINS)
            ok = n >= 20
            mean_p = np.bincount(b, p, CALIBRATION_BINS)[ok] / n[ok]
            freq = np.bincount(b, hit, CALIBRATION_BINS)[ok] / n[ok]
            ece = result["sleep_ece_raw" if key == "post" else "sleep_ece"][sleep.STAGE_NAMES[c]]
            ax.plot(mean_p, freq, style, ms=4, label=f"{label} (ECE {ece:.3f})")
        ax.plot(edges[[0, -1]], edges[[0, -1]], color="grey", lw=0.8)
        ax.set_title(sleep.STAGE_NAMES[c], fontsize=10)
        ax.set_xlabel("predicted probability")
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("observed frequency")
    fig.suptitle(
        "Reliability per stage, leave-one-subject-out test epochs (bins with ≥ 20 epochs)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


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
    for name in CLASS_SETS:
        lo, hi = result[f"sleep_kappa_{name}_ci_low"], result[f"sleep_kappa_{name}_ci_high"]
        line = f"  κ {name} 95 % CI (nights) ours [{lo:.3f}, {hi:.3f}]"
        if f"hgb_kappa_{name}_ci_low" in result:
            line += (
                f"  HGB [{result[f'hgb_kappa_{name}_ci_low']:.3f}, {result[f'hgb_kappa_{name}_ci_high']:.3f}]"
            )
        print(line)
    print(
        f"nights: median |TST err| {result['sleep_tst_abs_err_min']:.1f} min, TST bias "
        f"{result['sleep_tst_bias_min']:+.1f} min, median |WASO err| "
        f"{result['sleep_waso_abs_err_min']:.1f} min"
    )
    print("ECE raw:", {k: round(v, 4) for k, v in result["sleep_ece_raw"].items()})
    print("ECE calibrated:", {k: round(v, 4) for k, v in result["sleep_ece"].items()})
    print("emission scales chosen in the folds:", result["sleep_emission_scales"])
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
    ap.add_argument("--calibration-plot", help="PNG of the reliability diagram")
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
    if args.calibration_plot:
        ok = plot_calibration(result, args.calibration_plot)
        print(f"plot → {args.calibration_plot}" if ok else "matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
