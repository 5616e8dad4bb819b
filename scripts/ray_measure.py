"""Issue 13 measurements in one run, on this machine: ``label --engine ray`` vs ``--engine local`` img/s on StreetWork
test (identical answers), and Ray Serve vs the native server at saturation on loopback plus a fuzz run of each.
Runs alternate (local, ray, local, ray, ...) so that the shared machine's load hits both; medians are reported.

    PYTHONPATH=src python scripts/ray_measure.py --bundle runs/quickstart/bundle --json runs/ray-measure.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from roadcascade.distributed.inputs import list_inputs
from roadcascade.distributed.job import label
from roadcascade.distributed.label import LabelConfig
from roadcascade.distributed.shards import read_output
from roadcascade.bench.loadgen import run_fuzz, run_load, validator_images
from roadcascade.bench.serving import ServerProcess


def compare(a: Path, b: Path) -> dict:
    x = {r["path"]: r for r in read_output(a).to_pylist()}
    y = {r["path"]: r for r in read_output(b).to_pylist()}
    ok = [k for k in x if x[k]["error"] is None]
    return {"rows": [len(x), len(y)], "same_paths": set(x) == set(y),
            "max_abs_prob_diff": max((abs(x[k]["probability"] - y[k]["probability"]) for k in ok), default=0.0),
            "decisions_differ": sum(x[k]["decision"] != y[k]["decision"] for k in ok),
            "tiers_differ": sum(x[k]["tiers"] != y[k]["tiers"] for k in ok)}


def label_runs(bundle: Path, data: str, work: Path, repeats: int, ray_kw: dict, local_threads: int) -> dict:
    import ray

    inputs = list_inputs(data, "test")
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR",
             _system_config={"memory_monitor_refresh_ms": 0})
    startup = time.perf_counter() - t0
    runs: dict[str, list] = {"local": [], "ray": []}
    for i in range(repeats):
        for engine in ("local", "ray"):
            out = work / f"label-{engine}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            kw = ray_kw if engine == "ray" else {"threads": local_threads}
            rep = label(LabelConfig(bundle=bundle, out=out, engine=engine, batch=32, **kw), inputs)
            runs[engine].append(rep.as_dict())
            print(f"label {engine} #{i}: {rep.img_s:.1f} img/s, steady {rep.steady_img_s:.1f} ({rep.written} images, "
                  f"{rep.seconds:.1f} s)", flush=True)
    ray.shutdown()
    med = {e: statistics.median(r["img_s"] for r in runs[e]) for e in runs}
    steady = {e: statistics.median(r["steady_img_s"] for r in runs[e]) for e in runs}
    return {"n_images": len(inputs), "ray_kw": ray_kw, "local_threads": local_threads, "ray_startup_s": startup, "runs": runs,
            "median_img_s": med, "ratio_ray_to_local": med["ray"] / med["local"], "median_steady_img_s": steady,
            "steady_ratio_ray_to_local": steady["ray"] / steady["local"], "answers": compare(work / "label-local-0", work / "label-ray-0")}


def cli_label_runs(bundle: Path, data: str, work: Path, repeats: int, actors: int | None, threads: int | None,
                   local_threads: int | None) -> dict:
    """As ``label_runs``, but each job is its own ``roadcascade label`` process, the way a user runs it: the local
    engine in a fresh process, the ray engine as a fresh driver joining a running cluster (``ray start --head``,
    started once, standing in for an existing one). Each side pays its own imports and loading inside its job."""
    import subprocess
    import sys

    exe = [sys.executable, "-m", "roadcascade.cli"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    t0 = time.perf_counter()
    subprocess.run([ray_bin, "start", "--head", f"--num-cpus={os.cpu_count()}", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env)
    startup = time.perf_counter() - t0
    runs: dict[str, list] = {"local": [], "ray": []}
    try:
        for i in range(repeats):
            for engine in ("local", "ray"):
                out = work / f"cli-label-{engine}-{i}"
                shutil.rmtree(out, ignore_errors=True)
                js = work / f"cli-label-{engine}-{i}.json"
                if engine == "ray":  # None: the command's own default
                    extra = ["--engine", "ray", "--address", "auto"] + (["--actors", str(actors)] if actors else []) + \
                        (["--threads", str(threads)] if threads else [])
                else:
                    extra = ["--threads", str(local_threads)] if local_threads else []
                t1 = time.perf_counter()
                subprocess.run(exe + ["label", "--bundle", str(bundle), "--data", data, "--split", "test", "--out", str(out),
                                      "--batch", "32", "--json", str(js), *extra], check=True, capture_output=True, env=env)
                r = json.loads(js.read_text())
                r["process_s"] = time.perf_counter() - t1  # the whole command, interpreter start and imports included
                runs[engine].append(r)
                print(f"cli label {engine} #{i}: {r['img_s']:.1f} img/s ({r['seconds']:.1f} s in the job, "
                      f"{r['process_s']:.1f} s the process)", flush=True)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env)
    med = {e: statistics.median(r["img_s"] for r in runs[e]) for e in runs}
    proc = {e: statistics.median(r["written"] / r["process_s"] for r in runs[e]) for e in runs}
    return {"mode": "cli", "cluster_start_s": startup, "runs": runs, "median_img_s": med,
            "ratio_ray_to_local": med["ray"] / med["local"], "median_process_img_s": proc,
            "process_ratio_ray_to_local": proc["ray"] / proc["local"],
            "answers": compare(work / "cli-label-local-0", work / "cli-label-ray-0")}


def serve_runs(bundle: Path, work: Path, repeats: int, duration: float, concurrency: int, fuzz: int, threads: int) -> dict:
    images, source = validator_images(64, seed=1)
    engines = {"native": [], "ray": ["--engine", "ray"]}
    out: dict = {"images": source, "concurrency": concurrency, "duration_s": duration, "runs": {e: [] for e in engines}, "fuzz": {}}
    for i in range(repeats):
        for name, args in engines.items():
            with ServerProcess(bundle, args, threads=threads, log=work / f"serve-{name}.log") as srv:
                srv.wait_ready(300)
                run_load(srv.url, concurrency=concurrency, duration=5.0, images=images)  # warm-up
                rep = run_load(srv.url, concurrency=concurrency, duration=duration, images=images)
                out["runs"][name].append({k: rep[k] for k in ("ok_rps", "throughput_rps", "status_counts", "server_errors_5xx")}
                                         | {"p50_ms": rep["latency_ms"]["all"].get("p50"), "p99_ms": rep["latency_ms"]["all"].get("p99")})
                print(f"serve {name} #{i}: {rep['ok_rps']:.1f} ok req/s {rep['status_counts']}", flush=True)
                if i == 0 and fuzz:
                    fz = run_fuzz(srv.url, fuzz, concurrency=8, timeout=60)
                    out["fuzz"][name] = {k: fz[k] for k in ("requests", "status_counts", "server_errors_5xx", "no_response",
                                                            "answers_same_after", "ready_after", "ok")}
                    print(f"fuzz {name}: {fz['requests']} requests, {fz['server_errors_5xx']} x 5xx", flush=True)
    med = {e: statistics.median(r["ok_rps"] for r in out["runs"][e]) for e in engines}
    out["median_ok_rps"] = med
    out["ratio_ray_to_native"] = med["ray"] / med["native"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/streetwork"))
    ap.add_argument("--json", type=Path, default=Path("runs/ray-measure.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--serve-repeats", type=int, default=2)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--fuzz", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model process, the same for both engines "
                    "(1 on the shared 2-core machine: with 2, OpenMP threads fight the other jobs' and run several times slower)")
    ap.add_argument("--actors", type=int, default=1, help="ray cascade actors")
    ap.add_argument("--local-threads", type=int, default=None, help="torch threads of the local engine (default: --threads)")
    ap.add_argument("--skip-label", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--defaults", action="store_true", help="with --cli: each engine with the command's defaults (local: "
                    "torch's threads; ray: its planned actors), not --threads / --actors")
    ap.add_argument("--cli", action="store_true", help="label jobs as separate `roadcascade label` processes (the ray ones "
                    "joining a cluster from `ray start --head`) instead of calls in this process")
    a = ap.parse_args()
    work = a.json.parent / "ray-measure"
    work.mkdir(parents=True, exist_ok=True)
    rep: dict = {"cpu_count": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "load_avg_start": os.getloadavg()}
    if not a.skip_label:
        if a.cli:
            d = a.defaults
            rep["label"] = cli_label_runs(a.bundle, a.data, work, a.repeats, None if d else a.actors, None if d else a.threads,
                                          None if d else a.local_threads or a.threads)
            rep["label"]["defaults"] = d
        else:
            rep["label"] = label_runs(a.bundle, a.data, work, a.repeats, {"actors": a.actors, "threads": a.threads},
                                      a.local_threads or a.threads)
        a.json.write_text(json.dumps(rep, indent=2))
    if not a.skip_serve:
        rep["serve"] = serve_runs(a.bundle, work, a.serve_repeats, a.duration, a.concurrency, a.fuzz, a.threads)
    rep["load_avg_end"] = os.getloadavg()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rep, indent=2))
    print(json.dumps({k: rep[k] for k in ("label", "serve") if k in rep and isinstance(rep[k], dict)}, default=str)[:3000])


if __name__ == "__main__":
    main()
