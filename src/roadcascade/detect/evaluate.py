"""Detector evaluation: COCO-style mAP@0.5 and mAP@0.5:0.95 (pycocotools) on the images of a split
that have boxes, false positives on the split's negatives counted separately, and speed per image.

Ground truth comes from the manifest's YOLO-normalised ``[cx, cy, w, h]`` boxes, turned into pixel
boxes of the stored image. Only images with at least one box enter the mAP (images without boxes in a
positive source may show unboxed cones, and negatives would only add false positives that COCO's AP
does not separate from the rest); negatives (label 0) are scored separately: the share of them with any
detection at or above the operating threshold and the mean number of such detections.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..io.data import Dataset, Sample
from .boxes import box_iou, yolo_to_xyxy
from .model import ConeDetector, Detections

__all__ = [
    "gt_boxes",
    "coco_map",
    "coco_map_numpy",
    "operating_point",
    "negative_false_positives",
    "measure_speed",
    "evaluate_detector",
    "DetEval",
]

Progress = Callable[[str, int, int], None]


def gt_boxes(sample: Sample, image_shape: tuple[int, int]) -> np.ndarray:
    """Pixel xyxy ground-truth boxes of ``sample`` for an image of shape (h, w, ...)."""
    h, w = int(image_shape[0]), int(image_shape[1])
    return yolo_to_xyxy(sample.boxes, w, h).astype(np.float32) if sample.boxes else np.zeros((0, 4), np.float32)


IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def coco_map(gts: Sequence[np.ndarray], dets: Sequence[Detections], sizes: Sequence[tuple[int, int]] | None = None,
             backend: str = "auto") -> dict[str, float]:
    """COCO bbox AP over images i (gts[i] xyxy pixel boxes, dets[i] its detections), one class.

    Returns ``map`` (AP@[.5:.95]), ``map50``, ``map75`` and ``mar100`` (AR with 100 detections), all in
    [0, 1]; -1 where there is nothing to measure (no ground truth at all). ``backend``: ``"pycocotools"``
    (COCOeval), ``"numpy"`` (:func:`coco_map_numpy`, the same algorithm, checked against COCOeval in the
    tests; used where pycocotools is not installed) or ``"auto"`` (pycocotools when importable).
    """
    if len(gts) != len(dets):
        raise ValueError(f"{len(gts)} ground-truth lists but {len(dets)} detection lists")
    if backend == "auto":
        try:
            import pycocotools  # noqa: F401

            backend = "pycocotools"
        except ImportError:
            backend = "numpy"
    if backend == "numpy":
        return coco_map_numpy(gts, dets)
    if backend != "pycocotools":
        raise ValueError(f"backend must be auto, pycocotools or numpy, got {backend!r}")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, res = [], [], []
    aid = 1
    for i, (g, d) in enumerate(zip(gts, dets)):
        h, w = (sizes[i] if sizes is not None else d.image_size) or (0, 0)
        images.append({"id": i + 1, "width": int(w), "height": int(h)})
        for b in np.asarray(g, dtype=np.float64).reshape(-1, 4):
            bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": aid, "image_id": i + 1, "category_id": 1, "bbox": [float(b[0]), float(b[1]), bw, bh],
                         "area": bw * bh, "iscrowd": 0})
            aid += 1
        for b, s in zip(np.asarray(d.boxes, dtype=np.float64).reshape(-1, 4), np.asarray(d.scores).reshape(-1)):
            res.append({"image_id": i + 1, "category_id": 1, "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                        "score": float(s)})
    if not anns:
        return {"map": -1.0, "map50": -1.0, "map75": -1.0, "mar100": -1.0}
    if not res:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0, "mar100": 0.0}
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "traffic_cone"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(res)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {"map": float(s[0]), "map50": float(s[1]), "map75": float(s[2]), "mar100": float(s[8])}


def coco_map_numpy(gts: Sequence[np.ndarray], dets: Sequence[Detections], max_dets: int = 100) -> dict[str, float]:
    """COCOeval's bbox AP for one class and area range "all", in numpy.

    Per image the ``max_dets`` best detections are matched greedily by score, each to the unmatched
    ground truth of highest IoU at or above the threshold; over all images, detections are ranked by
    score (stable: image order, then score order), precision is made monotone and read at 101 recall
    points (0 beyond the highest recall reached); AP is their mean, mAP the mean over IoU .50:.05:.95.
    """
    n_gt = int(sum(len(np.asarray(g).reshape(-1, 4)) for g in gts))
    if n_gt == 0:
        return {"map": -1.0, "map50": -1.0, "map75": -1.0, "mar100": -1.0}
    scores_all, tp_all = [], []
    for g, d in zip(gts, dets):
        g = np.asarray(g, dtype=np.float64).reshape(-1, 4)
        order = np.argsort(-np.asarray(d.scores, dtype=np.float64), kind="mergesort")[:max_dets]
        b = np.asarray(d.boxes, dtype=np.float64).reshape(-1, 4)[order]
        s = np.asarray(d.scores, dtype=np.float64)[order]
        tp = np.zeros((len(IOU_THRESHOLDS), len(s)), dtype=bool)
        if len(s) and len(g):
            iou = box_iou(b, g)
            for t, thr in enumerate(IOU_THRESHOLDS):
                used = np.zeros(len(g), dtype=bool)
                lim = min(thr, 1 - 1e-10)
                for di in range(len(s)):
                    best, m = lim, -1
                    for gi in range(len(g)):
                        if used[gi] or iou[di, gi] < best:
                            continue
                        best, m = iou[di, gi], gi
                    if m >= 0:
                        used[m] = True
                        tp[t, di] = True
        scores_all.append(s)
        tp_all.append(tp)
    scores = np.concatenate(scores_all) if scores_all else np.zeros(0)
    if len(scores) == 0:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0, "mar100": 0.0}
    tps = np.concatenate(tp_all, axis=1)
    rank = np.argsort(-scores, kind="mergesort")
    tps = tps[:, rank]
    aps, recalls = [], []
    for t in range(len(IOU_THRESHOLDS)):
        tp_c = np.cumsum(tps[t]).astype(np.float64)
        fp_c = np.cumsum(~tps[t]).astype(np.float64)
        rc = tp_c / n_gt
        pr = tp_c / np.maximum(tp_c + fp_c, np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]
        idx = np.searchsorted(rc, RECALL_POINTS, side="left")
        q = np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)], 0.0)
        aps.append(q.mean())
        recalls.append(rc[-1])
    return {"map": float(np.mean(aps)), "map50": float(aps[0]), "map75": float(aps[5]), "mar100": float(np.mean(recalls))}


def _match(gt: np.ndarray, det: Detections, threshold: float, iou: float = 0.5) -> tuple[int, int, int]:
    """(tp, fp, fn) of the detections scoring >= threshold, greedy by score at IoU >= iou."""
    d = det.above(threshold)
    if len(d) == 0:
        return 0, 0, len(gt)
    if len(gt) == 0:
        return 0, len(d), 0
    m = box_iou(d.boxes, gt)
    used = np.zeros(len(gt), dtype=bool)
    tp = 0
    for i in np.argsort(-d.scores, kind="stable"):
        cand = np.where(~used & (m[i] >= iou), m[i], -1.0)
        j = int(np.argmax(cand))
        if cand[j] >= iou:
            used[j] = True
            tp += 1
    return tp, len(d) - tp, len(gt) - tp


def operating_point(gts: Sequence[np.ndarray], dets: Sequence[Detections], lo: float = 0.15, hi: float = 0.85) -> dict[str, float]:
    """The score threshold in [lo, hi] with the best box-level F1 at IoU 0.5 (chosen on val)."""
    best = {"threshold": 0.5, "f1": -1.0, "precision": 0.0, "recall": 0.0}
    for t in np.round(np.arange(lo, hi + 1e-9, 0.025), 3):
        tp = fp = fn = 0
        for g, d in zip(gts, dets):
            a, b, c = _match(g, d, float(t))
            tp, fp, fn = tp + a, fp + b, fn + c
        p = tp / max(1, tp + fp)
        r = tp / max(1, tp + fn)
        f1 = 2 * p * r / max(1e-12, p + r)
        if f1 > best["f1"] + 1e-12:
            best = {"threshold": float(t), "f1": float(f1), "precision": float(p), "recall": float(r)}
    return best


def negative_false_positives(dets: Sequence[Detections], threshold: float) -> dict[str, float]:
    """On images without roadwork: share with any detection >= threshold, and detections per image."""
    n = len(dets)
    counts = np.array([int((d.scores >= threshold).sum()) for d in dets])
    return {
        "n_images": n,
        "threshold": float(threshold),
        "images_with_fp": float((counts > 0).mean()) if n else float("nan"),
        "fp_per_image": float(counts.mean()) if n else float("nan"),
        "max_score_mean": float(np.mean([d.scores.max() if len(d) else 0.0 for d in dets])) if n else float("nan"),
    }


def measure_speed(model: ConeDetector, images: Sequence[np.ndarray], batch_sizes: Sequence[int] = (1, 16), repeats: int = 1,
                  warmup: int = 2, amp: bool = False) -> dict[str, float]:
    """Milliseconds per image at each batch size (wall time of ``detect``, decode excluded)."""
    import torch

    out: dict[str, float] = {}
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    for bs in batch_sizes:
        model.detect(list(images[: max(1, min(len(images), bs * warmup))]), batch_size=bs, amp=amp)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.detect(list(images), batch_size=bs, amp=amp)
        sync()
        out[f"ms_per_image_bs{bs}"] = (time.perf_counter() - t0) * 1e3 / (repeats * max(1, len(images)))
    return out


@dataclass
class DetEval:
    """A split's detections, decoded images and ground truth (reused for evidence fitting)."""

    samples: list[Sample]
    images: list[np.ndarray]
    dets: list[Detections]

    def boxed(self) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s.boxes]

    def negatives(self) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s.label == 0]

    def gts(self, idx: Sequence[int]) -> list[np.ndarray]:
        return [gt_boxes(self.samples[i], self.images[i].shape) for i in idx]


def run_split(model: ConeDetector, ds: Dataset, batch_size: int = 16, amp: bool = False, progress: Progress | None = None,
              desc: str = "detect") -> DetEval:
    samples = list(ds.samples)
    images = []
    for i, s in enumerate(samples):
        images.append(s.load())
    dets: list[Detections] = []
    for i in range(0, len(images), batch_size):
        dets += model.detect(images[i : i + batch_size], batch_size=batch_size, amp=amp)
        if progress:
            progress(desc, min(len(images), i + batch_size), len(images))
    return DetEval(samples, images, dets)


def evaluate_detector(model: ConeDetector, ev: DetEval, threshold: float) -> dict:
    """mAP on the boxed images of ``ev``, box-level P/R/F1 at ``threshold``, false positives on negatives."""
    idx = ev.boxed()
    gts = ev.gts(idx)
    dets = [ev.dets[i] for i in idx]
    rep: dict = {"n_images_with_boxes": len(idx), "n_boxes": int(sum(len(g) for g in gts))}
    rep.update(coco_map(gts, dets, [ev.images[i].shape[:2] for i in idx]))
    tp = fp = fn = 0
    for g, d in zip(gts, dets):
        a, b, c = _match(g, d, threshold)
        tp, fp, fn = tp + a, fp + b, fn + c
    rep["at_threshold"] = {"threshold": threshold, "precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn),
                           "tp": tp, "fp": fp, "fn": fn}
    rep["negatives"] = negative_false_positives([ev.dets[i] for i in ev.negatives()], threshold)
    return rep
