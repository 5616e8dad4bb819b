"""Fusion of the tiers that ran: a learned, calibrated stacking model and plain weighted voting.

The fusion interface (:class:`Fusion`: ``prob(logits, probs)`` on the (n, k+1) outputs of the tiers that
ran) and its one registry (``FUSIONS``, ``register_fusion``) live here. A new fusion is one registered
class; one with ``fit(logits, probs, y)`` (``fittable = True``) is also one the policy optimiser can fit
(:func:`make_fusion`). One instance per exit point, fitted on the val outputs of the tiers ``0..k`` in the
cascade's order.

- ``last``: the calibrated probability of the last tier that ran (a stage-1 bundle's fusion).

- ``stacking``: logistic regression on the raw per-tier logits (one weight per tier plus a bias, L2
  penalised). Its output is a calibrated probability (it is fitted by log loss); the exit point's
  MCC-optimal threshold is then folded to 0.5 like any other.
- ``vote``: a weighted mean of the tiers' calibrated probabilities, each weight the log-odds of the
  tier's own val accuracy at its MCC-optimal threshold (the weighted-majority weights of
  Nitzan & Paroush), normalised to sum to one.

Also here, because rules, test-time scaling and the policy optimiser share them: a small
deterministic L2 logistic regression (``fit_logistic`` / ``LogisticModel``, Newton's method on
standardised features) and grouped K-fold splits (``group_folds``, views of one image stay together)
for out-of-fold predictions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .calibration import best_threshold, logit, sigmoid
from .registry import registry

FUSIONS, register_fusion = registry()

__all__ = [
    "Fusion",
    "FUSIONS",
    "register_fusion",
    "LastTierFusion",
    "fittable_fusions",
    "LogisticModel",
    "fit_logistic",
    "group_folds",
    "out_of_fold",
    "StackingFusion",
    "WeightedVoteFusion",
    "vote_weights",
    "make_fusion",
]


# ----------------------------------------------------------------------------- the interface


class Fusion(ABC):
    """Fuses the outputs of tiers 0..k into one calibrated probability."""

    kind: ClassVar[str]
    fittable: ClassVar[bool] = False  # has fit(logits, probs, y): the policy optimiser can fit it

    @abstractmethod
    def prob(self, logits: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """logits, probs: (n, k+1) per-tier values of the tiers that ran -> (n,) calibrated probability."""

    def to_config(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_config(cls, cfg: dict) -> "Fusion":
        return cls()


@register_fusion
class LastTierFusion(Fusion):
    """The calibrated probability of the last tier that ran."""

    kind = "last"

    def prob(self, logits: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return probs[:, -1]


# ----------------------------------------------------------------------------- logistic regression


@dataclass
class LogisticModel:
    """P(1 | x) = sigmoid(x @ coef + intercept); plain numbers, serialisable."""

    coef: np.ndarray
    intercept: float

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[:, None]
        return X @ self.coef + self.intercept

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return sigmoid(self.decision_function(X))

    def to_dict(self) -> dict:
        return {"coef": [float(c) for c in self.coef], "intercept": float(self.intercept)}

    @classmethod
    def from_dict(cls, d: dict) -> "LogisticModel":
        return cls(np.asarray(d["coef"], dtype=np.float64), float(d["intercept"]))


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 50, tol: float = 1e-10) -> LogisticModel:
    """L2-penalised logistic regression by Newton's method (deterministic, no solver options).

    Minimises ``sum log-loss + l2 / 2 * ||beta||^2`` over standardised features (the intercept is not
    penalised) and returns the model in the original feature units. One class only: a constant model
    at the (clipped) base rate.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    y = np.asarray(y, dtype=np.float64)
    n, d = X.shape
    if n == 0:
        return LogisticModel(np.zeros(d), 0.0)
    rate = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
    if y.min() == y.max():
        return LogisticModel(np.zeros(d), float(logit(np.float64(rate))))
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    A = np.hstack([np.ones((n, 1)), (X - mu) / sd])
    beta = np.zeros(d + 1)
    beta[0] = float(logit(np.float64(rate)))
    pen = np.full(d + 1, float(l2))
    pen[0] = 0.0
    for _ in range(max_iter):
        z = A @ beta
        p = sigmoid(z)
        g = A.T @ (p - y) + pen * beta
        w = np.maximum(p * (1 - p), 1e-12)
        H = (A * w[:, None]).T @ A + np.diag(pen) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(H, g)
        # damped Newton: halve the step until the penalised loss does not increase
        f0 = float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(pen * beta**2))
        t = 1.0
        for _ in range(30):
            nb = beta - t * step
            zn = A @ nb
            f1 = float(np.sum(np.logaddexp(0.0, zn) - y * zn) + 0.5 * np.sum(pen * nb**2))
            if f1 <= f0 + 1e-12:
                break
            t *= 0.5
        beta = nb
        if np.max(np.abs(t * step)) < tol:
            break
    coef = beta[1:] / sd
    return LogisticModel(coef, float(beta[0] - np.sum(beta[1:] * mu / sd)))


# ----------------------------------------------------------------------------- grouped folds


def group_folds(groups: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Assign whole groups (e.g. the challenge views of one image) to ``folds`` folds at random.

    Returns one array of row indices per fold (folds with no rows are dropped)."""
    groups = np.asarray(groups)
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(uniq))
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    fold_of_group[perm] = np.arange(len(uniq)) % max(1, folds)
    fold_of_row = fold_of_group[np.searchsorted(uniq, groups)]
    return [np.flatnonzero(fold_of_row == f) for f in range(max(1, folds)) if np.any(fold_of_row == f)]


def out_of_fold(fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int, groups: np.ndarray | None,
                folds: int, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions: ``fit_predict(train_idx, test_idx) -> predictions for test_idx``.

    With ``folds < 2`` (or one group) the model is fitted and evaluated on everything (in-sample)."""
    groups = np.arange(n) if groups is None else np.asarray(groups)
    parts = group_folds(groups, folds, seed) if folds >= 2 else []
    if len(parts) < 2:
        idx = np.arange(n)
        return np.asarray(fit_predict(idx, idx), dtype=np.float64)
    out = np.full(n, np.nan)
    for test in parts:
        train = np.setdiff1d(np.arange(n), test, assume_unique=True)
        out[test] = fit_predict(train, test)
    return out


# ----------------------------------------------------------------------------- fusions


def _as2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


@register_fusion
class StackingFusion(Fusion):
    """Logistic regression on the per-tier raw logits: a learned, calibrated combination."""

    kind = "stacking"
    fittable = True

    def __init__(self, l2: float = 1.0):
        self.l2 = float(l2)

    def fit(self, logits: np.ndarray, probs: np.ndarray, y: np.ndarray) -> "StackingFusion":
        self.model_ = fit_logistic(_as2d(logits), y, l2=self.l2)
        return self

    def _check(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("StackingFusion is not fitted: call fit(logits, probs, y) first")

    def prob(self, logits: np.ndarray, probs: np.ndarray) -> np.ndarray:
        self._check()
        X = _as2d(logits)
        if X.shape[1] != len(self.model_.coef):
            raise ValueError(f"stacking fusion fitted on {len(self.model_.coef)} tiers got {X.shape[1]}")
        return self.model_.predict_proba(X)

    @property
    def weights(self) -> np.ndarray:
        self._check()
        return self.model_.coef

    def to_config(self) -> dict:
        self._check()
        return {"kind": self.kind, "l2": self.l2, **self.model_.to_dict()}

    @classmethod
    def from_config(cls, cfg: dict) -> "StackingFusion":
        f = cls(cfg.get("l2", 1.0))
        f.model_ = LogisticModel.from_dict(cfg)
        return f


def vote_weights(probs: np.ndarray, y: np.ndarray, floor: float = 0.05) -> np.ndarray:
    """Weighted-majority weights: log-odds of each tier's accuracy at its own MCC-optimal threshold.

    A tier no better than chance gets ``floor``; the weights are normalised to sum to one."""
    P = _as2d(probs)
    y = np.asarray(y).astype(np.int64)
    w = []
    for j in range(P.shape[1]):
        t = best_threshold(P[:, j], y)
        acc = float(np.clip(np.mean((P[:, j] > t) == y), 1e-3, 1 - 1e-3))
        w.append(max(floor, float(np.log(acc / (1 - acc)))))
    w = np.asarray(w)
    return w / w.sum()


@register_fusion
class WeightedVoteFusion(Fusion):
    """Plain weighted (soft) voting: sum_j w_j * p_j over the tiers' calibrated probabilities."""

    kind = "vote"
    fittable = True

    def __init__(self, weights: Sequence[float] | None = None):
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if np.any(w < 0) or w.sum() <= 0:
                raise ValueError("vote weights must be non-negative with a positive sum")
            self.weights_ = w / w.sum()

    def fit(self, logits: np.ndarray, probs: np.ndarray, y: np.ndarray) -> "WeightedVoteFusion":
        self.weights_ = vote_weights(probs, y)
        return self

    def prob(self, logits: np.ndarray, probs: np.ndarray) -> np.ndarray:
        if not hasattr(self, "weights_"):
            raise RuntimeError("WeightedVoteFusion is not fitted: call fit(logits, probs, y) first")
        P = _as2d(probs)
        if P.shape[1] != len(self.weights_):
            raise ValueError(f"vote fusion fitted on {len(self.weights_)} tiers got {P.shape[1]}")
        return np.clip(P @ self.weights_, 0.0, 1.0)

    def to_config(self) -> dict:
        return {"kind": self.kind, "weights": [float(w) for w in self.weights_]}

    @classmethod
    def from_config(cls, cfg: dict) -> "WeightedVoteFusion":
        return cls(cfg["weights"])


def fittable_fusions() -> list[str]:
    """The fusion kinds the policy optimiser can fit (those with ``fittable = True``)."""
    return sorted(k for k, c in FUSIONS.items() if c.fittable)


def make_fusion(kind: str) -> Fusion:
    """An unfitted fusion of a fittable kind."""
    cls = FUSIONS.get(kind)
    if cls is None or not cls.fittable:
        raise ValueError(f"unknown fusion {kind!r}; known: {', '.join(fittable_fusions())}")
    return cls()
