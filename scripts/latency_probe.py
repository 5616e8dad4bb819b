"""Where do batch-1 latency stalls come from? Times many single-image requests on the GPU fast path under a
few set-ups, next to a CPU-only control loop of about the same length that measures the host's own jitter.

    PYTHONPATH=src python3 scripts/latency_probe.py --bundle runs/gpu/qs --images .carry_gpu/q75 --json out.json

Set-ups: the defaults (decode processes alive, idle at batch 1), without the decode processes, and with
the garbage collector off. For each: p50/p99/p99.9/max and how many requests took over 3 ms; for the
control loop (a fixed NumPy workload, no GPU) the same, so a stall seen in both is the host's.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np


def stats(ms: list[float], limit: float = 3.0) -> dict:
    a = np.asarray(ms)
    return {"n": len(a), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "p999": float(np.percentile(a, 99.9)), "max": float(a.max()), "over_3ms": int((a > limit).sum()),
            "over_2x_p50": int((a > 2 * np.percentile(a, 50)).sum())}


def control(n: int, target_ms: float) -> list[float]:
    """A CPU workload of about target_ms, repeated: the host's own jitter."""
    x = np.random.default_rng(0).random((256, 256))
    for _ in range(5):
        x @ x
    t0 = time.perf_counter()
    for _ in range(20):
        x @ x
    one = (time.perf_counter() - t0) * 1e3 / 20
    k = max(1, int(target_ms / max(one, 1e-3)))
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(k):
            x @ x
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--order", default="defaults,gc_off,no_procs", help="set-ups in this order (time matters on a "
                    "fresh host): defaults | gc_off | no_procs, comma-separated, repeats allowed")
    args = ap.parse_args()

    from roadcascade.accel.runtime import GpuCascade

    pool = [f.read_bytes() for f in sorted(Path(args.images).glob("*.jp*g"))]
    gc_ = GpuCascade.from_bundle(args.bundle)
    out: dict = {"warmup_s": gc_.warmup_s, "procs": gc_.cfg.procs}

    def run(label: str) -> None:
        ms = []
        for i in range(args.reps):
            t0 = time.perf_counter()
            gc_.predict_batch([pool[i % len(pool)]])
            ms.append((time.perf_counter() - t0) * 1e3)
        k = len(out.get("runs", []))
        r = {"setup": label, "fast": stats(ms)}
        r["control"] = stats(control(args.reps, r["fast"]["p50"]))
        out.setdefault("runs", []).append(r)
        print(k, label, r["fast"], "control:", r["control"], flush=True)

    for _ in range(50):
        gc_.predict_batch([pool[0]])
    for label in args.order.split(","):
        if label == "no_procs" and gc_.procs is not None:
            gc_.start_procs(0)
        if label in ("defaults", "gc_off") and gc_.procs is None and gc_.cfg.procs > 0:
            gc_.start_procs(gc_.cfg.procs)
        if label == "gc_off":
            gc.disable()
        run(label)
        gc.enable()
    gc_.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
