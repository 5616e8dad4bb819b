"""One tier on a batch of jobs, with failures kept to the images that cause them."""

from __future__ import annotations

import copy
import time

from ..cascade.runtime import Cascade, ImageState
from .messages import Job, Outcome


def clone_state(s: ImageState) -> ImageState:
    """A copy to restore a state from if a tier fails half-way (the image array is shared, not copied)."""
    return ImageState(image=s.image, logits=list(s.logits), probs=list(s.probs), features=list(s.features),
                      trace=copy.deepcopy(s.trace), done=s.done, probability=s.probability, calibrated=s.calibrated)


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:200]


def run_isolated(cascade: Cascade, k: int, jobs: list[Job]) -> tuple[list[Job], list[tuple[Job, str]], float]:
    """Run tier k on the batch: ``(ok, failed with their error, ms of the batch run)``. If the batch raises,
    the states are restored and the images run one by one, so that only the images that fail get a 500."""
    backup = [clone_state(j.state) for j in jobs]
    t0 = time.perf_counter()
    try:
        cascade.run_stage(k, [j.state for j in jobs])
        return jobs, [], (time.perf_counter() - t0) * 1e3
    except Exception as e:
        first = error_text(e)
    ms = (time.perf_counter() - t0) * 1e3
    for j, b in zip(jobs, backup):
        j.state = b
    if len(jobs) == 1:
        return [], [(jobs[0], first)], ms
    ok, failed = [], []
    for j in jobs:
        b = clone_state(j.state)
        try:
            cascade.run_stage(k, [j.state])
            ok.append(j)
        except Exception as e:
            j.state = b
            failed.append((j, error_text(e)))
    return ok, failed, ms


# the error outcomes of the stages (the batcher's and the speculation threads')
SHUTTING_DOWN = Outcome(503, reason="shutting_down", message="the server is shutting down")


def internal_error(e: Exception) -> Outcome:
    return Outcome(500, reason="internal", message=f"internal error: {type(e).__name__}")


def tier_failed(tier: str, message: str) -> Outcome:
    return Outcome(500, reason="tier_error", message=f"tier {tier!r} failed on this image: {message}")
