"""Load generator and fuzzer for a running roadcascade server (loopback only).

- closed loop: N clients, each sending its next request as soon as the previous one is answered;
- open loop: requests at R per second (Poisson or fixed arrivals), latency measured from the scheduled
  arrival time (no coordinated omission); past ``max_connections`` outstanding requests an arrival is
  counted as ``client_dropped`` instead of queueing in the client;
- fuzz: at least N malformed requests (bad base64, truncated JPEGs, wrong content types, huge bodies,
  decompression bombs, bad JSON, ...) counted by kind and status, then a check that the server still
  answers a good request with the same prediction as before.

Requests are validator-style: a JPEG (quality 75) of a StreetWork test image, as a v2.0.4 validator
makes it (a seeded challenge view; ``views="clean"`` sends the centre square at 224 px), base64 in an
ImageSynapse JSON; synthetic images when the data set is absent. Everything is bounded in count and
time, and only loopback URLs are accepted. The HTTP/1.1 client is a small asyncio one (keep-alive, one
connection per outstanding request) so that the generator costs little CPU next to the server.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from ..metrics import percentiles as _percentiles
from .fuzzcases import fuzz_requests, jpeg_with_size, png_bomb  # noqa: F401 (the bombs stay importable from here)
from .http_messages import HttpRequest, HttpResponse

ENDPOINTS = {"streetvision": "/streetvision", "predict": "/v1/predict"}
MAX_REQUESTS_HARD = 2_000_000
MAX_DURATION_HARD = 3_600.0


class LoadgenError(ValueError):
    """A load test that cannot run as asked (non-loopback URL, bad option)."""


# ----------------------------------------------------------------------------------------------- target
@dataclass(frozen=True)
class Target:
    host: str
    port: int

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def loopback_target(url: str) -> Target:
    """Parse ``url`` and refuse anything that is not plain HTTP on a loopback address."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise LoadgenError(f"refusing {url!r}: only http:// URLs on a loopback address are load-tested")
    host = parts.hostname or ""
    ok = host == "localhost"
    if not ok:
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
    if not ok:
        raise LoadgenError(f"refusing to load-test {url!r}: only loopback hosts (127.0.0.1, ::1, localhost) are allowed")
    if parts.path not in ("", "/"):
        raise LoadgenError(f"give the server's base URL without a path (got {parts.path!r}); pick the endpoint with --endpoint")
    return Target("127.0.0.1" if host == "localhost" else host, parts.port or 80)


# ----------------------------------------------------------------------------------------------- HTTP client
class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects after the server closes it."""

    def __init__(self, target: Target):
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        w, self.reader, self.writer = self.writer, None, None
        if w is not None:
            w.close()
            try:
                await w.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass

    def _encode(self, r: HttpRequest) -> bytes:
        if r.raw is not None:
            return r.raw
        lines = [f"{r.method} {r.path} HTTP/1.1", f"Host: {self.target.authority}"]
        lines += [f"{k}: {v}" for k, v in r.headers]
        if r.chunked:
            lines.append("Transfer-Encoding: chunked")
            step = 1 << 16
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(r.body[i:i + step]), r.body[i:i + step]) for i in range(0, len(r.body), step))
            return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + chunks + b"0\r\n\r\n"
        if r.body or r.method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(r.body) if r.content_length is None else r.content_length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + r.body

    async def send(self, r: HttpRequest, timeout: float) -> HttpResponse:
        reused = self.writer is not None
        try:
            return await asyncio.wait_for(self._send(r), timeout)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as e:
            await self.close()
            if not reused or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                return HttpResponse(0, error=type(e).__name__)
            # the server closed this idle keep-alive connection before our request got there (no byte of an
            # answer came back): the request was not processed, so send it again on a new connection, as
            # HTTP clients do
            return await self.send(r, timeout)
        except asyncio.TimeoutError:
            await self.close()
            return HttpResponse(0, error="timeout")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            await self.close()
            return HttpResponse(0, error=f"{type(e).__name__}")

    async def _send(self, r: HttpRequest) -> HttpResponse:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port, limit=1 << 20)
        assert self.reader is not None and self.writer is not None
        self.writer.write(self._encode(r))
        try:
            await self.writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server may answer (413) and close before reading everything: read what it said
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await self.reader.read(1 << 24)
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return HttpResponse(status, body, headers)


# ----------------------------------------------------------------------------------------------- payloads
def synthetic_images(n: int, seed: int = 0, size: int = 224) -> list[tuple[np.ndarray, int]]:
    """Street-like pictures: sky, road, lane marks; every other one with orange cones (label 1)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        img = np.empty((size, size, 3), dtype=np.float32)
        horizon = int(size * rng.uniform(0.35, 0.55))
        img[:horizon] = np.array([135, 170, 215]) * rng.uniform(0.6, 1.1)
        img[horizon:] = np.array([90, 90, 95]) * rng.uniform(0.6, 1.2)
        lane = (np.abs(xx - size / 2 - (yy - horizon) * 0.1) < 2 + (yy - horizon) * 0.02) & (yy > horizon) & ((yy // 12) % 2 == 0)
        img[lane] = 235
        label = i % 2
        if label:
            for _ in range(int(rng.integers(2, 6))):
                cx, cy = rng.uniform(0.1, 0.9) * size, rng.uniform(horizon + 10, size - 5)
                h = rng.uniform(12, 40)
                tri = (yy <= cy) & (yy >= cy - h) & (np.abs(xx - cx) <= (yy - (cy - h)) * 0.35)
                img[tri] = [240, 110, 20]
                img[tri & (np.abs(yy - (cy - h * 0.5)) < h * 0.08)] = 245
        img += rng.normal(0, 6, img.shape)
        out.append((np.clip(img, 0, 255).astype(np.uint8), label))
    return out


def validator_images(n: int, data: str | None = None, split: str = "test", views: str = "challenge", seed: int = 1,
                     synthetic: bool = False) -> tuple[list[tuple[bytes, int]], str]:
    """``n`` (JPEG q75 bytes, label) pairs as a validator sends them, and where they came from."""
    from ..io.images import encode_jpeg

    if not synthetic:
        try:
            from ..io.data import open_dataset

            ds = open_dataset(data, split).subset(n, seed=seed)
            out = []
            for s in ds.samples:
                img = s.load()
                if views == "challenge":
                    from ..io.challenge import ChallengeConfig, challenge_views

                    (view,) = challenge_views(img, seed=seed, key=s.key, n=1, cfg=ChallengeConfig(size=224, jpeg_quality=None))
                else:
                    from ..io.challenge import level0

                    view = level0(img, 224)
                out.append((encode_jpeg(view, 75), s.label))
            if out:
                return out, f"{ds.name} ({views} views, JPEG q75)"
        except Exception as e:  # no data set here: fall back to synthetic pictures
            reason = f"{type(e).__name__}: {str(e)[:80]}"
        else:
            reason = "empty split"
        source = f"synthetic (data set unavailable: {reason})"
    else:
        source = "synthetic"
    return [(encode_jpeg(img, 75), y) for img, y in synthetic_images(n, seed)], source


def request_for(endpoint: str, jpeg: bytes, label: int, deadline_ms: float | None = None) -> HttpRequest:
    b64 = base64.b64encode(jpeg).decode("ascii")
    if endpoint == "streetvision":
        doc: dict = {"image": b64, "prediction": -1.0, "testnet_label": label}
    else:
        doc = {"image": b64}
    headers = [("Content-Type", "application/json")]
    if deadline_ms:
        headers.append(("X-Deadline-Ms", f"{deadline_ms:g}"))
    return HttpRequest("POST", ENDPOINTS[endpoint], json.dumps(doc).encode(), headers)


def read_prediction(endpoint: str, body: bytes) -> float | None:
    try:
        doc = json.loads(body)
        v = doc["prediction"] if endpoint == "streetvision" else doc["probability"]
        return float(v)
    except (ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class Sample:
    t: float  # scheduled (open loop) or send time (closed loop), seconds from the run's start
    latency_ms: float
    status: int
    kind: str = "good"
    valid: bool = True  # a 200 whose prediction is a float in [0, 1]
    error: str = ""


def percentiles(x: Sequence[float]) -> dict:
    """n, mean, p50/p95/p99 and max of latencies (``{"n": 0}`` when there are none)."""
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), **_percentiles(a), "max": float(a.max())}


def summarize(samples: Sequence[Sample], elapsed: float, deadline_ms: float | None = None) -> dict:
    by_status: dict[str, int] = {}
    for s in samples:
        key = str(s.status) if s.status else (s.error or "no_response")
        by_status[key] = by_status.get(key, 0) + 1
    ok = [s for s in samples if s.status == 200]
    lat = {"all": percentiles([s.latency_ms for s in samples if s.status])}
    for st in sorted({s.status for s in samples if s.status}):
        lat[str(st)] = percentiles([s.latency_ms for s in samples if s.status == st])
    out = {
        "requests": len(samples),
        "elapsed_s": elapsed,
        "throughput_rps": len([s for s in samples if s.status]) / elapsed if elapsed > 0 else 0.0,
        "ok_rps": len(ok) / elapsed if elapsed > 0 else 0.0,
        "status_counts": dict(sorted(by_status.items())),
        "latency_ms": lat,
        "server_errors_5xx": sum(1 for s in samples if s.status >= 500 and s.status != 503),
        "invalid_predictions": sum(1 for s in ok if not s.valid),
    }
    if deadline_ms:
        out["deadline_ms"] = deadline_ms
        out["ok_within_deadline"] = (sum(1 for s in ok if s.latency_ms <= deadline_ms) / len(ok)) if ok else None
    return out


def _check_bounds(duration: float, max_requests: int | None) -> None:
    if not 0 < duration <= MAX_DURATION_HARD:
        raise LoadgenError(f"--duration must be in (0, {MAX_DURATION_HARD:g}] seconds (got {duration})")
    if max_requests is not None and not 0 < max_requests <= MAX_REQUESTS_HARD:
        raise LoadgenError(f"--requests must be in (0, {MAX_REQUESTS_HARD}] (got {max_requests})")


async def _closed(target: Target, reqs: Sequence[HttpRequest], endpoint: str, concurrency: int, duration: float,
                  max_requests: int, timeout: float) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    t0 = time.perf_counter()
    stop_at = t0 + duration
    counter = iter(range(max_requests))

    async def client(i: int) -> None:
        conn = Connection(target)
        try:
            for n in counter:
                now = time.perf_counter()
                if now >= stop_at:
                    break
                r = reqs[(n * 7919 + i) % len(reqs)]
                resp = await conn.send(r, timeout)
                lat = (time.perf_counter() - now) * 1e3
                valid = resp.status != 200 or _valid(read_prediction(endpoint, resp.body))
                samples.append(Sample(now - t0, lat, resp.status, valid=valid, error=resp.error))
        finally:
            await conn.close()

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return samples, time.perf_counter() - t0


def _valid(p: float | None) -> bool:
    return p is not None and math.isfinite(p) and 0.0 <= p <= 1.0


def arrival_times(rate: float, duration: float, max_requests: int, arrival: str = "poisson", seed: int = 0) -> np.ndarray:
    """Scheduled send times (seconds from the start) of an open-loop run."""
    n = int(min(max_requests, math.ceil(rate * duration * 1.5) + 10))
    if arrival == "fixed":
        t = np.arange(n) / rate
    elif arrival == "poisson":
        t = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))
    else:
        raise LoadgenError(f"--arrival must be poisson or fixed (got {arrival!r})")
    return t[t < duration][:max_requests]


async def _open(target: Target, reqs: Sequence[HttpRequest], endpoint: str, rate: float, duration: float, max_requests: int,
                timeout: float, arrival: str, max_connections: int, seed: int) -> tuple[list[Sample], float, int, list[float]]:
    samples: list[Sample] = []
    idle: list[Connection] = []
    opened = 0
    dropped = 0
    tasks: set[asyncio.Task] = set()
    times = arrival_times(rate, duration, max_requests, arrival, seed)
    t0 = time.perf_counter()

    async def one(conn: Connection, r: HttpRequest, at: float) -> None:
        resp = await conn.send(r, timeout)
        lat = (time.perf_counter() - (t0 + at)) * 1e3
        valid = resp.status != 200 or _valid(read_prediction(endpoint, resp.body))
        samples.append(Sample(at, lat, resp.status, valid=valid, error=resp.error))
        idle.append(conn)

    lags: list[float] = []
    for i, at in enumerate(times):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, time.perf_counter() - t0 - at) * 1e3)
        if idle:
            conn = idle.pop()
        elif opened < max_connections:
            conn, opened = Connection(target), opened + 1
        else:
            dropped += 1
            continue
        task = asyncio.create_task(one(conn, reqs[(i * 7919) % len(reqs)], float(at)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 1)
    elapsed = max(time.perf_counter() - t0, float(times[-1]) if len(times) else 0.0)
    for c in idle:
        await c.close()
    return samples, elapsed, dropped, lags


def run_load(url: str, *, concurrency: int = 8, duration: float = 10.0, rate: float | None = None, max_requests: int | None = None,
             endpoint: str = "streetvision", deadline_ms: float | None = None, arrival: str = "poisson", data: str | None = None,
             synthetic: bool = False, views: str = "challenge", n_images: int = 64, timeout: float = 30.0,
             max_connections: int = 1024, seed: int = 0, images: list[tuple[bytes, int]] | None = None) -> dict:
    """One load test; returns the report (see ``summarize``) with the run's settings."""
    target = loopback_target(url)
    _check_bounds(duration, max_requests)
    if endpoint not in ENDPOINTS:
        raise LoadgenError(f"--endpoint must be one of {', '.join(ENDPOINTS)} (got {endpoint!r})")
    if concurrency < 1:
        raise LoadgenError(f"--concurrency must be >= 1 (got {concurrency})")
    if rate is not None and rate <= 0:
        raise LoadgenError(f"--rate must be > 0 requests/s (got {rate})")
    source = "given"
    if images is None:
        images, source = validator_images(n_images, data, views=views, synthetic=synthetic, seed=seed + 1)
    reqs = [request_for(endpoint, jpg, y, deadline_ms) for jpg, y in images]
    cap = max_requests or MAX_REQUESTS_HARD
    if rate is None:
        samples, elapsed = asyncio.run(_closed(target, reqs, endpoint, concurrency, duration, cap, timeout))
        extra = {"mode": "closed", "concurrency": concurrency}
    else:
        samples, elapsed, dropped, lags = asyncio.run(_open(target, reqs, endpoint, rate, duration, cap, timeout, arrival,
                                                            max_connections, seed))
        extra = {"mode": "open", "rate": rate, "arrival": arrival, "client_dropped": dropped, "max_connections": max_connections,
                 "client_send_lag_ms": percentiles(lags)}  # how late the generator itself sent (counted in latency)
    report = {"url": url, "endpoint": ENDPOINTS[endpoint], "duration_s": duration, "images": source, "n_images": len(images),
              **extra, **summarize(samples, elapsed, deadline_ms)}
    report["timeline"] = _timeline(samples)
    return report


def _timeline(samples: Sequence[Sample], step: float = 1.0) -> list[dict]:
    """Per-second counts by status class and p99 latency of the 200s (sent in that second)."""
    if not samples:
        return []
    last = max(s.t for s in samples)
    out = []
    for i in range(int(last // step) + 1):
        sl = [s for s in samples if i * step <= s.t < (i + 1) * step]
        ok = [s.latency_ms for s in sl if s.status == 200]
        out.append({"t": i * step, "sent": len(sl), "ok": len(ok), "503": sum(1 for s in sl if s.status == 503),
                    "other": sum(1 for s in sl if s.status not in (200, 503)),
                    "p99_ok_ms": float(np.percentile(ok, 99)) if ok else None})
    return out


# ----------------------------------------------------------------------------------------------- fuzz
async def _fuzz(target: Target, reqs: Sequence[HttpRequest], good: HttpRequest, concurrency: int, timeout: float) -> dict:
    probe = Connection(target)
    before = await probe.send(good, timeout)
    results: list[tuple[str, int, str]] = []
    reasons: dict[str, int] = {}
    queue_ = list(reversed(reqs))

    async def worker() -> None:
        conn = Connection(target)
        while queue_:
            r = queue_.pop()
            resp = await conn.send(r, timeout)
            results.append((r.kind, resp.status, resp.error))
            if resp.status >= 400:
                reason = _error_reason(resp.body)
                reasons[f"{resp.status} {reason}"] = reasons.get(f"{resp.status} {reason}", 0) + 1
        await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    after = await probe.send(good, timeout)
    health = await probe.send(HttpRequest("GET", "/readyz"), timeout)
    await probe.close()
    by_kind: dict[str, dict[str, int]] = {}
    by_status: dict[str, int] = {}
    for kind, status, err in results:
        key = str(status) if status else (err or "no_response")
        by_kind.setdefault(kind, {})[key] = by_kind.setdefault(kind, {}).get(key, 0) + 1
        by_status[key] = by_status.get(key, 0) + 1
    p0, p1 = read_prediction("streetvision", before.body), read_prediction("streetvision", after.body)
    return {
        "requests": len(results),
        "elapsed_s": elapsed,
        "status_counts": dict(sorted(by_status.items())),
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "by_reason": dict(sorted(reasons.items())),
        "server_errors_5xx": sum(1 for _, s, _ in results if s >= 500),
        "no_response": sum(1 for _, s, _ in results if s == 0),
        "good_before": {"status": before.status, "prediction": p0},
        "good_after": {"status": after.status, "prediction": p1},
        "ready_after": health.status == 200,
        "answers_same_after": before.status == after.status == 200 and p0 is not None and p1 is not None and abs(p0 - p1) < 1e-4,
    }


def _error_reason(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc["error"]["reason"]) if isinstance(doc.get("error"), dict) else str(doc.get("detail", "?"))[:40]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?"


def run_fuzz(url: str, n: int = 1000, *, concurrency: int = 8, timeout: float = 30.0, max_body: int = 16 * 2**20,
             seed: int = 0, huge_cases: int = 6, data: str | None = None, synthetic: bool = False) -> dict:
    """At least ``n`` malformed requests, then the same good request as before the run."""
    target = loopback_target(url)
    if not 1 <= n <= 100_000:
        raise LoadgenError(f"--fuzz must be in [1, 100000] (got {n})")
    images, source = validator_images(1, data, synthetic=synthetic, seed=seed + 1)
    jpeg, label = images[0]
    reqs = fuzz_requests(n, jpeg, max_body=max_body, seed=seed, huge_cases=huge_cases)
    good = request_for("streetvision", jpeg, label)
    report = asyncio.run(_fuzz(target, reqs, good, concurrency, timeout))
    report.update(url=url, mode="fuzz", images=source, ok=report["server_errors_5xx"] == 0 and report["answers_same_after"]
                  and report["ready_after"])
    return report
