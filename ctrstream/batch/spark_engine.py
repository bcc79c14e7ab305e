"""The batch layer's declarations on Apache Spark: the same features, for an archive that
outgrows one machine.

The DuckDB/numpy engine (:mod:`ctrstream.batch.point_in_time`) is the default and the
reference; this module computes the same outputs with PySpark over the same Parquet archive,
from the same ``ctrstream.features`` declarations (no entity, bucket size or window is
written here), so that the batch layer can run on a cluster. ``docs/batch-engines.md`` says
when to switch (the crossover measured on one machine: ``ctrstream bench engines``).

What it computes (each equal, cell for cell, to the DuckDB engine's output:
``tests/integration/test_spark_engine.py``)

* :func:`bucket_counts` - impressions/clicks per (entity, id, resolution, bucket);
* :func:`long_window_counts` - per (entity, id, long window) at a time;
* :func:`training_set_frame` / :func:`training_set` - the point-in-time training set: labels
  by the attribution range join, the window counts of every entity at every impression's
  time, and ``dense`` / ``sparse`` from ``features.dense_from_counts`` /
  ``features.sparse_ids`` - the very functions serving calls, applied per Arrow batch on the
  executors (``mapInArrow``), so the transformation cannot drift between the engines;
* :func:`write_training_shards` - the training set written as the shard format
  (:mod:`ctrstream.batch.shards`), one partition at a time through the driver: what
  ``ctrstream train --engine spark`` trains on by default.

How the point-in-time windows are counted: per entity, the events are hash-partitioned by
the entity's fields (every id's events land in one partition) and one Python pass per
partition counts every window of that entity with
:func:`ctrstream.batch.point_in_time.point_in_time_counts` - the DuckDB engine's own prefix
counts and binary search, so the window semantics (closed buckets, strictly earlier events
of the open bucket, the closed days of a long window) cannot drift between the engines.
The entities' rows are gathered per impression in one more shuffle. (Spark window
functions, one per entity and frame, would sort the events 56 times: ``docs/batch-engines.md``
measures both.) A partition holds all the events of its ids, so the partition count grows
with the archive (:data:`PARTITION_EVENTS`). The deduplicated reads are local checkpoints,
computed once for all the entities' passes.

Duplicates are dropped as :func:`ctrstream.batch.archive.read_events` does: per event id the
copy with the earliest event time, among the events of the read range. (Copies of one id at
the same time are re-deliveries of one record: whichever Spark keeps is the same record.)

pyspark is an optional dependency (the ``spark`` extra, which ``make setup`` installs); it is
imported when a session is made, with an error saying how to install it when it is missing.
Spark needs Java 17 or later, as Kafka does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctrstream import features as F
from ctrstream.batch import shards
from ctrstream.batch.archive import ID_FIELD, SCHEMAS, list_files, max_event_time
from ctrstream.batch.point_in_time import (
    BUCKET_COUNTS_SCHEMA,
    LONG_COUNTS_SCHEMA,
    _empty_result,
    long_window_range,
    lookback_start,
)

ENGINES = ("duckdb", "spark")

# the columns each output row needs: entity fields, the sparse fields, ids and time
_ENTITY_FIELDS = sorted({f for e in F.ENTITIES for f in e.fields})
_QUERY_FIELDS = ["impression_id", "event_time_ms"] + [
    f for f in F.SPARSE_FIELDS if f != "hour" and f not in _ENTITY_FIELDS
]
# the training set's columns, as the Spark engine returns them (counts flattened in
# (entity, window, imps/clicks) order: reshape to (rows, len(ENTITIES), N_WINDOWS, 2))
TRAINING_SCHEMA = pa.schema(
    [
        ("impression_id", pa.string()),
        ("event_time_ms", pa.int64()),
        ("label", pa.int8()),
        ("click_delay_ms", pa.int64()),
        ("counts", pa.list_(pa.float64())),
        ("dense", pa.list_(pa.float32())),
        ("sparse", pa.list_(pa.int64())),
    ]
)


class SparkUnavailable(RuntimeError):
    """pyspark (or the Java it runs on) is missing."""


def resolve_engine(engine: str | None = None, default: str = "duckdb") -> str:
    """The batch engine to use: ``engine`` (``--engine``) if given, else ``default`` (the
    ``batch_engine`` setting, ``CTRSTREAM_BATCH_ENGINE``). Raises ValueError naming the
    choices for anything else."""
    name = (engine or default).strip().lower()
    if name not in ENGINES:
        raise ValueError(f"unknown batch engine {name!r}: choose one of {', '.join(ENGINES)}")
    return name


# --------------------------------------------------------------------------- the session


def spark_session(
    master: str = "local[2]",
    shuffle_partitions: int = 4,
    driver_memory: str = "1g",
    local_dir: str | Path | None = None,
    app_name: str = "ctrstream-batch",
    conf: dict[str, str] | None = None,
) -> Any:
    """A SparkSession for the batch layer (``getOrCreate``: an active session is reused).

    The defaults suit one small machine (local mode, two cores, few shuffle partitions, a
    1 GB driver); on a cluster pass its ``master`` and ``conf``. Python workers run this
    interpreter (the features' numpy code runs there). Raises :class:`SparkUnavailable`
    when pyspark is not installed or Java is missing."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as e:
        raise SparkUnavailable(
            "the Spark batch engine needs pyspark: install the project's spark extra "
            "(`make setup`, or `pip install -e '.[spark]'`), or use --engine duckdb"
        ) from e
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.driver.memory", driver_memory)
        .config("spark.sql.shuffle.partitions", str(int(shuffle_partitions)))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # a large frame of window columns: keep the plan's codegen within the JVM's limits
        .config("spark.sql.codegen.maxFields", "1000")
    )
    if local_dir is not None:
        builder = builder.config("spark.local.dir", str(local_dir))
    for k, v in (conf or {}).items():
        builder = builder.config(k, v)
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # py4j/JVM start-up errors have no common type; re-raised
        raise SparkUnavailable(
            f"could not start Spark ({type(e).__name__}: {e}); it needs Java 17 or later "
            "on PATH or JAVA_HOME"
        ) from e
    spark.sparkContext.setLogLevel("ERROR")
    return spark


# --------------------------------------------------------------------------- reading


def _spark_type(t: pa.DataType) -> Any:
    from pyspark.sql import types as T

    if pa.types.is_int64(t):
        return T.LongType()
    if pa.types.is_string(t):
        return T.StringType()
    if pa.types.is_float64(t):
        return T.DoubleType()
    raise TypeError(f"no Spark type for the archive's Arrow type {t}")


def read_events(
    spark: Any,
    data_dir: str | Path,
    kind: str,
    start_ms: int | None = None,
    end_ms: int | None = None,
    columns: list[str] | None = None,
) -> Any:
    """A Spark DataFrame of the archive's ``kind`` events with ``start_ms <= event_time_ms <
    end_ms``, each event id once (the earliest copy), as
    :func:`ctrstream.batch.archive.read_events` reads them. Only the hour partitions that
    overlap the range are listed. ``columns``: the ones to keep (the id is always read)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as Fn
    from pyspark.sql import types as T

    schema = SCHEMAS[kind]
    idf = ID_FIELD[kind]
    names = list(dict.fromkeys([idf, "event_time_ms", *(columns or schema.names)]))
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise ValueError(f"{kind} have no columns {missing}: they have {schema.names}")
    sschema = T.StructType(
        [T.StructField(n, _spark_type(schema.field(n).type), True) for n in names]
    )
    files = [str(f) for f in list_files(data_dir, kind, start_ms, end_ms)]
    if not files:
        return spark.createDataFrame([], sschema)
    df = spark.read.schema(sschema).parquet(*files).select(*names)
    t = Fn.col("event_time_ms")
    if start_ms is not None:
        df = df.where(t >= int(start_ms))
    if end_ms is not None:
        df = df.where(t < int(end_ms))
    first = Window.partitionBy(idf).orderBy(t.asc())
    return df.withColumn("_n", Fn.row_number().over(first)).where("_n = 1").drop("_n")


def _events(imps: Any, clks: Any) -> Any:
    """Impressions and clicks as one frame of the entity fields, time and ``c`` (0/1)."""
    from pyspark.sql import functions as Fn

    cols = [*_ENTITY_FIELDS, "event_time_ms"]
    return imps.select(*cols, Fn.lit(0).alias("c")).unionByName(
        clks.select(*cols, Fn.lit(1).alias("c"))
    )


def _eid(entity: F.Entity) -> Any:
    """``features.entity_id`` as a Spark column (fields as text joined with ``:``)."""
    from pyspark.sql import functions as Fn

    return Fn.concat_ws(":", *(Fn.col(f).cast("string") for f in entity.fields))


def _div(column: str, ms: int) -> Any:
    """``column // ms`` in integer arithmetic (a bucket or day index)."""
    from pyspark.sql import functions as Fn

    return Fn.expr(f"{column} div {int(ms)}").cast("long")


def _to_arrow(df: Any, schema: pa.Schema, order: list[str]) -> pa.Table:
    out = df.orderBy(*order).toArrow()
    return out.select(schema.names).cast(schema) if out.num_rows else schema.empty_table()


# --------------------------------------------------------------------------- bucket counts


def bucket_counts(spark: Any, ev: Any, since_ms: int | None = None) -> Any:
    """Counts per (entity, id, resolution, bucket) of the events of :func:`_events`-shaped
    frame ``ev`` (``since_ms`` drops older buckets, as the batch view does). A Spark
    DataFrame with :data:`BUCKET_COUNTS_SCHEMA`'s columns."""
    from pyspark.sql import functions as Fn

    parts = []
    for e in F.ENTITIES:
        for r in F.RESOLUTIONS:
            b = _div("event_time_ms", r.bucket_ms)
            part = ev.select(
                Fn.lit(e.name).alias("entity"),
                _eid(e).alias("eid"),
                Fn.lit(r.name).alias("res"),
                b.alias("bucket"),
                "c",
            )
            if since_ms is not None:
                part = part.where(Fn.col("bucket") >= int(since_ms) // r.bucket_ms)
            parts.append(part)
    allp = parts[0]
    for p in parts[1:]:
        allp = allp.unionByName(p)
    return allp.groupBy("entity", "eid", "res", "bucket").agg(
        Fn.sum(1 - Fn.col("c")).cast("long").alias("imps"),
        Fn.sum("c").cast("long").alias("clicks"),
    )


def archive_bucket_counts(
    spark: Any, data_dir: str | Path, until_ms: int, since_ms: int | None = None
) -> pa.Table:
    """:func:`ctrstream.batch.point_in_time.bucket_counts` of the archive's events in
    ``[since_ms, until_ms)``, computed by Spark; sorted by entity, eid, res, bucket."""
    imps = read_events(spark, data_dir, "impressions", since_ms, until_ms, _ENTITY_FIELDS)
    clks = read_events(spark, data_dir, "clicks", since_ms, until_ms, _ENTITY_FIELDS)
    # read once: every (entity, resolution) part reads the events
    df = bucket_counts(spark, _events(imps, clks).localCheckpoint(False))
    return _to_arrow(df, BUCKET_COUNTS_SCHEMA, ["entity", "eid", "res", "bucket"])


def archive_long_window_counts(spark: Any, data_dir: str | Path, at_ms: int) -> pa.Table:
    """:func:`ctrstream.batch.point_in_time.long_window_counts` at ``at_ms`` of the archive's
    events, computed by Spark; sorted by entity, eid, long_window."""
    from pyspark.sql import functions as Fn

    parts = []
    for w in F.LONG_WINDOWS:
        lo, hi = long_window_range(at_ms, w)
        imps = read_events(spark, data_dir, "impressions", lo, hi, _ENTITY_FIELDS)
        clks = read_events(spark, data_dir, "clicks", lo, hi, _ENTITY_FIELDS)
        ev = _events(imps, clks).localCheckpoint(False)  # read once for every entity
        for e in F.ENTITIES:
            parts.append(
                ev.select(
                    Fn.lit(e.name).alias("entity"),
                    _eid(e).alias("eid"),
                    Fn.lit(w.name).alias("long_window"),
                    "c",
                )
            )
    allp = parts[0]
    for p in parts[1:]:
        allp = allp.unionByName(p)
    df = allp.groupBy("entity", "eid", "long_window").agg(
        Fn.sum(1 - Fn.col("c")).cast("long").alias("imps"),
        Fn.sum("c").cast("long").alias("clicks"),
    )
    return _to_arrow(df, LONG_COUNTS_SCHEMA, ["entity", "eid", "long_window"])


# --------------------------------------------------------------------------- training set


# the events one partition of a per-entity count holds (one Python worker counts them at
# once): the partition count is sized from the archive by it, and never below
# spark.sql.shuffle.partitions
PARTITION_EVENTS = 1_000_000
# the per-entity counts' rows, in Spark's DDL
_ENTITY_COUNTS_DDL = "impression_id string, k int, vals array<double>"


def _entity_counts(k: int) -> Any:
    """The ``mapInArrow`` function that counts entity ``k``'s windows in one partition of
    events hash-partitioned by that entity's fields (so every id's events are in one
    partition): ``point_in_time.point_in_time_counts`` - the DuckDB engine's own counting -
    over the partition's impressions (``c`` 0), clicks (``c`` 1) and query rows (``_q``),
    one row (impression_id, k, the ``N_WINDOWS x 2`` counts) per query row."""

    def count(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow.compute as pc

        from ctrstream.batch.point_in_time import point_in_time_counts

        got = list(batches)
        if not got:
            return
        tab = pa.Table.from_batches(got)
        query = tab.filter(pc.fill_null(tab.column("_q"), False))
        n = query.num_rows
        if n == 0:
            return
        imps = tab.filter(pc.equal(tab.column("c"), 0))
        clks = tab.filter(pc.equal(tab.column("c"), 1))
        counts = point_in_time_counts(imps, clks, query, entities=(k,))[:, k]
        yield pa.RecordBatch.from_arrays(
            [
                query.column("impression_id").combine_chunks(),
                pa.array(np.full(n, k, dtype=np.int32)),
                _lists(np.ascontiguousarray(counts).reshape(-1), n, pa.float64()),
            ],
            names=["impression_id", "k", "vals"],
        )

    return count


def _window_counts(ev: Any, n_parts: int) -> Any:
    """Per query row of ``ev`` (events with the entity fields, ``event_time_ms``, ``c``,
    ``_q`` and ``impression_id``): ``impression_id`` and ``counts``, the window counts of
    every entity and window flattened in (entity, window, imps/clicks) order.

    One shuffle per entity (hash-partitioned by its fields into ``n_parts`` partitions) and
    one Python pass over each partition, which counts every window of that entity with
    prefix counts and binary search, as the DuckDB engine does; the entities' rows are then
    gathered per impression (one more shuffle)."""
    from pyspark.sql import functions as Fn

    cols = [*_ENTITY_FIELDS, "event_time_ms", "c", "_q", "impression_id"]
    narrow = ev.select(*cols)
    parts = [
        narrow.repartition(int(n_parts), *e.fields).mapInArrow(
            _entity_counts(k), _ENTITY_COUNTS_DDL
        )
        for k, e in enumerate(F.ENTITIES)
    ]
    allp = parts[0]
    for p in parts[1:]:
        allp = allp.unionByName(p)
    by_entity = Fn.array_sort(Fn.collect_list(Fn.struct("k", "vals")))
    return allp.groupBy("impression_id").agg(
        Fn.flatten(Fn.transform(by_entity, lambda x: x["vals"])).alias("counts")
    )


def _features_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Per Arrow batch (on an executor): counts -> ``dense`` and the event fields ->
    ``sparse`` with the features module's own functions."""
    n_counts = len(F.ENTITIES) * F.N_WINDOWS * 2
    for rb in batches:
        n = rb.num_rows
        flat = rb.column("counts").flatten().to_numpy(zero_copy_only=False)
        counts = np.asarray(flat, dtype=np.float64).reshape(n, n_counts)
        cols: dict[str, Any] = {
            f: rb.column(f).to_numpy(zero_copy_only=False) for f in F.SPARSE_FIELDS if f != "hour"
        }
        t = rb.column("event_time_ms").to_numpy(zero_copy_only=False).astype(np.int64)
        cols["event_time_ms"] = t
        dense = F.dense_from_counts(counts.reshape(n, len(F.ENTITIES), F.N_WINDOWS, 2))
        sparse = F.sparse_ids(cols) if n else np.zeros((0, F.N_SPARSE), dtype=np.int64)
        yield pa.RecordBatch.from_arrays(
            [
                rb.column("impression_id"),
                pa.array(t, pa.int64()),
                rb.column("label").cast(pa.int8()),
                rb.column("click_delay_ms").cast(pa.int64()),
                _lists(counts.reshape(-1), n, pa.float64()),
                _lists(dense.reshape(-1), n, pa.float32()),
                _lists(sparse.reshape(-1), n, pa.int64()),
            ],
            schema=TRAINING_SCHEMA,
        )


def _lists(flat: np.ndarray, n: int, typ: pa.DataType) -> pa.Array:
    width = len(flat) // n if n else 0
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(flat, typ))


def training_set_frame(
    spark: Any,
    data_dir: str | Path,
    start_ms: int | None = None,
    end_ms: int | None = None,
    attribution_window_ms: int = 1_800_000,
) -> Any:
    """The point-in-time training set of the archive under ``data_dir`` as a Spark DataFrame
    with :data:`TRAINING_SCHEMA`'s columns (unordered: sort by event_time_ms,
    impression_id for the reference order). Same rows and values as
    :func:`ctrstream.batch.point_in_time.training_set`; None when nothing is labeled."""
    rows = _training_rows(spark, data_dir, start_ms, end_ms, attribution_window_ms)
    return None if rows is None else rows.mapInArrow(_features_batches, _TRAINING_DDL)


def _training_rows(
    spark: Any,
    data_dir: str | Path,
    start_ms: int | None,
    end_ms: int | None,
    attribution_window_ms: int,
) -> Any:
    """The training set's rows before the features: the query fields, ``label``,
    ``click_delay_ms`` and ``counts`` (the window counts, flattened in counts order); None
    when the archive is empty."""
    from pyspark.sql import functions as Fn

    W = int(attribution_window_ms)
    max_t = max_event_time(data_dir)
    if max_t is None:
        return None
    label_end = max_t - W + 1
    end = label_end if end_ms is None else min(int(end_ms), label_end)
    hist = None if start_ms is None else lookback_start(int(start_ms))
    cols = list(dict.fromkeys([*_ENTITY_FIELDS, *_QUERY_FIELDS]))
    # read and deduplicated once (a local checkpoint: computed at the first action, kept on
    # the executors, freed with the frame): every entity's count, the rows and the labels
    # read them
    imps = read_events(spark, data_dir, "impressions", hist, end, cols).localCheckpoint(False)
    clks = read_events(
        spark, data_dir, "clicks", hist, end + W + 1, ["impression_id", *_ENTITY_FIELDS]
    ).localCheckpoint(False)

    t = Fn.col("event_time_ms")
    is_query = t < end if start_ms is None else (t < end) & (t >= int(start_ms))
    # the windows count events before `end` only: every later event is after every query
    ev = imps.select("*", is_query.alias("_q"), Fn.lit(0).alias("c"))
    ev = ev.unionByName(
        clks.where(t < end)
        .drop("click_id", "impression_id")
        .select("*", Fn.lit(False).alias("_q"), Fn.lit(1).alias("c")),
        allowMissingColumns=True,
    )
    events = _archive_rows(data_dir, "impressions", hist, end)
    events += _archive_rows(data_dir, "clicks", hist, end)
    n_parts = max(
        int(spark.conf.get("spark.sql.shuffle.partitions")), -(-events // PARTITION_EVENTS)
    )
    counts = _window_counts(ev, n_parts)
    rows = (
        imps.where(is_query)
        .select(*_QUERY_FIELDS, *(f for f in _ENTITY_FIELDS if f not in _QUERY_FIELDS))
        .join(counts, "impression_id")
    )

    # labels: the first click per impression within the attribution window
    q = imps.where(is_query).select("impression_id", Fn.col("event_time_ms").alias("_t"))
    first = (
        q.join(clks.select("impression_id", "event_time_ms"), "impression_id")
        .where(t <= Fn.col("_t") + W)
        .groupBy("impression_id", "_t")
        .agg((Fn.min(t) - Fn.col("_t")).alias("_delay"))
        .select("impression_id", "_delay")
    )
    rows = rows.join(first, "impression_id", "left")
    rows = rows.withColumn("label", Fn.when(Fn.col("_delay").isNull(), 0).otherwise(1))
    rows = rows.withColumn("click_delay_ms", Fn.coalesce(Fn.col("_delay"), Fn.lit(-1)))
    return rows.drop("_delay")


# TRAINING_SCHEMA in Spark's DDL (pyspark's Arrow-to-Spark converter needs pandas)
_TRAINING_DDL = (
    "impression_id string, event_time_ms bigint, label tinyint, click_delay_ms bigint, "
    "counts array<double>, dense array<float>, sparse array<bigint>"
)


def training_set(
    data_dir: str | Path,
    start_ms: int | None = None,
    end_ms: int | None = None,
    attribution_window_ms: int = 1_800_000,
    spark: Any = None,
) -> dict:
    """:func:`ctrstream.batch.point_in_time.training_set` of an archive directory computed
    by Spark and collected into the same dict of numpy arrays (sorted by (event_time_ms,
    impression_id)) - what ``ctrstream train --engine spark`` trains on. ``spark``: a
    session (default: :func:`spark_session`'s)."""
    spark = spark or spark_session()
    df = training_set_frame(spark, data_dir, start_ms, end_ms, attribution_window_ms)
    if df is None:
        return _empty_result()
    tab = df.orderBy("event_time_ms", "impression_id").toArrow()
    if tab.num_rows == 0:
        return _empty_result()
    tab = tab.cast(TRAINING_SCHEMA).combine_chunks()
    n = tab.num_rows

    def flat(name: str, width: int) -> np.ndarray:
        col = tab.column(name).combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).reshape(n, width)

    counts = flat("counts", len(F.ENTITIES) * F.N_WINDOWS * 2)
    return {
        "impression_id": tab.column("impression_id").to_numpy(zero_copy_only=False),
        "event_time_ms": tab.column("event_time_ms").to_numpy().astype(np.int64),
        "label": tab.column("label").to_numpy().astype(np.int8),
        "click_delay_ms": tab.column("click_delay_ms").to_numpy().astype(np.int64),
        "counts": counts.reshape(n, len(F.ENTITIES), F.N_WINDOWS, 2).astype(np.float64),
        "dense": flat("dense", F.N_DENSE).astype(np.float32),
        "sparse": flat("sparse", F.N_SPARSE).astype(np.int64),
    }


# --------------------------------------------------------------------------- shards

# the rows of one Spark partition the driver holds at a time while writing shards (the
# partition count of the range sort is sized from the archive's impressions by it)
PARTITION_ROWS = 200_000
# the rows of one shard (about: a shard never splits the rows of one event time)
ROWS_PER_SHARD = 250_000


def _shard_ipc_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Per Arrow batch (on an executor, in the partition's order): the features, as one
    row holding the batch in the shard format (:func:`ctrstream.batch.shards.shard_schema`)
    serialized as an Arrow IPC stream - so the driver receives one value per batch, not a
    Python object per cell."""
    schema = shards.shard_schema()
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    for rb in _features_batches(batches):
        if rb.num_rows == 0:
            continue
        out = pa.RecordBatch.from_arrays(
            [
                rb.column("impression_id"),
                rb.column("event_time_ms"),
                rb.column("label"),
                rb.column("click_delay_ms"),
                pa.FixedSizeListArray.from_arrays(rb.column("dense").flatten(), F.N_DENSE),
                pa.FixedSizeListArray.from_arrays(rb.column("sparse").flatten(), F.N_SPARSE),
            ],
            schema=schema,
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema, options=options) as w:
            w.write_batch(out)
        yield pa.RecordBatch.from_arrays([pa.array([sink.getvalue().to_pybytes()])], ["ipc"])


def _archive_rows(data_dir: str | Path, kind: str, start_ms: int | None, end_ms: int | None) -> int:
    """The ``kind`` events the archive's files of ``[start_ms, end_ms)`` hold (Parquet
    metadata: an upper bound, duplicates and the files' edges included)."""
    import pyarrow.parquet as pq

    files = list_files(data_dir, kind, start_ms, end_ms)
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def write_training_shards(
    data_dir: str | Path,
    out_dir: str | Path,
    start_ms: int | None = None,
    end_ms: int | None = None,
    attribution_window_ms: int = 1_800_000,
    spark: Any = None,
    rows_per_shard: int | None = None,
) -> dict[str, Any]:
    """The point-in-time training set of the archive under ``data_dir`` (the rows and values
    of :func:`training_set`) computed by Spark and written as a shard directory
    (:mod:`ctrstream.batch.shards`) into ``out_dir`` (new or empty); returns its manifest.

    The set never passes through the driver whole: Spark range-partitions the rows by event
    time and sorts each partition by (event_time_ms, impression_id); the executors turn each
    Arrow batch into shard columns; the driver pulls one partition at a time
    (``toLocalIterator``) and cuts shards of about ``rows_per_shard`` rows (default
    :data:`ROWS_PER_SHARD`), never between two rows of one event time, so shards do not
    overlap in time."""
    spark = spark or spark_session()
    per_shard = int(rows_per_shard or ROWS_PER_SHARD)
    writer = shards.ShardWriter(
        out_dir, attribution_window_ms=attribution_window_ms, start_ms=start_ms, end_ms=end_ms
    )
    rows = _training_rows(spark, data_dir, start_ms, end_ms, attribution_window_ms)
    if rows is None:
        return writer.close()
    n_parts = max(1, -(-_archive_rows(data_dir, "impressions", start_ms, end_ms) // PARTITION_ROWS))
    ordered = rows.repartitionByRange(n_parts, "event_time_ms").sortWithinPartitions(
        "event_time_ms", "impression_id"
    )
    ipc = ordered.mapInArrow(_shard_ipc_batches, "ipc binary")
    pending = shards.shard_schema().empty_table()
    for row in ipc.toLocalIterator(prefetchPartitions=False):
        pending = pa.concat_tables([pending, pa.ipc.open_stream(row["ipc"]).read_all()])
        if pending.num_rows >= per_shard:
            pending = _write_shards(writer, pending, per_shard)
    if pending.num_rows:
        writer.write(shards.from_table(pending))
    return writer.close()


def _write_shards(writer: shards.ShardWriter, rows: pa.Table, per_shard: int) -> pa.Table:
    """Write shards of ``rows`` (sorted by time) of at least ``per_shard`` rows, each up to
    the end of its last event time; return the rest: fewer than ``per_shard`` rows, or rows
    of a time the next rows may continue."""
    t = rows.column("event_time_ms").to_numpy()
    i = 0
    while len(t) - i >= per_shard:
        j = int(np.searchsorted(t, t[i + per_shard - 1], side="right"))
        if j == len(t):
            break
        writer.write(shards.from_table(rows.slice(i, j - i)))
        i = j
    return rows.slice(i)


__all__ = [
    "ENGINES",
    "PARTITION_EVENTS",
    "PARTITION_ROWS",
    "ROWS_PER_SHARD",
    "TRAINING_SCHEMA",
    "SparkUnavailable",
    "archive_bucket_counts",
    "archive_long_window_counts",
    "bucket_counts",
    "read_events",
    "resolve_engine",
    "spark_session",
    "training_set",
    "training_set_frame",
    "write_training_shards",
]
