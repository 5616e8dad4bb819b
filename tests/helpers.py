"""Builders the tests share: encoded images (JPEG, PNG, any PIL format), base64 text, random pixels.

Import as ``from helpers import jpeg, png, b64`` (pytest puts tests/ on the path through conftest)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def encode(img: Image.Image | np.ndarray, fmt: str = "JPEG", **options: object) -> bytes:
    """Encode a PIL image or an HxWx3 uint8 array in memory (``options`` go to ``Image.save``)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def jpeg(rgb: np.ndarray, quality: int = 75, **options: object) -> bytes:
    """A JPEG of the pixels (quality 75 as validators send, PIL's default too)."""
    return encode(rgb, "JPEG", quality=quality, **options)


def png(rgb: np.ndarray) -> bytes:
    return encode(rgb, "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def random_image(rng: np.random.Generator, h: int = 48, w: int = 64) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
