"""Fine-tuning a zoo backbone for roadwork (one logit), with challenge-style augmentation,
checkpoint selection by MCC on val challenge views, temperature calibration and threshold folding.
Writes a stage-1 bundle (a cascade of one classifier tier)."""

from __future__ import annotations

import copy
import os
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
from .schedule import lr_at, optimiser_step
from ..models.zoo import create_model, get_spec, gflops

Progress = Callable[[str, int, int], None]


@dataclass
class TrainConfig:
    model: str = "lite0"
    input_size: int | None = None  # training resolution (default: the model's input size)
    eval_size: int | None = None  # inference resolution stored in the bundle (default: the model's)
    epochs: int = 8
    batch_size: int = 32
    lr: float = 6e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    ema_decay: float = 0.995
    clean_prob: float = 0.3  # share of training samples seen as clean (resized) images, the rest as challenge views
    seed: int = 0
    device: str = "auto"
    data: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    val_views: int = 4
    val_seed: int = 0
    calibrate_on: str = "challenge"  # challenge | clean | both
    max_train: int | None = None
    max_val: int | None = None
    max_steps: int | None = None  # stop early (tests, smoke runs)
    eval_from: float = 0.67  # evaluate checkpoints from this fraction of the epochs on (the last third)
    num_workers: int | None = None
    threads: int | None = None
    amp: bool = True  # bf16 autocast on CUDA
    # dashcam robustness (issue 11): extra training-only sets (synthetic), their share of each epoch,
    # source-balanced sampling of the real sources and the dashcam style transform (roadcascade.io.style)
    extra_train: tuple[str, ...] = ()
    synth_share: float = 0.4
    balance_sources: bool = False
    style_p: float = 0.0
    epoch_size: int | None = None  # samples drawn per epoch (default: the real training split's size)
    squares: int = 1  # the bundle's tier sees a non-square image as this many aspect-preserving squares (max-pooled)
    view_scale: float = 1.0  # ... and runs those squares at this x its input size (ClassifierTier.view_size)
    # challenge protocol of the training augmentation and the val views (challenge.PROTOCOLS; issue 12)
    protocol: str = "v2.0.4"

    def __post_init__(self) -> None:
        ChallengeConfig(protocol=self.protocol)  # ValueError naming the protocols for an unknown one


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


def open_extra_train(paths: Sequence[str]) -> Dataset:
    """Training-only sets (the synthetic manifests); refuses one that holds another split's data."""
    samples = []
    for p in paths:
        ds = open_dataset(p)
        bad = sorted(set(ds.splits) - {"train", "all"})
        if bad:
            raise ValueError(f"{p}: an extra training set must hold training data only, found split(s) {bad}")
        samples += ds.samples
    return Dataset("extra", samples)


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


# ----------------------------------------------------------------------------- training


def train(cfg: TrainConfig, out: str | Path, progress: Progress | None = None, log: Callable[[str], None] = print) -> TrainResult:
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    spec = get_spec(cfg.model)
    size = cfg.input_size or spec.input_size
    eval_size = cfg.eval_size or spec.input_size
    amp = cfg.amp and device.type == "cuda"

    full = open_dataset(cfg.data)
    train_ds = full.split(cfg.train_split).subset(cfg.max_train, cfg.seed)
    val_ds = full.split(cfg.val_split).subset(cfg.max_val, cfg.seed)
    log(f"data: {full.name}  train {train_ds.counts()}  val {val_ds.counts()}  device {device}")

    extra_ds = open_extra_train(cfg.extra_train)
    if len(extra_ds):
        log(f"extra training data: {extra_ds.counts()} ({cfg.synth_share:.0%} of each epoch)")
    train_imgs = decode_all(train_ds, "decode train", progress) + decode_all(extra_ds, "decode extra", progress)
    n_real = len(train_ds)
    val_imgs = decode_all(val_ds, "decode val", progress)
    val_views, val_y = view_set(val_ds, val_imgs, cfg.val_views, cfg.val_seed, eval_size, cfg.protocol)
    val_clean_y = val_ds.labels()

    model = create_model(cfg.model, num_classes=1, pretrained=True).to(device).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)

    labels = np.concatenate([train_ds.labels(), extra_ds.labels()])
    # synthetic frames are seen whole: a challenge view's crop (L0 centre square, L1+ random resized crop)
    # often cuts away the small pasted objects and would leave a "roadwork" label on a frame without any
    clean = np.where(np.arange(len(train_imgs)) >= n_real, 1.0, cfg.clean_prob)
    dset = AugmentedSet(train_imgs, labels, size, clean, cfg.seed, cfg.style_p, cfg.protocol)
    workers = cfg.num_workers if cfg.num_workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = None
    if len(extra_ds) or cfg.balance_sources:
        w = sample_weights(np.concatenate([train_ds.sources(), extra_ds.sources()]), np.arange(len(dset)) >= n_real,
                           cfg.synth_share, cfg.balance_sources)
        sampler = torch.utils.data.WeightedRandomSampler(torch.from_numpy(w), cfg.epoch_size or n_real, replacement=True, generator=gen)
    loader = torch.utils.data.DataLoader(
        dset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=len(dset) > cfg.batch_size,
        num_workers=workers, generator=gen, pin_memory=device.type == "cuda", persistent_workers=False,
    )
    steps_per_epoch = max(1, len(loader))
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    mean, std = spec.mean, spec.std
    history: list[dict] = []
    best: dict | None = None
    step = 0
    eval_start = min(cfg.epochs - 1, int(cfg.eval_from * cfg.epochs))
    for epoch in range(cfg.epochs):
        dset.epoch = epoch
        model.train()
        losses = []
        for xb, yb in loader:
            if step >= total:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, cfg.lr)
            x = normalize(xb.to(device, non_blocking=True), mean, std)
            y = smooth_targets(yb.to(device), cfg.label_smoothing)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                z = model(x).float().reshape(-1)
            loss = F.binary_cross_entropy_with_logits(z, y)
            losses.append(optimiser_step(opt, loss, model, ema, step, cfg.ema_decay))
            step += 1
            if progress:
                progress("train", step, total)
        last_epoch = epoch == cfg.epochs - 1 or step >= total
        rec = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)) if losses else float("nan")}
        if epoch >= eval_start or last_epoch:
            z = predict_logits(ema, val_views, eval_size, mean, std, device, amp=amp)
            rec.update({f"val_challenge_{k}": v for k, v in score_logits(z, val_y).items()})
            key = (rec["val_challenge_mcc_best"], rec["val_challenge_auroc"], -rec["val_challenge_nll"])
            if best is None or key > best["key"]:
                best = {"key": key, "epoch": epoch + 1, "state": copy.deepcopy(ema.state_dict()), "logits": z}
        history.append(rec)
        log("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        if step >= total:
            break
    assert best is not None
    ema.load_state_dict(best["state"])

    # calibrate on val: temperature, MCC-optimal threshold, fold
    val_clean_z = predict_logits(ema, val_imgs, eval_size, mean, std, device, amp=amp)
    cal_z = {"challenge": best["logits"], "clean": val_clean_z, "both": np.concatenate([best["logits"], val_clean_z])}[cfg.calibrate_on]
    cal_y = {"challenge": val_y, "clean": val_clean_y, "both": np.concatenate([val_y, val_clean_y])}[cfg.calibrate_on]
    calibrator = TemperatureCalibrator().fit(cal_z, cal_y)
    log(f"selected epoch {best['epoch']}; temperature {calibrator.temperature_:.3f}, threshold {calibrator.threshold_:.3f}")

    cascade = stage1_cascade(cfg.model, ema, eval_size, mean, std, calibrator, cfg.squares, cfg.view_scale)
    seconds = time.perf_counter() - t_start
    from ..metrics import summarize

    val_metrics = {
        "challenge": summarize(val_y, calibrator.predict_proba(best["logits"])).as_dict(),
        "clean": summarize(val_clean_y, calibrator.predict_proba(val_clean_z)).as_dict(),
    }
    meta = {
        "kind": "stage1",
        "data": {"dataset": str(cfg.data or "default StreetWork"), "fit_split": cfg.train_split, "select_split": cfg.val_split,
                 "calibrate_on": f"{cfg.val_split} {cfg.calibrate_on}", "val_views": cfg.val_views, "val_seed": cfg.val_seed,
                 "n_train": len(train_ds), "n_val": len(val_ds), "extra_train": list(cfg.extra_train),
                 "n_extra": len(extra_ds)},
        "metrics": {"val": val_metrics},
        "train": {**asdict(cfg), "selected_epoch": best["epoch"], "seconds": seconds, "device": str(device), "history": history},
    }
    bundle = Bundle(cascade, meta)
    bundle.save(out)
    return TrainResult(bundle=bundle, history=history, seconds=seconds)
