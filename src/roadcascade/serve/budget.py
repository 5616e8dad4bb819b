"""The server-wide pixel budget: decoded pixels held by requests, reserved from the image headers before
any pixel is decoded and given back once the request is answered *and* its decoding has finished.

A 712-byte WebP can declare 4000x4000 pixels (48 MB as RGB, more inside PIL while it decodes); 64 of
them in flight took the server to 8.3 GB. Counting requests or images bounds nothing here; counting
pixels does.
"""

from __future__ import annotations

import threading


class PixelBudget:
    """A counter of reserved pixels with a ceiling; thread-safe (decode threads reserve, the loop releases)."""

    def __init__(self, total: int):
        if total < 1:
            raise ValueError(f"the pixel budget must be >= 1 (got {total!r})")
        self.total, self.used = int(total), 0
        self._lock = threading.Lock()

    def try_take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.total:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)


class Reservation:
    """Pixels held for one request; released once every holder (the request, its decode job) is done."""

    def __init__(self, budget: PixelBudget, holders: int = 2):
        self.budget, self.pixels, self._holders = budget, 0, holders
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        if not self.budget.try_take(n):
            return False
        with self._lock:
            self.pixels += n
        return True

    def done(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
            n, self.pixels = (self.pixels, 0) if last else (0, self.pixels)
        if last and n:
            self.budget.give(n)
