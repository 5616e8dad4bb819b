"""A cone detector bundle (``train-detector`` output) as a tier of a cascade being built (``detector(path=...)`` in
a ``build`` tier list). Its own module: it loads bundles, and the tier module is imported by every bundle load."""

from __future__ import annotations

from pathlib import Path

import torch

from ..cascade.bundle import Bundle
from ..cascade.calibration import TemperatureCalibrator
from .tier import DetectorTier

__all__ = ["detector_tier_from_bundle"]


def detector_tier_from_bundle(path: str | Path, device: torch.device, name: str | None = None, native_cap: int | None = None,
                              batch_size: int | None = None) -> DetectorTier:
    """The detector tier of a detector bundle (``train-detector`` output) to join a built cascade: ``native_cap`` set
    on its detector (None keeps the bundle's), a fresh temperature calibrator for the build to fit."""
    b = Bundle.load(path, device=device)
    tier = next((t for t in b.cascade.tiers if isinstance(t, DetectorTier)), None)
    if tier is None:
        raise ValueError(f"{path} holds no detector tier (it has {', '.join(b.cascade.tier_names)})")
    if native_cap is not None:
        tier.detector.cfg = tier.detector.cfg.replace(native_cap=int(native_cap) or None)
    tier.name = name or tier.name
    tier.batch_size = int(batch_size or tier.batch_size)
    tier.calibrator = TemperatureCalibrator()
    return tier
