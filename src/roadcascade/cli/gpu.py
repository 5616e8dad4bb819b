"""``roadcascade bench gpu``: the GPU fast path against the reference miner's way, same run, same images.

Registered by cli.py through ``_COMMAND_MODULES``; also runnable alone (no server dependencies):
``python -m roadcascade.cli.gpu bench --bundle B ...`` and ``... payloads --out DIR`` (writes the
validator-style 224x224 JPEG q75 challenge views and the native files the bench reads).

Measured per batch size, for (a) the reference miner's way (PIL decode, one image per fp32 forward pass:
``Cascade.predict([decode_bytes(b)])`` per image), (b) the fast path with the stage-1 model and (c) the
fast path with the whole cascade:

- throughput: ``GpuCascade.predict_stream`` over batches of B payloads for ``--seconds`` (decoding of
  later batches overlaps the model), images / wall second;
- latency: ``GpuCascade.predict_batch`` one batch at a time, bytes in host memory to probabilities on
  the host, p50 / p99 over the repeats;
- GPU memory (peak allocated by PyTorch, and in use on the device), the cascade's exit rates and how
  its time splits across decode, tiers and the rest; and how far the fast path's probabilities are from
  the reference's on the same images.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

SETS = ("q75", "native")


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
    files = sorted(p for p in d.iterdir() if p.is_file())
    if limit:
        files = files[:limit]
    return [p.read_bytes() for p in files]


# ----------------------------------------------------------------------------- measuring


def _pct(xs: list[float]) -> dict[str, float]:
    from ..metrics import percentiles

    a = np.asarray(xs, dtype=np.float64)
    return {**percentiles(a, (50, 99)), "mean": float(a.mean()) if len(a) else float("nan")}


def _batches(pool: list[bytes], b: int, start: int = 0):
    """Endless batches of b payloads cycling through the pool."""
    i = start
    n = len(pool)
    while True:
        yield [pool[(i + j) % n] for j in range(b)]
        i = (i + b) % n


LATENCY_REPS: int | None = None  # --latency-reps: batches timed one at a time per row (default 5-300 by batch size)


def _measure(gc, pool: list[bytes], b: int, seconds: float, torch) -> dict[str, Any]:
    """Latency (one batch at a time) and throughput (streamed) of a GpuCascade at batch size b."""
    reps = LATENCY_REPS or max(5, min(300, 4096 // b))
    gen = _batches(pool, b)
    for _ in range(3):  # warm this size (cudnn benchmark, allocator)
        gc.predict_batch(next(gen))
    if gc.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    lat = []
    for _ in range(reps):
        batch = next(gen)
        t0 = time.perf_counter()
        gc.predict_batch(batch)
        lat.append((time.perf_counter() - t0) * 1e3)
    # throughput: streamed, decoding overlapped with the model
    stop = {"t": None}
    t_end = [0.0]

    def feed():
        while stop["t"] is None or time.perf_counter() < stop["t"]:
            yield next(gen)

    n_img = 0
    n_batches = 0
    split = {"decode_ms": 0.0, "tier_ms": None, "gpu_decoded": 0, "cpu_decoded": 0, "proc_decoded": 0}
    exits = None
    t0 = time.perf_counter()
    stop["t"] = t0 + seconds
    min_batches = 4
    for res in gc.predict_stream(feed()):
        n_img += len(res)
        n_batches += 1
        split["decode_ms"] += res.decode_ms
        split["tier_ms"] = list(res.tier_ms) if split["tier_ms"] is None else [a + c for a, c in zip(split["tier_ms"], res.tier_ms)]
        split["gpu_decoded"] += res.n_gpu_decoded
        split["cpu_decoded"] += res.n_cpu_decoded
        split["proc_decoded"] += res.n_proc_decoded
        e = np.bincount(res.exit[res.exit >= 0], minlength=len(res.tier_ms))
        exits = e if exits is None else exits + e
        if n_batches < min_batches:
            stop["t"] = max(stop["t"], time.perf_counter() + 1e-3)
    wall = time.perf_counter() - t0
    t_end[0] = wall
    mem = gc.memory()
    tiers_us = [1e3 * t / n_img for t in split["tier_ms"]]
    return {
        "batch": b,
        "img_s": n_img / wall,
        "stream_images": n_img,
        "stream_batches": n_batches,
        "latency_ms": _pct(lat),
        "latency_reps": reps,
        "latency_img_s": b / (np.median(lat) / 1e3),
        "split_us_per_img": {
            "wall": 1e6 * wall / n_img,
            "decode_worker": 1e3 * split["decode_ms"] / n_img,  # in the decode workers, overlapped
            "tiers": tiers_us,
            "main_other": 1e6 * wall / n_img - sum(tiers_us),  # main thread outside tiers: waits, glue
        },
        "proc_share_end": getattr(gc, "proc_share_now", None),
        "gpu_decoded_frac": split["gpu_decoded"] / max(1, split["gpu_decoded"] + split["cpu_decoded"] + split["proc_decoded"]),
        "proc_decoded_frac": split["proc_decoded"] / max(1, split["gpu_decoded"] + split["cpu_decoded"] + split["proc_decoded"]),
        "exit_rates": (exits / max(1, exits.sum())).tolist() if exits is not None else [],
        "memory": mem,
    }


def _measure_rows(gc, pool: list[bytes], batch_sizes: list[int], seconds: float, torch, label: str) -> dict[int, dict]:
    """One table row per batch size (``_measure``), each logged as it is measured."""
    rows = {}
    for b in batch_sizes:
        r = rows[b] = _measure(gc, pool, b, seconds, torch)
        _log(f"{label} B={b}: {r['img_s']:.0f} img/s streamed, latency p50 {r['latency_ms']['p50']:.2f} "
             f"p99 {r['latency_ms']['p99']:.2f} ms, exits {r['exit_rates']}, split {r['split_us_per_img']}")
    return rows


def _reference(cascade, pool: list[bytes], n: int) -> dict[str, Any]:
    """The reference miner's way: PIL decode, one image per fp32 forward pass (Cascade.predict)."""
    from ..io.images import decode_bytes

    probs, lat = [], []
    cascade.predict([decode_bytes(pool[0])])  # warm
    t0 = time.perf_counter()
    for b in pool[:n]:
        t1 = time.perf_counter()
        probs.append(cascade.predict([decode_bytes(b)])[0].probability)
        lat.append((time.perf_counter() - t1) * 1e3)
    wall = time.perf_counter() - t0
    return {"img_s": len(probs) / wall, "latency_ms": _pct(lat), "images": len(probs), "_probs": probs}


def _reference_batched(cascade, pool: list[bytes], n: int, batch: int = 64) -> np.ndarray:
    """The CPU path's answers (PIL decode + resize, fp32) in batches, for the match statistics."""
    from ..io.images import decode_bytes

    out = []
    for i in range(0, min(n, len(pool)), batch):
        out += [p.probability for p in cascade.predict([decode_bytes(b) for b in pool[i:min(n, i + batch)]])]
    return np.asarray(out, dtype=np.float64)


def _match(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    d = np.abs(np.asarray(ref) - np.asarray(got))
    return {"n": int(len(d)), "max_abs_dp": float(d.max()), "mean_abs_dp": float(d.mean()),
            "p99_abs_dp": float(np.percentile(d, 99)),
            "decision_agreement": float(np.mean((np.asarray(ref) > 0.5) == (np.asarray(got) > 0.5)))}


def _pixel_match(gc, pool: list[bytes], n: int, torch) -> dict[str, float]:
    """GPU-decoded pixels against PIL's (images.decode_bytes) on the first n payloads."""
    from ..io.images import decode_bytes

    old = gc.cfg.decode
    gc.cfg.decode = "gpu"  # the GPU decoder for every row (no processes)
    try:
        dec = gc._decode(pool[:n], inline=True)
    finally:
        gc.cfg.decode = old
    mads, maxs = [], []
    for i in range(min(n, len(pool))):
        t = dec.images[i]
        if t is None:
            continue
        a = t.permute(1, 2, 0).cpu().numpy().astype(np.int16)
        r = decode_bytes(pool[i]).astype(np.int16)
        if a.shape != r.shape:
            continue
        d = np.abs(a - r)
        mads.append(float(d.mean()))
        maxs.append(int(d.max()))
    return {"n": len(mads), "gpu_decoded": dec.n_gpu, "mean_abs_px": float(np.mean(mads)) if mads else float("nan"),
            "max_abs_px": int(max(maxs)) if maxs else -1, "p99_image_mean_abs_px": float(np.percentile(mads, 99)) if mads else float("nan")}


def _compose_cascade(stage1, second, tau: float):
    """Stage-1 tier, then the second bundle's first tier; confidence rule at exit 0, last-tier fusion."""
    from ..cascade.runtime import Cascade, ConfidenceRule, ExitPoint, FinalRule, LastTierFusion

    t0, t1 = stage1.cascade.tiers[0], second.cascade.tiers[0]
    e0 = ExitPoint(LastTierFusion(), stage1.cascade.exits[0].threshold, ConfidenceRule(tau))
    e1 = ExitPoint(LastTierFusion(), second.cascade.exits[0].threshold, FinalRule())
    return Cascade([t0, t1], [e0, e1])


def run_bench(bundle: Path, batch_sizes: list[int], json_out: Path | None, images: Path | None, native: Path | None,
              data: str | None, n_images: int, second_tier: Path | None, cascade_bundle: Path | None, tau: float | None,
              defer: float,
              ref_images: int, seconds: float, compile_: bool, graphs: bool, sweep: bool, device: str,
              cpu_share: float | None, decode: str, command: str, gpu_decoder: str = "auto",
              procs: int | None = None, proc_share: float | None = None, proc_adapt: bool | None = None) -> dict[str, Any]:
    import torch

    from ..cascade.bundle import Bundle
    from ..accel.runtime import GpuCascade, GpuConfig

    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    info: dict[str, Any] = {
        "command": command,
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception:  # noqa: BLE001
        pass
    _log(f"device {info['device']}  torch {info['torch']}  cpus {info['cpus']}")

    # payload sets, in host memory
    pools: dict[str, list[bytes]] = {}
    if images is None or native is None:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "rc-gpu-payloads"
        if not (tmp / "q75").exists():
            _log(f"making payloads from {data or 'StreetWork'} -> {tmp}")
            make_payloads(tmp, data, n_images=n_images)
        images = images or tmp / "q75"
        native = native or tmp / "native"
    pools["q75"] = _read_dir(images)
    pools["native"] = _read_dir(native)
    info["images"] = {k: {"n": len(v), "mean_bytes": float(np.mean([len(b) for b in v]))} for k, v in pools.items()}
    _log(f"payloads: {info['images']}")

    result: dict[str, Any] = {"info": info, "reference": {}, "stage1": {}, "cascade": {}, "match": {}, "micro": {},
                              "sweep": {}, "config": {}}

    def save() -> None:
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(_public(result), indent=2, default=float))

    # (a) the reference miner's way
    ref_b = Bundle.load(bundle, device=dev)
    for name, pool in pools.items():
        r = _reference(ref_b.cascade, pool, ref_images)
        result["reference"][name] = r
        _log(f"(a) reference {name}: {r['img_s']:.1f} img/s, p50 {r['latency_ms']['p50']:.2f} ms")
    save()

    # (b) the fast path, stage-1
    cfg = GpuConfig(compile=compile_, graphs=graphs, decode=decode, gpu_decoder=gpu_decoder)
    if cpu_share is not None:
        cfg.cpu_share = cpu_share
    if procs is not None:
        cfg.procs = procs
    if proc_share is not None:
        cfg.proc_share = proc_share
    if proc_adapt is not None:
        cfg.proc_adapt = proc_adapt
    result["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items() if k != "limits"}
    s1 = Bundle.load(bundle, device=torch.device("cpu"))
    t0 = time.perf_counter()
    gc1 = GpuCascade(s1.cascade, device=dev, config=cfg, log=_log)
    eng = gc1.engines[0]
    result["stage1"]["warmup_s"] = time.perf_counter() - t0
    result["stage1"]["compile"] = {"compiled": eng.compiled, "compile_s": eng.compile_s, "capture_s": eng.capture_s,
                                   "bn_folded": eng.folded}
    _log(f"(b) warm-up {result['stage1']['warmup_s']:.1f} s (compile {eng.compile_s:.1f} s, graphs {eng.capture_s:.1f} s, "
         f"compiled={eng.compiled}, {eng.folded} BN folded)")
    fast_q75 = None
    for name, pool in pools.items():
        ref = np.asarray(result["reference"][name]["_probs"])
        got_all = np.concatenate([gc1.predict_batch(pool[i:i + 256]).probability for i in range(0, len(pool), 256)])
        if name == "q75":
            fast_q75 = got_all
        got = got_all[:len(ref)]
        result["match"][f"stage1_{name}"] = _match(ref, got)
        if cuda:
            result["match"][f"pixels_{name}"] = _pixel_match(gc1, pool, 64, torch)
        _log(f"    match {name}: {result['match'][f'stage1_{name}']}")
    save()
    # sweep first: decoder and routing (run-time switches, no recompile); the best is used below. Each
    # nvImageCodec variant runs with only its own decoder alive (idle decoders left open slowed the others).
    if sweep and cuda:
        import sys
        from concurrent.futures import ThreadPoolExecutor

        from ..accel.runtime import NvImgCodecDecoder, nvimgcodec_available

        pool = pools["q75"]
        base_switch, base_workers = sys.getswitchinterval(), gc1.cfg.decode_workers
        if gc1.nvdec is not None:
            gc1.nvdec.close()
            gc1.nvdec = None
        hw0 = gc1.cfg.nvimg_hw_share
        ncpu = os.cpu_count() or 2
        # decoder, nvimg hw share, cpu share, GIL switch ms, decode workers, decode processes, their share
        variants: list[tuple[str, float, float, float | None, int, int, float]] = [
            ("torchvision", 0.0, 0.0, None, 2, 0, 0.0), ("torchvision", 0.0, 0.0, None, 3, 0, 0.0)]
        for n_procs in sorted({max(2, ncpu // 2), max(2, ncpu - 4)}):
            for workers in (2, 3):
                variants += [("torchvision", 0.0, 0.0, None, workers, n_procs, share) for share in (0.5, 0.7, -0.5)]
        if nvimgcodec_available():
            variants += [("nvimgcodec", hw0, 0.0, None, 2, 0, 0.0), ("nvimgcodec", 1.0, 0.0, None, 2, max(2, ncpu // 2), 0.5)]
        scores = {}

        def use(dec_name: str, hw: float, share: float, sw: float | None, workers: int, n_procs: int,
                p_share: float) -> None:
            if gc1.nvdec is not None:
                gc1.nvdec.close()
                gc1.nvdec = None
            if dec_name == "nvimgcodec":
                gc1.nvdec = NvImgCodecDecoder(dev, hw, gc1.cfg.nvimg_threads)
            if (gc1.procs.workers if gc1.procs is not None else 0) != n_procs:
                gc1.start_procs(n_procs)
            gc1.gpu_decoder = dec_name
            gc1.cfg.decode, gc1.cfg.cpu_share, gc1.cfg.decode_workers = "auto", share, workers
            gc1.cfg.procs, gc1.cfg.proc_share = n_procs, abs(p_share)
            gc1.cfg.proc_adapt, gc1.proc_share_now = p_share < 0, abs(p_share)  # negative: adaptive, from |share|
            gc1.cfg.nvimg_hw_share = hw if dec_name == "nvimgcodec" else hw0
            gc1.cfg.gil_switch_ms = sw
            sys.setswitchinterval(base_switch if sw is None else sw / 1e3)
            gc1._workers.shutdown(wait=True)
            gc1._workers = ThreadPoolExecutor(workers, thread_name_prefix="rc-gpu-prep")

        for v in variants:
            dec_name, hw, share, sw, workers, n_procs, p_share = v
            use(*v)
            key = f"{dec_name}" + (f" hw_share={hw}" if dec_name == "nvimgcodec" else "") + \
                  (f" cpu_share={share}" if share else "") + (f" gil_switch={sw}ms" if sw else "") + \
                  f" workers={workers}" + (f" procs={n_procs} proc_share=" + (f"adaptive from {-p_share}" if p_share < 0
                                                                            else f"{p_share}") if n_procs else "")
            res = {b: _measure(gc1, pool, b, min(seconds, 0.5), torch) for b in (256, 1024)}
            result["sweep"][key] = {b: {"img_s": r["img_s"], "p50": r["latency_ms"]["p50"], "p99": r["latency_ms"]["p99"],
                                        "gpu_decoded_frac": r["gpu_decoded_frac"], "proc_frac": r["proc_decoded_frac"]}
                                    for b, r in res.items()}
            scores[v] = np.mean([r["img_s"] for r in res.values()])
            _log(f"sweep {key}: {result['sweep'][key]}")
        best = max(scores, key=scores.get)
        use(*best)
        if cpu_share is not None:
            gc1.cfg.cpu_share = cpu_share
        result["sweep"]["chosen"] = {"gpu_decoder": best[0], "nvimg_hw_share": gc1.cfg.nvimg_hw_share,
                                     "cpu_share": gc1.cfg.cpu_share, "gil_switch_ms": best[3], "decode_workers": best[4],
                                     "procs": best[5], "proc_share": abs(best[6]), "proc_adapt": best[6] < 0}
        result["config"].update(result["sweep"]["chosen"])
        _log(f"sweep: chose {result['sweep']['chosen']} for the measurements below")
        save()
    result["config"]["gpu_decoder"] = gc1.gpu_decoder
    for name, pool in pools.items():
        result["stage1"][name] = _measure_rows(gc1, pool, batch_sizes, seconds, torch, f"(b) stage-1 {name}")
        save()

    # micro: model alone and decoding alone at the largest graph size
    if cuda:
        bb = max(cfg.graph_sizes)
        pool = pools["q75"]
        dec = gc1._decode(pool[:bb], inline=True)
        torch.cuda.synchronize()
        x = dec.x0
        with torch.inference_mode():
            for _ in range(3):
                eng.logits(x)
            torch.cuda.synchronize()
            reps = 30
            t0 = time.perf_counter()
            for _ in range(reps):
                eng.logits(x)
            torch.cuda.synchronize()
        result["micro"]["model_only_img_s"] = reps * bb / (time.perf_counter() - t0)
        from ..accel.runtime import NvImgCodecDecoder, nvimgcodec_available

        keep = gc1.nvdec
        modes = ["gpu_torchvision", "cpu"] + (["gpu_nvimgcodec"] if nvimgcodec_available() else []) + \
            ([f"procs{gc1.procs.workers}"] if gc1.procs is not None else [])
        for key in modes:
            old = (gc1.cfg.decode, gc1.cfg.cpu_share, gc1.cfg.proc_share, gc1.cfg.proc_adapt)
            gc1.cfg.decode, gc1.cfg.cpu_share = ("cpu" if key == "cpu" else "gpu"), 0.0
            if key.startswith("procs"):
                gc1.cfg.decode, gc1.cfg.proc_share, gc1.cfg.proc_adapt = "auto", 1.0, False
            if key == "gpu_nvimgcodec":
                gc1.nvdec = keep if keep is not None else NvImgCodecDecoder(dev, gc1.cfg.nvimg_hw_share, gc1.cfg.nvimg_threads)
            else:
                gc1.nvdec = None
            try:
                gc1._decode(pool[:bb], inline=True)
                t0 = time.perf_counter()
                for k in range(5):
                    gc1._decode(pool[(k * bb) % len(pool):][:bb] or pool[:bb], inline=True)
                    torch.cuda.synchronize()
                result["micro"][f"decode_only_{key}_img_s"] = 5 * bb / (time.perf_counter() - t0)
            finally:
                if gc1.nvdec is not None and gc1.nvdec is not keep:
                    gc1.nvdec.close()
                gc1.cfg.decode, gc1.cfg.cpu_share, gc1.cfg.proc_share, gc1.cfg.proc_adapt = old
                gc1.nvdec = keep
        _log(f"micro: {result['micro']}")
        save()

    gc1.close()
    del gc1
    if cuda:
        torch.cuda.empty_cache()

    # (c) the fast path, whole cascade
    casc = None
    if cascade_bundle is not None:
        casc = Bundle.load(cascade_bundle, device=torch.device("cpu")).cascade
        result["cascade"]["source"] = str(cascade_bundle)
    elif second_tier is not None:
        if tau is None:  # defer the given share of the q75 set to the second tier
            tau = float(np.quantile(np.abs(fast_q75[np.isfinite(fast_q75)] - 0.5), defer))
        casc = _compose_cascade(s1, Bundle.load(second_tier, device=torch.device("cpu")), tau)
        result["cascade"]["source"] = f"{bundle} + {second_tier}, confidence tau={tau}"
    if casc is not None:
        result["cascade"]["tiers"] = casc.tier_names
        t0 = time.perf_counter()
        import dataclasses

        c2 = dataclasses.replace(cfg, cpu_share=result["config"]["cpu_share"], gpu_decoder=result["config"]["gpu_decoder"] if cuda else "auto",
                                 nvimg_hw_share=result["config"].get("nvimg_hw_share", cfg.nvimg_hw_share),
                                 gil_switch_ms=result["config"].get("gil_switch_ms"),
                                 decode_workers=result["config"].get("decode_workers", cfg.decode_workers),
                                 procs=result["config"].get("procs", cfg.procs),
                                 proc_share=result["config"].get("proc_share", cfg.proc_share),
                                 proc_adapt=result["config"].get("proc_adapt", cfg.proc_adapt))
        gc2 = GpuCascade(casc, device=dev, config=c2, log=_log)
        result["cascade"]["warmup_s"] = time.perf_counter() - t0
        _log(f"(c) cascade {casc.tier_names} warm-up {result['cascade']['warmup_s']:.1f} s")
        # reference answers of the same cascade on the CPU path (fp32 on the device), for the match
        if cascade_bundle is not None:
            ref_c = Bundle.load(cascade_bundle, device=dev).cascade
        else:
            ref_c = _compose_cascade(Bundle.load(bundle, device=dev), Bundle.load(second_tier, device=dev), tau)
        for name, pool in pools.items():
            n = min(len(pool), max(ref_images, 256))
            ref = _reference_batched(ref_c, pool, n)
            got = np.concatenate([gc2.predict_batch(pool[i:i + 256]).probability for i in range(0, n, 256)])[:n]
            result["match"][f"cascade_{name}"] = _match(ref, got)
            _log(f"    match cascade {name}: {result['match'][f'cascade_{name}']}")
        del ref_c
        for name, pool in pools.items():
            result["cascade"][name] = _measure_rows(gc2, pool, batch_sizes, seconds, torch, f"(c) cascade {name}")
            save()
        gc2.close()
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


def format_table(res: dict[str, Any]) -> str:
    lines = [f"device: {res['info']['device']}  torch {res['info']['torch']}  torchvision {res['info'].get('torchvision')}",
             f"command: {res['info']['command']}",
             f"GPU JPEG decoder: {res.get('config', {}).get('gpu_decoder')}  config: "
             + json.dumps({k: res.get("config", {}).get(k) for k in ("nvimg_hw_share", "cpu_share", "gil_switch_ms")})]
    for k, v in (res.get("sweep") or {}).items():
        if k != "chosen":
            lines.append(f"sweep {k}: " + "  ".join(f"B={b} {r['img_s']:.0f} img/s" for b, r in v.items()))
    hdr = f"{'set':<7}{'path':<22}{'batch':>6}{'img/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x ref':>8}{'peak MiB':>10}"
    for name in SETS:
        ref = res["reference"].get(name)
        if not ref:
            continue
        lines += ["", hdr]
        lines.append(f"{name:<7}{'(a) reference':<22}{1:>6}{ref['img_s']:>10.1f}{ref['latency_ms']['p50']:>9.2f}"
                     f"{ref['latency_ms']['p99']:>9.2f}{1.0:>8.1f}{'':>10}")
        for key, label in (("stage1", "(b) fast stage-1"), ("cascade", "(c) fast cascade")):
            rows = res.get(key, {}).get(name) or {}
            for b, r in rows.items():
                lines.append(f"{name:<7}{label:<22}{b:>6}{r['img_s']:>10.0f}{r['latency_ms']['p50']:>9.2f}"
                             f"{r['latency_ms']['p99']:>9.2f}{r['img_s'] / ref['img_s']:>8.0f}"
                             f"{r['memory'].get('peak_allocated_mib', float('nan')):>10.0f}")
    if res.get("match"):
        lines.append("")
        for k, v in res["match"].items():
            lines.append(f"match {k}: {v}")
    if res.get("micro"):
        lines.append(f"micro: {res['micro']}")
    for name in SETS:
        rows = res.get("cascade", {}).get(name) or {}
        for b, r in rows.items():
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
    second_tier: Optional[Path] = typer.Option(None, help="bundle whose first tier follows stage-1 in a composed cascade"),
    cascade_bundle: Optional[Path] = typer.Option(None, help="a cascade bundle for (c) (instead of --second-tier)"),
    tau: Optional[float] = typer.Option(None, help="composed cascade: confidence rule at exit 0 (stop when |p - 0.5| >= tau); "
                                        "default: the value that defers --defer of the q75 images"),
    defer: float = typer.Option(0.25, min=0.0, max=1.0, help="composed cascade: share of q75 images sent on (sets tau)"),
    ref_images: int = typer.Option(200, min=1, help="images the reference way runs per set"),
    seconds: float = typer.Option(1.0, min=0.05, help="streamed throughput: seconds per batch size"),
    compile: bool = typer.Option(True, "--compile/--no-compile"),
    graphs: bool = typer.Option(True, "--graphs/--no-graphs"),
    sweep: bool = typer.Option(False, "--sweep/--no-sweep", help="also time decoder and routing variants (the best is used for the table)"),
    cpu_share: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="share of plain JPEGs decoded on CPU threads "
                                              "instead of nvJPEG (default: GpuConfig's; with --sweep: the best measured)"),
    decode: str = typer.Option("auto", help="auto | gpu | cpu"),
    gpu_decoder: str = typer.Option("auto", help="auto | nvimgcodec | torchvision: the GPU JPEG decoder (auto: "
                                    "torchvision, measured faster); --sweep times both"),
    device: str = typer.Option("auto", help="auto | cuda | cpu (cpu: a smoke test of the same code)"),
    latency_reps: Optional[int] = typer.Option(None, min=2, help="batches timed one at a time per row "
                                               "(default: 4096 / batch, between 5 and 300)"),
    procs: Optional[int] = typer.Option(None, min=0, help="decode processes (0: none; default: GpuConfig's; "
                                        "with --sweep: the best measured)"),
    proc_share: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="share of each batch for the decode processes "
                                               "(the start value when adaptive)"),
    proc_adapt: Optional[bool] = typer.Option(None, "--proc-adapt/--no-proc-adapt", help="adapt the share after each batch "
                                              "(default: GpuConfig's)"),
) -> None:
    """GPU fast path vs the reference miner's way: images/s, latency p50/p99, memory, cascade split."""
    global LATENCY_REPS
    LATENCY_REPS = latency_reps
    sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
    if sys.argv[0].endswith("gpu_commands.py"):
        cmd = "python -m roadcascade.cli.gpu " + " ".join(sys.argv[1:])
    else:
        cmd = "roadcascade " + " ".join(sys.argv[1:])
    res = run_bench(bundle, sizes, json_out, images, native, data, n_images, second_tier, cascade_bundle, tau, defer,
                    ref_images, seconds, compile, graphs, sweep, device, cpu_share, decode, cmd, gpu_decoder=gpu_decoder,
                    procs=procs, proc_share=proc_share, proc_adapt=proc_adapt)
    print(format_table(res), flush=True)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("gpu")(_bench_command)


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
