"""What every command module shares: the stderr console, the table console, a progress bar, one error exit.

The command modules (``cli``, ``build_commands``, ``detect.commands``, ``serve.commands``, ...) import
these from here, never from ``cli`` (which imports the command modules to register them).
"""

from __future__ import annotations

from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["console", "out_console", "progress_bar", "fail"]

console = Console(stderr=True)
out_console = Console(width=None if Console().is_terminal else 160)  # tables stay readable in logs and CI


@contextmanager
def progress_bar():
    """A rich progress display; yields a callback ``(description, done, total)``."""
    with Progress(
        TextColumn("[bold]{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=False, disable=not console.is_terminal and False,
    ) as prog:
        tasks: dict[str, int] = {}

        def cb(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = prog.add_task(desc, total=total)
            prog.update(tasks[desc], completed=done, total=total)

        yield cb


def fail(msg: str, code: int = 2) -> None:
    """Print the error and exit with ``code`` (2: bad usage or input)."""
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(code)
