"""``roadcascade build``: tier specs, and the whole pipeline end to end on a tiny subset with the
random-init ``test_tiny`` zoo model (trained for one step), then ``eval`` with baselines and the report."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from roadcascade.fit.build import TierSpec, parse_tiers


def test_parse_tiers():
    specs = parse_tiers("lite0@128:runs/a/bundle, lite0@224 ,tta(lite0@224,n=4..8),tta(lite1:/x/y,n=3,views=id|hflip|c85)")
    assert [s.name for s in specs] == ["lite0@128", "lite0@224", "tta(lite0@224,n=4..8)", "tta(lite1@240,n=3..3)"]
    assert specs[0] == TierSpec("classifier", "lite0", 128, "runs/a/bundle")
    assert specs[1].source is None and specs[2].kind == "tta" and specs[2].base_name == "lite0@224"
    assert specs[3].source == "/x/y" and specs[3].views == ("id", "hflip", "c85") and specs[3].size == 240


def test_parse_tiers_tags():
    """A tag tells apart tiers of one model and size (two seeds' networks); it names the tier, tta bases included."""
    specs = parse_tiers("lite0@224#s0:runs/s0,lite0@224#s1:runs/s1,tta(lite0@224#s1:runs/s1,n=2)")
    assert [s.name for s in specs] == ["lite0@224#s0", "lite0@224#s1", "tta(lite0@224#s1,n=2..2)"]
    assert [s.tag for s in specs] == ["s0", "s1", "s1"] and specs[2].base_name == "lite0@224#s1"
    assert [s.source for s in specs] == ["runs/s0", "runs/s1", "runs/s1"]
    assert parse_tiers("lite0@224")[0].tag is None
    with pytest.raises(ValueError, match="unique"):
        parse_tiers("lite0@224#a:x,lite0@224#a:y")
    with pytest.raises(ValueError, match="expected model@size"):
        parse_tiers("lite0@224#:x")


@pytest.mark.parametrize("bad, msg", [
    ("lite0@128,lite0@128", "unique"),
    ("tta(lite0@224,k=3)", "unknown option"),
    ("tta(lite0@224", "unbalanced"),
    ("nosuchmodel@64", "unknown model"),
    ("lite0@@1", "expected model@size"),
    ("", "no tiers"),
])
def test_parse_tiers_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_tiers(bad)


@pytest.mark.integration
def test_build_end_to_end_then_eval(streetwork, tmp_path: Path):
    from roadcascade.cascade.bundle import Bundle
    from roadcascade.cli import app
    from roadcascade.io.data import open_dataset
    from roadcascade.bench.evaluate import evaluate, public
    from roadcascade.bench.report import write_html
    from roadcascade.cascade.tta import TTATier

    warnings.filterwarnings("ignore")
    out, work = tmp_path / "cascade", tmp_path / "work"
    args = ["build", "--tiers", "test_tiny@48,test_tiny@64,tta(test_tiny@64,n=2..3)", "--budget", "60%",
            "--out", str(out), "--work", str(work), "--data", str(streetwork), "--max-val", "12", "--n-views", "2",
            "--max-train", "8", "--max-steps", "1", "--epochs", "1", "--device", "cpu", "--threads", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (work / "train-test_tiny" / "bundle.json").exists()  # the missing model was trained once
    assert list(work.glob("val-cache-*.npz")) and (work / "val-table.npz").exists()

    b = Bundle.load(out, device="cpu")
    meta = b.meta
    assert meta["kind"] == "cascade" and meta["data"]["fit_split"] == "val"
    pol = meta["policy"]
    g = [p["mean_gflops"] for p in pol["frontier"]]
    m = [p["mcc"] for p in pol["frontier"]]
    assert g == sorted(g) and all(b2 > a for a, b2 in zip(m, m[1:]))
    assert pol["chosen"]["mean_gflops"] <= 0.6 * pol["full_ensemble"]["mean_gflops"] + 1e-9
    assert meta["guaranteed"]["exits"] and meta["ensemble"]["tiers"] and meta["ensemble"]["vote"]
    # tiers of one model at two sizes share the trained weights
    ens = meta["ensemble"]["tiers"]
    w = {t["name"]: t.get("weights") for t in ens}
    assert w["test_tiny@48"] and w["test_tiny@64"]
    from safetensors.numpy import load_file

    a, c = load_file(str(out / w["test_tiny@48"])), load_file(str(out / w["test_tiny@64"]))
    assert all(np.array_equal(a[k], c[k]) for k in a)

    ds = open_dataset(str(streetwork), "test").subset(6)
    rep = evaluate(b, ds, "challenge", "test", n_views=2)
    base = rep["baselines"]
    for k in ("best_single", "full_ensemble"):
        assert {"mcc", "accuracy", "mean_gflops"} <= set(base[k])
    assert sum(rep["exit_rates"]) == pytest.approx(1.0)
    assert rep["mean_gflops"] <= base["full_ensemble"]["mean_gflops"] + 1e-9
    assert set(base["singles"]) == {"test_tiny@48", "test_tiny@64", "tta(test_tiny@64,n=2..3)"}
    assert 0.0 <= base["guaranteed"]["risk"] <= 1.0 and base["guaranteed"]["n_images"] == 6
    json.dumps(public(rep))  # serialisable
    bare = evaluate(b, ds, "challenge", "test", n_views=2, baselines=False)  # a cascade that is itself a baseline
    assert "baselines" not in bare and bare["_p"] == rep["_p"]
    html = write_html([("test / challenge", rep)], tmp_path / "r.html").read_text()
    assert "Pareto plot" in html and "full ensemble" in html

    # the val cache is reused: a second build runs no model on val
    log: list[str] = []
    from roadcascade.fit.build import BuildConfig, build

    build(BuildConfig(tiers="test_tiny@48,test_tiny@64,tta(test_tiny@64,n=2..3)", budget="60%", data=str(streetwork),
                      max_val=12, n_views=2, device="cpu", work=str(work), mode="guaranteed"), tmp_path / "g", log=log.append)
    assert any("from cache" in s for s in log)
    gb = Bundle.load(tmp_path / "g", device="cpu")
    assert gb.meta["policy"]["mode"] == "guaranteed"
    assert gb.cascade.tier_names == gb.meta["guaranteed"]["tiers"]
    assert all(isinstance(t, TTATier) == t.name.startswith("tta(") for t in gb.cascade.tiers)

    # two networks of one model and size from two bundles (seeds), told apart by tags: each keeps its own weights
    import torch

    src0, src1 = work / "train-test_tiny", tmp_path / "other-seed"
    other = Bundle.load(src0, device="cpu")
    with torch.no_grad():
        for prm in other.cascade.tiers[0].model.parameters():
            prm.add_(0.05)
    other.save(src1)
    build(BuildConfig(tiers=f"test_tiny@48#s0:{src0},test_tiny@48#s1:{src1}", budget="100%", mcc_slack=1.0,
                      data=str(streetwork), max_val=12, n_views=2, device="cpu", work=str(work)), tmp_path / "t", log=log.append)
    tb = Bundle.load(tmp_path / "t", device="cpu")
    assert tb.cascade.tier_names == ["test_tiny@48#s0", "test_tiny@48#s1"]
    tw = {t["name"]: t["weights"] for t in tb.meta["ensemble"]["tiers"]}
    w0, w1 = load_file(str(tmp_path / "t" / tw["test_tiny@48#s0"])), load_file(str(tmp_path / "t" / tw["test_tiny@48#s1"]))
    assert any(not np.array_equal(w0[k], w1[k]) for k in w0)
    assert len(tb.cascade.predict([np.zeros((40, 60, 3), np.uint8)])) == 1
