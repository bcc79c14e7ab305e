"""A real Redis Cluster (``ctrstream stack up --redis-cluster N``, or
:func:`ctrstream.stack.manager.isolated_redis_cluster`): 3 masters and 3 replicas of
Debian's ``redis-server`` on free loopback ports, the cold paths on it (batch view,
calibration, reconcile, scans), and ``kill -9`` of a master.

The module starts its own cluster under a temporary directory and stops it by PID; the
session's stack is not used (no Kafka or Triton is started by these tests, except the
failover test's replay).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrstream.config import REDIS_CLUSTER_FILE, Settings
from ctrstream.stack.manager import Stack, isolated_redis_cluster, settings_env
from ctrstream.stack.redis_cluster import cluster_ok, cluster_roles, masters
from ctrstream.stack.services import free_port, pid_alive
from ctrstream.store.connection import redis_client

MASTERS = 3
CTRSTREAM = str(Path(sys.executable).with_name("ctrstream"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Settings]:
    with isolated_redis_cluster(tmp_path_factory.mktemp("rc"), masters=MASTERS) as s:
        yield s


def test_isolated_cluster_three_masters_three_replicas_every_slot(cluster):
    nodes = Stack(cluster).cluster_nodes()
    assert len(nodes) == 2 * MASTERS and cluster_ok(nodes)
    roles = cluster_roles(nodes)
    assert sorted(r.split()[0] for r in roles.values()) == ["master"] * 3 + ["replica"] * 3
    assert len(masters(nodes)) == MASTERS
    client = redis_client(cluster)
    try:
        assert type(client).__name__ == "RedisCluster"
        keys = [f"test:k{i}" for i in range(300)]
        for i, k in enumerate(keys):
            client.set(k, i)
        # the keys landed on every master, each holds only its own slots
        per_node = [n.client().dbsize() for n in masters(nodes)]
        assert all(c > 0 for c in per_node) and sum(per_node) == len(keys)
        assert [int(client.get(k)) for k in keys] == list(range(300))
    finally:
        client.close()


def _cli(args: list[str], env: dict[str, str], timeout: float = 120):
    return subprocess.run(
        [CTRSTREAM, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_stack_up_redis_cluster_status_down_and_refusal(tmp_path):
    """``stack up --only redis --redis-cluster 3`` records the topology, ``stack status``
    shows each node's role and slots without being told, ``stack down`` stops every node by
    PID, another topology over its data is refused, and a restart re-forms the cluster."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTRSTREAM_")}
    env |= {
        "CTRSTREAM_RUN_DIR": str(tmp_path / "stack"),
        "CTRSTREAM_CACHE_DIR": os.environ.get("CTRSTREAM_CACHE_DIR", ".cache"),
        "COLUMNS": "250",
    }
    # six client ports and six bus ports that are free now
    pairs = [(port, free_port())] + [(free_port(), free_port()) for _ in range(5)]
    env["CTRSTREAM_REDIS__CLUSTER_PORTS"] = str([list(p) for p in pairs])
    env["CTRSTREAM_REDIS__PORT"] = str(port)
    up = _cli(["stack", "up", "--only", "redis", "--redis-cluster", "3"], env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "redis cluster created: 3 masters" in up.stdout
        assert (tmp_path / "stack" / REDIS_CLUSTER_FILE).exists()
        del env["CTRSTREAM_REDIS__CLUSTER_PORTS"]  # the run directory's record has them
        st = _cli(["stack", "status"], env)
        lines = [ln for ln in st.stdout.splitlines() if "redis-" in ln]
        assert len(lines) == 6, st.stdout
        assert sum(" master " in ln for ln in lines) == 3
        assert sum("replica of" in ln for ln in lines) == 3
        for slots in ("0-5460", "5461-10922", "10923-16383"):
            assert any(slots in ln for ln in lines), st.stdout
        refused = _cli(["stack", "up", "--only", "redis", "--redis-cluster", "4"], env)
        assert refused.returncode != 0
        assert "3-master Redis Cluster, not a 4-master" in refused.stdout + refused.stderr
        s = Settings(_env_file=None, run_dir=tmp_path / "stack")
        pids = [n.pid() for n in Stack(s).cluster_nodes()]
        assert len(pids) == 6 and all(pids)
    finally:
        down = _cli(["stack", "down"], env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(pid_alive(p) for p in pids)
    again = _cli(["stack", "up", "--only", "redis"], env)  # the same cluster re-forms
    try:
        assert again.returncode == 0, again.stdout + again.stderr
        assert "created" not in again.stdout and "master 0-5460" in again.stdout
    finally:
        _cli(["stack", "down", "--purge"], env)


def test_settings_env_gives_a_child_the_cluster(cluster):
    env = {**os.environ, **settings_env(cluster)}
    code = (
        "from ctrstream.config import Settings; from ctrstream.store.connection import "
        "redis_client; c = redis_client(Settings()); print(type(c).__name__, c.ping())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.split() == ["RedisCluster", "True"], out.stderr
