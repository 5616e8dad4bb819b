"""``roadcascade bench decode``: full vs reduced-size JPEG decode on the CPU path, for native-resolution payloads
(1920x1080 and 4032x3024, real photos upscaled, JPEG q90), decode only and end to end, plus answer agreement.

Registered by cli.py through ``_COMMAND_MODULES``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import typer

DEFAULT_BUNDLE = Path("runs/quickstart/stage1")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"1920x1080,4032x3024"`` -> [(1920, 1080), (4032, 3024)]; ValueError for anything else."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        w, sep, h = part.partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
            raise ValueError(f"size {part!r} is not WIDTHxHEIGHT")
        sizes.append((int(w), int(h)))
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def bench_decode_command(
    images: Optional[Path] = typer.Option(None, help="folder of real photos (JPEG) to upscale into the payload sets"),
    split: Optional[str] = typer.Option(None, help="instead of --images: a stratified subset of this split of --data "
                                        "(e.g. test: photos the bundle never trained on)"),
    data: Optional[str] = typer.Option(None, help="dataset for --split (default StreetWork)"),
    bundle: Path = typer.Option(DEFAULT_BUNDLE, help="bundle to run end to end (a stage-1 bundle: its tier's input size "
                                "is the decode size)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all numbers as JSON here"),
    n: int = typer.Option(48, min=1, help="photos per payload set (spread over the folder's sorted listing)"),
    sizes: str = typer.Option("1920x1080,4032x3024", help="payload sizes WIDTHxHEIGHT, comma-separated"),
    quality: int = typer.Option(90, min=1, max=100, help="JPEG quality of the payloads"),
    repeats: int = typer.Option(2, min=1, help="timed rounds (best of; the four variants interleaved per round)"),
    batch_size: int = typer.Option(16, min=1, help="images per cascade batch end to end"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads (default: torch's)"),
    backend: str = typer.Option("auto", help="how --bundle's classifier tiers run: auto | torch | onnxruntime"),
    reference: Optional[Path] = typer.Option(None, help="also time this bundle end to end on full-size decodes in the same "
                                             "rounds (the CPU path before: e.g. the fp32 PyTorch form of an exported "
                                             "bundle) and compare its answers with --bundle's on reduced decodes"),
    reference_backend: str = typer.Option("torch", help="how --reference's classifier tiers run"),
) -> None:
    """Full vs reduced-size JPEG decode on the CPU: img/s decode only and decode + bundle, and answer agreement."""
    import torch

    from ..cascade.bundle import Bundle, BundleError
    from ..io.data import DataError, open_dataset
    from ..bench.native import bench_decode, native_payloads, photo_paths

    try:
        wh = parse_sizes(sizes)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--sizes") from None
    if (images is None) == (split is None):
        raise typer.BadParameter("give either --images DIR or --split S", param_hint="--images / --split")
    if threads:
        torch.set_num_threads(threads)
    try:
        b = Bundle.load(bundle, device="cpu", backend=backend)
        ref = Bundle.load(reference, device="cpu", backend=reference_backend).cascade if reference else None
        if images is not None:
            photos: list = photo_paths(images, n)
            where = str(images)
        else:
            photos = [s.load() for s in open_dataset(data, split).subset(n, seed=3).samples]
            where = f"split {split} of {data or 'StreetWork'}"
    except (BundleError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    _log(f"{len(photos)} photos from {where}; bundle {bundle} (decode size {b.cascade.decode_size()})")
    sets = native_payloads(photos, wh, quality)
    rows = []
    for name, payloads in sets.items():
        r = bench_decode(b.cascade, name, payloads, repeats=repeats, batch=batch_size, log=_log, reference=ref)
        rows.append(r)
        a = r.agreement
        print(f"{name}: decode {r.decode_full_img_s:.1f} -> {r.decode_reduced_img_s:.1f} img/s (x{r.decode_speedup:.2f}, "
              f"decoded {r.decoded_shape_reduced[1]}x{r.decoded_shape_reduced[0]}); end to end {r.e2e_full_img_s:.1f} -> "
              f"{r.e2e_reduced_img_s:.1f} img/s (x{r.e2e_speedup:.2f}); agreement {a.agreement:.4f} ({a.flips} flips), "
              f"mean |dp| {a.mean_abs_dp:.5f}, max |dp| {a.max_abs_dp:.4f}", flush=True)
        if r.reference_agreement is not None:
            ra = r.reference_agreement
            print(f"{name}: reference {reference} on full decodes {r.e2e_reference_full_img_s:.1f} img/s -> this bundle on "
                  f"reduced decodes {r.e2e_reduced_img_s:.1f} (x{r.e2e_speedup_vs_reference:.2f}); agreement "
                  f"{ra.agreement:.4f} ({ra.flips} flips), mean |dp| {ra.mean_abs_dp:.5f}, max |dp| {ra.max_abs_dp:.4f}",
                  flush=True)
    if json_out:
        doc = {"command": "roadcascade " + " ".join(sys.argv[1:]), "bundle": str(bundle), "backend": backend,
               "reference": str(reference) if reference else None, "reference_backend": reference_backend, "photos": where,
               "n_photos": len(photos), "quality": quality, "repeats": repeats, "batch_size": batch_size,
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
               "sets": [r.as_dict() for r in rows]}
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(doc, indent=2))
        print(f"numbers: {json_out}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    _ = app
    bench_app.command("decode")(bench_decode_command)
