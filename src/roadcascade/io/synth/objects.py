"""Objects to paste: RGBA patches with a kind, a real-world size and whether they mean roadwork.

Three sources:
* cut-outs of traffic cones from the boxed images of the training split (a GrabCut mask seeded by the
  cone's orange, confined to its box);
* road-works and distractor sign crops (``shared/data/signs``), masked by the sign's shape;
* procedurally drawn objects (domain randomisation of colour, stripes, size and shading): cones, barrels,
  striped barriers, traffic beacons, arrow boards and road-works boards (roadwork), and orange things
  that are not roadwork (cars, bins, balls, facade panels) and plain signs for the negatives.

Drawing happens at 4x the target size and is area-downscaled, which anti-aliases edges.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..data import Dataset


@dataclass(frozen=True)
class Patch:
    """An object image: ``rgb`` HxWx3 uint8 and ``alpha`` HxW float32 in [0, 1], foot at the bottom centre."""

    rgb: np.ndarray
    alpha: np.ndarray
    kind: str
    roadwork: bool
    height_m: float  # real-world height of the whole patch (metres)
    source: str = "drawn"  # drawn | the key of the image or crop it was cut from
    lift_m: float = 0.0  # how far above the road its foot stands (a facade panel, a sign's plate)

    @property
    def aspect(self) -> float:
        return self.rgb.shape[1] / max(1, self.rgb.shape[0])


SS = 4  # supersampling factor for drawn objects


def _jitter_color(rng: np.random.Generator, base: tuple[int, int, int], amount: float = 25.0) -> tuple[int, int, int]:
    c = np.clip(np.array(base, dtype=np.float64) + rng.normal(0.0, amount, 3), 0, 255)
    return tuple(int(v) for v in c)  # type: ignore[return-value]


def _orange(rng: np.random.Generator) -> tuple[int, int, int]:
    """Traffic orange to red-orange, as cones and barrels come."""
    hue = rng.uniform(2.0, 16.0)  # OpenCV hue (0-180)
    hsv = np.uint8([[[hue, rng.uniform(190, 255), rng.uniform(190, 255)]]])
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])  # type: ignore[return-value]


def _white(rng: np.random.Generator) -> tuple[int, int, int]:
    v = rng.uniform(200, 250)
    return tuple(int(np.clip(v + rng.normal(0, 6), 0, 255)) for _ in range(3))  # type: ignore[return-value]


def _shade(rgb: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cylinder-like horizontal shading and a light direction: multiply by a smooth left-right profile."""
    h, w = alpha.shape
    xs = np.linspace(-1.0, 1.0, w)
    light = rng.uniform(-0.6, 0.6)
    prof = 0.78 + 0.32 * np.cos(np.clip(xs - light, -1.6, 1.6) * 1.2) ** 2
    out = rgb.astype(np.float32) * prof[None, :, None]
    return np.clip(out, 0, 255).astype(np.uint8)


def _finish(canvas: np.ndarray, mask: np.ndarray, out_h: int) -> tuple[np.ndarray, np.ndarray]:
    """Downscale a supersampled drawing to ``out_h`` rows (area filter); alpha from the drawn mask."""
    h, w = mask.shape
    out_h = max(2, int(out_h))
    out_w = max(1, int(round(w * out_h / h)))
    rgb = cv2.resize(canvas, (out_w, out_h), interpolation=cv2.INTER_AREA)
    a = cv2.resize(mask.astype(np.float32), (out_w, out_h), interpolation=cv2.INTER_AREA)
    return rgb, np.clip(a, 0.0, 1.0)


def _rect(canvas: np.ndarray, mask: np.ndarray, p1, p2, color) -> None:
    """Fill a rectangle with ``color`` and mark it opaque."""
    cv2.rectangle(canvas, p1, p2, color, -1)
    cv2.rectangle(mask, p1, p2, 1, -1)


def _circle(canvas: np.ndarray, mask: np.ndarray, centre, radius: int, color) -> None:
    """Fill a disc with ``color`` and mark it opaque."""
    cv2.circle(canvas, centre, radius, color, -1)
    cv2.circle(mask, centre, radius, 1, -1)


def _stripes(canvas: np.ndarray, mask: np.ndarray, color, angle: float, period: float, duty: float = 0.5) -> None:
    """Paint diagonal stripes of ``color`` over the masked area (in place)."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / max(period, 1.0)
    band = (t - np.floor(t)) < duty
    canvas[band & (mask > 0)] = color


# ----------------------------------------------------------------------------- drawn roadwork objects


def draw_cone(rng: np.random.Generator, h: int) -> Patch:
    H = max(8, h) * SS
    W = int(H * rng.uniform(0.5, 0.66))
    canvas = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    body = _orange(rng)
    base_h = int(H * rng.uniform(0.06, 0.12))
    top_w = W * rng.uniform(0.08, 0.16)
    bot_w = W * rng.uniform(0.62, 0.78)
    cx = W / 2
    poly = np.array([[cx - top_w / 2, 0], [cx + top_w / 2, 0], [cx + bot_w / 2, H - base_h], [cx - bot_w / 2, H - base_h]], np.int32)
    cv2.fillPoly(canvas, [poly], body)
    cv2.fillPoly(mask, [poly], 1)
    white = _white(rng)
    for lo, hi in ([(0.22, 0.36), (0.5, 0.62)][: int(rng.integers(1, 3))]):
        band = np.zeros_like(mask)
        band[int(lo * H) : int(hi * H)] = 1
        canvas[(band > 0) & (mask > 0)] = white
    base_col = _jitter_color(rng, (35, 35, 35), 15) if rng.random() < 0.6 else body
    _rect(canvas, mask, (0, H - base_h), (W - 1, H - 1), base_col)
    canvas = _shade(canvas, mask, rng)
    rgb, a = _finish(canvas, mask, h)
    return Patch(rgb, a, "cone", True, rng.uniform(0.5, 0.9))


def draw_barrel(rng: np.random.Generator, h: int) -> Patch:
    H = max(8, h) * SS
    W = int(H * rng.uniform(0.55, 0.7))
    canvas = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    body = _orange(rng)
    r = int(W * 0.12)
    _rect(canvas, mask, (0, r), (W - 1, H - 1), body)
    cv2.ellipse(canvas, (W // 2, r), (W // 2, r), 0, 0, 360, body, -1)
    cv2.ellipse(mask, (W // 2, r), (W // 2, r), 0, 0, 360, 1, -1)
    white = _white(rng)
    n = int(rng.integers(2, 5))
    for i in range(n):
        y0 = int(H * (0.12 + i * 0.8 / n))
        cv2.rectangle(canvas, (0, y0), (W - 1, y0 + int(H * 0.08)), white, -1)
    cv2.rectangle(canvas, (0, int(H * 0.93)), (W - 1, H - 1), _jitter_color(rng, (30, 30, 30), 10), -1)
    canvas = _shade(canvas, mask, rng)
    rgb, a = _finish(canvas, mask, h)
    return Patch(rgb, a, "barrel", True, rng.uniform(0.9, 1.1))


def draw_barrier(rng: np.random.Generator, h: int) -> Patch:
    """A striped road-works barrier: a board with red/orange and white diagonal stripes on two legs."""
    H = max(8, h) * SS
    W = int(H * rng.uniform(1.8, 3.2))
    canvas = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    board_h = int(H * rng.uniform(0.22, 0.38))
    leg_w = max(2, int(W * 0.04))
    leg_col = _jitter_color(rng, (200, 200, 200) if rng.random() < 0.5 else (60, 60, 60), 20)
    for x in (int(W * 0.12), int(W * 0.88) - leg_w):
        _rect(canvas, mask, (x, 0), (x + leg_w, H - 1), leg_col)
    board = np.zeros_like(mask)
    cv2.rectangle(board, (0, 0), (W - 1, board_h), 1, -1)
    color = (int(rng.uniform(200, 240)), int(rng.uniform(20, 60)), int(rng.uniform(20, 50))) if rng.random() < 0.5 else _orange(rng)
    canvas[board > 0] = _white(rng)
    _stripes(canvas, board, color, angle=rng.choice([0.7, 2.4]), period=board_h * rng.uniform(0.7, 1.2))
    mask |= board
    if rng.random() < 0.4:  # a second, lower board
        y0 = int(H * 0.5)
        b2 = np.zeros_like(mask)
        cv2.rectangle(b2, (0, y0), (W - 1, y0 + board_h // 2), 1, -1)
        canvas[b2 > 0] = _white(rng)
        _stripes(canvas, b2, color, angle=0.7, period=board_h * 0.9)
        mask |= b2
    canvas = _shade(canvas, mask, rng)
    rgb, a = _finish(canvas, mask, h)
    return Patch(rgb, a, "barrier", True, rng.uniform(0.9, 1.2))


def draw_beacon(rng: np.random.Generator, h: int) -> Patch:
    """A traffic beacon / channelizer (German Leitbake): a tall narrow panel with red-white diagonal
    stripes on a dark foot."""
    H = max(8, h) * SS
    W = int(H * rng.uniform(0.18, 0.3))
    canvas = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    foot_h = int(H * 0.1)
    cv2.rectangle(mask, (0, 0), (W - 1, H - foot_h), 1, -1)
    canvas[mask > 0] = _white(rng)
    red = (int(rng.uniform(190, 240)), int(rng.uniform(10, 50)), int(rng.uniform(10, 40))) if rng.random() < 0.6 else _orange(rng)
    _stripes(canvas, mask, red, angle=rng.choice([0.9, 2.2]), period=W * rng.uniform(0.8, 1.2))
    fw = int(W * 1.6)
    foot = np.zeros((H, max(W, fw), 3), np.uint8)
    fmask = np.zeros((H, max(W, fw)), np.uint8)
    off = (foot.shape[1] - W) // 2
    foot[:, off : off + W] = canvas
    fmask[:, off : off + W] = mask
    cv2.rectangle(foot, (0, H - foot_h), (foot.shape[1] - 1, H - 1), _jitter_color(rng, (30, 30, 30), 10), -1)
    cv2.rectangle(fmask, (0, H - foot_h), (foot.shape[1] - 1, H - 1), 1, -1)
    rgb, a = _finish(_shade(foot, fmask, rng), fmask, h)
    return Patch(rgb, a, "beacon", True, rng.uniform(1.0, 1.3))


def draw_arrow_board(rng: np.random.Generator, h: int) -> Patch:
    """An arrow board on a trailer: a black panel with amber lamps in an arrow or chevrons."""
    H = max(10, h) * SS
    W = int(H * rng.uniform(0.75, 1.2))
    canvas = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    panel_h = int(H * rng.uniform(0.5, 0.65))
    _rect(canvas, mask, (0, 0), (W - 1, panel_h), _jitter_color(rng, (20, 20, 20), 8))
    lamp = _jitter_color(rng, (255, 190, 40), 20)
    r = max(2, int(min(W, panel_h) * 0.05))
    pts = []
    direction = rng.choice([-1, 1])
    cy = panel_h // 2
    if rng.random() < 0.6:  # arrow: shaft and head
        for x in np.linspace(W * 0.15, W * 0.7, 6):
            pts.append((x, cy))
        for k in range(1, 4):
            pts += [(W * 0.7 - k * W * 0.07, cy - k * panel_h * 0.1), (W * 0.7 - k * W * 0.07, cy + k * panel_h * 0.1)]
    else:  # chevrons
        for c0 in (0.25, 0.5, 0.75):
            for k in range(-3, 4):
                pts.append((W * c0 - abs(k) * W * 0.05, cy + k * panel_h * 0.1))
    for x, y in pts:
        x = x if direction > 0 else W - x
        cv2.circle(canvas, (int(x), int(y)), r, lamp, -1)
    # trailer: a post and a dark box with wheels
    _rect(canvas, mask, (int(W * 0.45), panel_h), (int(W * 0.55), int(H * 0.8)), (70, 70, 70))
    tcol = _jitter_color(rng, (230, 200, 60) if rng.random() < 0.4 else (90, 90, 90), 25)
    _rect(canvas, mask, (int(W * 0.1), int(H * 0.75)), (int(W * 0.9), int(H * 0.9)), tcol)
    for x in (0.25, 0.75):
        _circle(canvas, mask, (int(W * x), int(H * 0.92)), int(H * 0.07), (15, 15, 15))
    rgb, a = _finish(canvas, mask, h)
    return Patch(rgb, a, "arrow_board", True, rng.uniform(2.0, 3.0))


def _glyph_strokes(canvas: np.ndarray, box: tuple[int, int, int, int], color, rng: np.random.Generator, lines: int) -> None:
    """Text-like strokes (a few rows of short bars) inside ``box``."""
    x0, y0, x1, y1 = box
    lh = (y1 - y0) / max(1, lines)
    th = max(1, int(lh * 0.18))
    for i in range(lines):
        y = int(y0 + (i + 0.5) * lh)
        x = x0 + rng.uniform(0, 0.1) * (x1 - x0)
        while x < x1 - 2:
            wlen = rng.uniform(0.08, 0.25) * (x1 - x0)
            cv2.line(canvas, (int(x), y), (int(min(x + wlen, x1)), y), color, th)
            x += wlen + rng.uniform(0.04, 0.1) * (x1 - x0)


def _on_post(plate: np.ndarray, pmask: np.ndarray, rng: np.random.Generator, post_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Stand a sign plate on a grey post ``post_ratio`` times the plate's height."""
    ph, pw = pmask.shape
    post_h = int(ph * post_ratio)
    H = ph + post_h
    canvas = np.zeros((H, pw, 3), np.uint8)
    mask = np.zeros((H, pw), np.float32)
    pole_w = max(1, int(pw * rng.uniform(0.05, 0.09)))
    x0 = pw // 2 - pole_w // 2
    canvas[ph:, x0 : x0 + pole_w] = _jitter_color(rng, (130, 130, 130), 25)
    mask[ph:, x0 : x0 + pole_w] = 1.0
    canvas[:ph] = plate
    mask[:ph] = np.maximum(mask[:ph], pmask)
    return canvas, mask


def draw_roadwork_board(rng: np.random.Generator, h: int) -> Patch:
    """A road-works sign board: an orange diamond (the US/AU style) or an orange/yellow rectangle with
    text strokes ("ROAD WORK AHEAD", "PREPARE TO STOP"), on a post or a frame."""
    P = max(8, h) * SS
    plate = np.zeros((P, P, 3), np.uint8)
    pm = np.zeros((P, P), np.uint8)
    fill = _orange(rng) if rng.random() < 0.8 else _jitter_color(rng, (245, 200, 30), 15)
    if rng.random() < 0.5:
        d = np.array([[P / 2, 0], [P - 1, P / 2], [P / 2, P - 1], [0, P / 2]], np.int32)
        cv2.fillPoly(plate, [d], (10, 10, 10))
        cv2.fillPoly(pm, [d], 1)
        inner = ((d - P / 2) * 0.9 + P / 2).astype(np.int32)
        cv2.fillPoly(plate, [inner], fill)
        _glyph_strokes(plate, (int(P * 0.3), int(P * 0.3), int(P * 0.7), int(P * 0.7)), (10, 10, 10), rng, int(rng.integers(1, 4)))
        plate_h = P
    else:
        plate_h = int(P * rng.uniform(0.5, 0.8))
        plate = plate[:plate_h]
        pm = pm[:plate_h]
        cv2.rectangle(plate, (0, 0), (P - 1, plate_h - 1), fill, -1)
        cv2.rectangle(plate, (0, 0), (P - 1, plate_h - 1), (10, 10, 10), max(1, P // 40))
        pm[:] = 1
        _glyph_strokes(plate, (int(P * 0.08), int(plate_h * 0.1), int(P * 0.92), int(plate_h * 0.9)), (10, 10, 10), rng, int(rng.integers(2, 4)))
    canvas, mask = _on_post(plate, pm.astype(np.float32), rng, rng.uniform(0.3, 1.2))
    rgb, a = _finish(canvas, mask, h)
    return Patch(rgb, a, "roadwork_board", True, rng.uniform(1.4, 2.4))


# ----------------------------------------------------------------------------- drawn distractors (not roadwork)


def draw_vehicle(rng: np.random.Generator, h: int) -> Patch:
    """A boxy car or van, often orange, red or yellow: colour alone must not mean roadwork."""
    H = max(8, h) * SS
    W = int(H * rng.uniform(1.3, 2.4))
    canvas = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    col = _orange(rng) if rng.random() < 0.6 else _jitter_color(rng, (230, 190, 30) if rng.random() < 0.5 else (200, 40, 30), 20)
    roof = int(H * rng.uniform(0.0, 0.35))
    _rect(canvas, mask, (int(W * 0.1), roof), (int(W * 0.9), int(H * 0.6)), col)
    _rect(canvas, mask, (0, int(H * 0.45)), (W - 1, int(H * 0.88)), col)
    cv2.rectangle(canvas, (int(W * 0.16), roof + int(H * 0.06)), (int(W * 0.84), int(H * 0.42)), _jitter_color(rng, (40, 50, 60), 10), -1)
    for x in (0.2, 0.8):
        _circle(canvas, mask, (int(W * x), int(H * 0.86)), int(H * 0.13), (15, 15, 15))
    for x in (0.05, 0.85):  # lights
        cv2.rectangle(canvas, (int(W * x), int(H * 0.55)), (int(W * (x + 0.1)), int(H * 0.62)), (240, 230, 200), -1)
    canvas = _shade(canvas, mask, rng)
    rgb, a = _finish(canvas, mask, h)
    return Patch(rgb, a, "vehicle", False, rng.uniform(1.4, 2.2))


def draw_bin(rng: np.random.Generator, h: int) -> Patch:
    """A wheelie bin or a street bin, orange about half of the time (no stripes)."""
    H = max(8, h) * SS
    W = int(H * rng.uniform(0.5, 0.75))
    canvas = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    col = _orange(rng) if rng.random() < 0.5 else _jitter_color(rng, [(40, 110, 50), (40, 60, 150), (70, 70, 70), (200, 180, 40)][int(rng.integers(0, 4))], 15)
    _rect(canvas, mask, (int(W * 0.05), int(H * 0.1)), (int(W * 0.95), int(H * 0.92)), col)
    _rect(canvas, mask, (0, 0), (W - 1, int(H * 0.12)), tuple(int(c * 0.8) for c in col))
    _circle(canvas, mask, (int(W * 0.25), int(H * 0.93)), int(H * 0.07), (15, 15, 15))
    canvas = _shade(canvas, mask, rng)
    rgb, a = _finish(canvas, mask, h)
    return Patch(rgb, a, "bin", False, rng.uniform(0.9, 1.2))


def draw_ball(rng: np.random.Generator, h: int) -> Patch:
    """An orange ball or round lamp globe."""
    H = max(6, h) * SS
    canvas = np.zeros((H, H, 3), np.uint8)
    mask = np.zeros((H, H), np.uint8)
    _circle(canvas, mask, (H // 2, H // 2), H // 2 - 1, _orange(rng))
    canvas = _shade(canvas, mask, rng)
    rgb, a = _finish(canvas, mask, h)
    return Patch(rgb, a, "ball", False, rng.uniform(0.2, 0.7))


def draw_panel(rng: np.random.Generator, h: int) -> Patch:
    """A shop sign, awning or advertising panel (often orange) standing above the road edge: flat colour
    and text, no stripes, no road-works shape."""
    H = max(6, h) * SS
    W = int(H * rng.uniform(1.5, 4.0))
    canvas = np.zeros((H, W, 3), np.uint8)
    mask = np.ones((H, W), np.uint8)
    col = _orange(rng) if rng.random() < 0.6 else _jitter_color(rng, [(200, 30, 30), (30, 90, 170), (240, 240, 240), (30, 130, 60)][int(rng.integers(0, 4))], 15)
    canvas[:] = col
    text = (255, 255, 255) if sum(col) < 450 else (20, 20, 20)
    _glyph_strokes(canvas, (int(W * 0.05), int(H * 0.15), int(W * 0.95), int(H * 0.85)), text, rng, int(rng.integers(1, 3)))
    rgb, a = _finish(canvas, mask, h)
    return Patch(rgb, a, "panel", False, rng.uniform(0.6, 1.5), lift_m=float(rng.uniform(2.2, 4.5)))


def draw_plain_sign(rng: np.random.Generator, h: int) -> Patch:
    """A blue or white information / direction sign on a post (not roadwork)."""
    P = max(8, h) * SS
    ph = int(P * rng.uniform(0.5, 1.0))
    plate = np.zeros((ph, P, 3), np.uint8)
    col = _jitter_color(rng, [(30, 80, 170), (240, 240, 240), (30, 120, 60)][int(rng.integers(0, 3))], 12)
    plate[:] = col
    _glyph_strokes(plate, (int(P * 0.1), int(ph * 0.15), int(P * 0.9), int(ph * 0.85)), (255, 255, 255) if sum(col) < 450 else (20, 20, 20), rng, int(rng.integers(1, 4)))
    canvas, mask = _on_post(plate, np.ones((ph, P), np.float32), rng, rng.uniform(0.6, 1.6))
    rgb, a = _finish(canvas, mask, h)
    return Patch(rgb, a, "plain_sign", False, rng.uniform(1.6, 2.8))


Drawer = Callable[[np.random.Generator, int], Patch]

ROADWORK_DRAWERS: dict[str, Drawer] = {
    "cone": draw_cone,
    "barrel": draw_barrel,
    "barrier": draw_barrier,
    "beacon": draw_beacon,
    "arrow_board": draw_arrow_board,
    "roadwork_board": draw_roadwork_board,
}
DISTRACTOR_DRAWERS: dict[str, Drawer] = {
    "vehicle": draw_vehicle,
    "bin": draw_bin,
    "ball": draw_ball,
    "panel": draw_panel,
    "plain_sign": draw_plain_sign,
}


# ----------------------------------------------------------------------------- cut-outs


def cone_mask(crop: np.ndarray, box: tuple[int, int, int, int], iters: int = 3) -> np.ndarray | None:
    """A foreground mask (uint8 0/1, the crop's shape) of the cone inside ``box`` (x1, y1, x2, y2 in the
    crop): GrabCut initialised with the box, its orange pixels marked as sure foreground. Nothing outside
    the box is ever foreground. ``None`` when the mask does not look like an object (too little or too
    much of the box, or no orange in it)."""
    x1, y1, x2, y2 = box
    h, w = crop.shape[:2]
    if x2 - x1 < 4 or y2 - y1 < 6:
        return None
    hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)
    orange = (((hsv[..., 0] <= 22) | (hsv[..., 0] >= 170)) & (hsv[..., 1] >= 110) & (hsv[..., 2] >= 70)).astype(np.uint8)
    inbox = np.zeros((h, w), np.uint8)
    inbox[y1:y2, x1:x2] = 1
    gc = np.where(inbox > 0, cv2.GC_PR_FGD, cv2.GC_BGD).astype(np.uint8)
    gc[(orange > 0) & (inbox > 0)] = cv2.GC_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut seeds its colour models from OpenCV's global generator: same crop, same mask
    try:
        cv2.grabCut(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), gc, None, bgd, fgd, iters, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return None
    m = (((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)) & (inbox > 0)).astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m)
    if n <= 1:
        return None
    m = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    box_area = (x2 - x1) * (y2 - y1)
    frac = m.sum() / box_area
    orange_frac = (orange & m).sum() / max(1, m.sum())
    if not (0.15 <= frac <= 0.9) or orange_frac < 0.15:
        return None
    return m


def cone_cutouts(ds: Dataset, max_items: int = 600, min_px: int = 16) -> list[Patch]:
    """Cone patches cut from every boxed image of ``ds`` (in manifest order, at most ``max_items``)."""
    out: list[Patch] = []
    for s in ds.samples:
        if not s.boxes or s.label != 1:
            continue
        img = s.load()
        H, W = img.shape[:2]
        for cx, cy, bw, bh in s.boxes:
            x1, y1 = int(round((cx - bw / 2) * W)), int(round((cy - bh / 2) * H))
            x2, y2 = int(round((cx + bw / 2) * W)), int(round((cy + bh / 2) * H))
            x1, y1, x2, y2 = max(0, x1), max(0, y1), min(W, x2), min(H, y2)
            if y2 - y1 < min_px or x2 - x1 < min_px // 3:
                continue
            mx, my = max(2, (x2 - x1) // 4), max(2, (y2 - y1) // 4)  # context around the box for GrabCut
            X1, Y1, X2, Y2 = max(0, x1 - mx), max(0, y1 - my), min(W, x2 + mx), min(H, y2 + my)
            crop = img[Y1:Y2, X1:X2]
            m = cone_mask(crop, (x1 - X1, y1 - Y1, x2 - X1, y2 - Y1))
            if m is None:
                continue
            sub = (slice(y1 - Y1, y2 - Y1), slice(x1 - X1, x2 - X1))
            alpha = cv2.GaussianBlur(m[sub].astype(np.float32), (3, 3), 0.6) * m[sub]
            out.append(Patch(np.ascontiguousarray(crop[sub]), alpha.astype(np.float32), "cone_cutout", True, 0.7, source=s.key))
            if len(out) >= max_items:
                return out
    return out


# ----------------------------------------------------------------------------- signs

# GTSRB class ids by plate shape
_TRIANGLE = set(range(18, 32)) | {11}
_SHAPES = {12: "diamond", 13: "inverted", 14: "octagon"}


def sign_shape(class_id: int) -> str:
    return _SHAPES.get(class_id, "triangle" if class_id in _TRIANGLE else "circle")


def shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """A float mask of a sign plate of ``shape`` filling an h x w box."""
    m = np.zeros((h * SS, w * SS), np.uint8)
    H, W = m.shape
    if shape == "circle":
        cv2.ellipse(m, (W // 2, H // 2), (W // 2 - 1, H // 2 - 1), 0, 0, 360, 1, -1)
    elif shape == "triangle":
        cv2.fillPoly(m, [np.array([[W / 2, 0], [W - 1, H - 1], [0, H - 1]], np.int32)], 1)
    elif shape == "inverted":
        cv2.fillPoly(m, [np.array([[0, 0], [W - 1, 0], [W / 2, H - 1]], np.int32)], 1)
    elif shape == "diamond":
        cv2.fillPoly(m, [np.array([[W / 2, 0], [W - 1, H / 2], [W / 2, H - 1], [0, H / 2]], np.int32)], 1)
    else:  # octagon
        t = 0.29
        pts = [[W * t, 0], [W * (1 - t), 0], [W - 1, H * t], [W - 1, H * (1 - t)], [W * (1 - t), H - 1], [W * t, H - 1], [0, H * (1 - t)], [0, H * t]]
        cv2.fillPoly(m, [np.array(pts, np.int32)], 1)
    return cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class SignCrop:
    key: str
    rgb: np.ndarray  # the plate (the crop's roi)
    alpha: np.ndarray
    roadwork: bool
    track: str


def track_split(track: str, holdout: float = 0.2) -> str:
    """Signs split by track (one physical sign), stably: ``train`` or ``holdout``."""
    v = int(hashlib.sha1(track.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "holdout" if v < holdout else "train"


def load_signs(root: Path, split: str = "train") -> list[SignCrop]:
    """Sign plates of the tracks in ``split`` (see :func:`track_split`), masked by their shape."""
    from ..images import decode_path

    man = Path(root) / "manifest.csv"
    out: list[SignCrop] = []
    with open(man, newline="") as f:
        for row in csv.DictReader(f):
            if track_split(row["track"]) != split:
                continue
            img = decode_path(Path(root) / row["file"])
            x1, y1, x2, y2 = (int(v) for v in row["roi"].split(","))
            x1, y1 = max(0, x1), max(0, y1)
            x2, y2 = min(img.shape[1], x2 + 1), min(img.shape[0], y2 + 1)
            if x2 - x1 < 8 or y2 - y1 < 8:
                continue
            plate = np.ascontiguousarray(img[y1:y2, x1:x2])
            out.append(SignCrop(row["file"], plate, shape_mask(sign_shape(int(row["class_id"])), *plate.shape[:2]),
                                row["roadwork"] == "1", row["track"]))
    return out


def sign_patch(sign: SignCrop, rng: np.random.Generator) -> Patch:
    """A sign plate on a post (post 0.8-2.2 plate heights)."""
    canvas, mask = _on_post(sign.rgb, sign.alpha, rng, rng.uniform(0.8, 2.2))
    plate_m = rng.uniform(0.6, 0.9)
    return Patch(canvas, mask, "roadwork_sign" if sign.roadwork else "sign", sign.roadwork,
                 plate_m * canvas.shape[0] / sign.rgb.shape[0], source=sign.key)
