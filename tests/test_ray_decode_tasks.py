"""`label --decode-tasks N`: the cap on concurrent Ray Data decode tasks reaches the decode step (and only it), is
checked, is passed on by the CLI, and a capped job gives the local engine's rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from roadcascade.cli import app
from roadcascade.distributed.inputs import list_inputs
from roadcascade.distributed.job import label
from roadcascade.distributed.label import LabelConfig
from roadcascade.distributed.ray_label import build_dataset, plan
from roadcascade.distributed.shards import read_output
from roadcascade.serve.testing import tiny_bundle

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR",
             _system_config={"memory_monitor_refresh_ms": 0})  # no OOM killer: the machine is shared with other jobs
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), tau=0.3, temperature=0.01)


def _listing(streetwork: Path, tmp: Path, n: int) -> Path:
    listing = tmp / "list.txt"
    listing.write_text("\n".join(r.file for r in list_inputs(streetwork, "test")[:n]) + "\n")
    return listing


def _compute(op):
    """A logical map operator's compute strategy (``compute`` in Ray 2.60, ``_compute`` in older releases)."""
    return getattr(op, "compute", getattr(op, "_compute", None))


def test_decode_tasks_checked(bundle, tmp_path):
    with pytest.raises(ValueError, match="decode_tasks"):
        LabelConfig(bundle=bundle, out=tmp_path, engine="ray", decode_tasks=0)
    assert LabelConfig(bundle=bundle, out=tmp_path).decode_tasks is None


@pytest.mark.parametrize("cap", [None, 3])
def test_cap_reaches_the_decode_step_only(ray_local, bundle, streetwork, tmp_path, cap):
    cfg = LabelConfig(bundle=bundle, out=tmp_path, engine="ray", batch=4, decode_tasks=cap, gpu="on")
    todo = list_inputs(_listing(streetwork, tmp_path, 8))
    ds = build_dataset(cfg, todo, plan(cfg, {"CPU": 2}), None)
    cascade_op = ds._logical_plan.dag  # map_batches(CascadeRunner) <- map_batches(decode_batch) <- from_items
    decode_op = cascade_op.input_dependencies[0]
    assert isinstance(_compute(cascade_op), ray.data.ActorPoolStrategy)
    if cap is None:  # the default is unchanged: Ray Data's own task pool, no size
        assert getattr(_compute(decode_op), "size", None) is None
    else:
        assert isinstance(_compute(decode_op), ray.data.TaskPoolStrategy) and _compute(decode_op).size == cap


def test_capped_ray_job_equals_local(ray_local, bundle, streetwork, tmp_path):
    inputs = list_inputs(_listing(streetwork, tmp_path, 10))
    label(LabelConfig(bundle=bundle, out=tmp_path / "local", batch=4), inputs)
    rep = label(LabelConfig(bundle=bundle, out=tmp_path / "ray", engine="ray", batch=4, decode_tasks=1), inputs)
    a = {r["path"]: r for r in read_output(tmp_path / "local").to_pylist()}
    b = {r["path"]: r for r in read_output(tmp_path / "ray").to_pylist()}
    assert set(a) == set(b) and len(a) == 10 and rep.written == 10 and rep.errors == 0
    for k, x in a.items():
        assert abs(x["probability"] - b[k]["probability"]) <= 1e-6 and x["decision"] == b[k]["decision"], k


def test_cli_passes_decode_tasks(bundle, streetwork, tmp_path, monkeypatch):
    import roadcascade.distributed.job as job

    seen: list[LabelConfig] = []

    def fake_label(cfg, inputs, progress=None):
        seen.append(cfg)
        return job.LabelReport(cfg.engine, len(inputs), 0, 0, 0, 0, 0.0)

    monkeypatch.setattr(job, "label", fake_label)
    listing = _listing(streetwork, tmp_path, 2)
    args = ["label", "--bundle", str(bundle), "--data", str(listing), "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(app, args + ["--decode-tasks", "5"])
    assert r.exit_code == 0, r.output
    assert seen[-1].decode_tasks == 5
    assert CliRunner().invoke(app, args + ["--decode-tasks", "0"]).exit_code == 2  # below the minimum
