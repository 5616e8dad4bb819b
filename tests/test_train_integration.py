"""Integration: train a few steps on a small real subset, save a bundle, load it back, same outputs;
then evaluate it (clean + challenge) and predict through the CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from roadcascade.cascade.bundle import Bundle, BundleError
from roadcascade.cli import app
from roadcascade.io.data import open_dataset
from roadcascade.bench.evaluate import evaluate, public
from roadcascade.fit.train import TrainConfig, train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request):
    data = request.getfixturevalue("streetwork_module")
    out = tmp_path_factory.mktemp("run") / "bundle"
    cfg = TrainConfig(model="lite0", input_size=96, eval_size=112, epochs=1, batch_size=8, max_train=32, max_val=12,
                      max_steps=3, data=str(data), val_views=2, threads=2)
    res = train(cfg, out, log=lambda *_: None)
    return out, res, data


@pytest.fixture(scope="module")
def streetwork_module():
    from conftest import DATA

    if not (DATA / "manifest.csv").exists():
        pytest.skip("StreetWork data not available")
    return DATA


def test_bundle_roundtrip_identical(trained):
    out, res, data = trained
    doc = json.loads((out / "bundle.json").read_text())
    assert doc["format"] == "roadcascade.bundle/1"
    assert doc["tiers"][0]["model"] == "lite0" and doc["tiers"][0]["input_size"] == 112
    assert (out / doc["tiers"][0]["weights"]).exists()
    assert doc["data"]["fit_split"] == "train" and doc["data"]["select_split"] == "val"
    assert len(doc["train"]["history"]) == 1 and doc["train"]["history"][0]["step"] == 3
    ds = open_dataset(data, "test").subset(10, seed=1)
    imgs = [s.load() for s in ds.samples]
    before = res.bundle.cascade.predict_proba(imgs)
    after = Bundle.load(out, device="cpu").cascade.predict_proba(imgs)
    np.testing.assert_array_equal(before, after)
    assert np.all((after >= 0) & (after <= 1))


def test_training_is_reproducible(trained, tmp_path):
    out, res, data = trained
    cfg = TrainConfig(**{k: v for k, v in json.loads((out / "bundle.json").read_text())["train"].items()
                         if k in TrainConfig.__dataclass_fields__})
    res2 = train(cfg, tmp_path / "b2", log=lambda *_: None)
    a = res.bundle.cascade.tiers[0].model.state_dict()
    b = res2.bundle.cascade.tiers[0].model.state_dict()
    for k in a:
        assert np.allclose(a[k].float().numpy(), b[k].float().numpy(), atol=1e-5), k


def test_eval_report_fields(trained):
    out, _, data = trained
    b = Bundle.load(out, device="cpu")
    ds = open_dataset(data, "test").subset(12, seed=2)
    for views in ("clean", "challenge"):
        rep = public(evaluate(b, ds, views, "test", n_views=2, batch_size=8))
        for k in ("n", "mcc", "accuracy", "ece", "auroc", "reward", "confusion", "latency_ms", "throughput_img_s",
                  "device", "per_source", "dashcam"):
            assert k in rep, k
        assert rep["n"] == (12 if views == "clean" else 24)
        assert set(rep["latency_ms"]) == {"p50", "p95", "p99"}
        assert rep["reward"] == pytest.approx((0.5 * max(0, rep["mcc"]) + 0.5 * rep["accuracy"]) ** 3)
        assert sum(v["n"] for v in rep["per_source"].values()) == rep["n"]
    assert rep["view_seed"] == 1  # test split -> seed 1 (DESIGN.md)


def test_cli_eval_and_predict(trained, tmp_path):
    out, _, data = trained
    r = CliRunner().invoke(app, ["eval", "--bundle", str(out), "--split", "val", "--views", "challenge", "--data", str(data),
                                 "--max-images", "6", "--n-views", "1", "--json", str(tmp_path / "e.json"),
                                 "--html", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["split"] == "val" and rep["view_seed"] == 0 and rep["n"] == 6
    html = (tmp_path / "r.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    for alt in ("reliability diagram", "ROC curve", "confusion matrix"):
        assert f'alt="{alt}"' in html
    img = next(p for p in sorted((data / "images").iterdir()))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = CliRunner().invoke(app, ["predict", "--bundle", str(out), str(img), str(bad)])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert any(str(img) in l and ("roadwork" in l or "none" in l) for l in lines)
    assert any(str(bad) in l and "error" in l for l in lines)


def test_missing_bundle_is_clear(tmp_path):
    with pytest.raises(BundleError, match="no bundle"):
        Bundle.load(tmp_path)
    r = CliRunner().invoke(app, ["eval", "--bundle", str(tmp_path)])
    assert r.exit_code == 2 and "no bundle" in r.output
