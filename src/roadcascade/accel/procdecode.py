"""Decode processes: the CPU path's own decode and resize, run in worker processes, writing model-sized
pixels straight into shared memory that the GPU copies from (one host-to-device copy per batch).

Why: on the GPU fast path one Python process spends tens of microseconds per image around the decoder
(header walk, tensors, lists) under one GIL, and that, not the GPU, capped the end-to-end rate
(docs/GPU.md). Worker processes have no common GIL. Each runs, for its rows,
:func:`roadcascade.io.images.decode_bytes` (every format, every limit, every :class:`BadImage`) and
:func:`roadcascade.models.preprocess.resize_square` for each classifier input size: the CPU path's functions,
so these rows get the CPU path's pixels exactly. The parent process does O(1) Python work per batch:

    payload bytes ─ b"".join ─> input region (mmap'd file in /dev/shm, a ring of slots)
                                   │ rows split into chunks, one task per chunk (a process pool)
                                   v
          worker: decode_bytes -> resize_square(S) for each size S -> output region (S x S x 3 per row)
                                   │ (row, BadImage) for bad input, nothing else crosses the pipe
                                   v
          parent: output region (page-locked with cudaHostRegister) -> one asynchronous copy to the GPU

A slot is reused only after the copy that read it has finished (a CUDA event). A worker that dies, a
batch that takes longer than ``timeout_s`` or a pool that breaks does not lose images: the pool's workers
are stopped, the rows are decoded again in the parent and the pool is restarted. Workers start with ``forkserver`` (fork from a clean server process, never from a process
that has CUDA), one thread each.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import queue
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..io.images import BadImage, DecodeLimits, decode_bytes

__all__ = ["DecodeProcs", "ProcBatch", "decode_rows"]


# ============================================================================ shared regions


class _Region:
    """A file-backed shared mapping (``/dev/shm`` when there is one) that workers map by path."""

    def __init__(self, nbytes: int) -> None:
        fd, self.path = tempfile.mkstemp(prefix="roadcascade-dec-", dir=_region_dir(nbytes))
        try:
            os.ftruncate(fd, nbytes)
            self.mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.nbytes = nbytes
        self.array = np.frombuffer(self.mm, dtype=np.uint8)
        self.pinned_ptr: int | None = None
        self._fin = weakref.finalize(self, _unlink, self.path)

    def pin(self) -> bool:
        """Page-lock the region for asynchronous host-to-device copies (cudaHostRegister)."""
        import torch

        t = torch.from_numpy(self.array)
        ptr = t.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0)
        if int(err) != 0:
            return False
        self.pinned_ptr = ptr
        return True

    def close(self) -> None:
        if self.pinned_ptr is not None:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.pinned_ptr)
            self.pinned_ptr = None
        self.array = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            pass
        self._fin()


def _region_dir(nbytes: int) -> str | None:
    """``/dev/shm`` when it has room for twice the region (containers often give it only 64 MB, and a
    mapping past its end would die with SIGBUS), else the temporary directory (page cache, also fine)."""
    try:
        st = os.statvfs("/dev/shm")
        if os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize >= 2 * nbytes:
            return "/dev/shm"
    except OSError:
        pass
    return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ============================================================================ the worker side

_W_LIMITS: DecodeLimits | None = None
_W_MIN_SIZE: int | None = None
_W_MAPS: dict[str, tuple[mmap.mmap, np.ndarray]] = {}


def _worker_init(limits: DecodeLimits, min_size: int | None = None) -> None:
    global _W_LIMITS, _W_MIN_SIZE
    _W_LIMITS, _W_MIN_SIZE = limits, min_size
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # noqa: BLE001 - torch is only needed for its thread setting
        pass


def _w_map(path: str) -> np.ndarray:
    m = _W_MAPS.get(path)
    if m is None:
        if len(_W_MAPS) >= 32:  # regions are replaced when they grow: forget the oldest mappings
            for old in list(_W_MAPS)[:16]:
                _W_MAPS.pop(old)
        with open(path, "r+b") as f:
            mm = mmap.mmap(f.fileno(), 0)
        m = _W_MAPS[path] = (mm, np.frombuffer(mm, dtype=np.uint8))
    return m[1]


@dataclass(frozen=True)
class _Task:
    in_path: str
    out_path: str
    starts: list[int]  # byte offset of each row's payload in the input region
    lens: list[int]
    rows: list[int]  # the row's position in the batch (its output slot)
    sizes: tuple[int, ...]  # square sizes to write, in the order of bases
    bases: tuple[int, ...]  # byte offset of each size's block in the output region


def decode_rows(data: Sequence[bytes], sizes: Sequence[int], limits: DecodeLimits,
                write: Callable[[int, int, np.ndarray], None],
                min_size: int | None = None) -> tuple[list[tuple[int, BadImage]], list[int]]:
    """The work of one task, pure: decode each payload like the CPU path (``decode_bytes`` with ``min_size``: the
    reduced-size JPEG decode, never a full 12-megapixel image when the model needs 224 pixels) and
    ``write(j, size_index, pixels)`` for each size (``resize_square``: PIL's antialiased bilinear). Returns ``(j, BadImage)`` for the payloads that are bad, and each
    payload's decoded ``height << 32 | width`` (0 when bad)."""
    from ..models.preprocess import resize_square

    bad: list[tuple[int, BadImage]] = []
    dims = [0] * len(data)
    for j, payload in enumerate(data):
        try:
            img = decode_bytes(payload, limits, min_size=min_size)
        except BadImage as e:
            bad.append((j, e))
            continue
        dims[j] = (img.shape[0] << 32) | img.shape[1]
        for k, s in enumerate(sizes):
            write(j, k, resize_square(img, s))
    return bad, dims


def _slot_writer(out: np.ndarray, sizes: Sequence[int], bases: Sequence[int],
                 rows: Sequence[int]) -> Callable[[int, int, np.ndarray], None]:
    """``write(j, k, pixels)`` for :func:`decode_rows`: payload j's pixels at size ``sizes[k]`` go to its
    row ``rows[j]`` in the block of that size (at byte ``bases[k]``) of an output region."""

    def write(j: int, k: int, px: np.ndarray) -> None:
        s, r = sizes[k], rows[j]
        m = s * s * 3
        out[bases[k] + r * m:bases[k] + (r + 1) * m].reshape(s, s, 3)[...] = px

    return write


def _work(task: _Task) -> tuple[list[tuple[int, BadImage]], list[int]]:
    inp, out = _w_map(task.in_path), _w_map(task.out_path)
    data = [inp[o:o + n].tobytes() for o, n in zip(task.starts, task.lens)]
    write = _slot_writer(out, task.sizes, task.bases, task.rows)
    bad, dims = decode_rows(data, task.sizes, _W_LIMITS or DecodeLimits(), write, _W_MIN_SIZE)
    return [(task.rows[j], e) for j, e in bad], dims


def _ping() -> int:
    return os.getpid()


# ============================================================================ the parent side


class _Slot:
    def __init__(self) -> None:
        self.inp: _Region | None = None
        self.out: _Region | None = None
        self.event: Any = None  # the CUDA event of the last copy that read ``out``

    def ensure(self, in_bytes: int, out_bytes: int, pin: bool) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if self.inp is None or self.inp.nbytes < in_bytes:
            if self.inp is not None:
                self.inp.close()
            self.inp = _Region(max(in_bytes * 5 // 4, 1 << 20))
        if self.out is None or self.out.nbytes < out_bytes:
            if self.out is not None:
                self.out.close()
            self.out = _Region(max(out_bytes * 5 // 4, 1 << 20))
            if pin:
                self.out.pin()

    def close(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        for r in (self.inp, self.out):
            if r is not None:
                r.close()
        self.inp = self.out = None


@dataclass
class ProcBatch:
    """What :meth:`DecodeProcs.collect` gives for one batch: per size, the (n, 3, S, S) uint8 input
    (on the device; channels_last strides) in row order, the BadImage of each bad row (its pixels
    in the tensors are undefined) and each row's decoded (height, width) ((0, 0) when bad)."""

    x: dict[int, Any]
    errors: dict[int, BadImage]
    n: int
    dims: np.ndarray  # (n, 2) int64
    redone: int = 0  # rows decoded again in the parent because a worker failed
    seconds: float = 0.0  # wall time from submit until the last task finished (the router's measurement)


@dataclass
class _Job:
    slot: int
    n: int
    sizes: tuple[int, ...]
    bases: tuple[int, ...]
    futures: list[tuple[Future, list[int]]]
    payloads: Sequence[bytes]
    pool: Any = None  # the pool its tasks went to
    done: bool = False
    t0: float = 0.0  # perf_counter at submit
    t_done: list[float] = field(default_factory=list)  # perf_counter when each task finished


class DecodeProcs:
    """A pool of decode processes with a ring of shared slots. ``submit(payloads)`` starts a batch and
    returns at once; ``collect(job, device, stream)`` waits for it and copies the pixels to ``device``.
    Thread-safe: several decode threads can each have batches in flight (up to ``ring`` in all)."""

    def __init__(self, workers: int, sizes: Sequence[int], limits: DecodeLimits | None = None,
                 ring: int = 6, chunk: int = 24, pin: bool | None = None, start_method: str | None = None,
                 timeout_s: float = 60.0, min_size: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.sizes = tuple(dict.fromkeys(int(s) for s in sizes))
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes must be positive, got {sizes}")
        self.limits = limits or DecodeLimits()
        self.min_size = min_size  # reduced-size JPEG decode (images.decode_bytes' min_size): the CPU path's
        self.chunk = max(1, chunk)
        self.timeout_s = timeout_s  # a batch whose workers take longer is decoded again here (workers killed)
        if pin is None:
            import torch

            pin = torch.cuda.is_available()
        self.pin = pin
        methods = mp.get_all_start_methods()
        self.start_method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
        self._slots = [_Slot() for _ in range(max(2, ring))]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(len(self._slots)):
            self._free.put(i)
        self._lock = threading.Lock()
        self.restarts = 0
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(["roadcascade.accel.procdecode", "roadcascade.models.preprocess"])
        pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init,
                                   initargs=(self.limits, self.min_size))
        try:
            for f in [pool.submit(_ping) for _ in range(self.workers)]:  # start them all now, not on the first batch
                f.result(timeout=120)
        except Exception as e:  # noqa: BLE001
            pool.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError(
                f"the decode processes did not start ({type(e).__name__}: {e}). Workers start with "
                f"'{self.start_method}', which imports the main script again: a script that starts them needs its "
                "code under `if __name__ == \"__main__\":`. Or run without them (GpuConfig(procs=0)).") from e
        return pool

    @staticmethod
    def _kill(pool: ProcessPoolExecutor) -> None:
        """Stop a pool's workers now (a stuck worker must not write into a slot that is reused later)."""
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        pool.shutdown(wait=False, cancel_futures=True)

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            self._kill(broken)
            if self.pool is broken:
                self.restarts += 1
                self.pool = self._start()

    def submit(self, payloads: Sequence[bytes]) -> _Job:
        n = len(payloads)
        i = self._free.get()  # blocks while every slot is in use
        t0 = time.perf_counter()
        slot = self._slots[i]
        try:
            lens = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=n)
            starts = np.zeros(n, dtype=np.int64)
            if n > 1:
                np.cumsum(lens[:-1], out=starts[1:])
            total = int(lens.sum())
            per = [s * s * 3 for s in self.sizes]
            bases, off = [], 0
            for m in per:
                bases.append(off)
                off += n * m
            slot.ensure(total, off, self.pin)
            if total:
                slot.inp.array[:total] = np.frombuffer(b"".join(payloads), dtype=np.uint8)
            pool = self.pool
            futs = []
            t_done: list[float] = []
            k = max(1, min(n, self.workers, max(1, n // 4)) if n <= self.workers * self.chunk else -(-n // self.chunk))
            step = -(-n // k) if n else 1
            for a in range(0, n, step):
                rows = list(range(a, min(n, a + step)))
                task = _Task(slot.inp.path, slot.out.path, starts[a:a + len(rows)].tolist(),
                             lens[a:a + len(rows)].tolist(), rows, self.sizes, tuple(bases))
                try:
                    fut = pool.submit(_work, task)
                    fut.add_done_callback(lambda _f, d=t_done: d.append(time.perf_counter()))
                    futs.append((fut, rows))
                except Exception as e:  # noqa: BLE001 - a broken pool: these rows are redone in collect
                    broken_fut: Future = Future()
                    broken_fut.set_exception(e)
                    futs.append((broken_fut, rows))
        except BaseException:
            self._free.put(i)
            raise
        return _Job(slot=i, n=n, sizes=self.sizes, bases=tuple(bases), futures=futs, payloads=payloads, pool=pool,
                    t0=t0, t_done=t_done)

    def collect(self, job: _Job, device: Any = None, stream: Any = None) -> ProcBatch:
        """Wait for the batch; return its pixels on ``device`` (``cpu``: copies, the slot is free at once)."""
        import torch

        if job.done:
            raise RuntimeError("this decode batch was already collected or abandoned")
        job.done = True
        slot = self._slots[job.slot]
        errors: dict[int, BadImage] = {}
        redo: list[int] = []
        broken = None
        packed = np.zeros(job.n, dtype=np.int64)
        try:
            deadline = time.monotonic() + self.timeout_s
            for fut, rows in job.futures:
                try:
                    bad, dims = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                    for r, e in bad:
                        errors[r] = e
                    packed[rows[0]:rows[0] + len(rows)] = dims
                except Exception:  # noqa: BLE001 - a worker died, hung or the pool broke: redo here
                    redo += rows
                    broken = job.pool
            if broken is not None:  # no worker of that pool may still write into this slot
                self._restart(broken)
            out = slot.out.array
            if redo:
                write = _slot_writer(out, job.sizes, job.bases, redo)
                bad, dims = decode_rows([bytes(job.payloads[r]) for r in redo], job.sizes, self.limits, write,
                                        self.min_size)
                for j, e in bad:
                    errors[redo[j]] = e
                packed[redo] = dims
            host = torch.from_numpy(out)
            x: dict[int, Any] = {}
            cuda = device is not None and torch.device(device).type == "cuda"
            for s, b in zip(job.sizes, job.bases):
                block = host[b:b + job.n * s * s * 3].view(job.n, s, s, 3)
                if cuda:
                    block = block.to(device, non_blocking=slot.out.pinned_ptr is not None)
                else:
                    block = block.clone()
                x[s] = block.permute(0, 3, 1, 2)
            if cuda:
                ev = torch.cuda.Event()
                ev.record(stream)
                slot.event = ev
        finally:
            self._free.put(job.slot)
        dims2 = np.stack([packed >> 32, packed & 0xFFFFFFFF], axis=1)
        t_end = max(job.t_done) if job.t_done and not redo else time.perf_counter()
        return ProcBatch(x=x, errors=errors, n=job.n, dims=dims2, redone=len(redo), seconds=t_end - job.t0)

    def abandon(self, job: _Job) -> None:
        """Give up a batch that will not be collected (its caller failed): wait for its tasks, free its slot."""
        if job.done:
            return
        job.done = True
        deadline = time.monotonic() + self.timeout_s
        stuck = False
        for fut, _ in job.futures:
            fut.cancel()
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except BaseException:  # noqa: BLE001 - its result is not wanted
                stuck = stuck or not fut.done()
        if stuck:
            self._restart(job.pool)
        self._free.put(job.slot)

    def decode(self, payloads: Sequence[bytes], device: Any = None, stream: Any = None) -> ProcBatch:
        return self.collect(self.submit(payloads), device, stream)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for s in self._slots:
            s.close()

    def __enter__(self) -> DecodeProcs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
