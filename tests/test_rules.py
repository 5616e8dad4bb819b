"""Every deferral rule: its definition, states and arrays giving one answer, its config, its score family."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roadcascade.cascade.calibration import logit, sigmoid
from roadcascade.cascade.runtime import RULES, Cascade, ConfidenceRule, ExitPoint, FinalRule, ImageState, LastTierFusion, state_arrays
from roadcascade.cascade.registry import build as _build
from roadcascade.metrics import auroc
from roadcascade.cascade.rules import (
    AgreementRule, DifficultyEstimator, DifficultyRule, EntropyRule, MarginRule, NeverRule, agreement_gap,
    binary_entropy, difficulty_features, make_rule, rule_score,
)

probs_st = st.lists(st.floats(0.001, 0.999), min_size=1, max_size=30)


def _arrays(seed, n, k=2):
    rng = np.random.default_rng(seed)
    L = rng.normal(0, 3, (n, k))
    P = sigmoid(L)
    folded = sigmoid(L.mean(axis=1))
    return folded, L, P


def _states(L, P, feats=None):
    out = []
    for i in range(len(L)):
        out.append(ImageState(image=np.zeros((1, 1, 3), np.uint8), logits=list(L[i]), probs=list(P[i]),
                              features=[None if feats is None else feats[i]] + [None] * (L.shape[1] - 1)))
    return out


def _estimator(seed=0, d=4):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(200, d))
    return DifficultyEstimator().fit(X, (X[:, 0] + rng.normal(0, 1, 200) < -0.5).astype(float))


ALL_RULES = [
    ConfidenceRule(0.3), MarginRule(1.2), EntropyRule(0.6), AgreementRule(0.8, (0.4, 0.6)),
    DifficultyRule(0.3, _estimator()), NeverRule(), FinalRule(),
]


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.kind)
def test_state_path_equals_array_path_and_config_roundtrip(rule):
    folded, L, P = _arrays(0, 40)
    a = rule.stop(folded, L, P, [None, None])
    s = rule.stop(folded, *state_arrays(_states(L, P)))
    assert np.array_equal(a, s)
    again = _build(RULES, "rule", rule.to_config())
    assert type(again) is type(rule)
    assert np.array_equal(again.stop(folded, L, P, [None, None]), a)


def test_definitions():
    f = np.array([0.05, 0.3, 0.5, 0.72, 0.99])
    L = logit(f)[:, None]
    assert MarginRule(1.0).stop(f, L, f[:, None]).tolist() == [True, False, False, False, True]
    assert EntropyRule(0.9).stop(f, L, f[:, None]).tolist() == [True, True, False, True, True]
    assert not NeverRule().stop(f, L, f[:, None]).any()
    assert binary_entropy(np.array([0.0, 0.5, 1.0])).tolist() == [0.0, 1.0, 0.0]


@given(probs_st, st.floats(0.0, 0.5))
@settings(max_examples=60, deadline=None)
def test_margin_and_entropy_order_images_as_confidence_does(ps, tau):
    """For one binary answer, the three rules give the same stop sets at matched parameters."""
    f = np.array(ps)
    conf = np.abs(f - 0.5) >= tau
    q = min(0.5 + tau, 1 - 1e-12)
    m = MarginRule(float(logit(np.float64(q)))).stop(f, None, None)
    h = EntropyRule(float(binary_entropy(np.array([q]))[0])).stop(f, None, None)
    close = np.isclose(np.abs(f - 0.5), tau, atol=1e-9)  # exactly on the boundary: float rounding may differ
    assert np.array_equal(conf[~close], m[~close]) and np.array_equal(conf[~close], h[~close])


def test_agreement_rule():
    thr = (0.3, 0.7)
    pa = np.array([0.9, 0.9, 0.35, 0.2, 0.5])
    pb = np.array([0.95, 0.5, 0.8, 0.1, 0.5])
    P = np.column_stack([pa, pb])
    stop = AgreementRule(2.0, thr).stop(np.full(5, 0.5), logit(P), P)
    gap = agreement_gap(pa, pb, *thr)
    # tier a decides (p > 0.3): 1, 1, 1, 0, 1 ; tier b (p > 0.7): 1, 0, 1, 0, 0
    assert np.isinf(gap[[1, 4]]).all()
    assert stop.tolist() == [bool(gap[0] <= 2), False, bool(gap[2] <= 2), bool(gap[3] <= 2), False]
    # one tier only (the first exit): never stops
    assert not AgreementRule(100.0, thr).stop(np.full(5, 0.9), logit(P[:, :1]), P[:, :1]).any()


@given(st.integers(0, 500), st.floats(0.0, 0.9), st.floats(0.0, 0.9))
@settings(max_examples=40, deadline=None)
def test_difficulty_rule_is_monotone_in_its_threshold(seed, a, b):
    folded, L, P = _arrays(seed, 30)
    est = DifficultyEstimator().fit(difficulty_features(folded, L, P), (np.abs(L[:, 0]) < 1).astype(float))
    lo, hi = sorted((a, b))
    s_lo = DifficultyRule(lo, est).stop(folded, L, P)
    s_hi = DifficultyRule(hi, est).stop(folded, L, P)
    assert np.all(s_hi[s_lo])  # a larger allowed risk stops a superset


def test_difficulty_estimator_learns_from_tier_disagreement():
    """Errors concentrate where the tiers disagree: the estimator should rank them (AUROC well above 0.5)."""
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.random(n) < 0.5
    s = np.where(y, 1.0, -1.0)
    L = np.column_stack([s * 2 + rng.normal(0, 2.0, n), s * 2 + rng.normal(0, 2.0, n)])
    P = sigmoid(L)
    folded = sigmoid(L.mean(axis=1))
    wrong = (folded > 0.5) != y
    X = difficulty_features(folded, L, P)
    tr, te = np.arange(n) < n // 2, np.arange(n) >= n // 2
    est = DifficultyEstimator().fit(X[tr], wrong[tr])
    risk = est.predict_proba(X[te])
    assert auroc(wrong[te], risk) > 0.75
    assert 0 <= risk.min() and risk.max() <= 1


def test_difficulty_features_include_tier_features():
    folded, L, P = _arrays(1, 10)
    f = np.arange(20.0).reshape(10, 2)
    X = difficulty_features(folded, L, P, [f, None])
    assert X.shape == (10, 6) and np.array_equal(X[:, 4:], f)
    est = DifficultyEstimator().fit(X, (np.arange(10) % 2).astype(float))
    rule = DifficultyRule(0.5, est)
    assert np.array_equal(rule.stop(folded, *state_arrays(_states(L, P, f))), rule.stop(folded, L, P, [f, None]))


@pytest.mark.parametrize("kind", ["confidence", "margin", "entropy", "agreement", "difficulty"])
@given(seed=st.integers(0, 1000), q=st.floats(0.0, 1.0))
@settings(max_examples=25, deadline=None)
def test_make_rule_matches_its_score(kind, seed, q):
    """The optimiser searches 'score >= threshold'; the deployed rule must stop exactly that set."""
    folded, L, P = _arrays(seed, 25)
    thr_t = (0.45, 0.55)
    est = DifficultyEstimator().fit(difficulty_features(folded, L, P), (np.abs(L[:, 1]) < 1.5).astype(float))
    risk = est.predict_proba(difficulty_features(folded, L, P))
    s = rule_score(kind, folded, P, thr_t, risk=risk)
    finite = s[np.isfinite(s)]
    if len(finite) == 0:
        return
    thr = float(np.quantile(finite, q, method="nearest"))
    rule = make_rule(kind, thr, thr_t, est)
    assert np.array_equal(rule.stop(folded, L, P, [None, None]), s >= thr)


def test_never_rule_runs_every_tier_on_every_image():
    from test_cascade import MeanTier, images

    c = Cascade([MeanTier("a", 4.0), MeanTier("b", 9.0)], [ExitPoint(LastTierFusion(), 0.5, NeverRule()),
                                                           ExitPoint(LastTierFusion(), 0.5, FinalRule())])
    preds = c.predict(images(0, 20))
    assert all(p.trace.tiers == ["a", "b"] and p.trace.exit == 1 for p in preds)
    assert make_rule("never", np.inf).kind == "never" and make_rule("confidence", np.inf).kind == "never"
