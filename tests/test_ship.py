"""Which form the quickstart ships (fit.ship): the choice rule as properties, and one real run of the whole step
(fp32 and INT8 ONNX exports of a tiny two-tier bundle, guard refit, all forms on val views, shipped.json)."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from roadcascade.fit.ship import ShipConfig, choose, mcc_per_ms

mccs = st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=5)


@given(mccs, st.data(), st.floats(0, 0.2))
@settings(max_examples=200, deadline=None)
def test_choice_is_eligible_and_best_per_ms(m, data, tol):
    speeds = data.draw(st.lists(st.floats(0.1, 1e4, allow_nan=False), min_size=len(m), max_size=len(m)))
    k = choose(m, speeds, tol)
    assert k == 0 or m[k] >= m[0] - tol  # never a form that decides worse than allowed
    eligible = [i for i in range(len(m)) if i == 0 or m[i] >= m[0] - tol]
    assert all(mcc_per_ms(m[k], speeds[k]) >= mcc_per_ms(m[i], speeds[i]) for i in eligible)


def test_faster_but_worse_is_not_shipped_and_equal_speed_keeps_the_reference():
    assert choose([0.96, 0.95], [10.0, 100.0], 0.005) == 0  # 10x faster, 0.01 MCC worse: not shipped
    assert choose([0.96, 0.957], [10.0, 40.0], 0.005) == 1  # 4x faster within tolerance: shipped
    assert choose([0.9, 0.9], [10.0, 10.0], 0.005) == 0  # a tie keeps the reference
    with pytest.raises(ValueError):
        choose([], [], 0.005)
    with pytest.raises(ValueError):
        ShipConfig(max_dmcc=-1)


@pytest.mark.integration
def test_ship_cpu_form_exports_guards_measures_and_records(tmp_path, streetwork):
    from roadcascade.cascade.bundle import Bundle
    from roadcascade.fit.guard import GuardConfig
    from roadcascade.fit.ship import ship_cpu_form
    from roadcascade.serve.testing import tiny_bundle

    data = str(streetwork)
    src = tiny_bundle(tmp_path / "b")
    cfg = ShipConfig(data=data, max_images=12, calib_images=4, check_images=4)
    choice = ship_cpu_form(src, tmp_path, cfg, guard=GuardConfig(fpr=0.05, data=data), log=lambda *_: None)
    doc = json.loads((tmp_path / "shipped.json").read_text())
    assert doc["shipped"] == choice.shipped
    assert choice.shipped in (str(src), str(tmp_path / "bundle-onnx"), str(tmp_path / "bundle-int8"))
    rows = {r["label"]: r for r in doc["rows"]}
    assert list(rows) == ["torch-fp32", "onnx-fp32", "onnx-int8"] and rows["torch-fp32"]["n"] == 48  # 12 x 4 views
    assert rows["onnx-fp32"]["agreement"] == 1.0 and rows["onnx-fp32"]["max_abs_dp"] < 1e-4  # fp32 ONNX answers as PyTorch
    for name, precision in (("bundle-onnx", "fp32"), ("bundle-int8", "int8")):
        b = Bundle.load(tmp_path / name, device="cpu")
        assert all(t.kind == "onnx_classifier" for t in b.cascade.tiers)
        assert b.meta["guard"]["fpr"] == 0.05  # guarded again on its own outputs
        assert all(e.full_threshold is not None and e.full_threshold <= e.threshold for e in b.cascade.exits)
    with pytest.raises(ValueError):
        ShipConfig(forms=("onnx-fp16",))


def test_quickstart_ship_step_falls_back_to_fp32_when_the_export_fails(tmp_path, monkeypatch):
    """A failed INT8 export (e.g. an onnxruntime that cannot load) costs the INT8 form, not the quickstart; a stale
    export from an earlier run is removed first, so it can never be shipped by mistake."""
    import roadcascade.fit.ship as ship
    from roadcascade.cli import _ship

    stale = [tmp_path / "bundle-int8", tmp_path / "bundle-onnx"]
    for d in stale:
        d.mkdir()
        (d / "bundle.json").write_text("{}")
    (tmp_path / "shipped.json").write_text("{}")

    def fail(*a, **k):
        raise RuntimeError("onnxruntime session could not be created")

    monkeypatch.setattr(ship, "export_form", fail)
    assert _ship(tmp_path / "bundle", tmp_path, None, None, None) == tmp_path / "bundle"
    assert not any(d.exists() for d in stale) and not (tmp_path / "shipped.json").exists()
