"""Routing and decoding one batch for the GPU fast path: payload bytes -> the first tier's input on the device.

::

    payloads ─ header walk (accel.jpeg, µs per image) ─┬─ plain JPEGs: split by measured MP/s (accel.route) ─┐
                                                      └─ anything else: processes / exact CPU path          │
      ┌──────────────────────────────────────────────────────────────────────────────────────────────────┘
      ├─ GPU decoder (nvJPEG / nvImageCodec), in calls of at most gpu_chunk_mpix megapixels: full-size decode,
      │  resize on the GPU right away (antialiased float32 for large images, PIL-exact for small ones), then
      │  the full-size images are dropped (memory bounded at any batch size)
      ├─ CPU threads (libjpeg-turbo via OpenCV, GIL released): reduced-size DCT decode into pinned memory,
      │  one copy, resize on the GPU
      └─ decode processes (accel.procdecode): the CPU path's reduced decode + resize, one copy per batch
                     v
      (n, 3, S, S) uint8 on the device, channels_last, row order; BadImage where the input was bad

Rows the GPU decoder refuses, and payloads the header walk does not pass, take the exact CPU path
(``images.decode_bytes``), whose pixels and errors are the CPU runtime's. ``route="share"`` keeps the older fixed
split (a share of the batch to the processes, the rest to the GPU decoder), tuned on 224x224 views.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..io.images import BadImage, decode_any, decode_bytes, draft_scale
from .config import GpuConfig, adapt_share
from .decode import Decoded, NvImgCodecDecoder, Payload, Pinned, decode_into, reduced_dims
from .jpeg import jpeg_gpu_info
from .resize import resize_group, shape_groups
from .route import Router

__all__ = ["BatchDecoder", "Plan", "plan_rows"]

_BYTES = (bytes, bytearray, memoryview)


@dataclass
class Plan:
    """Which rows of a batch go where; ``hw`` holds the header sizes of the plain JPEGs."""

    gpu: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    procs: list[int] = field(default_factory=list)
    exact: list[int] = field(default_factory=list)
    hw: dict[int, tuple[int, int]] = field(default_factory=dict)


def plan_rows(payloads: Sequence[Payload], cfg: GpuConfig, cuda: bool, router: Router, procs_ok: bool,
              share: float) -> Plan:
    """Route a batch (pure but for the header walk): see the module docstring. ``procs_ok``: the decode
    processes run and the batch is large enough for them; ``share``: their fixed share (``route="share"``)."""
    plan = Plan()
    n = len(payloads)
    byte_rows = [i for i in range(n) if isinstance(payloads[i], _BYTES)]
    plan.exact = [i for i in range(n) if not isinstance(payloads[i], _BYTES)]
    use_procs = procs_ok and (cfg.decode == "auto" or not cuda)
    measured = cfg.route == "measured" and cuda and cfg.decode == "auto"
    rest = byte_rows
    if use_procs and not measured:  # the fixed share, before any per-image work
        plan.procs = byte_rows[:int(round(share * len(byte_rows)))]
        rest = byte_rows[len(plan.procs):]
    plain: list[int] = []
    for i in rest:
        hw = jpeg_gpu_info(payloads[i], cfg.limits) if cuda else None
        if hw is None:
            (plan.procs if measured and use_procs else plan.exact).append(i)
        else:
            plan.hw[i] = hw
            plain.append(i)
    if not plain:
        return plan
    if measured:
        paths = ["gpu"] + (["threads"] if cfg.route_threads and cfg.cpu_threads > 0 else []) + \
            (["procs"] if use_procs else [])
        mp = np.array([plan.hw[i][0] * plan.hw[i][1] for i in plain], dtype=np.float64) / 1e6
        cut = router.split(mp, paths)
        for p, (a, b) in cut.items():
            getattr(plan, p).extend(plain[a:b])
        if plan.procs and len(plan.procs) > 1:
            plan.procs.sort()
        return plan
    if cfg.decode == "cpu" or (cfg.decode == "auto" and len(plain) < cfg.gpu_decode_min):
        plan.threads = plain
    else:
        n_fast = int(round(cfg.cpu_share * len(plain)))
        plan.gpu, plan.threads = plain[:len(plain) - n_fast], plain[len(plain) - n_fast:]
    return plan


class BatchDecoder:
    """The decoders of one GpuCascade (GPU decoder, CPU threads, decode processes), the router between them,
    and the per-thread staging (pinned buffers, a CUDA stream). ``decode(payloads)`` -> :class:`Decoded`;
    ``gather(dec, rows, size)`` -> a later tier's input; ``host_image(dec, i)`` -> HxWx3 for CPU-only tiers."""

    def __init__(self, device: torch.device, cfg: GpuConfig, first_size: int | None, min_size: int | None,
                 keep_images: bool, log: Callable[[str], None]):
        self.device, self.cfg, self.log = device, cfg, log
        self.cuda = device.type == "cuda"
        self.first_size = first_size  # the first tier's input size (None: no engine first)
        self.min_size = min_size if cfg.reduced_decode else None  # reduced-size decode on the CPU decoders
        self.keep_images = keep_images  # later tiers or CPU-only tiers need decoded images
        self.exact_max_px = cfg.exact_resize_max_px if self.cuda else None  # the CPU runtime stays PIL-exact
        self.router = Router(rates=dict(zip(("gpu", "threads", "procs"), cfg.rate_priors_mps)))
        self._local = threading.local()
        self._gpu_timings: list[tuple] = []  # the GPU decoder's calls, read by _observe_gpu once finished
        self._timing_lock = threading.Lock()
        self._cpu_pool = ThreadPoolExecutor(max(1, cfg.cpu_threads), thread_name_prefix="rc-gpu-cpudec")
        self.nvdec: NvImgCodecDecoder | None = None
        self.gpu_decoder = "none"
        if self.cuda:
            if cfg.gpu_decoder == "nvimgcodec":
                self.nvdec = NvImgCodecDecoder(device, cfg.nvimg_hw_share, cfg.nvimg_threads)
            self.gpu_decoder = "nvimgcodec" if self.nvdec is not None else "torchvision"
        self.procs = None
        self.proc_share_now = cfg.proc_share  # the adapted share (route="share" with proc_adapt)

    # -- set-up ---------------------------------------------------------------------------------

    def start_procs(self, n: int) -> None:
        """(Re)start the decode processes with ``n`` workers (0: none), for the first tier's input size only
        (later tiers see few rows, see gather). Raises RuntimeError when they cannot start."""
        if self.procs is not None:
            self.procs.close()
            self.procs = None
        if n > 0 and self.first_size is not None:
            from .procdecode import DecodeProcs

            self.procs = DecodeProcs(n, [self.first_size], self.cfg.limits, pin=self.cuda, min_size=self.min_size)
            self.log(f"{n} decode processes ({self.procs.start_method}) for size {self.first_size}, "
                     f"reduced decode to {self.min_size}")
        self.router.enabled["procs"] = self.procs is not None

    def close(self) -> None:
        if self.nvdec is not None:
            self.nvdec.close()
        self.start_procs(0)
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)

    def _state(self):
        st = self._local
        if not hasattr(st, "pinned"):
            st.pinned = Pinned() if self.cuda else None
            st.stream = torch.cuda.Stream(self.device) if self.cuda else None
        return st

    # -- one batch ------------------------------------------------------------------------------

    def decode(self, payloads: Sequence[Payload], inline: bool = False, keep: bool | None = None) -> Decoded:
        """Route, decode and make the first tier's input. Runs in a decode worker (or the caller: ``inline``).
        ``keep``: also keep every decoded image on the device (default: when later tiers need them)."""
        t0 = time.perf_counter()
        n = len(payloads)
        if self._gpu_timings:
            self._observe_gpu()
        share = self.proc_share_now if self.cfg.proc_adapt else self.cfg.proc_share
        procs_ok = self.procs is not None and n >= self.cfg.proc_min and \
            (share > 0 or self.cfg.route == "measured")
        plan = plan_rows(payloads, self.cfg, self.cuda, self.router, procs_ok, share)
        job = self.procs.submit([payloads[i] for i in plan.procs]) if plan.procs else None
        try:
            dec = self._run(payloads, plan, job, inline, self.keep_images if keep is None else keep, t0)
        except BaseException:
            if job is not None:
                self.procs.abandon(job)
            raise
        dec.decode_ms = (time.perf_counter() - t0) * 1e3
        return dec

    def _run(self, payloads: Sequence[Payload], plan: Plan, job, inline: bool, keep: bool, t0: float) -> Decoded:
        n, st, S = len(payloads), self._state(), self.first_size
        dec = Decoded(n=n, images=[None] * n, host={}, errors={}, good=np.zeros(0, np.int64), x0=None,
                      dims=np.zeros((n, 2), np.int64), size=S, payloads=payloads)
        xrows = None
        if S is not None:
            xrows = torch.empty((n, S, S, 3), dtype=torch.uint8, device=self.device).permute(0, 3, 1, 2)
        ctx = torch.cuda.stream(st.stream) if self.cuda else nullcontext()
        with ctx:
            threads = self._start_threads(plan, payloads, st, inline)  # first: they release the GIL
            exact_rows = list(plan.exact)
            fut_exact = self._map_cpu(exact_rows, payloads, inline and len(exact_rows) <= 2)
            refused = self._gpu_rows(plan, payloads, dec, xrows, keep, st)
            if refused:  # images the GPU decoder could not decode go to the exact CPU decoder
                fut_exact += self._map_cpu(refused, payloads, inline)
                exact_rows += refused
            failed = self._finish_threads(threads, plan, dec, xrows, st)
            exact = [r for f in fut_exact for r in (f.result() if isinstance(f, Future) else f)]
            if failed:  # libjpeg-turbo refused it: the exact path gives pixels or the BadImage
                exact += self._cpu_exact(failed, payloads)
                exact_rows += failed
            self._put_exact(exact_rows, exact, dec, xrows, st)
            if job is not None:
                self._collect_procs(job, plan, dec, xrows, st, t0)
            good_mask = np.ones(n, dtype=bool)
            good_mask[list(dec.errors)] = False
            dec.good = np.flatnonzero(good_mask)
            dec.n_gpu = len(plan.gpu) - len(refused)
            dec.n_cpu = len(exact_rows) + len(plan.threads) - len(failed)
            if xrows is not None:
                dec.x0 = xrows if len(dec.good) == n else xrows.index_select(0, torch.from_numpy(dec.good).to(self.device))
            if self.cuda:
                dec.event = torch.cuda.Event()
                dec.event.record(st.stream)
        return dec

    # -- the GPU decoder ------------------------------------------------------------------------

    def _gpu_rows(self, plan: Plan, payloads, dec: Decoded, xrows, keep: bool, st) -> list[int]:
        """Decode plan.gpu in calls of at most gpu_chunk_mpix megapixels, resize each call's images into xrows
        at once; returns the refused rows. Times the path for the router."""
        rows = plan.gpu
        if not rows:
            return []
        t0 = time.perf_counter()
        start = torch.cuda.Event(enable_timing=True) if self.cuda else None
        if start is not None:
            start.record(st.stream)
        mp = np.array([plan.hw[i][0] * plan.hw[i][1] for i in rows], dtype=np.float64) / 1e6
        budget = self.cfg.gpu_chunk_mpix
        refused: list[int] = []
        a = 0
        while a < len(rows):
            b = a + 1
            total = mp[a]
            while b < len(rows) and total + mp[b] <= budget:
                total += mp[b]
                b += 1
            part = rows[a:b]
            got: list[tuple[int, torch.Tensor]] = []
            for i, t in zip(part, self._gpu_decode([payloads[i] for i in part], st.stream)):
                if t is None or tuple(t.shape[1:]) != plan.hw[i]:
                    refused.append(i)
                else:
                    got.append((i, t))
                    dec.dims[i] = plan.hw[i]
                    if keep:
                        dec.images[i] = t
            self._put(xrows, [i for i, _ in got], [t for _, t in got])
            a = b
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record(st.stream)
            with self._timing_lock:
                self._gpu_timings.append((time.perf_counter() - t0, start, end, float(mp.sum())))
        return refused

    def _gpu_decode(self, datas: list[Payload], stream: Any) -> list[torch.Tensor | None]:
        """(3, H, W) uint8 device tensors from the GPU decoder (nvImageCodec or torchvision's nvJPEG op);
        None where it could not decode (a batch it refuses as a whole: None for every image)."""
        try:
            if self.nvdec is not None:
                return self.nvdec.decode(datas, stream)
            from torchvision.io import ImageReadMode, decode_jpeg

            return list(decode_jpeg([torch.frombuffer(d, dtype=torch.uint8) for d in datas], mode=ImageReadMode.RGB,
                                    device=self.device))
        except Exception:  # noqa: BLE001 - the exact CPU path decides
            return [None] * len(datas)

    def _put(self, xrows, rows: Sequence[int], imgs: Sequence[torch.Tensor]) -> None:
        """Resize images (grouped by shape, one stacked resize per shape) into their rows of xrows."""
        if xrows is None or not rows:
            return
        S = xrows.shape[-1]
        for idx in shape_groups([tuple(t.shape[1:]) for t in imgs]).values():
            block = resize_group(torch.stack([imgs[j] for j in idx]), S, self.exact_max_px)
            if len(idx) == 1:
                xrows[rows[idx[0]]].copy_(block[0])
            else:
                xrows.index_copy_(0, torch.tensor([rows[j] for j in idx], device=self.device), block)

    # -- the CPU threads ------------------------------------------------------------------------

    def _start_threads(self, plan: Plan, payloads, st, inline: bool):
        """Reduced-size libjpeg-turbo decodes of plan.threads into pinned staging, on the CPU threads."""
        rows = plan.threads
        if not rows:
            return None
        t0 = time.perf_counter()
        m = self.min_size
        scales = {i: draft_scale(plan.hw[i][1], plan.hw[i][0], m) for i in rows} if m else {}
        dims = {i: reduced_dims(*plan.hw[i], scales.get(i, 1)) for i in rows}
        offsets, off = {}, 0
        for i in rows:
            offsets[i] = off
            off += dims[i][0] * dims[i][1] * 3
        if self.cuda:
            slot, buf = st.pinned.reserve(off)
            out = buf.numpy()
        else:
            slot, out = None, np.empty(off, np.uint8)
        done: list[float] = []
        if inline and len(rows) <= 2:
            futs: list = [decode_into(rows, payloads, dims, offsets, out, scales)]
            done.append(time.perf_counter())
        else:
            k = max(1, min(self.cfg.cpu_threads, math.ceil(len(rows) / 4)))
            step = math.ceil(len(rows) / k)
            futs = []
            for j in range(0, len(rows), step):
                f = self._cpu_pool.submit(decode_into, rows[j:j + step], payloads, dims, offsets, out, scales)
                f.add_done_callback(lambda _f: done.append(time.perf_counter()))
                futs.append(f)
        return {"futs": futs, "slot": slot, "out": out, "total": off, "dims": dims, "offsets": offsets,
                "t0": t0, "done": done}

    def _finish_threads(self, th, plan: Plan, dec: Decoded, xrows, st) -> list[int]:
        if th is None:
            return []
        failed: list[int] = []
        for f in th["futs"]:
            failed += f.result() if isinstance(f, Future) else f
        mp = sum(plan.hw[i][0] * plan.hw[i][1] for i in plan.threads) / 1e6
        self.router.observe("threads", mp, (max(th["done"]) if th["done"] else time.perf_counter()) - th["t0"])
        if self.cuda:
            dev = st.pinned.send(th["slot"], th["total"], self.device)
        else:
            dev = torch.from_numpy(th["out"])
        bad = set(failed)
        rows, imgs = [], []
        for i in plan.threads:
            if i not in bad:
                h, w = th["dims"][i]
                o = th["offsets"][i]
                t = dev[o:o + h * w * 3].view(h, w, 3).permute(2, 0, 1)
                dec.images[i] = t  # small (reduced) images: kept, later tiers may need them
                dec.dims[i] = (h, w)
                rows.append(i)
                imgs.append(t)
        self._put(xrows, rows, imgs)
        return failed

    # -- the exact CPU path ---------------------------------------------------------------------

    def _cpu_exact(self, rows: Sequence[int], payloads: Sequence[Payload]) -> list[np.ndarray | BadImage]:
        out: list[np.ndarray | BadImage] = []
        for i in rows:
            p = payloads[i]
            try:
                if isinstance(p, _BYTES):
                    out.append(decode_bytes(bytes(p), self.cfg.limits, min_size=self.min_size))
                else:
                    out.append(decode_any(p, self.cfg.limits))
            except BadImage as e:
                out.append(e)
        return out

    def _map_cpu(self, rows: list[int], payloads: Sequence[Payload], inline: bool) -> list:
        """Split rows over the CPU decoder threads; returns futures (or results when inline)."""
        if not rows:
            return []
        if inline:
            return [self._cpu_exact(rows, payloads)]
        k = max(1, min(self.cfg.cpu_threads, math.ceil(len(rows) / 8)))
        step = math.ceil(len(rows) / k)
        return [self._cpu_pool.submit(self._cpu_exact, rows[j:j + step], payloads) for j in range(0, len(rows), step)]

    def _put_exact(self, rows: list[int], results: list, dec: Decoded, xrows, st) -> None:
        up_rows, up = [], []
        for i, r in zip(rows, results):
            if isinstance(r, BadImage):
                dec.errors[i] = r
            else:
                dec.host[i] = r
                dec.dims[i] = r.shape[:2]
                up_rows.append(i)
                up.append(torch.from_numpy(r))  # H, W, 3
        if not up:
            return
        devs = st.pinned.upload(up, self.device) if self.cuda else up
        imgs = [t.permute(2, 0, 1) for t in devs]
        for i, t in zip(up_rows, imgs):
            dec.images[i] = t
        self._put(xrows, up_rows, imgs)

    # -- the decode processes -------------------------------------------------------------------

    def _collect_procs(self, job, plan: Plan, dec: Decoded, xrows, st, t0: float) -> None:
        ready = all(f.done() for f, _ in job.futures)
        t_wait = time.perf_counter()
        pb = self.procs.collect(job, self.device, st.stream)
        if self.cfg.proc_adapt and not (self.cfg.route == "measured" and self.cuda):  # the fixed-share routing
            self.proc_share_now = adapt_share(self.proc_share_now, ready, time.perf_counter() - t_wait, t_wait - t0)
        rows = plan.procs
        mp = sum(plan.hw[i][0] * plan.hw[i][1] for i in rows if i in plan.hw) / 1e6
        self.router.observe("procs", mp, pb.seconds)
        ok = [j for j in range(len(rows)) if j not in pb.errors]
        for j, e in pb.errors.items():
            dec.errors[rows[j]] = e
        for j in ok:
            dec.dims[rows[j]] = pb.dims[j]
        dec.n_proc = len(ok)
        if xrows is not None and ok:
            x = pb.x[self.first_size]
            if len(ok) < len(rows):
                x = x.index_select(0, torch.tensor(ok, device=self.device))
            xrows.index_copy_(0, torch.tensor([rows[j] for j in ok], device=self.device), x)

    def _observe_gpu(self) -> None:
        """Fold the GPU decoder's finished calls into the router (never waits: events not done yet stay): the
        larger of the host time of the calls and the device time between their events."""
        with self._timing_lock:
            done = [r for r in self._gpu_timings if r[2].query()]
            if not done:
                return
            self._gpu_timings = [r for r in self._gpu_timings if r not in done]
        for host_s, start, end, mp in done:
            self.router.observe("gpu", mp, max(host_s, start.elapsed_time(end) / 1e3))

    # -- later tiers ----------------------------------------------------------------------------

    def gather(self, dec: Decoded, rows: np.ndarray, size: int) -> torch.Tensor:
        """Tier input (len(rows), 3, size, size) uint8 for good rows: the first tier's input when ``size`` is
        its size; else resized from the kept images, rows without one decoded again on the exact CPU path."""
        if size == dec.size and dec.x0 is not None:
            pos = np.searchsorted(dec.good, rows)
            if len(pos) == len(dec.good):
                return dec.x0
            return dec.x0.index_select(0, torch.from_numpy(pos).to(self.device))
        self.fill_images(dec, rows)
        out = torch.empty((len(rows), size, size, 3), dtype=torch.uint8, device=self.device).permute(0, 3, 1, 2)
        self._put(out, list(range(len(rows))), [dec.images[int(i)] for i in rows])
        return out

    def fill_images(self, dec: Decoded, rows: np.ndarray) -> None:
        """Decoded images on the device for rows that have none (GPU rows of large images, process rows):
        decoded again on the exact CPU path (the reduced-size decode), on this thread's stream."""
        redo = [int(i) for i in rows if dec.images[int(i)] is None]
        if not redo:
            return
        res = self._cpu_exact(redo, dec.payloads)
        st = self._state()
        ctx = torch.cuda.stream(st.stream) if self.cuda else nullcontext()
        with ctx:
            for i, r in zip(redo, res):
                if isinstance(r, BadImage):  # pragma: no cover - another decoder took it before
                    raise RuntimeError(f"row {i} decoded before but not now: {r}")
                dec.host[i] = r
            ups = [torch.from_numpy(dec.host[i]) for i in redo]
            devs = st.pinned.upload(ups, self.device) if self.cuda else ups
            for i, t in zip(redo, devs):
                dec.images[i] = t.permute(2, 0, 1)
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(st.stream)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def host_image(self, dec: Decoded, i: int) -> np.ndarray:
        """Row i as an HxWx3 uint8 array (for tiers that run their own code on the CPU)."""
        img = dec.host.get(i)
        if img is None:
            if dec.images[i] is not None:
                img = dec.images[i].permute(1, 2, 0).contiguous().cpu().numpy()
            else:
                got = self._cpu_exact([i], dec.payloads)[0]
                if isinstance(got, BadImage):  # pragma: no cover - the other decoders ran the same checks
                    raise got
                img = got
            dec.host[i] = img
        return img

