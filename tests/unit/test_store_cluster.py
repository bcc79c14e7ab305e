"""Redis Cluster routing of the store's own RESP clients (``ctrstream.store.cluster``), without
a server: key slots against Redis' own examples, the vectorized slots against the scalar
ones, the slot map's parsing, and the routing decisions (MOVED, ASK, TRYAGAIN) against fake
nodes that answer as Redis Cluster nodes do."""

from __future__ import annotations

from typing import Any

import hiredis
import numpy as np
import pytest

from ctrstream.store.cluster import (
    N_SLOTS,
    PAD,
    Address,
    ClusterConnections,
    ClusterError,
    Redirect,
    SlotMap,
    crc16,
    key_slot,
    key_slots,
    parse_address,
    parse_redirect,
    parse_shards,
    parse_slots,
    slot_tag,
)
from ctrstream.store.connection import RedisReplyError


def test_key_slot_matches_redis():
    """Values of ``CLUSTER KEYSLOT`` (Redis 7) and the examples of the cluster spec."""
    assert crc16(b"123456789") == 0x31C3  # the CRC16-XMODEM check value
    assert key_slot(b"foo") == 12182
    assert key_slot(b"bar") == 5061
    assert key_slot("foo") == 12182
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers") == 3443
    assert key_slot(b"foo{bar}{zap}") == key_slot(b"bar")  # the first tag
    assert key_slot(b"foo{}{bar}") == 8363  # empty tag: the whole key
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")  # "{bar" between { and }
    assert key_slot(b"foo{bar") == crc16(b"foo{bar") % N_SLOTS  # no closing brace
    assert key_slot(b"") == 0


def _pad_rows(keys: list[bytes], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Keys in rows with PAD bytes sprinkled in (as the writer's rendered numbers have) and
    trailing garbage past each key's length."""
    rows = []
    for k in keys:
        out = bytearray()
        for b in k:
            while rng.random() < 0.2:
                out.append(PAD)
            out.append(b)
        rows.append(bytes(out))
    w = max(map(len, rows)) + 3
    a = np.full((len(rows), w), ord("x"), np.uint8)
    for i, r in enumerate(rows):
        a[i, : len(r)] = np.frombuffer(r, np.uint8)
    return a, np.array([len(r) for r in rows])


def test_key_slots_vectorized_equals_key_slot():
    rng = np.random.default_rng(3)
    alphabet = b"ab{}:0123456789"
    keys = [
        bytes(rng.choice(list(alphabet), size=rng.integers(0, 24)).tolist()) for _ in range(2000)
    ]
    keys += [b"sv:{user:17}:20431", b"bv:7:{ad:4}:sums", b"{}", b"{a}", b"a{b}c{d}", b"}{x}"]
    a, lens = _pad_rows(keys, rng)
    assert key_slots(a, lens).tolist() == [key_slot(k) for k in keys]
    # without lengths: the whole row (no trailing garbage)
    exact = np.full((2, 8), PAD, np.uint8)
    exact[0, :3] = np.frombuffer(b"foo", np.uint8)
    exact[1, 2:] = np.frombuffer(b"{bar}x", np.uint8)
    assert key_slots(exact).tolist() == [12182, 5061]
    with pytest.raises(ValueError, match="2-D"):
        key_slots(np.zeros(3, np.uint8))


def test_slot_tag_lands_on_its_slot():
    for s in (0, 1, 777, 12182, N_SLOTS - 1):
        assert key_slot(b"svw:x:{" + slot_tag(s).encode() + b"}") == s
    with pytest.raises(ValueError):
        slot_tag(N_SLOTS)


def test_parse_redirects_and_addresses():
    assert parse_redirect("MOVED 3999 127.0.0.1:6381") == Redirect(
        "MOVED", 3999, Address("127.0.0.1", 6381)
    )
    assert parse_redirect(b"ASK 12 ::1:7000") == Redirect("ASK", 12, Address("::1", 7000))
    assert parse_redirect("MOVED 5 :7001", "10.0.0.2") == Redirect(
        "MOVED", 5, Address("10.0.0.2", 7001)
    )
    assert parse_redirect("ERR wrong number of arguments") is None
    assert parse_redirect("TRYAGAIN Multiple keys request during rehashing of slot") is None
    assert parse_address("[::1]:7000") == Address("::1", 7000)
    with pytest.raises(ValueError, match="host:port"):
        parse_address("localhost")


def test_parse_cluster_shards_and_slots():
    def node(port: int, role: bytes) -> list[Any]:
        return [b"id", b"x", b"port", port, b"ip", b"127.0.0.1", b"endpoint", b"127.0.0.1",
                b"role", role, b"health", b"online"]  # fmt: skip

    shards = [
        [b"slots", [0, 5460], b"nodes", [node(7001, b"replica"), node(7000, b"master")]],
        [b"slots", [5461, 10922, 16000, 16383], b"nodes", [node(7002, b"master")]],
    ]
    assert parse_shards(shards) == [
        (0, 5460, Address("127.0.0.1", 7000)),
        (5461, 10922, Address("127.0.0.1", 7002)),
        (16000, 16383, Address("127.0.0.1", 7002)),
    ]
    slots = [[0, 5460, [b"127.0.0.1", 7000, b"id"], [b"127.0.0.1", 7001, b"id2"]]]
    assert parse_slots(slots) == [(0, 5460, Address("127.0.0.1", 7000))]


# --------------------------------------------------------------------------- fake nodes


class FakeCluster:
    """Nodes that answer as Redis Cluster masters: a command for a slot the node does not
    serve gets ``MOVED``; a slot migrating away whose key has already moved gets ``ASK``; a
    node importing a slot serves it after ``ASKING`` only."""

    def __init__(self, n: int = 3) -> None:
        self.addrs = [Address("127.0.0.1", 7000 + i) for i in range(n)]
        self.owner = np.repeat(np.arange(n), -(-N_SLOTS // n))[:N_SLOTS]
        self.data: dict[Address, dict[bytes, bytes]] = {a: {} for a in self.addrs}
        self.migrating: dict[int, Address] = {}  # slot -> the node importing it
        self.tryagain: int = 0  # the next commands answered TRYAGAIN
        self.log: list[tuple[Address, tuple[bytes, ...]]] = []
        self.shards_asked = 0

    def shards(self) -> list[Any]:
        out = []
        for k, a in enumerate(self.addrs):
            sl = np.flatnonzero(self.owner == k)
            if not len(sl):
                continue
            ranges: list[int] = []
            start = prev = int(sl[0])
            for s in sl[1:].tolist() + [None]:
                if s is None or s != prev + 1:
                    ranges += [start, prev]
                    if s is not None:
                        start = s
                if s is not None:
                    prev = s
            node = [b"port", a.port, b"ip", a.host.encode(), b"endpoint", a.host.encode(),
                    b"role", b"master"]  # fmt: skip
            out.append([b"slots", ranges, b"nodes", [node]])
        return out

    def run(self, addr: Address, cmd: tuple[bytes, ...], asking: bool) -> Any:
        self.log.append((addr, cmd))
        name = cmd[0].upper()
        if name == b"CLUSTER":
            self.shards_asked += 1
            return self.shards()
        if name == b"ASKING":
            return b"OK"
        if self.tryagain:
            self.tryagain -= 1
            return hiredis.ReplyError("TRYAGAIN Multiple keys request during rehashing")
        key = cmd[1]
        slot = key_slot(key)
        me = self.addrs.index(addr)
        target = self.migrating.get(slot)
        if self.owner[slot] != me:
            if asking and target == addr:
                return self._exec(addr, cmd)
            return hiredis.ReplyError(f"MOVED {slot} {self.addrs[self.owner[slot]]}")
        if target is not None and key not in self.data[addr]:
            return hiredis.ReplyError(f"ASK {slot} {target}")
        return self._exec(addr, cmd)

    def _exec(self, addr: Address, cmd: tuple[bytes, ...]) -> Any:
        name = cmd[0].upper()
        store = self.data[addr]
        if name == b"SET":
            store[cmd[1]] = cmd[2]
            return b"OK"
        if name == b"GET":
            return store.get(cmd[1])
        return hiredis.ReplyError(f"ERR unknown command '{name.decode()}'")


class FakeConn:
    def __init__(self, cluster: FakeCluster, addr: Address) -> None:
        self.cluster, self.addr = cluster, addr
        self.pending: list[Any] = []
        self.asking = False

    def send_packed(self, data: bytes) -> None:
        r = hiredis.Reader()
        r.feed(data)
        while (cmd := r.gets()) is not False:
            reply = self.cluster.run(self.addr, tuple(cmd), self.asking)
            self.asking = cmd[0].upper() == b"ASKING"
            self.pending.append(reply)

    def read_raw_reply(self) -> Any:
        return self.pending.pop(0)

    def call(self, *args: Any) -> Any:
        self.send_packed(hiredis.pack_command(args))
        r = self.read_raw_reply()
        if isinstance(r, hiredis.ReplyError):
            raise RedisReplyError(str(r))
        return r

    def close(self) -> None:
        pass


def _router(fc: FakeCluster) -> ClusterConnections:
    return ClusterConnections([fc.addrs[0]], lambda a: FakeConn(fc, a), retry_wait_s=0)


def test_slot_map_from_a_node():
    fc = FakeCluster()
    m = SlotMap(["127.0.0.1:7000"], lambda a: FakeConn(fc, a))
    m.refresh()
    assert m.node_of_key(b"foo") == fc.addrs[fc.owner[12182]]
    assert sorted(m.masters()) == fc.addrs
    e = m.epoch
    m.moved(12182, fc.addrs[0])
    assert m.node_of_slot(12182) == fc.addrs[0] and m.epoch == e + 1
    m.load([(0, 100, fc.addrs[1])])
    with pytest.raises(ClusterError, match="no node .* serves slot 200"):
        m.node_of_slot(200)


def test_slot_map_names_every_seed_it_tried():
    def refuse(a: Address) -> Any:
        raise ConnectionRefusedError(f"refused {a}")

    m = SlotMap(["127.0.0.1:1", "127.0.0.1:2"], refuse)
    with pytest.raises(ClusterError, match="127.0.0.1:1.*127.0.0.1:2.*CTRSTREAM_REDIS__CLUSTER"):
        m.refresh()
    with pytest.raises(ValueError, match="seed"):
        SlotMap([], refuse)


def test_routing_sends_each_command_to_its_slot_owner():
    fc = FakeCluster()
    r = _router(fc)
    keys = [f"k{i}".encode() for i in range(200)]
    assert r.execute([(b"SET", k, k + b"!") for k in keys], keys) == [b"OK"] * 200
    for k in keys:
        assert fc.data[fc.addrs[fc.owner[key_slot(k)]]][k] == k + b"!"
    assert r.execute([(b"GET", k) for k in keys], keys) == [k + b"!" for k in keys]
    assert r.stats.moved == r.stats.ask == 0


def test_moved_refreshes_the_map_and_resends_to_the_new_owner():
    fc = FakeCluster()
    r = _router(fc)
    r.execute([(b"SET", b"foo", b"1")], [b"foo"])
    asked = fc.shards_asked
    old = fc.owner[12182]
    new = (old + 1) % 3
    fc.owner[12182] = new  # the slot moved (with its key)
    fc.data[fc.addrs[new]][b"foo"] = fc.data[fc.addrs[old]].pop(b"foo")
    assert r.execute([(b"GET", b"foo"), (b"GET", b"bar")], [b"foo", b"bar"]) == [b"1", None]
    assert r.stats.moved == 1 and fc.shards_asked == asked + 1  # refreshed once
    assert r.map.node_of_slot(12182) == fc.addrs[new]
    n = len(fc.log)
    assert r.execute([(b"GET", b"foo")], [b"foo"]) == [b"1"]
    assert fc.log[n:] == [(fc.addrs[new], (b"GET", b"foo"))]  # straight to the new owner


def test_ask_goes_to_the_importing_node_once_without_changing_the_map():
    fc = FakeCluster()
    r = _router(fc)
    r.execute([(b"SET", b"bar", b"old")], [b"bar"])
    old = fc.owner[5061]
    new = (old + 1) % 3
    fc.migrating[5061] = fc.addrs[new]
    epoch = r.map.epoch
    # a key of the slot not on the old owner any more: ASK, then ASKING + SET on the new one
    assert r.execute([(b"SET", b"{bar}x", b"v")], [b"{bar}x"]) == [b"OK"]
    assert fc.data[fc.addrs[new]][b"{bar}x"] == b"v"
    assert r.stats.ask == 1 and r.map.epoch == epoch
    assert r.map.node_of_slot(5061) == fc.addrs[old]  # the map still names the old owner
    assert fc.log[-2:] == [
        (fc.addrs[new], (b"ASKING",)),
        (fc.addrs[new], (b"SET", b"{bar}x", b"v")),
    ]
    # a key still on the old owner is served there
    assert r.execute([(b"GET", b"bar")], [b"bar"]) == [b"old"]


def test_tryagain_is_retried_and_errors_raise_after_every_reply():
    fc = FakeCluster()
    r = _router(fc)
    fc.tryagain = 2
    assert r.execute([(b"SET", b"a", b"1"), (b"SET", b"b", b"2")], [b"a", b"b"]) == [b"OK"] * 2
    assert r.stats.tryagain == 2
    with pytest.raises(RedisReplyError, match="unknown command"):
        r.execute([(b"NOPE", b"a"), (b"SET", b"b", b"3")], [b"a", b"b"])
    assert fc.data[fc.addrs[fc.owner[key_slot(b"b")]]][b"b"] == b"3"  # the rest still ran


def test_endless_redirects_give_up_with_a_clear_error():
    fc = FakeCluster()
    r = _router(fc)
    r.ensure_map()
    fc.tryagain = 10**6
    with pytest.raises(ClusterError, match="still redirected"):
        r.execute([(b"GET", b"a")], [b"a"])


def test_error_lines_are_counted_with_their_reply_index_across_reads():
    """The cluster writer counts one-line replies by their line ends and keeps each error
    line with its index, however the replies are cut into reads."""
    from ctrstream.store.cluster import _ErrorLines

    replies = b":1\r\n:2\r\n-MOVED 3999 127.0.0.1:7001\r\n+OK\r\n-ASK 12 127.0.0.1:7002\r\n:0\r\n"
    for cut in range(1, len(replies)):
        for second in range(cut, len(replies)):
            c = _ErrorLines()
            for part in (replies[:cut], replies[cut:second], replies[second:]):
                if part:
                    c.feed(part)
            assert c.got == 6
            assert c.errors == [(2, "MOVED 3999 127.0.0.1:7001"), (4, "ASK 12 127.0.0.1:7002")]
    c = _ErrorLines()
    c.feed(b":1\r\n" * 1000)
    assert c.got == 1000 and not c.errors


@pytest.mark.parametrize("speed_layout", ["grouped", "entity"])
def test_the_writer_splits_each_command_to_the_node_of_its_key(speed_layout):
    """The speed writer's payload split by node: every command of the one-node payload, each
    in the part of the node serving its key's slot, HSETs before PEXPIREs in every part."""
    from ctrstream import features as F
    from ctrstream.store import speed_view as SV
    from ctrstream.store.cluster import _commands_of

    rng = np.random.default_rng(2)
    n = 400
    cells = [
        SV.SpeedCells(
            F.ENTITIES.index(F.ENTITY_BY_NAME[name]),
            [rng.integers(lo, 300, n) for _ in range(parts)],
            rng.integers(0, len(F.RESOLUTIONS), n),
            rng.integers(29_000_000, 29_003_000, n),
            rng.integers(0, 100, n),
            rng.integers(0, 9, n),
            rng.random(n) < 0.5,
        )
        for name, parts, lo in (("ad", 1, 0), ("user_x_ad", 2, 0), ("user", 1, -3))
    ]
    from ctrstream.store import layout as L

    r = SV._Renderer(3_600_000, SV.renew_resolution(0), L.speed_layout(speed_layout))
    one, n_one = r.render(cells)
    owner = np.arange(N_SLOTS) % 3
    routed = r.render_routed(cells, owner)
    assert sum(k for _, k in routed.values()) == n_one and set(routed) == {0, 1, 2}
    every = []
    for node, (parts_, k) in routed.items():
        cmds = _commands_of(b"".join(parts_))
        assert len(cmds) == k
        assert all(owner[key_slot(c[1])] == node for c in cmds)
        names = [c[0] for c in cmds]
        assert names == sorted(names, key=lambda x: x != b"HSET")  # HSETs first
        every += cmds
    assert sorted(every) == sorted(_commands_of(one))
