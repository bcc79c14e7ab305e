"""``ctrstream experiment start|status|stop|report`` and ``ctrstream loop run``: online
experiments in the closed loop (the world asks, the ad server decides, the world answers)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from ctrstream.cli.app import fail, out


def _settings():
    from ctrstream.config import get_settings

    return get_settings()


def register(app: typer.Typer) -> None:
    exp_app = typer.Typer(
        help="Online experiments (A/B with shadows) in the closed loop, graded against the "
        "simulator's true lift.",
        no_args_is_help=True,
    )
    loop_app = typer.Typer(
        help="The closed loop: world -> ad server -> world.", no_args_is_help=True
    )
    app.add_typer(exp_app, name="experiment")
    app.add_typer(loop_app, name="loop")

    @exp_app.command("start")
    def start(
        name: str = typer.Argument(..., help="the experiment's name (letters, digits, - _)"),
        arm: list[str] = typer.Option(
            None,
            "--arm",
            help="a deciding arm: NAME=model:BASE[@VERSION]:WEIGHT, NAME=online:BASE:WEIGHT "
            "(a continuously trained model starting from BASE: lr or deep cold, ctr_lr or "
            "ctr_deep from the newest training run's checkpoint, or a .pt checkpoint path), "
            "NAME=prior:WEIGHT or NAME=oracle:WEIGHT (repeatable; weights are traffic shares)",
        ),
        shadow: list[str] = typer.Option(
            None,
            "--shadow",
            help="a shadow arm: NAME=model:BASE[@VERSION] or NAME=online:BASE (repeatable)",
        ),
        control: str = typer.Option(None, help="the control arm (default: the first --arm)"),
        file: Path = typer.Option(None, help="a JSON definition instead of --arm/--shadow"),
        alpha: float = typer.Option(0.05, help="the sequential test's error rate"),
        min_run_s: float = typer.Option(1800.0, help="event seconds before any decision"),
        min_users: int = typer.Option(200, help="users per arm before any decision"),
        primary: str = typer.Option("revenue_per_request", help="revenue_per_request or ctr"),
        at_ms: int = typer.Option(None, help="event time it starts (default: now)"),
        no_pin: bool = typer.Option(False, help="do not resolve and pin model versions"),
    ):
        """Define and start an experiment; model versions are resolved and pinned on Triton."""
        from ctrstream.experiments.design import Experiment
        from ctrstream.loop import session

        s = _settings()
        try:
            if file is not None:
                exp = Experiment.from_dict(json.loads(file.read_text()))
            else:
                if not arm:
                    raise fail("give the arms: --arm NAME=KIND... (or --file definition.json)")
                arms = [session.parse_arm(a) for a in arm]
                arms += [session.parse_arm(a, shadow=True) for a in shadow or []]
                exp = Experiment(
                    name=name,
                    salt=name,
                    arms=tuple(arms),
                    control=control or arms[0].name,
                    alpha=alpha,
                    min_run_s=min_run_s,
                    min_users_per_arm=min_users,
                    primary_metric=primary,
                )
            exp = session.start(
                s, exp, at_ms if at_ms is not None else int(time.time() * 1000), pin=not no_pin
            )
        except (session.SessionError, ValueError, FileNotFoundError) as e:
            raise fail(str(e)) from None
        out.print_json(json.dumps(exp.to_dict()))

    @exp_app.command("status")
    def status(name: str = typer.Argument(None, help="one experiment (default: all)")):
        """The experiments and their state (running, stopped, decisions so far)."""
        from ctrstream.loop import session

        reg = session.registry(_settings())
        try:
            items = [reg.get(name)] if name else reg.list()
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise fail(str(e)) from None
        docs = []
        for rec in items:
            last = reg.load_report(rec.experiment.name) or {}
            decided = [
                {k: c.get(k) for k in ("treatment", "metric", "lift", "lo", "hi", "decided")}
                for c in last.get("comparisons", [])
            ]
            docs.append(
                {
                    "name": rec.experiment.name,
                    **rec.status_dict(),
                    "arms": [a.name for a in rec.experiment.arms],
                    "last_look_elapsed_s": last.get("elapsed_s"),
                    "comparisons": decided,
                }
            )
        out.print_json(json.dumps(docs, default=str))

    @exp_app.command("stop")
    def stop(
        name: str = typer.Argument(...),
        reason: str = typer.Option("stopped by the operator", help="recorded with the state"),
    ):
        """Stop an experiment (its loop ends at the next step) and unpin its model versions."""
        from ctrstream.loop import session

        try:
            session.stop(_settings(), name, reason)
        except (KeyError, FileNotFoundError, ValueError, session.SessionError) as e:
            raise fail(str(e)) from None
        out.print(f"experiment {name} stopped")

    @exp_app.command("report")
    def report(
        name: str = typer.Argument(...),
        out_dir: Path = typer.Option(
            None, "--out", help="write experiment.json, experiment.md and experiment.png here"
        ),
    ):
        """The per-arm table (estimate, interval, truth), the comparisons and the decision."""
        from ctrstream.loop import session

        try:
            doc = session.report(_settings(), name, out_dir)
        except (KeyError, FileNotFoundError, ValueError, session.SessionError) as e:
            raise fail(str(e)) from None
        if out_dir is None:
            out.print_json(json.dumps(doc, default=str))
        else:
            out.print((out_dir / "experiment.md").read_text())

    @loop_app.command("run")
    def run(
        experiment: str = typer.Option(
            None,
            help="a started experiment; with --follow the default's name (served when no other "
            "experiment runs)",
        ),
        follow: bool = typer.Option(
            False,
            "--follow",
            help="follow the registry: one world and clock, serving at each step the newest "
            "running experiment (the default when none runs) - docs/online-experiments.md",
        ),
        champion: str = typer.Option(
            None,
            help="--follow: the default is this model's champion split A/A with itself "
            "(default: the registered --experiment's definition, else ctr_lr's champion)",
        ),
        traffic: Path = typer.Option(
            None, help="open-loop traffic to continue from (its scenario, market and state)"
        ),
        scenario: str = typer.Option("steady", help="scenario when no --traffic is given"),
        start_ms: int = typer.Option(None, help="event time to start (default: after --traffic)"),
        duration_s: float = typer.Option(3600.0, help="event seconds to run"),
        step_s: float = typer.Option(5.0, help="event seconds per micro-batch of requests"),
        compression: float = typer.Option(
            None, help="event seconds per wall second (default: as fast as it can)"
        ),
        request_rate: float = typer.Option(None, help="requests per event second"),
        fresh: bool = typer.Option(False, help="ignore a checkpoint and start over"),
        checkpoint_every: int = typer.Option(20, help="steps between two checkpoints"),
        overrides: str = typer.Option(
            None, help="scenario fields as a JSON object, e.g. '{\"n_users\": 5000}'"
        ),
    ):
        """Run the closed loop of an experiment against the local stack (resumes from its
        checkpoint after a restart); with --follow, of whatever the registry runs."""
        from ctrstream.loop import session
        from ctrstream.loop.wiring import run_loop
        from ctrstream.stack.stopping import stop_on_signals, stop_requested

        s = _settings()
        stop_on_signals()  # SIGTERM / Ctrl-C: the loop ends at its step's end, checkpointed
        if s.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(s.metrics_port, addr=s.metrics_host)
        try:
            ov = json.loads(overrides) if overrides else None
        except json.JSONDecodeError as e:
            raise fail(f"--overrides is not a JSON object: {e}") from None
        if ov is not None and not isinstance(ov, dict):
            raise fail("--overrides must be a JSON object of scenario fields")
        if not follow and not experiment:
            raise fail(
                "which experiment? --experiment NAME (a started one), or --follow to serve "
                "whatever the registry runs"
            )
        if not follow and champion:
            raise fail("--champion names the default of --follow: add --follow or drop it")
        if follow:
            from ctrstream.loop.follow import FollowError, follow_default, run_follow

            try:
                default = follow_default(s, experiment, champion)
                followed = run_follow(
                    s,
                    default=default,
                    traffic=traffic,
                    scenario=scenario,
                    start_ms=start_ms,
                    duration_s=duration_s,
                    step_s=step_s,
                    compression=compression,
                    request_rate=request_rate,
                    fresh=fresh,
                    checkpoint_every=checkpoint_every,
                    overrides=ov,
                    stop=stop_requested,
                )
            except (FollowError, session.SessionError, ValueError, KeyError) as e:
                raise fail(str(e)) from None
            out.print_json(json.dumps(followed.to_dict(), default=str))
            return
        try:
            summary = run_loop(
                s,
                experiment,
                traffic=traffic,
                scenario=scenario,
                start_ms=start_ms,
                duration_s=duration_s,
                step_s=step_s,
                compression=compression,
                request_rate=request_rate,
                fresh=fresh,
                checkpoint_every=checkpoint_every,
                overrides=ov,
                stop=stop_requested,
            )
        except (session.SessionError, ValueError, KeyError) as e:
            raise fail(str(e)) from None
        out.print_json(json.dumps(summary.to_dict(), default=str))
