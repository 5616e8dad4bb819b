"""The batcher's outcomes into HTTP answers: waiting for them on the event loop, the JSON of a prediction or
an ImageSynapse, the X-Anytime header and the error of a failed image."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from .batcher import MultiStageBatcher
from .inputs import HttpError
from .messages import Outcome


async def await_outcomes(batcher: MultiStageBatcher, images: Sequence[np.ndarray], deadline: float, grace_s: float) -> list[Outcome]:
    """Submit images to the batcher (all or none) and wait for their outcomes until ``deadline`` + ``grace_s``;
    an image still unanswered then gets a 500 ``stuck``."""
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in images]

    def callback(fut: asyncio.Future) -> Callable[[Outcome], None]:
        def done(o: Outcome) -> None:
            loop.call_soon_threadsafe(_resolve, fut, o)
        return done

    adm = batcher.submit(images, deadline, [callback(f) for f in futs])
    if not adm.ok:
        raise HttpError(503, adm.reason, adm.message, {"Retry-After": str(adm.retry_after_s)})
    timeout = max(0.0, deadline - time.monotonic()) + grace_s
    await asyncio.wait(futs, timeout=timeout)
    return [f.result() if f.done() and not f.cancelled() else
            Outcome(500, reason="stuck", message="no answer from the batcher in time") for f in futs]


ANYTIME_HEADER = "x-anytime"  # response: "true" when an answer came early (deadline); request: "off" prefers a 503


def synapse_answer(doc: dict, o: Outcome) -> dict:
    """The ImageSynapse back, with the prediction clipped to [0, 1]."""
    return {**doc, "prediction": float(min(1.0, max(0.0, prediction_json(o)["probability"])))}


def anytime_header(outcomes: Sequence[Outcome]) -> dict[str, str]:
    early = any(o.ok and o.prediction is not None and o.prediction.trace.anytime for o in outcomes)
    return {"X-Anytime": "true" if early else "false"}


def _resolve(fut: asyncio.Future, outcome: Outcome) -> None:
    if not fut.done():
        fut.set_result(outcome)


def prediction_json(o: Outcome) -> dict:
    p = o.prediction
    assert p is not None
    if not math.isfinite(p.probability):
        raise HttpError(500, "bad_output", "the cascade produced a non-finite probability")
    d = p.as_dict()
    d["trace"].update(speculative=o.speculative, queue_ms=round(o.queue_ms, 3), total_ms=round(o.total_ms, 3))
    return d


def outcome_error(o: Outcome) -> HttpError:
    headers = {"Retry-After": "1"} if o.status == 503 else None
    return HttpError(o.status, o.reason, o.message, headers)
