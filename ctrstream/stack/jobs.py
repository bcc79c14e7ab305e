"""The long-running jobs of ``ctrstream run``, as data: one list, read by the supervisor
(:mod:`ctrstream.stack.supervisor`) and checked against ``docker-compose.yml`` (the local run
and the container deployment name the same jobs with the same commands).

A job is a name, its ``ctrstream ...`` command line, its environment, the Prometheus ports it
serves, where its checkpoint lives and the Kafka consumer group whose lag says how far behind
it is. Command lines and paths hold ``{placeholders}`` (:data:`PLACEHOLDERS`) filled by
:func:`render` from the run's values (the local run directory, or ``/data/run`` in compose).

Two kinds of job: **services** run until stopped and are restarted whenever they exit;
the **driver** produces the input (a replay of generated traffic into Kafka, open loop; the
closed loop's world through the ad server, closed loop) over a bounded event-time span and
is restarted only when it fails.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

Role = Literal["service", "driver"]
Mode = Literal["open", "closed"]
MODES: tuple[Mode, ...] = ("open", "closed")

# what a command line or a path may name; every one is filled by :func:`render`
PLACEHOLDERS = ("run_dir", "data_dir", "api_host", "api_port", "experiment")


@dataclass(frozen=True)
class Job:
    """One supervised job (data only)."""

    name: str
    argv: tuple[str, ...]  # the command line, ``ctrstream`` first, with {placeholders}
    role: Role = "service"
    modes: tuple[Mode, ...] = MODES  # the modes that run it
    env: Mapping[str, str] = field(default_factory=dict)
    # Prometheus ports it serves: one per process (a multi-process Bytewax job serves
    # metrics_port + k from process k); 0: it serves none on CTRSTREAM_METRICS_PORT
    metrics_ports: int = 1
    api_metrics: bool = False  # serves /metrics on its own API port instead
    checkpoint: str | None = None  # where its state is checkpointed (a path, with placeholders)
    group: str | None = None  # the Kafka consumer group that commits its positions
    topics: tuple[str, ...] = ()  # the topics (settings.topics keys) that group consumes
    stop_signal: int = signal.SIGTERM  # how it is asked to stop and checkpoint
    # exit codes of a clean stop (negative: killed by that signal, as Popen reports it)
    clean_exits: tuple[int, ...] = (0,)
    processes: int = 1  # OS processes of one unit (a Bytewax cluster: restarted as a unit)
    needs: str | None = None  # a module the job's command lives in (absent: the job is left out)


def speed_argv(flow: str, processes: int) -> tuple[str, ...]:
    """``ctrstream speed FLOW`` with its recovery store in the run directory."""
    argv = ("ctrstream", "speed", flow, "--recovery-dir", "{run_dir}/speed-recovery")
    return argv + (("-p", str(processes)) if processes > 1 else ())


def all_jobs(speed_processes: int = 1) -> list[Job]:
    """Every job of ``ctrstream run``, in start order (the driver last)."""
    if speed_processes < 1:
        raise ValueError(f"speed processes must be at least 1, not {speed_processes}")
    return [
        Job(
            name="speed-features",
            argv=speed_argv("features", speed_processes),
            metrics_ports=speed_processes,
            checkpoint="{run_dir}/speed-recovery/features",
            group="ctrstream-speed-features",
            topics=("impressions", "clicks"),
            processes=speed_processes,
        ),
        Job(
            name="speed-join",
            argv=speed_argv("join", speed_processes),
            metrics_ports=speed_processes,
            checkpoint="{run_dir}/speed-recovery/join",
            group="ctrstream-speed-join",
            topics=("impressions", "clicks"),
            processes=speed_processes,
        ),
        Job(
            name="archive",
            argv=("ctrstream", "archive"),
            checkpoint="{data_dir}/archive",
            group="ctrstream-archive",
            topics=("impressions", "clicks"),
        ),
        Job(
            name="score",
            argv=("ctrstream", "score", "--recovery-dir", "{run_dir}/score-recovery"),
            modes=("open",),
            checkpoint="{run_dir}/score-recovery",
        ),
        Job(
            name="calibrate",
            argv=("ctrstream", "calibrate"),
            # its Kafka positions live in its Redis checkpoint, not in a group
            checkpoint="redis:calibrate",
        ),
        Job(
            name="serve",
            argv=("ctrstream", "serve", "--host", "{api_host}", "--port", "{api_port}"),
            env={"CTRSTREAM_METRICS_PORT": "0"},
            metrics_ports=0,
            api_metrics=True,
            # uvicorn drains its connections on SIGTERM, then re-raises the signal it caught
            clean_exits=(0, -signal.SIGTERM),
        ),
        Job(
            name="monitor",
            # the oracle's scores: the loop's decision log (impression id, true p), Parquet
            # parts under the experiment's folder (there once the experiment is started;
            # the log's own folder appears when the loop first runs)
            argv=("ctrstream", "monitor", "--oracle", "{run_dir}/experiments/{experiment}"),
            modes=("closed",),
            group="ctrstream-monitor",
            topics=("predictions", "labeled"),
            needs="ctrstream.monitoring",
        ),
        Job(
            name="controller",
            argv=("ctrstream", "controller"),
            modes=("closed",),
            checkpoint="{run_dir}/controller",
            needs="ctrstream.controller",
        ),
        Job(
            name="replay",
            argv=("ctrstream", "replay", "--no-progress"),
            role="driver",
            modes=("open",),
            metrics_ports=0,
            stop_signal=signal.SIGINT,  # the replay flushes what it queued on Ctrl-C
            clean_exits=(0, 130),  # 130: interrupted, everything queued was flushed
        ),
        Job(
            name="loop",
            # follows the registry: the controller's shadow and experiment arms take the
            # traffic while they run, {experiment} (the champion A/A unless it names a started
            # experiment) when none runs - docs/online-experiments.md
            argv=("ctrstream", "loop", "run", "--follow", "--experiment", "{experiment}"),
            role="driver",
            modes=("closed",),
            checkpoint="{run_dir}/loop-follow",
        ),
    ]


def jobs_for(mode: Mode, speed_processes: int = 1) -> list[Job]:
    """The jobs ``ctrstream run`` starts in ``mode`` (open: replay and scorer; closed: the
    ad server's loop, the decay monitor and the controller)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose open or closed")
    return [j for j in all_jobs(speed_processes) if mode in j.modes]


def render(text: str, values: Mapping[str, str]) -> str:
    """``text`` with its {placeholders} filled; a missing value is a clear error."""
    try:
        return text.format_map(dict(values))
    except KeyError as e:
        raise ValueError(
            f"{text!r} names {{{e.args[0]}}}, which this run does not set "
            f"(known: {', '.join(sorted(values))})"
        ) from None


def render_job(job: Job, values: Mapping[str, str], extra: tuple[str, ...] = ()) -> Job:
    """``job`` with its command line and checkpoint filled, and ``extra`` arguments (taken
    verbatim: a scenario's JSON holds braces) appended."""
    return replace(
        job,
        argv=tuple(render(a, values) for a in job.argv) + tuple(extra),
        checkpoint=render(job.checkpoint, values) if job.checkpoint else None,
    )


# the values compose's containers run with (docker-compose.yml: /data volume, API on 8080)
COMPOSE_VALUES: dict[str, str] = {
    "run_dir": "/data/run",
    "data_dir": "/data",
    "api_host": "0.0.0.0",
    "api_port": "8080",
    "experiment": "${CTRSTREAM_EXPERIMENT:-live}",
}


__all__ = [
    "COMPOSE_VALUES",
    "Job",
    "MODES",
    "PLACEHOLDERS",
    "all_jobs",
    "jobs_for",
    "render",
    "render_job",
    "speed_argv",
]
