"""``ctrstream monitor``: the decay monitor job (``ctrstream.monitoring.job``).

Heavy imports stay inside the command.
"""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("monitor")
    def monitor(
        oracle: Path = typer.Option(
            None,
            help="reference scores: the oracle Parquet (impression_id, p_click) or a folder of "
            "Parquet files with impression_id and p_click or p_true (the closed loop's "
            "decision log); without it NE, AUC and calibration are watched, the gap is not",
        ),
        profile: Path = typer.Option(
            None,
            help="training distribution for the PSI: JSON of "
            "ctrstream.monitoring.decay.reference_profile (one for every version)",
        ),
        window_min: float = typer.Option(60.0, help="rolling window of event time (minutes)"),
        baseline_min: float = typer.Option(
            60.0, help="a version's first labelled event time that sets its baseline gap"
        ),
        gap_threshold: float = typer.Option(0.03, help="alarm: gap above baseline by this"),
        confirm_gap: float = typer.Option(
            0.01, help="alarm after an upward ADWIN detection: gap above baseline by this"
        ),
        min_clicks: int = typer.Option(200, help="no alarm on a window with fewer clicks"),
        publish_interval: float = typer.Option(
            2.0, help="seconds between gauges, store state and committed positions"
        ),
        until_idle: float = typer.Option(
            None, help="exit after this many seconds without new records"
        ),
        job_name: str = typer.Option("monitor", help="consumer group ctrstream-NAME"),
    ):
        """Watch the served models for decay: rolling NE/AUC vs the oracle, calibration, ADWIN,
        feature drift (PSI), label delay -> Prometheus and the store's decay state."""
        from ctrstream.config import get_settings
        from ctrstream.monitoring.decay import DecayConfig
        from ctrstream.monitoring.job import run

        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
        settings = get_settings()
        if settings.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(settings.metrics_port, addr=settings.metrics_host)
        try:
            cfg = DecayConfig(
                window_ms=int(window_min * 60_000),
                baseline_ms=int(baseline_min * 60_000),
                gap_threshold=gap_threshold,
                confirm_gap=confirm_gap,
                min_clicks=min_clicks,
            )
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        prof = None
        if profile is not None:
            try:
                prof = json.loads(profile.read_text())
            except (OSError, ValueError) as e:
                raise typer.BadParameter(
                    f"--profile {profile}: {e}; give the JSON that "
                    "ctrstream.monitoring.decay.reference_profile returns"
                ) from None
        stopping = {"flag": False}

        def on_signal(signum, _frame):
            stopping["flag"] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            job = run(
                settings,
                cfg,
                oracle_path=oracle,
                job_name=job_name,
                publish_interval_s=publish_interval,
                idle_exit_s=until_idle,
                stop=lambda _job: stopping["flag"],
                default_profile=prof,
            )
        except (RuntimeError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        for version, s in job.monitor.get()["versions"].items():
            gap = s["ne_gap"]
            typer.echo(
                f"{version}: {s['n_seen']} joined, window NE {s['ne']:.4f} "
                f"gap {'n/a' if math.isnan(gap) else f'{gap:+.4f}'} "
                f"alarm {'since ' + str(s['since_ms']) if s['alarm'] else 'no'}"
            )
