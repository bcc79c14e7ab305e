"""One typed settings object for every ctrstream process.

Every field can be overridden from the environment with the ``CTRSTREAM_`` prefix; nested
fields use ``__`` (for example ``CTRSTREAM_KAFKA__PORT=19092`` or
``CTRSTREAM_TOPICS__IMPRESSIONS__PARTITIONS=8``). Defaults point at the local stack started
by ``ctrstream stack up``.

Folders (the stack's run directory, the set-up cache, batch-layer data, the Triton model
repository, benchmark results) default to paths under the **current directory** and are
made absolute when the settings are read, so an installed ctrstream works from any
directory and child processes (which get absolute paths through ``settings_env``) agree
with their parent whatever their own working directory is. Nothing hangs off the source
checkout: its assets (the Kafka pom, the Lua script) are package data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _absolute(path: Path | str) -> Path:
    """``path`` with ``~`` expanded, relative to the current directory when relative."""
    return Path(path).expanduser().absolute()


def _merged(default: Any, given: Any) -> Any:
    """``given`` laid over ``default`` (a model or a dict), key by key and recursively, as a
    dict; a ``given`` that is not a dict replaces the default whole."""
    if isinstance(default, BaseModel):
        default = {k: getattr(default, k) for k in type(default).model_fields}
    if not isinstance(default, dict) or not isinstance(given, dict):
        return given
    return {**default, **{k: _merged(default.get(k), v) for k, v in given.items()}}


class _OverDefaults(BaseModel):
    """A model whose fields default to models: a partial override of one of them (what a
    nested environment variable such as ``CTRSTREAM_TOPICS__IMPRESSIONS__PARTITIONS=8``
    gives: ``{"partitions": "8"}``) is laid over that field's default, so the fields it does
    not name keep their default values instead of being required."""

    @model_validator(mode="before")
    @classmethod
    def _over_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, f in cls.model_fields.items():
            if name in out and isinstance(f.default, BaseModel):
                out[name] = _merged(f.default, out[name])
        return out


DAY_MS = 24 * 3600 * 1000

# The largest record a topic accepts (its ``max.message.bytes``, set when ctrstream creates
# it): the local broker's and compose's ``message.max.bytes``.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# What a dead letter adds to the record it carries: its ``__connect.errors.*`` headers (the
# reason is cut to fit, see ctrstream.kafka.deadletters) and the record batch's framing.
DEAD_LETTER_OVERHEAD_BYTES = 64 * 1024


class Topic(BaseModel):
    name: str
    partitions: int = Field(ge=1)
    # the topic's own retention.ms, set when it is created (and corrected on an existing
    # topic by ensure_topics); -1 keeps every record
    retention_ms: int = Field(default=-1, ge=-1)
    # the topic's max.message.bytes; for the dlq, the largest source's plus a dead letter's
    # overhead (Topics.dead_letter_max_bytes), whatever is given here
    max_message_bytes: int = Field(default=MAX_MESSAGE_BYTES, ge=1024)


class Topics(_OverDefaults):
    """The topics and their retention. Kafka's time retention compares a segment's newest
    record timestamp with the wall clock, and the event topics carry EVENT times as record
    timestamps: with any time bound, a replay or backfill of traffic older than the bound
    would be deleted by the broker within minutes of being written. So the event topics
    (impressions, clicks and the joined labels, the source of truth the speed layer and the
    archive resume from) keep everything (-1; the Parquet archive is the master dataset, and
    a deployment bounds disk with retention.bytes or its own policy). Predictions and dead
    letters are stamped with the wall clock when written: predictions are derived (re-scoring
    recomputes them; the calibrator consumes them within seconds), so a week covers a
    stopped calibrate job; dead letters are kept two weeks for inspection and replay after a
    fix."""

    impressions: Topic = Topic(name="impressions", partitions=4, retention_ms=-1)
    clicks: Topic = Topic(name="clicks", partitions=4, retention_ms=-1)
    labeled: Topic = Topic(name="labeled", partitions=4, retention_ms=-1)
    predictions: Topic = Topic(name="predictions", partitions=4, retention_ms=7 * DAY_MS)
    dlq: Topic = Topic(name="dlq", partitions=1, retention_ms=14 * DAY_MS)

    def all(self) -> list[Topic]:
        return [self.impressions, self.clicks, self.labeled, self.predictions, self.dlq]

    def dead_letter_max_bytes(self) -> int:
        """The dlq topic's and the dead-letter producers' record size limit: any record a
        source topic accepts, plus the dead letter's headers."""
        sources = (self.impressions, self.clicks, self.labeled, self.predictions)
        return max(t.max_message_bytes for t in sources) + DEAD_LETTER_OVERHEAD_BYTES

    def max_message_bytes(self, topic: Topic) -> int:
        """The max.message.bytes ``topic`` is created with."""
        return (
            self.dead_letter_max_bytes() if topic.name == self.dlq.name else topic.max_message_bytes
        )


REDIS_CLUSTER_FILE = "redis-cluster.json"
"""The local stack's Redis Cluster topology (masters, each node's ports), in the run
directory: written by ``ctrstream stack up --redis-cluster N``, read by every ``ctrstream``
command with the same run directory that does not set it (``Settings._local_redis_cluster``)."""

KAFKA_NODES_FILE = "kafka-nodes.json"
"""The local stack's Kafka topology (how many nodes, their ports), in the run directory:
written by ``ctrstream stack up``, read by every ``ctrstream`` command with the same run
directory that does not set the topology itself (``Settings._local_kafka_nodes``)."""


@dataclass(frozen=True)
class KafkaNode:
    """One KRaft node of the local stack: a broker and a voter of the controller quorum."""

    node_id: int
    port: int
    controller_port: int


class KafkaSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9093
    heap: str = "768m"
    # bootstrap servers for clients; when empty, host:port of every local broker
    bootstrap: str = ""
    # how many KRaft nodes `ctrstream stack up` runs (`--kafka-brokers`), each a broker and
    # a voter of one controller quorum; 3 or more: every topic is replicated 3 times and a
    # write needs 2 in-sync replicas, so the cluster keeps serving without one broker
    brokers: int = Field(default=1, ge=1, le=9)
    # [port, controller_port] of nodes 2..brokers (entries beyond those are unused); empty:
    # node i listens on port + 2(i-1) and controller_port + 2(i-1) (9094/9095, 9096/9097, ...)
    more_ports: list[tuple[int, int]] = []

    @model_validator(mode="after")
    def _distinct_ports(self) -> KafkaSettings:
        if self.more_ports and len(self.more_ports) < self.brokers - 1:
            raise ValueError(
                f"kafka.more_ports lists {len(self.more_ports)} nodes' ports but brokers="
                f"{self.brokers} needs {self.brokers - 1} ([port, controller_port] of nodes "
                "2..N): fix CTRSTREAM_KAFKA__MORE_PORTS, or leave it empty for consecutive ports"
            )
        ports = [p for n in self.nodes() for p in (n.port, n.controller_port)]
        if len(set(ports)) != len(ports):
            raise ValueError(
                f"the {self.brokers} Kafka nodes' ports overlap ({ports}): set "
                "CTRSTREAM_KAFKA__PORT/CONTROLLER_PORT further apart, or list every node's "
                "ports in CTRSTREAM_KAFKA__MORE_PORTS"
            )
        return self

    def nodes(self) -> list[KafkaNode]:
        """The local stack's KRaft nodes, node 1 on ``port``/``controller_port``."""
        out = [KafkaNode(1, self.port, self.controller_port)]
        for i in range(2, self.brokers + 1):
            if self.more_ports:
                port, controller = self.more_ports[i - 2]
            else:
                port, controller = self.port + 2 * (i - 1), self.controller_port + 2 * (i - 1)
            out.append(KafkaNode(i, port, controller))
        return out

    @property
    def bootstrap_servers(self) -> str:
        return self.bootstrap or ",".join(f"{self.host}:{n.port}" for n in self.nodes())

    @property
    def replication_factor(self) -> int:
        """Replicas of every topic ctrstream creates: one per broker, at most 3."""
        return min(3, self.brokers)

    @property
    def min_insync_replicas(self) -> int:
        """In-sync replicas an acks=all write needs: 2 of 3 (one broker may be down), else 1."""
        return 2 if self.replication_factor >= 3 else 1


REDIS_PASSWORD_FILE = "redis.password"
"""The local stack's Redis password, in the run directory (owner-only, written by ``ctrstream
stack up``)."""


class RedisSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 6379
    # None: the local stack's, read from ``<run_dir>/redis.password`` when that file exists
    password: str | None = None
    db: int = 0
    # the local stack's Redis keeps an append-only file (fsynced every second): a kill -9
    # loses nothing it acknowledged. It costs the speed layer throughput and freshness under
    # load (docs/hardening.md); without it a restart loses the data, which the features job
    # detects, re-writes for its open buckets and reports for the closed ones (docs/faults.md)
    appendonly: bool = True
    # Redis Cluster: "host:port" seed nodes (any few nodes of the cluster; clients learn the
    # rest from them). Empty: one Redis at host:port - unless the local stack runs a cluster
    # (``cluster_masters``), whose nodes are then the seeds. A JSON list or comma-separated.
    cluster: Annotated[list[str], NoDecode] = []
    # how many masters `ctrstream stack up --redis-cluster N` runs, each with one replica
    # (2N redis-server processes); 0: one Redis, no cluster
    cluster_masters: int = Field(default=0, ge=0, le=16)
    # [port, cluster-bus port] of every node of the local cluster, masters first (entries
    # beyond 2 * cluster_masters are unused); empty: node i (from 0) on port + i, its bus on
    # port + 10000 + i (Redis' own bus offset)
    cluster_ports: list[tuple[int, int]] = []
    # how long a node may be unreachable before the cluster fails it over to its replica
    # (redis.conf cluster-node-timeout): a master failover takes about this plus an election
    cluster_node_timeout_ms: int = Field(default=3000, ge=100)
    # what a speed-view flush waits for on a cluster (or a single Redis with replicas) before
    # it reports the flush written: WAIT <wait_replicas> <wait_timeout_ms> on each master it
    # wrote to; replication is asynchronous, so without it a master failover can lose the
    # last acknowledged writes (docs/redis-cluster.md measures how many). 0: do not wait
    wait_replicas: int = Field(default=1, ge=0)
    wait_timeout_ms: int = Field(default=1000, ge=0)

    @field_validator("cluster", mode="before")
    @classmethod
    def _split_seeds(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError as e:
                    raise ValueError(
                        f"redis.cluster {text!r} is not a JSON list ({e}): give the seed nodes "
                        'as \'["10.0.0.1:6379","10.0.0.2:6379"]\' or comma-separated'
                    ) from e
            return [s.strip() for s in text.split(",") if s.strip()]
        return value

    @field_validator("cluster")
    @classmethod
    def _check_seeds(cls, value: list[str]) -> list[str]:
        for seed in value:
            host, sep, port = seed.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(
                    f"redis.cluster seed {seed!r} is not host:port: list the cluster's nodes as "
                    'CTRSTREAM_REDIS__CLUSTER=\'["10.0.0.1:6379","10.0.0.2:6379"]\' (or '
                    "comma-separated)"
                )
        return value

    @model_validator(mode="after")
    def _cluster_topology(self) -> RedisSettings:
        if 0 < self.cluster_masters < 3:
            raise ValueError(
                f"redis.cluster_masters={self.cluster_masters}: a Redis Cluster needs at least "
                "3 masters (a majority of masters elects a failed master's replica); use "
                "--redis-cluster 3 or more, or 0 for one Redis"
            )
        if self.cluster_ports and len(self.cluster_ports) < 2 * self.cluster_masters:
            raise ValueError(
                f"redis.cluster_ports lists {len(self.cluster_ports)} nodes' ports but "
                f"cluster_masters={self.cluster_masters} runs {2 * self.cluster_masters} "
                "nodes (a replica per master): list [port, bus_port] of every node in "
                "CTRSTREAM_REDIS__CLUSTER_PORTS, or leave it empty for consecutive ports"
            )
        if self.cluster_masters:
            ports = [p for pair in self.cluster_node_ports() for p in pair]
            if len(set(ports)) != len(ports):
                raise ValueError(
                    f"the local Redis Cluster's {2 * self.cluster_masters} nodes' ports "
                    f"overlap ({ports}): set CTRSTREAM_REDIS__PORT elsewhere or list every "
                    "node's [port, bus_port] in CTRSTREAM_REDIS__CLUSTER_PORTS"
                )
            if not self.cluster:
                self.cluster = self.local_seeds()
        if self.cluster and self.db:
            raise ValueError(
                f"redis.db={self.db} with a Redis Cluster: a cluster has database 0 only; "
                "unset CTRSTREAM_REDIS__DB"
            )
        return self

    def cluster_node_ports(self) -> list[tuple[int, int]]:
        """[port, cluster-bus port] of each node of the local cluster, masters first."""
        n = 2 * self.cluster_masters
        if self.cluster_ports:
            return [(int(a), int(b)) for a, b in self.cluster_ports[:n]]
        return [(self.port + i, self.port + 10000 + i) for i in range(n)]

    def local_seeds(self) -> list[str]:
        """``host:port`` of every node of the local cluster (empty without one)."""
        return [f"{self.host}:{p}" for p, _ in self.cluster_node_ports()]

    @property
    def clustered(self) -> bool:
        """Whether clients talk to a Redis Cluster (seed nodes given or a local cluster)."""
        return bool(self.cluster)

    def seed_nodes(self) -> list[tuple[str, int]]:
        """The cluster's seed nodes as (host, port)."""
        out = []
        for seed in self.cluster:
            host, _, port = seed.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out

    def with_cluster(self, masters: int) -> RedisSettings:
        """These settings with a local cluster of ``masters`` masters (0: one Redis); seeds
        that were this local cluster's are recomputed, seeds given for another cluster kept."""
        data = self.model_dump()
        if self.cluster_masters and data["cluster"] == self.local_seeds():
            data["cluster"] = []
        if self.cluster_ports and len(self.cluster_ports) < 2 * masters:
            data["cluster_ports"] = []
        return RedisSettings.model_validate({**data, "cluster_masters": masters})

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{self.db}"


TRITON_NODES_FILE = "triton-nodes.json"
"""The local stack's Triton topology (how many servers, their ports), in the run directory:
written by ``ctrstream stack up``, read by every ``ctrstream`` command with the same run
directory that does not set the topology itself (``Settings._local_triton_nodes``)."""


@dataclass(frozen=True)
class TritonNode:
    """One tritonserver process of the local stack (replica ``index``, from 1)."""

    index: int
    http_port: int
    grpc_port: int
    metrics_port: int


class SpeedSettings(BaseModel):
    # the speed view's key layout (``ctrstream.store.layout.speed_layout``, docs/speed-layer.md):
    # ``grouped``: one hash per root entity id (user, site, ad, campaign, advertiser) and day,
    # holding the root's crosses too (user x ad in the user's hash); ``entity``: one hash per
    # entity id and day. The writer, the readers, the scans and reconciliation all follow it.
    layout: Literal["grouped", "entity"] = "grouped"


class TritonSettings(BaseModel):
    model_config = ConfigDict(validate_default=True)

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # how many tritonserver processes `ctrstream stack up` runs (`--triton-replicas`), each
    # loading the same model repository; clients spread requests over all of them
    # (docs/triton-replicas.md). Each server with the Python backend costs its own memory.
    replicas: int = Field(default=1, ge=1, le=8)
    # [http, grpc, metrics] ports of replicas 2..N (entries beyond those are unused); empty:
    # replica i listens on each port + 10(i-1) (8010/8011/8012, 8020/8021/8022, ...)
    more_ports: list[tuple[int, int, int]] = []
    # the gRPC addresses ("host:port") of every Triton server the clients (API, scorer,
    # publisher) use, as JSON or comma-separated (CTRSTREAM_TRITON__URLS=t1:8001,t2:8001);
    # empty: the local stack's servers (host with each replica's grpc_port)
    urls: Annotated[list[str], NoDecode] = []
    # Which flavour of each published model the local stack loads:
    #   "python"      - Python-backend model running the ONNX file through onnxruntime
    #                   (the only backend the nvidia-pytriton server binary ships);
    #   "onnxruntime" - Triton's ONNX Runtime backend (NVIDIA's container, production).
    backend: Literal["python", "onnxruntime"] = "python"
    model_repository: Path = Path("triton_repo")
    timeout_s: float = 2.0
    # The key Triton's model-repository API (load, unload, index) requires: the publisher
    # sends it, the API and the scorer only infer and never need it. Empty: the key that
    # `ctrstream stack up` generated in the run directory (``triton_control_key``).
    control_key: SecretStr | None = None  # `config show` prints it masked

    _abs = field_validator("model_repository")(_absolute)

    @field_validator("urls", mode="before")
    @classmethod
    def _urls_text(cls, value: Any) -> Any:
        """A comma-separated string is a list of addresses (JSON lists pass as they are)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [u.strip() for u in text.split(",") if u.strip()]
        return value

    @field_validator("urls")
    @classmethod
    def _urls_valid(cls, urls: list[str]) -> list[str]:
        for u in urls:
            host, _, port = u.rpartition(":")
            if not host or not port.isdigit() or "/" in u:
                raise ValueError(
                    f"triton.urls: {u!r} is not a gRPC address host:port (for example "
                    "CTRSTREAM_TRITON__URLS=triton-1:8001,triton-2:8001)"
                )
        if len(set(urls)) != len(urls):
            raise ValueError(f"triton.urls lists a server twice: {urls}")
        return urls

    @model_validator(mode="after")
    def _distinct_ports(self) -> TritonSettings:
        if self.more_ports and len(self.more_ports) < self.replicas - 1:
            raise ValueError(
                f"triton.more_ports lists {len(self.more_ports)} servers' ports but replicas="
                f"{self.replicas} needs {self.replicas - 1} ([http, grpc, metrics] of replicas "
                "2..N): fix CTRSTREAM_TRITON__MORE_PORTS, or leave it empty for the default ports"
            )
        ports = [p for n in self.nodes() for p in (n.http_port, n.grpc_port, n.metrics_port)]
        if len(set(ports)) != len(ports):
            raise ValueError(
                f"the {self.replicas} Triton servers' ports overlap ({ports}): set "
                "CTRSTREAM_TRITON__HTTP_PORT/GRPC_PORT/METRICS_PORT further apart, or list "
                "every server's ports in CTRSTREAM_TRITON__MORE_PORTS"
            )
        return self

    def nodes(self) -> list[TritonNode]:
        """The local stack's Triton servers, replica 1 on ``http_port``/``grpc_port``/
        ``metrics_port``."""
        out = [TritonNode(1, self.http_port, self.grpc_port, self.metrics_port)]
        for i in range(2, self.replicas + 1):
            if self.more_ports:
                http, grpc, metrics = self.more_ports[i - 2]
            else:
                step = 10 * (i - 1)
                http, grpc, metrics = (
                    self.http_port + step,
                    self.grpc_port + step,
                    self.metrics_port + step,
                )
            out.append(TritonNode(i, http, grpc, metrics))
        return out

    @property
    def grpc_urls(self) -> list[str]:
        """Every Triton server's gRPC address: ``urls``, else the local stack's replicas."""
        return list(self.urls) or [f"{self.host}:{n.grpc_port}" for n in self.nodes()]

    @property
    def grpc_url(self) -> str:
        """The first server's gRPC address (tools that talk to one server)."""
        return self.grpc_urls[0]

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def served_record(self) -> Path:
        """The record of the served models (written by the publisher after each switch, read
        by whatever starts Triton, which loads them): ``{"models": {name: {"versions": [..],
        ...}}}`` in the model repository, next to the models it names."""
        return self.model_repository / "served.json"


class PrometheusSettings(BaseModel):
    """The local stack's Prometheus (``ctrstream stack up``; :mod:`ctrstream.stack.prometheus`).

    Its port is not Prometheus's usual 9090: a machine that runs Debian's own Prometheus
    service (the package's default) keeps it, and the stack's does not collide with it."""

    enabled: bool = True  # false: `stack up` runs without it (no root for `ctrstream setup`)
    host: str = "127.0.0.1"
    port: int = 19090
    scrape_interval_s: float = Field(default=5.0, gt=0)
    evaluation_interval_s: float = Field(default=15.0, gt=0)
    retention: str = "7d"  # --storage.tsdb.retention.time

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _recorded_topology(path: Path, what: str, setting: str) -> dict[str, Any] | None:
    """The topology ``ctrstream stack up`` recorded in ``path`` (None when there is none); a
    file that cannot be read is an error that says how to go on (``setting``: the
    ``CTRSTREAM_`` variable that overrides the record)."""
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise ValueError(
            f"the local {what} topology {path} cannot be read ({e}): remove it (`ctrstream "
            f"stack down --purge` removes the stack's data) or set CTRSTREAM_{setting}"
        ) from e
    if not isinstance(doc, dict):
        raise ValueError(
            f"the local {what} topology {path} is not a JSON object: remove it (`ctrstream "
            f"stack down --purge` removes the stack's data) or set CTRSTREAM_{setting}"
        )
    return doc


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CTRSTREAM_",
        env_nested_delimiter="__",
        extra="ignore",
        validate_default=True,  # relative default folders become absolute (see above)
    )

    # where the local stack keeps data, logs and PID files
    run_dir: Path = Path(".stack")
    # where set-up caches the Kafka jars, the Triton binary and its Python environment
    cache_dir: Path = Path(".cache")
    # where batch-layer data (the Parquet master dataset, training sets, model cards) lives
    data_dir: Path = Path("data")
    # where `ctrstream bench` writes its tables, JSON and plots
    results_dir: Path = Path("bench") / "results"

    _abs = field_validator("run_dir", "cache_dir", "data_dir", "results_dir")(_absolute)
    # the key that signs watermark heartbeats (ctrstream.kafka.heartbeats), generated by
    # `ctrstream stack up`; empty: <run_dir>/control.key
    control_secret_file: Path | None = None

    @property
    def control_secret_path(self) -> Path:
        """Where the control secret is (``control_secret_file`` or the run directory's)."""
        if self.control_secret_file is not None:
            return _absolute(self.control_secret_file)
        return self.run_dir / "control.key"

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    triton: TritonSettings = TritonSettings()
    prometheus: PrometheusSettings = PrometheusSettings()
    topics: Topics = Topics()
    speed: SpeedSettings = SpeedSettings()

    # speed layer
    allowed_lateness_s: float = 60.0
    # How far ahead of its partition's watermark (the largest event time seen there) an event
    # may be; a partition's first event is bounded by the other partitions' watermarks in
    # the same job and, in a live stream, by the wall clock. An event beyond it is a dead
    # letter (``future: ...``) and does not move the watermark, so one bad clock cannot make
    # the rest of its partition late. A real gap in event time larger than this must be
    # announced by a watermark heartbeat (`ctrstream speed heartbeat`), which moves the
    # watermark by itself. Sized for the generator's traffic: a scenario spans hours and its
    # partitions' events are seconds to minutes apart.
    max_event_ahead_s: float = Field(default=6 * 3600.0, gt=0)
    flush_interval_ms: int = 300
    attribution_window_s: float = 1800.0
    # the batch layer's engine for the training set (`ctrstream train --engine` overrides):
    # duckdb (DuckDB and numpy on this machine) or spark (PySpark, the `spark` extra; for an
    # archive that outgrows one machine: docs/batch-engines.md)
    batch_engine: Literal["duckdb", "spark"] = "duckdb"
    redis_ttl_s: int = 3 * 24 * 3600

    # metrics ports of long-running processes (0 disables) and the address they bind:
    # loopback locally, 0.0.0.0 in containers (Prometheus scrapes them over the network)
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _local_redis_password(self) -> Settings:
        """Without a password in the settings, clients use the one ``ctrstream stack up``
        generated for the local Redis (``<run_dir>/redis.password``)."""
        if self.redis.password is None:
            try:
                password = (self.run_dir / REDIS_PASSWORD_FILE).read_text().strip()
            except (FileNotFoundError, NotADirectoryError):
                return self
            except OSError as e:
                raise ValueError(
                    f"the local Redis password file {self.run_dir / REDIS_PASSWORD_FILE} "
                    f"cannot be read ({e}): run ctrstream as the user who ran `stack up`, or "
                    "set CTRSTREAM_REDIS__PASSWORD"
                ) from e
            if password:
                self.redis = self.redis.model_copy(update={"password": password})
        return self

    @model_validator(mode="after")
    def _local_kafka_nodes(self) -> Settings:
        """Without a topology in the settings (``CTRSTREAM_KAFKA__BROKERS``), clients and
        ``stack status/down`` use the one ``ctrstream stack up`` recorded in the run
        directory, so the bootstrap servers list every broker it started."""
        given = self.kafka.model_fields_set
        if "brokers" in given:
            return self
        doc = _recorded_topology(self.run_dir / KAFKA_NODES_FILE, "Kafka", "KAFKA__BROKERS")
        if doc is None:
            return self
        update: dict[str, Any] = {"brokers": doc.get("brokers", 1)}
        for key in ("port", "controller_port", "more_ports"):  # what the settings leave open
            if key not in given and key in doc:
                update[key] = doc[key]
        self.kafka = KafkaSettings.model_validate({**self.kafka.model_dump(), **update})
        return self

    @model_validator(mode="after")
    def _local_triton_nodes(self) -> Settings:
        """Without a Triton topology in the settings (``CTRSTREAM_TRITON__REPLICAS`` or
        ``CTRSTREAM_TRITON__URLS``), clients and ``stack status/down`` use the one ``ctrstream
        stack up`` recorded in the run directory, so they see every server it started."""
        given = self.triton.model_fields_set
        if "replicas" in given or "urls" in given:
            return self
        doc = _recorded_topology(self.run_dir / TRITON_NODES_FILE, "Triton", "TRITON__REPLICAS")
        if doc is None:
            return self
        update: dict[str, Any] = {"replicas": doc.get("replicas", 1)}
        for key in ("http_port", "grpc_port", "metrics_port", "more_ports"):
            if key not in given and key in doc:
                update[key] = doc[key]
        self.triton = TritonSettings.model_validate({**self.triton.model_dump(), **update})
        return self

    @model_validator(mode="after")
    def _local_redis_cluster(self) -> Settings:
        """Without a Redis topology in the settings (``CTRSTREAM_REDIS__CLUSTER_MASTERS`` or
        ``CTRSTREAM_REDIS__CLUSTER``), clients and ``stack status/down`` use the local
        cluster that ``ctrstream stack up --redis-cluster N`` recorded in the run directory."""
        given = self.redis.model_fields_set
        if "cluster_masters" in given or "cluster" in given:
            return self
        doc = _recorded_topology(
            self.run_dir / REDIS_CLUSTER_FILE, "Redis Cluster", "REDIS__CLUSTER_MASTERS"
        )
        if doc is None:
            return self
        update: dict[str, Any] = {"cluster_masters": int(doc.get("masters", 0))}
        for key in ("port", "cluster_ports", "cluster_node_timeout_ms"):
            if key not in given and key in doc:
                update[key] = doc[key]
        data = {**self.redis.model_dump(), **update, "cluster": []}
        self.redis = RedisSettings.model_validate(data)
        return self

    def dump(self) -> dict:
        """The settings as JSON data, secrets masked (``config show`` prints it)."""
        out = json.loads(self.model_dump_json())
        if out["redis"].get("password"):
            out["redis"]["password"] = "********"
        return out


# Triton's restricted-API header for the model-repository protocol: HTTP clients send it as
# is, gRPC clients with Triton's prefix (``triton_control_headers``).
TRITON_CONTROL_HEADER = "ctrstream-control-key"
TRITON_GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
TRITON_CONTROL_KEY_FILE = "triton-control.key"  # in the run directory, owner-only


def triton_control_key_file(settings: Settings) -> Path:
    return settings.run_dir / TRITON_CONTROL_KEY_FILE


def triton_control_key(settings: Settings) -> str | None:
    """The model-control key: ``settings.triton.control_key`` when set (compose, a remote
    Triton), else the one the local stack generated in its run directory; None when neither
    exists."""
    configured = settings.triton.control_key
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value()
    try:
        return triton_control_key_file(settings).read_text().strip() or None
    except FileNotFoundError:
        return None


def triton_control_headers(
    settings: Settings, protocol: Literal["grpc", "http"] = "grpc"
) -> dict[str, str]:
    """Headers that authorise Triton model control (empty when there is no key)."""
    key = triton_control_key(settings)
    if key is None:
        return {}
    prefix = TRITON_GRPC_HEADER_PREFIX if protocol == "grpc" else ""
    return {prefix + TRITON_CONTROL_HEADER: key}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
