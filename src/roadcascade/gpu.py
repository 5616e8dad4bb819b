"""The GPU fast path: JPEG bytes in host memory -> calibrated, folded probabilities, in batches.

The same answers as :meth:`Cascade.predict` (same exits, fusion, fold and rules; bad input still gives
:class:`~roadcascade.images.BadImage`), computed like this::

    bytes ─┬─ batches >= proc_min: proc_share (0.7) of the payloads go to decode processes
           │  (roadcascade.procdecode: images.decode_bytes + resize_square in worker processes, written to
           │  page-locked shared memory, one copy to the GPU; the CPU path's pixels and BadImage exactly)
           ├─ the rest: header walk (pure Python, ~µs): a plain baseline 3-component JPEG inside the limits,
           │  no EXIF/XMP orientation, one scan, an EOI after it?            ── no ──> CPU decoder
           │                                                                            (images.decode_bytes:
           └─ yes: batched nvJPEG on the GPU  (torchvision.io.decode_jpeg(list, device="cuda"), or   exact CPU
              nvImageCodec, opt-in: hardware JPEG engines + libjpeg-turbo threads, GIL           semantics)
              released, pixels identical to PIL's on the H100; optionally a share on CPU threads)
                 │ a batch the GPU decoder refuses is decoded again on the CPU path
                 v
           resize on the GPU, bit-exact with PIL's bilinear+antialias (PIL's own fixed-point filter
           coefficients, applied as two float64 matrix products, PIL's intermediate rounding)
                 v
           compiled model (torch.compile, dynamic batch; uint8 -> normalise -> bf16 channels_last inside
           the graph; BatchNorm folded into the convolutions in fp32 first), replayed as CUDA graphs of
           fixed batch sizes (2, 4, ..., 256; a batch is cut into 256-chunks, the rest padded up)
                 v
           logits (float32) -> host; calibration, fusion, fold and deferral rules in float64 NumPy,
           exactly the functions Cascade.run_stage uses; later tiers run once on the undecided images

Overlap: decoding (its own CUDA stream and worker thread; nvJPEG runs on the hardware decoder while the
SMs run the model; the decode processes on the CPUs) of batch i+1.. overlaps the model of batch i
(:meth:`GpuCascade.predict_stream`).

Where the result can differ from the CPU path (measured numbers in docs/GPU.md):

- torchvision's nvJPEG IDCT and chroma upsampling are not libjpeg-turbo's: decoded pixels differ by a few
  levels, mostly near colour edges (nvImageCodec's were identical on the H100; images the header walk
  sends to the CPU decoder are bit-exact);
- bf16 weights and activations (the CPU path runs fp32);
- a corrupt entropy-coded segment that nvJPEG decodes without error decodes to other garbage than
  libjpeg's; truncated files (no EOI after the scan) go to the CPU decoder and raise ``truncated``.

Pure pieces (header walk, PIL-exact resize, BatchNorm folding, the cascade loop on arrays) run on the
CPU too; ``GpuCascade(..., device="cpu")`` is the same runtime without CUDA (used by the CPU tests).
"""

from __future__ import annotations

import copy
import math
import struct
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .cascade import Cascade, ClassifierTier, Prediction, Trace, run_tier
from .decision import decide, exit_rule_name, stack_features
from .images import BadImage, DecodeLimits, decode_any, decode_bytes

__all__ = [
    "GpuConfig",
    "GpuCascade",
    "BatchResult",
    "jpeg_gpu_info",
    "pil_bilinear_weights",
    "resize_exact",
    "horizontal_first",
    "fold_batchnorm",
    "bucket_for",
    "gpu_available",
    "maybe_gpu_cascade",
    "NvImgCodecDecoder",
    "nvimgcodec_available",
    "adapt_share",
    "auto_procs",
]

warnings.filterwarnings("ignore", message="The given buffer is not writable")  # torch.frombuffer(bytes): read only

Payload = bytes | bytearray | memoryview | np.ndarray


def auto_procs(cpus: int | None = None) -> int:
    """Decode processes for ``GpuConfig(procs=-1)``: CPUs - 4 (this process's threads and the GPU decoder's
    need some), at most 12, none below 8 CPUs."""
    import os

    n = cpus if cpus is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    n = n or 1
    return min(12, n - 4) if n >= 8 else 0


def adapt_share(share: float, ready: bool, waited_s: float, own_s: float, step: float = 0.02,
                lo: float = 0.05, hi: float = 0.95) -> float:
    """One step of the decode-process share controller, after a batch: the processes had finished before this
    process did its part (``ready``): give them more; this process then waited for them a noticeable time
    (over 10% of its own ``own_s``): give them less; else keep. Stays in [lo, hi]."""
    if ready:
        share += step
    elif waited_s > 0.1 * max(own_s, 0.0):
        share -= step
    return min(hi, max(lo, share))


def gpu_available() -> bool:
    """CUDA present and torchvision's GPU JPEG decoder importable."""
    if not torch.cuda.is_available():
        return False
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means no GPU decoder
        return False
    return True


# ============================================================================ configuration


@dataclass
class GpuConfig:
    """Knobs of the fast path. docs/GPU.md says which defaults were measured on the H100 (decode routing,
    cpu_share, gpu_decode_min) and which were not swept (workers, prefetch, threads, graph sizes)."""

    dtype: str = "bf16"  # bf16 | fp16 | fp32 (weights and activations; BN folded in fp32 first)
    compile: bool = True  # torch.compile (inductor), dynamic batch dimension
    compile_later_tiers: bool = False  # also compile later tiers (they see few images; eager + graphs saves ~1 min start-up)
    graphs: bool = True  # CUDA graphs for the fixed batch sizes below
    graph_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)
    chunk: int = 256  # larger batches run as chunks of this size (one graph replay each)
    fold_bn: bool = True  # fold BatchNorm into the preceding convolution (checked numerically)
    decode: str = "auto"  # auto | gpu | cpu (gpu / cpu: that decoder in this process for every row, no processes)
    gpu_decoder: str = "auto"  # auto | nvimgcodec | torchvision: the library decoding the GPU rows. auto: torchvision's
    #                            nvJPEG op (every H100 sweep measured it faster end to end than nvImageCodec: 21-29k
    #                            against 10-22k img/s, docs/GPU.md); nvimgcodec: PIL-identical pixels, opt-in
    nvimg_hw_share: float = 0.7  # nvImageCodec: share of a batch for the hardware JPEG engines; the rest goes to its
    #                              libjpeg-turbo threads (0.7: 24.0k img/s against 19.9k all-hardware, decode alone, H100)
    nvimg_threads: int = 0  # nvImageCodec's CPU threads (0: CPUs - 1)
    gil_switch_ms: float | None = None  # if set, sys.setswitchinterval (process-wide): how soon a thread returning
    #                                     from the decoder gets the GIL back from a thread running Python
    gpu_decode_min: int = 1  # auto: batches with fewer plain JPEGs than this decode on CPU threads (nvJPEG was
    #                          faster at batch 1 too on the H100: p50 0.90-1.23 ms against 1.55 ms, docs/GPU.md)
    cpu_share: float = 0.0  # share of the plain JPEGs decoded on CPU threads instead of nvJPEG (0 measured best:
    #                         torchvision's nvJPEG call holds the GIL, so mixing slows both, docs/GPU.md)
    cpu_threads: int = 12  # CPU decoder threads (OpenCV/libjpeg-turbo, GIL released)
    procs: int = -1  # decode processes (roadcascade.procdecode): the CPU path's decode + resize in worker
    #                  processes into shared page-locked memory, no GIL shared with this process. 0: off;
    #                  -1 (auto): on CUDA with >= 8 CPUs, CPUs - 4 up to 12 (12 of 16 measured best on the H100,
    #                  docs/GPU.md); else off
    proc_share: float = 0.7  # share of each batch's encoded payloads sent to the decode processes (the start
    #                          value when proc_adapt; 0.7 measured best of 0.5/0.7 fixed on the H100, q75 images)
    proc_adapt: bool = False  # move the share after each batch toward the point where the processes and this
    #                           process finish together (adapt_share), so images that are costlier to decode on the
    #                           CPU (large, PNG) get a smaller share without a setting. Off: on the H100 it wandered
    #                           (0.05-0.9) and was not faster than a fixed 0.7 (docs/GPU.md)
    proc_min: int = 64  # batches smaller than this skip the processes (latency: batch 1 stays on the GPU decoder)
    gc_freeze: bool = True  # after warm-up: gc.collect() + gc.freeze(), so the collector does not walk the
    #                         model and library objects during requests (stalls at batch 1)
    decode_workers: int = 3  # threads preparing batches (parse, decode, resize) ahead of the model (3 with decode
    #                          processes, 2 without: H100 sweep)
    prefetch: int = 3  # batches decoded ahead in predict_stream
    cudnn_benchmark: bool = True
    limits: DecodeLimits = field(default_factory=DecodeLimits)

    def __post_init__(self) -> None:
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be bf16, fp16 or fp32, not {self.dtype!r}")
        if self.decode not in ("auto", "gpu", "cpu"):
            raise ValueError(f"decode must be auto, gpu or cpu, not {self.decode!r}")
        if self.gpu_decoder not in ("auto", "nvimgcodec", "torchvision"):
            raise ValueError(f"gpu_decoder must be auto, nvimgcodec or torchvision, not {self.gpu_decoder!r}")
        if not 0.0 <= self.nvimg_hw_share <= 1.0:
            raise ValueError(f"nvimg_hw_share must be in [0, 1], got {self.nvimg_hw_share}")
        if self.gil_switch_ms is not None and not 0.0 < self.gil_switch_ms <= 100.0:
            raise ValueError(f"gil_switch_ms must be in (0, 100], got {self.gil_switch_ms}")
        if not 0.0 <= self.cpu_share <= 1.0:
            raise ValueError(f"cpu_share must be in [0, 1], got {self.cpu_share}")
        if not 0.0 <= self.proc_share <= 1.0:
            raise ValueError(f"proc_share must be in [0, 1], got {self.proc_share}")
        if self.procs < -1:
            raise ValueError(f"procs must be >= 0 (or -1: auto), got {self.procs}")
        sizes = tuple(sorted({int(s) for s in self.graph_sizes}))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"graph_sizes must be positive, got {self.graph_sizes}")
        self.graph_sizes = sizes
        if self.chunk < 1:
            raise ValueError("chunk must be >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


# ============================================================================ JPEG header walk

_SOF_SEQUENTIAL = frozenset({0xC0, 0xC1})  # baseline / extended sequential, Huffman: what nvJPEG's engine takes
_SOF_OTHER = frozenset({0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_MAX_GPU_SEGMENTS = 256  # far above an encoder's ~10; the CPU path has its own (higher) cap


def _exif_orientation_is_one(seg: bytes) -> bool:
    """Whether an APP1 Exif payload (after ``Exif\\0\\0``) has no orientation or orientation 1.

    Anything unreadable returns False (the CPU decoder then decides, as PIL does)."""
    try:
        if len(seg) < 8:
            return False
        bo = seg[:2]
        if bo == b"II":
            e = "<"
        elif bo == b"MM":
            e = ">"
        else:
            return False
        (ifd,) = struct.unpack_from(e + "I", seg, 4)
        if ifd + 2 > len(seg):
            return False
        (count,) = struct.unpack_from(e + "H", seg, ifd)
        for i in range(count):
            off = ifd + 2 + 12 * i
            if off + 12 > len(seg):
                return False
            tag, typ = struct.unpack_from(e + "HH", seg, off)
            if tag == 0x0112:
                if typ != 3:
                    return False
                (value,) = struct.unpack_from(e + "H", seg, off + 8)
                return value == 1
        return True
    except struct.error:
        return False


def jpeg_gpu_info(data: bytes, limits: DecodeLimits | None = None) -> tuple[int, int] | None:
    """``(height, width)`` when ``data`` is a JPEG the GPU decoder may take, else ``None``.

    Taken: a baseline/extended-sequential Huffman JPEG, 8-bit, 3 components (not Adobe/RGB-coded), one
    scan followed by an EOI marker, no EXIF or XMP orientation other than 1, inside ``limits``. Anything
    else (PNG, progressive, grayscale, CMYK, rotated, truncated, oversized, odd) returns ``None`` and is
    decoded by :func:`roadcascade.images.decode_bytes`, which gives the CPU path's pixels or BadImage.
    """
    limits = limits or _LIMITS
    n = len(data)
    if n < 4 or n > limits.max_bytes or data[:3] != b"\xff\xd8\xff" or "JPEG" not in limits.formats:
        return None
    pos, segments, hw = 2, 0, None
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7 or marker == 0xD9:
            return None  # no stand-alone marker belongs in a header
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return None
        segments += 1
        if segments > _MAX_GPU_SEGMENTS:
            return None
        body = pos + 4
        if marker in _SOF_SEQUENTIAL:
            if length < 17 or data[body] != 8 or data[body + 5] != 3:
                return None
            height = (data[body + 1] << 8) | data[body + 2]
            width = (data[body + 3] << 8) | data[body + 4]
            ids = (data[body + 6], data[body + 9], data[body + 12])
            if ids == (82, 71, 66) or hw is not None:  # 'R','G','B' component ids: libjpeg reads RGB
                return None
            hw = (height, width)
        elif marker in _SOF_OTHER:
            return None
        elif marker == 0xE1:
            seg = data[body:pos + 2 + length]
            if seg[:6] == b"Exif\x00\x00":
                if not _exif_orientation_is_one(seg[6:]):
                    return None
            elif b"Orientation" in seg:  # XMP tiff:Orientation: Pillow honours it
                return None
        elif marker == 0xEE and data[body:body + 5] == b"Adobe":
            return None
        elif marker == 0xDA:  # start of scan: header over
            break
        pos += 2 + length
    if hw is None:
        return None
    height, width = hw
    if (width < limits.min_side or height < limits.min_side or width * height > limits.max_pixels
            or max(width, height) > limits.max_side):
        return None
    if data.find(b"\xff\xda", pos + 2) >= 0:  # more than one scan
        return None
    if data.rfind(b"\xff\xd9") <= pos:  # no EOI after the scan: truncated
        return None
    return hw


_LIMITS = DecodeLimits()

# ============================================================================ PIL-exact resize

_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c, 8 bits per channel


def pil_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) integer fixed-point weights of Pillow's BILINEAR resample (antialiased).

    ``out = clip8((sum_k w[o, k] * in[k] + 2**21) >> 22)``, the same coefficients, support and rounding
    as ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` in Pillow's Resample.c.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ss = 1.0 / filterscale
    w = np.zeros((out_size, in_size), dtype=np.float64)
    one = float(1 << _PRECISION_BITS)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ks = []
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * ss)
            ks.append(1.0 - t if t < 1.0 else 0.0)
        ww = sum(ks)
        for x, k in enumerate(ks):
            if ww != 0.0:
                k = k / ww
            w[xx, xmin + x] = float(int(-0.5 + k * one)) if k < 0 else float(int(0.5 + k * one))
    return w


_WEIGHTS: dict[tuple[int, int, str], torch.Tensor] = {}
_WEIGHTS_LOCK = threading.Lock()


def _weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    key = (in_size, out_size, str(device))
    w = _WEIGHTS.get(key)
    if w is None:
        with _WEIGHTS_LOCK:
            w = _WEIGHTS.get(key)
            if w is None:
                w = torch.from_numpy(pil_bilinear_weights(in_size, out_size)).to(device)
                _WEIGHTS[key] = w
    return w


def _round8(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 on exact float64 fixed-point sums."""
    return acc.add_(float(1 << (_PRECISION_BITS - 1))).mul_(2.0 ** -_PRECISION_BITS).floor_().clamp_(0.0, 255.0)


_ORDER: dict[tuple[int, int, int, int], bool] = {}
_ORDER_MAX = 8192


def _passes(y: torch.Tensor, out_h: int, out_w: int, horizontal_first: bool) -> torch.Tensor:
    h, w = y.shape[-2:]
    for horizontal in ((True, False) if horizontal_first else (False, True)):
        if horizontal and w != out_w:
            y = _round8(torch.matmul(y, _weights(w, out_w, y.device).t()))
        elif not horizontal and h != out_h:
            y = _round8(torch.matmul(_weights(h, out_h, y.device), y))
    return y


def horizontal_first(h: int, w: int, out_h: int, out_w: int, device: torch.device | str = "cpu") -> bool:
    """Which pass the installed Pillow runs first when both sides change.

    Pillow up to 12 always runs the horizontal pass first; other builds choose per size. Found once per
    size by resizing a random probe image with PIL and comparing with both orders (cached)."""
    key = (h, w, out_h, out_w)
    hit = _ORDER.get(key)
    if hit is not None:
        return hit
    from PIL import Image

    rng = np.random.default_rng((h * 7919 + w) * 104729 + out_h * 31 + out_w)
    probe = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = torch.from_numpy(np.asarray(Image.fromarray(probe).resize((out_w, out_h), Image.BILINEAR)).copy())
    x = torch.from_numpy(probe).permute(2, 0, 1)[None].to(device=device, dtype=torch.float64)
    hf = _passes(x, out_h, out_w, True)[0].permute(1, 2, 0).to("cpu", torch.uint8)
    first = bool(torch.equal(hf, ref))
    if not first:
        vf = _passes(x, out_h, out_w, False)[0].permute(1, 2, 0).to("cpu", torch.uint8)
        first = not torch.equal(vf, ref)  # neither matches: keep Pillow's classic order
    if len(_ORDER) >= _ORDER_MAX:
        _ORDER.clear()
    _ORDER[key] = first
    return first


def resize_exact(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """(n, C, H, W) uint8 -> (n, C, out_h, out_w) uint8, bit-exact with ``PIL.Image.resize(BILINEAR)``.

    Two separable passes, each rounded to uint8 as Pillow does, each only when that side changes, in
    the order the installed Pillow uses (:func:`horizontal_first`). float64 sums of integer products
    are exact, so so is the rounding.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"resize_exact expects (n, C, H, W) uint8, got {tuple(x.shape)} {x.dtype}")
    n, c, h, w = x.shape
    if (h, w) == (out_h, out_w):
        return x
    first = True if (h == out_h or w == out_w) else horizontal_first(h, w, out_h, out_w, x.device)
    return _passes(x.to(torch.float64), out_h, out_w, first).to(torch.uint8)


def resize_images(images: Sequence[torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """List of (3, H, W) uint8 tensors (any sizes, any strides) -> (n, 3, size, size) uint8, PIL-exact.

    Images of one size are stacked and resized together (one pair of matrix products per size)."""
    n = len(images)
    if n == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)
    shapes = [tuple(t.shape[1:]) for t in images]
    first = shapes[0]
    if all(s == first for s in shapes):
        return resize_exact(torch.stack(list(images)), size, size)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(i)
    for idx in groups.values():
        block = resize_exact(torch.stack([images[i] for i in idx]), size, size)
        if len(idx) == 1:
            out[idx[0]].copy_(block[0])
        else:
            out.index_copy_(0, torch.tensor(idx, device=device), block)
    return out


# ============================================================================ model preparation


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        w = conv.weight.detach().double()
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
        new_b = (bias - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()
        conv.weight.copy_((w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(new_b.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.copy_(new_b.to(conv.bias.dtype))


def _bn_tail(bn: nn.Module) -> nn.Module:
    """What remains of a BatchNorm after folding: timm's BatchNormAct2d keeps its drop and activation."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    parts = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d (timm's BatchNormAct2d too) into the Conv2d registered right
    before it in the same parent (how timm's EfficientNet/MobileNet blocks are laid out), in float64.

    Returns the number of folded pairs. The caller checks the folded model against the original
    (registration order is not data flow in every architecture)."""
    folded = 0
    for parent in list(model.modules()):
        prev: nn.Module | None = None
        for name, mod in list(parent._modules.items()):
            if (isinstance(mod, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d) and mod.running_mean is not None
                    and mod.affine and prev.out_channels == mod.num_features and not mod.training):
                _fold_pair(prev, mod)
                parent._modules[name] = _bn_tail(mod)
                folded += 1
                prev = None
                continue
            prev = mod
    return folded


def bucket_for(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest graph size >= n, or None when n is larger than all."""
    for s in sizes:
        if s >= n:
            return s
    return None


class _ClassifierEngine:
    """One ClassifierTier on the device: uint8 (n, 3, S, S) -> float32 logits (n,)."""

    def __init__(self, tier: ClassifierTier, device: torch.device, cfg: GpuConfig, compile_: bool,
                 log: Callable[[str], None]):
        self.tier, self.device, self.cfg, self.size = tier, device, cfg, tier.input_size
        self.log = log
        cuda = device.type == "cuda"
        dtype = cfg.torch_dtype if cuda else torch.float32
        src = copy.deepcopy(tier.model).to(device=device, dtype=torch.float32).eval()
        model = copy.deepcopy(src)
        self.folded = 0
        if cfg.fold_bn:
            self.folded = fold_batchnorm(model)
            if self.folded and not self._same(src, model):
                log(f"{tier.name}: BatchNorm folding changed the outputs; running unfolded")
                model, self.folded = copy.deepcopy(src), 0
        del src
        self.model = model.to(dtype=dtype).to(memory_format=torch.channels_last).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dtype = dtype
        self.mean = (torch.tensor(tier.mean, dtype=torch.float32, device=device) * 255.0).view(1, 3, 1, 1)
        self.std = (torch.tensor(tier.std, dtype=torch.float32, device=device) * 255.0).view(1, 3, 1, 1)
        self.fn: Callable[[torch.Tensor], torch.Tensor] = self._forward
        self.compiled = False
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.compile_s = 0.0
        self.capture_s = 0.0
        self._want_compile = compile_ and cuda

    def _same(self, a: nn.Module, b: nn.Module) -> bool:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.rand((2, 3, self.size, self.size), generator=g).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            ya, yb = a(x).double(), b(x).double()
        err = float((ya - yb).abs().max()) / max(1.0, float(ya.abs().max()))
        return err < 1e-3

    def _forward(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = (x_u8.to(torch.float32) - self.mean) / self.std  # the CPU path's normalise, in fp32
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return self.model(x).float().reshape(-1)

    # -- set-up -------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Compile (dynamic batch) and capture the CUDA graphs; no-op on CPU."""
        if self.device.type != "cuda":
            return
        torch.backends.cudnn.benchmark = self.cfg.cudnn_benchmark
        S = self.size
        big = max(self.cfg.graph_sizes) if self.cfg.graphs else self.cfg.chunk
        g = torch.Generator(device="cpu").manual_seed(1)
        sample = torch.randint(0, 256, (big, 3, S, S), generator=g, dtype=torch.uint8).to(self.device)
        with torch.inference_mode():
            if self._want_compile:
                t0 = time.perf_counter()
                try:
                    fn = torch.compile(self._forward, dynamic=None)
                    x = sample.clone()
                    torch._dynamo.mark_dynamic(x, 0)
                    ref = self._forward(sample[:8])
                    fn(x)
                    got = fn(sample[:8].clone())
                    torch.cuda.synchronize()
                    if not torch.allclose(got, ref, atol=0.25, rtol=0.05):
                        raise RuntimeError(f"compiled logits differ from eager: {float((got - ref).abs().max()):.4f}")
                    self.fn, self.compiled = fn, True
                except Exception as e:  # noqa: BLE001 - any compile problem: run eager (graphs still apply)
                    self.log(f"{self.tier.name}: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); eager")
                    self.fn, self.compiled = self._forward, False
                self.compile_s = time.perf_counter() - t0
            if self.cfg.graphs:
                t0 = time.perf_counter()
                self._capture(sample)
                self.capture_s = time.perf_counter() - t0

    def _capture(self, sample: torch.Tensor) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for b in sorted(self.cfg.graph_sizes, reverse=True):
            # cuDNN's benchmark search is slow (runtime-compiled engines): only where throughput matters
            torch.backends.cudnn.benchmark = self.cfg.cudnn_benchmark and b >= 128
            static_in = sample[:b].clone() if b <= len(sample) else sample[:1].repeat(b, 1, 1, 1)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.fn(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_out = self.fn(static_in)
            self.graphs[b] = (graph, static_in, static_out)
        torch.cuda.synchronize(self.device)

    # -- run ------------------------------------------------------------------------------------

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) uint8 on the device -> (n,) float32 on the device (current stream)."""
        n = len(x)
        out = torch.empty(n, dtype=torch.float32, device=self.device)
        step = self.cfg.chunk if not self.graphs else max(self.cfg.graph_sizes)
        for start in range(0, n, step):
            part = x[start:start + step]
            m = len(part)
            b = bucket_for(m, self.cfg.graph_sizes) if self.graphs else None
            if b is not None and b in self.graphs:
                graph, static_in, static_out = self.graphs[b]
                static_in[:m].copy_(part)
                graph.replay()
                out[start:start + m].copy_(static_out[:m])
            else:
                out[start:start + m].copy_(self.fn(part.contiguous()))
        return out


# ============================================================================ results


@dataclass
class BatchResult:
    """One batch's answers as arrays (rows in input order; NaN / -1 where the input was bad)."""

    probability: np.ndarray  # (n,) calibrated and folded (decide with > 0.5), clipped to [0, 1]
    calibrated: np.ndarray  # (n,) before the fold
    exit: np.ndarray  # (n,) exit index, -1 for bad input
    logits: np.ndarray  # (n, K) per-tier raw logits (NaN where the tier did not run)
    probs: np.ndarray  # (n, K) per-tier calibrated probabilities
    gflops: np.ndarray  # (n, K) per-tier cost spent
    errors: dict[int, BadImage]
    tier_ms: list[float]  # wall time of each tier's batch (host, including the device work)
    decode_ms: float = 0.0  # parse + decode + resize of the batch (in a worker when streamed)
    total_ms: float = 0.0  # from bytes to these arrays (this batch alone, when run by predict_batch)
    n_gpu_decoded: int = 0
    n_cpu_decoded: int = 0
    n_proc_decoded: int = 0
    tier_names: list[str] = field(default_factory=list)
    rule_names: list[str] = field(default_factory=list)  # per exit: the rule that decides there
    features: list[dict[int, np.ndarray]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.probability)

    @property
    def label(self) -> np.ndarray:
        return (self.probability > 0.5).astype(np.int64)

    def trace(self, i: int) -> Trace:
        """Row i's trace, as Cascade.run_stage records it (a good row)."""
        k = int(self.exit[i])
        tr = Trace()
        for t in range(k + 1):
            tr.add(self.tier_names[t], self.probs[i, t], self.tier_ms[t], self.gflops[i, t])
        tr.exit, tr.rule = k, self.rule_names[k]
        return tr

    def predictions(self) -> list[Prediction | BadImage]:
        """Cascade.predict's objects (with traces) for good rows, the BadImage for bad ones."""
        out: list[Prediction | BadImage] = []
        for i in range(len(self)):
            if i in self.errors:
                out.append(self.errors[i])
                continue
            p = float(self.probability[i])
            out.append(Prediction(probability=p, label=int(p > 0.5), trace=self.trace(i), calibrated=float(self.calibrated[i])))
        return out


@dataclass
class _Decoded:
    n: int
    images: list[torch.Tensor | None]  # (3, H, W) uint8 on the device
    host: dict[int, np.ndarray]  # HxWx3 arrays of CPU-decoded rows (reused by CPU-only tiers)
    errors: dict[int, BadImage]
    good: np.ndarray  # row indices of decoded images, in order
    x0: torch.Tensor | None  # first tier's input (len(good), 3, S, S) uint8
    event: Any = None
    decode_ms: float = 0.0
    n_gpu: int = 0
    n_cpu: int = 0
    payloads: Sequence[Payload] = ()
    proc_x: dict[int, torch.Tensor] = field(default_factory=dict)  # size -> (n_proc, 3, S, S) from the processes
    proc_pos: dict[int, int] = field(default_factory=dict)  # row -> its index in proc_x (good rows only)
    proc_dims: np.ndarray | None = None  # (n_proc, 2) decoded (height, width) of the process rows
    n_proc: int = 0


class _Pinned:
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


def _decode_into(rows: Sequence[int], payloads: Sequence[Payload], dims: dict[int, tuple[int, int]],
                 offsets: dict[int, int], out: np.ndarray) -> list[int]:
    """Decode plain JPEGs with libjpeg-turbo straight into ``out`` (a pinned staging buffer) as HxWx3 RGB
    at ``offsets``; returns the rows that failed. OpenCV releases the GIL while it decodes, so these
    jobs run in parallel on the CPU threads (torchvision's CPU decoder does not)."""
    cv2 = _cv2()
    failed = []
    for i in rows:
        h, w = dims[i]
        view = out[offsets[i]:offsets[i] + h * w * 3].reshape(h, w, 3)
        try:
            if cv2 is not None:
                bgr = cv2.imdecode(np.frombuffer(payloads[i], np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
                if bgr is None or bgr.shape != (h, w, 3):
                    failed.append(i)
                    continue
                res = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=view)
                if not np.shares_memory(res, view):
                    view[...] = res
            else:
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


# ============================================================================ the runtime


class GpuCascade:
    """A Cascade on the fast path. ``predict_batch(payloads)`` for one batch (lowest latency),
    ``predict_stream(batches)`` to overlap decoding with the model (highest throughput), ``predict`` for
    Cascade.predict-compatible objects.

    Payloads are encoded image bytes (anything :func:`decode_bytes` takes) or HxWx3 uint8 arrays.
    A tier whose :meth:`~roadcascade.cascade.Tier.caps` give a ``tensor_input`` runs as a compiled engine on
    device-resized pixels; any other (test-time scaling, detectors) runs its own ``run``/``run_after`` on the
    decoded images, on their own device, as in Cascade.run_stage.
    """

    def __init__(self, cascade: Cascade, device: str | torch.device | None = None, config: GpuConfig | None = None,
                 log: Callable[[str], None] | None = None, warmup: bool = True):
        self.cascade = cascade
        self.cfg = config or GpuConfig()
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.log = log or (lambda m: None)
        if not self.cuda:  # the CPU runtime: same loop, fp32, no compile, no graphs
            self.cfg = _replace(self.cfg, compile=False, graphs=False, decode="cpu", fold_bn=False)
        if self.cfg.procs == -1:
            self.cfg = _replace(self.cfg, procs=auto_procs() if self.cuda else 0)
        self.engines: list[_ClassifierEngine | None] = []
        for k, tier in enumerate(cascade.tiers):
            # a tier that is one model on one resized tensor gets an engine; any other runs its own code
            if tier.caps().tensor_input is not None:
                comp = self.cfg.compile and (k == 0 or self.cfg.compile_later_tiers)
                self.engines.append(_ClassifierEngine(tier, self.device, self.cfg, comp, self.log))
            else:
                self.engines.append(None)
        self.rule_names = [exit_rule_name(e, k == cascade.n_stages - 1) for k, e in enumerate(cascade.exits)]
        self._local = threading.local()
        self._cpu_pool = ThreadPoolExecutor(max(1, self.cfg.cpu_threads), thread_name_prefix="rc-gpu-cpudec")
        self._workers = ThreadPoolExecutor(max(1, self.cfg.decode_workers), thread_name_prefix="rc-gpu-prep")
        self.s_comp = torch.cuda.Stream(self.device) if self.cuda else None
        self.nvdec: NvImgCodecDecoder | None = None
        self.gpu_decoder = "none"
        if self.cuda:
            want = self.cfg.gpu_decoder
            if want == "nvimgcodec":
                try:
                    self.nvdec = NvImgCodecDecoder(self.device, self.cfg.nvimg_hw_share, self.cfg.nvimg_threads)
                except Exception as e:  # noqa: BLE001
                    if want == "nvimgcodec":
                        raise
                    self.log(f"nvImageCodec did not start ({e}); using torchvision's nvJPEG op")
            self.gpu_decoder = "nvimgcodec" if self.nvdec is not None else "torchvision"
            if self.cfg.gil_switch_ms is not None:
                import sys

                sys.setswitchinterval(self.cfg.gil_switch_ms / 1e3)
        self.procs = None
        self.proc_share_now = self.cfg.proc_share  # the adapted share (GpuConfig.proc_adapt)
        try:
            self.start_procs(self.cfg.procs)
        except RuntimeError as e:  # the fast path still works without them, only slower
            warnings.warn(f"running without decode processes: {e}", RuntimeWarning, stacklevel=2)
            self.log(f"running without decode processes: {e}")
        self.warmup_s = 0.0
        if warmup:
            self.warmup()

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device | None = None,
                    config: GpuConfig | None = None, log: Callable[[str], None] | None = None) -> "GpuCascade":
        from .bundle import Bundle

        b = Bundle.load(path, device=torch.device("cpu"))
        return cls(b.cascade, device=device, config=config, log=log)

    def warmup(self) -> float:
        """Compile and capture every engine, warm the decoders; returns the seconds it took."""
        t0 = time.perf_counter()
        for eng in self.engines:
            if eng is not None:
                eng.warmup()
        if self.cuda:
            from .images import encode_jpeg

            rng = np.random.default_rng(0)
            jp = encode_jpeg(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), 75)
            self.predict_batch([jp] * max(8, self.cfg.gpu_decode_min))
            self.predict_batch([jp])
            if self.procs is not None:
                self.predict_batch([jp] * max(8, self.cfg.proc_min))
            if self.cfg.gc_freeze:
                import gc

                gc.collect()
                gc.freeze()
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s

    def start_procs(self, n: int) -> None:
        """(Re)start the decode processes with ``n`` workers (0: none), for the first classifier's input size
        only (later tiers see few rows, see _fill_images). Raises RuntimeError when they cannot start."""
        if self.procs is not None:
            self.procs.close()
            self.procs = None
        sizes = [e.size for e in self.engines if e is not None][:1]
        if n > 0 and sizes:
            from .procdecode import DecodeProcs

            self.procs = DecodeProcs(n, sizes, self.cfg.limits, pin=self.cuda)
            self.log(f"{n} decode processes ({self.procs.start_method}) for size {sizes[0]}")

    def close(self) -> None:
        if self.nvdec is not None:
            self.nvdec.close()
        self.start_procs(0)
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)
        self._workers.shutdown(wait=False, cancel_futures=True)

    @property
    def tier_names(self) -> list[str]:
        return self.cascade.tier_names

    # -- decoding -------------------------------------------------------------------------------

    def _state(self):
        st = self._local
        if not hasattr(st, "pinned"):
            st.pinned = _Pinned() if self.cuda else None
            st.stream = torch.cuda.Stream(self.device) if self.cuda else None
        return st

    def _cpu_exact(self, rows: Sequence[int], payloads: Sequence[Payload]) -> list[np.ndarray | BadImage]:
        out: list[np.ndarray | BadImage] = []
        for i in rows:
            p = payloads[i]
            try:
                if isinstance(p, (bytes, bytearray, memoryview)):
                    out.append(decode_bytes(bytes(p), self.cfg.limits))
                else:
                    out.append(decode_any(p, self.cfg.limits))
            except BadImage as e:
                out.append(e)
        return out

    def _map_cpu(self, fn, rows: list[int], payloads: Sequence[Payload], inline: bool) -> list[Future] | list:
        """Split rows over the CPU decoder threads; returns futures (or results when inline)."""
        if not rows:
            return []
        if inline:
            return [fn(rows, payloads)]
        k = max(1, min(self.cfg.cpu_threads, math.ceil(len(rows) / 8)))
        step = math.ceil(len(rows) / k)
        return [self._cpu_pool.submit(fn, rows[j:j + step], payloads) for j in range(0, len(rows), step)]

    def _decode(self, payloads: Sequence[Payload], inline: bool = False) -> _Decoded:
        """Parse, route, decode and make the first tier's input. Runs in a worker (or the caller)."""
        t0 = time.perf_counter()
        n = len(payloads)
        st = self._state()
        # a share of the encoded payloads goes to the decode processes first (no per-image work here)
        proc_rows: list[int] = []
        job = None
        rest: Iterable[int] = range(n)
        share = self.proc_share_now if self.cfg.proc_adapt else self.cfg.proc_share
        use_procs = self.cfg.decode == "auto" or not self.cuda  # decode="gpu"/"cpu": that decoder for every row
        if self.procs is not None and n >= self.cfg.proc_min and share > 0 and use_procs:
            byte_rows = [i for i, p in enumerate(payloads) if isinstance(p, (bytes, bytearray, memoryview))]
            proc_rows = byte_rows[:int(round(share * len(byte_rows)))]
            if proc_rows:
                job = self.procs.submit([payloads[i] for i in proc_rows])
                taken = set(proc_rows)
                rest = [i for i in range(n) if i not in taken]
        try:
            return self._decode_rest(payloads, inline, t0, st, rest, proc_rows, job)
        except BaseException:
            if job is not None:
                self.procs.abandon(job)
            raise

    def _decode_rest(self, payloads: Sequence[Payload], inline: bool, t0: float, st, rest: Iterable[int],
                     proc_rows: list[int], job, first_input: bool = True) -> _Decoded:
        n = len(payloads)
        dims: dict[int, tuple[int, int]] = {}  # plain JPEGs: nvJPEG, or libjpeg-turbo on the CPU threads
        exact_rows: list[int] = []  # everything else: images.decode_bytes / decode_any (the CPU path)
        for i in rest:
            p = payloads[i]
            hw = jpeg_gpu_info(p, self.cfg.limits) if self.cuda and isinstance(p, (bytes, bytearray, memoryview)) else None
            if hw is None:
                exact_rows.append(i)
            else:
                dims[i] = hw
        eligible = list(dims)
        if self.cfg.decode == "cpu" or (self.cfg.decode == "auto" and len(eligible) < self.cfg.gpu_decode_min):
            gpu_rows, fast_rows = [], eligible
        else:
            n_fast = int(round(self.cfg.cpu_share * len(eligible)))
            gpu_rows, fast_rows = eligible[:len(eligible) - n_fast], eligible[len(eligible) - n_fast:]

        images: list[torch.Tensor | None] = [None] * n
        host: dict[int, np.ndarray] = {}
        errors: dict[int, BadImage] = {}
        ctx = torch.cuda.stream(st.stream) if self.cuda else nullcontext()
        with ctx:
            # CPU threads first (they release the GIL), straight into pinned staging memory
            fast_futs: list = []
            slot = None
            if fast_rows:
                offsets, off = {}, 0
                for i in fast_rows:
                    offsets[i] = off
                    off += dims[i][0] * dims[i][1] * 3
                slot, buf = st.pinned.reserve(off)
                out = buf.numpy()
                if inline and len(fast_rows) <= 2:
                    fast_futs = [_decode_into(fast_rows, payloads, dims, offsets, out)]
                else:
                    k = max(1, min(self.cfg.cpu_threads, math.ceil(len(fast_rows) / 4)))
                    step = math.ceil(len(fast_rows) / k)
                    fast_futs = [self._cpu_pool.submit(_decode_into, fast_rows[j:j + step], payloads, dims, offsets, out)
                                 for j in range(0, len(fast_rows), step)]
                fast_total = off
            fut_exact = self._map_cpu(self._cpu_exact, exact_rows, payloads, inline and len(exact_rows) <= 2)
            if gpu_rows:
                refused = []
                for i, t in zip(gpu_rows, self._gpu_decode([payloads[i] for i in gpu_rows], st.stream)):
                    if t is None or tuple(t.shape[1:]) != dims[i]:
                        refused.append(i)
                    else:
                        images[i] = t
                if refused:  # images the GPU decoder could not decode go to the exact CPU decoder
                    fut_exact = list(fut_exact) + self._map_cpu(self._cpu_exact, refused, payloads, inline)
                    exact_rows = exact_rows + refused
                    gone = set(refused)
                    gpu_rows = [i for i in gpu_rows if i not in gone]
            failed: list[int] = []
            if fast_rows:
                for f in fast_futs:
                    failed += f.result() if isinstance(f, Future) else f
                dev = st.pinned.send(slot, fast_total, self.device)
                bad = set(failed)
                for i in fast_rows:
                    if i not in bad:
                        h, w = dims[i]
                        images[i] = dev[offsets[i]:offsets[i] + h * w * 3].view(h, w, 3).permute(2, 0, 1)
            exact = [r for f in fut_exact for r in (f.result() if isinstance(f, Future) else f)]
            if failed:  # libjpeg-turbo refused it: the exact path gives pixels or the BadImage
                exact += self._cpu_exact(failed, payloads)
                exact_rows = exact_rows + failed
            up_rows: list[int] = []
            up: list[torch.Tensor] = []
            for i, r in zip(exact_rows, exact):
                if isinstance(r, BadImage):
                    errors[i] = r
                else:
                    host[i] = r
                    up_rows.append(i)
                    up.append(torch.from_numpy(r))  # H, W, 3
            if up:
                devs = st.pinned.upload(up, self.device) if self.cuda else up
                for i, t in zip(up_rows, devs):
                    images[i] = t.permute(2, 0, 1)
            proc_x: dict[int, torch.Tensor] = {}
            proc_pos: dict[int, int] = {}
            proc_dims = None
            if job is not None:
                ready = all(f.done() for f, _ in job.futures)
                t_wait = time.perf_counter()
                pb = self.procs.collect(job, self.device, st.stream)
                if self.cfg.proc_adapt:
                    self.proc_share_now = adapt_share(self.proc_share_now, ready, time.perf_counter() - t_wait,
                                                      t_wait - t0)
                proc_x, proc_dims = pb.x, pb.dims
                for j, i in enumerate(proc_rows):
                    if j in pb.errors:
                        errors[i] = pb.errors[j]
                    else:
                        proc_pos[i] = j
            good = np.array([i for i in range(n) if images[i] is not None or i in proc_pos], dtype=np.int64)
            dec = _Decoded(n=n, images=images, host=host, errors=errors, good=good, x0=None,
                           n_gpu=len(gpu_rows), n_cpu=len(exact_rows) + len(fast_rows) - len(failed),
                           payloads=payloads, proc_x=proc_x, proc_pos=proc_pos, proc_dims=proc_dims,
                           n_proc=len(proc_pos))
            if first_input:
                dec.x0 = self._gather(dec, good, 0)
            if self.cuda:
                dec.event = torch.cuda.Event()
                dec.event.record(st.stream)
        dec.decode_ms = (time.perf_counter() - t0) * 1e3
        return dec

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

    def _input_size(self, k: int) -> int | None:
        eng = self.engines[k]
        return eng.size if eng is not None else None

    def _prep(self, imgs: Sequence[torch.Tensor], k: int) -> torch.Tensor | None:
        size = self._input_size(k)
        if size is None or not imgs:
            return None
        return resize_images(imgs, size, self.device)

    def _gather(self, dec: _Decoded, rows: np.ndarray, k: int) -> torch.Tensor | None:
        """Tier k's input (len(rows), 3, S, S) uint8 for the given good rows: rows decoded in this process are
        resized on the device, rows from the decode processes come resized already."""
        size = self._input_size(k)
        if size is None or len(rows) == 0:
            return None
        if not dec.proc_pos:
            return self._prep([dec.images[i] for i in rows], k)
        xs = dec.proc_x.get(size)
        if xs is None:  # another size than the processes made: from the decoded images
            self._fill_images(dec, rows)
            return self._prep([dec.images[i] for i in rows], k)
        pp = np.array([dec.proc_pos.get(int(i), -1) for i in rows], dtype=np.int64)
        in_proc = pp >= 0
        if in_proc.all():
            if len(pp) == xs.shape[0] and np.array_equal(pp, np.arange(len(pp))):
                return xs
            return xs.index_select(0, torch.from_numpy(pp).to(self.device))
        out = torch.empty((len(rows), size, size, 3), dtype=torch.uint8, device=self.device).permute(0, 3, 1, 2)
        mine = np.flatnonzero(~in_proc)
        out.index_copy_(0, torch.from_numpy(mine).to(self.device), self._prep([dec.images[rows[j]] for j in mine], k))
        theirs = np.flatnonzero(in_proc)
        if len(theirs):
            src = xs.index_select(0, torch.from_numpy(pp[theirs]).to(self.device))
            out.index_copy_(0, torch.from_numpy(theirs).to(self.device), src)
        return out

    def _fill_images(self, dec: _Decoded, rows: np.ndarray) -> None:
        """Decoded images for process rows (the processes return the first tier's input only): an image that
        was already that size is that input (exact); the others are decoded again here, on this thread's
        stream, which the current stream then waits for."""
        redo = []
        for i in rows:
            i = int(i)
            if dec.images[i] is not None:
                continue
            j = dec.proc_pos[i]
            h, w = (int(v) for v in dec.proc_dims[j])
            got = next((x[j] for s, x in dec.proc_x.items() if (h, w) == (s, s)), None)
            if got is not None:
                dec.images[i] = got
            else:
                redo.append(i)
        if not redo:
            return
        sub = self._decode_rest([dec.payloads[i] for i in redo], True, time.perf_counter(), self._state(),
                                range(len(redo)), [], None, first_input=False)
        if sub.event is not None:
            torch.cuda.current_stream(self.device).wait_event(sub.event)
        for j, i in enumerate(redo):
            if sub.images[j] is None:  # pragma: no cover - the processes decoded it with the same decoder
                raise RuntimeError(f"row {i} decoded in a process but not here: {sub.errors.get(j)}")
            dec.images[i] = sub.images[j]

    # -- the cascade loop ---------------------------------------------------------------------

    def _compute(self, dec: _Decoded) -> BatchResult:
        n, K = dec.n, self.cascade.n_stages
        L = np.full((n, K), np.nan)
        P = np.full((n, K), np.nan)
        G = np.full((n, K), np.nan)
        prob = np.full(n, np.nan)
        cal = np.full(n, np.nan)
        ex = np.full(n, -1, dtype=np.int64)
        feats: list[dict[int, np.ndarray]] = [dict() for _ in range(K)]
        tier_ms = [0.0] * K
        active = dec.good
        x_cur, x_rows, x_size = dec.x0, dec.good, self._input_size(0)
        ctx = torch.cuda.stream(self.s_comp) if self.cuda else nullcontext()
        with ctx, torch.inference_mode():
            if dec.event is not None:
                self.s_comp.wait_event(dec.event)
            for k, tier in enumerate(self.cascade.tiers):
                if len(active) == 0:
                    break
                t0 = time.perf_counter()
                eng = self.engines[k]
                if eng is not None:
                    if x_cur is not None and x_size == eng.size:
                        if len(x_rows) != len(active):
                            pos = np.searchsorted(x_rows, active)
                            x_cur = x_cur.index_select(0, torch.from_numpy(pos).to(self.device))
                    else:
                        x_cur = self._gather(dec, active, k)
                    x_rows, x_size = active, eng.size
                    z = eng.logits(x_cur).cpu().numpy().astype(np.float64)
                    L[active, k] = z
                    P[active, k] = tier.calibrator.calibrated(z)
                    G[active, k] = tier.gflops
                else:
                    out = self._run_other(k, tier, dec, active, L)
                    L[active, k] = np.asarray(out.logits, dtype=np.float64)
                    P[active, k] = np.asarray(out.prob, dtype=np.float64)
                    G[active, k] = tier.gflops if out.gflops is None else np.asarray(out.gflops, dtype=np.float64)
                    if out.features is not None:
                        for j, i in enumerate(active):
                            feats[k][int(i)] = np.asarray(out.features[j])
                flist = stack_features([[feats[t].get(int(i)) for i in active] for t in range(k + 1)])
                d = decide(self.cascade.exits[k], L[active, :k + 1], P[active, :k + 1], flist, last=k == K - 1)
                prob[active] = d.probability
                cal[active] = d.calibrated
                ex[active[d.stop]] = k
                active = active[~d.stop]
                tier_ms[k] = (time.perf_counter() - t0) * 1e3
        return BatchResult(probability=np.clip(prob, 0.0, 1.0), calibrated=cal, exit=ex, logits=L, probs=P, gflops=G,
                           errors=dec.errors, tier_ms=tier_ms, decode_ms=dec.decode_ms, n_gpu_decoded=dec.n_gpu,
                           n_cpu_decoded=dec.n_cpu, n_proc_decoded=dec.n_proc, tier_names=self.tier_names, rule_names=self.rule_names,
                           features=feats)

    def _run_other(self, k: int, tier, dec: _Decoded, active: np.ndarray, L):
        """A tier without a GPU engine: its own run/run_after on HxWx3 uint8 arrays, as run_stage does."""
        images = []
        for i in active:
            i = int(i)
            img = dec.host.get(i)
            if img is None:
                if dec.images[i] is not None:
                    img = dec.images[i].permute(1, 2, 0).contiguous().cpu().numpy()
                else:  # a row from the decode processes (they return model-sized pixels only): decode it here
                    got = self._cpu_exact([i], dec.payloads)[0]
                    if isinstance(got, BadImage):  # pragma: no cover - the processes ran the same decoder
                        raise got
                    img = got
                dec.host[i] = img
            images.append(img)
        return run_tier(tier, images, self.tier_names[:k], L[active, :k])

    # -- public API -----------------------------------------------------------------------------

    def predict_batch(self, payloads: Sequence[Payload]) -> BatchResult:
        """One batch end to end in the calling thread (decoding on the CPU threads / GPU decoder)."""
        t0 = time.perf_counter()
        res = self._compute(self._decode(payloads, inline=True))
        res.total_ms = (time.perf_counter() - t0) * 1e3
        return res

    def predict_stream(self, batches: Iterable[Sequence[Payload]], prefetch: int | None = None) -> Iterator[BatchResult]:
        """Results of each batch in order; up to ``prefetch`` later batches decode while one computes."""
        depth = max(1, prefetch or self.cfg.prefetch)
        it = iter(batches)
        pending: deque[Future] = deque()

        def submit() -> bool:
            b = next(it, None)
            if b is None:
                return False
            pending.append(self._workers.submit(self._decode, b))
            return True

        for _ in range(depth):
            if not submit():
                break
        while pending:
            dec = pending.popleft().result()
            submit()
            yield self._compute(dec)

    def predict(self, payloads: Sequence[Payload]) -> list[Prediction | BadImage]:
        """Cascade.predict's answers (Prediction with trace) per payload; BadImage where it is bad."""
        return self.predict_batch(payloads).predictions()

    def predict_proba(self, payloads: Sequence[Payload]) -> np.ndarray:
        """Folded probabilities (NaN where the input was bad)."""
        return self.predict_batch(payloads).probability

    def memory(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        free, total = torch.cuda.mem_get_info(self.device)
        return {"allocated_mib": torch.cuda.memory_allocated(self.device) / 2**20,
                "reserved_mib": torch.cuda.memory_reserved(self.device) / 2**20,
                "peak_allocated_mib": torch.cuda.max_memory_allocated(self.device) / 2**20,
                "device_used_mib": (total - free) / 2**20}


def _replace(cfg: GpuConfig, **kw) -> GpuConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def maybe_gpu_cascade(cascade: Cascade, enabled: str = "auto", config: GpuConfig | None = None,
                      log: Callable[[str], None] | None = None, device: str | torch.device | None = None) -> GpuCascade | None:
    """The one place that chooses the runtime: a GpuCascade (the fast path) or None (the CPU runtime,
    ``Cascade`` and the multi-stage batcher). ``eval``, ``serve`` and ``predict`` all ask it.

    ``enabled``: ``on`` (the fast-path runtime, on the CPU when there is no CUDA), ``off``, or ``auto``
    (the environment's ``ROADCASCADE_GPU`` decides if set, else: on when CUDA and the GPU JPEG decoder are
    there and ``device`` is not ``cpu``). The instance is cached on the cascade object."""
    import os

    if enabled == "auto":
        enabled = os.environ.get("ROADCASCADE_GPU", "auto")
    if enabled in ("off", "0", "false") or (enabled == "auto" and (str(device) == "cpu" or not gpu_available())):
        return None
    gc = getattr(cascade, "_gpu_cascade", None)
    if gc is None:
        gc = GpuCascade(cascade, device="cpu" if str(device) == "cpu" else None if device in (None, "auto") else device,
                        config=config, log=log)
        cascade._gpu_cascade = gc  # type: ignore[attr-defined]
    return gc
