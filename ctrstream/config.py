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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{self.db}"


class TritonSettings(BaseModel):
    model_config = ConfigDict(validate_default=True)

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
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

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

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
        path = self.run_dir / KAFKA_NODES_FILE
        try:
            doc = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return self
        except (OSError, ValueError) as e:
            raise ValueError(
                f"the local Kafka topology {path} cannot be read ({e}): remove it (`ctrstream "
                "stack down --purge` removes the stack's data) or set CTRSTREAM_KAFKA__BROKERS"
            ) from e
        update: dict[str, Any] = {"brokers": doc.get("brokers", 1)}
        for key in ("port", "controller_port", "more_ports"):  # what the settings leave open
            if key not in given and key in doc:
                update[key] = doc[key]
        self.kafka = KafkaSettings.model_validate({**self.kafka.model_dump(), **update})
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
