"""Load-adaptive speculation: run tier k+1 on an image while tier k runs on it, only when load is low.

The switch follows the measured queue depth with hysteresis (the plan's gamma-tolerance): speculation
turns on when the smoothed depth is at most ``on_depth`` images and off when it reaches ``off_depth``.
At low load the spare compute cuts the latency of deferred images from t_k + t_{k+1} to about
max(t_k, t_{k+1}); at high load the cascade runs strictly in sequence and spends no compute on images
that exit early. In ``auto`` mode it is also used only where it pays, measured: the batcher times each
tier alone and while overlapped (the two runs split the cores), tracks the share of images each tier
defers, and speculates on stage k only if :func:`expected_ms` says the overlap lowers the expected
latency. On a CPU whose cores one tier already keeps busy it usually does not; with spare cores or a
GPU it does.

A speculative run calls ``tier.run`` on the images directly. Its result enters the cascade through the
ordinary ``Cascade.run_stage(k + 1, ...)`` of a *replay* cascade, which shares the real cascade's exit
points (fusion, fold, rules) and swaps tier k+1 for a :class:`ReplayTier` returning the stored output.
So a speculative answer is exactly the answer the sequential path gives, for any tier, rule or fusion.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..cascade.runtime import Cascade, ImageState, Tier, TierOutput


class SpeculationPolicy:
    def __init__(self, mode: str = "auto", on_depth: float = 1.0, off_depth: float = 4.0, alpha: float = 0.5):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"speculation mode must be auto, on or off (got {mode!r})")
        self.mode, self.on_depth, self.off_depth, self.alpha = mode, float(on_depth), float(off_depth), alpha
        self.depth = 0.0  # smoothed queue depth
        self._active = mode != "off"
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self._active

    def observe(self, depth: float) -> bool:
        """Feed one measurement of the queue depth; returns whether to speculate now."""
        with self._lock:
            self.depth += self.alpha * (float(depth) - self.depth)
            if self.mode == "auto":
                if self._active and self.depth >= self.off_depth:
                    self._active = False
                elif not self._active and self.depth <= self.on_depth:
                    self._active = True
            return self._active


def expected_ms(defer: float, t_k: float, t_next: float, t_k_spec: float, t_next_spec: float) -> tuple[float, float]:
    """Expected latency of an image at stage k without and with speculation of stage k+1.

    ``defer``: the measured share of images tier k defers; ``t_*``: batch times alone; ``t_*_spec``: the
    same while the two tiers overlap (they share the cores, so each is slower). Sequential: t_k, plus
    t_next for the deferred. Speculative: t_k_spec, or max(t_k_spec, t_next_spec) for the deferred.
    """
    seq = t_k + defer * t_next
    spec = (1 - defer) * t_k_spec + defer * max(t_k_spec, t_next_spec)
    return seq, spec


def take(out: TierOutput, idx: Sequence[int]) -> TierOutput:
    """Rows ``idx`` of a tier output (the ms of the whole batch is kept)."""
    ix = np.asarray(idx, dtype=np.int64)
    feats = None if out.features is None else out.features[ix]
    return TierOutput(logits=np.asarray(out.logits)[ix], prob=np.asarray(out.prob)[ix], features=feats, ms=out.ms)


def concat(outs: Sequence[TierOutput]) -> TierOutput:
    feats = None
    if all(o.features is not None for o in outs):
        feats = np.concatenate([o.features for o in outs])  # type: ignore[misc]
    return TierOutput(
        logits=np.concatenate([np.asarray(o.logits) for o in outs]),
        prob=np.concatenate([np.asarray(o.prob) for o in outs]),
        features=feats,
        ms=max((o.ms for o in outs), default=0.0),
    )


class ReplayTier(Tier):
    """Stands in for a real tier and returns an output computed earlier (never registered or saved)."""

    kind = "replay"

    def __init__(self, tier: Tier, output: TierOutput):
        self.name, self.gflops, self.output = tier.name, tier.gflops, output

    def run(self, images: Sequence[np.ndarray]) -> TierOutput:
        if len(images) != len(self.output):
            raise ValueError(f"replay of tier {self.name!r} holds {len(self.output)} rows, asked for {len(images)}")
        return self.output

    def to_config(self, bundle_dir: Path) -> dict:
        raise TypeError("a ReplayTier is a runtime stand-in and is never saved")

    @classmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device) -> "ReplayTier":
        raise TypeError("a ReplayTier is a runtime stand-in and is never loaded")


def replay_stage(cascade: Cascade, k: int, states: Sequence[ImageState], output: TierOutput) -> None:
    """``cascade.run_stage(k, states)`` with tier k's output given instead of computed."""
    tiers = list(cascade.tiers)
    tiers[k] = ReplayTier(tiers[k], output)
    Cascade(tiers, cascade.exits).run_stage(k, states)
