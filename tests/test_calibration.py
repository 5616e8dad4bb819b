import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roadcascade.cascade.calibration import (
    TemperatureCalibrator, best_threshold, binary_nll, fit_temperature, fold, logit, mcc_curve, sigmoid,
)
from roadcascade.metrics import binarize, mcc


def synthetic(n=4000, t_true=3.0, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, n)
    y = (rng.random(n) < sigmoid(z)).astype(int)
    return z * t_true, y  # over-confident logits: the right temperature is t_true


def test_temperature_recovers_truth():
    z, y = synthetic()
    assert fit_temperature(z, y) == pytest.approx(3.0, rel=0.1)


@given(st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_temperature_never_worse_than_identity(seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, 300)
    y = (rng.random(300) < sigmoid(z * rng.uniform(0.2, 2))).astype(int)
    t = fit_temperature(z, y)
    assert binary_nll(z, y, t) <= binary_nll(z, y, 1.0) + 1e-9


@given(st.floats(0.02, 0.98), st.lists(st.floats(0, 1), min_size=1, max_size=50))
def test_fold_properties(t, ps):
    p = np.array(ps)
    f = fold(p, t)
    assert np.all((f >= 0) & (f <= 1))
    assert fold(np.array([t]), t)[0] == pytest.approx(0.5)
    assert np.array_equal(f > 0.5, p > t) or np.any(np.isclose(p, t))
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(f[order]) >= -1e-12)  # monotone


def test_fold_identity_at_half():
    p = np.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(fold(p, 0.5), p, atol=1e-12)


@given(st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_best_threshold_is_optimal(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    y = rng.integers(0, 2, n)
    p = np.clip(y * 0.3 + rng.random(n) * 0.7, 0, 1)
    t = best_threshold(p, y)
    brute = max(mcc(y, (p > c).astype(int)) for c in np.concatenate(([-1.0], p)))
    assert mcc(y, (p > t).astype(int)) == pytest.approx(brute, abs=1e-9) or t in (0.01, 0.99)


def test_mcc_curve_matches_brute_force():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    p = rng.random(60).round(2)  # ties
    cuts, m = mcc_curve(p, y)
    for c, v in zip(cuts, m):
        assert v == pytest.approx(mcc(y, (p > c).astype(int)), abs=1e-12)


def test_threshold_symmetric_under_relabelling():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.35 + 0.3 * y + rng.normal(0, 0.15, 200), 0.001, 0.999)
    t = best_threshold(p, y)
    t2 = best_threshold(1 - p, 1 - y)
    # the same partition of the data (p > t  <=>  1 - p < 1 - t)
    assert mcc(y, (p > t).astype(int)) == pytest.approx(mcc(1 - y, (1 - p > t2).astype(int)), abs=1e-9)


def test_calibrator_roundtrip_and_folded_decision():
    z, y = synthetic(2000, 2.0, 5)
    z = z + 1.5  # biased: best threshold is not 0.5
    cal = TemperatureCalibrator().fit(z, y)
    p = cal.predict_proba(z)
    assert np.all((p >= 0) & (p <= 1))
    # the folded probability rounded at 0.5 gives the MCC of the best threshold
    assert mcc(y, binarize(p)) == pytest.approx(mcc(y, (cal.calibrated(z) > cal.threshold_).astype(int)))
    cal2 = TemperatureCalibrator.from_dict(cal.to_dict())
    np.testing.assert_array_equal(cal2.predict_proba(z), p)


def test_unfitted_calibrator_raises():
    with pytest.raises(RuntimeError, match="not fitted"):
        TemperatureCalibrator().predict_proba(np.zeros(3))


def test_logit_sigmoid_inverse():
    p = np.linspace(0.001, 0.999, 101)
    np.testing.assert_allclose(sigmoid(logit(p)), p, atol=1e-12)
