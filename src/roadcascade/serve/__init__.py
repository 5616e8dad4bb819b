"""Serving the cascade: HTTP and StreetVision endpoints over a multi-stage micro-batcher.

- ``app.create_app(bundle, ServeConfig(...))``: the FastAPI app (endpoints, admission, metrics, dashboard);
- ``batcher.MultiStageBatcher``: one queue and worker per tier, deadlines, anytime answers, speculation;
- ``collate.collate``: the pure batch-collation step; ``latency.LatencyModel``; ``speculation``;
- ``commands.register``: the ``roadcascade serve`` and ``roadcascade bench load`` commands.
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(*args, **kwargs):  # lazy: importing the package does not import FastAPI
    from .app import create_app as _create

    return _create(*args, **kwargs)
