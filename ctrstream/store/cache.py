"""The shared-entity cache of the feature reader: window counts reused across reads.

Entities that do not involve the user (``plan.SHARED_ENTITIES``: ad, campaign, advertiser,
site, site x category) are read by almost every request; their merged window counts are
kept here. An entry is used only for the same window buckets (the current bucket of every
resolution: a window that moved is read again) and the same batch view, and only while it
is provably at most ``ttl_s`` behind Redis:

* **TTL**: it was read less than ``ttl_s`` ago (``clock``, monotonic), or
* **tracked** (:class:`ctrstream.store.tracking.InvalidationTracker`): Redis reports every
  write to a speed-view key (``CLIENT TRACKING ... BCAST PREFIX sv:``) and the entity's
  entry is dropped when the report arrives; the tracker's heartbeat - a write whose report
  comes after every earlier write's - came back for a heartbeat sent less than ``ttl_s``
  ago. Then every write Redis executed before that heartbeat has been applied, so the entry
  lags Redis by less than ``ttl_s`` however old it is. If the reports stop (a broken
  connection, a stalled channel) the heartbeat ages out and the TTL rule alone applies; a
  reconnect drops the cache.

So a served count is never more than ``ttl_s`` behind Redis (which itself lags the events
by the speed layer's flush interval): with ``ttl_s`` <= ``settings.flush_interval_ms`` the
cache at most doubles the speed layer's own staleness - and with tracking, a speed view that
is not being written is cached until its window moves. User entities are always read.

Races: a write reported while a read is in flight may describe a value newer than what the
read got, so every invalidation carries a sequence number and a read stores only the keys
not invalidated since it began; a flush (or a lost channel) drops everything, including what
reads in flight would store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ctrstream.store import layout as L
from ctrstream.store.plan import SHARED_ENTITIES


class Vouching(Protocol):
    """What the cache needs of an invalidation channel (``InvalidationTracker``)."""

    @property
    def acked_sent_at(self) -> float | None: ...

    def status(self) -> dict[str, Any]: ...


@dataclass
class Entry:
    at: float  # clock() when the read that produced it began
    window: tuple[Any, ...]  # (mode, last bucket of every resolution)
    version: str | None  # the batch view it was merged with
    counts: np.ndarray  # (N_WINDOWS, 2)
    newest: int  # start of its newest non-empty speed bucket (-1: none)


@dataclass
class Lookup:
    """A read's view of the cache: the entries it may use and the keys it must read."""

    hits: dict[int, Entry]  # index into the read's keys -> entry
    miss: list[int]  # indices of the keys to read
    at: float  # clock() at the start of the read (what new entries are stamped with)
    window: tuple[Any, ...]
    seq: int  # invalidation sequence at the start of the read


class SharedEntityCache:
    def __init__(
        self, ttl_s: float, max_entries: int = 200_000, clock: Callable[[], float] = time.monotonic
    ):
        self.ttl_s = float(ttl_s)
        self.max_entries = int(max_entries)
        self.clock = clock
        self.tracker: Vouching | None = None
        self.hits = 0
        self.misses = 0
        self._entries: dict[str, Entry] = {}
        # invalidation sequence: entries read before an invalidation of their key (or a
        # flush) was processed are not stored (the report may have raced the read)
        self._seq = 0
        self._inval: dict[str, int] = {}
        self._flushed = -1
        self._inflight: dict[int, int] = {}  # read start seq -> reads in flight
        self._lock = threading.Lock()  # reports arrive on the tracker's thread

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # ---- invalidation (the tracker's callbacks)
    def invalidate(self, entity_keys: Iterable[str]) -> None:
        with self._lock:
            self._seq += 1
            seq, entries, inval = self._seq, self._entries, self._inval
            for k in entity_keys:
                entries.pop(k, None)
                inval[k] = seq
            if len(inval) > 100_000:  # only reads still in flight need the older ones
                low = min(self._inflight, default=seq)
                self._inval = {k: v for k, v in inval.items() if v > low}

    def invalidate_all(self) -> None:
        with self._lock:
            self._seq += 1
            self._flushed = self._seq
            self._entries.clear()
            self._inval.clear()

    def vouched(self, now: float) -> float | None:
        """How far tracked entries may lag Redis now (None: the tracker does not vouch)."""
        t = self.tracker
        if t is None:
            return None
        sent = t.acked_sent_at
        if sent is None or now - sent >= self.ttl_s:
            return None
        return now - sent

    # ---- a read
    def lookup(self, keys: list[str], window: tuple[Any, ...], version: str | None) -> Lookup:
        """Split ``keys`` into usable entries and keys to read; the read must end with
        :meth:`store` or :meth:`release`."""
        now = self.clock()  # entries read now are stamped with it: before the read, not after
        with self._lock:
            seq0 = self._seq
            self._inflight[seq0] = self._inflight.get(seq0, 0) + 1
        oldest = now - self.ttl_s
        if self.vouched(now) is not None:
            oldest = float("-inf")  # tracked: an entry is current until invalidated
        hits, miss = {}, []
        entries = self._entries
        for i, k in enumerate(keys):
            e = entries.get(k)
            if e is not None and e.at > oldest and e.window == window and e.version == version:
                hits[i] = e
            else:
                miss.append(i)
        self.hits += len(hits)
        self.misses += len(miss)
        return Lookup(hits, miss, now, window, seq0)

    def staleness(self, lk: Lookup) -> float | None:
        """How far the entries a read used may lag Redis (None: it used none)."""
        if not lk.hits:
            return None
        staleness = lk.at - min(e.at for e in lk.hits.values())
        vouched = self.vouched(lk.at)
        return staleness if vouched is None else min(staleness, vouched)

    def store(
        self,
        lk: Lookup,
        keys: list[str],
        version: str | None,
        counts: np.ndarray,
        newest: np.ndarray,
    ) -> None:
        """Keep what a read got for the shared entities among ``keys`` (the keys it read,
        in the order of ``counts``), unless they were invalidated while it ran."""
        shared = [(j, k) for j, k in enumerate(keys) if L.split_entity_key(k)[0] in SHARED_ENTITIES]
        with self._lock:
            self._release(lk.seq)
            if self._flushed > lk.seq:
                return  # the cache was dropped while this read was in flight
            if len(self._entries) > self.max_entries:
                self._evict(lk.window)
            entries, inval = self._entries, self._inval
            for j, k in shared:
                if inval.get(k, -1) <= lk.seq:  # no write reported since the read began
                    entries[k] = Entry(lk.at, lk.window, version, counts[j], int(newest[j]))

    def release(self, lk: Lookup) -> None:
        """End a read that stores nothing (it failed, or it is redone)."""
        with self._lock:
            self._release(lk.seq)

    def _release(self, seq0: int) -> None:
        left = self._inflight.get(seq0, 1) - 1
        if left > 0:
            self._inflight[seq0] = left
        else:
            self._inflight.pop(seq0, None)

    def _evict(self, window: tuple[Any, ...]) -> None:
        """Drop what can no longer be served (another window, or past the TTL without the
        tracker vouching for it); everything when that is not enough."""
        now = self.clock()
        oldest = float("-inf") if self.vouched(now) is not None else now - self.ttl_s
        self._entries = {
            k: e for k, e in self._entries.items() if e.window == window and e.at > oldest
        }
        if len(self._entries) > self.max_entries:
            self._entries.clear()

    def stats(self) -> dict[str, Any]:
        n = self.hits + self.misses
        return {
            "ttl_s": self.ttl_s,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": (self.hits / n) if n else None,
            "entries": len(self._entries),
            "tracking": None if self.tracker is None else self.tracker.status(),
        }
