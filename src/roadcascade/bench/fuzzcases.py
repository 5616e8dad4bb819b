"""The fuzzer's malformed requests: one small builder per kind (bad base64, truncated and corrupt JPEGs,
decompression bombs, bad JSON, wrong content types, bad multipart bodies, lying lengths, ...), cycled by
:func:`fuzz_requests`. Every draw comes from one seeded generator, so a seed gives the same requests.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .http_messages import HttpRequest

JSON = [("Content-Type", "application/json")]
ENDPOINTS = ["/v1/predict", "/streetvision"]  # a bad image inside a batch is a per-image error in a 200
NOT_IMAGES = [b"%PDF-1.4 hello", b"<html><body>hi</body></html>", b"PK\x03\x04" + bytes(30), b"GIF89a" + bytes(3),
              b"\x00" * 64, b"just some text", b'{"a": 1}', b"\x89PNG\r\n\x1a\n" + bytes(10)]
B64_JUNK = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=!@#$%^&*() é\n"


# ----------------------------------------------------------------------------------------------- bombs
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bomb(side: int = 12_000) -> bytes:
    """A valid 1-bit grey PNG of side x side zeros: a few kB that inflate to side^2 pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF) claiming another size: a header-only bomb."""
    b = bytearray(jpeg)
    i = 2
    while i < len(b) - 9:
        if b[i] != 0xFF:
            break
        marker, seg = b[i + 1], struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            b[i + 5:i + 9] = struct.pack(">HH", height, width)
            break
        i += 2 + seg
    return bytes(b)


# ----------------------------------------------------------------------------------------------- material
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _js(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@dataclass
class FuzzKit:
    """What the cases are made of: a good JPEG (and its base64), a PNG bomb, and the run's generator."""

    rng: np.random.Generator
    jpeg: bytes
    good: str
    bomb_png: str

    @classmethod
    def of(cls, jpeg: bytes, seed: int) -> "FuzzKit":
        return cls(np.random.default_rng(seed), jpeg, _b64(jpeg), _b64(png_bomb()))

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.rng.integers(0, len(seq)))]

    def truncated(self) -> str:
        return _b64(self.jpeg[: int(self.rng.integers(2, max(3, len(self.jpeg) - 2)))])

    def corrupted(self) -> str:
        b = bytearray(self.jpeg)
        for _ in range(int(self.rng.integers(1, 40))):
            b[int(self.rng.integers(2, min(len(b), 400)))] = int(self.rng.integers(0, 256))  # headers: tables, frame, scans
        return _b64(bytes(b))

    def junk_b64(self) -> str:
        return "".join(B64_JUNK[int(i)] for i in self.rng.integers(0, len(B64_JUNK), int(self.rng.integers(1, 400))))


# ----------------------------------------------------------------------------------------------- the cases
# each builder: (kit, a prediction endpoint drawn for it) -> the request; fuzz_requests sets its kind
def _image_json(ep: str, value: Any) -> HttpRequest:
    return HttpRequest("POST", ep, _js({"image": value}), JSON)


def _bad_padding(kit: FuzzKit, ep: str) -> HttpRequest:
    cut = int(kit.rng.integers(4, len(kit.good) - 4))
    return _image_json(ep, kit.good[:cut] + "=" * int(kit.rng.integers(1, 4)) + kit.good[cut:])


def _decompression_bomb(kit: FuzzKit, ep: str) -> HttpRequest:
    v = kit.bomb_png if kit.rng.random() < 0.5 else _b64(jpeg_with_size(kit.jpeg, 60_000, 60_000))
    return _image_json(ep, v)


def _bad_json(kit: FuzzKit, ep: str) -> HttpRequest:
    good = kit.good
    bodies = [b"{", b"{\"image\": ", b"\xff\xfe\x00garbage", b"[" * 50_000 + b"]" * 50_000, b"null", b"[1, 2]",
              b"\"image\"", b"{\"image\": 1e999999}", _js({"image": 12}), _js({"image": None}), _js({"img": good}), b"{}",
              _js({"image": {"nested": good}}), _js({"image": [good]})]
    return HttpRequest("POST", ep, kit.pick(bodies), JSON)


def _bad_batch(kit: FuzzKit, ep: str) -> HttpRequest:
    good = kit.good
    bodies = [_js({"images": "notalist"}), _js({"images": []}), _js({"image": good}), b"[" * 50_000, _js([good]),
              _js({"images": None})]
    return HttpRequest("POST", "/v1/predict/batch", kit.pick(bodies), JSON)


def _wrong_content_type(kit: FuzzKit, ep: str) -> HttpRequest:
    c = kit.pick(["text/plain", "application/xml", "application/x-www-form-urlencoded", "video/mp4", "", "multipart/mixed",
                  "application/json; charset=utf-16"])
    form = b"image=" + kit.good.encode()[:200]
    body = _js({"image": kit.good}) if kit.rng.random() < 0.5 else form
    if c == "" or c.startswith("application/json"):  # JSON is accepted there: send a form body instead
        body = form
    return HttpRequest("POST", ep, body, [("Content-Type", c)] if c else [])


def _bad_multipart(kit: FuzzKit, ep: str) -> HttpRequest:
    bnd = "XyZ" + str(int(kit.rng.integers(0, 1 << 30)))
    h = [("Content-Type", f"multipart/form-data; boundary={bnd}" if kit.rng.random() < 0.8 else "multipart/form-data")]
    bodies = [
        f"--{bnd}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n".encode() + kit.jpeg[:200],
        b"--wrong\r\n\r\n--wrong--",
        f"--{bnd}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--{bnd}--\r\n".encode(),
        f"--{bnd}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nnot an image\r\n--{bnd}--\r\n".encode(),
        b"",
    ]
    return HttpRequest("POST", "/v1/predict", kit.pick(bodies), h)


def _bad_deadline(kit: FuzzKit, ep: str) -> HttpRequest:
    v = kit.pick(["abc", "-5", "0", "nan", "inf", "1e400", "0x10", "12ms"])
    return HttpRequest("POST", ep, _js({"image": kit.good}), JSON + [("X-Deadline-Ms", v)])


def _wrong_method_or_path(kit: FuzzKit, ep: str) -> HttpRequest:
    m, p = kit.pick([("GET", "/v1/predict"), ("PUT", "/streetvision"), ("POST", "/nope"), ("DELETE", "/"), ("POST", "/metrics")])
    return HttpRequest(m, p, _js({"image": kit.good}) if m != "GET" else b"", JSON)


CASES: dict[str, Callable[[FuzzKit, str], HttpRequest]] = {  # in the order fuzz_requests cycles them
    "bad_base64": lambda kit, ep: _image_json(ep, kit.junk_b64()),
    "bad_padding": _bad_padding,
    "truncated_jpeg": lambda kit, ep: _image_json(ep, kit.truncated()),
    "corrupt_jpeg": lambda kit, ep: _image_json(ep, kit.corrupted()),
    "not_an_image": lambda kit, ep: _image_json(ep, _b64(kit.pick(NOT_IMAGES))),
    "decompression_bomb": _decompression_bomb,
    "bad_json": _bad_json,
    "wrong_content_type": _wrong_content_type,
    "bad_multipart": _bad_multipart,
    "bad_deadline": _bad_deadline,
    "lying_length": lambda kit, ep: HttpRequest("POST", ep, _js({"image": kit.good})[:100], JSON, content_length=10**12),
    "wrong_method_or_path": _wrong_method_or_path,
    "too_many_images": lambda kit, ep: HttpRequest("POST", "/v1/predict/batch", _js({"images": ["AAAA"] * 1000}), JSON),
    "raw_bytes_garbage": lambda kit, ep: HttpRequest("POST", "/v1/predict", kit.pick(NOT_IMAGES), [("Content-Type", "image/jpeg")]),
    "bad_batch": _bad_batch,
}


def fuzz_requests(n: int, jpeg: bytes, max_body: int = 16 * 2**20, seed: int = 0, huge_cases: int = 6) -> list[HttpRequest]:
    """At least n malformed requests of many kinds (cycled), plus ``huge_cases`` bodies over ``max_body``."""
    kit = FuzzKit.of(jpeg, seed)
    kinds = list(CASES)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        ep = kit.pick(ENDPOINTS)  # drawn for every case, used by those that take any prediction endpoint
        out.append(dataclasses.replace(CASES[kind](kit, ep), kind=kind))
    huge = b"{\"image\": \"" + b"A" * (max_body + 1024) + b"\"}"
    for i in range(huge_cases):
        out.append(HttpRequest("POST", ENDPOINTS[i % 2], huge, JSON, "huge_body", chunked=(i % 2 == 1)))
    order = kit.rng.permutation(len(out))
    return [out[i] for i in order]
