"""Ray Serve sizing of the per-stage deployments from what the bundle measured when it was built.

``roadcascade build`` records each tier's CPU milliseconds per image (``build.val_ms_per_image``) and the chosen
policy's exit rates (``policy.chosen.exit_rates``). Stage k sees the share of images that reach it,
``reach_k = 1 - sum(exit_rates[:k])``, so at ``target_rps`` images/s it needs about
``target_rps * reach_k * ms_k / 1000`` busy replicas; ``max_replicas`` leaves ``headroom`` on top. Bundles
without these numbers fall back on the tiers' GFLOPs (relative cost) and on every image reaching every stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MS_PER_GFLOP = 12.0  # CPU fallback when a bundle has no measured times (lite0@224: 0.77 GFLOPs, ~10-14 ms)


@dataclass(frozen=True)
class StageCost:
    name: str
    ms_per_image: float  # measured (or estimated) CPU time of the tier
    reach: float  # share of images that get to this stage
    measured: bool


def stage_costs(doc: dict[str, Any]) -> list[StageCost]:
    """Per-stage cost and reach from a bundle.json document (``Bundle.meta`` plus ``tiers``)."""
    tiers = doc.get("tiers") or []
    ms = ((doc.get("build") or {}).get("val_ms_per_image")) or {}
    chosen = ((doc.get("policy") or {}).get("chosen")) or {}
    rates = chosen.get("exit_rates") if chosen.get("tiers") == [t.get("name") for t in tiers] else None
    out, reach = [], 1.0
    for k, t in enumerate(tiers):
        name = str(t.get("name"))
        m = ms.get(name)
        cost = float(m) if isinstance(m, (int, float)) and m > 0 else max(0.1, float(t.get("gflops") or 0.0) * MS_PER_GFLOP)
        out.append(StageCost(name, cost, reach if rates else 1.0, isinstance(m, (int, float)) and m > 0))
        if rates and k < len(rates):
            reach = max(0.0, reach - float(rates[k]))
    return out


def autoscaling_config(cost: StageCost, target_rps: float, max_batch: int, headroom: float = 0.7,
                       max_replicas_cap: int = 64) -> dict[str, Any]:
    """``autoscaling_config`` for one stage: one replica at least, enough for ``target_rps`` at ``headroom`` load."""
    if target_rps <= 0 or not 0 < headroom <= 1:
        raise ValueError(f"need target_rps > 0 and 0 < headroom <= 1 (got {target_rps}, {headroom})")
    busy = target_rps * cost.reach * cost.ms_per_image / 1000.0  # replica-seconds of work per second
    top = min(max_replicas_cap, max(1, math.ceil(busy / headroom)))
    return {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": top,
        # a replica works on one batch and collects the next: two batches in flight is a busy replica
        "target_ongoing_requests": 2 * max_batch,
        "upscale_delay_s": 3.0,
        "downscale_delay_s": 60.0,
    }
