"""`roadcascade eval` records bad rows and goes on (`--strict` stops); `predict` streams batches, escapes file
names and speaks JSON lines. A tiny untrained bundle and a generated manifest data set: fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes, random_image
from PIL import Image
from typer.testing import CliRunner

from roadcascade.cli import app
from roadcascade.cli.predict_out import printable
from roadcascade.serve.testing import tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("b") / "tiny")


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["file,label,split,source,boxes"]
    for i in range(6):
        (root / "images" / f"{i}.jpg").write_bytes(jpeg_bytes(random_image(rng)))
        rows.append(f"images/{i}.jpg,{i % 2},test,src{i % 2},[]")
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows += ["images/missing.jpg,1,test,src1,[]", "images/corrupt.jpg,0,test,src0,[]", "images/0.jpg,maybe,test,src0,[]"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_eval_records_bad_rows_and_goes_on(bundle, dataset, tmp_path):
    out = tmp_path / "e.json"
    r = CliRunner().invoke(app, ["eval", "--bundle", str(bundle), "--split", "test", "--data", str(dataset), "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["n"] == 6 and rep["n_bad"] == 3
    assert sorted(b["reason"] for b in rep["bad_rows"]) == ["bad_label", "missing", "truncated"]
    assert {b["key"] for b in rep["bad_rows"]} == {"images/missing.jpg", "images/corrupt.jpg", "images/0.jpg"}
    assert "3 bad row(s) skipped" in r.output


def test_eval_records_bad_rows_with_challenge_views_too(bundle, dataset, tmp_path):
    out = tmp_path / "e.json"
    r = CliRunner().invoke(app, ["eval", "--bundle", str(bundle), "--split", "test", "--views", "challenge", "--n-views", "1",
                                 "--data", str(dataset), "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["n"] == 6 and sorted(b["reason"] for b in rep["bad_rows"]) == ["bad_label", "missing", "truncated"]


def test_eval_strict_stops_at_the_first_bad_row(bundle, dataset, tmp_path):
    r = CliRunner().invoke(app, ["eval", "--bundle", str(bundle), "--split", "test", "--data", str(dataset), "--strict"])
    assert r.exit_code == 2 and "label" in r.output  # the bad label is met first, when the manifest is read
    (dataset / "manifest.csv").write_text("\n".join(l for l in (dataset / "manifest.csv").read_text().splitlines()
                                                    if "maybe" not in l) + "\n")
    r = CliRunner().invoke(app, ["eval", "--bundle", str(bundle), "--split", "test", "--data", str(dataset), "--strict"])
    assert r.exit_code == 2 and "bad row" in r.output


def hostile_names(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    names = ["plain.png", "tab\there.png", "new\nline.png", "esc\x1b[2J\x1b[31mred.png", "back\\slash.png", "bell\x07.png"]
    out = []
    for n in names:
        p = tmp_path / n
        Image.fromarray(random_image(rng, 32, 40)).save(p, format="PNG")
        out.append(p)
    bad = tmp_path / "bad\r\x1b]0;title\x07.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return out + [bad]


def test_predict_escapes_file_names_and_streams_in_batches(bundle, tmp_path):
    paths = hostile_names(tmp_path)
    r = CliRunner().invoke(app, ["predict", "--bundle", str(bundle), "--batch-size", "3", *map(str, paths)])
    assert r.exit_code == 1  # one bad image
    lines = r.output.splitlines()
    assert len(lines) == len(paths)
    for line, p in zip(lines, paths):  # input order; three tab-separated fields at least
        fields = line.split("\t")
        assert fields[0] == printable(str(p)) and "\x1b" not in line and "\x07" not in line and "\r" not in line
        assert fields[1] in ("error",) or 0.0 <= float(fields[1]) <= 1.0
    assert lines[-1].split("\t")[1] == "error"


def test_predict_json_lines(bundle, tmp_path):
    paths = hostile_names(tmp_path)
    r = CliRunner().invoke(app, ["predict", "--bundle", str(bundle), "--json", "--trace", "--batch-size", "2", *map(str, paths)])
    assert r.exit_code == 1
    docs = [json.loads(l) for l in r.output.splitlines()]
    assert [d["file"] for d in docs] == [str(p) for p in paths]
    assert all(0.0 <= d["probability"] <= 1.0 and d["label"] in ("roadwork", "none") and "tiers" in d["trace"] for d in docs[:-1])
    assert docs[-1]["error"]["reason"] in ("truncated", "corrupt")


def test_printable():
    assert printable("a\tb\nc\x1b[0m\\d\x85") == "a\\x09b\\x0ac\\x1b[0m\\\\d\\x85"
    assert printable("caf\u00e9 \u2028") == "caf\u00e9 \\u2028"
    assert printable("x\udcff") == "x\\xff"
