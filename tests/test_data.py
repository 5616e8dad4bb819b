from pathlib import Path

import numpy as np
import pytest

from conftest import jpeg_bytes, random_image
from roadcascade.io.data import DataError, open_dataset, to_parquet_bytes


def test_streetwork_manifest_counts(streetwork):
    ds = open_dataset(streetwork)
    assert len(ds) == 2066
    assert ds.splits == ["test", "train", "val"]
    # DATA.md: train 947 neg / 515 pos; val 192 / 109; test 196 / 107
    assert ds.split("train").counts() == {"n": 1462, "pos": 515, "neg": 947}
    assert ds.split("val").counts() == {"n": 301, "pos": 109, "neg": 192}
    assert ds.split("test").counts() == {"n": 303, "pos": 107, "neg": 196}
    s = next(x for x in ds.samples if x.boxes)
    assert all(len(b) == 4 and all(0 <= v <= 1.0001 for v in b) for b in s.boxes)
    img = s.load()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def test_unknown_split_is_clear(streetwork):
    with pytest.raises(DataError, match="present: test, train, val"):
        open_dataset(streetwork, "holdout")


def test_env_var_default(streetwork, monkeypatch):
    monkeypatch.setenv("ROADCASCADE_DATA", str(streetwork))
    assert len(open_dataset(None, "val")) == 301


def test_folder_dataset(folder_dataset):
    ds = open_dataset(folder_dataset)
    assert ds.counts() == {"n": 7, "pos": 3, "neg": 4}
    assert ds.splits == ["all"]
    assert ds[0].load().shape == (48, 64, 3)


def test_folder_with_split_subdirs(folder_dataset, tmp_path):
    root = tmp_path / "splits"
    root.mkdir()
    (root / "train").symlink_to(folder_dataset)
    (root / "val").symlink_to(folder_dataset)
    ds = open_dataset(root, "val")
    assert len(ds) == 7 and ds.splits == ["val"]


def test_empty_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no images"):
        open_dataset(tmp_path)


def test_missing_path_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "nope")


def test_parquet_natix_layout(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [random_image(rng) for _ in range(5)]
    rows = [(jpeg_bytes(im), i % 2) for i, im in enumerate(imgs)]
    (tmp_path / "train-00000-of-00001.parquet").write_bytes(to_parquet_bytes(rows))
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(to_parquet_bytes(rows[:2]))
    ds = open_dataset(tmp_path)
    assert ds.splits == ["test", "train"]
    tr = open_dataset(tmp_path, "train")
    assert tr.labels().tolist() == [0, 1, 0, 1, 0]
    assert tr[1].load().shape == (48, 64, 3)
    single = open_dataset(tmp_path / "test-00000-of-00001.parquet")
    assert len(single) == 2


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"img": [b"x"], "label": [1]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="column 'image' missing"):
        open_dataset(tmp_path / "x.parquet")


def test_subset_is_stratified_and_seeded(streetwork):
    ds = open_dataset(streetwork, "train")
    a, b = ds.subset(100, seed=3), ds.subset(100, seed=3)
    assert [s.key for s in a.samples] == [s.key for s in b.samples]
    assert abs(a.counts()["pos"] - 100 * 515 / 1462) <= 1
