"""Synthetic roadwork engine: scene geometry, masks, drawn objects, pasting, the engine's output and that no
val/test data (StreetWork split or sign track) ever feeds it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roadcascade.io.data import Dataset, open_dataset
from roadcascade.io.images import decode_path
from roadcascade.io.synth import SynthConfig, load_banks, synthesize
from roadcascade.io.synth.compose import frame_stats, paste
from roadcascade.io.synth.objects import (
    DISTRACTOR_DRAWERS,
    ROADWORK_DRAWERS,
    Patch,
    cone_cutouts,
    cone_mask,
    shape_mask,
    sign_shape,
    track_split,
)
from roadcascade.io.synth.scene import Placement, Scene, estimate_vanishing_point, line_layout, place, scene_for, visible

from conftest import DATA

SIGNS = DATA.parent / "signs"
# a few cut-outs keep load_banks fast (600, the default, takes ~10 s per call); the rest is the brief's config
CFG = SynthConfig(n=8, seed=3, max_cutouts=40)
GROUND_KINDS = {"cone", "cone_cutout", "barrel", "barrier", "beacon", "arrow_board"}



def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sw_rows() -> dict[str, dict]:
    if not (DATA / "manifest.csv").exists():
        pytest.skip("StreetWork data not found")
    return {r["file"]: r for r in _read_csv(DATA / "manifest.csv")}


@pytest.fixture(scope="module")
def sign_rows() -> dict[str, dict]:
    if not (SIGNS / "manifest.csv").exists():
        pytest.skip("signs data not found")
    return {r["file"]: r for r in _read_csv(SIGNS / "manifest.csv")}


@pytest.fixture(scope="module")
def synth_runs(tmp_path_factory) -> dict[str, Path]:
    if not (DATA / "manifest.csv").exists() or not (SIGNS / "manifest.csv").exists():
        pytest.skip("StreetWork / signs data not found")
    base = tmp_path_factory.mktemp("synth")
    quiet = lambda s: None  # noqa: E731
    runs = {}
    for name, cfg in (("a", CFG), ("b", CFG), ("other", SynthConfig(n=8, seed=4, max_cutouts=40))):
        cv2.setRNGSeed(12345 + len(runs))  # a disturbed global OpenCV RNG must not change the output
        runs[name] = synthesize(cfg, base / name, log=quiet)
    return runs


@pytest.fixture(scope="module")
def banks():
    if not (DATA / "manifest.csv").exists() or not (SIGNS / "manifest.csv").exists():
        pytest.skip("StreetWork / signs data not found")
    return load_banks(CFG, log=lambda s: None)


@pytest.fixture(scope="module")
def boxed_train() -> Dataset:
    """A handful of boxed positives of the train split."""
    if not (DATA / "manifest.csv").exists():
        pytest.skip("StreetWork data not found")
    train = open_dataset(DATA, "train")
    return Dataset("boxed", [s for s in train.samples if s.label == 1 and s.boxes][:6])


# ----------------------------------------------------------------------------- 1. scene geometry

scenes = st.builds(
    lambda w, h, hz, vx, cam, f: Scene(w, h, horizon=h * hz, vp_x=w * vx, cam_h=cam, f=f),
    st.integers(64, 2000), st.integers(48, 1500), st.floats(0.2, 0.8), st.floats(0.2, 0.8),
    st.floats(0.8, 2.5), st.floats(50.0, 3000.0),
)


@settings(max_examples=80, deadline=None)
@given(scenes, st.floats(-6.0, 6.0), st.floats(1.0, 150.0), st.floats(1.05, 3.0), st.floats(0.2, 3.0), st.floats(0.2, 3.0))
def test_place_nearer_is_lower_and_larger(scene, lateral, d_near, ratio, height_m, aspect):
    near = place(scene, lateral, d_near, height_m, aspect)
    far = place(scene, lateral, d_near * ratio, height_m, aspect)
    assert near.row > far.row > scene.horizon  # both stand on the road, below the horizon
    assert near.height_px > far.height_px > 0
    assert near.width_px == pytest.approx(near.height_px * aspect)
    assert near.height_px == pytest.approx(height_m * (near.row - scene.horizon) / scene.cam_h)
    # the box's foot is the placement's row, its top height_px above
    x1, y1, x2, y2 = near.box()
    assert y2 == near.row and y2 - y1 == pytest.approx(near.height_px) and (x1 + x2) / 2 == pytest.approx(near.col)


@settings(max_examples=60, deadline=None)
@given(scenes, st.floats(0.0, 1.0), st.floats(0.01, 1.0), st.floats(-10.0, 10.0))
def test_ppm_zero_at_and_above_horizon_and_col_at_axis(scene, up, down, lateral):
    assert scene.ppm(scene.horizon) == 0.0
    assert scene.ppm(scene.horizon * up) == 0.0  # any row above
    row = scene.horizon + down * (scene.height - scene.horizon)
    assert scene.ppm(row) > 0
    assert scene.col_at(0.0, row) == scene.vp_x
    assert scene.col_at(lateral, scene.horizon) == scene.vp_x  # everything converges at the vanishing point
    if lateral > 0.01:
        assert scene.col_at(lateral, row) > scene.vp_x
    elif lateral < -0.01:
        assert scene.col_at(lateral, row) < scene.vp_x


def test_line_layout_distances_mostly_increase():
    # the first three objects of a line are always in order (the jitter cannot reorder them yet)
    for seed in range(50):
        d = [p[1] for p in line_layout(np.random.default_rng(seed), 8, 1.0, near=5.0, spacing=4.0, lateral=2.0)]
        assert d[0] == 5.0 and d[0] < d[1] < d[2]
        xs = [p[0] for p in line_layout(np.random.default_rng(seed), 8, -1.0, near=5.0, spacing=4.0, lateral=2.0)]
        assert all(x < 0 for x in xs)  # the left side


def test_line_layout_distances_increase():
    for seed in range(100):
        d = [p[1] for p in line_layout(np.random.default_rng(seed), 8, 1.0, near=5.0, spacing=4.0, lateral=2.0)]
        assert all(b > a for a, b in zip(d, d[1:])), (seed, d)


def test_visible_rejects_out_of_frame_and_tiny():
    s = Scene(320, 240, horizon=110.0, vp_x=160.0, cam_h=1.5, f=250.0)
    ok = Placement(col=160, row=200, height_px=40, width_px=20, distance=5)
    assert visible(ok, s)
    assert not visible(Placement(col=-200, row=200, height_px=40, width_px=20, distance=5), s)  # left of frame
    assert not visible(Placement(col=600, row=200, height_px=40, width_px=20, distance=5), s)  # right
    assert not visible(Placement(col=160, row=400, height_px=40, width_px=20, distance=5), s)  # below
    assert not visible(Placement(col=160, row=100, height_px=40, width_px=20, distance=5), s)  # above the horizon
    assert not visible(Placement(col=160, row=200, height_px=3, width_px=2, distance=5), s)  # too small
    # mostly outside: 30 % inside is not enough for the default min_inside=0.5, enough for 0.25
    edge = Placement(col=-4, row=200, height_px=40, width_px=20, distance=5)
    assert not visible(edge, s) and visible(edge, s, min_inside=0.25)


def _road_image(h=240, w=320, vp=(160, 100), stop_row=130):
    """Grey frame with two white road lines converging to ``vp`` (drawn only up to ``stop_row``)."""
    img = np.full((h, w, 3), 110, np.uint8)
    for x0 in (0, w):
        t = (stop_row - (h - 1)) / (vp[1] - (h - 1))
        cv2.line(img, (x0, h - 1), (int(round(x0 + (vp[0] - x0) * t)), stop_row), (255, 255, 255), 3)
    return img


@pytest.mark.parametrize("vp", [(160, 100), (130, 110), (190, 95)])
def test_vanishing_point_recovered(vp):
    est = estimate_vanishing_point(_road_image(vp=vp))
    assert est is not None
    assert abs(est[0] - vp[0]) < 4 and abs(est[1] - vp[1]) < 4


def test_vanishing_point_none_on_blank_and_scene_for_uses_it():
    assert estimate_vanishing_point(np.full((240, 320, 3), 110, np.uint8)) is None
    assert estimate_vanishing_point(np.zeros((240, 320, 3), np.uint8)) is None
    s = scene_for(_road_image(vp=(150, 105)), np.random.default_rng(0))
    assert abs(s.vp_x - 150) < 0.05 * 320 + 4 and abs(s.horizon - 105) < 0.05 * 240 + 4
    blank = scene_for(np.full((240, 320, 3), 110, np.uint8), np.random.default_rng(0))
    assert 0.45 * 240 <= blank.horizon <= 0.6 * 240 and 0.4 * 320 <= blank.vp_x <= 0.6 * 320


# ----------------------------------------------------------------------------- 2. engine output


def test_engine_writes_the_set(synth_runs):
    out = synth_runs["a"]
    rows = _read_csv(out / "manifest.csv")
    assert len(rows) == 8
    assert [int(r["label"]) for r in rows] == [1, 0] * 4
    assert all(r["split"] == "train" and r["source"] == "synth" for r in rows)
    for r in rows:
        p = out / r["file"]
        assert p.is_file()
        img = decode_path(p)
        assert img.shape[:2] == (int(r["height"]), int(r["width"]))
    assert len({r["file"] for r in rows}) == 8
    # pairs share their background: they differ only in what was pasted
    assert all(rows[k]["background"] == rows[k + 1]["background"] for k in range(0, 8, 2))
    assert (out / "contact_sheet.png").stat().st_size > 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n"] == 8 and meta["positives"] == 4 and meta["config"]["seed"] == 3
    assert set(meta["backgrounds"]) == {r["background"] for r in rows}
    # the dataset loader reads the manifest back
    ds = open_dataset(out)
    assert len(ds) == 8 and ds.splits == ["train"] and ds.labels().tolist() == [1, 0] * 4


def test_engine_deterministic(synth_runs):
    a, b, other = synth_runs["a"], synth_runs["b"], synth_runs["other"]
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    rows = _read_csv(a / "manifest.csv")
    for r in rows:
        assert (a / r["file"]).read_bytes() == (b / r["file"]).read_bytes()
    others = _read_csv(other / "manifest.csv")
    differ = sum((a / r["file"]).read_bytes() != (other / o["file"]).read_bytes() for r, o in zip(rows, others))
    assert differ == len(rows)


def test_engine_objects_and_boxes(synth_runs, sw_rows):
    out = synth_runs["a"]
    for i, r in enumerate(_read_csv(out / "manifest.csv")):
        W, H = int(r["width"]), int(r["height"])
        objs = json.loads(r["objects"])
        assert objs, f"row {i}: nothing pasted"
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, o
            assert isinstance(o["roadwork"], bool)
        rw = [o for o in objs if o["roadwork"]]
        if r["label"] == "1":
            assert rw, f"positive row {i} without a roadwork object"
            # the frame's scene (scene_for is the first use of the image's rng) puts ground objects under the horizon
            bg = decode_path(DATA / r["background"])
            scene = scene_for(bg, np.random.default_rng([CFG.seed, i]))
            for o in rw:
                assert o["box"][3] > 0.25 * H
                if o["kind"] in GROUND_KINDS:
                    assert o["box"][3] > scene.horizon, (i, o, scene.horizon)
        else:
            assert not rw, f"negative row {i} holds roadwork {rw}"
        cones = [o for o in objs if o["kind"] in ("cone", "cone_cutout")]
        yolo = json.loads(r["boxes"])
        assert len(yolo) == len(cones)
        for b, o in zip(yolo, cones):
            assert all(0.0 <= v <= 1.0 for v in b)
            x1, y1, x2, y2 = o["box"]
            assert b[0] == pytest.approx((x1 + x2) / 2 / W, abs=1e-4) and b[3] == pytest.approx((y2 - y1) / H, abs=1e-4)


# ----------------------------------------------------------------------------- 3. no leakage


def _check_object_source(key: str, sw_rows: dict, sign_rows: dict) -> None:
    if key in sw_rows:
        assert sw_rows[key]["split"] == "train", f"cut-out from {sw_rows[key]['split']}: {key}"
    else:
        assert key in sign_rows, f"object source {key} is neither a StreetWork file nor a sign crop"
        assert track_split(sign_rows[key]["track"]) == "train", f"sign from a holdout track: {key}"


def test_meta_sources_are_train_only(synth_runs, sw_rows, sign_rows):
    kinds = set()
    for run in synth_runs.values():
        meta = json.loads((run / "meta.json").read_text())
        assert meta["backgrounds"]
        for k in meta["backgrounds"]:
            assert sw_rows[k]["split"] == "train" and sw_rows[k]["label"] == "0"
            assert sw_rows[k]["source"] in ("camvid", "gtsdb")
        for k in meta["object_sources"]:
            _check_object_source(k, sw_rows, sign_rows)
            kinds.add("sw" if k in sw_rows else "sign")
    assert kinds == {"sw", "sign"}  # both kinds of source were exercised


def test_load_banks_train_only(banks, sw_rows, sign_rows):
    bg = banks.backgrounds.samples
    assert len(bg) > 100
    assert all(s.split == "train" and s.label == 0 and s.source in ("camvid", "gtsdb") for s in bg)
    assert all(sw_rows[s.key]["split"] == "train" for s in bg)
    assert 0 < len(banks.cones) <= CFG.max_cutouts
    for p in banks.cones:
        assert sw_rows[p.source]["split"] == "train" and sw_rows[p.source]["label"] == "1"
    assert banks.roadwork_signs and banks.distractor_signs
    for s in banks.roadwork_signs + banks.distractor_signs:
        assert track_split(s.track) == "train" and sign_rows[s.key]["track"] == s.track
    assert all(s.roadwork for s in banks.roadwork_signs) and not any(s.roadwork for s in banks.distractor_signs)
    # the holdout tracks exist and were left out
    holdout = {r["track"] for r in sign_rows.values() if track_split(r["track"]) == "holdout"}
    assert holdout and not holdout & {s.track for s in banks.roadwork_signs + banks.distractor_signs}


def test_track_split_stable_and_about_a_fifth():
    tracks = [f"sign_{i}/{i:05d}" for i in range(2000)]
    splits = [track_split(t) for t in tracks]
    assert splits == [track_split(t) for t in tracks]
    assert set(splits) == {"train", "holdout"}
    assert 0.15 < splits.count("holdout") / len(splits) < 0.25


# ----------------------------------------------------------------------------- 4. masks


def test_cone_cutouts(boxed_train):
    patches = cone_cutouts(boxed_train, max_items=20)
    assert patches
    keys = {s.key for s in boxed_train.samples}
    for p in patches:
        assert p.rgb.dtype == np.uint8 and p.rgb.ndim == 3 and p.rgb.shape[2] == 3
        assert p.alpha.shape == p.rgb.shape[:2]
        assert p.alpha.min() >= 0.0 and p.alpha.max() <= 1.0 and p.alpha.max() > 0.5
        assert p.kind == "cone_cutout" and p.roadwork and p.source in keys
    assert 1 <= len(cone_cutouts(boxed_train, max_items=2)) <= 2


def test_cone_mask_real_crops_stay_in_box(boxed_train):
    found = 0
    for s in boxed_train.samples:
        img = s.load()
        H, W = img.shape[:2]
        for cx, cy, bw, bh in s.boxes:
            x1, y1 = max(0, int(round((cx - bw / 2) * W))), max(0, int(round((cy - bh / 2) * H)))
            x2, y2 = min(W, int(round((cx + bw / 2) * W))), min(H, int(round((cy + bh / 2) * H)))
            mx, my = max(2, (x2 - x1) // 4), max(2, (y2 - y1) // 4)
            X1, Y1, X2, Y2 = max(0, x1 - mx), max(0, y1 - my), min(W, x2 + mx), min(H, y2 + my)
            box = (x1 - X1, y1 - Y1, x2 - X1, y2 - Y1)
            m = cone_mask(img[Y1:Y2, X1:X2], box)
            if m is None:
                continue
            found += 1
            assert m.shape == (Y2 - Y1, X2 - X1) and set(np.unique(m)) <= {0, 1}
            outside = np.ones_like(m, bool)
            outside[box[1] : box[3], box[0] : box[2]] = False
            assert not m[outside].any()
            assert m.sum() > 0
    assert found >= 2


def test_cone_mask_deterministic(boxed_train):
    crops = []
    for s in boxed_train.samples:
        img = s.load()
        H, W = img.shape[:2]
        for cx, cy, bw, bh in s.boxes:
            x1, y1 = max(0, int(round((cx - bw / 2) * W))), max(0, int(round((cy - bh / 2) * H)))
            x2, y2 = min(W, int(round((cx + bw / 2) * W))), min(H, int(round((cy + bh / 2) * H)))
            crops.append((img, (x1, y1, x2, y2)))
    assert len(crops) >= 4
    for img, box in crops:
        a, b = cone_mask(img, box), cone_mask(img, box)
        assert (a is None) == (b is None)
        assert a is None or np.array_equal(a, b)


def test_cone_mask_synthetic_trapezoid():
    img = np.full((100, 90, 3), 128, np.uint8)
    cv2.rectangle(img, (0, 0), (89, 99), (110, 115, 120), 1)
    trap = np.array([[40, 15], [50, 15], [62, 80], [28, 80]], np.int32)
    cv2.fillPoly(img, [trap], (250, 110, 10))
    truth = np.zeros((100, 90), np.uint8)
    cv2.fillPoly(truth, [trap], 1)
    box = (20, 8, 70, 88)
    m = cone_mask(img, box)
    assert m is not None
    outside = np.ones_like(m, bool)
    outside[box[1] : box[3], box[0] : box[2]] = False
    assert not m[outside].any()
    assert (m & truth).sum() / truth.sum() > 0.85  # covers most of the cone
    assert (m & (1 - truth)).sum() / max(1, m.sum()) < 0.15  # and little of the grey around it
    # a box over the cone's top half: the mask stops at the box even though the orange goes on below
    top = (20, 8, 70, 50)
    mt = cone_mask(img, top)
    assert mt is not None
    assert not mt[50:].any() and mt[45:50].any()
    assert (mt[:50] & truth[:50]).sum() / truth[:50].sum() > 0.85
    # a box that is all orange is not an object's box
    assert cone_mask(img, (40, 40, 60, 80)) is None


def test_cone_mask_rejects_no_orange_and_tiny_boxes():
    grey = np.full((80, 80, 3), 128, np.uint8)
    cv2.circle(grey, (40, 40), 15, (60, 60, 200), -1)  # a blue blob: an object, but not orange
    assert cone_mask(grey, (20, 20, 60, 60)) is None
    img = np.full((80, 80, 3), 128, np.uint8)
    img[10:70, 30:50] = (250, 110, 10)
    assert cone_mask(img, (30, 10, 33, 70)) is None  # 3 px wide
    assert cone_mask(img, (30, 10, 50, 15)) is None  # 5 px tall


@pytest.mark.parametrize("shape", ["circle", "triangle", "inverted", "diamond", "octagon"])
@pytest.mark.parametrize("hw", [(24, 24), (30, 20), (9, 13)])
def test_shape_mask(shape, hw):
    h, w = hw
    m = shape_mask(shape, h, w)
    assert m.shape == (h, w) and m.dtype == np.float32
    assert m.min() >= 0.0 and m.max() <= 1.0
    assert m[h // 2, w // 2] > 0.9  # the centre is plate
    if shape != "inverted":
        assert m[0, 0] < 0.1  # top-left corner is not (an inverted triangle's top edge is)
    assert m[-1, 0] < 0.1 or shape == "triangle"
    if shape == "triangle":
        assert m[-1].sum() > m[0].sum() + w / 2
    if shape == "inverted":
        assert m[0].sum() > m[-1].sum() + w / 2
    assert 0.3 * h * w < m.sum() < 0.95 * h * w


def test_sign_shape():
    assert sign_shape(25) == "triangle"  # road works
    assert sign_shape(14) == "octagon"  # stop
    assert sign_shape(12) == "diamond"  # priority road
    assert sign_shape(13) == "inverted"  # yield
    assert sign_shape(1) == "circle"  # speed limit
    assert sign_shape(11) == "triangle" and sign_shape(18) == "triangle" and sign_shape(31) == "triangle"
    assert sign_shape(17) == "circle" and sign_shape(32) == "circle"


# ----------------------------------------------------------------------------- 5. drawn objects

DRAWERS = [(n, d, True) for n, d in ROADWORK_DRAWERS.items()] + [(n, d, False) for n, d in DISTRACTOR_DRAWERS.items()]


@pytest.mark.parametrize("name,draw,roadwork", DRAWERS, ids=[d[0] for d in DRAWERS])
@pytest.mark.parametrize("h", [8, 20, 60])
def test_drawn_objects(name, draw, roadwork, h):
    p = draw(np.random.default_rng(5), h)
    assert isinstance(p, Patch)
    assert p.rgb.dtype == np.uint8 and p.rgb.ndim == 3 and p.rgb.shape[2] == 3
    assert p.rgb.shape[0] == h and p.rgb.shape[1] >= 1
    assert p.alpha.shape == p.rgb.shape[:2]
    assert p.alpha.min() >= 0.0 and p.alpha.max() <= 1.0
    assert p.alpha.max() > 0.9 and (p.alpha > 0.5).mean() > 0.1  # some of it is opaque
    assert p.roadwork is roadwork and p.kind == name and p.height_m > 0 and p.source == "drawn"
    if p.lift_m == 0:
        assert p.alpha[-2:].max() > 0.1, "a ground object's foot is the patch's bottom"
    q = draw(np.random.default_rng(5), h)
    assert np.array_equal(p.rgb, q.rgb) and np.array_equal(p.alpha, q.alpha) and p.height_m == q.height_m


@pytest.mark.parametrize("name,draw,roadwork", DRAWERS, ids=[d[0] for d in DRAWERS])
def test_drawn_objects_vary_with_seed(name, draw, roadwork):
    a, b = draw(np.random.default_rng(1), 60), draw(np.random.default_rng(2), 60)
    assert a.rgb.shape != b.rgb.shape or not np.array_equal(a.rgb, b.rgb)


# ----------------------------------------------------------------------------- 6. compose.paste


def _opaque(h=20, w=20, color=(220, 120, 30)) -> Patch:
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = color
    return Patch(rgb, np.ones((h, w), np.float32), "block", True, 1.0)


@pytest.mark.parametrize("fill", [0, 140])
@pytest.mark.parametrize("seed", range(4))
def test_paste_changes_only_box_and_shadow(fill, seed):
    img = np.full((100, 120, 3), fill, np.uint8)
    orig = img.copy()
    at = Placement(col=60, row=70, height_px=20, width_px=20, distance=5)
    box = paste(img, _opaque(), at, np.random.default_rng(seed), frame_stats(orig))
    assert box is not None
    x1, y1, x2, y2 = box
    assert (x1, y1, x2, y2) == (50, 50, 70, 70)  # an opaque patch: its box is the whole patch, foot at the row
    changed = np.any(img != orig, axis=2)
    assert changed[y1:y2, x1:x2].mean() > 0.5
    assert not changed[:y1].any()  # nothing above the object's top
    out = changed.copy()
    out[y1:y2, x1:x2] = False
    ys, xs = np.nonzero(out)
    if fill == 0:
        assert not out.any()  # a shadow on black is black
    else:
        assert out.any()  # the contact shadow shows on grey, at the foot only
        w = x2 - x1
        assert np.all(np.abs(ys - at.row) <= 2 * 0.18 * w + 1)
        assert np.all(np.abs(xs - at.col) <= 2 * 0.8 * w + 0.2 * w + 1)
        assert np.all(img[out].astype(int) <= orig[out].astype(int))  # a shadow only darkens


def test_paste_without_shadow_and_lifted():
    img = np.full((100, 120, 3), 140, np.uint8)
    orig = img.copy()
    at = Placement(col=60, row=70, height_px=20, width_px=20, distance=5)
    box = paste(img, _opaque(), at, np.random.default_rng(0), frame_stats(orig), shadow=False)
    changed = np.any(img != orig, axis=2)
    changed[box[1] : box[3], box[0] : box[2]] = False
    assert not changed.any()
    # a lifted patch (a panel on a facade) hangs lift_m above its foot and casts no contact shadow
    img = orig.copy()
    p = Patch(_opaque().rgb, _opaque().alpha, "panel", False, 1.0, lift_m=1.0)
    box = paste(img, p, at, np.random.default_rng(0), frame_stats(orig))
    assert box == (50, 30, 70, 50)
    changed = np.any(img != orig, axis=2)
    changed[30:50, 50:70] = False
    assert not changed.any()


def test_paste_clips_and_occludes():
    img = np.zeros((100, 120, 3), np.uint8)
    stats = frame_stats(img)
    box = paste(img, _opaque(), Placement(col=5, row=70, height_px=20, width_px=20, distance=5), np.random.default_rng(0), stats)
    assert box == (0, 50, 15, 70)
    img = np.zeros((100, 120, 3), np.uint8)
    box = paste(img, _opaque(), Placement(col=60, row=70, height_px=20, width_px=20, distance=5), np.random.default_rng(0),
                stats, occlude=0.5)
    assert box[1] == 50 and box[3] == 70 and box[2] - box[0] == 10


@pytest.mark.parametrize("col,row", [(-100, 70), (300, 70), (60, -10), (60, 300)])
def test_paste_outside_frame_is_none(col, row):
    img = np.full((100, 120, 3), 90, np.uint8)
    orig = img.copy()
    box = paste(img, _opaque(), Placement(col=col, row=row, height_px=20, width_px=20, distance=5), np.random.default_rng(0),
                frame_stats(orig))
    assert box is None
    assert np.array_equal(img, orig)


def test_paste_transparent_patch_is_none():
    img = np.full((100, 120, 3), 90, np.uint8)
    orig = img.copy()
    p = Patch(_opaque().rgb, np.zeros((20, 20), np.float32), "ghost", False, 1.0)
    assert paste(img, p, Placement(col=60, row=70, height_px=20, width_px=20, distance=5), np.random.default_rng(0), frame_stats(orig)) is None
    assert np.array_equal(img, orig)
