"""The ``ray`` engine of ``roadcascade label``: Ray Data decode tasks, then the cascade in an actor pool.

Ray Data's defaults give the fault tolerance: a decode task lost with its node is retried (``max_retries=-1``;
a bad input never fails a task, it is a row), and a pool actor is
restarted (``max_restarts=-1``) with its unfinished batch retried (``max_task_retries=-1``); lost blocks are
rebuilt from lineage. Results stream back to this process, where :class:`~.shards.ShardWriter` writes each path
once.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .inputs import InputRecord
from .label import CascadeRunner, LabelConfig, Progress, decode_batch
from .shards import ShardWriter

def connect(address: str | None, **init_kwargs: Any) -> bool:
    """Join ``address`` (or start a local Ray) unless Ray is already up in this process; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, configure_logging=True, logging_level="WARNING",
             log_to_driver=False, **init_kwargs)
    return True


def plan(cfg: LabelConfig, resources: dict[str, float]) -> dict[str, Any]:
    """How many cascade actors, with what resources: one per GPU (the GPU fast path inside) when the cluster has
    GPUs, else one CPU actor per ``actor_cpus`` (leaving room for the decode tasks when they run apart)."""
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    use_gpu = cfg.gpu == "on" or (cfg.gpu == "auto" and gpus >= 1)
    if use_gpu:
        n = cfg.actors or max(1, gpus)
        return {"actors": n, "num_gpus": 1 if gpus else 0, "num_cpus": 1, "gpu": "on" if gpus else cfg.gpu,
                "device": "cuda" if gpus else "cpu", "threads": cfg.threads}
    # Ray Data fuses an uncapped decode step into CPU actors that reserve the same CPUs (it then runs inside them), so
    # no CPU need be left for decode tasks; a capped or differently sized decode step runs as tasks of its own
    fused = cfg.decode_tasks is None and cfg.decode_cpus == cfg.actor_cpus
    n = cfg.actors or max(1, int((cpus - (0.0 if fused else cfg.decode_cpus)) // cfg.actor_cpus))
    return {"actors": n, "num_gpus": 0, "num_cpus": cfg.actor_cpus, "gpu": "off", "device": "cpu",
            "threads": cfg.threads or max(1, math.ceil(cfg.actor_cpus))}


def build_dataset(cfg: LabelConfig, todo: list[InputRecord], p: dict[str, Any]):
    """Each decode step finds the bundle's decode size in its own process (a CPU actor it is fused into has loaded
    the bundle anyway), so the driver never loads the bundle: 4-6 s of torch import and model building before the
    first task, measured in a fresh process on 2 cores."""
    import ray

    ds = ray.data.from_items([r.as_row() for r in todo], override_num_blocks=max(1, math.ceil(len(todo) / cfg.batch)))
    # a cap on concurrent decode tasks (else Ray Data runs as many as the free CPUs allow); a capped decode step is
    # fused into CPU actors only when the cap equals the pool size
    decode_compute = ray.data.TaskPoolStrategy(size=cfg.decode_tasks) if cfg.decode_tasks else None
    ds = ds.map_batches(decode_batch, fn_kwargs={"limits": cfg.limits, "min_size": None, "encoded": p["gpu"] != "off",
                                                 "bundle": str(cfg.bundle)},
                        batch_size=cfg.batch, batch_format="numpy", num_cpus=cfg.decode_cpus, compute=decode_compute)
    return ds.map_batches(CascadeRunner, fn_constructor_kwargs={"bundle": str(cfg.bundle), "device": p["device"],
                                                                "threads": p["threads"], "gpu": p["gpu"]},
                          batch_size=cfg.batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=p["actors"]),
                          num_cpus=p["num_cpus"], num_gpus=p["num_gpus"])


def run_ray(cfg: LabelConfig, todo: list[InputRecord], writer: ShardWriter, progress: Progress) -> float:
    """Label ``todo`` on Ray; returns the seconds spent starting or joining the cluster."""
    import ray

    t0 = time.perf_counter()
    started = connect(cfg.address)
    startup = time.perf_counter() - t0
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our own bar counts rows as they are written
        ctx.print_on_execution_start = False
        p = plan(cfg, ray.cluster_resources())
        ds = build_dataset(cfg, todo, p)
        done = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(batch.to_pydict())
            done += batch.num_rows
            progress("labelling (ray)", min(done, len(todo)), len(todo))
    finally:
        if started:
            ray.shutdown()
    return startup
