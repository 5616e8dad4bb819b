"""Open-set guard: decision thresholds that know which kind of frame the fit never saw a positive of.

A bundle's thresholds are fitted for MCC on ``val``, whose positives are web photos of roadwork. Val has
real dashcam frames (``camvid``, ``gtsdb``) but, bar two, only as negatives, so the fitted thresholds say
nothing about a dashcam frame with roadwork in it: they sit where web-photo positives part from negatives,
and dashcam roadwork (small, dark, far) scores below them. The first tier then stops such frames as
confident negatives (docs/DASHCAM.md: 73 % of night-dev frames stopped at tier 0).

For the one class of dashcam frames that val does hold, the negatives, the most recall a threshold can buy
at a false-positive rate ``fpr`` is the Neyman-Pearson threshold: the value that a share ``fpr`` of those
negatives exceed. The guard computes it at every exit point of a cascade (every tier run on every
reference negative, the exit's own fusion) and sets it as the exit's threshold **for full frames** (images
that are not square: photos as taken) where it is lower than the fitted one; square images, the crops of
the validator's v2.0.4 and letterbox views on which the thresholds were fitted, keep the fitted threshold.
A lower threshold also moves the fold, so full frames near it are no longer "confident" and go on to the
next tier. Nothing here sees a dashcam positive: night-dev stays a held-out measure.

    roadcascade guard --bundle B [--fpr 0.01]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..cascade.runtime import Cascade, ImageState
from ..metrics import DASHCAM_NEGATIVE_SOURCES


Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class GuardConfig:
    fpr: float = 0.01  # share of the reference negatives allowed above each exit's threshold
    sources: tuple[str, ...] = DASHCAM_NEGATIVE_SOURCES
    split: str = "val"
    data: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fpr < 1.0:
            raise ValueError(f"fpr must be in [0, 1), got {self.fpr}")


@dataclass(frozen=True)
class GuardReport:
    fpr: float
    n_negatives: int
    sources: tuple[str, ...]
    split: str
    fitted: tuple[float, ...]  # each exit's threshold (kept for square images)
    guard: tuple[float, ...]  # the Neyman-Pearson threshold at each exit
    thresholds: tuple[float, ...]  # what the bundle now uses for full frames: min(fitted, guard)
    fpr_before: tuple[float, ...]  # share of the reference negatives above each exit's threshold, before
    fpr_after: tuple[float, ...]

    def as_dict(self) -> dict:
        return asdict(self)


#: how far above the (m+1)-th largest reference score the threshold is put (at most half-way to the m-th): on the
#: score itself that frame sits at p = 0.5 exactly, and a runtime that differs by 1e-6 (the fp32 ONNX export) flips it
GUARD_MARGIN = 1e-4


def np_threshold(scores: np.ndarray, fpr: float, margin: float = GUARD_MARGIN) -> float:
    """A threshold ``t`` with ``mean(scores > t) <= fpr`` that flags the same reference scores as the smallest such
    threshold, the (m+1)-th largest score s[m] (m = floor(fpr * n)), but lies ``margin`` above it (at most half-way
    to the m-th largest), so no reference frame is decided by rounding. Ties are kept on the safe side (no more than
    m above)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("no reference negatives")
    m = min(int(math.floor(fpr * s.size + 1e-9)), s.size - 1)
    room = (s[m - 1] - s[m]) / 2 if m > 0 else margin
    t = s[m] + min(margin, room)
    return float(t if m == 0 or t < s[m - 1] else s[m])  # two scores one float apart: no room between them


def exit_probabilities(cascade: Cascade, images: Sequence[np.ndarray], batch: int = 64) -> np.ndarray:
    """(n, K) calibrated fused probability (before the fold) of every image at every exit point, every tier
    run on every image through the cascade's own stage runtime (no image stops early)."""
    out = np.zeros((len(images), cascade.n_stages))
    for i in range(0, len(images), batch):
        states = [ImageState(image=im) for im in images[i : i + batch]]
        for k in range(cascade.n_stages):
            for s in states:
                s.done = False  # every image goes on: the guard looks at each exit on all of them
            cascade.run_stage(k, states)
            out[i : i + len(states), k] = [s.calibrated for s in states]
    return out


def guard_exits(cascade: Cascade, probs: np.ndarray, fpr: float, sources: Sequence[str] = DASHCAM_NEGATIVE_SOURCES,
                split: str = "val") -> GuardReport:
    """Set each exit's full-frame threshold to the Neyman-Pearson threshold of ``probs`` (n, K), the reference
    negatives' fused probabilities, where that is lower than the fitted threshold (else to the fitted one).
    Changes ``cascade`` in place."""
    if probs.ndim != 2 or probs.shape[1] != cascade.n_stages:
        raise ValueError(f"probs must be (n, {cascade.n_stages}), got {probs.shape}")
    fitted = tuple(float(e.threshold) for e in cascade.exits)
    guard = tuple(np_threshold(probs[:, k], fpr) for k in range(cascade.n_stages))
    new = tuple(min(f, g) for f, g in zip(fitted, guard))
    for e, t in zip(cascade.exits, new):
        e.full_threshold = t
    return GuardReport(
        fpr=fpr, n_negatives=int(probs.shape[0]), sources=tuple(sources), split=split, fitted=fitted, guard=guard,
        thresholds=new, fpr_before=tuple(float(np.mean(probs[:, k] > t)) for k, t in enumerate(fitted)),
        fpr_after=tuple(float(np.mean(probs[:, k] > t)) for k, t in enumerate(new)))


def reference_negatives(cfg: GuardConfig, min_size: int | None = None) -> list[np.ndarray]:
    """The clean reference negatives (label 0 of ``cfg.sources`` in ``cfg.split``), decoded as the runtime
    decodes them."""
    from ..io.data import open_dataset
    from ..io.images import decode_bytes

    ds = open_dataset(cfg.data, cfg.split)
    samples = [s for s in ds.samples if s.label == 0 and s.source in cfg.sources]
    if not samples:
        raise ValueError(f"no label-0 images of {cfg.sources} in {ds.name} {cfg.split}")
    return [decode_bytes(s.data if s.data is not None else s.path.read_bytes(), min_size=min_size) for s in samples]


def guard_bundle(path, cfg: GuardConfig = GuardConfig(), device: str = "auto", log: Callable[[str], None] = print,
                 refit: bool = False) -> GuardReport:
    """Guard a saved bundle in place: thresholds lowered, the report kept in ``bundle.json`` under ``guard``.
    A bundle guarded before is guarded again from its fitted thresholds (the guard does not compound); with the
    same settings it is left as it is unless ``refit`` (its models changed, e.g. an INT8 export of it)."""
    from ..cascade.bundle import Bundle
    from ..models.preprocess import pick_device

    b = Bundle.load(path, device=pick_device(device))
    before = b.meta.get("guard")
    if not refit and before and _same(before, cfg) and [e.full_threshold for e in b.cascade.exits] == list(before["thresholds"]):
        log(f"{path} already guarded (fpr {cfg.fpr})")  # not rewritten: a cached cascade built from it stays fresh
        return GuardReport(**{k: tuple(v) if isinstance(v, list) else v for k, v in before.items()})
    for e in b.cascade.exits:  # the reference negatives are full frames: read them with the fitted thresholds
        e.full_threshold = None
    images = reference_negatives(cfg, min_size=b.cascade.decode_size())
    rep = guard_exits(b.cascade, exit_probabilities(b.cascade, images), cfg.fpr, cfg.sources, cfg.split)
    b.meta["guard"] = rep.as_dict()
    b.save(path)
    log(f"guard ({len(images)} {'/'.join(cfg.sources)} negatives of {cfg.split}, fpr {cfg.fpr}): thresholds "
        + ", ".join(f"{f:.3f}->{t:.3f}" for f, t in zip(rep.fitted, rep.thresholds)))
    return rep


def _same(report: dict, cfg: GuardConfig) -> bool:
    return report.get("fpr") == cfg.fpr and tuple(report.get("sources", ())) == cfg.sources and report.get("split") == cfg.split
