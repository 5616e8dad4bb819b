"""Integration (issue 11): a small synthetic dashcam set, a few training steps with it, the dashcam style
and balanced sampling, then the real-dashcam report (night-dev recall, dashcam false positives) through
the library and the CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from roadcascade.cli import app
from roadcascade.io.data import open_dataset
from roadcascade.bench.realcam import DASHCAM_NEGATIVE_SOURCES, dashcam_negatives, realcam_report
from roadcascade.io.synth import SynthConfig, synthesize
from roadcascade.fit.train import TrainConfig, train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import DATA

    if not (DATA / "manifest.csv").exists() or not (DATA.parent / "night-dev" / "manifest.csv").exists():
        pytest.skip("StreetWork / night-dev data not available")
    base = tmp_path_factory.mktemp("dashcam")
    synth = synthesize(SynthConfig(n=6, seed=1, data=str(DATA), max_cutouts=20), base / "synth", log=lambda *_: None)
    cfg = TrainConfig(model="lite0", input_size=96, eval_size=96, epochs=1, batch_size=8, max_train=32, max_val=12,
                      max_steps=3, data=str(DATA), val_views=1, threads=2, extra_train=(str(synth),), style_p=0.5,
                      balance_sources=True, synth_share=0.5)
    res = train(cfg, base / "bundle", log=lambda *_: None)
    return base, res, DATA


def test_synthetic_set_reaches_training(run):
    base, res, _ = run
    meta = res.bundle.meta["data"]
    assert meta["n_extra"] == 6 and meta["extra_train"] == [str(base / "synth")]
    assert res.bundle.meta["train"]["style_p"] == 0.5


def test_realcam_report(run):
    base, res, data = run
    r = realcam_report(res.bundle, data=str(data))
    neg = dashcam_negatives(open_dataset(str(data), "test"))
    assert r["night_dev"]["n"] == len(open_dataset(str(data.parent / "night-dev")))
    assert r["dashcam_negatives"]["n"] == len(neg) > 0
    assert all(s.source in DASHCAM_NEGATIVE_SOURCES and s.label == 0 for s in neg.samples)
    for v in (r["night_dev"]["recall"], r["dashcam_negatives"]["fpr"], r["joint"]["accuracy"]):
        assert 0.0 <= v <= 1.0
    # the joint accuracy is the count-weighted mix of recall and (1 - FPR)
    n1, n0 = r["night_dev"]["n"], r["dashcam_negatives"]["n"]
    mix = (r["night_dev"]["recall"] * n1 + (1 - r["dashcam_negatives"]["fpr"]) * n0) / (n1 + n0)
    assert np.isclose(r["joint"]["accuracy"], mix)
    # the frames behind the two rates are named: as many as the rates count, each from its own set
    nd, dn = r["night_dev"], r["dashcam_negatives"]
    assert len(nd["missed"]) == round((1 - nd["recall"]) * n1) and len(dn["false_positives"]) == round(dn["fpr"] * n0)
    assert set(dn["false_positives"]) <= {s.key for s in neg.samples}
    assert set(nd["missed"]) <= {s.key for s in open_dataset(str(data.parent / "night-dev")).samples}


def test_cli_eval_dashcam_and_synth(run, tmp_path):
    base, _, data = run
    out = tmp_path / "d.json"
    res = CliRunner().invoke(app, ["eval-dashcam", "--bundle", str(base / "bundle"), "--data", str(data), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "night-dev recall" in res.output and json.loads(out.read_text())["night_dev"]["n"] > 0
    bad = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "s"), "--n", "2", "--data", str(data),
                                   "--no-cutouts", "--no-drawn", "--no-road-signs"])
    assert bad.exit_code == 2 and "no roadwork object source" in bad.output


def test_quickstart_retrains_when_the_recipe_changes(run, tmp_path):
    from dataclasses import replace

    from roadcascade.cli import _recipe_changes

    base, res, _ = run
    cfg = TrainConfig(**{k: v for k, v in res.bundle.meta["train"].items() if k in TrainConfig.__dataclass_fields__})
    assert _recipe_changes(base / "bundle", cfg) == ""
    assert _recipe_changes(base / "bundle", replace(cfg, input_size=320)) == "input_size"
    assert _recipe_changes(base / "bundle", replace(cfg, extra_train=(), style_p=0.0)) == "extra_train, style_p"
    assert _recipe_changes(tmp_path, cfg) == ""  # nothing cached: nothing to compare
    (tmp_path / "bundle.json").write_text("{not json")
    assert _recipe_changes(tmp_path, cfg) == "unreadable bundle.json"


def test_realcam_html_table_escapes_and_counts():
    from roadcascade.bench.realcam import realcam_html

    r = {"night_dev": {"n": 33, "recall": 6 / 33, "median_p": 0.05, "exit_rates": [0.75, 0.25]},
         "dashcam_negatives": {"n": 143, "fpr": 2 / 143}, "joint": {"mcc": 0.4, "auroc": 0.9}}
    page = realcam_html({"<b>x</b>": r})
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "(6/33)" in page and "(2/143)" in page and "0.75, 0.25" in page
