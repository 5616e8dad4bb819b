"""The cascade: tiers, deferral rules, fusion, the decision step, the batched runtime, the bundle.

The public names are re-exported here (``from roadcascade.cascade import Cascade, Tier, TierOutput,
register_tier``); the code lives in the modules of this package (``runtime``, ``rules``, ``fusion``,
``decision``, ``registry``, ``calibration``, ``tta``, ``bundle``, ``kinds``).
"""

from .decision import Decision, decide
from .fusion import FUSIONS, Fusion, LastTierFusion, register_fusion
from .rules import RULES, ConfidenceRule, FinalRule, Rule, register_rule
from .runtime import (
    TIERS, Cascade, ClassifierTier, ExitPoint, ImageState, Prediction, Tier, TierCaps, TierOutput, Trace, register_tier,
    run_tier, square_views, state_arrays,
)

__all__ = [
    "Cascade", "Tier", "TierOutput", "TierCaps", "ClassifierTier", "ExitPoint", "ImageState", "Prediction", "Trace",
    "TIERS", "register_tier", "run_tier", "square_views", "state_arrays", "Rule", "FinalRule", "ConfidenceRule", "RULES",
    "register_rule", "Fusion", "LastTierFusion", "FUSIONS", "register_fusion", "Decision", "decide",
]
