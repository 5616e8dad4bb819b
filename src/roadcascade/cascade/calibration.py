"""Calibration: temperature scaling, the MCC-optimal decision threshold, and the fold map.

Estimator-shaped (sklearn style): constructors store parameters, ``fit`` returns ``self``,
learned values end in ``_``. The mathematics lives in small pure functions.

The returned probability is ``fold(sigmoid(logit / T), t)``: calibrated by the temperature ``T``,
then folded so that the MCC-optimal threshold ``t`` lands on 0.5, because validators binarise
with ``round(p)`` and never apply any other threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..metrics import mcc_from_counts

_EPS = 1e-7


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def binary_nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels under sigmoid(logits / T) (numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, y: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """Temperature minimising the NLL (golden-section search on log T; the NLL is unimodal in 1/T)."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0 or np.all(y == y[0]):
        return 1.0
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = binary_nll(logits, y, np.exp(c)), binary_nll(logits, y, np.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = binary_nll(logits, y, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = binary_nll(logits, y, np.exp(d))
    return float(np.exp((a + b) / 2))


def mcc_curve(prob: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MCC of the rule ``p > t`` for every distinct cut ``t`` (midpoints between sorted scores).

    Returns (thresholds, mcc) in increasing threshold order. O(n log n).
    """
    p = np.asarray(prob, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    order = np.argsort(p, kind="mergesort")
    ps, ys = p[order], y[order]
    uniq, first = np.unique(ps, return_index=True)
    # candidate cuts: below everything, between consecutive distinct scores, above everything
    cuts = np.concatenate(([uniq[0] - 1e-6], (uniq[:-1] + uniq[1:]) / 2, [uniq[-1]]))
    P, N = ys.sum(), len(ys) - ys.sum()
    # number of positives / negatives with score <= cut
    cum_pos = np.concatenate(([0], np.cumsum(ys)))
    idx_le = np.concatenate(([0], first[1:], [len(ps)]))  # count of scores strictly below uniq[i], then all
    pos_le = cum_pos[idx_le]
    neg_le = idx_le - pos_le
    tp, fp = P - pos_le, N - neg_le
    fn, tn = pos_le, neg_le
    m = np.array([mcc_from_counts(*v) for v in zip(tp, tn, fp, fn)])
    return np.clip(cuts, 0.0, 1.0), m


def best_threshold(prob: np.ndarray, y: np.ndarray) -> float:
    """MCC-optimal threshold for ``p > t``; ties resolved by the middle of the widest best plateau."""
    cuts, m = mcc_curve(prob, y)
    best = m.max()
    good = np.flatnonzero(m >= best - 1e-12)
    # the longest run of consecutive optimal cuts, and its middle: robust to val noise
    runs = np.split(good, np.flatnonzero(np.diff(good) > 1) + 1)
    run = max(runs, key=len)
    t = float((cuts[run[0]] + cuts[run[-1]]) / 2)
    return float(np.clip(t, 0.01, 0.99))


def fold(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Monotone map of [0, 1] onto itself that sends ``threshold`` to 0.5 (a shift in logit space).

    ``fold(p, t) > 0.5`` exactly when ``p > t``; ``fold(p, 0.5) == p``.
    """
    return sigmoid(logit(prob) - logit(np.float64(threshold)))


@dataclass
class TemperatureCalibrator:
    """Temperature scaling + MCC-optimal threshold, folded to 0.5."""

    fold_threshold: bool = True

    def fit(self, logits: np.ndarray, y: np.ndarray) -> "TemperatureCalibrator":
        logits = np.asarray(logits, dtype=np.float64)
        y = np.asarray(y).astype(np.int64)
        self.temperature_ = fit_temperature(logits, y)
        p = sigmoid(logits / self.temperature_)
        self.threshold_ = best_threshold(p, y) if self.fold_threshold else 0.5
        return self

    @property
    def fitted(self) -> bool:
        return hasattr(self, "temperature_")

    def _check(self) -> None:
        if not self.fitted:
            raise RuntimeError("TemperatureCalibrator is not fitted: call fit(logits, y) first")

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled probability, before the fold."""
        self._check()
        return sigmoid(np.asarray(logits, dtype=np.float64) / self.temperature_)

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """The probability to return: calibrated, then folded (decide with > 0.5)."""
        return fold(self.calibrated(logits), self.threshold_)

    def to_dict(self) -> dict:
        self._check()
        return {"kind": "temperature", "temperature": self.temperature_, "threshold": self.threshold_}

    @classmethod
    def from_dict(cls, d: dict) -> "TemperatureCalibrator":
        c = cls()
        c.temperature_ = float(d["temperature"])
        c.threshold_ = float(d["threshold"])
        return c


def calibrated_or_sigmoid(calibrator: TemperatureCalibrator | None, z: np.ndarray) -> np.ndarray:
    """The calibrator's probability (before the fold), or sigmoid(z) where there is none or it is not fitted yet
    (a tier's outputs while ``build`` is fitting its temperature)."""
    if calibrator is not None and calibrator.fitted:
        return calibrator.calibrated(z)
    return sigmoid(z)
