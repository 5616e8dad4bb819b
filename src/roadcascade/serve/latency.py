"""Per-tier latency model: an EMA of measured batch wall time for each (tier, batch size).

Used by the deadline logic to predict whether tier k can still finish in time. Unseen batch sizes are
interpolated linearly between the nearest measured sizes (and extrapolated linearly above the largest);
a tier with no measurement yet borrows another tier's times scaled by the ratio of their GFLOPs.

``predict`` is the typical time; ``predict_high`` adds a margin for a slower-than-usual batch (as TCP's
retransmission timeout does for round trips: mean + 4 x the smoothed deviation), from each tier's smoothed
relative deviation of measured times from the prediction made for them. The deadline checks that decide
whether a batch can still start use it: on a shared CPU a batch can run well over its average, and
an answer that arrives after the deadline is worth less than a 503 the client can retry elsewhere.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence


class LatencyModel:
    def __init__(self, gflops: Sequence[float], alpha: float = 0.2, default_ms: float = 50.0, beta: float = 0.25,
                 k_dev: float = 4.0, max_high: float = 2.0):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        self.gflops = [max(float(g), 0.0) for g in gflops]
        self.alpha, self.default_ms = alpha, float(default_ms)
        self.beta, self.k_dev, self.max_high = beta, float(k_dev), float(max_high)
        self._ms: list[dict[int, float]] = [{} for _ in gflops]
        self._dev: list[float] = [0.0 for _ in gflops]  # smoothed |measured - predicted| / predicted, per tier
        self._lock = threading.Lock()

    @property
    def n_tiers(self) -> int:
        return len(self._ms)

    def update(self, tier: int, n: int, ms: float) -> None:
        if n < 1 or not ms >= 0:  # also rejects NaN
            return
        with self._lock:
            table = self._ms[tier]
            if table:  # how far this batch was from what the model predicted for it
                pred = self._from_table(table, n)
                if pred > 0:
                    self._dev[tier] += self.beta * (abs(ms - pred) / pred - self._dev[tier])
            old = table.get(n)
            table[n] = ms if old is None else old + self.alpha * (ms - old)

    def measured(self, tier: int) -> dict[int, float]:
        with self._lock:
            return dict(self._ms[tier])

    def _from_table(self, table: dict[int, float], n: int) -> float:
        if n in table:
            return table[n]
        sizes = sorted(table)
        i = bisect.bisect_left(sizes, n)
        if i == 0:  # below every measured size: a smaller batch costs no more than the smallest one
            return table[sizes[0]]
        if i == len(sizes):  # above: extrapolate linearly (from the last two sizes, or through the origin)
            hi = sizes[-1]
            if len(sizes) >= 2:
                lo = sizes[-2]
                slope = max((table[hi] - table[lo]) / (hi - lo), table[hi] / hi * 0.25)
                return table[hi] + slope * (n - hi)
            return table[hi] * n / hi
        lo, hi = sizes[i - 1], sizes[i]
        w = (n - lo) / (hi - lo)
        return table[lo] * (1 - w) + table[hi] * w

    def deviation(self, tier: int) -> float:
        """Smoothed relative deviation of tier ``tier``'s measured batch times from their predictions."""
        with self._lock:
            return self._dev[tier]

    def predict_high(self, tier: int, n: int) -> float:
        """A time a batch rarely exceeds: ``predict`` x (1 + k_dev x deviation), at most ``max_high`` x ``predict``."""
        return self.predict(tier, n) * min(1.0 + self.k_dev * self.deviation(tier), self.max_high)

    def predict(self, tier: int, n: int) -> float:
        """Predicted wall time in ms of tier ``tier`` on a batch of ``n`` images."""
        n = max(int(n), 1)
        with self._lock:
            table = self._ms[tier]
            if table:
                return self._from_table(table, n)
            # borrow from the measured tier closest in cost, scaled by GFLOPs
            g = self.gflops[tier]
            donors = [k for k, t in enumerate(self._ms) if t and self.gflops[k] > 0]
            if donors and g > 0:
                k = min(donors, key=lambda d: abs(self.gflops[d] - g))
                return self._from_table(self._ms[k], n) * g / self.gflops[k]
            return self.default_ms * n
