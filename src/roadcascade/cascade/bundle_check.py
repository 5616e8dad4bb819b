"""Checks a bundle passes before anything in it is used: bundle.json against a schema with ranges, and every
file it names confined to the bundle directory (no ``..``, no absolute path, no symlink pointing out, only
regular files: a FIFO would block the loader forever), with its SHA-256 when the bundle recorded one.

Every failure is one :class:`BundleError` naming the field (``tiers[0].calibration.temperature``) or file.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.strictjson import loads_strict


class BundleError(ValueError):
    """A bundle that cannot be read, with what is wrong."""


@dataclass(frozen=True)
class BundleLimits:
    max_json_bytes: int = 8 * 2**20
    max_weights_bytes: int = 2 * 2**30
    max_tiers: int = 16
    input_size: tuple[int, int] = (8, 4096)
    batch_size: tuple[int, int] = (1, 65_536)
    max_gflops: float = 10_000.0


LIMITS = BundleLimits()
HASHES = "weights_sha256"  # top-level map: file name -> hex SHA-256, written by Bundle.save


# ------------------------------------------------------------------------------------------ files
def regular_file(root: Path, rel: Any, field: str, limit: int) -> Path:
    """The real path of ``rel`` inside ``root``, checked without opening it: a relative name, no ``..``, inside
    the bundle after symlinks are resolved, a regular file of at most ``limit`` bytes."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise BundleError(f"{field}: expected a file name inside the bundle, got {rel!r}")
    p = Path(rel)
    if not p.parts or p.is_absolute() or rel.startswith(("/", "\\")) or ".." in p.parts or ":" in p.parts[0]:
        raise BundleError(f"{field}: {rel!r} is not a plain relative path inside the bundle")
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root / p))
    if real_root not in real.parents:
        raise BundleError(f"{field}: {rel!r} points outside the bundle directory")
    try:
        st = os.stat(real, follow_symlinks=False)
    except OSError as e:
        raise BundleError(f"{field}: {rel!r} is missing or unreadable ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{field}: {rel!r} is not a regular file")
    if st.st_size > limit:
        raise BundleError(f"{field}: {rel!r} has {st.st_size:,} bytes; at most {limit:,}")
    return real


def _chunks(path: Path, field: str, limit: int) -> Iterator[bytes]:
    """A checked file's bytes in chunks, opened with O_NOFOLLOW | O_NONBLOCK (a file swapped for a FIFO or a
    link since the check is refused) and cut off past ``limit`` bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise BundleError(f"{field}: cannot open {path.name!r} ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{field}: {path.name!r} is not a regular file")
        got = 0
        while chunk := os.read(fd, 1 << 20):
            got += len(chunk)
            if got > limit:
                raise BundleError(f"{field}: {path.name!r} is larger than {limit:,} bytes")
            yield chunk
    finally:
        os.close(fd)


def read_regular(path: Path, field: str, limit: int) -> bytes:
    """Read a checked file whole (see ``_chunks``)."""
    return b"".join(_chunks(path, field, limit))


def sha256_file(path: Path, field: str = "weights", limit: int = LIMITS.max_weights_bytes) -> str:
    h = hashlib.sha256()
    for chunk in _chunks(path, field, limit):
        h.update(chunk)
    return h.hexdigest()


def parse_json(raw: bytes, field: str = "bundle.json") -> dict:
    try:
        doc = loads_strict(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{field}: not valid JSON ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{field}: expected a JSON object, got {type(doc).__name__}")
    return doc


# ------------------------------------------------------------------------------------------ schema
def _need(ok: bool, field: str, what: str, value: Any) -> None:
    if not ok:
        raise BundleError(f"bundle.json: {field} must be {what} (got {str(value)[:80]!r})")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _str(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 200 and v.isprintable()


def _prob(v: Any) -> bool:
    return _num(v) and 0.0 < v < 1.0


def check_calibration(c: Any, f: str) -> None:
    _need(isinstance(c, dict), f, "an object", c)
    _need(c.get("kind", "temperature") == "temperature", f + ".kind", "'temperature'", c.get("kind"))
    t = c.get("temperature")
    _need(_num(t) and 0 < t <= 1e6, f + ".temperature", "a finite number > 0", t)
    _need(_prob(c.get("threshold")), f + ".threshold", "a finite number in (0, 1)", c.get("threshold"))


def check_norm(v: Any, f: str, positive: bool) -> None:
    _need(isinstance(v, list) and len(v) == 3 and all(_num(x) for x in v), f, "a list of 3 finite numbers", v)
    if positive:
        _need(all(0 < x <= 1e3 for x in v), f, "3 numbers > 0", v)
    else:
        _need(all(-1e3 <= x <= 1e3 for x in v), f, "3 numbers in [-1000, 1000]", v)


def check_classifier(t: dict, f: str, lim: BundleLimits) -> None:
    _need(_str(t.get("model")), f + ".model", "a model name", t.get("model"))
    _need(_int(t.get("input_size"), *lim.input_size), f + ".input_size", f"an int in {list(lim.input_size)}", t.get("input_size"))
    check_norm(t.get("mean"), f + ".mean", positive=False)
    check_norm(t.get("std"), f + ".std", positive=True)
    check_calibration(t.get("calibration"), f + ".calibration")
    if "squares" in t:
        _need(_int(t["squares"], 1, 8), f + ".squares", "an int in [1, 8]", t["squares"])
    if "view_scale" in t:
        v = t["view_scale"]
        _need(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.25 <= v <= 4.0, f + ".view_scale", "a number in [0.25, 4]", v)


def check_tier(t: Any, f: str, known: set[str], lim: BundleLimits) -> None:
    _need(isinstance(t, dict), f, "an object", t)
    _need(t.get("kind") in known, f + ".kind", f"one of {sorted(known)}", t.get("kind"))
    _need(_str(t.get("name")), f + ".name", "a printable name", t.get("name"))
    if "gflops" in t and t["gflops"] is not None:
        _need(_num(t["gflops"]) and 0 <= t["gflops"] <= lim.max_gflops, f + ".gflops", f"a number in [0, {lim.max_gflops:g}]", t["gflops"])
    if "batch_size" in t:
        _need(_int(t["batch_size"], *lim.batch_size), f + ".batch_size", f"an int in {list(lim.batch_size)}", t["batch_size"])
    kind = t["kind"]
    if kind == "classifier":
        check_classifier(t, f, lim)
    elif kind == "tta":
        _need(isinstance(t.get("base"), dict), f + ".base", "a classifier tier object", t.get("base"))
        check_classifier(t["base"], f + ".base", lim)
        _need(_str(t["base"].get("weights")), f + ".base.weights", "a file name", t["base"].get("weights"))
        for k in ("n_min", "n_max"):
            _need(_int(t.get(k), 1, 64), f"{f}.{k}", "an int in [1, 64]", t.get(k))
        _need(t["n_min"] <= t["n_max"], f + ".n_min", "<= n_max", t["n_min"])
        check_calibration(t.get("calibration"), f + ".calibration")
    elif kind in ("detector", "coco_context"):
        _need(_int(t.get("input_size"), *lim.input_size), f + ".input_size", f"an int in {list(lim.input_size)}", t.get("input_size"))
    if kind != "tta":
        _need("weights" not in t or _str(t["weights"]), f + ".weights", "a file name", t.get("weights"))


def check_exit(e: Any, f: str, rules: set[str], fusions: set[str]) -> None:
    _need(isinstance(e, dict), f, "an object", e)
    _need(_prob(e.get("threshold")), f + ".threshold", "a finite number in (0, 1)", e.get("threshold"))
    if e.get("full_threshold") is not None:
        _need(_prob(e["full_threshold"]), f + ".full_threshold", "a finite number in (0, 1)", e["full_threshold"])
    for part, known in (("rule", rules), ("fusion", fusions)):
        v = e.get(part)
        _need(isinstance(v, dict) and v.get("kind") in known, f"{f}.{part}.kind", f"one of {sorted(known)}",
              v.get("kind") if isinstance(v, dict) else v)
    tau = e["rule"].get("tau")
    if tau is not None:
        _need(_num(tau) and 0 <= tau <= 1, f + ".rule.tau", "a number in [0, 1]", tau)


def check_doc(doc: dict, fmt: str, tiers: set[str], rules: set[str], fusions: set[str], lim: BundleLimits = LIMITS) -> None:
    """The schema of bundle.json: structure, known kinds, and ranges of the numbers a model depends on."""
    _need(doc.get("format") == fmt, "format", repr(fmt), doc.get("format"))
    ts, es = doc.get("tiers"), doc.get("exits")
    _need(isinstance(ts, list) and 1 <= len(ts) <= lim.max_tiers, "tiers", f"a list of 1..{lim.max_tiers} tiers", ts)
    _need(isinstance(es, list) and len(es) == len(ts), "exits", f"a list of {len(ts)} exit points (one per tier)", es)
    for i, t in enumerate(ts):
        check_tier(t, f"tiers[{i}]", tiers, lim)
    names = [t["name"] for t in ts]
    _need(len(set(names)) == len(names), "tiers[].name", "unique", names)
    for i, e in enumerate(es):
        check_exit(e, f"exits[{i}]", rules, fusions)
    h = doc.get(HASHES)
    if h is not None:
        _need(isinstance(h, dict) and all(_str(k) and isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
                                          for k, v in h.items()), HASHES, "a map of file name -> 64 hex digits", h)


def weights_fields(doc: dict) -> Iterator[tuple[str, Any]]:
    """(field, file name) of every file bundle.json names (any ``weights`` key inside a tier)."""
    def walk(v: Any, f: str) -> Iterator[tuple[str, Any]]:
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "weights":
                    yield f"{f}.weights", x
                else:
                    yield from walk(x, f"{f}.{k}")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                yield from walk(x, f"{f}[{i}]")

    for i, t in enumerate(doc.get("tiers", [])):
        yield from walk(t, f"tiers[{i}]")


def check_files(doc: dict, root: Path, lim: BundleLimits = LIMITS) -> None:
    """Every named file confined and regular; its SHA-256 checked where bundle.json records one."""
    hashes = doc.get(HASHES) or {}
    for field, rel in weights_fields(doc):
        real = regular_file(root, rel, field, lim.max_weights_bytes)
        want = hashes.get(rel)
        if hashes and want is None:
            raise BundleError(f"{field}: {rel!r} has no SHA-256 in {HASHES}")
        if want is not None and sha256_file(real, field, lim.max_weights_bytes) != want:
            raise BundleError(f"{field}: {rel!r} does not match its recorded SHA-256 (changed or corrupted since it was saved)")


def record_hashes(doc: dict, root: Path) -> dict:
    """``doc`` with the SHA-256 of every file it names (written by Bundle.save)."""
    return {**doc, HASHES: {rel: sha256_file(Path(root) / rel) for _, rel in weights_fields(doc) if isinstance(rel, str)}}
