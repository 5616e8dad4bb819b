"""Deferral rules: the rule interface, its one registry, and every generic rule.

A rule decides at one exit point which images may stop there: ``Rule.stop(folded, logits, probs,
features)`` on arrays (the folded fused probability (n,), the per-tier logits and calibrated
probabilities (n, k+1) of the tiers that ran, and per tier an (n, d) feature array or None). The
runtime, the policy replay, the GPU path and the server all reach it through
:func:`roadcascade.cascade.decision.decide`. A new rule is one class registered with ``@register_rule``.

A rule that is a one-parameter family ``stop iff score >= threshold`` (``family = True``) also gives
the optimiser its score (``Rule.score``) and its member at a threshold (``Rule.at``); ``searchable``
marks the families the optimiser searches by default (:data:`SEARCHABLE_RULES`):

========== ============================================== ========================================
kind       score                                          parameter
========== ============================================== ========================================
confidence ``|folded - 0.5|``                             ``tau`` = threshold
margin     ``|logit(folded)|``                            ``m`` = threshold
entropy    ``-H(folded)`` (bits)                          ``h`` = -threshold
difficulty ``-P(answer wrong | features)``                ``max_risk`` = -threshold
agreement  ``-|u_a - u_b|`` if the last two tiers decide   ``tol`` = -threshold
           alike, else -inf (``u`` = a tier's folded logit)
never      -inf (never stops; used to run every tier)     none
final      (the last exit: every image stops)             none
========== ============================================== ========================================

For one binary answer, margin and entropy order images exactly as confidence does (each is a
monotone function of ``|folded - 0.5|``); they are kept as parametrisations (a logit margin, a bits
budget) and the optimiser searches only confidence. The difficulty estimator and the agreement rule
use more than the fused probability: the spread of the tiers' answers, tier features (the
test-time-scaling tier's view dispersion), and the two last tiers' separate decisions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from .calibration import logit
from .fusion import LogisticModel, fit_logistic
from .registry import registry

RULES, register_rule = registry()

__all__ = [
    "Rule",
    "RULES",
    "register_rule",
    "FinalRule",
    "ConfidenceRule",
    "MarginRule",
    "EntropyRule",
    "AgreementRule",
    "DifficultyRule",
    "DifficultyEstimator",
    "NeverRule",
    "binary_entropy",
    "per_image",
    "difficulty_features",
    "agreement_gap",
    "rule_score",
    "make_rule",
    "family_rules",
    "SEARCHABLE_RULES",
]


# ----------------------------------------------------------------------------- the interface


class Rule(ABC):
    """Decides, at one exit point, which images may stop there."""

    kind: ClassVar[str]
    family: ClassVar[bool] = False  # a one-parameter family: ``score`` and ``at`` are defined
    searchable: ClassVar[bool] = False  # searched by the policy optimiser by default

    @abstractmethod
    def stop(self, folded: np.ndarray, logits: np.ndarray, probs: np.ndarray,
             features: Sequence[np.ndarray | None] = ()) -> np.ndarray:
        """Boolean (n,): True where the image stops. logits/probs: (n, k+1) of the tiers that ran."""

    @classmethod
    def score(cls, folded: np.ndarray, probs: np.ndarray | None = None, tier_thresholds: Sequence[float] = (),
              risk: np.ndarray | None = None) -> np.ndarray:
        """The family's score: its upper level sets are the rule's stop sets (``stop iff score >= threshold``)."""
        raise ValueError(f"no score for rule kind {cls.kind!r}")

    @classmethod
    def at(cls, threshold: float, tier_thresholds: Sequence[float] = (),
           estimator: "DifficultyEstimator | None" = None) -> "Rule":
        """The member of the family whose stop set is ``{score >= threshold}``."""
        raise ValueError(f"rule kind {cls.kind!r} is not a one-parameter family")

    def to_config(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_config(cls, cfg: dict) -> "Rule":
        return cls()


# ----------------------------------------------------------------------------- pure pieces


def per_image(a, n: int) -> np.ndarray:
    """``a`` as float64 rows, one per image: (n, d) (a 1-D array is one column; n = 0 keeps d)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        return a.reshape(n, -1) if n else a.reshape(0, 1)
    return a.reshape(n, -1) if n else a.reshape(0, a.shape[-1])


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
    P = per_image(probs, len(folded))
    c = logit(P)
    fused_logit = logit(folded)
    cols = [
        np.abs(fused_logit),
        c.std(axis=1),
        c.max(axis=1) - c.min(axis=1),
        np.abs(c - c.mean(axis=1, keepdims=True)).mean(axis=1),
    ]
    X = np.column_stack(cols)
    extra = [per_image(f, len(folded)) for f in features if f is not None]
    return np.hstack([X, *extra]) if extra else X


# ----------------------------------------------------------------------------- rules


@register_rule
class FinalRule(Rule):
    """The last exit: every image stops."""

    kind = "final"

    def stop(self, folded, logits, probs, features=()):
        return np.ones(len(folded), dtype=bool)


@register_rule
class ConfidenceRule(Rule):
    """Stop when the folded probability is at least ``tau`` away from 0.5 on either side."""

    kind = "confidence"
    family = searchable = True

    def __init__(self, tau: float):
        self.tau = float(tau)

    def stop(self, folded, logits, probs, features=()):
        return np.abs(np.asarray(folded, dtype=np.float64) - 0.5) >= self.tau

    @classmethod
    def score(cls, folded, probs=None, tier_thresholds=(), risk=None):
        return np.abs(np.asarray(folded, dtype=np.float64) - 0.5)

    @classmethod
    def at(cls, threshold, tier_thresholds=(), estimator=None):
        return cls(threshold)

    def to_config(self) -> dict:
        return {"kind": self.kind, "tau": self.tau}

    @classmethod
    def from_config(cls, cfg: dict) -> "ConfidenceRule":
        return cls(cfg["tau"])


@register_rule
class NeverRule(Rule):
    """Never stops early: every image goes on to the next tier (the full ensemble's exits)."""

    kind = "never"

    def stop(self, folded, logits, probs, features=()):
        return np.zeros(len(folded), dtype=bool)

    @classmethod
    def score(cls, folded, probs=None, tier_thresholds=(), risk=None):
        return np.full(len(folded), -np.inf)


@register_rule
class MarginRule(Rule):
    """Stop when the fused answer's logit margin ``|logit(folded)|`` is at least ``m``."""

    kind = "margin"
    family = True

    def __init__(self, m: float):
        self.m = float(m)

    def stop(self, folded, logits, probs, features=()):
        return np.abs(logit(folded)) >= self.m

    @classmethod
    def score(cls, folded, probs=None, tier_thresholds=(), risk=None):
        return np.abs(logit(folded))

    @classmethod
    def at(cls, threshold, tier_thresholds=(), estimator=None):
        return cls(threshold)

    def to_config(self) -> dict:
        return {"kind": self.kind, "m": self.m}

    @classmethod
    def from_config(cls, cfg: dict) -> "MarginRule":
        return cls(cfg["m"])


@register_rule
class EntropyRule(Rule):
    """Stop when the fused answer's binary entropy is at most ``h`` bits."""

    kind = "entropy"
    family = True

    def __init__(self, h: float):
        self.h = float(h)

    def stop(self, folded, logits, probs, features=()):
        return binary_entropy(folded) <= self.h

    @classmethod
    def score(cls, folded, probs=None, tier_thresholds=(), risk=None):
        return -binary_entropy(folded)

    @classmethod
    def at(cls, threshold, tier_thresholds=(), estimator=None):
        return cls(-threshold)

    def to_config(self) -> dict:
        return {"kind": self.kind, "h": self.h}

    @classmethod
    def from_config(cls, cfg: dict) -> "EntropyRule":
        return cls(cfg["h"])


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
class DifficultyRule(Rule):
    """Stop when the learned estimate of P(current answer is wrong) is at most ``max_risk``."""

    kind = "difficulty"
    family = searchable = True

    def __init__(self, max_risk: float, estimator: DifficultyEstimator):
        self.max_risk = float(max_risk)
        self.estimator = estimator

    def risk(self, folded, logits, probs, features=()) -> np.ndarray:
        return self.estimator.predict_proba(difficulty_features(folded, logits, probs, features))

    def stop(self, folded, logits, probs, features=()):
        return self.risk(folded, logits, probs, features) <= self.max_risk

    @classmethod
    def score(cls, folded, probs=None, tier_thresholds=(), risk=None):
        if risk is None:
            raise ValueError("difficulty score needs the estimated risk")
        return -np.asarray(risk, dtype=np.float64)

    @classmethod
    def at(cls, threshold, tier_thresholds=(), estimator=None):
        if estimator is None:
            raise ValueError("a difficulty rule needs its fitted estimator")
        return cls(-threshold, estimator)

    def to_config(self) -> dict:
        return {"kind": self.kind, "max_risk": self.max_risk, "estimator": self.estimator.to_dict()}

    @classmethod
    def from_config(cls, cfg: dict) -> "DifficultyRule":
        return cls(cfg["max_risk"], DifficultyEstimator.from_dict(cfg["estimator"]))


@register_rule
class AgreementRule(Rule):
    """Speculative-cascade style: stop when the last two tiers give the same decision and their
    folded logits are within ``tol`` of each other (compares two tiers' scores, not one confidence).

    ``thresholds`` are the two tiers' own decision thresholds on their calibrated probabilities.
    At the first exit (one tier ran) nothing stops."""

    kind = "agreement"
    family = searchable = True

    def __init__(self, tol: float, thresholds: Sequence[float] = (0.5, 0.5)):
        if len(thresholds) != 2:
            raise ValueError("AgreementRule needs the two tiers' thresholds")
        self.tol = float(tol)
        self.thresholds = (float(thresholds[0]), float(thresholds[1]))

    def stop(self, folded, logits, probs, features=()):
        P = per_image(probs, len(folded))
        if P.shape[1] < 2:
            return np.zeros(len(folded), dtype=bool)
        return agreement_gap(P[:, -2], P[:, -1], *self.thresholds) <= self.tol

    @classmethod
    def score(cls, folded, probs=None, tier_thresholds=(), risk=None):
        P = per_image(probs, len(folded))
        if P.shape[1] < 2:
            return np.full(len(folded), -np.inf)
        return -agreement_gap(P[:, -2], P[:, -1], tier_thresholds[-2], tier_thresholds[-1])

    @classmethod
    def at(cls, threshold, tier_thresholds=(), estimator=None):
        return cls(-threshold, tuple(tier_thresholds[-2:]))

    def to_config(self) -> dict:
        return {"kind": self.kind, "tol": self.tol, "thresholds": list(self.thresholds)}

    @classmethod
    def from_config(cls, cfg: dict) -> "AgreementRule":
        return cls(cfg["tol"], cfg.get("thresholds", (0.5, 0.5)))


def family_rules() -> tuple[str, ...]:
    """Every one-parameter rule family (what the policy optimiser can search), in registry order."""
    return tuple(k for k, c in RULES.items() if c.family)


#: rule families the policy optimiser searches by default (margin and entropy order images as confidence does)
SEARCHABLE_RULES: tuple[str, ...] = tuple(k for k, c in RULES.items() if c.searchable)


def _rule_class(kind: str) -> type[Rule]:
    if kind not in RULES:
        raise ValueError(f"unknown rule kind {kind!r}; known: {', '.join(sorted(RULES))}")
    return RULES[kind]


def rule_score(kind: str, folded: np.ndarray, probs: np.ndarray | None = None,
               tier_thresholds: Sequence[float] = (), risk: np.ndarray | None = None) -> np.ndarray:
    """The score whose upper level sets are the rule's stop sets (``stop iff score >= threshold``)."""
    return _rule_class(kind).score(np.asarray(folded, dtype=np.float64), probs, tier_thresholds, risk)


def make_rule(kind: str, threshold: float, tier_thresholds: Sequence[float] = (),
              estimator: DifficultyEstimator | None = None) -> Rule:
    """The rule whose stop set is ``{score >= threshold}`` for :func:`rule_score` (+inf: never stops)."""
    if kind == "never" or (np.isinf(threshold) and threshold > 0):
        return NeverRule()
    return _rule_class(kind).at(threshold, tier_thresholds, estimator)
