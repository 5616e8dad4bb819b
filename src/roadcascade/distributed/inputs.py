"""What ``roadcascade label`` reads: every dataset ``data.open_dataset`` opens (manifest, ``roadwork/`` + ``none/``
folders, parquet with image bytes), plus unlabelled inputs: a plain folder of images or a text file listing image
paths. Each input becomes one :class:`InputRecord` whose ``path`` is its key in the output."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..io.data import IMAGE_SUFFIXES, DataError, open_dataset

UNLABELLED = -1


@dataclass(frozen=True)
class InputRecord:
    path: str  # the key written to the output (file path, manifest file name, or "file.parquet#row")
    label: int = UNLABELLED  # ground truth when the data set has one
    file: str | None = None  # where to read the bytes from
    data: bytes | None = None  # or the bytes themselves (parquet)

    def as_row(self) -> dict:
        return {"path": self.path, "label": self.label, "file": self.file, "data": self.data}


def _plain_folder(root: Path) -> list[InputRecord]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [InputRecord(path=str(p), file=str(p)) for p in files]


def _path_list(listing: Path) -> list[InputRecord]:
    """One path per line (relative paths are relative to the list file); blank lines and ``#`` comments skipped.
    A listed path that does not exist stays an input: it becomes an error row, not a crash."""
    out = []
    for line in listing.read_text(errors="surrogateescape").splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        p = Path(name) if os.path.isabs(name) else listing.parent / name
        out.append(InputRecord(path=name, file=str(p)))
    return out


def list_inputs(spec: str | os.PathLike, split: str | None = None) -> list[InputRecord]:
    """The inputs of ``spec`` in a stable order (keys unique). ``split`` applies to data sets that have splits."""
    root = Path(spec)
    if not root.exists():
        raise DataError(f"input not found: {root}")
    if root.is_file() and root.suffix.lower() in (".txt", ".lst", ".list"):
        recs = _path_list(root)
    else:
        try:
            ds = open_dataset(root, split, strict=False)
            recs = [InputRecord(path=s.key, label=int(s.label), file=str(s.path) if s.path is not None else None, data=s.data)
                    for s in ds.samples]
            recs += [InputRecord(path=str(b["key"]), file=None) for b in ds.bad]  # unreadable manifest rows: error rows
        except DataError:
            if not root.is_dir() or split not in (None, "all"):
                raise
            recs = _plain_folder(root)
    if not recs:
        raise DataError(f"{root}: no images found")
    seen: set[str] = set()
    dup = [r.path for r in recs if r.path in seen or seen.add(r.path)]  # type: ignore[func-returns-value]
    if dup:
        raise DataError(f"{root}: {len(dup)} duplicate input key(s), e.g. {dup[0]!r}")
    return recs
