"""API key, open/closed health, no CORS, JSON-only /streetvision, nothing internal in health answers, no CDN
docs pages, the loopback warning; anytime answers marked, counted and refusable (#14 items 6 and 7)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import b64, jpeg
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from roadcascade.serve import ServeConfig, create_app
from roadcascade.serve import middleware as middleware_module
from roadcascade.serve.testing import grey, sleep_cascade, tiny_bundle

KEY = "k" * 20 + "-secret-0123456789"


def b64jpeg(rgb: np.ndarray) -> str:
    return b64(jpeg(rgb, 75))


EASY, HARD = b64jpeg(grey(10)), b64jpeg(grey(128))


def ready(c: TestClient, headers: dict | None = None) -> None:
    end = time.monotonic() + 30
    while c.get("/readyz", headers=headers or {}).status_code != 200:
        assert time.monotonic() < end
        time.sleep(0.02)


@pytest.fixture(scope="module")
def keyed():
    with TestClient(create_app(sleep_cascade(), ServeConfig(max_batch=2, warmup_rounds=1, api_key=KEY))) as c:
        ready(c)
        yield c


def test_the_key_is_required_and_compared_in_constant_time(keyed, monkeypatch):
    calls = []
    real = middleware_module.hmac.compare_digest
    monkeypatch.setattr(middleware_module.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer " + KEY[:-1]}, {"Authorization": "Basic " + KEY}):
        r = keyed.post("/v1/predict", json={"image": EASY}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["reason"] == "unauthorized" and "Bearer" in r.headers["www-authenticate"]
    for path in ("/streetvision", "/v1/predict/batch", "/openapi.json"):
        assert keyed.post(path, json={}).status_code == 401 or keyed.get(path).status_code == 401
    assert keyed.post("/v1/predict", json={"image": EASY}, headers={"Authorization": "Bearer " + KEY}).status_code == 200
    assert keyed.post("/v1/predict", json={"image": EASY}, headers={"X-API-Key": KEY}).status_code == 200
    assert calls  # hmac.compare_digest decided
    m = keyed.get("/metrics").text  # open by default, like /healthz and /readyz
    assert 'roadcascade_errors_total{endpoint="predict",reason="unauthorized"} 4.0' in m
    assert keyed.get("/healthz").status_code == 200 and keyed.get("/").status_code == 200
    assert keyed.get("/v1/stats").status_code == 200  # the dashboard's live numbers, open like /metrics


def test_health_and_metrics_can_be_closed_too():
    with TestClient(create_app(sleep_cascade(), ServeConfig(warmup_rounds=1, api_key=KEY, open_health=False))) as c:
        for path in ("/healthz", "/readyz", "/metrics", "/v1/stats"):
            assert c.get(path).status_code == 401
        ready(c, {"X-API-Key": KEY})
        assert c.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200


def test_short_keys_are_refused():
    with pytest.raises(ValueError, match="api_key"):
        ServeConfig(api_key="short")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    bundle = tiny_bundle(tmp_path_factory.mktemp("b") / "tiny")
    with TestClient(create_app(bundle, ServeConfig(max_batch=2, warmup_rounds=1))) as c:
        ready(c)
        yield c, bundle


def test_no_cors_headers(plain):
    c, _ = plain
    pre = c.options("/streetvision", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code in (404, 405) and "access-control-allow-origin" not in pre.headers
    r = c.post("/v1/predict", json={"image": EASY}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and not [h for h in r.headers if h.startswith("access-control-")]


@pytest.mark.parametrize("ctype", ["text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_streetvision_takes_json_only(plain, ctype):
    c, _ = plain
    body = ('{"image": "%s", "prediction": -1.0}' % EASY).encode()
    r = c.post("/streetvision", content=body, headers={"Content-Type": ctype} if ctype else {})
    assert r.status_code == 415 and r.json()["error"]["reason"] == "unsupported_media_type"
    assert c.post("/streetvision", content=body, headers={"Content-Type": "application/json"}).status_code == 200


def test_health_answers_hold_nothing_internal(plain):
    c, bundle = plain
    for path in ("/healthz", "/readyz", "/v1/stats"):
        r = c.get(path)
        assert r.status_code == 200 and str(bundle) not in r.text and "bundle" not in r.json()


def test_no_third_party_docs_pages(plain):
    c, _ = plain
    assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
    assert c.get("/openapi.json").status_code == 200
    html = c.get("/").text
    assert "cdn" not in html.lower() and "src=\"http" not in html and "href=\"http" not in html


def test_listening_beyond_loopback_without_a_key_warns(tmp_path, monkeypatch):
    import uvicorn

    from roadcascade.cli import app

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # no server: only what `serve` says before it
    bundle = tiny_bundle(tmp_path / "b")
    monkeypatch.delenv("ROADCASCADE_API_KEY", raising=False)
    r = CliRunner().invoke(app, ["serve", "--bundle", str(bundle), "--host", "0.0.0.0", "--port", "0"])
    assert r.exit_code == 0, r.output
    assert "without an API key" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["serve", "--bundle", str(bundle), "--host", "0.0.0.0", "--port", "0"], env={"ROADCASCADE_API_KEY": KEY})
    assert r.exit_code == 0 and "without an API key" not in " ".join(r.output.split()) and KEY not in r.output
    r = CliRunner().invoke(app, ["serve", "--bundle", str(bundle), "--port", "0"])
    assert r.exit_code == 0 and "without an API key" not in " ".join(r.output.split())


# ------------------------------------------------------------------------------------------ anytime answers
def anytime_count(c: TestClient, endpoint: str, event: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(f'roadcascade_anytime_answers_total{{endpoint="{endpoint}",event="{event}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def slow_big():
    cascade = sleep_cascade(t0_ms=5, t1_ms=400, tau=0.3)
    with TestClient(create_app(cascade, ServeConfig(max_batch=4, warmup_rounds=1, speculate="off"))) as c:
        ready(c)
        yield c


def test_anytime_answers_are_marked_and_counted(slow_big):
    c = slow_big
    r = c.post("/v1/predict", json={"image": EASY}, headers={"X-Deadline-Ms": "150"})
    assert r.status_code == 200 and r.headers["x-anytime"] == "false" and not r.json()["trace"]["anytime"]
    r = c.post("/v1/predict", json={"image": HARD}, headers={"X-Deadline-Ms": "150"})
    assert r.status_code == 200 and r.headers["x-anytime"] == "true" and r.json()["trace"]["anytime"]
    r = c.post("/streetvision", json={"image": HARD, "prediction": -1.0}, headers={"X-Deadline-Ms": "150"})
    assert r.status_code == 200 and r.headers["x-anytime"] == "true" and 0 <= r.json()["prediction"] <= 1
    r = c.post("/v1/predict/batch", json={"images": [EASY, HARD]}, headers={"X-Deadline-Ms": "150"})
    assert r.status_code == 200 and r.headers["x-anytime"] == "true"
    assert [x["trace"]["anytime"] for x in r.json()["results"]] == [False, True]
    assert anytime_count(c, "predict", "answered") == 1 and anytime_count(c, "streetvision", "answered") == 1
    assert anytime_count(c, "predict_batch", "answered") == 1


def test_callers_can_prefer_a_503(slow_big):
    c = slow_big
    r = c.post("/v1/predict", json={"image": HARD}, headers={"X-Deadline-Ms": "150", "X-Anytime": "off"})
    assert r.status_code == 503 and r.json()["error"]["reason"] == "deadline" and r.headers["retry-after"]
    assert anytime_count(c, "predict", "refused") == 1
    r = c.post("/v1/predict", json={"image": EASY}, headers={"X-Deadline-Ms": "150", "X-Anytime": "off"})
    assert r.status_code == 200  # a complete answer is never refused


def test_no_anytime_flag_turns_them_off_server_wide():
    cascade = sleep_cascade(t0_ms=5, t1_ms=400, tau=0.3)
    with TestClient(create_app(cascade, ServeConfig(max_batch=4, warmup_rounds=1, speculate="off", anytime=False))) as c:
        ready(c)
        r = c.post("/streetvision", json={"image": HARD, "prediction": -1.0}, headers={"X-Deadline-Ms": "150"})
        assert r.status_code == 503 and r.json()["error"]["reason"] == "deadline"
        r = c.post("/v1/predict/batch", json={"images": [EASY, HARD]}, headers={"X-Deadline-Ms": "150"})
        res = r.json()["results"]
        assert r.status_code == 200 and "probability" in res[0] and res[1]["error"]["status"] == 503
