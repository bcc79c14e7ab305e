"""The read plan: which keys and fields one feature read touches, and how replies become counts.

Pure functions and plans, no I/O: :mod:`ctrstream.store.reader` drives them against Redis.

The lambda merge (``mode="lambda"``): for every resolution the window at ``t`` is buckets
``b0 .. b1 = features.window_buckets``. With the served batch view ``V`` and its cut-off
``T``:

* closed buckets whose end ``(b + 1) * bucket_ms <= T`` come from the batch view (the truth),
* later buckets - and always the current, still open bucket ``b1`` - from the speed view,
* long windows (``LONG_WINDOWS``) from the batch view only (zero while there is none).

``mode="speed"`` reads every bucket from the speed view (long windows zero) and
``mode="batch"`` every bucket and long window from the batch view.

Entities are named by entity keys (``layout.entity_key``: ``ad:4``, ``user_x_ad:17:4``). A
crossed entity's **parents** are its single-field parts (``user:17`` and ``ad:4``): every
event counted for the crossed entity is counted, in the same bucket, for each part, so
where a part's window is empty the crossed window is empty too and the script does not read
it (exact pruning). Calls list the keys without parents first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ctrstream import features as F
from ctrstream.store import layout as L

Mode = Literal["lambda", "speed", "batch"]

N_RES = len(F.RESOLUTIONS)
N_LONG = len(F.LONG_WINDOWS)

# crossed entity -> [(single-field parent entity, position of its field in the id)]
PARENTS: dict[str, list[tuple[str, int]]] = {
    e.name: [
        (p.name, e.fields.index(p.fields[0]))
        for p in F.ENTITIES
        if len(p.fields) == 1 and p.fields[0] in e.fields
    ]
    for e in F.ENTITIES
    if len(e.fields) > 1
}
# entities that do not depend on the user: shared by every request, so worth caching
SHARED_ENTITIES = frozenset(e.name for e in F.ENTITIES if "user_id" not in e.fields)
# read order of rows: single-field entities first, so that a crossed entity's parents are
# always earlier in the call (the script prunes with them)
ROW_ORDER = sorted(range(len(F.ENTITIES)), key=lambda k: len(F.ENTITIES[k].fields) > 1)
_NAMES = [e.name for e in F.ENTITIES]
_PARENT_COLS = {
    k: [_NAMES.index(pe) for pe, _ in PARENTS.get(F.ENTITIES[k].name, [])]
    for k in range(len(F.ENTITIES))
}
MAX_PARENTS = max([len(v) for v in PARENTS.values()] + [1])  # parent slots per key


@dataclass(frozen=True)
class View:
    """What a read needs to know of the served batch view: the pointer's value (None: no
    pointer) and, when that names a complete view, its version, cut-off and whether it
    carries the ``:sums`` hashes (``version`` None: no view is merged in)."""

    pointer: str | None = None
    version: str | None = None
    cutoff_ms: int | None = None
    sums: bool = False


NO_VIEW = View()


def window_plan(t_ms: int) -> list[tuple[F.Resolution, int, int]]:
    """``(resolution, first bucket, last bucket)`` of every window at ``t_ms``."""
    out = []
    for r in F.RESOLUTIONS:
        w = F.window_buckets(t_ms, r)
        out.append((r, w.start, w.stop - 1))
    return out


def split(mode: str, view: View, r: F.Resolution, b0: int, b1: int) -> tuple[int, int, int]:
    """Batch bucket range ``[b0, bhi]`` and speed bucket range ``[slo, b1]`` (either may be
    empty) of one window."""
    if mode == "batch":
        return (b0, b1, b1 + 1) if view.version is not None else (b0, b0 - 1, b1 + 1)
    if view.version is None or mode == "speed":
        return b0, b0 - 1, b0
    assert view.cutoff_ms is not None
    bhi = min(b1 - 1, view.cutoff_ms // r.bucket_ms - 1)
    return b0, bhi, max(b0, bhi + 1)


# --------------------------------------------------------------------------- keys and parents


def no_parents(n: int) -> np.ndarray:
    return np.full((n, MAX_PARENTS), -1, dtype=np.int64)


def parents_of_keys(keys: list[str]) -> np.ndarray:
    """(len(keys), MAX_PARENTS): per key the 0-based indices of its single-field parents
    among ``keys`` (-1: none)."""
    pos = {k: i for i, k in enumerate(keys)}
    out = no_parents(len(keys))
    for n, k in enumerate(keys):
        ent, eid = L.split_entity_key(k)
        spec = PARENTS.get(ent)
        if not spec:
            continue
        parts = eid.split(":")
        if len(parts) <= max(j for _, j in spec):
            continue
        found = [
            q for q in (pos.get(L.entity_key(pe, parts[j])) for pe, j in spec) if q is not None
        ]
        out[n, : len(found)] = found
    return out


def _fill_parents(
    parents: np.ndarray, base: int, k: int, inv: np.ndarray, first: np.ndarray
) -> None:
    """Parents of the distinct ids of entity column ``k`` (keys ``base ..``): the keys of the
    parent columns on the first row of each id (a parent's id is a part of the crossed id)."""
    pcols = _PARENT_COLS[k]
    if pcols:
        parents[base : base + len(first), : len(pcols)] = inv[first][:, pcols]


def keys_of_rows(entity_ids: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``entity_ids`` (rows, len(ENTITIES)) of ids as text -> the distinct entity keys
    (single-field entities first), the inverse index (rows, len(ENTITIES)) into them and each
    key's parents (:func:`parents_of_keys`) - without parsing a single key."""
    ids = np.asarray(entity_ids, dtype=object)
    rows = ids.shape[0]
    inv = np.empty((rows, len(F.ENTITIES)), dtype=np.int64)
    keys: list[str] = []
    spans = []
    for k in ROW_ORDER:
        prefix = L.entity_key_prefix(_NAMES[k])
        seen: dict[Any, int] = {}
        idx = [seen.setdefault(x, len(seen)) for x in ids[:, k].tolist()]
        base = len(keys)
        keys += [prefix + str(x) for x in seen]
        inv[:, k] = np.asarray(idx, dtype=np.int64) + base
        spans.append((k, base, len(seen)))
    parents = no_parents(len(keys))
    for k, base, n in spans:
        if _PARENT_COLS[k] and n:
            _, first = np.unique(inv[:, k], return_index=True)
            _fill_parents(parents, base, k, inv, first)
    return keys, inv, parents


def keys_of_columns(columns: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Like :func:`keys_of_rows`, straight from event columns (``columns[field]``: one value
    per row; ids as ``features.entity_id`` writes them): every field is factorized once and a
    crossed entity's distinct ids are distinct tuples of its fields' codes - no per-row text."""
    codes: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}

    def factor(f: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if f not in codes:
            col = np.asarray(columns[f])
            if col.dtype.kind not in "iu":
                col = col.astype(str)
            vals, inv_f = np.unique(col, return_inverse=True)
            codes[f] = (vals, inv_f.reshape(-1), [str(v) for v in vals.tolist()])
        return codes[f]

    rows = len(np.asarray(columns[F.ENTITIES[0].fields[0]]))
    inv = np.empty((rows, len(F.ENTITIES)), dtype=np.int64)
    keys: list[str] = []
    spans = []
    for k in ROW_ORDER:
        e = F.ENTITIES[k]
        prefix = L.entity_key_prefix(e.name)
        base = len(keys)
        if len(e.fields) == 1:
            _, code, text = factor(e.fields[0])
            keys += [prefix + x for x in text]
            inv[:, k] = code + base
            continue
        code = np.zeros(rows, dtype=np.int64)
        for f in e.fields:  # mixed radix of the fields' codes
            vals, c, _ = factor(f)
            code = code * len(vals) + c
        _, first, local = np.unique(code, return_index=True, return_inverse=True)
        parts = []
        for f in e.fields:
            _, c, text = factor(f)
            parts.append([text[j] for j in c[first].tolist()])
        keys += [prefix + ":".join(t) for t in zip(*parts, strict=True)]
        inv[:, k] = local.reshape(-1) + base
        spans.append((k, base, first))
    parents = no_parents(len(keys))
    for k, base, first in spans:
        _fill_parents(parents, base, k, inv, first)
    return keys, inv, parents


def unique_entity_keys(entity_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``entity_ids`` (rows, len(ENTITIES)) of ids as text -> the unique entity keys and
    the inverse index (rows, len(ENTITIES)) into them (the plain reference of
    :func:`keys_of_rows`)."""
    names = np.array([L.entity_key_prefix(e.name) for e in F.ENTITIES], dtype=object)
    full = names[None, :] + np.asarray(entity_ids, dtype=object)
    uniq, inv = np.unique(full.ravel().astype(str), return_inverse=True)
    return uniq, inv.reshape(full.shape)


# --------------------------------------------------------------------------- the script


class ScriptPlan:
    """``KEYS`` and ``ARGV`` of one call of ``read.lua`` for a mode, a served view and an
    event time (see the script's header for the protocol): the fields of every bucket the
    call reads, listed once for all entities, and per entity its keys.

    Speed part: per entity one ``HMGET`` per event day of its speed hash of that day
    (``layout.speed_key``) with the fields of every resolution's speed buckets on that day;
    the speed buckets of a read span one day, or two when a window crosses a UTC midnight.
    Batch part: views with ``:sums`` hashes are read with **one** ``HMGET`` of a few fields
    per entity (the suffix sums at both ends of every window's batch part, and the long
    windows); older views bucket by bucket (one ``HMGET`` per resolution, one of the
    ``:long`` hash)."""

    def __init__(self, mode: str, view: View, t_ms: int):
        self.mode, self.view = mode, view
        use_batch = mode != "speed" and view.version is not None
        sums = use_batch and view.sums
        self.n_batch_keys = 0 if not use_batch else 1 if sums else N_RES + 1
        per_res: list[tuple[int, int, int, F.Resolution, int]] = []
        days: set[int] = set()
        for r, b0, b1 in window_plan(t_ms):
            lo, bhi, slo = split(mode, view, r, b0, b1)
            per_res.append((lo, bhi, slo, r, b1))
            days.update(L.speed_day(b, r) for b in range(slo, b1 + 1))
        self.days = sorted(days)
        slot = {d: x + 1 for x, d in enumerate(self.days)}
        long_fields = [L.long_field(et, w) for w in F.LONG_WINDOWS for et in F.EVENT_TYPES]
        sums_fields = list(long_fields) if sums else []
        args: list[Any] = [mode, view.pointer or "", self.n_batch_keys, len(self.days), N_RES]
        for b0, bhi, slo, r, b1 in per_res:
            args.append(b1 - slo + 1 if b1 >= slo else 0)
            for b in range(slo, b1 + 1):
                args += [
                    slot[L.speed_day(b, r)],
                    b * r.bucket_ms,
                    *(L.speed_field(r.name, et, b) for et in F.EVENT_TYPES),
                ]
            lo_i = hi_i = 0
            if sums:
                assert view.cutoff_ms is not None
                vhi = view.cutoff_ms // r.bucket_ms - 1  # the view holds buckets .. vhi
                lo, hi = max(b0, vhi + 1 - r.n_buckets), min(bhi, vhi)
                if lo <= hi:
                    lo_i = len(sums_fields) + 1
                    sums_fields += [L.suffix_field(r.name, et, lo) for et in F.EVENT_TYPES]
                    if hi < vhi:
                        hi_i = len(sums_fields) + 1
                        sums_fields += [L.suffix_field(r.name, et, hi + 1) for et in F.EVENT_TYPES]
            args += [lo_i, hi_i]
            bucket_fields = []
            if self.n_batch_keys > 1:
                bucket_fields = [
                    L.batch_field(et, b) for b in range(b0, bhi + 1) for et in F.EVENT_TYPES
                ]
            args += [len(bucket_fields), *bucket_fields]
        args += [len(sums_fields), *sums_fields, N_LONG, *long_fields, MAX_PARENTS]
        self.head = args

    def keys_of(self, entity_keys: list[str]) -> list[str]:
        """The script's ``KEYS``: the pointer, then per entity its batch keys and day keys."""
        cols: list[list[str]] = []
        v = self.view.version
        if self.n_batch_keys == 1:
            assert v is not None
            cols.append(L.batch_sums_keys(v, entity_keys))
        elif self.n_batch_keys > 1:
            assert v is not None
            for r in F.RESOLUTIONS:
                cols.append([L.batch_key(v, *L.split_entity_key(k), r.name) for k in entity_keys])
            cols.append([L.batch_long_key(v, *L.split_entity_key(k)) for k in entity_keys])
        for d in self.days:
            cols.append(L.speed_keys(entity_keys, d))
        n = len(entity_keys)
        keys: list[str] = [L.BATCH_POINTER_KEY] * (1 + n * len(cols))
        for j, col in enumerate(cols):  # interleaved: entity by entity (C-level slices)
            keys[1 + j :: len(cols)] = col
        return keys

    def call(
        self, keys: list[str], parents: np.ndarray | None = None
    ) -> tuple[list[str], list[Any], np.ndarray]:
        """``(KEYS, ARGV, order)`` to read ``keys`` (entity keys); ``order``: the call order
        (indices into ``keys``: the keys without parents first, each key after its parents).
        ``parents``: per key 0-based indices among ``keys``, -1 for none (default: found by
        parsing the keys); a parent must have no parents itself (single-field entities)."""
        args, order = self.call_args(keys, parents)
        return self.keys_of([keys[i] for i in order.tolist()]), args, order

    def call_args(
        self, keys: list[str], parents: np.ndarray | None = None
    ) -> tuple[list[Any], np.ndarray]:
        """``(ARGV, order)`` of :meth:`call`, without building its ``KEYS`` (a Redis
        Cluster reader builds them once for routing and slices them per node)."""
        if parents is None:
            parents = parents_of_keys(keys)
        parents = np.asarray(parents, dtype=np.int64).reshape(len(keys), MAX_PARENTS)
        has = (parents >= 0).any(axis=1)
        plain = np.flatnonzero(~has)
        crossed = np.flatnonzero(has)
        order = np.concatenate([plain, crossed])
        pos = np.empty(len(keys) + 1, dtype=np.int64)  # pos[-1]: no parent -> 0
        pos[order] = np.arange(1, len(keys) + 1)
        pos[-1] = 0
        args = [*self.head, len(plain), len(keys)]
        if len(crossed):
            args += pos[parents[crossed]].ravel().tolist()
        return args, order


def parse_script_reply(
    reply: Any, n_keys: int, order: np.ndarray | None = None
) -> tuple[str | None, bool, np.ndarray, np.ndarray]:
    """-> (pointer value or None, moved, counts (n_keys, N_WINDOWS, 2), newest (n_keys,)), in
    key order (``order``: the call order of :meth:`ScriptPlan.call`). ``moved``: the pointer
    was not the one planned for (nothing was read)."""
    ptr = reply[0]
    ptr = (ptr.decode() if isinstance(ptr, bytes) else ptr) or None
    if reply[1] in (b"moved", "moved"):
        return ptr, True, np.zeros((0, F.N_WINDOWS, 2), np.int64), np.zeros(0, np.int64)
    vals = np.frombuffer(reply[1], dtype="<i8").reshape(n_keys, 2 * F.N_WINDOWS + 1)
    if order is not None:
        out = np.empty_like(vals)
        out[order] = vals
        vals = out
    return ptr, False, vals[:, :-1].reshape(n_keys, F.N_WINDOWS, 2), vals[:, -1]


# --------------------------------------------------------------------------- the pipeline


class PipelinePlan:
    """Commands of the pipeline method for one view and ``t`` and how to parse them (the
    per-bucket batch hashes: the reference the script is tested against). The first command
    reads the pointer, so a switch is noticed in the same round trip. Per key: one ``HMGET``
    per resolution of its batch-view hash, one of its speed-view hash of every event day
    with speed buckets (the fields of every resolution's buckets of that day, as in the
    script), one of its long windows."""

    def __init__(self, mode: str, view: View, t_ms: int):
        self.view = view
        per_res = []
        by_day: dict[int, list[tuple[int, int]]] = {}  # day -> [(window index, bucket)]
        for k, (r, b0, b1) in enumerate(window_plan(t_ms)):
            lo, bhi, slo = split(mode, view, r, b0, b1)
            bf = [L.batch_field(t, b) for b in range(lo, bhi + 1) for t in F.EVENT_TYPES]
            per_res.append((r, bf))
            for b in range(slo, b1 + 1):
                by_day.setdefault(L.speed_day(b, r), []).append((k, b))
        self.per_res = per_res
        # the speed part: per day (ascending) its fields; per (i, c) pair of the replies in
        # that order, its window and its bucket's start
        self.speed_days: list[tuple[int, list[str]]] = []
        pair_res, pair_start = [], []
        for day in sorted(by_day):
            fields = []
            for k, b in by_day[day]:
                r = F.RESOLUTIONS[k]
                fields += [L.speed_field(r.name, t, b) for t in F.EVENT_TYPES]
                pair_res.append(k)
                pair_start.append(b * r.bucket_ms)
            self.speed_days.append((day, fields))
        self.pair_res = np.asarray(pair_res, dtype=np.int64)
        self.pair_start = np.asarray(pair_start, dtype=np.int64)
        self.long_fields = [L.long_field(t, w) for w in F.LONG_WINDOWS for t in F.EVENT_TYPES]

    def commands(self, keys: list[str]) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = [("GET", L.BATCH_POINTER_KEY)]
        v = self.view.version
        for ek in keys:
            ent, eid = L.split_entity_key(ek)
            for r, bf in self.per_res:
                if bf:
                    assert v is not None
                    out.append(("HMGET", L.batch_key(v, ent, eid, r.name), *bf))
            for day, sf in self.speed_days:
                out.append(("HMGET", L.speed_key(ent, eid, day), *sf))
            if v is not None and self.long_fields:
                out.append(("HMGET", L.batch_long_key(v, ent, eid), *self.long_fields))
        return out

    def parse(self, replies: list[Any], n_keys: int) -> tuple[np.ndarray, int | None]:
        flat = [x for rep in replies[1:] for x in rep]
        arr = np.array(flat, dtype=object)
        arr[[x is None for x in flat]] = b"0"  # absent fields count 0
        vals = arr.astype(np.bytes_).astype(np.int64) if len(arr) else np.zeros(0, np.int64)
        counts = np.zeros((n_keys, F.N_WINDOWS, 2), dtype=np.int64)
        newest = -1
        # replies are in (key, batch per res, speed per day, long) order with fixed sizes
        # per key
        n_speed = 2 * len(self.pair_res)
        per_key = sum(len(bf) for _, bf in self.per_res) + n_speed
        n_long = len(self.long_fields) if self.view.version is not None else 0
        block = vals.reshape(n_keys, per_key + n_long)
        off = 0
        for k, (_, bf) in enumerate(self.per_res):
            n = len(bf)
            if n:
                counts[:, k] += block[:, off : off + n].reshape(n_keys, n // 2, 2).sum(axis=1)
                off += n
        if n_speed:
            part = block[:, off : off + n_speed].reshape(n_keys, n_speed // 2, 2)
            for k in range(N_RES):
                sel = self.pair_res == k
                if sel.any():
                    counts[:, k] += part[:, sel].sum(axis=1)
            nonempty = (part > 0).any(axis=2).any(axis=0)
            if nonempty.any():
                newest = int(self.pair_start[nonempty].max())
            off += n_speed
        if n_long:
            counts[:, N_RES:] = block[:, off : off + n_long].reshape(n_keys, N_LONG, 2)
        return counts, (newest if newest >= 0 else None)


# --------------------------------------------------------------------------- the view


def view_commands() -> tuple[tuple[Any, ...], ...]:
    """The command that reads the pointer (:func:`view_meta_command` then reads its meta)."""
    return (("GET", L.BATCH_POINTER_KEY),)


def view_meta_command(version: str) -> tuple[Any, ...]:
    return ("HMGET", L.batch_meta_key(version), "cutoff_ms", L.BATCH_SUMS_FLAG)


def view_of(pointer: bytes | str | None, meta: list[Any] | None) -> View:
    """The :class:`View` of a pointer value and its meta reply: no view is merged in when
    either is missing or the meta has no readable cut-off (a view being written)."""
    if isinstance(pointer, bytes):
        pointer = pointer.decode()
    if not pointer:
        return NO_VIEW
    try:
        cutoff = int(meta[0]) if meta else None
    except (TypeError, ValueError):
        cutoff = None
    if cutoff is None or meta is None:
        return View(pointer)
    return View(pointer, pointer, cutoff, meta[1] in (b"1", "1"))
