"""The cascade runtime with deterministic stand-in tiers (real tiers are tested in the integration test)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roadcascade.cascade.calibration import fold, sigmoid
from roadcascade.cascade.runtime import (
    TIERS, Cascade, ConfidenceRule, ExitPoint, FinalRule, ImageState, LastTierFusion, Tier, TierOutput, register_tier,
)


@register_tier
class MeanTier(Tier):
    """logit = scale * (mean pixel / 255 - offset); a real, deterministic function of the image."""

    kind = "test_mean"

    def __init__(self, name, scale=10.0, offset=0.5, gflops=1.0):
        self.name, self.scale, self.offset, self.gflops = name, scale, offset, gflops
        self.calls: list[int] = []

    def run(self, images):
        self.calls.append(len(images))
        z = np.array([self.scale * (im.mean() / 255 - self.offset) for im in images])
        return TierOutput(logits=z, prob=sigmoid(z), ms=1.0)

    def to_config(self, bundle_dir):
        return {"kind": self.kind, "name": self.name, "scale": self.scale, "offset": self.offset, "gflops": self.gflops}

    @classmethod
    def from_config(cls, cfg, bundle_dir, device):
        return cls(cfg["name"], cfg["scale"], cfg["offset"], cfg["gflops"])


def make_cascade(tau=0.3, t0=0.5, t1=0.4):
    tiers = [MeanTier("small", 4.0, 0.5, 1.0), MeanTier("big", 12.0, 0.45, 5.0)]
    exits = [ExitPoint(LastTierFusion(), t0, ConfidenceRule(tau)), ExitPoint(LastTierFusion(), t1, FinalRule())]
    return Cascade(tiers, exits)


def images(seed, n):
    rng = np.random.default_rng(seed)
    return [np.full((8, 8, 3), rng.integers(0, 256), dtype=np.uint8) for _ in range(n)]


@given(st.integers(0, 1000), st.integers(1, 40), st.floats(0.0, 0.5))
@settings(max_examples=40, deadline=None)
def test_batched_equals_unbatched(seed, n, tau):
    c = make_cascade(tau)
    ims = images(seed, n)
    batched = c.predict(ims)
    single = [c.predict([im])[0] for im in ims]
    for a, b in zip(batched, single):
        assert a.probability == b.probability
        assert a.trace.tiers == b.trace.tiers and a.trace.rule == b.trace.rule and a.trace.exit == b.trace.exit


def test_each_tier_runs_once_per_batch_on_undecided_only():
    c = make_cascade(0.3)
    ims = images(1, 50)
    preds = c.predict(ims)
    n_deferred = sum(p.trace.exit == 1 for p in preds)
    assert c.tiers[0].calls == [50]
    assert c.tiers[1].calls == ([n_deferred] if n_deferred else [])
    # exit 0 answers are confident, exit 1 answers come from the big tier
    for p in preds:
        assert p.trace.tiers == (["small"] if p.trace.exit == 0 else ["small", "big"])
        if p.trace.exit == 0:
            assert abs(p.probability - 0.5) >= 0.3 and p.trace.rule == "confidence"
        else:
            assert p.trace.rule == "final"


def test_fold_applied_per_exit():
    c = make_cascade(tau=1.0, t1=0.3)  # everything goes to the big tier
    im = images(2, 1)
    p = c.predict(im)[0]
    z = 12.0 * (im[0].mean() / 255 - 0.45)
    assert p.probability == pytest.approx(float(fold(sigmoid(np.array([z])), 0.3)[0]))
    assert p.calibrated == pytest.approx(float(sigmoid(np.array([z]))[0]))
    assert p.label == int(p.probability > 0.5)


def test_anytime_answer_after_first_stage():
    c = make_cascade(tau=1.0)
    s = ImageState(image=images(3, 1)[0])
    with pytest.raises(ValueError, match="no tier has run"):
        c.answer(s)
    c.run_stage(0, [s])
    assert not s.done
    a = c.answer(s)
    assert a.trace.anytime and a.trace.rule == "deadline" and a.trace.tiers == ["small"]


def test_run_stage_rejects_wrong_stage():
    c = make_cascade()
    s = ImageState(image=images(4, 1)[0])
    with pytest.raises(ValueError):
        c.run_stage(1, [s])


def test_mean_gflops():
    c = make_cascade()
    assert c.mean_gflops([1.0, 0.0]) == 1.0
    assert c.mean_gflops([0.0, 1.0]) == 6.0
    assert c.mean_gflops([0.75, 0.25]) == pytest.approx(1.0 + 0.25 * 5.0)


def test_config_roundtrip(tmp_path: Path):
    c = make_cascade(0.2, 0.45, 0.35)
    cfg = c.to_config(tmp_path)
    c2 = Cascade.from_config(cfg, tmp_path, device=None)
    ims = images(5, 20)
    assert [p.probability for p in c.predict(ims)] == [p.probability for p in c2.predict(ims)]


def test_unknown_kind_is_clear(tmp_path):
    cfg = make_cascade().to_config(tmp_path)
    cfg["exits"][0]["rule"]["kind"] = "telepathy"
    with pytest.raises(ValueError, match="unknown rule kind 'telepathy'"):
        Cascade.from_config(cfg, tmp_path, device=None)


def test_needs_one_exit_per_tier():
    with pytest.raises(ValueError, match="one exit point per tier"):
        Cascade([MeanTier("a")], [])
