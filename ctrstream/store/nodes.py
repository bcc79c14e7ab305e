"""The servers behind a redis-py client, for the cold paths' bulk work: one Redis, or every
master of a Redis Cluster.

A single Redis is one server: a SCAN sees every key, one raw pipeline reaches every key. A
Redis Cluster spreads the keys over its masters by hash slot (CRC16 of the key's hash tag,
mod 16384): a SCAN sees only the keys of the node it is sent to, and a command reaches only
the keys of the slots its node serves. So the bulk readers and writers of the batch view,
the speed view and reconciliation go through this module:

* :func:`scan_masters` - SCAN on every master (each scanned to its end);
* :class:`NodePipelines` - pre-rendered commands grouped by the node that serves each key's
  slot (redis-py's slot map of the cluster client), one :class:`RespPipeline` per node.

Only single-key commands go through it: a multi-key command over keys of several slots is
refused by a cluster (``CROSSSLOT``), so these paths send one command per key. The hot
paths (the speed writer, the prediction reads) route by slot themselves
(:mod:`ctrstream.store.cluster`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ctrstream.store.resp import RespPipeline


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is redis-py's Redis Cluster client."""
    return hasattr(client, "get_primaries") and hasattr(client, "nodes_manager")


def refresh(client: Any) -> None:
    """Read a cluster's slot map again (redis-py keeps the one it read until a keyed command
    fails; after a failover its list of masters still names the dead one)."""
    if is_cluster(client):
        client.nodes_manager.initialize()


def master_clients(client: Any) -> list[Any]:
    """A plain redis-py client per master as the cluster says now (``[client]`` for a single
    Redis)."""
    if not is_cluster(client):
        return [client]
    refresh(client)
    return [client.get_redis_connection(node) for node in client.get_primaries()]


def scan_masters(client: Any, match: str, count: int) -> Iterator[bytes]:
    """Every key matching ``match`` on every master (SCAN, ``count`` keys asked per call)."""
    for node in master_clients(client):
        yield from node.scan_iter(match=match, count=count)


class NodePipelines:
    """Pre-rendered single-key commands sent to the node that serves each key.

    :meth:`add` queues a command for a key's node; :meth:`execute` sends every queue (one
    pipelined round trip per node) and returns the replies in the order the commands were
    added. With a single Redis every command goes to it. A cluster's slot map is redis-py's
    (refreshed and the round trip retried once when a node answers ``MOVED`` or cannot be
    reached: a slot moved, or a replica took over a dead master, since the map was read; the
    commands of that round trip are sent again, which the cold paths' absolute writes,
    deletes and reads allow)."""

    def __init__(self, client: Any, timeout: float = 60.0) -> None:
        self.client = client
        self.timeout = timeout
        self.cluster = is_cluster(client)
        self._pipes: dict[str, RespPipeline] = {}
        self._queued: list[tuple[bytes, bytes]] = []

    def node_of(self, key: bytes) -> str:
        """The name (``host:port``) of the node that serves ``key`` (``""``: the one Redis)."""
        if not self.cluster:
            return ""
        slot = self.client.keyslot(key)
        return str(self.client.nodes_manager.get_node_from_slot(slot).name)

    def _pipe(self, name: str) -> RespPipeline:
        pipe = self._pipes.get(name)
        if pipe is None:
            if self.cluster:
                node = self.client.get_node(node_name=name)
                target = self.client.get_redis_connection(node)
            else:
                target = self.client
            pipe = self._pipes[name] = RespPipeline.of_client(target, self.timeout)
        return pipe

    def add(self, key: bytes, command: bytes) -> None:
        """Queue ``command`` (rendered RESP) whose one key is ``key``."""
        self._queued.append((key, command))

    def add_many(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Queue ``(key, command)`` pairs as :meth:`add` does one."""
        self._queued.extend(pairs)

    def __len__(self) -> int:
        return len(self._queued)

    def execute(self, collect: bool = True) -> list[Any]:
        """Send every queued command and return their replies in order (``collect`` False:
        an empty list; error replies raise either way)."""
        return self.send(self.take(), collect)

    def take(self) -> list[tuple[bytes, bytes]]:
        """The queued ``(key, command)`` pairs, removed from the queue (for :meth:`send`:
        one thread may send them while another queues the next)."""
        queued, self._queued = self._queued, []
        return queued

    def send(
        self, queued: list[tuple[bytes, bytes]], collect: bool = True, one_line: bool = False
    ) -> list[Any]:
        """Send ``queued`` (from :meth:`take`) as :meth:`execute` sends the queue. Not
        concurrently with another send or execute: they share the connections.
        ``one_line`` (with ``collect`` False): every reply is one line (``HSET``...), counted
        in C rather than parsed (``RespPipeline.execute_raw``)."""
        if not queued:
            return []
        for attempt in (0, 1):
            try:
                return self._execute(queued, collect, one_line)
            except (RuntimeError, OSError) as e:
                moved = isinstance(e, OSError) or "MOVED" in str(e)
                if attempt or not self.cluster or not moved:
                    raise
                # a slot moved, or its node died and a replica took over: read the map again
                self.close()
                refresh(self.client)
        raise AssertionError("unreachable")

    def _execute(
        self, queued: list[tuple[bytes, bytes]], collect: bool, one_line: bool = False
    ) -> list[Any]:
        if not self.cluster:  # one server: one round trip, in order
            commands = [c for _, c in queued]
            pipe = self._pipe("")
            if collect:
                return pipe.execute_replies(commands)
            pipe.execute_raw(b"".join(commands), len(commands), one_line=one_line)
            return []
        by_node: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(queued):
            by_node.setdefault(self.node_of(key), []).append(i)
        replies: list[Any] = [None] * len(queued) if collect else []
        for name, idx in by_node.items():
            pipe = self._pipe(name)
            if collect:
                got = pipe.execute_replies([queued[i][1] for i in idx])
                for i, reply in zip(idx, got):
                    replies[i] = reply
            else:
                pipe.execute_raw(b"".join(queued[i][1] for i in idx), len(idx), one_line=one_line)
        return replies

    def close(self) -> None:
        for pipe in self._pipes.values():
            pipe.close()
        self._pipes.clear()

    def __enter__(self) -> NodePipelines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["NodePipelines", "is_cluster", "master_clients", "refresh", "scan_masters"]
