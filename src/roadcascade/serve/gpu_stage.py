"""Serving on the GPU fast path: the whole cascade as one batcher stage, JPEG bytes in, answers out.

With CUDA (``ServeConfig.gpu``: ``auto`` when CUDA is there, ``on``, ``off``), the server hands the raw
bytes of every plain JPEG (:func:`roadcascade.accel.runtime.jpeg_gpu_info`) to the batcher undecoded; everything
else is decoded on the server's CPU threads as before. The batcher sees one stage whose batch runs
:meth:`GpuCascade.predict_batch`: nvJPEG/nvImageCodec decoding, PIL-exact resizing, the compiled
model(s) and every later tier on the undecided images, all inside the one call (a few ms on the GPU, so
there is nothing to gain from queueing the tiers separately). An image the GPU path finds bad after all
(the exact CPU decoder refuses it too) gets its ``BadImage`` as ``ImageState.error`` and a 4xx answer.

``on`` without CUDA runs the same runtime on the CPU (the CPU tests use that); ``auto`` without CUDA
keeps the multi-stage CPU batcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..cascade.runtime import ImageState, Prediction
from ..accel.runtime import GpuCascade


@dataclass
class GpuStageTier:
    """The batcher's view of the one stage: a name, a cost, and ``run`` for its warm-up."""

    name: str
    gflops: float
    gc: GpuCascade

    def run(self, images: Sequence[Any]):
        return self.gc.predict_batch(list(images))


class GpuStageCascade:
    """What :class:`~roadcascade.serve.batcher.MultiStageBatcher` needs of a cascade (``n_stages``,
    ``tiers``, ``tier_names``, ``run_stage``, ``answer``), over a :class:`GpuCascade`."""

    n_stages = 1

    def __init__(self, gc: GpuCascade):
        self.gc = gc
        self.inner = gc.cascade
        name = "gpu:" + "+".join(gc.tier_names)
        self.tiers = [GpuStageTier(name, float(self.inner.tiers[0].gflops), gc)]
        self.tier_names = [name]

    def run_stage(self, k: int, states: Sequence[ImageState]) -> None:
        if k != 0:
            raise ValueError(f"the GPU stage is stage 0 (got {k})")
        if not states:
            return
        res = self.gc.predict_batch([s.image for s in states])
        for i, s in enumerate(states):
            s.done = True
            s.error = res.errors.get(i)
            if s.error is not None:  # the batcher answers it with the client's error (4xx)
                continue
            ran = np.isfinite(res.logits[i])
            s.logits = [float(v) for v in res.logits[i][ran]]
            s.probs = [float(v) for v in res.probs[i][ran]]
            s.trace = res.trace(i)
            s.probability = float(res.probability[i])
            s.calibrated = float(res.calibrated[i])

    def answer(self, state: ImageState) -> Prediction:
        return self.inner.answer(state)
