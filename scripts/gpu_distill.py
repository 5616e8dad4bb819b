"""Distillation on the GPU in one run (issue 16): a teacher cascade (its full ensemble), a Lite0@224 student
distilled from it, and the same student trained on labels alone, all evaluated on test challenge views.

    PYTHONPATH=src ROADCASCADE_DATA=.carry/streetwork ROADCASCADE_WEIGHTS_DIR=... \\
        python3 scripts/gpu_distill.py --out $OUT/distill [--teacher .carry/teacher_bundle] [--epochs 8]

Without ``--teacher`` the teacher is built here with ``roadcascade.fit.build.build`` (tiers ``--teacher-tiers``,
missing ones trained for ``--epochs``). The student and the label-only baseline share every setting (model,
resolution, epochs, seed, data); only the loss differs. ``OUT/summary.json`` holds test challenge MCC of the
teacher cascade, of its full ensemble (``baselines`` of the evaluation), of both students, and the run times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from roadcascade.fit.build import BuildConfig, build
from roadcascade.cascade.bundle import Bundle
from roadcascade.io.data import open_dataset
from roadcascade.fit.distill import DistillConfig, distill
from roadcascade.bench.evaluate import evaluate, public
from roadcascade.fit.train import TrainConfig, train


def test_challenge(path: Path, data: str | None, max_test: int | None = None) -> dict:
    rep = public(evaluate(Bundle.load(path), open_dataset(data, "test").subset(max_test), "challenge", "test"))
    return {"mcc": rep["mcc"], "accuracy": rep["accuracy"], "ece": rep["ece"], "img_s": rep["throughput_img_s"],
            "mean_gflops": rep["mean_gflops"], "baselines": rep.get("baselines")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", help="a teacher bundle (default: build one here)")
    p.add_argument("--teacher-tiers", default="lite0@128,lite0@224,lite2@260,tta(lite0@224,n=4..8)")
    p.add_argument("--teacher-budget", default="100%", help="the teacher cascade's budget (100%%: its full ensemble)")
    p.add_argument("--student", default="lite0@224")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--hard-weight", type=float, default=0.3)
    p.add_argument("--views", type=int, default=4, help="teacher views per training image")
    p.add_argument("--extra", action="append", default=[], help="unlabelled / synthetic folders for the student")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="smoke runs: a subset of train (and of val, test)")
    p.add_argument("--max-steps", type=int, default=None, help="smoke runs: stop each training after this many steps")
    a = p.parse_args()
    small = {"max_train": a.max_train, "max_val": a.max_train, "max_steps": a.max_steps}
    a.out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    times, rows, t0 = {}, {}, time.perf_counter()
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
               "student": a.student, "epochs": a.epochs, "temperature": a.temperature, "hard_weight": a.hard_weight,
               "views": a.views, "extra": a.extra, "test_challenge": rows, "seconds": times}

    def done(name: str, path: Path, key: str, since: float) -> None:
        """Time the phase, evaluate its bundle on test challenge views at once and rewrite the summary, so that a
        run cut off by a time limit keeps everything finished before the cut."""
        times[key] = time.perf_counter() - since
        rows[name] = test_challenge(path, a.data, a.max_train)
        log(f"{name}: test challenge {json.dumps(rows[name])}")
        (a.out / "summary.json").write_text(json.dumps(summary, indent=2))

    teacher = Path(a.teacher) if a.teacher else a.out / "teacher"
    if not a.teacher:
        build(BuildConfig(tiers=a.teacher_tiers, budget=a.teacher_budget, data=a.data, train_epochs=a.epochs, seed=a.seed,
                          work=str(a.out / "teacher-work"), max_train=a.max_train, max_val=a.max_train,
                          max_steps=a.max_steps), teacher, log=log)
    summary["teacher_tiers"] = Bundle.load(teacher).cascade.tier_names
    done("teacher", teacher, "teacher_s", t0)
    t1 = time.perf_counter()
    model, _, size = a.student.partition("@")
    train(TrainConfig(model=model, input_size=int(size) if size else None, eval_size=int(size) if size else None,
                      epochs=a.epochs, data=a.data, seed=a.seed, **small), a.out / "student-labels", log=log)
    done("student_labels", a.out / "student-labels", "labels_s", t1)
    t2 = time.perf_counter()
    distill(DistillConfig(teacher=str(teacher), student=a.student, extra=tuple(a.extra), temperature=a.temperature,
                          hard_weight=a.hard_weight, views=a.views, epochs=a.epochs, data=a.data, seed=a.seed, **small),
            a.out / "student-distilled", log=log)
    done("student_distilled", a.out / "student-distilled", "distill_s", t2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
