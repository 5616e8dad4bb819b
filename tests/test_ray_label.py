"""`roadcascade label`: local and Ray engines give the same rows; bad files are rows; reruns resume; `--decode-tasks N`
caps the concurrent Ray Data decode tasks (the decode step only), is checked and passed on by the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roadcascade.cli import app
from roadcascade.distributed.inputs import list_inputs
from roadcascade.distributed.job import label
from roadcascade.distributed.label import LabelConfig
from roadcascade.distributed.ray_label import build_dataset, plan
from roadcascade.distributed.shards import ShardWriter, read_output, shard_files
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


def _inputs(streetwork: Path, tmp: Path, n: int = 20) -> Path:
    """A path list of n real test images, a corrupt file, a truncated JPEG and a missing file."""
    test = list_inputs(streetwork, "test")[:n]
    (tmp / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp / "trunc.jpg").write_bytes(Path(test[0].file).read_bytes()[:400])
    lines = [r.file for r in test] + ["corrupt.jpg", "trunc.jpg", "missing.jpg"]
    listing = tmp / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def _rows(out: Path) -> dict[str, dict]:
    rows = read_output(out).to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a path was written twice"
    return {r["path"]: r for r in rows}


def test_local_equals_ray(ray_local, bundle, streetwork, tmp_path):
    listing = _inputs(streetwork, tmp_path)
    inputs = list_inputs(listing)
    loc = label(LabelConfig(bundle=bundle, out=tmp_path / "local", engine="local", batch=8), inputs)
    rr = label(LabelConfig(bundle=bundle, out=tmp_path / "ray", engine="ray", batch=8, shard_rows=5), inputs)
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert set(a) == set(b) == {r.path for r in inputs}
    assert len(shard_files(tmp_path / "ray")) >= 3  # a shard once 5 rows are buffered
    for k, x in a.items():
        y = b[k]
        assert (x["error"] is None) == (y["error"] is None), k
        if x["error"] is None:
            assert abs(x["probability"] - y["probability"]) <= 1e-6
            assert x["tiers"] == y["tiers"] and x["exit"] == y["exit"] and x["decision"] == y["decision"]
            assert x["decision"] == ("roadwork" if x["probability"] > 0.5 else "none")
        else:
            assert x["error"].split(":")[0] == y["error"].split(":")[0]
    assert {a[k]["error"].split(":")[0] for k in ("corrupt.jpg", "trunc.jpg", "missing.jpg")} <= {"not_image", "truncated", "not_found", "corrupt"}
    assert sum(a[k]["error"] is None for k in a) == 20
    assert {len(r["tiers"]) for r in a.values() if r["error"] is None} == {1, 2}  # both exits are exercised
    assert loc.errors == rr.errors == 3 and rr.duplicates_dropped == 0


def test_rerun_resumes_and_skips(bundle, streetwork, tmp_path):
    inputs = list_inputs(_inputs(streetwork, tmp_path, n=12))
    out = tmp_path / "out"
    first = label(LabelConfig(bundle=bundle, out=out, batch=4, shard_rows=4), inputs[:7])
    (out / ".part-deadbeef.parquet.tmp").write_bytes(b"half a shard from a crash")
    again = label(LabelConfig(bundle=bundle, out=out, batch=4, shard_rows=4), inputs)
    assert (first.written, again.skipped, again.written) == (7, 7, len(inputs) - 7)
    assert not list(out.glob(".*.tmp"))  # the crashed run's partial shard is gone, never read
    assert set(_rows(out)) == {r.path for r in inputs}
    third = label(LabelConfig(bundle=bundle, out=out, batch=4), inputs)
    assert third.written == 0 and third.skipped == len(inputs)


def test_writer_drops_redelivered_rows(tmp_path):
    w = ShardWriter(tmp_path, shard_rows=2)
    row = {"path": ["a", "b"], "label": [1, 0], "probability": [0.9, 0.1], "decision": ["roadwork", "none"], "tiers": [["t"], ["t"]],
           "exit": [0, 0], "rule": ["final", "final"], "error": [None, None], "worker": ["n", "n"]}
    assert w.add(row) == 2 and w.add(row) == 0
    w.close()
    assert w.duplicates == 2 and read_output(tmp_path).num_rows == 2


def test_plan_maps_actors_to_gpus(bundle, tmp_path):
    cfg = LabelConfig(bundle=bundle, out=tmp_path, engine="ray")
    gpu = plan(cfg, {"CPU": 16, "GPU": 4})
    assert (gpu["actors"], gpu["num_gpus"], gpu["device"], gpu["gpu"]) == (4, 1, "cuda", "on")
    cpu = plan(cfg, {"CPU": 8})  # the decode step is fused into the CPU actors: every CPU runs an actor
    assert (cpu["actors"], cpu["num_gpus"], cpu["device"], cpu["threads"]) == (8, 0, "cpu", 1)
    apart = LabelConfig(bundle=bundle, out=tmp_path, engine="ray", decode_tasks=2)  # capped: decode tasks of their own
    assert plan(apart, {"CPU": 8})["actors"] == 7
    assert plan(LabelConfig(bundle=bundle, out=tmp_path, engine="ray", decode_cpus=0.5), {"CPU": 8})["actors"] == 7
    assert plan(LabelConfig(bundle=bundle, out=tmp_path, engine="ray", actor_cpus=2, decode_cpus=2), {"CPU": 8})["actors"] == 4
    assert plan(LabelConfig(bundle=bundle, out=tmp_path, engine="ray", actor_cpus=2), {"CPU": 8})["actors"] == 3
    assert plan(LabelConfig(bundle=bundle, out=tmp_path, engine="ray", gpu="off"), {"CPU": 2, "GPU": 1})["num_gpus"] == 0
    with pytest.raises(ValueError):
        LabelConfig(bundle=bundle, out=tmp_path, engine="spark")


def test_gpu_fast_path_runner_on_cpu(bundle, streetwork, tmp_path):
    """The GPU actor's path (encoded bytes -> gpu.GpuCascade) runs on the CPU too: bad files stay error rows and the
    answers agree with the CPU path up to the GPU runtime's own resize (docs/GPU.md)."""
    from roadcascade.distributed.label import CascadeRunner, _columns, decode_batch
    from roadcascade.io.images import DecodeLimits

    recs = list_inputs(_inputs(streetwork, tmp_path, n=6))
    cols = _columns(recs)
    cpu = CascadeRunner(str(bundle), threads=1)
    gpu = CascadeRunner(str(bundle), threads=1, gpu="on")
    a = cpu(decode_batch(cols, DecodeLimits(), cpu.cascade.decode_size()))
    b = gpu(decode_batch(cols, DecodeLimits(), None, encoded=True))
    assert [e is None for e in a["error"]] == [e is None for e in b["error"]] and sum(e is not None for e in b["error"]) == 3
    diffs = [abs(x - y) for x, y in zip(a["probability"], b["probability"]) if x is not None]
    assert len(diffs) == 6 and max(diffs) < 0.05


def test_decode_step_finds_the_bundle_decode_size_in_its_process(bundle, streetwork, tmp_path, monkeypatch):
    """The driver does not load the bundle for its decode size: a decode step given the bundle decodes at its decode
    size, read from the cascade actor of its process when there is one (Ray fuses them on CPU), else loaded once."""
    import roadcascade.distributed.label as lab
    from roadcascade.io.images import DecodeLimits

    monkeypatch.setattr(lab, "_DECODE_SIZES", {})
    cols = lab._columns(list_inputs(_inputs(streetwork, tmp_path, n=4)))
    runner = lab.CascadeRunner(str(bundle), threads=1)
    want = lab.decode_batch(cols, DecodeLimits(), runner.cascade.decode_size())
    monkeypatch.setattr(lab, "_decode_size", lambda b: (_ for _ in ()).throw(AssertionError("loaded again")))
    got = lab.decode_batch(cols, DecodeLimits(), None, bundle=str(bundle))  # the actor's size, no second load
    assert got == want and runner.cascade.decode_size() is not None
    monkeypatch.setattr(lab, "_DECODE_SIZES", {})
    loads: list[str] = []
    monkeypatch.setattr(lab, "_decode_size", lambda b: (loads.append(str(b)), runner.cascade.decode_size())[1])
    for _ in range(2):  # a process without the actor: loaded once
        assert lab.decode_batch(cols, DecodeLimits(), None, bundle=str(bundle)) == want
    assert loads == [str(bundle)]
    assert lab.decode_batch(cols, DecodeLimits(), None, encoded=True, bundle="/nowhere")["error"] == \
        lab.decode_batch(cols, DecodeLimits(), None, encoded=True)["error"]  # encoded bytes never need it


# ------------------------------------------------------------------------------------------ --decode-tasks


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
    ds = build_dataset(cfg, todo, plan(cfg, {"CPU": 2}))
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
