"""Measurements behind ``roadcascade bench gpu`` (the command is :mod:`roadcascade.bench.gpurun`): payload sets, the
reference miner's way, streamed throughput and latency of a :class:`~roadcascade.accel.runtime.GpuCascade`,
decode-only ceilings, and how far its answers are from the CPU path's.

Payload sets: ``q75`` (224x224 JPEG q75 challenge views), ``native`` (StreetWork's stored files) and, made
from those real photos (:func:`roadcascade.bench.native.native_payloads`: upscaled, JPEG q90), ``1920x1080``
and ``4032x3024``.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_dir", "sized_sets", "measure_row", "decode_ceiling", "reference_speed", "reference_probs", "match",
           "pixel_match", "stage_speeds"]


def read_dir(d: Path, limit: int | None = None) -> list[bytes]:
    files = sorted(p for p in d.iterdir() if p.is_file())
    return [p.read_bytes() for p in (files[:limit] if limit else files)]


def _upscale(args: tuple[bytes, tuple[int, int]]) -> bytes:
    from ..io.images import decode_bytes
    from .native import upscaled_jpeg

    data, size = args
    return upscaled_jpeg(decode_bytes(data), size)


def sized_sets(photos: Sequence[bytes], sizes: Sequence[tuple[int, int]], workers: int = 8) -> dict[str, list[bytes]]:
    """``"<w>x<h>"`` -> every photo upscaled to that size as JPEG q90 (bench.native's payloads), made in
    ``workers`` forked processes (call before CUDA starts in this process)."""
    out: dict[str, list[bytes]] = {}
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        for w, h in sizes:
            out[f"{w}x{h}"] = pool.map(_upscale, [(p, (w, h)) for p in photos], chunksize=2)
    return out


def _pct(xs: Sequence[float]) -> dict[str, float]:
    from ..metrics import percentiles

    a = np.asarray(xs, dtype=np.float64)
    return {**percentiles(a, (50, 99)), "mean": float(a.mean()) if len(a) else float("nan")}


def batches(pool: Sequence[bytes], b: int, start: int = 0) -> Iterator[list[bytes]]:
    """Endless batches of b payloads cycling through the pool."""
    i, n = start, len(pool)
    while True:
        yield [pool[(i + j) % n] for j in range(b)]
        i = (i + b) % n


def _timed(gen: Iterator, seconds: float, min_items: int = 3) -> Iterator:
    """Items of ``gen`` until ``seconds`` have passed (at least ``min_items``)."""
    t_end = time.perf_counter() + seconds
    for k, x in enumerate(gen):
        if k >= min_items and time.perf_counter() >= t_end:
            return
        yield x


def latency(gc, gen: Iterator, reps: int) -> list[float]:
    """Milliseconds of ``predict_batch`` per batch, one at a time (bytes in host memory to answers on the host)."""
    lat = []
    for _ in range(reps):
        batch = next(gen)
        t0 = time.perf_counter()
        gc.predict_batch(batch)
        lat.append((time.perf_counter() - t0) * 1e3)
    return lat


def stream(gc, gen: Iterator, seconds: float) -> dict[str, Any]:
    """``predict_stream`` for ``seconds``: images per wall second, and where the time went."""
    n_img = n_gpu = n_cpu = n_proc = 0
    dec_ms, tier_ms, exits = 0.0, None, None
    t0 = time.perf_counter()
    for res in gc.predict_stream(_timed(gen, seconds)):
        n_img += len(res)
        dec_ms += res.decode_ms
        tier_ms = list(res.tier_ms) if tier_ms is None else [a + c for a, c in zip(tier_ms, res.tier_ms)]
        n_gpu, n_cpu, n_proc = n_gpu + res.n_gpu_decoded, n_cpu + res.n_cpu_decoded, n_proc + res.n_proc_decoded
        e = np.bincount(res.exit[res.exit >= 0], minlength=len(res.tier_ms))
        exits = e if exits is None else exits + e
    wall = time.perf_counter() - t0
    tiers_us = [1e3 * t / n_img for t in tier_ms]
    total = max(1, n_gpu + n_cpu + n_proc)
    return {"img_s": n_img / wall, "stream_images": n_img,
            "split_us_per_img": {"wall": 1e6 * wall / n_img, "decode_worker": 1e3 * dec_ms / n_img, "tiers": tiers_us,
                                 "main_other": 1e6 * wall / n_img - sum(tiers_us)},
            "gpu_decoded_frac": n_gpu / total, "cpu_decoded_frac": n_cpu / total, "proc_decoded_frac": n_proc / total,
            "exit_rates": (exits / max(1, exits.sum())).tolist() if exits is not None else []}


def measure_row(gc, pool: Sequence[bytes], b: int, seconds: float, reps: int | None = None) -> dict[str, Any]:
    """One table row: latency (one batch at a time) and throughput (streamed) at batch size b."""
    import torch

    reps = reps or max(3, min(300, 2048 // b))
    gen = batches(pool, b)
    for _ in range(3 if b <= 64 else 1):  # warm this size (cudnn benchmark, allocator, router)
        gc.predict_batch(next(gen))
    if gc.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    lat = latency(gc, gen, reps)
    row = {"batch": b, **stream(gc, gen, seconds), "latency_ms": _pct(lat), "latency_reps": reps,
           "latency_img_s": b / (np.median(lat) / 1e3), "memory": gc.memory()}
    row["rates_mps"] = dict(gc.decoder.router.rates)
    return row


def decode_ceiling(gc, pool: Sequence[bytes], b: int, seconds: float, decode: str | None = None) -> float:
    """Images per second of decoding alone (``decode_stream``: the same decode workers, routing and resize to the
    first tier's input, waited for on the device, no model). ``decode``: force one decoder (``gpu``: the GPU
    decoder as configured, ``torchvision`` / ``nvimgcodec``: that GPU decoder, ``cpu``: the CPU threads, ``procs``: the
    decode processes only), else the routing as configured."""
    import torch

    cfg = gc.cfg
    old = (cfg.decode, cfg.route, cfg.proc_share)
    keep, made = gc.nvdec, None
    if decode == "procs":
        cfg.decode, cfg.route, cfg.proc_share = "auto", "share", 1.0
    elif decode == "nvimgcodec":  # nvImageCodec (hardware JPEG engines + its CPU threads) for every plain JPEG
        from ..accel.decode import NvImgCodecDecoder

        if keep is None:
            made = gc.nvdec = NvImgCodecDecoder(gc.device, cfg.nvimg_hw_share, cfg.nvimg_threads)
        cfg.decode = "gpu"
    elif decode == "torchvision":
        gc.nvdec, cfg.decode = None, "gpu"
    elif decode is not None:
        cfg.decode = decode
    try:
        gen = batches(pool, b)
        for dec in gc.decode_stream([next(gen)]):
            pass
        n = 0
        t0 = time.perf_counter()
        for dec in gc.decode_stream(_timed(gen, seconds)):
            if dec.event is not None:
                dec.event.synchronize()
            n += dec.n
        if gc.cuda:
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)
    finally:
        cfg.decode, cfg.route, cfg.proc_share = old
        gc.nvdec = keep
        if made is not None:
            made.close()


def reference_speed(cascade, pool: Sequence[bytes], n: int) -> dict[str, Any]:
    """The reference miner's way: PIL decode (full size), one image per fp32 forward pass (Cascade.predict)."""
    from ..io.images import decode_bytes

    lat = []
    cascade.predict([decode_bytes(pool[0])])  # warm
    t0 = time.perf_counter()
    for b in pool[:n]:
        t1 = time.perf_counter()
        cascade.predict([decode_bytes(b)])
        lat.append((time.perf_counter() - t1) * 1e3)
    return {"img_s": len(lat) / (time.perf_counter() - t0), "latency_ms": _pct(lat), "images": len(lat)}


def reference_probs(cascade, pool: Sequence[bytes], n: int, min_size: int | None = None, batch: int = 32) -> np.ndarray:
    """The CPU path's answers (PIL decode, full size or reduced to ``min_size``, PIL resize, fp32), in batches."""
    from ..io.images import decode_bytes

    out: list[float] = []
    for i in range(0, min(n, len(pool)), batch):
        chunk = pool[i:min(n, i + batch)]
        out += [p.probability for p in cascade.predict([decode_bytes(b, min_size=min_size) for b in chunk])]
    return np.asarray(out, dtype=np.float64)


def match(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    d = np.abs(np.asarray(ref) - np.asarray(got))
    return {"n": int(len(d)), "max_abs_dp": float(d.max()), "mean_abs_dp": float(d.mean()),
            "p99_abs_dp": float(np.percentile(d, 99)),
            "decision_agreement": float(np.mean((np.asarray(ref) > 0.5) == (np.asarray(got) > 0.5)))}


def pixel_match(gc, pool: Sequence[bytes], n: int) -> dict[str, float]:
    """GPU-decoded pixels against PIL's (images.decode_bytes, full size) on the first n payloads."""
    from ..io.images import decode_bytes

    old = gc.cfg.decode
    gc.cfg.decode = "gpu"  # the GPU decoder for every row (no processes)
    try:
        dec = gc._decode(pool[:n], inline=True, keep=True)
    finally:
        gc.cfg.decode = old
    mads, maxs = [], []
    for i in range(min(n, len(pool))):
        t = dec.images[i]
        if t is None:
            continue
        a = t.permute(1, 2, 0).cpu().numpy().astype(np.int16)
        r = decode_bytes(pool[i]).astype(np.int16)
        if a.shape == r.shape:
            d = np.abs(a - r)
            mads.append(float(d.mean()))
            maxs.append(int(d.max()))
    return {"n": len(mads), "gpu_decoded": dec.n_gpu, "mean_abs_px": float(np.mean(mads)) if mads else float("nan"),
            "max_abs_px": int(max(maxs)) if maxs else -1,
            "p99_image_mean_abs_px": float(np.percentile(mads, 99)) if mads else float("nan")}


def stage_speeds(gc, name: str, pool: Sequence[bytes], batch_sizes: Sequence[int], seconds: float,
                 reps: int | None, ceilings: Sequence[str], log) -> dict[str, Any]:
    """One payload set on the fast path: a row per batch size, then the decode-only ceilings at the largest
    batch size up to 256 (routing as configured, and each decoder alone), in the same run."""
    rows = {}
    for b in batch_sizes:
        r = rows[b] = measure_row(gc, pool, b, seconds, reps)
        log(f"{name} B={b}: {r['img_s']:.0f} img/s streamed, latency p50 {r['latency_ms']['p50']:.2f} "
            f"p99 {r['latency_ms']['p99']:.2f} ms, gpu/cpu/proc {r['gpu_decoded_frac']:.2f}/{r['cpu_decoded_frac']:.2f}/"
            f"{r['proc_decoded_frac']:.2f}, rates {({k: round(v) for k, v in r['rates_mps'].items()})}, "
            f"split {({k: np.round(v, 1).tolist() for k, v in r['split_us_per_img'].items()})}")
    bc = max([b for b in batch_sizes if b <= 256] or [max(batch_sizes)])
    ceil = {"batch": bc}
    for mode in ceilings:
        if mode == "procs" and gc.procs is None:
            continue
        try:
            ceil[mode] = decode_ceiling(gc, pool, bc, seconds, None if mode == "routed" else mode)
        except Exception as e:  # noqa: BLE001 - an optional decoder that is not installed: say so, go on
            log(f"{name}: no {mode} ceiling ({type(e).__name__}: {e})")
    log(f"{name} decode-only ceilings at B={bc}: " + ", ".join(f"{k} {v:.0f}" for k, v in ceil.items() if k != "batch"))
    return {"rows": rows, "decode_ceiling": ceil}
