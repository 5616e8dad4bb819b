"""Cascade measurement: build cascades on val (challenge views, seed 0), evaluate on test (seed 1).

Run from the repository root:  python3 scripts/cascade_measure.py
Env: CARRY (dir holding streetwork/ and the stage-1 bundles qs/ (lite0) and l2/ (lite2); default
runs/cascade-carry), OUT (results), DEVICE (cuda|cpu), MAXVAL / MAXTEST (subsets for a smoke run),
SETS (A,B). Everything is fitted on val; test is only evaluated. The test split's tier outputs are
saved so that Learn-then-Test can be replayed at other epsilons (fitted on val, measured on test).
The timed evaluation is the second of two identical passes (the first warms CUDA up for every
batch shape the cascade produces).
"""

import json
import os
import shutil
import sys
import tarfile
import time
import warnings

sys.path.insert(0, "src")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from roadcascade.fit.build import BuildConfig, _tier_threshold, build  # noqa: E402
from roadcascade.cascade.bundle import Bundle  # noqa: E402
from roadcascade.cascade.runtime import Cascade  # noqa: E402
from roadcascade.io.data import open_dataset  # noqa: E402
from roadcascade.bench.evaluate import evaluate, make_items, public  # noqa: E402
from roadcascade.io.images import decode_bytes  # noqa: E402
from roadcascade.fit.policy import TierTable, collect_states, group_means, learn_then_test, replay, table_from_states  # noqa: E402
from roadcascade.bench.report import write_html  # noqa: E402
from roadcascade.cascade.tta import TTATier  # noqa: E402

C = os.environ.get("CARRY", "runs/cascade-carry")
OUT = os.environ.get("OUT", f"{C}/results")
RES = f"{C}/results-tmp"
os.makedirs(OUT, exist_ok=True)
os.makedirs(RES, exist_ok=True)
DEV = os.environ.get("DEVICE", "cuda")
MAXVAL = int(os.environ["MAXVAL"]) if os.environ.get("MAXVAL") else None
MAXTEST = int(os.environ["MAXTEST"]) if os.environ.get("MAXTEST") else None
D = f"{C}/streetwork"
SETS = {
    "A": f"lite0@128:{C}/qs,lite0@224:{C}/qs,tta(lite0@224,n=4..8)",
    "B": f"lite0@128:{C}/qs,lite0@224:{C}/qs,lite2@260:{C}/l2,tta(lite0@224,n=4..8)",
}
want = os.environ.get("SETS", "A,B").split(",")
print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(), flush=True)
summary = {}
for name in want:
    tiers = SETS[name]
    t0 = time.perf_counter()
    cfg = BuildConfig(tiers=tiers, budget="35%", data=D, device=DEV, work=f"{C}/work-{name}", max_val=MAXVAL)
    build(cfg, f"{C}/out-{name}", log=lambda s: print(f"[{name}] {s}", flush=True))
    t_build = time.perf_counter() - t0
    b = Bundle.load(f"{C}/out-{name}", device=DEV)
    ds = open_dataset(D, "test").subset(MAXTEST)
    evaluate(b, ds, "challenge", "test")  # warm-up pass: CUDA kernels and per-shape plans of every stage
    t0 = time.perf_counter()
    rep = evaluate(b, ds, "challenge", "test")
    t_eval = time.perf_counter() - t0
    pub = public(rep)
    with open(f"{RES}/eval-{name}.json", "w") as f:
        json.dump(pub, f, indent=1, default=float)
    write_html([(f"test / challenge ({name})", rep)], f"{RES}/report-{name}.html", title=f"cascade {name} on StreetWork test")
    shutil.copy(f"{C}/out-{name}/bundle.json", f"{RES}/bundle-{name}.json")
    shutil.copy(f"{C}/work-{name}/val-table.npz", f"{RES}/val-table-{name}.npz")

    # test tier outputs (every tier on every image, as the full ensemble runs them)
    ens = Cascade.from_config(b.meta["ensemble"], b.path, b.cascade.tiers[0].device)
    items = make_items(ds, "challenge", 1, n_views=4)
    states = []
    for i in range(0, len(items), 64):
        states += collect_states(ens, [decode_bytes(it.payload) for it in items[i : i + 64]])
    y = np.array([it.label for it in items])
    _, groups = np.unique(np.array([it.key.rsplit("#v", 1)[0] for it in items]), return_inverse=True)
    reuse = {t.name: (t.base.name, float(t.view_gflops[0])) for t in ens.tiers if isinstance(t, TTATier) and t.reuse}
    tt = table_from_states(states, ens.tier_names, [_tier_threshold(t) for t in ens.tiers], y, groups, reuse)
    tt.save(f"{RES}/test-table-{name}.npz")

    # Learn-then-Test at several epsilons: fitted on val only, measured on test
    vt = TierTable.load(f"{C}/work-{name}/val-table.npz")
    ltt = []
    for eps in (0.005, 0.01, 0.02, 0.05):
        r = learn_then_test(vt, eps, 0.1)
        seq = [tt.names.index(vt.names[t]) for t in r.point.tiers]
        rseq = [tt.names.index(vt.names[t]) for t in r.reference_tiers]
        got, ref = replay(r.exits, seq, tt), replay(r.reference_exits, rseq, tt)
        risk = float(group_means(got.pred != ref.pred, tt.groups).mean())
        ltt.append({"epsilon": eps, "delta": 0.1, "policy": r.point.describe(), "certified": r.certified,
                    "n_cal": r.n_cal, "risk_cal": r.risk_cal, "p_value": r.p_value, "risk_test": risk,
                    "within_epsilon": risk <= eps, "mean_gflops_test": float(got.gflops.mean()),
                    "share_of_full": float(got.gflops.mean() / ref.gflops.mean())})
        print(f"[{name}] LTT eps {eps}: {ltt[-1]}", flush=True)

    bl = pub["baselines"]
    s = {
        "tiers": tiers,
        "cascade": {k: pub[k] for k in ("mcc", "accuracy", "mean_gflops", "mean_ms", "exit_rates", "reward")},
        "policy": b.meta["policy"]["chosen"]["describe"],
        "full_ensemble": bl["full_ensemble"],
        "full_ensemble_vote": bl.get("full_ensemble_vote"),
        "best_single": bl["best_single"],
        "singles": bl["singles"],
        "cascade_disagreement": bl["cascade_disagreement"],
        "guaranteed": bl.get("guaranteed"),
        "ltt_sweep": ltt,
        "val": {k: b.meta["policy"][k] for k in ("chosen", "full_ensemble", "best_single")},
        "fusion_comparison_val": b.meta["policy"]["fusion_comparison"],
        "seconds": {"build": t_build, "eval": t_eval},
        "val_ms_per_image": b.meta["build"]["val_ms_per_image"],
    }
    s["ratio_gflops"] = pub["mean_gflops"] / bl["full_ensemble"]["mean_gflops"]
    s["mcc_minus_full"] = pub["mcc"] - bl["full_ensemble"]["mcc"]
    s["mcc_minus_best_single"] = pub["mcc"] - bl["best_single"]["mcc"]
    summary[name] = s
    print(json.dumps({k: s[k] for k in ("cascade", "policy", "ratio_gflops", "mcc_minus_full", "mcc_minus_best_single")},
                     default=float), flush=True)
with open(f"{OUT}/summary.json", "w") as f:
    json.dump(summary, f, indent=1, default=float)
with tarfile.open(f"{OUT}/results.tar.gz", "w:gz") as t:
    t.add(RES, arcname="results")
print(json.dumps(summary, indent=1, default=float))
