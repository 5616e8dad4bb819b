"""Distillation: the tempered targets and the loss (properties), the teacher-target cache, and one tiny real run
(a two-tier teacher, a lite0 student at 64 px, an unlabelled folder, one epoch) whose student bundle loads and runs
as a cascade tier; a second run takes every teacher target from the cache."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from roadcascade.cascade.bundle import Bundle
from roadcascade.cascade.runtime import ClassifierTier
from roadcascade.fit.distill import (DistillConfig, TargetCache, distill, distill_loss, every_tier, fill_targets, soft_target,
                                 student_spec, teacher_id, teacher_probs, unlabelled_folder)
from roadcascade.serve.testing import tiny_bundle

probs = st.floats(min_value=1e-4, max_value=1 - 1e-4)


@given(st.lists(probs, min_size=2, max_size=20), st.floats(min_value=1.0, max_value=8.0))
@settings(max_examples=50, deadline=None)
def test_soft_targets_keep_order_and_side_and_soften(p, t):
    p = np.array(sorted(p))
    q = soft_target(p, t)
    assert np.all(np.diff(q) >= -1e-12)  # monotone
    assert np.all((q > 0.5) == (p > 0.5)) or np.allclose(p, 0.5)  # the decision side is kept
    assert np.all(np.abs(q - 0.5) <= np.abs(p - 0.5) + 1e-12)  # T >= 1 moves towards 0.5
    assert np.allclose(soft_target(p, 1.0), p)


def test_loss_ignores_missing_labels_and_is_smallest_at_the_target():
    soft = torch.tensor([0.8, 0.3])
    y = torch.tensor([-1.0, -1.0])
    t = 2.0
    at = torch.logit(soft) * t  # z / T == logit(soft)
    base = distill_loss(at, soft, y, t, 0.3, 0.1)
    for dz in (-0.5, 0.5):
        assert distill_loss(at + dz, soft, y, t, 0.3, 0.1) > base
    # labels change the loss only where they exist
    y2 = torch.tensor([1.0, -1.0])
    assert distill_loss(at, soft, y2, t, 0.3, 0.1) > base
    assert distill_loss(at, soft, y2, t, 0.0, 0.1) == pytest.approx(float(distill_loss(at, soft, y, t, 0.0, 0.1)))


def test_student_spec_and_config_errors():
    assert student_spec("lite0@96") == ("lite0", 96)
    assert student_spec("lite0")[1] == 224
    for bad in ("nosuchmodel", "lite0@abc", "lite0@8"):
        with pytest.raises(ValueError):
            student_spec(bad)
    with pytest.raises(ValueError):
        DistillConfig(teacher="x", temperature=0)


def test_cache_survives_a_torn_line(tmp_path):
    c = TargetCache(tmp_path, "t")
    c.add([("a", 0), ("a", 1)], np.array([0.2, 0.9]))
    with c.path.open("a") as f:
        f.write('{"key": "b", "vi')  # an interrupted write
    c2 = TargetCache(tmp_path, "t")
    assert c2.table == {("a", 0): 0.2, ("a", 1): 0.9}
    assert c2.missing([("a", 0), ("b", 0)]) == [("b", 0)]


def test_every_tier_runs_each_tier_on_each_image_and_answers_as_the_last_exit(tmp_path):
    c = Bundle.load(tiny_bundle(tmp_path / "t")).cascade
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(16)]
    early = c.predict(imgs)
    assert any(len(p.trace.tiers) == 1 for p in early)  # the tiny cascade does stop some images at tier 0
    full = every_tier(c).predict(imgs)
    assert all(p.trace.tiers == ["tiny0", "tiny1"] and p.trace.exit == 1 for p in full)
    for a, b in zip(early, full):  # where the cascade also ran both tiers, the answer is the same
        if len(a.trace.tiers) == 2:
            assert a.probability == pytest.approx(b.probability)
    assert np.allclose(teacher_probs(c, imgs, "ensemble"), [p.calibrated for p in full])
    one = Bundle.load(tiny_bundle(tmp_path / "t1")).cascade
    single = type(one)(one.tiers[:1], one.exits[1:])
    assert every_tier(single) is single  # nothing to close


@pytest.mark.integration
def test_tiny_distill_run_writes_a_student_bundle_and_caches_targets(tmp_path):
    from conftest import DATA

    if not (DATA / "manifest.csv").exists():
        pytest.skip("StreetWork data not available")
    teacher = tiny_bundle(tmp_path / "teacher")
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    assert set(s.label for s in unlabelled_folder(folder).samples) == {-1}
    cfg = dict(teacher=str(teacher), student="lite0@64", extra=(str(folder),), epochs=1, batch_size=8, max_train=6,
               max_val=6, val_views=1, views=2, data=str(DATA), threads=2, cache=str(tmp_path / "cache"))
    res = distill(DistillConfig(**cfg), tmp_path / "s1", log=lambda *_: None)
    assert res.n_views == (6 + 3) * 2 and res.cached == 0
    b = Bundle.load(tmp_path / "s1")
    tier = b.cascade.tiers[0]
    assert isinstance(tier, ClassifierTier) and tier.input_size == 64 and b.meta["distill"]["teacher_tiers"] == ["tiny0", "tiny1"]
    p = b.cascade.predict_proba([rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)])
    assert 0.0 <= p[0] <= 1.0
    # a second run would not ask the teacher again: every (image, view) target is in the cache
    class NoTeacher:
        def predict(self, images):
            raise AssertionError("the teacher ran although its targets were cached")

    conf = DistillConfig(**cfg)
    cache = TargetCache(tmp_path / "cache", teacher_id(teacher, conf))
    assert len(cache.table) == res.n_views
    ds = unlabelled_folder(folder)
    got = fill_targets(cache, NoTeacher(), [s.key for s in ds.samples], [s.load() for s in ds.samples], conf)
    assert got.shape == (3, 2) and np.all((got > 0) & (got < 1))
    # the ensemble targets are what the teacher's full ensemble answers
    imgs = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(4)]
    full = teacher_probs(Bundle.load(teacher).cascade, imgs, "ensemble")
    assert full.shape == (4,) and np.all((full >= 0) & (full <= 1))
