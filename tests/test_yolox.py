"""YOLOX-Nano: letterbox, grid/stride decoding and post-processing against hand-computed cases, then
the real ONNX export on an image made for the test (a drawn stop sign, which YOLOX-Nano detects)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from roadcascade.detect.boxes import box_iou
from roadcascade.detect.yolox import (
    COCO_CLASSES,
    CONTEXT_FEATURES,
    CocoContextTier,
    YoloxNano,
    context_features,
    decode_outputs,
    default_model_path,
    letterbox,
    looks_decoded,
    make_grids,
    postprocess,
)

STOP = COCO_CLASSES.index("stop sign")
TRUCK = COCO_CLASSES.index("truck")


def test_grids_follow_the_export_order():
    g, s = make_grids(416)
    assert g.shape == (3549, 2) and s.shape == (3549, 1)
    # stride 8 first (52 x 52, x fastest), then 16 (26 x 26), then 32 (13 x 13)
    np.testing.assert_array_equal(g[:3], [[0, 0], [1, 0], [2, 0]])
    np.testing.assert_array_equal(g[52], [0, 1])
    assert s[2703, 0] == 8 and s[2704, 0] == 16 and s[3379, 0] == 16 and s[3380, 0] == 32
    np.testing.assert_array_equal(g[2704 + 26 * 5 + 3], [3, 5])
    np.testing.assert_array_equal(g[-1], [12, 12])


def _raw_with_one_truck() -> np.ndarray:
    raw = np.zeros((1, 3549, 85), np.float32)
    raw[0, :, 2:4] = -3.0  # tiny boxes everywhere, objectness 0
    i = 2704 + 26 * 5 + 3  # stride 16, cell (x=3, y=5)
    raw[0, i, :4] = [0.5, 0.25, math.log(2.0), 0.0]
    raw[0, i, 4] = 0.9
    raw[0, i, 5 + TRUCK] = 0.8
    raw[0, i, 5 + 0] = 0.5  # a weaker "person" score on the same point: the best class wins
    return raw


def test_decode_hand_computed():
    dec = decode_outputs(_raw_with_one_truck())
    i = 2704 + 26 * 5 + 3
    # cx = (0.5 + 3) * 16, cy = (0.25 + 5) * 16, w = e^ln2 * 16, h = e^0 * 16
    np.testing.assert_allclose(dec[0, i, :4], [56.0, 84.0, 32.0, 16.0], rtol=1e-6)
    np.testing.assert_allclose(dec[0, 0, :2], [0.0, 0.0])  # (0 + 0) * 8
    np.testing.assert_allclose(dec[0, -1, :2], [384.0, 384.0])  # (0 + 12) * 32
    assert not looks_decoded(_raw_with_one_truck()) and looks_decoded(dec)


def test_postprocess_maps_back_through_the_letterbox():
    dec = decode_outputs(_raw_with_one_truck())[0]
    # an 832 x 1000 image is letterboxed with r = 416 / 1000
    r = 416 / 1000
    d = postprocess(dec, r, (832, 1000), score_thr=0.25)
    assert len(d) == 1 and d.labels[0] == TRUCK
    assert d.scores[0] == pytest.approx(0.72)
    np.testing.assert_allclose(d.boxes[0], np.array([40, 76, 72, 92]) / r, rtol=1e-5)
    assert len(postprocess(dec, r, (832, 1000), score_thr=0.75)) == 0


def test_postprocess_nms_is_class_aware():
    dec = np.zeros((3549, 85), np.float32)
    dec[:, 2:4] = 1.0
    for i, (c, s) in enumerate(((TRUCK, 0.9), (TRUCK, 0.8), (0, 0.7))):
        dec[100 + i, :4] = [100 + i, 100, 40, 40]
        dec[100 + i, 4] = 1.0
        dec[100 + i, 5 + c] = s
    d = postprocess(dec, 1.0, (416, 416), score_thr=0.1, nms_thr=0.45)
    got = sorted(zip(d.labels.tolist(), d.scores.tolist()))
    assert [lab for lab, _ in got] == [0, TRUCK] and [s for _, s in got] == pytest.approx([0.7, 0.9])
    d = postprocess(dec, 1.0, (416, 416), score_thr=0.1, nms_thr=0.45, class_agnostic=True)
    assert d.labels.tolist() == [TRUCK]


def test_letterbox_top_left_bgr_114():
    img = np.zeros((100, 200, 3), np.uint8)
    img[..., 0] = 255  # pure red in RGB
    x, r = letterbox(img, 416)
    assert x.shape == (1, 3, 416, 416) and x.dtype == np.float32
    assert r == pytest.approx(2.08)
    # resized to 416 x 208 at the top; BGR: red is channel 2
    assert (x[0, 2, :208, :] == 255).all() and (x[0, 0, :208, :] == 0).all()
    assert (x[0, :, 208:, :] == 114).all()
    assert x.max() == 255.0  # no normalisation


# ----------------------------------------------------------------------------- the real export


def stop_sign_image(w: int, h: int, cx: float, cy: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """A red octagon with a white rim and "STOP" on a plain background, and its bounding box."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (w, h), (150, 170, 190))
    d = ImageDraw.Draw(im)
    d.rectangle([cx - 6, cy, cx + 6, h], fill=(110, 110, 110))

    def octagon(rad):
        return [(cx + rad * math.cos(math.radians(22.5 + 45 * k)), cy + rad * math.sin(math.radians(22.5 + 45 * k))) for k in range(8)]

    d.polygon(octagon(radius), fill=(255, 255, 255))
    d.polygon(octagon(radius * 0.9), fill=(200, 16, 30))
    d.text((cx, cy), "STOP", fill=(255, 255, 255), font=ImageFont.load_default(size=int(radius * 0.55)), anchor="mm")
    e = radius * math.cos(math.radians(22.5))
    return np.asarray(im), np.array([[cx - e, cy - e, cx + e, cy + e]], np.float32)


@pytest.fixture(scope="module")
def yolox() -> YoloxNano:
    p = default_model_path()
    if not p.is_file():
        pytest.skip(f"YOLOX-Nano export not found at {p}")
    return YoloxNano(p, score_thr=0.1, threads=1)


@pytest.mark.parametrize(
    "w,h,cx,cy,radius",
    [(416, 320, 200, 150, 80), (640, 360, 470, 110, 70), (300, 500, 110, 330, 60)],
)
def test_yolox_nano_finds_a_drawn_stop_sign(yolox, w, h, cx, cy, radius):
    img, box = stop_sign_image(w, h, cx, cy, radius)
    d = yolox.detect_one(img)
    assert yolox.decoded is False  # the shared export leaves grid/stride decoding to us
    assert len(d) >= 1 and d.labels[0] == STOP and d.scores[0] > 0.6, list(zip(d.labels, d.scores))
    # the letterbox is undone: the box lands on the octagon in the original image's pixels
    assert box_iou(d.boxes[:1], box)[0, 0] > 0.8, (d.boxes[0], box)
    assert (d.scores[d.labels == STOP] > 0.3).sum() == 1  # NMS left one


def test_yolox_without_decoding_would_miss(yolox):
    """The guard itself: treating the raw export as decoded gives no stop sign where it is."""
    img, box = stop_sign_image(416, 320, 200, 150, 80)
    raw, r = yolox.raw(img)
    wrong = postprocess(raw[0], r, img.shape[:2], score_thr=0.1)
    hit = [b for b, lab in zip(wrong.boxes, wrong.labels) if lab == STOP and box_iou(b[None], box)[0, 0] > 0.5]
    assert not hit


def test_coco_context_tier_features_and_config(yolox, tmp_path: Path):
    from roadcascade.detect.tier import LogisticScorer

    img, _ = stop_sign_image(416, 320, 200, 150, 80)
    blank = np.full((240, 320, 3), 128, np.uint8)
    f = context_features([yolox.detect_one(img), yolox.detect_one(blank)], count_threshold=0.3)
    row = dict(zip(CONTEXT_FEATURES, f[0].tolist()))
    assert row["n_stop_sign"] == 1 and row["max_stop_sign"] > 0.6 and row["n_all"] >= 1
    assert f[1].sum() == 0

    tier = CocoContextTier(model=yolox)
    x = np.array([[0] * 7 + [1, 0, 0, 0, 0.9, 1], [0] * 13], np.float32)
    tier.scorer = LogisticScorer(log_columns=tier.scorer.log_columns).fit(np.repeat(x, 5, 0), np.array([1, 0] * 5))
    out = tier.run([img, blank])
    assert out.features.shape == (2, len(CONTEXT_FEATURES)) and out.prob[0] > out.prob[1]
    cfg = tier.to_config(tmp_path)
    assert cfg["kind"] == "coco_context" and cfg["features"] == list(CONTEXT_FEATURES) and cfg["decoded"] is False
    again = CocoContextTier.from_config(cfg, tmp_path)
    np.testing.assert_allclose(again.run([img, blank]).logits, out.logits, rtol=1e-5)
