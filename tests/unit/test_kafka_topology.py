"""The local Kafka's topology in the settings (``--kafka-brokers N``), the brokers'
replication settings, and the co-partitioning check of impressions and clicks; no servers."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import ValidationError

from ctrstream.config import KAFKA_NODES_FILE, KafkaSettings, Settings
from ctrstream.kafka.clients import CopartitioningError, check_copartitioned, producer_config
from ctrstream.stack.manager import (
    Stack,
    check_kafka_topology,
    isolated_settings,
    record_kafka_topology,
    settings_env,
)
from ctrstream.stack.services import KafkaService, StackError


def test_one_broker_is_the_default_and_unchanged(tmp_path):
    k = KafkaSettings()
    assert k.brokers == 1 and k.bootstrap_servers == "127.0.0.1:9092"
    assert (k.replication_factor, k.min_insync_replicas) == (1, 1)
    svc = KafkaService(Settings(_env_file=None, run_dir=tmp_path, kafka=k))
    assert svc.name == "kafka" and svc.ports() == [9092, 9093]
    props = svc.replication_props()
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert "default.replication.factor" not in props and "min.insync.replicas" not in props


def test_three_brokers_consecutive_ports_every_broker_bootstraps(tmp_path):
    k = KafkaSettings(brokers=3)
    assert [(n.node_id, n.port, n.controller_port) for n in k.nodes()] == [
        (1, 9092, 9093),
        (2, 9094, 9095),
        (3, 9096, 9097),
    ]
    assert k.bootstrap_servers == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    assert (k.replication_factor, k.min_insync_replicas) == (3, 2)
    assert KafkaSettings(brokers=5).replication_factor == 3
    assert KafkaSettings(brokers=2).min_insync_replicas == 1
    s = Settings(_env_file=None, run_dir=tmp_path, kafka=k)
    nodes = [svc for svc in Stack(s).services if svc.group == "kafka"]
    assert [n.name for n in nodes] == ["kafka-1", "kafka-2", "kafka-3"]
    assert {svc.pid_file.name for svc in nodes} == {"kafka-1.pid", "kafka-2.pid", "kafka-3.pid"}
    assert len({svc.dir for svc in nodes}) == 3
    assert nodes[2].address() == "127.0.0.1:9096"
    assert Stack(s).by_name("kafka").name == "kafka-1"
    props = nodes[1].replication_props()
    assert props == {
        "offsets.topic.replication.factor": "3",
        "transaction.state.log.replication.factor": "3",
        "transaction.state.log.min.isr": "2",
        "share.coordinator.state.topic.replication.factor": "3",
        "share.coordinator.state.topic.min.isr": "2",
        "default.replication.factor": "3",
        "min.insync.replicas": "2",
    }


def test_producers_write_to_every_in_sync_replica_once(tmp_path):
    conf = producer_config(
        Settings(_env_file=None, run_dir=tmp_path, kafka=KafkaSettings(brokers=3))
    )
    assert conf["acks"] == "all" and conf["enable.idempotence"] is True


def test_bad_topologies_say_what_to_do():
    with pytest.raises(ValidationError, match="CTRSTREAM_KAFKA__MORE_PORTS"):
        KafkaSettings(brokers=3, more_ports=[(20000, 20001)])
    with pytest.raises(ValidationError, match="overlap"):
        KafkaSettings(brokers=2, port=9092, controller_port=9094)
    with pytest.raises(ValidationError):
        KafkaSettings(brokers=0)


def test_the_run_directory_records_the_topology(tmp_path, monkeypatch):
    """`stack up` records what it started; a command in the same run directory that sets
    no topology sees every broker; one that sets it keeps its own."""
    for k in [k for k in os.environ if k.startswith("CTRSTREAM_KAFKA__")]:
        monkeypatch.delenv(k)
    s = isolated_settings(tmp_path, kafka_brokers=3)
    record_kafka_topology(s)
    doc = json.loads((tmp_path / KAFKA_NODES_FILE).read_text())
    assert doc["brokers"] == 3 and len(doc["more_ports"]) == 2
    seen = Settings(_env_file=None, run_dir=tmp_path)
    assert seen.kafka.bootstrap_servers == s.kafka.bootstrap_servers
    monkeypatch.setenv("CTRSTREAM_KAFKA__BROKERS", "1")
    assert Settings(_env_file=None, run_dir=tmp_path).kafka.brokers == 1
    # the environment a child process gets says the topology itself
    env = settings_env(s)
    assert env["CTRSTREAM_KAFKA__BROKERS"] == "3"
    assert json.loads(env["CTRSTREAM_KAFKA__MORE_PORTS"]) == [list(p) for p in doc["more_ports"]]


def test_another_topology_over_existing_data_is_refused(tmp_path):
    s = isolated_settings(tmp_path, kafka_brokers=3)
    record_kafka_topology(s)
    check_kafka_topology(s)  # no data yet: anything goes
    (tmp_path / "kafka-1" / "data").mkdir(parents=True)
    check_kafka_topology(s)  # the same topology
    one = s.model_copy(update={"kafka": s.kafka.model_copy(update={"brokers": 1})})
    with pytest.raises(StackError, match="3-broker Kafka.*--kafka-brokers 3.*--purge"):
        check_kafka_topology(one)


def test_a_single_broker_run_directory_without_a_record_is_one_broker(tmp_path):
    """A run directory whose one broker's data predates the record is a 1-broker Kafka."""
    (tmp_path / "kafka" / "data").mkdir(parents=True)
    check_kafka_topology(isolated_settings(tmp_path))
    with pytest.raises(StackError, match="1-broker Kafka"):
        check_kafka_topology(isolated_settings(tmp_path, kafka_brokers=3))


def test_impressions_and_clicks_must_be_copartitioned(tmp_path):
    s = Settings(_env_file=None, run_dir=tmp_path)
    check_copartitioned(s, {"impressions": 4, "clicks": 4, "labeled": 2})
    with pytest.raises(CopartitioningError) as e:
        check_copartitioned(s, {"impressions": 8, "clicks": 4})
    assert "topic impressions has 8 partitions and clicks 4" in str(e.value)
    assert "docs/kafka.md" in str(e.value)
    t = s.topics
    eight = s.model_copy(
        update={
            "topics": t.model_copy(update={"clicks": t.clicks.model_copy(update={"partitions": 8})})
        }
    )
    with pytest.raises(CopartitioningError, match="impressions 4 partitions and clicks 8"):
        check_copartitioned(eight)
