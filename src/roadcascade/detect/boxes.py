"""Box helpers in plain numpy: format conversion, IoU, greedy NMS, letterbox geometry.

Boxes are ``(n, 4)`` float arrays. ``xyxy`` = (x1, y1, x2, y2) in pixels; ``yolo`` = normalised
(cx, cy, w, h) in [0, 1] (the StreetWork manifest's format); ``cxcywh`` = pixel centre and size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "yolo_to_xyxy",
    "xyxy_to_yolo",
    "cxcywh_to_xyxy",
    "box_area",
    "box_iou",
    "nms",
    "batched_nms",
    "clip_boxes",
]


def _as_boxes(b) -> np.ndarray:
    a = np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {a.shape}")
    return a


def yolo_to_xyxy(boxes: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """YOLO-normalised (cx, cy, w, h) -> pixel (x1, y1, x2, y2), clipped to the image."""
    b = _as_boxes(boxes)
    out = np.stack(
        [(b[:, 0] - b[:, 2] / 2) * width, (b[:, 1] - b[:, 3] / 2) * height,
         (b[:, 0] + b[:, 2] / 2) * width, (b[:, 1] + b[:, 3] / 2) * height],
        axis=1,
    ) if len(b) else b
    return clip_boxes(out, width, height)


def xyxy_to_yolo(boxes, width: int, height: int) -> np.ndarray:
    b = _as_boxes(boxes)
    if not len(b):
        return b
    return np.stack(
        [(b[:, 0] + b[:, 2]) / 2 / width, (b[:, 1] + b[:, 3]) / 2 / height,
         (b[:, 2] - b[:, 0]) / width, (b[:, 3] - b[:, 1]) / height],
        axis=1,
    )


def cxcywh_to_xyxy(boxes) -> np.ndarray:
    b = _as_boxes(boxes)
    if not len(b):
        return b
    half = b[:, 2:4] / 2
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1)


def clip_boxes(boxes, width: float, height: float) -> np.ndarray:
    b = _as_boxes(boxes).copy()
    if len(b):
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    return b


def box_area(boxes) -> np.ndarray:
    b = _as_boxes(boxes)
    return (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)


def box_iou(a, b) -> np.ndarray:
    """Pairwise IoU, shape (len(a), len(b)); 0 where the union is empty."""
    a, b = _as_boxes(a), _as_boxes(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes, scores, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, highest score first.

    A box is dropped when its IoU with an already kept box is strictly greater than ``iou_threshold``
    (torchvision's convention). Ties in score keep the lower index first (stable sort).
    """
    b = _as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(b) != len(s):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    order = np.argsort(-s, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(b), dtype=bool)
    iou = box_iou(b, b)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= iou[i] > iou_threshold
    return np.array(keep, dtype=np.int64)


def batched_nms(boxes, scores, classes, iou_threshold: float) -> np.ndarray:
    """NMS within each class (boxes of different classes never suppress each other); sorted by score."""
    b = _as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    c = np.asarray(classes).reshape(-1)
    keep = []
    for k in np.unique(c):
        idx = np.flatnonzero(c == k)
        keep.append(idx[nms(b[idx], s[idx], iou_threshold)])
    if not keep:
        return np.zeros(0, dtype=np.int64)
    kept = np.concatenate(keep)
    return kept[np.argsort(-s[kept], kind="stable")]
