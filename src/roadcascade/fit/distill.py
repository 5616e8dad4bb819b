"""``roadcascade distill``: one student network taught by any bundle (a cascade run as its full ensemble, test-time
views included when the bundle has them).

Soft targets are the teacher's fused, calibrated probability on a fixed set of views per training image (the image
itself and ``views - 1`` seeded validator challenge views), computed once per (teacher, image, view) and cached on
disk, so a second run with the same teacher pays nothing. The student learns ``sigmoid(logit(p) / T)`` at
temperature T (Hinton et al.: the soft loss is scaled by T^2), plus the hard label where there is one; images from
unlabelled or synthetic folders contribute the soft loss only. Selection, calibration and the fold are the stage-1
code of :mod:`roadcascade.fit.train`: the student is a stage-1 bundle, usable as a cascade tier.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cascade.bundle import Bundle
from ..cascade.calibration import TemperatureCalibrator, logit
from ..cascade.rules import NeverRule
from ..cascade.runtime import Cascade, ExitPoint
from ..io.challenge import ChallengeConfig, challenge_views
from ..io.data import IMAGE_SUFFIXES, Dataset, Sample, open_dataset
from ..models.preprocess import normalize, pick_device, resize_square
from ..models.zoo import create_model, get_spec
from .config import DistillConfig, apply_threads, student_spec
from .schedule import frozen_copy, total_steps
from .train import (Loop, ValViews, decode_all, fit_epochs, open_training_only, seed_everything, smooth_targets, stage1_cascade,
                    view_set)

__all__ = ["DistillConfig", "DistillResult", "distill", "student_spec", "every_tier", "teacher_probs", "soft_target", "teacher_id", "TargetCache",
           "image_views", "fill_targets", "unlabelled_folder", "open_extra", "ViewTargetSet", "distill_loss"]

Progress = Callable[[str, int, int], None]
UNLABELLED = -1


# ----------------------------------------------------------------------------- teacher targets


def every_tier(cascade: Cascade) -> Cascade:
    """The cascade with its early exits closed: every tier runs on every image and the last exit's fusion decides
    (the teacher of ``ensemble`` mode). A bundle's report calls the stack of *all* its candidate tiers, including
    those its policy dropped, the full ensemble; this is the stack of the tiers the cascade kept."""
    if cascade.n_stages <= 1:
        return cascade
    return Cascade(cascade.tiers, [ExitPoint(e.fusion, e.threshold, NeverRule()) for e in cascade.exits])


def teacher_probs(cascade: Cascade, images: Sequence[np.ndarray], mode: str = "ensemble", batch: int = 32) -> np.ndarray:
    """The teacher's fused, calibrated probability (before the fold), every tier run (``ensemble``) or with the
    bundle's own early exits (``cascade``)."""
    if mode == "ensemble":
        cascade = every_tier(cascade)
    out = [np.array([p.calibrated for p in cascade.predict(images[i : i + batch])]) for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros(0)


def soft_target(p: np.ndarray, temperature: float) -> np.ndarray:
    """The tempered target sigmoid(logit(p) / T): T > 1 softens, T = 1 keeps p."""
    return 1.0 / (1.0 + np.exp(-logit(p) / temperature))


def teacher_id(bundle_dir: Path, cfg: DistillConfig) -> str:
    """Cache key of a teacher and its view recipe: its bundle.json (weights hashes included) and the settings."""
    h = hashlib.sha256((Path(bundle_dir) / "bundle.json").read_bytes())
    h.update(json.dumps({"mode": cfg.teacher_mode, "views": cfg.views, "seed": cfg.seed}).encode())
    return h.hexdigest()[:16]


class TargetCache:
    """Teacher probabilities per (image key, view), one JSON-lines file per teacher; appended, never rewritten."""

    def __init__(self, root: Path, tid: str):
        self.path = Path(root) / f"{tid}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.table: dict[tuple[str, int], float] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    r = json.loads(line)
                    self.table[(str(r["key"]), int(r["view"]))] = float(r["p"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run: recomputed below

    def missing(self, keys: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        return [k for k in keys if k not in self.table]

    def add(self, keys: Sequence[tuple[str, int]], probs: np.ndarray) -> None:
        with self.path.open("a") as f:
            for (key, view), p in zip(keys, probs):
                self.table[(key, view)] = float(p)
                f.write(json.dumps({"key": key, "view": view, "p": float(p)}) + "\n")


def image_views(im: np.ndarray, key: str, n: int, seed: int) -> list[np.ndarray]:
    """View 0: the image; views 1..n-1: seeded challenge views (the same on every run)."""
    return [im] + (challenge_views(im, seed=seed, key=f"distill:{key}", n=n - 1, cfg=ChallengeConfig()) if n > 1 else [])


def fill_targets(cache: TargetCache, teacher: Cascade, keys: Sequence[str], images: Sequence[np.ndarray], cfg: DistillConfig,
                 progress: Progress | None = None) -> np.ndarray:
    """(n_images, views) teacher probabilities, computing only what the cache lacks, image by image batches."""
    todo = [i for i, k in enumerate(keys) if cache.missing([(k, v) for v in range(cfg.views)])]
    step = max(1, 32 // cfg.views)
    for j in range(0, len(todo), step):
        idx = todo[j : j + step]
        vs = [v for i in idx for v in image_views(images[i], keys[i], cfg.views, cfg.seed)]
        cache.add([(keys[i], v) for i in idx for v in range(cfg.views)], teacher_probs(teacher, vs, cfg.teacher_mode))
        if progress:
            progress("teacher targets", min(j + step, len(todo)), len(todo))
    return np.array([[cache.table[(k, v)] for v in range(cfg.views)] for k in keys], dtype=np.float64)


# ----------------------------------------------------------------------------- data


def unlabelled_folder(root: str | Path) -> Dataset:
    """Every image under ``root`` (recursively), without labels."""
    root = Path(root)
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"{root}: no images found")
    return Dataset(root.name, [Sample(key=f"{root.name}/{p.relative_to(root)}", label=UNLABELLED, source="unlabelled",
                                      split="train", path=p) for p in paths])


def open_extra(path: str) -> Dataset:
    """A training-only manifest (its labels kept) or a plain image folder (unlabelled)."""
    p = Path(path)
    if (p / "manifest.csv").exists():
        return open_training_only(p)
    if not p.is_dir():
        raise ValueError(f"{p}: not a directory of images or a manifest")
    return unlabelled_folder(p)


class ViewTargetSet(torch.utils.data.Dataset):
    """(image view at the training size, tempered teacher target, label or -1), a random h-flip per epoch."""

    def __init__(self, views: Sequence[np.ndarray], targets: np.ndarray, labels: np.ndarray, size: int, seed: int):
        self.views, self.targets, self.labels, self.size, self.seed, self.epoch = views, targets, labels, size, seed, 0

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int):
        x = resize_square(self.views[i], self.size)
        if np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5:
            x = x[:, ::-1]
        return (torch.from_numpy(np.array(x)).permute(2, 0, 1), torch.tensor(float(self.targets[i])),
                torch.tensor(float(self.labels[i])))


def distill_loss(z: torch.Tensor, soft: torch.Tensor, y: torch.Tensor, temperature: float, hard_weight: float,
                 smoothing: float) -> torch.Tensor:
    """T^2-scaled BCE to the tempered teacher target, plus the label BCE where a label exists (y >= 0)."""
    loss = (1.0 - hard_weight) * F.binary_cross_entropy_with_logits(z / temperature, soft) * temperature**2
    has = y >= 0
    if hard_weight > 0 and bool(has.any()):
        loss = loss + hard_weight * F.binary_cross_entropy_with_logits(z[has], smooth_targets(y[has], smoothing))
    return loss


# ----------------------------------------------------------------------------- training


@dataclass
class DistillResult:
    bundle: Bundle
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    n_views: int = 0
    cached: int = 0  # teacher targets found in the cache


def _training_views(cfg: DistillConfig, teacher: Bundle, sets: Sequence[Dataset], progress: Progress | None,
                    log: Callable[[str], None]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, int]:
    """Every training view, its tempered teacher target and its label (-1: none); and how many targets were cached."""
    cache = TargetCache(Path(cfg.cache), teacher_id(Path(teacher.path), cfg))
    before = len(cache.table)
    views, targets, labels = [], [], []
    for ds in sets:
        images = decode_all(ds, f"decode {ds.name}", progress)
        keys = [s.key for s in ds.samples]
        p = fill_targets(cache, teacher.cascade, keys, images, cfg, progress)
        for im, key, s, row in zip(images, keys, ds.samples, p):
            views += image_views(im, key, cfg.views, cfg.seed)
            targets += list(soft_target(row, cfg.temperature))
            labels += [s.label] * cfg.views
    log(f"teacher targets: {len(views)} views, {before} cached in {cache.path}")
    return views, np.asarray(targets), np.asarray(labels, dtype=np.float64), before


def _fit(cfg: DistillConfig, model: torch.nn.Module, dset: ViewTargetSet, val: ValViews, device: torch.device,
         progress: Progress | None, log: Callable[[str], None]) -> tuple[dict, list[dict]]:
    """The training loop (AdamW, warm-up + cosine, EMA), selecting the EMA checkpoint by val challenge MCC."""
    ema = frozen_copy(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(dset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(dset) > cfg.batch_size,
                                         generator=gen, num_workers=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loop = Loop(model, ema, opt, dset, loader, total_steps(len(loader), cfg.epochs, cfg.max_steps), len(loader) // 2, device,
                amp=device.type == "cuda", desc="distill")

    def batch_loss(batch) -> torch.Tensor:
        xb, tb, yb = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=loop.amp):
            z = model(normalize(xb.to(device), val.mean, val.std)).float().reshape(-1)
        return distill_loss(z, tb.to(device).float(), yb.to(device).float(), cfg.temperature, cfg.hard_weight,
                            cfg.label_smoothing)

    best, history = fit_epochs(cfg, loop, batch_loss, val, progress, log)
    return {**best, "model": ema}, history


def distill(cfg: DistillConfig, out: str | Path, progress: Progress | None = None,
            log: Callable[[str], None] = print) -> DistillResult:
    """Teach a student from ``cfg.teacher``; write it as a calibrated, folded stage-1 bundle at ``out``."""
    t0 = time.perf_counter()
    apply_threads(cfg)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(out)
    cfg.cache = cfg.cache or str(out.parent / "distill-cache")
    teacher = Bundle.load(cfg.teacher, device=device)
    name, eval_size = student_spec(cfg.student)
    spec = get_spec(name)
    full = open_dataset(cfg.data)
    train_ds = full.split("train").subset(cfg.max_train, cfg.seed)
    extra = [open_extra(p).subset(cfg.max_extra, cfg.seed) for p in cfg.extra]
    val_ds = full.split("val").subset(cfg.max_val, cfg.seed)
    views, targets, labels, cached = _training_views(cfg, teacher, [train_ds, *extra], progress, log)
    val_imgs = decode_all(val_ds, "decode val", progress)
    val_views, val_y = view_set(val_ds, val_imgs, cfg.val_views, 0, eval_size)
    model = create_model(name, num_classes=1, pretrained=True).to(device)
    dset = ViewTargetSet(views, targets, labels, cfg.input_size or eval_size, cfg.seed)
    best, history = _fit(cfg, model, dset, ValViews(val_views, val_y, eval_size, spec.mean, spec.std), device, progress, log)
    calibrator = TemperatureCalibrator().fit(best["logits"], val_y)  # on val challenge views, as stage 1 is
    log(f"selected epoch {best['epoch']}; temperature {calibrator.temperature_:.3f}, threshold {calibrator.threshold_:.3f}")
    from ..metrics import summarize

    seconds = time.perf_counter() - t0
    meta = {
        "kind": "stage1",
        "data": {"dataset": str(cfg.data or "default StreetWork"), "fit_split": "train", "select_split": "val",
                 "calibrate_on": "val challenge", "val_views": cfg.val_views, "val_seed": 0, "n_train": len(train_ds),
                 "n_val": len(val_ds), "extra_train": list(cfg.extra), "n_extra": sum(len(d) for d in extra)},
        "metrics": {"val": {"challenge": summarize(val_y, calibrator.predict_proba(best["logits"])).as_dict()}},
        "distill": {**asdict(cfg), "teacher_tiers": teacher.cascade.tier_names, "n_views": len(views), "cached_targets": cached},
        "train": {"model": name, "input_size": cfg.input_size or eval_size, "eval_size": eval_size, "epochs": cfg.epochs,
                  "selected_epoch": best["epoch"], "seconds": seconds, "device": str(device), "history": history},
    }
    bundle = Bundle(stage1_cascade(name, best["model"], eval_size, spec.mean, spec.std, calibrator), meta)
    bundle.save(out)
    return DistillResult(bundle=bundle, history=history, seconds=seconds, n_views=len(views), cached=cached)
