"""The open-set guard (guard.py) and closer square views (ClassifierTier.view_scale): the Neyman-Pearson
threshold's property, the guard lowering exit thresholds only, its bundle round trip and idempotence on real
val images, and views of non-square frames run at the larger size while square images are unchanged."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from roadcascade.cascade.bundle import Bundle, BundleError
from roadcascade.cascade.calibration import TemperatureCalibrator
from roadcascade.cascade.runtime import Cascade, ClassifierTier, ExitPoint, FinalRule, LastTierFusion, square_views
from roadcascade.fit.guard import GUARD_MARGIN, GuardConfig, exit_probabilities, guard_bundle, guard_exits, np_threshold
from roadcascade.cascade.rules import MarginRule
from roadcascade.models.zoo import create_model


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _tier(size: int = 48, squares: int = 3, view_scale: float = 1.0, name: str = "tiny@48") -> ClassifierTier:
    torch.manual_seed(0)
    model = create_model("test_tiny", num_classes=1, pretrained=False)
    cal = TemperatureCalibrator.from_dict({"temperature": 0.01, "threshold": 0.5})
    return ClassifierTier(name, "test_tiny", model, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cal, 0.01,
                          device=torch.device("cpu"), squares=squares, view_scale=view_scale)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=300), st.floats(0, 0.3))
def test_np_threshold_keeps_the_rate_flags_what_the_lowest_does_and_keeps_off_the_scores(scores, fpr):
    s = np.array(scores)
    t = np_threshold(s, fpr)
    t0 = np_threshold(s, fpr, margin=0.0)
    assert t0 in s  # without a margin: the (m+1)-th largest score itself
    assert np.mean(s > t) <= fpr + 1e-12  # at most that share of the negatives above it
    lower = s[s < t0]
    if lower.size:  # and no lower score would do
        assert np.mean(s > lower.max()) > fpr
    assert np.array_equal(s > t, s > t0)  # the margin flags the same reference scores
    desc, m = np.sort(s)[::-1], min(int(np.floor(fpr * s.size + 1e-9)), s.size - 1)
    room = (desc[m - 1] - t0) / 2 if m > 0 else GUARD_MARGIN  # half-way to the m-th largest (0 for a tie)
    if room > 1e-9:  # unless the next score up is (about) a tie, no reference score sits on the threshold
        assert t > t0 and t not in s and t - t0 <= min(GUARD_MARGIN, room) + 1e-15


def test_a_reference_frame_at_the_threshold_is_not_decided_by_rounding():
    s = np.array([0.9, 0.62, 0.61, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02])
    t = np_threshold(s, 0.1)  # m = 1: 0.9 above; 0.62 is the (m+1)-th largest
    assert t == pytest.approx(0.62 + GUARD_MARGIN) and np.mean(s > t) == 0.1
    assert not (0.62 + 1e-6 > t)  # the same frame scored 1e-6 higher by another runtime stays below
    assert np_threshold(np.array([0.5, 0.50002, 0.1]), 0.34) == pytest.approx(0.50001)  # half-way when closer than the margin
    two = np.array([0.0] * 14 + [1.0, np.nextafter(1.0, 0.0)])  # one float apart: half-way rounds up onto the higher one
    assert np.mean(two > np_threshold(two, 0.0625)) == 0.0625  # so the threshold stays on the lower one


def test_np_threshold_refuses_empty_and_bad_rate():
    with pytest.raises(ValueError):
        np_threshold(np.array([]), 0.1)
    with pytest.raises(ValueError):
        GuardConfig(fpr=1.0)


def _cascade() -> Cascade:
    t0, t1 = _tier(32, name="tiny@32"), _tier(48)
    return Cascade([t0, t1], [ExitPoint(LastTierFusion(), 0.8, MarginRule(0.2)), ExitPoint(LastTierFusion(), 0.3, FinalRule())])


def test_guard_lowers_thresholds_only_and_meets_the_rate():
    c = _cascade()
    images = [_img(40 + 7 * i, 90, i) for i in range(30)]
    p = exit_probabilities(c, images, batch=7)
    assert p.shape == (30, 2) and np.all((p >= 0) & (p <= 1))
    rep = guard_exits(c, p, fpr=0.1)
    for k, (fitted, new) in enumerate(zip(rep.fitted, rep.thresholds)):
        assert new <= fitted and c.exits[k].full_threshold == new and c.exits[k].threshold == fitted
        assert rep.fpr_after[k] <= 0.1 or new == fitted  # where the guard acted it holds the rate
        assert rep.fpr_after[k] >= rep.fpr_before[k]
    # every image ran every tier: the exit probabilities do not depend on the batch they were run in
    assert np.allclose(p, exit_probabilities(c, images, batch=30), atol=1e-6)


def test_view_scale_runs_views_of_full_frames_closer():
    base, closer = _tier(48, 3, 1.0), _tier(48, 3, 1.5)
    assert closer.view_size == 64 and base.view_size == 48 and closer.decode_size() == 64
    wide, square = _img(60, 150, 1), _img(64, 64, 2)
    views, _ = square_views([wide], 3)
    want = base._logits(views, 64).max()
    assert closer.logits([wide])[0] == pytest.approx(want, abs=1e-5)
    assert closer.logits([square])[0] == pytest.approx(base.logits([square])[0], abs=1e-6)  # square: input size
    out = closer.run([wide, square])
    assert out.gflops[0] == pytest.approx(0.01 * 3 * (64 / 48) ** 2) and out.gflops[1] == pytest.approx(0.01)
    with pytest.raises(ValueError):
        _tier(48, 3, 5.0)


def test_view_scale_bundle_round_trip_and_validation(tmp_path):
    c = Cascade([_tier(48, 3, 1.3)], [ExitPoint(LastTierFusion(), 0.5, FinalRule())])
    Bundle(c).save(tmp_path)
    b = Bundle.load(tmp_path)
    assert b.cascade.tiers[0].view_scale == 1.3 and b.cascade.tiers[0].view_size == 64
    doc = json.loads((tmp_path / "bundle.json").read_text())
    doc["tiers"][0]["view_scale"] = 9
    (tmp_path / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="view_scale"):
        Bundle.load(tmp_path)


@pytest.mark.integration
def test_guard_bundle_on_real_val_negatives(tmp_path):
    """On the real dashcam negatives of val: the report is stored, no more than the rate pass each exit, and
    guarding again neither compounds nor rewrites the bundle."""
    c = Cascade([_tier(48, 3, 1.3)], [ExitPoint(LastTierFusion(), 0.99, FinalRule())])
    Bundle(c).save(tmp_path)
    logs: list[str] = []
    rep = guard_bundle(tmp_path, GuardConfig(fpr=0.05), device="cpu", log=logs.append)
    assert rep.n_negatives >= 100 and rep.fitted == (0.99,)
    b = Bundle.load(tmp_path)
    assert b.meta["guard"]["thresholds"] == [b.cascade.exits[0].full_threshold]
    assert b.cascade.exits[0].threshold == 0.99  # square images keep the fitted threshold
    assert b.cascade.exits[0].full_threshold <= 0.99 and rep.fpr_after[0] <= 0.05
    mtime = (tmp_path / "bundle.json").stat().st_mtime_ns
    again = guard_bundle(tmp_path, GuardConfig(fpr=0.05), device="cpu", log=logs.append)
    assert again.thresholds == rep.thresholds and (tmp_path / "bundle.json").stat().st_mtime_ns == mtime
    looser = guard_bundle(tmp_path, GuardConfig(fpr=0.2), device="cpu", log=logs.append)
    assert looser.fitted == (0.99,) and looser.thresholds[0] <= rep.thresholds[0]  # from the fitted threshold, not the guarded one


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(8, 120), st.integers(8, 120)), min_size=1, max_size=12),
       st.floats(0.05, 0.95), st.floats(0.05, 0.95))
def test_full_frames_use_their_threshold_and_squares_the_fitted_one(shapes, t, tf):
    """decide(): a full frame is decided at the full-frame threshold, a square image at the fitted one; the
    same exit without a full-frame threshold decides every image at the fitted one."""
    from roadcascade.cascade.decision import decide, is_full_frame

    rng = np.random.default_rng(len(shapes))
    L = rng.normal(0, 2, (len(shapes), 1))
    full = np.array([is_full_frame(h, w) for h, w in shapes])
    e = ExitPoint(LastTierFusion(), t, FinalRule(), full_threshold=tf)
    p = 1 / (1 + np.exp(-L[:, 0]))
    d = decide(e, L, p[:, None], last=True, full=full)
    assert np.array_equal(d.probability > 0.5, np.where(full, p > tf, p > t))
    plain = decide(ExitPoint(LastTierFusion(), t, FinalRule()), L, p[:, None], last=True, full=full)
    assert np.array_equal(plain.probability > 0.5, p > t)
    assert np.array_equal(decide(e, L, p[:, None], last=True).probability > 0.5, p > t)  # kind unknown: fitted


def test_runtime_decides_full_frames_and_squares_apart(tmp_path):
    """Cascade.predict marks full frames itself; the bundle keeps the full-frame threshold and checks it."""
    tier = _tier(48, 1)
    wide, square = _img(40, 100, 1), _img(50, 50, 2)
    e = ExitPoint(LastTierFusion(), 0.999999, FinalRule(), full_threshold=1e-6)  # full frames always yes, squares no
    c = Cascade([tier], [e])
    preds = c.predict([wide, square])
    assert [p.label for p in preds] == [1, 0]
    Bundle(c).save(tmp_path)
    assert Bundle.load(tmp_path).cascade.exits[0].full_threshold == 1e-6
    doc = json.loads((tmp_path / "bundle.json").read_text())
    doc["exits"][0]["full_threshold"] = 1.5
    (tmp_path / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="full_threshold"):
        Bundle.load(tmp_path)
