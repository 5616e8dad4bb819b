"""Open-model tiers (issue 15) with tiny random models of real architectures, built and saved in the test:
timm test backbones from a local snapshot folder or file, CLIP/SigLIP zero-shot, a LLaVA yes/no tier; offline
(a socket guard fails any connection), checksummed, and end to end through build, eval and serve."""

import json
import shutil
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from roadcascade.open_models import tiny
from roadcascade.open_models.local import LocalSource, ModelSourceError, hash_path, verify

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(self, *a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("open-models")
    return {"clip": tiny.tiny_clip(root / "clip"), "siglip": tiny.tiny_siglip(root / "siglip"),
            "llava": tiny.tiny_llava(root / "llava"), "timm": tiny.tiny_timm(root / "timm", "test_convnext", input_size=40)}


def imgs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(30, 70)), int(rng.integers(30, 90)), 3), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------------------ timm backbones


@pytest.mark.parametrize("arch", ["test_vit", "test_convnext", "test_efficientnet"])
def test_local_timm_snapshot_and_file(arch, tmp_path, monkeypatch):
    from roadcascade.models import zoo
    from roadcascade.open_models.timm_local import register_local_timm

    snap = tiny.tiny_timm(tmp_path / "snap", arch, seed=1)
    cfg = json.loads((snap / "config.json").read_text())["pretrained_cfg"]
    m = register_local_timm(f"t15_{arch}", snap)
    spec = zoo.get_spec(f"t15_{arch}")
    assert (spec.arch, spec.input_size, spec.mean, spec.std) == (arch, cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]))
    assert m.interpolation == cfg["interpolation"] and m.crop_pct == cfg["crop_pct"] and m.num_classes == 10
    from safetensors.torch import load_file

    saved = load_file(str(snap / "model.safetensors"))
    model = zoo.create_model(spec.name, num_classes=1)  # the file's weights, then a fresh 1-logit head
    body = {k: v for k, v in model.state_dict().items() if k in saved and saved[k].shape == v.shape}
    assert len(body) >= len(saved) - 2 and all(torch.equal(v, saved[k]) for k, v in body.items())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 1)

    # a bare .safetensors file with the architecture named; the classifier width is read from the file
    f = tiny.tiny_timm(tmp_path / "w.safetensors", arch, seed=2, as_file=True)
    mf = register_local_timm(f"t15f_{arch}", f, arch=arch)
    assert mf.num_classes == 10 and mf.source.sha256 == hash_path(f)
    with pytest.raises(ValueError, match="needs the timm architecture"):
        register_local_timm("t15_noarch", f)
    with pytest.raises(ModelSourceError, match="not found"):
        register_local_timm("t15_missing", tmp_path / "nope")


def test_models_file_resolver(models, tmp_path, monkeypatch):
    from roadcascade.models import zoo

    (tmp_path / "m.json").write_text(json.dumps({"t15_env": str(models["timm"])}))
    monkeypatch.setenv("ROADCASCADE_MODELS", str(tmp_path / "m.json"))
    assert zoo.get_spec("t15_env").input_size == 40
    with pytest.raises(KeyError, match="unknown model"):
        zoo.get_spec("t15_not_listed")


def test_checksum_missing_and_changed(models, tmp_path):
    d = shutil.copytree(models["clip"], tmp_path / "clip")
    src = LocalSource.of(d)
    assert verify(src) == d
    (d / "README.md").write_text("docs do not change the model")
    assert verify(src) == d
    cfg = json.loads((d / "config.json").read_text())
    cfg["projection_dim"] = 17
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match="differ"):
        verify(src)
    shutil.rmtree(d)
    with pytest.raises(ModelSourceError, match="missing"):
        verify(src)


def test_parse_open_tier_items():
    from roadcascade.fit.build import parse_tiers
    from roadcascade.open_models.spec import OpenTierSpec

    specs = parse_tiers("test_tiny@48,zeroshot(path=/m/siglip-base),vlm(path=/m/llava,name=llava,batch=4,budget_ms=300,prefix_cache=0)")
    zs, vlm = specs[1], specs[2]
    assert isinstance(zs, OpenTierSpec) and (zs.kind, zs.name, zs.source) == ("zeroshot", "zeroshot-siglip-base", "/m/siglip-base")
    assert (vlm.name, vlm.option("batch"), vlm.option("budget_ms"), vlm.option("prefix_cache")) == ("llava", "4", "300", "0")
    for bad, msg in (("vlm(name=x)", "needs path"), ("zeroshot(path=/m,colour=red)", "unknown or empty option"),
                     ("vlm(path=/m,name=a b)", "must be 1..64"), ("zeroshot(path=/a),zeroshot(path=/b/a)", "unique")):
        with pytest.raises(ValueError, match=msg):
            parse_tiers(bad)


# ------------------------------------------------------------------------------------------ zero-shot


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_zeroshot_batched_and_prompt_symmetry(family, models):
    from roadcascade.open_models.zeroshot import ZeroShotTier

    src = LocalSource.of(models[family])
    t = ZeroShotTier("zs", src, device=CPU, batch_size=4)
    x = imgs(7)
    z = t.run(x).logits
    one = np.concatenate([t.logits([im]) for im in x])
    assert np.allclose(z, one, atol=1e-5) and np.ptp(z) > 0  # batched == one at a time, and depends on the image
    flipped = ZeroShotTier("zs", src, positive=t.negative, negative=t.positive, device=CPU)
    assert np.allclose(flipped.logits(x), -z, atol=1e-5)  # a difference score: swapping the ensembles negates it
    assert t.gflops > 0 and t.decode_size() == 32  # the tiny processors resize to 32
    with pytest.raises(ValueError, match="prompts"):
        ZeroShotTier("zs", src, positive=[], device=CPU)


# ------------------------------------------------------------------------------------------ VLM


def test_vlm_batched_equals_unbatched_and_budget(models):
    from roadcascade.open_models.vlm import VLMTier

    src = LocalSource.of(models["llava"])
    t = VLMTier("vlm", src, device=CPU, batch_size=4)
    x = imgs(6, seed=3)
    out = t.run(x)
    assert t.prefix_cache and t._prefix is not None  # the shared prefix was cached and agreed with no cache
    ref = VLMTier("vlm", src, device=CPU, batch_size=1, prefix_cache=False)
    assert np.allclose(out.logits, ref.run(x).logits, atol=1e-5)  # batched + cached == one by one, uncached
    # the logit is log P(yes) - log P(no) of the next token (tokens of the tiny vocabulary)
    from transformers import AutoModelForImageTextToText

    enc = ref._encode(x[:1])
    with torch.no_grad():
        lp = AutoModelForImageTextToText.from_pretrained(models["llava"], local_files_only=True)(**enc).logits[0, -1].log_softmax(-1)
    assert out.logits[0] == pytest.approx(float(lp[tiny.WORDS.index("yes")] - lp[tiny.WORDS.index("no")]), abs=1e-5)
    # time budget: micro-batches after the budget is spent are not run; those images carry no evidence
    slow = VLMTier("vlm", src, device=CPU, batch_size=2, budget_ms=1e-6, gflops=1.0)
    o = slow.run(x)
    assert np.allclose(o.prob[2:], 0.5) and list(o.gflops) == [1.0, 1.0, 0, 0, 0, 0]
    assert np.allclose(o.logits[:2], out.logits[:2], atol=1e-5)
    with pytest.raises(ValueError, match="budget_ms"):
        VLMTier("vlm", src, device=CPU, budget_ms=0)


def test_bundle_roundtrip_and_refusal(models, tmp_path):
    """A zero-shot -> VLM cascade saved and reloaded gives the same answers; the bundle refuses a changed model
    folder or a malformed source, with a BundleError naming the problem."""
    from roadcascade.cascade.bundle import Bundle, BundleError
    from roadcascade.cascade.calibration import TemperatureCalibrator
    from roadcascade.cascade.runtime import Cascade, ConfidenceRule, ExitPoint, FinalRule, LastTierFusion
    from roadcascade.open_models.vlm import VLMTier
    from roadcascade.open_models.zeroshot import ZeroShotTier

    clip = shutil.copytree(models["clip"], tmp_path / "clip")
    cal = lambda: TemperatureCalibrator.from_dict({"temperature": 0.5, "threshold": 0.5})  # noqa: E731
    tiers = [ZeroShotTier("clip", LocalSource.of(clip), calibrator=cal(), device=CPU),
             VLMTier("llava", LocalSource.of(models["llava"]), calibrator=cal(), device=CPU, budget_ms=5000.0)]
    exits = [ExitPoint(LastTierFusion(), 0.5, ConfidenceRule(0.45)), ExitPoint(LastTierFusion(), 0.5, FinalRule())]
    x = imgs(5, seed=4)
    want = Cascade(tiers, exits).predict(x)
    Bundle(Cascade(tiers, exits)).save(tmp_path / "b")
    doc = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert doc["tiers"][0]["positive"] == list(tiers[0].positive) and doc["tiers"][1]["budget_ms"] == 5000.0
    got = Bundle.load(tmp_path / "b", device="cpu").cascade.predict(x)
    assert [p.probability for p in got] == pytest.approx([p.probability for p in want], abs=1e-6)
    assert [p.trace.tiers for p in got] == [p.trace.tiers for p in want]
    assert all(p.trace.gflops["clip"] > 0 for p in got)

    (clip / "model.safetensors").write_bytes((clip / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="differ"):
        Bundle.load(tmp_path / "b", device="cpu")
    doc["tiers"][0]["source"] = {"path": str(clip), "sha256": "xyz"}
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="64-hex-digit"):
        Bundle.load(tmp_path / "b", device="cpu")


def test_vlm_qwen2vl_left_padding(tmp_path, caplog):
    """Qwen2-VL gives each image as many tokens as its size needs, so a batch is really left-padded: batched
    answers equal one-by-one answers. Its multimodal RoPE does not fit a plain prefix cache: the tier notices
    on the first unpadded batch and turns the cache off, answers unchanged."""
    from roadcascade.open_models.vlm import VLMTier

    src = LocalSource.of(tiny.tiny_qwen2vl(tmp_path / "qwen"))
    t = VLMTier("qwen", src, device=CPU, batch_size=4)
    ragged = [np.random.default_rng(i).integers(0, 256, (40 + 30 * i, 60, 3), dtype=np.uint8) for i in range(4)]
    mask = t._encode(ragged)["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 1 and not bool(mask[:, -1].eq(0).any())  # padded, on the left
    square = [np.random.default_rng(10 + i).integers(0, 256, (60, 60, 3), dtype=np.uint8) for i in range(4)]
    z_ragged, z_square = t.run(ragged).logits, t.run(square).logits
    assert not t.prefix_cache and "cache off" in caplog.text
    one = VLMTier("qwen", src, device=CPU, batch_size=1, prefix_cache=False)
    assert np.allclose(z_ragged, one.run(ragged).logits, atol=1e-5) and np.allclose(z_square, one.run(square).logits, atol=1e-5)


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.integration
def test_build_eval_serve_with_open_tiers(models, streetwork, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from roadcascade.cascade.bundle import Bundle, BundleError
    from roadcascade.cli import app
    from roadcascade.io.data import open_dataset
    from roadcascade.bench.evaluate import evaluate
    from roadcascade.serve import ServeConfig, create_app

    (tmp_path / "models.json").write_text(json.dumps({"t15_backbone": str(models["timm"])}))
    monkeypatch.setenv("ROADCASCADE_MODELS", str(tmp_path / "models.json"))
    out, work = tmp_path / "cascade", tmp_path / "work"
    tiers = f"t15_backbone@32,zeroshot(path={models['siglip']},name=siglip),vlm(path={models['llava']},name=llava,batch=4)"
    r = CliRunner().invoke(app, ["build", "--tiers", tiers, "--budget", "100%", "--out", str(out), "--work", str(work),
                                 "--data", str(streetwork), "--max-val", "12", "--n-views", "2", "--max-train", "8",
                                 "--max-steps", "1", "--epochs", "1", "--device", "cpu", "--threads", "2"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    doc = json.loads((out / "bundle.json").read_text())
    ens = {t["name"]: t for t in doc["ensemble"]["tiers"]}
    assert set(ens) == {"t15_backbone@32", "siglip", "llava"}
    assert ens["llava"]["source"]["sha256"] == hash_path(models["llava"]) and ens["siglip"]["positive"]
    assert all(ens[n]["gflops"] > 0 for n in ens)  # every tier's cost reaches the optimiser
    assert doc["local_models"]["t15_backbone"]["arch"] == "test_convnext"

    b = Bundle.load(out, device="cpu")
    rep = evaluate(b, open_dataset(str(streetwork), "test").subset(4), "challenge", "test", n_views=1)
    assert set(rep["baselines"]["singles"]) == {"t15_backbone@32", "siglip", "llava"}
    assert sum(rep["exit_rates"]) == pytest.approx(1.0)

    with TestClient(create_app(out, ServeConfig(max_batch=4, max_wait_ms=2, warmup_rounds=1))) as c:
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        s0 = open_dataset(str(streetwork), "test").subset(1)[0]
        jpg = s0.data if s0.data is not None else Path(s0.path).read_bytes()
        resp = c.post("/v1/predict", files={"file": ("x.jpg", jpg, "image/jpeg")})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert 0 <= body["probability"] <= 1 and body["trace"]["tiers"][0] in ens

    # the bundle refuses a changed or missing VLM folder, naming it (the chosen cascade, or else the full
    # ensemble that eval's baselines load, holds the VLM tier)
    from roadcascade.cascade.runtime import Cascade

    def load():
        if "llava" in b.cascade.tier_names:
            Bundle.load(out, device="cpu")
        Cascade.from_config(doc["ensemble"], out, CPU)

    cfg = json.loads((models["llava"] / "config.json").read_text())
    moved = tmp_path / "llava-moved"
    shutil.copytree(models["llava"], moved)
    shutil.rmtree(models["llava"])
    try:
        with pytest.raises((BundleError, ModelSourceError), match="missing"):
            load()
        shutil.copytree(moved, models["llava"])
        cfg["text_config"]["rms_norm_eps"] = 1e-5
        (models["llava"] / "config.json").write_text(json.dumps(cfg))
        with pytest.raises((BundleError, ModelSourceError), match="differ"):
            load()
    finally:
        shutil.rmtree(models["llava"], ignore_errors=True)
        shutil.copytree(moved, models["llava"])


def test_gflops_counted_through_grouped_query_attention():
    """torch's flop counter refuses grouped-query attention; the count falls back to repeated key/value heads."""
    import torch.nn.functional as F

    from roadcascade.open_models.hf import count_gflops

    q, kv = torch.randn(1, 8, 16, 32), torch.randn(1, 2, 16, 32)
    gqa = count_gflops(lambda: F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True))
    full = count_gflops(lambda: F.scaled_dot_product_attention(q, kv.repeat_interleave(4, 1), kv.repeat_interleave(4, 1)))
    assert gqa == pytest.approx(full) and gqa > 0
