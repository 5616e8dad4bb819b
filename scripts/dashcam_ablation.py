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
from concurrent.futures import ProcessPoolExecutor, as_completed
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
    # round 5: square views at inference, per-image logits dumped for threshold analysis (quickstart-cost
    # candidates at 160-256 px, and higher resolution for the GPU bundle)
    "q160_base": dict(synth=None, style_p=0.0, balance_sources=False, dump=True),
    "q160_style": dict(synth=None, style_p=0.5, dump=True),
    "q224": dict(synth="full", style_p=0.5, input_size=224, eval_size=224, epochs=8, dump=True),
    "q224_nosynth": dict(synth=None, style_p=0.5, input_size=224, eval_size=224, epochs=8, dump=True),
    "q224_s1": dict(synth="full", style_p=0.5, input_size=224, eval_size=224, epochs=8, seed=1, dump=True),
    "q256": dict(synth="full", style_p=0.5, input_size=256, eval_size=256, epochs=6, dump=True),
    "g320": dict(synth="full", style_p=0.5, input_size=320, eval_size=320, epochs=12, dump=True),
    "g384": dict(synth="full", style_p=0.5, input_size=384, eval_size=384, epochs=12, dump=True),
    "g384_s1": dict(synth="full", style_p=0.5, input_size=384, eval_size=384, epochs=12, seed=1, dump=True),
    "g384_nosynth": dict(synth=None, style_p=0.5, input_size=384, eval_size=384, epochs=12, dump=True),
    # round 6: closer square views (view_scale) and the open-set guard at two rates (guard.py)
    "v_base": dict(synth=None, style_p=0.0, balance_sources=False, view_scale=1.3, guard=(0.01, 0.02)),
    "v_base_s1": dict(synth=None, style_p=0.0, balance_sources=False, view_scale=1.3, guard=(0.01, 0.02), seed=1),
    "v_base_s2": dict(synth=None, style_p=0.0, balance_sources=False, view_scale=1.3, guard=(0.01, 0.02), seed=2),
    "v_base_s3": dict(synth=None, style_p=0.0, balance_sources=False, view_scale=1.3, guard=(0.01, 0.02), seed=3),
    "v224": dict(synth=None, style_p=0.0, balance_sources=False, input_size=224, eval_size=224, epochs=8, view_scale=1.3,
                 guard=(0.01, 0.02)),
    "v320_synth": dict(synth="full", style_p=0.5, input_size=320, eval_size=320, epochs=12, view_scale=1.3, guard=(0.01, 0.02)),
    "v320_synth_s1": dict(synth="full", style_p=0.5, input_size=320, eval_size=320, epochs=12, view_scale=1.3,
                          guard=(0.01, 0.02), seed=1),
    "v320": dict(synth=None, style_p=0.0, balance_sources=False, input_size=320, eval_size=320, epochs=12, view_scale=1.3,
                 guard=(0.01, 0.02)),
}


def make_synth(name: str, out: str, n: int) -> str:
    from roadcascade.io.synth import SynthConfig, ensure_synth

    return str(ensure_synth(SynthConfig(n=n, **SYNTH_SETS[name]), Path(out) / f"synth-{name}", log=lambda m: None))


def run_job(name: str, out: str, synth_dirs: dict[str, str], quick: bool, workers: int) -> dict:
    import torch

    from roadcascade.cascade.bundle import Bundle
    from roadcascade.io.data import open_dataset
    from roadcascade.models.preprocess import pick_device
    from roadcascade.fit.train import TrainConfig, train

    torch.set_num_threads(2)
    spec = {**RECIPE, **JOBS[name]}
    synth = spec.pop("synth")
    seed = spec.pop("seed", 0)
    eval_sizes = spec.pop("eval_sizes", None)
    dump = spec.pop("dump", False)
    guards = spec.pop("guard", ())
    extra = (synth_dirs[synth],) if synth else ()
    quick_kw = dict(max_train=80, max_val=40, max_steps=3, epochs=1) if quick else {}
    cfg = TrainConfig(**{**spec, **quick_kw}, extra_train=extra, num_workers=workers, seed=seed,
                      squares=3 if dump or guards else 1)
    t0 = time.perf_counter()
    bdir = Path(out) / name
    train(cfg, bdir, log=lambda m: None)
    b = Bundle.load(bdir, device=pick_device("auto"))
    test = open_dataset(None, "test").subset(60 if quick else None)
    row = {"job": name, "config": {**spec, "synth": synth, "seed": seed}, "train_s": round(time.perf_counter() - t0, 1)}
    row.update(_score(b, test))
    for fpr in guards:  # the same bundle with the open-set guard at this rate (a guarded copy)
        import shutil

        from roadcascade.fit.guard import GuardConfig, guard_bundle

        gdir = Path(out) / f"{name}-guard{fpr}"
        shutil.copytree(bdir, gdir, dirs_exist_ok=True)
        rep = guard_bundle(gdir, GuardConfig(fpr=fpr), log=lambda m: None)
        row[f"guard{fpr}"] = {"report": rep.as_dict(), **_score(Bundle.load(gdir, device=pick_device("auto")), test)}
    if dump:  # per-image logits under several view schemes, for thresholds chosen afterwards on val
        row["dump"] = dump_views(b, Path(out) / f"{name}-views.npz", quick)
    for size in eval_sizes or ():  # the same weights and calibration, run at another input size
        b.cascade.tiers[0].input_size = size
        row[f"eval{size}"] = _score(b, test, views=("challenge",))
    return row


def _grid(im, frac: float = 0.6):
    """Overlapping square tiles of side ``frac`` x the short side (stride half a tile): a closer look."""
    import numpy as np

    h, w = im.shape[:2]
    t = int(min(h, w) * frac)
    st = max(1, t // 2)
    ys = sorted({*range(0, h - t + 1, st), h - t})
    xs = sorted({*range(0, w - t + 1, st), w - t})
    return [im[y : y + t, x : x + t] for y in ys for x in xs]


def dump_views(b, path: Path, quick: bool) -> str:
    """Logits of stage 1 on night-dev, val and test under: the whole frame, 3 squares, 3 squares at 1.4x
    the input size, and a tile grid; saved with labels and sources (night-dev for recall, the rest for
    thresholds and false positives)."""
    import numpy as np

    from roadcascade.cascade.runtime import square_views
    from roadcascade.io.data import open_dataset
    from roadcascade.bench.realcam import default_night_dev

    tier = b.cascade.tiers[0]
    size = tier.input_size
    sets = {"night": open_dataset(default_night_dev()), "val": open_dataset(None, "val"), "test": open_dataset(None, "test")}
    out = {}
    for sname, ds in sets.items():
        samples = ds.samples[:20] if quick else ds.samples
        ims = [s.load() for s in samples]
        out[f"{sname}|label"] = np.array([s.label for s in samples])
        out[f"{sname}|source"] = np.array([s.source for s in samples])
        schemes = {"whole": (lambda im: [im], size), "sq3": (lambda im: square_views([im], 3)[0], size),
                   "sq3x1.4": (lambda im: square_views([im], 3)[0], int(size * 1.4) // 32 * 32),
                   "grid.6": (_grid, size)}
        for scheme, (fn, s) in schemes.items():
            tier.input_size = s
            views, owner = [], []
            for i, im in enumerate(ims):
                v = fn(im)
                views += v
                owner += [i] * len(v)
            z = tier._logits(views)
            out[f"{sname}|{scheme}|views"] = z
            out[f"{sname}|{scheme}|owner"] = np.array(owner)
    tier.input_size = size
    out["calibration"] = np.array(json.dumps(tier.calibrator.to_dict()))
    np.savez_compressed(path, **out)
    return str(path)


def _score(b, test, views=("clean", "challenge"), keys=("mcc", "accuracy", "auroc", "ece", "dashcam"),
           realcam: bool = True) -> dict:
    """Test metrics ``keys`` of each view kind (None where a report lacks one) and, with ``realcam``, the report on
    real dashcam frames (night-dev recall, test dashcam false positives)."""
    from roadcascade.bench.evaluate import evaluate, public
    from roadcascade.bench.realcam import realcam_report

    row = {}
    for v in views:
        rep = public(evaluate(b, test, v, "test"))
        row[f"test_{v}"] = {k: rep.get(k) for k in keys}
    if realcam:
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
    ap.add_argument("--copy-dumps", default=None, help="copy each job's view dump here (e.g. $OUT)")
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
        futs = {ex.submit(run_job, j, a.out, dirs, a.quick, workers): j for j in jobs}
        for f in as_completed(futs):  # record each job as it ends: a run cut short keeps what finished
            j = futs[f]
            try:
                r = f.result()
            except Exception as e:  # one failed job must not lose the others' numbers
                r = {"job": j, "error": repr(e)}
            rows.append(r)
            rc = r.get("realcam")
            for k, sub in sorted(r.items()):
                if (k.startswith("eval") or k.startswith("guard")) and isinstance(sub, dict):
                    q = sub["realcam"]
                    print(f"{j:14s} @{k[4:]}: test-challenge MCC {sub['test_challenge']['mcc']:.4f}  night-dev recall "
                          f"{q['night_dev']['recall']:.3f}  dashcam FPR {q['dashcam_negatives']['fpr']:.3f}  joint MCC "
                          f"{q['joint']['mcc']:.3f} AUROC {q['joint']['auroc']:.3f}", flush=True)
            if rc:
                print(f"{j:14s} test-challenge MCC {r['test_challenge']['mcc']:.4f}  night-dev recall {rc['night_dev']['recall']:.3f}  "
                      f"dashcam FPR {rc['dashcam_negatives']['fpr']:.3f}  joint MCC {rc['joint']['mcc']:.3f}  ({r['train_s']} s)", flush=True)
            else:
                print(f"{j}: {r.get('error')}", flush=True)
            if a.copy_dumps and r.get("dump"):
                import shutil

                Path(a.copy_dumps).mkdir(parents=True, exist_ok=True)
                shutil.copy(r["dump"], a.copy_dumps)
            if a.json:
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
