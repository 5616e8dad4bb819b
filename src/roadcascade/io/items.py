"""The requests an evaluation sends: a dataset's stored bytes (clean) or seeded validator-style challenge
views as JPEG q75 (challenge), one :class:`EvalItem` each. Used by ``eval``, ``build`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .challenge import ChallengeConfig, challenge_views
from .data import Dataset
from .images import BadImage, encode_jpeg

__all__ = ["Progress", "DEFAULT_VIEW_SEEDS", "EvalItem", "view_seed", "make_items", "bad_row"]

Progress = Callable[[str, int, int], None]

#: DESIGN.md: challenge views use seed 0 on val and seed 1 on test
DEFAULT_VIEW_SEEDS = {"val": 0, "test": 1}


@dataclass(frozen=True)
class EvalItem:
    key: str
    label: int
    source: str
    payload: bytes  # JPEG (or the stored file's) bytes, exactly what a client would send


def view_seed(split: str | None, seed: int | None) -> int:
    if seed is not None:
        return seed
    return DEFAULT_VIEW_SEEDS.get(split or "", 0)


def make_items(ds: Dataset, views: str, seed: int, n_views: int = 4, size: int = 224, progress: Progress | None = None,
               bad: list[dict] | None = None, protocol: str = "v2.0.4") -> list[EvalItem]:
    """The requests to send: stored bytes (clean) or n seeded challenge views per image as JPEG q75, made under the
    challenge ``protocol`` (``challenge.PROTOCOLS``; ``native`` sends each image once, at its own size, since its views
    are all the same). With a ``bad`` list, an image that is missing or does not decode is recorded there and skipped
    (else it raises)."""
    if views not in ("clean", "challenge"):
        raise ValueError(f"views must be 'clean' or 'challenge', not {views!r}")
    if views == "challenge":  # the same views are asked for again and again in one run (build, select, ship, eval)
        key = _views_key(ds, seed, n_views, size, protocol)
        hit = _VIEWS_CACHE.get(key)
        if hit is not None:
            if progress:
                progress(f"prepare {views} views", len(ds), len(ds))
            return list(hit)
        found_bad: list[dict] | None = None if bad is None else []
        items = _make_items(ds, views, seed, n_views, size, progress, found_bad, protocol)  # strict: raises as before
        if found_bad:  # a set with bad images is made again each time (its bad rows are reported each time)
            bad.extend(found_bad)  # type: ignore[union-attr]
        elif sum(len(it.payload) for it in items) <= _VIEWS_CACHE_BYTES:  # large sets: made again, memory stays bounded
            _VIEWS_CACHE[key] = items
            while len(_VIEWS_CACHE) > _VIEWS_CACHE_MAX:
                _VIEWS_CACHE.pop(next(iter(_VIEWS_CACHE)))
        return list(items)
    return _make_items(ds, views, seed, n_views, size, progress, bad, protocol)


#: challenge views already made in this process, by (images, seed, views, size, protocol): a few hundred kB to a few
#: MB each, the oldest dropped first
_VIEWS_CACHE: dict[tuple, list[EvalItem]] = {}
_VIEWS_CACHE_MAX = 4
_VIEWS_CACHE_BYTES = 64 << 20  # payload bytes of one cached list (StreetWork val's 1,204 views: about 12 MB)


def _views_key(ds: Dataset, seed: int, n_views: int, size: int, protocol: str) -> tuple:
    """What a challenge item list depends on: each image (its key, label, source and where its bytes are: the path,
    its size and mtime, or the in-memory bytes' hash) and the view settings."""
    def where(s) -> tuple:
        if s.data is not None:
            return ("data", hash(s.data), len(s.data))
        try:
            st = s.path.stat()
            return (str(s.path), st.st_size, st.st_mtime_ns)
        except OSError:
            return (str(s.path), -1, -1)
    return (tuple((s.key, s.label, s.source, where(s)) for s in ds.samples), seed, n_views, size, protocol)


def _make_items(ds: Dataset, views: str, seed: int, n_views: int, size: int, progress: Progress | None,
                bad: list[dict] | None, protocol: str) -> list[EvalItem]:
    items: list[EvalItem] = []
    cfg = ChallengeConfig(size=size, jpeg_quality=None, protocol=protocol)  # encoded once below, as the validator does
    if protocol == "native":
        n_views = 1  # no augmentation: every view of an image would be the same request
    for i, s in enumerate(ds.samples):
        try:
            if views == "clean":
                data = s.data if s.data is not None else s.path.read_bytes()  # type: ignore[union-attr]
                items.append(EvalItem(s.key, s.label, s.source, data))
            else:
                for j, v in enumerate(challenge_views(s.load(), seed=seed, key=s.key, n=n_views, cfg=cfg)):
                    items.append(EvalItem(f"{s.key}#v{j}", s.label, s.source, encode_jpeg(v, 75)))
        except (OSError, BadImage) as e:
            if bad is None:
                raise
            bad.append(bad_row(s.key, e))
        if progress:
            progress(f"prepare {views} views", i + 1, len(ds))
    return items


def bad_row(key: str, e: BaseException) -> dict:
    """A skipped image for the report: missing (file not there) or its BadImage reason."""
    if isinstance(e, BadImage):
        reason = "missing" if e.reason == "not_found" else e.reason
    else:
        reason = "missing" if isinstance(e, FileNotFoundError) else "unreadable"
    return {"key": key, "reason": reason, "message": str(e)[:300]}
