"""Deferral rules beyond confidence: margin, entropy, a learned difficulty estimator, tier agreement.

Each rule decides at one exit point which images may stop there (``Rule.stop``). Every rule here is
also an :class:`ArrayRule`: the same decision as a pure function of arrays (``stop_arrays``), which
the policy optimiser evaluates on cached val outputs; ``stop`` only gathers those arrays from the
image states, so the optimiser and the runtime share one code path.

A rule is a one-parameter family ``stop iff score >= threshold`` (see :func:`rule_score`), which is
how the optimiser searches it:

========== ============================================== ========================================
kind       score                                          parameter
========== ============================================== ========================================
confidence ``|folded - 0.5|``                             ``tau`` = threshold (cascade.ConfidenceRule)
margin     ``|logit(folded)|``                            ``m`` = threshold
entropy    ``-H(folded)`` (bits)                          ``h`` = -threshold
difficulty ``-P(answer wrong | features)``                ``max_risk`` = -threshold
agreement  ``-|u_a - u_b|`` if the last two tiers decide   ``tol`` = -threshold
           alike, else -inf (``u`` = a tier's folded logit)
never      -inf (never stops; used to run every tier)     none
========== ============================================== ========================================

For one binary answer, margin and entropy order images exactly as confidence does (each is a
monotone function of ``|folded - 0.5|``); they are kept as parametrisations (a logit margin, a bits
budget) and the optimiser searches only confidence. The difficulty estimator and the agreement rule
use more than the fused probability: the spread of the tiers' answers, tier features (the
test-time-scaling tier's view dispersion), and the two last tiers' separate decisions.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from .calibration import logit
from .cascade import ConfidenceRule, FinalRule, ImageState, Rule, register_rule
from .fusion import LogisticModel, fit_logistic

__all__ = [
    "ArrayRule",
    "MarginRule",
    "EntropyRule",
    "AgreementRule",
    "DifficultyRule",
    "DifficultyEstimator",
    "NeverRule",
    "binary_entropy",
    "difficulty_features",
    "agreement_gap",
    "state_arrays",
    "stop_mask",
    "rule_score",
    "make_rule",
    "SEARCHABLE_RULES",
]


# ----------------------------------------------------------------------------- pure pieces


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli(p), 0 at p in {0, 1}."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


def agreement_gap(probs_a: np.ndarray, probs_b: np.ndarray, threshold_a: float, threshold_b: float) -> np.ndarray:
    """``|u_a - u_b|`` where ``u`` is each tier's logit folded at its own decision threshold, or +inf where
    the two tiers decide differently (their folded logits have different signs)."""
    ua = logit(probs_a) - logit(np.float64(threshold_a))
    ub = logit(probs_b) - logit(np.float64(threshold_b))
    same = (ua > 0) == (ub > 0)
    return np.where(same, np.abs(ua - ub), np.inf)


def difficulty_features(folded: np.ndarray, logits: np.ndarray, probs: np.ndarray,
                        features: Sequence[np.ndarray | None] = ()) -> np.ndarray:
    """Per image, what the difficulty estimator sees at an exit point (n, d):

    the fused answer's logit margin ``|logit(folded)|``, the spread (std) and range of the tiers'
    calibrated logits, the mean distance of those from the fused logit, and every tier feature
    vector that the tiers provided (in tier order)."""
    folded = np.asarray(folded, dtype=np.float64)
    P = np.asarray(probs, dtype=np.float64).reshape(len(folded), -1)
    c = logit(P)
    fused_logit = logit(folded)
    cols = [
        np.abs(fused_logit),
        c.std(axis=1),
        c.max(axis=1) - c.min(axis=1),
        np.abs(c - c.mean(axis=1, keepdims=True)).mean(axis=1),
    ]
    X = np.column_stack(cols)
    extra = [np.asarray(f, dtype=np.float64).reshape(len(folded), -1) for f in features if f is not None]
    return np.hstack([X, *extra]) if extra else X


def state_arrays(states: Sequence[ImageState]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
    """(logits (n, k+1), probs (n, k+1), per-tier features (n, d) or None) of states at one stage."""
    n = len(states)
    k1 = len(states[0].logits) if n else 0
    logits = np.array([s.logits for s in states], dtype=np.float64).reshape(n, k1)
    probs = np.array([s.probs for s in states], dtype=np.float64).reshape(n, k1)
    feats: list[np.ndarray | None] = []
    for t in range(k1):
        if n and all(s.features[t] is not None for s in states):
            feats.append(np.stack([np.asarray(s.features[t], dtype=np.float64).reshape(-1) for s in states]))
        else:
            feats.append(None)
    return logits, probs, feats


# ----------------------------------------------------------------------------- rules


class ArrayRule(Rule):
    """A rule that is a pure function of arrays; ``stop`` gathers them from the states."""

    @abstractmethod
    def stop_arrays(self, folded: np.ndarray, logits: np.ndarray, probs: np.ndarray,
                    features: Sequence[np.ndarray | None] = ()) -> np.ndarray:
        """Boolean (n,): True where the image stops. logits/probs: (n, k+1) of the tiers that ran."""

    def stop(self, folded: np.ndarray, states: Sequence[ImageState]) -> np.ndarray:
        if len(states) == 0:
            return np.zeros(0, dtype=bool)
        logits, probs, feats = state_arrays(states)
        return np.asarray(self.stop_arrays(np.asarray(folded, dtype=np.float64), logits, probs, feats), dtype=bool)


def stop_mask(rule: Rule, folded: np.ndarray, logits: np.ndarray, probs: np.ndarray,
              features: Sequence[np.ndarray | None] = ()) -> np.ndarray:
    """Any rule's decision on arrays (the base rules of cascade.py included)."""
    folded = np.asarray(folded, dtype=np.float64)
    if isinstance(rule, ArrayRule):
        return np.asarray(rule.stop_arrays(folded, logits, probs, features), dtype=bool)
    if isinstance(rule, FinalRule):
        return np.ones(len(folded), dtype=bool)
    if isinstance(rule, ConfidenceRule):
        return np.abs(folded - 0.5) >= rule.tau
    # any other rule: through states built from the arrays
    L, P = np.asarray(logits).reshape(len(folded), -1), np.asarray(probs).reshape(len(folded), -1)
    states = []
    for i in range(len(folded)):
        s = ImageState(image=np.zeros((1, 1, 3), np.uint8), logits=list(L[i]), probs=list(P[i]),
                       features=[None if f is None else f[i] for f in (list(features) or [None] * L.shape[1])])
        states.append(s)
    return np.asarray(rule.stop(folded, states), dtype=bool)


@register_rule
class NeverRule(ArrayRule):
    """Never stops early: every image goes on to the next tier (the full ensemble's exits)."""

    kind = "never"

    def stop_arrays(self, folded, logits, probs, features=()):
        return np.zeros(len(folded), dtype=bool)


@register_rule
class MarginRule(ArrayRule):
    """Stop when the fused answer's logit margin ``|logit(folded)|`` is at least ``m``."""

    kind = "margin"

    def __init__(self, m: float):
        self.m = float(m)

    def stop_arrays(self, folded, logits, probs, features=()):
        return np.abs(logit(folded)) >= self.m

    def to_config(self) -> dict:
        return {"kind": self.kind, "m": self.m}

    @classmethod
    def from_config(cls, cfg: dict) -> "MarginRule":
        return cls(cfg["m"])


@register_rule
class EntropyRule(ArrayRule):
    """Stop when the fused answer's binary entropy is at most ``h`` bits."""

    kind = "entropy"

    def __init__(self, h: float):
        self.h = float(h)

    def stop_arrays(self, folded, logits, probs, features=()):
        return binary_entropy(folded) <= self.h

    def to_config(self) -> dict:
        return {"kind": self.kind, "h": self.h}

    @classmethod
    def from_config(cls, cfg: dict) -> "EntropyRule":
        return cls(cfg["h"])


@register_rule
class AgreementRule(ArrayRule):
    """Speculative-cascade style: stop when the last two tiers give the same decision and their
    folded logits are within ``tol`` of each other (compares two tiers' scores, not one confidence).

    ``thresholds`` are the two tiers' own decision thresholds on their calibrated probabilities.
    At the first exit (one tier ran) nothing stops."""

    kind = "agreement"

    def __init__(self, tol: float, thresholds: Sequence[float] = (0.5, 0.5)):
        if len(thresholds) != 2:
            raise ValueError("AgreementRule needs the two tiers' thresholds")
        self.tol = float(tol)
        self.thresholds = (float(thresholds[0]), float(thresholds[1]))

    def stop_arrays(self, folded, logits, probs, features=()):
        P = np.asarray(probs, dtype=np.float64).reshape(len(folded), -1)
        if P.shape[1] < 2:
            return np.zeros(len(folded), dtype=bool)
        return agreement_gap(P[:, -2], P[:, -1], *self.thresholds) <= self.tol

    def to_config(self) -> dict:
        return {"kind": self.kind, "tol": self.tol, "thresholds": list(self.thresholds)}

    @classmethod
    def from_config(cls, cfg: dict) -> "AgreementRule":
        return cls(cfg["tol"], cfg.get("thresholds", (0.5, 0.5)))


class DifficultyEstimator:
    """A small model that predicts whether the current answer at an exit point is wrong.

    Logistic regression on :func:`difficulty_features`; sklearn-shaped (``fit`` returns self,
    learned values end in ``_``)."""

    def __init__(self, l2: float = 1.0):
        self.l2 = float(l2)

    def fit(self, X: np.ndarray, wrong: np.ndarray) -> "DifficultyEstimator":
        self.model_ = fit_logistic(X, np.asarray(wrong).astype(np.float64), l2=self.l2)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if not hasattr(self, "model_"):
            raise RuntimeError("DifficultyEstimator is not fitted: call fit(X, wrong) first")
        X = np.asarray(X, dtype=np.float64)
        if X.shape[1] != len(self.model_.coef):
            raise ValueError(f"difficulty estimator fitted on {len(self.model_.coef)} features got {X.shape[1]}")
        return self.model_.predict_proba(X)

    def to_dict(self) -> dict:
        return {"l2": self.l2, **self.model_.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "DifficultyEstimator":
        e = cls(d.get("l2", 1.0))
        e.model_ = LogisticModel.from_dict(d)
        return e


@register_rule
class DifficultyRule(ArrayRule):
    """Stop when the learned estimate of P(current answer is wrong) is at most ``max_risk``."""

    kind = "difficulty"

    def __init__(self, max_risk: float, estimator: DifficultyEstimator):
        self.max_risk = float(max_risk)
        self.estimator = estimator

    def risk(self, folded, logits, probs, features=()) -> np.ndarray:
        return self.estimator.predict_proba(difficulty_features(folded, logits, probs, features))

    def stop_arrays(self, folded, logits, probs, features=()):
        return self.risk(folded, logits, probs, features) <= self.max_risk

    def to_config(self) -> dict:
        return {"kind": self.kind, "max_risk": self.max_risk, "estimator": self.estimator.to_dict()}

    @classmethod
    def from_config(cls, cfg: dict) -> "DifficultyRule":
        return cls(cfg["max_risk"], DifficultyEstimator.from_dict(cfg["estimator"]))


#: rule families the policy optimiser searches (margin and entropy order images as confidence does)
SEARCHABLE_RULES: tuple[str, ...] = ("confidence", "difficulty", "agreement")


def rule_score(kind: str, folded: np.ndarray, probs: np.ndarray | None = None,
               tier_thresholds: Sequence[float] = (), risk: np.ndarray | None = None) -> np.ndarray:
    """The score whose upper level sets are the rule's stop sets (``stop iff score >= threshold``)."""
    folded = np.asarray(folded, dtype=np.float64)
    if kind == "confidence":
        return np.abs(folded - 0.5)
    if kind == "margin":
        return np.abs(logit(folded))
    if kind == "entropy":
        return -binary_entropy(folded)
    if kind == "difficulty":
        if risk is None:
            raise ValueError("difficulty score needs the estimated risk")
        return -np.asarray(risk, dtype=np.float64)
    if kind == "agreement":
        P = np.asarray(probs, dtype=np.float64).reshape(len(folded), -1)
        if P.shape[1] < 2:
            return np.full(len(folded), -np.inf)
        return -agreement_gap(P[:, -2], P[:, -1], tier_thresholds[-2], tier_thresholds[-1])
    if kind == "never":
        return np.full(len(folded), -np.inf)
    raise ValueError(f"no score for rule kind {kind!r}")


def make_rule(kind: str, threshold: float, tier_thresholds: Sequence[float] = (),
              estimator: DifficultyEstimator | None = None) -> Rule:
    """The rule whose stop set is ``{score >= threshold}`` for :func:`rule_score`."""
    if kind == "never" or (np.isinf(threshold) and threshold > 0):
        return NeverRule()
    if kind == "confidence":
        return ConfidenceRule(threshold)
    if kind == "margin":
        return MarginRule(threshold)
    if kind == "entropy":
        return EntropyRule(-threshold)
    if kind == "difficulty":
        if estimator is None:
            raise ValueError("a difficulty rule needs its fitted estimator")
        return DifficultyRule(-threshold, estimator)
    if kind == "agreement":
        return AgreementRule(-threshold, tuple(tier_thresholds[-2:]))
    raise ValueError(f"unknown rule kind {kind!r}")
