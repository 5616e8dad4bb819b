"""Lower precision for the Lite0 classifier on the GPU: fp32 (reference), bf16, FP8 and INT8, decision agreement
and img/s in one run (issue 16, part 3).

    # on this machine: put the stage-1 bundle and the test split where the GPU run can read them (~30 MiB)
    PYTHONPATH=src python3 scripts/gpu_lowprec.py --prepare-carry .carry/lowprec \\
        --bundle /work/main/runs/quickstart/stage1 --data ../shared/data/streetwork
    # on the H200 (carry: .carry)
    PYTHONPATH=src python3 scripts/gpu_lowprec.py --bundle .carry/lowprec/stage1 --data .carry/lowprec/streetwork \\
        --out $OUT/gpu_lowprec.json

Without ``--bundle`` the model has random weights, without ``--data`` the inputs are random (agreement is then
only a numerical check). Native PyTorch only: FP8 through ``torch._scaled_mm`` (Hopper; e4m3 activations with
a dynamic per-row scale, e4m3 weights with a per-output-channel scale) and INT8 through ``torch._int_mm`` (s8 x s8
-> s32, dequantised with the same two scales), each on the network's pointwise (1x1) convolutions, which carry
most of an EfficientNet-Lite's FLOPs; the stem, the depthwise convolutions and the head stay in bf16. torchao is
used for neither (not installed there). ``--compile`` wraps every variant in torch.compile (the scaling and the
cast fuse into neighbouring kernels; without it they are separate memory passes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

FP8_MAX = 448.0  # largest e4m3fn value


# ----------------------------------------------------------------------------- low-precision pointwise convs


class LowPrecPointwise(nn.Module):
    """A 1x1 convolution (groups 1) as one low-precision matrix product on the NHWC activations."""

    def __init__(self, conv: nn.Conv2d, mode: str):
        super().__init__()
        w = conv.weight.detach().float().reshape(conv.out_channels, conv.in_channels)  # (N, K)
        qmax = FP8_MAX if mode == "fp8" else 127.0
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax  # per output channel
        q = w / scale
        self.mode, self.qmax, self.n = mode, qmax, conv.out_channels
        self.register_buffer("wq", (q.to(torch.float8_e4m3fn) if mode == "fp8" else q.round().clamp(-127, 127).to(torch.int8)))
        self.register_buffer("w_scale", scale.t().contiguous())  # (1, N) float32
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        a = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view for channels_last input
        m = a.shape[0]
        if m % 16:  # the kernels want a row count that is a multiple of 16 (a last, short batch is not)
            a = torch.nn.functional.pad(a, (0, 0, 0, 16 - m % 16))
        a_scale = a.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / self.qmax  # (M, 1)
        if self.mode == "fp8":
            aq = (a.float() / a_scale).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(aq, self.wq.t(), scale_a=a_scale, scale_b=self.w_scale, out_dtype=torch.bfloat16)
        else:
            aq = (a.float() / a_scale).round().clamp(-127, 127).to(torch.int8)
            y = (torch._int_mm(aq, self.wq.t()).float() * a_scale * self.w_scale).to(torch.bfloat16)
        y = y[:m]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(n, h, w, self.n).permute(0, 3, 1, 2)


def pointwise_ok(conv: nn.Module, mode: str) -> bool:
    """1x1, stride 1, groups 1, channel counts the kernels take (multiples of 16 for FP8, of 8 for INT8)."""
    m = 16 if mode == "fp8" else 8
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and conv.in_channels % m == 0 and conv.out_channels % m == 0)


def lowprec_model(model: nn.Module, mode: str) -> tuple[nn.Module, int, int]:
    """The bf16 model with every eligible pointwise conv swapped; (model, swapped, eligible 1x1 convs)."""
    swapped = total = 0
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1) and child.groups == 1:
                total += 1
                if pointwise_ok(child, mode):
                    setattr(mod, cname, LowPrecPointwise(child, mode))
                    swapped += 1
    return model, swapped, total


# ----------------------------------------------------------------------------- inputs and model


def load_model(bundle: str | None, device: torch.device):
    """(fp32 model, calibrator or None, input size, mean, std) from a stage-1 bundle, or random lite0 weights."""
    from roadcascade.models.zoo import create_model, get_spec

    if bundle:
        from roadcascade.cascade.bundle import Bundle

        tier = Bundle.load(bundle, device="cpu", backend="torch").cascade.tiers[0]
        return tier.model.float().to(device).eval(), tier.calibrator, tier.input_size, tier.mean, tier.std
    spec = get_spec("lite0")
    return create_model("lite0", num_classes=1, pretrained=False).to(device).eval(), None, 224, spec.mean, spec.std


def eval_inputs(data: str | None, split: str, n_images: int, size: int, mean, std) -> tuple[torch.Tensor, np.ndarray | None]:
    """Validator challenge views (v2.0.4, seed 1 on test, 4 per image) preprocessed as the tiers do, or random."""
    if not data:
        g = torch.Generator().manual_seed(0)
        return torch.randn(512, 3, size, size, generator=g), None
    from roadcascade.io.challenge import ChallengeConfig, challenge_views
    from roadcascade.io.data import open_dataset
    from roadcascade.models.preprocess import to_batch

    ds = open_dataset(data, split).subset(n_images)
    views, y = [], []
    for s in ds.samples:
        for v in challenge_views(s.load(), seed=1, key=s.key, n=4, cfg=ChallengeConfig(size=size)):
            views.append(v)
            y.append(s.label)
    return to_batch(views, size, mean, std).contiguous(), np.array(y)


@torch.inference_mode()
def logits(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, batch: int, device: torch.device) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].to(device, dtype).contiguous(memory_format=torch.channels_last)
        out.append(model(xb).float().reshape(-1).cpu())
    return torch.cat(out).numpy().astype(np.float64)


@torch.inference_mode()
def throughput(model: nn.Module, size: int, dtype: torch.dtype, batch: int, device: torch.device, seconds: float) -> float:
    """Model-only img/s on one resident batch (CUDA-event timed after warm-up)."""
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    for _ in range(5):
        model(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            model(x)
        n += 10
        sync()
    return n * batch / (time.perf_counter() - t0)


def mcc(y: np.ndarray, pred: np.ndarray) -> float:
    from roadcascade.metrics import mcc as _mcc

    return float(_mcc(y, pred))


# ----------------------------------------------------------------------------- main


def prepare_carry(dest: Path, bundle: str, data: str, split: str) -> None:
    """Copy the bundle and one split of the data (manifest rows + images) under ``dest`` for the GPU run."""
    import csv

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, dest / "stage1", dirs_exist_ok=True)
    src, out = Path(data), dest / "streetwork"
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(src / "manifest.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            shutil.copyfile(src / r["file"], out / r["file"])
            w.writerow(r)
    print(f"carried {len(rows)} {split} images and {bundle} under {dest}")


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the fp32 reference is fp32
    base, calibrator, size, mean, std = load_model(args.bundle, device)
    size = args.size or size
    x, y = eval_inputs(args.data, args.split, args.n_images, size, mean, std)
    ref = logits(base, x, torch.float32, args.batch, device)
    decide = (lambda z: calibrator.predict_proba(z) > 0.5) if calibrator else (lambda z: z > np.median(ref))
    ref_dec = decide(ref)
    rows, bf16_speed = [], None
    for variant in args.variants.split(","):
        import copy

        model = copy.deepcopy(base)
        dtype, info = (torch.float32, {}) if variant == "fp32" else (torch.bfloat16, {})
        model = model.to(dtype).to(memory_format=torch.channels_last)
        if variant in ("fp8", "int8"):
            model, swapped, total = lowprec_model(model, variant)
            info = {"pointwise_swapped": swapped, "pointwise_total": total}
        mode = "" if variant in args.eager.split(",") else args.compile
        if mode:
            model = torch.compile(model, mode=mode)
        row = {"variant": variant, "compile": mode or "eager", **info}
        try:
            z = logits(model, x, dtype, args.batch, device)
            d = decide(z)
            row.update({"agreement_vs_fp32": float(np.mean(d == ref_dec)), "max_abs_dlogit": float(np.abs(z - ref).max()),
                        "img_s": throughput(model, size, dtype, args.batch, device, args.seconds)})
            if y is not None:
                row["mcc"], row["mcc_fp32"] = mcc(y, d.astype(int)), mcc(y, ref_dec.astype(int))
        except Exception as e:  # noqa: BLE001 - a variant the stack does not run is a result, not a crash
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if variant == "bf16" and "img_s" in row:
            bf16_speed = row["img_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    for r in rows:
        if bf16_speed and "img_s" in r:
            r["speed_vs_bf16"] = r["img_s"] / bf16_speed
    keep = [r for r in rows if r.get("agreement_vs_fp32", 0) >= args.min_agreement and "img_s" in r]
    best = max(keep, key=lambda r: r["img_s"])["variant"] if keep else None
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "bundle": args.bundle, "data": args.data, "split": args.split, "n_inputs": len(x), "input_size": size,
            "batch": args.batch, "rows": rows, "fastest_at_agreement": best, "min_agreement": args.min_agreement,
            "onnxruntime_providers": _ort_providers()}


def _ort_providers() -> list[str]:
    try:
        import onnxruntime

        return onnxruntime.get_available_providers()
    except ImportError:
        return []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="stage-1 bundle (default: random lite0 weights)")
    p.add_argument("--data", help="dataset with the split (default: random inputs)")
    p.add_argument("--split", default="test")
    p.add_argument("--n-images", type=int, default=None, help="a stratified subset of the split")
    p.add_argument("--size", type=int, default=None, help="input size (default: the bundle's, 224)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0, help="timing window per variant")
    p.add_argument("--variants", default="fp32,bf16,fp8,int8")
    p.add_argument("--compile", default="default", help="torch.compile mode: default | max-autotune-no-cudagraphs | ... ('' for eager)")
    p.add_argument("--eager", default="int8", help="variants run eager whatever --compile says (comma-separated): "
                   "compiling the _int_mm variant ran past 90 s on the H200 in two device calls, never finishing")
    p.add_argument("--min-agreement", type=float, default=0.99)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument("--prepare-carry", type=Path, default=None, help="copy --bundle and the --split of --data here and stop")
    args = p.parse_args(argv)
    if args.prepare_carry:
        if not (args.bundle and args.data):
            sys.exit("--prepare-carry needs --bundle and --data")
        prepare_carry(args.prepare_carry, args.bundle, args.data, args.split)
        return
    res = run(args)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
