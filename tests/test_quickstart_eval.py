"""The quickstart's evaluation step (cli._evaluate_runs): two bundles evaluated side by side in two processes give
the reports, files and real-dashcam table that one process gives."""

import json

import numpy as np
import pytest

from roadcascade.io.data import default_data_root


@pytest.mark.integration
def test_two_processes_answer_as_one(tmp_path, monkeypatch):
    from roadcascade.bench.realcam import default_night_dev
    from roadcascade.cli import _evaluate_one, _evaluate_runs
    from roadcascade.serve.testing import tiny_bundle

    if not (default_data_root() / "manifest.csv").exists() or not default_night_dev().exists():
        pytest.skip("StreetWork and night-dev are needed at the default data root")
    a, b = tiny_bundle(tmp_path / "a", seed=0), tiny_bundle(tmp_path / "b", seed=3)
    calls = []
    reps, cam = _evaluate_runs([(a, "", ""), (b, "-stage1", "stage-1 ")], tmp_path, None, "cpu",
                               lambda *args: calls.append(args))
    assert [name for name, _ in reps] == ["test / clean", "test / challenge", "stage-1 test / clean", "stage-1 test / challenge"]
    for f in ("eval-test-clean.json", "eval-test-challenge.json", "eval-test-clean-stage1.json", "eval-test-challenge-stage1.json"):
        doc = json.loads((tmp_path / f).read_text())
        assert doc["split"] == "test" and "_p" not in doc and doc["threads"] == 1  # one thread per process
    assert set(cam) == {"deployed", "stage-1"} and json.loads((tmp_path / "eval-dashcam.json").read_text()) == cam
    assert calls and calls[-1][1:] == (2, 2)

    one, cam_b = _evaluate_one(str(b), "stage-1 ", None, "cpu", True, None)  # in this process
    for (views, rep), (_, rep2) in zip(one, reps[2:]):
        assert np.allclose(rep["_p"], rep2["_p"], atol=1e-6) and rep["mcc"] == rep2["mcc"]
    assert cam_b["joint"] == pytest.approx(cam["stage-1"]["joint"], abs=1e-6)
