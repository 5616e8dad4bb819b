"""The tier loop of the GPU fast path: a decoded batch -> calibrated, folded probabilities (:class:`BatchResult`).

Engine tiers run their compiled model on device-resized pixels (a tier with square views: the rows that are one
view at its input size, the full frames' squares, cut and resized on the device, on a second engine at the view
size, max-pooled per frame); any other tier (test-time scaling, detectors) runs its own ``run``/``run_after`` on
HxWx3 arrays, as :meth:`Cascade.run_stage` does. Calibration, fusion, fold
and deferral rules are the CPU path's float64 functions (``cascade.decision.decide``); later tiers run once on
the undecided rows only.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cascade.decision import decide, exit_rule_name, is_full_frame, stack_features
from ..cascade.runtime import Cascade, Prediction, Trace, run_tier, square_offsets
from ..io.images import BadImage
from .decode import Decoded
from .decoder import BatchDecoder
from .engine import ClassifierEngine
from .resize import resize_images

__all__ = ["BatchResult", "TierRunner", "full_frames"]


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



class TierRunner:
    """The cascade loop on a decoded batch, on one compute stream."""

    def __init__(self, cascade: Cascade, engines: list[ClassifierEngine | None], decoder: BatchDecoder,
                 device: torch.device, squares_only: list[bool] | None = None,
                 view_engines: list[tuple[ClassifierEngine, int] | None] | None = None):
        self.cascade, self.engines, self.decoder, self.device = cascade, engines, decoder, device
        # per tier: its engine runs only the rows that are not full frames; the full frames' square views run on
        # its view engine (engine at the view size, number of squares) or, without one, on the tier's own code
        self.squares_only = list(squares_only) if squares_only is not None else [False] * len(engines)
        self.view_engines = list(view_engines) if view_engines is not None else [None] * len(engines)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.rule_names = [exit_rule_name(e, k == cascade.n_stages - 1) for k, e in enumerate(cascade.exits)]

    def compute(self, dec: Decoded) -> BatchResult:
        n, K = dec.n, self.cascade.n_stages
        L, P, G = (np.full((n, K), np.nan) for _ in range(3))
        prob, cal = np.full(n, np.nan), np.full(n, np.nan)
        ex = np.full(n, -1, dtype=np.int64)
        feats: list[dict[int, np.ndarray]] = [dict() for _ in range(K)]
        tier_ms = [0.0] * K
        active = dec.good
        # which rows are full frames: only asked when an exit has a threshold of its own for them, or a tier's engine
        # takes only the other rows
        by_exit = any(e.full_threshold is not None for e in self.cascade.exits)
        frames = full_frames(dec) if by_exit or any(self.squares_only) else None
        full = frames if by_exit else None
        ctx = torch.cuda.stream(self.stream) if self.cuda else nullcontext()
        with ctx, torch.inference_mode():
            if dec.event is not None:
                self.stream.wait_event(dec.event)
            for k, tier in enumerate(self.cascade.tiers):
                if len(active) == 0:
                    break
                t0 = time.perf_counter()
                eng = self.engines[k]
                if eng is not None:
                    # a tier with square views: its engine for single-view rows; full frames on its view engine (or,
                    # without one, its own code)
                    own = frames[active] if self.squares_only[k] else np.zeros(len(active), dtype=bool)
                    rows = active[~own]
                    if len(rows):
                        z = eng.logits(self.decoder.gather(dec, rows, eng.size)).cpu().numpy().astype(np.float64)
                        L[rows, k], P[rows, k], G[rows, k] = z, tier.calibrator.calibrated(z), tier.gflops
                    if own.any() and self.view_engines[k] is not None:
                        self._run_views(k, tier, dec, active[own], L, P, G)
                    elif own.any():
                        self._run_other(k, tier, dec, active[own], L, P, G, feats)
                else:
                    self._run_other(k, tier, dec, active, L, P, G, feats)
                flist = stack_features([[feats[t].get(int(i)) for i in active] for t in range(k + 1)])
                d = decide(self.cascade.exits[k], L[active, :k + 1], P[active, :k + 1], flist, last=k == K - 1,
                           full=None if full is None else full[active])
                prob[active], cal[active] = d.probability, d.calibrated
                ex[active[d.stop]] = k
                active = active[~d.stop]
                tier_ms[k] = (time.perf_counter() - t0) * 1e3
        return BatchResult(probability=np.clip(prob, 0.0, 1.0), calibrated=cal, exit=ex, logits=L, probs=P, gflops=G,
                           errors=dec.errors, tier_ms=tier_ms, decode_ms=dec.decode_ms, n_gpu_decoded=dec.n_gpu,
                           n_cpu_decoded=dec.n_cpu, n_proc_decoded=dec.n_proc, tier_names=self.cascade.tier_names,
                           rule_names=self.rule_names, features=feats)

    def _run_views(self, k: int, tier, dec: Decoded, rows: np.ndarray, L, P, G) -> None:
        """Full frames of a tier with square views, as ``ClassifierTier._pooled`` sees them: each decoded frame cut
        on the device into its k squares (``square_offsets``), resized to the view size (PIL-exact or antialiased,
        as the first tier's input), one engine call for all views, the largest logit per frame."""
        eng, k_sq = self.view_engines[k]
        self.decoder.fill_images(dec, rows)
        views: list[torch.Tensor] = []
        for i in rows:
            img = dec.images[int(i)]  # (3, H, W) uint8 on the device (reduced like the CPU decoders' images)
            h, w = int(img.shape[1]), int(img.shape[2])
            s = min(h, w)
            views += [img[:, o:o + s, :] if h > w else img[:, :, o:o + s] for o in square_offsets(h, w, k_sq)]
        # views larger than the view size take the antialiased float32 resize (in bounded pieces) on CUDA: PIL-exact
        # float64 products over 3 x 540x540 views of each 1080p frame held 39.5 GB at batch 1024 on the H200
        exact = self.decoder.exact_max_px
        z = eng.logits(resize_images(views, eng.size, self.device, None if exact is None else min(exact, eng.size ** 2)))
        z = z.view(len(rows), k_sq).amax(dim=1).cpu().numpy().astype(np.float64)
        L[rows, k], P[rows, k] = z, tier.calibrator.calibrated(z)
        G[rows, k] = tier.gflops * k_sq * (eng.size / tier.input_size) ** 2  # ClassifierTier._pooled's cost

    def _run_other(self, k: int, tier, dec: Decoded, active: np.ndarray, L, P, G, feats) -> None:
        """A tier without a GPU engine: its own run/run_after on HxWx3 uint8 arrays, as run_stage does."""
        images = [self.decoder.host_image(dec, int(i)) for i in active]
        out = run_tier(tier, images, self.cascade.tier_names[:k], L[active, :k])
        L[active, k] = np.asarray(out.logits, dtype=np.float64)
        P[active, k] = np.asarray(out.prob, dtype=np.float64)
        G[active, k] = tier.gflops if out.gflops is None else np.asarray(out.gflops, dtype=np.float64)
        if out.features is not None:
            for j, i in enumerate(active):
                feats[k][int(i)] = np.asarray(out.features[j])


def full_frames(dec: Decoded) -> np.ndarray:
    """(n,) bool: which rows are full frames (not square crops), from their decoded sizes (a reduced-size
    decode keeps the aspect ratio), for exits with a full-frame threshold."""
    out = np.zeros(dec.n, dtype=bool)
    for i in dec.good:
        h, w = (int(v) for v in dec.dims[int(i)])
        if h and w:
            out[int(i)] = is_full_frame(h, w)
    return out
