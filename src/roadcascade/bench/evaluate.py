"""Validator-faithful evaluation of a bundle on a dataset split, clean or challenge views.

Challenge views are made as a validator makes them (NATIX v2.0.4 augmentation, JPEG quality 75)
and the timed path starts from those JPEG bytes: decode, preprocess, every tier, fusion, fold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ..fit.build import baselines_report
from ..cascade.bundle import Bundle
from ..io.challenge import ChallengeConfig
from ..io.data import Dataset
from ..io.images import BadImage, decode_bytes
from ..io.items import DEFAULT_VIEW_SEEDS, EvalItem, Progress, bad_row, make_items, view_seed
from ..metrics import DASHCAM_SOURCES, percentiles, reliability, summarize

__all__ = ["evaluate", "evaluate_items", "public", "EvalItem", "make_items", "view_seed", "bad_row", "DEFAULT_VIEW_SEEDS"]

def _group_metrics(y: np.ndarray, p: np.ndarray, mask: np.ndarray) -> dict:
    s = summarize(y[mask], p[mask])
    return {"n": s.n, "pos": int(y[mask].sum()), "mcc": s.mcc, "accuracy": s.accuracy, "confusion": s.confusion}


def _decode_chunk(chunk: Sequence[EvalItem], bad: list[dict] | None,
                  min_size: int | None = None) -> tuple[list[EvalItem], list[np.ndarray]]:
    if bad is None:
        return list(chunk), [decode_bytes(it.payload, min_size=min_size) for it in chunk]
    kept, arrays = [], []
    for it in chunk:
        try:
            arrays.append(decode_bytes(it.payload, min_size=min_size))
            kept.append(it)
        except BadImage as e:
            bad.append(bad_row(it.key, e))
    return kept, arrays


def evaluate_items(bundle: Bundle, items: Sequence[EvalItem], batch_size: int = 32, progress: Progress | None = None,
                   bad: list[dict] | None = None, baselines: bool = True, reduced_decode: bool = True) -> dict:
    """Run the bundle on the items in batches from bytes; metrics, latency, throughput, exits. With a ``bad`` list,
    an item that does not decode is recorded there and left out (else it raises). ``reduced_decode``: on the CPU
    path, JPEGs much larger than the tiers need are decoded at 1/2..1/8 scale (``Cascade.decode_size``), as the
    server does; False decodes every image at full size."""
    cascade = bundle.cascade
    min_size = cascade.decode_size() if reduced_decode else None
    from ..accel.runtime import maybe_gpu_cascade  # the GPU fast path when CUDA is present (ROADCASCADE_GPU=0 turns it off)

    gc = maybe_gpu_cascade(cascade)
    if gc is not None:  # GPU batches: large enough for the decode processes (GpuConfig.proc_min)
        batch_size = max(batch_size, 4 * gc.cfg.proc_min)
    probs, calib, lat, exits, rules, gfl = [], [], [], [], [], []
    busy = 0.0
    kept: list[EvalItem] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        t0 = time.perf_counter()
        if gc is not None:
            preds = gc.predict([it.payload for it in chunk])
            failed = [(it, p) for it, p in zip(chunk, preds) if isinstance(p, Exception)]
            if failed:
                if bad is None:
                    raise failed[0][1]
                bad.extend(bad_row(it.key, p) for it, p in failed)
                chunk = [it for it, p in zip(chunk, preds) if not isinstance(p, Exception)]
                preds = [p for p in preds if not isinstance(p, Exception)]
        else:
            chunk, arrays = _decode_chunk(chunk, bad, min_size)
            preds = cascade.predict(arrays) if arrays else []
        kept += chunk
        dt = (time.perf_counter() - t0) * 1e3
        busy += dt
        lat += [dt] * len(chunk)
        for pr in preds:
            probs.append(pr.probability)
            calib.append(pr.calibrated)
            exits.append(pr.trace.exit)
            rules.append(pr.trace.rule)
            gfl.append(sum(pr.trace.gflops.values()) if pr.trace.gflops else float("nan"))
        if progress:
            progress("evaluate", min(i + batch_size, len(items)), len(items))
    items = kept
    y = np.array([it.label for it in items], dtype=np.int64)
    p = np.array(probs, dtype=np.float64)
    src = np.array([it.source for it in items])
    summary = summarize(y, p).as_dict()
    exit_rates = [float(np.mean(np.array(exits) == k)) for k in range(cascade.n_stages)]
    dashcam = np.isin(src, DASHCAM_SOURCES)
    dev = next((str(t.device) for t in cascade.tiers if hasattr(t, "device")), "cpu")
    rep = {
        **summary,
        "ece_calibrated": summarize(y, np.array(calib)).ece,
        "latency_ms": percentiles(np.array(lat)),
        "throughput_img_s": float(len(items) / (busy / 1e3)) if busy > 0 else float("nan"),
        "batch_size": batch_size,
        "decode_min_size": min_size if gc is None else None,  # the CPU path's reduced-size JPEG decode (None: full size)
        "device": dev if dev != "cuda" else f"cuda ({torch.cuda.get_device_name()})",
        "threads": torch.get_num_threads(),
        "per_source": {s: _group_metrics(y, p, src == s) for s in sorted(set(src.tolist()))},
        "dashcam": _group_metrics(y, p, dashcam) if dashcam.any() else None,
        "exit_rates": exit_rates,
        "rules": {r: int(c) for r, c in zip(*np.unique(np.array(rules), return_counts=True))},
        # per-image costs as spent (a test-time-scaling tier's cost varies per image)
        "mean_gflops": float(np.mean(gfl)) if gfl and not np.isnan(gfl).any() else cascade.mean_gflops(exit_rates),
        "mean_ms": float(busy / max(1, len(items))),
        "reliability": reliability(y, p),
        "_y": y.tolist(),
        "_p": p.tolist(),
    }
    if baselines and bundle.meta.get("ensemble"):  # a cascade bundle: best single tier and full ensemble, same items, same run
        rep["baselines"] = baselines_report(bundle, items, p, batch_size=batch_size, progress=progress)
    return rep


def evaluate(bundle: Bundle, ds: Dataset, views: str, split: str | None, seed: int | None = None, n_views: int = 4,
             batch_size: int = 32, progress: Progress | None = None, strict: bool = True, protocol: str = "v2.0.4",
             baselines: bool = True) -> dict:
    """``baselines``: a cascade bundle's best-single and full-ensemble rows (``evaluate_items``). ``strict=False``: bad rows (the data set's own, missing or undecodable images) are listed in the report's
    ``bad_rows`` and left out of the metrics; ``strict`` stops at the first. ``protocol``: how challenge views are
    made (``challenge.PROTOCOLS``), recorded in the report (None for clean views)."""
    ChallengeConfig(protocol=protocol)  # ValueError for an unknown protocol, before any work
    challenge = views == "challenge"
    seed_ = view_seed(split, seed) if challenge else None
    if challenge and protocol == "native":
        n_views = 1
    bad: list[dict] | None = None if strict else list(ds.bad)
    items = make_items(ds, views, seed_ if seed_ is not None else 0, n_views=n_views, progress=progress, bad=bad,
                       protocol=protocol)
    res = evaluate_items(bundle, items, batch_size=batch_size, progress=progress, bad=bad, baselines=baselines)
    meta = {"bundle": str(bundle.path), "data": ds.name, "split": split, "views": views,
            "protocol": protocol if challenge else None, "view_seed": seed_,
            "n_images": len(ds), "n_views_per_image": n_views if challenge else 1,
            "n_bad": len(bad or []), "bad_rows": bad or []}
    return {**meta, **res}


def public(report: dict) -> dict:
    """The report without the per-item arrays (those feed the plots)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}
