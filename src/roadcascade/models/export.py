"""``roadcascade export``: every classifier tier of a bundle to ONNX (dynamic batch), optionally INT8 (static
quantisation calibrated on ``val`` images, QDQ, per-channel weights), written as a bundle of
:class:`~roadcascade.cascade.onnx_tier.OnnxClassifierTier` tiers, then checked against the PyTorch bundle it came from.

The exits (fusion, folded thresholds, rules) are kept as they are: an exported tier returns the same kind of
logit, so the stacking weights and thresholds fitted on PyTorch logits still apply; the check says how far
the answers moved (largest |dp|, decision agreement).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cascade.bundle import Bundle
from ..cascade.bundle_check import record_hashes, weights_fields
from ..cascade.runtime import ClassifierTier
from ..cascade.onnx_tier import OnnxClassifierTier, tier_inputs

from .export_config import ExportConfig


@dataclass
class TierCheck:
    """One exported tier against its PyTorch source on the check images."""

    name: str
    precision: str
    n: int
    max_abs_dlogit: float
    max_abs_dp: float  # calibrated probability of the tier alone
    agreement: float  # share of images on the same side of the tier's own folded threshold


@dataclass
class ExportReport:
    out: str
    tiers: list[TierCheck] = field(default_factory=list)
    cascade_max_abs_dp: float = float("nan")  # the bundle's folded answer
    cascade_agreement: float = float("nan")
    n_check: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- pieces


def static_same_padding(model: torch.nn.Module, input_size: int) -> torch.nn.Module:
    """A copy of ``model`` whose TF-style "SAME" convolutions (timm's ``Conv2dSame``, in every ``tf_`` EfficientNet)
    pad by a constant amount computed for ``input_size``: the dynamic padding would export as a chain of Shape,
    Ceil and Pad nodes between the convolutions, which the graph optimiser cannot fold and the quantiser cannot fuse."""
    import copy

    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    model = copy.deepcopy(model)
    sizes: dict[str, tuple[int, int]] = {}
    def record(name: str):
        def hook(mod, args) -> None:  # a pre-hook that returns something would replace the input
            sizes[name] = tuple(args[0].shape[-2:])
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, Conv2dSame)]
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in hooks:
        h.remove()
    for name, conv in list(model.named_modules()):
        if name not in sizes:
            continue
        plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                                conv.groups, conv.bias is not None)
        plain.load_state_dict(conv.state_dict())
        pad = pad_same_arg(list(sizes[name]), list(conv.kernel_size), list(conv.stride), list(conv.dilation))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, torch.nn.Sequential(torch.nn.ZeroPad2d(pad), plain))
    return model


def export_onnx(model: torch.nn.Module, input_size: int, path: Path, opset: int = 17) -> Path:
    """The network as ONNX with a dynamic batch axis (input ``image`` N x 3 x S x S, output ``logit`` N x 1).

    The TorchScript exporter (``dynamo=False``): the torch.export-based one needs onnxscript, which is not a
    dependency; in eval mode the TorchScript exporter folds BatchNorm into the convolutions."""
    import warnings

    model = static_same_padding(model.float().cpu().eval().to(memory_format=torch.contiguous_format), input_size)
    x = torch.zeros(2, 3, input_size, input_size)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=["logit"], dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"}},
                          do_constant_folding=True)
    return path


class _Batches:
    """onnxruntime CalibrationDataReader over an (N, 3, S, S) array in batches of 8, with the ``set_range`` and
    ``len`` of a strided reader: the quantiser then collects a few batches at a time and merges their
    histograms, instead of keeping every activation of every input in memory (tens of GB for a 224 px network)."""

    def __init__(self, x: np.ndarray, name: str, batch: int = 8):
        self.x, self.name, self.batch = x, name, batch
        self.lo, self.hi, self.i = 0, len(self), 0

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.lo, self.hi, self.i = start_index, min(end_index, len(self)), start_index

    def get_next(self) -> dict | None:
        if self.i >= self.hi:
            return None
        b = self.x[self.i * self.batch : (self.i + 1) * self.batch]
        self.i += 1
        return {self.name: b}

    def rewind(self) -> None:
        self.i = self.lo


def depthwise_convs(path: Path) -> list[str]:
    """Names of the grouped (depthwise) Conv nodes of an ONNX graph."""
    import onnx

    g = onnx.load(str(path)).graph
    return [n.name for n in g.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def stem_convs(path: Path) -> list[str]:
    """Names of the Conv nodes that read the graph's input (the stem)."""
    import onnx

    g = onnx.load(str(path)).graph
    inputs = {i.name for i in g.input}
    return [n.name for n in g.node if n.op_type == "Conv" and n.input and n.input[0] in inputs]


def head_nodes(path: Path) -> list[str]:
    """Names of the head's weight nodes: the Conv that feeds the last global pool, and every Conv / Gemm / MatMul
    after that pool (the classifier). Empty when the graph has no global pool."""
    import onnx

    nodes = list(onnx.load(str(path)).graph.node)  # ONNX keeps nodes in topological order
    pools = [i for i, n in enumerate(nodes) if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    if not pools:
        return []
    weighted = ("Conv", "Gemm", "MatMul")
    before = [n for n in nodes[:pools[-1]] if n.op_type == "Conv"]
    return ([before[-1].name] if before else []) + [n.name for n in nodes[pools[-1] + 1:] if n.op_type in weighted]


def quantize_int8(fp32: Path, out: Path, calib: np.ndarray, cfg: ExportConfig) -> Path:
    """Static INT8 (QDQ: u8 activations, s8 per-channel symmetric weights) calibrated on ``calib`` inputs.

    The graph is first pre-processed (shape inference, graph optimisation) as onnxruntime's tools advise."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[cfg.calibrate_method]
    reader = _Batches(calib, "image")  # collected one batch at a time (a last, shorter batch cannot join another)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        # on the quickstart stage 1 (val, 582 inputs): all INT8 mean |dlogit| 0.125, stem in fp32 0.093, same speed
        exclude = (depthwise_convs(pre) if cfg.exclude_depthwise else []) + (stem_convs(pre) if cfg.stem_fp32 else []) \
            + (head_nodes(pre) if cfg.head_fp32 else [])
        # onnxruntime's histogram calibrators print a line per collected batch; the export logs its own summary
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
                            reduce_range=cfg.reduce_range, calibrate_method=method, nodes_to_exclude=exclude,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "CalibMovingAverage": False,
                                           "CalibTensorRangeSymmetric": False, "CalibPercentile": cfg.percentile,
                                           "CalibStridedMinMax": 1},
                            calibration_providers=["CPUExecutionProvider"])
    return out


def even_subset(x: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` rows of ``x``, evenly spaced (first and last kept), in order."""
    if len(x) <= n:
        return x
    return x[np.linspace(0, len(x) - 1, n).round().astype(int)]


def val_images(data: str | None, n: int, seed: int, skip: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """n stratified ``val`` images (decoded) and their labels; ``skip`` leaves out the first ``skip`` of the
    same order (the check images are never the calibration images)."""
    from ..io.data import open_dataset

    ds = open_dataset(data, "val")
    ds = ds.subset(min(len(ds), n + skip), seed)
    samples = ds.samples[skip : skip + n]
    return [s.load() for s in samples], np.array([s.label for s in samples], dtype=np.int64)


def with_views(images: Sequence[np.ndarray], size: int, seed: int) -> list[np.ndarray]:
    """Each image clean and as one validator challenge view (what a tier meets in evaluation)."""
    from ..io.challenge import ChallengeConfig, challenge_views

    cfg = ChallengeConfig(size=size)
    out = list(images)
    for i, im in enumerate(images):
        out += challenge_views(im, seed=seed, key=f"export-{i}", n=1, cfg=cfg)
    return out


# ----------------------------------------------------------------------------- the command


def _graph(tier: ClassifierTier, size: int, path: Path, cfg: ExportConfig, calib_imgs: Sequence[np.ndarray],
           log: Callable[[str], None]) -> Path:
    """The tier's network at one input size as ONNX (``path`` + .fp32.onnx / .int8.onnx)."""
    fp32 = export_onnx(tier.model, size, path.with_name(path.name + ".fp32.onnx"), cfg.opset)
    if not cfg.int8:
        return fp32
    t0 = time.perf_counter()
    calib = even_subset(tier_inputs(tier, calib_imgs, size), cfg.calib_max_inputs)
    q = quantize_int8(fp32, path.with_name(path.name + ".int8.onnx"), calib, cfg)
    fp32.unlink()  # the INT8 bundle ships its INT8 graph (and the PyTorch weights), not a third copy
    log(f"{path.name}: INT8 calibrated on {len(calib)} inputs at {size} px ({cfg.calibrate_method}) in "
        f"{time.perf_counter() - t0:.0f} s")
    return q


def _exported_tier(tier: ClassifierTier, cfg_tier: dict, out: Path, cfg: ExportConfig, calib_imgs: Sequence[np.ndarray],
                   log: Callable[[str], None]) -> dict:
    """Write one tier's ONNX (and INT8) graph(s): at its input size, and at its view size when its square views run
    at another (``view_scale``); return its bundle.json entry (the PyTorch entry under ``source``)."""
    stem = cfg_tier["name"]
    onnx_file = _graph(tier, tier.input_size, out / stem, cfg, calib_imgs, log)
    views = {}
    if tier.squares > 1 and tier.view_size != tier.input_size:
        views = {"view_scale": tier.view_scale,
                 "views": {"weights": _graph(tier, tier.view_size, out / f"{stem}.views", cfg, calib_imgs, log).name}}
    return {"kind": OnnxClassifierTier.kind, "name": stem, "model": cfg_tier["model"], "weights": onnx_file.name,
            "precision": "int8" if cfg.int8 else "fp32", "input_size": cfg_tier["input_size"], "mean": cfg_tier["mean"],
            "std": cfg_tier["std"], "gflops": cfg_tier.get("gflops", 0.0), "calibration": cfg_tier["calibration"],
            **({"squares": cfg_tier["squares"]} if "squares" in cfg_tier else {}), **views, "source": dict(cfg_tier)}


def _copy_files(doc: dict, src: Path, out: Path) -> None:
    """Every file the source bundle names (PyTorch weights, other tiers' files) into the new bundle."""
    for _, rel in weights_fields(doc):
        if isinstance(rel, str) and not (out / rel).exists():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, out / rel)


def export_bundle(bundle: str | Path, out: str | Path, cfg: ExportConfig,
                  log: Callable[[str], None] = print) -> ExportReport:
    """Export ``bundle``'s classifier tiers to ``out`` (a new bundle directory), then check it against PyTorch."""
    t0 = time.perf_counter()
    src_dir, out = Path(bundle), Path(out)
    src = Bundle.load(src_dir, device="cpu", backend="torch")
    if src.path and Path(src.path).resolve() == out.resolve():
        raise ValueError("--out must be a new directory, not the bundle being exported")
    doc = json.loads((Path(src.path or src_dir) / "bundle.json").read_text())
    doc = {k: v for k, v in doc.items() if k != "weights_sha256"}
    if not any(t.get("kind") == "classifier" for t in doc["tiers"]):
        raise ValueError(f"{src_dir}: no classifier tier to export (tiers: {[t.get('kind') for t in doc['tiers']]})")
    out.mkdir(parents=True, exist_ok=True)
    calib_imgs: list[np.ndarray] = []
    if cfg.int8:
        imgs, _ = val_images(cfg.data, cfg.calib_images, cfg.seed)
        calib_imgs = with_views(imgs, 224, cfg.seed)
    tiers = []
    for t_cfg, tier in zip(doc["tiers"], src.cascade.tiers):
        if t_cfg.get("kind") == "classifier" and isinstance(tier, ClassifierTier):
            tiers.append(_exported_tier(tier, t_cfg, out, cfg, calib_imgs, log))
        else:
            log(f"{t_cfg.get('name')}: a {t_cfg.get('kind')!r} tier, kept as it is (only classifier tiers are exported)")
            tiers.append(t_cfg)
    _copy_files(doc, Path(src.path or src_dir), out)
    new_doc = {**doc, "tiers": tiers, "export": {"format": "onnx", "int8": cfg.int8, "from": str(src_dir),
                                                  "config": asdict(cfg), "onnxruntime": _ort_version()}}
    _write_doc(new_doc, out)
    report = check_export(src, Bundle.load(out, device="cpu", backend="onnxruntime"), cfg)
    report.seconds = time.perf_counter() - t0
    new_doc["export"]["check"] = report.as_dict()
    _write_doc(new_doc, out)
    return report


def _write_doc(doc: dict, out: Path) -> None:
    doc = record_hashes(doc, out)
    tmp = out / "bundle.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out / "bundle.json")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# ----------------------------------------------------------------------------- the check


def check_export(torch_bundle: Bundle, onnx_bundle: Bundle, cfg: ExportConfig) -> ExportReport:
    """Both bundles on val images that did not calibrate (clean and one challenge view each): per tier the largest
    |d logit|, |dp| and decision agreement at the tier's own threshold; for the bundle, its folded answer."""
    imgs, _ = val_images(cfg.data, cfg.check_images, cfg.seed + 1, skip=cfg.calib_images if cfg.int8 else 0)
    views = with_views(imgs, 224, cfg.seed + 1)
    rep = ExportReport(out=str(onnx_bundle.path), n_check=len(views))
    for a, b in zip(torch_bundle.cascade.tiers, onnx_bundle.cascade.tiers):
        if not isinstance(b, OnnxClassifierTier):
            continue
        za, zb = a.logits(views).astype(np.float64), b.logits(views).astype(np.float64)
        pa, pb = a.calibrator.predict_proba(za), b.calibrator.predict_proba(zb)
        rep.tiers.append(TierCheck(name=b.name, precision=b.precision, n=len(views), max_abs_dlogit=float(np.abs(za - zb).max()),
                                   max_abs_dp=float(np.abs(pa - pb).max()), agreement=float(np.mean((pa > 0.5) == (pb > 0.5)))))
    pa, pb = torch_bundle.cascade.predict_proba(views), onnx_bundle.cascade.predict_proba(views)
    rep.cascade_max_abs_dp = float(np.abs(pa - pb).max())
    rep.cascade_agreement = float(np.mean((pa > 0.5) == (pb > 0.5)))
    return rep
