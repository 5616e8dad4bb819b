"""Local model sources: a file or a folder on this machine, identified by its SHA-256, never downloaded.

A :class:`LocalSource` is what a bundle stores for a model whose weights stay outside it (a zero-shot or a
vision-language model of several GB is not copied into the bundle): the path it was built from and the
SHA-256 of its files. :func:`verify` refuses, with the path and what differs, a source that is missing or
whose files changed. :func:`offline` sets ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` so that
Hugging Face libraries fail instead of reaching the network, and every loader here also passes
``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LocalSource", "ModelSourceError", "hash_path", "offline", "snapshot_files", "verify"]

# Files that define a model: weights, configs, tokenizer and processor files. Hidden files, READMEs and
# anything else in a snapshot folder (e.g. .cache/, .gitattributes) do not change what is loaded.
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken", ".jinja", ".py")
_IGNORED = {"README.md", ".gitattributes"}


class ModelSourceError(FileNotFoundError):
    """A local model path that is missing, or whose files differ from the ones a bundle was built with."""


def snapshot_files(path: Path) -> list[Path]:
    """The files of a model at ``path`` that its checksum covers, sorted (a single file: itself)."""
    if path.is_file():
        return [path]
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts) or p.name in _IGNORED:
            continue
        if p.suffix in MODEL_SUFFIXES:
            out.append(p)
    return out


_CACHE: dict[tuple, str] = {}


def hash_path(path: str | Path) -> str:
    """SHA-256 over the model files at ``path``: each file's relative name and content, in sorted order.

    Cached per process by (path, names, sizes, mtimes), so a server loading the same model twice hashes it
    once; a changed file changes its size or mtime and is hashed again."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelSourceError(f"local model path not found: {root} (nothing is ever downloaded; point the tier at a local file or folder)")
    files = snapshot_files(root)
    if not files:
        raise ModelSourceError(f"local model path {root} holds no model files ({', '.join(MODEL_SUFFIXES)})")
    key = (str(root.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key in _CACHE:
        return _CACHE[key]
    h = hashlib.sha256()
    for f in files:
        h.update((f.name if root.is_file() else str(f.relative_to(root))).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    _CACHE[key] = h.hexdigest()
    return _CACHE[key]


@dataclass(frozen=True)
class LocalSource:
    """A model on the local disk: where it is and the SHA-256 of its files (see :func:`hash_path`)."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> "LocalSource":
        p = Path(path).expanduser()
        return cls(path=str(p.resolve()) if p.exists() else str(p), sha256=hash_path(p))

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "LocalSource":
        ok = isinstance(d, dict) and isinstance(d.get("path"), str) and 0 < len(d["path"]) <= 4096 and isinstance(d.get("sha256"), str)
        if not ok or len(d["sha256"]) != 64 or any(c not in "0123456789abcdef" for c in d["sha256"]):
            raise ModelSourceError(f"a local model source needs a 'path' and a 64-hex-digit 'sha256', got {str(d)[:200]!r}")
        return cls(path=d["path"], sha256=d["sha256"])


def verify(source: LocalSource, what: str = "model") -> Path:
    """The path of ``source`` after checking it exists and its files hash to the recorded SHA-256."""
    p = Path(source.path)
    if not p.exists():
        raise ModelSourceError(
            f"{what}: the local model this bundle was built with is missing: {p}. Copy the same files there "
            f"(SHA-256 {source.sha256[:12]}...) or rebuild the bundle; nothing is downloaded."
        )
    got = hash_path(p)
    if got != source.sha256:
        raise ModelSourceError(
            f"{what}: the files at {p} differ from the ones this bundle was built with (SHA-256 {got[:12]}... "
            f"!= recorded {source.sha256[:12]}...); its calibration would not hold. Restore the original files or rebuild."
        )
    return p


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face hub access switched off for the duration (restored after)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
