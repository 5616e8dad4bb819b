"""Training the cone detector on the manifest's boxes, then writing it as a cascade tier.

Recipe (``recipe="cpu"`` or ``"gpu"``, every field overridable):

* data: train-split images with boxes (all of them, every epoch) plus a fresh random draw of
  ``neg_ratio`` x as many roadwork-free images (label 0) per epoch as background-only images; images
  labelled roadwork without boxes are left out (their cones, if any, are not boxed);
* augmentation (boxes follow): random crop (each side 55-100 %, boxes kept when >= 40 % visible),
  horizontal flip, HSV jitter, one validator-style distortion (CS/CC/JPEG/GNC/GB, severity 1-3), JPEG
  round trip; multi-scale training through the FCOS transform (``train_sizes``: one drawn per image);
* AdamW, linear warm-up then cosine decay, the backbone at ``backbone_lr_mult`` x the learning rate,
  gradient clipping, an EMA of the weights; the EMA checkpoint with the best val mAP@0.5 (ties: mAP) is
  kept (val only: test is never used to select);
* then: the count threshold (best box F1 on val), the evidence scorer (logistic, on val clean images and
  seed-0 challenge views), the exit threshold (MCC-optimal on the same val evidence), and a bundle whose
  one tier is the detector; val and test detection metrics and speed in ``detection_metrics.json``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from ..io.data import Dataset, Sample, open_dataset
from ..models.preprocess import pick_device
from ..fit.config import apply_threads
from ..fit.schedule import ema_update, format_record, frozen_copy, loader_workers, lr_at, total_steps
from .boxes import box_area, yolo_to_xyxy
from .evaluate import DetEval, coco_map, evaluate_detector, measure_speed, operating_point, run_split
from .config import RECIPES, DetTrainConfig, config_from_meta, make_config
from .model import ConeDetector

Progress = Callable[[str, int, int], None]

__all__ = ["DetTrainConfig", "RECIPES", "make_config", "augment_detection", "ConeTrainSet", "train_detector", "finalize_detector",
           "config_from_meta", "fit_evidence", "DetTrainResult"]


@dataclass
class DetTrainResult:
    out: Path
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- augmentation


def _crop(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, cfg: DetTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    area0 = box_area(boxes)
    for _ in range(10):
        cw, ch = max(8, int(w * rng.uniform(cfg.crop_min, 1.0))), max(8, int(h * rng.uniform(cfg.crop_min, 1.0)))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        nb = boxes - np.array([x0, y0, x0, y0], dtype=boxes.dtype)
        nb[:, [0, 2]] = nb[:, [0, 2]].clip(0, cw)
        nb[:, [1, 3]] = nb[:, [1, 3]].clip(0, ch)
        keep = (box_area(nb) >= cfg.min_visible * area0) & (nb[:, 2] - nb[:, 0] >= 2) & (nb[:, 3] - nb[:, 1] >= 2)
        if len(boxes) == 0 or keep.any():
            return img[y0 : y0 + ch, x0 : x0 + cw], nb[keep]
    return img, boxes


def _hsv_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-4, 4)) % 180  # small: cones are orange
    hsv[..., 1] *= rng.uniform(0.6, 1.4)
    hsv[..., 2] *= rng.uniform(0.6, 1.4)
    return cv2.cvtColor(hsv.clip(0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)


def augment_detection(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, cfg: DetTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """One training view of (HxWx3 uint8, (n, 4) xyxy pixel boxes); boxes follow the geometry."""
    from ..io.challenge import apply_distortion, jpeg_roundtrip

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if rng.random() < cfg.crop_prob:
        img, boxes = _crop(img, boxes, rng, cfg)
    if rng.random() < 0.5:
        img = img[:, ::-1]
        w = img.shape[1]
        boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1) if len(boxes) else boxes
    img = np.ascontiguousarray(img)
    if rng.random() < cfg.color_prob:
        img = _hsv_jitter(img, rng)
    if rng.random() < cfg.distort_prob:
        kind = ("CS", "CC", "JPEG", "GNC", "GB")[int(rng.integers(0, 5))]
        img = apply_distortion(img, kind, int(rng.integers(1, 4)), rng)
    if rng.random() < cfg.jpeg_prob:
        img = jpeg_roundtrip(img, int(rng.integers(50, 91)))
    return np.ascontiguousarray(img), boxes.astype(np.float32)


class ConeTrainSet(torch.utils.data.Dataset):
    """(uint8 CHW tensor, FCOS target) pairs, augmented deterministically from (seed, epoch, index)."""

    def __init__(self, samples: Sequence[Sample], cfg: DetTrainConfig, images: Sequence[np.ndarray] | None = None):
        self.samples, self.cfg, self.images = list(samples), cfg, images
        self.epoch = 0
        self.order: list[int] = list(range(len(self.samples)))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        j = self.order[i]
        s = self.samples[j]
        img = self.images[j] if self.images is not None else None
        if img is None:
            img = s.load()
        boxes = yolo_to_xyxy(s.boxes, img.shape[1], img.shape[0]).astype(np.float32) if s.boxes else np.zeros((0, 4), np.float32)
        rng = np.random.default_rng([self.cfg.seed, self.epoch, j])
        img, boxes = augment_detection(img, boxes, rng, self.cfg)
        x = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        return x, {"boxes": torch.from_numpy(boxes).reshape(-1, 4), "labels": torch.zeros(len(boxes), dtype=torch.int64)}


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


# ----------------------------------------------------------------------------- evidence


def fit_evidence(model: ConeDetector, val: DetEval, count_threshold: float, views: int, seed: int = 0,
                 batch_size: int = 16, amp: bool = False, progress: Progress | None = None) -> dict:
    """Fit the tier's logistic evidence scorer and its MCC-optimal exit threshold on val evidence."""
    from ..cascade.calibration import best_threshold, fold
    from ..io.challenge import challenge_views
    from ..metrics import auroc, summarize
    from .tier import EvidenceConfig, LogisticScorer, evidence_features

    ev_cfg = EvidenceConfig(count_threshold=count_threshold)
    feats = [evidence_features(val.dets, ev_cfg)]
    ys = [np.array([s.label for s in val.samples])]
    if views > 0:
        vimgs, vy = [], []
        for s, im in zip(val.samples, val.images):
            for v in challenge_views(im, seed=seed, key=s.key, n=views):
                vimgs.append(v)
                vy.append(s.label)
        dets = []
        for i in range(0, len(vimgs), batch_size):
            dets += model.detect(vimgs[i : i + batch_size], batch_size=batch_size, amp=amp)
            if progress:
                progress("val challenge evidence", min(len(vimgs), i + batch_size), len(vimgs))
        feats.append(evidence_features(dets, ev_cfg))
        ys.append(np.array(vy))
    x, y = np.concatenate(feats), np.concatenate(ys)
    scorer = LogisticScorer().fit(x, y)
    p = scorer.prob(x)
    thr = best_threshold(p, y)
    n_clean = len(val.samples)
    rep = {"n_clean": n_clean, "n_views": int(len(y) - n_clean), "threshold": thr,
           "auroc_max_score_clean": auroc(y[:n_clean], x[:n_clean, 0]),
           "clean": summarize(y[:n_clean], fold(p[:n_clean], thr)).as_dict()}
    if views > 0:
        rep["challenge"] = summarize(y[n_clean:], fold(p[n_clean:], thr)).as_dict()
    return {"evidence": ev_cfg, "scorer": scorer, "threshold": thr, "report": rep}


# ----------------------------------------------------------------------------- training


def _lr_factor(step: int, total: int, warmup: int) -> float:
    return lr_at(step, total, warmup, 1.0)  # the same as (step + 1) / warmup, bit for bit


def _val_map(model: ConeDetector, samples: Sequence[Sample], images: Sequence[np.ndarray], amp: bool, batch_size: int = 16) -> dict:
    from .evaluate import gt_boxes

    dets = model.detect(list(images), batch_size=batch_size, amp=amp)
    gts = [gt_boxes(s, im.shape) for s, im in zip(samples, images)]
    return coco_map(gts, dets, [im.shape[:2] for im in images])


def train_detector(cfg: DetTrainConfig, out: str | Path, progress: Progress | None = None,
                   log: Callable[[str], None] = print) -> DetTrainResult:
    """Train the detector (the EMA checkpoint with the best val mAP kept), then :func:`finalize_detector`."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    apply_threads(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    full = open_dataset(cfg.data)
    data = _detector_data(cfg, full, device, log)
    loop = _detector_loop(cfg, data, device, log)
    state_path = out / "train_state.pt"  # written after every epoch; lets a killed run go on (--resume)
    st = _resume(state_path, cfg, loop, log) if cfg.resume and state_path.exists() else _DetState()
    eval_start = min(cfg.epochs - 1, int(cfg.eval_from * cfg.epochs))
    for epoch in range(st.epoch, cfg.epochs):
        rec = _detector_epoch(cfg, loop, data, epoch, st, progress, log)
        if epoch >= eval_start or epoch == cfg.epochs - 1 or st.step >= loop.total:
            m = _val_map(loop.ema, data.val_boxed, data.val_images, loop.amp)
            rec.update({f"val_{k}": v for k, v in m.items()})
            key = (m["map50"], m["map"])
            if st.best is None or key > st.best["key"]:
                st.best = {"key": key, "epoch": epoch + 1, "state": copy.deepcopy(loop.ema.state_dict())}
        st.history.append(rec)
        log(format_record(rec))
        st.epoch = epoch + 1
        _save_state(state_path, cfg, loop, st)
        if st.step >= loop.total:
            break
    assert st.best is not None
    loop.ema.load_state_dict(st.best["state"])
    loop.ema.set_sizes(cfg.min_size, cfg.max_size)
    train_seconds = time.perf_counter() - t_start
    log(f"selected epoch {st.best['epoch']} (val mAP@0.5 {st.best['key'][0]:.4f}, mAP@0.5:0.95 {st.best['key'][1]:.4f}); "
        f"trained in {train_seconds / 60:.1f} min")

    train_meta = {**asdict(cfg), "selected_epoch": st.best["epoch"], "train_seconds": train_seconds, "device": str(device),
                  "history": st.history}
    data_meta = {"n_train_boxed": len(data.pos), "n_train_negatives": len(data.neg)}
    metrics = finalize_detector(loop.ema, cfg, full, out, train_meta, data_meta, progress=progress, log=log)
    state_path.unlink(missing_ok=True)
    return DetTrainResult(out=out, history=st.history, metrics=metrics, seconds=time.perf_counter() - t_start)


@dataclass
class _DetData:
    """The boxed training images (decoded once) and the negatives (decoded on use), and val's boxed images."""

    pos: list[Sample]
    neg: list[Sample]
    images: list[np.ndarray | None]  # pos's images, then None per negative
    val_boxed: list[Sample]
    val_images: list[np.ndarray]


def _detector_data(cfg: DetTrainConfig, full: Dataset, device: torch.device, log: Callable[[str], None]) -> _DetData:
    train_ds, val_ds = full.split("train"), full.split("val").subset(cfg.max_eval, cfg.seed)
    pos = [s for s in train_ds.samples if s.boxes]
    if cfg.max_train:
        pos = pos[: cfg.max_train]
    neg = [s for s in train_ds.samples if s.label == 0 and not s.boxes]
    if cfg.extra_train:  # training-only sets (synthetic dashcam frames): boxed cones and frames without roadwork
        from ..fit.train import open_extra_train

        extra = open_extra_train(cfg.extra_train).samples
        pos += [s for s in extra if s.boxes and s.label == 1][: cfg.max_train]
        neg += [s for s in extra if s.label == 0 and not s.boxes]
    if not pos:
        raise ValueError(f"{full.name}: the train split has no boxed images to train a detector on")
    log(f"data: {full.name}  train: {len(pos)} boxed images ({sum(len(s.boxes) for s in pos)} boxes), "
        f"{len(neg)} negatives (~{int(cfg.neg_ratio * len(pos))} drawn per epoch)  device {device}  recipe {cfg.recipe}")
    # boxed images decoded once (~250 KB each at StreetWork's 224 px short side); negatives on use
    images: list[np.ndarray | None] = [s.load() for s in pos] + [None] * len(neg)
    val_boxed = [s for s in val_ds.samples if s.boxes]
    return _DetData(pos, neg, images, val_boxed, [s.load() for s in val_boxed])


@dataclass
class _DetLoop:
    """A detector run's networks, optimiser, training set and step schedule."""

    model: ConeDetector
    ema: ConeDetector
    opt: torch.optim.Optimizer
    dset: ConeTrainSet
    rng: np.random.Generator  # draws each epoch's negatives
    n_neg: int  # negatives per epoch
    total: int
    workers: int
    device: torch.device
    amp: bool


def _detector_loop(cfg: DetTrainConfig, data: _DetData, device: torch.device, log: Callable[[str], None]) -> _DetLoop:
    """The detector (training sizes) and its EMA copy (inference size), AdamW with the backbone at
    ``backbone_lr_mult`` x the learning rate (no weight decay on biases and norms), the training set."""
    from .model import detector_summary

    model = ConeDetector(cfg.detector_config(), pretrained=True).to(device)
    model.set_sizes(cfg.train_sizes, cfg.max_size)
    ema = frozen_copy(model)
    ema.set_sizes(cfg.min_size, cfg.max_size)
    summ = detector_summary(model)
    log(f"detector: FCOS on {cfg.backbone}, strides {summ['strides']}, {summ['params'] / 1e6:.2f} M params "
        f"({summ['trainable'] / 1e6:.2f} M trainable), {ema.gflops():.2f} GFLOPs at {cfg.min_size} px (381x224 frame)")
    body_params = [p for p in model.fcos.backbone.body.parameters() if p.requires_grad]
    body_ids = {id(p) for p in body_params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in body_ids]

    def groups(ps, mult):
        return [{"params": [p for p in ps if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr_mult": mult},
                {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0, "lr_mult": mult}]

    opt = torch.optim.AdamW(groups(body_params, cfg.backbone_lr_mult) + groups(rest, 1.0), lr=cfg.lr)
    n_neg = min(len(data.neg), int(round(cfg.neg_ratio * len(data.pos))))
    total = total_steps(max(1, (len(data.pos) + n_neg) // cfg.batch_size), cfg.epochs, cfg.max_steps)
    return _DetLoop(model, ema, opt, ConeTrainSet(data.pos + data.neg, cfg, data.images), np.random.default_rng(cfg.seed),
                    n_neg, total, loader_workers(cfg.num_workers, device), device, cfg.amp and device.type == "cuda")


@dataclass
class _DetState:
    """What goes on from epoch to epoch (and into ``train_state.pt`` after each, for --resume)."""

    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    step: int = 0
    epoch: int = 0  # epochs done


def _resume(state_path: Path, cfg: DetTrainConfig, loop: _DetLoop, log: Callable[[str], None]) -> _DetState:
    st = torch.load(state_path, map_location=loop.device, weights_only=False)
    if st.get("cfg") != _resume_key(cfg):
        raise ValueError(f"{state_path} was written by a run with other settings; remove it or drop --resume")
    loop.model.load_state_dict(st["model"])
    loop.ema.load_state_dict(st["ema"])
    loop.opt.load_state_dict(st["opt"])
    loop.rng.bit_generator.state = st["rng"]
    torch.set_rng_state(st["torch_rng"])
    log(f"resumed from {state_path}: epoch {st['epoch']}, step {st['step']}")
    return _DetState(st["history"], st["best"], st["step"], st["epoch"])


def _save_state(state_path: Path, cfg: DetTrainConfig, loop: _DetLoop, st: _DetState) -> None:
    torch.save({"epoch": st.epoch, "step": st.step, "model": loop.model.state_dict(), "ema": loop.ema.state_dict(),
                "opt": loop.opt.state_dict(), "rng": loop.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "history": st.history, "best": st.best, "cfg": _resume_key(cfg)}, state_path.with_suffix(".tmp"))
    state_path.with_suffix(".tmp").replace(state_path)


def _detector_epoch(cfg: DetTrainConfig, loop: _DetLoop, data: _DetData, epoch: int, st: _DetState,
                    progress: Progress | None, log: Callable[[str], None]) -> dict:
    """One epoch: every boxed image and a fresh draw of negatives; the epoch's record (mean losses)."""
    n_pos = len(data.pos)
    neg_idx = (n_pos + loop.rng.choice(len(data.neg), size=loop.n_neg, replace=False)).tolist() if loop.n_neg else []
    loop.dset.order = list(range(n_pos)) + neg_idx
    loop.dset.epoch = epoch
    loader = torch.utils.data.DataLoader(
        loop.dset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=loop.workers, collate_fn=_collate,
        generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch), pin_memory=loop.device.type == "cuda",
    )
    loop.model.train()
    sums: dict[str, float] = {}
    n_batches = 0
    t_epoch = time.perf_counter()
    for xs, ts in loader:
        if st.step >= loop.total:
            break
        f = _lr_factor(st.step, loop.total, cfg.warmup_steps)
        for g in loop.opt.param_groups:
            g["lr"] = cfg.lr * g["lr_mult"] * f
        losses = _detector_batch(cfg, loop, xs, ts)
        if losses is None:
            log(f"  step {st.step}: non-finite loss; batch skipped")
            loop.opt.zero_grad(set_to_none=True)
            st.step += 1
            continue
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in loop.opt.param_groups for p in g["params"]], cfg.grad_clip)
        loop.opt.step()
        ema_update(loop.ema, loop.model, st.step, cfg.ema_decay)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        n_batches += 1
        st.step += 1
        if progress:
            progress(f"detector epoch {epoch + 1}/{cfg.epochs}", st.step, loop.total)
    return {"epoch": epoch + 1, "step": st.step, "seconds": round(time.perf_counter() - t_epoch, 1),
            **{k: v / max(1, n_batches) for k, v in sums.items()}}


def _detector_batch(cfg: DetTrainConfig, loop: _DetLoop, xs: list, ts: list) -> dict[str, torch.Tensor] | None:
    """Forward and backward of one batch (gradients accumulated); its losses by name plus ``loss``, their sum
    (None when a loss is not finite)."""
    device = loop.device
    xs = [x.to(device, non_blocking=True).float().div_(255.0) for x in xs]
    ts = [{k: v.to(device) for k, v in t.items()} for t in ts]
    loop.opt.zero_grad(set_to_none=True)
    # pad_free: one image per forward pass (gradients accumulated), so no image is padded to its
    # batch-mates' size: training sees what inference sees (detect() batches only same-size images)
    parts = [([x], [t]) for x, t in zip(xs, ts)] if cfg.pad_free else [(xs, ts)]
    losses: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), device=device)
    for px, pt in parts:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=loop.amp):
            li = loop.model(px, pt)
        w = len(px) / len(xs)
        part = sum(v.float() for v in li.values()) * w
        if not torch.isfinite(part):
            return None
        part.backward()
        loss = loss + part.detach()
        for k, v in li.items():
            losses[k] = losses.get(k, torch.zeros((), device=device)) + v.detach().float() * w
    return {**losses, "loss": loss} if losses else None


def _resume_key(cfg: DetTrainConfig) -> dict:
    """The settings a resumed run must share with the run that wrote the state."""
    skip = {"resume", "threads", "num_workers", "evaluate_test", "speed_images", "evidence_views", "max_eval"}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k not in skip}


def finalize_detector(model: ConeDetector, cfg: DetTrainConfig, full: Dataset, out: str | Path, train_meta: dict,
                      data_meta: dict | None = None, progress: Progress | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """From a trained detector to a bundle: the count threshold (val box F1), the evidence scorer and exit
    threshold (val evidence), detection metrics on val (and test, reported only), speed; writes the
    bundle (one detector tier) and ``detection_metrics.json``. Used after training and by
    ``calibrate-detector`` (the same steps on an existing bundle's detector)."""
    from ..cascade.bundle import Bundle
    from ..cascade.runtime import Cascade, ExitPoint, FinalRule, LastTierFusion
    from .tier import DetectorTier

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = model.device
    amp = cfg.amp and device.type == "cuda"
    model.set_sizes(cfg.min_size, cfg.max_size)
    val_ds = full.split("val").subset(cfg.max_eval, cfg.seed)
    val_ev = run_split(model, val_ds, amp=amp, progress=progress, desc="detect val")
    op = operating_point(val_ev.gts(val_ev.boxed()), [val_ev.dets[i] for i in val_ev.boxed()])
    fit = fit_evidence(model, val_ev, op["threshold"], cfg.evidence_views, seed=0, amp=amp, progress=progress)
    log(f"count threshold {op['threshold']:.3f} (val box F1 {op['f1']:.3f}); evidence scorer val clean AUROC "
        f"{fit['report']['clean']['auroc']:.4f}, exit threshold {fit['threshold']:.3f}")

    metrics: dict = {"val": evaluate_detector(model, val_ev, op["threshold"]), "operating_point_val": op,
                     "evidence_fit_val": fit["report"]}
    if cfg.evaluate_test:
        test_ds = full.split("test").subset(cfg.max_eval, cfg.seed)
        test_ev = run_split(model, test_ds, amp=amp, progress=progress, desc="detect test")
        metrics["test"] = evaluate_detector(model, test_ev, op["threshold"])
        speed_imgs = [test_ev.images[i] for i in test_ev.boxed()][: cfg.speed_images]
    else:
        speed_imgs = [val_ev.images[i] for i in val_ev.boxed()][: cfg.speed_images]
    metrics["speed"] = {"device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
                        "n_images": len(speed_imgs), "min_size": cfg.min_size,
                        **measure_speed(model, speed_imgs, amp=amp)}
    for split in ("val", "test"):
        if split in metrics:
            r = metrics[split]
            log(f"{split}: mAP@0.5 {r['map50']:.4f}  mAP@0.5:0.95 {r['map']:.4f}  on {r['n_images_with_boxes']} images / "
                f"{r['n_boxes']} boxes; negatives with a detection >= {op['threshold']:.2f}: "
                f"{r['negatives']['images_with_fp']:.3f} ({r['negatives']['fp_per_image']:.3f} per image)")
    log("speed: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["speed"].items() if k.startswith("ms_")) + f" on {device}")

    cpu_model = copy.deepcopy(model).float().cpu()
    name = f"cones-{cfg.backbone}@{cfg.min_size}"
    tier = DetectorTier(name, cpu_model, fit["evidence"], fit["scorer"], gflops=cpu_model.gflops(), device=torch.device("cpu"))
    cascade = Cascade([tier], [ExitPoint(LastTierFusion(), fit["threshold"], FinalRule())])
    meta = {
        "kind": "detector",
        "data": {"dataset": str(cfg.data or "default StreetWork"), "fit_split": "train", "select_split": "val",
                 "calibrate_on": f"val clean + {cfg.evidence_views} challenge views (seed 0)", **(data_meta or {})},
        "metrics": metrics,
        "train": {**train_meta, "finalize_seconds": time.perf_counter() - t0},
    }
    Bundle(cascade, meta).save(out)
    (out / "detection_metrics.json").write_text(json.dumps(metrics, indent=2, default=_jsonable))
    return metrics


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)
