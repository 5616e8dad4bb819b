"""Validator-faithful challenge augmentation (StreetVision / NATIX subnet 72, v2.0.4).

This reproduces, as seeded "views" of an image, what a v2.0.4 validator did to an image before
sending it to miners (see ``shared/docs/NATIX.md``):

* a level is drawn with ``level_probs`` (0.25 each);
* **L0**: RGB, centre-crop to a square, resize to ``size`` (PIL bilinear);
* **L1**: random rotation in ``[-rotation_deg, +rotation_deg]`` about the image centre (black corners,
  same canvas size), then a square RandomResizedCrop with ``crop_scale`` (torchvision semantics,
  including its central fallback), resized to ``size``; horizontal / vertical flips with p=0.5 only
  when ``as_released`` is False (the released code never applies them);
* **L2**: L1, then CS, CC and "JPEG" (down/up-scaling) each at a random severity in 0..1;
* **L3**: L1, then CS, CC, "JPEG", GNC and GB each at a random severity in 0..2 (0 = off);
* finally a JPEG encode/decode round trip at ``jpeg_quality`` (PIL, 75 = PIL's default, which is
  what a validator's ``image.save(buf, format="JPEG")`` produced).

The distortions follow the DeeperForensics-1.0 definitions used by the subnet:

* CS  -- keep factor ``p`` on the BT.601 chroma (Cb, Cr scaled by ``p``, luma kept); this is the
  same as blending each pixel toward its BT.601 luma grey: ``Y + p * (RGB - Y)``;
* CC  -- a plain multiply of every pixel value by ``c`` (it darkens; it is *not* a contrast change
  around the mean);
* JPEG -- not real JPEG: bilinear (cv2 ``INTER_LINEAR``, no antialiasing) downscale to
  ``floor(w / f) x floor(h / f)`` then bilinear upscale back;
* GNC -- i.i.d. Gaussian noise of variance ``v`` added to each of Y, Cb, Cr in studio-swing BT.601
  YCbCr normalised by 255 (Y in [16, 235] / 255, Cb/Cr in [16, 240] / 255), then back to RGB and
  clipped;
* GB  -- ``cv2.GaussianBlur`` with a ``k x k`` kernel and sigma ``k / 6``.

Images are ``H x W x 3`` ``uint8`` RGB numpy arrays throughout. Every function returns a new array.
Intermediate results are rounded to the nearest integer (the released code truncates; the
difference is at most one grey level per step).

Protocols (``ChallengeConfig.protocol``), the subnet's revisions of how a challenge image is made:

* ``"v2.0.4"`` (default) -- everything above;
* ``"letterbox"`` (2026-04-06) -- the centre crop (L0) and the RandomResizedCrop (L1+) are replaced by
  ``ResizeWithPadding``: keep the aspect ratio, resize the long side to ``size`` (PIL bilinear,
  antialiased) and pad centred to ``size x size`` with black. The L1 rotation (on the full image,
  before the letterbox), the flips and the L2/L3 distortions are as in v2.0.4; no crop is drawn;
* ``"native"`` (2026-05-03) -- no augmentation at all: the image at its native size, only the final
  JPEG round trip at ``jpeg_quality`` (PIL's default 75). Nothing is drawn from the generator.

Usage as an evaluation set: ``challenge_views(img, seed, key)`` (deterministic across calls,
processes and machines). Usage as a training augmentation: ``ChallengeAugment()(img)`` or
``challenge_view(img, np.random.default_rng())`` (a fresh generator per call, fork safe).
"""

from __future__ import annotations

import hashlib
import io
import math
import operator
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "SEVERITY",
    "KINDS",
    "LEVEL_DISTORTIONS",
    "distortion_param",
    "color_saturation",
    "color_contrast",
    "block_jpeg",
    "gaussian_noise_color",
    "gaussian_blur",
    "apply_distortion",
    "PROTOCOLS",
    "ChallengeConfig",
    "ViewInfo",
    "level0",
    "letterbox",
    "letterbox_geometry",
    "rotate_full",
    "random_resized_crop_params",
    "rotate_resized_crop",
    "jpeg_roundtrip",
    "encode_jpeg",
    "challenge_view",
    "challenge_views",
    "challenge_views_with_info",
    "view_rng",
    "ChallengeAugment",
    "grid_image",
]

# --------------------------------------------------------------------------------------------
# Severity table (NATIX.md; DeeperForensics-style, severity 1 = mildest .. 5 = strongest)
# --------------------------------------------------------------------------------------------

SEVERITY: dict[str, tuple] = {
    "CS": (0.4, 0.3, 0.2, 0.1, 0.0),  # saturation keep factor
    "CC": (0.85, 0.725, 0.6, 0.475, 0.35),  # multiplicative "contrast" factor
    "GNC": (0.001, 0.002, 0.005, 0.01, 0.05),  # noise variance (studio YCbCr / 255)
    "GB": (7, 9, 13, 17, 21),  # Gaussian kernel size, sigma = k / 6
    "JPEG": (2, 3, 4, 5, 6),  # down/up-scaling factor
}
KINDS: tuple[str, ...] = tuple(SEVERITY)

# Distortions applied at each level, in the released order, with the maximum severity drawn.
LEVEL_DISTORTIONS: dict[int, tuple[tuple[str, ...], int]] = {
    2: (("CS", "CC", "JPEG"), 1),
    3: (("CS", "CC", "JPEG", "GNC", "GB"), 2),
}

# BT.601 luma weights (the ones OpenCV's YCrCb conversion and the DeeperForensics code use).
_KR, _KB = 0.299, 0.114
_KG = 1.0 - _KR - _KB


def _check_kind(kind: str) -> str:
    if kind not in SEVERITY:
        raise ValueError(f"unknown distortion {kind!r}; expected one of {KINDS}")
    return kind


def _check_severity(severity, lo: int, hi: int) -> int:
    try:
        s = operator.index(severity)
    except TypeError:
        raise ValueError(f"severity must be an integer in {lo}..{hi}, got {severity!r}") from None
    if isinstance(severity, bool) or not lo <= s <= hi:
        raise ValueError(f"severity must be an integer in {lo}..{hi}, got {severity!r}")
    return s


def distortion_param(kind: str, severity: int) -> float | int:
    """The parameter of distortion ``kind`` at ``severity`` 1..5 (ValueError otherwise)."""
    _check_kind(kind)
    s = _check_severity(severity, 1, 5)
    return SEVERITY[kind][s - 1]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _as_rgb(img) -> np.ndarray:
    """Validate and normalise an image to a C-contiguous ``H x W x 3`` uint8 array.

    Greyscale (``H x W`` or ``H x W x 1``) is replicated; RGBA drops alpha (as PIL's
    ``convert("RGB")`` does).
    """
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise ValueError(f"expected an H x W x 3 image, got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"empty image, shape {a.shape}")
    return np.ascontiguousarray(a)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Round to nearest and clip to [0, 255]."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """PIL bilinear resize to ``size x size`` (antialiased when downscaling, as torchvision does)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img.copy()
    pil = Image.fromarray(np.ascontiguousarray(img))
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR)).copy()


# --------------------------------------------------------------------------------------------
# Distortions (each takes and returns H x W x 3 uint8 RGB)
# --------------------------------------------------------------------------------------------


def color_saturation(img, param: float) -> np.ndarray:
    """CS: scale the BT.601 chroma (Cb, Cr) by ``param``, keeping luma.

    Because the RGB <-> YCbCr map is linear and luma is unchanged, this is exactly a blend of each
    pixel toward its luma grey: ``Y + param * (RGB - Y)``. ``param`` 1 is the identity, 0 is grey.
    """
    a = _as_rgb(img).astype(np.float64)
    y = _KR * a[..., 0] + _KG * a[..., 1] + _KB * a[..., 2]
    y = y[..., None]
    return _to_uint8(y + float(param) * (a - y))


def color_contrast(img, param: float) -> np.ndarray:
    """CC: multiply every pixel value by ``param`` (the DeeperForensics "contrast": a darkening)."""
    return _to_uint8(_as_rgb(img).astype(np.float64) * float(param))


def block_jpeg(img, factor: int) -> np.ndarray:
    """The "JPEG" distortion: bilinear downscale by ``factor`` (floor sizes, at least 1 px), then
    bilinear upscale back to the original size (cv2 ``INTER_LINEAR`` both ways, no antialiasing)."""
    a = _as_rgb(img)
    f = operator.index(factor)
    if f < 1:
        raise ValueError(f"factor must be >= 1, got {factor!r}")
    h, w = a.shape[:2]
    small = cv2.resize(a, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _rgb_to_studio_ycbcr(a: np.ndarray) -> np.ndarray:
    """RGB in 0..255 -> BT.601 studio-swing YCbCr normalised by 255 (Y in [16,235]/255,
    Cb/Cr in [16,240]/255). Element-wise arithmetic only (no BLAS), so it is bit-reproducible."""
    r, g, b = a[..., 0] / 255.0, a[..., 1] / 255.0, a[..., 2] / 255.0
    y = _KR * r + _KG * g + _KB * b
    cb = (b - y) / (2.0 * (1.0 - _KB))
    cr = (r - y) / (2.0 * (1.0 - _KR))
    return np.stack([(16.0 + 219.0 * y) / 255.0, (128.0 + 224.0 * cb) / 255.0, (128.0 + 224.0 * cr) / 255.0], axis=-1)


def _studio_ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_rgb_to_studio_ycbcr`; returns float RGB in 0..255 (not clipped)."""
    y = (ycc[..., 0] * 255.0 - 16.0) / 219.0
    cb = (ycc[..., 1] * 255.0 - 128.0) / 224.0
    cr = (ycc[..., 2] * 255.0 - 128.0) / 224.0
    r = y + 2.0 * (1.0 - _KR) * cr
    b = y + 2.0 * (1.0 - _KB) * cb
    g = (y - _KR * r - _KB * b) / _KG
    return np.stack([r, g, b], axis=-1) * 255.0


def gaussian_noise_color(img, variance: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """GNC: add N(0, ``variance``) independently to Y, Cb and Cr of the studio-swing BT.601
    YCbCr image normalised by 255 (the DeeperForensics definition), convert back, clip.

    The noise is one ``rng.standard_normal((H, W, 3))`` draw, channels in Y, Cb, Cr order.
    """
    a = _as_rgb(img)
    if variance < 0:
        raise ValueError(f"variance must be >= 0, got {variance!r}")
    if rng is None:
        rng = np.random.default_rng()
    ycc = _rgb_to_studio_ycbcr(a.astype(np.float64))
    ycc += math.sqrt(float(variance)) * rng.standard_normal(ycc.shape)
    return _to_uint8(_studio_ycbcr_to_rgb(ycc))


def gaussian_blur(img, ksize: int) -> np.ndarray:
    """GB: ``cv2.GaussianBlur`` with a ``ksize x ksize`` kernel (odd) and sigma ``ksize / 6``."""
    a = _as_rgb(img)
    k = operator.index(ksize)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"ksize must be a positive odd integer, got {ksize!r}")
    return cv2.GaussianBlur(a, (k, k), k / 6.0)


_FUNCS = {
    "CS": color_saturation,
    "CC": color_contrast,
    "JPEG": block_jpeg,
    "GB": gaussian_blur,
}


def apply_distortion(img, kind: str, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply distortion ``kind`` at ``severity`` 0..5 (0 = unchanged copy). ``rng`` is used by GNC."""
    _check_kind(kind)
    s = _check_severity(severity, 0, 5)
    a = _as_rgb(img)
    if s == 0:
        return a.copy()
    p = SEVERITY[kind][s - 1]
    if kind == "GNC":
        return gaussian_noise_color(a, p, rng)
    return _FUNCS[kind](a, p)


# --------------------------------------------------------------------------------------------
# Configuration and per-view record
# --------------------------------------------------------------------------------------------


#: The subnet's challenge protocols (module docstring): v2.0.4 (Jan 2026), letterbox (2026-04-06),
#: native (2026-05-03).
PROTOCOLS: tuple[str, ...] = ("v2.0.4", "letterbox", "native")


@dataclass(frozen=True)
class ChallengeConfig:
    """How challenge views are made. Defaults reproduce the v2.0.4 validator; ``protocol`` picks a
    later revision (``PROTOCOLS``; ``size`` is unused by ``"native"``)."""

    size: int = 224
    level_probs: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25)
    # True: skip the flips, as the released code effectively does; False: h/v flips with p=0.5.
    as_released: bool = True
    # Final JPEG round trip as a validator sends the image; None = skip.
    jpeg_quality: int | None = 75
    rotation_deg: float = 20.0
    crop_scale: tuple[float, float] = (0.2, 1.0)
    # NATIX.md (and the transform's declared setting) say bilinear; the released v2.0.4 code calls
    # torchvision's rotate without passing it on, so validators actually rotated with "nearest".
    rotation_interpolation: str = "bilinear"
    protocol: str = "v2.0.4"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if operator.index(self.size) < 1:
            raise ValueError(f"size must be >= 1, got {self.size!r}")
        probs = tuple(float(p) for p in self.level_probs)
        if len(probs) != 4 or any(p < 0 or not math.isfinite(p) for p in probs):
            raise ValueError(f"level_probs must be 4 non-negative numbers, got {self.level_probs!r}")
        if not math.isclose(sum(probs), 1.0, rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError(f"level_probs must sum to 1, got {self.level_probs!r}")
        if self.jpeg_quality is not None and not 1 <= operator.index(self.jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100 or None, got {self.jpeg_quality!r}")
        if not (self.rotation_deg >= 0 and math.isfinite(self.rotation_deg)):
            raise ValueError(f"rotation_deg must be >= 0, got {self.rotation_deg!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi, got {self.crop_scale!r}")
        if self.rotation_interpolation not in _INTERP:
            raise ValueError(f"rotation_interpolation must be one of {tuple(_INTERP)}")


_INTERP = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class ViewInfo:
    """What was done to make a view.

    ``rotation`` in degrees (counter-clockwise, 0.0 for L0); ``crop`` = (top, left, height, width)
    in the rotated full-resolution image (torchvision's (i, j, h, w)), None for L0; ``flips`` =
    (horizontal, vertical) as applied; ``severities`` = distortion kind -> severity drawn (0 = off),
    in the order applied, empty for L0 and L1. ``protocol`` is the config's; under ``"letterbox"``
    ``crop`` is always None, under ``"native"`` the view is level 0 with nothing done but the JPEG.
    """

    level: int
    rotation: float
    crop: tuple[int, int, int, int] | None
    flips: tuple[bool, bool]
    severities: dict[str, int] = field(default_factory=dict)
    protocol: str = "v2.0.4"


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def level0(img, size: int = 224) -> np.ndarray:
    """L0: centre-crop to a square of side min(H, W) (torchvision CenterCrop offsets, Python
    rounding), then PIL bilinear resize to ``size x size``."""
    a = _as_rgb(img)
    h, w = a.shape[:2]
    m = min(h, w)
    top = int(round((h - m) / 2.0))
    left = int(round((w - m) / 2.0))
    return _resize_bilinear(a[top : top + m, left : left + m], size)


def letterbox_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """``ResizeWithPadding``'s placement: (top, left, h, w) of the resized image inside the
    ``size x size`` canvas. The long side becomes ``size``, the short side ``round(short * size /
    long)`` (at least 1), centred (the odd pixel of padding goes to the bottom / right)."""
    s = operator.index(size)
    if height < 1 or width < 1 or s < 1:
        raise ValueError(f"letterbox needs positive sizes, got {height}x{width} -> {size}")
    if height >= width:
        h, w = s, max(1, min(s, int(round(width * s / height))))
    else:
        h, w = max(1, min(s, int(round(height * s / width)))), s
    return (s - h) // 2, (s - w) // 2, h, w


def letterbox(img, size: int = 224) -> np.ndarray:
    """``ResizeWithPadding`` (subnet revision of 2026-04-06): resize keeping the aspect ratio so the
    long side is ``size`` (PIL bilinear, antialiased), then pad centred to ``size x size`` with black."""
    a = _as_rgb(img)
    top, left, h, w = letterbox_geometry(a.shape[0], a.shape[1], size)
    if (h, w) == a.shape[:2]:
        inner = a
    else:
        inner = np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[top : top + h, left : left + w] = inner
    return out


def rotate_full(img, angle: float, interpolation: str = "bilinear") -> np.ndarray:
    """Rotate by ``angle`` degrees counter-clockwise about the image centre on the same canvas with
    black fill (torchvision ``rotate(expand=False)``); the whole image, no crop."""
    a = _as_rgb(img)
    if angle == 0.0:
        return a.copy()
    H, W = a.shape[:2]
    m = cv2.getRotationMatrix2D(((W - 1) / 2.0, (H - 1) / 2.0), float(angle), 1.0)
    return cv2.warpAffine(a, m, (W, H), flags=_INTERP[interpolation], borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = (1.0, 1.0),
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w) of a crop covering a
    ``uniform(scale)`` fraction of the area with log-uniform aspect ratio in ``ratio``; after 10
    failed tries, the central crop of the largest ratio-clamped size (the whole image side for
    ratio 1)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi)) if log_hi > log_lo else math.exp(log_lo)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def rotate_resized_crop(
    img,
    angle: float,
    crop: tuple[int, int, int, int],
    size: int,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Rotate by ``angle`` degrees counter-clockwise about the image centre (same canvas, black
    fill, like torchvision's ``rotate(expand=False)``), take ``crop`` = (top, left, h, w) of the
    rotated image and resize it to ``size x size`` (PIL bilinear, antialiased).

    Only the cropped window of the rotated image is computed (one ``cv2.warpAffine``).
    """
    a = _as_rgb(img)
    H, W = a.shape[:2]
    top, left, ch, cw = (int(v) for v in crop)
    if angle == 0.0:
        window = a[top : top + ch, left : left + cw]
    else:
        m = cv2.getRotationMatrix2D(((W - 1) / 2.0, (H - 1) / 2.0), float(angle), 1.0)
        m[0, 2] -= left
        m[1, 2] -= top
        window = cv2.warpAffine(
            a, m, (cw, ch), flags=_INTERP[interpolation], borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)
        )
    return _resize_bilinear(window, size)


# --------------------------------------------------------------------------------------------
# JPEG as the validator sends it
# --------------------------------------------------------------------------------------------


def encode_jpeg(img, quality: int = 75) -> bytes:
    """JPEG bytes as PIL writes them (``quality`` 75 is PIL's default, 4:2:0 chroma)."""
    buf = io.BytesIO()
    Image.fromarray(_as_rgb(img)).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def jpeg_roundtrip(img, quality: int = 75) -> np.ndarray:
    """Encode to JPEG at ``quality`` and decode back to RGB uint8 (PIL)."""
    with Image.open(io.BytesIO(encode_jpeg(img, quality))) as im:
        return np.asarray(im.convert("RGB")).copy()


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def _draw_level(rng: np.random.Generator, probs) -> int:
    """Released rule: first level whose cumulative probability is >= a uniform draw."""
    u = rng.random()
    cum = 0.0
    for lvl, p in enumerate(probs):
        cum += p
        if u <= cum and p > 0:
            return lvl
    return max(i for i, p in enumerate(probs) if p > 0)


def challenge_view(
    img,
    rng: np.random.Generator | int | None = None,
    cfg: ChallengeConfig = ChallengeConfig(),
    level: int | None = None,
) -> tuple[np.ndarray, ViewInfo]:
    """One validator-style view of ``img`` (``cfg.size x cfg.size x 3`` uint8; the image's own size
    under the ``"native"`` protocol) and what was done.

    ``rng``: a numpy Generator (or an int seed; None = fresh OS entropy, for training).
    ``level``: force a level 0..3 instead of drawing it from ``cfg.level_probs``.

    Draw order: level, then (L1+) angle, crop, h-flip, v-flip (the flip draws are made even when
    ``as_released`` skips them, so both modes share every other draw), then each distortion's
    severity followed by its own randomness (GNC noise). ``"letterbox"`` draws no crop; ``"native"``
    draws nothing (``level`` must then be None or 0).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    a = _as_rgb(img)
    if cfg.protocol == "native":
        if level not in (None, 0) or isinstance(level, bool):
            raise ValueError(f"the native protocol has no levels (level must be None or 0, got {level!r})")
        out = a.copy() if cfg.jpeg_quality is None else jpeg_roundtrip(a, cfg.jpeg_quality)
        return out, ViewInfo(level=0, rotation=0.0, crop=None, flips=(False, False), severities={}, protocol="native")
    boxed = cfg.protocol == "letterbox"
    if level is None:
        level = _draw_level(rng, cfg.level_probs)
    else:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level <= 3:
            raise ValueError(f"level must be an integer in 0..3, got {level!r}")
        level = int(level)

    if level == 0:
        out = letterbox(a, cfg.size) if boxed else level0(a, cfg.size)
        info = ViewInfo(level=0, rotation=0.0, crop=None, flips=(False, False), severities={}, protocol=cfg.protocol)
    else:
        H, W = a.shape[:2]
        deg = float(cfg.rotation_deg)
        angle = float(rng.uniform(-deg, deg)) if deg > 0 else 0.0
        crop = None if boxed else random_resized_crop_params(H, W, cfg.crop_scale, rng)
        hflip = bool(rng.random() < 0.5)
        vflip = bool(rng.random() < 0.5)
        if cfg.as_released:
            hflip = vflip = False
        if crop is None:
            out = letterbox(rotate_full(a, angle, cfg.rotation_interpolation), cfg.size)
        else:
            out = rotate_resized_crop(a, angle, crop, cfg.size, cfg.rotation_interpolation)
        if hflip:
            out = out[:, ::-1]
        if vflip:
            out = out[::-1]
        out = np.ascontiguousarray(out)
        severities: dict[str, int] = {}
        if level in LEVEL_DISTORTIONS:
            kinds, max_sev = LEVEL_DISTORTIONS[level]
            for kind in kinds:
                s = int(rng.integers(0, max_sev + 1))
                severities[kind] = s
                if s:
                    out = apply_distortion(out, kind, s, rng)
        info = ViewInfo(level=level, rotation=angle, crop=crop, flips=(hflip, vflip), severities=severities,
                        protocol=cfg.protocol)

    if cfg.jpeg_quality is not None:
        out = jpeg_roundtrip(out, cfg.jpeg_quality)
    return out, info


def _key_entropy(seed: int, key: str | int) -> int:
    if isinstance(key, (bytes, bytearray)):
        key_text = bytes(key).decode("utf-8", "surrogateescape")
    elif isinstance(key, str):
        key_text = key
    else:
        try:
            key_text = str(operator.index(key))
        except TypeError:
            raise TypeError(f"key must be a str or an int, got {type(key).__name__}") from None
    material = f"roadcascade.challenge/v1\x00{operator.index(seed)}\x00{key_text}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha256(material).digest()[:16], "little")


def view_rng(seed: int, key: str | int, index: int) -> np.random.Generator:
    """The generator of view ``index`` of (seed, key): SHA-256 of seed and key (never Python's
    ``hash()``), one spawned child per view, so view i does not depend on how many views are made.
    ``key`` is used through its text, so 7 and "7" are the same key."""
    ss = np.random.SeedSequence(entropy=_key_entropy(seed, key), spawn_key=(operator.index(index),))
    return np.random.Generator(np.random.PCG64(ss))


def challenge_views_with_info(
    img, seed: int, key: str | int, n: int = 4, cfg: ChallengeConfig = ChallengeConfig()
) -> list[tuple[np.ndarray, ViewInfo]]:
    """Like :func:`challenge_views`, with each view's :class:`ViewInfo`."""
    a = _as_rgb(img)
    return [challenge_view(a, view_rng(seed, key, i), cfg) for i in range(operator.index(n))]


def challenge_views(
    img, seed: int, key: str | int, n: int = 4, cfg: ChallengeConfig = ChallengeConfig()
) -> list[np.ndarray]:
    """``n`` deterministic challenge views: the same (seed, key, image, cfg) gives identical
    views on every call, process and machine (given the same numpy / OpenCV / Pillow builds)."""
    return [v for v, _ in challenge_views_with_info(img, seed, key, n, cfg)]


class ChallengeAugment:
    """Training augmentation: ``ChallengeAugment(cfg)(img) -> view``. Each call uses a fresh
    generator from OS entropy (so forked DataLoader workers never repeat each other)."""

    def __init__(self, cfg: ChallengeConfig = ChallengeConfig()) -> None:
        self.cfg = cfg

    def __call__(self, img) -> np.ndarray:
        return challenge_view(img, np.random.default_rng(), self.cfg)[0]

    def __repr__(self) -> str:
        return f"ChallengeAugment({self.cfg!r})"


def grid_image(views: list[np.ndarray], gap: int = 0, fill: int = 255) -> np.ndarray:
    """Tile views side by side (one row) for reports; shorter views are padded at the bottom with
    ``fill``; ``gap`` pixels of ``fill`` between views."""
    if not views:
        raise ValueError("grid_image needs at least one view")
    arrs = [_as_rgb(v) for v in views]
    h = max(a.shape[0] for a in arrs)
    w = sum(a.shape[1] for a in arrs) + gap * (len(arrs) - 1)
    out = np.full((h, w, 3), fill, dtype=np.uint8)
    x = 0
    for a in arrs:
        out[: a.shape[0], x : x + a.shape[1]] = a
        x += a.shape[1] + gap
    return out
