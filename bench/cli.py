"""``ctrstream bench NAME [ARGS]`` and ``ctrstream study NAME [ARGS]``: run ``ctrstream.bench.NAME.main(argv)`` (bench/NAME.py)."""

from __future__ import annotations

import importlib
import pkgutil

import typer

import ctrstream.bench as bench

# studies are benchmarks too (bench/NAME.py), named for what they measure
STUDIES = ("freshness",)


def available() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(bench.__path__)
        if m.name not in {"cli", "common"} and "_" not in m.name
    )  # x_y.py: helpers


def register(app: typer.Typer) -> None:
    @app.command(
        "bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
    )
    def bench_cmd(
        ctx: typer.Context,
        name: str = typer.Argument(..., help="which benchmark: " + ", ".join(available())),
    ):
        """Run a benchmark: it prints a table and writes JSON (and PNG) under bench/results/ (CTRSTREAM_RESULTS_DIR)."""
        if name not in available():
            raise typer.BadParameter(
                f"unknown benchmark {name!r}; choose one of {', '.join(available())}"
            )
        module = importlib.import_module(f"ctrstream.bench.{name}")
        raise typer.Exit(module.main(list(ctx.args)) or 0)

    @app.command(
        "study", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
    )
    def study_cmd(
        ctx: typer.Context,
        name: str = typer.Argument(..., help="which study: " + ", ".join(STUDIES)),
    ):
        """Run a study (a benchmark of model quality against the truth): a table per part, JSON and PNGs under bench/results/. `ctrstream study freshness -- --help` lists its options."""
        if name not in STUDIES:
            raise typer.BadParameter(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
        module = importlib.import_module(f"ctrstream.bench.{name}")
        raise typer.Exit(module.main(list(ctx.args)) or 0)
