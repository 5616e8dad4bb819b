"""Challenge protocols (issue #12): v2.0.4 unchanged, letterbox (2026-04-06), native (2026-05-03)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roadcascade.io.challenge import (
    PROTOCOLS,
    ChallengeConfig,
    challenge_view,
    challenge_views,
    challenge_views_with_info,
    jpeg_roundtrip,
    letterbox,
    letterbox_geometry,
    rotate_full,
)

from test_challenge import _photo

REFERENCE = Path(__file__).parent / "data" / "challenge_v204_reference.json"


def _bright(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like image with no pixel darker than 40, so black padding is unambiguous."""
    return np.maximum(_photo(h, w, seed), 40).astype(np.uint8)


# ------------------------------------------------------------------------------------ config
def test_protocols_listed_and_default_is_v204():
    assert PROTOCOLS == ("v2.0.4", "letterbox", "native")
    assert ChallengeConfig().protocol == "v2.0.4"


@pytest.mark.parametrize("bad", ["", "v2.0.5", "Letterbox", None, 1])
def test_unknown_protocol_refused(bad):
    with pytest.raises(ValueError, match="protocol"):
        ChallengeConfig(protocol=bad)


# ------------------------------------------------------------------------------------ v2.0.4 unchanged
BLOCKS = 4  # each view's fingerprint: the mean of every channel over a BLOCKS x BLOCKS grid of cells
BLOCK_TOL = 0.5  # grey levels: far below what another crop, angle, level or quality moves, far above rounding


def _blocks(v: np.ndarray) -> list[float]:
    """Per-cell channel means of a view (rounded to 0.01), a fingerprint that survives interpolation rounding."""
    return [round(float(c.mean()), 2) for rows in np.array_split(v.astype(np.float64), BLOCKS, axis=0)
            for cell in np.array_split(rows, BLOCKS, axis=1) for c in np.moveaxis(cell, -1, 0)]


def _reference_digests() -> dict[str, list]:
    """Recompute the entries of tests/data/challenge_v204_reference.json: [SHA-256, shape, level, cell means]. The
    digests were written by the same loop with the code before the protocol switch existed (commit fc5fddd); the cell
    means were added with the current code under the same OpenCV (5.0.0), where every digest still matched."""
    cfgs = {"default": ChallengeConfig(), "nojpeg": ChallengeConfig(jpeg_quality=None),
            "flips": ChallengeConfig(as_released=False, jpeg_quality=None), "s160": ChallengeConfig(size=160)}
    out = {}
    for cname, cfg in cfgs.items():
        for h, w in [(96, 128), (131, 77), (224, 300)]:
            img = _photo(h, w, seed=h + w)
            for seed in (0, 1):
                for i, (v, info) in enumerate(challenge_views_with_info(img, seed, f"k{h}x{w}", n=8, cfg=cfg)):
                    assert info.protocol == "v2.0.4"
                    out[f"{cname}/{h}x{w}/s{seed}/v{i}"] = [hashlib.sha256(v.tobytes()).hexdigest(), list(v.shape), info.level, _blocks(v)]
            for lvl in range(4):
                v, _ = challenge_view(img, 7, cfg, level=lvl)
                out[f"{cname}/{h}x{w}/forced{lvl}"] = [hashlib.sha256(v.tobytes()).hexdigest(), list(v.shape), lvl, _blocks(v)]
    return out


def test_v204_is_bit_for_bit_what_it_was():
    """Every v2.0.4 view as it was: bit for bit under the OpenCV the reference was written with; under another
    OpenCV (its resize and warp rounding moved 66 of these 240 views by 1-7 grey levels in under 0.4 % of their
    pixels from 5.0.0 to 5.1.0) the same shape, level and cell means within BLOCK_TOL."""
    ref = json.loads(REFERENCE.read_text())
    opencv = ref.pop("_opencv")
    got = _reference_digests()
    assert set(got) == set(ref)
    assert {x[2] for x in ref.values()} == {0, 1, 2, 3}  # every level is covered
    assert all(got[k][1:3] == ref[k][1:3] for k in ref)  # shapes and levels
    if cv2.__version__ == opencv:
        diff = [k for k in ref if got[k][0] != ref[k][0]]
        assert not diff, f"{len(diff)} views changed, e.g. {diff[:3]}"
    far = {k: float(np.max(np.abs(np.subtract(got[k][3], ref[k][3])))) for k in ref}
    bad = {k: d for k, d in far.items() if d > BLOCK_TOL}
    assert not bad, f"{len(bad)} views moved, e.g. {sorted(bad.items())[:3]}"


def test_view_fingerprint_sees_a_changed_view():
    """The tolerance cannot hide a real change: a view one pixel off, or another level's view, moves its cells."""
    img = _photo(224, 300, seed=524)
    a, _ = challenge_view(img, 7, ChallengeConfig(), level=0)
    shifted = np.roll(a, 3, axis=1)
    assert np.max(np.abs(np.subtract(_blocks(a), _blocks(shifted)))) > BLOCK_TOL
    b, _ = challenge_view(img, 7, ChallengeConfig(), level=2)
    assert np.max(np.abs(np.subtract(_blocks(a), _blocks(b)))) > BLOCK_TOL


def test_explicit_v204_equals_default():
    img = _photo(120, 90, 3)
    a = challenge_views(img, 5, "x", n=6)
    b = challenge_views(img, 5, "x", n=6, cfg=ChallengeConfig(protocol="v2.0.4"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------ letterbox
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(1, 700), w=st.integers(1, 700), size=st.integers(8, 300))
def test_letterbox_geometry_keeps_aspect_and_centres(h, w, size):
    top, left, bh, bw = letterbox_geometry(h, w, size)
    assert max(bh, bw) == size and 1 <= min(bh, bw) <= size
    # aspect ratio kept up to the rounding of one side
    short, exact = (bw, w * size / h) if h >= w else (bh, h * size / w)
    assert abs(short - exact) <= 0.5 + 1e-9 or (short == 1 and exact < 1)  # at least one pixel
    assert top + bh + top in (size, size - 1) and left + bw + left in (size, size - 1)
    assert top >= 0 and left >= 0 and top + bh <= size and left + bw <= size


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(20, 400), w=st.integers(20, 400))
def test_letterbox_image_is_padded_black_around_the_resized_picture(h, w):
    img = _bright(h, w, seed=h * 7 + w)
    out = letterbox(img, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    top, left, bh, bw = letterbox_geometry(h, w, 224)
    inner = out[top:top + bh, left:left + bw]
    mask = np.ones((224, 224), bool)
    mask[top:top + bh, left:left + bw] = False
    assert (out[mask] == 0).all()  # the padding bands are black
    assert inner.min() >= 30  # the picture fills its box (no black inside)
    # independent reference: OpenCV's area resize of the same image to the same box
    ref = cv2.resize(img, (bw, bh), interpolation=cv2.INTER_AREA if bh <= h else cv2.INTER_LINEAR)
    assert np.abs(inner.astype(int) - ref.astype(int)).mean() < 12


def test_letterbox_views_level0_and_level1():
    img = _bright(180, 320)  # landscape 16:9 -> bands top and bottom
    cfg = ChallengeConfig(protocol="letterbox", jpeg_quality=None)
    top, left, bh, bw = letterbox_geometry(180, 320, 224)
    assert (top, left, bh, bw) == (49, 0, 126, 224)
    v0, i0 = challenge_view(img, 3, cfg, level=0)
    assert np.array_equal(v0, letterbox(img, 224)) and i0.crop is None and i0.protocol == "letterbox"
    rng = np.random.default_rng(11)
    v1, i1 = challenge_view(img, rng, cfg, level=1)
    assert i1.crop is None and i1.level == 1 and abs(i1.rotation) <= 20 and i1.protocol == "letterbox"
    # the draws: angle first (no crop), then two flip draws
    again = np.random.default_rng(11)
    angle = float(again.uniform(-20, 20))
    assert angle == i1.rotation
    assert np.array_equal(v1, letterbox(rotate_full(img, angle), 224))
    assert (v1[:top] == 0).all() and (v1[top + bh:] == 0).all()  # bands stay black under rotation


def test_letterbox_views_all_levels_square_with_dark_bands():
    img = _bright(150, 400, seed=4)  # very wide: 84 px tall box, 70 px bands
    top, _, bh, _ = letterbox_geometry(150, 400, 224)
    cfg = ChallengeConfig(protocol="letterbox")  # with the final JPEG q75
    seen = set()
    for v, info in challenge_views_with_info(img, 2, "wide", n=24, cfg=cfg):
        seen.add(info.level)
        assert v.shape == (224, 224, 3) and info.crop is None
        band = np.concatenate([v[: top - 12], v[top + bh + 12:]])  # away from the picture's edge (blur, block "JPEG")
        assert band.mean() < 12, (info, band.mean())  # black, plus clipped GNC noise at L3
        assert v[top + 10: top + bh - 10].mean() > 25
        if info.level >= 2:
            assert set(info.severities) == ({"CS", "CC", "JPEG"} if info.level == 2 else {"CS", "CC", "JPEG", "GNC", "GB"})
    assert seen == {0, 1, 2, 3}


def test_letterbox_portrait_pads_left_and_right():
    img = _bright(300, 120, seed=2)
    v, _ = challenge_view(img, 0, ChallengeConfig(protocol="letterbox", jpeg_quality=None), level=0)
    _, left, _, bw = letterbox_geometry(300, 120, 224)
    assert bw == 90 and left == 67
    assert (v[:, :left] == 0).all() and (v[:, left + bw:] == 0).all() and v[:, left:left + bw].min() >= 30


# ------------------------------------------------------------------------------------ native
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(16, 300), w=st.integers(16, 300), seed=st.integers(0, 2**31))
def test_native_keeps_size_and_differs_only_by_jpeg(h, w, seed):
    img = _photo(h, w, seed % 1000)
    cfg = ChallengeConfig(protocol="native")
    rng = np.random.default_rng(seed)
    state = rng.bit_generator.state
    v, info = challenge_view(img, rng, cfg)
    assert rng.bit_generator.state == state  # nothing drawn: no augmentation
    assert v.shape == img.shape and info.level == 0 and info.rotation == 0.0 and info.crop is None
    assert info.protocol == "native"
    assert np.array_equal(v, jpeg_roundtrip(img, 75))  # exactly one JPEG q75 round trip
    err = np.abs(v.astype(int) - img.astype(int))
    assert 0 < err.mean() < 12  # JPEG loss, not a different picture


def test_native_without_jpeg_is_the_image_and_views_agree():
    img = _photo(77, 131, 1)
    v, _ = challenge_view(img, 0, ChallengeConfig(protocol="native", jpeg_quality=None))
    assert np.array_equal(v, img) and v is not img
    vs = challenge_views(img, 1, "k", n=4, cfg=ChallengeConfig(protocol="native"))
    assert all(np.array_equal(vs[0], x) for x in vs[1:])


def test_native_has_no_levels():
    with pytest.raises(ValueError, match="native"):
        challenge_view(_photo(), 0, ChallengeConfig(protocol="native"), level=2)


# ------------------------------------------------------------------------------------ eval items
def test_make_items_follow_the_protocol(tmp_path):
    from roadcascade.io.data import open_dataset
    from roadcascade.bench.evaluate import make_items
    from roadcascade.io.images import decode_bytes

    root = tmp_path / "imgs"
    for cls, seed in (("roadwork", 1), ("none", 2)):
        (root / cls).mkdir(parents=True)
        from PIL import Image

        Image.fromarray(_bright(180, 320, seed)).save(root / cls / f"a{seed}.png")
    ds = open_dataset(str(root))
    native = make_items(ds, "challenge", seed=0, n_views=4, protocol="native")
    assert len(native) == len(ds)  # one view per image: all views would be the same
    assert all(decode_bytes(it.payload).shape == (180, 320, 3) for it in native)
    boxed = make_items(ds, "challenge", seed=0, n_views=3, protocol="letterbox")
    assert len(boxed) == 3 * len(ds)
    assert all(decode_bytes(it.payload).shape == (224, 224, 3) for it in boxed)
    with pytest.raises(ValueError, match="protocol"):
        make_items(ds, "challenge", seed=0, protocol="bogus")


def test_challenge_items_are_made_once_and_remade_when_an_image_changes(tmp_path, monkeypatch):
    """Challenge views asked for again (build, select, ship and eval in one run) come from the process's cache: the
    same items, without making them again; a changed image, other settings, a bad image or a list too large are not
    served from it."""
    import os

    from PIL import Image

    import roadcascade.io.items as items_mod
    from roadcascade.io.data import open_dataset

    monkeypatch.setattr(items_mod, "_VIEWS_CACHE", {})
    root = tmp_path / "imgs"
    for cls, seed in (("roadwork", 1), ("none", 2)):
        (root / cls).mkdir(parents=True)
        Image.fromarray(_bright(120, 200, seed)).save(root / cls / f"a{seed}.png")
    ds = open_dataset(str(root))
    calls = []
    real = items_mod._make_items
    monkeypatch.setattr(items_mod, "_make_items", lambda *a: (calls.append(a[2:]), real(*a))[1])
    first = items_mod.make_items(ds, "challenge", seed=0, n_views=2)
    again = items_mod.make_items(ds, "challenge", seed=0, n_views=2)
    assert again == first and again is not first and len(calls) == 1
    items_mod.make_items(ds, "challenge", seed=1, n_views=2)  # another seed: made
    items_mod.make_items(ds, "clean", seed=0)  # clean items are the stored bytes: never cached
    assert len(calls) == 3
    f = root / "none" / "a2.png"
    Image.fromarray(_bright(120, 200, 7)).save(f)
    os.utime(f, ns=(1, 1))  # a changed file (size or mtime) is another image
    changed = items_mod.make_items(ds, "challenge", seed=0, n_views=2)
    assert len(calls) == 4 and changed != first
    (root / "roadwork" / "a1.png").write_bytes(b"not an image")
    for _ in range(2):  # a set with a bad image: made each time, its bad rows reported each time
        bad: list[dict] = []
        got = items_mod.make_items(ds, "challenge", seed=0, n_views=2, bad=bad)
        assert len(got) == 2 and len(bad) == 1 and "a1" in bad[0]["key"]
    assert len(calls) == 6
    monkeypatch.setattr(items_mod, "_VIEWS_CACHE_BYTES", 10)
    items_mod.make_items(ds, "challenge", seed=3, n_views=1, bad=[])
    items_mod.make_items(ds, "challenge", seed=3, n_views=1, bad=[])
    assert len(calls) == 8  # too large to keep


# ------------------------------------------------------------------------------------ training augmentation
def test_training_augmentation_follows_the_protocol():
    from roadcascade.fit.train import AugmentedSet, TrainConfig, augment, view_set

    img = _bright(180, 320, 9)
    for protocol in PROTOCOLS:
        for seed in range(12):
            out = augment(img, np.random.default_rng(seed), 96, clean_prob=0.0, protocol=protocol)
            assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    # the default is v2.0.4, draw for draw
    a = augment(img, np.random.default_rng(5), 96, 0.0)
    b = augment(img, np.random.default_rng(5), 96, 0.0, protocol="v2.0.4")
    assert np.array_equal(a, b)
    # letterbox training views keep their black bands (a 16:9 image in a square: top and bottom, h-flips keep them)
    boxed = [augment(img, np.random.default_rng(s), 96, 0.0, protocol="letterbox") for s in range(8)]
    assert all(v[:10].mean() < 12 and v[-10:].mean() < 12 for v in boxed)
    ds = AugmentedSet([img], np.array([1]), 96, 0.0, seed=0, protocol="native")
    x, _ = ds[0]
    assert tuple(x.shape) == (3, 96, 96)
    with pytest.raises(ValueError, match="protocol"):
        TrainConfig(protocol="v3")
    assert TrainConfig().protocol == "v2.0.4"

    class _S:
        key, label = "k", 1

    class _D:
        samples = [_S()]

    views, y = view_set(_D(), [img], 3, 0, 112, protocol="native")
    assert len(views) == 3 and all(v.shape == img.shape for v in views) and y.tolist() == [1, 1, 1]


def test_eval_cli_records_the_protocol(tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from roadcascade.cli import app
    from roadcascade.serve.testing import tiny_bundle

    bdir = tiny_bundle(tmp_path / "tiny")
    root = tmp_path / "imgs"
    for cls, seeds in (("roadwork", (1, 2)), ("none", (3, 4))):
        (root / cls).mkdir(parents=True)
        for s in seeds:
            Image.fromarray(_bright(120, 200, s)).save(root / cls / f"{s}.jpg")
    runner = CliRunner()
    for protocol, n in (("v2.0.4", 8), ("letterbox", 8), ("native", 4)):
        out = tmp_path / f"{protocol}.json"
        r = runner.invoke(app, ["eval", "--bundle", str(bdir), "--data", str(root), "--split", "all", "--views", "challenge",
                                "--n-views", "2", "--protocol", protocol, "--json", str(out), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        doc = json.loads(out.read_text())
        assert doc["protocol"] == protocol and doc["n"] == n and doc["n_views_per_image"] == n // 4
    clean = tmp_path / "clean.json"
    r = runner.invoke(app, ["eval", "--bundle", str(bdir), "--data", str(root), "--split", "all", "--json", str(clean),
                            "--device", "cpu"])
    assert r.exit_code == 0 and json.loads(clean.read_text())["protocol"] is None
    r = runner.invoke(app, ["eval", "--bundle", str(bdir), "--data", str(root), "--split", "all", "--views", "challenge",
                            "--protocol", "v9"])
    assert r.exit_code != 0 and "protocol" in r.output
