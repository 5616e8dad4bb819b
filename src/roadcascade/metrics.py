"""Validator-faithful metrics: MCC, accuracy, ECE, AUROC, the StreetVision reward.

Pure functions on numpy arrays. Predictions are binarised the way a validator does it:
``round(p)``, so 0.5 counts as 0 (Python's and numpy's round-half-to-even gives 0 at 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DASHCAM_SOURCES: tuple[str, ...] = ("vtti-workzone", "gtsdb", "camvid")
# the real dashcam frames that are (bar a few gtsdb road-works signs) negatives: false-positive rates, guard, backgrounds
DASHCAM_NEGATIVE_SOURCES: tuple[str, ...] = ("camvid", "gtsdb")


def binarize(prob: np.ndarray) -> np.ndarray:
    """Validator rounding: p > 0.5 -> 1, p <= 0.5 -> 0."""
    return (np.asarray(prob, dtype=np.float64) > 0.5).astype(np.int64)


def confusion(y: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    y = np.asarray(y).astype(np.int64)
    pred = np.asarray(pred).astype(np.int64)
    return {
        "tn": int(np.sum((y == 0) & (pred == 0))),
        "fp": int(np.sum((y == 0) & (pred == 1))),
        "fn": int(np.sum((y == 1) & (pred == 0))),
        "tp": int(np.sum((y == 1) & (pred == 1))),
    }


def mcc_from_counts(tp: float, tn: float, fp: float, fn: float) -> float:
    """Matthews correlation; 0 when any marginal is empty (as sklearn does)."""
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    if den <= 0:
        return 0.0
    return float((tp * tn - fp * fn) / math.sqrt(den))


def mcc(y: np.ndarray, pred: np.ndarray) -> float:
    c = confusion(y, pred)
    return mcc_from_counts(c["tp"], c["tn"], c["fp"], c["fn"])


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    y = np.asarray(y)
    return float(np.mean(np.asarray(pred) == y)) if len(y) else 0.0


def reward(mcc_value: float, acc: float) -> float:
    """StreetVision reward ((0.5 max(0, mcc) + 0.5 acc)) ** 3 (penalty 1: probabilities in [0, 1])."""
    return float((0.5 * max(0.0, mcc_value) + 0.5 * acc) ** 3)


def ece(y: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of P(roadwork), equal-width bins over [0, 1]."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    if len(y) == 0:
        return 0.0
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    return float(total / len(y))


def reliability(y: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, observed frequency and count (for the reliability diagram)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    conf, freq, count = [], [], []
    for b in range(n_bins):
        m = idx == b
        conf.append(float(p[m].mean()) if m.any() else (b + 0.5) / n_bins)
        freq.append(float(y[m].mean()) if m.any() else float("nan"))
        count.append(int(m.sum()))
    return {"confidence": conf, "frequency": freq, "count": count}


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic with ties counted half); nan with one class."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class Summary:
    n: int
    mcc: float
    accuracy: float
    ece: float
    auroc: float
    reward: float
    confusion: dict[str, int]

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "mcc": self.mcc,
            "accuracy": self.accuracy,
            "ece": self.ece,
            "auroc": self.auroc,
            "reward": self.reward,
            "confusion": self.confusion,
        }


def summarize(y: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> Summary:
    """All headline metrics of calibrated, folded probabilities (decision at 0.5)."""
    y = np.asarray(y).astype(np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    pred = binarize(prob)
    m = mcc(y, pred)
    a = accuracy(y, pred)
    return Summary(
        n=int(len(y)),
        mcc=m,
        accuracy=a,
        ece=ece(y, prob, n_bins),
        auroc=auroc(y, prob),
        reward=reward(m, a),
        confusion=confusion(y, pred),
    )


def percentiles(values, qs=(50, 95, 99), empty: float | None = float("nan")) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` (one key per q in ``qs``) of the values; ``empty`` for each
    when there are none. The one percentile helper (eval, load generator, server metrics, GPU bench)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return {f"p{q}": empty for q in qs}
    return {f"p{q}": float(np.percentile(v, q)) for q in qs}
