"""The multi-stage micro-batcher: one queue and one worker thread per tier.

Stage k's queue holds the jobs whose next tier is k. Its worker collates a batch (``collate``: max batch
size, max wait, latest start times), answers the jobs that can no longer make their deadline (an anytime
answer from the tiers that ran, or a 503 when none has), and runs ``cascade.run_stage(k, batch)`` in its
own thread (torch releases the GIL, so stages overlap). Jobs the tier decides are answered with
``cascade.answer(state)``; the others join stage k+1's queue, so every tier runs in batches.

With a short queue, tier k+1 also starts speculatively on the batch while tier k runs (see
``speculation.py`` and ``spec_runner.py``); with a long queue, stages run strictly in sequence.

The batcher's parts: ``admission.InFlight`` (room and deadlines of new images), ``tier_timing.TierTiming``
(warm-up, latency models, whether speculation pays), ``stage_run`` (a tier on a batch, failures kept to the
images that cause them) and ``spec_runner.Speculator`` (the speculative runs).

The batcher knows nothing of HTTP or asyncio: each job carries an ``on_done(Outcome)`` callback, called
exactly once from a batcher thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..cascade.runtime import Cascade, ImageState
from .admission import InFlight
from .collate import STOP, collate, split_by_deadline
from .config import ServeConfig
from .latency import LatencyModel
from .messages import Admission, Job, Outcome
from .spec_runner import Speculator
from .speculation import SpeculationPolicy
from .stage_run import SHUTTING_DOWN, internal_error, run_isolated, tier_failed
from .tier_timing import TierTiming, set_torch_threads

log = logging.getLogger("roadcascade.serve")


class BatcherEvents:
    """What the batcher reports (no-op here; the server's metrics implement it). Called from its threads."""

    def batch(self, stage: int, tier: str, n: int, ms: float) -> None: ...

    def answered(self, job: Job, outcome: Outcome) -> None: ...

    def deadline_fallback(self, stage: int) -> None: ...

    def speculation(self, event: str, n: int = 1) -> None: ...  # started | used | wasted | failed

    def tier_error(self, stage: int, tier: str, message: str) -> None: ...

    def depth(self, depths: Sequence[int], inflight: int, speculating: bool) -> None: ...


class MultiStageBatcher:
    def __init__(self, cascade: Cascade, config: ServeConfig | None = None, events: BatcherEvents | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cascade, self.cfg = cascade, config or ServeConfig()
        self.events, self.clock = events or BatcherEvents(), clock
        n = cascade.n_stages
        self.queues: list[queue.Queue] = [queue.Queue() for _ in range(n)]
        self.timing = TierTiming(cascade, self.cfg)
        self.policy = SpeculationPolicy(self.cfg.speculate, self.cfg.spec_on_depth, self.cfg.spec_off_depth)
        self._in_hand = [0] * n
        self.flight = InFlight(self.cfg, self.timing.latency, lambda: self.queues[0].qsize() + self._in_hand[0], clock)
        self._ids = itertools.count()
        self._workers: list[threading.Thread] = []
        self.spec = Speculator(cascade, self.timing, self.events, self._finish, self._enqueue, self._route)
        self._running = False
        self._draining = False
        self.ready = False

    # ------------------------------------------------------------------------------------ lifecycle
    @property
    def n_stages(self) -> int:
        return self.cascade.n_stages

    @property
    def latency(self) -> LatencyModel:
        return self.timing.latency

    @property
    def latency_overlap(self) -> LatencyModel:
        return self.timing.latency_overlap

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        for k in range(self.n_stages):
            t = threading.Thread(target=self._worker, args=(k,), name=f"rc-stage{k}", daemon=True)
            t.start()
            self._workers.append(t)

    def warmup(self, rounds: int | None = None, size: int = 224, seed: int = 0,
               should_stop: Callable[[], bool] = lambda: False) -> dict[str, dict[int, float]]:
        """Seed the latency models (``TierTiming.warmup``)."""
        return self.timing.warmup(rounds, size, seed, should_stop)

    def speculation_pays(self, k: int, n: int) -> bool:
        return self.timing.speculation_pays(k, n)

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop: admit nothing new, let the admitted images finish for up to ``timeout`` seconds,
        then stop the workers after their batch in hand and answer what is still queued with 503."""
        self._draining = True
        end = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < end and self._workers:
            time.sleep(0.005)
        self._running = False
        self.ready = False
        for q in self.queues:
            q.put(STOP)
        for t in self._workers:
            t.join(timeout)
        self._workers.clear()
        self.spec.shutdown()
        for q in self.queues:
            while True:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    break
                if job is not STOP:
                    self._finish(job, SHUTTING_DOWN)

    # ------------------------------------------------------------------------------------ admission
    @property
    def inflight(self) -> int:
        return self.flight.count

    def depths(self) -> list[int]:
        return [q.qsize() for q in self.queues]

    def retry_after(self) -> int:
        """Seconds until the admitted work should have drained (at least 1)."""
        return self.flight.retry_after()

    def predicted_start_ms(self, n: int) -> float:
        """Predicted time until n new images have gone through tier 0 (``InFlight.predicted_start_ms``)."""
        return self.flight.predicted_start_ms(n)

    def has_room(self, n: int = 1) -> bool:
        return self._running and not self._draining and self.ready and self.flight.has_room(n)

    def admit(self, n: int, deadline: float) -> Admission:
        """Reserve room for n images due by ``deadline`` (clock seconds), or say why not."""
        if not self._running or self._draining:
            return Admission(False, "shutting_down", "the server is shutting down", 1)
        if not self.ready:
            return Admission(False, "not_ready", "models are loading or warming up", 1)
        return self.flight.reserve(n, deadline)

    def submit(self, images: Sequence[np.ndarray], deadline: float, callbacks: Sequence[Callable[[Outcome], None]]) -> Admission:
        """Admit and enqueue images (all or none). Each callback is called once with that image's Outcome."""
        if len(images) != len(callbacks):
            raise ValueError("one callback per image")
        adm = self.admit(len(images), deadline)
        if adm.ok:
            now = self.clock()
            for img, cb in zip(images, callbacks):
                job = Job(id=next(self._ids), state=ImageState(image=img), arrived=now, deadline=deadline, on_done=cb)
                self._enqueue(0, job)
        return adm

    # ------------------------------------------------------------------------------------ workers
    def _enqueue(self, k: int, job: Job) -> None:
        if not self._running:
            self._finish(job, SHUTTING_DOWN)
            return
        job.queued_at = self.clock()
        self.queues[k].put(job)

    def _start_by(self, k: int) -> Callable[[Job], float]:
        one = self.latency.predict_high(k, 1) / 1e3
        return lambda j: j.deadline - one

    def runnable(self, k: int, jobs: Sequence[Job], now: float) -> tuple[list[Job], list[Job]]:
        """``(run, late)`` for a batch of tier k about to start at ``now``: late are the jobs its run would
        take past their deadline, with the model's margin for a slow batch (``LatencyModel.predict_high``)."""
        return split_by_deadline(jobs, now, self.latency.predict_high(k, len(jobs)) / 1e3, lambda j: j.deadline)

    def _worker(self, k: int) -> None:
        q = self.queues[k]
        while True:
            batch = collate(q, self.cfg.max_batch, self.cfg.max_wait_ms / 1e3, clock=self.clock, start_by=self._start_by(k))
            if not self._running:  # stopping: what is still queued is not run
                for j in batch.items + batch.expired:
                    self._finish(j, SHUTTING_DOWN)
                if batch.stop:
                    return
                continue
            try:
                now = self.clock()
                for j in batch.items + batch.expired:
                    j.queue_s += now - j.queued_at
                self._late(k, batch.expired)
                if batch.items:
                    run, late = self.runnable(k, batch.items, now)
                    self._late(k, late)
                    if run:
                        self._run(k, run)
            except Exception as e:  # a bug here must not kill the stage: answer what is in hand, go on
                log.exception("stage %d worker error", k)
                for j in batch.items + batch.expired:
                    self._finish(j, internal_error(e))
            if batch.stop:
                return

    def _late(self, k: int, jobs: Sequence[Job]) -> None:
        for j in jobs:
            if j.stage == 0:
                self._finish(j, Outcome(503, reason="deadline", message="the deadline passed before the first tier could run"))
            else:
                self.events.deadline_fallback(k)
                self._finish(j, Outcome(200, prediction=self.cascade.answer(j.state)))

    def _run(self, k: int, jobs: list[Job]) -> None:
        short_queue = self.policy.observe(sum(self.depths()))
        overlap = False
        if short_queue and k + 1 < self.n_stages and self.spec.idle(k + 1) and self.speculation_pays(k, len(jobs)):
            fresh = [j for j in jobs if j.spec is None]
            if fresh:
                overlap = self.spec.launch(k + 1, fresh)
        self.events.depth(self.depths(), self.inflight, short_queue)
        set_torch_threads(self.timing.split_threads() if overlap else self.timing.threads)
        self._in_hand[k] = len(jobs)
        try:
            ok, failed, ms = run_isolated(self.cascade, k, jobs)
        finally:
            self._in_hand[k] = 0
        tier = self.cascade.tiers[k].name
        if not failed:
            self.timing.record(k, len(jobs), ms, overlap, [j.state.done for j in ok])
        self.events.batch(k, tier, len(jobs), ms)
        for j, msg in failed:
            self.events.tier_error(k, tier, msg)
            self._finish(j, tier_failed(tier, msg))
        for j in ok:
            self._route(k, j)

    def _route(self, k: int, job: Job) -> None:
        """After tier k ran on the job: answer it, use its speculative result, or queue it for tier k+1."""
        slot = job.spec
        err = job.state.error
        if err is not None:  # bad input found inside the batch (GPU path): the client's error, not ours
            self._finish(job, Outcome(int(getattr(err, "http_status", 422)), reason=str(getattr(err, "reason", "bad_image")),
                                      message=str(getattr(err, "message", err))))
            return
        if job.state.done:
            if slot is not None:
                job.spec = None
                self.events.speculation("wasted")
            self._finish(job, Outcome(200, prediction=self.cascade.answer(job.state), speculative=job.speculative))
            return
        if slot is not None and slot.stage == k + 1:
            with slot.lock:
                if not slot.finished:
                    slot.waiter = job  # the speculation thread takes it from here
                    return
            self.spec.use(job, slot)
            return
        self._enqueue(k + 1, job)

    # ------------------------------------------------------------------------------------ answers
    def _finish(self, job: Job, outcome: Outcome) -> None:
        if not self.flight.settle(job):
            return
        now = self.clock()
        outcome = Outcome(status=outcome.status, prediction=outcome.prediction, reason=outcome.reason,
                          message=outcome.message, speculative=job.speculative,
                          queue_ms=job.queue_s * 1e3, total_ms=(now - job.arrived) * 1e3)
        try:
            self.events.answered(job, outcome)
        except Exception:
            log.exception("metrics hook failed")
        try:
            job.on_done(outcome)
        except Exception:
            log.exception("answer callback failed")
