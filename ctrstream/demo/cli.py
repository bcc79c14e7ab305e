"""``ctrstream demo``: the whole lambda architecture end to end (:mod:`ctrstream.demo.run`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ctrstream.demo.run import DemoConfig, DemoError, console, run_demo


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        scenario: str = typer.Option("drift", help="steady, drift or dirty"),
        events: int = typer.Option(1_000_000, help="impressions to generate (clicks come on top)"),
        hours: float = typer.Option(6.0, help="event-time span of the scenario"),
        seed: int = typer.Option(7),
        replay_seconds: float = typer.Option(
            45.0, help="wall seconds of the history replay (sets its time compression)"
        ),
        lockstep_s: float = typer.Option(
            10.0, help="open live phase: seconds of event time it may run ahead of the scorer"
        ),
        live: str = typer.Option(
            "closed",
            help="live phase: closed (the ad server decides what is shown, under an online "
            "experiment) or open (the generated stream replayed in lockstep with the scorer)",
        ),
        live_hours: float = typer.Option(1.0, help="closed live phase: event hours it runs"),
        candidates: int = typer.Option(20, help="closed live phase: candidate ads per request"),
        out: Path = typer.Option(
            Path(".demo"), help="output directory (default .demo under the current directory)"
        ),
        keep_stack: bool = typer.Option(False, "--keep-stack", help="leave the stack running"),
        epochs: int = typer.Option(None, help="training epochs (default: the trainer's)"),
        study_events: int = typer.Option(
            400_000,
            help="impressions of the small freshness study (staleness and label delay "
            "sweeps; 0 skips it)",
        ),
    ):
        """Run the whole lambda architecture end to end and write report.html."""
        cfg = DemoConfig(
            scenario=scenario,
            events=events,
            hours=hours,
            seed=seed,
            replay_seconds=replay_seconds,
            lockstep_s=lockstep_s,
            live=live,
            live_hours=live_hours,
            candidates=candidates,
            out=out,
            keep_stack=keep_stack,
            epochs=epochs,
            study_events=study_events,
        )
        try:
            path = run_demo(cfg)
        except DemoError as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(1) from None
        console.print(f"[bold green]report:[/] {path}")
