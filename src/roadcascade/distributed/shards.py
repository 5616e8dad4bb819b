"""The output of ``roadcascade label``: parquet shards in one directory, written so that a crash leaves no half
shard and a rerun can resume.

Each shard is written to a hidden ``.tmp`` file and renamed into place (``os.replace`` is atomic on one file
system), so a reader sees a shard whole or not at all. The writer keeps the set of paths already written
(read back from the shards at start) and drops a row it has seen: every input appears exactly once, even when
Ray re-delivers work after a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("path", pa.string()),
    ("label", pa.int8()),  # ground truth when the data set has one, else -1
    ("probability", pa.float64()),  # calibrated and folded P(roadwork): > 0.5 is roadwork; null on error
    ("decision", pa.string()),  # "roadwork" | "none" | null on error
    ("tiers", pa.list_(pa.string())),  # tiers run, in order
    ("exit", pa.int16()),  # exit point index, -1 on error
    ("rule", pa.string()),  # the rule that decided ("confidence", "final", ...)
    ("error", pa.string()),  # "reason: message" for a bad input, else null
    ("worker", pa.string()),  # the Ray node (or "local") that ran the cascade
])
PREFIX, SUFFIX = "part-", ".parquet"


def shard_files(out: Path) -> list[Path]:
    return sorted(p for p in Path(out).glob(f"{PREFIX}*{SUFFIX}") if p.is_file())


def done_paths(out: Path) -> set[str]:
    """Paths already written to ``out`` (empty for a new directory)."""
    done: set[str] = set()
    for f in shard_files(out):
        done.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
    return done


def read_output(out: Path) -> pa.Table:
    files = shard_files(out)
    return pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files]) if files else SCHEMA.empty_table()


class ShardWriter:
    """Buffers result rows and writes a shard every ``shard_rows`` rows (and at ``close``)."""

    def __init__(self, out: Path, shard_rows: int = 1024, done: Iterable[str] = ()):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1 (got {shard_rows})")
        self.out, self.shard_rows = Path(out), shard_rows
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(f".{PREFIX}*.tmp"):  # a shard a crashed run did not finish
            stale.unlink(missing_ok=True)
        self.seen = set(done)
        self.rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.written = self.duplicates = self.shards = 0

    def add(self, batch: dict[str, list]) -> int:
        """Add the rows of a column batch; returns how many were new."""
        new = 0
        cols = [list(batch[name]) for name in SCHEMA.names]
        for row in zip(*cols):
            if row[0] in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(row[0])
            for name, v in zip(SCHEMA.names, row):
                self.rows[name].append(v)
            new += 1
        if len(self.rows["path"]) >= self.shard_rows:
            self.flush()
        return new

    def flush(self) -> None:
        n = len(self.rows["path"])
        if not n:
            return
        table = pa.table({name: pa.array(vals, type=SCHEMA.field(name).type) for name, vals in self.rows.items()}, schema=SCHEMA)
        name = f"{PREFIX}{uuid.uuid4().hex[:16]}{SUFFIX}"
        tmp = self.out / f".{name}.tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:  # on disk before it becomes visible
            os.fsync(f.fileno())
        os.replace(tmp, self.out / name)
        self.rows = {k: [] for k in SCHEMA.names}
        self.written += n
        self.shards += 1

    def close(self) -> None:
        self.flush()
