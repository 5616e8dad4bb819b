"""Issue 11, item 3 on the GPU machine: the cone detector trained with and without the synthetic dashcam set,
each seen at StreetWork's size and at native resolution (``native_cap``), scored on real dashcam frames.

    PYTHONPATH=src ROADCASCADE_DATA=... ROADCASCADE_WEIGHTS_DIR=... python3 scripts/gpu_detector.py \
        --out /tmp/det --json $OUT/detector.json --ship $OUT [--epochs 12] [--n-synth 800] [--quick]

Both detectors train at once (spawned processes sharing the GPU); each is scored as a stand-alone roadwork
tier (test clean MCC, night-dev recall, dashcam false-positive rate on test) with ``native_cap`` off and at
each cap given. ``--ship DIR`` writes the synthetic-set detector's bundle there (weights as fp16, to travel;
``scripts/gpu_detector.py restore`` turns them back into a loadable fp32 bundle).

    python scripts/gpu_detector.py score --src runs/detector_synth --caps none,448 --json runs/detector_synth/realcam-caps.json

scores a detector bundle trained elsewhere (``roadcascade train-detector``, e.g. on the CPU) the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("ROADCASCADE_GPU", "0")


def make_synth(out: str, n: int, signs: bool) -> str:
    from roadcascade.io.synth import SynthConfig, ensure_synth

    return str(ensure_synth(SynthConfig(n=n, road_signs=signs), Path(out) / "synth", log=lambda m: None))


def train_one(name: str, out: str, extra: tuple[str, ...], epochs: int, quick: bool) -> str:
    from roadcascade.detect.config import make_config
    from roadcascade.detect.train import train_detector

    quick_kw = dict(max_train=20, max_steps=4, max_eval=30, evidence_views=1, device="auto", num_workers=0) if quick else {}
    cfg = make_config("gpu", epochs=1 if quick else epochs, extra_train=extra or None, native_cap=None, **quick_kw)
    t0 = time.perf_counter()
    train_detector(cfg, Path(out) / name, log=lambda m: print(f"[{name}] {m}", flush=True))
    print(f"[{name}] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return str(Path(out) / name)


def score(bdir: str, caps: list[int | None], quick: bool) -> dict:
    from roadcascade.bench.evaluate import evaluate, public
    from roadcascade.bench.realcam import realcam_report
    from roadcascade.cascade.bundle import Bundle
    from roadcascade.detect.tier import DetectorTier
    from roadcascade.io.data import open_dataset
    from roadcascade.models.preprocess import pick_device

    b = Bundle.load(bdir, device=pick_device("auto"))
    det = next(t for t in b.cascade.tiers if isinstance(t, DetectorTier)).detector
    test = open_dataset(None, "test").subset(40 if quick else None)
    m = json.loads((Path(bdir) / "detection_metrics.json").read_text())
    rows = {"map50": {k: m[k]["map50"] for k in ("val", "test") if k in m}, "train_s": b.meta["train"].get("train_seconds")}
    for cap in caps:
        det.cfg = det.cfg.replace(native_cap=cap)
        t0 = time.perf_counter()
        rc = realcam_report(b)
        rep = public(evaluate(b, test, "clean", "test"))
        rows[f"cap{cap}"] = {"test_clean_mcc": rep["mcc"], "test_clean_auroc": rep["auroc"], "realcam": rc,
                             "seconds": round(time.perf_counter() - t0, 1)}
        r = rc["night_dev"]["recall"], rc["dashcam_negatives"]["fpr"], rc["joint"]["mcc"], rc["joint"]["auroc"]
        print(f"{Path(bdir).name} cap {cap}: test clean MCC {rep['mcc']:.4f}  night-dev recall {r[0]:.3f}  dashcam FPR "
              f"{r[1]:.3f}  joint MCC {r[2]:.3f} AUROC {r[3]:.3f}", flush=True)
    return rows


def ship(bdir: str, dest: str) -> None:
    """The bundle's json files and its weights as fp16 (one file under the 16 MiB a device call returns)."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    for f in Path(bdir).glob("*.json"):
        shutil.copy(f, d / f"det-{f.name}")
    for f in Path(bdir).glob("*.safetensors"):
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
        save_file(sd, str(d / f"det-{f.stem}.fp16.safetensors"))


def restore(src: str, dest: str) -> None:
    """A shipped bundle (``ship``) back as a loadable bundle with fp32 weights."""
    from safetensors.torch import load_file, save_file

    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    for f in Path(src).glob("det-*.json"):
        (d / f.name[4:]).write_text(f.read_text())
    doc = json.loads((d / "bundle.json").read_text())
    for f in Path(src).glob("det-*.fp16.safetensors"):
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
        name = f"{f.name[4:-len('.fp16.safetensors')]}.safetensors"
        save_file(sd, str(d / name))
        # the weights are the fp16 values now: the bundle records their new hash (it refuses changed files)
        doc["weights_sha256"][name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    (d / "bundle.json").write_text(json.dumps(doc, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", nargs="?", default="run", choices=("run", "restore", "score"))
    ap.add_argument("--out", default="runs/det")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ship", default=None)
    ap.add_argument("--src", default=None, help="restore: the folder a run shipped to; score: a detector bundle")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--n-synth", type=int, default=800)
    ap.add_argument("--caps", default="none,448,640")
    ap.add_argument("--no-signs", action="store_true", help="synthesise without road-works sign crops")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.cmd == "restore":
        restore(a.src, a.out)
        return
    caps = [None if c == "none" else int(c) for c in a.caps.split(",")]
    if a.cmd == "score":  # a bundle trained elsewhere (e.g. `roadcascade train-detector` on the CPU), scored the same way
        rows = score(a.src, caps, a.quick)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(rows, indent=1))
        return
    t0 = time.perf_counter()
    synth = make_synth(a.out, 40 if a.quick else a.n_synth, not a.no_signs)
    print(f"synthetic set in {time.perf_counter() - t0:.0f} s", flush=True)
    jobs = {"det_synth": (synth,), "det_base": ()}
    rows: dict = {"config": {"epochs": a.epochs, "n_synth": a.n_synth, "caps": caps, "signs": not a.no_signs}}
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = {n: ex.submit(train_one, n, a.out, extra, a.epochs, a.quick) for n, extra in jobs.items()}
        scored = {n: ex.submit(score, f.result(), caps, a.quick) for n, f in futs.items()}
        for n, f in scored.items():
            rows[n] = f.result()
            if a.json:
                Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.ship:
        ship(str(Path(a.out) / "det_synth"), a.ship)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
