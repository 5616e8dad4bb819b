"""Training with extra (synthetic) sets: the sampling weights and the guard against non-train extra data."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roadcascade.fit.train import open_extra_train, sample_weights

from conftest import random_image


def _mass(w: np.ndarray, mask) -> float:
    return float(w[np.asarray(mask, bool)].sum())


def test_extra_share_and_balance_sqrt():
    # real: A 400, B 100 (4x); extra 50
    sources = ["A"] * 400 + ["B"] * 100 + ["synth"] * 50
    extra = [False] * 500 + [True] * 50
    src = np.array(sources)
    w = sample_weights(sources, extra, 0.3, balance=True)
    assert w.shape == (550,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert _mass(w, extra) == pytest.approx(0.3)
    a, b = _mass(w, src == "A"), _mass(w, src == "B")
    assert a + b == pytest.approx(0.7)
    assert a / b == pytest.approx(2.0)  # sqrt(4)
    # within a source (and within the extra set) every sample weighs the same
    for name in ("A", "B", "synth"):
        assert np.ptp(w[src == name]) == pytest.approx(0.0, abs=1e-15)
    # a sample of the small source is drawn more often than one of the large source
    assert w[src == "B"][0] > w[src == "A"][0]


def test_no_balance_is_proportional():
    sources = ["A"] * 400 + ["B"] * 100 + ["synth"] * 50
    extra = [False] * 500 + [True] * 50
    src = np.array(sources)
    w = sample_weights(sources, extra, 0.25, balance=False)
    assert w.sum() == pytest.approx(1.0) and _mass(w, extra) == pytest.approx(0.25)
    assert _mass(w, src == "A") / _mass(w, src == "B") == pytest.approx(4.0)
    # without balancing every real sample weighs the same
    assert np.ptp(w[~np.array(extra)]) == pytest.approx(0.0, abs=1e-15)


def test_only_extra_gets_all():
    w = sample_weights(["synth"] * 10, [True] * 10, 0.3, balance=True)
    assert w.sum() == pytest.approx(1.0) and np.allclose(w, 0.1)


def test_only_real_ignores_share():
    w = sample_weights(["A"] * 3 + ["B"] * 12, [False] * 15, 0.3, balance=True)
    assert w.sum() == pytest.approx(1.0)
    assert w[:3].sum() / w[3:].sum() == pytest.approx(0.5)  # sqrt(3/12)


source_lists = st.lists(st.sampled_from(["camvid", "gtsdb", "tracon", "roboflow-cones", "road-cone"]), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(source_lists, st.integers(0, 30), st.floats(0.0, 1.0), st.booleans())
def test_weights_properties(real_sources, n_extra, share, balance):
    sources = real_sources + ["synth"] * n_extra
    extra = [False] * len(real_sources) + [True] * n_extra
    src, ext = np.array(sources), np.array(extra)
    w = sample_weights(sources, extra, share, balance)
    assert w.shape == (len(sources),)
    assert np.all(w >= 0)
    assert w.sum() == pytest.approx(1.0)
    real_mass = 1.0 - share if n_extra else 1.0
    assert w[~ext].sum() == pytest.approx(real_mass, abs=1e-9)
    if n_extra:
        assert w[ext].sum() == pytest.approx(share, abs=1e-9)
    names, counts = np.unique(src[~ext], return_counts=True)
    masses = np.array([w[~ext & (src == n)].sum() for n in names])
    expect = np.sqrt(counts) if balance else counts.astype(float)
    assert masses == pytest.approx(real_mass * expect / expect.sum(), abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(source_lists, st.floats(0.0, 1.0), st.booleans())
def test_no_extra_real_get_everything(real_sources, share, balance):
    w = sample_weights(real_sources, [False] * len(real_sources), share, balance)
    assert w.sum() == pytest.approx(1.0) and np.all(w > 0)


# ----------------------------------------------------------------------------- open_extra_train


def _manifest_dir(root: Path, splits: list[str], image: Path) -> Path:
    root.mkdir()
    (root / "images").mkdir()
    rows = []
    for i, sp in enumerate(splits):
        name = f"images/x{i}{image.suffix}"
        shutil.copy(image, root / name)
        rows.append({"file": name, "label": i % 2, "split": sp, "source": "synth", "width": 0, "height": 0,
                     "license": "test", "boxes": "[]"})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture
def one_image(tmp_path: Path, streetwork: Path) -> Path:
    with open(streetwork / "manifest.csv", newline="") as f:
        first = next(csv.DictReader(f))
    return streetwork / first["file"]


@pytest.mark.parametrize("bad", ["val", "test"])
def test_open_extra_train_refuses_other_splits(tmp_path, one_image, bad):
    d = _manifest_dir(tmp_path / "m", ["train", "train", bad], one_image)
    with pytest.raises(ValueError, match=bad):
        open_extra_train([str(d)])
    # also when the bad set comes after a good one
    good = _manifest_dir(tmp_path / "g", ["train", "train"], one_image)
    with pytest.raises(ValueError):
        open_extra_train([str(good), str(d)])


def test_open_extra_train_accepts_train(tmp_path, one_image):
    a = _manifest_dir(tmp_path / "a", ["train", "train", "train"], one_image)
    b = _manifest_dir(tmp_path / "b", ["train"], one_image)
    ds = open_extra_train([str(a), str(b)])
    assert len(ds) == 4
    assert {s.split for s in ds.samples} == {"train"}
    assert ds.labels().tolist() == [0, 1, 0, 0]
    assert ds.samples[0].load().ndim == 3  # the copied image is readable
    assert len(open_extra_train([])) == 0


def test_open_extra_train_without_data(tmp_path):
    """Works on any manifest: a random image stands in when the shared data is absent."""
    from PIL import Image

    img = tmp_path / "r.png"
    Image.fromarray(random_image(np.random.default_rng(0))).save(img)
    d = _manifest_dir(tmp_path / "m", ["train", "val"], img)
    with pytest.raises(ValueError):
        open_extra_train([str(d)])
    ok = _manifest_dir(tmp_path / "ok", ["train"], img)
    assert len(open_extra_train([str(ok)])) == 1
