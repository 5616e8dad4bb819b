"""The two decoding stages of :class:`~roadcascade.accel.decoder.BatchDecoder` that run in this process: the GPU
decoder (:class:`GpuStage`) and the CPU threads with the exact CPU path (:class:`CpuStage`). Each decodes its
rows of a batch and hands the images to ``put`` (the resize into the first tier's input rows), and tells the
router (:class:`~roadcascade.accel.route.Router`) how many megapixels per second it managed."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..io.images import BadImage, decode_any, decode_bytes, draft_scale
from .config import GpuConfig
from .decode import Decoded, NvImgCodecDecoder, Payload, Plan, decode_into, reduced_dims
from .resize import resize_antialias, shape_groups
from .route import Router

__all__ = ["GpuStage", "CpuStage"]

_BYTES = (bytes, bytearray, memoryview)
Put = Callable[[Any, Sequence[int], Sequence[torch.Tensor]], None]


class GpuStage:
    """The GPU decoder (torchvision's nvJPEG op, or nvImageCodec): full-size decodes in calls of at most
    ``gpu_chunk_mpix`` megapixels, each call's images resized into their rows at once."""

    def __init__(self, device: torch.device, cfg: GpuConfig, router: Router, put: Put, min_size: int | None = None):
        self.device, self.cfg, self.router, self.put = device, cfg, router, put
        self.min_size = min_size  # kept images are reduced as the CPU decoders' DCT scaling would (None: full size)
        self.cuda = device.type == "cuda"
        self._gpu_timings: list[tuple] = []  # the calls, read by observe() once finished
        self._timing_lock = threading.Lock()
        self.nvdec: NvImgCodecDecoder | None = None
        self.gpu_decoder = "none"
        if self.cuda:
            if cfg.gpu_decoder == "nvimgcodec":
                self.nvdec = NvImgCodecDecoder(device, cfg.nvimg_hw_share, cfg.nvimg_threads)
            self.gpu_decoder = "nvimgcodec" if self.nvdec is not None else "torchvision"

    def close(self) -> None:
        if self.nvdec is not None:
            self.nvdec.close()

    def rows(self, plan: Plan, payloads, dec: Decoded, xrows, keep: bool, st) -> list[int]:
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
            for i, t in zip(part, self.decode([payloads[i] for i in part], st.stream)):
                if t is None or tuple(t.shape[1:]) != plan.hw[i]:
                    refused.append(i)
                else:
                    got.append((i, t))
                    dec.dims[i] = plan.hw[i]
            self.put(xrows, [i for i, _ in got], [t for _, t in got])
            if keep:
                self.keep(dec, got)
            a = b
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record(st.stream)
            with self._timing_lock:
                self._gpu_timings.append((time.perf_counter() - t0, start, end, float(mp.sum())))
        return refused

    def keep(self, dec: Decoded, got: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Keep decoded images for later tiers, reduced (antialiased, per shape group) to the size the CPU decoders'
        DCT scaling gives them (``draft_scale``): memory per kept image bounded by the cascade's decode size, not
        by the photo (a 12-megapixel frame kept at full size is 36 MB; at 1/8 scale, 0.6 MB)."""
        groups = shape_groups([tuple(t.shape[1:]) for _, t in got])
        for (h, w), idx in groups.items():
            scale = draft_scale(w, h, self.min_size) if self.min_size else 1
            if scale == 1:
                for j in idx:
                    dec.images[got[j][0]] = got[j][1]
                continue
            rh, rw = reduced_dims(h, w, scale)
            small = resize_antialias(torch.stack([got[j][1] for j in idx]), rh, rw)
            for n, j in enumerate(idx):
                dec.images[got[j][0]] = small[n]

    def decode(self, datas: list[Payload], stream: Any) -> list[torch.Tensor | None]:
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

    def observe(self) -> None:
        """Fold the GPU decoder's finished calls into the router (never waits: events not done yet stay): the
        larger of the host time of the calls and the device time between their events."""
        if not self._gpu_timings:
            return
        with self._timing_lock:
            done = [r for r in self._gpu_timings if r[2].query()]
            if not done:
                return
            self._gpu_timings = [r for r in self._gpu_timings if r not in done]
        for host_s, start, end, mp in done:
            self.router.observe("gpu", mp, max(host_s, start.elapsed_time(end) / 1e3))



class CpuStage:
    """libjpeg-turbo on the CPU threads (reduced-size DCT decode of plain JPEGs into pinned staging, GIL
    released) and the exact CPU path (``images.decode_bytes``: every format, every BadImage)."""

    def __init__(self, device: torch.device, cfg: GpuConfig, router: Router, put: Put, min_size: int | None):
        self.device, self.cfg, self.router, self.put, self.min_size = device, cfg, router, put, min_size
        self.cuda = device.type == "cuda"
        self._cpu_pool = ThreadPoolExecutor(max(1, cfg.cpu_threads), thread_name_prefix="rc-gpu-cpudec")

    def close(self) -> None:
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)

    def start_threads(self, plan: Plan, payloads, st, inline: bool):
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

    def finish_threads(self, th, plan: Plan, dec: Decoded, xrows, st) -> list[int]:
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
        self.put(xrows, rows, imgs)
        return failed

    def exact(self, rows: Sequence[int], payloads: Sequence[Payload]) -> list[np.ndarray | BadImage]:
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

    def map_exact(self, rows: list[int], payloads: Sequence[Payload], inline: bool) -> list:
        """Split rows over the CPU decoder threads; returns futures (or results when inline)."""
        if not rows:
            return []
        if inline:
            return [self.exact(rows, payloads)]
        k = max(1, min(self.cfg.cpu_threads, math.ceil(len(rows) / 8)))
        step = math.ceil(len(rows) / k)
        return [self._cpu_pool.submit(self.exact, rows[j:j + step], payloads) for j in range(0, len(rows), step)]

    def put_exact(self, rows: list[int], results: list, dec: Decoded, xrows, st) -> None:
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
        self.put(xrows, up_rows, imgs)
