"""The Redis layout: every key and field ctrstream writes or reads, built and parsed here only.

Nothing outside :mod:`ctrstream.store` spells a key prefix, a field format or a RESP byte;
everything in it builds them with the functions below (the Lua read script included: it
receives the full key names in ``KEYS``, built here, and only the field names of the
buckets it sums). Modelled on Feast's ``key_encoding_utils``: one place encodes keys, one
place decodes them.

Speed view (written by the speed layer, absolute counts, never ``HINCRBY``)
---------------------------------------------------------------------------
Two layouts, chosen by ``settings.speed.layout`` (:class:`SpeedLayout`, :func:`speed_layout`;
every writer, reader, scan and reconciliation takes one):

* ``grouped`` (the default): ``sv:{{root}:{root id}}:{day}`` - one HASH per *root* entity id
  and event day, the root entity key in braces (a Redis Cluster hash tag), holding the
  root's own cells (fields ``{res}:{i|c}{bucket}``) and those of its crosses (fields
  ``{tag}:{rest of id}:{res}:{i|c}{bucket}``: user x ad 17, 4 is ``ua:4:...`` in user 17's
  hash); a click count of 0 is not written. Details: :class:`SpeedLayout`.
* ``entity``: as described next, one hash per entity id and day.

``sv:{entity}:{id}:{day}`` - one HASH per entity and event day (days since the epoch,
UTC, :func:`speed_day`) for every resolution: fields ``{res}:i{bucket}`` and
``{res}:c{bucket}`` (:func:`speed_field`, e.g. ``5m:i29215043``) hold the impression and
click counts of the buckets of that day. One hash for all resolutions, rather than one per
resolution: every event updates all resolutions of an entity at once, so the writer sends
one ``HSET`` per entity instead of three and the reader one ``HMGET`` per day (measured:
Redis spends 1.7x less per event). One hash per *day*, so that it is bounded without ever
deleting a field: a day's hash stops growing when the day ends and expires
:func:`speed_hash_ttl_ms` after its last new bucket of the longest resolution (each one
renews the TTL), which keeps every bucket readable for at least its own resolution's TTL
(:func:`speed_ttl_ms`). A window of up to a day spans at most two day hashes.

Batch view (written by the batch layer under a version, switched atomically)
----------------------------------------------------------------------------
(every per-entity key carries its entity key in braces, a Redis Cluster hash tag)

* ``bv:{version}:{{entity}:{id}}:{res}`` - one HASH per resolution, fields ``i{bucket}`` /
  ``c{bucket}`` (:func:`batch_field`), the buckets closed by the cut-off
  (``features.view_buckets``);
* ``bv:{version}:{{entity}:{id}}:long`` - fields ``i7d`` / ``c7d`` (:func:`long_field`);
* ``bv:{version}:{{entity}:{id}}:sums`` - the serving summary of the entity: the long-window
  fields again, plus **suffix sums** per resolution, ``{res}:i{b}`` / ``{res}:c{b}`` = the
  view's impressions / clicks of buckets ``>= b`` (:func:`suffix_field`), for every ``b`` of
  the view up to the entity's last non-empty bucket (absent: 0). The batch part of any
  window, buckets ``lo..hi`` of the view, is then ``S[lo] - S[hi + 1]``;
* ``bv:{version}:meta`` - HASH ``cutoff_ms``, ``created_ms``, ``fingerprint``, ``sums``
  (``1``: the view carries the ``:sums`` hashes), ``keys``, ``buckets``;
* ``bv:versions`` - ZSET of versions by creation time (a version is registered before its
  keys are written, so a publisher that dies half way leaves a version to clean up);
* ``bv:current`` - STRING, the served version (switched with one ``SET``).

Entity keys, calibration, reconciliation, cache tracking
--------------------------------------------------------
* an **entity key** ``{entity}:{id}`` (:func:`entity_key`) names one entity in the read
  plan and the caches; ids of crossed entities join their parts with ``:``
  (``user_x_ad`` 17, 4 -> ``17:4``, ``features.entity_id``);
* ``cal:{cal}:<calibrator>`` (HASH ``version``, ``params``, ``metrics``, ``updated_ms``),
  ``cal:{cal}:<calibrator>:state`` / ``:history`` / ``:drift``, ``cal:{cal}:versions`` (SET
  of the calibrator ids), ``cal:{cal}:seq`` (the reload counter), ``cal:{cal}:job:<name>``
  (the calibration job's checkpoint) - ``{cal}`` literally, a Redis Cluster hash tag: every
  calibration key in one slot, so that a checkpoint is one MULTI/EXEC on a cluster too; a
  calibrator id (:func:`calibrator_id`) is ``{model_name}@{version}``
  (``ctr_lr@1``), or the bare version for a prediction that names no model;
* ``reconcile:{version}`` (JSON report), ``reconcile:last``;
* ``sv~tracking:{client}:{seq}`` - the shared-entity cache's heartbeat keys (outside the
  speed view, and sorting after ``sv:`` so that Redis reports a heartbeat after the
  speed-view writes executed with it);
* ``pp:{namespace}:{user_id}`` - precomputed predictions (batch inference,
  :mod:`ctrstream.store.predictions`): one HASH per user and namespace (a model and
  precompute run), field ``{ad_id}`` (:func:`prediction_field`) = the click probability in
  decimal; the hash expires with its precompute run (``PEXPIRE``). One hash per *user*, so
  that a request (one user, many candidate ads) is one ``HMGET``, and a user's few pairs
  share one small (listpack) hash;
* ``svw:{writer}`` - a speed-view writer's sequence marker (:func:`speed_writer_marker`):
  the number of the writer's last payload, set at the end of that payload, so that after a
  reconnection the writer can tell whether Redis still holds everything it acknowledged
  (outside the speed view: ``sv:*`` does not match it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ctrstream import features as F

ENTITY_SEP = ":"  # between the entity name and its id in an entity key
ID_PART_SEP = ":"  # between the parts of a crossed entity's id (as features.entity_id joins them)
FIELD_RES_SEP = ":"  # between the resolution and the event type in speed and suffix fields

# --------------------------------------------------------------------------- entity keys


def entity_key(entity: str, eid: str) -> str:
    """The entity key ``{entity}:{id}`` of one entity id (crossed ids contain ``:``)."""
    return f"{entity}{ENTITY_SEP}{eid}"


def entity_key_prefix(entity: str) -> str:
    """What every entity key of ``entity`` starts with."""
    return entity + ENTITY_SEP


def split_entity_key(key: str) -> tuple[str, str]:
    """``(entity, id)`` of an entity key."""
    entity, _, eid = key.partition(ENTITY_SEP)
    return entity, eid


# --------------------------------------------------------------------------- speed view

SPEED_PREFIX = "sv:"  # every speed-view hash
SPEED_DAY_SEP = ":"  # between the entity key and the day
SPEED_PATTERN = SPEED_PREFIX + "*"  # SCAN pattern of the whole speed view


def speed_day(bucket: int, res: F.Resolution) -> int:
    """The event day (days since the epoch, UTC) of bucket ``bucket`` of ``res``: the day
    part of its speed-view key."""
    return bucket * res.bucket_ms // F.DAY_MS


def speed_key(entity: str, eid: str, day: int) -> str:
    """The speed-view hash of one entity and event day (all resolutions)."""
    return f"{SPEED_PREFIX}{entity}{ENTITY_SEP}{eid}{SPEED_DAY_SEP}{day}"


def speed_keys(entity_keys: list[str], day: int) -> list[str]:
    """:func:`speed_key` of many entity keys for one day (the read plan's hot path)."""
    suffix = f"{SPEED_DAY_SEP}{day}"
    return [SPEED_PREFIX + k + suffix for k in entity_keys]


def speed_key_head(entity: str) -> bytes:
    """The constant start of every speed-view key of ``entity`` (``sv:{entity}:``): the
    vectorized writer appends the id parts, :data:`SPEED_DAY_SEP` and the day."""
    return f"{SPEED_PREFIX}{entity}{ENTITY_SEP}".encode()


def speed_entity_of(key: str) -> tuple[str, str, int]:
    """``(entity, id, day)`` of a speed-view key (crossed ids contain ``:``)."""
    if not key.startswith(SPEED_PREFIX):
        raise ValueError(f"not a speed-view key: {key!r}")
    rest, day = key[len(SPEED_PREFIX) :].rsplit(SPEED_DAY_SEP, 1)
    entity, eid = split_entity_key(rest)
    return entity, eid, int(day)


def speed_entity_key_of(key: bytes) -> str | None:
    """The entity key (``entity:id``) of a speed-view key ``sv:{entity}:{id}:{day}``; None
    for a key outside that layout."""
    try:
        entity, eid, _ = speed_entity_of(key.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return entity_key(entity, eid)


SPEED_WRITER_PREFIX = "svw:"


def speed_writer_marker(writer: str) -> str:
    """The sequence marker key of one speed-view writer (one per job process)."""
    return f"{SPEED_WRITER_PREFIX}{writer}"


def speed_field(res: str, event_type: str, bucket: int) -> str:
    """Field of a speed-view hash: ``event_type`` count of bucket ``bucket`` of ``res``."""
    return f"{speed_field_head(res, event_type)}{bucket}"


def speed_field_head(res: str, event_type: str) -> str:
    """The constant start of every speed-view field of ``res`` and ``event_type``
    (``{res}:{event_type}``): the vectorized writer appends the bucket."""
    return f"{res}{FIELD_RES_SEP}{event_type}"


SPEED_FIELD_RE = re.compile(rb"^([^:]+):([ic])(-?\d+)$")
"""A speed-view field (bytes): groups resolution name, event type, bucket (bulk readers match
millions of fields with it; :func:`parse_speed_field` for one)."""


def parse_speed_field(field: bytes) -> tuple[str, str, int] | None:
    """``(res, event type, bucket)`` of a speed-view field; None for any other field."""
    m = SPEED_FIELD_RE.match(field)
    if m is None:
        return None
    return m.group(1).decode(), m.group(2).decode(), int(m.group(3))


def speed_ttl_ms(res: F.Resolution, allowed_lateness_ms: int) -> int:
    """How long a speed-view bucket of ``res`` must stay readable after it ends."""
    return res.window_ms + allowed_lateness_ms + res.bucket_ms


def speed_hash_ttl_ms(allowed_lateness_ms: int) -> int:
    """TTL of a speed-view hash, renewed whenever it gets a new bucket of the longest
    resolution: it then outlives every bucket of every resolution written since."""
    return max(speed_ttl_ms(r, allowed_lateness_ms) for r in F.RESOLUTIONS)


def speed_keep_buckets(res: F.Resolution, allowed_lateness_ms: int) -> int:
    """How many buckets, counted back from an entity's newest, the speed view is sure to
    hold: as many as span the *longest* resolution's TTL (a day and an hour here) at every
    resolution - the day hashes live that long after their last new hour - so a batch view
    up to a day old can always be reconciled against the speed view."""
    span = max(speed_ttl_ms(r, allowed_lateness_ms) for r in F.RESOLUTIONS)
    return -(-span // res.bucket_ms)


# --------------------------------------------------------------------------- speed layouts

SPEED_TAG_OPEN, SPEED_TAG_CLOSE = "{", "}"  # a Redis Cluster hash tag around the root entity key
SPEED_LAYOUTS = ("grouped", "entity")
# the short tag naming a crossed entity in its root's grouped hash (``ua:4:5m:i29215043``)
MEMBER_TAGS = {"user_x_advertiser": "uv", "user_x_ad": "ua", "site_x_category": "sc"}
_GROUPED_FIELD_RE = re.compile(rb"^(?:([^:]+):(.+):)?([^:]+):([ic])(-?\d+)$")


@dataclass(frozen=True)
class SpeedMember:
    """Where the cells of one entity live in a :class:`SpeedLayout`: the hash of its *root*
    entity's id (the id parts at ``key_parts`` of ``Entity.fields``) and the day, and fields
    named ``{tag}:{rest}:{res}:{event type}{bucket}`` (``rest``: the id parts at
    ``rest_parts``, joined with ``:``) - or ``{res}:{event type}{bucket}`` without a tag."""

    entity: str
    root: str
    key_parts: tuple[int, ...]
    rest_parts: tuple[int, ...]
    tag: str

    def split(self, eid: str) -> tuple[str, str]:
        """``(root id, rest)`` of an id of this entity."""
        if not self.rest_parts:
            return eid, ""
        parts = eid.split(ID_PART_SEP)
        if len(parts) <= max(self.rest_parts):
            raise ValueError(
                f"{self.entity} id {eid!r} has {len(parts)} part(s), not one per field: give "
                f"crossed ids as features.entity_id joins them (e.g. 17{ID_PART_SEP}4)"
            )
        return (
            ID_PART_SEP.join(parts[i] for i in self.key_parts),
            ID_PART_SEP.join(parts[i] for i in self.rest_parts),
        )

    def field_prefix(self, eid: str) -> str:
        """What every field of entity id ``eid`` starts with ("" for a root's own fields)."""
        if not self.tag:
            return ""
        return f"{self.tag}{FIELD_RES_SEP}{self.split(eid)[1]}{FIELD_RES_SEP}"


class SpeedLayout:
    """The key and field format of the speed view, one of :data:`SPEED_LAYOUTS`
    (``settings.speed.layout``); every writer and reader of the speed view is parameterized
    by one (docs/speed-layer.md):

    * ``grouped`` (the default): entities that share a root id share ONE hash per root id and
      event day, ``sv:{user:17}:20431`` - the root entity key in braces, a Redis Cluster hash
      tag, so that a root's hash and everything a request reads of it sit in one slot. A
      crossed entity whose first field is a single-field entity's (``user_x_ad``,
      ``user_x_advertiser`` under ``user``; ``site_x_category`` under ``site``) is a member
      of that root's hash, its fields prefixed with its tag and the rest of its id
      (``ua:4:5m:i29215043``); the root's own fields are ``5m:i29215043``. Entities shared by
      many others (``ad``, ``campaign``, ``advertiser``) are roots of their own, never
      copied into another's hash. A click count of 0 is not written (:attr:`sparse_clicks`:
      an absent field reads 0, and most cells have no click).
    * ``entity``: one hash per entity id and day, ``sv:{entity}:{id}:{day}`` (no hash tag),
      fields ``{res}:{event type}{bucket}``: every event touches 8 hashes.
    """

    def __init__(self, name: str) -> None:
        if name not in SPEED_LAYOUTS:
            raise ValueError(
                f"unknown speed-view layout {name!r}: use one of {', '.join(SPEED_LAYOUTS)} "
                "(CTRSTREAM_SPEED__LAYOUT)"
            )
        self.name = name
        self.grouped = name == "grouped"
        # a click count of 0 is not written (an absent field reads 0): most cells have no
        # click, and Redis' cost of an HSET grows with its fields (docs/speed-layer.md)
        self.sparse_clicks = self.grouped
        single = {e.fields[0]: e.name for e in F.ENTITIES if len(e.fields) == 1}
        members: dict[str, SpeedMember] = {}
        for e in F.ENTITIES:
            root = single.get(e.fields[0]) if self.grouped and len(e.fields) > 1 else None
            if root is None:
                members[e.name] = SpeedMember(e.name, e.name, tuple(range(len(e.fields))), (), "")
            else:
                tag = MEMBER_TAGS.get(e.name, e.name)
                members[e.name] = SpeedMember(
                    e.name, root, (0,), tuple(range(1, len(e.fields))), tag
                )
        self.members = members
        self.by_tag = {(m.root, m.tag): m.entity for m in members.values()}
        if len(self.by_tag) != len(members):
            raise ValueError(f"two members of one root share a tag in layout {name!r}")
        self.roots = sorted({m.root for m in members.values()})

    def __repr__(self) -> str:
        return f"SpeedLayout({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SpeedLayout) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    # ---- keys
    def root_key(self, root: str, root_id: str, day: int) -> str:
        """The hash of root entity id ``root_id`` and event day ``day``."""
        if self.grouped:
            return (
                f"{SPEED_PREFIX}{SPEED_TAG_OPEN}{root}{ENTITY_SEP}{root_id}{SPEED_TAG_CLOSE}"
                f"{SPEED_DAY_SEP}{day}"
            )
        return f"{SPEED_PREFIX}{root}{ENTITY_SEP}{root_id}{SPEED_DAY_SEP}{day}"

    def key(self, entity: str, eid: str, day: int) -> str:
        """The hash that holds the cells of entity id ``eid`` on event day ``day``."""
        m = self.members[entity]
        return self.root_key(m.root, m.split(eid)[0], day)

    def root_entity_key(self, key: str) -> str:
        """The entity key of the root whose hashes hold the cells of entity key ``key``
        (itself for a root): the unit of the shared-entity cache's invalidation."""
        entity, eid = split_entity_key(key)
        m = self.members.get(entity)
        if m is None or not m.tag:
            return key
        return entity_key(m.root, m.split(eid)[0])

    def keys(self, entity_keys: list[str], day: int) -> list[str]:
        """:meth:`key` of many entity keys for one day (the read plan's hot path)."""
        if not self.grouped:
            return speed_keys(entity_keys, day)
        head, tail = SPEED_PREFIX + SPEED_TAG_OPEN, f"{SPEED_TAG_CLOSE}{SPEED_DAY_SEP}{day}"
        return [head + self.root_entity_key(k) + tail for k in entity_keys]

    def key_head(self, root: str) -> bytes:
        """The constant start of every key of ``root`` (the vectorized writer appends the root
        id's parts, :meth:`key_tail` and the day)."""
        if self.grouped:
            return f"{SPEED_PREFIX}{SPEED_TAG_OPEN}{root}{ENTITY_SEP}".encode()
        return speed_key_head(root)

    def key_tail(self) -> bytes:
        """What comes between a key's root id and its day."""
        return (SPEED_TAG_CLOSE + SPEED_DAY_SEP if self.grouped else SPEED_DAY_SEP).encode()

    def parse_key(self, key: str) -> tuple[str, str, int] | None:
        """``(root entity, root id, day)`` of a key of this layout; None for any other key."""
        if not key.startswith(SPEED_PREFIX):
            return None
        rest = key[len(SPEED_PREFIX) :]
        if self.grouped:
            if not rest.startswith(SPEED_TAG_OPEN):
                return None
            tag, sep, day = rest[1:].partition(SPEED_TAG_CLOSE + SPEED_DAY_SEP)
            root, _, rid = tag.partition(ENTITY_SEP)
        else:
            if rest.startswith(SPEED_TAG_OPEN):
                return None
            head, sep, day = rest.rpartition(SPEED_DAY_SEP)
            root, _, rid = head.partition(ENTITY_SEP)
        if not sep or not rid or root not in self.members or self.members[root].tag:
            return None
        try:
            return root, rid, int(day)
        except ValueError:
            return None

    def root_of_key(self, key: bytes) -> str | None:
        """The root entity key (``user:17``) of a key of this layout; None for any other key
        (the invalidation tracker's hot path)."""
        try:
            parsed = self.parse_key(key.decode())
        except UnicodeDecodeError:
            return None
        return None if parsed is None else entity_key(parsed[0], parsed[1])

    # ---- fields
    def field_prefix(self, entity: str, eid: str) -> str:
        """What every field of entity id ``eid`` starts with in its hash."""
        return self.members[entity].field_prefix(eid)

    def field(self, entity: str, eid: str, res: str, event_type: str, bucket: int) -> str:
        """The field of one cell in its hash (:meth:`key`)."""
        return self.field_prefix(entity, eid) + speed_field(res, event_type, bucket)

    def cell_address(
        self, entity: str, eid: str, res: str, event_type: str, bucket: int
    ) -> tuple[str, str]:
        """``(key, field)`` of one cell."""
        day = speed_day(bucket, F.RESOLUTION_BY_NAME[res])
        return self.key(entity, eid, day), self.field(entity, eid, res, event_type, bucket)

    def parse_field(
        self, root: str, root_id: str, field: bytes
    ) -> tuple[str, str, str, str, int] | None:
        """``(entity, id, res, event type, bucket)`` of a field of a hash of root id
        ``root_id``; None for a field outside the layout (or of an unknown resolution)."""
        m = _GROUPED_FIELD_RE.match(field) if self.grouped else SPEED_FIELD_RE.match(field)
        if m is None:
            return None
        if self.grouped:
            tag, rest, res, et, b = m.groups()
        else:
            tag, rest, (res, et, b) = None, None, m.groups()
        res_s = res.decode()
        if res_s not in F.RESOLUTION_BY_NAME:
            return None
        if tag is None:
            entity, eid = root, root_id
        else:
            ent = self.by_tag.get((root, tag.decode()))
            if ent is None:
                return None
            entity, eid = ent, root_id + ID_PART_SEP + (rest or b"").decode()
        return entity, eid, res_s, et.decode(), int(b)


_LAYOUTS: dict[str, SpeedLayout] = {}


def speed_layout(name: str | None = None) -> SpeedLayout:
    """The :class:`SpeedLayout` called ``name``; None: the configured one
    (``settings.speed.layout``, ``CTRSTREAM_SPEED__LAYOUT``, default ``grouped``)."""
    if name is None:
        import os

        name = os.environ.get("CTRSTREAM_SPEED__LAYOUT", "grouped").strip() or "grouped"
    got = _LAYOUTS.get(name)
    if got is None:
        got = _LAYOUTS[name] = SpeedLayout(name)
    return got


# --------------------------------------------------------------------------- batch view

BATCH_PREFIX = "bv:"
BATCH_POINTER_KEY = "bv:current"
BATCH_VERSIONS_KEY = "bv:versions"
BATCH_SUMS_FLAG = "sums"  # meta field: "1" when the view carries the :sums hashes
BATCH_RES_SEP = ":"  # between the entity key and the resolution (or long / sums / meta)
LONG_SUFFIX = "long"
SUMS_SUFFIX = "sums"
META_SUFFIX = "meta"


def batch_version_prefix(version: str) -> str:
    """What every key of batch-view version ``version`` starts with."""
    return f"{BATCH_PREFIX}{version}:"


def batch_version_pattern(version: str) -> str:
    """SCAN pattern of every key of one version (``res``: only that resolution's hashes)."""
    return batch_version_prefix(version) + "*"


def batch_key(version: str, entity: str, eid: str, res: str) -> str:
    """The per-bucket hash of one entity and resolution in view ``version``."""
    return (
        f"{batch_version_prefix(version)}{SPEED_TAG_OPEN}{entity}{ENTITY_SEP}{eid}"
        f"{SPEED_TAG_CLOSE}{BATCH_RES_SEP}{res}"
    )


def batch_long_key(version: str, entity: str, eid: str) -> str:
    return batch_key(version, entity, eid, LONG_SUFFIX)


def batch_sums_key(version: str, entity: str, eid: str) -> str:
    return batch_key(version, entity, eid, SUMS_SUFFIX)


def batch_sums_keys(version: str, entity_keys: list[str]) -> list[str]:
    """:func:`batch_sums_key` of many entity keys (the read plan's hot path)."""
    head = batch_version_prefix(version) + SPEED_TAG_OPEN
    tail = f"{SPEED_TAG_CLOSE}{BATCH_RES_SEP}{SUMS_SUFFIX}"
    return [head + k + tail for k in entity_keys]


def batch_meta_key(version: str) -> str:
    return f"{batch_version_prefix(version)}{META_SUFFIX}"


def batch_version_id(cutoff_ms: int, created_ms: int) -> str:
    """The name of a new batch-view version: ``{cutoff_ms}-{created_ms}`` (sortable, and
    without the key separator ``:``)."""
    return f"{int(cutoff_ms)}-{int(created_ms)}"


def batch_entity_of(version: str, key: str) -> tuple[str, str, str] | None:
    """``(entity, id, part)`` of any data hash of view ``version`` - ``part`` a resolution
    name, :data:`LONG_SUFFIX` or :data:`SUMS_SUFFIX`; None for its meta hash or any other
    key."""
    head = batch_version_prefix(version)
    if not key.startswith(head):
        return None
    rest = key[len(head) :]
    if not rest.startswith(SPEED_TAG_OPEN):
        return None
    tagged, sep, part = rest[1:].rpartition(SPEED_TAG_CLOSE + BATCH_RES_SEP)
    entity, _, eid = tagged.partition(ENTITY_SEP)
    if not sep or not eid:
        return None
    if entity not in F.ENTITY_BY_NAME or not (
        part in F.RESOLUTION_BY_NAME or part in (LONG_SUFFIX, SUMS_SUFFIX)
    ):
        return None
    return entity, eid, part


def parse_batch_key(version: str, key: str) -> tuple[str, str, str] | None:
    """``(entity, id, res)`` of a per-resolution hash of view ``version`` (``res`` a
    resolution name); None for its meta, long-window and sums hashes or any other key."""
    parsed = batch_entity_of(version, key)
    return parsed if parsed is not None and parsed[2] in F.RESOLUTION_BY_NAME else None


def batch_field(event_type: str, bucket: int) -> str:
    """Field of a per-resolution batch hash: ``event_type`` count of bucket ``bucket``."""
    return f"{event_type}{bucket}"


BATCH_FIELD_RE = re.compile(rb"^([ic])(-?\d+)$")
"""A per-resolution batch field (bytes): groups event type, bucket."""


def parse_batch_field(field: bytes) -> tuple[str, int] | None:
    """``(event type, bucket)`` of a per-resolution batch field; None for any other."""
    m = BATCH_FIELD_RE.match(field)
    return None if m is None else (m.group(1).decode(), int(m.group(2)))


def long_field(event_type: str, window: F.LongWindow) -> str:
    return f"{event_type}{window.name}"


def suffix_field(res: str, event_type: str, bucket: int) -> str:
    """Field of the ``:sums`` hash: ``event_type`` count of the view's ``res`` buckets
    ``>= bucket``."""
    return f"{res}{FIELD_RES_SEP}{event_type}{bucket}"


# The batch view's writer builds its keys and fields in DuckDB SQL, one statement per entity
# (ctrstream.store.batch_view): these are the same formats as the functions above, as SQL
# expressions over the given column expressions (tests/unit/test_store_layout.py runs both).


def sql_literal(text: str) -> str:
    """``text`` as a SQL string literal (a key suffix, an event type)."""
    return "'" + text.replace("'", "''") + "'"


def batch_key_sql(version: str, entity: str, eid: str, part: str) -> str:
    """:func:`batch_key` (``part`` a resolution), :func:`batch_long_key` or
    :func:`batch_sums_key` (``part`` the SQL string of :data:`LONG_SUFFIX` /
    :data:`SUMS_SUFFIX`) as a SQL expression."""
    return (
        f"{sql_literal(batch_version_prefix(version) + SPEED_TAG_OPEN)} || {entity} || "
        f"{sql_literal(ENTITY_SEP)} || {eid} || {sql_literal(SPEED_TAG_CLOSE + BATCH_RES_SEP)} "
        f"|| {part}"
    )


def batch_field_sql(event_type: str, bucket: str) -> str:
    """:func:`batch_field` as a SQL expression (``bucket`` an integer expression)."""
    return f"{sql_literal(event_type)} || CAST({bucket} AS VARCHAR)"


def long_field_sql(event_type: str, window: str) -> str:
    """:func:`long_field` as a SQL expression (``window`` the long window's name)."""
    return f"{sql_literal(event_type)} || {window}"


def suffix_field_sql(res: str, event_type: str, bucket: str) -> str:
    """:func:`suffix_field` as a SQL expression (``res`` the resolution's name)."""
    return f"{res} || {sql_literal(FIELD_RES_SEP + event_type)} || CAST({bucket} AS VARCHAR)"


# --------------------------------------------------------------------------- calibration

CAL_PREFIX = "cal:"
# every calibration key carries the hash tag {cal}, so that on a Redis Cluster they all sit
# in one slot: a checkpoint writes them in one MULTI/EXEC (ctrstream.store.calibration)
_CAL = CAL_PREFIX + "{cal}:"
CAL_SEQ_KEY = _CAL + "seq"
CAL_VERSIONS_KEY = _CAL + "versions"  # the calibrator ids with a calibrator
CAL_ID_SEP = "@"


def calibrator_id(model_name: str, model_version: str) -> str:
    """The id one model version's calibration state is keyed by: ``{model_name}@{version}``,
    so that two models' version 1 (``ctr_lr@1``, ``ctr_deep@1``) learn apart; with no model
    name (predictions written before they carried one) the bare version, as those were."""
    version = str(model_version)
    if not version or CAL_ID_SEP in version:
        raise ValueError(f"bad model version {model_version!r} for a calibrator id")
    if not model_name:
        return version
    if CAL_ID_SEP in model_name or ":" in model_name:
        raise ValueError(
            f"bad model name {model_name!r} for a calibrator id (no {CAL_ID_SEP!r} or ':'): "
            "use the published base name, e.g. ctr_lr"
        )
    return f"{model_name}{CAL_ID_SEP}{version}"


def parse_calibrator_id(cal_id: str) -> tuple[str, str]:
    """``(model_name, model_version)`` of a calibrator id (``model_name`` "" for a bare
    version)."""
    name, sep, version = cal_id.rpartition(CAL_ID_SEP)
    return (name, version) if sep else ("", cal_id)


def cal_key(cal_id: str) -> str:
    """The HASH of calibrator ``cal_id`` (:func:`calibrator_id`)."""
    return f"{_CAL}{cal_id}"


def cal_state_key(cal_id: str) -> str:
    return f"{_CAL}{cal_id}:state"


def cal_history_key(cal_id: str) -> str:
    return f"{_CAL}{cal_id}:history"


def cal_drift_key(cal_id: str) -> str:
    return f"{_CAL}{cal_id}:drift"


def cal_job_key(job_name: str) -> str:
    return f"{_CAL}job:{job_name}"


# --------------------------------------------------------------------------- reconciliation

RECONCILE_LAST_KEY = "reconcile:last"


def reconcile_key(version: str) -> str:
    return f"reconcile:{version}"


# --------------------------------------------------------------------------- decay monitoring

# the decay monitor's summary for the controller (JSON; ``ctrstream.store.monitor``)
DECAY_STATE_KEY = "mon:decay"


# --------------------------------------------------------------------------- cache tracking

# the shared-entity cache's heartbeat keys: outside the speed view, and sorting after "sv:"
# so that Redis, which sends the invalidations of one event-loop iteration prefix by prefix
# in key order, reports a heartbeat after the speed-view writes executed together with it
TRACKING_PREFIX = "sv~tracking:"


# --------------------------------------------------------------------------- precomputed predictions

PREDICTION_PREFIX = "pp:"
PREDICTION_SEP = ":"  # between the namespace and the user id


def check_prediction_namespace(namespace: str) -> str:
    """``namespace`` if it can name a set of precomputed predictions: non-empty, without
    the key separator ``:`` or a SCAN wildcard (so that its keys parse back and a pattern
    matches its keys only)."""
    if not namespace or any(c in namespace for c in ":*?[]\\"):
        raise ValueError(
            f"bad prediction namespace {namespace!r}: give a non-empty name without ':', "
            "'*', '?', '[', ']' or a backslash (e.g. ctr_deep-1-20260107T00)"
        )
    return namespace


def prediction_key(namespace: str, user_id: int | str) -> str:
    """The HASH of one user's precomputed predictions in ``namespace``."""
    return f"{PREDICTION_PREFIX}{check_prediction_namespace(namespace)}{PREDICTION_SEP}{user_id}"


def prediction_key_head(namespace: str) -> str:
    """What every key of ``namespace`` starts with (append the user id)."""
    return f"{PREDICTION_PREFIX}{check_prediction_namespace(namespace)}{PREDICTION_SEP}"


def prediction_pattern(namespace: str) -> str:
    """SCAN pattern of every key of ``namespace``."""
    return prediction_key_head(namespace) + "*"


def prediction_field(ad_id: int | str) -> str:
    """The field of one ad in a user's prediction hash."""
    return str(ad_id)


def parse_prediction_key(key: str) -> tuple[str, str] | None:
    """``(namespace, user id)`` of a prediction key; None for any other key."""
    if not key.startswith(PREDICTION_PREFIX):
        return None
    namespace, sep, user = key[len(PREDICTION_PREFIX) :].partition(PREDICTION_SEP)
    if not sep or not namespace or not user or PREDICTION_SEP in user:
        return None
    return namespace, user
