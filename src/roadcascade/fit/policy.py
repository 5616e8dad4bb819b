"""The policy optimiser: which tiers, in which order, with which deferral rules and thresholds.

Input: every candidate tier's outputs on val (challenge views), computed once and cached
(:class:`TierTable`). Output: the MCC-vs-compute Pareto frontier over policies, the policy that
maximises MCC under a compute budget (mean GFLOPs per image, or estimated ms), and, in guaranteed
mode, the cheapest policy whose disagreement with the full ensemble is at most ``epsilon`` with
probability at least ``1 - delta`` (Learn-then-Test with fixed-sequence testing).

A **policy** is a sequence of tiers; after tier ``k`` runs, exit point ``k`` fuses tiers ``0..k`` (a
fusion fitted for that prefix), folds its MCC-optimal threshold to 0.5, and a rule with one
threshold decides who stops (rules.py: ``stop iff score >= threshold``); the last exit stops everyone.
The **full ensemble** runs every tier on every image (all tiers in cost order, the same fusion).

How the search goes (:class:`CascadePolicy`):

1. For every prefix of every candidate sequence, the fusion and the difficulty estimator are fitted
   out-of-fold on val (grouped K-fold: the views of one image stay in one fold), so the scores the
   search sees are honest estimates, not in-sample fits. The exit threshold is MCC-optimal on the
   out-of-fold fused probability.
2. Thresholds are searched on a grid of stop shares per exit (denser near "stop almost everyone").
   Per-image outcomes (tp, fp, tn, fn, disagreement with the full ensemble, cumulative cost) are
   summed with one matrix product per choice of the earlier exits, so every combination of rules and
   thresholds of a sequence is evaluated exactly, not sampled.
3. The frontier keeps the points no other point beats on both MCC and cost (:func:`pareto_front`).

The deployed models are refitted on all of val; ``exits_for(point)`` builds the cascade's exit points.

Guaranteed mode (:func:`learn_then_test`): val images are split into a fitting half and a
calibration half. Everything (fusions, estimators, thresholds, the reference full ensemble, and a
path of candidate policies from the full ensemble down in cost, see ``CascadePolicy.risk_path``)
is fitted on the first half. Each candidate's per-image disagreement
with the reference (mean over an image's views, a loss in [0, 1]) is measured on the calibration
half and turned into a p-value for "risk > epsilon" (Hoeffding-Bentkus; the exact binomial tail when
losses are 0/1). Fixed-sequence testing walks the path (safest first: estimated disagreement ascending, cost descending) and stops at
the first p-value above ``delta``; every policy before that is certified, with family-wise error at most ``delta``; the
cheapest certified policy is returned. Exchangeability of images is all it assumes.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cascade.calibration import best_threshold, fold
from ..cascade.runtime import Cascade, ExitPoint, ImageState, Tier, TierOutput, state_arrays
from ..cascade.decision import decide
from ..cascade.fusion import make_fusion, out_of_fold
from ..cascade.rules import SEARCHABLE_RULES, DifficultyEstimator, FinalRule, difficulty_features, family_rules, make_rule, rule_score

__all__ = [
    "TierTable",
    "PolicyPoint",
    "CascadePolicy",
    "LTTResult",
    "learn_then_test",
    "pareto_front",
    "mcc_counts",
    "hoeffding_pvalue",
    "bentkus_pvalue",
    "hb_pvalue",
    "binomial_pvalue",
    "fixed_sequence_select",
    "group_means",
    "parse_budget",
    "replay",
    "ReplayResult",
    "CachedTier",
    "collect_states",
    "table_from_states",
]


# ============================================================================= pure mathematics


def mcc_counts(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Vectorised MCC; 0 where a marginal is empty (as metrics.mcc_from_counts)."""
    tp, fp, tn, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (tp * tn - fp * fn) / np.sqrt(den)
    return np.where(den > 0, m, 0.0)


def pareto_front(cost: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats: lowest cost for their score, highest score for their
    cost. Returned in increasing cost, with strictly increasing score (ties: the first such index)."""
    cost = np.asarray(cost, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    if len(cost) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(len(cost)), -score, cost))  # by cost, then best score first
    keep, best = [], -np.inf
    for i in order:
        if score[i] > best:
            keep.append(i)
            best = score[i]
    return np.asarray(keep, dtype=np.int64)


def _kl_bernoulli(a: float, b: float) -> float:
    a = min(max(a, 0.0), 1.0)
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def hoeffding_pvalue(risk_hat: float, n: int, epsilon: float) -> float:
    """Hoeffding (KL form) p-value for H0: risk > epsilon, from the mean of n losses in [0, 1]."""
    if n <= 0:
        return 1.0
    return float(math.exp(-n * _kl_bernoulli(min(risk_hat, epsilon), epsilon)))


def bentkus_pvalue(risk_hat: float, n: int, epsilon: float) -> float:
    """Bentkus p-value: e * P(Binomial(n, epsilon) <= ceil(n * risk_hat)), losses in [0, 1]."""
    from scipy.stats import binom

    if n <= 0:
        return 1.0
    k = math.ceil(n * risk_hat - 1e-9)
    return float(min(1.0, math.e * binom.cdf(k, n, epsilon)))


def hb_pvalue(risk_hat: float, n: int, epsilon: float) -> float:
    """Hoeffding-Bentkus p-value (Bates et al. 2021): the smaller of the two; valid for losses in [0, 1]."""
    return min(hoeffding_pvalue(risk_hat, n, epsilon), bentkus_pvalue(risk_hat, n, epsilon))


def binomial_pvalue(risk_hat: float, n: int, epsilon: float) -> float:
    """Exact binomial tail P(Binomial(n, epsilon) <= n * risk_hat): valid for 0/1 losses."""
    from scipy.stats import binom

    if n <= 0:
        return 1.0
    return float(binom.cdf(int(round(n * risk_hat)), n, epsilon))


PVALUES = {"hb": hb_pvalue, "binomial": binomial_pvalue, "hoeffding": hoeffding_pvalue, "bentkus": bentkus_pvalue}


def fixed_sequence_select(losses: np.ndarray, order: Sequence[int], epsilon: float, delta: float,
                          method: str = "hb") -> tuple[int | None, list[float], int]:
    """Fixed-sequence testing over candidates in a data-independent ``order`` (safest first).

    losses: (n, m), one row per exchangeable unit (an image), one column per candidate, each in [0, 1].
    Tests H_j: risk_j > epsilon in order with p-values ``method`` and stops at the first p > delta.
    Returns (the last candidate rejected, i.e. certified, or None; the p-values computed; how many
    candidates were certified). FWER <= delta, so P(risk of the returned candidate > epsilon) <= delta."""
    losses = np.asarray(losses, dtype=np.float64)
    n = losses.shape[0]
    pfun = PVALUES[method]
    pvals: list[float] = []
    chosen: int | None = None
    for j in order:
        p = pfun(float(losses[:, j].mean()) if n else 1.0, n, epsilon)
        pvals.append(p)
        if p > delta:
            break
        chosen = int(j)
    certified = len(pvals) - (1 if pvals and pvals[-1] > delta else 0)
    return chosen, pvals, certified


def group_means(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean of values per group (groups sorted by label)."""
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    s = np.bincount(inv, weights=np.asarray(values, dtype=np.float64))
    c = np.bincount(inv)
    return s / c


_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(%|x|gflops|ms)?\s*$", re.IGNORECASE)


def parse_budget(text: str | float, full_gflops: float | None = None) -> tuple[str, float]:
    """``"35%"`` or ``"0.35x"``: share of the full ensemble's mean GFLOPs; ``"2.5"``/``"2.5gflops"``:
    mean GFLOPs per image; ``"12ms"``: mean ms per image (estimated from val timings, device-specific).
    Returns ("gflops" | "ms", value)."""
    if isinstance(text, (int, float)):
        return "gflops", float(text)
    m = _BUDGET.match(str(text))
    if not m:
        raise ValueError(f"budget {text!r}: use e.g. 35%, 0.35x, 2.5 (GFLOPs), 2.5gflops or 12ms")
    v, unit = float(m.group(1)), (m.group(2) or "gflops").lower()
    if unit in ("%", "x"):
        if full_gflops is None:
            raise ValueError("a relative budget needs the full ensemble's cost")
        return "gflops", (v / 100 if unit == "%" else v) * full_gflops
    return unit, v


# ============================================================================= cached tier outputs


@dataclass
class TierTable:
    """Every candidate tier's outputs on the same n images (val challenge views), computed once.

    gflops / ms: (n, T) per-image cost of running the tier alone; a tier t with ``reuse_src[t] = s``
    saves ``saving[:, t]`` GFLOPs (and ``saving_ms``) on images where tier s ran before it (test-time
    scaling reusing its base tier's logit). thresholds: each tier's own decision threshold on its
    calibrated probability. groups: image id of each row (views of one image share it)."""

    names: list[str]
    logits: np.ndarray
    probs: np.ndarray
    gflops: np.ndarray
    ms: np.ndarray
    thresholds: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    features: list[np.ndarray | None] = field(default_factory=list)
    reuse_src: np.ndarray | None = None
    saving: np.ndarray | None = None
    saving_ms: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, T = np.asarray(self.logits).shape
        self.logits = np.asarray(self.logits, dtype=np.float64)
        self.probs = np.asarray(self.probs, dtype=np.float64)
        self.gflops = np.broadcast_to(np.asarray(self.gflops, dtype=np.float64), (n, T)).copy()
        self.ms = np.broadcast_to(np.asarray(self.ms, dtype=np.float64), (n, T)).copy()
        self.thresholds = np.asarray(self.thresholds, dtype=np.float64)
        self.y = np.asarray(self.y).astype(np.int64)
        self.groups = np.asarray(self.groups)
        if not self.features:
            self.features = [None] * T
        if self.reuse_src is None:
            self.reuse_src = np.full(T, -1, dtype=np.int64)
        self.reuse_src = np.asarray(self.reuse_src, dtype=np.int64)
        self.saving = np.zeros((n, T)) if self.saving is None else np.asarray(self.saving, dtype=np.float64)
        self.saving_ms = np.zeros((n, T)) if self.saving_ms is None else np.asarray(self.saving_ms, dtype=np.float64)
        if len(self.names) != T or self.probs.shape != (n, T) or len(self.y) != n or len(self.groups) != n:
            raise ValueError("TierTable: names, logits, probs, y and groups disagree in size")
        if len(set(self.names)) != T:
            raise ValueError(f"TierTable: tier names must be unique, got {self.names}")

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def n_tiers(self) -> int:
        return len(self.names)

    def subset(self, rows: np.ndarray) -> "TierTable":
        rows = np.asarray(rows)
        return TierTable(
            list(self.names), self.logits[rows], self.probs[rows], self.gflops[rows], self.ms[rows], self.thresholds,
            self.y[rows], self.groups[rows], [None if f is None else f[rows] for f in self.features],
            self.reuse_src.copy(), self.saving[rows], self.saving_ms[rows],
        )

    def standalone_gflops(self) -> np.ndarray:
        return self.gflops.mean(axis=0)

    def costs(self, seq: Sequence[int], unit: str = "gflops") -> np.ndarray:
        """(L, n) cumulative per-image cost after each tier of the sequence (with reuse savings)."""
        c = self.gflops if unit == "gflops" else self.ms
        sv = self.saving if unit == "gflops" else self.saving_ms
        out, cum = [], np.zeros(self.n)
        for j, t in enumerate(seq):
            ct = c[:, t] - (sv[:, t] if self.reuse_src[t] in seq[:j] else 0.0)
            cum = cum + ct
            out.append(cum)
        return np.stack(out)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "names": np.array(self.names), "logits": self.logits, "probs": self.probs, "gflops": self.gflops,
            "ms": self.ms, "thresholds": self.thresholds, "y": self.y, "groups": self.groups,
            "reuse_src": self.reuse_src, "saving": self.saving, "saving_ms": self.saving_ms,
        }
        for t, f in enumerate(self.features):
            if f is not None:
                arrays[f"features_{t}"] = f
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TierTable":
        z = np.load(path, allow_pickle=False)
        T = len(z["names"])
        feats = [z[f"features_{t}"] if f"features_{t}" in z.files else None for t in range(T)]
        return cls([str(s) for s in z["names"]], z["logits"], z["probs"], z["gflops"], z["ms"], z["thresholds"], z["y"],
                   z["groups"], feats, z["reuse_src"], z["saving"], z["saving_ms"])


# ============================================================================= policies


@dataclass
class PolicyPoint:
    """One policy and what it reached on the data it was evaluated on."""

    tiers: tuple[int, ...]
    names: tuple[str, ...]
    rules: tuple[tuple[str, float], ...]  # per non-final exit: (rule kind, score threshold)
    fusion: str
    mcc: float
    accuracy: float
    disagreement: float  # share of images whose decision differs from the full ensemble's
    gflops: float
    ms: float
    exit_rates: tuple[float, ...] = ()

    def describe(self) -> str:
        parts = []
        for k, name in enumerate(self.names):
            parts.append(name)
            if k < len(self.rules):
                kind, thr = self.rules[k]
                parts.append(f"[{kind} {thr:+.3g}]" if kind != "never" else "[all]")
        return " -> ".join(parts)

    def as_dict(self) -> dict:
        return {
            "tiers": list(self.names),
            "rules": [{"kind": k, "threshold": (None if not np.isfinite(t) else float(t))} for k, t in self.rules],
            "fusion": self.fusion,
            "mcc": float(self.mcc),
            "accuracy": float(self.accuracy),
            "disagreement": float(self.disagreement),
            "mean_gflops": float(self.gflops),
            "mean_ms": float(self.ms),
            "exit_rates": [float(r) for r in self.exit_rates],
            "describe": self.describe(),
        }


@dataclass
class _Exit:
    """What the search needs at one exit point (a prefix of tiers), fitted on the optimiser's table."""

    prefix: tuple[int, ...]
    oof_prob: np.ndarray
    threshold: float
    decision: np.ndarray
    folded: np.ndarray
    scores: dict[str, np.ndarray]
    fusion: object = None  # deployed fusion (fitted on all rows)
    deploy_threshold: float = 0.5
    estimator: DifficultyEstimator | None = None


class _ExitModels:
    """The fusion, threshold, decisions and rule scores of every exit point (a prefix of tiers) on one table: out of
    fold for the search (memoised), refitted on all rows for the bundle."""

    def __init__(self, table: TierTable, fusion: str, rules: Sequence[str], folds: int, seed: int, l2: float):
        self.table, self.fusion, self.rules, self.folds, self.seed, self.l2 = table, fusion, tuple(rules), folds, seed, l2
        self._exits: dict[tuple[int, ...], _Exit] = {}

    def oof(self, prefix: tuple[int, ...]) -> _Exit:
        """Out-of-fold fusion, threshold, decisions and rule scores of one exit point (memoised)."""
        if prefix in self._exits:
            return self._exits[prefix]
        tb = self.table
        P = list(prefix)
        L, Pr, y = tb.logits[:, P], tb.probs[:, P], tb.y

        def fp(train, test):
            return make_fusion(self.fusion).fit(L[train], Pr[train], y[train]).prob(L[test], Pr[test])

        oof = out_of_fold(fp, tb.n, tb.groups, self.folds, self.seed)
        thr = best_threshold(oof, y)
        folded = fold(oof, thr)
        decision = folded > 0.5
        scores: dict[str, np.ndarray] = {}
        feats = [tb.features[t] for t in P]
        if "difficulty" in self.rules:
            X = difficulty_features(folded, L, Pr, feats)
            wrong = (decision != (y == 1)).astype(np.float64)

            def dp(train, test):
                return DifficultyEstimator(self.l2).fit(X[train], wrong[train]).predict_proba(X[test])

            risk = out_of_fold(dp, tb.n, tb.groups, self.folds, self.seed + 1)
            scores["difficulty"] = rule_score("difficulty", folded, risk=risk)
        for kind in self.rules:
            if kind != "difficulty":
                scores[kind] = rule_score(kind, folded, Pr, tb.thresholds[P])
        ex = _Exit(prefix, oof, thr, decision, folded, scores)
        self._exits[prefix] = ex
        return ex

    def deployed(self, prefix: tuple[int, ...]) -> _Exit:
        """The exit point refitted on all rows (what goes into the bundle)."""
        ex = self.oof(prefix)
        if ex.fusion is None:
            tb = self.table
            P = list(prefix)
            L, Pr, y = tb.logits[:, P], tb.probs[:, P], tb.y
            ex.fusion = make_fusion(self.fusion).fit(L, Pr, y)
            fused = ex.fusion.prob(L, Pr)
            ex.deploy_threshold = best_threshold(fused, y)
            folded = fold(fused, ex.deploy_threshold)
            X = difficulty_features(folded, L, Pr, [tb.features[t] for t in P])
            ex.estimator = DifficultyEstimator(self.l2).fit(X, ((folded > 0.5) != (y == 1)).astype(np.float64))
        return ex


class _ThresholdSearch:
    """Every combination of rule choices (kind and threshold per non-final exit) of a sequence, evaluated exactly:
    per-image outcomes are summed with one matrix product per choice of the earlier exits."""

    def __init__(self, models: _ExitModels, reference: np.ndarray, rules: Sequence[str], grid: int, max_leaves: int):
        self.models, self.reference, self.rules, self.grid, self.max_leaves = models, reference, tuple(rules), grid, max_leaves

    def options(self, ex: _Exit, grid: int) -> list[tuple[str, float, np.ndarray]]:
        """Rule choices at one exit: (kind, threshold, stop mask), duplicates removed; 'never' first."""
        n = len(ex.decision)
        opts = [("never", math.inf, np.zeros(n, dtype=bool))]
        seen = {np.zeros(n, dtype=bool).tobytes()}
        shares = 1.0 - np.geomspace(0.02, 0.9, max(1, grid))
        for kind in self.rules:
            s = ex.scores.get(kind)
            if s is None:
                continue
            if kind == "agreement" and len(ex.prefix) < 2:
                continue
            desc = np.sort(s)[::-1]
            for q in shares:
                thr = float(desc[max(0, min(n - 1, int(math.ceil(q * n)) - 1))])
                if not np.isfinite(thr):
                    continue
                mask = s >= thr
                key = mask.tobytes()
                if key in seen or mask.all():
                    continue
                seen.add(key)
                opts.append((kind, thr, mask))
        return opts

    def outcomes(self, seq: tuple[int, ...]) -> list[np.ndarray]:
        """Per exit k: (n, 7) per-image outcomes if the image exits there: tp, fp, tn, fn, disagreement,
        cumulative GFLOPs, cumulative ms."""
        tb = self.models.table
        y = tb.y == 1
        cg, cm = tb.costs(seq, "gflops"), tb.costs(seq, "ms")
        out = []
        for k in range(len(seq)):
            d = self.models.oof(seq[: k + 1]).decision
            out.append(np.column_stack([d & y, d & ~y, ~d & ~y, ~d & y, d != self.reference, cg[k], cm[k]]).astype(np.float64))
        return out

    def run(self, seq: tuple[int, ...]):
        """(seq, options per non-final exit, (m, L-1) option index per combination, (m, 7) summed outcomes)."""
        L = len(seq)
        V = self.outcomes(seq)
        n = self.models.table.n
        if L == 1:
            return seq, [], np.zeros((1, 0), dtype=np.int64), V[0].sum(axis=0)[None, :]
        exits = [self.models.oof(seq[: k + 1]) for k in range(L - 1)]
        grid = self.grid
        if L > 2:  # thin the grid of the earlier exits so that the combinations stay under max_leaves
            per = max(2.0, self.max_leaves ** (1.0 / (L - 2)))
            grid = max(2, min(self.grid, int(per // max(1, len(self.rules)))))
        opts = [self.options(ex, grid if k < L - 2 else self.grid) for k, ex in enumerate(exits)]
        last = np.stack([m for _, _, m in opts[L - 2]]).astype(np.float64)  # (O, n)
        choices, values = [], []

        def rec(k: int, alive: np.ndarray, pre: np.ndarray, chosen: list[int]) -> None:
            if k == L - 2:
                stop = last * alive
                cont = alive - stop
                tot = pre + stop @ V[k] + cont @ V[L - 1]
                values.append(tot)
                c = np.empty((len(last), L - 1), dtype=np.int64)
                c[:, : L - 2] = chosen
                c[:, L - 2] = np.arange(len(last))
                choices.append(c)
                return
            for oi, (_, _, m) in enumerate(opts[k]):
                st = alive * m
                rec(k + 1, alive - st, pre + st @ V[k], chosen + [oi])

        rec(0, np.ones(n), np.zeros(V[0].shape[1]), [])
        return seq, opts, np.concatenate(choices), np.concatenate(values)


def _mcc_of(pred: np.ndarray, y: np.ndarray) -> float:
    """MCC of boolean decisions against boolean labels."""
    return float(mcc_counts((pred & y).sum(), (pred & ~y).sum(), (~pred & ~y).sum(), (~pred & y).sum()))


class CascadePolicy:
    """The policy optimiser (sklearn-shaped: the constructor stores settings, ``fit`` returns self).

    rules: rule kinds searched at each non-final exit (``SEARCHABLE_RULES``); fusion: ``stacking`` or
    ``vote``; orders: ``cost`` (subsets in increasing standalone cost), ``given`` (subsets in the table's
    order) or ``all`` (every ordered subset); grid: stop shares tried per rule and exit; folds: grouped
    folds for out-of-fold fits (< 2: in-sample); max_leaves: cap on the threshold combinations per
    sequence (the grid thins for long sequences); mcc_slack: at selection, prefer the policy closest to
    the full ensemble among those within this much MCC of the best under the budget."""

    def __init__(self, rules: Sequence[str] = SEARCHABLE_RULES, fusion: str = "stacking", orders: str = "cost",
                 max_tiers: int | None = None, grid: int = 16, folds: int = 5, seed: int = 0, l2: float = 1.0,
                 max_leaves: int = 4000, mcc_slack: float = 0.0):
        self.rules = tuple(rules)
        self.fusion = fusion
        self.orders = orders
        self.max_tiers = max_tiers
        self.grid = grid
        self.folds = folds
        self.seed = seed
        self.l2 = l2
        self.max_leaves = max_leaves
        self.mcc_slack = mcc_slack

    # ------------------------------------------------------------------------ fitting

    def _check_params(self, table: TierTable) -> None:
        bad = [r for r in self.rules if r not in family_rules()]
        if bad:
            raise ValueError(f"unknown rule kinds {bad}; searchable: {', '.join(family_rules())}")
        make_fusion(self.fusion)
        if self.orders not in ("cost", "given", "all"):
            raise ValueError(f"orders must be cost, given or all, not {self.orders!r}")
        if table.n_tiers < 1 or table.n < 10:
            raise ValueError("the optimiser needs at least one tier and 10 rows")

    def sequences(self, table: TierTable) -> list[tuple[int, ...]]:
        T = table.n_tiers
        base = list(np.argsort(table.standalone_gflops(), kind="stable")) if self.orders == "cost" else list(range(T))
        kmax = min(T, self.max_tiers or T)
        seqs: list[tuple[int, ...]] = []
        for k in range(1, kmax + 1):
            if self.orders == "all":
                seqs += [tuple(int(i) for i in p) for p in itertools.permutations(range(T), k)]
            else:
                seqs += [tuple(int(i) for i in c) for c in itertools.combinations(base, k)]
        return seqs

    def full_sequence(self, table: TierTable) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(table.standalone_gflops(), kind="stable"))

    def fit(self, table: TierTable) -> "CascadePolicy":
        self._check_params(table)
        self.table_ = table
        self._models = _ExitModels(table, self.fusion, self.rules, self.folds, self.seed, self.l2)
        full = self.full_sequence(table)
        self.full_sequence_ = full
        self.reference_ = self._exit(full).decision  # full-ensemble decisions (out-of-fold)
        search = _ThresholdSearch(self._models, self.reference_, self.rules, self.grid, self.max_leaves)
        recs = [search.run(seq) for seq in self.sequences(table)]
        self.sequences_ = [r[0] for r in recs]
        self.options_ = [r[1] for r in recs]
        width = max(1, max(len(r[0]) for r in recs) - 1)
        seq_id = np.concatenate([np.full(len(r[2]), i) for i, r in enumerate(recs)])
        choice = np.concatenate([np.pad(r[2], ((0, 0), (0, width - r[2].shape[1])), constant_values=-1) for r in recs])
        vals = np.concatenate([r[3] for r in recs])
        self.points_ = {"seq": seq_id, "choice": choice, "vals": vals}
        n = table.n
        tp, fp, tn, fn = vals[:, 0], vals[:, 1], vals[:, 2], vals[:, 3]
        self.mcc_ = mcc_counts(tp, fp, tn, fn)
        self.accuracy_ = (tp + tn) / n
        self.disagreement_ = vals[:, 4] / n
        self.gflops_ = vals[:, 5] / n
        self.ms_ = vals[:, 6] / n
        front = pareto_front(self.gflops_, self.mcc_)
        self.frontier_ = [self._point(i) for i in front]
        self.full_ = self._point_for(full, (("never", math.inf),) * (len(full) - 1))
        self.singles_ = [self._point_for((t,), ()) for t in range(table.n_tiers)]
        self.best_single_ = max(self.singles_, key=lambda p: (p.mcc, -p.gflops))
        return self

    def _check(self) -> None:
        if not hasattr(self, "frontier_"):
            raise RuntimeError("CascadePolicy is not fitted: call fit(table) first")

    def _exit(self, prefix: tuple[int, ...]) -> _Exit:
        return self._models.oof(prefix)

    def _deployed(self, prefix: tuple[int, ...]) -> _Exit:
        return self._models.deployed(prefix)

    # ------------------------------------------------------------------------ points

    def _point(self, i: int) -> PolicyPoint:
        s = int(self.points_["seq"][i])
        seq, opts = self.sequences_[s], self.options_[s]
        rules = tuple((opts[k][int(c)][0], opts[k][int(c)][1]) for k, c in enumerate(self.points_["choice"][i][: len(seq) - 1]))
        return self._point_for(seq, rules)

    def _point_for(self, seq: tuple[int, ...], rules: Sequence[tuple[str, float]]) -> PolicyPoint:
        """Evaluate one policy on the table with the out-of-fold exits (exit rates included)."""
        tb = self.table_
        n = tb.n
        alive = np.ones(n, dtype=bool)
        pred = np.zeros(n, dtype=bool)
        ex_at = np.full(n, len(seq) - 1)
        cg, cm = tb.costs(seq, "gflops"), tb.costs(seq, "ms")
        cost_g, cost_m = np.zeros(n), np.zeros(n)
        for k in range(len(seq)):
            ex = self._exit(seq[: k + 1])
            if k < len(seq) - 1:
                kind, thr = rules[k]
                stop = alive & (ex.scores[kind] >= thr if kind != "never" else np.zeros(n, dtype=bool))
            else:
                stop = alive.copy()
            pred[stop], ex_at[stop], cost_g[stop], cost_m[stop] = ex.decision[stop], k, cg[k][stop], cm[k][stop]
            alive &= ~stop
        y = tb.y == 1
        ref = self.reference_ if hasattr(self, "reference_") else pred
        return PolicyPoint(
            tiers=tuple(seq), names=tuple(tb.names[t] for t in seq), rules=tuple((k, float(t)) for k, t in rules),
            fusion=self.fusion, mcc=_mcc_of(pred, y), accuracy=float(np.mean(pred == y)), disagreement=float(np.mean(pred != ref)),
            gflops=float(cost_g.mean()), ms=float(cost_m.mean()),
            exit_rates=tuple(float(np.mean(ex_at == k)) for k in range(len(seq))),
        )

    def all_points(self) -> dict[str, np.ndarray]:
        """Every evaluated policy's (mean GFLOPs, ms, MCC, accuracy, disagreement), for plots."""
        self._check()
        return {"gflops": self.gflops_, "ms": self.ms_, "mcc": self.mcc_, "accuracy": self.accuracy_,
                "disagreement": self.disagreement_}

    def select(self, budget: str | float, unit: str | None = None) -> PolicyPoint:
        """The policy with the highest MCC whose mean cost is within the budget (ties: closer to the full
        ensemble, then cheaper). ``budget``: see :func:`parse_budget`."""
        self._check()
        kind, value = parse_budget(budget, self.full_.gflops) if unit is None else (unit, float(budget))
        cost = self.gflops_ if kind == "gflops" else self.ms_
        ok = np.flatnonzero(cost <= value + 1e-12)
        if len(ok) == 0:
            i = int(np.argmin(cost))
        else:
            best = self.mcc_[ok].max()
            near = ok[self.mcc_[ok] >= best - self.mcc_slack - 1e-12]
            i = int(near[np.lexsort((cost[near], self.disagreement_[near]))[0]])
        return self._point(i)

    def risk_path(self, max_len: int = 300) -> list[PolicyPoint]:
        """Candidates for fixed-sequence testing, safest first: every policy ordered by estimated
        disagreement (ascending), then cost (descending), keeping each one only if it is cheaper than
        all before it. The path starts at the full ensemble and walks down in cost through every
        cheaper policy with no estimated disagreement before it accepts any, so one unlucky candidate
        does not end the walk early. Thinned evenly to ``max_len`` (it depends on the fitting data only)."""
        self._check()
        order = np.lexsort((-self.gflops_, self.disagreement_))
        path, cheapest = [], math.inf
        for i in order:
            if self.gflops_[i] < cheapest - 1e-12:
                path.append(int(i))
                cheapest = self.gflops_[i]
        if len(path) > max_len:
            path = [path[j] for j in np.unique(np.linspace(0, len(path) - 1, max_len).round().astype(int))]
        return [self._point(i) for i in path]

    # ------------------------------------------------------------------------ deployable exits

    def exits_for(self, point: PolicyPoint) -> list[ExitPoint]:
        """The exit points of a policy, with the fusions and estimators refitted on all rows."""
        self._check()
        seq = point.tiers
        out = []
        for k in range(len(seq)):
            ex = self._deployed(seq[: k + 1])
            if k < len(seq) - 1:
                kind, thr = point.rules[k]
                rule = make_rule(kind, thr, self.table_.thresholds[list(seq[: k + 1])], ex.estimator)
            else:
                rule = FinalRule()
            out.append(ExitPoint(ex.fusion, float(ex.deploy_threshold), rule))
        return out

    def ensemble_exits(self) -> list[ExitPoint]:
        """Exit points of the full ensemble (every tier on every image)."""
        return self.exits_for(self.full_)

    def fusion_comparison(self) -> list[dict]:
        """Out-of-fold MCC of stacking vs weighted voting (and the last tier alone) on every prefix of the
        full ensemble's order."""
        self._check()
        tb = self.table_
        rows = []
        for k in range(1, len(self.full_sequence_) + 1):
            P = list(self.full_sequence_[:k])
            row = {"tiers": [tb.names[t] for t in P]}
            for kind in ("stacking", "vote"):
                def fp(train, test, kind=kind):
                    return make_fusion(kind).fit(tb.logits[train][:, P], tb.probs[train][:, P], tb.y[train]).prob(
                        tb.logits[test][:, P], tb.probs[test][:, P])

                oof = out_of_fold(fp, tb.n, tb.groups, self.folds, self.seed)
                row[kind] = _mcc_of(fold(oof, best_threshold(oof, tb.y)) > 0.5, tb.y == 1)
            rows.append(row)
        return rows


# ============================================================================= replay on cached outputs


@dataclass
class ReplayResult:
    prob: np.ndarray  # folded probability
    pred: np.ndarray  # decision (prob > 0.5)
    exit: np.ndarray  # exit index
    gflops: np.ndarray  # per-image cost
    ms: np.ndarray


def replay(exits: Sequence[ExitPoint], seq: Sequence[int], table: TierTable) -> ReplayResult:
    """Run a policy on cached tier outputs: the runtime's decision step (:func:`decide`), vectorised."""
    n = table.n
    seq = list(seq)
    alive = np.ones(n, dtype=bool)
    prob = np.zeros(n)
    ex_at = np.full(n, len(seq) - 1)
    cg, cm = table.costs(seq, "gflops"), table.costs(seq, "ms")
    cost_g, cost_m = np.zeros(n), np.zeros(n)
    for k, e in enumerate(exits):
        rows = np.flatnonzero(alive)
        if len(rows) == 0:
            break
        P = seq[: k + 1]
        L, Pr = table.logits[np.ix_(rows, P)], table.probs[np.ix_(rows, P)]
        feats = [None if table.features[t] is None else table.features[t][rows] for t in P]
        d = decide(e, L, Pr, feats, last=k == len(seq) - 1)
        prob[rows] = d.probability  # the last value reached is kept, as in the runtime
        done = rows[d.stop]
        ex_at[done], cost_g[done], cost_m[done] = k, cg[k][done], cm[k][done]
        alive[done] = False
    return ReplayResult(prob, prob > 0.5, ex_at, cost_g, cost_m)


class CachedTier(Tier):
    """A tier that looks up cached outputs by row: its 'images' are arrays whose first value is the
    row index (for replaying a policy through the real runtime)."""

    kind = "cached"

    def __init__(self, name: str, logits: np.ndarray, probs: np.ndarray, features: np.ndarray | None = None,
                 gflops: np.ndarray | None = None):
        self.name, self.logits, self.probs, self.features = name, logits, probs, features
        self.gflops_rows = gflops
        self.gflops = float(np.mean(gflops)) if gflops is not None else 0.0

    def run(self, images):
        idx = np.array([int(np.asarray(im).reshape(-1)[0]) for im in images], dtype=np.int64)
        return TierOutput(self.logits[idx], self.probs[idx], None if self.features is None else self.features[idx],
                          gflops=None if self.gflops_rows is None else self.gflops_rows[idx])

    def to_config(self, bundle_dir):  # pragma: no cover - never saved
        raise NotImplementedError("a CachedTier lives only in memory")

    @classmethod
    def from_config(cls, cfg, bundle_dir, device):  # pragma: no cover
        raise NotImplementedError("a CachedTier lives only in memory")


def collect_states(cascade: Cascade, images: Sequence[np.ndarray]) -> list[ImageState]:
    """Run a cascade (as ``predict`` does) and keep the image states: every tier's logit, probability,
    features and cost, for the tiers each image reached."""
    states = [ImageState(image=im) for im in images]
    for k in range(cascade.n_stages):
        cascade.run_stage(k, [s for s in states if not s.done])
    return states


def table_from_states(states: Sequence[ImageState], names: Sequence[str], thresholds: Sequence[float],
                      y: np.ndarray, groups: np.ndarray | None = None,
                      reuse: dict[str, tuple[str, float]] | None = None) -> TierTable:
    """A TierTable from states where every tier ran on every image (a full-ensemble run).

    reuse: tier name -> (name of the tier whose output it reuses, GFLOPs it saves per image)."""
    logits, probs, feats = state_arrays(states)
    n = len(states)
    g = np.array([[s.trace.gflops.get(nm, 0.0) for nm in names] for s in states], dtype=np.float64).reshape(n, len(names))
    src = np.full(len(names), -1, dtype=np.int64)
    saving = np.zeros((n, len(names)))
    for t, nm in enumerate(names):
        if reuse and nm in reuse and reuse[nm][0] in names:
            s_idx = list(names).index(reuse[nm][0])
            src[t] = s_idx
            saving[:, t] = reuse[nm][1]
            if s_idx < t:  # it ran before here: the recorded cost is already net of the saving
                g[:, t] += reuse[nm][1]
    return TierTable(list(names), logits, probs, g, np.zeros_like(g), thresholds, y,
                     np.arange(n) if groups is None else groups, feats, src, saving, np.zeros_like(saving))


# ============================================================================= Learn-then-Test


@dataclass
class LTTResult:
    point: PolicyPoint  # the chosen policy (as evaluated on the fitting half)
    exits: list[ExitPoint]  # its deployable exit points (fitted on the fitting half)
    reference_exits: list[ExitPoint]  # the reference full ensemble (fitted on the fitting half)
    reference_tiers: tuple[int, ...]
    epsilon: float
    delta: float
    method: str
    n_cal: int  # exchangeable units (images) in the calibration half
    risk_cal: float  # the chosen policy's disagreement on the calibration half
    p_value: float
    certified: bool  # False: nothing but the full ensemble itself passed (returned as the safe choice)
    path: list[dict]
    optimizer: CascadePolicy
    fit_rows: np.ndarray
    cal_rows: np.ndarray

    def as_dict(self) -> dict:
        return {
            "epsilon": self.epsilon, "delta": self.delta, "method": self.method, "n_cal_images": self.n_cal,
            "risk_cal": self.risk_cal, "p_value": self.p_value, "certified": self.certified,
            "policy": self.point.as_dict(), "path": self.path,
        }


def learn_then_test(table: TierTable, epsilon: float = 0.05, delta: float = 0.1, cal_fraction: float = 0.5,
                    seed: int = 0, method: str = "hb", **optimizer_kw) -> LTTResult:
    """Guaranteed mode: the cheapest policy with P(disagreement with the full ensemble > epsilon) <= delta.

    The split is by image (``table.groups``); the loss of an image is the share of its rows (views)
    where the policy's decision differs from the reference full ensemble's."""
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise ValueError("epsilon and delta must be in (0, 1)")
    if method not in PVALUES:
        raise ValueError(f"p-value method must be one of {sorted(PVALUES)}")
    uniq = np.unique(table.groups)
    rng = np.random.default_rng(seed)
    cal_groups = rng.permutation(uniq)[: max(1, int(round(cal_fraction * len(uniq))))]
    is_cal = np.isin(table.groups, cal_groups)
    fit_rows, cal_rows = np.flatnonzero(~is_cal), np.flatnonzero(is_cal)
    opt = CascadePolicy(seed=seed, **optimizer_kw).fit(table.subset(fit_rows))
    cal = table.subset(cal_rows)
    ref_tiers = opt.full_sequence_
    ref_exits = opt.ensemble_exits()
    ref = replay(ref_exits, ref_tiers, cal).pred
    path = opt.risk_path()
    losses, exits = [], []
    for pt in path:
        ex = opt.exits_for(pt)
        exits.append(ex)
        losses.append(group_means(replay(ex, pt.tiers, cal).pred != ref, cal.groups))
    L = np.column_stack(losses) if losses else np.zeros((0, 0))
    chosen, pvals, _ = fixed_sequence_select(L, list(range(len(path))), epsilon, delta, method)
    n_cal = L.shape[0]
    rows = [{"policy": pt.describe(), "mean_gflops_fit": pt.gflops, "disagreement_fit": pt.disagreement,
             "risk_cal": float(L[:, j].mean()), "p_value": (pvals[j] if j < len(pvals) else None)}
            for j, pt in enumerate(path)]
    certified = chosen is not None
    if chosen is None:  # the full ensemble agrees with itself: always safe
        full_idx = [j for j, pt in enumerate(path) if pt.tiers == ref_tiers and all(k == "never" for k, _ in pt.rules)]
        if full_idx:
            chosen = full_idx[0]
        else:
            path.insert(0, opt.full_)
            exits.insert(0, ref_exits)
            L = np.column_stack([np.zeros(n_cal), L]) if L.size else np.zeros((n_cal, 1))
            pvals.insert(0, 1.0)
            chosen = 0
    pt = path[chosen]
    return LTTResult(
        point=pt, exits=exits[chosen], reference_exits=ref_exits, reference_tiers=ref_tiers, epsilon=epsilon,
        delta=delta, method=method, n_cal=n_cal, risk_cal=float(L[:, chosen].mean()) if n_cal else 0.0,
        p_value=float(pvals[chosen]) if chosen < len(pvals) else 1.0, certified=certified, path=rows,
        optimizer=opt, fit_rows=fit_rows, cal_rows=cal_rows,
    )


def runtime_cascade(exits: Sequence[ExitPoint], seq: Sequence[int], table: TierTable) -> Cascade:
    """A real Cascade over cached outputs (CachedTier per tier): for checking replay against the runtime."""
    tiers = []
    for t in seq:
        f = table.features[t]
        tiers.append(CachedTier(table.names[t], table.logits[:, t], table.probs[:, t], f))
    return Cascade(tiers, list(exits))


def row_images(n: int) -> list[np.ndarray]:
    """Stand-in 'images' for a runtime_cascade: image i is the row index i."""
    return [np.full((1, 1, 1), i, dtype=np.int64) for i in range(n)]


__all__ += ["runtime_cascade", "row_images"]
