"""What the server serves: the cascade from its source, and the GPU fast path in front of it when CUDA is
there and the configuration asks for it (``ServeConfig.gpu``)."""

from __future__ import annotations

import logging
from typing import Any

from ..cascade.runtime import Cascade
from .config import ServeConfig

log = logging.getLogger("roadcascade.serve")


def load_cascade(source: Any, device: str | None) -> tuple[Cascade, dict]:
    """The cascade of ``source`` (a bundle directory, a ``Bundle`` or a ``Cascade``) and the bundle's metadata
    for the server (its path; empty for a bare cascade)."""
    if isinstance(source, Cascade):
        return source, {}
    from ..cascade.bundle import Bundle

    if isinstance(source, Bundle):
        return source.cascade, {"path": str(source.path) if source.path else None}
    from ..models.preprocess import pick_device

    b = Bundle.load(source, device=pick_device(device))
    return b.cascade, {"path": str(b.path)}


def gpu_runner(cascade: Cascade, cfg: ServeConfig, device: str | None) -> Any:
    """The GPU fast path as one batcher stage (``gpu_stage.GpuStageCascade``), or None (off, or no CUDA)."""
    if cfg.gpu == "off":
        return None
    from ..accel.runtime import GpuConfig, maybe_gpu_cascade

    gc = maybe_gpu_cascade(cascade, enabled=cfg.gpu, config=GpuConfig(limits=cfg.decode_limits), log=log.info, device=device)
    if gc is None:
        return None
    from .gpu_stage import GpuStageCascade

    runner = GpuStageCascade(gc)
    log.info("GPU fast path on %s (decoder %s): one stage %s", gc.device, gc.gpu_decoder, runner.tier_names)
    return runner
