"""Typed messages that cross the batcher's queues and threads (no bare tuples)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..cascade.runtime import ImageState, Prediction, TierOutput


@dataclass(frozen=True)
class Outcome:
    """How one image's request ends: a prediction (status 200) or an error with its reason."""

    status: int
    prediction: Prediction | None = None
    reason: str = ""  # error reason ("tier_error", "deadline", "shutting_down", ...) or "" on success
    message: str = ""
    speculative: bool = False  # a speculative run of a later tier was used
    queue_ms: float = 0.0  # time spent waiting in stage queues
    total_ms: float = 0.0  # admission to answer

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(eq=False)
class SpecSlot:
    """A speculative run of tier ``stage`` on one image, started while tier ``stage - 1`` runs on it.

    The speculation thread fills ``output`` (or ``error``); the stage worker that finds the image
    deferred either uses the output at once or leaves itself as ``waiter``. ``lock`` orders the two.
    """

    stage: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False
    output: TierOutput | None = None
    error: str = ""
    waiter: "Job | None" = None


@dataclass(eq=False)
class Job:
    """One image on its way through the stages: what a stage queue holds."""

    id: int
    state: ImageState
    arrived: float  # clock seconds when admitted
    deadline: float  # clock seconds by which the answer is due
    on_done: Callable[[Outcome], None]  # called exactly once, from a batcher thread
    queued_at: float = 0.0  # clock seconds when it entered its current queue
    queue_s: float = 0.0  # total time spent in queues
    spec: SpecSlot | None = None
    speculative: bool = False  # a speculative output was used for this image
    answered: bool = False

    @property
    def stage(self) -> int:
        return self.state.stage


@dataclass(frozen=True)
class Admission:
    """The answer of admission control for n images."""

    ok: bool
    reason: str = ""  # "overloaded", "deadline", "not_ready", "shutting_down"
    message: str = ""
    retry_after_s: int = 1
