"""Batch collation: pure functions over a queue and a clock, tested with a fake clock (no threads, no HTTP).

``collate`` blocks for the first item, then keeps pulling until the batch is full, ``max_wait`` seconds
have passed since the first item, or waiting longer would make an item miss its latest start time.
Items already past their latest start time are set aside as ``expired`` (the caller answers them:
an anytime answer, or a 503 when no tier has run yet).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class _Stop:
    def __repr__(self) -> str:
        return "STOP"


#: Put this into a stage queue to stop its worker (after the batch in hand).
STOP = _Stop()


class QueueLike(Protocol[T]):
    def get(self, block: bool = True, timeout: float | None = None) -> T: ...


@dataclass
class Collated(Generic[T]):
    items: list[T] = field(default_factory=list)
    expired: list[T] = field(default_factory=list)
    stop: bool = False  # the STOP sentinel was pulled

    def __len__(self) -> int:
        return len(self.items)


def collate(
    q: QueueLike[T],
    max_size: int,
    max_wait: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    start_by: Callable[[T], float] | None = None,
    idle_timeout: float | None = None,
) -> Collated[T]:
    """Pull one batch of at most ``max_size`` items from ``q``.

    Waits up to ``idle_timeout`` seconds (``None``: forever) for a first item; returns an empty batch if
    none comes. From the first item on, waits at most ``max_wait`` seconds for more, and never past the
    earliest ``start_by(item)`` of the batch. Once that time has come, items already in the queue are
    still taken (without waiting) until the batch is full. An item whose ``start_by`` has passed when it
    is pulled goes to ``expired`` and takes no place in the batch.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if max_wait < 0:
        raise ValueError(f"max_wait must be >= 0, got {max_wait}")
    out: Collated[T] = Collated()
    end: float | None = None  # when to stop waiting for more
    while len(out.items) < max_size:
        try:
            if end is None:  # nothing in the batch yet
                item = q.get(True, idle_timeout)
            else:
                left = end - clock()
                item = q.get(True, left) if left > 0 else q.get(False)
        except queue.Empty:
            break
        if item is STOP:
            out.stop = True
            break
        now = clock()
        limit = start_by(item) if start_by is not None else float("inf")
        if limit < now:
            out.expired.append(item)
            if end is None and not out.items:
                # keep draining expired items without waiting, but never block again for a first item
                end = now
            continue
        if end is None or not out.items:
            end = now + max_wait
        end = min(end, limit)
        out.items.append(item)
    return out


def split_by_deadline(items: Sequence[T], now: float, run_s: float, deadline: Callable[[T], float]) -> tuple[list[T], list[T]]:
    """``(run, late)``: ``late`` are the items that would miss their deadline if a batch taking ``run_s``
    seconds started ``now``."""
    run, late = [], []
    for it in items:
        (late if now + run_s > deadline(it) else run).append(it)
    return run, late
