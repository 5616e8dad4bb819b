"""`serve --engine ray`: the Ray Serve app over HTTP on loopback keeps the native API, codes and limits; malformed
requests get 4xx (never a 5xx); the answers are the cascade's."""

from __future__ import annotations

import base64
import socket

import httpx
import numpy as np
import pytest

from roadcascade.cascade.bundle import Bundle
from roadcascade.distributed.autoscale import StageCost, autoscaling_config, stage_costs
from roadcascade.distributed.serve_command import parse_stage_gpus
from roadcascade.io.images import decode_base64
from roadcascade.serve.config import SERVE_DECODE_LIMITS, ServeConfig
from roadcascade.serve.testing import tiny_bundle

from conftest import jpeg_bytes, random_image

ray = pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ray import serve

    from roadcascade.distributed.serving import RayServeConfig, run

    bundle = tiny_bundle(tmp_path_factory.mktemp("bundle"), tau=0.3, temperature=0.01)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR",
             _system_config={"memory_monitor_refresh_ms": 0})
    cfg = ServeConfig(max_batch=8, max_queue=64, max_body_bytes=2 * 2**20)
    url = run(bundle, cfg, RayServeConfig(autoscale=False, stage_cpus=0.5, threads=1), "127.0.0.1", _free_port(), blocking=False)
    try:
        yield url, Bundle.load(bundle, device="cpu").cascade
    finally:
        serve.shutdown()
        ray.shutdown()


def test_answers_match_the_cascade(served):
    url, cascade = served
    rng = np.random.default_rng(0)
    b64s = [base64.b64encode(jpeg_bytes(random_image(rng, 80, 120))).decode() for _ in range(6)]
    want = cascade.predict([decode_base64(b, SERVE_DECODE_LIMITS, min_size=cascade.decode_size()) for b in b64s])
    with httpx.Client(timeout=30) as c:
        for b, w in zip(b64s, want):
            r = c.post(url + "/v1/predict", json={"image": b})
            assert r.status_code == 200 and r.headers["x-anytime"] == "false"
            d = r.json()
            assert abs(d["probability"] - w.probability) <= 1e-6 and d["trace"]["tiers"] == w.trace.tiers
        r = c.post(url + "/v1/predict/batch", json={"images": b64s[:2] + ["not base64 !"]})
        res = r.json()["results"]
        assert r.status_code == 200 and "probability" in res[0] and res[2]["error"]["reason"] == "bad_base64"
        sv = c.post(url + "/streetvision", json={"image": b64s[0], "testnet_label": 1})
        assert sv.status_code == 200 and sv.json()["testnet_label"] == 1 and abs(sv.json()["prediction"] - want[0].probability) <= 1e-6
        assert c.get(url + "/readyz").json()["tiers"] == cascade.tier_names


MALFORMED = [
    ("/v1/predict", {"content": b"{", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
    ("/v1/predict", {"json": [1, 2]}, 400, "bad_json"),
    ("/v1/predict", {"json": {"img": "x"}}, 400, "missing_image"),
    ("/v1/predict", {"json": {"image": 5}}, 400, "bad_input"),
    ("/v1/predict", {"json": {"image": base64.b64encode(b"hello, not an image").decode()}}, 415, "not_image"),
    ("/v1/predict", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ("/v1/predict", {"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty"),
    ("/v1/predict", {"content": b"\xff\xd8\xff" + b"\0" * 64, "headers": {"content-type": "image/jpeg"}}, 400, None),
    ("/v1/predict", {"content": b"x" * (3 * 2**20), "headers": {"content-type": "image/jpeg"}}, 413, "too_large"),
    ("/v1/predict", {"json": {"image": "x"}, "headers": {"x-deadline-ms": "soon"}}, 400, "bad_deadline"),
    ("/v1/predict/batch", {"json": {"images": []}}, 400, "empty"),
    ("/v1/predict/batch", {"json": {"images": ["a"] * 65}}, 413, "too_many_images"),
    ("/streetvision", {"content": b"x", "headers": {"content-type": "image/jpeg"}}, 415, "unsupported_media_type"),
    ("/streetvision", {"content": b'{"image": NaN}', "headers": {"content-type": "application/json"}}, 400, "bad_json"),
]


@pytest.mark.parametrize("path,kw,status,reason", MALFORMED, ids=[f"{m[0]}-{m[3]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_is_4xx_with_the_native_reason(served, path, kw, status, reason):
    url, _ = served
    r = httpx.post(url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and (reason is None or err["reason"] == reason)


def test_deadline_too_short_is_503_with_retry_after(served):
    url, _ = served
    img = base64.b64encode(jpeg_bytes(random_image(np.random.default_rng(1), 64, 64))).decode()
    r = httpx.post(url + "/v1/predict", json={"image": img}, headers={"x-deadline-ms": "0.001"}, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["reason"] == "deadline"


def test_fuzz_never_5xx(served):
    from roadcascade.bench.loadgen import run_fuzz

    url, _ = served
    rep = run_fuzz(url, 120, concurrency=8, timeout=30, max_body=2 * 2**20, synthetic=True, huge_cases=2)
    assert rep["server_errors_5xx"] == 0 and rep["no_response"] == 0 and rep["ready_after"], rep["status_counts"]


def test_autoscaling_follows_measured_cost():
    doc = {"tiers": [{"name": "a", "gflops": 0.25}, {"name": "b", "gflops": 0.77}],
           "build": {"val_ms_per_image": {"a": 3.0, "b": 14.0}},
           "policy": {"chosen": {"tiers": ["a", "b"], "exit_rates": [0.9, 0.1]}}}
    a, b = stage_costs(doc)
    assert (a.reach, b.reach, a.measured) == (1.0, pytest.approx(0.1), True)
    # 1000 img/s: stage a is 3 replica-s/s of work, stage b 1.4; at 70 % load -> 5 and 2 replicas
    assert autoscaling_config(a, 1000, 16)["max_replicas"] == 5 and autoscaling_config(b, 1000, 16)["max_replicas"] == 2
    big = [autoscaling_config(StageCost("x", ms, 1.0, True), 500, 8)["max_replicas"] for ms in (1, 5, 25)]
    assert big == sorted(big) and big[0] >= 1  # costlier stages never get fewer replicas
    no_build = stage_costs({"tiers": doc["tiers"]})
    assert [c.reach for c in no_build] == [1.0, 1.0] and not no_build[0].measured and no_build[1].ms_per_image > no_build[0].ms_per_image
    assert parse_stage_gpus("0.25,1") == (0.25, 1.0) and parse_stage_gpus("") == ()
    with pytest.raises(ValueError):
        parse_stage_gpus("one")
