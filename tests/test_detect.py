"""Detection part: box maths and NMS against hand-computed cases, COCO mAP on hand-made cases, the
augmentation keeping boxes on their objects, the detector tier's evidence features and the
cone-verification rule. The tiny training run that overfits a few images is in test_detect_train.py."""

from __future__ import annotations

import numpy as np
import pytest

from roadcascade.cascade.runtime import ImageState, state_arrays
from roadcascade.detect.boxes import batched_nms, box_iou, cxcywh_to_xyxy, nms, xyxy_to_yolo, yolo_to_xyxy
from roadcascade.detect.evaluate import _match, coco_map, negative_false_positives, operating_point
from roadcascade.detect.model import Detections
from roadcascade.detect.tier import EVIDENCE_FEATURES, ConeVerifyRule, EvidenceConfig, LogisticScorer, evidence_features
from roadcascade.detect.train import augment_detection, make_config


def dets(boxes, scores, hw=(100, 200), labels=None) -> Detections:
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float32)
    lab = np.zeros(len(s), np.int64) if labels is None else np.asarray(labels, np.int64)
    return Detections(b, s, lab, hw)


# ----------------------------------------------------------------------------- boxes


def test_yolo_to_xyxy_and_back():
    # a 200 x 100 image; box centred at (50, 25), 40 x 20 px
    b = yolo_to_xyxy([[0.25, 0.25, 0.2, 0.2]], width=200, height=100)
    np.testing.assert_allclose(b, [[30, 15, 70, 35]])
    np.testing.assert_allclose(xyxy_to_yolo(b, 200, 100), [[0.25, 0.25, 0.2, 0.2]])
    # clipped to the image
    np.testing.assert_allclose(yolo_to_xyxy([[0.0, 1.0, 0.2, 0.2]], 200, 100), [[0, 90, 20, 100]])
    assert yolo_to_xyxy([], 10, 10).shape == (0, 4)
    np.testing.assert_allclose(cxcywh_to_xyxy([[10, 20, 4, 6]]), [[8, 17, 12, 23]])


def test_box_iou_hand_computed():
    a = [[0, 0, 10, 10]]
    b = [[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]]
    # overlap 50 / union 150; identical; disjoint; contained 25 / 100
    np.testing.assert_allclose(box_iou(a, b), [[1 / 3, 1.0, 0.0, 0.25]])
    assert box_iou(a, [[3, 3, 3, 3]])[0, 0] == 0.0  # empty box: no division by zero


def test_nms_hand_computed():
    boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 5]]
    scores = [0.9, 0.8, 0.7, 0.95]
    # IoU(0,1) = 90/110 = 0.818; IoU(3,0) = 0.5; IoU(3,1) = 45/105 = 0.43
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [3, 0, 2])  # 0.5 is not > 0.5: box 0 survives box 3
    np.testing.assert_array_equal(nms(boxes, scores, 0.45), [3, 1, 2])  # box 0 goes (0.5 > 0.45), then box 1 stays
    np.testing.assert_array_equal(nms(boxes, scores, 0.9), [3, 0, 1, 2])
    assert len(nms(np.zeros((0, 4)), [], 0.5)) == 0


def test_batched_nms_keeps_other_classes():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    keep = batched_nms(boxes, [0.5, 0.9, 0.7], [0, 0, 1], 0.5)
    np.testing.assert_array_equal(keep, [1, 2])


def test_nms_matches_torchvision():
    import torch
    from torchvision.ops import nms as tv_nms

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (60, 2))
    wh = rng.uniform(5, 40, (60, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.uniform(0, 1, 60)
    for t in (0.3, 0.5, 0.7):
        ref = tv_nms(torch.tensor(boxes), torch.tensor(scores), t).numpy()
        np.testing.assert_array_equal(nms(boxes, scores, t), ref)


# ----------------------------------------------------------------------------- mAP


@pytest.mark.parametrize("backend", ["pycocotools", "numpy"])
def test_coco_map_hand_cases(backend):
    if backend == "pycocotools":
        pytest.importorskip("pycocotools")
    import functools

    coco = functools.partial(coco_map, backend=backend)
    gt = [np.array([[0, 0, 100, 100]], np.float32)]
    perfect = coco(gt, [dets([[0, 0, 100, 100]], [0.9], (200, 200))])
    assert perfect["map50"] == pytest.approx(1.0) and perfect["map"] == pytest.approx(1.0)
    # IoU 0.72: matched at thresholds .50 .55 .60 .65 .70 (5 of 10) -> mAP 0.5, mAP@0.5 1
    r = coco(gt, [dets([[0, 0, 100, 72]], [0.9], (200, 200))])
    assert r["map50"] == pytest.approx(1.0) and r["map"] == pytest.approx(0.5)
    # a higher-scoring false positive ahead of the true one: precision 1/2 at recall 1 -> AP 0.5
    r = coco(gt, [dets([[150, 150, 190, 190], [0, 0, 100, 100]], [0.9, 0.8], (200, 200))])
    assert r["map50"] == pytest.approx(0.5)
    # no detections at all
    assert coco(gt, [Detections.empty((200, 200))])["map50"] == 0.0


def test_match_operating_point_and_negatives():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    d = dets([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 31]], [0.9, 0.6, 0.3])
    assert _match(gt, d, 0.5) == (1, 1, 1)
    assert _match(gt, d, 0.2) == (2, 1, 0)
    op = operating_point([gt], [d], lo=0.2, hi=0.8)
    assert op["threshold"] <= 0.3 and op["f1"] == pytest.approx(0.8)
    neg = negative_false_positives([dets([[0, 0, 1, 1]], [0.7]), Detections.empty((10, 10)), dets([[0, 0, 1, 1]] * 2, [0.2, 0.9])], 0.5)
    assert neg["images_with_fp"] == pytest.approx(2 / 3) and neg["fp_per_image"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_keeps_boxes_on_their_objects():
    """Orange boxes drawn on grey: after crop/flip/colour/JPEG, each returned box still covers orange."""
    img = np.full((120, 200, 3), 90, np.uint8)
    boxes = np.array([[20, 30, 50, 90], [120, 10, 180, 60]], np.float32)
    for b in boxes.astype(int):
        img[b[1] : b[3], b[0] : b[2]] = (255, 120, 0)
    cfg = make_config("cpu", crop_prob=1.0, color_prob=0.0, distort_prob=0.0, jpeg_prob=0.0)
    flipped = 0
    for seed in range(40):
        out, ob = augment_detection(img, boxes, np.random.default_rng(seed), cfg)
        assert ob.shape[1] == 4 and len(ob) >= 1
        for b in ob.round().astype(int):
            assert b[2] > b[0] and b[3] > b[1]
            patch = out[b[1] : b[3], b[0] : b[2]].reshape(-1, 3).astype(float)
            assert patch[:, 0].mean() > 240 and patch[:, 2].mean() < 15, (seed, b)
        flipped += int(any(b[0] > 60 and b[3] > 50 and (b[3] - b[1]) > 1.5 * (b[2] - b[0]) for b in ob))
    assert flipped > 0  # the tall box ended up on the right: flips happened and boxes followed


# ----------------------------------------------------------------------------- evidence


def test_evidence_features_hand_computed():
    # a 100 x 200 (h x w) image with three cones; count threshold 0.5
    d = dets([[10, 60, 30, 100], [150, 10, 170, 30], [100, 50, 120, 90]], [0.9, 0.6, 0.3], hw=(100, 200))
    f = evidence_features([d, Detections.empty((50, 50))], EvidenceConfig(count_threshold=0.5))
    assert f.shape == (2, len(EVIDENCE_FEATURES)) and f.dtype == np.float32
    row = dict(zip(EVIDENCE_FEATURES, f[0].tolist()))
    assert row["max_score"] == pytest.approx(0.9)
    assert row["second_score"] == pytest.approx(0.6)
    assert row["count"] == 2
    assert row["score_mass"] == pytest.approx(1.8)
    assert row["area_share"] == pytest.approx((20 * 40 + 20 * 20) / (100 * 200))
    assert row["top_cx"] == pytest.approx(20 / 200) and row["top_cy"] == pytest.approx(80 / 100)
    assert row["top_h"] == pytest.approx(0.4)
    assert row["lower_share"] == pytest.approx(0.5)  # the 0.9 cone is low, the 0.6 one high
    empty = dict(zip(EVIDENCE_FEATURES, f[1].tolist()))
    assert empty["max_score"] == 0 and empty["count"] == 0 and empty["top_cx"] == 0.5 and empty["top_cy"] == 0.5


def test_logistic_scorer_fits_and_round_trips():
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    x = np.zeros((n, len(EVIDENCE_FEATURES)), np.float32)
    x[:, 0] = np.clip(0.6 * y + rng.normal(0.2, 0.15, n), 0, 1)
    x[:, 2] = rng.poisson(2 * y)
    s = LogisticScorer().fit(x, y)
    p = s.prob(x)
    assert p[y == 1].mean() > p[y == 0].mean() + 0.3
    s2 = LogisticScorer.from_dict(s.to_dict())
    np.testing.assert_allclose(s2.logit(x), s.logit(x))
    # unfitted: the logit of the max score
    np.testing.assert_allclose(LogisticScorer().prob(np.array([[0.8] + [0] * 8])), [0.8], atol=1e-6)


def _state(p_classifier: float, max_score: float) -> ImageState:
    s = ImageState(image=np.zeros((2, 2, 3), np.uint8))
    s.logits = [0.0, 0.0]
    s.probs = [p_classifier, 0.5]
    s.features = [None, np.array([max_score] + [0.0] * 8, np.float32)]
    return s


def test_cone_verify_rule_escalates_disagreements():
    rule = ConeVerifyRule(low=0.2, high=0.6)
    states = [_state(0.9, 0.05), _state(0.9, 0.8), _state(0.1, 0.9), _state(0.1, 0.1), _state(0.9, 0.3)]
    # roadwork+no cones -> escalate; roadwork+cones -> stop; none+strong cones -> escalate; none+none -> stop;
    # roadwork+weak cones (between low and high) -> stop
    np.testing.assert_array_equal(rule.stop(np.full(5, 0.9), *state_arrays(states)), [False, True, False, True, True])
    tau = ConeVerifyRule(low=0.2, high=0.6, tau=0.3)
    np.testing.assert_array_equal(tau.stop(np.array([0.9, 0.6, 0.9, 0.1, 0.9]), *state_arrays(states)), [False, False, False, True, True])
    again = ConeVerifyRule.from_config(rule.to_config())
    assert again.to_config() == rule.to_config()


def test_numpy_map_equals_pycocotools():
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(3)
    for trial in range(6):
        gts, ds = [], []
        for _ in range(int(rng.integers(3, 9))):
            n = int(rng.integers(0, 5))
            xy = rng.uniform(0, 150, (n, 2))
            g = np.concatenate([xy, xy + rng.uniform(6, 60, (n, 2))], 1).astype(np.float32)
            # detections: jittered copies of some ground truth, plus clutter; some tied scores
            keep = g[rng.random(n) < 0.8]
            jit = keep + rng.normal(0, 4 + 3 * trial, keep.shape)
            m = int(rng.integers(0, 5))
            cxy = rng.uniform(0, 150, (m, 2))
            clutter = np.concatenate([cxy, cxy + rng.uniform(6, 60, (m, 2))], 1)
            b = np.concatenate([jit, clutter]).astype(np.float32).reshape(-1, 4)
            b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
            s = np.round(rng.uniform(0, 1, len(b)), 1).astype(np.float32)
            gts.append(g)
            ds.append(dets(b, s, (220, 220)))
        ref = coco_map(gts, ds, backend="pycocotools")
        got = coco_map(gts, ds, backend="numpy")
        for k in ("map", "map50", "map75", "mar100"):
            assert got[k] == pytest.approx(ref[k], abs=1e-9), (trial, k, got, ref)


def test_cone_verify_rule_arrays_match_states():
    rule = ConeVerifyRule(low=0.2, high=0.6, tau=0.1)
    rng = np.random.default_rng(1)
    states = [_state(float(p), float(m)) for p, m in rng.uniform(0, 1, (50, 2))]
    folded = rng.uniform(0, 1, 50)
    probs = np.array([s.probs for s in states])
    feats = [None, np.stack([s.features[1] for s in states])]
    np.testing.assert_array_equal(rule.stop(folded, *state_arrays(states)), rule.stop(folded, None, probs, feats))
    # no detector features yet (the rule placed before the detector ran): only confidence decides
    np.testing.assert_array_equal(rule.stop(folded, None, probs, [None, None]), np.abs(folded - 0.5) >= 0.1)


def _tiny_detector():
    """A randomly initialised tiny detector (seeded) that keeps every detection, in eval mode."""
    import torch

    from roadcascade.detect.model import ConeDetector, DetectorConfig

    torch.manual_seed(0)
    cfg = DetectorConfig(backbone="test_tiny", fpn_channels=64, head_convs=1, min_size=64, max_size=128, score_thresh=0.0,
                         detections_per_img=20)
    return ConeDetector(cfg, pretrained=False).eval()


def test_detections_do_not_depend_on_batch_company():
    """Images are batched only with same-size images: padding never changes an image's detections."""
    m = _tiny_detector()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)
    alone = m.detect([a])[0]
    mixed = m.detect([b, a, b], batch_size=3)
    assert [d.image_size for d in mixed] == [(90, 60), (48, 80), (90, 60)]
    np.testing.assert_allclose(mixed[1].scores, alone.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed[1].boxes, alone.boxes, rtol=1e-4, atol=1e-3)
    assert len(alone) > 0 and (alone.boxes[:, 2] <= 80 + 1e-3).all() and (alone.boxes[:, 3] <= 48 + 1e-3).all()


@pytest.mark.parametrize("cap", [None, 96, 200])
def test_native_cap_sizes_are_bounded_and_grow_with_the_photo(cap):
    """Short side: min_size for small images, the image's own in between, never above the cap; the long-side cap
    grows with it (same aspect budget). Without a cap every image gets (min_size, max_size)."""
    from roadcascade.detect.model import DetectorConfig

    cfg = DetectorConfig(backbone="test_tiny", min_size=64, max_size=128, native_cap=cap)
    last = 0
    for short in (32, 64, 80, 96, 150, 200, 400):
        s, m = cfg.sizes_for(short, int(short * 1.7))
        assert cfg.sizes_for(int(short * 1.7), short) == (s, m)  # portrait and landscape alike
        if cap is None:
            assert (s, m) == (64, 128)
            continue
        assert 64 <= s <= max(64, cap) and s >= last and m >= 128 and m / s == pytest.approx(128 / 64, abs=0.02)
        assert s == max(64, min(short, cap))
        last = s


def test_native_cap_sees_large_photos_larger_and_leaves_the_transform_as_it_was():
    """With a cap, a large image is detected at its own short side (boxes still in its pixel coordinates), a small
    one as before; the transform's sizes are put back after every call."""
    from roadcascade.detect.model import DetectorConfig

    m = _tiny_detector()
    base = m.cfg
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    large = rng.integers(0, 256, (160, 272, 3), dtype=np.uint8)
    plain_small, plain_large = m.detect([small])[0], m.detect([large])[0]
    seen = []
    orig = m.fcos.transform.resize
    m.fcos.transform.resize = lambda im, t: (seen.append(tuple(m.fcos.transform.min_size)), orig(im, t))[1]
    m.cfg = base.replace(native_cap=160)
    capped_small, capped_large = m.detect([small, large])
    assert sorted(seen) == [(64,), (160,)]
    assert m.fcos.transform.min_size == (64,) and m.fcos.transform.max_size == 128
    np.testing.assert_allclose(capped_small.scores, plain_small.scores, rtol=1e-5, atol=1e-6)
    assert len(capped_large) and (capped_large.boxes[:, 2] <= 272 + 1e-3).all() and (capped_large.boxes[:, 3] <= 160 + 1e-3).all()
    assert not (len(capped_large) == len(plain_large) and np.allclose(capped_large.scores, plain_large.scores))
    assert DetectorConfig.from_dict(m.cfg.to_dict()).native_cap == 160  # stored with the tier's detector config
