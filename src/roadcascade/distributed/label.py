"""``roadcascade label``: P(roadwork) for every image of a data set, written as parquet shards (``shards.py``).

Two engines share the same two steps, so that they give the same answers:

* :func:`decode_batch` (CPU): read and decode each input with the safe decoders of ``roadcascade.io.images``, at the
  reduced size the cascade needs; a bad input becomes an error string, never an exception;
* :class:`CascadeRunner` (the model): ``Cascade.predict`` on the decoded images of a batch (or, in a GPU actor,
  the GPU fast path on the encoded bytes).

``local`` runs them one after the other in this process; ``ray`` runs decode as Ray Data tasks and the cascade in
an actor pool (one actor per GPU, else CPU actors), streaming results back to this process, which writes the
shards. Ray Data retries failed tasks and restarts lost actors; the writer drops a path it has already written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io.images import BadImage, DecodeLimits, decode_bytes, decode_path
from .inputs import InputRecord
from .shards import ShardWriter

Progress = Callable[[str, int, int], None]
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class LabelConfig:
    bundle: Path
    out: Path
    engine: str = "local"
    batch: int = 32  # images per cascade call (and per decode task)
    shard_rows: int = 1024
    address: str | None = None  # Ray cluster address ("auto", "ray://host:10001", ...); None starts a local one
    actors: int | None = None  # cascade actors (default: one per GPU, else CPUs // actor_cpus, less decode's when apart)
    actor_cpus: float = 1.0  # CPUs each CPU actor reserves
    decode_cpus: float = 1.0  # CPUs each decode task reserves
    decode_tasks: int | None = None  # ray: at most this many decode tasks at once (default: as many as the free CPUs allow)
    threads: int | None = None  # torch threads in each actor (default: its CPUs)
    gpu: str = "auto"  # auto | on | off: the GPU fast path inside GPU actors
    limits: DecodeLimits = field(default_factory=DecodeLimits)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES} (got {self.engine!r})")
        if self.batch < 1 or self.shard_rows < 1:
            raise ValueError("batch and shard_rows must be >= 1")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1 (got {self.actors})")
        if not (self.actor_cpus > 0 and self.decode_cpus > 0):
            raise ValueError("actor_cpus and decode_cpus must be > 0")
        if self.decode_tasks is not None and self.decode_tasks < 1:
            raise ValueError(f"decode_tasks must be >= 1 (got {self.decode_tasks})")
        if self.gpu not in ("auto", "on", "off"):
            raise ValueError(f"gpu must be auto, on or off (got {self.gpu!r})")


@dataclass
class LabelReport:
    engine: str
    inputs: int
    skipped: int  # already in OUT (resumed)
    written: int
    errors: int
    duplicates_dropped: int
    seconds: float  # labelling only (cluster start-up excluded, see startup_s)
    startup_s: float = 0.0
    workers: dict[str, int] = field(default_factory=dict)  # rows per worker node
    first_rows: int = 0  # rows of the first batch written, and when it came (model loading, actor start-up)
    first_s: float = 0.0

    @property
    def img_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_img_s(self) -> float:
        """Throughput after the first batch: what a long job converges to, without the fixed start-up cost."""
        n, t = self.written - self.first_rows, self.seconds - self.first_s
        return n / t if n > 0 and t > 0 else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "img_s": self.img_s, "steady_img_s": self.steady_img_s}


# ----------------------------------------------------------------------------- step 1: decode (CPU)
def _error(e: BaseException) -> str:
    if isinstance(e, BadImage):
        return f"{e.reason}: {e.message}"
    return f"decode_failed: {type(e).__name__}: {str(e)[:200]}"


def read_one(file: str | None, data: Any, limits: DecodeLimits, min_size: int | None, encoded: bool = False) -> np.ndarray | bytes:
    """Decoded RGB (or, with ``encoded``, the checked file bytes for the GPU decoder); BadImage when unreadable."""
    if data is None and not file:
        raise BadImage("bad_input", "no file and no bytes for this input (an unreadable data set row)")
    if encoded:
        raw = bytes(data) if data is not None else Path(file).read_bytes()  # type: ignore[arg-type]
        if len(raw) > limits.max_bytes:
            raise BadImage("too_large", f"{len(raw):,} bytes; the limit is {limits.max_bytes:,}", 413)
        return raw
    if data is not None:
        return decode_bytes(bytes(data), limits, min_size=min_size)
    return decode_path(file, limits, min_size=min_size)  # type: ignore[arg-type]


def decode_batch(batch: dict[str, Any], limits: DecodeLimits, min_size: int | None, encoded: bool = False,
                 bundle: str | None = None) -> dict[str, list]:
    """Columns path, label, file, data -> path, label, pixels (raw uint8 bytes or encoded bytes), h, w, error.
    ``bundle`` (with ``min_size`` None): decode at that bundle's decode size, found in this process (``bundle_decode_size``)."""
    if bundle is not None and min_size is None and not encoded:
        min_size = bundle_decode_size(bundle)
    out: dict[str, list] = {k: [] for k in ("path", "label", "pixels", "h", "w", "error")}
    for path, label, file, data in zip(batch["path"], batch["label"], batch["file"], batch["data"]):
        out["path"].append(str(path))
        out["label"].append(int(label))
        # Ray Data hands an all-null column back as NaNs or empty values: only real bytes and names count
        data = bytes(data) if isinstance(data, (bytes, bytearray, memoryview, np.bytes_)) else None
        file = file if isinstance(file, str) and file else None
        try:
            img = read_one(file, data, limits, min_size, encoded)
            if isinstance(img, bytes):
                h, w, px, err = 0, 0, img, None
            else:
                h, w, px, err = img.shape[0], img.shape[1], np.ascontiguousarray(img).tobytes(), None
        except Exception as e:  # noqa: BLE001 - every bad input becomes an error row (BadImage, or an OSError reading it)
            h, w, px, err = 0, 0, b"", _error(e)
        out["pixels"].append(px)
        out["h"].append(h)
        out["w"].append(w)
        out["error"].append(err)
    return out


# ----------------------------------------------------------------------------- step 2: the cascade (actor)
def _worker_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001 - a name for the output column only
        pass
    return "local"


class CascadeRunner:
    """Loads the bundle once; called on decoded batches (a Ray Data actor class, or used directly)."""

    def __init__(self, bundle: str, device: str = "cpu", threads: int | None = None, gpu: str = "off"):
        import torch

        from ..cascade.bundle import Bundle

        if threads:
            torch.set_num_threads(int(threads))
        self.cascade = Bundle.load(bundle, device=device).cascade
        _DECODE_SIZES[str(bundle)] = self.cascade.decode_size()  # the decode step fused into this actor reads it here
        self.gpu = None
        if gpu != "off":
            from ..accel.runtime import maybe_gpu_cascade

            self.gpu = maybe_gpu_cascade(self.cascade, enabled=gpu)
        self.worker = _worker_name()

    def _predict(self, batch: dict[str, Any], good: list[int]) -> list:
        if self.gpu is not None:  # encoded bytes: the GPU decodes and resizes them
            return self.gpu.predict([bytes(batch["pixels"][i]) for i in good])
        imgs = [np.frombuffer(batch["pixels"][i], np.uint8).reshape(int(batch["h"][i]), int(batch["w"][i]), 3) for i in good]
        return self.cascade.predict(imgs) if imgs else []

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        n = len(batch["path"])
        errors = [e if isinstance(e, str) else None for e in batch["error"]]  # an all-null column comes back as NaNs
        good = [i for i in range(n) if errors[i] is None]
        preds = dict(zip(good, self._predict(batch, good)))
        out: dict[str, list] = {k: [] for k in ("path", "label", "probability", "decision", "tiers", "exit", "rule", "error", "worker")}
        for i in range(n):
            p = preds.get(i)
            err = errors[i] if p is None else (_error(p) if isinstance(p, BadImage) else None)
            ok = err is None
            out["path"].append(str(batch["path"][i]))
            out["label"].append(int(batch["label"][i]))
            out["probability"].append(float(p.probability) if ok else None)
            out["decision"].append(("roadwork" if p.label else "none") if ok else None)
            out["tiers"].append(list(p.trace.tiers) if ok else [])
            out["exit"].append(int(p.trace.exit) if ok else -1)
            out["rule"].append(p.trace.rule if ok else None)
            out["error"].append(err)
            out["worker"].append(self.worker)
        return out


# ----------------------------------------------------------------------------- engines
def _columns(recs: list[InputRecord]) -> dict[str, list]:
    return {"path": [r.path for r in recs], "label": [r.label for r in recs], "file": [r.file for r in recs],
            "data": [r.data for r in recs]}


#: decode sizes of the bundles loaded in this process, by path: a Ray decode step fused into a cascade actor (Ray Data
#: fuses them on CPU clusters) finds its actor's here instead of loading the bundle a second time
_DECODE_SIZES: dict[str, int | None] = {}


def bundle_decode_size(bundle: str | Path) -> int | None:
    """The bundle's ``Cascade.decode_size``: known in this process once a cascade actor loaded it, else loaded once."""
    key = str(bundle)
    if key not in _DECODE_SIZES:
        _DECODE_SIZES[key] = _decode_size(Path(bundle))
    return _DECODE_SIZES[key]


def _decode_size(bundle: Path) -> int | None:
    from ..cascade.bundle import Bundle

    return Bundle.load(bundle, device="cpu").cascade.decode_size()


def run_local(cfg: LabelConfig, todo: list[InputRecord], writer: ShardWriter, progress: Progress) -> str:
    runner = CascadeRunner(str(cfg.bundle), device="cpu", threads=cfg.threads, gpu="off")
    runner.worker = "local"  # this process, even when it is also a Ray driver
    min_size = runner.cascade.decode_size()
    done = 0
    for i in range(0, len(todo), cfg.batch):
        chunk = todo[i:i + cfg.batch]
        writer.add(runner(decode_batch(_columns(chunk), cfg.limits, min_size)))
        done += len(chunk)
        progress("labelling (local)", done, len(todo))
    return "local"
