"""Admission control of the batcher: the images in flight against ``max_queue``, and whether n new images
can start tier 0 in time for their deadline at the current load (the latency model's estimates)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from .config import ServeConfig
from .latency import LatencyModel
from .messages import Admission, Job


class InFlight:
    """Reserves room for images when they are admitted and gives it back when each is answered (once).

    ``ahead()``: the tier-0 images queued or in the batch in hand, which new images wait behind."""

    def __init__(self, config: ServeConfig, latency: LatencyModel, ahead: Callable[[], int], clock: Callable[[], float]):
        self.cfg, self.latency, self._ahead, self.clock = config, latency, ahead, clock
        self._lock = threading.Lock()
        self.count = 0

    def retry_after(self) -> int:
        """Seconds until the admitted work should have drained (at least 1)."""
        per_image = self.latency.predict(0, self.cfg.max_batch) / self.cfg.max_batch / 1e3
        return max(1, math.ceil(self.count * per_image))

    def predicted_start_ms(self, n: int) -> float:
        """Predicted time until n new images have gone through tier 0: the batches ahead at their mean time, their
        own batch at the high estimate the run-time check uses (``MultiStageBatcher.runnable``), so that what is
        admitted is not set aside as late when its batch starts (a slow 503 that also leaves its batch short)."""
        mb = self.cfg.max_batch
        return self.latency.predict_high(0, min(mb, n)) + math.ceil(self._ahead() / mb) * self.latency.predict(0, mb)

    def has_room(self, n: int) -> bool:
        return self.count + n <= self.cfg.max_queue

    def reserve(self, n: int, deadline: float) -> Admission:
        """Room for n images due by ``deadline`` (clock seconds), or why not (the server is up and ready)."""
        if n > self.cfg.max_queue:
            return Admission(False, "overloaded", f"{n} images exceed the server's queue of {self.cfg.max_queue}", 1)
        now = self.clock()
        if self.predicted_start_ms(n) / 1e3 > self.cfg.admit_budget_fraction * (deadline - now):
            return Admission(False, "deadline", "the deadline cannot be met at the current load", self.retry_after())
        with self._lock:
            if self.count + n > self.cfg.max_queue:
                return Admission(False, "overloaded", f"queue full ({self.count} images in flight)", self.retry_after())
            self.count += n
        return Admission(True)

    def settle(self, job: Job) -> bool:
        """Mark the job answered and give its room back; False if it was answered already."""
        with self._lock:
            if job.answered:
                return False
            job.answered = True
            self.count -= 1
        return True
