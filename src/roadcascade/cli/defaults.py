"""Command-line option defaults read from the config dataclasses, so that a default is written once (in the config)."""

from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass

__all__ = ["default_of", "given"]


def default_of(config: type, name: str):
    """The default of field ``name`` of dataclass ``config``; TypeError for a field without a default, or no such field."""
    if not is_dataclass(config):
        raise TypeError(f"{config!r} is not a dataclass")
    for f in fields(config):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise TypeError(f"{config.__name__}.{name} has no default")
    raise TypeError(f"{config.__name__} has no field {name!r}")


def given(**options) -> dict:
    """The options that were given (not None): passed on as keywords, the others keep the config's default."""
    return {k: v for k, v in options.items() if v is not None}
