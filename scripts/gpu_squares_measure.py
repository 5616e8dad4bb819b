"""Issue 12 on the GPU machine: the shipped quickstart stage 1 (one Lite0@224 with three square views at 1.3x) on the
fast path, with the full frames' square views on a view engine (``GpuConfig.view_engine``, the default since this
script's commit) against the tier's own per-image code (``view_engine=False``, what ran before), in the same run.

    # here: payloads (224x224 q75 challenge views and the stored test photos) and the bundle
    PYTHONPATH=src python -m roadcascade.bench.gpurun payloads --out .carrysq/pay --n-images 200
    cp -r runs/quickstart/stage1 .carrysq/stage1
    # device (carry .carrysq):
    PYTHONPATH=src python3 scripts/gpu_squares_measure.py --bundle .carrysq/stage1 --pay .carrysq/pay --json $OUT/sq.json

Per payload set (q75 views, native StreetWork photos, 1920x1080 and 4032x3024 made from them): streamed img/s at
each batch size, batch-1 latency, the decode-only ceiling, peak device memory, and the answers against the CPU path
(``Cascade.predict`` on ``decode_bytes(min_size=decode size)``): decision agreement and |dp|. The tier's own code is
slow on full frames (33 img/s at 1080p on the H200), so its rows are one timed batch of 64 per set, not a sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--pay", required=True, help="folder with q75/ and native/ (bench.gpurun payloads)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--sizes", default="1920x1080,4032x3024")
    ap.add_argument("--n-sized", type=int, default=48)
    ap.add_argument("--batch-sizes", default="1,64,256,1024")
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--n-check", type=int, default=96, help="images per set checked against the CPU path")
    ap.add_argument("--old-batch", type=int, default=64)
    ap.add_argument("--sets", default="", help="payload sets to measure, comma-separated (default: all)")
    ap.add_argument("--no-own-code", action="store_true", help="skip the tier's own per-image code")
    ap.add_argument("--configs", default="view_engine={}",
                    help="view-engine runs as name=JSON of GpuConfig overrides, ';'-separated, e.g. "
                         "'base={};chunk128={\"gpu_chunk_mpix\": 128}'")
    a = ap.parse_args()
    import faulthandler

    faulthandler.dump_traceback_later(120, repeat=True, file=sys.stderr)  # where a slow step spends its time
    t_start = time.perf_counter()

    def log(m: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}] {m}", file=sys.stderr, flush=True)

    from roadcascade.bench.gpu import (batches, decode_ceiling, match, measure_row, read_dir, reference_probs,
                                       sized_sets)

    pay = Path(a.pay)
    pools = {"q75": read_dir(pay / "q75"), "native": read_dir(pay / "native")}
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",") if s]
    t0 = time.perf_counter()
    pools.update(sized_sets(pools["native"][:a.n_sized], sizes))  # forked workers: before CUDA starts here
    if a.sets:
        pools = {k: v for k, v in pools.items() if k in a.sets.split(",")}
    print(f"payloads: {{{', '.join(f'{k}: {len(v)}' for k, v in pools.items())}}} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)

    import torch

    from roadcascade.accel.config import GpuConfig
    from roadcascade.accel.runtime import GpuCascade
    from roadcascade.cascade.bundle import Bundle

    cascade = Bundle.load(a.bundle, device=torch.device("cpu")).cascade
    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__, "config": vars(a), "tiers": cascade.tier_names,
                 "square_views": cascade.tiers[0].caps().square_views, "sets": {}}

    def save() -> None:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1, default=float))

    t0 = time.perf_counter()
    refs = {k: reference_probs(cascade, v, a.n_check, min_size=cascade.decode_size()) for k, v in pools.items()}
    res["reference_s"] = round(time.perf_counter() - t0, 1)
    print(f"CPU-path references in {res['reference_s']} s", file=sys.stderr, flush=True)
    bs = [int(b) for b in a.batch_sizes.split(",")]
    cuda = torch.cuda.is_available()
    peak = (lambda: torch.cuda.max_memory_allocated() / 2**20) if cuda else (lambda: float("nan"))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runs = [(name, True, json.loads(js)) for name, js in (c.split("=", 1) for c in a.configs.split(";") if c)]
    if not a.no_own_code:
        runs.append(("own_code", False, {}))
    for label, view_engine, overrides in runs:
        log(f"{label}: starting ({overrides})")
        # the tier's own code runs the full frames either way; its engine (single-view rows) need not be compiled
        gc = GpuCascade(cascade, config=GpuConfig(**{"view_engine": view_engine, "compile": view_engine, **overrides}), log=log)
        log(f"{label}: warm in {gc.warmup_s:.0f} s, procs {gc.cfg.procs}")
        res[f"warmup_s_{label}"] = round(gc.warmup_s, 1)
        res[f"procs_{label}"] = gc.cfg.procs
        for name, pool in pools.items():
            if not view_engine and name == "q75":  # no full frames: the same engine rows either way
                continue
            row = res["sets"].setdefault(name, {})
            if view_engine and label != "view_engine":  # a further config: its own sub-row
                row = row.setdefault(label, {})
            n = min(a.n_check, len(pool))
            got = np.concatenate([gc.predict_batch(pool[i:min(n, i + 32)]).probability for i in range(0, n, 32)])
            row[f"{label}_match"] = match(refs[name], got)
            log(f"{label} {name}: answers checked")
            if view_engine:
                row["rows"] = {}
                for b in bs:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    r = measure_row(gc, pool, b, a.seconds)
                    log(f"{label} {name} B={b}: {r['img_s']:.0f} img/s")
                    row["rows"][b] = {"img_s": r["img_s"], "p50_ms": r["latency_ms"]["p50"],
                                      "peak_mib": peak(),
                                      "split_us_per_img": r["split_us_per_img"], "gpu_decoded_frac": r["gpu_decoded_frac"]}
                row["decode_ceiling_256"] = decode_ceiling(gc, pool, 256, a.seconds)
            else:  # one timed batch after a warm one: the per-image code is too slow for a sweep
                gen = batches(pool, a.old_batch)
                gc.predict_batch(next(gen))
                sync()
                t1 = time.perf_counter()
                gc.predict_batch(next(gen))
                row["own_code_img_s"] = a.old_batch / (time.perf_counter() - t1)
            print(f"{label:12s} {name:10s} " + json.dumps({k: v for k, v in row.items() if k != "rows"}, default=float),
                  file=sys.stderr, flush=True)
            if view_engine:
                print("   " + "  ".join(f"B={b}: {r['img_s']:.0f} img/s p50 {r['p50_ms']:.2f} ms peak {r['peak_mib']:.0f} MiB"
                                        for b, r in row["rows"].items()), file=sys.stderr, flush=True)
            save()
        gc.close()
        del gc
        if cuda:
            torch.cuda.empty_cache()
    save()


if __name__ == "__main__":
    main()
