"""Shared plumbing of the transformers tiers: offline loading from a checked local source, the compute dtype
(bf16 on CUDA, fp32 on CPU), FLOP counting, and calibrated probabilities before a calibrator is fitted."""

from __future__ import annotations

import warnings
from unittest import mock
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .local import LocalSource, offline, verify


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the models' native precision, half the memory traffic), fp32 elsewhere (CPU bf16 matmuls
    are slow and lossy on most CPUs)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_pretrained(source: LocalSource, auto_cls: str, device: torch.device, what: str):
    """(model, processor) of a checked local source, loaded with ``local_files_only`` under HF offline mode."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{what}: needs transformers: pip install 'roadcascade[open]'") from None

    path = verify(source, what)
    with offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = transformers.AutoProcessor.from_pretrained(str(path), local_files_only=True)
        # the keyword is dtype from transformers 4.56 on, torch_dtype before
        kw = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
        model = getattr(transformers, auto_cls).from_pretrained(str(path), local_files_only=True, **{kw: compute_dtype(device)})
    return model.to(device).eval(), processor


def _version(v: str) -> tuple[int, int]:
    parts = (v.split(".") + ["0"])[:2]
    return tuple(int("".join(c for c in x if c.isdigit()) or 0) for x in parts)  # type: ignore[return-value]


def count_gflops(fn: Callable[[], object]) -> float:
    """GFLOPs of one call of ``fn`` (matrix products and convolutions, 2 per multiply-add, as zoo.gflops).
    torch's counter refuses grouped-query attention (fewer key/value heads than query heads, as transformers
    runs it on CUDA); it is then counted again with the key/value heads repeated, which is what it computes."""
    try:
        return _count(fn)
    except AssertionError:
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _sdpa_repeated_kv):
            return _count(fn)


def _count(fn: Callable[[], object]) -> float:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _sdpa_repeated_kv(q, k, v, *args, enable_gqa: bool = False, **kwargs):
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    return _SDPA(q, k, v, *args, **kwargs)


def as_rgb_list(images) -> list[np.ndarray]:
    """Decoded images as HxWx3 uint8 arrays (a grey or RGBA one is made RGB) for the processors."""
    out = []
    for im in images:
        a = np.asarray(im)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
            raise ValueError(f"expected HxWx3 uint8 images, got shape {a.shape} dtype {a.dtype}")
        out.append(np.ascontiguousarray(a[:, :, :3]))
    return out
