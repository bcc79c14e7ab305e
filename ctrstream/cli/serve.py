"""``ctrstream serve``: the prediction API (the online jobs: :mod:`ctrstream.cli.jobs`)."""

from __future__ import annotations

from typing import Any

import typer

# the API's limits (ctrstream.serving.limits holds the same defaults; it is imported only
# when the server starts, so that every other command starts fast)
BODY_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        host: str = typer.Option("127.0.0.1", help="address to bind"),
        port: int = typer.Option(8080, help="port to bind"),
        model: str = typer.Option("ctr_deep", help="published model (base name: ctr_deep, ctr_lr)"),
        model_name: str = typer.Option(None, help="exact Triton model name (overrides --model)"),
        max_rows: int = typer.Option(256, help="most rows per Triton request"),
        feature_method: str = typer.Option(
            "script", help="Redis read: script (one EVALSHA) or pipeline"
        ),
        feature_cache_s: float = typer.Option(
            None,
            help="seconds to reuse counts of ad/campaign/advertiser/site entities between "
            "requests (0: off; default and maximum: the speed layer's flush interval)",
        ),
        feature_tracking: bool = typer.Option(
            True,
            help="keep cached counts until Redis reports a write to them (CLIENT TRACKING), "
            "within the same staleness bound",
        ),
        workers: int = typer.Option(
            1,
            help="worker processes sharing the port (uvicorn workers; each has its own "
            "connections and feature cache, /metrics sums them all); use the number of "
            "cores the API may use",
        ),
        log_level: str = typer.Option("warning", help="uvicorn log level"),
        loop: str = typer.Option(
            "auto", help="event loop: auto (uvloop when installed), asyncio, uvloop"
        ),
        http: str = typer.Option(
            "auto", help="HTTP parser: auto (httptools when installed), h11, httptools"
        ),
        body_timeout: float = typer.Option(
            BODY_TIMEOUT_S,
            help="seconds a request's body may take to arrive after its headers (then 408 "
            "and the connection is closed)",
        ),
        max_body_bytes: int = typer.Option(
            MAX_BODY_BYTES, help="largest request body in bytes (larger: 413)"
        ),
        head_timeout: float = typer.Option(
            HEAD_TIMEOUT_S,
            help="seconds a request's line and headers may take to arrive, from the "
            "connection or their first byte (then 408 and the connection is closed)",
        ),
        max_header_bytes: int = typer.Option(
            MAX_HEADER_BYTES,
            help="largest request line plus headers in bytes (larger: 431)",
        ),
    ):
        """Run the prediction API (POST /v1/predict, /healthz, /readyz, /metrics, /docs)."""
        import uvicorn

        from ctrstream.config import get_settings
        from ctrstream.serving.api import create_app
        from ctrstream.serving.limits import HEAD_TIMEOUT_ENV, http_protocol

        if feature_method not in ("script", "pipeline"):
            raise typer.BadParameter("--feature-method must be script or pipeline")
        if workers < 1:
            raise typer.BadParameter(f"--workers must be at least 1, not {workers}")
        settings = get_settings()
        # keyword arguments of create_app, also handed to every worker as JSON
        app_args: dict[str, Any] = dict(
            model=model,
            model_name=model_name,
            max_rows=max_rows,
            feature_method=feature_method,
            feature_cache_s=feature_cache_s,
            feature_tracking=feature_tracking,
            max_body_bytes=max_body_bytes,
            body_timeout_s=body_timeout,
        )
        if head_timeout <= 0:
            raise typer.BadParameter(f"--head-timeout must be above 0, not {head_timeout:g}")
        if max_header_bytes < 1024:
            raise typer.BadParameter(
                f"--max-header-bytes must be at least 1024, not {max_header_bytes}"
            )
        try:
            api = create_app(settings, **app_args)  # also checks the arguments before any fork
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        if settings.metrics_port:
            typer.echo("note: the API serves its metrics on /metrics of the API port", err=True)
        if loop not in ("auto", "asyncio", "uvloop"):
            raise typer.BadParameter("--loop must be auto, asyncio or uvloop")
        if http not in ("auto", "h11", "httptools"):
            raise typer.BadParameter("--http must be auto, h11 or httptools")
        import json
        import os

        os.environ[HEAD_TIMEOUT_ENV] = str(head_timeout)  # read by the protocol, every worker
        server: dict[str, Any] = dict(
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            loop=loop,
            http=http_protocol(http),  # uvicorn's parser with the head limits
            h11_max_incomplete_event_size=max_header_bytes,
            lifespan="on",
        )
        if workers == 1:
            uvicorn.run(api, **server)
            return
        import tempfile

        from ctrstream.serving.api import APP_ARGS_ENV

        os.environ[APP_ARGS_ENV] = json.dumps(app_args)
        with tempfile.TemporaryDirectory(prefix="ctrstream-api-metrics-") as mp_dir:
            # prometheus_client's multiprocess mode: workers write samples here, /metrics sums
            os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", mp_dir)
            uvicorn.run(
                "ctrstream.serving.api:app_from_env", factory=True, workers=workers, **server
            )
