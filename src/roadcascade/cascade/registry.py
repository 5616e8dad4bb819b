"""Name -> class registries for the cascade's interchangeable parts (tiers, rules, fusions).

One table per kind. A class registers itself with ``@register_*`` in the module that defines it, and
:mod:`roadcascade.cascade.kinds` is the one import list that loads every such module, so any bundle loads
wherever it is read and the contract tests see every kind.
"""

from __future__ import annotations

from collections.abc import Callable


def registry() -> tuple[dict[str, type], Callable[[type], type]]:
    """A new (table, decorator) pair; the decorator files a class under its ``kind``."""
    table: dict[str, type] = {}

    def register(cls: type) -> type:
        table[cls.kind] = cls  # type: ignore[attr-defined]
        return cls

    return table, register


def build(table: dict[str, type], what: str, cfg: dict, **kw):
    """The instance a config describes (``cfg["kind"]`` picks the class), with a clear error for an unknown kind."""
    kind = cfg.get("kind")
    if kind not in table:
        raise ValueError(f"unknown {what} kind {kind!r}; known: {', '.join(sorted(table))}")
    return table[kind].from_config(cfg, **kw)
