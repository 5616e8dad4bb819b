"""The load generator: loopback-only targets, arrival schedules, reports, fuzz cases; and `roadcascade bench
load` run briefly against a live uvicorn server (closed loop, open loop and a fuzz run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from roadcascade.cli import app as cli_app
from roadcascade.io.images import BadImage, DecodeLimits, decode_bytes
from roadcascade.bench.loadgen import (
    LoadgenError, Sample, arrival_times, fuzz_requests, jpeg_with_size, loopback_target, png_bomb, summarize, synthetic_images,
    validator_images,
)
from roadcascade.serve import ServeConfig, create_app
from roadcascade.serve.testing import live_server, tiny_bundle


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "https://127.0.0.1:8000", "http://192.168.1.2",
                                 "ftp://127.0.0.1", "http://127.0.0.1:8000/v1/predict"])
def test_only_loopback_urls(url):
    with pytest.raises(LoadgenError):
        loopback_target(url)


def test_loopback_urls_accepted():
    assert loopback_target("http://127.0.0.1:8000").port == 8000
    assert loopback_target("http://localhost:9").host == "127.0.0.1"
    assert loopback_target("http://[::1]:8080/").host == "::1"
    assert loopback_target("http://127.5.6.7").port == 80


def test_arrival_times_are_bounded_in_count_and_time():
    fixed = arrival_times(10.0, 2.0, 1000, "fixed")
    assert len(fixed) == 20 and np.allclose(np.diff(fixed), 0.1)
    poisson = arrival_times(200.0, 5.0, 100_000, "poisson", seed=1)
    assert 900 < len(poisson) < 1100 and poisson.max() < 5.0 and np.all(np.diff(poisson) > 0)
    assert len(arrival_times(1000.0, 10.0, 50)) == 50
    with pytest.raises(LoadgenError):
        arrival_times(1.0, 1.0, 10, "bursty")


def test_summarize_counts_and_percentiles():
    samples = [Sample(0.1 * i, float(i), 200) for i in range(1, 101)] + [Sample(1.0, 1.0, 503), Sample(1.0, 0.0, 0, error="timeout")]
    r = summarize(samples, elapsed=10.0, deadline_ms=90)
    assert r["status_counts"] == {"200": 100, "503": 1, "timeout": 1}
    assert r["latency_ms"]["200"]["p50"] == pytest.approx(50.5) and r["latency_ms"]["200"]["max"] == 100
    assert r["ok_rps"] == 10.0 and r["ok_within_deadline"] == 0.9 and r["server_errors_5xx"] == 0


def test_fuzz_cases_cover_every_kind_and_are_malformed():
    jpg = validator_images(1, synthetic=True)[0][0][0]
    reqs = fuzz_requests(300, jpg, max_body=1 << 20, huge_cases=2)
    kinds = {r.kind for r in reqs}
    assert len(reqs) == 302 and {"bad_base64", "truncated_jpeg", "wrong_content_type", "huge_body", "decompression_bomb",
                                 "bad_json", "bad_multipart", "lying_length"} <= kinds
    assert all(len(r.body) > 1 << 20 for r in reqs if r.kind == "huge_body")
    with pytest.raises(BadImage) as e:
        decode_bytes(png_bomb(12_000), DecodeLimits(max_pixels=16_000_000))
    assert e.value.http_status == 413
    with pytest.raises(BadImage) as e:
        decode_bytes(jpeg_with_size(jpg, 60_000, 60_000), DecodeLimits(max_pixels=16_000_000, max_side=10_000))
    assert e.value.http_status in (400, 413)


def test_synthetic_images_are_valid_and_labelled():
    ims = synthetic_images(4, seed=0, size=96)
    assert [y for _, y in ims] == [0, 1, 0, 1] and all(im.shape == (96, 96, 3) for im, _ in ims)


def test_cli_refuses_a_remote_url():
    r = CliRunner().invoke(cli_app, ["bench", "load", "--url", "http://8.8.8.8:80", "--duration", "1"])
    assert r.exit_code == 2 and "loopback" in r.output


@pytest.fixture(scope="module")
def live_url(tmp_path_factory):
    bundle = tiny_bundle(tmp_path_factory.mktemp("live") / "tiny")
    # the client runs in this process and shares its GIL: loop lag here says nothing about the server
    app = create_app(bundle, ServeConfig(max_batch=8, max_queue=64, max_body_bytes=1 << 20, warmup_rounds=1, max_loop_lag_ms=5000))
    with live_server(app) as url:
        yield url


def test_bench_load_closed_and_open_loop_against_a_live_server(live_url, tmp_path):
    runner = CliRunner()
    out = tmp_path / "closed.json"
    r = runner.invoke(cli_app, ["bench", "load", "--url", live_url, "--concurrency", "4", "--duration", "2", "--synthetic",
                                "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["mode"] == "closed" and rep["requests"] > 10 and rep["status_counts"].get("200", 0) == rep["requests"]
    assert rep["server_errors_5xx"] == 0 and rep["invalid_predictions"] == 0
    assert rep["latency_ms"]["200"]["p50"] > 0 and rep["throughput_rps"] > 5
    out = tmp_path / "open.json"
    r = runner.invoke(cli_app, ["bench", "load", "--url", live_url, "--rate", "30", "--duration", "2", "--synthetic",
                                "--endpoint", "predict", "--arrival", "fixed", "--requests", "40", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["mode"] == "open" and rep["requests"] == 40 and rep["status_counts"] == {"200": 40}
    assert rep["endpoint"] == "/v1/predict" and rep["client_dropped"] == 0


def test_fuzz_run_against_a_live_server(live_url, tmp_path):
    out = tmp_path / "fuzz.json"
    r = CliRunner().invoke(cli_app, ["bench", "load", "--url", live_url, "--fuzz", "300", "--synthetic", "--max-body-mb", "1",
                                     "--json", str(out)])
    rep = json.loads(out.read_text())
    assert r.exit_code == 0, (rep["by_reason"], rep["by_kind"])
    assert rep["requests"] >= 300 and rep["server_errors_5xx"] == 0 and rep["no_response"] == 0
    assert rep["answers_same_after"] and rep["ready_after"] and rep["ok"]
    assert set(rep["status_counts"]) <= {"200", "400", "404", "405", "413", "415"}
    assert set(rep["by_kind"]["huge_body"]) == {"413"} and set(rep["by_kind"]["lying_length"]) == {"413"}
