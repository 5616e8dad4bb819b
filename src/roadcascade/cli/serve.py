"""CLI: ``roadcascade serve`` and ``roadcascade bench load`` / ``roadcascade bench serve``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .console import console, fail as _fail
from ..serve.config import ServeConfig

_D = ServeConfig()  # the command's defaults are the config's


def serve(
    bundle: Path = typer.Option(..., help="bundle directory (see `roadcascade train` / `quickstart`)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, min=0, max=65535, help="port (0: any free port)"),
    max_batch: int = typer.Option(_D.max_batch, min=1, help="largest batch a tier runs"),
    max_wait_ms: float = typer.Option(_D.max_wait_ms, min=0.0, help="how long a stage waits to fill a batch"),
    max_queue: int = typer.Option(_D.max_queue, min=1, help="images admitted and not yet answered; past it: 503 + Retry-After"),
    deadline_ms: float = typer.Option(_D.default_deadline_ms, min=1.0, help="default deadline (clients shorten it with X-Deadline-Ms)"),
    streetvision_deadline_ms: float = typer.Option(_D.streetvision_deadline_ms, min=1.0, help="default deadline of POST /streetvision (validators wait 9 s)"),
    speculate: str = typer.Option(_D.speculate, help="auto | on | off: run the next tier speculatively while the queue is short"),
    gpu: str = typer.Option(_D.gpu, help="auto | on | off: the GPU fast path (JPEG bytes decoded on the GPU, whole cascade "
                            "as one batched stage) when CUDA is there; use --max-batch 64..256 with it"),
    max_body_mb: float = typer.Option(_D.max_body_bytes / 2**20, min=0.01, help="largest request body, MiB (413 past it, before reading it)"),
    decode_threads: int = typer.Option(_D.decode_threads, min=1, help="threads decoding images"),
    header_timeout_s: float = typer.Option(_D.conn.header_timeout_s, min=0.1, help="seconds a client has to send its request headers (408 past it)"),
    body_timeout_s: float = typer.Option(_D.conn.body_timeout_s, min=0.1, help="seconds a client has to send its request body (408 past it)"),
    max_header_kb: int = typer.Option(_D.conn.max_header_bytes // 1024, min=1, help="request line + headers, KiB (431 past it)"),
    max_headers: int = typer.Option(_D.conn.max_headers, min=1, help="header lines per request (431 past it)"),
    request_mpx: float = typer.Option(_D.request_pixels / 1e6, min=1.0, help="decoded megapixels one request may hold (413 past it)"),
    server_mpx: float = typer.Option(_D.server_pixels / 1e6, min=1.0, help="decoded megapixels all requests together may hold (503 past it)"),
    api_key: Optional[str] = typer.Option(None, envvar="ROADCASCADE_API_KEY", show_default=False,
                                          help="require this key (Authorization: Bearer <key> or X-API-Key) on every "
                                          "endpoint but the dashboard page and, with --open-health, /healthz /readyz /metrics"),
    open_health: bool = typer.Option(_D.open_health, help="/healthz, /readyz and /metrics answer without the API key"),
    anytime: bool = typer.Option(_D.anytime, help="answer from the tiers that ran when the deadline comes (X-Anytime: true); "
                                 "--no-anytime answers 503 instead"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch intra-op threads (default: torch's)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    backend: str = typer.Option("auto", help="auto | torch | onnxruntime: how classifier tiers run (onnxruntime needs a "
                                "bundle from `roadcascade export`); sets $ROADCASCADE_BACKEND, so reloads keep it"),
    warmup: bool = typer.Option(_D.warmup, help="warm every tier up before /readyz turns 200"),
    malloc_arenas: int = typer.Option(2, min=0, help="cap glibc malloc arenas (threads otherwise grow memory); 0: glibc default"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
    engine: str = typer.Option("native", help="native (this process) | ray (Ray Serve: an ingress and one deployment per stage; "
                               "see docs/RAY.md)"),
    address: Optional[str] = typer.Option(None, help="ray: the Ray cluster to join (e.g. auto); default: start a local one"),
    target_rps: float = typer.Option(200.0, min=0.1, help="ray: images/s the per-stage autoscaling bounds are sized for"),
    stage_gpus: str = typer.Option("", help="ray: GPUs per replica of each stage, e.g. '0.25,1' (default: 1 when the cluster has GPUs)"),
) -> None:
    """Serve a bundle over HTTP: /v1/predict, /v1/predict/batch, /streetvision, /metrics, dashboard at /."""
    import uvicorn

    from ..serve.app import create_app
    from ..serve.protocol import ConnLimits, server_config

    if not (bundle / "bundle.json").exists() and not (bundle.is_file() and bundle.suffix == ".json"):
        _fail(f"no bundle at {bundle} (expected {bundle / 'bundle.json'}); train one with `roadcascade quickstart`")
    try:
        cfg = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, default_deadline_ms=deadline_ms,
                          streetvision_deadline_ms=streetvision_deadline_ms, speculate=speculate, gpu=gpu,
                          max_body_bytes=int(max_body_mb * 2**20), decode_threads=decode_threads, warmup=warmup,
                          conn=ConnLimits(max_header_bytes=max_header_kb * 1024, max_headers=max_headers,
                                          header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
                                          max_connections=max(256, 8 * max_queue)),
                          request_pixels=int(request_mpx * 1e6), server_pixels=int(server_mpx * 1e6),
                          api_key=api_key or None, open_health=open_health, anytime=anytime)
    except ValueError as e:
        _fail(str(e))
    _set_up_process(backend, malloc_arenas, threads, log_level)
    _warn_if_open(host, port, cfg)
    if engine == "ray":
        from ..distributed.serve_command import serve_on_ray

        serve_on_ray(bundle, cfg, host, port, address=address, target_rps=target_rps, stage_gpus=stage_gpus, threads=threads, fail=_fail)
        return
    if engine != "native":
        _fail(f"--engine must be native or ray, not {engine!r}")
    app = create_app(bundle, cfg, device=device)
    uvicorn.Server(server_config(app, host, port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)).run()


def _set_up_process(backend: str, malloc_arenas: int, threads: Optional[int], log_level: str) -> None:
    """The serving process's settings: the tier backend (kept for reloads), malloc arenas, torch threads, logging."""
    from ..cascade.onnx_tier import BACKEND_ENV, BACKENDS

    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}")
    os.environ[BACKEND_ENV] = backend  # read by Bundle.load in the server's (re)loads
    if malloc_arenas:
        _cap_malloc_arenas(malloc_arenas)
    if threads:
        import torch

        torch.set_num_threads(threads)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _warn_if_open(host: str, port: int, cfg: ServeConfig) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        if cfg.api_key:
            console.print(f"[yellow]note:[/yellow] listening on {host}, not only on loopback (API key required)")
        else:
            console.print(f"[yellow]warning:[/yellow] listening on {host} without an API key: anyone who can reach "
                          f"{host}:{port} can use this server; set --api-key or ROADCASCADE_API_KEY")


def _cap_malloc_arenas(n: int) -> None:
    """``mallopt(M_ARENA_MAX, n)``: glibc gives each busy thread its own heap, which a threaded server
    grows without returning (the MALLOC_ARENA_MAX advice for Python servers). A no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, int(n))  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _print_report(rep: dict) -> None:
    t = Table(title=f"load test: {rep.get('mode')} {rep.get('endpoint', '')}")
    for c in ("requests", "req/s", "ok req/s", "p50 ms", "p95 ms", "p99 ms", "statuses"):
        t.add_column(c, justify="right")
    lat = rep["latency_ms"].get("200") or rep["latency_ms"]["all"]
    t.add_row(str(rep["requests"]), f"{rep['throughput_rps']:.1f}", f"{rep['ok_rps']:.1f}", f"{lat.get('p50', float('nan')):.1f}",
              f"{lat.get('p95', float('nan')):.1f}", f"{lat.get('p99', float('nan')):.1f}", json.dumps(rep["status_counts"]))
    Console().print(t)


def load(
    url: str = typer.Option(..., help="server base URL, loopback only, e.g. http://127.0.0.1:8000"),
    concurrency: int = typer.Option(8, min=1, max=4096, help="closed loop: number of clients"),
    duration: float = typer.Option(10.0, min=0.1, max=3600.0, help="seconds to send for"),
    rate: Optional[float] = typer.Option(None, min=0.001, help="open loop: requests per second (omit for closed loop)"),
    requests: Optional[int] = typer.Option(None, min=1, help="stop after this many requests"),
    endpoint: str = typer.Option("streetvision", help="streetvision | predict"),
    deadline_ms: Optional[float] = typer.Option(None, min=1.0, help="send X-Deadline-Ms with every request"),
    arrival: str = typer.Option("poisson", help="open loop arrivals: poisson | fixed"),
    data: Optional[str] = typer.Option(None, help="data set for the images (default StreetWork test split)"),
    synthetic: bool = typer.Option(False, help="send synthetic street images instead of StreetWork"),
    views: str = typer.Option("challenge", help="challenge (seeded validator views) | clean (centre square)"),
    timeout: float = typer.Option(30.0, min=0.1, help="per-request client timeout, s"),
    max_connections: int = typer.Option(1024, min=1, help="open loop: most outstanding requests"),
    fuzz: Optional[int] = typer.Option(None, min=1, max=100_000, help="fuzz mode: send at least this many malformed requests"),
    max_body_mb: float = typer.Option(16.0, help="fuzz: the server's body limit (huge bodies exceed it)"),
    seed: int = typer.Option(0),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report here"),
) -> None:
    """Load-test (or fuzz) a running server: throughput, p50/p95/p99, counts by status. Loopback only."""
    from ..bench.loadgen import LoadgenError, run_fuzz, run_load

    try:
        if fuzz:
            rep = run_fuzz(url, fuzz, concurrency=min(concurrency, 64), timeout=timeout, max_body=int(max_body_mb * 2**20),
                           seed=seed, data=data, synthetic=synthetic)
        else:
            rep = run_load(url, concurrency=concurrency, duration=duration, rate=rate, max_requests=requests, endpoint=endpoint,
                           deadline_ms=deadline_ms, arrival=arrival, data=data, synthetic=synthetic, views=views, timeout=timeout,
                           max_connections=max_connections, seed=seed)
    except LoadgenError as e:
        _fail(str(e))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rep, indent=2))
        console.print(f"report: {json_out}")
    if fuzz:
        Console().print(json.dumps({k: rep[k] for k in ("requests", "status_counts", "server_errors_5xx", "no_response",
                                                         "answers_same_after", "ready_after", "ok")}, indent=1))
        if not rep["ok"]:
            raise typer.Exit(1)
        return
    _print_report(rep)
    if rep["server_errors_5xx"] or rep["invalid_predictions"]:
        console.print(f"[red]{rep['server_errors_5xx']} 5xx answers, {rep['invalid_predictions']} invalid predictions[/red]")
        raise typer.Exit(1)


def bench_serve(
    bundle: Path = typer.Option(..., help="bundle directory"),
    out: Path = typer.Option(Path("runs/bench-serve.json"), "--json", help="report file"),
    duration: float = typer.Option(20.0, min=1.0, help="seconds of the saturation run"),
    concurrency: int = typer.Option(48, min=1, help="closed-loop clients of the saturation run"),
    overload_s: float = typer.Option(60.0, min=0.0, help="seconds at 2x the saturated rate (0: skip)"),
    fuzz: int = typer.Option(1000, min=0, help="malformed requests after the load runs (0: skip)"),
    speculation: bool = typer.Option(True, help="also compare speculation on/off at low load (cascades of 2+ tiers)"),
    offline_images: int = typer.Option(256, min=16, help="images in the offline batched throughput run"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads of the server and the offline run"),
    serve_args: str = typer.Option("", help="extra `roadcascade serve` options, e.g. '--max-batch 32'"),
    synthetic: bool = typer.Option(False, help="synthetic images instead of StreetWork"),
) -> None:
    """The serving benchmark in one run: offline batched throughput vs saturated server throughput, 2x overload
    (status counts, memory, p99 vs deadline), speculation on/off at low load, and a fuzz run."""
    import signal

    from ..bench.serving import run_benchmark

    if not (bundle / "bundle.json").exists():
        _fail(f"no bundle at {bundle}")

    def interrupted(signum, frame):  # SIGTERM: unwind, so that the server subprocesses are stopped too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    rep = run_benchmark(bundle, duration=duration, concurrency=concurrency, overload_s=overload_s, fuzz=fuzz,
                        speculation=speculation, offline_images=offline_images, threads=threads,
                        serve_args=serve_args.split(), synthetic=synthetic, log=console.print)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2))
    Console().print(json.dumps(rep["summary"], indent=1))
    console.print(f"report: {out}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("serve")(serve)
    bench_app.command("load")(load)
    bench_app.command("serve")(bench_serve)


def main() -> None:
    """``python -m roadcascade.serve --bundle B ...``: the server alone, without the other commands' imports."""
    cli = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    cli.command()(serve)
    cli()
