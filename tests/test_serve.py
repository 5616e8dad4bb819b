"""Every endpoint through an in-process client (FastAPI TestClient): a real two-tier bundle of tiny
untrained zoo models for the answers, stand-in tiers for overload, deadlines and failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import b64, jpeg, png
from fastapi.testclient import TestClient

from roadcascade.cascade.bundle import Bundle
from roadcascade.io.images import DecodeLimits, decode_bytes
from roadcascade.bench.loadgen import jpeg_with_size, png_bomb
from roadcascade.serve import ServeConfig, create_app
from roadcascade.serve.testing import grey, sleep_cascade, tiny_bundle


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < end, "server never became ready"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = [jpeg(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)) for _ in range(3)]
    out += [jpeg(np.full((64, 80, 3), v, np.uint8)) for v in (10, 128, 240)]
    return out


@pytest.fixture(scope="module")
def client(bundle_dir):
    app = create_app(bundle_dir, ServeConfig(max_batch=8, max_wait_ms=2, warmup_rounds=1))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def reference(bundle_dir):
    return Bundle.load(bundle_dir, device="cpu").cascade


def test_health_ready_and_docs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/readyz").json()
    assert r["ready"] and r["tiers"] == ["tiny0", "tiny1"] and r["warmup_ms"]["total"] > 0
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/predict/batch", "/streetvision", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/predict"]["post"]["requestBody"]["content"]


def test_readyz_waits_for_warmup():
    slow = sleep_cascade(t0_ms=150, t1_ms=0)  # warm-up takes a while
    with TestClient(create_app(slow, ServeConfig(max_batch=2, warmup_rounds=1))) as c:
        assert c.get("/readyz").status_code == 503
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/predict", json={"image": b64(jpeg(grey(0)))})
        assert r.status_code == 503 and r.json()["error"]["reason"] == "not_ready" and r.headers["retry-after"]
        wait_ready(c)


def test_predict_json_multipart_and_raw_agree_with_the_offline_cascade(client, images, reference):
    for data in images:
        want = reference.predict([decode_bytes(data)])[0]
        answers = [
            client.post("/v1/predict", json={"image": b64(data)}),
            client.post("/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}),
            client.post("/v1/predict", content=data, headers={"Content-Type": "image/jpeg"}),
        ]
        for r in answers:
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["probability"] == pytest.approx(want.probability, abs=1e-5)
            assert body["label"] == want.label
            tr = body["trace"]
            assert tr["tiers"] == want.trace.tiers and tr["rule"] == want.trace.rule and tr["exit"] == want.trace.exit
            assert set(tr["ms"]) == set(tr["tiers"]) and tr["total_ms"] > 0 and tr["anytime"] is False


def test_both_exits_are_reached(client, images):
    exits = {client.post("/v1/predict", json={"image": b64(d)}).json()["trace"]["exit"] for d in images}
    assert exits == {0, 1}


def test_batch_endpoint_gives_per_image_results(client, images, reference):
    good = [b64(d) for d in images[:3]]
    r = client.post("/v1/predict/batch", json={"images": [good[0], "not base64!", good[1], b64(b"%PDF-1.4"), good[2]]})
    assert r.status_code == 200
    res = r.json()["results"]
    assert [("probability" in x) for x in res] == [True, False, True, False, True]
    assert res[1]["error"]["reason"] == "bad_base64" and res[3]["error"]["status"] == 415
    want = reference.predict([decode_bytes(d) for d in images[:3]])
    assert [res[i]["probability"] for i in (0, 2, 4)] == pytest.approx([w.probability for w in want], abs=1e-5)
    files = [("file", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(images[:2])]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    r = client.post("/v1/predict/batch", json={"images": ["AAAA"] * 65})
    assert r.status_code == 413 and r.json()["error"]["reason"] == "too_many_images"


def test_streetvision_answers_the_synapse_with_a_prediction(client, images, reference):
    syn = {"image": b64(images[0]), "prediction": -1.0, "testnet_label": 1, "name": "ImageSynapse", "timeout": 12.0}
    r = client.post("/streetvision", json=syn)
    assert r.status_code == 200
    body = r.json()
    assert {k: v for k, v in body.items() if k != "prediction"} == {k: v for k, v in syn.items() if k != "prediction"}
    assert 0.0 <= body["prediction"] <= 1.0
    assert body["prediction"] == pytest.approx(reference.predict([decode_bytes(images[0])])[0].probability, abs=1e-5)
    r = client.post("/streetvision", json={"image": "???", "prediction": -1.0})
    assert r.status_code == 400 and r.json()["error"]["reason"] == "bad_base64"
    r = client.post("/streetvision", files={"file": ("x.jpg", images[0], "image/jpeg")})
    assert r.status_code == 415


GOOD = b64(jpeg(grey(30)))
BAD_INPUT = [
    ("json_not_base64", {"json": {"image": "%%%"}}, 400, "bad_base64"),
    ("json_truncated_jpeg", {"json": {"image": b64(jpeg(grey(30))[:300])}}, 400, "truncated"),
    ("json_text_not_image", {"json": {"image": b64(b"hello world, not an image")}}, 415, "not_image"),
    ("json_empty_image", {"json": {"image": ""}}, 400, "empty"),
    ("json_image_number", {"json": {"image": 5}}, 400, "bad_input"),
    ("json_missing_image", {"json": {"img": GOOD}}, 400, "missing_image"),
    ("json_array", {"json": [GOOD]}, 400, "bad_json"),
    ("json_invalid", {"content": b"{\"image\": ", "headers": {"Content-Type": "application/json"}}, 400, "bad_json"),
    ("json_deep", {"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}}, 400, "bad_json"),
    ("json_not_utf8", {"content": b"\xff\xfe\xfd", "headers": {"Content-Type": "application/json"}}, 400, "bad_json"),
    ("empty_body", {"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "empty"),
    ("text_plain", {"content": b"image=abc", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ("no_content_type", {"content": b"abc"}, 415, "unsupported_media_type"),
    ("raw_garbage", {"content": b"<html></html>", "headers": {"Content-Type": "image/jpeg"}}, 415, "not_image"),
    ("multipart_text_file", {"data": {"note": "hi"}, "files": {"other": ("a.txt", b"plain text", "text/plain")}}, 415, "not_image"),
    ("multipart_no_file", {"data": {"note": "hi"}, "headers": {"Content-Type": "multipart/form-data; boundary=b"}}, 400, None),
    ("multipart_bad", {"content": b"--x\r\n\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=y"}}, 400, None),
    ("png_bomb", {"json": {"image": b64(png_bomb(12_000))}}, 413, None),
    ("jpeg_header_bomb", {"json": {"image": b64(jpeg_with_size(jpeg(grey(30)), 60_000, 60_000))}}, 413, None),
    ("bad_deadline", {"json": {"image": GOOD}, "headers": {"X-Deadline-Ms": "soon"}}, 400, "bad_deadline"),
    ("negative_deadline", {"json": {"image": GOOD}, "headers": {"X-Deadline-Ms": "-3"}}, 400, "bad_deadline"),
]


@pytest.mark.parametrize("name,kwargs,status,reason", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_gets_a_4xx_with_its_reason(client, name, kwargs, status, reason):
    r = client.post("/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["message"]
    if reason:
        assert err["reason"] == reason


def test_body_limit_is_enforced_before_reading_the_body(bundle_dir):
    app = create_app(sleep_cascade(), ServeConfig(max_body_bytes=4096, warmup_rounds=1))
    with TestClient(app) as c:
        wait_ready(c)
        r = c.post("/v1/predict", content=b"x" * 10_000, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["reason"] == "too_large"

        def chunks():  # no Content-Length: counted while streaming
            for _ in range(10):
                yield b"y" * 1000

        r = c.post("/v1/predict", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["reason"] == "too_large"
        assert c.post("/v1/predict", json={"image": b64(jpeg(grey(0)))}).status_code == 200


def test_pixel_limit(bundle_dir):
    cfg = ServeConfig(decode_limits=DecodeLimits(max_pixels=64 * 64), warmup_rounds=1)
    with TestClient(create_app(sleep_cascade(), cfg)) as c:
        wait_ready(c)
        r = c.post("/v1/predict", json={"image": b64(jpeg(grey(0, size=100)))})
        assert r.status_code == 413 and r.json()["error"]["reason"] == "too_many_pixels"
        assert c.post("/v1/predict", json={"image": b64(jpeg(grey(0, size=64)))}).status_code == 200


def test_deadline_header_gives_anytime_answers_and_impossible_deadlines_get_503():
    cascade = sleep_cascade(t0_ms=5, t1_ms=400, tau=0.3)
    with TestClient(create_app(cascade, ServeConfig(max_batch=4, warmup_rounds=1, speculate="off"))) as c:
        wait_ready(c)
        hard = b64(jpeg(grey(128)))
        r = c.post("/v1/predict", json={"image": hard}, headers={"X-Deadline-Ms": "150"})
        assert r.status_code == 200
        tr = r.json()["trace"]
        assert tr["anytime"] and tr["rule"] == "deadline" and tr["tiers"] == ["small"]
        r = c.post("/v1/predict", json={"image": hard}, headers={"X-Deadline-Ms": "1"})
        assert r.status_code == 503 and r.json()["error"]["reason"] == "deadline" and int(r.headers["retry-after"]) >= 1
        r = c.post("/v1/predict", json={"image": hard})  # the default 2 s: the big tier runs
        assert r.json()["trace"]["tiers"] == ["small", "big"]
        m = c.get("/metrics").text
        assert 'roadcascade_deadline_fallbacks_total{tier="big"} 1.0' in m  # labelled by the tier skipped
        assert 'roadcascade_errors_total{endpoint="predict",reason="deadline"} 1.0' in m


def test_overload_answers_503_with_retry_after_and_recovers():
    cascade = sleep_cascade(t0_ms=150, t1_ms=0)
    with TestClient(create_app(cascade, ServeConfig(max_batch=2, max_queue=2, warmup_rounds=1))) as c:
        wait_ready(c)
        body = {"image": b64(jpeg(grey(0)))}
        statuses: list[int] = []
        retry: list[str] = []
        lock = threading.Lock()

        def one():
            r = c.post("/v1/predict", json=body, headers={"X-Deadline-Ms": "20000"})
            with lock:
                statuses.append(r.status_code)
                if r.status_code == 503:
                    retry.append(r.headers.get("retry-after", ""))

        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 2
        assert all(x.isdigit() and int(x) >= 1 for x in retry)
        assert c.post("/v1/predict", json=body).status_code == 200
        assert 'reason="overloaded"' in c.get("/metrics").text


def test_a_failing_tier_gives_500_for_that_request_only():
    cascade = sleep_cascade(fail=lambda im: int(im[0, 0, 0]) == 77)
    with TestClient(create_app(cascade, ServeConfig(warmup=False))) as c:
        wait_ready(c)
        bad = c.post("/v1/predict", content=png(grey(77)), headers={"Content-Type": "image/png"})
        assert bad.status_code == 500 and bad.json()["error"]["reason"] == "tier_error"
        assert c.post("/v1/predict", content=png(grey(0)), headers={"Content-Type": "image/png"}).status_code == 200
        m = c.get("/metrics").text
        assert 'roadcascade_tier_errors_total{tier="small"} 1.0' in m
        assert 'roadcascade_errors_total{endpoint="predict",reason="tier_error"} 1.0' in m


def test_metrics_exposition(client, images):
    client.post("/v1/predict", json={"image": b64(images[0])})
    client.post("/v1/predict", json={"image": "!!"})
    client.post("/streetvision", json={"image": b64(images[1])})
    m = client.get("/metrics").text
    for needle in (
        'roadcascade_requests_total{endpoint="predict",status="200"}',
        'roadcascade_requests_total{endpoint="streetvision",status="200"}',
        'roadcascade_errors_total{endpoint="predict",reason="bad_base64"}',
        'roadcascade_request_latency_seconds_bucket{endpoint="predict",le="0.1"}',
        'roadcascade_batch_size_bucket{le="1.0",tier="tiny0"}',
        'roadcascade_tier_batch_seconds_count{tier="tiny0"}',
        'roadcascade_queue_depth{tier="tiny1"}',
        'roadcascade_exits_total{rule=',
        'roadcascade_deadline_fallbacks_total{tier="tiny0"}',
        "roadcascade_inflight_images",
        "roadcascade_speculation_active",
        "roadcascade_ready 1.0",
    ):
        assert needle in m, needle
    assert "_created" not in m


def test_unknown_paths_and_methods_are_4xx_and_counted(client):
    assert client.get("/v1/predict").status_code == 405
    assert client.post("/nope", json={}).status_code == 404
    assert 'roadcascade_requests_total{endpoint="other",status="404"}' in client.get("/metrics").text


def test_dashboard_page_assets_and_stats(client, images):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for needle in ('id="upload"', 'id="file"', 'id="throughput"', 'id="exit-bars"', "/static/dashboard.js"):
        assert needle in html
    assert client.get("/static/dashboard.js").status_code == 200
    assert client.get("/static/dashboard.css").status_code == 200
    client.post("/v1/predict", json={"image": b64(images[0])})
    s = client.get("/v1/stats").json()
    assert s["ready"] and s["tiers"] == ["tiny0", "tiny1"] and s["requests_per_s"] > 0
    assert s["latency_ms"]["p50"] > 0 and len(s["series"]) == 120 and sum(s["exit_counts"].values()) >= 1
    assert set(s["latency_model_ms"]) == {"tiny0", "tiny1"}


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="--max-batch"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match="max_queue"):
        ServeConfig(max_batch=32, max_queue=8)
    with pytest.raises(ValueError, match="speculate"):
        ServeConfig(speculate="sometimes")


def test_a_bundle_that_cannot_load_fails_health(tmp_path):
    with TestClient(create_app(tmp_path / "missing")) as c:
        end = time.monotonic() + 10
        while c.get("/healthz").status_code == 200 and time.monotonic() < end:
            time.sleep(0.02)
        h = c.get("/healthz")
        assert h.status_code == 503 and h.json()["error"] == "BundleError"  # the cause goes to the log, not to clients
        r = c.get("/readyz")
        assert r.status_code == 503 and str(tmp_path) not in h.text + r.text
