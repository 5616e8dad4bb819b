"""The one import list of every module that registers a tier, rule or fusion kind.

Importing this module fills the registries (``cascade.TIERS``, ``rules.RULES``, ``fusion.FUSIONS``), so a
bundle of any kind loads wherever it is read (:mod:`roadcascade.bundle` imports it) and the contract tests
see every kind. A new kind in a new module adds one line here.
"""

from __future__ import annotations

from . import cascade, fusion, rules, tta  # noqa: F401  (classifier tier; last/stacking/vote; every generic rule; tta)
from .detect import tier as detect_tier, yolox  # noqa: F401  (detector tier and cone_verify rule; coco_context tier)
from .open_models import vlm, zeroshot  # noqa: F401  (zero-shot CLIP/SigLIP and vision-language tiers)
from . import onnx_tier  # noqa: F401  (onnx_classifier: a classifier tier run by onnxruntime)
from .cascade import TIERS
from .fusion import FUSIONS
from .rules import RULES

__all__ = ["TIERS", "RULES", "FUSIONS"]
