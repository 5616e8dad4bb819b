"""The bundle: a directory that fully describes a deployable cascade.

``bundle.json`` (format version, tiers with model name, weights file, input size, normalisation,
calibration; exit points with fusion, folded threshold and deferral rule; the data and split it was
fitted on; the metrics it reached; the training config) plus one ``.safetensors`` file per tier.
``serve``, ``eval`` and ``predict`` take only a bundle.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .runtime import Cascade
from . import kinds as _kinds  # noqa: F401,E402  (every tier, rule and fusion kind: any bundle loads wherever it is read)
from ..open_models import timm_local as _timm_local  # noqa: E402  (local timm backbones: bundle section)
from . import onnx_tier as _onnx_tier  # noqa: E402  (select_backend; its tier kind is listed in kinds.py)

FORMAT = "roadcascade.bundle/1"


from .bundle_check import LIMITS, BundleError, check_doc, check_files, parse_json, read_regular, record_hashes, regular_file

__all__ = ["FORMAT", "Bundle", "BundleError"]


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
            **{k: v for k, v in self.meta.items() if k != "weights_sha256"},
        }
        if local := _timm_local.bundle_section(doc):  # local timm backbones: architecture + preprocessing
            doc["local_models"] = local
        doc = record_hashes(doc, out)  # SHA-256 of every weights file, checked at load
        tmp = out / "bundle.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2, default=_jsonable))
        tmp.replace(out / "bundle.json")
        self.path = out
        return out

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None, backend: str | None = None) -> "Bundle":
        """Load and check a bundle: schema and ranges of bundle.json, files confined to the bundle directory,
        weights hashes where recorded. Any problem is a :class:`BundleError` naming the field or file.
        ``backend`` (auto | torch | onnxruntime; None: $ROADCASCADE_BACKEND): see ``onnx_tier.select_backend``."""
        path = Path(path)
        root, name = (path, "bundle.json") if path.is_dir() else (path.parent, path.name)
        if not (root / name).exists() and not (root / name).is_symlink():
            raise BundleError(f"no bundle at {path} (expected {root / name}); train one with `roadcascade train`")
        doc = parse_json(read_regular(regular_file(root, name, name, LIMITS.max_json_bytes), name, LIMITS.max_json_bytes))
        from .runtime import FUSIONS, RULES, TIERS

        try:
            doc = _onnx_tier.select_backend(doc, backend)
        except ValueError as e:
            raise BundleError(str(e)) from None
        check_doc(doc, FORMAT, set(TIERS), set(RULES), set(FUSIONS))
        check_files(doc, root)
        try:
            _timm_local.register_from_bundle(doc.get("local_models"))
        except (ValueError, TypeError, KeyError) as e:
            raise BundleError(f"bundle.json: local_models: {e}") from None
        dev = torch.device(device) if isinstance(device, str) else device
        cascade = _build_cascade(doc, Path(os.path.realpath(root)), dev)
        meta = {k: v for k, v in doc.items() if k not in ("tiers", "exits", "format")}
        return cls(cascade=cascade, meta=meta, path=root)


def _build_cascade(doc: dict, root: Path, device: torch.device | None) -> Cascade:
    """The cascade of a checked bundle.json; a failure inside a tier's loader (a tensor of the wrong shape, a model
    name the zoo does not know, a corrupt weights file) is a BundleError naming the tier."""
    try:
        return Cascade.from_config(doc, root, device)
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one BundleError
        which = ", ".join(repr(t.get("name")) for t in doc["tiers"])
        raise BundleError(f"bundle.json: the cascade ({which}) could not be built: {type(e).__name__}: {str(e)[:300]}") from e


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
