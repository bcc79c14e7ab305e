"""The online jobs' commands: ``ctrstream score``, ``ctrstream calibrate``, ``ctrstream reconcile``.

Heavy imports stay inside the commands.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import typer


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _metrics_server(settings) -> None:
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.metrics_host)


def register(app: typer.Typer) -> None:
    @app.command("score")
    def score(
        model: str = typer.Option("ctr_deep", help="published model (base name: ctr_deep, ctr_lr)"),
        model_name: str = typer.Option(None, help="exact Triton model name (overrides --model)"),
        batch_size: int = typer.Option(
            1000, help="impressions per micro-batch = per Triton request"
        ),
        until_end: bool = typer.Option(False, help="stop at the current end of the topic"),
        from_end: bool = typer.Option(
            False, help="start at the end of the topic, not the beginning"
        ),
        recovery_dir: Path = typer.Option(
            None, help="Bytewax recovery directory (offsets survive restarts)"
        ),
        since_ms: int = typer.Option(None, help="skip impressions with an earlier event time (ms)"),
        workers: int = typer.Option(1, "-w", "--workers", help="workers per process"),
        processes: int = typer.Option(1, "-p", "--processes", help="processes (this host)"),
        process_id: int = typer.Option(
            None, "-i", "--process-id", help="several hosts: this host's process index"
        ),
        addresses: str = typer.Option(
            None, "-a", "--addresses", help="several hosts: 'host:port;host:port' of every process"
        ),
        snapshot_s: int = typer.Option(
            5, "--snapshot-s", help="cluster: snapshot interval in whole seconds"
        ),
    ):
        """Score every impression at its event time (Triton, calibrated) -> predictions topic.
        With -p/-w above 1 (or -i/-a), a supervised Bytewax cluster (docs/bytewax-cluster.md)."""
        from bytewax.recovery import RecoveryConfig, init_db_dir
        from bytewax.testing import run_main

        from ctrstream.cli.cluster import Layout, LayoutError
        from ctrstream.config import get_settings
        from ctrstream.serving.scorer import build_flow
        from ctrstream.stack.stopping import stop_on_signals

        try:
            layout = Layout.from_options(processes, workers, process_id, addresses)
        except LayoutError as e:
            raise typer.BadParameter(str(e)) from None
        if layout != Layout():
            raise typer.Exit(
                _score_cluster(
                    layout,
                    recovery_dir,
                    snapshot_s,
                    model=model,
                    batch_size=batch_size,
                    stop_at_end=until_end,
                    from_end=from_end,
                    model_name=model_name,
                    since_ms=since_ms,
                )
            )
        _logging()
        settings = get_settings()
        _metrics_server(settings)
        stop_on_signals()  # SIGTERM / Ctrl-C: the source ends, the last epoch is snapshotted
        flow = build_flow(
            settings,
            model=model,
            model_name=model_name,
            batch_size=batch_size,
            stop_at_end=until_end,
            from_end=from_end,
            since_ms=since_ms,
        )
        rc = None
        if recovery_dir:
            recovery_dir.mkdir(parents=True, exist_ok=True)
            if not any(recovery_dir.iterdir()):
                init_db_dir(recovery_dir, 1)
            elif (recovery_dir / "ctrstream-cluster.json").exists():
                from ctrstream.cli.cluster import prepare_store

                try:  # a store a cluster wrote: refused unless it was one process, one worker
                    prepare_store(recovery_dir, layout)
                except LayoutError as e:
                    from ctrstream.cli.app import fail

                    raise fail(str(e)) from None
            rc = RecoveryConfig(str(recovery_dir))
        run_main(flow, epoch_interval=None, recovery_config=rc)

    def _score_cluster(
        layout, recovery_dir: Path | None, snapshot_s: int, **flow_args: object
    ) -> int:
        """``ctrstream score`` as a Bytewax cluster: this host's processes, supervised as a
        unit (``ctrstream.cli.cluster``)."""
        import os

        from ctrstream.cli.app import fail
        from ctrstream.cli.cluster import (
            LayoutError,
            bytewax_commands,
            prepare_store,
            start_member,
            supervise,
        )
        from ctrstream.stack.services import free_port

        if recovery_dir is not None:
            try:
                if prepare_store(recovery_dir, layout):
                    typer.echo(f"score: initialised recovery store {recovery_dir}")
            except LayoutError as e:
                raise fail(str(e)) from None
        args = ", ".join(f"{k}={v!r}" for k, v in flow_args.items())
        addrs = None
        if layout.process_id is None and layout.processes > 1:
            addrs = [f"127.0.0.1:{free_port()}" for _ in range(layout.processes)]
        argvs = bytewax_commands(
            f"ctrstream.serving.scorer:get_flow({args})", layout, recovery_dir, snapshot_s, addrs
        )
        members = []
        for k, argv in zip(layout.local_processes(), argvs, strict=True):
            index = 0 if layout.process_id is not None else k
            env = {**os.environ, "CTRSTREAM_SPEED_PROCESS_INDEX": str(index)}
            members.append(start_member(f"score[{k}]", argv, env, typer.echo))
        return supervise(members, typer.echo)

    @app.command("calibrate")
    def calibrate(
        method: str = typer.Option("platt", help="served calibrator: platt or isotonic"),
        context: str = typer.Option(
            "", help="context features, comma separated (position,device_type)"
        ),
        checkpoint_interval: float = typer.Option(2.0, help="seconds between Redis checkpoints"),
        batch_size: int = typer.Option(2000, help="records per Kafka micro-batch"),
        until_idle: float = typer.Option(
            None, help="exit after this many seconds without new records"
        ),
        job_name: str = typer.Option(
            "calibrate", help="checkpoint name: a restarted job of the same name resumes"
        ),
    ):
        """Join predictions with labels and train the online calibrators (checkpoints in Redis)."""
        from ctrstream.calibration.calibrator import CalibrationConfig
        from ctrstream.calibration.job import run
        from ctrstream.config import get_settings
        from ctrstream.store.calibration import CalibrationStateError

        if method not in ("platt", "isotonic"):
            raise typer.BadParameter("--method must be platt or isotonic")
        _logging()
        settings = get_settings()
        _metrics_server(settings)
        stopping = {"flag": False}

        def on_signal(signum, _frame):
            stopping["flag"] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        cfg = CalibrationConfig(method=method, context=tuple(c for c in context.split(",") if c))
        try:
            job = run(
                settings,
                cfg,
                job_name=job_name,
                batch_size=batch_size,
                checkpoint_interval_s=checkpoint_interval,
                idle_exit_s=until_idle,
                stop=lambda _job: stopping["flag"],
            )
        except CalibrationStateError as e:  # a foreign or malformed checkpoint: say so, exit
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        for mv, c in sorted(job.cals.items()):
            m = c.metrics()
            typer.echo(
                f"{mv}: {m['n_seen']} examples, raw mean/obs {m['raw']['ratio']:.3f} "
                f"ECE {m['raw']['ece']:.4f} -> calibrated {m['calibrated']['ratio']:.3f} "
                f"ECE {m['calibrated']['ece']:.4f}, drift detections {m['drift_count']}"
            )

    @app.command("reconcile")
    def reconcile_cmd(
        version: str = typer.Option(None, help="batch view version (default: bv:current)"),
        data_dir: Path = typer.Option(
            None, help="batch data directory (default: settings.data_dir)"
        ),
        dry_run: bool = typer.Option(False, help="report only; do not write batch values"),
        watch: bool = typer.Option(
            False, help="keep running: reconcile each batch view as it lands"
        ),
        interval: float = typer.Option(5.0, help="--watch poll interval (seconds)"),
        as_json: bool = typer.Option(
            False, "--json", help="print the JSON report, not the summary"
        ),
    ):
        """Compare the batch view with the speed view, explain differences, let the batch win."""
        from ctrstream.batch import reconcile as rec
        from ctrstream.config import get_settings

        _logging("WARNING")
        settings = get_settings()
        if watch:
            _metrics_server(settings)
            rec.watch(settings, data_dir, interval_s=interval, apply=not dry_run)
            return
        try:
            report = rec.reconcile(settings, data_dir, version, apply=not dry_run)
        except RuntimeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        typer.echo(
            json.dumps(report.to_dict(), indent=2, default=str) if as_json else report.markdown()
        )
