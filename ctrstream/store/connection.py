"""Connections to Redis: the one module that opens them.

Two kinds, by what the caller needs:

* :func:`redis_client` - a redis-py client (sync or asyncio) with socket timeouts, for
  everything that is not a measured hot path: metadata, pointer switches, calibration
  checkpoints, scans, tests.
* :class:`RespSocket` - a blocking TCP connection that speaks RESP itself: commands packed
  and replies parsed by hiredis (C), no redis-py objects per command. The speed view's
  pipelined writer, the bulk readers of reconciliation and the shared-entity cache's
  invalidation channel use it (redis-py spends ~30-40 us of Python per pipelined command;
  these paths send millions). The asyncio counterpart, the prediction API's script caller,
  is :class:`ctrstream.store.script.AsyncScript`.

Every raw connection opens with the same handshake, :func:`hello_commands` (``AUTH``,
``SELECT``), so it reaches the same database as the redis-py clients.
"""

from __future__ import annotations

import socket
from typing import Any

import hiredis

from ctrstream.config import RedisSettings, Settings


class RedisReplyError(RuntimeError):
    """Redis answered a command with an error reply."""


class RedisLoadingError(ConnectionError):
    """Redis is up but still loading its data set (``-LOADING``, after a restart from its
    append-only file): not an error of the command, try again shortly. A
    :class:`ConnectionError`, so that callers who retry on a lost connection retry it too."""


def reply_error(text: str) -> RuntimeError | RedisLoadingError:
    """The exception for an error reply ``text`` (without the leading ``-``)."""
    if text.startswith("LOADING"):
        return RedisLoadingError(f"redis is loading its data set: {text}")
    return RedisReplyError(text)


def hello_commands(
    password: str | None = None, db: int | None = 0, username: str | None = None
) -> list[tuple[Any, ...]]:
    """The commands that open a raw Redis connection (``AUTH``, ``SELECT``)."""
    out: list[tuple[Any, ...]] = []
    if password:
        out.append(("AUTH", username, password) if username else ("AUTH", password))
    if db:
        out.append(("SELECT", int(db)))
    return out


def pack(args: tuple[Any, ...] | list[Any]) -> bytes:
    """One command in RESP (hiredis' C packer; str, bytes and int arguments)."""
    return hiredis.pack_command(tuple(args))


def redis_client(
    settings: Settings,
    asyncio: bool = False,
    timeout_s: float = 1.0,
    connect_timeout_s: float | None = None,
) -> Any:
    """A redis-py client for ``settings.redis`` (sync or asyncio).

    With a Redis Cluster (``settings.redis.cluster``) it is redis-py's cluster client
    (``redis.cluster.RedisCluster``, or ``redis.asyncio.cluster.RedisCluster``): it learns
    the slot map from the seed nodes and sends each single-key command to the node that holds
    its slot (following ``MOVED`` and ``ASK``); a command over keys of several slots is
    refused, so the cold paths that use it work per key or per slot.

    ``timeout_s`` bounds each reply; ``connect_timeout_s`` (default: the same) bounds opening
    a connection, which on a loaded machine can take longer than a short reply deadline."""
    connect = timeout_s if connect_timeout_s is None else connect_timeout_s
    r = settings.redis
    if r.clustered:
        kwargs: dict[str, Any] = {
            "password": r.password,
            "socket_timeout": timeout_s,
            "socket_connect_timeout": connect,
        }
        if asyncio:
            from redis.asyncio.cluster import ClusterNode as AsyncNode
            from redis.asyncio.cluster import RedisCluster as AsyncCluster

            nodes = [AsyncNode(h, p) for h, p in r.seed_nodes()]
            return AsyncCluster(startup_nodes=nodes, **kwargs)
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in r.seed_nodes()], **kwargs)
    if asyncio:
        import redis.asyncio as aredis

        return aredis.Redis.from_url(
            settings.redis.url, socket_timeout=timeout_s, socket_connect_timeout=connect
        )
    import redis

    return redis.Redis.from_url(
        settings.redis.url, socket_timeout=timeout_s, socket_connect_timeout=connect
    )


class RespSocket:
    """A blocking RESP connection: connect, handshake, then :meth:`call` (one command, one
    reply) or raw :attr:`sock` / :attr:`reader` access for pipelined loops.

    ``host``, ``port``, ``password``, ``db``, ``username`` as redis-py's connection keyword
    arguments (:meth:`from_settings` builds them from the settings)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        password: str | None = None,
        db: int | None = 0,
        username: str | None = None,
        timeout: float = 30.0,
    ):
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        try:
            for args in hello_commands(password, db, username):
                self.call(*args)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings | RedisSettings, timeout: float = 30.0) -> RespSocket:
        rs = settings.redis if isinstance(settings, Settings) else settings
        return cls(rs.host, rs.port, rs.password, rs.db, timeout=timeout)

    @classmethod
    def from_kwargs(cls, kw: dict[str, Any], timeout: float = 5.0) -> RespSocket:
        """From a redis-py client's ``connection_pool.connection_kwargs``."""
        return cls(
            kw.get("host", "127.0.0.1"),
            int(kw.get("port", 6379)),
            kw.get("password"),
            kw.get("db"),
            kw.get("username"),
            timeout=timeout,
        )

    def send(self, *args: Any) -> None:
        self.sock.sendall(pack(args))

    def send_packed(self, data: bytes) -> None:
        """Send already packed commands (:func:`pack`)."""
        self.sock.sendall(data)

    def read_raw_reply(self) -> Any:
        """The next reply (blocking); an error reply is returned as a ``hiredis.ReplyError``
        (a cluster's redirects are answers to act on, not failures)."""
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.reader.feed(data)

    def read_reply(self) -> Any:
        """The next reply (blocking); an error reply raises :class:`RedisReplyError`."""
        reply = self.read_raw_reply()
        if isinstance(reply, hiredis.ReplyError):
            raise reply_error(str(reply))
        return reply

    def call(self, *args: Any) -> Any:
        """Send one command and return its reply."""
        self.send(*args)
        return self.read_reply()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
