"""Zero-shot tier: a CLIP or SigLIP image-text model (transformers ``CLIPModel`` / ``SiglipModel``) from a
local path scores each image against two prompt ensembles, "roadwork" and "no roadwork".

Each ensemble's text embeddings are L2-normalised, averaged and normalised again (the prompt ensembling of the
CLIP paper), once, when the tier is built. The raw logit of an image is the model's logit scale times the
difference of its cosine similarity to the two ensembles (SigLIP's bias cancels in the difference); a
temperature and threshold fitted on val turn it into a calibrated probability like any other tier. The prompts
are stored in the bundle; the model stays at its local path, recorded with its SHA-256 and checked at load.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..cascade.calibration import TemperatureCalibrator, calibrated_or_sigmoid
from ..cascade.runtime import Tier, TierOutput, register_tier
from ..models.preprocess import pick_device
from .hf import as_rgb_list, count_gflops, load_pretrained
from .local import LocalSource

__all__ = ["DEFAULT_NEGATIVE", "DEFAULT_POSITIVE", "ZeroShotTier"]

DEFAULT_POSITIVE = ("a photo of road work", "a photo of a construction zone on a street",
                    "a street with traffic cones and a road work barrier")
DEFAULT_NEGATIVE = ("a photo of a street", "a photo of an ordinary street without road work", "an empty road")


def _prompts(v, field: str) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= 64 or not all(
            isinstance(p, str) and 0 < len(p) <= 300 and p.isprintable() for p in v):
        raise ValueError(f"{field}: expected 1..64 printable prompts of at most 300 characters, got {str(v)[:120]!r}")
    return tuple(v)


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4.x and an output object (pooler_output) in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@register_tier
class ZeroShotTier(Tier):
    kind = "zeroshot"

    def __init__(self, name: str, source: LocalSource, positive: Sequence[str] = DEFAULT_POSITIVE,
                 negative: Sequence[str] = DEFAULT_NEGATIVE, calibrator: TemperatureCalibrator | None = None,
                 gflops: float | None = None, device: torch.device | None = None, batch_size: int = 32):
        self.name, self.source = name, source
        self.positive, self.negative = _prompts(positive, "positive"), _prompts(negative, "negative")
        self.calibrator = calibrator or TemperatureCalibrator()
        self.device, self.batch_size = device or pick_device(), int(batch_size)
        self.model, self.processor = load_pretrained(source, "AutoModel", self.device, f"zero-shot tier {name!r}")
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ValueError(f"zero-shot tier {name!r}: {type(self.model).__name__} at {source.path} is not an "
                             "image-text model (CLIPModel, SiglipModel, ...)")
        self.dtype = next(self.model.parameters()).dtype
        self.scale = float(self.model.logit_scale.detach().float().exp()) if hasattr(self.model, "logit_scale") else 1.0
        with torch.inference_mode():
            self.text = torch.stack([self._ensemble(self.positive), self._ensemble(self.negative)])  # (2, d)
        self.gflops = float(gflops) if gflops is not None else self._count_gflops()

    def _ensemble(self, prompts: Sequence[str]) -> torch.Tensor:
        siglip = "siglip" in getattr(self.model.config, "model_type", "")
        enc = self.processor(text=list(prompts), return_tensors="pt", padding="max_length" if siglip else True, truncation=True)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "position_ids")}
        if siglip:
            enc.pop("attention_mask", None)  # SigLIP is trained on max-length padded text, without a mask
        e = torch.nn.functional.normalize(_features(self.model.get_text_features(**enc)).float(), dim=-1)
        return torch.nn.functional.normalize(e.mean(0), dim=-1)

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        px = self.processor(images=as_rgb_list(images), return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    @torch.inference_mode()
    def logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            img = _features(self.model.get_image_features(pixel_values=self._pixels(images[i : i + self.batch_size])))
            sim = torch.nn.functional.normalize(img.float(), dim=-1) @ self.text.T  # (n, 2) cosines
            out.append((self.scale * (sim[:, 0] - sim[:, 1])).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    full_logits = logits  # what build fits on (the same: no time budget here)

    def decode_size(self) -> int | None:
        """The processor's resize target (CLIP: shortest edge; SigLIP: the square side), so the server can decode
        large JPEGs at reduced size without the processor ever upsampling; None when the processor says otherwise."""
        raw = getattr(getattr(self.processor, "image_processor", None), "size", None)
        names = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")
        get = raw.get if isinstance(raw, dict) else (lambda k: getattr(raw, k, None))  # dict (4.x) or SizeDict (5.x)
        size = {k: get(k) for k in names if get(k) is not None}
        keys = set(size)
        if keys == {"shortest_edge"}:
            s = size["shortest_edge"]
        elif keys == {"height", "width"}:
            s = max(size["height"], size["width"])
        else:
            return None
        return int(s) if isinstance(s, int) and 0 < s <= 2048 else None

    def _count_gflops(self) -> float:
        x = self._pixels([np.zeros((64, 64, 3), np.uint8)])
        return count_gflops(lambda: self.model.get_image_features(pixel_values=x))

    def run(self, images: Sequence[np.ndarray]) -> TierOutput:
        t0 = time.perf_counter()
        z = self.logits(images)
        return TierOutput(logits=z, prob=calibrated_or_sigmoid(self.calibrator, z), ms=(time.perf_counter() - t0) * 1e3)

    def to_config(self, bundle_dir: Path) -> dict:
        return {"kind": self.kind, "name": self.name, "source": self.source.to_dict(), "positive": list(self.positive),
                "negative": list(self.negative), "gflops": self.gflops, "batch_size": self.batch_size,
                "calibration": self.calibrator.to_dict()}

    @classmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device: torch.device) -> "ZeroShotTier":
        return cls(name=cfg["name"], source=LocalSource.from_dict(cfg.get("source")), positive=cfg["positive"],
                   negative=cfg["negative"], calibrator=TemperatureCalibrator.from_dict(cfg["calibration"]),
                   gflops=cfg.get("gflops"), device=device, batch_size=cfg.get("batch_size", 32))
