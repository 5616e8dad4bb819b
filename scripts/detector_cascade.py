"""Issue 11, item 3: does the cone detector earn its cost as a cascade tier? The quickstart's cascade built from
one stage-1 bundle with and without a detector tier, in one run, each guarded as the quickstart guards it; both
scored the same way (test clean and challenge MCC, mean GFLOPs, night-dev recall, dashcam FPR on test).

    PYTHONPATH=src python scripts/detector_cascade.py --stage1 runs/quickstart/stage1 --detector runs/detector_synth \
        --out runs/detcascade --json runs/detcascade/detector-cascade.json [--cap 448] [--budget 35%]

Three variants: the quickstart cascade, the same tiers plus the detector under the same budget rule (the optimiser may
drop it), and "full ensemble": the policy closest to running every tier on every image (``mcc_slack=1``, budget 100 %:
the cheapest policy with no val disagreement with the stacked full ensemble, so early exits stay where they agree). Everything is fitted on val; night-dev and test
are only read. ``scripts/gpu_detector.py`` has ``score`` for the detector bundle alone at several ``native_cap``s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ROADCASCADE_GPU", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def scored(bdir: Path, views=("clean", "challenge")) -> dict:
    from dashcam_ablation import _score

    from roadcascade.cascade.bundle import Bundle
    from roadcascade.io.data import open_dataset

    b = Bundle.load(bdir, device="cpu")
    t0 = time.perf_counter()
    row = _score(b, open_dataset(None, "test"), views=views)
    row["tiers"] = b.cascade.tier_names
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def line(name: str, r: dict) -> str:
    rc = r["realcam"]
    return (f"{name:28s} test clean {r['test_clean']['mcc']:.4f}  challenge {r['test_challenge']['mcc']:.4f}  "
            f"night-dev recall {rc['night_dev']['recall']:.3f}  dashcam FPR {rc['dashcam_negatives']['fpr']:.3f}  "
            f"joint MCC {rc['joint']['mcc']:.3f}  tiers {r['tiers']}")


def main() -> None:
    from roadcascade.fit.build import build, quickstart_tiers
    from roadcascade.fit.config import BuildConfig
    from roadcascade.fit.guard import GuardConfig, guard_bundle

    ap = argparse.ArgumentParser()
    ap.add_argument("--stage1", required=True)
    ap.add_argument("--detector", required=True)
    ap.add_argument("--out", default="runs/detcascade")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cap", type=int, default=448)
    ap.add_argument("--budget", default="35%")
    ap.add_argument("--guard-fpr", type=float, default=0.02)
    ap.add_argument("--only", default=None, help="variant names separated by | (default: all)")
    a = ap.parse_args()
    out = Path(a.out)
    rows: dict = {"config": vars(a)}
    base = quickstart_tiers(Path(a.stage1))
    det = f"{base},detector(path={a.detector},name=cones,native_cap={a.cap})"
    # (tiers, mcc_slack): the policy the optimiser picks under the budget by val MCC, and the one closest to the full
    # ensemble (every tier, stacked), which val cannot justify by MCC when its positives are web photos
    variants = {"quickstart cascade": (base, 0.0), "with detector": (det, 0.0), "with detector (full ensemble)": (det, 1.0)}
    only = set(a.only.split("|")) if a.only else set(variants)
    for name, (tiers, slack) in ((n, v) for n, v in variants.items() if n in only):
        bdir = out / name.replace(" ", "-").replace("(", "").replace(")", "")
        t0 = time.perf_counter()
        build(BuildConfig(tiers=tiers, budget="100%" if slack else a.budget, mcc_slack=slack, device="cpu"), bdir, log=print)
        guard_bundle(bdir, GuardConfig(fpr=a.guard_fpr), device="cpu", log=print)
        rows[name] = {"build_s": round(time.perf_counter() - t0, 1), **scored(bdir)}
        rows[name]["policy"] = json.loads((bdir / "bundle.json").read_text()).get("policy", {}).get("chosen")
        print(line(name, rows[name]), flush=True)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
