"""HTML reports: headline metrics, reliability diagram, ROC curve, confusion matrix, per-source table."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def reliability_plot(rep: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = rep["reliability"]
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    conf, freq, cnt = np.array(r["confidence"]), np.array(r["frequency"], dtype=float), np.array(r["count"])
    m = cnt > 0
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
    ax.bar(conf[m], freq[m], width=1 / len(conf), alpha=0.35, edgecolor="k", label="observed")
    ax.plot(conf[m], freq[m], "o-", ms=3)
    ax.set_xlabel("predicted P(roadwork)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Reliability (ECE {rep['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def roc_plot(rep: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    y, p = np.array(rep["_y"]), np.array(rep["_p"])
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    if len(set(y.tolist())) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC (AUROC {rep['auroc']:.4f})")
    return _png(fig)


def confusion_plot(rep: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = rep["confusion"]
    mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.imshow(mat, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(mat[i, j]), ha="center", va="center", fontsize=14, color="black" if mat[i, j] < mat.max() / 2 else "white")
    ax.set_xticks([0, 1], ["none", "roadwork"])
    ax.set_yticks([0, 1], ["none", "roadwork"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion (threshold 0.5)")
    return _png(fig)


def pareto_plot(rep: dict) -> str:
    """MCC vs mean GFLOPs per image: the val frontier with the chosen point, and the test measurements."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = rep["baselines"]
    par = b.get("pareto") or {}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fr = par.get("val_frontier") or []
    if fr:
        g, m = zip(*fr)
        ax.step(g, m, where="post", color="#888", lw=1.2, label="val frontier (out-of-fold)")
        ax.plot(g, m, ".", color="#888", ms=3)
    if par.get("val_chosen"):
        ax.plot(*par["val_chosen"], "*", color="#888", ms=13, mfc="none", label="chosen (val)")
    ax.plot(rep["mean_gflops"], rep["mcc"], "*", color="C3", ms=15, label="cascade (test)")
    fe = b["full_ensemble"]
    ax.plot(fe["mean_gflops"], fe["mcc"], "s", color="C0", ms=8, label="full ensemble (test)")
    for name, s in b.get("singles", {}).items():
        ax.plot(s["mean_gflops"], s["mcc"], "o", color="C2", ms=6)
        ax.annotate(name, (s["mean_gflops"], s["mcc"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    g = b.get("guaranteed")
    if g:
        ax.plot(g["mean_gflops"], g["mcc"], "D", color="C4", ms=7, label=f"guaranteed, eps {g['epsilon']} (test)")
    ax.axvline(0.35 * fe["mean_gflops"], color="C0", ls=":", lw=1, label="35 % of full ensemble")
    if par.get("val_full"):
        ax.plot(*par["val_full"], "s", color="#888", ms=8, mfc="none", label="full ensemble (val)")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("mean GFLOPs per image (log)")
    ax.set_ylabel("MCC")
    ax.set_title("MCC vs compute (singles: green)")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def cascade_html(rep: dict) -> str:
    """The cascade part of a report: Pareto plot, baselines measured in the same run, exits."""
    b = rep["baselines"]
    rows = [("cascade", rep["mcc"], rep["accuracy"], rep["mean_gflops"], "")]
    fe = b["full_ensemble"]
    rows.append(("full ensemble (stacking)", fe["mcc"], fe["accuracy"], fe["mean_gflops"], ", ".join(fe.get("tiers", []))))
    if b.get("full_ensemble_vote"):
        v = b["full_ensemble_vote"]
        rows.append(("full ensemble (weighted vote)", v["mcc"], v["accuracy"], v["mean_gflops"], ""))
    for name, s in b.get("singles", {}).items():
        rows.append((f"single: {name}" + (" (best)" if name == b["best_single"]["name"] else ""), s["mcc"], s["accuracy"],
                     s["mean_gflops"], ""))
    if b.get("guaranteed"):
        g = b["guaranteed"]
        rows.append((f"guaranteed (eps {g['epsilon']}, delta {g['delta']})", g["mcc"], g["accuracy"], g["mean_gflops"],
                     f"disagreement with full ensemble {g['risk']:.4f} per image ({'<=' if g['within_epsilon'] else '>'} eps)"))
    exits = ", ".join(f"{r:.1%}" for r in rep.get("exit_rates", []))
    return (
        "<h3>Cascade vs baselines (same run)</h3>"
        + f'<img alt="Pareto plot" src="data:image/png;base64,{pareto_plot(rep)}">'
        + _table(rows, ["policy", "MCC", "accuracy", "mean GFLOPs", "note"])
        + f"<p>exit rates: {html.escape(exits)}; cascade cost {rep['mean_gflops'] / max(1e-12, fe['mean_gflops']):.1%} of the full"
          f" ensemble; disagreement with it {b.get('cascade_disagreement', float('nan')):.4f}</p>"
    )


def _table(rows: Sequence[Sequence], head: Sequence[str]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}img{margin:4px}
h2{border-bottom:1px solid #ddd;padding-bottom:4px}.plots{display:flex;flex-wrap:wrap;align-items:flex-start}"""


def section(rep: dict, title: str) -> str:
    head = [("n", rep["n"]), ("MCC", rep["mcc"]), ("accuracy", rep["accuracy"]), ("ECE", rep["ece"]),
            ("AUROC", rep["auroc"]), ("reward", rep["reward"]), ("p50 ms", rep["latency_ms"]["p50"]),
            ("p99 ms", rep["latency_ms"]["p99"]), ("images/s", rep["throughput_img_s"])]
    src_rows = [(s, m["n"], m["pos"], m["mcc"], m["accuracy"]) for s, m in rep["per_source"].items()]
    if rep.get("dashcam"):
        d = rep["dashcam"]
        src_rows.append(("dashcam (vtti-workzone+gtsdb+camvid)", d["n"], d["pos"], d["mcc"], d["accuracy"]))
    extra = ""
    if rep.get("extra_html"):
        extra = rep["extra_html"]
    if rep.get("baselines"):
        extra = cascade_html(rep) + extra
    return (
        f"<h2>{html.escape(title)}</h2>"
        f"<p>split <b>{html.escape(str(rep.get('split')))}</b>, views <b>{html.escape(str(rep.get('views')))}</b>"
        f" (seed {rep.get('view_seed')}), device {html.escape(str(rep.get('device')))}</p>"
        + _table([[v for _, v in head]], [k for k, _ in head])
        + '<div class="plots">'
        + "".join(f'<img alt="{a}" src="data:image/png;base64,{f(rep)}">' for a, f in
                  (("reliability diagram", reliability_plot), ("ROC curve", roc_plot), ("confusion matrix", confusion_plot)))
        + "</div>"
        + "<h3>Per source</h3>"
        + _table(src_rows, ["source", "n", "positives", "MCC", "accuracy"])
        + extra
    )


def write_html(reports: Sequence[tuple[str, dict]], out: str | Path, title: str = "roadcascade evaluation", preface: str = "") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(section(r, t) for t, r in reports)
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                   f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{preface}{body}</body></html>")
    return out
