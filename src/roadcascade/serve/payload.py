"""A prediction request's body into images: read by content type (JSON, multipart or raw bytes), then
decoded in a decode thread within the request's and the server's pixel budgets (``budget.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

from ..io.images import BadImage, DecodeLimits, image_size
from .budget import PixelBudget, Reservation
from .config import ServeConfig
from .inputs import HttpError, decode_item, image_field, images_field, item_bytes, json_object, media_type, prepare_item
from .middleware import BodyTooLarge


async def read_payload(request: Request, kind: str, cfg: ServeConfig) -> tuple[list[Any], dict | None]:
    """Items (base64 strings or bytes) and the JSON object, by content type. kind: single | batch | synapse."""
    ctype = media_type(request.headers.get("content-type"))
    if ctype == "application/json" or ctype.endswith("+json"):
        body = await request.body()
        doc = await asyncio.get_running_loop().run_in_executor(None, json_object, body)  # big JSON: off the event loop
        if kind == "batch":
            return list(images_field(doc, min(cfg.max_batch_images, cfg.max_queue))), doc
        return [image_field(doc)], doc
    if kind == "synapse":
        raise HttpError(415, "unsupported_media_type", f"POST /streetvision takes application/json only, not {ctype or 'no content type'!r}")
    if ctype == "multipart/form-data":
        items = await read_multipart(request, cfg)
        if kind == "single" and len(items) != 1:
            raise HttpError(400, "bad_input", f"expected one image, got {len(items)} (use /v1/predict/batch)")
        return items, None
    if kind == "single" and (ctype.startswith("image/") or ctype == "application/octet-stream"):
        body = await request.body()
        if not body:
            raise HttpError(400, "empty", "the request body is empty")
        return [body], None
    accepted = "application/json, multipart/form-data" + (", image/* or application/octet-stream" if kind == "single" else "")
    raise HttpError(415, "unsupported_media_type", f"content type {ctype or 'none'!r} not accepted here; send {accepted}")


async def read_multipart(request: Request, cfg: ServeConfig) -> list[Any]:
    cap = min(cfg.max_batch_images, cfg.max_queue)
    try:
        form = await request.form(max_files=cap, max_fields=cap + 8, max_part_size=cfg.max_body_bytes)
    except BodyTooLarge:
        raise
    except Exception as e:
        raise HttpError(400, "bad_multipart", f"could not parse the multipart body ({type(e).__name__}: {str(e)[:120]})") from None
    items: list[Any] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                items.append(await value.read())
            elif key in ("image", "images"):
                items.append(value)
    finally:
        await form.close()
    if not items:
        raise HttpError(400, "missing_image", "no image in the multipart body (send a file field, e.g. 'file')")
    if len(items) > cap:
        raise HttpError(413, "too_many_images", f"{len(items)} images in one request; at most {cap}")
    return items


def decode_items(items: Sequence[Any], res: Reservation, pixels: PixelBudget, limits: DecodeLimits, request_pixels: int,
                 gpu: bool, min_size: int | None) -> list[np.ndarray | bytes | BadImage]:
    """In a decode thread: bytes and declared sizes first (no pixel decoded), then the budget, then pixels
    (for the GPU path, checked JPEG bytes instead; ``min_size``: the CPU path's reduced-size decode)."""
    out: list[Any] = []
    for it in items:
        try:
            data = item_bytes(it, limits)
            out.append((data, _pixels(image_size(data, limits))))
        except BadImage as e:
            out.append(e)
    total = sum(x[1] for x in out if not isinstance(x, BadImage))
    if total > request_pixels:
        raise HttpError(413, "too_many_pixels", f"the images of this request declare {total:,} pixels; at most "
                        f"{request_pixels:,} per request")
    if not res.take(total):
        raise HttpError(503, "overloaded", f"decoded-pixel budget in use ({pixels.used:,} of {pixels.total:,} "
                        f"pixels); retry", {"Retry-After": "1"})
    decoded: list[np.ndarray | bytes | BadImage] = []
    for x in out:
        try:
            decoded.append(x if isinstance(x, BadImage) else prepare_item(x[0], limits, gpu) if gpu
                           else decode_item(x[0], limits, min_size=min_size))
        except BadImage as e:
            decoded.append(e)
    return decoded


def _pixels(size: tuple[int, int]) -> int:
    return int(size[0]) * int(size[1])
