"""Issue 11's ablation in one run: each component of the dashcam recipe on and off, the same seeds, the
same evaluation (test challenge MCC, night-dev recall, dashcam false-positive rate), run side by side.

    python scripts/dashcam_ablation.py --out runs/ablation --json runs/ablation/ablation.json [--jobs a,b] [--quick]

Synthetic sets are made first (one process each), then the training jobs run in parallel processes (on
one GPU when there is one). ``--quick`` is a smoke run (tiny subsets, a few steps) for a CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("ROADCASCADE_GPU", "0")  # the plain runtime: many processes share one GPU here

RECIPE = dict(model="lite0", input_size=160, epochs=6, balance_sources=True)  # the quickstart recipe + balanced sampling (as measured)
SYNTH_SETS = {"full": {}, "no_cutouts": {"cutouts": False}, "no_drawn": {"drawn": False}, "no_signs": {"road_signs": False}}
JOBS = {
    "baseline": dict(synth=None, style_p=0.0, balance_sources=False),
    "balance_only": dict(synth=None, style_p=0.0),
    "style_only": dict(synth=None, style_p=0.5),
    "full": dict(synth="full", style_p=0.5),
    "no_cutouts": dict(synth="no_cutouts", style_p=0.5),
    "no_drawn": dict(synth="no_drawn", style_p=0.5),
    "no_signs": dict(synth="no_signs", style_p=0.5),
    "no_style": dict(synth="full", style_p=0.0),
    "full_share60": dict(synth="full", style_p=0.5, synth_share=0.6),
    "full_style80": dict(synth="full", style_p=0.8),
    "full_224": dict(synth="full", style_p=0.5, input_size=224),
    "lite0_320": dict(synth="full", style_p=0.5, input_size=320, eval_size=320, epochs=12),
    # seed repeats and resolution / length (round 3)
    "baseline_s1": dict(synth=None, style_p=0.0, balance_sources=False, seed=1),
    "style_only_s1": dict(synth=None, style_p=0.5, seed=1),
    "full_style80_s1": dict(synth="full", style_p=0.8, seed=1),
    "full_style80_e12": dict(synth="full", style_p=0.8, epochs=12),
    "style_320": dict(synth=None, style_p=0.5, input_size=320, eval_size=320, epochs=12),
    "lite0_320_s1": dict(synth="full", style_p=0.5, input_size=320, eval_size=320, epochs=12, seed=1),
    # round 4: which train / eval resolution pair at quickstart cost (each model evaluated at several sizes)
    "r160": dict(synth="full", style_p=0.5, eval_sizes=(224, 288, 352)),
    "r160_s1": dict(synth="full", style_p=0.5, seed=1, eval_sizes=(224, 288, 352)),
    "r224": dict(synth="full", style_p=0.5, input_size=224, eval_size=224, eval_sizes=(224, 288, 352)),
    "r224_s1": dict(synth="full", style_p=0.5, input_size=224, eval_size=224, seed=1, eval_sizes=(224, 288, 352)),
    "r160_base": dict(synth=None, style_p=0.0, balance_sources=False, eval_sizes=(224, 288, 352)),
    "r256_e4": dict(synth="full", style_p=0.5, input_size=256, eval_size=256, epochs=4, eval_sizes=(256, 320)),
    "lite2_320": dict(synth="full", style_p=0.5, model="lite2", input_size=320, eval_size=320, epochs=12),
}


def make_synth(name: str, out: str, n: int) -> str:
    from roadcascade.synth import SynthConfig, ensure_synth

    return str(ensure_synth(SynthConfig(n=n, **SYNTH_SETS[name]), Path(out) / f"synth-{name}", log=lambda m: None))


def run_job(name: str, out: str, synth_dirs: dict[str, str], quick: bool, workers: int) -> dict:
    import torch

    from roadcascade.bundle import Bundle
    from roadcascade.data import open_dataset
    from roadcascade.preprocess import pick_device
    from roadcascade.train import TrainConfig, train

    torch.set_num_threads(2)
    spec = {**RECIPE, **JOBS[name]}
    synth = spec.pop("synth")
    seed = spec.pop("seed", 0)
    eval_sizes = spec.pop("eval_sizes", None)
    extra = (synth_dirs[synth],) if synth else ()
    quick_kw = dict(max_train=80, max_val=40, max_steps=3, epochs=1) if quick else {}
    cfg = TrainConfig(**{**spec, **quick_kw}, extra_train=extra, num_workers=workers, seed=seed)
    t0 = time.perf_counter()
    bdir = Path(out) / name
    train(cfg, bdir, log=lambda m: None)
    b = Bundle.load(bdir, device=pick_device("auto"))
    test = open_dataset(None, "test").subset(60 if quick else None)
    row = {"job": name, "config": {**spec, "synth": synth, "seed": seed}, "train_s": round(time.perf_counter() - t0, 1)}
    row.update(_score(b, test))
    for size in eval_sizes or ():  # the same weights and calibration, run at another input size
        b.cascade.tiers[0].input_size = size
        row[f"eval{size}"] = _score(b, test, views=("challenge",))
    return row


def _score(b, test, views=("clean", "challenge")) -> dict:
    from roadcascade.evaluate import evaluate, public
    from roadcascade.realcam import realcam_report

    row = {}
    for v in views:
        rep = public(evaluate(b, test, v, "test"))
        row[f"test_{v}"] = {k: rep[k] for k in ("mcc", "accuracy", "auroc", "ece")} | {"dashcam": rep.get("dashcam")}
    row["realcam"] = realcam_report(b)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--json", default=None)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--n-synth", type=int, default=1200)
    ap.add_argument("--parallel", type=int, default=max(1, min(10, (os.cpu_count() or 2) // 2)))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    jobs = [j for j in a.jobs.split(",") if j]
    need = sorted({JOBS[j]["synth"] for j in jobs if JOBS[j]["synth"]})
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max(1, min(len(need), a.parallel)), mp_context=multiprocessing.get_context("spawn")) as ex:
        dirs = dict(zip(need, ex.map(make_synth, need, [a.out] * len(need), [40 if a.quick else a.n_synth] * len(need))))
    print(f"synthetic sets {need} in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    workers = max(1, (os.cpu_count() or 2) // max(1, len(jobs)) - 1)
    with ProcessPoolExecutor(min(len(jobs), a.parallel), mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = {j: ex.submit(run_job, j, a.out, dirs, a.quick, workers) for j in jobs}
        for j, f in futs.items():
            try:
                r = f.result()
            except Exception as e:  # one failed job must not lose the others' numbers
                r = {"job": j, "error": repr(e)}
            rows.append(r)
            rc = r.get("realcam")
            for k, sub in sorted(r.items()):
                if k.startswith("eval") and isinstance(sub, dict):
                    q = sub["realcam"]
                    print(f"{j:14s} @{k[4:]}: test-challenge MCC {sub['test_challenge']['mcc']:.4f}  night-dev recall "
                          f"{q['night_dev']['recall']:.3f}  dashcam FPR {q['dashcam_negatives']['fpr']:.3f}  joint MCC "
                          f"{q['joint']['mcc']:.3f} AUROC {q['joint']['auroc']:.3f}", flush=True)
            if rc:
                print(f"{j:14s} test-challenge MCC {r['test_challenge']['mcc']:.4f}  night-dev recall {rc['night_dev']['recall']:.3f}  "
                      f"dashcam FPR {rc['dashcam_negatives']['fpr']:.3f}  joint MCC {rc['joint']['mcc']:.3f}  ({r['train_s']} s)", flush=True)
            else:
                print(f"{j}: {r.get('error')}", flush=True)
            if a.json:
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
