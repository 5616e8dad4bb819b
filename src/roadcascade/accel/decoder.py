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

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext

import numpy as np
import torch

from ..io.images import BadImage
from .config import GpuConfig, adapt_share
from .decode import Decoded, Payload, Pinned, Plan
from .jpeg import jpeg_gpu_info
from .resize import resize_group, shape_groups
from .route import Router
from .stages import CpuStage, GpuStage

__all__ = ["BatchDecoder", "Plan", "plan_rows"]

_BYTES = (bytes, bytearray, memoryview)


def plan_rows(payloads: Sequence[Payload], cfg: GpuConfig, cuda: bool, router: Router, procs_ok: bool,
              share: float) -> Plan:
    """Route a batch (pure but for the header walk): see the module docstring. ``procs_ok``: the decode
    processes run and the batch is large enough for them; ``share``: their fixed share (``route="share"``, and
    batches of small images, below ``route_min_mpix`` on average, where the per-image shares were tuned)."""
    plan = Plan()
    n = len(payloads)
    byte_rows = [i for i in range(n) if isinstance(payloads[i], _BYTES)]
    plan.exact = [i for i in range(n) if not isinstance(payloads[i], _BYTES)]
    use_procs = procs_ok and (cfg.decode == "auto" or not cuda)
    measured = cfg.route == "measured" and cuda and cfg.decode == "auto" and \
        _mean_mpix(payloads, byte_rows[:8], cfg, plan.hw) >= cfg.route_min_mpix
    if measured:  # every header first: the megapixels decide (a sample said these are large images)
        for i in byte_rows:
            hw = plan.hw.get(i) or jpeg_gpu_info(payloads[i], cfg.limits)
            if hw is not None:
                plan.hw[i] = hw
        plain = [i for i in byte_rows if i in plan.hw]
        mp = np.array([plan.hw[i][0] * plan.hw[i][1] for i in plain], dtype=np.float64) / 1e6
        if len(mp) and mp.mean() >= cfg.route_min_mpix:
            (plan.procs if use_procs else plan.exact).extend(i for i in byte_rows if i not in plan.hw)
            paths = ["gpu"] + (["threads"] if cfg.route_threads and cfg.cpu_threads > 0 else []) + \
                (["procs"] if use_procs else [])
            for p, (a, b) in router.split(mp, paths).items():
                getattr(plan, p).extend(plain[a:b])
            plan.procs.sort()
            return plan
    rest = byte_rows
    if use_procs:  # the fixed share, before any per-image work
        plan.procs = byte_rows[:int(round(share * len(byte_rows)))]
        rest = byte_rows[len(plan.procs):]
    plain = []
    for i in rest:
        hw = plan.hw.get(i) or (jpeg_gpu_info(payloads[i], cfg.limits) if cuda else None)
        if hw is None:
            plan.exact.append(i)
        else:
            plan.hw[i] = hw
            plain.append(i)
    if cfg.decode == "cpu" or (cfg.decode == "auto" and len(plain) < cfg.gpu_decode_min):
        plan.threads = plain
    else:
        n_fast = int(round(cfg.cpu_share * len(plain)))
        plan.gpu, plan.threads = plain[:len(plain) - n_fast], plain[len(plain) - n_fast:]
    return plan


def _mean_mpix(payloads: Sequence[Payload], rows: Sequence[int], cfg: GpuConfig,
               hw_out: dict[int, tuple[int, int]]) -> float:
    """Mean megapixels of the plain JPEGs among ``rows`` (a small sample; 0 when none), their sizes kept in
    ``hw_out``: batches of small images skip the full header walk before the fixed shares."""
    mp = []
    for i in rows:
        hw = jpeg_gpu_info(payloads[i], cfg.limits)
        if hw is not None:
            hw_out[i] = hw
            mp.append(hw[0] * hw[1] / 1e6)
    return float(np.mean(mp)) if mp else 0.0


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
        self.gpu = GpuStage(device, cfg, self.router, self._put, self.min_size)
        self.cpu = CpuStage(device, cfg, self.router, self._put, self.min_size)
        self.procs = None
        self.proc_share_now = cfg.proc_share  # the adapted share (route="share" with proc_adapt)

    # -- set-up ---------------------------------------------------------------------------------

    nvdec = property(lambda self: self.gpu.nvdec, lambda self, v: setattr(self.gpu, "nvdec", v))
    gpu_decoder = property(lambda self: self.gpu.gpu_decoder, lambda self, v: setattr(self.gpu, "gpu_decoder", v))

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
        self.gpu.close()
        self.start_procs(0)
        self.cpu.close()

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
        self.gpu.observe()
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
        ctx = torch.cuda.stream(st.stream) if self.cuda else nullcontext()
        with ctx:  # everything of this batch, its allocations too, on this thread's stream
            xrows = None
            if S is not None:
                xrows = torch.empty((n, S, S, 3), dtype=torch.uint8, device=self.device).permute(0, 3, 1, 2)
            threads = self.cpu.start_threads(plan, payloads, st, inline)  # first: they release the GIL
            exact_rows = list(plan.exact)
            fut_exact = self.cpu.map_exact(exact_rows, payloads, inline and len(exact_rows) <= 2)
            refused = self.gpu.rows(plan, payloads, dec, xrows, keep, st)
            if refused:  # images the GPU decoder could not decode go to the exact CPU decoder
                fut_exact += self.cpu.map_exact(refused, payloads, inline)
                exact_rows += refused
            failed = self.cpu.finish_threads(threads, plan, dec, xrows, st)
            exact = [r for f in fut_exact for r in (f.result() if isinstance(f, Future) else f)]
            if failed:  # libjpeg-turbo refused it: the exact path gives pixels or the BadImage
                exact += self.cpu.exact(failed, payloads)
                exact_rows += failed
            self.cpu.put_exact(exact_rows, exact, dec, xrows, st)
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

    # -- resize and the decode processes ---------------------------------------------------------

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
        res = self.cpu.exact(redo, dec.payloads)
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
                got = self.cpu.exact([i], dec.payloads)[0]
                if isinstance(got, BadImage):  # pragma: no cover - the other decoders ran the same checks
                    raise got
                img = got
            dec.host[i] = img
        return img

