"""``roadcascade bench onnx``: bundles of the same model under different backends (fp32 PyTorch, fp32 ONNX, INT8
ONNX ...) on the same validator requests, in one run: img/s, MCC, |delta MCC|, decision agreement and the largest
|dp| against the first bundle (the reference).

The requests are cut into chunks and every bundle runs each chunk in turn, the order rotating from chunk to
chunk, so that the load of a shared CPU falls on all of them alike: quote the ratios, not the absolute speeds.
Each chunk goes through ``evaluate_items``, the timed path of ``roadcascade eval`` (JPEG decode, preprocessing,
every tier, fusion, fold).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..cascade.bundle import Bundle
from .evaluate import EvalItem, evaluate_items
from ..metrics import summarize

Progress = Callable[[str, int, int], None]


@dataclass
class BackendRow:
    label: str
    n: int
    mcc: float
    accuracy: float
    img_s: float
    speedup: float  # img/s over the reference's, same run
    abs_dmcc: float  # |MCC - reference MCC|
    agreement: float  # share of decisions equal to the reference's
    max_abs_dp: float  # largest |p - reference p| of the folded answers

    def as_dict(self) -> dict:
        return asdict(self)


def compare_rows(labels: Sequence[str], y: np.ndarray, probs: Sequence[np.ndarray], seconds: Sequence[float]) -> list[BackendRow]:
    """The table from each bundle's answers and busy seconds; row 0 is the reference."""
    ref_p = probs[0]
    ref = summarize(y, ref_p)
    ref_speed = len(y) / seconds[0] if seconds[0] > 0 else float("nan")
    rows = []
    for label, p, s in zip(labels, probs, seconds):
        m = summarize(y, p)
        speed = len(y) / s if s > 0 else float("nan")
        rows.append(BackendRow(label=label, n=len(y), mcc=m.mcc, accuracy=m.accuracy, img_s=speed, speedup=speed / ref_speed,
                               abs_dmcc=abs(m.mcc - ref.mcc), agreement=float(np.mean((p > 0.5) == (ref_p > 0.5))),
                               max_abs_dp=float(np.max(np.abs(p - ref_p))) if len(p) else 0.0))
    return rows


def bench_backends(bundles: Sequence[tuple[str, Bundle]], items: Sequence[EvalItem], chunk: int = 64, batch_size: int = 32,
                   progress: Progress | None = None) -> list[BackendRow]:
    """Every bundle on every chunk of ``items`` (rotating order); one row per bundle, the first the reference."""
    if not bundles or not items:
        raise ValueError("need at least one bundle and one request")
    probs: list[list[float]] = [[] for _ in bundles]
    busy = [0.0] * len(bundles)
    for b in bundles:  # warm-up (first-call allocations, onnxruntime's arena) outside the timing
        evaluate_items(b[1], items[:batch_size], batch_size=batch_size, baselines=False)
    starts = range(0, len(items), chunk)
    for c, i in enumerate(starts):
        part = items[i : i + chunk]
        for k in np.roll(np.arange(len(bundles)), c):
            rep = evaluate_items(bundles[k][1], part, batch_size=batch_size, baselines=False)
            probs[k] += rep["_p"]
            busy[k] += rep["mean_ms"] * len(part) / 1e3
        if progress:
            progress("bench backends", min(i + chunk, len(items)), len(items))
    y = np.array([it.label for it in items], dtype=np.int64)
    return compare_rows([b[0] for b in bundles], y, [np.asarray(p) for p in probs], busy)
