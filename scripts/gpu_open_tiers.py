"""What the open-model tiers' plumbing costs, and whether bf16/CUDA agrees with fp32/CPU.

    PYTHONPATH=src python3 scripts/gpu_open_tiers.py --out "$OUT"

Builds tiny random models on the spot (no weights, no network: ``roadcascade.open_models.tiny``): a timm
``test_convnext`` snapshot loaded as a local zoo model (classifier tier), CLIP and SigLIP zero-shot tiers, and
LLaVA and Qwen2-VL yes/no tiers. For each tier, at batch 1 and 64, it times ``tier.run`` on decoded images (median of
``--reps`` runs after warm-up) and the bare model forward on inputs already prepared on the device; the
difference is the per-image overhead of the tier (processor / resize, host-device copies, prompt encoding,
score). With models this small the forward is a few kernels, so the totals are the plumbing: the model cost
of a real checkpoint comes on top. Then the same images through the same weights on fp32/CPU and on
bf16/CUDA (HF tiers; the timm tier runs fp32 on both): max |dp| of sigmoid(raw logit) and max |dz|.

Writes ``$OUT/gpu_open_tiers.json`` (and prints it). Runs on CPU too (no agreement part) to check the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(360, 720)), int(rng.integers(480, 1280)), 3), dtype=np.uint8) for _ in range(n)]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall ms of fn() over reps runs, after warmup runs."""
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def make_tiers(root: Path, dev: torch.device) -> dict:
    from roadcascade.cascade.calibration import TemperatureCalibrator
    from roadcascade.cascade.runtime import ClassifierTier
    from roadcascade.open_models import tiny
    from roadcascade.open_models.local import LocalSource
    from roadcascade.open_models.timm_local import register_local_timm
    from roadcascade.open_models.vlm import VLMTier
    from roadcascade.open_models.zeroshot import ZeroShotTier
    from roadcascade.models.zoo import create_model, gflops

    builders = {"timm": lambda p: tiny.tiny_timm(p, "test_convnext"), "clip": tiny.tiny_clip, "siglip": tiny.tiny_siglip,
                "llava": tiny.tiny_llava, "qwen2vl": tiny.tiny_qwen2vl}
    paths = {}
    for k, f in builders.items():  # an architecture this transformers lacks is reported, not fatal
        try:
            paths[k] = f(root / k)
        except Exception as e:  # noqa: BLE001
            paths[k] = root / f"missing-{k}"
            print(f"cannot build tiny {k}: {type(e).__name__}: {e}", flush=True)
    spec = register_local_timm("gpu_tiny_convnext", paths["timm"])
    ident = lambda: TemperatureCalibrator.from_dict({"temperature": 1.0, "threshold": 0.5})  # noqa: E731 - T=1: p = sigmoid(z)
    torch.manual_seed(0)
    net = create_model(spec.name, num_classes=1)

    def timm_tier(d):
        return ClassifierTier("timm", spec.name, copy.deepcopy(net), spec.input_size, spec.mean, spec.std, ident(),
                              gflops(spec.name), device=d, batch_size=64)

    return {
        "timm_classifier": timm_tier,
        "zeroshot_clip": lambda d: ZeroShotTier("clip", LocalSource.of(paths["clip"]), calibrator=ident(), device=d, batch_size=64),
        "zeroshot_siglip": lambda d: ZeroShotTier("siglip", LocalSource.of(paths["siglip"]), calibrator=ident(), device=d, batch_size=64),
        "vlm_llava": lambda d: VLMTier("llava", LocalSource.of(paths["llava"]), calibrator=ident(), device=d, batch_size=64),
        # dynamic resolution: image-token counts vary with image size, so batches are left-padded; no prefix cache
        "vlm_qwen2vl": lambda d: VLMTier("qwen2vl", LocalSource.of(paths["qwen2vl"]), calibrator=ident(), device=d, batch_size=64),
    }


def bare_forward(tier, imgs):
    """A closure running only the model on inputs already prepared on the device."""
    from roadcascade.models.preprocess import to_batch

    kind = tier.kind
    with torch.inference_mode():
        if kind == "classifier":
            x = to_batch(imgs, tier.input_size, tier.mean, tier.std).to(tier.device)
            return lambda: tier.model(x)
        if kind == "zeroshot":
            px = tier._pixels(imgs)
            return lambda: tier.model.get_image_features(pixel_values=px)
        enc = tier._encode(imgs)
        return lambda: tier.model(**enc)


def raw_logits(tier, imgs) -> np.ndarray:
    return tier.full_logits(imgs) if hasattr(tier, "full_logits") else tier.logits(imgs)


def measure(name: str, make, dev: torch.device, reps: int) -> dict:
    tier = make(dev)
    row = {"gflops_per_image": float(tier.gflops),
           "dtype": str(next(tier.model.parameters()).dtype)}
    for bs in (1, 64):
        imgs = images(bs, seed=bs)
        total = timed(lambda: tier.run(imgs), dev, reps)
        fwd = bare_forward(tier, imgs)
        model = timed(lambda: torch.inference_mode()(fwd)(), dev, reps)
        row[f"batch{bs}"] = {"tier_ms_per_image": total / bs, "model_ms_per_image": model / bs,
                             "overhead_ms_per_image": (total - model) / bs}
    if getattr(tier, "kind", "") == "vlm":
        row["prefix_cache_used"] = bool(tier.prefix_cache and tier._prefix is not None)
    return row


def agreement(name: str, make, n: int) -> dict:
    imgs = images(n, seed=7)
    cpu = raw_logits(make(torch.device("cpu")), imgs)
    gpu = raw_logits(make(torch.device("cuda")), imgs)
    p = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    return {"n": n, "max_abs_dp": float(np.max(np.abs(p(cpu) - p(gpu)))), "max_abs_dz": float(np.max(np.abs(cpu - gpu))),
            "logit_range_cpu": [float(cpu.min()), float(cpu.max())]}


def guarded(fn) -> dict:
    """fn()'s result, or the error it raised (one tier failing does not lose the others' numbers)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        import traceback

        return {"error": f"{type(e).__name__}: {str(e)[:500]}", "where": traceback.format_exc()[-1500:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--agree-n", type=int, default=64)
    ap.add_argument("--tol", type=float, default=0.02, help="max |dp| allowed between bf16/CUDA and fp32/CPU")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import transformers

    res = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "reps": args.reps,
           "note": "tiny random models: the totals are the tiers' plumbing; a real checkpoint's forward comes on top",
           "tiers": {}, "agreement": {}}
    with tempfile.TemporaryDirectory() as tmp:
        makers = make_tiers(Path(tmp), dev)
        for name, make in makers.items():
            res["tiers"][name] = guarded(lambda: measure(name, make, dev, args.reps))
            print(name, json.dumps(res["tiers"][name]), flush=True)
        if dev.type == "cuda":
            for name, make in makers.items():
                a = guarded(lambda: agreement(name, make, args.agree_n))
                if "max_abs_dp" in a:
                    a["within_tol"] = a["max_abs_dp"] <= args.tol
                res["agreement"][name] = a
                print(name, json.dumps(a), flush=True)
    res["tolerance_dp"] = args.tol
    out = Path(args.out) / "gpu_open_tiers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
