"""Fusion (stacking, weighted vote) and the shared logistic regression / grouped folds."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_synth import synth_table
from roadcascade.cascade.calibration import best_threshold, fold, sigmoid
from roadcascade.cascade.runtime import ExitPoint, FinalRule
from roadcascade.cascade.fusion import (
    StackingFusion, WeightedVoteFusion, fit_logistic, group_folds, make_fusion, out_of_fold, vote_weights,
)
from roadcascade.metrics import ece, mcc


def test_logistic_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20000, 2)) * [1.0, 3.0] + [0.5, -1.0]
    y = (rng.random(20000) < sigmoid(X @ [2.0, -0.5] + 0.3)).astype(float)
    m = fit_logistic(X, y, l2=1e-3)
    assert m.coef == pytest.approx([2.0, -0.5], abs=0.08)
    assert m.intercept == pytest.approx(0.3, abs=0.08)


def test_logistic_one_class_is_constant():
    m = fit_logistic(np.ones((5, 2)), np.zeros(5))
    assert np.all(m.coef == 0) and m.predict_proba(np.ones((1, 2)))[0] < 0.01


@given(st.integers(1, 60), st.integers(2, 6), st.integers(0, 100))
@settings(max_examples=40, deadline=None)
def test_group_folds_keep_groups_together(n_groups, folds, seed):
    groups = np.repeat(np.arange(n_groups), 3)
    parts = group_folds(groups, folds, seed)
    rows = np.concatenate(parts)
    assert sorted(rows.tolist()) == list(range(len(groups)))
    for p in parts:
        others = np.setdiff1d(np.arange(len(groups)), p)
        assert not set(groups[p]) & set(groups[others])


def test_out_of_fold_never_sees_its_own_rows():
    groups = np.repeat(np.arange(20), 4)

    def fp(train, test):
        assert not set(groups[train]) & set(groups[test])
        return np.full(len(test), len(train), dtype=float)

    out = out_of_fold(fp, len(groups), groups, 5)
    assert not np.isnan(out).any() and np.all(out < len(groups))


def _oof_mcc(kind, L, P, y, groups):
    def fp(train, test):
        return make_fusion(kind).fit(L[train], P[train], y[train]).prob(L[test], P[test])

    p = out_of_fold(fp, len(y), groups, 5)
    return mcc(y, fold(p, best_threshold(p, y)) > 0.5), p


@pytest.mark.parametrize("kind", ["stacking", "vote"])
def test_fusion_meets_or_beats_every_single_tier(kind):
    tb = synth_table(n_img=400, noise=(1.2, 1.0, 1.1), seed=3)
    singles = [mcc(tb.y, tb.probs[:, j] > best_threshold(tb.probs[:, j], tb.y)) for j in range(tb.n_tiers)]
    fused, _ = _oof_mcc(kind, tb.logits, tb.probs, tb.y, tb.groups)
    assert fused >= max(singles) - 0.01


def test_stacking_beats_single_tiers_on_complementary_tiers_and_is_calibrated():
    rng = np.random.default_rng(1)
    n = 3000
    y = (rng.random(n) < 0.4).astype(int)
    s = np.where(y == 1, 1.0, -1.0)
    Z = np.column_stack([s + rng.normal(0, 1.0, n), 2 * s + rng.normal(0, 2.0, n), 0.5 * s + rng.normal(0, 0.7, n)])
    P = sigmoid(Z)
    singles = [mcc(y, P[:, j] > best_threshold(P[:, j], y)) for j in range(3)]
    fused, p = _oof_mcc("stacking", Z, P, y, np.arange(n))
    assert fused > max(singles) + 0.03
    assert ece(y, p) < 0.04


def test_vote_weights_and_permutation_invariance():
    tb = synth_table(n_img=200, seed=2)
    w = vote_weights(tb.probs, tb.y)
    assert np.all(w > 0) and w.sum() == pytest.approx(1.0)
    assert w[2] > w[0]  # the stronger tier weighs more
    f = WeightedVoteFusion().fit(tb.logits, tb.probs, tb.y)
    perm = [2, 0, 1]
    g = WeightedVoteFusion(f.weights_[perm])
    assert np.allclose(f.prob(tb.logits, tb.probs), g.prob(tb.logits[:, perm], tb.probs[:, perm]))
    assert np.all((f.prob(tb.logits, tb.probs) >= 0) & (f.prob(tb.logits, tb.probs) <= 1))


@pytest.mark.parametrize("cls", [StackingFusion, WeightedVoteFusion])
def test_fusion_config_roundtrip_and_checks(cls):
    tb = synth_table(n_img=100, seed=4)
    with pytest.raises(RuntimeError, match="not fitted"):
        cls().prob(tb.logits, tb.probs)
    f = cls().fit(tb.logits, tb.probs, tb.y)
    e = ExitPoint.from_config(ExitPoint(f, 0.4, FinalRule()).to_config())
    assert isinstance(e.fusion, cls)
    assert np.array_equal(e.fusion.prob(tb.logits, tb.probs), f.prob(tb.logits, tb.probs))
    with pytest.raises(ValueError, match="fitted on 3 tiers"):
        f.prob(tb.logits[:, :2], tb.probs[:, :2])


def test_unknown_fusion_kind():
    with pytest.raises(ValueError, match="unknown fusion"):
        make_fusion("telepathy")
