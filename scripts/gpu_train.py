"""Train several stage-1 configurations in one go (used on the GPU machine) and print a table.

    PYTHONPATH=src ROADCASCADE_DATA=... ROADCASCADE_WEIGHTS_DIR=... python3 scripts/gpu_train.py OUT \
        name:model:input_size:epochs[:eval_size] ...

Each run writes OUT/<name>/ (a bundle) and its val metrics; OUT/summary.json collects them.
This calls the same ``roadcascade.fit.train.train`` as ``roadcascade train`` / ``quickstart``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from roadcascade.fit.train import TrainConfig, train


def main() -> None:
    out = Path(sys.argv[1])
    rows = []
    for spec in sys.argv[2:]:
        name, model, size, epochs, *rest = spec.split(":")
        cfg = TrainConfig(model=model, input_size=int(size), epochs=int(epochs), eval_size=int(rest[0]) if rest else None)
        t0 = time.perf_counter()
        res = train(cfg, out / name, log=lambda m: print(f"[{name}] {m}", flush=True))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        val = res.bundle.meta["metrics"]["val"]
        rows.append({"name": name, "model": model, "train_size": int(size), "epochs": int(epochs),
                     "seconds": time.perf_counter() - t0, "selected_epoch": res.bundle.meta["train"]["selected_epoch"],
                     "val_challenge_mcc": val["challenge"]["mcc"], "val_challenge_ece": val["challenge"]["ece"],
                     "val_clean_mcc": val["clean"]["mcc"], "device": res.bundle.meta["train"]["device"]})
        print(json.dumps(rows[-1]), flush=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\ndevice: {dev}, torch {torch.__version__}")
    print(f"{'run':<14}{'s':>8}{'sel':>5}{'val ch MCC':>12}{'val ch ECE':>12}{'val clean MCC':>15}")
    for r in rows:
        print(f"{r['name']:<14}{r['seconds']:>8.1f}{r['selected_epoch']:>5}{r['val_challenge_mcc']:>12.4f}"
              f"{r['val_challenge_ece']:>12.4f}{r['val_clean_mcc']:>15.4f}")


if __name__ == "__main__":
    main()
