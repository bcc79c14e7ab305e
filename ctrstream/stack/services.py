"""The real servers of the local stack: Apache Kafka (KRaft), Redis, Triton (each of Kafka
and Triton as one process or several: ``--kafka-brokers``, ``--triton-replicas``; Redis as one
server or a Redis Cluster: ``--redis-cluster``) and Prometheus
(:mod:`ctrstream.stack.prometheus`).

Each service is started as its own process session (so it outlives the CLI that started
it), bound to 127.0.0.1, with its data, log and PID file under the run directory. Readiness
is a real request (Kafka metadata, Redis PING, Triton /v2/health/ready), never a sleep.
Stopping is by PID: SIGTERM, wait for exit, SIGKILL only after a timeout.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctrstream.config import (
    REDIS_PASSWORD_FILE,
    TRITON_CONTROL_HEADER,
    Settings,
    triton_control_key,
    triton_control_key_file,
)
from ctrstream.stack import provision

log = logging.getLogger("ctrstream.stack")


class StackError(RuntimeError):
    """A stack problem with a message that says what is wrong and what to do."""


class PortInUseError(StackError):
    """A port a service must listen on is taken by another process."""


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_range(n: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A port ``p`` with ``p .. p + n - 1`` all free now (a job of ``n`` processes serves
    its metrics on ``metrics_port + k``)."""
    for _ in range(attempts):
        base = free_port(host)
        if base + n - 1 > 65535:
            continue
        socks = []
        try:
            for k in range(1, n):
                sk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sk)
                sk.bind((host, base + k))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError(f"no {n} consecutive free ports found on {host}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - readiness probes fail in many ways while starting
            last_exc = e
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what}"
                + (f" (last error: {last_exc})" if last_exc else "")
            )
        time.sleep(interval)


@dataclass
class Service:
    name: str
    settings: Settings

    # --- to be provided by subclasses
    def ports(self) -> list[int]:
        raise NotImplementedError

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """One-time preparation of the service's data directory."""

    def address(self) -> str:
        raise NotImplementedError

    start_timeout: float = 60.0

    # --- common machinery
    @property
    def dir(self) -> Path:
        return self.settings.run_dir / self.name

    @property
    def pid_file(self) -> Path:
        return self.settings.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.settings.run_dir / "logs" / f"{self.name}.log"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def healthy(self) -> bool:
        try:
            return bool(self.ready())
        except Exception:  # noqa: BLE001 - a health check answers, never raises
            return False

    def check_ports(self) -> None:
        for port in self.ports():
            if port_in_use(self.host, port):
                raise PortInUseError(
                    f"{self.name}: port {self.host}:{port} is already in use by another process. "
                    f"Stop that process, or choose other ports with CTRSTREAM_* settings "
                    f"(see `ctrstream config show`)."
                )

    @property
    def group(self) -> str:
        """What ``--only`` and ``stack logs`` call it: the node ``kafka-2`` is ``kafka``."""
        return self.name.split("-", 1)[0]

    def start(self) -> float | None:
        """Start the service and wait until it is ready; return the start-up seconds, or
        None when it was already running."""
        return start_together([self])[self.name]

    def launch(self) -> subprocess.Popen | None:
        """Start the process without waiting for it to be ready (None: already running)."""
        if self.pid() is not None:
            return None
        self.check_ports()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.prepare()
        argv, env = self.command()
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                env={**os.environ, **env},
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        return proc

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop by PID and wait for exit. Returns True if a process was stopped."""
        pid = self.terminate()
        if pid is None:
            return False
        self.wait_stopped(pid, timeout)
        return True

    def terminate(self) -> int | None:
        """Send SIGTERM to the process of the PID file; its PID, or None when none runs."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return None
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        return pid

    def wait_stopped(self, pid: int, timeout: float = 30.0) -> None:
        """Wait until ``pid`` exits, SIGKILL after ``timeout``; remove the PID file."""
        try:
            wait_until(lambda: not pid_alive(pid), timeout, what=f"{self.name} (PID {pid}) to exit")
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(pid), 10, what=f"{self.name} (PID {pid}) to die")
        # reap it if it is our child (tests start services in-process)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        self.pid_file.unlink(missing_ok=True)


def start_together(services: Sequence[Service]) -> dict[str, float | None]:
    """Start ``services`` at once and wait until every one is ready: the nodes of one KRaft
    quorum become ready only together (a node waits for a majority of the voters). Returns
    each one's start-up seconds (None: it was already running). When one fails, the others
    started here are stopped and a :class:`StackError` says which and why."""
    t0 = time.monotonic()
    procs: dict[str, subprocess.Popen | None] = {}
    try:
        for svc in services:
            procs[svc.name] = svc.launch()
        times: dict[str, float | None] = {}
        for svc in services:
            proc = procs[svc.name]
            if proc is None:
                if not svc.healthy():
                    wait_until(svc.ready, svc.start_timeout, what=f"{svc.name} to become ready")
                times[svc.name] = None
                continue
            deadline = t0 + svc.start_timeout
            while True:
                if proc.poll() is not None:
                    svc.pid_file.unlink(missing_ok=True)
                    raise StackError(
                        f"{svc.name} exited during start-up with code {proc.returncode}. "
                        f"Its log is {svc.log_file}:\n{_tail(svc.log_file)}"
                    )
                if svc.healthy():
                    times[svc.name] = time.monotonic() - t0
                    break
                if time.monotonic() > deadline:
                    raise StackError(
                        f"{svc.name} did not become ready within {svc.start_timeout:.0f}s; "
                        f"see {svc.log_file}:\n{_tail(svc.log_file)}"
                    )
                time.sleep(0.05)
        return times
    except BaseException:
        for svc in services:  # leave nothing half-started behind
            if procs.get(svc.name) is not None:
                svc.stop()
        raise


def stop_together(services: Sequence[Service], timeout: float = 30.0) -> dict[str, bool]:
    """Stop ``services`` by PID at once (SIGTERM to all, then wait for each): the nodes of
    one KRaft quorum, so that none waits on a quorum its stopped peers no longer form.
    Returns whether each one was running."""
    pids = {svc.name: svc.terminate() for svc in services}
    for svc in services:
        pid = pids[svc.name]
        if pid is not None:
            svc.wait_stopped(pid, timeout)
    return {name: pid is not None for name, pid in pids.items()}


def _tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


class KafkaService(Service):
    """One KRaft node of the local stack, a broker and a controller in one process.

    With one node (the default) it is the service ``kafka``; with ``kafka.brokers`` = N > 1
    it is ``kafka-<i>``, one of N nodes that form one controller quorum (every node a voter
    in ``controller.quorum.voters``), each with its own log directory, log and PID file. The
    replication settings follow the node count (:meth:`replication_props`)."""

    start_timeout = 60.0

    def __init__(self, settings: Settings, node: int = 1):
        k = settings.kafka
        super().__init__("kafka" if k.brokers == 1 else f"kafka-{node}", settings)
        self.node = k.nodes()[node - 1]
        # N JVMs starting at once on a small machine take longer than one
        self.start_timeout = 60.0 + 30.0 * (k.brokers - 1)

    def ports(self) -> list[int]:
        return [self.node.port, self.node.controller_port]

    def address(self) -> str:
        k = self.settings.kafka
        return k.bootstrap_servers if k.brokers == 1 else f"{k.host}:{self.node.port}"

    def _config_path(self) -> Path:
        return self.dir / "server.properties"

    def replication_props(self) -> dict[str, str]:
        """Replication of the internal topics and topic defaults: one broker replicates
        nothing; three or more keep 3 replicas and need 2 in sync for a write (acks=all), so
        the cluster serves every read and write with one broker down."""
        k = self.settings.kafka
        rf, isr = str(k.replication_factor), str(k.min_insync_replicas)
        props = {
            "offsets.topic.replication.factor": rf,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
        }
        if k.brokers > 1:
            props |= {"default.replication.factor": rf, "min.insync.replicas": isr}
        return props

    def prepare(self) -> None:
        k = self.settings.kafka
        n = self.node
        data = self.dir / "data"
        voters = ",".join(f"{v.node_id}@{k.host}:{v.controller_port}" for v in k.nodes())
        props = {
            "process.roles": "broker,controller",
            "node.id": str(n.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{k.host}:{n.port},CONTROLLER://{k.host}:{n.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{k.host}:{n.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.num.partitions": "4",
            **self.replication_props(),
            "group.initial.rebalance.delay.ms": "0",
            # retention is set per topic when ctrstream creates it (ctrstream.config.Topics
            # says what each keeps and why), not broker-wide
            "message.max.bytes": str(8 * 1024 * 1024),
        }
        self._config_path().write_text("".join(f"{a}={b}\n" for a, b in props.items()))
        (self.dir / "log4j2.yaml").write_text(_LOG4J2)
        if not (data / "meta.properties").exists():
            res = subprocess.run(
                [
                    provision.java(),
                    "-cp",
                    provision.kafka_classpath(self.settings),
                    f"-Dlog4j2.configurationFile={self.dir / 'log4j2.yaml'}",
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    kafka_cluster_id(self.settings),
                    "-c",
                    str(self._config_path()),
                ],
                capture_output=True,
                text=True,
            )
            if res.returncode != 0:
                raise StackError(
                    f"formatting Kafka storage in {data} failed:\n{res.stdout}{res.stderr}"
                )

    def command(self):
        heap = self.settings.kafka.heap
        argv = [
            provision.java(),
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.yaml'}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
            "-cp",
            provision.kafka_classpath(self.settings),
            "kafka.Kafka",
            str(self._config_path()),
        ]
        return argv, {}

    def ready(self) -> bool:
        """This node answers metadata requests and is a registered broker (with several
        nodes: the quorum has a leader and took this broker's registration)."""
        from confluent_kafka.admin import AdminClient

        # a TCP probe first: librdkafka logs every refused connection while the JVM boots
        k = self.settings.kafka
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((k.host, self.node.port)) != 0:
                return False
        admin = AdminClient(
            {
                "bootstrap.servers": f"{k.host}:{self.node.port}",
                "socket.timeout.ms": 1000,
                "log_level": 0,
            }
        )
        md = admin.list_topics(timeout=2.0)
        return self.node.node_id in md.brokers


def kafka_cluster_id(settings: Settings) -> str:
    """The KRaft cluster id every node of the local stack is formatted with, kept in the run
    directory (``kafka.cluster-id``) so that nodes formatted one by one agree."""
    path = settings.run_dir / "kafka.cluster-id"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    cluster_id = "-"
    while cluster_id.startswith("-"):  # kafka-storage would read "-..." as an option
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cluster_id + "\n")
    return cluster_id


def kafka_services(settings: Settings) -> list[KafkaService]:
    """One :class:`KafkaService` per KRaft node of ``settings.kafka``."""
    return [KafkaService(settings, n.node_id) for n in settings.kafka.nodes()]


_LOG4J2 = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Logger:
      - name: kafka
        level: INFO
      - name: org.apache.kafka
        level: WARN
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
"""


def ensure_redis_password(settings: Settings) -> str:
    """The local Redis password: the settings' own when given (``CTRSTREAM_REDIS__PASSWORD``),
    else the one in ``<run_dir>/redis.password``, else a new random one written there,
    readable by its owner only (mode 0600). Sets ``settings.redis.password``: every client
    of these settings, and every child process given ``settings_env``, authenticates."""
    if settings.redis.password:
        return settings.redis.password
    path = settings.run_dir / REDIS_PASSWORD_FILE
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        password = ""
    if not password:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(32)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        os.replace(tmp, path)  # a concurrent reader sees the whole file or none
    if path.exists():
        os.chmod(path, 0o600)
    settings.redis.password = password
    return password


def write_redis_config(path: Path, password: str, *, replica_auth: bool = False) -> None:
    """A redis-server config file holding only the password (readable by its owner only: the
    password stays off the command line); ``replica_auth``: a cluster node's replica
    authenticates to its master with it too."""
    quoted = password.replace("\\", "\\\\").replace('"', '\\"')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'requirepass "{quoted}"\n')
        if replica_auth:
            f.write(f'masterauth "{quoted}"\n')
    os.chmod(path, 0o600)


def redis_server_argv(
    settings: Settings, config: Path, port: int, data_dir: Path, extra: Sequence[str] = ()
) -> list[str]:
    """The argv of one redis-server of the local stack: loopback, protected, in the
    foreground, append-only file per the settings and no RDB snapshots; ``extra`` options
    (a cluster node's) before the data options."""
    r = settings.redis
    return [
        provision.redis_server(),
        str(config),
        "--bind",
        r.host,
        "--port",
        str(port),
        *extra,
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "yes" if r.appendonly else "no",
        "--appendfsync",
        "everysec",
        "--protected-mode",
        "yes",
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]


class RedisService(Service):
    """Redis with its append-only file on and a password.

    Persistence: ``appendonly yes`` with ``appendfsync everysec``. Redis appends every write
    to the file (write(2), into the kernel's page cache) before it answers the client, so a
    ``kill -9`` of Redis loses nothing it acknowledged: the kernel still writes the pages
    (unless a slow disk made Redis postpone that write behind a running fsync, for at most
    2 s - a loss the features job detects, below).
    ``fsync`` once a second bounds what a crash of the *machine* can take to about the last
    second (``always`` would fsync on every event-loop turn and cost the speed layer's
    pipelined writes their throughput; what such a crash takes, the features job detects
    with its writer marker and re-writes from its state, and reports what it cannot -
    ``ctrstream.store.speed_view.SpeedViewWriter``). Snapshots (``save``) stay off: the AOF
    is the one persistence, rewritten in the background as it grows.

    Authentication: ``requirepass`` from :func:`ensure_redis_password`, given in a config
    file readable by its owner only (an argument would show in every user's ``ps``)."""

    start_timeout = 20.0

    def __init__(self, settings: Settings):
        super().__init__("redis", settings)

    def ports(self) -> list[int]:
        return [self.settings.redis.port]

    def address(self) -> str:
        return f"{self.settings.redis.host}:{self.settings.redis.port}"

    def _config_path(self) -> Path:
        return self.dir / "redis.conf"

    def prepare(self) -> None:
        write_redis_config(self._config_path(), ensure_redis_password(self.settings))

    def command(self):
        r = self.settings.redis
        return redis_server_argv(self.settings, self._config_path(), r.port, self.dir), {}

    def ready(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.settings.redis.url, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()


class TritonService(Service):
    """One tritonserver in explicit model-control mode.

    With one server (the default) it is the service ``triton``; with ``triton.replicas`` = N
    > 1 it is ``triton-<i>``, one of N servers on their own ports (``TritonSettings.nodes``)
    that load the same model repository, each with its own directory, log and PID file.
    Clients spread requests over all of them (``serving/triton_client.py``) and the
    publisher switches versions on every one (docs/triton-replicas.md).

    Model control (the model-repository protocol: load, unload, index) requires the control
    key (``ctrstream.config.triton_control_key``), generated here on first start into the run
    directory with owner-only permissions unless ``settings.triton.control_key`` is set;
    every replica gets the same key. Inference, health and metadata stay open. Every start
    loads the models the publisher recorded as served (``settings.triton.served_record``),
    so a restarted Triton serves what it served before without anyone publishing again."""

    start_timeout = 90.0

    def __init__(self, settings: Settings, replica: int = 1):
        t = settings.triton
        super().__init__("triton" if t.replicas == 1 else f"triton-{replica}", settings)
        self.node = t.nodes()[replica - 1]
        # N servers starting at once on a small machine take longer than one
        self.start_timeout = 90.0 + 30.0 * (t.replicas - 1)

    def ports(self) -> list[int]:
        n = self.node
        return [n.http_port, n.grpc_port, n.metrics_port]

    def address(self) -> str:
        h = self.settings.triton.host
        return f"grpc {h}:{self.node.grpc_port}, http {h}:{self.node.http_port}"

    def prepare(self) -> None:
        ensure_triton_control_key(self.settings)

    def command(self):
        t = self.settings.triton
        n = self.node
        t.model_repository.mkdir(parents=True, exist_ok=True)
        server = provision.triton_home(self.settings)
        argv = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={t.model_repository}",
            f"--backend-directory={server / 'backends'}",
            "--model-control-mode=explicit",
            "--strict-readiness=false",
            "--exit-on-error=false",
            f"--http-address={t.host}",
            f"--http-port={n.http_port}",
            f"--grpc-address={t.host}",
            f"--grpc-port={n.grpc_port}",
            f"--metrics-address={t.host}",
            f"--metrics-port={n.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
            *triton_control_flags(ensure_triton_control_key(self.settings)),
            *(f"--load-model={name}" for name in served_models(self.settings)),
        ]
        return argv, provision.triton_env(self.settings)

    def ready(self) -> bool:
        import urllib.request

        url = f"http://{self.settings.triton.host}:{self.node.http_port}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200


def triton_services(settings: Settings) -> list[TritonService]:
    """One :class:`TritonService` per Triton server of ``settings.triton``."""
    return [TritonService(settings, n.index) for n in settings.triton.nodes()]


def ensure_triton_control_key(settings: Settings) -> str:
    """The model-control key: the configured one, else the run directory's, generated (32
    random bytes, hex) into a file only its owner may read when there is none yet."""
    key = triton_control_key(settings)
    if key is not None:
        return key
    path = triton_control_key_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use that one
        return triton_control_key(settings) or key
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def triton_control_flags(key: str) -> list[str]:
    """tritonserver options that restrict the model-repository protocol to requests that
    carry ``key`` (HTTP header ``TRITON_CONTROL_HEADER``; gRPC metadata of the same name
    with Triton's ``triton-grpc-protocol-`` prefix)."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", key):
        raise StackError(
            "the Triton control key may hold only letters, digits, _ and - "
            "(check CTRSTREAM_TRITON__CONTROL_KEY)"
        )
    rule = f"model-repository:{TRITON_CONTROL_HEADER}={key}"
    return [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]


def served_models(settings: Settings) -> list[str]:
    """The model names the served record lists whose folder is in the model repository (a
    record that cannot be read loads nothing and says so in the stack's output)."""
    record = settings.triton.served_record
    try:
        doc = json.loads(record.read_text())
        names = list(doc["models"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("triton: ignoring the served record %s: %s: %s", record, type(e).__name__, e)
        return []
    repo = settings.triton.model_repository
    return [
        n
        for n in names
        if isinstance(n, str)
        and re.fullmatch(r"[A-Za-z0-9_\-]+", n)
        and (repo / n / "config.pbtxt").is_file()
    ]


def redis_services(settings: Settings) -> list[Service]:
    """The one :class:`RedisService`, or every node of the local Redis Cluster when
    ``settings.redis.cluster_masters`` is set (:mod:`ctrstream.stack.redis_cluster`)."""
    if settings.redis.cluster_masters:
        from ctrstream.stack.redis_cluster import cluster_nodes_services

        return list(cluster_nodes_services(settings))
    return [RedisService(settings)]


def all_services(settings: Settings) -> list[Service]:
    """The stack's servers in start order; Prometheus (last) unless it is disabled."""
    from ctrstream.stack.prometheus import PrometheusService  # it builds on Service

    services: list[Service] = [
        *kafka_services(settings),
        *redis_services(settings),
        *triton_services(settings),
    ]
    if settings.prometheus.enabled:
        services.append(PrometheusService(settings))
    return services
