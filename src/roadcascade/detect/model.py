"""The cone detector: torchvision FCOS on a zoo backbone (timm EfficientNet-Lite feature pyramid).

::

    image (uint8 RGB, any size)
      -> FCOS transform: scale to [0, 1], resize so the short side is ``min_size`` (long side at most
         ``max_size``), normalise with the backbone's mean/std, pad the batch to a multiple of 32
      -> timm ``features_only`` backbone, strides 8/16/32 (lite0: 40/112/320 channels), ImageNet weights
         from the zoo (``zoo.load_imagenet_state``), BatchNorm statistics frozen, stem and the first
         ``freeze_blocks`` stages frozen
      -> torchvision FPN to ``fpn_channels`` + P6/P7 (``extra_levels``): strides 8..128
      -> FCOS head (``head_convs`` conv+GroupNorm layers per branch; classification, box, centre-ness)
      -> score = sqrt(sigmoid(cls) * sigmoid(ctr)), per-level top-k, NMS, boxes in input-image pixels

Everything that defines the network is in :class:`DetectorConfig`, stored with the weights (safetensors
metadata) so a saved detector loads without guessing. Class index 0 is "traffic_cone" (FCOS needs no
background class: unmatched points are background).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["DetectorConfig", "Detections", "ConeDetector", "build_detector", "save_detector", "load_detector"]


@dataclass(frozen=True)
class DetectorConfig:
    backbone: str = "lite0"  # zoo model name (``roadcascade zoo``)
    out_indices: tuple[int, ...] = (2, 3, 4)  # timm feature levels (lite: strides 8, 16, 32)
    fpn_channels: int = 64  # a multiple of 32 (FCOS head uses GroupNorm(32))
    head_convs: int = 2  # conv layers per head branch (FCOS paper: 4)
    extra_levels: int = 2  # 0, 1 (max-pool P6) or 2 (P6, P7 convs)
    min_size: int = 320  # inference: short side in pixels
    max_size: int = 640  # inference: cap on the long side
    # inference on larger photos: the short side is the image's own, up to this cap (never below min_size),
    # so a 1080p dashcam frame is seen at 640 px instead of being shrunk to min_size (None: always min_size)
    native_cap: int | None = None
    freeze_blocks: int = 2  # backbone stem + this many stages are frozen
    score_thresh: float = 0.05  # keep detections above this score (low: mAP needs the tail)
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    topk_candidates: int = 1000
    center_sampling_radius: float = 1.5
    classes: tuple[str, ...] = ("traffic_cone",)

    def __post_init__(self) -> None:
        if self.fpn_channels % 32:
            raise ValueError(f"fpn_channels must be a multiple of 32 (GroupNorm(32) in the FCOS head), got {self.fpn_channels}")
        if self.extra_levels not in (0, 1, 2):
            raise ValueError(f"extra_levels must be 0, 1 or 2, got {self.extra_levels}")
        if not self.classes:
            raise ValueError("a detector needs at least one class")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorConfig":
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kw)

    def replace(self, **kw) -> "DetectorConfig":
        return DetectorConfig.from_dict({**self.to_dict(), **kw})

    def sizes_for(self, height: int, width: int) -> tuple[int, int]:
        """(short side, long-side cap) the detector resizes an image of this size to at inference."""
        if not self.native_cap:
            return self.min_size, self.max_size
        short = max(self.min_size, min(int(min(height, width)), int(self.native_cap)))
        return short, max(self.max_size, round(self.max_size * short / self.min_size))


@dataclass
class Detections:
    """Detections on one image, in that image's pixel coordinates, sorted by score (highest first)."""

    boxes: np.ndarray  # (n, 4) x1, y1, x2, y2
    scores: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) class index into DetectorConfig.classes
    image_size: tuple[int, int] = (0, 0)  # (height, width)

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, threshold: float) -> "Detections":
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], self.image_size)

    @classmethod
    def empty(cls, image_size: tuple[int, int] = (0, 0)) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), image_size)


class FPNBackbone(nn.Module):
    """timm ``features_only`` body + torchvision FPN; returns an OrderedDict of equal-width maps."""

    def __init__(self, body: nn.Module, in_channels: Sequence[int], out_channels: int, extra_levels: int, freeze_blocks: int):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

        self.body = body
        extra = {0: None, 1: LastLevelMaxPool(), 2: LastLevelP6P7(out_channels, out_channels)}[extra_levels]
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self.freeze_blocks = freeze_blocks
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        mods = []
        for n in ("conv_stem", "bn1"):
            if hasattr(self.body, n):
                mods.append(getattr(self.body, n))
        blocks = getattr(self.body, "blocks", None)
        if blocks is not None:
            mods += list(blocks[: self.freeze_blocks])
        return mods

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FPNBackbone":
        super().train(mode)
        # Detection batches are small: keep the ImageNet BatchNorm statistics (affine weights still train).
        for m in self.body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _build_body(cfg: DetectorConfig, pretrained: bool) -> tuple[nn.Module, list[int], list[int]]:
    import timm

    from ..models.zoo import get_spec, load_imagenet_state

    spec = get_spec(cfg.backbone)
    body = timm.create_model(spec.arch, pretrained=False, features_only=True, out_indices=tuple(cfg.out_indices))
    if pretrained and spec.weights.kind != "none":
        state = load_imagenet_state(spec)  # the full classifier's keys; the feature net holds a subset
        res = body.load_state_dict(state, strict=False)
        if res.missing_keys:
            raise RuntimeError(
                f"ImageNet weights of {cfg.backbone!r} do not cover the feature network: "
                f"{len(res.missing_keys)} missing keys (first: {res.missing_keys[:3]})"
            )
    info = body.feature_info
    return body, list(info.channels()), list(info.reduction())


class ConeDetector(nn.Module):
    """FCOS cone detector. ``forward`` is torchvision's (lists of float CHW images in [0, 1], targets);
    :meth:`detect` takes decoded uint8 RGB images and returns :class:`Detections`."""

    def __init__(self, cfg: DetectorConfig = DetectorConfig(), pretrained: bool = True):
        super().__init__()
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.fcos import FCOS, FCOSHead

        from ..models.zoo import get_spec

        self.cfg = cfg
        spec = get_spec(cfg.backbone)
        body, channels, strides = _build_body(cfg, pretrained)
        self.strides = strides + [strides[-1] * 2 ** (k + 1) for k in range(cfg.extra_levels)]
        backbone = FPNBackbone(body, channels, cfg.fpn_channels, cfg.extra_levels, cfg.freeze_blocks)
        anchors = AnchorGenerator(tuple((s,) for s in self.strides), ((1.0,),) * len(self.strides))
        head = FCOSHead(cfg.fpn_channels, 1, len(cfg.classes), num_convs=cfg.head_convs)
        self.fcos = FCOS(
            backbone, num_classes=len(cfg.classes), min_size=cfg.min_size, max_size=cfg.max_size,
            image_mean=list(spec.mean), image_std=list(spec.std), anchor_generator=anchors, head=head,
            center_sampling_radius=cfg.center_sampling_radius, score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img, topk_candidates=cfg.topk_candidates,
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_sizes(self, min_size: int | Sequence[int], max_size: int | None = None) -> None:
        """Resize policy of the FCOS transform (a tuple of min sizes: one is drawn per image in training)."""
        t = self.fcos.transform
        t.min_size = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if max_size is not None:
            t.max_size = int(max_size)

    def forward(self, images, targets=None):
        return self.fcos(images, targets)

    @staticmethod
    def to_tensor(img: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """HxWx3 uint8 -> 3xHxW float in [0, 1]."""
        img = np.ascontiguousarray(img)
        if not img.flags.writeable:
            img = img.copy()
        return torch.from_numpy(img).to(device).permute(2, 0, 1).float().div_(255.0)

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray], batch_size: int = 16, amp: bool = False) -> list[Detections]:
        """Detections per image, in input order.

        Images are batched only with images of the same height and width: the FCOS transform pads a
        batch to its largest image, and padding would change an image's detections (and cost) with the
        company it is batched in. So an image's evidence does not depend on which other images are still
        undecided in a cascade batch.
        """
        was_training = self.training
        self.eval()
        dev = self.device
        out: list[Detections | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault((int(im.shape[0]), int(im.shape[1])), []).append(i)
        t = self.fcos.transform
        kept = (t.min_size, t.max_size)
        try:
            for (h, w), idx in groups.items():
                if self.cfg.native_cap:  # this shape's own size (the transform's sizes are put back below)
                    short, cap = self.cfg.sizes_for(h, w)
                    t.min_size, t.max_size = (short,), cap
                for j in range(0, len(idx), batch_size):
                    chunk = idx[j : j + batch_size]
                    xs = [self.to_tensor(images[i], dev) for i in chunk]
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
                        res = self.fcos(xs)
                    for i, r in zip(chunk, res):
                        out[i] = Detections(
                            boxes=r["boxes"].float().cpu().numpy().astype(np.float32),
                            scores=r["scores"].float().cpu().numpy().astype(np.float32),
                            labels=r["labels"].cpu().numpy().astype(np.int64),
                            image_size=(int(images[i].shape[0]), int(images[i].shape[1])),
                        )
        finally:
            t.min_size, t.max_size = kept
            self.train(was_training)
        return out  # type: ignore[return-value]

    def gflops(self, height: int = 224, width: int = 381) -> float:
        """Forward GFLOPs (FlopCounterMode: 2 per multiply-add) for one image of this size, after the
        detector's own resize (default: the typical 381x224 StreetWork frame)."""
        from torch.utils.flop_counter import FlopCounterMode

        was_training = self.training
        self.eval()
        x = torch.zeros(3, height, width, device=self.device)
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self.fcos([x])
        finally:
            self.train(was_training)
        return counter.get_total_flops() / 1e9


def build_detector(cfg: DetectorConfig = DetectorConfig(), pretrained: bool = True) -> ConeDetector:
    return ConeDetector(cfg, pretrained=pretrained)


def save_detector(model: ConeDetector, path: str | Path, extra: dict | None = None) -> Path:
    """Weights as ``.safetensors`` with the config (and ``extra``) as JSON metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"detector_config": json.dumps(model.cfg.to_dict())}
    if extra:
        meta["extra"] = json.dumps(extra)
    save_file(state, str(path), metadata=meta)
    return path


def load_detector(path: str | Path, device: torch.device | str = "cpu", cfg: DetectorConfig | None = None) -> ConeDetector:
    """Rebuild the detector from a :func:`save_detector` file (no ImageNet weights needed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector weights not found: {path}")
    if cfg is None:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "detector_config" not in meta:
            raise ValueError(f"{path}: no detector_config in the safetensors metadata; pass cfg")
        cfg = DetectorConfig.from_dict(json.loads(meta["detector_config"]))
    model = ConeDetector(cfg, pretrained=False)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval()


def detector_summary(model: ConeDetector) -> dict:
    n = sum(p.numel() for p in model.parameters())
    nt = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": n, "trainable": nt, "strides": list(model.strides), **{"config": model.cfg.to_dict()}}

