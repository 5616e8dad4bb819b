"""Pack StreetWork and ImageNet weights into what one device call may carry (64 MiB), and unpack them there.

    # here: StreetWork as one tar (no per-file slack) and fp16 weights without their 1000-class heads
    PYTHONPATH=src python scripts/gpu_carry.py pack --data ../shared/data/streetwork --models lite0,lite2 --out .carryd
    # on the device (carry .carryd):
    python3 scripts/gpu_carry.py unpack --src .carryd --data-out /tmp/sw --weights-out /tmp/w
    ROADCASCADE_DATA=/tmp/sw/streetwork ROADCASCADE_WEIGHTS_DIR=/tmp/w ...

The heads are put back as zeros of the right shape, so ``zoo.create_model`` loads the files strictly as before;
every fine-tuning run replaces the head with a freshly initialised one (``reset_classifier``), so training is the
same as with the full files.
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

HEAD = "classifier."


def pack(data: Path, models: list[str], out: Path) -> None:
    import os

    from roadcascade.models.zoo import export_imagenet_weights
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "w").mkdir(exist_ok=True)
    with tarfile.open(out / "sw.tar", "w") as tar:
        tar.add(str(data), arcname="streetwork")
    for m in models:
        full = export_imagenet_weights(m, out / "full")
        sd = {k: v for k, v in load_file(str(full)).items() if not k.startswith(HEAD)}
        save_file(sd, str(out / "w" / f"{m}.headless.safetensors"))
        os.remove(full)
    if (out / "full").is_dir():
        (out / "full").rmdir()
    print(f"{out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


def unpack(src: Path, data_out: Path, weights_out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    data_out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / "sw.tar") as tar:
        tar.extractall(data_out, filter="data")
    weights_out.mkdir(parents=True, exist_ok=True)
    for f in (src / "w").glob("*.headless.safetensors"):
        sd = load_file(str(f))
        width = sd["conv_head.weight"].shape[0]  # the features the classifier reads (EfficientNet-Lite / MobileNetV2)
        dtype = sd["conv_head.weight"].dtype
        sd[HEAD + "weight"] = torch.zeros(1000, width, dtype=dtype)
        sd[HEAD + "bias"] = torch.zeros(1000, dtype=dtype)
        save_file(sd, str(weights_out / f.name.replace(".headless", "")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--data", type=Path, required=True)
    a.add_argument("--models", default="lite0,lite2")
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("unpack")
    b.add_argument("--src", type=Path, required=True)
    b.add_argument("--data-out", type=Path, required=True)
    b.add_argument("--weights-out", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "pack":
        pack(args.data, [m for m in args.models.split(",") if m], args.out)
    else:
        unpack(args.src, args.data_out, args.weights_out)


if __name__ == "__main__":
    main()
