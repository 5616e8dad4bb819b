"""Turning decoded images into model input: resize (whole image, squashed to a square so nothing at
the edges is cut away), scale to [0, 1], normalise. One function for training, eval and serving."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8 (bilinear with antialiasing, PIL). No-op when already that size."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def stack_uint8(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """List of HxWx3 uint8 -> (N, 3, size, size) uint8 tensor (channels_last memory)."""
    arr = np.stack([resize_square(im, size) for im in images])  # N,H,W,3
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype=torch.float32) -> torch.Tensor:
    """uint8 NCHW -> normalised float NCHW, channels_last."""
    m = torch.tensor(mean, dtype=dtype, device=x_uint8.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=dtype, device=x_uint8.device).view(1, 3, 1, 1) * 255.0
    x = (x_uint8.to(dtype) - m) / s
    return x.contiguous(memory_format=torch.channels_last)


def to_batch(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return normalize(stack_uint8(images, size), mean, std)


def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` when present (or as asked), else ``cpu``."""
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
