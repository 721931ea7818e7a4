"""Fit the sleep stager's parameters (decoder/sleep_params.json) from the shared Sleep-Accel nights.

    python scripts/fit_sleep.py [--data DIR] [--out decoder/sleep_params.json]

Everything is fitted from the nights it is given, so the LOSO benchmark (bench/accuracy_sleep.py)
calls `fit_params` once per fold without the held-out night. Deterministic: same data, same file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# One BLAS thread: the matrices are small, so threads only contend on a shared machine (20x slower
# here), and a fixed thread count keeps the float summation order, hence the fitted file, reproducible.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from decoder import sleep  # noqa: E402

# Boosted trees (Friedman 2001, multiclass log-loss; Newton leaf values and split gain as in XGBoost,
# Chen & Guestrin 2016; candidate thresholds at feature quantiles as in LightGBM / HistGradientBoosting).
N_ROUNDS = 40  # boosting rounds; one tree per stage per round
TREE_DEPTH = 3  # complete trees of 8 leaves: interactions of up to three features
LEARNING_RATE = 0.1  # shrinkage of every leaf value
LEAF_L2 = 1.0  # ridge on leaf values (λ), in units of the class-weighted hessian
MIN_CHILD_HESSIAN = 5.0  # a split must leave at least this much (weighted) hessian on each side
N_BINS = 64  # candidate thresholds per feature: the training features' 1/64 … 63/64 quantiles
# Two features that cut the rows alike have equal gains, summed in different orders: which rounds higher
# depends on the CPU's exp and summation (AVX-512 or not), and the trees, hence the file, would too. A
# gain must beat the best so far by this much (relative) to take its place: ties go to the lower feature.
GAIN_TIE = 1e-9
EMISSION_SCALE = 0.3  # overlapping feature windows make successive emissions dependent: temper them
TRANSITION_PSEUDO = 1.0  # Laplace counts per transition
INITIAL_PSEUDO = 1.0
# Tuned inside every fit, from the nights it is given only (so nested inside the LOSO folds): the emission
# scale by grouped inner cross-validation over subjects, and the probability calibration on the inner
# out-of-fold posteriors at that scale.
EMISSION_SCALES = (0.1, 0.15, 0.2, 0.3, 0.5)
BOOSTING_ROUNDS = (20, 40, 80)  # candidate numbers of rounds (prefixes of one fit)
CLASS_WEIGHT_POWERS = (1.0,)  # candidate α of class weights ∝ (1/count)^α (1 = balanced); a fit each
INNER_FOLDS = 3  # subject i (sorted) is held out in inner fold i % INNER_FOLDS

# class sets: name → (map from 4-class stage, label names)
CLASS_SETS = {
    "4class": (np.array([0, 1, 2, 3]), ("wake", "light", "deep", "rem")),
    "3class": (np.array([0, 1, 1, 2]), ("wake", "nrem", "rem")),
    "sleepwake": (np.array([0, 1, 1, 1]), ("wake", "sleep")),
}


@dataclass(frozen=True)
class Night:
    subject: str
    time_s: np.ndarray
    hr_bpm: np.ndarray
    counts: np.ndarray
    stage: np.ndarray  # 4-class: sleep.WAKE/LIGHT/DEEP/REM


def data_dir(arg: str | None = None) -> Path:
    """`arg`, else $BANDGATE_DATA, else ../shared/data relative to the repository root."""
    return Path(arg or os.environ.get("BANDGATE_DATA") or ROOT.parent / "shared" / "data")


def load_nights(root: Path) -> list[Night]:
    """Every sleep/epochs/subject_*.csv, sorted by subject id."""
    nights = []
    for path in sorted((Path(root) / "sleep" / "epochs").glob("subject_*.csv")):
        a = np.genfromtxt(path, delimiter=",", names=True)
        # The files' `counts` are the stager's definition (sleep.COUNTS_DEFINITION); both inputs are taken
        # as the raw path and replay take them.
        hr_bpm, counts = sleep.stager_inputs(a["hr_bpm"], a["counts"])
        nights.append(
            Night(
                subject=path.stem.removeprefix("subject_"),
                time_s=np.asarray(a["time_s"], dtype=np.float64),
                hr_bpm=hr_bpm,
                counts=counts,
                stage=sleep.PSG_TO_STAGE[np.asarray(a["stage"], dtype=np.int64)],
            )
        )
    return nights


def load_hypnograms(root: Path) -> dict[str, np.ndarray]:
    """Stage-only PSG hypnograms (sleep/psg_hypnograms), 4-class, by subject id."""
    out = {}
    for path in sorted((Path(root) / "sleep" / "psg_hypnograms").glob("subject_*.txt")):
        raw = np.loadtxt(path).astype(np.int64)
        raw = raw[(raw >= 0) & (raw <= 5)]
        out[path.stem.removeprefix("subject_")] = sleep.PSG_TO_STAGE[raw]
    return out


def _softmax(F: np.ndarray) -> np.ndarray:
    p = np.exp(F - F.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def fit_trees(
    X: np.ndarray,
    y: np.ndarray,
    n_rounds: int = N_ROUNDS,
    depth: int = TREE_DEPTH,
    learning_rate: float = LEARNING_RATE,
    leaf_l2: float = LEAF_L2,
    min_child_hessian: float = MIN_CHILD_HESSIAN,
    n_bins: int = N_BINS,
    class_weight_power: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-balanced gradient-boosted trees for the multiclass log-loss, in the kernel's layout:
    (tree_feature, tree_threshold, tree_value), tree i scoring stage i % N_STAGES (sleep._tree_scores).

    Balanced class weights make the softmax of the scores proportional to p(x | stage), i.e. usable as
    HMM emissions. Each tree is grown level by level to `depth` with second-order (Newton) gains over
    quantile thresholds; a node with no admissible split gets threshold +inf (everything goes left).
    Plain numpy, deterministic.
    """
    n, n_feat = X.shape
    k = sleep.N_STAGES
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w_class = np.where(counts > 0, (n / (k * np.maximum(counts, 1))) ** class_weight_power, 0.0)
    sw = w_class[y]
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = 1.0
    edges = []
    binned = np.empty((n, n_feat), dtype=np.int64)
    for f in range(n_feat):
        q = np.unique(np.quantile(X[:, f], np.arange(1, n_bins) / n_bins))
        q = q[q < X[:, f].max()]  # a threshold at the maximum sends nothing right
        edges.append(q)
        binned[:, f] = np.searchsorted(q, X[:, f], side="left")  # bin b ⇔ q[b-1] < x ≤ q[b]
    n_int = 2**depth - 1
    feature = np.zeros((n_rounds * k, n_int), dtype=np.int64)
    threshold = np.full((n_rounds * k, n_int), np.inf)
    value = np.zeros((n_rounds * k, n_int + 1))
    F = np.zeros((n, k))
    for r in range(n_rounds):
        p = _softmax(F)
        for c in range(k):
            tree = r * k + c
            g = sw * (p[:, c] - onehot[:, c])
            h = sw * p[:, c] * (1.0 - p[:, c])
            level = [np.arange(n)]
            for d in range(depth):
                nxt = []
                for j, rows in enumerate(level):
                    node = 2**d - 1 + j
                    right = np.zeros(rows.size, dtype=bool)
                    split = _best_split(binned[rows], g[rows], h[rows], edges, leaf_l2, min_child_hessian)
                    if split is not None:
                        f, b = split
                        feature[tree, node] = f
                        threshold[tree, node] = edges[f][b]
                        right = binned[rows, f] > b
                    nxt += [rows[~right], rows[right]]
                level = nxt
            for leaf, rows in enumerate(level):
                if rows.size:
                    v = -learning_rate * g[rows].sum() / (h[rows].sum() + leaf_l2)
                    value[tree, leaf] = v
                    F[rows, c] += v
    if class_weight_power != 1.0:
        # weights ∝ prior^-α make softmax(scores) ∝ p(stage | x)·prior^-α, so the likelihood the HMM needs
        # is scores - (1-α)·log prior: a constant per stage, added to every leaf of its first tree
        prior = np.maximum(counts, 1) / n
        value[:k] -= (1.0 - class_weight_power) * np.log(prior)[:, None]
    return feature, threshold, value


def _best_split(binned, g, h, edges, leaf_l2, min_child_hessian):
    """(feature, threshold index) of the largest Newton gain, or None when no split gains."""
    g_all, h_all = g.sum(), h.sum()
    parent = g_all * g_all / (h_all + leaf_l2)
    best_gain, best = 0.0, None
    for f, q in enumerate(edges):
        if q.size == 0:
            continue
        g_left = np.cumsum(np.bincount(binned[:, f], g, q.size + 1))[:-1]
        h_left = np.cumsum(np.bincount(binned[:, f], h, q.size + 1))[:-1]
        g_right, h_right = g_all - g_left, h_all - h_left
        ok = (h_left >= min_child_hessian) & (h_right >= min_child_hessian)
        if not ok.any():
            continue
        children = g_left * g_left / (h_left + leaf_l2) + g_right * g_right / (h_right + leaf_l2)
        gain = np.where(ok, children - parent, 0.0)
        b = int(np.argmax(gain))
        if gain[b] > best_gain * (1.0 + GAIN_TIE):
            best_gain, best = gain[b], (f, b)
    return best


def transition_counts(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    k = sleep.N_STAGES
    trans = np.zeros((k, k))
    init = np.zeros(k)
    for s in sequences:
        if s.size:
            init[s[0]] += 1
            np.add.at(trans, (s[:-1], s[1:]), 1.0)
    return trans, init


def fit_params(
    nights: list[Night],
    hypnograms: dict[str, np.ndarray] | None = None,
    features: list[np.ndarray] | None = None,
    emission_scale: float = EMISSION_SCALE,
    **tree_options,
) -> dict:
    """Params (JSON-able dict) fitted on `nights` only; hypnograms of subjects not in `nights` are
    ignored so a held-out night never leaks in through its stage-only twin. `tree_options` go to
    `fit_trees`."""
    if features is None:
        features = [sleep.night_features(n.time_s, n.hr_bpm, n.counts) for n in nights]
    X = np.concatenate(features)
    y = np.concatenate([n.stage for n in nights])
    feature, threshold, value = fit_trees(X, y, **tree_options)
    keep = {n.subject for n in nights}
    seqs = [n.stage for n in nights] + [h for s, h in sorted((hypnograms or {}).items()) if s in keep]
    trans, init = transition_counts(seqs)
    trans += TRANSITION_PSEUDO
    init += INITIAL_PSEUDO
    return {
        "version": sleep.PARAMS_VERSION,
        "feature_names": list(sleep.FEATURE_NAMES),
        "counts": sleep.COUNTS_DEFINITION,
        "subjects": sorted(keep),
        "tree_feature": feature.tolist(),
        # +inf (no split) as the string "inf": strict JSON has no infinity; numpy reads it back as inf
        "tree_threshold": [[t if np.isfinite(t) else "inf" for t in row] for row in threshold.tolist()],
        "tree_value": value.tolist(),
        "transitions": (trans / trans.sum(axis=1, keepdims=True)).tolist(),
        "initial": (init / init.sum()).tolist(),
        "emission_scale": emission_scale,
        "lag_epochs": sleep.LAG_EPOCHS,
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


def mean_kappa(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The tuning criterion: the mean of the 4-class, 3-class and sleep/wake κ (all three are targets)."""
    return float(
        np.mean([kappa(confusion(m[y_true], m[y_pred], len(lab))) for m, lab in CLASS_SETS.values()])
    )


def fit_calibration(posterior: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(scale, bias) of vector scaling (Guo et al. 2017) minimising the log-loss of
    softmax(scale · log posterior + bias) on held-out posteriors; bias[WAKE] fixed at 0.

    The loss is a multinomial logistic regression in θ = (scale, bias[1:]), so convex: Newton's method
    with the exact gradient and Hessian drives it to its one minimum, to rounding. A simplex search
    stopped at a tolerance instead lands wherever the last bits of exp and log steer it, which differ
    between CPUs (AVX-512 or not): the fitted file and bench/accuracy.json would then depend on the
    machine, by 1e-4."""
    from scipy.optimize import minimize

    logp = np.log(np.maximum(posterior, 1e-300))
    n, k = logp.shape
    # φ[i, c] is what multiplies θ in z[i, c] = θ · φ[i, c]: (log posterior, one-hot of the stage ≥ 1)
    phi = np.zeros((n, k, k))
    phi[:, :, 0] = logp
    phi[:, 1:, 1:] = np.eye(k - 1)
    phi_y = phi[np.arange(n), y]

    def parts(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = phi @ theta
        z -= z.max(axis=1, keepdims=True)
        return z, np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)

    def loss(theta: np.ndarray) -> float:
        z, _ = parts(theta)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(n), y]))

    def grad(theta: np.ndarray) -> np.ndarray:
        _, p = parts(theta)
        return np.einsum("ic,icj->j", p, phi) / n - phi_y.mean(axis=0)

    def hess(theta: np.ndarray) -> np.ndarray:
        _, p = parts(theta)
        mean_phi = np.einsum("ic,icj->ij", p, phi)
        second = np.einsum("ic,icj,icl->jl", p, phi, phi)
        return (second - mean_phi.T @ mean_phi) / n

    # the trust region gets there from anywhere; at |gradient| ≤ 1e-8 Newton converges quadratically,
    # so three plain steps more reach the minimum to rounding, whatever rounding the CPU does
    # (judged by the gradient at the end: trust-exact can report a failure to improve at the minimum)
    res = minimize(loss, np.r_[1.0, np.zeros(k - 1)], jac=grad, hess=hess, method="trust-exact")
    theta = res.x
    for _ in range(3):
        theta = theta - np.linalg.solve(hess(theta), grad(theta))
    if not np.linalg.norm(grad(theta)) <= 1e-9:
        raise RuntimeError(f"calibration fit did not converge: {res.message}")
    return float(theta[0]), np.r_[0.0, theta[1:]]


def stage_with_posterior(night: Night, params: sleep.SleepParams) -> tuple[np.ndarray, np.ndarray]:
    """(stage int64, smoothed posterior) of a whole night through the streaming kernel."""
    res = sleep.stage_epochs(night.time_s, night.hr_bpm, night.counts, sleep.SleepState.new(), params, True)
    return res.stage.astype(np.int64), res.posterior


def fit_tuned(
    nights: list[Night],
    hypnograms: dict[str, np.ndarray] | None = None,
    features: list[np.ndarray] | None = None,
    emission_scales: tuple[float, ...] = EMISSION_SCALES,
    inner_folds: int = INNER_FOLDS,
    rounds: tuple[int, ...] = BOOSTING_ROUNDS,
    class_weight_powers: tuple[float, ...] = CLASS_WEIGHT_POWERS,
    **tree_options,
) -> dict:
    """`fit_params` with its tuning choices made from `nights` alone: the boosting rounds and emission
    scale that maximise the mean κ over grouped inner folds (ties: the first candidate), and the
    calibration fitted on the inner folds' out-of-fold posteriors at that choice. What the LOSO
    benchmark fits in every fold and what the shipped file is."""
    if features is None:
        features = [sleep.night_features(n.time_s, n.hr_bpm, n.counts) for n in nights]
    order = sorted(range(len(nights)), key=lambda i: nights[i].subject)
    group = {i: r % inner_folds for r, i in enumerate(order)}
    # boosting is additive, so the model after r rounds is the first r·N_STAGES trees of a longer fit:
    # one fit per inner fold and class weighting serves every (rounds, scale) candidate
    candidates = [(a, r, s) for a in class_weight_powers for r in rounds for s in emission_scales]
    stages = {c: [None] * len(nights) for c in candidates}
    posts = {c: [None] * len(nights) for c in candidates}
    for g in range(inner_folds):
        train = [i for i in range(len(nights)) if group[i] != g]
        held = [i for i in range(len(nights)) if group[i] == g]
        if not held or not train:
            continue
        for a in class_weight_powers:
            base = fit_params(
                [nights[i] for i in train],
                hypnograms,
                [features[i] for i in train],
                n_rounds=max(rounds),
                class_weight_power=a,
                **tree_options,
            )
            for r in rounds:
                n = r * sleep.N_STAGES
                trees = {k: base[k][:n] for k in ("tree_feature", "tree_threshold", "tree_value")}
                for s in emission_scales:
                    params = sleep.SleepParams.from_dict(dict(base, emission_scale=s, **trees))
                    for i in held:
                        stages[a, r, s][i], posts[a, r, s][i] = stage_with_posterior(nights[i], params)
    y = np.concatenate([n.stage for n in nights])
    inner = {c: mean_kappa(y, np.concatenate(stages[c])) for c in candidates}
    best = max(candidates, key=lambda c: (inner[c], -candidates.index(c)))
    scale, bias = fit_calibration(np.concatenate(posts[best]), y)
    a, r, s = best
    out = fit_params(
        nights, hypnograms, features, emission_scale=s, n_rounds=r, class_weight_power=a, **tree_options
    )
    out["calibration"] = {"scale": scale, "bias": bias.tolist()}
    out["tuning"] = {
        "inner_folds": inner_folds,
        "inner_mean_kappa": {
            f"weight_power={a} rounds={r} scale={s}": inner[a, r, s] for a, r, s in candidates
        },
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="data folder (default $BANDGATE_DATA or ../shared/data)")
    ap.add_argument("--out", default=str(sleep.PARAMS_PATH))
    args = ap.parse_args(argv)
    root = data_dir(args.data)
    nights = load_nights(root)
    if not nights:
        print(f"no nights under {root}/sleep/epochs", file=sys.stderr)
        return 1
    params = fit_tuned(nights, load_hypnograms(root))
    Path(args.out).write_text(json.dumps(params, indent=1) + "\n")
    print(f"fitted on {len(nights)} nights → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
