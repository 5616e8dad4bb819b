"""``roadcascade serve --engine ray``: deploy the Ray Serve application and keep it up until interrupted."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..serve.config import ServeConfig


def parse_stage_gpus(text: str) -> tuple[float, ...]:
    """'0.25,1' -> (0.25, 1.0); '' -> () (the default per stage)."""
    if not text.strip():
        return ()
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--stage-gpus must be comma-separated numbers, e.g. 0.25,1 (got {text!r})") from None
    if any(not 0 <= v <= 8 for v in vals):
        raise ValueError(f"--stage-gpus values must be in [0, 8] (got {text!r})")
    return vals


def serve_on_ray(bundle: Path, cfg: ServeConfig, host: str, port: int, *, address: str | None, target_rps: float, stage_gpus: str,
                 threads: int | None, fail: Callable[[str], None]) -> None:
    try:
        import ray
        from ray import serve
    except ImportError:
        fail("--engine ray needs Ray: pip install 'ray[data,serve]'")
        return
    from .serving import RayServeConfig, run

    try:
        rcfg = RayServeConfig(target_rps=target_rps, stage_gpus=parse_stage_gpus(stage_gpus), threads=threads)
    except ValueError as e:
        fail(str(e))
        return
    import signal

    def interrupted(signum, frame):  # SIGTERM: unwind, so that Serve and the Ray this process started are shut down
        raise KeyboardInterrupt

    url = run(bundle, cfg, rcfg, host, port, address=address, blocking=False)
    signal.signal(signal.SIGTERM, interrupted)  # after ray.init, which installs its own handler
    print(f"roadcascade on Ray Serve at {url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
