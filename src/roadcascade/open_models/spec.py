"""Open-model tiers in a ``roadcascade build`` tier list::

    zeroshot(path=/models/siglip-base[,name=siglip][,prompts=prompts.json][,batch=32])
    vlm(path=/models/llava-1.5-7b-hf[,name=llava][,question=Is there roadwork here? Answer yes or no.]
        [,prompt=USER: ... <image> ASSISTANT:][,batch=8][,budget_ms=400][,prefix_cache=0])
    detector(path=runs/detector[,name=cones][,native_cap=448][,batch=16])   (a ``train-detector`` bundle)

``prompts.json`` is ``{"positive": [...], "negative": [...]}``. Option values cannot contain commas or
parentheses (give a longer question through ``prompt``-free defaults or a prompts file). Local timm backbones
need no syntax of their own: register them (``$ROADCASCADE_MODELS``) and name them like any zoo model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .local import hash_path

__all__ = ["OPEN_KINDS", "OpenTierSpec", "make_tier", "parse_open_item"]

OPEN_KINDS = ("zeroshot", "vlm", "detector")
_OPTIONS = {"zeroshot": {"path", "name", "prompts", "batch"},
            "vlm": {"path", "name", "question", "prompt", "batch", "budget_ms", "prefix_cache"},
            "detector": {"path", "name", "native_cap", "batch"}}
_ITEM = re.compile(r"^(zeroshot|vlm|detector)\((.*)\)$", re.S)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class OpenTierSpec:
    kind: str  # "zeroshot" | "vlm"
    path: str
    label: str
    options: tuple[tuple[str, str], ...] = ()

    # the fields build.py reads of every tier spec
    @property
    def name(self) -> str:
        return self.label

    @property
    def model(self) -> str:
        return self.label

    size = None
    n_min = n_max = 1
    views = None

    @property
    def source(self) -> str:
        return self.path

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)

    def fingerprint(self) -> str:
        """What the val cache is keyed by: the model's SHA-256 and the options."""
        return json.dumps([self.kind, hash_path(self.path), sorted(self.options)])


def parse_open_item(item: str) -> OpenTierSpec | None:
    """An open tier spec from one tier-list item, or None when the item is not ``zeroshot(...)``/``vlm(...)``."""
    m = _ITEM.match(item.strip())
    if not m:
        return None
    kind, opts = m.group(1), {}
    for kv in (x for x in m.group(2).split(",") if x.strip()):
        key, eq, val = kv.partition("=")
        key, val = key.strip(), val.strip()
        if not eq or key not in _OPTIONS[kind] or not val:
            raise ValueError(f"tier {item!r}: unknown or empty option {kv.strip()!r} (known: {', '.join(sorted(_OPTIONS[kind]))})")
        opts[key] = val
    if "path" not in opts:
        raise ValueError(f"tier {item!r}: {kind}() needs path=/local/model/folder (nothing is downloaded)")
    label = opts.pop("name", None) or f"{kind}-{Path(opts['path']).name}"[:64]
    if not _NAME.match(label):
        raise ValueError(f"tier {item!r}: name {label!r} must be 1..64 letters, digits, '_', '.', '-'")
    return OpenTierSpec(kind, opts.pop("path"), label, tuple(sorted(opts.items())))


def _prompts_file(path: str) -> dict:
    try:
        doc = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"prompts file {path}: {e}") from None
    if not isinstance(doc, dict) or not {"positive", "negative"} <= set(doc):
        raise ValueError(f"prompts file {path}: expected {{\"positive\": [...], \"negative\": [...]}}")
    return {"positive": doc["positive"], "negative": doc["negative"]}


def make_tier(spec: OpenTierSpec, device: torch.device, batch_size: int = 32):
    """The (uncalibrated) tier of a spec, its model loaded from the local path and hashed."""
    from .local import LocalSource

    if spec.kind == "detector":  # a cone detector bundle (``train-detector``): its tier, to be calibrated here
        from ..detect.join import detector_tier_from_bundle

        cap = spec.option("native_cap")
        return detector_tier_from_bundle(spec.path, device, name=spec.name, native_cap=int(cap) if cap else None,
                                         batch_size=int(spec.option("batch", 16)))
    src = LocalSource.of(spec.path)
    batch = int(spec.option("batch", batch_size))
    if spec.kind == "zeroshot":
        from .zeroshot import ZeroShotTier

        prompts = _prompts_file(spec.option("prompts")) if spec.option("prompts") else {}
        return ZeroShotTier(spec.name, src, device=device, batch_size=batch, **prompts)
    from .vlm import DEFAULT_QUESTION, VLMTier

    budget = spec.option("budget_ms")
    return VLMTier(spec.name, src, question=spec.option("question", DEFAULT_QUESTION), prompt=spec.option("prompt"),
                   device=device, batch_size=int(spec.option("batch", 8)), budget_ms=float(budget) if budget else None,
                   prefix_cache=spec.option("prefix_cache", "1") not in ("0", "false", "no"))
