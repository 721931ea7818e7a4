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
from scipy.optimize import minimize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from decoder import sleep  # noqa: E402

L2 = 100.0  # ridge penalty on the weights (class-weighted log-loss summed over epochs)
N_KNOTS = 3  # hinges per feature, at quantiles of the training features
KNOT_FAR = 1e6  # a knot no standardised value reaches: pads features with fewer distinct quantiles
EMISSION_SCALE = 0.2  # overlapping feature windows make successive emissions dependent: temper them
TRANSITION_PSEUDO = 1.0  # Laplace counts per transition
INITIAL_PSEUDO = 1.0


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
        nights.append(
            Night(
                subject=path.stem.removeprefix("subject_"),
                time_s=np.asarray(a["time_s"], dtype=np.float64),
                hr_bpm=np.asarray(a["hr_bpm"], dtype=np.float64),
                counts=np.asarray(a["counts"], dtype=np.float64),
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


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = L2) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced multinomial logistic regression on standardised X; (weights K×F, bias K).

    Balanced weights make softmax scores proportional to p(x | stage), i.e. usable as HMM emissions.
    """
    n, f = X.shape
    k = sleep.N_STAGES
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w_class = np.where(counts > 0, n / (k * np.maximum(counts, 1)), 0.0)
    sw = w_class[y]
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = 1.0

    def loss(theta):
        W = theta[: k * f].reshape(k, f)
        b = theta[k * f :]
        z = X @ W.T + b
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        val = -(sw * (onehot * logp).sum(axis=1)).sum() + 0.5 * l2 * (W * W).sum()
        g = (np.exp(logp) - onehot) * sw[:, None]
        gW = g.T @ X + l2 * W
        gb = g.sum(axis=0)
        return val, np.concatenate([gW.ravel(), gb])

    res = minimize(loss, np.zeros(k * f + k), jac=True, method="L-BFGS-B", options={"maxiter": 2000})
    return res.x[: k * f].reshape(k, f), res.x[k * f :]


def expand(Z: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Standardised features and their hinges, in the kernel's order (sleep._expand)."""
    hinges = np.maximum(Z[:, :, None] - knots[None, :, :], 0.0).reshape(Z.shape[0], -1)
    return np.hstack([Z, hinges])


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
    l2: float = L2,
    n_knots: int = N_KNOTS,
) -> dict:
    """Params (JSON-able dict) fitted on `nights` only; hypnograms of subjects not in `nights` are
    ignored so a held-out night never leaks in through its stage-only twin."""
    if features is None:
        features = [sleep.night_features(n.time_s, n.hr_bpm, n.counts) for n in nights]
    X = np.concatenate(features)
    y = np.concatenate([n.stage for n in nights])
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd[sd < 1e-9] = 1.0
    Z = (X - mu) / sd
    knots = np.full((Z.shape[1], n_knots), KNOT_FAR)
    for f in range(Z.shape[1]):
        q = np.unique(np.quantile(Z[:, f], np.linspace(0, 1, n_knots + 2)[1:-1]))
        q = q[q < Z[:, f].max()]  # a hinge at the maximum is identically zero
        knots[f, : q.size] = q
    W, b = fit_logistic(expand(Z, knots), y, l2)
    keep = {n.subject for n in nights}
    seqs = [n.stage for n in nights] + [h for s, h in sorted((hypnograms or {}).items()) if s in keep]
    trans, init = transition_counts(seqs)
    trans += TRANSITION_PSEUDO
    init += INITIAL_PSEUDO
    return {
        "version": 1,
        "feature_names": list(sleep.FEATURE_NAMES),
        "subjects": sorted(keep),
        "mu": mu.tolist(),
        "sd": sd.tolist(),
        "knots": knots.tolist(),
        "weights": W.tolist(),
        "bias": b.tolist(),
        "transitions": (trans / trans.sum(axis=1, keepdims=True)).tolist(),
        "initial": (init / init.sum()).tolist(),
        "emission_scale": emission_scale,
        "lag_epochs": sleep.LAG_EPOCHS,
    }


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
    params = fit_params(nights, load_hypnograms(root))
    Path(args.out).write_text(json.dumps(params, indent=1) + "\n")
    print(f"fitted on {len(nights)} nights → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
