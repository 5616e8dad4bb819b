"""The cone detector's training config, its two recipes, and building one from options or a bundle's metadata.

Light to import (no model code): the CLI reads its option defaults from here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..fit.config import OptimOptions

__all__ = ["DetTrainConfig", "RECIPES", "make_config", "config_from_meta"]


@dataclass
class DetTrainConfig(OptimOptions):
    recipe: str = "cpu"
    # network
    backbone: str = "lite0"
    fpn_channels: int = 64
    head_convs: int = 2
    freeze_blocks: int = 2
    min_size: int = 256  # inference short side (stored in the tier)
    max_size: int = 512
    train_sizes: tuple[int, ...] = (224, 256, 288)
    # training-only manifests (the synthetic dashcam set: its boxed cones as positives, its frames without
    # roadwork (distractor objects pasted) as negatives); any val/test row is refused
    extra_train: tuple[str, ...] = ()
    native_cap: int | None = None  # inference: larger photos at their own short side up to this (DetectorConfig)
    # optimisation (the shared fields with the detector's defaults; keyword-only, as they are in OptimOptions)
    epochs: int = field(default=10, kw_only=True)
    batch_size: int = field(default=8, kw_only=True)
    lr: float = field(default=1e-3, kw_only=True)
    weight_decay: float = field(default=1e-4, kw_only=True)
    ema_decay: float = field(default=0.99, kw_only=True)
    backbone_lr_mult: float = 0.5
    warmup_steps: int = 60
    grad_clip: float = 10.0
    neg_ratio: float = 0.3
    pad_free: bool = True  # one image per forward pass (no batch padding; matches inference)
    resume: bool = False  # go on from out/train_state.pt (written after every epoch) if present
    # augmentation
    crop_prob: float = 0.5
    crop_min: float = 0.55
    min_visible: float = 0.4
    color_prob: float = 0.5
    distort_prob: float = 0.35
    jpeg_prob: float = 0.3
    # run (seed, device, data, max_train: boxed training images, max_steps: the shared fields)
    threads: int | None = field(default=1, kw_only=True)  # torch CPU threads (None: torch's default)
    amp: bool = True  # bf16 autocast on CUDA only
    num_workers: int | None = None  # DataLoader workers (default: 0 on CPU, 8 on CUDA)
    max_eval: int | None = None  # stratified subset of val/test images for evaluation (smoke runs)
    eval_from: float = 0.5  # evaluate val mAP from this fraction of the epochs on
    evidence_views: int = 4  # challenge views per val image for the evidence scorer (0: clean only)
    evaluate_test: bool = True  # report (never select on) test detection metrics at the end
    speed_images: int = 64

    def detector_config(self):
        from .model import DetectorConfig

        return DetectorConfig(backbone=self.backbone, fpn_channels=self.fpn_channels, head_convs=self.head_convs,
                              freeze_blocks=self.freeze_blocks, min_size=self.min_size, max_size=self.max_size,
                              native_cap=self.native_cap)


# The two recipes: "cpu" fits a shared 2-core machine (one thread: ~20 min of training on a quiet machine);
# "gpu" is for one H100 (bigger head, 320 px, 30 epochs, bf16 autocast, 8 loader workers).
RECIPES: dict[str, dict] = {
    "cpu": {},
    "gpu": dict(fpn_channels=96, head_convs=3, freeze_blocks=1, min_size=320, max_size=640,
                train_sizes=(256, 288, 320, 352, 384), epochs=30, batch_size=16, lr=1e-3, ema_decay=0.998,
                warmup_steps=100, neg_ratio=0.4, threads=None, device="cuda", amp=True),
}


def _known(kw: dict) -> dict:
    """``kw`` with ``train_sizes`` as a tuple of ints; ValueError naming the unknown options."""
    bad = set(kw) - {f.name for f in fields(DetTrainConfig)}
    if bad:
        raise ValueError(f"unknown detector training options: {sorted(bad)}")
    if "train_sizes" in kw:
        kw["train_sizes"] = tuple(int(s) for s in kw["train_sizes"])
    if "extra_train" in kw:
        kw["extra_train"] = tuple(str(p) for p in kw["extra_train"])
    return kw


def make_config(recipe: str = "cpu", **overrides) -> DetTrainConfig:
    """The recipe's config with the options given (None: the recipe's)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return DetTrainConfig(recipe=recipe, **_known({**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}))


def config_from_meta(train_meta: dict, **overrides) -> DetTrainConfig:
    """The DetTrainConfig a bundle was trained with (its ``train`` metadata), with overrides."""
    names = {f.name for f in fields(DetTrainConfig)}
    kw = {k: v for k, v in train_meta.items() if k in names}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return DetTrainConfig(**_known(kw))
