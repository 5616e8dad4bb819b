"""Tests for roadcascade.io.images: a hostile-input corpus, every pixel mode, EXIF, limits, properties."""

from __future__ import annotations

import base64
import gzip
import io
import os
import pickle
import struct
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from helpers import b64, encode, jpeg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile, ImageOps

from roadcascade.io import images
from roadcascade.io.images import (
    REASONS,
    BadImage,
    DecodeLimits,
    decode_any,
    decode_base64,
    decode_bytes,
    decode_path,
    encode_base64_jpeg,
    encode_jpeg,
    to_rgb,
)

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=120)


# --------------------------------------------------------------------------------------------- builders
def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) declares ``width x height`` RGB but carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the baseline SOF0 dimensions of ``jpeg``."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


def tiff_tiled(width: int, height: int, tile: int) -> bytes:
    """A little-endian gray TIFF with one ``tile x tile`` tile declared and 256 bytes of data."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1),
               (322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, 256)]
    data_at = 8 + 2 + 12 * len(entries) + 4
    entries[8] = (324, 4, data_at)
    body = b"".join(struct.pack("<HHII", tag, typ, 1, val) if typ == 4 else struct.pack("<HHIHH", tag, typ, 1, val, 0)
                    for tag, typ, val in entries)
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)) + body + b"\x00" * 4 + bytes(256)


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """Insert an APP1 segment (EXIF lives there) right after SOI."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


RNG = np.random.default_rng(1234)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
BASE = Image.fromarray(RGB)
JPEG = encode(BASE, "JPEG", quality=90)
JPEG_PROGRESSIVE = encode(BASE, "JPEG", progressive=True)
PNG = encode(BASE, "PNG")
GIF = encode(BASE, "GIF")
WEBP = encode(BASE, "WEBP")
BMP = encode(BASE, "BMP")
TIFF = encode(BASE, "TIFF")
SMALL = DecodeLimits(max_bytes=1000)


def jpeg_segment_bomb(count: int) -> bytes:
    """The test JPEG with ``count`` empty COM segments before its first scan."""
    return JPEG[:2] + b"\xff\xfe\x00\x02" * count + JPEG[2:]


def png_chunk_bomb(count: int) -> bytes:
    """The test PNG with ``count`` tiny (valid-CRC) ancillary chunks after IHDR."""
    return PNG[:33] + png_chunk(b"tEXt", b"k\x00v") * count + PNG[33:]


def gif_block_bomb(count: int) -> bytes:
    """The test GIF with ``count`` empty comment extensions before its first frame."""
    flags = GIF[10]
    start = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return GIF[:start] + b"!\xfe\x00" * count + GIF[start:]


def cut(data: bytes, fraction: float) -> bytes:
    """The first ``fraction`` of ``data`` (at least one byte)."""
    return data[: max(1, int(len(data) * fraction))]


# --------------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class Case:
    """One malformed input: ``call(tmp_path)`` must raise BadImage with a reason in ``reasons``."""

    name: str
    call: Callable[[Path], object]
    reasons: frozenset[str]
    status: int


def case(name: str, call: Callable[[Path], object], reasons: str, status: int) -> Case:
    return Case(name, call, frozenset(reasons.split()), status)


def raw(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Callable[[Path], object]:
    return lambda _tmp: decode_bytes(data, limits)


def file_with(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Callable[[Path], object]:
    def call(tmp: Path) -> object:
        target = tmp / "input.bin"
        target.write_bytes(data)
        return decode_path(target, limits)
    return call


def mkfifo_then_decode(tmp: Path) -> object:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp / "pipe.jpg"
    os.mkfifo(fifo)
    return decode_path(fifo)


TRUNC = "truncated corrupt"
CORPUS: list[Case] = [
    # empty / tiny / random
    case("zero_bytes", raw(b""), "empty", 400),
    case("one_byte_nul", raw(b"\x00"), "not_image", 415),
    case("one_byte_ff", raw(b"\xff"), "not_image", 415),
    case("random_bytes", raw(RNG.bytes(2048)), "not_image", 415),
    case("all_zero_4k", raw(bytes(4096)), "not_image", 415),
    # not images
    case("plain_text", raw(b"hello, this is not an image\n"), "not_image", 415),
    case("text_starting_BM", raw(b"BMW makes cars, not bitmaps"), "not_image", 415),
    case("html", raw(b"<!DOCTYPE html><html><body>hi</body></html>"), "not_image", 415),
    case("json", raw(b'{"image": "nope", "n": [1, 2, 3]}'), "not_image", 415),
    case("pdf_header", raw(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"), "not_image", 415),
    case("zip_header", raw(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(40)), "not_image", 415),
    case("gzip", raw(gzip.compress(b"hello")), "not_image", 415),
    case("mp4", raw(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"), "not_image", 415),
    # images in formats we do not accept
    case("svg", raw(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'), "unsupported_format", 415),
    case("svg_xml_prolog", raw(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>'),
         "unsupported_format", 415),
    case("heic", raw(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"), "unsupported_format", 415),
    case("ico", raw(encode(BASE, "ICO")), "unsupported_format", 415),
    case("png_not_in_formats", raw(PNG, DecodeLimits(formats=("JPEG",))), "unsupported_format", 415),
    # header only
    case("gif_header_only", raw(b"GIF89a"), TRUNC, 400),
    case("png_signature_only", raw(PNG[:8]), TRUNC, 400),
    case("jpeg_soi_only", raw(b"\xff\xd8\xff"), TRUNC, 400),
    case("bmp_header_only", raw(b"BM" + bytes(12)), TRUNC, 400),
    case("webp_riff_only", raw(b"RIFF\x10\x00\x00\x00WEBPVP8 "), TRUNC, 400),
    case("tiff_header_only", raw(b"II*\x00\x08\x00\x00\x00"), TRUNC, 400),
    # truncated at several cut points
    *[case(f"jpeg_cut_{int(f * 100)}pct", raw(cut(JPEG, f)), TRUNC, 400) for f in (0.05, 0.2, 0.5, 0.9)],
    case("jpeg_minus_one_byte", raw(JPEG[:-1]), TRUNC, 400),
    case("jpeg_minus_ten_bytes", raw(JPEG[:-10]), TRUNC, 400),
    case("progressive_jpeg_cut_50pct", raw(cut(JPEG_PROGRESSIVE, 0.5)), TRUNC, 400),
    *[case(f"png_cut_{int(f * 100)}pct", raw(cut(PNG, f)), TRUNC, 400) for f in (0.1, 0.5, 0.9)],
    case("gif_cut_50pct", raw(cut(GIF, 0.5)), TRUNC, 400),
    case("webp_cut_50pct", raw(cut(WEBP, 0.5)), TRUNC, 400),
    case("bmp_cut_50pct", raw(cut(BMP, 0.5)), TRUNC, 400),
    case("tiff_cut_50pct", raw(cut(TIFF, 0.5)), TRUNC, 400),
    # flipped header bytes
    case("png_signature_flipped", raw(bytes([PNG[0] ^ 0x01]) + PNG[1:]), "not_image", 415),
    case("png_ihdr_flipped_bad_crc", raw(PNG[:16] + bytes([PNG[16] ^ 0xFF]) + PNG[17:]), "corrupt", 400),
    case("jpeg_marker_flipped", raw(JPEG[:3] + bytes([JPEG[3] ^ 0xFF]) + JPEG[4:]), "corrupt", 400),
    case("jpeg_dqt_destroyed", raw(JPEG.replace(b"\xff\xdb", b"\xff\x00", 1)), "corrupt", 400),
    # dimensions and bombs
    case("png_100000x100000", raw(png_with_header(100_000, 100_000)), "too_many_pixels decompression_bomb", 413),
    case("png_7000x7000_over_max_pixels", raw(png_with_header(7000, 7000)), "too_many_pixels", 413),
    case("png_zero_width", raw(png_with_header(0, 10)), "bad_dimensions corrupt", 400),
    case("png_1x30000_beyond_max_side", raw(png_with_header(1, 30_000)), "bad_dimensions", 400),
    case("jpeg_sof_65000x65000", raw(jpeg_with_size(JPEG, 65_000, 65_000)), "too_many_pixels decompression_bomb", 413),
    case("jpeg_sof_zero_height", raw(jpeg_with_size(JPEG, 32, 0)), "bad_dimensions corrupt", 400),
    case("jpeg_scan_bomb", raw(JPEG[:2] + b"\xff\xfe" + struct.pack(">H", 2 + 2 * 300) + b"\xff\xda" * 300 + JPEG[2:]),
         "decompression_bomb", 413),
    case("tiff_huge_tiles", raw(tiff_tiled(16, 16, 32_768)), "decompression_bomb", 413),
    case("jpeg_4097_header_segments", raw(jpeg_segment_bomb(4097)), "decompression_bomb", 413),
    case("png_50001_chunks", raw(png_chunk_bomb(50_001)), "decompression_bomb", 413),
    case("gif_100001_extension_blocks", raw(gif_block_bomb(100_001)), "decompression_bomb", 413),
    case("oversize_bytes", raw(PNG, SMALL), "too_large", 413),
    case("str_to_decode_bytes", lambda _tmp: decode_bytes("not bytes"), "bad_input", 400),  # type: ignore[arg-type]
    # base64
    case("base64_bad_alphabet", lambda _tmp: decode_base64("!!!!****"), "bad_base64", 400),
    case("base64_non_ascii", lambda _tmp: decode_base64("aGVsbG8gd29ybGQ=é"), "bad_base64", 400),
    case("base64_non_ascii_bytes", lambda _tmp: decode_base64(b"aGVs\xffbG8="), "bad_base64", 400),
    case("base64_embedded_nul", lambda _tmp: decode_base64("aGVs\x00bG8="), "bad_base64", 400),
    case("base64_bad_length", lambda _tmp: decode_base64("abcde"), "bad_base64", 400),
    case("base64_mixed_alphabets", lambda _tmp: decode_base64("ab+_cd/-"), "bad_base64", 400),
    case("base64_padding_in_middle", lambda _tmp: decode_base64("ab==cdef"), "bad_base64", 400),
    case("base64_blank", lambda _tmp: decode_base64(" \n\t "), "empty", 400),
    case("base64_of_text", lambda _tmp: decode_base64(b64(b"just some text, not pixels")), "not_image", 415),
    case("base64_of_truncated_jpeg", lambda _tmp: decode_base64(b64(JPEG[:-10])), TRUNC, 400),
    case("data_url_garbage", lambda _tmp: decode_base64("data:image/png;base64,@@@not base64@@@"), "bad_base64", 400),
    case("data_url_not_base64", lambda _tmp: decode_base64("data:image/png,%89PNG"), "bad_base64", 400),
    case("data_url_no_comma", lambda _tmp: decode_base64("data:image/png;base64"), "bad_base64", 400),
    case("data_url_html", lambda _tmp: decode_base64("data:text/html;base64," + b64(b"<html></html>")),
         "not_image", 415),
    case("base64_huge_vs_limit", lambda _tmp: decode_base64("A" * 50_000, SMALL), "too_large", 413),
    case("base64_payload_just_over_limit", lambda _tmp: decode_base64(b64(bytes(1003)), SMALL), "too_large", 413),
    case("base64_wrong_type", lambda _tmp: decode_base64(12345), "bad_input", 400),  # type: ignore[arg-type]
    # arrays and other objects
    case("array_float32", lambda _tmp: decode_any(np.zeros((4, 4, 3), np.float32)), "bad_array", 400),
    case("array_uint16", lambda _tmp: decode_any(np.zeros((4, 4, 3), np.uint16)), "bad_array", 400),
    case("array_bool", lambda _tmp: decode_any(np.zeros((4, 4, 3), bool)), "bad_array", 400),
    case("array_two_channels", lambda _tmp: decode_any(np.zeros((4, 4, 2), np.uint8)), "bad_array", 400),
    case("array_1d", lambda _tmp: decode_any(np.zeros(12, np.uint8)), "bad_array", 400),
    case("array_4d", lambda _tmp: decode_any(np.zeros((1, 4, 4, 3), np.uint8)), "bad_array", 400),
    case("array_zero_height", lambda _tmp: decode_any(np.zeros((0, 4, 3), np.uint8)), "bad_dimensions", 400),
    case("array_too_many_pixels",
         lambda _tmp: decode_any(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (8000, 8000, 3))),
         "too_many_pixels", 413),
    case("pil_lazy_too_many_pixels", lambda _tmp: decode_any(Image.open(io.BytesIO(png_with_header(7000, 7000)))),
         "too_many_pixels", 413),
    case("any_int", lambda _tmp: decode_any(123), "bad_input", 400),  # type: ignore[arg-type]
    case("any_none", lambda _tmp: decode_any(None), "bad_input", 400),  # type: ignore[arg-type]
    case("to_rgb_not_pil", lambda _tmp: to_rgb(RGB), "bad_input", 400),  # type: ignore[arg-type]
    # paths
    case("missing_path", lambda tmp: decode_path(tmp / "nope.jpg"), "not_found", 400),
    case("missing_parent", lambda tmp: decode_path(tmp / "nope" / "x.jpg"), "not_found", 400),
    case("directory_path", lambda tmp: decode_path(tmp), "not_found", 400),
    case("path_with_nul", lambda _tmp: decode_path("bad\x00name.jpg"), "not_found", 400),
    case("path_wrong_type", lambda _tmp: decode_path(3.5), "bad_input", 400),  # type: ignore[arg-type]
    case("fifo_path_does_not_hang", mkfifo_then_decode, "not_found", 400),
    case("char_device", lambda _tmp: decode_path("/dev/zero") if os.path.exists("/dev/zero") else pytest.skip(),
         "not_found", 400),
    case("empty_file", file_with(b""), "empty", 400),
    case("text_file", file_with(b"name,label\nimg1,1\n"), "not_image", 415),
    case("truncated_file", file_with(PNG[:-30]), TRUNC, 400),
    case("oversize_file", file_with(PNG, SMALL), "too_large", 413),
    case("any_str_missing_path", lambda tmp: decode_any(str(tmp / "missing.jpg")), "not_found", 400),
    case("any_str_directory", lambda tmp: decode_any(str(tmp)), "not_found", 400),
    case("any_pathlib_missing", lambda tmp: decode_any(tmp / "missing.png"), "not_found", 400),
]


def test_corpus_is_large_and_distinct() -> None:
    names = [c.name for c in CORPUS]
    assert len(names) == len(set(names))
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("bad", CORPUS, ids=lambda c: c.name)
def test_malformed_input_raises_bad_image(bad: Case, tmp_path: Path) -> None:
    with pytest.raises(BadImage) as info:  # any other exception type fails the test
        bad.call(tmp_path)
    err = info.value
    assert err.reason in bad.reasons, f"{err!r}"
    assert err.http_status == bad.status == REASONS[err.reason]
    assert isinstance(err, ValueError)
    assert str(err) == err.message and len(err.message) > 10


def test_size_is_checked_before_reading_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(PNG)

    def forbidden(*_: object) -> bytes:
        raise AssertionError("file read before its size was checked")

    monkeypatch.setattr(images, "_read_at_most", forbidden)
    with pytest.raises(BadImage) as info:
        decode_path(big, SMALL)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize("bomb", [
    jpeg_segment_bomb(1_200_000), png_chunk_bomb(400_000), gif_block_bomb(1_500_000), png_with_header(65_535, 65_535),
    JPEG[:2] + b"\xff\xfe" + struct.pack(">H", 2 + 2 * 5000) + b"\xff\xda" * 5000 + JPEG[2:],
], ids=["jpeg_segments", "png_chunks", "gif_blocks", "png_header", "jpeg_scans"])
def test_megabyte_bombs_are_refused_quickly(bomb: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(BadImage) as info:
        decode_bytes(bomb)
    assert info.value.http_status == 413
    assert time.perf_counter() - start < 1.0  # PIL alone spends seconds on the first three


def test_structure_caps_leave_room_for_real_files() -> None:
    assert np.array_equal(decode_bytes(jpeg_segment_bomb(4000)), decode_bytes(JPEG))
    assert np.array_equal(decode_bytes(png_chunk_bomb(20_000)), RGB)
    assert np.array_equal(decode_bytes(gif_block_bomb(50_000)), decode_bytes(GIF))


def test_bomb_warning_zone_becomes_error_without_leaking_state() -> None:
    if Image.MAX_IMAGE_PIXELS is None:
        pytest.skip("PIL bomb guard disabled by another test")
    side = int((1.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)  # between PIL's warning and error thresholds
    data = png_with_header(side, side)
    roomy = DecodeLimits(max_pixels=10**12, max_side=60_000)
    filters_before = list(warnings.filters)
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(BadImage) as info:
            decode_bytes(data, roomy)
    assert info.value.reason == "decompression_bomb" and info.value.http_status == 413
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters_before
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_concurrent_decoding_keeps_global_state() -> None:
    filters_before = list(warnings.filters)
    bomb = png_with_header(int((1.5 * (Image.MAX_IMAGE_PIXELS or 10**8)) ** 0.5), 10_000)
    failures: list[BaseException] = []

    def work() -> None:
        for _ in range(15):
            for data in (bomb, PNG, JPEG[:-10]):
                try:
                    decode_bytes(data)
                except BadImage:
                    pass
                except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                    failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert warnings.filters == filters_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------------------------- modes
def gray16(width: int = 32, height: int = 24) -> np.ndarray:
    return np.linspace(0, 65535, width * height).astype(np.uint16).reshape(height, width)


def image_in_mode(mode: str) -> Image.Image:
    """A 32x24 PIL image whose mode is exactly ``mode``."""
    if mode == "I;16":
        return Image.fromarray(gray16())
    if mode == "I;16B":
        return Image.frombytes("I;16B", (32, 24), gray16().astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(gray16().astype(np.int32))
    if mode == "F":
        return Image.fromarray(gray16().astype(np.float32) / 65535.0)
    if mode == "P_transparent":
        img = BASE.convert("P")
        img.info["transparency"] = 0
        return img
    if mode == "PA":
        return BASE.convert("P").convert("PA")
    if mode == "La":
        return BASE.convert("LA").convert("La")
    if mode == "RGBa":
        return BASE.convert("RGBA").convert("RGBa")
    return BASE.convert(mode)


# mode -> a container that stores it as is (None: in-memory only)
MODES: dict[str, str | None] = {
    "1": "PNG", "L": "PNG", "LA": "PNG", "P": "PNG", "P_transparent": "PNG", "PA": "TIFF", "RGB": "PNG",
    "RGBA": "PNG", "CMYK": "JPEG", "YCbCr": "TIFF", "I;16": "PNG", "I;16B": "TIFF", "I": "TIFF", "F": "TIFF",
    "La": None, "RGBa": None, "RGBX": None, "LAB": "TIFF", "HSV": None,
}


def assert_rgb(out: np.ndarray, height: int, width: int) -> None:
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8 and out.shape == (height, width, 3)
    assert out.flags.c_contiguous and out.flags.writeable


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_decodes_to_rgb(mode: str) -> None:
    img = image_in_mode(mode)
    assert_rgb(to_rgb(img), 24, 32)
    assert_rgb(decode_any(img), 24, 32)
    container = MODES[mode]
    if container is not None:
        data = encode(img, container)
        with Image.open(io.BytesIO(data)) as reopened:
            assert reopened.mode == mode.split("_")[0]  # the file really holds that mode
        assert_rgb(decode_bytes(data), 24, 32)


def test_rgb_png_is_exact_and_alpha_is_dropped() -> None:
    assert np.array_equal(decode_bytes(PNG), RGB)
    rgba = np.dstack([RGB, np.zeros(RGB.shape[:2], np.uint8)])  # fully transparent
    assert np.array_equal(decode_bytes(encode(Image.fromarray(rgba), "PNG")), RGB)
    assert np.array_equal(decode_any(rgba), RGB)


def test_palette_transparency_keeps_palette_colours() -> None:
    pal = BASE.convert("P")
    pal.info["transparency"] = 3
    expected = np.asarray(pal.convert("RGB"))
    assert np.array_equal(decode_bytes(encode(pal, "PNG")), expected)
    assert np.array_equal(decode_bytes(encode(pal, "GIF")), expected)


@pytest.mark.parametrize("mode, container", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_16bit_gradient_spans_full_8bit_range(mode: str, container: str) -> None:
    ramp = np.tile(np.linspace(0, 65535, 512).round().astype(np.uint16), (4, 1))
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (512, 4), ramp.astype(">u2").tobytes())
    else:
        img = Image.fromarray(ramp.astype(np.int32) if mode == "I" else ramp)
    out = decode_bytes(encode(img, container))
    row = out[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row.astype(int)) >= 0)
    assert len(np.unique(row)) == 256  # not clipped: every 8-bit level is used
    assert np.array_equal(out[..., 0], out[..., 2])


def test_wide_int_and_float_images_are_stretched_not_clipped() -> None:
    signed = Image.fromarray(np.linspace(-1e6, 1e6, 256).astype(np.int32).reshape(1, 256))
    out = to_rgb(signed)[0, :, 0]
    assert out[0] == 0 and out[-1] == 255 and np.all(np.diff(out.astype(int)) >= 0)
    floats = np.linspace(0, 1, 256, dtype=np.float32).reshape(1, 256)
    floats[0, 10] = np.nan
    floats[0, 20] = np.inf
    out = to_rgb(Image.fromarray(floats))[0, :, 0]
    assert out[0] == 0 and out[-1] == 255
    assert to_rgb(Image.fromarray(np.full((3, 3), 7.0e9, np.float32))).shape == (3, 3, 3)


def test_bilevel_maps_to_black_and_white() -> None:
    out = decode_bytes(encode(BASE.convert("1"), "PNG"))
    assert set(np.unique(out)) <= {0, 255}


def test_multi_frame_gif_and_tiff_use_first_frame() -> None:
    red, blue = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))
    for fmt in ("GIF", "TIFF"):
        data = encode(red, fmt, save_all=True, append_images=[blue])
        with Image.open(io.BytesIO(data)) as img:
            assert getattr(img, "n_frames", 1) == 2
        out = decode_bytes(data)
        assert out.shape == (6, 8, 3) and tuple(out[3, 4]) == (255, 0, 0)


# --------------------------------------------------------------------------------------------- EXIF
def marked_image() -> Image.Image:
    """40 wide x 20 high, blue, with a red 8x8 block in the stored top-left corner."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    return img


def exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_exif_orientation_6_rotates_jpeg() -> None:
    data = encode(marked_image(), "JPEG", quality=95, exif=exif_with_orientation(6))
    out = decode_bytes(data)
    assert out.shape == (40, 20, 3)  # width and height swapped
    top_right = out[1:7, 13:19].reshape(-1, 3).mean(axis=0)  # rotated 90 degrees clockwise
    assert top_right[0] > 200 and top_right[2] < 60
    assert out[1:7, 1:7, 2].mean() > 200  # the old corner is blue now


@pytest.mark.parametrize("orientation", range(0, 10))
def test_every_orientation_matches_pil_exif_transpose(orientation: int) -> None:
    data = encode(marked_image(), "PNG", exif=exif_with_orientation(orientation))
    with Image.open(io.BytesIO(data)) as img:
        expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    assert np.array_equal(decode_bytes(data), expected)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("payload", [
    b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x01" * 12,  # IFD offset far past the end
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08",  # IFD with no entries at all
    b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x05\x00\x01\x00\x00\x00\xff\x00\x00\x00",  # RATIONAL tag
    b"Exif\x00\x00garbage garbage garbage",
], ids=["offset_past_end", "empty_ifd", "orientation_rational", "garbage"])
def test_broken_exif_never_crashes(payload: bytes) -> None:
    data = with_app1(encode(marked_image(), "JPEG", quality=95), payload)
    assert decode_bytes(data).shape == (20, 40, 3)


def test_exif_failure_falls_back_to_no_transpose() -> None:
    img = Image.open(io.BytesIO(encode(marked_image(), "PNG", exif=exif_with_orientation(6))))

    def broken_getexif() -> Image.Exif:
        raise SyntaxError("hostile EXIF")

    img.getexif = broken_getexif  # type: ignore[method-assign]
    assert decode_any(img).shape == (20, 40, 3)


# --------------------------------------------------------------------------------------------- API
def test_base64_variants_are_accepted() -> None:
    text = b64(PNG)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    urlsafe = base64.urlsafe_b64encode(PNG).decode("ascii").rstrip("=")
    for variant in (text, text.encode(), wrapped, "  " + wrapped + "\r\n", "data:image/png;base64," + text,
                    "DATA:image/png;charset=x;base64," + wrapped, "data:;base64," + text, urlsafe, text.rstrip("=")):
        assert np.array_equal(decode_base64(variant), RGB)


def test_decode_any_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "img.png"
    target.write_bytes(PNG)
    assert np.array_equal(decode_any(PNG), RGB)
    assert np.array_equal(decode_any(bytearray(PNG)), RGB)
    assert np.array_equal(decode_any(memoryview(PNG)), RGB)
    assert np.array_equal(decode_any(target), RGB)
    assert np.array_equal(decode_any(str(target)), RGB)
    assert np.array_equal(decode_any(b64(PNG)), RGB)
    assert np.array_equal(decode_any("data:image/png;base64," + b64(PNG)), RGB)
    assert np.array_equal(decode_any(BASE), RGB)
    assert decode_any(RGB) is RGB  # validated pass-through, no copy
    gray = RGB[..., 0]
    assert np.array_equal(decode_any(gray), np.dstack([gray] * 3))
    assert np.array_equal(decode_any(gray[..., None]), np.dstack([gray] * 3))
    strided = RGB[:, ::2]
    out = decode_any(strided)
    assert out.flags.c_contiguous and np.array_equal(out, strided)
    monkeypatch.chdir(tmp_path)
    assert np.array_equal(decode_any("img.png"), RGB)  # relative path


def test_formats_and_limits_are_respected() -> None:
    assert DecodeLimits(formats=("jpg", "tif", "png")).formats == ("JPEG", "TIFF", "PNG")
    assert decode_bytes(JPEG, DecodeLimits(formats=("jpeg",))).shape == (24, 32, 3)
    assert decode_bytes(PNG, DecodeLimits(max_bytes=len(PNG), max_pixels=24 * 32, max_side=32, min_side=24)).shape
    with pytest.raises(BadImage, match="at least 25"):
        decode_bytes(PNG, DecodeLimits(min_side=25))
    for bad in ({"max_bytes": 0}, {"max_pixels": -1}, {"min_side": 5, "max_side": 4}, {"formats": "JPEG"},
                {"formats": ()}, {"max_side": True}):
        with pytest.raises(ValueError):
            DecodeLimits(**bad)  # type: ignore[arg-type]


def test_bad_image_pickles_and_reasons_are_consistent() -> None:
    err = BadImage("too_large", "too big", 413)
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.message, back.http_status) == ("too_large", "too big", 413)
    assert BadImage("corrupt", "x").http_status == 400
    assert set(REASONS.values()) == {400, 413, 415}


def test_encode_jpeg_matches_pil_defaults() -> None:
    data = encode_jpeg(RGB)
    assert data == encode(BASE, "JPEG", quality=75)
    assert len(encode_jpeg(RGB, quality=20)) < len(encode_jpeg(RGB, quality=95))
    for quality in (0, 101, 7.5, True):
        with pytest.raises(ValueError):
            encode_jpeg(RGB, quality=quality)  # type: ignore[arg-type]
    with pytest.raises(BadImage):
        encode_jpeg(RGB.astype(np.float32))


# --------------------------------------------------------------------------------------------- properties
def decodes_or_bad_image(fn: Callable[..., np.ndarray], *args: object) -> None:
    """The contract: a valid HxWx3 uint8 array, or BadImage with a registered reason. Nothing else."""
    try:
        out = fn(*args)
    except BadImage as err:
        assert err.reason in REASONS and err.http_status == REASONS[err.reason]
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.c_contiguous
    assert out.shape[0] >= 1 and out.shape[1] >= 1


@FAST
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3))))
def test_png_round_trip_is_exact(rgb: np.ndarray) -> None:
    assert np.array_equal(decode_bytes(encode(Image.fromarray(rgb), "PNG")), rgb)


@FAST
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_decode_or_raise_bad_image(data: bytes) -> None:
    decodes_or_bad_image(decode_bytes, data)


SEEDS = [JPEG, JPEG_PROGRESSIVE, PNG, GIF, WEBP, BMP, TIFF, encode(BASE.convert("P"), "PNG"),
         encode(image_in_mode("I;16"), "PNG")]


@FAST
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.one_of(st.none(), st.floats(0.0, 1.0)))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_images_decode_or_raise_bad_image(seed: bytes, flips: list[tuple[int, int]],
                                                  keep: float | None) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    if keep is not None:
        data = data[: int(len(data) * keep)]
    decodes_or_bad_image(decode_bytes, bytes(data))


@FAST
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n -_:;,",
                         max_size=400)))
def test_arbitrary_base64_text_decodes_or_raises_bad_image(text: str | bytes) -> None:
    decodes_or_bad_image(decode_base64, text)


@settings(deadline=None, max_examples=40)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3))),
       st.integers(1, 100))
def test_base64_jpeg_round_trip_keeps_shape(rgb: np.ndarray, quality: int) -> None:
    text = encode_base64_jpeg(rgb, quality)
    assert text.isascii() and "\n" not in text
    assert decode_base64(text).shape == rgb.shape


# ------------------------------------------------------------------------------ strict JPEG completeness (#14)
def _jpeg_of(w: int, h: int, progressive: bool = False, noise: bool = True) -> bytes:
    rng = np.random.default_rng(w * h)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if noise else np.full((h, w, 3), (200, 30, 30), np.uint8)
    return jpeg(arr, 75, progressive=progressive)


@pytest.mark.parametrize("w,h,progressive,noise", [(4000, 4000, False, False), (4000, 4000, True, False),
                                                   (640, 480, False, True), (640, 480, True, True)])
def test_jpeg_scan_cut_before_its_rows_with_an_end_marker_is_truncated(w, h, progressive, noise):
    from roadcascade.io.images import DecodeLimits
    data = _jpeg_of(w, h, progressive, noise)
    limits = DecodeLimits(max_pixels=16_000_000, max_side=10_000)
    assert decode_bytes(data, limits).shape == (h, w, 3)
    cut = data[:631] + b"\xff\xd9"  # 633 bytes: header + a sliver of scan + EOI (PIL alone fills the rest with grey)
    with pytest.raises(BadImage) as e:
        decode_bytes(cut, limits)
    assert e.value.reason == "truncated" and e.value.http_status == 400


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("frac", [0.3, 0.5, 0.9, 0.99])
def test_jpeg_cut_partway_with_an_end_marker_is_truncated(progressive, frac):
    data = _jpeg_of(640, 480, progressive)
    assert decode_bytes(data).shape == (480, 640, 3)
    with pytest.raises(BadImage) as e:
        decode_bytes(data[: int(len(data) * frac)] + b"\xff\xd9")
    assert e.value.reason == "truncated"


def test_complete_jpegs_with_flat_grey_corners_still_decode():
    for v in (128, 127):
        arr = np.full((64, 80, 3), v, np.uint8)
        data = encode(Image.fromarray(arr), "JPEG", quality=75)
        out = decode_bytes(data)
        assert out.shape == (64, 80, 3) and abs(int(out[-1, -1, 0]) - v) <= 1


def test_load_truncated_images_is_switched_back_off():
    from PIL import ImageFile
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        data = _jpeg_of(64, 48)
        with pytest.raises(BadImage) as e:
            decode_bytes(data[: len(data) // 2])
        assert e.value.reason == "truncated" and ImageFile.LOAD_TRUNCATED_IMAGES is False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_image_size_reads_the_header_only():
    from roadcascade.io.images import image_size
    data = _jpeg_of(640, 480)
    assert image_size(data) == (640, 480)
    assert image_size(data[:700]) == (640, 480)  # no pixel decoded: a cut scan does not matter here
    with pytest.raises(BadImage):
        image_size(b"%PDF-1.4 hello")


def test_check_jpeg_scan_size_without_decoding():
    from roadcascade.io.images import check_jpeg_scan_size
    data = _jpeg_of(640, 480)
    check_jpeg_scan_size(data)
    with pytest.raises(BadImage) as e:
        check_jpeg_scan_size(data[:631] + b"\xff\xd9")
    assert e.value.reason == "truncated"
