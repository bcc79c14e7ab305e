"""``ctrstream speed``: run the speed layer's Bytewax dataflows, and send watermark heartbeats.

``ctrstream speed [features|join|all] -w WORKERS -p PROCESSES --recovery-dir DIR`` starts
``python -m bytewax.run`` for each chosen dataflow (``-p`` > 1: one process per index, wired
with ``-i/-a``), in this command's process group, and waits for them. With a recovery
directory (default ``<run_dir>/speed-recovery/<flow>``) each flow snapshots every
``--snapshot-s`` seconds and resumes from its last snapshot after a crash; the directory is
initialised on first use. The worker layout (``-w``/``-p``) must stay the same for one
recovery directory.

``ctrstream speed heartbeat --at-ms T`` (or ``--ahead-s S``: S seconds after now) writes
one watermark heartbeat into every partition of ``impressions`` and ``clicks``, advancing
the event-time watermark of idle or finished partitions so that buckets and attribution
windows close (see ``ctrstream.kafka.partition``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

# seconds the other processes of a flow get to stop after one of them failed (then killed:
# a Bytewax cluster that lost a peer cannot close its epoch; it resumes from the snapshot)
FAILED_CLUSTER_STOP_S = 10.0

FLOWS = {"features": "ctrstream.streaming.features_flow", "join": "ctrstream.streaming.join_flow"}


def job_commands(
    flow: str,
    workers: int = 1,
    processes: int = 1,
    recovery_dir: Path | None = None,
    snapshot_s: float = 5.0,
    stop_at_end: bool = False,
) -> list[list[str]]:
    """The ``python -m bytewax.run`` command line of each process of ``flow``."""
    from ctrstream.stack.services import free_port

    target = f"{FLOWS[flow]}:get_flow({'True' if stop_at_end else ''})"
    base = [sys.executable, "-m", "bytewax.run", target, "-w", str(workers)]
    if recovery_dir is not None:
        base += ["-r", str(recovery_dir), "-s", str(max(1, round(snapshot_s))), "-b", "0"]
    if processes <= 1:
        return [base]
    addrs = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    return [base + ["-i", str(k), "-a", addrs] for k in range(processes)]


def init_recovery(recovery_dir: Path, partitions: int = 1) -> bool:
    """Create the Bytewax recovery store if it does not exist; True when created."""
    recovery_dir = Path(recovery_dir)
    if recovery_dir.exists() and any(recovery_dir.glob("*.sqlite3")):
        return False
    recovery_dir.mkdir(parents=True, exist_ok=True)
    from bytewax.recovery import init_db_dir

    init_db_dir(recovery_dir, partitions)
    return True


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


def run_jobs(
    flows: list[str],
    workers: int,
    processes: int,
    recovery_root: Path | None,
    snapshot_s: float,
    stop_at_end: bool,
    log=print,
) -> int:
    """Start every process of every flow in this process group and wait for them."""
    from ctrstream.stack.procs import die_with_parent

    procs: list[subprocess.Popen] = []
    index = 0  # across flows: process k serves its metrics on metrics_port + k (no clash)
    for flow in flows:
        rdir = None
        if recovery_root is not None:
            rdir = Path(recovery_root) / flow
            if init_recovery(rdir, max(1, processes)):
                log(f"{flow}: initialised recovery store {rdir}")
            if flow == "features":
                check_shards(rdir)
        for k, argv in enumerate(
            job_commands(flow, workers, processes, rdir, snapshot_s, stop_at_end)
        ):
            env = {
                **os.environ,
                "CTRSTREAM_SPEED_PROCESS_INDEX": str(index),
                "PYTHONUNBUFFERED": "1",
            }
            index += 1
            log(f"{flow}[{k}]: {' '.join(argv)}")
            # a flow dies with this command, even with kill -9: none outlives it holding its
            # metrics port (a restart right away binds the same ports)
            procs.append(
                subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent()
                )
            )

    def stop(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rc = 0
    kill_at = None  # one process failed: the others (its cluster) get this long to stop
    try:
        while procs:
            for p in list(procs):
                code = p.poll()
                if code is None:
                    continue
                procs.remove(p)
                if code != 0:
                    rc = rc or code
                    log(f"a speed-layer process exited with {code}; stopping the others")
                    stop(signal.SIGTERM, None)
                    kill_at = kill_at or time.monotonic() + FAILED_CLUSTER_STOP_S
            if kill_at is not None and time.monotonic() > kill_at:
                for p in procs:  # a cluster that lost a peer may not finish its epoch
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return rc


def register(app: typer.Typer) -> None:
    @app.command("speed")
    def speed(
        flow: str = typer.Argument("all", help="features, join, all, or heartbeat"),
        workers: int = typer.Option(1, "-w", "--workers", help="workers per process"),
        processes: int = typer.Option(1, "-p", "--processes", help="processes per flow"),
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
        ensure_topics(settings, settings.topics.all())
        root = None if no_recovery else (recovery_dir or settings.run_dir / "speed-recovery")
        raise typer.Exit(run_jobs(flows, workers, processes, root, snapshot_s, stop_at_end))
