"""Turning an HTTP request into decoded images, or a 4xx with a machine reason. Never a 5xx for bad input.

Accepted bodies:
  - ``application/json``: ``{"image": "<base64>"}`` (``/v1/predict``, ``/streetvision``) or
    ``{"images": ["<base64>", ...]}`` (``/v1/predict/batch``);
  - ``multipart/form-data``: image files (any field name; ``file`` by convention), or a text field
    ``image`` holding base64;
  - ``image/*`` or ``application/octet-stream``: the raw image bytes (``/v1/predict`` only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.strictjson import loads_strict
from ..io.images import BadImage, DecodeLimits, base64_bytes, check_jpeg_scan_size, decode_base64, decode_bytes

DEADLINE_HEADER = "x-deadline-ms"


class HttpError(Exception):
    """A request the server answers with ``status`` and a JSON error ``{reason, message}``."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}

    def body(self) -> dict:
        return {"error": {"reason": self.reason, "message": self.message, "status": self.status}}

    @classmethod
    def from_bad_image(cls, e: BadImage) -> "HttpError":
        return cls(e.http_status, e.reason, e.message)


@dataclass(frozen=True)
class Payload:
    """What a request carries, before decoding: base64 strings or raw bytes, and the parsed JSON object."""

    items: list[str | bytes]
    doc: dict | None = None  # the JSON object (for /streetvision, echoed back)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_deadline_ms(value: str | None, default_ms: float, max_ms: float) -> float:
    """The request's deadline in ms from arrival: the header if given (clipped to ``max_ms``), else the default."""
    if value is None or value.strip() == "":
        return default_ms
    try:
        ms = float(value)
    except ValueError:
        raise HttpError(400, "bad_deadline", f"X-Deadline-Ms must be a number of milliseconds, got {value[:40]!r}") from None
    if not math.isfinite(ms) or ms <= 0:
        raise HttpError(400, "bad_deadline", f"X-Deadline-Ms must be a positive finite number, got {value[:40]!r}")
    return min(ms, max_ms)


def parse_json(body: bytes) -> Any:
    """Strict JSON: NaN, Infinity and numbers that overflow a float (1e400) are refused here (400), before
    any inference, instead of failing the answer that echoes them."""
    if not body:
        raise HttpError(400, "empty", "the request body is empty")
    try:
        return loads_strict(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise HttpError(400, "bad_json", f"the body is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None


def json_object(body: bytes) -> dict:
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise HttpError(400, "bad_json", f"expected a JSON object, got {type(doc).__name__}")
    return doc


def image_field(doc: dict, key: str = "image") -> str:
    if key not in doc:
        raise HttpError(400, "missing_image", f"the JSON object has no {key!r} field (base64 of a JPEG or PNG)")
    v = doc[key]
    if not isinstance(v, str):
        raise HttpError(400, "bad_input", f"{key!r} must be a base64 string, got {type(v).__name__}")
    return v


def images_field(doc: dict, max_images: int) -> list[str]:
    v = doc.get("images")
    if not isinstance(v, list):
        raise HttpError(400, "missing_image", "expected {\"images\": [base64, ...]}")
    if not v:
        raise HttpError(400, "empty", "\"images\" is empty")
    if len(v) > max_images:
        raise HttpError(413, "too_many_images", f"{len(v)} images in one request; at most {max_images}")
    return v


def item_bytes(item: Any, limits: DecodeLimits) -> bytes:
    """The encoded image of one item (raw bytes, or base64 text decoded); ``BadImage`` for anything else."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):
        return base64_bytes(item, limits)
    raise BadImage("bad_input", f"each image must be a base64 string, got {type(item).__name__}", 400)


def decode_item(item: Any, limits: DecodeLimits, min_size: int | None = None) -> np.ndarray:
    """Decode one base64 string or raw bytes; ``BadImage`` for bad content (and for a non-string item). ``min_size``:
    reduced-size JPEG decode keeping that short side (``images.decode_bytes``)."""
    if isinstance(item, (bytes, bytearray)):
        return decode_bytes(bytes(item), limits, min_size=min_size)
    if isinstance(item, str):
        return decode_base64(item, limits, min_size=min_size)
    raise BadImage("bad_input", f"each image must be a base64 string, got {type(item).__name__}", 400)


def prepare_item(item: Any, limits: DecodeLimits, gpu: bool) -> np.ndarray | bytes:
    """Like :func:`decode_item`; with ``gpu``, a plain JPEG the GPU decoder takes comes back as its bytes
    (decoded later, in the GPU batch) and everything else is decoded here on the CPU."""
    if not gpu:
        return decode_item(item, limits)
    if isinstance(item, (bytes, bytearray)):
        data = bytes(item)
    elif isinstance(item, str):
        data = base64_bytes(item, limits)
    else:
        raise BadImage("bad_input", f"each image must be a base64 string, got {type(item).__name__}", 400)
    from ..accel.runtime import jpeg_gpu_info

    if jpeg_gpu_info(data, limits) is None:
        return decode_bytes(data, limits)
    check_jpeg_scan_size(data)  # the GPU decoder does not see truncation that ends at an EOI
    return data
