"""``roadcascade build``: from a list of tiers to a fitted cascade bundle.

1. **Tiers.** A spec such as ``lite0@128:runs/qs/stage1,lite0@224,tta(lite0@224,n=4..8)`` names
   classifier tiers ``model@size[#tag][:source bundle]`` (``#tag`` tells apart two tiers of one model and size,
   e.g. two seeds' networks: ``lite0@224#s0:runs/s0,lite0@224#s1:runs/s1``) and test-time-scaling tiers
   ``tta(model@size[#tag][:source][,n=a..b][,views=id|hflip|c85|...])``. Weights come from the source bundle
   (any bundle holding a classifier of that model); a tier without a source reuses the source of
   another tier of the same model (the same network at another input size: GFLOPs scale with pixels),
   and a model with no source anywhere is trained with the stage-1 trainer (cached in the work dir).
2. **Val outputs, once.** Every tier runs on the val challenge views (seed 0, made exactly as ``eval``
   makes them: JPEG q75 bytes, decoded) and the raw logits (and every test-time view's logit) are
   cached as an ``.npz`` in the work dir, keyed by the tiers, their sources and the data.
3. **Fitting on val only.** Per-tier temperature and threshold, the test-time verifier and stopping
   margin, then the policy optimiser (policy.py): fusions and difficulty estimators per exit point,
   the MCC-vs-GFLOPs frontier, the best policy under ``--budget``, and the guaranteed (Learn-then-Test)
   policy. The test split is never read.
4. **Bundle.** The chosen cascade (tiers, exit points) plus, in its metadata, the frontier, the
   chosen point, both policies, the full ensemble (every tier, for the ``baselines`` of ``eval``) and
   the val estimates.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..cascade.bundle import Bundle
from ..cascade.calibration import TemperatureCalibrator, best_threshold, fold
from ..cascade.runtime import Cascade, ClassifierTier, ExitPoint, ImageState
from ..cascade.fusion import WeightedVoteFusion
from ..io.items import Progress
from ..metrics import summarize
from ..cascade.tta import DEFAULT_VIEWS, TTATier, model_logits
from .config import DEFAULT_TIERS, BuildConfig, apply_threads
from .policy import (CascadePolicy, LTTResult, PolicyPoint, TierTable, collect_states, group_means, learn_then_test, replay,
                     table_from_states)


Log = Callable[[str], None]

__all__ = ["TierSpec", "parse_tiers", "BuildConfig", "BuildResult", "build", "baselines_report", "DEFAULT_TIERS"]


# ============================================================================= tier specs


@dataclass(frozen=True)
class TierSpec:
    kind: str  # "classifier" | "tta"
    model: str
    size: int | None  # None: the model's input size
    source: str | None = None
    n_min: int = 4
    n_max: int = 8
    views: tuple[str, ...] | None = None
    tag: str | None = None  # tells apart tiers of one model and size from different bundles (seeds): lite0@224#s1

    @property
    def base_name(self) -> str:
        return f"{self.model}@{self.size}" + (f"#{self.tag}" if self.tag else "")

    @property
    def name(self) -> str:
        if self.kind == "tta":
            return f"tta({self.base_name},n={self.n_min}..{self.n_max})"
        return self.base_name


_ITEM = re.compile(r"^([A-Za-z0-9_.\-]+)(?:@(\d+))?(?:#([A-Za-z0-9_\-]+))?(?::(.+))?$")
_N = re.compile(r"^(\d+)(?:\.\.(\d+))?$")


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in tier spec {text!r}")
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '(' in tier spec {text!r}")
    out.append("".join(cur).strip())
    return [o for o in out if o]


def _classifier_item(text: str) -> tuple[str, int | None, str | None, str | None]:
    """(model, size, tag, source bundle) of ``model@size[#tag][:bundle]``."""
    m = _ITEM.match(text.strip())
    if not m:
        raise ValueError(f"tier {text!r}: expected model@size[#tag][:bundle], e.g. lite0@224:runs/quickstart/stage1")
    return m.group(1), (int(m.group(2)) if m.group(2) else None), m.group(3), m.group(4)


def parse_tiers(text: str) -> list[TierSpec]:
    """Parse a tier list (see the module docstring). Sizes default to the model's input size."""
    from ..models.zoo import get_spec

    from ..open_models.spec import parse_open_item

    specs: list[TierSpec] = []
    for item in _split_top(text):
        if (open_spec := parse_open_item(item)) is not None:  # zeroshot(...), vlm(...): models at local paths
            specs.append(open_spec)  # type: ignore[arg-type]
            continue
        if item.startswith("tta(") and item.endswith(")"):
            parts = _split_top(item[4:-1])
            if not parts:
                raise ValueError(f"tier {item!r}: tta() needs a base tier, e.g. tta(lite0@224,n=4..8)")
            model, size, tag, source = _classifier_item(parts[0])
            n_min, n_max, views = 4, 8, None
            for kv in parts[1:]:
                key, _, val = kv.partition("=")
                key, val = key.strip(), val.strip()
                if key == "n" and (m := _N.match(val)):
                    n_min = int(m.group(1))
                    n_max = int(m.group(2) or m.group(1))
                elif key == "views" and val:
                    views = tuple(v.strip() for v in val.split("|") if v.strip())
                else:
                    raise ValueError(f"tier {item!r}: unknown option {kv!r} (n=a..b, views=id|hflip|c85|...)")
            kind = "tta"
        else:
            model, size, tag, source = _classifier_item(item)
            n_min, n_max, views, kind = 4, 8, None, "classifier"
        try:
            size = size or get_spec(model).input_size
            get_spec(model)
        except KeyError as e:
            raise ValueError(f"tier {item!r}: {e.args[0]}") from None
        specs.append(TierSpec(kind, model, size, source, n_min, n_max, views, tag))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"tier names must be unique; repeated: {', '.join(dup)}")
    if not specs:
        raise ValueError("no tiers given")
    return specs


# ============================================================================= config


@dataclass
class BuildResult:
    bundle: Bundle
    optimizer: CascadePolicy
    chosen: object
    ltt: LTTResult
    table: TierTable
    seconds: float
    work: Path
    trained: list[str] = field(default_factory=list)


# ============================================================================= pieces


def _find_classifier(bundle: Bundle, model: str) -> ClassifierTier:
    for t in bundle.cascade.tiers:
        if isinstance(t, ClassifierTier) and t.model_name == model:
            return t
        if isinstance(t, TTATier) and t.base.model_name == model:
            return t.base
    raise ValueError(f"bundle {bundle.path} holds no classifier of model {model!r} "
                     f"(it has {', '.join(bundle.cascade.tier_names)})")


def _resolve_sources(specs: Sequence[TierSpec], cfg: BuildConfig, work: Path, log: Log, progress: Progress | None) -> tuple[dict, list[str]]:
    """Source bundle path per spec name; models without any source are trained (cached in work)."""
    first: dict[str, str] = {}
    specs = [s for s in specs if s.kind in ("classifier", "tta")]  # open tiers name their local model themselves
    for s in specs:
        if s.source and s.model not in first:
            first[s.model] = s.source
    trained = []
    for model in dict.fromkeys(s.model for s in specs):
        if model in first:
            continue
        out = work / f"train-{model}"
        if not (out / "bundle.json").exists():
            from .train import TrainConfig, train

            size = max(s.size for s in specs if s.model == model)
            tc = TrainConfig(**cfg.run_options(), model=model, input_size=cfg.train_size, eval_size=size, epochs=cfg.train_epochs,
                             batch_size=cfg.train_batch_size, val_split=cfg.val_split, val_views=cfg.n_views,
                             val_seed=cfg.val_seed, max_val=cfg.max_val)
            log(f"training {model} (no weights given) -> {out}")
            train(tc, out, progress=progress, log=log)
            trained.append(model)
        else:
            log(f"reusing trained {model} from {out}")
        first[model] = str(out)
    return {s.name: (s.source or first[s.model]) for s in specs}, trained


def _source_fingerprint(path: str) -> str:
    p = Path(path)
    doc = p / "bundle.json" if p.is_dir() else p
    st = doc.stat()
    return f"{doc.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def _is_open(spec) -> bool:
    from ..open_models.spec import OpenTierSpec

    return isinstance(spec, OpenTierSpec)


@dataclass
class _ValRows:
    """The val challenge views the build fits on (made exactly as ``eval`` makes them), their labels and image ids."""

    ds: object
    items: list
    images: list[np.ndarray]
    y: np.ndarray
    groups: np.ndarray


def _val_items(cfg: BuildConfig, progress: Progress | None) -> _ValRows:
    from ..io.data import open_dataset
    from ..io.items import make_items
    from ..io.images import decode_bytes

    ds = open_dataset(cfg.data, cfg.val_split).subset(cfg.max_val, cfg.seed)
    items = make_items(ds, "challenge", cfg.val_seed, n_views=cfg.n_views, progress=progress)
    images = [decode_bytes(it.payload) for it in items]
    y = np.array([it.label for it in items], dtype=np.int64)
    keys = [it.key.rsplit("#v", 1)[0] for it in items]
    _, groups = np.unique(np.array(keys), return_inverse=True)
    return _ValRows(ds, items, images, y, groups)


def _timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, (time.perf_counter() - t0) * 1e3


def _chunked_logits(tier: ClassifierTier, images, progress: Progress | None, desc: str, chunk: int = 256) -> np.ndarray:
    out = []
    full = getattr(tier, "full_logits", None)  # open-model and detector tiers: every image, whatever their time budget
    for i in range(0, len(images), chunk):
        out.append(full(images[i : i + chunk]) if full else model_logits(tier, images[i : i + chunk]))
        if progress:
            progress(desc, min(i + chunk, len(images)), len(images))
    return np.concatenate(out) if out else np.zeros(0)


class _ValCache:
    """Every tier's val outputs, computed once: logits (``z::name``), every test-time view's logit (``V::name``) and
    ms per image (``ms::name``), in one ``.npz`` of the work dir keyed by the tiers, their sources and the rows."""

    def __init__(self, work: Path, specs: Sequence[TierSpec], sources: dict, cfg: BuildConfig, rows: _ValRows):
        fp = json.dumps({
            "tiers": [(s.name, s.views, s.fingerprint() if _is_open(s) else _source_fingerprint(sources[s.name])) for s in specs],
            "data": rows.ds.name, "split": cfg.val_split, "seed": cfg.val_seed, "views": cfg.n_views,
            "keys": hashlib.sha1("\n".join(it.key for it in rows.items).encode()).hexdigest(),
        }, sort_keys=True)
        self.path = work / f"val-cache-{hashlib.sha1(fp.encode()).hexdigest()[:12]}.npz"
        self.arrays: dict[str, np.ndarray] = dict(np.load(self.path)) if self.path.exists() else {}

    def logits(self, name: str, tier, images: Sequence[np.ndarray], progress: Progress | None) -> np.ndarray:
        if f"z::{name}" not in self.arrays:
            z, ms = _timed(_chunked_logits, tier, images, progress, f"val {name}")
            self.arrays[f"z::{name}"], self.arrays[f"ms::{name}"] = z, np.array(ms / max(1, len(images)))
        return self.arrays[f"z::{name}"]

    def view_logits(self, spec: TierSpec, base: ClassifierTier, base_z: np.ndarray, images: Sequence[np.ndarray],
                    progress: Progress | None, chunk: int = 128) -> np.ndarray:
        """(n, n_max) logits of a test-time tier's views (view 0: the base tier's logit, known)."""
        if f"V::{spec.name}" not in self.arrays:
            rest = TTATier(base, spec.views or DEFAULT_VIEWS, 1, spec.n_max)  # all views, identity known
            V = np.full((len(images), spec.n_max), np.nan)
            V[:, 0] = base_z
            t0 = time.perf_counter()
            for i in range(0, len(images), chunk):
                V[i : i + chunk] = rest.view_logits(images[i : i + chunk], identity=V[i : i + chunk, 0])
                if progress:
                    progress(f"val {spec.name}", min(i + chunk, len(images)), len(images))
            ms = (time.perf_counter() - t0) * 1e3
            self.arrays[f"V::{spec.name}"] = V
            self.arrays[f"ms::{spec.name}"] = np.array(ms / (len(images) * max(1, spec.n_max - 1)))  # per view-image
        return self.arrays[f"V::{spec.name}"]

    def ms(self, name: str) -> float:
        return float(self.arrays[f"ms::{name}"])

    def save(self) -> None:
        np.savez_compressed(self.path, **self.arrays)


@dataclass
class _Fitted:
    """The calibrated tiers by name, the classifier and open tiers' val logits, and ms per image of each tier."""

    tiers: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)
    ms: dict = field(default_factory=dict)


def _networks(specs: Sequence[TierSpec], sources: dict, device) -> dict[tuple[str, str], ClassifierTier]:
    """One network per (source bundle, model), shared by every tier of that model."""
    nets: dict[tuple[str, str], ClassifierTier] = {}
    for s in specs:
        key = (sources[s.name], s.model)
        if not _is_open(s) and key not in nets:
            nets[key] = _find_classifier(Bundle.load(sources[s.name], device=device), s.model)
    return nets


def _classifier(net: ClassifierTier, name: str, model: str, size: int, device, batch_size: int) -> ClassifierTier:
    """A classifier tier ``name`` of ``net``'s weights at ``size`` (uncalibrated)."""
    from ..models.zoo import gflops as zoo_gflops

    return ClassifierTier(name=name, model_name=model, model=net.model, input_size=size, mean=net.mean, std=net.std,
                          calibrator=TemperatureCalibrator(), gflops=zoo_gflops(model, size), device=device,
                          batch_size=batch_size, squares=net.squares, view_scale=net.view_scale)


def _fit_tiers(specs: Sequence[TierSpec], sources: dict, cfg: BuildConfig, rows: _ValRows, cache: _ValCache, device,
               progress: Progress | None) -> _Fitted:
    """Every tier (and every test-time tier's base) fitted on val: temperature and threshold; for test-time tiers
    also the verifier and stopping margin. Classifiers first, then open-model tiers, then test-time tiers."""
    from ..open_models.spec import make_tier

    nets, fit = _networks(specs, sources, device), _Fitted()

    def add(name: str, tier, z: np.ndarray) -> None:
        tier.calibrator.fit(z, rows.y)
        fit.tiers[name], fit.logits[name], fit.ms[name] = tier, z, cache.ms(name)

    for s in specs:
        need = [s] if s.kind == "classifier" else []
        if s.kind == "tta" and s.base_name not in fit.tiers:
            need.append(TierSpec("classifier", s.model, s.size, s.source, tag=s.tag))
        for c in need:
            if c.name not in fit.tiers:
                t = _classifier(nets[(sources[s.name], c.model)], c.name, c.model, c.size, device, cfg.batch_size)
                add(c.name, t, cache.logits(c.name, t, rows.images, progress))
    for s in filter(_is_open, specs):  # zero-shot, VLM: models at local paths
        t = make_tier(s, device, cfg.batch_size)
        add(s.name, t, cache.logits(s.name, t, rows.images, progress))
    for s in (s for s in specs if s.kind == "tta"):
        base = fit.tiers[s.base_name]
        t = TTATier(base, s.views or DEFAULT_VIEWS, s.n_min, s.n_max, name=s.name)
        t.fit(cache.view_logits(s, base, fit.logits[s.base_name], rows.images, progress), rows.y, rows.groups,
              folds=cfg.folds, seed=cfg.seed)
        fit.tiers[s.name], fit.ms[s.name] = t, cache.ms(s.name)
    cache.save()
    return fit


def _tier_table(names: list[str], fit: _Fitted, rows: _ValRows) -> TierTable:
    """The table the optimiser sees: per row and tier the logit, probability, GFLOPs and ms (out-of-fold outputs of
    the test-time tiers, whose reuse of their base tier's logit is a saving where the base ran first)."""
    n, T = len(rows.y), len(names)
    L, P, G, M = (np.zeros((n, T)) for _ in range(4))
    feats: list[np.ndarray | None] = [None] * T
    src = np.full(T, -1)
    saving, saving_ms = np.zeros((n, T)), np.zeros((n, T))
    for j, nm in enumerate(names):
        t = fit.tiers[nm]
        if isinstance(t, TTATier):
            o = t.oof_
            L[:, j], P[:, j], G[:, j], feats[j] = o.logits, o.prob, o.gflops, o.features
            M[:, j] = o.gflops * (fit.ms[nm] / max(1e-12, t.view_gflops[0]))
            if t.base.name in names:
                src[j] = names.index(t.base.name)
                saving[:, j] = t.view_gflops[0]
                saving_ms[:, j] = fit.ms[t.base.name]
        else:
            z = fit.logits[nm]
            L[:, j], P[:, j], G[:, j], M[:, j] = z, t.calibrator.calibrated(z), t.gflops, fit.ms[nm]
    return TierTable(names, L, P, G, M, [_tier_threshold(fit.tiers[nm]) for nm in names], rows.y, rows.groups, feats, src,
                     saving, saving_ms)


def _optimizer_options(cfg: BuildConfig) -> dict:
    return dict(rules=cfg.rules, fusion=cfg.fusion, orders=cfg.orders, max_tiers=cfg.max_tiers, grid=cfg.grid,
                folds=cfg.folds, mcc_slack=cfg.mcc_slack)


def _fit_policies(cfg: BuildConfig, table: TierTable, log: Log) -> tuple[CascadePolicy, PolicyPoint, LTTResult]:
    """The policy optimiser (the best policy under the budget) and the guaranteed (Learn-then-Test) policy."""
    opt_kw = _optimizer_options(cfg)
    opt = CascadePolicy(seed=cfg.seed, **opt_kw).fit(table)
    chosen = opt.select(cfg.budget)
    ltt = learn_then_test(table, cfg.epsilon, cfg.delta, cfg.cal_fraction, cfg.seed, cfg.pvalue, **opt_kw)
    log(f"full ensemble (val, out-of-fold): MCC {opt.full_.mcc:.4f} at {opt.full_.gflops:.3f} GFLOPs/img; "
        f"best single {opt.best_single_.names[0]} MCC {opt.best_single_.mcc:.4f} at {opt.best_single_.gflops:.3f}")
    log(f"chosen ({cfg.budget}): {chosen.describe()}  MCC {chosen.mcc:.4f} at {chosen.gflops:.3f} GFLOPs/img "
        f"({chosen.gflops / max(1e-12, opt.full_.gflops):.0%} of the full ensemble)")
    log(f"guaranteed (eps {cfg.epsilon}, delta {cfg.delta}): {ltt.point.describe()}  cal disagreement {ltt.risk_cal:.4f} "
        f"(p {ltt.p_value:.3g}, {ltt.n_cal} images), {ltt.point.gflops:.3f} GFLOPs/img")
    return opt, chosen, ltt


def _deployed(cfg: BuildConfig, opt: CascadePolicy, chosen: PolicyPoint, ltt: LTTResult, tiers: dict, table: TierTable,
              out: Path) -> tuple[Cascade, dict]:
    """The cascade of the mode's policy, and the config of its full ensemble (every tier; with the weighted vote)
    for the ``baselines`` of ``eval``; fitted on the rows its policy was fitted on."""
    def cascade_of(seq, exits) -> Cascade:
        return Cascade([tiers[table.names[t]] for t in seq], list(exits))

    if cfg.mode == "mcc":
        cascade = cascade_of(chosen.tiers, opt.exits_for(chosen))
        ensemble = cascade_of(opt.full_sequence_, opt.ensemble_exits())
        rows, full = np.arange(table.n), list(opt.full_sequence_)
    else:
        cascade = cascade_of(ltt.point.tiers, ltt.exits)
        ensemble = cascade_of(ltt.reference_tiers, ltt.reference_exits)
        rows, full = ltt.fit_rows, list(ltt.reference_tiers)
    L, P = table.logits[np.ix_(rows, full)], table.probs[np.ix_(rows, full)]
    vote = WeightedVoteFusion().fit(L, P, table.y[rows])
    vote_thr = best_threshold(vote.prob(L, P), table.y[rows])
    out.mkdir(parents=True, exist_ok=True)
    ens_cfg = ensemble.to_config(out)
    ens_cfg["vote"] = {"fusion": vote.to_config(), "threshold": float(vote_thr)}
    return cascade, ens_cfg


def _listed(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _policy_meta(cfg: BuildConfig, opt: CascadePolicy, chosen: PolicyPoint, point: PolicyPoint) -> dict:
    return {
        "mode": cfg.mode,
        "budget": cfg.budget,
        "chosen": point.as_dict(),
        "mcc_policy": chosen.as_dict(),
        "full_ensemble": opt.full_.as_dict(),
        "best_single": opt.best_single_.as_dict(),
        "singles": [p.as_dict() for p in opt.singles_],
        "frontier": [p.as_dict() for p in opt.frontier_],
        "fusion_comparison": opt.fusion_comparison(),
        "n_policies_evaluated": int(len(opt.mcc_)),
        "optimizer": {**_listed(_optimizer_options(cfg)), "seed": cfg.seed},
    }


def _guaranteed_meta(ltt: LTTResult, names: list[str]) -> dict:
    return {
        **ltt.as_dict(),
        "tiers": [names[t] for t in ltt.point.tiers],
        "exits": [e.to_config() for e in ltt.exits],
        "reference": {"tiers": [names[t] for t in ltt.reference_tiers], "exits": [e.to_config() for e in ltt.reference_exits]},
        "fit": "half of the val images (fusions, estimators, thresholds, path); p-values on the other half",
    }


def _spec_meta(s, source: str) -> dict:
    return {"name": s.name, "kind": s.kind, "model": s.model, "size": s.size, "source": source,
            **({"options": dict(s.options)} if _is_open(s) else {}),
            **({"n": [s.n_min, s.n_max], "views": list(s.views or DEFAULT_VIEWS)} if s.kind == "tta" else {})}


# ============================================================================= build


def build(cfg: BuildConfig, out: str | Path, progress: Progress | None = None, log: Log = print) -> BuildResult:
    """Build a cascade bundle (see the module docstring). Fits on val only."""
    from ..models.preprocess import pick_device

    t_start = time.perf_counter()
    if cfg.mode not in ("mcc", "guaranteed"):
        raise ValueError(f"mode must be mcc or guaranteed, not {cfg.mode!r}")
    apply_threads(cfg)
    out = Path(out)
    work = Path(cfg.work) if cfg.work else out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    specs = parse_tiers(cfg.tiers)
    sources, trained = _resolve_sources(specs, cfg, work, log, progress)
    sources.update({s.name: s.source for s in specs if _is_open(s)})

    rows = _val_items(cfg, progress)
    log(f"val: {rows.ds.name}, {len(rows.ds)} images x {cfg.n_views} challenge views (seed {cfg.val_seed}) = {len(rows.items)} rows")
    cache = _ValCache(work, specs, sources, cfg, rows)
    if cache.arrays:
        log(f"val outputs from cache {cache.path}")
    fit = _fit_tiers(specs, sources, cfg, rows, cache, device, progress)
    table = _tier_table([s.name for s in specs], fit, rows)
    table.save(work / "val-table.npz")

    opt, chosen, ltt = _fit_policies(cfg, table, log)
    cascade, ens_cfg = _deployed(cfg, opt, chosen, ltt, fit.tiers, table, out)
    point = chosen if cfg.mode == "mcc" else ltt.point
    seconds = time.perf_counter() - t_start
    meta = {
        "kind": "cascade",
        "data": {"dataset": str(cfg.data or "default StreetWork"), "fit_split": cfg.val_split, "views": "challenge",
                 "n_views": cfg.n_views, "val_seed": cfg.val_seed, "n_images": len(rows.ds), "n_rows": table.n,
                 "estimates": "out-of-fold on val (grouped by image)"},
        "policy": _policy_meta(cfg, opt, chosen, point),
        "guaranteed": _guaranteed_meta(ltt, table.names),
        "ensemble": ens_cfg,
        "tier_specs": [_spec_meta(s, sources[s.name]) for s in specs],
        "metrics": {"val": {"cascade": point.as_dict(), "full_ensemble": opt.full_.as_dict(),
                            "best_single": opt.best_single_.as_dict()}},
        "build": {**_listed(asdict(cfg)), "seconds": seconds, "device": str(device), "cache": str(cache.path),
                  "work": str(work), "trained": trained, "val_ms_per_image": fit.ms},
    }
    bundle = Bundle(cascade, meta)
    bundle.save(out)
    log(f"cascade bundle written to {out} in {seconds:.0f} s")
    return BuildResult(bundle, opt, point, ltt, table, seconds, work, trained)


# ============================================================================= eval baselines


def _tier_threshold(tier) -> float:
    if isinstance(tier, TTATier):
        return float(tier.calibrator_.threshold_)
    return float(tier.calibrator.threshold_)


def _metrics(y: np.ndarray, prob: np.ndarray, gflops: float, ms: float | None = None) -> dict:
    s = summarize(y, prob)
    d = {"mcc": s.mcc, "accuracy": s.accuracy, "mean_gflops": float(gflops), "reward": s.reward}
    if ms is not None:
        d["mean_ms"] = float(ms)
    return d


def baselines_report(bundle: Bundle, items, cascade_prob: np.ndarray, batch_size: int = 32,
                     progress: Progress | None = None) -> dict:
    """Measured in the same run as the cascade: every tier alone (``singles``, ``best_single``), every tier
    on every image (``full_ensemble``, stacking; ``full_ensemble_vote``, weighted voting), the cascade's
    disagreement with the full ensemble, and the guaranteed policy replayed on the same outputs."""
    from ..io.images import decode_bytes

    meta = bundle.meta
    dev = next((t.device for t in bundle.cascade.tiers if hasattr(t, "device")), None)
    ens = Cascade.from_config(meta["ensemble"], bundle.path, dev)
    states: list[ImageState] = []
    busy = 0.0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        t0 = time.perf_counter()
        states += collect_states(ens, [decode_bytes(it.payload) for it in chunk])
        busy += time.perf_counter() - t0
        if progress:
            progress("full ensemble", min(i + batch_size, len(items)), len(items))
    y = np.array([it.label for it in items], dtype=np.int64)
    keys = np.array([it.key.rsplit("#v", 1)[0] for it in items])
    _, groups = np.unique(keys, return_inverse=True)
    names = ens.tier_names
    reuse = {t.name: (t.base.name, float(t.view_gflops[0])) for t in ens.tiers if isinstance(t, TTATier) and t.reuse}
    table = table_from_states(states, names, [_tier_threshold(t) for t in ens.tiers], y, groups, reuse)

    singles = {}
    for j, t in enumerate(ens.tiers):
        singles[t.name] = _metrics(y, fold(table.probs[:, j], _tier_threshold(t)), table.gflops[:, j].mean())
    best = max(singles, key=lambda k: (singles[k]["mcc"], -singles[k]["mean_gflops"]))
    full_prob = np.array([s.probability for s in states])
    full_gf = float(np.mean([sum(s.trace.gflops.values()) for s in states]))
    out: dict = {
        "singles": singles,
        "best_single": {"name": best, **singles[best], "selected_on": "test (the strictest single baseline)"},
        "full_ensemble": {"tiers": names, **_metrics(y, full_prob, full_gf, busy * 1e3 / max(1, len(items)))},
    }
    vcfg = meta["ensemble"].get("vote")
    if vcfg:
        vote = WeightedVoteFusion.from_config(vcfg["fusion"])
        out["full_ensemble_vote"] = _metrics(y, fold(vote.prob(table.logits, table.probs), vcfg["threshold"]), full_gf)
    cp = np.asarray(cascade_prob, dtype=np.float64)
    out["cascade_disagreement"] = float(np.mean((cp > 0.5) != (full_prob > 0.5)))
    g = meta.get("guaranteed")
    if g and g.get("exits"):
        idx = {nm: j for j, nm in enumerate(names)}
        seq = [idx[nm] for nm in g["tiers"]]
        ref_seq = [idx[nm] for nm in g["reference"]["tiers"]]
        r = replay([ExitPoint.from_config(e) for e in g["exits"]], seq, table)
        ref = replay([ExitPoint.from_config(e) for e in g["reference"]["exits"]], ref_seq, table)
        loss = group_means(r.pred != ref.pred, groups)
        out["guaranteed"] = {
            "policy": g["policy"]["describe"], "epsilon": g["epsilon"], "delta": g["delta"],
            "disagreement": float(np.mean(r.pred != ref.pred)),  # per view
            "risk": float(loss.mean()),  # per image (mean over its views): the quantity LTT bounds
            "within_epsilon": bool(loss.mean() <= g["epsilon"]),
            "n_images": int(len(loss)),
            **_metrics(y, r.prob, float(r.gflops.mean())),
        }
    pol = meta.get("policy") or {}
    out["pareto"] = {
        "val_frontier": [(p["mean_gflops"], p["mcc"]) for p in pol.get("frontier", [])],
        "val_chosen": (pol["chosen"]["mean_gflops"], pol["chosen"]["mcc"]) if pol.get("chosen") else None,
        "val_full": (pol["full_ensemble"]["mean_gflops"], pol["full_ensemble"]["mcc"]) if pol.get("full_ensemble") else None,
    }
    return out


# ============================================================================= quickstart helpers


def adopt_stage1(bundle_dir: Path, stage1_dir: Path, log: Log = print) -> None:
    """An earlier quickstart left its stage-1 bundle at ``bundle_dir``: copy it to ``stage1_dir`` (the
    cascade takes ``bundle_dir``'s place)."""
    import shutil

    doc = Path(bundle_dir) / "bundle.json"
    if (Path(stage1_dir) / "bundle.json").exists() or not doc.exists():
        return
    if json.loads(doc.read_text()).get("kind") == "cascade":
        return
    shutil.copytree(bundle_dir, stage1_dir)
    log(f"stage-1 bundle {bundle_dir} copied to {stage1_dir}")


def quickstart_tiers(stage1_dir: Path) -> str:
    """The quickstart's tiers: the stage-1 network at about half its input size (a third to a quarter of the
    compute) in front of itself at its input size (224 for the default recipe: lite0@128 -> lite0@224).

    Test-time views (``tta(...)``) are left out here to keep the quickstart within 15 minutes on 2 CPU cores;
    ``roadcascade build`` takes them (and stronger tiers) when compute allows."""
    doc = json.loads((Path(stage1_dir) / "bundle.json").read_text())
    tier = doc["tiers"][0]
    size = int(tier.get("input_size", 224))
    small = max(64, 32 * round(size * 0.57 / 32))
    model = tier.get("model_name") or tier.get("model") or "lite0"
    return f"{model}@{small}:{stage1_dir},{model}@{size}:{stage1_dir}"


def quickstart_cascade(stage1_dir: Path, out: Path, data: str | None = None, device: str = "auto", budget: str = BuildConfig.budget,
                       progress: Progress | None = None, log: Log = print) -> Path:
    """Build the quickstart cascade from the stage-1 bundle unless an up-to-date one is there."""
    tiers = quickstart_tiers(stage1_dir)
    doc = Path(out) / "bundle.json"
    if doc.exists():
        meta = json.loads(doc.read_text())
        b = meta.get("build") or {}
        fresh = doc.stat().st_mtime >= (Path(stage1_dir) / "bundle.json").stat().st_mtime
        if meta.get("kind") == "cascade" and b.get("tiers") == tiers and b.get("budget") == budget and fresh:
            log(f"using cached cascade {out}")
            return Path(out)
    log(f"[bold]building[/bold] cascade {tiers} (budget {budget}) -> {out}")
    build(BuildConfig(tiers=tiers, budget=budget, data=data, device=device), out, progress=progress, log=log)
    return Path(out)
