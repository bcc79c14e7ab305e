"""The root of the ``ctrstream`` command line and what every command group shares.

:func:`build_app` assembles one Typer app from the command groups of the layers below the
CLI (one module per group: ``stack``, ``traffic``, ``speed``, ``batch``, ``train``,
``serve``, ``jobs``, ``monitor``, ``schemas``, ``experiment``, ``controller``, ``run``); the
demo and the benchmarks sit above the CLI and add their own
groups in :mod:`ctrstream.__main__`, the console script. Heavy imports stay inside the
commands, so ``ctrstream --help`` stays fast.
"""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` and return the ``typer.Exit`` to raise."""
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def build_app() -> typer.Typer:
    """The ``ctrstream`` app with every command group of the CLI layer registered."""
    from ctrstream.cli import (
        batch,
        controller,
        experiment,
        jobs,
        monitor,
        run,
        schemas,
        serve,
        speed,
        stack,
        traffic,
        train,
    )

    app = typer.Typer(
        name="ctrstream",
        help="Streaming, real-time ad click prediction (a lambda architecture on Kafka, "
        "Bytewax, Redis, Triton and River).",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for group in (
        stack,
        traffic,
        speed,
        batch,
        train,
        serve,
        jobs,
        monitor,
        schemas,
        experiment,
        controller,
        run,
    ):
        group.register(app)
    return app
