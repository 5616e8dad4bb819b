"""``roadcascade bench gpu``: registered here (cli.py's ``_COMMAND_MODULES``); the benchmark itself is
:mod:`roadcascade.bench.gpurun` (runnable alone, without the HTTP stack: ``python -m roadcascade.bench.gpurun``)."""

from __future__ import annotations

import typer

from ..bench.gpurun import BenchSpec, format_table, make_payloads, run_bench

__all__ = ["BenchSpec", "format_table", "make_payloads", "run_bench", "register"]


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    from ..bench.gpurun import _bench_command

    bench_app.command("gpu")(_bench_command)
