-- Window counts of many entities at one event time, in one atomic call (ctrstream.store.reader).
--
-- Every key this script touches is in KEYS, built by ctrstream.store.layout, and every field
-- it reads is in ARGV (a speed field of a member of a grouped hash is its entity's prefix
-- followed by the field, both from ARGV): it assembles no key, so it can run wherever the
-- keys of one call live together (one Redis, or one Redis Cluster slot).
--
-- KEYS[1]       the batch-view pointer (bv:current)
-- then, per entity (in call order), B batch-view keys and D speed-view day keys:
--   B = 0  no batch part (mode speed, or no view is served)
--   B = 1  the view's :sums hash (suffix sums and long windows)
--   B = n_res + 1  the per-resolution hashes, then the :long hash (views without :sums)
--   D      the entity's speed-view hashes of the days the speed buckets fall on (day slot
--          1 .. D, ascending)
--
-- ARGV
--   mode ('lambda' | 'speed' | 'batch'), expected pointer value ('' for none), B, D, n_res,
--   per resolution r:
--     ns, then ns x (day slot, bucket start ms, field_i, field_c)   its speed buckets
--     lo, hi   1-based indices into SF of the suffix-sum pair at the batch part's first
--              bucket and one past its last (0: none; the batch part is S[lo] - S[hi])
--     nb, then nb fields   its per-bucket batch fields (i, c interleaved; B = n_res + 1)
--   nsf, then nsf fields SF   the :sums fields to read (the long windows' i, c first)
--   nlong, then 2 x nlong fields   the long windows' fields (of the :long hash, B = n_res + 1)
--   maxp, n_plain, n_ent, then per entity after the first n_plain: maxp 1-based positions of
--   its parents among the earlier entities (0: none)
--   npre (0 or n_ent), then per entity (call order) the prefix of its speed fields in its
--   speed hashes ('' for none; layout.SpeedLayout.field_prefix, the grouped layout)
--
-- Returns {pointer value or '', blob} where blob holds per entity, int64 little-endian,
-- (imps, clicks) per window (resolutions, then long windows), then the start of its newest
-- non-empty speed bucket (-1: none) - or {pointer value, 'moved'} when the pointer is not
-- the expected one (the caller re-plans against the new view and calls again).
--
-- Parent pruning (exact): every event counted for a crossed entity (user_x_ad 17:4) is also
-- counted, in the same bucket, for each of its single-field parts (user 17, ad 4), so where a
-- part's window is empty the crossed window is empty too and is not read.

local mode = ARGV[1]
local ptr = ''
if mode ~= 'speed' then
  ptr = redis.call('GET', KEYS[1]) or ''
  if ptr ~= ARGV[2] then return {ptr, 'moved'} end
end
local B, D, n_res = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local pos = 6
local res = {}
for r = 1, n_res do
  local R = {slot = {}, start = {}, sf = {}}
  local ns = tonumber(ARGV[pos]); pos = pos + 1
  for j = 1, ns do
    R.slot[j], R.start[j] = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1])
    R.sf[2 * j - 1], R.sf[2 * j] = ARGV[pos + 2], ARGV[pos + 3]
    pos = pos + 4
  end
  R.lo, R.hi = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1]); pos = pos + 2
  local nb = tonumber(ARGV[pos]); pos = pos + 1
  R.bf = {}
  for j = 1, nb do R.bf[j] = ARGV[pos + j - 1] end
  pos = pos + nb
  res[r] = R
end
local nsf = tonumber(ARGV[pos]); pos = pos + 1
local SF = {}
for j = 1, nsf do SF[j] = ARGV[pos + j - 1] end
pos = pos + nsf
local n_long = tonumber(ARGV[pos]); pos = pos + 1
local LF = {}
for j = 1, 2 * n_long do LF[j] = ARGV[pos + j - 1] end
pos = pos + 2 * n_long
local maxp, n_plain, n_ent = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
pos = pos + 3
local PRE = {}
do
  local pp = pos + (n_ent - n_plain) * maxp
  local npre = tonumber(ARGV[pp] or '0') or 0
  for k = 1, npre do PRE[k] = ARGV[pp + k] end
end

local W = n_res + n_long
local band, bor, call, tonum = bit.band, bit.bor, redis.call, tonumber
local POW = {}
for w = 1, W do POW[w] = 2 ^ (w - 1) end
local ALL = 2 ^ W - 1
local FMT = '<' .. string.rep('i8', 2 * W + 1)
local STRIDE = B + D

-- The speed part: ONE HMGET per day slot of the fields of every resolution's buckets on that
-- day. The plan of a mask of pruned windows, built once per mask (SPLAN[mask]): {slots to
-- read, field list per slot, per resolution its runs of buckets on one slot {slot, 1-based
-- offset of the run's first (i, c) pair in that slot's reply, first j, last j}}. SMASK: the
-- windows with speed fields; an entity whose parents prune some of them reads the others
-- only (slots without any of their fields are not read), none: no HMGET at all.
local SMASK = 0
for r = 1, n_res do if #res[r].sf > 0 then SMASK = SMASK + POW[r] end end
local SPLAN = {}
local function speed_plan(m)
  local p = SPLAN[m]
  if not p then
    local slots, fields, runs, seen = {}, {}, {}, {}
    for r = 1, n_res do
      local R = res[r]
      if #R.sf > 0 and band(m, POW[r]) == 0 then
        local rr, run = {}, nil
        for j = 1, #R.slot do
          local x = R.slot[j]
          if not seen[x] then seen[x] = true; slots[#slots + 1] = x; fields[x] = {} end
          local f = fields[x]
          if run and run[1] == x then run[4] = j
          else run = {x, #f + 1, j, j}; rr[#rr + 1] = run end
          f[#f + 1] = R.sf[2 * j - 1]; f[#f + 1] = R.sf[2 * j]
        end
        runs[r] = rr
      end
    end
    p = {slots, fields, runs}
    SPLAN[m] = p
  end
  return p
end
speed_plan(0)  -- the unpruned plan: every resolution's speed fields

local blob = {}
local zero = {}  -- zero[k]: bit mask of entity k's empty windows (both counts 0)

-- window counts of entity k (its keys start at KEYS[base + 1]); pm: bit mask of windows
-- pruned by an empty parent window
local function entity(k, pm, pre_sv)
  local base = 1 + (k - 1) * STRIDE
  local vals, nv, zm, newest = {}, 0, 0, -1
  local bv = nil
  if B == 1 and pm ~= ALL and nsf > 0 then bv = call('HMGET', KEYS[base + 1], unpack(SF)) end
  local sv, runs = nil, nil
  local sm = band(pm, SMASK)
  if sm ~= SMASK then
    local p = speed_plan(sm)
    sv, runs = pre_sv or {}, p[3]
    local pre = PRE[k]
    for _, x in ipairs(pre_sv and {} or p[1]) do
      local f = p[2][x]
      if pre and pre ~= '' then
        local g = {}
        for i = 1, #f do g[i] = pre .. f[i] end
        f = g
      end
      sv[x] = call('HMGET', KEYS[base + B + x], unpack(f))
    end
  end
  for r = 1, n_res do
    local R = res[r]
    local imps, clicks = 0, 0
    if band(pm, POW[r]) == 0 then
      if bv then
        if R.lo > 0 then
          imps, clicks = tonum(bv[R.lo]) or 0, tonum(bv[R.lo + 1]) or 0
          if R.hi > 0 then
            imps = imps - (tonum(bv[R.hi]) or 0); clicks = clicks - (tonum(bv[R.hi + 1]) or 0)
          end
        end
      elseif B > 1 and #R.bf > 0 then
        local v = call('HMGET', KEYS[base + r], unpack(R.bf))
        for q = 1, #v, 2 do
          imps = imps + (tonum(v[q]) or 0); clicks = clicks + (tonum(v[q + 1]) or 0)
        end
      end
      local rr = runs and runs[r]
      if rr then
        for q = 1, #rr do
          local run = rr[q]
          local v, o = sv[run[1]], run[2]
          for j = run[3], run[4] do
            local i, c = tonum(v[o]) or 0, tonum(v[o + 1]) or 0
            o = o + 2
            if i > 0 or c > 0 then
              if R.start[j] > newest then newest = R.start[j] end
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
    if not v and B > 1 then
      local need = false
      for w = n_res + 1, W do if band(pm, POW[w]) == 0 then need = true end end
      if need then v = call('HMGET', KEYS[base + n_res + 1], unpack(LF)) end
    end
    for w = 1, n_long do
      local i, c = 0, 0
      if v and band(pm, POW[n_res + w]) == 0 then
        i, c = tonum(v[2 * w - 1]) or 0, tonum(v[2 * w]) or 0
      end
      if i == 0 and c == 0 then zm = zm + POW[n_res + w] end
      vals[nv + 1] = i; vals[nv + 2] = c; nv = nv + 2
    end
  end
  vals[nv + 1] = newest
  blob[#blob + 1] = struct.pack(FMT, unpack(vals))
  return zm
end

for k = 1, n_plain do zero[k] = entity(k, 0) end
local q = pos
local PM = {}
for k = n_plain + 1, n_ent do
  local pm = 0
  for j = 1, maxp do
    local p = tonum(ARGV[q + j - 1])
    if p > 0 and p < k then pm = bor(pm, zero[p]) end
  end
  q = q + maxp
  PM[k] = pm
end

-- The grouped layout (field prefixes given): a root's hash of one day holds the speed fields
-- of all its crosses, so the crossed entities' speed fields are read with ONE HMGET per
-- distinct key (a user's crosses with every candidate ad; in chunks of at most CHUNK fields,
-- under Lua's unpack limit) and handed to entity() per slot.
local SV = {}
if #PRE > 0 then
  local CHUNK = 4000
  local groups, korder = {}, {}
  for k = n_plain + 1, n_ent do
    local sm = band(PM[k], SMASK)
    if sm ~= SMASK then
      local p = speed_plan(sm)
      local base = 1 + (k - 1) * STRIDE
      local pre = PRE[k] or ''
      SV[k] = {}
      for _, x in ipairs(p[1]) do
        local ki = base + B + x
        local g = groups[KEYS[ki]]
        if not g then
          g = {ki = ki, fields = {}, parts = {}}
          groups[KEYS[ki]] = g
          korder[#korder + 1] = g
        end
        local f, gf = p[2][x], g.fields
        local off = #gf
        for i = 1, #f do gf[off + i] = pre .. f[i] end
        g.parts[#g.parts + 1] = {k, x, off, #f}
      end
    end
  end
  for _, g in ipairs(korder) do
    local gf, v = g.fields, {}
    for a = 1, #gf, CHUNK do
      local part = call('HMGET', KEYS[g.ki], unpack(gf, a, math.min(a + CHUNK - 1, #gf)))
      for i = 1, #part do v[a + i - 1] = part[i] end
    end
    for _, pt in ipairs(g.parts) do
      local s, off = {}, pt[3]
      for i = 1, pt[4] do s[i] = v[off + i] end
      SV[pt[1]][pt[2]] = s
    end
  end
end
for k = n_plain + 1, n_ent do zero[k] = entity(k, PM[k], SV[k]) end
return {ptr, table.concat(blob)}
