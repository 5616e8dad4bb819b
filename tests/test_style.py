"""Dashcam style transforms (roadcascade.io.style): shapes, dtypes, determinism and the physical
properties each transform promises (night darkens, dashboard darkens the bottom, ...)."""

from __future__ import annotations

import time
from dataclasses import FrozenInstanceError, fields

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roadcascade.io import style
from roadcascade.io.style import (
    STYLE_ALL,
    STYLE_OFF,
    TRANSFORMS,
    DashcamStyle,
    apply_style,
    apply_style_traced,
    style_sheet,
)

SHAPE_KEEPING = [n for n in TRANSFORMS if n != "portrait_crop"]
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth street-like test image: sky gradient, grey road, a few coloured blocks and texture."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    img[..., 0] = 120 + 80 * (1 - y)
    img[..., 1] = 140 + 70 * (1 - y)
    img[..., 2] = 170 + 60 * (1 - y)
    img[h // 2 :] = 110  # road
    for _ in range(4):
        y0, x0 = rng.integers(0, max(1, h - 4)), rng.integers(0, max(1, w - 4))
        img[y0 : y0 + max(2, h // 6), x0 : x0 + max(2, w // 8)] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, (h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


sizes = st.integers(32, 400)
seeds = st.integers(0, 2**32 - 1)


def test_registry_names_every_transform():
    assert list(TRANSFORMS) == [
        "portrait_crop", "night", "street_light_glare", "headlight_bloom", "rain_streaks",
        "windshield_reflection", "dashboard_band", "vignette", "motion_blur", "sensor_noise", "jpeg_quality",
    ]
    for name, fn in TRANSFORMS.items():
        assert fn is getattr(style, name) and callable(fn)


@pytest.mark.parametrize("name", SHAPE_KEEPING)
@FAST
@given(h=sizes, w=sizes, seed=seeds)
def test_transform_keeps_shape_dtype_and_input(name, h, w, seed):
    img = scene(h, w, seed % 1000)
    before = img.copy()
    out = TRANSFORMS[name](img, np.random.default_rng(seed))
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out is not img and not np.shares_memory(out, img)
    np.testing.assert_array_equal(img, before)  # input untouched


@pytest.mark.parametrize("name", list(TRANSFORMS))
@settings(max_examples=6, deadline=None)
@given(h=sizes, w=sizes, seed=seeds)
def test_transform_is_deterministic_and_depends_on_seed(name, h, w, seed):
    img = scene(h, w, 7)
    fn = TRANSFORMS[name]
    a = fn(img, np.random.default_rng(seed))
    b = fn(img, np.random.default_rng(seed))
    np.testing.assert_array_equal(a, b)
    # different seeds give different outputs (one of four may coincide, e.g. an equal JPEG quality)
    others = [fn(img, np.random.default_rng(seed + k)) for k in range(1, 5)]
    assert any(o.shape != a.shape or not np.array_equal(o, a) for o in others), name


@pytest.mark.parametrize("name", SHAPE_KEEPING)
def test_transform_changes_the_image(name):
    img = scene(224, 381, 3)
    outs = [TRANSFORMS[name](img, np.random.default_rng(s)) for s in range(3)]
    assert all(np.abs(o.astype(int) - img).mean() > 0.3 for o in outs), name


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("hw", [(1, 1), (2, 7), (8, 8), (5, 300), (300, 5)])
def test_transform_survives_tiny_and_thin_images(name, hw):
    img = np.full((*hw, 3), 120, np.uint8)
    for s in range(3):
        out = TRANSFORMS[name](img, np.random.default_rng(s))
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.size > 0


def test_non_contiguous_input_is_accepted():
    bgr = scene(120, 200, 1)
    rgb_view = bgr[:, :, ::-1]  # as from cv2.imread(...)[:, :, ::-1]
    for name, fn in TRANSFORMS.items():
        a = fn(rgb_view, np.random.default_rng(0))
        b = fn(np.ascontiguousarray(rgb_view), np.random.default_rng(0))
        np.testing.assert_array_equal(a, b, err_msg=name)
    out = apply_style(bgr[::2, ::2], np.random.default_rng(0), STYLE_ALL)
    assert out.dtype == np.uint8


def test_portrait_crop_of_a_narrow_image_keeps_the_width():
    img = np.random.default_rng(0).integers(0, 256, (400, 150, 3), dtype=np.uint8)
    for s in range(10):
        out = style.portrait_crop(img, np.random.default_rng(s))
        assert out.shape[1] == 150 and 200 <= out.shape[0] <= 267
        assert not np.shares_memory(out, img)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)])
def test_bad_input_is_refused(bad):
    with pytest.raises(ValueError):
        style.vignette(bad, np.random.default_rng(0))
    with pytest.raises(ValueError):
        apply_style(bad, np.random.default_rng(0))


# --------------------------------------------------------------------------------------- framing


@FAST
@given(h=sizes, w=sizes, seed=seeds)
def test_portrait_crop_is_a_portrait_window_of_the_input(h, w, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = style.portrait_crop(img, np.random.default_rng(seed))
    oh, ow = out.shape[:2]
    assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    assert not np.shares_memory(out, img)
    assert oh <= h and ow <= w
    assert oh == h or ow == w  # one side is kept
    ratio = ow / oh
    assert 9 / 16 - 1.0 / oh <= ratio <= 3 / 4 + 1.0 / oh, (h, w, oh, ow)
    # it is a window of the input (random content: the match is unique)
    if oh == h:
        hits = [x0 for x0 in range(w - ow + 1) if np.array_equal(img[:, x0 : x0 + ow], out)]
        assert len(hits) == 1
        centre = hits[0] + ow / 2
        # centred on x in the middle 60 % unless pushed inside the image
        assert 0.2 * w - 1 <= centre <= 0.8 * w + 1 or hits[0] in (0, w - ow)
    else:
        assert any(np.array_equal(img[y0 : y0 + oh], out) for y0 in range(h - oh + 1))


def test_portrait_crop_of_a_landscape_frame():
    img = scene(224, 381)
    for s in range(20):
        out = style.portrait_crop(img, np.random.default_rng(s))
        assert out.shape[0] == 224 and 126 <= out.shape[1] <= 168


# ------------------------------------------------------------------------------------- lighting


@FAST
@given(h=sizes, w=sizes, seed=seeds)
def test_night_darkens_substantially(h, w, seed):
    img = scene(h, w, seed % 1000)
    out = style.night(img, np.random.default_rng(seed))
    assert out.mean() < 0.45 * img.mean()
    assert out.mean() > 0.03 * img.mean()  # not a black frame


@pytest.mark.parametrize("value", [255, 180, 90])
def test_night_on_a_flat_image_follows_the_headlights(value):
    """Bottom centre (headlights) keeps more light than the top (sky)."""
    img = np.full((240, 320, 3), value, np.uint8)
    for s in range(10):
        out = style.night(img, np.random.default_rng(s)).astype(float)
        top = out[:48].mean()
        bottom_centre = out[-60:, 110:210].mean()
        assert bottom_centre > 2.0 * top + 2, (s, top, bottom_centre)
        assert out.mean() < 0.4 * value


def test_night_keeps_a_bright_cone_near_the_bottom_visible():
    img = np.full((224, 381, 3), 120, np.uint8)
    img[:80] = (200, 210, 225)  # bright sky
    img[150:200, 170:210] = (255, 110, 20)  # an orange cone near the bottom centre
    for s in range(10):
        out = style.night(img, np.random.default_rng(s)).astype(float)
        cone = out[155:195, 175:205]
        assert cone[..., 0].mean() > 60, s  # still clearly red/orange
        assert cone[..., 0].mean() > cone[..., 2].mean() + 25, s
        assert cone.mean() > 2.5 * out[:80].mean(), s  # brighter than the (dark) sky


def test_street_light_glare_is_in_the_upper_half():
    img = np.zeros((200, 300, 3), np.uint8)
    for s in range(10):
        out = style.street_light_glare(img, np.random.default_rng(s)).astype(float)
        assert out.max() > 150
        assert out[:100].sum() > 2.0 * out[100:].sum(), s
        assert np.unravel_index(out.sum(2).argmax(), out.shape[:2])[0] < 105


def test_headlight_bloom_lights_the_lower_middle():
    img = np.full((200, 300, 3), 30, np.uint8)
    for s in range(10):
        out = style.headlight_bloom(img, np.random.default_rng(s)).astype(float)
        lower_mid = out[140:, 100:200].mean()
        assert lower_mid > out[:50].mean() + 10, s
        assert lower_mid > out[140:, :30].mean(), s
        assert out[140:, 100:200, 0].mean() >= out[140:, 100:200, 2].mean()  # warm
        assert (out >= img).all()  # light only adds


# -------------------------------------------------------------------------------------- on glass


def test_windshield_reflection_is_faint_and_bright():
    black = np.zeros((200, 300, 3), np.uint8)
    mid = np.full((200, 300, 3), 128, np.uint8)
    for s in range(10):
        out = style.windshield_reflection(black, np.random.default_rng(s)).astype(float)
        assert 1.0 < out.mean() < 50, s
        assert np.percentile(out, 99) < 110, s  # faint everywhere but a few sparkles
        out_mid = style.windshield_reflection(mid, np.random.default_rng(s))
        assert (out_mid >= mid).all()  # screen blend never darkens
        assert out_mid.astype(float).mean() - 128 < 60


def test_rain_adds_light_streaks_or_drops():
    img = np.full((200, 300, 3), 40, np.uint8)
    img[:, 150:] = 160
    for s in range(10):
        out = style.rain_streaks(img, np.random.default_rng(s)).astype(float)
        changed = np.abs(out - img).max(axis=2) > 3
        assert changed.mean() > 0.002, s
        assert out[:, :140].mean() >= img[:, :140].mean(), s  # light streaks/drops on the dark side


# -------------------------------------------------------------------------------- inside the car


@FAST
@given(h=st.integers(48, 400), w=st.integers(48, 400), seed=seeds)
def test_dashboard_band_darkens_the_bottom(h, w, seed):
    img = np.full((h, w, 3), 170, np.uint8)
    out = style.dashboard_band(img, np.random.default_rng(seed)).astype(float)
    bottom = out[-max(1, h // 20) :].mean()
    upper_middle = out[int(0.3 * h) : int(0.5 * h)].mean()
    assert bottom < 0.4 * upper_middle, (bottom, upper_middle)
    assert bottom < 90
    assert upper_middle > 120  # the road above the dashboard is (mostly) untouched


def test_dashboard_is_dark_at_night_too():
    night_img = np.full((224, 381, 3), 25, np.uint8)
    for s in range(10):
        out = style.dashboard_band(night_img, np.random.default_rng(s)).astype(float)
        assert out[-10:].mean() <= 25


def test_dashboard_band_covers_8_to_45_percent():
    img = np.full((400, 300, 3), 200, np.uint8)
    covered = []
    for s in range(40):
        out = style.dashboard_band(img, np.random.default_rng(s)).astype(float)
        dark_rows = (out[:, 120:180].mean(axis=(1, 2)) < 120)[200:]  # lower half, centre columns
        covered.append(dark_rows.mean() / 2)
    covered = np.array(covered)
    assert covered.min() >= 0.05 and covered.max() <= 0.5
    assert covered.max() - covered.min() > 0.15  # varies


# ---------------------------------------------------------------------------------------- optics


@FAST
@given(h=sizes, w=sizes, seed=seeds)
def test_vignette_darkens_corners_more_than_centre(h, w, seed):
    img = np.full((h, w, 3), 200, np.uint8)
    out = style.vignette(img, np.random.default_rng(seed)).astype(float)
    ch, cw = max(1, h // 10), max(1, w // 10)
    centre = out[h // 2 - ch // 2 : h // 2 + ch // 2 + 1, w // 2 - cw // 2 : w // 2 + cw // 2 + 1].mean()
    assert centre > 170
    for corner in (out[:ch, :cw], out[:ch, -cw:], out[-ch:, :cw], out[-ch:, -cw:]):
        assert corner.mean() < centre - 10
    assert (out <= img).all()


@FAST
@given(h=sizes, w=st.integers(64, 400), seed=seeds)
def test_motion_blur_removes_detail(h, w, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = style.motion_blur(img, np.random.default_rng(seed))
    lap_in = cv2.Laplacian(img, cv2.CV_32F).var()
    lap_out = cv2.Laplacian(out, cv2.CV_32F).var()
    assert lap_out < 0.6 * lap_in
    assert abs(out.astype(float).mean() - img.mean()) < 3  # blur keeps the brightness


def test_sensor_noise_is_stronger_in_dark_images():
    dark = np.full((200, 300, 3), 40, np.uint8)
    bright = np.full((200, 300, 3), 200, np.uint8)
    for s in range(5):
        nd = style.sensor_noise(dark, np.random.default_rng(s)).astype(float)
        nb = style.sensor_noise(bright, np.random.default_rng(s)).astype(float)
        assert nd.std() > 1.0 and nb.std() > 0.5
        assert nd.std() > 1.8 * nb.std(), (nd.std(), nb.std())
        assert abs(nd.mean() - 40) < 2 and abs(nb.mean() - 200) < 2  # zero-mean
        # chroma noise: channels differ from each other
        assert np.abs(nd[..., 0] - nd[..., 2]).mean() > 0.3


def test_jpeg_quality_is_lossy_but_close():
    img = scene(224, 381, 1)
    for s in range(5):
        out = style.jpeg_quality(img, np.random.default_rng(s)).astype(float)
        err = np.abs(out - img).mean()
        assert 0.2 < err < 12
    # channel order survives the BGR round trip
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 220
    out = style.jpeg_quality(red, np.random.default_rng(0))
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 20


# ----------------------------------------------------------------------------- config and driver


def test_config_defaults_and_validation():
    cfg = DashcamStyle()
    assert (cfg.p, cfg.p_night, cfg.p_dashboard, cfg.p_reflection, cfg.p_vignette) == (0.5, 0.35, 0.5, 0.4, 0.5)
    assert (cfg.p_motion_blur, cfg.p_rain, cfg.p_portrait, cfg.p_noise, cfg.p_jpeg) == (0.3, 0.1, 0.2, 0.6, 0.5)
    assert STYLE_OFF.p == 0.0
    assert all(getattr(STYLE_ALL, f.name) == 1.0 for f in fields(DashcamStyle))
    with pytest.raises(FrozenInstanceError):
        cfg.p = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        DashcamStyle(p_night=1.5)


@FAST
@given(h=st.integers(1, 400), w=st.integers(1, 400), seed=seeds)
def test_style_off_returns_the_image_unchanged(h, w, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    for cfg in (STYLE_OFF, DashcamStyle(p=0.0, p_night=1.0, p_dashboard=1.0)):
        out = apply_style(img, np.random.default_rng(seed), cfg)
        assert out is not img
        np.testing.assert_array_equal(out, img)


def test_apply_style_is_deterministic_and_styles_about_p():
    img = scene(224, 381, 2)
    a = [apply_style(img, np.random.default_rng(s)) for s in range(60)]
    b = [apply_style(img, np.random.default_rng(s)) for s in range(60)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    styled = sum(x.shape != img.shape or not np.array_equal(x, img) for x in a)
    assert 15 <= styled <= 45  # p = 0.5
    # one generator across calls (as in a data loader) also works and varies
    rng = np.random.default_rng(0)
    outs = [apply_style(img, rng, DashcamStyle(p=1.0)) for _ in range(5)]
    assert len({o.tobytes() for o in outs}) == 5


def test_apply_style_order_is_physical():
    img = scene(224, 381, 4)
    seen_night = 0
    for s in range(80):
        out, names = apply_style_traced(img, np.random.default_rng(s), DashcamStyle(p=1.0))
        order = [list(TRANSFORMS).index(n) for n in names]
        assert order == sorted(order), names
        assert len(set(names)) == len(names)
        if "street_light_glare" in names or "headlight_bloom" in names:
            assert "night" in names
        seen_night += "night" in names
        assert (out.shape == img.shape) == ("portrait_crop" not in names)
    assert 10 <= seen_night <= 45  # p_night = 0.35


def test_apply_style_night_dashboard_stays_dark():
    """The dashboard goes on after the night look, and is dark in it."""
    img = scene(224, 381, 5)
    cfg = DashcamStyle(p=1.0, p_night=1.0, p_dashboard=1.0, p_portrait=0.0, p_reflection=0.0, p_rain=0.0,
                       p_glare=0.0, p_headlights=0.0, p_noise=0.0, p_jpeg=0.0, p_vignette=0.0, p_motion_blur=0.0)
    for s in range(10):
        out = apply_style(img, np.random.default_rng(s), cfg)
        assert out[-8:].mean() < 20


@pytest.mark.parametrize(
    "img",
    [
        np.zeros((8, 8, 3), np.uint8),
        np.full((8, 8, 3), 255, np.uint8),
        np.zeros((224, 381, 3), np.uint8),
        np.full((224, 381, 3), 255, np.uint8),
        np.full((100, 60, 3), (128, 126, 130), np.uint8),
        np.ones((1, 1, 3), np.uint8),
        np.full((3, 500, 3), 90, np.uint8),
    ],
    ids=["black8", "white8", "black", "white", "grey", "1x1", "strip"],
)
def test_apply_style_never_crashes(img):
    for cfg in (DashcamStyle(p=1.0), STYLE_ALL):
        for s in range(12):
            out = apply_style(img, np.random.default_rng(s), cfg)
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
            assert out.shape[0] <= img.shape[0] and out.shape[1] <= img.shape[1]


def test_apply_style_is_cheap():
    """Loose guard against accidental slow paths (the real budget is ~5 ms per call on one core)."""
    img = scene(224, 381, 6)
    rng = np.random.default_rng(0)
    apply_style(img, rng, STYLE_ALL)
    t = time.process_time()
    for _ in range(30):
        apply_style(img, rng, DashcamStyle(p=1.0))
    assert (time.process_time() - t) / 30 < 0.04


def test_style_sheet(tmp_path):
    imgs = [scene(224, 381, 1), scene(300, 224, 2)]
    path = style_sheet(imgs, tmp_path / "sheet.png", seed=3, per_image=3, tile_h=100)
    sheet = cv2.imread(str(path))
    assert sheet is not None
    assert sheet.shape[0] == 2 * (100 + 28)
    assert sheet.shape[1] == 4 * 175 + 3 * 4
    again = style_sheet(imgs, tmp_path / "again.png", seed=3, per_image=3, tile_h=100)
    np.testing.assert_array_equal(cv2.imread(str(again)), sheet)
    with pytest.raises(ValueError):
        style_sheet([], tmp_path / "empty.png")
