"""Resizing on the device: bit-exact with PIL's bilinear + antialias for small images (PIL's fixed-point filter
coefficients applied as two float64 matrix products, with PIL's intermediate rounding), antialiased float32 for
large downscales (equal answers, not equal bits)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["pil_bilinear_weights", "horizontal_first", "resize_exact", "resize_images", "resize_antialias",
           "resize_group", "shape_groups", "EXACT_MAX_PIXELS"]

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


def resize_images(images: Sequence[torch.Tensor], size: int, device: torch.device,
                  exact_max_pixels: int | None = None) -> torch.Tensor:
    """List of (3, H, W) uint8 tensors (any sizes, any strides) -> (n, 3, size, size) uint8.

    Images of one size are stacked and resized together (one pair of matrix products per size), PIL-exact;
    with ``exact_max_pixels``, groups of larger images take the antialiased float32 resize (:func:`resize_group`)."""
    n = len(images)
    if n == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)
    groups = shape_groups([tuple(t.shape[1:]) for t in images])
    if len(groups) == 1:
        return resize_group(torch.stack(list(images)), size, exact_max_pixels)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    for idx in groups.values():
        block = resize_group(torch.stack([images[i] for i in idx]), size, exact_max_pixels)
        if len(idx) == 1:
            out[idx[0]].copy_(block[0])
        else:
            out.index_copy_(0, torch.tensor(idx, device=device), block)
    return out


# ============================================================================ large downscales

#: images above this many pixels are resized with :func:`resize_antialias` on CUDA (the float64 PIL-exact
#: products cost O(H * W * S) multiply-adds in float64 per image: fine for a 0.1-megapixel frame, wasted on a
#: 12-megapixel photo whose answer does not depend on the last bit of its 224-pixel thumbnail)
EXACT_MAX_PIXELS = 1 << 19
#: float32 working set of one :func:`resize_antialias` call, in pixels (x 3 channels x 4 bytes: 768 MiB)
AA_CHUNK_PIXELS = 1 << 26


def resize_antialias(x: torch.Tensor, out_h: int, out_w: int, chunk_pixels: int = AA_CHUNK_PIXELS) -> torch.Tensor:
    """(n, C, H, W) uint8 -> (n, C, out_h, out_w) uint8: bilinear with antialiasing in float32
    (``torch.nn.functional.interpolate(antialias=True)``, PIL's triangle filter widened by the scale, as
    PIL's BILINEAR does), rounded to uint8. Within one level of :func:`resize_exact` (rounding order only).
    Runs in pieces of at most ``chunk_pixels`` input pixels, so a batch of 12-megapixel photos never holds
    more than one piece in float32."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"resize_antialias expects (n, C, H, W) uint8, got {tuple(x.shape)} {x.dtype}")
    n, c, h, w = x.shape
    if (h, w) == (out_h, out_w):
        return x
    out = torch.empty((n, out_h, out_w, c), dtype=torch.uint8, device=x.device).permute(0, 3, 1, 2)
    step = max(1, chunk_pixels // max(1, h * w))
    for a in range(0, n, step):
        y = torch.nn.functional.interpolate(x[a:a + step].float(), size=(out_h, out_w), mode="bilinear",
                                            antialias=True, align_corners=False)
        out[a:a + step] = y.round_().clamp_(0.0, 255.0).to(torch.uint8)
    return out


def resize_group(x: torch.Tensor, size: int, exact_max_pixels: int | None = EXACT_MAX_PIXELS) -> torch.Tensor:
    """One shape group (n, 3, H, W) uint8 to (n, 3, size, size): PIL-exact up to ``exact_max_pixels`` input
    pixels (None: always), antialiased float32 above."""
    h, w = x.shape[-2:]
    if exact_max_pixels is None or h * w <= exact_max_pixels:
        return resize_exact(x, size, size)
    return resize_antialias(x, size, size)


def shape_groups(shapes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Positions of each distinct (H, W), in first-seen order (phone and dashcam payloads come in few sizes)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(i)
    return groups
