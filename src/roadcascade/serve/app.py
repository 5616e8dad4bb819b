"""The HTTP app: FastAPI endpoints over the multi-stage batcher.

``create_app(bundle, config)`` returns an ASGI app. Models load and warm up in a background thread at
start-up, so ``/healthz`` answers at once and ``/readyz`` turns 200 only when the batcher is ready.

The parts: ``middleware.py`` (checks before a handler runs, every request counted), ``payload.py`` (a body
into images), ``answers.py`` (outcomes into JSON answers), ``loading.py`` (the cascade and the GPU path);
``Server`` here holds what the endpoints share and runs a request through them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ..cascade.runtime import Cascade
from ..io.images import BadImage
from .answers import ANYTIME_HEADER, anytime_header, await_outcomes, outcome_error, prediction_json, synapse_answer
from .batcher import MultiStageBatcher
from .budget import PixelBudget, Reservation
from .config import ServeConfig
from .inputs import DEADLINE_HEADER, HttpError, parse_deadline_ms
from .loading import gpu_runner, load_cascade
from .messages import Outcome
from .metrics import ServeMetrics
from .middleware import ROUTES, ServeMiddleware, json_bytes  # noqa: F401 (ServeMiddleware stays importable from here)
from .payload import decode_items, read_payload

log = logging.getLogger("roadcascade.serve")
STATIC = Path(__file__).parent / "static"


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
            cascade, self.bundle_meta = load_cascade(self.source, self.device)
            self.cascade = cascade
            self.gpu = gpu_runner(cascade, self.cfg, self.device)
            runner: Any = self.gpu if self.gpu is not None else cascade
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
        """In a decode thread: ``payload.decode_items`` with this server's limits, budget and decode path."""
        gpu = self.gpu is not None
        return decode_items(items, res, self.pixels, self.cfg.decode_limits, self.cfg.request_pixels, gpu,
                            None if gpu else self.decode_min_size())  # type: ignore[return-value]

    async def infer(self, images: Sequence[np.ndarray], deadline: float) -> list[Outcome]:
        """Submit images to the batcher (all or none) and wait for their outcomes."""
        b = self.batcher
        assert b is not None
        return await await_outcomes(b, images, deadline, self.cfg.answer_grace_ms / 1e3)

    async def read_payload(self, request: Request, kind: str) -> tuple[list[Any], dict | None]:
        """Items (base64 strings or bytes) and the JSON object, by content type. kind: single | batch | synapse."""
        return await read_payload(request, kind, self.cfg)


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

    _prediction_routes(app, server, cfg)
    _status_routes(app, server)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _prediction_routes(app: FastAPI, server: Server, cfg: ServeConfig) -> None:
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


def _status_routes(app: FastAPI, server: Server) -> None:
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
        return JSONResponse(server.metrics.stats(live_stats(server)))

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")


def live_stats(server: Server) -> dict:
    """The dashboard's numbers that are state, not counters: phase, queue, latency model, GPU."""
    cfg, b = server.cfg, server.batcher
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
    return live
