"""The HTTP app: FastAPI endpoints over the multi-stage batcher.

``create_app(bundle, config)`` returns an ASGI app. Models load and warm up in a background thread at
start-up, so ``/healthz`` answers at once and ``/readyz`` turns 200 only when the batcher is ready.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..cascade.runtime import Cascade
from ..io.images import BadImage, image_size
from .batcher import MultiStageBatcher
from .budget import PixelBudget, Reservation
from .config import ServeConfig
from .inputs import (DEADLINE_HEADER, HttpError, decode_item, image_field, images_field, item_bytes, json_object, media_type,
                     parse_deadline_ms, prepare_item)
from .messages import Outcome
from .metrics import ServeMetrics
from .protocol import FIRST_BYTE

log = logging.getLogger("roadcascade.serve")
STATIC = Path(__file__).parent / "static"
ROUTES = {
    "/v1/predict": "predict", "/v1/predict/batch": "predict_batch", "/streetvision": "streetvision",
    "/healthz": "healthz", "/readyz": "readyz", "/metrics": "metrics", "/": "dashboard", "/v1/stats": "stats",
    "/docs": "docs", "/openapi.json": "docs",
}


# ----------------------------------------------------------------------------------------------- docs models
class PredictRequest(BaseModel):
    image: str = Field(..., description="base64 of a JPEG/PNG/WebP/BMP/GIF/TIFF image (a data: URL is accepted)")


class BatchRequest(BaseModel):
    images: list[str] = Field(..., description="base64 images")


class TraceModel(BaseModel):
    tiers: list[str]
    probs: dict[str, float]
    rule: str = Field(..., description="the deciding rule: confidence, final, deadline, ...")
    exit: int
    ms: dict[str, float] = Field(..., description="per tier: wall time of the batch it ran in")
    anytime: bool = Field(..., description="answered early from the tiers that had run (deadline)")
    speculative: bool = False
    queue_ms: float = 0.0
    total_ms: float = 0.0


class PredictResponse(BaseModel):
    probability: float = Field(..., description="P(roadwork), calibrated and folded: > 0.5 means roadwork")
    label: int
    trace: TraceModel


class ImageSynapse(BaseModel):
    image: str = Field(..., description="base64 of a JPEG (PIL quality 75), as a NATIX validator sends it")
    prediction: float = Field(-1.0, description="filled by the miner with a float in [0, 1]")
    testnet_label: int = -1


class ErrorModel(BaseModel):
    error: dict[str, Any]


def _body_doc(model: type[BaseModel], multipart: bool = True, raw: bool = False) -> dict:
    content: dict[str, Any] = {"application/json": {"schema": model.model_json_schema()}}
    if multipart:
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}}}
    if raw:
        content["image/jpeg"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


ERRORS = {400: {"model": ErrorModel, "description": "bad input (reason in the body)"},
          413: {"model": ErrorModel, "description": "body, image or pixel count too large"},
          415: {"model": ErrorModel, "description": "not an image, or an unsupported content type"},
          503: {"model": ErrorModel, "description": "overloaded, deadline cannot be met, or not ready (see Retry-After)"}}


# ----------------------------------------------------------------------------------------------- middleware
class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _http_problem(scope: Scope) -> tuple[int, str, str] | None:
    """HTTP/0.9 (or an unknown version) and an HTTP/1.1 request without exactly one Host header are refused."""
    version = scope.get("http_version", "1.1")
    if version not in ("1.0", "1.1"):
        return 505, "bad_http_version", f"HTTP/{version[:8]} is not served; use HTTP/1.1"
    hosts = sum(1 for k, _ in scope.get("headers", []) if k == b"host")
    if version == "1.1" and hosts != 1:
        return 400, "bad_host", f"an HTTP/1.1 request needs exactly one Host header (got {hosts})"
    return None


OPEN_HEALTH = frozenset({"/healthz", "/readyz", "/metrics", "/v1/stats"})  # /v1/stats: the dashboard's numbers (counts only)


def _auth_problem(scope: Scope, api_key: bytes | None, open_health: bool) -> tuple[int, str, str] | None:
    """With a key, every path but the dashboard page, its static files and (when open) health and metrics needs
    ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (compared in constant time)."""
    if api_key is None:
        return None
    path = scope.get("path", "")
    if path == "/" or path.startswith("/static/") or (open_health and path in OPEN_HEALTH):
        return None
    given = b""
    for k, v in scope.get("headers", []):
        if k == b"x-api-key":
            given = v.strip()
        elif k == b"authorization" and v[:7].lower() == b"bearer ":
            given = v[7:].strip()
    if given and hmac.compare_digest(given, api_key):
        return None
    return 401, "unauthorized", "this server needs an API key: Authorization: Bearer <key> or X-API-Key: <key>"


class ServeMiddleware:
    """Arrival time, HTTP version and Host checks, body-size limit before the body is read, a body-read
    timeout (408), metrics for every request, client disconnects counted as such (499, never a 5xx, no
    traceback), a JSON 503 for a request cut by shutdown, and a JSON 500 for an unexpected exception (the
    server goes on)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, max_body: int, body_timeout_s: float = 30.0,
                 api_key: str | None = None, open_health: bool = True):
        self.app, self.metrics, self.max_body, self.body_timeout_s = app, metrics, max_body, body_timeout_s
        self.api_key, self.open_health = (api_key.encode() if api_key else None), open_health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        # from the request's first byte when the protocol saw it (protocol.py), else from now
        state["arrived"] = state.get(FIRST_BYTE) or time.monotonic()
        endpoint = ROUTES.get(scope.get("path", ""), "static" if scope.get("path", "").startswith("/static/") else "other")
        sent = {"status": 0}

        async def send_(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                sent["status"] = msg["status"]
                state["answered"] = True
            await send(msg)

        async def reply(status: int, reason: str, message: str) -> None:
            state["reason"] = reason
            body = json_bytes({"error": {"reason": reason, "message": message, "status": status}})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            if status == 503:
                headers.append((b"retry-after", b"1"))
            if status == 401:
                headers.append((b"www-authenticate", b'Bearer realm="roadcascade"'))
            await send_({"type": "http.response.start", "status": status, "headers": headers})
            await send_({"type": "http.response.body", "body": body})

        problem = _http_problem(scope) or _auth_problem(scope, self.api_key, self.open_health)
        try:
            length = _content_length(scope)
        except ValueError as e:  # a malformed Content-Length (uvicorn's parsers usually refuse it first)
            problem = problem or (400, "bad_request", str(e)[:200])
        if problem is not None:
            await reply(*problem)
            self.metrics.request(endpoint, problem[0], problem[1], time.perf_counter() - t0)
            return
        try:
            if length is not None and length > self.max_body:
                if length <= DRAIN_FACTOR * self.max_body:
                    await _drain(receive, length)
                await reply(413, "too_large", f"the body has {length:,} bytes; at most {self.max_body:,}")
                return
            await self.app(scope, self._receiver(receive, state, watch=endpoint in PREDICTION_ENDPOINTS), send_)
        except _BodyTooLarge:
            if not sent["status"]:
                await _drain(receive, DRAIN_FACTOR * self.max_body - state.get("body_seen", 0))
                await reply(413, "too_large", f"the body is larger than {self.max_body:,} bytes")
        except _BodyTimeout:
            if not sent["status"]:
                await reply(408, "body_timeout", f"the request body took longer than {self.body_timeout_s:g} s")
        except ClientDisconnect:
            state["reason"] = "client_disconnect"
        except asyncio.CancelledError:  # uvicorn cancels what is still running when graceful shutdown ends
            if not sent["status"]:
                await reply(503, "shutting_down", "the server is shutting down; retry")
        except Exception as e:
            log.exception("unhandled error on %s", scope.get("path"))
            if not sent["status"]:
                await reply(500, "internal", f"internal error ({type(e).__name__}); the server goes on")
        finally:
            watcher = state.pop("watcher", None)
            if watcher is not None:
                watcher.cancel()
            gone = state.get("gone") or (not sent["status"] and state.get("reason") == "client_disconnect")
            status = CLIENT_CLOSED if gone else sent["status"] or 500
            self.metrics.request(endpoint, status, state.get("reason", ""), time.perf_counter() - t0,
                                 state.get("n_images", 0))

    def _receiver(self, receive: Receive, state: dict, watch: bool = False) -> Receive:
        """``receive`` with the body-size limit and the body-read deadline (only until the body is complete:
        later receives wait for a disconnect and must not time out). With ``watch``, once the body is read a
        task waits for the client to go away before its answer (counted as 499, not as the status sent into
        the void)."""
        end = time.monotonic() + self.body_timeout_s
        state["body_seen"] = 0
        done = False

        async def receive_() -> Message:
            nonlocal done
            if done:
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, end - time.monotonic()))
            except TimeoutError:
                raise _BodyTimeout() from None
            if msg["type"] == "http.request":
                state["body_seen"] += len(msg.get("body", b""))
                if state["body_seen"] > self.max_body:
                    raise _BodyTooLarge()
                done = not msg.get("more_body", False)
                if done and watch:
                    state["watcher"] = asyncio.ensure_future(_watch_disconnect(receive, state))
            elif msg["type"] == "http.disconnect":
                state["reason"] = "client_disconnect"
            return msg

        return receive_


async def _watch_disconnect(receive: Receive, state: dict) -> None:
    msg = await receive()  # uvicorn answers http.disconnect when the client goes, or once the response is complete
    if msg["type"] == "http.disconnect" and not state.get("answered"):
        state["gone"], state["reason"] = True, "client_disconnect"


CLIENT_CLOSED = 499  # the client went away before its answer (nginx's code); never counted as a 5xx
PREDICTION_ENDPOINTS = frozenset({"predict", "predict_batch", "streetvision"})
DRAIN_FACTOR = 2  # read and discard up to 2x the body limit before a 413, so that the client can read it
DRAIN_SECONDS = 2.0


async def _drain(receive: Receive, limit: int) -> None:
    """Discard the rest of a refused body (bounded in bytes and time): a server that closes a connection
    with unread data makes the kernel reset it, and the client never sees the 413."""
    end = time.monotonic() + DRAIN_SECONDS
    got = 0
    while got <= limit:
        left = end - time.monotonic()
        if left <= 0:
            return
        try:
            msg = await asyncio.wait_for(receive(), left)
        except Exception:  # timeout, or the client went away
            return
        if msg["type"] != "http.request":
            return
        got += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                n = int(v)
            except ValueError:
                raise ValueError(f"Content-Length is not a number: {v[:40]!r}") from None
            if n < 0:
                raise ValueError("Content-Length is negative")
            return n
    return None


# ----------------------------------------------------------------------------------------------- server state
class Server:
    """What the endpoints share: config, metrics, the batcher (once loaded) and the decode threads."""

    def __init__(self, source: Any, config: ServeConfig, device: str | None = None):
        self.cfg, self.source, self.device = config, source, device
        self.metrics = ServeMetrics([], window_s=config.stats_window_s)
        self.batcher: MultiStageBatcher | None = None
        self.cascade: Cascade | None = None
        self.gpu: Any = None  # GpuStageCascade when the GPU fast path serves (serve/gpu_stage.py)
        self.bundle_meta: dict = {}
        self.phase = "loading"  # loading | warming_up | ready | failed | stopped
        self.error = ""
        self.warmup_ms: dict = {}
        self._decoder = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="rc-decode")
        self.pixels = PixelBudget(config.server_pixels)  # decoded pixels held by requests (budget.py)
        self._loader: threading.Thread | None = None
        self.loop_lag = 0.0  # seconds: how late the event loop runs what it schedules (EMA)
        self.pending = 0  # prediction requests between the precheck and their answer (reading, decoding, queued)
        self._stopping = False

    async def watch_loop(self, period: float = 0.05) -> None:
        """Measure event-loop lag: time an HTTP request waits before (and after) the handler runs, which the
        deadline logic must leave room for and which says the HTTP layer itself is overloaded."""
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(period)
            lag = max(0.0, time.monotonic() - t0 - period)
            self.loop_lag += 0.3 * (lag - self.loop_lag)  # smoothed: one GC pause does not shed load
            self.metrics.loop_lag.set(self.loop_lag)

    # lifecycle -------------------------------------------------------------------------------
    def start(self, background: bool = True) -> None:
        if background:
            self._loader = threading.Thread(target=self._load, name="rc-loader", daemon=True)
            self._loader.start()
        else:
            self._load()

    def _load(self) -> None:
        try:
            cascade = self._cascade()
            self.cascade = cascade
            runner: Any = cascade
            if self.cfg.gpu != "off":
                from ..accel.runtime import GpuConfig, maybe_gpu_cascade

                gc = maybe_gpu_cascade(cascade, enabled=self.cfg.gpu, config=GpuConfig(limits=self.cfg.decode_limits),
                                       log=log.info, device=self.device)
                if gc is not None:
                    from .gpu_stage import GpuStageCascade

                    runner = self.gpu = GpuStageCascade(gc)
                    log.info("GPU fast path on %s (decoder %s): one stage %s", gc.device, gc.gpu_decoder, runner.tier_names)
            self.metrics.set_tiers(runner.tier_names)
            b = MultiStageBatcher(runner, self.cfg, events=self.metrics)
            self.batcher = b
            b.start()
            if self.cfg.warmup:
                self.phase = "warming_up"
                t0 = time.perf_counter()
                self.warmup_ms = {"total": 0.0, "tiers": b.warmup(should_stop=lambda: self._stopping)}
                self.warmup_ms["total"] = (time.perf_counter() - t0) * 1e3
            if self._stopping:
                return
            b.ready = True
            self.phase = "ready"
            self.metrics.ready.set(1)
            log.info("ready: %d tier(s) %s", cascade.n_stages, cascade.tier_names)
        except Exception as e:
            self.phase, self.error = "failed", f"{type(e).__name__}: {e}"
            log.exception("could not load the bundle")

    def _cascade(self) -> Cascade:
        src = self.source
        if isinstance(src, Cascade):
            return src
        from ..cascade.bundle import Bundle

        if isinstance(src, Bundle):
            self.bundle_meta = {"path": str(src.path) if src.path else None}
            return src.cascade
        from ..models.preprocess import pick_device

        b = Bundle.load(src, device=pick_device(self.device))
        self.bundle_meta = {"path": str(b.path)}
        return b.cascade

    def wait_ready(self, timeout: float = 60.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.phase in ("ready", "failed"):
                return self.phase == "ready"
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self._stopping = True
        self.metrics.ready.set(0)
        if self._loader is not None:
            self._loader.join(30)
        if self.batcher is not None:
            self.batcher.stop()
        self.phase = "stopped"
        self._decoder.shutdown(wait=False, cancel_futures=True)

    # request helpers --------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.phase == "ready" and self.batcher is not None and self.batcher.ready

    def precheck(self, request: Request, n: int = 1) -> None:
        """Refuse before reading the body when the server cannot take the work anyway."""
        if not self.ready:
            raise HttpError(503, "not_ready", f"not ready ({self.phase}); poll /readyz", {"Retry-After": "1"})
        b = self.batcher
        assert b is not None
        if not b.has_room(n):
            raise HttpError(503, "overloaded", f"queue full ({b.inflight} images in flight)",
                            {"Retry-After": str(b.retry_after())})
        if self.pending >= self.cfg.max_queue:  # requests still being read or decoded count too
            raise HttpError(503, "overloaded", f"{self.pending} requests in progress", {"Retry-After": str(b.retry_after())})
        if self.loop_lag * 1e3 > self.cfg.max_loop_lag_ms:
            raise HttpError(503, "overloaded_http", f"the HTTP layer is overloaded (event loop {self.loop_lag * 1e3:.0f} ms late)",
                            {"Retry-After": str(b.retry_after())})

    def anytime_check(self, request: Request, o: Outcome) -> Outcome:
        """Count an anytime answer (tier-0 or later answer given because the deadline came), or turn it into the
        503 the caller prefers (``--no-anytime``, or ``X-Anytime: off`` on the request)."""
        if not (o.ok and o.prediction is not None and o.prediction.trace.anytime):
            return o
        endpoint = ROUTES.get(request.url.path, "other")
        if not self.cfg.anytime or request.headers.get(ANYTIME_HEADER, "").strip().lower() in ("0", "off", "false", "no"):
            self.metrics.anytime.labels(endpoint, "refused").inc()
            return Outcome(503, reason="deadline", message="the deadline came before the cascade finished and anytime answers are off")
        self.metrics.anytime.labels(endpoint, "answered").inc()
        return o

    async def one_image(self, request: Request, kind: str, default_ms: float) -> tuple[Outcome, dict | None]:
        """One image of a ``single`` or ``synapse`` request through the guards, decode and cascade: its outcome
        (an error is raised as the HttpError to answer) and the request document. Both apps' routes call it."""
        self.precheck(request)  # refuse before reading a body nobody could serve; counts nothing
        deadline = self.deadline(request, default_ms)
        items, doc = await self.read_payload(request, kind)
        res = Reservation(self.pixels)
        try:
            with self.admitted(request):
                (img,) = await self.decode(items, deadline, res)
                if isinstance(img, BadImage):
                    raise HttpError.from_bad_image(img)
                request.state.n_images = 1
                (o,) = await self.infer([img], deadline)
        finally:
            res.done()
        o = self.anytime_check(request, o)
        if not o.ok:
            raise outcome_error(o)
        return o, doc

    async def batch(self, request: Request, default_ms: float) -> tuple[list[dict], list[Outcome]]:
        """A ``batch`` request: one result per image (a bad image gets its own error entry, counted) and the
        outcomes of the images that decoded. Both apps' routes call it."""
        self.precheck(request)
        deadline = self.deadline(request, default_ms)
        items, _ = await self.read_payload(request, "batch")
        res = Reservation(self.pixels)
        try:
            with self.admitted(request, len(items)):
                decoded = await self.decode(items, deadline, res)
                good = [i for i, d in enumerate(decoded) if not isinstance(d, BadImage)]
                results: list[dict] = [{}] * len(decoded)
                for i, d in enumerate(decoded):
                    if isinstance(d, BadImage):
                        self.metrics.image_error("predict_batch", d.reason)
                        results[i] = HttpError.from_bad_image(d).body()
                outcomes: list[Outcome] = []
                if good:
                    outcomes = [self.anytime_check(request, o) for o in await self.infer([decoded[i] for i in good], deadline)]  # type: ignore[misc]
                    for i, o in zip(good, outcomes):
                        results[i] = prediction_json(o) if o.ok else outcome_error(o).body()
                        if 400 <= o.status < 500:  # bad input found in the GPU batch
                            self.metrics.image_error("predict_batch", o.reason)
        finally:
            res.done()
        request.state.n_images = sum(1 for r in results if "probability" in r)
        return results, outcomes

    def deadline(self, request: Request, default_ms: float) -> float:
        ms = parse_deadline_ms(request.headers.get(DEADLINE_HEADER), default_ms, self.cfg.max_deadline_ms)
        # the answer still has to get through the event loop: leave it the current lag (at most a quarter)
        return request.state.arrived + ms / 1e3 - min(self.loop_lag, ms / 4e3)

    @contextmanager
    def admitted(self, request: Request, n: int = 1) -> Iterator[None]:
        """Count a request in progress from the moment its body is read (a slow body holds a connection, not
        an admission slot) until it is answered."""
        self.precheck(request, n)
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def decode(self, items: Sequence[Any], deadline: float, res: Reservation) -> list[np.ndarray | BadImage]:
        """Decode in the decode threads, within the request's pixel budget and deadline; bad items come back as
        BadImage. ``res`` holds the request's pixels: the decode job releases its share when it ends, the caller
        when it has answered."""
        try:
            fut = asyncio.get_running_loop().run_in_executor(self._decoder, self._decode_job, items, res)
        except RuntimeError:  # the pool is shut down
            res.done()
            raise HttpError(503, "shutting_down", "the server is shutting down; retry", {"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise HttpError(503, "deadline", "the images could not be decoded before the deadline", {"Retry-After": "1"}) from None

    def decode_min_size(self) -> int | None:
        """The CPU path's reduced-size decode: the short side the cascade needs (``Cascade.decode_size``), None
        (full size) before it is loaded or when a tier needs the whole image."""
        size = getattr(self.cascade, "decode_size", None)
        return size() if callable(size) else None

    def _decode_job(self, items: Sequence[Any], res: Reservation) -> list[np.ndarray | BadImage]:
        try:
            return self._decode_all(items, res)
        finally:
            res.done()

    def _decode_all(self, items: Sequence[Any], res: Reservation) -> list[np.ndarray | BadImage]:
        """In a decode thread: bytes and declared sizes first (no pixel decoded), then the budget, then pixels."""
        limits, gpu = self.cfg.decode_limits, self.gpu is not None
        min_size = None if gpu else self.decode_min_size()
        out: list[Any] = []
        for it in items:
            try:
                data = item_bytes(it, limits)
                out.append((data, _pixels(image_size(data, limits))))
            except BadImage as e:
                out.append(e)
        total = sum(x[1] for x in out if not isinstance(x, BadImage))
        if total > self.cfg.request_pixels:
            raise HttpError(413, "too_many_pixels", f"the images of this request declare {total:,} pixels; at most "
                            f"{self.cfg.request_pixels:,} per request")
        if not res.take(total):
            raise HttpError(503, "overloaded", f"decoded-pixel budget in use ({self.pixels.used:,} of {self.pixels.total:,} "
                            f"pixels); retry", {"Retry-After": "1"})
        decoded: list[np.ndarray | bytes | BadImage] = []
        for x in out:
            try:
                decoded.append(x if isinstance(x, BadImage) else prepare_item(x[0], limits, gpu) if gpu
                               else decode_item(x[0], limits, min_size=min_size))
            except BadImage as e:
                decoded.append(e)
        return decoded  # type: ignore[return-value]

    async def infer(self, images: Sequence[np.ndarray], deadline: float) -> list[Outcome]:
        """Submit images to the batcher (all or none) and wait for their outcomes."""
        b = self.batcher
        assert b is not None
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in images]

        def callback(fut: asyncio.Future) -> Callable[[Outcome], None]:
            def done(o: Outcome) -> None:
                loop.call_soon_threadsafe(_resolve, fut, o)
            return done

        adm = b.submit(images, deadline, [callback(f) for f in futs])
        if not adm.ok:
            raise HttpError(503, adm.reason, adm.message, {"Retry-After": str(adm.retry_after_s)})
        timeout = max(0.0, deadline - time.monotonic()) + self.cfg.answer_grace_ms / 1e3
        await asyncio.wait(futs, timeout=timeout)
        return [f.result() if f.done() and not f.cancelled() else
                Outcome(500, reason="stuck", message="no answer from the batcher in time") for f in futs]

    async def read_payload(self, request: Request, kind: str) -> tuple[list[Any], dict | None]:
        """Items (base64 strings or bytes) and the JSON object, by content type. kind: single | batch | synapse."""
        ctype = media_type(request.headers.get("content-type"))
        if ctype == "application/json" or ctype.endswith("+json"):
            body = await request.body()
            doc = await asyncio.get_running_loop().run_in_executor(None, json_object, body)  # big JSON: off the event loop
            if kind == "batch":
                return list(images_field(doc, min(self.cfg.max_batch_images, self.cfg.max_queue))), doc
            return [image_field(doc)], doc
        if kind == "synapse":
            raise HttpError(415, "unsupported_media_type", f"POST /streetvision takes application/json only, not {ctype or 'no content type'!r}")
        if ctype == "multipart/form-data":
            items = await self._multipart(request)
            if kind == "single" and len(items) != 1:
                raise HttpError(400, "bad_input", f"expected one image, got {len(items)} (use /v1/predict/batch)")
            return items, None
        if kind == "single" and (ctype.startswith("image/") or ctype == "application/octet-stream"):
            body = await request.body()
            if not body:
                raise HttpError(400, "empty", "the request body is empty")
            return [body], None
        accepted = "application/json, multipart/form-data" + (", image/* or application/octet-stream" if kind == "single" else "")
        raise HttpError(415, "unsupported_media_type", f"content type {ctype or 'none'!r} not accepted here; send {accepted}")

    async def _multipart(self, request: Request) -> list[Any]:
        cap = min(self.cfg.max_batch_images, self.cfg.max_queue)
        try:
            form = await request.form(max_files=cap, max_fields=cap + 8, max_part_size=self.cfg.max_body_bytes)
        except _BodyTooLarge:
            raise
        except Exception as e:
            raise HttpError(400, "bad_multipart", f"could not parse the multipart body ({type(e).__name__}: {str(e)[:120]})") from None
        items: list[Any] = []
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    items.append(await value.read())
                elif key in ("image", "images"):
                    items.append(value)
        finally:
            await form.close()
        if not items:
            raise HttpError(400, "missing_image", "no image in the multipart body (send a file field, e.g. 'file')")
        if len(items) > cap:
            raise HttpError(413, "too_many_images", f"{len(items)} images in one request; at most {cap}")
        return items


ANYTIME_HEADER = "x-anytime"  # response: "true" when an answer came early (deadline); request: "off" prefers a 503


def synapse_answer(doc: dict, o: Outcome) -> dict:
    """The ImageSynapse back, with the prediction clipped to [0, 1]."""
    return {**doc, "prediction": float(min(1.0, max(0.0, prediction_json(o)["probability"])))}


def anytime_header(outcomes: Sequence[Outcome]) -> dict[str, str]:
    early = any(o.ok and o.prediction is not None and o.prediction.trace.anytime for o in outcomes)
    return {"X-Anytime": "true" if early else "false"}


def _pixels(size: tuple[int, int]) -> int:
    return int(size[0]) * int(size[1])


def _resolve(fut: asyncio.Future, outcome: Outcome) -> None:
    if not fut.done():
        fut.set_result(outcome)


def prediction_json(o: Outcome) -> dict:
    p = o.prediction
    assert p is not None
    if not math.isfinite(p.probability):
        raise HttpError(500, "bad_output", "the cascade produced a non-finite probability")
    d = p.as_dict()
    d["trace"].update(speculative=o.speculative, queue_ms=round(o.queue_ms, 3), total_ms=round(o.total_ms, 3))
    return d


def outcome_error(o: Outcome) -> HttpError:
    headers = {"Retry-After": "1"} if o.status == 503 else None
    return HttpError(o.status, o.reason, o.message, headers)


# ----------------------------------------------------------------------------------------------- the app
def create_app(bundle: Any, config: ServeConfig | None = None, *, device: str | None = None,
               background_load: bool = True) -> FastAPI:
    """An ASGI app serving ``bundle`` (a bundle directory, a ``Bundle`` or a ``Cascade``)."""
    cfg = config or ServeConfig()
    server = Server(bundle, cfg, device)
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # else one warning per malformed multipart body

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start(background=background_load)
        watcher = asyncio.create_task(server.watch_loop())
        try:
            yield
        finally:
            watcher.cancel()
            server.stop()

    # no /docs or /redoc: FastAPI's pages load Swagger UI / ReDoc scripts from a third-party CDN; /openapi.json stays
    app = FastAPI(title="roadcascade", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Is there roadwork in this street image? An adaptive cascade behind a multi-stage micro-batcher.")
    app.state.server = server
    app.add_middleware(ServeMiddleware, metrics=server.metrics, max_body=cfg.max_body_bytes, body_timeout_s=cfg.conn.body_timeout_s,
                       api_key=cfg.api_key, open_health=cfg.open_health)

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, e: HttpError) -> JSONResponse:
        request.state.reason = e.reason
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=_body_doc(PredictRequest, raw=True),
              summary="P(roadwork) of one image, with its trace")
    async def predict(request: Request) -> Response:
        o, _ = await server.one_image(request, "single", cfg.default_deadline_ms)
        return Response(json_bytes(prediction_json(o)), media_type="application/json", headers=anytime_header([o]))

    @app.post("/v1/predict/batch", responses=ERRORS, openapi_extra=_body_doc(BatchRequest),
              summary="Many images in one request; per-image results (a bad image gets its own error entry)")
    async def predict_batch(request: Request) -> Response:
        results, outcomes = await server.batch(request, cfg.default_deadline_ms)
        return Response(json_bytes({"results": results}), media_type="application/json", headers=anytime_header(outcomes))

    @app.post("/streetvision", response_model=ImageSynapse, responses=ERRORS, openapi_extra=_body_doc(ImageSynapse, multipart=False),
              summary="NATIX StreetVision miner endpoint: the ImageSynapse back with prediction in [0, 1]")
    async def streetvision(request: Request) -> Response:
        o, doc = await server.one_image(request, "synapse", cfg.streetvision_deadline_ms)
        assert doc is not None
        return Response(json_bytes(synapse_answer(doc, o)), media_type="application/json", headers=anytime_header([o]))

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> JSONResponse:
        if server.phase == "failed":  # the cause is in the server log; nothing internal (paths) goes out
            return JSONResponse({"status": "failed", "error": server.error.split(":", 1)[0]}, status_code=503)
        return JSONResponse({"status": "ok", "phase": server.phase})

    @app.get("/readyz", summary="Readiness: models loaded and warmed up")
    async def readyz(request: Request) -> JSONResponse:
        if not server.ready:
            request.state.reason = "not_ready"
            return JSONResponse({"ready": False, "phase": server.phase, "error": server.error.split(":", 1)[0]}, status_code=503,
                                headers={"Retry-After": "1"})
        c = server.cascade
        assert c is not None
        return JSONResponse({"ready": True, "tiers": c.tier_names, "warmup_ms": server.warmup_ms})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/stats", summary="The dashboard's live numbers (JSON)")
    async def stats() -> JSONResponse:
        b = server.batcher
        live = {"ready": server.ready, "phase": server.phase, "inflight": b.inflight if b else 0, "loop_lag_ms": server.loop_lag * 1e3,
                "pending": server.pending, "max_queue": cfg.max_queue, "max_batch": cfg.max_batch, "speculate_mode": cfg.speculate,
                "deadline_ms": cfg.default_deadline_ms}
        if b is not None:
            live["tiers"] = b.cascade.tier_names
            live["latency_model_ms"] = {t: {str(n): round(ms, 3) for n, ms in sorted(b.latency.measured(k).items())}
                                        for k, t in enumerate(b.cascade.tier_names)}
        if server.gpu is not None:
            gc = server.gpu.gc
            live["gpu"] = {"device": str(gc.device), "decoder": gc.gpu_decoder, "tiers": gc.tier_names}
        return JSONResponse(server.metrics.stats(live))

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
