"""Reading windowed counts: one core, a sync shell and an asyncio shell.

For many entities at once and one time ``t``, a reader returns the window counts
``(keys, N_WINDOWS, 2)`` - impressions then clicks per window, ``RESOLUTIONS`` then
``LONG_WINDOWS`` - merged as :mod:`ctrstream.store.plan` describes (the lambda merge, or the
speed or batch view alone); :meth:`read_rows` (entity ids per row) and :meth:`read_columns`
(event columns) gather them into the ``(rows, len(ENTITIES), N_WINDOWS, 2)`` array
``features.dense_from_counts`` takes. It is the multi-get of the store: many keys, one time,
one round trip.

:class:`ReaderCore` is what a read does, without I/O: a generator that yields the requests to
send (:class:`ScriptCall`, :class:`Commands`) and receives their replies. :class:`FeatureStore`
(sync: batch jobs, the streaming scorer, tests) and :class:`AsyncFeatureStore` (asyncio: the
prediction API) only carry the requests to Redis.

Two ways to make the one round trip
-----------------------------------
* ``method="script"`` (default): one ``EVALSHA`` of ``read.lua``, which reads every needed
  field (``HMGET``) server-side and returns only the window *sums* (``2 * N_WINDOWS + 1``
  int64 per entity, packed into one string). Every key it touches is passed in ``KEYS``
  (built by :mod:`ctrstream.store.layout`), planned against the served batch view the
  reader last saw; the script first checks that the pointer still names that view and
  otherwise reads nothing, so the reader re-plans against the new view and calls again: the
  pointer, the view's cut-off and the data are one atomic snapshot, a switch is noticed on
  the very next read and can never be half-applied. Per entity it reads the batch part of
  every window and the long windows with **one** ``HMGET`` of a few fields of the view's
  ``:sums`` hash (views without them: bucket by bucket), and the speed part with **one**
  ``HMGET`` per event day of the entity's speed hash of that day. Crossed entities whose
  single-field part has an empty window are not read for it (exact: their window is empty
  too).
* ``method="pipeline"``: one non-transactional pipeline of ``HMGET`` per key (the speed
  part: one per entity and day, as in the script), parsed with numpy. The view's cut-off is
  cached per version for ``pointer_ttl_s``; the pipeline starts with a read of the pointer
  so a switch is noticed in the same round trip (the read is then redone once against the
  new view). For Redis deployments that forbid scripts, and the reference the script is
  tested against.

The shared-entity cache (``cache_ttl_s > 0``, script method) is
:class:`ctrstream.store.cache.SharedEntityCache`; with ``tracking=True`` the asyncio reader
keeps it exact with Redis' invalidation reports
(:class:`ctrstream.store.tracking.InvalidationTracker`).

Where the time goes (100 candidates, ~450 distinct entities per request): ``docs/api.md``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ctrstream import features as F
from ctrstream.store import layout as L
from ctrstream.store.cache import Lookup, SharedEntityCache
from ctrstream.store.cluster import (
    Address,
    ClusterConnections,
    ClusterMoving,
    absent_key,
    connections_of_client,
    is_moving,
    parse_redirect,
    slots_of,
)
from ctrstream.store.connection import RedisReplyError
from ctrstream.store.plan import (
    MAX_PARENTS,
    NO_VIEW,
    Mode,
    PipelinePlan,
    ScriptPlan,
    View,
    keys_of_columns,
    keys_of_rows,
    no_parents,
    parents_of_keys,
    parse_script_reply,
    view_meta_command,
    view_of,
    window_plan,
)
from ctrstream.store.script import (
    CLUSTER_READ_SCRIPT,
    CLUSTER_READ_SHA,
    READ_SCRIPT,
    AsyncScript,
    SyncScript,
    cluster_call_args,
)
from ctrstream.store.tracking import ClusterInvalidationTracker, InvalidationTracker

Method = Literal["script", "pipeline"]
MAX_SWITCHES = 3  # reads redone because the view switched under them, before giving up


@dataclass
class FeatureRead:
    """Window counts of some entities at ``t_ms`` and where they came from."""

    counts: np.ndarray  # int64 (keys or rows, [entities,] N_WINDOWS, 2)
    t_ms: int
    batch_version: str | None  # the batch view merged in (None: speed view only)
    cutoff_ms: int | None
    newest_bucket_ms: int | None  # start of the newest non-empty speed-view bucket read
    timings: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0  # keys served from the shared-entity cache (not read from Redis)
    cache_misses: int = 0  # keys read from Redis while the cache is on
    # how far the reused (cached) counts may lag Redis, at most (None: nothing reused)
    cache_staleness_s: float | None = None

    @property
    def staleness_ms(self) -> int | None:
        """How far the newest data seen lags ``t_ms`` (the current bucket's start is 0)."""
        newest = self.newest_bucket_ms
        if newest is None and self.cutoff_ms is not None:
            newest = self.cutoff_ms
        return None if newest is None else max(0, self.t_ms - newest)


@dataclass(frozen=True)
class ScriptCall:
    """Request: one call of the read script."""

    keys: list[str]
    args: list[Any]


@dataclass(frozen=True)
class Commands:
    """Request: commands in one non-transactional pipeline; the reply is their replies."""

    commands: list[tuple[Any, ...]]


@dataclass(frozen=True)
class ScriptCalls:
    """Request (Redis Cluster): one call of the read script per node, each reading keys that
    node serves; ``calls`` are ``(KEYS, ARGV, check)`` (``check``: this call is on the node
    serving the batch-view pointer and checks it). The reply is the calls' replies, in
    order; a slot in motion raises :class:`ctrstream.store.cluster.ClusterMoving`."""

    calls: list[tuple[list[str], list[Any], bool]]


Request = ScriptCall | Commands | ScriptCalls
Route = Callable[[list[str]], np.ndarray]
"""A Redis Cluster's routing of keys: the index of the node serving each key."""
Steps = Generator[Request, Any, FeatureRead]


class ReaderCore:
    """One read as a generator of requests (see the module docstring)."""

    def __init__(
        self,
        mode: Mode = "lambda",
        method: Method = "script",
        pointer_ttl_s: float = 1.0,
        cache_ttl_s: float = 0.0,
        cache_max: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
        route: Route | None = None,
    ):
        if mode not in ("lambda", "speed", "batch"):
            raise ValueError(f"mode must be lambda, speed or batch, not {mode!r}")
        if method not in ("script", "pipeline"):
            raise ValueError(f"method must be script or pipeline, not {method!r}")
        self.mode: Mode = mode
        self.method: Method = method
        self.pointer_ttl_s = pointer_ttl_s
        self.clock = clock
        self.cache = SharedEntityCache(cache_ttl_s, cache_max, clock) if cache_ttl_s > 0 else None
        self._view: View | None = None  # the served view as last seen
        self._view_at = 0.0  # time.monotonic() when it was read
        self._plan: tuple[tuple[Any, ...], ScriptPlan] | None = None  # the last script plan
        # a Redis Cluster: the read script runs once per node (see _call_cluster)
        self.route = route
        self.absent: Callable[[int], str] | None = None  # a never-existing key of a node
        self.cluster_fallbacks = 0  # reads done key by key because a slot was in motion

    # ---- the served view
    def _fetch_view(self) -> Generator[Request, Any, View]:
        (pointer,) = yield Commands([("GET", L.BATCH_POINTER_KEY)])
        meta = None
        version = _text(pointer)
        if version:
            (meta,) = yield Commands([view_meta_command(version)])
        self._view, self._view_at = view_of(pointer, meta), time.monotonic()
        return self._view

    def forget_view(self) -> None:
        self._view = None

    # ---- a read
    def read(self, keys: Iterable[str], t_ms: int, parents: np.ndarray | None = None) -> Steps:
        """The requests of one read of ``keys`` (entity keys) at ``t_ms``; returns the
        :class:`FeatureRead`. ``parents``: see :meth:`ScriptPlan.call`."""
        keys = list(keys)
        if self.method == "script":
            return (yield from self._read_script(keys, int(t_ms), parents))
        return (yield from self._read_pipeline(keys, int(t_ms)))

    def _script_plan(self, view: View, t_ms: int) -> ScriptPlan:
        sig = (view, tuple(b0 for _, b0, _ in window_plan(t_ms)))  # the plan's only inputs
        if self._plan is None or self._plan[0] != sig:
            self._plan = (sig, ScriptPlan(self.mode, view, t_ms))
        return self._plan[1]

    def _read_script(self, keys: list[str], t_ms: int, parents: np.ndarray | None) -> Steps:
        cache = self.cache
        for _ in range(MAX_SWITCHES):
            view = NO_VIEW
            if self.mode != "speed":
                view = self._view if self._view is not None else (yield from self._fetch_view())
            plan = self._script_plan(view, t_ms)
            lk: Lookup | None = None
            read_keys, read_parents = keys, parents
            if cache is not None:
                window = (self.mode, tuple(b1 for _, _, b1 in window_plan(t_ms)))
                lk = cache.lookup(keys, window, view.version)
                if lk.hits:
                    # parents served from the cache are not in this call: no pruning by them
                    if parents is None:
                        parents = parents_of_keys(keys)
                    at = np.full(len(keys) + 1, -1, dtype=np.int64)  # at[-1]: no parent
                    at[lk.miss] = np.arange(len(lk.miss))
                    read_keys = [keys[i] for i in lk.miss]
                    read_parents = (
                        at[np.asarray(parents, dtype=np.int64)[lk.miss]]
                        if lk.miss
                        else no_parents(0)
                    )
            try:
                if self.route is None:
                    script_keys, args, order = plan.call(read_keys, read_parents)
                    reply = yield ScriptCall(script_keys, args)
                    _, moved, got, newest_k = parse_script_reply(reply, len(read_keys), order)
                else:
                    called = yield from self._call_cluster(plan, read_keys, read_parents)
                    if called is None:  # a slot in motion
                        if cache is not None and lk is not None:
                            cache.release(lk)
                        self.cluster_fallbacks += 1
                        return (yield from self._read_pipeline(keys, t_ms))
                    moved, got, newest_k = called
            except BaseException:
                if cache is not None and lk is not None:
                    cache.release(lk)
                raise
            if moved:  # the view switched: re-plan against the new one
                self._view = None
                if cache is not None and lk is not None:
                    cache.release(lk)
                    cache.invalidate_all()
                continue
            return self._merge(keys, t_ms, view, lk, read_keys, got, newest_k)
        raise RuntimeError(
            f"the batch-view pointer ({L.BATCH_POINTER_KEY}) moved during each "
            f"of {MAX_SWITCHES} reads in a row: is something switching views "
            "in a loop?"
        )

    def _call_cluster(
        self, plan: ScriptPlan, keys: list[str], parents: np.ndarray | None
    ) -> Generator[Request, Any, tuple[bool, np.ndarray, np.ndarray] | None]:
        """The read script on a Redis Cluster, one call per node, all in one round
        (:class:`ScriptCalls`); the call on the pointer's node checks the pointer (a
        pointer-only call when nothing else is read there).

        * An entity whose keys all live on one node (hash-tagged keys) is read whole by that
          node's call; parents pruned among the entities of the same call (pruning only
          skips reads of windows that are empty anyway).
        * An entity whose keys are spread over nodes (a key layout without hash tags: its
          batch and speed hashes hash apart) is read by every node holding some of its keys,
          its other keys replaced by a key of that node that never exists (``HMGET`` of it
          reads nothing): each call returns the part of the counts its node holds, and the
          parts add up (the script only sums counts); the newest bucket is the latest of
          them. These are not pruned. When any entity is split, every entity of the read is
          read this way (one call per node, not two).

        None: a slot is in motion (a migration, a failover) - the caller reads with the
        pipeline method instead, whose commands follow redirects one by one."""
        assert self.route is not None and self.absent is not None
        n = len(keys)
        full = plan.keys_of(keys)
        nodes = self.route(full)
        if (nodes < 0).any():
            return None
        ptr_node = int(nodes[0])
        stride = (len(full) - 1) // n if n else 0
        if stride:
            blocks = nodes[1:].reshape(n, stride)
            split = (blocks != blocks[:, :1]).any(axis=1)
        else:
            blocks, split = np.zeros((n, 1), np.int64), np.zeros(n, bool)
        if split.any():  # one call per node: the whole entities join the split ones' calls
            split[:] = True
        ent_node = blocks[:, 0]
        if parents is None:
            parents = parents_of_keys(keys)
        parents = np.asarray(parents, dtype=np.int64).reshape(n, MAX_PARENTS)
        calls: list[tuple[list[str], list[Any], bool]] = []
        parts: list[tuple[np.ndarray, np.ndarray, bool]] = []  # (entities, call order, adds)
        checked = self.mode == "speed"
        whole = ~split
        for g in np.unique(ent_node[whole]).tolist():
            idx = np.flatnonzero(whole & (ent_node == g))
            remap = np.full(n + 1, -1, dtype=np.int64)  # remap[-1]: no parent
            remap[idx] = np.arange(len(idx))
            sub_keys, args, order = plan.call([keys[i] for i in idx.tolist()], remap[parents[idx]])
            check = not checked and g == ptr_node
            checked |= check
            calls.append((sub_keys, args, check))
            parts.append((idx, order, False))
        if split.any():
            sidx = np.flatnonzero(split)
            kb = np.asarray(full[1:], dtype=object).reshape(n, stride)[sidx]
            nb = blocks[sidx]
            for g in np.unique(nb).tolist():
                rows = np.flatnonzero((nb == g).any(axis=1))
                own = np.where(nb[rows] == g, kb[rows], self.absent(g))
                _, args, order = plan.call(
                    [keys[i] for i in sidx[rows].tolist()], no_parents(len(rows))
                )
                check = not checked and g == ptr_node
                checked |= check
                calls.append(([full[0], *own.ravel().tolist()], args, check))
                parts.append((sidx[rows], order, True))
        if not checked:
            sub_keys, args, _ = plan.call([], no_parents(0))
            calls.append((sub_keys, args, True))
        try:
            replies = yield ScriptCalls(calls)
        except ClusterMoving:
            return None
        got = np.zeros((n, F.N_WINDOWS, 2), dtype=np.int64)
        newest = np.full(n, -1, dtype=np.int64)
        moved = False
        for k, reply in enumerate(replies):
            if k >= len(parts):
                moved |= parse_script_reply(reply, 0)[1]
                continue
            idx, order, adds = parts[k]
            _, mv, g_counts, nw = parse_script_reply(reply, len(idx), order)
            moved |= mv
            if mv:
                continue
            if adds:
                got[idx] += g_counts
                newest[idx] = np.maximum(newest[idx], nw)
            else:
                got[idx], newest[idx] = g_counts, nw
        return moved, got, newest

    def _merge(
        self,
        keys: list[str],
        t_ms: int,
        view: View,
        lk: Lookup | None,
        read_keys: list[str],
        got: np.ndarray,
        newest_k: np.ndarray,
    ) -> FeatureRead:
        cache = self.cache
        if lk is None or not lk.hits:
            counts, newest = got, newest_k
        else:
            counts = np.empty((len(keys), F.N_WINDOWS, 2), dtype=np.int64)
            newest = np.empty(len(keys), dtype=np.int64)
            counts[lk.miss], newest[lk.miss] = got, newest_k
            for i, e in lk.hits.items():
                counts[i], newest[i] = e.counts, e.newest
        staleness = None
        if cache is not None and lk is not None:
            staleness = cache.staleness(lk)
            cache.store(lk, read_keys, view.version, got, newest_k)
        nb = int(newest.max()) if len(newest) else -1
        return FeatureRead(
            counts,
            t_ms,
            view.version,
            view.cutoff_ms,
            nb if nb >= 0 else None,
            cache_hits=len(lk.hits) if lk else 0,
            cache_misses=len(read_keys) if lk else 0,
            cache_staleness_s=staleness,
        )

    def _read_pipeline(self, keys: list[str], t_ms: int) -> Steps:
        replies: list[Any] = []
        for _attempt in range(2):
            view = self._view
            if view is None or time.monotonic() - self._view_at >= self.pointer_ttl_s:
                view = yield from self._fetch_view()
            used = NO_VIEW if self.mode == "speed" else view
            plan = PipelinePlan(self.mode, used, t_ms)
            replies = yield Commands(plan.commands(keys))
            if self.mode == "speed" or _text(replies[0]) == view.pointer:
                break
            self._view = None  # the pointer moved: read the new view's meta and read again
        counts, newest = plan.parse(replies, len(keys))
        return FeatureRead(counts, t_ms, used.version, used.cutoff_ms, newest)

    # ---- rows and columns
    @staticmethod
    def rows(read: FeatureRead, inv: np.ndarray, keys_s: float | None = None) -> FeatureRead:
        """Gather a read of distinct keys back into rows (``inv``: per row and entity, the
        index of its key); ``keys_s``: the seconds spent building the keys
        (``timings["keys"]``)."""
        read.counts = read.counts[inv]
        if keys_s is not None:
            read.timings["keys"] = keys_s
        return read

    @staticmethod
    def columns_plan(columns: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray, float]:
        """:func:`keys_of_columns` and the seconds it took."""
        t0 = time.perf_counter()
        keys, inv, parents = keys_of_columns(columns)
        return keys, inv, parents, time.perf_counter() - t0

    def cache_stats(self) -> dict[str, Any]:
        if self.cache is None:
            return {
                "ttl_s": 0.0,
                "hits": 0,
                "misses": 0,
                "hit_rate": None,
                "entries": 0,
                "tracking": None,
            }
        return self.cache.stats()


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


SLOT_CACHE_MAX = 1_000_000  # keys whose slot a reader remembers (then it starts over)


def _router_route(router: ClusterConnections) -> Route:
    """The node index of each key by the router's slot map (read once first). A key's slot
    never changes, and the same keys come back request after request (the shared entities,
    a user's keys): slots are remembered, computed (vectorized) for new keys only."""
    slots: dict[str, int] = {}

    def route(keys: list[str]) -> np.ndarray:
        owner = router.ensure_map().owner
        get = slots.get
        got = [get(k, -1) for k in keys]
        new = [k for k, s in zip(keys, got) if s < 0]
        if new:
            if len(slots) + len(new) > SLOT_CACHE_MAX:
                slots.clear()
            slots.update(zip(new, slots_of(new).tolist()))
            got = [slots[k] for k in keys]
        return owner[np.asarray(got, dtype=np.int64)]

    return route


def _router_absent(router: ClusterConnections) -> Callable[[int], str]:
    """A key of node ``k`` (an index of the router's slot map) that never exists."""

    def absent(k: int) -> str:
        return absent_key(router.map, k)

    return absent


def _execute_cluster(router: ClusterConnections, request: Request) -> Any:
    """A request on a Redis Cluster over blocking connections: commands routed by their key
    (redirects followed); the per-node script calls as one pipeline per node (``EVALSHA`` of
    :data:`~ctrstream.store.script.CLUSTER_READ_SCRIPT`, ``EVAL`` where a node lacks it)."""
    if isinstance(request, Commands):
        return router.execute(request.commands, [c[1] for c in request.commands])
    if isinstance(request, ScriptCall):
        raise TypeError("one read-script call cannot span a Redis Cluster: use ScriptCalls")
    routes, argvs = [], []
    for keys, args, check in request.calls:
        route, argv = cluster_call_args(keys, args, check)
        routes.append(route[0])
        argvs.append((1, route[0], *argv))
    cmds = [("EVALSHA", CLUSTER_READ_SHA, *a) for a in argvs]
    replies = router.execute(cmds, routes, raise_errors=False)
    missing = [i for i, r in enumerate(replies) if _is_error(r, "NOSCRIPT")]
    if missing:
        again = router.execute(
            [("EVAL", CLUSTER_READ_SCRIPT, *argvs[i]) for i in missing],
            [routes[i] for i in missing],
            raise_errors=False,
        )
        for i, r in zip(missing, again):
            replies[i] = r
    for r in replies:
        if isinstance(r, Exception):
            if is_moving(str(r)):
                raise ClusterMoving(str(r))
            raise RedisReplyError(str(r))
    return replies


def _is_error(reply: Any, prefix: str) -> bool:
    return isinstance(reply, Exception) and str(reply).startswith(prefix)


def drive(steps: Steps, execute: Callable[[Request], Any]) -> FeatureRead:
    """Run a read's requests with a blocking ``execute``; an error of ``execute`` is raised
    into the read (which cleans up) and out of here."""
    try:
        request = next(steps)
        while True:
            try:
                reply = execute(request)
            except BaseException as e:  # noqa: BLE001 - handed to the read, which re-raises it
                request = steps.throw(e)
                continue
            request = steps.send(reply)
    except StopIteration as done:
        return done.value


async def drive_async(steps: Steps, execute: Callable[[Request], Awaitable[Any]]) -> FeatureRead:
    """:func:`drive` with an asyncio ``execute``."""
    try:
        request = next(steps)
        while True:
            try:
                reply = await execute(request)
            except BaseException as e:  # noqa: BLE001 - handed to the read, which re-raises it
                request = steps.throw(e)
                continue
            request = steps.send(reply)
    except StopIteration as done:
        return done.value


class _Shell:
    """What both shells share: the core, its cache and the row/column helpers."""

    core: ReaderCore

    @property
    def mode(self) -> Mode:
        return self.core.mode

    @property
    def method(self) -> Method:
        return self.core.method

    @property
    def cache(self) -> SharedEntityCache | None:
        return self.core.cache

    @property
    def cache_ttl_s(self) -> float:
        """How long a cached count may lag Redis (0: no cache)."""
        return 0.0 if self.core.cache is None else self.core.cache.ttl_s

    def invalidate(self, entity_keys: Iterable[str]) -> None:
        if self.core.cache is not None:
            self.core.cache.invalidate(entity_keys)

    def invalidate_all(self) -> None:
        if self.core.cache is not None:
            self.core.cache.invalidate_all()

    def cache_stats(self) -> dict[str, Any]:
        return self.core.cache_stats()


class FeatureStore(_Shell):
    """The synchronous reader. ``client``: a ``redis.Redis``
    (:func:`ctrstream.store.connection.redis_client`); the other arguments are
    :class:`ReaderCore`'s."""

    def __init__(
        self,
        client: Any,
        mode: Mode = "lambda",
        method: Method = "script",
        pointer_ttl_s: float = 1.0,
        cache_ttl_s: float = 0.0,
        cache_max: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.core = ReaderCore(mode, method, pointer_ttl_s, cache_ttl_s, cache_max, clock)
        self.client = client
        self.cluster = connections_of_client(client)
        self.script: Any = None
        if self.cluster is not None:
            self.core.route = _router_route(self.cluster)
            self.core.absent = _router_absent(self.cluster)
        else:
            self.script = SyncScript.for_client(client) or client.register_script(READ_SCRIPT)

    def _execute(self, request: Request) -> Any:
        if self.cluster is not None:
            return _execute_cluster(self.cluster, request)
        if isinstance(request, ScriptCall):
            return self.script(keys=request.keys, args=request.args)
        if isinstance(request, ScriptCalls):
            raise TypeError("per-node script calls need a Redis Cluster client")
        pipe = self.client.pipeline(transaction=False)
        for c in request.commands:
            pipe.execute_command(*c)
        return pipe.execute()

    def read(
        self, keys: Iterable[str], t_ms: int, parents: np.ndarray | None = None
    ) -> FeatureRead:
        """Window counts ``(len(keys), N_WINDOWS, 2)`` of entity keys at ``t_ms``."""
        return drive(self.core.read(keys, t_ms, parents), self._execute)

    def close(self) -> None:
        """Close the raw connections (the redis-py client is the caller's)."""
        if self.cluster is not None:
            self.cluster.close()
        elif isinstance(self.script, SyncScript):
            self.script.close()

    def read_rows(self, entity_ids: np.ndarray, t_ms: int) -> FeatureRead:
        """``entity_ids`` (rows, len(ENTITIES)) -> counts (rows, len(ENTITIES), N_WINDOWS, 2)."""
        keys, inv, parents = keys_of_rows(entity_ids)
        return ReaderCore.rows(self.read(keys, t_ms, parents), inv)

    def read_columns(self, columns: dict[str, Any], t_ms: int) -> FeatureRead:
        """:meth:`read_rows` of the entities of event columns (``columns[field]`` per row);
        ``timings["keys"]``: the seconds spent building the keys."""
        keys, inv, parents, keys_s = ReaderCore.columns_plan(columns)
        return ReaderCore.rows(self.read(keys, t_ms, parents), inv, keys_s)


class AsyncFeatureStore(_Shell):
    """The asyncio reader (the prediction API); ``client`` is a ``redis.asyncio.Redis``.

    ``tracking=True`` (with a cache): :meth:`start` runs an
    :class:`~ctrstream.store.tracking.InvalidationTracker` on the client's Redis so that
    cached entries stay valid until Redis reports a write to them; call :meth:`close` at
    shutdown."""

    def __init__(
        self,
        client: Any,
        mode: Mode = "lambda",
        method: Method = "script",
        pointer_ttl_s: float = 1.0,
        cache_ttl_s: float = 0.0,
        cache_max: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
        tracking: bool = False,
        heartbeat_s: float = 0.05,
    ):
        self.core = ReaderCore(mode, method, pointer_ttl_s, cache_ttl_s, cache_max, clock)
        self.client = client
        self.cluster = connections_of_client(client)
        self.script: Any = None
        self.node_scripts: dict[Address, AsyncScript] = {}  # a cluster: one per master
        if self.cluster is not None:
            self.core.route = _router_route(self.cluster)
            self.core.absent = _router_absent(self.cluster)
        else:
            self.script = AsyncScript.for_client(client) or client.register_script(READ_SCRIPT)
        self.tracking = bool(tracking) and self.core.cache is not None
        self.heartbeat_s = heartbeat_s
        self.tracker: InvalidationTracker | ClusterInvalidationTracker | None = None

    async def start(self) -> None:
        cache = self.core.cache
        if self.tracking and self.tracker is None and cache is not None:
            tracker: InvalidationTracker | ClusterInvalidationTracker
            if self.cluster is not None:  # one tracker per master, on its own router
                import asyncio

                seeds = list(self.cluster.map.seeds)
                router = ClusterConnections.from_kwargs(seeds, self.cluster.kwargs)
                tracker = await asyncio.get_running_loop().run_in_executor(
                    None,
                    lambda: ClusterInvalidationTracker(
                        router,
                        cache.invalidate,
                        cache.invalidate_all,
                        heartbeat_s=self.heartbeat_s,
                        clock=self.core.clock,
                    ),
                )
            else:
                kw = dict(self.client.connection_pool.connection_kwargs)
                tracker = InvalidationTracker(
                    kw,
                    cache.invalidate,
                    cache.invalidate_all,
                    heartbeat_s=self.heartbeat_s,
                    clock=self.core.clock,
                )
            self.tracker = tracker
            cache.tracker = tracker
            tracker.start()

    async def close(self) -> None:
        import asyncio

        if isinstance(self.script, AsyncScript):
            self.script.close()
        for sc in self.node_scripts.values():
            sc.close()
        self.node_scripts.clear()
        if self.cluster is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.cluster.close)
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            if self.core.cache is not None:
                self.core.cache.tracker = None
            await asyncio.get_running_loop().run_in_executor(None, tracker.close)
            self.invalidate_all()

    async def _execute(self, request: Request) -> Any:
        if self.cluster is not None:
            return await self._execute_cluster(self.cluster, request)
        if isinstance(request, ScriptCall):
            return await self.script(keys=request.keys, args=request.args)
        if isinstance(request, ScriptCalls):
            raise TypeError("per-node script calls need a Redis Cluster client")
        pipe = self.client.pipeline(transaction=False)
        for c in request.commands:
            pipe.execute_command(*c)
        return await pipe.execute()

    async def _execute_cluster(self, router: ClusterConnections, request: Request) -> Any:
        """A request on a Redis Cluster: the per-node script calls concurrently over one
        pipelined asyncio connection per node; commands (the pointer, the pipeline method,
        the fallback of a slot in motion) through the blocking router in a worker thread."""
        import asyncio

        loop = asyncio.get_running_loop()
        if not isinstance(request, ScriptCalls):
            return await loop.run_in_executor(None, _execute_cluster, router, request)
        if not router._loaded:
            await loop.run_in_executor(None, router.ensure_map)
        m = router.map
        pending = []
        for keys, args, check in request.calls:
            route, argv = cluster_call_args(keys, args, check)
            addr = m.node_of_key(route[0])
            sc = self.node_scripts.get(addr)
            if sc is None:
                kw = {**router.kwargs, "host": addr.host, "port": addr.port, "db": 0}
                sc = self.node_scripts[addr] = AsyncScript(kw, CLUSTER_READ_SCRIPT)
            pending.append(sc(keys=route, args=argv))
        replies = await asyncio.gather(*pending, return_exceptions=True)
        for r in replies:
            if isinstance(r, RedisReplyError) and is_moving(str(r)):
                red = parse_redirect(str(r))
                if red is not None and red.kind == "MOVED":
                    m.moved(red.slot, red.address)
                    await loop.run_in_executor(None, router.refresh)
                raise ClusterMoving(str(r))
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        return replies

    async def read(
        self, keys: Iterable[str], t_ms: int, parents: np.ndarray | None = None
    ) -> FeatureRead:
        return await drive_async(self.core.read(keys, t_ms, parents), self._execute)

    async def read_rows(self, entity_ids: np.ndarray, t_ms: int) -> FeatureRead:
        keys, inv, parents = keys_of_rows(entity_ids)
        return ReaderCore.rows(await self.read(keys, t_ms, parents), inv)

    async def read_columns(self, columns: dict[str, Any], t_ms: int) -> FeatureRead:
        keys, inv, parents, keys_s = ReaderCore.columns_plan(columns)
        return ReaderCore.rows(await self.read(keys, t_ms, parents), inv, keys_s)
