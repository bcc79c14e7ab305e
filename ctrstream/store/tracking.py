"""Server-assisted invalidation for the shared-entity cache (Redis ``CLIENT TRACKING``)."""

from __future__ import annotations

import functools
import logging
import select
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ctrstream.store import layout as L
from ctrstream.store.cluster import Address, ClusterConnections, slot_tag
from ctrstream.store.connection import RespSocket

log = logging.getLogger("ctrstream.store.tracking")


class InvalidationTracker:
    """Redis ``CLIENT TRACKING`` in broadcast mode (RESP2 redirect), on its own thread.

    One connection subscribes to ``__redis__:invalidate``; a second turns tracking on for
    the prefixes ``layout.SPEED_PREFIX`` and ``layout.TRACKING_PREFIX`` with its reports
    redirected to the first. Redis then reports every modified speed-view key (writes,
    expiry, eviction, flush); ``on_invalidate`` gets the entity keys (``ad:4`` of the
    speed-view hash of any day of ``ad`` 4: ``layout.speed_entity_key_of``), ``on_flush`` is
    called on a flush and whenever the channel is (re)built or lost. Every ``heartbeat_s``
    the tracker writes a new heartbeat key and waits for its report: reports arrive in the
    order Redis executed the writes, so when the report of a heartbeat sent at ``s`` has been
    processed, every write executed before it has been reported too. ``acked_sent_at`` is
    that ``s`` (monotonic clock) for the newest such heartbeat, None while the channel is
    down. Any error drops both connections and rebuilds them after a back-off.

    A thread, not a task of the API's event loop: an overloaded loop must not delay the
    reports (the cache would stop being vouched for just when it is needed most). The
    callbacks run on this thread (the cache serializes them with its own lock).

    ``connection_kwargs``: a redis-py client's ``connection_pool.connection_kwargs`` (host,
    port, password, db). ``heartbeat_tag``: called at the start of every session, a Redis
    Cluster hash tag (``{...}``) put in the heartbeat keys so that they live on the node
    being tracked (:class:`ClusterInvalidationTracker`); empty on one Redis.
    """

    def __init__(
        self,
        connection_kwargs: dict[str, Any],
        on_invalidate: Callable[[Iterable[str]], None],
        on_flush: Callable[[], None],
        heartbeat_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        heartbeat_tag: Callable[[], str] | None = None,
    ):
        self.kw = connection_kwargs
        self.heartbeat_tag = heartbeat_tag
        self.on_invalidate = on_invalidate
        self.on_flush = on_flush
        self.heartbeat_s = float(heartbeat_s)
        self.clock = clock
        self.acked_sent_at: float | None = None
        self.reports = 0  # invalidation messages processed
        self.restarts = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-invalidation", daemon=True)
        self._conns: list[RespSocket] = []

    def status(self) -> dict[str, Any]:
        sent = self.acked_sent_at
        age = None if sent is None else self.clock() - sent
        return {
            "healthy": age is not None,
            "heartbeat_age_s": age,
            "reports": self.reports,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for conn in list(self._conns):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.acked_sent_at = None

    def _open(self, name: str) -> RespSocket:
        conn = RespSocket.from_kwargs(self.kw, timeout=5)
        self._conns.append(conn)
        conn.call("CLIENT", "SETNAME", name)
        return conn

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._session()
            except Exception as e:  # noqa: BLE001 - any failure: no vouching, drop, rebuild
                if not self._stop.is_set():
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.warning(
                        "invalidation channel lost (%s); the cache falls back to its TTL",
                        self.last_error,
                    )
            finally:
                self.acked_sent_at = None
                self.on_flush()
                for conn in self._conns:
                    conn.close()
                self._conns = []
            if self._stop.wait(backoff):
                return
            self.restarts += 1
            backoff = min(backoff * 2, 5.0)

    def _session(self) -> None:
        sub = self._open("ctrstream-invalidation-reports")
        cid = sub.call("CLIENT", "ID")
        sub.call("SUBSCRIBE", "__redis__:invalidate")
        trk = self._open("ctrstream-invalidation-tracking")
        trk.call(
            "CLIENT",
            "TRACKING",
            "ON",
            "REDIRECT",
            cid,
            "BCAST",
            "PREFIX",
            L.SPEED_PREFIX,
            "PREFIX",
            L.TRACKING_PREFIX,
        )
        self.on_flush()  # nothing read before this moment is vouched for
        tag = self.heartbeat_tag() if self.heartbeat_tag is not None else ""
        me = f"{L.TRACKING_PREFIX}{uuid.uuid4().hex}{tag}:"
        me_b, prefix_b = me.encode(), L.SPEED_PREFIX.encode()
        sent: deque[tuple[int, float]] = deque()  # (heartbeat seq, sent at)
        hb_seq = 0
        next_hb = 0.0
        silent_limit = max(1.0, 20 * self.heartbeat_s)
        last_data = self.clock()
        while not self._stop.is_set():
            now = self.clock()
            if now >= next_hb:
                hb_seq += 1
                sent.append((hb_seq, now))
                trk.call("SET", f"{me}{hb_seq}", 1, "PX", 2000)
                next_hb = now + self.heartbeat_s
                if len(sent) > 1000:
                    raise ConnectionError("heartbeats are not reported back")
            ready, _, _ = select.select([sub.sock], [], [], max(0.0, next_hb - self.clock()))
            if not ready:
                if self.clock() - last_data > silent_limit:
                    raise ConnectionError(f"no report for {silent_limit:g} s")
                continue
            data = sub.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("redis closed the invalidation connection")
            last_data = self.clock()
            sub.reader.feed(data)
            acked = None
            while (msg := sub.reader.gets()) is not False:
                if not (isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message"):
                    continue
                self.reports += 1
                keys = msg[2]
                if keys is None:  # FLUSHALL / FLUSHDB
                    self.on_flush()
                    continue
                ents = []
                for k in keys:
                    if k.startswith(prefix_b):
                        ek = L.speed_entity_key_of(k)
                        if ek is not None:
                            ents.append(ek)
                    elif k.startswith(me_b):
                        try:
                            acked = max(acked or 0, int(k[len(me_b) :]))
                        except ValueError:
                            pass
                if ents:
                    self.on_invalidate(ents)
            # a heartbeat counts only once every report read before it has been applied
            if acked is not None:
                while sent and sent[0][0] <= acked:
                    seq, at = sent.popleft()
                    if seq == acked:
                        self.acked_sent_at = at


class ClusterInvalidationTracker:
    """:class:`InvalidationTracker` on every master of a Redis Cluster (each node reports the
    writes to its own keys): one tracker per master, its heartbeat keys tagged with a slot of
    that node (:func:`ctrstream.store.cluster.slot_tag` of the node's first slot, read again
    at every session: a heartbeat slot moved away by a reshard breaks the session, which is
    rebuilt with a slot the node still serves). The cache is vouched for only as far as the
    *least* recent heartbeat of all nodes (``acked_sent_at``: their minimum, None while any
    node's channel is down), so a silent node can never make it serve stale counts. The
    masters are those of the slot map at construction; a master promoted later (a failover)
    is not tracked, and the node it replaced never vouches again: the cache then falls back
    to its TTL (restart the reader to track the new topology)."""

    def __init__(
        self,
        router: ClusterConnections,
        on_invalidate: Callable[[Iterable[str]], None],
        on_flush: Callable[[], None],
        heartbeat_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.router = router
        self.clock = clock
        self._map_lock = threading.Lock()
        m = router.ensure_map()
        self.nodes = m.masters()
        self.trackers = [
            InvalidationTracker(
                {**router.kwargs, "host": a.host, "port": a.port, "db": 0},
                on_invalidate,
                on_flush,
                heartbeat_s=heartbeat_s,
                clock=clock,
                heartbeat_tag=functools.partial(self._tag, a),
            )
            for a in self.nodes
        ]

    def _tag(self, addr: Address) -> str:
        """A hash tag of a slot ``addr`` serves now."""
        with self._map_lock:
            self.router.refresh()
            m = self.router.map
            if addr not in m.nodes or not (m.owner == m.nodes.index(addr)).any():
                raise ConnectionError(f"redis {addr} serves no slot of the cluster any more")
            first = int(np.argmax(m.owner == m.nodes.index(addr)))
        return "{" + slot_tag(first) + "}"

    @property
    def acked_sent_at(self) -> float | None:
        got = [t.acked_sent_at for t in self.trackers]
        return None if not got or any(x is None for x in got) else min(got)  # type: ignore[type-var]

    def status(self) -> dict[str, Any]:
        sent = self.acked_sent_at
        age = None if sent is None else self.clock() - sent
        errors = [t.last_error for t in self.trackers if t.last_error]
        return {
            "healthy": age is not None,
            "heartbeat_age_s": age,
            "reports": sum(t.reports for t in self.trackers),
            "restarts": sum(t.restarts for t in self.trackers),
            "last_error": errors[0] if errors else None,
            "nodes": [str(a) for a in self.nodes],
        }

    def start(self) -> None:
        for t in self.trackers:
            t.start()

    def close(self, timeout: float = 5.0) -> None:
        for t in self.trackers:
            t.close(timeout)
        self.router.close()
