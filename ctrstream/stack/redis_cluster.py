"""The local stack's Redis Cluster: N masters and N replicas of Debian's ``redis-server``.

``ctrstream stack up --redis-cluster N`` (``settings.redis.cluster_masters`` = N) runs 2N
nodes ``redis-1`` .. ``redis-<2N>`` on loopback ports (``RedisSettings.cluster_node_ports``:
each a client port and a cluster-bus port), each configured as the single Redis is
(:class:`ctrstream.stack.services.RedisService`: password in an owner-only config file,
``bind 127.0.0.1``, append-only file, its own directory, log and PID file) plus
``cluster-enabled yes``. The first start creates the cluster with ``redis-cli --cluster
create ... --cluster-replicas 1 --cluster-yes`` (N masters, a replica each, the 16384 slots
split evenly); later starts find each node's ``nodes.conf`` and the cluster re-forms by
itself. Ready means ``cluster_state:ok`` on every node, every slot assigned and every
replica's link to its master up. Stopping is by PID, as every service.

Two choices for the failure of a master (docs/redis-cluster.md):

* ``cluster-require-full-coverage no``: while a master is down (until its replica is
  promoted, about ``cluster_node_timeout_ms`` plus an election) the other masters keep
  serving their slots; only the dead master's slots refuse.
* ``masterauth``: replicas authenticate to their master with the same password.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ctrstream.config import REDIS_CLUSTER_FILE, Settings
from ctrstream.stack import provision
from ctrstream.stack.services import (
    Service,
    StackError,
    ensure_redis_password,
    redis_server_argv,
    wait_until,
    write_redis_config,
)

SLOTS = 16384


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One node as the cluster sees it (a line of ``CLUSTER NODES``)."""

    node_id: str
    address: str  # host:port
    role: str  # master | replica
    master_id: str | None  # a replica's master
    slots: str  # "0-5460" (masters), "" otherwise
    connected: bool
    failed: bool


class RedisClusterNode(Service):
    """Node ``index`` (from 1) of the local Redis Cluster; ``redis-<index>``."""

    start_timeout = 20.0

    def __init__(self, settings: Settings, index: int):
        super().__init__(f"redis-{index}", settings)
        self.index = index
        self.port, self.bus_port = settings.redis.cluster_node_ports()[index - 1]

    def ports(self) -> list[int]:
        return [self.port, self.bus_port]

    def address(self) -> str:
        return f"{self.settings.redis.host}:{self.port}"

    def _config_path(self) -> Path:
        return self.dir / "redis.conf"

    def prepare(self) -> None:
        write_redis_config(
            self._config_path(), ensure_redis_password(self.settings), replica_auth=True
        )

    def command(self) -> tuple[list[str], dict[str, str]]:
        r = self.settings.redis
        cluster = [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            str(self.bus_port),
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(r.cluster_node_timeout_ms),
            "--cluster-require-full-coverage",
            "no",
        ]
        return redis_server_argv(
            self.settings, self._config_path(), self.port, self.dir, cluster
        ), {}

    def client(self, timeout_s: float = 1.0):  # -> redis.Redis
        """A plain (not cluster-aware) redis-py client of this one node."""
        import redis

        r = self.settings.redis
        return redis.Redis(
            host=r.host,
            port=self.port,
            password=r.password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )

    def ready(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        finally:
            client.close()

    def cluster_info(self) -> dict[str, str]:
        """This node's ``CLUSTER INFO`` as a dict of strings."""
        client = self.client()
        try:
            text = client.execute_command("CLUSTER", "INFO")
        finally:
            client.close()
        if isinstance(text, bytes):
            text = text.decode()
        if isinstance(text, dict):  # redis-py may parse it already
            return {str(k): str(v) for k, v in text.items()}
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def cluster_nodes(self) -> list[ClusterNodeInfo]:
        """The cluster's nodes as this node sees them (``CLUSTER NODES``)."""
        client = self.client()
        try:
            raw = client.execute_command("CLUSTER", "NODES")
        finally:
            client.close()
        return parse_cluster_nodes(raw)

    def describe(self) -> str:
        """Role and slots, e.g. ``master 0-5460`` or ``replica of 127.0.0.1:7001``; what is
        known of an unreachable node is asked of the others by :func:`cluster_roles`."""
        try:
            nodes = self.cluster_nodes()
        except Exception:  # noqa: BLE001 - a status line answers, never raises
            return "unreachable"
        return roles_by_address(nodes).get(self.address(), "not in the cluster")


def parse_cluster_nodes(raw: object) -> list[ClusterNodeInfo]:
    """``CLUSTER NODES`` (text, or the dict redis-py parses it into) as records."""
    if isinstance(raw, bytes):
        raw = raw.decode()
    if isinstance(raw, dict):  # redis-py: {"host:port": {...}}; re-ask as text is simpler
        lines = []
        for addr, d in raw.items():
            flags = d.get("flags", "")
            slots = " ".join("-".join(s) if len(s) > 1 else s[0] for s in d.get("slots", []))
            lines.append(
                f"{d.get('node_id')} {addr}@0 {flags} {d.get('master_id', '-')} 0 0 0 "
                f"{'connected' if d.get('connected') else 'disconnected'} {slots}"
            )
        raw = "\n".join(lines)
    out = []
    for line in str(raw).splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node_id, addr, flags, master = parts[0], parts[1], parts[2].split(","), parts[3]
        address = addr.split("@", 1)[0]
        role = "master" if "master" in flags else ("replica" if "slave" in flags else "?")
        out.append(
            ClusterNodeInfo(
                node_id=node_id,
                address=address,
                role=role,
                master_id=None if master == "-" else master,
                slots=" ".join(p for p in parts[8:] if not p.startswith("[")),
                connected=parts[7] == "connected" or "myself" in flags,
                failed="fail" in flags or "fail?" in flags,
            )
        )
    return out


def roles_by_address(nodes: list[ClusterNodeInfo]) -> dict[str, str]:
    """``host:port`` -> ``master <slots>`` / ``replica of <master host:port>`` (``, failed``
    when the cluster marks it so)."""
    by_id = {n.node_id: n for n in nodes}
    out = {}
    for n in nodes:
        if n.role == "master":
            text = f"master {n.slots or '(no slots)'}"
        elif n.role == "replica":
            m = by_id.get(n.master_id or "")
            text = f"replica of {m.address if m else n.master_id}"
        else:
            text = n.role
        out[n.address] = text + (", failed" if n.failed else "")
    return out


def cluster_nodes_services(settings: Settings) -> list[RedisClusterNode]:
    """One :class:`RedisClusterNode` per node of ``settings.redis``' local cluster."""
    return [
        RedisClusterNode(settings, i + 1) for i in range(len(settings.redis.cluster_node_ports()))
    ]


def _redis_cli(settings: Settings, *args: str, timeout: float = 60.0) -> str:
    """Run ``redis-cli`` with the password in its environment (never on its command line,
    where every user's ``ps`` would show it); its output, or a :class:`StackError`."""
    cli = str(Path(provision.redis_server()).with_name("redis-cli"))
    env = {**os.environ}
    if settings.redis.password:
        env["REDISCLI_AUTH"] = settings.redis.password
    res = subprocess.run(
        [cli, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if res.returncode != 0:
        raise StackError(f"redis-cli {' '.join(args[:2])} failed:\n{res.stdout}{res.stderr}")
    return res.stdout


def cluster_created(nodes: list[RedisClusterNode]) -> bool:
    """Whether these nodes already form a cluster (any node knows another or holds slots)."""
    for node in nodes:
        info = node.cluster_info()
        if int(info.get("cluster_known_nodes", "1")) > 1 or int(
            info.get("cluster_slots_assigned", "0")
        ):
            return True
    return False


def create_cluster(settings: Settings, nodes: list[RedisClusterNode]) -> None:
    """``redis-cli --cluster create`` over ``nodes`` (masters first), one replica each."""
    addrs = [n.address() for n in nodes]
    _redis_cli(settings, "--cluster", "create", *addrs, "--cluster-replicas", "1", "--cluster-yes")


def cluster_ok(nodes: list[RedisClusterNode]) -> bool:
    """Every node says ``cluster_state:ok``, knows every node and sees every slot assigned,
    and every replica's link to its master is up."""
    for node in nodes:
        info = node.cluster_info()
        if info.get("cluster_state") != "ok":
            return False
        if int(info.get("cluster_slots_assigned", "0")) != SLOTS:
            return False
        if int(info.get("cluster_known_nodes", "0")) != len(nodes):
            return False
    for node in nodes:
        client = node.client()
        try:
            repl = client.info("replication")
        finally:
            client.close()
        if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
            return False
    return True


def ensure_cluster(
    settings: Settings, nodes: list[RedisClusterNode], timeout: float = 60.0
) -> bool:
    """Create the cluster over freshly started ``nodes`` unless they form one already, then
    wait until :func:`cluster_ok`. Returns whether it was created here."""
    created = False
    if not cluster_created(nodes):
        create_cluster(settings, nodes)
        created = True
    try:
        wait_until(lambda: cluster_ok(nodes), timeout, 0.1, what="the Redis Cluster to be ok")
    except TimeoutError as e:
        states = []
        for n in nodes:
            try:
                states.append(f"{n.name} {n.cluster_info().get('cluster_state')}")
            except Exception as ex:  # noqa: BLE001 - part of an error message
                states.append(f"{n.name} unreachable ({ex})")
        raise StackError(
            f"{e}: {', '.join(states)}. The nodes' logs are in {settings.run_dir / 'logs'}; "
            "`ctrstream stack down --purge` removes a cluster that cannot re-form"
        ) from None
    return created


def cluster_roles(nodes: list[RedisClusterNode]) -> dict[str, str]:
    """Each node's role and slots (``redis-1`` -> ``master 0-5460``), asked of the first
    node that answers (so a dead node's role is still known); empty when none answers."""
    for node in nodes:
        try:
            known = roles_by_address(node.cluster_nodes())
        except Exception:  # noqa: BLE001 - try the next node
            continue
        return {n.name: known.get(n.address(), "not in the cluster") for n in nodes}
    return {}


def masters(nodes: list[RedisClusterNode]) -> list[RedisClusterNode]:
    """The nodes that are masters now (failovers move the role), by the first node that
    answers."""
    for node in nodes:
        try:
            known = node.cluster_nodes()
        except Exception:  # noqa: BLE001 - try the next node
            continue
        addrs = {n.address for n in known if n.role == "master" and not n.failed and n.slots}
        return [n for n in nodes if n.address() in addrs]
    return []


def check_redis_topology(settings: Settings) -> None:
    """Refuse to start a Redis topology other than the one whose data is in the run
    directory: a cluster node's ``nodes.conf`` names its peers, and a single Redis's data
    would not be seen by a cluster (nor a cluster's by a single Redis)."""
    path = settings.run_dir / REDIS_CLUSTER_FILE
    single = settings.run_dir / "redis"
    first = settings.run_dir / "redis-1"
    try:
        recorded: int | None = int(json.loads(path.read_text()).get("masters", 0))
    except (FileNotFoundError, ValueError):
        recorded = 0 if single.exists() else (None if not first.exists() else -1)
    wanted = settings.redis.cluster_masters
    if recorded is None or recorded == wanted:
        return
    have = (
        "one Redis"
        if recorded == 0
        else (f"a {recorded}-master Redis Cluster" if recorded > 0 else "a Redis Cluster")
    )
    want = "one Redis" if wanted == 0 else f"a {wanted}-master Redis Cluster"
    hint = f"with --redis-cluster {recorded}" if recorded > 0 else "with --redis-cluster 0"
    raise StackError(
        f"the stack in {settings.run_dir} holds the data of {have}, not {want}: start it "
        f"{hint}, or delete its data first with `ctrstream stack down --purge`"
    )


def record_redis_topology(settings: Settings) -> None:
    """Write the started Redis topology into the run directory (``REDIS_CLUSTER_FILE``), so
    that later commands there find every node without being told."""
    r = settings.redis
    doc = {
        "masters": r.cluster_masters,
        "port": r.port,
        "cluster_ports": [list(p) for p in r.cluster_node_ports()],
        "cluster_node_timeout_ms": r.cluster_node_timeout_ms,
    }
    path = settings.run_dir / REDIS_CLUSTER_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def wait_failover(
    nodes: list[RedisClusterNode], dead: RedisClusterNode, timeout: float = 30.0
) -> float:
    """Wait until the slots of ``dead`` (a master that was killed) are served by a promoted
    replica and the cluster is ok again on every live node; the seconds it took."""
    t0 = time.monotonic()
    live = [n for n in nodes if n is not dead]

    def promoted() -> bool:
        for node in live:
            info = node.cluster_info()
            if info.get("cluster_state") != "ok":
                return False
        return len(masters(live)) == len(nodes) // 2

    wait_until(promoted, timeout, 0.05, what=f"a replica of {dead.name} to take over its slots")
    return time.monotonic() - t0


__all__ = [
    "ClusterNodeInfo",
    "RedisClusterNode",
    "check_redis_topology",
    "cluster_nodes_services",
    "cluster_ok",
    "cluster_roles",
    "ensure_cluster",
    "masters",
    "parse_cluster_nodes",
    "record_redis_topology",
    "wait_failover",
]
