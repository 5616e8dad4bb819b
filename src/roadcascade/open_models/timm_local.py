"""Any timm backbone from local weights, as a zoo model (``train``, ``build``, ``eval``, ``serve`` and the GPU
path then take it like the built-ins).

A local model is a timm architecture plus a local weights source:

- a Hugging Face snapshot folder in timm's format (``config.json`` with ``architecture`` and
  ``pretrained_cfg``, plus ``model.safetensors`` / ``pytorch_model.bin``), read with timm's own
  ``load_model_config_from_path``; a hub cache folder ``models--org--name`` is followed to its snapshot;
- a single ``.safetensors`` / ``.pth`` file in timm's key names, with the architecture named by the user.

Input size, mean and std come from the checkpoint's ``pretrained_cfg`` (a bare file: timm's default
pretrained config of the architecture), unless overridden. Interpolation and crop are recorded too, but the
project's pipeline squashes the whole image to a square (nothing at the edges is cropped away, see
``preprocess.py``) and the backbone is fine-tuned that way, so they are kept for reference only.

Models are registered by :func:`register_local_timm`, or listed in a JSON file named by
``$ROADCASCADE_MODELS`` (``{"name": "/path"}`` or ``{"name": {"path": ..., "arch": ..., "input_size": ...}}``)
and registered when a name is first asked for. A bundle records each local model it uses
(:func:`bundle_section`) so it loads anywhere without that file (its fine-tuned weights are inside it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from ..models import zoo
from .local import LocalSource, ModelSourceError

__all__ = ["LocalTimm", "MODELS_ENV", "bundle_section", "local_timm", "read_local_timm", "register_from_bundle",
           "register_local_timm", "resolve_snapshot"]

MODELS_ENV = "ROADCASCADE_MODELS"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


@dataclass(frozen=True)
class LocalTimm:
    """A timm backbone from local weights: what the zoo spec is built from, and what a bundle records."""

    name: str
    arch: str
    weights: str  # the weights file
    num_classes: int  # classifier width stored in the file (0: none)
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    source: LocalSource | None = None  # the file or folder given, with its SHA-256
    model_args: dict = field(default_factory=dict)

    def spec(self, with_weights: bool = True) -> zoo.ModelSpec:
        w = (zoo.WeightSource(kind="path", path=self.weights, mapping="identity", num_classes=self.num_classes)
             if with_weights else zoo.WeightSource(kind="none"))
        return zoo.ModelSpec(name=self.name, arch=self.arch, weights=w, input_size=self.input_size, mean=self.mean,
                             std=self.std, feature_dim=_feature_dim(self.arch), license="user-supplied",
                             description=f"timm {self.arch} from local weights {self.source.path if self.source else self.weights}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["source"] = self.source.to_dict() if self.source else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LocalTimm":
        d = dict(d)
        src = d.pop("source", None)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d, source=LocalSource.from_dict(src) if src else None)


_LOCAL: dict[str, LocalTimm] = {}


def _feature_dim(arch: str) -> int:
    with torch.device("meta"):
        return int(timm.create_model(arch, pretrained=False, num_classes=0).num_features)


def resolve_snapshot(path: Path) -> Path:
    """A hub cache folder (``models--org--name``) -> its snapshot folder (refs/main, else the only one)."""
    snaps = path / "snapshots"
    if not snaps.is_dir():
        return path
    ref = path / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
        return snaps / ref.read_text().strip()
    found = [p for p in snaps.iterdir() if p.is_dir()]
    if len(found) != 1:
        raise ModelSourceError(f"{path}: {len(found)} snapshots and no refs/main; point at one snapshots/<hash> folder")
    return found[0]


def _classifier_width(arch: str, weights: Path, classifier: str | None) -> int:
    """Width of the classifier stored in a bare weights file (0 when it has none)."""
    sd = zoo._read_state_dict(weights)
    key = f"{classifier}.weight" if classifier else None
    return int(sd[key].shape[0]) if key and key in sd else 0


def _check_model_args(name: str, arch: str, model_args: dict) -> None:
    """timm's save_for_hf writes the constructor arguments of the saved model; a bundle rebuilds the bare
    architecture, so any argument other than the classifier width must equal the architecture's default."""
    try:
        from timm.models._input import get_model_args
    except ImportError:  # timm before 1.0.20 cannot say; the strict state-dict load still refuses a mismatched shape
        return
    if not model_args:
        return
    with torch.device("meta"):
        default = get_model_args(timm.create_model(arch, pretrained=False))
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - JSON has lists where timm has tuples
    odd = sorted(k for k, v in model_args.items() if k != "num_classes" and norm(v) != norm(default.get(k, v if k == "in_chans" and v == 3 else object())))
    if odd:
        raise ValueError(f"model {name!r}: config.json builds {arch} with non-default {', '.join(f'{k}={model_args[k]!r}' for k in odd)}; "
                         "models built with extra constructor arguments are not supported (a bundle rebuilds the bare architecture)")


def read_local_timm(name: str, path: str | Path, arch: str | None = None, input_size: int | None = None,
                    mean=None, std=None) -> LocalTimm:
    """Describe a local timm checkpoint (file or snapshot folder); overrides win over its pretrained config."""
    given = Path(path).expanduser()
    if not given.exists():
        raise ModelSourceError(f"model {name!r}: local weights not found: {given} (nothing is ever downloaded)")
    folder = resolve_snapshot(given) if given.is_dir() else None
    model_args: dict = {}
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise ModelSourceError(f"model {name!r}: {folder} has no timm config.json (architecture + pretrained_cfg)")
        from timm.models._hub import load_model_config_from_path

        pcfg, cfg_arch, model_args = load_model_config_from_path(folder)
        weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
        if weights is None:
            raise ModelSourceError(f"model {name!r}: {folder} holds none of {', '.join(WEIGHT_FILES)}")
        arch = arch or cfg_arch
        n_cls = int(pcfg.get("num_classes", 0) or 0)
    else:
        if not arch:
            raise ValueError(f"model {name!r}: a bare weights file ({given.name}) needs the timm architecture (arch=...)")
        weights = given
        pcfg = dict(timm.models.get_pretrained_cfg(arch).to_dict()) if timm.models.get_pretrained_cfg(arch) else {}
        n_cls = _classifier_width(arch, weights, pcfg.get("classifier"))
    if not timm.is_model(arch):
        raise ValueError(f"model {name!r}: {arch!r} is not a timm architecture")
    _check_model_args(name, arch, model_args)
    return LocalTimm(
        name=name, arch=arch, weights=str(weights.resolve()), num_classes=n_cls,
        input_size=int(input_size or pcfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(float(x) for x in (mean or pcfg.get("mean", zoo.IMAGENET_MEAN))),
        std=tuple(float(x) for x in (std or pcfg.get("std", zoo.IMAGENET_STD))),
        interpolation=str(pcfg.get("interpolation", "bicubic")), crop_pct=float(pcfg.get("crop_pct", 1.0) or 1.0),
        source=LocalSource.of(given), model_args={},
    )


def register_local_timm(name: str, path: str | Path, arch: str | None = None, **overrides) -> LocalTimm:
    """Register a local timm checkpoint as zoo model ``name`` (see :func:`read_local_timm`)."""
    m = read_local_timm(name, path, arch, **overrides)
    old = zoo._REGISTRY.get(name)
    if old is not None and old != m.spec():
        if name not in _LOCAL:
            raise ValueError(f"model name {name!r} is taken by a built-in zoo model; choose another")
        zoo._REGISTRY.pop(name)  # re-pointing a local name at other weights is allowed
    zoo.register(m.spec())
    _LOCAL[name] = m
    return m


def local_timm(name: str) -> LocalTimm | None:
    """The local model registered as ``name``, if any."""
    return _LOCAL.get(name)


def _models_file() -> dict[str, Any]:
    f = os.environ.get(MODELS_ENV)
    if not f:
        return {}
    p = Path(f).expanduser()
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"${MODELS_ENV}={p}: cannot read a JSON object of local models ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"${MODELS_ENV}={p}: expected a JSON object name -> path or {{path, arch, ...}}")
    return doc


def _resolve(name: str) -> zoo.ModelSpec | None:
    entry = _models_file().get(name)
    if entry is None:
        return None
    entry = {"path": entry} if isinstance(entry, str) else dict(entry)
    m = read_local_timm(name, entry.pop("path"), entry.pop("arch", None), **entry)
    _LOCAL[name] = m
    return m.spec()


zoo.add_resolver(_resolve)


# --------------------------------------------------------------------------------------------- bundles


def _model_names(v: Any):
    if isinstance(v, dict):
        if isinstance(v.get("model"), str):
            yield v["model"]
        for x in v.values():
            yield from _model_names(x)
    elif isinstance(v, list):
        for x in v:
            yield from _model_names(x)


def bundle_section(doc: dict) -> dict[str, dict]:
    """``{name: LocalTimm as dict}`` for every local model named anywhere in a bundle document."""
    return {n: _LOCAL[n].to_dict() for n in dict.fromkeys(_model_names(doc)) if n in _LOCAL}


def register_from_bundle(section: Any) -> None:
    """Make the local models a bundle records known to the zoo (architecture and preprocessing only: the
    fine-tuned weights are in the bundle, so the original checkpoint need not be on this machine)."""
    if not section:
        return
    if not isinstance(section, dict):
        raise ValueError("bundle.json: local_models must be an object name -> model")
    for name, d in section.items():
        m = LocalTimm.from_dict(d)
        have = zoo._REGISTRY.get(name)
        if have is None:
            zoo.register(m.spec(with_weights=False))
            _LOCAL.setdefault(name, m)
        elif (have.arch, have.input_size, tuple(have.mean), tuple(have.std)) != (m.arch, m.input_size, m.mean, m.std):
            raise ValueError(f"bundle.json: local model {name!r} is {m.arch} but this process has {name!r} as {have.arch} "
                             f"(input {have.input_size}); rename one of them")
