"""Aspect-preserving square views for non-square images (ClassifierTier(squares=k)): the geometry, the
max-pooling, the bundle round trip and validation, and the GPU runtime (on the CPU) agreeing with it."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from roadcascade.cascade.bundle import Bundle, BundleError
from roadcascade.cascade.calibration import TemperatureCalibrator
from roadcascade.cascade.runtime import SQUARE_TOLERANCE, Cascade, ClassifierTier, ExitPoint, FinalRule, LastTierFusion, square_views
from roadcascade.models.zoo import create_model


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(4, 300), st.integers(4, 300)), min_size=1, max_size=6), st.integers(2, 5))
def test_square_views_geometry(shapes, k):
    images = [_img(h, w, i) for i, (h, w) in enumerate(shapes)]
    views, owner = square_views(images, k)
    assert len(views) == len(owner) and sorted(set(owner.tolist())) == list(range(len(images)))
    for i, im in enumerate(images):
        mine = [v for v, o in zip(views, owner) if o == i]
        h, w = im.shape[:2]
        if max(h, w) <= SQUARE_TOLERANCE * min(h, w):  # near-square: the image itself, once
            assert len(mine) == 1 and mine[0] is im
            continue
        assert len(mine) == k
        s = min(h, w)
        assert all(v.shape == (s, s, 3) for v in mine)
        # the first and last squares sit at the two ends of the long side, and together they cover it
        if h > w:
            assert np.array_equal(mine[0], im[:s]) and np.array_equal(mine[-1], im[h - s :])
        else:
            assert np.array_equal(mine[0], im[:, :s]) and np.array_equal(mine[-1], im[:, w - s :])


def _tier(squares: int, size: int = 48) -> ClassifierTier:
    torch.manual_seed(0)
    model = create_model("test_tiny", num_classes=1, pretrained=False)
    cal = TemperatureCalibrator.from_dict({"temperature": 0.01, "threshold": 0.5})
    return ClassifierTier("tiny@48", "test_tiny", model, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cal, 0.01,
                          device=torch.device("cpu"), squares=squares)


def test_logits_are_the_max_over_square_views():
    t1, t3 = _tier(1), _tier(3)
    images = [_img(60, 150, 1), _img(64, 64, 2), _img(200, 90, 3)]
    z3 = t3.logits(images)
    views, owner = square_views(images, 3)
    zv = t1.logits(views)  # the same network, one logit per view
    for i in range(len(images)):
        assert z3[i] == pytest.approx(zv[owner == i].max(), abs=1e-6)
    assert z3[1] == pytest.approx(t1.logits([images[1]])[0], abs=1e-6)  # a square image is seen as before
    assert z3[0] != pytest.approx(t1.logits([images[0]])[0], abs=1e-4)  # a wide one is not stretched any more


def test_squares_round_trip_and_validation(tmp_path):
    casc = Cascade([_tier(3)], [ExitPoint(LastTierFusion(), 0.5, FinalRule())])
    Bundle(casc, {}).save(tmp_path / "b")
    doc = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert doc["tiers"][0]["squares"] == 3
    back = Bundle.load(tmp_path / "b", device="cpu")
    assert back.cascade.tiers[0].squares == 3
    img = [_img(50, 120, 5)]
    assert back.cascade.predict(img)[0].probability == pytest.approx(casc.predict(img)[0].probability, abs=1e-6)
    Bundle(Cascade([_tier(1)], [ExitPoint(LastTierFusion(), 0.5, FinalRule())]), {}).save(tmp_path / "plain")
    assert "squares" not in json.loads((tmp_path / "plain" / "bundle.json").read_text())["tiers"][0]  # old format kept
    for bad in (0, 9, "3", 2.5):
        doc["tiers"][0]["squares"] = bad
        (tmp_path / "b" / "bundle.json").write_text(json.dumps(doc))
        with pytest.raises(BundleError, match="squares"):
            Bundle.load(tmp_path / "b", device="cpu")
    with pytest.raises(ValueError, match="squares"):
        _tier(0)


def test_gpu_runtime_on_cpu_agrees_with_square_pooling():
    from roadcascade.accel.runtime import GpuCascade
    from roadcascade.io.images import decode_bytes, encode_jpeg

    casc = Cascade([_tier(3)], [ExitPoint(LastTierFusion(), 0.5, FinalRule())])
    payloads = [encode_jpeg(_img(h, w, i), 90) for i, (h, w) in enumerate(((48, 120), (64, 64), (130, 50)))]
    gc = GpuCascade(casc, device="cpu")
    try:
        got = gc.predict(payloads)
    finally:
        gc.close()
    ref = casc.predict([decode_bytes(p) for p in payloads])
    for g, r in zip(got, ref):
        assert g.probability == pytest.approx(r.probability, abs=1e-6) and g.label == r.label
        assert g.trace.gflops == pytest.approx(r.trace.gflops)


@pytest.mark.parametrize("view_engine", [True, False])
@pytest.mark.parametrize("view_scale", [1.0, 1.3])
def test_gpu_runtime_runs_square_views_on_engines(view_scale, view_engine):
    """A tier with square views gets an engine on the fast path: rows that are one view (not full frames, e.g. the
    validators' 224x224 challenge views) run there at the input size; full frames are cut into their squares on the
    device and run on a second engine at the view size (``view_engine``; off: the tier's own pooled code). Answers
    as the CPU path, to float rounding."""
    from roadcascade.accel.config import GpuConfig
    from roadcascade.accel.runtime import GpuCascade
    from roadcascade.io.images import decode_bytes, encode_jpeg

    tier = _tier(3)
    tier.view_scale = view_scale
    casc = Cascade([tier], [ExitPoint(LastTierFusion(), 0.5, FinalRule())])
    shapes = ((64, 64), (48, 120), (70, 66), (130, 50), (96, 96), (200, 410))
    payloads = [encode_jpeg(_img(h, w, i), 90) for i, (h, w) in enumerate(shapes)]
    # the CPU path's decode: reduced in size down to the cascade's decode size, as the fast path's decoders do
    ref = casc.predict([decode_bytes(p, min_size=casc.decode_size()) for p in payloads])
    gc = GpuCascade(casc, device="cpu", config=GpuConfig(view_engine=view_engine))
    try:
        assert gc.engines[0] is not None and gc.squares_only == [True]
        if view_engine:
            veng, k = gc.view_engines[0]
            assert k == 3 and veng.size == tier.view_size and gc.engines[0].size == tier.input_size
        else:
            assert gc.view_engines == [None]
        seen: list[tuple[int, int]] = []
        own_run = tier.run
        tier.run = lambda images: (seen.extend(im.shape[:2] for im in images), own_run(images))[1]
        got = gc.predict(payloads)
    finally:
        tier.run = own_run
        gc.close()
    # without the view engine only the full frames ran the tier's own code (the large one decoded reduced to the
    # tier's decode size); with it, nothing did
    big = decode_bytes(payloads[-1], min_size=casc.decode_size()).shape[:2]
    assert sorted(seen) == ([] if view_engine else sorted(((48, 120), (130, 50), big)))
    for g, r in zip(got, ref):
        assert g.probability == pytest.approx(r.probability, abs=1e-6) and g.label == r.label
        assert g.trace.gflops == pytest.approx(r.trace.gflops)
    assert _tier(3).caps().square_input == 48 and _tier(3).caps().tensor_input is None
    assert _tier(3).caps().square_views == (3, 48)
    assert _tier(1).caps().square_input is None and _tier(1).caps().tensor_input == 48
    assert _tier(1).caps().square_views is None


def test_cost_counts_every_square_view():
    t = _tier(3)
    out = t.run([_img(60, 150, 1), _img(64, 64, 2), _img(200, 90, 3)])
    assert out.gflops is not None and np.allclose(out.gflops, t.gflops * np.array([3, 1, 3]))
    casc = Cascade([t], [ExitPoint(LastTierFusion(), 0.5, FinalRule())])
    traces = [p.trace.gflops[t.name] for p in casc.predict([_img(60, 150, 1), _img(64, 64, 2)])]
    assert traces == pytest.approx([3 * t.gflops, t.gflops])
    assert _tier(1).run([_img(60, 150, 1)]).gflops is None  # a stretching tier costs its constant
