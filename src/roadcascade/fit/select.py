"""Which bundle the quickstart ships: its cascade or the stage-1 model the cascade was built from (issue 11).

The cascade's policy is fitted on val challenge views, whose positives are mostly web photos; the product is judged
on real dashcam frames, of which those views hold few. So each candidate is measured on both kinds of data set aside
for selection: val challenge views (what the validator scores) and real dashcam frames (the night-dev roadwork
frames with val's ``camvid``/``gtsdb`` negatives, clean). The rule: among the candidates whose val challenge MCC is
within ``max_dmcc`` of the best candidate's, ship the one with the best real-dashcam MCC; ties go to the earlier
candidate (list the cheaper one first). Without night-dev frames (another data set), the val challenge MCC decides.

``test`` is only reported. Night-dev is then used for a choice between a few bundles, so the shipped bundle's
night-dev recall is a selected number; the hidden set of real dashcam frames judges it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SelectConfig:
    max_dmcc: float = 0.005  # val challenge MCC may be this much below the best candidate's and still be chosen
    split: str = "val"
    data: str | None = None
    night_dev: str | None = None  # default: ../shared/data/night-dev next to the data; None there: val MCC decides
    max_images: int | None = None  # a stratified subset of the split's challenge views (smoke runs)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_dmcc <= 1.0:
            raise ValueError(f"max_dmcc must be in [0, 1], got {self.max_dmcc}")


@dataclass
class Measured:
    label: str
    path: str
    val_challenge_mcc: float
    dashcam_mcc: float = float("nan")  # night-dev + the split's dashcam negatives (nan: no night-dev frames)
    night_dev_recall: float = float("nan")
    dashcam_fpr: float = float("nan")
    mean_gflops: float = float("nan")  # on the val challenge views


@dataclass
class SelectChoice:
    selected: str
    label: str
    candidates: list[dict] = field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def choose_bundle(val_mccs: Sequence[float], dashcam_mccs: Sequence[float], max_dmcc: float) -> int:
    """Index of the candidate to ship: the best dashcam MCC among those within ``max_dmcc`` of the best val MCC
    (a nan dashcam MCC counts as unknown: when any is unknown, the val MCC alone decides). Ties: the earlier."""
    if not val_mccs or len(val_mccs) != len(dashcam_mccs):
        raise ValueError("need one val MCC and one dashcam MCC per candidate, at least one candidate")
    best = max(val_mccs)
    ok = [i for i, m in enumerate(val_mccs) if m >= best - max_dmcc]
    if any(math.isnan(d) for d in dashcam_mccs):
        return max(range(len(val_mccs)), key=lambda i: (val_mccs[i], -i))
    return max(ok, key=lambda i: (dashcam_mccs[i], -i))


def _night_dev(cfg: SelectConfig) -> Path | None:
    from ..bench.realcam import default_night_dev

    nd = Path(cfg.night_dev) if cfg.night_dev else (default_night_dev() if cfg.data is None else None)
    return nd if nd is not None and nd.exists() else None


def _measure_part(b, part: str, cfg: SelectConfig, progress: Progress | None = None) -> dict:
    """One candidate (a loaded Bundle) on one part of the selection data: ``challenge`` (the split's challenge views) or ``dashcam``
    (night-dev frames and the split's dashcam negatives, clean)."""
    from ..bench.evaluate import evaluate_items
    from ..bench.realcam import realcam_report
    from ..io.data import open_dataset
    from ..io.items import make_items, view_seed

    if part == "challenge":
        ds = open_dataset(cfg.data, cfg.split).subset(cfg.max_images)
        rep = evaluate_items(b, make_items(ds, "challenge", view_seed(cfg.split, None)), progress=progress, baselines=False)
        return {"val_challenge_mcc": float(rep["mcc"]), "mean_gflops": float(rep["mean_gflops"])}
    r = realcam_report(b, split=cfg.split, data=cfg.data, night_dev=_night_dev(cfg), progress=progress)
    return {"dashcam_mcc": r["joint"]["mcc"], "night_dev_recall": r["night_dev"]["recall"],
            "dashcam_fpr": r["dashcam_negatives"]["fpr"]}


def measure_all(candidates: Sequence[tuple[str, str | Path]], cfg: SelectConfig, progress: Progress | None = None) -> list[Measured]:
    """Every candidate measured on val challenge views and (with night-dev frames) on real dashcam frames. In this
    process: two spawned 1-thread processes took as long (92 s against 93 s for the quickstart's two candidates)."""
    from ..cascade.bundle import Bundle

    parts = ("challenge", "dashcam") if _night_dev(cfg) is not None else ("challenge",)
    out = []
    for label, p in candidates:
        m = Measured(label, str(p), float("nan"))
        b = Bundle.load(p, device=cfg.device)  # once for all parts
        for part in parts:
            for k, v in _measure_part(b, part, cfg, progress).items():
                setattr(m, k, v)
        out.append(m)
    return out


def select_bundle(candidates: Sequence[tuple[str, str | Path]], cfg: SelectConfig = SelectConfig(), out_json: Path | None = None,
                  log: Callable[[str], None] = print, progress: Progress | None = None) -> SelectChoice:
    """Measure the candidates (label, bundle directory) and return the choice (also written to ``out_json``)."""
    if not candidates:
        raise ValueError("no candidate bundles")
    rows = measure_all(candidates, cfg, progress)
    k = choose_bundle([r.val_challenge_mcc for r in rows], [r.dashcam_mcc for r in rows], cfg.max_dmcc)
    pick = rows[k]
    best_val = max(r.val_challenge_mcc for r in rows)
    if math.isnan(pick.dashcam_mcc):
        reason = f"{pick.label}: best {cfg.split} challenge MCC {pick.val_challenge_mcc:.4f} (no night-dev frames to judge dashcam frames by)"
    else:
        reason = (f"{pick.label}: real-dashcam MCC {pick.dashcam_mcc:.3f} (night-dev recall {pick.night_dev_recall:.3f}, "
                  f"{cfg.split} dashcam FPR {pick.dashcam_fpr:.3f}) with {cfg.split} challenge MCC {pick.val_challenge_mcc:.4f} "
                  f"(best {best_val:.4f}, allowed {cfg.max_dmcc} below); best real-dashcam MCC among those")
    cands = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()} for r in rows]
    choice = SelectChoice(selected=pick.path, label=pick.label, candidates=cands, reason=reason)
    for r in rows:
        log(f"candidate {r.label}: {cfg.split} challenge MCC {r.val_challenge_mcc:.4f}, real-dashcam MCC {r.dashcam_mcc:.3f} "
            f"(night-dev recall {r.night_dev_recall:.3f}, {cfg.split} dashcam FPR {r.dashcam_fpr:.3f}), {r.mean_gflops:.3f} GFLOPs/img")
    log(f"selected {choice.selected}: {reason}")
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(choice.as_dict(), indent=2))
    return choice
