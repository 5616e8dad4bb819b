"""The bundle: a directory that fully describes a deployable cascade.

``bundle.json`` (format version, tiers with model name, weights file, input size, normalisation,
calibration; exit points with fusion, folded threshold and deferral rule; the data and split it was
fitted on; the metrics it reached; the training config) plus one ``.safetensors`` file per tier.
``serve``, ``eval`` and ``predict`` take only a bundle.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cascade import Cascade
# Every module that registers tier, rule or fusion kinds, so that any bundle loads wherever it is read.
from . import fusion as _fusion, rules as _rules, tta as _tta  # noqa: F401,E402
from .detect import tier as _detector_tier, yolox as _coco_tier  # noqa: F401,E402

FORMAT = "roadcascade.bundle/1"


class BundleError(ValueError):
    """A bundle that cannot be read, with what is wrong."""


@dataclass
class Bundle:
    cascade: Cascade
    meta: dict[str, Any] = field(default_factory=dict)  # data, metrics, train config, policy ...
    path: Path | None = None

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__,
            "python": platform.python_version(),
            **self.cascade.to_config(out),
            **self.meta,
        }
        tmp = out / "bundle.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2, default=_jsonable))
        tmp.replace(out / "bundle.json")
        self.path = out
        return out

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> "Bundle":
        path = Path(path)
        doc_path = path / "bundle.json" if path.is_dir() else path
        if not doc_path.exists():
            raise BundleError(f"no bundle at {path} (expected {doc_path}); train one with `roadcascade train`")
        try:
            doc = json.loads(doc_path.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{doc_path}: not valid JSON ({e})") from e
        if doc.get("format") != FORMAT:
            raise BundleError(f"{doc_path}: format {doc.get('format')!r}, this version reads {FORMAT!r}")
        dev = torch.device(device) if isinstance(device, str) else device
        cascade = Cascade.from_config(doc, doc_path.parent, dev)
        meta = {k: v for k, v in doc.items() if k not in ("tiers", "exits", "format")}
        return cls(cascade=cascade, meta=meta, path=doc_path.parent)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
