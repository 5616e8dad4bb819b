"""Tests for roadcascade.io.challenge (validator-faithful augmentation, shared/docs/NATIX.md)."""

from __future__ import annotations

import hashlib
import io
import math
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from roadcascade.io import challenge as ch
from roadcascade.io.challenge import (
    SEVERITY,
    ChallengeConfig,
    ViewInfo,
    apply_distortion,
    block_jpeg,
    challenge_view,
    challenge_views,
    challenge_views_with_info,
    color_contrast,
    color_saturation,
    distortion_param,
    gaussian_blur,
    gaussian_noise_color,
    grid_image,
    level0,
)

NOJPEG = ChallengeConfig(jpeg_quality=None)


def _photo(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth, colourful test image with some random texture."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack(
        [127 + 100 * np.sin(x / 9.0), 127 + 100 * np.cos(y / 7.0), 127 + 90 * np.sin((x + y) / 13.0)], axis=-1
    )
    noise = np.random.default_rng(seed).normal(0, 12, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _studio_ycbcr_cv2(rgb: np.ndarray) -> np.ndarray:
    """Independent reference: OpenCV's float YCrCb (BT.601, chroma offset 0.5 on [0,1] input),
    mapped to studio swing normalised to [0, 1]; channels returned in Y, Cb, Cr order."""
    ycrcb = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2YCrCb).astype(np.float64)
    y, cr, cb = ycrcb[..., 0], ycrcb[..., 1] - 0.5, ycrcb[..., 2] - 0.5
    return np.stack([(16 + 219 * y) / 255, (128 + 224 * cb) / 255, (128 + 224 * cr) / 255], axis=-1)


# ------------------------------------------------------------------------------------------
# Severity table
# ------------------------------------------------------------------------------------------

# Re-typed from shared/docs/NATIX.md, independently of the module's constant.
NATIX_TABLE = {
    "CS": [0.4, 0.3, 0.2, 0.1, 0.0],
    "CC": [0.85, 0.725, 0.6, 0.475, 0.35],
    "GNC": [0.001, 0.002, 0.005, 0.01, 0.05],
    "GB": [7, 9, 13, 17, 21],
    "JPEG": [2, 3, 4, 5, 6],
}


def test_severity_table_matches_natix():
    assert set(SEVERITY) == set(NATIX_TABLE)
    for kind, values in NATIX_TABLE.items():
        assert list(SEVERITY[kind]) == values
        for sev in range(1, 6):
            assert distortion_param(kind, sev) == values[sev - 1]
    assert isinstance(distortion_param("GB", 3), int) and isinstance(distortion_param("JPEG", 5), int)


@pytest.mark.parametrize("bad", [0, 6, -1, 1.5, "2", None, True])
def test_distortion_param_rejects_bad_severity(bad):
    with pytest.raises(ValueError):
        distortion_param("CS", bad)


def test_distortion_param_rejects_unknown_kind():
    with pytest.raises(ValueError):
        distortion_param("BW", 1)


# ------------------------------------------------------------------------------------------
# Distortions
# ------------------------------------------------------------------------------------------


def test_cs_keep_zero_is_grey_luma():
    img = _photo()
    out = color_saturation(img, 0.0)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    luma = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
    assert np.abs(out[..., 0].astype(float) - luma).max() <= 0.5 + 1e-9


def test_cs_keep_one_is_identity():
    img = _photo()
    assert np.array_equal(color_saturation(img, 1.0), img)


@pytest.mark.parametrize("p", [0.4, 0.3, 0.2, 0.1])
def test_cs_scales_chroma_keeps_luma(p):
    img = _photo()
    out = color_saturation(img, p)
    ycc_in, ycc_out = _studio_ycbcr_cv2(img), _studio_ycbcr_cv2(out)
    lsb = 1.0 / 255
    # luma kept, chroma (centred on 128/255) scaled by p; within one grey level of rounding
    assert np.abs(ycc_out[..., 0] - ycc_in[..., 0]).max() < 1.01 * lsb
    centre = 128 / 255
    expected = centre + p * (ycc_in[..., 1:] - centre)
    assert np.abs(ycc_out[..., 1:] - expected).max() < 1.3 * lsb


def test_cs_matches_released_ycbcr_formula():
    """The released code scales chroma in cv2-float YCbCr with a studio-range remap; reproduce
    that arithmetic as an oracle (it only differs from ours by its truncation to uint8)."""
    img = _photo()
    p = 0.3
    bgr = img[..., ::-1].astype(np.float32)
    ycc = cv2.cvtColor(bgr, cv2.COLOR_BGR2YCrCb)[..., (0, 2, 1)].astype(np.float32)
    ycc[..., 0] = (ycc[..., 0] * 219 + 16) / 255
    ycc[..., 1:] = (ycc[..., 1:] * 224 + 16) / 255
    ycc[..., 1:] = 0.5 + (ycc[..., 1:] - 0.5) * p
    ycc[..., 0] = (ycc[..., 0] * 255 - 16) / 219
    ycc[..., 1:] = (ycc[..., 1:] * 255 - 16) / 224
    ref = cv2.cvtColor(np.ascontiguousarray(ycc[..., (0, 2, 1)]), cv2.COLOR_YCrCb2BGR)[..., ::-1]
    assert np.abs(color_saturation(img, p).astype(float) - ref).max() < 0.6


@pytest.mark.parametrize("c", [0.85, 0.725, 0.6, 0.475, 0.35])
def test_cc_is_plain_multiply(c):
    img = _photo()
    out = color_contrast(img, c)
    assert np.array_equal(out, np.clip(np.rint(img.astype(np.float64) * c), 0, 255).astype(np.uint8))
    assert np.abs(out - img.astype(float) * c).max() <= 0.5 + 1e-9
    # a multiply, not a contrast change around the mean: black stays black, the mean scales by c
    assert color_contrast(np.zeros((4, 4, 3), np.uint8), c).max() == 0
    assert out.mean() == pytest.approx(c * img.mean(), abs=0.3)


def _block_image(f: int, nby: int = 12, nbx: int = 16) -> np.ndarray:
    by, bx = np.mgrid[0:nby, 0:nbx]
    blocks = np.stack([60 + 4 * bx + 2 * by, 100 + 3 * by, 200 - 3 * bx], axis=-1).astype(np.uint8)
    return np.repeat(np.repeat(blocks, f, axis=0), f, axis=1), blocks


@pytest.mark.parametrize("f", [2, 3, 4, 5, 6])
def test_block_jpeg_constant_blocks_nearly_identity(f):
    img, blocks = _block_image(f)
    out = block_jpeg(img, f)
    assert out.shape == img.shape and out.dtype == np.uint8
    # downscaling recovers the block values, upscaling only interpolates between neighbours:
    # the error is bounded by half the largest step between adjacent blocks (4) plus rounding.
    assert np.array_equal(cv2.resize(img, (img.shape[1] // f, img.shape[0] // f), interpolation=cv2.INTER_LINEAR), blocks)
    assert np.abs(out.astype(int) - img.astype(int)).max() <= 3
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 1.0


@pytest.mark.parametrize("f", [2, 3, 4, 5, 6])
def test_block_jpeg_blurs_checkerboard(f):
    y, x = np.mgrid[0:120, 0:120]
    cb = (((x + y) % 2) * 255).astype(np.uint8)
    img = np.repeat(cb[..., None], 3, axis=2)
    out = block_jpeg(img, f)
    assert out.shape == img.shape
    assert np.abs(out.astype(int) - img.astype(int)).mean() > 60  # far from identity
    assert out.astype(float).std() < 0.5 * img.astype(float).std()  # detail is smeared away


def test_block_jpeg_is_cv2_linear_down_up_and_handles_odd_sizes():
    img = _photo(101, 77)
    for f in (2, 3, 4, 5, 6):
        small = cv2.resize(img, (77 // f, 101 // f), interpolation=cv2.INTER_LINEAR)
        ref = cv2.resize(small, (77, 101), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(block_jpeg(img, f), ref)
    assert block_jpeg(_photo(3, 5), 6).shape == (3, 5, 3)  # floor size 0 -> clamped to 1
    assert np.array_equal(block_jpeg(img, 1), img)


@pytest.mark.parametrize("k", [7, 9, 13, 17, 21])
def test_gb_is_cv2_gaussian_with_sigma_k_over_6(k):
    img = _photo()
    out = gaussian_blur(img, k)
    assert np.array_equal(out, cv2.GaussianBlur(img, (k, k), sigmaX=k / 6.0, sigmaY=k / 6.0))
    assert not np.array_equal(out, cv2.GaussianBlur(img, (k, k), k / 3.0))  # sigma is really k/6


@pytest.mark.parametrize("var,rtol", [(0.001, 0.05), (0.002, 0.05), (0.005, 0.05), (0.01, 0.1)])
def test_gnc_variance_on_mid_grey(var, rtol):
    img = np.full((256, 256, 3), 128, np.uint8)
    out = gaussian_noise_color(img, var, np.random.default_rng(1))
    d = _studio_ycbcr_cv2(out) - _studio_ycbcr_cv2(img)
    for c in range(3):  # Y, Cb, Cr each get noise of variance `var` on the [0,1] studio scale
        assert d[..., c].var() == pytest.approx(var, rel=rtol)
        assert abs(d[..., c].mean()) < 0.1 * math.sqrt(var)
    # channels are independent
    assert abs(np.corrcoef(d[..., 0].ravel(), d[..., 2].ravel())[0, 1]) < 0.05


def test_gnc_grows_with_severity_and_is_seeded():
    img = np.full((64, 64, 3), 128, np.uint8)
    spreads = [gaussian_noise_color(img, v, np.random.default_rng(0)).astype(float).std() for v in SEVERITY["GNC"]]
    assert spreads == sorted(spreads)
    a = gaussian_noise_color(img, 0.01, np.random.default_rng(5))
    b = gaussian_noise_color(img, 0.01, np.random.default_rng(5))
    assert np.array_equal(a, b)


def test_gnc_matches_released_formula_for_same_noise():
    """Oracle: the released arithmetic (cv2 float YCrCb on 0..255 values, studio remap, /255,
    add sqrt(v) * noise, back) with the same standard-normal draw."""
    img = _photo(48, 64)
    var = 0.005
    noise = np.random.default_rng(3).standard_normal((48, 64, 3))
    bgr = img[..., ::-1].astype(np.float32)
    ycc = cv2.cvtColor(bgr, cv2.COLOR_BGR2YCrCb)[..., (0, 2, 1)].astype(np.float32)
    ycc[..., 0] = (ycc[..., 0] * 219 + 16) / 255
    ycc[..., 1:] = (ycc[..., 1:] * 224 + 16) / 255
    b = ((ycc / 255 + math.sqrt(var) * noise) * 255).astype(np.float32)
    b[..., 0] = (b[..., 0] * 255 - 16) / 219
    b[..., 1:] = (b[..., 1:] * 255 - 16) / 224
    ref = np.clip(cv2.cvtColor(np.ascontiguousarray(b[..., (0, 2, 1)]), cv2.COLOR_YCrCb2BGR), 0, 255)[..., ::-1]
    mine = gaussian_noise_color(img, var, np.random.default_rng(3)).astype(float)
    assert np.abs(mine - ref).max() < 1.0


def test_apply_distortion_dispatch():
    img = _photo(40, 50)
    for kind in SEVERITY:
        assert np.array_equal(apply_distortion(img, kind, 0, np.random.default_rng(0)), img)
    assert np.array_equal(apply_distortion(img, "CS", 2), color_saturation(img, 0.3))
    assert np.array_equal(apply_distortion(img, "CC", 5), color_contrast(img, 0.35))
    assert np.array_equal(apply_distortion(img, "JPEG", 3), block_jpeg(img, 4))
    assert np.array_equal(apply_distortion(img, "GB", 1), gaussian_blur(img, 7))
    a = apply_distortion(img, "GNC", 4, np.random.default_rng(9))
    assert np.array_equal(a, gaussian_noise_color(img, 0.01, np.random.default_rng(9)))
    with pytest.raises(ValueError):
        apply_distortion(img, "CS", 6)
    with pytest.raises(ValueError):
        apply_distortion(img, "XX", 1)


# ------------------------------------------------------------------------------------------
# Levels, geometry
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(96, 128), (128, 96), (101, 64), (64, 101), (224, 224), (300, 225)])
def test_level0_is_centre_crop_and_resize(shape):
    h, w = shape
    img = _photo(h, w)
    m = min(h, w)
    top, left = int(round((h - m) / 2)), int(round((w - m) / 2))
    ref = np.asarray(Image.fromarray(img).crop((left, top, left + m, top + m)).resize((224, 224), Image.BILINEAR))
    assert np.array_equal(level0(img, 224), ref)
    view, info = challenge_view(img, np.random.default_rng(0), NOJPEG, level=0)
    assert np.array_equal(view, ref)
    assert info == ViewInfo(level=0, rotation=0.0, crop=None, flips=(False, False), severities={})


def test_level0_equals_released_torchvision_base_transform():
    T = pytest.importorskip("torchvision.transforms")
    for h, w in [(97, 130), (130, 97), (225, 300)]:
        pil = Image.fromarray(_photo(h, w))
        t = T.ToTensor()(T.Resize(224)(T.CenterCrop(min(pil.size))(pil)))
        ref = np.asarray(T.ToPILImage()(t))
        assert np.array_equal(level0(np.asarray(pil), 224), ref)


def test_rotate_resized_crop_matches_torchvision():
    """L1 geometry = torchvision rotate (about the centre, CCW, black fill) + resized_crop
    (bilinear, antialias), up to rounding."""
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode as IM

    img = gaussian_blur(_photo(150, 200), 7)
    t = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    for angle, crop, interp, mode in [
        (13.0, (20, 30, 100, 100), "bilinear", IM.BILINEAR),  # upscaled crop
        (-17.5, (0, 10, 150, 150), "bilinear", IM.BILINEAR),  # downscaled crop, corners black
        (8.0, (5, 40, 120, 120), "nearest", IM.NEAREST),  # what the released code actually used
    ]:
        ref = F.resized_crop(F.rotate(t, angle, interpolation=mode), *crop, [224, 224], IM.BILINEAR, antialias=True)
        ref = ref.permute(1, 2, 0).numpy() * 255
        mine = ch.rotate_resized_crop(img, angle, crop, 224, interp).astype(float)
        assert np.abs(mine - ref).mean() < 0.5
        assert np.abs(mine - ref).max() < 2.0
        flipped = ch.rotate_resized_crop(img, -angle, crop, 224, interp).astype(float)
        assert np.abs(flipped - ref).mean() > 5  # the sign convention matters and is right


def test_random_resized_crop_params_semantics():
    rng = np.random.default_rng(0)
    H, W = 300, 400
    fracs = []
    for _ in range(500):
        top, left, h, w = ch.random_resized_crop_params(H, W, (0.2, 1.0), rng)
        assert h == w and 0 < h <= H and 0 <= top <= H - h and 0 <= left <= W - w
        fracs.append(h * w / (H * W))
    assert min(fracs) >= 0.19 and max(fracs) <= 0.75  # side can not exceed the short edge
    # fallback (torchvision): no square of the target area fits -> central crop of the short side
    assert ch.random_resized_crop_params(100, 50, (1.0, 1.0), rng) == (25, 0, 50, 50)
    assert ch.random_resized_crop_params(50, 100, (1.0, 1.0), rng) == (0, 25, 50, 50)
    # tiny image: every crop is inside it
    for _ in range(50):
        top, left, h, w = ch.random_resized_crop_params(3, 5, (0.2, 1.0), rng)
        assert h == w and 0 < h <= 3 and 0 <= top <= 3 - h and 0 <= left <= 5 - w


def test_rrc_fallback_matches_torchvision():
    T = pytest.importorskip("torchvision.transforms")
    import torch

    for h, w in [(100, 50), (50, 100), (64, 64), (3, 5)]:
        ref = T.RandomResizedCrop.get_params(torch.zeros(3, h, w), scale=[5.0, 5.0], ratio=[1.0, 1.0])
        assert ch.random_resized_crop_params(h, w, (5.0, 5.0), np.random.default_rng(0)) == tuple(ref)


def test_levels_and_distortion_sets():
    img = _photo(48, 64)
    rng = np.random.default_rng(7)
    for level in range(4):
        for _ in range(20):
            view, info = challenge_view(img, rng, ChallengeConfig(size=32, jpeg_quality=None), level=level)
            assert info.level == level and view.shape == (32, 32, 3)
            if level == 0:
                assert info.crop is None and info.rotation == 0.0 and info.severities == {}
            else:
                assert -20.0 <= info.rotation <= 20.0 and info.crop is not None
                assert info.crop[2] == info.crop[3]
            if level == 1:
                assert info.severities == {}
            if level == 2:
                assert list(info.severities) == ["CS", "CC", "JPEG"]
                assert set(info.severities.values()) <= {0, 1}
            if level == 3:
                assert list(info.severities) == ["CS", "CC", "JPEG", "GNC", "GB"]
                assert set(info.severities.values()) <= {0, 1, 2}
    with pytest.raises(ValueError):
        challenge_view(img, rng, level=4)


def test_views_are_reproducible_from_their_info():
    img = _photo(120, 160)
    view, info = challenge_view(img, np.random.default_rng(11), NOJPEG, level=1)
    assert np.array_equal(view, ch.rotate_resized_crop(img, info.rotation, info.crop, 224))
    for seed in range(5):  # L2 has no noise, so the info fully determines the view
        view2, info2 = challenge_view(img, np.random.default_rng(seed), NOJPEG, level=2)
        ref = ch.rotate_resized_crop(img, info2.rotation, info2.crop, 224)
        for kind, s in info2.severities.items():
            ref = apply_distortion(ref, kind, s)
        assert np.array_equal(view2, ref)


def test_level_frequencies():
    img = _photo(8, 8)
    cfg = ChallengeConfig(size=8, jpeg_quality=None)
    rng = np.random.default_rng(2024)
    n = 2000
    counts = np.bincount([challenge_view(img, rng, cfg)[1].level for _ in range(n)], minlength=4)
    assert np.all(np.abs(counts / n - 0.25) < 0.04), counts
    only2 = ChallengeConfig(size=8, jpeg_quality=None, level_probs=(0.0, 0.0, 1.0, 0.0))
    assert {challenge_view(img, rng, only2)[1].level for _ in range(50)} == {2}


def test_flips_as_released_never_else_half():
    img = _photo(32, 40)
    released = ChallengeConfig(size=16, jpeg_quality=None, as_released=True)
    flipping = ChallengeConfig(size=16, jpeg_quality=None, as_released=False)
    n = 600
    h_count = v_count = 0
    for i in range(n):
        a, ia = challenge_view(img, np.random.default_rng(i), released, level=1)
        b, ib = challenge_view(img, np.random.default_rng(i), flipping, level=1)
        assert ia.flips == (False, False)
        # both modes share every other draw; the flipped view is the released view, flipped
        assert (ia.rotation, ia.crop) == (ib.rotation, ib.crop)
        expected = a
        if ib.flips[0]:
            expected = expected[:, ::-1]
        if ib.flips[1]:
            expected = expected[::-1]
        assert np.array_equal(b, expected)
        h_count += ib.flips[0]
        v_count += ib.flips[1]
    assert abs(h_count / n - 0.5) < 0.08 and abs(v_count / n - 0.5) < 0.08


# ------------------------------------------------------------------------------------------
# JPEG round trip, determinism
# ------------------------------------------------------------------------------------------


def test_final_jpeg_round_trip_q75():
    img = _photo(120, 160)
    raw, _ = challenge_view(img, np.random.default_rng(4), NOJPEG)
    sent, _ = challenge_view(img, np.random.default_rng(4), ChallengeConfig())
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, format="JPEG")  # PIL default quality (75), as the validator
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(sent, ref)
    assert not np.array_equal(sent, raw)


def test_challenge_views_deterministic_and_keyed():
    img = _photo(90, 120)
    a = challenge_views(img, seed=0, key="img-001")
    b = challenge_views(img, seed=0, key="img-001")
    assert len(a) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b))
    other_seed = challenge_views(img, seed=1, key="img-001")
    other_key = challenge_views(img, seed=0, key="img-002")
    assert any(not np.array_equal(x, y) for x, y in zip(a, other_seed))
    assert any(not np.array_equal(x, y) for x, y in zip(a, other_key))
    # the four views are not all the same, and view i does not depend on n
    assert len({x.tobytes() for x in a}) > 1
    two = challenge_views(img, seed=0, key="img-001", n=2)
    assert all(np.array_equal(x, y) for x, y in zip(two, a[:2]))
    # int keys are accepted (used through their text)
    assert all(np.array_equal(x, y) for x, y in zip(challenge_views(img, 0, 7, 2), challenge_views(img, 0, "7", 2)))
    infos = [i for _, i in challenge_views_with_info(img, 0, "img-001")]
    assert all(isinstance(i, ViewInfo) for i in infos)


_DIGEST_SNIPPET = textwrap.dedent(
    """
    import hashlib, numpy as np
    from roadcascade.io.challenge import challenge_views
    img = np.random.default_rng(123).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    h = hashlib.sha256()
    for key in ("a", "b", 42):
        for v in challenge_views(img, seed=3, key=key, n=4):
            h.update(v.tobytes())
    print(h.hexdigest())
    """
)


def test_challenge_views_same_in_another_process():
    img = np.random.default_rng(123).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    h = hashlib.sha256()
    for key in ("a", "b", 42):
        for v in challenge_views(img, seed=3, key=key, n=4):
            h.update(v.tobytes())
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _DIGEST_SNIPPET], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == h.hexdigest()


def test_training_augment_fresh_randomness():
    aug = ch.ChallengeAugment(ChallengeConfig(size=32))
    img = _photo(48, 64)
    outs = {aug(img).tobytes() for _ in range(8)}
    assert len(outs) > 1
    assert all(len(o) == 32 * 32 * 3 for o in outs)


# ------------------------------------------------------------------------------------------
# Shapes and dtypes (property tests)
# ------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(1, 48),
    w=st.integers(1, 48),
    seed=st.integers(0, 2**32 - 1),
    level=st.sampled_from([None, 0, 1, 2, 3]),
    channels=st.sampled_from([None, 1, 3, 4]),
)
@example(h=3, w=5, seed=0, level=3, channels=3)
@example(h=5, w=3, seed=1, level=1, channels=3)
@example(h=1, w=1, seed=2, level=2, channels=None)
def test_view_shape_dtype_property(h, w, seed, level, channels):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    view, info = challenge_view(img, rng, ChallengeConfig(), level=level)
    assert view.shape == (224, 224, 3) and view.dtype == np.uint8
    assert info.level in (0, 1, 2, 3)
    if info.crop is not None:
        top, left, ch_, cw = info.crop
        assert ch_ == cw and 0 <= top <= h - ch_ and 0 <= left <= w - cw


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), size=st.integers(1, 64), seed=st.integers(0, 1000))
def test_views_and_distortions_shape_property(h, w, size, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    views = challenge_views(img, seed, "k", n=2, cfg=ChallengeConfig(size=size))
    assert all(v.shape == (size, size, 3) and v.dtype == np.uint8 for v in views)
    for kind in SEVERITY:
        for sev in (1, 5):
            out = apply_distortion(img, kind, sev, rng)
            assert out.shape == img.shape and out.dtype == np.uint8


def test_bad_inputs_and_config():
    with pytest.raises(TypeError):
        level0(np.zeros((4, 4, 3), np.float32), 8)
    with pytest.raises(ValueError):
        level0(np.zeros((0, 4, 3), np.uint8), 8)
    with pytest.raises(ValueError):
        level0(np.zeros((4, 4, 2), np.uint8), 8)
    with pytest.raises(ValueError):
        ChallengeConfig(level_probs=(0.5, 0.5, 0.5, 0.0))
    with pytest.raises(ValueError):
        ChallengeConfig(jpeg_quality=0)
    with pytest.raises(ValueError):
        ChallengeConfig(rotation_interpolation="cubic")


def test_grid_image():
    a = np.full((10, 6, 3), 10, np.uint8)
    b = np.full((8, 4, 3), 20, np.uint8)
    g = grid_image([a, b], gap=2)
    assert g.shape == (10, 12, 3) and g.dtype == np.uint8
    assert (g[:, :6] == 10).all() and (g[:, 6:8] == 255).all() and (g[:8, 8:] == 20).all() and (g[8:, 8:] == 255).all()
    views = challenge_views(_photo(40, 50), 0, "x", n=4, cfg=ChallengeConfig(size=32))
    assert grid_image(views).shape == (32, 128, 3)
    with pytest.raises(ValueError):
        grid_image([])
