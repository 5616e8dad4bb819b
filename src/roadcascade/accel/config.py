"""The GPU fast path's settings (:class:`GpuConfig`), whether it can run here, and the decode-process share controller."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..io.images import DecodeLimits

__all__ = ["GpuConfig", "gpu_available", "auto_procs", "adapt_share"]



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
    procs: int = -1  # decode processes (roadcascade.accel.procdecode): the CPU path's decode + resize in worker
    #                  processes into shared page-locked memory, no GIL shared with this process. 0: off;
    #                  -1 (auto): on CUDA with >= 8 CPUs, CPUs - 4 up to 12 (12 of 16 measured best on the H100,
    #                  docs/GPU.md); else off
    proc_share: float = 0.7  # share of each batch's encoded payloads sent to the decode processes (the start
    #                          value when proc_adapt; 0.7 measured best of 0.5/0.7 fixed on the H100, q75 images)
    proc_adapt: bool = False  # move the share after each batch toward the point where the processes and this
    #                           process finish together (adapt_share), so images that are costlier to decode on the
    #                           CPU (large, PNG) get a smaller share without a setting. Off: on the H100 it wandered
    #                           (0.05-0.9) and was not faster than a fixed 0.7 (docs/GPU.md)
    route: str = "measured"  # measured | share. measured: plain JPEGs are split between the GPU decoder, the CPU
    #                          threads and the decode processes by each one's measured megapixels per second
    #                          (accel.route.Router), other payloads go to the processes; share: the fixed
    #                          proc_share / cpu_share split above (per image, the 224x224 tuning)
    route_min_mpix: float = 0.25  # measured routing for batches whose plain JPEGs average at least this many
    #                               megapixels; smaller images keep the per-image shares (tuned on 224x224 views,
    #                               where per-image overheads, not pixels, set the cost)
    route_threads: bool = True  # measured routing: the CPU threads take a share too
    rate_priors_mps: tuple[float, float, float] = (2000.0, 300.0, 600.0)  # start rates: gpu, threads, procs (MP/s)
    reduced_decode: bool = True  # CPU decoders (threads, processes, exact path) decode JPEGs at the largest DCT
    #                              scale that keeps the cascade's decode_size (images.decode_bytes' min_size)
    exact_resize_max_px: int = 1 << 19  # CUDA: images up to this many pixels are resized PIL-exact (float64);
    #                                     larger ones with the antialiased float32 resize (accel.resize)
    gpu_chunk_mpix: float = 256.0  # the GPU decoder takes at most this many megapixels per call (memory bound:
    #                               decoded full-size images of one call, about 3 bytes per pixel)
    proc_min: int = 64  # batches smaller than this skip the processes (latency: batch 1 stays on the GPU decoder)
    gc_freeze: bool = True  # after warm-up: gc.collect() + gc.freeze(), so the collector does not walk the
    #                         model and library objects during requests (stalls at batch 1)
    decode_workers: int = 3  # threads preparing batches (parse, decode, resize) ahead of the model (3 with decode
    #                          processes, 2 without: H100 sweep)
    prefetch: int = 3  # batches decoded ahead in predict_stream
    cudnn_benchmark: bool = True
    view_engine: bool = True  # a tier with square views (squares > 1): the views of full frames are cropped and resized on
    #                           the device and run as an engine at the view size (max-pooled per frame), as the
    #                           single-view rows do at the input size; False: full frames run the tier's own code
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
        if self.route not in ("measured", "share"):
            raise ValueError(f"route must be measured or share, not {self.route!r}")
        if len(self.rate_priors_mps) != 3 or min(self.rate_priors_mps) <= 0:
            raise ValueError(f"rate_priors_mps must be three positive rates, got {self.rate_priors_mps}")
        if self.route_min_mpix < 0:
            raise ValueError(f"route_min_mpix must be >= 0, got {self.route_min_mpix}")
        if self.gpu_chunk_mpix <= 0:
            raise ValueError(f"gpu_chunk_mpix must be > 0, got {self.gpu_chunk_mpix}")
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
