"""A classifier tier run by onnxruntime (an exported fp32 or INT8 ONNX graph), and the choice of backend when a
bundle is loaded.

``roadcascade export`` writes a bundle whose classifier tiers are ``onnx_classifier`` tiers: the ONNX graph in
``weights``, the PyTorch tier it came from under ``source`` (its safetensors still in the bundle). The
preprocessing, square views, pooling and calibration are the ones :class:`~roadcascade.cascade.runtime.ClassifierTier`
uses (the methods are shared, not copied); only the forward pass differs. :func:`select_backend` rewrites a
bundle.json before its tiers are built: ``onnxruntime`` keeps the ONNX tiers (and refuses a bundle with PyTorch
classifier tiers), ``torch`` swaps each ONNX tier back for its source, ``auto`` builds what the bundle names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration import TemperatureCalibrator
from .runtime import ClassifierTier, Tier, register_tier, square_views
from ..models.preprocess import stack_uint8

BACKENDS = ("auto", "torch", "onnxruntime")
BACKEND_ENV = "ROADCASCADE_BACKEND"  # the process-wide default (``serve --backend`` sets it, so reloads keep it)
PRECISIONS = ("fp32", "int8")


def session_options(threads: int | None = None):
    """onnxruntime options: every graph optimisation, as many intra-op threads as torch uses (a fair comparison
    on a shared CPU), one inter-op thread (a tier runs one graph at a time)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no busy-waiting between runs: idle worker threads that spin would take the cores from whatever runs next
    # (the decoder, a PyTorch tier, another engineer's job on a shared CPU)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def load_session(model: str | Path | bytes, threads: int | None = None):
    import onnxruntime as ort

    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=session_options(threads), providers=["CPUExecutionProvider"])


def normalized_nchw(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The model input as a contiguous float32 NCHW array: the same resize as PyTorch tiers (``stack_uint8``),
    the same normalisation arithmetic, without the channels_last layout onnxruntime does not want."""
    x = stack_uint8(images, size).numpy().astype(np.float32)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
    return np.ascontiguousarray((x - m) / s)


def tier_inputs(tier: Any, images: Sequence[np.ndarray], size: int | None = None) -> np.ndarray:
    """What a classifier tier's network sees at ``size`` (default its input size) for these images: calibration
    data for quantisation. With square views, the views run at that size (``ClassifierTier._pooled``: whole square
    images at the input size, the views of a non-square frame at ``view_size``)."""
    size = size or tier.input_size
    if tier.squares > 1:
        views, owner = square_views(images, tier.squares)
        split = np.bincount(owner, minlength=len(images))[owner] > 1
        at_views = size == tier.view_size
        at_input = size == tier.input_size
        views = [v for v, s in zip(views, split) if (s and at_views) or (not s and at_input)] or views
    else:
        views = list(images)
    return normalized_nchw(views, size, tier.mean, tier.std) if views else np.zeros((0, 3, size, size), np.float32)


@register_tier
class OnnxClassifierTier(Tier):
    """A classifier tier whose network runs in onnxruntime (CPU); everything else as ``ClassifierTier``."""

    kind = "onnx_classifier"

    def __init__(self, name: str, model_name: str, session: Any, input_size: int, mean: Sequence[float],
                 std: Sequence[float], calibrator: TemperatureCalibrator, gflops: float, precision: str = "fp32",
                 squares: int = 1, batch_size: int = 64, source: dict | None = None, onnx_file: str | None = None,
                 view_scale: float = 1.0, view_session: Any = None, view_file: str | None = None):
        if not 1 <= int(squares) <= 8:
            raise ValueError(f"squares must be in [1, 8], got {squares}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.name, self.model_name, self.session = name, model_name, session
        self.input_size, self.mean, self.std = int(input_size), tuple(mean), tuple(std)
        self.calibrator, self.gflops, self.precision = calibrator, float(gflops), precision
        self.squares, self.batch_size = int(squares), int(batch_size)
        self.source, self.onnx_file = source, onnx_file
        self.view_scale, self.view_session, self.view_file = float(view_scale), view_session, view_file
        if self.squares > 1 and self.view_size != self.input_size and view_session is None:
            raise ValueError(f"tier {name}: views at {self.view_size} px need their own ONNX graph (export again)")
        self.device = torch.device("cpu")

    # the pooling over square views, the view size, the calibrated output and the decode size are ClassifierTier's
    # own code; only the forward pass (_logits) is onnxruntime's
    logits = ClassifierTier.logits
    _pooled = ClassifierTier._pooled
    view_size = ClassifierTier.view_size
    run = ClassifierTier.run
    decode_size = ClassifierTier.decode_size

    def _logits(self, images: Sequence[np.ndarray], size: int | None = None) -> np.ndarray:
        """The graph is exported for one input size: the input size, or (its second graph) the view size."""
        size = size or self.input_size
        sess = self.session if size == self.input_size else self.view_session
        if sess is None:
            raise ValueError(f"tier {self.name}: no ONNX graph for {size} px inputs")
        name = sess.get_inputs()[0].name
        out = []
        for i in range(0, len(images), self.batch_size):
            x = normalized_nchw(images[i : i + self.batch_size], size, self.mean, self.std)
            out.append(sess.run(None, {name: x})[0].astype(np.float32).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def to_config(self, bundle_dir: Path) -> dict:
        if self.onnx_file is None or not (Path(bundle_dir) / self.onnx_file).exists():
            raise ValueError(f"tier {self.name}: its ONNX file is not in {bundle_dir}; write bundles of ONNX tiers with "
                             "`roadcascade export`")
        return {
            "kind": self.kind, "name": self.name, "model": self.model_name, "weights": self.onnx_file,
            "precision": self.precision, "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
            "gflops": self.gflops, "calibration": self.calibrator.to_dict(),
            **({"squares": self.squares} if self.squares > 1 else {}), **({"source": self.source} if self.source else {}),
            **({"view_scale": self.view_scale, "views": {"weights": self.view_file}} if self.view_file else {}),
        }

    @classmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device: torch.device) -> "OnnxClassifierTier":
        from .bundle_check import check_classifier, LIMITS

        check_classifier(cfg, cfg.get("name", "onnx_classifier"), LIMITS)  # the same ranges as a PyTorch classifier
        path = Path(bundle_dir) / cfg["weights"]
        if not path.exists():
            raise FileNotFoundError(f"bundle ONNX file missing: {path}")
        views = cfg.get("views") if isinstance(cfg.get("views"), dict) else {}
        view_file = views.get("weights")  # the graph at the view size (bundles with view_scale != 1)
        return cls(name=cfg["name"], model_name=cfg["model"], session=load_session(path), input_size=cfg["input_size"],
                   mean=cfg["mean"], std=cfg["std"], calibrator=TemperatureCalibrator.from_dict(cfg["calibration"]),
                   gflops=cfg.get("gflops", 0.0), precision=cfg.get("precision", "fp32"), squares=cfg.get("squares", 1),
                   source=cfg.get("source"), onnx_file=cfg["weights"], view_scale=cfg.get("view_scale", 1.0),
                   view_session=load_session(Path(bundle_dir) / view_file) if view_file else None, view_file=view_file)


def select_backend(doc: dict, backend: str | None = None) -> dict:
    """bundle.json with its tiers set for ``backend`` (None: $ROADCASCADE_BACKEND, else ``auto``)."""
    backend = backend or os.environ.get(BACKEND_ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    tiers = doc.get("tiers")
    if backend == "auto" or not isinstance(tiers, list):
        return doc
    if backend == "onnxruntime":
        torch_tiers = [t.get("name") for t in tiers if isinstance(t, dict) and t.get("kind") == "classifier"]
        if torch_tiers:
            raise ValueError(f"--backend onnxruntime: tier(s) {torch_tiers} of this bundle are PyTorch classifiers; "
                             "export the bundle first: `roadcascade export --bundle B --format onnx [--int8] --out DIR`")
        return doc
    swapped = []
    for t in tiers:  # torch: every ONNX tier back to the PyTorch tier it was exported from
        if isinstance(t, dict) and t.get("kind") == OnnxClassifierTier.kind:
            if not isinstance(t.get("source"), dict):
                raise ValueError(f"--backend torch: ONNX tier {t.get('name')!r} names no PyTorch source tier")
            t = t["source"]
        swapped.append(t)
    return {**doc, "tiers": swapped}
