"""CLI sub-commands of the detection part: ``train-detector``, ``eval-detector``, ``coco-context``.

``register(app, bench_app)`` adds them to the ``roadcascade`` command (listed in cli._COMMAND_MODULES).
Importing this module also registers the ``detector`` and ``coco_context`` tier kinds and the
``cone_verify`` rule, so ``roadcascade eval/predict`` can load bundles that use them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from ..detect.config import DetTrainConfig
from .console import console, progress_bar
from .defaults import default_of
from ..detect import tier as _tier  # noqa: F401  (registers tier kind "detector" and rule "cone_verify")
from ..detect import yolox as _yolox  # noqa: F401  (registers tier kind "coco_context")


def _console():
    return console


def _sizes(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def train_detector_cmd(
    out: Path = typer.Option(Path("runs/detector"), help="bundle directory to write (one detector tier)"),
    recipe: str = typer.Option(default_of(DetTrainConfig, "recipe"), help="cpu (1 thread, ~20-30 min) | gpu (one CUDA GPU, AMP, bigger model and batch)"),
    data: Optional[str] = typer.Option(None, help="StreetWork manifest dir (default $ROADCASCADE_DATA or ../shared/data/streetwork)"),
    backbone: Optional[str] = typer.Option(None, help="zoo backbone (default lite0)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda (default: the recipe's)"),
    epochs: Optional[int] = typer.Option(None, min=1),
    batch_size: Optional[int] = typer.Option(None, min=1),
    lr: Optional[float] = typer.Option(None, min=0.0),
    min_size: Optional[int] = typer.Option(None, help="inference short side in px"),
    train_sizes: Optional[str] = typer.Option(None, help="training short sides, comma-separated, e.g. 224,256,288"),
    fpn_channels: Optional[int] = typer.Option(None, help="FPN/head width (multiple of 32)"),
    extra_train: list[str] = typer.Option([], "--extra-train", help="a training-only manifest (e.g. `roadcascade synth` "
                                          "output: its boxed cones and its frames without roadwork); repeatable"),
    native_cap: Optional[int] = typer.Option(None, min=32, help="at inference, see larger photos at their own short side "
                                             "up to this many px (never below --min-size)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (cpu recipe: 1)"),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers (default 0 on CPU, 8 on CUDA)"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="bf16 autocast on CUDA"),
    seed: Optional[int] = typer.Option(None),
    max_train: Optional[int] = typer.Option(None, help="use only this many boxed training images (smoke runs)"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimiser steps"),
    max_eval: Optional[int] = typer.Option(None, help="evaluate on a stratified subset of val/test (smoke runs)"),
    evidence_views: Optional[int] = typer.Option(None, help="challenge views per val image for the evidence scorer"),
    test: bool = typer.Option(default_of(DetTrainConfig, "evaluate_test"), "--test/--no-test",
                              help="report test detection metrics at the end (never used to select)"),
    resume: bool = typer.Option(default_of(DetTrainConfig, "resume"), help="go on from OUT/train_state.pt (saved after every epoch) if present"),
) -> None:
    """Train the traffic-cone detector (FCOS on a zoo backbone) and write a bundle with its detector tier."""
    from ..detect.train import make_config, train_detector

    console = _console()
    try:
        cfg = make_config(recipe, data=data, backbone=backbone, device=device, epochs=epochs, batch_size=batch_size, lr=lr,
                          min_size=min_size, train_sizes=_sizes(train_sizes), fpn_channels=fpn_channels, threads=threads,
                          extra_train=tuple(extra_train) or None, native_cap=native_cap,
                          num_workers=workers, amp=amp, seed=seed, max_train=max_train, max_steps=max_steps,
                          max_eval=max_eval, evidence_views=evidence_views, evaluate_test=test, resume=resume)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)

    with progress_bar() as cb:
        res = train_detector(cfg, out, progress=cb, log=console.print)
    console.print(f"detector bundle written to [bold]{out}[/bold] in {res.seconds / 60:.1f} min "
                  f"(metrics: {out / 'detection_metrics.json'})")


def calibrate_detector_cmd(
    bundle: Path = typer.Option(..., help="detector bundle to recalibrate in place (or see --out)"),
    out: Optional[Path] = typer.Option(None, help="write the recalibrated bundle here instead"),
    data: Optional[str] = typer.Option(None, help="dataset (default StreetWork)"),
    device: str = typer.Option("auto"),
    threads: Optional[int] = typer.Option(default_of(DetTrainConfig, "threads"), help="torch CPU threads"),
    evidence_views: Optional[int] = typer.Option(None, help="challenge views per val image for the evidence scorer"),
    max_eval: Optional[int] = typer.Option(None, help="stratified subset of val/test (smoke runs)"),
    test: bool = typer.Option(default_of(DetTrainConfig, "evaluate_test"), "--test/--no-test",
                              help="report test detection metrics (never used to select)"),
) -> None:
    """Redo the val-fitted parts of a detector bundle (count threshold, evidence scorer, exit threshold) and
    its val/test detection metrics with the current code, keeping the trained weights."""
    import torch

    from ..cascade.bundle import Bundle
    from ..io.data import open_dataset
    from ..models.preprocess import pick_device
    from ..detect.tier import DetectorTier
    from ..detect.train import config_from_meta, finalize_detector

    console = _console()
    if threads:
        torch.set_num_threads(threads)
    b = Bundle.load(bundle, device=pick_device(device))
    t = next((x for x in b.cascade.tiers if isinstance(x, DetectorTier)), None)
    if t is None:
        console.print(f"[red]error:[/red] {bundle} has no detector tier")
        raise typer.Exit(2)
    train_meta = dict(b.meta.get("train", {}))
    cfg = config_from_meta(train_meta, data=data, evidence_views=evidence_views, max_eval=max_eval, evaluate_test=test,
                           min_size=t.detector.cfg.min_size, max_size=t.detector.cfg.max_size, backbone=t.detector.cfg.backbone)
    data_meta = {k: v for k, v in (b.meta.get("data") or {}).items() if k.startswith("n_train")}
    train_meta["recalibrated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    with progress_bar() as cb:
        finalize_detector(t.detector, cfg, open_dataset(data), out or bundle, train_meta, data_meta, progress=cb, log=console.print)
    console.print(f"recalibrated detector bundle written to [bold]{out or bundle}[/bold]")


def eval_detector_cmd(
    bundle: Path = typer.Option(..., help="bundle directory with a detector tier"),
    splits: str = typer.Option("val,test", help="comma-separated splits"),
    data: Optional[str] = typer.Option(None, help="dataset (default StreetWork)"),
    device: str = typer.Option("auto"),
    threads: Optional[int] = typer.Option(default_of(DetTrainConfig, "threads"), help="torch CPU threads"),
    threshold: Optional[float] = typer.Option(None, help="operating score threshold (default: the tier's count threshold)"),
    max_eval: Optional[int] = typer.Option(None, help="stratified subset of each split"),
    speed_images: int = typer.Option(default_of(DetTrainConfig, "speed_images"), help="images timed for ms/image (0: skip)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics as JSON here"),
) -> None:
    """Detection metrics of a bundle's detector tier: mAP@0.5 and mAP@0.5:0.95 on the boxed images of each
    split, false positives on its negatives, and ms per image."""
    import torch

    from ..cascade.bundle import Bundle, BundleError
    from ..io.data import DataError, open_dataset
    from ..models.preprocess import pick_device
    from ..detect.evaluate import evaluate_detector, measure_speed, run_split
    from ..detect.tier import DetectorTier

    console = _console()
    if threads:
        torch.set_num_threads(threads)
    try:
        b = Bundle.load(bundle, device=pick_device(device))
        full = open_dataset(data)
    except (BundleError, DataError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    tiers = [t for t in b.cascade.tiers if isinstance(t, DetectorTier)]
    if not tiers:
        console.print(f"[red]error:[/red] {bundle} has no detector tier")
        raise typer.Exit(2)
    t = tiers[0]
    thr = t.evidence.count_threshold if threshold is None else threshold
    report: dict = {"bundle": str(bundle), "tier": t.name, "threshold": thr}
    for split in [s for s in splits.split(",") if s]:
        ev = run_split(t.detector, full.split(split).subset(max_eval))
        r = evaluate_detector(t.detector, ev, thr)
        report[split] = r
        console.print(f"{split}: mAP@0.5 {r['map50']:.4f}  mAP@0.5:0.95 {r['map']:.4f}  ({r['n_images_with_boxes']} images, "
                      f"{r['n_boxes']} boxes); P/R at {thr:.2f}: {r['at_threshold']['precision']:.3f}/"
                      f"{r['at_threshold']['recall']:.3f}; negatives with a detection: {r['negatives']['images_with_fp']:.3f} "
                      f"of {r['negatives']['n_images']}")
        if speed_images and "speed" not in report:
            imgs = [ev.images[i] for i in ev.boxed()][:speed_images]
            report["speed"] = {"device": str(t.device), "threads": torch.get_num_threads(), "n_images": len(imgs),
                               **measure_speed(t.detector, imgs)}
            console.print("speed: " + ", ".join(f"{k} {v:.1f}" for k, v in report["speed"].items() if k.startswith("ms_")))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2, default=float))
        console.print(f"metrics: {json_out}")


def coco_context_cmd(
    out: Path = typer.Option(Path("runs/coco_context"), help="bundle directory to write (one coco_context tier)"),
    model_path: Optional[Path] = typer.Option(None, help="yolox_nano.onnx (default ../shared/models/yolox_nano.onnx)"),
    data: Optional[str] = typer.Option(None, help="dataset (default StreetWork)"),
    views: int = typer.Option(4, min=0, help="seed-0 challenge views per val image used to fit the scorer"),
    count_threshold: float = typer.Option(0.3, help="a COCO detection at or above this score is counted"),
    threads: int = typer.Option(1, help="onnxruntime threads"),
    max_eval: Optional[int] = typer.Option(None, help="stratified subset of val (smoke runs)"),
) -> None:
    """Build the optional COCO context tier (YOLOX-Nano counts of persons, vehicles, lights, signs), fitting its
    evidence scorer on val; writes a bundle of that one tier (not part of any cascade by default)."""
    import numpy as np

    from ..cascade.bundle import Bundle
    from ..cascade.calibration import best_threshold, fold
    from ..cascade.runtime import Cascade, ExitPoint, FinalRule, LastTierFusion
    from ..io.challenge import challenge_views
    from ..io.data import open_dataset
    from ..metrics import summarize
    from ..detect.yolox import CocoContextTier, YoloxNano, context_features

    console = _console()
    model = YoloxNano(model_path, threads=threads)
    tier = CocoContextTier(model=model, count_threshold=count_threshold)
    val = open_dataset(data, "val").subset(max_eval)
    imgs, ys = [], []
    for s in val.samples:
        im = s.load()
        imgs.append(im)
        ys.append(s.label)
        for v in challenge_views(im, seed=0, key=s.key, n=views) if views else []:
            imgs.append(v)
            ys.append(s.label)
    dets = []
    with progress_bar() as cb:
        for i, im in enumerate(imgs):
            dets.append(model.detect_one(im))
            cb("yolox on val", i + 1, len(imgs))
    x, y = context_features(dets, count_threshold), np.array(ys)
    tier.scorer.fit(x, y)
    p = tier.scorer.prob(x)
    thr = best_threshold(p, y)
    rep = summarize(y, fold(p, thr)).as_dict()
    meta = {"kind": "coco_context", "data": {"fit_split": "val", "views": views, "n": len(y)},
            "metrics": {"val_fit": rep}}
    Bundle(Cascade([tier], [ExitPoint(LastTierFusion(), thr, FinalRule())]), meta).save(out)
    console.print(f"coco_context tier written to [bold]{out}[/bold]; val (fit) MCC {rep['mcc']:.3f} AUROC {rep['auroc']:.3f}; "
                  f"export decoded: {model.decoded}")


def detector_effect_cmd(
    classifier: Path = typer.Option(..., help="bundle with the classifier tier (e.g. a stage-1 bundle)"),
    detector: Path = typer.Option(Path("runs/detector"), help="bundle with the detector tier (train-detector)"),
    data: Optional[str] = typer.Option(None, help="dataset (default StreetWork)"),
    n_views: int = typer.Option(4, min=1, help="challenge views per image"),
    batch_size: int = typer.Option(32, min=1),
    max_images: Optional[int] = typer.Option(None, help="stratified subset of each split (smoke runs)"),
    device: str = typer.Option("auto"),
    threads: Optional[int] = typer.Option(default_of(DetTrainConfig, "threads"), help="torch CPU threads"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON here"),
) -> None:
    """Classifier alone vs with the detector tier (stacked, verify rule, confidence-gated), fitted on val,
    reported on test clean/challenge and the dashcam subset."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..cascade.bundle import Bundle
    from ..models.preprocess import pick_device
    from ..detect.effect import measure_effect

    console = _console()
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    cb_, db_ = Bundle.load(classifier, device=dev), Bundle.load(detector, device=dev)
    with progress_bar() as cb:
        rep = measure_effect(cb_, db_, data=data, n_views=n_views, batch_size=batch_size, max_images=max_images,
                             progress=cb, log=console.print)
    t = Table(title="detector tier: measured effect (fitted on val, reported on test)")
    for c in ("views", "policy", "MCC", "acc", "reward", "dashcam MCC", "dashcam acc", "detector rate", "GFLOPs"):
        t.add_column(c, justify="right")
    for key in ("test/clean", "test/challenge"):
        for name, r in rep["results"][key].items():
            if name == "ms":
                continue
            d = r.get("dashcam", {})
            t.add_row(key, name, f"{r['all']['mcc']:.4f}", f"{r['all']['accuracy']:.4f}", f"{r['all']['reward']:.4f}",
                      f"{d.get('mcc', float('nan')):.4f}", f"{d.get('accuracy', float('nan')):.4f}",
                      f"{r['detector_rate']:.3f}", f"{r['gflops']:.2f}")
    Console(width=150).print(t)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rep, indent=2, default=float))
        console.print(f"report: {json_out}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("train-detector")(train_detector_cmd)
    app.command("eval-detector")(eval_detector_cmd)
    app.command("calibrate-detector")(calibrate_detector_cmd)
    app.command("coco-context")(coco_context_cmd)
    bench_app.command("detector-effect")(detector_effect_cmd)
