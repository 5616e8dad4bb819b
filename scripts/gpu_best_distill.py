"""Issues 11 and 16 in one GPU run: the best GPU-trained bundle, chosen by a rule fixed before the run, and a
Lite0@224 student distilled from it.

    PYTHONPATH=src ROADCASCADE_DATA=/tmp/sw/streetwork ROADCASCADE_WEIGHTS_DIR=/tmp/w python3 \\
        scripts/gpu_best_distill.py --out /tmp/bd --json $OUT/best_distill.json [--deadline 540] [--quick]

What runs, as spawned processes sharing the GPU (each job starts as soon as what it needs exists):
- seed-0 networks of round 7 (PERFORMANCE.md): lite0 at 224 px and lite2 at 288 px, 8 epochs, three closer square
  views; the synthetic dashcam set (700 frames) and the cone detector trained on StreetWork boxes + that set (the
  ``cpu`` recipe, 6 epochs, seen at a 448-px native cap), here on the GPU;
- candidates for issue 11: ``E2`` = both networks stacked on every image (``mcc_slack 1``, budget 100 %) and ``E3`` =
  the same with the detector as a third tier, each as built and guarded at 0.5, 1 and 2 % of val's dashcam negatives (0.5 % added in round 11);
  every candidate measured for the choice on val challenge views and real dashcam frames (``fit.select``: the best
  real-dashcam MCC among candidates within 0.005 val challenge MCC of the best; night-dev is for selection) and
  scored on test (clean, challenge, night-dev recall, test dashcam FPR) for the report;
- issue 16: the teacher is the best GPU cascade, i.e. the candidate issue 11's rule picks on val (round 11; rounds 9
  and 10 used ``E2``, the full ensemble of both networks); students Lite0@224 distilled from it
  (``A``: train only; ``B``: train + the synthetic frames, unlabelled for the student), and the same Lite0@224
  trained on labels alone with the same epochs and seed; all on test challenge views. Between A and B val decides;
- with ``--seeds 0,1,2`` (round 12, PERFORMANCE.md), both networks are also trained with seeds 1 and 2, and a third
  candidate family ``E6`` is built over all six (tiers ``lite0@224#s0`` ... ``lite2@288#s2``; the policy may keep fewer:
  round 12 kept three), guarded like the others;
- round 13 (``--families E2,E3,H2,H3 --rule oof --no-students``): a second pair family ``H`` with lite2 trained and run
  at 384 px (the issue's "try Lite2 at 320-384"; never measured without the synthetic set before), and the rule reads
  each candidate's out-of-fold val challenge MCC from its build (``oof_val_mcc``) instead of the in-sample one, which
  favours the family with the most fitted parameters (round 12). Issue 16 is closed, so no students.

The synthetic set needs the sign crops next to the data (``signs/`` beside ``streetwork/``); without them the
synthesis fails, and E3 and student B are skipped (the rest runs). The StreetWork tar, night-dev and the Lite0 and
Lite2 weights already take 60.5 of the 64 MiB a call may carry, so the signs (9.5 MB) need a call of their own on
the same warm machine.

``--json`` is rewritten after every finished job, so a run cut off by its deadline keeps what it finished; at the
deadline the workers are killed. ``--quick``: a CPU smoke run (tiny subsets, a few steps).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

os.environ.setdefault("ROADCASCADE_GPU", "0")  # the plain runtime: many processes share one GPU
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_best_bundle import EXTRA_NETS, NETS  # noqa: E402  (the networks by name; a light import: torch loads in the workers)

GUARDS = (0.005, 0.01, 0.02)
DET_CAP = 448
# the two-network families by name: their networks (train_net names) and tier names; ``<X>3`` = ``<X>2`` + the detector
PAIRS = {
    "E": (("lite0", "lite0@224"), ("lite2", "lite2@288")),
    "H": (("lite0", "lite0@224"), ("lite2h", "lite2@384")),  # round 13: lite2 trained and run at 384 px
}


def _quick(quick: bool, **kw) -> dict:
    return kw if quick else {}


def _have(bdir: str | Path) -> bool:
    """A bundle finished by an earlier call on the same (warm) machine: kept, not made again."""
    return (Path(bdir) / "bundle.json").is_file()


def train_net(name: str, out: str, workers: int, quick: bool, seed: int = 0) -> str:
    from gpu_best_bundle import train_net as _train

    if _have(Path(out) / f"{name}-s{seed}"):
        return str(Path(out) / f"{name}-s{seed}")
    return _train(name, seed, out, workers, quick)


def net_key(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}-s{seed}"


def seed_ensemble_tiers(paths: dict[str, str], seeds: list[int]) -> str:
    """Both networks of every seed as tiers of one stacked ensemble, told apart by ``#s<seed>`` tags."""
    return ",".join(f"lite0@224#s{k}:{paths[net_key('lite0', k)]},lite2@288#s{k}:{paths[net_key('lite2', k)]}" for k in seeds)


def train_labels(out: str, workers: int, epochs: int, quick: bool) -> str:
    """The student's model, resolution, epochs and seed on labels alone (issue 16's baseline)."""
    import torch

    from roadcascade.fit.train import TrainConfig, train

    torch.set_num_threads(2)
    if _have(Path(out) / "student-labels"):
        return str(Path(out) / "student-labels")
    q = _quick(quick, max_train=60, max_val=30, max_steps=2, epochs=1)
    cfg = TrainConfig(**{**dict(model="lite0", input_size=224, eval_size=224, epochs=epochs), **q}, seed=0, num_workers=workers)
    train(cfg, Path(out) / "student-labels", log=lambda m: None)
    return str(Path(out) / "student-labels")


def make_synth(out: str, n: int) -> str:
    from roadcascade.io.synth import SynthConfig, ensure_synth

    return str(ensure_synth(SynthConfig(n=n, seed=0), Path(out) / "synth", log=lambda m: None))


def train_det(out: str, synth: str, workers: int, epochs: int, quick: bool) -> str:
    """Session 5's CPU detector recipe (StreetWork boxes + the synthetic frames, 448-px native cap), on the GPU."""
    import torch

    from roadcascade.detect.config import make_config
    from roadcascade.detect.train import train_detector

    torch.set_num_threads(2)
    if _have(Path(out) / "detector"):
        return str(Path(out) / "detector")
    q = _quick(quick, max_train=20, max_steps=4, max_eval=30, evidence_views=1, epochs=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = make_config("cpu", **{**dict(epochs=epochs), **q}, device=dev, threads=2, num_workers=0 if quick else workers,
                      extra_train=(synth,), native_cap=DET_CAP)
    train_detector(cfg, Path(out) / "detector", log=lambda m: print(f"[detector] {m}", flush=True))
    return str(Path(out) / "detector")


def build_ens(name: str, tiers: str, out: str, quick: bool) -> str:
    import torch

    from roadcascade.fit.build import build
    from roadcascade.fit.config import BuildConfig

    torch.set_num_threads(2)
    cdir = Path(out) / name
    if _have(cdir):
        return str(cdir)
    build(BuildConfig(tiers=tiers, budget="100%", mcc_slack=1.0, seed=0, **_quick(quick, max_val=30)), cdir, log=lambda m: None)
    return str(cdir)


def guard_copy(bdir: str, fpr: float) -> str:
    import torch

    from roadcascade.fit.guard import GuardConfig, guard_bundle

    torch.set_num_threads(2)
    gdir = f"{bdir}-guard{fpr}"
    if _have(gdir) and (Path(gdir) / ".guarded").is_file():
        return gdir
    shutil.copytree(bdir, gdir, dirs_exist_ok=True)
    guard_bundle(gdir, GuardConfig(fpr=fpr), log=lambda m: None)
    (Path(gdir) / ".guarded").touch()
    return gdir


def score_test(bdir: str, quick: bool, realcam: bool = True) -> dict:
    """Test clean and challenge MCC (challenge with its best-single / full-ensemble baselines) and, for the issue-11
    candidates, night-dev recall and test dashcam FPR. Read only, never used to choose."""
    import torch
    from dashcam_ablation import _score

    from roadcascade.cascade.bundle import Bundle
    from roadcascade.io.data import open_dataset
    from roadcascade.models.preprocess import pick_device

    torch.set_num_threads(2)
    b = Bundle.load(bdir, device=pick_device("auto"))
    test = open_dataset(None, "test").subset(40 if quick else None)
    keys = ("mcc", "accuracy", "auroc", "ece", "mean_gflops", "baselines")
    return {"tiers": b.cascade.tier_names, **_score(b, test, keys=keys, realcam=realcam and not quick)}


def measure_val(label: str, bdir: str, quick: bool) -> dict:
    """What the choice reads: val challenge MCC (as the bundle decides, and for a built cascade also the build's own
    out-of-fold estimate) and real-dashcam MCC (night-dev + val's dashcam negatives)."""
    from dataclasses import asdict

    import torch

    from roadcascade.fit.select import SelectConfig, measure_all
    from roadcascade.models.preprocess import pick_device

    torch.set_num_threads(2)
    m = measure_all([(label, bdir)], SelectConfig(device=str(pick_device("auto")), max_images=60 if quick else None))[0]
    return {**asdict(m), "oof_val_challenge_mcc": oof_val_mcc(bdir)}


def oof_val_mcc(bdir: str) -> float | None:
    """The build's out-of-fold val MCC of the chosen cascade (``metrics.val.cascade``: fusion and policy fitted on the
    other folds, views of one image kept together); None for a bundle not made by ``build``. The in-sample val MCC
    favours the family with the most fitted parameters (round 12: six stacked networks led val by 0.007 and trailed
    on test by 0.011); the guard moves full-frame thresholds only, so a guarded copy keeps its cascade's estimate."""
    meta = json.loads((Path(bdir) / "bundle.json").read_text())
    mcc = meta.get("metrics", {}).get("val", {}).get("cascade", {}).get("mcc")
    return None if mcc is None else float(mcc)


def distill_student(name: str, out: str, teacher: str, extra: tuple[str, ...], epochs: int, quick: bool) -> str:
    import torch

    from roadcascade.fit.config import DistillConfig
    from roadcascade.fit.distill import distill

    torch.set_num_threads(2)
    if _have(Path(out) / name):
        return str(Path(out) / name)
    q = _quick(quick, max_train=60, max_val=30, max_steps=2, epochs=1, max_extra=20)
    cfg = DistillConfig(teacher=teacher, student="lite0@224", extra=extra, temperature=2.0, hard_weight=0.3, views=4,
                        **{**dict(epochs=epochs), **q}, seed=0, cache=str(Path(out) / f"cache-{name}"))
    distill(cfg, Path(out) / name, log=lambda m: None)
    return str(Path(out) / name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/best-distill")
    ap.add_argument("--json", default=None)
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds; then the workers are killed")
    ap.add_argument("--n-synth", type=int, default=700)
    ap.add_argument("--det-epochs", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=8, help="students' epochs (distilled and labels-only)")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--seeds", default="0", help="seeds of the two networks; with more than one, the candidate "
                    "E<2n> stacks all 2n networks (a seed ensemble), guarded like E2 and E3")
    ap.add_argument("--families", default="E2,E3", help="two-network families (PAIRS: E = lite2 at 288, H = lite2 at "
                    "384) and their detector variants (E3, H3); round 13 ran E2,E3,H2,H3")
    ap.add_argument("--rule", choices=("insample", "oof"), default="insample",
                    help="the val challenge MCC the choice reads: as measured on val (rounds 9-12) or the build's "
                    "out-of-fold estimate (round 13); both choices are kept in the JSON")
    ap.add_argument("--no-students", action="store_true", help="skip issue 16's students and labels-only baseline")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    out, q = a.out, a.quick
    Path(out).mkdir(parents=True, exist_ok=True)
    workers = 0 if q else max(1, (os.cpu_count() or 2) // 5)
    import torch

    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
                 "config": vars(a), "seconds": {}, "paths": {}, "test": {}, "val": {}, "errors": {}}

    # a resumed run (same warm machine) keeps the val/test numbers of bundles it already measured
    progress = Path(out) / "progress.json"
    if progress.is_file():
        old = json.loads(progress.read_text())
        for kind in ("val", "test"):
            res[kind].update({k: v for k, v in old.get(kind, {}).items() if _have(Path(out) / k)})
        res["resumed"] = {kind: sorted(res[kind]) for kind in ("val", "test")}

    def save() -> None:
        progress.write_text(json.dumps({"val": res["val"], "test": res["test"]}))
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=1))

    ex = ProcessPoolExecutor(a.parallel, mp_context=multiprocessing.get_context("spawn"))
    jobs: dict[Future, tuple[str, str]] = {}  # future -> (kind, key)
    started: set[tuple[str, str]] = {(kind, k) for kind in ("val", "test") for k in res[kind]}  # resumed: measured

    def submit(kind: str, key: str, fn, *args) -> None:
        if (kind, key) not in started:
            started.add((kind, key))
            jobs[ex.submit(fn, *args)] = (kind, key)

    seeds = [int(k) for k in a.seeds.split(",") if k.strip()]
    if 0 not in seeds:
        raise SystemExit("--seeds must include 0 (E2 and E3 are built from seed 0)")
    seed_family = f"E{2 * len(seeds)}" if len(seeds) > 1 else None
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    if bad := [f for f in families if len(f) != 2 or f[0] not in PAIRS or f[1] not in "23"]:
        raise SystemExit(f"unknown families {bad}: use {sorted(PAIRS)} followed by 2 (the pair) or 3 (+ the detector)")
    with_det = any(f[1] == "3" for f in families)
    size = {n: spec["input_size"] for n, spec in {**NETS, **EXTRA_NETS}.items()}
    pair_nets = sorted({n for f in families for n, _ in PAIRS[f[0]]}, key=lambda n: (-size[n], n))  # slowest first
    for name in pair_nets:
        submit("net", name, train_net, name, out, workers, q, 0)
    for k in seeds if seed_family else []:  # the seed family's networks (seed 0's are E2's: submitted once)
        for name in ("lite0", "lite2"):
            submit("net", net_key(name, k), train_net, name, out, workers, q, k)
    if not a.no_students:
        submit("labels", "student-labels", train_labels, out, workers, a.epochs, q)
    if with_det or not a.no_students:
        submit("synth", "synth", make_synth, out, 40 if q else a.n_synth)
    p = res["paths"]

    def on_done(kind: str, key: str, value) -> None:
        res["seconds"][f"{kind}:{key}"] = round(time.perf_counter() - t0, 1)
        if kind in ("net", "labels", "synth", "det", "build", "guard", "distill"):
            p[key] = value
        if kind == "synth" and with_det:
            submit("det", "detector", train_det, out, value, workers, a.det_epochs, q)
        for fam in families if kind in ("net", "det") else ():
            pair = PAIRS[fam[0]]
            if all(n in p for n, _ in pair) and (fam[1] == "2" or "detector" in p):
                nets = ",".join(f"{tier}:{p[n]}" for n, tier in pair)
                det = f",detector(path={p['detector']},name=cones,native_cap={DET_CAP})" if fam[1] == "3" else ""
                submit("build", fam, build_ens, fam, nets + det, out, q)
        if kind == "net" and seed_family and all(net_key(n, k) in p for n in ("lite0", "lite2") for k in seeds):
            submit("build", seed_family, build_ens, seed_family, seed_ensemble_tiers(p, seeds), out, q)
        if kind == "build":
            for fpr in GUARDS:
                submit("guard", f"{key}-guard{fpr}", guard_copy, value, fpr)
        if kind in ("build", "guard"):
            submit("val", key, measure_val, key, value, q)
            submit("test", key, score_test, value, q, True)
        if kind in ("labels", "distill"):
            submit("val", key, measure_val, key, value, q)
            submit("test", key, score_test, value, q, False)
        if kind in ("val", "test"):
            res[kind][key] = value
            if kind == "test":
                print(line(key, value), flush=True)
        if "teacher" not in res and not a.no_students and candidates_done():  # after any job: a resumed run may hold every val number already
            # issue 16's teacher is the best GPU cascade: the bundle issue 11's rule ships, chosen on val alone
            res["teacher"] = teacher = choose(res, a.rule)["best_gpu_bundle"]
            tdir = str(Path(out) / teacher)
            print(f"teacher: {teacher}", flush=True)
            submit("distill", "student-A", distill_student, "student-A", out, tdir, (), a.epochs, q)
            if "synth" in p:
                submit("distill", "student-B", distill_student, "student-B", out, tdir, (p["synth"],), a.epochs, q)

    def candidates_done() -> bool:
        """Every issue-11 candidate measured on val (E3's only if its detector could be made)."""
        fams = [f for f in families if not (f[1] == "3" and ("synth:synth" in res["errors"] or "det:detector" in res["errors"]))]
        fams += [seed_family] if seed_family and not any(k.startswith("net:") for k in res["errors"]) else []
        want = {f"{f}{g}" for f in fams for g in ("", *(f"-guard{fpr}" for fpr in GUARDS))}
        return want <= set(res["val"])

    while jobs:
        left = a.deadline - (time.perf_counter() - t0)
        done, _ = wait(list(jobs), timeout=max(0.0, left), return_when=FIRST_COMPLETED)
        if not done:
            res["cut_off"] = sorted(f"{k}:{n}" for k, n in jobs.values())
            print(f"deadline: {len(jobs)} jobs cut off: {res['cut_off']}", flush=True)
            break
        for f in done:
            kind, key = jobs.pop(f)
            try:
                on_done(kind, key, f.result())
            except Exception as e:  # one failure must not lose the rest
                res["errors"][f"{kind}:{key}"] = repr(e)
                print(f"error in {kind}:{key}: {e!r}", flush=True)
        save()
    res["choice"] = choose(res, a.rule)
    res["choice_other_rule"] = choose(res, "oof" if a.rule == "insample" else "insample")  # for the report only
    res["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    save()
    print(json.dumps(res["choice"], indent=1), flush=True)
    print(f"done in {res['seconds']['total']:.0f} s", flush=True)
    if jobs:  # kill the cut-off workers rather than wait for them
        for proc in list(getattr(ex, "_processes", {}).values()):
            proc.kill()
        os._exit(0)
    ex.shutdown()


def choose(res: dict, rule: str = "insample") -> dict:
    """Issue 11: ``fit.select``'s rule over the candidate bundles measured on val, reading their val challenge MCC as
    measured (``insample``) or the build's out-of-fold estimate (``oof``); issue 16: student A or B by val."""
    from roadcascade.fit.select import choose_bundle

    out: dict = {"rule": rule}
    cands = sorted(k for k in res["val"] if not k.startswith("student-"))  # a fixed order: ties go to the earlier
    key = "oof_val_challenge_mcc" if rule == "oof" else "val_challenge_mcc"
    if cands and rule == "oof" and any(res["val"][c].get(key) is None for c in cands):
        raise ValueError(f"rule oof: no out-of-fold estimate for {[c for c in cands if res['val'][c].get(key) is None]}")
    if cands:
        k = choose_bundle([res["val"][c][key] for c in cands], [res["val"][c]["dashcam_mcc"] for c in cands], 0.005)
        out["best_gpu_bundle"] = cands[k]
    studs = [k for k in ("student-A", "student-B") if k in res["val"]]
    if studs:
        out["student"] = max(studs, key=lambda s: res["val"][s]["val_challenge_mcc"])
    return out


def line(name: str, r: dict) -> str:
    s = f"{name:22s} test clean {r['test_clean']['mcc']:.4f}  challenge {r['test_challenge']['mcc']:.4f}"
    if "realcam" in r:
        rc = r["realcam"]
        s += (f"  night-dev recall {rc['night_dev']['recall']:.3f}  dashcam FPR {rc['dashcam_negatives']['fpr']:.3f}  "
              f"joint MCC {rc['joint']['mcc']:.3f}")
    return s + f"  tiers {r['tiers']}"


if __name__ == "__main__":
    main()
