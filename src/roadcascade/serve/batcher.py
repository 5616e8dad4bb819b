"""The multi-stage micro-batcher: one queue and one worker thread per tier.

Stage k's queue holds the jobs whose next tier is k. Its worker collates a batch (``collate``: max batch
size, max wait, latest start times), answers the jobs that can no longer make their deadline (an anytime
answer from the tiers that ran, or a 503 when none has), and runs ``cascade.run_stage(k, batch)`` in its
own thread (torch releases the GIL, so stages overlap). Jobs the tier decides are answered with
``cascade.answer(state)``; the others join stage k+1's queue, so every tier runs in batches.

With a short queue, tier k+1 also starts speculatively on the batch while tier k runs (see
``speculation.py``); with a long queue, stages run strictly in sequence.

The batcher knows nothing of HTTP or asyncio: each job carries an ``on_done(Outcome)`` callback, called
exactly once from a batcher thread.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..cascade.runtime import Cascade, ImageState
from .collate import STOP, collate, split_by_deadline
from .config import ServeConfig
from .latency import LatencyModel
from .messages import Admission, Job, Outcome, SpecSlot
from .speculation import SpeculationPolicy, expected_ms, replay_stage, take

log = logging.getLogger("roadcascade.serve")


class BatcherEvents:
    """What the batcher reports (no-op here; the server's metrics implement it). Called from its threads."""

    def batch(self, stage: int, tier: str, n: int, ms: float) -> None: ...

    def answered(self, job: Job, outcome: Outcome) -> None: ...

    def deadline_fallback(self, stage: int) -> None: ...

    def speculation(self, event: str, n: int = 1) -> None: ...  # started | used | wasted | failed

    def tier_error(self, stage: int, tier: str, message: str) -> None: ...

    def depth(self, depths: Sequence[int], inflight: int, speculating: bool) -> None: ...


def _clone(s: ImageState) -> ImageState:
    """A copy to restore a state from if a tier fails half-way (the image array is shared, not copied)."""
    return ImageState(image=s.image, logits=list(s.logits), probs=list(s.probs), features=list(s.features),
                      trace=copy.deepcopy(s.trace), done=s.done, probability=s.probability, calibrated=s.calibrated)


EXPLORE_EVERY = 20  # auto speculation: one batch in this many is speculated anyway, to keep measuring it


def _torch_threads() -> int:
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:  # pragma: no cover
        return 1


def _set_torch_threads(n: int) -> None:
    """Intra-op threads of the calling thread (torch keeps the setting per thread under OpenMP)."""
    try:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass


class MultiStageBatcher:
    def __init__(self, cascade: Cascade, config: ServeConfig | None = None, events: BatcherEvents | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cascade, self.cfg = cascade, config or ServeConfig()
        self.events, self.clock = events or BatcherEvents(), clock
        n = cascade.n_stages
        self.queues: list[queue.Queue] = [queue.Queue() for _ in range(n)]
        self.latency = LatencyModel([t.gflops for t in cascade.tiers])
        self.latency_overlap = LatencyModel([t.gflops for t in cascade.tiers])  # times while two tiers overlap
        self.defer_rate = [0.5] * n  # EMA of the share of images each tier defers
        self.policy = SpeculationPolicy(self.cfg.speculate, self.cfg.spec_on_depth, self.cfg.spec_off_depth)
        self.threads = _torch_threads()  # intra-op threads of a tier running alone; overlapped runs split them
        self._explore = [0] * n
        self._lock = threading.Lock()
        self._inflight = 0
        self._in_hand = [0] * n
        self._ids = itertools.count()
        self._workers: list[threading.Thread] = []
        self._spec_pools = {k: ThreadPoolExecutor(1, thread_name_prefix=f"rc-spec{k}") for k in range(1, n)}
        self._spec_busy = [False] * n
        self._running = False
        self._draining = False
        self.ready = False

    # ------------------------------------------------------------------------------------ lifecycle
    @property
    def n_stages(self) -> int:
        return self.cascade.n_stages

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
        """Run every tier at a few batch sizes; the first round is discarded, the rest seed the latency model.
        ``should_stop`` is asked between runs (a server stopping during warm-up does not wait for it)."""
        rounds = rounds or self.cfg.warmup_rounds
        rng = np.random.default_rng(seed)
        mb = self.cfg.max_batch
        sizes = sorted({1, max(1, mb // 4), mb})
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(mb)]
        _set_torch_threads(self.threads)
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
                for k in range(self.n_stages - 1):
                    if should_stop():
                        return {}
                    self._time_overlap(k, images[:1], record=r > 0)
        return {t.name: self.latency.measured(k) for k, t in enumerate(self.cascade.tiers)}

    def _time_overlap(self, k: int, images: list[np.ndarray], record: bool) -> None:
        out: dict[str, float] = {}

        def spec() -> None:
            _set_torch_threads(self._split_threads())
            t0 = time.perf_counter()
            self.cascade.tiers[k + 1].run(images)
            out["next"] = (time.perf_counter() - t0) * 1e3

        th = threading.Thread(target=spec)
        _set_torch_threads(self._split_threads())
        th.start()
        t0 = time.perf_counter()
        self.cascade.tiers[k].run(images)
        ms = (time.perf_counter() - t0) * 1e3
        th.join()
        _set_torch_threads(self.threads)
        if record:
            self.latency_overlap.update(k, len(images), ms)
            self.latency_overlap.update(k + 1, len(images), out["next"])

    def _split_threads(self) -> int:
        return max(1, self.threads // 2)

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

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop: admit nothing new, let the admitted images finish for up to ``timeout`` seconds,
        then stop the workers after their batch in hand and answer what is still queued with 503."""
        self._draining = True
        end = time.monotonic() + timeout
        while self._inflight > 0 and time.monotonic() < end and self._workers:
            time.sleep(0.005)
        self._running = False
        self.ready = False
        for q in self.queues:
            q.put(STOP)
        for t in self._workers:
            t.join(timeout)
        self._workers.clear()
        for pool in self._spec_pools.values():
            pool.shutdown(wait=True, cancel_futures=False)
        for q in self.queues:
            while True:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    break
                if job is not STOP:
                    self._finish(job, Outcome(503, reason="shutting_down", message="the server is shutting down"))

    # ------------------------------------------------------------------------------------ admission
    @property
    def inflight(self) -> int:
        return self._inflight

    def depths(self) -> list[int]:
        return [q.qsize() for q in self.queues]

    def retry_after(self) -> int:
        """Seconds until the admitted work should have drained (at least 1)."""
        per_image = self.latency.predict(0, self.cfg.max_batch) / self.cfg.max_batch / 1e3
        return max(1, math.ceil(self._inflight * per_image))

    def predicted_start_ms(self, n: int) -> float:
        """Predicted time until n new images have gone through tier 0: the batches ahead at their mean time, their
        own batch at the high estimate the run-time check uses (``runnable``), so that what is admitted is not
        set aside as late when its batch starts (a slow 503 that also leaves its batch short)."""
        mb = self.cfg.max_batch
        ahead = self.queues[0].qsize() + self._in_hand[0]
        return self.latency.predict_high(0, min(mb, n)) + math.ceil(ahead / mb) * self.latency.predict(0, mb)

    def has_room(self, n: int = 1) -> bool:
        return self._running and not self._draining and self.ready and self._inflight + n <= self.cfg.max_queue

    def admit(self, n: int, deadline: float) -> Admission:
        """Reserve room for n images due by ``deadline`` (clock seconds), or say why not."""
        if not self._running or self._draining:
            return Admission(False, "shutting_down", "the server is shutting down", 1)
        if not self.ready:
            return Admission(False, "not_ready", "models are loading or warming up", 1)
        if n > self.cfg.max_queue:
            return Admission(False, "overloaded", f"{n} images exceed the server's queue of {self.cfg.max_queue}", 1)
        now = self.clock()
        if self.predicted_start_ms(n) / 1e3 > self.cfg.admit_budget_fraction * (deadline - now):
            return Admission(False, "deadline", "the deadline cannot be met at the current load", self.retry_after())
        with self._lock:
            if self._inflight + n > self.cfg.max_queue:
                return Admission(False, "overloaded", f"queue full ({self._inflight} images in flight)", self.retry_after())
            self._inflight += n
        return Admission(True)

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
            self._finish(job, Outcome(503, reason="shutting_down", message="the server is shutting down"))
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
                    self._finish(j, Outcome(503, reason="shutting_down", message="the server is shutting down"))
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
                    self._finish(j, Outcome(500, reason="internal", message=f"internal error: {type(e).__name__}"))
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
        n_stages = self.n_stages
        short_queue = self.policy.observe(sum(self.depths()))
        overlap = False
        if short_queue and k + 1 < n_stages and not self._spec_busy[k + 1] and self.speculation_pays(k, len(jobs)):
            fresh = [j for j in jobs if j.spec is None]
            if fresh:
                overlap = self._launch_spec(k + 1, fresh)
        self.events.depth(self.depths(), self._inflight, short_queue)
        _set_torch_threads(self._split_threads() if overlap else self.threads)
        self._in_hand[k] = len(jobs)
        try:
            ok, failed, ms = self._run_stage_isolated(k, jobs)
        finally:
            self._in_hand[k] = 0
        tier = self.cascade.tiers[k].name
        if not failed:
            (self.latency_overlap if overlap else self.latency).update(k, len(jobs), ms)
            if k + 1 < n_stages and ok:
                deferred = sum(not j.state.done for j in ok) / len(ok)
                self.defer_rate[k] += 0.1 * (deferred - self.defer_rate[k])
        self.events.batch(k, tier, len(jobs), ms)
        for j, msg in failed:
            self.events.tier_error(k, tier, msg)
            self._finish(j, Outcome(500, reason="tier_error", message=f"tier {tier!r} failed on this image: {msg}"))
        for j in ok:
            self._route(k, j)

    def _run_stage_isolated(self, k: int, jobs: list[Job]) -> tuple[list[Job], list[tuple[Job, str]], float]:
        """Run tier k on the batch; if it raises, restore the states and run image by image so that only
        the images that fail get a 500."""
        backup = [_clone(j.state) for j in jobs]
        t0 = time.perf_counter()
        try:
            self.cascade.run_stage(k, [j.state for j in jobs])
            return jobs, [], (time.perf_counter() - t0) * 1e3
        except Exception as e:
            first = f"{type(e).__name__}: {e}"[:200]
        ms = (time.perf_counter() - t0) * 1e3
        for j, b in zip(jobs, backup):
            j.state = b
        if len(jobs) == 1:
            return [], [(jobs[0], first)], ms
        ok, failed = [], []
        for j in jobs:
            b = _clone(j.state)
            try:
                self.cascade.run_stage(k, [j.state])
                ok.append(j)
            except Exception as e:
                j.state = b
                failed.append((j, f"{type(e).__name__}: {e}"[:200]))
        return ok, failed, ms

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
            self._use_spec(job, slot)
            return
        self._enqueue(k + 1, job)

    # ------------------------------------------------------------------------------------ speculation
    def _launch_spec(self, s: int, jobs: list[Job]) -> bool:
        slots = [SpecSlot(stage=s) for _ in jobs]
        for j, slot in zip(jobs, slots):
            j.spec = slot
        self._spec_busy[s] = True
        images = [j.state.image for j in jobs]
        try:
            self._spec_pools[s].submit(self._spec_run, s, images, slots)
        except RuntimeError:  # pool shut down
            self._spec_busy[s] = False
            for j in jobs:
                j.spec = None
            return False
        self.events.speculation("started", len(jobs))
        return True

    def _spec_run(self, s: int, images: list[np.ndarray], slots: list[SpecSlot]) -> None:
        out, err = None, ""
        _set_torch_threads(self._split_threads())
        t0 = time.perf_counter()
        try:
            out = self.cascade.tiers[s].run(images)
            self.latency_overlap.update(s, len(images), (time.perf_counter() - t0) * 1e3)
        except Exception as e:
            err = f"{type(e).__name__}: {e}"[:200]
        self._spec_busy[s] = False
        for i, slot in enumerate(slots):
            with slot.lock:
                slot.output = take(out, [i]) if out is not None else None
                slot.error, slot.finished = err, True
                waiter, slot.waiter = slot.waiter, None
            if waiter is not None:
                try:
                    self._use_spec(waiter, slot)
                except Exception as e:  # never lose a job
                    log.exception("speculation hand-off failed")
                    self._finish(waiter, Outcome(500, reason="internal", message=f"internal error: {type(e).__name__}"))

    def _use_spec(self, job: Job, slot: SpecSlot) -> None:
        """The job was deferred to tier ``slot.stage``, whose speculative run has finished."""
        job.spec = None
        if slot.error or slot.output is None:
            self.events.speculation("failed")
            self._enqueue(slot.stage, job)  # run it the ordinary way
            return
        backup = _clone(job.state)
        try:
            replay_stage(self.cascade, slot.stage, [job.state], slot.output)
        except Exception as e:
            job.state = backup
            tier = self.cascade.tiers[slot.stage].name
            self.events.tier_error(slot.stage, tier, str(e))
            self._finish(job, Outcome(500, reason="tier_error", message=f"tier {tier!r} failed on this image: {type(e).__name__}"))
            return
        job.speculative = True
        self.events.speculation("used")
        self._route(slot.stage, job)

    # ------------------------------------------------------------------------------------ answers
    def _finish(self, job: Job, outcome: Outcome) -> None:
        with self._lock:
            if job.answered:
                return
            job.answered = True
            self._inflight -= 1
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
