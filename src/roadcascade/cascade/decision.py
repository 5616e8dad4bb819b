"""The cascade's one decision step, on arrays: what happens at exit point ``k`` after tier ``k`` ran.

Fuse the outputs of the tiers that ran into one calibrated probability, fold the exit's decision
threshold to 0.5, and ask the exit's rule which images stop (at the last exit every image stops).
The CPU runtime (:meth:`Cascade.run_stage`), the policy replay (:func:`roadcascade.fit.policy.replay`), the
GPU runtime (:class:`roadcascade.accel.runtime.GpuCascade`) and serving all call :func:`decide`, so they give
the same answers by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .calibration import fold
from .fusion import FUSIONS, Fusion
from .registry import build
from .rules import RULES, Rule, per_image

__all__ = ["ExitPoint", "Decision", "decide", "stack_features", "exit_rule_name", "is_full_frame", "FULL_FRAME_TOLERANCE"]


@dataclass
class ExitPoint:
    """What decides at one exit point: a fusion of the tiers that ran, its threshold (folded to 0.5), a rule."""

    fusion: Fusion
    threshold: float  # decision threshold of the fused probability, folded to 0.5
    rule: Rule
    # threshold for full frames (images that are not square: a photo as taken, not a square crop), where it
    # differs; set by the open-set guard (fit/guard.py). None: one threshold for every image
    full_threshold: float | None = None

    def to_config(self) -> dict:
        return {"fusion": self.fusion.to_config(), "threshold": self.threshold, "rule": self.rule.to_config(),
                **({"full_threshold": self.full_threshold} if self.full_threshold is not None else {})}

    def thresholds(self, full: np.ndarray | None, n: int) -> float | np.ndarray:
        """The decision threshold of each of n images (``full``: which are full frames; None: unknown, none)."""
        if self.full_threshold is None or full is None:
            return self.threshold
        return np.where(np.asarray(full, dtype=bool).reshape(n), self.full_threshold, self.threshold)

    @classmethod
    def from_config(cls, cfg: dict) -> ExitPoint:
        return cls(
            fusion=build(FUSIONS, "fusion", cfg["fusion"]),
            threshold=float(cfg["threshold"]),
            rule=build(RULES, "rule", cfg["rule"]),
            full_threshold=None if cfg.get("full_threshold") is None else float(cfg["full_threshold"]),
        )


@dataclass
class Decision:
    """One exit point's answer for n images."""

    calibrated: np.ndarray  # (n,) fused calibrated probability, before the fold
    probability: np.ndarray  # (n,) folded: decide with > 0.5
    stop: np.ndarray  # (n,) bool: the image stops at this exit
    rule: str  # the rule that decided ("final" at the last exit)


FULL_FRAME_TOLERANCE = 1.1  # an image further than this from square is a full frame (as square views split it)


def is_full_frame(height: int, width: int) -> bool:
    """A photo as taken (wide or tall), not a square crop such as a validator's v2.0.4 challenge view."""
    return max(height, width) > FULL_FRAME_TOLERANCE * min(height, width)


def exit_rule_name(exit: ExitPoint, last: bool) -> str:
    """The name a trace records for the rule of an exit point."""
    return "final" if last else exit.rule.kind


def decide(exit: ExitPoint, logits: np.ndarray, probs: np.ndarray,
           features: Sequence[np.ndarray | None] = (), last: bool = False, full: np.ndarray | None = None) -> Decision:
    """Exit point ``exit`` on n images: logits/probs (n, k+1) of tiers 0..k, features per tier (n, d) or None;
    ``full`` (n,) bool marks full frames (:func:`is_full_frame`), which use the exit's ``full_threshold``."""
    n = len(logits)
    L, P = per_image(logits, n), per_image(probs, n)
    fused = exit.fusion.prob(L, P)
    folded = fold(fused, exit.thresholds(full, n))
    if last:
        stop = np.ones(n, dtype=bool)
    else:
        feats = list(features) or [None] * L.shape[1]
        stop = np.asarray(exit.rule.stop(folded, L, P, feats), dtype=bool)
    return Decision(calibrated=np.asarray(fused, dtype=np.float64), probability=folded, stop=stop,
                    rule=exit_rule_name(exit, last))


def stack_features(columns: Sequence[Sequence[np.ndarray | None]]) -> list[np.ndarray | None]:
    """Per tier, the (n, d) float64 stack of the n images' feature vectors, or None where any image lacks one.

    ``columns[t][i]`` is image i's feature vector from tier t (None when the tier gave none)."""
    out: list[np.ndarray | None] = []
    for col in columns:
        if len(col) and all(f is not None for f in col):
            out.append(np.stack([np.asarray(f, dtype=np.float64).reshape(-1) for f in col]))
        else:
            out.append(None)
    return out
