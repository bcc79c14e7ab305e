"""The speed view in Redis: its writer (the speed layer's sink) and every reader and writer of
it outside the prediction path (reconciliation, the tests' oracle, the demo, benchmarks).

The key and field formats are :mod:`ctrstream.store.layout`'s (one hash per entity id and
event day holding every resolution's buckets of that day, absolute counts). Callers speak in
**cells**: a cell is ``(entity, id, resolution name, event type, bucket)`` (:data:`Cell`;
the id as ``features.entity_id`` writes it, crossed ids joined with ``:``), and a **day
hash** ``(entity, id, day)`` (:data:`DayHash`) is where the cells of one entity id and
event day live (``layout.speed_day``). The speed layer hands its cells as numpy columns
(:class:`SpeedCells`).

What :class:`SpeedViewWriter` sends
-----------------------------------
* per hash of a write call (``layout.SpeedLayout``: one per entity id and day, or per root
  id and day in the grouped layout), **one** ``HSET`` of the absolute impression and click
  counts of every cell of that hash in the call (both fields of every cell; in a layout
  with ``sparse_clicks`` a click count of 0 is not written);
* ``PEXPIRE`` of the hash TTL (``layout.speed_hash_ttl_ms``) for a hash that gets a *new*
  cell (its first write) of the longest-lived resolution: the TTL then covers every bucket
  written to the hash since. Nothing is ever deleted: a day's hash stops growing when the
  day ends and expires a TTL after its last new bucket of that resolution;
* every ``HSET`` of a call before any ``PEXPIRE`` (a ``PEXPIRE`` of a key that does not exist
  yet does nothing).

The commands are rendered with numpy (:func:`render_speed_cells`: constant segments, decimal
integers and per-row choices laid out by :func:`ctrstream.store.resp.layout`, no Python per
cell) into one payload per call, and sent by a writer thread
(:class:`ctrstream.store.resp.BackgroundPipeline`) while the caller goes on; ids or buckets
that ``layout`` cannot print (negative numbers) take a per-hash path packed by hiredis
instead. Why this shape and what it costs: docs/speed-layer.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Self

import numpy as np

from ctrstream import features as F
from ctrstream.config import Settings
from ctrstream.store import layout as L
from ctrstream.store.cluster import (
    UNSERVED,
    Address,
    ClusterError,
    ClusterPipeline,
    Conn,
    NodeParts,
    cluster_seeds,
    connections_for,
    key_slot,
    key_slots,
    slot_tag,
)
from ctrstream.store.connection import RespSocket
from ctrstream.store.nodes import scan_masters
from ctrstream.store.resp import (
    PAD,
    BackgroundPipeline,
    Backoff,
    Choice,
    RetryHook,
    bulk_len,
    encode,
    layout,
    render,
    squeeze,
    with_backoff,
)
from ctrstream.store.scan import gc_paused, read_hashes, scan_keys, text

Cell = tuple[str, str, str, str, int]
"""``(entity, id, resolution name, event type, bucket)``."""
DayHash = tuple[str, str, int]
"""``(entity, id, day)``: the speed-view hash of one entity id and event day."""

_BUCKET_MS = np.array([r.bucket_ms for r in F.RESOLUTIONS], np.int64)
REPAIR_CHUNK = 20_000  # day hashes per pipelined round trip of a repair


def renew_resolution(allowed_lateness_ms: int) -> int:
    """Index (in ``features.RESOLUTIONS``) of the resolution whose new buckets renew a day
    hash's TTL: the longest-lived one (``layout.speed_ttl_ms``)."""
    return max(
        range(len(F.RESOLUTIONS)),
        key=lambda r: L.speed_ttl_ms(F.RESOLUTIONS[r], allowed_lateness_ms),
    )


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class SpeedCells:
    """Cells of one entity to write, as numpy columns of equal length ``n``.

    ``entity``: index in ``features.ENTITIES``; ``id_parts``: one int64 array per field of
    the entity (the id's integer parts, in the order of ``Entity.fields``); ``res``: index
    in ``features.RESOLUTIONS``; ``bucket``; ``imps`` / ``clicks``: absolute counts;
    ``new``: bool, the cell's first write (a new cell of the longest-lived resolution renews
    its hash's TTL). Cells of one day hash may come in any order."""

    entity: int
    id_parts: Sequence[np.ndarray]
    res: np.ndarray
    bucket: np.ndarray
    imps: np.ndarray
    clicks: np.ndarray
    new: np.ndarray

    def __post_init__(self) -> None:
        if not 0 <= self.entity < len(F.ENTITIES):
            raise ValueError(
                f"entity index {self.entity} is not one of features.ENTITIES "
                f"(0..{len(F.ENTITIES) - 1})"
            )
        fields = F.ENTITIES[self.entity].fields
        if len(self.id_parts) != len(fields):
            raise ValueError(
                f"entity {F.ENTITIES[self.entity].name} has {len(fields)} id "
                f"field(s) {fields}, got {len(self.id_parts)} id part array(s)"
            )
        n = len(self.res)
        lengths = {len(a) for a in (*self.id_parts, self.bucket, self.imps, self.clicks, self.new)}
        if lengths - {n}:
            raise ValueError(
                f"the columns of SpeedCells differ in length ({sorted(lengths | {n})}): "
                "give one value per cell in every column"
            )

    def __len__(self) -> int:
        return len(self.res)


def _hash_order(parts: list[np.ndarray], day: np.ndarray) -> np.ndarray:
    """An order of the cells sorted by (day, id) - the cells of one day hash adjacent, in
    any order among themselves. One unstable sort of an int64 id key, then a stable radix
    sort of the few distinct days (why: docs/speed-layer.md, ``group_order``)."""
    if len(parts) == 1:
        key = parts[0]
    else:
        bits = 63 // len(parts)
        if not all(int(p.min()) >= 0 and int(p.max()) < (1 << bits) for p in parts):
            return np.lexsort([*parts[::-1], day])
        key = np.zeros(len(day), np.int64)
        for p in parts:  # order-preserving: the first part in the highest bits
            key = (key << bits) | p
    first = np.argsort(key)
    d = day[first]
    g = d - d.min()
    if int(g.max()) < (1 << 15):
        g = g.astype(np.int16)  # numpy sorts 16-bit integers with a radix sort
    return first[np.argsort(g, kind="stable")]


class _Renderer:
    """The RESP commands of cells (see the module docstring) in a :class:`~ctrstream.store.
    layout.SpeedLayout`, with the constant parts of every key and field built once from
    :mod:`ctrstream.store.layout`. The cells of every entity whose hashes share a root
    (``layout.SpeedMember.root``) are rendered together: one ``HSET`` per root hash."""

    def __init__(self, hash_ttl_ms: int, renew_res: int, speed_layout: L.SpeedLayout) -> None:
        self.hash_ttl_ms = int(hash_ttl_ms)
        self.renew_res = renew_res
        self.layout = speed_layout
        names = [e.name for e in F.ENTITIES]
        self.members = [speed_layout.members[n] for n in names]
        self.root_of = [names.index(m.root) for m in self.members]
        self.key_head = [speed_layout.key_head(F.ENTITIES[r].name) for r in self.root_of]
        self.key_tail = speed_layout.key_tail()
        self.part_sep = L.ID_PART_SEP.encode()
        self.res_sep = L.FIELD_RES_SEP.encode()
        self.tag_head = [(m.tag + L.FIELD_RES_SEP).encode() if m.tag else b"" for m in self.members]
        ti, tc = F.EVENT_TYPES
        self.field_i = [L.speed_field_head(r.name, ti).encode() for r in F.RESOLUTIONS]
        self.field_c = [L.speed_field_head(r.name, tc).encode() for r in F.RESOLUTIONS]
        self.same_len = [len(a) for a in self.field_i] == [len(c) for c in self.field_c]
        # these parts and the layout's functions agree (a changed format fails here, not in Redis)
        for e, m in zip(F.ENTITIES, self.members):
            eid = ID_PART_SEP_B.decode().join(str(7 + k) for k in range(len(e.fields)))
            parts = eid.split(L.ID_PART_SEP)
            key = self.key_head[names.index(e.name)] + self.part_sep.join(
                parts[k].encode() for k in m.key_parts
            )
            fld = self.tag_head[names.index(e.name)]
            if m.rest_parts:
                fld += self.part_sep.join(parts[k].encode() for k in m.rest_parts) + self.res_sep
            if (key + self.key_tail + b"3").decode() != speed_layout.key(e.name, eid, 3) or (
                fld + self.field_i[0] + b"5"
            ).decode() != speed_layout.field(e.name, eid, F.RESOLUTIONS[0].name, ti, 5):
                raise RuntimeError(
                    f"layout {speed_layout.name}: SpeedLayout.key / field no longer match their "
                    "heads (key_head, key_tail, speed_field_head): update both together"
                )

    def render_parts(self, cells: Iterable[SpeedCells]) -> tuple[list[bytes], int]:
        """``(payload parts, number of commands)``: every HSET, then every PEXPIRE."""
        groups: dict[int, list[SpeedCells]] = {}
        for c in cells:
            if len(c):
                groups.setdefault(self.root_of[c.entity], []).append(c)
        hsets, expires, n_cmds = [], [], 0
        for root, cs in groups.items():
            ((_, hs, ex, n),) = self._group(root, cs)
            hsets.append(hs)
            expires.append(ex)
            n_cmds += n
        return hsets + expires, n_cmds

    def render_routed(
        self, cells: Iterable[SpeedCells], owner: np.ndarray
    ) -> dict[int, tuple[list[bytes], int]]:
        """The commands of :meth:`render_parts` split by Redis Cluster node: ``owner`` maps
        a slot to a node index (``cluster.SlotMap.owner``); per node index its ``(payload
        parts, number of commands)``, every HSET before every PEXPIRE. A day hash's commands
        go to the node serving its key's slot (``cluster.key_slots`` of the rendered keys)."""
        hsets: dict[int, list[bytes]] = {}
        expires: dict[int, list[bytes]] = {}
        counts: dict[int, int] = {}
        groups: dict[int, list[SpeedCells]] = {}
        for c in cells:
            if len(c):
                groups.setdefault(self.root_of[c.entity], []).append(c)
        for root, cs in groups.items():
            for node, hs, ex, n in self._group(root, cs, owner):
                hsets.setdefault(node, []).append(hs)
                expires.setdefault(node, []).append(ex)
                counts[node] = counts.get(node, 0) + n
        return {k: (hsets[k] + expires[k], counts[k]) for k in counts}

    def render(self, cells: Iterable[SpeedCells]) -> tuple[bytes, int]:
        """``(payload, number of commands)``: every HSET, then every PEXPIRE."""
        parts, n_cmds = self.render_parts(cells)
        return b"".join(parts), n_cmds

    def _body(self, c: SpeedCells, res: np.ndarray, bucket: np.ndarray) -> np.ndarray:
        """The field-value pairs of ``c``'s cells, one row per cell (unordered)."""
        m = self.members[c.entity]
        imps = np.asarray(c.imps, np.int64)
        clicks = np.asarray(c.clicks, np.int64)
        pre: list[bytes | np.ndarray] = []
        pre_len: np.ndarray | int = 0
        if m.tag:
            rest = [np.asarray(c.id_parts[k], np.int64) for k in m.rest_parts]
            pre = [self.tag_head[c.entity], rest[0]]
            pre_len = len(self.tag_head[c.entity]) + bulk_len(rest[0]) + len(self.res_sep)
            for p in rest[1:]:
                pre += [self.part_sep, p]
                pre_len = pre_len + len(self.part_sep) + bulk_len(p)
            pre.append(self.res_sep)
        fi, fc = Choice(self.field_i, res), Choice(self.field_c, res)
        fi_len = fi.lengths() + bulk_len(bucket) + pre_len
        fc_len = fi_len if self.same_len else fc.lengths() + bulk_len(bucket) + pre_len
        imp_pair: list[Any] = [b"$", fi_len, b"\r\n", *pre, fi, bucket, b"\r\n$"]
        imp_pair += [bulk_len(imps), b"\r\n", imps, b"\r\n"]
        click_pair: list[Any] = [b"$", fc_len, b"\r\n", *pre, fc, bucket, b"\r\n$"]
        click_pair += [bulk_len(clicks), b"\r\n", clicks, b"\r\n"]
        if not self.layout.sparse_clicks:
            return layout(imp_pair + click_pair, len(res))
        with_imps = layout(imp_pair, len(res))
        with_clicks = layout(click_pair, len(res))
        with_clicks[clicks == 0] = PAD  # not written: an absent field reads 0
        return np.hstack([with_imps, with_clicks])

    def _group(
        self, root: int, cs: list[SpeedCells], owner: np.ndarray | None = None
    ) -> list[tuple[int, bytes, bytes, int]]:
        """The commands of the cells of one root's hashes: [(node, HSETs, PEXPIREs, number
        of commands)], one entry per node of ``owner`` (None: one Redis, node 0)."""
        key_cols = len(self.members[cs[0].entity].key_parts)
        res_l, bucket_l, new_l, fields_l = [], [], [], []
        kparts_l: list[list[np.ndarray]] = [[] for _ in range(key_cols)]
        for c in cs:
            res_l.append(np.asarray(c.res, np.int64))
            bucket_l.append(np.asarray(c.bucket, np.int64))
            new_l.append(np.asarray(c.new, bool))
            # fields per cell: both counts, or the impressions alone for a sparse layout's
            # cell without a click
            fields_l.append(
                1 + (np.asarray(c.clicks) != 0)
                if self.layout.sparse_clicks
                else np.full(len(c), 2, np.int64)
            )
            for j, k in enumerate(self.members[c.entity].key_parts):
                kparts_l[j].append(np.asarray(c.id_parts[k], np.int64))
        res_all = np.concatenate(res_l)
        bucket_all = np.concatenate(bucket_l)
        new_all = np.concatenate(new_l)
        kparts_all = [np.concatenate(x) for x in kparts_l]
        day_all = bucket_all * _BUCKET_MS[res_all] // F.DAY_MS
        order = _hash_order(kparts_all, day_all)
        kparts = [p[order] for p in kparts_all]
        day = day_all[order]
        n = len(day)
        differs = day[1:] != day[:-1]
        for p in kparts:
            differs |= p[1:] != p[:-1]
        first = np.r_[True, differs]
        starts = np.flatnonzero(first)
        per_hash = np.add.reduceat(np.concatenate(fields_l)[order].astype(np.int64), starts)
        renew = np.unique((np.cumsum(first) - 1)[(new_all & (res_all == self.renew_res))[order]])
        hparts = [p[starts] for p in kparts]
        hday = day[starts]
        if any(
            len(x) and int(x.min()) < 0
            for c in cs
            for x in (*c.id_parts, c.bucket, c.imps, c.clicks)
        ):
            return self._packed(cs, order, starts, renew, owner)
        pre = self.key_head[cs[0].entity]
        key_segs: list[bytes | np.ndarray] = [hparts[0]]
        key_len = len(pre) + bulk_len(hparts[0]) + len(self.key_tail) + bulk_len(hday)
        for p in hparts[1:]:
            key_segs += [self.part_sep, p]
            key_len += len(self.part_sep) + bulk_len(p)
        key_segs += [self.key_tail, hday]
        # one row per cell: the HSET header and key on the first cell of each hash, then the
        # cell's field-value pairs. Hash k's HSET is rows starts[k] .. starts[k+1]-1 and its key
        # is built from hparts[:][k] and hday[k] (what a per-node router splits by slot)
        head = layout(
            [
                b"*",
                2 + 2 * per_hash,
                b"\r\n$4\r\nHSET\r\n$",
                key_len,
                b"\r\n" + pre,
                *key_segs,
                b"\r\n",
            ],
            len(starts),
        )
        bodies, off = [], 0
        for c, r, b in zip(cs, res_l, bucket_l):
            bodies.append((off, self._body(c, r, b)))
            off += len(r)
        width = max(x.shape[1] for _, x in bodies)
        rows = np.full((n, head.shape[1] + width), PAD, np.uint8)
        rows[starts, : head.shape[1]] = head
        if len(bodies) == 1 and not off - n:
            rows[:, head.shape[1] :] = bodies[0][1][order]
        else:
            pos = np.empty(n, np.int64)  # where each concatenated cell lands in hash order
            pos[order] = np.arange(n)
            for o, body in bodies:
                rows[pos[o : o + len(body)], head.shape[1] : head.shape[1] + body.shape[1]] = body
        if owner is None:
            return [
                (
                    0,
                    squeeze(rows),
                    self._expires(pre, key_segs, key_len, renew),
                    len(starts) + len(renew),
                )
            ]
        # a Redis Cluster: each day hash's commands to the node serving its key's slot
        hash_node = owner[key_slots(layout([pre, *key_segs], len(starts)))]
        cell_node = hash_node[np.cumsum(first) - 1]
        out = []
        for k in np.unique(hash_node).tolist():
            ren = renew[hash_node[renew] == k]
            out.append(
                (
                    k,
                    squeeze(rows[cell_node == k]),
                    self._expires(pre, key_segs, key_len, ren),
                    int(np.count_nonzero(hash_node == k)) + len(ren),
                )
            )
        return out

    def _expires(
        self,
        pre: bytes,
        key_segs: list[bytes | np.ndarray],
        key_len: np.ndarray,
        renew: np.ndarray,
    ) -> bytes:
        """The PEXPIREs of the day hashes ``renew`` (indices of hashes)."""
        if not len(renew):
            return b""
        ttl = str(self.hash_ttl_ms).encode()
        return render(
            [
                b"*3\r\n$7\r\nPEXPIRE\r\n$",
                key_len[renew],
                b"\r\n" + pre,
                *[s if isinstance(s, bytes) else s[renew] for s in key_segs],
                b"\r\n$%d\r\n%s\r\n" % (len(ttl), ttl),
            ],
            len(renew),
        )

    def _packed(
        self,
        cs: list[SpeedCells],
        order: np.ndarray,
        starts: np.ndarray,
        renew: np.ndarray,
        owner: np.ndarray | None = None,
    ) -> list[tuple[int, bytes, bytes, int]]:
        """The same commands, one hiredis-packed command per hash (for negative numbers)."""
        ti, tc = F.EVENT_TYPES
        cells: list[tuple[str, str, str, int, int]] = []  # (key, field_i, field_c, imps, clicks)
        for c in cs:
            ent = F.ENTITIES[c.entity]
            for vals, r, b, i, k in zip(
                zip(*[np.asarray(p).tolist() for p in c.id_parts]),
                np.asarray(c.res).tolist(),
                np.asarray(c.bucket).tolist(),
                np.asarray(c.imps).tolist(),
                np.asarray(c.clicks).tolist(),
            ):
                eid = F.entity_id(ent, dict(zip(ent.fields, vals)))
                name = F.RESOLUTIONS[int(r)].name
                key, fi = self.layout.cell_address(ent.name, eid, name, ti, int(b))
                cells.append((key, fi, self.layout.field(ent.name, eid, name, tc, int(b)), i, k))
        ordered = [cells[j] for j in order.tolist()]
        bounds = [*starts.tolist(), len(ordered)]
        hs, keys = [], []
        for a, z in zip(bounds[:-1], bounds[1:]):
            args: list[Any] = [b"HSET", ordered[a][0]]
            for _, fi, fc, i, k in ordered[a:z]:
                args += [fi, int(i)]
                if k or not self.layout.sparse_clicks:
                    args += [fc, int(k)]
            hs.append(encode(args))
            keys.append(ordered[a][0])
        node = [0 if owner is None else int(owner[key_slot(k)]) for k in keys]
        out = []
        for x in sorted(set(node)):
            h = [c for k, c in enumerate(hs) if node[k] == x]
            ex = [
                encode((b"PEXPIRE", keys[k], self.hash_ttl_ms))
                for k in renew.tolist()
                if node[k] == x
            ]
            out.append((x, b"".join(h), b"".join(ex), len(h) + len(ex)))
        return out


ID_PART_SEP_B = L.ID_PART_SEP.encode()


def render_speed_cells(
    cells: Iterable[SpeedCells],
    hash_ttl_ms: int,
    renew_res: int | None = None,
    speed_layout: L.SpeedLayout | None = None,
) -> tuple[bytes, int]:
    """The RESP commands :class:`SpeedViewWriter` sends for ``cells``: ``(payload, number of
    commands)``. ``renew_res``: the resolution whose new cells renew a hash's TTL (default:
    :func:`renew_resolution` without allowed lateness); ``speed_layout``: default the
    configured one (``layout.speed_layout``)."""
    return _Renderer(
        hash_ttl_ms,
        renew_resolution(0) if renew_res is None else renew_res,
        speed_layout or L.speed_layout(),
    ).render(cells)


@dataclass(frozen=True)
class WriterLoss:
    """Redis came back without some payloads it had acknowledged to a
    :class:`SpeedViewWriter` (restarted without its data, or with an append-only file that
    missed the last writes): Redis holds payloads ``1..held_seq`` of this writer, not
    ``held_seq + 1 .. acked_seq``. Every cell those payloads wrote may be gone."""

    held_seq: int
    acked_seq: int
    run_id_before: str | None
    run_id_after: str | None


def _run_id(conn: RespSocket) -> str | None:
    """The Redis server's ``run_id`` (new at every start of the server)."""
    info = conn.call("INFO", "server")
    for line in bytes(info).decode(errors="replace").splitlines():
        if line.startswith("run_id:"):
            return line.split(":", 1)[1].strip()
    return None


class SpeedViewWriter:
    """Writes cells to the speed view (see the module docstring) through a writer thread.

    :meth:`write` renders and queues one payload and returns before Redis answers; it blocks
    while ``max_pending`` payloads are unacknowledged (back-pressure). :meth:`drain` returns
    once Redis acknowledged everything written so far and raises the first error. ``done``
    callbacks run in the writer thread after their payload's acknowledgement.
    ``hash_ttl_ms``: the day hashes' TTL (default ``layout.speed_hash_ttl_ms`` of the
    settings' allowed lateness; benchmarks give throw-away data a shorter life).

    A long-running writer (the speed layer's) gives ``marker``, a name unique to the process,
    and ``backoff``:

    * a lost connection is retried with ``backoff`` until Redis answers
      (:class:`ctrstream.store.resp.BackgroundPipeline`; ``on_retry`` hears of each failed
      attempt): no payload is dropped and none is acknowledged before Redis has it;
    * every payload ends with ``SET`` of the writer's sequence marker
      (``layout.speed_writer_marker``) to the payload's number, so Redis always holds the
      number of the last payload it executed. After a new connection the writer reads the
      marker back: a marker behind the last acknowledged payload (or gone) means Redis lost
      writes it had acknowledged - a restart without persistence, or an append-only file
      that missed its last writes (Redis' log is a prefix of the commands it executed, so
      the marker tells where it ends). Each such loss is appended to :attr:`losses` and
      given to ``on_loss`` (in the writer thread); the owner of the cells re-writes them.
      :meth:`write_seq` tells which payload carried a write."""

    def __init__(
        self,
        settings: Settings,
        max_pending: int = 2,
        hash_ttl_ms: int | None = None,
        *,
        marker: str | None = None,
        backoff: Backoff | None = None,
        on_retry: RetryHook | None = None,
        on_loss: Callable[[WriterLoss], None] | None = None,
    ) -> None:
        lateness = int(settings.allowed_lateness_s * 1000)
        ttl = L.speed_hash_ttl_ms(lateness) if hash_ttl_ms is None else int(hash_ttl_ms)
        if ttl <= 0:
            raise ValueError(f"hash_ttl_ms must be positive, got {ttl}")
        self.hash_ttl_ms = ttl
        self.layout = L.speed_layout(settings.speed.layout)
        self.renderer = _Renderer(ttl, renew_resolution(lateness), self.layout)
        self.settings = settings
        self.backoff = backoff
        self.on_retry = on_retry
        self.marker = marker
        self.marker_key = None if marker is None else L.speed_writer_marker(marker)
        self.on_loss = on_loss
        self.losses: list[WriterLoss] = []
        self.seq = 0  # payloads submitted
        self.acked_seq = 0  # the last payload Redis acknowledged
        self.run_id: str | None = None
        self._connected = False
        self._lock = threading.Lock()
        # a Redis Cluster (settings.redis.cluster): one pipeline per master, one writer thread
        self.cluster = connections_for(settings) if cluster_seeds(settings) else None
        self._node_markers: dict[Address, bytes] = {}  # per master: its sequence marker key
        self._node_seen: set[Address] = set()
        self._masters: tuple[int, list[int]] = (-1, [])  # (map epoch, master indices)
        # a cluster: each master's part ends with WAIT for its replicas (redis.wait_replicas)
        rs = settings.redis
        self.wait = (
            encode((b"WAIT", rs.wait_replicas, rs.wait_timeout_ms))
            if self.cluster is not None and rs.wait_replicas > 0
            else None
        )
        self.pipe: BackgroundPipeline
        if self.cluster is not None:
            self.pipe = ClusterPipeline(
                self.cluster,
                max_pending=max_pending,
                backoff=backoff,
                on_retry=on_retry,
                on_connect=self._on_node_connect if marker is not None else None,
            )
        else:
            self.pipe = BackgroundPipeline(
                settings,
                max_pending=max_pending,
                backoff=backoff,
                on_retry=on_retry,
                on_connect=self._on_connect if marker is not None else None,
            )

    def _on_connect(self, conn: RespSocket) -> None:
        """A new connection (writer thread): does Redis still hold every payload it
        acknowledged?"""
        run_id = _run_id(conn)
        acked = self.acked_seq
        if self._connected and acked:
            got = conn.call("GET", self.marker_key)
            held = int(got) if got is not None else 0
            if held < acked:
                loss = WriterLoss(held, acked, self.run_id, run_id)
                self.losses.append(loss)
                if self.on_loss is not None:
                    self.on_loss(loss)
        self._connected = True
        self.run_id = run_id

    def _on_node_connect(self, addr: Address, conn: Conn) -> None:
        """A new connection to a cluster node (writer thread): :meth:`_on_connect` per
        node, against the marker this writer keeps on that node. A marker whose slot has
        moved to another node since (a reshard: the node answers ``MOVED``) is not checked."""
        run_id = _run_id(conn)  # type: ignore[arg-type]
        acked, key = self.acked_seq, self._node_markers.get(addr)
        keys = [key] if addr in self._node_seen and key is not None else []
        if acked:
            keys += self._inherited_markers(addr)
        for k in keys:
            conn.send_packed(encode((b"GET", k)))
            got = conn.read_raw_reply()
            if not isinstance(got, Exception):
                held = int(got) if got is not None else 0
                if held < acked:
                    loss = WriterLoss(held, acked, self.run_id, run_id)
                    self.losses.append(loss)
                    if self.on_loss is not None:
                        self.on_loss(loss)
                    break
        self._node_seen.add(addr)
        self.run_id = run_id

    def _inherited_markers(self, addr: Address) -> list[bytes]:
        """This writer's markers kept on other nodes whose slot ``addr`` serves now: a
        replica promoted after its master died. Replication is asynchronous, so the promoted
        node may lack the last payloads its master acknowledged (docs/redis-cluster.md): its
        copy of the master's marker tells."""
        assert self.cluster is not None
        m = self.cluster.map
        out = []
        for old, k in self._node_markers.items():
            if old == addr:
                continue
            owner = int(m.owner[key_slot(k)])
            if owner >= 0 and m.nodes[owner] == addr:
                out.append(k)
        return out

    def _node_marker(self, marker: str, owner: np.ndarray, node: int) -> bytes:
        """The key of writer ``marker``'s sequence marker on cluster node ``node`` (index in
        the slot map): tagged with the node's first slot, so that it lives on that node."""
        first = int(np.argmax(owner == node))
        return L.speed_writer_marker(f"{marker}:{{{slot_tag(first)}}}").encode()

    def held_seq(self, marker: str) -> int:
        """The number of the last payload of writer ``marker`` (this one's, or an earlier
        process's) that Redis holds; 0 when it holds none (or the marker expired, a hash TTL
        after that writer's last payload). On its own connection, retried like the writes
        while Redis cannot be reached. On a Redis Cluster: the lowest of the writer's markers
        on the masters (each payload sets the marker on every master; a master whose first
        slot changed since the marker was written counts as holding none)."""

        def read_cluster() -> int:
            router = connections_for(self.settings, timeout=5.0)
            try:
                m = router.ensure_map()
                owner = m.owner
                keys = [self._node_marker(marker, owner, k) for k in _masters_of(owner)]
                got = router.execute([(b"GET", k) for k in keys], keys)
            finally:
                router.close()
            return min((int(g) if g is not None else 0 for g in got), default=0)

        if self.cluster is not None:
            return with_backoff(read_cluster, self.backoff, self.on_retry)

        def read() -> int:
            conn = RespSocket.from_settings(self.settings, timeout=5.0)
            try:
                got = conn.call("GET", L.speed_writer_marker(marker))
            finally:
                conn.close()
            return int(got) if got is not None else 0

        return with_backoff(read, self.backoff, self.on_retry)

    def write(self, cells: Iterable[SpeedCells], done: Callable[[], None] | None = None) -> int:
        """Render ``cells`` and queue them; returns the number of commands queued (0: nothing
        to write, and ``done`` is not called)."""
        return self._write(cells, done)[0]

    def write_seq(
        self, cells: Iterable[SpeedCells], done: Callable[[], None] | None = None
    ) -> int | None:
        """Like :meth:`write`; returns the number of the payload that carries the cells
        (None: nothing to write). A :class:`WriterLoss` with ``held_seq`` below it may have
        lost them."""
        return self._write(cells, done)[1]

    def _write(
        self, cells: Iterable[SpeedCells], done: Callable[[], None] | None
    ) -> tuple[int, int | None]:
        if self.cluster is not None:
            return self._write_cluster(cells, done)
        parts, n_cmds = self.renderer.render_parts(cells)
        if not n_cmds:
            return 0, None
        with self._lock:  # payload numbers in the order of submission
            self.seq += 1
            seq = self.seq
            if self.marker_key is not None:  # last: executed after every cell of the payload
                parts.append(encode((b"SET", self.marker_key, seq, b"PX", self.hash_ttl_ms)))
            payload = b"".join(parts)

            def acked() -> None:
                self.acked_seq = seq
                if done is not None:
                    done()

            self.pipe.submit(
                payload, n_cmds + (self.marker_key is not None), one_line=True, done=acked
            )
        return n_cmds, seq

    def _write_cluster(
        self, cells: Iterable[SpeedCells], done: Callable[[], None] | None
    ) -> tuple[int, int | None]:
        """:meth:`_write` on a Redis Cluster: the payload's rows split by the node serving
        each day hash's slot, one part per master; with a ``marker``, every master's part
        ends with the ``SET`` of this writer's marker on that node (so each node holds the
        number of the last payload it executed, and :meth:`held_seq` reads the lowest); with
        ``redis.wait_replicas`` > 0, then with ``WAIT wait_replicas wait_timeout_ms``, so
        that a payload is acknowledged (and a snapshot's drain returns) only once each
        master's replicas have it or the timeout passed (replication is asynchronous: what
        a failover can lose without it, docs/redis-cluster.md)."""
        assert self.cluster is not None
        try:
            m = self.cluster.ensure_map()
        except ClusterError as e:
            if self.backoff is None:
                raise
            m = self.cluster.map  # the writer thread waits for the cluster (backoff)
            if not m.nodes:
                raise ConnectionError(str(e)) from e
        owner, nodes = m.owner, list(m.nodes)
        routed = self.renderer.render_routed(cells, owner)
        n_cmds = sum(n for _, n in routed.values())
        if not n_cmds:
            return 0, None
        if self._masters[0] != m.epoch:
            self._masters = (m.epoch, _masters_of(owner))
        targets = routed.keys() | (set(self._masters[1]) if self.marker is not None else set())
        with self._lock:  # payload numbers in the order of submission
            self.seq += 1
            seq = self.seq
            parts: NodeParts = {}
            for k in sorted(targets):
                # a slot no node serves (a failover in progress): routed command by command
                addr = nodes[k] if k >= 0 else UNSERVED
                body, n = routed.get(k, ([], 0))
                if self.marker is not None and k >= 0:
                    key = self._node_markers.get(addr)
                    if key is None:
                        key = self._node_markers[addr] = self._node_marker(self.marker, owner, k)
                    body = [*body, encode((b"SET", key, seq, b"PX", self.hash_ttl_ms))]
                    n += 1
                if self.wait is not None and n:
                    body = [*body, self.wait]  # acknowledged once replicated (or timed out)
                    n += 1
                prev = parts.get(addr)
                if prev is not None:
                    body, n = [prev[0], *body], n + prev[1]
                parts[addr] = (b"".join(body), n)

            def acked() -> None:
                self.acked_seq = seq
                if done is not None:
                    done()

            total = sum(n for _, n in parts.values())
            self.pipe.submit(parts, total, one_line=True, done=acked)  # type: ignore[arg-type]
        return n_cmds, seq

    def drain(self) -> None:
        """Return once Redis has acknowledged everything written so far (raises its error)."""
        self.pipe.drain()

    def close(self) -> None:
        """Drain, then stop the writer thread and close its connection."""
        self.pipe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _masters_of(owner: np.ndarray) -> list[int]:
    """The node indices that serve at least one slot of a slot map."""
    return [int(k) for k in np.unique(owner[owner >= 0])]


# --------------------------------------------------------------------------- reading


def _layout(speed_layout: L.SpeedLayout | None) -> L.SpeedLayout:
    return speed_layout if speed_layout is not None else L.speed_layout()


class SpeedScan(NamedTuple):
    """The whole speed view, as reconciliation compares it."""

    cells: dict[str, dict[tuple[str, str, str], dict[tuple[str, int], int]]]
    """resolution name -> {(entity, id, resolution name): {(event type, bucket): count}}
    (an entity's day hashes merged)"""
    present: set[DayHash]
    """the (entity, id, day) that hold any cell (in the entity layout: the day hashes)"""


def _root_hashes(
    client: Any, sl: L.SpeedLayout, strict: bool = False
) -> Iterable[tuple[tuple[str, str, int], Iterable[tuple[bytes, bytes]]]]:
    """``((root entity, root id, day), [(field, value)])`` of every hash of the speed view
    in layout ``sl``; ``strict``: a key under the prefix outside the layout raises."""

    def parse(key: str) -> tuple[str, str, int] | None:
        parsed = sl.parse_key(key)
        if parsed is None and strict:
            raise ValueError(
                f"{key!r} is under the speed view's prefix but is not a hash of the "
                f"{sl.name} layout (layout.SpeedLayout.key)"
            )
        return parsed

    return read_hashes(client, scan_keys(client, L.SPEED_PATTERN, parse))


def scan_speed_view(client: Any, speed_layout: L.SpeedLayout | None = None) -> SpeedScan:
    """The whole speed view of a redis-py client's database: one SCAN and one bulk HGETALL
    per hash (:mod:`ctrstream.store.scan`). A hash that expired between the SCAN and its
    read is left out; keys and fields outside the layout (default: the configured one) are
    skipped."""
    sl = _layout(speed_layout)
    out: dict[str, dict[tuple[str, str, str], dict[tuple[str, int], int]]] = {
        res.name: {} for res in F.RESOLUTIONS
    }
    present: set[DayHash] = set()
    parse = sl.parse_field
    with gc_paused():
        for (root, rid, day), h in _root_hashes(client, sl):
            for f, v in h:
                parsed = parse(root, rid, f)
                if parsed is None:
                    continue
                entity, eid, res, et, b = parsed
                present.add((entity, eid, day))
                view, ident = out[res], (entity, eid, res)
                cells = view.get(ident)
                if cells is None:
                    cells = view[ident] = {}
                cells[(et, b)] = int(v)  # another day of the same entity: distinct buckets
    return SpeedScan(out, present)


def read_speed_view(client: Any, speed_layout: L.SpeedLayout | None = None) -> dict[Cell, int]:
    """Every non-zero cell of the speed view in a redis-py client's database. Strict: a key
    under the speed view's prefix or a field that is not of its layout (default: the
    configured one) raises ValueError."""
    sl = _layout(speed_layout)
    out: dict[Cell, int] = {}
    for (root, rid, day), h in _root_hashes(client, sl, strict=True):
        for f, v in h:
            parsed = sl.parse_field(root, rid, f)
            if parsed is None:
                raise ValueError(
                    f"field {f!r} of speed-view hash {sl.root_key(root, rid, day)!r} is not "
                    f"a speed-view cell of the {sl.name} layout (layout.SpeedLayout.field)"
                )
            n = int(v)
            if n:
                entity, eid, res, et, b = parsed
                out[(entity, eid, res, et, b)] = n
    return out


def count_speed_hashes(client: Any, speed_layout: L.SpeedLayout | None = None) -> dict[str, int]:
    """The number of hashes of every root entity in the speed view (SCAN on every master;
    keys outside the layout are not counted)."""
    sl = _layout(speed_layout)
    counts: dict[str, int] = {}
    for key in scan_masters(client, L.SPEED_PATTERN, 10_000):
        parsed = sl.parse_key(text(key))
        if parsed is not None:
            counts[parsed[0]] = counts.get(parsed[0], 0) + 1
    return counts


def read_speed_cells(
    client: Any, cells: Sequence[Cell], speed_layout: L.SpeedLayout | None = None
) -> list[int]:
    """The counts of the given cells (0 for a cell the speed view does not hold), in one
    pipelined round trip."""
    sl = _layout(speed_layout)
    pipe = client.pipeline(transaction=False)
    for cell in cells:
        pipe.hget(*sl.cell_address(*cell))
    return [0 if v is None else int(v) for v in pipe.execute()]


def speed_hashes_exist(
    client: Any, hashes: Sequence[DayHash], speed_layout: L.SpeedLayout | None = None
) -> list[bool]:
    """Whether each (entity, id, day) holds any cell, in one pipelined round trip (a root's:
    ``EXISTS`` of its hash; a member of a grouped hash: ``HSCAN`` of its fields' prefix, to the
    end of the hash)."""
    sl = _layout(speed_layout)
    pipe = client.pipeline(transaction=False)
    for entity, eid, day in hashes:
        pipe.exists(sl.key(entity, eid, day))
    out = []
    for there, (entity, eid, day) in zip(pipe.execute(), hashes):
        pre = sl.field_prefix(entity, eid)
        if there and pre:
            key = sl.key(entity, eid, day)
            there = any(True for _ in client.hscan_iter(key, match=pre + "*", count=1000))
        out.append(bool(there))
    return out


def repair_speed_cells(
    client: Any,
    repairs: Mapping[Cell, int | None],
    hash_ttl_ms: int,
    speed_layout: L.SpeedLayout | None = None,
) -> int:
    """Overwrite cells of the speed view: a count sets the cell, None deletes it. Per hash
    (in the order of their first cell in ``repairs``) one ``HSET`` of its new values, one
    ``HDEL`` of its deleted cells and ``PEXPIRE hash_ttl_ms NX`` - a hash this creates
    (absent, or expired since it was read) gets the speed view's TTL, an existing hash
    keeps its own. Absolute values: running it twice changes nothing. Returns the number of
    cells written or deleted."""
    sl = _layout(speed_layout)
    by_hash: dict[str, tuple[dict[str, int], list[str]]] = {}
    for cell, value in repairs.items():
        key, fld = sl.cell_address(*cell)
        sets, dels = by_hash.get(key) or by_hash.setdefault(key, ({}, []))
        if value is None:
            dels.append(fld)
        else:
            sets[fld] = int(value)
    items = list(by_hash.items())
    for i in range(0, len(items), REPAIR_CHUNK):
        pipe = client.pipeline(transaction=False)
        for key, (sets, dels) in items[i : i + REPAIR_CHUNK]:
            if sets:
                pipe.hset(key, mapping=sets)
            if dels:
                pipe.hdel(key, *dels)
            pipe.execute_command("PEXPIRE", key, int(hash_ttl_ms), "NX")
        pipe.execute()
    return len(repairs)
