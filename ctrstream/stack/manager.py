"""``ctrstream stack up | status | down | logs`` and the test suite's isolated stack."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ctrstream.config import (
    KAFKA_NODES_FILE,
    TRITON_NODES_FILE,
    KafkaSettings,
    PrometheusSettings,
    RedisSettings,
    Settings,
    TritonSettings,
)
from ctrstream.stack.redis_cluster import (
    RedisClusterNode,
    check_redis_topology,
    cluster_roles,
    ensure_cluster,
    record_redis_topology,
)
from ctrstream.stack.services import (
    PortInUseError,
    Service,
    StackError,
    all_services,
    free_port,
    start_together,
    stop_together,
)


@dataclass
class ServiceStatus:
    name: str
    pid: int | None
    healthy: bool
    address: str
    log: Path
    # a Redis Cluster node's role and slots (``master 0-5460``, ``replica of ...``)
    role: str = ""


class Stack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.services: list[Service] = all_services(settings)

    def by_name(self, name: str) -> Service:
        """The service called ``name``; ``kafka`` also names the first of several nodes."""
        return next(s for s in self.services if s.name == name or s.group == name)

    def up(self, log=lambda msg: None, only: list[str] | None = None) -> dict[str, float | None]:
        """Start every service (or ``only`` those), wait until ready, create topics.
        Returns the start-up seconds of each service (None: it was already running)."""
        from ctrstream.kafka.clients import ensure_topics
        from ctrstream.kafka.heartbeats import create_control_secret

        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        create_control_secret(self.settings)  # signs the watermark heartbeats
        chosen = [s for s in self.services if not only or s.group in only or s.name in only]
        kafka = [s for s in chosen if s.group == "kafka"]
        if kafka:
            check_kafka_topology(self.settings)
        cluster = [s for s in chosen if isinstance(s, RedisClusterNode)]
        if any(s.group == "redis" for s in chosen):
            check_redis_topology(self.settings)
        for svc in chosen:  # every port is checked before anything starts
            if svc.pid() is None:
                svc.check_ports()
        times: dict[str, float | None] = {}
        roles: dict[str, str] = {}
        started: list[Service] = []
        try:
            # the nodes of one KRaft quorum start together: each waits for a majority; the
            # nodes of a Redis Cluster start together, then form (or re-form) the cluster;
            # the Triton replicas start together too (each loads the served models: in parallel)
            triton = [s for s in chosen if s.group == "triton"]
            together = [b for b in (kafka, cluster) if b]
            batches = (
                together
                + [[s] for s in chosen if s.group not in ("kafka", "triton") and s not in cluster]
                + ([triton] if triton else [])
            )
            for batch in batches:
                got = start_together(batch)
                if kafka and batch is kafka:
                    record_kafka_topology(self.settings)
                if triton and batch is triton:
                    record_triton_topology(self.settings)
                if cluster and batch is cluster:
                    started.extend(s for s in batch if got[s.name] is not None)
                    if ensure_cluster(self.settings, cluster):
                        log(
                            f"redis cluster created: {self.settings.redis.cluster_masters} "
                            "masters, 1 replica each"
                        )
                    record_redis_topology(self.settings)
                    roles = cluster_roles(cluster)
                for svc in batch:
                    t = got[svc.name]
                    times[svc.name] = t
                    if t is not None and svc not in started:
                        started.append(svc)
                    role = f"  {roles.get(svc.name, '')}" if svc in cluster else ""
                    log(
                        f"{svc.name:7s} "
                        f"{f'ready in {t:.1f}s' if t is not None else 'already running'}"
                        f"  {svc.address()}{role}"
                    )
            if kafka:
                created = ensure_topics(self.settings, self.settings.topics.all())
                if created:
                    log(f"topics created: {', '.join(created)}")
        except BaseException:
            for svc in reversed(started):  # leave nothing half-started behind
                svc.stop()
            raise
        return times

    def cluster_nodes(self) -> list[RedisClusterNode]:
        """The nodes of the local Redis Cluster (empty with one Redis)."""
        return [s for s in self.services if isinstance(s, RedisClusterNode)]

    def status(self) -> list[ServiceStatus]:
        cluster = self.cluster_nodes()
        roles = cluster_roles([s for s in cluster if s.pid() is not None]) if cluster else {}
        return [
            ServiceStatus(
                s.name,
                s.pid(),
                s.pid() is not None and s.healthy(),
                s.address(),
                s.log_file,
                roles.get(s.name, "down" if s.pid() is None else "unknown") if s in cluster else "",
            )
            for s in self.services
        ]

    def down(self, purge: bool = False, log=lambda msg: None) -> None:
        kafka = [s for s in self.services if s.group == "kafka"]
        triton = [s for s in self.services if s.group == "triton"]
        cluster = self.cluster_nodes()
        for svc in reversed(self.services):
            together = (
                kafka
                if svc.group == "kafka"
                else triton
                if svc.group == "triton"
                else (cluster if svc in cluster else None)
            )
            if together:
                # the nodes of one quorum or cluster stop together; the Triton replicas too
                if svc is together[0]:
                    for name, stopped in stop_together(together).items():
                        log(f"{name:7s} {'stopped' if stopped else 'not running'}")
                continue
            stopped = svc.stop()
            log(f"{svc.name:7s} {'stopped' if stopped else 'not running'}")
        if purge:
            shutil.rmtree(self.settings.run_dir, ignore_errors=True)
            log(f"removed {self.settings.run_dir}")

    def pids(self) -> list[int]:
        return [p for p in (s.pid() for s in self.services) if p is not None]


def check_kafka_topology(settings: Settings) -> None:
    """Refuse to start a Kafka topology other than the one whose data is in the run
    directory: a node formatted for one controller quorum cannot join another."""
    path = settings.run_dir / KAFKA_NODES_FILE
    one, first = settings.run_dir / "kafka" / "data", settings.run_dir / "kafka-1" / "data"
    try:
        recorded = json.loads(path.read_text()).get("brokers", 1)
    except (FileNotFoundError, ValueError):
        recorded = 1 if one.exists() else None  # a run directory older than the record
    if (
        recorded is not None
        and recorded != settings.kafka.brokers
        and (one.exists() or first.exists())
    ):
        raise StackError(
            f"the stack in {settings.run_dir} holds the data of a {recorded}-broker Kafka, "
            f"not {settings.kafka.brokers}: start it with --kafka-brokers {recorded}, or "
            "delete its data first with `ctrstream stack down --purge`"
        )


def record_kafka_topology(settings: Settings) -> None:
    """Write the started Kafka topology into the run directory (``KAFKA_NODES_FILE``), so
    that later commands there see every broker without being told."""
    k = settings.kafka
    doc = {
        "brokers": k.brokers,
        "port": k.port,
        "controller_port": k.controller_port,
        "more_ports": [[n.port, n.controller_port] for n in k.nodes()[1:]],
    }
    path = settings.run_dir / KAFKA_NODES_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def record_triton_topology(settings: Settings) -> None:
    """Write the started Triton topology into the run directory (``TRITON_NODES_FILE``), so
    that later commands there (the API, the scorer, the publisher, ``stack status``) see
    every server without being told."""
    t = settings.triton
    doc = {
        "replicas": t.replicas,
        "http_port": t.http_port,
        "grpc_port": t.grpc_port,
        "metrics_port": t.metrics_port,
        "more_ports": [[n.http_port, n.grpc_port, n.metrics_port] for n in t.nodes()[1:]],
    }
    path = settings.run_dir / TRITON_NODES_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def isolated_triton(run_dir: Path, replicas: int = 1) -> TritonSettings:
    """Triton settings of ``replicas`` servers on free loopback ports, with the model
    repository under ``run_dir``."""
    more = [(free_port(), free_port(), free_port()) for _ in range(replicas - 1)]
    return TritonSettings(
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        model_repository=run_dir / "triton_repo",
        replicas=replicas,
        more_ports=more,
    )


def isolated_kafka(heap: str = "512m", brokers: int = 1) -> KafkaSettings:
    """Kafka settings of ``brokers`` KRaft nodes on free loopback ports."""
    more = [(free_port(), free_port()) for _ in range(brokers - 1)]
    return KafkaSettings(
        port=free_port(), controller_port=free_port(), heap=heap, brokers=brokers, more_ports=more
    )


def isolated_redis_settings(
    masters: int = 0, appendonly: bool = True, node_timeout_ms: int = 3000
) -> RedisSettings:
    """Redis settings on free loopback ports: one Redis, or (``masters`` > 0) a cluster of
    ``masters`` masters and as many replicas, each node with a free client and bus port."""
    port = free_port()
    if not masters:
        return RedisSettings(port=port, appendonly=appendonly)
    nodes = [(port, free_port())] + [(free_port(), free_port()) for _ in range(2 * masters - 1)]
    return RedisSettings(
        port=port,
        appendonly=appendonly,
        cluster_masters=masters,
        cluster_ports=nodes,
        cluster_node_timeout_ms=node_timeout_ms,
    )


def isolated_settings(
    run_dir: Path,
    base: Settings | None = None,
    kafka_brokers: int = 1,
    redis_masters: int = 0,
    triton_replicas: int = 1,
) -> Settings:
    """Settings for a stack on free loopback ports with everything under ``run_dir``
    (``kafka_brokers`` > 1: that many KRaft nodes, each with a smaller heap;
    ``redis_masters`` > 0: a Redis Cluster of that many masters and as many replicas;
    ``triton_replicas`` > 1: that many Triton servers)."""
    base = base or Settings()
    return base.model_copy(
        update={
            "run_dir": run_dir,
            "data_dir": run_dir / "data",
            "kafka": isolated_kafka("512m" if kafka_brokers == 1 else "384m", kafka_brokers),
            "redis": isolated_redis_settings(redis_masters),
            "triton": isolated_triton(run_dir, triton_replicas),
            "prometheus": PrometheusSettings(
                **{**base.prometheus.model_dump(), "port": free_port()}
            ),
        }
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """CTRSTREAM_* environment that makes a child process see ``settings``."""
    env = {
        "CTRSTREAM_RUN_DIR": str(settings.run_dir),
        "CTRSTREAM_CACHE_DIR": str(settings.cache_dir),
        "CTRSTREAM_DATA_DIR": str(settings.data_dir),
        "CTRSTREAM_KAFKA__PORT": str(settings.kafka.port),
        "CTRSTREAM_KAFKA__CONTROLLER_PORT": str(settings.kafka.controller_port),
        "CTRSTREAM_KAFKA__BOOTSTRAP": settings.kafka.bootstrap_servers,
        "CTRSTREAM_KAFKA__BROKERS": str(settings.kafka.brokers),
        "CTRSTREAM_KAFKA__MORE_PORTS": json.dumps(settings.kafka.more_ports),
        "CTRSTREAM_REDIS__PORT": str(settings.redis.port),
        "CTRSTREAM_REDIS__DB": str(settings.redis.db),
        "CTRSTREAM_REDIS__CLUSTER": ",".join(settings.redis.cluster),
        "CTRSTREAM_REDIS__CLUSTER_MASTERS": str(settings.redis.cluster_masters),
        "CTRSTREAM_REDIS__CLUSTER_PORTS": json.dumps(settings.redis.cluster_ports),
        "CTRSTREAM_REDIS__CLUSTER_NODE_TIMEOUT_MS": str(settings.redis.cluster_node_timeout_ms),
        "CTRSTREAM_REDIS__WAIT_REPLICAS": str(settings.redis.wait_replicas),
        "CTRSTREAM_REDIS__WAIT_TIMEOUT_MS": str(settings.redis.wait_timeout_ms),
        "CTRSTREAM_METRICS_PORT": str(settings.metrics_port),
        "CTRSTREAM_METRICS_HOST": settings.metrics_host,
        "CTRSTREAM_RESULTS_DIR": str(settings.results_dir),
        "CTRSTREAM_ALLOWED_LATENESS_S": str(settings.allowed_lateness_s),
        "CTRSTREAM_ATTRIBUTION_WINDOW_S": str(settings.attribution_window_s),
        "CTRSTREAM_TRITON__HTTP_PORT": str(settings.triton.http_port),
        "CTRSTREAM_TRITON__GRPC_PORT": str(settings.triton.grpc_port),
        "CTRSTREAM_TRITON__METRICS_PORT": str(settings.triton.metrics_port),
        "CTRSTREAM_TRITON__MODEL_REPOSITORY": str(settings.triton.model_repository),
        "CTRSTREAM_TRITON__BACKEND": settings.triton.backend,
        "CTRSTREAM_TRITON__REPLICAS": str(settings.triton.replicas),
        "CTRSTREAM_TRITON__MORE_PORTS": json.dumps(
            [[n.http_port, n.grpc_port, n.metrics_port] for n in settings.triton.nodes()[1:]]
        ),
        "CTRSTREAM_PROMETHEUS__PORT": str(settings.prometheus.port),
        "CTRSTREAM_PROMETHEUS__ENABLED": str(settings.prometheus.enabled).lower(),
    }
    if settings.triton.urls:
        env["CTRSTREAM_TRITON__URLS"] = ",".join(settings.triton.urls)
    if settings.redis.password:
        env["CTRSTREAM_REDIS__PASSWORD"] = settings.redis.password
    if settings.control_secret_file is not None:
        env["CTRSTREAM_CONTROL_SECRET_FILE"] = str(settings.control_secret_path)
    for key, t in settings.topics.model_dump().items():
        env[f"CTRSTREAM_TOPICS__{key.upper()}__NAME"] = t["name"]
        env[f"CTRSTREAM_TOPICS__{key.upper()}__PARTITIONS"] = str(t["partitions"])
    return env


@contextmanager
def isolated_stack(run_dir: Path, log=lambda msg: None, attempts: int = 3):
    """An isolated stack on free ports (the test suite's fixture); stopped on exit.

    A port found free can be taken before the service binds it (another process's
    outgoing connection gets it as its ephemeral port): the stack is then started again on
    other free ports, up to ``attempts`` times."""
    t0 = time.monotonic()
    for attempt in range(1, attempts + 1):
        stack = Stack(isolated_settings(run_dir))
        try:
            stack.up(log=log)  # on failure it stops what it started
            break
        except PortInUseError as e:
            if attempt == attempts:
                raise
            log(f"{e} - starting the isolated stack again on other free ports")
    log(f"isolated stack up in {time.monotonic() - t0:.1f}s under {run_dir}")
    try:
        yield stack
    finally:
        stack.down()


@contextmanager
def isolated_redis(
    run_dir: Path | None = None,
    log: Callable[[str], None] = lambda msg: None,
    attempts: int = 3,
    appendonly: bool = False,
) -> Iterator[Settings]:
    """A private Redis alone (no Kafka, no Triton) on a free loopback port, for a study or
    benchmark that needs only Redis; yields its settings and stops it (by PID) on exit.

    ``run_dir`` None: a temporary directory, removed afterwards. ``appendonly`` off by
    default: the data is thrown away with the server, and the append-only file would only
    slow bulk writes. A port taken between finding it free and binding it is retried on
    other free ports, up to ``attempts`` times (as :func:`isolated_stack`)."""
    with tempfile.TemporaryDirectory(prefix="ctrstream-redis-") as tmp:
        where = Path(tmp) if run_dir is None else run_dir
        t0 = time.monotonic()
        for attempt in range(1, attempts + 1):
            base = isolated_settings(where)
            settings = base.model_copy(
                update={"redis": base.redis.model_copy(update={"appendonly": appendonly})}
            )
            stack = Stack(settings)
            try:
                stack.up(log=log, only=["redis"])
                break
            except PortInUseError as e:
                if attempt == attempts:
                    raise
                log(f"{e} - starting the isolated Redis again on another free port")
        log(f"isolated redis up in {time.monotonic() - t0:.1f}s on port {settings.redis.port}")
        try:
            yield settings
        finally:
            stack.by_name("redis").stop()


@contextmanager
def isolated_redis_cluster(
    run_dir: Path | None = None,
    masters: int = 3,
    log: Callable[[str], None] = lambda msg: None,
    attempts: int = 3,
    appendonly: bool = False,
    node_timeout_ms: int = 2000,
) -> Iterator[Settings]:
    """A private Redis Cluster alone (``masters`` masters, a replica each; no Kafka, no
    Triton) on free loopback ports; yields its settings (``settings.redis.cluster`` lists
    every node) and stops every node by PID on exit.

    ``node_timeout_ms``: how long a dead master goes unnoticed before its replica is
    promoted (short, so that failover tests take seconds). ``run_dir``, ``appendonly`` and
    ``attempts`` as :func:`isolated_redis`."""
    with tempfile.TemporaryDirectory(prefix="ctrstream-redis-cluster-") as tmp:
        where = Path(tmp) if run_dir is None else run_dir
        t0 = time.monotonic()
        for attempt in range(1, attempts + 1):
            base = isolated_settings(where)
            redis = isolated_redis_settings(masters, appendonly, node_timeout_ms)
            settings = base.model_copy(update={"redis": redis})
            stack = Stack(settings)
            try:
                stack.up(log=log, only=["redis"])
                break
            except PortInUseError as e:
                if attempt == attempts:
                    raise
                log(f"{e} - starting the isolated Redis Cluster again on other free ports")
        log(
            f"isolated redis cluster up in {time.monotonic() - t0:.1f}s: "
            f"{', '.join(settings.redis.cluster)}"
        )
        try:
            yield settings
        finally:
            stop_together(stack.cluster_nodes())


__all__ = [
    "Stack",
    "StackError",
    "check_kafka_topology",
    "isolated_kafka",
    "isolated_redis",
    "isolated_redis_cluster",
    "isolated_redis_settings",
    "isolated_settings",
    "isolated_triton",
    "record_triton_topology",
    "isolated_stack",
    "settings_env",
]
