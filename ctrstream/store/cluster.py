"""Redis Cluster for the store's own RESP clients: key slots, the slot map, routing.

A Redis Cluster splits the key space into 16384 **slots**; a key's slot is CRC16-XMODEM of
the key mod 16384, or of its **hash tag** - the bytes between the first ``{`` and the first
``}`` after it - when that is non-empty (Redis' rule, :func:`key_slot`). Keys that must be
read or written together carry the same tag (:mod:`ctrstream.store.layout` puts them in);
the code here never parses a key to route it, it computes slots, so it routes any key
format alike.

* :func:`key_slot` (one key) and :func:`key_slots` (many keys at once, numpy over the padded
  2-D ``uint8`` rows the speed writer renders keys into);
* :class:`SlotMap` - which master serves each slot (``CLUSTER SHARDS``, or ``CLUSTER SLOTS``
  on servers before 7), refreshed on demand (a ``MOVED`` reply);
* :class:`ClusterConnections` - one :class:`~ctrstream.store.connection.RespSocket` per
  master, and :meth:`ClusterConnections.execute`: commands routed by their key's slot, one
  pipeline per node, the redirects of a migrating slot followed (``MOVED``: the map is
  refreshed and the command re-sent to the new owner; ``ASK``: ``ASKING`` and the command
  go to the named node once, the map unchanged).

How the hot paths use it: the speed writer (``speed_view``) splits each payload's rows by
slot owner, the readers (``reader``) read per node, the cache's invalidation tracking
(``tracking``) subscribes on every master: ``docs/redis-cluster.md``.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import hiredis
import numpy as np

from ctrstream.config import RedisSettings, Settings
from ctrstream.store.connection import RedisLoadingError, RedisReplyError, RespSocket, pack
from ctrstream.store.resp import PAD, BackgroundPipeline, Backoff, RetryHook, with_backoff

N_SLOTS = 16384


def _crc_table() -> np.ndarray:
    table = np.zeros(256, np.uint32)
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table[i] = crc & 0xFFFF
    return table


_TABLE = _crc_table()
_TABLE_LIST = [int(x) for x in _TABLE]
_OPEN, _CLOSE = ord("{"), ord("}")


def crc16(data: bytes) -> int:
    """CRC16-XMODEM (polynomial 0x1021, initial value 0) of ``data``: Redis Cluster's hash."""
    crc = 0
    t = _TABLE_LIST
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ t[((crc >> 8) ^ b) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    """What Redis hashes of ``key``: the bytes between the first ``{`` and the first ``}``
    after it when they are not empty, else the whole key."""
    s = key.find(b"{")
    if s >= 0:
        e = key.find(b"}", s + 1)
        if e > s + 1:
            return key[s + 1 : e]
    return key


def key_slot(key: bytes | str) -> int:
    """The cluster slot (0 .. 16383) of ``key`` (a str is UTF-8 encoded, as Redis sees it)."""
    if isinstance(key, str):
        key = key.encode()
    return crc16(hash_tag(key)) & (N_SLOTS - 1)


def key_slots(keys: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """The slots (int64) of many keys at once: row ``i`` of the 2-D ``uint8`` array ``keys``
    holds key ``i`` in its first ``lengths[i]`` bytes (default: the whole row), with any
    :data:`PAD` byte (0xFF, as ``ctrstream.store.resp.layout`` pads numbers) skipped. One
    pass of numpy per column, no Python per key."""
    a = np.asarray(keys, dtype=np.uint8)
    if a.ndim != 2:
        raise ValueError(f"key_slots takes a 2-D uint8 array of keys, got shape {a.shape}")
    n, w = a.shape
    cols = np.arange(w)
    valid = a != PAD
    if lengths is not None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (n,):
            raise ValueError(f"lengths must hold one length per key ({n}), got {lengths.shape}")
        valid &= cols[None, :] < lengths[:, None]
    opens = valid & (a == _OPEN)
    s = np.where(opens.any(axis=1), opens.argmax(axis=1), w)
    closes = valid & (a == _CLOSE) & (cols[None, :] > s[:, None])
    e = np.where(closes.any(axis=1), closes.argmax(axis=1), -1)
    inside = valid & (cols[None, :] > s[:, None]) & (cols[None, :] < e[:, None])
    tagged = inside.any(axis=1)
    use = np.where(tagged[:, None], inside, valid)
    crc = np.zeros(n, np.uint32)
    for j in range(w):
        m = use[:, j]
        if not m.any():
            continue
        nxt = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ a[:, j]) & 0xFF]
        crc = np.where(m, nxt, crc)
    return (crc & (N_SLOTS - 1)).astype(np.int64)


_TAGS: list[str] | None = None
_TAGS_LOCK = threading.Lock()


def slot_tag(slot: int) -> str:
    """A short string whose slot is ``slot``: a key with ``{`` + it + ``}`` lands there (the
    speed writer's per-node sequence marker is placed on its node that way)."""
    global _TAGS
    if not 0 <= slot < N_SLOTS:
        raise ValueError(f"slot must be in 0..{N_SLOTS - 1}, got {slot}")
    with _TAGS_LOCK:
        if _TAGS is None:
            tags: list[str | None] = [None] * N_SLOTS
            left, start = N_SLOTS, 0
            while left:  # every slot is reached within ~200,000 decimal numbers
                cand = np.arange(start, start + 65536)
                text = cand.astype(str).astype(np.bytes_)
                rows = text.view(np.uint8).reshape(len(cand), text.dtype.itemsize)
                lens = np.char.str_len(text)
                for c, sl in zip(cand.tolist(), key_slots(rows, lens).tolist()):
                    if tags[sl] is None:
                        tags[sl] = str(c)
                        left -= 1
                start += 65536
            _TAGS = [t for t in tags if t is not None]
        return _TAGS[slot]


# --------------------------------------------------------------------------- redirects


class Address(NamedTuple):
    """A cluster node's client address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``host:port`` (an IPv6 host may hold colons: the port is after the last one)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port (for example 127.0.0.1:7000)")
    return Address(host.strip("[]"), int(port))


@dataclass(frozen=True)
class Redirect:
    """A ``MOVED`` or ``ASK`` error reply: ``slot`` is (``MOVED``) or is being (``ASK``)
    served by ``address``."""

    kind: str  # "MOVED" | "ASK"
    slot: int
    address: Address


def parse_redirect(text: str | bytes, default_host: str = "127.0.0.1") -> Redirect | None:
    """The redirect of an error reply's text (``MOVED 3999 127.0.0.1:6381``); None for any
    other error. An empty host (``MOVED 3999 :6381``) is the replying node's host,
    ``default_host``."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    parts = text.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK") or not parts[1].isdigit():
        return None
    host, _, port = parts[2].rpartition(":")
    if not port.isdigit():
        return None
    return Redirect(parts[0], int(parts[1]), Address(host.strip("[]") or default_host, int(port)))


def is_retryable(text: str) -> bool:
    """An error reply of a cluster in motion, worth retrying after a short wait:
    ``TRYAGAIN`` (a multi-key command during a migration), ``CLUSTERDOWN`` (a failover)."""
    return text.startswith(("TRYAGAIN", "CLUSTERDOWN"))


class ClusterError(RuntimeError):
    """The cluster could not serve a command (no node serves its slot, too many redirects)."""


class ClusterMoving(RuntimeError):
    """A call that reads keys of several slots on one node met a slot in motion (a
    migration or a failover): its keys are no longer all on the node it was sent to. The
    caller reads them again key by key (routed, with redirects followed)."""


_MOVING = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "CROSSSLOT")


def is_moving(text: str) -> bool:
    """An error reply of a multi-slot call that a slot in motion explains (see
    :class:`ClusterMoving`): a redirect, a cluster in motion, or a script's read of a key its
    node does not serve (any more)."""
    return text.startswith(_MOVING) or "non local key" in text or "not served" in text


ABSENT_PREFIX = "ctrstream~absent"  # no key of ctrstream's layout starts so


def absent_key(m: SlotMap, node: int) -> str:
    """A key served by node ``node`` of the map (an index into ``m.nodes``) that no one ever
    writes: a read of it reads nothing. It stands for an entity's keys that live on other
    nodes in a per-node call of the read script (``ctrstream.store.reader``)."""
    served = m.owner == node
    if not served.any():
        raise ClusterError(f"node {node} of the slot map serves no slot")
    return ABSENT_PREFIX + "{" + slot_tag(int(np.argmax(served))) + "}"


def slots_of(keys: Sequence[str]) -> np.ndarray:
    """:func:`key_slots` of ``str`` keys (UTF-8)."""
    if not keys:
        return np.zeros(0, np.int64)
    arr = np.array([k.encode() for k in keys])
    rows = arr.view(np.uint8).reshape(len(arr), arr.dtype.itemsize)
    return key_slots(rows, np.char.str_len(arr))


# --------------------------------------------------------------------------- the slot map


class Conn(Protocol):
    """What routing needs of a connection (:class:`RespSocket`, or a fake in tests)."""

    def send_packed(self, data: bytes) -> None: ...

    def read_raw_reply(self) -> Any: ...

    def call(self, *args: Any) -> Any: ...

    def close(self) -> None: ...


Opener = Callable[[Address], Conn]


def _kv(flat: Sequence[Any]) -> dict[str, Any]:
    """A RESP2 flat key/value list as a dict with str keys."""
    out: dict[str, Any] = {}
    for i in range(0, len(flat) - 1, 2):
        k = flat[i]
        out[k.decode() if isinstance(k, bytes) else str(k)] = flat[i + 1]
    return out


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def parse_shards(reply: Sequence[Any]) -> list[tuple[int, int, Address]]:
    """``CLUSTER SHARDS`` -> ``(first slot, last slot, master address)`` ranges."""
    out = []
    for shard in reply:
        d = _kv(shard)
        master = None
        for node in d.get("nodes") or []:
            nd = _kv(node)
            if _s(nd.get("role", b"")) == "master":
                master = nd
                break
        if master is None:
            continue
        host = _s(master.get("endpoint", b"") or b"")
        if host in ("", "?"):
            host = _s(master.get("ip", b"127.0.0.1"))
        port = master.get("port", master.get("tls-port"))
        if port is None:
            raise ClusterError(f"CLUSTER SHARDS names a master without a port: {master}")
        addr = Address(host, int(port))
        slots = [int(x) for x in d.get("slots") or []]
        for i in range(0, len(slots) - 1, 2):
            out.append((slots[i], slots[i + 1], addr))
    return out


def parse_slots(reply: Sequence[Any]) -> list[tuple[int, int, Address]]:
    """``CLUSTER SLOTS`` -> ``(first slot, last slot, master address)`` ranges."""
    out = []
    for entry in reply:
        host = _s(entry[2][0]) or "127.0.0.1"
        out.append((int(entry[0]), int(entry[1]), Address(host, int(entry[2][1]))))
    return out


class SlotMap:
    """Which master serves each slot: :attr:`owner` (``int64[16384]``, an index into
    :attr:`nodes`, -1 for a slot no node serves). :meth:`refresh` asks the known nodes, then
    the seeds, until one answers ``CLUSTER SHARDS`` (``CLUSTER SLOTS`` on Redis < 7).
    :attr:`epoch` grows with every change, so a caller that split work by the map can tell
    it changed since. Thread-safe."""

    def __init__(self, seeds: Iterable[Address | str], opener: Opener) -> None:
        self.seeds = [a if isinstance(a, Address) else parse_address(a) for a in seeds]
        if not self.seeds:
            raise ValueError("a Redis Cluster needs at least one seed node (host:port)")
        self.opener = opener
        self.nodes: list[Address] = []
        self.owner = np.full(N_SLOTS, -1, np.int64)
        self.epoch = 0
        self.lock = threading.Lock()

    def _index(self, addr: Address) -> int:
        try:
            return self.nodes.index(addr)
        except ValueError:
            self.nodes.append(addr)
            return len(self.nodes) - 1

    def _ask(self, addr: Address) -> list[tuple[int, int, Address]]:
        conn = self.opener(addr)
        try:
            try:
                return parse_shards(conn.call("CLUSTER", "SHARDS"))
            except RedisReplyError as e:
                if "unknown" not in str(e).lower():
                    raise
                return parse_slots(conn.call("CLUSTER", "SLOTS"))
        finally:
            conn.close()

    def refresh(self) -> None:
        """Read the map from the first node that answers (raises :class:`ClusterError`
        naming every node tried when none does)."""
        errors = []
        for addr in [*self.nodes, *(s for s in self.seeds if s not in self.nodes)]:
            try:
                ranges = self._ask(addr)
            except (OSError, RedisReplyError) as e:
                errors.append(f"{addr}: {e}")
                continue
            if not ranges:
                errors.append(f"{addr}: serves no slots (is the cluster created?)")
                continue
            self.load(ranges)
            return
        raise ClusterError(
            "no Redis Cluster node answered CLUSTER SHARDS/SLOTS (" + "; ".join(errors) + "): "
            "check the cluster seed nodes (CTRSTREAM_REDIS__CLUSTER) and that the cluster is up"
        )

    def load(self, ranges: Iterable[tuple[int, int, Address]]) -> None:
        """Replace the map with ``ranges`` (first slot, last slot, master)."""
        with self.lock:
            owner = np.full(N_SLOTS, -1, np.int64)
            for lo, hi, addr in ranges:
                owner[lo : hi + 1] = self._index(addr)
            self.owner = owner
            self.epoch += 1

    def moved(self, slot: int, addr: Address) -> None:
        """Record that ``slot`` is served by ``addr`` (a ``MOVED`` reply), before a refresh."""
        with self.lock:
            k = self._index(addr)
            if self.owner[slot] != k:
                owner = self.owner.copy()
                owner[slot] = k
                self.owner = owner
                self.epoch += 1

    def node_of_slot(self, slot: int) -> Address:
        k = int(self.owner[slot])
        if k < 0:
            raise ClusterError(
                f"no node of the Redis Cluster serves slot {slot}: is every slot assigned "
                "(redis-cli --cluster check)?"
            )
        return self.nodes[k]

    def node_of_key(self, key: bytes | str) -> Address:
        return self.node_of_slot(key_slot(key))

    def masters(self) -> list[Address]:
        """The nodes that serve at least one slot."""
        return [self.nodes[k] for k in np.unique(self.owner[self.owner >= 0]).tolist()]


# --------------------------------------------------------------------------- routing


@dataclass
class RoutingStats:
    """What routing had to do (for tests and benchmarks)."""

    moved: int = 0
    ask: int = 0
    tryagain: int = 0
    refreshes: int = 0


class ClusterConnections:
    """One connection per master (opened on first use) and commands routed by slot.

    :meth:`execute` sends commands (each with the key that routes it) as one pipeline per
    node, reads every reply, and follows the redirects of a cluster in motion: ``MOVED``
    updates the map (then refreshes it) and re-sends the command to the new owner, ``ASK``
    sends ``ASKING`` + the command to the named node once without touching the map,
    ``TRYAGAIN``/``CLUSTERDOWN`` wait ``retry_wait_s`` and send again - up to
    ``max_redirects`` times per command, then :class:`ClusterError`. Replies come back in the
    order of the commands; an error reply other than a redirect raises
    :class:`~ctrstream.store.connection.RedisReplyError` once every reply is read.
    A broken connection is closed and raises (the next call opens a new one and refreshes the
    map). One caller at a time (a lock)."""

    def __init__(
        self,
        seeds: Iterable[Address | str],
        opener: Opener,
        max_redirects: int = 16,
        retry_wait_s: float = 0.02,
    ) -> None:
        self.opener = opener
        self.map = SlotMap(seeds, opener)
        self.conns: dict[Address, Conn] = {}
        self.max_redirects = max_redirects
        self.retry_wait_s = retry_wait_s
        self.stats = RoutingStats()
        self.kwargs: dict[str, Any] = {}  # the credentials opener uses (for asyncio twins)
        self.lock = threading.Lock()
        self._loaded = False
        # runs on every new connection to a node, before anything is sent on it
        self.on_connect: Callable[[Address, Conn], None] | None = None

    @classmethod
    def from_kwargs(
        cls, seeds: Iterable[Address | str], kw: Mapping[str, Any], timeout: float = 5.0
    ) -> ClusterConnections:
        """For seeds and the connection keywords (password, username; ``db`` is always 0 on
        a cluster) of a redis-py client."""
        kw = dict(kw)

        def opener(addr: Address) -> Conn:
            return RespSocket(
                addr.host, addr.port, kw.get("password"), 0, kw.get("username"), timeout=timeout
            )

        out = cls(seeds, opener)
        out.kwargs = {
            k: kw[k]
            for k in ("password", "username", "socket_timeout", "socket_connect_timeout")
            if kw.get(k) is not None
        }
        return out

    def ensure_map(self) -> SlotMap:
        if not self._loaded:
            self.refresh()
        return self.map

    def refresh(self) -> None:
        self.map.refresh()
        self.stats.refreshes += 1
        self._loaded = True

    def conn(self, addr: Address) -> Conn:
        """The connection to ``addr``, opened (and handed to :attr:`on_connect`) if there is
        none."""
        c = self.conns.get(addr)
        if c is None:
            c = self.opener(addr)
            if self.on_connect is not None:
                try:
                    self.on_connect(addr, c)
                except BaseException:
                    c.close()
                    raise
            self.conns[addr] = c
        return c

    def stale(self) -> None:
        """Read the map again before the next command (a node was lost)."""
        self._loaded = False

    def drop(self, addr: Address) -> None:
        c = self.conns.pop(addr, None)
        if c is not None:
            c.close()

    def close(self) -> None:
        for addr in list(self.conns):
            self.drop(addr)

    def execute(
        self,
        commands: Sequence[tuple[Any, ...]],
        keys: Sequence[bytes | str],
        raise_errors: bool = True,
    ) -> list[Any]:
        """Replies of ``commands`` (``keys[i]`` routes ``commands[i]``), in order.
        ``raise_errors`` False: an error reply (other than a followed redirect) is returned in
        its place as a ``hiredis.ReplyError``."""
        with self.lock:
            return self._execute(commands, keys, raise_errors)

    def _execute(
        self,
        commands: Sequence[tuple[Any, ...]],
        keys: Sequence[bytes | str],
        raise_errors: bool = True,
    ) -> list[Any]:
        m = self.ensure_map()
        n = len(commands)
        replies: list[Any] = [None] * n
        slots = [key_slot(k) for k in keys]
        todo: dict[Address, list[int]] = {}
        for i, s in enumerate(slots):
            todo.setdefault(m.node_of_slot(s), []).append(i)
        asking: dict[Address, list[int]] = {}
        tries = 0
        while todo or asking:
            tries += 1
            if tries > self.max_redirects:
                raise ClusterError(
                    f"commands were still redirected after {self.max_redirects} tries "
                    "(a slot keeps moving, or the cluster is down)"
                )
            again = self._round(todo, asking, commands, slots, replies)
            todo, asking = again
        errors = [r for r in replies if isinstance(r, hiredis.ReplyError)]
        if errors and raise_errors:
            raise RedisReplyError(str(errors[0]))
        return replies

    def _round(
        self,
        todo: dict[Address, list[int]],
        asking: dict[Address, list[int]],
        commands: Sequence[tuple[Any, ...]],
        slots: list[int],
        replies: list[Any],
    ) -> tuple[dict[Address, list[int]], dict[Address, list[int]]]:
        """One pipeline per node of ``todo`` (and ``ASKING`` + command for ``asking``); the
        commands to send again next round."""
        sent: list[tuple[Address, list[int], bool]] = []
        plan = [(a, i, False) for a, i in todo.items()] + [(a, i, True) for a, i in asking.items()]
        for addr, idx, ask in plan:
            if ask:
                payload = b"".join(pack(("ASKING",)) + pack(commands[i]) for i in idx)
            else:
                payload = b"".join(pack(commands[i]) for i in idx)
            try:
                self.conn(addr).send_packed(payload)
            except OSError:
                self.drop(addr)
                self.stale()
                raise
            sent.append((addr, idx, ask))
        nxt: dict[Address, list[int]] = {}
        nxt_ask: dict[Address, list[int]] = {}
        moved: list[tuple[int, Address]] = []
        wait = False
        for addr, idx, ask in sent:
            c = self.conn(addr)
            try:
                for i in idx:
                    if ask:
                        c.read_raw_reply()  # ASKING's +OK
                    r = c.read_raw_reply()
                    replies[i] = r
                    if not isinstance(r, hiredis.ReplyError):
                        continue
                    text = str(r)
                    red = parse_redirect(text, addr.host)
                    if red is not None:
                        if red.kind == "MOVED":
                            self.stats.moved += 1
                            self.map.moved(red.slot, red.address)
                            moved.append((red.slot, red.address))
                            nxt.setdefault(red.address, []).append(i)
                        else:
                            self.stats.ask += 1
                            nxt_ask.setdefault(red.address, []).append(i)
                    elif is_retryable(text):
                        self.stats.tryagain += 1
                        wait = True
                        nxt.setdefault(self.map.node_of_slot(slots[i]), []).append(i)
            except OSError:
                self.drop(addr)
                self.stale()
                raise
        if moved:
            try:
                self.refresh()
            except ClusterError:
                pass  # the MOVED replies update the map below
            for slot, addr in moved:  # a node's MOVED is newer than another node's map
                self.map.moved(slot, addr)
            # commands MOVED elsewhere follow the refreshed map
            regrouped: dict[Address, list[int]] = {}
            for idx in nxt.values():
                for i in idx:
                    regrouped.setdefault(self.map.node_of_slot(slots[i]), []).append(i)
            nxt = regrouped
        if wait:
            time.sleep(self.retry_wait_s)
        return nxt, nxt_ask


# --------------------------------------------------------------------------- the writer


def cluster_seeds(settings: Settings | RedisSettings) -> list[Address]:
    """The cluster's seed nodes of the settings (``redis.cluster``, ``host:port`` each);
    empty for a single Redis."""
    rs = settings.redis if isinstance(settings, Settings) else settings
    return [parse_address(a) for a in rs.cluster]


def connections_for(
    settings: Settings | RedisSettings, timeout: float = 30.0
) -> ClusterConnections:
    """:class:`ClusterConnections` to the cluster of the settings (its password and
    username; a cluster has database 0 only)."""
    rs = settings.redis if isinstance(settings, Settings) else settings
    seeds = cluster_seeds(rs)
    if not seeds:
        raise ValueError(
            "these settings name no Redis Cluster (set redis.cluster: host:port seeds)"
        )
    if rs.db:
        raise ValueError(
            f"a Redis Cluster has database 0 only, the settings name database {rs.db}: "
            "set redis.db to 0"
        )
    return ClusterConnections.from_kwargs(seeds, {"password": rs.password}, timeout)


class _ErrorLines:
    """Counts one-line replies by their line ends and keeps every error line with its reply
    index (a cluster answers a command of a moved slot with a ``-MOVED`` line, and only those
    commands are sent again). Without an error it is ``bytes.count`` in C."""

    def __init__(self) -> None:
        self.got = 0
        self.tail = b""  # the part of a line cut by the end of the last read
        self.errors: list[tuple[int, str]] = []

    def feed(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        end = buf.rfind(b"\n") + 1
        if not buf.startswith(b"-") and b"\n-" not in buf:
            self.got += buf.count(b"\n", 0, end)
        else:
            lines = buf[:end].split(b"\n")[:-1]
            for j, line in enumerate(lines):
                if line.startswith(b"-"):
                    self.errors.append(
                        (self.got + j, line[1:].rstrip(b"\r").decode(errors="replace"))
                    )
            self.got += len(lines)
        self.tail = buf[end:]


def _commands_of(payload: bytes) -> list[tuple[bytes, ...]]:
    """The commands of a packed payload (RESP arrays of bulk strings, as sent)."""
    reader = hiredis.Reader()
    reader.feed(payload)
    out = []
    while (cmd := reader.gets()) is not False:
        out.append(tuple(cmd))
    return out


NodeParts = dict[Address, tuple[bytes, int]]
"""A payload split by node: per master, its packed commands and their number."""
UNSERVED = Address("", 0)
"""The part of :data:`NodeParts` whose slots no node served when it was split (routed
command by command when sent)."""


class ClusterPipeline(BackgroundPipeline):
    """:class:`~ctrstream.store.resp.BackgroundPipeline` over a Redis Cluster: each submitted
    payload is a :data:`NodeParts` (one part per master, split by the slot map when it was
    rendered), sent to every node at once over one connection per node from one writer
    thread, and acknowledged once every node answered every command. Payloads are executed
    one after the other, so a redirected command is re-sent before any later payload's
    commands go out (absolute values stay in order). Replies are counted per node
    (:class:`_ErrorLines`); commands answered ``MOVED``/``ASK``/``TRYAGAIN`` are sent again
    through :meth:`ClusterConnections.execute` - not errors, not lost. A part for a node
    that no longer serves slots (a failover) is routed command by command. A lost
    connection is retried with ``backoff`` as on one node (the map is read again first).
    ``on_connect(address, connection)`` runs on every new connection to a node."""

    def __init__(
        self,
        router: ClusterConnections,
        max_pending: int = 2,
        timeout: float = 30.0,
        backoff: Backoff | None = None,
        on_retry: RetryHook | None = None,
        on_connect: Callable[[Address, Conn], None] | None = None,
    ) -> None:
        self.router = router
        self.timeout = timeout
        if on_connect is not None:
            router.on_connect = on_connect
        super().__init__({}, max_pending, timeout, backoff, on_retry)

    def _execute(self, payload: Any, n: int, one_line: bool) -> None:
        with_backoff(lambda: self._attempt(payload), self.backoff, self.on_retry)

    def _attempt(self, parts: NodeParts) -> None:
        try:
            self.router.ensure_map()
            masters = set(self.router.map.masters())
        except ClusterError as e:
            raise ConnectionError(str(e)) from e
        direct = {a: p for a, p in parts.items() if a in masters and p[1]}
        rerouted = [cmd for a, p in parts.items() if a not in masters for cmd in _commands_of(p[0])]
        try:
            errors = self._roundtrip(direct)
        except (OSError, ConnectionError):
            for a in direct:
                self.router.drop(a)
            self.router.stale()  # read the map again before the next attempt
            raise
        again: list[tuple[bytes, ...]] = []
        for addr, errs in errors.items():
            cmds = None
            for i, text in errs:
                if parse_redirect(text, addr.host) is None and not is_retryable(text):
                    if text.startswith("LOADING"):
                        raise RedisLoadingError(f"redis {addr} is loading its data set: {text}")
                    raise RuntimeError(f"redis {addr} replied with an error: {text}")
                if cmds is None:
                    cmds = _commands_of(direct[addr][0])
                again.append(cmds[i])
        again += rerouted
        if again:
            try:
                with self.router.lock:
                    self.router._execute(again, [c[1] for c in again])
            except RedisReplyError as e:
                raise RuntimeError(f"redis replied with an error: {e}") from e
            except ClusterError as e:  # slots not served yet (a failover): wait and retry
                raise ConnectionError(str(e)) from e

    def _roundtrip(self, parts: NodeParts) -> dict[Address, list[tuple[int, str]]]:
        """Send every node its part while reading the replies as they come (see
        :meth:`ctrstream.store.resp.RespPipeline._roundtrip`); the error lines per node."""
        states: dict[Any, tuple[Address, memoryview, int, _ErrorLines]] = {}
        sent: dict[Any, int] = {}
        for addr, (payload, n) in parts.items():
            sock = self.router.conn(addr).sock  # type: ignore[attr-defined]
            states[sock] = (addr, memoryview(payload), n, _ErrorLines())
            sent[sock] = 0
        while True:
            reading = [s for s, (_, _, n, c) in states.items() if c.got < n]
            if not reading:
                break
            writing = [s for s in reading if sent[s] < len(states[s][1])]
            readable, writable, _ = select.select(reading, writing, [], self.timeout)
            if not readable and not writable:
                raise TimeoutError(f"the redis cluster made no progress for {self.timeout:.0f} s")
            for s in writable:
                view = states[s][1]
                sent[s] += s.send(view[sent[s] : sent[s] + (1 << 20)])
            for s in readable:
                data = s.recv(1 << 20)
                if not data:
                    raise ConnectionError(f"redis {states[s][0]} closed the connection")
                states[s][3].feed(data)
        return {a: c.errors for a, _, _, c in states.values() if c.errors}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.router.close()


def connections_of_client(client: Any, timeout: float = 5.0) -> ClusterConnections | None:
    """:class:`ClusterConnections` to the cluster of a redis-py ``RedisCluster`` client (sync
    or asyncio: its startup nodes and credentials); None for any other client."""
    nm = getattr(client, "nodes_manager", None)
    if nm is None:
        return None
    nodes = getattr(nm, "startup_nodes", None) or {}
    seeds = [Address(n.host, int(n.port)) for n in nodes.values()]
    kw = dict(getattr(nm, "connection_kwargs", None) or {})
    t = kw.get("socket_timeout") or timeout
    return ClusterConnections.from_kwargs(seeds, kw, float(t))


def copy_to_cluster(src: Any, dst: Settings, chunk: int = 5000) -> int:
    """Copy every key of the single Redis behind the redis-py client ``src`` (values and
    TTLs: ``DUMP`` / ``RESTORE ... REPLACE``) into the cluster of ``dst``, each to the
    master serving its slot; returns how many. For benchmarks and tests that compare one
    Redis with a cluster holding the same data."""
    router = connections_for(dst, timeout=60.0)
    n = 0
    try:
        batch: list[bytes] = []
        for key in src.scan_iter(count=chunk):
            batch.append(key if isinstance(key, bytes) else key.encode())
            if len(batch) >= chunk:
                n += _copy_chunk(src, router, batch)
                batch = []
        n += _copy_chunk(src, router, batch)
    finally:
        router.close()
    return n


def _copy_chunk(src: Any, router: ClusterConnections, keys: list[bytes]) -> int:
    if not keys:
        return 0
    pipe = src.pipeline(transaction=False)
    for k in keys:
        pipe.dump(k)
        pipe.pttl(k)
    got = pipe.execute()
    cmds, routes = [], []
    for k, dump, ttl in zip(keys, got[0::2], got[1::2]):
        if dump is not None:  # expired since the SCAN
            cmds.append(("RESTORE", k, max(0, int(ttl)), dump, "REPLACE"))
            routes.append(k)
    router.execute(cmds, routes)
    return len(cmds)
