"""A two-node Ray cluster on this machine (ray.cluster_utils.Cluster): the worker node doing the labelling is killed
mid-job and replaced; every input must still appear exactly once, with the answer the local engine gives."""

from __future__ import annotations

import threading
import time

import pytest

from roadcascade.distributed.inputs import list_inputs
from roadcascade.distributed.job import label
from roadcascade.distributed.label import LabelConfig
from roadcascade.distributed.shards import read_output
from roadcascade.serve.testing import tiny_bundle

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.mark.timeout(300)
def test_node_killed_mid_job_loses_and_duplicates_nothing(streetwork, tmp_path):
    bundle = tiny_bundle(tmp_path / "bundle", tau=0.3, temperature=0.01)
    inputs = list_inputs(streetwork, "test")[:64]
    ref = label(LabelConfig(bundle=bundle, out=tmp_path / "local", batch=4), inputs)
    want = {r["path"]: r for r in read_output(tmp_path / "local").to_pylist()}
    assert ref.written == len(inputs)

    # the head holds no CPUs, so every decode task and cascade actor runs on the worker node that gets killed
    # fast failure detection (a silent node is dead after ~1 s, not ~15 s); no OOM killer: the machine is shared
    fast = {"memory_monitor_refresh_ms": 0, "health_check_period_ms": 300, "health_check_timeout_ms": 300, "health_check_failure_threshold": 3,
            "health_check_initial_delay_ms": 0}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": fast})
    first = cluster.add_node(num_cpus=2)
    killed = {"at": None, "node": first.node_id}
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=True, logging_level="ERROR")
        cluster.wait_for_nodes()

        def progress(_desc: str, done: int, total: int) -> None:
            if killed["at"] is None and done >= 8:
                killed["at"] = (done, total)
                cluster.remove_node(first, allow_graceful=False)  # SIGKILL: its actors, tasks and objects are lost
                cluster.add_node(num_cpus=2)  # the replacement (an autoscaler's job on a real cluster)

        cfg = LabelConfig(bundle=bundle, out=tmp_path / "ray", engine="ray", batch=4, shard_rows=8, actors=2, actor_cpus=0.5,
                          decode_cpus=0.25, threads=1)
        t0 = time.perf_counter()
        rep = label(cfg, inputs, progress)
        print(f"ray job with a node lost: {time.perf_counter() - t0:.1f} s")
        # no network: Ray Data's usage poller (a driver thread querying Prometheus for ever) must not have started
        assert not [t.name for t in threading.enumerate() if "usage" in t.name]
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert killed["at"] is not None and killed["at"][0] < killed["at"][1], "the node was not killed mid-job"
    rows = read_output(tmp_path / "ray").to_pylist()
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(want) and len(paths) == len(set(paths))  # exactly once
    for r in rows:
        w = want[r["path"]]
        assert r["error"] is None and abs(r["probability"] - w["probability"]) <= 1e-6 and r["tiers"] == w["tiers"]
    workers = {r["worker"] for r in rows}
    assert killed["node"][:12] in workers and len(workers) >= 2  # the killed node did work, the replacement finished it
    assert rep.written == len(inputs)
