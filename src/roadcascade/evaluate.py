"""Validator-faithful evaluation of a bundle on a dataset split, clean or challenge views.

Challenge views are made as a validator makes them (NATIX v2.0.4 augmentation, JPEG quality 75)
and the timed path starts from those JPEG bytes: decode, preprocess, every tier, fusion, fold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .bundle import Bundle
from .challenge import ChallengeConfig, challenge_views
from .data import Dataset
from .images import BadImage, decode_bytes, encode_jpeg
from .metrics import DASHCAM_SOURCES, percentiles, reliability, summarize

Progress = Callable[[str, int, int], None]

#: DESIGN.md: challenge views use seed 0 on val and seed 1 on test
DEFAULT_VIEW_SEEDS = {"val": 0, "test": 1}


@dataclass(frozen=True)
class EvalItem:
    key: str
    label: int
    source: str
    payload: bytes  # JPEG (or the stored file's) bytes, exactly what a client would send


def view_seed(split: str | None, seed: int | None) -> int:
    if seed is not None:
        return seed
    return DEFAULT_VIEW_SEEDS.get(split or "", 0)


def make_items(ds: Dataset, views: str, seed: int, n_views: int = 4, size: int = 224, progress: Progress | None = None,
               bad: list[dict] | None = None, protocol: str = "v2.0.4") -> list[EvalItem]:
    """The requests to send: stored bytes (clean) or n seeded challenge views per image as JPEG q75, made under the
    challenge ``protocol`` (``challenge.PROTOCOLS``; ``native`` sends each image once, at its own size, since its views
    are all the same). With a ``bad`` list, an image that is missing or does not decode is recorded there and skipped
    (else it raises)."""
    if views not in ("clean", "challenge"):
        raise ValueError(f"views must be 'clean' or 'challenge', not {views!r}")
    items: list[EvalItem] = []
    cfg = ChallengeConfig(size=size, jpeg_quality=None, protocol=protocol)  # encoded once below, as the validator does
    if protocol == "native":
        n_views = 1  # no augmentation: every view of an image would be the same request
    for i, s in enumerate(ds.samples):
        try:
            if views == "clean":
                data = s.data if s.data is not None else s.path.read_bytes()  # type: ignore[union-attr]
                items.append(EvalItem(s.key, s.label, s.source, data))
            else:
                for j, v in enumerate(challenge_views(s.load(), seed=seed, key=s.key, n=n_views, cfg=cfg)):
                    items.append(EvalItem(f"{s.key}#v{j}", s.label, s.source, encode_jpeg(v, 75)))
        except (OSError, BadImage) as e:
            if bad is None:
                raise
            bad.append(bad_row(s.key, e))
        if progress:
            progress(f"prepare {views} views", i + 1, len(ds))
    return items


def _group_metrics(y: np.ndarray, p: np.ndarray, mask: np.ndarray) -> dict:
    s = summarize(y[mask], p[mask])
    return {"n": s.n, "pos": int(y[mask].sum()), "mcc": s.mcc, "accuracy": s.accuracy, "confusion": s.confusion}


def bad_row(key: str, e: BaseException) -> dict:
    """A skipped image for the report: missing (file not there) or its BadImage reason."""
    if isinstance(e, BadImage):
        reason = "missing" if e.reason == "not_found" else e.reason
    else:
        reason = "missing" if isinstance(e, FileNotFoundError) else "unreadable"
    return {"key": key, "reason": reason, "message": str(e)[:300]}


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
    from .gpu import maybe_gpu_cascade  # the GPU fast path when CUDA is present (ROADCASCADE_GPU=0 turns it off)

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
        from .build import baselines_report

        rep["baselines"] = baselines_report(bundle, items, p, batch_size=batch_size, progress=progress)
    return rep


def evaluate(bundle: Bundle, ds: Dataset, views: str, split: str | None, seed: int | None = None, n_views: int = 4,
             batch_size: int = 32, progress: Progress | None = None, strict: bool = True, protocol: str = "v2.0.4") -> dict:
    """``strict=False``: bad rows (the data set's own, missing or undecodable images) are listed in the report's
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
    res = evaluate_items(bundle, items, batch_size=batch_size, progress=progress, bad=bad)
    meta = {"bundle": str(bundle.path), "data": ds.name, "split": split, "views": views,
            "protocol": protocol if challenge else None, "view_seed": seed_,
            "n_images": len(ds), "n_views_per_image": n_views if challenge else 1,
            "n_bad": len(bad or []), "bad_rows": bad or []}
    return {**meta, **res}


def public(report: dict) -> dict:
    """The report without the per-item arrays (those feed the plots)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}
