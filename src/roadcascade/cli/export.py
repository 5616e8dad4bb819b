"""Commands of the compression part: ``export`` (ONNX, INT8), ``bench onnx`` (backends side by side) and
``distill`` (a student from any bundle's answers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..fit.config import DistillConfig
from ..models.export_config import ExportConfig as _Export
from .defaults import default_of, given


def export_command(
    bundle: Path = typer.Option(..., help="bundle directory to export (read only)"),
    out: Path = typer.Option(..., help="new bundle directory to write"),
    fmt: str = typer.Option("onnx", "--format", help="onnx (the only format)"),
    int8: bool = typer.Option(default_of(_Export, "int8"), "--int8/--fp32", help="static INT8 quantisation (QDQ, per-channel weights) calibrated on val"),
    data: Optional[str] = typer.Option(None, help="dataset whose val split calibrates and checks (default StreetWork)"),
    calib_images: int = typer.Option(default_of(_Export, "calib_images"), min=1, help="val images for INT8 calibration (each clean + one challenge view)"),
    check_images: int = typer.Option(default_of(_Export, "check_images"), min=1, help="other val images for the check against PyTorch"),
    calibrate_method: str = typer.Option(default_of(_Export, "calibrate_method"), help="percentile (99.999 of each activation's histogram) | minmax | entropy"),
    exclude_depthwise: bool = typer.Option(default_of(_Export, "exclude_depthwise"), help="keep depthwise convolutions in fp32"),
    stem_fp32: bool = typer.Option(default_of(_Export, "stem_fp32"), "--stem-fp32/--stem-int8", help="keep the convolution on the image in fp32 (INT8: most of the logit error)"),
    head_fp32: bool = typer.Option(default_of(_Export, "head_fp32"), "--head-fp32/--head-int8", help="keep the head (last conv and classifier) in fp32"),
    per_channel: bool = typer.Option(default_of(_Export, "per_channel"), "--per-channel/--per-tensor", help="weight scales per output channel"),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch and onnxruntime"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the check as JSON here"),
) -> None:
    """Export every classifier tier to ONNX (dynamic batch; --int8: INT8), write a bundle that runs with
    `--backend onnxruntime`, and check it against PyTorch (largest |dp|, decision agreement)."""
    from ..cascade.bundle import BundleError
    from .console import console, fail as _fail, out_console
    from ..io.data import DataError
    from ..models.export import ExportConfig, export_bundle

    if fmt != "onnx":
        _fail(f"--format must be onnx, not {fmt!r}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        cfg = ExportConfig(int8=int8, data=data, calib_images=calib_images, check_images=check_images,
                           calibrate_method=calibrate_method, exclude_depthwise=exclude_depthwise, per_channel=per_channel,
                           stem_fp32=stem_fp32, head_fp32=head_fp32)
        rep = export_bundle(bundle, out, cfg, log=console.print)
    except (BundleError, DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    for t in rep.tiers:
        out_console.print(f"{t.name} ({t.precision}): max |dlogit| {t.max_abs_dlogit:.4f}, max |dp| {t.max_abs_dp:.4f}, "
                          f"agreement {t.agreement:.2%} on {t.n} val inputs")
    out_console.print(f"bundle: max |dp| {rep.cascade_max_abs_dp:.4f}, decision agreement {rep.cascade_agreement:.2%} "
                      f"on {rep.n_check} val inputs (clean + challenge)")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rep.as_dict(), indent=2))
    console.print(f"exported bundle written to [bold]{out}[/bold] in {rep.seconds:.0f} s")


def bench_onnx_command(
    bundles: list[str] = typer.Argument(..., help="LABEL=BUNDLE[:BACKEND] ...; the first is the reference "
                                        "(e.g. torch=runs/quickstart/stage1 int8=runs/int8:onnxruntime)"),
    split: str = typer.Option("test"),
    views: str = typer.Option("challenge", help="clean | challenge"),
    data: Optional[str] = typer.Option(None),
    max_images: Optional[int] = typer.Option(None, help="a stratified subset of the split"),
    chunk: int = typer.Option(64, min=1, help="requests per turn; the bundles take turns, rotating"),
    batch_size: int = typer.Option(32, min=1),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch and onnxruntime"),
    json_out: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Bundles under different backends on the same requests, in one run: img/s ratio, |dMCC|, agreement, max |dp|."""
    from rich.table import Table

    from ..cascade.bundle import Bundle, BundleError
    from .console import fail as _fail, out_console, progress_bar
    from ..io.data import DataError, open_dataset
    from ..bench.evaluate import make_items, view_seed
    from ..bench.onnx import bench_backends

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        loaded = [(lab, Bundle.load(path, device="cpu", backend=be or None)) for lab, path, be in map(_parse_spec, bundles)]
        ds = open_dataset(data, split).subset(max_images)
    except (BundleError, DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    with progress_bar() as cb:
        items = make_items(ds, views, view_seed(split, None), progress=cb)
        rows = bench_backends(loaded, items, chunk=chunk, batch_size=batch_size, progress=cb)
    t = Table(title=f"backends on {split} / {views} ({len(items)} requests, same run)")
    for c in ("bundle", "n", "MCC", "|dMCC|", "agreement", "max |dp|", "img/s", "x ref"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r.label, str(r.n), f"{r.mcc:.4f}", f"{r.abs_dmcc:.4f}", f"{r.agreement:.2%}", f"{r.max_abs_dp:.4f}",
                  f"{r.img_s:.1f}", f"{r.speedup:.2f}")
    out_console.print(t)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"split": split, "views": views, "n": len(items), "rows": [r.as_dict() for r in rows],
                                        "bundles": bundles}, indent=2))


def _parse_spec(spec: str) -> tuple[str, str, str]:
    """``LABEL=PATH[:BACKEND]`` -> (label, path, backend or "")."""
    label, _, rest = spec.partition("=") if "=" in spec else ("", "", spec)
    path, _, backend = rest.rpartition(":") if rest.rsplit(":", 1)[-1] in ("auto", "torch", "onnxruntime") else (rest, "", "")
    return label or Path(path).name, path, backend


def distill_command(
    teacher: Path = typer.Option(..., help="teacher bundle (a cascade runs as its full ensemble, test-time views included)"),
    student: str = typer.Option(default_of(DistillConfig, "student"), help="MODEL[@SIZE]: zoo model and inference size of the student"),
    out: Path = typer.Option(Path("runs/distill/bundle"), help="student bundle directory to write"),
    extra: list[str] = typer.Option([], "--extra", help="unlabelled image folder or synthetic manifest (soft targets only "
                                    "where there is no label); repeatable"),
    data: Optional[str] = typer.Option(None, help="dataset with train/val splits (default StreetWork)"),
    input_size: Optional[int] = typer.Option(None, help="training resolution (default: the student's SIZE)"),
    temperature: float = typer.Option(default_of(DistillConfig, "temperature"), min=0.05, help="distillation temperature T"),
    hard_weight: float = typer.Option(default_of(DistillConfig, "hard_weight"), min=0.0, max=1.0,
                                      help="weight of the label loss where labels exist"),
    views: int = typer.Option(default_of(DistillConfig, "views"), min=1, max=16,
                              help="teacher views per image (the image + challenge views), cached"),
    teacher_mode: str = typer.Option(default_of(DistillConfig, "teacher_mode"),
                                     help="ensemble (every tier) | cascade (the teacher's own early exits)"),
    epochs: int = typer.Option(default_of(DistillConfig, "epochs"), min=1),
    batch_size: int = typer.Option(default_of(DistillConfig, "batch_size"), min=1),
    lr: float = typer.Option(default_of(DistillConfig, "lr"), min=0.0),
    max_train: Optional[int] = typer.Option(None), max_extra: Optional[int] = typer.Option(None),
    max_val: Optional[int] = typer.Option(None), max_steps: Optional[int] = typer.Option(None),
    cache: Optional[Path] = typer.Option(None, help="teacher-target cache directory (default OUT/../distill-cache)"),
    seed: int = typer.Option(default_of(DistillConfig, "seed")), device: str = typer.Option(default_of(DistillConfig, "device")),
    threads: Optional[int] = typer.Option(None, min=1),
) -> None:
    """Distil any bundle into one student network, written as a calibrated, folded stage-1 bundle."""
    from ..cascade.bundle import BundleError
    from .console import console, fail as _fail, progress_bar
    from ..io.data import DataError
    from ..fit.distill import distill

    try:
        cfg = DistillConfig(**given(teacher=str(teacher), student=student, input_size=input_size, extra=tuple(extra),
                                    temperature=temperature, hard_weight=hard_weight, views=views, teacher_mode=teacher_mode,
                                    epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, data=data,
                                    max_train=max_train, max_extra=max_extra, max_val=max_val, max_steps=max_steps,
                                    cache=str(cache) if cache else None, threads=threads))
        with progress_bar() as cb:
            res = distill(cfg, out, progress=cb, log=console.print)
    except (BundleError, DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"student bundle written to [bold]{out}[/bold] in {res.seconds:.0f} s ({res.n_views} views, "
                  f"{res.cached} teacher targets from the cache)")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("distill")(distill_command)
    bench_app.command("onnx")(bench_onnx_command)
