"""Decoding a batch for the GPU fast path: pinned host buffers, the CPU decoders' staging, nvImageCodec."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..io.images import BadImage

__all__ = ["Payload", "Decoded", "Plan", "Pinned", "decode_into", "reduced_dims", "NvImgCodecDecoder", "nvimgcodec_available"]

Payload = bytes | bytearray | memoryview | np.ndarray

@dataclass
class Decoded:
    """One decoded batch: the first tier's input of every good row, ready on the device (after ``event``)."""

    n: int
    images: list[torch.Tensor | None]  # (3, H, W) uint8 on the device, kept only where asked (later tiers, tests)
    host: dict[int, np.ndarray]  # HxWx3 arrays of CPU-decoded rows (reused by CPU-only tiers)
    errors: dict[int, BadImage]
    good: np.ndarray  # row indices of decoded images, in order
    x0: torch.Tensor | None  # first tier's input (len(good), 3, S, S) uint8
    dims: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (n, 2) decoded (h, w); 0 if bad
    size: int | None = None  # S, the first tier's input size (None: no engine first)
    event: Any = None
    decode_ms: float = 0.0
    n_gpu: int = 0
    n_cpu: int = 0
    n_proc: int = 0
    payloads: Sequence[Payload] = ()
    gpu_timing: Any = None  # (host seconds, start event, end event, megapixels) of the GPU decoder's part


@dataclass
class Plan:
    """Which rows of a batch go where; ``hw`` holds the header sizes of the plain JPEGs."""

    gpu: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    procs: list[int] = field(default_factory=list)
    exact: list[int] = field(default_factory=list)
    hw: dict[int, tuple[int, int]] = field(default_factory=dict)


class Pinned:
    """A ring of pinned host buffers for host -> device copies; a buffer is reused only after the copy
    that last read it has finished (its event)."""

    def __init__(self, n: int = 4) -> None:
        self.bufs: list[torch.Tensor | None] = [None] * n
        self.events: list[Any] = [None] * n
        self.i = 0

    def reserve(self, nbytes: int) -> tuple[int, torch.Tensor]:
        i, self.i = self.i, (self.i + 1) % len(self.bufs)
        if self.events[i] is not None:
            self.events[i].synchronize()
            self.events[i] = None
        buf = self.bufs[i]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1 << 22) * 5 // 4, dtype=torch.uint8, pin_memory=True)
            self.bufs[i] = buf
        return i, buf

    def send(self, i: int, nbytes: int, device: torch.device) -> torch.Tensor:
        """Copy the first nbytes of buffer i to the device (current stream, asynchronous)."""
        dev = self.bufs[i][:nbytes].to(device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.events[i] = ev
        return dev

    def upload(self, arrays: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        total = sum(int(a.numel()) for a in arrays)
        i, buf = self.reserve(total)
        offs, off = [], 0
        for a in arrays:
            m = int(a.numel())
            buf[off:off + m].view(a.shape).copy_(a)
            offs.append(off)
            off += m
        dev = self.send(i, total, device)
        return [dev[o:o + int(a.numel())].view(a.shape) for o, a in zip(offs, arrays)]


def _cv2():
    try:
        import cv2

        return cv2
    except Exception:  # noqa: BLE001 - no OpenCV: torchvision's CPU decoder instead
        return None


_CV2_SCALE = {1: "IMREAD_COLOR", 2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4", 8: "IMREAD_REDUCED_COLOR_8"}


def reduced_dims(h: int, w: int, scale: int) -> tuple[int, int]:
    """libjpeg's output size at DCT scale 1/``scale`` (rounded up)."""
    return -(-h // scale), -(-w // scale)


def decode_into(rows: Sequence[int], payloads: Sequence[Payload], dims: dict[int, tuple[int, int]],
                offsets: dict[int, int], out: np.ndarray, scales: dict[int, int] | None = None) -> list[int]:
    """Decode plain JPEGs with libjpeg-turbo straight into ``out`` (a pinned staging buffer) as HxWx3 RGB
    at ``offsets``; returns the rows that failed. ``scales[i]`` (1, 2, 4 or 8): libjpeg's DCT scaling, the
    reduced-size decode of :func:`roadcascade.io.images.decode_bytes` with ``min_size`` (same pixels; ``dims``
    are then the reduced sizes), so a 12-megapixel photo is never materialised. OpenCV releases the GIL while
    it decodes, so these jobs run in parallel on the CPU threads (torchvision's CPU decoder does not)."""
    cv2 = _cv2()
    failed = []
    for i in rows:
        h, w = dims[i]
        s = (scales or {}).get(i, 1)
        view = out[offsets[i]:offsets[i] + h * w * 3].reshape(h, w, 3)
        try:
            if cv2 is not None:
                flag = getattr(cv2, _CV2_SCALE[s]) | cv2.IMREAD_IGNORE_ORIENTATION
                bgr = cv2.imdecode(np.frombuffer(payloads[i], np.uint8), flag)
                if bgr is None or bgr.shape != (h, w, 3):
                    failed.append(i)
                    continue
                res = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=view)
                if not np.shares_memory(res, view):
                    view[...] = res
            else:
                if s != 1:  # torchvision's CPU decoder has no DCT scaling: the exact path decides
                    failed.append(i)
                    continue
                from torchvision.io import ImageReadMode, decode_jpeg

                t = decode_jpeg(torch.frombuffer(payloads[i], dtype=torch.uint8), mode=ImageReadMode.RGB)
                if tuple(t.shape) != (3, h, w):
                    failed.append(i)
                    continue
                view[...] = t.permute(1, 2, 0).numpy()
        except Exception:  # noqa: BLE001 - the exact CPU path decides
            failed.append(i)
    return failed


def nvimgcodec_available() -> bool:
    """Whether nvImageCodec's Python package (``nvidia-nvimgcodec-cu13``) can be imported."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or its libraries do not load
        return False
    return True


class NvImgCodecDecoder:
    """Batched JPEG decoding with nvImageCodec (optional: ``pip install 'roadcascade[nvimgcodec]'``).

    A batch is split inside the library between the GPU's hardware JPEG engines (``hw_share`` of it) and
    libjpeg-turbo on its own CPU threads; the Python GIL is released while it decodes, so a decode worker
    in nvImageCodec does not stop the thread running the model. Output: planar RGB (3, H, W) uint8 tensors
    on the device (zero-copy views of nvImageCodec's buffers), ready in order on ``stream``; ``None`` for an
    image it could not decode (the caller sends those to the CPU path). On the H100 its pixels were
    identical to PIL's (libjpeg-turbo) for the benchmark images (docs/GPU.md). One decoder serves all
    threads (calls are serialised: two concurrent decoders were slower than one, measured)."""

    def __init__(self, device: torch.device, hw_share: float = 0.7, threads: int = 0):
        try:
            from nvidia import nvimgcodec as nv
        except Exception as e:  # noqa: BLE001
            raise RuntimeError("nvImageCodec is not installed: pip install 'roadcascade[nvimgcodec]' "
                               f"(nvidia-nvimgcodec-cu13 and nvidia-nvjpeg), or use gpu_decoder='torchvision' ({e})") from e
        import os

        K = nv.BackendKind
        backends = [nv.Backend(K.HW_GPU_ONLY, load_hint=hw_share), nv.Backend(K.CPU_ONLY)] if hw_share > 0 \
            else [nv.Backend(K.CPU_ONLY)]
        threads = threads or max(1, (os.cpu_count() or 2) - 1)
        self.device = device
        self._dec = nv.Decoder(device_id=device.index or 0, max_num_cpu_threads=threads, backends=backends)
        self._params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                                       sample_format=nv.SampleFormat.P_RGB)
        self._lock = threading.Lock()
        self.version = getattr(nv, "__version__", "?")

    def close(self) -> None:
        """Release the decoder and its CPU threads (an idle decoder left alive slowed other decoders down)."""
        with self._lock:
            dec, self._dec = self._dec, None
        if dec is not None:
            try:
                dec.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

    def decode(self, datas: Sequence[bytes], stream: Any) -> list[torch.Tensor | None]:
        with self._lock:
            if self._dec is None:
                raise RuntimeError("the nvImageCodec decoder was closed")
            imgs = self._dec.decode([d if isinstance(d, bytes) else bytes(d) for d in datas], params=self._params,
                                    cuda_stream=stream.cuda_stream)
        out: list[torch.Tensor | None] = []
        for im in imgs:
            if im is None:
                out.append(None)
                continue
            t = torch.as_tensor(im, device=self.device)
            out.append(t if t.dim() == 3 and t.shape[0] == 3 and t.dtype == torch.uint8 else None)
        return out
