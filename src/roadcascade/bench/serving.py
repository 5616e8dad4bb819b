"""The serving benchmark (``roadcascade bench serve``): every serving number of the issue in one run.

1. offline: the bundle's batched ``eval`` throughput (``evaluate_items``, batch 32: decode + cascade) on
   the same validator-style JPEGs the load test sends;
2. saturation: a closed loop of many clients against ``roadcascade serve`` in a subprocess;
   ratio = served images/s over offline images/s;
3. overload: an open loop at twice the saturated rate (client deadline 2 s via X-Deadline-Ms), with the
   server's resident memory sampled every second: status counts, p99 of the admitted (200) requests
   against their deadline, memory at the start and the end;
4. speculation: low load (one client) with ``--speculate off`` and ``on``, and high load with ``auto``
   (cascades of two or more tiers; a one-tier bundle is extended to a resolution cascade for this part);
5. fuzz: malformed requests, then the same good request as before.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .loadgen import run_fuzz, run_load, validator_images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class ServerProcess:
    """``roadcascade serve`` in a subprocess on a free loopback port."""

    def __init__(self, bundle: Path, args: list[str], threads: int | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "roadcascade.serve", "--bundle", str(bundle), "--port", str(self.port),
               "--log-level", "warning", *args]
        if threads:
            cmd += ["--threads", str(threads)]
        self._log = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError("the server did not become ready")

    def metrics(self) -> dict[str, float]:
        import httpx

        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
        return out

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def metric_sum(m: dict[str, float], name: str, **labels: str) -> float:
    pat = re.compile(re.escape(name) + r"(\{(.*)\})?$")
    total = 0.0
    for k, v in m.items():
        g = pat.match(k)
        if g and all(f'{lk}="{lv}"' in (g.group(2) or "") for lk, lv in labels.items()):
            total += v
    return total


def offline_throughput(bundle: Path, images: list[tuple[bytes, int]], threads: int | None, batch_size: int = 32) -> dict:
    """The bundle's ``eval`` throughput on these JPEGs (second pass; the first one warms up)."""
    import torch

    from ..cascade.bundle import Bundle
    from .evaluate import EvalItem, evaluate_items

    if threads:
        torch.set_num_threads(threads)
    b = Bundle.load(bundle, device="cpu")
    items = [EvalItem(f"i{i}", y, "bench", jpg) for i, (jpg, y) in enumerate(images)]
    evaluate_items(b, items[: 2 * batch_size], batch_size=batch_size)
    rep = evaluate_items(b, items, batch_size=batch_size)
    return {"images": len(items), "batch_size": batch_size, "throughput_img_s": rep["throughput_img_s"], "threads": torch.get_num_threads(),
            "exit_rates": rep["exit_rates"]}


def resolution_cascade(bundle: Path, out: Path, small: int = 128, tau: float = 0.45) -> Path:
    """A two-tier cascade from a one-tier bundle: its model at ``small`` px first, at full size second.
    Only for measuring speculation (the small tier is not recalibrated)."""
    from ..cascade.bundle import Bundle
    from ..cascade.runtime import Cascade, ClassifierTier, ConfidenceRule, ExitPoint, FinalRule, LastTierFusion

    b = Bundle.load(bundle, device="cpu")
    (t,) = b.cascade.tiers
    assert isinstance(t, ClassifierTier)
    lo = ClassifierTier(f"{t.name}@{small}", t.model_name, t.model, small, t.mean, t.std, t.calibrator,
                        t.gflops * (small / t.input_size) ** 2, device=t.device, squares=t.squares, view_scale=t.view_scale)
    ex = b.cascade.exits[0]
    c = Cascade([lo, t], [ExitPoint(LastTierFusion(), ex.threshold, ConfidenceRule(tau)), ExitPoint(ex.fusion, ex.threshold, FinalRule())])
    return Bundle(c, {"note": f"resolution cascade derived from {bundle} for the speculation benchmark"}).save(out)


def _tier_names(bundle: Path) -> list[str]:
    import json

    return [t["name"] for t in json.loads((Path(bundle) / "bundle.json").read_text())["tiers"]]


def _slim(rep: dict) -> dict:
    keep = ("mode", "concurrency", "rate", "requests", "elapsed_s", "throughput_rps", "ok_rps", "status_counts", "latency_ms",
            "server_errors_5xx", "invalid_predictions", "deadline_ms", "ok_within_deadline", "client_dropped")
    return {k: rep[k] for k in keep if k in rep}


@dataclass(frozen=True)
class BenchRun:
    """What the phases of one benchmark run share: the bundle, the requests' images and how servers start."""

    bundle: Path
    images: list[tuple[bytes, int]]
    threads: int | None
    serve_args: list[str]
    server_log: Path
    log: Callable[[str], None]

    def server(self, bundle: Path | None = None, extra: Sequence[str] = ()) -> ServerProcess:
        return ServerProcess(bundle or self.bundle, [*self.serve_args, *extra], self.threads, self.server_log)


def run_benchmark(bundle: Path, *, duration: float = 20.0, concurrency: int = 48, overload_s: float = 60.0, fuzz: int = 1000,
                  speculation: bool = True, offline_images: int = 256, threads: int | None = None, serve_args: list[str] | None = None,
                  synthetic: bool = False, log: Callable[[str], None] = print, workdir: Path = Path("runs/bench-serve")) -> dict:
    serve_args = serve_args or []
    workdir.mkdir(parents=True, exist_ok=True)
    images, source = validator_images(offline_images, synthetic=synthetic, seed=1)
    run = BenchRun(bundle, images, threads, serve_args, workdir / "server.log", log)
    report: dict = {"bundle": str(bundle), "images": source, "n_images": len(images), "threads": threads, "serve_args": serve_args,
                    "cpu_count": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    log("[1/5] offline batched eval throughput")
    report["offline"] = offline_throughput(bundle, images, threads)
    log(f"      {report['offline']['throughput_img_s']:.1f} img/s")

    with run.server() as srv:
        report.update(_saturation(run, srv, concurrency, duration, report["offline"]["throughput_img_s"]))
        if overload_s > 0:
            report["overload"] = _overload(run, srv, 2 * report["saturation"]["ok_rps"], overload_s)
        report["server_metrics_after_load"] = {
            "deadline_fallbacks": metric_sum(srv.metrics(), "roadcascade_deadline_fallbacks_total"),
            "overloaded_503": metric_sum(srv.metrics(), "roadcascade_errors_total", reason="overloaded"),
            "deadline_503": metric_sum(srv.metrics(), "roadcascade_errors_total", reason="deadline"),
        }
        if fuzz:
            report["fuzz"] = _fuzz(run, srv, fuzz, synthetic)

    if speculation:
        report.update(_speculation(run, workdir, concurrency, duration))
    report["summary"] = _summary(report)
    return report


def metric_delta(after: dict[str, float], before: dict[str, float], name: str, **labels: str) -> float:
    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)


def _saturation(run: BenchRun, srv: ServerProcess, concurrency: int, duration: float, offline_img_s: float) -> dict:
    """Phase 2: a closed loop of ``concurrency`` clients; served images/s against the offline rate."""
    run.log(f"[2/5] saturation: {concurrency} clients for {duration:g} s")
    run_load(srv.url, concurrency=concurrency, duration=min(5.0, duration), images=run.images)  # warm-up
    sat = run_load(srv.url, concurrency=concurrency, duration=duration, images=run.images)
    served = sat["ok_rps"]
    ratio = served / offline_img_s
    run.log(f"      {served:.1f} img/s served = {100 * ratio:.1f} % of offline")
    return {"saturation": _slim(sat), "ratio_server_to_offline": ratio}


class MemorySampler:
    """The resident memory of a process, sampled every ``period`` seconds while the block runs."""

    def __init__(self, pid: int, period: float = 1.0):
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float]] = []  # (seconds since the start, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.period):
            self.samples.append((time.monotonic() - t0, rss_mb(self.pid)))

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> dict:
        m = np.array([v for _, v in self.samples], dtype=np.float64)
        tail = max(1, len(m) // 6)
        return {"rss_mb_first_10pct": float(np.median(m[:tail])) if len(m) else None,
                "rss_mb_last_10pct": float(np.median(m[-tail:])) if len(m) else None,
                "rss_mb_max": float(m.max()) if len(m) else None,
                "rss_mb_series": [round(v, 1) for _, v in self.samples]}


def _overload(run: BenchRun, srv: ServerProcess, rate: float, seconds: float) -> dict:
    """Phase 3: an open loop at ``rate`` (twice the saturated rate) with a 2 s deadline, memory sampled."""
    run.log(f"[3/5] overload: open loop at {rate:.1f} req/s (2x) for {seconds:g} s, deadline 2000 ms")
    with MemorySampler(srv.proc.pid) as sampler:
        rss0 = rss_mb(srv.proc.pid)
        m_before = srv.metrics()
        over = run_load(srv.url, rate=rate, duration=seconds, images=run.images, deadline_ms=2000.0, max_connections=1024)
    alive = srv.proc.poll() is None
    ok = over["latency_ms"].get("200", {})
    out = {
        **_slim(over), "rate": rate, "server_alive": alive, "rss_mb_before": rss0, **sampler.summary(),
        "p99_ok_ms": ok.get("p99"), "p99_ok_within_deadline": (ok.get("p99") or 0) <= 2000.0,
        "only_200_or_503": set(over["status_counts"]) <= {"200", "503"},
        "client_send_lag_ms": over.get("client_send_lag_ms"), "server_side": _server_side(m_before, srv.metrics()),
    }
    run.log(f"      statuses {over['status_counts']}, p99 of 200s {ok.get('p99', float('nan')):.0f} ms, "
            f"RSS {out['rss_mb_first_10pct']:.0f} -> {out['rss_mb_last_10pct']:.0f} MB")
    return out


def _server_side(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the server counted during the overload: its latency within 2 s, fallbacks and refusals by reason."""
    def delta(name: str, **labels: str) -> float:
        return metric_delta(after, before, name, **labels)

    n_srv = delta("roadcascade_request_latency_seconds_count", endpoint="streetvision")
    return {
        "requests": n_srv,
        "within_2s_fraction": delta("roadcascade_request_latency_seconds_bucket", endpoint="streetvision", le="2.0") / n_srv
        if n_srv else None,
        "deadline_fallbacks": delta("roadcascade_deadline_fallbacks_total"),
        "refused_overloaded": delta("roadcascade_errors_total", reason="overloaded"),
        "refused_overloaded_http": delta("roadcascade_errors_total", reason="overloaded_http"),
        "refused_or_shed_deadline": delta("roadcascade_errors_total", reason="deadline"),
    }


def _fuzz(run: BenchRun, srv: ServerProcess, n: int, synthetic: bool) -> dict:
    """Phase 4: malformed requests, then the same good request as before."""
    run.log(f"[4/5] fuzz: {n} malformed requests")
    fz = run_fuzz(srv.url, n, synthetic=synthetic)
    out = {k: fz[k] for k in ("requests", "elapsed_s", "status_counts", "by_kind", "by_reason", "server_errors_5xx", "no_response",
                              "good_before", "good_after", "answers_same_after", "ready_after", "ok")}
    out["server_alive"] = srv.proc.poll() is None
    run.log(f"      statuses {fz['status_counts']}, same answer after: {fz['answers_same_after']}")
    return out


def _speculation(run: BenchRun, workdir: Path, concurrency: int, duration: float) -> dict:
    """Phase 5: low load (one client) with speculation off, on and auto; high load off and auto. A one-tier
    bundle is extended to a resolution cascade for this phase."""
    run.log("[5/5] speculation: low load (1 client) off / on / auto; high load off / auto")
    from ..cascade.bundle import Bundle

    out: dict = {}
    spec_bundle = run.bundle
    if Bundle.load(run.bundle, device="cpu").cascade.n_stages < 2:
        spec_bundle = resolution_cascade(run.bundle, workdir / "resolution-cascade")
        out["speculation_bundle"] = str(spec_bundle)
    spec: dict = {}
    for mode, conc in (("off", 1), ("on", 1), ("auto", 1), ("off", concurrency), ("auto", concurrency)):
        key = f"{'low' if conc == 1 else 'high'}_load_{mode}"
        spec[key] = _speculation_case(run, spec_bundle, mode, conc, max(8.0, duration / 2))
        lat = spec[key]["latency_ms"].get("200", {})
        run.log(f"      {key}: {spec[key]['ok_rps']:.1f} req/s, p50 {lat.get('p50', float('nan')):.1f} ms, "
                f"p95 {lat.get('p95', float('nan')):.1f} ms, speculated {spec[key]['speculated_fraction']:.2f}")
    out["speculation"] = spec
    return out


def _speculation_case(run: BenchRun, bundle: Path, mode: str, conc: int, seconds: float) -> dict:
    """One server with ``--speculate mode`` under ``conc`` clients: the load report, speculation counts, exits."""
    with run.server(bundle, ["--speculate", mode]) as srv:
        run_load(srv.url, concurrency=conc, duration=3.0, images=run.images)  # warm-up
        m0 = srv.metrics()
        rep = run_load(srv.url, concurrency=conc, duration=seconds, images=run.images)
        m1 = srv.metrics()
    d = {k: metric_delta(m1, m0, "roadcascade_speculation_total", event=k) for k in ("started", "used", "wasted")}
    n_img = metric_delta(m1, m0, "roadcascade_images_total")
    exits = {k: metric_delta(m1, m0, "roadcascade_exits_total", tier=k) for k in _tier_names(bundle)}
    return {**_slim(rep), "speculation": d, "images": n_img, "exits": exits,
            "speculated_fraction": d["started"] / n_img if n_img else 0.0}


def _summary(r: dict) -> dict:
    s: dict = {"offline_img_s": r["offline"]["throughput_img_s"], "server_img_s": r["saturation"]["ok_rps"],
               "ratio": r["ratio_server_to_offline"], "ratio_ok": r["ratio_server_to_offline"] >= 0.8}
    if "overload" in r:
        o = r["overload"]
        s["overload"] = {"rate": o["rate"], "status_counts": o["status_counts"], "only_200_or_503": o["only_200_or_503"],
                         "p99_ok_ms": o["p99_ok_ms"], "p99_within_2000ms": o["p99_ok_within_deadline"], "server_alive": o["server_alive"],
                         "rss_mb": [o["rss_mb_first_10pct"], o["rss_mb_last_10pct"], o["rss_mb_max"]]}
    if "fuzz" in r:
        f = r["fuzz"]
        s["fuzz"] = {"requests": f["requests"], "5xx": f["server_errors_5xx"], "no_response": f["no_response"],
                     "same_answer_after": f["answers_same_after"], "alive": f["server_alive"]}
    if "speculation" in r:
        s["speculation"] = {k: {"ok_rps": v["ok_rps"], "p50_ms": v["latency_ms"].get("200", {}).get("p50"),
                                "p95_ms": v["latency_ms"].get("200", {}).get("p95"), "speculated_fraction": v["speculated_fraction"],
                                "speculation": v["speculation"], "exits": v["exits"]}
                            for k, v in r["speculation"].items()}
    return s
