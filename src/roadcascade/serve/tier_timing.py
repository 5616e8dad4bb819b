"""What the batcher measures of its tiers: batch times alone and overlapped, the share each tier defers,
and from these whether speculating on the next stage pays (``speculation.expected_ms``).

Warm-up runs every tier at a few batch sizes to seed the latency models before the server is ready.
Torch keeps its intra-op thread count per thread (OpenMP), so a tier running alone uses all of
``threads`` and two overlapped tiers split them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..cascade.runtime import Cascade
from .config import ServeConfig
from .latency import LatencyModel
from .speculation import expected_ms

EXPLORE_EVERY = 20  # auto speculation: one batch in this many is speculated anyway, to keep measuring it


def torch_threads() -> int:
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:  # pragma: no cover
        return 1


def set_torch_threads(n: int) -> None:
    """Intra-op threads of the calling thread (torch keeps the setting per thread under OpenMP)."""
    try:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass


class TierTiming:
    def __init__(self, cascade: Cascade, config: ServeConfig):
        self.cascade, self.cfg = cascade, config
        n = cascade.n_stages
        self.latency = LatencyModel([t.gflops for t in cascade.tiers])
        self.latency_overlap = LatencyModel([t.gflops for t in cascade.tiers])  # times while two tiers overlap
        self.defer_rate = [0.5] * n  # EMA of the share of images each tier defers
        self.threads = torch_threads()  # intra-op threads of a tier running alone; overlapped runs split them
        self._explore = [0] * n

    def split_threads(self) -> int:
        return max(1, self.threads // 2)

    def warmup(self, rounds: int | None = None, size: int = 224, seed: int = 0,
               should_stop: Callable[[], bool] = lambda: False) -> dict[str, dict[int, float]]:
        """Run every tier at a few batch sizes; the first round is discarded, the rest seed the latency model.
        ``should_stop`` is asked between runs (a server stopping during warm-up does not wait for it)."""
        rounds = rounds or self.cfg.warmup_rounds
        rng = np.random.default_rng(seed)
        mb = self.cfg.max_batch
        sizes = sorted({1, max(1, mb // 4), mb})
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(mb)]
        set_torch_threads(self.threads)
        for r in range(rounds + 1):
            for k, tier in enumerate(self.cascade.tiers):
                for n in sizes:
                    if should_stop():
                        return {}
                    t0 = time.perf_counter()
                    tier.run(images[:n])
                    if r > 0:
                        self.latency.update(k, n, (time.perf_counter() - t0) * 1e3)
        if self.cfg.speculate != "off":  # time each pair of stages overlapped, as speculation runs them
            for r in range(rounds + 1):
                for k in range(self.cascade.n_stages - 1):
                    if should_stop():
                        return {}
                    self._time_overlap(k, images[:1], record=r > 0)
        return {t.name: self.latency.measured(k) for k, t in enumerate(self.cascade.tiers)}

    def _time_overlap(self, k: int, images: list[np.ndarray], record: bool) -> None:
        out: dict[str, float] = {}

        def spec() -> None:
            set_torch_threads(self.split_threads())
            t0 = time.perf_counter()
            self.cascade.tiers[k + 1].run(images)
            out["next"] = (time.perf_counter() - t0) * 1e3

        th = threading.Thread(target=spec)
        set_torch_threads(self.split_threads())
        th.start()
        t0 = time.perf_counter()
        self.cascade.tiers[k].run(images)
        ms = (time.perf_counter() - t0) * 1e3
        th.join()
        set_torch_threads(self.threads)
        if record:
            self.latency_overlap.update(k, len(images), ms)
            self.latency_overlap.update(k + 1, len(images), out["next"])

    def speculation_pays(self, k: int, n: int) -> bool:
        """Whether overlapping stage k+1 with stage k lowers the expected latency (measured times)."""
        if self.cfg.speculate == "on":
            return True
        if not (self.latency_overlap.measured(k) and self.latency_overlap.measured(k + 1)):
            return False
        seq, spec = expected_ms(self.defer_rate[k], self.latency.predict(k, n), self.latency.predict(k + 1, n),
                                self.latency_overlap.predict(k, n), self.latency_overlap.predict(k + 1, n))
        if spec < seq:
            return True
        # explore: every EXPLORE_EVERY-th batch it would not speculate on, it does, so that the overlapped
        # times stay measured (they change with load, batch size and what else runs on the machine)
        self._explore[k] += 1
        return self._explore[k] % EXPLORE_EVERY == 0

    def record(self, k: int, n: int, ms: float, overlapped: bool, done: Sequence[bool]) -> None:
        """A batch of n images ran on tier k in ms (overlapped with a speculative run or not); ``done``: which of
        the images it answered (the rest were deferred), for the defer rate."""
        (self.latency_overlap if overlapped else self.latency).update(k, n, ms)
        if k + 1 < self.cascade.n_stages and done:
            deferred = sum(not d for d in done) / len(done)
            self.defer_rate[k] += 0.1 * (deferred - self.defer_rate[k])
