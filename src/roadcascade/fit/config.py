"""The fitting commands' configs (``train``, ``build``, ``distill``) and the options they share.

Kept apart from the training code and light to import (no timm, no model code): the CLI reads its option
defaults from these dataclasses when it is imported (:func:`roadcascade.cli.defaults.default_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..cascade.rules import SEARCHABLE_RULES
from ..io.challenge import ChallengeConfig

__all__ = ["RunOptions", "OptimOptions", "TrainConfig", "BuildConfig", "DistillConfig", "DEFAULT_TIERS", "student_spec",
           "apply_threads"]

DEFAULT_TIERS = "lite0@128,lite0@224,tta(lite0@224,n=4..8)"


@dataclass(kw_only=True)
class RunOptions:
    """What every fitting run is told (train, build, distill, the detector): data, seed, where it runs, caps.

    Keyword-only (here and in :class:`OptimOptions`), so that a config's own first fields keep their positions."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    data: str | None = None  # dataset (default $ROADCASCADE_DATA or ../shared/data/streetwork)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    max_train: int | None = None  # train on a subset of this many images (smoke runs)
    max_steps: int | None = None  # stop after this many optimiser steps (tests, smoke runs)

    def run_options(self) -> dict:
        """These shared fields as keywords, to hand them on to another config (``TrainConfig(**cfg.run_options(), ...)``)."""
        return {f.name: getattr(self, f.name) for f in fields(RunOptions)}


@dataclass(kw_only=True)
class OptimOptions(RunOptions):
    """The optimiser loop's settings, shared by the classifier, the student and the detector (AdamW, EMA)."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 6e-4
    weight_decay: float = 0.05
    ema_decay: float = 0.995


def apply_threads(opts: RunOptions) -> None:
    """``torch.set_num_threads(opts.threads)`` when it is set."""
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)


@dataclass
class TrainConfig(OptimOptions):
    model: str = "lite0"
    input_size: int | None = None  # training resolution (default: the model's input size)
    eval_size: int | None = None  # inference resolution stored in the bundle (default: the model's)
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    clean_prob: float = 0.3  # share of training samples seen as clean (resized) images, the rest as challenge views
    train_split: str = "train"
    val_split: str = "val"
    val_views: int = 4
    val_seed: int = 0
    calibrate_on: str = "challenge"  # challenge | clean | both
    max_val: int | None = None
    eval_from: float = 0.67  # evaluate checkpoints from this fraction of the epochs on (the last third)
    num_workers: int | None = None
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
class BuildConfig(RunOptions):
    tiers: str = DEFAULT_TIERS
    budget: str = "35%"
    mode: str = "mcc"  # mcc: best MCC under the budget | guaranteed: Learn-then-Test policy
    epsilon: float = 0.05
    delta: float = 0.1
    cal_fraction: float = 0.5
    pvalue: str = "hb"
    rules: tuple[str, ...] = SEARCHABLE_RULES
    fusion: str = "stacking"
    orders: str = "cost"
    max_tiers: int | None = None
    grid: int = 16
    folds: int = 5
    mcc_slack: float = 0.0
    # data (fit on val challenge views only)
    val_split: str = "val"
    n_views: int = 4
    val_seed: int = 0
    max_val: int | None = None
    # compute
    batch_size: int = 64
    work: str | None = None  # default: <out>/../<out name>-work
    # training of tiers without weights (through the stage-1 trainer; max_train, max_steps above)
    train_epochs: int = 8
    train_size: int | None = None
    train_batch_size: int = 32


@dataclass
class DistillConfig(OptimOptions):
    teacher: str  # bundle directory
    student: str = "lite0"  # MODEL or MODEL@SIZE (SIZE: the student's inference resolution)
    input_size: int | None = None  # training resolution (default: the student's SIZE)
    extra: tuple[str, ...] = ()  # image folders (labels not needed) or training-only manifests (synthetic)
    temperature: float = 2.0
    hard_weight: float = 0.3  # weight of the label loss on labelled images (0: soft targets only)
    views: int = 3  # teacher views per training image: the image + views-1 challenge views
    teacher_mode: str = "ensemble"  # ensemble: every tier, last exit's fusion | cascade: the bundle's own early exits
    label_smoothing: float = 0.1
    max_extra: int | None = None
    max_val: int | None = None
    val_views: int = 4
    cache: str | None = None  # teacher-target cache directory (default: <out>/../distill-cache)

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0.0 <= self.hard_weight <= 1.0 or self.views < 1:
            raise ValueError("need temperature > 0, hard_weight in [0, 1] and views >= 1")
        if self.teacher_mode not in ("ensemble", "cascade"):
            raise ValueError(f"teacher_mode must be ensemble or cascade, got {self.teacher_mode!r}")
        student_spec(self.student)  # ValueError for an unknown model or a bad size


def student_spec(student: str) -> tuple[str, int]:
    """``MODEL[@SIZE]`` -> (zoo model name, inference size)."""
    from ..models.zoo import get_spec  # timm: imported on use, not with the CLI

    name, _, size = student.partition("@")
    try:
        spec = get_spec(name)
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None
    if size and not (size.isdigit() and 32 <= int(size) <= 1024):
        raise ValueError(f"student size must be an integer in [32, 1024], got {size!r}")
    return name, int(size) if size else spec.input_size
