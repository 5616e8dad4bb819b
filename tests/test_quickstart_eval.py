"""The quickstart's evaluation step (cli._evaluate_runs) on real data: the deployed bundle and the candidate not shipped
on test clean and challenge and real dashcam frames, files named by suffix, the real-dashcam table keyed by label."""

import json

import pytest

from roadcascade.io.data import default_data_root, open_dataset


@pytest.mark.integration
def test_runs_write_reports_and_the_dashcam_table(tmp_path):
    from roadcascade.bench.realcam import default_night_dev
    from roadcascade.cli import _evaluate_runs
    from roadcascade.serve.testing import tiny_bundle

    if not (default_data_root() / "manifest.csv").exists() or not default_night_dev().exists():
        pytest.skip("StreetWork and night-dev are needed at the default data root")
    a, b = tiny_bundle(tmp_path / "a", seed=0), tiny_bundle(tmp_path / "b", seed=3)
    reps, cam = _evaluate_runs([(a, "", ""), (b, "-cascade", "cascade ")], tmp_path, None, "cpu", lambda *_: None,
                               baselines=[True, False])
    assert [name for name, _ in reps] == ["test / clean", "test / challenge", "cascade test / clean", "cascade test / challenge"]
    for f in ("eval-test-clean.json", "eval-test-challenge.json", "eval-test-clean-cascade.json", "eval-test-challenge-cascade.json"):
        doc = json.loads((tmp_path / f).read_text())
        assert doc["split"] == "test" and "_p" not in doc and doc["n_images"] == len(open_dataset(None, "test"))
    assert set(cam) == {"deployed", "cascade"} and json.loads((tmp_path / "eval-dashcam.json").read_text()) == cam
    n_night = len(open_dataset(default_night_dev()))
    assert all(r["night_dev"]["n"] == n_night and r["dashcam_negatives"]["n"] > 0 for r in cam.values())
