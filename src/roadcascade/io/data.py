"""Datasets: the StreetWork manifest, image folders (``roadwork/`` + ``none/``) and parquet files
with image bytes and a label column (the NATIX roadwork dataset layout).

A dataset is a list of ``Sample``s; images are decoded lazily through ``roadcascade.io.images``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .images import DecodeLimits, decode_bytes, decode_path

DATA_ENV = "ROADCASCADE_DATA"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FOLDER_CLASSES = {"none": 0, "roadwork": 1}


class DataError(ValueError):
    """A dataset that cannot be opened, with a reason a user can act on."""


@dataclass(frozen=True)
class Sample:
    key: str
    label: int
    source: str = "unknown"
    split: str = "all"
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)

    def load(self, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
        """Decode to HxWx3 uint8 RGB (raises images.BadImage on bad content)."""
        if self.data is not None:
            return decode_bytes(self.data, limits)
        if self.path is None:
            raise DataError(f"sample {self.key} has neither a path nor bytes")
        return decode_path(self.path, limits)


@dataclass
class Dataset:
    name: str
    samples: list[Sample]
    bad: list[dict] = field(default_factory=list)  # rows skipped when opened leniently: {key, split, row, reason, message}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    @property
    def splits(self) -> list[str]:
        return sorted({s.split for s in self.samples})

    def split(self, name: str | None) -> "Dataset":
        if name is None or name == "all":
            return self
        if name not in self.splits:
            raise DataError(f"split {name!r} not in {self.name}; present: {', '.join(self.splits)}")
        return Dataset(f"{self.name}:{name}", [s for s in self.samples if s.split == name],
                       [b for b in self.bad if b.get("split") in (name, None)])

    def subset(self, n: int | None, seed: int = 0) -> "Dataset":
        """A stratified random subset of n samples (all of them if n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        y = self.labels()
        idx: list[int] = []
        for c in (0, 1):
            cls_idx = np.flatnonzero(y == c)
            k = int(round(n * len(cls_idx) / len(self)))
            idx += list(rng.choice(cls_idx, size=min(k, len(cls_idx)), replace=False))
        return Dataset(f"{self.name}[{n}]", [self.samples[i] for i in sorted(idx)], self.bad)

    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def sources(self) -> np.ndarray:
        return np.array([s.source for s in self.samples])

    def counts(self) -> dict[str, int]:
        y = self.labels()
        return {"n": len(y), "pos": int(y.sum()), "neg": int(len(y) - y.sum())}


def default_data_root() -> Path:
    """``$ROADCASCADE_DATA`` or ``../shared/data/streetwork`` (next to the repository)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    candidates = [Path.cwd() / "../shared/data/streetwork", Path(__file__).resolve().parents[4] / "shared/data/streetwork"]
    for c in candidates:
        if (c / "manifest.csv").exists():
            return c.resolve()
    return candidates[0]


def load_manifest(root: Path, strict: bool = True) -> Dataset:
    """``manifest.csv`` rows; a malformed row or a label other than 0/1 is a DataError, or with ``strict=False``
    a record in ``Dataset.bad`` (the row is skipped)."""
    man = root / "manifest.csv"
    samples, bad = [], []
    with open(man, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            try:
                label, boxes = _manifest_row(man, i, row)
            except DataError as e:
                if strict:
                    raise
                bad.append({"key": str(row.get("file"))[:300], "split": row.get("split") or "all", "row": i + 2,
                            "reason": "bad_label" if isinstance(e, BadLabel) else "bad_row", "message": str(e)[:300]})
                continue
            samples.append(
                Sample(
                    key=row["file"],
                    label=label,
                    source=row.get("source") or "unknown",
                    split=row.get("split") or "all",
                    boxes=boxes,  # type: ignore[arg-type]
                    path=root / row["file"],
                )
            )
    return Dataset(root.name, samples, bad)


class BadLabel(DataError):
    """A manifest row whose label is not 0 or 1."""


def _manifest_row(man: Path, i: int, row: dict) -> tuple[int, tuple]:
    try:
        label = int(row["label"])
    except (KeyError, ValueError, TypeError):
        raise BadLabel(f"{man}: row {i + 2} has label {str(row.get('label'))[:40]!r}; expected 0 or 1") from None
    try:
        boxes = tuple(tuple(float(v) for v in b) for b in json.loads(row.get("boxes") or "[]"))
        if not row.get("file"):
            raise ValueError("no file name")
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{man}: row {i + 2} is malformed ({e})") from e
    if label not in (0, 1):
        raise BadLabel(f"{man}: row {i + 2} has label {label}; expected 0 or 1")
    return label, boxes


def _folder_samples(root: Path, split: str) -> list[Sample]:
    out = []
    for cls, label in FOLDER_CLASSES.items():
        d = root / cls
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                out.append(Sample(key=str(p.relative_to(root)), label=label, source=root.name, split=split, path=p))
    return out


def load_folder(root: Path) -> Dataset:
    """``root/{roadwork,none}/...`` (split "all"), or ``root/<split>/{roadwork,none}/...``."""
    if any((root / c).is_dir() for c in FOLDER_CLASSES):
        samples = _folder_samples(root, "all")
    else:
        samples = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            samples += [replace(s, key=f"{sub.name}/{s.key}") for s in _folder_samples(sub, sub.name)]
    if not samples:
        raise DataError(f"{root}: no images under roadwork/ or none/ (or <split>/roadwork, <split>/none)")
    return Dataset(root.name, samples)


def _image_bytes(cell) -> bytes:
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, dict) and cell.get("bytes") is not None:
        return bytes(cell["bytes"])
    raise DataError("parquet image cell holds no bytes (expected binary or {'bytes': ..., 'path': ...})")


def load_parquet(path: Path, image_column: str = "image", label_column: str = "label") -> Dataset:
    """Parquet file(s) with image bytes (raw binary or the Hugging Face ``{bytes, path}`` struct) and
    a 0/1 label. The split comes from a ``split`` column, else from the file name (``train-0000.parquet``)."""
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .parquet files")
    samples = []
    for f in files:
        table = pq.read_table(f)
        cols = table.column_names
        for c in (image_column, label_column):
            if c not in cols:
                raise DataError(f"{f}: column {c!r} missing; columns are {cols}")
        images = table.column(image_column).to_pylist()
        labels = table.column(label_column).to_pylist()
        splits = table.column("split").to_pylist() if "split" in cols else [f.stem.split("-")[0]] * len(labels)
        for i, (img, lab, sp) in enumerate(zip(images, labels, splits)):
            samples.append(
                Sample(key=f"{f.name}#{i}", label=int(lab), source=f.stem, split=str(sp), data=_image_bytes(img))
            )
    return Dataset(path.stem, samples)


def open_dataset(spec: str | os.PathLike | None = None, split: str | None = None, strict: bool = True) -> Dataset:
    """Open a manifest directory, an image folder, or parquet file(s); optionally one split. ``strict=False``:
    malformed manifest rows are skipped and listed in ``Dataset.bad`` instead of failing the whole data set."""
    root = Path(spec) if spec else default_data_root()
    if not root.exists():
        hint = f" (set --data or ${DATA_ENV})" if spec is None else ""
        raise DataError(f"dataset not found: {root}{hint}")
    if root.is_file() and root.suffix == ".parquet":
        ds = load_parquet(root)
    elif root.is_dir() and (root / "manifest.csv").exists():
        ds = load_manifest(root, strict=strict)
    elif root.is_dir() and any(root.rglob("*.parquet")):
        ds = load_parquet(root)
    elif root.is_dir():
        ds = load_folder(root)
    else:
        raise DataError(f"{root}: not a manifest directory, image folder or parquet file")
    return ds.split(split)


def to_parquet_bytes(rows: list[tuple[bytes, int]]) -> bytes:
    """Build a NATIX-layout parquet (image struct {bytes, path} + label) in memory; used by tests/tools."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "image": [{"bytes": b, "path": None} for b, _ in rows],
            "label": [int(lab) for _, lab in rows],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
