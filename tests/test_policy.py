"""The policy optimiser: pure mathematics (Pareto front, p-values, fixed-sequence testing), a known
optimum on synthetic scores, replay = runtime, and the Learn-then-Test guarantee on fresh data."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from cascade_synth import known_optimum_table, synth_table
from roadcascade.metrics import mcc_from_counts
from roadcascade.fit.policy import (
    CascadePolicy, TierTable, bentkus_pvalue, binomial_pvalue, fixed_sequence_select, group_means, hb_pvalue,
    hoeffding_pvalue, learn_then_test, mcc_counts, pareto_front, parse_budget, replay, row_images, runtime_cascade,
)


@pytest.fixture(scope="module")
def fitted():
    tb = synth_table(n_img=250, seed=0)
    return tb, CascadePolicy().fit(tb)


# ----------------------------------------------------------------------------- pure functions


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(-1, 1)), min_size=1, max_size=60))
@settings(max_examples=80, deadline=None)
def test_pareto_front_is_monotone_and_non_dominated(pts):
    cost, score = np.array(pts).T
    f = pareto_front(cost, score)
    assert np.all(np.diff(cost[f]) >= 0) and np.all(np.diff(score[f]) > 0)
    for i in f:  # nothing strictly better on one axis and at least as good on the other
        dom = ((cost <= cost[i]) & (score > score[i])) | ((cost < cost[i]) & (score >= score[i]))
        assert not dom.any()
    for j in range(len(cost)):  # every point is matched or beaten by a frontier point
        assert np.any((cost[f] <= cost[j]) & (score[f] >= score[j]))


@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50), st.integers(0, 50))
def test_mcc_counts_matches_metrics(tp, fp, tn, fn):
    assert mcc_counts(tp, fp, tn, fn) == pytest.approx(mcc_from_counts(tp, tn, fp, fn), abs=1e-12)


@given(st.floats(0, 1), st.integers(1, 500), st.floats(0.01, 0.5))
@settings(max_examples=80, deadline=None)
def test_pvalues(rhat, n, eps):
    for f in (hoeffding_pvalue, bentkus_pvalue, hb_pvalue, binomial_pvalue):
        assert 0.0 <= f(rhat, n, eps) <= 1.0
    assert hb_pvalue(rhat, n, eps) <= hoeffding_pvalue(rhat, n, eps) + 1e-15
    if rhat >= eps:
        assert hoeffding_pvalue(rhat, n, eps) == 1.0
    assert hb_pvalue(min(1.0, rhat + 0.05), n, eps) >= hb_pvalue(rhat, n, eps) - 1e-12  # monotone in the risk


def test_known_pvalues():
    assert binomial_pvalue(0.0, 50, 0.05) == pytest.approx(0.95**50)
    assert bentkus_pvalue(0.02, 100, 0.1) == pytest.approx(np.e * binom.cdf(2, 100, 0.1))
    assert hoeffding_pvalue(0.0, 100, 0.1) == pytest.approx(0.9**100)


def test_fixed_sequence_stops_at_first_failure():
    n = 200
    losses = np.zeros((n, 4))
    losses[:, 1] = (np.arange(n) < 4).astype(float)  # 2 %: passes at eps 0.1
    losses[:, 2] = (np.arange(n) < 40).astype(float)  # 20 %: fails
    losses[:, 3] = 0.0  # would pass, but comes after a failure
    chosen, p, certified = fixed_sequence_select(losses, [0, 1, 2, 3], 0.1, 0.1)
    assert chosen == 1 and certified == 2 and len(p) == 3 and p[2] > 0.1


def test_group_means_and_budget_parsing():
    assert group_means(np.array([1, 0, 1, 1.0]), np.array([5, 5, 2, 2])).tolist() == [1.0, 0.5]
    assert parse_budget("35%", 10.0) == ("gflops", pytest.approx(3.5))
    assert parse_budget("0.5x", 4.0) == ("gflops", 2.0)
    assert parse_budget("2.5", None) == ("gflops", 2.5) == parse_budget("2.5gflops")
    assert parse_budget("12ms") == ("ms", 12.0)
    with pytest.raises(ValueError, match="budget"):
        parse_budget("cheap")


# ----------------------------------------------------------------------------- the optimiser


def test_known_optimum_is_found():
    tb, opt_cost = known_optimum_table()
    opt = CascadePolicy(rules=("confidence",), grid=40).fit(tb)
    assert opt.singles_[1].mcc == pytest.approx(1.0)
    # nothing cheaper than the optimum reaches MCC 1 (exactly: every cheaper policy stops a hard image early)
    assert np.all(opt.mcc_[opt.gflops_ < opt_cost - 1e-9] < 1.0)
    best = opt.select(opt.full_.gflops)
    assert best.mcc == pytest.approx(1.0) and best.gflops <= opt_cost + 0.05 * 10.0
    assert best.names == ("cheap", "strong") and best.rules[0][0] == "confidence"
    tight = opt.select(opt_cost * 0.8, unit="gflops")
    assert tight.gflops <= opt_cost * 0.8 and tight.mcc < 1.0


def test_frontier_of_a_fit_is_monotone_and_covers_every_policy(fitted):
    tb, opt = fitted
    g = np.array([p.gflops for p in opt.frontier_])
    m = np.array([p.mcc for p in opt.frontier_])
    assert np.all(np.diff(g) >= 0) and np.all(np.diff(m) > 0)
    assert m[-1] == pytest.approx(opt.mcc_.max())
    for p in opt.frontier_:
        assert sum(p.exit_rates) == pytest.approx(1.0)
    # the full ensemble and every single tier were evaluated
    assert opt.full_.names == ("t0", "t1", "t2") and len(opt.singles_) == 3
    assert opt.full_.disagreement == 0.0


def test_select_respects_the_budget(fitted):
    tb, opt = fitted
    for b in ("20%", "35%", "60%", "100%"):
        p = opt.select(b)
        kind, v = parse_budget(b, opt.full_.gflops)
        assert p.gflops <= v + 1e-9
        assert p.mcc == pytest.approx(opt.mcc_[opt.gflops_ <= v + 1e-9].max())
    ms = opt.select("12ms")
    assert ms.ms <= 12 + 1e-9


def test_cascade_beats_best_single_and_stacking_meets_singles(fitted):
    tb, opt = fitted
    assert opt.full_.mcc >= opt.best_single_.mcc - 0.01
    chosen = opt.select("50%")
    assert chosen.mcc > opt.best_single_.mcc - 0.01 and chosen.gflops < opt.best_single_.gflops + opt.full_.gflops
    rows = opt.fusion_comparison()
    assert [r["tiers"] for r in rows] == [["t0"], ["t0", "t1"], ["t0", "t1", "t2"]]
    assert rows[-1]["stacking"] >= max(r["stacking"] for r in rows[:1]) - 1e-9


@pytest.mark.parametrize("budget", ["25%", "40%", "70%"])
def test_replay_equals_the_runtime_and_the_estimate(fitted, budget):
    tb, opt = fitted
    p = opt.select(budget)
    exits = opt.exits_for(p)
    r = replay(exits, p.tiers, tb)
    preds = runtime_cascade(exits, p.tiers, tb).predict(row_images(tb.n))
    assert np.array_equal(r.prob, np.array([x.probability for x in preds]))
    assert np.array_equal(r.exit, np.array([x.trace.exit for x in preds]))
    # deployed (refitted on all rows) vs the out-of-fold estimate: close
    y = tb.y == 1
    m = mcc_counts((r.pred & y).sum(), (r.pred & ~y).sum(), (~r.pred & ~y).sum(), (~r.pred & y).sum())
    assert abs(float(m) - p.mcc) < 0.05
    assert abs(r.gflops.mean() - p.gflops) < 0.15 * opt.full_.gflops


def test_orders_and_reuse_costs():
    tb = synth_table(n_img=60, seed=1)
    assert len(CascadePolicy(orders="cost").sequences(tb)) == 7
    assert len(CascadePolicy(orders="all").sequences(tb)) == 3 + 6 + 6
    tb.reuse_src[2], tb.saving[:, 2] = 1, 0.8
    c = tb.costs((1, 2))
    assert np.allclose(c[-1], 0.8 + 4.0 - 0.8)
    assert np.allclose(tb.costs((2,))[-1], 4.0)


def test_table_roundtrip(tmp_path: Path):
    tb = synth_table(n_img=20, seed=2)
    tb.features[2] = np.ones((tb.n, 2))
    again = TierTable.load(tb.save(tmp_path / "t.npz"))
    assert again.names == tb.names and np.array_equal(again.logits, tb.logits)
    assert np.array_equal(again.features[2], tb.features[2]) and again.features[0] is None


def test_bad_settings():
    tb = synth_table(n_img=20)
    with pytest.raises(ValueError, match="unknown rule"):
        CascadePolicy(rules=("telepathy",)).fit(tb)
    with pytest.raises(ValueError, match="orders"):
        CascadePolicy(orders="random").fit(tb)
    with pytest.raises(RuntimeError, match="not fitted"):
        CascadePolicy().select("35%")


# ----------------------------------------------------------------------------- Learn-then-Test


def test_ltt_guarantee_holds_on_fresh_exchangeable_data():
    """Candidates: stop at tier 0 when its confidence >= lambda, else ask tier 1 (the 'full ensemble').
    The disagreement of the policy LTT picks, measured on a large fresh sample, must exceed epsilon in
    at most delta of the trials (plus binomial slack for the finite number of trials)."""
    eps, delta, n_cal, trials = 0.1, 0.1, 150, 300
    lambdas = np.linspace(3.0, 0.0, 31)  # safest first (stops fewest)
    rng = np.random.default_rng(0)

    def draw(n):
        y = rng.random(n) < 0.5
        s = np.where(y, 1.0, -1.0)
        z1 = s * 2 + rng.normal(0, 1.0, n)
        z0 = z1 + rng.normal(0, 1.5, n)
        stop = np.abs(z0)[:, None] >= lambdas[None, :]
        return (stop & ((z0 > 0) != (z1 > 0))[:, None]).astype(float)  # disagreement loss per candidate

    true_risk = draw(200_000).mean(axis=0)
    bad = 0
    for _ in range(trials):
        j, _, _ = fixed_sequence_select(draw(n_cal), range(len(lambdas)), eps, delta)
        bad += j is not None and true_risk[j] > eps
    assert bad / trials <= delta + 3 * np.sqrt(delta * (1 - delta) / trials)
    assert any(true_risk > eps)  # the test is not vacuous: some candidates are unsafe


def test_learn_then_test_end_to_end_on_fresh_data():
    tb = synth_table(n_img=400, seed=5)
    res = learn_then_test(tb, epsilon=0.05, delta=0.1, seed=0, grid=10)
    assert res.certified and res.p_value <= 0.1 and res.risk_cal <= 0.05
    assert res.point.gflops < res.optimizer.full_.gflops  # it found something cheaper than the ensemble
    fresh = synth_table(n_img=3000, seed=99)
    got = replay(res.exits, res.point.tiers, fresh).pred
    ref = replay(res.reference_exits, res.reference_tiers, fresh).pred
    assert group_means(got != ref, fresh.groups).mean() <= 0.05
    assert set(res.fit_rows).isdisjoint(res.cal_rows)
    d = res.as_dict()
    assert d["policy"]["tiers"] and d["path"][0]["p_value"] is not None
