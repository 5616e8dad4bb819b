"""The multi-stage micro-batcher: the pure collation step with a fake clock, the latency model, deadlines
and anytime answers, error isolation, and both speculation regimes (stand-in tiers that sleep like models)."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roadcascade.cascade.runtime import ImageState
from roadcascade.serve.batcher import BatcherEvents, MultiStageBatcher
from roadcascade.serve.collate import STOP, collate, split_by_deadline
from roadcascade.serve.config import ServeConfig
from roadcascade.serve.latency import LatencyModel
from roadcascade.serve.messages import Job
from roadcascade.serve.speculation import SpeculationPolicy, expected_ms, replay_stage
from roadcascade.serve.testing import grey, sleep_cascade


# ----------------------------------------------------------------------------------------------- fake clock
class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class ScheduledQueue:
    """A queue whose items arrive at given fake times; ``get`` advances the fake clock instead of sleeping."""

    def __init__(self, clock: FakeClock, arrivals):
        self.clock, self.items = clock, sorted(arrivals, key=lambda a: a[0])
        self.gets: list[tuple[bool, float | None]] = []

    def get(self, block: bool = True, timeout: float | None = None):
        self.gets.append((block, timeout))
        if self.items and self.items[0][0] <= self.clock.t:
            return self.items.pop(0)[1]
        if block and self.items and (timeout is None or self.items[0][0] <= self.clock.t + timeout):
            self.clock.t = self.items[0][0]
            return self.items.pop(0)[1]
        if block and timeout is not None:
            self.clock.t += timeout
        raise queue.Empty


def test_collate_takes_what_is_queued_up_to_max_size():
    q: queue.Queue = queue.Queue()
    for i in range(10):
        q.put(i)
    b = collate(q, 4, 0.0)
    assert b.items == [0, 1, 2, 3] and not b.expired and not b.stop
    assert collate(q, 100, 0.0).items == [4, 5, 6, 7, 8, 9]


def test_collate_waits_at_most_max_wait_after_the_first_item():
    clock = FakeClock()
    q = ScheduledQueue(clock, [(1.0, "a"), (1.003, "b"), (1.004, "c"), (1.020, "late")])
    b = collate(q, 8, 0.005, clock=clock)
    assert b.items == ["a", "b", "c"]
    assert clock.t == pytest.approx(1.005)  # gave up waiting exactly max_wait after "a"
    b2 = collate(q, 8, 0.005, clock=clock)
    assert b2.items == ["late"]


def test_collate_full_batch_returns_without_waiting():
    clock = FakeClock()
    q = ScheduledQueue(clock, [(0.0, i) for i in range(3)] + [(5.0, "much later")])
    b = collate(q, 3, 10.0, clock=clock)
    assert b.items == [0, 1, 2] and clock.t == 0.0


def test_collate_idle_timeout_gives_an_empty_batch():
    clock = FakeClock()
    q = ScheduledQueue(clock, [])
    b = collate(q, 4, 0.01, clock=clock, idle_timeout=0.5)
    assert b.items == [] and clock.t == pytest.approx(0.5)


def test_collate_never_waits_past_an_items_latest_start():
    clock = FakeClock()
    # item "urgent" must start by t=1.002; max_wait would allow waiting until 1.010
    q = ScheduledQueue(clock, [(1.0, ("urgent", 1.002)), (1.005, ("next", 9.0))])
    b = collate(q, 8, 0.010, clock=clock, start_by=lambda it: it[1])
    assert [it[0] for it in b.items] == ["urgent"]
    assert clock.t == pytest.approx(1.002)


def test_collate_sets_expired_items_aside():
    clock = FakeClock(5.0)
    q = ScheduledQueue(clock, [(0.0, ("old", 1.0)), (0.0, ("ok", 9.0)), (0.0, ("old2", 4.9))])
    b = collate(q, 2, 0.0, clock=clock, start_by=lambda it: it[1])
    assert [it[0] for it in b.items] == ["ok"] and [it[0] for it in b.expired] == ["old", "old2"]


def test_collate_stop_sentinel():
    q: queue.Queue = queue.Queue()
    q.put(1)
    q.put(STOP)
    q.put(2)
    b = collate(q, 8, 1.0)
    assert b.items == [1] and b.stop


def test_collate_checks_its_settings():
    with pytest.raises(ValueError, match="max_size"):
        collate(queue.Queue(), 0, 0.1)
    with pytest.raises(ValueError, match="max_wait"):
        collate(queue.Queue(), 1, -1)


@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=0, max_size=30), st.integers(1, 8), st.floats(0, 0.05))
@settings(max_examples=60, deadline=None)
def test_collate_properties(times, max_size, max_wait):
    """Batches keep arrival order, never exceed max_size, and together hold every item exactly once."""
    clock = FakeClock()
    q = ScheduledQueue(clock, [(t, i) for i, t in enumerate(sorted(times))])
    seen = []
    while True:
        b = collate(q, max_size, max_wait, clock=clock, idle_timeout=2.0)
        if not b.items:
            break
        assert len(b.items) <= max_size
        seen += b.items
    assert seen == list(range(len(times)))


def test_split_by_deadline():
    run, late = split_by_deadline([("a", 1.0), ("b", 2.0), ("c", 1.5)], now=1.0, run_s=0.6, deadline=lambda x: x[1])
    assert [x[0] for x in run] == ["b"] and [x[0] for x in late] == ["a", "c"]


# ----------------------------------------------------------------------------------------------- latency model
def test_latency_model_ema_interpolation_and_borrowing():
    m = LatencyModel([1.0, 4.0], alpha=0.5)
    assert m.predict(0, 3) == pytest.approx(m.default_ms * 3)  # nothing measured yet
    m.update(0, 1, 10.0)
    m.update(0, 9, 50.0)
    assert m.predict(0, 5) == pytest.approx(30.0)  # linear between measured sizes
    assert m.predict(0, 1) == 10.0 and m.predict(0, 17) == pytest.approx(90.0)  # extrapolated
    m.update(0, 1, 20.0)
    assert m.predict(0, 1) == pytest.approx(15.0)  # EMA
    assert m.predict(1, 1) == pytest.approx(60.0)  # borrowed: 4x the GFLOPs of tier 0
    m.update(0, 2, float("nan"))
    assert 2 not in m.measured(0)


def test_latency_model_high_estimate_follows_the_measured_spread():
    m = LatencyModel([1.0], alpha=0.2, beta=0.5, k_dev=4.0, max_high=2.0)
    for _ in range(20):
        m.update(0, 4, 100.0)
    assert m.deviation(0) == 0.0 and m.predict_high(0, 4) == pytest.approx(m.predict(0, 4))  # steady: no margin
    for ms in (130.0, 100.0, 130.0, 100.0):  # a shared CPU: batches run up to 30 % over
        m.update(0, 4, ms)
    dev = m.deviation(0)
    assert 0.05 < dev < 0.3
    assert m.predict_high(0, 4) == pytest.approx(m.predict(0, 4) * (1 + 4 * dev))
    assert m.predict_high(0, 4) > 130.0  # covers the slow batches the mean does not
    for ms in (400.0, 20.0, 400.0, 20.0):
        m.update(0, 4, ms)
    assert m.predict_high(0, 4) == pytest.approx(2.0 * m.predict(0, 4))  # capped
    with pytest.raises(ValueError):
        LatencyModel([1.0], beta=0.0)


def test_a_batch_starts_only_with_jobs_its_slow_case_still_serves_in_time():
    """The run-time check (fake clock, no thread started): a job that the mean batch time would just serve but
    a usual slow batch would answer late is set aside (a 503 at tier 0) instead of becoming a late 200."""
    clock = FakeClock(10.0)
    b = MultiStageBatcher(sleep_cascade(), ServeConfig(max_batch=4), clock=clock)
    for ms in (100.0, 100.0, 130.0, 100.0, 130.0, 100.0):
        b.latency.update(0, 2, ms)
    mean, high = b.latency.predict(0, 2) / 1e3, b.latency.predict_high(0, 2) / 1e3
    assert high > mean * 1.1

    def job(deadline: float) -> Job:
        return Job(id=0, state=ImageState(image=grey(0)), arrived=clock.t, deadline=deadline, on_done=lambda o: None)

    tight, roomy = job(clock.t + (mean + high) / 2), job(clock.t + high + 0.001)
    run, late = b.runnable(0, [tight, roomy], clock.t)
    assert run == [roomy] and late == [tight]
    # before: split on the mean, the tight job ran and was answered after its deadline whenever the batch was slow
    assert split_by_deadline([tight, roomy], clock.t, mean, lambda j: j.deadline) == ([tight, roomy], [])
    # the latest start time of collation has the same margin
    assert b._start_by(0)(roomy) == pytest.approx(roomy.deadline - b.latency.predict_high(0, 1) / 1e3)
    # admission counts the new images' own batch with the same margin (the batches ahead at their mean)
    b.ready, b._running = True, True
    b.latency.update(0, 4, 200.0)
    for ms in (200.0, 260.0, 200.0, 260.0, 200.0):
        b.latency.update(0, 4, ms)
    for _ in range(4):
        b.queues[0].put(job(clock.t + 60))
    own_mean, own_high, full = b.latency.predict(0, 1), b.latency.predict_high(0, 1), b.latency.predict(0, 4)
    assert b.predicted_start_ms(1) == pytest.approx(own_high + full)
    between = (own_mean + full + own_high + full) / 2 / 1e3 / b.cfg.admit_budget_fraction
    assert not b.admit(1, clock.t + between).ok  # the mean would have admitted it
    assert b.admit(1, clock.t + (own_high + full) / 1e3 / b.cfg.admit_budget_fraction + 0.001).ok


# ----------------------------------------------------------------------------------------------- speculation policy
def test_speculation_policy_hysteresis():
    p = SpeculationPolicy("auto", on_depth=1.0, off_depth=4.0, alpha=1.0)
    assert p.observe(0)
    assert p.observe(3)  # inside the band: stays on
    assert not p.observe(4)  # reached off_depth
    assert not p.observe(2)  # inside the band: stays off
    assert p.observe(1)
    assert SpeculationPolicy("on").observe(1000) and not SpeculationPolicy("off").observe(0)
    with pytest.raises(ValueError):
        SpeculationPolicy("maybe")


@given(st.integers(0, 255), st.floats(0.0, 0.5))
@settings(max_examples=40, deadline=None)
def test_replay_gives_the_same_state_as_running_the_tier(value, tau):
    c = sleep_cascade(tau=tau)
    a, b = ImageState(image=grey(value)), ImageState(image=grey(value))
    c.run_stage(0, [a])
    c.run_stage(0, [b])
    if a.done:
        return
    out = c.tiers[1].run([b.image])
    c.run_stage(1, [a])
    replay_stage(c, 1, [b], out)
    assert (a.probability, a.done, a.trace.rule, a.trace.exit, a.trace.tiers) == (b.probability, b.done, b.trace.rule, b.trace.exit, b.trace.tiers)


# ----------------------------------------------------------------------------------------------- the batcher
class Events(BatcherEvents):
    def __init__(self):
        self.batches: list[tuple[int, int]] = []
        self.fallbacks = 0
        self.spec: dict[str, int] = {}
        self.errors = 0
        self.lock = threading.Lock()

    def batch(self, stage, tier, n, ms):
        with self.lock:
            self.batches.append((stage, n))

    def deadline_fallback(self, stage):
        with self.lock:
            self.fallbacks += 1

    def speculation(self, event, n=1):
        with self.lock:
            self.spec[event] = self.spec.get(event, 0) + n

    def tier_error(self, stage, tier, message):
        with self.lock:
            self.errors += 1


def started(cascade, warm: bool = True, **cfg) -> tuple[MultiStageBatcher, Events]:
    ev = Events()
    b = MultiStageBatcher(cascade, ServeConfig(**cfg), events=ev)
    b.start()
    if warm:
        b.warmup(rounds=1, size=8)
    b.ready = True
    return b, ev


def ask(b: MultiStageBatcher, images, deadline_s: float = 5.0, wait: float = 10.0):
    """Submit images, wait for their outcomes (in order)."""
    outcomes: list = [None] * len(images)
    done = threading.Event()
    left = [len(images)]
    lock = threading.Lock()

    def cb(i):
        def f(o):
            outcomes[i] = o
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()
        return f

    adm = b.submit(images, time.monotonic() + deadline_s, [cb(i) for i in range(len(images))])
    assert adm.ok, adm
    assert done.wait(wait), "no answer"
    return outcomes


def test_batcher_answers_equal_the_offline_cascade_and_tiers_run_in_batches():
    c = sleep_cascade(t0_ms=5, t1_ms=5, tau=0.3)
    b, ev = started(c, max_batch=8, max_wait_ms=20, speculate="off")
    try:
        values = [0, 255, 128, 140, 30, 120, 250, 135, 10, 129, 200, 60]
        out = ask(b, [grey(v) for v in values])
    finally:
        b.stop()
    ref = sleep_cascade(tau=0.3).predict([grey(v) for v in values])
    for o, r in zip(out, ref):
        assert o.status == 200
        p = o.prediction
        assert p.probability == pytest.approx(r.probability, abs=1e-12)
        assert (p.trace.tiers, p.trace.rule, p.trace.exit, p.trace.anytime) == (r.trace.tiers, r.trace.rule, r.trace.exit, False)
    stage0 = [n for s, n in ev.batches if s == 0]
    stage1 = [n for s, n in ev.batches if s == 1]
    assert max(stage0) > 1 and max(stage1) > 1  # both tiers ran in batches
    assert sum(stage0) == len(values) and sum(stage1) == sum(1 for r in ref if r.trace.exit == 1)
    assert max(stage0 + stage1) <= 8


def test_deadline_gives_an_anytime_answer_from_the_tiers_that_ran():
    c = sleep_cascade(t0_ms=5, t1_ms=300, tau=0.3)  # the big tier cannot finish within 150 ms
    b, ev = started(c, max_batch=4, max_wait_ms=1, speculate="off")
    try:
        t0 = time.monotonic()
        (easy, hard) = ask(b, [grey(0), grey(128)], deadline_s=0.15)
        took = time.monotonic() - t0
    finally:
        b.stop()
    assert easy.prediction.trace.rule == "confidence" and not easy.prediction.trace.anytime
    tr = hard.prediction.trace
    assert hard.status == 200 and tr.anytime and tr.rule == "deadline" and tr.tiers == ["small"] and tr.exit == 0
    ref = sleep_cascade(tau=0.3)
    s = ImageState(image=grey(128))
    ref.run_stage(0, [s])
    assert hard.prediction.probability == pytest.approx(s.probability)  # the fused answer of tier 0
    assert ev.fallbacks == 1 and took < 0.3  # did not wait for the big tier


def test_no_tier_in_time_is_a_503_and_admission_refuses_impossible_deadlines():
    c = sleep_cascade(t0_ms=50, t1_ms=0)
    b, _ = started(c, max_batch=4)
    try:
        adm = b.admit(1, time.monotonic() + 0.01)  # tier 0 alone takes ~50 ms
        assert not adm.ok and adm.reason == "deadline" and adm.retry_after_s >= 1
        # admitted, but the deadline passes while it waits behind a slow batch
        blocker = ask(b, [grey(0)] * 4, deadline_s=5)  # noqa: F841  (warms the queue path)
        slow = sleep_cascade(t0_ms=200)
        b2, _ = started(slow, warm=False, max_batch=1)
        try:
            results: list = []
            b2.submit([grey(0)], time.monotonic() + 5, [results.append])
            time.sleep(0.02)
            b2.latency.update(0, 1, 1.0)  # the model believes tier 0 is fast: admission lets it in
            b2.submit([grey(0)], time.monotonic() + 0.1, [results.append])
            end = time.monotonic() + 3
            while len(results) < 2 and time.monotonic() < end:
                time.sleep(0.01)
        finally:
            b2.stop()
        late = [o for o in results if o.status != 200]
        assert len(late) == 1 and late[0].status == 503 and late[0].reason == "deadline"
    finally:
        b.stop()


def test_admission_bounds_the_queue():
    c = sleep_cascade(t0_ms=100)
    b, _ = started(c, warm=False, max_batch=2, max_queue=4)
    try:
        b.latency.update(0, 1, 1.0)
        b.latency.update(0, 2, 1.0)
        sink: list = []
        assert b.submit([grey(0)] * 4, time.monotonic() + 30, [sink.append] * 4).ok
        adm = b.submit([grey(0)], time.monotonic() + 30, [sink.append])
        assert not adm.ok and adm.reason == "overloaded" and adm.retry_after_s >= 1
        assert not b.has_room(1)
        end = time.monotonic() + 5
        while len(sink) < 4 and time.monotonic() < end:
            time.sleep(0.01)
        assert len(sink) == 4 and b.inflight == 0 and b.has_room(4)
    finally:
        b.stop()


def test_a_failing_tier_fails_only_its_image_and_the_batcher_goes_on():
    c = sleep_cascade(t0_ms=2, fail=lambda im: int(im[0, 0, 0]) == 77)
    b, ev = started(c, max_batch=8, max_wait_ms=20, speculate="off")
    try:
        out = ask(b, [grey(0), grey(77), grey(255), grey(128)])
        again = ask(b, [grey(0)])
    finally:
        b.stop()
    assert [o.status for o in out] == [200, 500, 200, 200]
    assert out[1].reason == "tier_error" and "simulated failure" in out[1].message
    assert ev.errors == 1 and again[0].status == 200


def test_stop_answers_what_is_queued():
    c = sleep_cascade(t0_ms=100)
    b, _ = started(c, warm=False, max_batch=1)
    b.latency.update(0, 1, 1.0)
    sink: list = []
    b.submit([grey(0)] * 3, time.monotonic() + 30, [sink.append] * 3)
    time.sleep(0.02)
    b.stop(timeout=0.15)  # lets the first image or two finish, no more
    assert len(sink) == 3 and sink[0].status == 200
    assert sink[-1].status == 503 and sink[-1].reason == "shutting_down"
    assert not b.submit([grey(0)], time.monotonic() + 30, [sink.append]).ok


# ----------------------------------------------------------------------------------------------- speculation regimes
def _deferred_latency(mode: str, n: int = 4, one_core: bool = False) -> tuple[list[float], Events, list]:
    c = sleep_cascade(t0_ms=60, t1_ms=60, tau=0.3, one_core=one_core)
    b, ev = started(c, max_batch=4, max_wait_ms=0, speculate=mode)
    lat, answers = [], []
    try:
        for _ in range(n):  # one request at a time: a short queue
            t0 = time.monotonic()
            (o,) = ask(b, [grey(128)])
            lat.append(time.monotonic() - t0)
            answers.append(o)
    finally:
        b.stop()
    return lat, ev, answers


def test_low_load_speculation_overlaps_tiers_and_gives_the_same_answers():
    spec, ev_on, a_on = _deferred_latency("auto")
    seq, ev_off, a_off = _deferred_latency("off")
    assert ev_on.spec.get("used", 0) == len(spec) and "started" not in ev_off.spec
    assert all(o.speculative for o in a_on) and not any(o.speculative for o in a_off)
    for x, y in zip(a_on, a_off):
        assert x.prediction.probability == y.prediction.probability and x.prediction.trace.tiers == y.prediction.trace.tiers
    # sequential: ~60 + 60 ms; speculative: ~max(60, 60) ms
    assert np.median(spec) < 0.8 * np.median(seq), (spec, seq)


def test_exits_at_tier_0_waste_the_speculative_run():
    c = sleep_cascade(t0_ms=5, t1_ms=5, tau=0.3)
    b, ev = started(c, max_batch=4, max_wait_ms=0, speculate="on")
    try:
        (o,) = ask(b, [grey(0)])
        time.sleep(0.05)
    finally:
        b.stop()
    assert o.prediction.trace.exit == 0 and not o.speculative
    assert ev.spec.get("wasted") == 1 and "used" not in ev.spec


def test_high_load_turns_speculation_off():
    c = sleep_cascade(t0_ms=20, t1_ms=20, tau=0.3, per_image_ms=1)
    b, ev = started(c, max_batch=4, max_wait_ms=0, speculate="auto", spec_on_depth=1, spec_off_depth=4, max_queue=256)
    try:
        out = ask(b, [grey(128)] * 48, deadline_s=20)  # a long queue
        assert not b.policy.active
    finally:
        b.stop()
    assert all(o.status == 200 for o in out)
    spec_used = sum(o.speculative for o in out)
    assert ev.spec.get("started", 0) <= 8 and spec_used <= 8  # at most the first batches before the queue was seen


def test_expected_latency_with_and_without_speculation():
    assert expected_ms(1.0, 10, 20, 10, 20) == (30, 20)  # spare cores: overlap pays
    assert expected_ms(0.0, 10, 20, 10, 20) == (10, 10)  # nothing deferred: no gain
    seq, spec = expected_ms(0.5, 10, 20, 30, 60)  # shared cores: each overlapped run is slower
    assert spec > seq


def test_auto_does_not_speculate_where_overlap_cannot_pay():
    """Tiers that cannot overlap (one core): warm-up measures it and auto mode stays sequential."""
    lat, ev, answers = _deferred_latency("auto", one_core=True)
    assert "started" not in ev.spec and not any(o.speculative for o in answers)
