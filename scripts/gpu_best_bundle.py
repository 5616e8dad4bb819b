"""Issue 11's best GPU-trained bundle, repeated over seeds: two stage-1 networks per seed (lite0 at 224 px and
lite2 at 288 px, both seeing non-square frames as three closer squares), a stacked cascade built from them on
val, the open-set guard on top; every piece scored the same way (test clean and challenge MCC, night-dev
recall, dashcam false-positive rate on test).

    PYTHONPATH=src ROADCASCADE_DATA=... ROADCASCADE_WEIGHTS_DIR=... python3 scripts/gpu_best_bundle.py \
        --out /tmp/best --json $OUT/best.json [--seeds 0,1,2] [--quick]

Everything is fitted on train (networks) and val (fusion, policy, guard); night-dev and test are only read.
``--quick`` is a CPU smoke run (tiny subsets, a few steps).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("ROADCASCADE_GPU", "0")  # the plain runtime: many processes share one GPU
sys.path.insert(0, str(Path(__file__).resolve().parent))

# the two networks of each seed: the v224 recipe of round 6 (PERFORMANCE.md) and a larger lite2 at 288 px
NETS = {
    "lite0": dict(model="lite0", input_size=224, eval_size=224, epochs=8),
    "lite2": dict(model="lite2", input_size=288, eval_size=288, epochs=8),
}
# networks trained by name for other scripts only (not part of this script's seeds): round 13's lite2 at 384 px
EXTRA_NETS = {"lite2h": dict(model="lite2", input_size=384, eval_size=384, epochs=8)}
VIEWS = dict(squares=3, view_scale=1.3)
GUARDS = (0.01, 0.02)
SCORE_NETS = ("lite2",)  # networks also scored alone (lite0 alone was measured in device call 1 of this script)


def train_net(name: str, seed: int, out: str, workers: int, quick: bool) -> str:
    import torch

    from roadcascade.fit.train import TrainConfig, train

    torch.set_num_threads(2)
    quick_kw = dict(max_train=60, max_val=30, max_steps=2, epochs=1) if quick else {}
    cfg = TrainConfig(**{**{**NETS, **EXTRA_NETS}[name], **quick_kw}, **VIEWS, seed=seed, num_workers=workers)
    bdir = Path(out) / f"{name}-s{seed}"
    train(cfg, bdir, log=lambda m: None)
    return str(bdir)


def score(bdir: Path, quick: bool) -> dict:
    from dashcam_ablation import _score

    from roadcascade.cascade.bundle import Bundle
    from roadcascade.io.data import open_dataset
    from roadcascade.models.preprocess import pick_device

    b = Bundle.load(bdir, device=pick_device("auto"))
    test = open_dataset(None, "test").subset(40 if quick else None)
    row = _score(b, test)
    row["tiers"] = b.cascade.tier_names
    return row


def guarded(bdir: Path, fpr: float) -> Path:
    from roadcascade.fit.guard import GuardConfig, guard_bundle

    gdir = bdir.parent / f"{bdir.name}-guard{fpr}"
    shutil.copytree(bdir, gdir, dirs_exist_ok=True)
    guard_bundle(gdir, GuardConfig(fpr=fpr), log=lambda m: None)
    return gdir


def seed_job(seed: int, nets: dict[str, str], out: str, quick: bool, partial: str | None = None) -> list[dict]:
    """The cascade of one seed's networks, the guard, and the scores of every piece (the guarded cascade first;
    each row also goes to ``partial`` as it comes, so a run cut short keeps what it measured)."""
    import torch

    from roadcascade.fit.build import build
    from roadcascade.fit.config import BuildConfig

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    tiers = ",".join(f"{NETS[n]['model']}@{NETS[n]['eval_size']}:{p}" for n, p in nets.items())
    cdir = Path(out) / f"cascade-s{seed}"
    quick_kw = dict(max_val=30) if quick else {}
    # mcc_slack 1: the full ensemble (both networks on every image, stacked), not the cheapest policy whose val
    # MCC is as good (val's positives are web photos, so the second network's gain on dashcam frames is unseen there)
    build(BuildConfig(tiers=tiers, budget="100%", mcc_slack=1.0, seed=seed, **quick_kw), cdir, log=lambda m: None)
    rows = []
    for name, bdir in [("cascade", cdir), *((n, Path(p)) for n, p in nets.items() if n in SCORE_NETS)]:
        for fpr in (*reversed(GUARDS), None):
            d = bdir if fpr is None else guarded(bdir, fpr)
            rows.append({"seed": seed, "bundle": name, "guard": fpr, **score(d, quick)})
            print(line(rows[-1]), flush=True)
            if partial:
                Path(partial).write_text(json.dumps(rows, indent=1))
    rows[-1]["seconds_after_training"] = round(time.perf_counter() - t0, 1)
    return rows


def line(r: dict) -> str:
    rc = r["realcam"]
    g = f"guard {r['guard']}" if r["guard"] is not None else "no guard"
    return (f"s{r['seed']} {r['bundle']:8s} {g:11s} test clean {r['test_clean']['mcc']:.4f} challenge "
            f"{r['test_challenge']['mcc']:.4f}  night-dev recall {rc['night_dev']['recall']:.3f}  dashcam FPR "
            f"{rc['dashcam_negatives']['fpr']:.3f}  joint MCC {rc['joint']['mcc']:.3f} AUROC {rc['joint']['auroc']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/best")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",") if s]
    jobs = [(n, s) for s in seeds for n in NETS]
    workers = max(1, (os.cpu_count() or 2) // len(jobs) - 1)
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    nets: dict[int, dict[str, str]] = {s: {} for s in seeds}
    rows: list[dict] = []
    with ProcessPoolExecutor(len(jobs), mp_context=ctx) as ex:
        futs = {ex.submit(train_net, n, s, a.out, workers, a.quick): (n, s) for n, s in jobs}
        pending = {}
        for f in as_completed(futs):
            n, s = futs[f]
            nets[s][n] = f.result()
            print(f"trained {n} seed {s} at {time.perf_counter() - t0:.0f} s", flush=True)
            if len(nets[s]) == len(NETS):  # both networks of this seed: its cascade starts at once
                part = f"{a.json[:-5]}-s{s}.json" if a.json and a.json.endswith(".json") else None
                pending[ex.submit(seed_job, s, {k: nets[s][k] for k in NETS}, a.out, a.quick, part)] = s
        for f in as_completed(pending):
            try:
                got = f.result()
            except Exception as e:  # one seed's failure must not lose the others
                got = [{"seed": pending[f], "error": repr(e)}]
            rows.extend(got)
            if "error" in got[0]:
                print(got[0], flush=True)
            if a.json:
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
