import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import matthews_corrcoef, roc_auc_score

from roadcascade.metrics import auroc, binarize, ece, mcc, reward, summarize, percentiles

labels = st.lists(st.integers(0, 1), min_size=2, max_size=200)


def test_binarize_is_validator_round():
    p = np.array([0.0, 0.49, 0.5, 0.500001, 1.0])
    assert binarize(p).tolist() == [0, 0, 0, 1, 1]
    assert [round(v) for v in p] == binarize(p).tolist()


@given(labels, st.data())
def test_mcc_matches_sklearn(y, data):
    pred = data.draw(st.lists(st.integers(0, 1), min_size=len(y), max_size=len(y)))
    assert mcc(np.array(y), np.array(pred)) == pytest.approx(matthews_corrcoef(y, pred), abs=1e-12)


@given(labels, st.data())
def test_auroc_matches_sklearn(y, data):
    s = data.draw(st.lists(st.floats(0, 1), min_size=len(y), max_size=len(y)))
    if len(set(y)) < 2:
        assert np.isnan(auroc(np.array(y), np.array(s)))
    else:
        assert auroc(np.array(y), np.array(s)) == pytest.approx(roc_auc_score(y, s), abs=1e-9)


@given(labels, st.data())
def test_ece_bounds(y, data):
    p = np.array(data.draw(st.lists(st.floats(0, 1), min_size=len(y), max_size=len(y))))
    e = ece(np.array(y), p)
    assert 0.0 <= e <= 1.0


def test_ece_perfect_and_worst():
    y = np.array([0, 1] * 50)
    assert ece(y, y.astype(float)) == 0.0
    assert ece(y, 1 - y.astype(float)) == pytest.approx(1.0)
    # constant 0.5 on balanced labels is calibrated
    assert ece(y, np.full(100, 0.5)) == pytest.approx(0.0)


def test_reward_formula():
    assert reward(1.0, 1.0) == 1.0
    assert reward(-0.3, 0.5) == pytest.approx(0.25**3)
    assert reward(0.9, 0.95) == pytest.approx((0.5 * 0.9 + 0.5 * 0.95) ** 3)


def test_summarize_fields():
    y = np.array([0, 0, 1, 1])
    s = summarize(y, np.array([0.1, 0.6, 0.7, 0.4]))
    assert s.confusion == {"tn": 1, "fp": 1, "fn": 1, "tp": 1}
    assert s.accuracy == 0.5 and s.mcc == 0.0 and s.n == 4


def test_percentiles():
    p = percentiles(np.arange(1, 101, dtype=float))
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)
