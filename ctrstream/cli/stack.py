"""``ctrstream setup``, ``ctrstream stack up | secret | status | down | logs`` and ``ctrstream config show``."""

from __future__ import annotations

import json
import sys

import typer
from rich.table import Table

from ctrstream.cli.app import fail, out
from ctrstream.config import get_settings

stack_app = typer.Typer(
    help="The local stack: Kafka (KRaft), Redis, Triton and Prometheus on 127.0.0.1.",
    no_args_is_help=True,
)
config_app = typer.Typer(
    help="Configuration (CTRSTREAM_* environment overrides).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(stack_app, name="stack")
    app.add_typer(config_app, name="config")
    app.command("setup")(setup)


def setup(check: bool = typer.Option(False, "--check", help="only report what is set up")):
    """Set up the local stack's servers: resolve the Kafka broker with Maven, install
    redis-server (Debian), unpack tritonserver from the nvidia-pytriton wheel, into
    CTRSTREAM_CACHE_DIR (default .cache under the current directory). Idempotent."""
    from ctrstream.stack.provision import main as provision

    raise typer.Exit(provision(["--check"] if check else []))


@stack_app.command("up")
def stack_up(
    only: list[str] = typer.Option(
        None, "--only", help="start only these services (kafka, redis, triton, prometheus)"
    ),
    kafka_brokers: int = typer.Option(
        None,
        "--kafka-brokers",
        min=1,
        max=9,
        help="KRaft nodes to run, each a broker and a controller (default: "
        "CTRSTREAM_KAFKA__BROKERS, else what this run directory last started, else 1); 3 or "
        "more: replication factor 3, min.insync.replicas=2",
    ),
    triton_replicas: int = typer.Option(
        None,
        "--triton-replicas",
        min=1,
        max=8,
        help="Triton servers to run on their own ports, each loading the model repository "
        "(default: CTRSTREAM_TRITON__REPLICAS, else what this run directory last started, "
        "else 1); clients spread requests over all of them (docs/triton-replicas.md)",
    ),
    redis_cluster: int = typer.Option(
        None,
        "--redis-cluster",
        min=0,
        max=16,
        help="run a Redis Cluster of N masters and N replicas (2N redis-server processes on "
        "consecutive ports from CTRSTREAM_REDIS__PORT, or CTRSTREAM_REDIS__CLUSTER_PORTS) "
        "instead of one Redis; 0: one Redis (default: CTRSTREAM_REDIS__CLUSTER_MASTERS, else "
        "what this run directory last started, else 0)",
    ),
):
    """Start Kafka, Redis, Triton and Prometheus, wait until each is ready, and create the
    topics."""
    from pydantic import ValidationError

    from ctrstream.config import KafkaSettings, TritonSettings
    from ctrstream.stack.manager import Stack
    from ctrstream.stack.provision import PrerequisiteError
    from ctrstream.stack.services import StackError

    settings = get_settings()
    if kafka_brokers is not None and kafka_brokers != settings.kafka.brokers:
        k = settings.kafka.model_dump()
        if len(k["more_ports"]) < kafka_brokers - 1:
            k["more_ports"] = []  # consecutive ports after node 1's
        try:
            kafka = KafkaSettings.model_validate({**k, "brokers": kafka_brokers})
        except ValidationError as e:
            raise fail(f"--kafka-brokers {kafka_brokers}: {e.errors()[0]['msg']}") from None
        settings = settings.model_copy(update={"kafka": kafka})
    if triton_replicas is not None and triton_replicas != settings.triton.replicas:
        t = settings.triton.model_dump()
        if len(t["more_ports"]) < triton_replicas - 1:
            t["more_ports"] = []  # the default ports after replica 1's
        try:
            triton = TritonSettings.model_validate({**t, "replicas": triton_replicas})
        except ValidationError as e:
            raise fail(f"--triton-replicas {triton_replicas}: {e.errors()[0]['msg']}") from None
        settings = settings.model_copy(update={"triton": triton})
    if redis_cluster is not None and redis_cluster != settings.redis.cluster_masters:
        try:
            redis = settings.redis.with_cluster(redis_cluster)
        except ValidationError as e:
            raise fail(f"--redis-cluster {redis_cluster}: {e.errors()[0]['msg']}") from None
        settings = settings.model_copy(update={"redis": redis})
    try:
        Stack(settings).up(log=out.print, only=only)
    except (StackError, PrerequisiteError) as e:
        raise fail(str(e)) from None
    out.print(f"run directory: {settings.run_dir}  (logs in {settings.run_dir / 'logs'})")


@stack_app.command("secret")
def stack_secret():
    """Create the control secret that signs watermark heartbeats, unless it exists (what
    `stack up` does first; compose's `control-key` service runs it into the shared volume)."""
    from ctrstream.kafka.heartbeats import ControlSecretError, create_control_secret

    try:
        path = create_control_secret(get_settings())
    except ControlSecretError as e:
        raise fail(str(e)) from None
    out.print(f"control secret: {path}")


@stack_app.command("status")
def stack_status():
    """Show each service's PID and health (and each Redis Cluster node's role and slots).
    Exit code 1 when any is down."""
    from ctrstream.stack.manager import Stack

    rows = Stack(get_settings()).status()
    clustered = any(r.role for r in rows)
    table = Table("service", "pid", "health", "address", *(["role"] if clustered else []), "log")
    for r in rows:
        health = (
            "[green]ready[/]"
            if r.healthy
            else ("[yellow]not ready[/]" if r.pid else "[red]down[/]")
        )
        role = [r.role] if clustered else []
        table.add_row(r.name, str(r.pid or "-"), health, r.address, *role, str(r.log))
    out.print(table)
    raise typer.Exit(0 if all(r.healthy for r in rows) else 1)


@stack_app.command("down")
def stack_down(purge: bool = typer.Option(False, help="also delete the stack's data and logs")):
    """Stop every service by PID and wait for it to exit."""
    from ctrstream.stack.manager import Stack

    Stack(get_settings()).down(purge=purge, log=out.print)


@stack_app.command("logs")
def stack_logs(
    service: str = typer.Argument(
        ...,
        help="kafka (kafka-2, ... for one node of several), redis (redis-2, ... for one node "
        "of a Redis Cluster), triton (triton-2, ...) or prometheus",
    ),
    lines: int = typer.Option(50, "-n", help="how many lines from the end"),
):
    """Print the end of a service's log."""
    from ctrstream.stack.manager import Stack

    try:
        svc = Stack(get_settings()).by_name(service)
    except StopIteration:
        names = ", ".join(s.name for s in Stack(get_settings()).services)
        raise fail(f"unknown service {service!r}: choose one of {names}") from None
    if not svc.log_file.exists():
        raise fail(f"no log at {svc.log_file}: has `ctrstream stack up` run?")
    text = svc.log_file.read_text(errors="replace").splitlines()
    sys.stdout.write("\n".join(text[-lines:]) + "\n")


@config_app.command("show")
def config_show():
    """Print the effective configuration (defaults plus CTRSTREAM_* overrides) as JSON."""
    sys.stdout.write(json.dumps(get_settings().dump(), indent=2) + "\n")
