"""The read script (``read.lua``, package data) and the two ways it is called.

* Sync callers (batch jobs, the streaming scorer, the ad server, tests) call it with
  :class:`SyncScript`: ``EVALSHA`` over one blocking connection, packed and parsed by hiredis
  in C. redis-py's ``Script`` (``client.register_script(READ_SCRIPT)``, kept for unix sockets
  and TLS) encodes every key in Python: for a read of tens of thousands of keys (a micro-batch
  of the ad server) that was most of the read's time.
* The prediction API calls it with :class:`AsyncScript`: ``EVALSHA`` over one pipelined
  asyncio connection, packed and parsed by hiredis in C - the API's hot path. redis-py's
  asyncio client spends ~0.3 ms of Python per call on its connection pool, retry wrapper
  and argument conversion (``docs/api.md``); this is one ``transport.write`` and one future.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import deque
from importlib import resources
from typing import Any

import hiredis

from ctrstream.store.connection import RedisReplyError, RespSocket, hello_commands

READ_SCRIPT = resources.files("ctrstream.store").joinpath("read.lua").read_text()

# The read script's Redis Cluster form: one call per node, every key it reads served by that
# node, in several slots. Redis routes a script by its declared KEYS and refuses declared
# KEYS of several slots (CROSSSLOT), so the call declares ONE key (a key of that node: it
# routes the call, and a moved slot answers MOVED) and hands the script's KEYS in ARGV; the
# ``allow-cross-slot-keys`` flag (Redis 7) lets it read keys of other slots of the node. The
# body is read.lua unchanged, with KEYS and ARGV rebound. The batch-view pointer lives on
# one node: the call there checks it (check = 1); on the other nodes (check = 0) the
# script's read of the pointer answers the expected value, and the caller reads the pointer
# on its node in the same round (ctrstream.store.reader).
#   KEYS[1]  the routing key      ARGV  n, n keys (read.lua's KEYS), check, read.lua's ARGV
CLUSTER_READ_SCRIPT = (
    "#!lua flags=allow-cross-slot-keys,no-writes\n"
    "local n = tonumber(ARGV[1])\n"
    "local K, A = {}, {}\n"
    "for i = 1, n do K[i] = ARGV[i + 1] end\n"
    "local check = ARGV[n + 2] == '1'\n"
    "for i = n + 3, #ARGV do A[#A + 1] = ARGV[i] end\n"
    "local R = redis\n"
    "if not check then\n"
    "  local real, pkey, expect = redis, K[1], A[2]\n"
    "  R = setmetatable({call = function(cmd, key, ...)\n"
    "    if key == pkey then return expect end\n"
    "    return real.call(cmd, key, ...)\n"
    "  end}, {__index = real})\n"
    "end\n"
    "local function body(KEYS, ARGV, redis)\n" + READ_SCRIPT + "\nend\n"
    "return body(K, A, R)\n"
)


CLUSTER_READ_SHA = hashlib.sha1(CLUSTER_READ_SCRIPT.encode()).hexdigest()


def cluster_call_args(keys: list[Any], args: list[Any], check: bool) -> tuple[list[Any], list[Any]]:
    """``(KEYS, ARGV)`` of :data:`CLUSTER_READ_SCRIPT` for one node's call of the read script
    with ``keys`` / ``args`` (``keys[0]`` the pointer; ``check``: the pointer is served by
    this node). The routing key is the pointer when checked here, else the first entity key."""
    route = keys[0] if check or len(keys) < 2 else keys[1]
    return [route], [len(keys), *keys, "1" if check else "0", *args]


class _RespProtocol(asyncio.Protocol):
    """One pipelined Redis connection: replies are matched to waiting calls in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # any event loop's transport
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            fut = self.waiters.popleft()
            if not fut.done():  # a caller that timed out has gone: its reply is dropped
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = ConnectionError(f"redis connection lost: {exc or 'closed'}")
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(self.lost)


class AsyncScript:
    """``EVALSHA`` of a script over one pipelined asyncio connection. Concurrent calls share
    the connection (Redis answers in order). A timeout or a broken connection closes it (the
    next call reconnects) and raises - the caller degrades. ``NOSCRIPT`` (a restarted or
    flushed Redis) loads the script with ``EVAL``, as redis-py does.

    ``kw``: a redis-py client's ``connection_pool.connection_kwargs`` (host, port,
    password, db, socket timeouts)."""

    def __init__(self, kw: dict[str, Any], lua: str = READ_SCRIPT):
        self.kw = kw
        self.lua = lua.encode()
        self.sha = hashlib.sha1(self.lua).hexdigest().encode()
        self.timeout = float(kw.get("socket_timeout") or 1.0)
        self.connect_timeout = float(kw.get("socket_connect_timeout") or self.timeout)
        self.proto: _RespProtocol | None = None
        self._connecting: asyncio.Future[_RespProtocol] | None = None

    @classmethod
    def for_client(cls, client: Any, lua: str = READ_SCRIPT) -> AsyncScript | None:
        """For a TCP redis-py asyncio client; None otherwise (a unix socket or TLS: the
        caller uses redis-py's script)."""
        kw = dict(client.connection_pool.connection_kwargs)
        if "host" not in kw or "path" in kw or kw.get("ssl"):
            return None
        return cls(kw, lua)

    async def _connect(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(
                _RespProtocol, self.kw.get("host", "127.0.0.1"), int(self.kw.get("port", 6379))
            ),
            self.connect_timeout,
        )
        for args in hello_commands(
            self.kw.get("password"), self.kw.get("db"), self.kw.get("username")
        ):
            reply = await self._roundtrip(proto, args)
            if isinstance(reply, hiredis.ReplyError):
                assert proto.transport is not None
                proto.transport.close()
                raise ConnectionError(f"redis {args[0]}: {reply}")
        return proto

    async def _roundtrip(self, proto: _RespProtocol, args: tuple[Any, ...]) -> Any:
        assert proto.transport is not None
        fut = asyncio.get_running_loop().create_future()
        proto.waiters.append(fut)
        proto.transport.write(hiredis.pack_command(args))
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            proto.transport.close()  # replies may still come: never reuse this connection
            raise TimeoutError(f"redis did not answer within {self.timeout:g} s") from None

    async def _proto(self) -> _RespProtocol:
        p = self.proto
        if (
            p is not None
            and p.lost is None
            and p.transport is not None
            and not p.transport.is_closing()
        ):
            return p
        if self._connecting is None:  # one connection attempt shared by concurrent callers
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            self.proto = await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None
        return self.proto

    async def __call__(
        self, keys: list[Any] | tuple[Any, ...] = (), args: list[Any] | tuple[Any, ...] = ()
    ) -> Any:
        proto = await self._proto()
        head = (len(keys), *keys, *args)
        reply = await self._roundtrip(proto, (b"EVALSHA", self.sha, *head))
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            reply = await self._roundtrip(proto, (b"EVAL", self.lua, *head))
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None


class SyncScript:
    """``EVALSHA`` of a script over one blocking connection (:class:`~ctrstream.store.
    connection.RespSocket`), packed by hiredis. ``NOSCRIPT`` loads the script with ``EVAL``;
    a broken connection is closed and the call retried once on a new one (a restarted Redis),
    then raises - the caller degrades. Calls from several threads take turns.

    ``kw``: a redis-py client's ``connection_pool.connection_kwargs``."""

    def __init__(self, kw: dict[str, Any], lua: str = READ_SCRIPT):
        self.kw = kw
        self.lua = lua.encode()
        self.sha = hashlib.sha1(self.lua).hexdigest().encode()
        self.timeout = float(kw.get("socket_timeout") or 30.0)
        self.sock: RespSocket | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_client(cls, client: Any, lua: str = READ_SCRIPT) -> SyncScript | None:
        """For a TCP redis-py client; None otherwise (a unix socket or TLS)."""
        kw = dict(client.connection_pool.connection_kwargs)
        if "host" not in kw or "path" in kw or kw.get("ssl"):
            return None
        return cls(kw, lua)

    def _call(self, sock: RespSocket, head: tuple[Any, ...]) -> Any:
        sock.sock.sendall(hiredis.pack_command((b"EVALSHA", self.sha, *head)))
        try:
            return sock.read_reply()
        except RedisReplyError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        sock.sock.sendall(hiredis.pack_command((b"EVAL", self.lua, *head)))
        return sock.read_reply()

    def __call__(
        self, keys: list[Any] | tuple[Any, ...] = (), args: list[Any] | tuple[Any, ...] = ()
    ) -> Any:
        head = (len(keys), *keys, *args)
        with self._lock:
            for attempt in range(2):
                reused = self.sock is not None
                if self.sock is None:
                    self.sock = RespSocket.from_kwargs(self.kw, timeout=self.timeout)
                try:
                    return self._call(self.sock, head)
                except RedisReplyError:
                    raise  # an answer: the connection is fine
                except (OSError, ConnectionError):
                    self.close()
                    if not reused or attempt:
                        raise
            raise AssertionError("unreachable")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
