"""Fine-tuning a zoo backbone for roadwork (one logit), with challenge-style augmentation,
checkpoint selection by MCC on val challenge views, temperature calibration and threshold folding.
Writes a stage-1 bundle (a cascade of one classifier tier)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cascade.bundle import Bundle
from ..cascade.calibration import TemperatureCalibrator, binary_nll, mcc_curve
from ..cascade.runtime import Cascade, ClassifierTier, ExitPoint, FinalRule, LastTierFusion
from ..io.challenge import ChallengeConfig, challenge_view, challenge_views
from ..io.data import Dataset, open_dataset
from ..metrics import auroc
from ..models.preprocess import normalize, pick_device, resize_square
from ..models.zoo import create_model, get_spec, gflops
from .config import OptimOptions, TrainConfig, apply_threads
from .schedule import format_record, frozen_copy, loader_workers, lr_at, optimiser_step, total_steps

__all__ = ["TrainConfig", "TrainResult", "train", "augment", "AugmentedSet", "sample_weights", "open_extra_train", "decode_all",
           "view_set", "predict_logits", "score_logits", "stage1_cascade", "ValViews", "Loop", "fit_epochs", "open_training_only"]

Progress = Callable[[str, int, int], None]


@dataclass
class TrainResult:
    bundle: Bundle
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- pieces


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def smooth_targets(y: torch.Tensor, eps: float) -> torch.Tensor:
    return y * (1.0 - eps) + 0.5 * eps


def augment(img: np.ndarray, rng: np.random.Generator, size: int, clean_prob: float, style_p: float = 0.0,
            protocol: str = "v2.0.4") -> np.ndarray:
    """One training view: the dashcam style (with probability ``style_p``), then a clean resized image or
    a validator-style challenge view under ``protocol`` (a native view is resized as inference does); random h-flip."""
    if style_p > 0:
        from ..io.style import DashcamStyle, apply_style

        img = apply_style(img, rng, DashcamStyle(p=style_p))
    if rng.random() < clean_prob:
        out = resize_square(img, size)
    else:
        out, _ = challenge_view(img, rng, ChallengeConfig(size=size, protocol=protocol))
        out = resize_square(out, size)  # a no-op except for native views
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


class AugmentedSet(torch.utils.data.Dataset):
    """Decoded training images, augmented deterministically from (seed, epoch, index)."""

    def __init__(self, images: Sequence[np.ndarray], labels: np.ndarray, size: int, clean_prob: float | Sequence[float], seed: int,
                 style_p: float = 0.0, protocol: str = "v2.0.4"):
        self.images, self.labels, self.protocol = images, labels, protocol
        self.clean_prob = np.broadcast_to(np.asarray(clean_prob, dtype=np.float64), (len(images),))
        self.size, self.seed, self.epoch, self.style_p = size, seed, 0, style_p

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        x = augment(self.images[i], rng, self.size, float(self.clean_prob[i]), self.style_p, self.protocol)
        return torch.from_numpy(np.array(x)).permute(2, 0, 1), torch.tensor(float(self.labels[i]))


def sample_weights(sources: Sequence[str], extra: Sequence[bool], extra_share: float, balance: bool) -> np.ndarray:
    """Sampling weights (summing to 1): the extra (synthetic) samples get ``extra_share`` of the mass, the
    real ones the rest, spread over their sources in proportion to sqrt(source size) when ``balance`` (a
    small source is seen more often, a large one less) or to the size otherwise."""
    src = np.asarray(sources)
    ext = np.asarray(extra, dtype=bool)
    w = np.zeros(len(src), dtype=np.float64)
    real = ~ext
    share = extra_share if ext.any() and real.any() else (1.0 if ext.any() else 0.0)
    if ext.any():
        w[ext] = share / ext.sum()
    if real.any():
        names, counts = np.unique(src[real], return_counts=True)
        mass = np.sqrt(counts) if balance else counts.astype(np.float64)
        mass = (1.0 - share) * mass / mass.sum()
        for n, c, m in zip(names, counts, mass):
            w[real & (src == n)] = m / c
    return w


def open_training_only(path: str | Path) -> Dataset:
    """A training-only manifest (a synthetic set); refuses one that holds another split's data."""
    ds = open_dataset(path)
    bad = sorted(set(ds.splits) - {"train", "all"})
    if bad:
        raise ValueError(f"{path}: an extra training set must hold training data only, found split(s) {bad}")
    return ds


def open_extra_train(paths: Sequence[str]) -> Dataset:
    """Training-only sets (the synthetic manifests) as one dataset."""
    return Dataset("extra", [s for p in paths for s in open_training_only(p).samples])


def decode_all(ds: Dataset, desc: str = "decode", progress: Progress | None = None) -> list[np.ndarray]:
    out = []
    for i, s in enumerate(ds.samples):
        out.append(s.load())
        if progress:
            progress(desc, i + 1, len(ds))
    return out


def view_set(ds: Dataset, images: Sequence[np.ndarray], views: int, seed: int, size: int,
             protocol: str = "v2.0.4") -> tuple[list[np.ndarray], np.ndarray]:
    """Challenge views (seeded per image key, under ``protocol``) as a flat list with their labels."""
    out, y = [], []
    cfg = ChallengeConfig(size=size, protocol=protocol)
    for s, im in zip(ds.samples, images):
        for v in challenge_views(im, seed=seed, key=s.key, n=views, cfg=cfg):
            out.append(v)
            y.append(s.label)
    return out, np.array(y, dtype=np.int64)


@torch.inference_mode()
def predict_logits(model, images: Sequence[np.ndarray], size: int, mean, std, device, batch_size: int = 64, amp: bool = False) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        arr = np.stack([resize_square(im, size) for im in images[i : i + batch_size]])
        x = normalize(torch.from_numpy(arr).permute(0, 3, 1, 2).to(device), mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out.append(model(x).float().reshape(-1).cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def score_logits(z: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Selection metrics: the best-threshold MCC (the threshold is folded later), AUROC, NLL."""
    _, m = mcc_curve(1.0 / (1.0 + np.exp(-z)), y)
    return {"mcc_best": float(m.max()), "auroc": auroc(y, z), "nll": binary_nll(z, y)}


def stage1_cascade(model_name: str, model: torch.nn.Module, eval_size: int, mean, std, calibrator: TemperatureCalibrator,
                   squares: int = 1, view_scale: float = 1.0) -> Cascade:
    """A stage-1 cascade: one calibrated classifier tier (on the CPU), its MCC-optimal threshold folded to 0.5."""
    tier = ClassifierTier(
        name=f"{model_name}@{eval_size}", model_name=model_name, model=model.float().cpu(), input_size=eval_size, mean=mean,
        std=std, calibrator=calibrator, gflops=gflops(model_name, eval_size), device=torch.device("cpu"), squares=squares,
        view_scale=view_scale,
    )
    return Cascade([tier], [ExitPoint(LastTierFusion(), calibrator.threshold_, FinalRule())])


# ----------------------------------------------------------------------------- the loop (training and distillation)


@dataclass
class ValViews:
    """What checkpoints are selected on: the val challenge views, their labels, and how the network sees them."""

    views: Sequence[np.ndarray]
    y: np.ndarray
    size: int
    mean: tuple
    std: tuple


@dataclass
class Loop:
    """A classifier training loop's parts: the networks, the optimiser, the data and the step schedule."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    dset: torch.utils.data.Dataset  # has an ``epoch`` attribute (its augmentation is seeded per epoch)
    loader: torch.utils.data.DataLoader
    total: int  # optimiser steps in all
    warmup: int  # steps of linear warm-up
    device: torch.device
    amp: bool = False
    eval_start: int = 0  # first epoch (0-based) whose EMA weights are scored on val
    desc: str = "train"


def run_epoch(cfg: OptimOptions, loop: Loop, batch_loss: Callable[[tuple], torch.Tensor], step: int,
              progress: Progress | None = None) -> tuple[list[float], int]:
    """One pass over the loader (warm-up + cosine learning rate, one optimiser and EMA step per batch), stopping at
    ``loop.total`` steps; the batch losses and the step reached."""
    loop.model.train()
    losses = []
    for batch in loop.loader:
        if step >= loop.total:
            break
        for g in loop.opt.param_groups:
            g["lr"] = lr_at(step, loop.total, loop.warmup, cfg.lr)
        losses.append(optimiser_step(loop.opt, batch_loss(batch), loop.model, loop.ema, step, cfg.ema_decay))
        step += 1
        if progress:
            progress(loop.desc, step, loop.total)
    return losses, step


def select_checkpoint(best: dict | None, rec: dict, loop: Loop, val: ValViews) -> dict | None:
    """Score the EMA weights on the val views (into ``rec``); keep them if they beat ``best`` on (MCC, AUROC, -NLL)."""
    z = predict_logits(loop.ema, val.views, val.size, val.mean, val.std, loop.device, amp=loop.amp)
    rec.update({f"val_challenge_{k}": v for k, v in score_logits(z, val.y).items()})
    key = (rec["val_challenge_mcc_best"], rec["val_challenge_auroc"], -rec["val_challenge_nll"])
    if best is None or key > best["key"]:
        return {"key": key, "epoch": rec["epoch"], "state": copy.deepcopy(loop.ema.state_dict()), "logits": z}
    return best


def fit_epochs(cfg: OptimOptions, loop: Loop, batch_loss: Callable[[tuple], torch.Tensor], val: ValViews,
               progress: Progress | None = None, log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """The epochs; the EMA weights are scored from ``loop.eval_start`` on (and at the last epoch) and the best
    are loaded back into ``loop.ema``. Returns the best checkpoint (its val logits included) and the history."""
    best, history, step = None, [], 0
    for epoch in range(cfg.epochs):
        loop.dset.epoch = epoch
        losses, step = run_epoch(cfg, loop, batch_loss, step, progress)
        rec = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)) if losses else float("nan")}
        if epoch >= loop.eval_start or epoch == cfg.epochs - 1 or step >= loop.total:
            best = select_checkpoint(best, rec, loop, val)
        history.append(rec)
        log(format_record(rec))
        if step >= loop.total:
            break
    assert best is not None
    loop.ema.load_state_dict(best["state"])
    return best, history


# ----------------------------------------------------------------------------- training


@dataclass
class TrainData:
    """A run's decoded data: training images (the split's, then the extra sets'), val images and val views."""

    train: Dataset
    extra: Dataset
    val: Dataset
    images: list[np.ndarray]
    val_images: list[np.ndarray]
    val_views: list[np.ndarray]
    val_y: np.ndarray


def load_train_data(cfg: TrainConfig, eval_size: int, device: torch.device, progress: Progress | None,
                    log: Callable[[str], None]) -> TrainData:
    full = open_dataset(cfg.data)
    train_ds = full.split(cfg.train_split).subset(cfg.max_train, cfg.seed)
    val_ds = full.split(cfg.val_split).subset(cfg.max_val, cfg.seed)
    log(f"data: {full.name}  train {train_ds.counts()}  val {val_ds.counts()}  device {device}")
    extra_ds = open_extra_train(cfg.extra_train)
    if len(extra_ds):
        log(f"extra training data: {extra_ds.counts()} ({cfg.synth_share:.0%} of each epoch)")
    images = decode_all(train_ds, "decode train", progress) + decode_all(extra_ds, "decode extra", progress)
    val_imgs = decode_all(val_ds, "decode val", progress)
    val_views, val_y = view_set(val_ds, val_imgs, cfg.val_views, cfg.val_seed, eval_size, cfg.protocol)
    return TrainData(train_ds, extra_ds, val_ds, images, val_imgs, val_views, val_y)


def train_loader(cfg: TrainConfig, data: TrainData, size: int, device: torch.device) -> tuple[AugmentedSet, torch.utils.data.DataLoader]:
    """The augmented training set and its loader (weighted sampling when there are extra sets or balanced sources)."""
    n_real = len(data.train)
    labels = np.concatenate([data.train.labels(), data.extra.labels()])
    # synthetic frames are seen whole: a challenge view's crop (L0 centre square, L1+ random resized crop)
    # often cuts away the small pasted objects and would leave a "roadwork" label on a frame without any
    clean = np.where(np.arange(len(data.images)) >= n_real, 1.0, cfg.clean_prob)
    dset = AugmentedSet(data.images, labels, size, clean, cfg.seed, cfg.style_p, cfg.protocol)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = None
    if len(data.extra) or cfg.balance_sources:
        w = sample_weights(np.concatenate([data.train.sources(), data.extra.sources()]), np.arange(len(dset)) >= n_real,
                           cfg.synth_share, cfg.balance_sources)
        sampler = torch.utils.data.WeightedRandomSampler(torch.from_numpy(w), cfg.epoch_size or n_real, replacement=True, generator=gen)
    loader = torch.utils.data.DataLoader(
        dset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=len(dset) > cfg.batch_size,
        num_workers=loader_workers(cfg.num_workers, device), generator=gen, pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    return dset, loader


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on the weights, none on biases and norms (1-d parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def calibrate(cfg: TrainConfig, ema: torch.nn.Module, best: dict, data: TrainData, val: ValViews, loop: Loop
              ) -> tuple[TemperatureCalibrator, np.ndarray]:
    """Temperature and MCC-optimal threshold on val (``cfg.calibrate_on``); also the val clean logits."""
    clean_z = predict_logits(ema, data.val_images, val.size, val.mean, val.std, loop.device, amp=loop.amp)
    clean_y = data.val.labels()
    z = {"challenge": best["logits"], "clean": clean_z, "both": np.concatenate([best["logits"], clean_z])}[cfg.calibrate_on]
    y = {"challenge": data.val_y, "clean": clean_y, "both": np.concatenate([data.val_y, clean_y])}[cfg.calibrate_on]
    return TemperatureCalibrator().fit(z, y), clean_z


def stage1_meta(cfg: TrainConfig, data: TrainData, calibrator: TemperatureCalibrator, best: dict, clean_z: np.ndarray,
                history: list[dict], seconds: float, device: torch.device) -> dict:
    """The stage-1 bundle's metadata: data, val metrics (challenge and clean) and the training record."""
    from ..metrics import summarize

    val_metrics = {
        "challenge": summarize(data.val_y, calibrator.predict_proba(best["logits"])).as_dict(),
        "clean": summarize(data.val.labels(), calibrator.predict_proba(clean_z)).as_dict(),
    }
    return {
        "kind": "stage1",
        "data": {"dataset": str(cfg.data or "default StreetWork"), "fit_split": cfg.train_split, "select_split": cfg.val_split,
                 "calibrate_on": f"{cfg.val_split} {cfg.calibrate_on}", "val_views": cfg.val_views, "val_seed": cfg.val_seed,
                 "n_train": len(data.train), "n_val": len(data.val), "extra_train": list(cfg.extra_train),
                 "n_extra": len(data.extra)},
        "metrics": {"val": val_metrics},
        "train": {**asdict(cfg), "selected_epoch": best["epoch"], "seconds": seconds, "device": str(device), "history": history},
    }


def train(cfg: TrainConfig, out: str | Path, progress: Progress | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune ``cfg.model``, select the EMA checkpoint on val challenge views, calibrate, write a stage-1 bundle."""
    t_start = time.perf_counter()
    apply_threads(cfg)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    spec = get_spec(cfg.model)
    size = cfg.input_size or spec.input_size
    eval_size = cfg.eval_size or spec.input_size
    data = load_train_data(cfg, eval_size, device, progress, log)
    val = ValViews(data.val_views, data.val_y, eval_size, spec.mean, spec.std)

    model = create_model(cfg.model, num_classes=1, pretrained=True).to(device).to(memory_format=torch.channels_last)
    ema = frozen_copy(model)
    dset, loader = train_loader(cfg, data, size, device)
    steps_per_epoch = max(1, len(loader))
    opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr)
    loop = Loop(model, ema, opt, dset, loader, total_steps(steps_per_epoch, cfg.epochs, cfg.max_steps),
                int(cfg.warmup_epochs * steps_per_epoch), device, amp=cfg.amp and device.type == "cuda",
                eval_start=min(cfg.epochs - 1, int(cfg.eval_from * cfg.epochs)))

    def batch_loss(batch) -> torch.Tensor:
        xb, yb = batch
        x = normalize(xb.to(device, non_blocking=True), spec.mean, spec.std)
        y = smooth_targets(yb.to(device), cfg.label_smoothing)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=loop.amp):
            z = model(x).float().reshape(-1)
        return F.binary_cross_entropy_with_logits(z, y)

    best, history = fit_epochs(cfg, loop, batch_loss, val, progress, log)
    calibrator, clean_z = calibrate(cfg, ema, best, data, val, loop)
    log(f"selected epoch {best['epoch']}; temperature {calibrator.temperature_:.3f}, threshold {calibrator.threshold_:.3f}")
    cascade = stage1_cascade(cfg.model, ema, eval_size, spec.mean, spec.std, calibrator, cfg.squares, cfg.view_scale)
    seconds = time.perf_counter() - t_start
    bundle = Bundle(cascade, stage1_meta(cfg, data, calibrator, best, clean_z, history, seconds, device))
    bundle.save(out)
    return TrainResult(bundle=bundle, history=history, seconds=seconds)
