"""The GPU fast path: JPEG bytes in host memory -> calibrated, folded probabilities, in batches.

The same answers as :meth:`Cascade.predict` (same exits, fusion, fold and rules; bad input still gives
:class:`~roadcascade.io.images.BadImage`), computed like this::

    bytes ─ routing and decoding (accel.decoder.BatchDecoder; the header walk of accel.jpeg says which
    │       JPEGs a GPU decoder may take; accel.route splits those by each decoder's measured megapixels per
    │       second between the GPU decoder (nvJPEG via torchvision, or nvImageCodec with the hardware JPEG
    │       engines), libjpeg-turbo threads and decode processes, the CPU ones with the reduced-size DCT decode;
    │       everything else takes the CPU path's decode_bytes, exact)
    v
    resize on the GPU, per shape group: PIL-exact (float64, PIL's fixed-point coefficients and rounding) for
    small images, antialiased float32 for large downscales; the GPU decoder's full-size images are resized
    per call of at most gpu_chunk_mpix megapixels and dropped (memory bounded at any batch size)
    v
    compiled model (accel.engine: torch.compile, dynamic batch; uint8 -> normalise -> bf16 channels_last inside
    the graph; BatchNorm folded into the convolutions in fp32 first), replayed as CUDA graphs of fixed batch
    sizes (2, 4, ..., 256; a batch is cut into 256-chunks, the rest padded up)
    v
    logits (float32) -> host; calibration, fusion, fold and deferral rules in float64 NumPy, exactly the
    functions Cascade.run_stage uses; later tiers run once on the undecided images (accel.compute.TierRunner)

Overlap: decoding (its own CUDA stream and worker thread; nvJPEG runs on the hardware decoder while the
SMs run the model; the decode processes on the CPUs) of batch i+1.. overlaps the model of batch i
(:meth:`GpuCascade.predict_stream`).

Where the result can differ from the CPU path (measured numbers in docs/GPU.md):

- torchvision's nvJPEG IDCT and chroma upsampling are not libjpeg-turbo's: decoded pixels differ by a few
  levels, mostly near colour edges (2.1 levels on average with torchvision 0.26 on the H200) (nvImageCodec's were identical on the H100; images the header walk
  sends to the CPU decoder are bit-exact);
- bf16 weights and activations (the CPU path runs fp32);
- large images: the GPU decoder decodes at full size and resizes in float32, the CPU decoders decode at a reduced
  DCT scale (as the CPU path does with ``min_size``): equal answers, not equal bits;
- a corrupt entropy-coded segment that nvJPEG decodes without error decodes to other garbage than
  libjpeg's; truncated files (no EOI after the scan) go to the CPU decoder and raise ``truncated``.

Pure pieces (header walk, PIL-exact resize, BatchNorm folding, the cascade loop on arrays) run on the
CPU too; ``GpuCascade(..., device="cpu")`` is the same runtime without CUDA (used by the CPU tests).
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..cascade.runtime import Cascade, Prediction
from .compute import BatchResult, TierRunner, full_frames
from .config import GpuConfig, adapt_share, auto_procs, gpu_available
from .decode import Decoded, NvImgCodecDecoder, Payload, nvimgcodec_available
from .decoder import BatchDecoder
from .engine import ClassifierEngine, bucket_for, fold_batchnorm
from .jpeg import jpeg_gpu_info
from .resize import horizontal_first, pil_bilinear_weights, resize_exact, resize_images
from ..io.images import BadImage

__all__ = [
    "GpuConfig",
    "GpuCascade",
    "BatchResult",
    "jpeg_gpu_info",
    "pil_bilinear_weights",
    "resize_exact",
    "resize_images",
    "horizontal_first",
    "fold_batchnorm",
    "bucket_for",
    "gpu_available",
    "maybe_gpu_cascade",
    "NvImgCodecDecoder",
    "nvimgcodec_available",
    "adapt_share",
    "auto_procs",
    "full_frames",
]

warnings.filterwarnings("ignore", message="The given buffer is not writable")  # torch.frombuffer(bytes): read only


class GpuCascade:
    """A Cascade on the fast path. ``predict_batch(payloads)`` for one batch (lowest latency),
    ``predict_stream(batches)`` to overlap decoding with the model (highest throughput), ``predict`` for
    Cascade.predict-compatible objects.

    Payloads are encoded image bytes (anything :func:`decode_bytes` takes) or HxWx3 uint8 arrays. Three
    parts, one job each: :class:`~roadcascade.accel.decoder.BatchDecoder` (routing and decoding),
    :class:`~roadcascade.accel.compute.TierRunner` (the tier loop) and this class (set-up, warm-up, streaming).
    A tier whose :meth:`~roadcascade.cascade.runtime.Tier.caps` give a ``tensor_input`` runs as a compiled engine
    on device-resized pixels; any other runs its own ``run``/``run_after`` on the decoded images.
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
        self.engines: list[ClassifierEngine | None] = []
        # per tier: its engine takes only the rows that are not full frames (a tier with square views: such an image
        # is one view); a full frame's views run on the tier's view engine (or, without one, the tier's own code)
        self.squares_only: list[bool] = []
        self.view_engines: list[tuple[ClassifierEngine, int] | None] = []  # (engine at the view size, k squares)
        for k, tier in enumerate(cascade.tiers):
            # a tier that is one model on one resized tensor gets an engine; any other runs its own code
            caps = tier.caps()
            comp = self.cfg.compile and (k == 0 or self.cfg.compile_later_tiers)
            if caps.tensor_input is not None or caps.square_input is not None:
                self.engines.append(ClassifierEngine(tier, self.device, self.cfg, comp, self.log))
            else:
                self.engines.append(None)
            self.squares_only.append(caps.tensor_input is None and caps.square_input is not None)
            sv = caps.square_views if self.squares_only[-1] and self.cfg.view_engine else None
            # eager + CUDA graphs: compiling the same forward at a second input size made dynamo treat the spatial
            # dimensions as dynamic, and the H200 warm-up ran for minutes
            self.view_engines.append((ClassifierEngine(tier, self.device, self.cfg, False, self.log, size=sv[1]), sv[0])
                                     if sv else None)
        if self.cfg.procs == -1:
            # none before a view engine: the decode processes hand back only the first tier's input, so each full
            # frame they took would be decoded a second time for its views (nvJPEG alone out-ran the routed mix on
            # the H200 anyway, GPU.md)
            views_first = bool(self.view_engines) and self.view_engines[0] is not None
            self.cfg = _replace(self.cfg, procs=auto_procs() if self.cuda and not views_first else 0)
        first = self.engines[0].size if self.engines and self.engines[0] is not None else None
        keep = first is None or cascade.n_stages > 1 or any(self.squares_only)
        self.decoder = BatchDecoder(self.device, self.cfg, first, cascade.decode_size(), keep_images=keep, log=self.log)
        self.runner = TierRunner(cascade, self.engines, self.decoder, self.device, self.squares_only, self.view_engines)
        self.rule_names = self.runner.rule_names
        self._workers = ThreadPoolExecutor(max(1, self.cfg.decode_workers), thread_name_prefix="rc-gpu-prep")
        if self.cuda and self.cfg.gil_switch_ms is not None:
            import sys

            sys.setswitchinterval(self.cfg.gil_switch_ms / 1e3)
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
        from ..cascade.bundle import Bundle

        b = Bundle.load(path, device=torch.device("cpu"))
        return cls(b.cascade, device=device, config=config, log=log)

    # the decoder's parts, as attributes of the runtime (the bench and the tests switch them)
    nvdec = property(lambda self: self.decoder.nvdec, lambda self, v: setattr(self.decoder, "nvdec", v))
    gpu_decoder = property(lambda self: self.decoder.gpu_decoder,
                           lambda self, v: setattr(self.decoder, "gpu_decoder", v))
    procs = property(lambda self: self.decoder.procs)
    proc_share_now = property(lambda self: self.decoder.proc_share_now,
                              lambda self, v: setattr(self.decoder, "proc_share_now", v))

    def start_procs(self, n: int) -> None:
        """(Re)start the decode processes with ``n`` workers (0: none). RuntimeError when they cannot start."""
        self.decoder.start_procs(n)

    def warmup(self) -> float:
        """Compile and capture every engine, warm the decoders; returns the seconds it took."""
        t0 = time.perf_counter()
        for eng in self.engines + [v[0] for v in self.view_engines if v is not None]:
            if eng is not None:
                eng.warmup()
        if self.cuda:
            from ..io.images import encode_jpeg

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

    def close(self) -> None:
        self.decoder.close()
        self._workers.shutdown(wait=False, cancel_futures=True)

    @property
    def tier_names(self) -> list[str]:
        return self.cascade.tier_names

    def _decode(self, payloads: Sequence[Payload], inline: bool = False, keep: bool | None = None) -> Decoded:
        return self.decoder.decode(payloads, inline, keep)

    def _compute(self, dec: Decoded) -> BatchResult:
        return self.runner.compute(dec)

    # -- public API -----------------------------------------------------------------------------

    def predict_batch(self, payloads: Sequence[Payload]) -> BatchResult:
        """One batch end to end in the calling thread (decoding on the CPU threads / GPU decoder)."""
        t0 = time.perf_counter()
        res = self.runner.compute(self.decoder.decode(payloads, inline=True))
        res.total_ms = (time.perf_counter() - t0) * 1e3
        return res

    def predict_stream(self, batches: Iterable[Sequence[Payload]], prefetch: int | None = None) -> Iterator[BatchResult]:
        """Results of each batch in order; up to ``prefetch`` later batches decode while one computes."""
        return (self.runner.compute(dec) for dec in self.decode_stream(batches, prefetch))

    def decode_stream(self, batches: Iterable[Sequence[Payload]], prefetch: int | None = None) -> Iterator[Decoded]:
        """Decoded batches in order, ``prefetch`` of them decoding at once on the decode workers (the
        decode-only half of :meth:`predict_stream`; the bench's decode ceiling)."""
        depth = max(1, prefetch or self.cfg.prefetch)
        it = iter(batches)
        pending: deque[Future] = deque()

        def submit() -> bool:
            b = next(it, None)
            if b is None:
                return False
            pending.append(self._workers.submit(self.decoder.decode, b))
            return True

        for _ in range(depth):
            if not submit():
                break
        while pending:
            dec = pending.popleft().result()
            submit()
            yield dec

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
