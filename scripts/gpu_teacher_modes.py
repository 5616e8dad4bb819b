"""Issue 16's teacher of round 12, measured the three ways one can read "the teacher" (one GPU call).

Round 12's rule picked ``E6-guard0.02`` (six networks, three seeds). Its policy kept three of the six tiers, so the
teacher exists in three forms, each scored on test challenge views here:
- ``cascade``: the bundle as it runs, early exits included (round 12's test row);
- ``every_tier``: the kept tiers run on every image, the last exit's fusion deciding: what ``roadcascade distill``
  (``teacher_mode = ensemble``) learned from;
- ``full_ensemble``: all six networks stacked (the bundle's ``full_ensemble`` baseline): the issue's bar.

Training and the build are deterministic (round 11 came back to the digit), so this remakes round 12's networks and
bundle rather than carrying them.

    PYTHONPATH=src ROADCASCADE_DATA=/tmp/sw/streetwork ROADCASCADE_WEIGHTS_DIR=/tmp/w python3 \\
        scripts/gpu_teacher_modes.py --out /tmp/tm --json $OUT/teacher_modes.json [--seeds 0,1,2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("ROADCASCADE_GPU", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_best_distill import build_ens, guard_copy, net_key, seed_ensemble_tiers, train_net  # noqa: E402


def score_modes(bdir: str, quick: bool) -> dict:
    from roadcascade.bench.evaluate import evaluate
    from roadcascade.cascade.bundle import Bundle
    from roadcascade.fit.distill import every_tier
    from roadcascade.io.data import open_dataset
    from roadcascade.models.preprocess import pick_device

    b = Bundle.load(bdir, device=pick_device("auto"))
    test = open_dataset(None, "test").subset(40 if quick else None)
    rep = evaluate(b, test, "challenge", "test")
    base = rep["baselines"]
    every = Bundle(every_tier(b.cascade), b.meta, b.path)
    rep_e = evaluate(every, test, "challenge", "test", baselines=False)
    return {
        "tiers": b.cascade.tier_names,
        "full_ensemble_tiers": base["full_ensemble"]["tiers"],
        "cascade": rep["mcc"],
        "every_tier": rep_e["mcc"],
        "full_ensemble": base["full_ensemble"]["mcc"],
        "full_ensemble_vote": (base.get("full_ensemble_vote") or {}).get("mcc"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/teacher-modes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--guard", type=float, default=0.02)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    seeds = [int(k) for k in a.seeds.split(",")]
    nets = [(n, k) for k in seeds for n in ("lite0", "lite2")]
    workers = 0 if a.quick else max(1, (os.cpu_count() or 2) // (len(nets) + 1))
    res: dict = {"config": vars(a), "seconds": {}}

    def save() -> None:  # after each phase: a run cut off keeps what it finished
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=1))
    with ProcessPoolExecutor(len(nets), mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = {net_key(n, k): ex.submit(train_net, n, a.out, workers, a.quick, k) for n, k in nets}
        paths = {key: f.result() for key, f in futs.items()}
    res["seconds"]["nets"] = round(time.perf_counter() - t0, 1)
    save()
    name = f"E{2 * len(seeds)}"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:  # build's threads as in round 12
        bdir = ex.submit(build_ens, name, seed_ensemble_tiers(paths, seeds), a.out, a.quick).result()
        gdir = ex.submit(guard_copy, bdir, a.guard).result()
    res["seconds"]["build"] = round(time.perf_counter() - t0, 1)
    res["teacher"] = Path(gdir).name
    save()
    res["test_challenge_mcc"] = score_modes(gdir, a.quick)
    res["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=1), flush=True)
    save()


if __name__ == "__main__":
    main()
