"""Pasting a patch into a frame so that it belongs there: size from the scene, light and colour cast of
the surrounding pixels, a contact shadow, the frame's blur and noise, soft edges, optional occlusion.

Every paste (roadwork or distractor) goes through the same function, so a paste's look never tells the
label: only what was pasted does.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .objects import Patch
from .scene import Placement


@dataclass(frozen=True)
class FrameStats:
    """What the paste is matched to, measured once per frame."""

    luma: np.ndarray  # HxW float32 luma, blurred (local light)
    mean_rgb: np.ndarray  # HxWx3 float32, blurred (local colour cast)
    noise: float  # high-frequency noise std (grey levels)
    sharpness: float  # mean gradient magnitude of the luma (the frame's blur level)


def frame_stats(img: np.ndarray) -> FrameStats:
    f = img.astype(np.float32)
    luma = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    k = max(3, (min(img.shape[:2]) // 8) | 1)
    blur_l = cv2.blur(luma, (k, k))
    blur_c = cv2.blur(f, (k, k))
    hp = luma - cv2.GaussianBlur(luma, (3, 3), 0.8)
    noise = float(np.median(np.abs(hp)) * 1.4826)
    gx = cv2.Sobel(luma, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(luma, cv2.CV_32F, 0, 1, ksize=3)
    return FrameStats(blur_l, blur_c, noise, float(np.mean(np.hypot(gx, gy))))


def _resize(p: Patch, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    interp = cv2.INTER_AREA if h < p.rgb.shape[0] else cv2.INTER_LINEAR
    rgb = cv2.resize(p.rgb, (w, h), interpolation=interp).astype(np.float32)
    a = cv2.resize(p.alpha.astype(np.float32), (w, h), interpolation=interp)
    return rgb, np.clip(a, 0.0, 1.0)


def paste(img: np.ndarray, p: Patch, at: Placement, rng: np.random.Generator, stats: FrameStats,
          occlude: float = 0.0, shadow: bool = True) -> tuple[int, int, int, int] | None:
    """Paste ``p`` into ``img`` (in place) with its foot at ``at``; returns the visible box (x1, y1, x2, y2,
    pixels, clipped to the frame) or None when nothing of it lands in the frame. ``occlude`` hides that
    fraction of the object from one side (something in front of it)."""
    H, W = img.shape[:2]
    h = max(2, int(round(at.height_px)))
    w = max(1, int(round(h * p.aspect)))
    rgb, a = _resize(p, h, w)
    lift = int(round(p.lift_m * at.height_px / max(p.height_m, 1e-3)))
    x1 = int(round(at.col - w / 2))
    y2 = int(round(at.row)) - lift
    y1 = y2 - h
    cx1, cy1, cx2, cy2 = max(0, x1), max(0, y1), min(W, x1 + w), min(H, y2)
    if cx2 <= cx1 or cy2 <= cy1:
        return None
    # light and colour: the patch takes the local brightness and a share of the local colour cast
    loc_l = float(stats.luma[min(H - 1, max(0, (cy1 + cy2) // 2)), min(W - 1, max(0, (cx1 + cx2) // 2))])
    gain = float(np.clip((loc_l / 128.0) ** rng.uniform(0.5, 0.9), 0.25, 1.25) * rng.uniform(0.85, 1.1))
    cast = stats.mean_rgb[cy1:cy2, cx1:cx2].reshape(-1, 3).mean(0)
    cast = cast / max(1.0, float(cast.mean()))
    tau = rng.uniform(0.15, 0.45)
    rgb = rgb * gain * ((1 - tau) + tau * cast)[None, None, :]
    # the frame's blur: a soft frame gets a soft object
    sigma = float(np.clip(rng.uniform(0.3, 0.8) * (12.0 / max(stats.sharpness, 3.0)), 0.0, 1.6))
    if sigma > 0.35 and min(h, w) >= 3:
        rgb = cv2.GaussianBlur(rgb, (0, 0), sigma)
        a = cv2.GaussianBlur(a, (0, 0), sigma * 0.7)
    if occlude > 0:
        cut = int(round(occlude * w))
        if rng.random() < 0.5:
            a[:, :cut] = 0.0
        else:
            a[:, w - cut :] = 0.0
    sx, sy = cx1 - x1, cy1 - y1
    a_c = a[sy : sy + (cy2 - cy1), sx : sx + (cx2 - cx1)]
    rgb_c = rgb[sy : sy + (cy2 - cy1), sx : sx + (cx2 - cx1)]
    if a_c.max() <= 0.05:
        return None
    region = img[cy1:cy2, cx1:cx2].astype(np.float32)
    if shadow and lift == 0:
        _contact_shadow(img, at, w, rng)
        region = img[cy1:cy2, cx1:cx2].astype(np.float32)
    noise = rng.normal(0.0, max(0.5, stats.noise), rgb_c.shape).astype(np.float32)
    out = region * (1 - a_c[..., None]) + np.clip(rgb_c + noise, 0, 255) * a_c[..., None]
    img[cy1:cy2, cx1:cx2] = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(a_c > 0.3)
    if len(xs) == 0:
        return None
    return (cx1 + int(xs.min()), cy1 + int(ys.min()), cx1 + int(xs.max()) + 1, cy1 + int(ys.max()) + 1)


def _contact_shadow(img: np.ndarray, at: Placement, w: int, rng: np.random.Generator) -> None:
    """A soft dark ellipse on the road under the object's foot."""
    H, W = img.shape[:2]
    ax = max(1, int(w * rng.uniform(0.5, 0.8)))
    ay = max(1, int(w * rng.uniform(0.08, 0.18)))
    cx, cy = int(round(at.col + rng.uniform(-0.2, 0.2) * w)), int(round(at.row))
    x1, y1, x2, y2 = max(0, cx - 2 * ax), max(0, cy - 2 * ay), min(W, cx + 2 * ax), min(H, cy + 2 * ay)
    if x2 <= x1 or y2 <= y1:
        return
    m = np.zeros((y2 - y1, x2 - x1), np.float32)
    cv2.ellipse(m, (cx - x1, cy - y1), (ax, ay), 0, 0, 360, 1.0, -1)
    m = cv2.GaussianBlur(m, (0, 0), max(0.8, ay * 0.6)) * rng.uniform(0.2, 0.45)
    img[y1:y2, x1:x2] = np.clip(img[y1:y2, x1:x2].astype(np.float32) * (1 - m[..., None]), 0, 255).astype(np.uint8)
