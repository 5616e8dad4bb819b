"""The speculative runs of the batcher: tier s on a batch in its own thread while tier s-1 runs on it.

One run per tier at a time (a one-thread pool each). Every job of the batch gets a ``SpecSlot``; when tier
s-1 defers the job, the stage worker takes the slot's row at once if the run has finished, or leaves the
job as the slot's waiter for the speculation thread to hand on (``SpecSlot.lock`` orders the two). The
row enters the cascade by ``speculation.replay_stage``, so the answer is the one the sequential path gives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..cascade.runtime import Cascade
from .messages import Job, Outcome, SpecSlot
from .speculation import replay_stage, take
from .stage_run import clone_state, error_text, internal_error, tier_failed
from .tier_timing import TierTiming, set_torch_threads

log = logging.getLogger("roadcascade.serve")


class Speculator:
    """``finish(job, outcome)`` answers a job, ``enqueue(stage, job)`` queues it for a stage and
    ``route(stage, job)`` moves it on after a stage ran: the batcher's, called from the speculation threads."""

    def __init__(self, cascade: Cascade, timing: TierTiming, events: Any, finish: Callable[[Job, Outcome], None],
                 enqueue: Callable[[int, Job], None], route: Callable[[int, Job], None]):
        self.cascade, self.timing, self.events = cascade, timing, events
        self._finish, self._enqueue, self._route = finish, enqueue, route
        n = cascade.n_stages
        self._pools = {k: ThreadPoolExecutor(1, thread_name_prefix=f"rc-spec{k}") for k in range(1, n)}
        self._busy = [False] * n

    def idle(self, s: int) -> bool:
        return not self._busy[s]

    def shutdown(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=False)

    def launch(self, s: int, jobs: list[Job]) -> bool:
        """Start tier s on the jobs' images; False when it could not start (the pool is shut down)."""
        slots = [SpecSlot(stage=s) for _ in jobs]
        for j, slot in zip(jobs, slots):
            j.spec = slot
        self._busy[s] = True
        images = [j.state.image for j in jobs]
        try:
            self._pools[s].submit(self._run, s, images, slots)
        except RuntimeError:  # pool shut down
            self._busy[s] = False
            for j in jobs:
                j.spec = None
            return False
        self.events.speculation("started", len(jobs))
        return True

    def _run(self, s: int, images: list[np.ndarray], slots: list[SpecSlot]) -> None:
        out, err = None, ""
        set_torch_threads(self.timing.split_threads())
        t0 = time.perf_counter()
        try:
            out = self.cascade.tiers[s].run(images)
            self.timing.latency_overlap.update(s, len(images), (time.perf_counter() - t0) * 1e3)
        except Exception as e:
            err = error_text(e)
        self._busy[s] = False
        for i, slot in enumerate(slots):
            with slot.lock:
                slot.output = take(out, [i]) if out is not None else None
                slot.error, slot.finished = err, True
                waiter, slot.waiter = slot.waiter, None
            if waiter is not None:
                try:
                    self.use(waiter, slot)
                except Exception as e:  # never lose a job
                    log.exception("speculation hand-off failed")
                    self._finish(waiter, internal_error(e))

    def use(self, job: Job, slot: SpecSlot) -> None:
        """The job was deferred to tier ``slot.stage``, whose speculative run has finished."""
        job.spec = None
        if slot.error or slot.output is None:
            self.events.speculation("failed")
            self._enqueue(slot.stage, job)  # run it the ordinary way
            return
        backup = clone_state(job.state)
        try:
            replay_stage(self.cascade, slot.stage, [job.state], slot.output)
        except Exception as e:
            job.state = backup
            tier = self.cascade.tiers[slot.stage].name
            self.events.tier_error(slot.stage, tier, str(e))
            self._finish(job, tier_failed(tier, type(e).__name__))
            return
        job.speculative = True
        self.events.speculation("used")
        self._route(slot.stage, job)
