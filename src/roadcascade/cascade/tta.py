"""Test-time scaling: a tier that runs a base classifier on up to N views of each image (flips,
crops, scales), chooses N per image from the uncertainty left, and weights the views with a learned
verifier.

How one batch goes (every round is one model call over the images still undecided, no per-image
loop around the model):

1. view 0 is the image itself. When the base tier already ran on the image earlier in the cascade,
   its logit is reused (no compute); otherwise it is computed.
2. views ``1 .. n_min - 1`` run on every image.
3. after ``r`` views, the verifier-weighted mean logit ``zbar`` is compared with the base's decision
   threshold ``z*``: images with ``|zbar - z*| >= margin`` stop; the others get view ``r`` next, up to
   ``n_max`` views.

The **verifier** is a logistic regression fitted on val that predicts whether one view's answer is
right from what that view shows: its own distance to the threshold, its distance to view 0, whether
it agrees with view 0, and which view it is. A view's weight is the log-odds of that probability
(clipped to [0.05, 6]: the weighted-majority weight), so the views most likely right count most.
The stopping ``margin`` is the smallest one whose adaptive decisions agree with the all-``n_max``
decisions on at least ``agreement`` of the val images; the output logit ``zbar`` gets its own
temperature and MCC-optimal threshold on val. The tier's features (for fusion and rules) are the
weighted spread of its views' logits and the share of views it used; its cost is per image
(``TierOutput.gflops``).

Views are named by ``+``-joined tokens: ``id`` (the image), ``hflip``, ``<anchor><percent>`` (crop
that share of each side at anchor ``c``, ``tl``, ``tr``, ``bl`` or ``br``), ``s<percent>`` (run at that
share of the base's input size, rounded to a multiple of 8; cost grows with the pixel count).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .calibration import TemperatureCalibrator, logit
from .runtime import ClassifierTier, Tier, TierCaps, TierOutput, register_tier
from .fusion import LogisticModel, fit_logistic, group_folds
from ..models.preprocess import to_batch

__all__ = [
    "View",
    "DEFAULT_VIEWS",
    "TTATier",
    "model_logits",
    "verifier_features",
    "view_weights",
    "weighted_mean",
    "should_stop",
    "adaptive_counts",
    "choose_margin",
]

DEFAULT_VIEWS: tuple[str, ...] = ("id", "hflip", "c85", "s115", "hflip+c85", "tl80", "br80", "hflip+s115")
_ANCHORS = ("c", "tl", "tr", "bl", "br")
_CROP = re.compile(r"^(c|tl|tr|bl|br)(\d{1,3})$")
_SCALE = re.compile(r"^s(\d{2,3})$")
W_MIN, W_MAX = 0.05, 6.0


@dataclass(frozen=True)
class View:
    """One deterministic view of an image: optional crop (share of each side at an anchor), optional
    horizontal flip, optional input scale relative to the base's input size."""

    flip: bool = False
    crop: float = 1.0
    anchor: str = "c"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0.2 <= self.crop <= 1.0:
            raise ValueError(f"crop share must be in [0.2, 1], got {self.crop}")
        if self.anchor not in _ANCHORS:
            raise ValueError(f"crop anchor must be one of {_ANCHORS}, got {self.anchor!r}")
        if not 0.25 <= self.scale <= 4.0:
            raise ValueError(f"scale must be in [0.25, 4], got {self.scale}")

    @classmethod
    def parse(cls, name: str) -> "View":
        flip, crop, anchor, scale = False, 1.0, "c", 1.0
        for tok in name.strip().split("+"):
            if tok in ("id", ""):
                continue
            if tok == "hflip":
                flip = True
            elif m := _CROP.match(tok):
                anchor, crop = m.group(1), int(m.group(2)) / 100
            elif m := _SCALE.match(tok):
                scale = int(m.group(1)) / 100
            else:
                raise ValueError(f"unknown view token {tok!r} in {name!r} (id, hflip, c85, tl80, ..., s115)")
        return cls(flip, crop, anchor, scale)

    @property
    def name(self) -> str:
        parts = []
        if self.flip:
            parts.append("hflip")
        if self.crop < 1.0:
            parts.append(f"{self.anchor}{round(self.crop * 100)}")
        if self.scale != 1.0:
            parts.append(f"s{round(self.scale * 100)}")
        return "+".join(parts) or "id"

    @property
    def is_identity(self) -> bool:
        return self.name == "id"

    def size(self, base_size: int) -> int:
        return base_size if self.scale == 1.0 else max(8, int(round(base_size * self.scale / 8)) * 8)

    def apply(self, img: np.ndarray) -> np.ndarray:
        """The cropped / flipped image (resizing to the input size happens in preprocessing)."""
        out = img
        if self.crop < 1.0:
            h, w = img.shape[:2]
            ch, cw = max(1, int(round(h * self.crop))), max(1, int(round(w * self.crop)))
            top = {"c": (h - ch) // 2, "tl": 0, "tr": 0, "bl": h - ch, "br": h - ch}[self.anchor]
            left = {"c": (w - cw) // 2, "tl": 0, "tr": w - cw, "bl": 0, "br": w - cw}[self.anchor]
            out = out[top : top + ch, left : left + cw]
        if self.flip:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)


@torch.inference_mode()
def model_logits(tier: ClassifierTier, images: Sequence[np.ndarray], size: int | None = None) -> np.ndarray:
    """A classifier tier's raw logits at any input size (the same code path as ``ClassifierTier.logits``)."""
    size = int(size or tier.input_size)
    out = []
    for i in range(0, len(images), tier.batch_size):
        x = to_batch(images[i : i + tier.batch_size], size, tier.mean, tier.std).to(tier.device)
        out.append(tier.model(x).float().reshape(-1).cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0, dtype=np.float64)


# ----------------------------------------------------------------------------- pure mathematics


def verifier_features(V: np.ndarray, z_thr: float) -> np.ndarray:
    """(n, m, 3 + m) features of every view j of every image (NaN logits give NaN rows):
    ``|v_j - z*|``, ``|v_j - v_0|``, ``[v_j and v_0 decide alike]``, one-hot of j."""
    V = np.asarray(V, dtype=np.float64)
    n, m = V.shape
    v0 = V[:, :1]
    agree = ((V > z_thr) == (v0 > z_thr)).astype(np.float64)
    agree[np.isnan(V)] = np.nan
    F = np.concatenate(
        [np.abs(V - z_thr)[..., None], np.abs(V - v0)[..., None], agree[..., None],
         np.broadcast_to(np.eye(m), (n, m, m))], axis=2)
    return F


def view_weights(verifier: LogisticModel, V: np.ndarray, z_thr: float) -> np.ndarray:
    """(n, m) weights: log-odds that each view is right, clipped to [0.05, 6]; 0 where not computed."""
    V = np.asarray(V, dtype=np.float64)
    F = verifier_features(V, z_thr)
    n, m, d = F.shape
    ok = ~np.isnan(V)
    W = np.zeros((n, m))
    if ok.any():
        p = verifier.predict_proba(F[ok])
        W[ok] = np.clip(logit(p), W_MIN, W_MAX)
    return W


def weighted_mean(V: np.ndarray, W: np.ndarray, counts: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and weighted std of the first ``counts`` views of every image."""
    V = np.asarray(V, dtype=np.float64)
    n, m = V.shape
    counts = np.broadcast_to(np.asarray(counts), (n,))
    use = np.arange(m)[None, :] < counts[:, None]
    Wu = np.where(use, W, 0.0)
    Vu = np.where(use, np.nan_to_num(V), 0.0)
    s = Wu.sum(axis=1)
    s = np.where(s > 0, s, 1.0)
    mean = (Wu * Vu).sum(axis=1) / s
    var = (Wu * (Vu - mean[:, None]) ** 2).sum(axis=1) / s
    return mean, np.sqrt(np.maximum(var, 0.0))


def should_stop(V: np.ndarray, W: np.ndarray, r: int, z_thr: float, margin: float) -> np.ndarray:
    """After ``r`` views: stop where the weighted mean is at least ``margin`` from the threshold."""
    zbar, _ = weighted_mean(V, W, r)
    return np.abs(zbar - z_thr) >= margin


def adaptive_counts(V: np.ndarray, W: np.ndarray, z_thr: float, n_min: int, n_max: int, margin: float) -> np.ndarray:
    """Views each image uses under the sequential rule (what the online tier computes round by round)."""
    n = len(V)
    counts = np.full(n, n_max, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    for r in range(n_min, n_max):
        stop = active & should_stop(V, W, r, z_thr, margin)
        counts[stop] = r
        active &= ~stop
        if not active.any():
            break
    return counts


def choose_margin(V: np.ndarray, W: np.ndarray, z_thr: float, n_min: int, n_max: int, agreement: float,
                  groups: np.ndarray | None = None) -> float:
    """Smallest stopping margin whose adaptive decisions agree with the all-views decisions on at least
    ``agreement`` of the images (in the worst case it is +inf: always all views)."""
    if n_min >= n_max:
        return float("inf")
    full, _ = weighted_mean(V, W, n_max)
    d_full = full > z_thr
    z_min, _ = weighted_mean(V, W, n_min)
    cands = np.unique(np.quantile(np.abs(z_min - z_thr), np.linspace(0.0, 1.0, 81)))
    for mgn in np.sort(cands):
        c = adaptive_counts(V, W, z_thr, n_min, n_max, float(mgn))
        z, _ = weighted_mean(V, W, c)
        if np.mean((z > z_thr) == d_full) >= agreement:
            return float(mgn)
    return float("inf")


def _base_threshold_logit(base: ClassifierTier) -> float:
    """The base's decision threshold in raw-logit units: sigmoid(z / T) > t  <=>  z > T * logit(t)."""
    c = base.calibrator
    return float(c.temperature_ * logit(np.float64(c.threshold_)))


# ----------------------------------------------------------------------------- the tier


@register_tier
class TTATier(Tier):
    """N views of a base classifier, N chosen per image, views weighted by a learned verifier."""

    kind = "tta"

    def __init__(self, base: ClassifierTier, views: Sequence[str] = DEFAULT_VIEWS, n_min: int = 4, n_max: int = 8,
                 name: str | None = None, reuse: bool = True, agreement: float = 0.99, l2: float = 1.0):
        self.base = base
        self.views = [View.parse(v) if isinstance(v, str) else v for v in views]
        if not 1 <= n_min <= n_max <= len(self.views):
            raise ValueError(f"need 1 <= n_min <= n_max <= {len(self.views)} views, got n={n_min}..{n_max}")
        if not self.views[0].is_identity:
            raise ValueError("view 0 must be the identity view 'id' (it is shared with the base tier)")
        self.n_min, self.n_max = int(n_min), int(n_max)
        self.views = self.views[: self.n_max]
        self.reuse, self.agreement, self.l2 = bool(reuse), float(agreement), float(l2)
        self.name = name or f"tta({base.name},n={n_min}..{n_max})"
        self.sizes = [v.size(base.input_size) for v in self.views]
        self.view_gflops = np.array([base.gflops * (s / base.input_size) ** 2 for s in self.sizes])
        self.gflops = float(self.view_gflops.sum())  # replaced by the mean adaptive cost once fitted
        self.device = base.device

    def decode_size(self) -> int:
        """Enough pixels that every view's crop still holds its input size (no view upsamples)."""
        return max(math.ceil(s / v.crop) for s, v in zip(self.sizes, self.views))

    # -- fitting (val) -------------------------------------------------------------------------

    @property
    def z_thr(self) -> float:
        return _base_threshold_logit(self.base)

    def view_logits(self, images: Sequence[np.ndarray], identity: np.ndarray | None = None) -> np.ndarray:
        """All ``n_max`` views' logits (n, n_max), for fitting and caching; ``identity``: view 0 if known."""
        n = len(images)
        V = np.full((n, self.n_max), np.nan)
        if identity is not None:
            V[:, 0] = identity
        todo = [j for j in range(self.n_max) if not (j == 0 and identity is not None)]
        self._fill(V, images, np.arange(n), todo)
        return V

    def _fill(self, V: np.ndarray, images: Sequence[np.ndarray], rows: np.ndarray, cols: Sequence[int]) -> None:
        """Compute views ``cols`` of images ``rows`` into V: one model call per distinct input size."""
        by_size: dict[int, list[int]] = {}
        for j in cols:
            by_size.setdefault(self.sizes[j], []).append(j)
        for size, js in by_size.items():
            batch = [self.views[j].apply(images[i]) for j in js for i in rows]
            z = model_logits(self.base, batch, size).reshape(len(js), len(rows))
            for a, j in enumerate(js):
                V[rows, j] = z[a]

    def fit(self, V: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, folds: int = 5,
            seed: int = 0) -> "TTATier":
        """Fit the verifier, the stopping margin and the output calibration on val view logits V (n, n_max).

        The margin and the calibration are fitted on out-of-fold verifier weights (views of one image in
        one fold); the deployed verifier is then refitted on all rows. ``oof_`` holds the out-of-fold
        outputs (what the policy optimiser should see)."""
        V = np.asarray(V, dtype=np.float64)
        y = np.asarray(y).astype(np.int64)
        if V.shape[1] != self.n_max or np.isnan(V).any():
            raise ValueError(f"fit needs every view computed: V of shape (n, {self.n_max}) without NaN")
        z_thr = self.z_thr
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        W = np.zeros_like(V)
        parts = group_folds(groups, folds, seed) if folds >= 2 else []
        if len(parts) >= 2:
            for test in parts:
                train = np.setdiff1d(np.arange(len(y)), test, assume_unique=True)
                ver = self._fit_verifier(V[train], y[train], z_thr)
                W[test] = view_weights(ver, V[test], z_thr)
        else:
            W = view_weights(self._fit_verifier(V, y, z_thr), V, z_thr)
        self.margin_ = choose_margin(V, W, z_thr, self.n_min, self.n_max, self.agreement)
        counts = adaptive_counts(V, W, z_thr, self.n_min, self.n_max, self.margin_)
        zbar, _ = weighted_mean(V, W, counts)
        self.calibrator_ = TemperatureCalibrator().fit(zbar, y)
        self.verifier_ = self._fit_verifier(V, y, z_thr)
        self.oof_ = self._outputs(V, W, counts, reused=np.zeros(len(y), dtype=bool))
        self.gflops = float(np.mean(self._cost(counts, np.zeros(len(y), dtype=bool))))
        return self

    def _fit_verifier(self, V: np.ndarray, y: np.ndarray, z_thr: float) -> LogisticModel:
        F = verifier_features(V, z_thr)
        correct = ((V > z_thr) == (y[:, None] == 1)).astype(np.float64)
        d = F.shape[2]
        return fit_logistic(F.reshape(-1, d), correct.reshape(-1), l2=self.l2)

    def _check(self) -> None:
        if not hasattr(self, "verifier_"):
            raise RuntimeError(f"{self.name} is not fitted: call fit(view_logits, y) on val first")

    @property
    def calibrator(self) -> TemperatureCalibrator:
        self._check()
        return self.calibrator_

    # -- outputs ---------------------------------------------------------------------------------

    def _cost(self, counts: np.ndarray, reused: np.ndarray) -> np.ndarray:
        cum = np.concatenate([[0.0], np.cumsum(self.view_gflops)])
        return cum[counts] - np.where(reused, self.view_gflops[0], 0.0)

    def _outputs(self, V: np.ndarray, W: np.ndarray, counts: np.ndarray, reused: np.ndarray, ms: float = 0.0) -> TierOutput:
        zbar, spread = weighted_mean(V, W, counts)
        feats = np.column_stack([spread, counts / self.n_max])
        return TierOutput(logits=zbar, prob=self.calibrator_.calibrated(zbar), features=feats, ms=ms,
                          gflops=self._cost(counts, reused))

    def simulate(self, V: np.ndarray, reused: np.ndarray | None = None) -> TierOutput:
        """The tier's output from a full view-logit matrix (what ``run`` computes, without the compute)."""
        self._check()
        V = np.asarray(V, dtype=np.float64)
        W = view_weights(self.verifier_, V, self.z_thr)
        counts = adaptive_counts(V, W, self.z_thr, self.n_min, self.n_max, self.margin_)
        reused = np.zeros(len(V), dtype=bool) if reused is None else np.asarray(reused, dtype=bool)
        return self._outputs(V, W, counts, reused)

    def run(self, images: Sequence[np.ndarray], identity: np.ndarray | None = None) -> TierOutput:
        """Adaptive test-time scaling on a batch; ``identity``: known view-0 logits (NaN where unknown)."""
        self._check()
        t0 = time.perf_counter()
        n = len(images)
        z_thr = self.z_thr
        V = np.full((n, self.n_max), np.nan)
        reused = np.zeros(n, dtype=bool)
        if identity is not None:
            identity = np.asarray(identity, dtype=np.float64)
            reused = ~np.isnan(identity)
            V[reused, 0] = identity[reused]
        if (~reused).any():
            self._fill(V, images, np.flatnonzero(~reused), [0])
        if self.n_min > 1:
            self._fill(V, images, np.arange(n), list(range(1, self.n_min)))
        counts = np.full(n, self.n_max, dtype=np.int64)
        active = np.ones(n, dtype=bool)
        for r in range(self.n_min, self.n_max):
            W = view_weights(self.verifier_, V, z_thr)  # views not computed yet weigh 0
            stop = active & should_stop(V, W, r, z_thr, self.margin_)
            counts[stop] = r
            active &= ~stop
            if not active.any():
                break
            self._fill(V, images, np.flatnonzero(active), [r])
        W = view_weights(self.verifier_, V, z_thr)
        return self._outputs(V, W, counts, reused, ms=(time.perf_counter() - t0) * 1e3)

    def run_after(self, images: Sequence[np.ndarray], names: Sequence[str], logits: np.ndarray) -> TierOutput:
        """The cascade's entry point: reuses the base tier's logit where it already ran on the image."""
        ident = np.full(len(images), np.nan)
        if self.reuse and self.base.name in names:
            ident = np.asarray(logits, dtype=np.float64).reshape(len(images), -1)[:, list(names).index(self.base.name)]
        return self.run(images, identity=ident)

    def caps(self) -> TierCaps:
        return TierCaps(gflops=float(self.gflops), decode_size=self.decode_size(), reads_earlier=self.reuse)

    # -- bundle ----------------------------------------------------------------------------------

    def to_config(self, bundle_dir: Path) -> dict:
        self._check()
        return {
            "kind": self.kind,
            "name": self.name,
            "base": self.base.to_config(bundle_dir),
            "views": [v.name for v in self.views],
            "n_min": self.n_min,
            "n_max": self.n_max,
            "reuse": self.reuse,
            "agreement": self.agreement,
            "l2": self.l2,
            "gflops": self.gflops,
            "margin": self.margin_ if np.isfinite(self.margin_) else None,
            "verifier": self.verifier_.to_dict(),
            "calibration": self.calibrator_.to_dict(),
        }

    @classmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device: torch.device) -> "TTATier":
        base = ClassifierTier.from_config(cfg["base"], bundle_dir, device)
        t = cls(base, cfg["views"], cfg["n_min"], cfg["n_max"], name=cfg["name"], reuse=cfg.get("reuse", True),
                agreement=cfg.get("agreement", 0.99), l2=cfg.get("l2", 1.0))
        t.margin_ = float("inf") if cfg.get("margin") is None else float(cfg["margin"])
        t.verifier_ = LogisticModel.from_dict(cfg["verifier"])
        t.calibrator_ = TemperatureCalibrator.from_dict(cfg["calibration"])
        t.gflops = float(cfg.get("gflops", t.gflops))
        return t
