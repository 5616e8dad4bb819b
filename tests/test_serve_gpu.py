"""The server on the GPU fast path's runtime (serve/gpu_stage.py), run here on the CPU (``gpu="on"``):
plain JPEGs reach the batcher as bytes, the whole cascade is one stage, answers equal the offline
cascade's, and bad input found inside a batch is a 4xx, never a 5xx. On a CUDA machine ``gpu="auto"``
takes the same code with nvJPEG/nvImageCodec decoding (docs/GPU.md)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from helpers import b64, jpeg, png
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from roadcascade.cascade.bundle import Bundle
from roadcascade.cascade.runtime import ImageState
from roadcascade.accel.runtime import GpuCascade, jpeg_gpu_info
from roadcascade.io.images import BadImage, DecodeLimits, decode_bytes
from roadcascade.serve import ServeConfig, create_app
from roadcascade.serve.gpu_stage import GpuStageCascade
from roadcascade.serve.inputs import prepare_item
from roadcascade.serve.testing import tiny_bundle


def corrupt_scan(data: bytes) -> bytes:
    """Headers intact (the GPU route takes it), entropy-coded data replaced by 0xFF 0x00 pairs and junk."""
    sos = data.index(b"\xff\xda")
    body = bytearray(data)
    for i in range(sos + 20, len(body) - 2, 2):
        body[i], body[i + 1] = 0xFF, 0xC4 if i % 6 == 0 else 0x00
    return bytes(body)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def reference(bundle_dir):
    return Bundle.load(bundle_dir, device="cpu").cascade


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(3)
    return [jpeg(rng.integers(0, 256, (72 + 8 * i, 96, 3), dtype=np.uint8)) for i in range(6)]


@pytest.fixture(scope="module")
def client(bundle_dir):
    app = create_app(bundle_dir, ServeConfig(max_batch=8, max_wait_ms=2, warmup_rounds=1, gpu="on"), device="cpu")
    with TestClient(app) as c:
        end = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < end, "server never became ready"
            time.sleep(0.02)
        yield c


def test_one_gpu_stage_answers_like_the_offline_cascade(client, images, reference):
    stats = client.get("/v1/stats").json()
    assert stats["tiers"] == ["gpu:tiny0+tiny1"] and stats["gpu"]["tiers"] == ["tiny0", "tiny1"]
    for data in images:
        want = reference.predict([decode_bytes(data)])[0]
        for r in (client.post("/v1/predict", json={"image": b64(data)}),
                  client.post("/v1/predict", content=data, headers={"Content-Type": "image/jpeg"})):
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["probability"] == pytest.approx(want.probability, abs=1e-6)
            assert body["trace"]["tiers"] == want.trace.tiers and body["trace"]["exit"] == want.trace.exit
    # a PNG is not for the GPU decoder: decoded on the CPU threads, same answer
    rgb = decode_bytes(images[0])
    r = client.post("/v1/predict", json={"image": b64(png(rgb))})
    assert r.status_code == 200 and r.json()["probability"] == pytest.approx(reference.predict([rgb])[0].probability, abs=1e-6)


def test_bad_input_found_in_the_gpu_batch_is_a_4xx(client, images):
    bad = corrupt_scan(images[1])
    assert jpeg_gpu_info(bad) is not None  # it does reach the batch undecoded
    r = client.post("/v1/predict", json={"image": b64(bad)})
    assert r.status_code in (200, 400, 415, 422), r.text  # garbage in: an answer or a client error
    truncated = images[2][: len(images[2]) // 2]
    r = client.post("/v1/predict/batch", json={"images": [b64(images[0]), b64(truncated), "@@", b64(bad), b64(images[3])]})
    assert r.status_code == 200
    res = r.json()["results"]
    assert "probability" in res[0] and "probability" in res[4]
    assert res[1]["error"]["reason"] == "truncated" and res[2]["error"]["reason"] == "bad_base64"
    assert "probability" in res[3] or 400 <= res[3]["error"]["status"] < 500
    m = client.get("/metrics").text
    assert 'reason="truncated"' in m


def test_gpu_stage_marks_late_bad_images(bundle_dir, images, reference):
    casc = Bundle.load(bundle_dir, device="cpu").cascade
    gc = GpuCascade(casc, device="cpu")
    stage = GpuStageCascade(gc)
    states = [ImageState(image=images[0]), ImageState(image=b"\xff\xd8\xff garbage"), ImageState(image=decode_bytes(images[1]))]
    stage.run_stage(0, states)
    assert all(s.done for s in states)
    assert isinstance(states[1].error, BadImage) and states[0].error is None and states[2].error is None
    want = reference.predict([decode_bytes(images[0]), decode_bytes(images[1])])
    assert [stage.answer(states[i]).probability for i in (0, 2)] == pytest.approx([w.probability for w in want], abs=1e-9)
    assert stage.answer(states[0]).trace.tiers == want[0].trace.tiers
    with pytest.raises(ValueError):
        stage.run_stage(1, states)
    gc.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_prepare_item_never_raises_anything_but_bad_image(data):
    limits = DecodeLimits()
    for item in (b"\xff\xd8\xff" + data, data, b64(data), b64(b"\xff\xd8\xff" + data)):
        try:
            out = prepare_item(item, limits, gpu=True)
        except BadImage:
            continue
        assert isinstance(out, (bytes, np.ndarray))
        if isinstance(out, bytes):
            assert jpeg_gpu_info(out, limits) is not None


def test_prepare_item_routes_plain_jpegs_as_bytes(images):
    limits = DecodeLimits()
    assert prepare_item(images[0], limits, gpu=True) == images[0]
    assert prepare_item(b64(images[0]), limits, gpu=True) == images[0]
    rgb = decode_bytes(images[0])
    np.testing.assert_array_equal(prepare_item(png(rgb), limits, gpu=True), rgb)
    np.testing.assert_array_equal(prepare_item(images[0], limits, gpu=False), rgb)
    with pytest.raises(BadImage):
        prepare_item(12, limits, gpu=True)


def test_a_jpeg_cut_short_and_ended_with_an_eoi_is_refused_before_the_gpu_batch(client):
    rgb = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=75)
    cut = buf.getvalue()[:631] + b"\xff\xd9"  # header + a sliver of scan + EOI: nvJPEG / libjpeg fill the rest with grey
    r = client.post("/v1/predict", json={"image": b64(cut)})
    assert r.status_code == 400 and r.json()["error"]["reason"] == "truncated"
