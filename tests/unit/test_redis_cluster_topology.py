"""The local Redis Cluster's topology in the settings (``--redis-cluster N``), its nodes'
command lines, the run directory's record and refusal of another topology, and the parsing
of ``CLUSTER NODES``; no servers."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ctrstream.config import REDIS_CLUSTER_FILE, RedisSettings, Settings
from ctrstream.stack.manager import Stack, isolated_redis_settings, settings_env
from ctrstream.stack.redis_cluster import (
    RedisClusterNode,
    check_redis_topology,
    parse_cluster_nodes,
    record_redis_topology,
    roles_by_address,
)
from ctrstream.stack.services import RedisService, StackError
from ctrstream.store.connection import redis_client


def test_one_redis_is_the_default_and_unchanged(tmp_path):
    r = RedisSettings()
    assert not r.clustered and r.cluster == [] and r.cluster_masters == 0
    services = Stack(Settings(_env_file=None, run_dir=tmp_path)).services
    assert [s.name for s in services if s.group == "redis"] == ["redis"]
    assert isinstance(next(s for s in services if s.group == "redis"), RedisService)
    client = redis_client(Settings(_env_file=None, run_dir=tmp_path))
    assert type(client).__name__ == "Redis"


def test_three_masters_consecutive_ports_every_node_a_seed(tmp_path):
    r = RedisSettings(port=7000, cluster_masters=3)
    assert r.cluster_node_ports() == [(7000 + i, 17000 + i) for i in range(6)]
    assert r.cluster == [f"127.0.0.1:{7000 + i}" for i in range(6)] and r.clustered
    assert r.seed_nodes()[0] == ("127.0.0.1", 7000)
    s = Settings(_env_file=None, run_dir=tmp_path, redis=r)
    nodes = [svc for svc in Stack(s).services if svc.group == "redis"]
    assert [n.name for n in nodes] == [f"redis-{i}" for i in range(1, 7)]
    assert nodes[4].ports() == [7004, 17004]


def test_cluster_node_command_line(tmp_path):
    r = RedisSettings(port=7000, cluster_masters=3, cluster_node_timeout_ms=1500)
    node = RedisClusterNode(Settings(_env_file=None, run_dir=tmp_path, redis=r), 2)
    argv, _ = node.command()
    opts = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert opts["--port"] == "7001" and opts["--cluster-port"] == "17001"
    assert opts["--cluster-enabled"] == "yes" and opts["--cluster-node-timeout"] == "1500"
    assert opts["--cluster-require-full-coverage"] == "no"
    assert opts["--bind"] == "127.0.0.1" and opts["--dir"] == str(tmp_path / "redis-2")
    assert not any("pass" in a for a in argv)  # the password is in the config file only


def test_cluster_node_config_file_holds_the_password_owner_only(tmp_path):
    r = RedisSettings(port=7000, cluster_masters=3, password='s3cr"et')
    node = RedisClusterNode(Settings(_env_file=None, run_dir=tmp_path, redis=r), 1)
    node.dir.mkdir(parents=True)
    node.prepare()
    path = node.dir / "redis.conf"
    text = path.read_text()
    assert 'requirepass "s3cr\\"et"' in text and 'masterauth "s3cr\\"et"' in text
    assert path.stat().st_mode & 0o777 == 0o600


def test_seed_nodes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CTRSTREAM_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("CTRSTREAM_REDIS__CLUSTER", "10.0.0.1:7000, 10.0.0.2:7001")
    s = Settings(_env_file=None)
    assert s.redis.seed_nodes() == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert s.redis.cluster_masters == 0  # a remote cluster: the stack starts no node
    monkeypatch.setenv("CTRSTREAM_REDIS__CLUSTER", '["10.0.0.3:7002"]')
    assert Settings(_env_file=None).redis.cluster == ["10.0.0.3:7002"]


@pytest.mark.parametrize(
    "bad, says",
    [
        ({"cluster": ["nohostport"]}, "is not host:port"),
        ({"cluster": "[not json"}, "is not a JSON list"),
        ({"cluster_masters": 3, "cluster_ports": [[1, 2]]}, "lists 1 nodes' ports"),
        (
            {"cluster_masters": 3, "cluster_ports": [[7000 + i, 7001 + i] for i in range(6)]},
            "overlap",
        ),
        ({"cluster_masters": 3, "db": 1}, "database 0 only"),
        ({"cluster_masters": 2}, "at least 3 masters"),
    ],
)
def test_bad_cluster_settings_say_what_to_do(bad, says):
    with pytest.raises(ValidationError, match=says):
        RedisSettings.model_validate(bad)


def test_with_cluster_recomputes_local_seeds_and_keeps_remote_ones():
    r = RedisSettings(port=7000, cluster_masters=3)
    assert r.with_cluster(4).cluster == [f"127.0.0.1:{7000 + i}" for i in range(8)]
    assert r.with_cluster(0).cluster == [] and not r.with_cluster(0).clustered
    remote = RedisSettings(cluster=["10.0.0.1:7000"])
    assert remote.with_cluster(0).cluster == ["10.0.0.1:7000"]


def test_topology_recorded_and_read_back_by_later_commands(tmp_path):
    r = isolated_redis_settings(masters=3)
    s = Settings(_env_file=None, run_dir=tmp_path, redis=r)
    record_redis_topology(s)
    doc = json.loads((tmp_path / REDIS_CLUSTER_FILE).read_text())
    assert doc["masters"] == 3 and len(doc["cluster_ports"]) == 6
    later = Settings(_env_file=None, run_dir=tmp_path)  # no Redis topology given
    assert later.redis.cluster_masters == 3
    assert later.redis.cluster_node_ports() == r.cluster_node_ports()
    assert later.redis.cluster == r.cluster
    # a child process given settings_env sees the same cluster
    env = settings_env(s)
    assert env["CTRSTREAM_REDIS__CLUSTER_MASTERS"] == "3"
    assert env["CTRSTREAM_REDIS__CLUSTER"] == ",".join(r.cluster)


def test_another_topology_over_existing_data_is_refused(tmp_path):
    s3 = Settings(_env_file=None, run_dir=tmp_path, redis=RedisSettings(cluster_masters=3))
    check_redis_topology(s3)  # nothing there yet
    (tmp_path / "redis-1").mkdir()
    record_redis_topology(s3)
    check_redis_topology(s3)
    s2 = Settings(_env_file=None, run_dir=tmp_path, redis=RedisSettings(cluster_masters=4))
    with pytest.raises(StackError, match="3-master Redis Cluster, not a 4-master.*--purge"):
        check_redis_topology(s2)
    one = Settings(_env_file=None, run_dir=tmp_path, redis=RedisSettings(cluster_masters=0))
    with pytest.raises(StackError, match="not one Redis: start it with --redis-cluster 3"):
        check_redis_topology(one)
    single = tmp_path / "single"
    (single / "redis").mkdir(parents=True)
    s = Settings(_env_file=None, run_dir=single, redis=RedisSettings(cluster_masters=3))
    with pytest.raises(StackError, match="holds the data of one Redis.*--redis-cluster 0"):
        check_redis_topology(s)


NODES = """\
aaa 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
bbb 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922
ccc 127.0.0.1:7002@17002 master,fail - 0 0 3 disconnected 10923-16383
ddd 127.0.0.1:7003@17003 slave aaa 0 0 1 connected
eee 127.0.0.1:7004@17004 slave bbb 0 0 2 connected
"""


def test_cluster_nodes_parsed_into_roles_and_slots():
    nodes = parse_cluster_nodes(NODES.encode())
    assert [n.role for n in nodes] == ["master"] * 3 + ["replica"] * 2
    assert nodes[2].failed and not nodes[2].connected and nodes[0].connected
    roles = roles_by_address(nodes)
    assert roles["127.0.0.1:7000"] == "master 0-5460"
    assert roles["127.0.0.1:7002"] == "master 10923-16383, failed"
    assert roles["127.0.0.1:7003"] == "replica of 127.0.0.1:7000"
