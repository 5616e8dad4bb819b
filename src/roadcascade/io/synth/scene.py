"""Scene geometry for pasting objects into a dashcam frame: a flat road seen by a level camera.

A camera at height ``cam_h`` metres over a flat road, looking along it, sees a ground point at distance
``d`` and lateral offset ``X`` (metres) at

    row = horizon + f * cam_h / d          col = vp_x + f * X / d

so with ``ppm(row) = (row - horizon) / cam_h`` (pixels per metre at that row) an object of height ``m``
standing at ``row`` is ``m * ppm(row)`` pixels tall and sits at ``col = vp_x + X * ppm(row)``. The focal
length cancels: every placement is a (lateral offset, row) pair and the size follows from the row. Rows
below the horizon only: nothing is placed in the sky.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    horizon: float  # row of the horizon (pixels from the top)
    vp_x: float  # column of the vanishing point
    cam_h: float  # camera height over the road (metres)
    f: float  # focal length in pixels (only for converting distances to rows)

    def ppm(self, row: float) -> float:
        """Pixels per metre for an object standing on the road at ``row`` (0 at and above the horizon)."""
        return max(0.0, (row - self.horizon) / self.cam_h)

    def row_at(self, distance: float) -> float:
        """Image row of the road point ``distance`` metres ahead."""
        return self.horizon + self.f * self.cam_h / max(distance, 1e-3)

    def col_at(self, lateral: float, row: float) -> float:
        """Image column of the road point ``lateral`` metres right of the camera's axis, at ``row``."""
        return self.vp_x + lateral * self.ppm(row)


def random_scene(width: int, height: int, rng: np.random.Generator) -> Scene:
    """A plausible dashcam camera for a frame: horizon at 45-60 % of the height, vanishing point near the
    centre, camera 1.2-1.7 m high, horizontal field of view 55-80 degrees."""
    hfov = np.deg2rad(rng.uniform(55.0, 80.0))
    f = width / (2.0 * np.tan(hfov / 2.0))
    return Scene(
        width=width,
        height=height,
        horizon=float(height * rng.uniform(0.45, 0.6)),
        vp_x=float(width * (0.5 + rng.uniform(-0.1, 0.1))),
        cam_h=float(rng.uniform(1.2, 1.7)),
        f=float(f),
    )


@dataclass(frozen=True)
class Placement:
    """Where one object stands: its foot (bottom centre) in pixels and its size in pixels."""

    col: float
    row: float
    height_px: float
    width_px: float
    distance: float

    def box(self) -> tuple[float, float, float, float]:
        """x1, y1, x2, y2 in pixels (unclipped)."""
        return (self.col - self.width_px / 2, self.row - self.height_px, self.col + self.width_px / 2, self.row)


def place(scene: Scene, lateral: float, distance: float, height_m: float, aspect: float) -> Placement:
    """The pixel placement of an object ``height_m`` tall, ``aspect`` (width / height) wide."""
    row = scene.row_at(distance)
    h = height_m * scene.ppm(row)
    return Placement(col=scene.col_at(lateral, row), row=row, height_px=h, width_px=h * aspect, distance=distance)


def visible(p: Placement, scene: Scene, min_px: float = 5.0, min_inside: float = 0.5) -> bool:
    """Large enough to see and at least ``min_inside`` of its box inside the frame."""
    if p.height_px < min_px or p.row <= scene.horizon:
        return False
    x1, y1, x2, y2 = p.box()
    ix = max(0.0, min(x2, scene.width) - max(x1, 0.0))
    iy = max(0.0, min(y2, scene.height) - max(y1, 0.0))
    area = max(1e-6, (x2 - x1) * (y2 - y1))
    return ix * iy / area >= min_inside


def line_layout(rng: np.random.Generator, n: int, side: float, near: float, spacing: float,
                lateral: float, taper: float = 0.0) -> list[tuple[float, float]]:
    """(lateral, distance) of ``n`` objects in a line along a lane edge, ``spacing`` metres apart, starting
    ``near`` metres ahead; ``taper`` metres of lateral shift per object closes the lane like a work-zone
    taper. ``side`` is -1 (left) or +1 (right)."""
    out = []
    d = near
    for i in range(n):
        out.append((side * (lateral - taper * i) + rng.normal(0.0, 0.08), d))
        d += spacing * rng.uniform(0.85, 1.15)  # each gap jittered on its own: the line stays in order
    return out


def cluster_layout(rng: np.random.Generator, n: int, lateral: float, distance: float, spread: float = 0.8) -> list[tuple[float, float]]:
    """(lateral, distance) of ``n`` objects scattered around one point."""
    return [(lateral + rng.normal(0.0, spread), max(2.5, distance + rng.normal(0.0, spread * 1.5))) for _ in range(n)]


def _intersections(lines: np.ndarray) -> np.ndarray:
    """Pairwise intersections (x, y) of left- and right-leaning segments."""
    x1, y1, x2, y2 = (lines[:, k].astype(np.float64) for k in range(4))
    slope = (y2 - y1) / np.where(np.abs(x2 - x1) < 1e-6, 1e-6, x2 - x1)
    icpt = y1 - slope * x1
    left, right = slope < 0, slope > 0  # image rows grow downwards: a left road edge rises to the right
    pts = []
    for i in np.flatnonzero(left):
        for j in np.flatnonzero(right):
            x = (icpt[j] - icpt[i]) / (slope[i] - slope[j])
            pts.append((x, slope[i] * x + icpt[i]))
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def estimate_vanishing_point(img: np.ndarray, min_pairs: int = 3) -> tuple[float, float] | None:
    """The road's vanishing point (col, row) from lane markings and road edges: straight segments in the
    lower part of the frame leaning 15-70 degrees, the median of the crossings of left- and right-leaning
    ones. None when too few cross inside a plausible band (rows 25-75 %)."""
    import cv2

    H, W = img.shape[:2]
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    top = int(H * 0.35)
    edges = cv2.Canny(cv2.GaussianBlur(grey[top:], (3, 3), 0), 60, 160)
    segs = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold=max(12, H // 12), minLineLength=max(10, H // 10), maxLineGap=max(3, H // 40))
    if segs is None:
        return None
    segs = segs.reshape(-1, 4).astype(np.float64)
    segs[:, [1, 3]] += top
    ang = np.degrees(np.arctan2(np.abs(segs[:, 3] - segs[:, 1]), np.abs(segs[:, 2] - segs[:, 0])))
    segs = segs[(ang > 15) & (ang < 70)]
    if len(segs) < 2:
        return None
    pts = _intersections(segs[:40])
    ok = (pts[:, 1] > 0.25 * H) & (pts[:, 1] < 0.75 * H) & (pts[:, 0] > 0.1 * W) & (pts[:, 0] < 0.9 * W) if len(pts) else np.zeros(0, bool)
    if ok.sum() < min_pairs:
        return None
    c, r = np.median(pts[ok], axis=0)
    return float(c), float(r)


def scene_for(img: np.ndarray, rng: np.random.Generator) -> Scene:
    """:func:`random_scene` with the horizon and vanishing point taken from the frame where its road lines
    show them (the camera's pitch and the crop vary a lot between data sets)."""
    H, W = img.shape[:2]
    s = random_scene(W, H, rng)
    vp = estimate_vanishing_point(img)
    if vp is None:
        return s
    col, row = vp
    return Scene(W, H, horizon=row + rng.normal(0, 0.01 * H), vp_x=col + rng.normal(0, 0.01 * W), cam_h=s.cam_h, f=s.f)
