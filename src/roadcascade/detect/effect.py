"""Measured effect of the detector tier next to a classifier, before the policy optimiser takes it over.

Both tiers run on the same validator-style requests (``evaluate.make_items``: clean bytes, or seeded
challenge views as JPEG q75; seed 0 on val, 1 on test). Everything is fitted on val (clean + challenge
pooled) and reported on test, clean and challenge, all images and the dashcam subset:

- ``classifier``: the classifier tier alone (its own temperature and folded threshold);
- ``detector``: the detector tier alone (its evidence scorer and the bundle's exit threshold);
- ``stacked``: both tiers on every image, a logistic model on the classifier's calibrated logit and the
  detector's evidence features (the fusion a two-tier exit would learn), MCC-optimal threshold;
- ``verify``: the classifier's answer, except where :class:`~roadcascade.detect.tier.ConeVerifyRule`
  finds a disagreement (roadwork without cone evidence, none with strong cone evidence): there the
  stacked answer (``low``/``high`` chosen on val);
- ``gated``: the detector runs only where the classifier is unsure (``|folded - 0.5| < tau``, ``tau``
  chosen on val), answering with the stacked model there: the cost-aware two-tier cascade.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Progress = Callable[[str, int, int], None]

__all__ = ["TierRuns", "collect", "measure_effect"]


@dataclass
class TierRuns:
    """Per request: label, source, classifier logit/prob, detector features/prob."""

    y: np.ndarray
    source: np.ndarray
    clf_logit: np.ndarray
    clf_prob: np.ndarray
    det_features: np.ndarray
    det_prob: np.ndarray
    ms: dict

    def take(self, mask: np.ndarray) -> "TierRuns":
        return TierRuns(self.y[mask], self.source[mask], self.clf_logit[mask], self.clf_prob[mask],
                        self.det_features[mask], self.det_prob[mask], self.ms)

    @staticmethod
    def concat(runs: Sequence["TierRuns"]) -> "TierRuns":
        return TierRuns(*(np.concatenate([getattr(r, f) for r in runs]) for f in
                          ("y", "source", "clf_logit", "clf_prob", "det_features", "det_prob")), ms={})


def collect(classifier, detector, items, batch_size: int = 32, progress: Progress | None = None, desc: str = "") -> TierRuns:
    from ..io.images import decode_bytes

    cl, cp, df, dp = [], [], [], []
    t_c = t_d = 0.0
    for i in range(0, len(items), batch_size):
        imgs = [decode_bytes(it.payload) for it in items[i : i + batch_size]]
        t0 = time.perf_counter()
        oc = classifier.run(imgs)
        t1 = time.perf_counter()
        od = detector.run(imgs)
        t2 = time.perf_counter()
        t_c, t_d = t_c + t1 - t0, t_d + t2 - t1
        cl.append(oc.logits)
        cp.append(oc.prob)
        df.append(od.features)
        dp.append(od.prob)
        if progress:
            progress(desc or "run tiers", min(len(items), i + batch_size), len(items))
    n = max(1, len(items))
    return TierRuns(
        y=np.array([it.label for it in items], dtype=np.int64), source=np.array([it.source for it in items]),
        clf_logit=np.concatenate(cl), clf_prob=np.concatenate(cp), det_features=np.concatenate(df), det_prob=np.concatenate(dp),
        ms={"classifier_ms_per_image": t_c * 1e3 / n, "detector_ms_per_image": t_d * 1e3 / n},
    )


class _Stacker:
    """Logistic model on [classifier calibrated logit, detector evidence (counts on a log scale)]."""

    def fit(self, r: TierRuns) -> "_Stacker":
        from sklearn.linear_model import LogisticRegression

        x = self._x(r)
        self.mu, self.sd = x.mean(0), np.where(x.std(0) < 1e-6, 1.0, x.std(0))
        self.lr = LogisticRegression(C=1.0, max_iter=5000).fit((x - self.mu) / self.sd, r.y)
        return self

    @staticmethod
    def _x(r: TierRuns) -> np.ndarray:
        from ..cascade.calibration import logit
        from .tier import _design

        return np.column_stack([logit(r.clf_prob), _design(r.det_features, (2, 3))])

    def prob(self, r: TierRuns) -> np.ndarray:
        return self.lr.predict_proba((self._x(r) - self.mu) / self.sd)[:, 1]


def _scores(y: np.ndarray, folded: np.ndarray, source: np.ndarray) -> dict:
    from ..metrics import DASHCAM_SOURCES, summarize

    out = {}
    for name, m in (("all", np.ones(len(y), bool)), ("dashcam", np.isin(source, DASHCAM_SOURCES))):
        if m.any():
            s = summarize(y[m], folded[m])
            out[name] = {"n": s.n, "pos": int(y[m].sum()), "mcc": s.mcc, "accuracy": s.accuracy, "reward": s.reward,
                         "ece": s.ece, "confusion": s.confusion}
    return out


@dataclass
class _Fitted:
    """What is fitted on val: both tiers' thresholds, the stacked model and its threshold, the verify rule, the gate."""

    thr_c: float
    thr_d: float
    stack: _Stacker
    thr_s: float
    verify: object  # ConeVerifyRule
    tau: float


def _tiers(classifier_bundle, detector_bundle):
    """The classifier tier, the detector tier and their exit thresholds."""
    from ..cascade.runtime import ClassifierTier
    from .tier import DetectorTier

    clf = next((t for t in classifier_bundle.cascade.tiers if isinstance(t, ClassifierTier)), None)
    det = next((t for t in detector_bundle.cascade.tiers if isinstance(t, DetectorTier)), None)
    if clf is None or det is None:
        raise ValueError("need a bundle with a classifier tier and a bundle with a detector tier")
    thr_d = float(detector_bundle.cascade.exits[detector_bundle.cascade.tiers.index(det)].threshold)
    return clf, det, float(clf.calibrator.threshold_), thr_d


def _collect_runs(clf, det, data: str | None, n_views: int, batch_size: int, max_images: int | None,
                  progress: Progress | None) -> dict[str, TierRuns]:
    """Both tiers on val (seed 0) and test (seed 1), clean and challenge: ``"split/views"`` -> runs."""
    from ..bench.evaluate import make_items
    from ..io.data import open_dataset

    full = open_dataset(data)
    runs: dict[str, TierRuns] = {}
    for split, seed in (("val", 0), ("test", 1)):
        ds = full.split(split).subset(max_images)
        for views in ("clean", "challenge"):
            items = make_items(ds, views, seed, n_views=n_views)
            runs[f"{split}/{views}"] = collect(clf, det, items, batch_size, progress, f"{split} {views}")
    return runs


def _best_option(options: Sequence, y: np.ndarray, answers: Callable) -> object:
    """The option whose answers (``answers(option)``: folded answers, mask of the images it hands on) reach the best
    MCC on ``y``, ties to the fewest handed on."""
    from ..metrics import summarize

    best = None
    for o in options:
        folded, handed = answers(o)
        key = (round(summarize(y, folded).mcc, 6), -handed.mean())
        if best is None or key > best[0]:
            best = (key, o)
    return best[1]


def _fit_on_val(val: TierRuns, thr_c: float, thr_d: float) -> _Fitted:
    """The stacked model and threshold, the verify rule's low/high and the gate's tau, all on val."""
    from ..cascade.calibration import best_threshold, fold
    from .tier import ConeVerifyRule

    stack = _Stacker().fit(val)
    p_val = stack.prob(val)
    thr_s = best_threshold(p_val, val.y)
    f_clf, f_stack = fold(val.clf_prob, thr_c), fold(p_val, thr_s)

    def verified(lh):  # the classifier's answer unless the cone rule sees a disagreement: then the stacked one
        dis = ConeVerifyRule(low=lh[0], high=lh[1], classifier_threshold=thr_c).disagree_arrays(val.clf_prob[:, None],
                                                                                                [val.det_features])
        return np.where(dis, f_stack, f_clf), dis

    def gated(tau):  # the detector runs where the classifier is unsure
        run_det = np.abs(f_clf - 0.5) < tau
        return np.where(run_det, f_stack, f_clf), run_det

    low, high = _best_option([(lo, hi) for lo in (0.1, 0.2, 0.3) for hi in (0.5, 0.6, 0.7, 0.8)], val.y, verified)
    tau = _best_option((0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.49, 0.5), val.y, gated)
    return _Fitted(thr_c, thr_d, stack, thr_s, ConeVerifyRule(low=low, high=high, classifier_threshold=thr_c), tau)


def _results(r: TierRuns, fit: _Fitted, g_c: float, g_d: float) -> dict:
    """Every policy's scores on one set of runs, with its GFLOPs and detector rate."""
    from ..cascade.calibration import fold

    f_c = fold(r.clf_prob, fit.thr_c)
    f_s = fold(fit.stack.prob(r), fit.thr_s)
    dis = fit.verify.disagree_arrays(r.clf_prob[:, None], [r.det_features])
    gate = np.abs(f_c - 0.5) < fit.tau
    rows = {
        "classifier": (f_c, g_c, 0.0),
        "detector": (fold(r.det_prob, fit.thr_d), g_d, 1.0),
        "stacked": (f_s, g_c + g_d, 1.0),
        "verify": (np.where(dis, f_s, f_c), g_c + g_d, 1.0),
        "gated": (np.where(gate, f_s, f_c), g_c + g_d * float(gate.mean()), float(gate.mean())),
    }
    out = {name: {**_scores(r.y, f, r.source), "gflops": g, "detector_rate": rate,
                  **({"escalated": float(dis.mean())} if name == "verify" else {})}
           for name, (f, g, rate) in rows.items()}
    out["ms"] = r.ms
    return out


def measure_effect(classifier_bundle, detector_bundle, data: str | None = None, n_views: int = 4, batch_size: int = 32,
                   max_images: int | None = None, progress: Progress | None = None, log: Callable[[str], None] = print) -> dict:
    """Fit the combinations on val, report every policy on test and val (see the module docstring)."""
    from ..metrics import DASHCAM_SOURCES

    clf, det, thr_c, thr_d = _tiers(classifier_bundle, detector_bundle)
    runs = _collect_runs(clf, det, data, n_views, batch_size, max_images, progress)
    fit = _fit_on_val(TierRuns.concat([runs["val/clean"], runs["val/challenge"]]), thr_c, thr_d)
    low, high = fit.verify.low, fit.verify.high
    log(f"fitted on val: stacked threshold {fit.thr_s:.3f}; verify low/high {low}/{high}; gated tau {fit.tau}")
    g_c, g_d = float(clf.gflops), float(det.gflops)
    return {
        "classifier": {"bundle": str(classifier_bundle.path), "tier": clf.name, "gflops": g_c, "threshold": thr_c},
        "detector": {"bundle": str(detector_bundle.path), "tier": det.name, "gflops": g_d, "threshold": thr_d},
        "fitted_on": "val clean + val challenge (seed 0)", "stacked_threshold": fit.thr_s,
        "verify": {"low": low, "high": high}, "gated": {"tau": fit.tau}, "dashcam_sources": list(DASHCAM_SOURCES),
        "results": {key: _results(runs[key], fit, g_c, g_d) for key in ("test/clean", "test/challenge", "val/clean", "val/challenge")},
    }
