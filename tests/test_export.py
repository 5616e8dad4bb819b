"""ONNX export: a round trip on tiny real bundles (fp32 matches PyTorch, INT8 within its tolerance), dynamic batch,
the backends at bundle load, the CLI (`export`, `eval`/`predict --backend onnxruntime`) and the server."""

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from roadcascade.cascade.bundle import Bundle, BundleError
from roadcascade.cascade.calibration import TemperatureCalibrator
from roadcascade.cascade.runtime import Cascade, ClassifierTier, ExitPoint, FinalRule, LastTierFusion
from roadcascade.cli import app
from roadcascade.models.export import ExportConfig, export_bundle, static_same_padding
from roadcascade.cascade.onnx_tier import OnnxClassifierTier, select_backend
from roadcascade.serve import ServeConfig, create_app
from roadcascade.serve.testing import tiny_bundle
from roadcascade.models.zoo import create_model

pytestmark = pytest.mark.integration


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(40, 120)), int(rng.integers(40, 120)), 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def data():
    from conftest import DATA

    if not (DATA / "manifest.csv").exists():
        pytest.skip("StreetWork data not available")
    return str(DATA)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("tiny") / "b")


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """A one-tier bundle of lite0 (random weights, its TF "SAME" padding, 3 square views run at 1.5x) at 64 px."""
    torch.manual_seed(0)
    model = create_model("lite0", num_classes=1, pretrained=False)
    cal = TemperatureCalibrator.from_dict({"temperature": 0.05, "threshold": 0.5})
    tier = ClassifierTier("lite0@64", "lite0", model, 64, (0.5,) * 3, (0.5,) * 3, cal, 0.06, device=torch.device("cpu"), squares=3,
                          view_scale=1.5)
    out = tmp_path_factory.mktemp("lite0") / "b"
    return Bundle(Cascade([tier], [ExitPoint(LastTierFusion(), 0.5, FinalRule())]), {}).save(out)


@pytest.fixture(scope="module")
def exported(tiny, lite0, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    cfg = dict(data=data, calib_images=6, check_images=4)
    reps = {"tiny_fp32": export_bundle(tiny, root / "tiny_fp32", ExportConfig(**cfg), log=lambda *_: None),
            "lite0_int8": export_bundle(lite0, root / "lite0_int8", ExportConfig(int8=True, **cfg), log=lambda *_: None)}
    return root, reps


def test_static_padding_keeps_the_function():
    torch.manual_seed(1)
    m = create_model("lite0", num_classes=1, pretrained=False).eval()
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        assert torch.allclose(static_same_padding(m, 72)(x), m(x), atol=1e-5)


def test_fp32_export_matches_pytorch_and_reports_it(exported):
    root, reps = exported
    for name in ("tiny_fp32",):
        rep = reps[name]
        assert rep.tiers and all(t.max_abs_dlogit < 1e-3 and t.agreement == 1.0 for t in rep.tiers)
        assert rep.cascade_agreement == 1.0 and rep.cascade_max_abs_dp < 1e-3
        doc = json.loads((root / name / "bundle.json").read_text())
        assert all(t["kind"] == "onnx_classifier" and t["weights"].endswith(".fp32.onnx") for t in doc["tiers"])
        assert doc["export"]["check"]["cascade_agreement"] == 1.0


def test_int8_bundle_loads_and_agrees_within_tolerance(exported, lite0):
    root, reps = exported
    q = Bundle.load(root / "lite0_int8")
    tier = q.cascade.tiers[0]
    assert isinstance(tier, OnnxClassifierTier) and tier.precision == "int8" and tier.squares == 3
    assert tier.view_size == 96 and tier.view_session is not None  # the views' own graph at 1.5 x 64 px
    ref = Bundle.load(lite0).cascade.tiers[0]
    imgs = _images(12, seed=3)
    za, zb = ref.logits(imgs), tier.logits(imgs)
    spread = za.max() - za.min()
    # INT8 of an untrained net: the logits keep their order and move by a small share of their spread
    assert np.corrcoef(za, zb)[0, 1] > 0.9
    assert np.abs(za - zb).max() < 0.35 * spread
    assert reps["lite0_int8"].tiers[0].precision == "int8"


def test_dynamic_batch_and_square_views_give_the_same_logits(exported):
    root, _ = exported
    tier = Bundle.load(root / "lite0_int8").cascade.tiers[0]  # fixed activation scales: batch-invariant too
    imgs = _images(7, seed=5)
    one_by_one = np.concatenate([tier.logits([im]) for im in imgs])
    tier.batch_size = 3  # uneven batches through the dynamic batch axis
    assert np.allclose(tier.logits(imgs), one_by_one, atol=1e-5)


def test_backends_at_load(exported, tiny):
    root, _ = exported
    with pytest.raises(BundleError, match="export"):
        Bundle.load(tiny, backend="onnxruntime")
    with pytest.raises(BundleError, match="backend"):
        Bundle.load(tiny, backend="tensorrt")
    as_torch = Bundle.load(root / "tiny_fp32", backend="torch").cascade
    as_onnx = Bundle.load(root / "tiny_fp32", backend="onnxruntime").cascade
    src = Bundle.load(tiny).cascade
    assert all(isinstance(t, ClassifierTier) for t in as_torch.tiers)
    assert all(isinstance(t, OnnxClassifierTier) for t in as_onnx.tiers)
    imgs = _images(6)
    assert np.allclose(as_torch.predict_proba(imgs), src.predict_proba(imgs))
    assert np.allclose(as_onnx.predict_proba(imgs), src.predict_proba(imgs), atol=1e-4)
    assert select_backend({"tiers": "junk"}, "torch") == {"tiers": "junk"}  # schema errors are check_doc's to report


def test_a_changed_onnx_file_is_refused(exported, tmp_path):
    import shutil

    root, _ = exported
    bad = tmp_path / "b"
    shutil.copytree(root / "tiny_fp32", bad)
    f = next(bad.glob("*.onnx"))
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="SHA-256"):
        Bundle.load(bad)


def test_cli_export_eval_and_predict_with_onnxruntime(tiny, data, tmp_path):
    r = CliRunner()
    out = tmp_path / "x"
    res = r.invoke(app, ["export", "--bundle", str(tiny), "--out", str(out), "--format", "onnx", "--data", data,
                         "--check-images", "3", "--json", str(tmp_path / "check.json")])
    assert res.exit_code == 0, res.output
    assert "agreement" in res.output and json.loads((tmp_path / "check.json").read_text())["cascade_agreement"] == 1.0
    res = r.invoke(app, ["eval", "--bundle", str(out), "--backend", "onnxruntime", "--data", data, "--split", "test",
                         "--max-images", "4", "--views", "challenge", "--n-views", "1", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 4
    img = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(_images(1)[0]).save(img)
    res = r.invoke(app, ["predict", str(img), "--bundle", str(out), "--backend", "onnxruntime", "--json"])
    assert res.exit_code == 0, res.output
    assert 0.0 <= json.loads(res.output.strip().splitlines()[-1])["probability"] <= 1.0
    res = r.invoke(app, ["eval", "--bundle", str(tiny), "--backend", "onnxruntime", "--data", data, "--max-images", "2"])
    assert res.exit_code != 0 and "export" in res.output
    res = r.invoke(app, ["export", "--bundle", str(tiny), "--out", str(tmp_path / "y"), "--format", "tflite"])
    assert res.exit_code != 0 and "onnx" in res.output


def test_server_runs_an_onnx_bundle(exported):
    import io

    from PIL import Image

    root, _ = exported
    b = Bundle.load(root / "tiny_fp32", backend="onnxruntime")
    buf = io.BytesIO()
    Image.fromarray(_images(1, seed=9)[0]).save(buf, format="JPEG")
    want = b.cascade.predict([np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))])[0]
    with TestClient(create_app(b, ServeConfig(max_batch=4, max_wait_ms=2, warmup_rounds=1))) as c:
        end = time.monotonic() + 30
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.02)
        r = c.post("/v1/predict", content=buf.getvalue(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        assert r.json()["probability"] == pytest.approx(want.probability, abs=1e-4)


@pytest.mark.parametrize("n,batch", [(1, 8), (8, 8), (17, 8), (346, 8)])
def test_calibration_reader_gives_every_input_once_in_strided_ranges(n, batch):
    from roadcascade.models.export import _Batches

    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    r = _Batches(x, "image", batch)
    seen = []
    for start in range(0, len(r), 1):  # how quantize_static walks a strided reader
        r.set_range(start, start + 1)
        while (b := r.get_next()) is not None:
            seen += b["image"].ravel().tolist()
    assert seen == list(range(n))
    r.set_range(0, len(r))
    r.rewind()
    assert sum(len(b["image"]) for b in iter(r.get_next, None)) == n


@given(st.integers(0, 400), st.integers(1, 200))
@settings(max_examples=60, deadline=None)
def test_even_subset_keeps_at_most_n_rows_in_order_with_both_ends(n, k):
    from roadcascade.models.export import even_subset

    x = np.arange(n)
    got = even_subset(x, k)
    assert len(got) == min(n, k) and np.all(np.diff(got) > 0)
    if n and k >= 2:
        assert got[0] == 0 and got[-1] == n - 1
    if n <= k:
        assert got is x


def test_head_nodes_are_the_last_conv_and_the_classifier(tmp_path):
    """head_fp32 keeps exactly the head in fp32: the Conv feeding the global pool and the Gemm after it, nothing else."""
    import onnx

    from roadcascade.models.export import export_onnx, head_nodes, stem_convs

    torch.manual_seed(0)
    path = export_onnx(create_model("lite0", num_classes=1, pretrained=False).eval(), 64, tmp_path / "m.onnx")
    nodes = list(onnx.load(str(path)).graph.node)
    heads = head_nodes(path)
    by_name = {n.name: n for n in nodes}
    assert [by_name[h].op_type for h in heads] == ["Conv", "Gemm"]
    pool = next(i for i, n in enumerate(nodes) if n.op_type == "GlobalAveragePool")
    conv_idx = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    assert nodes[max(i for i in conv_idx if i < pool)].name == heads[0]  # the last conv before the pool
    assert not set(heads) & set(stem_convs(path))
