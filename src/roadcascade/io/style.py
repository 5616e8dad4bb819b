"""Dashcam style transforms: a training augmentation that makes web photos look like phone/dashcam
frames (night, windshield, dashboard in view), applied to positives and negatives alike so that the
camera "style" stops being a shortcut for the label.

Images are HxWx3 uint8 RGB numpy arrays. Every transform has the signature
``f(img, rng: np.random.Generator) -> np.ndarray``: it never changes its input, returns a new uint8
array of the same shape (except :func:`portrait_crop`, which returns a smaller, portrait-shaped
window), and is deterministic given the state of ``rng``. Parameters are drawn from ``rng`` within
realistic ranges and scaled to the image size; all work is done at the image's own resolution with
cheap OpenCV ops (soft overlays are drawn and blurred at reduced size, then upsampled).

Entry points: :func:`apply_style` (one call per training image, configured by :class:`DashcamStyle`),
:data:`TRANSFORMS` (name -> transform, for ablations and tests) and :func:`style_sheet` (a contact
sheet PNG to look at).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

import cv2
import numpy as np

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]

__all__ = [
    "DashcamStyle",
    "STYLE_ALL",
    "STYLE_OFF",
    "TRANSFORMS",
    "Transform",
    "apply_style",
    "apply_style_traced",
    "dashboard_band",
    "headlight_bloom",
    "jpeg_quality",
    "motion_blur",
    "night",
    "portrait_crop",
    "rain_streaks",
    "sensor_noise",
    "street_light_glare",
    "style_sheet",
    "vignette",
    "windshield_reflection",
]


# ----------------------------------------------------------------------------------------- helpers


def _prep(img: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Validate an HxWx3 uint8 image; return it C-contiguous (views such as ``bgr[:, :, ::-1]``
    are copied: OpenCV needs contiguous data) with its height and width."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        got = f"{getattr(img, 'shape', None)} {getattr(img, 'dtype', type(img).__name__)}"
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {got}")
    h, w = img.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"empty image {img.shape}")
    return np.ascontiguousarray(img), h, w


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _to_u8(x: np.ndarray) -> np.ndarray:
    """float array in 0..255 -> uint8, rounded and saturated (OpenCV: ~15x faster than np.clip)."""
    return cv2.add(np.ascontiguousarray(x, dtype=np.float32), 0.0, dtype=cv2.CV_8U)


# standard normal quantiles of 256 equiprobable bins: random bytes -> Gaussian noise via a LUT
# (~10x cheaper than Generator.standard_normal; tails cut at about +-2.9 sigma)
_GAUSS_Q = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)])
_GAUSS_LUT = (_GAUSS_Q / _GAUSS_Q.std()).astype(np.float32).reshape(1, 256)


def _gauss(rng: np.random.Generator, h: int, w: int, c: int = 1) -> np.ndarray:
    """h x w (x c) float32 unit-variance Gaussian noise drawn from ``rng`` (quantised to 256 levels)."""
    raw = np.frombuffer(rng.bytes(h * w * c), np.uint8).reshape((h, w, c) if c > 1 else (h, w))
    return cv2.LUT(raw, _GAUSS_LUT)


def _small_size(h: int, w: int, target: int = 48) -> tuple[int, int, float]:
    """Reduced working size (hs, ws) whose short side is about ``target`` px, and the scale factor."""
    f = min(1.0, target / min(h, w))
    return max(2, round(h * f)), max(2, round(w * f)), f


def _up(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Upsample a reduced map (bilinear) to h x w."""
    if x.shape[0] == h and x.shape[1] == w:
        return x
    return cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR)


def _c3(m: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
    """HxW float32 -> HxWx3 (same value in each channel), into ``dst`` when given. Same-shape
    arithmetic afterwards is several times faster than numpy broadcasting of an HxWx1 map.

    Note on speed: full-size float temporaries cost more in page faults than in arithmetic, so the
    transforms reuse them (OpenCV ``dst=``) instead of allocating new ones for every step."""
    return cv2.cvtColor(np.ascontiguousarray(m, dtype=np.float32), cv2.COLOR_GRAY2RGB, dst=dst)


def _scalar(c: Sequence[float]) -> tuple[float, float, float, float]:
    return (float(c[0]), float(c[1]), float(c[2]), 0.0)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return x
    return cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _screen_u8(img: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Screen blend of a float32 HxWx3 light layer (0..255, overwritten) onto uint8 ``img``:
    a + b - a*b/255 (never darkens; saturates at 255)."""
    prod = cv2.multiply(img, light, scale=1.0 / 255.0, dtype=cv2.CV_32F)
    light = cv2.subtract(light, prod, dst=light)
    return cv2.add(img, light, dtype=cv2.CV_8U)


def _mean_luma(img: np.ndarray) -> float:
    m = cv2.mean(img)
    return (m[0] + m[1] + m[2]) / 3.0


# ---------------------------------------------------------------------------------------- framing


def portrait_crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Crop a vertical window of aspect w/h in [9/16, 3/4] (a phone held upright).

    For a landscape image the full height is kept and the window is centred on a random x in the
    middle 60 % of the width (shifted inside the image where needed). An image that is already
    narrower than the drawn aspect keeps its width and loses height instead (random y). This is the
    only transform that changes the shape: it returns a smaller, contiguous copy.
    """
    img, h, w = _prep(img)
    aspect = _u(rng, 9 / 16, 3 / 4)
    cx = _u(rng, 0.2, 0.8)
    cy = _u(rng, 0.2, 0.8)
    cw = round(h * aspect)
    if cw <= w:
        cw = max(1, cw)
        x0 = int(np.clip(round(cx * w - cw / 2), 0, w - cw))
        return img[:, x0 : x0 + cw].copy()
    ch = max(1, min(h, round(w / aspect)))
    y0 = int(np.clip(round(cy * h - ch / 2), 0, h - ch))
    return img[y0 : y0 + ch].copy()


# --------------------------------------------------------------------------------- scene lighting


def _night_light_map(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Headlight-lit light map (separable): ambient everywhere, more light toward the bottom centre.

    Returns (gy: H, gx: W); the light map is ``amb + (1 - amb) * gy[:, None] * gx[None, :]`` where
    ``amb`` is folded into the caller.
    """
    horizon = _u(rng, 0.25, 0.55)
    power = _u(rng, 0.5, 1.1)
    y = (np.arange(h, dtype=np.float32) + 0.5) / h
    gy = np.clip((y - horizon) / (1.0 - horizon), 0.0, 1.0) ** power
    cx = _u(rng, 0.4, 0.6)
    sx = _u(rng, 0.25, 0.6)
    floor = _u(rng, 0.15, 0.5)
    x = (np.arange(w, dtype=np.float32) + 0.5) / w
    gx = floor + (1.0 - floor) * np.exp(-0.5 * ((x - cx) / sx) ** 2)
    return gy.astype(np.float32), gx.astype(np.float32)


_CASTS = {
    # multipliers on R, G, B
    "sodium": (1.0, 0.72, 0.42),
    "warm": (1.0, 0.88, 0.70),
    "cool": (0.7, 0.8, 1.05),
    "neutral": (1.0, 1.0, 1.0),
}


def night(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low light: gamma + exposure darkening to ~15-35 % of the original mean, colour cast, some
    desaturation, crushed blacks and raised noise.

    The darkening follows a headlight-lit light map (a vertical gradient times a horizontal bell):
    the bottom centre keeps most light, the top little and bright unsaturated sky almost none, so
    bright saturated objects near the bottom (cones, boards) stay visible as if lit by headlights;
    bright saturated things elsewhere keep some light too (retroreflective cones and signs shine
    at night). The cast is one of sodium orange / warm / cool blue / neutral, or a split (cool sky
    above, warm headlight light below).
    """
    img, h, w = _prep(img)
    gamma = _u(rng, 1.2, 1.9)
    lut = ((np.arange(256, dtype=np.float32) / 255.0) ** gamma * 255.0).reshape(1, 256)
    x = cv2.LUT(img, lut)  # float32 HxWx3, 0..255 (cv2.LUT keeps the LUT's type)

    gy, gx = _night_light_map(h, w, rng)
    amb = _u(rng, 0.08, 0.3)
    light = (amb + (1.0 - amb) * (gy[:, None] * gx[None, :])).astype(np.float32)
    # The sky (bright, unsaturated, above the headlight pool) goes almost black at night, while
    # bright saturated things (cones, signs, boards: retroreflective) shine in the headlights.
    hs, ws, _ = _small_size(h, w, 96)
    small = cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA).astype(np.float32) * (1.0 / 255.0)
    r, g, b = cv2.split(small)
    vmax, vmin = cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b)  # (numpy's axis=2 reduce is slow)
    sat = (vmax - vmin) / np.maximum(vmax, 1e-3)
    upper = np.sqrt(np.clip(1.0 - np.linspace(0.0, 1.0, hs, dtype=np.float32) / 0.65, 0, 1))[:, None]
    sky = np.clip((vmax - 0.45) / 0.35, 0, 1) * np.clip(1.0 - (sat - 0.1) / 0.4, 0, 1) * upper
    retro = (np.clip((sat - 0.35) / 0.3, 0, 1) * np.clip((vmax - 0.35) / 0.3, 0, 1)).astype(np.float32)
    light = cv2.multiply(light, _up((1.0 - _u(rng, 0.7, 0.95) * sky).astype(np.float32), h, w))
    np.maximum(light, _up(retro * _u(rng, 0.35, 0.9), h, w), out=light)

    kind = int(rng.integers(0, 5))
    strength = _u(rng, 0.5, 1.0)

    def cast(name: str) -> np.ndarray:
        return 1.0 + strength * (np.array(_CASTS[name], np.float32) - 1.0)

    fac = _c3(light)
    if kind == 4:  # split: cool sky, warm headlight light on the road
        top, bot = cast("cool"), cast("warm")
        fac = cv2.multiply(fac, _scalar(top), dst=fac)
        fac2 = cv2.multiply(_c3(light * gy[:, None]), _scalar(bot - top))
        fac = cv2.add(fac, fac2, dst=fac)
    else:
        fac = cv2.multiply(fac, _scalar(cast(("sodium", "warm", "cool", "neutral")[kind])), dst=fac)
    x = cv2.multiply(x, fac, dst=x)

    desat = _u(rng, 0.0, 0.35)
    if desat > 0.01:  # colour fades in low light
        grey = _c3(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), dst=fac)
        x = cv2.addWeighted(x, 1.0 - desat, grey, desat, 0.0, dst=x)

    m0 = _mean_luma(img)
    m1 = _mean_luma(x)
    target = _u(rng, 0.15, 0.35)
    scale = min(target * m0 / m1, 2.0) if m0 > 0.5 and m1 > 1e-3 else 1.0
    black = _u(rng, 0.01, 0.04) * 255.0  # crushed blacks: everything below goes to 0
    gain = scale * 255.0 / (255.0 - black)
    sig = _u(rng, 0.5, 2.0)
    noise = _c3(_gauss(rng, h, w), dst=fac)
    return cv2.addWeighted(x, gain, noise, sig, -black * 255.0 / (255.0 - black), dtype=cv2.CV_8U)


_LIGHT_COLOURS = (
    (255, 165, 70),  # sodium
    (255, 190, 110),  # warm sodium / halogen
    (255, 240, 220),  # white
    (225, 235, 255),  # cool LED
)


def street_light_glare(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A few bright orange/white point lights in the upper half with large soft bloom halos and
    optional star-shaped lens streaks (screen blend)."""
    img, h, w = _prep(img)
    diag = math.hypot(h, w)
    hs, ws, f = _small_size(h, w, 56)
    halo = np.zeros((hs, ws, 3), np.float32)
    sharp = np.zeros((h, w, 3), np.uint8)
    ys = (np.arange(hs, dtype=np.float32) + 0.5) / f
    xs = (np.arange(ws, dtype=np.float32) + 0.5) / f
    n = int(rng.integers(1, 6))
    for _ in range(n):
        cx = _u(rng, 0.0, 1.0) * w
        cy = _u(rng, 0.05, 0.5) * h
        col = np.array(_LIGHT_COLOURS[int(rng.integers(0, len(_LIGHT_COLOURS)))], np.float32)
        r_core = max(1.0, _u(rng, 0.003, 0.012) * diag)
        r_halo = r_core * _u(rng, 3.0, 9.0)
        amp = _u(rng, 0.5, 1.0)
        d2 = ((ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2) / (r_halo * r_halo)
        halo += (amp / (1.0 + d2 * 3.0))[:, :, None] * col[None, None, :] * 0.9

        core = tuple(int(v) for v in np.minimum(255, col * 0.25 + 200))
        ci = (round(cx * 16), round(cy * 16))
        cv2.circle(sharp, ci, max(1, round(r_core * 16)), core, -1, cv2.LINE_AA, 4)
        if rng.random() < 0.6:  # lens streaks (starburst)
            n_rays = int(rng.integers(2, 5))
            a0 = _u(rng, 0.0, math.pi)
            length = r_halo * _u(rng, 0.5, 1.6)
            for k in range(n_rays):
                a = a0 + k * math.pi / n_rays + _u(rng, -0.15, 0.15)
                dx, dy = math.cos(a), math.sin(a)
                # longest (faintest) segment first, so the brighter inner ones are drawn on top
                for frac, level in ((1.0, 0.12), (0.6, 0.3), (0.3, 0.6)):
                    c = tuple(int(v * level) for v in col)
                    p1 = (round((cx + dx * length * frac) * 16), round((cy + dy * length * frac) * 16))
                    p2 = (round((cx - dx * length * frac) * 16), round((cy - dy * length * frac) * 16))
                    cv2.line(sharp, p1, p2, c, 1, cv2.LINE_AA, 4)
    light = _up(halo, h, w)
    light = cv2.add(light, sharp, dst=light, dtype=cv2.CV_32F)
    np.minimum(light, 255.0, out=light)
    return _screen_u8(img, light)


def headlight_bloom(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A warm, bright, soft cone of headlight light on the lower-middle of the road: lights up what
    is there (multiplicative) plus a little scattered glow (additive)."""
    img, h, w = _prep(img)
    hs, ws, f = _small_size(h, w, 40)
    mask = np.zeros((hs, ws), np.float32)
    cx = _u(rng, 0.4, 0.6) * ws
    if rng.random() < 0.5:  # trapezoid beam narrowing toward the horizon
        top_y = _u(rng, 0.45, 0.65) * hs
        top_hw = _u(rng, 0.08, 0.2) * ws
        bot_hw = _u(rng, 0.4, 0.7) * ws
        pts = np.array(
            [[cx - top_hw, top_y], [cx + top_hw, top_y], [cx + bot_hw, hs * 1.05], [cx - bot_hw, hs * 1.05]]
        )
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1.0, cv2.LINE_AA, 4)
    else:  # ellipse pool
        cy = _u(rng, 0.72, 0.92) * hs
        ax = (_u(rng, 0.25, 0.5) * ws, _u(rng, 0.1, 0.25) * hs)
        cv2.ellipse(
            mask, (round(cx * 16), round(cy * 16)), (round(ax[0] * 16), round(ax[1] * 16)), 0, 0, 360, 1.0, -1,
            cv2.LINE_AA, 4,
        )
    mask = _blur(mask, _u(rng, 0.06, 0.14) * min(hs, ws) * 1.5)
    yy = np.linspace(0.3, 1.0, hs, dtype=np.float32)[:, None]  # brighter closer to the car
    mask *= yy
    col = (1.0, _u(rng, 0.86, 0.97), _u(rng, 0.68, 0.88))
    mc = _c3(_up(mask, h, w))
    mc = cv2.multiply(mc, _scalar(col), dst=mc)
    gain = _u(rng, 0.4, 1.4)
    add = _u(rng, 10.0, 45.0)
    # x * (1 + gain * m * col) + add * m * col
    t = img.astype(np.float32)
    t *= gain
    t += add
    t = cv2.multiply(mc, t, dst=t)
    return cv2.add(img, t, dtype=cv2.CV_8U)


# ------------------------------------------------------------------------------------ on the glass


def rain_streaks(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thin slanted semi-transparent light streaks and/or blurry droplets on the glass."""
    img, h, w = _prep(img)
    x = img.astype(np.float32)
    mode = int(rng.integers(0, 3))  # 0 streaks, 1 drops, 2 both
    if mode in (0, 2):
        n = max(1, round(h * w / 1e5 * _u(rng, 150, 600)))
        angle = math.radians(_u(rng, -25, 25))
        length = rng.uniform(0.02, 0.08, n) * h
        px = rng.uniform(-0.1 * w, 1.1 * w, n)
        py = rng.uniform(-0.05 * h, 1.0 * h, n)
        dx, dy = math.sin(angle) * length, math.cos(angle) * length
        seg = np.stack([px, py, px + dx, py + dy], 1).reshape(n, 2, 2)
        m = np.zeros((h, w), np.uint8)
        cv2.polylines(m, list(np.round(seg * 16).astype(np.int32)), False, 255, 1, cv2.LINE_AA, 4)
        m = _blur(m, 0.5 * max(1.0, min(h, w) / 300)).astype(np.float32) * (1.0 / 255.0)
        alpha = _u(rng, 0.12, 0.35)
        level = min(235.0, _u(rng, 0.5, 0.9) * (60.0 + 1.6 * _mean_luma(img)))  # lit like the scene
        m3 = _c3(m * alpha)
        d = np.subtract(level, x, dtype=np.float32)
        x += cv2.multiply(m3, d, dst=d)
    if mode in (1, 2):
        n = int(rng.integers(4, 25))
        m = np.zeros((h, w), np.uint8)
        s = min(h, w)
        for _ in range(n):
            c = (round(_u(rng, 0, w) * 16), round(_u(rng, 0, h) * 16))
            r = max(1, round(_u(rng, 0.01, 0.04) * s * 16))
            axes = (r, max(1, round(r * _u(rng, 0.7, 1.3))))
            cv2.ellipse(m, c, axes, _u(rng, 0, 180), 0, 360, 255, -1, cv2.LINE_AA, 4)
        hs, ws, _ = _small_size(h, w, 32)
        blurred = _up(cv2.resize(x, (ws, hs), interpolation=cv2.INTER_AREA), h, w)
        m = _blur(m, max(0.7, 0.004 * s)).astype(np.float32) * (1.0 / 255.0)
        bright = _u(rng, 1.0, 1.25)
        blurred *= bright
        blurred += 6.0
        blurred -= x
        x += cv2.multiply(_c3(m), blurred, dst=blurred)
    return _to_u8(x)


def windshield_reflection(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Faint, blurry, low-contrast bright overlay: the dashboard reflected in the windshield (a few
    large soft shapes and a gradient, screen-blended at 5-25 % strength), plus optional dirt,
    smudges and a wiper arc."""
    img, h, w = _prep(img)
    hs, ws, _ = _small_size(h, w, 24)
    layer = np.zeros((hs, ws), np.float32)
    # a light band low on the glass (where the dashboard is reflected) ...
    y0 = _u(rng, 0.45, 0.8) * hs
    band_h = _u(rng, 0.1, 0.3) * hs
    yy = np.arange(hs, dtype=np.float32)[:, None]
    layer += np.exp(-0.5 * ((yy - y0) / max(band_h, 0.5)) ** 2) * _u(rng, 0.4, 1.0)
    # ... a broad gradient ...
    gdir = _u(rng, 0, 2 * math.pi)
    xx = np.arange(ws, dtype=np.float32)[None, :]
    grad = (math.cos(gdir) * xx / ws + math.sin(gdir) * yy / hs) + 1.0
    layer += grad * _u(rng, 0.0, 0.35)
    # ... and a few large soft shapes.
    for _ in range(int(rng.integers(1, 4))):
        c = (round(_u(rng, 0, ws) * 16), round(_u(rng, 0.2, 1.0) * hs * 16))
        ax = (max(1, round(_u(rng, 0.1, 0.45) * ws * 16)), max(1, round(_u(rng, 0.04, 0.2) * hs * 16)))
        cv2.ellipse(layer, c, ax, _u(rng, -30, 30), 0, 360, _u(rng, 0.3, 1.0), -1, cv2.LINE_AA, 4)
    layer = _blur(layer, _u(rng, 1.0, 2.5) * max(hs, ws) / 24)
    layer /= max(float(layer.max()), 1e-6)

    strength = _u(rng, 0.05, 0.25) * (0.5 + 0.5 * min(1.0, _mean_luma(img) / 100.0))
    tint = (1.0, _u(rng, 0.92, 1.05), _u(rng, 0.85, 1.1))
    light = _up(layer, h, w) * (255.0 * strength)

    if rng.random() < 0.5:  # dirt / smudges / wiper arc: faint haze that scatters light
        hs2, ws2, _ = _small_size(h, w, 64)
        dirt = np.zeros((hs2, ws2), np.float32)
        for _ in range(int(rng.integers(2, 9))):
            c = (round(_u(rng, 0, ws2) * 16), round(_u(rng, 0, hs2) * 16))
            r = max(1, round(_u(rng, 0.01, 0.06) * min(hs2, ws2) * 16))
            cv2.circle(dirt, c, r, _u(rng, 0.3, 1.0), -1, cv2.LINE_AA, 4)
        if rng.random() < 0.5:
            pivot = (round(_u(rng, 0.2, 0.8) * ws2 * 16), round(hs2 * _u(rng, 1.05, 1.4) * 16))
            rad = round(_u(rng, 0.6, 1.1) * hs2 * 16)
            a0 = _u(rng, 200, 250)
            cv2.ellipse(dirt, pivot, (rad, rad), 0, a0, a0 + _u(rng, 40, 90), 0.6,
                        max(1, round(0.03 * min(hs2, ws2))), cv2.LINE_AA, 4)
        dirt = _blur(dirt, 0.02 * max(hs2, ws2))
        dirt_amp = _u(rng, 15.0, 45.0)
        light += _up(dirt, h, w) * dirt_amp
    light3 = _c3(light)
    light3 = cv2.multiply(light3, _scalar(tint), dst=light3)
    if rng.random() < 0.35:  # sparkles: small lights reflected in the glass / glossy hood, in a low band
        sp = np.zeros((h, w, 3), np.uint8)
        yc, spread = _u(rng, 0.55, 0.85) * h, _u(rng, 0.02, 0.06) * h
        n = int(rng.integers(10, 60))
        xs, ys = rng.uniform(0, w, n), rng.normal(yc, spread, n)
        rad = rng.uniform(0.3, 1.2, n) * max(1.0, min(h, w) / 224)
        lvl = rng.uniform(40, 160, n)
        warm = rng.random(n) < 0.6
        for i in range(n):
            col = (lvl[i], lvl[i] * (0.8 if warm[i] else 1.0), lvl[i] * (0.6 if warm[i] else 1.1))
            cv2.circle(sp, (round(xs[i] * 16), round(ys[i] * 16)), max(1, round(rad[i] * 16)), col, -1,
                       cv2.LINE_AA, 4)
        light3 = cv2.add(light3, _blur(sp, 0.5 * max(1.0, min(h, w) / 224)), dst=light3, dtype=cv2.CV_32F)
    np.minimum(light3, 255.0, out=light3)
    return _screen_u8(img, light3)


# ---------------------------------------------------------------------------------- inside the car


def dashboard_band(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The car's dashboard at the bottom of the frame.

    A dark (near-black, slightly grey/brown/cool, gentle vertical gradient, low-frequency texture)
    band covering 8-35 % of the height, with a curved/tilted/humped top edge (the hump is an
    instrument binnacle or phone mount), sometimes a faint highlight along the edge and a wiper
    blade above it, and sometimes a dark rear-view-mirror/mount blob at a top corner or top centre.
    The dashboard's brightness follows the scene's (it is dark at night), and its edge is slightly
    out of focus (the camera focuses on the road).
    """
    img, h, w = _prep(img)
    frac = _u(rng, 0.08, 0.35)
    top = h * (1.0 - frac)
    k = 25
    t = np.linspace(-0.52, 0.52, k)
    tilt = _u(rng, -0.06, 0.06)
    curv = _u(rng, -0.5, 0.5) * frac
    prof = top + (tilt * t + curv * (t * t - 1.0 / 12.0)) * h
    if rng.random() < 0.45:  # hump: binnacle / phone mount rising from the dash
        tc = _u(rng, -0.35, 0.35)
        hw = _u(rng, 0.08, 0.25)
        hump = _u(rng, 0.03, 0.12) * h
        prof = prof - hump * np.exp(-(((t - tc) / hw) ** 4))
    # gentle irregularity: smooth random wobble (a few control points, cubic-upsampled)
    wob = cv2.resize(rng.normal(0.0, 0.006 * h, (1, 5)).astype(np.float32), (k, 1), interpolation=cv2.INTER_CUBIC)
    prof = prof + wob[0]
    prof = np.clip(prof, 0.55 * h, 0.94 * h)
    px = (t + 0.5) * w
    edge = np.stack([px, prof], 1)
    poly = np.concatenate([edge, [[w * 1.05 + 2, h + 2.0], [-w * 0.05 - 2, h + 2.0]]])

    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
    blob = rng.random() < 0.3
    if blob:  # rear-view mirror (top centre) or mount / pillar (top corner)
        where = int(rng.integers(0, 3))
        bx = (_u(rng, 0.35, 0.65), 0.0, 1.0)[where] * w
        by = _u(rng, -0.08, 0.04) * h
        ax = (_u(rng, 0.12, 0.25) * w, _u(rng, 0.06, 0.14) * h) if where == 0 else (
            _u(rng, 0.06, 0.16) * w, _u(rng, 0.12, 0.3) * h)
        cv2.ellipse(mask, (round(bx * 16), round(by * 16)), (max(1, round(ax[0] * 16)), max(1, round(ax[1] * 16))),
                    _u(rng, -10, 10), 0, 360, 255, -1, cv2.LINE_AA, 4)
    if rng.random() < 0.25:  # a dark wiper blade lying on the glass just above the dash
        i0 = int(rng.integers(0, k // 4))
        i1 = int(rng.integers(3 * k // 4, k + 1))
        seg = edge[i0:i1] - [0.0, _u(rng, 0.003, 0.025) * h]
        cv2.polylines(mask, [np.round(seg * 16).astype(np.int32)], False, 235,
                      max(1, round(_u(rng, 0.008, 0.02) * h)), cv2.LINE_AA, 4)
    mask = _blur(mask, _u(rng, 0.3, 1.2) * max(1.0, min(h, w) / 224))

    # colour field: near black, tinted, lit by the scene, gradient + soft texture
    amb = float(np.clip(_mean_luma(img) / 110.0, 0.2, 1.3))
    base = _u(rng, 6.0, 34.0) * amb
    tint = [(1.0, 1.0, 1.0), (1.12, 1.03, 0.9), (0.95, 1.0, 1.08)][int(rng.integers(0, 3))]
    g_top, g_bot = _u(rng, 1.0, 1.7), _u(rng, 0.45, 1.0)
    ry = np.clip((np.arange(h, dtype=np.float32) - top) / max(1.0, h - top), 0.0, 1.0)
    grad = (g_top + (g_bot - g_top) * ry) * base  # H
    tex = cv2.resize(rng.standard_normal((4, 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    field = (1.0 + _u(rng, 0.05, 0.25) * tex) * grad[:, None]  # H x W

    out = img.copy()
    rows = np.flatnonzero(mask.max(axis=1))  # only the rows the dashboard/blob/wiper cover
    if rows.size:
        for run in np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1):
            a, b = int(run[0]), int(run[-1]) + 1
            dash = cv2.multiply(_c3(field[a:b]), _scalar(tint))
            xr = img[a:b].astype(np.float32)
            xr += cv2.multiply(_c3(mask[a:b].astype(np.float32) * (1.0 / 255.0)), dash - xr)
            out[a:b] = _to_u8(xr)
    if rng.random() < 0.5:  # faint highlight along (part of) the top edge
        extra = np.zeros((h, w), np.uint8)
        i0 = int(rng.integers(0, k - 3))
        i1 = int(rng.integers(i0 + 3, k + 1))
        seg = edge[i0:i1] + [0.0, max(1.0, 0.006 * h)]
        lvl = round(_u(rng, 50, 140) * min(1.0, 0.4 + amb))
        cv2.polylines(extra, [np.round(seg * 16).astype(np.int32)], False, lvl,
                      max(1, round(0.005 * min(h, w))), cv2.LINE_AA, 4)
        extra = _blur(extra, 0.6 * max(1.0, min(h, w) / 224))
        out = cv2.add(out, cv2.cvtColor(extra, cv2.COLOR_GRAY2RGB))  # uint8, saturating
    return out


# ----------------------------------------------------------------------------------- camera optics


def vignette(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Radial darkening toward the corners (strength 20-60 % at the corners)."""
    img, h, w = _prep(img)
    strength = _u(rng, 0.2, 0.6)
    power = _u(rng, 1.5, 3.0)
    cx, cy = _u(rng, -0.08, 0.08), _u(rng, -0.08, 0.08)
    y = ((np.arange(h, dtype=np.float32) + 0.5) / h - 0.5 - cy) * 2.0
    x = ((np.arange(w, dtype=np.float32) + 0.5) / w - 0.5 - cx) * 2.0
    r2 = (y * y)[:, None] * 0.5 + (x * x)[None, :] * 0.5  # 1.0 at the corners of a centred frame
    fac = np.maximum(1.0 - strength * np.minimum(r2, 1.6) ** (power / 2.0), 0.0).astype(np.float32)
    return cv2.multiply(img, _c3(fac), dtype=cv2.CV_8U)


def _line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Normalised line kernel: a segment of ``length`` px (sub-pixel exact, bilinear splats)."""
    size = max(3, math.ceil(length) + 2) | 1
    c = (size - 1) / 2.0
    a = math.radians(angle_deg)
    t = np.linspace(-(length - 1.0) / 2.0, (length - 1.0) / 2.0, 8 * size) if length > 1.0 else np.zeros(1)
    px, py = c + t * math.cos(a), c + t * math.sin(a)
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - x0, py - y0
    k = np.zeros((size + 1, size + 1), np.float64)
    np.add.at(k, (y0, x0), (1 - fx) * (1 - fy))
    np.add.at(k, (y0, x0 + 1), fx * (1 - fy))
    np.add.at(k, (y0 + 1, x0), (1 - fx) * fy)
    np.add.at(k, (y0 + 1, x0 + 1), fx * fy)
    k = k[:size, :size]
    return (k / k.sum()).astype(np.float32)


def motion_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Motion blur of length ~1-4 % of the width: a linear kernel (mostly near-horizontal, camera
    shake / panning) or a radial zoom blur around a vanishing point (driving forward)."""
    img, h, w = _prep(img)
    length = max(_u(rng, 0.01, 0.04) * w, 2.0)  # at least 2 px, so that small images blur too
    mode = rng.random()
    if mode < 0.3:  # radial (zoom) blur: average of a few copies scaled about a vanishing point
        cx, cy = _u(rng, 0.4, 0.6) * w, _u(rng, 0.3, 0.5) * h
        smax = length / (0.5 * w)
        n = int(np.clip(math.ceil(length / 2.5) + 1, 3, 8))  # copies ~2.5 px apart at the edges: no ghosting
        acc = img.astype(np.float32)
        for i in range(1, n):
            s = 1.0 + smax * i / (n - 1)
            M = np.array([[s, 0, (1 - s) * cx], [0, s, (1 - s) * cy]], np.float32)
            acc += cv2.warpAffine(img, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        return _to_u8(acc * (1.0 / n))
    angle = _u(rng, 0, 180) if mode > 0.9 else float(rng.normal(0.0, 8.0))
    # kernels above ~11 px make OpenCV switch to a (slow) DFT: use several short passes instead
    passes = max(1, math.ceil(length / 9.0))
    ker = _line_kernel(length / passes, angle)
    out = img
    for _ in range(passes):
        out = cv2.filter2D(out, -1, ker, borderType=cv2.BORDER_REFLECT)
    return out if out is not img else img.copy()


def sensor_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian luma noise plus blotchy chroma noise; both stronger in dark images."""
    img, h, w = _prep(img)
    m = _mean_luma(img) / 255.0
    dark = 1.0 + 2.0 * (1.0 - m) ** 2
    sig_l = _u(rng, 0.8, 2.5) * dark
    sig_c = _u(rng, 0.3, 0.8) * sig_l
    hs, ws = max(1, (h + 1) // 2), max(1, (w + 1) // 2)
    chroma = _gauss(rng, hs, ws, 3)  # blotchy (half resolution), zero-mean across channels
    chroma -= _c3(cv2.cvtColor(chroma, cv2.COLOR_RGB2GRAY))
    noise = _c3(_gauss(rng, h, w))
    noise = cv2.addWeighted(noise, sig_l, _up(chroma, h, w), sig_c, 0.0, dst=noise)
    return cv2.add(img, noise, dtype=cv2.CV_8U)


def jpeg_quality(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """JPEG encode/decode (OpenCV) at a random quality in 40-95."""
    img, _, _ = _prep(img)
    q = int(rng.integers(40, 96))
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:  # pragma: no cover - OpenCV only fails on invalid input
        raise RuntimeError("cv2.imencode failed")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(dec[:, :, ::-1])


# ------------------------------------------------------------------------------- config and driver

TRANSFORMS: dict[str, Transform] = {
    "portrait_crop": portrait_crop,
    "night": night,
    "street_light_glare": street_light_glare,
    "headlight_bloom": headlight_bloom,
    "rain_streaks": rain_streaks,
    "windshield_reflection": windshield_reflection,
    "dashboard_band": dashboard_band,
    "vignette": vignette,
    "motion_blur": motion_blur,
    "sensor_noise": sensor_noise,
    "jpeg_quality": jpeg_quality,
}
"""Every transform by name, in the physical order :func:`apply_style` applies them."""


@dataclass(frozen=True)
class DashcamStyle:
    """Probabilities of the dashcam style. ``p`` gates the whole style; the others are conditional
    on the image being styled (``p_glare`` and ``p_headlights`` further on the night look)."""

    p: float = 0.5  # probability that an image gets the dashcam style at all
    p_night: float = 0.35  # given styled: night look
    p_dashboard: float = 0.5
    p_reflection: float = 0.4
    p_vignette: float = 0.5
    p_motion_blur: float = 0.3
    p_rain: float = 0.1
    p_portrait: float = 0.2
    p_noise: float = 0.6
    p_jpeg: float = 0.5
    p_glare: float = 0.7  # given night: street lights with halos
    p_headlights: float = 0.6  # given night: headlight cone on the road

    def __post_init__(self) -> None:
        for name, v in self.__dict__.items():
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"DashcamStyle.{name} must be a probability in [0, 1], got {v}")


STYLE_OFF = DashcamStyle(p=0.0)
STYLE_ALL = DashcamStyle(**{f: 1.0 for f in DashcamStyle.__dataclass_fields__})
"""Every transform forced on (stress tests)."""


def apply_style_traced(
    img: np.ndarray, rng: np.random.Generator, cfg: DashcamStyle = DashcamStyle()
) -> tuple[np.ndarray, list[str]]:
    """:func:`apply_style`, also returning the names of the transforms applied, in order."""
    img, _, _ = _prep(img)
    if not rng.random() < cfg.p:
        return img.copy(), []
    at_night = rng.random() < cfg.p_night
    plan = (  # physical order: framing, scene light, lights, glass, car interior, camera
        ("portrait_crop", cfg.p_portrait),
        ("night", 1.0 if at_night else 0.0),
        ("street_light_glare", cfg.p_glare if at_night else 0.0),
        ("headlight_bloom", cfg.p_headlights if at_night else 0.0),
        ("rain_streaks", cfg.p_rain),
        ("windshield_reflection", cfg.p_reflection),
        ("dashboard_band", cfg.p_dashboard),
        ("vignette", cfg.p_vignette),
        ("motion_blur", cfg.p_motion_blur),
        ("sensor_noise", cfg.p_noise),
        ("jpeg_quality", cfg.p_jpeg),
    )
    names: list[str] = []
    out = img
    for name, p in plan:
        if p > 0.0 and rng.random() < p:
            out = TRANSFORMS[name](out, rng)
            names.append(name)
    if out is img:
        out = img.copy()
    return out, names


def apply_style(img: np.ndarray, rng: np.random.Generator, cfg: DashcamStyle = DashcamStyle()) -> np.ndarray:
    """Dashcam-style one training image (HxWx3 uint8 RGB) -> new uint8 array.

    With probability ``cfg.p`` the image is styled; then each transform is applied with its own
    probability in physical order: portrait crop (framing), night (scene lighting), street-light
    glare and headlight bloom (night only), rain, windshield reflection (on the glass), dashboard
    band (inside the car, dark at night too), vignette, motion blur, sensor noise, JPEG. Unstyled
    images come back as an equal copy. With a portrait crop the result is smaller than the input
    (resize afterwards, as for any image). Deterministic given the state of ``rng``.
    """
    return apply_style_traced(img, rng, cfg)[0]


# ---------------------------------------------------------------------------------- contact sheet

_ABBREV = {
    "portrait_crop": "crop",
    "night": "night",
    "street_light_glare": "glare",
    "headlight_bloom": "head",
    "rain_streaks": "rain",
    "windshield_reflection": "refl",
    "dashboard_band": "dash",
    "vignette": "vig",
    "motion_blur": "blur",
    "sensor_noise": "noise",
    "jpeg_quality": "jpg",
}


def _tile(img: np.ndarray, th: int, tw: int, caption: str, cap_h: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(th / h, tw / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    r = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    t = np.full((th + cap_h, tw, 3), 32, np.uint8)
    y0, x0 = (th - nh) // 2, (tw - nw) // 2
    t[y0 : y0 + nh, x0 : x0 + nw] = r
    if cap_h:
        fs = 0.36 * cap_h / 14
        words = caption.split(" ")
        lines, cur = [], ""
        for wd in words:  # wrap to the tile width
            cand = (cur + " " + wd).strip()
            if cv2.getTextSize(cand, cv2.FONT_HERSHEY_SIMPLEX, fs, 1)[0][0] > tw - 4 and cur:
                lines.append(cur)
                cur = wd
            else:
                cur = cand
        lines.append(cur)
        for i, line in enumerate(lines[:2]):
            cv2.putText(t, line, (2, th + 11 * cap_h // 28 + i * cap_h // 2), cv2.FONT_HERSHEY_SIMPLEX, fs,
                        (230, 230, 230), 1, cv2.LINE_AA)
    return t


def style_sheet(
    images: Sequence[np.ndarray],
    out_png: str | Path,
    seed: int = 0,
    per_image: int = 4,
    cfg: DashcamStyle | None = None,
    tile_h: int = 200,
) -> Path:
    """Write a contact sheet PNG: one row per image, the original then ``per_image`` styled
    versions (styling forced on: ``cfg`` with ``p=1``), each captioned with the transforms applied.
    Returns the path written."""
    cfg = replace(cfg or DashcamStyle(), p=1.0)
    rng = np.random.default_rng(seed)
    tw = round(tile_h * 1.75)
    cap = 28
    rows = []
    for im in images:
        tiles = [_tile(im, tile_h, tw, "original", cap)]
        for _ in range(per_image):
            out, names = apply_style_traced(im, rng, cfg)
            tiles.append(_tile(out, tile_h, tw, " ".join(_ABBREV[n] for n in names), cap))
        gap = np.zeros((tile_h + cap, 4, 3), np.uint8)
        row = [tiles[0]]
        for t in tiles[1:]:
            row += [gap, t]
        rows.append(np.hstack(row))
    if not rows:
        raise ValueError("style_sheet needs at least one image")
    sheet = np.vstack(rows)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_png), np.ascontiguousarray(sheet[:, :, ::-1])):
        raise OSError(f"could not write {out_png}")
    return out_png
