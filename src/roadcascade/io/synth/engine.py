"""The synthesis engine: dashcam frames of the training split with roadwork pasted in (positives) and the
same frames with distractors pasted in (negatives), written as a StreetWork-style manifest.

Pairs: image ``2k`` is a positive and ``2k + 1`` a negative on the same background, so the pair differs
only in what was pasted, never in the frame or in how pasting looks. Positives carry distractors too
(sometimes), so neither "a sign", "orange" nor "something was pasted" alone means roadwork.

Only the ``train`` split feeds it (backgrounds and cut-out cones) and only the ``train`` sign tracks; the
meta file lists every source key used, and the tests check that none is from ``val`` or ``test``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..data import Dataset, open_dataset
from ..images import encode_jpeg
from ...metrics import DASHCAM_NEGATIVE_SOURCES
from .compose import FrameStats, frame_stats, paste
from .objects import DISTRACTOR_DRAWERS, ROADWORK_DRAWERS, Patch, SignCrop, cone_cutouts, load_signs, sign_patch
from .scene import Scene, cluster_layout, line_layout, place, scene_for, visible

SYNTH_SOURCE = "synth"
MANIFEST_COLUMNS = ("file", "label", "split", "source", "width", "height", "license", "boxes", "objects", "background")
CONE_KINDS = ("cone", "cone_cutout")

Log = Callable[[str], None]


@dataclass(frozen=True)
class SynthConfig:
    n: int = 1200  # images written: half positives, half negatives
    seed: int = 0
    data: str | None = None  # StreetWork manifest dir (default: the project's)
    signs: str | None = None  # sign crops dir (default: ``signs`` beside the data dir)
    background_sources: tuple[str, ...] = DASHCAM_NEGATIVE_SOURCES
    cutouts: bool = True  # cones cut from the boxed train images
    drawn: bool = True  # procedurally drawn roadwork objects
    road_signs: bool = True  # road-works sign crops
    distractors_in_positives: float = 0.35
    occlusion: float = 0.15  # probability that an object is partly hidden
    min_height: float = 0.02  # smallest object pasted, as a share of the frame's height (roadwork and distractors alike)
    portrait: float = 0.35  # probability of a portrait (phone held upright) window around the pasted objects
    jpeg_quality: int = 90
    max_cutouts: int = 600

    def key(self) -> dict:
        return asdict(self)


@dataclass
class Banks:
    """What the engine draws from: backgrounds and cut-outs (train split), signs (train tracks)."""

    backgrounds: Dataset
    cones: list[Patch] = field(default_factory=list)
    roadwork_signs: list[SignCrop] = field(default_factory=list)
    distractor_signs: list[SignCrop] = field(default_factory=list)


def default_signs_root(data_root: Path) -> Path:
    return data_root.parent / "signs"


def load_banks(cfg: SynthConfig, log: Log = print) -> Banks:
    from ..data import default_data_root

    data_root = Path(cfg.data) if cfg.data else default_data_root()
    train = open_dataset(data_root, "train")  # only ever the training split
    bgs = Dataset(f"{train.name}:backgrounds", [s for s in train.samples if s.label == 0 and s.source in cfg.background_sources])
    if not bgs.samples:
        raise ValueError(f"no dashcam negatives ({', '.join(cfg.background_sources)}) in the train split of {data_root}")
    cones = cone_cutouts(train, max_items=cfg.max_cutouts) if cfg.cutouts else []
    signs_root = Path(cfg.signs) if cfg.signs else default_signs_root(data_root)
    signs = load_signs(signs_root, "train") if (signs_root / "manifest.csv").exists() else []
    if cfg.road_signs and not any(s.roadwork for s in signs):
        raise ValueError(f"road-works signs requested but none found under {signs_root}")
    banks = Banks(bgs, cones, [s for s in signs if s.roadwork] if cfg.road_signs else [], [s for s in signs if not s.roadwork])
    log(f"synth banks: {len(bgs)} backgrounds, {len(banks.cones)} cone cut-outs, {len(banks.roadwork_signs)} road-works signs, "
        f"{len(banks.distractor_signs)} distractor signs")
    return banks


# ----------------------------------------------------------------------------- what goes where

# (kind, weight) of roadwork groups; a kind needs its source enabled
_ROADWORK_WEIGHTS = {"cone_cutout": 3.0, "cone": 1.6, "barrel": 1.0, "barrier": 1.0, "beacon": 0.8, "arrow_board": 0.6,
                     "roadwork_board": 0.9, "roadwork_sign": 1.4}
_DISTRACTOR_WEIGHTS = {"sign": 2.0, "vehicle": 1.2, "bin": 1.0, "ball": 0.5, "panel": 1.0, "plain_sign": 1.0}
_NOMINAL_M = {"cone": 0.7, "cone_cutout": 0.7, "barrel": 1.0, "barrier": 1.0, "beacon": 1.15, "arrow_board": 2.5,
              "roadwork_board": 1.9, "roadwork_sign": 2.0, "sign": 2.0, "vehicle": 1.7, "bin": 1.05, "ball": 0.45,
              "panel": 1.0, "plain_sign": 2.2}


def roadwork_kinds(cfg: SynthConfig, banks: Banks) -> dict[str, float]:
    k = {}
    for name, wt in _ROADWORK_WEIGHTS.items():
        if name == "cone_cutout" and not banks.cones:
            continue
        if name == "roadwork_sign" and not banks.roadwork_signs:
            continue
        if name in ROADWORK_DRAWERS and not cfg.drawn:
            continue
        k[name] = wt
    if not k:
        raise ValueError("no roadwork object source is enabled (cutouts, drawn, road_signs)")
    return k


def distractor_kinds(banks: Banks) -> dict[str, float]:
    return {k: w for k, w in _DISTRACTOR_WEIGHTS.items() if k != "sign" or banks.distractor_signs}


def _choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _layout(kind: str, rng: np.random.Generator) -> list[tuple[float, float]]:
    """(lateral, distance) positions of one group of ``kind``."""
    side = float(rng.choice([-1.0, 1.0]))
    if kind in ("cone", "cone_cutout", "barrel", "beacon"):
        if rng.random() < 0.6:
            return line_layout(rng, int(rng.integers(3, 9)), side, near=rng.uniform(4.0, 18.0), spacing=rng.uniform(2.5, 9.0),
                               lateral=rng.uniform(1.0, 4.0), taper=rng.uniform(0.0, 0.4) if rng.random() < 0.4 else 0.0)
        return cluster_layout(rng, int(rng.integers(1, 5)), side * rng.uniform(0.5, 4.0), rng.uniform(4.0, 22.0))
    if kind == "barrier":
        return cluster_layout(rng, int(rng.integers(1, 3)), side * rng.uniform(0.0, 3.5), rng.uniform(5.0, 25.0), spread=0.6)
    if kind == "arrow_board":
        return [(side * rng.uniform(1.0, 3.5), rng.uniform(8.0, 35.0))]
    if kind == "vehicle":
        return [(side * rng.uniform(1.8, 5.0), rng.uniform(6.0, 40.0))]
    if kind == "panel":
        return [(side * rng.uniform(4.0, 9.0), rng.uniform(8.0, 35.0))]
    if kind == "ball":
        return cluster_layout(rng, int(rng.integers(1, 3)), side * rng.uniform(0.5, 5.0), rng.uniform(4.0, 15.0))
    # signs and boards at the roadside, sometimes a pair on both sides
    d = rng.uniform(6.0, 30.0)
    pos = [(side * rng.uniform(2.5, 6.0), d)]
    if rng.random() < 0.25:
        pos.append((-side * rng.uniform(2.5, 6.0), d + rng.uniform(-1, 1)))
    return pos


def _make_patch(kind: str, px: int, rng: np.random.Generator, banks: Banks) -> Patch:
    if kind == "cone_cutout":
        p = banks.cones[int(rng.integers(len(banks.cones)))]
        if rng.random() < 0.5:
            p = Patch(np.ascontiguousarray(p.rgb[:, ::-1]), np.ascontiguousarray(p.alpha[:, ::-1]), p.kind, True, p.height_m, p.source)
        return Patch(p.rgb, p.alpha, p.kind, True, float(rng.uniform(0.45, 0.9)), p.source)
    if kind == "roadwork_sign":
        return sign_patch(banks.roadwork_signs[int(rng.integers(len(banks.roadwork_signs)))], rng)
    if kind == "sign":
        return sign_patch(banks.distractor_signs[int(rng.integers(len(banks.distractor_signs)))], rng)
    drawer = ROADWORK_DRAWERS.get(kind) or DISTRACTOR_DRAWERS[kind]
    return drawer(rng, max(8, px))


@dataclass(frozen=True)
class Pasted:
    kind: str
    roadwork: bool
    box: tuple[int, int, int, int]
    source: str


def _paste_group(img: np.ndarray, scene: Scene, stats: FrameStats, kind: str, rng: np.random.Generator, banks: Banks,
                 cfg: SynthConfig) -> list[Pasted]:
    out = []
    spots = sorted(_layout(kind, rng), key=lambda t: -t[1])  # far first: near objects cover far ones
    for lateral, dist in spots:
        nominal = place(scene, lateral, dist, _NOMINAL_M[kind], 0.6)
        min_px = max(4.0, cfg.min_height * scene.height)
        if not visible(nominal, scene, min_px=min_px, min_inside=0.3):
            continue
        patch = _make_patch(kind, int(np.ceil(nominal.height_px)), rng, banks)
        at = place(scene, lateral, dist, patch.height_m, patch.aspect)
        if not visible(at, scene, min_px=min_px, min_inside=0.4):
            continue
        occ = rng.uniform(0.15, 0.5) if rng.random() < cfg.occlusion else 0.0
        box = paste(img, patch, at, rng, stats, occlude=occ)
        if box is not None and box[3] - box[1] >= 3:
            out.append(Pasted(patch.kind, patch.roadwork, box, patch.source))
    return out


def synth_one(bg: np.ndarray, positive: bool, rng: np.random.Generator, banks: Banks, cfg: SynthConfig) -> tuple[np.ndarray, list[Pasted]]:
    """One synthetic frame from background ``bg``: roadwork (positive) or distractors only (negative)."""
    img = bg.copy()
    H, W = img.shape[:2]
    scene = scene_for(img, rng)
    stats = frame_stats(img)
    pasted: list[Pasted] = []
    if not positive or rng.random() < cfg.distractors_in_positives:
        dk = distractor_kinds(banks)
        for _ in range(int(rng.integers(1, 4))):
            pasted += _paste_group(img, scene, stats, _choose(rng, dk), rng, banks, cfg)
    if positive:
        rk = roadwork_kinds(cfg, banks)
        groups = 1 if rng.random() < 0.65 else 2
        tries = 0
        while (groups > 0 or not any(p.roadwork for p in pasted)) and tries < 12:
            pasted += _paste_group(img, scene, stats, _choose(rng, rk), rng, banks, cfg)
            groups -= 1
            tries += 1
        if not any(p.roadwork for p in pasted):  # a scene where nothing landed: one drawn cone close ahead
            lateral, dist = rng.uniform(-1.5, 1.5), rng.uniform(5.0, 9.0)
            patch = ROADWORK_DRAWERS["cone"](rng, max(8, int(place(scene, lateral, dist, 0.7, 0.6).height_px)))
            box = paste(img, patch, place(scene, lateral, dist, patch.height_m, patch.aspect), rng, stats)
            if box is None:  # pragma: no cover - a cone 5-9 m ahead is always in view
                raise RuntimeError("could not place any roadwork object")
            pasted.append(Pasted("cone", True, box, "drawn"))
    return img, pasted


def portrait_frame(img: np.ndarray, pasted: list[Pasted], rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, list[Pasted]]:
    """A portrait window (width 0.56-0.8 of the height, a phone held upright) of the frame, placed around
    a pasted object: a roadwork one in a positive, any in a negative, so where the window sits says nothing
    about the label. Boxes are clipped to the window; objects less than half inside are dropped. The frame
    comes back unchanged when it is already narrow or a positive would lose all of its roadwork."""
    H, W = img.shape[:2]
    cw = int(round(H * rng.uniform(0.56, 0.8)))
    anchors = [p for p in pasted if p.roadwork] if positive else pasted
    if cw >= W or not anchors:
        return img, pasted
    a = anchors[int(rng.integers(len(anchors)))].box
    cx = (a[0] + a[2]) / 2 + rng.uniform(-0.3, 0.3) * cw
    x0 = int(np.clip(round(cx - cw / 2), 0, W - cw))
    kept = []
    for p in pasted:
        x1, y1, x2, y2 = p.box
        nx1, nx2 = max(x1, x0), min(x2, x0 + cw)
        if nx2 - nx1 >= 0.5 * (x2 - x1):
            kept.append(Pasted(p.kind, p.roadwork, (nx1 - x0, y1, nx2 - x0, y2), p.source))
    if positive and not any(p.roadwork for p in kept):
        return img, pasted
    return np.ascontiguousarray(img[:, x0 : x0 + cw]), kept


# ----------------------------------------------------------------------------- writing the set


def _yolo(box: tuple[int, int, int, int], W: int, H: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [round((x1 + x2) / 2 / W, 5), round((y1 + y2) / 2 / H, 5), round((x2 - x1) / W, 5), round((y2 - y1) / H, 5)]


def synthesize(cfg: SynthConfig, out: str | Path, log: Log = print, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write ``cfg.n`` synthetic images, ``manifest.csv``, ``meta.json`` and ``contact_sheet.png`` to ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    banks = load_banks(cfg, log)
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(banks.backgrounds))
    rows, used_bg, used_obj = [], set(), set()
    sheet: list[tuple[np.ndarray, int]] = []
    cache: dict[int, np.ndarray] = {}
    for i in range(cfg.n):
        bi = int(order[(i // 2) % len(order)])
        s = banks.backgrounds.samples[bi]
        bg = cache.pop(bi) if bi in cache else s.load()
        if i % 2 == 0:
            cache[bi] = bg  # the negative of the pair reuses the decoded frame
        positive = i % 2 == 0
        img, pasted = synth_one(bg, positive, np.random.default_rng([cfg.seed, i]), banks, cfg)
        frame_rng = np.random.default_rng([cfg.seed, i, 1])
        if frame_rng.random() < cfg.portrait:
            img, pasted = portrait_frame(img, pasted, frame_rng, positive)
        H, W = img.shape[:2]
        name = f"images/synth-{cfg.seed}-{i:05d}.jpg"
        (out / name).write_bytes(encode_jpeg(img, cfg.jpeg_quality))
        used_bg.add(s.key)
        used_obj.update(p.source for p in pasted if p.source != "drawn")
        rows.append({
            "file": name, "label": int(positive), "split": "train", "source": SYNTH_SOURCE, "width": W, "height": H,
            "license": "synthetic (roadcascade synth) from StreetWork train frames and GTSRB sign crops",
            "boxes": json.dumps([_yolo(p.box, W, H) for p in pasted if p.kind in CONE_KINDS]),
            "objects": json.dumps([{"kind": p.kind, "roadwork": p.roadwork, "box": list(p.box)} for p in pasted]),
            "background": s.key,
        })
        if len(sheet) < 48 and (sum(1 for _, lab in sheet if lab == int(positive)) < 24):
            sheet.append((img, int(positive)))
        if progress:
            progress("synthesize", i + 1, cfg.n)
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    contact_sheet(sheet, out / "contact_sheet.png")
    meta = {"config": cfg.key(), "n": len(rows), "positives": sum(r["label"] for r in rows),
            "backgrounds": sorted(used_bg), "object_sources": sorted(used_obj),
            "banks": {"backgrounds": len(banks.backgrounds), "cone_cutouts": len(banks.cones),
                      "roadwork_signs": len(banks.roadwork_signs), "distractor_signs": len(banks.distractor_signs)},
            "seconds": round(time.perf_counter() - t0, 1)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"synth: {len(rows)} images ({meta['positives']} roadwork) in {meta['seconds']} s -> {out}")
    return out


def ensure_synth(cfg: SynthConfig, out: str | Path, log: Log = print, progress=None) -> Path:
    """The synthetic set at ``out``, made unless one with the same configuration is already there."""
    out = Path(out)
    meta = out / "meta.json"
    if meta.exists() and (out / "manifest.csv").exists():
        try:
            if json.loads(meta.read_text()).get("config") == json.loads(json.dumps(cfg.key())):
                log(f"using cached synthetic set {out}")
                return out
        except (OSError, json.JSONDecodeError):
            pass
    return synthesize(cfg, out, log=log, progress=progress)


def contact_sheet(items: list[tuple[np.ndarray, int]], path: Path, cols: int = 8, h: int = 150) -> None:
    """A grid of frames for a person to look at, each tagged ROADWORK (green) or none (grey)."""
    if not items:
        return
    tiles = []
    for img, lab in items:
        r = cv2.resize(img, (min(int(h * 1.7), max(1, int(img.shape[1] * h / img.shape[0]))), h), interpolation=cv2.INTER_AREA)
        t = np.zeros((h, int(h * 1.7), 3), np.uint8)  # letterboxed: a portrait frame keeps its shape
        t[:, (t.shape[1] - r.shape[1]) // 2 : (t.shape[1] - r.shape[1]) // 2 + r.shape[1]] = r
        cv2.putText(t, "ROADWORK" if lab else "none", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 0) if lab else (200, 200, 200), 1, cv2.LINE_AA)
        tiles.append(t)
    tw = tiles[0].shape[1]
    rows = (len(tiles) + cols - 1) // cols
    canvas = np.zeros((rows * h, cols * tw, 3), np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        canvas[r * h : (r + 1) * h, c * tw : (c + 1) * tw] = t
    cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
