"""How a bundle does on real dashcam frames: recall on the night-dev roadwork frames, false positives on
the real dashcam negatives of a split (``camvid`` and ``gtsdb`` label 0), and the MCC of the two together.

Night-dev is for selection and reporting only (never training). Its frames are all roadwork, so alone it
gives recall; paired with the dashcam negatives of ``test`` it gives an MCC on real dashcam frames only,
the closest stand-in here for the hidden set of real dashcam frames that judges the shipped model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..cascade.bundle import Bundle
from ..io.data import Dataset, default_data_root, open_dataset
from .evaluate import evaluate_items, make_items
from ..metrics import DASHCAM_NEGATIVE_SOURCES, summarize

#: real dashcam negatives of StreetWork (the positives of these sources are few: 3 in test)

Progress = Callable[[str, int, int], None]


def default_night_dev() -> Path:
    return default_data_root().parent / "night-dev"


def dashcam_negatives(ds: Dataset) -> Dataset:
    return Dataset(f"{ds.name}:dashcam-neg", [s for s in ds.samples if s.label == 0 and s.source in DASHCAM_NEGATIVE_SOURCES])


def realcam_report(bundle: Bundle, split: str = "test", data: str | None = None, night_dev: str | Path | None = None,
                   progress: Progress | None = None) -> dict:
    """Night-dev recall, dashcam false-positive rate on ``split`` and their joint MCC (clean images)."""
    nd = open_dataset(night_dev or default_night_dev())
    neg = dashcam_negatives(open_dataset(data, split))
    rep_pos = evaluate_items(bundle, make_items(nd, "clean", 0), progress=progress, baselines=False)
    rep_neg = evaluate_items(bundle, make_items(neg, "clean", 0), progress=progress, baselines=False)
    p_pos, p_neg = np.array(rep_pos["_p"]), np.array(rep_neg["_p"])
    y = np.concatenate([np.ones(len(p_pos), np.int64), np.zeros(len(p_neg), np.int64)])
    s = summarize(y, np.concatenate([p_pos, p_neg]))
    return {
        "night_dev": {"n": len(p_pos), "recall": float(np.mean(p_pos > 0.5)), "median_p": float(np.median(p_pos)),
                      "exit_rates": rep_pos["exit_rates"],
                      "missed": [smp.key for smp, p in zip(nd.samples, p_pos) if p <= 0.5]},
        "dashcam_negatives": {"split": split, "n": len(p_neg), "fpr": float(np.mean(p_neg > 0.5)),
                              "exit_rates": rep_neg["exit_rates"],
                              "false_positives": [smp.key for smp, p in zip(neg.samples, p_neg) if p > 0.5]},
        "joint": {"n": s.n, "mcc": s.mcc, "accuracy": s.accuracy, "auroc": s.auroc},
    }


def format_realcam(name: str, r: dict) -> str:
    nd, dn, j = r["night_dev"], r["dashcam_negatives"], r["joint"]
    return (f"{name}: night-dev recall {nd['recall']:.3f} ({round(nd['recall'] * nd['n'])}/{nd['n']}), "
            f"dashcam FPR on {dn['split']} {dn['fpr']:.3f} ({round(dn['fpr'] * dn['n'])}/{dn['n']}), "
            f"joint MCC {j['mcc']:.3f}, AUROC {j['auroc']:.3f}")


def realcam_html(reports: dict[str, dict]) -> str:
    """An HTML table of :func:`realcam_report` results (one row per bundle), for the quickstart report."""
    import html

    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{r['night_dev']['recall']:.3f} ({round(r['night_dev']['recall'] * r['night_dev']['n'])}"
        f"/{r['night_dev']['n']})</td><td>{r['night_dev']['median_p']:.3f}</td>"
        f"<td>{', '.join(f'{x:.2f}' for x in r['night_dev']['exit_rates'])}</td>"
        f"<td>{r['dashcam_negatives']['fpr']:.3f} ({round(r['dashcam_negatives']['fpr'] * r['dashcam_negatives']['n'])}"
        f"/{r['dashcam_negatives']['n']})</td><td>{r['joint']['mcc']:.3f}</td><td>{r['joint']['auroc']:.3f}</td></tr>"
        for name, r in reports.items())
    return ("<h2>Real dashcam frames</h2><p>Night-dev: real night phone-dashcam roadwork frames (selection and reporting "
            "only, never training). Dashcam negatives: camvid and gtsdb label 0 of the test split. Clean images.</p>"
            "<table><tr><th>bundle</th><th>night-dev recall</th><th>median p</th><th>night-dev exit rates per tier</th>"
            f"<th>dashcam FPR</th><th>joint MCC</th><th>joint AUROC</th></tr>{rows}</table>")
