"""``ctrstream controller``: the offline loop on a schedule (``ctrstream.controller``).

Runs until SIGTERM / Ctrl-C (the state is checkpointed after every step, so a stop or a
crash resumes the cycle where it was); ``--once`` advances until the controller waits or is
idle and exits; ``--status`` prints the state and the last audit records.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

import typer

from ctrstream.cli.app import fail


def register(app: typer.Typer) -> None:
    @app.command("controller")
    def controller(
        model: str = typer.Option("lr", help="the model the controller retrains: lr | deep"),
        base: str = typer.Option(
            None, help="the champion's published base name (default: ctr_lr / ctr_deep)"
        ),
        prefix: str = typer.Option("ctl", help="prefix of the experiments it starts"),
        interval_h: float = typer.Option(6.0, help="event time between two scheduled cycles (h)"),
        train_window_h: float = typer.Option(
            6.0, help="the sliding training window, ending at the cut-off (h of event time)"
        ),
        alarm_min_train_h: float = typer.Option(
            1.0,
            help="a decay alarm's cycle trains on the rows from the alarm on: it starts once "
            "this many hours of event time of labelled rows after the alarm are there (the "
            "cut-off that far after it, the labels complete that far)",
        ),
        share: float = typer.Option(0.2, help="the challenger's share of users in the experiment"),
        shadow_min_s: float = typer.Option(600.0, help="event time the shadow arm scores (s)"),
        shadow_max_s: float = typer.Option(7200.0, help="no shadow verdict by then: roll back"),
        experiment_max_s: float = typer.Option(
            21600.0, help="no decision by then: roll back (s of event time)"
        ),
        min_run_s: float = typer.Option(900.0, help="the experiment's minimum run (s)"),
        min_shadow_clicks: int = typer.Option(
            50, help="clicks the shadow arm's calibration is judged on before its verdict"
        ),
        min_users_per_arm: int = typer.Option(
            200, help="users in each arm before the sequential test counts a look"
        ),
        alpha: float = typer.Option(0.05, help="the sequential test's type-I error"),
        primary_metric: str = typer.Option(
            "revenue_per_request",
            help="what the experiment decides on: revenue_per_request or ctr",
        ),
        latency_p99_ms_max: float = typer.Option(
            None,
            help="guardrail: an arm's ranking latency p99 above this stops it (default: "
            "ctrstream.experiments.design.Guardrails')",
        ),
        epochs: int = typer.Option(None, help="training epochs (default per model)"),
        warmup_h: float = typer.Option(
            1.0, help="first hours of the window: feature history only (not trained on)"
        ),
        val_fraction: float = typer.Option(
            0.2, help="last fraction of the window: the gate's validation rows"
        ),
        read_dlq: bool = typer.Option(
            True, help="reconciliation reads the dead letters to explain late events"
        ),
        oracle: Path = typer.Option(
            None, help="oracle Parquet (impression_id, p_click) for the gate's truth"
        ),
        folder: Path = typer.Option(None, help="state and audit log (default RUN_DIR/controller)"),
        poll_s: float = typer.Option(5.0, help="wall seconds between looks when idle"),
        once: bool = typer.Option(False, "--once", help="advance until waiting or idle, exit"),
        status: bool = typer.Option(False, "--status", help="print the state and last decisions"),
        now: bool = typer.Option(
            False, "--now", help="start a cycle now, whatever the schedule (an operator's trigger)"
        ),
    ):
        """Every N hours of event time (early on a decay alarm): batch view, reconcile,
        retrain, offline gate, shadow, experiment, promote or roll back (docs/controller.md)."""
        from ctrstream.batch.pipeline import BASE_NAMES
        from ctrstream.config import get_settings
        from ctrstream.controller.audit import AuditLog
        from ctrstream.controller.checkpoint import load
        from ctrstream.controller.cycle import Controller, ControllerConfig
        from ctrstream.controller.metrics import count_decision
        from ctrstream.controller.operations import StackOperations
        from ctrstream.experiments.design import PRIMARY_METRICS, Guardrails

        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        settings = get_settings()
        where = Path(folder) if folder else settings.run_dir / "controller"
        if status:
            st = load(where / "state.json")
            recent = AuditLog(where / "audit.jsonl").records()[-10:]
            sys.stdout.write(json.dumps({"state": st.to_dict(), "recent": recent}, default=str))
            sys.stdout.write("\n")
            return
        if model not in BASE_NAMES:
            raise fail(f"--model must be lr or deep, not {model!r}")
        if primary_metric not in PRIMARY_METRICS:
            raise fail(f"--primary-metric must be one of {PRIMARY_METRICS}, not {primary_metric!r}")
        # SIGTERM / Ctrl-C from here on: the step in progress ends (checkpointed), no other
        # starts, exit 0
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            config = ControllerConfig(
                folder=where,
                model=base or BASE_NAMES[model],
                prefix=prefix,
                interval_h=interval_h,
                train_window_h=train_window_h,
                alarm_min_train_h=alarm_min_train_h,
                share=share,
                shadow_min_s=shadow_min_s,
                shadow_max_s=shadow_max_s,
                experiment_max_s=experiment_max_s,
                min_run_s=min_run_s,
                min_shadow_clicks=min_shadow_clicks,
                min_users_per_arm=min_users_per_arm,
                alpha=alpha,
                primary_metric=primary_metric,
                guardrails=Guardrails()
                if latency_p99_ms_max is None
                else Guardrails(latency_p99_ms_max=latency_p99_ms_max),
            ).validate()
            ops = StackOperations(
                settings,
                kind=model,
                oracle_path=oracle,
                epochs=epochs,
                warmup_hours=warmup_h,
                val_fraction=val_fraction,
                read_dlq=read_dlq,
            )
            ctl = Controller(config, ops, on_decision=count_decision)
        except ValueError as e:
            raise fail(str(e)) from None
        if now and not ctl.request_cycle():
            logging.getLogger("ctrstream.controller").info(
                "--now: a cycle is in progress (%s), resuming it", ctl.state.cycle
            )
        champ = ops.champion(config.model)
        if champ is not None:
            from ctrstream.controller.metrics import set_served_version

            set_served_version(config.model, int(champ["version"]))
        if once:
            sys.stdout.write(json.dumps({"status": ctl.run_until_waiting(stop=stop)}) + "\n")
            return
        if settings.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(settings.metrics_port, addr=settings.metrics_host)
        ctl.run(stop, poll_s=poll_s)
