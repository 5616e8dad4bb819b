"""CLI: ``roadcascade label`` (offline labelling, local or on Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(code)


def label_cmd(
    bundle: Path = typer.Option(..., help="bundle directory"),
    data: str = typer.Option(..., help="manifest dir, roadwork/+none/ folder, parquet file(s), a plain image folder, or a "
                             ".txt list of image paths"),
    out: Path = typer.Option(..., help="output directory of parquet shards; a rerun with the same OUT resumes"),
    engine: str = typer.Option("local", help="local (this process) | ray (Ray Data decode tasks + cascade actor pool)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (e.g. auto, or ray://head:10001); default: start a local one"),
    split: Optional[str] = typer.Option(None, help="only this split of a data set with splits"),
    batch: int = typer.Option(32, min=1, help="images per decode task and per cascade call"),
    shard_rows: int = typer.Option(1024, min=1, help="rows per output shard"),
    actors: Optional[int] = typer.Option(None, min=1, help="ray: cascade actors (default: one per GPU, else one per actor_cpus CPUs; fewer when capped decode tasks need CPUs of their own)"),
    actor_cpus: float = typer.Option(1.0, min=0.01, help="ray: CPUs each CPU cascade actor reserves"),
    decode_cpus: float = typer.Option(1.0, min=0.01, help="ray: CPUs each decode task reserves"),
    decode_tasks: Optional[int] = typer.Option(None, min=1, help="ray: at most this many decode tasks at once (default: "
                                               "as many as the free CPUs allow)"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads per cascade actor (local: of this process)"),
    gpu: str = typer.Option("auto", help="ray: auto | on | off: GPU actors with the GPU fast path when the cluster has GPUs"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the run report here"),
) -> None:
    """P(roadwork) for every image of a data set, as parquet shards (path, probability, decision, tiers, exit, error)."""
    from ..cascade.bundle import BundleError
    from ..cli import progress_bar
    from ..io.data import DataError
    from .inputs import list_inputs
    from .job import label
    from .label import LabelConfig

    try:
        cfg = LabelConfig(bundle=bundle, out=out, engine=engine, batch=batch, shard_rows=shard_rows, address=address, actors=actors,
                          actor_cpus=actor_cpus, decode_cpus=decode_cpus, decode_tasks=decode_tasks, threads=threads, gpu=gpu)
        if not (bundle / "bundle.json").exists():
            raise BundleError(f"no bundle at {bundle} (expected {bundle / 'bundle.json'})")
        inputs = list_inputs(data, split)
    except (ValueError, DataError, BundleError, OSError) as e:
        _fail(str(e))
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            _fail("--engine ray needs Ray: pip install 'ray[data,serve]'")
    with progress_bar() as cb:
        rep = label(cfg, inputs, progress=cb)
    d = rep.as_dict()
    console.print(f"{rep.written} written, {rep.skipped} already in {out}, {rep.errors} error row(s); {rep.img_s:.1f} img/s "
                  f"({rep.seconds:.1f} s" + (f", +{rep.startup_s:.1f} s cluster start" if rep.startup_s else "") + ")")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(d, indent=2))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("label")(label_cmd)
