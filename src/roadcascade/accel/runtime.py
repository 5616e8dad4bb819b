"""The GPU fast path: JPEG bytes in host memory -> calibrated, folded probabilities, in batches.

The same answers as :meth:`Cascade.predict` (same exits, fusion, fold and rules; bad input still gives
:class:`~roadcascade.io.images.BadImage`), computed like this::

    bytes ─┬─ batches >= proc_min: proc_share (0.7) of the payloads go to decode processes
           │  (roadcascade.accel.procdecode: images.decode_bytes + resize_square in worker processes, written to
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

import math
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

from ..cascade.runtime import Cascade, Prediction, Trace, run_tier
from ..cascade.decision import decide, exit_rule_name, is_full_frame, stack_features
from .config import GpuConfig, adapt_share, auto_procs, gpu_available
from .decode import Decoded, NvImgCodecDecoder, Payload, Pinned, decode_into, nvimgcodec_available
from .engine import ClassifierEngine, bucket_for, fold_batchnorm
from .jpeg import jpeg_gpu_info
from .resize import horizontal_first, pil_bilinear_weights, resize_exact, resize_images
from ..io.images import BadImage, decode_any, decode_bytes

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


# ============================================================================ the runtime


class GpuCascade:
    """A Cascade on the fast path. ``predict_batch(payloads)`` for one batch (lowest latency),
    ``predict_stream(batches)`` to overlap decoding with the model (highest throughput), ``predict`` for
    Cascade.predict-compatible objects.

    Payloads are encoded image bytes (anything :func:`decode_bytes` takes) or HxWx3 uint8 arrays.
    A tier whose :meth:`~roadcascade.cascade.runtime.Tier.caps` give a ``tensor_input`` runs as a compiled engine on
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
        self.engines: list[ClassifierEngine | None] = []
        for k, tier in enumerate(cascade.tiers):
            # a tier that is one model on one resized tensor gets an engine; any other runs its own code
            if tier.caps().tensor_input is not None:
                comp = self.cfg.compile and (k == 0 or self.cfg.compile_later_tiers)
                self.engines.append(ClassifierEngine(tier, self.device, self.cfg, comp, self.log))
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
        from ..cascade.bundle import Bundle

        b = Bundle.load(path, device=torch.device("cpu"))
        return cls(b.cascade, device=device, config=config, log=log)

    def warmup(self) -> float:
        """Compile and capture every engine, warm the decoders; returns the seconds it took."""
        t0 = time.perf_counter()
        for eng in self.engines:
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
            st.pinned = Pinned() if self.cuda else None
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

    def _decode(self, payloads: Sequence[Payload], inline: bool = False) -> Decoded:
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
                     proc_rows: list[int], job, first_input: bool = True) -> Decoded:
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
                    fast_futs = [decode_into(fast_rows, payloads, dims, offsets, out)]
                else:
                    k = max(1, min(self.cfg.cpu_threads, math.ceil(len(fast_rows) / 4)))
                    step = math.ceil(len(fast_rows) / k)
                    fast_futs = [self._cpu_pool.submit(decode_into, fast_rows[j:j + step], payloads, dims, offsets, out)
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
            dec = Decoded(n=n, images=images, host=host, errors=errors, good=good, x0=None,
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

    def _gather(self, dec: Decoded, rows: np.ndarray, k: int) -> torch.Tensor | None:
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

    def _fill_images(self, dec: Decoded, rows: np.ndarray) -> None:
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

    def _compute(self, dec: Decoded) -> BatchResult:
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
        # which rows are full frames: only asked when an exit has a threshold of its own for them
        full = full_frames(dec) if any(e.full_threshold is not None for e in self.cascade.exits) else None
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
                d = decide(self.cascade.exits[k], L[active, :k + 1], P[active, :k + 1], flist, last=k == K - 1,
                           full=None if full is None else full[active])
                prob[active] = d.probability
                cal[active] = d.calibrated
                ex[active[d.stop]] = k
                active = active[~d.stop]
                tier_ms[k] = (time.perf_counter() - t0) * 1e3
        return BatchResult(probability=np.clip(prob, 0.0, 1.0), calibrated=cal, exit=ex, logits=L, probs=P, gflops=G,
                           errors=dec.errors, tier_ms=tier_ms, decode_ms=dec.decode_ms, n_gpu_decoded=dec.n_gpu,
                           n_cpu_decoded=dec.n_cpu, n_proc_decoded=dec.n_proc, tier_names=self.tier_names, rule_names=self.rule_names,
                           features=feats)

    def _run_other(self, k: int, tier, dec: Decoded, active: np.ndarray, L):
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


def full_frames(dec: Decoded) -> np.ndarray:
    """(n,) bool: which rows are full frames (not square crops), from their decoded sizes (a reduced-size
    decode keeps the aspect ratio), for exits with a full-frame threshold."""
    out = np.zeros(dec.n, dtype=bool)
    for i in dec.good:
        i = int(i)
        if dec.images[i] is not None:
            h, w = dec.images[i].shape[-2:]
        elif i in dec.host:
            h, w = dec.host[i].shape[:2]
        elif dec.proc_dims is not None and i in dec.proc_pos:
            h, w = dec.proc_dims[dec.proc_pos[i]]
        else:
            continue
        out[i] = is_full_frame(int(h), int(w))
    return out
