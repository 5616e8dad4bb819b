"""``roadcascade serve --engine ray``: the native server's HTTP API on Ray Serve.

* An ingress deployment (FastAPI through ``serve.ingress``) reads, validates and decodes requests with the native
  server's own code (``serve.app.ServeMiddleware`` for body limits, Host and API-key checks, ``Server.read_payload``
  and ``Server.decode`` for content types, base64, pixel budgets and the decoders), so status codes and reasons
  are the same; bad input is a 4xx, never a 5xx.
* One deployment per cascade stage, with ``@serve.batch``: stage k runs ``Cascade.run_stage(k, ...)`` on a batch
  collected across requests, so each stage scales on its own (``autoscaling_config`` from the bundle's measured
  cost, ``ray_actor_options`` GPUs per stage).
* Deadlines and shedding as in the native server: ``X-Deadline-Ms``; past the deadline the answer comes from the
  tiers that ran (``X-Anytime: true``) or, before any tier ran, a 503; more images in flight than ``max_queue``,
  or a stage queue over its ``max_queued_requests``, is a 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # module level: FastAPI resolves the string annotations of the routes here
from fastapi.responses import JSONResponse, Response

from ..cascade.runtime import ImageState, Prediction
from ..serve.app import Server, ServeMiddleware, anytime_header, json_bytes, prediction_json, synapse_answer
from ..serve.config import ServeConfig
from ..serve.inputs import HttpError
from ..serve.messages import Outcome
from .autoscale import autoscaling_config, stage_costs

log = logging.getLogger("roadcascade.serve.ray")


@dataclass(frozen=True)
class RayServeConfig:
    """Ray-side settings (the HTTP ones are the native ``ServeConfig``)."""

    target_rps: float = 200.0  # images/s the autoscaling bounds are sized for
    stage_gpus: tuple[float, ...] = ()  # GPUs per replica of each stage (default: 1 when the cluster has GPUs, else 0)
    stage_cpus: float = 1.0  # CPUs per stage replica
    ingress_replicas: int = 1
    threads: int | None = None  # torch threads per stage replica (default: its CPUs)
    autoscale: bool = True  # False: one replica per stage (tests, a fixed cluster)


@dataclass
class StageReply:
    """What a stage sends back for one image: the state without its pixels, and the answer as of now."""

    state: ImageState
    prediction: Prediction


def _light(state: ImageState) -> ImageState:
    return replace(state, image=np.zeros((0, 0, 3), np.uint8))  # the ingress keeps the pixels; do not ship them back


# ----------------------------------------------------------------------------------------------- stages
class CascadeStage:
    """Stage k of the cascade; :func:`_batched` adds its ``@serve.batch`` entry point ``run``."""

    def __init__(self, bundle: str, k: int, device: str = "cpu", threads: int | None = None):
        import torch

        from ..cascade.bundle import Bundle

        if threads:
            torch.set_num_threads(int(threads))
        self.cascade = Bundle.load(bundle, device=device).cascade
        self.k = k

    def decode_size(self) -> int | None:
        return self.cascade.decode_size()

    def tier_names(self) -> list[str]:
        return self.cascade.tier_names

    def _run(self, states: list[ImageState]) -> list[StageReply]:
        self.cascade.run_stage(self.k, states)
        out = []
        for s in states:
            light = _light(s)
            out.append(StageReply(light, self.cascade.answer(copy.deepcopy(light))))  # answer() marks an early answer
        return out


def _batched(max_batch: int, wait_s: float):
    """The stage class with ``run`` batched across requests by ``@serve.batch``."""
    from ray import serve

    async def run(self, states: list[ImageState]) -> list[StageReply]:
        # the model runs in a thread, so the replica keeps collecting the next batch meanwhile
        return await asyncio.get_running_loop().run_in_executor(None, self._run, list(states))

    return type("CascadeStage", (CascadeStage,), {"run": serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)(run)})


# ----------------------------------------------------------------------------------------------- ingress
class IngressServer(Server):
    """The native ``Server``'s request handling, with the cascade's stages behind Ray Serve handles."""

    def __init__(self, cfg: ServeConfig, stages: Sequence[Any], min_size: int | None, tiers: list[str]):
        super().__init__(None, cfg)
        self.stages, self._min_size, self.tiers = list(stages), min_size, tiers
        self.inflight = 0  # images admitted and not yet answered
        self.metrics.set_tiers(tiers)
        self.phase = "ready"
        self.metrics.ready.set(1)

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    def decode_min_size(self) -> int | None:
        return self._min_size

    def precheck(self, request: Any, n: int = 1) -> None:
        if not self.ready:
            raise HttpError(503, "not_ready", f"not ready ({self.phase}); poll /readyz", {"Retry-After": "1"})
        if self.inflight + n > self.cfg.max_queue or self.pending >= self.cfg.max_queue:
            raise HttpError(503, "overloaded", f"queue full ({self.inflight} images in flight)", {"Retry-After": "1"})

    async def infer(self, images: Sequence[np.ndarray], deadline: float) -> list[Outcome]:
        self.inflight += len(images)
        try:
            return await self._infer(images, deadline)
        finally:
            self.inflight -= len(images)

    async def _infer(self, images: Sequence[np.ndarray], deadline: float) -> list[Outcome]:
        from ray.serve.exceptions import BackPressureError

        t0 = time.monotonic()
        states = [ImageState(image=im) for im in images]
        answers: list[Prediction | None] = [None] * len(images)
        for k, stage in enumerate(self.stages):
            active = [i for i, s in enumerate(states) if not s.done]
            left = deadline - time.monotonic()
            if not active or left <= 0:
                break
            calls = [stage.run.remote(states[i]) for i in active]
            try:
                replies = await asyncio.wait_for(asyncio.gather(*calls), left)
            except (TimeoutError, asyncio.TimeoutError):
                for c in calls:
                    c.cancel()
                break
            except BackPressureError:
                if k == 0:
                    raise HttpError(503, "overloaded", "the first stage's queue is full; retry", {"Retry-After": "1"}) from None
                break  # later stages full: answer from the tiers that ran
            except Exception as e:  # noqa: BLE001 - a failing tier: these images get a 500, the server goes on
                log.exception("stage %d failed", k)
                failed = f"tier {self.tiers[k]!r} failed ({type(e).__name__})"
                for i in active:
                    answers[i] = None
                    states[i].error = RuntimeError(failed)
                break
            for i, r in zip(active, replies):
                r.state.image = states[i].image
                states[i], answers[i] = r.state, r.prediction
        total = (time.monotonic() - t0) * 1e3
        return [Outcome(200, prediction=p, total_ms=total) if p is not None else
                Outcome(500, reason="tier_error", message=str(s.error), total_ms=total) if s.error is not None else
                Outcome(503, reason="deadline", message="the deadline came before the first tier ran", total_ms=total)
                for p, s in zip(answers, states)]


def create_ingress_api(cfg: ServeConfig):
    """The FastAPI app of the ingress; its routes find the ``IngressServer`` on ``app.state.server``."""
    app = FastAPI(title="roadcascade (Ray Serve)", docs_url=None, redoc_url=None)

    def server() -> IngressServer:
        return app.state.server

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, e: HttpError) -> JSONResponse:
        request.state.reason = e.reason
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        o, _ = await server().one_image(request, "single", cfg.default_deadline_ms)
        return Response(json_bytes(prediction_json(o)), media_type="application/json", headers=anytime_header([o]))

    @app.post("/streetvision")
    async def streetvision(request: Request) -> Response:
        o, doc = await server().one_image(request, "synapse", cfg.streetvision_deadline_ms)
        return Response(json_bytes(synapse_answer(doc or {}, o)), media_type="application/json", headers=anytime_header([o]))

    @app.post("/v1/predict/batch")
    async def predict_batch(request: Request) -> Response:
        results, outcomes = await server().batch(request, cfg.default_deadline_ms)
        return Response(json_bytes({"results": results}), media_type="application/json", headers=anytime_header(outcomes))

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "phase": server().phase})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        s = server()
        if not s.ready:
            return JSONResponse({"ready": False, "phase": s.phase}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"ready": True, "tiers": s.tiers, "engine": "ray"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server().metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _ingress_class(cfg: ServeConfig):
    from ray import serve

    @serve.ingress()  # the app is built in the replica, after the constructor (``__serve_build_asgi_app__``)
    class Ingress:
        def __init__(self, min_size: int | None, tiers: list[str], *stages: Any):
            self.server = IngressServer(cfg, stages, min_size, tiers)

        def __serve_build_asgi_app__(self):
            api = create_ingress_api(cfg)
            api.state.server = self.server
            # the native middleware: Host / HTTP version / API-key checks, body-size limit, body-read timeout, JSON 500
            api.add_middleware(ServeMiddleware, metrics=self.server.metrics, max_body=cfg.max_body_bytes,
                               body_timeout_s=cfg.conn.body_timeout_s, api_key=cfg.api_key, open_health=cfg.open_health)
            return api

    return Ingress


# ----------------------------------------------------------------------------------------------- the application
def build_app(bundle: str | Path, cfg: ServeConfig, rcfg: RayServeConfig, cluster_gpus: float = 0.0):
    """The Ray Serve application: one deployment per stage, bound into the ingress."""
    from ray import serve

    from ..cascade.bundle_check import parse_json

    doc = parse_json((Path(bundle) / "bundle.json").read_bytes())
    costs = stage_costs(doc)
    stages = []
    for k, cost in enumerate(costs):
        gpus = rcfg.stage_gpus[k] if k < len(rcfg.stage_gpus) else (1.0 if cluster_gpus >= 1 else 0.0)
        scaling = (autoscaling_config(cost, rcfg.target_rps, cfg.max_batch) if rcfg.autoscale else None)
        dep = serve.deployment(
            _batched(cfg.max_batch, cfg.max_wait_ms / 1e3), name=f"stage{k}-{cost.name}",
            ray_actor_options={"num_cpus": rcfg.stage_cpus, "num_gpus": gpus},
            max_ongoing_requests=4 * cfg.max_batch, max_queued_requests=cfg.max_queue,
            **({"autoscaling_config": scaling} if scaling else {"num_replicas": 1}))
        stages.append(dep.bind(str(Path(bundle).resolve()), k, "cuda" if gpus > 0 else "cpu", rcfg.threads or max(1, int(rcfg.stage_cpus))))
    ingress = serve.deployment(_ingress_class(cfg), name="ingress", num_replicas=rcfg.ingress_replicas,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max(256, 2 * cfg.max_queue))
    from ..cascade.bundle import Bundle

    min_size = Bundle.load(bundle, device="cpu").cascade.decode_size()  # the reduced-size decode the ingress does
    return ingress.bind(min_size, [c.name for c in costs], *stages)


def run(bundle: str | Path, cfg: ServeConfig, rcfg: RayServeConfig, host: str, port: int, address: str | None = None,
        blocking: bool = True) -> str:
    """Start (or join) Ray, deploy, and serve on ``host:port``; returns the base URL (blocks when ``blocking``)."""
    import ray
    from ray import serve

    from .ray_label import connect

    connect(address)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    app = build_app(bundle, cfg, rcfg, ray.cluster_resources().get("GPU", 0.0))
    serve.run(app, name="roadcascade", route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"
