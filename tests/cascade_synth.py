"""Synthetic tier outputs for the cascade tests (rules, fusion, policy): no images, no models."""

from __future__ import annotations

import numpy as np

from roadcascade.cascade.calibration import sigmoid
from roadcascade.fit.policy import TierTable


def synth_table(n_img: int = 300, views: int = 4, seed: int = 0, noise=(2.0, 1.0, 0.6), gflops=(0.25, 0.8, 4.0),
                pos_rate: float = 0.35) -> TierTable:
    """Tiers that see one shared per-view signal plus independent noise (smaller noise = stronger tier)."""
    rng = np.random.default_rng(seed)
    y_img = (rng.random(n_img) < pos_rate).astype(np.int64)
    y = np.repeat(y_img, views)
    groups = np.repeat(np.arange(n_img), views)
    n = len(y)
    signal = np.where(y == 1, 1.5, -1.5) + rng.normal(0, 1.0, n)
    Z = np.column_stack([signal + rng.normal(0, s, n) for s in noise])
    g = np.tile(np.asarray(gflops, dtype=np.float64), (n, 1))
    return TierTable([f"t{i}" for i in range(len(noise))], Z, sigmoid(Z), g, g * 10.0, np.full(len(noise), 0.5), y, groups)


def known_optimum_table(n: int = 2000, hard: float = 0.3, seed: int = 0, g0: float = 1.0, g1: float = 10.0):
    """Tier 1 is always right; tier 0 is right on the confident images (|z0| in [1.5, 4]) and on two thirds
    of the hard ones (|z0| < 0.5), wrong on the other third (|z0| in [0.5, 1], the wrong sign).

    Tier 0's MCC-optimal threshold is then z0 = 0 (moving it past a wrong band breaks more right hard
    images than it fixes), every stop set of a confidence rule that holds a hard
    image holds a wrong one, so the cheapest policy reaching MCC 1 stops exactly the confident images:
    mean cost g0 + P(hard) * g1. Returns (table, that optimum cost)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(np.int64)
    s = np.where(y == 1, 1.0, -1.0)
    is_hard = rng.random(n) < hard
    wrong = is_hard & (rng.random(n) < 1 / 3)
    mag = np.where(is_hard, np.where(wrong, rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.5, n)), rng.uniform(1.5, 4.0, n))
    z0 = np.where(wrong, -s, s) * mag
    z1 = s * (3.0 + rng.uniform(0, 1, n))
    Z = np.column_stack([z0, z1])
    g = np.tile([g0, g1], (n, 1))
    tb = TierTable(["cheap", "strong"], Z, sigmoid(Z), g, g, [0.5, 0.5], y, np.arange(n))
    return tb, g0 + is_hard.mean() * g1
