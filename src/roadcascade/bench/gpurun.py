"""``roadcascade bench gpu``: the GPU fast path against the reference miner's way, same run, same images.

Registered by ``roadcascade.cli.gpu``; also runnable alone, without the HTTP stack (the GPU machine has no
uvicorn/httptools): ``python -m roadcascade.bench.gpurun bench --bundle B ...`` and ``... payloads --out DIR``
(writes the validator-style 224x224 JPEG q75 challenge views and the native files the bench reads).

Measured per batch size, for (a) the reference miner's way (PIL decode, one image per fp32 forward pass:
``Cascade.predict([decode_bytes(b)])`` per image), (b) the fast path with the stage-1 model and (c) the
fast path with the whole cascade:

- throughput: ``GpuCascade.predict_stream`` over batches of B payloads for ``--seconds`` (decoding of
  later batches overlaps the model), images / wall second;
- latency: ``GpuCascade.predict_batch`` one batch at a time, bytes in host memory to probabilities on
  the host, p50 / p99 over the repeats;
- decode-only ceiling of each payload set (the same decode workers and routing, no model; and each decoder
  alone), in the same run, so the table shows how close end to end comes to decoding alone;
- GPU memory (peak allocated by PyTorch, and in use on the device), the cascade's exit rates and how
  its time splits across decode, tiers and the rest; and how far the fast path's probabilities are from
  the CPU path's (full-size PIL decode, fp32) on the same images.

Payload sets: q75, native, and ``--sizes`` (default 1920x1080 and 4032x3024) made from the native photos.
The measuring functions are in :mod:`roadcascade.bench.gpu`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

SETS = ("q75", "native", "1920x1080", "4032x3024")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- payloads


def make_payloads(out: Path, data: str | None = None, n_images: int = 200, n_views: int = 4, seed: int = 1,
                  split: str = "test") -> dict[str, int]:
    """Write ``out/q75/*.jpg`` (challenge views, 224x224, JPEG q75, as validators send them) and
    ``out/native/*.jpg`` (the stored files) for a stratified subset of a split."""
    from ..io.challenge import ChallengeConfig, challenge_views
    from ..io.data import open_dataset
    from ..io.images import encode_jpeg

    ds = open_dataset(data, split).subset(n_images)
    (out / "q75").mkdir(parents=True, exist_ok=True)
    (out / "native").mkdir(parents=True, exist_ok=True)
    cfg = ChallengeConfig(size=224, jpeg_quality=None)
    nq = nn = 0
    for s in ds.samples:
        raw = s.data if s.data is not None else s.path.read_bytes()  # type: ignore[union-attr]
        (out / "native" / f"{Path(s.key).stem}.jpg").write_bytes(raw)
        nn += 1
        for j, v in enumerate(challenge_views(s.load(), seed=seed, key=s.key, n=n_views, cfg=cfg)):
            (out / "q75" / f"{Path(s.key).stem}_v{j}.jpg").write_bytes(encode_jpeg(v, 75))
            nq += 1
    return {"q75": nq, "native": nn}


def _read_dir(d: Path, limit: int | None = None) -> list[bytes]:
    from ..bench.gpu import read_dir

    return read_dir(d, limit)


def _compose_cascade(stage1, second, tau: float):
    """Stage-1 tier, then the second bundle's first tier; confidence rule at exit 0, last-tier fusion."""
    from ..cascade.runtime import Cascade, ConfidenceRule, ExitPoint, FinalRule, LastTierFusion

    t0, t1 = stage1.cascade.tiers[0], second.cascade.tiers[0]
    e0 = ExitPoint(LastTierFusion(), stage1.cascade.exits[0].threshold, ConfidenceRule(tau))
    e1 = ExitPoint(LastTierFusion(), second.cascade.exits[0].threshold, FinalRule())
    return Cascade([t0, t1], [e0, e1])


@dataclass
class BenchSpec:
    """What ``bench gpu`` measures (the CLI's options)."""

    bundle: Path
    batch_sizes: list[int]
    json_out: Path | None = None
    images: Path | None = None
    native: Path | None = None
    data: str | None = None
    n_images: int = 200
    sizes: list[tuple[int, int]] = field(default_factory=list)  # native-size sets made from the native photos
    n_sized: int = 48
    second_tier: Path | None = None
    cascade_bundle: Path | None = None
    tau: float | None = None
    defer: float = 0.25
    ref_images: int = 200
    seconds: float = 1.0
    device: str = "auto"
    command: str = ""
    latency_reps: int | None = None
    ceilings: tuple[str, ...] = ("routed", "gpu", "cpu", "procs")
    sets: tuple[str, ...] = ()  # payload sets to measure (empty: all)
    config: dict[str, Any] = field(default_factory=dict)  # GpuConfig fields


def _info(dev, command: str) -> dict[str, Any]:
    import torch

    cuda = dev.type == "cuda"
    info: dict[str, Any] = {"command": command, "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
                            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


def _pools(spec: BenchSpec) -> dict[str, list[bytes]]:
    """The payload sets in host memory (made before CUDA starts: the sized sets fork worker processes)."""
    from ..bench.gpu import sized_sets

    images, native = spec.images, spec.native
    if images is None or native is None:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "rc-gpu-payloads"
        if not (tmp / "q75").exists():
            _log(f"making payloads from {spec.data or 'StreetWork'} -> {tmp}")
            make_payloads(tmp, spec.data, n_images=spec.n_images)
        images, native = images or tmp / "q75", native or tmp / "native"
    pools = {"q75": _read_dir(images), "native": _read_dir(native)}
    if spec.sizes:
        t0 = time.perf_counter()
        step = max(1, len(pools["native"]) // spec.n_sized)
        photos = pools["native"][::step][:spec.n_sized]
        pools.update(sized_sets(photos, spec.sizes, workers=max(1, (os.cpu_count() or 2) - 1)))
        _log(f"made the sized sets {[f'{w}x{h}' for w, h in spec.sizes]} from {len(photos)} photos in "
             f"{time.perf_counter() - t0:.1f} s")
    return pools


def _gpu_config(spec: BenchSpec, compile_: bool, graphs: bool):
    from ..accel.runtime import GpuConfig

    return GpuConfig(compile=compile_, graphs=graphs, **spec.config)


def _references(result: dict, ref_b, pools: dict[str, list[bytes]], spec: BenchSpec) -> None:
    """(a) the reference miner's way (speed), and the CPU path's answers for the match (full-size decode)."""
    from ..bench.gpu import reference_probs, reference_speed

    for name, pool in pools.items():
        n = spec.ref_images if name in ("q75", "native") else min(spec.ref_images, 32)
        r = result["reference"][name] = reference_speed(ref_b.cascade, pool, n)
        r["_probs"] = reference_probs(ref_b.cascade, pool, min(len(pool), spec.ref_images))
        r["_probs_reduced"] = reference_probs(ref_b.cascade, pool, min(len(pool), spec.ref_images),
                                              ref_b.cascade.decode_size())
        _log(f"(a) reference {name}: {r['img_s']:.1f} img/s, p50 {r['latency_ms']['p50']:.2f} ms")


def _stage1(result: dict, spec: BenchSpec, pools, cfg, dev, save) -> Any:
    """(b) the fast path with the stage-1 model: match against the CPU path, then each set's rows and ceilings."""
    import torch

    from ..accel.runtime import GpuCascade
    from ..bench.gpu import match, pixel_match, stage_speeds
    from ..cascade.bundle import Bundle

    s1 = Bundle.load(spec.bundle, device=torch.device("cpu"))
    t0 = time.perf_counter()
    gc = GpuCascade(s1.cascade, device=dev, config=cfg, log=_log)
    eng = gc.engines[0]
    result["stage1"]["warmup_s"] = time.perf_counter() - t0
    if eng is None:  # e.g. square views (squares > 1): the tier runs its own code on decoded images, not an engine
        _log(f"(b) the first tier {gc.tier_names[0]} is not one model on one resized tensor: no GPU engine")
    else:
        result["stage1"]["compile"] = {"compiled": eng.compiled, "compile_s": eng.compile_s,
                                       "capture_s": eng.capture_s, "bn_folded": eng.folded}
        _log(f"(b) warm-up {result['stage1']['warmup_s']:.1f} s (compile {eng.compile_s:.1f} s, compiled={eng.compiled})")
    result["config"]["gpu_decoder"] = gc.gpu_decoder
    for name, pool in pools.items():
        ref = np.asarray(result["reference"][name]["_probs"])
        got = np.concatenate([gc.predict_batch(pool[i:i + 256]).probability for i in range(0, len(ref), 256)])[:len(ref)]
        result["match"][f"stage1_{name}"] = match(ref, got)  # against the full-size CPU decode
        result["match"][f"stage1_{name}_vs_reduced_cpu"] = match(result["reference"][name]["_probs_reduced"], got)
        if gc.cuda:
            result["match"][f"pixels_{name}"] = pixel_match(gc, pool, 32)
        _log(f"    match {name}: {result['match'][f'stage1_{name}']}")
    save()
    for name, pool in pools.items():
        res = stage_speeds(gc, f"(b) stage-1 {name}", pool, spec.batch_sizes, spec.seconds, spec.latency_reps,
                           spec.ceilings if gc.cuda else ("routed",), _log)
        result["stage1"][name], result["ceiling"][name] = res["rows"], res["decode_ceiling"]
        save()
    if gc.cuda and eng is not None:
        result["micro"]["model_only_img_s"] = _model_only(gc, pools["q75"])
    return gc


def _model_only(gc, pool: list[bytes]) -> float:
    """The stage-1 engine alone at its largest graph size."""
    import torch

    bb = max(gc.cfg.graph_sizes)
    x = gc._decode(pool[:bb], inline=True).x0
    eng = gc.engines[0]
    with torch.inference_mode():
        for _ in range(3):
            eng.logits(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(30):
            eng.logits(x)
        torch.cuda.synchronize()
    return 30 * bb / (time.perf_counter() - t0)


def _cascade_of(spec: BenchSpec, result: dict, pools, device):
    """The cascade for (c): a cascade bundle, or stage-1 + the second bundle's first tier (or None)."""
    from ..cascade.bundle import Bundle

    if spec.cascade_bundle is not None:
        result["cascade"]["source"] = str(spec.cascade_bundle)
        return Bundle.load(spec.cascade_bundle, device=device).cascade
    if spec.second_tier is None:
        return None
    tau = spec.tau
    if tau is None:  # defer the given share of the q75 set to the second tier
        q = np.asarray(result["reference"]["q75"]["_probs"])
        tau = float(np.quantile(np.abs(q[np.isfinite(q)] - 0.5), spec.defer))
        spec.tau = tau
    result["cascade"]["source"] = f"{spec.bundle} + {spec.second_tier}, confidence tau={tau}"
    return _compose_cascade(Bundle.load(spec.bundle, device=device), Bundle.load(spec.second_tier, device=device), tau)


def _whole_cascade(result: dict, spec: BenchSpec, pools, cfg, dev, save) -> None:
    """(c) the fast path with the whole cascade: match against the same cascade on the CPU path, and the rows."""
    import torch

    from ..accel.runtime import GpuCascade
    from ..bench.gpu import match, measure_row, reference_probs

    casc = _cascade_of(spec, result, pools, torch.device("cpu"))
    if casc is None:
        return
    result["cascade"]["tiers"] = casc.tier_names
    t0 = time.perf_counter()
    gc = GpuCascade(casc, device=dev, config=cfg, log=_log)
    result["cascade"]["warmup_s"] = time.perf_counter() - t0
    ref_c = _cascade_of(spec, {"cascade": {}, "reference": result["reference"]}, pools, dev)
    for name, pool in pools.items():
        n = min(len(pool), max(spec.ref_images, 256))
        got = np.concatenate([gc.predict_batch(pool[i:i + 256]).probability for i in range(0, n, 256)])[:n]
        result["match"][f"cascade_{name}"] = match(reference_probs(ref_c, pool, n), got)
        result["match"][f"cascade_{name}_vs_reduced_cpu"] = match(reference_probs(ref_c, pool, n, ref_c.decode_size()), got)
        _log(f"    match cascade {name}: {result['match'][f'cascade_{name}']}")
    for name, pool in pools.items():
        result["cascade"][name] = {b: measure_row(gc, pool, b, spec.seconds, spec.latency_reps) for b in spec.batch_sizes}
        save()
    gc.close()


def run_bench(spec: BenchSpec, compile_: bool = True, graphs: bool = True) -> dict[str, Any]:
    """The whole benchmark: payloads, (a) reference, (b) fast stage-1 with decode ceilings, (c) fast cascade."""
    import torch

    from ..cascade.bundle import Bundle

    pools = _pools(spec)
    if spec.sets:
        pools = {k: v for k, v in pools.items() if k in spec.sets or k == "q75"}  # q75 sets the composed cascade's tau
    dev = torch.device(spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    info = _info(dev, spec.command)
    info["images"] = {k: {"n": len(v), "mean_bytes": float(np.mean([len(b) for b in v]))} for k, v in pools.items()}
    _log(f"device {info['device']}  torch {info['torch']}  cpus {info['cpus']}; payloads {info['images']}")
    cfg = _gpu_config(spec, compile_, graphs)
    result: dict[str, Any] = {"info": info, "reference": {}, "stage1": {}, "cascade": {}, "match": {}, "micro": {},
                              "ceiling": {}, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                        for k, v in cfg.__dict__.items() if k != "limits"}}

    def save() -> None:
        if spec.json_out:
            spec.json_out.parent.mkdir(parents=True, exist_ok=True)
            spec.json_out.write_text(json.dumps(_public(result), indent=2, default=float))

    _references(result, Bundle.load(spec.bundle, device=dev), pools, spec)
    save()
    gc1 = _stage1(result, spec, pools, cfg, dev, save)
    gc1.close()
    del gc1
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    _whole_cascade(result, spec, pools, cfg, dev, save)
    save()
    return result


def _public(obj):
    if isinstance(obj, dict):
        return {str(k): _public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_public(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _set_table(res: dict[str, Any], name: str) -> list[str]:
    ref = res["reference"].get(name)
    if not ref:
        return []
    hdr = f"{'set':<10}{'path':<20}{'batch':>6}{'img/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x ref':>8}{'/ceil':>7}{'peak MiB':>10}"
    lines = ["", hdr, f"{name:<10}{'(a) reference':<20}{1:>6}{ref['img_s']:>10.1f}{ref['latency_ms']['p50']:>9.2f}"
                      f"{ref['latency_ms']['p99']:>9.2f}{1.0:>8.1f}{'':>7}{'':>10}"]
    ceil = (res.get("ceiling") or {}).get(name) or {}
    top = ceil.get("routed")
    for key, label in (("stage1", "(b) fast stage-1"), ("cascade", "(c) fast cascade")):
        for b, r in (res.get(key, {}).get(name) or {}).items():
            frac = f"{r['img_s'] / top:>7.2f}" if top and key == "stage1" else f"{'':>7}"
            lines.append(f"{name:<10}{label:<20}{b:>6}{r['img_s']:>10.0f}{r['latency_ms']['p50']:>9.2f}"
                         f"{r['latency_ms']['p99']:>9.2f}{r['img_s'] / ref['img_s']:>8.0f}{frac}"
                         f"{r['memory'].get('peak_allocated_mib', float('nan')):>10.0f}")
    if ceil:
        lines.append(f"{name:<10}decode-only ceiling at B={ceil['batch']}: " +
                     ", ".join(f"{k} {v:.0f} img/s" for k, v in ceil.items() if k != "batch"))
    return lines


def format_table(res: dict[str, Any]) -> str:
    lines = [f"device: {res['info']['device']}  torch {res['info']['torch']}  torchvision {res['info'].get('torchvision')}",
             f"command: {res['info']['command']}",
             f"GPU JPEG decoder: {res.get('config', {}).get('gpu_decoder')}  config: "
             + json.dumps({k: res.get("config", {}).get(k) for k in ("route", "procs", "proc_share", "cpu_share")})]
    for name in res["reference"]:
        lines += _set_table(res, name)
    if res.get("match"):
        lines.append("")
        for k, v in res["match"].items():
            lines.append(f"match {k}: " + json.dumps({a: round(b, 5) if isinstance(b, float) else b for a, b in v.items()}))
    if res.get("micro"):
        lines.append(f"micro: {res['micro']}")
    for name in res["reference"]:
        for b, r in (res.get("cascade", {}).get(name) or {}).items():
            lines.append(f"cascade split {name} B={b}: exits {np.round(r['exit_rates'], 3).tolist()} "
                         f"us/img {json.dumps({k: (np.round(v, 1).tolist()) for k, v in r['split_us_per_img'].items()})}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _bench_command(
    bundle: Path = typer.Option(..., help="stage-1 bundle (its first tier is the stage-1 model)"),
    batch_sizes: str = typer.Option("1,8,64,256,1024", help="comma-separated batch sizes"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all numbers as JSON here"),
    images: Optional[Path] = typer.Option(None, help="folder of 224x224 q75 JPEGs (default: made from --data)"),
    native: Optional[Path] = typer.Option(None, help="folder of native-resolution JPEGs (default: made from --data)"),
    data: Optional[str] = typer.Option(None, help="dataset for the default payloads (default StreetWork)"),
    n_images: int = typer.Option(200, min=1, help="images for the default payloads (4 q75 views each)"),
    sizes: str = typer.Option("1920x1080,4032x3024", help="payload sets made from the native photos (upscaled, JPEG "
                              "q90), WxH comma-separated; empty: none"),
    n_sized: int = typer.Option(48, min=1, help="photos per sized set"),
    second_tier: Optional[Path] = typer.Option(None, help="bundle whose first tier follows stage-1 in a composed cascade"),
    cascade_bundle: Optional[Path] = typer.Option(None, help="a cascade bundle for (c) (instead of --second-tier)"),
    tau: Optional[float] = typer.Option(None, help="composed cascade: confidence rule at exit 0 (stop when |p - 0.5| >= tau); "
                                        "default: the value that defers --defer of the q75 images"),
    defer: float = typer.Option(0.25, min=0.0, max=1.0, help="composed cascade: share of q75 images sent on (sets tau)"),
    ref_images: int = typer.Option(200, min=1, help="images the reference way runs per set"),
    seconds: float = typer.Option(1.0, min=0.05, help="streamed throughput: seconds per batch size"),
    compile: bool = typer.Option(True, "--compile/--no-compile"),
    graphs: bool = typer.Option(True, "--graphs/--no-graphs"),
    ceilings: str = typer.Option("routed,gpu,cpu,procs", help="decode-only ceilings per set: routed (the configured "
                                 "routing), gpu, torchvision, nvimgcodec, cpu (CPU threads), procs (decode processes)"),
    sets: str = typer.Option("", help="payload sets to measure, comma-separated (default: all; q75 always)"),
    cpu_share: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="route=share: plain JPEGs on CPU threads"),
    decode: str = typer.Option("auto", help="auto | gpu | cpu"),
    gpu_decoder: str = typer.Option("auto", help="auto | nvimgcodec | torchvision: the GPU JPEG decoder"),
    route: Optional[str] = typer.Option(None, help="measured | share (default: GpuConfig's)"),
    device: str = typer.Option("auto", help="auto | cuda | cpu (cpu: a smoke test of the same code)"),
    latency_reps: Optional[int] = typer.Option(None, min=2, help="batches timed one at a time per row "
                                               "(default: 2048 / batch, between 3 and 300)"),
    procs: Optional[int] = typer.Option(None, min=0, help="decode processes (0: none; default: GpuConfig's)"),
    proc_share: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="route=share: share for the processes"),
    proc_adapt: Optional[bool] = typer.Option(None, "--proc-adapt/--no-proc-adapt", help="route=share: adapt the share"),
) -> None:
    """GPU fast path vs the reference miner's way: images/s, latency p50/p99, decode-only ceilings, memory."""
    if sys.argv[0].endswith("gpurun.py"):
        cmd = "python -m roadcascade.bench.gpurun " + " ".join(sys.argv[1:])
    else:
        cmd = "roadcascade " + " ".join(sys.argv[1:])
    given = {"cpu_share": cpu_share, "route": route, "procs": procs, "proc_share": proc_share, "proc_adapt": proc_adapt}
    config = {k: v for k, v in given.items() if v is not None}
    config.update(decode=decode, gpu_decoder=gpu_decoder)
    spec = BenchSpec(bundle=bundle, batch_sizes=[int(s) for s in batch_sizes.split(",") if s.strip()], json_out=json_out,
                     images=images, native=native, data=data, n_images=n_images, sizes=_parse_sizes(sizes),
                     n_sized=n_sized, second_tier=second_tier, cascade_bundle=cascade_bundle, tau=tau, defer=defer,
                     ref_images=ref_images, seconds=seconds, device=device, command=cmd, latency_reps=latency_reps,
                     ceilings=tuple(c for c in ceilings.split(",") if c.strip()), config=config,
                     sets=tuple(c.strip() for c in sets.split(",") if c.strip()))
    print(format_table(run_bench(spec, compile, graphs)), flush=True)


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                w, h = (int(v) for v in part.lower().split("x"))
            except ValueError:
                raise typer.BadParameter(f"sizes are WxH, got {part!r}") from None
            out.append((w, h))
    return out


def _payloads_command(
    out: Path = typer.Option(..., help="folder to write q75/ and native/ into"),
    data: Optional[str] = typer.Option(None, help="dataset (default StreetWork)"),
    n_images: int = typer.Option(200, min=1),
    n_views: int = typer.Option(4, min=1),
    seed: int = typer.Option(1),
    split: str = typer.Option("test"),
) -> None:
    """Write the bench's payloads: 224x224 q75 challenge views and the native files."""
    print(json.dumps(make_payloads(out, data, n_images, n_views, seed, split)))


def main() -> None:
    app = typer.Typer(add_completion=False, no_args_is_help=True, help="GPU fast path benchmark (standalone)")
    app.command("bench")(_bench_command)
    app.command("payloads")(_payloads_command)
    app()


if __name__ == "__main__":
    main()
