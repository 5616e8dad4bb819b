"""Safe image decoding for hostile input.

Every public decoder returns an ``H x W x 3`` ``uint8`` RGB array (C-contiguous, writable) or raises
:class:`BadImage`, one ``ValueError`` subclass carrying a short machine ``reason`` and the HTTP status a
server should answer with (400 bad content, 413 too large, 415 wrong format). No other exception
escapes a decoder for bad input, so a server can map ``BadImage`` to a 4xx and anything else is a bug.

The path of one input::

    bytes -> size limit -> sniff magic bytes (non-image / unsupported format -> 415)
          -> structure pre-checks (WebP/TIFF truncation; caps on JPEG scans and header segments,
             PNG chunks, GIF blocks: millions of tiny segments would cost seconds in PIL's parsers)
          -> PIL.Image.open restricted to ``limits.formats`` (header only; bomb warning -> error)
          -> width/height (and TIFF tile size) checked against the limits BEFORE any pixel is decoded
          -> (``min_size``, baseline JPEG only) ``Image.draft``: libjpeg will decode at 1/2, 1/4 or 1/8 scale,
             the largest that still leaves ``min_size`` pixels on the short side (a later resize never upsamples)
          -> load (truncated data is an error: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is read, never set)
          -> EXIF orientation applied with the transposes of ``ImageOps.exif_transpose``, but without
             its unconditional copy and EXIF rewrite (a broken EXIF block means "no transpose")
          -> :func:`to_rgb` (mode conversion)

Choices worth knowing:

- Alpha is **dropped**, never composited: the RGB values under the alpha channel are kept, which are the
  pixels ``PIL.Image.convert("RGB")`` gives and what dataset/validator pipelines feed their models.
  The ndarray path (``H x W x 4`` -> drop the 4th channel) does the same.
- 16-bit gray (``I;16*``) is scaled by its bit depth (``round(v / 257)``), so 0..65535 maps to 0..255.
  32-bit ``I`` and float ``F`` carry no bit depth: values already in 0..255 (``F``: 0..1 is scaled by 255)
  are kept, ``I`` values in 0..65535 are treated as 16-bit, anything else is stretched min..max to 0..255.
- Multi-frame GIF/TIFF/WebP/APNG: the first frame.
- PIL's decompression-bomb warning is turned into an error only inside :func:`decode_bytes`'s call to
  ``Image.open``, under a module lock, with ``warnings.catch_warnings``; no PIL global is changed.
  (Code elsewhere that sets ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` would make truncated files
  decode with grey fill here too: don't.)
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import operator
import os
import stat
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Final, Union

import numpy as np
from PIL import Image, ImageFile

__all__ = [
    "REASONS",
    "BadImage",
    "DecodeLimits",
    "decode_any",
    "decode_base64",
    "decode_bytes",
    "decode_path",
    "draft_scale",
    "encode_base64_jpeg",
    "encode_jpeg",
    "check_jpeg_scan_size",
    "image_size",
    "to_rgb",
]

#: Every ``BadImage.reason`` this module raises, with the HTTP status it carries.
REASONS: Final[dict[str, int]] = {
    "empty": 400,  # zero bytes / empty string
    "bad_input": 400,  # a Python object of the wrong type
    "bad_base64": 400,  # not valid base64 (alphabet, padding, non-ASCII, bad data URL)
    "bad_array": 400,  # ndarray of the wrong dtype or shape
    "not_found": 400,  # path missing, a directory, or not a regular file
    "unreadable": 400,  # path exists but cannot be read
    "truncated": 400,  # image data ends early
    "corrupt": 400,  # recognised container, undecodable content
    "bad_dimensions": 400,  # a side below min_side or above max_side
    "too_large": 413,  # more bytes (or base64 characters) than allowed
    "too_many_pixels": 413,  # width * height above max_pixels
    "decompression_bomb": 413,  # PIL's bomb guard, huge TIFF tiles, absurd JPEG/PNG/GIF segment counts
    "not_image": 415,  # text, HTML, JSON, PDF, zip, ... or unrecognised bytes
    "unsupported_format": 415,  # an image format outside limits.formats (SVG, HEIC, ICO, ...)
}

# Structure caps: far above anything an encoder writes, far below what makes parsing take seconds.
_JPEG_MAX_SCANS: Final = 256  # libjpeg decodes every progressive scan over the whole image
_JPEG_MAX_SEGMENTS: Final = 4096  # header markers before the first scan (PIL walks them in Python)
_PNG_MAX_CHUNKS: Final = 50_000  # PIL reads every chunk in Python; encoders write 8-64 KiB IDATs
_GIF_MAX_BLOCKS: Final = 100_000  # extension sub-blocks before the first frame
_PATHLIKE_CHARS: Final = frozenset(".\\~")  # characters a path may hold that base64 never does
_MAX_PATH_CHARS: Final = 4096
_FORMAT_ALIASES: Final = {"JPG": "JPEG", "TIF": "TIFF", "MPO": "JPEG"}  # MPO: multi-picture JPEG (phones)
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings edits process-global state: one Image.open at a time


def _canonical_format(name: str | None) -> str:
    """Upper-case PIL format name with aliases folded (MPO -> JPEG, JPG -> JPEG, TIF -> TIFF)."""
    upper = (name or "").strip().upper()
    return _FORMAT_ALIASES.get(upper, upper)


class BadImage(ValueError):
    """One error type for every undecodable input.

    Attributes:
        reason: short machine code, one of :data:`REASONS`.
        message: human-readable explanation (also ``str(err)``).
        http_status: 400 for bad content, 413 for too large, 415 for a wrong format.
    """

    reason: str
    message: str
    http_status: int

    def __init__(self, reason: str, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.http_status = http_status

    def __reduce__(self) -> tuple[type[BadImage], tuple[str, str, int]]:
        """Pickle with all three fields (errors cross process boundaries in data loaders)."""
        return (type(self), (self.reason, self.message, self.http_status))

    def __repr__(self) -> str:
        return f"BadImage(reason={self.reason!r}, message={self.message!r}, http_status={self.http_status})"


def _bad(reason: str, message: str) -> BadImage:
    """Build a :class:`BadImage` with the status registered for ``reason``."""
    return BadImage(reason, message, REASONS[reason])


@dataclass(frozen=True)
class DecodeLimits:
    """Limits applied to every decode. ``formats`` are PIL format names (case-insensitive; JPG/TIF ok)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 20_000
    min_side: int = 1
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side", "min_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeLimits.{name} must be a positive int, got {value!r}")
        if self.min_side > self.max_side:
            raise ValueError(f"DecodeLimits.min_side ({self.min_side}) exceeds max_side ({self.max_side})")
        if isinstance(self.formats, (str, bytes)) or not self.formats:
            raise ValueError(
                f"DecodeLimits.formats must be a non-empty tuple of names like ('JPEG', 'PNG'), got {self.formats!r}")
        names = tuple(dict.fromkeys(_canonical_format(str(f)) for f in self.formats))
        object.__setattr__(self, "formats", names)

    @property
    def max_base64_chars(self) -> int:
        """Length of the base64 encoding of ``max_bytes`` bytes (padding included)."""
        return 4 * math.ceil(self.max_bytes / 3)


_DEFAULT_LIMITS: Final = DecodeLimits()
_JPEG_LIMITS: Final = DecodeLimits(max_pixels=2**62, max_side=65_500)  # what the JPEG format can hold

ImageSource = Union[
    bytes, bytearray, memoryview, str, "os.PathLike[str]", "os.PathLike[bytes]", np.ndarray, Image.Image
]


# --------------------------------------------------------------------------------------------- errors
def _short(exc: BaseException) -> str:
    """``Type: message`` of an exception, one line, at most 160 characters."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:160] if text else type(exc).__name__


def _classify(exc: BaseException, what: str) -> BadImage:
    """Map any exception raised while parsing ``what`` (e.g. "PNG data") to a :class:`BadImage`."""
    if isinstance(exc, BadImage):
        return exc
    text = str(exc)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return _bad("decompression_bomb", f"{what} declares too many pixels ({text.split(',')[0]})")
    if isinstance(exc, ValueError) and "Decompressed Data Too Large" in text:
        return _bad("decompression_bomb", f"{what} holds a metadata chunk that inflates past PIL's limit")
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return _bad("truncated", f"{what} is truncated: the file ends before the image data does")
    return _bad("corrupt", f"{what} could not be decoded ({_short(exc)})")


# --------------------------------------------------------------------------------------------- sniffing
_IMAGE_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xffO\xffQ", "JPEG2000"),
    (b"\xff\n", "JPEGXL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEGXL"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"icns", "ICNS"),
    (b"v/1\x01", "OPENEXR"),
    (b"#?RADIANCE", "HDR"),
    (b"%!PS-Adobe", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\x0a\x05\x01", "PCX"),
)
_OTHER_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "a zip archive"),
    (b"PK\x07\x08", "a zip archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"BZh", "bzip2 data"),
    (b"\xfd7zXZ\x00", "xz data"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x7fELF", "an ELF executable"),
    (b"\xca\xfe\xba\xbe", "a Java class / Mach-O file"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM video"),
    (b"OggS", "an Ogg stream"),
    (b"ID3", "an MP3 file"),
    (b"fLaC", "a FLAC file"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"\x80\x04\x95", "a Python pickle"),
)
_HEIF_BRANDS: Final = {b"heic": "HEIF", b"heix": "HEIF", b"hevc": "HEIF", b"heim": "HEIF", b"heis": "HEIF",
                       b"hevm": "HEIF", b"hevs": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF",
                       b"avis": "AVIF"}


def _looks_like_text(head: bytes) -> bool:
    """True when ``head`` (the first bytes of the input) is printable UTF-8/ASCII text."""
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a multi-byte character cut at the end of the window is fine
            return False
        text = head[: exc.start].decode("utf-8")
    if not text:
        return False
    printable = sum(ch.isprintable() or ch in "\t\r\n\f" for ch in text)
    return printable >= 0.95 * len(text)


def _text_kind(head: bytes) -> tuple[str, str]:
    """Classify text: SVG is an (unsupported) image, anything else is not an image."""
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith(b"<svg") or (start.startswith((b"<?xml", b"<!doctype svg", b"<!--")) and b"<svg" in start):
        return "image", "SVG"
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<?xml", b"<")):
        return "other", "HTML/XML text"
    if start[:1] in (b"{", b"["):
        return "other", "JSON text"
    return "other", "plain text"


def _sniff(data: bytes) -> tuple[str, str]:
    """Guess what ``data`` is from its first bytes.

    Returns ``(kind, name)``: kind ``"image"`` with a canonical format name, ``"other"`` with a
    description of a known non-image, or ``"unknown"``.
    """
    for magic, name in _IMAGE_MAGIC:
        if data.startswith(magic):
            return "image", name
    if data[:4] == b"RIFF":
        return ("image", "WEBP") if data[8:12] == b"WEBP" else ("other", "a RIFF (WAV/AVI) file")
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return ("image", _HEIF_BRANDS[brand]) if brand in _HEIF_BRANDS else ("other", "an MP4/QuickTime file")
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            return "other", name
    if data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"7") and data[2:3].isspace():
        return "image", "PPM"
    head = data[:4096]
    if _looks_like_text(head):
        return _text_kind(head)
    if data.startswith(b"BM"):  # weak magic: checked after text so that "BMW ..." is text
        return "image", "BMP"
    if data.startswith(b"MZ"):
        return "other", "a Windows executable"
    return "unknown", "unrecognised data"


def _jpeg_header_too_long(data: bytes) -> bool:
    """Whether more than ``_JPEG_MAX_SEGMENTS`` markers (or fill bytes) precede the first scan.

    PIL walks these header segments in Python, so millions of tiny COM/APP segments cost seconds.
    """
    pos, size = 2, len(data)
    for _ in range(_JPEG_MAX_SEGMENTS):
        if pos + 4 > size or data[pos] != 0xFF:
            return False  # end or malformed: PIL reports it
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: the header is over
            return False
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        else:
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return True


def _png_too_many_chunks(data: bytes) -> bool:
    """Whether the PNG has more than ``_PNG_MAX_CHUNKS`` chunks (PIL reads each one in Python)."""
    pos, size = 8, len(data)
    for _ in range(_PNG_MAX_CHUNKS):
        if pos + 8 > size or data[pos + 4:pos + 8] == b"IEND":
            return False
        pos += 12 + struct.unpack_from(">I", data, pos)[0]
    return pos + 8 <= size


def _gif_too_many_blocks(data: bytes) -> bool:
    """Whether more than ``_GIF_MAX_BLOCKS`` extension sub-blocks precede the first frame."""
    size = len(data)
    if size < 13:
        return False
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    budget = _GIF_MAX_BLOCKS
    while budget > 0:
        if pos + 2 > size or data[pos] != 0x21:  # not an extension: image, trailer or junk
            return False
        pos += 2
        while budget > 0 and pos < size:
            length = data[pos]
            pos += 1 + length
            budget -= 1
            if length == 0:
                break
    return True


def _precheck(fmt: str, data: bytes) -> None:
    """Cheap structural checks PIL does not make (or reports vaguely) for some formats.

    Truncated WebP/TIFF containers get the reason "truncated"; structures that would make PIL's
    pure-Python parsers or libjpeg spend seconds on a small file are refused as "decompression_bomb".
    """
    if fmt == "WEBP" and len(data) >= 8:
        (riff_size,) = struct.unpack_from("<I", data, 4)
        if len(data) < riff_size + 8:
            raise _bad("truncated", f"WEBP data is truncated: {len(data)} of {riff_size + 8} bytes")
    elif fmt == "TIFF" and len(data) >= 8 and data[2:4] in (b"*\x00", b"\x00*"):
        (ifd,) = struct.unpack_from("<I" if data[:2] == b"II" else ">I", data, 4)
        if ifd >= len(data):
            raise _bad("truncated", f"TIFF data is truncated: first directory at byte {ifd} of {len(data)}")
    elif fmt == "JPEG":
        if data.count(b"\xff\xda") > _JPEG_MAX_SCANS:
            raise _bad("decompression_bomb", f"JPEG data holds more than {_JPEG_MAX_SCANS} scans (CPU exhaustion)")
        if _jpeg_header_too_long(data):
            raise _bad("decompression_bomb",
                       f"JPEG header has more than {_JPEG_MAX_SEGMENTS} segments before the image data")
    elif fmt == "PNG" and _png_too_many_chunks(data):
        raise _bad("decompression_bomb", f"PNG data has more than {_PNG_MAX_CHUNKS:,} chunks")
    elif fmt == "GIF" and _gif_too_many_blocks(data):
        raise _bad("decompression_bomb",
                   f"GIF data has more than {_GIF_MAX_BLOCKS:,} blocks before the first frame")


# --------------------------------------------------------------------------------------------- checks
def _check_size(width: int, height: int, limits: DecodeLimits) -> None:
    """Reject a declared size outside the limits (called before any pixel is decoded)."""
    if width < limits.min_side or height < limits.min_side:
        raise _bad("bad_dimensions",
                   f"image is {width}x{height}; each side must be at least {limits.min_side} pixel(s)")
    if width * height > limits.max_pixels:
        raise _bad("too_many_pixels",
                   f"image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,}")
    if max(width, height) > limits.max_side:
        raise _bad("bad_dimensions", f"image is {width}x{height}; no side may exceed {limits.max_side} pixels")


def _check_format(img: Image.Image, limits: DecodeLimits) -> None:
    """Reject a PIL image whose (known) format is outside ``limits.formats``."""
    if img.format is not None and _canonical_format(img.format) not in limits.formats:
        raise _bad("unsupported_format",
                   f"{img.format} images are not accepted (allowed: {', '.join(limits.formats)})")


def _check_tiff_tiles(img: Image.Image, limits: DecodeLimits) -> None:
    """libtiff allocates a whole tile before decoding it: bound the declared tile area."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return
    try:
        tile_w, tile_h = int(tags.get(322, 0) or 0), int(tags.get(323, 0) or 0)
    except Exception:  # noqa: BLE001 - a hostile tag value; libtiff will reject it on load
        return
    if tile_w * tile_h > limits.max_pixels:
        raise _bad("decompression_bomb", f"TIFF declares {tile_w}x{tile_h} tiles, above the pixel limit")


def _allowed_pil_formats(limits: DecodeLimits) -> tuple[str, ...]:
    """The formats of ``limits`` that this PIL build can open (PIL's JPEG opener also yields MPO)."""
    if not Image.OPEN:
        Image.init()
    return tuple(f for f in limits.formats if f in Image.OPEN)


# --------------------------------------------------------------------------------------------- PIL path
_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) of ``img``; 1 when absent, out of range or unreadable."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block means "no orientation", never an error
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Honour EXIF orientation like ``ImageOps.exif_transpose`` (no copy when there is nothing to do).

    Any failure (hostile EXIF, odd mode) falls back to the untransposed image.
    """
    method = _TRANSPOSE.get(_exif_orientation(img))
    if method is None:
        return img
    try:
        return img.transpose(method)
    except Exception:  # noqa: BLE001 - orientation is cosmetic; keep the pixels we have
        return img


def draft_scale(width: int, height: int, min_size: int | None) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) a JPEG of ``width x height`` is decoded at so that its short
    side stays at least ``min_size``: the largest ``s`` with ``min(width, height) // min_size >= s`` (1 for None).
    This is the scale ``JpegImageFile.draft`` picks for a requested size of ``(min_size, min_size)``."""
    if min_size is None:
        return 1
    m = operator.index(min_size)
    if m < 1:
        raise ValueError(f"min_size must be a positive integer or None, got {min_size!r}")
    ratio = min(width, height) // m
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def _check_min_size(min_size: int | None) -> int | None:
    """``min_size`` as a plain int (None stays None); ValueError unless a positive integer (bools refused)."""
    if min_size is None:
        return None
    try:
        m = operator.index(min_size)
    except TypeError:
        m = 0
    if isinstance(min_size, bool) or m < 1:
        raise ValueError(f"min_size must be a positive integer or None, got {min_size!r}")
    return m


def _draft(img: Image.Image, min_size: int | None) -> None:
    """Ask libjpeg for a reduced-size decode (JPEG only; a no-op for other formats and for ``min_size`` None).
    Called after the header checks and before ``load``; the image keeps its mode.

    Progressive JPEGs stay at full size: scaled down, libjpeg reads only their first coefficients, so a file cut
    inside its later (AC) scans would decode exactly like the complete one and :func:`_check_jpeg_complete` could
    not refuse it. Phone cameras and PIL's default ``save`` (the validators') write baseline JPEGs."""
    if min_size is None or _canonical_format(img.format) != "JPEG" or img.info.get("progressive") or img.info.get("progression"):
        return
    if draft_scale(*img.size, min_size) > 1:
        try:
            img.draft(img.mode, (min_size, min_size))
        except Exception:  # noqa: BLE001 - a JPEG PIL cannot draft is decoded at full size (the checks stay)
            pass


def _decode_pil(img: Image.Image, limits: DecodeLimits, what: str, min_size: int | None = None) -> np.ndarray:
    """Check limits on a (lazily) opened image, load its current frame (reduced by :func:`_draft` with
    ``min_size``), orient it, convert to RGB."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone turned PIL's grey fill on: truncated files must stay errors
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    _check_format(img, limits)
    width, height = img.size
    _check_size(width, height, limits)
    _check_tiff_tiles(img, limits)
    _draft(img, min_size)
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - every PIL failure becomes a BadImage
        raise _classify(exc, what) from exc
    return to_rgb(_apply_orientation(img))


def _open(data: bytes, limits: DecodeLimits, fmt: str) -> Image.Image:
    """``Image.open`` restricted to the allowed formats, with PIL's bomb warning raised as an error."""
    what = f"{fmt} data" if fmt else "data"
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_allowed_pil_formats(limits))
    except Image.UnidentifiedImageError as exc:
        if fmt:
            raise _bad("corrupt", f"{what} has an unreadable or invalid header") from exc
        raise _bad("not_image", f"input is not a recognised image ({', '.join(limits.formats)} accepted)") from exc
    except Exception as exc:  # noqa: BLE001 - every PIL failure becomes a BadImage
        raise _classify(exc, what) from exc


# --------------------------------------------------------------------------------------------- JPEG completeness
# libjpeg meets an end-of-image marker in the middle of a scan with a warning ("premature end of data
# segment") and fills every block still missing with zero coefficients (flat grey 128); PIL never reports
# the warning, so a 633-byte file whose header says 4000x4000 decodes to a 48 MB grey image. Two checks:
# a lower bound on the entropy-coded data (exact: every Huffman-coded block costs bits) and a second
# decode with filler before the end marker (a complete scan never reads past its last block, so only a
# truncated one decodes differently): for sequential JPEGs only when a corner came out flat 128 (what the
# fill looks like), for progressive ones always (a cut scan leaves no flat region; twice the decode time).
# Not caught: a file cut exactly at a scan or restart-interval boundary and then ended with an EOI.
_SOF_BASELINE: Final = frozenset({0xC0, 0xC1})  # sequential Huffman: >= 2 bits per block (DC code + EOB)
_SOF_PROGRESSIVE: Final = 0xC2  # progressive Huffman: the first DC scan costs >= 1 bit per block
_JPEG_FILLER: Final = bytes((i * 89 + 17) % 255 for i in range(512))  # varied bits, never 0xFF (a marker)


@dataclass(frozen=True)
class _JpegFrame:
    sof: int
    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # (h, v) per component
    scan_start: int  # offset of the first SOS marker


def _jpeg_frame(data: bytes) -> _JpegFrame | None:
    """The frame header and the first scan's offset, or None when the header cannot be walked."""
    pos, size, sof, dims, sampling = 2, len(data), 0, (0, 0), ()
    for _ in range(_JPEG_MAX_SEGMENTS):
        if pos + 4 > size or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xDA:
            return _JpegFrame(sof, dims[0], dims[1], sampling, pos) if sof else None
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and pos + 10 <= size:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            n = data[pos + 9]
            comps = data[pos + 10:pos + 10 + 3 * n]
            sof, dims = marker, (width, height)
            sampling = tuple((comps[i + 1] >> 4, comps[i + 1] & 15) for i in range(0, len(comps) - 2, 3))
        pos += 2 + length
    return None


def _jpeg_min_bits(f: _JpegFrame) -> int:
    """A lower bound on the entropy-coded bits a complete image of this frame needs (0: no bound known)."""
    if not f.sampling or f.width <= 0 or f.height <= 0 or min(min(s) for s in f.sampling) < 1:
        return 0
    hmax, vmax = max(h for h, _ in f.sampling), max(v for _, v in f.sampling)

    def blocks(h: int, v: int) -> int:
        return math.ceil(math.ceil(f.width * h / hmax) / 8) * math.ceil(math.ceil(f.height * v / vmax) / 8)

    if f.sof in _SOF_BASELINE:
        return 2 * sum(blocks(h, v) for h, v in f.sampling)
    if f.sof == _SOF_PROGRESSIVE:
        return blocks(*f.sampling[0])
    return 0  # arithmetic coding, lossless: no cheap bound


def _flat_grey_corner(rgb: np.ndarray) -> bool:
    """Whether a 2x2 corner of ``rgb`` is exactly 128 (where libjpeg's fill for missing blocks shows)."""
    return any(bool((c == 128).all()) for c in (rgb[-2:, -2:], rgb[:2, :2], rgb[:2, -2:], rgb[-2:, :2]))


def check_jpeg_scan_size(data: bytes, what: str = "JPEG data") -> None:
    """``BadImage("truncated")`` when a JPEG holds fewer scan bytes than its declared size needs at the very least
    (no pixel decoded: for paths that hand the bytes to another decoder, e.g. the GPU's)."""
    frame = _jpeg_frame(data)
    if frame is not None:
        _check_scan_bits(data, frame, what)


def _check_scan_bits(data: bytes, frame: _JpegFrame, what: str) -> None:
    have = 8 * (len(data) - frame.scan_start)
    need = _jpeg_min_bits(frame)
    if have < need:
        raise _bad("truncated", f"{what} is truncated: {frame.width}x{frame.height} needs at least {need // 8:,} bytes "
                                f"of scan data, the file has {have // 8:,}")


def _check_jpeg_complete(data: bytes, img: Image.Image, rgb: np.ndarray, what: str, min_size: int | None = None) -> None:
    """Raise ``truncated`` when the JPEG's scans end (at an end marker) before its declared blocks do
    (``min_size``: the draft ``rgb`` was decoded with, used again for the second decode)."""
    frame = _jpeg_frame(data)
    if frame is None:
        return
    _check_scan_bits(data, frame, what)
    suspicious = frame.sof == _SOF_PROGRESSIVE or (frame.sof in _SOF_BASELINE and _flat_grey_corner(rgb))
    if not suspicious:
        return
    end = data.rfind(b"\xff\xd9")
    if end < frame.scan_start:
        return
    try:
        with Image.open(io.BytesIO(data[:end] + _JPEG_FILLER + data[end:]), formats=("JPEG",)) as again:
            _draft(again, min_size)
            other = to_rgb(_apply_orientation(again))
    except Exception:  # noqa: BLE001 - the filler was read as scan data: the scan was cut short
        other = None
    if other is None or other.shape != rgb.shape or not np.array_equal(other, rgb):
        raise _bad("truncated", f"{what} is truncated: its scan ends before the last of its {frame.width}x{frame.height} pixels")


# --------------------------------------------------------------------------------------------- to_rgb
_GRAY16: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA: Final = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


def _stretch(values: np.ndarray) -> np.ndarray:
    """Linearly map ``values`` (float64) from their min..max onto 0..255 (constant -> 0)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _gray_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16/32-bit integer or float gray image to uint8 without clipping (see module docs)."""
    if mode in _GRAY16:
        wide = arr.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "F":
        values = arr.astype(np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            fill = float(values[finite].min()) if finite.any() else 0.0
            values = np.where(finite, values, fill)
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(values * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            return np.rint(values).astype(np.uint8)
        return _stretch(values)
    lo, hi = int(arr.min()), int(arr.max())  # mode "I": int32
    if lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return _gray_to_uint8(arr, "I;16")
    return _stretch(arr.astype(np.float64))


def _mode_to_rgb(img: Image.Image) -> np.ndarray:
    """The mode dispatch behind :func:`to_rgb` (may raise anything PIL raises)."""
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode in _GRAY16 or mode in ("I", "F"):
        gray = _gray_to_uint8(np.asarray(img), mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in _ALPHA or (mode == "P" and _has_transparency(img))
    if mode == "La":
        img = img.convert("LA")
    if has_alpha:  # alpha dropped: keep the colour under it (== PIL's convert("RGB"))
        return np.array(img.convert("RGBA"), dtype=np.uint8)[:, :, :3]
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _has_transparency(img: Image.Image) -> bool:
    """Whether a palette image carries transparency (``tRNS``, GIF transparency index, RGBA palette)."""
    flag = getattr(img, "has_transparency_data", None)
    if isinstance(flag, bool):
        return flag
    return "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")


def to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an ``H x W x 3`` uint8 RGB array (C-contiguous, writable).

    Alpha is dropped; 16-bit gray is scaled by bit depth; ``I``/``F`` as in the module docs; ``1``,
    ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` go through PIL's own conversion. Loads the image
    if needed; any failure (truncated data, unknown mode) raises :class:`BadImage`.
    """
    if not isinstance(img, Image.Image):
        raise _bad("bad_input", f"to_rgb expects a PIL image, got {type(img).__name__}")
    try:
        arr = _mode_to_rgb(img)
    except BadImage:
        raise
    except Exception as exc:  # noqa: BLE001 - every PIL failure becomes a BadImage
        raise _classify(exc, f"{img.mode} image") from exc
    width, height = img.size
    if arr.dtype != np.uint8 or arr.shape != (height, width, 3):
        raise _bad("corrupt", f"{img.mode} image converted to an unexpected array {arr.dtype}{arr.shape}")
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------------------------- decoders
def _open_checked(data: bytes, limits: DecodeLimits) -> tuple[Image.Image, str]:
    """The checks before any pixel is decoded, and the lazily opened image (header read only)."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise _bad("bad_input", f"expected image bytes, got {type(data).__name__}")
    if not data:
        raise _bad("empty", "image data is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise _bad("too_large", f"image data is {len(data):,} bytes; the limit is {limits.max_bytes:,}")
    kind, name = _sniff(data)
    if kind == "other":
        raise _bad("not_image", f"input is not an image: it looks like {name}")
    fmt = name if kind == "image" else ""
    if fmt and fmt not in limits.formats:
        raise _bad("unsupported_format", f"{fmt} images are not accepted (allowed: {', '.join(limits.formats)})")
    if fmt:
        _precheck(fmt, data)
    return _open(data, limits, fmt), fmt


def image_size(data: bytes, limits: DecodeLimits = _DEFAULT_LIMITS) -> tuple[int, int]:
    """``(width, height)`` declared by the image header, checked against ``limits``, without decoding a pixel
    (PIL reads the size lazily). A server uses it to budget decoded memory before decoding; ``BadImage`` as
    :func:`decode_bytes` would raise it for a bad header."""
    img, _ = _open_checked(data, limits)
    with img:
        _check_format(img, limits)
        _check_size(*img.size, limits)
        return img.size


def decode_bytes(data: bytes, limits: DecodeLimits = _DEFAULT_LIMITS, *, min_size: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to ``H x W x 3`` uint8 RGB, or raise :class:`BadImage`.

    ``min_size``: the short side the caller needs (a model's input size). A JPEG much larger than that is
    decoded by libjpeg at 1/2, 1/4 or 1/8 scale (:func:`draft_scale`: the largest that keeps the short side
    >= ``min_size``), after every header check; the caller's resize then never upsamples. Other formats,
    progressive JPEGs (see :func:`_draft`) and None (the default) decode at full size."""
    min_size = _check_min_size(min_size)
    img, fmt = _open_checked(data, limits)
    with img:
        what = f"{_canonical_format(img.format) or fmt or 'image'} data"
        rgb = _decode_pil(img, limits, what, min_size)
        if _canonical_format(img.format) == "JPEG":
            _check_jpeg_complete(bytes(data), img, rgb, what, min_size)
        return rgb


def _strip_data_url(raw: bytes) -> bytes:
    """Remove a ``data:[<mime>][;params];base64,`` prefix if present; reject non-base64/non-image URLs."""
    if raw[:5].lower() != b"data:":
        return raw
    comma = raw.find(b",", 0, 512)
    if comma < 0:
        raise _bad("bad_base64", "data URL has no ',' separating its header from the payload")
    params = [p.strip().lower() for p in raw[5:comma].split(b";")]
    if b"base64" not in params[1:]:
        raise _bad("bad_base64", "data URL is not base64-encoded (missing ';base64')")
    mime = params[0]
    if mime and not (mime.startswith(b"image/") or mime == b"application/octet-stream"):
        raise _bad("not_image", f"data URL declares media type {mime.decode('ascii', 'replace')!r}, not an image")
    return raw[comma + 1:]


_WHITESPACE: Final = b" \t\r\n\f\v"


def decode_base64(text: str | bytes, limits: DecodeLimits = _DEFAULT_LIMITS, *, min_size: int | None = None) -> np.ndarray:
    """Decode base64 (optionally a ``data:image/...;base64,`` URL) to ``H x W x 3`` uint8 RGB.

    Whitespace and newlines are ignored and missing ``=`` padding is tolerated; any other character
    outside the standard (or, used consistently, the URL-safe) alphabet is an error. The length is
    checked before decoding. ``min_size`` as in :func:`decode_bytes`.
    """
    min_size = _check_min_size(min_size)
    return decode_bytes(base64_bytes(text, limits), limits, min_size=min_size)


def base64_bytes(text: str | bytes, limits: DecodeLimits = _DEFAULT_LIMITS) -> bytes:
    """The encoded image inside base64 text (the checks of :func:`decode_base64`, without decoding the image)."""
    if isinstance(text, str):
        if not text.isascii():
            raise _bad("bad_base64", "base64 text contains non-ASCII characters")
        raw = text.encode("ascii")
    elif isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if not raw.isascii():
            raise _bad("bad_base64", "base64 text contains non-ASCII bytes")
    else:
        raise _bad("bad_input", f"expected base64 str or bytes, got {type(text).__name__}")
    budget = limits.max_base64_chars
    if len(raw) > budget + budget // 8 + 1024:  # generous room for line breaks and a data-URL prefix
        raise _bad("too_large", f"base64 text is {len(raw):,} characters; the limit is about {budget:,}")
    payload = _strip_data_url(raw.lstrip(_WHITESPACE)).translate(None, _WHITESPACE)
    if not payload:
        raise _bad("empty", "base64 text is empty")
    if len(payload) > budget:
        raise _bad("too_large", f"base64 payload is {len(payload):,} characters; the limit is {budget:,}")
    return _b64decode_strict(payload)


def _b64decode_strict(payload: bytes) -> bytes:
    """Decode whitespace-free base64 with strict alphabet validation and tolerant padding."""
    urlsafe = b"-" in payload or b"_" in payload
    if urlsafe:
        if b"+" in payload or b"/" in payload:
            raise _bad("bad_base64", "base64 text mixes the standard and URL-safe alphabets")
        payload = payload.translate(bytes.maketrans(b"-_", b"+/"))
    if len(payload) % 4 == 1:
        raise _bad("bad_base64", "base64 text has an impossible length (one character too many or too few)")
    payload += b"=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad("bad_base64", f"invalid base64 ({_short(exc)})") from exc


def decode_path(path: str | os.PathLike, limits: DecodeLimits = _DEFAULT_LIMITS, *, min_size: int | None = None) -> np.ndarray:
    """Read and decode an image file. Non-regular files (directories, FIFOs, devices) are refused and
    the size is checked with ``fstat`` before anything is read. ``min_size`` as in :func:`decode_bytes`."""
    min_size = _check_min_size(min_size)
    try:
        name = os.fspath(path)
    except TypeError as exc:
        raise _bad("bad_input", f"expected a path, got {type(path).__name__}") from exc
    shown = os.fsdecode(name)[:300]
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise _bad("not_found", f"no such file: {shown!r}") from exc
    except IsADirectoryError as exc:
        raise _bad("not_found", f"{shown!r} is a directory, not an image file") from exc
    except PermissionError as exc:
        raise _bad("unreadable", f"permission denied reading {shown!r}") from exc
    except (OSError, ValueError) as exc:  # name too long, embedded NUL, ...
        raise _bad("not_found", f"cannot open {shown!r} ({_short(exc)})") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise _bad("not_found", f"{shown!r} is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise _bad("not_found", f"{shown!r} is not a regular file")
        if info.st_size > limits.max_bytes:
            raise _bad("too_large", f"{shown!r} is {info.st_size:,} bytes; the limit is {limits.max_bytes:,}")
        data = _read_at_most(fd, limits.max_bytes + 1)
    except OSError as exc:
        raise _bad("unreadable", f"cannot read {shown!r} ({_short(exc)})") from exc
    finally:
        os.close(fd)
    if len(data) > limits.max_bytes:
        raise _bad("too_large", f"{shown!r} grew past {limits.max_bytes:,} bytes while being read")
    return decode_bytes(data, limits, min_size=min_size)


def _read_at_most(fd: int, limit: int) -> bytes:
    """Read from a file descriptor until EOF or ``limit`` bytes."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _from_array(arr: np.ndarray, limits: DecodeLimits) -> np.ndarray:
    """Validate a decoded array: HxWx3 uint8 passes through (no copy when C-contiguous)."""
    if arr.dtype != np.uint8:
        raise _bad("bad_array", f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
        height, width = arr.shape[:2]
    else:
        raise _bad("bad_array", f"image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
    _check_size(width, height, limits)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3] if channels == 4 else arr)


def _is_existing_path(text: str) -> bool:
    """Whether a (short) string names something on disk; never raises."""
    if len(text) > _MAX_PATH_CHARS or "\x00" in text:
        return False
    try:
        return os.path.exists(text)
    except (OSError, ValueError):
        return False


def decode_any(src: ImageSource, limits: DecodeLimits = _DEFAULT_LIMITS, *, min_size: int | None = None) -> np.ndarray:
    """Decode whatever a caller has: bytes, a path, base64 text, an ndarray or a PIL image.

    - bytes-like -> :func:`decode_bytes`; ``os.PathLike`` -> :func:`decode_path`;
    - ``str``: an existing path -> :func:`decode_path`; a string that cannot be base64 but looks like a
      path (has ``.``, ``\\`` or ``~``) -> ``BadImage("not_found")``; otherwise :func:`decode_base64`.
      Servers that receive strings from clients should call :func:`decode_base64` directly.
    - ``np.ndarray``: uint8 HxW (gray, stacked), HxWx1, HxWx3 (returned as-is when C-contiguous) or
      HxWx4 (alpha dropped), checked against the pixel limits; anything else -> ``BadImage("bad_array")``.
    - PIL image: its current frame, with the same checks, orientation and conversion as decoded files.

    ``min_size`` (as in :func:`decode_bytes`) reduces encoded JPEGs (bytes, paths, base64, a not yet loaded PIL
    JPEG); arrays are returned at their size.
    """
    min_size = _check_min_size(min_size)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(src), limits, min_size=min_size)
    if isinstance(src, np.ndarray):
        return _from_array(src, limits)
    if isinstance(src, Image.Image):
        return _decode_pil(src, limits, f"{src.format or src.mode} image", min_size)
    if isinstance(src, str):
        stripped = src.strip()
        if stripped[:5].lower() != "data:":
            if _is_existing_path(src):
                return decode_path(src, limits, min_size=min_size)
            if len(stripped) <= _MAX_PATH_CHARS and _PATHLIKE_CHARS & set(stripped):
                raise _bad("not_found", f"no such file: {stripped[:300]!r}")
        return decode_base64(src, limits, min_size=min_size)
    if isinstance(src, os.PathLike):
        return decode_path(src, limits, min_size=min_size)
    raise _bad("bad_input", f"cannot decode an image from {type(src).__name__}")


# --------------------------------------------------------------------------------------------- encoders
def encode_jpeg(rgb: np.ndarray, quality: int = 75) -> bytes:
    """Encode an HxWx3 uint8 array as JPEG with PIL defaults (as a validator builds its requests)."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in 1..100, got {quality!r}")
    if not isinstance(rgb, np.ndarray):
        raise _bad("bad_input", f"encode_jpeg expects an ndarray, got {type(rgb).__name__}")
    arr = _from_array(rgb, _JPEG_LIMITS)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_base64_jpeg(rgb: np.ndarray, quality: int = 75) -> str:
    """Base64 (standard alphabet, no line breaks) of :func:`encode_jpeg`."""
    return base64.b64encode(encode_jpeg(rgb, quality)).decode("ascii")
