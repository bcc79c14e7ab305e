"""The Redis layout: every key and field ctrstream writes or reads, built and parsed here only.

Nothing outside :mod:`ctrstream.store` spells a key prefix, a field format or a RESP byte;
everything in it builds them with the functions below (the Lua read script included: it
receives the full key names in ``KEYS``, built here, and only the field names of the
buckets it sums). Modelled on Feast's ``key_encoding_utils``: one place encodes keys, one
place decodes them.

Speed view (written by the speed layer, absolute counts, never ``HINCRBY``)
---------------------------------------------------------------------------
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
* ``bv:{version}:{entity}:{id}:{res}`` - one HASH per resolution, fields ``i{bucket}`` /
  ``c{bucket}`` (:func:`batch_field`), the buckets closed by the cut-off
  (``features.view_buckets``);
* ``bv:{version}:{entity}:{id}:long`` - fields ``i7d`` / ``c7d`` (:func:`long_field`);
* ``bv:{version}:{entity}:{id}:sums`` - the serving summary of the entity: the long-window
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
* ``cal:{calibrator}`` (HASH ``version``, ``params``, ``metrics``, ``updated_ms``),
  ``cal:{calibrator}:state`` / ``:history`` / ``:drift``, ``cal:versions`` (SET of the
  calibrator ids), ``cal:seq`` (the reload counter), ``cal:job:{name}`` (the calibration
  job's checkpoint); a calibrator id (:func:`calibrator_id`) is ``{model_name}@{version}``
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
    return f"{batch_version_prefix(version)}{entity}{ENTITY_SEP}{eid}{BATCH_RES_SEP}{res}"


def batch_long_key(version: str, entity: str, eid: str) -> str:
    return batch_key(version, entity, eid, LONG_SUFFIX)


def batch_sums_key(version: str, entity: str, eid: str) -> str:
    return batch_key(version, entity, eid, SUMS_SUFFIX)


def batch_sums_keys(version: str, entity_keys: list[str]) -> list[str]:
    """:func:`batch_sums_key` of many entity keys (the read plan's hot path)."""
    head, tail = batch_version_prefix(version), f"{BATCH_RES_SEP}{SUMS_SUFFIX}"
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
    try:
        entity, tail = key[len(head) :].split(ENTITY_SEP, 1)
        eid, part = tail.rsplit(BATCH_RES_SEP, 1)
    except ValueError:
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
        f"{sql_literal(batch_version_prefix(version))} || {entity} || {sql_literal(ENTITY_SEP)} "
        f"|| {eid} || {sql_literal(BATCH_RES_SEP)} || {part}"
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
CAL_SEQ_KEY = "cal:seq"
CAL_VERSIONS_KEY = "cal:versions"  # the calibrator ids with a calibrator
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
    return f"{CAL_PREFIX}{cal_id}"


def cal_state_key(cal_id: str) -> str:
    return f"{CAL_PREFIX}{cal_id}:state"


def cal_history_key(cal_id: str) -> str:
    return f"{CAL_PREFIX}{cal_id}:history"


def cal_drift_key(cal_id: str) -> str:
    return f"{CAL_PREFIX}{cal_id}:drift"


def cal_job_key(job_name: str) -> str:
    return f"{CAL_PREFIX}job:{job_name}"


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
