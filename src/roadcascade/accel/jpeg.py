"""Which JPEGs the GPU decoder may take: a pure-Python header walk (plain baseline, inside the limits, no
orientation to apply, one scan, an EOI after it); anything else goes to the exact CPU decoder."""

from __future__ import annotations

import struct

from ..io.images import DecodeLimits

__all__ = ["jpeg_gpu_info"]

# ============================================================================ JPEG header walk

_SOF_SEQUENTIAL = frozenset({0xC0, 0xC1})  # baseline / extended sequential, Huffman: what nvJPEG's engine takes
_SOF_OTHER = frozenset({0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_MAX_GPU_SEGMENTS = 256  # far above an encoder's ~10; the CPU path has its own (higher) cap


def _exif_orientation_is_one(seg: bytes) -> bool:
    """Whether an APP1 Exif payload (after ``Exif\\0\\0``) has no orientation or orientation 1.

    Anything unreadable returns False (the CPU decoder then decides, as PIL does)."""
    try:
        if len(seg) < 8:
            return False
        bo = seg[:2]
        if bo == b"II":
            e = "<"
        elif bo == b"MM":
            e = ">"
        else:
            return False
        (ifd,) = struct.unpack_from(e + "I", seg, 4)
        if ifd + 2 > len(seg):
            return False
        (count,) = struct.unpack_from(e + "H", seg, ifd)
        for i in range(count):
            off = ifd + 2 + 12 * i
            if off + 12 > len(seg):
                return False
            tag, typ = struct.unpack_from(e + "HH", seg, off)
            if tag == 0x0112:
                if typ != 3:
                    return False
                (value,) = struct.unpack_from(e + "H", seg, off + 8)
                return value == 1
        return True
    except struct.error:
        return False


def jpeg_gpu_info(data: bytes, limits: DecodeLimits | None = None) -> tuple[int, int] | None:
    """``(height, width)`` when ``data`` is a JPEG the GPU decoder may take, else ``None``.

    Taken: a baseline/extended-sequential Huffman JPEG, 8-bit, 3 components (not Adobe/RGB-coded), one
    scan followed by an EOI marker, no EXIF or XMP orientation other than 1, inside ``limits``. Anything
    else (PNG, progressive, grayscale, CMYK, rotated, truncated, oversized, odd) returns ``None`` and is
    decoded by :func:`roadcascade.io.images.decode_bytes`, which gives the CPU path's pixels or BadImage.
    """
    limits = limits or _LIMITS
    n = len(data)
    if n < 4 or n > limits.max_bytes or data[:3] != b"\xff\xd8\xff" or "JPEG" not in limits.formats:
        return None
    pos, segments, hw = 2, 0, None
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7 or marker == 0xD9:
            return None  # no stand-alone marker belongs in a header
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return None
        segments += 1
        if segments > _MAX_GPU_SEGMENTS:
            return None
        body = pos + 4
        if marker in _SOF_SEQUENTIAL:
            if length < 17 or data[body] != 8 or data[body + 5] != 3:
                return None
            height = (data[body + 1] << 8) | data[body + 2]
            width = (data[body + 3] << 8) | data[body + 4]
            ids = (data[body + 6], data[body + 9], data[body + 12])
            if ids == (82, 71, 66) or hw is not None:  # 'R','G','B' component ids: libjpeg reads RGB
                return None
            hw = (height, width)
        elif marker in _SOF_OTHER:
            return None
        elif marker == 0xE1:
            seg = data[body:pos + 2 + length]
            if seg[:6] == b"Exif\x00\x00":
                if not _exif_orientation_is_one(seg[6:]):
                    return None
            elif b"Orientation" in seg:  # XMP tiff:Orientation: Pillow honours it
                return None
        elif marker == 0xEE and data[body:body + 5] == b"Adobe":
            return None
        elif marker == 0xDA:  # start of scan: header over
            break
        pos += 2 + length
    if hw is None:
        return None
    height, width = hw
    if (width < limits.min_side or height < limits.min_side or width * height > limits.max_pixels
            or max(width, height) > limits.max_side):
        return None
    if data.find(b"\xff\xda", pos + 2) >= 0:  # more than one scan
        return None
    if data.rfind(b"\xff\xd9") <= pos:  # no EOI after the scan: truncated
        return None
    return hw


_LIMITS = DecodeLimits()
