"""Which form of a bundle to ship on the CPU: the PyTorch fp32 bundle, its fp32 ONNX export or its INT8 ONNX
export (issue 16).

The quickstart exports its cascade to ONNX, fp32 and INT8 (every classifier tier; INT8 calibrated on ``val``),
guards the INT8 export again when the original was guarded (its logits move a little, and the full-frame
thresholds are read off them; the fp32 export answers as PyTorch does and keeps the original's thresholds),
then runs all forms on the same ``val`` challenge views, taking turns chunk by chunk (``bench.onnx.bench_backends``:
the load of a shared CPU falls on all alike). It ships the form with the
best MCC per CPU-millisecond among those whose val MCC is within ``max_dmcc`` of the reference's: a form
that is faster but decides worse is not a cheaper way to the same answer.

Everything here is chosen on ``val``; ``test`` is only reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

Progress = Callable[[str, int, int], None]

ONNX_FORMS = {"onnx-fp32": False, "onnx-int8": True}  # label -> INT8?; written to bundle-onnx / bundle-int8


@dataclass(frozen=True)
class ShipConfig:
    max_dmcc: float = 0.005  # a faster form ships only with val MCC >= the reference's - this
    split: str = "val"
    views: str = "challenge"
    max_images: int | None = None  # a stratified subset of the split (smoke runs)
    threads: int = 1  # the CPU a single-threaded miner process has: the ratio that matters there
    data: str | None = None
    forms: tuple[str, ...] = ("onnx-fp32", "onnx-int8")  # the ONNX forms tried beside fp32 PyTorch (ONNX_FORMS)
    calib_images: int = 96  # val images that calibrate the INT8 ranges (ExportConfig's default)
    check_images: int = 48  # other val images for the export's check against PyTorch

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_dmcc <= 1.0:
            raise ValueError(f"max_dmcc must be in [0, 1], got {self.max_dmcc}")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        bad = [f for f in self.forms if f not in ONNX_FORMS]
        if bad:
            raise ValueError(f"unknown forms {bad}; choose from {', '.join(ONNX_FORMS)}")


@dataclass
class ShipChoice:
    shipped: str  # the bundle directory to use
    label: str
    rows: list[dict] = field(default_factory=list)  # bench_backends rows, the reference first
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def mcc_per_ms(mcc: float, img_s: float) -> float:
    """MCC bought per CPU-millisecond of one image (img/s / 1000 = images per ms)."""
    return mcc * img_s / 1e3 if img_s > 0 else float("-inf")


def choose(mccs: Sequence[float], img_s: Sequence[float], max_dmcc: float) -> int:
    """Index of the form to ship: the best MCC per ms among those within ``max_dmcc`` of form 0 (the reference,
    always eligible). Ties go to the earlier form."""
    if not mccs or len(mccs) != len(img_s):
        raise ValueError("need one MCC and one speed per form, at least one form")
    ok = [i for i, m in enumerate(mccs) if i == 0 or m >= mccs[0] - max_dmcc]
    return max(ok, key=lambda i: (mcc_per_ms(mccs[i], img_s[i]), -i))


def form_dir(root: Path, label: str) -> Path:
    """Where form ``label`` is written under ``root``."""
    return root / ("bundle-int8" if ONNX_FORMS[label] else "bundle-onnx")


def clear_exports(root: Path) -> None:
    """Remove what an earlier ship step left under ``root`` (every form's export and ``shipped.json``): exports of
    an older bundle must never be taken for this one's."""
    import shutil

    for label in ONNX_FORMS:
        shutil.rmtree(form_dir(root, label), ignore_errors=True)
    (root / "shipped.json").unlink(missing_ok=True)


def export_form(bundle: Path, label: str, root: Path, cfg: ShipConfig, guard, log: Callable[[str], None]) -> Path:
    """``bundle`` exported as ONNX form ``label`` to :func:`form_dir`. With ``guard`` (a GuardConfig), an INT8 export
    is guarded again on its own outputs; an fp32 export keeps the source's guard thresholds (its outputs equal
    PyTorch's to about 1e-6, so the guard's check finds it guarded and computes nothing)."""
    from ..models.export import ExportConfig, export_bundle
    from .guard import guard_bundle

    if label not in ONNX_FORMS:
        raise ValueError(f"unknown form {label!r}; one of {', '.join(ONNX_FORMS)}")
    int8 = ONNX_FORMS[label]
    out = form_dir(root, label)
    rep = export_bundle(bundle, out, ExportConfig(int8=int8, data=cfg.data, calib_images=cfg.calib_images,
                                                 check_images=cfg.check_images), log=log)
    log(f"{label} export {out}: val agreement {rep.cascade_agreement:.2%}, max |dp| {rep.cascade_max_abs_dp:.3f}")
    if guard is not None:
        guard_bundle(out, guard, device="cpu", log=log, refit=int8)
    return out


def ship_cpu_form(bundle: str | Path, root: str | Path, cfg: ShipConfig = ShipConfig(), guard=None,
                  log: Callable[[str], None] = print, progress: Progress | None = None) -> ShipChoice:
    """Export ``bundle`` in each of ``cfg.forms`` under ``root``, measure them and the fp32 PyTorch bundle on
    ``cfg.split`` in turns, and return the choice (also written to ``root/shipped.json``)."""
    import torch

    from ..bench.onnx import bench_backends
    from ..cascade.bundle import Bundle
    from ..io.data import open_dataset
    from ..io.items import make_items, view_seed

    bundle, root = Path(bundle), Path(root)
    clear_exports(root)
    forms = [("torch-fp32", bundle, "torch")] + [(f, export_form(bundle, f, root, cfg, guard, log), "onnxruntime")
                                                  for f in cfg.forms]
    old = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        loaded = [(label, Bundle.load(path, device="cpu", backend=be)) for label, path, be in forms]
        ds = open_dataset(cfg.data, cfg.split).subset(cfg.max_images)
        items = make_items(ds, cfg.views, view_seed(cfg.split, None), progress=progress)
        rows = bench_backends(loaded, items, progress=progress)
    finally:
        torch.set_num_threads(old)
    k = choose([r.mcc for r in rows], [r.img_s for r in rows], cfg.max_dmcc)
    ref, pick = rows[0], rows[k]
    reason = (f"{pick.label}: val {cfg.views} MCC {pick.mcc:.4f} at {pick.img_s:.1f} img/s ({pick.speedup:.2f}x, {cfg.threads} thread)"
              f" against {ref.label} MCC {ref.mcc:.4f}; best MCC per CPU-ms within {cfg.max_dmcc} MCC of the reference")
    choice = ShipChoice(shipped=str(forms[k][1]), label=pick.label, rows=[r.as_dict() for r in rows], reason=reason)
    (root / "shipped.json").write_text(json.dumps(choice.as_dict(), indent=2))
    log(f"ships {choice.shipped}: {reason}")
    return choice
