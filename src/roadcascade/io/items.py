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
