"""The cascade: tiers, deferral rules, fusion and the batched runtime.

A tier takes a batch of decoded images and returns a logit, a calibrated probability and optional
features per image, plus its cost; what else it can do (take a resized uint8 tensor, read earlier
tiers' outputs, the decode size it needs) it says in :class:`TierCaps`, so the GPU path and the server
never ask for its type. After tier ``k`` runs, exit point ``k`` makes its decision
(:func:`roadcascade.cascade.decision.decide`: fuse tiers ``0..k``, fold the threshold to 0.5, ask the rule who
stops). Tier ``k + 1`` then runs once, as one batch, on the images still undecided. A stage-1 bundle is
a cascade of one tier. Rules and fusions, with their registries, live in :mod:`roadcascade.cascade.rules` and
:mod:`roadcascade.cascade.fusion` (re-exported here).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .calibration import TemperatureCalibrator
from .decision import FULL_FRAME_TOLERANCE, ExitPoint, decide, is_full_frame, stack_features
from .fusion import FUSIONS, Fusion, LastTierFusion, register_fusion
from ..models.preprocess import pick_device, to_batch
from .registry import build as _build, registry
from .rules import RULES, ConfidenceRule, FinalRule, Rule, register_rule

__all__ = [
    "TierOutput", "Trace", "Prediction", "ImageState", "TierCaps", "Tier", "ClassifierTier", "ExitPoint", "Cascade",
    "TIERS", "register_tier", "square_views", "state_arrays", "run_tier",
    # the rule and fusion interfaces, re-exported (they live in rules.py / fusion.py)
    "Rule", "FinalRule", "ConfidenceRule", "RULES", "register_rule", "Fusion", "LastTierFusion", "FUSIONS",
    "register_fusion",
]

# ----------------------------------------------------------------------------- messages


@dataclass
class TierOutput:
    """One tier's answer on a batch of n images."""

    logits: np.ndarray  # (n,) raw roadwork logit
    prob: np.ndarray  # (n,) calibrated P(roadwork) of this tier alone (not folded)
    features: np.ndarray | None = None  # (n, d) extra evidence for fusion and rules
    ms: float = 0.0  # wall time of the batch
    gflops: np.ndarray | None = None  # (n,) per-image cost when it varies (test-time scaling); None: tier.gflops

    def __len__(self) -> int:
        return len(self.logits)


@dataclass
class Trace:
    tiers: list[str] = field(default_factory=list)  # tiers run, in order
    probs: dict[str, float] = field(default_factory=dict)  # each tier's calibrated probability
    rule: str = ""  # the rule that decided ("final", "confidence", "deadline", ...)
    exit: int = -1  # exit point index
    ms: dict[str, float] = field(default_factory=dict)  # per tier: the wall time of the batch it ran in
    anytime: bool = False  # answered early (deadline) from the tiers that had run
    gflops: dict[str, float] = field(default_factory=dict)  # per tier: GFLOPs spent on this image

    def as_dict(self) -> dict:
        return {
            "tiers": list(self.tiers),
            "probs": dict(self.probs),
            "rule": self.rule,
            "exit": self.exit,
            "ms": dict(self.ms),
            "anytime": self.anytime,
            "gflops": dict(self.gflops),
        }

    def add(self, name: str, prob: float, ms: float, gflops: float) -> None:
        """Record one tier that ran on this image."""
        self.tiers.append(name)
        self.probs[name] = float(prob)
        self.ms[name] = float(ms)
        self.gflops[name] = float(gflops)


@dataclass
class Prediction:
    probability: float  # calibrated and folded: decide with > 0.5, as validators do
    label: int
    trace: Trace
    calibrated: float = float("nan")  # calibrated probability before the threshold fold

    def as_dict(self) -> dict:
        return {"probability": self.probability, "label": self.label, "trace": self.trace.as_dict()}


@dataclass
class ImageState:
    """One image on its way through the cascade (what crosses a stage queue)."""

    image: np.ndarray
    logits: list[float] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    features: list[np.ndarray | None] = field(default_factory=list)
    trace: Trace = field(default_factory=Trace)
    done: bool = False
    probability: float = float("nan")  # folded probability at the last exit reached
    calibrated: float = float("nan")  # the same before the fold (for calibration metrics)
    error: Exception | None = None  # a BadImage found inside a batch (the GPU path decodes there): a 4xx answer

    @property
    def stage(self) -> int:
        """Index of the next tier to run."""
        return len(self.logits)


def state_arrays(states: Sequence[ImageState]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
    """(logits (n, k+1), probs (n, k+1), per-tier features (n, d) or None) of states at one stage."""
    n = len(states)
    k1 = len(states[0].logits) if n else 0
    logits = np.array([s.logits for s in states], dtype=np.float64).reshape(n, k1)
    probs = np.array([s.probs for s in states], dtype=np.float64).reshape(n, k1)
    return logits, probs, stack_features([[s.features[t] for s in states] for t in range(k1)])


TIERS, register_tier = registry()


# ----------------------------------------------------------------------------- tiers


@dataclass(frozen=True)
class TierCaps:
    """What a tier can do: the GPU path and the server ask this, never the tier's type."""

    gflops: float  # mean cost per image
    tensor_input: int | None = None  # S: the tier is ``model(uint8 (n, 3, S, S) resized PIL-exact) -> logit`` plus
    #   its calibrator (``model``, ``mean``, ``std``, ``calibrator``), so the GPU path may run it as a compiled
    #   engine on device-resized pixels; None: it runs its own ``run`` on decoded HxWx3 uint8 arrays (unless it has
    #   square views, below)
    decode_size: int | None = None  # the short side a reduced-size decode must keep (None: the full image)
    square_input: int | None = None  # S, for a tier with square views: an image that is not a full frame is one view,
    #   the tier is then ``model(resized to S)`` as for ``tensor_input`` and may run as the engine for those rows
    square_views: tuple[int, int] | None = None  # (k, V) with ``square_input``: a full frame is the max of the logits
    #   of ``model`` on its k squares (``square_offsets``) resized to V; it costs k * (V / S)^2 x ``gflops``
    reads_earlier: bool = False  # its output depends on earlier tiers' logits (``run_after``)


class Tier(ABC):
    kind: ClassVar[str]
    name: str
    gflops: float

    @abstractmethod
    def run(self, images: Sequence[np.ndarray]) -> TierOutput: ...

    def run_after(self, images: Sequence[np.ndarray], names: Sequence[str], logits: np.ndarray) -> TierOutput:
        """``run`` when tiers ``names`` already ran on these images with raw ``logits`` (n, len(names)): a tier
        may reuse what they found (test-time scaling reuses its base tier's logit). Default: ``run``."""
        return self.run(images)

    def caps(self) -> TierCaps:
        """What this tier can do (see :class:`TierCaps`); the default is the generic tier."""
        return TierCaps(gflops=float(self.gflops), decode_size=self.decode_size())

    @abstractmethod
    def to_config(self, bundle_dir: Path) -> dict:
        """Describe the tier for bundle.json, writing its weights into bundle_dir."""

    def decode_size(self) -> int | None:
        """The short side (pixels) this tier needs of a decoded image: a reduced-size decode that keeps at least
        this many never makes the tier upsample. None: the full decoded image (the safe default)."""
        return None

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device: torch.device) -> "Tier": ...


SQUARE_TOLERANCE = FULL_FRAME_TOLERANCE  # images closer to square than this aspect ratio are seen whole


def square_offsets(h: int, w: int, k: int) -> np.ndarray:
    """Where the ``k`` squares of side min(h, w) of an h x w full frame start along its long side (evenly spread,
    the first and last at its two ends): the one geometry of square views, on the CPU and on the GPU path."""
    return np.linspace(0, max(h, w) - min(h, w), k).round().astype(int)


def square_views(images: Sequence[np.ndarray], k: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Each image as ``k`` squares of side min(h, w) spread evenly along its long side (an image within
    ``SQUARE_TOLERANCE`` of square stays one view), and the index of the image each view belongs to."""
    views: list[np.ndarray] = []
    owner: list[int] = []
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        s = min(h, w)
        if not is_full_frame(h, w):
            views.append(im)
            owner.append(i)
            continue
        for off in square_offsets(h, w, k):
            views.append(im[off : off + s] if h > w else im[:, off : off + s])
            owner.append(i)
    return views, np.asarray(owner, dtype=np.int64)


@register_tier
class ClassifierTier(Tier):
    """Any zoo model at any input size, returning one roadwork logit, temperature-calibrated."""

    kind = "classifier"

    def __init__(
        self,
        name: str,
        model_name: str,
        model: torch.nn.Module,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        calibrator: TemperatureCalibrator,
        gflops: float,
        device: torch.device | None = None,
        batch_size: int = 64,
        squares: int = 1,
        view_scale: float = 1.0,
    ):
        if not 1 <= int(squares) <= 8:
            raise ValueError(f"squares must be in [1, 8], got {squares}")
        if not 0.25 <= float(view_scale) <= 4.0:
            raise ValueError(f"view_scale must be in [0.25, 4], got {view_scale}")
        self.squares, self.view_scale = int(squares), float(view_scale)
        self.name, self.model_name, self.input_size = name, model_name, int(input_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.calibrator, self.gflops, self.batch_size = calibrator, float(gflops), batch_size
        self.device = device or pick_device()
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)

    def logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """One logit per image. With ``squares`` k > 1 a non-square image is seen as k aspect-preserving
        squares along its long side (no stretching: a portrait phone frame squeezed to a square makes every
        object wider than anything in training) and the largest logit counts; square images are unchanged."""
        return self._pooled(images)[0]

    @property
    def view_size(self) -> int:
        """Input size of the square views of a non-square frame: ``view_scale`` x the input size (a multiple of
        32). A full frame's objects are smaller than in the crops the model learnt on; a closer look finds them."""
        return self.input_size if self.view_scale == 1.0 else max(32, 32 * round(self.input_size * self.view_scale / 32))

    def _pooled(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and, with square views, each image's cost in model runs at the input size."""
        if self.squares == 1:
            return self._logits(images), None
        views, owner = square_views(images, self.squares)
        counts = np.bincount(owner, minlength=len(images))
        split = counts[owner] > 1  # views of a non-square frame (a square image is its own single view)
        if self.view_size == self.input_size:  # one size: one pass, batched as the views come
            z = self._logits(views)
        else:
            z = np.zeros(len(views), dtype=np.float32)
            for mask, size in ((~split, self.input_size), (split, self.view_size)):
                if mask.any():
                    z[mask] = self._logits([v for v, m in zip(views, mask) if m], size)
        out = np.full(len(images), -np.inf, dtype=z.dtype)
        np.maximum.at(out, owner, z)
        cost = np.where(counts > 1, counts * (self.view_size / self.input_size) ** 2, counts)
        return out, cost

    @torch.inference_mode()
    def _logits(self, images: Sequence[np.ndarray], size: int | None = None) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = to_batch(images[i : i + self.batch_size], size or self.input_size, self.mean, self.std).to(self.device)
            out.append(self.model(x).float().reshape(-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def decode_size(self) -> int:
        return max(self.input_size, self.view_size if self.squares > 1 else 0)  # the largest view it makes

    def caps(self) -> TierCaps:
        # square views pool over several crops of one image: not one resized tensor, but single views at the input
        # size (square_input) and a full frame's k squares at the view size (square_views)
        sq = self.squares > 1
        return TierCaps(gflops=self.gflops, tensor_input=None if sq else self.input_size, decode_size=self.decode_size(),
                        square_input=self.input_size if sq else None,
                        square_views=(self.squares, self.view_size) if sq else None)

    def run(self, images: Sequence[np.ndarray]) -> TierOutput:
        t0 = time.perf_counter()
        z, n_views = self._pooled(images)
        z = z.astype(np.float64)
        return TierOutput(logits=z, prob=self.calibrator.calibrated(z), ms=(time.perf_counter() - t0) * 1e3,
                          gflops=None if n_views is None else self.gflops * n_views)

    def to_config(self, bundle_dir: Path) -> dict:
        from safetensors.torch import save_file

        weights = f"{self.name}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(Path(bundle_dir) / weights), metadata={"model": self.model_name})
        return {
            "kind": self.kind,
            "name": self.name,
            "model": self.model_name,
            "weights": weights,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "gflops": self.gflops,
            "calibration": self.calibrator.to_dict(),
            **({"squares": self.squares} if self.squares > 1 else {}),
            **({"view_scale": self.view_scale} if self.view_scale != 1.0 else {}),
        }

    @classmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device: torch.device) -> "ClassifierTier":
        from safetensors.torch import load_file

        from ..models.zoo import create_model

        model = create_model(cfg["model"], num_classes=1, pretrained=False)
        path = Path(bundle_dir) / cfg["weights"]
        if not path.exists():
            raise FileNotFoundError(f"bundle weights missing: {path}")
        model.load_state_dict(load_file(str(path)), strict=True)
        return cls(
            name=cfg["name"],
            model_name=cfg["model"],
            model=model,
            input_size=cfg["input_size"],
            mean=cfg["mean"],
            std=cfg["std"],
            calibrator=TemperatureCalibrator.from_dict(cfg["calibration"]),
            gflops=cfg.get("gflops", 0.0),
            squares=cfg.get("squares", 1),
            view_scale=cfg.get("view_scale", 1.0),
            device=device,
        )


def run_tier(tier: Tier, images: Sequence[np.ndarray], names: Sequence[str], logits: np.ndarray) -> TierOutput:
    """Run a tier on images that tiers ``names`` already saw (raw ``logits`` (n, len(names))): through
    ``run_after`` when the tier reads earlier outputs (test-time scaling reuses its base tier's logit)."""
    if len(names) and tier.caps().reads_earlier:
        return tier.run_after(images, names, logits)
    return tier.run(images)


# ----------------------------------------------------------------------------- runtime


class Cascade:
    """Tiers and their exit points, with a batched runtime.

    ``run_stage(k, states)`` is the unit the server's multi-stage batcher schedules; ``predict`` is the
    offline loop over stages. Both give exactly the same answers.
    """

    def __init__(self, tiers: Sequence[Tier], exits: Sequence[ExitPoint]):
        if len(tiers) == 0 or len(tiers) != len(exits):
            raise ValueError(f"a cascade needs one exit point per tier (got {len(tiers)} tiers, {len(exits)} exits)")
        self.tiers, self.exits = list(tiers), list(exits)

    @property
    def n_stages(self) -> int:
        return len(self.tiers)

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def run_stage(self, k: int, states: Sequence[ImageState]) -> None:
        """Run tier k once on all given states (as one batch), then apply exit point k (:func:`decide`)."""
        if not states:
            return
        if any(s.stage != k or s.done for s in states):
            raise ValueError(f"run_stage({k}) got states that are done or at another stage")
        tier = self.tiers[k]
        earlier = np.array([s.logits for s in states], dtype=np.float64).reshape(len(states), k)
        out = run_tier(tier, [s.image for s in states], self.tier_names[:k], earlier)
        for i, s in enumerate(states):
            s.logits.append(float(out.logits[i]))
            s.probs.append(float(out.prob[i]))
            s.features.append(None if out.features is None else out.features[i])
            s.trace.add(tier.name, out.prob[i], out.ms, tier.gflops if out.gflops is None else out.gflops[i])
        full = (np.array([s.image is not None and is_full_frame(*s.image.shape[:2]) for s in states], dtype=bool)
                if self.exits[k].full_threshold is not None else None)
        d = decide(self.exits[k], *state_arrays(states), last=k == self.n_stages - 1, full=full)
        for s, p, c, st in zip(states, d.probability, d.calibrated, d.stop):
            s.probability, s.calibrated = float(p), float(c)
            if st:
                s.done, s.trace.exit, s.trace.rule = True, k, d.rule

    def answer(self, state: ImageState) -> Prediction:
        """The answer for a state: final if done, else the anytime answer from the tiers that ran."""
        if state.stage == 0:
            raise ValueError("no tier has run on this image yet: no answer to give")
        if not state.done:
            state.trace.anytime, state.trace.rule, state.trace.exit = True, "deadline", state.stage - 1
        p = float(np.clip(state.probability, 0.0, 1.0))
        return Prediction(probability=p, label=int(p > 0.5), trace=state.trace, calibrated=state.calibrated)

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Batched reference loop: tier k runs once on every image still undecided."""
        states = [ImageState(image=im) for im in images]
        for k in range(self.n_stages):
            self.run_stage(k, [s for s in states if not s.done])
        return [self.answer(s) for s in states]

    def predict_proba(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.array([p.probability for p in self.predict(images)], dtype=np.float64)

    def decode_size(self) -> int | None:
        """The short side a decode must keep for every tier an image may reach (the largest of the tiers'
        :meth:`Tier.decode_size`; for a stage-1 bundle the first tier's input size), or None when some tier
        needs the full image. Passed as ``min_size`` to the decoders of :mod:`roadcascade.io.images`."""
        sizes = [t.decode_size() for t in self.tiers]
        return None if any(s is None for s in sizes) else max(sizes)  # type: ignore[type-var]

    def mean_gflops(self, exit_rates: Sequence[float]) -> float:
        """Mean GFLOPs per image given the fraction of images exiting at each exit point."""
        reach = 1.0
        total = 0.0
        for k, t in enumerate(self.tiers):
            total += reach * t.gflops
            reach -= exit_rates[k] if k < len(exit_rates) else 0.0
        return total

    def to_config(self, bundle_dir: Path) -> dict[str, Any]:
        return {
            "tiers": [t.to_config(bundle_dir) for t in self.tiers],
            "exits": [e.to_config() for e in self.exits],
        }

    @classmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device: torch.device | None = None) -> "Cascade":
        device = device or pick_device()
        tiers = [_build(TIERS, "tier", t, bundle_dir=bundle_dir, device=device) for t in cfg["tiers"]]
        exits = [ExitPoint.from_config(e) for e in cfg["exits"]]
        return cls(tiers, exits)
