"""The Ray Serve ingress's deadline, anytime and shedding logic, without Ray: stage handles are faked by coroutines
that run the real ``CascadeStage._run`` on a SleepTier cascade (fast; the HTTP path is in test_ray_serve.py)."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from roadcascade.distributed.serving import CascadeStage, IngressServer
from roadcascade.serve.config import ServeConfig
from roadcascade.serve.inputs import HttpError
from roadcascade.serve.testing import grey, sleep_cascade

pytest.importorskip("ray")


class FakeHandle:
    """``handle.run.remote(state)`` -> an awaitable with ``cancel()``, like a DeploymentResponse."""

    def __init__(self, cascade, k: int, delay_s: float = 0.0, error: Exception | None = None):
        self.stage = CascadeStage.__new__(CascadeStage)  # no bundle: the cascade is given
        self.stage.cascade, self.stage.k = cascade, k
        self.delay_s, self.error, self.calls = delay_s, error, 0
        self.run = self

    def remote(self, state):
        self.calls += 1
        return asyncio.ensure_future(self._go(pickle.loads(pickle.dumps(state))))  # crosses a process boundary

    async def _go(self, state):
        if self.error is not None:
            raise self.error
        await asyncio.sleep(self.delay_s)
        return self.stage._run([state])[0]


def _server(cascade, delays=(0.0, 0.0), max_queue: int = 16, error: Exception | None = None) -> IngressServer:
    stages = [FakeHandle(cascade, k, d, error if k == 0 else None) for k, d in enumerate(delays)]
    return IngressServer(ServeConfig(max_batch=4, max_queue=max_queue), stages, None, cascade.tier_names)


def _deadline(s: float) -> float:
    import time

    return time.monotonic() + s


def test_answers_equal_cascade_predict():
    c = sleep_cascade(tau=0.3)
    images = [grey(v) for v in (10, 120, 130, 250)]  # far from mid-grey exit at tier 0, near it go on
    want = c.predict(images)
    got = asyncio.run(_server(c).infer(images, _deadline(5)))
    assert [o.status for o in got] == [200] * 4
    for o, w in zip(got, want):
        assert abs(o.prediction.probability - w.probability) <= 1e-12 and o.prediction.trace.tiers == w.trace.tiers
        assert not o.prediction.trace.anytime


def test_deadline_during_stage_1_is_an_anytime_answer_and_before_stage_0_a_503():
    c = sleep_cascade(tau=0.3)
    got = asyncio.run(_server(c, delays=(0.0, 2.0)).infer([grey(10), grey(125)], _deadline(0.3)))
    final, early = got
    assert final.ok and not final.prediction.trace.anytime and final.prediction.trace.exit == 0
    assert early.ok and early.prediction.trace.anytime and early.prediction.trace.rule == "deadline" and early.prediction.trace.tiers == ["small"]
    slow0 = asyncio.run(_server(c, delays=(2.0, 0.0)).infer([grey(10)], _deadline(0.2)))
    assert slow0[0].status == 503 and slow0[0].reason == "deadline"


def test_shedding_is_503_with_retry_after():
    c = sleep_cascade()
    s = _server(c, max_queue=16)
    s.precheck(None, 16)  # room for exactly max_queue images
    s.inflight = 10
    with pytest.raises(HttpError) as e:
        s.precheck(None, 7)
    assert e.value.status == 503 and e.value.reason == "overloaded" and e.value.headers["Retry-After"] == "1"
    from ray.serve.exceptions import BackPressureError

    full = _server(c, error=BackPressureError(num_queued_requests=16, max_queued_requests=16))
    with pytest.raises(HttpError) as e:
        asyncio.run(full.infer([grey(10)], _deadline(5)))
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
    assert full.inflight == 0  # released even when refused


def test_a_failing_tier_is_a_500_for_its_images_only():
    c = sleep_cascade(tau=0.3, fail=lambda im: float(im.mean()) > 200)
    ok, bad = asyncio.run(_server(c).infer([grey(10)], _deadline(5)))[0], asyncio.run(_server(c).infer([grey(250)], _deadline(5)))[0]
    assert ok.status == 200 and bad.status == 500 and bad.reason == "tier_error"
