"""The ``roadcascade`` command: train, eval, predict, quickstart, zoo (and later parts' sub-commands)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Optional

import typer
from rich.table import Table

from ..fit.config import BuildConfig, TrainConfig
from ..fit.guard import GuardConfig
from ..io.challenge import ChallengeConfig
from ..io.synth.engine import SynthConfig
from .console import console, fail as _fail, out_console, progress_bar
from .defaults import default_of, given

app = typer.Typer(
    help="roadcascade: is there roadwork in this street image? Train, calibrate, evaluate and serve an adaptive cascade.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks: load tests against a server, GPU throughput, CPU decode of native-size images.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

DEFAULT_QUICKSTART = Path("runs/quickstart")
# The synthetic set and the dashcam style are off in the quickstart recipe: at its 160 px they did not raise
# night-dev recall and cost dashcam false positives (docs/PERFORMANCE.md, "Dashcam roadwork"); they pay at 320 px.
QUICKSTART_SYNTH = 0
QUICKSTART_STYLE_P = 0.0
QUICKSTART_EPOCHS = 6
QUICKSTART_INPUT = 160  # training resolution
QUICKSTART_EVAL = None  # stage-1 inference resolution (None: the model's, 224 for lite0)
QUICKSTART_SQUARES = 3  # non-square frames seen as 3 aspect-preserving squares, max-pooled (docs/DASHCAM.md)
QUICKSTART_VIEW_SCALE = 1.3  # ... each at 1.3x the tier's input size (224 -> 288)
QUICKSTART_GUARD_FPR = 0.02  # open-set guard: thresholds at most where 2 % of val's real dashcam negatives pass (fit/guard.py)


@app.command()
def zoo() -> None:
    """List the registered backbones and where their weights come from."""
    from ..models.zoo import get_spec, list_models

    t = Table(title="model zoo")
    for c in ("name", "arch", "input", "weights", "licence"):
        t.add_column(c)
    for n in list_models():
        s = get_spec(n)
        src = s.weights.pip_name or s.weights.path or s.weights.kind
        t.add_row(n, s.arch, str(s.input_size), src, s.license)
    out_console.print(t)


@app.command()
def train(
    model: str = typer.Option(default_of(TrainConfig, "model"), help="zoo model name (see `roadcascade zoo`)"),
    out: Path = typer.Option(Path("runs/train/bundle"), help="bundle directory to write"),
    data: Optional[str] = typer.Option(None, help="dataset: StreetWork manifest dir, image folder or parquet (default $ROADCASCADE_DATA or ../shared/data/streetwork)"),
    input_size: Optional[int] = typer.Option(None, help="training resolution (default: the model's)"),
    eval_size: Optional[int] = typer.Option(None, help="inference resolution stored in the bundle (default: the model's)"),
    epochs: Optional[int] = typer.Option(None, min=1, help=f"epochs (default {default_of(TrainConfig, 'epochs')} for classify; "
                                         "the detector recipe's for detect)"),
    batch_size: Optional[int] = typer.Option(None, min=1, help=f"batch size (default {default_of(TrainConfig, 'batch_size')} for classify)"),
    lr: Optional[float] = typer.Option(None, min=0.0, help=f"peak learning rate (default {default_of(TrainConfig, 'lr')} for classify)"),
    seed: int = typer.Option(default_of(TrainConfig, "seed")),
    device: str = typer.Option(default_of(TrainConfig, "device"), help="auto | cpu | cuda"),
    max_train: Optional[int] = typer.Option(None, help="train on a stratified subset of this many images"),
    max_val: Optional[int] = typer.Option(None, help="select/calibrate on a subset of this many val images"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimiser steps"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch"),
    task: str = typer.Option("classify", help="classify (the stage-1 roadwork classifier) | detect (the traffic-cone detector; see `train-detector --help` for all its options)"),
    extra_train: list[str] = typer.Option([], "--extra-train", help="a training-only manifest to add (e.g. `roadcascade synth` output); repeatable"),
    synth_share: float = typer.Option(default_of(TrainConfig, "synth_share"), min=0.0, max=1.0,
                                      help="share of each epoch drawn from --extra-train sets"),
    style_p: float = typer.Option(default_of(TrainConfig, "style_p"), min=0.0, max=1.0,
                                  help="probability of the dashcam style transform per training image"),
    balance_sources: bool = typer.Option(default_of(TrainConfig, "balance_sources"), "--balance-sources/--no-balance-sources",
                                         help="sqrt-balanced sampling over the real sources"),
    squares: int = typer.Option(default_of(TrainConfig, "squares"), min=1, max=8,
                                help="the bundle sees a non-square image as this many aspect-preserving squares, max-pooled (1: stretched)"),
    view_scale: float = typer.Option(default_of(TrainConfig, "view_scale"), min=0.25, max=4.0,
                                     help="run those squares at this x the input size (a closer look at full frames)"),
    protocol: str = typer.Option(default_of(TrainConfig, "protocol"),
                                 help="challenge protocol of the augmentation and val views: v2.0.4 | letterbox | native"),
) -> None:
    """Fine-tune a zoo backbone for roadwork and write a calibrated stage-1 bundle (or, with --task detect, a cone detector)."""
    from ..fit.train import train as run_train

    if task == "detect":
        from ..detect.train import make_config, train_detector

        try:
            dcfg = make_config("gpu" if pick_device_name(device) == "cuda" else "cpu", data=data, backbone=model, epochs=epochs,
                               batch_size=batch_size, lr=lr, seed=seed, max_train=max_train, max_steps=max_steps, threads=threads,
                               **({"device": device} if device != "auto" else {}))
        except ValueError as e:
            _fail(str(e))
        with progress_bar() as cb:
            res = train_detector(dcfg, out, progress=cb, log=console.print)
        console.print(f"detector bundle written to [bold]{out}[/bold] in {res.seconds:.0f} s")
        return
    if task != "classify":
        _fail(f"--task must be classify or detect, not {task!r}")
    try:
        cfg = TrainConfig(**given(model=model, input_size=input_size, eval_size=eval_size, epochs=epochs, batch_size=batch_size,
                                  lr=lr, seed=seed, device=device, data=data, max_train=max_train, max_val=max_val,
                                  max_steps=max_steps, threads=threads, extra_train=tuple(extra_train), synth_share=synth_share,
                                  style_p=style_p, balance_sources=balance_sources, protocol=protocol, squares=squares,
                                  view_scale=view_scale))
    except ValueError as e:
        _fail(str(e))
    with progress_bar() as cb:
        try:
            res = run_train(cfg, out, progress=cb, log=console.print)
        except ValueError as e:
            _fail(str(e))
    console.print(f"bundle written to [bold]{out}[/bold] in {res.seconds:.0f} s")


def pick_device_name(device: str) -> str:
    from ..models.preprocess import pick_device

    return pick_device(device).type


def _print_summary(rows: list[tuple[str, dict]]) -> None:
    t = Table(title="roadcascade evaluation")
    for c in ("split/views", "n", "MCC", "accuracy", "ECE", "AUROC", "reward", "dashcam MCC", "dashcam acc", "img/s"):
        t.add_column(c, justify="right")
    for name, r in rows:
        d = r.get("dashcam") or {}
        t.add_row(name, str(r["n"]), f"{r['mcc']:.4f}", f"{r['accuracy']:.4f}", f"{r['ece']:.4f}", f"{r['auroc']:.4f}",
                  f"{r['reward']:.4f}", f"{d.get('mcc', float('nan')):.4f}", f"{d.get('accuracy', float('nan')):.4f}",
                  f"{r['throughput_img_s']:.1f}")
    out_console.print(t)


@app.command("eval")
def eval_cmd(
    bundle: Path = typer.Option(..., help="bundle directory"),
    split: str = typer.Option("test", help="split name present in the dataset (train/val/test/all ...)"),
    views: str = typer.Option("clean", help="clean | challenge"),
    data: Optional[str] = typer.Option(None, help="dataset (default StreetWork)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics as JSON here"),
    html_out: Optional[Path] = typer.Option(None, "--html", help="write an HTML report here"),
    seed: Optional[int] = typer.Option(None, help="challenge view seed (default 0 on val, 1 on test)"),
    n_views: int = typer.Option(4, min=1, help="challenge views per image"),
    protocol: str = typer.Option(default_of(ChallengeConfig, "protocol"), help="challenge protocol: v2.0.4 (crops), letterbox (2026-04-06: "
                                 "ResizeWithPadding), native (2026-05-03: native size, JPEG q75 only; one view per image)"),
    batch_size: int = typer.Option(32, min=1),
    max_images: Optional[int] = typer.Option(None, help="evaluate a stratified subset"),
    strict: bool = typer.Option(False, help="stop at the first bad row (missing or corrupt image, bad label) "
                                "instead of recording it in the report and going on"),
    device: str = typer.Option("auto"),
    backend: str = typer.Option("auto", help="auto | torch | onnxruntime: how classifier tiers run (onnxruntime needs a bundle from `roadcascade export`)"),
) -> None:
    """Evaluate a bundle the way a validator would; print a summary, write JSON and HTML. Bad rows are listed
    in the JSON (``bad_rows``) and left out of the metrics, unless --strict."""
    from ..cascade.bundle import Bundle, BundleError
    from ..io.data import DataError, open_dataset
    from ..bench.evaluate import evaluate, public
    from ..io.images import BadImage
    from .predict_out import printable
    from ..models.preprocess import pick_device
    from ..bench.report import write_html

    from ..io.challenge import PROTOCOLS

    if views not in ("clean", "challenge"):
        _fail("--views must be clean or challenge")
    if protocol not in PROTOCOLS:
        _fail(f"--protocol must be one of {', '.join(PROTOCOLS)}")
    try:
        b = Bundle.load(bundle, device=pick_device(device), backend=backend)
        ds = open_dataset(data, split, strict=strict).subset(max_images)
    except (BundleError, DataError, FileNotFoundError) as e:
        _fail(str(e))
    try:
        with progress_bar() as cb:
            rep = evaluate(b, ds, views, split, seed=seed, n_views=n_views, batch_size=batch_size, progress=cb, strict=strict,
                           protocol=protocol)
    except (BadImage, OSError) as e:  # --strict: the first bad row stops the run
        _fail(f"bad row: {printable(str(e))} (without --strict it is recorded and skipped)")
    _print_summary([(f"{split} / {views}" + (f" ({protocol})" if views == "challenge" else ""), rep)])
    if rep.get("n_bad"):
        reasons: dict[str, int] = {}
        for r in rep["bad_rows"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        console.print(f"[yellow]{rep['n_bad']} bad row(s) skipped[/yellow]: {json.dumps(reasons)}"
                      + (f" (listed in {json_out})" if json_out else " (pass --json to list them)"))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(public(rep), indent=2))
        console.print(f"metrics: {json_out}")
    if html_out:
        write_html([(f"{split} / {views}", rep)], html_out)
        console.print(f"report: {html_out}")


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="image files"),
    bundle: Path = typer.Option(DEFAULT_QUICKSTART / "bundle", help="bundle directory"),
    trace: bool = typer.Option(False, help="also print each image's trace"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line: file, probability, label (or error)"),
    batch_size: int = typer.Option(32, min=1, help="images decoded and predicted at a time (output streams per batch)"),
    device: str = typer.Option("auto"),
    backend: str = typer.Option("auto", help="auto | torch | onnxruntime: how classifier tiers run (onnxruntime needs a bundle from `roadcascade export`)"),
) -> None:
    """Print P(roadwork) for image files (calibrated and folded: > 0.5 means roadwork). Tab-separated lines
    (file names with control characters escaped) or JSON lines; exit code 1 if any image was bad."""
    from ..cascade.bundle import Bundle, BundleError
    from .predict_out import predict_lines
    from ..models.preprocess import pick_device

    try:
        b = Bundle.load(bundle, device=pick_device(device), backend=backend)
    except (BundleError, FileNotFoundError) as e:
        _fail(str(e))
    bad = 0
    for i in range(0, len(images), batch_size):
        for line, ok in predict_lines(b.cascade, images[i:i + batch_size], trace, as_json):
            bad += not ok
            print(line, flush=True)
    if bad:
        raise typer.Exit(1)


@app.command()
def synth(
    out: Path = typer.Option(Path("runs/synth"), help="directory to write images/, manifest.csv, meta.json, contact_sheet.png"),
    n: int = typer.Option(default_of(SynthConfig, "n"), min=2, help="images to write (half roadwork, half matched negatives)"),
    seed: int = typer.Option(default_of(SynthConfig, "seed")),
    data: Optional[str] = typer.Option(None, help="StreetWork manifest dir (its train split is the only source)"),
    signs: Optional[str] = typer.Option(None, help="sign crops dir (default: signs/ beside the data dir)"),
    cutouts: bool = typer.Option(default_of(SynthConfig, "cutouts"), "--cutouts/--no-cutouts", help="cones cut from the boxed train images"),
    drawn: bool = typer.Option(default_of(SynthConfig, "drawn"), "--drawn/--no-drawn", help="procedurally drawn roadwork objects"),
    road_signs: bool = typer.Option(default_of(SynthConfig, "road_signs"), "--road-signs/--no-road-signs", help="road-works sign crops"),
    portrait: float = typer.Option(default_of(SynthConfig, "portrait"), min=0.0, max=1.0,
                                   help="share of frames cut to a portrait window (a phone held upright)"),
    min_height: float = typer.Option(default_of(SynthConfig, "min_height"), min=0.0, max=0.5,
                                     help="smallest pasted object, as a share of the frame height"),
) -> None:
    """Synthesise dashcam roadwork: objects pasted into real train-split dashcam frames, with matched negatives."""
    from ..io.synth import synthesize

    cfg = SynthConfig(n=n, seed=seed, data=data, signs=signs, cutouts=cutouts, drawn=drawn, road_signs=road_signs,
                      portrait=portrait, min_height=min_height)
    with progress_bar() as cb:
        try:
            synthesize(cfg, out, log=console.print, progress=cb)
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
    console.print(f"contact sheet: {out / 'contact_sheet.png'}")


@app.command("guard")
def guard_cmd(
    bundle: Path = typer.Option(..., help="bundle directory (changed in place)"),
    fpr: float = typer.Option(default_of(GuardConfig, "fpr"), min=0.0, max=0.5,
                              help="share of the reference negatives allowed above each exit's threshold"),
    split: str = typer.Option(default_of(GuardConfig, "split"), help="split of the reference negatives"),
    data: Optional[str] = typer.Option(None, help="dataset (default StreetWork)"),
    device: str = typer.Option("auto"),
) -> None:
    """Open-set guard: lower each exit's threshold to where FPR of val's real dashcam negatives (camvid, gtsdb label 0)
    pass, where that is lower than the fitted one (docs/DASHCAM.md). Run again to re-guard from the fitted thresholds."""
    from ..cascade.bundle import BundleError
    from ..io.data import DataError
    from ..fit.guard import guard_bundle

    try:
        guard_bundle(bundle, GuardConfig(fpr=fpr, split=split, data=data), device=device, log=console.print)
    except (BundleError, DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))


@app.command("eval-dashcam")
def eval_dashcam(
    bundle: Path = typer.Option(..., help="bundle directory"),
    split: str = typer.Option("test", help="split whose real dashcam negatives (camvid, gtsdb label 0) give the false-positive rate"),
    night_dev: Optional[Path] = typer.Option(None, help="night-dev manifest dir (default: night-dev beside the data dir)"),
    data: Optional[str] = typer.Option(None, help="dataset (default StreetWork)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the numbers as JSON here"),
    device: str = typer.Option("auto"),
) -> None:
    """Real dashcam frames: night-dev recall, dashcam false-positive rate, their joint MCC."""
    from ..cascade.bundle import Bundle, BundleError
    from ..io.data import DataError
    from ..models.preprocess import pick_device
    from ..bench.realcam import format_realcam, realcam_report

    try:
        b = Bundle.load(bundle, device=pick_device(device))
        with progress_bar() as cb:
            r = realcam_report(b, split=split, data=data, night_dev=night_dev, progress=cb)
    except (BundleError, DataError, FileNotFoundError) as e:
        _fail(str(e))
    out_console.print(format_realcam(str(bundle), r))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(r, indent=2))


@app.command()
def quickstart(
    out: Path = typer.Option(DEFAULT_QUICKSTART, help="run directory"),
    data: Optional[str] = typer.Option(None, help="dataset (default StreetWork)"),
    retrain: bool = typer.Option(False, help="train even if a bundle is cached"),
    epochs: int = typer.Option(QUICKSTART_EPOCHS, min=1, help="training epochs"),
    input_size: int = typer.Option(QUICKSTART_INPUT, help="training resolution"),
    eval_size: Optional[int] = typer.Option(QUICKSTART_EVAL, help="inference resolution of stage 1 (the cascade runs it at about half, then at this)"),
    device: str = typer.Option("auto"),
    cascade: bool = typer.Option(True, "--cascade/--stage1-only", help="build a cascade from the stage-1 model (default)"),
    budget: str = typer.Option(default_of(BuildConfig, "budget"), help="cascade compute budget (see `roadcascade build`)"),
    synth: int = typer.Option(QUICKSTART_SYNTH, min=0, help="synthetic dashcam images to train on (cached in OUT/synth; 0: none)"),
    style_p: float = typer.Option(QUICKSTART_STYLE_P, min=0.0, max=1.0, help="dashcam style transform probability in training"),
    squares: int = typer.Option(QUICKSTART_SQUARES, min=1, max=8, help="see a non-square image as this many aspect-preserving squares, max-pooled (1: stretch it to a square)"),
    view_scale: float = typer.Option(QUICKSTART_VIEW_SCALE, min=0.25, max=4.0, help="run those squares at this x the input size"),
    guard_fpr: Optional[float] = typer.Option(QUICKSTART_GUARD_FPR, min=0.0, max=0.5, help="open-set guard: lower thresholds to where this share of val's real dashcam negatives pass (see `roadcascade guard`)"),
    guard: bool = typer.Option(True, "--guard/--no-guard", help="apply the open-set guard to both bundles"),
    select: bool = typer.Option(True, "--select/--no-select", help="ship the cascade or its stage-1 model, whichever has the better "
                                "real-dashcam MCC (night-dev + val's dashcam negatives) within 0.005 val challenge MCC of the other "
                                "(fit/select.py); --no-select ships the cascade"),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="also export the bundle to ONNX (fp32 and INT8) and ship whichever form "
                              "has the best val MCC per CPU-ms (within 0.005 MCC of fp32 PyTorch); see `roadcascade export`"),
) -> None:
    """The main job: synthesise dashcam roadwork, train (or reuse) the stage-1 model, build a cascade from it, choose the
    cascade or stage 1 on val and night-dev, export the choice to ONNX (fp32, INT8) and ship the best form for the CPU,
    evaluate test clean + challenge and real dashcam frames (night-dev recall, dashcam false positives), report."""
    from ..fit.guard import guard_bundle
    from ..bench.realcam import format_realcam, realcam_html
    from ..bench.report import write_html

    t0 = time.perf_counter()
    bdir = out / "bundle"
    sdir = out / "stage1" if cascade else bdir  # the stage-1 model (the cascade's tiers reuse its weights)
    with progress_bar() as cb:
        if cascade:
            from ..fit.build import adopt_stage1, quickstart_cascade

            adopt_stage1(bdir, sdir, log=console.print)
        extra: tuple[str, ...] = ()
        if synth:
            from ..io.synth import ensure_synth

            extra = (str(ensure_synth(SynthConfig(n=synth, data=data), out / "synth", log=console.print, progress=cb)),)
        cfg = TrainConfig(model="lite0", input_size=input_size, eval_size=eval_size, epochs=epochs, data=data, device=device,
                          extra_train=extra, style_p=style_p, balance_sources=bool(extra), squares=squares,
                          view_scale=view_scale)
        _stage1(cfg, sdir, retrain, cb)
        gcfg = GuardConfig(fpr=guard_fpr, data=data) if guard and guard_fpr is not None else None
        if gcfg:  # before the cascade is built from it: guarding later would make the cached cascade stale
            guard_bundle(sdir, gcfg, device=device, log=console.print)
        chosen, other = bdir, None  # the bundle to ship and the same-run baseline beside it
        if cascade:
            quickstart_cascade(sdir, bdir, data=data, device=device, budget=budget, progress=cb, log=console.print)
            if gcfg:
                guard_bundle(bdir, gcfg, device=device, log=console.print)
            other = (sdir, "-stage1", "stage-1 ")
            if select:
                chosen = _select(bdir, sdir, out, data, device, cb)
                if chosen == sdir:
                    other = (bdir, "-cascade", "cascade ")
            else:
                (out / "selected.json").unlink(missing_ok=True)  # a choice of an earlier run does not describe this one
        shipped = _ship(chosen, out, data, gcfg, cb) if int8 else chosen
        # the deployed bundle (the ONNX form that ships of the cascade or of stage 1), the PyTorch form when the INT8
        # one ships (an fp32 ONNX form answers as PyTorch does), then the candidate not shipped
        runs = ([(shipped, "", "")] + ([(chosen, "-torch", "PyTorch fp32 ")] if shipped.name == "bundle-int8" else [])
                + ([other] if other else []))
        # the candidate not shipped is a baseline itself: its own best-single / full-ensemble rows are left out
        reps, realcam = _evaluate_runs(runs, out, data, device, cb, baselines=[r is not other for r in runs])
    html = write_html(reps, out / "report.html", preface=realcam_html(realcam) if realcam else "",
                      title=f"roadcascade quickstart: {'cascade' if chosen == bdir and cascade else 'stage-1'} on StreetWork test")
    _print_summary(reps)
    for name, r in realcam.items():
        out_console.print(format_realcam(name, r))
    console.print(f"bundle {shipped}" + (f" (shipped: {out}/shipped.json; fp32 PyTorch form {chosen})" if shipped != chosen else "")
                  + f"\nmetrics {out}/eval-test-clean.json, {out}/eval-test-challenge.json"
                  + (f" ({other[2].strip()}: {out}/eval-test-*{other[1]}.json)" if other else "") + f"\nreport {html}")
    console.print(f"quickstart finished in {time.perf_counter() - t0:.0f} s")


def _select(bdir: Path, sdir: Path, out: Path, data: Optional[str], device: str, cb) -> Path:
    """The cascade or its stage 1, chosen on val and night-dev (``fit.select``; ``out/selected.json``)."""
    from ..fit.select import SelectConfig, select_bundle
    from ..models.preprocess import pick_device

    cfg = SelectConfig(data=data, device=str(pick_device(device)))
    choice = select_bundle([("cascade", bdir), ("stage 1", sdir)], cfg, out / "selected.json",
                           log=console.print, progress=cb)
    return Path(choice.selected)


def _ship(bdir: Path, out: Path, data: Optional[str], gcfg, cb) -> Path:
    """The ONNX exports of ``bdir`` (fp32 and INT8, under ``out``) and the form to ship (``fit.ship``); a failed
    export leaves the fp32 PyTorch bundle shipped, said plainly (it must not cost the whole quickstart)."""
    from ..fit.ship import ShipConfig, ship_cpu_form

    try:
        return Path(ship_cpu_form(bdir, out, ShipConfig(data=data), guard=gcfg, log=console.print, progress=cb).shipped)
    except (ImportError, RuntimeError, ValueError, OSError) as e:
        console.print(f"[yellow]ONNX export failed ({type(e).__name__}: {e}); shipping the fp32 bundle {bdir}[/yellow]")
        return bdir


def _stage1(cfg: TrainConfig, sdir: Path, retrain: bool, cb) -> None:
    """Train the quickstart's stage-1 model unless a bundle trained with the same recipe is cached at ``sdir``."""
    from ..fit.train import train as run_train

    stale = _recipe_changes(sdir, cfg)
    if stale:
        console.print(f"cached bundle {sdir} was trained with another recipe ({stale}): training again")
    if retrain or stale or not (sdir / "bundle.json").exists():
        console.print(f"[bold]training[/bold] {cfg.model} for {cfg.epochs} epochs at {cfg.input_size}px -> {sdir}")
        run_train(cfg, sdir, progress=cb, log=console.print)
    else:
        console.print(f"using cached bundle {sdir} (pass --retrain to train again)")


def _evaluate_runs(runs: list[tuple[Path, str, str]], out: Path, data: Optional[str], device: str, cb,
                   baselines: Sequence[bool] = ()) -> tuple[list, dict]:
    """Each (bundle, file suffix, label) on test clean and challenge (JSON written to ``out``) and, on the default data,
    on real dashcam frames (night-dev recall, dashcam false positives). ``baselines[i]`` False: run i is itself a
    baseline, evaluated without the best-single and full-ensemble rows of its own (default: with them)."""
    from ..bench.evaluate import evaluate, public
    from ..bench.realcam import default_night_dev, realcam_report
    from ..cascade.bundle import Bundle
    from ..io.data import open_dataset
    from ..models.preprocess import pick_device

    ds = open_dataset(data, "test")
    reps, realcam = [], {}
    with_realcam = data is None and default_night_dev().exists()
    for i, (path, suffix, label) in enumerate(runs):
        b = Bundle.load(path, device=pick_device(device))
        for views in ("clean", "challenge"):
            rep = evaluate(b, ds, views, "test", progress=cb, baselines=baselines[i] if i < len(baselines) else True)
            (out / f"eval-test-{views}{suffix}.json").write_text(json.dumps(public(rep), indent=2))
            reps.append((f"{label}test / {views}", rep))
        if with_realcam:
            realcam[label.strip() or "deployed"] = realcam_report(b, progress=cb)
    if realcam:
        (out / "eval-dashcam.json").write_text(json.dumps(realcam, indent=2))
    return reps, realcam


_RECIPE_FIELDS = ("model", "input_size", "eval_size", "epochs", "extra_train", "style_p", "balance_sources", "data", "squares",
                  "view_scale")


def _recipe_changes(bundle_dir: Path, cfg) -> str:
    """The recipe fields in which a cached stage-1 bundle differs from ``cfg`` ("" when none, or no bundle)."""
    doc = bundle_dir / "bundle.json"
    if not doc.exists():
        return ""
    try:
        old = json.loads(doc.read_text()).get("train") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return "unreadable bundle.json"
    new = {"extra_train": list(cfg.extra_train), **{k: getattr(cfg, k) for k in _RECIPE_FIELDS if k != "extra_train"}}
    # bundles from before these fields were trained with their defaults
    defaults = {k: default_of(TrainConfig, k) for k in ("style_p", "balance_sources", "squares", "view_scale")}
    defaults["extra_train"] = list(default_of(TrainConfig, "extra_train"))
    diff = [k for k in _RECIPE_FIELDS if old.get(k, defaults.get(k)) != new[k]]
    return ", ".join(diff)


# Sub-command modules of other parts: each exposes ``register(app, bench_app)``; one line each.
_COMMAND_MODULES: tuple[str, ...] = (
    "roadcascade.cli.build",
    "roadcascade.cli.detect",
    "roadcascade.cli.serve",
    "roadcascade.cli.gpu",
    "roadcascade.cli.native",
    "roadcascade.distributed.commands",
    "roadcascade.cli.export",
)


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(app, bench_app)


_register_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
