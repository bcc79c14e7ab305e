"""Batch-layer commands: ``ctrstream archive`` and ``ctrstream batch-views``
(``ctrstream train`` / ``ctrstream publish``: :mod:`ctrstream.cli.train`).

Each command lives in its own ``_register_*`` function; heavy imports stay inside the
commands so ``ctrstream --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys

import typer

from ctrstream.cli.app import fail


def _register_archive(app: typer.Typer) -> None:
    @app.command("archive")
    def archive(
        until_idle: float = typer.Option(
            None,
            "--until-idle",
            metavar="SECONDS",
            help="stop once no record arrived for this long "
            "(caught up); default: run until SIGTERM/Ctrl-C",
        ),
        group: str = typer.Option("ctrstream-archive", help="Kafka consumer group"),
        batch_records: int = typer.Option(200_000, help="flush after this many records"),
        max_batch_s: float = typer.Option(5.0, help="flush a batch at least this often"),
        instance_id: str = typer.Option(
            None, help="Kafka static group membership id: a restart reclaims its partitions at once"
        ),
        session_timeout_ms: int = typer.Option(10_000, help="Kafka consumer session timeout"),
    ):
        """Archive the impressions and clicks topics to the Parquet master dataset
        (DATA_DIR/archive/{kind}/date=/hour=, by event hour; offsets committed after fsync)."""
        from ctrstream.batch.archive import run_archiver
        from ctrstream.config import get_settings

        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        settings = get_settings()
        if settings.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(settings.metrics_port, addr=settings.metrics_host)
        stats = run_archiver(
            settings,
            until_idle_s=until_idle,
            group_id=group,
            batch_records=batch_records,
            max_batch_s=max_batch_s,
            instance_id=instance_id,
            session_timeout_ms=session_timeout_ms,
            handle_signals=True,
        )
        sys.stdout.write(
            json.dumps({"archive": stats.as_dict(), "data_dir": str(settings.data_dir)}) + "\n"
        )


def _register_batch_views(app: typer.Typer) -> None:
    @app.command("batch-views")
    def batch_views(
        cutoff_ms: int = typer.Option(
            None,
            "--cutoff-ms",
            help="batch cut-off (aligned to features.CUTOFF_ALIGN_MS); "
            "default: the latest the archive is complete for",
        ),
        keep: int = typer.Option(2, help="versions to keep in Redis (the new one included)"),
    ):
        """Compute the batch views from the archive, write them to Redis under a new version
        and switch bv:current to it."""
        from ctrstream.batch.views import publish_batch_view
        from ctrstream.config import get_settings

        try:
            res = publish_batch_view(get_settings(), cutoff_ms=cutoff_ms, keep=keep)
        except ValueError as e:
            raise fail(str(e)) from None
        sys.stdout.write(json.dumps(res) + "\n")


def register(app: typer.Typer) -> None:
    _register_archive(app)
    _register_batch_views(app)
