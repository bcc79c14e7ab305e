"""``ctrstream demo``: the whole lambda architecture end to end (:mod:`ctrstream.demo.run`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ctrstream.demo.run import DemoConfig, DemoError, console, run_demo
from ctrstream.demo.story import StoryConfig


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        scenario: str = typer.Option(
            "taste_shift",
            help="taste_shift (a shift the served features cannot absorb: the story of decay, "
            "alarm and retrain), drift, steady or dirty",
        ),
        events: int = typer.Option(900_000, help="impressions to generate (clicks come on top)"),
        hours: float = typer.Option(6.0, help="event-time span of the scenario"),
        history_fraction: float = typer.Option(
            1 / 3,
            help="share of the scenario's event time replayed as history (the cut-off "
            "is that point, aligned down to a whole hour)",
        ),
        users: int = typer.Option(
            20_000, help="users in the marketplace (the scenarios' own: 200,000; 0 keeps it)"
        ),
        seed: int = typer.Option(7),
        replay_seconds: float = typer.Option(
            25.0, help="wall seconds of the history replay (sets its time compression)"
        ),
        lockstep_s: float = typer.Option(
            10.0, help="open live phase: seconds of event time it may run ahead of the scorer"
        ),
        live: str = typer.Option(
            "closed",
            help="live phase: closed (the ad server decides what is shown, under an online "
            "experiment) or open (the generated stream replayed in lockstep with the scorer)",
        ),
        live_hours: float = typer.Option(
            4.0,
            help="closed live phase: event hours it runs at most (it ends earlier, "
            "--after-h after the controller's first cycle)",
        ),
        drift_after_h: float = typer.Option(
            1.0,
            help="closed live phase: the market shifts this many event hours into it (after "
            "the decay monitor's one-hour baseline)",
        ),
        taste_logit: float = typer.Option(
            1.5,
            help="taste_shift: strength of the hidden device x category taste that is redrawn "
            "(the scenario's own is 0.8; docs/demo.md says why the demo's is larger)",
        ),
        primary_metric: str = typer.Option(
            "ctr",
            help="the controller's experiment decides on this metric (ctr or "
            "revenue_per_request; docs/demo.md says why ctr)",
        ),
        challenger_epochs: int = typer.Option(
            6, help="training epochs of the controller's challenger (its rows are few)"
        ),
        loop_volume: float = typer.Option(
            0.35,
            help="closed live phase: its ad requests per event second as a share of the "
            "history's market",
        ),
        experiment_h: float = typer.Option(
            0.5, help="closed live phase: event hours of the opening experiment"
        ),
        after_h: float = typer.Option(
            0.15, help="event hours served after the controller's first cycle ended"
        ),
        isolated: bool = typer.Option(
            False,
            "--isolated",
            help="start a private stack on free ports under the run's folder (stopped at the "
            "end) instead of the local stack",
        ),
        candidates: int = typer.Option(20, help="closed live phase: candidate ads per request"),
        out: Path = typer.Option(
            Path(".demo"), help="output directory (default .demo under the current directory)"
        ),
        keep_stack: bool = typer.Option(False, "--keep-stack", help="leave the stack running"),
        epochs: int = typer.Option(None, help="training epochs (default: the trainer's)"),
        study_events: int = typer.Option(
            0,
            help="impressions of the small freshness study (staleness and label delay "
            "sweeps; 0 skips it)",
        ),
    ):
        """Run the whole lambda architecture end to end and write report.html."""
        cfg = DemoConfig(
            scenario=scenario,
            events=events,
            hours=hours,
            users=users or None,
            history_fraction=history_fraction,
            seed=seed,
            replay_seconds=replay_seconds,
            lockstep_s=lockstep_s,
            live=live,
            live_hours=live_hours,
            drift_after_h=drift_after_h,
            taste_logit=taste_logit,
            loop_volume=loop_volume,
            candidates=candidates,
            isolated=isolated,
            story=StoryConfig(
                experiment_h=experiment_h,
                after_h=after_h,
                primary_metric=primary_metric,
                challenger_epochs=challenger_epochs,
            ),
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
