r"""Issue 13 on the GPU machine: ``label --engine ray`` against the single-process GPU path, same run, same files.

The GPU machine has no Ray and no network, so Ray 2.60 travels in the carry, stripped to what ``ray.init``, Ray
Data, tasks and actors need (``pack``, here: no dashboard front end, jars, RLlib / Tune / Train / Serve / LLM,
tests or stubs; symbol tables stripped from ``_raylet.so``, ``gcs_server`` and ``raylet``; 19 MB as ``.tar.xz``),
with the packages Ray needs that the device lacks (jsonschema, jsonschema-specifications, referencing, rpds-py;
attrs only if missing there). ``measure`` unpacks it into ``--site`` (once; ``install`` does only that), puts it
first on ``sys.path`` and ``PYTHONPATH`` (Ray's processes inherit it) and checks that ``ray`` comes from there.
Then, in one process:

1. makes the payload sets from the carried photos (32 StreetWork test images) as files with a ``.txt`` list each:
   ``q75`` (224x224 challenge views, JPEG q75, as validators send them; 2048) and ``1920x1080`` (random crops of the
   photos upscaled to that size, JPEG q90, as ``bench gpu --sizes`` makes its sized sets; 512);
2. starts one local Ray (``ray.init(num_cpus=CPUs, num_gpus=GPUs)``) that every Ray row joins;
3. per set, rows over two repetitions, the second in the reverse order, so that drift hits every row alike:

   * ``single-gpu``: the single-process path: ``label.decode_batch`` (the file bytes) then ``label.CascadeRunner``
     with the GPU fast path, batch after batch in this process: what the Ray GPU actor runs, without Ray; timed
     like a job (bundle loading and fast-path start-up included). ``label --engine local`` runs the CPU path;
   * ``fastpath`` (first repetition): the fast path alone on the same payloads in host memory
     (``GpuCascade.predict_stream``, decoding overlapped with the model; no files, no shards), warm: the ceiling;
   * ``ray d=N``: ``label --engine ray``: one GPU actor (the same CascadeRunner) and at most N decode tasks at once
     (``LabelConfig.decode_tasks``, ``--decode-tasks``; in GPU mode they read and size-check the file bytes);
   * ``local-cpu`` (first repetition): ``label --engine local`` on the first ``--cpu-ref`` images;

   reported per row: img/s of the whole job (start-up included), after the first batch (``steady``) and over the
   second half of the rows (``2nd half``: neither start-up nor a pipeline's late first deliveries skew it), when
   the first batch came; and the answers against the first ``single-gpu`` row of the set (paths, errors,
   decisions, tier paths, max |dp|);
4. writes the JSON (``--json``) after every row, so a run cut short keeps its rows, and prints a table of medians.

A row is skipped (and listed) when it would end past ``--budget`` seconds from the start (its estimate: its last
run, else the set's slowest Ray row, else ``--first-row-s``); a row running past ``--row-timeout`` ends the
measurement. When a row fails, the tails of Ray's logs go next to the JSON (``ray-logs.tar.gz``).

Here, once (the wheels from ``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux2014_x86_64 -d DIR``: ray==2.60.0 into /tmp/raywhl312; jsonschema==4.26.0
jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 into /tmp/deps312; attrs==26.1.0 into
/tmp/fallback):

    PYTHONPATH=src .venv/bin/python scripts/ray_gpu_measure.py pack --out .carryray \
        --ray-wheel /tmp/raywhl312/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl --wheels /tmp/deps312 \
        --fallback-wheels /tmp/fallback

On the GPU machine, from the repository root, carrying ``.carryray`` and ``runs/quickstart/stage1``:

    PYTHONPATH=src timeout -k 10 540 python3 scripts/ray_gpu_measure.py measure --bundle runs/quickstart/stage1 \
        --json $OUT/ray_gpu.json > $OUT/ray_gpu.log 2>&1; echo "exit $?"; grep -v -e INFO -e core_worker.cc \
        -e 'Progress bars' -e warnings.warn -e UserWarning $OUT/ray_gpu.log | tail -c 9000

Here, the same code on the CPU in about a minute (``--quick``: the fast path's CPU runtime, 48 + 8 images, decode
1 and 2, 4 logical CPUs; a carry for another Python version is skipped and the installed Ray used):

    PYTHONPATH=src .venv/bin/python scripts/ray_gpu_measure.py measure --quick --json /tmp/rgm-quick/ray_gpu.json
"""

from __future__ import annotations

import _thread
import argparse
import gc
import hashlib
import importlib.util
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARBALL = "ray-site.tar.xz"

# ----------------------------------------------------------------------------- pack (here)
# What ray.init, Ray Data, tasks and actors do not import: the dashboard's web front end, the Java jars, the
# libraries above Ray Data (RLlib, Tune, Train, Serve, LLM), Cython headers, type stubs and tests.
RAY_REMOVE = ("ray/jars", "ray/dashboard/client", "ray/rllib", "ray/tune", "ray/train", "ray/serve", "ray/llm",
              "ray/includes", "ray/_raylet.pxd", "ray/setup-dev.py", "ray/data/llm.py")
REMOVE_DIRS = {"tests", "__pycache__"}
REMOVE_SUFFIXES = (".pyi", ".pxd", ".pxi", ".jar")
# Not stripped in the wheel: the symbol tables alone are 36 MB. --strip-unneeded keeps the dynamic symbols.
STRIP = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet")


def _unzip(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
        for info in z.infolist():  # zipfile drops the mode bits: executables (gcs_server, raylet) need theirs
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest / info.filename, mode)


def _strip_ray(site: Path) -> dict[str, Any]:
    removed = 0
    for rel in RAY_REMOVE:
        p = site / rel
        if p.is_dir():
            removed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p)
        elif p.exists():
            removed += p.stat().st_size
            p.unlink()
    for p in sorted(site.rglob("*"), reverse=True):  # deepest first
        if not p.exists():
            continue
        if p.is_dir() and p.name in REMOVE_DIRS:
            removed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p)
        elif p.is_file() and (p.suffix in REMOVE_SUFFIXES or (p.name == "RECORD" and p.parent.name.endswith(".dist-info"))):
            removed += p.stat().st_size
            p.unlink()
    stripped = {}
    for rel in STRIP:
        p = site / rel
        before = p.stat().st_size
        subprocess.run(["strip", "--strip-unneeded", str(p)], check=True)
        stripped[rel] = [before, p.stat().st_size]
    return {"removed_bytes": removed, "stripped": stripped}


def pack(ray_wheel: Path, wheels: list[Path], fallback: list[Path], data: str, n_photos: int, out: Path) -> dict:
    """Ray (stripped) + the wheels into ``out/ray-site.tar.xz`` (``site/``, and ``fallback/`` for packages used only
    where the device lacks them), and ``n_photos`` StreetWork test photos into ``out/photos``."""
    from roadcascade.io.data import open_dataset

    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"ray_wheel": ray_wheel.name, "python_tag": ray_wheel.name.split("-")[2],
                            "wheels": [w.name for w in wheels], "fallback": [w.name for w in fallback]}
    with tempfile.TemporaryDirectory(prefix="rgm-pack-") as tmp:
        stage = Path(tmp)
        _unzip(ray_wheel, stage / "site")
        info.update(_strip_ray(stage / "site"))
        for w in wheels:
            _unzip(w, stage / "site")
        for w in fallback:
            _unzip(w, stage / "fallback")
        (stage / "fallback").mkdir(exist_ok=True)
        info["unpacked_bytes"] = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
        tar = subprocess.Popen(["tar", "-C", str(stage), "--sort=name", "--owner=0", "--group=0", "-cf", "-", "site",
                                "fallback"], stdout=subprocess.PIPE)
        with open(out / TARBALL, "wb") as f:
            subprocess.run(["xz", "-9e", f"-T{min(4, os.cpu_count() or 1)}", "-c"], stdin=tar.stdout, stdout=f, check=True)
        if tar.wait() != 0:
            raise RuntimeError("tar failed")
    info["tarball_bytes"] = (out / TARBALL).stat().st_size
    photos = out / "photos"
    shutil.rmtree(photos, ignore_errors=True)
    photos.mkdir()
    ds = open_dataset(data, "test").subset(n_photos)
    for s in ds.samples:
        raw = s.data if s.data is not None else s.path.read_bytes()  # type: ignore[union-attr]
        (photos / f"{Path(s.key).stem}.jpg").write_bytes(raw)
    info["photos"] = len(ds.samples)
    info["carry_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    (out / "MANIFEST.json").write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------- install (device)
def install(carry: Path, dest: Path) -> Path:
    """Unpack ``carry/ray-site.tar.xz`` into ``dest`` (once: a stamp with the tarball's SHA-256 skips a repeat)."""
    tarball = carry / TARBALL
    key = hashlib.sha256(tarball.read_bytes()).hexdigest()
    stamp = dest / ".unpacked-from"
    if stamp.exists() and stamp.read_text() == key:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(tarball) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # Python < 3.11.4: the tarball is our own
            tf.extractall(dest)
    stamp.write_text(key)
    return dest


def activate(dest: Path | None) -> dict[str, Any]:
    """Put the unpacked Ray first on ``sys.path`` and on ``PYTHONPATH`` (which Ray's worker processes inherit,
    with the repository's ``src``, as absolute paths); ``fallback/`` only for packages missing here. Then import Ray
    and check that it is the carried one."""
    front: list[str] = []
    if dest is not None:
        front.append(str(dest / "site"))
        missing = [m for m in ("attr", "attrs") if importlib.util.find_spec(m) is None]
        if missing:
            front.append(str(dest / "fallback"))
    old = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    src = str((ROOT / "src").resolve())
    entries = list(dict.fromkeys(front + [src] + old))
    os.environ["PYTHONPATH"] = os.pathsep.join(entries)
    for p in reversed(front + [src]):  # this process: the same order, in front
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    import roadcascade.distributed  # noqa: F401  (usage statistics off before Ray starts)
    import ray

    info = {"ray_version": ray.__version__, "ray_file": ray.__file__, "pythonpath": os.environ["PYTHONPATH"],
            "fallback_used": len(front) > 1}
    if dest is not None and not Path(ray.__file__).resolve().is_relative_to(dest.resolve()):
        raise RuntimeError(f"imported {ray.__file__}, not the carried Ray under {dest}")
    return info


# ----------------------------------------------------------------------------- payload sets
def _payload(job: tuple[str, str, int]) -> bytes:
    """One payload: ``q75`` = a challenge view of the photo (224x224, JPEG q75); ``WxH`` = a random crop (85-100%
    of each side, maybe flipped) upscaled to that size, JPEG q90."""
    import numpy as np

    from roadcascade.io.images import decode_bytes, encode_jpeg

    path, name, variant = job
    img = decode_bytes(Path(path).read_bytes())
    if name == "q75":
        from roadcascade.io.challenge import ChallengeConfig, challenge_views

        view = challenge_views(img, seed=1, key=f"{Path(path).stem}#{variant}", n=1,
                               cfg=ChallengeConfig(size=224, jpeg_quality=None))[0]
        return encode_jpeg(view, 75)
    from roadcascade.bench.native import upscaled_jpeg

    w, h = (int(v) for v in name.split("x"))
    rng = np.random.default_rng([variant, zlib.crc32(Path(path).stem.encode())])
    fh, fw = rng.uniform(0.85, 1.0, 2)
    ch, cw = max(8, int(img.shape[0] * fh)), max(8, int(img.shape[1] * fw))
    y, x = int(rng.integers(0, img.shape[0] - ch + 1)), int(rng.integers(0, img.shape[1] - cw + 1))
    crop = img[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return upscaled_jpeg(crop, (w, h))


def make_sets(photos: Path, work: Path, sizes: dict[str, int], workers: int) -> dict[str, dict[str, Any]]:
    """``work/sets/<name>/<i>.jpg`` and the list ``work/sets/<name>.txt`` per set (reused when complete).
    Forks ``workers`` processes: call before CUDA starts in this process."""
    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"no photos in {photos}")
    out: dict[str, dict[str, Any]] = {}
    for name, n in sizes.items():
        d, listing = work / "sets" / name, work / "sets" / f"{name}.txt"
        t0 = time.perf_counter()
        if not (listing.exists() and len(listing.read_text().split()) == n):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            jobs = [(str(files[i % len(files)]), name, i // len(files)) for i in range(n)]
            with mp.get_context("fork").Pool(max(1, workers)) as pool:
                blobs = pool.map(_payload, jobs, chunksize=4)
            for i, b in enumerate(blobs):
                (d / f"{i:05d}.jpg").write_bytes(b)
            listing.write_text("".join(f"{name}/{i:05d}.jpg\n" for i in range(n)))
        sizes_b = [p.stat().st_size for p in d.iterdir()]
        out[name] = {"n": n, "photos": len(files), "mean_bytes": sum(sizes_b) / len(sizes_b), "list": str(listing),
                     "made_s": round(time.perf_counter() - t0, 2)}
        print(f"set {name}: {n} files, mean {out[name]['mean_bytes'] / 1e3:.1f} kB ({out[name]['made_s']} s)", flush=True)
    return out


# ----------------------------------------------------------------------------- rows
def compare(ref: Path, out: Path) -> dict[str, Any]:
    """``out``'s answers against ``ref``'s on the paths of ``out`` (all of them must be in ``ref``)."""
    from roadcascade.distributed.shards import read_output

    x = {r["path"]: r for r in read_output(ref).to_pylist()}
    y = {r["path"]: r for r in read_output(out).to_pylist()}
    ok = [k for k in y if k in x and x[k]["error"] is None and y[k]["error"] is None]
    dp = [abs(x[k]["probability"] - y[k]["probability"]) for k in ok]
    return {"rows": len(y), "missing_in_ref": sum(k not in x for k in y), "ok": len(ok),
            "errors_differ": sum((x[k]["error"] is None) != (y[k]["error"] is None) for k in y if k in x),
            "max_abs_dp": max(dp, default=0.0), "mean_abs_dp": statistics.fmean(dp) if dp else 0.0,
            "decisions_differ": sum(x[k]["decision"] != y[k]["decision"] for k in ok),
            "tiers_differ": sum(x[k]["tiers"] != y[k]["tiers"] for k in ok)}


class Marks:
    """A label progress callback that keeps (time, rows written) per batch: ``second_half_img_s`` is the rate over the
    second half of the rows, which neither the start-up nor the batches a pipeline delivers late at its start skew."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.n: list[int] = []

    def __call__(self, desc: str = "", n: int = 0, total: int = 0) -> None:
        self.t.append(time.perf_counter())
        self.n.append(n)

    def second_half_img_s(self) -> float:
        if len(self.n) < 3:
            return 0.0
        i = next(k for k, v in enumerate(self.n) if v >= self.n[-1] / 2)
        dt = self.t[-1] - self.t[i]
        return (self.n[-1] - self.n[i]) / dt if dt > 0 else 0.0


def with_squares(bundle: Path, squares: int, work: Path) -> Path:
    """A copy of ``bundle`` whose tiers take ``squares`` square views (1: one resized tensor, so the first tier gets
    the fast path's compiled engine; the quickstart bundle's 3 run the tier's own code on the decoded images)."""
    dest = work / f"bundle-squares{squares}"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(bundle, dest)
    doc = json.loads((dest / "bundle.json").read_text())
    for tier in doc["tiers"]:
        if "squares" in tier:
            tier["squares"] = squares
    (dest / "bundle.json").write_text(json.dumps(doc, indent=2))
    return dest


def single_gpu(bundle: Path, inputs, out: Path, batch: int, device: str, threads: int,
               fast: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The single-process path (decode_batch on the file bytes, then CascadeRunner with the GPU fast path), timed
    like a label job (bundle loading and warm-up included; first_s = when the first batch was written). With
    ``fast``, then the fast path alone on the same payloads in host memory, warm (predict_stream, twice)."""
    import torch

    from roadcascade.distributed.label import CascadeRunner, _columns, decode_batch
    from roadcascade.distributed.shards import ShardWriter
    from roadcascade.io.images import DecodeLimits

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    runner = CascadeRunner(str(bundle), device=device, threads=threads, gpu="on")
    runner.worker = "local"
    init_s = time.perf_counter() - t0
    writer = ShardWriter(out, 1024)
    first = (0, 0.0)
    limits = DecodeLimits()
    marks = Marks()
    for i in range(0, len(inputs), batch):
        chunk = inputs[i:i + batch]
        writer.add(runner(decode_batch(_columns(chunk), limits, None, encoded=True)))
        marks(n=i + len(chunk))
        if not first[0]:
            first = (len(chunk), time.perf_counter() - t0)
    writer.close()
    sec = time.perf_counter() - t0
    n = writer.written
    row = {"written": n, "seconds": sec, "img_s": n / sec, "first_rows": first[0], "first_s": first[1],
           "steady_img_s": (n - first[0]) / (sec - first[1]) if n > first[0] and sec > first[1] else 0.0,
           "second_half_img_s": marks.second_half_img_s(), "init_s": init_s, "torch_threads": torch.get_num_threads(),
           "fast_path": runner.gpu is not None}
    fp = None
    if runner.gpu is not None:
        gc_ = runner.gpu
        row["gpu_decoder"] = getattr(gc_, "gpu_decoder", None)
        row["decode_procs"] = getattr(gc_.cfg, "procs", None)
        if fast:
            pool = [Path(r.file).read_bytes() for r in inputs]
            batches = [pool[i:i + batch] for i in range(0, len(pool), batch)]
            rates = []
            for _ in range(2):
                t1 = time.perf_counter()
                done = sum(len(res.probability) for res in gc_.predict_stream(batches))
                rates.append(done / (time.perf_counter() - t1))
            fp = {"written": len(pool), "img_s": max(rates), "runs_img_s": rates, "batch": batch}
        gc_.close()
    del runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row, fp


def ray_row(bundle: Path, inputs, out: Path, batch: int, decode_tasks: int) -> dict[str, Any]:
    from roadcascade.distributed.job import label
    from roadcascade.distributed.label import LabelConfig

    shutil.rmtree(out, ignore_errors=True)
    cfg = LabelConfig(bundle=bundle, out=out, engine="ray", batch=batch, actors=1, gpu="on", decode_tasks=decode_tasks)
    marks = Marks()
    return {**label(cfg, inputs, progress=marks).as_dict(), "second_half_img_s": marks.second_half_img_s()}


def cpu_row(bundle: Path, inputs, out: Path, batch: int, threads: int) -> dict[str, Any]:
    """``label --engine local`` with ``threads`` torch threads (torch's default in a fresh process: the single-gpu
    row may have changed this process's)."""
    from roadcascade.distributed.job import label
    from roadcascade.distributed.label import LabelConfig

    shutil.rmtree(out, ignore_errors=True)
    marks = Marks()
    rep = label(LabelConfig(bundle=bundle, out=out, engine="local", batch=batch, threads=threads), inputs, progress=marks)
    return {**rep.as_dict(), "second_half_img_s": marks.second_half_img_s(), "torch_threads": threads}


def save_ray_logs(dest: Path, max_bytes: int = 200_000) -> str | None:
    """The tails of this session's Ray logs (``*.err``, ``*.out``, ``*.log``) as one tar.gz."""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    if not logs.is_dir():
        return None
    with tarfile.open(dest, "w:gz") as tf:
        for p in sorted(logs.rglob("*")):
            if p.is_file() and p.suffix in (".err", ".out", ".log"):
                with open(p, "rb") as f:
                    f.seek(max(0, p.stat().st_size - max_bytes))
                    data = f.read()
                ti = tarfile.TarInfo(str(p.relative_to(logs)))
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return str(dest)


# ----------------------------------------------------------------------------- measure
class Watchdog:
    """Interrupts the main thread (KeyboardInterrupt) when a row runs past ``seconds``."""

    def __init__(self, seconds: float):
        self.seconds, self.fired, self._t = seconds, False, None

    def __enter__(self):
        def fire():
            self.fired = True
            _thread.interrupt_main()

        self._t = threading.Timer(self.seconds, fire)
        self._t.daemon = True
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._t.cancel()
        return False


RATES = ("img_s", "steady_img_s", "second_half_img_s", "first_s")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per set and row: medians over the repetitions, and the ratios to the single-gpu row's medians."""
    out: dict[str, Any] = {}
    for r in rows:
        if "error" in r or "img_s" not in r:
            continue
        s = out.setdefault(r["set"], {}).setdefault(r["row"], {**{k: [] for k in RATES}, "n": 0, "max_abs_dp": 0.0,
                                                               "decisions_differ": 0, "tiers_differ": 0})
        s["n"] = max(s["n"], int(r.get("written", 0)))
        for k in RATES:
            s[k].append(float(r.get(k, 0.0)))
        for k in ("max_abs_dp", "decisions_differ", "tiers_differ"):
            s[k] = max(s[k], (r.get("answers") or {}).get(k, 0))
    for per in out.values():
        for s in per.values():
            s["n_runs"] = len(s["img_s"])
            for k in RATES:
                s[f"median_{k}"] = statistics.median(s[k])
        base = per.get("single-gpu")
        for s in per.values():
            for k in ("img_s", "second_half_img_s"):
                b = base[f"median_{k}"] if base else 0.0
                s[f"{k}_x_single"] = s[f"median_{k}"] / b if b else None
    return out


def table(res: dict[str, Any]) -> str:
    """Medians per set and row: whole job img/s (start-up included), img/s after the first batch and over the second
    half of the rows, when the first batch came, the ratios to single-gpu, and the answers against it."""
    info = res["info"]
    lines = [f"device {info.get('device')}  cpus {info.get('cpus')}  torch {info.get('torch')}  ray {info.get('ray_version')}"
             f"  ray.init {res.get('ray_startup_s', float('nan')):.1f} s  total {res.get('elapsed_s', 0):.0f} s",
             f"{'set':<10}{'row':<11}{'runs':>4}{'n':>6}{'img/s':>8}{'steady':>8}{'2nd half':>9}{'first s':>8}"
             f"{'x1gpu':>6}{'half x':>7}{'max|dp|':>9}{'dec!=':>6}"]

    def ratio(v: float | None, w: int) -> str:
        return f"{v:>{w}.2f}" if v else " " * w

    for name, per in res.get("summary", {}).items():
        for row, s in per.items():
            lines.append(f"{name:<10}{row:<11}{s['n_runs']:>4}{s['n']:>6}{s['median_img_s']:>8.1f}"
                         f"{s['median_steady_img_s']:>8.1f}{s['median_second_half_img_s']:>9.1f}{s['median_first_s']:>8.2f}"
                         f"{ratio(s['img_s_x_single'], 6)}{ratio(s['second_half_img_s_x_single'], 7)}"
                         f"{s['max_abs_dp']:>9.2g}{s['decisions_differ']:>6}")
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"FAILED {r['set']} {r['row']} rep {r['rep']}: {r['error'][:300]}")
    if res.get("skipped"):
        lines.append("skipped (budget): " + ", ".join(f"{s['set']}/{s['row']}/rep{s['rep']}" for s in res["skipped"]))
    return "\n".join(lines)


def _plan(sets: list[str], decode: list[int], repeats: int, cpu_ref: int) -> list[tuple[int, str, str]]:
    """(rep, set, row) in run order: every set's first repetition first; the second reverses the row order."""
    rays = [f"ray d={d}" for d in decode]
    order = []
    for rep in range(repeats):
        for s in sets:
            rows = ["single-gpu", *rays] if rep % 2 == 0 else [*reversed(rays), "single-gpu"]
            if rep == 0 and cpu_ref:
                rows.append("local-cpu")
            order += [(rep, s, r) for r in rows]
    return order


def _estimate(done: dict[tuple[str, str], float], name: str, row: str, default: float) -> float:
    if (name, row) in done:
        return done[(name, row)]
    if row.startswith("ray"):
        same = [v for (s, r), v in done.items() if s == name and r.startswith("ray")]
        if same:
            return max(same)
    return default


def measure(a: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    res: dict[str, Any] = {"info": {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "python": platform.python_version(), "cpus": os.cpu_count()},
                           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "func"},
                           "rows": [], "skipped": []}

    def save() -> None:
        res["elapsed_s"] = time.perf_counter() - t_start
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2, default=str))
        tmp.replace(a.json)

    dest = None
    if a.carry is not None and (a.carry / TARBALL).exists():
        tag = json.loads((a.carry / "MANIFEST.json").read_text()).get("python_tag")
        here = f"cp{sys.version_info.major}{sys.version_info.minor}"
        if tag == here:
            t0 = time.perf_counter()
            dest = install(a.carry, a.site)
            res["info"]["install_s"] = time.perf_counter() - t0
        else:  # e.g. the cp312 carry on this Python 3.11 machine: the installed Ray runs the same code
            print(f"the carried Ray is for {tag}, this is {here}: using the installed Ray", flush=True)
    res["info"].update(activate(dest))
    print(f"ray {res['info']['ray_version']} from {res['info']['ray_file']}", flush=True)
    save()

    sizes = dict(zip(a.sets, a.n))
    res["sets"] = make_sets(a.photos or a.carry / "photos", a.work, sizes, workers=max(1, (os.cpu_count() or 2) - 1))
    bundle = a.bundle.resolve() if a.squares is None else with_squares(a.bundle.resolve(), a.squares, a.work)

    import numpy
    import pandas
    import pyarrow
    import ray
    import torch

    from roadcascade.distributed.inputs import list_inputs

    default_threads = torch.get_num_threads()  # before any row sets its own
    res["info"]["torch_threads_default"] = default_threads
    cuda = torch.cuda.is_available() and a.device != "cpu"
    device = "cuda" if cuda else "cpu"
    res["info"].update(device=torch.cuda.get_device_name(0) if cuda else (platform.processor() or "cpu"), torch=torch.__version__,
                       numpy=numpy.__version__, pandas=pandas.__version__, pyarrow=pyarrow.__version__)
    try:
        res["info"]["dev_shm_free_gb"] = shutil.disk_usage("/dev/shm").free / 2**30
    except OSError:
        pass
    inputs = {name: list_inputs(res["sets"][name]["list"]) for name in a.sets}
    t0 = time.perf_counter()
    try:  # one local Ray for every row (label's connect() joins it); no OOM killer, no dashboard
        ray.init(num_cpus=a.num_cpus, num_gpus=(torch.cuda.device_count() if cuda else 0), include_dashboard=False,
                 configure_logging=True, logging_level="WARNING", log_to_driver=False,
                 _system_config={"memory_monitor_refresh_ms": 0})
    except Exception as e:
        res["error"] = f"ray.init: {type(e).__name__}: {str(e)[:2000]}"
        res["ray_logs"] = save_ray_logs(a.json.parent / "ray-logs.tar.gz")
        save()
        raise
    res["ray_startup_s"] = time.perf_counter() - t0
    res["info"]["ray_resources"] = ray.cluster_resources()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    print(f"ray.init {res['ray_startup_s']:.1f} s: {res['info']['ray_resources']}", flush=True)
    save()

    done: dict[tuple[str, str], float] = {}
    refs: dict[str, Path] = {}
    deadline = t_start + a.budget
    failed = False
    try:
        for rep, name, row in _plan(a.sets, a.decode_tasks, a.repeats, a.cpu_ref):
            est = _estimate(done, name, row, a.first_row_s)
            if time.perf_counter() + est > deadline:
                res["skipped"].append({"set": name, "rep": rep, "row": row, "estimate_s": est})
                continue
            out = a.work / "out" / name / f"{row.replace(' ', '').replace('=', '')}-r{rep}"
            rec: dict[str, Any] = {"set": name, "rep": rep, "row": row}
            t1 = time.perf_counter()
            try:
                with Watchdog(a.row_timeout) as wd:
                    try:
                        if row == "single-gpu":
                            r, fp = single_gpu(bundle, inputs[name], out, a.batch, device,
                                               a.local_threads or default_threads, fast=rep == 0)
                            rec.update(r)
                            if fp is not None:
                                res["rows"].append({"set": name, "rep": rep, "row": "fastpath", **fp})
                        elif row == "local-cpu":
                            rec.update(cpu_row(bundle, inputs[name][:a.cpu_ref], out, a.batch, default_threads))
                        else:
                            rec["decode_tasks"] = int(row.split("=")[1])
                            rec.update(ray_row(bundle, inputs[name], out, a.batch, rec["decode_tasks"]))
                    except KeyboardInterrupt:
                        if not wd.fired:
                            raise
                        rec["error"] = f"timeout: the row ran past --row-timeout {a.row_timeout} s"
            except Exception as e:  # noqa: BLE001 - recorded, the next rows still run
                rec["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            rec["wall_s"] = time.perf_counter() - t1
            done[(name, row)] = rec["wall_s"]
            if "error" not in rec:
                if name not in refs and row == "single-gpu":
                    refs[name] = out
                if name in refs and out != refs[name]:
                    rec["answers"] = compare(refs[name], out)
            else:
                failed = True
            res["rows"].append(rec)
            res["summary"] = summarise(res["rows"])
            save()
            msg = rec.get("error") or (f"{rec['img_s']:.1f} img/s, steady {rec.get('steady_img_s', 0):.1f}, 2nd half "
                                       f"{rec.get('second_half_img_s', 0):.1f}, first batch at "
                                       f"{rec['first_s']:.1f} s" + (f", answers {rec['answers']}" if "answers" in rec else ""))
            print(f"[{time.perf_counter() - t_start:5.0f} s] {name} {row} rep {rep}: {msg}", flush=True)
            if "error" in rec and rec["error"].startswith("timeout"):
                break
    finally:
        if failed:
            res["ray_logs"] = save_ray_logs(a.json.parent / "ray-logs.tar.gz")
        res["summary"] = summarise(res["rows"])
        res["finished"] = True
        save()
        ray.shutdown()
    return res


# ----------------------------------------------------------------------------- CLI
FULL = {"n_q75": 2048, "n_sized": 512, "decode_tasks": "1,2,4,8,14", "repeats": 2, "batch": 64, "cpu_ref": 128,
        "num_cpus": os.cpu_count() or 1, "device": "auto", "budget": 380.0, "first_row_s": 40.0,
        "work": Path(tempfile.gettempdir()) / "rgm-work"}
QUICK = {**FULL, "n_q75": 48, "n_sized": 8, "decode_tasks": "1,2", "repeats": 1, "batch": 8, "cpu_ref": 16, "num_cpus": 4,
         "device": "cpu", "budget": 240.0, "first_row_s": 30.0, "work": Path(tempfile.gettempdir()) / "rgm-quick"}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("pack", help="here: the stripped Ray, its missing dependencies and the photos -> --out")
    p.add_argument("--ray-wheel", type=Path, required=True)
    p.add_argument("--wheels", type=Path, required=True, help="folder of the dependency wheels to add (jsonschema ...)")
    p.add_argument("--fallback-wheels", type=Path, default=None, help="folder of wheels used only where missing (attrs)")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/streetwork"))
    p.add_argument("--n-photos", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / ".carryray")

    p = sub.add_parser("install", help="device: unpack the carried Ray and check that it imports")
    p.add_argument("--carry", type=Path, default=ROOT / ".carryray")
    p.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "rgm-site")

    p = sub.add_parser("measure", help="device: the rows, JSON after each")
    p.add_argument("--carry", type=Path, default=ROOT / ".carryray", help="the packed carry (Ray is taken from here "
                   "when it holds ray-site.tar.xz, else the installed one is used)")
    p.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "rgm-site")
    p.add_argument("--photos", type=Path, default=None, help="photos for the payload sets (default: CARRY/photos)")
    p.add_argument("--bundle", type=Path, default=ROOT / "runs/quickstart/stage1")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="payload sets and outputs (default: TMP/rgm-work, quick: TMP/rgm-quick)")
    p.add_argument("--sets", default="q75,1920x1080", help="q75 and/or WxH, comma-separated")
    p.add_argument("--n", default=None, help="images per set, comma-separated (default: 2048 q75, 512 others; quick: 48, 8)")
    p.add_argument("--decode-tasks", default=None, help="the ray rows: at most this many decode tasks at once, "
                   "comma-separated (default 1,2,4,8,14; quick: 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions, the second in reverse order (default 2; quick: 1)")
    p.add_argument("--batch", type=int, default=None, help="images per decode task and per cascade call (default 64; quick: 8)")
    p.add_argument("--cpu-ref", type=int, default=None, help="local-cpu row: label --engine local on this many images, "
                   "0: none (default 128; quick: 16)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: this machine's; quick: 4)")
    p.add_argument("--device", default=None, help="auto | cpu (default auto; quick: cpu)")
    p.add_argument("--local-threads", type=int, default=1, help="torch threads of the single-gpu row (1: as in the Ray "
                   "actor, where Ray sets OMP_NUM_THREADS to its 1 CPU; 0: torch's default)")
    p.add_argument("--budget", type=float, default=None, help="seconds from the start; rows that would end later are "
                   "skipped (default 380; quick: 240)")
    p.add_argument("--first-row-s", type=float, default=None, help="the budget's guess for a row never run before "
                   "(default 40; quick: 30)")
    p.add_argument("--row-timeout", type=float, default=150.0, help="a row running longer ends the measurement")
    p.add_argument("--squares", type=int, default=None, help="run a copy of the bundle with this many square views per "
                   "tier (1: the compiled engine; each new Ray actor compiles it again)")
    p.add_argument("--quick", action="store_true", help="a CPU smoke test of the same code (about a minute)")
    a = ap.parse_args()

    if a.cmd == "pack":
        fallback = sorted(a.fallback_wheels.glob("*.whl")) if a.fallback_wheels else []
        print(json.dumps(pack(a.ray_wheel, sorted(a.wheels.glob("*.whl")), fallback, a.data, a.n_photos, a.out), indent=2))
    elif a.cmd == "install":
        t0 = time.perf_counter()
        dest = install(a.carry, a.site)
        print(json.dumps({"install_s": time.perf_counter() - t0, **activate(dest)}, indent=2))
    else:
        defaults = QUICK if a.quick else FULL
        for k, v in defaults.items():
            if hasattr(a, k) and getattr(a, k) is None:
                setattr(a, k, v)
        a.sets = [s.strip() for s in a.sets.split(",") if s.strip()]
        a.n = _ints(a.n) if a.n else [defaults["n_q75" if s == "q75" else "n_sized"] for s in a.sets]
        a.decode_tasks = _ints(a.decode_tasks)
        if len(a.n) != len(a.sets):
            ap.error("--n needs one count per set")
        if any(s != "q75" and not all(v.isdigit() for v in s.split("x")) for s in a.sets):
            ap.error("--sets: q75 or WxH")
        res = measure(a)
        print(table(res), flush=True)


if __name__ == "__main__":
    main()
