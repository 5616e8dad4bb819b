"""Helpers for tests and benchmarks of the server: stand-in tiers, a tiny real bundle, a live uvicorn.

- :class:`SleepTier`: a deterministic tier (logit from the mean pixel) that sleeps like a model would
  (``time.sleep`` releases the GIL, as torch does), records its batch sizes and can fail on chosen images;
- :func:`tiny_bundle`: a real two-tier cascade of untrained ``test_tiny`` zoo models, saved and loaded
  through the bundle format (no training);
- :func:`live_server`: uvicorn on 127.0.0.1 and a free port, in a thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..cascade.calibration import sigmoid
from ..cascade.runtime import Cascade, ConfidenceRule, ExitPoint, FinalRule, LastTierFusion, Tier, TierOutput


class SleepTier(Tier):
    """logit = scale * (mean pixel / 255 - offset); sleeps ``fixed_ms + per_image_ms * n`` per batch."""

    kind = "test_sleep"  # never registered: lives only in memory

    def __init__(self, name: str, scale: float = 10.0, offset: float = 0.5, fixed_ms: float = 0.0, per_image_ms: float = 0.0,
                 gflops: float = 1.0, fail: Callable[[np.ndarray], bool] | None = None, core: threading.Lock | None = None):
        self.name, self.scale, self.offset, self.gflops = name, scale, offset, gflops
        self.fixed_ms, self.per_image_ms, self.fail, self.core = fixed_ms, per_image_ms, fail, core
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def run(self, images: Sequence[np.ndarray]) -> TierOutput:
        t0 = time.perf_counter()
        with self._lock:
            self.calls.append(len(images))
        if self.fail is not None and any(self.fail(im) for im in images):
            raise RuntimeError(f"{self.name}: simulated failure")
        delay = (self.fixed_ms + self.per_image_ms * len(images)) / 1e3
        if delay > 0:
            if self.core is not None:  # tiers sharing one "core" cannot overlap
                with self.core:
                    time.sleep(delay)
            else:
                time.sleep(delay)
        z = np.array([self.scale * (float(im.mean()) / 255 - self.offset) for im in images], dtype=np.float64)
        return TierOutput(logits=z, prob=sigmoid(z), ms=(time.perf_counter() - t0) * 1e3)

    def to_config(self, bundle_dir: Path) -> dict:
        return {"kind": self.kind, "name": self.name, "scale": self.scale, "offset": self.offset, "gflops": self.gflops}

    @classmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device) -> "SleepTier":
        return cls(cfg["name"], cfg["scale"], cfg["offset"], gflops=cfg.get("gflops", 1.0))


def sleep_cascade(t0_ms: float = 0.0, t1_ms: float = 0.0, tau: float = 0.3, per_image_ms: float = 0.0,
                  fail: Callable[[np.ndarray], bool] | None = None, tiers: int = 2, one_core: bool = False) -> Cascade:
    """A cascade of SleepTiers: tier 0 answers images far from mid-grey, later tiers the rest.
    ``one_core``: the tiers share one lock, like models that each keep every core busy."""
    core = threading.Lock() if one_core else None
    ts: list[Tier] = [SleepTier("small", 4.0, 0.5, t0_ms, per_image_ms, 1.0, fail=fail, core=core)]
    for k in range(1, tiers):
        ts.append(SleepTier(f"big{k}" if tiers > 2 else "big", 12.0, 0.45, t1_ms, per_image_ms, 5.0 * k, core=core))
    exits = [ExitPoint(LastTierFusion(), 0.5, ConfidenceRule(tau)) for _ in ts[:-1]] + [ExitPoint(LastTierFusion(), 0.4, FinalRule())]
    return Cascade(ts, exits)


def grey(value: int, size: int = 32) -> np.ndarray:
    """A uniform image: with sleep_cascade(tau=0.3), values far from 128 exit at tier 0, values near it defer."""
    return np.full((size, size, 3), value, dtype=np.uint8)


def tiny_bundle(out: str | Path, seed: int = 0, tau: float = 0.3, temperature: float = 0.01) -> Path:
    """Save a real two-tier bundle of untrained ``test_tiny`` models (64 px; a small temperature spreads their
    tiny logits so that some images exit at tier 0 and some defer)."""
    import torch

    from ..cascade.bundle import Bundle
    from ..cascade.calibration import TemperatureCalibrator
    from ..cascade.runtime import ClassifierTier
    from ..models.zoo import create_model

    cal = TemperatureCalibrator.from_dict({"temperature": temperature, "threshold": 0.5})
    tiers = []
    for k in range(2):
        torch.manual_seed(seed + k)
        model = create_model("test_tiny", num_classes=1, pretrained=False)
        tiers.append(ClassifierTier(f"tiny{k}", "test_tiny", model, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cal, 0.01 * (k + 1),
                                    device=torch.device("cpu")))
    exits = [ExitPoint(LastTierFusion(), 0.5, ConfidenceRule(tau)), ExitPoint(LastTierFusion(), 0.5, FinalRule())]
    return Bundle(Cascade(tiers, exits), {"note": "untrained test_tiny tiers, for tests"}).save(out)


@contextmanager
def live_server(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0, ready: bool = True) -> Iterator[str]:
    """Run ``app`` on uvicorn in a thread; yields its base URL (after /readyz is 200 when ``ready``)."""
    import httpx
    import uvicorn

    from .protocol import server_config

    server = uvicorn.Server(server_config(app, host, port, log_level="warning", access_log=False, lifespan="on",
                                          timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    end = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://{host}:{bound}"
        if ready:
            while httpx.get(url + "/readyz").status_code != 200:
                if time.monotonic() > end:
                    raise RuntimeError("server not ready in time")
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
