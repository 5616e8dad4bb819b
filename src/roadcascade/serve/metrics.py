"""Prometheus metrics (one registry per app) and the rolling window behind the dashboard's /v1/stats.

Label values come from fixed sets (endpoint names, error reasons, tier names), never from client input,
so the number of series stays bounded however hostile the traffic.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from ..metrics import percentiles
from .batcher import BatcherEvents
from .messages import Job, Outcome

disable_created_metrics()  # no *_created series: half the exposition, nothing a dashboard needs

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.0, 3.0, 5.0, 9.0, 15.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
TIER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)
ENDPOINTS = ("predict", "predict_batch", "streetvision", "healthz", "readyz", "metrics", "dashboard", "stats", "docs", "connection", "other")


@dataclass
class _Second:
    """Everything answered in one wall-clock second."""

    t: int
    requests: int = 0
    images: int = 0
    errors: int = 0
    lat: list[float] = field(default_factory=list)  # request latencies (ms) of 200 answers
    exits: dict[str, int] = field(default_factory=dict)  # per tier name, and "deadline"


class ServeMetrics(BatcherEvents):
    def __init__(self, tier_names: Sequence[str], window_s: float = 10.0, history_s: int = 120):
        self.tier_names = list(tier_names)
        self.window_s, self.history_s = window_s, history_s
        self.registry = r = CollectorRegistry()
        self.requests = Counter("roadcascade_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.errors = Counter("roadcascade_errors", "Requests or images refused or failed, by endpoint and reason",
                              ["endpoint", "reason"], registry=r)
        self.latency = Histogram("roadcascade_request_latency_seconds", "Request latency (arrival to response)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("roadcascade_images", "Images answered, by how the answer ended", ["outcome"], registry=r)
        self.batch_size = Histogram("roadcascade_batch_size", "Images per tier batch", ["tier"], buckets=BATCH_BUCKETS, registry=r)
        self.tier_seconds = Histogram("roadcascade_tier_batch_seconds", "Wall time of one tier batch", ["tier"],
                                      buckets=TIER_BUCKETS, registry=r)
        self.queue_depth = Gauge("roadcascade_queue_depth", "Images waiting in each stage queue", ["tier"], registry=r)
        self.inflight = Gauge("roadcascade_inflight_images", "Images admitted and not yet answered", registry=r)
        self.exits = Counter("roadcascade_exits", "Images answered at each exit, by the deciding rule", ["tier", "rule"], registry=r)
        self.fallbacks = Counter("roadcascade_deadline_fallbacks", "Anytime answers given because a tier could not finish in time",
                                 ["tier"], registry=r)
        self.spec = Counter("roadcascade_speculation", "Speculative tier runs: images started, used, wasted, failed", ["event"], registry=r)
        self.spec_active = Gauge("roadcascade_speculation_active", "1 while load-adaptive speculation is on", registry=r)
        self.anytime = Counter("roadcascade_anytime_answers", "Answers that came early because the deadline came "
                               "(answered), or were turned into a 503 because anytime answers are off (refused)",
                               ["endpoint", "event"], registry=r)
        self.tier_errors = Counter("roadcascade_tier_errors", "Exceptions raised inside a tier", ["tier"], registry=r)
        self.ready = Gauge("roadcascade_ready", "1 once models are loaded and warmed up", registry=r)
        self.loop_lag = Gauge("roadcascade_event_loop_lag_seconds", "How late the HTTP event loop runs (smoothed)", registry=r)
        self._lock = threading.Lock()
        self._seconds: deque[_Second] = deque()
        self._spec_counts = {"started": 0, "used": 0, "wasted": 0, "failed": 0}
        self._fallbacks = 0
        self._depths = [0] * len(self.tier_names)
        self._speculating = False
        self._status: dict[str, int] = {}
        self.started = time.time()

    def set_tiers(self, names: Sequence[str]) -> None:
        """Tier names are known once the bundle is loaded."""
        with self._lock:
            self.tier_names = list(names)
            self._depths = [0] * len(self.tier_names)
        for t in self.tier_names:
            self.queue_depth.labels(t).set(0)
            self.fallbacks.labels(t)
            self.batch_size.labels(t)

    # ------------------------------------------------------------------------------------ HTTP side
    def request(self, endpoint: str, status: int, reason: str, seconds: float, n_images: int = 0) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, reason or f"http_{status}").inc()
        if endpoint in ("predict", "predict_batch", "streetvision"):
            with self._lock:
                b = self._bucket()
                b.requests += 1
                self._status[str(status)] = self._status.get(str(status), 0) + 1
                if status == 200:
                    b.images += n_images
                    if len(b.lat) < 5000:
                        b.lat.append(seconds * 1e3)
                else:
                    b.errors += 1

    def connection_refused(self, status: int, reason: str) -> None:
        """A request refused by the connection guard (protocol.py) before the app saw it: 408, 431, 400."""
        self.requests.labels("connection", str(status)).inc()
        self.errors.labels("connection", reason).inc()

    def image_error(self, endpoint: str, reason: str) -> None:
        """A bad image inside an otherwise good batch request."""
        self.errors.labels(endpoint if endpoint in ENDPOINTS else "other", reason).inc()

    def _bucket(self) -> _Second:
        now = int(time.time())
        if not self._seconds or self._seconds[-1].t != now:
            self._seconds.append(_Second(now))
            while self._seconds and self._seconds[0].t < now - self.history_s:
                self._seconds.popleft()
        return self._seconds[-1]

    # ------------------------------------------------------------------------------------ batcher side
    def batch(self, stage: int, tier: str, n: int, ms: float) -> None:
        self.batch_size.labels(tier).observe(n)
        self.tier_seconds.labels(tier).observe(ms / 1e3)

    def answered(self, job: Job, outcome: Outcome) -> None:
        if outcome.prediction is None:
            self.images.labels(outcome.reason or "error").inc()
            return
        tr = outcome.prediction.trace
        tier = tr.tiers[-1] if tr.tiers else "none"
        self.exits.labels(tier, tr.rule or "unknown").inc()
        self.images.labels("anytime" if tr.anytime else "answered").inc()
        with self._lock:
            b = self._bucket()
            key = "deadline" if tr.anytime else tier
            b.exits[key] = b.exits.get(key, 0) + 1

    def deadline_fallback(self, stage: int) -> None:
        self.fallbacks.labels(self.tier_names[stage]).inc()
        with self._lock:
            self._fallbacks += 1

    def speculation(self, event: str, n: int = 1) -> None:
        self.spec.labels(event).inc(n)
        with self._lock:
            self._spec_counts[event] = self._spec_counts.get(event, 0) + n

    def tier_error(self, stage: int, tier: str, message: str) -> None:
        self.tier_errors.labels(tier).inc()

    def depth(self, depths: Sequence[int], inflight: int, speculating: bool) -> None:
        for t, d in zip(self.tier_names, depths):
            self.queue_depth.labels(t).set(d)
        self.inflight.set(inflight)
        self.spec_active.set(1 if speculating else 0)
        with self._lock:
            self._depths, self._speculating = list(depths), speculating

    # ------------------------------------------------------------------------------------ reading
    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def stats(self, live: dict | None = None) -> dict:
        """The dashboard's numbers: rates and percentiles over the last ``window_s`` seconds, plus a
        per-second series over the last ``history_s`` seconds."""
        now = int(time.time())
        with self._lock:
            secs = [s for s in self._seconds if s.t >= now - self.history_s]
            window = [s for s in secs if s.t > now - self.window_s]
            span = self.window_s
            lat = np.array([x for s in window for x in s.lat], dtype=np.float64)
            exits: dict[str, int] = {}
            for s in window:
                for k, v in s.exits.items():
                    exits[k] = exits.get(k, 0) + v
            by_t = {s.t: s for s in secs}
            series = []
            for t in range(now - self.history_s + 1, now + 1):
                s = by_t.get(t)
                series.append({
                    "t": t,
                    "rps": s.requests if s else 0,
                    **percentiles(s.lat if s else [], (50, 95), empty=None),
                })
            spec = dict(self._spec_counts)
            out = {
                "time": time.time(),
                "uptime_s": time.time() - self.started,
                "window_s": span,
                "requests_per_s": sum(s.requests for s in window) / span,
                "images_per_s": sum(s.images for s in window) / span,
                "errors_per_s": sum(s.errors for s in window) / span,
                "latency_ms": percentiles(lat, empty=None),
                "status_counts": dict(self._status),
                "tiers": list(self.tier_names),
                "exit_counts": exits,
                "exit_rates": {k: v / max(1, sum(exits.values())) for k, v in exits.items()},
                "queue_depth": dict(zip(self.tier_names, self._depths)),
                "speculation": {"active": self._speculating, **spec},
                "deadline_fallbacks": self._fallbacks,
                "series": series,
            }
        if live:
            out.update(live)
        return out
