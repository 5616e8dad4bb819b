"""The detector tier (kind ``"detector"``): cone evidence per image for fusion and deferral rules.

``run(images)`` detects cones and turns each image's detections into a fixed evidence vector
(``TierOutput.features``, layout in :data:`EVIDENCE_FEATURES` and in the tier's config under
``"features"``). Its ``logits``/``prob`` are a roadwork score from that evidence: a small logistic model
fitted on val evidence (clean images and challenge views), so the probability is calibrated by
construction (maximum likelihood) and the tier can also stand alone.

Also here: :class:`ConeVerifyRule` (rule kind ``"cone_verify"``): at an exit after the detector, an image
whose classifier says "roadwork" with no cone evidence, or "none" with strong cone evidence, does not
stop (it escalates to the next tier).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..cascade.calibration import TemperatureCalibrator, calibrated_or_sigmoid
from ..cascade.runtime import Rule, Tier, TierOutput, register_rule, register_tier
from ..cascade.rules import per_image
from ..models.preprocess import pick_device
from .boxes import box_area
from .model import ConeDetector, Detections, load_detector, save_detector

__all__ = [
    "EVIDENCE_FEATURES",
    "EvidenceConfig",
    "evidence_features",
    "LogisticScorer",
    "DetectorTier",
    "ConeVerifyRule",
]

# The layout of DetectorTier's TierOutput.features (one row per image), also written into its config.
EVIDENCE_FEATURES: tuple[str, ...] = (
    "max_score",  # 0: highest cone score in the image (0 when no detection)
    "second_score",  # 1: second highest cone score (0 when fewer than two)
    "count",  # 2: detections scoring >= count_threshold
    "score_mass",  # 3: sum of the scores of all kept detections (>= the detector's score_thresh)
    "area_share",  # 4: summed area of the counted boxes / image area, clipped to [0, 1]
    "top_cx",  # 5: centre x of the highest-scoring box / image width (0.5 when none)
    "top_cy",  # 6: centre y of the highest-scoring box / image height (0.5 when none)
    "top_h",  # 7: height of the highest-scoring box / image height (0 when none)
    "lower_share",  # 8: share of counted boxes centred in the lower half of the frame (0 when none)
)


@dataclass(frozen=True)
class EvidenceConfig:
    count_threshold: float = 0.5  # a detection at or above this score counts as a cone

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvidenceConfig":
        return cls(count_threshold=float(d.get("count_threshold", 0.5)))


def evidence_features(dets: Sequence[Detections], cfg: EvidenceConfig = EvidenceConfig()) -> np.ndarray:
    """(n, len(EVIDENCE_FEATURES)) float32 evidence; see EVIDENCE_FEATURES for the columns."""
    out = np.zeros((len(dets), len(EVIDENCE_FEATURES)), dtype=np.float32)
    for i, d in enumerate(dets):
        h, w = d.image_size
        if h <= 0 or w <= 0:
            raise ValueError("Detections.image_size must be set to compute evidence")
        s = np.sort(np.asarray(d.scores, dtype=np.float64))[::-1]
        row = out[i]
        row[5] = row[6] = 0.5
        if len(s) == 0:
            continue
        row[0] = s[0]
        row[1] = s[1] if len(s) > 1 else 0.0
        row[3] = s.sum()
        top = int(np.argmax(d.scores))
        b = np.asarray(d.boxes, dtype=np.float64)
        row[5] = (b[top, 0] + b[top, 2]) / 2 / w
        row[6] = (b[top, 1] + b[top, 3]) / 2 / h
        row[7] = (b[top, 3] - b[top, 1]) / h
        counted = np.asarray(d.scores) >= cfg.count_threshold
        row[2] = counted.sum()
        if counted.any():
            bc = b[counted]
            row[4] = min(1.0, box_area(bc).sum() / (h * w))
            row[8] = float((((bc[:, 1] + bc[:, 3]) / 2) > h / 2).mean())
    return out


def _design(x: np.ndarray, log_columns: Sequence[int]) -> np.ndarray:
    """Features as the logistic model sees them: counts and masses (``log_columns``) on a log scale."""
    z = np.asarray(x, dtype=np.float64).copy()
    for c in log_columns:
        z[:, c] = np.log1p(np.maximum(z[:, c], 0.0))
    return z


@dataclass
class LogisticScorer:
    """Roadwork logit = coef . ((design(features) - mean) / scale) + intercept, fitted by maximum
    likelihood (sklearn, L2 with strength 1/C) on val evidence; unfitted, the logit of column 0."""

    coef: tuple[float, ...] = ()
    intercept: float = 0.0
    mean: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    C: float = 1.0
    log_columns: tuple[int, ...] = (2, 3)  # EVIDENCE_FEATURES' count and score_mass

    def fit(self, features: np.ndarray, y: np.ndarray) -> "LogisticScorer":
        from sklearn.linear_model import LogisticRegression

        x = _design(features, self.log_columns)
        mu = x.mean(axis=0)
        sd = x.std(axis=0)
        sd[sd < 1e-6] = 1.0
        lr = LogisticRegression(C=self.C, max_iter=2000).fit((x - mu) / sd, np.asarray(y).astype(int))
        self.coef = tuple(float(v) for v in lr.coef_.ravel())
        self.intercept = float(lr.intercept_[0])
        self.mean, self.scale = tuple(float(v) for v in mu), tuple(float(v) for v in sd)
        return self

    def logit(self, features: np.ndarray) -> np.ndarray:
        if not self.coef:  # unfitted: the max score's logit
            p = np.clip(np.asarray(features, dtype=np.float64)[:, 0], 1e-4, 1 - 1e-4)
            return np.log(p) - np.log1p(-p)
        x = (_design(features, self.log_columns) - np.array(self.mean)) / np.array(self.scale)
        return x @ np.array(self.coef) + self.intercept

    def prob(self, features: np.ndarray) -> np.ndarray:
        z = self.logit(features)
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return {"kind": "logistic", "coef": list(self.coef), "intercept": self.intercept, "mean": list(self.mean),
                "scale": list(self.scale), "C": self.C,
                "log_columns": list(self.log_columns)}

    @classmethod
    def from_dict(cls, d: dict) -> "LogisticScorer":
        return cls(tuple(d.get("coef", ())), float(d.get("intercept", 0.0)), tuple(d.get("mean", ())),
                   tuple(d.get("scale", ())), float(d.get("C", 1.0)), tuple(int(c) for c in d.get("log_columns", (2, 3))))


@register_tier
class DetectorTier(Tier):
    """Cone detector as a cascade tier: evidence features + a calibrated roadwork score from them."""

    kind = "detector"

    def __init__(
        self,
        name: str,
        detector: ConeDetector,
        evidence: EvidenceConfig = EvidenceConfig(),
        scorer: LogisticScorer | None = None,
        gflops: float | None = None,
        device: torch.device | None = None,
        batch_size: int = 16,
        amp: bool = False,
        calibrator: TemperatureCalibrator | None = None,
    ):
        self.name, self.evidence, self.scorer = name, evidence, scorer or LogisticScorer()
        # a temperature on the scorer's logit, fitted where the tier joins a built cascade (on that build's val
        # views); a stand-alone detector bundle has none (its scorer is calibrated by construction)
        self.calibrator = calibrator
        self.batch_size, self.amp = int(batch_size), bool(amp)
        self.device = device or pick_device()
        self.detector = detector.to(self.device).eval()
        self.gflops = float(gflops if gflops is not None else detector.gflops())
        self.last_detections: list[Detections] = []  # detections of the last run (for traces and debugging)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return EVIDENCE_FEATURES

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        return self.detector.detect(images, batch_size=self.batch_size, amp=self.amp)

    def run(self, images: Sequence[np.ndarray]) -> TierOutput:
        t0 = time.perf_counter()
        dets = self.detect(images)
        feats = evidence_features(dets, self.evidence)
        z = self.scorer.logit(feats) if len(feats) else np.zeros(0)
        self.last_detections = dets
        return TierOutput(logits=z, prob=calibrated_or_sigmoid(self.calibrator, z), features=feats,
                          ms=(time.perf_counter() - t0) * 1e3)

    def full_logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """What ``build`` fits this tier's temperature on (as for the open-model tiers): its logit on every image."""
        return self.run(images).logits

    def to_config(self, bundle_dir: Path) -> dict:
        weights = f"{self.name}.safetensors"
        save_detector(self.detector, Path(bundle_dir) / weights)
        c = self.detector.cfg
        from ..models.zoo import get_spec

        spec = get_spec(c.backbone)
        return {
            "kind": self.kind,
            "name": self.name,
            "model": c.backbone,
            "weights": weights,
            "input_size": c.min_size,  # short side after the detector's own resize (aspect kept)
            "max_size": c.max_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "gflops": self.gflops,
            "detector": c.to_dict(),
            "evidence": self.evidence.to_dict(),
            "features": list(EVIDENCE_FEATURES),
            "feature_index": {n: i for i, n in enumerate(EVIDENCE_FEATURES)},
            "scorer": self.scorer.to_dict(),
            "batch_size": self.batch_size,
            "amp": self.amp,
            **({"calibration": self.calibrator.to_dict()} if self.calibrator is not None and self.calibrator.fitted else {}),
        }

    @classmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device: torch.device) -> "DetectorTier":
        from .model import DetectorConfig

        if list(cfg.get("features", EVIDENCE_FEATURES)) != list(EVIDENCE_FEATURES):
            raise ValueError(f"detector tier {cfg.get('name')!r}: feature layout {cfg.get('features')} differs from this "
                             f"version's {list(EVIDENCE_FEATURES)}")
        path = Path(bundle_dir) / cfg["weights"]
        det = load_detector(path, device="cpu", cfg=DetectorConfig.from_dict(cfg["detector"]) if "detector" in cfg else None)
        return cls(
            name=cfg["name"], detector=det, evidence=EvidenceConfig.from_dict(cfg.get("evidence", {})),
            scorer=LogisticScorer.from_dict(cfg.get("scorer", {})), gflops=cfg.get("gflops"), device=device,
            batch_size=cfg.get("batch_size", 16), amp=cfg.get("amp", False),
            calibrator=TemperatureCalibrator.from_dict(cfg["calibration"]) if "calibration" in cfg else None,
        )


@register_rule
class ConeVerifyRule(Rule):
    """Verification by cone evidence, at an exit after the detector tier.

    An image stops unless (a) its folded probability is within ``tau`` of 0.5, or (b) the classifier tier
    (index ``classifier``) and the cone evidence disagree: the classifier's calibrated probability is above
    ``classifier_threshold`` while the detector's ``max_score`` is below ``low`` ("roadwork" with no cone
    evidence), or it is at or below ``classifier_threshold`` while ``max_score`` is at least ``high``
    ("none" with strong cone evidence). Such images escalate to the next tier. ``detector`` is the index
    of the detector tier among the tiers run (-1: the last one).
    """

    kind = "cone_verify"

    def __init__(self, low: float = 0.2, high: float = 0.6, classifier: int = 0, detector: int = -1,
                 classifier_threshold: float = 0.5, tau: float = 0.0, feature: int = 0):
        self.low, self.high, self.tau = float(low), float(high), float(tau)
        self.classifier, self.detector, self.feature = int(classifier), int(detector), int(feature)
        self.classifier_threshold = float(classifier_threshold)

    def disagree_arrays(self, probs: np.ndarray, features: Sequence[np.ndarray | None]) -> np.ndarray:
        """Boolean (n,): classifier and cone evidence disagree. probs: (n, k+1) calibrated per-tier
        probabilities of the tiers that ran; features: per tier, (n, d) or None."""
        P = np.asarray(probs, dtype=np.float64)
        n = P.shape[0]
        feats = list(features)
        if not feats or P.ndim != 2 or P.shape[1] <= self.classifier:
            return np.zeros(n, dtype=bool)
        f = feats[self.detector]
        if f is None:
            return np.zeros(n, dtype=bool)
        cone = per_image(f, n)[:, self.feature]
        says = P[:, self.classifier] > self.classifier_threshold
        return (says & (cone < self.low)) | (~says & (cone >= self.high))

    def stop(self, folded: np.ndarray, logits: np.ndarray, probs: np.ndarray,
             features: Sequence[np.ndarray | None] = ()) -> np.ndarray:
        confident = np.abs(np.asarray(folded, dtype=np.float64) - 0.5) >= self.tau
        return confident & ~self.disagree_arrays(probs, features)

    def to_config(self) -> dict:
        return {"kind": self.kind, "low": self.low, "high": self.high, "classifier": self.classifier,
                "detector": self.detector, "classifier_threshold": self.classifier_threshold, "tau": self.tau,
                "feature": self.feature}

    @classmethod
    def from_config(cls, cfg: dict) -> "ConeVerifyRule":
        return cls(**{k: cfg[k] for k in ("low", "high", "classifier", "detector", "classifier_threshold", "tau", "feature") if k in cfg})
