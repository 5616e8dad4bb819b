"""Which decoder takes which image of a batch: split by measured cost per megapixel.

The fast path has up to three decoders that run at once: the GPU decoder (nvJPEG / nvImageCodec, full-size
decode then a resize on the GPU), the libjpeg-turbo CPU threads of this process (reduced-size DCT decode) and the
decode processes (the CPU path's reduced-size decode and resize). Their speed depends on the image: a 12-megapixel
photo costs the GPU decoder about 50 times what a 224x224 view costs, while a reduced-size CPU decode of it costs
far less than 50 times (libjpeg skips most of the inverse DCT). So the router keeps, per decoder, the megapixels
it decoded per second of its own wall time while all ran together (an exponentially weighted mean of each
batch's measurement) and gives each decoder a contiguous run of the batch whose megapixels are proportional to its
rate: every decoder then finishes at about the same time. No per-image Python: one cumulative sum, one search.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PATHS", "Router", "split_by_rate"]

PATHS = ("gpu", "threads", "procs")


def split_by_rate(mp: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    """Cut points of ``mp`` (per-row megapixels) into ``len(rates)`` contiguous runs whose sums are proportional
    to ``rates`` (each >= 0, not all 0). Returns ``len(rates) + 1`` row offsets from 0 to ``len(mp)``."""
    r = np.asarray(rates, dtype=np.float64)
    if r.ndim != 1 or len(r) == 0 or (r < 0).any() or not np.isfinite(r).all() or r.sum() <= 0:
        raise ValueError(f"rates must be finite, >= 0 and not all 0, got {list(rates)}")
    n = len(mp)
    cum = np.cumsum(np.asarray(mp, dtype=np.float64))
    total = cum[-1] if n else 0.0
    targets = np.cumsum(r / r.sum())[:-1] * total
    # a row goes to the run in which its midpoint falls: a run with rate 0 gets no row
    mids = cum - 0.5 * np.asarray(mp, dtype=np.float64) if n else cum
    cuts = np.searchsorted(mids, targets, side="left") if n else np.zeros(len(r) - 1, dtype=np.int64)
    return np.concatenate([[0], cuts, [n]]).astype(np.int64)


@dataclass
class Router:
    """Measured megapixels per second of each decoder (``PATHS``), and the split they imply.

    ``rates`` start at the given priors; :meth:`observe` folds in one batch's measurement with weight
    ``alpha``. A decoder that is absent (``enabled`` False) gets nothing. ``floor`` keeps every enabled
    decoder at a small share so that its rate keeps being measured (a decoder that got nothing could never
    show it had become faster)."""

    rates: dict[str, float] = field(default_factory=lambda: {"gpu": 2000.0, "threads": 300.0, "procs": 600.0})
    alpha: float = 0.3
    floor: float = 0.03
    enabled: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(PATHS, True))

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0.0 <= self.floor < 1.0 / len(PATHS):
            raise ValueError(f"floor must be in [0, {1 / len(PATHS):.3f}), got {self.floor}")
        for p in PATHS:
            if self.rates.get(p, 0.0) <= 0:
                raise ValueError(f"rate of {p} must be > 0, got {self.rates.get(p)}")
        self._lock = threading.Lock()

    def shares(self, only: Sequence[str] | None = None) -> dict[str, float]:
        """Each decoder's share of a batch's megapixels (those in ``only``, enabled ones)."""
        use = [p for p in PATHS if self.enabled.get(p) and (only is None or p in only)]
        if not use:
            return dict.fromkeys(PATHS, 0.0)
        with self._lock:
            r = np.array([self.rates[p] for p in use], dtype=np.float64)
        s = r / r.sum()
        if len(use) > 1 and self.floor > 0:  # each at least the floor, the rest in proportion to the rates
            s = self.floor + (1.0 - len(use) * self.floor) * s
        out = dict.fromkeys(PATHS, 0.0)
        out.update(zip(use, s.tolist()))
        return out

    def split(self, mp: np.ndarray, only: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
        """Row ranges ``[a, b)`` of a batch (per-row megapixels ``mp``) per decoder."""
        sh = self.shares(only)
        cuts = split_by_rate(mp, [sh[p] for p in PATHS]) if sum(sh.values()) > 0 else np.zeros(len(PATHS) + 1, int)
        return {p: (int(cuts[k]), int(cuts[k + 1])) for k, p in enumerate(PATHS)}

    def observe(self, path: str, megapixels: float, seconds: float) -> None:
        """One batch's measurement of ``path``: ``megapixels`` decoded in ``seconds`` of its wall time
        (ignored when too small to mean anything)."""
        if path not in PATHS:
            raise ValueError(f"unknown decoder {path!r}")
        if megapixels <= 0 or seconds <= 1e-5 or not np.isfinite(seconds):
            return
        with self._lock:
            self.rates[path] = (1 - self.alpha) * self.rates[path] + self.alpha * (megapixels / seconds)
