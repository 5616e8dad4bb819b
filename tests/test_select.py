"""Which bundle the quickstart ships (fit.select): the choice rule as properties, and a real run of the whole step on
two tiny bundles (val challenge views, night-dev frames, val's dashcam negatives)."""

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from roadcascade.fit.select import SelectConfig, choose_bundle

vals = st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=5)
NIGHT_DEV = Path(__file__).resolve().parents[2] / "shared/data/night-dev"


@given(vals, st.data(), st.floats(0, 0.2))
@settings(max_examples=200, deadline=None)
def test_choice_is_eligible_and_best_on_dashcam_frames(v, data, tol):
    d = data.draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=len(v), max_size=len(v)))
    k = choose_bundle(v, d, tol)
    ok = [i for i in range(len(v)) if v[i] >= max(v) - tol]
    assert k in ok  # never one whose val challenge MCC is further than allowed below the best
    assert all(d[k] >= d[i] for i in ok)
    assert all(d[i] < d[k] for i in ok if i < k)  # ties go to the earlier (cheaper) candidate


@given(vals)
@settings(max_examples=100, deadline=None)
def test_without_dashcam_frames_the_val_mcc_decides(v):
    k = choose_bundle(v, [math.nan] * len(v), 0.005)
    assert v[k] == max(v) and all(v[i] < v[k] for i in range(k))


def test_examples_and_bad_input():
    assert choose_bundle([0.9622, 0.9604], [0.70, 0.80], 0.005) == 1  # this machine's quickstart: stage 1 ships
    assert choose_bundle([0.9622, 0.9500], [0.70, 0.80], 0.005) == 0  # better on dashcam frames, too far behind on val
    assert choose_bundle([0.96, 0.96], [0.8, 0.8], 0.005) == 0
    with pytest.raises(ValueError):
        choose_bundle([], [], 0.005)
    with pytest.raises(ValueError):
        choose_bundle([0.9], [0.9, 0.8], 0.005)
    with pytest.raises(ValueError):
        SelectConfig(max_dmcc=2)


@pytest.mark.integration
def test_select_bundle_measures_both_and_records_the_rule(tmp_path, streetwork):
    from roadcascade.fit.select import select_bundle
    from roadcascade.serve.testing import tiny_bundle

    if not (NIGHT_DEV / "manifest.csv").exists():
        pytest.skip(f"night-dev frames not found at {NIGHT_DEV}")
    a = tiny_bundle(tmp_path / "a", seed=0)
    b = tiny_bundle(tmp_path / "b", seed=5, temperature=0.002)
    cfg = SelectConfig(data=str(streetwork), night_dev=str(NIGHT_DEV), max_images=16)
    choice = select_bundle([("a", a), ("b", b)], cfg, tmp_path / "selected.json", log=lambda *_: None)
    doc = json.loads((tmp_path / "selected.json").read_text())
    assert doc["selected"] == choice.selected and choice.selected in (str(a), str(b))
    rows = doc["candidates"]
    assert [r["label"] for r in rows] == ["a", "b"]
    for r in rows:  # both measured on val challenge views and on real dashcam frames
        assert -1 <= r["val_challenge_mcc"] <= 1 and -1 <= r["dashcam_mcc"] <= 1
        assert 0 <= r["night_dev_recall"] <= 1 and 0 <= r["dashcam_fpr"] <= 1 and r["mean_gflops"] > 0
    k = choose_bundle([r["val_challenge_mcc"] for r in rows], [r["dashcam_mcc"] for r in rows], cfg.max_dmcc)
    assert choice.selected == rows[k]["path"]  # the recorded numbers give the recorded choice
