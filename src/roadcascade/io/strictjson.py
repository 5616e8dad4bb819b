"""Strict JSON for untrusted input (request bodies, bundle.json): NaN, Infinity and numbers that overflow a
float (1e400) are errors, not values that fail later."""

from __future__ import annotations

import json
import math
from typing import Any


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"the number {text[:40]} does not fit in a float")
    return x


def loads_strict(data: str | bytes) -> Any:
    """``json.loads`` that raises ValueError on NaN, Infinity and overflowing numbers."""
    return json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
