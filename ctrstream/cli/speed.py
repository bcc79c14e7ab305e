"""``ctrstream speed``: run the speed layer's Bytewax dataflows, and send watermark heartbeats.

``ctrstream speed [features|join|all] -w WORKERS -p PROCESSES --recovery-dir DIR`` starts
each chosen dataflow as a Bytewax cluster of ``PROCESSES`` processes on this host (``python
-m bytewax.run`` wired with ``-i/-a`` on loopback) and supervises each cluster as a unit:
when one process dies the launcher stops the others and exits non-zero naming it
(:mod:`ctrstream.cli.cluster`). ``ctrstream speed features -i K -a "h0:port;h1:port;..."``
starts process ``K`` of a cluster spread over several hosts (one flow per command: the
features and the join flows are two clusters with their own address lists).

With a recovery directory (default ``<run_dir>/speed-recovery/<flow>``) each flow snapshots
every ``--snapshot-s`` seconds and resumes from its last snapshot after a crash; the store
is laid out for the cluster on first use (one partition per worker; with ``-i`` this host's
share) and records its layout: resuming it with another process or worker count is refused
with what to do (``docs/bytewax-cluster.md``).

``ctrstream speed heartbeat --at-ms T`` (or ``--ahead-s S``: S seconds after now) writes
one watermark heartbeat into every partition of ``impressions`` and ``clicks``, advancing
the event-time watermark of idle or finished partitions so that buckets and attribution
windows close (see ``ctrstream.kafka.partition``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import typer

from ctrstream.cli.cluster import (
    Layout,
    LayoutError,
    bytewax_commands,
    prepare_store,
    start_member,
    supervise,
)

FLOWS = {"features": "ctrstream.streaming.features_flow", "join": "ctrstream.streaming.join_flow"}


def flow_target(flow: str, stop_at_end: bool = False) -> str:
    """The ``bytewax.run`` import string of ``flow``."""
    return f"{FLOWS[flow]}:get_flow({'True' if stop_at_end else ''})"


def loopback_addresses(n: int) -> list[str]:
    """``n`` free loopback addresses for the processes of a one-host cluster."""
    from ctrstream.stack.services import free_port

    return [f"127.0.0.1:{free_port()}" for _ in range(n)]


def job_commands(
    flow: str,
    workers: int = 1,
    processes: int = 1,
    recovery_dir: Path | None = None,
    snapshot_s: float = 5.0,
    stop_at_end: bool = False,
    layout: Layout | None = None,
) -> list[list[str]]:
    """The ``python -m bytewax.run`` command line of each process of ``flow`` this host
    starts (``layout``, or ``processes`` x ``workers`` on this host)."""
    layout = layout or Layout(processes, workers)
    addrs = None
    if layout.process_id is None and layout.processes > 1:
        addrs = loopback_addresses(layout.processes)
    return bytewax_commands(flow_target(flow, stop_at_end), layout, recovery_dir, snapshot_s, addrs)


SHARDS_FILE = "ctrstream-shards.json"


def check_shards(recovery_dir: Path) -> None:
    """The features flow's shard count is part of its snapshots: record it in the recovery
    store the first time, and refuse to resume that store with a different count."""
    from ctrstream.streaming.features_flow import N_SHARDS

    marker = Path(recovery_dir) / SHARDS_FILE
    if not marker.exists():
        marker.write_text(json.dumps({"n_shards": N_SHARDS}))
        return
    had = json.loads(marker.read_text()).get("n_shards")
    if had != N_SHARDS:
        raise typer.BadParameter(
            f"the recovery store {recovery_dir} was written with {had} shards, this features "
            f"flow uses {N_SHARDS} (CTRSTREAM_SPEED_SHARDS): resuming would lose the state of "
            f"the other shards. Set CTRSTREAM_SPEED_SHARDS={had}, or give a new --recovery-dir "
            "(a new store starts the flow from scratch)."
        )


def _say(message: str) -> None:
    print(message, flush=True)  # a supervisor's log shows it at once


def run_jobs(
    flows: list[str],
    workers: int,
    processes: int,
    recovery_root: Path | None,
    snapshot_s: float,
    stop_at_end: bool,
    log: Callable[[str], None] = _say,
    layout: Layout | None = None,
) -> int:
    """Start every process of every flow (this host's) and supervise them as one unit: a
    process that dies stops them all (:func:`ctrstream.cli.cluster.supervise`)."""
    layout = layout or Layout(processes, workers)
    plans = []
    for flow in flows:  # every store is checked before any process starts
        rdir = None
        if recovery_root is not None:
            rdir = Path(recovery_root) / flow
            if prepare_store(rdir, layout):
                log(
                    f"{flow}: initialised recovery store {rdir} for {layout.describe()} "
                    f"(partitions {layout.local_partitions()} of {layout.partitions})"
                )
            if flow == "features":
                check_shards(rdir)
        plans.append((flow, rdir))
    members = []
    index = 0  # process k of this host serves its metrics on metrics_port + k (no clash)
    for flow, rdir in plans:
        argvs = job_commands(
            flow, snapshot_s=snapshot_s, stop_at_end=stop_at_end, recovery_dir=rdir, layout=layout
        )
        if layout.process_id is not None:  # one process per flow on this host: by flow
            index = list(FLOWS).index(flow)
        for k, argv in zip(layout.local_processes(), argvs, strict=True):
            env = {
                **os.environ,
                "CTRSTREAM_SPEED_PROCESS_INDEX": str(index),
                "PYTHONUNBUFFERED": "1",
            }
            index += 1
            members.append(start_member(f"{flow}[{k}]", argv, env, log))
    return supervise(members, log)


def register(app: typer.Typer) -> None:
    @app.command("speed")
    def speed(
        flow: str = typer.Argument("all", help="features, join, all, or heartbeat"),
        workers: int = typer.Option(1, "-w", "--workers", help="workers per process"),
        processes: int = typer.Option(1, "-p", "--processes", help="processes per flow"),
        process_id: int = typer.Option(
            None, "-i", "--process-id", help="several hosts: this host's process index"
        ),
        addresses: str = typer.Option(
            None, "-a", "--addresses", help="several hosts: 'host:port;host:port' of every process"
        ),
        recovery_dir: Path = typer.Option(
            None, "--recovery-dir", help="recovery store root (default <run_dir>/speed-recovery)"
        ),
        no_recovery: bool = typer.Option(False, "--no-recovery", help="run without snapshots"),
        snapshot_s: int = typer.Option(
            5, "--snapshot-s", help="snapshot interval in whole seconds"
        ),
        stop_at_end: bool = typer.Option(
            False, "--stop-at-end", help="exit when the end offsets seen at start are reached"
        ),
        at_ms: int = typer.Option(None, "--at-ms", help="heartbeat: its event time"),
        ahead_s: float = typer.Option(
            0.0, "--ahead-s", help="heartbeat: or now + this many seconds"
        ),
    ):
        """Run the features and/or join dataflows (recovery on by default), or send a watermark
        heartbeat into every impressions/clicks partition (`speed heartbeat --at-ms T`)."""
        from ctrstream.cli.app import fail
        from ctrstream.config import get_settings
        from ctrstream.kafka.clients import ensure_topics
        from ctrstream.kafka.heartbeats import ControlSecretError, load_control_secret

        settings = get_settings()
        try:  # heartbeats are signed and verified with the stack's control secret
            load_control_secret(settings)
        except ControlSecretError as e:
            raise fail(str(e)) from None
        if flow == "heartbeat":
            from ctrstream.kafka.heartbeats import send_heartbeat

            t = at_ms if at_ms is not None else int((time.time() + ahead_s) * 1000)
            try:
                n = send_heartbeat(settings, t)
            except ValueError as e:
                raise fail(f"{e}: give --at-ms a time in milliseconds since the epoch") from None
            print(f"wrote {n} heartbeats at event time {t}")
            return
        flows = list(FLOWS) if flow == "all" else [flow]
        if any(f not in FLOWS for f in flows):
            raise typer.BadParameter(
                f"unknown flow {flow!r}: choose features, join, all or heartbeat"
            )
        try:
            layout = Layout.from_options(processes, workers, process_id, addresses)
        except LayoutError as e:
            raise typer.BadParameter(str(e)) from None
        if layout.process_id is not None and len(flows) > 1:
            raise typer.BadParameter(
                "-i/-a start one process of one cluster: run `speed features -i K -a ...` and "
                "`speed join -i K -a ...` (each flow its own address list)"
            )
        ensure_topics(settings, settings.topics.all())
        root = None if no_recovery else (recovery_dir or settings.run_dir / "speed-recovery")
        try:
            rc = run_jobs(flows, workers, processes, root, snapshot_s, stop_at_end, layout=layout)
        except LayoutError as e:
            raise fail(str(e)) from None
        raise typer.Exit(rc)
