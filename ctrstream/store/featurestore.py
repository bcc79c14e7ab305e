"""Reading windowed counts from Redis: the speed view, the batch view and the lambda merge.

For many entities at once and one time ``t``, :class:`FeatureStore` (sync) and
:class:`AsyncFeatureStore` (asyncio) return the window counts
``(keys, N_WINDOWS, 2)`` - impressions then clicks per window, ``RESOLUTIONS`` then
``LONG_WINDOWS`` - in **one Redis round trip**; :meth:`read_rows` (entity ids per row) and
:meth:`read_columns` (event columns) gather them into the
``(rows, len(ENTITIES), N_WINDOWS, 2)`` array ``features.dense_from_counts`` takes.

The lambda merge (``mode="lambda"``)
------------------------------------
For every resolution the window at ``t`` is buckets ``b0 .. b1 = features.window_buckets``.
With the served batch view ``V`` (``bv:current``) and its ``cutoff_ms`` ``T``:

* closed buckets whose end ``(b + 1) * bucket_ms <= T`` come from the batch view (the truth),
* later buckets - and always the current, still open bucket ``b1`` - from the speed view,
* long windows (``LONG_WINDOWS``) from the batch view only (zero while there is none).

``mode="speed"`` reads every bucket from the speed view (long windows zero) and
``mode="batch"`` every bucket and long window from the batch view.

Two ways to make the one round trip
-----------------------------------
* ``method="script"`` (default): one ``EVALSHA`` of a Lua script that reads the pointer, the
  meta and every needed field (``HMGET``) server-side and returns only the window *sums*
  (``2 * N_WINDOWS + 1`` int64 per entity, packed into one string) plus the pointer and
  cut-off. The pointer, the cut-off and the data are one atomic snapshot, so a batch-view
  switch is noticed on the very next read and can never be half-applied. Per entity it
  reads the batch part of every window and the long windows with **one** ``HMGET`` of a few
  fields of the view's ``:sums`` hash (suffix sums, ``ctrstream.batch.views``; views without
  them are read bucket by bucket), and the speed part of every resolution with **one**
  ``HMGET`` per event day of the entity's speed hash of that day ``sv:{entity}:{id}:{day}``
  (``layout.speed_key``; fields ``{res}:i{b}`` / ``{res}:c{b}`` of the buckets after the
  cut-off that fall on that day). The speed buckets of a read span one day, or two when a
  window crosses a UTC midnight (a window is at most a day long): with ``:sums``, two or
  three calls per entity. Crossed entities whose single-field part has an empty window are
  not read for it (exact: their window is empty too); nor is a day that only pruned windows
  need.
* ``method="pipeline"``: one non-transactional pipeline of ``HMGET`` per key (the speed part:
  one per entity and day, as in the script), parsed with numpy. The pointer's meta
  (cut-off) is cached per version for ``pointer_ttl_s``; the pipeline starts with ``GET
  bv:current`` so a switch is noticed in the same round trip (the read is then redone once
  against the new version). For Redis deployments that forbid scripts (and the reference
  the script is tested against).

Both scripts and pipelines only touch ``sv:``/``bv:`` keys built from the layout functions of
``ctrstream.features`` (the script receives the pointer key, the speed-view key prefix, day
separator and day length, never builds its own layout).

Where the time goes (bench data: 100 candidates, ~450 distinct entities per request, a
batch view two hours old; ``docs/api.md``): the old script made ~1,500 ``HMGET`` of ~25,000
fields per request (~18 ms of Redis); the ``:sums`` hashes halve the fields (~13,000, the
speed view's per-bucket fields are most of the rest) and the shared-entity cache (below)
skips most entities, ~1 ms of Redis CPU per request with a quiet speed view.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ctrstream import features as F
from ctrstream.store import layout as L

log = logging.getLogger("ctrstream.featurestore")

Mode = Literal["lambda", "speed", "batch"]
Method = Literal["script", "pipeline"]

N_RES = len(F.RESOLUTIONS)
N_LONG = len(F.LONG_WINDOWS)

# --------------------------------------------------------------------------- the Lua script
# ARGV: mode, pointer_key, speed_prefix, speed_day_sep, day_ms, n_res,
#       [res_name, bucket_ms, n_buckets, b0, b1] * n_res, n_long,
#       [long_field_i, long_field_c] * n_long, max_parents, n_plain, then n_plain entities
#       "entity:id" without parents, then per further entity "entity:id" and max_parents
#       1-based positions of its parents among the earlier entities (0: none).
# Returns: {pointer or "", cutoff_ms (-1: none), blob}: blob = per entity, int64 little-endian,
#          (imps, clicks) per window then the start of its newest non-empty speed bucket (-1).
# Batch part: from the entity's ":sums" hash (suffix sums + long windows, ONE HMGET of a few
# fields) when the view's meta has sums=1, else from the per-bucket hashes (older views).
# Speed part: ONE HMGET per event day of the entity's speed hash of that day, speed_prefix ..
# ent .. speed_day_sep .. day ("sv:ad:4:20254", ctrstream.layout.speed_key; day =
# floor(b * bucket_ms / day_ms), layout.speed_day) with the fields of every resolution's
# buckets of that day ("{res}:i{b}" / "{res}:c{b}", layout.speed_field): the speed
# buckets of a read span at most two days (a window is at most a day long), usually one.
# None for a day whose buckets all belong to pruned resolutions, none at all when there is
# nothing to read (no speed buckets, or every resolution pruned).
# Parent pruning (exact): every event counted for a crossed entity (user_x_ad 17:4) is also
# counted, in the same bucket, for each of its single-field parts (user 17, ad 4), so where a
# part's window is empty the crossed window is empty too and is not read.
_LUA = r"""
local mode = ARGV[1]
local ptr = redis.call('GET', ARGV[2])
local cutoff, sums = -1, false
if ptr then
  local m = redis.call('HMGET', 'bv:' .. ptr .. ':meta', 'cutoff_ms', 'sums')
  local c = tonumber(m[1])
  if c then cutoff = c; sums = (m[2] == '1') else ptr = false end
end
if mode == 'speed' then ptr = false end
local use_batch = ptr
local sprefix, ssep, day_ms = ARGV[3], ARGV[4], tonumber(ARGV[5])
local n_res = tonumber(ARGV[6])
local pos = 7
local res = {}
local rsf = {}  -- sums-hash fields of the resolutions (after the long-window fields)
for r = 1, n_res do
  local name, bms, nb = ARGV[pos], tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
  local b0, b1 = tonumber(ARGV[pos + 3]), tonumber(ARGV[pos + 4])
  pos = pos + 5
  -- batch buckets b0..bhi, speed buckets slo..b1
  local bhi = b0 - 1
  if use_batch then
    if mode == 'batch' then bhi = b1
    else bhi = math.min(b1 - 1, math.floor(cutoff / bms) - 1) end
  end
  local slo = math.max(b0, bhi + 1)
  if mode == 'batch' then slo = b1 + 1 end
  -- speed fields sf (i, c per bucket), their buckets sb and the buckets' days sd; b * bms
  -- (~1.7e12) and the day are exact in doubles
  local R = {bms = bms, sf = {}, sb = {}, sd = {}}
  for b = slo, b1 do
    R.sf[#R.sf + 1] = name .. ':i' .. b; R.sf[#R.sf + 1] = name .. ':c' .. b; R.sb[#R.sb + 1] = b
    R.sd[#R.sd + 1] = math.floor(b * bms / day_ms)
  end
  R.skey = ':' .. name
  if use_batch and sums then
    -- the view holds buckets vlo..vhi; S[b] = sum of the view's buckets >= b
    local vhi = math.floor(cutoff / bms) - 1
    local lo, hi = math.max(b0, vhi + 1 - nb), math.min(bhi, vhi)
    if lo <= hi then
      R.lo = #rsf + 1; rsf[#rsf + 1] = name .. ':i' .. lo; rsf[#rsf + 1] = name .. ':c' .. lo
      if hi < vhi then
        R.hi = #rsf + 1; rsf[#rsf + 1] = name .. ':i' .. (hi + 1); rsf[#rsf + 1] = name .. ':c' .. (hi + 1)
      end
    end
  elseif use_batch then
    R.bf = {}
    for b = b0, bhi do R.bf[#R.bf + 1] = 'i' .. b; R.bf[#R.bf + 1] = 'c' .. b end
  end
  res[r] = R
end
local n_long = tonumber(ARGV[pos]); pos = pos + 1
local lf = {}
for w = 1, n_long do lf[#lf + 1] = ARGV[pos]; lf[#lf + 1] = ARGV[pos + 1]; pos = pos + 2 end
local maxp = tonumber(ARGV[pos]); pos = pos + 1
local SF = {}
if use_batch and sums then
  for k = 1, #lf do SF[k] = lf[k] end
  local off = #lf
  for k = 1, #rsf do SF[off + k] = rsf[k] end
  for r = 1, n_res do
    local R = res[r]
    if R.lo then R.lo = R.lo + off end
    if R.hi then R.hi = R.hi + off end
  end
end
local bprefix = use_batch and ('bv:' .. ptr .. ':') or nil
local W = n_res + n_long
local band, bor, call, tonum = bit.band, bit.bor, redis.call, tonumber
local POW = {}
for w = 1, W do POW[w] = 2 ^ (w - 1) end
local ALL = 2 ^ W - 1
local FMT = '<' .. string.rep('i8', 2 * W + 1)
local read_sums = bprefix and sums and #SF > 0
-- Speed part: ONE HMGET per day of the entity's day hashes sprefix .. ent .. ssep .. day,
-- each with the fields of every resolution's buckets of that day. The plan of a mask of
-- pruned windows, built once per mask (SPLAN[mask]): {day key suffixes, field list per day,
-- per resolution r its runs of buckets on one day {day slot, 1-based offset of the run's
-- first (i, c) pair in that day's reply, first j, last j} (j: index into R.sb)}. SMASK: the
-- windows with speed fields; an entity whose parents prune some of them reads the others
-- only (days without any of their fields are not read), none: no HMGET at all.
local SMASK = 0
for r = 1, n_res do if #res[r].sf > 0 then SMASK = SMASK + POW[r] end end
local SPLAN = {}
local function speed_plan(m)
  local p = SPLAN[m]
  if not p then
    local dk, df, runs, slot = {}, {}, {}, {}
    for r = 1, n_res do
      local R = res[r]
      local sf, sd = R.sf, R.sd
      if #sf > 0 and band(m, POW[r]) == 0 then
        local rr, run = {}, nil
        for j = 1, #sd do
          local d = sd[j]
          local x = slot[d]
          if not x then x = #dk + 1; slot[d] = x; dk[x] = ssep .. d; df[x] = {} end
          local f = df[x]
          if run and run[1] == x then run[4] = j
          else run = {x, #f + 1, j, j}; rr[#rr + 1] = run end
          f[#f + 1] = sf[2 * j - 1]; f[#f + 1] = sf[2 * j]
        end
        runs[r] = rr
      end
    end
    p = {dk, df, runs}
    SPLAN[m] = p
  end
  return p
end
speed_plan(0)  -- the unpruned plan: every resolution's speed fields
local blob = {}  -- per entity: struct-packed (imps, clicks) per window, newest
local zero = {}  -- zero[k]: bit mask of entity k's empty windows (both counts 0)

-- window counts of one entity; pm: bit mask of windows pruned by an empty parent window
local function entity(ent, pm)
  local vals = {}
  local nv = 0
  local zm = 0
  local newest = -1
  local bv = nil
  if read_sums and pm ~= ALL then
    bv = call('HMGET', bprefix .. ent .. ':sums', unpack(SF))
  end
  local sv, runs = nil, nil
  local sm = band(pm, SMASK)
  if sm ~= SMASK then
    local p = speed_plan(sm)
    local dk, df = p[1], p[2]
    local skey = sprefix .. ent
    sv, runs = {}, p[3]
    for x = 1, #dk do sv[x] = call('HMGET', skey .. dk[x], unpack(df[x])) end
  end
  for r = 1, n_res do
    local R = res[r]
    local imps, clicks = 0, 0
    if band(pm, POW[r]) == 0 then
      if bv then
        local lo = R.lo
        if lo then
          imps, clicks = tonum(bv[lo]) or 0, tonum(bv[lo + 1]) or 0
          local hi = R.hi
          if hi then imps = imps - (tonum(bv[hi]) or 0); clicks = clicks - (tonum(bv[hi + 1]) or 0) end
        end
      elseif R.bf and #R.bf > 0 then
        local v = call('HMGET', bprefix .. ent .. R.skey, unpack(R.bf))
        for k = 1, #v, 2 do
          imps = imps + (tonum(v[k]) or 0); clicks = clicks + (tonum(v[k + 1]) or 0)
        end
      end
      local rr = runs and runs[r]
      if rr then
        local sb = R.sb
        for q = 1, #rr do
          local run = rr[q]
          local v, k = sv[run[1]], run[2]
          for j = run[3], run[4] do
            local i, c = tonum(v[k]) or 0, tonum(v[k + 1]) or 0
            k = k + 2
            if i > 0 or c > 0 then
              local start = sb[j] * R.bms
              if start > newest then newest = start end
              imps = imps + i; clicks = clicks + c
            end
          end
        end
      end
    end
    if imps == 0 and clicks == 0 then zm = zm + POW[r] end
    vals[nv + 1] = imps; vals[nv + 2] = clicks; nv = nv + 2
  end
  if n_long > 0 then
    local v = bv
    if not v and bprefix and not read_sums then
      local need = false
      for w = n_res + 1, W do if band(pm, POW[w]) == 0 then need = true end end
      if need then v = call('HMGET', bprefix .. ent .. ':long', unpack(lf)) end
    end
    for w = 1, n_long do
      local i, c = 0, 0
      if v and band(pm, POW[n_res + w]) == 0 then i, c = tonum(v[2 * w - 1]) or 0, tonum(v[2 * w]) or 0 end
      if i == 0 and c == 0 then zm = zm + POW[n_res + w] end
      vals[nv + 1] = i; vals[nv + 2] = c; nv = nv + 2
    end
  end
  vals[nv + 1] = newest
  blob[#blob + 1] = struct.pack(FMT, unpack(vals))
  return zm
end

local n_plain = tonumber(ARGV[pos]); pos = pos + 1
local nk = 0
for e = pos, pos + n_plain - 1 do
  nk = nk + 1
  zero[nk] = entity(ARGV[e], 0)
end
for e = pos + n_plain, #ARGV, 1 + maxp do
  nk = nk + 1
  local pm = 0
  for j = 1, maxp do
    local q = tonum(ARGV[e + j])
    if q > 0 and q < nk then pm = bor(pm, zero[q]) end
  end
  zero[nk] = entity(ARGV[e], pm)
end
return {ptr or '', cutoff, table.concat(blob)}
"""


# --------------------------------------------------------------------------- results


@dataclass
class FeatureRead:
    """Window counts of some entities at ``t_ms`` and where they came from."""

    counts: np.ndarray  # int64 (keys or rows, [entities,] N_WINDOWS, 2)
    t_ms: int
    batch_version: str | None  # the batch view merged in (None: speed view only)
    cutoff_ms: int | None
    newest_bucket_ms: int | None  # start of the newest non-empty speed-view bucket read
    timings: dict = field(default_factory=dict)
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


def smoothed_rates(counts: np.ndarray, prior: F.BetaPrior = F.PRIOR) -> np.ndarray:
    """Beta-smoothed CTR of every window: ``counts[..., 0]`` imps, ``[..., 1]`` clicks."""
    counts = np.asarray(counts)
    return F.smoothed_ctr(counts[..., 0], counts[..., 1], prior)


def historical_ctr(counts: np.ndarray, entity: str = "ad", prior: F.BetaPrior = F.PRIOR) -> np.ndarray:
    """Per row, the smoothed CTR of ``entity`` over its window with the most impressions
    (the prior mean where there are none): the fallback score when the model is out of reach.
    ``counts`` is ``(rows, len(ENTITIES), N_WINDOWS, 2)``."""
    k = [e.name for e in F.ENTITIES].index(entity)
    c = np.asarray(counts)[:, k]  # (rows, N_WINDOWS, 2)
    best = np.argmax(c[..., 0], axis=1)
    pick = c[np.arange(len(c)), best]
    return F.smoothed_ctr(pick[:, 0], pick[:, 1], prior)


# --------------------------------------------------------------------------- the read plan


def _window_plan(t_ms: int) -> list[tuple[F.Resolution, int, int]]:
    out = []
    for r in F.RESOLUTIONS:
        w = F.window_buckets(t_ms, r)
        out.append((r, w.start, w.stop - 1))
    return out


# crossed entity -> [(single-field parent entity, position of its field in the id)]
_PARENTS: dict[str, list[tuple[str, int]]] = {
    e.name: [(p.name, e.fields.index(p.fields[0])) for p in F.ENTITIES
             if len(p.fields) == 1 and p.fields[0] in e.fields]
    for e in F.ENTITIES if len(e.fields) > 1}
# entities that do not depend on the user: shared by every request, so worth caching
SHARED_ENTITIES = frozenset(e.name for e in F.ENTITIES if "user_id" not in e.fields)
# read order of read_rows: single-field entities first, so that a crossed entity's parents
# are always earlier in the call (the script prunes with them)
_ROW_ORDER = sorted(range(len(F.ENTITIES)), key=lambda k: len(F.ENTITIES[k].fields) > 1)
_NAMES = [e.name for e in F.ENTITIES]
_PARENT_COLS = {k: [_NAMES.index(pe) for pe, _ in _PARENTS.get(F.ENTITIES[k].name, [])]
                for k in range(len(F.ENTITIES))}
MAX_PARENTS = max([len(v) for v in _PARENTS.values()] + [1])  # parent slots per key in ARGV


def _no_parents(n: int) -> np.ndarray:
    return np.full((n, MAX_PARENTS), -1, dtype=np.int64)


def _parents_of_keys(keys: list[str]) -> np.ndarray:
    """(len(keys), MAX_PARENTS): per key the 0-based indices of its single-field parents
    among ``keys`` (-1: none)."""
    pos = {k: i for i, k in enumerate(keys)}
    out = _no_parents(len(keys))
    for n, k in enumerate(keys):
        ent, _, eid = k.partition(":")
        spec = _PARENTS.get(ent)
        if not spec:
            continue
        parts = eid.split(":")
        if len(parts) <= max(j for _, j in spec):
            continue
        found = [q for q in (pos.get(f"{pe}:{parts[j]}") for pe, j in spec) if q is not None]
        out[n, :len(found)] = found
    return out


def _fill_parents(parents: np.ndarray, base: int, k: int, inv: np.ndarray, first: np.ndarray) -> None:
    """Parents of the distinct ids of entity column ``k`` (keys ``base ..``): the keys of the
    parent columns on the first row of each id (a parent's id is a part of the crossed id)."""
    pcols = _PARENT_COLS[k]
    if pcols:
        parents[base:base + len(first), :len(pcols)] = inv[first][:, pcols]


def _keys_of_rows(entity_ids) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``entity_ids`` (rows, len(ENTITIES)) of ids as text -> the distinct ``entity:id`` keys
    (single-field entities first), the inverse index (rows, len(ENTITIES)) into them and each
    key's parents (:func:`_parents_of_keys`) - without parsing a single key."""
    ids = np.asarray(entity_ids, dtype=object)
    rows = ids.shape[0]
    inv = np.empty((rows, len(F.ENTITIES)), dtype=np.int64)
    keys: list[str] = []
    spans = []
    for k in _ROW_ORDER:
        prefix = _NAMES[k] + ":"
        seen: dict = {}
        idx = [seen.setdefault(x, len(seen)) for x in ids[:, k].tolist()]
        base = len(keys)
        keys += [prefix + str(x) for x in seen]
        inv[:, k] = np.asarray(idx, dtype=np.int64) + base
        spans.append((k, base, len(seen)))
    parents = _no_parents(len(keys))
    for k, base, n in spans:
        if _PARENT_COLS[k] and n:
            _, first = np.unique(inv[:, k], return_index=True)
            _fill_parents(parents, base, k, inv, first)
    return keys, inv, parents


def _keys_of_columns(columns: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Like :func:`_keys_of_rows`, straight from event columns (``columns[field]``: one value
    per row; ids as ``features.entity_id`` writes them): every field is factorized once and a
    crossed entity's distinct ids are distinct tuples of its fields' codes - no per-row text."""
    codes: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}

    def factor(f):  # -> (distinct values, inverse, distinct values as text)
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
    for k in _ROW_ORDER:
        e = F.ENTITIES[k]
        prefix = e.name + ":"
        base = len(keys)
        if len(e.fields) == 1:
            vals, code, text = factor(e.fields[0])
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
        keys += [prefix + ":".join(t) for t in zip(*parts)]
        inv[:, k] = local.reshape(-1) + base
        spans.append((k, base, first))
    parents = _no_parents(len(keys))
    for k, base, first in spans:
        _fill_parents(parents, base, k, inv, first)
    return keys, inv, parents




def _script_head(mode: str, t_ms: int) -> list:
    args: list = [mode, L.BATCH_POINTER_KEY, L.SPEED_PREFIX, L.SPEED_DAY_SEP, F.DAY_MS, N_RES]
    for r, b0, b1 in _window_plan(t_ms):
        args += [r.name, r.bucket_ms, r.n_buckets, b0, b1]
    args += [N_LONG]
    for w in F.LONG_WINDOWS:
        args += [L.long_field("i", w), L.long_field("c", w)]
    return args + [MAX_PARENTS]


def _script_args(mode: str, t_ms: int, keys: list[str],
                 parents: np.ndarray | None = None) -> tuple[list, np.ndarray]:
    """The script's ARGV for ``keys`` and the call order (indices into ``keys``: the keys
    without parents first, each key after its parents). ``parents``: per key 0-based indices
    among ``keys``, -1 for none (default: found by parsing the keys); a parent must have no
    parents itself (single-field entities)."""
    if parents is None:
        parents = _parents_of_keys(keys)
    parents = np.asarray(parents, dtype=np.int64).reshape(len(keys), MAX_PARENTS)
    has = (parents >= 0).any(axis=1)
    plain = np.flatnonzero(~has)
    crossed = np.flatnonzero(has)
    order = np.concatenate([plain, crossed])
    pos = np.empty(len(keys) + 1, dtype=np.int64)  # pos[-1]: no parent -> 0
    pos[order] = np.arange(1, len(keys) + 1)
    pos[-1] = 0
    args = _script_head(mode, t_ms)
    args.append(len(plain))
    args += [keys[i] for i in plain.tolist()]
    if len(crossed):
        flat = np.empty((len(crossed), 1 + MAX_PARENTS), dtype=object)
        flat[:, 0] = [keys[i] for i in crossed.tolist()]
        flat[:, 1:] = pos[parents[crossed]]
        args += flat.ravel().tolist()
    return args, order


def _parse_script(reply, n_keys: int, order: np.ndarray | None = None):
    """-> (version, cutoff, counts (n_keys, N_WINDOWS, 2), newest (n_keys,)), in key order
    (``order``: the call order of :func:`_script_args`)."""
    ptr = reply[0]
    ptr = (ptr.decode() if isinstance(ptr, bytes) else ptr) or None
    cutoff = int(reply[1]) if ptr else None
    vals = np.frombuffer(reply[2], dtype="<i8").reshape(n_keys, 2 * F.N_WINDOWS + 1)
    if order is not None:
        out = np.empty_like(vals)
        out[order] = vals
        vals = out
    return ptr, cutoff, vals[:, :-1].reshape(n_keys, F.N_WINDOWS, 2), vals[:, -1]


def _split(mode: str, version: str | None, cutoff: int | None, r: F.Resolution, b0: int, b1: int):
    """Batch bucket range [b0, bhi] and speed bucket range [slo, b1] (either may be empty)."""
    if mode == "batch":
        return (b0, b1, b1 + 1) if version is not None else (b0, b0 - 1, b1 + 1)
    if version is None or mode == "speed":
        return b0, b0 - 1, b0
    bhi = min(b1 - 1, cutoff // r.bucket_ms - 1)
    return b0, bhi, max(b0, bhi + 1)


class _PipelinePlan:
    """Commands of the pipeline method for one (version, cut-off, t) and how to parse them
    (per-bucket batch hashes: the reference the script is tested against). Per key: one
    ``HMGET`` per resolution of its batch-view hash, one of its speed-view hash of every
    event day with speed buckets (``layout.speed_key(entity, id, day)``, the fields of
    every resolution's buckets of that day, as in the script), one of its long windows."""

    def __init__(self, mode: str, version: str | None, cutoff: int | None, t_ms: int):
        self.version = version
        per_res = []
        by_day: dict[int, list[tuple[int, int]]] = {}  # day -> [(window index, bucket)]
        for k, (r, b0, b1) in enumerate(_window_plan(t_ms)):
            lo, bhi, slo = _split(mode, version, cutoff, r, b0, b1)
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

    def queue(self, pipe, keys) -> None:
        pipe.get(L.BATCH_POINTER_KEY)
        v = self.version
        for ek in keys:
            ent, eid = ek.split(":", 1)
            for r, bf in self.per_res:
                if bf:
                    pipe.hmget(L.batch_key(v, ent, eid, r.name), bf)
            for day, sf in self.speed_days:
                pipe.hmget(L.speed_key(ent, eid, day), sf)
            if v is not None and self.long_fields:
                pipe.hmget(L.batch_long_key(v, ent, eid), self.long_fields)

    def parse(self, replies, n_keys: int) -> tuple[np.ndarray, int | None]:
        replies = replies[1:]
        flat = [x for rep in replies for x in rep]
        arr = np.array(flat, dtype=object)
        arr[np.equal(arr, None)] = b"0"
        vals = arr.astype(np.bytes_).astype(np.int64) if len(arr) else np.zeros(0, np.int64)
        counts = np.zeros((n_keys, F.N_WINDOWS, 2), dtype=np.int64)
        newest = -1
        # replies are in (key, batch per res, speed per day, long) order with fixed sizes
        # per key
        n_speed = 2 * len(self.pair_res)
        per_key = sum(len(bf) for _, bf in self.per_res) + n_speed
        n_long = len(self.long_fields) if self.version is not None else 0
        block = vals.reshape(n_keys, per_key + n_long)
        off = 0
        for k, (_, bf) in enumerate(self.per_res):
            n = len(bf)
            if n:
                counts[:, k] += block[:, off:off + n].reshape(n_keys, n // 2, 2).sum(axis=1)
                off += n
        if n_speed:
            part = block[:, off:off + n_speed].reshape(n_keys, n_speed // 2, 2)
            for k in range(N_RES):
                sel = self.pair_res == k
                if sel.any():
                    counts[:, k] += part[:, sel].sum(axis=1)
            nonempty = (part > 0).any(axis=2).any(axis=0)
            if nonempty.any():
                newest = int(self.pair_start[nonempty].max())
            off += n_speed
        if n_long:
            counts[:, N_RES:] = block[:, off:off + n_long].reshape(n_keys, N_LONG, 2)
        return counts, (newest if newest >= 0 else None)


# --------------------------------------------------------------------------- the stores


class _Base:
    """Shared by both stores: the modes, the pointer-meta cache of the pipeline method and the
    **shared-entity cache** of the script method.

    The cache (``cache_ttl_s > 0``) keeps the merged window counts of entities that do not
    involve the user (``SHARED_ENTITIES``: ad, campaign, advertiser, site, site x category).
    An entry is used only for the same window buckets (the current bucket of every
    resolution: a window that moved is read again) and the same batch view (checked in the
    same round trip: on a switch the cache is dropped and the read redone), and only while
    it is provably at most ``cache_ttl_s`` behind Redis:

    * **TTL**: it was read less than ``cache_ttl_s`` ago (``clock``, monotonic), or
    * **tracked** (:class:`InvalidationTracker`, the asyncio store's ``tracking=True``):
      Redis reports every write to a speed-view key (``CLIENT TRACKING ... BCAST PREFIX
      sv:``) and the entity's entry is dropped when the report arrives; the tracker's
      heartbeat - a write whose report comes after every earlier write's - came back for a
      heartbeat sent less than ``cache_ttl_s`` ago. Then every write Redis executed before
      that heartbeat has been applied, so the entry lags Redis by less than ``cache_ttl_s``
      however old it is. If the reports stop (a broken connection, a stalled channel) the
      heartbeat ages out and the TTL rule alone applies; a reconnect drops the cache.

    So a served count is never more than ``cache_ttl_s`` behind Redis (which itself lags the
    events by the speed layer's flush interval): with ``cache_ttl_s`` <=
    ``settings.flush_interval_ms`` the cache at most doubles the speed layer's own staleness
    - and with tracking, a speed view that is not being written is cached until its window
    moves. User entities are always read.
    """

    def __init__(self, client, mode: Mode = "lambda", method: Method = "script",
                 pointer_ttl_s: float = 1.0, cache_ttl_s: float = 0.0, cache_max: int = 200_000,
                 clock=time.monotonic):
        if mode not in ("lambda", "speed", "batch"):
            raise ValueError(f"mode must be lambda, speed or batch, not {mode!r}")
        if method not in ("script", "pipeline"):
            raise ValueError(f"method must be script or pipeline, not {method!r}")
        self.client = client
        self.mode = mode
        self.method = method
        self.pointer_ttl_s = pointer_ttl_s
        self._meta: tuple[str | None, int | None, float] | None = None  # version, cutoff, at
        self._script = client.register_script(_LUA)
        # key -> (read at, window signature, batch version, counts (N_WINDOWS, 2), newest)
        self.cache_ttl_s = float(cache_ttl_s)
        self.cache_max = int(cache_max)
        self.clock = clock
        self._cache: dict[str, tuple] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self.tracker: InvalidationTracker | None = None
        # invalidation sequence: entries read before an invalidation of their key (or a flush)
        # was processed are not stored (the report may have raced the read)
        self._seq = 0
        self._inval: dict[str, int] = {}
        self._flushed = -1
        self._inflight: dict[int, int] = {}  # read start seq -> reads in flight
        import threading

        self._lock = threading.Lock()  # reports arrive on the tracker's thread

    # ---- invalidation (InvalidationTracker callbacks)
    def invalidate(self, entity_keys) -> None:
        with self._lock:
            self._seq += 1
            seq, cache, inval = self._seq, self._cache, self._inval
            for k in entity_keys:
                cache.pop(k, None)
                inval[k] = seq
            if len(inval) > 100_000:  # only reads still in flight need the older ones
                low = min(self._inflight, default=seq)
                self._inval = {k: v for k, v in inval.items() if v > low}

    def invalidate_all(self) -> None:
        with self._lock:
            self._seq += 1
            self._flushed = self._seq
            self._cache.clear()
            self._inval.clear()

    def _vouched(self, now: float) -> float | None:
        """How far tracked entries may lag Redis now (None: the tracker does not vouch)."""
        t = self.tracker
        if t is None:
            return None
        sent = t.acked_sent_at
        if sent is None or now - sent >= self.cache_ttl_s:
            return None
        return now - sent

    def _script_pre(self, keys: list[str], parents, t_ms: int):
        """Split keys into cache hits and the keys to read. Returns (hits {index: entry},
        miss indices (None: all keys), ARGV, call order of the keys read, window signature)."""
        if self.cache_ttl_s <= 0:
            return ({}, None, *_script_args(self.mode, t_ms, keys, parents), None)
        now = self.clock()  # entries read now are stamped with it: before the read, not after
        with self._lock:
            seq0 = self._seq
        sig = (self.mode, tuple(b1 for _, _, b1 in _window_plan(t_ms)), now, seq0)
        oldest = now - self.cache_ttl_s
        if self._vouched(now) is not None:
            oldest = float("-inf")  # tracked: an entry is current until invalidated
        hits, miss = {}, []
        cache = self._cache
        wsig = sig[:2]
        for i, k in enumerate(keys):
            e = cache.get(k)
            if e is not None and e[0] > oldest and e[1] == wsig:
                hits[i] = e
            else:
                miss.append(i)
        with self._lock:
            self._inflight[sig[3]] = self._inflight.get(sig[3], 0) + 1
        self.cache_hits += len(hits)
        self.cache_misses += len(miss)
        if not hits:
            return ({}, None, *_script_args(self.mode, t_ms, keys, parents), sig)
        if parents is None:
            parents = _parents_of_keys(keys)
        # parents served from the cache are not in this call: no pruning by them
        at = np.full(len(keys) + 1, -1, dtype=np.int64)  # at[-1] (no parent) stays -1
        at[miss] = np.arange(len(miss))
        mk = [keys[i] for i in miss]
        mp = at[np.asarray(parents, dtype=np.int64)[miss]] if miss else _no_parents(0)
        return (hits, miss, *_script_args(self.mode, t_ms, mk, mp), sig)

    def _script_post(self, keys, t_ms, hits, miss, order, sig, reply) -> FeatureRead | None:
        """Merge the reply with the cache hits; None when the batch view switched under
        cached entries (the caller reads again without them)."""
        n_read = len(keys) if miss is None else len(miss)
        version, cutoff, got, newest_k = _parse_script(reply, n_read, order)
        if hits and any(e[2] != version for e in hits.values()):
            self.invalidate_all()
            self._script_failed(sig)
            return None
        staleness = None
        if not hits:
            counts, newest = got, newest_k
        else:
            now = sig[2]
            counts = np.empty((len(keys), F.N_WINDOWS, 2), dtype=np.int64)
            newest = np.empty(len(keys), dtype=np.int64)
            counts[miss], newest[miss] = got, newest_k
            oldest_at = now
            for i, e in hits.items():
                counts[i], newest[i] = e[3], e[4]
                if e[0] < oldest_at:
                    oldest_at = e[0]
            staleness = now - oldest_at
            vouched = self._vouched(now)
            if vouched is not None:
                staleness = min(staleness, vouched)
        if sig is not None:
            self._store(keys, miss, sig, version, got, newest_k)
        nb = int(newest.max()) if len(newest) else -1
        return FeatureRead(counts, t_ms, version, cutoff, nb if nb >= 0 else None,
                           cache_hits=len(hits), cache_misses=n_read if sig is not None else 0,
                           cache_staleness_s=staleness)

    def _store(self, keys, miss, sig, version, got, newest_k) -> None:
        seq0 = sig[3]
        idx = range(len(keys)) if miss is None else miss
        shared = [(j, keys[i]) for j, i in enumerate(idx)
                  if keys[i][:keys[i].index(":")] in SHARED_ENTITIES]
        at, wsig = sig[2], sig[:2]
        with self._lock:
            self._release(seq0)
            if self._flushed > seq0:
                return  # the cache was dropped while this read was in flight
            if len(self._cache) > self.cache_max:
                self._evict(wsig)
            cache, inval = self._cache, self._inval
            for j, k in shared:
                if inval.get(k, -1) <= seq0:  # no write reported since the read began
                    cache[k] = (at, wsig, version, got[j], int(newest_k[j]))

    def _release(self, seq0: int) -> None:
        left = self._inflight.get(seq0, 1) - 1
        if left > 0:
            self._inflight[seq0] = left
        else:
            self._inflight.pop(seq0, None)

    def _script_failed(self, sig) -> None:
        if sig is not None:
            with self._lock:
                self._release(sig[3])

    def _evict(self, wsig) -> None:
        """Drop what can no longer be served (another window, or past the TTL without the
        tracker vouching for it); everything when that is not enough."""
        now = self.clock()
        oldest = float("-inf") if self._vouched(now) is not None else now - self.cache_ttl_s
        self._cache = {k: e for k, e in self._cache.items() if e[1] == wsig and e[0] > oldest}
        if len(self._cache) > self.cache_max:
            self._cache.clear()

    def cache_stats(self) -> dict:
        n = self.cache_hits + self.cache_misses
        return {"ttl_s": self.cache_ttl_s, "hits": self.cache_hits, "misses": self.cache_misses,
                "hit_rate": (self.cache_hits / n) if n else None, "entries": len(self._cache),
                "tracking": None if self.tracker is None else self.tracker.status()}

    def _cached_meta(self):
        m = self._meta
        if m is not None and time.monotonic() - m[2] < self.pointer_ttl_s:
            return m[0], m[1]
        return None

    @staticmethod
    def _decode(v):
        return v.decode() if isinstance(v, bytes) else v

    def _set_meta(self, version, cutoff_raw) -> tuple[str | None, int | None]:
        version = self._decode(version)
        try:
            cutoff = int(self._decode(cutoff_raw)) if cutoff_raw is not None else None
        except ValueError:
            cutoff = None
        if version is None or cutoff is None:
            version, cutoff = None, None
        self._meta = (version, cutoff, time.monotonic())
        return version, cutoff


def unique_keys(entity_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``entity_ids`` (rows, len(ENTITIES)) of ids as text -> the unique ``entity:id`` keys and
    the inverse index (rows, len(ENTITIES)) into them."""
    names = np.array([e.name + ":" for e in F.ENTITIES], dtype=object)
    full = (names[None, :] + np.asarray(entity_ids, dtype=object))
    uniq, inv = np.unique(full.ravel().astype(str), return_inverse=True)
    return uniq, inv.reshape(full.shape)


class FeatureStore(_Base):
    """Synchronous reader (batch jobs, the streaming scorer, tests).

    ``client`` is a ``redis.Redis``; build one with :func:`redis_client`.
    """

    def read(self, keys, t_ms: int, parents=None) -> FeatureRead:
        """Window counts ``(len(keys), N_WINDOWS, 2)`` of ``entity:id`` keys at ``t_ms``."""
        keys = list(keys)
        t_ms = int(t_ms)
        if self.method == "script":
            for _attempt in range(2):
                hits, miss, args, order, sig = self._script_pre(keys, parents, t_ms)
                try:
                    reply = self._script(keys=[], args=args)
                except BaseException:
                    self._script_failed(sig)
                    raise
                fr = self._script_post(keys, t_ms, hits, miss, order, sig, reply)
                if fr is not None:
                    return fr
        for _attempt in range(2):
            meta = self._cached_meta()
            if meta is None:
                meta = self._refresh_meta()
            version, cutoff = meta
            if self.mode == "speed":
                version, cutoff = None, None
            plan = _PipelinePlan(self.mode, version, cutoff, t_ms)
            pipe = self.client.pipeline(transaction=False)
            plan.queue(pipe, keys)
            replies = pipe.execute()
            seen = self._decode(replies[0])
            if self.mode == "speed" or seen == meta[0]:
                counts, newest = plan.parse(replies, len(keys))
                return FeatureRead(counts, t_ms, version, cutoff, newest)
            self._meta = None  # the pointer moved: refresh the meta and read again
        counts, newest = plan.parse(replies, len(keys))
        return FeatureRead(counts, t_ms, version, cutoff, newest)

    def _refresh_meta(self):
        version = self.client.get(L.BATCH_POINTER_KEY)
        cutoff = None
        if version is not None:
            cutoff = self.client.hget(L.batch_meta_key(self._decode(version)), "cutoff_ms")
        return self._set_meta(version, cutoff)

    def read_rows(self, entity_ids: np.ndarray, t_ms: int) -> FeatureRead:
        """``entity_ids`` (rows, len(ENTITIES)) -> counts (rows, len(ENTITIES), N_WINDOWS, 2)."""
        keys, inv, parents = _keys_of_rows(entity_ids)
        fr = self.read(keys, t_ms, parents)
        fr.counts = fr.counts[inv]
        return fr

    def read_columns(self, columns: dict, t_ms: int) -> FeatureRead:
        """:meth:`read_rows` of the entities of event columns (``columns[field]`` per row);
        ``timings["keys"]``: the seconds spent building the keys."""
        t0 = time.perf_counter()
        keys, inv, parents = _keys_of_columns(columns)
        t1 = time.perf_counter()
        fr = self.read(keys, t_ms, parents)
        fr.counts = fr.counts[inv]
        fr.timings["keys"] = t1 - t0
        return fr


# --------------------------------------------------------------------------- invalidation


SPEED_PREFIX = L.SPEED_PREFIX  # "sv:": every speed-view hash (layout.speed_key)
# heartbeat keys: outside the speed view, and sorting after "sv:" so that Redis, which sends
# the invalidations of one event-loop iteration prefix by prefix in key order, reports a
# heartbeat after the speed-view writes executed together with it
HEARTBEAT_PREFIX = "sv~tracking:"


def _speed_entity_key(key: bytes) -> str | None:
    """The entity key (``entity:id``) of a reported speed-view key ``sv:{entity}:{id}:{day}``
    (``layout.speed_entity_of``); None for a key outside that layout (never read)."""
    try:
        entity, eid, _ = L.speed_entity_of(key.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return f"{entity}:{eid}"


class InvalidationTracker:
    """Server-assisted client-side caching for the shared-entity cache (Redis ``CLIENT
    TRACKING`` in broadcast mode, RESP2 redirect), on its own thread.

    One connection subscribes to ``__redis__:invalidate``; a second turns tracking on for
    the prefixes ``sv:`` and ``HEARTBEAT_PREFIX`` with its reports redirected to the first.
    Redis then reports every modified speed-view key (writes, expiry, eviction, flush);
    ``on_invalidate`` gets the entity keys (``ad:4`` of ``sv:ad:4:20254``, the speed-view
    hash of any day: :func:`_speed_entity_key`), ``on_flush`` is
    called on a flush and whenever the channel is (re)built or lost. Every ``heartbeat_s``
    the tracker writes a new heartbeat key and waits for its report: reports arrive in the
    order Redis executed the writes, so when the report of a heartbeat sent at ``s`` has been
    processed, every write executed before it has been reported too. ``acked_sent_at`` is
    that ``s`` (monotonic clock) for the newest such heartbeat, None while the channel is
    down. Any error drops both connections and rebuilds them after a back-off.

    A thread, not a task of the API's event loop: an overloaded loop must not delay the
    reports (the cache would stop being vouched for just when it is needed most). The
    callbacks run on this thread (the store serializes them with its own lock).
    """

    def __init__(self, connection_kwargs: dict, on_invalidate, on_flush, heartbeat_s: float = 0.05,
                 clock=time.monotonic):
        import threading

        self.kw = connection_kwargs
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
        self._socks: list = []

    def status(self) -> dict:
        sent = self.acked_sent_at
        age = None if sent is None else self.clock() - sent
        return {"healthy": age is not None, "heartbeat_age_s": age, "reports": self.reports,
                "restarts": self.restarts, "last_error": self.last_error}

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        import socket

        self._stop.set()
        for sock in list(self._socks):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.acked_sent_at = None

    def _open(self):
        import socket

        import hiredis

        kw = self.kw
        sock = socket.create_connection((kw.get("host", "127.0.0.1"), int(kw.get("port", 6379))), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socks.append(sock)
        parser = hiredis.Reader()

        def call(*args):
            sock.sendall(hiredis.pack_command(args))
            while True:
                reply = parser.gets()
                if reply is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise ConnectionError(f"redis: {reply}")
                    return reply
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("redis closed the connection")
                parser.feed(data)

        from ctrstream.store.connection import hello_commands

        for args in hello_commands(kw.get("password"), kw.get("db"), kw.get("username")):
            call(*args)  # heartbeats go to the store's database
        return sock, parser, call

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._session()
            except Exception as e:  # noqa: BLE001 - any failure: no vouching, drop, rebuild
                if not self._stop.is_set():
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.warning("invalidation channel lost (%s); the cache falls back to its TTL",
                                self.last_error)
            finally:
                self.acked_sent_at = None
                self.on_flush()
                for sock in self._socks:
                    try:
                        sock.close()
                    except OSError:
                        pass
                self._socks = []
            if self._stop.wait(backoff):
                return
            self.restarts += 1
            backoff = min(backoff * 2, 5.0)

    def _session(self) -> None:
        import select

        sub, sub_p, sub_call = self._open()
        sub_call("CLIENT", "SETNAME", "ctrstream-invalidation-reports")
        cid = sub_call("CLIENT", "ID")
        sub_call("SUBSCRIBE", "__redis__:invalidate")
        _, _, trk_call = self._open()
        trk_call("CLIENT", "SETNAME", "ctrstream-invalidation-tracking")
        trk_call("CLIENT", "TRACKING", "ON", "REDIRECT", cid, "BCAST",
                 "PREFIX", SPEED_PREFIX, "PREFIX", HEARTBEAT_PREFIX)
        self.on_flush()  # nothing read before this moment is vouched for
        me = f"{HEARTBEAT_PREFIX}{uuid.uuid4().hex}:"
        me_b, prefix_b = me.encode(), SPEED_PREFIX.encode()
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
                trk_call("SET", f"{me}{hb_seq}", 1, "PX", 2000)
                next_hb = now + self.heartbeat_s
                if len(sent) > 1000:
                    raise ConnectionError("heartbeats are not reported back")
            ready, _, _ = select.select([sub], [], [], max(0.0, next_hb - self.clock()))
            if not ready:
                if self.clock() - last_data > silent_limit:
                    raise ConnectionError(f"no report for {silent_limit:g} s")
                continue
            data = sub.recv(1 << 20)
            if not data:
                raise ConnectionError("redis closed the invalidation connection")
            last_data = self.clock()
            sub_p.feed(data)
            acked = None
            while (msg := sub_p.gets()) is not False:
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
                        # sv:{entity}:{id}:{day} (layout.speed_key) -> {entity}:{id}
                        ek = _speed_entity_key(k)
                        if ek is not None:
                            ents.append(ek)
                    elif k.startswith(me_b):
                        try:
                            acked = max(acked or 0, int(k[len(me_b):]))
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


class AsyncFeatureStore(_Base):
    """The same reader for asyncio (the prediction API); ``client`` is ``redis.asyncio.Redis``.

    ``tracking=True`` (with a cache): :meth:`start` runs an :class:`InvalidationTracker` on
    the client's Redis so that cached entries stay valid until Redis reports a write to them
    (see :class:`_Base`); call :meth:`close` at shutdown.
    """

    def __init__(self, client, *args, tracking: bool = False, heartbeat_s: float = 0.05, **kwargs):
        super().__init__(client, *args, **kwargs)
        self.tracking = bool(tracking) and self.cache_ttl_s > 0
        self.heartbeat_s = heartbeat_s
        lean = _LeanScript.for_client(client, _LUA)
        if lean is not None:
            self._script = lean

    async def start(self) -> None:
        if self.tracking and self.tracker is None:
            kw = dict(self.client.connection_pool.connection_kwargs)
            self.tracker = InvalidationTracker(kw, self.invalidate, self.invalidate_all,
                                               heartbeat_s=self.heartbeat_s, clock=self.clock)
            self.tracker.start()

    async def close(self) -> None:
        if isinstance(self._script, _LeanScript):
            self._script.close()
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            await asyncio.get_running_loop().run_in_executor(None, tracker.close)
            self.invalidate_all()

    async def read(self, keys, t_ms: int, parents=None) -> FeatureRead:
        keys = list(keys)
        t_ms = int(t_ms)
        if self.method == "script":
            for _attempt in range(2):
                hits, miss, args, order, sig = self._script_pre(keys, parents, t_ms)
                try:
                    reply = await self._script(keys=[], args=args)
                except BaseException:
                    self._script_failed(sig)
                    raise
                fr = self._script_post(keys, t_ms, hits, miss, order, sig, reply)
                if fr is not None:
                    return fr
        for _attempt in range(2):
            meta = self._cached_meta()
            if meta is None:
                meta = await self._refresh_meta()
            version, cutoff = meta
            if self.mode == "speed":
                version, cutoff = None, None
            plan = _PipelinePlan(self.mode, version, cutoff, t_ms)
            pipe = self.client.pipeline(transaction=False)
            plan.queue(pipe, keys)
            replies = await pipe.execute()
            if self.mode == "speed" or self._decode(replies[0]) == meta[0]:
                break
            self._meta = None
        counts, newest = plan.parse(replies, len(keys))
        return FeatureRead(counts, t_ms, version, cutoff, newest)

    async def _refresh_meta(self):
        version = await self.client.get(L.BATCH_POINTER_KEY)
        cutoff = None
        if version is not None:
            cutoff = await self.client.hget(L.batch_meta_key(self._decode(version)), "cutoff_ms")
        return self._set_meta(version, cutoff)

    async def read_rows(self, entity_ids: np.ndarray, t_ms: int) -> FeatureRead:
        keys, inv, parents = _keys_of_rows(entity_ids)
        fr = await self.read(keys, t_ms, parents)
        fr.counts = fr.counts[inv]
        return fr

    async def read_columns(self, columns: dict, t_ms: int) -> FeatureRead:
        t0 = time.perf_counter()
        keys, inv, parents = _keys_of_columns(columns)
        t1 = time.perf_counter()
        fr = await self.read(keys, t_ms, parents)
        fr.counts = fr.counts[inv]
        fr.timings["keys"] = t1 - t0
        return fr


class _RespProtocol(asyncio.Protocol):
    """One pipelined Redis connection: replies are matched to waiting calls in order."""

    def __init__(self):
        import hiredis

        self.reader = hiredis.Reader()
        self.waiters: deque = deque()
        self.transport = None
        self.lost: Exception | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            fut = self.waiters.popleft()
            if not fut.done():  # a caller that timed out has gone: its reply is dropped
                fut.set_result(reply)

    def connection_lost(self, exc) -> None:
        self.lost = ConnectionError(f"redis connection lost: {exc or 'closed'}")
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(self.lost)


class _LeanScript:
    """``EVALSHA`` of the read script over one pipelined asyncio connection, packed and parsed
    by hiredis in C - the API's hot path. redis-py's asyncio client spends ~0.3 ms of Python
    per call on its connection pool, retry wrapper and argument conversion (py-spy: ~12 % of
    the API's CPU at 100 candidates); this is one ``transport.write`` and one future.
    Concurrent requests share the connection (Redis answers in order). A timeout or a broken
    connection closes it (the next call reconnects) and raises - the caller degrades.
    ``NOSCRIPT`` (a restarted or flushed Redis) loads the script with ``EVAL``, as redis-py
    does."""

    def __init__(self, kw: dict, lua: str):
        import hashlib

        import hiredis

        self._pack, self._error = hiredis.pack_command, hiredis.ReplyError
        self.kw = kw
        self.lua = lua.encode()
        self.sha = hashlib.sha1(self.lua).hexdigest().encode()
        self.timeout = float(kw.get("socket_timeout") or 1.0)
        self.connect_timeout = float(kw.get("socket_connect_timeout") or self.timeout)
        self.proto: _RespProtocol | None = None
        self._connecting: asyncio.Future | None = None

    @classmethod
    def for_client(cls, client, lua: str) -> "_LeanScript | None":
        """For a TCP redis-py asyncio client with hiredis; None otherwise (redis-py's script)."""
        import importlib.util

        if importlib.util.find_spec("hiredis") is None:
            return None
        kw = dict(client.connection_pool.connection_kwargs)
        if "host" not in kw or "path" in kw or kw.get("ssl"):
            return None
        return cls(kw, lua)

    async def _connect(self) -> _RespProtocol:
        from ctrstream.store.connection import hello_commands

        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(loop.create_connection(
            _RespProtocol, self.kw.get("host", "127.0.0.1"), int(self.kw.get("port", 6379))),
            self.connect_timeout)
        for args in hello_commands(self.kw.get("password"), self.kw.get("db"), self.kw.get("username")):
            reply = await self._roundtrip(proto, args)
            if isinstance(reply, self._error):
                proto.transport.close()
                raise ConnectionError(f"redis {args[0]}: {reply}")
        return proto

    async def _roundtrip(self, proto: _RespProtocol, args):
        fut = asyncio.get_running_loop().create_future()
        proto.waiters.append(fut)
        proto.transport.write(self._pack(args))
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            proto.transport.close()  # replies may still come: never reuse this connection
            raise TimeoutError(f"redis did not answer within {self.timeout:g} s") from None

    async def _proto(self) -> _RespProtocol:
        p = self.proto
        if p is not None and p.lost is None and not p.transport.is_closing():
            return p
        if self._connecting is None:  # one connection attempt shared by concurrent callers
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            self.proto = await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None
        return self.proto

    async def __call__(self, keys=(), args=()):
        proto = await self._proto()
        head = (len(keys), *keys, *args)
        reply = await self._roundtrip(proto, (b"EVALSHA", self.sha, *head))
        if isinstance(reply, self._error) and str(reply).startswith("NOSCRIPT"):
            reply = await self._roundtrip(proto, (b"EVAL", self.lua, *head))
        if isinstance(reply, self._error):
            import redis

            raise redis.ResponseError(str(reply))
        return reply

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None


__all__ = ["FeatureRead", "FeatureStore", "AsyncFeatureStore", "InvalidationTracker",
           "smoothed_rates", "historical_ctr", "unique_keys", "SHARED_ENTITIES"]
