"""YOLOX-Nano (COCO-80, ONNX) through onnxruntime, and the COCO context tier (kind ``"coco_context"``).

The shared export (``shared/models/yolox_nano.onnx``, Megvii YOLOX, Apache-2.0) takes ``1x3x416x416``
BGR 0-255 input and returns ``1x3549x85``: per anchor point over strides 8, 16, 32 (52x52 + 26x26 +
13x13 = 3549 points, row-major, x fastest), ``[x, y, w, h, objectness, 80 class scores]``. It was
exported with ``decode_in_inference=False``: objectness and class scores are already sigmoids, but the
boxes are raw (x, y offsets in grid cells, w, h as log sizes in strides). Decoding, as YOLOX's
``demo_postprocess``::

    cx, cy = (x + grid_x) * stride, (y + grid_y) * stride
    w, h   = exp(w) * stride, exp(h) * stride

:func:`looks_decoded` checks an output for the other kind of export (boxes already in pixels) and
:class:`YoloxNano` decodes only when needed (``decoded=None`` asks the check once).

Letterboxing is YOLOX's own (``preproc``): scale by ``r = min(416 / h, 416 / w)`` (bilinear), paste at
the top-left corner of a 416x416 canvas filled with 114, no normalisation. Boxes map back by ``/ r``.
Scores are ``objectness x class score`` of each point's best class, then class-aware NMS.

The tier counts what a roadwork scene tends to have around it (trucks, persons, cars, traffic lights,
stop signs) as evidence features; it is off by default (no bundle includes it unless built with
``roadcascade coco-context``), since COCO has no cone, barrier or road-works-sign class.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from ..cascade.runtime import Tier, TierOutput, register_tier
from .boxes import batched_nms, cxcywh_to_xyxy, nms
from .model import Detections

__all__ = [
    "COCO_CLASSES",
    "STRIDES",
    "letterbox",
    "make_grids",
    "decode_outputs",
    "looks_decoded",
    "postprocess",
    "YoloxNano",
    "CONTEXT_CLASSES",
    "CONTEXT_FEATURES",
    "context_features",
    "CocoContextTier",
    "default_model_path",
]

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
STRIDES: tuple[int, ...] = (8, 16, 32)
PAD_VALUE = 114


def default_model_path() -> Path:
    """``$ROADCASCADE_MODELS/yolox_nano.onnx`` or ``../shared/models/yolox_nano.onnx`` next to the repo."""
    import os

    env = os.environ.get("ROADCASCADE_MODELS")
    if env:
        return Path(env) / "yolox_nano.onnx"
    for c in (Path.cwd() / "../shared/models", Path(__file__).resolve().parents[4] / "shared/models"):
        if (c / "yolox_nano.onnx").exists():
            return (c / "yolox_nano.onnx").resolve()
    return Path(__file__).resolve().parents[4] / "shared/models/yolox_nano.onnx"


# ----------------------------------------------------------------------------- geometry


def letterbox(rgb: np.ndarray, size: int = 416) -> tuple[np.ndarray, float]:
    """HxWx3 uint8 RGB -> (1x3xSxS float32 BGR 0-255 at the top-left of a 114 canvas, scale r)."""
    h, w = rgb.shape[:2]
    r = min(size / h, size / w)
    nh, nw = max(1, int(h * r)), max(1, int(w * r))
    resized = cv2.resize(rgb[..., ::-1], (nw, nh), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[:nh, :nw] = resized
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32)[None], r


def make_grids(size: int = 416, strides: Sequence[int] = STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """((N, 2) grid (x, y) cell indices, (N, 1) strides) in the export's anchor order."""
    grids, exp = [], []
    for s in strides:
        n = size // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack((xv, yv), axis=2).reshape(-1, 2))
        exp.append(np.full((n * n, 1), s))
    return np.concatenate(grids).astype(np.float32), np.concatenate(exp).astype(np.float32)


def decode_outputs(raw: np.ndarray, size: int = 416, strides: Sequence[int] = STRIDES) -> np.ndarray:
    """Raw (N, 85) or (1, N, 85) head output -> the same with boxes as pixel (cx, cy, w, h) in the 416 input."""
    out = np.array(raw, dtype=np.float32, copy=True)
    squeeze = out.ndim == 3
    o = out[0] if squeeze else out
    grids, st = make_grids(size, strides)
    if len(o) != len(grids):
        raise ValueError(f"output has {len(o)} points; a {size} px input over strides {tuple(strides)} has {len(grids)}")
    o[:, :2] = (o[:, :2] + grids) * st
    o[:, 2:4] = np.exp(o[:, 2:4]) * st
    return out


def looks_decoded(raw: np.ndarray, size: int = 416, strides: Sequence[int] = STRIDES) -> bool:
    """Whether an output's boxes are already pixel centres (decoded export) rather than grid offsets.

    A decoded export's x centres sit near their grid cell's centre ``(gx + 0.5) * stride`` (within a few
    strides); raw offsets are small numbers, far from it for most points.
    """
    o = np.asarray(raw, dtype=np.float32).reshape(-1, raw.shape[-1])
    grids, st = make_grids(size, strides)
    d = np.abs(o[:, 0:2] - (grids + 0.5) * st) / st
    return bool(np.median(d) < 3.0)


def postprocess(pred: np.ndarray, ratio: float, image_hw: tuple[int, int], score_thr: float = 0.25,
                nms_thr: float = 0.45, class_agnostic: bool = False) -> Detections:
    """Decoded (N, 85) predictions -> detections in original-image pixels (score = obj x best class)."""
    p = np.asarray(pred, dtype=np.float32).reshape(-1, pred.shape[-1])
    cls = p[:, 5:]
    labels = cls.argmax(axis=1)
    scores = p[:, 4] * cls[np.arange(len(p)), labels]
    keep = scores >= score_thr
    if not keep.any():
        return Detections.empty(image_hw)
    boxes = cxcywh_to_xyxy(p[keep, :4]) / ratio
    scores, labels = scores[keep], labels[keep]
    h, w = image_hw
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    idx = nms(boxes, scores, nms_thr) if class_agnostic else batched_nms(boxes, scores, labels, nms_thr)
    return Detections(boxes[idx].astype(np.float32), scores[idx].astype(np.float32), labels[idx].astype(np.int64), (h, w))


class YoloxNano:
    """onnxruntime session + letterbox + decode + NMS. ``decoded=None`` checks the export on first use."""

    def __init__(self, path: str | Path | None = None, score_thr: float = 0.25, nms_thr: float = 0.45,
                 threads: int = 1, decoded: bool | None = None, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path) if path else default_model_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"YOLOX-Nano ONNX not found: {self.path} (see shared/models/README.md)")
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), so, providers=list(providers or ["CPUExecutionProvider"]))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = int(inp.shape[-1]) if isinstance(inp.shape[-1], int) else 416
        self.score_thr, self.nms_thr, self.decoded = float(score_thr), float(nms_thr), decoded

    def raw(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        x, r = letterbox(rgb, self.size)
        return self.session.run(None, {self.input_name: x})[0], r

    def detect_one(self, rgb: np.ndarray) -> Detections:
        out, r = self.raw(rgb)
        if self.decoded is None:
            self.decoded = looks_decoded(out, self.size)
        pred = out[0] if self.decoded else decode_outputs(out, self.size)[0]
        return postprocess(pred, r, rgb.shape[:2], self.score_thr, self.nms_thr)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        return [self.detect_one(im) for im in images]


# ----------------------------------------------------------------------------- the context tier

CONTEXT_CLASSES: tuple[str, ...] = ("person", "bicycle", "car", "motorcycle", "bus", "truck", "traffic light",
                                    "stop sign", "fire hydrant")
CONTEXT_FEATURES: tuple[str, ...] = (
    *(f"n_{c.replace(' ', '_')}" for c in CONTEXT_CLASSES),  # 0-8: detections of that class >= count_threshold
    "max_person", "max_truck", "max_stop_sign",  # 9-11: highest score of that class (0 when none)
    "n_all",  # 12: all detections >= count_threshold, any COCO class
)


def context_features(dets: Sequence[Detections], count_threshold: float = 0.3) -> np.ndarray:
    idx = {c: COCO_CLASSES.index(c) for c in CONTEXT_CLASSES}
    out = np.zeros((len(dets), len(CONTEXT_FEATURES)), dtype=np.float32)
    for i, d in enumerate(dets):
        counted = d.scores >= count_threshold
        for j, c in enumerate(CONTEXT_CLASSES):
            out[i, j] = int((counted & (d.labels == idx[c])).sum())
        for j, c in enumerate(("person", "truck", "stop sign")):
            m = d.labels == idx[c]
            out[i, len(CONTEXT_CLASSES) + j] = float(d.scores[m].max()) if m.any() else 0.0
        out[i, -1] = int(counted.sum())
    return out


_COUNT_COLUMNS = tuple(range(len(CONTEXT_CLASSES))) + (len(CONTEXT_FEATURES) - 1,)


@register_tier
class CocoContextTier(Tier):
    """YOLOX-Nano COCO detections as context evidence (counts of persons, vehicles, lights, signs)."""

    kind = "coco_context"
    GFLOPS = 2.16  # YOLOX-Nano at 416 px: 1.08 GMACs (Megvii), 2 FLOPs per multiply-add as zoo.gflops counts

    def __init__(self, name: str = "coco-yolox-nano", model: YoloxNano | None = None, count_threshold: float = 0.3,
                 scorer=None, gflops: float | None = None):
        from .tier import LogisticScorer

        self.name = name
        self.model = model or YoloxNano()
        self.count_threshold = float(count_threshold)
        self.scorer = scorer or LogisticScorer(log_columns=_COUNT_COLUMNS)
        self.gflops = float(gflops if gflops is not None else self.GFLOPS)
        self.last_detections: list[Detections] = []

    def run(self, images: Sequence[np.ndarray]) -> TierOutput:
        t0 = time.perf_counter()
        dets = self.model.detect(images)
        feats = context_features(dets, self.count_threshold)
        z = self.scorer.logit(feats) if len(feats) else np.zeros(0)
        self.last_detections = dets
        return TierOutput(logits=z, prob=1.0 / (1.0 + np.exp(-z)), features=feats, ms=(time.perf_counter() - t0) * 1e3)

    def to_config(self, bundle_dir: Path) -> dict:
        weights = "yolox_nano.onnx"
        dst = Path(bundle_dir) / weights
        if self.model.path.resolve() != dst.resolve():
            shutil.copyfile(self.model.path, dst)
        return {
            "kind": self.kind, "name": self.name, "model": "yolox_nano", "weights": weights, "input_size": self.model.size,
            "gflops": self.gflops, "score_thr": self.model.score_thr, "nms_thr": self.model.nms_thr,
            "decoded": bool(self.model.decoded) if self.model.decoded is not None else None,
            "count_threshold": self.count_threshold, "features": list(CONTEXT_FEATURES),
            "feature_index": {n: i for i, n in enumerate(CONTEXT_FEATURES)}, "scorer": self.scorer.to_dict(),
        }

    @classmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device: torch.device | None = None) -> "CocoContextTier":
        from .tier import LogisticScorer

        if list(cfg.get("features", CONTEXT_FEATURES)) != list(CONTEXT_FEATURES):
            raise ValueError(f"coco_context tier: feature layout {cfg.get('features')} differs from {list(CONTEXT_FEATURES)}")
        model = YoloxNano(Path(bundle_dir) / cfg["weights"], score_thr=cfg.get("score_thr", 0.25),
                          nms_thr=cfg.get("nms_thr", 0.45), decoded=cfg.get("decoded"))
        return cls(cfg["name"], model, cfg.get("count_threshold", 0.3),
                   LogisticScorer.from_dict({"log_columns": list(_COUNT_COLUMNS), **cfg.get("scorer", {})}), cfg.get("gflops"))

