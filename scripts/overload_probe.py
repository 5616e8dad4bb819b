"""Overload at a multiple of the saturated rate (issue #14): start ``roadcascade serve`` on 127.0.0.1, find the
saturated rate with a closed loop, then run an open loop (Poisson) at ``--factor`` x that rate with
``X-Deadline-Ms`` and report the status counts, the p50/p99 of the admitted (200) requests against the
deadline (client side, from each request's scheduled send time), the client's own send lag, and the
server's view (its latency histogram and refusal counters).

Loopback only, every run bounded in time. Run it with the code under test on PYTHONPATH, e.g.

    PYTHONPATH=src python scripts/overload_probe.py --bundle B --factor 5 --duration 40 --json runs/overload5x.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from roadcascade.bench.loadgen import run_load, validator_images
from roadcascade.bench.serving import ServerProcess, metric_sum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--factor", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=None, help="saturated rate to use instead of measuring it")
    ap.add_argument("--concurrency", type=int, default=32, help="closed-loop clients for the saturated rate")
    ap.add_argument("--sat-duration", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--deadline-ms", type=float, default=2000.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--serve-args", default="")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    images, source = validator_images(64, synthetic=True, seed=1)
    rep: dict = {"bundle": str(a.bundle), "images": source, "factor": a.factor, "deadline_ms": a.deadline_ms,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with ServerProcess(a.bundle, a.serve_args.split(), threads=a.threads) as srv:
        run_load(srv.url, concurrency=a.concurrency, duration=5.0, images=images)  # warm-up
        if a.rate is None:
            sat = run_load(srv.url, concurrency=a.concurrency, duration=a.sat_duration, images=images)
            rep["saturation"] = {k: sat[k] for k in ("requests", "ok_rps", "status_counts")}
            rep["saturation"]["latency_ms_200"] = sat["latency_ms"].get("200")
            rate = sat["ok_rps"]
        else:
            rate = a.rate
        rep["saturated_rps"] = rate
        m0 = srv.metrics()
        over = run_load(srv.url, rate=a.factor * rate, duration=a.duration, images=images, deadline_ms=a.deadline_ms,
                        max_connections=1024)
        m1 = srv.metrics()

        def delta(name: str, **labels: str) -> float:
            return metric_sum(m1, name, **labels) - metric_sum(m0, name, **labels)

        n_srv = delta("roadcascade_request_latency_seconds_count", endpoint="streetvision")
        ok = over["latency_ms"].get("200", {})
        rep["overload"] = {
            "rate": a.factor * rate, "duration_s": a.duration, "requests": over["requests"], "status_counts": over["status_counts"],
            "latency_ms_200": ok, "p99_200_within_deadline": bool(ok) and ok["p99"] <= a.deadline_ms,
            "ok_within_deadline": over.get("ok_within_deadline"), "latency_ms_503": over["latency_ms"].get("503"),
            "client_send_lag_ms": over.get("client_send_lag_ms"), "client_dropped": over.get("client_dropped"),
            "server_5xx_not_503": over["server_errors_5xx"],
            "server_side": {
                "requests": n_srv,
                "within_deadline_fraction": delta("roadcascade_request_latency_seconds_bucket", endpoint="streetvision",
                                                  le=f"{a.deadline_ms / 1e3:.1f}") / n_srv if n_srv else None,
                "refused_overloaded": delta("roadcascade_errors_total", reason="overloaded"),
                "refused_overloaded_http": delta("roadcascade_errors_total", reason="overloaded_http"),
                "deadline_503": delta("roadcascade_errors_total", reason="deadline"),
                "deadline_fallbacks": delta("roadcascade_deadline_fallbacks_total"),
            },
        }
        rep["alive_after"] = srv.proc.poll() is None and httpx.get(srv.url + "/readyz", timeout=10).status_code == 200
    print(json.dumps(rep, indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
