"""Contract tests generated from the registries (as timm does for its models): every registered rule,
fusion and tier kind is parametrised here, so a new kind is tested the moment it is registered, and the
test fails until it has an example below (one line).

Rules: a boolean mask of the right length (also for no images), the same mask after a round trip
through the registry, the same answers through the runtime (states) and the replay (arrays), and for a
one-parameter family ``at(t)`` stopping exactly ``score >= t``. Fusions: a probability in [0, 1] per image,
unchanged by a round trip. Tiers: outputs of the right shape, capabilities that match the tier, the same
outputs after a round trip through the bundle format, and a run through the cascade.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_image

from roadcascade.cascade.calibration import TemperatureCalibrator, sigmoid
from roadcascade.cascade.runtime import Cascade, ClassifierTier, ExitPoint, TierCaps
from roadcascade.cascade.decision import decide
from roadcascade.detect.tier import EVIDENCE_FEATURES, ConeVerifyRule
from roadcascade.cascade.fusion import LastTierFusion, WeightedVoteFusion, fittable_fusions, make_fusion
from roadcascade.cascade.kinds import FUSIONS as _FUSIONS, RULES as _RULES, TIERS as _TIERS
from roadcascade.fit.policy import TierTable, replay, row_images, runtime_cascade
from roadcascade.cascade.registry import build
from roadcascade.cascade.rules import (
    AgreementRule, ConfidenceRule, DifficultyEstimator, DifficultyRule, EntropyRule, FinalRule, MarginRule, NeverRule,
    difficulty_features,
)

N = 60
CPU = torch.device("cpu")


def _package_kinds(table: dict[str, type]) -> dict[str, type]:
    """The kinds the package registers (test modules register stand-ins of their own, e.g. ``test_mean``)."""
    return {k: c for k, c in table.items() if c.__module__.startswith("roadcascade.")}


RULES, FUSIONS, TIERS = _package_kinds(_RULES), _package_kinds(_FUSIONS), _package_kinds(_TIERS)


def _arrays(seed: int = 0, n: int = N):
    """Two tiers' logits/probabilities, detector-style evidence on the second, a folded fused probability."""
    rng = np.random.default_rng(seed)
    L = rng.normal(0, 2.5, (n, 2))
    P = sigmoid(L)
    F = np.column_stack([rng.uniform(0, 1, n), rng.uniform(0, 1, (n, len(EVIDENCE_FEATURES) - 1))])
    folded = sigmoid(L.mean(axis=1))
    return folded, L, P, [None, F]


def _estimator() -> DifficultyEstimator:
    folded, L, P, feats = _arrays(1)
    return DifficultyEstimator().fit(difficulty_features(folded, L, P, feats), (np.abs(L[:, 0]) < 1.5).astype(float))


# one example per registered rule kind: a new kind fails test_every_kind_has_an_example until it has one
RULE_EXAMPLES = {
    "final": FinalRule,
    "never": NeverRule,
    "confidence": lambda: ConfidenceRule(0.3),
    "margin": lambda: MarginRule(1.2),
    "entropy": lambda: EntropyRule(0.7),
    "agreement": lambda: AgreementRule(1.5, (0.4, 0.6)),
    "difficulty": lambda: DifficultyRule(0.35, _estimator()),
    "cone_verify": lambda: ConeVerifyRule(low=0.3, high=0.7, tau=0.1),
}
FUSION_EXAMPLES = {
    "last": LastTierFusion,
    "vote": lambda: WeightedVoteFusion([0.3, 0.7]),
    "stacking": lambda: make_fusion("stacking").fit(_arrays(2)[1], _arrays(2)[2], (_arrays(2)[1].sum(1) > 0).astype(int)),
}


def test_every_kind_has_an_example():
    assert set(RULES) == set(RULE_EXAMPLES), "a new rule kind: add one example to RULE_EXAMPLES"
    assert set(FUSIONS) == set(FUSION_EXAMPLES), "a new fusion kind: add one example to FUSION_EXAMPLES"
    assert set(TIERS) == set(TIER_EXAMPLES), "a new tier kind: add one example to TIER_EXAMPLES"


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize("kind", sorted(RULES))
def test_rule_contract(kind):
    rule = RULE_EXAMPLES[kind]()
    assert rule.kind == kind and type(rule) is RULES[kind]
    folded, L, P, feats = _arrays()
    stop = rule.stop(folded, L, P, feats)
    assert stop.dtype == bool and stop.shape == (N,)
    assert rule.stop(folded[:0], L[:0], P[:0], [None, feats[1][:0]]).shape == (0,)
    again = build(RULES, "rule", rule.to_config())
    assert type(again) is type(rule) and np.array_equal(again.stop(folded, L, P, feats), stop)
    # the runtime (Cascade.run_stage over image states) and the replay (arrays) give the same answers
    table = TierTable(["a", "b", "c"], np.column_stack([L, L[:, :1] - 1]), np.column_stack([P, P[:, :1]]),
                      [0.2, 1.0, 3.0], 0.0, [0.5, 0.5, 0.5], np.arange(N) % 2, np.arange(N),
                      [None, feats[1], None])
    exits = [ExitPoint(LastTierFusion(), 0.5, rule if kind not in ("agreement", "difficulty") else ConfidenceRule(0.2)),
             ExitPoint(WeightedVoteFusion([0.5, 0.5]), 0.45, rule), ExitPoint(LastTierFusion(), 0.5, FinalRule())]
    rep = replay(exits, [0, 1, 2], table)
    preds = runtime_cascade(exits, [0, 1, 2], table).predict(row_images(N))
    assert np.array_equal(rep.exit, [p.trace.exit for p in preds])
    assert np.array_equal(rep.prob, [p.probability for p in preds])


@pytest.mark.parametrize("kind", [k for k in sorted(RULES) if RULES[k].family])
@pytest.mark.parametrize("q", [0.0, 0.3, 0.8])
def test_rule_family_contract(kind, q):
    """The optimiser searches ``score >= t``; the deployed member ``at(t)`` must stop exactly that set."""
    folded, L, P, feats = _arrays(3)
    est = _estimator()
    risk = est.predict_proba(difficulty_features(folded, L, P, feats))
    s = RULES[kind].score(folded, P, (0.45, 0.55), risk)
    thr = float(np.quantile(s[np.isfinite(s)], q, method="nearest"))
    rule = RULES[kind].at(thr, (0.45, 0.55), est)
    assert rule.kind == kind
    assert np.array_equal(rule.stop(folded, L, P, feats), s >= thr)


# ----------------------------------------------------------------------------- fusions


@pytest.mark.parametrize("kind", sorted(FUSIONS))
def test_fusion_contract(kind):
    fusion = FUSION_EXAMPLES[kind]()
    assert fusion.kind == kind and type(fusion) is FUSIONS[kind]
    _, L, P, _ = _arrays(4)
    p = fusion.prob(L, P)
    assert p.shape == (N,) and np.all((p >= 0) & (p <= 1))
    again = build(FUSIONS, "fusion", fusion.to_config())
    np.testing.assert_array_equal(again.prob(L, P), p)
    assert (kind in fittable_fusions()) == FUSIONS[kind].fittable
    d = decide(ExitPoint(fusion, 0.4, ConfidenceRule(0.2)), L, P)
    assert np.array_equal(d.stop, np.abs(d.probability - 0.5) >= 0.2) and np.array_equal(d.calibrated, p)


# ----------------------------------------------------------------------------- tiers


def _classifier(name: str = "tiny@64", seed: int = 0) -> ClassifierTier:
    from roadcascade.models.zoo import create_model

    torch.manual_seed(seed)
    model = create_model("test_tiny", num_classes=1, pretrained=False)
    cal = TemperatureCalibrator.from_dict({"temperature": 0.05, "threshold": 0.5})
    return ClassifierTier(name, "test_tiny", model, 64, (0.5,) * 3, (0.5,) * 3, cal, 0.01, device=CPU)


def _onnx_classifier(tmp_path: Path):
    from roadcascade.models.export import export_onnx
    from roadcascade.cascade.onnx_tier import OnnxClassifierTier, load_session

    src = _classifier()
    path = export_onnx(src.model, 64, tmp_path / "tiny@64.fp32.onnx")
    return OnnxClassifierTier(src.name, src.model_name, load_session(path), 64, src.mean, src.std, src.calibrator, src.gflops,
                              squares=2, onnx_file=path.name)


def _tta(tmp_path: Path):
    from roadcascade.cascade.tta import TTATier

    rng = np.random.default_rng(0)
    ims = [random_image(rng, 40, 56) for _ in range(24)]
    t = TTATier(_classifier(), n_min=2, n_max=4)
    return t.fit(t.view_logits(ims), np.arange(24) % 2, folds=2)


def _detector(tmp_path: Path):
    from roadcascade.detect.model import ConeDetector, DetectorConfig
    from roadcascade.detect.tier import DetectorTier

    torch.manual_seed(0)
    cfg = DetectorConfig(backbone="test_tiny", fpn_channels=64, head_convs=1, min_size=64, max_size=128, score_thresh=0.0,
                         detections_per_img=20)
    return DetectorTier("cones", ConeDetector(cfg, pretrained=False).eval(), gflops=0.5, device=CPU)


def _coco_context(tmp_path: Path):
    from roadcascade.detect.yolox import CocoContextTier, YoloxNano, default_model_path

    if not default_model_path().is_file():
        pytest.skip(f"YOLOX-Nano export not found at {default_model_path()}")
    return CocoContextTier(model=YoloxNano(default_model_path(), score_thr=0.1, threads=1))


def _zeroshot(tmp_path: Path):
    from roadcascade.open_models.local import LocalSource
    from roadcascade.open_models.tiny import tiny_clip
    from roadcascade.open_models.zeroshot import ZeroShotTier

    return ZeroShotTier("zs", LocalSource.of(tiny_clip(tmp_path / "clip")), device=CPU, batch_size=2,
                        calibrator=TemperatureCalibrator.from_dict({"temperature": 1.0, "threshold": 0.5}))


def _vlm(tmp_path: Path):
    from roadcascade.open_models.local import LocalSource
    from roadcascade.open_models.tiny import tiny_llava
    from roadcascade.open_models.vlm import VLMTier

    return VLMTier("vlm", LocalSource.of(tiny_llava(tmp_path / "llava")), device=CPU, batch_size=2,
                   calibrator=TemperatureCalibrator.from_dict({"temperature": 1.0, "threshold": 0.5}))


TIER_EXAMPLES = {
    "classifier": lambda tmp_path: _classifier(),
    "onnx_classifier": _onnx_classifier,
    "zeroshot": _zeroshot,
    "vlm": _vlm,
    "tta": _tta,
    "detector": _detector,
    "coco_context": _coco_context,
}


@pytest.mark.parametrize("kind", sorted(TIERS))
def test_tier_contract(kind, tmp_path):
    tier = TIER_EXAMPLES[kind](tmp_path)
    assert tier.kind == kind and type(tier) is TIERS[kind]
    rng = np.random.default_rng(1)
    images = [random_image(rng, h, w) for h, w in ((48, 64), (64, 48), (40, 40))]
    out = tier.run(images)
    assert len(out) == 3 and out.prob.shape == (3,) and np.isfinite(out.logits).all()
    assert np.all((out.prob >= 0) & (out.prob <= 1))
    assert out.features is None or out.features.shape[0] == 3
    caps = tier.caps()
    assert isinstance(caps, TierCaps) and caps.gflops == pytest.approx(tier.gflops)
    assert caps.decode_size == tier.decode_size()
    if caps.tensor_input is not None or caps.square_input is not None:  # what the GPU engine uses of such a tier
        assert all(hasattr(tier, a) for a in ("model", "mean", "std", "calibrator"))
    assert caps.tensor_input is None or caps.square_input is None  # one or the other: all rows, or single views
    if caps.reads_earlier:  # with no earlier tier that it can reuse, run_after is run
        np.testing.assert_allclose(tier.run_after(images, ["other"], np.zeros((3, 1))).logits, out.logits, rtol=1e-6)
    again = build(TIERS, "tier", tier.to_config(tmp_path), bundle_dir=tmp_path, device=CPU)
    np.testing.assert_allclose(again.run(images).logits, out.logits, rtol=1e-4, atol=1e-5)
    preds = Cascade([tier], [ExitPoint(LastTierFusion(), 0.5, FinalRule())]).predict(images)
    assert [p.trace.tiers for p in preds] == [[tier.name]] * 3
    np.testing.assert_allclose([p.probability for p in preds], out.prob, rtol=1e-6, atol=1e-9)
