"""``ctrstream run``: the whole system as supervised long-running services, and
``ctrstream run status``.

``ctrstream run [--mode open|closed] (--rate R | --compression C) (--span 6h |
--until-stopped)`` starts every job of :mod:`ctrstream.stack.jobs` against the stack (which
``ctrstream stack up`` started) and supervises them (:mod:`ctrstream.stack.supervisor`). The
driver - a replay of generated traffic (open loop) or the closed loop's world through the ad
server - covers ``--span`` of event time at ``--rate`` records per second or ``--compression``
event seconds per wall second. With ``--span`` the run ends once the driver is done and the
consumers caught up (lag 0, or ``--drain-s`` passed); with ``--until-stopped`` it runs until
SIGTERM or Ctrl-C. Either way every job is stopped with its state checkpointed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from typing import Any

import typer
from rich.table import Table

from ctrstream.cli.app import fail, out

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_span(text: str) -> float:
    """An event-time span in seconds from ``6h``, ``90m``, ``30s``, ``2d`` or a bare number
    of hours."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m or float(m.group(1)) <= 0:
        raise ValueError(
            f"--span {text!r} is not a positive duration: write e.g. 6h, 90m, 30s or 2d"
        )
    return float(m.group(1)) * _UNITS[m.group(2) or "h"]


def assign_ports(jobs: list, base: int) -> tuple[int, dict[str, int]]:
    """The supervisor's metrics port (``base``) and each job's first port after it, one per
    process of the job (a Bytewax process k serves its job's port + k)."""
    ports: dict[str, int] = {}
    nxt = base + 1
    for j in jobs:
        if j.metrics_ports:
            ports[j.name] = nxt
            nxt += j.metrics_ports
    return base, ports


def _check_free(ports: list[int], host: str) -> None:
    for p in ports:
        with socket.socket() as s:
            try:
                s.bind((host, p))
            except OSError:
                raise fail(
                    f"port {p} on {host} is in use: the run's metrics take {len(ports)} "
                    f"consecutive ports from --metrics-base {ports[0]}; give another base"
                ) from None


def scenario_sets(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` scenario fields (VALUE parsed as JSON when it can be)."""
    out_: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out_[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out_[k.strip()] = v
    return out_


def job_args(items: list[str] | None, names: set[str]) -> dict[str, tuple[str, ...]]:
    """``--job-arg JOB=ARG`` items -> the arguments appended to each job's command line, in
    order (``controller=--interval-h=1``: the controller gets ``--interval-h=1``)."""
    out_: dict[str, tuple[str, ...]] = {}
    for item in items or []:
        job, sep, arg = item.partition("=")
        job = job.strip()
        if not sep or not job or not arg:
            raise ValueError(
                f"--job-arg expects JOB=ARG (e.g. controller=--interval-h=1), got {item!r}"
            )
        if job not in names:
            raise ValueError(f"--job-arg {item!r}: no job {job!r} in this run ({sorted(names)})")
        out_[job] = out_.get(job, ()) + (arg,)
    return out_


def with_champion(
    per_job: dict[str, tuple[str, ...]], champion: str | None, names: set[str]
) -> dict[str, tuple[str, ...]]:
    """``per_job`` with the closed loop's champion given to the two jobs that need it - the
    loop's ``--champion`` (its default serves that model) and the controller's ``--base``
    (it retrains, tries and promotes it) - before their ``--job-arg`` arguments (which,
    coming later on the command line, win)."""
    if not champion:
        return dict(per_job)
    out_ = dict(per_job)
    for name, arg in (("loop", f"--champion={champion}"), ("controller", f"--base={champion}")):
        if name in names:
            out_[name] = (arg, *out_.get(name, ()))
    return out_


def driver_args(
    mode: str,
    span_s: float | None,
    rate: float | None,
    compression: float | None,
    scenario: str,
    events: int | None,
    seed: int | None,
    sets: dict[str, Any] | None = None,
) -> tuple[str, ...]:
    """The arguments ``ctrstream run`` adds to its driver's command line."""
    if mode == "open":
        args: list[str] = ["--scenario", scenario]
        for k, v in (sets or {}).items():
            args += ["--set", f"{k}={json.dumps(v)}"]
        if span_s is not None:
            args += ["--hours", f"{span_s / 3600:g}"]
        if events is not None:
            args += ["--events", str(events)]
        if seed is not None:
            args += ["--seed", str(seed)]
        if rate is not None:
            args += ["--rate", f"{rate:g}"]
        if compression is not None:
            args += ["--time-compression", f"{compression:g}"]
        return tuple(args)
    if rate is not None:
        raise ValueError(
            "--rate paces the replay of the open loop; the closed loop's world runs at "
            "--compression (event seconds per wall second)"
        )
    args = ["--scenario", scenario]
    if sets:
        args += ["--overrides", json.dumps(sets)]
    # until stopped: a span longer than any run (the loop checkpoints and resumes in it)
    args += ["--duration-s", f"{span_s if span_s is not None else 10 * 365 * 86400:g}"]
    if compression is not None:
        args += ["--compression", f"{compression:g}"]
    return tuple(args)


def register(app: typer.Typer) -> None:
    run_app = typer.Typer(
        help="The whole system as supervised long-running services (`ctrstream run status`: "
        "each job's state, restarts, lag and last checkpoint).",
        invoke_without_command=True,
    )
    app.add_typer(run_app, name="run")

    @run_app.callback()
    def run(
        ctx: typer.Context,
        mode: str = typer.Option(
            "open", help="open: a replay and the streaming scorer; closed: the ad server's loop"
        ),
        rate: float = typer.Option(None, "--rate", help="replay rate, records per wall second"),
        compression: float = typer.Option(
            None, "--compression", help="event seconds per wall second (60: an hour a minute)"
        ),
        span: str = typer.Option(
            None, "--span", help="event time the driver covers: 6h, 90m, 30s (then the run ends)"
        ),
        until_stopped: bool = typer.Option(
            False, "--until-stopped", help="run until SIGTERM or Ctrl-C"
        ),
        scenario: str = typer.Option("steady", help="the driver's scenario"),
        sets: list[str] = typer.Option(
            None, "--set", help="a scenario field, KEY=VALUE (repeatable): --set n_users=5000"
        ),
        events: int = typer.Option(None, help="open loop: impressions the replay generates"),
        seed: int = typer.Option(None, help="open loop: the generator's seed"),
        experiment: str = typer.Option(
            "live",
            help="closed loop: the experiment the ad server serves when the controller runs "
            "none (a started one, or the champion split A/A under this name)",
        ),
        champion: str = typer.Option(
            None,
            help="closed loop: the champion's published base name (the loop's default serves "
            "it, the controller retrains and promotes it; default ctr_lr)",
        ),
        only: str = typer.Option(None, help="run only these jobs (comma separated)"),
        job_arg: list[str] = typer.Option(
            None,
            "--job-arg",
            help="an argument for one job, JOB=ARG (repeatable): --job-arg "
            "controller=--interval-h=1 --job-arg controller=--share=0.5",
        ),
        without: str = typer.Option(None, help="leave these jobs out (comma separated)"),
        speed_processes: int = typer.Option(
            1, "--speed-processes", min=1, help="Bytewax processes per speed flow"
        ),
        metrics_base: int = typer.Option(
            9100,
            "--metrics-base",
            help="the supervisor's metrics port; the jobs' follow it, one per process",
        ),
        api_port: int = typer.Option(8080, "--api-port", help="the prediction API's port"),
        backoff_base: float = typer.Option(1.0, help="first restart delay, seconds"),
        backoff_max: float = typer.Option(60.0, help="longest restart delay, seconds"),
        drain_s: float = typer.Option(
            120.0, help="--span: most seconds to wait for the consumers after the driver"
        ),
        stop_timeout: float = typer.Option(
            60.0, help="seconds each job has to checkpoint and exit when stopped"
        ),
    ):
        """Start and supervise every job; stop them all cleanly on SIGTERM or Ctrl-C."""
        if ctx.invoked_subcommand is not None:
            return
        import importlib.util

        from ctrstream.config import get_settings
        from ctrstream.stack.jobs import jobs_for, render_job
        from ctrstream.stack.prometheus import TARGET_GROUP, remove_targets, write_targets
        from ctrstream.stack.services import pid_alive
        from ctrstream.stack.supervisor import Supervisor, read_state, scrape_targets

        if mode not in ("open", "closed"):
            raise fail(f"--mode {mode!r}: choose open or closed")
        if (span is None) == (not until_stopped):
            raise fail(
                "give the event-time span: --span 6h (the run then ends), or --until-stopped"
            )
        if rate is not None and rate <= 0 or compression is not None and compression <= 0:
            raise fail("--rate and --compression must be above 0")
        if mode == "closed" and not experiment:
            raise fail(
                "the closed loop needs the name of the experiment it serves when the controller "
                "runs none: --experiment NAME (default live)"
            )
        if mode == "open" and champion:
            raise fail("--champion names the closed loop's champion: add --mode closed")
        try:
            span_s = parse_span(span) if span is not None else None
            extra = driver_args(
                mode, span_s, rate, compression, scenario, events, seed, scenario_sets(sets)
            )
            jobs = jobs_for(mode, speed_processes)  # type: ignore[arg-type]
        except ValueError as e:
            raise fail(str(e)) from None
        names = {j.name for j in jobs}
        chosen = [n.strip() for n in (only or "").split(",") if n.strip()]
        dropped = [n.strip() for n in (without or "").split(",") if n.strip()]
        unknown = sorted(set(chosen + dropped) - names)
        if unknown:
            raise fail(f"unknown job(s) {unknown}: the {mode} loop's jobs are {sorted(names)}")
        for j in list(jobs):
            if j.needs and importlib.util.find_spec(j.needs) is None:
                out.print(f"note: {j.name} left out ({j.needs} is not installed)")
                jobs.remove(j)
        jobs = [j for j in jobs if (not chosen or j.name in chosen) and j.name not in dropped]
        try:
            per_job = job_args(job_arg, {j.name for j in jobs})
        except ValueError as e:
            raise fail(str(e)) from None
        per_job = with_champion(per_job, champion, {j.name for j in jobs})
        settings = get_settings()
        running = read_state(settings.run_dir / "run")
        if running is not None and pid_alive(int(running["pid"])) and running["pid"] != os.getpid():
            raise fail(
                f"a run is already going in {settings.run_dir} (supervisor pid "
                f"{running['pid']}): see `ctrstream run status`, stop it with "
                f"`kill -TERM {running['pid']}`"
            )
        values = {
            "run_dir": str(settings.run_dir),
            "data_dir": str(settings.data_dir),
            "api_host": "127.0.0.1",
            "api_port": str(api_port),
            "experiment": experiment if mode == "closed" else "",
        }
        jobs = [
            render_job(j, values, (extra if j.role == "driver" else ()) + per_job.get(j.name, ()))
            for j in jobs
        ]
        # the registry's folder: the monitor reads the decision logs under it from its start
        (settings.run_dir / "experiments").mkdir(parents=True, exist_ok=True)
        sup_port, ports = assign_ports(jobs, metrics_base)
        _check_free(
            [sup_port, *range(sup_port + 1, sup_port + 1 + sum(j.metrics_ports for j in jobs))],
            settings.metrics_host,
        )

        driver = next((j.name for j in jobs if j.role == "driver"), None)
        drained: dict[str, float] = {}

        def finished(units: list) -> bool:
            if until_stopped or driver is None:
                return False
            if next(u for u in units if u.job.name == driver).state != "done":
                return False
            now = time.monotonic()
            drained.setdefault("since", now)
            if now - drained["since"] >= drain_s:
                return True
            if now - drained.get("checked", 0.0) < 1.0:
                return False
            drained["checked"] = now
            return all(v == 0 for v in _lags(settings, [u.job for u in units]).values())

        sup = Supervisor(
            jobs,
            env=dict(os.environ),
            state_dir=settings.run_dir / "run",
            metrics_ports=ports,
            backoff_base_s=backoff_base,
            backoff_max_s=backoff_max,
            stop_timeout_s=stop_timeout,
            finished=finished,
            echo=out.print,
        )
        sup.install_signals()
        sup.serve_metrics(sup_port, settings.metrics_host)
        # the stack's Prometheus scrapes every endpoint of this run while it runs (its file
        # discovery watches the target files: ctrstream.stack.prometheus)
        targets = [("supervisor", f"{settings.metrics_host}:{sup_port}")]
        targets += scrape_targets(sup.units, api_port, settings.metrics_host)
        write_targets(settings, TARGET_GROUP, targets)
        out.print(
            f"supervisor metrics on {settings.metrics_host}:{sup_port}; logs in {sup.log_dir}"
        )
        try:
            code = sup.run()
        finally:
            remove_targets(settings, TARGET_GROUP)
        raise typer.Exit(code)

    @run_app.command("status")
    def status(
        as_json: bool = typer.Option(False, "--json", help="print JSON, not a table"),
    ):
        """Each job of the current run: state, restarts, consumer lag, last checkpoint."""
        from ctrstream.config import get_settings
        from ctrstream.stack.services import pid_alive
        from ctrstream.stack.supervisor import last_checkpoint, read_state

        settings = get_settings()
        doc = read_state(settings.run_dir / "run")
        if doc is None:
            raise fail(f"no run in {settings.run_dir}: start one with `ctrstream run`", 1)
        alive = pid_alive(int(doc["pid"]))
        jobs = doc["jobs"]
        lags = _lags_of(settings, jobs)
        now = time.time()
        rows: list[dict[str, Any]] = []
        for j in jobs:
            ck = last_checkpoint(j.get("checkpoint"))
            rows.append(
                {
                    **{k: j.get(k) for k in ("name", "state", "pid", "restarts", "last_exit")},
                    "state": j["state"] if alive else f"{j['state']} (supervisor gone)",
                    "lag": lags.get(j["name"]),
                    "checkpoint": j.get("checkpoint"),
                    "checkpoint_age_s": None if ck is None else round(now - ck, 1),
                    "metrics_port": j.get("metrics_port"),
                }
            )
        if as_json:
            out.print_json(json.dumps({"supervisor": doc["pid"], "alive": alive, "jobs": rows}))
        else:
            t = Table(
                "job",
                "state",
                "pid",
                "restarts",
                "lag",
                "last checkpoint",
                "where",
                title=f"ctrstream run (supervisor {doc['pid']}, "
                f"{'running' if alive else 'not running'})",
            )
            for r in rows:
                t.add_row(
                    r["name"],
                    r["state"],
                    str(r["pid"] or "-"),
                    str(r["restarts"]),
                    "-" if r["lag"] is None else f"{r['lag']:,}",
                    "-" if r["checkpoint_age_s"] is None else f"{r['checkpoint_age_s']:.0f} s ago",
                    r["checkpoint"] or "-",
                )
            out.print(t)
        raise typer.Exit(0 if alive else 1)


def _lags_of(settings: Any, jobs: list[dict[str, Any]]) -> dict[str, int | None]:
    """Each job's consumer group lag (jobs as the state file lists them)."""
    from ctrstream.kafka.lag import group_lag

    out_: dict[str, int | None] = {}
    for j in jobs:
        if not j.get("group"):
            continue
        topics = [getattr(settings.topics, k).name for k in j.get("topics", [])]
        try:
            out_[j["name"]] = group_lag(settings, j["group"], topics)
        except Exception:  # noqa: BLE001 - Kafka unreachable: the lag is unknown, not fatal
            out_[j["name"]] = None
    return out_


def _lags(settings: Any, jobs: list) -> dict[str, int | None]:
    return _lags_of(
        settings, [{"name": j.name, "group": j.group, "topics": j.topics} for j in jobs]
    )


__all__ = [
    "assign_ports",
    "driver_args",
    "job_args",
    "parse_span",
    "register",
    "scenario_sets",
    "with_champion",
]
