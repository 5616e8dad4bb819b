"""The test-time-scaling tier and its verifier, on a deterministic stand-in classifier."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from roadcascade.cascade.calibration import TemperatureCalibrator
from roadcascade.cascade.runtime import Cascade, ClassifierTier, ConfidenceRule, ExitPoint, FinalRule, LastTierFusion
from roadcascade.cascade.tta import (
    TTATier, View, adaptive_counts, choose_margin, model_logits, view_weights, weighted_mean,
)


class StandIn(torch.nn.Module):
    """logit = 3 * (red - blue) + 2 * (green left half - green right half): flips and crops change it."""

    def forward(self, x):
        w = x.shape[-1]
        d = x[:, 0].mean((1, 2)) - x[:, 2].mean((1, 2))
        asym = x[:, 1, :, : w // 2].mean((1, 2)) - x[:, 1, :, w // 2 :].mean((1, 2))
        return (3 * d + 2 * asym).unsqueeze(1)


def make_images(n, seed=0, size=24):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(np.int64)
    ims = []
    for lab in y:
        im = rng.integers(60, 196, (size, size, 3)).astype(np.int16)
        im[..., 0] += 25 if lab else -25
        im[:, : size // 2, 1] += rng.integers(-40, 40)
        ims.append(np.clip(im, 0, 255).astype(np.uint8))
    return ims, y


def stand_in_tier(images, y, model=None, name="stand@24"):
    t = ClassifierTier(name=name, model_name="stand", model=model or StandIn(), input_size=24, mean=(0.5,) * 3,
                       std=(0.5,) * 3, calibrator=TemperatureCalibrator(), gflops=1.0, device=torch.device("cpu"),
                       batch_size=16)
    t.calibrator.fit(model_logits(t, images), y)
    return t


@pytest.fixture(scope="module")
def fitted():
    ims, y = make_images(80, 0)
    base = stand_in_tier(ims, y)
    tta = TTATier(base, n_min=2, n_max=6)
    V = tta.view_logits(ims)
    tta.fit(V, y, folds=4)
    return base, tta, ims, y, V


def test_views_parse_name_and_apply():
    for name in ("id", "hflip", "c85", "tl80", "hflip+br70", "s115", "hflip+c85+s130"):
        assert View.parse(name).name == name
    im = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    assert np.array_equal(View.parse("hflip").apply(im), im[:, ::-1])
    tl = View.parse("tl50").apply(im)
    assert tl.shape == (5, 10, 3) and np.array_equal(tl, im[:5, :10])
    br = View.parse("br50").apply(im)
    assert np.array_equal(br, im[5:, 10:])
    assert View.parse("s115").size(224) == 256 and View.parse("id").size(224) == 224
    with pytest.raises(ValueError, match="unknown view token"):
        View.parse("rotate90")


@given(st.integers(0, 200), st.integers(1, 4), st.integers(0, 3))
@settings(max_examples=40, deadline=None)
def test_adaptive_counts_bounds_and_monotone_in_margin(seed, n_min, extra):
    rng = np.random.default_rng(seed)
    n_max = n_min + extra
    V = rng.normal(0, 2, (30, n_max))
    W = rng.uniform(0.05, 3, (30, n_max))
    c0 = adaptive_counts(V, W, 0.1, n_min, n_max, 0.0)
    c1 = adaptive_counts(V, W, 0.1, n_min, n_max, 1.0)
    cinf = adaptive_counts(V, W, 0.1, n_min, n_max, np.inf)
    assert np.all((c0 >= n_min) & (cinf == n_max))
    assert np.all(c0 == n_min)
    assert np.all(c1 >= c0) and np.all(c1 <= cinf)


def test_weighted_mean_reduces_to_mean():
    V = np.arange(12.0).reshape(3, 4)
    m, s = weighted_mean(V, np.ones_like(V), 4)
    assert np.allclose(m, V.mean(axis=1)) and np.allclose(s, V.std(axis=1))
    m2, _ = weighted_mean(V, np.ones_like(V), np.array([1, 2, 4]))
    assert np.allclose(m2, [0.0, 4.5, 9.5])


def test_choose_margin_meets_its_agreement_target(fitted):
    base, tta, ims, y, V = fitted
    W = view_weights(tta.verifier_, V, tta.z_thr)
    m = choose_margin(V, W, tta.z_thr, tta.n_min, tta.n_max, 0.95)
    c = adaptive_counts(V, W, tta.z_thr, tta.n_min, tta.n_max, m)
    full, _ = weighted_mean(V, W, tta.n_max)
    z, _ = weighted_mean(V, W, c)
    assert np.mean((z > tta.z_thr) == (full > tta.z_thr)) >= 0.95


def test_online_rounds_equal_offline_simulation(fitted):
    base, tta, ims, y, V = fitted
    tta.margin_ = 0.6  # some images stop early, others go on: exercises every round
    online = tta.run(ims)
    offline = tta.simulate(tta.view_logits(ims))
    assert np.array_equal(online.logits, offline.logits)
    assert np.array_equal(online.prob, offline.prob)
    assert np.array_equal(online.gflops, offline.gflops)
    assert np.array_equal(online.features, offline.features)
    n_used = online.features[:, 1] * tta.n_max
    assert n_used.min() >= tta.n_min and n_used.max() <= tta.n_max and len(set(n_used.tolist())) > 1
    # N is chosen from the uncertainty left: images that stopped early were the confident ones
    conf = np.abs(V[:, 0] - tta.z_thr)
    assert conf[n_used == n_used.min()].mean() > conf[n_used == n_used.max()].mean()


def test_reuse_of_the_base_tier_in_a_cascade(fitted):
    base, tta, ims, y, V = fitted
    tta.margin_ = 0.6
    c = Cascade([base, tta], [ExitPoint(LastTierFusion(), 0.5, ConfidenceRule(1.0)), ExitPoint(LastTierFusion(), 0.5, FinalRule())])
    preds = c.predict(ims)
    alone = tta.run(ims)
    assert np.allclose([p.trace.probs[tta.name] for p in preds], alone.prob, rtol=0, atol=1e-12)
    # view 0 came from the base tier: the tier's own cost is one identity view less
    spent = np.array([p.trace.gflops[tta.name] for p in preds])
    assert np.allclose(spent, alone.gflops - tta.view_gflops[0])


@given(st.integers(0, 100), st.integers(1, 12), st.floats(0.0, 0.5))
@settings(max_examples=10, deadline=None)
def test_cascade_with_tta_batched_equals_unbatched(seed, n, tau):
    ims_fit, y = make_images(60, 1)
    base = stand_in_tier(ims_fit, y)
    tta = TTATier(base, n_min=2, n_max=5).fit(TTATier(base, n_min=2, n_max=5).view_logits(ims_fit), y, folds=3)
    tta.margin_ = 0.5
    c = Cascade([base, tta], [ExitPoint(LastTierFusion(), 0.5, ConfidenceRule(tau)), ExitPoint(LastTierFusion(), 0.45, FinalRule())])
    ims, _ = make_images(n, seed + 100)
    batched = c.predict(ims)
    single = [c.predict([im])[0] for im in ims]
    for a, b in zip(batched, single):
        assert a.probability == b.probability and a.trace.tiers == b.trace.tiers and a.trace.gflops == b.trace.gflops


def test_verifier_weights_informative_views_more():
    """Views 0-3 carry the label, views 4-7 are noise: the verifier should trust the first ones, and the
    weighted answer should beat the plain mean of all views."""
    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random(n) < 0.5).astype(np.int64)
    s = np.where(y == 1, 1.0, -1.0)
    V = np.column_stack([s * 1.5 + rng.normal(0, 1.2, n) for _ in range(4)] + [rng.normal(0, 3.0, n) for _ in range(4)])
    ims, yy = make_images(40, 5)
    base = stand_in_tier(ims, yy)
    base.calibrator.temperature_, base.calibrator.threshold_ = 1.0, 0.5  # z* = 0
    tta = TTATier(base, n_min=8, n_max=8).fit(V, y, folds=4)
    W = view_weights(tta.verifier_, V, tta.z_thr)
    assert W[:, :4].mean() > 2 * W[:, 4:].mean()
    plain = np.mean((V.mean(axis=1) > 0) == y)
    weighted = np.mean((tta.oof_.logits > 0) == y)
    assert weighted > plain + 0.02


def test_unfitted_and_bad_settings(fitted):
    base, *_ = fitted
    with pytest.raises(RuntimeError, match="not fitted"):
        TTATier(base).run([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="n_min"):
        TTATier(base, n_min=5, n_max=3)
    with pytest.raises(ValueError, match="identity"):
        TTATier(base, views=("hflip", "id"), n_min=1, n_max=2)


def test_config_roundtrip_with_a_zoo_model(tmp_path: Path):
    from roadcascade.models.zoo import create_model

    torch.manual_seed(0)
    ims, y = make_images(24, 3)
    model = create_model("test_tiny", num_classes=1, pretrained=False)
    base = ClassifierTier(name="test_tiny@32", model_name="test_tiny", model=model, input_size=32, mean=(0.5,) * 3,
                          std=(0.5,) * 3, calibrator=TemperatureCalibrator(), gflops=0.01, device=torch.device("cpu"))
    base.calibrator.fit(model_logits(base, ims), y)
    tta = TTATier(base, views=("id", "hflip", "c85", "s115"), n_min=2, n_max=4)
    tta.fit(tta.view_logits(ims), y, folds=2)
    cfg = tta.to_config(tmp_path)
    again = TTATier.from_config(cfg, tmp_path, torch.device("cpu"))
    a, b = tta.run(ims), again.run(ims)
    assert np.allclose(a.logits, b.logits, atol=1e-6) and np.array_equal(a.gflops, b.gflops)
    assert (tmp_path / "test_tiny@32.safetensors").exists()
