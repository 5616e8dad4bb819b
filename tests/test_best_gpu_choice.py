"""The GPU-round script's choice of the best GPU bundle (scripts/gpu_best_distill.py ``choose``): which val challenge
MCC it reads under each rule, which rows count as candidates, and the build's out-of-fold estimate it reads."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def gbd():
    env = os.environ.get("ROADCASCADE_GPU")  # the script sets a default for its workers: not for the tests after it
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("gpu_best_distill_t", SCRIPTS / "gpu_best_distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.path[:] = [x for x in sys.path if x != str(SCRIPTS)]  # the script adds its folder too
    if env is None:
        os.environ.pop("ROADCASCADE_GPU", None)
    else:
        os.environ["ROADCASCADE_GPU"] = env


def _row(insample: float, oof: float | None, dashcam: float) -> dict:
    return {"val_challenge_mcc": insample, "oof_val_challenge_mcc": oof, "dashcam_mcc": dashcam}


def test_oof_rule_drops_a_family_that_leads_only_in_sample(gbd):
    # round 12's shape: the six-network family leads val in sample by 0.007 and has the best dashcam MCC
    res = {"val": {"E2": _row(0.9587, 0.9560, 0.846), "E6": _row(0.9658, 0.9500, 0.906),
                   "H2": _row(0.9600, 0.9580, 0.850), "student-A": _row(0.99, None, 0.99)}}
    assert gbd.choose(res, "insample")["best_gpu_bundle"] == "E6"
    assert gbd.choose(res, "oof")["best_gpu_bundle"] == "H2"  # E6 is more than 0.005 below on the oof estimate
    assert gbd.choose(res, "oof")["rule"] == "oof"


def test_students_are_never_candidates(gbd):
    res = {"val": {"E2": _row(0.95, 0.95, 0.5), "student-A": _row(0.99, 0.99, 0.99)}}
    assert gbd.choose(res)["best_gpu_bundle"] == "E2"
    assert gbd.choose(res)["student"] == "student-A"


def test_oof_rule_refuses_a_candidate_without_an_estimate(gbd):
    res = {"val": {"E2": _row(0.95, 0.95, 0.5), "H2": _row(0.96, None, 0.6)}}
    with pytest.raises(ValueError, match="H2"):
        gbd.choose(res, "oof")


def test_oof_estimate_is_read_from_the_build_metadata(gbd, tmp_path):
    (tmp_path / "bundle.json").write_text(json.dumps({"metrics": {"val": {"cascade": {"mcc": 0.9612, "gflops": 1.0}}}}))
    assert gbd.oof_val_mcc(str(tmp_path)) == pytest.approx(0.9612)
    (tmp_path / "bundle.json").write_text(json.dumps({"kind": "stage1"}))  # a trained (not built) bundle: no estimate
    assert gbd.oof_val_mcc(str(tmp_path)) is None
