"""Measure the #14 denial-of-service scenarios against `roadcascade serve` in a subprocess on 127.0.0.1.

1. slow bodies: N connections send their headers and then one body byte every T s while one good client
   sends /streetvision requests back to back; status counts of the good client, what the slow ones got,
   and the server's 5xx count afterwards;
2. slow headers: N connections trickle header bytes (reconnecting once answered) while one good client sends
   /streetvision requests back to back; what they got and when (``mixed``: 1 and 2 at once, 2N connections);
3. pixel bombs: K concurrent /streetvision requests, each a ~700-byte lossless WebP declaring 4000x4000;
   statuses and the server's peak RSS (VmHWM);
4. batch bombs: B concurrent /v1/predict/batch requests of 64 such images each (a 60 KB body); the same.

Loopback only, every part bounded in time. Run it with the code under test on PYTHONPATH, e.g.

    PYTHONPATH=src python scripts/attack_probe.py --bundle B --json runs/attack.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from roadcascade.bench.serving import ServerProcess


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def good_image() -> str:
    rgb = np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=75)
    return base64.b64encode(buf.getvalue()).decode()


def bomb_image() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4000, 4000), (90, 90, 90)).save(buf, format="WEBP", lossless=True)
    return base64.b64encode(buf.getvalue()).decode()


async def read_status(reader: asyncio.StreamReader, timeout: float) -> int:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (asyncio.TimeoutError, ConnectionError):
        return 0
    m = re.match(rb"HTTP/1\.[01] (\d{3})", line)
    return int(m.group(1)) if m else 0


async def slow_client(port: int, head: bytes, trickle: bytes, every_s: float, until: float) -> tuple[int, float]:
    """Send ``head`` then ``trickle`` every ``every_s`` until answered or ``until``; (status, seconds to answer)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status = 0
    try:
        writer.write(head)
        await writer.drain()
        while time.monotonic() < until:
            status = await read_status(reader, min(every_s, max(0.01, until - time.monotonic())))
            if status or reader.at_eof():
                break
            writer.write(trickle)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
    return status, time.monotonic() - t0


async def good_client(url: str, image: str, until: float, deadline_ms: float | None = None) -> list[tuple[int, float]]:
    out = []
    headers = {"X-Deadline-Ms": str(int(deadline_ms))} if deadline_ms else {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while time.monotonic() < until:
            t0 = time.monotonic()
            try:
                code = (await c.post("/streetvision", json={"image": image, "prediction": -1.0, "testnet_label": 0},
                                     headers=headers)).status_code
            except httpx.HTTPError:
                code = 0
            out.append((code, (time.monotonic() - t0) * 1e3))
    return out


def fivexx(srv: ServerProcess) -> int:
    return int(sum(v for k, v in srv.metrics().items() if k.startswith("roadcascade_requests_total") and 'status="5' in k
                   and 'status="503"' not in k))


def good_summary(good: list[tuple[int, float]], deadline_ms: float | None) -> dict:
    codes = Counter(c for c, _ in good)
    lat = sorted(ms for c, ms in good if c == 200)
    pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1)) if lat else (lambda q: None)
    out = {"good_status_counts": dict(codes), "good_deadline_ms": deadline_ms, "good_p50_ms": pct(0.5),
           "good_p99_ms": pct(0.99), "good_max_ms": round(lat[-1], 1) if lat else None}
    if deadline_ms:
        out["good_200_over_deadline"] = sum(ms > deadline_ms for ms in lat)
    return out


async def slow_bodies(srv: ServerProcess, n: int, every_s: float, duration: float, deadline_ms: float | None = None) -> dict:
    image = good_image()
    body_len = len(json.dumps({"image": image}))
    head = (f"POST /streetvision HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_len}\r\n\r\n{{").encode()
    until = time.monotonic() + duration
    slow = [asyncio.create_task(slow_client(srv.port, head, b" ", every_s, until)) for _ in range(n)]
    await asyncio.sleep(0.5)
    good = await good_client(srv.url, image, until, deadline_ms)
    slow_res = await asyncio.gather(*slow)
    return {"slow_connections": n, "trickle_every_s": every_s, "duration_s": duration, **good_summary(good, deadline_ms),
            "slow_status_counts": dict(Counter(c for c, _ in slow_res)),
            "slow_answered_after_s_max": max((t for c, t in slow_res if c), default=None)}


async def slow_headers(srv: ServerProcess, n: int, every_s: float, duration: float, deadline_ms: float | None = None) -> dict:
    """n connections trickle header bytes (each reconnects once answered, until the end) while one good client
    sends /streetvision requests back to back."""
    until = time.monotonic() + duration

    async def trickler() -> list[tuple[int, float]]:
        got = []
        while time.monotonic() < until - 1:
            got.append(await slow_client(srv.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X", every_s, until))
        return got

    tasks = [asyncio.create_task(trickler()) for _ in range(n)]
    await asyncio.sleep(0.5)
    good = await good_client(srv.url, good_image(), until, deadline_ms)
    res = [r for rs in await asyncio.gather(*tasks) for r in rs]
    return {"connections": n, "trickle_every_s": every_s, "duration_s": duration, **good_summary(good, deadline_ms),
            "slow_status_counts": dict(Counter(c for c, _ in res)),
            "slow_answered_after_s_max": max((t for c, t in res if c), default=None)}


async def mixed(srv: ServerProcess, n: int, every_s: float, duration: float, deadline_ms: float | None = None) -> dict:
    """slow_bodies and slow_headers at once: n connections of each while the good client runs."""
    bodies = asyncio.create_task(slow_bodies(srv, n, every_s, duration, deadline_ms))
    heads = asyncio.create_task(slow_headers(srv, n, every_s, duration, None))
    b, h = await bodies, await heads
    return {"slow_body_connections": n, "slow_header_connections": n, "trickle_every_s": every_s, "duration_s": duration,
            **{k: v for k, v in b.items() if k.startswith("good_")},
            "slow_body_status_counts": b["slow_status_counts"], "slow_body_answered_after_s_max": b["slow_answered_after_s_max"],
            "slow_header_status_counts": h["slow_status_counts"], "slow_header_answered_after_s_max": h["slow_answered_after_s_max"],
            "header_client_good_status_counts": h["good_status_counts"]}


async def pixel_bombs(srv: ServerProcess, k: int) -> dict:
    image = bomb_image()
    rss0 = peak_rss_mb(srv.proc.pid)
    async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=httpx.Limits(max_connections=k)) as c:
        async def one() -> int:
            try:
                return (await c.post("/streetvision", json={"image": image, "prediction": -1.0})).status_code
            except httpx.HTTPError:
                return 0
        t0 = time.monotonic()
        codes = await asyncio.gather(*[one() for _ in range(k)])
    return {"requests": k, "bytes_each": len(base64.b64decode(image)), "status_counts": dict(Counter(codes)),
            "seconds": round(time.monotonic() - t0, 2), "peak_rss_mb_before": round(rss0, 1),
            "peak_rss_mb_after": round(peak_rss_mb(srv.proc.pid), 1)}


async def batch_bombs(srv: ServerProcess, b: int, per: int = 64) -> dict:
    image = bomb_image()
    rss0 = peak_rss_mb(srv.proc.pid)
    async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=httpx.Limits(max_connections=max(1, b))) as c:
        async def one() -> int:
            try:
                return (await c.post("/v1/predict/batch", json={"images": [image] * per})).status_code
            except httpx.HTTPError:
                return 0
        t0 = time.monotonic()
        codes = await asyncio.gather(*[one() for _ in range(b)])
    return {"requests": b, "images_each": per, "status_counts": dict(Counter(codes)), "seconds": round(time.monotonic() - t0, 2),
            "peak_rss_mb_before": round(rss0, 1), "peak_rss_mb_after": round(peak_rss_mb(srv.proc.pid), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--slow", type=int, default=130)
    ap.add_argument("--every-s", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--good-deadline-ms", type=float, default=None, help="X-Deadline-Ms of the good client's requests")
    ap.add_argument("--bombs", type=int, default=64)
    ap.add_argument("--batch-bombs", type=int, default=1)
    ap.add_argument("--parts", default="bodies,headers,bombs,batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--serve-args", default="")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rep: dict = {}
    with ServerProcess(a.bundle, a.serve_args.split(), threads=a.threads) as srv:
        if "bodies" in a.parts:
            rep["slow_bodies"] = asyncio.run(slow_bodies(srv, a.slow, a.every_s, a.duration, a.good_deadline_ms))
            time.sleep(1)
            rep["slow_bodies"]["server_5xx_after"] = fivexx(srv)
        if "headers" in a.parts:
            rep["slow_headers"] = asyncio.run(slow_headers(srv, a.slow, a.every_s, a.duration, a.good_deadline_ms))
            time.sleep(1)
            rep["slow_headers"]["server_5xx_after"] = fivexx(srv)
        if "mixed" in a.parts:
            rep["mixed"] = asyncio.run(mixed(srv, a.slow, a.every_s, a.duration, a.good_deadline_ms))
            time.sleep(1)
            rep["mixed"]["server_5xx_after"] = fivexx(srv)
        if "bombs" in a.parts:
            rep["pixel_bombs"] = asyncio.run(pixel_bombs(srv, a.bombs))
        if "batch" in a.parts:
            rep["batch_bombs"] = asyncio.run(batch_bombs(srv, a.batch_bombs))
        rep["server_5xx_total"] = fivexx(srv)
        rep["ready_after"] = httpx.get(srv.url + "/readyz", timeout=10).status_code
    print(json.dumps(rep, indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
