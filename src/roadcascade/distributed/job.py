"""A labelling job: what is already in OUT is skipped, the rest goes to the chosen engine (this process, or
Ray Data in ``ray_label``), the shards are read back for the report. Kept apart from ``label`` (the pieces
both engines run) so that ``ray_label`` can import those without a cycle."""

from __future__ import annotations

import time

from .inputs import InputRecord
from .label import LabelConfig, LabelReport, Progress, run_local
from .ray_label import run_ray
from .shards import ShardWriter, done_paths, read_output


def label(cfg: LabelConfig, inputs: list[InputRecord], progress: Progress | None = None) -> LabelReport:
    """Label ``inputs`` into ``cfg.out``, skipping paths already there."""
    user_progress = progress or (lambda *_: None)
    first: dict[str, float] = {}

    def progress(desc: str, n: int, total: int) -> None:
        if not first:
            first.update(rows=n, t=time.perf_counter())
        user_progress(desc, n, total)

    done = done_paths(cfg.out)
    todo = [r for r in inputs if r.path not in done]
    writer = ShardWriter(cfg.out, cfg.shard_rows, done)
    startup = 0.0
    t0 = time.perf_counter()
    if todo and cfg.engine == "ray":
        startup = run_ray(cfg, todo, writer, progress)
    elif todo:
        run_local(cfg, todo, writer, progress)
    writer.close()
    seconds = time.perf_counter() - t0 - startup
    table = read_output(cfg.out)
    errors = sum(1 for e in table.column("error").to_pylist() if e is not None)
    workers: dict[str, int] = {}
    for w in table.column("worker").to_pylist():
        workers[w] = workers.get(w, 0) + 1
    rep = LabelReport(cfg.engine, len(inputs), len(inputs) - len(todo), writer.written, errors, writer.duplicates,
                      seconds, startup, workers)
    if first:
        rep.first_rows, rep.first_s = int(first["rows"]), first["t"] - t0 - startup
    return rep
