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
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _absolute(path: Path | str) -> Path:
    """``path`` with ``~`` expanded, relative to the current directory when relative."""
    return Path(path).expanduser().absolute()


class Topic(BaseModel):
    name: str
    partitions: int = Field(ge=1)


class Topics(BaseModel):
    impressions: Topic = Topic(name="impressions", partitions=4)
    clicks: Topic = Topic(name="clicks", partitions=4)
    labeled: Topic = Topic(name="labeled", partitions=4)
    predictions: Topic = Topic(name="predictions", partitions=4)
    dlq: Topic = Topic(name="dlq", partitions=1)

    def all(self) -> list[Topic]:
        return [self.impressions, self.clicks, self.labeled, self.predictions, self.dlq]


class KafkaSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9093
    heap: str = "768m"
    # bootstrap servers for clients; when empty, host:port of the local broker
    bootstrap: str = ""

    @property
    def bootstrap_servers(self) -> str:
        return self.bootstrap or f"{self.host}:{self.port}"


class RedisSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 6379
    password: str | None = None
    db: int = 0

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

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    triton: TritonSettings = TritonSettings()
    topics: Topics = Topics()

    # speed layer
    allowed_lateness_s: float = 60.0
    flush_interval_ms: int = 300
    attribution_window_s: float = 1800.0
    redis_ttl_s: int = 3 * 24 * 3600

    # metrics ports of long-running processes (0 disables) and the address they bind:
    # loopback locally, 0.0.0.0 in containers (Prometheus scrapes them over the network)
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"

    def dump(self) -> dict:
        return json.loads(self.model_dump_json())


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
