"""The ``ctrstream`` console script (and ``python -m ctrstream``).

The top of the layer stack: the CLI's command groups plus those of the demo and the
benchmarks, which sit above the CLI (ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

import typer

from ctrstream.bench.cli import register as register_bench
from ctrstream.cli.app import build_app
from ctrstream.demo.cli import register as register_demo


def app_with_everything() -> typer.Typer:
    app = build_app()
    register_demo(app)
    register_bench(app)
    return app


app = app_with_everything()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
