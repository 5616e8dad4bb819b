"""Identity check of the fitting code (issue 17): tiny runs of train (two recipes), build (mcc and guaranteed), the
detector's training, measure_effect and distill, plus the policy optimiser on a synthetic table; writes the SHA-256 of
every weights file and the JSON outputs without timings, dates and paths. Run it with two source trees, then compare:

    PYTHONPATH=OLD/src python scripts/fit_identity.py run /tmp/a
    PYTHONPATH=NEW/src python scripts/fit_identity.py run /tmp/b
    python scripts/fit_identity.py compare /tmp/a/result.json /tmp/b/result.json    # prints "equal"

About a minute on 2 CPU cores; needs the StreetWork data (``$ROADCASCADE_DATA`` or ../shared/data/streetwork) and the
lite0 weights package."""

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("ROADCASCADE_DATA", str(ROOT.parent / "shared/data/streetwork"))
SKIP = ("created", "seconds", "ms", "speed", "cache", "work", "path", "bundle", "recalibrated", "source", "teacher")


def clean(o, out: Path):
    """JSON without what changes from run to run (timings, dates) or with the output folder."""
    if isinstance(o, dict):
        return {k: clean(v, out) for k, v in o.items() if not any(t in k for t in SKIP)}
    if isinstance(o, (list, tuple)):
        return [clean(v, out) for v in o]
    return o.replace(str(out), "OUT") if isinstance(o, str) else o


def shas(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).rglob("*"))
            if p.is_file() and p.suffix in (".safetensors", ".pt", ".npz", ".onnx") and not p.name.startswith("val-")}


def bundle_json(d: Path, out: Path) -> dict:
    return {"weights": shas(d), "meta": clean(json.loads((d / "bundle.json").read_text()), out)}


def policy_outputs() -> dict:
    from roadcascade.fit.policy import CascadePolicy, TierTable, learn_then_test

    rng = np.random.default_rng(3)
    n, T = 240, 4
    y = rng.integers(0, 2, n)
    L = (y[:, None] * 2 - 1) * rng.uniform(0.2, 2.0, (1, T)) + rng.normal(0, 1.2, (n, T))
    G = np.array([0.2, 0.5, 1.0, 2.0])
    tb = TierTable([f"t{i}" for i in range(T)], L, 1 / (1 + np.exp(-L)), G, G * 3, np.full(T, 0.5), y, np.arange(n) // 3)
    res = {}
    for orders in ("cost", "all"):
        opt = CascadePolicy(orders=orders, max_tiers=3, grid=6, folds=3).fit(tb)
        res[orders] = {"frontier": [p.as_dict() for p in opt.frontier_], "select": opt.select("50%").as_dict(),
                       "full": opt.full_.as_dict(), "fusions": opt.fusion_comparison(),
                       "exits": [e.to_config() for e in opt.exits_for(opt.select("40%"))],
                       "path": [p.as_dict() for p in opt.risk_path(50)], "n": len(opt.mcc_)}
    res["ltt"] = learn_then_test(tb, 0.1, 0.2, grid=6, folds=3).as_dict()
    return json.loads(json.dumps(res, default=str))


def run(out: Path) -> None:
    import torch

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT / "tests"))
    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    quiet = dict(log=lambda *_: None)
    res = {"policy": policy_outputs()}

    from roadcascade.fit.train import TrainConfig, train

    train(TrainConfig(model="lite0", input_size=96, eval_size=112, epochs=2, batch_size=8, max_train=24, max_val=12,
                      max_steps=4, data=DATA, val_views=2, threads=2, eval_from=0.0), out / "stage1", **quiet)
    train(TrainConfig(model="lite0", input_size=96, eval_size=96, epochs=1, batch_size=8, max_train=16, max_val=10, max_steps=2,
                      data=DATA, val_views=1, threads=2, balance_sources=True, style_p=0.5, calibrate_on="both"),
          out / "stage1b", **quiet)
    for n in ("stage1", "stage1b"):
        res[n] = bundle_json(out / n, out)

    from roadcascade.fit.build import BuildConfig, build

    for mode in ("mcc", "guaranteed"):
        build(BuildConfig(tiers="test_tiny@48,test_tiny@64,tta(test_tiny@64,n=2..3)", budget="60%", data=DATA, max_val=12,
                          n_views=2, device="cpu", work=str(out / "bwork"), max_train=8, max_steps=1, train_epochs=1, threads=2,
                          mode=mode), out / f"build-{mode}", **quiet)
        res[f"build-{mode}"] = bundle_json(out / f"build-{mode}", out)
    res["build-trained"] = shas(out / "bwork")

    from test_detect_train import write_manifest

    from roadcascade.detect.train import make_config, train_detector

    write_manifest(out / "cones")
    train_detector(make_config("cpu", data=str(out / "cones"), device="cpu", threads=1, min_size=128, max_size=192,
                               train_sizes=(128,), fpn_channels=32, head_convs=1, epochs=3, batch_size=4, lr=3e-3, warmup_steps=5,
                               ema_decay=0.8, neg_ratio=0.5, eval_from=0.3, evidence_views=1, speed_images=2), out / "det", **quiet)
    res["det"] = {**bundle_json(out / "det", out),
                  "metrics": clean(json.loads((out / "det" / "detection_metrics.json").read_text()), out)}

    import roadcascade.detect.tier  # noqa: F401  (the detector tier kind)
    from roadcascade.cascade.bundle import Bundle
    from roadcascade.detect.effect import measure_effect

    res["effect"] = clean(measure_effect(Bundle.load(out / "stage1", device="cpu"), Bundle.load(out / "det", device="cpu"),
                                         data=str(out / "cones"), n_views=2, **quiet), out)

    from roadcascade.fit.distill import DistillConfig, distill

    distill(DistillConfig(teacher=str(out / "stage1"), student="lite0@64", epochs=1, batch_size=8, max_train=6, max_val=6,
                          val_views=1, views=2, data=DATA, threads=2, cache=str(out / "dcache")), out / "student", **quiet)
    res["distill"] = bundle_json(out / "student", out)
    (out / "result.json").write_text(json.dumps(res, indent=1, sort_keys=True, default=str))
    print(f"{out / 'result.json'}")


def diff(x, y, path: str = "") -> int:
    if isinstance(x, dict) and isinstance(y, dict):
        n = 0
        for k in sorted(set(x) | set(y)):
            if k not in x or k not in y:
                print("only in one:", f"{path}/{k}")
                n += 1
            else:
                n += diff(x[k], y[k], f"{path}/{k}")
        return n
    if x != y:
        print("differs:", path, str(x)[:160], "|", str(y)[:160])
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        a, b = (json.loads(Path(p).read_text()) for p in sys.argv[2:])
        print("equal" if diff(a, b) == 0 else "NOT equal")
    else:
        sys.exit(__doc__)
