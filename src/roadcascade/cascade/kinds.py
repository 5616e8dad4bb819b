"""The one import list of every module that registers a tier, rule or fusion kind.

Importing this module fills the registries (``cascade.TIERS``, ``rules.RULES``, ``fusion.FUSIONS``), so a
bundle of any kind loads wherever it is read (:mod:`roadcascade.cascade.bundle` imports it) and the contract tests
see every kind. A new kind in a new module adds one line here.
"""

from __future__ import annotations

from . import runtime as cascade  # noqa: F401  (classifier tier; last/stacking/vote; every generic rule; tta)
from . import fusion
from . import rules
from . import tta
from ..detect import tier as detect_tier  # noqa: F401  (detector tier and cone_verify rule; coco_context tier)
from ..detect import yolox
from ..open_models import vlm  # noqa: F401  (zero-shot CLIP/SigLIP and vision-language tiers)
from ..open_models import zeroshot
from . import onnx_tier  # noqa: F401  (onnx_classifier: a classifier tier run by onnxruntime)
from .runtime import TIERS
from .fusion import FUSIONS
from .rules import RULES

__all__ = ["TIERS", "RULES", "FUSIONS"]
